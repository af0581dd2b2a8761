"""The bench's tables, for a terminal of 80 columns."""

from __future__ import annotations

from typing import Any

from tsqp.tools.bench.results import BenchReport, Stat


def render_table(report: BenchReport) -> Any:
    """Narrow tables (speed and memory; time per decoded token; traffic and masks), so they fit 80 columns."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    if report.http is not None:
        return _http_table(report)
    s = report.settings
    speed = Table(
        title=escape(f"tsqp bench · {s['new_tokens']} new tokens · median [min–max] of {s['repeat']} runs"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for name in ("mode", "prompt", "prefill s", "decode tok/s", "×local", "TEE MiB", "srv MiB"):
        speed.add_column(name, justify="left" if name == "mode" else "right")
    per_token = Table(title="per decoded token (medians), ms", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                      caption="total = tee + mask(/unmask) + stall (waiting for masks) + verif(y) + ser(ialization) + wire + server compute")  # fmt: skip
    for name in ("mode", "prompt", "total", "tee", "mask", "stall", "verif", "ser", "wire", "server"):
        per_token.add_column(name, justify="left" if name == "mode" else "right")
    traffic = Table(title="per decoded token (medians): traffic and masks", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                    caption="trips, KiB: round trips and bytes; offline: mask pool ms, made before or beside the run; pool: its peak MiB")  # fmt: skip
    for name in ("mode", "prompt", "trips", "KiB", "offline ms", "pool MiB"):
        traffic.add_column(name, justify="left" if name == "mode" else "right")
    for r in report.results:
        mode, b, p = r.mode + (" +verify" if r.verify else ""), r.breakdown_ms_per_token, r.peak_rss_mib
        ratio = f"{r.ratio_vs_local:.2f}" if r.ratio_vs_local is not None else ""
        speed.add_row(
            mode, str(r.prompt_tokens), _stat(r.prefill_s, "{:.3f}"), _stat(r.decode_tokens_per_s, "{:.1f}"), ratio, _mib(p["tee"]), _mib(p["server"])
        )
        per_token.add_row(mode, str(r.prompt_tokens), f"{r.ms_per_token:.1f}",
                          *(f"{b[k]:.1f}" for k in ("tee_compute", "mask_unmask", "mask_stall", "verify", "serialization", "wire", "server_compute")))  # fmt: skip
        traffic.add_row(mode, str(r.prompt_tokens), f"{r.round_trips_per_token:.0f}", f"{r.bytes_per_token / 1024:.1f}",
                        f"{1000 * r.offline_s_per_token:.1f}", _mib(r.pool_peak_mib))  # fmt: skip
    if report.load is None:
        return Group(speed, per_token, traffic)
    load = Table(title=escape(f"load test · {report.load[0].shield} · {s['prompt_tokens'][0]} prompt tokens · {s['new_tokens']} new tokens per client · one server"),
                 box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                 caption="tok/s: all clients' tokens / wall time from release to the last client done; step: one decode forward")  # fmt: skip
    for name in ("clients", "aggregate tok/s", "step p50 ms", "step p99 ms", "answers"):
        load.add_column(name, justify="right")
    for r in report.load:
        answers = "match" if r.answers_match_single_client else f"[bold red]differ[/] ({len(r.mismatched_runners)})"
        load.add_row(str(r.clients), f"{r.aggregate_tokens_per_s:.1f}", f"{r.step_ms['p50']:.1f}", f"{r.step_ms['p99']:.1f}", answers)
    return Group(speed, per_token, traffic, load)


def _http_table(report: BenchReport) -> Any:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    s = report.settings
    table = Table(title=escape(f"HTTP load test · serve-tee · {s['prompt_tokens'][0]} prompt tokens · {s['new_tokens']} new tokens per client"),
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption="tok/s: all clients' tokens / wall time; latency: whole request; TTFT: to the first chunk; ITL: between chunks (ms, p50/p99); "
                          "trips/step: accelerator round trips per batched step; masks made before each round (offline phase)")  # fmt: skip
    for name in ("shield", "clients", "tok/s", "×1", "latency", "TTFT", "ITL", "trips/step", "answers"):
        table.add_column(name, justify="left" if name == "shield" else "right")
    one = {r.shield: r.aggregate_tokens_per_s for r in report.http or [] if r.clients == 1}
    for r in report.http or []:
        speedup = f"{r.aggregate_tokens_per_s / one[r.shield]:.2f}" if one.get(r.shield) else ""
        answers = "match" if r.answers_match_single_client else f"[bold red]differ[/] ({len(r.mismatched_clients)})"
        table.add_row(
            r.shield,
            str(r.clients),
            f"{r.aggregate_tokens_per_s:.1f}",
            speedup,
            _p50_99(r.latency_ms),
            _p50_99(r.first_token_ms),
            _p50_99(r.inter_token_ms),
            answers,
        )
    return table


def _p50_99(values: dict[str, float]) -> str:
    return f"{values['p50']:.0f}/{values['p99']:.0f}"


def _stat(s: Stat, fmt: str) -> str:
    """Median, with the range on a dim second line."""
    return f"{fmt.format(s.median)}\n[dim]{fmt.format(s.min)}–{fmt.format(s.max)}[/]"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"
