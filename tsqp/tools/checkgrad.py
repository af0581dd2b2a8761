"""`tsqp check-grad`: prove the inference path never hands a grad-tracking tensor to the wire.

The prototype failed with `Can't call numpy() on Tensor that requires grad` when its
TEE runner turned activations into numpy arrays for the wire; the fix was running the
forward under `torch.no_grad()`. This check runs a real forward through the split path,
records every tensor the protocol serializes and the grad mode it was produced under,
and runs a control that shows the original failure does happen with grad enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tsqp.tools.gradscan import Finding, scan_file
from tsqp.wire import protocol


@dataclass
class SentTensor:
    op: str
    shape: tuple[int, ...]
    requires_grad: bool
    grad_enabled: bool


@dataclass
class GradReport:
    sent: list[SentTensor] = field(default_factory=list)
    control_error: str | None = None  # what serializing a grad-tracking tensor raised
    findings: list[Finding] = field(default_factory=list)

    @property
    def grad_enabled_in_core(self) -> bool:
        return any(s.grad_enabled for s in self.sent)

    @property
    def requiring_grad(self) -> list[SentTensor]:
        return [s for s in self.sent if s.requires_grad]

    @property
    def control_reproduced(self) -> bool:
        return self.control_error is not None and "requires grad" in self.control_error

    @property
    def clean(self) -> bool:
        return bool(self.sent) and not self.grad_enabled_in_core and not self.requiring_grad and self.control_reproduced and not self.findings

    def record(self, op: str, tensor: torch.Tensor) -> None:
        """`RemoteBackend.on_send` hook: called for each tensor just before it is serialized."""
        self.sent.append(SentTensor(op, tuple(tensor.shape), tensor.requires_grad, torch.is_grad_enabled()))


def control_error() -> str | None:
    """Serialize, with grad enabled, an activation computed like the core computes one."""
    weight = torch.nn.Parameter(torch.randn(8, 8))
    activation = torch.randn(1, 8) @ weight  # requires_grad, as outside no_grad
    try:
        protocol.encode(protocol.request("LINEAR", 0, {}, [activation]))
    except RuntimeError as e:
        return str(e)
    return None


def scan_paths(paths: list[Path]) -> list[Finding]:
    return [finding for path in paths for finding in scan_file(path)]
