"""The simulated dirty log (``pagehint.sim.DirtyLog``) and real KVM report the same pages for
the same sequences of guest writes, gets and clears, in all three log modes: what the
simulator's migrations assume of KVM is what KVM does. (tests/sim/test_kvm_dirty_log.py checks
classic and manual with a minimal real-mode harness; this runs the long-mode test guest.)"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from helpers import Booted
from pagehint.kvm import GuestProgram, Vm
from pagehint.sim import DirtyLog

KERNEL_PAGES = 1024

# Pages of the high memslot: A and B share a 64-page chunk, C is in another.
Step = tuple[str, int]


def high(vm: Vm, page: int) -> int:
    return vm.slots[1].gpa + page * 4096


SEQUENCES: dict[str, list[Step]] = {
    "write-get-write-get": [("write", 70), ("get", 0), ("write", 100), ("get", 0), ("get", 0)],
    "rewrite-after-get": [("write", 70), ("get", 0), ("write", 70), ("get", 0)],
    "late-clear-loses-a-rewrite": [
        ("write", 70),
        ("get", 0),
        ("write", 70),
        ("clear", 64),
        ("get", 0),
    ],
    "early-clear-keeps-it": [
        ("write", 70),
        ("get", 0),
        ("clear", 64),
        ("write", 70),
        ("get", 0),
    ],
    "clear-keeps-a-page-first-written-after-the-get": [
        ("write", 70),
        ("get", 0),
        ("write", 100),
        ("clear", 64),
        ("get", 0),
    ],
    "chunks-apart": [("write", 70), ("write", 300), ("get", 0), ("clear", 256), ("get", 0)],
}


def pages(words: npt.NDArray[np.uint64]) -> set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return {int(p) for p in np.flatnonzero(bits) if p >= KERNEL_PAGES}


def play(vm: Vm, guest: GuestProgram, sim: DirtyLog, steps: list[Step]) -> list[set[int]]:
    """Runs ``steps`` on both; returns each get's pages as (real, simulated) pairs' lists."""
    real: list[set[int]] = []
    simulated: list[set[int]] = []
    base = vm.slots[1].first_page
    for op, arg in steps:
        if op == "write":
            guest.write_at(high(vm, arg), 1)
            sim.record(np.array([base + arg], np.uint64), np.array([1], np.uint64))
        elif op == "get":
            real.append(pages(vm.get_dirty_log()))
            simulated.append(pages(sim.get()))
        elif op == "clear" and vm.log_mode == "manual":
            vm.clear_dirty_log(base + arg, 64)
            sim.clear(base + arg, 64)
    assert real == simulated
    return real


@pytest.mark.parametrize("name", sorted(SEQUENCES))
@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_kvm_and_the_simulated_log_agree(booted: Booted, log_mode: str, name: str) -> None:
    vm, guest = booted(log_mode)
    guest.ping(0)
    sim = DirtyLog(vm.npages, log_mode)  # type: ignore[arg-type]
    vm.get_dirty_log()  # boot's pages: both logs start empty
    vm.clear_dirty_log(0, vm.npages)
    gets = play(vm, guest, sim, SEQUENCES[name])
    assert gets, "a sequence without a get checks nothing"


def test_the_sequences_say_what_design_section_5_says(booted: Booted) -> None:
    """The manual-mode results themselves (not only their agreement): QEMU's late clear loses
    the rewrite, the safe order keeps it."""
    vm, guest = booted("manual")
    base = vm.slots[1].first_page
    sim = DirtyLog(vm.npages, "manual")
    vm.get_dirty_log()
    vm.clear_dirty_log(0, vm.npages)
    late = play(vm, guest, sim, SEQUENCES["late-clear-loses-a-rewrite"])
    assert late == [{base + 70}, set()]
    early = play(vm, guest, sim, SEQUENCES["early-clear-keeps-it"])
    assert early == [{base + 70}, {base + 70}]
