"""The command line as users meet it: help, JSON output, streaming, one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import start_server
from typer.testing import CliRunner

from tsqp.cli.app import app
from tsqp.model.loading import load

runner = CliRunner()


def tsqp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsqp", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("command, options", [
    ("run-tee", ["--prompt", "--model", "--endpoint", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--repetition-penalty", "--stop", "--system", "--seed", "--json", "--no-chat", "--local", "--shield", "--verify", "--precompute", "--research-shields", "--accept-lower-precision", "--pool-mib", "--prefill-chunk"]),
    ("chat", ["--model", "--endpoint", "--system", "--max-new-tokens", "--stop", "--top-k", "--shield"]),
    ("models", ["--json", "--fingerprints"]),
    ("ping", ["--timeout", "--json", "--curve-secret"]),
    ("serve-gpu", ["--model", "--endpoint", "--device", "--dtype", "--record", "--fault-rate"]),
    ("check-grad", ["--path", "--model", "--endpoint"]),
])  # fmt: skip
def test_help_explains_every_option(command: str, options: list[str]) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in options:
        assert option in result.output
    assert "Example" in result.output


def test_run_tee_json_local_and_remote_agree(tiny_chat_path: Path) -> None:
    args = ["run-tee", "--model", str(tiny_chat_path), "--prompt", "Hello there", "--max-new-tokens", "12", "--json"]
    local = runner.invoke(app, [*args, "--local"])
    assert local.exit_code == 0, local.output
    local_out = json.loads(local.stdout)
    assert set(local_out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "timings", "shield"}
    assert len(local_out["token_ids"]) == 12 and local_out["prompt_token_ids"][0] == 1
    running = start_server(load(tiny_chat_path, with_tokenizer=False))
    try:
        remote = runner.invoke(app, [*args, "--endpoint", running.endpoint])
    finally:
        running.close()
    assert remote.exit_code == 0, remote.output
    remote_out = json.loads(remote.stdout)
    assert remote_out["token_ids"] == local_out["token_ids"]
    assert remote_out["shield"]["shield"] == "otp" and remote_out["shield"]["verify"]  # the default: protected and checked
    t = remote_out["timings"]
    assert t["round_trips"] == 12 * (4 * 3 + 1)  # 12 forwards of a 3-layer model; the embedding stays in the TEE
    assert t["masked_rows"] > 0 and t["offline_s"] > 0
    assert t["bytes_sent"] > 0 and t["bytes_received"] > 0 and t["prefill_s"] > 0
    running = start_server(load(tiny_chat_path, with_tokenizer=False))
    try:
        offloaded = runner.invoke(app, [*args, "--endpoint", running.endpoint, "--offload-attention-from", "4", "--shield", "plain", "--no-verify"])
    finally:
        running.close()
    assert offloaded.exit_code == 0, offloaded.output
    offloaded_out = json.loads(offloaded.stdout)
    assert offloaded_out["token_ids"] == local_out["token_ids"]
    assert offloaded_out["timings"]["round_trips"] == 12 * (4 * 3 + 2) + 2 * 3  # + EMBED per forward, QKᵀ and AV of the prefill per layer


def test_run_tee_streams_text(tiny_chat_path: Path) -> None:
    result = runner.invoke(app, ["run-tee", "--model", str(tiny_chat_path), "--prompt", "Hi", "-n", "8", "--local", "--temperature", "0.8", "--seed", "3"])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["run-tee", "--model", str(tiny_chat_path), "--prompt", "Hi", "-n", "8", "--local", "--temperature", "0.8", "--seed", "3"])
    assert result.stdout.strip() and result.stdout == again.stdout  # seeded sampling repeats


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    result = tsqp("run-tee", "--prompt", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 1
    assert "not found" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_server_is_a_clear_error_in_bounded_time(tiny_chat_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    result = tsqp("run-tee", "--prompt", "hi", "--model", str(tiny_chat_path), "--endpoint", f"tcp://127.0.0.1:{port}", "--connect-timeout", "1", timeout=60)
    assert result.returncode == 4  # the server is unavailable
    assert "nothing answers" in result.stderr and "serve-gpu" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 15  # start-up and 1 s, not the reply timeout: nothing loads before the check


def test_check_grad_is_clean_on_the_split_path(tiny_chat_path: Path) -> None:
    result = tsqp("check-grad", "--model", str(tiny_chat_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["clean"] and report["tensors_sent"] > 0 and report["tensors_requiring_grad"] == 0
    assert not report["grad_enabled_in_core"]
    assert "requires grad" in report["control_error"]


def test_check_grad_flags_a_planted_file(tiny_chat_path: Path, tmp_path: Path) -> None:
    planted = tmp_path / "runner.py"
    planted.write_text("import torch\n\ndef forward(x, w):\n    hidden = x @ w\n    return hidden.numpy()\n")
    result = tsqp("check-grad", "--model", str(tiny_chat_path), "--path", str(planted))
    assert result.returncode == 1
    assert "runner.py:5" in result.stdout and "not clean" in result.stdout


def test_check_grad_on_the_project_itself(tiny_chat_path: Path) -> None:
    sources = sorted(str(p) for p in (Path(__file__).parent.parent / "tsqp").rglob("*.py"))
    args = [arg for path in sources for arg in ("--path", path)]
    result = tsqp("check-grad", "--model", str(tiny_chat_path), *args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("shield", ["otp", "plain"])
def test_run_tee_against_a_lying_server_exits_with_an_integrity_error(shield: str, tiny_chat_path: Path) -> None:
    running = start_server(load(tiny_chat_path, with_tokenizer=False), fault_rate=0.05, fault_seed=3)
    try:
        result = tsqp("run-tee", "--model", str(tiny_chat_path), "--endpoint", running.endpoint, "--prompt", "Hello there",
                      "-n", "64", "--shield", shield, "--verify", "--json")  # fmt: skip
    finally:
        running.close()
    assert result.returncode == 3, result.stderr
    assert "integrity" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # no answer printed: nothing wrong is ever shown as one
    assert running.server.stats.faults_injected >= 1


def test_shield_errors_are_one_line(tiny_chat_path: Path) -> None:
    result = tsqp("run-tee", "--model", str(tiny_chat_path), "--prompt", "Hi", "--shield", "rot13")
    assert result.returncode == 1 and "--shield 'rot13' is not one of plain, otp, noise, seqmix" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shield", ["noise", "seqmix"])
def test_broken_shields_are_refused_without_the_research_option(shield: str, tiny_chat_path: Path) -> None:
    result = tsqp("run-tee", "--model", str(tiny_chat_path), "--prompt", "Hi", "--shield", shield)
    assert result.returncode == 1 and f"the {shield} shield is broken" in result.stderr and "--research-shields" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_research_option_runs_a_broken_shield(tiny_chat_path: Path) -> None:
    result = tsqp("run-tee", "--model", str(tiny_chat_path), "--prompt", "Hi", "--shield", "seqmix", "--research-shields", "-n", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shield"]["shield"] == "seqmix"


def test_attention_offload_under_a_shield_is_refused_up_front(tiny_chat_path: Path) -> None:
    result = tsqp("run-tee", "--model", str(tiny_chat_path), "--prompt", "Hi", "--offload-attention-from", "4")
    assert result.returncode == 1 and "--shield plain --no-verify" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
@pytest.mark.parametrize("command", ["run-tee", "serve-gpu"])
def test_device_cuda_without_cuda_fails_before_anything_starts(command: str, tmp_path: Path) -> None:
    args = ("-p", "hi") if command == "run-tee" else ()
    started = time.monotonic()
    result = tsqp(command, "--model", str(tmp_path / "never-loaded.gguf"), "--device", "cuda", *args)
    assert result.returncode == 1 and "no CUDA device" in result.stderr, result.stderr  # not "model not found": checked first
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("command", "args"), [("serve-gpu", ("--threads", "0")), ("run-tee", ("-p", "hi", "--dtype", "int8"))])
def test_out_of_range_options_are_usage_errors(command: str, args: tuple[str, ...]) -> None:
    result = tsqp(command, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
