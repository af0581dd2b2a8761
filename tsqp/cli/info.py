"""Small commands that answer at once: `tsqp models` (what is installed and cached) and `tsqp ping` (is a server up)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape

from tsqp.cli.console import err, out
from tsqp.cli.options import CurveSecretOpt, JsonOpt, ServerKeyOpt


def models(
    as_json: JsonOpt = False,
    fingerprints: Annotated[
        bool, typer.Option("--fingerprints/--no-fingerprints", help="Load each model to compute its fingerprint (a few seconds each).")
    ] = True,
) -> None:
    """The default model and every model in the cache, with sizes and fingerprints (what a server must hold too).

    Example: tsqp models --json
    """
    from tsqp.errors import ModelLoadError
    from tsqp.model.loading import DEFAULT_MODEL, cache_dir, cached_models, load, resolve

    try:
        default = str(resolve(DEFAULT_MODEL))
    except ModelLoadError as e:
        default = f"(not installed: {e})"
    rows = []
    for folder, size in cached_models():
        fingerprint = load(folder, with_tokenizer=False).fingerprint if fingerprints else None
        rows.append({"path": str(folder), "bytes": size, "fingerprint": fingerprint, "default": str(folder) == default})
    if as_json:
        print(json.dumps({"default": DEFAULT_MODEL, "default_path": default, "cache": str(cache_dir()), "models": rows}))
        return
    out.print(f"default: {DEFAULT_MODEL} -> {escape(default)}", highlight=False, soft_wrap=True)
    out.print(f"cache: {escape(str(cache_dir()))}", highlight=False, soft_wrap=True)
    for row in rows:
        mark = "*" if row["default"] else " "
        out.print(f"{mark} {row['bytes'] / 2**20:8.1f} MiB  {row['fingerprint'] or '-':32}  {escape(row['path'])}", highlight=False, soft_wrap=True)
    if not rows:
        err.print("[dim]the cache holds no converted model yet; the first run converts the default one[/]")


def ping(
    endpoint: Annotated[str, typer.Argument(help="The server, e.g. tcp://127.0.0.1:5555.")],
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the answer.")] = 5.0,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a `tsqp serve-gpu` server whether it is up (HEALTH): status, uptime, requests served, model fingerprint.

    Exits 1 with a one-line error when it does not answer in time.

    Example: tsqp ping tcp://127.0.0.1:5555
    """
    from tsqp.wire.client import RemoteBackend

    remote = RemoteBackend(endpoint, timeout_s=timeout, connect_timeout_s=timeout, curve_secret=curve_secret, server_key=server_key)
    try:
        health = remote.health()
        rtt_ms = remote.stats.round_trip_s * 1000
    finally:
        remote.close()
    if as_json:
        print(json.dumps({**health, "endpoint": endpoint, "round_trip_ms": rtt_ms}))
        return
    out.print(f"{escape(endpoint)}: {health.get('status')} · up {health.get('uptime_s', 0):.0f} s · {health.get('requests', 0)} requests · "
              f"model {health.get('fingerprint', '?')} · {rtt_ms:.1f} ms", highlight=False)  # fmt: skip
