"""Opening a session from the CLI, the same for run-tee, chat and serve-tee: checks first, then a private
server started before torch loads here, so both sides load side by side."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tsqp.cli.console import err, fail, progress
from tsqp.cli.options import Device, check_device
from tsqp.shields.config import ShieldConfig
from tsqp.wire.endpoints import CONNECT_TIMEOUT_S, check_endpoint
from tsqp.wire.shm import DEFAULT_SPIN_US

if TYPE_CHECKING:
    from tsqp.tee.session import Session


def open_session(model: str, endpoint: str | None, local: bool, timeout: float, shielding: ShieldConfig, device: Device, dtype: str,
                 curve_secret: Path | None = None, server_key: Path | None = None, offload_attention_from: int | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, transport: str = "auto", spin_us: float = DEFAULT_SPIN_US) -> Session:  # fmt: skip
    """A session to `endpoint`, to a private server (no endpoint) or in-process (`local`); refusals before anything loads."""
    if offload_attention_from is not None and not local and (shielding.name != "plain" or shielding.verifies):
        fail("--offload-attention-from sends attention's activations unmasked: use it with --shield plain --no-verify only")
    if local and endpoint is not None:
        fail("--local runs the linear ops in this process: drop --endpoint (or TSQP_ENDPOINT)")
    if endpoint is not None:
        check_endpoint(endpoint)  # before the model loads
    elif not local:
        check_device(device)  # the private server's device
    from tsqp.model.loading import resolve
    from tsqp.tee.private_server import PrivateServer, closed_on_failure

    with err.status("Loading model and connecting…", spinner="dots"):
        folder = resolve(model, progress)
        # Started before this process imports torch, so both load side by side.
        server = PrivateServer(folder, device.value, dtype, shielding, spin_us=spin_us) if endpoint is None and not local else None
        with closed_on_failure(server):
            from tsqp.tee.session import connect

            return connect(endpoint, folder, local=local, timeout_s=timeout, connect_timeout_s=connect_timeout,
                           offload_attention_from=offload_attention_from, private_server=server,
                           curve_secret=curve_secret, server_key=server_key, shield_config=shielding,
                           transport=transport, spin_us=spin_us)  # fmt: skip


def read_prompt(prompt: str) -> str:
    """`-` reads the prompt from stdin (all of it, as UTF-8 text)."""
    if prompt != "-":
        return prompt
    if sys.stdin.isatty():
        err.print("[dim]reading the prompt from stdin; end it with Ctrl-D[/]")
    return sys.stdin.read().strip("\n")
