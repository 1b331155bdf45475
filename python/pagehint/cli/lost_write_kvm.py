"""``pagehint lost-write-kvm``: the lost write of QEMU's hinting with a manual-protect dirty
log, scheduled on real KVM (``pagehint.kvm.lost_write``), under the ``qemu`` and ``safe``
strategies and without KVM_DIRTY_LOG_INITIALLY_SET, with what the oracle and the guest's own
check on the destination found in each.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from pagehint.kvm import GuestError, KvmUnavailable
from pagehint.kvm.build import GuestBuildError
from pagehint.kvm.lost_write import LostWriteRun, ScheduleError, scheduled_lost_write
from pagehint.kvm.migrate import DestinationFailed
from pagehint.migration import Strategy

CASES: tuple[tuple[Strategy, bool], ...] = (("qemu", True), ("safe", True), ("qemu", False))
"""(strategy, INITIALLY_SET): QEMU's own configuration, the safe strategy under the same
schedule, and QEMU's strategy on a log without INITIALLY_SET."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lost-write-kvm",
        help="show the lost write of QEMU's hinting on /dev/kvm, and safe losing nothing",
        description="Schedules the lost write on real KVM: after a sync the guest hints its "
        "free blocks while the device is held, its shrinker takes the newest hinted block "
        "back and writes it, then the device applies the hints. Runs it under the qemu and "
        "safe strategies (manual-protect log with KVM_DIRTY_LOG_INITIALLY_SET, as QEMU) and "
        "under qemu without INITIALLY_SET, migrating each to a destination process whose "
        "guest checks itself. Exit 0 when every outcome is the predicted one (qemu loses "
        "exactly the written block, the others nothing), 1 otherwise, 2 without KVM.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _expected_lost(run: LostWriteRun) -> int:
    return run.block_pages if (run.strategy, run.initially_set) == ("qemu", True) else 0


def _as_dict(run: LostWriteRun) -> dict[str, Any]:
    return {
        "strategy": run.strategy,
        "initially-set": run.initially_set,
        "block-gpa": run.block_gpa,
        "block-pages": run.block_pages,
        "lost-pages": run.lost_pages,
        "guest-bad-pages": run.bad_pages,
        "predicted-lost-pages": _expected_lost(run),
        "pages-skipped": run.result.pages_skipped,
        "transferred": run.result.transferred,
    }


def run(args: argparse.Namespace) -> int:
    try:
        runs = [scheduled_lost_write(s, initially_set=i) for s, i in CASES]
    except (KvmUnavailable, GuestBuildError) as e:
        print(f"pagehint lost-write-kvm: cannot run a KVM guest here: {e}", file=sys.stderr)
        return 2
    except (ScheduleError, DestinationFailed, GuestError) as e:
        print(f"pagehint lost-write-kvm: {e}", file=sys.stderr)
        return 1
    as_predicted = all(r.lost_pages == r.bad_pages == _expected_lost(r) for r in runs)
    if args.json:
        print(
            json.dumps(
                {"runs": [_as_dict(r) for r in runs], "as-predicted": as_predicted}, indent=2
            )
        )
    else:
        table = Table(
            title="A block written behind its hint, 128 MiB guest on /dev/kvm, manual log",
            caption="lost: the oracle's count; bad pages: the guest's check on the destination",
        )
        for col in ("strategy", "initially set", "block gpa", "lost", "bad pages", "predicted"):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for r in runs:
            table.add_row(
                r.strategy,
                "yes" if r.initially_set else "no",
                f"{r.block_gpa:#x}",
                f"{r.lost_pages:,}",
                f"{r.bad_pages:,}",
                f"{_expected_lost(r):,}",
            )
        Console().print(table)
    if not as_predicted:
        print("pagehint lost-write-kvm: an outcome differs from the prediction", file=sys.stderr)
    return 0 if as_predicted else 1


__all__ = ["CASES", "add_parser", "run"]
