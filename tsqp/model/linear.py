"""The model's linear algebra: the part tsqp outsources to the accelerator.

`LinearWeights` holds the embedding, every attention/MLP projection and the lm_head,
pre-transposed to (in, out) so that a product is `x @ W` over contiguous rows (faster to
read than `F.linear`'s layout on CPU; docs/benchmarks.md), with the projections that take
the same input fused into one matrix (q|k|v, gate|up) so one call computes all of them.

The server serves exactly this object, and it is itself a `LinearBackend`: used in-process
it is the all-in-TEE baseline. There is no other place where these products are computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from tsqp.errors import ProtocolError
from tsqp.model import fixedpoint
from tsqp.model.pages import FilePages

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules that read the same input and therefore travel together in one LINEAR call.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
CALL_GROUPS = FUSED_GROUPS + (("o_proj",), ("down_proj",))
FORWARD_ORDER = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))  # a layer's calls, in turn
WARM_BLOCK_BYTES = 64 << 10  # read per step of `warm`, the most it delays a request: 256 KiB cost ~5 µs of wire a call (docs/benchmarks.md)
WARM_MAX_BYTES = 16 << 20  # a matrix larger than half a server CPU's last-level cache is not worth warming


GroupKey = tuple[int, tuple[str, ...]]
# The largest matrix a one-row product always reads through numpy (one thread). Larger ones go to
# torch's threads where that is measured faster on this machine (`threads_win_one_row`): on one 2-vCPU
# VM, 576x1536 numpy 224 µs / torch 175, 2048x3072 1561 / 929; on another (2026-12-01, same image)
# numpy won at every SmolLM2 site, lm_head 4260 / 4608 µs.
NUMPY_MAX_WEIGHTS = 3 << 18


def all_within(values: torch.Tensor | np.ndarray, stop: int) -> bool:
    """Whether every value lies in [0, stop) (none: True): a request's token ids, or otp's residues mod p."""
    return math.prod(values.shape) == 0 or (int(values.min()) >= 0 and int(values.max()) < stop)


def site_parts(weights: Mapping[str, torch.Tensor], n_layers: int) -> Iterator[tuple[GroupKey | str, list[torch.Tensor], list[int]]]:
    """Every product a forward pass makes, as the model holds its matrices: (key, [W_i (N_i, K)], [N_i]),
    each call group of every layer, then ("lm_head", [W (V, D)], [V])."""
    for layer in range(n_layers):
        for group in CALL_GROUPS:
            mats = [weights[f"layers.{layer}.{name}"] for name in group]
            yield (layer, group), mats, [m.shape[0] for m in mats]
    yield "lm_head", [weights["lm_head"]], [weights["lm_head"].shape[0]]


def product_sites(weights: Mapping[str, torch.Tensor], n_layers: int) -> Iterator[tuple[GroupKey | str, torch.Tensor, list[int]]]:
    """`site_parts` with each site's matrices as one pre-transposed W_t (K, sum N_i)."""
    for key, mats, sizes in site_parts(weights, n_layers):
        yield key, (torch.cat(mats, dim=0) if len(mats) > 1 else mats[0]).t(), sizes


def fused_groups(weights: Mapping[str, torch.Tensor], n_layers: int) -> Iterator[tuple[GroupKey, torch.Tensor, list[int]]]:
    """`product_sites` of the layers' call groups, the lm_head left out."""
    for key, w_t, sizes in product_sites(weights, n_layers):
        if key != "lm_head":
            yield key, w_t, sizes  # type: ignore[misc]


def output_widths(weights: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """What each product returns per row: module name (the same in every layer), "embed" and "lm_head" -> width."""
    widths = {name: weights[f"layers.0.{name}"].shape[0] for name in MODULES}
    return {**widths, "embed": weights["embed"].shape[1], "lm_head": weights["lm_head"].shape[0]}


def max_reply_bytes(weights: Mapping[str, torch.Tensor], max_rows: int) -> int:
    """The largest reply frame an honest server sends for calls of up to `max_rows` rows (8-byte values, otp's
    int64), plus room for the header. Logits come back one row per sequence in generation."""
    widths = output_widths(weights)
    return max_rows * max(w for name, w in widths.items() if name != "lm_head") * 8 + max(widths["lm_head"] * 8 * 64, 1 << 20)


def threads_win_one_row(w_t: torch.Tensor, rounds: int = 3) -> bool:
    """Whether a one-row product with `w_t` (K, N) takes less time on torch's threads than on numpy's one
    (best of `rounds`, the two alternating)."""
    x = torch.zeros(1, w_t.shape[0], dtype=w_t.dtype)
    x_np, w_np = x.detach().numpy(), w_t.detach().numpy()
    best = {True: math.inf, False: math.inf}
    for _ in range(rounds):
        for threads in (True, False):
            started = time.perf_counter()
            if threads:
                x @ w_t
            else:
                x_np @ w_np
            best[threads] = min(best[threads], time.perf_counter() - started)
    return best[True] < best[False]


def split_modules(y: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """A fused product (..., sum N_i) -> one (..., N_i) view per module."""
    return list(y.split(list(sizes), dim=-1)) if len(sizes) > 1 else [y]


class LinearWeights:
    """Embedding, projections and lm_head of one model, ready for products on one device."""

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        n_layers: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        shares_cores: bool = False,
    ) -> None:
        """`shares_cores`: a busy peer on this host takes the other cores (a server beside its runner), so
        one-row products keep to one thread; otherwise large ones use torch's threads (all-in-TEE `local`)."""
        self.n_layers = n_layers
        self.shares_cores = shares_cores
        self.device = torch.device(device)
        self.dtype = dtype
        self._numpy_ok = self.device.type == "cpu" and dtype == torch.float32
        self._threads_win: bool | None = None  # measured at the first large one-row product (`_one_row_on_numpy`)
        self.embedding = weights["embed"].to(device=self.device, dtype=dtype).contiguous()  # (V, D)
        self.lm_head_t = weights["lm_head"].to(device=self.device, dtype=dtype).t().contiguous()  # (D, V)
        # (layer, modules) -> (W_t (K, sum N), output sizes)
        self._groups = {key: (w_t.to(device=self.device, dtype=dtype).contiguous(), sizes) for key, w_t, sizes in fused_groups(weights, n_layers)}
        self.widest_out = max(sum(sizes) for _, sizes in self._groups.values())

    def check_linear(self, layer: int, modules: Sequence[str]) -> GroupKey:
        """Validate a (layer, modules) request; returns the fused group key."""
        key = (layer, tuple(modules))
        if key in self._groups and type(layer) is int:  # `type is int`: True is not layer 1
            return key
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise ProtocolError(f"layer index {layer!r} out of range 0..{self.n_layers - 1}")
        unknown = [m for m in modules if m not in MODULES]
        if unknown:
            raise ProtocolError(f"unknown module {unknown[0]!r}; known: {', '.join(MODULES)}")
        groups = [list(g) for g in CALL_GROUPS]
        raise ProtocolError(f"modules {list(modules)} are not one call group; use one of {groups}")

    def sites(self) -> Iterator[tuple[GroupKey | str, torch.Tensor, list[int]]]:
        """`product_sites` of these copies: every fused W_t (K, sum N_i), then the lm_head's."""
        for key, (w_t, sizes) in self._groups.items():
            yield key, w_t, sizes
        yield "lm_head", self.lm_head_t, [self.lm_head_t.shape[1]]

    def out_features(self, key: GroupKey) -> int:
        """Total outputs of a checked group."""
        return sum(self._groups[key][1])

    def in_features(self, key: GroupKey) -> int:
        """The input width of a checked group."""
        return self._groups[key][0].shape[0]

    def linear(self, layer: int, modules: Sequence[str], x: torch.Tensor, groups: Sequence[int] | None = None) -> list[torch.Tensor]:
        """x (..., K) -> one (..., N_i) tensor per module, from a single fused product (rows are independent: `groups` changes nothing)."""
        key = self.check_linear(layer, modules)
        return split_modules(self.group_product(key, x), self._groups[key][1])

    def group_product(self, key: GroupKey, x: torch.Tensor) -> torch.Tensor:
        """The fused product for a key `check_linear` returned: x (..., K) -> (..., sum N_i), the modules side by side."""
        fused, _ = self._groups[key]
        if x.shape[-1] != fused.shape[0]:
            raise ProtocolError(f"input has {x.shape[-1]} features, {key[1][0]} of layer {key[0]} expects {fused.shape[0]}")
        return self._product(x, fused)

    def _product(self, x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self._on_numpy(x.numel(), w_t):
            return torch.from_numpy(x.detach().numpy() @ w_t.detach().numpy())
        return x.to(self.device, self.dtype) @ w_t

    def product_into(self, site: GroupKey | str, x: np.ndarray, out: np.ndarray) -> None:
        """The product `group_product` (or `lm_head`) gives for float32 rows `x` (rows, K) of CPU float32 weights,
        written into `out` (rows, N): the same kernel, so the same bits (the server's fast lane)."""
        kernel = self.one_row_kernel(site, x.size)
        if kernel is not None:
            np.matmul(x, kernel, out=out)
        else:
            torch.matmul(torch.from_numpy(x), self._site_weight_t(site), out=torch.from_numpy(out))

    def staged_product(self, site: GroupKey | str, rows: int) -> StagedProduct:
        """`rows` float32 rows' product at `site` on weights that are not a CPU's float32, with its buffers made now."""
        return StagedProduct(self._site_weight_t(site), rows)

    def one_row_kernel(self, site: GroupKey | str, elements: int) -> np.ndarray | None:
        """The weight (K, N) that `product_into` multiplies an input of `elements` floats by through numpy, or None where
        it goes through torch (the server's fast lane calls numpy's matmul with it directly: the same kernel, the same bits)."""
        w_t = self._site_weight_t(site)
        return w_t.detach().numpy() if self._on_numpy(elements, w_t) else None

    def _site_weight_t(self, site: GroupKey | str) -> torch.Tensor:
        """A call group's fused weight (K, N), or lm_head's."""
        return self.lm_head_t if site == "lm_head" else self._groups[site][0]  # type: ignore[index]

    def _on_numpy(self, elements: int, w_t: torch.Tensor) -> bool:
        """Whether a product of an input of `elements` floats goes through numpy: one decode row on CPU, where numpy's
        BLAS call skips torch's dispatch, the larger cost of a small product (from 2 rows torch's kernel is the faster)."""
        return self._numpy_ok and elements == w_t.shape[0] and self._one_row_on_numpy(w_t)

    def _one_row_on_numpy(self, w_t: torch.Tensor) -> bool:
        """Whether a one-row product with `w_t` goes through numpy's one thread. A large one reads its matrix
        at the memory's speed, and whether torch's threads (one per core) read it faster depends on the
        machine (two vCPUs may share one core's bandwidth): measured once, on the largest matrix. A process
        sharing its cores with a busy peer (a server beside its runner) keeps to one thread."""
        if self.shares_cores or w_t.numel() <= NUMPY_MAX_WEIGHTS:
            return True
        if self._threads_win is None:
            self._threads_win = threads_win_one_row(self.lm_head_t)
        return not self._threads_win

    def next_site(self, site: GroupKey | str) -> GroupKey | None:
        """The call group a forward pass calls after `site` ("embed" or "lm_head": the first layer's first); None
        after the last layer's (the lm_head follows)."""
        if site in ("embed", "lm_head"):
            return (0, FORWARD_ORDER[0])
        layer, modules = site  # type: ignore[misc]
        i = FORWARD_ORDER.index(modules) + 1
        if i < len(FORWARD_ORDER):
            return (layer, FORWARD_ORDER[i])
        return (layer + 1, FORWARD_ORDER[0]) if layer + 1 < self.n_layers else None

    @property
    def cpu_float32(self) -> bool:
        """Whether the weights are float32 on a CPU (what `warm` reads, and the fast lane answers from)."""
        return self._numpy_ok

    def group_bytes(self, key: GroupKey) -> int:
        """The bytes of a checked group's fused matrix."""
        return self._groups[key][0].nbytes

    def warm(self, key: GroupKey) -> Iterator[None]:
        """Read `key`'s matrix into the CPU's caches a block at a time, yielding after each block, so that its
        product, when it comes, reads from cache instead of memory: for a server's idle moments, between a
        reply and the next request. A one-row product over each block of rows (the fastest way found to read
        them: 32 GB/s against a sum's 19 on one 2-core VM; docs/benchmarks.md). CPU float32 weights only."""
        w_t = self._groups[key][0]
        if not self.cpu_float32 or w_t.nbytes > WARM_MAX_BYTES:
            return
        w = w_t.detach().numpy()
        rows = max(1, WARM_BLOCK_BYTES // (w.shape[1] * w.itemsize))
        zeros = np.zeros((1, rows), dtype=w.dtype)
        for start in range(0, w.shape[0], rows):
            block = w[start : start + rows]
            zeros[:, : block.shape[0]] @ block
            yield

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.embedding.shape[0]
        if not all_within(token_ids, vocab):
            raise ProtocolError(f"token id out of range 0..{vocab - 1}")
        return self.embedding[token_ids.to(self.device)]

    def lm_head(self, x: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
        if x.shape[-1] != self.lm_head_t.shape[0]:
            raise ProtocolError(f"lm_head input has {x.shape[-1]} features, expects {self.lm_head_t.shape[0]}")
        return self._product(x, self.lm_head_t)

    @staticmethod
    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
            raise ProtocolError(f"matmul shapes {list(a.shape)} @ {list(b.shape)} do not compose")
        return a @ b


class StagedProduct:
    """A product of float32 rows (rows, K) with one site's weights (K, N) on a device or in a dtype other than a CPU's
    float32, its buffers made once: input and result on the device, and on CUDA pinned host copies of both. A call then
    allocates nothing, copies each way without blocking on the current stream and waits once, for the result. The
    kernel and casts are `group_product`'s and the generic path's (`Handlers.out`): the same bits."""

    def __init__(self, w_t: torch.Tensor, rows: int) -> None:
        self.w_t = w_t
        self.x_dev = torch.empty(rows, w_t.shape[0], dtype=w_t.dtype, device=w_t.device)
        self.y_dev = torch.empty(rows, w_t.shape[1], dtype=w_t.dtype, device=w_t.device)
        cuda = w_t.device.type == "cuda"
        self.x_host = torch.empty(rows, w_t.shape[0], pin_memory=True) if cuda else None
        self.y_host = torch.empty(rows, w_t.shape[1], pin_memory=True) if cuda else None

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        """x (rows, K) float32 -> out (rows, N) float32."""
        x_host = torch.from_numpy(x) if self.x_host is None else self.x_host.copy_(torch.from_numpy(x))
        self.x_dev.copy_(x_host, non_blocking=True)
        torch.matmul(self.x_dev, self.w_t, out=self.y_dev)
        if self.y_host is None:
            torch.from_numpy(out).copy_(self.y_dev)
            return
        self.y_host.copy_(self.y_dev, non_blocking=True)
        torch.cuda.current_stream(self.y_dev.device).synchronize()
        out[:] = self.y_host.detach().numpy()


IntegerMatrix = torch.Tensor | fixedpoint.DerivedIntegers | fixedpoint.Int8Digits  # W_q (K, N), however held


class QuantizedWeights:
    """The same matrices as integers, quantized per output row (`otp`): W_q (K, N) and its scales.

    The server's are stored, from the model's weights or from a float32 `LinearWeights` (the same
    numbers: its own copies), as `dtype`: int8 digits (`fixedpoint.Int8Digits`, a CPU's), or float64
    where memory allows, else float32 (exact either way, as they have at most 16 bits): with float32,
    a decode call's product runs on narrow float32 limbs, a prefill chunk's in float64 a block at a
    time (`fixedpoint.product_mod`).
    The TEE's (`dtype` None) are derived from the model's own matrices a block at a time when a
    product reads them, and never stored (`fixedpoint.DerivedIntegers`); `pages` hands back the file
    pages each read touched.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor] | LinearWeights, n_layers: int, bits: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float64, pages: FilePages | None = None) -> None:  # fmt: skip
        self.bits = bits
        self.groups: dict[GroupKey | str, tuple[IntegerMatrix, torch.Tensor, list[int]]] = {}  # -> (W_q_t, scale (1, N), sizes)
        self.l1 = 0
        if dtype is None:
            assert not isinstance(weights, LinearWeights), "the TEE derives W_q from the model's own matrices"
            for key, mats, sizes in site_parts(weights, n_layers):
                derived = fixedpoint.DerivedIntegers(mats, bits, pages)
                self.groups[key] = (derived, derived.scale.t(), sizes)
                self.l1 = max(self.l1, derived.l1)
            return
        sites = weights.sites() if isinstance(weights, LinearWeights) else product_sites(weights, n_layers)
        for key, w_t, sizes in sites:
            # Per output row of W (N, K), kept in that layout: W_q_t is its transposed view, which BLAS
            # reads as it is (a contiguous (K, N) copy would cost a second pass over the weights).
            # int8 digits are made from the integers held in int16 on the way (up to 16 bits, they fit).
            w_q, scale, l1 = fixedpoint.quantize_matrix(w_t.t(), bits, torch.int16 if dtype == torch.int8 else dtype, device)  # (N, K), scale (N, 1)
            self.groups[key] = (fixedpoint.Int8Digits(w_q) if dtype == torch.int8 else w_q.t(), scale.t(), sizes)
            self.l1 = max(self.l1, l1)

    @property
    def nbytes(self) -> int:
        """The bytes of W_q held: none when derived."""
        return sum(w_q.nbytes for w_q, _, _ in self.groups.values() if not isinstance(w_q, fixedpoint.DerivedIntegers))

    def check_exact(self, key: GroupKey | str, p: int, limb_bits: int) -> None:
        """ValueError unless products mod p with `limb_bits`-bit limbs are exact at `key`, however its W_q is held."""
        fixedpoint.check_product_exact(self.l1, p, limb_bits)
        w_q = self.groups[key][0]
        if isinstance(w_q, fixedpoint.Int8Digits):
            w_q.check(p)

    def product_mod(self, key: GroupKey | str, x: torch.Tensor, p: int, limb_bits: int) -> torch.Tensor:
        """x (T, K) int64 in [0, p) -> (T, sum N_i) int64, the modules side by side: x·W_qᵀ mod p, exactly."""
        w_q, _, _ = self.groups[key]
        if x.shape[-1] != w_q.shape[0]:
            raise ProtocolError(f"input has {x.shape[-1]} features, {key} expects {w_q.shape[0]}")
        return fixedpoint.product_mod(x, w_q, p, limb_bits, self.l1)
