"""Chat basics on the command line: stdin prompts, system prompts, stop strings, finish reasons, `tsqp chat`
keeping its KV cache between turns, `--version`, `tsqp models` and `tsqp ping`."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import local_llama, start_server
from typer.testing import CliRunner

from tsqp import __version__
from tsqp.cli.app import app
from tsqp.model.loading import load
from tsqp.tee.chat import Conversation
from tsqp.tee.generation import generate
from tsqp.tee.session import connect

runner = CliRunner()


def run_json(tiny_chat_path: Path, *args: str, input: str | None = None) -> dict:
    result = runner.invoke(app, ["run-tee", "--model", str(tiny_chat_path), "--local", "--json", *args], input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_stdin_prompt_equals_the_same_prompt_as_an_option(tiny_chat_path: Path) -> None:
    from_option = run_json(tiny_chat_path, "-p", "Tell me a story", "-n", "5")
    from_stdin = run_json(tiny_chat_path, "-p", "-", "-n", "5", input="Tell me a story\n")
    assert from_stdin["prompt_token_ids"] == from_option["prompt_token_ids"]
    assert from_stdin["token_ids"] == from_option["token_ids"]
    assert from_option["finish_reason"] == "length"


def test_system_prompt_enters_the_chat_template(tiny_chat_path: Path) -> None:
    plain = run_json(tiny_chat_path, "-p", "Hi", "-n", "2")
    with_system = run_json(tiny_chat_path, "-p", "Hi", "-n", "2", "--system", "You are a pirate.")
    session = connect(None, tiny_chat_path, local=True)
    decode = session.model.tokenizer.decode
    assert "You are a pirate." in decode(with_system["prompt_token_ids"]) and "pirate" not in decode(plain["prompt_token_ids"])
    session.close()


def test_stop_string_ends_the_answer_with_finish_reason_stop(tiny_chat_path: Path) -> None:
    free = run_json(tiny_chat_path, "-p", "Hi", "-n", "12")
    assert len(free["text"]) > 4
    stop = free["text"][2:4]  # a piece of the free answer: the stopped answer ends just before it
    stopped = run_json(tiny_chat_path, "-p", "Hi", "-n", "12", "--stop", stop)
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free["text"][: free["text"].index(stop)]
    assert len(stopped["token_ids"]) < 12


def test_chat_keeps_the_cache_and_answers_as_a_fresh_run_would(tiny_chat_path: Path) -> None:
    session = connect(None, tiny_chat_path, local=True)
    conversation = Conversation(session, system="Be brief.")
    first = conversation.say("Hello there", 6)
    second = conversation.say("And then?", 6)
    assert second.timings["reused_tokens"] > len(first.prompt_token_ids)  # the first turn was not computed again
    fresh = generate(local_llama(session.model), second.prompt_token_ids, 6)
    assert second.token_ids == fresh.token_ids  # the same answer as the whole conversation computed from scratch
    session.close()


def test_chat_repl_answers_turn_after_turn(tiny_chat_path: Path) -> None:
    result = runner.invoke(app, ["chat", "--model", str(tiny_chat_path), "--local", "-n", "4"], input="Hello\n/reset\nHi again\nOne more\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("tokens (length)") == 3
    assert "started over" in result.output


def test_version_models_and_ping(tiny_chat_path: Path) -> None:
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"tsqp {__version__}"
    models = runner.invoke(app, ["models", "--json", "--no-fingerprints"])
    assert models.exit_code == 0, models.output
    listing = json.loads(models.stdout)
    assert listing["default"] == "smollm2" and all(m["bytes"] > 0 for m in listing["models"])
    running = start_server(load(tiny_chat_path, with_tokenizer=False))
    try:
        pong = runner.invoke(app, ["ping", running.endpoint, "--json"])
    finally:
        running.close()
    assert pong.exit_code == 0, pong.output
    health = json.loads(pong.stdout)
    assert health["status"] == "ok" and health["fingerprint"] == load(tiny_chat_path, with_tokenizer=False).fingerprint
