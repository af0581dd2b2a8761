"""The same-host fast lane: products whose compact header the server has answered before.

A decode step sends the same few headers over and over (an EMBED under plain, each layer's four call groups
and the lm_head, one row each); only the id changes. Whether the server accepts such a request depends on its
header alone (op, layer, modules, dtype, shape, otp's field and the limits), but for two value checks: token
ids must name vocabulary rows, and an otp input must lie in [0, p). So once the generic path
(`protocol.decode`, `Handlers`) has answered a compact header, the same bytes, id aside, are accepted again.
`FastLane` remembers such requests by their frame table and header (`learn`, after the generic path's
answer) with what answering them takes, and answers them on a shared-memory channel without decoding,
dispatch or encoding (`answer`): the table and header are copied out and matched, and the result is written
into the reply area by the kernel the generic path uses, so the reply's bytes and the counters are the
generic path's.
- A plain float product reads its input where the client wrote it: changing it mid-product changes only that
  client's answer (`LinearWeights.product_into` on a CPU's float32 weights; elsewhere the generic path's
  product, cast back to float32 as it does).
- An EMBED and an otp product (`QuantizedWeights.product_mod`) copy their input out first and check the copy's
  range, as the generic path does; an input out of range, or otp weights since quantized to another width, go
  the generic way, which names the failure.
- With cross-client batching on (`batching`), plain requests take the lane only while their client is the only
  one on shared memory: with others, the batcher may answer several clients' rows with one product.
Anything else, a body of another length included, goes the generic way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tsqp.model.linear import GroupKey, all_within
from tsqp.server.handlers import CHUNK_FLOPS, Handlers
from tsqp.server.stats import ServerStats
from tsqp.server.warming import Warmer, site_of
from tsqp.wire import protocol
from tsqp.wire.endpoints import frame_buffer
from tsqp.wire.protocol import COMPACT, COMPACT_ID, FIELD_ARGS, Message
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
    field: tuple[int, int, int] | None = None  # otp's (p, limb_bits, weight_bits); None for a plain float product


class FastLane:
    """`batching`: whether the server batches plain products across clients (then a plain request takes the lane
    only while its client is alone)."""

    def __init__(self, handlers: Handlers, stats: ServerStats, warmer: Warmer, area_bytes: int, batching: bool) -> None:
        self.handlers, self.stats, self.warmer, self.area_bytes, self.batching = handlers, stats, warmer, area_bytes, batching
        self.plans: dict[bytes, Plan] = {}

    def learn(self, frames: list[Any], msg: Message, reply: Message) -> None:
        """Remember the header of a request the generic path answered with `reply`, if it is one this lane can answer."""
        header = frame_buffer(frames[0])
        if len(frames) != 2 or header.nbytes != COMPACT.size or not protocol.is_compact(header) or not reply.ok or len(self.plans) >= MAX_PLANS:
            return
        x, site = msg.tensors[0], site_of(msg)
        if msg.op not in ("EMBED", "LINEAR", "LM_HEAD") or x.numel() == 0:
            return
        rows, features, out_features = x.numel() // x.shape[-1], x.shape[-1], reply.tensors[0].shape[-1]
        field = tuple(msg.args.get(name) for name in FIELD_ARGS)
        if msg.op == "EMBED":
            if msg.args:
                return
            rows, features, flops, field = x.numel(), 1, 0.0, None
        elif x.dtype == torch.int64 and set(msg.args) - {"layer", "modules"} == set(FIELD_ARGS):  # otp, checked by the generic path
            flops = rows * self.handlers.mod_flops_per_row(site, *field[:2])  # type: ignore[arg-type]
        elif x.dtype == torch.float32 and not set(msg.args) - {"layer", "modules"}:
            flops, field = 2.0 * rows * features * out_features, None
        else:
            return
        if flops > CHUNK_FLOPS:
            return  # the generic path computes it in chunks, answering others in between
        reply_header = protocol.encode_compact(protocol.reply(0, {"compute_s": 0.0}, [reply.tensors[0]]))
        assert reply_header is not None  # a float32 or int64 tensor of at most 8 dims and a float compute_s: always sayable
        request, answer = Layout.of([COMPACT.size, x.numel() * x.element_size()]), Layout.of([COMPACT.size, reply.nbytes])
        if answer.size > self.area_bytes:
            return  # the generic path sends it over zmq
        plan = Plan(msg.op, site, rows, features, out_features, request, answer, bytes(reply_header[0]), field)  # type: ignore[arg-type]
        self.plans[request_key(request.table, bytes(header))] = plan

    def answer(self, channel: Channel, client: str, alone: bool = True) -> bool:
        """Answer the request posted on `channel` in place, if it is a remembered one that this lane can answer: the
        result is written into the reply area (a plain product reads the request area, where the client can change
        its own input under it, and nothing else). `alone`: no other client is on shared memory."""
        head = bytes(channel.incoming(0, HEAD))  # a copy: what is checked is what is used
        header = head[DATA:]
        plan = self.plans.get(request_key(head[: TABLE.size], header))
        if plan is None or (plan.field is None and self.batching and not alone):
            return False
        seq = channel.incoming_seq()
        x = channel.incoming(plan.request.offsets[1], plan.request.lengths[1])
        out = channel.outgoing(plan.reply.offsets[1], plan.reply.lengths[1])
        started = time.perf_counter()
        if plan.op == "EMBED":
            if not self._embed(plan, x, out):
                return False
        elif plan.field is None:
            self._product(plan, x, out)
        elif not self._product_mod(plan, x, out):
            return False
        elapsed = time.perf_counter() - started
        channel.seq = seq
        channel.write(plan.reply, (protocol.stamped(plan.reply_header, protocol.compact_id(header), elapsed),))
        channel.post_seq(channel.seq)
        self._count(plan, client, elapsed)
        if plan.field is None:
            self.warmer.answered(plan.site)  # (otp's products read other weights)
        return True

    def _product(self, plan: Plan, x: memoryview, out: memoryview) -> None:
        """A plain float product of `x` into `out`, with the generic path's kernel (the same bits)."""
        weights = self.handlers.weights
        x_rows = np.frombuffer(x, np.float32).reshape(plan.rows, plan.features)
        out_rows = np.frombuffer(out, np.float32).reshape(plan.rows, plan.out_features)
        if weights.cpu_float32:
            weights.product_into(plan.site, x_rows, out_rows)
            return
        x_t = torch.from_numpy(x_rows)  # another dtype or device: the generic path's product, cast back as it does
        y = weights.lm_head(x_t) if plan.site == "lm_head" else weights.group_product(plan.site, x_t)  # type: ignore[arg-type]
        out_rows[:] = self.handlers.out(y, torch.float32).detach().numpy()

    def _embed(self, plan: Plan, x: memoryview, out: memoryview) -> bool:
        """The vocabulary rows of token ids `x` into `out`; False (nothing written) where an id is out of range."""
        weights = self.handlers.weights
        ids = np.frombuffer(x, np.int64).copy()  # ours: the range checked is the range used
        if not all_within(ids, weights.embedding.shape[0]):
            return False  # the generic path refuses it, naming why
        out_rows = np.frombuffer(out, np.float32).reshape(plan.rows, plan.out_features)
        if weights.cpu_float32:
            np.take(weights.embedding.detach().numpy(), ids, axis=0, out=out_rows)
        else:
            out_rows[:] = self.handlers.out(weights.embed(torch.from_numpy(ids)), torch.float32).detach().numpy()
        return True

    def _product_mod(self, plan: Plan, x: memoryview, out: memoryview) -> bool:
        """An otp product of `x` into `out`; False (nothing written) where the generic path must answer."""
        assert plan.field is not None
        p, limb_bits, bits = plan.field
        quantized = self.handlers.quantized
        if quantized is None or quantized.bits != bits:
            return False  # quantized to another width since: the generic path quantizes again
        x_rows = np.frombuffer(x, np.int64).reshape(plan.rows, plan.features).copy()  # ours: the range checked is the range used
        if not all_within(x_rows, p):
            return False  # the generic path refuses it, naming why
        y = quantized.product_mod(plan.site, torch.from_numpy(x_rows), p, limb_bits)
        np.frombuffer(out, np.int64).reshape(plan.rows, plan.out_features)[:] = y.detach().cpu().numpy()
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
