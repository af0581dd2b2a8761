"""`tsqp serve-gpu`: the untrusted accelerator service.

It holds the linear weights (`LinearWeights`) on CUDA when present, else CPU, and
answers the protocol's ops from a table of small handlers. Whatever a client sends,
the server answers with a reply (an error naming the problem if need be) and goes on
serving.

With `ServerKeys` the socket is a CURVE server: only listed clients get in and the link is
encrypted. Without keys it listens only where other hosts cannot reach it (loopback tcp,
ipc://), unless `insecure_public` says otherwise.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from tsqp.model import fixedpoint

from tsqp.wire import protocol
from tsqp.errors import AuthError, ProtocolError
from tsqp.wire.keys import ServerKeys, start_curve_server
from tsqp.model.linear import CALL_GROUPS, GroupKey, LinearWeights, QuantizedWeights
from tsqp.model.loading import LoadedModel
from tsqp.wire.protocol import Limits, Message
from tsqp.server.recording import Recorder

log = logging.getLogger("tsqp.server")

SERVER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAULTABLE_OPS = ("EMBED", "LINEAR", "LM_HEAD", "MATMUL")  # the ops whose results `--fault-rate` may corrupt


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def default_limits(model: LoadedModel) -> Limits:
    """Room for the largest legitimate request (a full-context prefill), and no more."""
    c = model.config
    widest = max(c.hidden_size, c.intermediate_size, c.vocab_size)
    elements = c.max_seq_len * widest
    attention = c.n_heads * c.max_seq_len * c.max_seq_len  # offloaded prefill scores
    return Limits(max_tensor_elements=max(elements, attention), max_message_bytes=8 * max(elements, attention) + (1 << 20))


LATENCY_SAMPLES = 1024  # per op: the ring buffer the percentiles come from
MAX_CLIENTS = 256  # clients tracked in STATS; the least recently seen is dropped first
MAX_PENDING = 64  # requests received ahead of their round (batching on); zmq's queues hold the rest


@dataclass
class OpStats:
    calls: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    compute_s: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))  # handler seconds, newest last

    def record(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: v for k, v in vars(self).items() if k != "latencies"}
        ordered = sorted(self.latencies)
        d["latency_samples"] = len(ordered)
        for q in (50, 90, 99):
            d[f"p{q}_s"] = _percentile(ordered, q)
        return d


@dataclass
class ClientStats:
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    last_seen: float = 0.0  # time.time()


@dataclass
class ServerStats:
    ops: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    malformed: int = 0
    requests: int = 0
    clients: OrderedDict[str, ClientStats] = field(default_factory=OrderedDict)  # least recently seen first
    max_clients: int = MAX_CLIENTS
    clients_evicted: int = 0
    faults_injected: int = 0
    batches: int = 0  # products computed for several requests at once
    batched_requests: int = 0  # requests answered from such a product

    def client(self, key: str) -> ClientStats:
        """The counters of one client (created if new), now the most recently seen; bounded in number."""
        stats = self.clients.get(key)
        if stats is None:
            stats = self.clients[key] = ClientStats()
            while len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)
                self.clients_evicted += 1
        else:
            self.clients.move_to_end(key)
        stats.last_seen = time.time()
        return stats

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": {op: s.as_dict() for op, s in self.ops.items()},
            "malformed": self.malformed,
            "requests": self.requests,
            "clients": {key: vars(c).copy() for key, c in self.clients.items()},
            "clients_evicted": self.clients_evicted,
            "faults_injected": self.faults_injected,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
        }


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted samples; None without samples."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def client_key(identity: bytes) -> str:
    """A short hex name for a ROUTER identity (libzmq's are 5 bytes; a client-chosen one may be 255)."""
    return identity.hex() if len(identity) <= 8 else hashlib.blake2b(identity, digest_size=8).hexdigest()


@dataclass
class Received:
    """A request taken off the socket and not answered yet."""

    identity: Any  # the ROUTER identity frame: where the reply goes
    frames: list[Any]
    key: str  # client_key(identity)


@dataclass
class _BatchedLinear:
    """One plain float LINEAR request of a batch: its place in the round, its checked group and its input as (rows, K)."""

    index: int
    msg: Message
    group: GroupKey
    rows: torch.Tensor
    result_elements: int


class Server:
    def __init__(
        self,
        model: LoadedModel,
        endpoint: str,
        device: str = "auto",
        dtype: str = "float32",
        limits: Limits | None = None,
        context: zmq.Context | None = None,
        curve: ServerKeys | None = None,
        insecure_public: bool = False,
        record_dir: str | os.PathLike[str] | None = None,
        fault_rate: float = 0.0,
        fault_seed: int | None = None,
        otp_weight_bits: int = 0,
        batch: bool | None = None,
    ) -> None:
        check_listen_allowed(endpoint, curve is not None, insecure_public)
        self.model = model
        self.device = pick_device(device)
        # Masked float products (noise, seqmix) lose their masks' precision under TF32: full fp32 only.
        torch.backends.cuda.matmul.allow_tf32 = False
        self.dtype_name = dtype
        self.weights = LinearWeights(model.weights, model.config.n_layers, self.device, SERVER_DTYPES[dtype])
        self.limits = limits or default_limits(model)
        # Cross-client batching: on CUDA one product over k decode rows measured 1.1-1.6x faster than
        # k products at k=2 and 3-5x at k=8; on CPU it lost at k=2 (numpy's BLAS is ~3x slower for
        # 2-16 rows than for 1) and broke even at k=4, so it is off there unless asked for.
        self.batch = self.device.type == "cuda" if batch is None else batch
        self._pending: deque[Received] = deque()  # arrival order
        self.quantized: QuantizedWeights | None = None  # built on the first otp request, for its weight width
        if otp_weight_bits:  # now, while the clients load, rather than on their first request
            self._quantized(otp_weight_bits)
        self.record_dir = record_dir
        self.recorder = Recorder(record_dir) if record_dir is not None else None
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault rate {fault_rate} is not a fraction between 0 and 1")
        self.fault_rate = fault_rate
        self._fault_rng = random.Random(fault_seed)
        self.stats = ServerStats()
        self.started = time.monotonic()
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IPV6, "[" in endpoint)  # tcp://[::1]:PORT; IPv4 endpoints stay plain
        # Hard cap per frame in libzmq: far beyond it the peer is dropped before we allocate.
        self.socket.setsockopt(zmq.MAXMSGSIZE, 2 * self.limits.max_message_bytes)
        self.authenticator: ThreadAuthenticator | None = None
        self._monitor: zmq.Socket | None = None
        try:
            if curve is not None:
                self.authenticator = start_curve_server(self.socket, curve, log)
                # Handshakes that never reach the authenticator (no keys, wrong server key) are logged from here.
                self._monitor = self.socket.get_monitor_socket(_HANDSHAKE_FAILED)
            self.socket.bind(endpoint)
        except BaseException:
            self.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._handlers: dict[str, tuple[int, Callable[[Message], Message]]] = {
            "HELLO": (0, self._hello),
            "EMBED": (1, self._embed),
            "LINEAR": (1, self._linear),
            "MATMUL": (2, self._matmul),
            "LM_HEAD": (1, self._lm_head),
            "STATS": (0, self._stats),
            "HEALTH": (0, self._health),
        }

    # --- serving -------------------------------------------------------------

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            # Requests left pending when `stop` comes go unanswered, as those still queued in zmq do.
            if self._pending or self.socket.poll(100):  # blocking wait, no busy polling: the client needs the core
                if self._batching() or self._pending:
                    self.serve_round()
                else:
                    self.serve_one()
            if self._monitor is not None:
                self._log_handshake_failures()

    def serve_one(self) -> None:
        # ROUTER fair-queues its peers: one client's queued calls alternate with another's.
        identity, *frames = self.socket.recv_multipart(copy=False)
        key = client_key(identity.bytes)
        self._send(Received(identity, frames, key), self.handle(frames, key))

    def serve_round(self) -> None:
        """Take what is queued, then answer one round: the oldest pending request of each client.

        One request per client per round, so a client that queues many long requests delays
        another client's request by about one of its calls, not all of them. Each reply goes
        out as soon as it is ready.
        """
        self.receive_queued()
        chosen: list[Received] = []
        later: deque[Received] = deque()
        clients: set[str] = set()
        for r in self._pending:
            (later if r.key in clients else chosen).append(r)
            clients.add(r.key)
        self._pending = later
        for i, reply in self.handle_many([(r.frames, r.key) for r in chosen]):
            self._send(chosen[i], reply)

    def receive_queued(self) -> int:
        """Move the requests already queued on the socket to the pending ones, without waiting; returns how many are pending."""
        while len(self._pending) < MAX_PENDING:
            try:
                identity, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._pending.append(Received(identity, frames, client_key(identity.bytes)))
        return len(self._pending)

    def _send(self, request: Received, reply: Message) -> None:
        """Encode and send one reply, counted for its client."""
        key, frames = request.key, request.frames
        try:
            out = protocol.encode(reply)
        except Exception as e:  # a reply that cannot be sent still gets an answer
            log.exception("cannot encode the reply to request %s", reply.id, extra={"client": key})
            reply = protocol.error_reply(reply.id, f"the server could not encode its reply: {type(e).__name__}")
            out = protocol.encode(reply)
        client = self.stats.client(key)
        client.requests += 1
        client.bytes_in += sum(_frame_bytes(f).nbytes for f in frames)
        client.bytes_out += sum(_frame_bytes(f).nbytes for f in out)
        client.errors += not reply.ok
        self.socket.send_multipart([request.identity, *out], copy=False)

    def _batching(self) -> bool:
        # Recording and fault injection act per request in `handle`: with either on, everything goes through it.
        return self.batch and self.recorder is None and not self.fault_rate

    def handle_many(self, requests: Sequence[tuple[list[Any], str]]) -> Iterator[tuple[int, Message]]:
        """`handle` for several requests (frames, client): yields (index, reply) once per request, as each is ready.

        With batching on, plain float LINEAR requests for the same weights are answered from one
        product over their rows; every other request goes through `handle`, in order.
        """
        batches = self._linear_batches(requests) if self._batching() and len(requests) > 1 else []
        first = {batch[0].index: batch for batch in batches}
        batched = {item.index for batch in batches for item in batch}
        for i, (frames, client) in enumerate(requests):
            if i in first:
                yield from self._answer_batch(first[i], requests)
            elif i not in batched:
                yield i, self.handle(frames, client)

    def _linear_batches(self, requests: Sequence[tuple[list[Any], str]]) -> list[list[_BatchedLinear]]:
        """Groups of at least two requests that can share one product, each group in arrival order."""
        groups: dict[Hashable, list[list[_BatchedLinear]]] = defaultdict(list)
        for i, (frames, _) in enumerate(requests):
            found = self._batchable(i, frames)
            if found is None:
                continue
            key, item = found
            batches = groups[key]
            # A batch's result obeys the same limit as one request's: batching must not multiply memory.
            if not batches or sum(b.result_elements for b in batches[-1]) + item.result_elements > self.limits.max_tensor_elements:
                batches.append([])
            batches[-1].append(item)
        return [b for batches in groups.values() for b in batches if len(b) > 1]

    def _batchable(self, index: int, frames: list[Any]) -> tuple[Hashable, _BatchedLinear] | None:
        """(what must match to share a product, the request) for a valid plain float LINEAR request; else None.

        Anything else, malformed or refused requests included, is left to `handle`, which answers it.
        """
        try:
            msg = protocol.decode(frames, self.limits)
        except Exception:
            return None
        if msg.op != "LINEAR" or set(msg.args) != {"layer", "modules"} or len(msg.tensors) != 1:
            return None
        x, layer, modules = msg.tensors[0], msg.args["layer"], msg.args["modules"]
        if x.dtype not in FLOAT_DTYPES or x.dim() < 1 or x.shape[-1] == 0:
            return None
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            return None
        try:
            group = self.weights.check_linear(layer, modules)
        except ProtocolError:
            return None
        out_features = self.weights.out_features(group)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] * out_features > self.limits.max_tensor_elements:
            return None
        # A wrong feature size matches only its like: that product fails, and `handle` answers each.
        key = (layer, tuple(modules), x.dtype, x.shape[-1])
        return key, _BatchedLinear(index, msg, group, rows, rows.shape[0] * out_features)

    def _answer_batch(self, batch: list[_BatchedLinear], requests: Sequence[tuple[list[Any], str]]) -> Iterator[tuple[int, Message]]:
        """One product over the batch's rows, split back into one reply per request."""
        msg = batch[0].msg
        started = time.perf_counter()
        try:
            outputs = self.weights.group_product(batch[0].group, torch.cat([b.rows for b in batch]))
            results = [self._out(y, msg.tensors[0].dtype) for y in outputs]
        except Exception as e:  # a wrong feature size, or the larger product failing: answer one by one
            log.info("a batch of %d LINEAR requests failed (%s: %s); answering them one by one", len(batch), type(e).__name__, e)
            for b in batch:
                yield b.index, self.handle(*requests[b.index])
            return
        elapsed = time.perf_counter() - started
        n_rows = [b.rows.shape[0] for b in batch]
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.batched_requests += len(batch)
        pieces = zip(*(y.split(n_rows) for y in results))  # per request: one (rows, N_i) piece per module
        for b, parts in zip(batch, pieces):
            # Each request is charged its share of the product, by rows, so compute_s still adds up.
            share = elapsed * (b.rows.shape[0] / sum(n_rows) if sum(n_rows) else 1 / len(batch))
            shape = b.msg.tensors[0].shape[:-1]
            reply = protocol.reply(b.msg.id, {"compute_s": share}, [y.reshape(*shape, y.shape[-1]) for y in parts])
            self._count_linear(b.msg, reply, share)
            yield b.index, reply

    def _count_linear(self, msg: Message, reply: Message, seconds: float) -> None:
        """The per-op counters `handle` keeps, for a request answered from a batch."""
        stats = self.stats.ops["LINEAR"]
        stats.calls += 1
        stats.bytes_in += msg.nbytes
        stats.bytes_out += reply.nbytes
        stats.record(seconds)
        stats.compute_s += seconds

    def handle(self, frames: list[Any], client: str = "-") -> Message:
        """Frames of one request -> the reply. Never raises. `client` names the sender in logs."""
        self.stats.requests += 1
        try:
            msg = protocol.decode(frames, self.limits)
        except Exception as e:  # ProtocolError, or a validation gap: either way, keep serving
            self.stats.malformed += 1
            log.warning("malformed request from %s: %s", client, e, extra={"client": client, "op": None, "error": str(e)})
            return protocol.error_reply(_salvage_id(frames), f"bad request: {e}")
        if self.recorder is not None:
            self.recorder.write(msg.op, msg.args, msg.tensors, client)
        stats = self.stats.ops[msg.op]
        stats.calls += 1
        stats.bytes_in += msg.nbytes
        started = time.perf_counter()
        try:
            n_tensors, handler = self._handlers[msg.op]
            if len(msg.tensors) != n_tensors:
                raise ProtocolError(f"{msg.op} takes {n_tensors} tensor(s), got {len(msg.tensors)}")
            reply = handler(msg)
        except ProtocolError as e:
            stats.errors += 1
            stats.record(time.perf_counter() - started)
            log.warning("refused %s request %s from %s: %s", msg.op, msg.id, client, e, extra={"client": client, "op": msg.op, "error": str(e)})
            return protocol.error_reply(msg.id, f"bad {msg.op} request: {e}")
        except Exception as e:  # a bug or a device failure must not kill the service
            stats.errors += 1
            stats.record(time.perf_counter() - started)
            log.exception("%s failed", msg.op, extra={"client": client, "op": msg.op, "error": f"{type(e).__name__}: {e}"})
            return protocol.error_reply(msg.id, f"{msg.op} failed on the server: {type(e).__name__}: {e}")
        if msg.op in FAULTABLE_OPS and self.fault_rate and self._fault_rng.random() < self.fault_rate:
            self._perturb(reply, msg.args.get("p"))
            self.stats.faults_injected += 1
        elapsed = time.perf_counter() - started
        stats.record(elapsed)
        stats.compute_s += elapsed
        stats.bytes_out += reply.nbytes
        reply.args.setdefault("compute_s", elapsed)
        return reply

    def _log_handshake_failures(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            event = zmq.utils.monitor.parse_monitor_message(self._monitor.recv_multipart())
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH:  # refused keys: the authenticator logs those, naming the key
                log.warning("refused a client: %s", _HANDSHAKE_ERRORS.get(event["value"], "it broke off the CURVE handshake (no keys, or a wrong server key?)"))

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; with `linger_ms`, replies still queued may go out until the context terminates."""
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
        self.socket.close(linger=linger_ms)
        if self.authenticator is not None:
            self.authenticator.stop()
        if self.recorder is not None:
            self.recorder.close()

    def shutdown(self, flush_s: float = 10.0) -> None:
        """Close, then wait (at most `flush_s`) until queued replies, the last call's included, are sent.

        For a process that exits next: it terminates the socket's context.
        """
        self.close(linger_ms=int(flush_s * 1000))
        done = threading.Thread(target=self.context.term, daemon=True)  # term() waits for the linger
        done.start()
        done.join(flush_s + 1.0)

    # --- handlers ------------------------------------------------------------

    def _hello(self, msg: Message) -> Message:
        theirs = msg.args.get("fingerprint")
        if theirs is not None and theirs != self.model.fingerprint:
            raise ProtocolError(f"model fingerprint {theirs} does not match the server's {self.model.fingerprint}")
        return protocol.reply(
            msg.id,
            {
                "protocol": list(protocol.VERSION),
                "fingerprint": self.model.fingerprint,
                "config": vars(self.model.config),
                "device": str(self.device),
                "dtype": self.dtype_name,
                "ops": list(self._handlers),
                "call_groups": [list(g) for g in CALL_GROUPS],
                "limits": vars(self.limits),
            },
        )

    def _embed(self, msg: Message) -> Message:
        ids = msg.tensors[0]
        if ids.dtype != torch.int64:
            raise ProtocolError(f"token ids must be int64, got {protocol.DTYPE_NAMES[ids.dtype]}")
        self._check_result(ids.numel() * self.weights.embedding.shape[1])
        return protocol.reply(msg.id, tensors=[self._out(self.weights.embed(ids), torch.float32)])

    def _linear(self, msg: Message) -> Message:
        layer, modules = msg.args.get("layer"), msg.args.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise ProtocolError("args.modules must be a list of module names")
        key = self.weights.check_linear(layer, modules)
        if msg.tensors[0].dtype == torch.int64:
            return self._product_mod(msg, key)
        x = _float_input(msg.tensors[0])
        self._check_result(x.numel() // max(x.shape[-1], 1) * self.weights.out_features(key))
        outputs = self.weights.group_product(key, x)
        return protocol.reply(msg.id, tensors=[self._out(y, x.dtype) for y in outputs])

    def _matmul(self, msg: Message) -> Message:
        a, b = (_float_input(t) for t in msg.tensors)
        if a.dim() < 2 or b.dim() < 2:
            raise ProtocolError("MATMUL operands must have at least 2 dimensions")
        try:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except RuntimeError:
            raise ProtocolError(f"MATMUL batch shapes {list(a.shape[:-2])} and {list(b.shape[:-2])} do not broadcast") from None
        self._check_result(math.prod(batch) * a.shape[-2] * b.shape[-1])
        y = self.weights.matmul(a.to(self.device, self.weights.dtype), b.to(self.device, self.weights.dtype))
        return protocol.reply(msg.id, tensors=[self._out(y, a.dtype)])

    def _lm_head(self, msg: Message) -> Message:
        if msg.tensors[0].dtype == torch.int64:
            return self._product_mod(msg, "lm_head")
        x = _float_input(msg.tensors[0])
        self._check_result(x.numel() // max(x.shape[-1], 1) * self.weights.lm_head_t.shape[1])
        return protocol.reply(msg.id, tensors=[self._out(self.weights.lm_head(x), x.dtype)])

    def _product_mod(self, msg: Message, key: GroupKey | str) -> Message:
        """`otp`: a masked integer input, an exact product mod p with the quantized weights."""
        p, limb_bits, bits = (msg.args.get(name) for name in ("p", "limb_bits", "weight_bits"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (p, limb_bits, bits)):
            raise ProtocolError("an int64 input (otp) needs integer args p, limb_bits and weight_bits")
        if not 2 <= bits <= 16:
            raise ProtocolError(f"weight_bits {bits} out of range 2..16")
        x = msg.tensors[0]
        if x.dim() != 2:
            raise ProtocolError(f"an otp input must be (rows, features), got shape {list(x.shape)}")
        quantized = self._quantized(bits)
        try:
            fixedpoint.check_product_exact(quantized.l1, p, limb_bits)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        w_q = quantized.groups[key][0]
        self._check_result(x.shape[0] * w_q.shape[1])
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= p):
            raise ProtocolError("otp input values must lie in [0, p)")
        outputs = quantized.product_mod(key, x, p, limb_bits)
        return protocol.reply(msg.id, tensors=[y.cpu().contiguous() for y in outputs])

    def _quantized(self, bits: int) -> QuantizedWeights:
        if self.quantized is None or self.quantized.bits != bits:
            self.quantized = None  # one width at a time: free the old copy first
            log.info("quantizing the weights to %d bits for otp requests", bits)
            self.quantized = QuantizedWeights(self.model.weights, self.model.config.n_layers, bits, self.device)
        return self.quantized

    def _perturb(self, reply: Message, p: Any) -> None:
        """Fault injection for integrity tests: change one random element of one result."""
        which = self._fault_rng.randrange(len(reply.tensors))
        y = reply.tensors[which].clone()  # received-frame tensors are read-only
        flat = y.view(-1)
        i = self._fault_rng.randrange(flat.numel())
        if y.dtype == torch.int64 and isinstance(p, int):
            flat[i] = (flat[i] + self._fault_rng.randrange(1, p)) % p  # stays a valid element of Z_p
        elif y.dtype == torch.int64:
            flat[i] += 1
        else:
            flat[i] += (1.0 + flat[i].abs()) * self._fault_rng.choice((-1.0, 1.0))
        reply.tensors[which] = y

    def _stats(self, msg: Message) -> Message:
        return protocol.reply(msg.id, self.stats.as_dict())

    def _health(self, msg: Message) -> Message:
        """Liveness: cheap, no tensors."""
        return protocol.reply(
            msg.id,
            {"status": "ok", "uptime_s": time.monotonic() - self.started, "requests": self.stats.requests, "fingerprint": self.model.fingerprint},
        )

    def _check_result(self, elements: int) -> None:
        """Refuse before computing: a small request can ask for a huge result (an outer product, logits)."""
        if elements > self.limits.max_tensor_elements:
            raise ProtocolError(f"the result would have {elements} elements, limit {self.limits.max_tensor_elements}")

    @staticmethod
    def _out(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if y.dtype == dtype and not y.is_cuda:  # the common CPU case: no op at all (each costs µs per call)
            return y
        return y.to(dtype).cpu()


_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_HANDSHAKE_ERRORS = {  # by protocol error; whichever side notices first closes, so the other may see no detail
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it has no CURVE keys (security mechanism mismatch)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its CURVE handshake failed (does it use this server's public key?)",
}


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints other hosts cannot reach: ipc://, inproc:// and loopback tcp://."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]").lower()  # tcp://HOST:PORT or tcp://[IPv6]:PORT
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:
        return False  # *, an interface or a host name: assume other hosts can reach it


def check_listen_allowed(endpoint: str, curve: bool, insecure_public: bool) -> None:
    """Without keys anyone who reaches the server could use it and read the traffic: loopback only by default."""
    if not curve and not insecure_public and not is_local_endpoint(endpoint):
        raise AuthError(f"refusing to listen on {endpoint} without keys (unauthenticated, unencrypted link): "
                        "pass --curve-secret and --allow-clients, or --insecure-public to accept that")  # fmt: skip


def _float_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in FLOAT_DTYPES:
        raise ProtocolError(f"activations must be floating point, got {protocol.DTYPE_NAMES[x.dtype]}")
    if x.dim() < 1:
        raise ProtocolError("activations must have at least one dimension")
    return x


def _frame_bytes(frame: Any) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def _salvage_id(frames: list[Any]) -> int:
    """The request id of a message that failed validation, if its header yields one."""
    try:
        header = msgpack.unpackb(protocol._buffer(frames[0]), raw=False)
        msg_id = header.get("id")
        return msg_id if isinstance(msg_id, int) and not isinstance(msg_id, bool) else -1
    except Exception:
        return -1
