"""`tsqp bench` on a tiny model: every mode and prompt size measured, a consistent JSON, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import RunningServer
from typer.testing import CliRunner

from tsqp.cli.app import app
from tsqp.model.loading import load_tokenizer
from tsqp.tools.bench import runs
from tsqp.tools.bench.config import BenchConfig, prompt_ids
from tsqp.tools.bench.plot import plot
from tsqp.tools.bench.results import PARTS, BenchReport, Run, aggregate, percentile

runner = CliRunner()
SHIELDED = ("plain", "otp", "noise", "seqmix")
SIZES = (8, 16)
N_LAYERS = 3  # the tiny models of conftest
TINY_RUN = ["--prompt-tokens", "8,16", "--new-tokens", "6", "--repeat", "2"]
CLIENTS = [1, 2]


@pytest.fixture(scope="module")
def report(tiny_chat_path: Path) -> BenchReport:
    """One library run for every test that reads a report: every mode and size, and the load test (--clients)
    on the first mode and size (plain, 8 tokens). A run without --clients: `test_cli_writes_json_and_prints_the_table`."""
    return runs.run(BenchConfig(model=str(tiny_chat_path), prompt_tokens=list(SIZES), new_tokens=6, repeat=2, clients=CLIENTS))


def check_report(data: dict[str, Any], verify: bool | None = None, shields: tuple[str, ...] = SHIELDED) -> None:
    """Every field the issue asks for, for every mode and size, with consistent numbers."""
    assert {"machine", "results"} <= set(data)
    for key in ("cpu_count", "cpu_model", "torch", "torch_threads", "platform"):
        assert data["machine"][key], key
    results = data["results"]
    assert [(r["mode"], r["prompt_tokens"]) for r in results] == [(m, n) for m in ("hf-generate", "local", *shields) for n in SIZES]
    for r in results:
        where = f"{r['mode']} at {r['prompt_tokens']} tokens"
        split = r["mode"] in SHIELDED
        assert r["verify"] is (split and (r["mode"] == "otp" if verify is None else verify)), where
        for key in ("prefill_s", "decode_tokens_per_s"):
            s = r[key]
            assert set(s) == {"median", "min", "max"}
            assert 0 < s["min"] <= s["median"] <= s["max"], (where, key, s)
        parts = r["breakdown_ms_per_token"]
        assert set(parts) == set(PARTS), where
        assert all(v >= 0 for v in parts.values()), (where, parts)
        if r["mode"] in ("otp", "noise", "seqmix") or r["verify"]:  # verified plain is fixed point: quantized, lifted back
            assert parts["mask_unmask"] > 0, where
        else:  # plain's mask is the identity: no wrapper at all
            assert parts["mask_unmask"] == 0, where
        assert (parts["verify"] > 0) is r["verify"], where
        step_ms = 1000 / r["decode_tokens_per_s"]["median"]
        assert sum(parts.values()) == pytest.approx(step_ms, rel=0.1), (where, parts, step_ms)
        assert parts["tee_compute"] > 0, where
        assert (r["offline_s_per_token"] > 0) is (r["mode"] in ("otp", "noise")), where  # the modes with a mask pool
        assert r["ratio_vs_local"] > 0
        assert r["peak_rss_mib"]["tee"] > 0
        assert (r["pool_peak_mib"] > 0) is (r["mode"] in ("otp", "noise")), where
        assert r["peak_rss_mib"]["tee_without_pool"] == pytest.approx(r["peak_rss_mib"]["tee"] - r["pool_peak_mib"]), where
        assert len(r["runs"]) == 2
        if split:
            # four LINEAR calls per layer and LM_HEAD; plain also sends the token ids to EMBED
            assert r["round_trips_per_token"] == 4 * N_LAYERS + 1 + (r["mode"] == "plain"), where
            assert r["bytes_per_token"] > 0
            assert parts["serialization"] > 0 and parts["wire"] > 0 and parts["server_compute"] > 0, (where, parts)
            assert r["peak_rss_mib"]["server"] > 0
        else:
            assert r["round_trips_per_token"] == 0 and r["bytes_per_token"] == 0, where
            assert parts["serialization"] == parts["wire"] == parts["server_compute"] == 0, where
            assert r["peak_rss_mib"]["server"] is None
        if r["mode"] == "local":
            assert r["ratio_vs_local"] == 1.0


def test_library_run_measures_every_mode_and_size(report: BenchReport) -> None:
    data = json.loads(json.dumps(report.to_json()))  # what --json writes
    check_report(data)
    assert data["settings"]["new_tokens"] == 6 and data["settings"]["shields"] == list(SHIELDED)


def test_the_baselines_run_in_their_own_process_with_active_openmp_waits(report: BenchReport) -> None:
    """local and hf-generate own every core: their OpenMP threads wait actively, while this process (the split's
    runner) keeps tsqp's PASSIVE setting, which a process cannot change once OpenMP has started."""
    assert report.settings["baseline_omp_wait_policy"] == "ACTIVE"
    assert report.machine["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY") != "ACTIVE"
    assert {r.mode for r in report.results} >= {"local", "hf-generate"} and all(r.runs for r in report.results)


def test_cli_writes_json_and_prints_the_table(tiny_chat_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--model", str(tiny_chat_path), *TINY_RUN, "--shields", "plain,otp", "--verify", "--json", str(out),
                                 "--precompute", "--prefill-chunk", "5", "--pool-mib", "2"], env={"COLUMNS": "80"})  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    check_report(data, verify=True, shields=("plain", "otp"))
    assert "load" not in data  # no --clients, no load test
    assert (data["settings"]["precompute"], data["settings"]["prefill_chunk"], data["settings"]["pool_mib"]) == (True, 5, 2)
    for mode in ("hf-generate", "local", "plain", "otp"):
        assert mode in result.stdout
    assert "prefill s" in result.stdout and "wire" in result.stdout


def test_json_dash_prints_only_json(report: BenchReport, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "run", lambda config, progress=None: report)
    result = runner.invoke(app, ["bench", "--json", "-"])
    assert result.exit_code == 0, result.output
    check_report(json.loads(result.stdout))


def tsqp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsqp", *args], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("shields", ["rot13", "plain,bogus"])
def test_unknown_shield_is_a_one_line_error(shields: str) -> None:
    result = tsqp("bench", "--shields", shields)
    assert result.returncode == 1
    assert "unknown shield" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_prompt_tokens_is_an_error() -> None:
    result = runner.invoke(app, ["bench", "--prompt-tokens", "32,lots"])
    assert result.exit_code == 1
    assert "comma list of integers" in result.output


def test_help_explains_every_option() -> None:
    result = runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--shields", "--verify", "--no-verify", "--prompt-tokens", "--new-tokens", "--repeat", "--json", "--endpoint", "--plot",
                   "--precompute", "--pool-mib", "--prefill-chunk"):  # fmt: skip
        assert option in result.output
    assert "Freivalds" in result.output and "Example" in result.output


def test_prompts_have_exactly_n_tokens(tiny_chat_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_chat_path)
    for n in (1, 8, 100, 512):
        ids = prompt_ids(tokenizer, n, 49152)
        assert len(ids) == n and ids == prompt_ids(tokenizer, n, 49152)
        assert tokenizer.bos_token_id not in ids  # plain text, no chat template or special tokens
    no_tokenizer = prompt_ids(None, 300, 320)
    assert len(no_tokenizer) == 300 and all(0 <= i < 320 for i in no_tokenizer)
    assert no_tokenizer == prompt_ids(None, 300, 320)


def test_breakdown_adds_up_to_the_median_step() -> None:
    runs = [Run(prefill_s=0.1 * i, decode_tokens_per_s=tps, serialization_s=0.001, wire_s=0.002, server_s=0.003, round_trips=14, bytes=1000)
            for i, tps in enumerate([50.0, 100.0, 40.0, 80.0], start=1)]  # fmt: skip
    r = aggregate("plain", False, 8, 6, runs, {"tee": 1.0, "server": 2.0})
    assert (r.decode_tokens_per_s.min, r.decode_tokens_per_s.median, r.decode_tokens_per_s.max) == (40.0, 65.0, 100.0)
    assert r.ms_per_token == pytest.approx(1000 / 65)
    assert sum(r.breakdown_ms_per_token.values()) == pytest.approx(1000 / 65)
    assert r.breakdown_ms_per_token["server_compute"] == pytest.approx(3.0 * (1000 / 65) / (1000 / 50))  # the median run (50 tok/s), scaled


def test_a_decode_call_waiting_for_its_masks_is_counted_as_a_stall_not_as_tee(tiny_path: Path, tiny_server: RunningServer,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Each otp call here waits 2 ms in the pool (as when the worker has not made its masks yet): a decoded token's
    stall is at least those waits, apart from TEE compute, and the breakdown still adds up to the step."""
    from tsqp.shields.pool import MaskPool
    from tsqp.tee.session import connect

    take = MaskPool.take

    def slow_take(pool: MaskPool, site: Any, rows: int) -> Any:
        started = time.perf_counter()
        time.sleep(0.002)
        pool.times.stall_s += time.perf_counter() - started
        return take(pool, site, rows)

    monkeypatch.setattr(MaskPool, "take", slow_take)
    with connect(tiny_server.endpoint, tiny_path, shield="otp") as session:
        run = runs.timed_generation(session, list(range(3, 11)))(4)
    calls_per_token = 4 * N_LAYERS + 1  # LINEAR calls and LM_HEAD, each with its masks
    assert run.mask_stall_s >= calls_per_token * 0.002
    assert run.stall_s > run.mask_stall_s  # the prefill's waits too, over the whole run
    r = aggregate("otp", True, 8, 4, [run], {"tee": 1.0, "server": 2.0})
    assert r.breakdown_ms_per_token["mask_stall"] == pytest.approx(1000 * run.mask_stall_s)  # one run: no scaling
    assert sum(r.breakdown_ms_per_token.values()) == pytest.approx(1000 / run.decode_tokens_per_s)


def test_plot_without_matplotlib_is_a_clear_error(report: BenchReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = runner.invoke(app, ["bench", "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 1
    assert "pip install matplotlib" in result.output


def test_plot_draws_stacked_bars(report: BenchReport, tmp_path: Path) -> None:
    import matplotlib  # noqa: F401  (a test dependency: the plot is checked, not skipped)

    path = tmp_path / "bench.png"
    plot(report, path)
    assert path.read_bytes().startswith(b"\x89PNG")


# --- load test (--clients) -------------------------------------------------------


def check_load(data: dict[str, Any], clients: list[int]) -> None:
    load = data["load"]
    assert [r["clients"] for r in load] == clients
    for r in load:
        assert {"clients", "aggregate_tokens_per_s", "step_ms", "answers_match_single_client"} <= set(r)
        assert r["aggregate_tokens_per_s"] > 0
        assert set(r["step_ms"]) == {"p50", "p99"}
        assert 0 < r["step_ms"]["p50"] <= r["step_ms"]["p99"], r
        assert r["answers_match_single_client"] is True, r
        assert r["tokens"] == 6 * r["clients"] and r["wall_s"] > 0
        assert r["shield"] == "plain", r  # the runners' sessions say so: the mode asked, not connect's default


def test_the_tables_fit_80_columns_without_cutting_a_header_or_number(report: BenchReport) -> None:
    """Written to a file or a pipe, rich assumes 80 columns: every table must fit, with no cell cut to "…"."""
    import io

    from rich.console import Console

    from tsqp.tools.bench.report import render_table

    console = Console(width=80, file=io.StringIO(), record=True)
    console.print(render_table(report))
    text = console.export_text()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "otp +verify" in text  # the widest mode name, whole
    for header in ("decode tok/s", "srv MiB", "total", "stall", "verif", "server", "trips", "KiB", "offline ms", "pool MiB", "aggregate tok/s"):
        assert header in text, header


def test_load_test_runs_concurrent_clients_against_one_server(report: BenchReport) -> None:
    data = json.loads(json.dumps(report.to_json()))
    check_load(data, CLIENTS)
    assert data["settings"]["clients"] == CLIENTS


def test_load_table_and_mismatch_exit(report: BenchReport, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runs, "run", lambda config, progress=None: report)
    out = tmp_path / "load.json"
    result = runner.invoke(app, ["bench", "--clients", "1,2", "--json", str(out)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    check_load(json.loads(out.read_text()), [1, 2])
    assert "load test" in result.stdout and "aggregate" in result.stdout and "match" in result.stdout
    assert report.load is not None
    report.load[1].answers_match_single_client = False  # what a server mixing up sessions would cause
    try:
        result = runner.invoke(app, ["bench", "--clients", "1,2"])
    finally:
        report.load[1].answers_match_single_client = True
    assert result.exit_code == 1
    assert "answers differ" in result.output and "server bug" in result.output


@pytest.mark.parametrize("text", ["0", "1,two", ""])
def test_bad_clients_is_an_error(text: str) -> None:
    result = runner.invoke(app, ["bench", "--clients", text])
    assert result.exit_code == 1
    assert "--clients" in result.output


def test_percentile() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


# --- HTTP load test (--http-clients) ------------------------------------------------------


def test_http_load_test_streams_concurrent_requests_through_serve_tee(tiny_chat_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    result = runner.invoke(app, ["bench", "--model", str(tiny_chat_path), "--shields", "plain,otp", "--prompt-tokens", "8", "--new-tokens", "5",
                                 "--http-clients", "1,3", "--json", str(out)], env={"COLUMNS": "120"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "HTTP load test" in result.stdout and "trips/step" in result.stdout
    data = json.loads(out.read_text())
    assert data["results"] == [] and [(r["shield"], r["clients"]) for r in data["http"]] == [("plain", 1), ("plain", 3), ("otp", 1), ("otp", 3)]
    for r in data["http"]:
        assert r["tokens"] == 5 * r["clients"] and r["aggregate_tokens_per_s"] > 0 and r["answers_match_single_client"] is True, r
        for key in ("latency_ms", "first_token_ms", "inter_token_ms"):
            assert set(r[key]) == {"p50", "p90", "p99"} and 0 < r[key]["p50"] <= r[key]["p99"], (key, r)
        assert r["first_token_ms"]["p50"] <= r["latency_ms"]["p50"]
    trips = {(r["shield"], r["clients"]): r["round_trips_per_step"] for r in data["http"]}
    # continuous batching: a step costs the same round trips for 3 clients as for 1 (a 3-layer model: 4 per layer + lm_head, + EMBED under plain)
    assert trips[("plain", 1)] == trips[("plain", 3)] == 4 * 3 + 2 and trips[("otp", 1)] == trips[("otp", 3)] == 4 * 3 + 1
    otp = [r for r in data["http"] if r["shield"] == "otp"]
    # The masks were made before each round, in the offline phase: at most a refill racing the round's start is left in it.
    assert all(r["offline_s"] < 0.05 for r in otp), [(r["offline_s"], r["steps"]) for r in otp]
    assert set(data["settings"]["http_speedup_vs_one_client"]) == {"plain", "otp"}


def test_per_call_times_every_hot_op_over_both_transports(tiny_chat_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "calls.json"
    result = runner.invoke(app, ["bench", "--model", str(tiny_chat_path), "--per-call", "--json", str(out)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["per_call"]
    ops = ("EMBED", "LINEAR q|k|v", "LINEAR o", "LINEAR gate|up", "LINEAR down", "LM_HEAD")
    assert [(r["transport"], r["op"]) for r in rows] == [(t, op) for t in ("zmq", "shm") for op in ops]
    for r in rows:
        assert r["round_trip_us"] > r["server_us"] > 0
        assert r["overhead_us"] == pytest.approx(r["round_trip_us"] - r["server_us"])
    assert "overhead" in result.stdout and "LM_HEAD" in result.stdout


def test_hf_generate_is_timed_at_each_token_it_streams(tiny_hf: Any) -> None:
    """One generate, stamped per token: two generates of 1 and N tokens, subtracted, had given a 1B model
    3e9 tokens/s (its prefill varied by more than 3 decode steps took)."""
    run = runs._hf_run(tiny_hf, list(range(5, 29)))(4)
    assert 0 < run.prefill_s < 60
    assert 0 < run.decode_tokens_per_s < 1e6  # a real rate: each token stamped as generate handed it out
