"""Tests for tsqp.wire.protocol: encode/decode round trips, zero-copy frames, and validation."""

from __future__ import annotations

import inspect
import pickle

import msgpack
import numpy as np
import pytest
import torch

from tsqp.errors import ProtocolError
from tsqp.wire import protocol
from tsqp.wire.protocol import Limits, Message, decode, encode

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32]
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (0,), (4, 0), (2, 0, 3)]


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=dtype)


def header(**fields: object) -> bytes:
    base: dict[str, object] = {"v": list(protocol.VERSION), "op": "LINEAR", "id": 7, "args": {}, "tensors": []}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not _MISSING}, use_bin_type=True)


_MISSING = object()


def frame_address(frame: object) -> int:
    return np.frombuffer(memoryview(frame), dtype=np.uint8).ctypes.data


# --- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = make_tensor(dtype, shape)
    msg = protocol.request("LINEAR", 42, {"layer": 1, "modules": ["q_proj", "k_proj", "v_proj"]}, [t])
    frames = encode(msg)
    assert len(frames) == 2
    back = decode(frames)
    assert back.op == "LINEAR" and back.id == 42
    assert back.args == {"layer": 1, "modules": ["q_proj", "k_proj", "v_proj"]}
    assert len(back.tensors) == 1
    out = back.tensors[0]
    assert out.dtype == dtype
    assert tuple(out.shape) == shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_encoded_frames_are_views_of_the_tensor_memory(dtype: torch.dtype) -> None:
    t = make_tensor(dtype, (3, 4))
    frames = encode(protocol.request("LINEAR", 1, {}, [t]))
    frame = frames[1]
    assert isinstance(frame, np.ndarray)
    assert frame.nbytes == t.numel() * t.element_size()
    assert frame.ctypes.data == t.data_ptr()
    # and writes to the tensor are visible through the frame: really the same memory
    raw_before = bytes(frame)
    t.view(-1)[0] += 1
    assert bytes(frame) != raw_before


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_decoded_tensors_are_views_of_the_frames(dtype: torch.dtype) -> None:
    t = make_tensor(dtype, (2, 5))
    frames = encode(protocol.request("MATMUL", 1, {}, [t, t * 2]))
    back = decode(frames)
    for frame, out in zip(frames[1:], back.tensors):
        assert out.data_ptr() == frame_address(frame)
    # encode and decode both avoid copies, so the decoded tensor aliases the original
    assert back.tensors[0].data_ptr() == t.data_ptr()
    assert torch.equal(back.tensors[1], t * 2)


def test_decode_of_bytes_frames_is_zero_copy() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    frames = [bytes(f) if i == 0 else bytearray(memoryview(f)) for i, f in enumerate(encode(protocol.request("LM_HEAD", 3, {}, [t])))]
    back = decode(frames)
    assert back.tensors[0].data_ptr() == frame_address(frames[1])
    assert torch.equal(back.tensors[0], t)


def test_non_contiguous_tensor_round_trips() -> None:
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    assert not t.is_contiguous()
    back = decode(encode(protocol.request("LINEAR", 1, {}, [t])))
    assert torch.equal(back.tensors[0], t)


def test_reply_round_trip_keeps_ok_and_error() -> None:
    ok = decode(encode(protocol.reply(5, {"compute_s": 0.5}, [torch.ones(2)])), expect_reply=True)
    assert (ok.op, ok.id, ok.ok, ok.error, ok.args) == ("REPLY", 5, True, None, {"compute_s": 0.5})
    assert torch.equal(ok.tensors[0], torch.ones(2))
    bad = decode(encode(protocol.error_reply(6, "layer index 9 out of range")), expect_reply=True)
    assert (bad.id, bad.ok, bad.error, bad.tensors) == (6, False, "layer index 9 out of range", [])


def test_reply_is_refused_where_a_request_is_expected_and_vice_versa() -> None:
    with pytest.raises(ProtocolError, match="unknown op"):
        decode(encode(protocol.reply(1)))
    with pytest.raises(ProtocolError, match="unknown op"):
        decode(encode(protocol.request("HELLO", 1)), expect_reply=True)


def test_message_nbytes() -> None:
    msg = Message(op="MATMUL", id=1, tensors=[torch.zeros(3, 4), torch.zeros(5, dtype=torch.float16)])
    assert msg.nbytes == 3 * 4 * 4 + 5 * 2


def test_encode_refuses_dtypes_outside_the_allowed_set() -> None:
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode(protocol.request("EMBED", 1, {}, [torch.zeros(3, dtype=torch.uint8)]))
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode(protocol.request("LINEAR", 1, {}, [torch.zeros(3, dtype=torch.complex64)]))


# --- decode errors ---------------------------------------------------------------

ONE_FLOAT = np.zeros(1, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("frames", "limits", "keyword"),
    [
        pytest.param([], Limits(), "empty", id="no-frames"),
        pytest.param([b"\xc1garbage\xff\x00"], Limits(), "msgpack", id="header-not-msgpack"),
        pytest.param([b""], Limits(), "msgpack", id="header-empty-bytes"),
        pytest.param([msgpack.packb([1, 2, 3])], Limits(), "map", id="header-a-list"),
        pytest.param([msgpack.packb("LINEAR")], Limits(), "map", id="header-a-string"),
        pytest.param([header(v=[protocol.VERSION[0] + 1, 0])], Limits(), "version", id="next-major-version"),
        pytest.param([header(v=[1, 0])], Limits(), "version", id="major-version-1"),
        pytest.param([header(v=[0, 9])], Limits(), "version", id="major-version-0"),
        pytest.param([header(v=_MISSING)], Limits(), "version", id="version-missing"),
        pytest.param([header(v="1.0")], Limits(), "version", id="version-a-string"),
        pytest.param([header(id=_MISSING)], Limits(), "'id'", id="id-missing"),
        pytest.param([header(id=True)], Limits(), "'id'", id="id-bool"),
        pytest.param([header(id="7")], Limits(), "'id'", id="id-string"),
        pytest.param([header(id=1.5)], Limits(), "'id'", id="id-float"),
        pytest.param([header(op="FORMAT_DISK")], Limits(), "unknown op", id="unknown-op"),
        pytest.param([header(op=_MISSING)], Limits(), "unknown op", id="op-missing"),
        pytest.param([header(args=[1, 2])], Limits(), "args", id="args-not-map"),
        pytest.param([header(tensors="float32")], Limits(), "tensors", id="tensors-not-list"),
        pytest.param([header(tensors=[["float32", [1]]])], Limits(), "1 tensors but 0", id="declared-1-sent-0"),
        pytest.param([header(), ONE_FLOAT], Limits(), "0 tensors but 1", id="declared-0-sent-1"),
        pytest.param([header(tensors=[["float32", [1]], ["float32", [1]]]), ONE_FLOAT], Limits(), "2 tensors but 1", id="declared-2-sent-1"),
        pytest.param([header(tensors=[["float32", [1]]] * 3), ONE_FLOAT, ONE_FLOAT, ONE_FLOAT], Limits(max_tensors=2), "limit", id="too-many-tensors"),
        pytest.param([header(tensors=[["object", [1]]]), b"\0" * 8], Limits(), "not allowed", id="dtype-object"),
        pytest.param([header(tensors=[["uint8", [4]]]), b"\0" * 4], Limits(), "not allowed", id="dtype-uint8"),
        pytest.param([header(tensors=[["complex64", [1]]]), b"\0" * 8], Limits(), "not allowed", id="dtype-complex"),
        pytest.param([header(tensors=[[None, [1]]]), ONE_FLOAT], Limits(), "not allowed", id="dtype-none"),
        pytest.param([header(tensors=[["float32"]]), ONE_FLOAT], Limits(), "[dtype, shape]", id="spec-too-short"),
        pytest.param([header(tensors=[["float32", 4]]), b"\0" * 16], Limits(), "[dtype, shape]", id="shape-not-list"),
        pytest.param([header(tensors=[["float32", [-1]]]), ONE_FLOAT], Limits(), "non-negative", id="negative-dim"),
        pytest.param([header(tensors=[["float32", [2, -3]]]), b"\0" * 24], Limits(), "non-negative", id="negative-dim-2"),
        pytest.param([header(tensors=[["float32", [1.0]]]), ONE_FLOAT], Limits(), "non-negative", id="float-dim"),
        pytest.param([header(tensors=[["float32", [True]]]), ONE_FLOAT], Limits(), "non-negative", id="bool-dim"),
        pytest.param([header(tensors=[["float32", [1] * 9]]), ONE_FLOAT], Limits(), "at most 8", id="nine-dims"),
        pytest.param([header(tensors=[["float32", [2, 3]]]), b"\0" * 20], Limits(), "needs 24 bytes", id="bytes-short"),
        pytest.param([header(tensors=[["float32", [2, 3]]]), b"\0" * 28], Limits(), "needs 24 bytes", id="bytes-long"),
        pytest.param([header(tensors=[["float64", [3]]]), b"\0" * 12], Limits(), "needs 24 bytes", id="bytes-dtype-size"),
        pytest.param([header(tensors=[["float32", [0]]]), b"\0" * 4], Limits(), "needs 0 bytes", id="empty-with-bytes"),
        pytest.param([header(tensors=[["float32", [11]]]), b"\0" * 44], Limits(max_tensor_elements=10), "elements", id="too-many-elements"),
        pytest.param([header(tensors=[["float32", [2**31, 2**31]]]), b""], Limits(), "elements", id="huge-shape-tiny-frame"),
        pytest.param([header(args={"pad": "x" * 200})], Limits(max_header_bytes=128), "header is", id="header-too-big"),
        pytest.param(
            [header(tensors=[["float32", [16]], ["float32", [16]]]), b"\0" * 64, b"\0" * 64],
            Limits(max_message_bytes=150),
            "exceeds",
            id="message-too-big",
        ),
        pytest.param([header(tensors=[["float32", [64]]]), b"\0" * 256], Limits(max_message_bytes=200), "exceeds", id="message-too-big-one-tensor"),
    ],
)
def test_decode_rejects_with_a_named_problem(frames: list[bytes], limits: Limits, keyword: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    assert keyword.lower() in str(info.value).lower()


def test_limits_are_inclusive_bounds() -> None:
    # exactly at every limit is accepted
    h = header(tensors=[["float32", [10]]])
    limits = Limits(max_tensor_elements=10, max_message_bytes=len(h) + 40, max_header_bytes=len(h), max_tensors=1)
    msg = decode([h, b"\0" * 40], limits)
    assert msg.tensors[0].shape == (10,)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param([["float32"], [1]], id="dtype-a-list"),
        pytest.param([{"float32": 1}, [1]], id="dtype-a-map"),
    ],
)
def test_unhashable_dtype_name_is_a_protocol_error(spec: list[object]) -> None:
    # `name not in DTYPES` on a list/map raises TypeError: must be a ProtocolError,
    # since the server only turns ProtocolError into an error reply.
    with pytest.raises(ProtocolError, match="dtype"):
        decode([header(tensors=[spec]), ONE_FLOAT])


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param([0, 2**63], id="zero-times-2^63"),
        pytest.param([0, 2**40, 2**40], id="zero-times-2^80"),
        pytest.param([2**64 - 1, 0], id="uint64max-times-zero"),
    ],
)
def test_empty_tensor_with_absurd_dims_is_a_protocol_error(shape: list[int]) -> None:
    # numel is 0, so the element limit passes, but torch.empty(shape) overflows with a
    # TypeError/RuntimeError instead of a ProtocolError.
    with pytest.raises(ProtocolError):
        decode([header(tensors=[["float32", shape]]), b""])


def test_decode_accepts_zmq_frames_without_copying() -> None:
    zmq = pytest.importorskip("zmq")
    t = torch.arange(6, dtype=torch.float32)
    raw = encode(protocol.request("LM_HEAD", 9, {}, [t]))
    frames = [zmq.Frame(bytes(f)) if i == 0 else zmq.Frame(memoryview(f)) for i, f in enumerate(raw)]
    back = decode(frames)
    assert back.id == 9 and torch.equal(back.tensors[0], t)
    assert back.tensors[0].data_ptr() == frame_address(frames[1].buffer)


# --- grad ---------------------------------------------------------------------


def test_encoding_a_grad_tracking_tensor_raises_requires_grad() -> None:
    # The prototype's bug: an activation computed with grad on cannot go to the wire.
    weight = torch.nn.Parameter(torch.randn(8, 8))
    activation = torch.randn(1, 8) @ weight
    assert activation.requires_grad
    with pytest.raises(RuntimeError, match="requires grad"):
        encode(protocol.request("LINEAR", 0, {}, [activation]))


def test_encoding_a_grad_tracking_leaf_raises_requires_grad() -> None:
    with pytest.raises(RuntimeError, match="requires grad"):
        encode(protocol.request("LINEAR", 0, {}, [torch.randn(2, 8, requires_grad=True)]))


def test_same_computation_under_no_grad_encodes() -> None:
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(1, 8)
    with torch.no_grad():
        activation = x @ weight
    assert not activation.requires_grad
    back = decode(encode(protocol.request("LINEAR", 0, {}, [activation])))
    torch.testing.assert_close(back.tensors[0], x @ weight.detach())


def test_checkgrad_control_reproduces_the_original_failure() -> None:
    from tsqp.tools.checkgrad import control_error

    error = control_error()
    assert error is not None and "requires grad" in error


# --- no pickle ------------------------------------------------------------------

PICKLE_RAN: list[str] = []


def _record_pickle_execution(what: str) -> None:
    PICKLE_RAN.append(what)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record_pickle_execution, ("pwned",))


def test_header_is_msgpack() -> None:
    frames = encode(protocol.request("HELLO", 3, {"fingerprint": "abc"}))
    assert isinstance(frames[0], bytes)
    h = msgpack.unpackb(frames[0], raw=False)
    assert h == {"v": list(protocol.VERSION), "op": "HELLO", "id": 3, "args": {"fingerprint": "abc"}, "tensors": []}
    assert not frames[0].startswith(b"\x80")  # a pickle protocol >= 2 stream starts with PROTO


@pytest.mark.parametrize("proto", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_header_is_refused_and_never_run(proto: int) -> None:
    PICKLE_RAN.clear()
    evil = pickle.dumps({"v": list(protocol.VERSION), "op": "HELLO", "id": 1, "x": _Payload()}, protocol=proto)
    with pytest.raises(ProtocolError):
        decode([evil])
    with pytest.raises(ProtocolError):
        decode([evil], expect_reply=True)
    assert PICKLE_RAN == []


def test_protocol_module_does_not_use_pickle() -> None:
    source = inspect.getsource(protocol)
    assert "import pickle" not in source
    assert "torch.load" not in source
    assert "allow_pickle" not in source


# --- the compact header (protocol 2.1) ------------------------------------------------------

OTP = {"p": (1 << 31) - 1, "limb_bits": 8, "weight_bits": 12}
COMPACT_MESSAGES = [
    pytest.param(protocol.request("LINEAR", 7, {"layer": 3, "modules": ["q_proj", "k_proj", "v_proj"]}, [make_tensor(torch.float32, (1, 1, 64))]), id="linear"),
    pytest.param(protocol.request("LINEAR", 2**62, {"layer": -4, "modules": ["o_proj"]}, [make_tensor(torch.bfloat16, (2, 3, 4))]), id="linear-bf16"),
    pytest.param(protocol.request("LINEAR", 0, {**OTP, "layer": 0, "modules": ["gate_proj", "up_proj"]}, [make_tensor(torch.int64, (5, 7))]), id="otp"),
    pytest.param(protocol.request("EMBED", 1, {}, [make_tensor(torch.int64, (1, 1))]), id="embed"),
    pytest.param(protocol.request("LM_HEAD", -3, OTP, [make_tensor(torch.int64, (2, 9))]), id="lm-head-otp"),
    pytest.param(protocol.request("LM_HEAD", 3, {}, [make_tensor(torch.float64, (4, 0))]), id="empty"),
    pytest.param(protocol.reply(9, {"compute_s": 1.5e-4}, [make_tensor(torch.float32, (1, 1, 192))]), id="reply"),
    pytest.param(protocol.reply(9, {}, [make_tensor(torch.int32, (2, 3, 1, 1, 1, 1, 1, 2))]), id="reply-8-dims"),
]


def as_bytes(frames: list[object]) -> list[bytes]:
    return [bytes(memoryview(f)) for f in frames]  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", COMPACT_MESSAGES)
def test_a_compact_header_decodes_to_the_same_message_as_msgpack(msg: Message) -> None:
    frames = protocol.encode_compact(msg)
    assert frames is not None and bytes(frames[0])[0] == protocol.COMPACT_MAGIC and len(frames[0]) == protocol.COMPACT.size
    expect_reply = msg.op == protocol.REPLY
    compact, plain = decode(as_bytes(frames), expect_reply=expect_reply), decode(as_bytes(encode(msg)), expect_reply=expect_reply)
    assert (compact.op, compact.id, compact.args, compact.ok, compact.error) == (plain.op, plain.id, plain.args, plain.ok, plain.error)
    assert [(t.dtype, t.shape) for t in compact.tensors] == [(t.dtype, t.shape) for t in plain.tensors] == [(msg.tensors[0].dtype, msg.tensors[0].shape)]
    assert torch.equal(compact.tensors[0], msg.tensors[0])


@pytest.mark.parametrize(
    "msg",
    [
        pytest.param(protocol.request("HELLO", 1, {"transport": "shm"}), id="hello"),
        pytest.param(protocol.request("MATMUL", 1, {}, [torch.ones(2, 2), torch.ones(2, 2)]), id="two-tensors"),
        pytest.param(protocol.request("LINEAR", 1, {"layer": 0, "modules": ["o_proj"], "extra": 1}, [torch.ones(1, 4)]), id="unknown-arg"),
        pytest.param(protocol.request("LINEAR", 1, {"layer": True, "modules": ["o_proj"]}, [torch.ones(1, 4)]), id="layer-bool"),
        pytest.param(protocol.request("LINEAR", 1, {"layer": "0", "modules": ["o_proj"]}, [torch.ones(1, 4)]), id="layer-str"),
        pytest.param(protocol.request("LINEAR", 1, {"modules": ["o_proj"]}, [torch.ones(1, 4)]), id="layer-missing"),
        pytest.param(protocol.request("LINEAR", 1, {"layer": 0, "modules": []}, [torch.ones(1, 4)]), id="no-modules"),
        pytest.param(protocol.request("LINEAR", 1, {"layer": 0, "modules": ["o_proj|k_proj"]}, [torch.ones(1, 4)]), id="bar-in-name"),
        pytest.param(protocol.request("LINEAR", 1, {"layer": 0, "modules": ["gate_proj"] * 4}, [torch.ones(1, 4)]), id="names-too-long"),
        pytest.param(protocol.request("LINEAR", 1, {"layer": 0, "modules": ["ø_proj"]}, [torch.ones(1, 4)]), id="not-ascii"),
        pytest.param(protocol.request("LM_HEAD", 1, {**OTP, "p": 1 << 63}, [torch.ones(1, 4, dtype=torch.int64)]), id="p-past-int64"),
        pytest.param(protocol.request("LM_HEAD", 1, {**OTP, "p": 0}, [torch.ones(1, 4, dtype=torch.int64)]), id="p-zero"),
        pytest.param(protocol.request("LM_HEAD", 1, {"p": 7}, [torch.ones(1, 4, dtype=torch.int64)]), id="field-incomplete"),
        pytest.param(protocol.request("LM_HEAD", 1 << 63, {}, [torch.ones(1, 4)]), id="id-past-int64"),
        pytest.param(protocol.request("LM_HEAD", 1, {}, [torch.ones(1, 4, dtype=torch.uint8)]), id="dtype-uint8"),
        pytest.param(protocol.reply(1, {"compute_s": 1}, [torch.ones(1)]), id="compute-an-int"),
        pytest.param(protocol.error_reply(1, "no"), id="error-reply"),
    ],
)
def test_what_the_compact_header_cannot_say_goes_as_msgpack(msg: Message) -> None:
    assert protocol.encode_compact(msg) is None


def compact_fields(**changes: object) -> list[bytes]:
    """A valid compact LINEAR request's frames with some of its header's fields changed."""
    fields = {"magic": protocol.COMPACT_MAGIC, "major": protocol.VERSION[0], "op": 2, "flags": protocol.HAS_MODULES, "dtype": 0, "ndim": 2,
              "id": 7, "layer": 0, "p": 0, "limb_bits": 0, "weight_bits": 0, "shape": [1, 4, 0, 0, 0, 0, 0, 0], "compute_s": 0.0, "names": b"o_proj"}  # fmt: skip
    fields.update(changes)
    body = changes.pop("body", b"\0" * 16)
    values = [fields[k] for k in ("magic", "major", "op", "flags", "dtype", "ndim", "id", "layer", "p", "limb_bits", "weight_bits")]
    return [protocol.COMPACT.pack(*values, *fields["shape"], fields["compute_s"], fields["names"]), body]  # type: ignore[arg-type]


def test_the_compact_test_header_is_valid() -> None:
    msg = decode(compact_fields())
    assert (msg.op, msg.id, msg.args, msg.tensors[0].shape) == ("LINEAR", 7, {"layer": 0, "modules": ["o_proj"]}, (1, 4))


@pytest.mark.parametrize(
    ("frames", "limits", "keyword"),
    [
        pytest.param([compact_fields()[0][:-1], b"\0" * 16], Limits(), "not msgpack, nor a compact header", id="short"),
        pytest.param([compact_fields()[0] + b"\0", b"\0" * 16], Limits(), "not msgpack, nor a compact header", id="long"),
        pytest.param(compact_fields(major=protocol.VERSION[0] + 1), Limits(), "version", id="next-major"),
        pytest.param(compact_fields(op=0), Limits(), "op code", id="op-0"),
        pytest.param(compact_fields(op=4), Limits(), "op code", id="reply-as-request"),
        pytest.param(compact_fields(op=200), Limits(), "op code", id="op-200"),
        pytest.param(compact_fields(flags=8), Limits(), "flags", id="unknown-flag"),
        pytest.param(compact_fields(dtype=6), Limits(), "dtype", id="dtype-code"),
        pytest.param(compact_fields(ndim=9, shape=[1] * 8), Limits(), "dimensions", id="ndim-9"),
        pytest.param(compact_fields(shape=[1, 4, 1, 0, 0, 0, 0, 0]), Limits(), "past them", id="dims-past-ndim"),
        pytest.param(compact_fields(shape=[-1, -4, 0, 0, 0, 0, 0, 0], body=b""), Limits(), "non-negative", id="negative-dims"),
        pytest.param(compact_fields(shape=[2**31, 2**31, 0, 0, 0, 0, 0, 0]), Limits(), "limit", id="huge-shape"),
        pytest.param(compact_fields(body=b"\0" * 15), Limits(), "bytes", id="body-short"),
        pytest.param([compact_fields()[0]], Limits(), "tensor frames", id="no-body"),
        pytest.param([*compact_fields(), b""], Limits(), "tensor frames", id="two-bodies"),
        pytest.param(compact_fields(flags=0), Limits(), "without their flag", id="names-without-flag"),
        pytest.param(compact_fields(flags=0, names=b"", layer=3), Limits(), "without their flag", id="layer-without-flag"),
        pytest.param(compact_fields(p=7), Limits(), "without their flag", id="field-without-flag"),
        pytest.param(compact_fields(compute_s=1.0), Limits(), "without its flag", id="compute-without-flag"),
        pytest.param(compact_fields(names=b""), Limits(), "one zero-padded string", id="names-empty"),
        pytest.param(compact_fields(names=b"o_proj\0x"), Limits(), "one zero-padded string", id="names-after-padding"),
        pytest.param(compact_fields(names=b"\xffproj"), Limits(), "ASCII", id="names-not-ascii"),
        pytest.param(compact_fields(), Limits(max_message_bytes=160), "exceeds", id="message-too-big"),
        pytest.param(compact_fields(), Limits(max_tensor_elements=3), "limit", id="too-many-elements"),
    ],
)
def test_a_broken_compact_header_is_refused_by_name(frames: list[bytes], limits: Limits, keyword: str) -> None:
    with pytest.raises(ProtocolError, match=None) as e:
        decode(frames, limits)
    assert keyword.lower() in str(e.value).lower(), str(e.value)


def test_a_compact_reply_is_refused_where_a_request_is_expected_and_vice_versa() -> None:
    reply = as_bytes(protocol.encode_compact(protocol.reply(1, {}, [torch.ones(1)])) or [])
    request = as_bytes(protocol.encode_compact(protocol.request("EMBED", 1, {}, [torch.ones(1, dtype=torch.int64)])) or [])
    with pytest.raises(ProtocolError, match="op code"):
        decode(reply)
    with pytest.raises(ProtocolError, match="op code"):
        decode(request, expect_reply=True)


def test_random_damage_to_compact_headers_raises_only_protocol_errors() -> None:
    """Seeded: every byte of the header flipped to random values, a few at a time; decode accepts or names the problem."""
    import random

    rng = random.Random(20261201)
    good = compact_fields()
    accepted = 0
    for _ in range(3000):
        header = bytearray(good[0])
        for _ in range(rng.randint(1, 4)):
            header[rng.randrange(1, len(header))] = rng.randrange(256)
        try:
            msg = decode([bytes(header), good[1]])
        except ProtocolError:
            continue
        accepted += 1
        assert msg.op in ("EMBED", "LINEAR", "LM_HEAD") and len(msg.tensors) == 1
    assert 0 < accepted < 3000  # damage to the id, layer or values' fields is still a well-formed request
