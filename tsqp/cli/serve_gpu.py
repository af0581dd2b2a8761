"""`tsqp serve-gpu`: the untrusted accelerator service."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from tsqp.cli.console import err, fail, progress
from tsqp.cli.options import Device, DeviceOpt, Dtype, DtypeOpt, LogLevel, ModelOpt, SpinOpt, check_device
from tsqp.errors import AuthError
from tsqp.model.config import WEIGHT_BITS_RANGE
from tsqp.shields.config import WEIGHT_BITS
from tsqp.wire.shm import DEFAULT_SPIN_US

if TYPE_CHECKING:
    from tsqp.model.loading import LoadedModel
    from tsqp.wire.protocol import Limits


def serve_gpu(
    model: ModelOpt = "smollm2",
    endpoint: Annotated[
        str, typer.Option("--endpoint", "-e", envvar="TSQP_ENDPOINT", help="Where to listen: tcp://HOST:PORT or ipc://PATH.")
    ] = "tcp://127.0.0.1:5555",
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.float32,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch CPU threads for the products (default: torch's choice, every core). Beside a runner on the same "
            "few cores, leave it one: run-tee's own server takes all but one.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Print only the ready line (and security warnings).")] = False,
    log_level: Annotated[LogLevel, typer.Option(help="Logging level.")] = LogLevel.warning,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log one JSON object per line on stderr (ts, level, logger, msg, and fields such as client, op, error).")
    ] = False,
    max_message_mb: Annotated[
        float | None,
        typer.Option(
            "--max-message-mb", min=0.001, help="Refuse requests larger than this many MiB (default: room for the model's largest legitimate request)."
        ),
    ] = None,
    max_tensor_elements: Annotated[
        int | None,
        typer.Option(
            "--max-tensor-elements", min=1, help="Refuse tensors, and results, with more elements than this (default: derived from the model's config)."
        ),
    ] = None,
    curve_secret: Annotated[
        Path | None,
        typer.Option(
            "--curve-secret",
            metavar="FILE",
            help="This server's secret key file (NAME.key_secret from `tsqp keys generate`): the link becomes authenticated and encrypted. Needs --allow-clients.",
        ),
    ] = None,
    allow_clients: Annotated[
        Path | None,
        typer.Option(
            "--allow-clients",
            metavar="DIR",
            help="Folder of the public key files (*.key) of the clients let in; all others are refused and logged. Needs --curve-secret.",
        ),
    ] = None,
    insecure_public: Annotated[
        bool,
        typer.Option(
            "--insecure-public", help="Allow listening beyond loopback without keys (anyone who reaches the port can use the server and read the traffic)."
        ),
    ] = False,
    record: Annotated[
        Path | None,
        typer.Option("--record", metavar="DIR", help="Write every tensor received to DIR (what a curious server keeps; read by `tsqp audit`). Off by default."),
    ] = None,
    fault_rate: Annotated[
        float, typer.Option("--fault-rate", min=0.0, max=1.0, help="Testing integrity: corrupt one random element of this fraction of results.")
    ] = 0.0,
    fault_seed: Annotated[int | None, typer.Option("--fault-seed", help="Seed of the fault injection, for reproducible runs.")] = None,
    otp_weight_bits: Annotated[
        int,
        typer.Option(
            "--otp-weight-bits",
            min=0,
            max=WEIGHT_BITS_RANGE[1],
            help="Quantize the weights for otp clients of this width at start-up (0: on the first otp request).",
        ),
    ] = WEIGHT_BITS,
    batch: Annotated[
        bool | None,
        typer.Option(
            "--batch/--no-batch",
            help="Compute LINEAR requests of different clients that wait for the same weights at the same time as one product. Default: on with CUDA, off on CPU (slower there).",
        ),
    ] = None,
    exit_with_parent: Annotated[
        int | None, typer.Option("--exit-with-parent", metavar="PID", hidden=True, help="Stop when process PID ends (a runner's private server).")
    ] = None,
    shm_dir: Annotated[
        Path | None,
        typer.Option(
            "--shm-dir",
            metavar="DIR",
            help="Offer clients on this host a shared-memory channel for the hot ops, its files (mode 0600) in DIR, which must be this user's with mode 0700. Off by default.",
        ),
    ] = None,
    spin_us: SpinOpt = DEFAULT_SPIN_US,
    private_dir: Annotated[
        Path | None,
        typer.Option("--private-dir", metavar="DIR", hidden=True, help="The runner's private folder (socket, log): removed here if the runner died first."),
    ] = None,
) -> None:
    """Serve the model's linear layers (embedding, projections, lm_head) to trusted runners.

    Without keys it listens only on loopback or ipc://; with --curve-secret
    and --allow-clients only the listed clients get in, over an encrypted link.

    Example: tsqp serve-gpu --endpoint tcp://127.0.0.1:5555 --device cuda --dtype bfloat16

    Example: tsqp serve-gpu -e tcp://0.0.0.0:5555 --curve-secret keys/server.key_secret --allow-clients clients/
    """
    import torch

    from tsqp.model.loading import load
    from tsqp.server import logs
    from tsqp.server.server import Server
    from tsqp.wire.endpoints import READY, check_endpoint, check_free, check_listen_allowed
    from tsqp.wire.keys import server_keys

    logs.configure(log_level.value, as_json=log_json)
    if exit_with_parent is not None:
        _exit_with_parent(exit_with_parent)
    check_endpoint(endpoint)  # a malformed endpoint is named as such, before keys and before the model loads
    try:  # key and endpoint mistakes show before the model loads
        curve = server_keys(curve_secret, allow_clients)
        check_listen_allowed(endpoint, curve is not None, insecure_public)
    except AuthError as e:
        fail(str(e) if curve_secret or allow_clients else f"{e}: pass --curve-secret and --allow-clients, or --insecure-public to accept that")
    check_free(endpoint)  # a port or socket in use shows now, not after the model loads
    check_device(device)
    if curve is None:
        err.print(f"[yellow]warning:[/] no CURVE keys: the link on {escape(endpoint)} is unauthenticated and unencrypted "
                  "(see `tsqp keys generate`, --curve-secret and --allow-clients)", highlight=False)  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    with err.status("Loading model…", spinner="dots") if not quiet else contextlib.nullcontext():
        loaded = load(model, with_tokenizer=False, progress=progress)
        try:
            server = Server(loaded, endpoint, device.value, dtype.value, limits=_limits(loaded, max_message_mb, max_tensor_elements),
                            curve=curve, insecure_public=insecure_public, batch=batch, record_dir=record, fault_rate=fault_rate,
                            fault_seed=fault_seed, otp_weight_bits=otp_weight_bits, shm_folder=shm_dir, spin_us=spin_us)  # fmt: skip
        except ValueError as e:
            fail(str(e))
    fingerprint = loaded.fingerprint
    del loaded  # the server keeps its own copies (and, under float32, needs nothing else of the model's weights)
    gc.collect()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{READY} on {server.endpoint} (device {server.device}, {dtype.value}, model {fingerprint[:12]}, {'CURVE' if curve else 'no keys'})", flush=True)
    try:
        server.serve_forever(stop)  # the stop flag is checked between calls: the call in flight is answered
    finally:
        server.shutdown()  # and its reply sent before the process exits
        if private_dir is not None and exit_with_parent is not None and os.getppid() != exit_with_parent:
            shutil.rmtree(private_dir, ignore_errors=True)  # its runner, killed, could not remove it
    if fault_rate:
        err.print(f"[yellow]warning:[/] --fault-rate {fault_rate:g}: this server corrupts results on purpose", highlight=False)
    if not quiet:
        err.print("tsqp serve-gpu stopped")


def _limits(model: LoadedModel, max_message_mb: float | None, max_tensor_elements: int | None) -> Limits:
    """The model's default limits, with the operator's overrides."""
    from tsqp.server.server import default_limits

    limits = default_limits(model)
    if max_message_mb is not None:
        limits = dataclasses.replace(limits, max_message_bytes=int(max_message_mb * 1024 * 1024))
    if max_tensor_elements is not None:
        limits = dataclasses.replace(limits, max_tensor_elements=max_tensor_elements)
    return limits


def _exit_with_parent(parent: int) -> None:
    """A SIGTERM when the runner that started this server dies, however it dies (SIGKILL too).

    Linux only (a parent-death signal); serve-gpu stops cleanly on SIGTERM. Checking the parent
    after arming closes the window in which it could have died before.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit("tsqp serve-gpu: the runner that started this server is gone")
