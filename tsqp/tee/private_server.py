"""A private `tsqp serve-gpu` child process for one run, on an ipc:// endpoint only this user can reach.

The socket lies in a fresh temporary folder of mode 0700 (`tempfile`), so only this user
(and root) can connect to it, and the traffic never leaves the host's kernel: CURVE keys
would add nothing there, so the private server runs without them.

Imports nothing heavy, so the CLI can start the server before loading torch itself.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tsqp.errors import ServerUnavailable
from tsqp.shields.config import ShieldConfig
from tsqp.wire.endpoints import READY
from tsqp.wire.shm import DEFAULT_SPIN_US


def shield_args(shield: ShieldConfig) -> list[str]:
    """serve-gpu options for a run with this shield: quantize for the exact shields at start-up, in parallel with the runner."""
    return ["--otp-weight-bits", str(shield.weight_bits if shield.exact else 0)]


def server_threads() -> int:
    """The private server's CPU threads: all but one of the cores this process may use.

    It shares the host with the runner, whose mask worker makes masks while the server computes:
    on 2 cores, one server thread decoded otp at 98.6-142.7 ms a token against 103.5-152.1 with two
    (faster in 6 of 6 alternating pairs), plain about even, and prefilled 512 tokens no slower (docs/benchmarks.md)."""
    return max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else max(1, (os.cpu_count() or 2) - 1)


class PrivateServer:
    """A `tsqp serve-gpu` child process on a private ipc:// endpoint."""

    def __init__(self, model_folder: Path, device: str = "auto", dtype: str = "float32", shield: ShieldConfig | None = None,
                 startup_timeout_s: float = 120.0, extra_args: Sequence[str] = (), spin_us: float = DEFAULT_SPIN_US) -> None:  # fmt: skip
        # The folder holds the shared-memory channels too: in memory (/dev/shm) unless TMPDIR names a place.
        in_memory = "/dev/shm" if os.path.isdir("/dev/shm") and not os.environ.get("TMPDIR") else None
        self._dir = tempfile.TemporaryDirectory(prefix="tsqp-", dir=in_memory)
        self.endpoint = f"ipc://{self._dir.name}/server.sock"
        command = [sys.executable, "-m", "tsqp", "serve-gpu", "--model", str(model_folder), "--endpoint", self.endpoint,
                   "--device", device, "--dtype", dtype, "--quiet", "--exit-with-parent", str(os.getpid()), "--private-dir", self._dir.name,
                   "--shm-dir", self._dir.name, "--spin-us", str(spin_us), "--threads", str(server_threads()), *(shield_args(shield) if shield else ()), *extra_args]  # fmt: skip
        self._stderr = open(Path(self._dir.name) / "server.log", "w+")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.startup_timeout_s = startup_timeout_s
        self.ready = False

    def wait_ready(self) -> None:
        """Block until the server prints its ready line (at once if it already has)."""
        assert self.process.stdout is not None
        if self.ready:
            return
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith(READY):
                    self.ready = True
                    return
                if line:
                    continue
            if self.process.poll() is not None:
                raise ServerUnavailable(f"the private tsqp server exited with status {self.process.returncode}: {self._log_tail()}")
        self.close()
        raise ServerUnavailable(f"the private tsqp server was not ready within {self.startup_timeout_s:g} s")

    def alive(self) -> bool:
        return self.process.poll() is None

    def _log_tail(self) -> str:
        self._stderr.seek(0)
        lines = [l.strip() for l in self._stderr.read().splitlines() if l.strip()]
        return lines[-1] if lines else "(no output)"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        self._stderr.close()
        self._dir.cleanup()

    def __enter__(self) -> PrivateServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def closed_on_failure(server: PrivateServer | None) -> Iterator[None]:
    """Close `server` if the block raises; once it succeeds, the server's new owner (a session) closes it."""
    try:
        yield
    except BaseException:
        if server is not None:
            server.close()
        raise
