"""`tsqp audit`: play the curious server and measure what each shield lets it learn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tsqp.cli.console import err, fail, out
from tsqp.cli.options import ALL_SHIELDS, Device, DeviceOpt, Dtype, DtypeOpt, JsonOpt, ModelOpt, ShieldsOpt, shield_names

if TYPE_CHECKING:
    from tsqp.tools.audit import AuditResult
    from tsqp.tools.steering import SteeringResult


def audit(
    model: ModelOpt = "smollm2",
    shields: ShieldsOpt = ALL_SHIELDS,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="How many of the built-in chat prompts to run per shield (at most 8).")] = 4,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens to generate per prompt (greedy).")] = 8,
    keep: Annotated[
        Path | None, typer.Option("--keep", metavar="DIR", help="Keep each shield's recording in DIR/SHIELD (default: temporary, deleted).")
    ] = None,
    privacy: Annotated[bool, typer.Option("--privacy/--no-privacy", help="Record each shield's traffic and attack it for the tokens.")] = True,
    integrity: Annotated[
        bool, typer.Option("--integrity/--no-integrity", help="Steer each shield's --verify with a lying server (in-process) and count the answers it changed.")
    ] = True,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.float32,
    as_json: JsonOpt = False,
) -> None:
    """Play the hostile server: recover the tokens from each shield's traffic, and steer its verified answers.

    Privacy: with only the public model and what it received, the attacker guesses the prompt
    and generated tokens: nearest vocabulary row to each layer-0 input and arg-max of lm_head
    inputs (`nearest`), seqmix's mixing plane cancelled (`rank-one`), and sequential
    maximum-likelihood decoding over the first 4 layers (`noise-ml`). A shield that hides the
    text leaves them at chance: 1/V, and the permutation baseline (the guesses against the
    truth shuffled). Integrity: a server that lies inside the float check's tolerance
    (`tolerance`) or claims bfloat16 to widen it (`dtype-claim`; `-accepted`: the user opted in),
    against each shield run with --verify.

    Example: tsqp audit --shields plain,otp --prompts 2 --new-tokens 4 --json
    """
    from tsqp.tools.audit import PROMPTS, run_audit

    names = shield_names(shields)
    if prompts > len(PROMPTS):
        fail(f"--prompts {prompts}: there are {len(PROMPTS)} built-in prompts")
    with err.status("Auditing…", spinner="dots") as status:
        report = run_audit(model, names, PROMPTS[:prompts], new_tokens, device.value, dtype.value, keep,
                           progress=lambda message: status.update(f"Auditing: {escape(message)}…"), privacy=privacy, integrity=integrity)  # fmt: skip
    if as_json:
        print(json.dumps({"results": [r.as_dict() for r in report.privacy], "integrity": [r.as_dict() for r in report.integrity]}))
        return
    if report.privacy:
        out.print(privacy_table(report.privacy, f"{prompts} prompt(s) × {new_tokens} new tokens"))
    if report.integrity:
        out.print(integrity_table(report.integrity, f"{prompts} prompt(s) × {new_tokens} new tokens"))


def privacy_table(results: list[AuditResult], what: str) -> Table:
    table = Table(title=f"audit: what a curious server recovers · {what}")
    for column in ("shield", "prompt tokens recovered", "generated tokens recovered", "by attack (prompt / generated)", "chance: 1/V · permutation"):
        table.add_column(column, justify="left" if column == "shield" else "right")
    for r in results:
        by_attack = " · ".join(f"{name} {a.get('prompt', 0):.0%}/{a['generated']:.0%}" if "generated" in a else f"{name} {a['prompt']:.0%}"
                               for name, a in r.attacks.items())  # fmt: skip
        table.add_row(r.shield, f"{r.prompt_token_recovery:.1%} of {r.prompt_tokens}", f"{r.generated_token_recovery:.1%} of {r.generated_tokens}",
                      by_attack, f"{r.chance:.4%} · {r.permutation_chance_prompt:.1%} / {r.permutation_chance_generated:.1%}")  # fmt: skip
    return table


def integrity_table(results: list[SteeringResult], what: str) -> Table:
    table = Table(title=f"audit: what a lying server changes under --verify · {what}")
    for column in ("shield", "attack", "changed, undetected", "detected", "unchanged"):
        table.add_column(column, justify="left" if column in ("shield", "attack") else "right")
    for r in results:
        table.add_row(r.shield, r.attack, f"{r.changed_undetected}/{r.prompts}", f"{r.detected}/{r.prompts}", f"{r.unchanged}/{r.prompts}")
    return table
