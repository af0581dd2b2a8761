"""The measured runs: each mode at each prompt size, warm-up first, timed runs after."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tsqp.errors import TsqpError
from tsqp.tools.bench.baseline import run_baselines
from tsqp.tools.bench.config import BenchConfig, Progress, ProgressCounter, private_server, prompt_ids
from tsqp.tools.bench.http import bench_http, http_settings
from tsqp.tools.bench.load import LOAD_RUNNER_THREADS, bench_load
from tsqp.tools.bench.machine import machine_info, peak_rss_mib, reset_peak_rss
from tsqp.tools.bench.results import BenchReport, Result, Run, aggregate


def run(config: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Measure every mode at every prompt size; `progress` hears before each run."""
    from tsqp.model.loading import resolve

    if config.new_tokens < 2:
        raise TsqpError("a bench run decodes at least 2 new tokens: decode speed needs decoded tokens after the first")
    if config.http_clients:
        return _run_http(config, progress)
    counter = ProgressCounter(len(config.modes) * len(config.prompt_tokens) * config.repeat + (len(config.clients) + 1 if config.clients else 0), progress)
    machine = machine_info()  # before we add load of our own: the load average tells of other work
    counter.show("converting the model")
    folder = resolve(config.model)
    # The baselines first, in a process of their own (`baseline`: it also builds the prompts), then the
    # server starts: nothing else loads while a mode is measured. Sessions close between modes so peak
    # memory stays per mode.
    results, prompts, baseline_policy = run_baselines(config, folder, counter)
    results += _bench_split(config, folder, prompts, counter)
    local = {r.prompt_tokens: r.decode_tokens_per_s.median for r in results if r.mode == "local"}
    for r in results:
        r.ratio_vs_local = r.decode_tokens_per_s.median / local[r.prompt_tokens]
    results.sort(key=lambda r: (config.modes.index(r.mode), r.prompt_tokens))
    load = bench_load(config, folder, counter) if config.clients else None
    counter.show("done")
    settings = {k: v for k, v in asdict(config).items() if k not in ("timeout_s", "curve_secret", "server_key")}
    settings |= {"model_path": str(folder), "curve": config.curve_secret is not None}  # encryption costs time; key paths say nothing
    settings["baseline_omp_wait_policy"] = baseline_policy  # local and hf-generate ran in their own process, under this
    if config.clients:
        settings["load_runner_torch_threads"] = LOAD_RUNNER_THREADS
    return BenchReport(machine, settings, results, load)


def _run_http(config: BenchConfig, progress: Progress | None) -> BenchReport:
    """The HTTP load test alone: it measures serve-tee as clients see it, not the modes of the other tables."""
    from tsqp.model.loading import resolve

    counter = ProgressCounter(len(config.shields) * (len(config.http_clients) + 1), progress)
    machine = machine_info()
    counter.show("converting the model")
    folder = resolve(config.model)
    http = bench_http(config, folder, counter)
    counter.show("done")
    settings = {k: v for k, v in asdict(config).items() if k not in ("timeout_s", "curve_secret", "server_key", "repeat", "clients", "batch")}
    settings |= {"model_path": str(folder), "curve": config.curve_secret is not None, **http_settings(http)}
    return BenchReport(machine, settings, [], http=http)


def run_with_progress(config: BenchConfig, console: Any) -> BenchReport:
    """`run` with a rich progress bar on `console` (stderr in the CLI)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("bench", total=None)
        return run(config, lambda d, done, total: bar.update(task, description=d, completed=done, total=total))


def bench_baselines(config: BenchConfig, folder: Path, counter: ProgressCounter) -> tuple[list[Result], dict[int, list[int]]]:
    """`local`, then `hf-generate` on the prompts `local` built (run by `baseline`, in its own process)."""
    results, prompts = _bench_local(config, folder, counter)
    return results + _bench_hf(config, folder, prompts, counter), prompts


def _bench_local(config: BenchConfig, folder: Path, counter: ProgressCounter) -> tuple[list[Result], dict[int, list[int]]]:
    from tsqp.tee.session import connect

    counter.show("local: loading the model")
    with connect(model=folder, local=True) as session:
        too_long = max(config.prompt_tokens) + config.new_tokens - session.model.config.max_seq_len
        if too_long > 0:
            raise TsqpError(f"prompt + new tokens exceed the model's {session.model.config.max_seq_len} positions by {too_long}")
        prompts = {n: prompt_ids(session.model.tokenizer, n, session.model.config.vocab_size) for n in config.prompt_tokens}
        session.prefill_chunk = config.prefill_chunk
        results = [_measure(config, "local", n, timed_generation(session, prompts[n], config.precompute), counter) for n in config.prompt_tokens]
    del session
    gc.collect()
    return results, prompts


def _bench_split(config: BenchConfig, folder: Path, prompts: dict[int, list[int]], counter: ProgressCounter) -> list[Result]:
    from tsqp.tee.private_server import closed_on_failure
    from tsqp.tee.session import Session, connect, shielded

    counter.show("starting the server and loading the model")
    server = private_server(config, folder)
    with closed_on_failure(server):  # the session owns the private server from here on and stops it on close
        session = connect(config.endpoint, folder, timeout_s=config.timeout_s, private_server=server, shield="plain", verify=False,
                          dtype=config.dtype, curve_secret=config.curve_secret, server_key=config.server_key, transport=config.transport, spin_us=config.spin_us)  # fmt: skip
    with session:
        pid = server.process.pid if server is not None else None  # a remote server's memory is out of reach
        results = []
        for mode in config.shields:  # one connection; each shield wraps it in turn
            shielding = config.shield(mode)
            backend = shielded(session.backend, session.model, shielding)
            shielded_session = Session(session.model, backend, prefill_chunk=shielding.prefill_chunk)
            results += [_measure(config, mode, n, timed_generation(shielded_session, prompts[n], config.precompute), counter, server_pid=pid,
                                 pool=getattr(getattr(backend, "shield", None), "pool", None))
                        for n in config.prompt_tokens]  # fmt: skip
            if backend is not session.backend:
                backend.shield.close()  # its pool's worker; the connection stays for the next mode
    del session
    gc.collect()
    return results


def _bench_hf(config: BenchConfig, folder: Path, prompts: dict[int, list[int]], counter: ProgressCounter) -> list[Result]:
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


def _measure(config: BenchConfig, mode: str, n: int, once: Callable[[int], Run], counter: ProgressCounter, server_pid: int | None = None,
             pool: Any = None) -> Result:  # fmt: skip
    """Warm up, then `config.repeat` timed runs of one configuration."""
    for pid in ("self", server_pid):
        if pid is not None:
            reset_peak_rss(pid)
    if pool is not None:
        pool.peak_bytes = pool.nbytes()
    counter.show(f"{mode} · {n} prompt tokens · warm-up")
    once(2)  # first calls allocate caches and buffers; keep that out of the numbers
    runs = []
    for i in range(config.repeat):
        counter.show(f"{mode} · {n} prompt tokens · run {i + 1}/{config.repeat}")
        runs.append(once(config.new_tokens))
        counter.done += 1
    peak = {"tee": peak_rss_mib("self"), "server": peak_rss_mib(server_pid) if server_pid is not None else None}
    pool_mib = pool.peak_bytes / 2**20 if pool is not None else 0.0
    if peak["tee"] is not None:
        peak["tee_without_pool"] = peak["tee"] - pool_mib  # the pool's peak bytes taken out of the process's peak
    verify = config.shield(mode).verifies if mode in config.shields else False
    return aggregate(mode, verify, n, config.new_tokens, runs, peak, pool_mib)


def timed_generation(session: Any, ids: list[int], precompute: bool = False) -> Callable[[int], Run]:
    """One generation through the shared `generate` loop, wire counters split at the first token.

    A shield's masks are made during the run (by the pool's worker beside the calls, or by a
    call that finds the pool short: online time), or with `precompute` the pool is filled for
    the whole run (prompt and answer) before it starts, as every run was measured before the
    pool had a worker. Offline time is what making them took, wherever.
    """
    from tsqp.tee.generation import generate

    stats = getattr(session.backend, "stats", None)  # WireStats of a RemoteBackend; local has none
    shield = getattr(session.backend, "shield", None)

    def counters() -> dict[str, float]:
        return {**_wire(stats), "stall_s": shield.times.stall_s if shield is not None else 0.0}

    def once(new_tokens: int) -> Run:
        offline_before = stall_before = 0.0
        if shield is not None:
            offline_before, stall_before = shield.times.offline_s, shield.times.stall_s
            if precompute:
                shield.prepare(len(ids) + new_tokens - 1, logits_rows=new_tokens)  # what the run uses, no more
        marks: list[dict[str, float]] = []

        def on_token(_: int) -> None:
            if not marks:  # the first token: the prefill is done, no decode forward yet
                marks.append(counters())

        result = generate(session.llama, ids, new_tokens, eos_ids=(), on_token=on_token, prefill_chunk=session.prefill_chunk)
        t, after = result.timings, counters()
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
            mask_stall_s=d["stall_s"],
            offline_s=shield.times.offline_s - offline_before if shield is not None else 0.0,
            stall_s=shield.times.stall_s - stall_before if shield is not None else 0.0,
        )

    return once


def _wire(stats: Any) -> dict[str, float]:
    keys = ("round_trips", "bytes_sent", "bytes_received", "round_trip_s", "server_s", "serialize_s", "mask_s", "unmask_s", "verify_s")
    counters = stats.as_dict() if stats is not None else {}
    return {k: float(counters.get(k, 0.0)) for k in keys}


def _hf_run(model: Any, ids: list[int]) -> Callable[[int], Run]:
    """transformers' generate, greedy, exactly `new_tokens` tokens, timed at each token it hands its streamer.

    Prefill = start to the first new token (prefill plus one sampling); decode tokens/s = (N - 1) over the
    time from the first new token to the last. (Two generates of 1 and N tokens, subtracted, gave nonsense
    on a 1B model: the prefill's own variation outweighed 3 decode steps.)
    """
    import torch

    input_ids = torch.tensor([ids])
    attention_mask = torch.ones_like(input_ids)

    def once(new_tokens: int) -> Run:
        stamps = _TokenStamps()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=0, streamer=stamps)  # fmt: skip
        assert out.shape[1] == len(ids) + new_tokens and len(stamps.times) == new_tokens
        first, last = stamps.times[0], stamps.times[-1]
        return Run(prefill_s=first - started, decode_tokens_per_s=(new_tokens - 1) / (last - first) if new_tokens > 1 else 0.0)

    return once


class _TokenStamps:
    """transformers' streamer interface: `put` gets the prompt, then each new token; we keep when each came."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if self._prompt_seen:
            self.times.extend([time.perf_counter()] * value.numel())
        self._prompt_seen = True

    def end(self) -> None:
        pass
