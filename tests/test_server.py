"""Tests for tsqp.server (loop, handlers, stats): every op's numbers, and error replies that leave the server serving."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
import zmq
from helpers import ShmDealer, assert_valid_linear_works, call, close, connected_dealer, raw_client, raw_header, receive, rpc, send, start_server, x_input

from tsqp.model.loading import LoadedModel
from tsqp.server.server import Server
from tsqp.server.stats import client_key
from tsqp.wire import protocol
from tsqp.wire.protocol import Limits


@pytest.fixture(params=["zmq", "shm"])
def dealer(tiny_server: Any, request: pytest.FixtureRequest) -> Iterator[zmq.Socket]:
    """A raw client of the tiny server; every test that takes it runs over both transports."""
    yield from raw_client(tiny_server.endpoint, request.param)


OTP_ARGS = {"p": (1 << 31) - 1, "limb_bits": 8, "weight_bits": 12}


# --- correct numbers -------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 2])
def test_linear_qkv_fused(dealer: zmq.Socket, tiny: LoadedModel, layer: int) -> None:
    x = x_input(rows=5, seed=layer)
    r = call(dealer, "LINEAR", 1, {"layer": layer, "modules": ["q_proj", "k_proj", "v_proj"]}, [x])
    assert r.ok, r.error
    assert r.id == 1
    assert [tuple(t.shape) for t in r.tensors] == [(5, 128)]  # one tensor: q, k and v side by side
    assert r.tensors[0].dtype == torch.float32
    for name, y in zip(("q_proj", "k_proj", "v_proj"), r.tensors[0].split([64, 32, 32], dim=-1)):
        close(y, x @ tiny.weights[f"layers.{layer}.{name}"].T)
    assert isinstance(r.args.get("compute_s"), float)


def test_linear_gate_up_fused(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    x = x_input(rows=3, seed=11)
    r = call(dealer, "LINEAR", 2, {"layer": 1, "modules": ["gate_proj", "up_proj"]}, [x])
    assert r.ok, r.error
    assert len(r.tensors) == 1
    assert r.tensors[0].shape == (3, 320)
    gate, up = r.tensors[0].split(160, dim=-1)
    close(gate, x @ tiny.weights["layers.1.gate_proj"].T)
    close(up, x @ tiny.weights["layers.1.up_proj"].T)


@pytest.mark.parametrize(("module", "features"), [("o_proj", 64), ("down_proj", 160)])
def test_linear_single_modules(dealer: zmq.Socket, tiny: LoadedModel, module: str, features: int) -> None:
    x = torch.randn(2, 4, features, generator=torch.Generator().manual_seed(3))  # batched input
    r = call(dealer, "LINEAR", 3, {"layer": 2, "modules": [module]}, [x])
    assert r.ok, r.error
    assert len(r.tensors) == 1
    assert r.tensors[0].shape == (2, 4, 64)
    close(r.tensors[0], x @ tiny.weights[f"layers.2.{module}"].T)


def test_linear_large_input_takes_the_torch_path(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    x = x_input(rows=40, seed=4)  # several rows: not the one-row numpy fast path
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


def damaged_compact(offset: int, value: int) -> list[Any]:
    """A valid compact LINEAR request (id 5) with one byte of its header set to `value`."""
    frames = protocol.encode_compact(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [torch.ones(2, 64)]))
    assert frames is not None
    header = bytearray(frames[0])
    header[offset] = value
    return [bytes(header), frames[1]]


BAD_REQUESTS: list[Any] = [
    pytest.param(lambda: [b"\x00\xc1\xff garbage \x93"], "msgpack", -1, id="garbage-header"),
    pytest.param(lambda: [pickle.dumps({"v": list(protocol.VERSION), "op": "HELLO", "id": 5})], "msgpack", -1, id="pickle-header"),
    pytest.param(lambda: damaged_compact(3, 0x80), "flags", 5, id="compact-unknown-flag"),
    pytest.param(lambda: damaged_compact(2, 9), "op code", 5, id="compact-unknown-op"),
    pytest.param(lambda: damaged_compact(1, 3), "version", 5, id="compact-next-major"),
    pytest.param(lambda: [msgpack.packb(["LINEAR", 5])], "map", -1, id="header-not-map"),
    pytest.param(lambda: [msgpack.packb({"v": [9, 0], "op": "HELLO", "id": 5})], "version", 5, id="wrong-version"),
    pytest.param(lambda: [raw_header(op="SHUTDOWN")], "unknown op", 5, id="unknown-op"),
    pytest.param(lambda: [raw_header(op="REPLY")], "unknown op", 5, id="reply-as-request"),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "k_proj", "v_proj"]}, [torch.ones(2, 64, dtype=torch.int32)])),
        "floating point",
        5,
        id="int32-activations",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LM_HEAD", 5, {}, [torch.ones(2, 64, dtype=torch.int64)])),
        "needs integer args p, limb_bits and weight_bits",
        5,
        id="otp-without-field",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LM_HEAD", 5, OTP_ARGS | {"p": 1 << 63}, [torch.ones(2, 64, dtype=torch.int64)])),
        "out of range",
        5,
        id="otp-p-too-big",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LM_HEAD", 5, OTP_ARGS | {"limb_bits": 40}, [torch.ones(2, 64, dtype=torch.int64)])),
        "too wide",
        5,
        id="otp-limbs-too-wide",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, OTP_ARGS | {"layer": 0, "modules": ["o_proj"]}, [torch.full((2, 64), -1, dtype=torch.int64)])),
        "[0, p)",
        5,
        id="otp-input-outside-the-field",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, OTP_ARGS | {"layer": 0, "modules": ["o_proj"]}, [torch.ones(2, 3, 64, dtype=torch.int64)])),
        "(rows, features)",
        5,
        id="otp-input-3d",
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
        "out of range",
        5,
        id="layer-too-big",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": -1, "modules": ["o_proj"]}, [torch.ones(2, 64)])),
        "out of range",
        5,
        id="layer-negative",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": "0", "modules": ["o_proj"]}, [torch.ones(2, 64)])),
        "layer",
        5,
        id="layer-a-string",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"modules": ["o_proj"]}, [torch.ones(2, 64)])),
        "layer",
        5,
        id="layer-missing",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "k_proj", "w_proj"]}, [torch.ones(2, 64)])),
        "unknown module",
        5,
        id="unknown-module",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "o_proj"]}, [torch.ones(2, 64)])),
        "call group",
        5,
        id="not-a-call-group",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["k_proj", "q_proj", "v_proj"]}, [torch.ones(2, 64)])),
        "call group",
        5,
        id="group-out-of-order",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": "o_proj"}, [torch.ones(2, 64)])),
        "modules",
        5,
        id="modules-a-string",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [torch.ones(2, 64), torch.ones(2, 64)])),
        "tensor",
        5,
        id="two-tensors-for-linear",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]})),
        "tensor",
        5,
        id="no-tensor-for-linear",
    ),
    pytest.param(lambda: protocol.encode(protocol.request("MATMUL", 5, {}, [torch.ones(2, 2)])), "tensor", 5, id="one-tensor-for-matmul"),
    pytest.param(lambda: protocol.encode(protocol.request("HELLO", 5, {}, [torch.ones(2)])), "tensor", 5, id="tensor-for-hello"),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["q_proj", "k_proj", "v_proj"]}, [torch.ones(2, 32)])),
        "features",
        5,
        id="wrong-feature-size",
    ),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["down_proj"]}, [torch.ones(2, 64)])),
        "features",
        5,
        id="wrong-feature-size-down",
    ),
    pytest.param(lambda: protocol.encode(protocol.request("LM_HEAD", 5, {}, [torch.ones(2, 63)])), "features", 5, id="lm-head-features"),
    pytest.param(
        lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [torch.tensor(1.0)])),
        "dimension",
        5,
        id="0-d-activation",
    ),
]


@pytest.mark.parametrize(("make_frames", "keyword", "reply_id"), BAD_REQUESTS)
def test_bad_request_gets_error_reply_and_server_keeps_serving(dealer: zmq.Socket, tiny: LoadedModel, make_frames: Any, keyword: str, reply_id: int) -> None:
    r = rpc(dealer, make_frames())
    assert r.ok is False
    assert r.id == reply_id
    assert r.tensors == []
    assert keyword.lower() in r.error.lower(), r.error
    assert_valid_linear_works(dealer, tiny)


@pytest.mark.parametrize(("make_frames", "keyword", "reply_id"), BAD_REQUESTS)
def test_a_bad_request_with_the_compact_header_gets_the_same_error_reply(
    dealer: zmq.Socket, tiny: LoadedModel, make_frames: Any, keyword: str, reply_id: int
) -> None:
    """Every bad request the compact header can say is refused as its msgpack form is: same id, same words."""
    frames = make_frames()
    try:
        compact = protocol.encode_compact(protocol.decode(frames))
    except Exception:
        compact = None  # not a well-formed message, or one the compact header cannot say
    if compact is None:
        return
    plain, fast = rpc(dealer, frames), rpc(dealer, compact)
    assert (fast.ok, fast.id, fast.error, fast.tensors) == (plain.ok, plain.id, plain.error, [])
    assert_valid_linear_works(dealer, tiny)


def test_bad_requests_with_the_compact_header_are_tested() -> None:
    """The test above compares most bad requests, not a handful."""
    sayable = 0
    for param in BAD_REQUESTS:
        try:
            sayable += protocol.encode_compact(protocol.decode(param.values[0]())) is not None
        except Exception:
            pass
    assert sayable >= 15, sayable


COMPACT_CALLS = [
    pytest.param("LINEAR", {"layer": 1, "modules": ["q_proj", "k_proj", "v_proj"]}, lambda: x_input(rows=3, seed=4)[None], id="linear"),
    pytest.param("LINEAR", {"layer": 2, "modules": ["down_proj"]}, lambda: x_input(rows=0, features=160), id="no-rows"),
    pytest.param("LINEAR", {**OTP_ARGS, "layer": 0, "modules": ["gate_proj", "up_proj"]}, lambda: torch.arange(128).view(2, 64) * 1000, id="otp"),
    pytest.param("EMBED", {}, lambda: torch.tensor([[3, 1, 4]]), id="embed"),
    pytest.param("LM_HEAD", {}, lambda: x_input(rows=1, seed=5), id="lm-head"),
]


@pytest.mark.parametrize(("op", "args", "make_x"), COMPACT_CALLS)
def test_a_compact_request_gets_a_compact_reply_with_the_same_numbers(dealer: zmq.Socket, op: str, args: dict[str, Any], make_x: Any) -> None:
    request = protocol.request(op, 11, args, [make_x()])
    compact = protocol.encode_compact(request)
    assert compact is not None
    send(dealer, compact)
    raw = dealer.recv_multipart() if dealer.poll(2000) else []
    assert raw and bytes(raw[0])[0] == protocol.COMPACT_MAGIC, "no compact reply"
    fast, plain = protocol.decode(raw, expect_reply=True), rpc(dealer, protocol.encode(request))
    assert fast.ok and plain.ok and fast.id == plain.id == 11
    assert set(fast.args) == set(plain.args) == {"compute_s"}
    assert torch.equal(fast.tensors[0], plain.tensors[0])


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
    yield from connected_dealer(small_server.endpoint)


def test_server_reports_its_limits(small_dealer: zmq.Socket) -> None:
    r = call(small_dealer, "HELLO", 1)
    assert r.ok and r.args["limits"]["max_tensor_elements"] == 1000


@pytest.mark.parametrize(
    ("make_frames", "keyword"),
    [
        # 1024 elements > 1000, 4096 bytes: fits the byte limit, not the element limit
        pytest.param(
            lambda: protocol.encode(protocol.request("LINEAR", 5, {"layer": 0, "modules": ["o_proj"]}, [torch.ones(16, 64)])),
            "elements",
            id="too-many-elements",
        ),
        # 2 * 640 elements, 5120 bytes > 4096 (and < libzmq's 2x hard cap, so it reaches decode)
        pytest.param(lambda: protocol.encode(protocol.request("MATMUL", 5, {}, [torch.ones(10, 64), torch.ones(64, 10)])), "exceeds", id="too-many-bytes"),
        pytest.param(lambda: [raw_header(tensors=[["float32", [2**20]]]), b"\0" * 16], "elements", id="declared-huge-sent-little"),
    ],
)
def test_oversized_request_is_refused_and_server_keeps_serving(small_dealer: zmq.Socket, tiny: LoadedModel, make_frames: Any, keyword: str) -> None:
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


# --- HEALTH ---------------------------------------------------------------------------------


def test_health_answers_uptime_requests_and_fingerprint(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    import time

    first = call(dealer, "HEALTH", 1)
    assert first.ok, first.error
    assert first.id == 1 and first.tensors == []
    assert first.args["status"] == "ok"
    assert first.args["fingerprint"] == tiny.fingerprint
    assert first.args["uptime_s"] > 0
    hello = isinstance(dealer, ShmDealer)  # its channel came with a HELLO
    assert first.args["requests"] == 1 + hello  # this one
    assert_valid_linear_works(dealer, tiny)
    assert not rpc(dealer, [b"\xc1"]).ok
    time.sleep(0.01)
    second = call(dealer, "HEALTH", 2)
    assert second.args["requests"] == 4 + hello  # health, linear, malformed, health
    assert second.args["uptime_s"] >= first.args["uptime_s"] + 0.01
    assert not call(dealer, "HEALTH", 3, {}, [torch.ones(1)]).ok  # no tensors taken


def test_remote_backend_health(tiny_server: Any, tiny: LoadedModel) -> None:
    from tsqp.wire.client import RemoteBackend

    backend = RemoteBackend(tiny_server.endpoint, timeout_s=5)
    try:
        h = backend.health()
        assert h["status"] == "ok" and h["fingerprint"] == tiny.fingerprint and h["requests"] == 1
        assert "HEALTH" in backend.hello(tiny.fingerprint)["ops"]
    finally:
        backend.close()


# --- STATS: latency percentiles and per-client counters ---------------------------------------


def test_latency_percentiles_come_from_a_bounded_ring_buffer() -> None:
    from tsqp.server.stats import LATENCY_SAMPLES, OpStats

    op = OpStats()
    assert op.as_dict()["p50_s"] is None and op.as_dict()["latency_samples"] == 0
    for _ in range(3000):  # old, slow samples: pushed out of the ring
        op.record(1.0)
    for i in range(1, LATENCY_SAMPLES + 1):  # 1..1024 ms
        op.record(i / 1000)
    assert len(op.latencies) == LATENCY_SAMPLES
    d = op.as_dict()
    assert d["latency_samples"] == LATENCY_SAMPLES
    assert d["p50_s"] == pytest.approx(0.512)
    assert d["p90_s"] == pytest.approx(0.922)
    assert d["p99_s"] == pytest.approx(1.014)


def test_stats_report_latency_percentiles_per_op(dealer: zmq.Socket, tiny: LoadedModel) -> None:
    for i in range(5):
        assert call(dealer, "LINEAR", 10 + i, {"layer": 0, "modules": ["o_proj"]}, [x_input()]).ok
    assert not call(dealer, "LINEAR", 20, {"layer": 7, "modules": ["o_proj"]}, [x_input()]).ok
    linear = call(dealer, "STATS", 30).args["ops"]["LINEAR"]
    assert linear["latency_samples"] == 6
    assert 0 < linear["p50_s"] <= linear["p90_s"] <= linear["p99_s"] <= linear["compute_s"]


def test_stats_count_per_client(tiny_server: Any, tiny: LoadedModel) -> None:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    a.setsockopt(zmq.ROUTING_ID, b"alice")
    b.setsockopt(zmq.ROUTING_ID, b"a-much-longer-client-identity")
    try:
        for s in (a, b):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(tiny_server.endpoint)
        x = x_input()
        sent = protocol.encode(protocol.request("LINEAR", 1, {"layer": 0, "modules": ["o_proj"]}, [x]))
        r = rpc(a, sent)
        assert r.ok
        bad = rpc(a, [b"\xc1 junk"])
        assert not rpc(a, protocol.encode(protocol.request("LINEAR", 2, {"layer": 9, "modules": ["o_proj"]}, [x]))).ok
        assert call(b, "HEALTH", 3).ok
        stats = call(b, "STATS", 4).args
        assert json.loads(json.dumps(stats)) == stats  # JSON- and msgpack-serializable
        clients = stats["clients"]
        assert set(clients) == {b"alice".hex(), client_key(b"a-much-longer-client-identity")}
        assert len(client_key(b"x" * 255)) == 16
        alice = clients[b"alice".hex()]
        assert alice["requests"] == 3 and alice["errors"] == 2
        reply_bytes = sum(len(bytes(f)) for f in protocol.encode(r)) + sum(len(bytes(f)) for f in protocol.encode(bad))
        assert alice["bytes_in"] == sum(len(bytes(f)) for f in sent) + len(b"\xc1 junk") + sum(len(bytes(f)) for f in sent)
        assert alice["bytes_out"] > reply_bytes  # and the third reply's
        assert alice["bytes_out"] < reply_bytes + 200
        assert clients[client_key(b"a-much-longer-client-identity")]["requests"] == 1  # HEALTH; its STATS is counted after the reply is built
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_stats_track_a_bounded_number_of_clients_dropping_the_oldest(tiny_server: Any) -> None:
    tiny_server.server.stats.max_clients = 3
    ctx = zmq.Context.instance()
    socks = []
    try:
        for i in range(5):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTING_ID, bytes([1, i]))
            s.connect(tiny_server.endpoint)
            socks.append(s)
            assert call(s, "HEALTH", i).ok
        assert call(socks[2], "HEALTH", 9).ok  # seen again: now the most recent
        stats = call(socks[4], "STATS", 10).args
        assert list(stats["clients"]) == ["0103", "0104", "0102"]  # least recently seen first
        assert stats["clients_evicted"] == 2
        assert stats["clients"]["0102"]["requests"] == 2
        assert call(socks[0], "HEALTH", 11).ok  # a dropped client comes back with fresh counters
        assert set(tiny_server.server.stats.clients) == {"0100", "0102", "0104"}
        assert tiny_server.server.stats.clients["0100"].requests == 1
    finally:
        for s in socks:
            s.close(linger=0)


# --- logs and limits from the command line ------------------------------------------------------


def test_refused_and_malformed_requests_are_logged_with_the_client(dealer: zmq.Socket, caplog: pytest.LogCaptureFixture) -> None:
    dealer_key = None
    with caplog.at_level("WARNING", logger="tsqp.server"):
        assert not rpc(dealer, [b"\xc1 junk"]).ok
        assert not call(dealer, "LINEAR", 4, {"layer": 9, "modules": ["o_proj"]}, [x_input()]).ok
        assert call(dealer, "HEALTH", 5).ok
    records = [r for r in caplog.records if r.name == "tsqp.server"]
    assert len(records) == 2, [r.getMessage() for r in records]
    malformed, refused = records
    assert malformed.levelname == refused.levelname == "WARNING"
    dealer_key = malformed.client
    assert isinstance(dealer_key, str) and len(dealer_key) == 10 and dealer_key in malformed.getMessage()
    assert refused.client == dealer_key and refused.op == "LINEAR" and "out of range" in refused.error
    assert malformed.op is None and "msgpack" in malformed.error


def test_json_formatter_writes_one_object_per_record() -> None:
    import logging

    from tsqp.server.logs import JsonFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        exc = sys.exc_info()
    record = logging.LogRecord("tsqp.server", logging.WARNING, __file__, 1, "refused %s", ("LINEAR",), exc)
    record.client, record.op, record.error = "00deadbeef", "LINEAR", "bad\nline"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    d = json.loads(line)
    assert d["level"] == "WARNING" and d["logger"] == "tsqp.server" and d["msg"] == "refused LINEAR"
    assert (d["client"], d["op"], d["error"]) == ("00deadbeef", "LINEAR", "bad\nline")
    assert d["ts"].endswith("+00:00") and "ValueError: boom" in d["exc"]


def _serve_gpu(model_folder: Any, *options: str) -> tuple[Any, str]:
    import subprocess
    import sys

    from tsqp.tee.private_server import READY

    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "tsqp", "serve-gpu", "--model", str(model_folder), "--endpoint", endpoint,
                             "--device", "cpu", "--quiet", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    if not ready.startswith(READY):
        proc.kill()
        raise AssertionError(ready + proc.communicate()[1])
    return proc, endpoint


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_gpu_log_json_and_limit_options(tiny_path: Any) -> None:
    proc, endpoint = _serve_gpu(tiny_path, "--log-json", "--max-tensor-elements", "1000", "--max-message-mb", "0.5")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"\x07carol")
    try:
        sock.connect(endpoint)
        limits = call(sock, "HELLO", 1).args["limits"]
        assert limits["max_tensor_elements"] == 1000 and limits["max_message_bytes"] == 512 * 1024
        r = call(sock, "LINEAR", 2, {"layer": 0, "modules": ["o_proj"]}, [torch.ones(16, 64)])  # 1024 elements
        assert not r.ok and "1000" in r.error
        assert not rpc(sock, [b"\xc1 junk"]).ok
    finally:
        sock.close(linger=0)
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    entries = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    warnings = [e for e in entries if e["level"] == "WARNING" and e["logger"] == "tsqp.server"]
    assert len(warnings) == 2, stderr
    for e in warnings:
        assert e["client"] == b"\x07carol".hex() and e["error"] and e["ts"] and e["msg"]
    assert "1000" in warnings[0]["error"]
    assert "msgpack" in warnings[1]["error"]


# serve-gpu with one change: the handler of a MATMUL says so on stdout, then waits for a line on stdin.
# It lets a test act while a call is provably in flight, with no timing assumption.
GATED_SERVE_GPU = """
import runpy, sys
from tsqp.server.handlers import Handlers

handle = Handlers.__call__

def gated(self, msg):
    if msg.op == "MATMUL":
        print("handling", msg.id, flush=True)
        sys.stdin.readline()
    return handle(self, msg)

Handlers.__call__ = gated
sys.argv[0] = "tsqp"
runpy.run_module("tsqp", run_name="__main__", alter_sys=True)
"""


def _read_line(stream: Any, timeout_s: float) -> str:
    """One line from an unbuffered pipe; fails after `timeout_s` rather than hang."""
    import os
    import select
    import time

    deadline, line = time.monotonic() + timeout_s, b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([stream], [], [], left)[0], f"no line within {timeout_s} s, got {line!r}"
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            break  # the server exited
        line += chunk
    return line.decode()


def test_sigterm_while_a_request_is_in_flight_still_answers_it(tiny_path: Any) -> None:
    """The stop flag is only checked between calls: a SIGTERM during a call lets it finish and reply, then exit 0.

    The MATMUL's handler waits for the test's go-ahead (GATED_SERVE_GPU), so the SIGTERM provably
    arrives while the call is in flight: the kernel hands it to the main thread, blocked in that
    wait, before the call can end, and the handler sets the stop flag before the loop checks it again.
    """
    import subprocess
    import sys

    from tsqp.tee.private_server import READY

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([sys.executable, "-c", GATED_SERVE_GPU, "serve-gpu", "--model", str(tiny_path), "--endpoint", endpoint,
                             "--device", "cpu", "--quiet"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)  # fmt: skip
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert _read_line(proc.stdout, 120).startswith(READY)
        sock.connect(endpoint)
        assert call(sock, "HEALTH", 1).ok  # connected and serving
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(3, 5, 16, generator=g), torch.randn(3, 16, 4, generator=g)
        send(sock, protocol.encode(protocol.request("MATMUL", 2, {}, [a, b])))
        assert _read_line(proc.stdout, 30) == "handling 2\n"  # the server is inside the call
        proc.terminate()
        assert sock.poll(200) == 0 and proc.poll() is None  # SIGTERM neither ended the process nor cut the call short
        proc.stdin.write(b"go\n")  # let the call finish
        r = receive(sock, timeout_ms=10_000)
        assert r.ok, r.error
        assert r.id == 2
        torch.testing.assert_close(r.tensors[0], a @ b)
        assert proc.wait(timeout=20) == 0
    finally:
        sock.close(linger=0)
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=20)
    assert b"Traceback" not in stderr, stderr.decode()
