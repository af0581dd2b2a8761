"""tsqp.server.recording: what `serve-gpu --record` keeps, read back exactly, as plain .npy files (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import call, connected_dealer, start_server

from tsqp.model.loading import LoadedModel
from tsqp.server.recording import INDEX, Recorded, Recorder, read_recording
from tsqp.server.stats import client_key


def record(folder: Path, requests: list[tuple[str, dict, list[torch.Tensor], str]]) -> list[Recorded]:
    recorder = Recorder(folder)
    try:
        for op, args, tensors, client in requests:
            recorder.write(op, args, tensors, client)
    finally:
        recorder.close()
    return list(read_recording(folder))


def test_round_trip_keeps_order_ops_args_clients_and_values(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    ids = torch.tensor([[1, 2, 319]])
    masked = torch.randint(0, (1 << 31) - 1, (2, 8), generator=g, dtype=torch.int64)
    half = torch.randn(4, generator=g).half()
    wide = torch.randn(2, 2, generator=g, dtype=torch.float64)
    args = {"layer": 1, "modules": ["gate_proj", "up_proj"]}
    got = record(
        tmp_path,
        [
            ("HELLO", {"fingerprint": "ab" * 16}, [], "00aa"),
            ("LINEAR", args, [x], "00aa"),
            ("EMBED", {}, [ids], "00bb"),
            ("LINEAR", {"layer": 0, "modules": ["o_proj"], "p": 2147483647, "limb_bits": 8, "weight_bits": 12}, [masked], "00bb"),
            ("MATMUL", {}, [half, wide], "00cc"),
        ],
    )
    assert [(r.n, r.op, r.client) for r in got] == [
        (0, "HELLO", "00aa"),
        (1, "LINEAR", "00aa"),
        (2, "EMBED", "00bb"),
        (3, "LINEAR", "00bb"),
        (4, "MATMUL", "00cc"),
    ]
    assert got[0].args == {"fingerprint": "ab" * 16} and got[0].tensors == []
    assert got[1].args == args
    assert got[3].args["p"] == 2147483647
    for r, expected in ((got[1], [x]), (got[2], [ids]), (got[3], [masked]), (got[4], [half, wide])):
        assert len(r.tensors) == len(expected)
        for array, tensor in zip(r.tensors, expected):
            assert isinstance(array, np.ndarray)
            assert array.dtype == tensor.numpy().dtype and array.shape == tuple(tensor.shape)
            assert np.array_equal(array, tensor.numpy())  # exactly, not approximately


def test_bfloat16_is_stored_as_float32_with_the_same_values(tmp_path: Path) -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1)).bfloat16()
    (r,) = record(tmp_path, [("LINEAR", {"layer": 0, "modules": ["o_proj"]}, [x], "c")])
    assert r.tensors[0].dtype == np.float32  # numpy has no bfloat16
    assert np.array_equal(r.tensors[0], x.float().numpy())  # bfloat16 -> float32 is exact


def test_views_and_tensors_that_need_grad_are_recorded_as_their_values(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    view = base.t()  # not contiguous
    grad = torch.ones(2, 2, requires_grad=True)
    (r,) = record(tmp_path, [("MATMUL", {}, [view, grad], "c")])
    assert np.array_equal(r.tensors[0], view.numpy()) and r.tensors[0].shape == (4, 3)
    assert np.array_equal(r.tensors[1], np.ones((2, 2), dtype=np.float32))


def test_layout_is_one_index_line_per_request_and_one_npy_per_tensor(tmp_path: Path) -> None:
    record(tmp_path, [("HEALTH", {}, [], "c"), ("MATMUL", {}, [torch.ones(2, 3), torch.ones(3, 1)], "d")])
    lines = (tmp_path / INDEX).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"n": 0, "op": "HEALTH", "args": {}, "client": "c", "files": []},
        {"n": 1, "op": "MATMUL", "args": {}, "client": "d", "files": ["0000001-0.npy", "0000001-1.npy"]},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000001-0.npy", "0000001-1.npy", INDEX]
    for name in ("0000001-0.npy", "0000001-1.npy"):
        assert (tmp_path / name).read_bytes().startswith(b"\x93NUMPY")  # plain .npy, readable without pickle
        np.load(tmp_path / name, allow_pickle=False)


def test_the_index_is_flushed_after_every_request(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "new" / "folder")  # made if missing
    try:
        recorder.write("LM_HEAD", {}, [torch.ones(1, 4)], "c")
        assert [r.op for r in read_recording(tmp_path / "new" / "folder")] == ["LM_HEAD"]  # readable while the server still runs
        assert recorder.count == 1
    finally:
        recorder.close()


def test_reading_never_unpickles(tmp_path: Path) -> None:
    record(tmp_path, [("MATMUL", {}, [torch.ones(2, 2), torch.ones(2, 2)], "c")])
    np.save(tmp_path / "0000000-1.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)  # a pickled payload slipped in
    with pytest.raises(ValueError, match="allow_pickle"):
        list(read_recording(tmp_path))


def test_a_recording_server_keeps_each_request_as_received(tiny: LoadedModel, tmp_path: Path) -> None:
    running = start_server(tiny, record_dir=tmp_path)
    sock = next(connected_dealer(running.endpoint))
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    try:
        assert call(sock, "HEALTH", 1).ok
        assert call(sock, "LINEAR", 2, {"layer": 1, "modules": ["o_proj"]}, [x]).ok
        assert call(sock, "EMBED", 3, {}, [torch.tensor([4, 5])]).ok
        assert not call(sock, "LINEAR", 4, {"layer": 9, "modules": ["o_proj"]}, [x]).ok  # refused, but received: recorded too
    finally:
        sock.close(linger=0)
        running.close()
    got = list(read_recording(tmp_path))
    assert [(r.n, r.op) for r in got] == [(0, "HEALTH"), (1, "LINEAR"), (2, "EMBED"), (3, "LINEAR")]
    assert len({r.client for r in got}) == 1 and len(got[0].client) == len(client_key(b"\0" * 5))  # one client, named by its key
    assert got[1].args == {"layer": 1, "modules": ["o_proj"]}
    assert np.array_equal(got[1].tensors[0], x.float().numpy())
    assert got[2].tensors[0].tolist() == [4, 5]


def test_args_json_cannot_hold_are_recorded_as_text(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    recorder.write("HEALTH", {"x": b"\x00"}, [], "c")  # a hostile client's msgpack bytes must not kill the server
    recorder.close()
    (entry,) = read_recording(tmp_path)
    assert entry.args == {"x": repr(b"\x00")}


def test_recording_again_into_a_folder_keeps_the_first_run(tmp_path: Path) -> None:
    for value in (1.0, 2.0):
        recorder = Recorder(tmp_path)
        recorder.write("LM_HEAD", {}, [torch.full((1, 2), value)], "c")
        recorder.close()
    first, second = read_recording(tmp_path)
    assert (first.n, second.n) == (0, 1)
    assert float(first.tensors[0][0, 0]) == 1.0 and float(second.tensors[0][0, 0]) == 2.0
