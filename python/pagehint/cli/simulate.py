"""``pagehint simulate``: a scenario migrated with hints off and on, side by side."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pagehint.cli.report import comparison_table, run_both
from pagehint.migration import MigrationResult
from pagehint.sim.scenario import (
    WORKLOADS,
    Scenario,
    WorkloadSpec,
    load_scenario,
    parse_rate,
    parse_seconds,
    parse_size,
    reduction,
    run_scenario,
    shipped_scenarios,
)


def add_parser(sub: Any) -> None:
    """Adds the ``simulate`` subcommand to ``pagehint``'s subparsers."""
    p = sub.add_parser(
        "simulate",
        help="migrate a simulated guest with free page hinting off and on, side by side",
        description="Runs a scenario (a shipped one by name, or a TOML file; 'default' if "
        "none) twice, with free page hinting off and on, checks both with the nothing-lost "
        "oracle and prints the figures side by side. Exit status 1 if any page was lost.",
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default="default",
        help="shipped scenario name or TOML file (default: default)",
    )
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    p.add_argument("--memory", help="guest RAM, e.g. 8G or 1T")
    p.add_argument("--layout", choices=["x86", "flat"], help="RAM layout (x86: PCI hole)")
    p.add_argument("--workload", choices=WORKLOADS, help="what the guest runs meanwhile")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a workload parameter, e.g. working_set=2G or pages_per_s=50000",
    )
    p.add_argument("--bandwidth", help="link speed, e.g. 10Gbit or 1.25GB (bytes/s)")
    p.add_argument("--downtime", help="maximum downtime, e.g. 300ms")
    p.add_argument("--log-mode", choices=["classic", "manual", "ring"], help="KVM dirty log mode")
    p.add_argument("--strategy", choices=["safe", "qemu"], help="hinting strategy")
    p.add_argument("--seed", type=int, help="guest seed")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", metavar="PNG", help="plot per-round figures (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="never show a progress line")
    p.set_defaults(func=run)


def _scenario(args: argparse.Namespace) -> Scenario:
    s = load_scenario(args.scenario)
    guest: dict[str, Any] = {}
    if args.memory:
        guest["memory"] = parse_size(args.memory)
    if args.layout:
        guest["layout"] = args.layout
    if args.log_mode:
        guest["log_mode"] = args.log_mode
    if args.seed is not None:
        guest["seed"] = args.seed
    if args.workload or args.param:
        params = dict(s.workload.params) if not args.workload else {}
        for kv in args.param:
            key, sep, value = kv.partition("=")
            if not sep:
                raise ValueError(f"--param takes KEY=VALUE, not {kv!r}")
            params[key] = value
        spec = WorkloadSpec(args.workload or s.workload.kind, params)
        spec.build()
        guest["workload"] = spec
    pc: dict[str, Any] = {}
    link: dict[str, Any] = {}
    if args.bandwidth:
        link["bandwidth"] = parse_rate(args.bandwidth)
    if args.downtime:
        pc["max_downtime"] = parse_seconds(args.downtime)
    if args.strategy:
        pc["strategy"] = args.strategy
    if not (guest or pc or link):
        return s
    # Overridden: the scenario's own description and published figures no longer apply.
    out = replace(
        s, precopy=replace(s.precopy, **pc), link=replace(s.link, **link), published={}, **guest
    )
    return replace(out, description=f"{describe(out)} (overridden)")


def describe(s: Scenario) -> str:
    """What a scenario runs, in one line."""
    params = ", ".join(f"{k}={v}" for k, v in s.workload.params.items())
    workload = f"{s.workload.kind} ({params})" if params else s.workload.kind
    pc = s.precopy
    return (
        f"{s.memory / (1 << 30):g} GiB {s.layout} guest, {workload}, "
        f"{s.link.bandwidth * 8 / 1e9:g} Gbit/s, {pc.max_downtime * 1000:g} ms downtime, "
        f"{s.log_mode} log, {pc.strategy} strategy"
    )


def _fail(msg: str) -> int:
    """A usage or scenario error: the message on stderr (plain text, not rich markup, which
    would eat ``[guest]`` or ``pagehint[plot]``), exit status 2."""
    print(f"pagehint simulate: {msg}", file=sys.stderr)
    return 2


def _published(s: Scenario, off: MigrationResult, on: MigrationResult) -> Table | None:
    p = s.published
    if "total_time_off_ms" not in p or "total_time_on_ms" not in p:
        return None
    table = Table(title=escape(f"published: {p.get('source', '')}"))
    for col in ("", "hints off (ms)", "hints on (ms)", "reduction"):
        table.add_column(col, justify="right" if col else "left")
    pub = reduction(p["total_time_off_ms"], p["total_time_on_ms"])
    table.add_row(
        "published",
        f"{p['total_time_off_ms']:,}",
        f"{p['total_time_on_ms']:,}",
        f"{pub * 100:.0f}%",
    )
    sim = reduction(off.total_time, on.total_time)
    table.add_row(
        "simulated",
        f"{off.total_time * 1000:,.0f}",
        f"{on.total_time * 1000:,.0f}",
        f"{sim * 100:.0f}% ({(sim - pub) * 100:+.0f} pp)",
    )
    return table


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    err = Console(stderr=True)
    if args.list:
        for name, path in sorted(shipped_scenarios().items()):
            s = load_scenario(str(path))
            console.print(f"[bold]{escape(name)}[/bold]: {escape(s.description)}")
        return 0
    try:
        s = _scenario(args)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    if args.plot:
        # Before the runs, not after: a missing matplotlib should not cost a whole simulation.
        try:
            from pagehint.cli.plot import plot_rounds
        except ImportError as e:
            return _fail(f"--plot needs matplotlib ({e}); pip install 'pagehint[plot]'")
    show = not args.no_progress and not args.json and err.is_terminal
    try:
        off, on = run_both(
            lambda hints, progress: run_scenario(s, hints=hints, progress=progress),
            show=show,
            console=err,
            page_size=s.page_size,
            clock="simulated",
        )
    except ValueError as e:
        # Building the guest found the scenario impossible (memory, layout, used, seed...);
        # failures during the migration itself are a result, not raised.
        return _fail(f"scenario {s.name}: {e}")
    failed = [r for r in (off, on) if r.status != "completed"]
    lost = sum(r.lost_pages or 0 for r in (off, on))
    if args.json:
        print(
            json.dumps(
                {
                    "scenario": s.name,
                    "description": s.description,
                    "hints-off": off.to_dict(),
                    "hints-on": on.to_dict(),
                    "reduction": {
                        "total-time": reduction(off.total_time, on.total_time),
                        "transferred": reduction(off.transferred, on.transferred),
                        "downtime": reduction(off.downtime, on.downtime),
                    },
                    "published": s.published,
                },
                indent=2,
            )
        )
    else:
        title = f"scenario {s.name}: {s.description}" if s.description else s.name
        console.print(comparison_table(title, off, on))
        pub = _published(s, off, on)
        if pub is not None:
            console.print(pub)
        for r in failed:
            err.print(f"[red]migration {r.status}: {escape(str(r.error))}[/red]")
        if lost:
            err.print(
                f"[red]{lost} pages lost: the destination differs where no hint excuses it[/red]"
            )
    if args.plot:
        plot_rounds(s.name, off, on, args.plot)
        if not args.json:
            console.print(f"plot written to {args.plot}")
    return 1 if failed or lost else 0
