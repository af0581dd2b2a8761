"""Shields on a tiny random model: exact otp algebra, verification that catches faults, masks used once,
and traffic that says nothing about the activations."""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import RunningServer, make_tiny_model, shielded_session, start_server

from tsqp.errors import IntegrityError, ShieldError
from tsqp.model import fixedpoint
from tsqp.model.linear import LinearWeights, QuantizedWeights
from tsqp.model.loading import LoadedModel, load
from tsqp.server import handlers
from tsqp.server.recording import read_recording
from tsqp.shields import otp
from tsqp.shields.backend import ShieldedBackend, describe
from tsqp.shields.config import SHIELDS, WEIGHT_BITS, ShieldConfig
from tsqp.shields.freivalds import FloatFreivalds
from tsqp.shields.otp import OtpShield
from tsqp.shields.plain_exact import ExactPlainShield
from tsqp.shields.sites import site_weights
from tsqp.tee.generation import generate
from tsqp.tee.llama import Llama
from tsqp.tee.session import Session, shielded
from tsqp.wire.client import RemoteBackend

PROMPT = list(range(5, 29))


@pytest.fixture(scope="module")
def server(tiny: LoadedModel) -> Iterator[RunningServer]:
    running = start_server(tiny)
    yield running
    running.close()


def local_tokens(model: LoadedModel, prompt: list[int], n: int) -> list[int]:
    llama = Llama(model.config, model.hf_config, model.norms(), LinearWeights(model.weights, model.config.n_layers))
    return generate(llama, prompt, n).token_ids


# --- otp ----------------------------------------------------------------------------------------


def test_otp_unmasks_to_the_exact_integer_product(tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, "otp", verify=True)
    backend = session.backend
    assert isinstance(backend, ShieldedBackend) and isinstance(backend.shield, OtpShield)
    shield = backend.shield
    site = (1, ("gate_proj", "up_proj"))
    x = torch.randn(7, tiny.config.hidden_size)
    wire, state = shield.mask(site, x)
    z = torch.cat(backend.remote.call("LINEAR", {"layer": 1, "modules": list(site[1]), **shield.wire_args()}, [wire]).tensors, dim=-1)
    shield.verify(site, wire, z, state)
    w_q = shield.quantized.groups[site][0].dense().to(torch.int64)  # (K, N)
    assert torch.equal(torch.from_numpy(state.y), torch.from_numpy(state.x_q) @ w_q)  # X_q·W_qᵀ exactly, not approximately
    assert not torch.equal(wire, torch.from_numpy(state.x_q))  # what travelled was masked
    y = shield.unmask(site, z, state)
    exact = x @ torch.cat([tiny.weights[f"layers.1.{m}"] for m in site[1]]).t()
    assert (y - exact).abs().max() < 1e-2 * exact.abs().max()  # fixed point: close to the float product
    session.close()


def narrowing_activation_bits(model: LoadedModel) -> int:
    """The fewest activation bits whose worst case needs a field wider than the narrow one, which `choose_field` then takes."""
    l1 = QuantizedWeights(model.weights, model.config.n_layers, WEIGHT_BITS).l1
    return next(a for a in range(2, 25) if fixedpoint.choose_field(l1, WEIGHT_BITS, a).rows_limited)


def test_otp_in_a_narrow_field_bounds_each_row_and_stays_exact(tiny: LoadedModel, server: RunningServer) -> None:
    """Where the worst case needs more than 32 bits, p has 32 and each row is bounded by Cauchy–Schwarz: a row of
    equal magnitudes (the largest norm there is) is quantized more coarsely, the others are not, and every product
    unmasks exactly, within the bound, and verified."""
    bits = narrowing_activation_bits(tiny)
    session = shielded_session(tiny, server.endpoint, "otp", verify=True, activation_bits=bits)
    backend = session.backend
    assert isinstance(backend, ShieldedBackend) and isinstance(backend.shield, OtpShield)
    shield = backend.shield
    assert shield.field.rows_limited and shield.field.p.bit_length() == fixedpoint.NARROW_FIELD_BITS and shield.field.limbs == 1
    site = (1, ("gate_proj", "up_proj"))
    assert shield.pool is not None and shield.pool.row_bytes[site] == 4 * sum(shield.sites[site][0].shape)  # residues in 4 bytes
    x = torch.randn(6, tiny.config.hidden_size, generator=torch.Generator().manual_seed(3))
    x[0] = torch.where(x[0] < 0, -1.0, 1.0)  # every element at the row's max: ‖x_q‖₂ = top·√K
    x[1] = 0.0
    x[1, 0] = 1.0  # one element: ‖x_q‖₂ = top, far within
    wire, state = shield.mask(site, x)
    z = torch.cat(backend.remote.call("LINEAR", {"layer": 1, "modules": list(site[1]), **shield.wire_args()}, [wire]).tensors, dim=-1)
    shield.verify(site, wire, z, state)
    w_q = shield.quantized.groups[site][0].dense().to(torch.int64)  # (K, N)
    assert torch.equal(torch.from_numpy(state.y), torch.from_numpy(state.x_q) @ w_q)
    assert np.abs(state.y).max() <= shield.field.bound
    top = (1 << (bits - 1)) - 1
    assert np.abs(state.x_q[0]).max() < top and np.abs(state.x_q[1]).max() == top  # the first coarsened, the second not
    assert shield.rows_coarsened >= 1 and describe(shield)["rows_coarsened"] == shield.rows_coarsened
    y = shield.unmask(site, z, state)
    exact = x @ torch.cat([tiny.weights[f"layers.1.{m}"] for m in site[1]]).t()
    assert (y - exact).abs().max() < 1e-2 * exact.abs().max()  # still close to the float product
    assert generate(session.llama, PROMPT, 16).token_ids == local_tokens(tiny, PROMPT, 16)
    session.close()


def test_otp_reads_a_reply_outside_the_field_as_its_residues(tiny: LoadedModel, server: RunningServer) -> None:
    """A reply of the honest residues plus multiples of p (below 0, beyond p) is the same numbers mod p: it unmasks
    and verifies to the honest result. One residue off by one is caught."""
    session = shielded_session(tiny, server.endpoint, "otp", verify=True)
    shield = session.backend.shield
    site = (0, ("o_proj",))
    wire, state = shield.mask(site, torch.randn(3, tiny.config.hidden_size))
    z = session.backend.remote.call("LINEAR", {"layer": 0, "modules": ["o_proj"], **shield.wire_args()}, [wire]).tensors[0]
    p = shield.field.p
    shifts = torch.tensor([-3 * p, 0, p, 5 * p]).repeat(z.numel())[: z.numel()].reshape(z.shape)
    honest, shifted = shield.unmask(site, z, copy.deepcopy(state)), copy.deepcopy(state)
    assert torch.equal(shield.unmask(site, z + shifts, shifted), honest)
    shield.verify(site, wire, z + shifts, shifted)
    off = z.clone()
    off[0, 0] += 1
    lied = copy.deepcopy(state)
    shield.unmask(site, off, lied)
    with pytest.raises(IntegrityError, match="layer 0 o_proj"):
        shield.verify(site, wire, off, lied)
    session.close()


@pytest.mark.parametrize("site", [(1, ("q_proj", "k_proj", "v_proj")), (1, ("gate_proj", "up_proj"))], ids=str)
def test_otp_checks_a_fused_call_whole_and_names_the_module_a_lie_is_in(site: tuple[int, tuple[str, ...]], tiny: LoadedModel, server: RunningServer) -> None:
    """One check covers the fused call; a lie in any module's outputs (its first or its last) fails it, named."""
    session = shielded_session(tiny, server.endpoint, "otp", verify=True)
    shield = session.backend.shield
    sizes = shield.sites[site][1]
    for module, start, end in zip(site[1], itertools.accumulate([0, *sizes]), itertools.accumulate(sizes), strict=False):
        for column in (start, end - 1):
            wire, state = shield.mask(site, torch.randn(4, tiny.config.hidden_size))
            z = session.backend.remote.call("LINEAR", {"layer": 1, "modules": list(site[1]), **shield.wire_args()}, [wire]).tensors[0]
            honest = copy.deepcopy(state)
            shield.unmask(site, z, honest)
            shield.verify(site, wire, z, honest)
            z[2, column] += 1
            shield.unmask(site, z, state)
            with pytest.raises(IntegrityError, match=f"layer 1 {module} "):
                shield.verify(site, wire, z, state)
    session.close()


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.float32], ids=str)
def test_otp_is_exact_whichever_way_the_server_holds_its_integers(tiny: LoadedModel, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server holds W_q as int8 digits on a CPU; on a GPU in float64 where memory allows, else in float32
    (decode rows on narrow float32 limbs, prefill chunks widened to float64); every way, every result is the
    exact product: tokens equal `local`'s."""
    monkeypatch.setattr(handlers, "quantized_dtype", lambda n_weights, device: dtype)
    running = start_server(tiny)
    try:
        session = shielded_session(tiny, running.endpoint, "otp", verify=True)
        assert generate(session.llama, PROMPT, 6).token_ids == local_tokens(tiny, PROMPT, 6)
        session.close()
        held = running.server.handlers.quantized
        assert held is not None and held.groups["lm_head"][0].dtype == dtype
    finally:
        running.close()


# --- every shield generates the reference answer --------------------------------------------


@pytest.mark.parametrize("shield", SHIELDS)
def test_every_shield_generates_the_local_tokens(shield: str, tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, shield, verify=True)
    assert generate(session.llama, PROMPT, 16).token_ids == local_tokens(tiny, PROMPT, 16)
    session.close()


def test_attention_offload_is_refused_under_a_shield(tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, "otp", verify=True)
    with pytest.raises(ShieldError, match="offload"):
        session.backend.matmul(torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    session.close()


# --- masks are used once -----------------------------------------------------------------


@pytest.mark.parametrize("shield", ["otp", "noise"])
def test_a_mask_is_never_reused(shield: str, tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, shield, verify=False)
    pool = session.backend.shield.pool
    seen: set[bytes] = set()
    handed_out = 0

    def fingerprint(site: object, masks: torch.Tensor) -> None:
        nonlocal handed_out
        for row in masks:
            seen.add(hashlib.sha256(repr(site).encode() + row.numpy().tobytes()).digest())
        handed_out += masks.shape[0]

    pool.on_take = fingerprint
    session.backend.shield.prepare(4)  # a small pool, so the run also refills it on the way
    generate(session.llama, PROMPT, 12)
    # One row per token at each of a layer's four call sites (prefill, then 11 decode forwards),
    # and one per forward at lm_head, which sees only the last position.
    assert handed_out == 4 * tiny.config.n_layers * (len(PROMPT) + 11) + 12
    assert len(seen) == handed_out  # every row ever handed out is distinct
    assert session.backend.shield.times.masked_rows == handed_out
    session.close()


def test_a_run_prepared_for_its_prompt_and_answer_uses_every_row_made_and_makes_none(tiny: LoadedModel, server: RunningServer) -> None:
    """`prepare(N + M - 1, logits_rows=M)` (the bench's `--precompute`) makes what a run of N prompt and M answer tokens
    uses: N + M - 1 rows at each layer's sites (the last token needs no forward), M at lm_head (one per forward); none
    is left, none made during the run."""
    session = shielded_session(tiny, server.endpoint, "otp", verify=True)
    shield = session.backend.shield
    new_tokens = 6
    shield.prepare(len(PROMPT) + new_tokens - 1, logits_rows=new_tokens)
    assert shield.pool.available("lm_head") == new_tokens
    made = shield.times.offline_rows
    generate(session.llama, PROMPT, new_tokens)
    assert shield.times.offline_rows == made  # nothing made during the run: the pool was never short
    assert {site: shield.pool.available(site) for site in shield.sites if shield.pool.available(site)} == {}
    session.close()


def test_the_pool_never_holds_more_than_its_budget(tmp_path: Path) -> None:
    """A small random model whose masks for one token take ~55 KiB (residues in 4 bytes): a 1 MiB pool holds
    about 18 tokens' worth, so its background worker stops at the budget during the chunked prefill and
    decode, and a call that finds its site short makes its own rows."""
    model = load(make_tiny_model(tmp_path, hidden_size=256, intermediate_size=1024, vocab_size=4096, num_hidden_layers=2), with_tokenizer=False)
    running = start_server(model)
    try:
        remote = RemoteBackend(running.endpoint, timeout_s=30)
        remote.hello(model.fingerprint)
        config = ShieldConfig("otp", pool_mib=1, prefill_chunk=24)
        session = Session(model, shielded(remote, model, config), prefill_chunk=config.prefill_chunk)
        shield = session.backend.shield
        prompt = list(range(5, 53))
        assert session.generate(prompt, 24).token_ids == local_tokens(model, prompt, 24)  # exact: chunked, masks made beside the calls
        pool, budget = shield.pool, 1 << 20
        assert budget / 2 < pool.peak_bytes <= budget  # the worker filled it, never beyond
        assert sum(24 * pool.row_bytes[site] for site in pool.sites) > budget  # one chunk's masks would not have fitted
        assert shield.times.offline_rows >= shield.times.masked_rows
        session.close()
    finally:
        running.close()


def test_otp_splits_a_long_call_so_that_its_buffers_stay_bounded(tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose (T, N) int64 result would take more than `CALL_BYTES` goes to the server as several,
    each within it (recorded as the server received them); the tokens stay `local`'s."""
    widest = 2 * tiny.config.intermediate_size  # gate|up
    monkeypatch.setattr(otp, "CALL_BYTES", 8 * 5 * widest)  # 5 rows a call there, more at the narrower sites
    running = start_server(tiny, record_dir=tmp_path)
    try:
        session = shielded_session(tiny, running.endpoint, "otp")
        shield = session.backend.shield
        assert session.prefill_chunk == describe(shield)["max_forward_rows"] == 5  # the session's forwards keep within it; a whole-prompt forward is split:
        assert generate(session.llama, PROMPT, 6).token_ids == local_tokens(tiny, PROMPT, 6)
        session.close()
    finally:
        running.close()
    rows: dict[object, list[int]] = {}
    for record in read_recording(tmp_path):
        if record.op == "LINEAR":
            rows.setdefault((record.args["layer"], tuple(record.args["modules"])), []).append(record.tensors[0].shape[0])
    for site, calls in rows.items():  # the 24-token prompt in pieces of at most the site's rows, then one row a token
        limit = shield.max_rows(site)
        assert calls == [min(limit, len(PROMPT) - start) for start in range(0, len(PROMPT), limit)] + [1] * 5
    assert shield.max_rows((0, ("gate_proj", "up_proj"))) == 5 and len({shield.max_rows(site) for site in rows}) > 1  # by each site's widths


# --- integrity -------------------------------------------------------------------------------


def test_float_freivalds_accepts_honest_products_and_rejects_one_wrong_element(tiny: LoadedModel) -> None:
    sites = site_weights(tiny.weights, tiny.config.n_layers)
    check = FloatFreivalds(sites, "float32")
    site = (2, ("q_proj", "k_proj", "v_proj"))
    x = torch.randn(9, tiny.config.hidden_size)
    y = x @ sites[site][0]
    check.check(site, x, y)
    y[4, -1] += 1.0 + y[4, -1].abs()  # the fault injection's perturbation, in v_proj
    with pytest.raises(IntegrityError, match="layer 2 v_proj"):
        check.check(site, x, y)


@pytest.mark.parametrize("shield", SHIELDS)
def test_a_faulty_server_stops_every_shield_with_an_integrity_error(shield: str, tiny: LoadedModel) -> None:
    running = start_server(tiny, fault_rate=0.01, fault_seed=7)
    try:
        session = shielded_session(tiny, running.endpoint, shield, verify=True)
        with pytest.raises(IntegrityError, match="integrity check failed"):
            generate(session.llama, PROMPT, 200)  # ~2600 calls: a fault is all but certain, and seeded
        assert running.server.stats.faults_injected >= 1
        session.close()
    finally:
        running.close()


def watched_session(tiny: LoadedModel, endpoint: str, shield: str, monkeypatch: pytest.MonkeyPatch,
                    lie_at: tuple[int, tuple[str, ...]] | None = None) -> tuple[Session, list[tuple[object, int, int]]]:  # fmt: skip
    """A verified session whose checks are logged as (site, requests sent, replies received) when each runs;
    with `lie_at`, the server's reply for that site is off by one in its first element."""
    session = shielded_session(tiny, endpoint, shield, verify=True)
    remote, shield_ = session.backend.remote, session.backend.shield
    real_call, real_verify, log, sent, before = remote.call, shield_.verify, [], [0], remote.stats.round_trips

    def call(op: str, args: dict, tensors: list[torch.Tensor], while_waiting: Callable[[], None] | None = None) -> object:
        sent[0] += 1
        reply = real_call(op, args, tensors, while_waiting=while_waiting)
        site = "lm_head" if op == "LM_HEAD" else (args.get("layer"), tuple(args.get("modules", ())))
        if site == lie_at:
            z = reply.tensors[0]
            z.view(-1)[0] = (z.view(-1)[0] + 1) % args["p"] if "p" in args else z.view(-1)[0] + 1
        return reply

    def verify(site: object, wire: torch.Tensor, z: torch.Tensor, state: object) -> None:
        log.append((site, sent[0], remote.stats.round_trips - before))
        real_verify(site, wire, z, state)

    monkeypatch.setattr(remote, "call", call)
    monkeypatch.setattr(shield_, "verify", verify)
    return session, log


@pytest.mark.parametrize("shield", SHIELDS)
def test_each_check_runs_while_the_next_request_is_out_and_all_before_logits_leave(
    shield: str, tiny: LoadedModel, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, log = watched_session(tiny, server.endpoint, shield, monkeypatch)
    session.llama.forward(torch.tensor([PROMPT]), session.llama.new_cache(64))
    calls = 4 * tiny.config.n_layers + 1 + (shield == "plain")  # verified plain embeds on the server (checked at once)
    products = calls - (shield == "plain")
    assert len(log) == products  # every product checked before the forward returned its logits
    first = calls - products
    # Product i (of the calls, from 1) is checked once request i + 1 is sent and before its reply; lm_head's, the
    # last, after its own reply and before its logits return.
    expected = [(first + i + 1, first + i) for i in range(1, products)] + [(calls, calls)]
    assert [(sent, received) for _, sent, received in log] == expected
    assert log[-1][0] == "lm_head"
    session.close()


@pytest.mark.parametrize("shield", SHIELDS)
@pytest.mark.parametrize("where", ["down_proj", "lm_head"])
def test_a_lie_in_the_last_products_stops_the_forward_before_its_logits(
    shield: str, where: str, tiny: LoadedModel, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last layer's product is checked while lm_head's request is out; lm_head's own after its reply."""
    site = "lm_head" if where == "lm_head" else (tiny.config.n_layers - 1, ("down_proj",))
    session, log = watched_session(tiny, server.endpoint, shield, monkeypatch, lie_at=site)
    with pytest.raises(IntegrityError, match="lm_head" if where == "lm_head" else f"layer {site[0]} down_proj"):
        session.llama.forward(torch.tensor([PROMPT]), session.llama.new_cache(64))
    assert log[-1][0] == site  # the check that failed was the last to run
    session.close()


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load(make_tiny_model(tmp_path_factory.mktemp("long"), max_position_embeddings=512, tie_word_embeddings=False), with_tokenizer=False)


@pytest.mark.parametrize("shield", SHIELDS)
def test_no_false_alarm_over_a_long_generation(shield: str, long_tiny: LoadedModel) -> None:
    running = start_server(long_tiny)
    try:
        session = shielded_session(long_tiny, running.endpoint, shield, verify=True)
        result = generate(session.llama, PROMPT, 256)  # every call verified; none may fail
        assert len(result.token_ids) == 256
        session.close()
    finally:
        running.close()


# --- what the server sees ------------------------------------------------------------------------


def recorded_traffic(model: LoadedModel, shield: str, folder: Path) -> tuple[list[torch.Tensor], list[np.ndarray], list[str]]:
    """Run one generation against a recording server; return the TEE's plaintext inputs and what the server kept."""
    running = start_server(model, record_dir=folder)
    plaintext: list[torch.Tensor] = []
    try:
        session = shielded_session(model, running.endpoint, shield, verify=True)  # plain too: a shield wrapper to spy in
        shield_ = session.backend.shield
        mask = shield_.mask

        def spy(site: object, x: torch.Tensor) -> object:
            plaintext.append(x.clone())
            return mask(site, x)

        shield_.mask = spy  # type: ignore[method-assign]
        generate(session.llama, PROMPT, 6)
        session.close()
    finally:
        running.close()
    records = [r for r in read_recording(folder) if r.op in ("LINEAR", "LM_HEAD", "EMBED")]
    return plaintext, [centred(t, r.args.get("p")) for r in records if r.op != "EMBED" for t in r.tensors], [r.op for r in records]


def centred(x: np.ndarray, p: int | None) -> np.ndarray:
    """Residues mod p (exact plain, otp) as the server reads them best: centred representatives."""
    return x if p is None else np.where(x > p // 2, x - p, x)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r of two tensors' rows, each row first scaled to max |value| 1 (fixed point scales each row)."""
    return float(np.corrcoef(row_scaled(a).ravel(), row_scaled(b).ravel())[0, 1])


def row_scaled(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    top = np.abs(x).max(axis=-1, keepdims=True)
    return x / np.where(top > 0, top, 1.0)


@pytest.mark.parametrize("shield, hidden", [("plain", False), ("otp", True)])
def test_recorded_traffic_reveals_activations_and_token_ids_only_without_a_shield(shield: str, hidden: bool, tiny: LoadedModel, tmp_path: Path) -> None:
    plaintext, received, ops = recorded_traffic(tiny, shield, tmp_path)
    assert len(received) == len(plaintext) > 0  # every product's input, in order
    pairs = list(zip(plaintext, received))
    per_call = [correlation(x.numpy(), r) for x, r in pairs]
    pooled = correlation(np.concatenate([row_scaled(x.numpy()).ravel() for x, _ in pairs]), np.concatenate([row_scaled(r).ravel() for _, r in pairs]))
    n_pooled = sum(x.numel() for x, _ in pairs)
    # Under independence a sample correlation has standard error 1/sqrt(n): 6 of them is the bound.
    per_call_bound = max(6 / math.sqrt(x.numel()) for x, _ in pairs)
    if hidden:
        assert "EMBED" not in ops  # the server never receives a token id
        assert all(r.dtype == np.int64 for r in received)
        assert max(abs(c) for c in per_call) < per_call_bound, max(abs(c) for c in per_call)
        assert abs(pooled) < 6 / math.sqrt(n_pooled), pooled
        ids = np.array(PROMPT)
        for r in received:  # nor the prompt's ids in any tensor, as a run of three
            flat = r.ravel()
            assert not any(np.array_equal(flat[i : i + 3], ids[:3]) for i in range(flat.size - 2))
    else:
        assert "EMBED" in ops
        assert min(per_call) > 0.99 and pooled > 0.99  # the same test finds the plaintext when nothing hides it


# --- ShieldConfig: one validate() for every entry point ----------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ShieldConfig("rot13"), "unknown shield 'rot13'"),
        (ShieldConfig("otp", precompute=-1), "precompute"),
        (ShieldConfig("noise", noise_scale=0.0, allow_broken=True), "noise scale must be positive"),
        (ShieldConfig("noise"), "noise shield is broken .* --research-shields"),
        (ShieldConfig("seqmix", verify=True), "seqmix shield is broken .* --research-shields"),
        (ShieldConfig("otp", weight_bits=17), "weight bits must be 2..16"),
        (ShieldConfig("otp", activation_bits=1), "activation bits must be 2..24"),
    ],
)
def test_shield_config_refuses_settings_out_of_range(config: ShieldConfig, message: str) -> None:
    with pytest.raises(ShieldError, match=message):
        config.validate()


def test_verification_is_on_by_default_with_otp_only() -> None:
    assert [ShieldConfig(name).verifies for name in SHIELDS] == [name == "otp" for name in SHIELDS]
    assert ShieldConfig("otp", verify=False).verifies is False and ShieldConfig("noise", verify=True).verifies is True


# --- exact plain, and the runner's precision policy ------------------------------------------


def test_plain_verified_is_exact_fixed_point_and_catches_an_error_of_one(tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, "plain", verify=True)
    shield = session.backend.shield
    assert isinstance(shield, ExactPlainShield) and shield.pool is None and shield.freivalds is None  # no pad, no float tolerance
    site = (0, ("o_proj",))
    x = torch.randn(3, tiny.config.hidden_size)
    wire, state = shield.mask(site, x)
    assert torch.equal(wire, torch.from_numpy(state.x_q % shield.field.p))  # unmasked: the server sees X_q itself
    z = session.backend.remote.call("LINEAR", {"layer": 0, "modules": ["o_proj"], **shield.wire_args()}, [wire]).tensors[0]
    shield.verify(site, wire, z, state)
    assert torch.equal(torch.from_numpy(state.y), torch.from_numpy(state.x_q) @ shield.quantized.groups[site][0].dense().to(torch.int64))
    lie = z.clone()
    lie[1, 5] += 1  # the smallest lie there is
    with pytest.raises(IntegrityError, match="layer 0 o_proj"):
        shield.verify(site, wire, lie, type(state)(state.x_q, state.x_scale, state.mask_product))
    assert describe(shield)["check"].startswith("exact")
    session.close()


def test_float_checks_are_labelled_fault_detectors(tiny: LoadedModel, server: RunningServer) -> None:
    session = shielded_session(tiny, server.endpoint, "seqmix", verify=True)
    assert describe(session.backend.shield)["check"].startswith("float fault detector, not a defence")
    session.close()


class ClaimingRemote:
    """Stands for a connected server whose HELLO announced `dtype`."""

    def __init__(self, dtype: object) -> None:
        self.info = {"dtype": dtype}


@pytest.mark.parametrize("shield", SHIELDS)
def test_a_server_claiming_lower_precision_is_refused_at_hello(shield: str, tiny: LoadedModel) -> None:
    for claim in ("bfloat16", "float16", "float8", None):
        with pytest.raises(ShieldError, match="refused"):
            shielded(ClaimingRemote(claim), tiny, ShieldConfig(shield, verify=True, allow_broken=True))  # type: ignore[arg-type]


def test_precision_is_the_runners_policy() -> None:
    expects = ShieldConfig("otp")
    assert expects.server_precision("float32") == "float32" and expects.server_precision("float64") == "float32"
    assert ShieldConfig("otp", precision="bfloat16").server_precision("bfloat16") == "bfloat16"  # what the user asked for
    assert ShieldConfig("otp", accept_lower_precision=True).server_precision("bfloat16") == "bfloat16"  # an explicit opt-in
    assert ShieldConfig("otp", precision="bfloat16").server_precision("float32") == "bfloat16"  # never tighter than asked


TWO_LAYERS_OF_SITES = [
    (layer, group) for layer in range(2) for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",), ("down_proj",))
]


def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll `condition` (the pool's worker runs beside the test) until it holds or `seconds` pass; the asserts follow."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_pools_worker_makes_the_next_calls_masks_beside_the_current_one() -> None:
    """After a call takes its rows, the worker stocks the following sites in forward order, so the
    next calls find their masks made and make none themselves."""
    from tsqp.shields.pool import MaskPool, ShieldTimes

    sites = TWO_LAYERS_OF_SITES
    made_by: list[tuple[object, str]] = []

    def make(site: object, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        made_by.append((site, threading.current_thread().name))
        return torch.randn(rows, 4), torch.randn(rows, 2)

    pool = MaskPool(make, sites, ShieldTimes(), dict.fromkeys(sites, 48), budget_bytes=1 << 20)
    assert pool.sites[1] == (0, ("o_proj",))  # forward order, not the order given
    pool.take(pool.sites[0], 5)  # nothing made yet: this call makes its own
    until(lambda: all(pool.available(s) >= 5 for s in pool.sites[1:]))
    by_worker = [site for site, thread in made_by if thread == "tsqp-mask-pool"]
    assert by_worker[:7] == pool.sites[1:]  # in the order the forward pass will call them
    for site in pool.sites[1:]:
        assert pool.take(site, 5)[0].shape == (5, 4)
    assert [site for site, thread in made_by if thread != "tsqp-mask-pool"] == [pool.sites[0]]  # no later call made its own
    pool.close()


def test_a_prompts_masks_leave_the_first_decode_step_its_own() -> None:
    """The worker's blocks for a prompt's calls carry a decode batch, kept as a block of its own: after the prompt,
    every site holds one, and the first decode step makes no masks itself."""
    from tsqp.shields.pool import REFILL_ROWS, MaskPool, ShieldTimes

    sites = TWO_LAYERS_OF_SITES
    made_by: list[tuple[object, int, str]] = []

    def make(site: object, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        made_by.append((site, rows, threading.current_thread().name))
        return torch.randn(rows, 4), torch.randn(rows, 2)

    pool = MaskPool(make, sites, ShieldTimes(), dict.fromkeys(sites, 48), budget_bytes=1 << 20)
    prompt = 5
    pool.take(pool.sites[0], prompt)  # nothing made yet: the prompt's first call makes its own
    until(lambda: all(pool.available(s) >= prompt + REFILL_ROWS for s in pool.sites[1:]))
    for site in pool.sites[1:]:
        pool.take(site, prompt)
    assert all(pool.available(s) == REFILL_ROWS for s in pool.sites[1:])
    until(lambda: pool.available(pool.sites[0]) >= prompt + REFILL_ROWS)  # the worker's last job: the next prompt's first site
    assert pool.nbytes() == 48 * sum(pool.available(s) for s in pool.sites)  # the prompt's rows are gone, memory and all
    own = len([m for m in made_by if m[2] != "tsqp-mask-pool"])
    for site in pool.sites[1:]:
        pool.take(site, 1)  # the first decode step
    pool.close()
    assert len([m for m in made_by if m[2] != "tsqp-mask-pool"]) == own == 1


def test_a_prepared_blocks_memory_goes_once_little_of_it_is_left() -> None:
    """`prepare` makes a prompt's and its answer's rows in one block. Once the prompt's call has taken most of it,
    the rows left are copied out and the block's memory goes (it stayed whole until its last row, through the
    whole answer, and a run that left one row kept it into the next). Every row is still handed out once."""
    from tsqp.shields.pool import COMPACT_SHARE, MaskPool, ShieldTimes

    site = (0, ("o_proj",))
    made = torch.arange(100 * 4, dtype=torch.float64).reshape(100, 4)
    pool = MaskPool(lambda s, rows: (made[:rows].clone(), -made[:rows].clone()), [site], ShieldTimes(), {site: 48})
    pool.prepare(100)
    assert pool.nbytes() == 100 * 48
    first, _ = pool.take(site, 70)  # more than half used: a view of the block, as before
    assert pool.nbytes() == 100 * 48
    prompt_rows = 100 - 100 // COMPACT_SHARE
    second, _ = pool.take(site, prompt_rows - 70)
    assert pool.nbytes() == (100 - prompt_rows) * 48  # only the rows left are held
    rest = [pool.take(site, 1) for _ in range(100 - prompt_rows)]
    assert pool.nbytes() == 0 and pool.available(site) == 0
    handed = torch.cat([first, second, *[r for r, _ in rest]])
    assert torch.equal(handed, made) and all(torch.equal(rw, -r) for r, rw in rest)  # each row once, in order, its product with it
    pool.close()


def test_a_call_its_sites_stock_covers_does_not_wait_for_the_worker_making_that_site() -> None:
    """Decode refills a site before it runs dry: while the worker makes the site's next block, a call
    still served by the rows held takes them at once (waiting for the block stalled every such step)."""
    from tsqp.shields.pool import REFILL_ROWS, MaskPool, ShieldTimes

    sites = [(0, ("o_proj",)), (0, ("down_proj",))]
    gate, making = threading.Event(), threading.Event()

    def make(site: object, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if threading.current_thread().name == "tsqp-mask-pool" and site == first and stocked.is_set() and not making.is_set():
            making.set()  # the site's next block: held up until the call below has been tried
            gate.wait(10)
        return torch.randn(rows, 4), torch.randn(rows, 2)

    stocked = threading.Event()
    pool = MaskPool(make, sites, ShieldTimes(), dict.fromkeys(sites, 48), budget_bytes=1 << 20)
    first = pool.sites[0]
    pool.take(first, 1)  # made by this call; the worker then stocks both sites
    until(lambda: all(pool.available(s) >= REFILL_ROWS for s in pool.sites))
    stocked.set()
    for _ in range(REFILL_ROWS // 2 + 1):  # below half a refill: the worker starts the site's next block
        pool.take(first, 1)
    assert making.wait(10), "the worker did not start refilling the site"
    held = pool.available(first)
    taker = threading.Thread(target=pool.take, args=(first, 1))
    taker.start()
    taker.join(2)
    finished = not taker.is_alive()
    gate.set()
    taker.join(10)
    pool.close()
    assert held > 0 and finished, "a call its site's stock covered waited for the worker's block"


def test_the_pools_worker_keeps_the_thread_count_of_the_pools_set_up() -> None:
    """A split's runner decodes on one torch thread; a worker started during a decode step still makes
    masks on the count the pool was set up with (a new thread would otherwise take the count of the moment)."""
    from tsqp.shields.pool import MaskPool, ShieldTimes
    from tsqp.tee.llama import torch_threads

    sites = [(0, ("o_proj",)), (0, ("down_proj",))]
    counts: list[int] = []

    def make(site: object, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if threading.current_thread().name == "tsqp-mask-pool":
            counts.append(torch.get_num_threads())
        return torch.randn(rows, 4), torch.randn(rows, 2)

    with torch_threads(3):  # the set-up's count, whatever this machine's default
        pool = MaskPool(make, sites, ShieldTimes(), dict.fromkeys(sites, 48), budget_bytes=1 << 20)
    with torch_threads(1):  # a decode step starts the worker
        pool.take(pool.sites[0], 1)
        until(lambda: bool(counts))
    pool.close()
    assert counts and set(counts) == {3}


def test_an_otp_run_leaves_the_weight_file_out_of_the_tees_memory(tmp_path: Path) -> None:
    """otp's TEE reads the weights (masks' blocks, embedding rows) from the model's file and hands the pages
    back: after a run, what stays resident of a 28 MB file is a few folios, not the weights."""
    import random
    import struct

    from tsqp.tee.session import connect

    path = make_tiny_model(tmp_path, hidden_size=256, intermediate_size=1024, vocab_size=8192, num_attention_heads=4, num_key_value_heads=2)
    random.seed(1)
    prompt = [random.randrange(8192) for _ in range(40)]  # rows all over the embedding
    with connect(None, path, shield="otp") as session:
        session.generate(prompt, 6)
        model = session.model
    embed = model.weights["embed"]
    weight_bytes = sum(w.numel() * w.element_size() for w in {id(w): w for w in model.weights.values()}.values())
    start = min(w.data_ptr() for w in model.weights.values())
    end = max(w.data_ptr() + w.numel() * w.element_size() for w in model.weights.values())
    with open("/proc/self/pagemap", "rb") as f:  # which of the file's pages this process maps
        f.seek(start // 4096 * 8)
        present = sum(v >> 63 for (v,) in struct.iter_unpack("<Q", f.read(((end - start) // 4096 + 1) * 8)))
    assert weight_bytes > 20 << 20 and embed.numel() * 4 >= 8 << 20
    assert present * 4096 < weight_bytes // 16  # measured 0.4 MB; 7.7 MB with the embedding rows left mapped
