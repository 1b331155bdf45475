"""The ``pagehint`` command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from pagehint import cli_simulate, selfbench
from pagehint._core import __version__, available_simd_levels, simd_level


def _info(args: argparse.Namespace) -> int:
    facts: dict[str, object] = {
        "version": __version__,
        "simd_level": simd_level(),
        "available_simd_levels": available_simd_levels(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    rows = [] if args.no_bench else selfbench.run(repeats=args.repeats)
    if args.json:
        facts["selfbench"] = [
            {"name": r.name, "pagehint_ms": r.pagehint_ms, "numpy_ms": r.numpy_ms} for r in rows
        ]
        print(json.dumps(facts, indent=2))
        return 0
    console = Console()
    console.print(f"pagehint {__version__}")
    console.print(f"SIMD level: [bold]{facts['simd_level']}[/bold] "
                  f"(this CPU can run: {', '.join(available_simd_levels())}; "
                  "force one with PAGEHINT_SIMD)")
    console.print(f"machine: {facts['machine']}, Python {facts['python']}")
    if rows:
        table = Table(title="self-benchmark, 1 TiB guest (2^28 pages), best of "
                      f"{args.repeats}")
        table.add_column("operation")
        table.add_column("pagehint ms", justify="right")
        table.add_column("numpy ms", justify="right")
        table.add_column("speed-up", justify="right")
        for r in rows:
            table.add_row(r.name, f"{r.pagehint_ms:.2f}", f"{r.numpy_ms:.2f}", f"{r.speedup:.1f}x")
        console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, exposed for tests and docs."""
    parser = argparse.ArgumentParser(
        prog="pagehint",
        description="Free-page-hint-aware live migration toolkit.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, SIMD level and a short self-benchmark")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--no-bench", action="store_true", help="skip the self-benchmark")
    info.add_argument("--repeats", type=int, default=3, help="timing repeats (default 3)")
    info.set_defaults(func=_info)
    cli_simulate.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        print("pagehint: --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        status: int = args.func(args)
    except BrokenPipeError:
        # `pagehint simulate --json | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status
