"""Where the CLI writes: answers and tables on stdout, progress and one-line errors on stderr."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True, soft_wrap=True)  # a one-line error stays one line in logs, whatever the width


def fail(message: str, code: int = 1) -> NoReturn:
    """One red line on stderr, then exit with `code`."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def progress(message: str) -> None:
    err.log(message)
