"""The numbers a bench run produces, and how runs aggregate into them."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

PARTS = ("tee_compute", "serialization", "wire", "server_compute", "mask_unmask", "mask_stall", "verify")


@dataclass
class Run:
    """One timed generation. Per-token figures cover the decode forwards only."""

    prefill_s: float
    decode_tokens_per_s: float
    serialization_s: float = 0.0  # per decoded token
    wire_s: float = 0.0
    server_s: float = 0.0
    round_trips: float = 0.0
    bytes: float = 0.0
    mask_unmask_s: float = 0.0
    verify_s: float = 0.0
    mask_stall_s: float = 0.0  # per decoded token: calls waiting for their masks (made them, or waited for the worker)
    offline_s: float = 0.0  # mask pool for the whole run (prefill and decode), made before it or beside it
    stall_s: float = 0.0  # the same over the whole run (prefill and decode)


@dataclass
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class Result:
    """One configuration (mode × prompt size), aggregated over its runs."""

    mode: str
    verify: bool
    prompt_tokens: int
    new_tokens: int
    prefill_s: Stat
    decode_tokens_per_s: Stat
    ms_per_token: float  # 1000 / median decode tokens/s: what the breakdown adds up to
    breakdown_ms_per_token: dict[str, float]
    round_trips_per_token: float
    bytes_per_token: float
    peak_rss_mib: dict[str, float | None]
    offline_s_per_token: float = 0.0  # mask pool precomputation (otp, noise), per token of prompt and answer
    pool_peak_mib: float = 0.0  # the most the mask pool held at once (otp, noise)
    ratio_vs_local: float | None = None
    runs: list[Run] = field(default_factory=list)


@dataclass
class BenchReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result]
    load: list[LoadResult] | None = None  # only with --clients
    http: list[HttpLoadResult] | None = None  # only with --http-clients

    def to_json(self) -> dict[str, Any]:
        data = {"machine": self.machine, "settings": self.settings, "results": [asdict(r) for r in self.results]}
        if self.load is not None:
            data["load"] = [asdict(r) for r in self.load]
        if self.http is not None:
            data["http"] = [asdict(r) for r in self.http]
        return data


@dataclass
class LoadResult:
    """One load-test round: `clients` concurrent runner processes against one server."""

    clients: int
    aggregate_tokens_per_s: float  # all runners' new tokens / wall time from release to the last runner done
    step_ms: dict[str, float]  # p50, p99 of every decode step of every runner
    answers_match_single_client: bool
    wall_s: float = 0.0
    tokens: int = 0
    mismatched_runners: list[int] = field(default_factory=list)
    shield: str = ""  # what the runners' sessions report (the first --shields mode)


@dataclass
class HttpLoadResult:
    """One HTTP round: `clients` concurrent streamed completions against one serve-tee (continuous batching)."""

    shield: str
    clients: int
    aggregate_tokens_per_s: float  # all clients' new tokens / wall time from the first request sent to the last answer done
    wall_s: float
    tokens: int
    latency_ms: dict[str, float]  # whole request: p50, p90, p99
    first_token_ms: dict[str, float]  # request sent -> first text chunk
    inter_token_ms: dict[str, float]  # between text chunks of one request
    answers_match_single_client: bool
    mismatched_clients: list[int] = field(default_factory=list)
    steps: int = 0  # batched forward passes of the round (serve-tee's /stats)
    round_trips_per_step: float = 0.0  # to the accelerator: the same for 1 and N clients under continuous batching
    offline_s: float = 0.0  # mask pool work during the round (masks made beforehand are not in it)


def aggregate(mode: str, verify: bool, n: int, new_tokens: int, runs: list[Run], peak: dict[str, float | None], pool_peak_mib: float = 0.0) -> Result:
    """Medians over runs; the breakdown is the median run's, scaled to add up to 1000 / median tokens/s.

    Medians of parts taken run by run need not add up to the median step on a noisy machine;
    one run's parts do, and TEE compute is what its step leaves after the measured parts.
    """
    tps = Stat.of([r.decode_tokens_per_s for r in runs])
    ms_per_token = 1000.0 / tps.median
    middle = sorted(runs, key=lambda r: r.decode_tokens_per_s)[(len(runs) - 1) // 2]
    step_ms = 1000.0 / middle.decode_tokens_per_s
    measured = {"serialization": middle.serialization_s, "wire": middle.wire_s, "server_compute": middle.server_s,
                "mask_unmask": middle.mask_unmask_s, "mask_stall": middle.mask_stall_s, "verify": middle.verify_s}  # fmt: skip
    parts = {part: 1000.0 * seconds for part, seconds in measured.items()}
    parts = {"tee_compute": max(step_ms - sum(parts.values()), 0.0), **parts}
    scale = ms_per_token / max(sum(parts.values()), 1e-12)
    breakdown = {part: ms * scale for part, ms in parts.items()}
    return Result(
        mode=mode,
        verify=verify,
        prompt_tokens=n,
        new_tokens=new_tokens,
        prefill_s=Stat.of([r.prefill_s for r in runs]),
        decode_tokens_per_s=tps,
        ms_per_token=ms_per_token,
        breakdown_ms_per_token=breakdown,
        round_trips_per_token=statistics.median(r.round_trips for r in runs),
        bytes_per_token=statistics.median(r.bytes for r in runs),
        peak_rss_mib=peak,
        offline_s_per_token=statistics.median(r.offline_s for r in runs) / (n + new_tokens),
        pool_peak_mib=pool_peak_mib,
        runs=runs,
    )


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
