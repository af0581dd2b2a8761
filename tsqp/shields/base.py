"""Shields: what the untrusted server sees of each linear op, and how its answers are checked.

A shield has four parts: `prepare` (the offline phase: a pool of masks and their products with
the weights), `mask` (what goes on the wire), `verify` (Freivalds' check of the server's
result) and `unmask`. `ShieldedBackend` wraps the remote backend with one, so the inference
core (`tsqp.core`) never knows which is on.

- `plain`: nothing hidden, as the original prototype (the server even does the embedding).
- `otp`: a one-time pad over Z_p on fixed-point activations, exact (see `tsqp.fixedpoint`).
- `noise`: X + c·G with G Gaussian and c = scale · rms(X) per row; hides only statistically.
- `seqmix`: M·X with M = D + αβᵀ over the token axis, undone by Sherman–Morrison. For one
  decoded token M is a scalar: it hides nothing there. Kept as a measured comparison.

In every mode but `plain` the embedding lookup happens here and the server never sees a token id.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tsqp.model import fixedpoint
from tsqp.errors import IntegrityError, ShieldError
from tsqp.model.linear import GroupKey, QuantizedWeights, product_sites
from tsqp.tee.private_server import OTP_WEIGHT_BITS

SHIELDS = ("plain", "otp", "noise", "seqmix")
Site = GroupKey | str  # (layer, modules) of a LINEAR call, or "lm_head"

# Unit roundoff of the server's product dtype: the float verification tolerance scales with it.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
# Freivalds' float tolerance, in standard deviations of a random-rounding model of the error
# (eps · sqrt(K · Σ_k x_k² Σ_n W_kn² r_n²)). Observed errors on SmolLM2 stay below ~2 of them.
FLOAT_TOLERANCE_SIGMAS = 64.0


def site_weights(weights: Mapping[str, torch.Tensor], n_layers: int) -> dict[Site, tuple[torch.Tensor, list[int]]]:
    """Every call site's W_t (K, N) (fused as on the server) and its modules' output sizes."""
    return {key: (w_t, sizes) for key, w_t, sizes in product_sites(weights, n_layers)}


def module_names(site: Site) -> tuple[str, ...]:
    return ("lm_head",) if site == "lm_head" else site[1]


@dataclass
class ShieldTimes:
    """Time the TEE spends shielding, apart from the wire and the model itself."""

    mask_s: float = 0.0
    unmask_s: float = 0.0
    verify_s: float = 0.0
    offline_s: float = 0.0  # mask pool: drawing masks and their products with the weights
    offline_rows: int = 0  # mask rows precomputed, summed over call sites
    masked_rows: int = 0  # mask rows used, summed over call sites


class MaskPool:
    """Per call site, precomputed mask rows and their products with the weights; each row is handed out once."""

    def __init__(self, make: Callable[[Site, int], tuple[torch.Tensor, torch.Tensor]], sites: Sequence[Site],
                 times: ShieldTimes, chunk: int = 32) -> None:  # fmt: skip
        self.make, self.sites, self.times, self.chunk = make, list(sites), times, chunk
        self._blocks: dict[Site, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in self.sites}
        self.on_take: Callable[[Site, torch.Tensor], None] | None = None  # tests fingerprint every mask handed out
        self.peak_bytes = 0  # the offline phase's memory: the most the pool held at once

    def available(self, site: Site) -> int:
        return sum(r.shape[0] for r, _ in self._blocks[site])

    def prepare(self, rows: int) -> None:
        """Offline: make sure every site holds at least `rows` unused rows."""
        for site in self.sites:
            self._refill(site, rows - self.available(site))

    def take(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        short = rows - self.available(site)
        if short > 0:
            self._refill(site, max(short, self.chunk))  # ahead of need, in chunks
        masks, products = [], []
        blocks = self._blocks[site]
        while rows:
            r, rw = blocks[0]
            n = min(rows, r.shape[0])
            masks.append(r[:n])
            products.append(rw[:n])
            blocks[0] = (r[n:], rw[n:])
            if n == r.shape[0]:
                blocks.pop(0)  # spent: nothing keeps a used mask
            rows -= n
        mask = masks[0] if len(masks) == 1 else torch.cat(masks)
        if self.on_take is not None:
            self.on_take(site, mask)
        self.times.masked_rows += mask.shape[0]
        return mask, products[0] if len(products) == 1 else torch.cat(products)

    def _refill(self, site: Site, rows: int) -> None:
        if rows <= 0:
            return
        started = time.perf_counter()
        self._blocks[site].append(self.make(site, rows))
        self.times.offline_s += time.perf_counter() - started
        self.times.offline_rows += rows
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def nbytes(self) -> int:
        return sum(r.nbytes + rw.nbytes for blocks in self._blocks.values() for r, rw in blocks)


def block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Blocks (N_i, C) -> (sum N_i, C·len): module i's check vectors nonzero only on its outputs, so one
    product checks every module of a fused call."""
    c = blocks[0].shape[1]
    out = torch.zeros(sum(b.shape[0] for b in blocks), c * len(blocks), dtype=blocks[0].dtype)
    start = 0
    for i, b in enumerate(blocks):
        out[start : start + b.shape[0], i * c : (i + 1) * c] = b
        start += b.shape[0]
    return out


class FloatFreivalds:
    """Freivalds' check of float products y = x·W_t against a secret vector r per weight matrix.

    r_n = ±(1 + U[0, 1)): every coefficient has magnitude at least 1, so one corrupted element
    off by more than the tolerance is always caught; which sign and size stays secret.
    """

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], server_dtype: str) -> None:
        self.eps = UNIT_ROUNDOFF.get(server_dtype, UNIT_ROUNDOFF["float32"])
        gen = torch.Generator().manual_seed(secrets.randbits(63))
        self.checks: dict[Site, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for site, (w_t, sizes) in sites.items():
            signs = torch.randint(0, 2, (w_t.shape[1],), generator=gen, dtype=torch.float64) * 2 - 1
            r = block_diagonal([v[:, None] for v in (signs * (1 + torch.rand(w_t.shape[1], generator=gen, dtype=torch.float64))).split(sizes)])  # (N, M)
            w = w_t.double()
            # numpy: a decode step makes ~120 checks, where torch's per-op overhead would dominate
            self.checks[site] = (r.detach().numpy(), (w @ r).detach().numpy(), ((w * w) @ (r * r)).detach().numpy())  # r, W r, W² r²

    def check(self, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (T, K) the server's input, y (T, N) its result."""
        r, wr, w2r2 = self.checks[site]
        x64 = x.detach().numpy().astype(np.float64)
        error = np.abs(y.detach().numpy().astype(np.float64) @ r - x64 @ wr)  # (T, M)
        tolerance = FLOAT_TOLERANCE_SIGMAS * self.eps * np.sqrt(x.shape[-1] * ((x64 * x64) @ w2r2)) + 1e-30
        bad = ~(error <= tolerance)  # NaN counts as bad
        if bad.any():
            module = module_names(site)[int(np.nonzero(bad.any(axis=0))[0][0])]
            raise IntegrityError(_integrity_message(site, module, f"Freivalds residual {float((error / tolerance).max()):.3g}× the float tolerance"))


def _integrity_message(site: Site, module: str, detail: str) -> str:
    where = "lm_head" if site == "lm_head" else f"layer {site[0]} {module}"
    return f"integrity check failed: the server's result for {where} is wrong ({detail}); generation stopped"


class Shield:
    """`plain`: the base of every shield; the server sees everything, results may still be verified."""

    name = "plain"
    embeds_remotely = True  # the original prototype's lookup on the server; every other shield keeps it here
    float_results = True  # verified by float Freivalds; otp's integers have an exact check of their own

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str) -> None:
        self.sites = sites
        self.times = ShieldTimes()
        self.freivalds = FloatFreivalds(sites, server_dtype) if verify and self.float_results else None
        self.pool: MaskPool | None = None

    def prepare(self, rows: int) -> None:
        """Offline phase: masks (and their products) for `rows` tokens at every call site."""
        if self.pool is not None:
            self.pool.prepare(rows)

    def wire_args(self) -> dict[str, Any]:
        return {}

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x, None

    def verify(self, site: Site, wire: torch.Tensor, z: torch.Tensor, state: Any) -> None:
        assert self.freivalds is not None
        self.freivalds.check(site, wire, z)

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        return z


class NoiseShield(Shield):
    """X + c·G, c = scale · rms(X) per row, G Gaussian; c·(G·W) is subtracted from the result."""

    name = "noise"
    embeds_remotely = False

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str, scale: float = 10.0) -> None:
        super().__init__(sites, verify, server_dtype)
        if not scale > 0:
            raise ShieldError(f"noise scale must be positive, got {scale}")
        self.scale = scale
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.pool = MaskPool(self._make, list(sites), self.times)

    def _make(self, site: Site, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_t = self.sites[site][0]
        g = torch.randn(rows, w_t.shape[0], generator=self.generator)
        return g, g @ w_t

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        g, gw = self.pool.take(site, x.shape[0])  # type: ignore[union-attr]
        c = self.scale * x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return x + c * g, (c, gw)

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        c, gw = state
        return z - c * gw


class SeqmixShield(Shield):
    """M·X along the token axis, M = D + αβᵀ drawn fresh per call; M⁻¹ by Sherman–Morrison."""

    name = "seqmix"
    embeds_remotely = False

    def __init__(self, sites: Mapping[Site, tuple[torch.Tensor, list[int]]], verify: bool, server_dtype: str) -> None:
        super().__init__(sites, verify, server_dtype)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        t = x.shape[0]
        while True:
            d = 0.5 + 1.5 * torch.rand(t, generator=self.generator, dtype=torch.float64)
            alpha = torch.randn(t, generator=self.generator, dtype=torch.float64)
            beta = torch.randn(t, generator=self.generator, dtype=torch.float64)
            denominator = 1 + float(beta @ (alpha / d))
            if abs(denominator) > 0.1:  # keeps M well conditioned
                break
        m = torch.diag(d) + torch.outer(alpha, beta)
        return (m @ x.double()).float(), (d, alpha, beta, denominator)

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        d, alpha, beta, denominator = state
        z_d = z.double() / d[:, None]  # D⁻¹z
        alpha_d = alpha / d  # D⁻¹α
        return (z_d - torch.outer(alpha_d, beta @ z_d) / denominator).float()


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
                 quantized: QuantizedWeights, activation_bits: int = 16) -> None:  # fmt: skip
        super().__init__(sites, verify, server_dtype)
        self.quantized = quantized
        self.field = fixedpoint.choose_field(quantized.l1, quantized.bits, activation_bits)
        self.pool = MaskPool(self._make, list(sites), self.times)
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

    # The per-call work below runs in numpy: ~121 calls per decoded token of a few small
    # elementwise ops each, where torch's dispatch overhead would dominate.

    def mask(self, site: Site, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        # fixedpoint.quantize_rows in numpy: ~8 ms less per decoded token than its torch ops for
        # 121 one-row calls (it stays torch for the weights, where its threads halve start-up).
        x = x.detach().numpy().astype(np.float64)
        top = (1 << (self.field.activation_bits - 1)) - 1
        x_scale = np.abs(x).max(axis=-1, keepdims=True) / top
        x_scale[x_scale == 0] = 1.0  # an all-zero row stays zero
        x_q = np.rint(x / x_scale).astype(np.int64)  # |x_q| <= top
        r, rw = self.pool.take(site, x.shape[0])  # type: ignore[union-attr]
        wire = (x_q + r.detach().numpy()) % self.field.p
        return torch.from_numpy(wire), _OtpCall(x_q, x_scale, rw.detach().numpy())

    def _integers(self, z: torch.Tensor, call: _OtpCall) -> np.ndarray:
        if call.y is None:
            p = self.field.p
            y = (z.detach().numpy() - call.mask_product) % p
            y[y > p // 2] -= p  # the centred representative
            call.y = y
        return call.y

    def verify(self, site: Site, wire: torch.Tensor, z: torch.Tensor, state: Any) -> None:
        assert self.checks is not None
        y = self._integers(z, state)
        if y.size and int(np.abs(y).max()) > self.field.bound:
            raise IntegrityError(_integrity_message(site, "|".join(module_names(site)), "a value beyond any honest result"))
        r, s = self.checks[site]
        lhs = y.view(np.uint64) @ r  # (T, 2M), mod 2⁶⁴
        rhs = state.x_q.view(np.uint64) @ s
        bad = (lhs != rhs).any(axis=0)
        if bad.any():
            module = module_names(site)[int(np.nonzero(bad)[0][0]) // self.FREIVALDS_VECTORS]
            raise IntegrityError(_integrity_message(site, module, "Freivalds check mod 2^64"))

    def unmask(self, site: Site, z: torch.Tensor, state: Any) -> torch.Tensor:
        y = self._integers(z, state)
        return torch.from_numpy((y * state.x_scale * self._w_scales[site]).astype(np.float32))


def make_shield(name: str, weights: Mapping[str, torch.Tensor], n_layers: int, verify: bool, server_dtype: str = "float32",
                noise_scale: float = 10.0, weight_bits: int = OTP_WEIGHT_BITS, activation_bits: int = 16) -> Shield:  # fmt: skip
    """The TEE's side of shield `name` for a model's weights (the TEE holds them: only masked products leave)."""
    sites = site_weights(weights, n_layers)
    if name == "plain":
        return Shield(sites, verify, server_dtype)
    if name == "noise":
        return NoiseShield(sites, verify, server_dtype, noise_scale)
    if name == "seqmix":
        return SeqmixShield(sites, verify, server_dtype)
    if name == "otp":
        if not 2 <= weight_bits <= 16:
            raise ShieldError(f"otp weight bits must be 2..16, got {weight_bits}")
        quantized = QuantizedWeights(weights, n_layers, weight_bits)  # float64: no conversion per pool refill
        return OtpShield(sites, verify, server_dtype, quantized, activation_bits)
    raise ShieldError(f"unknown shield {name!r}; choose one of {', '.join(SHIELDS)}")


@dataclass
class ShieldedStats:
    """The wire's counters and the shield's times, read together as one snapshot."""

    wire: Any
    times: ShieldTimes

    def as_dict(self) -> dict[str, float]:
        return {**self.wire.as_dict(), **vars(self.times)}


class ShieldedBackend:
    """A `LinearBackend`: each product masked here, computed by the server, verified and unmasked here."""

    def __init__(self, remote: Any, shield: Shield, embedding: torch.Tensor, verify: bool) -> None:
        self.remote = remote
        self.shield = shield
        self.embedding = embedding  # (V, D): the lookup stays in the TEE
        self.verify = verify
        self.stats = ShieldedStats(remote.stats, shield.times)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.shield.embeds_remotely:
            return self.embedding[token_ids]
        rows = self.remote.embed(token_ids)
        if self.verify:  # a lookup: the TEE's own copy checks it outright
            expected = self.embedding[token_ids]
            if not bool(((rows.float() - expected).abs() <= self.shield.freivalds.eps * expected.abs()).all()):  # type: ignore[union-attr]
                raise IntegrityError("integrity check failed: the server's embedding rows are wrong; generation stopped")
        return rows

    def linear(self, layer: int, modules: Sequence[str], x: torch.Tensor) -> list[torch.Tensor]:
        site = (layer, tuple(modules))
        return self._call("LINEAR", {"layer": layer, "modules": list(modules)}, site, x)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("LM_HEAD", {}, "lm_head", x)[0]

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise ShieldError("attention offload (--offload-attention-from) sends unmasked activations; it is not available with a shield")

    def _call(self, op: str, args: dict[str, Any], site: Site, x: torch.Tensor) -> list[torch.Tensor]:
        if site not in self.shield.sites:
            raise ShieldError(f"unknown call site {site}")
        sizes = self.shield.sites[site][1]
        lead = x.shape[:-1]
        times = self.shield.times
        offline_before = times.offline_s  # a pool refill inside `mask` is offline work, counted apart
        t0 = time.perf_counter()
        wire, state = self.shield.mask(site, x.reshape(-1, x.shape[-1]))
        t1 = time.perf_counter()
        parts = self.remote.call(op, {**args, **self.shield.wire_args()}, [wire]).tensors
        z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if z.shape != (wire.shape[0], sum(sizes)):
            raise IntegrityError(_integrity_message(site, "|".join(module_names(site)), f"shape {list(z.shape)}, expected {[wire.shape[0], sum(sizes)]}"))
        t2 = time.perf_counter()
        if self.verify:
            self.shield.verify(site, wire, z, state)
        t3 = time.perf_counter()
        y = self.shield.unmask(site, z, state)
        t4 = time.perf_counter()
        times.mask_s += (t1 - t0) - (times.offline_s - offline_before)
        times.verify_s += (t3 - t2) if self.verify else 0.0
        times.unmask_s += t4 - t3
        y = y.reshape(*lead, y.shape[-1])
        return list(y.split(sizes, dim=-1)) if len(sizes) > 1 else [y]

    def close(self) -> None:
        self.remote.close()


def default_verify(shield: str) -> bool:
    """`--verify` is on by default with otp, whose check is exact and cheap."""
    return shield == "otp"


def describe(shield: Shield) -> dict[str, Any]:
    """What a report says about a shield's configuration."""
    info: dict[str, Any] = {"shield": shield.name}
    if isinstance(shield, OtpShield):
        f = shield.field
        info.update(p=f.p, p_bits=f.p.bit_length(), limbs=f.limbs, limb_bits=f.limb_bits, weight_bits=f.weight_bits,
                    activation_bits=f.activation_bits, bound_bits=f.bound.bit_length())  # fmt: skip
    if isinstance(shield, NoiseShield):
        info["noise_scale"] = shield.scale
    if shield.pool is not None:
        info["pool_peak_mib"] = shield.pool.peak_bytes / 2**20
    return info

