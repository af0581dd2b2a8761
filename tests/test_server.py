"""Tests for tsqp.server: every op's numbers, and error replies that leave the server serving."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
import zmq

from conftest import start_server
from tsqp import protocol
from tsqp.models import LoadedModel
from tsqp.protocol import Limits, Message
from tsqp.server import Server

REPLY_TIMEOUT_MS = 2000  # generous: a healthy server answers these in milliseconds


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def dealer(tiny_server: Any) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(tiny_server.endpoint)
    yield sock
    sock.close(linger=0)


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
    return msgpack.packb({"v": [1, 0], "op": op, "id": id, "args": args or {}, "tensors": tensors or []}, use_bin_type=True)


def x_input(rows: int = 2, features: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_valid_linear_works(sock: zmq.Socket, tiny: LoadedModel, id: int = 999, layer: int = 0) -> None:
    """The server is still serving and still computes the right numbers."""
    x = x_input(seed=id)
    r = call(sock, "LINEAR", id, {"layer": layer, "modules": ["q_proj", "k_proj", "v_proj"]}, [x])
    assert r.ok, r.error
    assert r.id == id
    assert len(r.tensors) == 3
    for name, y in zip(("q_proj", "k_proj", "v_proj"), r.tensors):
        close(y, x @ tiny.weights[f"layers.{layer}.{name}"].T)


# --- correct numbers -------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
def test_linear_qkv_fused(dealer: zmq.Socket, tiny: LoadedModel, layer: int) -> None:
    x = x_input(rows=5, seed=layer)
    r = call(dealer, "LINEAR", 1, {"layer": layer, "modules": ["q_proj", "k_proj", "v_proj"]}, [x])
    assert r.ok, r.error
    assert r.id == 1
    assert [tuple(t.shape) for t in r.tensors] == [(5, 64), (5, 32), (5, 32)]
    for name, y in zip(("q_proj", "k_proj", "v_proj"), r.tensors):
        assert y.dtype == torch.float32
        close(y, x @ tiny.weights[f"layers.{layer}.{name}"].T)
    assert isinstance(r.args.get("compute_s"), float)


def test_linear_gate_up_fused(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    x = x_input(rows=3, seed=11)
    r = call(dealer, "LINEAR", 2, {"layer": 1, "modules": ["gate_proj", "up_proj"]}, [x])
    assert r.ok, r.error
    assert len(r.tensors) == 2
    close(r.tensors[0], x @ tiny.weights["layers.1.gate_proj"].T)
    close(r.tensors[1], x @ tiny.weights["layers.1.up_proj"].T)
    assert r.tensors[0].shape == (3, 160)


@pytest.mark.parametrize(("module", "features"), [("o_proj", 64), ("down_proj", 160)])
def test_linear_single_modules(dealer: zmq.Socket, tiny: LoadedModel, module: str, features: int) -> None:
    x = torch.randn(2, 4, features, generator=torch.Generator().manual_seed(3))  # batched input
    r = call(dealer, "LINEAR", 3, {"layer": 2, "modules": [module]}, [x])
    assert r.ok, r.error
    assert len(r.tensors) == 1
    assert r.tensors[0].shape == (2, 4, 64)
    close(r.tensors[0], x @ tiny.weights[f"layers.2.{module}"].T)


def test_linear_large_input_takes_the_torch_path(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    x = x_input(rows=40, seed=4)  # > SMALL_PRODUCT_ROWS rows: not the numpy fast path
    r = call(dealer, "LINEAR", 4, {"layer": 0, "modules": ["o_proj"]}, [x])
    assert r.ok, r.error
    close(r.tensors[0], x @ tiny.weights["layers.0.o_proj"].T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_linear_answers_in_the_input_dtype(dealer: zmq.Socket, tiny: LoadedModel, dtype: torch.dtype) -> None:
    x = x_input(seed=5, dtype=dtype)
    r = call(dealer, "LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [x])
    assert r.ok, r.error
    assert r.tensors[0].dtype == dtype
    expected = (x.float() @ tiny.weights["layers.0.o_proj"].T).to(dtype)
    torch.testing.assert_close(r.tensors[0], expected, rtol=2e-2, atol=2e-2)


def test_embed_returns_embedding_rows(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    ids = torch.tensor([[0, 5, 319], [7, 7, 1]], dtype=torch.int64)
    r = call(dealer, "EMBED", 6, {}, [ids])
    assert r.ok, r.error
    assert r.tensors[0].shape == (2, 3, 64)
    assert torch.equal(r.tensors[0], tiny.weights["embed"][ids])


def test_lm_head(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    x = x_input(rows=3, seed=7)
    r = call(dealer, "LM_HEAD", 7, {}, [x])
    assert r.ok, r.error
    assert r.tensors[0].shape == (3, 320)
    close(r.tensors[0], x @ tiny.weights["lm_head"].T)
    # lm_head is its own weight here (untied), not the embedding
    assert not torch.allclose(r.tensors[0], x @ tiny.weights["embed"].T)


def test_matmul_batched_4d(dealer: zmq.Socket) -> None:
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 4, 16, 6, generator=g)
    r = call(dealer, "MATMUL", 8, {}, [a, b])
    assert r.ok, r.error
    assert r.tensors[0].shape == (2, 4, 5, 6)
    close(r.tensors[0], a @ b)


def test_matmul_mismatched_shapes_refused(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    r = call(dealer, "MATMUL", 9, {}, [torch.zeros(2, 5, 16), torch.zeros(2, 15, 6)])
    assert not r.ok
    assert r.id == 9
    assert "compose" in r.error
    assert_valid_linear_works(dealer, tiny)


def test_hello_returns_fingerprint_and_config(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    r = call(dealer, "HELLO", 10, {"fingerprint": tiny.fingerprint})
    assert r.ok, r.error
    assert r.args["fingerprint"] == tiny.fingerprint
    assert r.args["config"] == vars(tiny.config)
    assert r.args["protocol"] == list(protocol.VERSION)
    assert set(r.args["ops"]) == set(protocol.OPS)
    assert ["q_proj", "k_proj", "v_proj"] in r.args["call_groups"]
    assert r.args["device"] == "cpu"
    # and without a fingerprint, the server just says who it is
    r2 = call(dealer, "HELLO", 11)
    assert r2.ok and r2.args["fingerprint"] == tiny.fingerprint


def test_hello_with_wrong_fingerprint_is_refused(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    r = call(dealer, "HELLO", 12, {"fingerprint": "0" * 32})
    assert not r.ok
    assert r.id == 12
    assert "fingerprint" in r.error
    assert_valid_linear_works(dealer, tiny)


def test_stats_count_calls_errors_and_malformed(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    x = x_input()
    for i in range(2):
        assert call(dealer, "LINEAR", 20 + i, {"layer": 0, "modules": ["o_proj"]}, [x]).ok
    assert not call(dealer, "LINEAR", 22, {"layer": 9, "modules": ["o_proj"]}, [x]).ok
    assert call(dealer, "EMBED", 23, {}, [torch.tensor([1, 2])]).ok
    assert not rpc(dealer, [b"\xc1 not msgpack"]).ok
    assert not rpc(dealer, [raw_header(op="NOPE")]).ok
    r = call(dealer, "STATS", 24)
    assert r.ok, r.error
    ops, malformed = r.args["ops"], r.args["malformed"]
    assert malformed == 2
    assert ops["LINEAR"]["calls"] == 3
    assert ops["LINEAR"]["errors"] == 1
    assert ops["LINEAR"]["bytes_in"] == 3 * x.numel() * 4
    assert ops["LINEAR"]["bytes_out"] == 2 * x.numel() * 4
    assert ops["EMBED"]["calls"] == 1 and ops["EMBED"]["errors"] == 0
    assert ops["EMBED"]["bytes_out"] == 2 * 64 * 4
    assert ops["STATS"]["calls"] == 1
    assert "MATMUL" not in ops
    assert ops["LINEAR"]["compute_s"] > 0


# --- bad requests: an error reply naming the problem, then business as usual ------------

BAD_REQUESTS: list[Any] = [
    pytest.param(lambda: [b"\x00\xc1\xff garbage \x93"], "msgpack", -1, id="garbage-header"),
    pytest.param(lambda: [pickle.dumps({"v": [1, 0], "op": "HELLO", "id": 5})], "msgpack", -1, id="pickle-header"),
    pytest.param(lambda: [msgpack.packb(["LINEAR", 5])], "map", -1, id="header-not-map"),
    pytest.param(lambda: [msgpack.packb({"v": [9, 0], "op": "HELLO", "id": 5})], "version", 5, id="wrong-version"),
    pytest.param(lambda: [raw_header(op="SHUTDOWN")], "unknown op", 5, id="unknown-op"),
    pytest.param(lambda: [raw_header(op="REPLY")], "unknown op", 5, id="reply-as-request"),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "k_proj", "v_proj"]}, [torch.ones(2, 64, dtype=torch.int32)])),
        "floating point", 5, id="int32-activations",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LM_HEAD", 5, {}, [torch.ones(2, 64, dtype=torch.int64)])),
        "floating point", 5, id="int64-lm-head",
    ),
    pytest.param(lambda: protocol.encode(protocol.request("EMBED", 5, {}, [torch.ones(3)])), "int64", 5, id="float-token-ids"),
    pytest.param(lambda: protocol.encode(protocol.request("EMBED", 5, {}, [torch.ones(3, dtype=torch.int32)])), "int64", 5, id="int32-token-ids"),
    pytest.param(lambda: protocol.encode(protocol.request("EMBED", 5, {}, [torch.tensor([1, 320])])), "out of range", 5, id="token-id-too-big"),
    pytest.param(lambda: protocol.encode(protocol.request("EMBED", 5, {}, [torch.tensor([-1])])), "out of range", 5, id="token-id-negative"),
    pytest.param(lambda: [raw_header(tensors=[["float32", [2, 64]]]), b"\0" * 100], "bytes", 5, id="shape-vs-bytes"),
    pytest.param(lambda: [raw_header(tensors=[["float32", [2, 64]]])], "tensor", 5, id="missing-frame"),
    pytest.param(lambda: [raw_header(tensors=[["uint8", [4]]]), b"\0" * 4], "dtype", 5, id="dtype-uint8"),
    pytest.param(lambda: [raw_header(tensors=[["object", [1]]]), b"\0" * 8], "dtype", 5, id="dtype-object"),
    pytest.param(lambda: [raw_header(tensors=[["float32", [-2, 64]]]), b""], "non-negative", 5, id="negative-dim"),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 3, "modules": ["q_proj", "k_proj", "v_proj"]}, [torch.ones(2, 64)])),
        "out of range", 5, id="layer-too-big",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": -1, "modules": ["o_proj"]}, [torch.ones(2, 64)])),
        "out of range", 5, id="layer-negative",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": "0", "modules": ["o_proj"]}, [torch.ones(2, 64)])),
        "layer", 5, id="layer-a-string",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"modules": ["o_proj"]}, [torch.ones(2, 64)])),
        "layer", 5, id="layer-missing",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "k_proj", "w_proj"]}, [torch.ones(2, 64)])),
        "unknown module", 5, id="unknown-module",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "o_proj"]}, [torch.ones(2, 64)])),
        "call group", 5, id="not-a-call-group",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["k_proj", "q_proj", "v_proj"]}, [torch.ones(2, 64)])),
        "call group", 5, id="group-out-of-order",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": "o_proj"}, [torch.ones(2, 64)])),
        "modules", 5, id="modules-a-string",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [torch.ones(2, 64), torch.ones(2, 64)])),
        "tensor", 5, id="two-tensors-for-linear",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]})),
        "tensor", 5, id="no-tensor-for-linear",
    ),
    pytest.param(lambda: protocol.encode(protocol.request("MATMUL", 5, {}, [torch.ones(2, 2)])), "tensor", 5, id="one-tensor-for-matmul"),
    pytest.param(lambda: protocol.encode(protocol.request("HELLO", 5, {}, [torch.ones(2)])), "tensor", 5, id="tensor-for-hello"),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "k_proj", "v_proj"]}, [torch.ones(2, 32)])),
        "features", 5, id="wrong-feature-size",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["down_proj"]}, [torch.ones(2, 64)])),
        "features", 5, id="wrong-feature-size-down",
    ),
    pytest.param(lambda: protocol.encode(protocol.request("LM_HEAD", 5, {}, [torch.ones(2, 63)])), "features", 5, id="lm-head-features"),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [torch.tensor(1.0)])),
        "dimension", 5, id="0-d-activation",
    ),
]


@pytest.mark.parametrize(("make_frames", "keyword", "reply_id"), BAD_REQUESTS)
def test_bad_request_gets_error_reply_and_server_keeps_serving(
    dealer: zmq.Socket, tiny: LoadedModel, make_frames: Any, keyword: str, reply_id: int
) -> None:
    r = rpc(dealer, make_frames())
    assert r.ok is False
    assert r.id == reply_id
    assert r.tensors == []
    assert keyword.lower() in r.error.lower(), r.error
    assert_valid_linear_works(dealer, tiny)


@pytest.mark.parametrize(
    "tensors_spec",
    [
        pytest.param([["float32"], [1]], id="dtype-a-list"),
        pytest.param([{"x": 1}, [1]], id="dtype-a-map"),
        pytest.param(["float32", [0, 2**63]], id="empty-with-2^63-dim"),
        pytest.param(["float32", [0, 2**40, 2**40]], id="empty-with-2^80-elements"),
    ],
)
def test_hostile_tensor_specs_do_not_kill_the_server(dealer: zmq.Socket, tiny: LoadedModel, tensors_spec: list[Any]) -> None:
    # Server.handle only catches ProtocolError from decode: any other exception escapes
    # serve_one and ends the serving thread, so nothing answers any more.
    r = rpc(dealer, [raw_header(tensors=[tensors_spec]), b"\0" * 4 if tensors_spec[1] == [1] else b""], timeout_ms=1000)
    assert r.ok is False
    assert r.id == 5
    assert_valid_linear_works(dealer, tiny)


def test_handle_never_raises_on_hostile_specs(tiny: LoadedModel) -> None:
    server = Server(tiny, "inproc://tsqp-test-handle-hostile", device="cpu")
    try:
        for spec, frame in [([["float32"], [1]], b"\0" * 4), (["float32", [0, 2**63]], b"")]:
            reply = server.handle([raw_header(tensors=[spec]), frame])
            assert reply.ok is False and reply.error
        assert server.stats.malformed == 2
    finally:
        server.close()


def test_handle_directly(tiny: LoadedModel) -> None:
    server = Server(tiny, "inproc://tsqp-test-handle", device="cpu")
    try:
        x = x_input(seed=30)
        good = server.handle(protocol.encode(protocol.request("LINEAR", 1, {"layer": 1, "modules": ["o_proj"]}, [x])))
        assert good.ok and good.id == 1
        close(good.tensors[0], x @ tiny.weights["layers.1.o_proj"].T)
        bad = server.handle([b"\xc1"])
        assert (bad.ok, bad.id) == (False, -1)
        assert "bad request" in bad.error
        assert server.stats.malformed == 1
        assert server.stats.ops["LINEAR"].calls == 1
    finally:
        server.close()


# --- limits -------------------------------------------------------------------------------

SMALL = Limits(max_tensor_elements=1000, max_message_bytes=4096)


@pytest.fixture
def small_server(tiny: LoadedModel) -> Iterator[Any]:
    running = start_server(tiny, limits=SMALL)
    yield running
    running.close()


@pytest.fixture
def small_dealer(small_server: Any) -> Iterator[zmq.Socket]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(small_server.endpoint)
    yield sock
    sock.close(linger=0)


def test_server_reports_its_limits(small_dealer: zmq.Socket) -> None:
    r = call(small_dealer, "HELLO", 1)
    assert r.ok and r.args["limits"]["max_tensor_elements"] == 1000


@pytest.mark.parametrize(
    ("make_frames", "keyword"),
    [
        # 1024 elements > 1000, 4096 bytes: fits the byte limit, not the element limit
        pytest.param(lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [torch.ones(16, 64)])), "elements", id="too-many-elements"),
        # 2 * 640 elements, 5120 bytes > 4096 (and < libzmq's 2x hard cap, so it reaches decode)
        pytest.param(lambda: protocol.encode(protocol.request("MATMUL", 5, {}, [torch.ones(10, 64), torch.ones(64, 10)])), "exceeds", id="too-many-bytes"),
        pytest.param(lambda: [raw_header(tensors=[["float32", [2**20]]]), b"\0" * 16], "elements", id="declared-huge-sent-little"),
    ],
)
def test_oversized_request_is_refused_and_server_keeps_serving(
    small_dealer: zmq.Socket, tiny: LoadedModel, make_frames: Any, keyword: str
) -> None:
    r = rpc(small_dealer, make_frames())
    assert r.ok is False
    assert keyword in r.error, r.error
    assert_valid_linear_works(small_dealer, tiny)


@pytest.mark.parametrize(
    "make_request",
    [
        # inputs well within the limits, products far beyond: 400 x 400 = 160000 elements
        pytest.param(lambda: protocol.request("MATMUL", 5, {}, [torch.ones(400, 1), torch.ones(1, 400)]), id="matmul-outer-product"),
        pytest.param(lambda: protocol.request("MATMUL", 5, {}, [torch.ones(100, 1, 1, 1), torch.ones(1, 100, 1, 1)]), id="matmul-broadcast"),
        pytest.param(lambda: protocol.request("EMBED", 5, {}, [torch.zeros(500, dtype=torch.int64)]), id="embed-many-ids"),
        pytest.param(lambda: protocol.request("LM_HEAD", 5, {}, [torch.ones(10, 64)]), id="lm-head-many-rows"),
    ],
)
def test_reply_larger_than_limits_is_refused(small_dealer: zmq.Socket, tiny: LoadedModel, make_request: Any) -> None:
    # Limits promise that anything larger is refused before it is allocated; a small
    # request whose *result* is huge (quadratic for MATMUL, x hidden_size for EMBED,
    # x vocab/hidden for LM_HEAD) must be refused too, or one request can exhaust memory.
    r = rpc(small_dealer, protocol.encode(make_request()))
    assert r.ok is False, f"server computed a {r.tensors[0].numel()}-element result past max_tensor_elements=1000"
    assert any(k in r.error.lower() for k in ("limit", "element", "large", "exceed")), r.error
    assert_valid_linear_works(small_dealer, tiny)


# --- many clients ---------------------------------------------------------------------------


def test_interleaved_clients_get_their_own_replies(tiny_server: Any, tiny: LoadedModel) -> None:
    ctx = zmq.Context.instance()
    socks = [ctx.socket(zmq.DEALER) for _ in range(3)]
    try:
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(tiny_server.endpoint)
        sent: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in range(len(socks))}
        for round_ in range(4):  # A1 B1 C1 A2 B2 C2 ... all in flight before any reply is read
            for i, s in enumerate(socks):
                req_id = 100 * (i + 1) + round_
                x = x_input(seed=req_id)
                send(s, protocol.encode(protocol.request("LINEAR", req_id, {"layer": round_ % 3, "modules": ["o_proj"]}, [x])))
                sent[i].append((req_id, x))
        for i, s in enumerate(socks):
            for round_, (req_id, x) in enumerate(sent[i]):
                r = receive(s)
                assert r.ok, r.error
                assert r.id == req_id
                close(r.tensors[0], x @ tiny.weights[f"layers.{round_ % 3}.o_proj"].T)
            assert s.poll(50) == 0  # nothing else arrived for this client
    finally:
        for s in socks:
            s.close(linger=0)


def test_a_client_disconnecting_mid_request_does_not_hurt_the_server(tiny_server: Any, tiny: LoadedModel) -> None:
    ctx = zmq.Context.instance()
    gone = ctx.socket(zmq.DEALER)
    gone.setsockopt(zmq.LINGER, 0)
    gone.connect(tiny_server.endpoint)
    send(gone, protocol.encode(protocol.request("LM_HEAD", 1, {}, [x_input(rows=8)])))
    gone.close(linger=0)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(tiny_server.endpoint)
    try:
        assert_valid_linear_works(sock, tiny)
    finally:
        sock.close(linger=0)


def test_server_on_ipc_endpoint(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> None:
    import tempfile

    folder = tempfile.mkdtemp(prefix="tsqp-", dir="/tmp")  # short: ipc paths are limited to ~100 bytes
    running = start_server(tiny, f"ipc://{folder}/s.sock")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert running.endpoint.startswith("ipc://")
        sock.connect(running.endpoint)
        assert_valid_linear_works(sock, tiny)
    finally:
        sock.close(linger=0)
        running.close()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
