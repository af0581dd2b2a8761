"""The offline phase: masks and their products with the weights, made ahead of need and each handed out once."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tsqp.shields.sites import Site


@dataclass
class ShieldTimes:
    """Time the TEE spends shielding, apart from the wire and the model itself."""

    mask_s: float = 0.0
    unmask_s: float = 0.0
    verify_s: float = 0.0
    offline_s: float = 0.0  # mask pool: drawing masks and their products with the weights
    offline_rows: int = 0  # mask rows precomputed, summed over call sites
    masked_rows: int = 0  # mask rows used, summed over call sites


class MaskPool:
    """Per call site, precomputed mask rows and their products with the weights; each row is handed out once."""

    def __init__(self, make: Callable[[Site, int], tuple[torch.Tensor, torch.Tensor]], sites: Sequence[Site],
                 times: ShieldTimes, chunk: int = 32) -> None:  # fmt: skip
        self.make, self.sites, self.times, self.chunk = make, list(sites), times, chunk
        self._blocks: dict[Site, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in self.sites}
        self.on_take: Callable[[Site, torch.Tensor], None] | None = None  # tests fingerprint every mask handed out
        self.peak_bytes = 0  # the offline phase's memory: the most the pool held at once

    def available(self, site: Site) -> int:
        return sum(r.shape[0] for r, _ in self._blocks[site])

    def prepare(self, rows: int) -> None:
        """Offline: make sure every site holds at least `rows` unused rows."""
        for site in self.sites:
            self._refill(site, rows - self.available(site))

    def take(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        short = rows - self.available(site)
        if short > 0:
            self._refill(site, max(short, self.chunk))  # ahead of need, in chunks
        masks, products = [], []
        blocks = self._blocks[site]
        while rows:
            r, rw = blocks[0]
            n = min(rows, r.shape[0])
            masks.append(r[:n])
            products.append(rw[:n])
            blocks[0] = (r[n:], rw[n:])
            if n == r.shape[0]:
                blocks.pop(0)  # spent: nothing keeps a used mask
            rows -= n
        mask = masks[0] if len(masks) == 1 else torch.cat(masks)
        if self.on_take is not None:
            self.on_take(site, mask)
        self.times.masked_rows += mask.shape[0]
        return mask, products[0] if len(products) == 1 else torch.cat(products)

    def _refill(self, site: Site, rows: int) -> None:
        if rows <= 0:
            return
        started = time.perf_counter()
        self._blocks[site].append(self.make(site, rows))
        self.times.offline_s += time.perf_counter() - started
        self.times.offline_rows += rows
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def nbytes(self) -> int:
        return sum(r.nbytes + rw.nbytes for blocks in self._blocks.values() for r, rw in blocks)
