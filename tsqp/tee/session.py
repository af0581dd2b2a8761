"""The Python API: a trusted session that generates text with linear ops on a server.

    with tsqp.connect("tcp://127.0.0.1:5555") as session:
        result = session.generate("What is the capital of France?", max_new_tokens=32)
        print(result.text, result.timings["decode_tokens_per_s"])

Without an endpoint, `connect` starts a private `tsqp serve-gpu` for the session and
stops it on close; `local=True` runs the linear ops in-process (all-in-TEE baseline).
`curve_secret` and `server_key` authenticate and encrypt the link to a remote server
(see `tsqp.keys`); a private server needs none: only this user can reach its socket.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tsqp import PROCESS_STARTED
from tsqp.errors import AuthError, InputError, ShieldError, TsqpError
from tsqp.model.linear import LinearWeights, max_reply_bytes, output_widths
from tsqp.model.loading import DEFAULT_MODEL, LoadedModel, load, resolve
from tsqp.model.pages import FilePages
from tsqp.shields.backend import ShieldedBackend, describe, make_shield
from tsqp.shields.config import ACTIVATION_BITS, DEFAULT_SHIELD, NOISE_SCALE, WEIGHT_BITS, ShieldConfig
from tsqp.tee.batch import MAX_BATCH, PREFILL_CHUNK, Batcher
from tsqp.tee.generation import Generation, Sampling, generate
from tsqp.tee.llama import KVCache, Llama
from tsqp.tee.memory import return_large_buffers
from tsqp.tee.private_server import PrivateServer, closed_on_failure
from tsqp.wire.client import RemoteBackend
from tsqp.wire.endpoints import CONNECT_TIMEOUT_S, check_endpoint
from tsqp.wire.shm import DEFAULT_SPIN_US


class Session:
    """A loaded model (tokenizer and norms stay here) plus a backend for its linear ops."""

    def __init__(self, model: LoadedModel, backend: Any, private_server: PrivateServer | None = None,
                 offload_attention_from: int | None = None, prefill_chunk: int = 0) -> None:  # fmt: skip
        self.model = model
        self.backend = backend
        self.private_server = private_server
        self.prefill_chunk = prefill_chunk
        rows = backend.shield.max_forward_rows() if isinstance(backend, ShieldedBackend) else None
        if rows is not None:  # a shield that bounds its calls' buffers (otp on a 1B model) bounds the prefill's forwards
            self.prefill_chunk = min(prefill_chunk or rows, rows)
        # A split's runner decodes on one thread: its products run elsewhere (`Llama.decode_threads`).
        decode_threads = None if isinstance(backend, LinearWeights) else 1
        self.llama = Llama(model.config, model.hf_config, model.norms(), backend, offload_attention_from, decode_threads)

    def prompt_ids(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """The prompt's token ids: as the user's message under the chat template (after `system`, if any), or raw text."""
        check_prompt(prompt)
        if chat and self.tokenizer().chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.chat_ids(messages)
        if system:
            raise InputError("a system prompt needs the chat template (drop --no-chat), or put it in the prompt")
        return list(self.tokenizer()(prompt)["input_ids"])

    def chat_ids(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """A conversation's token ids under the model's chat template, ready for the assistant's turn."""
        tokenizer = self.tokenizer()
        if not tokenizer.chat_template:
            raise InputError(f"{self.model.path} has no chat template; send a plain completion instead")
        for message in messages:
            check_prompt(message.get("content") or "")
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def tokenizer(self) -> Any:
        if self.model.tokenizer is None:
            raise TsqpError(f"{self.model.path} has no tokenizer; pass token ids instead of text")
        return self.model.tokenizer

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        on_text: Callable[[str], None] | None = None,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        system: str | None = None,
        cache: KVCache | None = None,
    ) -> Generation:
        """One answer. `stop` strings end it (they are not part of the text); `cache` continues a conversation (see `tsqp chat`)."""
        ids = prompt if isinstance(prompt, list) else self.prompt_ids(prompt, chat, system)
        streamer = TextStream(self.model.tokenizer, on_text, stop)
        before = self.wire_snapshot()
        result = generate(self.llama, ids, max_new_tokens, self.model.eos_token_ids(), temperature, top_p, seed,
                          on_token=streamer.push, top_k=top_k, repetition_penalty=repetition_penalty, cache=cache,
                          prefill_chunk=self.prefill_chunk)  # fmt: skip
        result.text = streamer.finish()
        result.timings.update(self._wire_delta(before))
        result.timings["first_token_s_since_start"] = streamer.first_token_at - PROCESS_STARTED if streamer.first_token_at else 0.0
        return result

    def batcher(self, prefill_chunk: int = PREFILL_CHUNK, max_batch: int = MAX_BATCH) -> Batcher:
        """A continuous-batching scheduler over this session's model and backend (see `tsqp.tee.batch`)."""
        return Batcher(self.llama, self.model.eos_token_ids(), prefill_chunk, max_batch)

    def generate_many(
        self,
        prompts: Sequence[str | list[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> list[Generation]:
        """Answers to several prompts decoded together: every linear op of a step is one call carrying all their rows.

        Each answer equals what `generate` gives for its prompt alone (greedy; sampled with a seed, each
        prompt draws from its own generator seeded with `seed`).
        """
        batcher = self.batcher(prefill_chunk, max(len(prompts), 1))
        sampling = Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        streams = [TextStream(self.model.tokenizer, None, stop) for _ in prompts]
        requests = [batcher.submit(p if isinstance(p, list) else self.prompt_ids(p, chat), sampling, on_token=stream.push)
                    for p, stream in zip(prompts, streams)]  # fmt: skip
        batcher.run()
        results = [request.wait() for request in requests]
        for result, stream in zip(results, streams):
            result.text = stream.finish()
        return results

    def shield_info(self) -> dict[str, Any]:
        """Which shield protects this session's linear ops, and how (for reports)."""
        if isinstance(self.backend, ShieldedBackend):
            return {**describe(self.backend.shield), "verify": self.backend.verify}
        return {"shield": "local" if isinstance(self.backend, LinearWeights) else "plain", "verify": False}

    def wire_snapshot(self) -> dict[str, float]:
        stats = getattr(self.backend, "stats", None)
        return stats.as_dict() if stats is not None else {}

    def _wire_delta(self, before: dict[str, float]) -> dict[str, float]:
        after = self.wire_snapshot()
        return {key: after[key] - before.get(key, 0) for key in after}

    def close(self) -> None:
        if isinstance(self.backend, (RemoteBackend, ShieldedBackend)):
            self.backend.close()
        if self.private_server is not None:
            self.private_server.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_prompt(prompt: str) -> None:
    """Refuse, the same with or without a chat template, a prompt with no text or text that is not UTF-8.

    Bytes that are not UTF-8 reach Python as lone surrogates (from argv or stdin); guessing what
    they meant would change the user's words silently, so they are refused, not replaced.
    """
    if not prompt:
        raise InputError("the prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the prompt is not valid UTF-8 (byte {e.start} of its text); give UTF-8 text") from None


class TextStream:
    """Turns generated ids into text deltas; decoding the whole tail keeps multi-byte characters whole.

    With `stop` strings, `push` returns True once the text contains one: the text ends before it,
    and a tail that could still grow into one is held back from `on_text` until it cannot.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None, stop: Sequence[str] = (), lock: Any = None) -> None:
        if stop and tokenizer is None:
            raise InputError("stop strings need the model's tokenizer")
        if any(not s for s in stop):
            raise InputError("a stop string is empty")
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, list(stop)
        self.lock = lock or contextlib.nullcontext()  # a tokenizer shared between threads is used by one at a time
        self.ids: list[int] = []
        self.text = ""  # all decoded text, up to a stop string
        self.sent = 0  # characters of it handed to on_text
        self.stopped = False
        self.first_token_at: float | None = None

    def push(self, token: int) -> bool:
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.ids.append(token)
        if self.tokenizer is None or self.stopped:
            return self.stopped
        with self.lock:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return False  # an incomplete multi-byte character: wait for the next token
        self.text = text
        hits = [i for i in (text.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
        self._send(len(self.text) if self.stopped else len(self.text) - self._held_back())
        return self.stopped

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1) if self.text.endswith(s[:n])), default=0)

    def _send(self, upto: int) -> None:
        if upto > self.sent and self.on_text is not None:
            self.on_text(self.text[self.sent : upto])
        self.sent = max(self.sent, upto)

    def finish(self) -> str:
        """Flush what was held back; the final text."""
        self._send(len(self.text))
        return self.text


def connect(
    endpoint: str | None = None,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    local: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    timeout_s: float = 60.0,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    offload_attention_from: int | None = None,
    progress: Callable[[str], Any] | None = None,
    on_send: Callable[[str, Any], None] | None = None,
    private_server: PrivateServer | None = None,
    curve_secret: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
    shield: str = DEFAULT_SHIELD,
    verify: bool | None = None,
    precompute: int = 0,
    noise_scale: float = NOISE_SCALE,
    weight_bits: int = WEIGHT_BITS,
    activation_bits: int = ACTIVATION_BITS,
    allow_broken: bool = False,
    accept_lower_precision: bool = False,
    shield_config: ShieldConfig | None = None,
    transport: str = "auto",
    spin_us: float = DEFAULT_SPIN_US,
) -> Session:
    """Open a session: to `endpoint`, to a private server (endpoint None), or in-process (`local`).

    `shield` protects every linear op (`tsqp.shields`); `verify` checks every server result
    (default: on with otp); `precompute` fills the mask pool for that many tokens before the
    first request. `allow_broken` permits a shield the audit breaks (noise, seqmix), for research only.
    `dtype` is also the precision the runner expects: a server announcing a lower one is refused
    unless `accept_lower_precision`. `shield_config`, when given, replaces those settings (and adds the
    pool's budget and the prefill chunk). `private_server`
    hands over one already started (the CLI starts it before importing torch). `transport`
    (auto, zmq, shm) and `spin_us` choose how the hot ops travel (`RemoteBackend`).
    """
    shielding = (
        shield_config or ShieldConfig(shield, verify, precompute, noise_scale, weight_bits, activation_bits, allow_broken, dtype, accept_lower_precision)
    ).validate()
    return_large_buffers()  # the TEE's memory: large buffers go back to the system when freed (`tee.memory`)
    if endpoint is not None:
        if local:
            raise InputError("a local session runs the linear ops in this process: it takes no endpoint")
        check_endpoint(endpoint)  # before anything loads
    if endpoint is None and (curve_secret is not None or server_key is not None):
        raise AuthError("CURVE keys are for a remote server: pass its endpoint too (a private server listens on a private ipc:// socket, without keys)")
    if offload_attention_from is not None and not local and (shielding.name != "plain" or shielding.verifies):
        raise ShieldError("attention offload sends attention's activations unmasked: only the plain shield without verification allows it")
    folder = resolve(model, progress)  # converts a GGUF once, before any server needs it
    if local:
        loaded = load(folder)
        backend: Any = LinearWeights(loaded.weights, loaded.config.n_layers)
        return Session(loaded, backend, offload_attention_from=offload_attention_from, prefill_chunk=shielding.prefill_chunk)
    server = private_server or (PrivateServer(folder, device, dtype, shielding, spin_us=spin_us) if endpoint is None else None)
    with closed_on_failure(server):
        if server is None:
            _check_reachable(endpoint, connect_timeout_s, curve_secret, server_key)  # in seconds, not after the model loads
        loaded = load(folder)  # while a private server loads its own copy
        if server is not None:
            server.wait_ready()
        remote = RemoteBackend(server.endpoint if server else endpoint, timeout_s, connect_timeout_s,
                               on_send=on_send, server_alive=server.alive if server else None,
                               curve_secret=curve_secret, server_key=server_key, out_features=output_widths(loaded.weights),
                               max_reply_bytes=max_reply_bytes(loaded.weights, loaded.config.max_seq_len),
                               transport=transport, spin_us=spin_us)  # fmt: skip
        try:
            remote.hello(loaded.fingerprint)
            backend = shielded(remote, loaded, shielding)
        except BaseException:
            remote.close()
            raise
    return Session(loaded, backend, server, offload_attention_from, shielding.prefill_chunk)


def _check_reachable(endpoint: str, timeout_s: float, curve_secret: Any, server_key: Any) -> None:
    """`ServerUnavailable` (or `AuthError`) within `timeout_s` when nothing usable listens at `endpoint`."""
    probe = RemoteBackend(endpoint, connect_timeout_s=timeout_s, curve_secret=curve_secret, server_key=server_key)
    try:
        probe.wait_connected()
    finally:
        probe.close()


def shielded(remote: RemoteBackend, model: LoadedModel, shielding: ShieldConfig) -> RemoteBackend | ShieldedBackend:
    """`remote` behind the configured shield; plain without verification is the bare remote backend (nothing to do).

    The server's HELLO is checked against the runner's precision first: a lower claim is refused.
    """
    precision = shielding.server_precision(remote.info.get("dtype"))
    if shielding.name == "plain" and not shielding.verifies:
        return remote
    pages = FilePages()  # the weights' file mappings, read once for the shield and the embedding lookups
    guard = make_shield(shielding, model.weights, model.config.n_layers, precision, pages)
    guard.prepare(shielding.precompute)
    return ShieldedBackend(remote, guard, model.weights["embed"], shielding.verifies, pages)
