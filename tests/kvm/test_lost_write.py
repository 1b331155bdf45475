"""The lost write of QEMU's hinting with a manual-protect dirty log, scheduled on real KVM.

After a sync, the guest hints its free blocks; the device thread is held, so the hints wait in
the ring. The guest's shrinker takes the newest hinted block back and writes it. Then the
device applies the hints. Under the ``qemu`` strategy applying a hint clears KVM's dirty log
of the chunks it touches (qemu_guest_free_page_hint), and that clear comes after the write:
the write leaves the log, the block's bits left the migration bitmap with the hint, and the
block is never sent. The oracle predicts it, and the guest's self-check on the destination
finds exactly those pages. Under ``safe`` the sync write-protects every page before the hint
window opens, so the write is logged and the next sync sends the block.

The guest is 128 MiB, far smaller than QEMU's 1 GiB clear chunk; the chunk is one 4 MiB block
here, so that (as in a large guest) the hinted block's chunk is not yet cleared by sending
when the hint lands. Sending stops after the first batch (the kernel's block) until the
schedule is done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from helpers import KVM_LAYOUT, KVM_MMIO_BASE, MIB, Booted
from pagehint.device import DeviceThread, FreePageHintDevice, HintState, VirtioMmioTransport
from pagehint.kvm import DestinationProcess, KvmSource
from pagehint.kvm.guest_program import FREE, HINTED
from pagehint.migration import MigrationResult, Precopy, PrecopyConfig, WallClockLink
from pagehint.migration.stream import STREAM_WIRE

BLOCK_PAGES = 1024


class GatedLink(WallClockLink):
    """A wall-clock link whose first ``transmit`` waits for ``gate``: the migration stops
    after its first batch (the set-up sync done, the hint window open) until the test's
    schedule has run."""

    def __init__(self) -> None:
        super().__init__(256 * MIB, wire=STREAM_WIRE)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def transmit(self, stream_bytes: int, read_bytes: int, *, running: bool) -> None:
        self.entered.set()
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        super().transmit(stream_bytes, read_bytes, running=running)


def scheduled_lost_write(
    booted: Booted, strategy: str, *, initially_set: bool = True
) -> tuple[int, int, MigrationResult]:
    """Runs the schedule; returns the oracle's lost pages, the copy's bad pages and the
    migration's result."""
    vm, guest = booted("manual", initially_set=initially_set)
    device = FreePageHintDevice(vm.ram, vm.memmap)
    device.guest_write = vm.mark_dirty
    transport = VirtioMmioTransport(device, process_on_notify=False)
    vm.add_mmio(KVM_MMIO_BASE, transport.size, transport)
    device_thread = DeviceThread(transport)
    device_thread.start()
    try:
        guest.probe()
        guest.alloc_write(10)
        guest.free(6)
        source = KvmSource(vm, guest, transport, device_thread=device_thread)
        link = GatedLink()
        config = PrecopyConfig(
            strategy=strategy,  # type: ignore[arg-type]
            batch_pages=BLOCK_PAGES,
            clear_chunk_pages=BLOCK_PAGES,
        )
        with DestinationProcess(KVM_LAYOUT, mmio_base=KVM_MMIO_BASE) as destination:
            migration = Precopy(source, destination, link, config)
            done: list[MigrationResult] = []
            runner = threading.Thread(target=lambda: done.append(migration.run()))
            runner.start()
            try:
                assert link.entered.wait(30), "the migration never sent its first batch"
                assert device.state is HintState.REQUESTED  # the sync asked for hints
                device_thread.hold()
                _, state, _ = guest.blocks()
                free = int(np.count_nonzero(state == FREE))
                assert guest.poll() == free  # the hints wait in the ring
                assert device.pages_hinted_total == 0
                assert guest.shrink(1) == 1  # taken back and written, behind the hints
                _, state, _ = guest.blocks()
                assert np.count_nonzero(state == HINTED) == free - 1
                device_thread.release()
                wait_for(lambda: device.pages_hinted_total == free * BLOCK_PAGES)
            finally:
                link.gate.set()
                runner.join(120)
            (result,) = done
            assert result.status == "completed", result.error
            moved = destination.switchover(source)
            assert moved.report.bad_state == 0
            return moved.lost_pages, moved.report.bad_pages, result
    finally:
        device_thread.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the device never applied the hints")
        time.sleep(0.005)


def test_qemu_strategy_loses_the_write_behind_the_hint_and_the_guest_finds_it(
    booted: Booted,
) -> None:
    lost, bad, result = scheduled_lost_write(booted, "qemu")
    assert result.pages_skipped > 0
    # The oracle's prediction: the whole block written behind the hint is stale on the
    # destination; and the guest's own check finds exactly those pages.
    assert lost == BLOCK_PAGES
    assert bad == lost


def test_safe_strategy_under_the_same_schedule_loses_nothing(booted: Booted) -> None:
    lost, bad, result = scheduled_lost_write(booted, "safe")
    assert result.pages_skipped > 0
    assert (lost, bad) == (0, 0)


def test_without_initially_set_kvm_keeps_a_write_to_a_page_the_last_get_did_not_report(
    booted: Booted,
) -> None:
    """What KVM does: KVM_CLEAR_DIRTY_LOG clears only the bits the VMM passes, and a VMM
    passes what the last get reported (QEMU's kvm_log_clear_one_slot, and ``Vm``). Without
    INITIALLY_SET, the block the shrinker takes back is the last one hinted, a block never
    written before, so no get reported it: the hint's clear leaves its new bits alone, the
    next sync finds the write, and nothing is lost even under ``qemu``. With INITIALLY_SET
    (QEMU's default) every page is reported until first cleared, and the write is lost."""
    lost, bad, result = scheduled_lost_write(booted, "qemu", initially_set=False)
    assert result.pages_skipped > 0
    assert (lost, bad) == (0, 0)
