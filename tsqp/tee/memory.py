"""The TEE's allocator policy: large buffers get mappings of their own and go back to the system when freed.

An enclave's memory is its scarcest resource. glibc's malloc raises its mmap threshold as large
blocks are freed, so later ones come from the heap, where any long-lived allocation placed after
them keeps their pages for good: otp's set-up and mask making (megabytes of float64 blocks, freed
between the small vectors and masks that stay) left the TEE ~400 MB above what it held on SmolLM2
(docs/benchmarks.md). A fixed mmap threshold keeps large buffers out of the heap. Fixing it also
fixes the heap's trim threshold at a small default, which returns and refaults the heap's top on
every free; a larger one keeps a bounded top for reuse.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
LARGE_BYTES = 1 << 20  # from this size a buffer has its own mapping: its page faults cost little beside its use
TRIM_BYTES = 32 << 20  # free memory kept at the heap's top for reuse


def return_large_buffers() -> bool:
    """Set the policy for every later allocation of this process (glibc on Linux; elsewhere nothing). True if set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, LARGE_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1
