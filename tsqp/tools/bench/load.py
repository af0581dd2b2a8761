"""The load test: N runner processes decode at once against one server."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tsqp.errors import TsqpError
from tsqp.shields.config import ShieldConfig
from tsqp.tools.bench.config import BenchConfig, ProgressCounter, private_server, prompt_ids
from tsqp.tools.bench.results import LoadResult, percentile

LOAD_RUNNER_THREADS = 1  # one core per runner, like one small enclave each; the reference pass too
LOAD_START_TIMEOUT_S = 600.0  # spawning, importing torch and loading the model, N runners at once


def bench_load(config: BenchConfig, folder: Path, counter: ProgressCounter) -> list[LoadResult]:
    """For each N in `config.clients`: N runner processes decode at once against one server.

    Runner i decodes the first prompt size, shifted by i tokens along the prompt text, so every
    runner has its own prompt. Its reference answer comes from a sequential single-client pass
    (one runner process decoding every prompt in turn) against the same server.

    The runner processes start once (importing torch takes seconds) and serve every round: each
    round, each of its runners opens a fresh session, warms it up and closes it after; a runner
    not in a round holds no session.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # separate processes: separate enclaves, no shared GIL
    counter.show("load: starting the server")
    server = private_server(config, folder, modes=config.shields[:1])  # the runners' mode only: no otp weights for a plain load test
    rounds = [list(range(max(config.clients)))], *([[i] for i in range(n)] for n in config.clients)
    try:
        endpoint = server.endpoint if server is not None else config.endpoint
        assert endpoint is not None
        with _Runners(ctx, config, folder, endpoint, rounds) as runners:  # they import while the server loads
            if server is not None:
                server.wait_ready()
            runners.wait_started()
            counter.show(f"load: single-client reference answers for {max(config.clients)} prompts")
            (reference,) = runners.round(0)
            expected = reference["answers"]
            counter.done += 1
            results = []
            for r, n in enumerate(config.clients, start=1):
                counter.show(f"load: {n} concurrent client{'s' if n > 1 else ''}")
                outcomes = runners.round(r)
                counter.done += 1
                wall = max(o["ended"] for o in outcomes) - min(o["started"] for o in outcomes)
                tokens = sum(len(a) for o in outcomes for a in o["answers"])
                steps = [1000.0 * s for o in outcomes for s in o["steps"]]
                mismatched = [i for i, o in enumerate(outcomes) if o["answers"][0] != expected[i]]
                results.append(LoadResult(clients=n, aggregate_tokens_per_s=tokens / wall if wall > 0 else 0.0,
                                          step_ms={"p50": percentile(steps, 50), "p99": percentile(steps, 99)},
                                          answers_match_single_client=not mismatched, wall_s=wall, tokens=tokens,
                                          mismatched_runners=mismatched, shield=",".join(sorted({o["shield"] for o in outcomes}))))  # fmt: skip
        return results
    finally:
        if server is not None:
            server.close()


class _Runners:
    """The load test's runner processes, one per client of the largest round; `round(r)` runs rounds[r]:
    runner i decodes the prompt shifts rounds[r][i], all of the round's runners released together."""

    def __init__(self, ctx: Any, config: BenchConfig, folder: Path, endpoint: str, rounds: Sequence[list[list[int]]]) -> None:
        self.config, self.rounds = config, rounds
        self.results = ctx.Queue()
        self.barriers = [ctx.Barrier(len(groups)) for groups in rounds]  # kept: a child rebuilds each from its name
        self.commands = [ctx.Queue() for _ in range(max(len(groups) for groups in rounds))]
        # The first --shields mode, named here: `connect`'s own default (otp) would measure another mode than asked.
        args = (endpoint, str(folder), config.shield(config.shields[0]), config.prompt_tokens[0], config.new_tokens, config.timeout_s,
                config.curve_secret, config.server_key, config.transport, config.spin_us, self.barriers, self.results)  # fmt: skip
        self.processes = [ctx.Process(target=_load_runner, args=(i, commands, *args), daemon=True) for i, commands in enumerate(self.commands)]
        for p in self.processes:
            p.start()

    def wait_started(self) -> None:
        """Until every runner has imported what it needs: nothing loads while a round is measured."""
        self._collect(range(len(self.processes)), LOAD_START_TIMEOUT_S)

    def round(self, r: int) -> list[dict[str, Any]]:
        """Round r's outcomes, in runner order."""
        groups = self.rounds[r]
        for i, shifts in enumerate(groups):
            self.commands[i].put((r, shifts))
        outcomes = self._collect(range(len(groups)), LOAD_START_TIMEOUT_S + len(groups[0]) * self.config.new_tokens * self.config.timeout_s)
        return [outcomes[i] for i in range(len(groups))]

    def _collect(self, runners: range, timeout_s: float) -> dict[int, dict[str, Any]]:
        import queue as queues

        outcomes: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(outcomes) < len(runners):
            try:
                message = self.results.get(timeout=1.0)
            except queues.Empty:
                if time.monotonic() > deadline:
                    raise TsqpError("load test: the runners did not finish in time") from None
                dead = [i for i in runners if not self.processes[i].is_alive() and i not in outcomes]
                if dead:
                    try:  # a runner may have reported just before exiting
                        message = self.results.get(timeout=2.0)
                    except queues.Empty:
                        raise TsqpError(f"load test: runner {dead[0]} exited with status {self.processes[dead[0]].exitcode} without a result") from None
                else:
                    continue
            if "error" in message:
                raise TsqpError(f"load test: runner {message['runner']} failed: {message['error']}")
            outcomes[message["runner"]] = message
        return outcomes

    def __enter__(self) -> _Runners:
        return self

    def __exit__(self, *exc: object) -> None:
        for commands in self.commands:
            commands.put(None)  # stop
        for p in self.processes:
            p.join(30 if exc[0] is None else 0)
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


def _load_runner(runner: int, commands: Any, endpoint: str, folder: str, shield: ShieldConfig, prompt_tokens: int, new_tokens: int,
                 timeout_s: float, curve_secret: str | None, server_key: str | None, transport: str, spin_us: float,
                 barriers: Sequence[Any], results: Any) -> None:  # fmt: skip
    """A runner process: its imports, then for each round it is in, its own session, a warm-up, the round's
    barrier and one greedy generation per shift."""
    barrier = None
    try:
        import torch

        torch.set_num_threads(LOAD_RUNNER_THREADS)
        from tsqp.tee.generation import generate
        from tsqp.tee.session import connect

        results.put({"runner": runner, "started": True})
        while (command := commands.get()) is not None:
            r, shifts = command
            barrier = barriers[r]
            with connect(endpoint, folder, timeout_s=timeout_s, curve_secret=curve_secret, server_key=server_key, shield_config=shield,
                         transport=transport, spin_us=spin_us) as session:  # fmt: skip
                model = session.model
                prompts = [prompt_ids(model.tokenizer, prompt_tokens + s, model.config.vocab_size)[s:] for s in shifts]
                generate(session.llama, prompts[0], 2, eos_ids=())  # first calls allocate caches and buffers
                barrier.wait(LOAD_START_TIMEOUT_S)
                started = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes of the host
                answers, steps = [], []
                for ids in prompts:
                    stamps: list[float] = []
                    result = generate(session.llama, ids, new_tokens, eos_ids=(), on_token=lambda _, stamps=stamps: stamps.append(time.perf_counter()))
                    answers.append(result.token_ids)
                    steps += [b - a for a, b in zip(stamps, stamps[1:])]  # one decode forward (and its sampling) each
                ended = time.monotonic()
                shield_name = session.shield_info()["shield"]
            results.put({"runner": runner, "answers": answers, "steps": steps, "started": started, "ended": ended, "shield": shield_name})
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the bench
        if barrier is not None:
            barrier.abort()
        results.put({"runner": runner, "error": f"{type(e).__name__}: {e}"})
