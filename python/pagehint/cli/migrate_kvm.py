"""``pagehint migrate-kvm``: the test guest on real KVM, live-migrated with free page hinting
off and on, side by side, with the guest's own verdict on its copy.

Each run boots the guest on a VM (RAM in two memslots around a hole), lets it write blocks and
free some (stale data in free memory), starts it running by itself (rewriting pages, taking
hinting rounds through virtio-mmio), and migrates it with ``Precopy`` over a paced wall-clock
link to a second VM in another process (``pagehint.kvm.destination``, fed by the migration
stream over a Unix socket). The source's oracle compares page digests (a page may differ only
if its block was hinted); the destination resumes the copy, which checks itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from typing import Any

from rich.console import Console

from pagehint import MemoryMap
from pagehint.cli.kvm_predict import measured_figures, predict_runs, prediction_table
from pagehint.cli.report import comparison_table, run_both
from pagehint.device import FreePageHintDevice, VirtioMmioTransport
from pagehint.kvm import (
    DestinationFailed,
    DestinationProcess,
    DestinationReport,
    GuestError,
    GuestProgram,
    KvmSource,
    KvmUnavailable,
    Vm,
    VmLogMode,
)
from pagehint.kvm.build import GuestBuildError
from pagehint.kvm.guest_program import MMIO_BASE
from pagehint.migration import MigrationResult, Precopy, PrecopyConfig, WallClockLink
from pagehint.migration.stream import STREAM_WIRE
from pagehint.sim import parse_rate, parse_seconds, parse_size, reduction
from pagehint.sim.kvm_model import SendTimeline, compare

BLOCK = 4 << 20
WALL_CLOCK_BATCH_PAGES = 256
"""Pages per send step (1 MiB): what the sender takes from the bitmap at once."""


@dataclass(frozen=True)
class KvmRun:
    """One migration and what the guest said of its copy."""

    result: MigrationResult
    report: DestinationReport | None
    """The destination's report (None if the migration did not complete)."""
    steps: int
    """Steps of the guest's run: finished on the destination, or on the source after a
    failed migration."""

    @property
    def ok(self) -> bool:
        return (
            self.result.status == "completed"
            and not self.result.lost_pages
            and (self.report is not None and self.report.ok)
        )


def add_parser(sub: Any) -> None:
    """Adds the ``migrate-kvm`` subcommand to ``pagehint``'s subparsers."""
    p = sub.add_parser(
        "migrate-kvm",
        help="live-migrate a guest on /dev/kvm with free page hinting off and on",
        description="Boots pagehint's test guest on /dev/kvm (gcc builds it), lets it write "
        "and free memory, and live-migrates it while it runs, with hints off and on, to a "
        "second VM whose copy checks itself. Exit status 1 if a migration failed, a page was "
        "lost or the guest's check failed; 2 for bad options or a machine without KVM.",
    )
    p.add_argument("--memory", default="256M", help="guest RAM (two memslots), default 256M")
    p.add_argument(
        "--log-mode",
        choices=["classic", "manual", "ring"],
        default="manual",
        help="KVM dirty log mode (default manual)",
    )
    p.add_argument(
        "--strategy",
        choices=["safe", "qemu"],
        default="safe",
        help="hinting strategy (default safe)",
    )
    p.add_argument(
        "--bandwidth",
        default="512MiB",
        help="link pacing, e.g. 512MiB (bytes/s) or 4Gbit (default 512MiB)",
    )
    p.add_argument("--downtime", default="300ms", help="maximum downtime (default 300ms)")
    p.add_argument(
        "--write-blocks",
        type=int,
        default=50,
        help="4 MiB blocks the guest writes before migrating (default 50)",
    )
    p.add_argument(
        "--free-blocks", type=int, default=40, help="of those, blocks it frees again (default 40)"
    )
    p.add_argument(
        "--pages-per-step",
        type=int,
        default=32,
        help="pages the running guest rewrites per step (default 32)",
    )
    p.add_argument("--seed", type=int, default=1, help="the guest's page-writing seed (default 1)")
    p.add_argument(
        "--predict",
        action="store_true",
        help="also simulate the same runs (pagehint.sim) and show measured against predicted",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="PNG", help="plot per-round figures (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress line")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"pagehint migrate-kvm: {msg}", file=sys.stderr)
    return 2


def _memmap(memory: int) -> MemoryMap:
    # Half below the hole (whose MMIO window is at 3.25 GiB), half from 4 GiB.
    if memory % (2 * BLOCK) or not 4 * BLOCK <= memory <= 4 << 30:
        raise ValueError(
            f"--memory must be a multiple of 8 MiB from 16 MiB to 4 GiB, not {memory} bytes"
        )
    half = memory // 2
    return MemoryMap([(0, half), (4 << 30, half)])


def migrate_once(
    args: argparse.Namespace,
    memmap: MemoryMap,
    hints: bool,
    progress: Any = None,
) -> KvmRun:
    """One live migration of a fresh guest to a destination process (``KvmUnavailable`` /
    ``GuestBuildError`` if the machine cannot, ``GuestError`` if the guest stops answering)."""
    mode: VmLogMode = args.log_mode
    with Vm(memmap, log_mode=mode) as vm:
        guest = GuestProgram(vm, mmio_base=MMIO_BASE)
        guest.start()
        device = FreePageHintDevice(vm.ram, memmap)
        device.guest_write = vm.mark_dirty
        transport = VirtioMmioTransport(device)
        vm.add_mmio(MMIO_BASE, transport.size, transport)
        guest.probe()
        guest.alloc_write(args.write_blocks)
        guest.free(args.free_blocks)
        with DestinationProcess(memmap, mmio_base=MMIO_BASE) as destination:
            guest.run(pages_per_step=args.pages_per_step, seed=args.seed)
            source = KvmSource(vm, guest, transport)
            # Small batches: on the wall clock a batch is taken from the bitmap at once, and a
            # hint can only skip pages not taken yet (QEMU sends page by page).
            config = PrecopyConfig(
                hints=hints,
                max_downtime=args.downtime_s,
                strategy=args.strategy,
                batch_pages=WALL_CLOCK_BATCH_PAGES,
            )
            link = WallClockLink(args.bandwidth_bps, wire=STREAM_WIRE)
            result = Precopy(source, destination, link, config, progress=progress).run()
            if result.status != "completed":
                return KvmRun(result, None, guest.stop_run())
            try:
                moved = destination.switchover(source)
            except DestinationFailed as e:
                # As QEMU after a failed switchover: the source runs on (DONE was sent).
                source.resume()
                return KvmRun(
                    replace(result, status="failed", error=str(e)), None, guest.stop_run()
                )
            # The downtime a user sees: from the pause to the guest running on the
            # destination (RAM, state and resume).
            result = replace(result, lost_pages=moved.lost_pages, downtime=moved.downtime)
            return KvmRun(result, moved.report, moved.report.steps)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    err = Console(stderr=True)
    try:
        memmap = _memmap(parse_size(args.memory))
        args.bandwidth_bps = parse_rate(args.bandwidth)
        args.downtime_s = parse_seconds(args.downtime)
        for name in ("write_blocks", "free_blocks", "pages_per_step"):
            if getattr(args, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        if args.free_blocks > args.write_blocks:
            raise ValueError("--free-blocks cannot exceed --write-blocks")
        if not args.bandwidth_bps > 0:
            raise ValueError("--bandwidth must be positive")
    except ValueError as e:
        return _fail(str(e))
    png = None
    if args.plot:
        try:
            from pagehint.cli.plot import plot_path, plot_rounds
        except ImportError as e:
            return _fail(f"--plot needs matplotlib ({e}); pip install 'pagehint[plot]'")
        try:
            png = plot_path(args.plot)  # refused before the runs, not after
        except ValueError as e:
            return _fail(str(e))
    show = not args.no_progress and not args.json and err.is_terminal

    # Each run's send timeline, for the simulator's prediction (--predict).
    timelines: dict[bool, SendTimeline] = {}

    def runner(hints: bool, progress: Any) -> KvmRun:
        timelines[hints] = SendTimeline(chain=progress)
        return migrate_once(args, memmap, hints, timelines[hints])

    try:
        off, on = run_both(runner, show=show, console=err, page_size=4096, clock="elapsed")
    except (KvmUnavailable, GuestBuildError) as e:
        return _fail(f"cannot run a KVM guest here: {e}")
    except GuestError as e:
        print(f"pagehint migrate-kvm: the guest stopped answering: {e}", file=sys.stderr)
        return 1
    failed = [r for r in (off, on) if r.result.status != "completed"]
    lost = sum(r.result.lost_pages or 0 for r in (off, on))
    bad = [r for r in (off, on) if r.report is not None and not r.report.ok]
    prediction = rows = None
    if args.predict and not failed:
        prediction = predict_runs(args, off, on, (timelines[False], timelines[True]))
        rows = compare(off.result, on.result, prediction)
    description = (
        f"{memmap.ram_bytes >> 20} MiB guest on /dev/kvm, {args.log_mode} log, "
        f"{args.strategy} strategy, {args.write_blocks} blocks written, "
        f"{args.free_blocks} freed, {args.bandwidth} link"
    )
    if args.json:

        def entry(r: KvmRun) -> dict[str, Any]:
            d = r.result.to_dict()
            rep = r.report
            d["guest-check"] = d["destination"] = None
            if rep is not None:
                d["guest-check"] = {
                    "bad-pages": rep.bad_pages,
                    "bad-state": rep.bad_state,
                    "ok": rep.ok,
                    "hint-state": rep.hint_state,
                    "rehinted-blocks": rep.rehinted,
                }
                d["destination"] = {
                    "pages-received": rep.pages_received,
                    "stream-bytes": rep.bytes_received,
                    "resume-time": round(rep.resume_seconds * 1000, 3),
                }
            d["guest-steps"] = r.steps
            return d

        print(
            json.dumps(
                {
                    "description": description,
                    "hints-off": entry(off),
                    "hints-on": entry(on),
                    "reduction": {
                        "total-time": reduction(off.result.total_time, on.result.total_time),
                        "transferred": reduction(off.result.transferred, on.result.transferred),
                        "downtime": reduction(off.result.downtime, on.result.downtime),
                    },
                    "prediction": None
                    if prediction is None or rows is None
                    else {
                        "measured-params": prediction.to_dict()["params"],
                        "figures": [r.to_dict() for r in rows],
                    },
                },
                indent=2,
            )
        )
    else:

        def fact(r: KvmRun, what: str) -> str:
            rep = r.report
            if rep is None:
                return "-"
            if what == "bad_pages":
                return f"{rep.bad_pages:,}"
            if what == "bad_state":
                return f"{rep.bad_state:,}"
            return f"{rep.bytes_received / 2**20:,.1f} MiB"

        verdict = [
            ("guest's check: bad pages", fact(off, "bad_pages"), fact(on, "bad_pages")),
            ("guest's check: bad state", fact(off, "bad_state"), fact(on, "bad_state")),
            ("stream received", fact(off, "stream"), fact(on, "stream")),
        ]
        console.print(comparison_table(description, off.result, on.result, verdict))
        for r in failed:
            err.print(f"migration {r.result.status}: {r.result.error}", markup=False)
        if lost:
            err.print(
                f"{lost} pages lost: the destination differs where no hint excuses it", markup=False
            )
        for r in bad:
            err.print(f"the guest's copy failed its check: {r.report}", markup=False)
        if prediction is not None and rows is not None:
            console.print(prediction_table("the simulator's prediction of these runs", rows))
            console.print(measured_figures(prediction), markup=False)
    if png is not None:
        plot_rounds("migrate-kvm", off.result, on.result, str(png))
        if not args.json:
            console.print(f"plot written to {png}", markup=False)
    return 1 if failed or lost or bad else 0


__all__ = ["KvmRun", "add_parser", "migrate_once", "run"]
