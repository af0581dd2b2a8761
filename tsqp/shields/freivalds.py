"""Freivalds' check of float products: a fault detector, not a defence.

It catches a wrong result without recomputing it, but only beyond a rounding tolerance: a
hostile server can spend that tolerance to steer an answer (`tsqp audit`'s steering attack).
The exact shields (otp, plain with --verify) check integers instead and leave it nothing to spend.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import numpy as np
import torch

from tsqp.errors import IntegrityError
from tsqp.shields.config import UNIT_ROUNDOFF
from tsqp.shields.sites import Site, integrity_message, module_names

# Freivalds' float tolerance, in standard deviations of a random-rounding model of the error
# (eps · sqrt(K · Σ_k x_k² Σ_n W_kn² r_n²)). Observed errors on SmolLM2 stay below ~2 of them.
FLOAT_TOLERANCE_SIGMAS = 64.0


def block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Blocks (N_i, C) -> (sum N_i, C·len): module i's check vectors nonzero only on its outputs, so one
    product checks every module of a fused call."""
    c = blocks[0].shape[1]
    out = torch.zeros(sum(b.shape[0] for b in blocks), c * len(blocks), dtype=blocks[0].dtype)
    start = 0
    for i, b in enumerate(blocks):
        out[start : start + b.shape[0], i * c : (i + 1) * c] = b
        start += b.shape[0]
    return out


class FloatFreivalds:
    """Freivalds' check of float products y = x·W_t against a secret vector r per weight matrix.

    r_n = ±(1 + U[0, 1)): every coefficient has magnitude at least 1, so one corrupted element
    off by more than the tolerance is always caught; which sign and size stays secret.
    """

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], server_dtype: str) -> None:
        self.eps = UNIT_ROUNDOFF[server_dtype]  # the runner's policy (`ShieldConfig.server_precision`)
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        self.checks: dict[Site, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for site, (w_t, sizes) in sites.items():
            signs = torch.randint(0, 2, (w_t.shape[1],), generator=gen, dtype=torch.float64) * 2 - 1
            r = block_diagonal([v[:, None] for v in (signs * (1 + torch.rand(w_t.shape[1], generator=gen, dtype=torch.float64))).split(sizes)])  # (N, M)
            w = w_t.double()
            # numpy: a decode step makes 4 checks per layer, where torch's per-op overhead would dominate
            self.checks[site] = (r.detach().numpy(), (w @ r).detach().numpy(), ((w * w) @ (r * r)).detach().numpy())  # r, W r, W² r²

    def check(self, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (T, K) the server's input, y (T, N) its result."""
        r, wr, w2r2 = self.checks[site]
        x64 = x.detach().numpy().astype(np.float64)
        error = np.abs(y.detach().numpy().astype(np.float64) @ r - x64 @ wr)  # (T, M)
        tolerance = FLOAT_TOLERANCE_SIGMAS * self.eps * np.sqrt(x.shape[-1] * ((x64 * x64) @ w2r2)) + 1e-30
        bad = ~(error <= tolerance)  # NaN counts as bad
        if bad.any():
            module = module_names(site)[int(np.nonzero(bad.any(axis=0))[0][0])]
            raise IntegrityError(integrity_message(site, module, f"Freivalds residual {float((error / tolerance).max()):.3g}× the float tolerance"))
