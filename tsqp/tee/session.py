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

import os
import time
from collections.abc import Callable
from typing import Any

from tsqp import PROCESS_STARTED
from tsqp.errors import AuthError, InputError, ShieldError, TsqpError
from tsqp.model.linear import LinearWeights, max_reply_bytes, output_widths
from tsqp.model.loading import DEFAULT_MODEL, LoadedModel, load, resolve
from tsqp.shields.backend import ShieldedBackend, describe, make_shield
from tsqp.shields.config import ACTIVATION_BITS, DEFAULT_SHIELD, NOISE_SCALE, WEIGHT_BITS, ShieldConfig
from tsqp.tee.generation import Generation, generate
from tsqp.tee.llama import Llama
from tsqp.tee.private_server import PrivateServer, closed_on_failure
from tsqp.wire.client import RemoteBackend
from tsqp.wire.endpoints import CONNECT_TIMEOUT_S, check_endpoint


class Session:
    """A loaded model (tokenizer and norms stay here) plus a backend for its linear ops."""

    def __init__(self, model: LoadedModel, backend: Any, private_server: PrivateServer | None = None,
                 offload_attention_from: int | None = None) -> None:  # fmt: skip
        self.model = model
        self.backend = backend
        self.private_server = private_server
        self.llama = Llama(model.config, model.hf_config, model.norms(), backend, offload_attention_from)

    def prompt_ids(self, prompt: str, chat: bool = True) -> list[int]:
        tokenizer = self.model.tokenizer
        if tokenizer is None:
            raise TsqpError(f"{self.model.path} has no tokenizer; pass token ids instead of text")
        check_prompt(prompt)
        if chat and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(tokenizer(prompt)["input_ids"])

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        ids = prompt if isinstance(prompt, list) else self.prompt_ids(prompt, chat)
        streamer = _TextStream(self.model.tokenizer, on_text)
        before = self._wire_snapshot()
        result = generate(self.llama, ids, max_new_tokens, self.model.eos_token_ids(), temperature, top_p, seed,
                          on_token=streamer.push)  # fmt: skip
        result.text = streamer.text
        result.timings.update(self._wire_delta(before))
        result.timings["first_token_s_since_start"] = streamer.first_token_at - PROCESS_STARTED if streamer.first_token_at else 0.0
        return result

    def shield_info(self) -> dict[str, Any]:
        """Which shield protects this session's linear ops, and how (for reports)."""
        if isinstance(self.backend, ShieldedBackend):
            return {**describe(self.backend.shield), "verify": self.backend.verify}
        return {"shield": "local" if isinstance(self.backend, LinearWeights) else "plain", "verify": False}

    def _wire_snapshot(self) -> dict[str, float]:
        stats = getattr(self.backend, "stats", None)
        return stats.as_dict() if stats is not None else {}

    def _wire_delta(self, before: dict[str, float]) -> dict[str, float]:
        after = self._wire_snapshot()
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


class _TextStream:
    """Turns generated ids into text deltas; decoding the whole tail keeps multi-byte characters whole."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.text = ""
        self.first_token_at: float | None = None

    def push(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.time()
        self.ids.append(token)
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        delta, self.text = text[len(self.text) :], text
        if delta and self.on_text is not None:
            self.on_text(delta)


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
    shield_config: ShieldConfig | None = None,
) -> Session:
    """Open a session: to `endpoint`, to a private server (endpoint None), or in-process (`local`).

    `shield` protects every linear op (`tsqp.shields`); `verify` checks every server result
    (default: on with otp); `precompute` fills the mask pool for that many tokens before the
    first request. `shield_config`, when given, replaces those six settings. `private_server`
    hands over one already started (the CLI starts it before importing torch).
    """
    shielding = (shield_config or ShieldConfig(shield, verify, precompute, noise_scale, weight_bits, activation_bits)).validate()
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
        return Session(loaded, backend, offload_attention_from=offload_attention_from)
    server = private_server or (PrivateServer(folder, device, dtype, shielding) if endpoint is None else None)
    with closed_on_failure(server):
        if server is None:
            _check_reachable(endpoint, connect_timeout_s, curve_secret, server_key)  # in seconds, not after the model loads
        loaded = load(folder)  # while a private server loads its own copy
        if server is not None:
            server.wait_ready()
        remote = RemoteBackend(server.endpoint if server else endpoint, timeout_s, connect_timeout_s,
                               on_send=on_send, server_alive=server.alive if server else None,
                               curve_secret=curve_secret, server_key=server_key, out_features=output_widths(loaded.weights),
                               max_reply_bytes=max_reply_bytes(loaded.weights, loaded.config.max_seq_len))  # fmt: skip
        try:
            remote.hello(loaded.fingerprint)
            backend = shielded(remote, loaded, shielding)
        except BaseException:
            remote.close()
            raise
    return Session(loaded, backend, server, offload_attention_from)


def _check_reachable(endpoint: str, timeout_s: float, curve_secret: Any, server_key: Any) -> None:
    """`ServerUnavailable` (or `AuthError`) within `timeout_s` when nothing usable listens at `endpoint`."""
    probe = RemoteBackend(endpoint, connect_timeout_s=timeout_s, curve_secret=curve_secret, server_key=server_key)
    try:
        probe.wait_connected()
    finally:
        probe.close()


def shielded(remote: RemoteBackend, model: LoadedModel, shielding: ShieldConfig) -> RemoteBackend | ShieldedBackend:
    """`remote` behind the configured shield; plain without verification is the bare remote backend (nothing to do)."""
    if shielding.name == "plain" and not shielding.verifies:
        return remote
    server_dtype = str(remote.info.get("dtype", "float32"))
    guard = make_shield(shielding, model.weights, model.config.n_layers, server_dtype)
    guard.prepare(shielding.precompute)
    return ShieldedBackend(remote, guard, model.weights["embed"], shielding.verifies)
