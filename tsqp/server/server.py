"""`tsqp serve-gpu`: the untrusted accelerator service.

It holds the linear weights (`LinearWeights`) on CUDA when present, else CPU, and
answers the protocol's ops from a table of small handlers (`handlers`), batching
requests of different clients where they share weights (`batching`). This module is
the socket loop: fair rounds, replies, fault injection for tests. Whatever a client sends,
the server answers with a reply (an error naming the problem if need be) and goes on
serving.

With `ServerKeys` the socket is a CURVE server: only listed clients get in and the link is
encrypted. Without keys it listens only where other hosts cannot reach it (loopback tcp,
ipc://), unless `insecure_public` says otherwise.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq
import zmq.utils.monitor
from zmq.auth.thread import ThreadAuthenticator

from tsqp.errors import EndpointError, ProtocolError
from tsqp.model import fixedpoint
from tsqp.model.linear import LinearWeights, output_widths, site_parts
from tsqp.model.loading import LoadedModel
from tsqp.server.batching import BatchedLinear, LinearBatcher
from tsqp.server.fastlane import FastLane
from tsqp.server.handlers import CHUNK_FLOPS, Handlers
from tsqp.server.recording import Recorder
from tsqp.server.shm import ShmHub
from tsqp.server.stats import ServerStats, client_key
from tsqp.server.warming import Warmer, site_of
from tsqp.wire import protocol
from tsqp.wire.endpoints import (
    HANDSHAKE_ERRORS,
    HANDSHAKE_FAILED,
    check_endpoint,
    check_free,
    check_listen_allowed,
    frame_buffer,
    ipc_path,
    new_socket,
    remove_socket_file,
)
from tsqp.wire.keys import ServerKeys, start_curve_server
from tsqp.wire.protocol import Limits, Message
from tsqp.wire.shm import DEFAULT_AREA_BYTES, DEFAULT_SPIN_US, Channel

log = logging.getLogger("tsqp.server")

SERVER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FAULTABLE_OPS = ("EMBED", "LINEAR", "LM_HEAD", "MATMUL")  # the ops whose results `--fault-rate` may corrupt


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA asked for, but torch sees no CUDA device; compute on the CPU instead")
    return torch.device(device)


LOGIT_ROWS = 256


def default_limits(model: LoadedModel) -> Limits:
    """Room for the largest honest request of the split path (a full-context prefill), and no more.

    Inputs travel as int64 under otp (8 bytes a value); products cost up to `MAX_LIMBS` float64
    products under otp; logits come for up to `LOGIT_ROWS` rows at once (sequences decoding together,
    or positions scored). Attention offload (MATMUL) fits while its results do; beyond that an
    operator raises --max-tensor-elements / --max-message-mb.
    """
    c = model.config
    widths = output_widths(model.weights)
    widest = max(w for name, w in widths.items() if name not in ("lm_head", "embed"))  # one result tensor (a module's)
    elements = max(c.max_seq_len * max(widest, c.hidden_size), LOGIT_ROWS * widths["lm_head"])
    fused = max(mats[0].shape[1] * sum(sizes) for key, mats, sizes in site_parts(model.weights, c.n_layers) if key != "lm_head")  # K·N of a call group
    logits = LOGIT_ROWS * c.hidden_size * widths["lm_head"]  # K·N of lm_head, for as many rows as logits come at once
    flops = 2.0 * max(c.max_seq_len * fused, logits) * fixedpoint.MAX_LIMBS
    return Limits(max_tensor_elements=elements, max_message_bytes=8 * elements + (1 << 20), max_request_flops=flops)


MAX_PENDING = 64  # requests received ahead of their round (batching on); zmq's queues hold the rest


@dataclass
class Received:
    """A request taken off the socket and not answered yet."""

    identity: Any  # the ROUTER identity frame: where the reply goes
    frames: list[Any]
    key: str  # client_key(identity)
    channel: Channel | None = None  # a request taken from a shared-memory channel: its reply goes there


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
        shm_folder: str | os.PathLike[str] | None = None,
        shm_area_bytes: int = DEFAULT_AREA_BYTES,
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        check_listen_allowed(check_endpoint(endpoint), curve is not None, insecure_public)
        check_free(endpoint)
        self.device = pick_device(device)
        # Masked float products (noise, seqmix) lose their masks' precision under TF32: full fp32 only.
        torch.backends.cuda.matmul.allow_tf32 = False
        self.limits = limits or default_limits(model)
        self.stats = ServerStats()
        # Same-host clients (shared memory) wait on the cores beside the server's: one-row products keep to one.
        weights = LinearWeights(model.weights, model.config.n_layers, self.device, SERVER_DTYPES[dtype], shares_cores=shm_folder is not None)
        self.handlers = Handlers(model, weights, dtype, self.limits, self.stats)
        self.batcher = LinearBatcher(self.handlers, self.stats)
        self.handlers.between_chunks = self._serve_others
        self._serving = ""  # the client whose request is being computed
        # Cross-client batching pays on CUDA, where k decode rows cost about one; on CPU it lost to
        # one-row products at small k (docs/benchmarks.md), so it is off there unless asked for.
        self.batch = self.device.type == "cuda" if batch is None else batch
        self._pending: deque[Received] = deque()  # arrival order
        self.warmer = Warmer(weights)  # reads the next calls' weights into the caches while same-host clients compute
        if otp_weight_bits:  # now, while the clients load, rather than on their first request
            self.handlers.quantized_weights(otp_weight_bits)
        self.recorder = Recorder(record_dir) if record_dir is not None else None
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault rate {fault_rate} is not a fraction between 0 and 1")
        self.fault_rate = fault_rate
        self._fault_rng = random.Random(fault_seed)
        # Headers answered once are answered again without the generic path, but not where every request must
        # pass through `handle` (recording, fault injection).
        fast = shm_folder is not None and self.recorder is None and not fault_rate
        self.fastlane = FastLane(self.handlers, self.stats, self.warmer, shm_area_bytes, self.batch) if fast else None
        self.context = context or zmq.Context.instance()
        self.socket = new_socket(self.context, zmq.ROUTER, endpoint)
        # Hard cap per frame in libzmq, per connection: a peer declaring a larger frame is dropped before we allocate.
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        self.authenticator: ThreadAuthenticator | None = None
        self._monitor: zmq.Socket | None = None
        self._socket_file: Path | None = None  # an ipc:// socket file this server bound, removed on close
        self._socket_inode = 0
        self.shm: ShmHub | None = None
        try:
            if shm_folder is not None:  # clients on this host may ask for a shared-memory channel at HELLO
                self.shm = ShmHub(shm_folder, self.socket, shm_area_bytes, spin_us)
            if curve is not None:
                self.authenticator = start_curve_server(self.socket, curve, log)
                # Handshakes that never reach the authenticator (no keys, wrong server key) are logged from here.
                self._monitor = self.socket.get_monitor_socket(HANDSHAKE_FAILED)
            self.socket.bind(endpoint)
            self._socket_file = ipc_path(endpoint)
            self._socket_inode = os.lstat(self._socket_file).st_ino if self._socket_file else 0
        except zmq.ZMQError as e:
            self.close()
            raise EndpointError(f"cannot listen on {endpoint}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    # --- serving -------------------------------------------------------------

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            # Requests left pending when `stop` comes go unanswered, as those still queued in zmq do.
            if self._pending or self._wait(100):
                if self._batching() or self._pending or self.shm is not None:
                    self.serve_round()
                else:
                    self.serve_one()
            if self._monitor is not None:
                self._log_handshake_failures()
            if self.shm is not None:
                self.shm.reap()

    def _wait(self, timeout_ms: int) -> bool:
        """Until a request may be there: a blocking wait (the client needs the core), after a short
        spin on the shared-memory channels if there are any."""
        if self.shm is not None and self.shm.channels:
            return self.shm.wait(timeout_ms, self.warmer.step)
        return bool(self.socket.poll(timeout_ms))

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
        # Shared memory first: its fast lane answers at once, before the socket's look (~6-9 µs, cold).
        if self.shm is not None:
            self._receive_shm(self.shm)
        # Asked first: the empty case, the common one with shared memory, costs no exception (and
        # ZMQ_EVENTS costs less than `poll(0)`).
        while len(self._pending) < MAX_PENDING and self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            identity, *frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            self._pending.append(Received(identity, frames, client_key(identity.bytes)))
        return len(self._pending)

    def _receive_shm(self, hub: ShmHub) -> None:
        alone = len(hub.channels) == 1
        for key, channel in list(hub.ready()):
            if self._answered_fast(channel, key, alone):
                continue
            try:
                frames = hub.take(key, channel)
            except ProtocolError as e:  # a frame table ZeroMQ's framing could not have produced
                self.stats.malformed += 1
                log.warning("malformed request from %s: %s", key, e, extra={"client": key, "op": None, "error": str(e)})
                self._send(Received(None, [], key, channel), protocol.error_reply(-1, f"bad request: {e}"))
                continue
            self._pending.append(Received(hub.identities.get(key), frames, key, channel))

    def _answered_fast(self, channel: Channel, key: str, alone: bool) -> bool:
        """Whether the fast lane (if any) answered the request on `channel` (`alone`: its client the only one on
        shared memory); if it failed, the generic path answers (and names the failure)."""
        try:
            return self.fastlane is not None and self.fastlane.answer(channel, key, alone)
        except Exception:
            log.exception("the fast lane failed on a request of %s; answering it the generic way", key, extra={"client": key})
            return False

    def _serve_others(self) -> None:
        """Between the chunks of a long product: answer the other clients' cheap requests now (HEALTH,
        STATS, HELLO, and products no larger than a chunk), each client's oldest only, keeping its order."""
        self.receive_queued()
        busy, seen = self._serving, set()
        for request in list(self._pending):
            if request.key == busy or request.key in seen:
                continue
            seen.add(request.key)
            try:
                cheap = self.handlers.rough_flops(protocol.decode(request.frames, self.limits)) <= CHUNK_FLOPS
            except Exception:  # malformed: refused at once, cheaply
                cheap = True
            if cheap:
                self._pending.remove(request)
                self._send(request, self.handle(request.frames, request.key))

    def _send(self, request: Received, reply: Message) -> None:
        """Encode and send one reply, counted for its client."""
        key, frames = request.key, request.frames
        if "shm" in reply.args:
            reply.args["shm"] = self._offer_shm(request)
        try:
            # A compact request gets a compact reply (an error, or a reply it cannot say, a msgpack one).
            out = (protocol.encode_compact(reply) if frames and protocol.is_compact(frames[0]) else None) or protocol.encode(reply)
        except Exception as e:  # a reply that cannot be sent still gets an answer
            log.exception("cannot encode the reply to request %s", reply.id, extra={"client": key})
            reply = protocol.error_reply(reply.id, f"the server could not encode its reply: {type(e).__name__}")
            out = protocol.encode(reply)
        client = self.stats.client(key)
        client.requests += 1
        client.bytes_in += sum(frame_buffer(f).nbytes for f in frames)
        client.bytes_out += sum(frame_buffer(f).nbytes for f in out)
        client.errors += not reply.ok
        channel = request.channel
        if channel is None:
            self.socket.send_multipart([request.identity, *out], copy=False)
        elif channel.closed:
            pass  # dropped while its request waited: the client is gone or opened a new channel
        elif channel.fits(out):
            channel.post(out, channel.seq)
        else:
            if request.identity is not None:
                self.socket.send_multipart([request.identity, *out], copy=False)
            channel.post_over_zmq(channel.seq)

    def _offer_shm(self, request: Received) -> dict[str, Any] | None:
        """A new shared-memory channel for the client whose HELLO asked for one over ZeroMQ, else None."""
        if self.shm is None or request.channel is not None:  # over shm, a HELLO keeps the channel it came on
            return None
        try:
            return self.shm.offer(request.key, request.identity)
        except OSError as e:  # the client goes on over ZeroMQ
            log.warning("cannot open a shared-memory channel for %s: %s", request.key, e, extra={"client": request.key})
            return None

    def _batching(self) -> bool:
        # Recording and fault injection act per request in `handle`: with either on, everything goes through it.
        return self.batch and self.recorder is None and not self.fault_rate

    def handle_many(self, requests: Sequence[tuple[list[Any], str]]) -> Iterator[tuple[int, Message]]:
        """`handle` for several requests (frames, client): yields (index, reply) once per request, as each is ready.

        With batching on, plain float LINEAR requests for the same weights are answered from one
        product over their rows; every other request goes through `handle`, in order.
        """
        batches = self.batcher.batches(requests) if self._batching() and len(requests) > 1 else []
        first = {batch[0].index: batch for batch in batches}
        batched = {item.index for batch in batches for item in batch}
        for i, (frames, client) in enumerate(requests):
            if i in first:
                yield from self._answer_batch(first[i], requests)
            elif i not in batched:
                yield i, self.handle(frames, client)

    def _answer_batch(self, batch: list[BatchedLinear], requests: Sequence[tuple[list[Any], str]]) -> Iterator[tuple[int, Message]]:
        try:
            replies = self.batcher.answer(batch)
        except Exception as e:  # a wrong feature size, or the larger product failing: answer one by one
            log.info("a batch of %d LINEAR requests failed (%s: %s); answering them one by one", len(batch), type(e).__name__, e)
            replies = [self.handle(*requests[b.index]) for b in batch]
        yield from zip((b.index for b in batch), replies)

    def handle(self, frames: list[Any], client: str = "-") -> Message:
        """Frames of one request -> the reply. Never raises. `client` names the sender in logs."""
        outer, self._serving = self._serving, client
        try:
            return self._handle(frames, client)
        finally:
            self._serving = outer

    def _handle(self, frames: list[Any], client: str) -> Message:
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
            reply = self.handlers(msg)
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
        if self.shm is not None and (msg.op == "EMBED" or (msg.op in ("LINEAR", "LM_HEAD") and msg.tensors[0].is_floating_point())):
            self.warmer.answered(site_of(msg))  # a plain call (otp's products read other weights)
        if self.fastlane is not None and msg.op in ("EMBED", "LINEAR", "LM_HEAD"):
            self.fastlane.learn(frames, msg, reply)
        if msg.op == "HELLO" and self.shm is not None and msg.args.get("transport") == "shm":
            reply.args["shm"] = None  # asked for: `_send`, which knows the requester's socket identity, opens it
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
                log.warning("refused a client: %s", HANDSHAKE_ERRORS.get(event["value"], "it broke off the CURVE handshake (no keys, or a wrong server key?)"))

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; with `linger_ms`, replies still queued may go out until the context terminates."""
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
        self.socket.close(linger=linger_ms)
        if self._socket_file is not None:  # libzmq leaves it behind
            remove_socket_file(self._socket_file, self._socket_inode)
            self._socket_file = None
        if self.shm is not None:
            self.shm.close()
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


def _salvage_id(frames: list[Any]) -> int:
    """The request id of a message that failed validation, if its header yields one."""
    try:
        raw = frame_buffer(frames[0])
        if protocol.is_compact(raw) and raw.nbytes == protocol.COMPACT.size:
            return protocol.compact_id(raw)
        header = msgpack.unpackb(raw, raw=False)
        msg_id = header.get("id")
        return msg_id if isinstance(msg_id, int) and not isinstance(msg_id, bool) else -1
    except Exception:
        return -1
