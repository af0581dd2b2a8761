"""The server's counters: per op, per client and overall, as the STATS op reports them."""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

LATENCY_SAMPLES = 1024  # per op: the ring buffer the percentiles come from
MAX_CLIENTS = 256  # clients tracked in STATS; the least recently seen is dropped first


@dataclass
class OpStats:
    calls: int = 0
    errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    compute_s: float = 0.0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))  # handler seconds, newest last

    def record(self, seconds: float) -> None:
        self.latencies.append(seconds)

    def answered(self, bytes_in: int, bytes_out: int, seconds: float) -> None:
        """One request answered in `seconds`, counted whole (the batcher's and the fast lane's; the generic
        path counts a request's arrival before it knows the answer)."""
        self.calls += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.record(seconds)
        self.compute_s += seconds

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: v for k, v in vars(self).items() if k != "latencies"}
        ordered = sorted(self.latencies)
        d["latency_samples"] = len(ordered)
        for q in (50, 90, 99):
            d[f"p{q}_s"] = _percentile(ordered, q)
        return d


@dataclass
class ClientStats:
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: int = 0
    last_seen: float = 0.0  # time.time()


@dataclass
class ServerStats:
    ops: dict[str, OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    malformed: int = 0
    requests: int = 0
    clients: OrderedDict[str, ClientStats] = field(default_factory=OrderedDict)  # least recently seen first
    max_clients: int = MAX_CLIENTS
    clients_evicted: int = 0
    faults_injected: int = 0
    batches: int = 0  # products computed for several requests at once
    batched_requests: int = 0  # requests answered from such a product
    fast_lane_requests: int = 0  # requests answered by the same-host fast lane (`server.fastlane`)

    def client(self, key: str) -> ClientStats:
        """The counters of one client (created if new), now the most recently seen; bounded in number."""
        stats = self.clients.get(key)
        if stats is None:
            stats = self.clients[key] = ClientStats()
            while len(self.clients) > self.max_clients:
                self.clients.popitem(last=False)
                self.clients_evicted += 1
        else:
            self.clients.move_to_end(key)
        stats.last_seen = time.time()
        return stats

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": {op: s.as_dict() for op, s in self.ops.items()},
            "malformed": self.malformed,
            "requests": self.requests,
            "clients": {key: vars(c).copy() for key, c in self.clients.items()},
            "clients_evicted": self.clients_evicted,
            "faults_injected": self.faults_injected,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "fast_lane_requests": self.fast_lane_requests,
        }


def _percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted samples; None without samples."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def client_key(identity: bytes) -> str:
    """A short hex name for a ROUTER identity (libzmq's are 5 bytes; a client-chosen one may be 255)."""
    return identity.hex() if len(identity) <= 8 else hashlib.blake2b(identity, digest_size=8).hexdigest()
