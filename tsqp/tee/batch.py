"""Continuous batching in the TEE: many sequences decode together, one backend call per linear op and step.

Sequences join and leave between steps, each with its own KV cache and sampling state.
A step runs `Llama.forward_many` once over every active sequence: a decoding sequence
contributes its last token, a newcomer a chunk of its prompt (at most `prefill_chunk`
prompt tokens per step in all, so a long prompt never stalls the others' decode). The
round trips per step are those of one sequence, whatever the number of sequences.
Shields see ordinary rows: otp takes a fresh mask for every row, seqmix mixes within
one sequence only (`LinearBackend` groups).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from tsqp.tee.generation import Decoder, Generation, Sampling, check_fits, timings
from tsqp.tee.llama import KVCache, Llama

PREFILL_CHUNK = 64  # prompt tokens per step, over all newcomers: bounds the decode stall a long prompt causes
MAX_BATCH = 16  # sequences decoding at once; more wait their turn


@dataclass
class Request:
    """One sequence: its prompt, sampling state and cache; `done` is set once it has a result or an error."""

    prompt_ids: list[int]
    decoder: Decoder
    cache: KVCache
    fed: int = 0  # prompt tokens already in the cache
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False
    error: BaseException | None = None
    result: Generation | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[Request], None] | None = None

    def cancel(self) -> None:
        """Leave at the next step (the client went away); the result keeps what was generated."""
        self.cancelled = True

    def wait(self) -> Generation:
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Batcher:
    """The scheduler: `submit` from any thread; `step` (or `serve_forever` in one thread) runs the batched passes."""

    def __init__(self, llama: Llama, eos_ids: Collection[int] = (), prefill_chunk: int = PREFILL_CHUNK, max_batch: int = MAX_BATCH) -> None:
        if prefill_chunk < 1 or max_batch < 1:
            raise ValueError("prefill_chunk and max_batch must be at least 1")
        self.llama, self.eos_ids = llama, eos_ids
        self.prefill_chunk, self.max_batch = prefill_chunk, max_batch
        self.pending: deque[Request] = deque()
        self.active: list[Request] = []
        self.steps = 0
        self.last_error: BaseException | None = None  # what the last failed step raised; None once a step succeeds
        self._wake = threading.Condition()

    def submit(self, prompt_ids: Sequence[int], sampling: Sampling, on_token: Callable[[int], bool | None] | None = None,
               on_done: Callable[[Request], None] | None = None) -> Request:  # fmt: skip
        """Queue a sequence; bad parameters or a prompt beyond the context raise `InputError` here, at once."""
        sampling.validate()
        check_fits(self.llama, prompt_ids, sampling.max_new_tokens)
        decoder = Decoder(prompt_ids, sampling, self.eos_ids, on_token)
        request = Request(list(prompt_ids), decoder, self.llama.new_cache(len(prompt_ids) + sampling.max_new_tokens), on_done=on_done)
        with self._wake:
            self.pending.append(request)
            self._wake.notify()
        return request

    def idle(self) -> bool:
        return not self.pending and not self.active

    def step(self) -> None:
        """One batched forward over every active sequence; finished ones leave, waiting ones join."""
        with self._wake:
            while self.pending and len(self.active) < self.max_batch:
                self.active.append(self.pending.popleft())
        for request in [r for r in self.active if r.cancelled]:
            self._finish(request)
        plan = self._plan()
        if not plan:
            return
        try:
            logits = self.llama.forward_many([(torch.tensor([ids]), r.cache) for r, ids, _ in plan], wants_logits=[want for _, _, want in plan])
        except BaseException as e:
            self.fail_all(e)  # the accelerator is gone, or answered wrongly: every sequence of the batch shares its fate
            if not isinstance(e, Exception):
                raise
            return
        self.steps += 1
        self.last_error = None
        for (request, ids, want), row in zip(plan, logits):
            if request.fed < len(request.prompt_ids):
                request.fed += len(ids)
            if not want:
                continue
            assert row is not None
            request.first_token = request.first_token or time.perf_counter()
            try:
                request.decoder.next(row[0, -1])  # sampling and the caller's on_token
            except Exception as e:  # noqa: BLE001 - one sequence's failure (its callback) ends it alone
                self.active.remove(request)
                request.error = e
                self._done(request)
                continue
            if request.decoder.finish_reason is not None:
                self._finish(request)

    def _plan(self) -> list[tuple[Request, list[int], bool]]:
        """This step's rows: each decoding sequence's last token, then prompt chunks in arrival order.

        A prompt is cut at multiples of `prefill_chunk` from its own start, whatever else runs,
        so a sequence's numbers (and its greedy answer) do not depend on the other traffic. The
        chunks of a step total at most `prefill_chunk` tokens, but the first always goes.
        """
        plan, budget = [], self.prefill_chunk
        for request in self.active:
            remaining = len(request.prompt_ids) - request.fed
            if remaining == 0:
                plan.append((request, request.decoder.tokens[-1:], True))
                continue
            n = min(remaining, self.prefill_chunk)
            if n <= budget or budget == self.prefill_chunk:
                budget -= n
                plan.append((request, request.prompt_ids[request.fed : request.fed + n], n == remaining))
        return plan

    def _finish(self, request: Request) -> None:
        self.active.remove(request)
        decoder, now = request.decoder, time.perf_counter()
        first = request.first_token or now
        request.result = Generation(decoder.tokens, request.prompt_ids, finish_reason=decoder.finish_reason or "stop",
                                    timings={**timings(first - request.submitted, now - request.submitted, max(len(decoder.tokens) - 1, 0))})  # fmt: skip
        self._done(request)

    def fail_all(self, error: BaseException) -> None:
        """Every active and waiting sequence ends with `error`."""
        self.last_error = error
        with self._wake:
            failed = self.active + list(self.pending)
            self.active, self.pending = [], deque()
        for request in failed:
            request.error = error
            self._done(request)

    def _done(self, request: Request) -> None:
        request.done.set()
        if request.on_done is not None:
            request.on_done(request)

    def run(self) -> None:
        """Step until every submitted sequence has finished (the synchronous API)."""
        while not self.idle():
            self.step()

    def serve_forever(self, stop: threading.Event, on_idle: Callable[[], bool] | None = None) -> None:
        """The serving loop: step while busy, until `stop` is set; nothing else ends it.

        While idle it calls `on_idle` (a short piece of offline work, e.g. masks for later)
        until that returns False, then sleeps until a request comes.
        """
        more_idle_work = on_idle is not None
        while not stop.is_set():
            with self._wake:
                idle = self.idle()
                if idle and not more_idle_work:
                    self._wake.wait(0.1)
                    more_idle_work = on_idle is not None
                    continue
            try:
                if idle:
                    more_idle_work = bool(on_idle())  # type: ignore[misc]
                else:
                    self.step()
            except Exception as e:  # noqa: BLE001 - a bug must fail the requests in flight, not stop the service
                self.fail_all(e)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()
