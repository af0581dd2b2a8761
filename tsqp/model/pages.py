"""Handing back the pages of read-only weight files a process has finished reading.

Weights load as read-only mappings of their safetensors files: a page becomes resident when
read, and stays (counted in the process's memory) until handed back. The TEE reads its weights
only to make otp's masks, a block at a time (`fixedpoint.DerivedIntegers`), and hands each
block's pages back once read. Dropping a page of a private file mapping that was never written
is safe: the next read faults it in again from the file (from the page cache), unchanged.
Dropping an anonymous page would lose its contents: only tensors inside a clean file mapping
are ever released.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path
from typing import Any

import torch

MADV_DONTNEED = 4
FOLIO_BYTES = 2 << 20  # the largest folio a read of a mapped file maps at once (a PMD's span)


class FilePages:
    """This process's clean mappings of `suffix` files, as found when made (Linux; elsewhere none)."""

    def __init__(self, suffix: str = ".safetensors") -> None:
        self._ranges = _clean_file_mappings(suffix) if sys.platform.startswith("linux") else []
        self._madvise = _madvise() if self._ranges else None

    def holds(self, t: torch.Tensor) -> bool:
        """Whether t's bytes lie inside one clean file mapping (and so may be released)."""
        return self._mapping(t) is not None

    def release(self, t: torch.Tensor) -> bool:
        """Hand back the resident pages under t when it lies inside a clean file mapping; any other memory is left alone."""
        mapping = self._mapping(t)
        if mapping is None or self._madvise is None:
            return False
        start, end = _span(t)
        # A read maps the page cache's whole folio around it (up to 2 MiB, aligned in the file), so the
        # folios around t go too: clean file pages of the same mapping, safe to drop, bounded by it.
        start = max(start - start % FOLIO_BYTES, mapping[0])
        end = min(-(-end // FOLIO_BYTES) * FOLIO_BYTES, mapping[1])
        return self._madvise(start, end - start, MADV_DONTNEED) == 0

    def _mapping(self, t: torch.Tensor) -> tuple[int, int] | None:
        if not t.is_contiguous() or t.device.type != "cpu" or not t.numel():
            return None
        start, end = _span(t)
        return next(((a, b) for a, b in self._ranges if a <= start and end <= b), None)


def _span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def _madvise() -> Any:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


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
