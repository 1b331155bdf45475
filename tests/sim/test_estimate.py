"""The estimate of a run's cost (``pagehint.sim.estimate``): it says more memory than a run
takes, grows with what costs (pages, rates, rounds, a slow history), and refuses with the
figure and the limit; the machine's limits are read from /proc. ``pagehint simulate``'s
refusals are in tests/cli/test_cli_simulate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

from helpers import GIB
from pagehint.sim import Scenario, WorkloadSpec, load_scenario, shipped_scenarios
from pagehint.sim.estimate import (
    SECONDS_LIMIT,
    MachineLimits,
    estimate_run,
    machine_limits,
)

ROOMY = MachineLimits(
    memory=4 * GIB,
    memory_source="MemAvailable",
    address_space=1 << 47,
    address_space_source="a process's address space",
)


def test_machine_limits_come_from_proc() -> None:
    limits = machine_limits()
    with open("/proc/meminfo") as f:
        assert any(line.startswith("MemAvailable:") for line in f)
    assert limits.memory is not None and limits.memory > 0
    assert 0 < limits.address_space <= 1 << 47
    assert limits.seconds == SECONDS_LIMIT == 3600


@pytest.mark.parametrize("name", sorted(shipped_scenarios()))
def test_shipped_scenarios_fit_a_small_machine(name: str) -> None:
    e = estimate_run(load_scenario(name))
    assert e.refusal(ROOMY) is None
    assert e.memory < 1 * GIB and e.seconds < 60


def test_the_readme_examples_fit_a_small_machine() -> None:
    big = Scenario(memory=1 << 40, workload=WorkloadSpec("idle", {}))
    assert estimate_run(big).refusal(ROOMY) is None
    busy = Scenario(
        memory=64 * GIB,
        workload=WorkloadSpec("steady-writer", {"working_set": "8G", "pages_per_s": 200000}),
    )
    assert estimate_run(busy).refusal(ROOMY) is None


def test_it_grows_with_what_costs() -> None:
    base = Scenario(memory=4 * GIB, workload=WorkloadSpec("idle", {"pages_per_s": 2000}))
    e = estimate_run(base)
    bigger = estimate_run(replace(base, memory=16 * GIB))
    biggest = estimate_run(replace(base, memory=64 * GIB))
    # Linear in the guest's size, beyond what a run costs whatever its size.
    assert biggest.memory - bigger.memory > 3 * (bigger.memory - e.memory) > 0
    assert bigger.pages_sent > 3 * e.pages_sent
    busier = estimate_run(replace(base, workload=WorkloadSpec("idle", {"pages_per_s": 2e6})))
    assert busier.pages_written > 500 * e.pages_written and busier.seconds > e.seconds
    slow = estimate_run(replace(base, link=replace(base.link, bandwidth=1e6)))
    assert slow.simulated_seconds > 1000 * e.simulated_seconds
    assert slow.step_pages > 1000 * e.step_pages
    hog = WorkloadSpec("memory-hog", {"size": "2G", "rate": "1M"})
    history = estimate_run(replace(base, history=(hog,)))
    assert history.steps >= e.steps + 2 * 2048  # a step per simulated second, both runs


def test_refusals_give_the_figure_and_the_limit() -> None:
    huge = estimate_run(Scenario(memory=1 << 50))
    assert huge.refusal(ROOMY) == (
        "the run would need about 256 GiB of memory; this machine has 4 GiB (MemAvailable)"
    )
    space = replace(ROOMY, memory=None, address_space=1 << 40, address_space_source="RLIMIT_AS")
    assert huge.refusal(space) == (
        "the run would map about 1 PiB; this machine allows 1 TiB (RLIMIT_AS)"
    )
    s = load_scenario("default")
    fast_writer = replace(
        s, workload=WorkloadSpec("steady-writer", {"working_set": "1G", "pages_per_s": 1e12})
    )
    message = estimate_run(fast_writer).refusal(ROOMY)
    assert message is not None
    assert message.startswith("the run would need about ")
    assert message.endswith(
        " TiB of memory, 1.08e+11 pages written in one step; this machine has 4 GiB (MemAvailable)"
    )
    slow_hog = replace(s, history=(WorkloadSpec("memory-hog", {"size": "6G", "rate": 1}),))
    assert estimate_run(slow_hog).refusal(ROOMY) == (
        "the runs would take about 7.46 days (6.12e+06 pages sent, 4.02e+04 written, "
        "1.29e+10 steps, 13.2 s simulated); the limit is 1 h"
    )


# The peak resident set of this process (VmHWM: ru_maxrss would carry the parent's over
# from before exec).
MEASURE = """
import json
from pagehint.sim import Scenario, WorkloadSpec, run_scenario
from pagehint.sim.estimate import estimate_run

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

s = Scenario(memory={memory}, workload=WorkloadSpec({kind!r}, {params!r}))
before = peak()
run_scenario(s, hints=False)
run_scenario(s, hints=True)
print(json.dumps({{"grew": peak() - before, "estimate": estimate_run(s).memory}}))
"""


@pytest.mark.parametrize(
    ("memory", "kind", "params"),
    [
        (16 * GIB, "idle", {"pages_per_s": 2000}),
        (4 * GIB, "steady-writer", {"working_set": "2G", "pages_per_s": 2e5}),
        (4 * GIB, "kernel-compile", {}),
    ],
)
def test_the_memory_estimate_is_not_less_than_a_run_takes(
    memory: int, kind: str, params: dict[str, object]
) -> None:
    """Measured in a fresh process: the peak resident set grows by less than the estimate
    (by about half of it, here)."""
    code = textwrap.dedent(MEASURE).format(memory=memory, kind=kind, params=params)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    m = json.loads(out.stdout)
    assert 0 < m["grew"] < m["estimate"]
