"""`seqmix`: M·X over the token axis. For one decoded token M is a scalar: it hides nothing there."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import torch

from tsqp.shields.base import Shield
from tsqp.shields.sites import Site


class SeqmixShield(Shield):
    """M·X along the token axis, M = D + αβᵀ drawn fresh per call; M⁻¹ by Sherman–Morrison."""

    name = "seqmix"
    embeds_remotely = False
    mixes_rows = True

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str) -> None:
        super().__init__(sites, verify, server_dtype)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        t = x.shape[0]
        while True:
            d = 0.5 + 1.5 * torch.rand(t, generator=self.generator, dtype=torch.float64)
            alpha = torch.randn(t, generator=self.generator, dtype=torch.float64)
            beta = torch.randn(t, generator=self.generator, dtype=torch.float64)
            denominator = 1 + float(beta @ (alpha / d))
            if abs(denominator) > 0.1:  # keeps M well conditioned
                break
        m = torch.diag(d) + torch.outer(alpha, beta)
        return (m @ x.double()).float(), (d, alpha, beta, denominator)

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        d, alpha, beta, denominator = state
        z_d = z.double() / d[:, None]  # D⁻¹z
        alpha_d = alpha / d  # D⁻¹α
        return (z_d - torch.outer(alpha_d, beta @ z_d) / denominator).float()
