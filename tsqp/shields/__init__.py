"""Shields, on the trusted side: what the untrusted server sees of each linear op, and how its answers are checked.

A shield has four parts: `prepare` (the offline phase: a pool of masks and their products with
the weights), `mask` (what goes on the wire), `verify` (Freivalds' check of the server's
result) and `unmask`. `ShieldedBackend` (`backend`) wraps the remote backend with one, so the
inference core (`tsqp.tee.llama`) never knows which is on.

- `plain` (`base`): nothing hidden, as the original prototype (the server even does the embedding).
- `otp`: a one-time pad over Z_p on fixed-point activations, exact (see `tsqp.model.fixedpoint`).
- `noise`: X + c·G with G Gaussian and c = scale · rms(X) per row; hides only statistically.
- `seqmix`: M·X with M = D + αβᵀ over the token axis, undone by Sherman–Morrison. For one
  decoded token M is a scalar: it hides nothing there. Kept as a measured comparison.

In every mode but `plain` the embedding lookup happens in the TEE and the server never sees a token id.
`config` holds the settings and their defaults and imports nothing heavy; this file imports nothing.
"""
