"""tsqp.wire.shm and tsqp.server.shm: the same-host shared-memory transport, negotiated at HELLO.

(The bad-request cases of test_server.py and the fuzz run of test_fuzz.py run over it too,
and test_concurrency.py's four concurrent clients.)
"""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ShmDealer, assert_valid_linear_works, call, private_folder, rpc, start_server, x_input

from tsqp.errors import EndpointError, MalformedReply, ServerUnavailable
from tsqp.model.linear import FORWARD_ORDER
from tsqp.model.loading import LoadedModel
from tsqp.server.shm import ShmHub
from tsqp.shields.config import SHIELDS, ShieldConfig
from tsqp.tee.generation import generate
from tsqp.tee.llama import Llama
from tsqp.tee.private_server import PrivateServer
from tsqp.tee.session import shielded
from tsqp.wire import protocol, shm
from tsqp.wire.client import RemoteBackend
from tsqp.wire.shm import MAX_FRAMES, Channel, Spinner, check_private_folder

DEATH_REPORTED_WITHIN_S = 1.0  # the bound; both sides look every 0.2-0.25 s


def remote(endpoint: str, tiny: LoadedModel, transport: str, **kwargs: Any) -> RemoteBackend:
    backend = RemoteBackend(endpoint, timeout_s=30, transport=transport, **kwargs)
    backend.hello(tiny.fingerprint)
    return backend


@pytest.fixture
def shm_server(tiny: LoadedModel) -> Any:
    running = start_server(tiny)
    yield running
    running.close()


# --- same answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("shield", SHIELDS)
def test_shm_and_zmq_give_identical_tokens_under_every_shield(tiny: LoadedModel, shm_server: Any, shield: str) -> None:
    tokens = {}
    for transport in ("zmq", "shm"):
        backend = remote(shm_server.endpoint, tiny, transport)
        try:
            assert (backend.shm is not None) == (transport == "shm")
            torch.manual_seed(0)  # noise's masks
            guarded = shielded(backend, tiny, ShieldConfig(shield, verify=True, allow_broken=True))  # every shield, broken ones too
            llama = Llama(tiny.config, tiny.hf_config, tiny.norms(), guarded)
            tokens[transport] = generate(llama, [5, 9, 33, 71, 2], 8).token_ids
            if transport == "shm":
                assert backend.stats.round_trips > 8 * 4 * tiny.config.n_layers  # the hot ops went through it
        finally:
            backend.close()
    assert tokens["shm"] == tokens["zmq"]


def test_the_server_warms_after_plain_calls_over_shm_only(tiny: LoadedModel, shm_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server tells its warmer of each plain hot call over shm (it reads the weights of the calls that follow);
    not of otp's calls (their products read other weights), and a zmq-only server not at all."""
    answered: list[Any] = []
    monkeypatch.setattr(shm_server.server.warmer, "answered", answered.append)
    for shield, expect in [("plain", True), ("otp", False)]:
        answered.clear()
        backend = remote(shm_server.endpoint, tiny, "shm")
        try:
            llama = Llama(tiny.config, tiny.hf_config, tiny.norms(), shielded(backend, tiny, ShieldConfig(shield)))
            generate(llama, [5, 9, 33], 2)
            backend.server_stats()  # answered after the server's work for the last call (a reply is posted first)
        finally:
            backend.close()
        forward = [(layer, group) for layer in range(tiny.config.n_layers) for group in FORWARD_ORDER]
        assert answered == (2 * ["embed", *forward, "lm_head"] if expect else [])  # the prefill, one decode step
    plain = start_server(tiny, shm_folder=None)
    try:
        monkeypatch.setattr(plain.server.warmer, "answered", answered.append)
        backend = remote(plain.endpoint, tiny, "zmq")
        backend.linear(0, ["o_proj"], x_input())
        backend.close()
        assert answered == []
    finally:
        plain.close()


def test_a_hot_calls_result_is_its_own_memory_and_its_input_may_be_strided(tiny: LoadedModel, shm_server: Any) -> None:
    """A hot call writes its input into shared memory and copies an honest reply out (`HotCall`): a strided input
    gives the contiguous one's result, a result stays what it was when later calls reuse the areas, an input that
    requires grad is refused as over zmq, and a new channel (a second HELLO) gets new views: its calls are answered,
    and right."""
    backend = remote(shm_server.endpoint, tiny, "shm")
    try:
        weight = tiny.weights["layers.1.o_proj"]
        x, other = x_input(rows=3), x_input(rows=3, seed=5)
        strided = torch.stack([x, -x], dim=-1)[..., 0]  # the same values, every other element of a wider tensor
        assert not strided.is_contiguous() and torch.equal(strided, x)
        first = backend.linear(1, ["o_proj"], strided)[0]
        kept = first.clone()
        for _ in range(3):  # the first goes the general way once, then every call the hot one
            second = backend.linear(1, ["o_proj"], other)[0]
        assert backend.server_stats()["fast_lane_requests"] >= 2
        assert torch.equal(first, kept)  # not a view of the reply area, which the later calls rewrote
        torch.testing.assert_close(first, x @ weight.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, other @ weight.T, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="requires grad"):  # never detached on the way (`tsqp check-grad`)
            backend.linear(1, ["o_proj"], x.clone().requires_grad_())
        old = backend.shm
        backend.hello(tiny.fingerprint)  # a new channel: the hot calls' views of the old one must not be used
        assert backend.shm is not old
        torch.testing.assert_close(backend.linear(1, ["o_proj"], x)[0], x @ weight.T, rtol=1e-5, atol=1e-5)
        assert backend.stats.round_trips >= 6
    finally:
        backend.close()


def test_a_server_lying_on_the_fast_paths_is_caught(tiny: LoadedModel, shm_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies taken by their first bytes (`KnownCall`) and answered by the server's fast lane are still checked
    for NaN and infinity; a server that answers another call's shape is caught by name."""
    weights = shm_server.server.handlers.weights
    backend = remote(shm_server.endpoint, tiny, "shm")
    try:
        x = x_input()
        for _ in range(3):  # the first answered the generic way, then by the server's fast lane
            backend.linear(1, ["o_proj"], x)
        assert backend.server_stats()["fast_lane_requests"] >= 2
        honest_into = weights.product_into

        def nan_into(site: Any, rows: Any, out: Any) -> None:
            honest_into(site, rows, out)
            out[0, 3] = float("nan")

        monkeypatch.setattr(weights, "product_into", nan_into)
        with pytest.raises(MalformedReply, match="NaN"):
            backend.linear(1, ["o_proj"], x)
        shm_server.server.fastlane.plans.clear()  # the generic path answers, narrower than asked
        honest = weights.group_product
        monkeypatch.setattr(weights, "group_product", lambda key, flat: honest(key, flat)[:, :-1])
        with pytest.raises(MalformedReply, match="shape"):
            backend.linear(1, ["o_proj"], x)
    finally:
        backend.close()


def test_auto_uses_shm_on_this_host_and_zmq_without_an_offer(tiny: LoadedModel, shm_server: Any) -> None:
    auto = remote(shm_server.endpoint, tiny, "auto")
    try:
        assert auto.shm is not None
    finally:
        auto.close()
    plain = start_server(tiny, shm_folder=None)
    try:
        fallback = remote(plain.endpoint, tiny, "auto")
        assert fallback.shm is None
        fallback.close()
        with pytest.raises(EndpointError, match="offers no shared-memory transport"):
            remote(plain.endpoint, tiny, "shm")
    finally:
        plain.close()


def test_a_reply_too_large_for_the_area_comes_over_zmq(tiny: LoadedModel) -> None:
    running = start_server(tiny, shm_area_bytes=4096)
    backend = remote(running.endpoint, tiny, "shm")
    try:
        x = x_input(rows=2)
        (logits,) = [backend.lm_head(x)]  # 2 x 320 floats fit both ways
        torch.testing.assert_close(logits, x @ tiny.weights["lm_head"].T, rtol=1e-4, atol=1e-5)
        wide = x_input(rows=12)  # 3 KiB in, 15 KiB out: the reply goes over the socket
        torch.testing.assert_close(backend.lm_head(wide), wide @ tiny.weights["lm_head"].T, rtol=1e-4, atol=1e-5)
        big = x_input(rows=40)  # 10 KiB: the request goes over the socket too
        torch.testing.assert_close(backend.lm_head(big), big @ tiny.weights["lm_head"].T, rtol=1e-4, atol=1e-5)
        assert running.server.stats.ops["LM_HEAD"].errors == 0
    finally:
        backend.close()
        running.close()


# --- what a hostile client can do -----------------------------------------------------------


@pytest.mark.parametrize(
    "table",
    [
        pytest.param((MAX_FRAMES + 1, 0, *[8] * MAX_FRAMES), id="too-many-frames"),
        pytest.param((0xFFFFFFFF, 0, *[0] * MAX_FRAMES), id="over-zmq-marker-as-request"),
        pytest.param((2, 0, 64, 1 << 40, *[0] * (MAX_FRAMES - 2)), id="frame-beyond-the-area"),
    ],
)
def test_a_broken_frame_table_gets_an_error_reply_and_the_server_keeps_serving(tiny: LoadedModel, shm_server: Any, table: tuple[int, ...]) -> None:
    client = ShmDealer(shm_server.endpoint)
    try:
        channel = client.channel
        struct.pack_into(f"<II{MAX_FRAMES}Q", channel.buf, channel.request_area, *table)
        channel.seq += 1
        channel.post_seq(channel.seq)
        channel.wait(channel.seq, Spinner(0.0), time.monotonic() + 5, lambda: None)
        reply = protocol.decode(channel.read(), expect_reply=True)  # type: ignore[arg-type]
        assert not reply.ok and reply.id == -1
        assert str(reply.error).startswith("bad request: shared-memory message")
        assert_valid_linear_works(client, tiny)  # type: ignore[arg-type]
        assert call(client, "STATS", 3).args["malformed"] >= 1  # type: ignore[arg-type]
    finally:
        client.close()


def test_segments_are_private_random_and_gone_once_attached(tiny: LoadedModel, shm_server: Any) -> None:
    hub = shm_server.server.shm
    folder = hub.folder
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    offer = hub.offer("someone", None)  # not attached yet: its three files wait in the folder
    names = sorted(os.listdir(folder))
    assert len(names) == 3
    for name in names:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    hub.drop("someone", "test")
    assert os.listdir(folder) == []  # a withdrawn offer leaves nothing

    a, b = ShmDealer(shm_server.endpoint), ShmDealer(shm_server.endpoint)
    try:
        assert a.channel.path != b.channel.path and a.channel.path.parent == folder
        assert os.listdir(folder) == []  # each client unlinked its files: no other process can open them
        with pytest.raises(EndpointError):
            Channel.attach({"path": str(a.channel.path), "area_bytes": offer["area_bytes"]})
        # Each client's requests reach only its own channel: interleaved, each gets its own answers.
        xa, xb = x_input(seed=1), x_input(seed=2)
        ra = call(a, "LINEAR", 1, {"layer": 0, "modules": ["o_proj"]}, [xa])  # type: ignore[arg-type]
        rb = call(b, "LINEAR", 1, {"layer": 0, "modules": ["o_proj"]}, [xb])  # type: ignore[arg-type]
        torch.testing.assert_close(ra.tensors[0], xa @ tiny.weights["layers.0.o_proj"].T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rb.tensors[0], xb @ tiny.weights["layers.0.o_proj"].T, rtol=1e-4, atol=1e-5)
    finally:
        a.close()
        b.close()


def test_only_a_private_folder_holds_segments(tmp_path: Path) -> None:
    folder = private_folder()
    try:
        assert check_private_folder(folder) == folder
        folder.chmod(0o755)
        with pytest.raises(EndpointError, match="0700"):
            check_private_folder(folder)
        with pytest.raises(EndpointError, match="not a directory"):
            check_private_folder(Path(__file__))
    finally:
        folder.rmdir()


def test_a_hello_over_shm_keeps_the_channel(tiny: LoadedModel, shm_server: Any) -> None:
    client = ShmDealer(shm_server.endpoint)
    try:
        r = rpc(client, protocol.encode(protocol.request("HELLO", 4, {"transport": "shm"})))  # type: ignore[arg-type]
        assert r.ok and r.args["shm"] is None
        assert_valid_linear_works(client, tiny)  # type: ignore[arg-type]
    finally:
        client.close()


# --- a side that dies -----------------------------------------------------------------------

CLIENT = """
import sys, time
from tsqp.wire.client import RemoteBackend
backend = RemoteBackend(sys.argv[1], transport="shm")
backend.hello()
assert backend.shm is not None
print("attached", flush=True)
time.sleep(120)
"""


def test_a_killed_client_leaves_no_segment_and_the_server_notices_within_a_second(tiny: LoadedModel, shm_server: Any) -> None:
    hub: ShmHub = shm_server.server.shm
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, shm_server.endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "attached"
        assert len(hub.channels) == 1
        assert os.listdir(hub.folder) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    died = time.monotonic()
    while hub.channels and time.monotonic() - died < 5:
        time.sleep(0.02)
    assert not hub.channels
    assert time.monotonic() - died < DEATH_REPORTED_WITHIN_S
    assert os.listdir(hub.folder) == []
    client = ShmDealer(shm_server.endpoint)  # and it goes on serving
    try:
        assert_valid_linear_works(client, tiny)  # type: ignore[arg-type]
    finally:
        client.close()


def test_a_killed_server_leaves_no_segment_and_the_client_notices_within_a_second(tiny: LoadedModel, tiny_path: Path) -> None:
    server = PrivateServer(tiny_path, "cpu")
    try:
        server.wait_ready()
        folder = Path(server.endpoint.removeprefix("ipc://")).parent
        backend = remote(server.endpoint, tiny, "shm")  # no server_alive: the channel alone must tell
        assert backend.shm is not None
        x = x_input()
        backend.linear(0, ["o_proj"], x)
        assert sorted(os.listdir(folder)) == ["server.log", "server.sock"]  # the segment has no name
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="went away"):
            backend.linear(0, ["o_proj"], x)
        assert time.monotonic() - started < DEATH_REPORTED_WITHIN_S
        backend.close()
    finally:
        server.close()


# --- spinning ---------------------------------------------------------------------------------


SEQ_WRITER = """
import sys
import threading
from tsqp.wire.shm import Channel
channel = Channel.attach({"path": sys.argv[1], "area_bytes": int(sys.argv[2])})
for seq in range(1, int(sys.argv[3]) + 1):
    channel.post_seq(seq)
"""


def test_a_side_spinning_on_a_seq_never_reads_it_half_written() -> None:
    """Every seq the server reads while the client stores them is one the client posted, in order. With struct's
    byte-wise "<Q" a spinning reader saw 0 for 256 (about one read in a thousand stores here), and the server
    took that request again: a CI run recorded one EMBED twice."""
    posts = 300_000
    server_side = Channel.create(private_folder(), 4096)
    writer = subprocess.Popen([sys.executable, "-c", SEQ_WRITER, str(server_side.path), "4096", str(posts)])
    try:
        last, reads_in_flight, deadline = 0, 0, time.monotonic() + 60
        while last < posts and time.monotonic() < deadline:
            seq = server_side.incoming_seq()
            assert last <= seq <= posts, f"read seq {seq} after {last}: a half-written seq"
            reads_in_flight += 0 < seq < posts
            last = seq
        assert last == posts, "the writer did not finish in time"
        assert reads_in_flight > 1000  # the reads overlapped the stores, or the test showed nothing
    finally:
        writer.kill()
        writer.wait()
        server_side.close()
        server_side.unlink()


def test_the_spinner_spins_on_an_idle_machine_and_blocks_on_a_crowded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spin pays only while the peer has a core of its own: on a crowded machine both sides block at once."""
    crowded = False
    monkeypatch.setattr(shm, "machine_crowded", lambda: crowded)
    monkeypatch.setattr(shm, "SPIN_ALLOWED", True)
    spinner = shm.Spinner(0.5)
    assert spinner.wait_for(lambda: True) and spinner.budget() == 0.5  # idle: it spins, and the message came
    crowded = True
    budgets = [spinner.budget() for _ in range(2 * shm.Spinner.RECHECK_EVERY)]
    assert budgets[-1] == 0.0 and budgets.count(0.0) >= shm.Spinner.RECHECK_EVERY  # looked again within RECHECK_EVERY waits
    started = time.perf_counter()
    assert not spinner.wait_for(lambda: False)  # blocks at once: no 0.5 s spin
    assert time.perf_counter() - started < 0.05
    crowded = False
    assert shm.Spinner.RECHECK_EVERY >= [spinner.budget() for _ in range(shm.Spinner.RECHECK_EVERY)].index(0.5) >= 0


def test_the_spinner_stops_spinning_while_its_spins_run_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer slower than the budget: spinning wastes a core, so the side blocks, probing every RECHECK_EVERY waits."""
    monkeypatch.setattr(shm, "machine_crowded", lambda: False)
    monkeypatch.setattr(shm, "SPIN_ALLOWED", True)
    spinner = shm.Spinner(0.001)
    while spinner.ran_out <= 0.5:
        assert spinner.budget() == 0.001
        assert not spinner.wait_for(lambda: False)
    budgets = [spinner.budget() for _ in range(shm.Spinner.RECHECK_EVERY)]
    assert budgets.count(0.0) == shm.Spinner.RECHECK_EVERY - 1 and budgets.count(0.001) == 1  # one probe
    while spinner.ran_out > 0.5:  # probes that see the message in time bring the spinning back
        spinner.wait_for(lambda: True)
    assert spinner.budget() == 0.001


def channel_pair() -> tuple[Channel, Channel]:
    """A server's side of a new channel and a client's, in this process."""
    server_side = Channel.create(private_folder(), 4096)
    return server_side, Channel.attach({"path": str(server_side.path), "area_bytes": 4096})


def test_a_wait_for_a_long_reply_dozes_until_near_its_time_and_wakes_at_a_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply expected to outlast the spin budget is waited for blocked first (`Channel._doze`): a ring wakes the
    wait at once, and a ring its doze drained is not lost when the spin that follows is off (a crowded machine): the
    blocking wait after it would poll a drained doorbell for a whole slice."""
    monkeypatch.setattr(shm, "SPIN_ALLOWED", True)
    server_side, client_side = channel_pair()
    try:
        spinner = shm.Spinner(0.001)
        poster = threading.Timer(0.01, server_side.post_seq, (1,))
        poster.start()
        started = time.perf_counter()
        client_side.wait(1, spinner, time.monotonic() + 5, lambda: None, expected_s=0.19)  # would doze ~0.19 s unrung
        assert time.perf_counter() - started < 0.15
        poster.join()

        monkeypatch.setattr(shm, "machine_crowded", lambda: True)
        spinner.crowded, spinner._waits = True, 0  # no spin after the doze
        client_side.drain()
        os.write(server_side.bell_out, b"\1")  # a stale ring: the doze returns at once and drains...
        real_drain = client_side.drain

        def drain_as_the_reply_lands() -> None:  # ...just as the server posts reply 2 and rings
            server_side.post_seq(2)
            real_drain()

        monkeypatch.setattr(client_side, "drain", drain_as_the_reply_lands)
        started = time.perf_counter()
        client_side.wait(2, spinner, time.monotonic() + 5, lambda: None, expected_s=0.19)
        assert time.perf_counter() - started < shm.BLOCK_SLICE_S / 2
    finally:
        client_side.close()
        server_side.close()
        server_side.unlink()


def test_spinning_is_off_where_the_store_order_is_not_guaranteed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "SPIN_ALLOWED", False)
    assert shm.Spinner(0.5).budget() == 0.0
