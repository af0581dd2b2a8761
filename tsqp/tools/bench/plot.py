"""Stacked bars of where a decoded token's time goes (needs matplotlib)."""

from __future__ import annotations

import os

from tsqp.errors import TsqpError
from tsqp.tools.bench.results import PARTS, BenchReport


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise TsqpError("--plot needs matplotlib: pip install matplotlib") from None


def plot(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """Stacked bars: per-token time of each part, one bar per mode and prompt size."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    labels = [f"{r.mode}\n{r.prompt_tokens} tok" for r in report.results]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.5))
    bottom = [0.0] * len(labels)
    for part in PARTS:
        values = [r.breakdown_ms_per_token[part] for r in report.results]
        if any(values):
            ax.bar(labels, values, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per decoded token (median)")
    ax.set_title(f"tsqp bench: where a decoded token's time goes ({report.settings['new_tokens']} new tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
