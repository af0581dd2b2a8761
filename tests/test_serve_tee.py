"""`tsqp serve-tee` with the real `openai` client: chat and completions, streamed or not, the model list,
API keys, OpenAI-shaped errors, greedy answers equal to run-tee's, concurrent requests answered as if alone,
and a killed accelerator answered with 503s instead of a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tsqp.tools.bench.http import serve_tee_process

KEY = "sk-tsqp-test-key"
QUESTIONS = ["Hi", "What is 2+2?", "Name a colour", "Tell me a joke", "Who are you?", "Say something", "Count to three", "Why is the sky blue?"]


def serve_tee(*args: str) -> Any:
    return serve_tee_process(args)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def greedy_chat(api: openai.OpenAI, model: str, question: str, max_tokens: int = 8) -> list[int]:
    reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
                                        extra_body={"return_token_ids": True})  # fmt: skip
    return reply.choices[0].model_extra["token_ids"]


@pytest.fixture(scope="module")
def otp_server(tiny_chat_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key per line\n{KEY}\n")
    with serve_tee("--model", str(tiny_chat_path), "--api-key-file", str(keys)) as (_, url):  # otp: serve-tee's default
        yield url, str(tiny_chat_path)


def test_model_list_and_health(otp_server: tuple[str, str]) -> None:
    url, model = otp_server
    assert [m.id for m in client(url).models.list()] == [model]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["shield"] == "otp"


def test_chat_greedy_answer_equals_run_tee(otp_server: tuple[str, str], tiny_chat_path: Path) -> None:
    url, model = otp_server
    reply = client(url).chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                                max_tokens=10, temperature=0, extra_body={"return_token_ids": True})  # fmt: skip
    choice = reply.choices[0]
    run = subprocess.run([sys.executable, "-m", "tsqp", "run-tee", "--model", str(tiny_chat_path), "-p", "What is the capital of France?", "-n", "10", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    expected = json.loads(run.stdout)
    assert choice.model_extra["token_ids"] == expected["token_ids"]
    assert choice.message.content == expected["text"] and choice.finish_reason == expected["finish_reason"] == "length"
    assert reply.usage.prompt_tokens == len(expected["prompt_token_ids"]) and reply.usage.completion_tokens == 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 10


def test_chat_streamed_equals_chat_not_streamed(otp_server: tuple[str, str]) -> None:
    url, model = otp_server
    api = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    whole = api.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        api.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


def test_completions_streamed_and_not_and_stop(otp_server: tuple[str, str]) -> None:
    url, model = otp_server
    api = client(url)
    whole = api.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    text = whole.choices[0].text
    streamed = "".join(
        c.choices[0].text for c in api.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if c.choices
    )
    assert streamed == text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens > 0
    stop = text[3:5]
    stopped = api.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    seeded = [
        api.completions.create(model=model, prompt="Once", max_tokens=6, temperature=0.9, seed=5, extra_body={"top_k": 50}).choices[0].text for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    two = api.completions.create(model=model, prompt="Once", max_tokens=6, temperature=1.0, seed=5, n=2)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens == 12


def test_wrong_or_missing_api_key_gets_401(otp_server: tuple[str, str]) -> None:
    url, model = otp_server
    with pytest.raises(openai.AuthenticationError) as caught:
        client(url, key="sk-wrong").chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401


@pytest.mark.parametrize("body, status, param", [
    ({"max_tokens": 4, "temperature": 7}, 400, "temperature"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 4, "top_p": 0}, 400, "top_p"),
    ({"max_tokens": 4, "stop": [""]}, 400, None),
    ({"max_tokens": 100000}, 413, None),
    ({"max_tokens": 4, "model": "gpt-4"}, 404, "model"),
    ({"max_tokens": 4, "messages": []}, 400, "messages"),
])  # fmt: skip
def test_bad_requests_get_openai_shaped_errors(otp_server: tuple[str, str], body: dict, status: int, param: str | None) -> None:
    url, model = otp_server
    request = {"model": model, "messages": [{"role": "user", "content": "Hi"}], **body}
    reply = httpx.post(f"{url}/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 400
    assert client(url).models.list().data  # still serving


@pytest.mark.parametrize("shield", ["otp", "plain"])
def test_eight_concurrent_requests_each_get_their_single_request_answer(shield: str, tiny_chat_path: Path, otp_server: tuple[str, str]) -> None:
    def check(url: str, model: str) -> None:
        api = client(url)
        alone = [greedy_chat(api, model, q) for q in QUESTIONS]
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            together = list(pool.map(lambda q: greedy_chat(client(url), model, q), QUESTIONS))
        assert together == alone
        assert len({tuple(a) for a in alone}) > 1  # the prompts really differ

    if shield == "otp":
        check(*otp_server)
        return
    with serve_tee("--model", str(tiny_chat_path), "--shield", "plain", "--no-verify") as (_, url):
        check(url, str(tiny_chat_path))


def test_killed_accelerator_gives_503s_not_a_hang(tiny_chat_path: Path) -> None:
    gpu = subprocess.Popen([sys.executable, "-m", "tsqp", "serve-gpu", "--model", str(tiny_chat_path), "-e", "tcp://127.0.0.1:0", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert gpu.stdout is not None
        ready = gpu.stdout.readline()
        endpoint = ready.split(" on ", 1)[1].split(" ", 1)[0]
        with serve_tee("--model", str(tiny_chat_path), "--endpoint", endpoint, "--timeout", "30") as (process, url):
            api = client(url, key="unused")
            model = str(tiny_chat_path)
            assert greedy_chat(api, model, "Hi")
            os.kill(gpu.pid, signal.SIGKILL)
            gpu.wait()
            for stream in (False, True, False):
                started = time.monotonic()
                with pytest.raises(openai.APIStatusError) as caught:
                    reply = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=stream)
                    list(reply) if stream else None
                assert caught.value.status_code == 503 and "accelerator" in caught.value.message
                assert time.monotonic() - started < 10  # noticed, not waited out
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            assert process.poll() is None  # serve-tee itself keeps serving
    finally:
        if gpu.poll() is None:
            gpu.kill()
            gpu.wait()


def test_beyond_loopback_needs_tls_and_tls_ends_inside(tiny_chat_path: Path, tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "tsqp", "serve-tee", "--model", str(tiny_chat_path), "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1 and "without TLS" in refused.stderr and "Traceback" not in refused.stderr
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)  # fmt: skip
    with serve_tee("--model", str(tiny_chat_path), "--shield", "plain", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)) as (_, url):
        assert url.startswith("https://")
        assert httpx.get(f"{url}/health", verify=str(cert)).json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/health")  # no clear-text HTTP on the TLS port
