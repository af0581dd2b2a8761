"""Cross-client batching: float LINEAR requests of different clients for the same weights, as one product.

One product over k decode rows costs about as much as one over a single row on a GPU, so a round's
requests that share weights are answered together. Only requests `Handlers.float_linear` accepts
are batched; anything else is left to the server's one-by-one path, which answers it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tsqp.errors import ProtocolError
from tsqp.model.linear import GroupKey
from tsqp.server.handlers import Handlers
from tsqp.server.stats import ServerStats
from tsqp.wire import protocol
from tsqp.wire.protocol import Message


@dataclass
class BatchedLinear:
    """One plain float LINEAR request of a batch: its place in the round, its checked group and its input as (rows, K)."""

    index: int
    msg: Message
    group: GroupKey
    rows: torch.Tensor
    result_elements: int


class LinearBatcher:
    def __init__(self, handlers: Handlers, stats: ServerStats) -> None:
        self.handlers = handlers
        self.stats = stats

    def batches(self, requests: Sequence[tuple[list[Any], str]]) -> list[list[BatchedLinear]]:
        """Groups of at least two requests (frames, client) that can share one product, each group in arrival order."""
        limit = self.handlers.limits.max_tensor_elements
        groups: dict[Hashable, list[list[BatchedLinear]]] = defaultdict(list)
        for i, (frames, _) in enumerate(requests):
            found = self._batchable(i, frames)
            if found is None:
                continue
            key, item = found
            batches = groups[key]
            # A batch's result obeys the same limit as one request's: batching must not multiply memory.
            if not batches or sum(b.result_elements for b in batches[-1]) + item.result_elements > limit:
                batches.append([])
            batches[-1].append(item)
        return [b for batches in groups.values() for b in batches if len(b) > 1]

    def _batchable(self, index: int, frames: list[Any]) -> tuple[Hashable, BatchedLinear] | None:
        """(what must match to share a product, the request) for a valid plain float LINEAR request; else None."""
        try:
            msg = protocol.decode(frames, self.handlers.limits)
        except Exception:
            return None
        if msg.op != "LINEAR" or set(msg.args) != {"layer", "modules"} or len(msg.tensors) != 1 or msg.tensors[0].shape[-1:] == (0,):
            return None
        try:
            group, x = self.handlers.float_linear(msg)
        except ProtocolError:
            return None
        rows = x.reshape(-1, x.shape[-1])
        # A wrong feature size matches only its like: that product fails, and the server answers each alone.
        key = (group, x.dtype, x.shape[-1])
        return key, BatchedLinear(index, msg, group, rows, rows.shape[0] * self.handlers.weights.out_features(group))

    def answer(self, batch: list[BatchedLinear]) -> list[Message]:
        """One product over the batch's rows, split back into one reply per request; raises if the product fails."""
        started = time.perf_counter()
        fused = self.handlers.weights.group_product(batch[0].group, torch.cat([b.rows for b in batch]))
        result = self.handlers.out(fused, batch[0].msg.tensors[0].dtype)
        elapsed = time.perf_counter() - started
        n_rows = [b.rows.shape[0] for b in batch]
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.batched_requests += len(batch)
        replies = []
        for b, part in zip(batch, result.split(n_rows)):  # per request: its (rows, sum N_i) piece
            # Each request is charged its share of the product, by rows, so compute_s still adds up.
            share = elapsed * (b.rows.shape[0] / sum(n_rows) if sum(n_rows) else 1 / len(batch))
            shape = b.msg.tensors[0].shape[:-1]
            reply = protocol.reply(b.msg.id, {"compute_s": share}, [part.reshape(*shape, part.shape[-1])])
            self._count(b.msg, reply, share)
            replies.append(reply)
        return replies

    def _count(self, msg: Message, reply: Message, seconds: float) -> None:
        """The per-op counters the server keeps for each request, for one answered from a batch."""
        self.stats.ops["LINEAR"].answered(msg.nbytes, reply.nbytes, seconds)
