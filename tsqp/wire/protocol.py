"""The tsqp wire protocol: one module, used by client and server alike.

Transport: ZeroMQ, client DEALER, server ROUTER; `tcp://` or `ipc://` endpoints.

A message (request or reply) is a multipart ZeroMQ message:

    frame 0      header, msgpack map:
                   v        [major, minor]      protocol version
                   op       str                 request op, or "REPLY"
                   id       int                 request id, echoed by the reply
                   ok       bool                replies only: false means `error` says why
                   error    str | None          replies only
                   args     map                 op arguments (small values only)
                   tensors  [[dtype, shape]]    one entry per following frame
    frame 1..n   the raw bytes of each tensor, C order, sent and received without copies

A LINEAR request names one call group (q|k|v, o, gate|up, down); its reply is one tensor, the
modules' outputs side by side in the order asked (protocol 2: one frame to encode, copy, decode and
check per call, not one per module). HELLO's reply gives each module's width for splitting it.

Protocol 2.1: a hot call and its successful reply may carry a fixed binary header instead of the
msgpack one (`encode_compact`, below); `decode` takes either.

Never pickle: a pickle from an untrusted peer is remote code execution. Everything
read from the wire is validated in `decode`, in a fixed order, and a violation raises
`ProtocolError` naming the field.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from tsqp.errors import ProtocolError
from tsqp.wire.endpoints import frame_buffer

VERSION = (2, 1)  # 2: a LINEAR reply is one tensor, the modules' outputs side by side; 2.1: the compact header
VERSION_FIELD = list(VERSION)
OPS = ("HELLO", "EMBED", "LINEAR", "MATMUL", "LM_HEAD", "STATS", "HEALTH")
REPLY = "REPLY"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}

# Received frames are read-only buffers; tensors made on them are never written to.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class Limits:
    """What a peer accepts; anything larger is refused before it is allocated."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 8
    max_tensor_elements: int = 64 * 1024 * 1024
    max_message_bytes: int = 512 * 1024 * 1024
    max_request_flops: float = float("inf")  # a server's compute budget for one request


@dataclass
class Message:
    op: str
    id: int
    args: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)
    ok: bool = True
    error: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def request(op: str, id: int, args: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()) -> Message:
    return Message(op=op, id=id, args=args or {}, tensors=list(tensors))


def reply(id: int, args: dict[str, Any] | None = None, tensors: Sequence[torch.Tensor] = ()) -> Message:
    return Message(op=REPLY, id=id, args=args or {}, tensors=list(tensors))


def error_reply(id: int, error: str) -> Message:
    return Message(op=REPLY, id=id, ok=False, error=error)


def encode(msg: Message) -> list[Any]:
    """Message -> frames. Tensor frames are views of the tensors' memory (no copy)."""
    header: dict[str, Any] = {"v": VERSION_FIELD, "op": msg.op, "id": msg.id, "args": msg.args}
    if msg.op == REPLY:
        header.update(ok=msg.ok, error=msg.error)
    frames: list[Any] = [None]
    specs = []
    for t in msg.tensors:
        name = DTYPE_NAMES.get(t.dtype)
        if name is None:
            raise ProtocolError(f"dtype {t.dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
        if t.requires_grad:
            # The byte view below would silently drop autograd; fail as `.numpy()` does,
            # so a forward that forgot `no_grad` is caught here (see `tsqp check-grad`).
            raise RuntimeError("Can't call numpy() on Tensor that requires grad: run the forward under torch.no_grad()")
        specs.append([name, list(t.shape)])
        frames.append(tensor_bytes(t))
    header["tensors"] = specs
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def tensor_bytes(t: torch.Tensor) -> Any:
    """A tensor's bytes as a numpy array on its memory: one call on the decode path's hot tensors,
    where each torch op of a detach/contiguous/reshape/view chain costs per frame."""
    if not t.is_contiguous():
        t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).detach().numpy()  # numpy has no bfloat16


def decode(frames: Sequence[Any], limits: Limits = Limits(), expect_reply: bool = False) -> Message:
    """Frames -> Message, validating version, frame count, op, dtypes, shapes and sizes."""
    if not frames:
        raise ProtocolError("empty message: no header frame")
    raw = frame_buffer(frames[0])
    if is_compact(raw):
        return _decode_compact(raw, frames, limits, expect_reply)
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError(f"header is {len(raw)} bytes, limit {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"header is not valid msgpack: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    version = header.get("v")
    if not isinstance(version, list) or len(version) != 2 or version[0] != VERSION[0]:
        raise ProtocolError(f"protocol version {version!r} not supported; this side speaks {VERSION[0]}.x")
    msg_id = header.get("id")
    if not isinstance(msg_id, int) or isinstance(msg_id, bool):
        raise ProtocolError(f"field 'id' must be an integer, got {msg_id!r}")
    op = header.get("op")
    allowed = (REPLY,) if expect_reply else OPS
    if op not in allowed:
        raise ProtocolError(f"unknown op {op!r}; expected one of {', '.join(allowed)}")
    args = header.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("field 'args' must be a map")
    specs = header.get("tensors", [])
    if not isinstance(specs, list):
        raise ProtocolError("field 'tensors' must be a list")
    if len(specs) > limits.max_tensors:
        raise ProtocolError(f"{len(specs)} tensors, limit {limits.max_tensors}")
    if len(frames) != len(specs) + 1:
        raise ProtocolError(f"header declares {len(specs)} tensors but {len(frames) - 1} tensor frames arrived")
    tensors = []
    total = len(raw)
    for i, (spec, frame) in enumerate(zip(specs, frames[1:])):
        tensor = _tensor(i, spec, frame_buffer(frame), limits)
        total += tensor.numel() * tensor.element_size()
        if total > limits.max_message_bytes:
            raise ProtocolError(f"message exceeds {limits.max_message_bytes} bytes")
        tensors.append(tensor)
    msg = Message(op=op, id=msg_id, args=args, tensors=tensors)
    if expect_reply:
        msg.ok = header.get("ok") is True
        msg.error = str(header.get("error")) if not msg.ok else None
    return msg


def _tensor(i: int, spec: Any, buf: memoryview, limits: Limits) -> torch.Tensor:
    if type(spec) is not list or len(spec) != 2 or type(spec[1]) is not list:
        raise ProtocolError(f"tensors[{i}] must be [dtype, shape]")
    name, shape = spec
    dtype = DTYPES.get(name) if type(name) is str else None
    if dtype is None:
        raise ProtocolError(f"tensors[{i}] dtype {name!r} not allowed; allowed: {', '.join(DTYPES)}")
    if len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):  # `type is int`: no bools
        raise ProtocolError(f"tensors[{i}] shape {shape!r} must be at most 8 non-negative integers")
    numel = math.prod(shape)
    # Zero dims must not hide absurd others ([0, 2**63] would overflow torch.empty).
    if numel > limits.max_tensor_elements or (numel == 0 and math.prod(max(d, 1) for d in shape) > limits.max_tensor_elements):
        raise ProtocolError(f"tensors[{i}] shape {shape} exceeds the limit of {limits.max_tensor_elements} elements")
    expected = numel * dtype.itemsize
    if buf.nbytes != expected:
        raise ProtocolError(f"tensors[{i}] shape {shape} {name} needs {expected} bytes, frame has {buf.nbytes}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=dtype)
    return flat if len(shape) == 1 else flat.view(shape)


# --- the compact header (2.1) --------------------------------------------------------------------
#
# The hot calls (EMBED, LINEAR, LM_HEAD, one tensor each) and their successful replies are nearly all
# of a generation's messages. Their header may be this fixed struct instead of msgpack: it says exactly
# what the msgpack header says for them, and decodes into the same `Message`, its tensor checked by the
# same `_tensor` against the same `Limits`, so what a server accepts, refuses and answers does not
# change. It begins with 0xC1, a byte msgpack never uses: `decode` tells the two apart by it.
#
#   u8 0xC1, u8 major version, u8 op (COMPACT_OPS), u8 flags, u8 dtype (DTYPES' order), u8 ndim, 2 zero bytes,
#   i64 id, i64 layer, i64 p, i64 limb_bits, i64 weight_bits, i64 shape[8], f64 compute_s,
#   32 bytes: the modules' names joined by "|", ASCII, zero-padded
#
# A field its flags do not set is zero. Shape entries past ndim are zero.

COMPACT_MAGIC = 0xC1
COMPACT = struct.Struct("<BBBBBBxx5q8qd32s")
COMPACT_ID, COMPACT_COMPUTE = 8, 112  # offsets of the id (i64) and compute_s (f64)
_ID_FIELD, _COMPUTE_FIELD = struct.Struct("<q"), struct.Struct("<d")
COMPACT_OPS = ("EMBED", "LINEAR", "LM_HEAD", REPLY)  # codes 1..4
HAS_MODULES, HAS_FIELD, HAS_COMPUTE = 1, 2, 4  # flags: args layer+modules; p, limb_bits, weight_bits; compute_s
FIELD_ARGS = ("p", "limb_bits", "weight_bits")
_DTYPE_CODES = {dt: i for i, dt in enumerate(DTYPES.values())}
_DTYPE_BY_CODE = list(DTYPES)
_I64 = range(-(1 << 63), 1 << 63)


def encode_compact(msg: Message) -> list[Any] | None:
    """`encode`'s frames with the compact header, or None where it cannot say all of `msg` (then use `encode`)."""
    if msg.op not in COMPACT_OPS or len(msg.tensors) != 1 or not msg.ok:
        return None
    t = msg.tensors[0]
    code = _DTYPE_CODES.get(t.dtype)
    if code is None or t.dim() > 8 or t.requires_grad or type(msg.id) is not int or msg.id not in _I64:
        return None
    args = msg.args
    flags, layer, names, field, compute = 0, 0, b"", (0, 0, 0), 0.0
    n_args = 0
    if "modules" in args or "layer" in args:
        layer, names = args.get("layer"), _joined_names(args.get("modules"))
        if type(layer) is not int or layer not in _I64 or names is None:
            return None
        flags, n_args = flags | HAS_MODULES, n_args + 2
    if "p" in args:
        field = tuple(args.get(name) for name in FIELD_ARGS)
        if not all(type(v) is int and v in _I64 and v != 0 for v in field):
            return None
        flags, n_args = flags | HAS_FIELD, n_args + 3
    if "compute_s" in args:
        compute = args["compute_s"]
        if type(compute) is not float:
            return None
        flags, n_args = flags | HAS_COMPUTE, n_args + 1
    if n_args != len(args):
        return None  # an argument the compact header has no field for
    shape = (*t.shape, *(0,) * (8 - t.dim()))
    header = COMPACT.pack(COMPACT_MAGIC, VERSION[0], COMPACT_OPS.index(msg.op) + 1, flags, code, t.dim(), msg.id, layer, *field, *shape, compute, names)
    return [header, tensor_bytes(t)]


def is_compact(header: Any) -> bool:
    """Whether a header frame is (meant to be) the compact one: its first byte says so."""
    raw = frame_buffer(header)
    return raw.nbytes > 0 and raw[0] == COMPACT_MAGIC


def compact_id(header: Any) -> int:
    """The id field of a header of `COMPACT.size` bytes."""
    return int(_ID_FIELD.unpack_from(header, COMPACT_ID)[0])


def compact_compute_s(header: Any) -> float:
    """The compute_s field of a header of `COMPACT.size` bytes."""
    return float(_COMPUTE_FIELD.unpack_from(header, COMPACT_COMPUTE)[0])


def stamp_id(buffer: Any, header_at: int, msg_id: int) -> None:
    """Write `msg_id` into the compact header at `header_at` of a writable buffer."""
    _ID_FIELD.pack_into(buffer, header_at + COMPACT_ID, msg_id)


def stamped(header: bytes, msg_id: int, compute_s: float) -> bytearray:
    """A copy of a compact header with this id and compute_s: a known reply's, made without encoding."""
    out = bytearray(header)
    _ID_FIELD.pack_into(out, COMPACT_ID, msg_id)
    _COMPUTE_FIELD.pack_into(out, COMPACT_COMPUTE, compute_s)
    return out


def _joined_names(modules: Any) -> bytes | None:
    """Module names as the compact header holds them, or None where it cannot."""
    if type(modules) not in (list, tuple) or not modules or not all(type(m) is str and m.isascii() and "|" not in m for m in modules):
        return None
    names = "|".join(modules).encode()
    return names if len(names) <= 32 else None


def _decode_compact(raw: memoryview, frames: Sequence[Any], limits: Limits, expect_reply: bool) -> Message:
    if raw.nbytes != COMPACT.size:
        raise ProtocolError(f"header is not msgpack, nor a compact header ({raw.nbytes} bytes, not {COMPACT.size})")
    _, major, op_code, flags, dtype_code, ndim, msg_id, layer, p, limb_bits, weight_bits, *rest = COMPACT.unpack(raw)
    shape, compute, names = rest[:8], rest[8], rest[9]
    if major != VERSION[0]:
        raise ProtocolError(f"protocol version {major} not supported; this side speaks {VERSION[0]}.x")
    op = COMPACT_OPS[op_code - 1] if 1 <= op_code <= len(COMPACT_OPS) else None
    if op is None or (op == REPLY) != expect_reply:
        raise ProtocolError(f"unknown op code {op_code} in a compact header")
    if flags & ~(HAS_MODULES | HAS_FIELD | HAS_COMPUTE):
        raise ProtocolError(f"unknown flags {flags:#x} in a compact header")
    if dtype_code >= len(_DTYPE_BY_CODE):
        raise ProtocolError(f"unknown dtype code {dtype_code} in a compact header")
    if ndim > 8 or any(shape[ndim:]):
        raise ProtocolError(f"compact header's shape has {ndim} dimensions and values past them")
    args: dict[str, Any] = {}
    if flags & HAS_MODULES:
        args["layer"], args["modules"] = layer, _module_names(names)
    elif layer or names.strip(b"\0"):
        raise ProtocolError("compact header sets layer or modules without their flag")
    if flags & HAS_FIELD:
        args.update(p=p, limb_bits=limb_bits, weight_bits=weight_bits)
    elif p or limb_bits or weight_bits:
        raise ProtocolError("compact header sets p, limb_bits or weight_bits without their flag")
    if flags & HAS_COMPUTE:
        args["compute_s"] = compute
    elif compute:
        raise ProtocolError("compact header sets compute_s without its flag")
    if len(frames) != 2:
        raise ProtocolError(f"a compact header declares 1 tensor but {len(frames) - 1} tensor frames arrived")
    tensor = _tensor(0, [_DTYPE_BY_CODE[dtype_code], list(shape[:ndim])], frame_buffer(frames[1]), limits)
    if raw.nbytes + tensor.numel() * tensor.element_size() > limits.max_message_bytes:
        raise ProtocolError(f"message exceeds {limits.max_message_bytes} bytes")
    return Message(op=op, id=msg_id, args=args, tensors=[tensor])


def _module_names(field: bytes) -> list[str]:
    text, _, padding = field.partition(b"\0")
    if padding.strip(b"\0") or not text:
        raise ProtocolError("compact header's module names must be one zero-padded string")
    try:
        return text.decode("ascii").split("|")
    except UnicodeDecodeError:
        raise ProtocolError("compact header's module names must be ASCII") from None
