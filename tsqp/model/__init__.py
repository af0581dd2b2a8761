"""What both sides know of the model: its config, loading and weight names, the linear products, the fixed-point algebra.

Modules are imported one by one (this file imports nothing): resolving a model must not load torch.
"""
