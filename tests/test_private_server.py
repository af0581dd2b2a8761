"""tsqp.tee.private_server: a `serve-gpu` child on a private ipc:// endpoint, its lifecycle, and who closes it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsqp.errors import ServerUnavailable
from tsqp.model.loading import LoadedModel
from tsqp.shields.config import SHIELDS, ShieldConfig
from tsqp.tee.private_server import PrivateServer, closed_on_failure, server_threads, shield_args

# --- shield_args ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIELDS)
def test_shield_args_quantize_at_start_up_only_for_otp(name: str) -> None:
    expected = "12" if name == "otp" else "0"
    assert shield_args(ShieldConfig(name)) == ["--otp-weight-bits", expected]
    assert shield_args(ShieldConfig(name, weight_bits=8)) == ["--otp-weight-bits", "8" if name == "otp" else "0"]


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 15)])
def test_the_private_server_leaves_the_runner_a_core(cores: int, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """It shares the host with the runner, whose mask worker computes while it does: all cores but one, at least one."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert server_threads() == threads


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
    assert server.process.args[server.process.args.index("--threads") + 1] == str(server_threads())
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


# --- nothing outlives its runner ------------------------------------------------------------------

RUNNER = """
import sys, time
from pathlib import Path
from tsqp.tee.private_server import PrivateServer
server = PrivateServer(Path(sys.argv[1]), device="cpu")
server.wait_ready()
print(server.process.pid, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)


def children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat_file.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat_file.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_a_private_server_exits_when_its_runner_is_killed(tiny_path: Path, tmp_path: Path) -> None:
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tiny_path)], stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        assert runner.stdout is not None
        server_pid = int(runner.stdout.readline())
        assert running(server_pid) and list(tmp_path.glob("tsqp-*"))
        runner.kill()  # SIGKILL: the runner gets no chance to stop its server nor remove its folder
        runner.wait(10)
        assert wait_gone(server_pid, 2.0), "the private server outlived its killed runner by more than 2 s"
        assert not list(tmp_path.glob("tsqp-*")), "the killed runner's private folder was left behind"
    finally:
        if runner.poll() is None:
            runner.kill()


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_run_tee_stops_its_server_and_removes_its_folder(sig: int, status: int, tiny_chat_path: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tsqp", "run-tee", "--model", str(tiny_chat_path), "-p", "hi", "-n", "200"]
    # SIGINT at its default whatever ran the suite: a shell's `cmd &` ignores it, the runner inherits that,
    # and then rightly finishes its 200 tokens (a background CI run failed so).
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (servers := children(runner.pid)) and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(0.02)
        assert servers, "run-tee started no private server"
        runner.send_signal(sig)
        # Unwound by its handler (130/143); for SIGINT a runner caught before Python's handler is in place
        # (or after it is gone, at exit) dies by the signal itself, which shells report as 130 too.
        assert runner.wait(30) in (status, -sig if sig == signal.SIGINT else status), runner.communicate()[1]
        assert all(wait_gone(pid, 10.0) for pid in servers)
        assert not list(tmp_path.glob("tsqp-*")), "the private server's temporary folder was left behind"
    finally:
        if runner.poll() is None:
            runner.kill()
