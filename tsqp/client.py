"""The TEE's connection to `serve-gpu`: a `LinearBackend` whose products run remotely.

Every call is one round trip on a DEALER socket. Waiting is bounded: a server that
never answers, refuses the model, or dies mid-request turns into `ServerUnavailable`
within the deadline instead of a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq
import zmq.utils.monitor

from tsqp import protocol
from tsqp.errors import ModelMismatch, ProtocolError, RemoteError, ServerUnavailable
from tsqp.protocol import Message

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@dataclass
class WireStats:
    """What the client spent on the server, summed over calls."""

    round_trips: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    round_trip_s: float = 0.0  # request sent -> reply received
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
    lets the owner of a private server report its death at once.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        context: zmq.Context | None = None,
        on_send: Callable[[str, torch.Tensor], None] | None = None,
        server_alive: Callable[[], bool] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.on_send = on_send
        self.server_alive = server_alive
        self.stats = WireStats()
        self.info: dict[str, Any] = {}
        self._next_id = 0
        self.socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Connection events tell us a server died without waiting for the deadline.
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._connected = False
        self._was_connected = False
        self.socket.connect(endpoint)

    # --- LinearBackend -------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.call("EMBED", {}, [token_ids.to(torch.int64)]).tensors[0]

    def linear(self, layer: int, modules: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
        return self.call("LINEAR", {"layer": layer, "modules": list(modules)}, [x]).tensors

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.call("LM_HEAD", {}, [x]).tensors[0]

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.call("MATMUL", {}, [a, b]).tensors[0]

    # --- session ---------------------------------------------------------------

    def hello(self, fingerprint: str | None = None) -> dict[str, Any]:
        """Check that a compatible server holding the same model answers."""
        try:
            reply = self.call("HELLO", {"fingerprint": fingerprint} if fingerprint else {}, timeout_s=self.connect_timeout_s)
        except RemoteError as e:
            if "fingerprint" in str(e):
                raise ModelMismatch(f"the server at {self.endpoint} holds a different model: {e}") from None
            raise
        self.info = reply.args
        if fingerprint is not None and reply.args.get("fingerprint") != fingerprint:
            raise ModelMismatch(f"the server at {self.endpoint} holds a different model (fingerprint {reply.args.get('fingerprint')}, ours {fingerprint})")
        return reply.args

    def server_stats(self) -> dict[str, Any]:
        return self.call("STATS", {}).args

    def call(self, op: str, args: dict[str, Any], tensors: Sequence[torch.Tensor] = (), timeout_s: float | None = None) -> Message:
        self._next_id += 1
        request = protocol.request(op, self._next_id, args, tensors)
        if self.on_send is not None:
            for t in request.tensors:
                self.on_send(op, t)
        t0 = time.perf_counter()
        frames = protocol.encode(request)
        t1 = time.perf_counter()
        self.socket.send_multipart(frames, copy=False)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            reply_frames = self._receive(op, deadline)
            t2 = time.perf_counter()
            try:
                reply = protocol.decode(reply_frames, expect_reply=True)
            except ProtocolError as e:
                raise ProtocolError(f"malformed reply to {op} from {self.endpoint}: {e}") from None
            if reply.id in (request.id, -1):
                break  # anything else is a late answer to a request that already timed out
        t3 = time.perf_counter()
        if not reply.ok:
            raise RemoteError(f"server refused {op}: {reply.error}")
        s = self.stats
        s.round_trips += 1
        s.bytes_sent += request.nbytes + len(frames[0])
        s.bytes_received += reply.nbytes + len(reply_frames[0])
        s.round_trip_s += t2 - t1
        s.serialize_s += (t1 - t0) + (t3 - t2)
        compute = reply.args.get("compute_s")
        s.server_s += compute if isinstance(compute, float) else 0.0
        return reply

    def _receive(self, op: str, deadline: float) -> list[Any]:
        while True:
            # Blocking waits in short slices, so a dead server is noticed at once.
            if self.socket.poll(200):
                return self.socket.recv_multipart(copy=False)
            self._watch_connection()
            if (self._was_connected and not self._connected) or (self.server_alive is not None and not self.server_alive()):
                raise ServerUnavailable(f"the tsqp server at {self.endpoint} went away while answering {op}")
            if time.monotonic() > deadline:
                raise ServerUnavailable(
                    f"no answer to {op} from {self.endpoint} in time; is `tsqp serve-gpu` running there?"
                )

    def _watch_connection(self) -> None:
        """Follow connect/disconnect events (a restarted server reconnects by itself)."""
        while self._monitor.poll(0):
            event = zmq.utils.monitor.parse_monitor_message(self._monitor.recv_multipart())["event"]
            self._connected = event == zmq.EVENT_CONNECTED
            self._was_connected |= self._connected

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)
