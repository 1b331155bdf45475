"""Scenarios as files: ``scenario_to_toml`` writes what ``load_scenario`` reads back equal, for
every shipped scenario and for the keys the KVM model needs (the RAM below 4 GiB, the block
size, the boot blocks' data, the free list's order, the write-free and used-writer
workloads, the stream's batch header, the wait for the destination); ``pagehint simulate FILE``
runs the file."""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import GIB, MIB
from pagehint.cli import main
from pagehint.migration import PrecopyConfig, WireFormat
from pagehint.sim import (
    Scenario,
    ScenarioError,
    UsedWriter,
    WorkloadSpec,
    WriteFree,
    load_scenario,
    run_scenario,
    scenario_from_dict,
    scenario_to_dict,
    scenario_to_toml,
    shipped_scenarios,
)


def round_trip(s: Scenario) -> Scenario:
    return scenario_from_dict(tomllib.loads(scenario_to_toml(s)), name="ignored")


@pytest.mark.parametrize("name", sorted(shipped_scenarios()))
def test_every_shipped_scenario_round_trips(name: str) -> None:
    s = load_scenario(name)
    assert round_trip(s) == s
    assert scenario_from_dict(scenario_to_dict(s)) == s


TWO_SLOTS = """
name = "two-slots"
description = "the KVM test guest's shape"

[guest]
memory = "256M"
below_4g = "128M"
block_bytes = "4M"
used = 0.015625
used_data = 0.0625
free_order = "address"
init_on_alloc = false

[[history]]
kind = "write-free"
write = "200M"
free = "160M"

[workload]
kind = "used-writer"
pages_per_s = 12800
kernel_pages = 13

[link]
bandwidth = "512MiB"
batch_pages = 256
zero_page_bytes = 0
batch_header_bytes = 8
startup_wait = "300ms"
startup_buffer = "208K"
"""


def test_the_kvm_guests_keys_are_read() -> None:
    s = scenario_from_dict(tomllib.loads(TWO_SLOTS))
    assert s.memmap().regions == [(0, 128 * MIB), (4 * GIB, 128 * MIB)]
    assert (s.block_bytes, s.used_data, s.free_order) == (4 * MIB, 0.0625, "address")
    assert s.link.wire == WireFormat(page_header_bytes=8, zero_page_bytes=0, batch_header_bytes=8)
    assert (s.link.startup_wait, s.link.startup_buffer) == (0.3, 212992)
    (history,) = s.history
    hist = history.build()
    assert isinstance(hist, WriteFree) and (hist.write_bytes, hist.free_bytes) == (
        200 * MIB,
        160 * MIB,
    )
    writer = s.workload.build()
    assert isinstance(writer, UsedWriter)
    assert (writer.pages_per_s, writer.kernel_pages) == (12800.0, 13)
    assert round_trip(s) == s


def test_without_below_4g_the_x86_layout_is_qemus() -> None:
    s = Scenario(memory=4 * GIB)
    assert s.memmap().regions == [(0, 2 * GIB), (4 * GIB, 2 * GIB)]
    assert replace(s, below_4g=1 * GIB).memmap().regions == [(0, GIB), (4 * GIB, 3 * GIB)]


@pytest.mark.parametrize(
    "kind, params, message",
    [
        ("write-free", {}, r"^\[workload\] write: missing \(required\)$"),
        ("write-free", {"write": "4M", "free": "8M"}, r"^\[workload\] free: 8388608 bytes is more"),
        ("write-free", {"write": "4M", "size": "4M"}, r"^\[workload\] size: unknown key \(this"),
        ("used-writer", {}, r"^\[workload\] pages_per_s: missing"),
        ("used-writer", {"pages_per_s": 1, "rate": 2}, r"^\[workload\] rate: unknown key"),
        ("used-writer", {"pages_per_s": "1"}, r"pages_per_s: must be a number, not '1'"),
        ("used-writer", {"pages_per_s": 1, "kernel_pages": 1.0}, r"must be an integer, not 1.0"),
        ("nope", {}, r"^\[workload\]: kind 'nope' is not a workload: one of idle, memory-hog"),
    ],
)
def test_bad_workload_parameters(kind: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkloadSpec(kind, params).build()


def test_strings_that_need_escapes_round_trip() -> None:
    s = Scenario(
        name="odd",
        description='quotes " and \\ backslash,\nnewline, tab\t, DEL \x7f, unicode µs ✓',
        published={"source": "a [bracketed] paper", "total_time_off_ms": 10, "speedup": 1.5},
    )
    assert round_trip(s) == s


def test_what_a_file_cannot_say_is_refused() -> None:
    with pytest.raises(ValueError, match="clear_chunk_pages"):
        scenario_to_toml(Scenario(precopy=PrecopyConfig(clear_chunk_pages=64)))
    # Nor can a scenario hold it: a table inside [published] is refused when it is made.
    with pytest.raises(ScenarioError, match=r"^scenario custom: \[published\] nested: must be a"):
        Scenario(published={"nested": {"a": 1}})


def test_simulate_runs_a_written_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    s = scenario_from_dict(tomllib.loads(TWO_SLOTS))
    path = tmp_path / "two-slots.toml"
    path.write_text(scenario_to_toml(s))
    assert main(["simulate", str(path), "--json", "--no-progress"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key, hints in (("hints-off", False), ("hints-on", True)):
        assert d[key] == run_scenario(s, hints=hints).to_dict()
    assert d["hints-on"]["pages-skipped"] == 53 * 1024
