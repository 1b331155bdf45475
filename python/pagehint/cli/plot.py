"""Per-round plots of two migrations (needs matplotlib: ``pip install 'pagehint[plot]'``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt
import numpy as np

from pagehint.migration import MigrationResult, RoundStats


def y_scale(values: Sequence[int]) -> str:
    """``symlog`` when the bars span more than two orders of magnitude (a first round of a
    million pages next to rounds of a hundred would leave those flat at zero), else
    ``linear``. Symmetric log keeps zero-height bars drawable."""
    nonzero = [v for v in values if v > 0]
    if nonzero and max(nonzero) > 100 * min(nonzero):
        return "symlog"
    return "linear"


def plot_rounds(title: str, off: MigrationResult, on: MigrationResult, path: str) -> None:
    """Dirty pages at each round's start, pages sent and pages hints skipped, per round, for
    the run with hints off and the run with hints on, written to ``path`` (PNG)."""
    series: list[tuple[str, Callable[[RoundStats], int]]] = [
        ("dirty at round start", lambda r: r.dirty_at_start),
        ("pages sent", lambda r: r.normal + r.duplicate),
        ("pages skipped by hints", lambda r: r.pages_skipped),
    ]
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.6), sharex=True)
    width = 0.4
    for ax, (name, get) in zip(axes, series, strict=True):
        for shift, label, result in ((-width / 2, "hints off", off), (width / 2, "hints on", on)):
            x = np.arange(len(result.rounds)) + shift
            ax.bar(x, [get(r) for r in result.rounds], width, label=label)
        ax.set_yscale(y_scale([get(r) for r in (*off.rounds, *on.rounds)]))
        ax.set_xticks(range(max(len(off.rounds), len(on.rounds))))
        ax.set_title(name)
        ax.set_xlabel("round (last: stop-and-copy)")
        ax.set_ylabel("pages")
    axes[0].legend()
    fig.suptitle(
        f"{title}: total {off.total_time * 1000:,.0f} ms without hints, "
        f"{on.total_time * 1000:,.0f} ms with"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
