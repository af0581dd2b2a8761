"""`ShieldConfig`: a shield's settings, checked once, and the one home of their defaults.

The one object handed from the CLI to the session, the shield and the private server.
Imports nothing heavy: the CLI checks its options before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsqp.errors import ShieldError
from tsqp.model.config import ACTIVATION_BITS_RANGE, WEIGHT_BITS_RANGE

SHIELDS = ("plain", "otp", "noise", "seqmix")
# Shields the audit breaks (README, `tsqp audit`): kept for comparison in bench and audit, refused
# elsewhere unless the user asks for them as research (`--research-shields`, `allow_broken=True`).
BROKEN_SHIELDS = {
    "noise": "sequential maximum-likelihood decoding over a few layers recovers most prompt and generated tokens",
    "seqmix": "cancelling its rank-one mixing plane recovers every prompt token, and one decoded token is not mixed at all",
}
DEFAULT_SHIELD = "otp"
NOISE_SCALE = 10.0  # noise: mask standard deviation over each row's RMS
WEIGHT_BITS = 12  # otp: bits per quantized weight (per output row); kept 8/8 test prompts' greedy tokens
ACTIVATION_BITS = 16  # otp: bits per fixed-point activation (per row)
# Unit roundoff of a server's product dtype: the float fault detector's tolerance scales with it.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
POOL_MIB = 64  # otp, noise: the most memory the mask pool holds made ahead (docs/benchmarks.md)
PREFILL_CHUNK = 128  # tokens per prefill forward: bounds every per-call buffer on both sides


@dataclass(frozen=True)
class ShieldConfig:
    name: str = DEFAULT_SHIELD
    verify: bool | None = None  # Freivalds' check of every result; None: the shield's default (on with otp)
    precompute: int = 0  # tokens of masks made before the first request
    noise_scale: float = NOISE_SCALE
    weight_bits: int = WEIGHT_BITS
    activation_bits: int = ACTIVATION_BITS
    allow_broken: bool = False  # research: permit a shield in BROKEN_SHIELDS
    # The runner's policy, never the server's claim: the product dtype the float check's tolerance
    # assumes; a server announcing a lower precision is refused unless this is set.
    precision: str = "float32"
    accept_lower_precision: bool = False
    pool_mib: int = POOL_MIB
    prefill_chunk: int = PREFILL_CHUNK  # 0: the whole prompt in one forward

    @property
    def verifies(self) -> bool:
        """Whether results are checked: `verify`, else on with otp, whose check is exact and cheap."""
        return self.name == "otp" if self.verify is None else self.verify

    @property
    def exact(self) -> bool:
        """Fixed-point products checked exactly: otp, and plain when verified (otp without the pad)."""
        return self.name == "otp" or (self.name == "plain" and self.verifies)

    def server_precision(self, claimed: object) -> str:
        """The dtype the checks assume for a server whose HELLO claims `claimed`: the runner's
        `precision`, or a lower claim only when the user accepted it. A server may not widen the
        tolerance it is checked with by announcing a coarser dtype."""
        if not isinstance(claimed, str) or claimed not in UNIT_ROUNDOFF:
            raise ShieldError(f"the server announces products in {claimed!r}, not one of {', '.join(UNIT_ROUNDOFF)}; refused")
        if UNIT_ROUNDOFF[claimed] <= UNIT_ROUNDOFF[self.precision]:
            return self.precision  # as precise or more: the runner's tolerance stands
        if not self.accept_lower_precision:
            raise ShieldError(f"the server announces {claimed} products, less precise than the {self.precision} this runner expects; "
                              f"refused: pass --dtype {claimed} or --accept-lower-precision if you trust that server's claim")  # fmt: skip
        return claimed

    def validate(self) -> ShieldConfig:
        """Raise `ShieldError` naming the first setting out of range; returns self."""
        if self.name not in SHIELDS:
            raise ShieldError(f"unknown shield {self.name!r}; choose one of {', '.join(SHIELDS)}")
        if self.name in BROKEN_SHIELDS and not self.allow_broken:
            raise ShieldError(
                f"the {self.name} shield is broken ({BROKEN_SHIELDS[self.name]}): use otp, or pass --research-shields (allow_broken=True) to run it for research"
            )
        if self.precision not in UNIT_ROUNDOFF:
            raise ShieldError(f"unknown precision {self.precision!r}; choose one of {', '.join(UNIT_ROUNDOFF)}")
        if self.precompute < 0:
            raise ShieldError(f"precompute must be at least 0 tokens, got {self.precompute}")
        if self.pool_mib < 1:
            raise ShieldError(f"the mask pool needs at least 1 MiB, got {self.pool_mib}")
        if self.prefill_chunk < 0:
            raise ShieldError(f"prefill chunk must be at least 1 token (0: the whole prompt), got {self.prefill_chunk}")
        if not self.noise_scale > 0:
            raise ShieldError(f"noise scale must be positive, got {self.noise_scale}")
        for what, bits, (low, high) in (("weight", self.weight_bits, WEIGHT_BITS_RANGE), ("activation", self.activation_bits, ACTIVATION_BITS_RANGE)):
            if not low <= bits <= high:
                raise ShieldError(f"otp {what} bits must be {low}..{high}, got {bits}")
        return self
