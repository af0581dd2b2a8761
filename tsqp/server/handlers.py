"""The op table: one small handler per protocol op, each validating its request before computing.

`linear_group` and `float_linear` are the one place a LINEAR request is checked; batching uses them too.

Abuse is bounded before computing: every product's result size (`check_result`) and cost in
floating-point operations (`check_flops`) are checked against the limits, an empty inner
dimension (a result made of nothing) is refused, and a product larger than `CHUNK_FLOPS` is
computed in row chunks into one preallocated result, calling `between_chunks` after each, where
the server answers other clients' cheap requests (HEALTH within a chunk's time, not a product's).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from tsqp.errors import ProtocolError
from tsqp.model import fixedpoint
from tsqp.model.config import WEIGHT_BITS_RANGE
from tsqp.model.linear import CALL_GROUPS, GroupKey, LinearWeights, QuantizedWeights, all_within, output_widths
from tsqp.model.loading import LoadedModel
from tsqp.server.stats import ServerStats
from tsqp.wire import protocol
from tsqp.wire.protocol import Limits, Message

log = logging.getLogger("tsqp.server")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CHUNK_FLOPS = 2e9  # ~20-50 ms of a CPU core's products, well under 1 ms of a GPU's: the most one chunk may cost


class Handlers:
    """What the server computes, op by op, on its copy of the linear weights."""

    def __init__(self, model: LoadedModel, weights: LinearWeights, dtype_name: str, limits: Limits, stats: ServerStats) -> None:
        self.fingerprint, self.config, self.widths = model.fingerprint, model.config, output_widths(model.weights)
        # Where otp's integers come from. Float32 copies hold the model's own numbers, so the model's
        # weights need not stay in memory (the caller may drop them: a GiB per 250M weights).
        self._source: LinearWeights | dict[str, torch.Tensor] = weights if weights.dtype == torch.float32 else model.weights
        self.weights = weights
        self.dtype_name = dtype_name
        self.limits = limits
        self.stats = stats
        self.started = time.monotonic()
        self.quantized: QuantizedWeights | None = None  # built on the first otp request, for its weight width
        self.between_chunks: Callable[[], None] = lambda: None  # the server's hook: serve others between chunks
        # op -> (tensors it takes, handler)
        self.table: dict[str, tuple[int, Callable[[Message], Message]]] = {
            "HELLO": (0, self._hello),
            "EMBED": (1, self._embed),
            "LINEAR": (1, self._linear),
            "MATMUL": (2, self._matmul),
            "LM_HEAD": (1, self._lm_head),
            "STATS": (0, self._stats),
            "HEALTH": (0, self._health),
        }

    def __call__(self, msg: Message) -> Message:
        """The reply to a decoded request; raises `ProtocolError` for a request it refuses."""
        n_tensors, handler = self.table[msg.op]
        if len(msg.tensors) != n_tensors:
            raise ProtocolError(f"{msg.op} takes {n_tensors} tensor(s), got {len(msg.tensors)}")
        return handler(msg)

    def linear_group(self, msg: Message) -> GroupKey:
        """The checked (layer, modules) group of a LINEAR request."""
        modules = msg.args.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise ProtocolError("args.modules must be a list of module names")
        return self.weights.check_linear(msg.args.get("layer"), modules)

    def float_linear(self, msg: Message) -> tuple[GroupKey, torch.Tensor]:
        """A float LINEAR request's group and input, its result's size and cost within the limits."""
        key = self.linear_group(msg)
        x = float_input(msg.tensors[0])
        if x.shape[-1] != self.weights.in_features(key):
            raise ProtocolError(f"input has {x.shape[-1]} features, {key[1][0]} of layer {key[0]} expects {self.weights.in_features(key)}")
        rows, n = rows_of(x), self.weights.out_features(key)
        self.check_result(rows * n)
        self.check_flops(2.0 * rows * x.shape[-1] * n)
        return key, x

    def _hello(self, msg: Message) -> Message:
        theirs = msg.args.get("fingerprint")
        if theirs is not None and theirs != self.fingerprint:
            raise ProtocolError(f"model fingerprint {theirs} does not match the server's {self.fingerprint}")
        return protocol.reply(
            msg.id,
            {
                "protocol": list(protocol.VERSION),
                "fingerprint": self.fingerprint,
                "config": vars(self.config),
                "device": str(self.weights.device),
                "dtype": self.dtype_name,
                "ops": list(self.table),
                "call_groups": [list(g) for g in CALL_GROUPS],
                "widths": self.widths,  # how a client splits a fused LINEAR reply
                "limits": vars(self.limits),
            },
        )

    def _embed(self, msg: Message) -> Message:
        ids = msg.tensors[0]
        if ids.dtype != torch.int64:
            raise ProtocolError(f"token ids must be int64, got {protocol.DTYPE_NAMES[ids.dtype]}")
        self.check_result(ids.numel() * self.weights.embedding.shape[1])
        return protocol.reply(msg.id, tensors=[self.out(self.weights.embed(ids), torch.float32)])

    def _linear(self, msg: Message) -> Message:
        if msg.tensors[0].dtype == torch.int64:
            return self._product_mod(msg, self.linear_group(msg))
        key, x = self.float_linear(msg)
        flat = x.reshape(-1, x.shape[-1])
        (y,) = self.chunked(
            flat.shape[0], 2.0 * x.shape[-1] * self.weights.out_features(key), lambda chunk: [self.weights.group_product(key, rows(flat, chunk))]
        )
        return protocol.reply(msg.id, tensors=[self.out(y.view(*x.shape[:-1], y.shape[-1]), x.dtype)])

    def _matmul(self, msg: Message) -> Message:
        a, b = (float_input(t) for t in msg.tensors)
        if a.dim() < 2 or b.dim() < 2:
            raise ProtocolError("MATMUL operands must have at least 2 dimensions")
        if a.shape[-1] != b.shape[-2] or a.shape[-1] == 0:
            raise ProtocolError(f"MATMUL shapes {list(a.shape)} @ {list(b.shape)} do not compose (inner dimensions must be equal and non-zero)")
        try:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except RuntimeError:
            raise ProtocolError(f"MATMUL batch shapes {list(a.shape[:-2])} and {list(b.shape[:-2])} do not broadcast") from None
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        self.check_result(math.prod(batch) * m * n)
        self.check_flops(2.0 * math.prod(batch) * m * k * n)
        a, b = a.to(self.weights.device, self.weights.dtype), b.to(self.weights.device, self.weights.dtype)
        # In chunks of a's rows (the second-last axis), every batch at once.
        (y,) = self.chunked(m, 2.0 * math.prod(batch) * k * n, lambda rows: [self.weights.matmul(a[..., rows, :], b)], axis=-2)
        return protocol.reply(msg.id, tensors=[self.out(y, msg.tensors[0].dtype)])

    def _lm_head(self, msg: Message) -> Message:
        if msg.tensors[0].dtype == torch.int64:
            return self._product_mod(msg, "lm_head")
        x = float_input(msg.tensors[0])
        width, vocab = self.weights.lm_head_t.shape
        if x.shape[-1] != width:
            raise ProtocolError(f"lm_head input has {x.shape[-1]} features, expects {width}")
        self.check_result(rows_of(x) * vocab)
        self.check_flops(2.0 * rows_of(x) * x.shape[-1] * vocab)
        flat = x.reshape(-1, x.shape[-1])
        (y,) = self.chunked(flat.shape[0], 2.0 * x.shape[-1] * vocab, lambda chunk: [self.weights.lm_head(rows(flat, chunk))])
        return protocol.reply(msg.id, tensors=[self.out(y.view(*x.shape[:-1], vocab), x.dtype)])

    def _product_mod(self, msg: Message, key: GroupKey | str) -> Message:
        """`otp`: a masked integer input, an exact product mod p with the quantized weights."""
        p, limb_bits, bits = (msg.args.get(name) for name in ("p", "limb_bits", "weight_bits"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (p, limb_bits, bits)):
            raise ProtocolError("an int64 input (otp) needs integer args p, limb_bits and weight_bits")
        low, high = WEIGHT_BITS_RANGE
        if not low <= bits <= high:
            raise ProtocolError(f"weight_bits {bits} out of range {low}..{high}")
        x = msg.tensors[0]
        if x.dim() != 2:
            raise ProtocolError(f"an otp input must be (rows, features), got shape {list(x.shape)}")
        quantized = self.quantized_weights(bits)
        try:
            quantized.check_exact(key, p, limb_bits)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        w_q = quantized.groups[key][0]
        if x.shape[1] != w_q.shape[0]:
            raise ProtocolError(f"input has {x.shape[1]} features, {key} expects {w_q.shape[0]}")
        self.check_result(x.shape[0] * w_q.shape[1])
        flops_per_row = self.mod_flops_per_row(key, p, limb_bits)
        self.check_flops(x.shape[0] * flops_per_row)
        if not all_within(x, p):
            raise ProtocolError("otp input values must lie in [0, p)")
        # Chunked: the limbs' float64 temporaries stay a chunk's, not a multiple of the request's.
        (y,) = self.chunked(x.shape[0], flops_per_row, lambda chunk: [quantized.product_mod(key, rows(x, chunk), p, limb_bits)])
        return protocol.reply(msg.id, tensors=[y.cpu().contiguous()])

    def mod_flops_per_row(self, key: GroupKey | str, p: int, limb_bits: int) -> float:
        """What the limits count for one row of an otp product at `key`: one product per limb of p."""
        assert self.quantized is not None
        k, n = self.quantized.groups[key][0].shape
        return 2.0 * k * n * -(-p.bit_length() // max(limb_bits, 1))

    def quantized_weights(self, bits: int) -> QuantizedWeights:
        if self.quantized is None or self.quantized.bits != bits:
            self.quantized = None  # one width at a time: free the old copy first
            dtype = quantized_dtype(sum(w_t.numel() for _, w_t, _ in self.weights.sites()), self.weights.device)
            log.info("quantizing the weights to %d bits for otp requests, held in %s", bits, dtype)
            self.quantized = QuantizedWeights(self._source, self.config.n_layers, bits, self.weights.device, dtype)
        return self.quantized

    def _stats(self, msg: Message) -> Message:
        return protocol.reply(msg.id, self.stats.as_dict())

    def _health(self, msg: Message) -> Message:
        """Liveness: cheap, no tensors."""
        return protocol.reply(
            msg.id,
            {"status": "ok", "uptime_s": time.monotonic() - self.started, "requests": self.stats.requests, "fingerprint": self.fingerprint},
        )

    def chunked(self, n_rows: int, flops_per_row: float, compute: Callable[[slice], list[torch.Tensor]], axis: int = 0) -> list[torch.Tensor]:
        """`compute(slice(0, n_rows))`, in chunks of rows along `axis` costing at most `CHUNK_FLOPS` each,
        written into one preallocated result per output; `between_chunks` runs after every chunk but the last."""
        step = max(1, int(CHUNK_FLOPS // max(flops_per_row, 1.0)))
        if n_rows <= step:
            return compute(ALL_ROWS)
        outputs: list[torch.Tensor] = []
        for start in range(0, n_rows, step):
            parts = compute(slice(start, start + step))
            if not outputs:
                outputs = [part.new_empty(_with_rows(part.shape, axis, n_rows)) for part in parts]
            for out, part in zip(outputs, parts):
                out.narrow(axis, start, part.shape[axis]).copy_(part)
            if start + step < n_rows:
                self.between_chunks()
        return outputs

    def rough_flops(self, msg: Message) -> float:
        """An upper bound of a decoded request's cost, before any validation: what `between_chunks` may answer at once."""
        if msg.op not in ("LINEAR", "LM_HEAD", "MATMUL") or not msg.tensors or msg.tensors[0].dim() < 1:
            return 0.0
        x = msg.tensors[0]
        if msg.op == "MATMUL":
            b = msg.tensors[-1]
            return 2.0 * math.prod(x.shape) * (b.shape[-1] if b.dim() else 1) * max(math.prod(b.shape[:-2]), 1)
        widest = self.weights.lm_head_t.shape[1] if msg.op == "LM_HEAD" else self.weights.widest_out
        return 2.0 * math.prod(x.shape) * widest * (fixedpoint.MAX_LIMBS if x.dtype == torch.int64 else 1)

    def check_flops(self, flops: float) -> None:
        """Refuse before computing a request that would hold the accelerator longer than any honest one."""
        if flops > self.limits.max_request_flops:
            raise ProtocolError(f"the product would take {flops / 1e9:.3g} GFLOP, limit {self.limits.max_request_flops / 1e9:.3g}")

    def check_result(self, elements: int) -> None:
        """Refuse before computing: a small request can ask for a huge result (an outer product, logits)."""
        if elements > self.limits.max_tensor_elements:
            raise ProtocolError(f"the result would have {elements} elements, limit {self.limits.max_tensor_elements}")

    @staticmethod
    def out(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if y.dtype == dtype and not y.is_cuda:  # the common CPU case: no op at all (each costs µs per call)
            return y
        return y.to(dtype).cpu()


def quantized_dtype(n_weights: int, device: torch.device) -> torch.dtype:
    """How the server holds otp's W_q: on a CPU as int8 digits; on a GPU in float64 where that copy
    takes at most half the free memory, else in float32.

    All are exact. On a 2-core CPU, int8 digit products (`torch._int_mm`) took 68 against float64's
    143 ms for a decode row over every SmolLM2 site and 1232 against 1393 ms for a 128-row chunk, and
    hold a quarter of the bytes (docs/benchmarks.md; oneDNN's int8 products, used since where exact, are faster still). A float64 W_q computes a decode row on two limbs; on that CPU it
    was faster than float32's nine narrow ones (176 against 199 ms per SmolLM2 token), which halve the
    memory and read half the bytes, where a device has cores to spare. On CUDA, `_int_mm` has shape
    limits and is unmeasured here.
    """
    if device.type == "cpu":
        return torch.int8
    return torch.float64 if 8 * n_weights <= free_memory(device) // 2 else torch.float32


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's free memory, or the host's available memory (Linux), else unbounded."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62


ALL_ROWS = slice(None)  # `chunked`'s one chunk: every row, which `rows` leaves as it is


def rows(x: torch.Tensor, chunk: slice) -> torch.Tensor:
    """A chunk of x's rows; x itself for `ALL_ROWS` (indexing costs µs on a decode call's path)."""
    return x if chunk is ALL_ROWS else x[chunk]


def rows_of(x: torch.Tensor) -> int:
    """Rows of an activation (..., K): every position of every sequence."""
    return math.prod(x.shape[:-1])


def _with_rows(shape: torch.Size, axis: int, n_rows: int) -> list[int]:
    dims = list(shape)
    dims[axis] = n_rows
    return dims


def float_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in FLOAT_DTYPES:
        raise ProtocolError(f"activations must be floating point, got {protocol.DTYPE_NAMES[x.dtype]}")
    if x.dim() < 1:
        raise ProtocolError("activations must have at least one dimension")
    return x
