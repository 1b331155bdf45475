"""The lost write of QEMU's hinting with a manual-protect dirty log, scheduled on real KVM
(``pagehint.kvm.lost_write``: the guest hints, the device thread is held, the shrinker takes
the newest hinted block back and writes it, then the device applies the hints). The oracle
predicts what is lost, and the guest's self-check on the destination finds exactly that."""

from __future__ import annotations

import shutil

import pytest

from pagehint.kvm import KvmUnavailable
from pagehint.kvm.lost_write import BLOCK_PAGES, LostWriteRun, scheduled_lost_write
from pagehint.migration import Strategy


def run(strategy: Strategy, *, initially_set: bool = True) -> LostWriteRun:
    if shutil.which("gcc") is None or shutil.which("objcopy") is None:
        pytest.skip("building the test guest needs gcc and objcopy")
    try:
        lost_write = scheduled_lost_write(strategy, initially_set=initially_set)
    except KvmUnavailable as e:
        pytest.skip(str(e))
    assert lost_write.result.status == "completed"
    assert lost_write.result.pages_skipped > 0
    return lost_write


def test_qemu_strategy_loses_the_write_behind_the_hint_and_the_guest_finds_it() -> None:
    lost_write = run("qemu")
    # The oracle's prediction: the whole block written behind the hint is stale on the
    # destination; and the guest's own check finds exactly those pages.
    assert lost_write.lost_pages == lost_write.block_pages == BLOCK_PAGES
    assert lost_write.bad_pages == lost_write.lost_pages


def test_safe_strategy_under_the_same_schedule_loses_nothing() -> None:
    lost_write = run("safe")
    assert (lost_write.lost_pages, lost_write.bad_pages) == (0, 0)


def test_without_initially_set_kvm_keeps_a_write_to_a_page_the_last_get_did_not_report() -> None:
    """What KVM does: KVM_CLEAR_DIRTY_LOG clears only the bits the VMM passes, and a VMM
    passes what the last get reported (QEMU's kvm_log_clear_one_slot, and ``Vm``). Without
    INITIALLY_SET, the block the shrinker takes back is the last one hinted, a block never
    written before, so no get reported it: the hint's clear leaves its new bits alone, the
    next sync finds the write, and nothing is lost even under ``qemu``."""
    lost_write = run("qemu", initially_set=False)
    assert (lost_write.lost_pages, lost_write.bad_pages) == (0, 0)
