"""What a curious server keeps: every request it receives, written to a folder (`serve-gpu --record`).

Layout: `index.jsonl`, one line per request `{"n", "op", "args", "client", "files"}`, and one
`.npy` file per tensor (`N-I.npy`, bfloat16 stored as float32). `tsqp audit` reads it back
with `read_recording`; nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

INDEX = "index.jsonl"


@dataclass
class Recorded:
    n: int
    op: str
    args: dict[str, Any]
    client: str
    tensors: list[np.ndarray]


class Recorder:
    """Appends every request to `folder`; args JSON cannot hold (bytes from a hostile client) are kept as their repr."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.folder / INDEX
        # A folder recorded into before goes on where it ended: new files must not overwrite old ones.
        self.count = sum(1 for _ in index.open(encoding="utf-8")) if index.exists() else 0
        self._index = open(self.folder / INDEX, "a", encoding="utf-8")

    def write(self, op: str, args: dict[str, Any], tensors: list[torch.Tensor], client: str) -> None:
        files = []
        for i, t in enumerate(tensors):
            name = f"{self.count:07d}-{i}.npy"
            array = (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
            np.save(self.folder / name, array, allow_pickle=False)
            files.append(name)
        self._index.write(json.dumps({"n": self.count, "op": op, "args": args, "client": client, "files": files}, default=repr) + "\n")
        self._index.flush()
        self.count += 1

    def close(self) -> None:
        self._index.close()


def read_recording(folder: str | os.PathLike[str]) -> Iterator[Recorded]:
    folder = Path(folder)
    with open(folder / INDEX, encoding="utf-8") as index:
        for line in index:
            entry = json.loads(line)
            tensors = [np.load(folder / name, allow_pickle=False) for name in entry["files"]]
            yield Recorded(entry["n"], entry["op"], entry["args"], entry["client"], tensors)
