"""The untrusted side (`tsqp serve-gpu`): the socket loop, the op handlers, batching, stats, recording.

Nothing here imports the trusted side (`tsqp.tee`) or the shields: the server computes on what it
receives and never holds a secret.
"""
