"""One server, several trusted runners at once: every client gets exactly its own answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
import zmq
from helpers import close, connected_dealer, make_tiny_model, private_folder, receive, send, start_server, x_input

from tsqp.model.linear import LinearWeights
from tsqp.model.loading import LoadedModel, load
from tsqp.server.server import Server
from tsqp.tee.generation import generate
from tsqp.tee.llama import Llama
from tsqp.wire import protocol
from tsqp.wire.client import RemoteBackend
from tsqp.wire.protocol import Limits, Message

PROMPTS = [list(range(start, start + 9)) for start in (3, 50, 120, 200)]


def single_client_tokens(model: LoadedModel, new_tokens: int) -> list[list[int]]:
    local = Llama(model.config, model.hf_config, model.norms(), LinearWeights(model.weights, model.config.n_layers))
    return [generate(local, p, new_tokens).token_ids for p in PROMPTS]


class Clients:
    """One thread per prompt, each a separate RemoteBackend (one DEALER per client, as separate runners have)."""

    def __init__(self, model: LoadedModel, endpoint: str, new_tokens: int, transport: str = "auto") -> None:
        self.model, self.endpoint, self.new_tokens, self.transport = model, endpoint, new_tokens, transport
        self.results: dict[int, list[int]] = {}
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(len(PROMPTS))]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        remote = RemoteBackend(self.endpoint, timeout_s=30, transport=self.transport)
        try:
            remote.hello(self.model.fingerprint)
            if self.transport != "auto":
                assert (remote.shm is not None) == (self.transport == "shm")
            llama = Llama(self.model.config, self.model.hf_config, self.model.norms(), remote)
            self.results[i] = generate(llama, PROMPTS[i], self.new_tokens).token_ids
        except BaseException as e:  # surfaced by tokens(): a thread's exception would otherwise vanish
            self.errors.append(e)
        finally:
            remote.close()

    def alive(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def tokens(self) -> list[list[int]]:
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors
        return [self.results[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("transport", ["zmq", "shm"])
@pytest.mark.parametrize("batch", [False, True], ids=["no-batch", "batch"])
def test_four_concurrent_clients_get_their_single_client_tokens(tiny: LoadedModel, batch: bool, transport: str) -> None:
    expected = single_client_tokens(tiny, 24)
    running = start_server(tiny, batch=batch)
    started = time.perf_counter()
    try:
        tokens = Clients(tiny, running.endpoint, 24, transport).tokens()
    finally:
        running.close()
    elapsed = time.perf_counter() - started
    assert tokens == expected
    print(f"4 clients: {4 * 24 / elapsed:.0f} tokens/s aggregate, {running.server.stats.batched_requests} requests batched")  # reported, not asserted
    linear_calls = running.server.stats.ops["LINEAR"].calls
    assert linear_calls == 4 * 24 * 4 * tiny.config.n_layers  # every client's every projection, none lost or doubled


# --- cross-client batching -----------------------------------------------------------

QKV = ["q_proj", "k_proj", "v_proj"]


def linear_frames(id: int, x: torch.Tensor, layer: int = 0, modules: list[str] = QKV, **args: object) -> list[Any]:
    return protocol.encode(protocol.request("LINEAR", id, {"layer": layer, "modules": modules, **args}, [x]))


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_clients_in_lockstep_are_batched_and_get_their_single_client_tokens(tiny: LoadedModel, transport: str) -> None:
    """Every round waits for a request of each client, so the LINEARs are batched across the four."""
    expected = single_client_tokens(tiny, 12)
    folder = private_folder() if transport == "shm" else None
    server = Server(tiny, "tcp://127.0.0.1:0", device="cpu", context=zmq.Context.instance(), batch=True, shm_folder=folder)
    try:
        clients = Clients(tiny, server.endpoint, 12, transport)
        while clients.alive():
            # Up to 2 s for every live client's next request (ms when healthy); a client that ends drops out.
            deadline = time.monotonic() + 2.0
            while server.receive_queued() < clients.alive() and time.monotonic() < deadline:
                server.socket.poll(5)
            if server.receive_queued():
                server.serve_round()
        tokens = clients.tokens()
    finally:
        server.close()
        if folder is not None:
            folder.rmdir()
    assert tokens == expected
    linear = server.stats.ops["LINEAR"]
    assert linear.calls == 4 * 12 * 4 * tiny.config.n_layers and linear.errors == 0  # none lost or doubled
    assert server.stats.batched_requests > 0 and server.stats.batches > 0
    print(f"lockstep: {server.stats.batched_requests} of {linear.calls} LINEAR requests batched, in {server.stats.batches} products")


def test_requests_queued_together_by_several_clients_are_one_product(tiny: LoadedModel) -> None:
    server = Server(tiny, "tcp://127.0.0.1:0", device="cpu", context=zmq.Context.instance(), batch=True)
    dealers = [next(connected_dealer(server.endpoint)) for _ in range(4)]
    try:
        inputs = [x_input(rows=1 + i, seed=i) for i in range(4)]
        for i, (sock, x) in enumerate(zip(dealers, inputs)):
            send(sock, linear_frames(100 + i, x))
        deadline = time.monotonic() + 10
        while server.receive_queued() < 4 and time.monotonic() < deadline:  # all four in before the round
            server.socket.poll(10)
        server.serve_round()
        replies = [receive(sock) for sock in dealers]
    finally:
        for sock in dealers:
            sock.close(linger=0)
        server.close()
    assert server.stats.batches == 1 and server.stats.batched_requests == 4
    for i, (r, x) in enumerate(zip(replies, inputs)):
        assert r.ok and r.id == 100 + i  # each client its own answer
        for name, y in zip(QKV, r.tensors[0].split([64, 32, 32], dim=-1)):
            close(y, x @ tiny.weights[f"layers.0.{name}"].T)
    shares = [r.args["compute_s"] for r in replies]
    assert all(s > 0 for s in shares)
    assert shares[3] == pytest.approx(4 * shares[0])  # split by rows: 4 rows cost 4 times 1 row
    assert server.stats.ops["LINEAR"].compute_s == pytest.approx(sum(shares))
    assert server.stats.ops["LINEAR"].calls == 4 and server.stats.requests == 4
    assert [c["requests"] for c in server.stats.as_dict()["clients"].values()] == [1, 1, 1, 1]


def round_of_requests() -> list[list[Any]]:
    """One round as several clients might send it: batchable LINEARs among everything that must not batch."""
    return [
        linear_frames(1, x_input(rows=1, seed=1)),
        linear_frames(2, x_input(rows=3, seed=2)),
        linear_frames(3, x_input(seed=3).reshape(1, 2, 64)),  # (..., K) inputs keep their leading shape
        linear_frames(4, x_input(rows=2, seed=4), layer=1),  # other weights
        linear_frames(5, x_input(rows=2, seed=5), layer=1),
        linear_frames(6, x_input(rows=2, seed=6, dtype=torch.float64)),  # another dtype: its own product
        linear_frames(7, x_input(rows=2, seed=7, dtype=torch.float64)),
        linear_frames(8, x_input(rows=1, features=63, seed=8), layer=2),  # wrong K: the product fails, each is refused
        linear_frames(9, x_input(rows=1, features=63, seed=9), layer=2),
        linear_frames(10, x_input(rows=1, seed=10), layer=9),  # no such layer
        linear_frames(11, x_input(rows=1, seed=11), extra=1),  # args beyond layer and modules
        linear_frames(12, torch.tensor([[1, 2]]), modules=["o_proj"]),  # int64 (otp) without its args
        [b"\xc1 not msgpack"],
        protocol.encode(protocol.request("EMBED", 14, {}, [torch.tensor([1, 2])])),
        linear_frames(15, x_input(rows=2, seed=15)),
    ]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_batching_is_on_by_default_on_cuda_only(tiny: LoadedModel, device: str) -> None:
    server = Server(tiny, "tcp://127.0.0.1:0", device=device)
    server.close()
    assert server.batch == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_batched_replies_equal_unbatched_replies(tiny: LoadedModel, device: str) -> None:
    batched, single = (Server(tiny, "tcp://127.0.0.1:0", device=device, batch=b) for b in (True, False))
    requests = [(frames, f"client{i}") for i, frames in enumerate(round_of_requests())]
    try:
        answers = list(batched.handle_many(requests))
        got = dict(answers)
        want = [single.handle(frames, key) for frames, key in requests]
    finally:
        batched.close()
        single.close()
    assert sorted(i for i, _ in answers) == list(range(len(requests)))  # each request answered exactly once
    assert batched.stats.batches == 3 and batched.stats.batched_requests == 8  # 1+2+3+15, 4+5, 6+7; 8+9 failed as one
    for i, w in enumerate(want):
        g = got[i]
        assert (g.id, g.ok, g.error) == (w.id, w.ok, w.error), i
        assert [t.shape for t in g.tensors] == [t.shape for t in w.tensors] and [t.dtype for t in g.tensors] == [t.dtype for t in w.tensors]
        for a, b in zip(g.tensors, w.tensors):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a, b = batched.stats.as_dict(), single.stats.as_dict()
    for key in ("requests", "malformed"):
        assert a[key] == b[key], key
    for op, s in b["ops"].items():
        for key in ("calls", "errors", "bytes_in", "bytes_out", "latency_samples"):
            assert a["ops"][op][key] == s[key], (op, key)


@pytest.mark.parametrize("setting", [{"fault_rate": 1.0, "fault_seed": 0}, {"record_dir": "recording"}])
def test_recording_or_fault_injection_turns_batching_off(tiny: LoadedModel, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, setting: dict[str, Any]) -> None:
    monkeypatch.chdir(tmp_path)
    server = Server(tiny, "tcp://127.0.0.1:0", device="cpu", batch=True, **setting)
    try:
        replies = list(server.handle_many([(linear_frames(i, x_input(rows=1, seed=i)), f"c{i}") for i in range(3)]))
    finally:
        server.close()
    assert len(replies) == 3 and server.stats.batches == 0  # per-request work happens in `handle` only


# --- fairness ------------------------------------------------------------------

LONG_CALLS = 60  # queued at once by one client; below MAX_PENDING
LONG_ROWS = 512  # a long prefill's worth of rows for the wide model's gate|up: ~20 ms on 2 cores
SHORT_CALLS = 10


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = make_tiny_model(tmp_path_factory.mktemp("wide"), hidden_size=512, intermediate_size=2048, num_hidden_layers=1,
                             num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    return load(folder, with_tokenizer=False)


def drain_replies(sock: zmq.Socket) -> list[Message]:
    replies = []
    while sock.poll(0):
        replies.append(protocol.decode(sock.recv_multipart(copy=False), expect_reply=True))
    return replies


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "no-batch"])
def test_a_client_with_many_long_calls_queued_does_not_starve_another(wide: LoadedModel, batch: bool) -> None:
    """Each short request waits for about one long call, however many the other client has queued.

    Judged against the server's own compute time of the long calls (not a speed target): serving the
    queue in arrival order, or batching one client's queue into one product, would make a short
    request wait for most of the 60.
    """
    running = start_server(wide, limits=Limits(max_tensor_elements=1 << 22), batch=batch)
    long_sock, short_sock = (next(connected_dealer(running.endpoint)) for _ in range(2))
    long_x = torch.randn(LONG_ROWS, 512, generator=torch.Generator().manual_seed(0))
    latencies: list[float] = []
    try:
        for i in range(LONG_CALLS):
            send(long_sock, linear_frames(i, long_x, modules=["gate_proj", "up_proj"]))
        # A few answers first: by then the whole queue has reached the server, which is at work on it.
        long_replies = [receive(long_sock, timeout_ms=30_000) for _ in range(5)]
        for j in range(SHORT_CALLS):
            modules = ["gate_proj", "up_proj"] if j % 2 else ["o_proj"]  # batched with a long call, and not
            started = time.perf_counter()
            send(short_sock, linear_frames(1000 + j, x_input(rows=1, features=512, seed=j), modules=modules))
            short = receive(short_sock, timeout_ms=30_000)
            latencies.append(time.perf_counter() - started)
            assert short.ok and short.id == 1000 + j, short.error
            long_replies += drain_replies(long_sock)
        while len(long_replies) < LONG_CALLS:
            long_replies.append(receive(long_sock, timeout_ms=30_000))
    finally:
        long_sock.close(linger=0)
        short_sock.close(linger=0)
        running.close()
    assert all(r.ok for r in long_replies) and sorted(r.id for r in long_replies) == list(range(LONG_CALLS))
    longest = max(r.args["compute_s"] for r in long_replies)
    bound = 3 * longest + 0.2  # the call in progress, perhaps the next, its own; plus scheduling on a busy machine
    print(f"short request latency max {1000 * max(latencies):.0f} ms; longest long call {1000 * longest:.0f} ms; bound {1000 * bound:.0f} ms")
    assert max(latencies) <= bound, [round(1000 * t) for t in latencies]
