"""The same-host fast lane: plain float products whose compact header the server has answered before.

A decode step sends the same few headers over and over (each layer's four call groups and the lm_head,
one row each); only the id changes. Whether the server accepts a plain float LINEAR or LM_HEAD depends on
its header alone (op, layer, modules, dtype, shape and the limits: no value is checked), so once the
generic path (`protocol.decode`, `Handlers`) has answered a compact header, the same bytes, id aside, are
accepted again. `FastLane` remembers such headers (`learn`, after the generic path's answer) with what
answering them takes, and answers them from a shared-memory channel without decoding, dispatch or
encoding (`answer`): the same product (`LinearWeights.group_product`, `lm_head`), the same reply bytes
(the compact header, with this id and compute time), the same counters. Anything else, a body of
another length included, goes the generic way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tsqp.model.linear import GroupKey, LinearWeights
from tsqp.server.handlers import CHUNK_FLOPS
from tsqp.server.stats import ServerStats
from tsqp.server.warming import Warmer, site_of
from tsqp.wire import protocol
from tsqp.wire.protocol import COMPACT, Message
from tsqp.wire.shm import Channel

MAX_PLANS = 4096  # headers remembered; a decode step uses about 5 a layer (rows grow only in prefills)


@dataclass(frozen=True)
class Plan:
    """How to answer one remembered header."""

    op: str
    site: GroupKey | str
    rows: int
    features: int
    body_bytes: int
    reply_header: bytes  # the compact reply's header, id and compute_s zero
    reply_bytes: int
    product: Callable[[torch.Tensor], torch.Tensor]


class FastLane:
    def __init__(self, weights: LinearWeights, stats: ServerStats, warmer: Warmer) -> None:
        self.weights, self.stats, self.warmer = weights, stats, warmer
        self.plans: dict[bytes, Plan] = {}

    def learn(self, frames: list[Any], msg: Message, reply: Message) -> None:
        """Remember the header of a request the generic path answered with `reply`, if it is one this lane can answer."""
        header = memoryview(frames[0])
        if header.nbytes != COMPACT.size or not protocol.is_compact(header) or not reply.ok or len(self.plans) >= MAX_PLANS:
            return
        x = msg.tensors[0]
        if msg.op not in ("LINEAR", "LM_HEAD") or x.dtype != torch.float32 or set(msg.args) - {"layer", "modules"} or x.numel() == 0:
            return
        rows, features = x.numel() // x.shape[-1], x.shape[-1]
        site = site_of(msg)
        if 2.0 * rows * features * reply.tensors[0].shape[-1] > CHUNK_FLOPS:
            return  # the generic path computes it in chunks, answering others in between
        product = self.weights.lm_head if site == "lm_head" else (lambda flat, key=site: self.weights.group_product(key, flat))  # type: ignore[misc]
        reply_header = protocol.encode_compact(protocol.reply(0, {"compute_s": 0.0}, [reply.tensors[0]]))
        assert reply_header is not None  # a float32 tensor of at most 8 dims and a float compute_s: always sayable
        self.plans[protocol.compact_key(header)] = Plan(msg.op, site, rows, features, x.numel() * 4, bytes(reply_header[0]), reply.nbytes, product)

    def answer(self, frames: list[memoryview], channel: Channel, client: str) -> bool:
        """Answer a request taken from `channel` (`frames`: the server's private copy) if its header is remembered."""
        header = frames[0]
        if len(frames) != 2 or header.nbytes != COMPACT.size:
            return False
        plan = self.plans.get(protocol.compact_key(header))
        if plan is None or frames[1].nbytes != plan.body_bytes:
            return False
        started = time.perf_counter()
        y = plan.product(torch.frombuffer(frames[1], dtype=torch.float32).view(plan.rows, plan.features))
        elapsed = time.perf_counter() - started
        reply = protocol.stamped(plan.reply_header, protocol.compact_id(header), elapsed)
        body = y.detach().contiguous().numpy()
        if body.nbytes != plan.reply_bytes:
            raise RuntimeError(f"a product of {body.nbytes} bytes where its header says {plan.reply_bytes}")
        channel.post([reply, body], channel.seq)
        self._count(plan, client, header.nbytes, len(reply), body.nbytes, elapsed)
        self.warmer.answered(plan.site)
        return True

    def _count(self, plan: Plan, client: str, header_in: int, header_out: int, body_out: int, seconds: float) -> None:
        """The counters `Server._handle` and `Server._send` keep for a request they answer."""
        self.stats.fast_lane_requests += 1
        self.stats.requests += 1
        op = self.stats.ops[plan.op]
        op.calls += 1
        op.bytes_in += plan.body_bytes
        op.bytes_out += body_out
        op.record(seconds)
        op.compute_s += seconds
        counters = self.stats.client(client)
        counters.requests += 1
        counters.bytes_in += header_in + plan.body_bytes
        counters.bytes_out += header_out + body_out
