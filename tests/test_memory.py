"""The TEE process's resources: large buffers freed go back to the system (`tee/memory.py`); numpy's BLAS keeps one thread (`tsqp/__init__`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Large blocks freed between small allocations that stay: the pattern of otp's set-up and mask making.
# What stays is read from malloc itself (glibc's mallinfo2: free bytes it holds), not from the RSS
# alone: this VM's kernel sometimes reclaimed such idle pages (kdamond), and the default's RSS then
# fell from ~250 to 10 MiB in one run of five.
SCRIPT = """
import ctypes, sys, torch
from tsqp.tee.memory import return_large_buffers
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
if sys.argv[1] == "policy":
    assert return_large_buffers()
before, held_before, kept = rss_mib(), mallinfo2().fordblks, []
for _ in range(60):
    blocks = [torch.ones(1 << 19, dtype=torch.float64) for _ in range(2)]  # 4 MiB each, written
    kept.append(torch.ones(4096))  # 16 KiB that stays, placed after them
    del blocks
print(rss_mib() - before, (mallinfo2().fordblks - held_before) >> 20)
"""


def _retained_mib(mode: str) -> tuple[int, int]:
    """(RSS grown, free memory malloc keeps) in MiB, after the pattern above."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    rss, held = done.stdout.split()[-2:]
    return int(rss), int(held)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc are Linux's")
def test_freed_large_buffers_leave_the_process() -> None:
    rss, held = _retained_mib("policy")
    assert rss < 24 and held < 24  # 60 x 16 KiB kept, the rest returned
    assert _retained_mib("default")[1] > 120  # glibc's own policy keeps the freed blocks behind the small ones


# numpy's BLAS threads, as a process that imported torch (and so numpy) before or without tsqp sees them.
BLAS_THREADS = """
import sys, torch
if sys.argv[1] == "tsqp":
    import tsqp
from threadpoolctl import threadpool_info
print(*[i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas" and "numpy" in i["filepath"]])
"""


def test_numpy_blas_keeps_one_thread_when_torch_was_imported_first() -> None:
    """`import torch; import tsqp` left numpy's BLAS on every core, and local decoding 6x slower."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}

    def threads(mode: str) -> list[int]:
        done = subprocess.run([sys.executable, "-c", BLAS_THREADS, mode], capture_output=True, text=True, timeout=120, check=True, env=env)
        return [int(n) for n in done.stdout.split()]

    assert threads("tsqp") == [1]
    assert threads("without") != [1] or os.cpu_count() == 1  # OpenBLAS's own default: every core
