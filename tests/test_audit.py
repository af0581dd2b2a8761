"""`tsqp audit`: the curious server's attacks recover everything under plain and nothing under otp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_tiny_model
from typer.testing import CliRunner

from tsqp.cli.app import app
from tsqp.errors import TsqpError
from tsqp.model.loading import load
from tsqp.server.recording import Recorded
from tsqp.tee.generation import Generation
from tsqp.tools.audit import (
    LAYER0_MODULES,
    PublicWeights,
    evaluate,
    guess_generated_tokens,
    guess_prompt_tokens,
    read_token_ids,
    record_shield,
    recorded_attack_input,
    score_prompt_tokens,
    wire_rows,
)

runner = CliRunner()
VOCAB = 4096
NEW_TOKENS = 8


# --- on a real recording of a tiny random model ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("audit-tiny"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tiny_weights(tiny_folder: Path) -> PublicWeights:
    return PublicWeights.of(load(tiny_folder, with_tokenizer=False))


def record(folder: Path, shield: str, record_dir: Path) -> tuple[list[Recorded], list[Generation]]:
    rng = np.random.default_rng(0)  # the tiny model has no tokenizer: prompts as token ids
    prompts = [rng.integers(3, VOCAB, 12).tolist() for _ in range(4)]
    generations = record_shield(folder, shield, prompts, NEW_TOKENS, record_dir, device="cpu")
    return recorded_attack_input(record_dir), generations


def test_plain_gives_every_token_away(tiny_folder: Path, tiny_weights: PublicWeights, tmp_path: Path) -> None:
    messages, generations = record(tiny_folder, "plain", tmp_path)
    result = evaluate("plain", tiny_weights, messages, generations)
    assert result.prompt_tokens == 48 and result.generated_tokens == sum(len(g.token_ids) for g in generations)
    assert result.prompt_token_recovery >= 0.95
    assert result.generated_token_recovery >= 0.95
    # Each channel alone: the nearest neighbour of the layer-0 rows, and the ids the server embeds.
    layer0_only = score_prompt_tokens(guess_prompt_tokens(tiny_weights, messages), [], generations)
    read_ids = read_token_ids(messages)
    ids_only = score_prompt_tokens([np.full(len(ids), -1) for ids in read_ids], read_ids, generations)
    assert layer0_only[0] >= 0.95 * 48 and ids_only == (48, 48)


def test_otp_leaves_the_attacks_at_chance(tiny_folder: Path, tiny_weights: PublicWeights, tmp_path: Path) -> None:
    messages, generations = record(tiny_folder, "otp", tmp_path)
    assert not [m for m in messages if m.op == "EMBED"]  # the lookup stays in the TEE
    result = evaluate("otp", tiny_weights, messages, generations)
    assert result.chance == 1 / VOCAB
    assert result.prompt_token_recovery <= 0.05  # 2 of 48 tokens: chance is 1 in 4096
    assert result.generated_token_recovery <= 0.05


# --- the attacks on synthetic traffic: what each part must do -------------------------------------


def message(op: str, rows: np.ndarray, **args: object) -> Recorded:
    return Recorded(0, op, dict(args), "client", [rows])


def layer0(rows: np.ndarray) -> Recorded:
    return message("LINEAR", rows, layer=0, modules=LAYER0_MODULES)


def synthetic_weights(rng: np.random.Generator, vocab: int = 512, dim: int = 32) -> PublicWeights:
    embed = rng.normal(size=(vocab, dim)).astype(np.float32)
    return PublicWeights(embed, embed.copy(), rng.uniform(0.5, 1.5, dim).astype(np.float32), 1e-5)


def test_generated_tokens_survive_a_secret_scalar_of_either_sign() -> None:
    """seqmix multiplies a decoded token's single row by a secret scalar, negative half the time."""
    rng = np.random.default_rng(1)
    weights = synthetic_weights(rng)
    references = weights.layer0_references
    common = rng.normal(size=32)
    common *= 2 / np.linalg.norm(common)  # final hidden states share a direction, as in real models
    messages, generations, scalars, naive_hits, truth_all = [], [], [], 0, []
    for _ in range(6):
        prompt = rng.integers(0, 512, 5)
        messages.append(layer0(references[prompt] * rng.uniform(0.5, 2, (5, 1))))
        tokens = []
        for step in range(5):
            wanted = int(rng.integers(0, 512))
            hidden = 3 * weights.embed[wanted] / np.linalg.norm(weights.embed[wanted]) + common + rng.normal(0, 0.1, 32)
            token = int((hidden @ weights.lm_head.T).argmax())  # the greedy choice
            scalar = rng.choice([-1, 1]) * rng.uniform(0.5, 2)
            messages.append(message("LM_HEAD", (scalar * hidden)[None]))
            naive_hits += int((scalar * hidden @ weights.lm_head.T).argmax() == token)
            if step < 4:  # fed back: the next forward's single layer-0 row, scaled too
                messages.append(layer0(references[token][None] * rng.choice([-1.5, 0.7])))
            tokens.append(token)
            scalars.append(scalar)
        generations.append(Generation(tokens, prompt.tolist()))
        truth_all += tokens
    assert min(scalars) < 0 < max(scalars)
    assert naive_hits < 0.8 * len(truth_all)  # a plain arg-max misses the flipped rows
    assert guess_generated_tokens(weights, messages) == truth_all  # the answers' last rows included
    result = evaluate("seqmix", weights, messages, generations)
    assert result.generated_token_recovery == 1.0 and result.prompt_token_recovery == 1.0


def test_embedded_ids_count_where_the_rows_do_not() -> None:
    rng = np.random.default_rng(2)
    weights = synthetic_weights(rng)
    prompt = [5, 6, 7, 8]
    messages = [message("EMBED", np.array([prompt])), layer0(rng.normal(size=(4, 32))),
                message("LM_HEAD", rng.normal(size=(1, 32)))]  # fmt: skip
    generation = Generation([9], prompt)
    guesses = guess_prompt_tokens(weights, messages)
    assert score_prompt_tokens(guesses, [], [generation])[0] <= 1  # random rows: nothing, or a fluke
    assert score_prompt_tokens(guesses, read_token_ids(messages), [generation]) == (4, 4)


def test_misaligned_recording_is_an_error() -> None:
    rng = np.random.default_rng(3)
    weights = synthetic_weights(rng)
    messages = [layer0(rng.normal(size=(3, 32)))]  # one forward, but the answer had three tokens
    with pytest.raises(TsqpError, match="forwards"):
        evaluate("plain", weights, messages, [Generation([1, 2, 3], [4, 5, 6])])


def test_otp_residues_are_read_centred() -> None:
    """Residues mod p near p are small negatives: read raw, a uniform mask would look like one bias."""
    rows = wire_rows(message("LINEAR", np.array([[100, 1, 50, 51]], dtype=np.int64), p=101))
    assert rows.tolist() == [[-1.0, 1.0, 50.0, -50.0]]


# --- the command ---------------------------------------------------------------------------------


def test_help_explains_every_option() -> None:
    result = runner.invoke(app, ["audit", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--shields", "--prompts", "--new-tokens", "--keep", "--device", "--dtype", "--json"):
        assert option in result.output
    assert "Example" in result.output


@pytest.mark.parametrize("args", [["--shields", "plain,rot13"], ["--shields", "plain,plain"], ["--prompts", "99"]])
def test_bad_options_fail_in_one_line(args: list[str]) -> None:
    result = runner.invoke(app, ["audit", *args])
    assert result.exit_code == 1
    assert "error:" in result.output


def test_json_is_one_object(tiny_chat_path: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["audit", "--model", str(tiny_chat_path), "--shields", "plain", "--prompts", "1",
                                 "--new-tokens", "2", "--device", "cpu", "--keep", str(tmp_path), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == ["results", "integrity"] and len(report["results"]) == 1
    plain = report["results"][0]
    assert plain["shield"] == "plain" and plain["chance"] == 1 / 49152
    assert plain["prompt_token_recovery"] == 1.0 and plain["generated_token_recovery"] == 1.0
    assert (tmp_path / "plain" / "index.jsonl").is_file()  # --keep kept the recording


# --- the default model, end to end ------------------------------------------------------------------


@pytest.mark.slow
def test_audit_on_the_default_model() -> None:
    """The CLI end to end on real weights: plain gives everything away, otp nothing. (seqmix's and noise's breaks are
    shown on a random model's recordings in test_attacks.py: a third recording here took the suite ~25 s more.)"""
    command = [sys.executable, "-m", "tsqp", "audit", "--json", "--no-integrity", "--shields", "plain,otp", "--prompts", "3", "--new-tokens", "6"]
    # noise-ml runs on otp's recording (nothing else found anything there): most of this test's minute
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["shield"]: r for r in json.loads(done.stdout)["results"]}
    assert list(results) == ["plain", "otp"]
    plain, otp = results["plain"], results["otp"]
    assert plain["prompt_token_recovery"] >= 0.95 and plain["generated_token_recovery"] >= 0.95
    # otp: at chance. Over 118 prompt tokens one lucky guess (0.8%) stays under 1%; a blind guesser
    # here hits ~0.02% of prompt tokens (measured on uniform random rows), so two are a ~1e-3 event.
    assert otp["prompt_tokens"] >= 100 and otp["attacks"]["nearest"]["prompt"] <= 0.01 and otp["attacks"]["rank-one"]["prompt"] <= 0.01
    ml = otp["attacks"]["noise-ml"]  # its guesses match frequent tokens no more often than shuffled truth does
    assert ml["prompt"] <= ml["prompt_chance"] + 0.05
    # 18 answer tokens cannot resolve 1%: at most one lucky guess (random rows hit ~1e-3 per token).
    assert otp["generated_tokens"] >= 18 and otp["attacks"]["nearest"]["generated"] <= 1 / 18
