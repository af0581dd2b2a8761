"""What a bench run measures, the prompts it feeds, and the private server it starts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tsqp.shields.config import POOL_MIB, PREFILL_CHUNK, SHIELDS, ShieldConfig
from tsqp.wire.shm import DEFAULT_SPIN_US

if TYPE_CHECKING:
    from tsqp.tee.private_server import PrivateServer

# torch is imported where it is used: option errors should come back at once.

BASELINES = ("hf-generate", "local")
# Deterministic, ordinary English so prompt tokens look like real text to the tokenizer.
PROMPT_TEXT = (
    "The history of computing is a story of machines that learned to follow instructions ever faster. "
    "Early mechanical calculators added and multiplied numbers with gears; later, vacuum tubes and then "
    "transistors made it possible to store programs in memory and run them at electronic speed. "
)


@dataclass
class BenchConfig:
    model: str = "smollm2"
    shields: list[str] = field(default_factory=lambda: list(SHIELDS))
    verify: bool | None = None  # Freivalds' check of every server result; None: each shield's default (on with otp)
    prompt_tokens: list[int] = field(default_factory=lambda: [32, 128, 512])
    new_tokens: int = 64
    repeat: int = 5
    endpoint: str | None = None  # None: a private server, started once for all split modes
    timeout_s: float = 60.0
    curve_secret: str | None = None  # CURVE keys for a remote endpoint (see tsqp.keys)
    server_key: str | None = None
    clients: list[int] = field(default_factory=list)  # load test: concurrent runner counts; empty: none
    http_clients: list[int] = field(default_factory=list)  # HTTP load test against serve-tee: concurrent client counts; empty: none
    batch: bool | None = None  # the private server's cross-client batching; None: its default for the device
    device: str = "auto"  # the private server's device and weight dtype
    dtype: str = "float32"
    transport: str = "auto"  # how the split modes' hot ops travel (RemoteBackend); the private server offers shm
    spin_us: float = DEFAULT_SPIN_US
    precompute: bool = False  # fill the mask pool for the whole run before it starts; else masks are made during it
    pool_mib: int = POOL_MIB
    prefill_chunk: int = PREFILL_CHUNK  # every mode, local included

    @property
    def modes(self) -> list[str]:
        return [*BASELINES, *self.shields]

    def shield(self, mode: str) -> ShieldConfig:
        """The settings a split mode runs with (checked where the shield is made)."""
        # bench compares every shield, broken ones included
        return ShieldConfig(mode, self.verify, allow_broken=True, precision=self.dtype, pool_mib=self.pool_mib, prefill_chunk=self.prefill_chunk)


Progress = Callable[[str, int, int], None]  # (description, runs done, runs in all)


class ProgressCounter:
    def __init__(self, total: int, report: Progress | None) -> None:
        self.done, self.total, self.report = 0, total, report

    def show(self, description: str) -> None:
        if self.report is not None:
            self.report(description, self.done, self.total)


def private_server(config: BenchConfig, folder: Path, modes: Sequence[str] | None = None) -> PrivateServer | None:
    """The private server the split modes and the load test use, unless `config.endpoint` names one; None then.
    `modes`: the shields it will serve (default: every --shields mode)."""
    from tsqp.tee.private_server import PrivateServer

    if config.endpoint is not None:
        return None
    # Quantized weights (float64, ~8 bytes a weight) only when otp is measured: otherwise they
    # would inflate every mode's server memory and start-up.
    shield = config.shield("otp" if "otp" in (config.shields if modes is None else modes) else "plain")
    args = [] if config.batch is None else ["--batch" if config.batch else "--no-batch"]
    return PrivateServer(folder, config.device, config.dtype, shield, extra_args=args, spin_us=config.spin_us)


def prompt_ids(tokenizer: Any, n: int, vocab_size: int) -> list[int]:
    """Exactly n prompt token ids: a fixed text repeated and cut at n tokens (no chat template).

    Without a tokenizer: deterministic ids spread over the vocabulary.
    """
    if tokenizer is None:
        return [(7 + 7919 * i) % vocab_size for i in range(n)]
    once = list(tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"])
    return (once * (n // len(once) + 1))[:n]
