"""Same-host transport: one shared-memory segment per client carries the hot ops' frames.

It is negotiated at HELLO over ZeroMQ, which keeps the other ops (HELLO, STATS, HEALTH),
CURVE and cross-host links. For one client the server creates, in a folder only this user
may enter (0700), three files of mode 0600:

    NAME        the segment: a control block, then a request area and a reply area
    NAME.up     a FIFO, the client's doorbell to the server ("a request is posted")
    NAME.down   a FIFO, the server's doorbell to the client ("its reply is posted")

The client opens them and unlinks them at once, so nothing stays behind whichever side dies
later: only the two processes' mappings keep the memory. A name is random and told only to
the client that asked, over its own ZeroMQ connection; once unlinked, no other process can
open it. Each side holds a `flock` on the doorbell it reads while it lives (a lock of its open
file, so it works between threads too): a lock that the other side can take means that its
holder died.

Control block: [0:8] request seq (the client writes it), [8:16] reply seq (the server writes
it), each a native 8-byte word stored and loaded whole; [16] 1 once the client has attached.
An area: u32 frame count, u32 unused, u64 frame lengths[MAX_FRAMES], then the frames, each at
a 64-byte aligned offset: the same frames a ZeroMQ message has (`protocol.encode`). A count of
OVER_ZMQ in the reply area: the reply did not fit and went over ZeroMQ.

A side posts a message by writing its frames, then the seq, then one byte to its doorbell.
The waiting side spins on the seq for a short budget, then blocks on its doorbell: poll,
drain, look at the seq again, so no wake-up is lost. Spinning trusts x86-64's store order
(frames before seq); elsewhere the budget is 0 and the doorbell's syscalls order the memory.
The budget adapts (`Spinner`): a spin pays only while the peer runs on a core of its own, so a
side blocks at once while the machine has more runnable tasks than cores (it would take the core
the peer needs) or while its spins keep running out, and looks again every few waits.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import platform
import secrets
import select
import stat
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsqp.errors import EndpointError, ProtocolError

HOT_OPS = frozenset(("EMBED", "LINEAR", "MATMUL", "LM_HEAD"))  # the ops whose bodies travel in shared memory
TRANSPORTS = ("auto", "zmq", "shm")
DEFAULT_AREA_BYTES = 16 << 20  # each way: a 512-token SmolLM2 prefill's largest message fits
# Long enough to cover a decode call's products on a CPU server (0.1-0.4 ms for SmolLM2), so both
# wake-ups of a round trip go; on an idle 2-core machine it took a plain decode step from 100 to
# 74 ms. Where the peer shares our core, `Spinner` stops spinning (docs/benchmarks.md).
DEFAULT_SPIN_US = 1000.0
SPIN_ALLOWED = platform.machine().lower() in ("x86_64", "amd64")

CONTROL = 64
REQUEST_SEQ, REPLY_SEQ, ATTACHED = 0, 8, 16  # byte offsets in the control block
MAX_FRAMES = 16
TABLE = struct.Struct(f"<II{MAX_FRAMES}Q")
DATA = 192  # the first frame's offset in an area, after the table
ALIGN = 64
OVER_ZMQ = 0xFFFFFFFF
BLOCK_SLICE_S = 0.2  # a blocked wait looks at the peer's liveness this often


class Spinner:
    """How long one side spins before it blocks: `budget_s`, unless spinning would hurt.

    A spin pays only while the peer runs on a core of its own. So it stops (the side blocks at once)
    while the machine has more runnable tasks than cores (`crowded`: a spinning side would take the
    core the peer needs; measured 4.9 tok/s spinning against 9.3 blocking with two busy processes on
    2 cores), or while most recent spins ran out (a peer slower than the budget). Both are looked at
    again every `RECHECK_EVERY` waits.
    """

    RECHECK_EVERY = 32
    WEIGHT = 1 / 8  # of the latest outcome in the moving share of spins that ran out

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s if SPIN_ALLOWED else 0.0
        self.ran_out = 0.0  # moving share of recent spins that ended without the message
        self.crowded = False
        self._waits = 0

    def budget(self) -> float:
        """The spin budget for the next wait."""
        if self.budget_s <= 0:
            return 0.0
        self._waits += 1
        if self._waits >= self.RECHECK_EVERY:
            self._waits = 0
            self.crowded = machine_crowded()
            if not self.crowded and self.ran_out > 0.5:
                return self.budget_s  # a probe: is the peer quick again?
        return 0.0 if self.crowded or self.ran_out > 0.5 else self.budget_s

    def wait_for(self, ready: Callable[[], bool], idle: Callable[[], None] | None = None, until: float = 0.0) -> bool:
        """Spin until `ready()` or the budget runs out (or, if later, `until` on `time.perf_counter`'s clock), calling
        `idle()` (short work) between looks; True if it became ready."""
        budget = self.budget()
        if budget <= 0:
            return False
        end = max(time.perf_counter() + budget, until)
        while not ready():
            if idle is not None:
                idle()
            if time.perf_counter() > end:
                self.ran_out += (1.0 - self.ran_out) * self.WEIGHT
                return False
        self.ran_out -= self.ran_out * self.WEIGHT
        return True


USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_crowded() -> bool:
    """More tasks runnable right now than this process may use cores (Linux's /proc/loadavg; elsewhere False)."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return running > USABLE_CPUS


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def frames_size(frames: Sequence[Any]) -> int:
    """Bytes an area needs for these frames."""
    return _area_bytes(memoryview(f).nbytes for f in frames)


def _area_bytes(lengths: Iterable[int]) -> int:
    """Bytes an area needs for frames of these lengths: the table, then each frame at an aligned offset."""
    return DATA + sum(_aligned(n) for n in lengths)


@dataclass(frozen=True)
class Layout:
    """Where frames of these lengths lie in an area: its table's bytes, and each frame's offset from the
    area's start. A message of known lengths (a hot call's, over and over) is laid out once."""

    table: bytes
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, lengths: Sequence[int]) -> Layout:
        offsets, end = [], DATA
        for n in lengths:
            offsets.append(end)
            end += _aligned(n)
        table = TABLE.pack(len(lengths), 0, *lengths, *([0] * (MAX_FRAMES - len(lengths))))
        return cls(table, tuple(offsets), tuple(lengths))

    @property
    def size(self) -> int:
        """Bytes an area needs for this message."""
        return _area_bytes(self.lengths)


def check_private_folder(folder: str | os.PathLike[str]) -> Path:
    """`folder` if it is a directory of this user's that no one else may enter (0700); else `EndpointError`."""
    path = Path(folder)
    try:
        info = path.lstat()
    except OSError as e:
        raise EndpointError(f"shared-memory folder {path}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise EndpointError(f"shared-memory folder {path} is not a directory")
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise EndpointError(f"shared-memory folder {path} must belong to this user with mode 0700 (chmod 700 {path})")
    return path


class Channel:
    """One client's segment and doorbells, as either side holds them."""

    def __init__(self, path: Path, area_bytes: int, server: bool) -> None:
        self.path, self.area_bytes, self.server = path, area_bytes, server
        self.size = CONTROL + 2 * area_bytes
        self.request_area, self.reply_area = CONTROL, CONTROL + area_bytes
        # Where this side reads its peer's messages, and writes its own.
        self.incoming_area, self.outgoing_area = (self.request_area, self.reply_area) if server else (self.reply_area, self.request_area)
        self.seq = 0  # the client's last request; on the server, the last request taken
        self.busy = False  # the server: that request is not answered yet
        self.closed = False
        self.views: dict[Any, Any] = {}  # the owner's numpy views of the areas, by what they are for: dropped at close
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fds: list[int] = []
        try:
            if server:
                self.fd = self._keep(os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600))
                os.ftruncate(self.fd, self.size)
                for suffix in (".up", ".down"):
                    os.mkfifo(f"{path}{suffix}", 0o600)
            else:
                self.fd = self._keep(os.open(path, flags))
                if os.fstat(self.fd).st_size != self.size:
                    raise EndpointError(f"shared-memory segment {path} has the wrong size")
            # O_RDWR: a FIFO opens without waiting for its other end, and never reads as closed.
            up = self._keep(os.open(f"{path}.up", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
            down = self._keep(os.open(f"{path}.down", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
            self.bell_in, self.bell_out = (up, down) if server else (down, up)
            fcntl.flock(self.bell_in, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "alive", until this process ends
            self.mm = mmap.mmap(self.fd, self.size)
        except BaseException:
            self.close()
            if server:
                self.unlink()
            raise
        self.buf = memoryview(self.mm)
        # The seqs as aligned native words: one whole store, one whole load. struct's "<Q" goes byte by
        # byte, so a side spinning on it read half-written seqs (0 for 256), and the server took a request twice.
        self._seqs = self.buf[:CONTROL].cast("Q")
        self._incoming, self._outgoing = (REQUEST_SEQ // 8, REPLY_SEQ // 8) if server else (REPLY_SEQ // 8, REQUEST_SEQ // 8)
        self._poller = select.poll()
        self._poller.register(self.bell_in, select.POLLIN)
        self.created = time.monotonic()

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    @classmethod
    def create(cls, folder: Path, area_bytes: int) -> Channel:
        """The server's side of a new channel, under a random name in `folder`."""
        return cls(folder / f"tsqp-shm-{secrets.token_hex(16)}", area_bytes, server=True)

    @classmethod
    def attach(cls, offer: dict[str, Any]) -> Channel:
        """The client's side of the channel the server offered at HELLO; unlinks its files."""
        path, area = offer.get("path"), offer.get("area_bytes")
        if not isinstance(path, str) or not isinstance(area, int) or isinstance(area, bool) or area <= DATA:
            raise ProtocolError(f"malformed shared-memory offer {offer!r}")
        try:
            channel = cls(Path(path), area, server=False)
        except OSError as e:
            raise EndpointError(f"cannot open the server's shared-memory segment {path}: {e.strerror}") from None
        channel.unlink()
        channel.buf[ATTACHED] = 1
        return channel

    def unlink(self) -> None:
        for name in (str(self.path), f"{self.path}.up", f"{self.path}.down"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass

    # --- messages -----------------------------------------------------------

    def fits(self, frames: Sequence[Any]) -> bool:
        return len(frames) <= MAX_FRAMES and frames_size(frames) <= self.area_bytes

    def post(self, frames: Sequence[Any], seq: int) -> None:
        """Write `frames` into this side's outgoing area, then `seq`, then ring (the caller checked `fits`)."""
        views = [memoryview(f) for f in frames]
        self.write(Layout.of([v.nbytes for v in views]), views)
        self.post_seq(seq)

    def write(self, layout: Layout, frames: Sequence[Any]) -> None:
        """Write `layout`'s table and its first `len(frames)` frames into the outgoing area (the frames after
        them are in place already: a product written into `outgoing`); `post_seq` then posts the message."""
        base, buf = self.outgoing_area, self.buf
        for offset, n, frame in zip(layout.offsets, layout.lengths, frames):
            if n:  # an empty tensor's view (a zero in its shape) cannot be cast to bytes
                buf[base + offset : base + offset + n] = memoryview(frame).cast("B")
        buf[base : base + TABLE.size] = layout.table

    def post_over_zmq(self, seq: int) -> None:
        """Tell the client that reply `seq` went over ZeroMQ."""
        struct.pack_into("<I", self.buf, self.reply_area, OVER_ZMQ)
        self.post_seq(seq)

    def post_seq(self, seq: int) -> None:
        self.busy = False
        self._seqs[self._outgoing] = seq
        try:
            os.write(self.bell_out, b"\1")
        except BlockingIOError:
            pass  # the pipe is full of unread rings: the peer wakes anyway

    def read(self, into: memoryview | None = None) -> list[memoryview] | None:
        """The frames in the incoming area, copied once into `into` (the server's buffer for this
        channel), or into new memory: the peer could change shared memory under the reader's checks,
        and the next message reuses the area. None when the reply went over ZeroMQ."""
        base = self.incoming_area
        count, _, *lengths = TABLE.unpack_from(self.buf, base)  # read once: later writes change nothing
        if count == OVER_ZMQ and not self.server:
            return None
        if count > MAX_FRAMES:
            raise ProtocolError(f"shared-memory message declares {count} frames, limit {MAX_FRAMES}")
        offsets, end = [], DATA
        for n in lengths[:count]:
            offsets.append(end)
            end += _aligned(n)
        if end > self.area_bytes:
            raise ProtocolError(f"shared-memory message of {end} bytes exceeds its area of {self.area_bytes}")
        if into is None:
            out = memoryview(bytearray(self.buf[base : base + end]))
        else:
            out = into
            out[DATA:end] = self.buf[base + DATA : base + end]
        return [out[o : o + n] for o, n in zip(offsets, lengths[:count])]

    def incoming_seq(self) -> int:
        return self._seqs[self._incoming]

    # --- waiting ------------------------------------------------------------

    def posted(self, seq: int) -> Callable[[], bool]:
        """A cheap test, for spinning, of whether the peer has posted `seq`."""
        seqs, incoming = self._seqs, self._incoming
        return lambda: seqs[incoming] == seq

    def wait(self, seq: int, spinner: Spinner, deadline: float, on_idle: Callable[[], None], expected_s: float = 0.0) -> None:
        """Until the peer posts `seq`: spin (as `spinner` says), then block on the doorbell; `on_idle` runs
        between blocked slices (it raises to give up), and a dead peer or the deadline raise `EndpointError`.

        A message expected to take longer than the spin budget and less than a blocked slice (`expected_s`, the last
        like one's time; a dead peer is still seen within a slice) is first waited for blocked until about half a
        budget before it is due (`_doze`), then spun for until half a budget after: a spin that ran out, and the
        wake-up after it, cost a 5 ms lm_head ~285 µs a token on the 2-core VM."""
        spin_until = 0.0
        if BLOCK_SLICE_S > expected_s > spinner.budget_s > 0:  # (a longer one: the wake-up is small beside it)
            spin_until = time.perf_counter() + expected_s + spinner.budget_s / 2
            if self._doze(seq, expected_s - spinner.budget_s / 2):
                return
        if spinner.wait_for(self.posted(seq), until=spin_until):
            return
        while True:
            if self._poller.poll(BLOCK_SLICE_S * 1000):
                self.drain()
            if self.incoming_seq() == seq:
                return
            on_idle()
            if not self.peer_alive():
                raise EndpointError("the peer's end of the shared-memory channel died")
            if time.monotonic() > deadline:
                raise TimeoutError

    def _doze(self, seq: int, seconds: float) -> bool:
        """Block on the doorbell for at most `seconds` (whole milliseconds, rounded down: never past them), or until
        the peer rings; whether `seq` is posted. (A ring drained here is looked for here: the blocking wait that may
        follow polls before it looks.)"""
        ms = int(seconds * 1000)
        if ms > 0 and self.incoming_seq() != seq and self._poller.poll(ms):
            self.drain()
        return self.incoming_seq() == seq

    def drain(self) -> None:
        try:
            while os.read(self.bell_in, 4096):
                pass
        except BlockingIOError:
            pass

    def peer_alive(self) -> bool:
        """False once the other side's process is gone (its lock is free), or never attached."""
        if self.server and not self.buf[ATTACHED]:
            return False
        try:
            fcntl.flock(self.bell_out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.bell_out, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        """Unmap and close; the memory goes once the peer has done the same (or died)."""
        self.closed = True
        self.views.clear()
        for view in (getattr(self, "_seqs", None), getattr(self, "buf", None)):
            if view is not None:
                view.release()
        mm = getattr(self, "mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a frame view still alive: the mapping goes with it
                pass
        for fd in self._fds:
            os.close(fd)
        self._fds = []
