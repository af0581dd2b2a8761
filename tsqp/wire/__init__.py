"""The link between the two sides: message format, the TEE's client, CURVE keys, endpoint policy.

Both sides import this package; it imports neither side. Modules are imported one by one
(this file imports nothing), so the CLI can reach the light ones before torch loads.
"""
