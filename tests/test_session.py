"""Sessions with a private server: lifecycle, a server dying mid-generation, the Python example."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsqp.errors import InputError, ServerUnavailable, ShieldError
from tsqp.tee.session import connect


def test_private_server_killed_mid_generation_fails_fast(tiny_path: Path) -> None:
    session = connect(None, tiny_path, timeout_s=60)
    server = session.private_server
    assert server is not None and server.alive()
    calls = 0
    linear = session.backend.linear

    def linear_then_kill(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 40:
            os.kill(server.process.pid, signal.SIGKILL)
        return linear(*args, **kwargs)

    session.backend.linear = linear_then_kill
    started = time.monotonic()
    try:
        with pytest.raises(ServerUnavailable, match="went away"):
            session.generate(list(range(3, 20)), max_new_tokens=100)
    finally:
        session.close()
    assert time.monotonic() - started < 5  # noticed at once, not after the 60 s deadline


def test_remote_generation_equals_local(tiny_path: Path) -> None:
    with connect(None, tiny_path) as remote, connect(None, tiny_path, local=True) as local:
        prompt = list(range(40, 60))
        assert remote.generate(prompt, 20).token_ids == local.generate(prompt, 20).token_ids
    assert not remote.private_server.alive()


def test_python_api_example_runs(tiny_chat_path: Path) -> None:
    example = Path(__file__).parent.parent / "examples" / "python_api.py"
    run = subprocess.run([sys.executable, str(example), "--model", str(tiny_chat_path), "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "6 tokens" in run.stdout and "round trips" in run.stdout


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize(("prompt", "message"), [("", "the prompt is empty"), ("caf\udce9", "not valid UTF-8")])
def test_empty_and_non_utf8_prompts_are_refused_with_or_without_the_chat_template(prompt: str, message: str, chat: bool, tiny_chat_path: Path) -> None:
    with connect(model=tiny_chat_path, local=True) as session:
        with pytest.raises(InputError, match=message):
            session.generate(prompt, max_new_tokens=2, chat=chat)


def test_cli_refuses_a_prompt_of_invalid_utf8_bytes_in_one_line(tiny_chat_path: Path) -> None:
    command = [sys.executable, "-m", "tsqp", "run-tee", "--local", "--model", str(tiny_chat_path), "-p", b"caf\xe9"]
    result = subprocess.run(command, capture_output=True, timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr and "not valid UTF-8" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("shield", ["noise", "seqmix"])
def test_connect_refuses_a_broken_shield_unless_allowed(shield: str, tiny_path: Path) -> None:
    with pytest.raises(ShieldError, match=f"the {shield} shield is broken"):
        connect(None, tiny_path, shield=shield)
    with connect(model=tiny_path, local=True, shield=shield, allow_broken=True) as session:  # research: allowed
        assert session.generate(list(range(3, 9)), max_new_tokens=2).token_ids


def test_a_bfloat16_model_stays_in_its_file_and_every_exact_shield_gives_the_local_tokens(tmp_path: Path) -> None:
    """The weights stay as the file holds them (bfloat16, file pages the TEE never copies); whoever
    computes converts, so local, plain and otp still agree token for token."""
    import torch
    from helpers import TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsqp.model.loading import load
    from tsqp.model.pages import FilePages

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = load(tmp_path, with_tokenizer=False)
    q = loaded.weights["layers.0.q_proj"]
    assert q.dtype == torch.bfloat16 and FilePages().holds(q)  # no float32 copy was made
    prompt = list(range(40, 60))
    with connect(None, tmp_path, local=True) as local:
        expected = local.generate(prompt, 12).token_ids
    for shield, verify in (("plain", False), ("plain", True), ("otp", True)):
        with connect(None, tmp_path, shield=shield, verify=verify) as split:
            assert split.generate(prompt, 12).token_ids == expected, (shield, verify)
