"""Handing back the pages of read-only weight files a process has finished reading.

Weights load as read-only mappings of their safetensors files: a page becomes resident when
read. The TEE reads every weight once to quantize it for `otp`, and after that needs only its
compact copy; the float32 pages would otherwise stay resident (and count in its memory) for
nothing. Dropping a page of a private file mapping that was never written is safe: the next
read faults it in again from the file, unchanged.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

MADV_DONTNEED = 4


def release_file_pages(suffix: str = ".safetensors") -> int:
    """Drop this process's resident pages of every mapping of a `suffix` file that holds no written
    (copy-on-write) page; returns the bytes of mappings released. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end in _clean_file_mappings(suffix):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += end - start
    return released


def _clean_file_mappings(suffix: str) -> list[tuple[int, int]]:
    """(start, end) of each mapping of a `suffix` file with no anonymous page (nothing ever written)."""
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    found, current = [], None
    for line in smaps:
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):  # a mapping's header
            current = None
            if len(fields) >= 6 and fields[-1].endswith(suffix) and fields[1].endswith("p"):  # private
                start, end = (int(a, 16) for a in fields[0].split("-"))
                current = (start, end)
        elif current is not None and fields[:1] == ["Anonymous:"] and fields[1] == "0":
            found.append(current)
            current = None
    return [(start, end) for start, end in found if start % mmap.PAGESIZE == 0]
