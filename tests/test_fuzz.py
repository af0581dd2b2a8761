"""Fuzz a running server with hostile and broken requests; it must answer each one and go on serving.

A seeded generator (reproducible: SEED) throws random-byte headers, truncated frames, huge
declared shapes, negative dims, NaN/Inf payloads in valid LINEAR requests, wrong frame counts,
unknown ops, valid headers with garbage bodies, damaged compact headers and thousands of tiny messages at `start_server(tiny)`
on loopback tcp, and the same through a shared-memory channel, bounded in count and time.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
import zmq
from helpers import assert_valid_linear_works, call, raw_client, raw_header, start_server, x_input

from tsqp.model.loading import LoadedModel
from tsqp.wire import protocol

SEED = 20261128
RSS_BOUND_MIB = 64  # growth of this process's VmRSS over the fuzz run, measured after a warm-up
TIME_BOUND_S = 30
TINY_MESSAGES = 3000
BATCH = 50  # requests in flight at once: well under the ZeroMQ high-water marks (1000)
MODULES = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
IN_FEATURES = {"q_proj": 64, "o_proj": 64, "gate_proj": 64, "down_proj": 160}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def header(rng: random.Random, op: str, id: int, args: dict[str, Any] | None = None, tensors: list[Any] | None = None) -> bytes:
    return raw_header(op=op, id=id, args=args, tensors=tensors)


def linear_request(rng: random.Random, id: int, x: torch.Tensor | None = None) -> list[Any]:
    modules = rng.choice(MODULES)
    if x is None:
        x = torch.randn(rng.randint(1, 4), IN_FEATURES[modules[0]])
    return protocol.encode(protocol.request("LINEAR", id, {"layer": rng.randint(0, 2), "modules": modules}, [x]))


def hostile(rng: random.Random, id: int) -> tuple[list[Any], int | None]:
    """One hostile request and the id its reply must carry (None: any, the header is broken)."""
    kind = rng.randrange(13)
    if kind == 0:  # random bytes as the header
        return [rng.randbytes(rng.randint(0, 300))], None
    if kind == 1:  # random bytes everywhere, random frame count
        return [rng.randbytes(rng.randint(0, 100)) for _ in range(rng.randint(1, 10))], None
    if kind == 2:  # a valid request truncated: header or tensor frame cut short
        frames = [bytes(f) for f in linear_request(rng, id)]
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(max(len(frames[i]), 1))]
        return frames, (id if i > 0 else None)
    if kind == 3:  # huge declared shapes, little sent
        shape = [rng.choice([2**31, 2**40, 2**62, 2**63 - 1, 10**6]) for _ in range(rng.randint(1, 4))]
        return [
            header(rng, rng.choice(["LINEAR", "MATMUL", "EMBED", "LM_HEAD"]), id, tensors=[[rng.choice(list(protocol.DTYPES)), shape]]),
            rng.randbytes(16),
        ], id
    if kind == 4:  # negative dims
        shape = [rng.randint(-(2**63), -1), rng.randint(-5, 64)]
        rng.shuffle(shape)
        return [header(rng, "LINEAR", id, {"layer": 0, "modules": ["o_proj"]}, [["float32", shape]]), b""], id
    if kind == 5:  # NaN / Inf payloads in otherwise valid LINEAR requests: any answer, but an answer
        x = torch.randn(rng.randint(1, 4), 64)
        mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(id)) < rng.random()
        x[mask] = rng.choice([float("nan"), float("inf"), float("-inf"), 3.4e38])
        modules = rng.choice([m for m in MODULES if m[0] != "down_proj"])
        return protocol.encode(
            protocol.request(
                "LINEAR",
                id,
                {"layer": rng.randint(0, 2), "modules": modules},
                [x.to(rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64]))],
            )
        ), id
    if kind == 6:  # wrong frame counts for a valid header
        frames = [bytes(f) for f in linear_request(rng, id)]
        if rng.random() < 0.5:
            return frames[:1], id
        return frames + [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 3))], id
    if kind == 7:  # unknown ops
        op = rng.choice(["SHUTDOWN", "REPLY", "", "linear", "EXEC", rng.randbytes(8).hex(), "HELLO\0"])
        return [header(rng, op, id)], id
    if kind == 8:  # valid headers, garbage bodies (right length: any floats, NaN included; wrong length)
        rows = rng.randint(1, 4)
        n = rows * 64 * 4 + rng.choice([0, 0, -1, 1, 4])
        return [header(rng, "LINEAR", id, {"layer": rng.randint(0, 2), "modules": ["o_proj"]}, [["float32", [rows, 64]]]), rng.randbytes(n)], id
    if kind == 9:  # header fields of the wrong types
        h = {"v": rng.choice([[1, 0], [1], "1.0", None, [2**70, 0]]), "op": rng.choice(["LINEAR", 7, None, ["HELLO"]]),
             "id": rng.choice([id, "7", None, 1.5, True, 2**70]), "args": rng.choice([{}, [], "x", {"layer": [0]}, {1: 2}]),
             "tensors": rng.choice([[], {}, "float32", [["float32"]], [[None, None]], [["float32", [1] * 20]]])}  # fmt: skip
        try:
            packed = msgpack.packb(h, use_bin_type=True)
        except (OverflowError, TypeError):
            packed = msgpack.packb({"v": list(protocol.VERSION), "id": id}, use_bin_type=True)
        return [packed, rng.randbytes(rng.randint(0, 8))], None
    if kind == 10:  # garbage token ids and operands
        if rng.random() < 0.5:
            ids = torch.tensor([rng.randint(-(2**63), 2**63 - 1) for _ in range(rng.randint(1, 5))], dtype=torch.int64)
            return protocol.encode(protocol.request("EMBED", id, {}, [ids])), id
        a = torch.randn(*[rng.randint(1, 6) for _ in range(rng.randint(1, 4))])
        b = torch.randn(*[rng.randint(1, 6) for _ in range(rng.randint(1, 4))])
        return protocol.encode(protocol.request("MATMUL", id, {}, [a, b])), id
    if kind == 12:  # the compact header (protocol 2.1): valid hot calls, some bytes of the header overwritten
        op, args, x = rng.choice([("LINEAR", {"layer": rng.randint(-1, 3), "modules": rng.choice(MODULES)}, torch.randn(rng.randint(0, 3), 64)),
                                  ("EMBED", {}, torch.tensor([rng.randint(-5, 400)])),
                                  ("LM_HEAD", {"p": 2**31 - 1, "limb_bits": 8, "weight_bits": 12}, torch.randint(0, 2**31 - 1, (1, 64)))])  # fmt: skip
        frames = [bytes(memoryview(f)) for f in protocol.encode_compact(protocol.request(op, id, args, [x])) or []]
        damaged = bytearray(frames[0])
        for _ in range(rng.randint(0, 3)):
            damaged[rng.randrange(1, len(damaged))] = rng.randrange(256)
        return [bytes(damaged), frames[1]], (id if damaged[8:16] == frames[0][8:16] else None)
    # kind 11: valid requests mixed in, with hostile args
    args = rng.choice([{"layer": 2**62, "modules": ["o_proj"]}, {"layer": 0, "modules": [rng.randbytes(4).hex()]},
                       {"layer": 0, "modules": ["o_proj"] * 100}, {"layer": None, "modules": None}])  # fmt: skip
    return protocol.encode(protocol.request("LINEAR", id, args, [torch.randn(2, 64)])), id


def tiny_message(rng: random.Random, id: int) -> tuple[list[Any], int | None]:
    choice = rng.randrange(4)
    if choice == 0:
        return [b""], None
    if choice == 1:
        return [rng.randbytes(rng.randint(1, 4))], None
    if choice == 2:
        return [header(rng, "HEALTH", id)], id
    return [header(rng, "NOPE", id)], id


def requests(seed: int, n_hostile: int, n_tiny: int) -> Iterator[tuple[list[Any], int | None]]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for i in range(n_hostile):
        yield hostile(rng, 10_000 + i)
    for i in range(n_tiny):
        yield tiny_message(rng, 100_000 + i)


def fuzz(sock: zmq.Socket, stream: Iterator[tuple[list[Any], int | None]], deadline: float) -> tuple[int, int]:
    """Send everything in batches; each request must get exactly one reply, in order. Returns (sent, replies)."""
    sent = replies = 0
    batch: list[int | None] = []

    def drain() -> int:
        got = 0
        for expected in batch:
            assert sock.poll(5000), f"no reply to request #{sent - len(batch) + got} (expected id {expected}): did the server die?"
            r = protocol.decode(sock.recv_multipart(copy=False), expect_reply=True)
            if expected is not None:
                assert r.id == expected, (r.id, expected, r.error)
            got += 1
        batch.clear()
        return got

    for frames, expected in stream:
        sock.send_multipart(frames, copy=False)
        sent += 1
        batch.append(expected)
        if len(batch) == BATCH:
            replies += drain()
        assert time.monotonic() < deadline, "the fuzz run took too long"
    replies += drain()
    assert sock.poll(300) == 0, "a request got more than one reply"
    return sent, replies


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/Inf products, in the server thread
@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_fuzzing_a_running_server_leaves_it_serving_with_bounded_memory(tiny: LoadedModel, transport: str) -> None:
    """Every request gets exactly one reply; afterwards the server thread is alive, computes correct
    LINEAR numbers and counted the malformed requests; and this process's RSS (client and server
    both live in it) grows by less than RSS_BOUND_MIB = 64 MiB over the fuzz run, measured from
    /proc/self/status VmRSS after a warm-up run of the same generator with another seed.
    Over shm the same requests go through the client's shared-memory channel."""
    running = start_server(tiny)
    clients = raw_client(running.endpoint, transport)
    sock = next(clients)
    started = time.monotonic()
    try:
        deadline = started + TIME_BOUND_S
        fuzz(sock, requests(SEED + 1, 300, 300), deadline)  # warm-up: allocators, caches, lazy imports
        malformed_before = call(sock, "STATS", 1).args["malformed"]
        gc.collect()
        rss_before = rss_bytes()

        sent, replies = fuzz(sock, requests(SEED, 1500, TINY_MESSAGES), deadline)

        gc.collect()
        growth = rss_bytes() - rss_before
        assert sent == replies == 1500 + TINY_MESSAGES
        assert running.thread.is_alive()
        for layer in range(3):
            assert_valid_linear_works(sock, tiny, id=7 + layer, layer=layer)
        r = call(sock, "LINEAR", 20, {"layer": 1, "modules": ["down_proj"]}, [x_input(features=160, seed=3)])
        torch.testing.assert_close(r.tensors[0], x_input(features=160, seed=3) @ tiny.weights["layers.1.down_proj"].T, rtol=1e-4, atol=1e-5)
        stats = call(sock, "STATS", 2).args
        assert stats["malformed"] > malformed_before + 1000, stats["malformed"]
        assert growth < RSS_BOUND_MIB * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over the fuzz run"
        assert time.monotonic() - started < TIME_BOUND_S
    finally:
        clients.close()
        running.close()
