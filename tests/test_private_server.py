"""tsqp.tee.private_server: a `serve-gpu` child on a private ipc:// endpoint, its lifecycle, and who closes it."""

from __future__ import annotations

import signal
import stat
import time
from pathlib import Path

import pytest

from tsqp.errors import ServerUnavailable
from tsqp.model.loading import LoadedModel
from tsqp.shields.config import SHIELDS, ShieldConfig
from tsqp.tee.private_server import PrivateServer, closed_on_failure, shield_args

# --- shield_args ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIELDS)
def test_shield_args_quantize_at_start_up_only_for_otp(name: str) -> None:
    expected = "12" if name == "otp" else "0"
    assert shield_args(ShieldConfig(name)) == ["--otp-weight-bits", expected]
    assert shield_args(ShieldConfig(name, weight_bits=8)) == ["--otp-weight-bits", "8" if name == "otp" else "0"]


# --- closed_on_failure -----------------------------------------------------------------------


class FakeServer:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_closed_on_failure_closes_the_server_when_the_block_raises() -> None:
    server = FakeServer()
    error = RuntimeError("loading the model failed")
    with pytest.raises(RuntimeError) as caught, closed_on_failure(server):  # type: ignore[arg-type]
        raise error
    assert caught.value is error  # the block's own exception, not another
    assert server.closed == 1


def test_closed_on_failure_closes_on_an_interrupt_too() -> None:
    server = FakeServer()
    with pytest.raises(KeyboardInterrupt), closed_on_failure(server):  # type: ignore[arg-type]
        raise KeyboardInterrupt
    assert server.closed == 1


def test_closed_on_failure_leaves_the_server_open_when_the_block_succeeds() -> None:
    server = FakeServer()
    with closed_on_failure(server):  # type: ignore[arg-type]
        result = 42
    assert result == 42
    assert server.closed == 0  # its new owner (a session) closes it later


def test_closed_on_failure_without_a_server_just_lets_the_error_through() -> None:
    with pytest.raises(ValueError, match="no server"), closed_on_failure(None):
        raise ValueError("no server")
    with closed_on_failure(None):
        pass


# --- a real child process ----------------------------------------------------------------------


def test_serve_gpu_stops_cleanly_on_sigterm(tiny_path: Path) -> None:
    server = PrivateServer(tiny_path, device="cpu")
    server.wait_ready()
    started = time.monotonic()
    server.wait_ready()  # a second wait returns at once
    assert time.monotonic() - started < 0.5
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(10) == 0
    server.close()


def test_private_server_lifecycle(tiny_path: Path, tiny: LoadedModel, tmp_path: Path) -> None:
    from tsqp.wire.client import RemoteBackend

    record = tmp_path / "recording"
    shield = ShieldConfig("otp", weight_bits=8)
    with PrivateServer(tiny_path, device="cpu", shield=shield, extra_args=["--record", str(record)]) as server:
        assert server.process.args[-4:] == ["--otp-weight-bits", "8", "--record", str(record)]
        folder = Path(server.endpoint.removeprefix("ipc://")).parent
        assert server.endpoint.startswith("ipc://") and folder.is_dir()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # only this user can reach the socket
        assert not server.ready
        server.wait_ready()
        assert server.ready and server.alive()
        remote = RemoteBackend(server.endpoint, timeout_s=10)
        try:
            assert remote.hello(tiny.fingerprint)["fingerprint"] == tiny.fingerprint
        finally:
            remote.close()
        assert (record / "index.jsonl").read_text().count('"op": "HELLO"') == 1  # the extra args reached serve-gpu
    assert not server.alive()  # the context manager closed it
    assert server.process.returncode == 0  # by SIGTERM, which serve-gpu answers with a clean exit
    assert not folder.exists()  # the socket's folder is gone with it
    server.close()  # a second close is harmless
    assert not server.alive()


def test_a_server_that_cannot_start_is_an_error_naming_its_last_words(tmp_path: Path) -> None:
    server = PrivateServer(tmp_path / "no-such-model", device="cpu")
    try:
        with pytest.raises(ServerUnavailable, match=r"exited with status [1-9]\d*: .*not found"):
            server.wait_ready()
        assert not server.alive()
    finally:
        server.close()


def test_a_server_not_ready_in_time_is_stopped(tiny_path: Path) -> None:
    server = PrivateServer(tiny_path, device="cpu", startup_timeout_s=0.01)
    folder = Path(server.endpoint.removeprefix("ipc://")).parent
    with pytest.raises(ServerUnavailable, match="not ready within 0.01 s"):
        server.wait_ready()
    assert not server.alive() and not folder.exists()  # it closed the child before giving up
