"""End to end on the default model (SmolLM2-135M-Instruct, real weights): split == transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from tsqp.model.loading import LoadedModel, load, resolve
from tsqp.shields.config import ShieldConfig
from tsqp.tee.generation import generate
from tsqp.tee.llama import Llama
from tsqp.tee.private_server import PrivateServer
from tsqp.tee.session import Session
from tsqp.wire.client import RemoteBackend

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a matrix is.",
    "List three colours of the rainbow.",
]
NEW_TOKENS = 32
LOGIT_TOLERANCE = 1e-3  # max abs difference of fp32 prefill logits; observed ~6e-5


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load(resolve("smollm2"))


@pytest.fixture(scope="module")
def smol_hf(smol: LoadedModel) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(smol.path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def split(smol: LoadedModel) -> Iterator[Session]:
    """A split over shared memory to a `serve-gpu` process of its own, as `run-tee` starts it (its W_q made at start-up,
    for the otp test): a server thread in this process would share its interpreter with the runner."""
    with PrivateServer(smol.path, device="cpu", shield=ShieldConfig("otp")) as server:
        server.wait_ready()
        remote = RemoteBackend(server.endpoint, timeout_s=60, server_alive=server.alive)
        remote.hello(smol.fingerprint)
        yield Session(smol, remote)
        remote.close()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_split_greedy_tokens_and_logits_match_transformers(prompt: str, smol_hf: AutoModelForCausalLM, split: Session) -> None:
    ids = split.prompt_ids(prompt)
    tensor = torch.tensor([ids])
    expected = smol_hf.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=NEW_TOKENS, do_sample=False)
    result = split.generate(ids, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected[0, len(ids) :].tolist()  # including EOS, as generate returns it

    with torch.no_grad():
        reference_logits = smol_hf(tensor).logits
    llama: Llama = split.llama
    logits = llama.forward(tensor, llama.new_cache(len(ids)), all_logits=True)
    assert (logits - reference_logits).abs().max().item() < LOGIT_TOLERANCE


def test_plain_split_round_trips_per_token(split: Session) -> None:
    result = split.generate("Count from one to ten.", max_new_tokens=8)
    forwards = len(result.token_ids)  # the prefill and each decode step
    assert result.timings["round_trips"] == forwards * (4 * split.model.config.n_layers + 2)


def test_local_backend_gives_the_split_tokens(smol: LoadedModel, split: Session) -> None:
    from tsqp.model.linear import LinearWeights

    local = Llama(smol.config, smol.hf_config, smol.norms(), LinearWeights(smol.weights, smol.config.n_layers))
    ids = split.prompt_ids(PROMPTS[1])
    assert generate(local, ids, NEW_TOKENS).token_ids == split.generate(ids, NEW_TOKENS).token_ids


def run_tee_json(smol: LoadedModel, prompt: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "tsqp", "run-tee", "--prompt", prompt, "--json", "--max-new-tokens", "24"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TSQP_CACHE": str(smol.path.parent)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_run_tee_command_answers_with_a_private_server(smol: LoadedModel) -> None:
    """What the README promises: one command, private server and otp included, answers Paris."""
    prompt = "What is the capital of France?"
    out = run_tee_json(smol, prompt)
    assert "Paris" in out["text"]
    assert out["prompt_token_ids"] == Session(smol, None).prompt_ids(prompt)
    assert out["shield"]["shield"] == "otp" and out["shield"]["verify"]
    timings = out["timings"]
    assert timings["round_trips"] > 0 and timings["bytes_sent"] > 0 and timings["bytes_received"] > 0
    assert timings["offline_s"] > 0 and timings["masked_rows"] > 0
    # Start-up speed is reported, not asserted (speed targets live in `tsqp bench`).
    print(f"first token after {timings['first_token_s_since_start']:.1f} s")


OTP_PROMPTS = PROMPTS + [
    "Who wrote Romeo and Juliet?",
    "Give me a tip for staying focused.",
    "What is 12 times 7?",
    "Describe a cat in two sentences.",
]
OTP_TOKENS = 16
OTP_MIN_AGREEING = 7  # of 8 prompts; measured: 8 of 8 with 12-bit weights and 16-bit activations


def test_otp_keeps_the_fp32_greedy_tokens(smol: LoadedModel, smol_hf: AutoModelForCausalLM, split: Session) -> None:
    """Fixed-point otp (exact mod p, quantized) against transformers in fp32: the first 16 greedy tokens."""
    from tsqp.tee.session import shielded

    otp = Session(smol, shielded(split.backend, smol, ShieldConfig("otp", verify=True)))
    agreeing, first_token_agrees = 0, 0
    for prompt in OTP_PROMPTS:
        ids = otp.prompt_ids(prompt)
        tensor = torch.tensor([ids])
        expected = smol_hf.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=OTP_TOKENS, do_sample=False)[0, len(ids) :].tolist()
        got = generate(otp.llama, ids, OTP_TOKENS, smol.eos_token_ids()).token_ids
        agreeing += got == expected
        first_token_agrees += got[0] == expected[0]  # the prefill's top-1
    print(f"otp: {agreeing}/{len(OTP_PROMPTS)} prompts with identical {OTP_TOKENS} greedy tokens; prefill top-1 {first_token_agrees}/{len(OTP_PROMPTS)}")
    assert first_token_agrees == len(OTP_PROMPTS)
    assert agreeing >= OTP_MIN_AGREEING
