"""Options shared by several commands, declared once, and the parsing of their values.

Fixed choices are Enums, so `--help` lists them and a bad value fails before anything loads.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from tsqp.cli.console import fail
from tsqp.model.config import ACTIVATION_BITS_RANGE, WEIGHT_BITS_RANGE
from tsqp.shields.config import POOL_MIB, PREFILL_CHUNK, SHIELDS, ShieldConfig


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Transport(str, Enum):
    auto = "auto"
    zmq = "zmq"
    shm = "shm"


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", envvar="TSQP_MODEL", help="`smollm2` (default, SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file."),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint",
        "-e",
        envvar="TSQP_ENDPOINT",
        help="Server to use, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/tsqp.sock. Default: start a private server for this run.",
    ),
]
DeviceOpt = Annotated[Device, typer.Option(help="Where the server computes: auto (CUDA when available), cuda or cpu.")]
DtypeOpt = Annotated[Dtype, typer.Option(help="Server weight dtype.")]
TransportOpt = Annotated[
    Transport,
    typer.Option(
        help="How the hot ops' bodies travel: shm (shared memory, same host; HELLO, STATS and HEALTH stay on the socket), zmq (the socket), or auto (shm when the server is on this host and offers it).",
    ),
]
SpinOpt = Annotated[
    float,
    typer.Option(
        "--spin-us",
        min=0.0,
        help="Shared memory: microseconds a side spins for the other's message before it blocks (0: block at once). A side blocks at once while the machine has more runnable tasks than cores.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text, for scripts.")]
TimeoutOpt = Annotated[float, typer.Option(min=0.001, help="Seconds to wait for any one server reply, once connected.")]
ConnectTimeoutOpt = Annotated[
    float, typer.Option("--connect-timeout", min=0.001, help="Seconds to wait for a connection to --endpoint before saying nothing listens there.")
]
CurveSecretOpt = Annotated[
    Path | None,
    typer.Option(
        "--curve-secret",
        metavar="FILE",
        help="This client's secret key file (NAME.key_secret from `tsqp keys generate`): authenticates to a CURVE server given by --endpoint. Needs --server-key.",
    ),
]
ServerKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--server-key",
        metavar="FILE",
        help="The server's public key file (its NAME.key): proves the server is the right one and encrypts the link. Needs --curve-secret.",
    ),
]
ShieldOpt = Annotated[
    str,
    typer.Option(
        "--shield",
        "-s",
        help="What the server may see: otp (exact one-time pad, recommended) or plain (everything: the original prototype). noise (Gaussian masking) and seqmix (token mixing) are broken by `tsqp audit` and need --research-shields.",
    ),
]
ShieldsOpt = Annotated[str, typer.Option(help=f"Comma list of shields: {', '.join(SHIELDS)}.")]
ALL_SHIELDS = ",".join(SHIELDS)
VerifyOpt = Annotated[
    bool | None,
    typer.Option(
        "--verify/--no-verify",
        help="Check every server result with Freivalds' test and stop with an integrity error on a wrong one. Default: on with otp. "
        "otp and plain check fixed-point integers exactly; under noise and seqmix the check is a float fault detector, not a defence (a server can steer answers inside its rounding tolerance).",
    ),
]
ResearchShieldsOpt = Annotated[
    bool,
    typer.Option("--research-shields", help="Allow the shields `tsqp audit` breaks (noise, seqmix), for research: they do not protect the prompt."),
]
AcceptLowerPrecisionOpt = Annotated[
    bool,
    typer.Option(
        "--accept-lower-precision",
        help="Accept a server whose HELLO announces a lower precision than --dtype (e.g. bfloat16); float checks then widen to it. Default: refused, as a server could claim it to widen the tolerance.",
    ),
]
PrecomputeOpt = Annotated[
    int,
    typer.Option(
        "--precompute",
        min=0,
        help="Precompute masks for this many tokens before the first request (the offline phase; held whatever --pool-mib says); more are made ahead of need by a background worker.",
    ),
]
PoolMibOpt = Annotated[
    int,
    typer.Option("--pool-mib", min=1, help="otp, noise: the most memory (MiB) the mask pool holds made ahead; a call that finds it short makes its own masks."),
]
PrefillChunkOpt = Annotated[
    int,
    typer.Option(
        "--prefill-chunk",
        min=0,
        help="Tokens per prefill forward, every shield: bounds each call's buffers on both sides; 0: the whole prompt at once. otp lowers it where one call's int64 buffers would pass 8 MiB (wide models).",
    ),
]
NoiseScaleOpt = Annotated[float, typer.Option("--noise-scale", min=0.0, help="noise shield: mask standard deviation relative to each row's RMS.")]
WeightBitsOpt = Annotated[
    int,
    typer.Option(
        "--weight-bits",
        min=WEIGHT_BITS_RANGE[0],
        max=WEIGHT_BITS_RANGE[1],
        help="otp: bits per quantized weight (per output row); 12 kept 8/8 test prompts' greedy tokens.",
    ),
]
ActivationBitsOpt = Annotated[
    int, typer.Option("--activation-bits", min=ACTIVATION_BITS_RANGE[0], max=ACTIVATION_BITS_RANGE[1], help="otp: bits per fixed-point activation (per row).")
]
LocalOpt = Annotated[bool, typer.Option("--local", help="Run the linear ops in this process too (the all-in-TEE baseline).")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")]
TopPOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens with this much probability.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Sample only among the k most likely tokens; 0 keeps them all.")]
RepetitionPenaltyOpt = Annotated[
    float,
    typer.Option("--repetition-penalty", min=0.01, max=10.0, help="Above 1, make tokens already in the prompt or answer less likely (transformers' rule)."),
]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="End the answer where this text appears (not included); repeat for several.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="A system prompt before the user's message (needs the chat template).")]


def check_device(device: Device) -> None:
    """`--device cuda` on a host without CUDA fails now, before a model or a server starts (torch is imported for it)."""
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda, but torch sees no CUDA device on this host; use --device auto or --device cpu")


def shield_config(name: str, verify: bool | None, precompute: int, noise_scale: float, weight_bits: int, activation_bits: int,
                  research: bool = False, precision: str = "float32", accept_lower_precision: bool = False,
                  pool_mib: int = POOL_MIB, prefill_chunk: int = PREFILL_CHUNK) -> ShieldConfig:  # fmt: skip
    """The shield settings of run-tee's options, checked before anything loads."""
    if name not in SHIELDS:
        fail(f"--shield {name!r} is not one of {', '.join(SHIELDS)}")
    return ShieldConfig(name, verify, precompute, noise_scale, weight_bits, activation_bits, allow_broken=research, precision=precision,
                        accept_lower_precision=accept_lower_precision, pool_mib=pool_mib, prefill_chunk=prefill_chunk).validate()  # fmt: skip


def shield_names(text: str, option: str = "--shields") -> list[str]:
    """A comma list of distinct shield names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        fail(f"{option} needs at least one name, e.g. plain")
    unknown = [n for n in names if n not in SHIELDS]
    if unknown:
        fail(f"{option} {text!r}: unknown shield {unknown[0]!r}; give distinct names from {', '.join(SHIELDS)}")
    if len(set(names)) != len(names):
        fail(f"{option} {text!r} names a shield twice; give distinct names from {', '.join(SHIELDS)}")
    return names


def counts(text: str, option: str, what: str, example: str) -> list[int]:
    """A comma list of positive integers for `option`, deduplicated in order."""
    try:
        values = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        fail(f"{option} {text!r} is not a comma list of integers, e.g. {example}")
    if not values or min(values) < 1:
        fail(f"{option} needs positive {what}, e.g. {example}")
    return list(dict.fromkeys(values))
