"""The ``pagehint`` command line: ``pagehint info`` (``info``), ``pagehint simulate``
(``simulate``), ``pagehint migrate-kvm`` (``migrate_kvm``), ``pagehint lost-write-kvm``
(``lost_write_kvm``); ``report`` and ``plot`` serve both migration commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pagehint import __version__, simd_level
from pagehint.cli import info, lost_write_kvm, migrate_kvm, simulate


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals in one line (the usage is one ``--help`` away), exit 2,
    as every other refusal of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, exposed for tests and docs."""
    parser = _Parser(
        prog="pagehint",
        description="Free-page-hint-aware live migration toolkit.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"pagehint {__version__} (SIMD level {simd_level()})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info.add_parser(sub)
    simulate.add_parser(sub)
    migrate_kvm.add_parser(sub)
    lost_write_kvm.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        print("pagehint: --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print("pagehint: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `pagehint simulate --json | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status
