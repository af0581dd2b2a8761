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
  product, cast back to float32 as it does, into buffers made once: `StagedProduct`, pinned on CUDA).
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

from tsqp.model.linear import GroupKey, StagedProduct, all_within
from tsqp.server.handlers import CHUNK_FLOPS, Handlers
from tsqp.server.stats import ServerStats
from tsqp.server.warming import Warmer, site_of
from tsqp.wire import protocol
from tsqp.wire.endpoints import frame_buffer
from tsqp.wire.protocol import COMPACT, COMPACT_ID, FIELD_ARGS, Message
from tsqp.wire.shm import DATA, TABLE, Channel, Layout

MAX_PLANS = 4096  # headers remembered; a decode step uses about 5 a layer (rows grow only in prefills)
STAGED_BYTES = 1 << 20  # a plain call's input and result up to this size (decode rows, a lm_head row) get buffers made once
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


@dataclass(frozen=True)
class Place:
    """Where one plan's request and reply lie on one channel: numpy views of the input and the reply's body, the
    reply's table and header as slices of the mapping; and the one-row kernel's weight where numpy computes it."""

    x: np.ndarray  # (rows, features), or the token ids (rows, 1) of an EMBED
    out: np.ndarray  # (rows, out_features)
    table: slice
    header: slice
    reply_table: bytes
    kernel: np.ndarray | None
    staged: StagedProduct | None = None  # a plain product's buffers, where the weights are not a CPU's float32

    @classmethod
    def of(cls, channel: Channel, plan: Plan, kernel: np.ndarray | None, staged: StagedProduct | None = None) -> Place:
        into, out = channel.incoming_area, channel.outgoing_area
        in_dtype, out_dtype = (np.int64, np.float32) if plan.op == "EMBED" else (np.float32, np.float32) if plan.field is None else (np.int64, np.int64)
        x = np.frombuffer(channel.mm, in_dtype, plan.rows * plan.features, into + plan.request.offsets[1]).reshape(plan.rows, plan.features)
        y = np.frombuffer(channel.mm, out_dtype, plan.rows * plan.out_features, out + plan.reply.offsets[1]).reshape(plan.rows, plan.out_features)
        header_at = out + plan.reply.offsets[0]
        table = slice(out, out + len(plan.reply.table))
        return cls(x, y, table, slice(header_at, header_at + plan.reply.lengths[0]), plan.reply.table, kernel, staged)

    def post(self, channel: Channel, header: bytes | bytearray) -> None:
        """Post the reply whose body is written: its header, its table, then its seq (`Channel.post_seq`)."""
        channel.mm[self.header] = header
        channel.mm[self.table] = self.reply_table
        channel.post_seq(channel.seq)


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
        head = channel.mm[channel.incoming_area : channel.incoming_area + HEAD]  # a copy: what is checked is what is used
        key = request_key(head[: TABLE.size], head[DATA:])
        plan = self.plans.get(key)
        if plan is None or (plan.field is None and self.batching and not alone):
            return False
        seq = channel.incoming_seq()
        place = channel.views.get(key) or self._place(channel, key, plan)
        started = time.perf_counter()
        if plan.op == "EMBED":
            if not self._embed(place):
                return False
        elif plan.field is None:
            self._product(plan, place)
        elif not self._product_mod(plan, place):
            return False
        elapsed = time.perf_counter() - started
        channel.seq = seq
        place.post(channel, protocol.stamped(plan.reply_header, protocol.compact_id(head[DATA:]), elapsed))
        self._count(plan, client, elapsed)
        if plan.field is None:
            self.warmer.answered(plan.site)  # (otp's products read other weights)
        return True

    def _place(self, channel: Channel, key: bytes, plan: Plan) -> Place:
        """`plan`'s `Place` on `channel`, made at its first request there."""
        weights = self.handlers.weights
        plain = plan.field is None and plan.op != "EMBED"
        kernel = weights.one_row_kernel(plan.site, plan.rows * plan.features) if plain else None
        small = 4 * plan.rows * (plan.features + plan.out_features) <= STAGED_BYTES
        staged = weights.staged_product(plan.site, plan.rows) if plain and small and not weights.cpu_float32 else None
        place = channel.views[key] = Place.of(channel, plan, kernel, staged)
        return place

    def _product(self, plan: Plan, place: Place) -> None:
        """A plain float product of the request's input into the reply, with the generic path's kernel (the same bits)."""
        weights = self.handlers.weights
        if place.kernel is not None:
            np.matmul(place.x, place.kernel, out=place.out)
        elif weights.cpu_float32:
            weights.product_into(plan.site, place.x, place.out)
        elif place.staged is not None:  # another dtype or device: the generic path's product, cast back as it does
            place.staged(place.x, place.out)
        else:  # the same, for a prefill chunk: its buffers would be held (pinned on CUDA) for the lane's lifetime
            x_t = torch.from_numpy(place.x)
            y = weights.lm_head(x_t) if plan.site == "lm_head" else weights.group_product(plan.site, x_t)  # type: ignore[arg-type]
            place.out[:] = self.handlers.out(y, torch.float32).detach().numpy()

    def _embed(self, place: Place) -> bool:
        """The vocabulary rows of the request's token ids into the reply; False (nothing written) where an id is out of range."""
        weights = self.handlers.weights
        ids = place.x.reshape(-1).copy()  # ours: the range checked is the range used
        if not all_within(ids, weights.embedding.shape[0]):
            return False  # the generic path refuses it, naming why
        if weights.cpu_float32:
            np.take(weights.embedding.detach().numpy(), ids, axis=0, out=place.out)
        else:
            place.out[:] = self.handlers.out(weights.embed(torch.from_numpy(ids)), torch.float32).detach().numpy()
        return True

    def _product_mod(self, plan: Plan, place: Place) -> bool:
        """An otp product of the request's input into the reply; False (nothing written) where the generic path must answer."""
        assert plan.field is not None
        p, limb_bits, bits = plan.field
        quantized = self.handlers.quantized
        if quantized is None or quantized.bits != bits:
            return False  # quantized to another width since: the generic path quantizes again
        x_rows = place.x.copy()  # ours: the range checked is the range used
        if not all_within(x_rows, p):
            return False  # the generic path refuses it, naming why
        y = quantized.product_mod(plan.site, torch.from_numpy(x_rows), p, limb_bits)
        place.out[:] = y.detach().cpu().numpy()
        return True

    def _count(self, plan: Plan, client: str, seconds: float) -> None:
        """The counters `Server._handle` and `Server._send` keep for a request they answer."""
        body_in, body_out = plan.request.lengths[1], plan.reply.lengths[1]
        self.stats.fast_lane_requests += 1
        self.stats.requests += 1
        self.stats.ops[plan.op].answered(body_in, body_out, seconds)
        counters = self.stats.client(client)
        counters.requests += 1
        counters.bytes_in += COMPACT.size + body_in
        counters.bytes_out += COMPACT.size + body_out
