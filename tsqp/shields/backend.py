"""`ShieldedBackend`: a `LinearBackend` whose every product is masked here, computed by the server, verified and unmasked here."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tsqp.errors import IntegrityError, MalformedReply, ShieldError
from tsqp.model.linear import QuantizedWeights, split_modules
from tsqp.model.pages import FilePages
from tsqp.shields.base import Shield
from tsqp.shields.config import ShieldConfig
from tsqp.shields.noise import NoiseShield
from tsqp.shields.otp import OtpShield
from tsqp.shields.plain_exact import ExactPlainShield
from tsqp.shields.pool import ShieldTimes
from tsqp.shields.seqmix import SeqmixShield
from tsqp.shields.sites import Site, integrity_message, module_names, site_weights


def make_shield(config: ShieldConfig, weights: Mapping[str, torch.Tensor], n_layers: int, server_dtype: str = "float32",
                pages: FilePages | None = None) -> Shield:  # fmt: skip
    """The TEE's side of the configured shield for a model's weights (the TEE holds them: only masked products leave).

    `pages`: the weights' file mappings, whose pages otp's reads hand back."""
    config.validate()
    verify = config.verifies
    if config.exact:  # otp, and plain when verified: fixed point, checked exactly
        # W_q is derived from the model's matrices a block at a time, whenever masks are made, and the file
        # pages each read touched are handed back: neither W_q nor the float weights stay resident.
        quantized = QuantizedWeights(weights, n_layers, config.weight_bits, dtype=None, pages=pages)
        # Their sites are the derived W_q: the fused float32 copies the other shields keep are never made.
        sites = {site: (w_q, sizes) for site, (w_q, _, sizes) in quantized.groups.items()}
        if config.name == "plain":
            return ExactPlainShield(sites, verify, server_dtype, quantized, config.activation_bits)
        return OtpShield(sites, verify, server_dtype, quantized, config.activation_bits, config.pool_mib << 20)
    sites = site_weights(weights, n_layers)
    if config.name == "noise":
        return NoiseShield(sites, verify, server_dtype, config.noise_scale, config.pool_mib << 20)
    if config.name == "seqmix":
        return SeqmixShield(sites, verify, server_dtype)
    return Shield(sites, verify, server_dtype)


@dataclass
class ShieldedStats:
    """The wire's counters and the shield's times, read together as one snapshot."""

    wire: Any
    times: ShieldTimes

    def as_dict(self) -> dict[str, float]:
        return {**self.wire.as_dict(), **vars(self.times)}


class ShieldedBackend:
    """A `LinearBackend`: each product masked here, computed by the server, verified and unmasked here.

    A product's check runs while the next request is on its way (where the server computes on other
    hardware, a GPU or other cores, it leaves the step's critical path), and every product is checked
    before `lm_head` returns logits: nothing computed from an unchecked result leaves the TEE. A failure
    is raised at the first call after its check ran, naming the product that failed.
    """

    def __init__(self, remote: Any, shield: Shield, embedding: torch.Tensor, verify: bool, pages: FilePages | None = None) -> None:
        self.remote = remote
        self.shield = shield
        self.embedding = embedding  # (V, D): the lookup stays in the TEE
        self.verify = verify
        self.pages = pages  # the embedding's file pages go back after each lookup
        self.stats = ShieldedStats(remote.stats, shield.times)
        self._unchecked: list[tuple[Site, torch.Tensor, torch.Tensor, Any]] = []  # (site, wire, z, state), oldest first
        self._failed: Exception | None = None

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.shield.embeds_remotely:
            return self._own_rows(token_ids)
        with self._as_integrity_failure():
            rows = self.remote.embed(token_ids)
        if self.verify:  # a lookup: the TEE's own copy, in the policy's dtype, checks it exactly
            expected = self._own_rows(token_ids).to(getattr(torch, self.shield.server_dtype)).float()
            if rows.dtype != torch.float32 or not torch.equal(rows, expected):
                raise IntegrityError("integrity check failed: the server's embedding rows are wrong; generation stopped")
        return rows

    def _own_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The TEE's embedding rows (a copy). Each row read maps the page cache's whole folio around it (up to
        2 MiB): 512 random tokens of a 1B model's table left 279 MiB resident. All of it goes back at once."""
        rows = self.embedding[token_ids]
        if self.pages is not None:
            self.pages.release(self.embedding)
        return rows

    def linear(self, layer: int, modules: Sequence[str], x: torch.Tensor, groups: Sequence[int] | None = None) -> list[torch.Tensor]:
        site = (layer, tuple(modules))
        return self._call("LINEAR", {"layer": layer, "modules": site[1]}, site, x, groups)

    def lm_head(self, x: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
        logits = self._call("LM_HEAD", {}, "lm_head", x, groups)[0]
        self.settle()
        return logits

    def settle(self) -> None:
        """Check every product not checked yet; raise the first failure."""
        self._check_unchecked()
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def _check_unchecked(self) -> None:
        """The pending checks, oldest first, until one fails (kept for `settle`). Never raises: it runs inside a call."""
        if not self._unchecked:
            return
        started = time.perf_counter()
        while self._unchecked and self._failed is None:
            try:
                self.shield.verify(*self._unchecked.pop(0))
            except Exception as e:  # IntegrityError, or a bug: raised by `settle`, after the reply is in
                self._failed = e
                self._unchecked.clear()
        self.shield.times.verify_s += time.perf_counter() - started

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise ShieldError("attention offload sends unmasked activations: it is not available with a shield")

    def _call(self, op: str, args: dict[str, Any], site: Site, x: torch.Tensor, groups: Sequence[int] | None = None) -> list[torch.Tensor]:
        if site not in self.shield.sites:
            raise ShieldError(f"unknown call site {site}")
        sizes = self.shield.sites[site][1]
        rows = x.reshape(-1, x.shape[-1])
        # A shield that mixes rows masks each sequence apart (one call still carries them all);
        # the others mask every row on its own anyway, and may split a long call to bound its buffers.
        per_sequence = self.shield.mixes_rows and groups is not None and len(groups) > 1
        limit = self.shield.max_rows(site)
        if per_sequence or limit is None or rows.shape[0] <= limit:
            y = self._product(op, args, site, rows, groups if per_sequence else None)
        else:
            y = torch.cat([self._product(op, args, site, part) for part in rows.split(limit)])
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return split_modules(y, sizes)

    def _product(self, op: str, args: dict[str, Any], site: Site, rows: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
        """One round trip: `rows` (T, K) masked, computed by the server, verified and unmasked: (T, N)."""
        sizes = self.shield.sites[site][1]
        times = self.shield.times
        stall_before = times.stall_s  # masks made for this call, or waited for, inside `mask`: counted apart
        t0 = time.perf_counter()
        try:
            wire, state = _mask_per_group(self.shield, site, rows, groups) if groups is not None else self.shield.mask(site, rows)
            t1 = time.perf_counter()
            with self._as_integrity_failure():
                parts = self.remote.call(
                    op, {**args, **self.shield.wire_args()}, [wire], while_waiting=self._check_unchecked if self._unchecked else None
                ).tensors
        finally:
            self.settle()  # a check that failed meanwhile, first: what failed after it may be its consequence
        z = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if z.shape != (wire.shape[0], sum(sizes)):
            raise IntegrityError(integrity_message(site, "|".join(module_names(site)), f"shape {list(z.shape)}, expected {[wire.shape[0], sum(sizes)]}"))
        t2 = time.perf_counter()
        y = _unmask_per_group(self.shield, site, z, state, groups) if groups is not None else self.shield.unmask(site, z, state)
        t3 = time.perf_counter()
        if self.verify:
            self._unchecked.append((site, wire, z, state))
            if y is z:  # the result is the reply itself, which the caller may change in place: checked now
                self.settle()
        times.mask_s += (t1 - t0) - (times.stall_s - stall_before)
        times.unmask_s += t3 - t2
        return y

    @contextmanager
    def _as_integrity_failure(self) -> Iterator[None]:
        """Under verification a reply that is not what was asked (shape, dtype, NaN, ids) is a failed check like any wrong number."""
        try:
            yield
        except MalformedReply as e:
            if not self.verify:
                raise
            raise IntegrityError(f"integrity check failed: {e}; generation stopped") from None

    def close(self) -> None:
        self.shield.close()
        self.remote.close()


def _mask_per_group(shield: Shield, site: Site, rows: torch.Tensor, groups: Sequence[int]) -> tuple[torch.Tensor, list[Any]]:
    masked = [shield.mask(site, part) for part in rows.split(list(groups))]
    return torch.cat([wire for wire, _ in masked]), [state for _, state in masked]


def _unmask_per_group(shield: Shield, site: Site, z: torch.Tensor, states: list[Any], groups: Sequence[int]) -> torch.Tensor:
    return torch.cat([shield.unmask(site, part, state) for part, state in zip(z.split(list(groups)), states)])


def describe(shield: Shield) -> dict[str, Any]:
    """What a report says about a shield's configuration."""
    info: dict[str, Any] = {"shield": shield.name, "check": check_kind(shield)}
    if isinstance(shield, OtpShield):
        f = shield.field
        info.update(p=f.p, p_bits=f.p.bit_length(), limbs=f.limbs, limb_bits=f.limb_bits, weight_bits=f.weight_bits,
                    activation_bits=f.activation_bits, bound_bits=f.bound.bit_length(), rows_limited=f.rows_limited,
                    rows_coarsened=shield.rows_coarsened)  # fmt: skip
    if isinstance(shield, NoiseShield):
        info["noise_scale"] = shield.scale
    if shield.pool is not None:
        info["pool_peak_mib"] = shield.pool.peak_bytes / 2**20
    if (rows := shield.max_forward_rows()) is not None:
        info["max_forward_rows"] = rows
    return info


def check_kind(shield: Shield) -> str:
    """How a shield's results are checked, in words a report can show."""
    if isinstance(shield, OtpShield):
        return "exact (Freivalds mod 2^64 on fixed-point integers)" if shield.checks is not None else "none"
    if shield.freivalds is not None:
        return f"float fault detector, not a defence (errors inside the {shield.server_dtype} rounding tolerance pass)"
    return "none"
