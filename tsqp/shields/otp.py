"""`otp`: a one-time pad over Z_p on fixed-point activations, exact and exactly verified (see `tsqp.model.fixedpoint`)."""

from __future__ import annotations

import itertools
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

# The most one call's widest (T, K) or (T, N) int64 buffer takes: a longer call (a prefill chunk at a wide
# site, such as a 1B model's gate|up) is split, so that its buffers here and its masks stay within this.
CALL_BYTES = 8 << 20


@dataclass
class _OtpCall:
    x_q: np.ndarray  # (T, K) int64 activations as integers
    x_scale: np.ndarray  # (T, 1) float64
    mask_product: np.ndarray | None  # (T, N) R·W_qᵀ mod p as the pool holds it (None: no pad)
    y: np.ndarray | None = field(default=None)  # (T, N) int64 the unmasked integers, once computed


@dataclass(frozen=True)
class _Check:
    """A site's Freivalds vectors mod 2⁶⁴: r (N, 2) on all its outputs and s = W_q·r (K, 2); per module, its
    outputs start:end and its own s_i = W_q,i·r_i side by side (K, 2M), which sum to s."""

    r: np.ndarray
    s: np.ndarray
    modules: list[tuple[int, int]]
    s_per_module: np.ndarray


class OtpShield(Shield):
    """The exact one-time pad over Z_p (see `tsqp.fixedpoint` for the algebra and its bounds).

    Verification is Freivalds' check on the unmasked integers Y = X_q·W_qᵀ, mod 2⁶⁴ (int64
    arithmetic wraps), with two secret vectors r uniform over Z_2⁶⁴ and s = W_qᵀ·r precomputed.
    Y is first range-checked (|Y| ≤ the honest bound), so a wrong Y differs by some E with
    |E| < 2^(bound bits + 1); E·r ≡ 0 mod 2⁶⁴ then has probability at most 2^-(63 - bound bits)
    per vector, squared for two. Errors that are multiples of p leave Y unchanged: harmless.
    A fused call (q|k|v, gate|up) is checked as one matrix, one product each way; only a failure is checked
    per module, to name the module that failed.
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
        # Residues below 2³² are held in 4 bytes (a 32-bit field, `choose_field`): the pool's budget holds twice the rows.
        self._held_dtype = torch.uint32 if self.field.p <= 1 << 32 else torch.int64
        row_bytes = {site: self._held_dtype.itemsize * sum(w_q.shape) for site, (w_q, _) in sites.items()}  # R (K) and R·W_qᵀ (N)
        self._max_rows = {site: max(1, CALL_BYTES // (8 * max(w_q.shape))) for site, (w_q, _) in sites.items()}
        self.pool = MaskPool(self._make, list(sites), self.times, row_bytes, pool_bytes, self._max_rows) if masked else None  # unmasked: exact plain
        self.checks = self._freivalds_vectors() if verify else None
        self._w_scales = {site: scale.detach().numpy() for site, (_, scale, _) in quantized.groups.items()}  # (1, N) float64
        self._w_l2sq = {site: fixedpoint.max_row_l2sq(w_q) for site, (w_q, _, _) in quantized.groups.items()} if self.field.rows_limited else {}
        self._norm_caps = {site: fixedpoint.norm_cap(l2sq, self.field.bound, quantized.groups[site][0].shape[0]) for site, l2sq in self._w_l2sq.items()}
        self.rows_coarsened = 0  # activation rows quantized more coarsely to stay within a narrow field (`widen_scales`)

    def _freivalds_vectors(self) -> dict[Site, _Check]:
        """Per site, its `_Check`: each module's two vectors r_i (N_i, 2), its s_i from one product with r block-diagonal
        (made for that product only), and their sums (uint64 sums wrap: mod 2⁶⁴)."""
        checks = {}
        for site, (w_q, _, sizes) in self.quantized.groups.items():
            vectors = [fixedpoint.random_u64((n, self.FREIVALDS_VECTORS)) for n in sizes]
            s_per_module = fixedpoint.matmul_mod_2_64(w_q, block_diagonal(vectors).detach().numpy().view(np.uint64))
            # A lone module's s_i is the site's s: shared, not summed into a copy.
            s = s_per_module if len(sizes) == 1 else s_per_module.reshape(w_q.shape[0], len(sizes), -1).sum(axis=1, dtype=np.uint64)
            r = torch.cat(vectors).detach().numpy().view(np.uint64)
            ends = list(itertools.accumulate(sizes))
            checks[site] = _Check(r, s, [(end - n, end) for n, end in zip(sizes, ends, strict=True)], s_per_module)
        return checks

    def max_rows(self, site: Site) -> int | None:
        return self._max_rows[site]

    def wire_args(self) -> dict[str, Any]:
        return self.field.as_args()

    def _make(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_q = self.quantized.groups[site][0]
        r = fixedpoint.random_mod((rows, w_q.shape[0]), self.field.p)
        rw = fixedpoint.product_mod(r, w_q, self.field.p, self.field.limb_bits)
        return r.to(self._held_dtype), rw.to(self._held_dtype)

    # The per-call work below runs in numpy: 4 calls per layer and decoded token, of a few small
    # elementwise ops each, where torch's dispatch overhead would dominate.

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        # fixedpoint.quantize_rows, in numpy for one-row calls (it stays torch for the weights,
        # where torch's threads shorten start-up). In place where it can be: a prefill chunk's
        # (T, K) temporaries are megabytes each on a 1B model.
        x = x.detach().numpy().astype(np.float64)  # our copy
        top = (1 << (self.field.activation_bits - 1)) - 1
        x_scale = np.abs(x).max(axis=-1, keepdims=True) / top
        if self.field.rows_limited:  # a narrow field: no row's products may pass its bound
            self.rows_coarsened += fixedpoint.widen_scales(x, x_scale, self._norm_caps[site])
        x_scale[x_scale == 0] = 1.0  # an all-zero row stays zero
        x /= x_scale
        x_q = np.rint(x, out=x).astype(np.int64)  # |x_q| <= top
        del x
        if self.field.rows_limited:
            fixedpoint.check_rows_bounded(x_q, self._w_l2sq[site], self.field.bound)
        if self.pool is None:  # exact plain: the same integers and checks, with R = 0
            return torch.from_numpy(x_q % self.field.p), _OtpCall(x_q, x_scale, None)
        r, rw = self.pool.take(site, x_q.shape[0])
        wire = np.add(r.detach().numpy(), x_q, dtype=np.int64)  # in [-top, p + top): one correction either way is the residue mod p
        wire[wire < 0] += self.field.p
        wire[wire >= self.field.p] -= self.field.p
        return torch.from_numpy(wire), _OtpCall(x_q, x_scale, rw.detach().numpy())

    def _integers(self, z: torch.Tensor, call: _OtpCall) -> np.ndarray:
        """Y = Z - R·W_qᵀ, centred."""
        if call.y is None:
            p, z = self.field.p, z.detach().numpy()
            y = z.copy() if call.mask_product is None else np.subtract(z, call.mask_product, dtype=np.int64)
            call.mask_product = None  # spent: its memory goes
            # The centred representative in [-(p // 2), p // 2], in three passes whatever the reply held (a value
            # outside the field, from a dishonest server, lands in the field too, and the check judges it): 1.4x
            # faster than a range test and a correction either way at a decode row's widths, 2.7x at lm_head's.
            y += p // 2
            np.remainder(y, p, out=y)
            y -= p // 2
            call.y = y
        return call.y

    def verify(self, site: Site, wire: torch.Tensor, z: torch.Tensor, state: Any) -> None:
        assert self.checks is not None
        y = self._integers(z, state)
        if y.size and max(int(y.max()), -int(y.min())) > self.field.bound:
            raise IntegrityError(integrity_message(site, "|".join(module_names(site)), "a value beyond any honest result"))
        check = self.checks[site]
        y, x_q = y.view(np.uint64), state.x_q.view(np.uint64)
        if ((y @ check.r) != (x_q @ check.s)).any():  # (T, 2) each way, mod 2⁶⁴
            raise IntegrityError(integrity_message(site, self._failed_module(site, check, y, x_q), "Freivalds check mod 2^64"))

    def _failed_module(self, site: Site, check: _Check, y: np.ndarray, x_q: np.ndarray) -> str:
        """The first module whose own check fails: one does where the whole call's did, as its terms sum to the call's."""
        lhs = np.concatenate([y[:, start:end] @ check.r[start:end] for start, end in check.modules], axis=1)  # (T, 2M)
        bad = np.nonzero((lhs != x_q @ check.s_per_module).any(axis=0))[0]
        return module_names(site)[int(bad[0]) // self.FREIVALDS_VECTORS]

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        y = self._integers(z, state)
        out = np.empty(y.shape, dtype=np.float32)
        # (y · x_scale) · w_scale in float64, rounded once to float32, a block of rows at a time:
        # a float64 copy of a prefill chunk's whole result would be tens of megabytes.
        for start, end in fixedpoint.block_ranges(y.shape[0], y.shape[1]):
            block = np.multiply(y[start:end], state.x_scale[start:end])
            block *= self._w_scales[site]
            out[start:end] = block
        return torch.from_numpy(out)
