"""`tsqp bench`: prefill latency, decode speed and where each decoded token's time goes.

Modes, each measured for every prompt size:

- `hf-generate`: transformers' own `generate` in this process (the reference speed);
- `local`: tsqp's core with the linear ops in this process (the all-in-TEE baseline);
- one mode per shield (today only `plain`): split inference through a server.

tsqp modes run the one `tsqp.generation.generate` loop, with end-of-sequence ignored so
every run decodes exactly `new_tokens` tokens. The wire counters of the client are
snapshotted when the first token comes out of the prefill, so every per-token figure
covers the decode forwards only (the prefill has its own `prefill_s`).

A decoded token's time (`1 / decode tokens/s`) is split into parts:

- `serialization`: encoding requests and decoding replies in the TEE;
- `server_compute`: the compute time the server reports for its replies;
- `wire`: round trip minus server compute (transport, server-side (de)serialization, scheduling);
- `mask_unmask`, `verify`: shield work, 0 until shields exist;
- `tee_compute`: the rest, i.e. the non-linear work, sampling and the loop itself.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tsqp.errors import TsqpError

if TYPE_CHECKING:
    from tsqp.tee.private_server import PrivateServer

# torch is imported where it is used: option errors should come back at once.

BASELINES = ("hf-generate", "local")
SHIELDS = ("plain", "otp", "noise", "seqmix")
PARTS = ("tee_compute", "serialization", "wire", "server_compute", "mask_unmask", "verify")
# Deterministic, ordinary English so prompt tokens look like real text to the tokenizer.
PROMPT_TEXT = (
    "The history of computing is a story of machines that learned to follow instructions ever faster. "
    "Early mechanical calculators added and multiplied numbers with gears; later, vacuum tubes and then "
    "transistors made it possible to store programs in memory and run them at electronic speed. "
)


@dataclass
class BenchConfig:
    model: str = "smollm2"
    shields: list[str] = field(default_factory=lambda: list(SHIELDS))
    verify: bool | None = None  # Freivalds' check of every server result; None: each shield's default (on with otp)
    prompt_tokens: list[int] = field(default_factory=lambda: [32, 128, 512])
    new_tokens: int = 64
    repeat: int = 5
    endpoint: str | None = None  # None: a private server, started once for all split modes
    timeout_s: float = 60.0
    curve_secret: str | None = None  # CURVE keys for a remote endpoint (see tsqp.keys)
    server_key: str | None = None
    clients: list[int] = field(default_factory=list)  # load test: concurrent runner counts; empty: none
    batch: bool | None = None  # the private server's cross-client batching; None: its default for the device
    device: str = "auto"  # the private server's device and weight dtype
    dtype: str = "float32"

    @property
    def modes(self) -> list[str]:
        return [*BASELINES, *self.shields]


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
    offline_s: float = 0.0  # mask pool for the whole run (prefill and decode), made before it starts


@dataclass
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
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
    ratio_vs_local: float | None = None
    runs: list[Run] = field(default_factory=list)


@dataclass
class BenchReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result]
    load: list["LoadResult"] | None = None  # only with --clients

    def to_json(self) -> dict[str, Any]:
        data = {"machine": self.machine, "settings": self.settings, "results": [asdict(r) for r in self.results]}
        if self.load is not None:
            data["load"] = [asdict(r) for r in self.load]
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


# --- options -----------------------------------------------------------------


def parse_shields(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise TsqpError("--shields needs at least one name, e.g. plain")
    for name in names:
        if name not in SHIELDS:
            raise TsqpError(f"unknown shield {name!r}; choose from {', '.join(SHIELDS)}")
    return list(dict.fromkeys(names))


def parse_counts(text: str, option: str, what: str, example: str) -> list[int]:
    """A comma list of positive integers for `option`, deduplicated in order."""
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise TsqpError(f"{option} {text!r} is not a comma list of integers, e.g. {example}") from None
    if not counts or min(counts) < 1:
        raise TsqpError(f"{option} needs positive {what}, e.g. {example}")
    return list(dict.fromkeys(counts))


def parse_sizes(text: str) -> list[int]:
    return parse_counts(text, "--prompt-tokens", "token counts", "32,128,512")


def parse_clients(text: str) -> list[int]:
    return parse_counts(text, "--clients", "client counts", "1,2,4,8")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TsqpError("--plot needs matplotlib: pip install matplotlib") from None


# --- running -----------------------------------------------------------------

Progress = Callable[[str, int, int], None]  # (description, runs done, runs in all)


class _Counter:
    def __init__(self, total: int, report: Progress | None) -> None:
        self.done, self.total, self.report = 0, total, report

    def show(self, description: str) -> None:
        if self.report is not None:
            self.report(description, self.done, self.total)


def run(config: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Measure every mode at every prompt size; `progress` hears before each run."""
    from tsqp.model.loading import resolve

    if config.new_tokens < 2:
        raise TsqpError("--new-tokens must be at least 2: decode speed needs decoded tokens after the first")
    counter = _Counter(len(config.modes) * len(config.prompt_tokens) * config.repeat + (len(config.clients) + 1 if config.clients else 0), progress)
    machine = machine_info()  # before we add load of our own: the load average tells of other work
    counter.show("converting the model")
    folder = resolve(config.model)
    # Local first (it also builds the prompts), then the server starts: nothing else loads
    # while a mode is measured. Sessions close between modes so peak memory stays per mode.
    results, prompts = _bench_local(config, folder, counter)
    results += _bench_split(config, folder, prompts, counter)
    results += _bench_hf(config, folder, prompts, counter)
    local = {r.prompt_tokens: r.decode_tokens_per_s.median for r in results if r.mode == "local"}
    for r in results:
        r.ratio_vs_local = r.decode_tokens_per_s.median / local[r.prompt_tokens]
    results.sort(key=lambda r: (config.modes.index(r.mode), r.prompt_tokens))
    load = _bench_load(config, folder, counter) if config.clients else None
    counter.show("done")
    settings = {k: v for k, v in asdict(config).items() if k not in ("timeout_s", "curve_secret", "server_key")}
    settings |= {"model_path": str(folder), "curve": config.curve_secret is not None}  # encryption costs time; key paths say nothing
    if config.clients:
        settings["load_runner_torch_threads"] = LOAD_RUNNER_THREADS
    return BenchReport(machine, settings, results, load)


def run_with_progress(config: BenchConfig, console: Any) -> BenchReport:
    """`run` with a rich progress bar on `console` (stderr in the CLI)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("bench", total=None)
        return run(config, lambda d, done, total: bar.update(task, description=d, completed=done, total=total))


def _bench_local(config: BenchConfig, folder: Path, counter: _Counter) -> tuple[list[Result], dict[int, list[int]]]:
    from tsqp.tee.session import connect

    counter.show("local: loading the model")
    with connect(model=folder, local=True) as session:
        too_long = max(config.prompt_tokens) + config.new_tokens - session.model.config.max_seq_len
        if too_long > 0:
            raise TsqpError(f"prompt + new tokens exceed the model's {session.model.config.max_seq_len} positions by {too_long}")
        prompts = {n: prompt_ids(session.model.tokenizer, n, session.model.config.vocab_size) for n in config.prompt_tokens}
        results = [_measure(config, "local", n, _tsqp_run(session, prompts[n]), counter) for n in config.prompt_tokens]
    del session
    gc.collect()
    return results, prompts


def _bench_split(config: BenchConfig, folder: Path, prompts: dict[int, list[int]], counter: _Counter) -> list[Result]:
    from tsqp.tee.session import Session, connect, shielded

    counter.show("starting the server and loading the model")
    server = _private_server(config, folder)
    try:  # the session owns the private server from here on and stops it on close
        session = connect(config.endpoint, folder, timeout_s=config.timeout_s, private_server=server, shield="plain", verify=False,
                          curve_secret=config.curve_secret, server_key=config.server_key)  # fmt: skip
    except BaseException:
        if server is not None:
            server.close()
        raise
    with session:
        pid = server.process.pid if server is not None else None  # a remote server's memory is out of reach
        results = []
        for mode in config.shields:  # one connection; each shield wraps it in turn
            shielded_session = Session(session.model, shielded(session.backend, session.model, mode, config.verify))
            results += [_measure(config, mode, n, _tsqp_run(shielded_session, prompts[n]), counter, server_pid=pid)
                        for n in config.prompt_tokens]  # fmt: skip
    del session
    gc.collect()
    return results


def _private_server(config: BenchConfig, folder: Path) -> PrivateServer | None:
    """The private server the split modes and the load test use, unless `config.endpoint` names one; None then."""
    from tsqp.tee.private_server import OTP_WEIGHT_BITS, PrivateServer, shield_args

    if config.endpoint is not None:
        return None
    # Quantized weights (float64, ~8 bytes a weight) only when otp is measured: otherwise they
    # would inflate every mode's server memory and start-up.
    args = shield_args("otp" if "otp" in config.shields else "plain", OTP_WEIGHT_BITS)
    if config.batch is not None:
        args.append("--batch" if config.batch else "--no-batch")
    return PrivateServer(folder, config.device, config.dtype, extra_args=args)


def _bench_hf(config: BenchConfig, folder: Path, prompts: dict[int, list[int]], counter: _Counter) -> list[Result]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    counter.show("hf-generate: loading the model")
    hf_logging.disable_progress_bar()  # its bar would tear through ours on stderr
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        hf_logging.enable_progress_bar()
    results = [_measure(config, "hf-generate", n, _hf_run(model, prompts[n]), counter) for n in config.prompt_tokens]
    del model
    gc.collect()
    return results


def _measure(config: BenchConfig, mode: str, n: int, once: Callable[[int], Run], counter: _Counter, server_pid: int | None = None) -> Result:
    """Warm up, then `config.repeat` timed runs of one configuration."""
    for pid in ("self", server_pid):
        if pid is not None:
            _reset_peak_rss(pid)
    counter.show(f"{mode} · {n} prompt tokens · warm-up")
    once(2)  # first calls allocate caches and buffers; keep that out of the numbers
    runs = []
    for i in range(config.repeat):
        counter.show(f"{mode} · {n} prompt tokens · run {i + 1}/{config.repeat}")
        runs.append(once(config.new_tokens))
        counter.done += 1
    peak = {"tee": peak_rss_mib("self"), "server": peak_rss_mib(server_pid) if server_pid is not None else None}
    from tsqp.shields.base import default_verify

    verify = (default_verify(mode) if config.verify is None else config.verify) if mode in config.shields else False
    return aggregate(mode, verify, n, config.new_tokens, runs, peak)


def _tsqp_run(session: Any, ids: list[int]) -> Callable[[int], Run]:
    """One generation through the shared `generate` loop, wire counters split at the first token.

    A shield's mask pool is filled for the whole run before it starts (the offline phase),
    so the timed generation is the online phase alone.
    """
    from tsqp.tee.generation import generate

    stats = getattr(session.backend, "stats", None)  # WireStats of a RemoteBackend; local has none
    shield = getattr(session.backend, "shield", None)

    def once(new_tokens: int) -> Run:
        offline = 0.0
        if shield is not None:
            before = shield.times.offline_s
            shield.prepare(len(ids) + new_tokens)
            offline = shield.times.offline_s - before
        marks: list[dict[str, float]] = []

        def on_token(_: int) -> None:
            if not marks:  # the first token: the prefill is done, no decode forward yet
                marks.append(_wire(stats))

        result = generate(session.llama, ids, new_tokens, eos_ids=(), on_token=on_token)
        t, after = result.timings, _wire(stats)
        steps = t["decode_steps"]
        d = {k: (after[k] - marks[0][k]) / steps for k in after}
        return Run(
            prefill_s=t["prefill_s"],
            decode_tokens_per_s=t["decode_tokens_per_s"],
            serialization_s=d["serialize_s"],
            wire_s=max(d["round_trip_s"] - d["server_s"], 0.0),
            server_s=d["server_s"],
            round_trips=d["round_trips"],
            bytes=d["bytes_sent"] + d["bytes_received"],
            mask_unmask_s=d["mask_s"] + d["unmask_s"],
            verify_s=d["verify_s"],
            offline_s=offline,
        )

    return once


def _wire(stats: Any) -> dict[str, float]:
    keys = ("round_trips", "bytes_sent", "bytes_received", "round_trip_s", "server_s", "serialize_s", "mask_s", "unmask_s", "verify_s")
    counters = stats.as_dict() if stats is not None else {}
    return {k: float(counters.get(k, 0.0)) for k in keys}


def _hf_run(model: Any, ids: list[int]) -> Callable[[int], Run]:
    """transformers' generate, greedy, exactly `new_tokens` tokens.

    It exposes no per-step timing, so: prefill = time of a 1-token generate (prefill plus
    one sampling), decode tokens/s = (N - 1) / (t_N - t_1) from a second, N-token generate.
    """
    import torch

    input_ids = torch.tensor([ids])
    attention_mask = torch.ones_like(input_ids)

    def timed(new_tokens: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0)  # fmt: skip
        elapsed = time.perf_counter() - started
        assert out.shape[1] == len(ids) + new_tokens
        return elapsed

    def once(new_tokens: int) -> Run:
        t_1, t_n = timed(1), timed(new_tokens)
        # A decode slower than noise can make t_n <= t_1 only for absurdly short runs; keep it finite.
        return Run(prefill_s=t_1, decode_tokens_per_s=(new_tokens - 1) / max(t_n - t_1, 1e-9))

    return once


def prompt_ids(tokenizer: Any, n: int, vocab_size: int) -> list[int]:
    """Exactly n prompt token ids: a fixed text repeated and cut at n tokens (no chat template).

    Without a tokenizer: deterministic ids spread over the vocabulary.
    """
    if tokenizer is None:
        return [(7 + 7919 * i) % vocab_size for i in range(n)]
    once = list(tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"])
    return (once * (n // len(once) + 1))[:n]


def aggregate(mode: str, verify: bool, n: int, new_tokens: int, runs: list[Run], peak: dict[str, float | None]) -> Result:
    """Medians over runs; the breakdown is the median run's, scaled to add up to 1000 / median tokens/s.

    Medians of parts taken run by run need not add up to the median step on a noisy machine;
    one run's parts do, and TEE compute is what its step leaves after the measured parts.
    """
    tps = Stat.of([r.decode_tokens_per_s for r in runs])
    ms_per_token = 1000.0 / tps.median
    middle = sorted(runs, key=lambda r: r.decode_tokens_per_s)[(len(runs) - 1) // 2]
    step_ms = 1000.0 / middle.decode_tokens_per_s
    measured = {"serialization": middle.serialization_s, "wire": middle.wire_s, "server_compute": middle.server_s,
                "mask_unmask": middle.mask_unmask_s, "verify": middle.verify_s}  # fmt: skip
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
        runs=runs,
    )


# --- load test ---------------------------------------------------------------------

LOAD_RUNNER_THREADS = 1  # one core per runner, like one small enclave each; the reference pass too
LOAD_START_TIMEOUT_S = 600.0  # spawning, importing torch and loading the model, N runners at once


def _bench_load(config: BenchConfig, folder: Path, counter: _Counter) -> list[LoadResult]:
    """For each N in `config.clients`: N runner processes decode at once against one server.

    Runner i decodes the first prompt size, shifted by i tokens along the prompt text, so every
    runner has its own prompt. Its reference answer comes from a sequential single-client pass
    (one runner process decoding every prompt in turn) against the same server.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # separate processes: separate enclaves, no shared GIL
    counter.show("load: starting the server")
    server = _private_server(config, folder)
    try:
        if server is not None:
            server.wait_ready()
        endpoint = server.endpoint if server is not None else config.endpoint
        assert endpoint is not None
        counter.show(f"load: single-client reference answers for {max(config.clients)} prompts")
        (reference,) = _load_round(ctx, config, folder, endpoint, [list(range(max(config.clients)))])
        expected = reference["answers"]
        counter.done += 1
        results = []
        for n in config.clients:
            counter.show(f"load: {n} concurrent client{'s' if n > 1 else ''}")
            outcomes = _load_round(ctx, config, folder, endpoint, [[i] for i in range(n)])
            counter.done += 1
            wall = max(o["ended"] for o in outcomes) - min(o["started"] for o in outcomes)
            tokens = sum(len(a) for o in outcomes for a in o["answers"])
            steps = [1000.0 * s for o in outcomes for s in o["steps"]]
            mismatched = [i for i, o in enumerate(outcomes) if o["answers"][0] != expected[i]]
            results.append(LoadResult(clients=n, aggregate_tokens_per_s=tokens / wall if wall > 0 else 0.0,
                                      step_ms={"p50": percentile(steps, 50), "p99": percentile(steps, 99)},
                                      answers_match_single_client=not mismatched, wall_s=wall, tokens=tokens,
                                      mismatched_runners=mismatched, shield=",".join(sorted({o["shield"] for o in outcomes}))))  # fmt: skip
        return results
    finally:
        if server is not None:
            server.close()


def _load_round(ctx: Any, config: BenchConfig, folder: Path, endpoint: str, groups: list[list[int]]) -> list[dict[str, Any]]:
    """One runner process per group of prompt shifts, released together; their outcomes in group order."""
    import queue as queues

    barrier, results = ctx.Barrier(len(groups)), ctx.Queue()
    # The first --shields mode, named here: `connect`'s own default (otp) would measure another mode than asked.
    args = (endpoint, str(folder), config.shields[0], config.verify, config.prompt_tokens[0], config.new_tokens, config.timeout_s,
            config.curve_secret, config.server_key)  # fmt: skip
    processes = [ctx.Process(target=_load_runner, args=(i, shifts, *args, barrier, results), daemon=True) for i, shifts in enumerate(groups)]
    for p in processes:
        p.start()
    outcomes: dict[int, dict[str, Any]] = {}
    try:
        deadline = time.monotonic() + LOAD_START_TIMEOUT_S + len(groups[0]) * config.new_tokens * config.timeout_s
        while len(outcomes) < len(groups):
            try:
                message = results.get(timeout=1.0)
            except queues.Empty:
                if time.monotonic() > deadline:
                    raise TsqpError("load test: the runners did not finish in time") from None
                dead = [i for i, p in enumerate(processes) if not p.is_alive() and i not in outcomes]
                if dead:
                    try:  # a runner may have reported just before exiting
                        message = results.get(timeout=2.0)
                    except queues.Empty:
                        raise TsqpError(f"load test: runner {dead[0]} exited with status {processes[dead[0]].exitcode} without a result") from None
                else:
                    continue
            if "error" in message:
                raise TsqpError(f"load test: runner {message['runner']} failed: {message['error']}")
            outcomes[message["runner"]] = message
        for p in processes:
            p.join(30)
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [outcomes[i] for i in range(len(groups))]


def _load_runner(runner: int, shifts: list[int], endpoint: str, folder: str, shield: str, verify: bool | None, prompt_tokens: int,
                 new_tokens: int, timeout_s: float, curve_secret: str | None, server_key: str | None, barrier: Any, results: Any) -> None:  # fmt: skip
    """A runner process: its own session, a warm-up, the barrier, then one greedy generation per shift."""
    try:
        import torch

        torch.set_num_threads(LOAD_RUNNER_THREADS)
        from tsqp.tee.generation import generate
        from tsqp.tee.session import connect

        with connect(endpoint, folder, timeout_s=timeout_s, curve_secret=curve_secret, server_key=server_key, shield=shield, verify=verify) as session:
            model = session.model
            prompts = [prompt_ids(model.tokenizer, prompt_tokens + s, model.config.vocab_size)[s:] for s in shifts]
            generate(session.llama, prompts[0], 2, eos_ids=())  # first calls allocate caches and buffers
            barrier.wait(LOAD_START_TIMEOUT_S)
            started = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes of the host
            answers, steps = [], []
            for ids in prompts:
                stamps: list[float] = []
                result = generate(session.llama, ids, new_tokens, eos_ids=(), on_token=lambda _: stamps.append(time.perf_counter()))
                answers.append(result.token_ids)
                steps += [b - a for a, b in zip(stamps, stamps[1:])]  # one decode forward (and its sampling) each
            ended = time.monotonic()
            shield_name = session.shield_info()["shield"]
        results.put({"runner": runner, "answers": answers, "steps": steps, "started": started, "ended": ended, "shield": shield_name})
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the bench
        barrier.abort()
        results.put({"runner": runner, "error": f"{type(e).__name__}: {e}"})


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --- the machine and its memory ------------------------------------------------


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from tsqp import __version__

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tsqp": __version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # other work skews numbers
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _reset_peak_rss(pid: int | str) -> None:
    """Restart a process's VmHWM at its current RSS, so each configuration gets its own peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not allowed: the peak then covers the process's whole life


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of a process in MiB; None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    if pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return None


# --- output --------------------------------------------------------------------


def render_table(report: BenchReport) -> Any:
    """Two narrow tables (speed and memory; per decoded token), so they fit 80 columns."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    s = report.settings
    speed = Table(title=escape(f"tsqp bench · {s['new_tokens']} new tokens · median [min–max] of {s['repeat']} runs"), box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("mode", "prompt", "prefill s", "decode tok/s", "×local", "TEE MiB", "srv MiB"):
        speed.add_column(name, justify="left" if name == "mode" else "right")
    per_token = Table(title="per decoded token (medians): time in ms, round trips, KiB", box=box.SIMPLE_HEAD, pad_edge=False,
                      caption="total = tee + mask(/unmask) + verif(y) + ser(ialization) + wire + server compute; trips, KiB: round trips and bytes per token; "
                              "offline: mask pool ms per token, made before the run")  # fmt: skip
    for name in ("mode", "prompt", "total", "tee", "mask", "verif", "ser", "wire", "server", "trips", "KiB", "offline"):
        per_token.add_column(name, justify="left" if name == "mode" else "right")
    for r in report.results:
        mode, b, p = r.mode + (" +verify" if r.verify else ""), r.breakdown_ms_per_token, r.peak_rss_mib
        ratio = f"{r.ratio_vs_local:.2f}" if r.ratio_vs_local is not None else ""
        speed.add_row(mode, str(r.prompt_tokens), _stat(r.prefill_s, "{:.3f}"), _stat(r.decode_tokens_per_s, "{:.1f}"), ratio, _mib(p["tee"]), _mib(p["server"]))
        per_token.add_row(mode, str(r.prompt_tokens), f"{r.ms_per_token:.1f}",
                          *(f"{b[k]:.1f}" for k in ("tee_compute", "mask_unmask", "verify", "serialization", "wire", "server_compute")),
                          f"{r.round_trips_per_token:.0f}", f"{r.bytes_per_token / 1024:.1f}", f"{1000 * r.offline_s_per_token:.1f}")  # fmt: skip
    if report.load is None:
        return Group(speed, per_token)
    load = Table(title=escape(f"load test · {report.load[0].shield} · {s['prompt_tokens'][0]} prompt tokens · {s['new_tokens']} new tokens per client · one server"),
                 box=box.SIMPLE_HEAD, pad_edge=False,
                 caption="tok/s: all clients' tokens / wall time from release to the last client done; step: one decode forward")  # fmt: skip
    for name in ("clients", "aggregate tok/s", "step p50 ms", "step p99 ms", "answers"):
        load.add_column(name, justify="right")
    for r in report.load:
        answers = "match" if r.answers_match_single_client else f"[bold red]differ[/] ({len(r.mismatched_runners)})"
        load.add_row(str(r.clients), f"{r.aggregate_tokens_per_s:.1f}", f"{r.step_ms['p50']:.1f}", f"{r.step_ms['p99']:.1f}", answers)
    return Group(speed, per_token, load)


def _stat(s: Stat, fmt: str) -> str:
    """Median, with the range on a dim second line."""
    return f"{fmt.format(s.median)}\n[dim]{fmt.format(s.min)}–{fmt.format(s.max)}[/]"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def plot(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """Stacked bars: per-token time of each part, one bar per mode and prompt size."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    labels = [f"{r.mode}\n{r.prompt_tokens} tok" for r in report.results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.5))
    bottom = [0.0] * len(labels)
    for part in PARTS:
        values = [r.breakdown_ms_per_token[part] for r in report.results]
        if any(values):
            ax.bar(labels, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_title(f"tsqp bench: where a decoded token's time goes ({report.settings['new_tokens']} new tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
