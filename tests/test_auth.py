"""CURVE on the link: key files, who gets in, what the wire shows, and the CLI options (loopback only)."""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zmq
import zmq.auth
from helpers import start_server
from typer.testing import CliRunner

from tsqp.cli.app import app
from tsqp.errors import AuthError
from tsqp.model.loading import LoadedModel
from tsqp.server.server import Server
from tsqp.tee.private_server import READY
from tsqp.wire.client import RemoteBackend
from tsqp.wire.endpoints import is_local_endpoint
from tsqp.wire.keys import generate, load_public, load_secret, server_keys

runner = CliRunner()


@dataclass
class Keys:
    server_public: Path
    server_secret: Path
    alice_secret: Path  # listed: her public key is in `allow`
    mallory_public: Path  # not listed
    mallory_secret: Path
    allow: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    server_public, server_secret = generate(root / "server", "server")
    alice_public, alice_secret = generate(root / "alice", "alice")
    mallory_public, mallory_secret = generate(root / "mallory", "mallory")
    allow = root / "allow"
    allow.mkdir()
    shutil.copy(alice_public, allow)
    return Keys(server_public, server_secret, alice_secret, mallory_public, mallory_secret, allow)


@contextmanager
def curve_server(model: LoadedModel, keys: Keys, endpoint: str = "tcp://127.0.0.1:0") -> Iterator[Server]:
    """A CURVE server in a thread, on its own context: its authenticator serves that context only."""
    context = zmq.Context()
    server = Server(model, endpoint, device="cpu", context=context, curve=server_keys(keys.server_secret, keys.allow))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        server.close()
        context.term()


@contextmanager
def client(endpoint: str, **kwargs: object) -> Iterator[RemoteBackend]:
    backend = RemoteBackend(endpoint, timeout_s=10.0, connect_timeout_s=3.0, **kwargs)  # type: ignore[arg-type]
    try:
        yield backend
    finally:
        backend.close()


def check_linear(backend: RemoteBackend, tiny: LoadedModel, x: torch.Tensor) -> None:
    q, k, v = backend.linear(0, ["q_proj", "k_proj", "v_proj"], x)
    for y, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
        torch.testing.assert_close(y, x @ tiny.weights[f"layers.0.{name}"].T, rtol=1e-4, atol=1e-5)


# --- key files -----------------------------------------------------------------------


def test_keys_generate_writes_zmq_certificates(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    result = runner.invoke(app, ["keys", "generate", str(folder), "--name", "alice"])
    assert result.exit_code == 0, result.output
    public, secret = folder / "alice.key", folder / "alice.key_secret"
    assert str(public) in result.output and str(secret) in result.output
    pub_from_public, none = zmq.auth.load_certificate(public)
    pub_from_secret, secret_key = zmq.auth.load_certificate(secret)
    assert none is None and secret_key is not None and pub_from_public == pub_from_secret
    assert zmq.curve_public(secret_key) == pub_from_public  # a real key pair
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert load_secret(secret) == (pub_from_public, secret_key)

    before = secret.read_bytes()
    again = runner.invoke(app, ["keys", "generate", str(folder), "--name", "alice"])
    assert again.exit_code == 1 and "--force" in again.output
    assert secret.read_bytes() == before  # untouched

    public.chmod(0o644)
    secret.chmod(0o644)  # a careless copy: --force must not keep the wide mode
    forced = runner.invoke(app, ["keys", "generate", str(folder), "--name", "alice", "--force"])
    assert forced.exit_code == 0, forced.output
    assert secret.read_bytes() != before and stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_key_file_errors_are_clear(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(AuthError, match="not found.*tsqp keys generate"):
        load_secret(tmp_path / "nope.key_secret")
    with pytest.raises(AuthError, match="no secret key"):
        load_secret(keys.server_public)  # the public file where the secret one belongs
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_bytes(b"\x00\xffnot a certificate\n")
    with pytest.raises(AuthError, match="not a ZeroMQ CURVE certificate"):
        load_secret(garbage)
    short = tmp_path / "short.key"
    short.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(AuthError, match="40 Z85 characters"):
        load_public(short)
    with pytest.raises(AuthError, match="--server-key"):
        RemoteBackend("tcp://127.0.0.1:1", curve_secret=keys.alice_secret)
    with pytest.raises(AuthError, match="--allow-clients"):
        server_keys(keys.server_secret, None)
    with pytest.raises(AuthError, match="40 Z85 characters"):
        server_keys(keys.server_secret, tmp_path)  # short.key among the allowed clients
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuthError, match="no client public keys"):
        server_keys(keys.server_secret, tmp_path / "empty")


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.4.5:1", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("ipc:///tmp/x.sock", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.2:5555", False),
    ("tcp://[::]:5555", False), ("tcp://example.org:5555", False), ("tcp://eth0:5555", False), ("ws://127.0.0.1:1", False),
    ("ipc://@tsqp-abstract", False),  # an abstract socket has no file permissions: every local user reaches it
])  # fmt: skip
def test_only_loopback_and_ipc_count_as_local(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


# --- who gets in ---------------------------------------------------------------------


def test_listed_client_works_and_others_are_refused_quickly(tiny: LoadedModel, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tsqp")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    with curve_server(tiny, keys) as server:
        alice = dict(curve_secret=keys.alice_secret, server_key=keys.server_public)
        with client(server.endpoint, **alice) as backend:
            assert backend.hello(tiny.fingerprint)["fingerprint"] == tiny.fingerprint
            check_linear(backend, tiny, x)

        refusals = [  # (client options, what the error must say)
            (dict(curve_secret=keys.mallory_secret, server_key=keys.server_public), "refused this client's CURVE key"),
            ({}, "CURVE.*--curve-secret"),  # no keys at all (which side notices first varies: two wordings)
            (dict(curve_secret=keys.alice_secret, server_key=keys.mallory_public), "--server-key"),  # not this server's key
        ]
        for options, message in refusals:
            started = time.monotonic()
            with client(server.endpoint, **options) as backend, pytest.raises(AuthError, match=message):
                backend.hello(tiny.fingerprint)
            assert time.monotonic() - started < 5.0

            with client(server.endpoint, **alice) as backend:  # still serving the listed client
                check_linear(backend, tiny, x)

    mallory = load_public(keys.mallory_public).decode()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("refused" in w and mallory in w for w in warnings), warnings
    assert sum("refused a client: " in w for w in warnings) >= 2, warnings  # the keyless and wrong-server-key clients


# --- what the wire shows ---------------------------------------------------------------


class RecordingProxy:
    """A loopback TCP relay in a thread that keeps every byte it passes, both ways (bounded)."""

    LIMIT = 16 << 20

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stop.is_set():
            readable, _, _ = select.select([self.listener, *peers], [], [], 0.05)
            for s in readable:
                if s is self.listener:
                    inbound, _ = s.accept()
                    outbound = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                    peers[inbound], peers[outbound] = outbound, inbound
                    continue
                if s not in peers:
                    continue  # closed a moment ago with its partner
                data = s.recv(65536)
                if data and len(self.captured) < self.LIMIT:
                    self.captured += data
                if data:
                    peers[s].sendall(data)
                else:
                    partner = peers.pop(s)
                    peers.pop(partner, None)
                    s.close()
                    partner.close()
        for s in peers:
            s.close()
        self.listener.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("curve", [True, False], ids=["curve", "control-without-keys"])
def test_traffic_under_curve_is_not_readable_on_the_wire(curve: bool, tiny: LoadedModel, keys: Keys) -> None:
    x = (torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64) * 0.125 + 1234.5).contiguous()
    plaintext = x.numpy().tobytes()[:256]  # 256 recognisable bytes of the activations
    with serving(tiny, keys, curve) as endpoint:
        proxy = RecordingProxy(int(endpoint.rsplit(":", 1)[1]))
        options = dict(curve_secret=keys.alice_secret, server_key=keys.server_public) if curve else {}
        try:
            with client(f"tcp://127.0.0.1:{proxy.port}", **options) as backend:
                check_linear(backend, tiny, x)  # through the proxy, with the right numbers
        finally:
            proxy.close()
    wire = bytes(proxy.captured)
    assert len(wire) > len(plaintext)  # the exchange went through the proxy
    seen = [needle for needle in (plaintext, plaintext[:64], b"LINEAR", b"q_proj") if needle in wire]
    if curve:
        assert seen == []
    else:  # the control proves the capture would find them
        assert len(seen) == 4


@contextmanager
def serving(model: LoadedModel, keys: Keys, curve: bool) -> Iterator[str]:
    """The endpoint of a CURVE server, or of a server without keys (the control)."""
    if curve:
        with curve_server(model, keys) as server:
            yield server.endpoint
        return
    running = start_server(model)
    try:
        yield running.endpoint
    finally:
        running.close()


# --- CLI -----------------------------------------------------------------------------


def tsqp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsqp", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_gpu_refuses_a_public_address_without_keys(tiny_path: Path, keys: Keys) -> None:
    result = tsqp("serve-gpu", "--model", str(tiny_path), "--endpoint", f"tcp://0.0.0.0:{free_port()}", "--device", "cpu")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--insecure-public" in result.stderr and "Traceback" not in result.stderr
    half = runner.invoke(app, ["serve-gpu", "--model", str(tiny_path), "--curve-secret", str(keys.server_secret)])
    assert half.exit_code == 1 and "--allow-clients" in half.output


def test_cli_run_tee_against_a_curve_serve_gpu(tiny_chat_path: Path, keys: Keys) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-m", "tsqp", "serve-gpu", "--model", str(tiny_chat_path), "--endpoint", endpoint,
                               "--device", "cpu", "--quiet", "--curve-secret", str(keys.server_secret), "--allow-clients", str(keys.allow)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        ready = server.stdout.readline()
        assert ready.startswith(READY) and "CURVE" in ready, ready + (server.stderr.read() if server.poll() is not None else "")
        args = ["run-tee", "--model", str(tiny_chat_path), "--prompt", "Hello", "-n", "4", "--json", "--endpoint", endpoint]
        result = runner.invoke(app, [*args, "--curve-secret", str(keys.alice_secret), "--server-key", str(keys.server_public)])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert len(out["token_ids"]) == 4 and out["timings"]["round_trips"] == 4 * (4 * 3 + 1)  # otp by default: the embedding stays in the TEE

        refused = runner.invoke(app, [*args, "--curve-secret", str(keys.mallory_secret), "--server-key", str(keys.server_public)])
        assert isinstance(refused.exception, AuthError) and "CURVE key" in str(refused.exception)
    finally:
        server.terminate()
        _, log = server.communicate(timeout=10)
    mallory = load_public(keys.mallory_public).decode()
    assert any("refused" in line and mallory in line for line in log.splitlines()), log  # at the default log level


@pytest.mark.parametrize("command, options", [
    ("serve-gpu", ["--curve-secret", "--allow-clients", "--insecure-public"]),
    ("run-tee", ["--curve-secret", "--server-key"]),
    ("check-grad", ["--curve-secret", "--server-key"]),
    ("bench", ["--curve-secret", "--server-key"]),
    ("keys", ["generate"]),
    ("keys generate", ["--name", "--force", "DIR"]),
])  # fmt: skip
def test_help_shows_the_key_options(command: str, options: list[str]) -> None:
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in options:
        assert option in result.output
