"""`plain` with `--verify`: otp's fixed-point products and exact Freivalds check, without the pad.

The server sees everything, as under plain, but its results are integers X_q·W_qᵀ mod p that
the TEE checks exactly: no rounding tolerance is left for a hostile server to spend. This is
also the honest baseline for otp's cost: the difference between the two is the pad alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tsqp.model.linear import QuantizedWeights
from tsqp.shields.otp import OtpShield
from tsqp.shields.sites import Site


class ExactPlainShield(OtpShield):
    """Unmasked fixed point: the wire carries X_q mod p; the embedding lookup stays on the server, checked exactly."""

    name = "plain"
    embeds_remotely = True

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str,
                 quantized: QuantizedWeights, activation_bits: int) -> None:  # fmt: skip
        super().__init__(sites, verify, server_dtype, quantized, activation_bits, masked=False)
