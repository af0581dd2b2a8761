"""`plain`, the base of every shield: the four steps each shield overrides (prepare, mask, verify, unmask)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tsqp.shields.freivalds import FloatFreivalds
from tsqp.shields.pool import MaskPool, ShieldTimes
from tsqp.shields.sites import Site


class Shield:
    """`plain`: the base of every shield; the server sees everything, results may still be verified."""

    name = "plain"
    embeds_remotely = True  # the original prototype's lookup on the server; every other shield keeps it here
    float_results = True  # verified by float Freivalds (a fault detector); otp's integers have an exact check of their own
    mixes_rows = False  # True: a row's mask depends on the other rows of the call (seqmix), so sequences are masked apart

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str) -> None:
        self.sites = sites
        self.server_dtype = server_dtype  # the runner's precision policy, not the server's claim
        self.times = ShieldTimes()
        self.freivalds = FloatFreivalds(sites, server_dtype) if verify and self.float_results else None
        self.pool: MaskPool | None = None

    def prepare(self, rows: int, logits_rows: int | None = None) -> None:
        """Offline phase: masks (and their products) for `rows` tokens at every call site; at lm_head for
        `logits_rows` (default `rows`; a run of N prompt and M answer tokens uses N + M - 1 rows a site, M at lm_head)."""
        if self.pool is not None:
            self.pool.prepare(rows, logits_rows)

    def close(self) -> None:
        """Stop the pool's background worker."""
        if self.pool is not None:
            self.pool.close()

    def max_rows(self, site: Site) -> int | None:
        """The most rows one call to `site` carries (a longer one is split); None: any number."""
        return None

    def max_forward_rows(self) -> int | None:
        """The most rows a forward may send every layer's sites with no call split; None: any number."""
        limits = [n for site in self.sites if site != "lm_head" and (n := self.max_rows(site)) is not None]
        return min(limits) if limits else None

    def wire_args(self) -> dict[str, Any]:
        return {}

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x, None

    def verify(self, site: Site, wire: torch.Tensor, z: torch.Tensor, state: Any) -> None:
        assert self.freivalds is not None
        self.freivalds.check(site, wire, z)

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        return z
