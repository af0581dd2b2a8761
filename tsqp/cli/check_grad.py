"""`tsqp check-grad`: proof that the split inference path never hands a grad-tracking tensor to the wire."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tsqp.cli.console import err, fail, out, progress
from tsqp.cli.options import CurveSecretOpt, EndpointOpt, JsonOpt, ModelOpt, ServerKeyOpt

if TYPE_CHECKING:
    from tsqp.tools.checkgrad import GradReport


def check_grad(
    model: ModelOpt = "smollm2",
    endpoint: EndpointOpt = None,
    path: Annotated[
        list[Path] | None, typer.Option("--path", help="Also scan this Python file for .numpy() calls that may see grad-tracking tensors (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
) -> None:
    """Prove the split inference path never sends a grad-tracking tensor (exit 0 only when clean).

    Runs a real forward through the server, records every tensor the protocol serializes,
    and shows that the original `Can't call numpy() on Tensor that requires grad` failure
    does occur when grad is left on (so this check can fail).

    Example: tsqp check-grad --path tee_runner.py
    """
    from tsqp.tee.session import connect
    from tsqp.tools.checkgrad import GradReport, control_error, scan_paths

    report = GradReport()
    for p in path or []:
        if not p.is_file():
            fail(f"--path {p}: no such file")
    try:
        report.findings = scan_paths(path or [])
    except SyntaxError as e:
        fail(f"cannot parse {e.filename}: {e.msg} (line {e.lineno})")
    with err.status("Running a forward through the split path…", spinner="dots"):
        with connect(endpoint, model, on_send=report.record, progress=progress, curve_secret=curve_secret, server_key=server_key) as session:
            session.generate([1, 2, 3, 4], max_new_tokens=2)
    report.control_error = control_error()
    if as_json:
        print(json.dumps({
            "clean": report.clean, "tensors_sent": len(report.sent), "tensors_requiring_grad": len(report.requiring_grad),
            "grad_enabled_in_core": report.grad_enabled_in_core, "control_error": report.control_error,
            "findings": [vars(f) for f in report.findings],
        }))  # fmt: skip
    else:
        _render(report)
    raise typer.Exit(0 if report.clean else 1)


def _render(report: GradReport) -> None:
    def status(ok: bool) -> str:
        return "[green]ok[/]" if ok else "[bold red]FAIL[/]"

    table = Table(title="check-grad: split inference path")
    table.add_column("check")
    table.add_column("result")
    table.add_column("", justify="center")
    table.add_row("grad mode inside the core", "enabled" if report.grad_enabled_in_core else "disabled (no_grad)", status(not report.grad_enabled_in_core))
    table.add_row("tensors serialized for the wire", str(len(report.sent)), status(bool(report.sent)))
    table.add_row("… of which require grad", str(len(report.requiring_grad)), status(not report.requiring_grad))
    table.add_row("control: same conversion with grad on", report.control_error or "no error raised", status(report.control_reproduced))
    table.add_row("static scan: unprotected .numpy() calls", str(len(report.findings)), status(not report.findings))
    out.print(table)
    for f in report.findings:
        out.print(f"  {f.path}:{f.line}:{f.col}  in {f.function}: [bold]{f.code}[/] — {f.reason}", highlight=False)
    out.print("[green]clean[/]" if report.clean else "[bold red]not clean[/]")
