"""The offline phase: masks and their products with the weights, made ahead of need and each handed out once.

The pool holds at most its budget of masks made ahead. A background worker keeps it stocked,
walking the call sites in the order a forward pass calls them, from the one just used: while
the server computes one call (or one prefill chunk), the masks of the next calls are made.
A call that finds its site short makes the rest itself (counted as a stall); those rows go
straight to the call, as its own working memory, and never sit in the pool.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tsqp.shields.config import POOL_MIB
from tsqp.shields.sites import Site, call_rows, forward_order

# Rows made at once for a decode site: one pass over its weights serves 32 tokens. (SmolLM2's masks for a token, at
# every site, cost 22 ms made 16 at a time, 15.5 at 32, 12 at 64; 32 rows of a 32-bit field's hold 38 MB.)
REFILL_ROWS = 32
COMPACT_SHARE = 4  # a block larger than a decode batch is copied down once a 1/4 of it or less is left
WORKER_IDLE_S = 0.5  # how often an idle worker looks whether its pool still exists


@dataclass
class ShieldTimes:
    """Time the TEE spends shielding, apart from the wire and the model itself."""

    mask_s: float = 0.0
    unmask_s: float = 0.0
    verify_s: float = 0.0
    offline_s: float = 0.0  # mask pool: drawing masks and their products with the weights, wherever made
    offline_rows: int = 0  # mask rows made, summed over call sites
    masked_rows: int = 0  # mask rows used, summed over call sites
    stall_s: float = 0.0  # online time spent waiting for masks: a call that found its site short


Make = Callable[[Site, int], tuple[torch.Tensor, torch.Tensor]]


class MaskPool:
    """Per call site, precomputed mask rows and their products with the weights; each row is handed out once.

    `row_bytes[site]` is what one row of a site's mask and product take; `budget_bytes` bounds
    what the pool holds (made ahead, or being made), except what `prepare` is asked for.
    `max_rows[site]`: the most rows one call to a site takes (its shield splits longer ones).
    """

    def __init__(self, make: Make, sites: Sequence[Site], times: ShieldTimes, row_bytes: Mapping[Site, int],
                 budget_bytes: int = POOL_MIB << 20, max_rows: Mapping[Site, int] | None = None,
                 background: bool = True) -> None:  # fmt: skip
        self.make, self.times, self.row_bytes = make, times, dict(row_bytes)
        self.max_rows = dict(max_rows or {})
        self.sites = sorted(sites, key=forward_order)
        self._index = {site: i for i, site in enumerate(self.sites)}
        self.budget_bytes = budget_bytes
        self.background = background
        # Per site, blocks as made: [masks, products, rows made]; a block's memory goes when its last row is used,
        # or, for one larger than a decode batch, once a quarter of it or less is left (`_pop` copies those out).
        self._blocks: dict[Site, deque[list[Any]]] = {s: deque() for s in self.sites}
        self._rows = dict.fromkeys(self.sites, 0)  # unused rows held per site
        self._tokens = 0  # tokens of the last call: what the next calls likely take (a forward pass sends the same everywhere)
        self._cursor = -1  # index in `sites` of the last site taken from
        self._held = 0  # bytes of the blocks held, plus those being made
        self._making: Site | None = None
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None
        # torch's threads for the worker: the count now, at set-up. A thread started later would take
        # the count of that moment, 1 when it starts during a split's decode step (`Llama.decode_threads`).
        self.worker_threads = torch.get_num_threads()
        self._closed = False
        self.on_take: Callable[[Site, torch.Tensor], None] | None = None  # tests fingerprint every mask handed out
        self.peak_bytes = 0  # the offline phase's memory: the most the pool held at once

    def available(self, site: Site) -> int:
        return self._rows[site]

    def nbytes(self) -> int:
        return self._held

    def prepare(self, rows: int, logits_rows: int | None = None) -> None:
        """Offline, before a request: make sure every site holds at least `rows` unused rows, lm_head `logits_rows`
        (default `rows`): it sees one row per forward, so a run uses one per answer token there.

        What is asked for here is held whatever the budget (which grows to hold it); the budget
        bounds what the pool makes ahead on its own. A pool prepared this way is its caller's to
        keep stocked (`--precompute`, serve-tee's idle top-up): its worker stays off.
        """
        if rows > 0:
            self.background = False
        for site in self.sites:
            with self._lock:
                self._wait_while_making(site)
                short = (rows if site != "lm_head" or logits_rows is None else logits_rows) - self._rows[site]
                if short <= 0:
                    continue
                self.budget_bytes = max(self.budget_bytes, self._held + short * self.row_bytes[site])
                self._held += short * self.row_bytes[site]
                self._making = site
            self._store(site, short)

    def take(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` unused mask rows of `site` and their products, from the pool or made now (a stall)."""
        started = time.perf_counter()
        with self._lock:
            # The worker making this site's next block matters only to a call its stock cannot cover:
            # waiting whenever it was made stalled decode steps on rows they did not need.
            waited = self._making == site and self._rows[site] < rows
            if waited:
                self._wait_while_making(site)
            parts = self._pop(site, rows)
            if site != "lm_head":
                # A call of a site's most rows may be one piece of a longer one: the tokens are at least that.
                self._tokens = max(self._tokens, rows) if rows >= self.max_rows.get(site, rows + 1) else rows
            self._cursor = self._index[site]
            self._start_worker()
            if rows > 1 or self._rows[site] < REFILL_ROWS // 2:
                self._lock.notify_all()  # work for the worker (a decode step that leaves its site stocked wakes nobody)
        short = rows - sum(r.shape[0] for r, _ in parts)
        if short > 0:
            parts.append(_as_numpy(self._timed_make(site, short)))  # the call's own rows: never held by the pool
        if waited or short > 0:
            self.times.stall_s += time.perf_counter() - started
        mask = torch.from_numpy(parts[0][0] if len(parts) == 1 else np.concatenate([r for r, _ in parts]))
        product = torch.from_numpy(parts[0][1] if len(parts) == 1 else np.concatenate([rw for _, rw in parts]))
        if self.on_take is not None:
            self.on_take(site, mask)
        self.times.masked_rows += mask.shape[0]
        return mask, product

    def close(self) -> None:
        """Stop the worker and wait for the block it is making (a thread inside torch at exit aborts the process)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(60)

    # --- under the lock -----------------------------------------------------------------------

    def _wait_while_making(self, site: Site) -> None:
        while self._making == site:
            self._lock.wait()

    def _pop(self, site: Site, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
        parts, blocks = [], self._blocks[site]
        while rows and blocks:
            r, rw, made = blocks[0]
            n = min(rows, r.shape[0])
            parts.append((r[:n], rw[:n]))
            left = r.shape[0] - n
            if not left:
                blocks.popleft()  # spent: the pool keeps nothing of it
                self._held -= made * self.row_bytes[site]
            elif made > REFILL_ROWS and left * COMPACT_SHARE <= made:
                # Little of a large block is left (a prepared prompt's rows are used, its answer's remain): those
                # rows are copied out, so that the block's memory goes now, not with its last row.
                blocks[0] = [r[n:].copy(), rw[n:].copy(), left]
                self._held -= (made - left) * self.row_bytes[site]
            else:
                blocks[0][:2] = r[n:], rw[n:]  # views: the pool hands out each row once
            self._rows[site] -= n
            rows -= n
        return parts

    def _next_job(self) -> tuple[Site, int, int] | None:
        """The first site after the last one used whose next call is not covered, the rows that fit, and how many
        of them are a decode batch kept apart (made with a prompt's block)."""
        if not self.background:  # switched off since the worker started
            return None
        n_sites = len(self.sites)
        for step in range(1, n_sites + 1):
            site = self.sites[(self._cursor + step) % n_sites]
            want = call_rows(site, self._tokens)
            # Decode (one row a call): refilled a batch at a time, before it runs dry, so that one
            # pass over the weights serves many tokens and no step finds its site empty. A call split
            # into pieces: made whole (one pass over the weights), once the site holds less than a piece.
            # A prompt's blocks carry a decode batch too, in the same pass, kept as a block of its own (a
            # block's memory goes with its last row): the prompt's last call leaves it, so the first decode
            # step finds its sites stocked (it made its own rows: ~0.3 s on SmolLM2).
            held = self._rows[site]
            low, target = (REFILL_ROWS // 2, REFILL_ROWS) if want == 1 else (min(want, self.max_rows.get(site, want)), want + REFILL_ROWS)
            if held >= low:
                continue
            fits = (self.budget_bytes - self._held) // self.row_bytes[site]
            rows = min(target - held, fits)
            apart = 0 if want == 1 else min(max(rows - (want - held), 0), REFILL_ROWS)
            return (site, rows, apart) if rows > 0 else None  # the budget is full: wait for calls to use some
        return None

    def _start_worker(self) -> None:
        if self.background and self._worker is None and self._tokens:
            self._worker = threading.Thread(target=_work, args=(weakref.ref(self), self.worker_threads), name="tsqp-mask-pool", daemon=True)
            self._worker.start()

    # --- outside the lock ---------------------------------------------------------------------

    def _timed_make(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        made = self.make(site, rows)
        with self._lock:
            self.times.offline_s += time.perf_counter() - started
            self.times.offline_rows += rows
        return made

    def _store(self, site: Site, rows: int, apart: int = 0) -> None:
        """Make `rows` for `site` (already counted in `_held`, `_making` set) and keep them, the last `apart` as a block of their own."""
        block = None
        try:
            block = self._timed_make(site, rows)
        finally:
            with self._lock:
                if block is None:
                    self._held -= rows * self.row_bytes[site]  # failed: nothing to keep
                else:
                    r, rw = _as_numpy(block)
                    if apart:  # copies: the prompt's rows' memory goes when they are used
                        self._blocks[site].append([r[:-apart], rw[:-apart], rows - apart])
                        self._blocks[site].append([r[-apart:].copy(), rw[-apart:].copy(), apart])
                    else:
                        self._blocks[site].append([r, rw, rows])
                    self._rows[site] += rows
                self._making = None
                self.peak_bytes = max(self.peak_bytes, self._held)
                self._lock.notify_all()

    def _work_once(self) -> bool:
        """One job of the worker: False when the pool is closed."""
        with self._lock:
            job = None if self._closed else self._next_job()
            if job is None:
                if not self._closed:
                    self._lock.wait(WORKER_IDLE_S)
                return not self._closed
            site, rows, apart = job
            self._held += rows * self.row_bytes[site]
            self.peak_bytes = max(self.peak_bytes, self._held)
            self._making = site
        self._store(site, rows, apart)
        return True


def _as_numpy(made: tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """A block as the pool holds it: numpy views (a decode call slices it four times, ~2 µs a slice in torch, 0.2 in numpy)."""
    return made[0].detach().numpy(), made[1].detach().numpy()


def _work(pool_ref: weakref.ReferenceType[MaskPool], threads: int) -> None:
    """The background worker: keeps its pool stocked until the pool is closed or gone."""
    torch.set_num_threads(threads)  # this thread's own count (OpenMP keeps one per thread)
    while (pool := pool_ref()) is not None:
        if not pool._work_once():
            return
        del pool  # hold no reference while idle: the pool goes when its shield goes
