"""tsqp.server.fastlane: compact headers the server answered once are answered again without the generic path,
with the same bytes, the same counters, and nothing else let through."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import ShmDealer, rpc, start_server, x_input

from tsqp.model.loading import LoadedModel
from tsqp.wire import protocol

OTP_ARGS = {"p": (1 << 31) - 1, "limb_bits": 8, "weight_bits": 12}


def masked(rows: int, features: int = 64, seed: int = 0) -> torch.Tensor:
    """An otp input: residues mod p."""
    return torch.randint(0, OTP_ARGS["p"], (rows, features), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)


@pytest.fixture
def server(tiny: LoadedModel) -> Any:
    running = start_server(tiny)
    yield running
    running.close()


def compact(op: str, id: int, args: dict[str, Any], x: torch.Tensor) -> list[Any]:
    frames = protocol.encode_compact(protocol.request(op, id, args, [x]))
    assert frames is not None
    return frames


def raw_reply(client: ShmDealer, frames: list[Any]) -> list[bytes]:
    client.send_multipart(frames)
    assert client.poll(2000)
    return [bytes(f) for f in client.recv_multipart()]


def fast_answers(client: ShmDealer) -> int:
    """The server's count of requests its fast lane answered (a STATS request: after every earlier answer's counting)."""
    return int(rpc(client, protocol.encode(protocol.request("STATS", 999))).args["fast_lane_requests"])


def without_id_and_time(header: bytes) -> bytes:
    return header[: protocol.COMPACT_ID] + header[protocol.COMPACT_ID + 8 : protocol.COMPACT_COMPUTE] + header[protocol.COMPACT_COMPUTE + 8 :]


@pytest.mark.parametrize(
    ("op", "args", "x"),
    [
        pytest.param("LINEAR", {"layer": 2, "modules": ["q_proj", "k_proj", "v_proj"]}, x_input(rows=1)[None], id="qkv-decode-row"),
        pytest.param("LINEAR", {"layer": 0, "modules": ["down_proj"]}, x_input(rows=3, features=160), id="down-3-rows"),
        pytest.param("LM_HEAD", {}, x_input(rows=1), id="lm-head"),
        pytest.param("EMBED", {}, torch.tensor([[3]]), id="embed-decode-token"),
        pytest.param("EMBED", {}, torch.tensor([[5, 0, 17, 5]]), id="embed-4-tokens"),
        pytest.param("LINEAR", {**OTP_ARGS, "layer": 1, "modules": ["gate_proj", "up_proj"]}, masked(rows=1), id="otp-gate-up-row"),
        pytest.param("LINEAR", {**OTP_ARGS, "layer": 0, "modules": ["o_proj"]}, masked(rows=5), id="otp-o-5-rows"),
        pytest.param("LM_HEAD", OTP_ARGS, masked(rows=1), id="otp-lm-head"),
    ],
)
def test_a_header_answered_once_is_answered_again_the_fast_way_with_the_same_bytes(server: Any, op: str, args: dict[str, Any], x: torch.Tensor) -> None:
    client = ShmDealer(server.endpoint)
    try:
        generic = raw_reply(client, compact(op, 1, args, x))
        assert fast_answers(client) == 0
        fast = raw_reply(client, compact(op, 2, args, x))
        assert fast_answers(client) == 1
        assert without_id_and_time(fast[0]) == without_id_and_time(generic[0]) and fast[1] == generic[1]
        assert protocol.decode(fast, expect_reply=True).id == 2
    finally:
        client.close()


def test_only_what_the_generic_path_answered_is_remembered(server: Any) -> None:
    """Refused requests, msgpack headers and empty inputs always take the generic path; a remembered header with a
    body of another length too, refused as before."""
    client = ShmDealer(server.endpoint)
    lane = server.server.fastlane
    try:
        o_proj = {"layer": 0, "modules": ["o_proj"]}
        for _ in range(2):
            assert not rpc(client, compact("EMBED", 4, {}, torch.tensor([[100_000]]))).ok
            assert not rpc(client, compact("LINEAR", 5, {"layer": 7, "modules": ["o_proj"]}, x_input(rows=1))).ok
            assert not rpc(client, compact("LINEAR", 5, {**OTP_ARGS, "weight_bits": 40, **o_proj}, masked(rows=1))).ok
            assert rpc(client, protocol.encode(protocol.request("LINEAR", 6, o_proj, [x_input(rows=1)]))).ok
            assert rpc(client, compact("LINEAR", 7, o_proj, x_input(rows=0))).ok
        assert fast_answers(client) == 0 and lane.plans == {}
        assert rpc(client, compact("LINEAR", 8, o_proj, x_input(rows=1))).ok  # remembered now
        header, body = compact("LINEAR", 9, o_proj, x_input(rows=1))
        short = rpc(client, [header, bytes(memoryview(body))[:-4]])
        assert not short.ok and short.id == 9 and "bytes" in short.error
        assert fast_answers(client) == 0
    finally:
        client.close()


def test_a_remembered_otp_header_still_has_its_values_checked(server: Any) -> None:
    """An otp input's range is checked on a copy, as the generic path checks it: out of [0, p) it is refused the
    generic way, naming why; weights quantized to another width since send it the generic way too."""
    client = ShmDealer(server.endpoint)
    o_proj = {**OTP_ARGS, "layer": 0, "modules": ["o_proj"]}
    try:
        first = rpc(client, compact("LINEAR", 1, o_proj, masked(rows=1)))
        assert first.ok and rpc(client, compact("LINEAR", 2, o_proj, masked(rows=1, seed=1))).ok
        assert fast_answers(client) == 1
        for bad in (-1, OTP_ARGS["p"]):
            x = masked(rows=1, seed=2)
            x[0, 5] = bad
            refused = rpc(client, compact("LINEAR", 3, o_proj, x))
            assert not refused.ok and "[0, p)" in refused.error
        assert fast_answers(client) == 1
        assert rpc(client, compact("LINEAR", 4, {**o_proj, "weight_bits": 10}, masked(rows=1))).ok  # quantized again, to 10 bits
        again = rpc(client, compact("LINEAR", 5, o_proj, masked(rows=1)))  # 12 bits: the lane steps aside, the generic path requantizes
        assert again.ok and torch.equal(again.tensors[0], first.tensors[0])
        assert fast_answers(client) == 1
    finally:
        client.close()


def test_a_remembered_embed_header_still_has_its_ids_checked(server: Any, tiny: LoadedModel) -> None:
    client = ShmDealer(server.endpoint)
    try:
        assert rpc(client, compact("EMBED", 1, {}, torch.tensor([[3, 4]]))).ok and fast_answers(client) == 0
        assert torch.equal(rpc(client, compact("EMBED", 2, {}, torch.tensor([[7, 1]]))).tensors[0][0], tiny.weights["embed"][[7, 1]])
        assert fast_answers(client) == 1
        for bad in (-1, tiny.config.vocab_size):
            refused = rpc(client, compact("EMBED", 3, {}, torch.tensor([[5, bad]])))
            assert not refused.ok and "out of range" in refused.error
        assert fast_answers(client) == 1
    finally:
        client.close()


def test_the_fast_way_keeps_the_same_counters(tiny: LoadedModel) -> None:
    """The same requests to a server with the fast lane and to one without: the same STATS, but for timings."""
    stats = []
    for fast in (True, False):
        running = start_server(tiny)
        if not fast:
            running.server.fastlane = None
        client = ShmDealer(running.endpoint)
        try:
            for i in range(4):
                assert rpc(client, compact("LINEAR", i, {"layer": 1, "modules": ["gate_proj", "up_proj"]}, x_input(rows=1, seed=i))).ok
                assert rpc(client, compact("LM_HEAD", 10 + i, {}, x_input(rows=1, seed=i))).ok
                assert rpc(client, compact("LINEAR", 20 + i, {**OTP_ARGS, "layer": 0, "modules": ["o_proj"]}, masked(rows=1, seed=i))).ok
                assert rpc(client, compact("EMBED", 30 + i, {}, torch.tensor([[i]]))).ok
            got = rpc(client, protocol.encode(protocol.request("STATS", 99))).args
            assert got.pop("fast_lane_requests") == (12 if fast else 0)  # the first of each header answered the generic way
        finally:
            client.close()
            running.close()
        ops = {op: {k: v for k, v in c.items() if k in ("calls", "errors", "bytes_in", "bytes_out", "latency_samples")} for op, c in got["ops"].items()}
        clients = [{k: v for k, v in c.items() if k in ("requests", "bytes_in", "bytes_out", "errors")} for c in got["clients"].values()]
        stats.append((got["requests"], got["malformed"], ops, clients))
    assert stats[0] == stats[1]


@pytest.mark.parametrize("kwargs", [{"record_dir": "REC"}, {"fault_rate": 0.5}, {"shm_folder": None}])
def test_no_fast_lane_where_every_request_must_pass_the_generic_path(tiny: LoadedModel, tmp_path: Any, kwargs: dict[str, Any]) -> None:
    kwargs = {k: (tmp_path / "rec" if v == "REC" else v) for k, v in kwargs.items()}
    running = start_server(tiny, **kwargs)
    try:
        assert running.server.fastlane is None
    finally:
        running.close()


@pytest.mark.parametrize("op", ["LINEAR", "EMBED", "LM_HEAD"])
@pytest.mark.parametrize("staged", [True, False], ids=["staged", "prefill-sized"])
def test_bfloat16_weights_answer_the_fast_way_with_the_generic_bytes(tiny: LoadedModel, op: str, staged: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights held in another dtype (or on another device): the generic path's product, cast back to float32 as
    it does, the same bytes; into buffers made once (`StagedProduct`) for a call up to `STAGED_BYTES`, else made
    at each call (a prefill chunk's would stay held)."""
    from tsqp.model.linear import LinearWeights
    from tsqp.server import fastlane

    made: list[int] = []
    staged_product = LinearWeights.staged_product
    monkeypatch.setattr(LinearWeights, "staged_product", lambda self, site, rows: made.append(rows) or staged_product(self, site, rows))
    if not staged:
        monkeypatch.setattr(fastlane, "STAGED_BYTES", 0)
    running = start_server(tiny, dtype="bfloat16")
    client = ShmDealer(running.endpoint)
    args, x = {
        "EMBED": ({}, torch.tensor([[3, 9]])),
        "LINEAR": ({"layer": 1, "modules": ["gate_proj", "up_proj"]}, x_input(rows=2)),
        "LM_HEAD": ({}, x_input(rows=1)),
    }[op]
    try:
        generic = raw_reply(client, compact(op, 1, args, x))
        fast = raw_reply(client, compact(op, 2, args, x))
        assert fast_answers(client) == 1
        assert without_id_and_time(fast[0]) == without_id_and_time(generic[0]) and fast[1] == generic[1]
        assert made == ([x.shape[0]] if staged and op != "EMBED" else [])
    finally:
        client.close()
        running.close()


def test_with_batching_plain_requests_take_the_lane_only_while_their_client_is_alone(tiny: LoadedModel) -> None:
    """Cross-client batching answers several clients' plain products with one: with a second client on shared memory,
    plain requests (EMBED too) go the generic way, to the batcher; otp's take the lane (batching leaves them alone)."""
    running = start_server(tiny, batch=True)
    first = ShmDealer(running.endpoint)
    o_proj = {"layer": 0, "modules": ["o_proj"]}
    try:
        for i in range(2):
            assert rpc(first, compact("LINEAR", i, o_proj, x_input(rows=1))).ok
        assert fast_answers(first) == 1  # alone: the lane
        second = ShmDealer(running.endpoint)
        try:
            for i in range(2):
                assert rpc(first, compact("LINEAR", 10 + i, o_proj, x_input(rows=1))).ok
                assert rpc(first, compact("EMBED", 20 + i, {}, torch.tensor([[3]]))).ok
            assert fast_answers(first) == 1
            for i in range(2):
                assert rpc(first, compact("LINEAR", 30 + i, {**OTP_ARGS, **o_proj}, masked(rows=1))).ok
            assert fast_answers(first) == 2
        finally:
            second.close()
    finally:
        first.close()
        running.close()
