"""The benchmark gate (benches/gate.py, `benches/report.py --gate`) on made-up runs: what it
passes, what it fails, and that a failure must repeat in every attempt to count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from benches import gate

ROOT = Path(__file__).resolve().parent.parent
B1 = "B1 clear_ranges: made up"
B5 = "B5 apply_hints: made up"


def run(rows: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A pytest-benchmark document: {group: {role or peer name: seconds (best and median)}}."""
    benchmarks = []
    for group, members in rows.items():
        for name, median in members.items():
            role = name if name in ("pagehint", "limit", "floor") else "peer"
            benchmarks.append(
                {
                    "name": f"bench[{name}]",
                    "fullname": f"bench_x.py::bench_{group[:2]}[{name}]",
                    "group": group,
                    "stats": {"min": median, "median": median, "rounds": 5},
                    "extra_info": {"role": role, "label": name},
                }
            )
    return {"benchmarks": benchmarks}


CEILINGS = [
    gate.Ceiling(group=B1, over="limit", max=1.5),
    gate.Ceiling(group=B1, over="floor", max=1.2),
    gate.Ceiling(group=B5, over=B1, max=1.2),
]


def verdicts(doc: dict[str, Any]) -> dict[str, gate.Verdict]:
    return {v.check: v for v in gate.judge(gate.timings(doc), CEILINGS)}


def good() -> dict[str, dict[str, float]]:
    return {
        B1: {"pagehint": 1.0, "numpy": 2.0, "bitarray": 30.0, "limit": 0.8, "floor": 0.9},
        B5: {"pagehint": 1.1, "numpy": 3.0, "limit": 0.8},
    }


def test_a_good_run_passes_every_check() -> None:
    got = verdicts(run(good()))
    assert len(got) == 5  # two peer checks and three ceilings
    assert all(v.passed for v in got.values())
    assert got[f"{B1}: pagehint / the limit row"].value == pytest.approx(1.25)
    assert got[f"{B5}: pagehint / pagehint in {B1}"].value == pytest.approx(1.1)


@pytest.mark.parametrize(
    ("group", "role", "median", "check"),
    [
        (B1, "numpy", 0.99, f"{B1}: pagehint no slower than its best peer"),
        (B1, "limit", 0.6, f"{B1}: pagehint / the limit row"),
        (B1, "floor", 0.8, f"{B1}: pagehint / the floor row"),
        (B1, "pagehint", 0.9, f"{B5}: pagehint / pagehint in {B1}"),
    ],
)
def test_each_kind_of_regression_fails_its_check(
    group: str, role: str, median: float, check: str
) -> None:
    rows = good()
    rows[group][role] = median
    got = verdicts(run(rows))
    assert not got[check].passed
    assert [c for c, v in got.items() if not v.passed] == [check]


def test_a_failure_counts_only_when_every_attempt_fails() -> None:
    slow = good()
    slow[B1]["pagehint"] = 1.4  # over the floor ceiling (1.4 / 0.9) and B5 / B1 fine
    first = gate.judge(gate.timings(run(slow)), CEILINGS)
    second = gate.judge(gate.timings(run(good())), CEILINGS)
    floor_check = f"{B1}: pagehint / the floor row"
    once = dict((v.check, failed) for v, failed in gate.final([first]))
    assert once[floor_check]
    twice = {v.check: (v, failed) for v, failed in gate.final([first, second])}
    verdict, failed = twice[floor_check]
    assert not failed
    assert verdict.value == pytest.approx(1.0 / 0.9)  # the attempt that decided
    assert gate.final([first, first])[0][1] is False  # the peer check passed both times
    assert any(failed for _, failed in gate.final([first, first]))


def test_a_partly_selected_group_is_an_error_unless_the_run_was_partial() -> None:
    rows = good()
    del rows[B1]["pagehint"]  # as `-k numpy` leaves it
    doc = gate.timings(run(rows))
    with pytest.raises(gate.GateError, match="0 pagehint rows"):
        gate.judge(doc, CEILINGS)
    got = {v.check for v in gate.judge(doc, CEILINGS, partial=True)}
    assert got == {f"{B5}: pagehint no slower than its best peer"}


def test_reruns_take_only_the_failed_groups_nodes() -> None:
    rows = gate.timings(run(good()))
    nodes = gate.nodes_of(rows, {B5})
    assert nodes and all(n.startswith("bench_x.py::bench_B5[") for n in nodes)


def test_a_ceiling_naming_a_group_the_run_lacks_is_reported() -> None:
    rows = gate.timings(run({B1: good()[B1]}))
    assert gate.missing_groups(rows, CEILINGS) == [B5]
    assert len(gate.judge(rows, CEILINGS)) == 3  # B5's ceiling is not judged


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no [[ceiling]] entries"),
        ('[[ceiling]]\ngroup = "g"\nover = "limit"\nmax = 0\n', "positive and finite"),
        ('[[ceiling]]\ngroup = "g"\nover = "limit"\nmax = "1.5"\n', "'max' must be a number"),
        ('[[ceiling]]\ngroup = "g"\nmax = 1.5\n', "'over' must be"),
        ('[[ceiling]]\nover = "limit"\nmax = 1.5\n', "'group' must be"),
        ('[[ceiling]]\ngroup = "g"\nover = "limit"\nmax = 1\n' * 2, "two ceilings"),
        ("[[ceiling]\n", "line 1"),
    ],
)
def test_bad_ceilings_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "ceilings.toml"
    path.write_text(text)
    with pytest.raises(gate.GateError, match=message.replace("[", r"\[")):
        gate.load_ceilings(path)


def test_the_committed_ceilings_load_and_name_real_groups() -> None:
    ceilings = gate.load_ceilings(ROOT / "benches" / "ceilings.toml")
    groups = set()
    for path in (ROOT / "benches").glob("bench_*.py"):
        text = path.read_text()
        groups |= {c.group for c in ceilings if c.group in text}
        groups |= {c.over for c in ceilings if c.over in text}
    named = {c.group for c in ceilings} | {
        c.over for c in ceilings if c.over not in gate.ROLE_REFERENCES
    }
    assert named <= groups, named - groups


def report(tmp_path: Path, rows: dict[str, dict[str, float]]) -> subprocess.CompletedProcess[str]:
    doc = tmp_path / "run.json"
    doc.write_text(json.dumps(run(rows)))
    ceilings = tmp_path / "ceilings.toml"
    ceilings.write_text(
        "".join(
            f"[[ceiling]]\ngroup = {json.dumps(c.group)}\nover = {json.dumps(c.over)}\n"
            f"max = {c.max}\n"
            for c in CEILINGS
        )
    )
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benches" / "report.py"),
            "--from-json",
            str(doc),
            "--gate",
            str(ceilings),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_report_gate_exit_status(tmp_path: Path) -> None:
    ok = report(tmp_path, good())
    assert ok.returncode == 0, ok.stderr
    assert "### Gate" in ok.stdout and "FAILED" not in ok.stdout
    rows = good()
    rows[B1]["limit"] = 0.5
    bad = report(tmp_path, rows)
    assert bad.returncode == 3
    assert "**FAILED**" in bad.stdout
    assert "1 check(s) failed in every attempt" in bad.stderr
    missing = report(tmp_path, {B1: good()[B1]})
    assert missing.returncode == 1
    assert f"names a group this run lacks: {B5}" in missing.stderr
