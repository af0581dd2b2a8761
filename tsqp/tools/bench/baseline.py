"""The all-in-TEE baselines (`local`, `hf-generate`) in a process of their own, under their best OpenMP setting.

tsqp sets OMP_WAIT_POLICY=PASSIVE before torch loads (`tsqp/__init__`): the runner's and the server's
threads must not spin on the cores the other side is about to use. A baseline owns every core, and
there threads that wait actively after each op decoded 1.4x faster (2-core VM: `local` 32.5 against
45 ms/token, `hf-generate` 33 against 52). A process fixes its policy when OpenMP starts, so the
baselines run in a child started with `BASELINE_OMP_WAIT`, before any split mode, and report back as JSON.

    python -m tsqp.tools.bench.baseline   (reads {"config": ..., "folder": ...} on stdin; writes
                                           progress lines on stderr and the results on stdout)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tsqp.errors import TsqpError
from tsqp.tools.bench.config import BenchConfig, ProgressCounter
from tsqp.tools.bench.results import Result, Run, Stat

BASELINE_OMP_WAIT = "ACTIVE"
PROGRESS = "progress\t"  # a stderr line of the child: progress\t<runs done>\t<description>


def run_baselines(config: BenchConfig, folder: Path, counter: ProgressCounter) -> tuple[list[Result], dict[int, list[int]], str]:
    """`local` then `hf-generate` in a child process: their results, the prompts they used (the split modes'
    too) and the OpenMP wait policy the child ran under."""
    env = {**os.environ, "OMP_WAIT_POLICY": BASELINE_OMP_WAIT}
    child = subprocess.Popen([sys.executable, "-m", "tsqp.tools.bench.baseline"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    child.stdin.write(json.dumps({"config": asdict(config), "folder": str(folder)}))
    child.stdin.close()
    # Its stdout is read beside its stderr: results larger than a pipe's buffer would otherwise block
    # the child's last write while this side still waits for its stderr to end.
    out: list[str] = []
    stdout = child.stdout
    reader = threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)
    reader.start()
    start, errors = counter.done, []
    for line in child.stderr:
        if line.startswith(PROGRESS):
            _, done, description = line.rstrip("\n").split("\t", 2)
            counter.done = start + int(done)
            counter.show(description)
        elif line.strip():
            errors.append(line.rstrip())
    reader.join()
    if child.wait() != 0:
        raise TsqpError(f"the baselines' process failed (status {child.returncode}): {errors[-1] if errors else 'no output'}")
    data = json.loads(out[0])
    return [_result(r) for r in data["results"]], {int(n): ids for n, ids in data["prompts"].items()}, data["omp_wait_policy"]


def _result(data: dict[str, Any]) -> Result:
    fields = dict(data)
    fields["prefill_s"], fields["decode_tokens_per_s"] = Stat(**data["prefill_s"]), Stat(**data["decode_tokens_per_s"])
    fields["runs"] = [Run(**run) for run in data["runs"]]
    return Result(**fields)


def _child() -> None:
    from tsqp.tools.bench.runs import bench_baselines

    request = json.load(sys.stdin)
    config = BenchConfig(**request["config"])

    def progress(description: str, done: int, total: int) -> None:
        print(f"{PROGRESS}{done}\t{description}", file=sys.stderr, flush=True)

    counter = ProgressCounter(0, progress)
    results, prompts = bench_baselines(config, Path(request["folder"]), counter)
    json.dump({"results": [asdict(r) for r in results], "prompts": prompts, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}, sys.stdout)


if __name__ == "__main__":
    _child()
