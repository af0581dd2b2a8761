"""The OpenAI-compatible HTTP API of `tsqp serve-tee`, served from inside the trusted process.

Requests become sequences of one `Batcher` (continuous batching): a thread steps it, every
linear op of a step one call to the accelerator for all requests in flight. The event loop
only parses, tokenizes and relays text: tokens travel from the engine thread to each
request's asyncio queue.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
parameter, 401 for a missing or wrong API key, 404 for another model, 413 for a prompt beyond
the context, 503 when the accelerator is gone, 502 when it answered wrongly (a shield's
verification failed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tsqp.errors import ContextTooLong, InputError, IntegrityError, RemoteError, ServerUnavailable, TsqpError
from tsqp.shields.backend import ShieldedBackend
from tsqp.tee.batch import Request as BatchedSequence
from tsqp.tee.generation import Generation, Sampling
from tsqp.tee.session import Session, TextStream

log = logging.getLogger("tsqp.serve_tee")

DEFAULT_MAX_TOKENS = 512  # when a request names none (OpenAI's default is "up to the context")
MAX_N = 8  # choices per request: each is one more sequence in the batch
MAX_BODY_BYTES = 4 << 20
TOP_UP_ROWS = 16  # mask rows per call site made in one idle slice  # a request body beyond this gets a 413 before it is parsed


# --- request bodies ------------------------------------------------------------------------------


class _Sampled(BaseModel):
    """The parameters both endpoints share; unknown OpenAI fields are accepted and ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # -1 or 0: off (vLLM uses -1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    return_token_ids: bool = False  # vLLM's extension: the prompt's and each choice's token ids
    ignore_eos: bool = False  # vLLM's extension: decode exactly max_tokens (benchmarks)

    def sampling(self, max_tokens: int | None, index: int) -> Sampling:
        seed = None if self.seed is None else self.seed + index  # n choices of one seeded request differ, reproducibly
        return Sampling(max_tokens or DEFAULT_MAX_TOKENS, self.temperature, self.top_p, max(self.top_k, 0), self.repetition_penalty, seed, self.ignore_eos)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InputError("stop takes at most 4 non-empty strings")
        return stops


class _ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart]

    def as_template(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampled):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampled):
    prompt: str | list[int]


# --- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(error: BaseException) -> ApiError:
    """The HTTP status and OpenAI error body for what went wrong while serving a request."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ContextTooLong):
        return ApiError(413, str(error), code="context_length_exceeded")
    if isinstance(error, InputError):
        return ApiError(400, str(error))
    if isinstance(error, (ServerUnavailable, RemoteError)):
        return ApiError(503, f"the accelerator is unavailable: {error}", "service_unavailable_error", "accelerator_unavailable")
    if isinstance(error, IntegrityError):
        return ApiError(502, str(error), "integrity_error", "integrity_check_failed")
    if isinstance(error, TsqpError):
        return ApiError(500, str(error), "server_error")
    return ApiError(500, f"internal error: {type(error).__name__}", "server_error")


# --- the engine: one batcher stepped by one thread -------------------------------------------------


@dataclass
class _Choice:
    """One sequence of a request, relayed to the event loop: text deltas, then its result or error."""

    index: int
    stream: TextStream
    sequence: BatchedSequence | None = None


@dataclass
class _Job:
    choices: list[_Choice]
    prompt_ids: list[int]
    events: asyncio.Queue[tuple[int, str, Any]] = field(default_factory=asyncio.Queue)

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.sequence is not None:
                choice.sequence.cancel()


class Engine:
    """The session's batcher, stepped by a thread; `submit` is called on the event loop."""

    def __init__(self, session: Session, prefill_chunk: int, max_batch: int, keep_masks: int = 0) -> None:
        self.session = session
        self.batcher = session.batcher(prefill_chunk, max_batch)
        self.keep_masks = keep_masks  # mask rows per call site the idle engine keeps ready (the offline phase)
        self.idle_offline_s = 0.0  # the part of the shield's offline_s spent while idle
        # HF fast tokenizers are not safe to share between threads: the event loop encodes, the engine decodes
        self.tokenizer_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.batcher.serve_forever, args=(self._stop, self._top_up), name="tsqp-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.batcher.wake()
        self._thread.join(10)

    def _pool(self) -> Any:
        backend = self.session.backend
        return backend.shield.pool if isinstance(backend, ShieldedBackend) else None

    def _top_up(self) -> bool:
        """Idle time: refill the mask pool towards `keep_masks` rows, a chunk at a time (a request waits at most one chunk)."""
        pool = self._pool()
        if pool is None or not self.keep_masks:
            return False
        ready = min(pool.available(site) for site in pool.sites)
        if ready >= self.keep_masks:
            return False
        times = self.session.backend.shield.times
        before = times.offline_s
        self.session.backend.shield.prepare(min(self.keep_masks, ready + TOP_UP_ROWS))
        self.idle_offline_s += times.offline_s - before
        return True

    def stats(self) -> dict[str, Any]:
        """Counters since start: batched steps, sequences, the accelerator link and the shield (round trips per step = their ratio)."""
        pool = self._pool()
        return {"steps": self.batcher.steps, "active": len(self.batcher.active), "pending": len(self.batcher.pending),
                "masks_ready": min(pool.available(s) for s in pool.sites) if pool is not None else None, "idle_offline_s": self.idle_offline_s,
                **self.session.wire_snapshot()}  # fmt: skip

    def healthy(self) -> str | None:
        """None when the accelerator is believed reachable; else why not."""
        server = self.session.private_server
        if server is not None and not server.alive():
            return "the private accelerator server has exited"
        error = self.batcher.last_error
        return str(error) if isinstance(error, (ServerUnavailable, RemoteError)) else None

    def submit(self, prompt_ids: list[int], body: _Sampled, max_tokens: int | None) -> _Job:
        loop = asyncio.get_running_loop()
        stops = body.stop_strings()
        job = _Job([], prompt_ids)

        def relay(index: int, kind: str, payload: Any) -> None:  # engine thread -> event loop
            loop.call_soon_threadsafe(job.events.put_nowait, (index, kind, payload))

        for index in range(body.n):
            stream = TextStream(self.session.model.tokenizer, lambda text, i=index: relay(i, "text", text), stops, self.tokenizer_lock)
            choice = _Choice(index, stream)
            job.choices.append(choice)

            def done(sequence: BatchedSequence, choice: _Choice = choice) -> None:
                if sequence.error is not None:
                    relay(choice.index, "error", sequence.error)
                    return
                assert sequence.result is not None
                sequence.result.text = choice.stream.finish()  # flushes text held back for a stop string first
                relay(choice.index, "done", sequence.result)

            try:
                choice.sequence = self.batcher.submit(prompt_ids, body.sampling(max_tokens, index), on_token=choice.stream.push, on_done=done)
            except BaseException:
                job.cancel()
                raise
        return job


# --- the application --------------------------------------------------------------------------------


def create_app(engine: Engine, model_id: str, api_keys: Sequence[str] = ()) -> FastAPI:
    """The FastAPI application: /v1/chat/completions, /v1/completions, /v1/models and /health."""
    app = FastAPI(title="tsqp serve-tee", docs_url=None, redoc_url=None, openapi_url=None)
    session = engine.session
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(
            400, f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", "invalid request")), param=where or None
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        if not isinstance(e, TsqpError):
            log.error("unexpected error serving a request", exc_info=e)  # a bug: the client gets a 500, the operator the traceback
        return api_error(e).response()

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Any]) -> Any:
        if request.url.path != "/health" and api_keys and not _authorized(request.headers.get("authorization", ""), api_keys):
            return ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", "authentication_error", "invalid_api_key").response()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return ApiError(413, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB", code="request_too_large").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = engine.healthy()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "error": problem}, status_code=503)
        return JSONResponse({"status": "ok", "model": model_id, "shield": session.shield_info()["shield"]})

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_id, created, session.model.config.max_seq_len)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(name, model_id)
        return _model_card(model_id, created, session.model.config.max_seq_len)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        _check_model(body.model, model_id)
        prompt_ids = _or_400(engine, lambda: session.chat_ids([m.as_template() for m in body.messages]))
        return await _respond(engine, body, prompt_ids, body.max_completion_tokens or body.max_tokens, "chat.completion", model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        _check_model(body.model, model_id)
        prompt_ids = _or_400(engine, lambda: _completion_ids(session, body.prompt))
        return await _respond(engine, body, prompt_ids, body.max_tokens, "text_completion", model_id)

    return app


def _authorized(header: str, keys: Sequence[str]) -> bool:
    scheme, _, token = header.partition(" ")
    # compare_digest against every key: the time taken says nothing about which key nearly matched
    matches = [hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys]  # a list: no short cut
    return scheme.lower() == "bearer" and any(matches)


def _check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(404, f"the model {name!r} does not exist here; this server serves {model_id!r}", "not_found_error", "model_not_found", "model")


def _model_card(model_id: str, created: int, context: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "tsqp", "max_model_len": context}


def _or_400(engine: Engine, make: Callable[[], list[int]]) -> list[int]:
    try:
        with engine.tokenizer_lock:
            return make()
    except TsqpError as e:
        raise api_error(e if isinstance(e, InputError) else InputError(str(e))) from None


def _completion_ids(session: Session, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return session.prompt_ids(prompt, chat=False)
    vocab = session.model.config.vocab_size
    if not prompt or not all(0 <= t < vocab for t in prompt):
        raise InputError(f"a token-id prompt needs at least one id, each in 0..{vocab - 1}")
    return list(prompt)


async def _respond(engine: Engine, body: _Sampled, prompt_ids: list[int], max_tokens: int | None, kind: str, model_id: str) -> Any:
    try:
        job = engine.submit(prompt_ids, body, max_tokens)
    except TsqpError as e:
        raise api_error(e) from None
    usage_chunk = bool((body.stream_options or {}).get("include_usage"))
    reply = _Reply(kind, model_id, job, body.return_token_ids, body.stream, usage_chunk)
    if not body.stream:
        try:
            return await reply.collect()
        finally:
            job.cancel()  # the client may have gone: its sequences leave at the next step
    first = await reply.first_event()  # an error before the first token is still a proper HTTP error
    return StreamingResponse(reply.stream(first), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Reply:
    """Turns a job's events into one OpenAI response object, or into its SSE chunks."""

    def __init__(self, kind: str, model_id: str, job: _Job, with_ids: bool, streaming: bool = False, usage_chunk: bool = False) -> None:
        self.kind, self.model_id, self.job, self.with_ids = kind, model_id, job, with_ids
        self.streaming, self.usage_chunk = streaming, usage_chunk
        self.id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.results: dict[int, Generation] = {}

    async def _next(self) -> tuple[int, str, Any]:
        index, what, payload = await self.job.events.get()
        if what == "error":
            self.job.cancel()
            raise api_error(payload)
        if what == "done":
            self.results[index] = payload
        return index, what, payload

    async def collect(self) -> dict[str, Any]:
        while len(self.results) < len(self.job.choices):
            await self._next()  # text deltas are in each result's text too
        return {**self._head(), "choices": [self._choice(i, self.results[i]) for i in sorted(self.results)], "usage": self._usage(), **self._prompt_ids()}

    async def first_event(self) -> tuple[int, str, Any]:
        try:
            return await self._next()
        except BaseException:
            self.job.cancel()
            raise

    async def stream(self, first: tuple[int, str, Any]) -> AsyncIterator[str]:
        try:
            if self.kind == "chat.completion":
                for choice in self.job.choices:
                    yield self._sse(
                        {**self._head(), "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                    )
            event: tuple[int, str, Any] | None = first
            while event is not None:
                chunk = self._chunk(*event)
                if chunk is not None:
                    yield self._sse(chunk)
                event = await self._next() if len(self.results) < len(self.job.choices) else None
            if self.usage_chunk:
                yield self._sse({**self._head(), "choices": [], "usage": self._usage()})
        except ApiError as e:
            yield self._sse(e.body())  # the status line is gone: the error travels as the last event, as vLLM does
        finally:
            self.job.cancel()  # a client that hung up leaves the batch at the next step
        yield "data: [DONE]\n\n"

    def _chunk(self, index: int, what: str, payload: Any) -> dict[str, Any] | None:
        chat = self.kind == "chat.completion"
        if what == "text":
            piece = {"delta": {"content": payload}} if chat else {"text": payload}
            return {**self._head(), "choices": [{"index": index, **piece, "finish_reason": None}]}
        result: Generation = payload
        ids = {"token_ids": result.token_ids} if self.with_ids else {}
        piece = {"delta": {}} if chat else {"text": ""}
        # every response carries usage: the final chunk of each choice has its own counts
        usage = {
            "prompt_tokens": len(self.job.prompt_ids),
            "completion_tokens": len(result.token_ids),
            "total_tokens": len(self.job.prompt_ids) + len(result.token_ids),
        }
        return {**self._head(), "choices": [{"index": index, **piece, "finish_reason": result.finish_reason, **ids}], "usage": usage}

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.streaming and self.kind == "chat.completion" else self.kind
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def _choice(self, index: int, result: Generation) -> dict[str, Any]:
        ids = {"token_ids": result.token_ids} if self.with_ids else {}
        if self.kind == "chat.completion":
            return {"index": index, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason, "logprobs": None, **ids}
        return {"index": index, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None, **ids}

    def _usage(self) -> dict[str, int]:
        prompt = len(self.job.prompt_ids)
        completion = sum(len(r.token_ids) for r in self.results.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _prompt_ids(self) -> dict[str, Any]:
        return {"prompt_token_ids": self.job.prompt_ids} if self.with_ids else {}

    @staticmethod
    def _sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
