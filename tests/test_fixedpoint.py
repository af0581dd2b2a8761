"""tsqp.model.fixedpoint: per-row quantization, the prime field, exact products mod p and mod 2⁶⁴, uniform masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tsqp.errors import ShieldError
from tsqp.model import fixedpoint
from tsqp.model.config import ACTIVATION_BITS_RANGE, WEIGHT_BITS_RANGE

# --- the fixed-point algebra -------------------------------------------------------------


@pytest.mark.parametrize(("p_bits", "limb_bits", "k"), [(40, 20, 96), (33, 33, 456)], ids=["two-limbs", "one-limb"])
def test_product_mod_is_exact_for_extreme_inputs(p_bits: int, limb_bits: int, k: int) -> None:
    """Two 20-bit limbs, and one limb of all p's 33 bits, whose products with a column of 456 weights of 2047
    (SmolLM2's widest row L1, ~933k) reach 2^52.8: exact below float64's 2^53."""
    p, weight = fixedpoint.previous_prime(1 << p_bits), 2047
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-weight, weight + 1, (k, 40), generator=gen, dtype=torch.int64)
    w[:, 0] = weight  # a column of the widest weights: its product with p - 1 is the largest
    x = torch.randint(0, p, (5, k), generator=gen, dtype=torch.int64)
    x[0] = p - 1  # the largest masked values, where a float64 product without limbs would round
    fixedpoint.check_product_exact(fixedpoint.max_row_l1(w.double()), p, limb_bits)
    got = fixedpoint.product_mod(x, w.double(), p, limb_bits)
    expected = [[sum(int(a) * int(b) for a, b in zip(row, col)) % p for col in w.t().tolist()] for row in x.tolist()]
    assert got.tolist() == expected


@pytest.mark.parametrize("rows", [1, 2, 40], ids=lambda n: f"{n}-rows")
def test_float32_weights_give_the_exact_product_on_narrow_limbs_and_wide_ones(rows: int) -> None:
    """The server's float32 W_q: decode rows on float32 limbs, more rows on float64 ones; both exact at the extremes."""
    p, limb_bits = fixedpoint.previous_prime(1 << 40), 20
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-2047, 2048, (96, 40), generator=gen, dtype=torch.int64)
    w[:, 0] = 2047  # one column of the largest row L1: float32 partial sums reach their bound
    l1 = fixedpoint.max_row_l1(w.double())
    narrow = fixedpoint.float32_limb_bits(l1)
    assert l1 * ((1 << narrow) - 1) < 1 << 24 <= l1 * ((1 << (narrow + 1)) - 1)  # the widest exact limbs
    x = torch.randint(0, p, (rows, 96), generator=gen, dtype=torch.int64)
    x[0] = p - 1
    narrow_path = rows * -(-p.bit_length() // narrow) <= fixedpoint.FLOAT32_LIMB_ROWS
    assert narrow_path == (rows < 40)
    got = fixedpoint.product_mod(x, w.float(), p, limb_bits, l1)
    expected = [[sum(int(a) * int(b) for a, b in zip(row, col)) % p for col in w.t().tolist()] for row in x.tolist()]
    assert got.tolist() == expected


def _exact(x: torch.Tensor, w: torch.Tensor, p: int) -> list[list[int]]:
    """x·w mod p in Python integers: no float, no int64, nothing that could round or wrap."""
    return [[sum(int(a) * int(b) for a, b in zip(row, col)) % p for col in w.t().tolist()] for row in x.tolist()]


BALANCED_TOP = [127 * (256**n - 1) // 255 for n in range(1, 9)]  # the largest integer n balanced digits hold


@pytest.mark.parametrize("value", [0, 1, -1, 127, -128, 128, -129, 255, 32767, -32767, (1 << 40) - 1, *BALANCED_TOP, *(-t - 1 for t in BALANCED_TOP[:-1])])
def test_balanced_digits_rebuild_the_integer(value: int) -> None:
    n = fixedpoint.digits_for(abs(value))
    digits = fixedpoint.balanced_digits(np.array([value, -value - 1 if value > 0 else 0]), n)
    assert digits.dtype == np.int8 and digits.shape == (n, 2)
    assert sum(int(d) * 256**j for j, d in enumerate(digits[:, 0])) == value
    assert sum(int(d) * 256**j for j, d in enumerate(digits[:, 1])) == (-value - 1 if value > 0 else 0)
    strided = fixedpoint.balanced_digits(np.array([[value, 0], [7, 7]]).T, n)  # a transposed view: the column holding value
    assert np.array_equal(strided[:, 0], np.stack([digits[:, 0], fixedpoint.balanced_digits(np.array([7]), n)[:, 0]], axis=1))
    assert n == 1 or 127 * (256 ** (n - 1) - 1) // 255 < abs(value)  # the fewest digits that hold it


@pytest.mark.parametrize("kernel", ["onednn", "int_mm"])
@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("rows", [1, 3, 70], ids=lambda n: f"{n}-rows")
@pytest.mark.parametrize(("p", "n"), [(fixedpoint.previous_prime(1 << 40), 5), (fixedpoint.previous_prime(1 << 32), 4)], ids=["40-bit", "32-bit"])
def test_int8_digit_products_are_exact_at_the_extremes(kernel: str, bits: int, rows: int, p: int, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's int8 W_q: weights at ±top, masked inputs at p - 1, 0 and either side of where n digits' range turns
    negative, rows in several products and blocks; the exact product mod p as Python's integers compute it (16-bit
    weights take three digits, 12-bit two; a p below 256^n takes n digits a value). oneDNN's products where this CPU
    passes its probe, `_int_mm`'s otherwise and when told so."""
    if kernel == "int_mm":
        monkeypatch.setattr(fixedpoint, "onednn_exact", lambda: False)
    top = (1 << (bits - 1)) - 1
    gen = torch.Generator().manual_seed(6)
    w = torch.randint(-top, top + 1, (37, 96), generator=gen, dtype=torch.int64)  # (N, K): odd sizes
    w[0], w[1, :48], w[1, 48:] = top, -top, top  # rows of the largest L1, both signs
    x = torch.randint(0, p, (rows, 96), generator=gen, dtype=torch.int64)
    x[0] = p - 1
    x[-1, :10] = 0
    highest = 127 * (256**n - 1) // 255  # the largest value n balanced digits hold
    x[-1, 10:20], x[-1, 20:30] = highest, highest + 1
    held = fixedpoint.Int8Digits(w.to(torch.int16))
    assert held.onednn == (kernel == "onednn" and fixedpoint.onednn_exact())
    monkeypatch.setattr(fixedpoint, "PRODUCTS_BYTES", 4 * n * held.m * 37 * 16)  # 16 rows a product: 70 rows in 5 calls
    monkeypatch.setattr(fixedpoint, "BLOCK_BYTES", 8 * n * held.m * 37 * 5)  # combined 5 rows at a time
    counts = []
    name = "offset_digits" if held.onednn else "balanced_digits"  # x's digits as each kernel takes them
    digits = getattr(fixedpoint, name)
    monkeypatch.setattr(fixedpoint, name, lambda values, count: counts.append(count) or digits(values, count))
    assert held.m == (3 if bits == 16 else 2) and held.shape == (96, 37) and held.nbytes == held.m * w.numel()
    assert fixedpoint.product_mod(x, held, p, 20).tolist() == _exact(x, w.t(), p)
    assert set(counts) == {n} and len(counts) == -(-rows // 16)


@pytest.mark.parametrize("span", [fixedpoint.ONEDNN_SPAN, 300])
def test_int8_digits_split_rows_whose_float32_products_could_round(span: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's products come back in float32: rows whose digit L1 times 128 reaches 2²⁴ (1100 weights of 128, low
    digit -128: 128 · 140800 > 2²⁴) are split into spans no wider than `ONEDNN_SPAN` (here also 300: four, the
    last short), their int32 sums added, and stay exact at every digit's extreme."""
    monkeypatch.setattr(fixedpoint, "ONEDNN_SPAN", span)
    w = torch.full((3, 1100), 128, dtype=torch.int16)
    w[1] = -2047
    held = fixedpoint.Int8Digits(w)
    assert held.onednn == fixedpoint.onednn_exact()
    if held.onednn:
        assert [(a, b) for a, b, _ in held._spans] == [(a, min(a + span, 1100)) for a in range(0, 1100, span)]
    p = fixedpoint.previous_prime(1 << 32)
    top = 127 * (256**4 - 1) // 255
    x = torch.stack([torch.full((1100,), top), torch.full((1100,), top + 1), torch.randint(0, p, (1100,))])  # digits all 127, all -128, any
    assert fixedpoint.product_mod(x, held, p, 20).tolist() == _exact(x, w.t().to(torch.int64), p)


def test_int8_digits_take_one_span_where_float32_products_stay_exact() -> None:
    held = fixedpoint.Int8Digits(torch.randint(-2047, 2048, (5, 576), dtype=torch.int16))
    assert not held.onednn or len(held._spans) == 1


def test_onednn_probe_catches_kernels_that_saturate_or_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ways a u8·s8 kernel goes wrong, each of which the probe must see: x86 without VNNI sums byte pairs in int16
    (saturating at 32767); a kernel that takes the zero point's share off in float32, after the uint8 sum (past 2²⁴)
    was rounded. An exact kernel passes the same probe."""

    def exact(x: torch.Tensor, w: Held) -> torch.Tensor:
        return ((x.to(torch.int64) - 128) @ w.int8.to(torch.int64).t()).to(torch.float32)

    def saturating(x: torch.Tensor, w: Held) -> torch.Tensor:
        pairs = (x.to(torch.int64)[None] * w.int8.to(torch.int64)[:, None]).reshape(w.int8.shape[0], x.shape[0], -1, 2).sum(-1)
        sums = pairs.clamp(-32768, 32767).sum(-1).t() - 128 * w.int8.to(torch.int64).sum(1)
        return sums.to(torch.float32)

    def rounding(x: torch.Tensor, w: Held) -> torch.Tensor:
        unsigned = (x.to(torch.int64) @ w.int8.to(torch.int64).t()).to(torch.float32)
        return unsigned - (128 * w.int8.to(torch.int64).sum(1)).to(torch.float32)

    class Held:
        def __init__(self, w: torch.Tensor) -> None:
            self.int8 = w

    monkeypatch.setattr(fixedpoint, "_OnednnWeights", Held)
    for kernel, passes in ((saturating, False), (rounding, False), (exact, True)):
        monkeypatch.setattr(fixedpoint, "_onednn_products", kernel)
        assert fixedpoint.onednn_exact.__wrapped__() is passes, kernel.__name__


def test_int8_digits_refuse_a_field_their_int64_steps_cannot_hold() -> None:
    held = fixedpoint.Int8Digits(torch.full((4, 8), 2047, dtype=torch.int16))
    held.check(fixedpoint.previous_prime(1 << 50))
    with pytest.raises(ValueError, match="too large"):
        held.check(fixedpoint.previous_prime(1 << 55))


def test_derived_weights_give_the_stored_integers_and_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TEE's W_q, derived from float rows a few lines at a time across the parts of a fused group,
    holds exactly the integers, scales and products of the stored float64 W_q."""
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, 50, generator=gen) for n in (20, 17)]  # two modules of one call group, (N_i, K)
    monkeypatch.setattr(fixedpoint, "BLOCK_BYTES", 8 * 50 * 4)  # 4 lines a block: 10 blocks, one across the parts, the last one short
    derived = fixedpoint.DerivedIntegers(parts, 12)
    w, scale, l1 = fixedpoint.quantize_matrix(torch.cat(parts), 12, torch.float64)  # (N, K)
    assert derived.shape == (50, 37) and derived.l1 == l1 and torch.equal(derived.scale, scale)
    assert torch.equal(derived.dense(), w.t()) and torch.equal(derived.rows(18, 23), w[18:23])
    p, limb_bits = fixedpoint.previous_prime(1 << 40), 20
    x = torch.randint(0, p, (3, 50), generator=gen, dtype=torch.int64)
    r = fixedpoint.random_u64((37, 2)).numpy().view(np.uint64)
    assert torch.equal(fixedpoint.product_mod(x, derived, p, limb_bits), fixedpoint.product_mod(x, w.t(), p, limb_bits))
    assert np.array_equal(fixedpoint.matmul_mod_2_64(derived, r), fixedpoint.matmul_mod_2_64(w.t(), r))


def test_matmul_mod_2_64_in_column_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randint(-2047, 2048, (50, 37), generator=torch.Generator().manual_seed(5)).double()  # (K, N)
    r = fixedpoint.random_u64((37, 3)).numpy().view(np.uint64)
    whole = fixedpoint.matmul_mod_2_64(w, r)
    monkeypatch.setattr(fixedpoint, "BLOCK_BYTES", 8 * 50 * 4)
    assert np.array_equal(fixedpoint.matmul_mod_2_64(w, r), whole)


def test_quantize_matrix_equals_quantize_rows_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(41, 16, generator=torch.Generator().manual_seed(4))
    q, scale = fixedpoint.quantize_rows(w, 10)
    monkeypatch.setattr(fixedpoint, "BLOCK_BYTES", 8 * 16 * 5)  # 5 rows a block
    w_q, w_scale, l1 = fixedpoint.quantize_matrix(w, 10, torch.int16)
    assert torch.equal(w_q.double(), q) and torch.equal(w_scale, scale) and l1 == int(q.abs().sum(dim=1).max())


def test_field_holds_every_honest_result_and_refuses_what_cannot_be_exact() -> None:
    f = fixedpoint.choose_field(l1=933_541, weight_bits=12, activation_bits=16, narrow=False)  # SmolLM2's widest row at 12 bits
    assert f.p > 2 * f.bound and fixedpoint._is_prime(f.p) and not f.rows_limited
    assert f.limbs == 2 and 933_541 * ((1 << f.limb_bits) - 1) < 2**53 and (2 * f.p) << f.limb_bits < 2**63
    one = fixedpoint.choose_field(l1=933_541, weight_bits=12, activation_bits=13, narrow=False)  # p's 33 bits in one limb
    assert one.limbs == 1 and one.limb_bits == one.p.bit_length() == 33 and 933_541 * (one.p - 1) < 2**53
    fixedpoint.check_product_exact(933_541, one.p, one.limb_bits)  # no Horner step: its int64 bound does not apply
    with pytest.raises(ValueError, match="too wide"):  # a row wider by a sixth: the one limb's products would round
        fixedpoint.check_product_exact(1_100_000, one.p, one.limb_bits)
    with pytest.raises(ShieldError, match="cannot be exact"):
        fixedpoint.choose_field(l1=1 << 30, weight_bits=16, activation_bits=24)
    with pytest.raises(ValueError, match="too wide"):
        fixedpoint.check_product_exact(933_541, f.p, f.limb_bits + 8)


@pytest.mark.parametrize("p", [fixedpoint.previous_prime(1 << 36), fixedpoint.previous_prime(1 << 33), (1 << 20) + 7, fixedpoint.previous_prime(1 << 61)],
                         ids=["36-bit", "33-bit", "just-above-2^20", "61-bit"])  # fmt: skip
def test_masks_are_uniform_over_the_field(p: int) -> None:
    """Draws of 5 bytes (33-40-bit p), 3 (a p that rejects about half), 8 (61 bits): in range, and uniform by their mean,
    the share in the top half, and each bit below the top one."""
    r = fixedpoint.random_mod((200_000,), p)
    assert int(r.min()) >= 0 and int(r.max()) < p
    # Mean, top-half share and each bit's frequency of a uniform draw, within 6 standard errors.
    assert abs(float(r.double().mean()) / p - 0.5) < 6 * math.sqrt(1 / 12 / r.numel())
    high = float((r >= p // 2).double().mean())
    assert abs(high - 0.5) < 6 * math.sqrt(0.25 / r.numel())
    for bit in range(p.bit_length() - 1):
        assert abs(float(((r >> bit) & 1).double().mean()) - 0.5) < 6 * math.sqrt(0.25 / r.numel()), bit


def test_matmul_mod_2_64_equals_wrapping_integer_arithmetic() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-2047, 2048, (33, 700), generator=gen, dtype=torch.int64)
    r = fixedpoint.random_u64((700, 3)).numpy().view(np.uint64)
    expected = [[sum(int(a) * int(b) for a, b in zip(row, col)) % 2**64 for col in r.T.tolist()] for row in w.tolist()]
    assert fixedpoint.matmul_mod_2_64(w.double(), r).tolist() == expected


# --- quantize_rows -----------------------------------------------------------------------------


def test_quantize_rows_scales_each_row_to_its_own_maximum() -> None:
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [1e-3, 3e-3, -1e-3]], dtype=torch.float32)
    before = x.clone()
    q, scale = fixedpoint.quantize_rows(x, bits=8)
    assert q.dtype == scale.dtype == torch.float64 and q.shape == (3, 3) and scale.shape == (3, 1)
    assert torch.equal(x, before)  # the caller's tensor is left alone
    assert torch.equal(q, q.round()) and int(q.abs().max()) <= 127
    assert q[0].tolist() == [32.0, -127.0, 64.0]  # the largest |x| of a row lands on ±(2^(bits-1) - 1)
    assert q[2].tolist() == [42.0, 127.0, -42.0]  # a row of small values uses the full range too
    assert q[1].tolist() == [0.0, 0.0, 0.0] and scale[1].item() == 1.0  # an all-zero row stays zero, no division by 0
    assert (q * scale - x.double()).abs().max() <= scale.max() / 2  # rounding: at most half a step off


def test_quantize_rows_keeps_leading_dimensions() -> None:
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    q, scale = fixedpoint.quantize_rows(x, bits=4)
    assert q.shape == (2, 5, 16) and scale.shape == (2, 5, 1)
    assert q.abs().amax(dim=-1).eq(7).all()  # every row reaches ±7 at 4 bits


# --- the prime field ---------------------------------------------------------------------------


def test_previous_prime_and_is_prime_against_known_values() -> None:
    sieve = [n for n in range(2, 2000) if all(n % d for d in range(2, int(n**0.5) + 1))]
    assert [n for n in range(2000) if fixedpoint._is_prime(n)] == sieve
    assert fixedpoint.previous_prime(100) == 97
    assert fixedpoint.previous_prime(97) == 89  # strictly below n
    assert fixedpoint.previous_prime(1 << 31) == (1 << 31) - 1  # Mersenne primes
    assert fixedpoint.previous_prime(1 << 61) == (1 << 61) - 1
    assert fixedpoint.previous_prime(1 << 64) == (1 << 64) - 59
    # Carmichael numbers and strong pseudoprimes to the first bases are composite
    for composite in (561, 41041, 2047, 3215031751, 3825123056546413051):
        assert not fixedpoint._is_prime(composite), composite


def test_a_worst_case_beyond_32_bits_takes_the_narrow_field_where_no_row_loses_more_than_4_bits() -> None:
    f = fixedpoint.choose_field(l1=933_541, weight_bits=12, activation_bits=16)  # SmolLM2's: a worst case of 2^34.8
    assert f.rows_limited and f.p.bit_length() == fixedpoint.NARROW_FIELD_BITS and f.bound == f.p // 2 and fixedpoint._is_prime(f.p)
    assert f.limbs == 1 and 933_541 * (f.p - 1) < 2**53  # the TEE's mask products: one float64 limb
    fixedpoint.check_product_exact(933_541, f.p, f.limb_bits)  # and the server accepts it
    assert f.p <= 256**4 < 127 * (256**5 - 1) // 255  # the server's int8 digits: 4 per value, where [0, p) would take 5
    wide = fixedpoint.choose_field(l1=933_541, weight_bits=12, activation_bits=18)  # 2^36.8: a row could lose 5.8 bits
    assert not wide.rows_limited and wide.bound == ((1 << 17) - 1) * 933_541


def test_widened_scales_bound_every_rows_products_and_leave_the_rows_within_alone() -> None:
    gen = torch.Generator().manual_seed(8)
    w_q, _ = fixedpoint.quantize_rows(torch.randn(40, 96, generator=gen), bits=12)  # (N, K)
    l2sq = fixedpoint.max_row_l2sq(w_q.t())
    x = torch.randn(300, 96, generator=gen).double()
    x[0] = torch.sign(w_q[0])  # aligned with a weight row: Cauchy–Schwarz nearly tight
    x[1] = 0.0
    x[1, 3] = 2.0  # a lone spike: far within any bound
    x[2] = 0.0  # all zero: stays zero
    top = (1 << 15) - 1
    bound = int(math.isqrt(top * top * 96 * l2sq)) // 2  # half of row 0's norm bound: it must be coarsened
    x_np = x.numpy()
    scale = np.abs(x_np).max(axis=1, keepdims=True) / top
    plain = scale.copy()
    widened = fixedpoint.widen_scales(x_np, scale, fixedpoint.norm_cap(l2sq, bound, 96))
    scale[scale == 0] = 1.0
    x_q = np.rint(x_np / scale).astype(np.int64)
    fixedpoint.check_rows_bounded(x_q, l2sq, bound)
    products = x_q @ w_q.t().to(torch.int64).numpy()
    assert (np.abs(products) <= bound).all()
    changed = (scale != np.where(plain == 0, 1.0, plain)).ravel()
    assert changed[0] and not changed[1] and not changed[2] and widened == int(changed.sum()) < 300
    assert np.abs(products[0]).max() > bound // 2  # no coarser than it had to be (the row nearly meets W_q's row 0)
    with pytest.raises(ShieldError, match="out of bounds"):
        fixedpoint.check_rows_bounded(x_q * 2, l2sq, bound)  # the exact check catches a row past the bound


@pytest.mark.parametrize(("weight_bits", "activation_bits"), [(2, 2), (8, 8), (12, 16), (4, 24)])
def test_choose_field_is_the_smallest_field_that_fits(weight_bits: int, activation_bits: int) -> None:
    l1 = 5_000
    f = fixedpoint.choose_field(l1, weight_bits, activation_bits)
    assert f.bound == ((1 << (activation_bits - 1)) - 1) * l1
    assert 2 * f.bound < f.p < 1 << ((2 * f.bound + 1).bit_length() + 1)  # holds ±bound, and not a bit wider than it must
    assert fixedpoint._is_prime(f.p)
    fixedpoint.check_product_exact(l1, f.p, f.limb_bits)  # the server accepts what the TEE chose
    assert f.limbs == -(-f.p.bit_length() // f.limb_bits) <= fixedpoint.MAX_LIMBS
    assert f.as_args() == {"p": f.p, "limb_bits": f.limb_bits, "weight_bits": weight_bits}  # no activation width, no bound


def test_choose_field_refuses_widths_out_of_range() -> None:
    (w_low, w_high), (a_low, a_high) = WEIGHT_BITS_RANGE, ACTIVATION_BITS_RANGE
    for weight_bits, activation_bits in ((w_low - 1, 8), (w_high + 1, 8), (8, a_low - 1), (8, a_high + 1)):
        with pytest.raises(ShieldError, match="out of range"):
            fixedpoint.choose_field(100, weight_bits, activation_bits)


@pytest.mark.parametrize(
    ("l1", "p", "limb_bits", "message"),
    [
        (10, 2, 8, "out of range"),
        (10, 1 << 63, 8, "out of range"),
        (10, 1_000_003, 0, "out of range"),
        (10, 1_000_003, 53, "out of range"),
        (1 << 40, 1_000_003, 14, "too wide"),  # float64 partial sums would pass 2^53
        (1, fixedpoint.previous_prime(1 << 40), 8, "more than 4 limbs"),
    ],
)
def test_check_product_exact_refuses_unsafe_parameters(l1: int, p: int, limb_bits: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fixedpoint.check_product_exact(l1, p, limb_bits)


def test_masked_product_unmasks_to_the_exact_integer_product() -> None:
    """The otp round trip of the module docstring: (X_q + R)·W_qᵀ - R·W_qᵀ mod p, lifted, is X_q·W_qᵀ."""
    gen = torch.Generator().manual_seed(5)
    w_q, _ = fixedpoint.quantize_rows(torch.randn(24, 48, generator=gen), bits=12)  # (N, K)
    w_q_t = w_q.t()  # (K, N), as the server keeps it
    x_q, _ = fixedpoint.quantize_rows(torch.randn(6, 48, generator=gen), bits=16)
    f = fixedpoint.choose_field(fixedpoint.max_row_l1(w_q_t), weight_bits=12, activation_bits=16)
    x_int = x_q.to(torch.int64)
    r = fixedpoint.random_mod(tuple(x_int.shape), f.p)
    wire = torch.remainder(x_int + r, f.p)
    z = fixedpoint.product_mod(wire, w_q_t, f.p, f.limb_bits)
    y = torch.remainder(z - fixedpoint.product_mod(r, w_q_t, f.p, f.limb_bits), f.p)
    y = torch.where(y > f.p // 2, y - f.p, y)  # the centred representative
    assert torch.equal(y, x_int @ w_q_t.to(torch.int64))


def test_matmul_mod_2_64_refuses_weights_too_large_to_stay_exact() -> None:
    w = torch.full((2, 4), float(1 << 50), dtype=torch.float64)  # row L1 2^52
    with pytest.raises(ShieldError, match="too large"):
        fixedpoint.matmul_mod_2_64(w, np.zeros((4, 1), dtype=np.uint64))


def test_random_words_have_the_asked_shape_and_differ() -> None:
    a, b = fixedpoint.random_u64((3, 5)), fixedpoint.random_u64((3, 5))
    assert a.shape == (3, 5) and a.dtype == torch.int64
    assert not torch.equal(a, b)  # 960 random bits twice alike: never
    r = fixedpoint.random_mod((4, 2), 13)
    assert r.shape == (4, 2) and r.dtype == torch.int64 and 0 <= int(r.min()) and int(r.max()) < 13
