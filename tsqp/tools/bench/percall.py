"""`tsqp bench --per-call`: one decode step's calls, one at a time, over each transport.

For every hot op at decode shape (one row) it times `n` round trips from the TEE's side and
subtracts the compute time the server reports, so the per-call overhead (both sides' Python,
the transport, the hand-offs) is a number to compare with the floors in docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tsqp.tools.bench.config import BenchConfig, private_server

TRANSPORTS = ("zmq", "shm")


def decode_calls(backend: Any, config: Any) -> dict[str, Callable[[], Any]]:
    """The calls of one decoded token, by name, each with a one-row input."""
    import torch

    row = torch.randn(1, config.hidden_size)
    wide = torch.randn(1, config.intermediate_size)
    token = torch.tensor([7])
    return {
        "EMBED": lambda: backend.embed(token),
        "LINEAR q|k|v": lambda: backend.linear(0, ("q_proj", "k_proj", "v_proj"), row),
        "LINEAR o": lambda: backend.linear(0, ("o_proj",), row),
        "LINEAR gate|up": lambda: backend.linear(0, ("gate_proj", "up_proj"), row),
        "LINEAR down": lambda: backend.linear(0, ("down_proj",), wide),
        "LM_HEAD": lambda: backend.lm_head(row),
    }


def per_call(config: BenchConfig, folder: Path, calls: int = 300) -> list[dict[str, Any]]:
    """Median round trip, server compute and overhead (µs) per op and transport, interleaved by round."""
    from tsqp.model.loading import load
    from tsqp.tee.private_server import closed_on_failure
    from tsqp.wire.client import RemoteBackend

    server = private_server(config, folder)
    backends: dict[str, RemoteBackend] = {}
    with closed_on_failure(server):
        model = load(folder, with_tokenizer=False)
        if server is not None:
            server.wait_ready()
        endpoint = server.endpoint if server is not None else config.endpoint
        assert endpoint is not None
        try:
            for transport in TRANSPORTS:
                backends[transport] = RemoteBackend(endpoint, config.timeout_s, transport=transport, spin_us=config.spin_us,
                                                    curve_secret=config.curve_secret, server_key=config.server_key)  # fmt: skip
                backends[transport].hello(model.fingerprint)
            samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(5):  # rounds: each op and transport in turn, so drifting load hits all alike
                for transport, backend in backends.items():
                    for op, call in decode_calls(backend, model.config).items():
                        samples.setdefault((transport, op), []).extend(_timed(backend, call, calls // 5))
        finally:
            for backend in backends.values():
                backend.close()
            if server is not None:
                server.close()
    rows = []
    for (transport, op), values in samples.items():
        total = statistics.median(v[0] for v in values)
        server_s = statistics.median(v[1] for v in values)
        rows.append({"transport": transport, "op": op, "round_trip_us": 1e6 * total, "server_us": 1e6 * server_s, "overhead_us": 1e6 * (total - server_s)})
    return rows


def _timed(backend: Any, call: Callable[[], Any], n: int) -> list[tuple[float, float]]:
    """(call's wall time, server's compute) for n calls after 3 warm-up calls."""
    for _ in range(3):
        call()
    out = []
    for _ in range(n):
        before = backend.stats.server_s
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started, backend.stats.server_s - before))
    return out
