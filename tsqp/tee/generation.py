"""Sampling and the one `generate()` loop that run-tee, bench and the Python API share."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from tsqp.errors import ContextTooLong, InputError
from tsqp.tee.llama import KVCache, Llama

FINISH_REASONS = ("stop", "length")  # stop: an end-of-sequence token or a stop string; length: max_new_tokens reached


@dataclass
class Generation:
    """Result of one generation. `token_ids` include the end-of-sequence token, as transformers' `generate` returns them."""

    token_ids: list[int]
    prompt_token_ids: list[int]
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "length"


@dataclass
class Sampling:
    """How to pick each next token: greedy at temperature 0; top_k 0 keeps every token; repetition_penalty 1 is off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)

    def validate(self) -> Sampling:
        problems = [
            (self.max_new_tokens < 1, f"max_new_tokens must be at least 1, not {self.max_new_tokens}"),
            (not 0.0 <= self.temperature <= 100.0, f"temperature must be between 0 and 100, not {self.temperature}"),
            (not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], not {self.top_p}"),
            (self.top_k < 0, f"top_k must be 0 (off) or positive, not {self.top_k}"),
            (not 0.0 < self.repetition_penalty <= 10.0, f"repetition_penalty must be in (0, 10], not {self.repetition_penalty}"),
        ]
        for bad, message in problems:
            if bad:
                raise InputError(message)
        return self


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None, top_k: int = 0) -> int:
    """logits (V,) -> next token id. temperature 0 is greedy (first maximum, like torch.argmax in transformers)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def penalize_repetition(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)))
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


class Decoder:
    """One sequence's sampling state: picks each next token, and knows when and why the sequence finished.

    `on_token(token)` may return True to stop after that token (a stop string was reached).
    """

    def __init__(self, prompt_ids: Sequence[int], sampling: Sampling, eos_ids: Collection[int] = (),
                 on_token: Callable[[int], bool | None] | None = None) -> None:  # fmt: skip
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.eos_ids = eos_ids
        self.on_token = on_token
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def next(self, logits: torch.Tensor) -> int:
        """logits (V,) of the last position -> the token taken; sets `finish_reason` when that token ends the sequence."""
        s = self.sampling
        logits = penalize_repetition(logits, self.prompt_ids + self.tokens, s.repetition_penalty)
        token = sample(logits, s.temperature, s.top_p, self.generator, s.top_k)
        self.tokens.append(token)
        stop = self.on_token(token) if self.on_token is not None else False
        if stop or (token in self.eos_ids and not s.ignore_eos):
            self.finish_reason = "stop"
        elif len(self.tokens) >= s.max_new_tokens:
            self.finish_reason = "length"
        return token


def check_fits(llama: Llama, prompt_ids: Sequence[int], max_new_tokens: int, cached: int = 0) -> None:
    if not prompt_ids:
        raise InputError("the prompt is empty")
    context = llama.config.max_seq_len
    if cached + len(prompt_ids) + max_new_tokens > context:
        raise ContextTooLong(f"{cached + len(prompt_ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's context of {context}; "
                             "shorten the prompt or ask for fewer new tokens")  # fmt: skip


def prefill(llama: Llama, prompt_ids: list[int], cache: KVCache, chunk: int = 0) -> torch.Tensor:
    """The prompt's forward passes, `chunk` tokens each (0: one pass): every per-call buffer, on both
    sides of a split, is bounded by the chunk and not by the prompt. The last chunk's logits."""
    step = chunk or len(prompt_ids)
    for start in range(0, len(prompt_ids), step):
        logits = llama.forward(torch.tensor([prompt_ids[start : start + step]]), cache)
    return logits


def generate(
    llama: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_ids: Collection[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[int], bool | None] | None = None,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    cache: KVCache | None = None,
    prefill_chunk: int = 0,
) -> Generation:
    """Prefill the prompt, `prefill_chunk` tokens a forward (0: all at once), then decode one token at a time with the KV cache.

    With `cache`, the prompt continues what that cache holds (a chat's next turn); the last
    token generated is not in the cache when this returns.
    """
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed).validate()
    check_fits(llama, prompt_ids, max_new_tokens, cache.length if cache is not None else 0)
    decoder = Decoder(prompt_ids, sampling, eos_ids, on_token)
    cache = cache if cache is not None else llama.new_cache(len(prompt_ids) + max_new_tokens)
    started = time.perf_counter()
    logits = prefill(llama, prompt_ids, cache, prefill_chunk)
    prefill_s = time.perf_counter() - started
    while True:
        token = decoder.next(logits[0, -1])
        if decoder.finish_reason is not None:
            break
        logits = llama.forward(torch.tensor([[token]]), cache)
    total_s = time.perf_counter() - started
    decode_steps = max(len(decoder.tokens) - 1, 0)  # forwards after the prefill
    return Generation(decoder.tokens, list(prompt_ids), timings=timings(prefill_s, total_s, decode_steps), finish_reason=decoder.finish_reason)


def timings(prefill_s: float, total_s: float, decode_steps: int) -> dict[str, float]:
    decode_s = total_s - prefill_s
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_steps": decode_steps,
        "decode_tokens_per_s": decode_steps / decode_s if decode_steps and decode_s > 0 else 0.0,
        "total_s": total_s,
    }
