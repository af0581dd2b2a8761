"""`tsqp audit`: play the curious server and measure what each shield lets it learn.

For each shield, a few chat prompts run through a private server that records every request
(`serve-gpu --record`, see `tsqp.recording`). The attacks then use only what such a server
has, the public model and that recording, and every attack runs against every shield:

- `nearest`: each layer-0 input row (q|k|v request of layer 0) against every vocabulary
  row's layer-0 input, rms_norm(embed_v) · attn_norm, by absolute cosine (blind to any scale
  or sign); plus the token ids themselves where the server did the embedding (plain); and for
  generated tokens the arg-max of each lm_head input row's logits, times the row's sign,
  learned from the recording where a secret scalar (seqmix) may have flipped it.
- `rank-one` (seqmix's mixing plane cancelled) and `noise-ml` (sequential maximum-likelihood
  decoding over the first layers): see `tsqp.tools.attacks`.

A token counts as recovered when the best attack got it; chance is read two ways: 1/V, and
the permutation baseline (the same guesses against the truth shuffled). `tsqp.tools.steering`
attacks integrity the same way, with a lying server against each shield's --verify.

The generations run one after the other on one client, so requests align with them by order.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from tsqp.errors import TsqpError
from tsqp.model.linear import LinearWeights
from tsqp.model.loading import LoadedModel
from tsqp.server.recording import Recorded, read_recording
from tsqp.shields.config import NOISE_SCALE, SHIELDS, ShieldConfig
from tsqp.tee.generation import Generation
from tsqp.tools.attacks import NOISE_LAYERS, decode_noise, permutation_chance, unmix_rank_one
from tsqp.tools.steering import SteeringResult, steer

LAYER0_MODULES = ["q_proj", "k_proj", "v_proj"]  # the first linear call: its input is the normed embedding
EXACT_COSINE = 0.99  # a row this close to a vocabulary row (up to a scalar) is that token
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "My bank password is tulip42, keep it safe.",
    "Explain in one sentence what a matrix is.",
    "List three colours of the rainbow.",
    "Translate 'good morning' into Spanish.",
    "How many legs does a spider have?",
    "Give me a name for a black cat.",
)

Prompt = str | list[int]  # text (chat template applied) or token ids (models without a tokenizer)


@dataclass
class AuditResult:
    """What the attacks recovered under one shield; fractions of tokens, position by position."""

    shield: str
    prompt_token_recovery: float  # by the best attack, token by token
    generated_token_recovery: float
    chance: float  # 1 / vocabulary size: a blind guess
    prompt_tokens: int
    generated_tokens: int
    permutation_chance_prompt: float = 0.0  # the highest of the attacks' permutation baselines
    permutation_chance_generated: float = 0.0
    attacks: dict[str, dict[str, float]] = field(default_factory=dict)  # attack -> recovery and its permutation baseline, per part

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PublicWeights:
    """The part of the model the attacks use: all public, the server holds it anyway."""

    embed: np.ndarray  # (V, D)
    lm_head: np.ndarray  # (V, D)
    attn_norm: np.ndarray  # (D,) layer 0's input norm weight
    eps: float

    @classmethod
    def of(cls, model: LoadedModel) -> PublicWeights:
        w = model.weights
        return cls(w["embed"].detach().float().numpy(), w["lm_head"].detach().float().numpy(), w["layers.0.attn_norm"].detach().float().numpy(),
                   model.config.rms_norm_eps)  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return self.embed.shape[0]

    @cached_property
    def layer0_references(self) -> np.ndarray:
        """Every vocabulary row's layer-0 input, rms_norm(embed_v) · attn_norm, as unit rows (V, D): made once, for
        every attack that reads it (in float32 but for the mean square: the attacks compare cosines, and a float64
        copy of a large vocabulary took seconds)."""
        mean_square = np.einsum("vd,vd->v", self.embed, self.embed, dtype=np.float64) / self.embed.shape[1]
        scale = (1.0 / np.sqrt(mean_square + self.eps)).astype(np.float32)
        return unit_rows(self.embed * scale[:, None] * self.attn_norm)


# --- what the server received, as the attacker reads it ---------------------------------


def wire_rows(message: Recorded) -> np.ndarray:
    """A request's input as float rows (T, D). otp's residues mod p (p is in its args) become
    centred representatives, so a uniform mask reads as noise around 0, not as one bias."""
    x = message.tensors[0]
    p = message.args.get("p")
    if p is not None:
        x = np.where(x > p // 2, x - p, x)
    return x.reshape(-1, x.shape[-1]).astype(np.float64)


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def is_layer0_input(m: Recorded) -> bool:
    return m.op == "LINEAR" and m.args.get("layer") == 0 and m.args.get("modules") == LAYER0_MODULES


# --- the attacks: pure functions of public weights and recorded messages ----------------


def guess_prompt_tokens(weights: PublicWeights, messages: Iterable[Recorded]) -> list[np.ndarray]:
    """Nearest vocabulary row by |cosine| for every row of every layer-0 request, in order."""
    references = weights.layer0_references
    return [np.abs(unit_rows(wire_rows(m)) @ references.T).argmax(axis=-1) for m in messages if is_layer0_input(m)]


def read_token_ids(messages: Iterable[Recorded]) -> list[np.ndarray]:
    """The token ids of every EMBED request, in order: where the server embeds, it just reads them."""
    return [m.tensors[0].reshape(-1).astype(np.int64) for m in messages if m.op == "EMBED"]


def lm_head_logits(weights: PublicWeights, message: Recorded) -> np.ndarray:
    """The logits of an LM_HEAD request's last row, up to a positive factor (the row's norm is no clue)."""
    return (unit_rows(wire_rows(message)[-1:]) @ weights.lm_head.T)[0].astype(np.float64)


def fed_back_tokens(weights: PublicWeights, messages: Sequence[Recorded]) -> dict[int, int]:
    """LM_HEAD request index -> the token it produced, where the next forward shows it.

    A generated token is fed back as the next forward's single layer-0 row; where that row is
    a vocabulary row up to a scalar (|cosine| ≥ EXACT_COSINE), the pair is known plaintext.
    """
    references = weights.layer0_references
    found: dict[int, int] = {}
    heads, pending = 0, None
    for m in messages:
        if m.op == "LM_HEAD":
            pending, heads = heads, heads + 1
        elif is_layer0_input(m):
            rows = unit_rows(wire_rows(m))
            if pending is not None and rows.shape[0] == 1:  # a decode step; a prefill starts the next answer
                cosine = np.abs(rows @ references.T)[0]
                if cosine.max() >= EXACT_COSINE:
                    found[pending] = int(cosine.argmax())
            pending = None
    return found


def guess_generated_tokens(weights: PublicWeights, messages: Iterable[Recorded]) -> list[int]:
    """One guess per LM_HEAD request: the arg-max of its logits times the row's sign.

    A row may carry a secret scalar of either sign (seqmix on one token), so the sign is
    learned: a row whose produced token the next forward shows has the sign that puts that
    token above the median logit. Other rows (each answer's last) take the sign all known rows
    share, else that of their projection on the mean sign-corrected row (a model's final
    hidden states share a direction); with nothing known, the candidate (arg-max or arg-min)
    further from the median, in units of the logits' spread.
    """
    messages = list(messages)
    heads = [m for m in messages if m.op == "LM_HEAD"]
    logits = [lm_head_logits(weights, m) for m in heads]
    known = {i: 1.0 if logits[i][t] >= np.median(logits[i]) else -1.0 for i, t in fed_back_tokens(weights, messages).items()}
    rows = [unit_rows(wire_rows(m)[-1:])[0] for m in heads]
    return [int((_row_sign(i, logits[i], rows, known) * logits[i]).argmax()) for i in range(len(heads))]


def _row_sign(i: int, logits: np.ndarray, rows: Sequence[np.ndarray], known: dict[int, float]) -> float:
    """The sign of LM_HEAD row i's secret scalar (see `guess_generated_tokens`)."""
    if i in known:
        return known[i]
    if len(set(known.values())) == 1:
        return next(iter(known.values()))  # the client never flipped a row: it does not
    if known:
        mean_row = sum(known[j] * rows[j] for j in known)
        return 1.0 if float(rows[i] @ mean_row) >= 0 else -1.0
    median = np.median(logits)
    return 1.0 if logits.max() - median >= median - logits.min() else -1.0


# --- scoring against what really ran ---------------------------------------------------------


def forwards_per_generation(generation: Generation) -> int:
    """Forwards a generation makes: the prefill, then one per generated token fed back (never the last)."""
    return 1 + max(len(generation.token_ids) - 1, 0)


def score_prompt_tokens(guesses: Sequence[np.ndarray], read_ids: Sequence[np.ndarray], generations: Sequence[Generation]) -> tuple[int, int]:
    """(prompt tokens recovered, prompt tokens), a token counting when either attack got it right."""
    expected = sum(forwards_per_generation(g) for g in generations)
    if len(guesses) != expected or (read_ids and len(read_ids) != expected):
        raise TsqpError(f"the recording holds {len(guesses)} layer-0 and {len(read_ids)} embedding requests; "
                        f"the generations made {expected} forwards")  # fmt: skip
    recovered = total = 0
    first = 0  # index of the generation's prefill request
    for g in generations:
        truth = np.asarray(g.prompt_token_ids)
        hit = _hits(guesses[first], truth)
        if read_ids:
            hit |= _hits(read_ids[first], truth)
        recovered, total = recovered + int(hit.sum()), total + len(truth)
        first += forwards_per_generation(g)
    return recovered, total


def _hits(guess: np.ndarray, truth: np.ndarray) -> np.ndarray:
    if guess.shape != truth.shape:
        raise TsqpError(f"a prefill request carries {guess.shape[0]} rows for a prompt of {truth.shape[0]} tokens")
    return guess == truth


def score_generated_tokens(guesses: Sequence[int], generations: Sequence[Generation]) -> tuple[int, int]:
    """(generated tokens recovered, generated tokens): token i of an answer is the i-th LM_HEAD request's guess."""
    truth = [t for g in generations for t in g.token_ids]
    if len(guesses) != len(truth):
        raise TsqpError(f"the recording holds {len(guesses)} lm_head requests for {len(truth)} generated tokens")
    return sum(int(a == b) for a, b in zip(guesses, truth)), len(truth)


def evaluate(shield: str, weights: PublicWeights, messages: Sequence[Recorded], generations: Sequence[Generation],
             model: LoadedModel | None = None, noise_scale: float = NOISE_SCALE) -> AuditResult:  # fmt: skip
    """Run every attack on one shield's recording and score them; `model` enables `noise-ml`."""
    read_ids = read_token_ids(messages)
    nearest = guess_prompt_tokens(weights, messages)
    score_prompt_tokens(nearest, read_ids, generations)  # checks the recording against the generations
    generated = guess_generated_tokens(weights, messages)
    score_generated_tokens(generated, generations)
    prompt_guesses = {"nearest": _prefills(nearest, read_ids, generations), "rank-one": _prefills(unmix_prefills(weights, messages), read_ids, generations)}
    generated_guesses = {"nearest": np.asarray(generated)}
    prompt_truth = np.concatenate([np.asarray(g.prompt_token_ids) for g in generations])
    generated_truth = np.asarray([t for g in generations for t in g.token_ids])
    everything = _share(_best(prompt_guesses, prompt_truth), prompt_truth) == 1 and _share(generated_guesses["nearest"], generated_truth) == 1
    if model is not None and not everything:  # the slow attack, where the others left something to find
        prompt_guesses["noise-ml"], generated_guesses["noise-ml"] = decode_noise_recording(model, messages, generations, generated, noise_scale)
    attacks: dict[str, dict[str, float]] = {}
    for part, guesses, truth in (("prompt", prompt_guesses, prompt_truth), ("generated", generated_guesses, generated_truth)):
        for name, guess in guesses.items():  # each attack beside its own chance: a biased guesser matches frequent tokens
            attacks.setdefault(name, {}).update({part: _share(guess, truth), f"{part}_chance": permutation_chance(guess, truth)})
    best_prompt = _best(prompt_guesses, prompt_truth)
    best_generated = _best(generated_guesses, generated_truth)
    return AuditResult(shield, _share(best_prompt, prompt_truth), _share(best_generated, generated_truth), 1 / weights.vocab_size,
                       len(prompt_truth), len(generated_truth), _chance(attacks, "prompt"), _chance(attacks, "generated"), attacks)  # fmt: skip


def _chance(attacks: dict[str, dict[str, float]], part: str) -> float:
    """The highest permutation baseline among the attacks: what the best-of score is read against."""
    return max((a[f"{part}_chance"] for a in attacks.values() if f"{part}_chance" in a), default=0.0)


def _share(guess: np.ndarray, truth: np.ndarray) -> float:
    return float((guess == truth).mean()) if truth.size else 0.0


def _best(guesses: dict[str, np.ndarray], truth: np.ndarray) -> np.ndarray:
    """Per position, the truth where any attack got it, else the first attack's guess (a token counts when any attack got it)."""
    first = next(iter(guesses.values()))
    hit = np.zeros(truth.shape, dtype=bool)
    for guess in guesses.values():
        hit |= guess == truth
    return np.where(hit, truth, first)


def _prefills(guesses: Sequence[np.ndarray], read_ids: Sequence[np.ndarray], generations: Sequence[Generation]) -> np.ndarray:
    """Every generation's prompt guesses in a row (each prefill's), read ids winning where the server embedded."""
    out, first = [], 0
    for g in generations:
        guess = read_ids[first] if read_ids else guesses[first]
        _hits(guess, np.asarray(g.prompt_token_ids))  # shapes agree
        out.append(guess)
        first += forwards_per_generation(g)
    return np.concatenate(out)


def unmix_prefills(weights: PublicWeights, messages: Iterable[Recorded]) -> list[np.ndarray]:
    """`rank-one` on every layer-0 request, in order."""
    references = weights.layer0_references
    return [unmix_rank_one(wire_rows(m), references) for m in messages if is_layer0_input(m)]


def decode_noise_recording(model: LoadedModel, messages: Sequence[Recorded], generations: Sequence[Generation],
                           lm_head_guesses: Sequence[int], scale: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """`noise-ml` over each generation: its prompt, then its generated tokens (each answer's last, never fed
    back, from the lm_head guess)."""
    forwards = _forwards(messages)
    weights = LinearWeights(model.weights, model.config.n_layers)  # built once, for every generation
    prompts, generated, first, head = [], [], 0, 0
    for g in generations:
        n = forwards_per_generation(g)
        rows = {site: np.concatenate([f[site] for f in forwards[first : first + n]]) for site in forwards[first]}
        tokens = decode_noise(model, rows, scale, weights=weights)
        prompts.append(tokens[: len(g.prompt_token_ids)])
        generated.append(np.append(tokens[len(g.prompt_token_ids) :], lm_head_guesses[head + len(g.token_ids) - 1])[: len(g.token_ids)])
        first, head = first + n, head + len(g.token_ids)
    return np.concatenate(prompts), np.concatenate(generated)


def _forwards(messages: Iterable[Recorded]) -> list[dict[tuple[int, tuple[str, ...]], np.ndarray]]:
    """The recorded LINEAR inputs grouped by forward (each starts with its layer-0 q|k|v request): site -> rows."""
    forwards: list[dict[tuple[int, tuple[str, ...]], np.ndarray]] = []
    for m in messages:
        if m.op != "LINEAR":
            continue
        if is_layer0_input(m):
            forwards.append({})
        if forwards:
            forwards[-1][(m.args["layer"], tuple(m.args["modules"]))] = wire_rows(m)
    return forwards


# --- running the shields -----------------------------------------------------------------------


def record_shield(folder: Path, shield: str, prompts: Sequence[Prompt], new_tokens: int, record_dir: Path,
                  device: str = "auto", dtype: str = "float32", on_generation: Callable[[int], None] | None = None,
                  noise_scale: float = NOISE_SCALE) -> list[Generation]:  # fmt: skip
    """Greedy generations under `shield` through a private server recording into `record_dir`."""
    from tsqp.tee.private_server import PrivateServer
    from tsqp.tee.session import connect

    # verify off: the audit is about what the server sees, which checking does not change.
    shielding = ShieldConfig(shield, verify=False, noise_scale=noise_scale, allow_broken=True, precision=dtype)  # the audit is what shows them broken
    server = PrivateServer(folder, device, dtype, shielding, extra_args=["--record", str(record_dir)])
    generations = []
    with connect(None, folder, private_server=server, shield_config=shielding) as session:
        for i, prompt in enumerate(prompts):
            generations.append(session.generate(prompt, max_new_tokens=new_tokens))
            if on_generation is not None:
                on_generation(i + 1)
    return generations


def recorded_attack_input(record_dir: Path) -> list[Recorded]:
    """The recorded requests the attacks read: the first layers' and lm_head's (the rest is dropped as it streams in)."""
    return [m for m in read_recording(record_dir) if m.op in ("EMBED", "LM_HEAD") or (m.op == "LINEAR" and m.args.get("layer", NOISE_LAYERS) < NOISE_LAYERS)]


@dataclass
class AuditReport:
    """Both halves of an audit: what each shield lets the server learn, and what its --verify lets it change."""

    privacy: list[AuditResult]
    integrity: list[SteeringResult]


def run_audit(model: str | os.PathLike[str], shields: Sequence[str] = SHIELDS, prompts: Sequence[Prompt] = PROMPTS[:4],
              new_tokens: int = 8, device: str = "auto", dtype: str = "float32", keep: Path | None = None,
              progress: Callable[[str], None] | None = None, privacy: bool = True, integrity: bool = True) -> AuditReport:  # fmt: skip
    """Record and attack each shield in turn, then steer its --verify; `keep` keeps the recordings as keep/SHIELD."""
    from tsqp.model.loading import load, resolve

    folder = resolve(model)
    loaded = load(folder)
    weights = PublicWeights.of(loaded)
    report = AuditReport([], [])
    say = progress or (lambda _: None)
    for shield in shields if privacy else ():
        say(f"{shield}: starting a recording server")
        with _record_dir(keep, shield) as record_dir:
            generations = record_shield(folder, shield, prompts, new_tokens, Path(record_dir), device, dtype,
                                        on_generation=lambda i, s=shield: say(f"{s}: prompt {i}/{len(prompts)} done"))  # fmt: skip
            say(f"{shield}: attacking the recording")
            report.privacy.append(evaluate(shield, weights, recorded_attack_input(Path(record_dir)), generations, loaded))
    for shield in shields if integrity else ():
        report.integrity += steer(loaded, shield, prompts, new_tokens, progress=say)
    return report


def _record_dir(keep: Path | None, shield: str) -> AbstractContextManager[str]:
    if keep is None:
        return tempfile.TemporaryDirectory(prefix=f"tsqp-audit-{shield}-")
    folder = keep / shield
    if folder.exists() and any(folder.iterdir()):
        raise TsqpError(f"{folder} is not empty: a recording appends, so keep recordings in a fresh folder")
    folder.mkdir(parents=True, exist_ok=True)
    return nullcontext(str(folder))
