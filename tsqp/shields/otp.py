"""`otp`: a one-time pad over Z_p on fixed-point activations, exact and exactly verified (see `tsqp.model.fixedpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tsqp.errors import IntegrityError
from tsqp.model import fixedpoint
from tsqp.model.linear import QuantizedWeights
from tsqp.shields.base import Shield
from tsqp.shields.config import ACTIVATION_BITS, POOL_MIB
from tsqp.shields.freivalds import block_diagonal
from tsqp.shields.pool import MaskPool
from tsqp.shields.sites import Site, integrity_message, module_names


@dataclass
class _OtpCall:
    x_q: np.ndarray  # (T, K) int64 activations as integers
    x_scale: np.ndarray  # (T, 1) float64
    mask_product: np.ndarray  # (T, N) int64 R·W_qᵀ mod p
    y: np.ndarray | None = field(default=None)  # (T, N) int64 the unmasked integers, once computed


class OtpShield(Shield):
    """The exact one-time pad over Z_p (see `tsqp.fixedpoint` for the algebra and its bounds).

    Verification is Freivalds' check on the unmasked integers Y = X_q·W_qᵀ, mod 2⁶⁴ (int64
    arithmetic wraps), with two secret vectors r uniform over Z_2⁶⁴ and s = W_qᵀ·r precomputed.
    Y is first range-checked (|Y| ≤ the honest bound), so a wrong Y differs by some E with
    |E| < 2^(bound bits + 1); E·r ≡ 0 mod 2⁶⁴ then has probability at most 2^-(63 - bound bits)
    per vector, squared for two. Errors that are multiples of p leave Y unchanged: harmless.
    """

    name = "otp"
    embeds_remotely = False
    float_results = False
    FREIVALDS_VECTORS = 2

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str,
                 quantized: QuantizedWeights, activation_bits: int = ACTIVATION_BITS, pool_bytes: int = POOL_MIB << 20,
                 masked: bool = True) -> None:  # fmt: skip
        super().__init__(sites, verify, server_dtype)
        self.quantized = quantized
        self.field = fixedpoint.choose_field(quantized.l1, quantized.bits, activation_bits)
        row_bytes = {site: 8 * sum(w_q.shape) for site, (w_q, _) in sites.items()}  # R (K) and R·W_qᵀ (N), int64
        self.pool = MaskPool(self._make, list(sites), self.times, row_bytes, pool_bytes) if masked else None  # unmasked: exact plain
        self.checks = self._freivalds_vectors() if verify else None
        self._w_scales = {site: scale.detach().numpy() for site, (_, scale, _) in quantized.groups.items()}  # (1, N) float64

    def _freivalds_vectors(self) -> dict[Site, tuple[np.ndarray, np.ndarray]]:
        """Per site: r (N, 2M) block-diagonal, two vectors per module, and s = W_q·r (K, 2M), both mod 2⁶⁴."""
        checks = {}
        for site, (w_q, _, sizes) in self.quantized.groups.items():
            r = block_diagonal([fixedpoint.random_u64((n, self.FREIVALDS_VECTORS)) for n in sizes]).detach().numpy().view(np.uint64)
            checks[site] = (r, fixedpoint.matmul_mod_2_64(w_q, r))
        return checks

    def wire_args(self) -> dict[str, Any]:
        return self.field.as_args()

    def _make(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_q = self.quantized.groups[site][0]
        r = fixedpoint.random_mod((rows, w_q.shape[0]), self.field.p)
        return r, fixedpoint.product_mod(r, w_q, self.field.p, self.field.limb_bits)

    # The per-call work below runs in numpy: 4 calls per layer and decoded token, of a few small
    # elementwise ops each, where torch's dispatch overhead would dominate.

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        # fixedpoint.quantize_rows, in numpy for one-row calls (it stays torch for the weights,
        # where torch's threads shorten start-up).
        x = x.detach().numpy().astype(np.float64)
        top = (1 << (self.field.activation_bits - 1)) - 1
        x_scale = np.abs(x).max(axis=-1, keepdims=True) / top
        x_scale[x_scale == 0] = 1.0  # an all-zero row stays zero
        x_q = np.rint(x / x_scale).astype(np.int64)  # |x_q| <= top
        if self.pool is None:  # exact plain: the same integers and checks, with R = 0
            return torch.from_numpy(x_q % self.field.p), _OtpCall(x_q, x_scale, np.zeros((1, 1), dtype=np.int64))
        r, rw = self.pool.take(site, x.shape[0])
        wire = x_q + r.detach().numpy()  # in [-top, p + top): one correction either way is the residue mod p
        wire[wire < 0] += self.field.p  # in place, as below: a prefill chunk's (T, K) int64 temporaries are megabytes
        wire[wire >= self.field.p] -= self.field.p
        return torch.from_numpy(wire), _OtpCall(x_q, x_scale, rw.detach().numpy())

    def _integers(self, z: torch.Tensor, call: _OtpCall) -> np.ndarray:
        if call.y is None:
            p, z = self.field.p, z.detach().numpy()
            y = z - call.mask_product
            if z.size and (int(z.min()) < 0 or int(z.max()) >= p):
                y %= p  # outside the field (a dishonest server): reduce, as every honest value is
            # y in (-p, p): the centred representative by one correction either way (no division).
            y[y > p // 2] -= p
            y[y < -(p // 2)] += p
            call.y = y
        return call.y

    def verify(self, site: Site, wire: torch.Tensor, z: torch.Tensor, state: Any) -> None:
        assert self.checks is not None
        y = self._integers(z, state)
        if y.size and max(int(y.max()), -int(y.min())) > self.field.bound:
            raise IntegrityError(integrity_message(site, "|".join(module_names(site)), "a value beyond any honest result"))
        r, s = self.checks[site]
        lhs = y.view(np.uint64) @ r  # (T, 2M), mod 2⁶⁴
        rhs = state.x_q.view(np.uint64) @ s
        bad = (lhs != rhs).any(axis=0)
        if bad.any():
            module = module_names(site)[int(np.nonzero(bad)[0][0]) // self.FREIVALDS_VECTORS]
            raise IntegrityError(integrity_message(site, module, "Freivalds check mod 2^64"))

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        out = self._integers(z, state).astype(np.float64)
        out *= state.x_scale  # (y · x_scale) · w_scale, in place: the same roundings, one temporary
        out *= self._w_scales[site]
        return torch.from_numpy(out.astype(np.float32))
