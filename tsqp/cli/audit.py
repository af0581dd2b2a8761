"""`tsqp audit`: play the curious server and measure what each shield lets it learn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tsqp.cli.console import err, fail, out
from tsqp.cli.options import ALL_SHIELDS, Device, DeviceOpt, Dtype, DtypeOpt, JsonOpt, ModelOpt, ShieldsOpt, shield_names


def audit(
    model: ModelOpt = "smollm2",
    shields: ShieldsOpt = ALL_SHIELDS,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="How many of the built-in chat prompts to run per shield (at most 8).")] = 4,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens to generate per prompt (greedy).")] = 8,
    keep: Annotated[
        Path | None, typer.Option("--keep", metavar="DIR", help="Keep each shield's recording in DIR/SHIELD (default: temporary, deleted).")
    ] = None,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.float32,
    as_json: JsonOpt = False,
) -> None:
    """Play the curious server: record each shield's traffic and try to recover the tokens from it.

    With only the public weights and what it received, the attacker guesses the prompt tokens
    (nearest vocabulary row to each layer-0 input; the token ids themselves where the server
    embeds) and the generated tokens (arg-max of each lm_head input's logits). A shield that
    hides the text leaves both at chance (1 / vocabulary size).

    Example: tsqp audit --shields plain,otp --prompts 2 --new-tokens 4 --json
    """
    from tsqp.tools.audit import PROMPTS, run_audit

    names = shield_names(shields)
    if prompts > len(PROMPTS):
        fail(f"--prompts {prompts}: there are {len(PROMPTS)} built-in prompts")
    with err.status("Auditing…", spinner="dots") as status:
        results = run_audit(model, names, PROMPTS[:prompts], new_tokens, device.value, dtype.value, keep,
                            progress=lambda message: status.update(f"Auditing: {escape(message)}…"))  # fmt: skip
    if as_json:
        print(json.dumps({"results": [r.as_dict() for r in results]}))
        return
    table = Table(title=f"audit: what a curious server recovers · {prompts} prompt(s) × {new_tokens} new tokens")
    for column in ("shield", "prompt tokens recovered", "generated tokens recovered", "chance"):
        table.add_column(column, justify="left" if column == "shield" else "right")
    for r in results:
        table.add_row(r.shield, f"{r.prompt_token_recovery:.1%} of {r.prompt_tokens}",
                      f"{r.generated_token_recovery:.1%} of {r.generated_tokens}", f"{r.chance:.4%}")  # fmt: skip
    out.print(table)
