"""A hostile server cannot hurt the runner: every kind of lying or broken reply ends in one `TsqpError`, in time.

Each reply kind is played by a proxy in front of a real server (helpers.TamperingProxy), under
each shield. Under a verifying shield a reply that is not what was asked is an integrity failure,
like any wrong number; without verification it is a malformed reply. Never a raw ValueError,
RuntimeError or a hang.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import RunningServer, TamperingProxy, start_server

from tsqp.errors import IntegrityError, MalformedReply, RemoteError, ServerUnavailable, TsqpError
from tsqp.model.loading import LoadedModel, load
from tsqp.shields.config import ShieldConfig
from tsqp.tee.session import connect
from tsqp.wire import protocol
from tsqp.wire.protocol import Message

HOSTILE_TEXT = "[bold red]boom[/] \x1b[31mred\x1b[0m [/oops] \x07"
PROMPT = [5, 17, 42, 99]
TIMEOUT_S = 10.0


def replaced(reply: Message, tensors: list[torch.Tensor], id: int | None = None) -> list[Any]:
    return protocol.encode(protocol.reply(reply.id if id is None else id, reply.args, tensors))


def with_value(value: float) -> Callable[[Message, Message], list[Any]]:
    def tamper(request: Message, reply: Message) -> list[Any]:
        t = reply.tensors[0].to(torch.float64 if reply.tensors[0].dtype == torch.int64 else reply.tensors[0].dtype).clone()
        t.view(-1)[0] = value
        return replaced(reply, [t, *reply.tensors[1:]])

    return tamper


TAMPERS: dict[str, Callable[[Message, Message], list[Any]]] = {
    "no tensors": lambda request, reply: replaced(reply, []),
    "NaN": with_value(math.nan),
    "infinity": with_value(math.inf),
    "float16": lambda request, reply: replaced(reply, [t.to(torch.float16) for t in reply.tensors]),
    "transposed": lambda request, reply: replaced(reply, [t.reshape(-1, t.shape[-1]).t().contiguous() for t in reply.tensors]),
    "extra row": lambda request, reply: replaced(reply, [torch.cat([t, t[..., :1, :]], dim=-2) for t in reply.tensors]),
    "stale id": lambda request, reply: replaced(reply, reply.tensors, id=reply.id - 1),
    "unknown id": lambda request, reply: replaced(reply, reply.tensors, id=reply.id + 1000),
}

SHIELDINGS = {
    "plain": ShieldConfig("plain", verify=False),
    "plain+verify": ShieldConfig("plain", verify=True),
    "otp": ShieldConfig("otp"),
}


@pytest.fixture(scope="module")
def honest(tiny: LoadedModel) -> Iterator[RunningServer]:
    # The proxy tampers with ZeroMQ replies: no shared-memory offer, or the client would go around it
    # (a reply read from shared memory goes through the same decode and checks).
    running = start_server(tiny, shm_folder=None)
    yield running
    running.close()


def generate_through(proxy: TamperingProxy, tiny_path: Path, shielding: ShieldConfig) -> None:
    with connect(proxy.endpoint, tiny_path, timeout_s=TIMEOUT_S, shield_config=shielding) as session:
        session.generate(PROMPT, max_new_tokens=3)


@pytest.mark.parametrize("kind", list(TAMPERS))
@pytest.mark.parametrize("shield", list(SHIELDINGS))
def test_hostile_reply_ends_in_one_tsqp_error(kind: str, shield: str, honest: RunningServer, tiny_path: Path) -> None:
    shielding = SHIELDINGS[shield]
    proxy = TamperingProxy(honest.endpoint, TAMPERS[kind])
    started = time.monotonic()
    try:
        with pytest.raises(TsqpError) as info:
            generate_through(proxy, tiny_path, shielding)
    finally:
        proxy.close()
    expected = IntegrityError if shielding.verifies else MalformedReply
    assert isinstance(info.value, expected), f"{kind} under {shield}: {type(info.value).__name__}: {info.value}"
    assert "\n" not in str(info.value)
    assert time.monotonic() - started < TIMEOUT_S  # answered at once, not after a timeout


@pytest.mark.parametrize("shield", list(SHIELDINGS))
def test_a_servers_error_text_reaches_the_user_cleaned(shield: str, honest: RunningServer, tiny_path: Path) -> None:
    proxy = TamperingProxy(honest.endpoint, lambda request, reply: protocol.encode(protocol.error_reply(reply.id, HOSTILE_TEXT)))
    try:
        with pytest.raises(RemoteError) as info:
            generate_through(proxy, tiny_path, SHIELDINGS[shield])
    finally:
        proxy.close()
    message = str(info.value)
    assert "boom" in message
    assert all(c.isprintable() for c in message), repr(message)


def test_a_reply_frame_over_the_runners_limit_is_dropped_unread(honest: RunningServer, tiny_path: Path) -> None:
    huge = bytes(32 * 2**20)  # far above what a tiny model's honest reply can be (about 1 MiB)
    proxy = TamperingProxy(honest.endpoint, lambda request, reply: [protocol.encode(protocol.reply(reply.id))[0], huge])
    try:
        with pytest.raises(ServerUnavailable, match="limit of"):
            generate_through(proxy, tiny_path, SHIELDINGS["otp"])
    finally:
        proxy.close()


def test_a_flood_of_late_answers_cannot_stall_a_call(honest: RunningServer, tiny_path: Path) -> None:
    """Late answers are only accepted for requests that timed out; any other id ends the call at once."""
    proxy = TamperingProxy(honest.endpoint, lambda request, reply: replaced(reply, reply.tensors, id=reply.id - 1))
    started = time.monotonic()
    try:
        with pytest.raises(MalformedReply, match="answered request"):
            generate_through(proxy, tiny_path, SHIELDINGS["plain"])
    finally:
        proxy.close()
    assert time.monotonic() - started < 5.0


# --- the CLI: one line, a distinct exit status ------------------------------------------------


@pytest.fixture(scope="module")
def chat_server(tiny_chat_path: Path) -> Iterator[RunningServer]:
    running = start_server(load(tiny_chat_path, with_tokenizer=False), shm_folder=None)  # the proxy is on the ZeroMQ path
    yield running
    running.close()


def run_tee(endpoint: str, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tsqp", "run-tee", "-e", endpoint, "--model", str(model), "-p", "Hi", "-n", "3", "--timeout", "10", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("kind", "args", "status"),
    [("NaN", ("--shield", "otp"), 3), ("transposed", ("--shield", "plain", "--no-verify"), 5), ("error text", ("--shield", "otp"), 5)],
)
def test_cli_reports_a_hostile_reply_in_one_line_with_its_status(
    kind: str, args: tuple[str, ...], status: int, chat_server: RunningServer, tiny_chat_path: Path
) -> None:
    tamper = TAMPERS.get(kind) or (lambda request, reply: protocol.encode(protocol.error_reply(reply.id, HOSTILE_TEXT)))
    proxy = TamperingProxy(chat_server.endpoint, tamper)
    try:
        result = run_tee(proxy.endpoint, tiny_chat_path, *args)
    finally:
        proxy.close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    if kind == "error text":
        assert "[bold red]boom[/]" in lines[-1]  # shown as text, not taken as markup
