"""Where the CLI writes: answers and tables on stdout, progress and one-line errors on stderr."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from tsqp.errors import clean_text

out = Console()
err = Console(stderr=True, soft_wrap=True)  # a one-line error stays one line in logs, whatever the width


def error_line(message: object) -> None:
    """One red line on stderr. The message is shown as text: markup and control characters in it (a server's words) do nothing."""
    err.print(f"[bold red]error:[/] {escape(clean_text(message, limit=10_000))}", highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """One red line on stderr, then exit with `code`."""
    error_line(message)
    raise typer.Exit(code)


def progress(message: str) -> None:
    err.log(message)
