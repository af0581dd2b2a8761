"""tsqp.model.linear: fused call groups, the products the server serves, and their integer (otp) twins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model

from tsqp.errors import ProtocolError
from tsqp.model import fixedpoint, linear
from tsqp.model.linear import CALL_GROUPS, FORWARD_ORDER, FUSED_GROUPS, MODULES, LinearWeights, QuantizedWeights, fused_groups, product_sites
from tsqp.model.loading import LoadedModel

SIZES = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 160, "up_proj": 160, "down_proj": 64}  # the tiny model's
IN_FEATURES = {"q_proj": 64, "o_proj": 64, "gate_proj": 64, "down_proj": 160}


@pytest.fixture(scope="module")
def weights(tiny: LoadedModel) -> LinearWeights:
    return LinearWeights(tiny.weights, tiny.config.n_layers)


def x_for(group: tuple[str, ...], rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, IN_FEATURES[group[0]], generator=torch.Generator().manual_seed(seed))


# --- call groups -------------------------------------------------------------------------------


def test_call_groups_cover_every_module_once() -> None:
    assert sorted(m for g in CALL_GROUPS for m in g) == sorted(MODULES)
    assert set(FUSED_GROUPS) <= set(CALL_GROUPS)


def test_next_site_follows_a_forward_pass(weights: LinearWeights) -> None:
    order = [(layer, group) for layer in range(3) for group in FORWARD_ORDER]
    assert weights.next_site("embed") == weights.next_site("lm_head") == order[0]
    assert [weights.next_site(site) for site in order] == [*order[1:], None]  # the lm_head follows the last layer


def test_warm_reads_a_matrix_a_block_at_a_time_and_changes_nothing(tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear, "WARM_BLOCK_BYTES", 6400)  # 5 rows of the tiny gate|up's W_t (64, 320)
    weights = LinearWeights(tiny.weights, tiny.config.n_layers)
    key = (1, ("gate_proj", "up_proj"))
    before = weights.group_product(key, x_for(key[1])).clone()
    assert sum(1 for _ in weights.warm(key)) == 13  # 64 rows of 320 floats, 5 rows (6400 bytes) a block
    assert torch.equal(weights.group_product(key, x_for(key[1])), before)
    assert list(LinearWeights(tiny.weights, tiny.config.n_layers, dtype=torch.bfloat16).warm(key)) == []  # not numpy's: nothing to read
    monkeypatch.setattr(linear, "WARM_MAX_BYTES", 64 * 320 * 4 - 1)
    assert list(weights.warm(key)) == []  # larger than a cache holds


def test_fused_groups_concatenate_transposed_weights(tiny: LoadedModel) -> None:
    groups = list(fused_groups(tiny.weights, tiny.config.n_layers))
    assert [key for key, _, _ in groups] == [(layer, g) for layer in range(3) for g in CALL_GROUPS]
    for (layer, group), w_t, sizes in groups:
        assert sizes == [SIZES[m] for m in group]
        assert w_t.shape == (IN_FEATURES[group[0]], sum(sizes))
        for m, block in zip(group, w_t.split(sizes, dim=1)):
            assert torch.equal(block, tiny.weights[f"layers.{layer}.{m}"].t())


def test_product_sites_end_with_the_lm_head(tiny: LoadedModel) -> None:
    sites = list(product_sites(tiny.weights, tiny.config.n_layers))
    assert len(sites) == 3 * len(CALL_GROUPS) + 1
    key, w_t, sizes = sites[-1]
    assert key == "lm_head" and sizes == [320] and torch.equal(w_t, tiny.weights["lm_head"].t())


# --- LinearWeights -----------------------------------------------------------------------------


@pytest.mark.parametrize("group", CALL_GROUPS, ids="+".join)
def test_linear_gives_each_module_of_a_group_its_product(weights: LinearWeights, tiny: LoadedModel, group: tuple[str, ...]) -> None:
    x = x_for(group, rows=5, seed=len(group))
    ys = weights.linear(2, list(group), x)
    assert len(ys) == len(group)
    for m, y in zip(group, ys):
        assert y.shape == (5, SIZES[m])
        torch.testing.assert_close(y, x @ tiny.weights[f"layers.2.{m}"].T, rtol=1e-5, atol=1e-5)
    assert weights.out_features(weights.check_linear(2, group)) == sum(SIZES[m] for m in group)


def test_linear_keeps_leading_dimensions(weights: LinearWeights, tiny: LoadedModel) -> None:
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1))
    q, k, v = weights.linear(0, ["q_proj", "k_proj", "v_proj"], x)
    assert (q.shape, k.shape, v.shape) == ((2, 4, 64), (2, 4, 32), (2, 4, 32))
    torch.testing.assert_close(v, x @ tiny.weights["layers.0.v_proj"].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 64), (64,), (1, 1, 64)], ids=str)
def test_one_row_numpy_path_equals_the_torch_product(weights: LinearWeights, tiny: LoadedModel, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    (y,) = weights.linear(1, ["o_proj"], x)
    assert y.shape == (*shape[:-1], 64) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ tiny.weights["layers.1.o_proj"].T, rtol=1e-5, atol=1e-5)
    y_lm = weights.lm_head(x)
    torch.testing.assert_close(y_lm, x @ tiny.weights["lm_head"].T, rtol=1e-5, atol=1e-5)


def test_inputs_of_another_dtype_are_computed_in_the_weights_dtype(weights: LinearWeights, tiny: LoadedModel) -> None:
    x = torch.randn(1, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (y,) = weights.linear(0, ["o_proj"], x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (x @ tiny.weights["layers.0.o_proj"].double().T).float(), rtol=1e-5, atol=1e-5)


def test_bfloat16_weights(tiny: LoadedModel) -> None:
    bf16 = LinearWeights(tiny.weights, tiny.config.n_layers, dtype=torch.bfloat16)
    assert bf16.embedding.dtype == bf16.lm_head_t.dtype == torch.bfloat16
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    (y,) = bf16.linear(0, ["o_proj"], x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x @ tiny.weights["layers.0.o_proj"].T, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    ("layer", "modules", "message"),
    [
        (3, ["o_proj"], "out of range 0..2"),
        (-1, ["o_proj"], "out of range"),
        (True, ["o_proj"], "out of range"),  # a bool is not layer 1
        ("0", ["o_proj"], "out of range"),
        (None, ["o_proj"], "out of range"),
        (0, ["q_proj", "k_proj", "w_proj"], "unknown module 'w_proj'"),
        (0, ["q_proj", "o_proj"], "not one call group"),
        (0, ["k_proj", "q_proj", "v_proj"], "not one call group"),
        (0, ["gate_proj"], "not one call group"),
        (0, [], "not one call group"),
    ],
)
def test_check_linear_refuses_what_is_not_a_call_group(weights: LinearWeights, layer: object, modules: list[str], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        weights.check_linear(layer, modules)  # type: ignore[arg-type]


def test_check_linear_returns_the_group_key(weights: LinearWeights) -> None:
    assert weights.check_linear(1, ["gate_proj", "up_proj"]) == (1, ("gate_proj", "up_proj"))
    assert weights.check_linear(0, ("down_proj",)) == (0, ("down_proj",))


def test_wrong_feature_sizes_are_refused(weights: LinearWeights) -> None:
    with pytest.raises(ProtocolError, match="input has 64 features, down_proj of layer 0 expects 160"):
        weights.linear(0, ["down_proj"], torch.ones(2, 64))
    with pytest.raises(ProtocolError, match="lm_head input has 63 features, expects 64"):
        weights.lm_head(torch.ones(2, 63))


def test_embed_returns_rows_and_refuses_ids_out_of_range(weights: LinearWeights, tiny: LoadedModel) -> None:
    ids = torch.tensor([[0, 319], [5, 5]])
    assert torch.equal(weights.embed(ids), tiny.weights["embed"][ids])
    assert weights.embed(torch.zeros(0, dtype=torch.int64)).shape == (0, 64)  # nothing to look up is fine
    for bad in ([320], [-1], [3, 400]):
        with pytest.raises(ProtocolError, match="token id out of range 0..319"):
            weights.embed(torch.tensor(bad))


def test_lm_head_product(weights: LinearWeights, tiny: LoadedModel) -> None:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    y = weights.lm_head(x)
    assert y.shape == (3, 320)
    torch.testing.assert_close(y, x @ tiny.weights["lm_head"].T, rtol=1e-5, atol=1e-5)


def test_matmul_composes_or_refuses() -> None:
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, 5, generator=g)
    assert torch.equal(LinearWeights.matmul(a, b), a @ b)
    for x, y in ((torch.ones(4), torch.ones(4, 2)), (torch.ones(2, 4), torch.ones(2)), (torch.ones(2, 4), torch.ones(3, 2))):
        with pytest.raises(ProtocolError, match="do not compose"):
            LinearWeights.matmul(x, y)


# --- QuantizedWeights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tiny: LoadedModel) -> QuantizedWeights:
    return QuantizedWeights(tiny.weights, tiny.config.n_layers, bits=10)


def test_quantized_weights_are_per_row_integers_close_to_the_weights(quantized: QuantizedWeights, tiny: LoadedModel) -> None:
    assert quantized.bits == 10
    assert set(quantized.groups) == {key for key, _, _ in product_sites(tiny.weights, tiny.config.n_layers)}
    for key, w_t, sizes in product_sites(tiny.weights, tiny.config.n_layers):
        w_q_t, scale, q_sizes = quantized.groups[key]
        assert q_sizes == sizes and w_q_t.dtype == torch.float64 and w_q_t.shape == w_t.shape and scale.shape == (1, w_t.shape[1])
        assert torch.equal(w_q_t, w_q_t.round()) and w_q_t.abs().amax(dim=0).eq(511).all()  # 10 bits: ±511, reached in each output row
        assert (w_q_t * scale - w_t.double()).abs().le(scale / 2 + 1e-12).all()
    assert quantized.l1 == max(fixedpoint.max_row_l1(w_q_t) for w_q_t, _, _ in quantized.groups.values())


@pytest.mark.parametrize("key", [(0, ("q_proj", "k_proj", "v_proj")), (2, ("down_proj",)), "lm_head"], ids=str)
def test_quantized_product_mod_is_the_exact_integer_product(quantized: QuantizedWeights, key: object) -> None:
    w_q_t, _, sizes = quantized.groups[key]  # type: ignore[index]
    field = fixedpoint.choose_field(quantized.l1, weight_bits=10, activation_bits=16)
    x = fixedpoint.random_mod((4, w_q_t.shape[0]), field.p)
    y = quantized.product_mod(key, x, field.p, field.limb_bits)  # type: ignore[arg-type]
    assert y.shape == (4, sum(sizes))  # the modules side by side
    exact = [[sum(a * b for a, b in zip(row, col)) % field.p for col in w_q_t.t().to(torch.int64).tolist()] for row in x.tolist()]
    assert y.tolist() == exact


def test_the_tees_derived_weights_hold_the_same_integers_and_store_none(quantized: QuantizedWeights, tiny: LoadedModel) -> None:
    derived = QuantizedWeights(tiny.weights, tiny.config.n_layers, bits=10, dtype=None)
    assert derived.l1 == quantized.l1 and derived.nbytes == 0 and quantized.nbytes > 0
    for key, (w_q_t, scale, sizes) in quantized.groups.items():
        d_w, d_scale, d_sizes = derived.groups[key]
        assert isinstance(d_w, fixedpoint.DerivedIntegers) and torch.equal(d_w.dense(), w_q_t) and torch.equal(d_scale, scale) and d_sizes == sizes


def test_quantized_product_refuses_wrong_feature_sizes(quantized: QuantizedWeights) -> None:
    with pytest.raises(ProtocolError, match="input has 64 features"):
        quantized.product_mod((0, ("down_proj",)), torch.zeros(2, 64, dtype=torch.int64), 1_000_003, 8)


def test_released_weight_pages_read_back_unchanged(tiny: LoadedModel) -> None:
    from tsqp.model.pages import FilePages

    before = {name: w.clone() for name, w in tiny.weights.items()}
    pages = FilePages()
    assert all(pages.holds(w) for w in tiny.weights.values())  # the weights are read-only file pages here
    assert all(pages.release(w) for w in tiny.weights.values())
    assert all(torch.equal(tiny.weights[name], w) for name, w in before.items())  # faulted in again from the file


def test_only_file_pages_are_ever_released(tiny: LoadedModel) -> None:
    """Dropping anonymous pages would zero them: a copy of the weights, or a strided view, is left alone."""
    from tsqp.model.pages import FilePages

    pages, w = FilePages(), tiny.weights["layers.0.q_proj"]
    copy = w.clone()
    assert not pages.holds(copy) and not pages.release(copy) and torch.equal(copy, w)
    assert not pages.holds(w.t()) and not pages.holds(torch.empty(0))


def test_the_tees_weights_stay_out_of_memory_after_the_masks_read_them(tmp_path: Path) -> None:
    """Every block a product reads is handed back: after products over every site of a 12 MB model, what
    stays resident of its weight file is at most the kernel's read-around of the last reads, not the weights."""
    from tsqp.model.loading import load
    from tsqp.model.pages import FilePages

    model = load(make_tiny_model(tmp_path, hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2), with_tokenizer=False)
    address = model.weights["layers.0.q_proj"].data_ptr()
    derived = QuantizedWeights(model.weights, model.config.n_layers, bits=10, dtype=None, pages=FilePages())
    field = fixedpoint.choose_field(derived.l1, weight_bits=10, activation_bits=16)
    for key, (w_q, _, _) in derived.groups.items():
        derived.product_mod(key, fixedpoint.random_mod((2, w_q.shape[0]), field.p), field.p, field.limb_bits)
    weight_bytes = sum(w.numel() * w.element_size() for w in model.weights.values())
    assert weight_bytes > 8 << 20 and _resident_bytes(address) < weight_bytes // 8
    without = QuantizedWeights(model.weights, model.config.n_layers, bits=10, dtype=None)  # no pages to hand back: all of it stays
    assert _resident_bytes(address) > weight_bytes * 3 // 4 and without.l1 == derived.l1


def _resident_bytes(address: int) -> int:
    """Resident bytes of the mapping that holds `address` (/proc/self/smaps)."""
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            current = start <= address < end
        elif current and fields[:1] == ["Rss:"]:
            return int(fields[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("threads_win", [True, False])
def test_large_one_row_products_take_the_way_measured_faster(tiny: LoadedModel, threads_win: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """All in the TEE, a one-row product of a large matrix goes to torch's threads only where they were measured
    faster, once per process; small ones, and every one of a process sharing its cores, stay on numpy's thread."""
    from tsqp.model import linear

    probes: list[torch.Tensor] = []
    monkeypatch.setattr(linear, "NUMPY_MAX_WEIGHTS", 64 * 64)  # the tiny model's lm_head and gate|up count as large
    monkeypatch.setattr(linear, "threads_win_one_row", lambda w_t: probes.append(w_t) or threads_win)
    weights = LinearWeights(tiny.weights, tiny.config.n_layers)
    large = weights.lm_head_t
    small = next(w for _, w, _ in weights.sites() if w.numel() <= 64 * 64)
    assert weights._one_row_on_numpy(small) and not probes  # small: no measurement needed
    assert [weights._one_row_on_numpy(large) for _ in range(3)] == [not threads_win] * 3
    assert len(probes) == 1 and probes[0] is large  # measured once, on the largest matrix
    sharing = LinearWeights(tiny.weights, tiny.config.n_layers, shares_cores=True)
    assert sharing._one_row_on_numpy(large) and len(probes) == 1
    row = torch.randn(1, large.shape[0])
    assert torch.allclose(weights.lm_head(row), row @ large, atol=1e-5)  # either way, the product


@pytest.mark.parametrize("site", ["lm_head", "gate_proj|up_proj"])
def test_a_staged_product_gives_the_generic_bits_from_buffers_made_once(tiny: LoadedModel, site: str) -> None:
    """Weights in another dtype than a CPU's float32 (here bfloat16; a GPU's the same way, with pinned host copies): the
    fast lane's product writes the generic path's bits (group_product, cast back to float32) into the reply, call after
    call, from the buffers it made at the start."""
    import numpy as np

    weights = LinearWeights(tiny.weights, tiny.config.n_layers, dtype=torch.bfloat16)
    key = "lm_head" if site == "lm_head" else weights.check_linear(0, site.split("|"))
    staged = weights.staged_product(key, 3)
    buffers = (staged.x_dev.data_ptr(), staged.y_dev.data_ptr())
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        x = torch.randn(3, tiny.config.hidden_size, generator=gen)
        out = np.full((3, staged.y_dev.shape[1]), np.nan, dtype=np.float32)
        staged(x.numpy(), out)
        generic = weights.lm_head(x) if key == "lm_head" else weights.group_product(key, x)
        assert torch.equal(torch.from_numpy(out), generic.to(torch.float32))
    assert (staged.x_dev.data_ptr(), staged.y_dev.data_ptr()) == buffers and staged.x_host is None  # no pinned copies on a CPU
