"""The same-host fast lane: plain float products whose compact header the server has answered before.

A decode step sends the same few headers over and over (each layer's four call groups and the lm_head,
one row each); only the id changes. Whether the server accepts a plain float LINEAR or LM_HEAD depends on
its header alone (op, layer, modules, dtype, shape and the limits: no value is checked), so once the
generic path (`protocol.decode`, `Handlers`) has answered a compact header, the same bytes, id aside, are
accepted again. `FastLane` remembers such requests by their frame table and header (`learn`, after the
generic path's answer) with what answering them takes, and answers them in place on a shared-memory
channel, without copying, decoding, dispatch or encoding (`answer`): the table and header are copied out
and matched, the product reads the input where the client wrote it (changing it mid-product changes only
that client's answer) and is written into the reply area by the kernel the generic path uses
(`LinearWeights.product_into`), so the reply's bytes and the counters are the generic path's. Anything
else, a body of another length included, goes the generic way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tsqp.model.linear import GroupKey, LinearWeights
from tsqp.server.handlers import CHUNK_FLOPS
from tsqp.server.stats import ServerStats
from tsqp.server.warming import Warmer, site_of
from tsqp.wire import protocol
from tsqp.wire.endpoints import frame_buffer
from tsqp.wire.protocol import COMPACT, COMPACT_ID, Message
from tsqp.wire.shm import DATA, TABLE, Channel, Layout

MAX_PLANS = 4096  # headers remembered; a decode step uses about 5 a layer (rows grow only in prefills)
HEAD = DATA + COMPACT.size  # a request area's first bytes: its frame table, then the compact header


def request_key(table: bytes, header: bytes) -> bytes:
    """A request's frame table and compact header without its id: the same bytes for every call of one kind."""
    return table + header[:COMPACT_ID] + header[COMPACT_ID + 8 :]


@dataclass(frozen=True)
class Plan:
    """How to answer one remembered request."""

    op: str
    site: GroupKey | str
    rows: int
    features: int
    out_features: int
    request: Layout
    reply: Layout
    reply_header: bytes  # the compact reply's header, id and compute_s zero


class FastLane:
    def __init__(self, weights: LinearWeights, stats: ServerStats, warmer: Warmer, area_bytes: int) -> None:
        self.weights, self.stats, self.warmer, self.area_bytes = weights, stats, warmer, area_bytes
        self.plans: dict[bytes, Plan] = {}

    def learn(self, frames: list[Any], msg: Message, reply: Message) -> None:
        """Remember the header of a request the generic path answered with `reply`, if it is one this lane can answer."""
        header = frame_buffer(frames[0])
        if len(frames) != 2 or header.nbytes != COMPACT.size or not protocol.is_compact(header) or not reply.ok or len(self.plans) >= MAX_PLANS:
            return
        x = msg.tensors[0]
        if msg.op not in ("LINEAR", "LM_HEAD") or x.dtype != torch.float32 or set(msg.args) - {"layer", "modules"} or x.numel() == 0:
            return
        rows, features, out_features = x.numel() // x.shape[-1], x.shape[-1], reply.tensors[0].shape[-1]
        if 2.0 * rows * features * out_features > CHUNK_FLOPS:
            return  # the generic path computes it in chunks, answering others in between
        reply_header = protocol.encode_compact(protocol.reply(0, {"compute_s": 0.0}, [reply.tensors[0]]))
        assert reply_header is not None  # a float32 tensor of at most 8 dims and a float compute_s: always sayable
        request, answer = Layout.of([COMPACT.size, x.numel() * 4]), Layout.of([COMPACT.size, reply.nbytes])
        if answer.size > self.area_bytes:
            return  # the generic path sends it over zmq
        plan = Plan(msg.op, site_of(msg), rows, features, out_features, request, answer, bytes(reply_header[0]))
        self.plans[request_key(request.table, bytes(header))] = plan

    def answer(self, channel: Channel, client: str) -> bool:
        """Answer the request posted on `channel` in place, if it is a remembered one: the product is computed from
        the request area into the reply area (the client can change its own input under it, and nothing else)."""
        head = bytes(channel.incoming(0, HEAD))  # a copy: what is checked is what is used
        header = head[DATA:]
        plan = self.plans.get(request_key(head[: TABLE.size], header))
        if plan is None:
            return False
        channel.seq = channel.incoming_seq()
        x = np.frombuffer(channel.incoming(plan.request.offsets[1], plan.request.lengths[1]), np.float32).reshape(plan.rows, plan.features)
        out = np.frombuffer(channel.outgoing(plan.reply.offsets[1], plan.reply.lengths[1]), np.float32).reshape(plan.rows, plan.out_features)
        started = time.perf_counter()
        self.weights.product_into(plan.site, x, out)
        elapsed = time.perf_counter() - started
        channel.write(plan.reply, (protocol.stamped(plan.reply_header, protocol.compact_id(header), elapsed),))
        channel.post_seq(channel.seq)
        self._count(plan, client, elapsed)
        self.warmer.answered(plan.site)
        return True

    def _count(self, plan: Plan, client: str, seconds: float) -> None:
        """The counters `Server._handle` and `Server._send` keep for a request they answer."""
        body_in, body_out = plan.request.lengths[1], plan.reply.lengths[1]
        self.stats.fast_lane_requests += 1
        self.stats.requests += 1
        op = self.stats.ops[plan.op]
        op.calls += 1
        op.bytes_in += body_in
        op.bytes_out += body_out
        op.record(seconds)
        op.compute_s += seconds
        counters = self.stats.client(client)
        counters.requests += 1
        counters.bytes_in += COMPACT.size + body_in
        counters.bytes_out += COMPACT.size + body_out
