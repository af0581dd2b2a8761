"""The TEE's connection to `serve-gpu`: a `LinearBackend` whose products run remotely.

Every call is one round trip on a DEALER socket. Waiting is bounded: nothing listening
turns into `ServerUnavailable` within the connect timeout; a server that never answers,
refuses the model, or dies mid-request, within the reply timeout. With CURVE keys the link
is authenticated and encrypted; a server that refuses the handshake turns into `AuthError`.

The server is not trusted to answer what was asked: a reply's id, tensor count, shapes,
dtypes and finiteness are checked here (`MalformedReply`), its error text is cleaned of
control characters before anyone prints it, and no reply frame may exceed `max_reply_bytes`
(enforced by libzmq before it allocates).
"""

from __future__ import annotations

import math
import mmap
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq
import zmq.utils.monitor

from tsqp.errors import AuthError, EndpointError, MalformedReply, ModelMismatch, ProtocolError, RemoteError, ServerUnavailable, clean_text
from tsqp.wire import protocol
from tsqp.wire.endpoints import CONNECT_TIMEOUT_S, HANDSHAKE_FAILED, check_endpoint, is_local_endpoint, new_socket
from tsqp.wire.keys import ClientKeys, client_keys, set_client_keys
from tsqp.wire.protocol import Message
from tsqp.wire.shm import DATA, DEFAULT_SPIN_US, HOT_OPS, TRANSPORTS, Channel, Layout, Spinner

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
MAX_KNOWN_CALLS = 4096  # hot calls whose bytes are remembered (`KnownCall`; a decode step makes ~5 kinds a layer)
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


@dataclass(frozen=True)
class KnownCall:
    """A hot call over shared memory whose bytes are known but for its id: the request's (its compact header and
    frame table), and an honest reply's but for the id and the compute time. A reply whose first bytes are those
    is taken without decoding and checked only for finiteness; any other goes the checked way."""

    header: bytes  # the request's compact header, id 0
    request: Layout
    reply: Layout  # an honest reply's: its frame table, its body's offset and length
    reply_header: bytes  # an honest reply's compact header, id and compute_s 0
    shape: tuple[int, ...]
    dtype: Any  # the reply's numpy dtype

    @classmethod
    def of(cls, request: Message, shape: tuple[int | None, ...], dtype: torch.dtype, area_bytes: int) -> KnownCall | None:
        """`request`'s, whose honest reply is one tensor of `shape` and `dtype`; None where its bytes cannot be known, or
        either message would not fit an area of `area_bytes`."""
        frames = protocol.encode_compact(request)
        if frames is None or None in shape or math.prod(shape) == 0 or dtype not in NUMPY_DTYPES:  # type: ignore[arg-type]
            return None
        reply = protocol.encode_compact(protocol.reply(0, {"compute_s": 0.0}, [torch.empty(shape, dtype=dtype)]))  # type: ignore[arg-type]
        assert reply is not None  # one tensor of a dtype numpy has, and a float compute_s: always sayable
        layout, reply_layout = Layout.of([memoryview(f).nbytes for f in frames]), Layout.of([memoryview(f).nbytes for f in reply])
        if max(layout.size, reply_layout.size) > area_bytes:
            return None
        header = bytes(protocol.stamped(frames[0], 0, 0.0))
        return cls(header, layout, reply_layout, bytes(reply[0]), shape, np.dtype(NUMPY_DTYPES[dtype]))  # type: ignore[arg-type]

    @property
    def reply_head(self) -> int:
        """Bytes from the reply area's start that `honest_compute_s` looks at."""
        return DATA + len(self.reply_header)

    def honest_compute_s(self, head: bytes, msg_id: int) -> float | None:
        """The compute time in `head` (a copy of the reply area's first `reply_head` bytes) if it starts the honest
        reply to call `msg_id`; else None."""
        if head[: len(self.reply.table)] != self.reply.table:  # (the bytes between table and header are unused)
            return None
        header = head[DATA:]
        compute_s = protocol.compact_compute_s(header)
        if not 0.0 <= compute_s < math.inf or header != protocol.stamped(self.reply_header, msg_id, compute_s):
            return None
        return compute_s


class HotCall:
    """A `KnownCall` laid onto one channel: views of where its input goes in the request area and of where an honest
    reply's body lies in the reply area, so a call writes its input, and copies the reply's body out, in one step each."""

    def __init__(self, known: KnownCall, channel: Channel, x: torch.Tensor) -> None:
        self.known = known
        out, into = channel.outgoing_area, channel.incoming_area
        self.table = slice(out, out + len(known.request.table))
        self.header_at = out + known.request.offsets[0]
        self.header = slice(self.header_at, self.header_at + len(known.header))
        # Views of the mapping (not of `channel.buf`, which must be releasable at close), dropped with the channel.
        # The input is written by torch's copy (the TEE's own ops keep its code warm: 3.4-3.9 µs a call in a run,
        # against 6-9 for numpy's assignment), the reply's body copied out by numpy's (2-3 µs against torch's 9-12).
        self.input = torch.from_numpy(np.frombuffer(channel.mm, NUMPY_DTYPES[x.dtype], x.numel(), out + known.request.offsets[1]).reshape(x.shape))
        self.output = np.frombuffer(channel.mm, known.dtype, math.prod(known.shape), into + known.reply.offsets[1]).reshape(known.shape)
        self.head = slice(into, into + known.reply_head)
        self.sent = len(known.header) + known.request.lengths[1]
        self.received = len(known.reply_header) + known.reply.lengths[1]
        self.compute_s = 0.0  # the server's time for the last honest reply: what the next one is expected to take

    def write(self, mm: mmap.mmap, x: torch.Tensor, msg_id: int) -> None:
        """Write the request for `x` under `msg_id` into the request area (posting it is the caller's)."""
        self.input.copy_(x)  # (an x that requires grad never comes here: `call` raises on it)
        mm[self.header] = self.known.header
        protocol.stamp_id(mm, self.header_at, msg_id)
        mm[self.table] = self.known.request.table


@dataclass
class WireStats:
    """What the client spent on the server, summed over calls."""

    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trip_s: float = 0.0  # request sent -> reply received, less the caller's work done meanwhile (`while_waiting`)
    server_s: float = 0.0  # compute time the server reports for its replies
    serialize_s: float = 0.0  # encode + decode on this side

    @property
    def wire_s(self) -> float:
        return max(self.round_trip_s - self.server_s, 0.0)

    def as_dict(self) -> dict[str, float]:
        return {**vars(self), "wire_s": self.wire_s}


class RemoteBackend:
    """Linear ops on a `tsqp serve-gpu` server.

    `on_send(op, tensor)` sees every tensor before it is serialized (used by
    `check-grad` and the tests that check what the server receives); `server_alive()`
    lets the owner of a private server report its death at once. `curve_secret` (this
    client's NAME.key_secret) and `server_key` (the server's NAME.key) turn on CURVE.
    `out_features` (module name, "embed" or "lm_head" -> width; `model.linear.output_widths`)
    lets replies be checked to the column; without it only their rows are.
    `transport`: `shm` carries the hot ops' bodies through shared memory (`tsqp.wire.shm`),
    `zmq` keeps everything on the socket, `auto` asks for shm on a same-host endpoint and
    falls back to zmq; `spin_us` is how long a shm call spins before it blocks.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float = 60.0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        context: zmq.Context | None = None,
        on_send: Callable[[str, torch.Tensor], None] | None = None,
        server_alive: Callable[[], bool] | None = None,
        curve_secret: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
        out_features: Mapping[str, int] | None = None,
        max_reply_bytes: int | None = None,
        transport: str = "auto",
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        check_endpoint(endpoint)  # before the socket: a bad endpoint or key file leaks nothing
        if transport not in TRANSPORTS:
            raise EndpointError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        self.transport = transport
        self.spinner = Spinner(spin_us / 1e6)
        self.shm: Channel | None = None
        self.curve: ClientKeys | None = client_keys(curve_secret, server_key)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.on_send = on_send
        self.server_alive = server_alive
        self.stats = WireStats()
        self.info: dict[str, Any] = {}
        self._compact = False  # hot calls with the compact header: once the server's HELLO says it reads them
        self._split_widths: dict[tuple[str, ...], list[int]] = {}
        self.out_features = dict(out_features or {})
        self._next_id = 0
        self._worked_s = 0.0  # the current call's `while_waiting` time
        self._abandoned: set[int] = set()  # ids of timed-out requests, whose late answers are dropped
        self.socket = new_socket(context or zmq.Context.instance(), zmq.DEALER, endpoint)
        if max_reply_bytes is not None:  # libzmq drops a larger frame's connection before allocating it
            self.socket.setsockopt(zmq.MAXMSGSIZE, max_reply_bytes)
        self.max_reply_bytes = max_reply_bytes
        if self.curve is not None:
            set_client_keys(self.socket, self.curve)
        # Connection events tell us a server died, or refused us, without waiting for the deadline.
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        self._connected = False
        self._was_connected = False
        self._dropped = False  # the connection went down since the current call was sent
        try:
            self.socket.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise EndpointError(f"cannot connect to {endpoint}: {e.strerror}") from None

    # --- LinearBackend -------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.call("EMBED", {}, [token_ids.to(torch.int64)]).tensors[0]

    def linear(self, layer: int, modules: Sequence[str], x: torch.Tensor, groups: Sequence[int] | None = None) -> list[torch.Tensor]:
        modules = tuple(modules)
        fused = self.call("LINEAR", {"layer": layer, "modules": modules}, [x]).tensors[0]
        if len(modules) == 1:
            return [fused]
        widths = self._split_widths.get(modules)
        if widths is None:
            widths = self._split_widths[modules] = [self._width(m) for m in modules]
        return list(fused.split(widths, dim=-1))

    def _width(self, module: str) -> int:
        if module not in self.out_features and not self.info:
            self.hello()  # a backend given no widths learns them from the server's HELLO
        width = self.out_features.get(module)
        if width is None:
            raise ProtocolError(f"the server at {self.endpoint} did not say how wide {module}'s output is, so its fused reply cannot be split")
        return width

    def lm_head(self, x: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
        return self.call("LM_HEAD", {}, [x]).tensors[0]

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.call("MATMUL", {}, [a, b]).tensors[0]

    # --- session ---------------------------------------------------------------

    def wait_connected(self) -> None:
        """Return once a connection is up; `ServerUnavailable` after the connect timeout if nothing listens."""
        if self.endpoint.startswith("inproc://"):
            return  # no connection events in-process
        deadline = time.monotonic() + self.connect_timeout_s
        while not self._connected:
            self._watch_connection(wait_ms=50)
            if not self._connected and time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"nothing answers at {self.endpoint} (no connection within {self.connect_timeout_s:g} s); is `tsqp serve-gpu` running there?"
                )

    def hello(self, fingerprint: str | None = None) -> dict[str, Any]:
        """Check that a compatible server holding the same model answers; open the shared-memory channel if asked for."""
        self.wait_connected()
        args: dict[str, Any] = {"fingerprint": fingerprint} if fingerprint else {}
        if self.transport == "shm" or (self.transport == "auto" and is_local_endpoint(self.endpoint)):
            args["transport"] = "shm"
        try:
            reply = self.call("HELLO", args)
        except RemoteError as e:
            if "fingerprint" in str(e):
                raise ModelMismatch(f"the server at {self.endpoint} holds a different model: {e}") from None
            raise
        self.info = reply.args
        version = reply.args.get("protocol")
        self._compact = isinstance(version, list) and version[:1] == [protocol.VERSION[0]] and version[1:2] >= [1]  # 2.1 reads compact headers
        self._learn_widths(reply.args.get("widths"))
        if fingerprint is not None and reply.args.get("fingerprint") != fingerprint:
            raise ModelMismatch(f"the server at {self.endpoint} holds a different model (fingerprint {reply.args.get('fingerprint')}, ours {fingerprint})")
        self._open_shm(reply.args.get("shm"))
        return reply.args

    def _learn_widths(self, widths: Any) -> None:
        """Output widths the runner did not give (`out_features`), from the server's HELLO: for splitting, and checking, its replies."""
        if not isinstance(widths, dict):
            return
        for name, width in widths.items():
            if isinstance(name, str) and type(width) is int and width > 0:
                self.out_features.setdefault(name, width)

    def _open_shm(self, offer: Any) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if offer is None or self.transport == "zmq":
            if self.transport == "shm":
                raise EndpointError(f"the server at {self.endpoint} offers no shared-memory transport (start serve-gpu with --shm-dir)")
            return
        try:
            self.shm = Channel.attach(offer if isinstance(offer, dict) else {})
        except (EndpointError, ProtocolError):
            if self.transport == "shm":
                raise
            # auto: a server on another host (or in another container) offered a folder we cannot see

    def health(self) -> dict[str, Any]:
        """Liveness check: status, uptime_s, requests served and the model fingerprint."""
        self.wait_connected()
        return self.call("HEALTH", {}).args

    def server_stats(self) -> dict[str, Any]:
        return self.call("STATS", {}).args

    def call(self, op: str, args: dict[str, Any], tensors: Sequence[torch.Tensor] = (), timeout_s: float | None = None,
             while_waiting: Callable[[], None] | None = None) -> Message:  # fmt: skip
        """One request and its checked reply; `while_waiting` (it must not raise) runs once the request is on its way."""
        hot = self._hot_call(op, args, tensors[0]) if len(tensors) == 1 else None
        if hot is not None:
            return self._call_hot(hot, op, args, tensors[0], timeout_s, while_waiting)
        self._next_id += 1
        self._worked_s = 0.0
        request = protocol.request(op, self._next_id, args, tensors)
        if self.on_send is not None:
            for t in request.tensors:
                self.on_send(op, t)
        t0 = time.perf_counter()
        frames = (protocol.encode_compact(request) if self._compact and op in HOT_OPS else None) or protocol.encode(request)
        t1 = time.perf_counter()
        shm = self.shm if self.shm is not None and op in HOT_OPS and self.shm.fits(frames) else None
        if shm is None:  # (a shared-memory channel does not outlive a server restart: its peer's lock tells)
            self._watch_connection()  # events from before this call (a server restart in between) are not its concern
            self._dropped = False
            self.socket.send_multipart(frames, copy=False)
            self._work_while_waiting(while_waiting)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            if shm is not None:
                self._shm_round_trip(shm, op, frames, deadline, while_waiting)
            # Through shared memory: None when the reply was too large for the area and came over zmq.
            reply_frames, reply = self._reply_to(request, deadline, shm.read() if shm is not None else None)
        except ServerUnavailable:
            self._abandoned.add(request.id)  # its answer may still come; it must not pass for the next one's
            raise
        return self._checked(request, len(frames[0]), reply_frames, reply, t0, t1, time.perf_counter())

    def _checked(self, request: Message, header_bytes: int, frames: list[Any], reply: Message, t0: float, t1: float, t2: float) -> Message:
        """`reply` (its `frames`) to `request` (sent with a header of `header_bytes`) if it is what was asked for, counted:
        encoded from `t0` to `t1`, received at `t2`."""
        if not reply.ok:
            raise RemoteError(f"server refused {request.op}: {clean_text(reply.error)}")
        if request.op in HOT_OPS:
            self._check_reply(request, reply)
        compute = reply.args.get("compute_s")
        compute_s = compute if isinstance(compute, float) and 0.0 <= compute < math.inf else 0.0
        self._count(request.nbytes + header_bytes, reply.nbytes + len(frames[0]), t1 - t0, t2 - t1, time.perf_counter() - t2, compute_s)
        return reply

    def _work_while_waiting(self, work: Callable[[], None] | None) -> None:
        """Run `work` while the request is on its way; its time is not the round trip's (`_count`)."""
        if work is not None:
            started = time.perf_counter()
            work()
            self._worked_s = time.perf_counter() - started

    def _count(self, sent: int, received: int, encode_s: float, round_trip_s: float, check_s: float, compute_s: float) -> None:
        s = self.stats
        s.round_trips += 1
        s.bytes_sent += sent
        s.bytes_received += received
        s.round_trip_s += round_trip_s - self._worked_s
        s.serialize_s += encode_s + check_s
        s.server_s += compute_s

    def _hot_call(self, op: str, args: dict[str, Any], x: torch.Tensor) -> HotCall | None:
        """The `HotCall` for this call, made at its kind's first call; None where its bytes cannot be known here (or
        it does not go through shared memory). Args equal under == make the same request (the first one's bytes)."""
        if not self._compact or op not in HOT_OPS or x.requires_grad or self.shm is None:
            return None
        hot_calls = self.shm.views  # a kind's HotCall, or None: kept with the channel whose memory it views
        try:  # the common case: args of hashable values (a tuple of modules)
            key = (op, x.shape, x.dtype, *args.items())
            hot = hot_calls.get(key, False)
        except TypeError:
            key = (op, x.shape, x.dtype, *[(name, tuple(v) if type(v) is list else v) for name, v in args.items()])
            hot = hot_calls.get(key, False)
        if hot is False:
            if len(hot_calls) >= MAX_KNOWN_CALLS:
                hot_calls.clear()
            hot = hot_calls[key] = self._make_hot_call(protocol.request(op, 0, args, [x]), self.shm)
        return hot

    def _make_hot_call(self, request: Message, shm: Channel) -> HotCall | None:
        expected = self._expected(request)
        x = request.tensors[0]
        if len(expected) != 1 or x.dtype not in NUMPY_DTYPES:
            return None
        ((shape, dtype),) = expected
        known = KnownCall.of(request, shape, dtype, shm.area_bytes)
        return HotCall(known, shm, x) if known is not None else None

    def _call_hot(self, hot: HotCall, op: str, args: dict[str, Any], x: torch.Tensor, timeout_s: float | None,
                  while_waiting: Callable[[], None] | None) -> Message:  # fmt: skip
        """`call` for a `HotCall`: its input written straight into shared memory, an honest reply's body copied straight out."""
        shm = self.shm
        assert shm is not None
        if self.on_send is not None:
            self.on_send(op, x)
        self._next_id += 1
        self._worked_s = 0.0
        msg_id = self._next_id
        t0 = time.perf_counter()
        hot.write(shm.mm, x, msg_id)
        t1 = time.perf_counter()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        try:
            self._shm_round_trip(shm, op, None, deadline, while_waiting, hot.compute_s)
            compute_s = hot.known.honest_compute_s(shm.mm[hot.head], msg_id)
            if compute_s is None:  # anything else (an error, a reply over zmq, a lie) goes the checked way
                request = protocol.request(op, msg_id, args, [x])
                frames, reply = self._reply_to(request, deadline, shm.read())
                return self._checked(request, len(hot.known.header), frames, reply, t0, t1, time.perf_counter())
            body = hot.output.copy()
            hot.compute_s = compute_s
        except ServerUnavailable:
            self._abandoned.add(msg_id)
            raise
        t2 = time.perf_counter()
        if body.dtype.kind == "f" and not finite_floats(body.reshape(-1)):
            raise _not_finite(op, args, 0)
        self._count(hot.sent, hot.received, t1 - t0, t2 - t1, time.perf_counter() - t2, compute_s)
        return protocol.reply(msg_id, {"compute_s": compute_s}, [torch.from_numpy(body)])

    def _reply_to(self, request: Message, deadline: float, frames: list[Any] | None = None) -> tuple[list[Any], Message]:
        """The reply to `request` (its `frames` if they came already), skipping late answers to abandoned
        requests; any other id is a protocol error."""
        while True:
            if frames is None:
                frames = self._receive(request.op, deadline)
            try:
                reply = protocol.decode(frames, expect_reply=True)
            except ProtocolError as e:
                raise MalformedReply(f"malformed reply to {request.op} from {self.endpoint}: {e}") from None
            if reply.id in (request.id, -1):  # -1: the server could not read the request's id
                return frames, reply
            if reply.id not in self._abandoned:
                raise MalformedReply(f"the server at {self.endpoint} answered request {reply.id} while request {request.id} ({request.op}) was waiting")
            self._abandoned.discard(reply.id)
            frames = None

    def _check_reply(self, request: Message, reply: Message) -> None:
        """Is the reply what `request` asked for: as many tensors, of the right shapes and dtypes, with finite values?"""
        expected = self._expected(request)
        if len(reply.tensors) != len(expected):
            raise MalformedReply(f"the server's reply to {_call_name(request.op, request.args)} has {len(reply.tensors)} tensors, expected {len(expected)}")
        for i, (t, (shape, dtype)) in enumerate(zip(reply.tensors, expected)):
            if t.dtype != dtype:
                raise MalformedReply(
                    f"the server's reply to {_call_name(request.op, request.args)}: tensor {i} is {protocol.DTYPE_NAMES[t.dtype]}, expected {protocol.DTYPE_NAMES[dtype]}"
                )
            if len(t.shape) != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
                raise MalformedReply(
                    f"the server's reply to {_call_name(request.op, request.args)}: tensor {i} has shape {list(t.shape)}, expected {[d if d is not None else 'N' for d in shape]}"
                )
            self._check_finite(request, i, t)

    @staticmethod
    def _check_finite(request: Message, i: int, t: torch.Tensor) -> None:
        if t.is_floating_point() and not all_finite(t):
            raise _not_finite(request.op, request.args, i)

    def _expected(self, request: Message) -> list[tuple[tuple[int | None, ...], torch.dtype]]:
        """(shape, dtype) of each tensor of an honest reply; None where the width is not known here."""
        x = request.tensors[0]
        width = self.out_features.get
        if request.op == "EMBED":
            return [((*x.shape, width("embed")), torch.float32)]
        if request.op == "LINEAR":  # one tensor: the modules' outputs side by side
            widths = [width(m) for m in request.args["modules"]]
            return [((*x.shape[:-1], None if None in widths else sum(w for w in widths if w is not None)), x.dtype)]
        if request.op == "LM_HEAD":
            return [((*x.shape[:-1], width("lm_head")), x.dtype)]
        b = request.tensors[1]  # MATMUL
        return [((*torch.broadcast_shapes(x.shape[:-2], b.shape[:-2]), x.shape[-2], b.shape[-1]), x.dtype)]

    def _shm_round_trip(self, shm: Channel, op: str, frames: list[Any] | None, deadline: float,
                        while_waiting: Callable[[], None] | None = None, expected_s: float = 0.0) -> None:  # fmt: skip
        """Post a request (its `frames`, or None: written already), run `while_waiting`, and wait for its reply (expected
        to take the server `expected_s`)."""
        shm.seq += 1
        if frames is None:
            shm.post_seq(shm.seq)
        else:
            shm.post(frames, shm.seq)
        self._work_while_waiting(while_waiting)
        try:
            shm.wait(shm.seq, self.spinner, deadline, lambda: self._check_server(op), max(expected_s - self._worked_s, 0.0))
        except EndpointError:
            raise ServerUnavailable(f"the tsqp server at {self.endpoint} went away while answering {op}") from None
        except TimeoutError:
            raise self._no_answer(op) from None

    def _receive(self, op: str, deadline: float) -> list[Any]:
        while True:
            # Blocking waits in short slices, so a dead server is noticed at once.
            if self.socket.poll(200):
                return self.socket.recv_multipart(copy=False)
            self._check_server(op)
            if time.monotonic() > deadline:
                raise self._no_answer(op)

    def _check_server(self, op: str) -> None:
        self._watch_connection()
        if self._dropped or (self._was_connected and not self._connected) or (self.server_alive is not None and not self.server_alive()):
            raise ServerUnavailable(f"the tsqp server at {self.endpoint} went away while answering {op}{self._size_hint()}")

    def _no_answer(self, op: str) -> ServerUnavailable:
        return ServerUnavailable(f"no answer to {op} from {self.endpoint} in time; is `tsqp serve-gpu` running there?")

    def _size_hint(self) -> str:
        if self.max_reply_bytes is None:
            return ""
        return f" (or sent a reply frame over this runner's limit of {self.max_reply_bytes / 2**20:.0f} MiB)"

    def _watch_connection(self, wait_ms: int = 0) -> None:
        """Follow connect/disconnect events (a restarted server reconnects by itself); raise on a refused handshake."""
        refused: dict[str, Any] | None = None
        while self._monitor.poll(wait_ms):
            wait_ms = 0
            event = zmq.utils.monitor.parse_monitor_message(self._monitor.recv_multipart())
            if event["event"] & HANDSHAKE_FAILED:
                refused = event
                continue
            self._connected = event["event"] == zmq.EVENT_CONNECTED
            self._dropped |= self._was_connected and not self._connected
            self._was_connected |= self._connected
        if refused is not None:
            raise AuthError(self._refusal(refused["event"], refused["value"]))

    def _refusal(self, event: int, value: int) -> str:
        server = f"the server at {self.endpoint}"
        mismatch = event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        if self.curve is None:
            if mismatch:
                return f"{server} requires CURVE authentication and this client has no keys (pass --curve-secret and --server-key)"
            return f"the handshake with {server} failed: is it a tsqp server, and does it require CURVE keys (--curve-secret and --server-key)?"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return f"{server} refused this client's CURVE key (is its public key in the server's --allow-clients folder?)"
        if mismatch:
            return f"{server} does not use CURVE keys but this client does (drop --curve-secret/--server-key, or give the server keys)"
        return f"the CURVE handshake with {server} failed (is --server-key its public key, and this client's key in its --allow-clients folder?)"

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)


def _call_name(op: str, args: Mapping[str, Any]) -> str:
    """A hot call as errors name it: the op, and a LINEAR's layer and modules."""
    return op + (f" (layer {args['layer']} {'|'.join(args['modules'])})" if op == "LINEAR" else "")


def _not_finite(op: str, args: Mapping[str, Any], i: int) -> MalformedReply:
    return MalformedReply(f"the server's reply to {_call_name(op, args)}: tensor {i} holds NaN or infinite values")


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in `t` (the reply of every call is checked)."""
    if t.dtype == torch.float32 or t.dtype == torch.float64:
        return finite_floats(t.detach().numpy().reshape(-1))
    return bool(torch.isfinite(t).all())


def finite_floats(a: np.ndarray) -> bool:
    """No NaN or infinity in a 1-D float array. Its dot with itself is finite exactly when every value is (a NaN
    spreads, an infinity's square is +inf, and squares cannot cancel), in one BLAS call: in a decode step, cold,
    3 µs against 10 for `isfinite(a).all()`. Only a sum of squares past the dtype's range needs the elementwise look."""
    return math.isfinite(np.dot(a, a)) or bool(np.isfinite(a).all())
