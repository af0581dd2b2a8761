"""`tsqp bench`: every mode side by side against the all-in-TEE `local` path and transformers' `generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tsqp.cli.console import err, fail, out, progress
from tsqp.cli.options import (
    ALL_SHIELDS,
    CurveSecretOpt,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    EndpointOpt,
    ModelOpt,
    PoolMibOpt,
    PrefillChunkOpt,
    ServerKeyOpt,
    ShieldsOpt,
    SpinOpt,
    TimeoutOpt,
    Transport,
    TransportOpt,
    VerifyOpt,
    counts,
    shield_names,
)
from tsqp.errors import TsqpError
from tsqp.shields.config import POOL_MIB, PREFILL_CHUNK
from tsqp.wire.shm import DEFAULT_SPIN_US


def bench(
    model: ModelOpt = "smollm2",
    shields: ShieldsOpt = ALL_SHIELDS,
    verify: VerifyOpt = None,
    prompt_tokens: Annotated[str, typer.Option(help="Comma list of prompt lengths, in tokens.")] = "32,128,512",
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens to decode per run (end-of-sequence is ignored).")] = 64,
    repeat: Annotated[int, typer.Option(min=1, help="Timed runs per mode and prompt length (after one warm-up).")] = 5,
    json_file: Annotated[
        str | None, typer.Option("--json", metavar="FILE", help="Also write the results as JSON to FILE; `-` prints JSON to stdout instead of the table.")
    ] = None,
    endpoint: EndpointOpt = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="FILE.png", help="Save stacked bars of the per-token time breakdown (needs matplotlib).")
    ] = None,
    timeout: TimeoutOpt = 60.0,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
    clients: Annotated[
        str | None,
        typer.Option(
            help="Load test: comma list of concurrent client counts, e.g. 1,2,4,8. For each N, N runner processes decode at once against one server (first prompt length, first --shields mode); reports aggregate tok/s, step p50/p99 and whether answers match a single client's."
        ),
    ] = None,
    http_clients: Annotated[
        str | None,
        typer.Option(
            "--http-clients",
            help="HTTP load test alone: comma list of concurrent client counts, e.g. 1,4,8. Per --shields mode one `tsqp serve-tee`; N clients stream greedy completions (first prompt length) at once; reports aggregate tok/s, latency, TTFT and inter-token percentiles, and whether answers match single requests.",
        ),
    ] = None,
    batch: Annotated[
        bool | None,
        typer.Option(
            "--batch/--no-batch",
            help="Cross-client batching in the private server (serve-gpu --batch/--no-batch). Default: the server's default for its device.",
        ),
    ] = None,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.float32,
    transport: TransportOpt = Transport.auto,
    spin_us: SpinOpt = DEFAULT_SPIN_US,
    per_call: Annotated[
        bool,
        typer.Option(
            "--per-call",
            help="Instead: time one decode step's calls one at a time over zmq and shm (round trip, server compute, overhead per call, in µs).",
        ),
    ] = False,
    precompute: Annotated[
        bool,
        typer.Option(
            "--precompute/--no-precompute",
            help="Fill the mask pool for the whole run (prompt and answer) before each timed run, whatever --pool-mib says; by default masks are made during it.",
        ),
    ] = False,
    pool_mib: PoolMibOpt = POOL_MIB,
    prefill_chunk: PrefillChunkOpt = PREFILL_CHUNK,
) -> None:
    """Measure prefill latency, decode speed and where each decoded token's time goes, per mode and prompt length.

    Modes: hf-generate (transformers' generate here), local (tsqp, linear ops here) and each shield (split).

    Example: tsqp bench --prompt-tokens 32,128 --new-tokens 32 --repeat 3 --json bench.json

    Load test: tsqp bench --shields plain --prompt-tokens 32 --repeat 1 --clients 1,2,4,8

    HTTP load test: tsqp bench --shields plain,otp --prompt-tokens 32 --new-tokens 32 --http-clients 1,4,8
    """
    from tsqp.tools.bench import runs
    from tsqp.tools.bench.config import BenchConfig
    from tsqp.tools.bench.plot import require_matplotlib
    from tsqp.tools.bench.report import render_table

    config = BenchConfig(model, shield_names(shields), verify, counts(prompt_tokens, "--prompt-tokens", "token counts", "32,128,512"),
                         new_tokens, repeat, endpoint, timeout,
                         str(curve_secret) if curve_secret else None, str(server_key) if server_key else None,
                         counts(clients, "--clients", "client counts", "1,2,4,8") if clients is not None else [],
                         counts(http_clients, "--http-clients", "client counts", "1,4,8") if http_clients is not None else [], batch=batch,
                         device=device.value, dtype=dtype.value, transport=transport.value, spin_us=spin_us,
                         precompute=precompute, pool_mib=pool_mib, prefill_chunk=prefill_chunk)  # fmt: skip
    if plot is not None:
        try:
            require_matplotlib()
        except TsqpError as e:
            fail(str(e))
    if per_call:
        _per_call(config, json_file)
        return
    report = runs.run_with_progress(config, err)
    data = json.dumps(report.to_json(), indent=2)
    if json_file == "-":
        print(data)
    else:
        if json_file:
            Path(json_file).write_text(data + "\n")
        out.print(render_table(report))
    if plot is not None:
        from tsqp.tools.bench.plot import plot as save_plot

        save_plot(report, plot)
        err.print(f"plot saved to {plot}")
    wrong = [r.clients for r in [*(report.load or []), *(report.http or [])] if not r.answers_match_single_client]
    if wrong:
        fail(
            f"load test: with {', '.join(map(str, wrong))} concurrent clients, some answers differ from the single-client answers "
            "for the same prompts (a server bug: concurrent sessions must not affect each other)"
        )


def _per_call(config: Any, json_file: str | None) -> None:
    from rich.table import Table

    from tsqp.model.loading import resolve
    from tsqp.tools.bench.percall import per_call

    with err.status("Timing one decode step's calls…", spinner="dots"):
        rows = per_call(config, resolve(config.model, progress))
    data = json.dumps({"per_call": rows, "settings": {"spin_us": config.spin_us, "model": config.model}}, indent=2)
    if json_file == "-":
        print(data)
        return
    if json_file:
        Path(json_file).write_text(data + "\n")
    table = Table(title="one call at a time, medians in µs")
    for column in ("transport", "op", "round trip", "server", "overhead"):
        table.add_column(column, justify="left" if column in ("transport", "op") else "right")
    for r in rows:
        table.add_row(r["transport"], r["op"], f"{r['round_trip_us']:.0f}", f"{r['server_us']:.0f}", f"{r['overhead_us']:.0f}")
    out.print(table)
