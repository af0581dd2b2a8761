"""The hostile server's attack on integrity: steer answers without being caught.

`LyingServer` computes every product honestly (the products of `tsqp.model.linear`, in-process),
then lies in its lm_head replies, where the answer is decided:

- `tolerance`: it estimates, from the row it received and the public weights, a lower bound of
  the float check's tolerance (64 σ of rounding with |r| ≥ 1) and, where the two largest logits
  it sees are closer than that, adds just under half of it (|r| ≤ 2) to the runner-up;
- `dtype-claim`: the same, but its HELLO claims bfloat16 while it computes in float32, so the
  tolerance it spends is 2¹⁶ times larger: it can lift the runner-up past any margin.

Under the exact shields (otp, plain with --verify) its results are integers; it lifts the
runner-up of the integers it sees by just enough. `steer` runs prompts under a shield with
`--verify` against such a server and counts the answers it changed, unnoticed or detected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tsqp.errors import IntegrityError, ShieldError
from tsqp.model.linear import LinearWeights, QuantizedWeights
from tsqp.model.loading import LoadedModel
from tsqp.shields.config import UNIT_ROUNDOFF, ShieldConfig
from tsqp.shields.freivalds import FLOAT_TOLERANCE_SIGMAS
from tsqp.tee.generation import generate
from tsqp.tee.session import Session, shielded
from tsqp.wire.protocol import Message, reply

ATTACKS = ("tolerance", "dtype-claim", "dtype-claim-accepted")  # the last: the user opted in to the lower precision
SPEND = 0.45  # of the tolerance's lower bound: |r_n| ≤ 2, so the check sees at most 0.9 of it


@dataclass
class SteeringResult:
    """Answers a lying server changed under one shield with --verify, per attack."""

    shield: str
    attack: str
    prompts: int
    changed_undetected: int  # the answer differs from the honest one and nothing noticed
    detected: int  # an integrity error, or the server refused at HELLO
    unchanged: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Counters:
    def as_dict(self) -> dict[str, float]:
        return {}


class LyingServer:
    """Stands in for a connected `RemoteBackend`: honest products, lm_head replies steered (None: honest)."""

    def __init__(self, model: LoadedModel, attack: str | None, weights: LinearWeights,
                 quantized: Callable[[int], QuantizedWeights]) -> None:  # fmt: skip
        self.attack = attack
        self.weights = weights
        self.quantized = quantized
        claim = "bfloat16" if attack in ("dtype-claim", "dtype-claim-accepted") else "float32"
        self.info: dict[str, Any] = {"dtype": claim, "fingerprint": model.fingerprint}
        self.claimed = getattr(torch, claim)
        self.eps = UNIT_ROUNDOFF[claim]  # the tolerance it believes it is checked with
        self.w2 = weights.lm_head_t.double().pow(2).sum(-1)  # (D,) Σ_n W_kn²: the tolerance's weight term
        self.stats = _Counters()
        self.lies = 0

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weights.embed(token_ids).to(self.claimed).float()  # rows as the dtype it claims would give them

    def call(self, op: str, args: dict[str, Any], tensors: Sequence[torch.Tensor], while_waiting: Callable[[], None] | None = None) -> Message:
        if while_waiting is not None:  # the runner's pending checks, as while a real request is on its way
            while_waiting()
        x = tensors[0]
        p = args.get("p")
        if p is not None:  # exact shields: an integer product mod p
            key = "lm_head" if op == "LM_HEAD" else (args["layer"], tuple(args["modules"]))
            outputs = [self.quantized(args["weight_bits"]).product_mod(key, x, p, args["limb_bits"])]
        else:
            outputs = [self.weights.lm_head(x)] if op == "LM_HEAD" else self.weights.linear(args["layer"], args["modules"], x)
        if op == "LM_HEAD" and self.attack is not None:
            outputs = [self._steer(x, outputs[0], p)]
        return reply(0, tensors=outputs)

    def _steer(self, x: torch.Tensor, y: torch.Tensor, p: int | None) -> torch.Tensor:
        y = y.clone()
        if p is not None:  # integers it can read (plain) or not (otp): lift the runner-up just past the top
            seen = torch.where(y > p // 2, y - p, y)
            for row in range(y.shape[0]):
                top2 = seen[row].topk(2).indices
                y[row, top2[1]] = (y[row, top2[1]] + seen[row, top2[0]] - seen[row, top2[1]] + 1) % p
            self.lies += y.shape[0]
            return y
        x64 = x.double()
        bound = FLOAT_TOLERANCE_SIGMAS * self.eps * torch.sqrt(x.shape[-1] * (x64 * x64) @ self.w2)  # (T,) with |r| ≥ 1
        for row in range(y.shape[0]):
            delta = SPEND * float(bound[row])
            values, top2 = y[row].topk(2)
            if float(values[0] - values[1]) < delta and math.isfinite(delta):
                y[row, top2[1]] += delta
                self.lies += 1
        return y

    def close(self) -> None:
        pass


def steer(model: LoadedModel, shield: str, prompts: Sequence[str | list[int]], new_tokens: int,
          attacks: Sequence[str] = ATTACKS, progress: Callable[[str], None] | None = None) -> list[SteeringResult]:  # fmt: skip
    """Greedy answers under `shield` with --verify from an honest server, then from each lying one."""
    say = progress or (lambda _: None)
    weights = LinearWeights(model.weights, model.config.n_layers)
    tokenizing = Session(model, weights)  # text prompts through the chat template, as run-tee does
    prompt_ids = [p if isinstance(p, list) else tokenizing.prompt_ids(p) for p in prompts]
    cache: dict[int, QuantizedWeights] = {}

    def quantized(bits: int) -> QuantizedWeights:
        if bits not in cache:
            cache[bits] = QuantizedWeights(model.weights, model.config.n_layers, bits)
        return cache[bits]

    def answers(attack: str | None) -> list[list[int] | None]:
        """Each prompt's tokens, or None where the runner stopped it."""
        config = ShieldConfig(shield, verify=True, allow_broken=True, accept_lower_precision=attack == "dtype-claim-accepted")
        try:
            session = Session(model, shielded(LyingServer(model, attack, weights, quantized), model, config))  # type: ignore[arg-type]
        except ShieldError:
            return [None] * len(prompts)  # refused at HELLO
        out: list[list[int] | None] = []
        for prompt in prompt_ids:
            try:
                out.append(generate(session.llama, prompt, new_tokens).token_ids)
            except IntegrityError:
                out.append(None)
        return out

    say(f"{shield}: honest answers")
    honest = answers(None)
    if any(a is None for a in honest):
        raise IntegrityError(f"a false alarm: the honest server's answer failed verification under {shield}")
    results = []
    for attack in attacks:
        say(f"{shield}: {attack} attack")
        lied = answers(attack)
        detected = sum(a is None for a in lied)
        changed = sum(a is not None and a != h for a, h in zip(lied, honest))
        results.append(SteeringResult(shield, attack, len(prompts), changed, detected, len(prompts) - changed - detected))
    return results
