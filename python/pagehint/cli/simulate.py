"""``pagehint simulate``: a scenario migrated with hints off and on, side by side."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pagehint.cli.report import comparison_table, run_both
from pagehint.migration import MigrationResult
from pagehint.sim.estimate import estimate_run, machine_limits
from pagehint.sim.scenario import (
    WORKLOADS,
    Scenario,
    ScenarioError,
    load_scenario,
    read_scenario,
    reduction,
    run_scenario,
    scenario_from_dict,
    shipped_scenarios,
)
from pagehint.sim.scenario_model import scenario_json_schema

# Options that set one key of the scenario: (argparse dest, option, key path, help).
_KEY_OPTIONS: tuple[tuple[str, str, tuple[str, str], str], ...] = (
    ("memory", "--memory", ("guest", "memory"), "guest RAM, e.g. 8G or 1T"),
    ("layout", "--layout", ("guest", "layout"), "RAM layout: x86 (with the PCI hole) or flat"),
    ("bandwidth", "--bandwidth", ("link", "bandwidth"), "link speed, e.g. 10Gbit or 1.25GB"),
    ("downtime", "--downtime", ("link", "max_downtime"), "maximum downtime, e.g. 300ms"),
    ("log_mode", "--log-mode", ("guest", "log_mode"), "KVM dirty log: classic, manual or ring"),
    ("strategy", "--strategy", ("migration", "strategy"), "hinting strategy: safe or qemu"),
    ("seed", "--seed", ("guest", "seed"), "guest seed (an integer, not negative)"),
)


def add_parser(sub: Any) -> None:
    """Adds the ``simulate`` subcommand to ``pagehint``'s subparsers."""
    p = sub.add_parser(
        "simulate",
        help="migrate a simulated guest with free page hinting off and on, side by side",
        description="Runs a scenario (a shipped one by name, or a TOML file; 'default' if "
        "none) twice, with free page hinting off and on, checks both with the nothing-lost "
        "oracle and prints the figures side by side. Options override the scenario's keys; "
        "their values are read as in a scenario file (a TOML value; a bare word is a "
        "string). Exit status 1 if any page was lost, 2 for a scenario, option or output path "
        "that is not valid, or runs too big for this machine (refused before they start).",
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default="default",
        help="shipped scenario name or TOML file (default: default)",
    )
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")
    p.add_argument(
        "--schema", action="store_true", help="print the scenario file's JSON schema and exit"
    )
    for dest, option, _key, text in _KEY_OPTIONS[:2]:
        p.add_argument(option, dest=dest, help=text)
    p.add_argument("--workload", help=f"what the guest runs meanwhile: {', '.join(WORKLOADS)}")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a workload parameter, e.g. working_set=2G or pages_per_s=50000",
    )
    for dest, option, _key, text in _KEY_OPTIONS[2:]:
        p.add_argument(option, dest=dest, help=text)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="plot per-round figures to FILE (PNG unless its suffix names another format "
        "matplotlib writes; needs matplotlib)",
    )
    p.add_argument("--no-progress", action="store_true", help="never show a progress line")
    p.set_defaults(func=run)


def _value(text: str) -> Any:
    """A command-line value as a scenario file would hold it: a TOML number, boolean or
    string (``50000``, ``1.5``, ``true``, ``"x"``), else the text itself (``8G``, ``flat``)."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    value = parsed.get("v")
    return value if len(parsed) == 1 and isinstance(value, (int, float, str)) else text


def _table(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The document's table ``name`` to override keys in (a copy), or None if the file has
    something else there (the model then says what is wrong with the file)."""
    table = doc.get(name, {})
    if not isinstance(table, dict):
        return None
    copy = dict(table)
    doc[name] = copy
    return copy


def _overridden(
    doc: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, Any], dict[tuple[str | int, ...], str]]:
    """The scenario document with the command line's overrides, and which option set which
    key (for the model's messages)."""
    doc = dict(doc)
    options: dict[tuple[str | int, ...], str] = {}
    for dest, option, (table_name, key), _text in _KEY_OPTIONS:
        text = getattr(args, dest)
        if text is None:
            continue
        table = _table(doc, table_name)
        if table is not None:
            table[key] = _value(str(text))
        options[(table_name, key)] = f"{option} {text}"
    if args.workload is not None or args.param:
        raw = doc.get("workload", {"kind": "idle"})
        table = {} if not isinstance(raw, dict) or args.workload is not None else dict(raw)
        if args.workload is not None:
            table["kind"] = _value(args.workload)
            options[("workload",)] = f"--workload {args.workload}"
        elif "kind" not in table:
            table["kind"] = "idle"
        for kv in args.param:
            key, sep, text = kv.partition("=")
            if not sep or not key.strip():
                raise ScenarioError(f"--param takes KEY=VALUE, not {kv!r}")
            if key == "kind":
                raise ScenarioError("--param kind=...: the workload is --workload's to say")
            table[key] = _value(text)
            options[("workload", key)] = f"--param {kv}"
        doc["workload"] = table
    return doc, options


def _scenario(args: argparse.Namespace) -> Scenario:
    path, doc = read_scenario(args.scenario)
    doc, options = _overridden(doc, args)
    s = scenario_from_dict(doc, name=path.stem, source=str(path), options=options)
    if not options:
        return s
    # Overridden: the scenario's own description and published figures no longer apply.
    return replace(s, published={}, description=f"{describe(s)} (overridden)")


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
    """A usage or scenario error: the message on stderr in one line (plain text, not rich
    markup, which would eat ``[guest]`` or ``pagehint[plot]``; what cannot be printed, such
    as a newline in an option's value or a file's name, escaped), exit status 2."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)
    print(f"pagehint simulate: {line}", file=sys.stderr)
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
    if args.schema:
        print(json.dumps(scenario_json_schema(), indent=2))
        return 0
    if args.list:
        for name, path in sorted(shipped_scenarios().items()):
            s = load_scenario(str(path))
            console.print(f"[bold]{escape(name)}[/bold]: {escape(s.description)}")
        return 0
    # Everything is checked before the runs: the scenario, the options, the plot and
    # whether the runs fit this machine.
    try:
        s = _scenario(args)
    except ScenarioError as e:
        return _fail(str(e))
    png: Path | None = None
    if args.plot is not None:
        try:
            from pagehint.cli.plot import plot_path, plot_rounds
        except ImportError as e:
            return _fail(f"--plot needs matplotlib ({e}); pip install 'pagehint[plot]'")
        try:
            png = plot_path(args.plot)
        except ValueError as e:
            return _fail(str(e))
    refusal = estimate_run(s).refusal(machine_limits())
    if refusal is not None:
        return _fail(f"scenario {s.name}: {refusal}")
    show = not args.no_progress and not args.json and err.is_terminal
    off, on = run_both(
        lambda hints, progress: run_scenario(s, hints=hints, progress=progress),
        show=show,
        console=err,
        page_size=s.page_size,
        clock="simulated",
    )
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
    if png is not None:
        plot_rounds(s.name, off, on, str(png))
        if not args.json:
            console.print(f"plot written to {escape(str(png))}")
    return 1 if failed or lost else 0
