"""What the migration commands share: both runs (hints off, then on) under one progress bar,
and the side-by-side table of their QMP figures."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as Bar
from rich.table import Table

from pagehint.migration import MigrationResult, Progress

SHOW_PROGRESS_AFTER = 0.3
"""Seconds of wall time before a progress line appears (short runs stay quiet)."""

T = TypeVar("T")
Runner = Callable[[bool, Callable[[Progress], None] | None], T]
"""``runner(hints, progress)``: one migration with hints off or on."""


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f}"


ROWS: list[tuple[str, str, Any]] = [
    ("total time (ms)", "total-time", lambda v: f"{v:,.0f}"),
    ("downtime (ms)", "downtime", lambda v: f"{v:,.1f}"),
    ("setup time (ms)", "setup-time", lambda v: f"{v:,.1f}"),
    ("transferred (MiB)", "ram.transferred", mib),
    ("normal pages", "ram.normal", lambda v: f"{v:,}"),
    ("zero pages (duplicate)", "ram.duplicate", lambda v: f"{v:,}"),
    ("dirty syncs", "ram.dirty-sync-count", lambda v: f"{v}"),
    ("pages hinted", "pages-hinted", lambda v: f"{v:,}"),
    ("pages skipped by hints", "pages-skipped", lambda v: f"{v:,}"),
    ("lost pages", "lost-pages", lambda v: "n/a" if v is None else f"{v:,}"),
]


def _get(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def change_text(before: float, after: float) -> str:
    """The change from ``before`` to ``after``: a percentage, or a factor once it is more
    than tenfold (a near-zero baseline makes percentages meaningless: +85630 %); empty when
    there is no baseline."""
    if not before:
        return ""
    if after / before > 10:
        return f"x{after / before:,.0f}"
    return f"{(after - before) / before * 100:+.0f}%"


def comparison_table(
    title: str,
    off: MigrationResult,
    on: MigrationResult,
    extra: Sequence[tuple[str, str, str]] = (),
) -> Table:
    """The two runs side by side, with the change of time, downtime and bytes; ``extra``
    rows (label, off, on) go last."""
    table = Table(title=escape(title))
    table.add_column("")
    table.add_column("hints off", justify="right")
    table.add_column("hints on", justify="right")
    table.add_column("change", justify="right")
    a, b = off.to_dict(), on.to_dict()
    for label, key, fmt in ROWS:
        va, vb = _get(a, key), _get(b, key)
        change = change_text(va, vb) if key in ("total-time", "downtime", "ram.transferred") else ""
        table.add_row(label, fmt(va), fmt(vb), change)
    for label, va_s, vb_s in extra:
        table.add_row(label, va_s, vb_s, "")
    return table


def run_both(
    runner: Runner[T], *, show: bool, console: Console, page_size: int, clock: str
) -> tuple[T, T]:
    """Runs hints off, then on, with a progress bar of the current round (its dirty pages sent
    or skipped) on ``console`` when ``show`` and a run lasts past ``SHOW_PROGRESS_AFTER``;
    ``clock`` names the seconds shown ("simulated", "elapsed")."""
    out: list[T] = []
    with Bar(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not show,
        auto_refresh=False,
    ) as bar:
        for label, hints in (("hints off", False), ("hints on", True)):
            task = bar.add_task(label, total=None, visible=False)
            t0 = time.perf_counter()

            def progress(p: Progress, task: Any = task, t0: float = t0, label: str = label) -> None:
                if time.perf_counter() - t0 < SHOW_PROGRESS_AFTER:
                    return
                bar.update(
                    task,
                    visible=True,
                    total=max(p.round_dirty, 1),
                    completed=max(p.round_dirty - p.remaining, 0),
                    description=(
                        f"{label}: round {p.round}, {mib(p.remaining * page_size)} MiB dirty, "
                        f"{p.time:.1f} s {clock}"
                    ),
                )
                bar.refresh()

            out.append(runner(hints, progress if show else None))
            bar.remove_task(task)
    return out[0], out[1]
