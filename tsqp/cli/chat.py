"""`tsqp chat`: a multi-turn conversation in the terminal; the KV cache carries over between turns."""

from __future__ import annotations

from typing import Annotated

import typer

from tsqp.cli.console import err, out
from tsqp.cli.options import (
    CurveSecretOpt,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    EndpointOpt,
    LocalOpt,
    ModelOpt,
    RepetitionPenaltyOpt,
    ResearchShieldsOpt,
    SeedOpt,
    ServerKeyOpt,
    ShieldOpt,
    StopOpt,
    SystemOpt,
    TemperatureOpt,
    TimeoutOpt,
    TopKOpt,
    TopPOpt,
    VerifyOpt,
    shield_config,
)
from tsqp.cli.sessions import open_session
from tsqp.errors import InputError
from tsqp.shields.config import ACTIVATION_BITS, DEFAULT_SHIELD, NOISE_SCALE, WEIGHT_BITS

HELP = "/reset starts over, /exit (or Ctrl-D) leaves"


def chat(
    model: ModelOpt = "smollm2",
    endpoint: EndpointOpt = None,
    local: LocalOpt = False,
    system: SystemOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens per answer.")] = 256,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    stop: StopOpt = None,
    seed: SeedOpt = None,
    timeout: TimeoutOpt = 60.0,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.float32,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
    shield: ShieldOpt = DEFAULT_SHIELD,
    verify: VerifyOpt = None,
    research_shields: ResearchShieldsOpt = False,
) -> None:
    """Chat with the model, turn after turn; each turn computes only its new tokens (the KV cache is kept).

    Type a message and Enter; /reset starts over, /exit or Ctrl-D leaves.

    Example: tsqp chat --system "You are a concise assistant."
    """
    shielding = shield_config(shield, verify, 0, NOISE_SCALE, WEIGHT_BITS, ACTIVATION_BITS, research_shields, dtype.value)
    session = open_session(model, endpoint, local, timeout, shielding, device, dtype.value, curve_secret, server_key)
    from tsqp.tee.chat import Conversation

    with session:
        conversation = Conversation(session, system)
        err.print(f"[dim]tsqp chat · {session.shield_info()['shield']} · {HELP}[/]")
        while True:
            try:
                text = input("> ").strip()
            except EOFError:
                break
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                conversation.reset()
                err.print("[dim]started over[/]")
                continue
            if not text:
                continue
            try:
                result = conversation.say(text, max_new_tokens, on_text=lambda t: out.print(t, end="", markup=False, highlight=False, soft_wrap=True),
                                          temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                                          stop=stop or (), seed=seed)  # fmt: skip
            except InputError as e:
                err.print(f"[bold red]error:[/] {e}", highlight=False)
                continue
            out.print()
            t = result.timings
            err.print(f"[dim]{len(result.token_ids)} tokens ({result.finish_reason}) · {t['reused_tokens']:.0f} cached, "
                      f"{len(result.prompt_token_ids) - t['reused_tokens']:.0f} new prompt tokens · {t['decode_tokens_per_s']:.1f} tok/s[/]")  # fmt: skip
