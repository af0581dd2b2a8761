"""Exact fixed-point arithmetic mod p: the algebra behind the `otp` shield.

Both sides use this module, so they quantize the public weights identically:

- Weights are quantized per output row to `weight_bits`-bit integers W_q (scale kept by the TEE).
- The TEE quantizes each activation row to `activation_bits`-bit integers X_q, masks it with
  R uniform over Z_p, and sends X̃ = (X_q + R) mod p.
- The server returns X̃·W_qᵀ mod p, computed exactly: float64 products of integers are exact
  while every partial sum stays below 2⁵³, so X̃ is split into limbs of `limb_bits` bits with
  max_row‖W_q‖₁ · 2^limb_bits < 2⁵³, and the limb products are combined by Horner's rule mod p
  in int64, which needs 2p · 2^limb_bits < 2⁶³ (one limb, where p's residues fit it, needs no Horner step).
- The TEE subtracts R·W_qᵀ mod p (precomputed offline) and lifts to the centred representative.
  That equals X_q·W_qᵀ exactly because |X_q·W_qᵀ| ≤ (2^(b_x-1) - 1) · max_row‖W_q‖₁ < p/2.
- Where that worst case would need a field wider than `NARROW_FIELD_BITS`, and a narrower one costs the
  widest row at most `NARROW_MAX_LOSS_BITS` bits, the field is that narrow and each activation row is bounded
  on its own (`widen_scales`): |x_q·w| ≤ ‖x_q‖₂·max‖w‖₂ (Cauchy–Schwarz) must stay ≤ p // 2, and a row that
  would pass it is quantized more coarsely (SmolLM2: 2 rows in 5, by half a bit on average; docs/benchmarks.md).

`choose_field` checks these bounds for the loaded model and refuses to run rather than wrap.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tsqp.errors import ShieldError
from tsqp.model.config import ACTIVATION_BITS_RANGE, WEIGHT_BITS_RANGE
from tsqp.model.pages import FilePages

FLOAT64_EXACT = 1 << 53  # float64 holds every integer below this exactly
INT64_LIMIT = 1 << 63
MAX_LIMBS = 4
# The most bytes of float64 one step of a product widens or makes at once: the TEE's weights are
# made block by block, so its working memory stays this size whatever the model.
BLOCK_BYTES = 4 << 20
# The most limb rows a product takes on float32's narrow limbs: beyond, products are compute-bound,
# and fewer, wider float64 limbs cost less than the conversion of a weight block.
FLOAT32_LIMB_ROWS = 64
# p below 2³²: the server multiplies 4 centred int8 digits a value instead of 5 (`Int8Digits`), and the TEE's
# mask products take one float64 limb instead of two while max row L1 < 2²¹ (SmolLM2's is 2^19.8 at 12-bit weights).
NARROW_FIELD_BITS = 32
NARROW_MAX_LOSS_BITS = 4  # the most bits of precision the narrow field may cost any activation row (SmolLM2's: 3.8)


@dataclass(frozen=True)
class Field:
    """The ring Z_p and the fixed-point widths one model is masked with."""

    p: int
    limb_bits: int
    weight_bits: int
    activation_bits: int
    bound: int  # the largest |X_q·W_qᵀ| any honest result can have
    rows_limited: bool = False  # bound below the worst case at `activation_bits`: rows are bounded each (`widen_scales`)

    @property
    def limbs(self) -> int:
        return -(-self.p.bit_length() // self.limb_bits)

    def as_args(self) -> dict[str, int]:
        """What the server needs to compute its side (public: the mask is what is secret)."""
        return {"p": self.p, "limb_bits": self.limb_bits, "weight_bits": self.weight_bits}


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization: x (..., K) -> (integers as float64, scale (..., 1) float64).

    Computed in float64 on the CPU so that server and TEE get identical integers: x times the
    scale's reciprocal, rounded half to even (`DerivedIntegers.rows` repeats these steps).
    No clamp is needed: |x| <= max |x| = scale·top, so x·(1/scale) stays within a few ulps of ±top.
    """
    x = x.detach().to("cpu", torch.float64, copy=True)  # our own copy: the steps below work in place
    top = (1 << (bits - 1)) - 1
    scale = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True) / top  # max |x| per row
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    return x.mul_(1.0 / scale).round_(), scale


def quantize_matrix(w: torch.Tensor, bits: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """`quantize_rows` of w (N, K), stored as `dtype` on `device`, a block of rows at a time
    (no float64 copy of the whole matrix): (W_q (N, K), scale (N, 1) float64, max row L1)."""
    w_q = torch.empty(w.shape, dtype=dtype, device=device)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float64)
    l1 = 0
    for start, end in block_ranges(w.shape[0], w.shape[1]):
        q, scale[start:end] = quantize_rows(w[start:end], bits)
        w_q[start:end] = q.to(dtype)
        if q.numel():
            l1 = max(l1, int(q.abs().sum(dim=1).max()))
    return w_q, scale, l1


class DerivedIntegers:
    """W_q (K, N), never stored: the float rows w_i (N_i, K) stacked and quantized per row, made a block of
    columns at a time for the product that reads it (`columns`). What stays is the scales.

    The TEE's copy of the weights (`otp` and exact plain): the masks' products read W_q a block at a
    time anyway, and rounding a float block costs little more than widening a stored integer one.
    Rows read through a file mapping (`pages`) are handed back after each read, so between products
    the weights hold no resident memory at all (docs/benchmarks.md).
    """

    def __init__(self, parts: Sequence[torch.Tensor], bits: int, pages: FilePages | None = None) -> None:
        self.parts = [part.detach() for part in parts]  # each (N_i, K), as the model holds it
        self._ends = list(itertools.accumulate(part.shape[0] for part in self.parts))
        self.shape = torch.Size((self.parts[0].shape[1], self._ends[-1]))
        self.device = self.parts[0].device
        self._pages = pages if pages is not None and all(pages.holds(part) for part in self.parts) else None
        self.scale = torch.empty(self.shape[1], 1, dtype=torch.float64)  # per output row
        self.l1 = 0  # max row L1 of W_q
        self.l2sq = 0  # max row ‖W_q‖₂² (`norm_cap`)
        for start, end in block_ranges(self.shape[1], self.shape[0]):
            rows = torch.empty(end - start, self.shape[0], dtype=self.parts[0].dtype)
            self._each_piece(start, end, rows.__setitem__)
            q, self.scale[start:end] = quantize_rows(rows, bits)
            if q.numel():
                self.l1 = max(self.l1, int(q.abs().sum(dim=1).max()))
                self.l2sq = max(self.l2sq, int(q.square().sum(dim=1).max()))  # exact: below 2^53 for K < 2^23 at 16 bits

    def rows(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:end of W_q (end - start, K), float64 integers, into `out` if given: exactly `quantize_rows`'."""
        out = torch.empty(end - start, self.shape[0], dtype=torch.float64) if out is None else out
        self._each_piece(start, end, out.__setitem__)
        return out.mul_(1.0 / self.scale[start:end]).round_()  # as `quantize_rows` computes it

    def columns(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Columns start:end of W_q (K, end - start): the transposed view of `rows`."""
        return self.rows(start, end, out).t()

    def dense(self) -> torch.Tensor:
        """All of W_q (K, N) in float64: for tests and small models only."""
        return self.columns(0, self.shape[1])

    def _each_piece(self, start: int, end: int, use: Callable[[slice, torch.Tensor], object]) -> None:
        """`use(rows of the block, piece)` for each part's share of stacked rows start:end; file pages read are handed back."""
        for part, part_end in zip(self.parts, self._ends, strict=True):
            part_start = part_end - part.shape[0]
            lo, hi = max(start, part_start), min(end, part_end)
            if lo < hi:
                piece = part[lo - part_start : hi - part_start]
                use(slice(lo - start, hi - start), piece)
                if self._pages is not None:
                    self._pages.release(piece)


def columns(w_q: torch.Tensor | DerivedIntegers, start: int, end: int) -> torch.Tensor:
    """Columns start:end of a (K, N) integer matrix in float64: a view when it is stored in float64.

    Derived ones are made in this thread's block buffer, reused from block to block: valid until the
    thread's next call. Blocks are megabytes; a fresh allocation each would cost its page faults."""
    if not isinstance(w_q, DerivedIntegers):
        return w_q[:, start:end].to(torch.float64)
    need = (end - start) * w_q.shape[0]
    buffer = getattr(_block, "buffer", None)
    if buffer is None or buffer.numel() < need:  # a block is at least one line, however long
        buffer = _block.buffer = torch.empty(max(BLOCK_BYTES // 8, need), dtype=torch.float64)
    return w_q.columns(start, end, buffer[:need].view(end - start, w_q.shape[0]))


_block = threading.local()  # per thread: the pool's worker and a stalled call make masks at once


def max_row_l1(w_q: torch.Tensor) -> int:
    """max over output rows of Σ|W_q|, for W_q stored transposed (K, N)."""
    return int(w_q.abs().sum(dim=0).max())


def max_row_l2sq(w_q: torch.Tensor | DerivedIntegers) -> int:
    """max over output rows of Σ W_q², for W_q (K, N) stored transposed or derived."""
    if isinstance(w_q, DerivedIntegers):
        return w_q.l2sq
    return int(w_q.to(torch.float64).square().sum(dim=0).max()) if w_q.numel() else 0


def choose_field(l1: int, weight_bits: int, activation_bits: int, narrow: bool = True) -> Field:
    """The smallest prime field that holds every honest result, with limbs that keep products exact; with `narrow`, at
    most `NARROW_FIELD_BITS` wide where that costs no row more than `NARROW_MAX_LOSS_BITS` bits (`widen_scales`)."""
    (w_low, w_high), (a_low, a_high) = WEIGHT_BITS_RANGE, ACTIVATION_BITS_RANGE
    if not w_low <= weight_bits <= w_high or not a_low <= activation_bits <= a_high:
        raise ShieldError(f"otp widths out of range: weight bits {weight_bits} ({w_low}..{w_high}), activation bits {activation_bits} ({a_low}..{a_high})")
    bound = ((1 << (activation_bits - 1)) - 1) * l1
    bits = (2 * bound + 1).bit_length()
    p = previous_prime(1 << bits)
    if p <= 2 * bound:
        bits += 1
        p = previous_prime(1 << bits)
    rows_limited = False
    if narrow and bits > NARROW_FIELD_BITS:
        narrow_p = previous_prime(1 << NARROW_FIELD_BITS)
        if bound <= (narrow_p // 2) << NARROW_MAX_LOSS_BITS:
            p, bits, bound, rows_limited = narrow_p, NARROW_FIELD_BITS, narrow_p // 2, True
    exact_bits = ((FLOAT64_EXACT - 1) // max(l1, 1)).bit_length() - 1  # the widest limbs whose products stay exact
    # One limb where p's residues are that narrow: its products are reduced once, no Horner step. Else Horner's
    # acc·2^ℓ + part < 2p·2^ℓ: one spare bit below 2⁶³. (One limb halves the TEE's mask products: SmolLM2's narrow
    # 32-bit field takes one, its worst-case 36-bit field two.)
    limb_bits = p.bit_length() if p.bit_length() <= exact_bits else min(exact_bits, ((INT64_LIMIT - 1) // (2 * p)).bit_length() - 1)
    if limb_bits < 1 or -(-bits // limb_bits) > MAX_LIMBS:
        raise ShieldError(
            f"otp cannot be exact for this model with {weight_bits}-bit weights and {activation_bits}-bit activations: "
            f"results reach 2^{bound.bit_length()}, products would need more than {MAX_LIMBS} limbs; use fewer bits"
        )
    return Field(p=p, limb_bits=limb_bits, weight_bits=weight_bits, activation_bits=activation_bits, bound=bound, rows_limited=rows_limited)


# Relative slack for float64's rounding in `norm_cap`'s and `widen_scales`' steps (each within K·2⁻⁵³ of the truth).
NORM_SLACK = 2.0**-30


def norm_cap(w_l2sq: int, bound: int, k: int) -> float:
    """The largest ‖x / scale‖₂ a row of K features may have so that its integers' products with weights of max row
    ‖w‖₂² `w_l2sq` stay within `bound`: rounding adds at most ½·√K to the norm, Cauchy–Schwarz does the rest."""
    cap = bound * (1 - NORM_SLACK) / math.sqrt(max(w_l2sq, 1)) - 0.5 * math.sqrt(k)
    if cap <= 0:
        raise ShieldError(f"a field bound of {bound} cannot hold one row of {k} features (max row L2² {w_l2sq})")
    return cap


def widen_scales(x: np.ndarray, x_scale: np.ndarray, cap: float) -> int:
    """Raise each row's scale (T, 1) to ‖x‖₂ / cap where that is larger, in place (`norm_cap`); returns how many were.
    The same steps whatever the rows hold (no branch on the data: a coarsened row takes no longer), a handful of
    numpy steps at every otp call."""
    needed = np.sqrt(np.vecdot(x, x))[:, None]
    needed *= (1 + NORM_SLACK) / cap
    wider = int(np.count_nonzero(needed > x_scale))
    np.maximum(x_scale, needed, out=x_scale)
    return wider


def check_rows_bounded(x_q: np.ndarray, w_l2sq: int, bound: int) -> None:
    """ShieldError unless every row's ‖x_q‖₂·max‖w‖₂ ≤ bound, exactly: the largest squared norm is an int64 sum (exact
    for |x_q| < 2²³ and K < 2¹⁷), compared in Python's integers."""
    if x_q.size and int(np.vecdot(x_q, x_q).max()) * w_l2sq > bound * bound:
        raise ShieldError("an activation row's products could leave the field: scaled rows out of bounds (a bug)")


def check_product_exact(l1: int, p: int, limb_bits: int) -> None:
    """The server's side of the bound, for the parameters a client sent."""
    if not 2 < p < INT64_LIMIT or not 1 <= limb_bits <= 52:
        raise ValueError(f"field p={p} / limb_bits={limb_bits} out of range")
    one_limb = p.bit_length() <= limb_bits  # no Horner step: its int64 bound does not apply
    if l1 * ((1 << limb_bits) - 1) >= FLOAT64_EXACT or (not one_limb and p << (limb_bits + 1) >= INT64_LIMIT):
        raise ValueError(f"limbs of {limb_bits} bits are too wide for exact products with p={p} (max row L1 {l1})")
    if -(-p.bit_length() // limb_bits) > MAX_LIMBS:
        raise ValueError(f"p={p} with {limb_bits}-bit limbs needs more than {MAX_LIMBS} limbs")


def product_mod(x: torch.Tensor, w_q: torch.Tensor | DerivedIntegers | Int8Digits, p: int, limb_bits: int, l1: int | None = None) -> torch.Tensor:
    """x (T, K) int64 in [0, p) @ w_q (K, N) integers -> (T, N) int64 in [0, p), exactly.

    Runs on w_q's device. x is split into limbs, stacked into one product so that the weights are
    read once, and the limb products are combined by Horner's rule from the most significant.
    - `Int8Digits` (the server's on a CPU): int8 digits, see there.
    - float32 w_q (the server's) with its max row L1 `l1`, for few rows (decode): limbs narrow enough
      for float32 (`float32_limb_bits`), no copy of the weights. Decode is memory-bound, so reading
      4 bytes a weight instead of 8 is what counts; the extra limbs ride along in the same pass.
    - otherwise float64 limbs of `limb_bits`, w_q made float64 one block of columns at a time
      (the TEE's `DerivedIntegers`, or float32), or sliced without a copy when it is float64.
    """
    x = x.to(w_q.device)
    if isinstance(w_q, Int8Digits):
        return w_q.product_mod(x, p)
    stored = w_q.dtype if isinstance(w_q, torch.Tensor) else None
    # Never wider than `limb_bits`, which `check_product_exact` keeps within Horner's int64 bound.
    narrow = min(float32_limb_bits(l1), limb_bits) if l1 is not None and stored == torch.float32 else 0
    if narrow > 0 and x.shape[0] * -(-p.bit_length() // narrow) <= FLOAT32_LIMB_ROWS:
        return _horner(_limbs(x, narrow, p, torch.float32) @ w_q, x.shape[0], p, narrow)
    limbs = _limbs(x, limb_bits, p, torch.float64)
    out = torch.empty(x.shape[0], w_q.shape[1], dtype=torch.int64, device=w_q.device)
    # Blocks bound the float64 memory: a block of the weights made float64, or else just the block's products.
    width = limbs.shape[0] if stored == torch.float64 else max(w_q.shape[0], limbs.shape[0])
    for start, end in block_ranges(w_q.shape[1], width):
        out[:, start:end] = _horner(limbs @ columns(w_q, start, end), x.shape[0], p, limb_bits)
    return out


DIGIT_BASE = 256  # int8 digits, balanced: in [-128, 127]
INT32_LIMIT = 1 << 31
PRODUCTS_BYTES = 64 << 20  # the int32 digit products of one `Int8Digits` product call, at most


def digits_for(magnitude: int) -> int:
    """How many balanced base-256 digits hold every integer in [-magnitude, magnitude]."""
    n = 1
    while 127 * (DIGIT_BASE**n - 1) // (DIGIT_BASE - 1) < magnitude:
        n += 1
    return n


def balanced_digits(x: np.ndarray, n: int) -> np.ndarray:
    """Integers x (int64, within `digits_for`'s range for n) -> n int8 digits (n, *x.shape), least
    significant first, with x = Σ_j digits_j · 256^j."""
    low_bytes = _offset_bytes(x, n)
    out = np.empty(low_bytes.shape, dtype=np.uint8)
    np.bitwise_xor(low_bytes, 0x80, out=out)  # d + 128 -> d: the top bit flipped
    return out.view(np.int8)


def offset_digits(x: np.ndarray, n: int) -> np.ndarray:
    """`balanced_digits` each plus 128, as uint8: oneDNN's unsigned operand (zero point 128)."""
    return np.ascontiguousarray(_offset_bytes(x, n))


def _offset_bytes(x: np.ndarray, n: int) -> np.ndarray:
    """The digits plus 128, as a (n, *x.shape) view of x + Σ_j 128·256^j's bytes.

    That sum lies in [0, 256^n) exactly when x is within n balanced digits' range, and its n low bytes
    are then the digits plus 128: one add and a byte view (a few µs for a decode row, where a loop of
    shifts and subtractions took ~100); each caller makes its digits from it in one pass."""
    offset = np.uint64(128 * (DIGIT_BASE**n - 1) // (DIGIT_BASE - 1))
    shifted = (np.ascontiguousarray(x, dtype=np.int64).view(np.uint64) + offset).astype("<u8", copy=False)  # wraps mod 2⁶⁴: exact for n = 8 too
    return np.moveaxis(shifted.view(np.uint8).reshape(*shifted.shape, 8)[..., :n], -1, 0)


FLOAT32_EXACT = 1 << 24  # float32 holds every integer below this exactly


@functools.cache
def onednn_exact() -> bool:
    """Whether oneDNN's u8·s8 products (`torch.ops.onednn.qlinear_pointwise`) come back exact on this CPU.

    They are, into float32, while a result stays below 2²⁴, where the CPU sums the byte products in
    int32 (AVX512-VNNI, AMX) and takes the zero point's share (128·Σw) off in int32 too. Without VNNI,
    x86 sums byte pairs in int16 and saturates; a kernel could take the zero point's share off in
    float32, after the uint8 sum (2²⁵ here) was rounded; other CPUs may lack the op. So it is
    probed once, at extremes that catch each: 255·127 twice (int16), uint8 sums past 2²⁴ whose results
    are odd and below it. A CPU that fails keeps `torch._int_mm`."""
    gen = torch.Generator().manual_seed(0)
    k = 1000  # 128 · 128 · k < 2²⁴: every result exact where the kernel is
    x = torch.randint(0, 256, (6, k), generator=gen, dtype=torch.uint8)
    x[0], x[1], x[2, ::2], x[2, 1::2], x[3] = 255, 0, 255, 0, torch.randint(250, 256, (k,), generator=gen, dtype=torch.uint8)
    w = torch.randint(-128, 128, (6, k), generator=gen, dtype=torch.int8)
    w[0], w[1], w[2, ::2], w[2, 1::2], w[3] = 127, -128, -128, 127, torch.randint(126, 128, (k,), generator=gen, dtype=torch.int8)
    try:
        y = _onednn_products(x, _OnednnWeights(w))
    except Exception:  # no oneDNN int8 kernels in this build, on this CPU, or with this signature: any failure means not here
        return False
    return torch.equal(y.to(torch.int64), (x.to(torch.int64) - 128) @ w.to(torch.int64).t())


class _OnednnWeights:
    """int8 weights (N, K) packed for oneDNN's int8 products, with unit scales."""

    def __init__(self, w: torch.Tensor) -> None:
        self.packed = torch.ops.onednn.qlinear_prepack(w, None)
        self.scales = torch.ones(w.shape[0])
        self.zero_points = torch.zeros(w.shape[0], dtype=torch.int64)


ONEDNN_SPAN = (FLOAT32_EXACT - 1) // (128 * 128)  # 1023: a digit row this wide has exact float32 products, whatever it holds


def _onednn_products(x: torch.Tensor, w: _OnednnWeights) -> torch.Tensor:
    """(x - 128) @ wᵀ for uint8 x (T, K), in float32: exact below 2²⁴ where `onednn_exact`."""
    return torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, w.packed, w.scales, w.zero_points, None, 1.0, 0, torch.float32, "none", [], "")


class Int8Digits:
    """W_q (K, N) integers held as m balanced int8 digits each (`balanced_digits`): the server's otp
    weights on a CPU, 2 bytes a 12-bit weight where float64 takes 8.

    A product x·W_q mod p splits x into int8 digits too and multiplies digits in one int8 product,
    then combines the digit products in int64 mod p. Decode is memory-bound, so reading a quarter of
    float64's bytes is what counts; int8 products are also the CPU's widest (docs/benchmarks.md).
    The product is oneDNN's where this CPU's are exact (`onednn_exact`). Its results are float32, exact
    while a digit of x (at most 128) times a digit row's L1 stays below 2²⁴: wider rows are split into
    spans of `ONEDNN_SPAN` columns, whose products are added in int32. It reads weights packed once,
    where `torch._int_mm` repacks them at every call: a SmolLM2 decode token took 37 against 60 ms on
    one core. Elsewhere it is `torch._int_mm`, whose sums are int32, on the digits stored (K, m·N), side
    by side: read from memory, not cache, it took 0.54 ms for that layout against 0.66 for the
    transposed one (576 x 6144, one core).
    """

    def __init__(self, w_q: torch.Tensor) -> None:
        """`w_q` (N, K): integers (any dtype), each output row's weights in a row."""
        self.shape = torch.Size((w_q.shape[1], w_q.shape[0]))  # (K, N), as the product sees it
        self.device = w_q.device
        self.dtype = torch.int8
        n_out = w_q.shape[0]
        self.m = digits_for(int(w_q.abs().max()) if w_q.numel() else 0)
        w = torch.empty(self.m * n_out, w_q.shape[1], dtype=torch.int8, device=w_q.device)  # (m·N, K)
        l1 = [0] * self.m  # per digit: the largest Σ_k |digit| of one output row
        for start, end in block_ranges(n_out, w_q.shape[1]):
            digits = torch.from_numpy(balanced_digits(w_q[start:end].detach().cpu().numpy(), self.m))
            for i in range(self.m):
                w[i * n_out + start : i * n_out + end] = digits[i]
                if end > start:
                    l1[i] = max(l1[i], int(digits[i].to(torch.int64).abs().sum(dim=1).max()))  # int8's abs(-128) is -128
        if 128 * max(l1) >= INT32_LIMIT:
            raise ValueError(f"weights too wide for int32 sums of int8 digit products (a digit row's L1 reaches {max(l1)})")
        # |Σ_i P_i · 256^i| for one digit of x (|digit| <= 128): what one of x's digits' recombined products can reach (`_combine_digits`).
        self.digit_bound = 128 * sum(part * DIGIT_BASE**i for i, part in enumerate(l1))
        self.nbytes = w.nbytes
        self.onednn = w.device.type == "cpu" and w.numel() > 0 and onednn_exact()
        if self.onednn:  # rows whose products could reach 2²⁴ are split into spans that cannot; their sums are added in int32
            k = w.shape[1]
            span = k if 128 * max(l1) < FLOAT32_EXACT else ONEDNN_SPAN
            self._spans = [(a, min(a + span, k), _OnednnWeights(w[:, a : a + span].contiguous())) for a in range(0, k, span)]
        else:
            self._w = w.t().contiguous()

    def check(self, p: int) -> None:
        """Whether products mod p stay within int64 (`product_mod`'s Horner steps); else ValueError."""
        if p * DIGIT_BASE + self.digit_bound >= INT64_LIMIT:
            raise ValueError(f"p={p} is too large for this server's int8 digit products")

    def product_mod(self, x: torch.Tensor, p: int) -> torch.Tensor:
        """x (T, K) int64 in [0, p) -> x·W_q (T, N) int64 in [0, p), exactly.

        One product for as many rows as `PRODUCTS_BYTES` of products allow (`_int_mm` repacks the
        weights at each: a 128-row SmolLM2 chunk took 416 ms over 40 sites in one call each, 485 in
        4 MiB blocks), then the digits are combined a cache-sized block of rows at a time, in numpy: a decode
        row's dozen small integer ops cost ~2 µs each there against ~5 in torch, whose two threads also
        wait on each other when the TEE keeps a core busy (docs/benchmarks.md)."""
        self.check(p)
        # Each residue's representative in n balanced digits' range [-128·S, 127·S], which holds 256^n ≥ p values:
        # 4 digits for a 32-bit p, where [0, p) itself would take 5.
        n = -(-(p - 1).bit_length() // 8)
        top = 127 * (DIGIT_BASE**n - 1) // (DIGIT_BASE - 1)
        k, n_out = self.shape
        x_np = x.detach().cpu().numpy()
        x_np = np.where(x_np > top, x_np - p, x_np)
        out = np.empty((x_np.shape[0], n_out), dtype=np.int64)
        per_call = max(1, PRODUCTS_BYTES // (4 * n * self.m * max(n_out, 1)))
        for start in range(0, x_np.shape[0], per_call):
            rows = min(per_call, x_np.shape[0] - start)
            products = self._digit_products(x_np[start : start + rows], n).reshape(n, rows, self.m, n_out)
            for a, b in block_ranges(rows, n * self.m * n_out):
                _combine_digits(products[:, a:b], p, self.digit_bound, out[start + a : start + b])
        return torch.from_numpy(out).to(x.device)

    def _digit_products(self, x: np.ndarray, n: int) -> np.ndarray:
        """x (T, K) within n balanced digits' range -> its digits' products with W_q's, (n·T, m·N) int32."""
        rows = n * x.shape[0]
        if self.onednn:
            digits = torch.from_numpy(offset_digits(x, n).reshape(rows, self.shape[0]))
            products: np.ndarray | None = None
            for a, b, span in self._spans:
                part = _onednn_products(digits if len(self._spans) == 1 else digits[:, a:b].contiguous(), span).detach().to(torch.int32).numpy()
                products = part if products is None else np.add(products, part, out=products)
            assert products is not None
            return products
        digits = torch.from_numpy(balanced_digits(x, n).reshape(rows, self.shape[0])).to(self.device)
        return torch._int_mm(digits, self._w).detach().cpu().numpy()


def _combine_digits(products: np.ndarray, p: int, part_bound: int, out: np.ndarray) -> None:
    """(n, T, m, N) int32 products of x's digits (j) with W_q's (i) -> Σ_j Σ_i products_ji · 256^(i+j) mod p into out (T, N).

    W_q's digits are recombined first (|part| <= part_bound per digit of x), then x's by Horner's rule
    from the most significant, reducing only when the next step could leave int64 (int64 remainders
    are the costly step)."""
    n, _, m, _ = products.shape
    parts = products[:, :, m - 1].astype(np.int64)  # (n, T, N), our own: the steps below work in place
    for i in reversed(range(m - 1)):
        parts *= DIGIT_BASE
        parts += products[:, :, i]
    acc, bound = parts[n - 1], part_bound
    for j in reversed(range(n - 1)):
        if bound * DIGIT_BASE + part_bound >= INT64_LIMIT:
            np.remainder(acc, p, out=acc)
            bound = p
        acc *= DIGIT_BASE
        acc += parts[j]
        bound = bound * DIGIT_BASE + part_bound
    np.remainder(acc, p, out=out)


def float32_limb_bits(l1: int) -> int:
    """The widest limbs whose products with weights of max row L1 `l1` stay exact in float32 (0: none)."""
    return max((FLOAT32_EXACT - 1) // max(l1, 1), 0).bit_length() - 1


def _limbs(x: torch.Tensor, bits: int, p: int, dtype: torch.dtype) -> torch.Tensor:
    """x (T, K) int64 in [0, p) -> its `bits`-bit limbs stacked (n·T, K), least significant first.

    A few ops for any n, a block of rows at a time: a prefill chunk's int64 temporaries would be
    n times the chunk's size each."""
    shifts = torch.arange(0, p.bit_length(), bits, device=x.device)[:, None, None]
    out = torch.empty(shifts.shape[0], *x.shape, dtype=dtype, device=x.device)
    for start, end in block_ranges(x.shape[0], shifts.shape[0] * x.shape[-1]):
        out[:, start:end] = (x[None, start:end] >> shifts) & ((1 << bits) - 1)
    return out.view(-1, x.shape[-1])


def _horner(products: torch.Tensor, rows: int, p: int, bits: int) -> torch.Tensor:
    """Limb products (n·T, N), exact integers as floats -> Σ_j products_j · 2^(bits·j) mod p, (T, N) int64.

    Products below 2²⁴ (float32's) whose weighted sum stays below 2⁶³ are summed at once, with one
    reduction; wider ones (float64's) by Horner's rule, reducing after each limb."""
    parts = products.to(torch.int64).view(-1, rows, products.shape[-1])
    n = parts.shape[0]
    if products.dtype == torch.float32 and 24 + 1 + bits * (n - 1) < 63:
        scales = torch.tensor([1 << (bits * j) for j in range(n)], device=parts.device)[:, None, None]
        return torch.remainder((parts * scales).sum(0), p)
    parts = torch.remainder(parts, p)
    acc = parts[-1]
    for j in reversed(range(n - 1)):
        acc = torch.remainder(acc * (1 << bits) + parts[j], p)
    return acc


def block_ranges(n: int, width: int) -> list[tuple[int, int]]:
    """Ranges over n lines (rows or columns) of a float64 matrix `width` wide, each at most `BLOCK_BYTES` (at least one line)."""
    step = max(1, BLOCK_BYTES // (8 * max(width, 1)))
    return [(start, min(start + step, n)) for start in range(0, n, step)] or [(0, 0)]


def matmul_mod_2_64(w: torch.Tensor | DerivedIntegers, r: np.ndarray) -> np.ndarray:
    """w (K, N) integers (stored in any dtype, or derived) @ r (N, C) uint64 -> (K, C) uint64, exactly mod 2⁶⁴.

    int64 matrix products have no BLAS (far slower); instead r is split into limbs narrow
    enough that every float64 partial sum stays exact, and the limb products are shifted back
    and added in uint64, which wraps mod 2⁶⁴ by definition. w is read a block of columns at a
    time (rows of the model's matrix), each block with limbs as wide as its own sums allow.
    """
    c = r.shape[1]
    out = np.zeros((w.shape[0], c), dtype=np.uint64)
    for a, b in block_ranges(w.shape[1], w.shape[0]):
        block = columns(w, a, b)  # (K, b - a) float64
        l1 = int(block.abs().sum(dim=1).max()) if block.numel() else 0
        bits = min(16, 52 - l1.bit_length())
        if bits < 1:
            raise ShieldError(f"weights too large for exact checks (row L1 {l1})")
        n_limbs = -(-64 // bits)
        low = np.uint64((1 << bits) - 1)
        limbs = np.concatenate([(r[a:b] >> np.uint64(bits * j)) & low for j in range(n_limbs)], axis=1).astype(np.float64)  # (b - a, C·L)
        products = (block @ torch.from_numpy(limbs).to(block.device)).detach().cpu().numpy().astype(np.int64).view(np.uint64)  # (K, C·L)
        for j in range(n_limbs):
            out += products[:, j * c : (j + 1) * c] << np.uint64(bits * j)
    return out


def random_mod(shape: tuple[int, ...], p: int) -> torch.Tensor:
    """Elements uniform over Z_p from the OS's cryptographic generator (rejection sampling: no modulo bias).

    Each draw takes the bytes p's bits need (5 for a 33-40-bit p, not 8), and a round draws as many as its expected
    acceptance calls for: reading the OS's generator was a fifth of the TEE's mask making at 12 bytes a value."""
    count = int(np.prod(shape))
    bits = p.bit_length()
    width = -(-bits // 8)  # bytes a draw takes
    accepted = p / (1 << bits)  # the share of draws below p: above a half
    out = np.empty(0, dtype=np.uint64)
    while out.size < count:
        draws = int((count - out.size) / accepted * 1.01) + 16
        raw = np.zeros((draws, 8), dtype=np.uint8)
        raw[:, :width] = np.frombuffer(os.urandom(width * draws), dtype=np.uint8).reshape(draws, width)
        values = raw.view("<u8").reshape(draws) >> np.uint64(8 * width - bits)  # the draw's top `bits` bits
        out = np.concatenate([out, values[values < np.uint64(p)]])
    return torch.from_numpy(out[:count].astype(np.int64)).reshape(shape)


def random_u64(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform 64-bit words (as int64: arithmetic on them is mod 2⁶⁴) from the OS's generator."""
    return torch.from_numpy(np.frombuffer(os.urandom(8 * int(np.prod(shape))), dtype=np.int64).copy()).reshape(shape)


def previous_prime(n: int) -> int:
    """The largest prime below n (n < 2⁶⁴), by deterministic Miller-Rabin."""
    candidate = n - 1 if n % 2 == 0 else n - 2
    while not _is_prime(candidate):
        candidate -= 2
    return candidate


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)  # deterministic for n < 3.3·10²⁴
    for q in small:
        if n % q == 0:
            return n == q
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True
