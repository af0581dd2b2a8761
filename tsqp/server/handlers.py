"""The op table: one small handler per protocol op, each validating its request before computing.

`linear_group` and `float_linear` are the one place a LINEAR request is checked; batching uses them too.
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
from tsqp.model.linear import CALL_GROUPS, GroupKey, LinearWeights, QuantizedWeights
from tsqp.model.loading import LoadedModel
from tsqp.server.stats import ServerStats
from tsqp.wire import protocol
from tsqp.wire.protocol import Limits, Message

log = logging.getLogger("tsqp.server")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Handlers:
    """What the server computes, op by op, on its copy of the linear weights."""

    def __init__(self, model: LoadedModel, weights: LinearWeights, dtype_name: str, limits: Limits, stats: ServerStats) -> None:
        self.model = model
        self.weights = weights
        self.dtype_name = dtype_name
        self.limits = limits
        self.stats = stats
        self.started = time.monotonic()
        self.quantized: QuantizedWeights | None = None  # built on the first otp request, for its weight width
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
        """A float LINEAR request's group and input, its result's size within the limits."""
        key = self.linear_group(msg)
        x = float_input(msg.tensors[0])
        self.check_result(x.numel() // max(x.shape[-1], 1) * self.weights.out_features(key))
        return key, x

    def _hello(self, msg: Message) -> Message:
        theirs = msg.args.get("fingerprint")
        if theirs is not None and theirs != self.model.fingerprint:
            raise ProtocolError(f"model fingerprint {theirs} does not match the server's {self.model.fingerprint}")
        return protocol.reply(
            msg.id,
            {
                "protocol": list(protocol.VERSION),
                "fingerprint": self.model.fingerprint,
                "config": vars(self.model.config),
                "device": str(self.weights.device),
                "dtype": self.dtype_name,
                "ops": list(self.table),
                "call_groups": [list(g) for g in CALL_GROUPS],
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
        outputs = self.weights.group_product(key, x)
        return protocol.reply(msg.id, tensors=[self.out(y, x.dtype) for y in outputs])

    def _matmul(self, msg: Message) -> Message:
        a, b = (float_input(t) for t in msg.tensors)
        if a.dim() < 2 or b.dim() < 2:
            raise ProtocolError("MATMUL operands must have at least 2 dimensions")
        try:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except RuntimeError:
            raise ProtocolError(f"MATMUL batch shapes {list(a.shape[:-2])} and {list(b.shape[:-2])} do not broadcast") from None
        self.check_result(math.prod(batch) * a.shape[-2] * b.shape[-1])
        y = self.weights.matmul(a.to(self.weights.device, self.weights.dtype), b.to(self.weights.device, self.weights.dtype))
        return protocol.reply(msg.id, tensors=[self.out(y, a.dtype)])

    def _lm_head(self, msg: Message) -> Message:
        if msg.tensors[0].dtype == torch.int64:
            return self._product_mod(msg, "lm_head")
        x = float_input(msg.tensors[0])
        self.check_result(x.numel() // max(x.shape[-1], 1) * self.weights.lm_head_t.shape[1])
        return protocol.reply(msg.id, tensors=[self.out(self.weights.lm_head(x), x.dtype)])

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
            fixedpoint.check_product_exact(quantized.l1, p, limb_bits)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        w_q = quantized.groups[key][0]
        self.check_result(x.shape[0] * w_q.shape[1])
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= p):
            raise ProtocolError("otp input values must lie in [0, p)")
        outputs = quantized.product_mod(key, x, p, limb_bits)
        return protocol.reply(msg.id, tensors=[y.cpu().contiguous() for y in outputs])

    def quantized_weights(self, bits: int) -> QuantizedWeights:
        if self.quantized is None or self.quantized.bits != bits:
            self.quantized = None  # one width at a time: free the old copy first
            log.info("quantizing the weights to %d bits for otp requests", bits)
            self.quantized = QuantizedWeights(self.model.weights, self.model.config.n_layers, bits, self.weights.device)
        return self.quantized

    def _stats(self, msg: Message) -> Message:
        return protocol.reply(msg.id, self.stats.as_dict())

    def _health(self, msg: Message) -> Message:
        """Liveness: cheap, no tensors."""
        return protocol.reply(
            msg.id,
            {"status": "ok", "uptime_s": time.monotonic() - self.started, "requests": self.stats.requests, "fingerprint": self.model.fingerprint},
        )

    def check_result(self, elements: int) -> None:
        """Refuse before computing: a small request can ask for a huge result (an outer product, logits)."""
        if elements > self.limits.max_tensor_elements:
            raise ProtocolError(f"the result would have {elements} elements, limit {self.limits.max_tensor_elements}")

    @staticmethod
    def out(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if y.dtype == dtype and not y.is_cuda:  # the common CPU case: no op at all (each costs µs per call)
            return y
        return y.to(dtype).cpu()


def float_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in FLOAT_DTYPES:
        raise ProtocolError(f"activations must be floating point, got {protocol.DTYPE_NAMES[x.dtype]}")
    if x.dim() < 1:
        raise ProtocolError("activations must have at least one dimension")
    return x
