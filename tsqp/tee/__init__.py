"""The trusted side: the one LLaMA forward pass, generation, sessions and the private server they start.

Modules are imported one by one (this file imports nothing): the CLI starts a private server
before it loads torch.
"""
