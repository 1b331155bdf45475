"""The VMM on real KVM with the test guest: boot in long mode across two memslots, commands
over port I/O, pause and resume, and the dirty log in classic and manual-protect mode
reporting exactly what the guest wrote, plus what the VMM wrote itself."""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt
import pytest

from helpers import KVM_LAYOUT as LAYOUT
from helpers import Booted
from pagehint import DirtyBitmap
from pagehint.kvm.guest_program import AP_AREA_GPA, AP_PAGES, USED
from pagehint.kvm.vm import Vm

PAGES_PER_BLOCK = 1024
KERNEL_PAGES = 1024  # the first 4 MiB: code, stack, page tables, the guest's state


def pages_of(words: npt.NDArray[np.uint64]) -> set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits).tolist())


def block_pages(vm: Vm, gpas: npt.NDArray[np.uint64]) -> set[int]:
    out: set[int] = set()
    for gpa in gpas.tolist():
        first = vm.memmap.pfn_of(gpa)
        out.update(range(first, first + PAGES_PER_BLOCK))
    return out


def test_the_guest_boots_in_long_mode_and_answers(booted: Booted) -> None:
    _vm, guest = booted()
    assert guest.ping(41) == 42
    info = guest.boot_info()
    # Two regions of 64 MiB: 16 blocks each, the first of them the kernel's.
    assert info.nblocks == 32 and info.npages == LAYOUT.npages
    gpas, state, _ = guest.blocks()
    assert gpas[16] == 4 << 30 and state[0] == USED and (state[1:] != USED).all()
    assert guest.selfcheck().ok
    sregs = guest.vcpu.get_sregs()
    assert sregs.efer & (1 << 10) and sregs.cs.l == 1  # LMA, a 64-bit code segment


def test_blocks_written_on_both_sides_of_the_hole_verify(booted: Booted) -> None:
    vm, guest = booted()
    assert guest.alloc_write(20) == 20  # past the hole into the high memslot
    assert guest.write_pages(500, seed=3) == 500
    assert guest.selfcheck().ok
    # Corrupt one written page behind the guest's back: its self-check finds exactly it.
    gpas, state, _ = guest.blocks()
    victim = int(gpas[np.flatnonzero(state == USED)[-1]]) + 5 * 4096
    vm.ram[vm.ram_offset(victim)] ^= 0xFF
    assert guest.selfcheck().bad_pages == 1


@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_the_log_reports_exactly_the_blocks_the_guest_wrote(booted: Booted, log_mode: str) -> None:
    vm, guest = booted(log_mode)
    guest.alloc_write(2)
    vm.get_dirty_log()
    vm.clear_dirty_log(0, vm.npages)
    before = guest.blocks()[1].copy()
    guest.alloc_write(6)
    gpas, state, _ = guest.blocks()
    new = block_pages(vm, gpas[(state == USED) & (before != USED)])
    got = pages_of(vm.get_dirty_log())
    assert len(new) == 6 * PAGES_PER_BLOCK
    # Outside the kernel, exactly the new blocks; inside, only the guest's own bookkeeping.
    assert {p for p in got if p >= KERNEL_PAGES} == new
    assert {p for p in got if p < KERNEL_PAGES} <= set(range(KERNEL_PAGES))
    # Nothing new: an empty log (classic re-protected on get, manual by the clear).
    vm.clear_dirty_log(0, vm.npages)
    guest.ping(1)
    assert {p for p in pages_of(vm.get_dirty_log()) if p >= KERNEL_PAGES} == set()


def test_manual_protect_loses_a_write_cleared_late_and_keeps_it_cleared_early(
    booted: Booted,
) -> None:
    vm, guest = booted("manual")
    guest.alloc_write(1)
    gpas, state, _ = guest.blocks()
    block = int(gpas[np.flatnonzero(state == USED)[-1]])
    pages = block_pages(vm, np.array([block], dtype=np.uint64))
    # QEMU's order: get, the guest writes again, then the clear of what the get reported.
    assert pages <= pages_of(vm.get_dirty_log())
    guest.write_pages(2000, seed=1)  # rewrites pages of this block (the only one in use)
    vm.clear_dirty_log(0, vm.npages)
    late = pages_of(vm.get_dirty_log())
    assert not (late & pages), "a write after the get survived a late clear"
    # The safe order: clear right after the get; the write after it is logged.
    vm.clear_dirty_log(0, vm.npages)
    guest.write_pages(2000, seed=1)
    early = pages_of(vm.get_dirty_log())
    assert early & pages


def test_the_vmm_marks_what_it_writes_itself(booted: Booted) -> None:
    vm, _guest = booted()
    vm.get_dirty_log()
    target = (4 << 30) + 10 * 4096
    vm.write(target, b"device wrote this")
    assert vm.memmap.pfn_of(target) in pages_of(vm.get_dirty_log())
    vm.mark_device_writes = False  # a VMM that forgets: KVM never sees the write
    vm.write(target, b"and this")
    assert vm.memmap.pfn_of(target) not in pages_of(vm.get_dirty_log())


def test_pause_completes_the_pending_in_and_resume_goes_on(booted: Booted) -> None:
    _vm, guest = booted()
    guest.ping(0)
    for _ in range(3):
        guest.vcpu.pause()
        regs = guest.vcpu.get_regs()
        assert regs.rip >= 0x100000  # in the guest's code, the IN behind it
        guest.vcpu.resume()
        assert guest.ping(7) == 8
    assert guest.vcpu.error is None


def test_a_guest_that_runs_off_shuts_down_cleanly(booted: Booted) -> None:
    _vm, guest = booted()
    guest.ping(0)
    guest.vcpu.pause()
    sregs = guest.vcpu.get_sregs()
    sregs.cr3 = 0x0  # page tables of zeros: the next fetch faults; no IDT: a triple fault
    guest.vcpu.set_sregs(sregs)
    guest.vcpu.resume()
    guest.vcpu.join(10)
    assert not guest.vcpu.running
    assert guest.vcpu.error is not None and "shutdown" in guest.vcpu.error, guest.vcpu.error


def test_dirty_bitmap_merges_the_kvm_log_at_slot_offsets(booted: Booted) -> None:
    vm, guest = booted()
    bitmap = DirtyBitmap(vm.npages)
    bitmap.merge_log(vm.get_dirty_log())
    guest.alloc_write(20)
    new = bitmap.merge_log(vm.get_dirty_log())
    assert new >= 20 * PAGES_PER_BLOCK
    high = vm.slots[1]
    assert bitmap.count(high.first_page, high.npages) > 0  # the high memslot landed there


def test_the_ring_reaper_keeps_up_with_a_guest_that_logs_every_store(booted: Booted) -> None:
    vm, guest = booted("ring")
    vm.get_dirty_log()
    guest.alloc_write(20)  # about 3 stores per page: 60,000 ring entries, most of a 65,536 ring
    got = pages_of(vm.get_dirty_log())
    gpas, state, _ = guest.blocks()
    assert block_pages(vm, gpas[state == USED][1:]) <= got  # every written block
    assert len(got) < vm.npages  # and not "everything": no overrun made it report all
    assert guest.vcpu.ring_overflows == 0 and vm.reaper_error is None


@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_two_vcpus_write_at_once_and_the_log_has_both(booted: Booted, log_mode: str) -> None:
    vm, guest = booted(log_mode, vcpus=2)
    guest.start_ap()
    guest.ping(0)
    vm.get_dirty_log()
    vm.clear_dirty_log(0, vm.npages)
    guest.ap_write(AP_PAGES * 50, round_=7, wait=False)  # the second vCPU writes meanwhile
    guest.alloc_write(4)
    assert guest.ap_wait() == AP_PAGES * 50
    got = pages_of(vm.get_dirty_log())
    ap_first = vm.memmap.pfn_of(AP_AREA_GPA)
    assert set(range(ap_first, ap_first + AP_PAGES)) <= got
    gpas, state, _ = guest.blocks()
    assert block_pages(vm, gpas[state == USED][1:]) <= got
    stamped = np.frombuffer(
        vm.ram, dtype=np.uint64, count=AP_PAGES * 512, offset=vm.ram_offset(AP_AREA_GPA)
    )[::512]
    assert (stamped == 7).all()
    for vcpu in vm.vcpus:  # both pause with their I/O completed, and go on
        vcpu.pause()
    for vcpu in vm.vcpus:
        vcpu.resume()
    guest.ap_write(AP_PAGES, round_=8)
    assert guest.ping(1) == 2
    guest.ap_halt()
    assert vm.vcpus[1].halted and vm.vcpus[0].error is None


def test_pause_interrupts_a_guest_that_makes_no_exits(booted: Booted) -> None:
    _, guest = booted()
    guest.ping(0)
    guest._commands.put((1, (24,)))  # alloc_write(24): about half a second without one exit
    time.sleep(0.05)
    guest.vcpu.pause()  # a signal takes KVM_RUN out of the guest's loop
    # Paused inside the loop: its result (an OUT exit at the end) has not come yet.
    assert guest._results.empty()
    rip = guest.vcpu.get_regs().rip
    guest.vcpu.resume()
    assert guest._results.get(timeout=60) == 24  # the command finishes after the resume
    assert guest.selfcheck().ok
    assert 0x100000 <= rip < 0x200000
