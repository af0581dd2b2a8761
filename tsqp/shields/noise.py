"""`noise`: X + c·G with G Gaussian; hides only statistically."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping
from typing import Any

import torch

from tsqp.shields.base import Shield
from tsqp.shields.config import NOISE_SCALE, POOL_MIB
from tsqp.shields.pool import MaskPool
from tsqp.shields.sites import Site


class NoiseShield(Shield):
    """X + c·G, c = scale · rms(X) per row, G Gaussian; c·(G·W) is subtracted from the result."""

    name = "noise"
    embeds_remotely = False

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str, scale: float = NOISE_SCALE,
                 pool_bytes: int = POOL_MIB << 20) -> None:  # fmt: skip
        super().__init__(sites, verify, server_dtype)
        self.scale = scale
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self._draw = threading.Lock()  # one generator, drawn from by the pool's worker and by a call that finds it short
        row_bytes = {site: 4 * sum(w_t.shape) for site, (w_t, _) in sites.items()}  # G (K) and G·W (N), float32
        self.pool = MaskPool(self._make, list(sites), self.times, row_bytes, pool_bytes)

    def _make(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_t = self.sites[site][0]
        with self._draw:
            g = torch.randn(rows, w_t.shape[0], generator=self.generator)
        return g, g @ w_t

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        g, gw = self.pool.take(site, x.shape[0])  # type: ignore[union-attr]
        c = self.scale * x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return x + c * g, (c, gw)

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        c, gw = state
        return z - c * gw
