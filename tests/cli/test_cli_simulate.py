"""``pagehint simulate``: the JSON (QMP ``query-migrate`` names) and its consistency, the tables,
the overrides, the errors (exit status 2, one line on stderr, no traceback), custom TOML
scenarios with published figures, ``--plot``, the size/rate/duration parsers and the README's
first command as a real subprocess.

Most runs are in process (``pagehint.cli.main``); the many override runs use a 1 or 2 GiB guest
to stay fast. Figures are checked against each other and against the invariants of the model
(bytes on the wire, round bookkeeping), not against numbers that a retuned scenario changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import PAGE
from pagehint.cli import main
from pagehint.cli import report as cli_report
from pagehint.cli import simulate as cli_simulate
from pagehint.migration import MigrationResult
from pagehint.sim import (
    Scenario,
    load_scenario,
    parse_rate,
    parse_seconds,
    parse_size,
    reduction,
    run_scenario,
    shipped_scenarios,
)
from pagehint.sim.estimate import MachineLimits

GiB = 1 << 30
HEADER = 8  # QEMU's page header (WireFormat.page_header_bytes)
ZERO_PAGE_BYTES = HEADER + 1  # a header and QEMU's fill byte
ROUND_KEYS = {
    "round",
    "start",
    "duration",
    "dirty-at-start",
    "new-dirty",
    "normal",
    "duplicate",
    "transferred",
    "pages-hinted",
    "pages-skipped",
}
RAM_KEYS = {
    "transferred",
    "total",
    "duplicate",
    "normal",
    "normal-bytes",
    "dirty-sync-count",
    "remaining",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Json = dict[str, Any]


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich treats FORCE_COLOR / TTY_COMPATIBLE as "this is a terminal": keep the tests'
    captured streams plain unless a test asks for one."""
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)


def simulate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Runs ``pagehint simulate ARGS`` in process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main(["simulate", *args])
    out, err = capsys.readouterr()
    return status, out, err


def simulate_json(capsys: pytest.CaptureFixture[str], *args: str) -> Json:
    """``pagehint simulate --json ARGS``, which must succeed quietly."""
    status, out, err = simulate(capsys, "--json", *args)
    assert (status, err) == (0, ""), err
    doc: Json = json.loads(out)
    return doc


def table_rows(out: str) -> dict[str, list[str]]:
    """The rows of rich tables in ``out``: first cell -> the other cells, stripped."""
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("│") and line.endswith("│"):
            cells = [c.strip() for c in line[1:-1].split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def check_run(r: Json, *, ram_total: int, hints: bool) -> None:
    """One run's dict: QMP names, a completed migration that lost nothing, and figures that
    add up (every send step is paid at the link or the scan rate, rounds tile the time)."""
    assert r["status"] == "completed"
    assert "error" not in r
    assert r["free-page-hinting"] is hints
    assert set(r["ram"]) == RAM_KEYS
    ram = r["ram"]
    npages = ram_total // PAGE
    assert ram["total"] == ram_total
    assert ram["remaining"] == 0
    assert ram["normal-bytes"] == ram["normal"] * PAGE
    assert r["lost-pages"] == 0
    assert r["setup-time"] >= 0 and r["downtime"] >= 0
    assert r["total-time"] > r["downtime"]
    if not hints:
        assert r["pages-hinted"] == r["pages-skipped"] == 0
        assert ram["normal"] + ram["duplicate"] >= npages  # every page goes at least once
    else:
        assert 0 < r["pages-skipped"] <= r["pages-hinted"] <= npages

    rounds = r["rounds"]
    assert rounds and all(isinstance(x, dict) and set(x) == ROUND_KEYS for x in rounds)
    assert [x["round"] for x in rounds] == list(range(len(rounds)))
    # The bitmap starts all dirty; the first sync opens round 0, the last one is in the
    # stop-and-copy round, every other one opens a round.
    assert rounds[0]["dirty-at-start"] == npages
    assert len(rounds) == ram["dirty-sync-count"] - 1
    assert sum(x["normal"] for x in rounds) == ram["normal"]
    assert sum(x["duplicate"] for x in rounds) == ram["duplicate"]
    assert sum(x["transferred"] for x in rounds) == ram["transferred"]
    assert sum(x["pages-hinted"] for x in rounds) == r["pages-hinted"]
    assert sum(x["pages-skipped"] for x in rounds) == r["pages-skipped"]
    assert rounds[0]["start"] * 1000 == pytest.approx(r["setup-time"], abs=1e-3)
    for a, b in itertools.pairwise(rounds):
        assert b["start"] == pytest.approx(a["start"] + a["duration"], abs=1e-9)
    end = rounds[-1]["start"] + rounds[-1]["duration"]
    assert end * 1000 == pytest.approx(r["total-time"], abs=1e-3)
    # The last round is the stop-and-copy: the guest is paused for all of it.
    assert rounds[-1]["duration"] * 1000 == pytest.approx(r["downtime"], abs=1e-3)


def wire_bytes(r: Json) -> int:
    """What a run's pages cost on the wire with QEMU's framing."""
    ram = r["ram"]
    return int(ram["normal"] * (HEADER + PAGE) + ram["duplicate"] * ZERO_PAGE_BYTES)


def assert_link_bound(r: Json, bandwidth: float) -> None:
    """Nothing goes faster than the link (the run dict rounds times to the microsecond)."""
    assert r["total-time"] >= r["setup-time"] + r["ram"]["transferred"] / bandwidth * 1000 - 1e-3


@pytest.fixture(scope="module")
def default_json() -> Json:
    """``pagehint simulate --json`` on the default scenario, run once for the module."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["simulate", "--json"])
    assert (status, err.getvalue()) == (0, "")
    doc: Json = json.loads(out.getvalue())
    return doc


# -- 1. --json on the default scenario ----------------------------------------------------------


def test_default_json_document(default_json: Json) -> None:
    d = default_json
    assert set(d) == {"scenario", "description", "hints-off", "hints-on", "reduction", "published"}
    assert d["scenario"] == "default"
    assert d["description"] == load_scenario("default").description
    assert d["published"] == load_scenario("default").published
    assert set(d["reduction"]) == {"total-time", "transferred", "downtime"}


def test_default_json_runs(default_json: Json) -> None:
    off, on = default_json["hints-off"], default_json["hints-on"]
    check_run(off, ram_total=8 * GiB, hints=False)
    check_run(on, ram_total=8 * GiB, hints=True)
    # The default link is QEMU's framing at 10 Gbit/s; nothing else is on the wire.
    for r in (off, on):
        assert r["ram"]["transferred"] == wire_bytes(r)
        assert_link_bound(r, 1.25e9)
        assert r["setup-time"] == 0.0
        assert r["downtime"] <= 300 * 1.01  # the 300 ms limit, up to the page framing
    # Hints: most of the 6 GiB the hog freed is skipped, so far less goes and it is faster.
    assert on["pages-skipped"] > (4 * GiB) // PAGE
    assert on["ram"]["transferred"] < off["ram"]["transferred"]
    assert on["ram"]["normal"] < off["ram"]["normal"]
    assert on["total-time"] < off["total-time"]


def test_default_json_reduction(default_json: Json) -> None:
    d = default_json
    off, on = d["hints-off"], d["hints-on"]
    red = d["reduction"]
    # The run dicts round times to the microsecond; the reductions use the exact times.
    assert red["total-time"] == pytest.approx(1 - on["total-time"] / off["total-time"], abs=1e-5)
    assert red["downtime"] == pytest.approx(1 - on["downtime"] / off["downtime"], abs=1e-4)
    assert red["transferred"] == pytest.approx(
        1 - on["ram"]["transferred"] / off["ram"]["transferred"], rel=1e-12
    )
    assert 0 < red["total-time"] < 1 and 0 < red["transferred"] < 1


# -- 2. tables, --list, progress -----------------------------------------------------------------


def test_table_matches_the_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table shows the very results the two runs returned, formatted, and the change."""
    results: list[MigrationResult] = []
    real = run_scenario

    def recording(s: Scenario, **kw: Any) -> MigrationResult:
        r = real(s, **kw)
        results.append(r)
        return r

    monkeypatch.setattr(cli_simulate, "run_scenario", recording)
    status, out, err = simulate(capsys)
    assert (status, err) == (0, "")
    off, on = results
    assert "scenario default:" in out
    assert "hints off" in out and "hints on" in out and "change" in out
    rows = table_rows(out)
    labels = [
        "total time (ms)",
        "downtime (ms)",
        "setup time (ms)",
        "transferred (MiB)",
        "normal pages",
        "zero pages (duplicate)",
        "dirty syncs",
        "pages hinted",
        "pages skipped by hints",
        "lost pages",
    ]
    assert [label for label in rows if label in labels] == labels
    total = rows["total time (ms)"]
    assert total[:2] == [f"{off.total_time * 1000:,.0f}", f"{on.total_time * 1000:,.0f}"]
    assert re.fullmatch(r"-\d+%", total[2])
    assert total[2] == f"-{reduction(off.total_time, on.total_time) * 100:.0f}%"
    moved = rows["transferred (MiB)"]
    assert moved[:2] == [f"{r.transferred / (1 << 20):,.1f}" for r in (off, on)]
    assert re.fullmatch(r"-\d+%", moved[2])
    assert rows["downtime (ms)"][2].endswith("%")
    assert rows["normal pages"] == [f"{off.normal:,}", f"{on.normal:,}", ""]
    assert rows["pages hinted"] == ["0", f"{on.pages_hinted:,}", ""]
    assert rows["dirty syncs"] == [str(off.dirty_sync_count), str(on.dirty_sync_count), ""]
    assert rows["lost pages"] == ["0", "0", ""]
    assert "published" not in out  # the default scenario has no published figures
    assert "plot written" not in out


def test_list_names_every_shipped_scenario(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per scenario
    status, out, err = simulate(capsys, "--list")
    assert (status, err) == (0, "")
    shipped = shipped_scenarios()
    assert "default" in shipped
    assert out.splitlines() == [
        f"{name}: {load_scenario(name).description}" for name in sorted(shipped)
    ]


def test_no_progress_line_when_not_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_report, "SHOW_PROGRESS_AFTER", 0.0)
    status, out, err = simulate(capsys, "--memory", "1G")
    assert (status, err) == (0, "")
    assert "round" not in out and "simulated" not in out


def test_progress_line_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal (forced) a long run shows its round and dirty MiB on stderr; --no-progress
    and --json silence it."""
    monkeypatch.setattr(cli_report, "SHOW_PROGRESS_AFTER", 0.0)
    monkeypatch.setenv("FORCE_COLOR", "1")
    status, out, err = simulate(capsys, "--memory", "1G")
    assert status == 0
    assert re.search(r"hints off: round 0, [\d,.]+ MiB dirty, [\d.]+ s simulated", err)
    assert re.search(r"hints on: round \d+, [\d,.]+ MiB dirty", err)
    assert "round 0" not in out
    for quiet in ("--no-progress", "--json"):
        status, out, err = simulate(capsys, "--memory", "1G", quiet)
        assert status == 0 and "MiB dirty" not in err + out


# -- 3. overrides --------------------------------------------------------------------------------


def test_memory_override(capsys: pytest.CaptureFixture[str]) -> None:
    d = simulate_json(capsys, "--memory", "2G")
    check_run(d["hints-off"], ram_total=2 * GiB, hints=False)
    check_run(d["hints-on"], ram_total=2 * GiB, hints=True)
    assert d["scenario"] == "default"
    flat = simulate_json(capsys, "--memory", "3G", "--layout", "flat")
    check_run(flat["hints-off"], ram_total=3 * GiB, hints=False)


def test_workload_override(capsys: pytest.CaptureFixture[str]) -> None:
    idle = simulate_json(capsys, "--memory", "2G")
    busy = simulate_json(
        capsys,
        "--memory",
        "2G",
        "--workload",
        "steady-writer",
        "--param",
        "working_set=256M",
        "--param",
        "pages_per_s=20000",
    )
    check_run(busy["hints-off"], ram_total=2 * GiB, hints=False)
    check_run(busy["hints-on"], ram_total=2 * GiB, hints=True)
    # 80 MiB/s of writes over the same link: more is sent again than for the idle guest.
    for run in ("hints-off", "hints-on"):
        assert busy[run]["ram"]["transferred"] > idle[run]["ram"]["transferred"]


def test_param_without_workload_tunes_the_scenarios_workload(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--param alone goes to the scenario's own workload: an idle guest that writes nothing
    has every page sent exactly once without hints: one pass, then a stop-and-copy of what
    the pass had left when it fit the downtime."""
    d = simulate_json(capsys, "--memory", "1G", "--param", "pages_per_s=0")
    off = d["hints-off"]
    check_run(off, ram_total=GiB, hints=False)
    assert off["ram"]["normal"] + off["ram"]["duplicate"] == GiB // PAGE
    assert len(off["rounds"]) == 2
    assert off["rounds"][1]["new-dirty"] == 0


def test_bandwidth_override(capsys: pytest.CaptureFixture[str]) -> None:
    fast = simulate_json(capsys, "--memory", "2G", "--bandwidth", "10Gbit")
    slow = simulate_json(capsys, "--memory", "2G", "--bandwidth", "1Gbit")
    for run in ("hints-off", "hints-on"):
        check_run(slow[run], ram_total=2 * GiB, hints=run == "hints-on")
        assert slow[run]["total-time"] > fast[run]["total-time"]
        assert_link_bound(slow[run], 1.25e8)  # 1 Gbit/s is 125 MB/s
    assert slow["hints-off"]["total-time"] > 5 * fast["hints-off"]["total-time"]


def test_downtime_override(capsys: pytest.CaptureFixture[str]) -> None:
    loose = simulate_json(capsys, "--memory", "2G")
    tight = simulate_json(capsys, "--memory", "2G", "--downtime", "50ms")
    for run in ("hints-off", "hints-on"):
        check_run(tight[run], ram_total=2 * GiB, hints=run == "hints-on")
        assert tight[run]["downtime"] <= 50
    assert tight["hints-off"]["downtime"] < loose["hints-off"]["downtime"]


@pytest.mark.parametrize("strategy", ["safe", "qemu"])
def test_manual_log_mode_loses_nothing_for_an_idle_guest(
    capsys: pytest.CaptureFixture[str], strategy: str
) -> None:
    d = simulate_json(capsys, "--memory", "2G", "--log-mode", "manual", "--strategy", strategy)
    check_run(d["hints-off"], ram_total=2 * GiB, hints=False)
    check_run(d["hints-on"], ram_total=2 * GiB, hints=True)


def test_manual_log_mode_without_hints_loses_nothing_under_a_busy_guest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without hints, QEMU's lazy per-chunk clearing of a manual-protect log is safe: a page
    written after the sync's GET_DIRTY_LOG stays dirty in KVM's log."""
    status, out, _err = simulate(
        capsys, "--json", "--memory", "2G", "--log-mode", "manual", "--workload", "kernel-compile"
    )
    d = json.loads(out)
    assert d["hints-off"]["lost-pages"] == 0
    assert d["hints-on"]["lost-pages"] == 0
    assert status == 0


def test_seed_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    a = simulate_json(capsys, "--memory", "1G", "--seed", "7")
    b = simulate_json(capsys, "--memory", "1G", "--seed", "7")
    assert a == b
    check_run(a["hints-on"], ram_total=GiB, hints=True)
    # The default scenario's own seed is 1: saying so changes nothing.
    assert load_scenario("default").seed == 1
    assert simulate_json(capsys, "--memory", "1G", "--seed", "1") == simulate_json(
        capsys, "--memory", "1G"
    )


def test_lost_pages_and_failures_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's contract: exit status 1 and a message when a page was lost or a run did
    not complete (the runs are doctored here; the migration itself is tested elsewhere)."""
    real = run_scenario
    doctor: dict[str, Any] = {}

    def doctored(s: Scenario, **kw: Any) -> MigrationResult:
        r = real(s, **kw)
        return dataclasses.replace(r, **doctor) if kw["hints"] else r

    monkeypatch.setattr(cli_simulate, "run_scenario", doctored)
    doctor.update(lost_pages=3)
    status, out, err = simulate(capsys, "--memory", "1G")
    assert status == 1
    assert table_rows(out)["lost pages"][:2] == ["0", "3"]
    assert "3 pages lost" in err
    status, out, err = simulate(capsys, "--memory", "1G", "--json")
    assert status == 1 and err == "" and json.loads(out)["hints-on"]["lost-pages"] == 3
    doctor.clear()
    doctor.update(status="failed", error="IndexError: [guest] page 7", lost_pages=None)
    status, out, err = simulate(capsys, "--memory", "1G")
    assert status == 1
    assert table_rows(out)["lost pages"][:2] == ["0", "n/a"]
    assert "migration failed: IndexError: [guest] page 7" in " ".join(err.split())


# -- 4. errors -----------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


SHIPPED = "default, wang-v37-bzimage-8g, wang-v37-idle-128g, wang-v37-idle-8g"
WORKLOAD_KINDS = "idle, memory-hog, steady-writer, kernel-compile, write-free, used-writer"

# Every option error: the whole of stderr after "pagehint simulate: ".
ERRORS: list[tuple[list[str], str]] = [
    (["nosuch"], f"no scenario 'nosuch': not a file, nor one of {SHIPPED}"),
    (["--memory", "banana"], "--memory banana: not a size: 'banana' (try 8G, 512MiB, 4096)"),
    (["--memory", "4097"], "--memory 4097: 4097 bytes is not a whole number of 4096-byte pages"),
    (["--memory", "inf"], "--memory inf: not a size: inf (a whole number of bytes, or 8G, 512MiB)"),
    (
        ["--memory", "1e30"],
        "--memory 1e30: not a size: 1e+30 (a whole number of bytes, or 8G, 512MiB)",
    ),
    (["--memory=-1G"], "--memory -1G: not a size: '-1G' (try 8G, 512MiB, 4096)"),
    (["--memory", "0"], "--memory 0: must be more than 0, not 0"),
    (["--memory", ""], "--memory : not a size: '' (try 8G, 512MiB, 4096)"),
    (["--memory", "\n"], "--memory \\n: not a size: '\\n' (try 8G, 512MiB, 4096)"),
    (
        ["--memory", "8P"],
        "--memory 8P: 9007199254740992 bytes is more than the 4 PiB of a 52-bit guest-physical "
        "space",
    ),
    (
        ["--memory", "4M"],
        "--memory 4M: 4 MiB of x86 RAM holds 1 whole 4 MiB block(s); the guest needs at least two",
    ),
    (
        ["--memory", "0.1G"],
        "--memory 0.1G: not a size: '0.1G' is 1.07374e+08 bytes, not a whole number",
    ),
    (["--layout", "arm"], "--layout arm: must be 'x86' or 'flat', not 'arm'"),
    (["--param", "working_set"], "--param takes KEY=VALUE, not 'working_set'"),
    (["--param", "=1"], "--param takes KEY=VALUE, not '=1'"),
    (["--param", "kind=idle"], "--param kind=...: the workload is --workload's to say"),
    (["--param", "pages_per_s=nan"], "--param pages_per_s=nan: must be a finite number, not nan"),
    (["--param", "pages_per_s=inf"], "--param pages_per_s=inf: must be a finite number, not inf"),
    (["--param", "pages_per_s=-5"], "--param pages_per_s=-5: must be at least 0, not -5"),
    (["--param", "pages_per_s=fast"], "--param pages_per_s=fast: must be a number, not 'fast'"),
    (
        ["--workload", "idle", "--param", "foo=1"],
        "--param foo=1: unknown key (this table takes kind, pages_per_s)",
    ),
    (
        ["--workload", "steady-writer", "--param", "working_set=1G"],
        "--workload steady-writer: pages_per_s: missing (required)",
    ),
    (
        ["--workload", "used-writer", "--param", "pages_per_s=1", "--param", "kernel_pages=1.5"],
        "--param kernel_pages=1.5: must be an integer, not 1.5",
    ),
    (
        ["--workload", "nope"],
        f"--workload nope: kind 'nope' is not a workload: one of {WORKLOAD_KINDS}",
    ),
    (["--bandwidth", "fast"], "--bandwidth fast: not a rate: 'fast' (try 10Gbit, 1.25GB, 100G)"),
    (["--bandwidth", "0"], "--bandwidth 0: must be at least 1, not 0"),
    (["--bandwidth", "nan"], "--bandwidth nan: must be a finite number, not nan"),
    (["--bandwidth", "1bit"], "--bandwidth 1bit: '1bit' is 0.125 bytes/s: not within 1 to 1e+15"),
    (["--bandwidth", "2P"], "--bandwidth 2P: '2P' is 2.2518e+15 bytes/s: not within 1 to 1e+15"),
    (["--downtime", "1e10"], "--downtime 1e10: must be at most 1e+09, not 10000000000.0"),
    (["--param", "pages_per_s=1e16"], "--param pages_per_s=1e16: must be at most 1e+15, not 1e+16"),
    (["--downtime", "soon"], "--downtime soon: not a duration: 'soon' (try 300ms, 0.3s)"),
    (["--downtime=-1"], "--downtime -1: must be at least 0, not -1"),
    (
        ["--log-mode", "dirty-ring"],
        "--log-mode dirty-ring: must be 'classic', 'manual' or 'ring', not 'dirty-ring'",
    ),
    (["--strategy", "fast"], "--strategy fast: must be 'safe' or 'qemu', not 'fast'"),
    (["--seed", "-1"], "--seed -1: must be at least 0, not -1"),
    (["--seed", "1.5"], "--seed 1.5: must be an integer, not 1.5"),
    (["--seed", "x"], "--seed x: must be an integer, not 'x'"),
    (["--seed", "true"], "--seed true: must be an integer, not True"),
]


@pytest.fixture
def no_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any simulation fails the test: what is refused is refused before the runs."""

    def no_run(s: Scenario, **kw: Any) -> MigrationResult:
        raise AssertionError("simulated although the command should have refused")

    monkeypatch.setattr(cli_simulate, "run_scenario", no_run)


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``pagehint simulate ARGS`` exits 2 with one line on stderr and nothing on stdout;
    returns the line without the command's name."""
    status, out, err = simulate(capsys, *args)
    assert (status, out) == (2, ""), err
    assert err.startswith("pagehint simulate: ") and err.endswith("\n")
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.removeprefix("pagehint simulate: ").removesuffix("\n")


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
@pytest.mark.usefixtures("no_run")
def test_bad_arguments_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert refused(capsys, *args) == message


# Every scenario file error: (name, text, stderr after "pagehint simulate: PATH: ").
TOML_ERRORS: list[tuple[str, str, str]] = [
    (
        "unknown-key",
        """
        [guest]
        memory = "1G"
        bogus = 1
        """,
        "[guest] bogus: unknown key (this table takes memory, layout, below_4g, page_size, "
        "block_bytes, used, used_data, free_order, init_on_alloc, poison, log_mode, seed, "
        "hint_rate, device_rate)",
    ),
    (
        "unknown-top-level-key",
        "bogus = 1",
        "bogus: unknown key (this table takes name, description, published, guest, history, "
        "workload, link, migration)",
    ),
    (
        "missing-param",
        """
        [guest]
        memory = "1G"
        [workload]
        kind = "memory-hog"
        rate = "1G"
        """,
        "[workload] size: missing (required)",
    ),
    (
        "history-without-kind",
        """
        [[history]]
        size = "1G"
        """,
        f"[[history]] #1: a workload needs a kind: one of {WORKLOAD_KINDS}",
    ),
    (
        "history-rate-0",  # it used to hang forever
        """
        [[history]]
        kind = "memory-hog"
        size = "6G"
        rate = 0
        """,
        "[[history]] #1 rate: must be more than 0, not 0",
    ),
    (
        "history-not-an-array",
        """
        [history]
        kind = "idle"
        """,
        "[[history]]: must be an array of tables ([[...]]), not a table",
    ),
    (
        "free-more-than-write",
        """
        [[history]]
        kind = "idle"
        [[history]]
        kind = "write-free"
        write = "1G"
        free = "2G"
        """,
        "[[history]] #2 free: 2147483648 bytes is more than write (1073741824)",
    ),
    (
        "bad-strategy",
        """
        [migration]
        strategy = "fast"
        """,
        "[migration] strategy: must be 'safe' or 'qemu', not 'fast'",
    ),
    (
        "string-for-postcopy",  # it used to be read as true
        """
        [migration]
        postcopy = "no"
        """,
        "[migration] postcopy: must be true or false, not 'no'",
    ),
    (
        "string-for-init-on-alloc",  # it used to be read as true
        """
        [guest]
        init_on_alloc = "false"
        """,
        "[guest] init_on_alloc: must be true or false, not 'false'",
    ),
    ("float-for-seed", "[guest]\nseed = 1.5", "[guest] seed: must be an integer, not 1.5"),
    (
        "inf-memory",
        "[guest]\nmemory = inf",
        "[guest] memory: not a size: inf (a whole number of bytes, or 8G, 512MiB)",
    ),
    (
        "huge-memory",
        "[guest]\nmemory = 1e30",
        "[guest] memory: not a size: 1e+30 (a whole number of bytes, or 8G, 512MiB)",
    ),
    (
        "negative-memory",
        "[guest]\nmemory = -4096",
        "[guest] memory: must be more than 0, not -4096",
    ),
    (
        "memory-4097",  # it used to be blamed on below_4g
        "[guest]\nmemory = 4097",
        "[guest] memory: 4097 bytes is not a whole number of 4096-byte pages",
    ),
    (
        "negative-page-size",
        "[guest]\npage_size = -4096",
        "[guest] page_size: must be 4096, 16384 or 65536, not -4096",
    ),
    (
        "nan-hint-rate",
        "[guest]\nhint_rate = nan",
        "[guest] hint_rate: must be a finite number, not nan",
    ),
    (
        "negative-header",  # it used to shrink `transferred`
        "[link]\npage_header_bytes = -8",
        "[link] page_header_bytes: must be at least 0, not -8",
    ),
    (
        "below-4g-past-memory",
        """
        [guest]
        memory = "1G"
        below_4g = "2G"
        """,
        "[guest] below_4g: 2 GiB is more than the memory (1 GiB) or 4 GiB",
    ),
    (
        "below-4g-flat",
        """
        [guest]
        layout = "flat"
        below_4g = "1G"
        """,
        "[guest] below_4g: only the x86 layout has RAM below a PCI hole",
    ),
    (
        "block-not-a-power-of-two",
        '[guest]\nblock_bytes = "3M"',
        "[guest] block_bytes: 3145728 is not a power of two of at least 4096 (the page size)",
    ),
    (
        "bad-layout",
        """
        [guest]
        memory = "1G"
        layout = "arm"
        """,
        "[guest] layout: must be 'x86' or 'flat', not 'arm'",
    ),
    ("bad-used", "[guest]\nused = 1.5", "[guest] used: must be at most 1, not 1.5"),
    (
        "bad-poison",
        '[guest]\npoison = "yes"',
        "[guest] poison: must be none, init_on_free, page_poison or a u32 (0 to 0xFFFFFFFF), "
        "not 'yes'",
    ),
    ("guest-not-a-table", "guest = 3", "[guest]: must be a table, not 3"),
    ("name-not-a-string", "name = 5", "name: must be a string, not 5"),
    (
        "published-not-a-number",
        '[published]\ntotal_time_off_ms = "x"',
        "[published] total_time_off_ms: must be a number, not 'x'",
    ),
    (
        "zero-iteration-time",
        "[link]\niteration_time = 0",
        "[link] iteration_time: must be more than 0, not 0",
    ),
    (
        "not-toml",
        """
        [guest
        memory =
        """,
        "not valid TOML: Expected ']' at the end of a table declaration (at line 2, column 7)",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "message"), TOML_ERRORS, ids=[n for n, _, _ in TOML_ERRORS]
)
@pytest.mark.usefixtures("no_run")
def test_bad_scenario_files_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = write(tmp_path, f"{name}.toml", text)
    assert refused(capsys, path) == f"{path}: {message}"


@pytest.mark.usefixtures("no_run")
def test_undecodable_and_unreadable_files_name_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'description = "caf\xe9"\n')
    assert refused(capsys, str(path)) == (
        f"{path}: not UTF-8, so not TOML (invalid continuation byte at byte 18)"
    )
    assert refused(capsys, str(tmp_path)) == (
        f"no scenario {str(tmp_path)!r}: not a file, nor one of {SHIPPED}"
    )


def test_the_file_is_named_and_an_override_the_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An error in a key the command line set names the option; one in the file names the
    file, even when an override brings it out."""
    path = write(tmp_path, "two.toml", '[guest]\nmemory = "2G"\nbelow_4g = "2G"\n')
    assert refused(capsys, path, "--memory", "1G") == (
        f"{path}: [guest] below_4g: 2 GiB is more than the memory (1 GiB) or 4 GiB"
    )
    path = write(tmp_path, "hog.toml", '[workload]\nkind = "memory-hog"\nsize = "1G"\n')
    assert refused(capsys, path, "--param", "rate=0") == (
        "--param rate=0: must be more than 0, not 0"
    )
    assert refused(capsys, path, "--param", "size=-1") == (
        "--param size=-1: must be more than 0, not -1"
    )


# -- 4b. runs too big for this machine, refused before they start -------------------------------


@pytest.mark.usefixtures("no_run")
def test_a_guest_bigger_than_this_machine_is_refused_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--memory 1P used to run for 34 s to a MemoryError: now it is refused with the estimate
    and the machine's figure, before anything is allocated."""
    t0 = time.perf_counter()
    message = refused(capsys, "--memory", "1P")
    assert time.perf_counter() - t0 < 5
    assert re.fullmatch(
        r"scenario default: the run would need about 461 GiB of memory; "
        r"this machine has [\d.]+ [GMT]iB \(MemAvailable\)",
        message,
    ), message


SMALL_MACHINE = MachineLimits(
    memory=2 * GiB,
    memory_source="MemAvailable",
    address_space=1 << 47,
    address_space_source="a process's address space",
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--memory", "16T", "--workload", "idle"],
            "the run would need about 4.03 GiB of memory; this machine has 2 GiB (MemAvailable)",
        ),
        (
            ["--bandwidth", "8bit"],  # a byte per second, with the default's 2,000 pages/s
            "the run would need about 15.7 TiB of memory, 2.69e+11 pages written in one step; "
            "this machine has 2 GiB (MemAvailable)",
        ),
        (
            [
                "--workload",
                "steady-writer",
                "--param",
                "working_set=1G",
                "--param",
                "pages_per_s=1e12",
            ],
            "the run would need about 6.26 TiB of memory, 1.08e+11 pages written in one step; "
            "this machine has 2 GiB (MemAvailable)",
        ),
        (
            ["--param", "pages_per_s=2e8"],  # 800 GB/s of writes
            "the runs would take about 1.39 h (1.91e+07 pages sent, 1.25e+10 written, "
            "645 steps, 34.4 s simulated); the limit is 1 h",
        ),
    ],
)
@pytest.mark.usefixtures("no_run")
def test_runs_too_big_are_refused_with_the_figure_and_the_limit(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(cli_simulate, "machine_limits", lambda: SMALL_MACHINE)
    assert refused(capsys, *args) == f"scenario default: {message}"


@pytest.mark.usefixtures("no_run")
def test_a_history_that_would_take_days_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A hog allocating 6 GiB at 1 byte/s runs a step per simulated second."""
    path = write(tmp_path, "slow.toml", '[[history]]\nkind = "memory-hog"\nsize = "6G"\nrate = 1\n')
    message = refused(capsys, path)
    assert message.startswith("scenario slow: the runs would take about 7.46 days (")
    assert message.endswith("1.29e+10 steps, 13.1 s simulated); the limit is 1 h")


# -- 5. custom scenario with published figures --------------------------------------------------

CUSTOM = """
    name = "tiny"
    description = "A 1 GiB guest after a 512 MiB [batch] job."

    [published]
    source = "a made-up paper [v2]"
    total_time_off_ms = 2000
    total_time_on_ms = 500

    [guest]
    memory = "1G"
    layout = "flat"
    used = 0.1
    init_on_alloc = false
    seed = 3

    [[history]]
    kind = "memory-hog"
    size = "512M"

    [workload]
    kind = "steady-writer"
    working_set = "64M"
    pages_per_s = 5000

    [link]
    bandwidth = "5Gbit"
    max_downtime = "100ms"
    setup_time = "20ms"

    [migration]
    strategy = "safe"
    """


def test_custom_scenario_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = simulate_json(capsys, write(tmp_path, "tiny.toml", CUSTOM))
    assert d["scenario"] == "tiny"
    assert d["description"] == "A 1 GiB guest after a 512 MiB [batch] job."
    assert d["published"] == {
        "source": "a made-up paper [v2]",
        "total_time_off_ms": 2000,
        "total_time_on_ms": 500,
    }
    for run in ("hints-off", "hints-on"):
        r = d[run]
        check_run(r, ram_total=GiB, hints=run == "hints-on")
        assert r["setup-time"] == 20.0
        assert r["ram"]["transferred"] == wire_bytes(r)
        assert_link_bound(r, 625e6)
    assert d["hints-on"]["total-time"] < d["hints-off"]["total-time"]


def test_custom_scenario_published_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, "tiny.toml", CUSTOM)
    results: list[MigrationResult] = []
    real = run_scenario

    def recording(s: Scenario, **kw: Any) -> MigrationResult:
        r = real(s, **kw)
        results.append(r)
        return r

    monkeypatch.setattr(cli_simulate, "run_scenario", recording)
    status, out, err = simulate(capsys, path)
    assert (status, err) == (0, "")
    off, on = results
    flat = " ".join(out.split())
    assert "scenario tiny: A 1 GiB guest after a 512 MiB [batch] job." in flat
    assert "published: a made-up paper [v2]" in flat  # brackets are text, not markup
    rows = table_rows(out)
    assert rows["published"] == ["2,000", "500", "75%"]
    sim = 1 - on.total_time / off.total_time
    assert rows["simulated"] == [
        f"{off.total_time * 1000:,.0f}",
        f"{on.total_time * 1000:,.0f}",
        f"{sim * 100:.0f}% ({(sim - 0.75) * 100:+.0f} pp)",
    ]
    assert re.fullmatch(r"\d+% \([+-]\d+ pp\)", rows["simulated"][2])


def test_overrides_drop_the_published_comparison(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Published figures belong to the scenario as written: any override drops them."""
    path = write(tmp_path, "tiny.toml", CUSTOM)
    assert simulate_json(capsys, path, "--bandwidth", "10Gbit")["published"] == {}
    status, out, err = simulate(capsys, path, "--memory", "512M")
    assert (status, err) == (0, "")
    assert "hints off" in out and " pp)" not in out and "published" not in out


# -- 6. --plot ----------------------------------------------------------------------------------


def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    status, out, err = simulate(capsys, "--memory", "1G", "--plot", str(png))
    assert (status, err) == (0, "")
    assert f"plot written to {png}" in " ".join(out.split())
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    png.unlink()
    d = simulate_json(capsys, "--memory", "1G", "--plot", str(png))  # JSON stays pure JSON
    assert d["scenario"] == "default"
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_exits_2_before_running(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pagehint.cli.plot", None)  # the import fails

    def no_run(s: Scenario, **kw: Any) -> MigrationResult:
        raise AssertionError("simulated although --plot cannot work")

    monkeypatch.setattr(cli_simulate, "run_scenario", no_run)
    png = tmp_path / "out.png"
    status, out, err = simulate(capsys, "--memory", "1G", "--plot", str(png))
    assert status == 2
    assert out == ""
    assert err.startswith("pagehint simulate: --plot needs matplotlib")
    assert "pip install 'pagehint[plot]'" in err
    assert not png.exists()


def test_plot_without_a_suffix_reports_the_file_it_wrote(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """matplotlib adds .png to a name without a suffix: the message names that file."""
    pytest.importorskip("matplotlib")
    status, out, err = simulate(capsys, "--memory", "1G", "--plot", str(tmp_path / "out"))
    assert (status, err) == (0, "")
    assert f"plot written to {tmp_path / 'out.png'}" in " ".join(out.split())
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    svg = tmp_path / "rounds.SVG"
    assert simulate(capsys, "--memory", "1G", "--plot", str(svg))[0] == 0
    assert svg.read_text().lstrip().startswith("<?xml")


@pytest.mark.usefixtures("no_run")
def test_a_plot_that_cannot_be_written_is_refused_before_running(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    missing = tmp_path / "no" / "such" / "dir" / "out.png"
    assert refused(capsys, "--plot", str(missing)) == (
        f"--plot {missing}: no directory {str(missing.parent)!r}"
    )
    assert refused(capsys, "--plot", str(tmp_path / "out.xyz")).startswith(
        f"--plot {tmp_path / 'out.xyz'}: matplotlib writes no 'xyz' files (it writes "
    )
    (tmp_path / "d.png").mkdir()
    assert refused(capsys, "--plot", str(tmp_path / "d.png")) == (
        f"--plot {tmp_path / 'd.png'}: {str(tmp_path / 'd.png')!r} is a directory"
    )
    assert refused(capsys, "--plot", "") == "--plot '': not a file name"
    assert list(tmp_path.iterdir()) == [tmp_path / "d.png"]


# -- 7. parsers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8G", 8 << 30),
        ("8GiB", 8 << 30),
        ("8 GB", 8 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("1T", 1 << 40),
        ("4k", 4096),
        ("4096", 4096),
        ("0.5G", 512 << 20),
        (" 2G ", 2 << 30),
        (3 << 20, 3 << 20),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_decimal() -> None:
    assert parse_size("2GB", binary=False) == 2_000_000_000
    assert parse_size("2GiB", binary=False) == 2 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10Gbit", 1.25e9),
        ("1Gbit", 1.25e8),
        ("100Mbit", 12.5e6),
        ("100G", 100 * 2**30),  # QEMU's migrate_set_speed suffixes are binary
        ("1GiB", 2**30),
        ("2.5GB", 2.5e9),
        ("1.25GB", 1.25e9),
        ("1000", 1000.0),
        (5e8, 5e8),
    ],
)
def test_parse_rate(text: str | float, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300ms", 0.3),
        ("0.3s", 0.3),
        ("0.3", 0.3),
        ("2s", 2.0),
        ("50 ms", 0.05),
        (1, 1.0),
    ],
)
def test_parse_seconds(text: str | int, expected: float) -> None:
    assert parse_seconds(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text", ["banana", "", "G", "8X", "-1G", "1.2.3G", "10Gbit", "8 G B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["fast", "", "-1G", "1 0G", "10 Gb it"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["soon", "", "5min", "-1ms", "1h", "ms"])
def test_parse_seconds_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_seconds(text)


# -- 8. the README's first command --------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_python_m_pagehint_simulate() -> None:
    """``pip install . && pagehint simulate``: no arguments, the default scenario's table."""
    p = subprocess.run(
        [sys.executable, "-m", "pagehint", "simulate"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert "hints off" in p.stdout and "hints on" in p.stdout
    rows = table_rows(p.stdout)
    assert rows["lost pages"][:2] == ["0", "0"]
    assert re.fullmatch(r"-\d+%", rows["total time (ms)"][2])


def test_python_m_pagehint_simulate_error() -> None:
    """A real process: one line, exit status 2, no traceback."""
    p = subprocess.run(
        [sys.executable, "-m", "pagehint", "simulate", "--memory", "banana"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr == (
        "pagehint simulate: --memory banana: not a size: 'banana' (try 8G, 512MiB, 4096)\n"
    )
