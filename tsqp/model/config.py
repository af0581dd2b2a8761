"""`ModelConfig`: the sizes of a LLaMA model, shared by both sides (the server sizes its limits from it).

Also the fixed-point widths both sides accept for otp: the server checks a request's, the TEE its settings'.
Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WEIGHT_BITS_RANGE = (2, 16)  # the server's float64 limb products stay exact only for weights this narrow
ACTIVATION_BITS_RANGE = (2, 24)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_seq_len: int

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            n_layers=hf.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_seq_len=hf.max_position_embeddings,
        )
