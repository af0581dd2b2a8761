"""tsqp: shielded split inference of LLaMA-family models.

A trusted runner (TEE) keeps the data and the non-linear parts of the model and
outsources the linear algebra to an untrusted accelerator server over ZeroMQ.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

PROCESS_STARTED = time.time()  # for "time to first token since start" in run-tee's timings

# Client and server take turns on the same cores: OpenMP threads that spin after a
# product would steal the core the other side is about to use. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's BLAS computes only one-row products here (decode; larger ones go through torch): one
# thread, since a second one that the other side or another process has preempted stalls every
# product (docs/benchmarks.md: local decoding 10x slower on a busy 2-core machine). Before numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _numpy_blas_to_one_thread() -> None:
    """numpy loaded before tsqp (with torch, say) read its thread count already: set it now.
    Without this, `import torch; import tsqp` made local decoding 6x slower (250 against 42 ms a token)."""
    if "numpy" not in sys.modules or os.environ["OPENBLAS_NUM_THREADS"] != "1":
        return
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a dependency; without it, the env variable alone, as before
        return
    for library in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        if "numpy" in library.filepath:  # numpy's own, not a BLAS torch may bundle for its products
            library.set_num_threads(1)


_numpy_blas_to_one_thread()

__version__ = "0.1.0"
__all__ = ["connect", "__version__"]


def __getattr__(name: str) -> Any:  # keep `import tsqp` light: torch loads on first use
    if name == "connect":
        from tsqp.tee.session import connect

        return connect
    raise AttributeError(name)
