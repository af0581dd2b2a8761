"""Tests for tsqp.wire.endpoints: every endpoint checked once, and every bind or connect failure a one-line error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from helpers import start_server

from tsqp.errors import EndpointError
from tsqp.model.loading import LoadedModel
from tsqp.server.server import Server
from tsqp.wire.client import RemoteBackend
from tsqp.wire.endpoints import check_endpoint

BAD = [
    ("http://127.0.0.1:5555", "scheme 'http' is not supported"),
    ("127.0.0.1:5555", "has no scheme"),
    ("tcp://", "needs a host and a port"),
    ("tcp://:5555", "needs a host and a port"),
    ("tcp://127.0.0.1", "needs a host and a port"),
    ("tcp://host:notaport", "port 'notaport' is not a number"),
    ("tcp://host:70000", "port '70000' is not a number"),
    ("ipc://", "names no path"),
]


@pytest.mark.parametrize(("endpoint", "message"), BAD)
def test_malformed_endpoints_are_named(endpoint: str, message: str) -> None:
    with pytest.raises(EndpointError, match=message):
        check_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://*:0", "tcp://localhost:*", "ipc:///tmp/x.sock", "inproc://x"])
def test_well_formed_endpoints_pass(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(("endpoint", "message"), BAD[:3])
def test_client_and_server_refuse_a_malformed_endpoint(endpoint: str, message: str, tiny: LoadedModel) -> None:
    with pytest.raises(EndpointError, match=message):
        RemoteBackend(endpoint)
    with pytest.raises(EndpointError, match=message):
        Server(tiny, endpoint, device="cpu")


def test_a_port_in_use_is_an_endpoint_error(tiny: LoadedModel) -> None:
    running = start_server(tiny)
    try:
        with pytest.raises(EndpointError, match=f"cannot listen on {running.endpoint}"):
            Server(tiny, running.endpoint, device="cpu", context=zmq.Context.instance())
    finally:
        running.close()


def test_a_live_servers_ipc_path_is_refused_and_its_socket_removed_on_close(tiny: LoadedModel, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/server.sock"
    running = start_server(tiny, endpoint)
    try:
        with pytest.raises(EndpointError, match="another server is listening there"):
            Server(tiny, endpoint, device="cpu", context=zmq.Context.instance())
        assert RemoteBackend(endpoint, connect_timeout_s=3).health()["status"] == "ok"  # the first one still serves
    finally:
        running.close()
    assert not (tmp_path / "server.sock").exists(), "the server left its socket file behind"


def test_a_dead_servers_socket_file_is_replaced(tiny: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed server leaves
    running = start_server(tiny, f"ipc://{path}")
    running.close()


def test_an_ipc_path_that_is_not_a_socket_is_never_deleted(tiny: LoadedModel, tmp_path: Path) -> None:
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(EndpointError, match="is not a socket"):
        Server(tiny, f"ipc://{precious}", device="cpu")
    assert precious.read_text() == "keep me"  # libzmq alone would have unlinked it


def test_serve_gpu_names_a_port_in_use_before_loading_the_model(tiny: LoadedModel, tmp_path: Path) -> None:
    running = start_server(tiny)
    try:
        result = tsqp("serve-gpu", "--model", str(tmp_path / "not-loaded.gguf"), "--endpoint", running.endpoint)
    finally:
        running.close()
    assert result.returncode == 1 and "the port is in use" in result.stderr, result.stderr  # not "model not found"
    assert len(result.stderr.strip().splitlines()) == 1


def tsqp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tsqp", *args], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "60"})


@pytest.mark.parametrize("command", ["run-tee", "check-grad", "serve-gpu"])
def test_cli_names_a_malformed_endpoint_in_one_line(command: str) -> None:
    args = ["-e", "tcp://host:notaport"] + (["-p", "hi"] if command == "run-tee" else [])
    result = tsqp(command, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: endpoint 'tcp://host:notaport': port 'notaport' is not a number from 0 to 65535"]


def test_serve_gpu_names_a_wrong_scheme_not_missing_keys() -> None:
    result = tsqp("serve-gpu", "-e", "http://0.0.0.0:5555")
    assert result.returncode == 1 and "scheme 'http'" in result.stderr and "without keys" not in result.stderr


def test_local_with_an_endpoint_is_refused() -> None:
    result = tsqp("run-tee", "-p", "hi", "--local", "-e", "tcp://127.0.0.1:5555")
    assert result.returncode == 1 and "--local" in result.stderr and "Traceback" not in result.stderr
