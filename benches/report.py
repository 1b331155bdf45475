#!/usr/bin/env python3
"""Runs pagehint's benchmark suite and prints one markdown table per benchmark group.

Usage, from anywhere (paths are taken relative to this file):

    python benches/report.py                  # full run, for the README table (~1.5 min here)
    python benches/report.py --quick          # few rounds (~30 s here); or set
                                              # PAGEHINT_BENCH_QUICK=1
    python benches/report.py --gate           # CI: full run, then the gate (benches/gate.py,
                                              # benches/ceilings.toml); exit 3 if it fails
    python benches/report.py --json out.json --markdown out.md   # keep the raw data / tables
    python benches/report.py --from-json out.json                # only re-format
    python benches/report.py -k count -- -x   # a pytest -k filter; args after -- go to pytest

The exact command it runs, from the repository root (add ``--pagehint-quick`` for --quick):

    python -m pytest benches -p no:cacheprovider --benchmark-json=<file>

(``benches/pytest.ini`` makes pytest collect ``bench_*.py`` / ``bench_*`` there and only there.)

Every row is timed in the same run with ``benchmark.pedantic`` (a setup restores the input before
each round, untimed). Rounds come from a time budget per benchmark, not from
``--benchmark-min-rounds``/``--benchmark-max-time`` (pedantic ignores those): full mode gives
each 2 s and 5 to 60 rounds plus a warm-up round, quick mode 0.25 s and 1 to 5 rounds. Before
timing, each peer's result (and final bitmap) is checked against pagehint's: a disagreement fails
the run (exit status != 0). Timings fail it only under ``--gate``: pagehint slower than a
peer of its group, or a ratio over its ceiling, in every attempt (a failed check's groups are
run again, ``--retries`` times); ratios in one run, never absolute times.

Columns: median time; that time divided by pagehint's in the same group (> 1: slower than
pagehint); GB/s of bitmap covered (the bitmap's bytes, or the hinted blocks' for clear_ranges,
per second, whatever else the operation reads or writes). Under each table: pagehint's time
divided by the limit's (how far pagehint is from a plain memory pass over the same bytes) and by
the floor's where the group has one (what pagehint's own work cannot go below).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
if __package__ in (None, ""):  # run as a script: make the `benches` package importable
    sys.path.insert(0, str(ROOT))

from benches import gate  # noqa: E402

CEILINGS = BENCHES / "ceilings.toml"
QUICK_ENV = "PAGEHINT_BENCH_QUICK"  # read by benches/benchutil.py too


def _env_quick() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_pytest(
    json_path: Path,
    quick: bool,
    keyword: str | None,
    extra: list[str],
    nodes: list[str] | None = None,
) -> int:
    """Runs the suite (or only ``nodes``, pytest node ids relative to benches/)."""
    targets = [f"benches/{n}" for n in nodes] if nodes else ["benches"]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *targets,
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={json_path}",
    ]
    if quick:
        cmd.append("--pagehint-quick")
    if keyword and not nodes:
        cmd += ["-k", keyword]
    cmd += extra
    rest = cmd[3 + len(targets) :]
    if len(targets) > 3:  # a re-run of many nodes: the first few say which
        targets = [*targets[:3], f"...{len(targets) - 3} more"]
    shown = shlex.join(["python", "-m", "pytest", *targets, *rest])
    print(f"+ (cd {ROOT} && {shown})")
    sys.stdout.flush()
    env = dict(os.environ)
    if quick:
        env[QUICK_ENV] = "1"
    return subprocess.call(cmd, cwd=ROOT, env=env)


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(r: float) -> str:
    if r >= 100:
        return f"{r:.0f}"
    if r >= 10:
        return f"{r:.1f}"
    return f"{r:.2f}"


def _order(row: gate.Timing) -> tuple[int, float]:
    return ({"pagehint": 0, "peer": 1, "floor": 2, "limit": 3}.get(row.role, 1), row.median_s)


def group_table(group: str, rows: list[gate.Timing]) -> tuple[str, dict[str, Any]]:
    rows = sorted(rows, key=_order)
    ph = next((r for r in rows if r.role == "pagehint"), None)
    limit = next((r for r in rows if r.role == "limit"), None)
    lines = [
        f"### {group}",
        "",
        "| implementation | median ms | × pagehint | GB/s | rounds |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        ratio = fmt_ratio(r.median_s / ph.median_s) if ph and ph.median_s > 0 else "n/a"
        gbs = f"{r.nbytes / r.median_s / 1e9:.1f}" if r.nbytes and r.median_s > 0 else ""
        label = r.label.replace("|", "\\|")  # a literal | would end the cell
        name = f"**{label}**" if r.role == "pagehint" else label
        lines.append(f"| {name} | {fmt_ms(r.median_s)} | {ratio} | {gbs} | {r.rounds} |")
    summary: dict[str, Any] = {"group": group}
    if ph:
        summary["pagehint_s"] = ph.median_s
        peers = [r for r in rows if r.role == "peer"]
        for prefix in ("numpy", "bitarray"):
            mine = [r for r in peers if r.impl.startswith(prefix)]
            if mine:
                best = min(mine, key=lambda r: r.median_s)
                summary[prefix] = best.median_s / ph.median_s
        if limit and limit.median_s > 0:
            summary["limit"] = ph.median_s / limit.median_s
        refs = [r for r in rows if r.role in ("floor", "limit") and r.median_s > 0]
        if refs:
            lines.append("")
        for ref in refs:
            lines.append(
                f"pagehint / {ref.role}: {fmt_ratio(ph.median_s / ref.median_s)}"
                f" (pagehint {fmt_ms(ph.median_s)} ms, {ref.role} {fmt_ms(ref.median_s)} ms)  "
            )
    return "\n".join(lines), summary


def summary_table(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "### Summary (best peer of each kind, time relative to pagehint; > 1: pagehint faster)",
        "",
        "| benchmark | pagehint ms | numpy × | bitarray × | pagehint / limit |",
        "|---|--:|--:|--:|--:|",
    ]
    for s in summaries:
        if "pagehint_s" not in s:
            continue

        def cell(key: str, s: dict[str, Any] = s) -> str:
            return fmt_ratio(float(s[key])) if key in s else "–"

        lines.append(
            f"| {s['group']} | {fmt_ms(float(s['pagehint_s']))} | {cell('numpy')} | "
            f"{cell('bitarray')} | {cell('limit')} |"
        )
    return "\n".join(lines)


def render(data: dict[str, Any]) -> str:
    rows = gate.timings(data)
    groups: dict[str, list[gate.Timing]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    mi = data.get("machine_info", {})
    head = (
        f"pagehint {mi.get('pagehint', '?')} (SIMD {mi.get('simd_level', '?')}), "
        f"numpy {mi.get('numpy', '?')}, bitarray {mi.get('bitarray', '?')}, "
        f"Python {mi.get('python_version', '?')}, CPU {mi.get('cpu', '?')}; "
        f"{mi.get('pagehint_bench_mode', '?')} mode, medians of the rounds shown"
    )
    parts = [head]
    summaries = []
    for group in sorted(groups):
        table, summary = group_table(group, groups[group])
        parts.append(table)
        summaries.append(summary)
    parts.append(summary_table(summaries))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run benches/ with pytest-benchmark and print markdown tables.",
        epilog="Arguments after -- are passed to pytest.",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        default=_env_quick(),
        help=f"few rounds per benchmark (informational; also {QUICK_ENV}=1)",
    )
    ap.add_argument("--json", type=Path, help="keep pytest-benchmark's JSON here")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    ap.add_argument("--from-json", type=Path, help="format this JSON; run nothing")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression selecting benchmarks")
    ap.add_argument(
        "--gate",
        nargs="?",
        type=Path,
        const=CEILINGS,
        metavar="CEILINGS",
        help="fail (exit 3) when pagehint is slower than a peer or over a ceiling "
        f"(default file: {CEILINGS.relative_to(ROOT)}); failed checks are run again",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times a failed gate check is run again before it counts (default 2)",
    )
    args, extra = ap.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]

    status = 0
    if args.from_json:
        json_path: Path = args.from_json
    else:
        if args.json:
            json_path = args.json.resolve()
        else:
            json_path = Path(tempfile.mkdtemp(prefix="pagehint-bench-")) / "bench.json"
        status = run_pytest(json_path, args.quick, args.keyword, extra)
    if not json_path.exists():
        print(f"no benchmark JSON at {json_path} (pytest exit status {status})", file=sys.stderr)
        return status or 1
    with json_path.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    text = render(data)
    print()
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if status:
        print(f"pytest exit status {status}: see the failures above", file=sys.stderr)
        return status
    if args.gate is None:
        return 0
    rerun = None
    if not args.from_json:

        def rerun(nodes: list[str], attempt: int) -> dict[str, Any]:
            path = json_path.parent / f"gate-retry-{attempt}.json"
            if run_pytest(path, args.quick, None, extra, nodes=nodes):
                raise gate.GateError("the re-run failed: see above")
            with path.open(encoding="utf-8") as f:
                retried: dict[str, Any] = json.load(f)
            return retried

    return run_gate(args.gate, data, full_run=not args.keyword, retries=args.retries, rerun=rerun)


def run_gate(
    ceilings_path: Path,
    data: dict[str, Any],
    *,
    full_run: bool,
    retries: int,
    rerun: Callable[[list[str], int], dict[str, Any]] | None,
) -> int:
    """Judges ``data`` against the peers and the ceilings; a failed check's groups are run again
    (``rerun(nodes, attempt)`` gives the new run's JSON; None: judge ``data`` alone)."""
    try:
        ceilings = gate.load_ceilings(ceilings_path)
        rows = gate.timings(data)
        missing = gate.missing_groups(rows, ceilings) if full_run else []
        attempts = [gate.judge(rows, ceilings, partial=not full_run)]
        for attempt in range(1, retries + 1 if rerun else 1):
            failing = [v for v, failed in gate.final(attempts) if failed]
            if not failing or rerun is None:
                break
            print(f"\ngate: {len(failing)} check(s) failed; running their groups again")
            retried = rerun(gate.nodes_of(rows, {g for v in failing for g in v.groups}), attempt)
            attempts.append(gate.judge(gate.timings(retried), ceilings, partial=not full_run))
    except gate.GateError as e:
        print(f"gate: {e}", file=sys.stderr)
        return 1
    results = gate.final(attempts)
    print()
    print(gate_table(results, len(attempts)))
    for group in missing:
        print(f"gate: {ceilings_path.name} names a group this run lacks: {group}", file=sys.stderr)
    failed = sum(failed for _, failed in results)
    if failed:
        print(f"gate: {failed} check(s) failed in every attempt", file=sys.stderr)
        return 3
    return 1 if missing else 0


def gate_table(results: list[tuple[gate.Verdict, bool]], attempts: int) -> str:
    lines = [
        f"### Gate ({attempts} attempt(s); the best attempt of each check shown)",
        "",
        "| check | ratio | ceiling | verdict | times |",
        "|---|--:|--:|---|---|",
    ]
    for v, failed in results:
        verdict = "**FAILED**" if failed else ("pass" if v.passed else "pass on re-run")
        check = v.check.replace("|", "\\|")
        lines.append(
            f"| {check} | {fmt_ratio(v.value)} | {fmt_ratio(v.limit)} | {verdict} | {v.detail} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
