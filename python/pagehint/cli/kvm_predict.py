"""The simulator's prediction of ``pagehint migrate-kvm`` runs, next to what they measured.

``predict_runs(args, off, on, timelines)`` takes the ``migrate-kvm`` options (the parsed
namespace, with ``bandwidth_bps`` and ``downtime_s`` as ``run`` sets them), the two
``KvmRun``s and the ``SendTimeline`` each migration reported its progress to
(``migrate_once(..., progress=timeline)``; it chains another callback), and simulates the same
migrations (``pagehint.sim.kvm_model``), each with the machine's figures measured on its run:
the guest's step rate, the sender's rate, the wait for the destination process. ``compare``
and ``prediction_table`` put the figures side by side.

``pagehint migrate-kvm --predict`` prints the comparison after its runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.table import Table

from pagehint.kvm.guest_program import kernel_bytes_for
from pagehint.sim import parse_size
from pagehint.sim.kvm_model import (
    Comparison,
    KvmPrediction,
    KvmRunParams,
    SendTimeline,
    measured_sender_rate,
    predict_kvm_run,
    step_rate,
)

if TYPE_CHECKING:
    # Imported where used otherwise: migrate_kvm may import this module.
    from pagehint.cli.migrate_kvm import KvmRun

__all__ = [
    "kvm_run_params",
    "measured_figures",
    "measured_params",
    "predict_runs",
    "prediction_table",
]


def kvm_run_params(
    args: argparse.Namespace,
    *,
    rate: float | None = None,
    sender_rate: float | None = None,
    startup_wait: float = 0.0,
) -> KvmRunParams:
    """The model's parameters for a ``migrate-kvm`` run with options ``args``, its guest
    running ``rate`` steps per second (None: the model's estimate), its sender moving
    ``sender_rate`` bytes per second (None: keeping the pace) after it waited
    ``startup_wait`` seconds for the destination to start reading."""
    from pagehint.cli.migrate_kvm import BLOCK, WALL_CLOCK_BATCH_PAGES, _memmap

    return KvmRunParams(
        kernel_bytes=kernel_bytes_for(_memmap(parse_size(args.memory)), block_bytes=BLOCK),
        sender_rate=sender_rate,
        startup_wait=startup_wait,
        memory=parse_size(args.memory),
        block_bytes=BLOCK,
        write_blocks=args.write_blocks,
        free_blocks=args.free_blocks,
        pages_per_step=args.pages_per_step,
        step_rate=rate,
        bandwidth=args.bandwidth_bps,
        max_downtime=args.downtime_s,
        log_mode=args.log_mode,
        strategy=args.strategy,
        batch_pages=WALL_CLOCK_BATCH_PAGES,
    )


def measured_params(
    args: argparse.Namespace, run: KvmRun, timeline: SendTimeline | None = None
) -> KvmRunParams:
    """The model's parameters for ``run`` (made with options ``args``), with what the machine
    did measured on it: the guest's step rate, and, given the run's ``SendTimeline``, the
    destination's start-up wait and the sender's rate."""
    wait = 0.0 if timeline is None else timeline.startup_wait()
    return kvm_run_params(
        args,
        rate=step_rate(run.steps, run.result),
        sender_rate=None if timeline is None else measured_sender_rate(run.result, wait),
        startup_wait=wait,
    )


def predict_runs(
    args: argparse.Namespace,
    off: KvmRun,
    on: KvmRun,
    timelines: tuple[SendTimeline, SendTimeline] | None = None,
) -> KvmPrediction:
    """The simulator's migrations of the runs ``off`` (hints off) and ``on`` (hints on) made
    with options ``args``, each with its own measured figures (``measured_params``; the
    ``SendTimeline`` each run reported its progress to, if given, off's then on's)."""
    tl_off, tl_on = (None, None) if timelines is None else timelines
    return predict_kvm_run(measured_params(args, off, tl_off), measured_params(args, on, tl_on))


_LABELS = {
    "transferred": ("transferred (MiB)", 1 / (1 << 20), "{:,.2f}"),
    "pages_skipped": ("pages skipped by hints", 1, "{:,.0f}"),
    "total_time": ("total time (ms)", 1000, "{:,.1f}"),
    "downtime": ("downtime (ms)", 1000, "{:,.1f}"),
    "dirty_sync_count": ("dirty syncs", 1, "{:,.0f}"),
}


def prediction_table(title: str, rows: list[Comparison]) -> Table:
    """Measured against predicted, a row per figure and hints off/on."""
    table = Table(title=title)
    for col in ("", "hints", "measured", "predicted", "difference"):
        table.add_column(col, justify="right" if col else "left")
    for r in rows:
        label, scale, fmt = _LABELS.get(r.figure, (r.figure, 1, "{:,}"))
        diff = "" if r.measured == r.predicted == 0 else f"{r.difference * 100:+.1f}%"
        table.add_row(
            label,
            "on" if r.hints else "off",
            fmt.format(r.measured * scale),
            fmt.format(r.predicted * scale),
            diff,
        )
    return table


def measured_figures(prediction: KvmPrediction) -> str:
    """What the prediction took from the runs, in one line per run."""
    lines = []
    for name, p in (("hints off", prediction.params_off), ("hints on", prediction.params_on)):
        sender = "kept the pace" if p.sender_rate is None else f"{p.sender_rate / (1 << 20):,.0f}"
        lines.append(
            f"{name}: guest {p.steps_per_s:,.0f} steps/s, sender {sender} MiB/s, "
            f"destination start-up wait {p.startup_wait * 1000:,.0f} ms"
        )
    return "\n".join(lines)
