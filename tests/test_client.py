"""Tests for tsqp.wire.client.RemoteBackend: results, stats, hooks, and bounded waits on bad servers."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import zmq

from tsqp.errors import ModelMismatch, RemoteError, ServerUnavailable
from tsqp.model.loading import LoadedModel
from tsqp.wire import protocol
from tsqp.wire.client import KnownCall, RemoteBackend, finite_floats
from tsqp.wire.shm import DATA, Layout

SLACK_S = 0.75  # poll slices are 200 ms; allow for a loaded machine


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def x_input(rows: int = 2, features: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def make_client() -> Iterator[Callable[..., RemoteBackend]]:
    clients: list[RemoteBackend] = []

    def make(endpoint: str, **kwargs: Any) -> RemoteBackend:
        kwargs.setdefault("timeout_s", 10.0)
        kwargs.setdefault("connect_timeout_s", 5.0)
        client = RemoteBackend(endpoint, **kwargs)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(tiny_server: Any, make_client: Callable[..., RemoteBackend]) -> RemoteBackend:
    return make_client(tiny_server.endpoint)


def free_tcp_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


# --- against a real server ---------------------------------------------------------


def test_hello_with_right_fingerprint(client: RemoteBackend, tiny: LoadedModel) -> None:
    info = client.hello(tiny.fingerprint)
    assert info["fingerprint"] == tiny.fingerprint
    assert info["config"]["hidden_size"] == 64 and info["config"]["n_layers"] == 3
    assert client.info == info


def test_hello_without_fingerprint(client: RemoteBackend, tiny: LoadedModel) -> None:
    assert client.hello()["fingerprint"] == tiny.fingerprint


def test_hello_with_wrong_fingerprint_raises(client: RemoteBackend, tiny: LoadedModel) -> None:
    wrong = "f" * 32
    assert wrong != tiny.fingerprint
    with pytest.raises((RemoteError, ModelMismatch)) as info:
        client.hello(wrong)
    assert "fingerprint" in str(info.value)
    # and the connection is still usable
    assert client.hello(tiny.fingerprint)["fingerprint"] == tiny.fingerprint


def test_linear_embed_lm_head_matmul_results(client: RemoteBackend, tiny: LoadedModel) -> None:
    client.hello(tiny.fingerprint)
    x = x_input(rows=3, seed=1)
    q, k, v = client.linear(1, ["q_proj", "k_proj", "v_proj"], x)
    close(q, x @ tiny.weights["layers.1.q_proj"].T)
    close(k, x @ tiny.weights["layers.1.k_proj"].T)
    close(v, x @ tiny.weights["layers.1.v_proj"].T)
    gate, up = client.linear(2, ("gate_proj", "up_proj"), x)
    close(gate, x @ tiny.weights["layers.2.gate_proj"].T)
    close(up, x @ tiny.weights["layers.2.up_proj"].T)
    (down,) = client.linear(0, ["down_proj"], torch.randn(3, 160))
    assert down.shape == (3, 64)

    ids = torch.tensor([[3, 1, 319]], dtype=torch.int32)  # embed converts to int64 itself
    assert torch.equal(client.embed(ids), tiny.weights["embed"][ids.long()])

    close(client.lm_head(x), x @ tiny.weights["lm_head"].T)

    a, b = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 16, 3)
    close(client.matmul(a, b), a @ b)


def test_wire_stats_count_round_trips_and_bytes(client: RemoteBackend, tiny: LoadedModel) -> None:
    client.hello(tiny.fingerprint)
    assert client.stats.round_trips == 1
    after_hello = client.stats.bytes_sent, client.stats.bytes_received
    x = x_input(seed=2)
    client.linear(0, ["o_proj"], x)
    client.embed(torch.tensor([1, 2, 3]))
    client.lm_head(x)
    s = client.stats
    assert s.round_trips == 3 + 1
    payload_sent = x.nbytes + 3 * 8 + x.nbytes
    payload_received = x.nbytes + 3 * 64 * 4 + 2 * 320 * 4
    sent, received = s.bytes_sent - after_hello[0], s.bytes_received - after_hello[1]
    assert payload_sent < sent < payload_sent + 3 * 256  # payload + three small headers
    assert payload_received < received < payload_received + 3 * 256
    assert s.round_trip_s > 0 and s.serialize_s > 0
    assert 0 < s.server_s <= s.round_trip_s
    d = s.as_dict()
    assert d["round_trips"] == 4 and d["wire_s"] == pytest.approx(max(s.round_trip_s - s.server_s, 0.0))


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_hot_calls_carry_the_compact_header_once_the_server_reads_it(tiny_server: Any, make_client: Callable[..., RemoteBackend],
                                                                      tiny: LoadedModel, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Before HELLO, and with a server of protocol 2.0, a call's header is msgpack; after a 2.1 server's HELLO, the fixed compact one."""
    x = x_input(seed=4)

    def header_bytes(client: RemoteBackend) -> int:
        before = client.stats.bytes_sent
        close(client.linear(0, ["o_proj"], x)[0], x @ tiny.weights["layers.0.o_proj"].T)
        return client.stats.bytes_sent - before - x.nbytes

    fresh = make_client(tiny_server.endpoint, transport=transport)
    assert header_bytes(fresh) != protocol.COMPACT.size
    fresh.hello(tiny.fingerprint)
    assert header_bytes(fresh) == protocol.COMPACT.size
    monkeypatch.setattr(protocol, "VERSION", (2, 0))  # what the server's HELLO says, and this side compares with
    old = make_client(tiny_server.endpoint, transport=transport)
    old.hello(tiny.fingerprint)
    assert header_bytes(old) != protocol.COMPACT.size


def test_server_stats_round_trip(client: RemoteBackend, tiny: LoadedModel) -> None:
    x = x_input(seed=3)
    for _ in range(3):
        client.linear(0, ["o_proj"], x)
    stats = client.server_stats()
    assert stats["ops"]["LINEAR"]["calls"] == 3
    assert stats["ops"]["LINEAR"]["bytes_in"] == 3 * x.nbytes
    assert stats["malformed"] == 0


def test_on_send_sees_every_tensor_with_its_op(tiny_server: Any, make_client: Callable[..., RemoteBackend], tiny: LoadedModel) -> None:
    seen: list[tuple[str, torch.Tensor]] = []
    client = make_client(tiny_server.endpoint, on_send=lambda op, t: seen.append((op, t)))
    client.hello(tiny.fingerprint)
    assert seen == []  # HELLO carries no tensors
    x = x_input(seed=4)
    ids = torch.tensor([5, 6])
    a, b = torch.randn(2, 3, 8), torch.randn(2, 8, 3)
    client.embed(ids)
    client.linear(0, ["q_proj", "k_proj", "v_proj"], x)
    client.lm_head(x)
    client.matmul(a, b)
    assert [op for op, _ in seen] == ["EMBED", "LINEAR", "LM_HEAD", "MATMUL", "MATMUL"]
    assert torch.equal(seen[0][1], ids)
    assert seen[1][1] is x and seen[2][1] is x
    assert seen[3][1] is a and seen[4][1] is b


def test_on_send_sees_tensors_before_serialization(tiny_server: Any, make_client: Callable[..., RemoteBackend]) -> None:
    # The hook runs before encode, so a hook that rejects a tensor stops it leaving.
    def refuse(op: str, t: torch.Tensor) -> None:
        raise PermissionError(f"{op} may not send")

    client = make_client(tiny_server.endpoint, on_send=refuse)
    with pytest.raises(PermissionError, match="LINEAR may not send"):
        client.linear(0, ["o_proj"], x_input())
    assert client.stats.bytes_sent == 0
    assert tiny_server.server.stats.ops["LINEAR"].calls == 0


def test_remote_error_does_not_poison_the_client(client: RemoteBackend, tiny: LoadedModel) -> None:
    x = x_input(seed=5)
    with pytest.raises(RemoteError, match="out of range"):
        client.linear(7, ["o_proj"], x)
    with pytest.raises(RemoteError, match="call group"):
        client.linear(0, ["q_proj", "o_proj"], x)
    with pytest.raises(RemoteError, match="features"):
        client.lm_head(torch.randn(2, 10))
    (y,) = client.linear(1, ["o_proj"], x)
    close(y, x @ tiny.weights["layers.1.o_proj"].T)
    assert client.hello(tiny.fingerprint)["fingerprint"] == tiny.fingerprint


def test_client_over_ipc(tiny: LoadedModel, make_client: Callable[..., RemoteBackend]) -> None:
    import shutil
    import tempfile

    from helpers import start_server

    folder = tempfile.mkdtemp(prefix="tsqp-", dir="/tmp")
    running = start_server(tiny, f"ipc://{folder}/c.sock")
    try:
        client = make_client(running.endpoint)
        assert client.hello(tiny.fingerprint)["fingerprint"] == tiny.fingerprint
        x = x_input(seed=6)
        close(client.linear(2, ["o_proj"], x)[0], x @ tiny.weights["layers.2.o_proj"].T)
    finally:
        running.close()
        shutil.rmtree(folder, ignore_errors=True)


# --- bad servers: bounded waits ---------------------------------------------------------


def test_no_server_raises_server_unavailable_within_connect_timeout(make_client: Callable[..., RemoteBackend]) -> None:
    client = make_client(free_tcp_endpoint(), timeout_s=30.0, connect_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="nothing answers") as info:
        client.hello("0" * 32)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 0.5 + SLACK_S
    assert client.endpoint in str(info.value)


DYING_SERVER = textwrap.dedent(
    """
    import os, sys, zmq
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:0")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    sock.recv_multipart()        # take one request ...
    sys.stdout.write("got\\n"); sys.stdout.flush()
    os._exit(0)                  # ... and die without answering
    """
)


def test_server_dying_mid_request_is_noticed_before_the_timeout(make_client: Callable[..., RemoteBackend]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", DYING_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("tcp://127.0.0.1:"), endpoint
        client = make_client(endpoint, timeout_s=30.0)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="went away"):
            client.linear(0, ["o_proj"], x_input())
        elapsed = time.monotonic() - started
        assert elapsed < 10.0
        assert proc.wait(timeout=5) == 0
        assert proc.stdout.readline().strip() == "got"  # it did receive the request
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()


class HangingServer:
    """A ROUTER that receives requests and never answers, while staying alive."""

    def __init__(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(50):
                self.sock.recv_multipart()
                self.received += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)


@pytest.fixture
def hanging_server() -> Iterator[HangingServer]:
    server = HangingServer()
    yield server
    server.close()


def test_hanging_server_gives_server_unavailable_after_timeout(hanging_server: HangingServer, make_client: Callable[..., RemoteBackend]) -> None:
    client = make_client(hanging_server.endpoint, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="in time"):
        client.lm_head(x_input())
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 1.0 + SLACK_S
    assert hanging_server.received == 1  # it was delivered; only the answer is missing


def test_hanging_hello_is_bounded_by_the_reply_timeout(hanging_server: HangingServer, make_client: Callable[..., RemoteBackend]) -> None:
    # Connected at once, so the connect timeout is not what stops it: the reply timeout is.
    client = make_client(hanging_server.endpoint, timeout_s=0.4, connect_timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="no answer to HELLO"):
        client.hello()
    assert time.monotonic() - started < 0.4 + SLACK_S


def test_server_alive_callback_cuts_the_wait_short(hanging_server: HangingServer, make_client: Callable[..., RemoteBackend]) -> None:
    client = make_client(hanging_server.endpoint, timeout_s=30.0, server_alive=lambda: False)
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="went away"):
        client.linear(0, ["o_proj"], x_input())
    assert time.monotonic() - started < 2.0


class SlowFirstServer:
    """Answers every request with its own id, but the first one only after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        first = True
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            identity, *frames = self.sock.recv_multipart()
            msg = protocol.decode(frames)
            if first:
                first = False
                if self.stop.wait(self.delay_s):
                    return
            self.sock.send_multipart([identity, *protocol.encode(protocol.reply(msg.id, {"answer_to": msg.id}))])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)


def test_late_reply_to_a_timed_out_request_is_not_taken_for_the_next_answer(make_client: Callable[..., RemoteBackend]) -> None:
    server = SlowFirstServer(delay_s=0.8)
    try:
        client = make_client(server.endpoint, timeout_s=0.3)
        with pytest.raises(ServerUnavailable):
            client.call("STATS", {})
        client.timeout_s = 5.0
        time.sleep(0.8)  # the late answer to request 1 is now waiting in the socket
        reply = client.call("STATS", {})
        assert reply.id == 2
        assert reply.args["answer_to"] == 2
    finally:
        server.close()


def test_ipv6_loopback_endpoint_works(tiny) -> None:  # noqa: ANN001
    from helpers import start_server

    from tsqp.wire.client import RemoteBackend

    running = start_server(tiny, "tcp://[::1]:0")
    client = RemoteBackend(running.endpoint, connect_timeout_s=3)
    try:
        assert running.endpoint.startswith("tcp://[::1]:")
        assert client.hello(tiny.fingerprint)["fingerprint"] == tiny.fingerprint
    finally:
        client.close()
        running.close()


# --- replies recognised by their header (compact, over shm) --------------------------------------


def known_call_case() -> tuple[KnownCall, bytes]:
    """The `KnownCall` of a compact LINEAR request (id 7) whose honest reply is 64 floats, and the first bytes
    (frame table, compact header) of that reply in a shared-memory area, compute_s 3e-5."""
    request = protocol.request("LINEAR", 7, {"layer": 0, "modules": ["o_proj"]}, [x_input(rows=1)])
    known = KnownCall.of(request, (1, 64), torch.float32, 1 << 16)
    reply = protocol.encode_compact(protocol.reply(7, {"compute_s": 3e-5}, [x_input(rows=1, seed=9)]))
    assert known is not None and reply is not None
    table = Layout.of([memoryview(f).nbytes for f in reply]).table
    return known, table + bytes(DATA - len(table)) + bytes(reply[0])


def test_an_honest_compact_reply_is_known_by_its_first_bytes() -> None:
    known, head = known_call_case()
    assert len(head) == known.reply_head and known.honest_compute_s(head, 7) == 3e-5


def test_any_other_reply_goes_the_checked_way() -> None:
    """Every byte of the frame table and the header but the compute time's, changed; another id; a body of another length;
    a compute time that is not a duration: none is taken as known (each then meets `_reply_to` and
    `_check_reply`, which name what is wrong)."""
    known, head = known_call_case()
    compute = DATA + protocol.COMPACT_COMPUTE
    for i in [*range(len(known.reply.table)), *range(DATA, compute), *range(compute + 8, len(head))]:
        damaged = bytearray(head)
        damaged[i] ^= 0x01
        assert known.honest_compute_s(bytes(damaged), 7) is None, i
    assert known.honest_compute_s(head, 8) is None
    shorter = Layout.of([protocol.COMPACT.size, 63 * 4]).table
    shorter += head[len(shorter) :]
    assert known.honest_compute_s(shorter, 7) is None
    for bad in (float("nan"), float("inf"), -1.0):
        assert known.honest_compute_s(head[:DATA] + bytes(protocol.stamped(head[DATA:], 7, bad)), 7) is None, bad


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_finite_floats_finds_every_nan_and_infinity(dtype: Any) -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in (0, 7, 575):
            values = np.ones(576, dtype)
            values[at] = bad
            assert not finite_floats(values), (bad, at)
    assert finite_floats(np.random.default_rng(0).standard_normal(576).astype(dtype))
    largest = float(np.finfo(dtype).max)
    with warnings.catch_warnings():  # its squares overflow: the elementwise look decides
        warnings.simplefilter("ignore", RuntimeWarning)
        assert finite_floats(np.array([largest, -largest], dtype))
