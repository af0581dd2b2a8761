"""The TEE process's resources: large buffers freed go back to the system (`tee/memory.py`); numpy's BLAS keeps one thread (`tsqp/__init__`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Large blocks freed between small allocations that stay: the pattern of otp's set-up and mask making.
SCRIPT = """
import sys, torch
from tsqp.tee.memory import return_large_buffers
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
if sys.argv[1] == "policy":
    assert return_large_buffers()
before, kept = rss_mib(), []
for _ in range(60):
    blocks = [torch.ones(1 << 19, dtype=torch.float64) for _ in range(2)]  # 4 MiB each, written
    kept.append(torch.ones(4096))  # 16 KiB that stays, placed after them
    del blocks
print(rss_mib() - before)
"""


def _retained_mib(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc are Linux's")
def test_freed_large_buffers_leave_the_process() -> None:
    assert _retained_mib("policy") < 24  # 60 x 16 KiB kept, the rest returned
    assert _retained_mib("default") > 120  # glibc's own policy keeps the freed blocks behind the small ones


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
