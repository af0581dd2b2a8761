"""The TEE process's resources: large buffers freed go back to the system (`tee/memory.py`); numpy's BLAS keeps one thread (`tsqp/__init__`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Large blocks freed between small allocations that stay: the pattern of otp's set-up and mask making.
# Under the policy each large block is a mapping of its own (mallinfo2's hblkhd grows while one lives)
# and goes back when freed (RSS and malloc's kept free bytes stay flat). glibc's default raises its mmap
# threshold to the largest mapped block freed so far (here 16 MiB, as otp's set-up frees large ones), and
# then puts 4 MiB blocks on its heap, where a hole behind a live small allocation stays with the process:
# ~250 MiB in most runs of this pattern, 7-17 MiB in some (a block refilled the last round's hole when its
# alignment let it), so the control checks the placement, which is deterministic, not the amount.
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
large = torch.ones(1 << 21, dtype=torch.float64)  # 16 MiB, freed before the pattern
del large
mapped_before = mallinfo2().hblkhd
probe = torch.ones(1 << 19, dtype=torch.float64)  # 4 MiB
mapped = (mallinfo2().hblkhd - mapped_before) >> 20
del probe
before, held_before, kept = rss_mib(), mallinfo2().fordblks, []
for _ in range(60):
    blocks = [torch.ones(1 << 19, dtype=torch.float64) for _ in range(2)]  # 4 MiB each, written
    kept.append(torch.ones(4096))  # 16 KiB that stays, placed after them
    del blocks
print(mapped, rss_mib() - before, (mallinfo2().fordblks - held_before) >> 20)
"""


def _pattern(mode: str) -> tuple[int, int, int]:
    """(MiB mapped for one live 4 MiB block, RSS grown, free memory malloc keeps) after the pattern above."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    mapped, rss, held = done.stdout.split()[-3:]
    return int(mapped), int(rss), int(held)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc are Linux's")
def test_freed_large_buffers_leave_the_process() -> None:
    mapped, rss, held = _pattern("policy")
    assert mapped >= 4 and rss < 24 and held < 24  # a mapping of its own; 60 x 16 KiB kept, the rest returned
    assert _pattern("default")[0] == 0  # glibc's own policy, its threshold raised: on the heap


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
