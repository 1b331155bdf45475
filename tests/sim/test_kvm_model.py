"""The simulator's model of a ``pagehint migrate-kvm`` run (``pagehint.sim.kvm_model``): the
scenario has the KVM test guest's shape (two memslots, a mostly zero kernel block at gpa 0,
blocks 1..W written and the last F freed), its prediction is the simulator's migration of it,
and the scenario written as a file gives the same figures under ``pagehint simulate``.
tests/kvm/test_predict.py holds the prediction against real KVM runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import GIB, MIB, PAGE, completed_result
from pagehint.cli import main
from pagehint.migration import MigrationResult, Progress, RoundStats
from pagehint.migration.stream import STREAM_WIRE
from pagehint.sim import SimulatedGuest, load_scenario, scenario_to_toml
from pagehint.sim.contents import is_zero
from pagehint.sim.kvm_model import (
    Comparison,
    KvmRunParams,
    SendTimeline,
    compare,
    estimated_step_rate,
    kvm_scenario,
    measured_sender_rate,
    predict_kvm_run,
    simulate_kvm_run,
    step_rate,
)
from pagehint.sim.scenario import guest_after_history

DEFAULTS = KvmRunParams(step_rate=400.0)


def guest_before_migrating(p: KvmRunParams) -> SimulatedGuest:
    """The scenario's guest after its history, as run_scenario builds it."""
    return guest_after_history(kvm_scenario(p))


def test_the_scenario_has_the_kvm_guests_shape() -> None:
    s = kvm_scenario(DEFAULTS)
    assert s.memmap().regions == [(0, 128 * MIB), (4 * GIB, 128 * MIB)]
    assert (s.log_mode, s.precopy.strategy, s.precopy.batch_pages) == ("manual", "safe", 256)
    assert s.precopy.max_downtime == 0.3 and s.link.bandwidth == 512 * MIB
    assert s.link.wire == STREAM_WIRE  # the socket stream's: 8 bytes a batch and a page
    assert s.workload.params == {"pages_per_s": 400.0 * 32, "kernel_pages": 13}
    guest = guest_before_migrating(DEFAULTS)
    # The kernel keeps block 0 (gpa 0); blocks 1..10 are in use, 11..50 freed with their
    # data, 51..63 never written.
    assert guest.used_blocks().tolist() == list(range(11))
    assert guest.used_blocks(kernel=False).tolist() == list(range(1, 11))
    assert guest.free_block_count == 53
    contents = guest.contents.get_range(0, guest.npages)
    data = ~is_zero(contents)
    assert int(np.count_nonzero(data[:1024])) == 66  # the KVM guest's, measured
    assert data[1024 : 51 * 1024].all() and not data[51 * 1024 :].any()


def test_estimates_follow_the_guests_layout() -> None:
    assert DEFAULTS.estimated_kernel_data_pages() == 16 + 50
    assert DEFAULTS.estimated_step_kernel_pages() == 3 + 10
    small = KvmRunParams(memory=64 * MIB, write_blocks=6, free_blocks=4)
    assert small.estimated_kernel_data_pages() == 22  # measured: 22
    assert small.estimated_step_kernel_pages() == 5
    # More than memory holds: the guest writes what it can.
    big = KvmRunParams(memory=64 * MIB, write_blocks=100, free_blocks=0)
    assert big.written_blocks == 15 and big.used_blocks == 15
    idle = KvmRunParams(write_blocks=10, free_blocks=10)
    assert idle.used_blocks == 0 and idle.estimated_step_kernel_pages() == 0
    given = KvmRunParams(kernel_data_pages=5, step_kernel_pages=2)
    assert (given.estimated_kernel_data_pages(), given.estimated_step_kernel_pages()) == (5, 2)


def test_the_step_rate_is_measured_or_estimated() -> None:
    assert KvmRunParams(step_rate=250.0).steps_per_s == 250.0
    assert KvmRunParams().steps_per_s == estimated_step_rate(32)
    assert 300 < estimated_step_rate(32) < 600
    assert estimated_step_rate(256) < estimated_step_rate(32) < estimated_step_rate(0)


def result(total: float, downtime: float, last_sync: float | None = None) -> MigrationResult:
    rounds = [] if last_sync is None else [round_at(0.0), round_at(last_sync)]
    return completed_result(total_time=total, downtime=downtime, rounds=rounds)


def round_at(start: float) -> RoundStats:
    return RoundStats(0, start, 0.0, 0, 0, 0, 0, 0, 0, 0)


def test_step_rate_counts_the_time_the_guest_ran() -> None:
    # Until the last sync, where stop-and-copy began (the downtime reported may include the
    # switchover after the migration's clock stopped).
    assert step_rate(120, result(0.45, 0.3, last_sync=0.3)) == pytest.approx(400.0)
    assert step_rate(120, result(0.3, 0.0)) == pytest.approx(400.0)  # no rounds: its time
    assert step_rate(5, result(0.0, 0.0)) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory": 100 * MIB},  # not two whole blocks' multiple
        {"memory": 0},
        {"block_bytes": 3 * MIB},
        {"block_bytes": 2048},
        {"kernel_bytes": 0},
        {"memory": 8 * MIB, "kernel_bytes": 8 * MIB},
        {"write_blocks": 2, "free_blocks": 3},
        {"free_blocks": -1},
        {"pages_per_step": -1},
        {"step_rate": -1.0},
        {"step_rate": math.nan},
        {"bandwidth": 0.0},
        {"hint_rate": 0.0},
        {"scan_rate": -1.0},
        {"sender_rate": 0.0},
        {"startup_wait": -0.1},
        {"startup_wait": math.nan},
        {"startup_buffer": -1},
    ],
    ids=repr,
)
def test_bad_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        KvmRunParams(**kwargs)


def test_the_prediction_of_the_defaults() -> None:
    p = predict_kvm_run(DEFAULTS)
    off, on = p.off, p.on
    for r in (off, on):
        assert r.status == "completed" and r.lost_pages == 0 and r.remaining == 0
    # Every page once (51 blocks of data and the kernel's 66, the rest zero pages), and the
    # pages the guest rewrote after they were sent.
    first_pass = (51 * 1024 - 1024 + 66) * (PAGE + 8) + (65536 - 50 * 1024 - 66) * 8
    assert first_pass < off.transferred < first_pass * 1.1
    # Hints skip the 53 free blocks; what is sent is the 10 used blocks, the kernel's data
    # and the rewrites.
    assert on.pages_skipped == on.pages_hinted == 53 * 1024
    used = (10 * 1024 + 66) * (PAGE + 8)
    assert used < on.transferred < used * 1.15
    assert off.pages_skipped == 0 and not off.hinting
    # The same parameters give the same figures.
    assert simulate_kvm_run(DEFAULTS, hints=True) == on


def test_each_run_is_predicted_at_its_own_rate() -> None:
    slow, fast = replace(DEFAULTS, step_rate=100.0), replace(DEFAULTS, step_rate=800.0)
    p = predict_kvm_run(slow, fast)
    assert (p.params_off, p.params_on) == (slow, fast)
    assert p.off == simulate_kvm_run(slow, hints=False)
    assert p.on == simulate_kvm_run(fast, hints=True)
    # A faster guest dirties more: more is sent again.
    assert simulate_kvm_run(fast, hints=False).transferred > p.off.transferred
    d = p.to_dict()
    assert d["params"] == {
        "hints-off": {"step-rate": 100.0, "sender-rate": None, "startup-wait": 0.0},
        "hints-on": {"step-rate": 800.0, "sender-rate": None, "startup-wait": 0.0},
    }
    assert d["hints-on"]["pages-skipped"] == 53 * 1024


def test_a_slow_sender_or_a_late_destination_changes_the_rounds() -> None:
    slow = replace(DEFAULTS, sender_rate=128 * MIB)
    assert slow.link_rate == 128 * MIB and kvm_scenario(slow).link.bandwidth == 128 * MIB
    # A sender faster than the pacing is held to it.
    assert replace(DEFAULTS, sender_rate=4096 * MIB).link_rate == 512 * MIB
    late = replace(DEFAULTS, startup_wait=0.3)
    link = kvm_scenario(late).link
    assert (link.startup_wait, link.startup_buffer) == (0.3, 212992)
    base = simulate_kvm_run(DEFAULTS, hints=True)
    # The guest runs 0.3 s more in the first round: what it rewrites is sent again.
    r = simulate_kvm_run(late, hints=True)
    assert r.rounds[0].duration == pytest.approx(base.rounds[0].duration + 0.3)
    assert r.transferred > base.transferred + 4 * MIB
    assert r.pages_skipped == base.pages_skipped
    # A slow sender measures its own rate: the threshold (rate x downtime) is reached
    # after one window and the rest goes in stop-and-copy.
    r = simulate_kvm_run(slow, hints=True)
    assert r.dirty_sync_count == 3 and r.rounds[0].duration == pytest.approx(0.1, abs=0.01)
    assert r.downtime > 0.15 and r.pages_skipped == base.pages_skipped


def progress_at(t: float) -> Progress:
    return Progress(t, 0, 0, 0, 0, 0)


def test_the_send_timeline_finds_the_destinations_start_up_wait() -> None:
    seen: list[float] = []
    timeline = SendTimeline(chain=lambda p: seen.append(p.time))
    # Two batches, a 0.4 s wait, then a batch every 2 ms.
    times = [0.001, 0.002, 0.404] + [0.404 + 0.002 * k for k in range(1, 100)]
    for t in times:
        timeline(progress_at(t))
    assert seen == times == timeline.times
    assert timeline.startup_wait() == pytest.approx(0.4)
    # A wait after the start is not the destination's start-up.
    later = SendTimeline()
    for t in [0.002 * k for k in range(1, 60)] + [0.5 + 0.002 * k for k in range(60)]:
        later(progress_at(t))
    assert later.startup_wait() == pytest.approx(0.0)
    assert SendTimeline().startup_wait() == 0.0


def test_the_sender_rate_is_the_first_rounds_without_the_wait() -> None:
    r = replace(result(1.0, 0.1), rounds=[RoundStats(0, 0.0, 0.5, 0, 0, 0, 0, 100 * MIB, 0, 0)])
    assert measured_sender_rate(r) == pytest.approx(200 * MIB)
    assert measured_sender_rate(r, startup_wait=0.3) == pytest.approx(500 * MIB)
    assert measured_sender_rate(result(1.0, 0.1)) is None  # nothing to measure
    assert measured_sender_rate(r, startup_wait=0.5) is None


def test_compare_puts_measured_against_predicted() -> None:
    p = predict_kvm_run(DEFAULTS)
    rows = compare(p.off, p.on, p)
    assert {(r.figure, r.hints) for r in rows} == {
        (f, h)
        for f in ("transferred", "pages_skipped", "total_time", "downtime", "dirty_sync_count")
        for h in (False, True)
    }
    assert all(r.difference == 0.0 for r in rows)
    assert Comparison("transferred", True, 100.0, 110.0).difference == pytest.approx(0.1)
    assert Comparison("transferred", True, 100.0, 85.0).difference == pytest.approx(-0.15)
    assert Comparison("pages_skipped", False, 0.0, 0.0).difference == 0.0
    assert Comparison("pages_skipped", False, 0.0, 1.0).difference == math.inf
    assert Comparison("downtime", True, 2.0, 1.0).to_dict() == {
        "figure": "downtime",
        "hints": True,
        "measured": 2000.0,  # JSON times are ms
        "predicted": 1000.0,
        "difference": -0.5,
    }
    assert Comparison("pages_skipped", False, 0.0, 1.0).to_dict()["difference"] is None


@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_the_scenario_file_reproduces_the_prediction(
    log_mode: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    params = replace(DEFAULTS, log_mode=log_mode)  # type: ignore[arg-type]
    s = kvm_scenario(params)
    path = tmp_path / "kvm.toml"
    path.write_text(scenario_to_toml(s))
    assert load_scenario(str(path)) == s
    assert main(["simulate", str(path), "--json", "--no-progress"]) == 0
    d = json.loads(capsys.readouterr().out)
    p = predict_kvm_run(params)
    assert d["hints-off"] == p.off.to_dict() and d["hints-on"] == p.on.to_dict()
