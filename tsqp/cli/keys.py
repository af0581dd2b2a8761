"""`tsqp keys`: CURVE key pairs that authenticate and encrypt the client–server link."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tsqp.cli.console import fail
from tsqp.errors import TsqpError


def generate(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the key pair (created if missing).")],
    name: Annotated[str, typer.Option("--name", help="File name stem: NAME.key (public) and NAME.key_secret (secret).")] = "tsqp",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair of that name.")] = False,
) -> None:
    """Write a CURVE key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600).

    ZeroMQ's certificate format. Give the public file to the other side:
    a client's NAME.key goes into the server's --allow-clients folder,
    the server's NAME.key is the clients' --server-key.
    Secret files stay where they were made.

    Example: tsqp keys generate keys/ --name server
    """
    from tsqp.wire.keys import generate as generate_pair

    try:
        public, secret = generate_pair(folder, name, force)
    except TsqpError as e:  # also under typer's test runner, which bypasses `main`
        fail(str(e))
    print(f"public key: {public}")
    print(f"secret key: {secret}")
