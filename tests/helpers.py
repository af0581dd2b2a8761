"""Shared test helpers: tiny random LLaMA models, servers in a thread, and raw DEALER sockets to talk to them.

Test files import these from here (`from helpers import ...`), never from one another;
conftest.py holds only the fixtures.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq
from transformers import LlamaConfig, LlamaForCausalLM

from tsqp.model.linear import LinearWeights
from tsqp.model.loading import LoadedModel
from tsqp.server.server import Server
from tsqp.shields.config import ShieldConfig
from tsqp.tee.llama import Llama
from tsqp.tee.session import Session, shielded
from tsqp.wire import protocol
from tsqp.wire.client import RemoteBackend
from tsqp.wire.protocol import Message
from tsqp.wire.shm import Channel, Spinner

# --- tiny models ---------------------------------------------------------------------------

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            initializer_range=0.15)  # large enough that greedy choices are not near-ties  # fmt: skip


def make_tiny_model(folder: Path, seed: int = 0, **overrides: object) -> Path:
    """Save a random LLaMA (grouped-query attention by default) as an HF folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return folder


def shielded_session(model: LoadedModel, endpoint: str, shield: str, verify: bool | None = None, **settings: Any) -> Session:
    """A session to `endpoint` behind `shield` (verification: the shield's default unless given; other `ShieldConfig` settings)."""
    remote = RemoteBackend(endpoint, timeout_s=30)
    remote.hello(model.fingerprint)
    return Session(model, shielded(remote, model, ShieldConfig(shield, verify, allow_broken=True, **settings)))  # tests compare every shield


def local_llama(model: LoadedModel, **kwargs: object) -> Llama:
    """The all-in-TEE baseline: a Llama whose products run in-process on `LinearWeights`."""
    backend = LinearWeights(model.weights, model.config.n_layers)
    return Llama(model.config, model.hf_config, model.norms(), backend, **kwargs)


# --- servers in a background thread ---------------------------------------------------------


class RunningServer:
    def __init__(self, server: Server, thread: threading.Thread, stop: threading.Event) -> None:
        self.server, self.thread, self.stop = server, thread, stop
        self.endpoint = server.endpoint

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()
        if self.server.shm is not None:
            self.server.shm.folder.rmdir()  # empty: closing the server removed what its channels left


def private_folder() -> Path:
    """A fresh folder of mode 0700 (tempfile makes them so), for shared-memory channels."""
    return Path(tempfile.mkdtemp(prefix="tsqp-test-shm-"))


def start_server(model: LoadedModel, endpoint: str = "tcp://127.0.0.1:0", **kwargs: object) -> RunningServer:
    """A real ROUTER server in a background thread; the OS picks the port. It offers shared memory
    (in a fresh private folder) unless `shm_folder=None` is passed."""
    kwargs.setdefault("shm_folder", private_folder())
    server = Server(model, endpoint, device="cpu", context=zmq.Context.instance(), **kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    return RunningServer(server, thread, stop)


# --- raw DEALER sockets ---------------------------------------------------------------------

REPLY_TIMEOUT_MS = 10_000  # generous: a healthy server answers in milliseconds, one took over 2 s in a full run on 2 cores


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def connected_dealer(endpoint: str) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    yield sock
    sock.close(linger=0)


class ShmDealer:
    """A raw client whose requests travel through a shared-memory channel (negotiated at HELLO on its
    DEALER socket). It offers the DEALER calls the tests use (send_multipart, poll, recv_multipart),
    so every raw-socket test can run over either transport: each request is one round trip at once,
    its reply queued here until received."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        hello = protocol.encode(protocol.request("HELLO", 0, {"transport": "shm"}))
        self.sock.send_multipart(hello)
        assert self.sock.poll(REPLY_TIMEOUT_MS), "no HELLO reply"
        offer = protocol.decode(self.sock.recv_multipart(), expect_reply=True).args["shm"]
        self.channel = Channel.attach(offer)
        self.replies: deque[list[Any]] = deque()

    def send_multipart(self, frames: list[Any], copy: bool = False) -> None:
        channel = self.channel
        if not channel.fits(frames):
            self.sock.send_multipart(frames, copy=copy)
            return
        channel.seq += 1
        channel.post(frames, channel.seq)
        channel.wait(channel.seq, Spinner(0.0), time.monotonic() + REPLY_TIMEOUT_MS / 1000, lambda: None)
        frames = channel.read()
        if frames is not None:
            self.replies.append([bytes(f) for f in frames])  # the next request reuses the area

    def poll(self, timeout_ms: int | None = None) -> int:
        return 1 if self.replies else self.sock.poll(timeout_ms)

    def recv_multipart(self, copy: bool = True) -> list[Any]:
        return self.replies.popleft() if self.replies else self.sock.recv_multipart(copy=copy)

    def close(self, linger: int = 0) -> None:
        self.channel.close()
        self.sock.close(linger=linger)


def raw_client(endpoint: str, transport: str) -> Iterator[Any]:
    """A DEALER socket (zmq) or its shared-memory stand-in (shm), closed after use."""
    if transport == "zmq":
        yield from connected_dealer(endpoint)
        return
    client = ShmDealer(endpoint)
    try:
        yield client
    finally:
        client.close()


def send(sock: zmq.Socket, frames: list[Any]) -> None:
    sock.send_multipart(frames, copy=False)


def receive(sock: zmq.Socket, timeout_ms: int = REPLY_TIMEOUT_MS) -> Message:
    assert sock.poll(timeout_ms), "server did not answer (did it die?)"
    return protocol.decode(sock.recv_multipart(copy=False), expect_reply=True)


def rpc(sock: zmq.Socket, frames: list[Any], timeout_ms: int = REPLY_TIMEOUT_MS) -> Message:
    send(sock, frames)
    return receive(sock, timeout_ms)


def call(sock: zmq.Socket, op: str, id: int, args: dict[str, Any] | None = None, tensors: list[torch.Tensor] | None = None) -> Message:
    return rpc(sock, protocol.encode(protocol.request(op, id, args, tensors or [])))


def raw_header(op: str = "LINEAR", id: int = 5, args: dict[str, Any] | None = None, tensors: list[Any] | None = None) -> bytes:
    return msgpack.packb({"v": list(protocol.VERSION), "op": op, "id": id, "args": args or {}, "tensors": tensors or []}, use_bin_type=True)


def x_input(rows: int = 2, features: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_valid_linear_works(sock: zmq.Socket, tiny: LoadedModel, id: int = 999, layer: int = 0) -> None:
    """The server is still serving and still computes the right numbers."""
    x = x_input(seed=id)
    r = call(sock, "LINEAR", id, {"layer": layer, "modules": ["q_proj", "k_proj", "v_proj"]}, [x])
    assert r.ok, r.error
    assert r.id == id
    assert len(r.tensors) == 1
    for name, y in zip(("q_proj", "k_proj", "v_proj"), r.tensors[0].split([64, 32, 32], dim=-1)):
        close(y, x @ tiny.weights[f"layers.{layer}.{name}"].T)


# --- a hostile server -----------------------------------------------------------------------

HOT_OPS = ("EMBED", "LINEAR", "MATMUL", "LM_HEAD")
Tamper = Callable[[Message, Message], list[Any]]  # (request, honest reply) -> the frames sent instead


class TamperingProxy:
    """A hostile server: a ROUTER that forwards each request to a real server and rewrites its replies
    to the hot ops with `tamper` (HELLO, STATS and HEALTH pass untouched)."""

    def __init__(self, upstream: str, tamper: Tamper) -> None:
        self.upstream, self.tamper = upstream, tamper
        self.stop = threading.Event()
        self.bound = threading.Event()
        self.endpoint = ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.bound.wait(5)

    def _run(self) -> None:
        context = zmq.Context.instance()
        front, back = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
        for sock in (front, back):
            sock.setsockopt(zmq.LINGER, 0)
        front.bind("tcp://127.0.0.1:0")
        self.endpoint = front.getsockopt_string(zmq.LAST_ENDPOINT)
        back.connect(self.upstream)
        self.bound.set()
        try:
            while not self.stop.is_set():
                if not front.poll(50):
                    continue
                identity, *frames = front.recv_multipart()
                back.send_multipart(frames)
                if not back.poll(10_000):
                    continue
                reply = back.recv_multipart()
                request = protocol.decode(frames)
                if request.op in HOT_OPS:
                    reply = self.tamper(request, protocol.decode(reply, expect_reply=True))
                if reply:
                    front.send_multipart([identity, *reply])
        finally:
            front.close(linger=0)
            back.close(linger=0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
