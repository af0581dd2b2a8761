"""`tsqp run-tee`: the trusted runner; every linear op goes to the server under the chosen shield."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tsqp.cli.console import err, out
from tsqp.cli.options import (
    AcceptLowerPrecisionOpt,
    ActivationBitsOpt,
    ConnectTimeoutOpt,
    CurveSecretOpt,
    Device,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    EndpointOpt,
    JsonOpt,
    LocalOpt,
    ModelOpt,
    NoiseScaleOpt,
    PoolMibOpt,
    PrecomputeOpt,
    PrefillChunkOpt,
    RepetitionPenaltyOpt,
    ResearchShieldsOpt,
    SeedOpt,
    ServerKeyOpt,
    ShieldOpt,
    SpinOpt,
    StopOpt,
    SystemOpt,
    TemperatureOpt,
    TimeoutOpt,
    TopKOpt,
    TopPOpt,
    Transport,
    TransportOpt,
    VerifyOpt,
    WeightBitsOpt,
    shield_config,
)
from tsqp.cli.sessions import open_session, read_prompt
from tsqp.shields.config import ACTIVATION_BITS, DEFAULT_SHIELD, NOISE_SCALE, POOL_MIB, PREFILL_CHUNK, WEIGHT_BITS
from tsqp.wire.endpoints import CONNECT_TIMEOUT_S
from tsqp.wire.shm import DEFAULT_SPIN_US

if TYPE_CHECKING:
    from tsqp.tee.generation import Generation


def run_tee(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user's message (or raw text with --no-chat); - reads it from stdin.")],
    model: ModelOpt = "smollm2",
    endpoint: EndpointOpt = None,
    local: LocalOpt = False,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Apply the model's chat template to the prompt.")] = True,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens to generate.")] = 128,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    top_k: TopKOpt = 0,
    repetition_penalty: RepetitionPenaltyOpt = 1.0,
    stop: StopOpt = None,
    system: SystemOpt = None,
    timeout: TimeoutOpt = 60.0,
    connect_timeout: ConnectTimeoutOpt = CONNECT_TIMEOUT_S,
    offload_attention_from: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Also send attention's QKᵀ and AV products to the server for calls of at least this many tokens (long prefills). Default: attention stays here.",
        ),
    ] = None,
    device: DeviceOpt = Device.auto,
    dtype: DtypeOpt = Dtype.float32,
    as_json: JsonOpt = False,
    curve_secret: CurveSecretOpt = None,
    server_key: ServerKeyOpt = None,
    shield: ShieldOpt = DEFAULT_SHIELD,
    verify: VerifyOpt = None,
    precompute: PrecomputeOpt = 0,
    noise_scale: NoiseScaleOpt = NOISE_SCALE,
    weight_bits: WeightBitsOpt = WEIGHT_BITS,
    activation_bits: ActivationBitsOpt = ACTIVATION_BITS,
    transport: TransportOpt = Transport.auto,
    spin_us: SpinOpt = DEFAULT_SPIN_US,
    research_shields: ResearchShieldsOpt = False,
    accept_lower_precision: AcceptLowerPrecisionOpt = False,
    pool_mib: PoolMibOpt = POOL_MIB,
    prefill_chunk: PrefillChunkOpt = PREFILL_CHUNK,
) -> None:
    """Generate an answer; every linear op runs on the server, masked by the shield (otp by default), the rest here.

    Example: tsqp run-tee --prompt "What is the capital of France?" --max-new-tokens 32

    Example: tsqp run-tee --prompt "Hi" --shield plain --no-verify   (the unprotected baseline)

    Example: echo "Summarize: ..." | tsqp run-tee -p - --system "Answer in one line." --stop "\\n\\n"
    """
    shielding = shield_config(shield, verify, precompute, noise_scale, weight_bits, activation_bits, research_shields, dtype.value,
                              accept_lower_precision, pool_mib, prefill_chunk)  # fmt: skip
    prompt = read_prompt(prompt)
    session = open_session(model, endpoint, local, timeout, shielding, device, dtype.value, curve_secret, server_key, offload_attention_from, connect_timeout,
                           transport.value, spin_us)  # fmt: skip
    with session:
        stream = None if as_json else (lambda text: out.print(text, end="", markup=False, highlight=False, soft_wrap=True))
        result = session.generate(prompt, max_new_tokens, temperature, top_p, seed, chat, on_text=stream, top_k=top_k,
                                  repetition_penalty=repetition_penalty, stop=stop or (), system=system)  # fmt: skip
    shield_info = session.shield_info()
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "prompt_token_ids": result.prompt_token_ids,
                          "finish_reason": result.finish_reason, "timings": result.timings, "shield": shield_info}))  # fmt: skip
    else:
        out.print()
        err.print(_summary(result, shield_info))


def _summary(result: Generation, shield_info: dict[str, Any]) -> str:
    """One dim line under the answer: tokens, shield, speed, round trips, offline work."""
    t = result.timings
    return (
        f"[dim]{len(result.token_ids)} tokens ({result.finish_reason}) · {shield_info['shield']}{' + verify' if shield_info['verify'] else ''}"
        f" · prefill {t['prefill_s']:.2f} s · {t['decode_tokens_per_s']:.1f} tok/s"
        + (f" · {t['round_trips']:.0f} round trips" if "round_trips" in t else "")
        + (f" · offline masks {t['offline_s']:.2f} s, {shield_info.get('pool_peak_mib', 0):.0f} MiB" if t.get("offline_s") else "")
        + "[/]"
    )
