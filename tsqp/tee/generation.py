"""Sampling and the one `generate()` loop that run-tee, bench and the Python API share."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from tsqp.errors import InputError
from tsqp.tee.llama import Llama


@dataclass
class Generation:
    """Result of one generation. `token_ids` include the end-of-sequence token, as transformers' `generate` returns them."""

    token_ids: list[int]
    prompt_token_ids: list[int]
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> int:
    """logits (V,) -> next token id. temperature 0 is greedy (first maximum, like torch.argmax in transformers)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    llama: Llama,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_ids: Collection[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Prefill the prompt, then decode one token at a time with the KV cache."""
    if not prompt_ids:
        raise InputError("the prompt is empty")
    context = llama.config.max_seq_len
    if len(prompt_ids) + max_new_tokens > context:
        raise InputError(f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's context of {context}; "
                         "shorten the prompt or lower --max-new-tokens")  # fmt: skip
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = llama.new_cache(len(prompt_ids) + max_new_tokens)
    tokens: list[int] = []
    started = time.perf_counter()
    logits = llama.forward(torch.tensor([prompt_ids]), cache)
    prefill_s = time.perf_counter() - started
    while len(tokens) < max_new_tokens:
        token = sample(logits[0, -1], temperature, top_p, generator)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids or len(tokens) == max_new_tokens:
            break
        logits = llama.forward(torch.tensor([[token]]), cache)
    total_s = time.perf_counter() - started
    decode_steps = max(len(tokens) - 1, 0)  # forwards after the prefill
    decode_s = total_s - prefill_s
    return Generation(
        token_ids=tokens,
        prompt_token_ids=list(prompt_ids),
        timings={
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "decode_steps": decode_steps,
            "decode_tokens_per_s": decode_steps / decode_s if decode_steps and decode_s > 0 else 0.0,
            "total_s": total_s,
        },
    )
