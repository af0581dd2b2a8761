"""The trusted side's masks and checks: what the untrusted server sees of each product, and how its answers are verified.

`config` holds the settings and their defaults and imports nothing heavy; the shields themselves
(`plain`, `otp`, `noise`, `seqmix`) and `ShieldedBackend` need torch. This file imports nothing.
"""
