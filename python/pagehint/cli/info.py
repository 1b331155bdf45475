"""``pagehint info``: the version, the SIMD level and a short self-benchmark."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

from rich.console import Console
from rich.table import Table

from pagehint._core import __version__, available_simd_levels, simd_level
from pagehint.cli import selfbench


def add_parser(sub: Any) -> None:
    """Adds the ``info`` subcommand to ``pagehint``'s subparsers."""
    info = sub.add_parser("info", help="version, SIMD level and a short self-benchmark")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--no-bench", action="store_true", help="skip the self-benchmark")
    info.add_argument("--repeats", type=int, default=3, help="timing repeats (default 3)")
    info.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    console.print(
        f"SIMD level: [bold]{facts['simd_level']}[/bold] "
        f"(this CPU can run: {', '.join(available_simd_levels())}; "
        "force one with PAGEHINT_SIMD)"
    )
    console.print(f"machine: {facts['machine']}, Python {facts['python']}")
    if rows:
        table = Table(title=f"self-benchmark, 1 TiB guest (2^28 pages), best of {args.repeats}")
        table.add_column("operation")
        table.add_column("pagehint ms", justify="right")
        table.add_column("numpy ms", justify="right")
        table.add_column("speed-up", justify="right")
        for r in rows:
            table.add_row(r.name, f"{r.pagehint_ms:.2f}", f"{r.numpy_ms:.2f}", f"{r.speedup:.1f}x")
        console.print(table)
    return 0
