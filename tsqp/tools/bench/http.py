"""The HTTP load test: N clients stream completions from one `tsqp serve-tee` at once (continuous batching inside).

Per shield, one serve-tee process (with its private accelerator server, or --endpoint's);
client i sends the first prompt size shifted by i tokens along the prompt text, greedy,
exactly `new_tokens` tokens (`ignore_eos`), streamed over SSE. Reference answers come from
the same server, one request at a time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsqp.errors import TsqpError
from tsqp.tools.bench.config import BenchConfig, ProgressCounter, prompt_ids
from tsqp.tools.bench.results import HttpLoadResult, percentile
from tsqp.wire.endpoints import HTTP_READY

START_TIMEOUT_S = 300.0


@contextmanager
def serve_tee_process(args: Sequence[str], timeout_s: float = START_TIMEOUT_S) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A `tsqp serve-tee` on a free port; yields the process and its base URL once it prints its ready line, stops it after."""
    process = subprocess.Popen([sys.executable, "-m", "tsqp", "serve-tee", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = _wait_ready(process, timeout_s)
        yield process, url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()


def _wait_ready(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None and process.stderr is not None
    found: list[str] = []

    def read() -> None:  # readline blocks: a thread keeps the deadline ours
        for line in process.stdout:  # type: ignore[union-attr]
            if line.startswith(HTTP_READY):
                found.append(line.split(" on ", 1)[1].split(" ", 1)[0])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not found:
        if process.poll() is None:
            process.kill()
        process.wait()
        tail = process.stderr.read().strip().splitlines()
        raise TsqpError(f"tsqp serve-tee did not get ready: {tail[-1] if tail else 'no output'}")
    return found[0]


@dataclass
class _Outcome:
    """One streamed request, timed on this side."""

    token_ids: list[int] = field(default_factory=list)
    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival time of every text chunk
    done: float = 0.0
    error: str | None = None


def complete(url: str, model: str, prompt: list[int], new_tokens: int, timeout_s: float) -> _Outcome:
    """One greedy streamed completion of exactly `new_tokens` tokens."""
    import httpx

    outcome = _Outcome(sent=time.perf_counter())
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True, "ignore_eos": True, "return_token_ids": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout_s) as reply:
            if reply.status_code != 200:
                outcome.error = f"HTTP {reply.status_code}: {reply.read().decode(errors='replace')[:200]}"
                return outcome
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome.error = chunk["error"]["message"]
                    break
                for choice in chunk.get("choices", []):
                    outcome.chunks.append(time.perf_counter())
                    outcome.token_ids = choice.get("token_ids", outcome.token_ids)
    except httpx.HTTPError as e:
        outcome.error = f"{type(e).__name__}: {e}"
    outcome.done = time.perf_counter()
    return outcome


def bench_http(config: BenchConfig, folder: Path, counter: ProgressCounter) -> list[HttpLoadResult]:
    """For each --shields mode: one serve-tee, single-request reference answers, then each client count at once."""
    from tsqp.model.loading import load_tokenizer

    has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    tokenizer = load_tokenizer(folder) if has_tokenizer else None
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompts = [prompt_ids(tokenizer, config.prompt_tokens[0] + i, vocab)[i:] for i in range(max(config.http_clients))]
    results = []
    for shield in config.shields:
        counter.show(f"http {shield}: starting serve-tee")
        masks = _mask_rows(config, shield)
        with serve_tee_process(_serve_args(config, folder, shield, masks)) as (_, url):
            complete(url, str(folder), prompts[0], 2, config.timeout_s)  # warm-up: first calls allocate buffers
            counter.show(f"http {shield}: single-request reference answers for {len(prompts)} prompts")
            reference = [_checked(complete(url, str(folder), p, config.new_tokens, config.timeout_s)).token_ids for p in prompts]
            counter.done += 1
            for n in config.http_clients:
                counter.show(f"http {shield}: waiting for the offline phase ({masks} mask rows)" if masks else f"http {shield}: {n} clients")
                _wait_for_masks(url, masks, config.timeout_s * 10)
                counter.show(f"http {shield}: {n} concurrent client{'s' if n > 1 else ''}")
                results.append(_round(url, str(folder), shield, prompts[:n], reference, config))
                counter.done += 1
    return results


def _mask_rows(config: BenchConfig, shield: str) -> int:
    """Mask rows the largest round consumes per call site: made in the offline phase, before each round (otp and noise)."""
    return max(config.http_clients) * (config.prompt_tokens[0] + config.new_tokens) if shield in ("otp", "noise") else 0


def _wait_for_masks(url: str, rows: int, timeout_s: float) -> None:
    """Until serve-tee's idle engine holds `rows` mask rows: the offline phase is not what a round measures."""
    deadline = time.monotonic() + timeout_s
    while rows and (_stats(url).get("masks_ready") or 0) < rows:
        if time.monotonic() > deadline:
            raise TsqpError(f"http load test: serve-tee did not make {rows} mask rows within {timeout_s:g} s")
        time.sleep(0.5)


def _stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/stats", timeout=30).json()


def _serve_args(config: BenchConfig, folder: Path, shield: str, masks: int) -> list[str]:
    args = ["--model", str(folder), "--shield", shield, "--max-batch", str(max(config.http_clients)), "--timeout", str(config.timeout_s),
            "--device", config.device, "--dtype", config.dtype, "--precompute", str(masks)]  # fmt: skip
    if config.verify is not None:
        args.append("--verify" if config.verify else "--no-verify")
    if config.endpoint is not None:
        args += ["--endpoint", config.endpoint]
    if config.curve_secret and config.server_key:
        args += ["--curve-secret", config.curve_secret, "--server-key", config.server_key]
    return args


def _round(url: str, model: str, shield: str, prompts: list[list[int]], reference: list[list[int]], config: BenchConfig) -> HttpLoadResult:
    outcomes: list[_Outcome] = [_Outcome() for _ in prompts]
    release = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        release.wait()
        outcomes[i] = complete(url, model, prompts[i], config.new_tokens, config.timeout_s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    before = _stats(url)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _stats(url)
    steps = after["steps"] - before["steps"]
    for o in outcomes:
        _checked(o)
    wall = max(o.done for o in outcomes) - min(o.sent for o in outcomes)
    tokens = sum(len(o.token_ids) for o in outcomes)
    latency = [1000 * (o.done - o.sent) for o in outcomes]
    first = [1000 * (o.chunks[0] - o.sent) for o in outcomes if o.chunks]
    gaps = [1000 * (b - a) for o in outcomes for a, b in zip(o.chunks, o.chunks[1:])]
    mismatched = [i for i, o in enumerate(outcomes) if o.token_ids != reference[i]]
    return HttpLoadResult(shield=shield, clients=len(prompts), aggregate_tokens_per_s=tokens / wall if wall > 0 else 0.0, wall_s=wall, tokens=tokens,
                          latency_ms=_percentiles(latency), first_token_ms=_percentiles(first), inter_token_ms=_percentiles(gaps),
                          answers_match_single_client=not mismatched, mismatched_clients=mismatched, steps=steps,
                          round_trips_per_step=(after.get("round_trips", 0) - before.get("round_trips", 0)) / max(steps, 1),
                          offline_s=_delta(before, after, "offline_s") - _delta(before, after, "idle_offline_s"))  # fmt: skip


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> float:
    return float(after.get(key) or 0.0) - float(before.get(key) or 0.0)


def _percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def _checked(outcome: _Outcome) -> _Outcome:
    if outcome.error is not None:
        raise TsqpError(f"http load test: a request failed: {outcome.error}")
    return outcome


def http_settings(results: list[HttpLoadResult]) -> dict[str, Any]:
    """What the report says about the HTTP rounds beyond their rows: the speed-up of the largest client count over one."""
    speedups = {}
    for shield in dict.fromkeys(r.shield for r in results):
        rows = {r.clients: r.aggregate_tokens_per_s for r in results if r.shield == shield}
        if 1 in rows and len(rows) > 1 and rows[1] > 0:
            speedups[shield] = rows[max(rows)] / rows[1]
    return {"http_speedup_vs_one_client": speedups}
