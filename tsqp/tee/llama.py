"""The one LLaMA forward pass of tsqp, as the trusted side (TEE) runs it.

Everything cheap and non-linear happens here: RMSNorm, RoPE, causal grouped-query
attention, SiLU, residuals, the KV cache. Every product with a weight matrix goes
through one seam, a `LinearBackend`: the remote server (split inference), the same
products in-process (the all-in-TEE baseline), or a shield wrapped around either.
This module knows nothing of the wire or of masking.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tsqp.model.config import ModelConfig


class LinearBackend(Protocol):
    """Where the weight products run. Shapes: x (B, T, K) -> (B, T, N).

    `groups`, when given, are the row counts of the sequences whose rows x holds, in order:
    a shield that mixes rows (seqmix) mixes only within one sequence.
    """

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor: ...

    def linear(self, layer: int, modules: Sequence[str], x: torch.Tensor, groups: Sequence[int] | None = None) -> list[torch.Tensor]: ...

    def lm_head(self, x: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor: ...

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...


class KVCache:
    """Preallocated keys and values of every layer, (B, n_kv, max_len, head_dim) each."""

    def __init__(self, config: ModelConfig, max_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled, committed by `advance` after the last layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class Rotary:
    """RoPE cos/sin exactly as transformers computes them for the model's `rope_parameters`.

    The inverse frequencies come from transformers' own rope init functions (linear,
    llama3, yarn, ...), not re-derived here. Importing its whole LLaMA module instead
    would slow every start.
    """

    def __init__(self, hf_config: Any, head_dim: int) -> None:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", 10000.0)
            self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.scaling = 1.0
        elif rope_type in ("dynamic", "longrope"):
            raise ValueError(f"rope_type {rope_type!r} changes with sequence length and is not supported yet")
        else:
            self.inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos and signed sin (B, 1, T, hd), ready for `apply_rope` on every head."""
        freqs = positions[..., None, :, None].float() * self.inv_freq  # (B, 1, T, hd/2)
        cos, sin = freqs.cos() * self.scaling, freqs.sin() * self.scaling
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The TEE computes in float32, where torch's fused kernel equals transformers' LlamaRMSNorm
    # bit for bit (checked) at a third less time per call.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' x·cos + rotate_half(x)·sin, bit for bit, in 4 ops instead of 8 (each costs µs per decode call):
    rotate_half(x) = (-x2, x1) and signed_sin = (-sin, sin), so rotate_half(x)·sin = roll(x)·signed_sin,
    a sign moved between exact factors. x (B, H, T, hd); cos, signed_sin (B, 1, T, hd)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def causal_mask(q_len: int, kv_len: int) -> torch.Tensor:
    # Query i sits at absolute position kv_len - q_len + i and sees keys 0..that position.
    # (q_len, kv_len), True = may attend.
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)


DECODE_ROWS = 8  # a forward of at most this many rows is a decode step (the non-linear ops are tiny)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads for this thread, `n` while inside (None: as they are); a switch costs
    under a microsecond. OpenMP keeps the count per thread, but a thread's first parallel op takes
    the count of that moment, so a thread started meanwhile sets its own (the mask pool's worker does)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Llama:
    """The TEE side of a LLaMA model: norms and RoPE here, products through `backend`.

    `offload_attention_from` sends the attention matmuls QKᵀ and AV to the backend's
    MATMUL when a call processes at least that many tokens (long prefills); by default
    they stay in the TEE, where a decoded token costs only O(n·d).
    `decode_threads` runs decode steps (`DECODE_ROWS`) on that many of torch's threads: a split's
    runner, whose products run elsewhere, takes 1. Its non-linear ops are a few microseconds each,
    and waking a second thread for them doubled the step (SmolLM2 on 2 cores: 7.2 against 14 ms a
    token with products taking no time; docs/benchmarks.md).
    """

    def __init__(
        self,
        config: ModelConfig,
        hf_config: Any,
        norms: Mapping[str, torch.Tensor],
        backend: LinearBackend,
        offload_attention_from: int | None = None,
        decode_threads: int | None = None,
    ) -> None:
        self.config = config
        self.decode_threads = decode_threads
        self.backend = backend
        self.norms = {name: w.float() for name, w in norms.items()}
        self.rotary = Rotary(hf_config, config.head_dim)
        self.offload_attention_from = offload_attention_from

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.config, min(max_len, self.config.max_seq_len), batch)

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """token_ids (B, T) continuing `cache` -> logits (B, T, V), or (B, 1, V) for the last position."""
        logits = self.forward_many([(token_ids, cache)], all_logits)[0]
        assert logits is not None
        return logits

    @torch.no_grad()
    def forward_many(self, segments: Sequence[tuple[torch.Tensor, KVCache]], all_logits: bool = False,
                     wants_logits: Sequence[bool] | None = None) -> list[torch.Tensor | None]:  # fmt: skip
        """Several sequences in one pass, each (B_i, T_i) token ids continuing its own cache -> logits per sequence.

        Every weight product is ONE backend call over the rows of all sequences (continuous
        batching: the round trips do not grow with the number of sequences); attention and the
        caches stay per sequence. `wants_logits[i]` False skips sequence i's lm_head rows (a
        prefill chunk that does not end its prompt), and its entry is None.
        """
        decoding = sum(ids.numel() for ids, _ in segments) <= DECODE_ROWS
        with torch_threads(self.decode_threads if decoding else None):
            return self._forward_many(segments, all_logits, wants_logits)

    def _forward_many(self, segments: Sequence[tuple[torch.Tensor, KVCache]], all_logits: bool,
                      wants_logits: Sequence[bool] | None) -> list[torch.Tensor | None]:  # fmt: skip
        assert not torch.is_grad_enabled()  # the no_grad guarantee `tsqp check-grad` reports on
        shapes = [tuple(ids.shape) for ids, _ in segments]
        caches = [cache for _, cache in segments]
        rows = [b * t for b, t in shapes]  # each sequence's rows, batch-major, in call order
        h = self.backend.embed(torch.cat([ids.reshape(-1) for ids, _ in segments])[None]).float()  # (1, N, D)
        rope = [self.rotary(torch.arange(c.length, c.length + t).expand(b, t)) for (b, t), c in zip(shapes, caches)]
        for layer in range(self.config.n_layers):
            x = rms_norm(h, self.norms[f"layers.{layer}.attn_norm"], self.config.rms_norm_eps)
            h = h + self._attention(layer, x, shapes, rows, rope, caches)
            h = h + self._mlp(layer, rms_norm(h, self.norms[f"layers.{layer}.mlp_norm"], self.config.rms_norm_eps), rows)
        for (_, t), cache in zip(shapes, caches):
            cache.advance(t)
        wanted = list(wants_logits) if wants_logits is not None else [True] * len(segments)
        picked, per_sequence = [], []  # the rows lm_head sees, and how many of them each sequence owns
        for part, (b, t), want in zip(h[0].split(rows), shapes, wanted):
            part = part.view(b, t, -1) if all_logits else part.view(b, t, -1)[:, -1:]
            per_sequence.append(part.shape[:2] if want else None)
            if want:
                picked.append(part.reshape(-1, part.shape[-1]))
        if not picked:
            return [None] * len(segments)
        counts = [int(torch.Size(s).numel()) for s in per_sequence if s is not None]
        normed = rms_norm(torch.cat(picked)[None], self.norms["norm"], self.config.rms_norm_eps)
        logits = iter(self.backend.lm_head(normed, groups=counts).float()[0].split(counts))
        return [next(logits).view(*s, -1) if s is not None else None for s in per_sequence]

    def _attention(self, layer: int, x: torch.Tensor, shapes: Sequence[tuple[int, int]], rows: list[int],
                   rope: Sequence[tuple[torch.Tensor, torch.Tensor]], caches: Sequence[KVCache]) -> torch.Tensor:  # fmt: skip
        c = self.config
        q_all, k_all, v_all = self.backend.linear(layer, ("q_proj", "k_proj", "v_proj"), x, groups=rows)
        outs = []
        for q, k, v, (B, T), (cos, sin), cache in zip(q_all[0].split(rows), k_all[0].split(rows), v_all[0].split(rows), shapes, rope, caches):
            q = q.view(B, T, c.n_heads, c.head_dim).transpose(1, 2)  # (B, H, T, hd)
            k = k.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, KV, T, hd)
            v = v.view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = cache.update(layer, k, v)  # (B, KV, S, hd), S = past + T
            out = self._scaled_dot_product(q, k, v)  # (B, H, T, hd)
            outs.append(out.transpose(1, 2).reshape(B * T, c.n_heads * c.head_dim))
        return self.backend.linear(layer, ("o_proj",), torch.cat(outs)[None], groups=rows)[0]

    def _scaled_dot_product(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        offload = self.offload_attention_from is not None and T >= self.offload_attention_from
        if not offload:
            mask = None if T == 1 else causal_mask(T, S)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.config.head_dim**-0.5, enable_gqa=True)
        # Offloaded: the two products go to the backend; mask and softmax stay here.
        k = k.repeat_interleave(self.config.n_rep, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(self.config.n_rep, dim=1)
        scores = self.backend.matmul(q, k.transpose(-2, -1).contiguous()) * self.config.head_dim**-0.5  # (B, H, T, S)
        scores = scores.masked_fill(~causal_mask(T, S), float("-inf"))
        return self.backend.matmul(torch.softmax(scores, dim=-1), v.contiguous())

    def _mlp(self, layer: int, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        gate, up = self.backend.linear(layer, ("gate_proj", "up_proj"), x, groups=rows)
        return self.backend.linear(layer, ("down_proj",), F.silu(gate) * up, groups=rows)[0]
