"""Per-round plots of two migrations (needs matplotlib: ``pip install 'pagehint[plot]'``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt
import numpy as np

from pagehint.migration import MigrationResult, RoundStats


def plot_path(arg: str) -> Path:
    """The file ``--plot ARG`` writes: ARG, or ARG.png without a suffix (as matplotlib does);
    ``ValueError`` if matplotlib cannot write that format or the file cannot be written
    there."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(arg)
    if not arg or not path.name:
        raise ValueError(f"--plot {arg!r}: not a file name")
    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = path.suffix[1:].lower()
    if not fmt:
        path = path.with_name(path.name + ".png")
    elif fmt not in formats:
        raise ValueError(
            f"--plot {arg}: matplotlib writes no {fmt!r} files "
            f"(it writes {', '.join(sorted(formats))})"
        )
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"--plot {arg}: no directory {str(parent)!r}")
    if path.is_dir():
        raise ValueError(f"--plot {arg}: {str(path)!r} is a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--plot {arg}: cannot write {str(path)!r}")
    return path


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
