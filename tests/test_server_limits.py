"""The server bounds what one request may cost it: compute (FLOPs), result size, memory, and other clients' wait."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
import zmq
from helpers import RunningServer, call, connected_dealer, raw_header, receive, send, start_server

from tsqp.errors import AuthError
from tsqp.model import fixedpoint
from tsqp.model.linear import LinearWeights, QuantizedWeights
from tsqp.model.loading import LoadedModel
from tsqp.server import handlers
from tsqp.server.server import Server, default_limits
from tsqp.wire import protocol
from tsqp.wire.protocol import Limits


@pytest.fixture
def dealer(tiny_server: RunningServer) -> Iterator[zmq.Socket]:
    yield from connected_dealer(tiny_server.endpoint)


def dealer_to(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_default_limits_fit_the_models_largest_honest_request(tiny: LoadedModel) -> None:
    limits = default_limits(tiny)
    c = tiny.config
    assert limits.max_tensor_elements == max(c.max_seq_len * c.intermediate_size, 256 * c.vocab_size)  # a module's full-context result, or logits
    assert limits.max_message_bytes == 8 * limits.max_tensor_elements + (1 << 20)  # otp's int64 inputs
    gate_up = c.max_seq_len * c.hidden_size * 2 * c.intermediate_size  # a full-context prefill's widest call group
    logits = 256 * c.hidden_size * c.vocab_size  # lm_head for 256 rows at once (sequences decoding together)
    assert limits.max_request_flops == 2.0 * max(gate_up, logits) * fixedpoint.MAX_LIMBS


def test_an_empty_inner_dimension_is_refused_without_allocating(dealer: zmq.Socket, tiny_server: RunningServer) -> None:
    # 63 bytes asking for a (4096, 4096) result made of nothing: 64 MiB of zeros, for free, without the check.
    header = raw_header("MATMUL", 7, tensors=[["float32", [4096, 0]], ["float32", [0, 4096]]])
    send(dealer, [header, b"", b""])
    r = receive(dealer)
    assert not r.ok and "non-zero" in (r.error or "")
    assert tiny_server.server.stats.ops["MATMUL"].errors == 1


@pytest.mark.parametrize("op", ["MATMUL", "LINEAR", "LM_HEAD"])
def test_a_product_over_the_compute_budget_is_refused(op: str, tiny: LoadedModel) -> None:
    running = start_server(tiny, limits=Limits(max_request_flops=1e6))
    try:
        sock = dealer_to(running.endpoint)
        x = torch.zeros(400, 64)  # 400 rows: 3 MFLOP and more for any product of the tiny model
        args, tensors = {"MATMUL": ({}, [x, x.t().contiguous()]), "LINEAR": ({"layer": 0, "modules": ["o_proj"]}, [x]), "LM_HEAD": ({}, [x])}[op]
        r = call(sock, op, 3, args, tensors)
        assert not r.ok and "GFLOP, limit" in (r.error or ""), r.error
        assert call(sock, op, 4, args, [t[:1] for t in tensors] if op != "MATMUL" else [x[:4], x[:4].t().contiguous()]).ok  # small ones pass
        sock.close(linger=0)
    finally:
        running.close()


def test_a_frame_over_the_limit_drops_only_that_connection(tiny: LoadedModel) -> None:
    running = start_server(tiny, limits=Limits(max_message_bytes=64 * 1024))
    try:
        hostile = dealer_to(running.endpoint)
        send(hostile, [raw_header("LINEAR", 1, tensors=[["float32", [1024, 64]]]), bytes(1024 * 64 * 4)])  # 256 KiB
        assert not hostile.poll(500), "a frame over ZMQ_MAXMSGSIZE was read and answered"
        honest = dealer_to(running.endpoint)
        assert call(honest, "HEALTH", 2).args["status"] == "ok"
    finally:
        running.close()


def test_long_products_are_chunked_and_exact(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "CHUNK_FLOPS", 50_000)  # a handful of rows per chunk
    running = start_server(tiny)
    calls: list[int] = []
    inner = running.server.handlers.between_chunks
    running.server.handlers.between_chunks = lambda: (calls.append(1), inner())[-1]
    try:
        sock = dealer_to(running.endpoint)
        x = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
        r = call(sock, "LINEAR", 1, {"layer": 1, "modules": ["gate_proj", "up_proj"]}, [x])
        assert r.ok, r.error
        torch.testing.assert_close(r.tensors[0][:, 160:], x @ tiny.weights["layers.1.up_proj"].T, rtol=1e-5, atol=1e-5)
        a, b = torch.randn(2, 45, 16), torch.randn(2, 16, 9)
        r = call(sock, "MATMUL", 2, tensors=[a, b])
        torch.testing.assert_close(r.tensors[0], a @ b, rtol=1e-5, atol=1e-5)
        field = fixedpoint.choose_field(QuantizedWeights(tiny.weights, tiny.config.n_layers, 12).l1, 12, 16)
        xq = torch.randint(0, field.p, (29, 64))
        r = call(sock, "LINEAR", 3, {"layer": 0, "modules": ["o_proj"], **field.as_args()}, [xq])
        assert r.ok, r.error
        w_q = QuantizedWeights(tiny.weights, tiny.config.n_layers, 12).groups[(0, ("o_proj",))][0]
        assert torch.equal(r.tensors[0], fixedpoint.product_mod(xq, w_q, field.p, field.limb_bits))  # exact, chunked or not
        assert len(calls) >= 3  # each product above took several chunks
    finally:
        running.close()


def test_another_clients_health_is_answered_while_a_long_product_runs(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    # A product of 40 chunks, each made to take 50 ms: 2 s in all, on any machine.
    monkeypatch.setattr(handlers, "CHUNK_FLOPS", 2.0 * 256 * 256 * 25)  # 25 rows of a 256-wide product a chunk
    slow_matmul = LinearWeights.matmul

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return slow_matmul(a, b)

    monkeypatch.setattr(LinearWeights, "matmul", staticmethod(matmul))
    running = start_server(tiny, limits=Limits(max_request_flops=float("inf")))
    try:
        busy, other = dealer_to(running.endpoint), dealer_to(running.endpoint)
        a = torch.randn(1, 1000, 256)
        started = time.monotonic()
        send(busy, protocol.encode(protocol.request("MATMUL", 1, {}, [a, torch.randn(1, 256, 256)])))
        time.sleep(0.3)  # the product is under way
        asked = time.monotonic()
        send(other, protocol.encode(protocol.request("HEALTH", 1)))
        health = receive(other, 20_000)
        answered = time.monotonic()
        product = receive(busy, 60_000)
        done = time.monotonic()
        assert health.ok and product.ok
        assert answered < done - 0.5, f"HEALTH waited for the whole product ({answered - asked:.2f} s; product {done - started:.2f} s)"
        assert answered - asked < 0.5  # a chunk's time, the bound
    finally:
        running.close()


def test_abstract_ipc_sockets_need_keys(tiny: LoadedModel) -> None:
    with pytest.raises(AuthError, match="abstract socket"):
        Server(tiny, "ipc://@tsqp-test-abstract", device="cpu")
