"""The lost write of QEMU's free page hinting with a manual-protect dirty log, scheduled on
real KVM so that its order is certain.

The schedule: the migration's set-up sync opens a hint window and sending stops after its
first batch (the kernel's block); the guest hints every free block, and the device thread is
held, so the hints wait in the ring; the guest's shrinker takes the newest hinted block back
and writes it; then the device applies the hints, and sending goes on. Under the ``qemu``
strategy applying a hint clears KVM's dirty log of the chunks it touches
(qemu_guest_free_page_hint), after the write: the write leaves the log, the block's bits left
the migration bitmap with the hint, and the block is never sent. Under ``safe`` the sync
write-protected every page before the window opened, so the write is logged and sent.

KVM clears only the bits the VMM passes, and a VMM passes what its last get reported (QEMU's
kvm_log_clear_one_slot as well as ``Vm.clear_dirty_log``). With KVM_DIRTY_LOG_INITIALLY_SET,
QEMU's default, every page is reported until first cleared, and the write is lost whatever
the block; without it, a block nothing wrote before the sync (as the newest hinted block is
here) keeps its new bits, and nothing is lost.

The guest is small, so the dirty-log clear chunk is one 4 MiB block (QEMU's is 1 GiB): as in
a large guest, the hinted block's chunk is not yet cleared by sending when the hint lands.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pagehint import _core
from pagehint.device import DeviceThread, FreePageHintDevice, HintState, VirtioMmioTransport
from pagehint.kvm.guest_program import FREE, HINTED, MMIO_BASE, USED, GuestProgram
from pagehint.kvm.migrate import DestinationProcess, KvmSource
from pagehint.kvm.vm import Vm
from pagehint.migration import MigrationResult, Precopy, PrecopyConfig, Strategy, WallClockLink
from pagehint.migration.stream import STREAM_WIRE

BLOCK_PAGES = 1024


class ScheduleError(RuntimeError):
    """The schedule could not be set up as described (a step did not happen in time)."""


@dataclass(frozen=True)
class LostWriteRun:
    """One scheduled run: what the oracle and the guest said."""

    strategy: Strategy
    initially_set: bool
    block_gpa: int
    """The block the shrinker took back and wrote behind the hint."""
    block_pages: int
    lost_pages: int
    """The oracle: pages that differ on the destination and that no hint excuses."""
    bad_pages: int
    """The guest's self-check on the destination."""
    result: MigrationResult


class _GatedLink(WallClockLink):
    """A wall-clock link whose first ``transmit`` waits for ``gate``."""

    def __init__(self, bandwidth: float) -> None:
        super().__init__(bandwidth, wire=STREAM_WIRE)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def transmit(self, stream_bytes: int, read_bytes: int, *, running: bool) -> None:
        self.entered.set()
        if not self.gate.wait(60):
            raise ScheduleError("the schedule never let the migration go on")
        super().transmit(stream_bytes, read_bytes, running=running)


def _wait_for(what: str, condition: Callable[[], bool]) -> None:
    end = time.monotonic() + 30
    while not condition():
        if time.monotonic() > end:
            raise ScheduleError(f"{what} did not happen within 30 s")
        time.sleep(0.005)


def scheduled_lost_write(
    strategy: Strategy,
    *,
    initially_set: bool = True,
    memmap: _core.MemoryMap | None = None,
    blocks_written: int = 10,
    blocks_freed: int = 6,
    bandwidth: float = 256 << 20,
) -> LostWriteRun:
    """Runs the schedule once on a fresh VM (manual-protect log) and migrates to a destination
    process. ``KvmUnavailable`` / ``GuestBuildError`` if the machine cannot."""
    memmap = memmap or _core.MemoryMap([(0, 64 << 20), (4 << 30, 64 << 20)])
    with Vm(memmap, log_mode="manual", initially_set=initially_set) as vm:
        guest = GuestProgram(vm, mmio_base=MMIO_BASE, timeout=60)
        guest.start()
        device = FreePageHintDevice(vm.ram, memmap)
        device.guest_write = vm.mark_dirty
        transport = VirtioMmioTransport(device, process_on_notify=False)
        vm.add_mmio(MMIO_BASE, transport.size, transport)
        device_thread = DeviceThread(transport)
        device_thread.start()
        try:
            guest.probe()
            guest.alloc_write(blocks_written)
            guest.free(blocks_freed)
            source = KvmSource(vm, guest, transport, device_thread=device_thread)
            link = _GatedLink(bandwidth)
            config = PrecopyConfig(
                strategy=strategy, batch_pages=BLOCK_PAGES, clear_chunk_pages=BLOCK_PAGES
            )
            with DestinationProcess(memmap, mmio_base=MMIO_BASE) as destination:
                migration = Precopy(source, destination, link, config)
                done: list[MigrationResult] = []
                runner = threading.Thread(target=lambda: done.append(migration.run()))
                runner.start()
                try:
                    block_gpa = _schedule(guest, device, device_thread, link)
                finally:
                    link.gate.set()
                    runner.join(120)
                if not done:
                    raise ScheduleError("the migration did not end within 120 s")
                (result,) = done
                if result.status != "completed":
                    raise ScheduleError(f"the migration {result.status}: {result.error}")
                moved = destination.switchover(source)
        finally:
            device_thread.stop()
    return LostWriteRun(
        strategy=strategy,
        initially_set=initially_set,
        block_gpa=block_gpa,
        block_pages=BLOCK_PAGES,
        lost_pages=moved.lost_pages,
        bad_pages=moved.report.bad_pages,
        result=result,
    )


def _schedule(
    guest: GuestProgram, device: FreePageHintDevice, device_thread: DeviceThread, link: _GatedLink
) -> int:
    """The guest hints, the device waits, the shrinker writes, the device applies: returns
    the gpa of the block written behind the hint."""
    _wait_for("the migration's first batch", link.entered.is_set)
    if device.state is not HintState.REQUESTED:
        raise ScheduleError(f"the sync left the device in {device.state}, not REQUESTED")
    device_thread.hold()
    _, state, _ = guest.blocks()
    free = int(np.count_nonzero(state == FREE))
    if guest.poll() != free or device.pages_hinted_total:
        raise ScheduleError("the guest did not hint every free block, or the device ran")
    before = guest.blocks()[1]
    if guest.shrink(1) != 1:
        raise ScheduleError("the shrinker took no block back")
    gpas, after, _ = guest.blocks()
    taken = np.flatnonzero((before == HINTED) & (after == USED))
    if len(taken) != 1:
        raise ScheduleError("the shrinker did not take exactly one hinted block")
    device_thread.release()
    _wait_for(
        "the device applying the hints", lambda: device.pages_hinted_total == free * BLOCK_PAGES
    )
    return int(gpas[taken[0]])
