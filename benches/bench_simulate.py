"""B8: the main job, ``pagehint simulate`` on its embedded default scenario (an 8 GiB guest
that ran a 6 GiB memory hog and freed it; 10 Gbit/s, 300 ms): both migrations, hints off and
on, each building its guest, migrating, and running the nothing-lost oracle (target: <= 2 s).

Rows: both runs (what the command does, without printing), and the hints-on run alone
(a limit row: not checked).
"""

from __future__ import annotations

import pytest

from benches.benchutil import Bench, Peer, Settings, check_then_measure
from pagehint.sim import load_scenario, run_scenario

SCENARIO = load_scenario("default")


def both() -> int:
    lost = 0
    for hints in (False, True):
        r = run_scenario(SCENARIO, hints=hints)
        assert r.status == "completed", r.error
        lost += r.lost_pages or 0
    return lost


def hints_on() -> int:
    return run_scenario(SCENARIO, hints=True).lost_pages or 0


@pytest.mark.benchmark(group="B8 pagehint simulate: default scenario (8 GiB), hints off + on")
@pytest.mark.parametrize("impl", ["pagehint", "hints-on-only"])
def bench_simulate(benchmark: Bench, settings: Settings, impl: str) -> None:
    peer = Peer(
        "pagehint simulate: both runs with the oracle"
        if impl == "pagehint"
        else "the hints-on run alone",
        both if impl == "pagehint" else hints_on,
        role="pagehint" if impl == "pagehint" else "limit",
    )
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=peer,
        nbytes=SCENARIO.memory // SCENARIO.page_size // 8,
        expected_result=0,
    )
