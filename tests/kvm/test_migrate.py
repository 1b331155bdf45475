"""A live pre-copy migration of the running KVM guest on the wall clock: its vCPU keeps
writing and hinting while the loop syncs and sends, and after stop-and-copy the copy on a
second VM checks every page it holds. Nothing may differ but pages of blocks hinted since
their last write. The balloon's state moves with it: the copy takes DONE and hints again."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import KVM_LAYOUT, KVM_MMIO_BASE, MIB, Booted
from pagehint.device import FreePageHintDevice, HintState, VirtioMmioTransport
from pagehint.kvm.guest_program import FREE, HINTED
from pagehint.kvm.migrate import KvmDestination, KvmSource
from pagehint.migration import Precopy, PrecopyConfig, WallClockLink


@pytest.mark.parametrize("hints", [False, True], ids=["hints-off", "hints-on"])
@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_the_running_guest_migrates_and_its_copy_checks_itself(
    booted: Booted, log_mode: str, hints: bool
) -> None:
    vm, guest = booted(log_mode)
    device = FreePageHintDevice(vm.ram, vm.memmap)
    device.guest_write = vm.mark_dirty
    transport = VirtioMmioTransport(device)
    vm.add_mmio(KVM_MMIO_BASE, transport.size, transport)
    guest.probe()
    guest.alloc_write(10)
    guest.free(6)  # stale data in free blocks: what hints save sending
    guest.run(pages_per_step=32, seed=3)
    source = KvmSource(vm, guest, transport)
    destination = KvmDestination(KVM_LAYOUT, mmio_base=KVM_MMIO_BASE)
    try:
        link = WallClockLink(256 * MIB)
        config = PrecopyConfig(max_downtime=0.3, hints=hints, batch_pages=1024)
        result = Precopy(source, destination, link, config).run()
        assert result.status == "completed", result.error
        assert result.dirty_sync_count >= 3 and result.remaining == 0
        # The oracle, before the copy runs: a page may differ only if its block was hinted
        # (and not written since).
        assert source.lost_pages(destination) == 0
        if not hints:
            assert np.array_equal(vm.ram, destination.vm.ram)
        copy = destination.resume(source)
        steps = copy.collect()  # the run the source started ends on the destination
        assert steps > 0
        check = copy.selfcheck()
        assert check.ok, check
        # The balloon moved too: the copy takes the DONE the migration sent (with hints),
        # frees its hinted blocks, and hints again on the destination's device.
        assert destination.transport is not None
        moved = destination.transport.device
        assert moved.state is (HintState.DONE if hints else HintState.STOP)
        assert copy.poll() == 0
        _, after, _ = copy.blocks()
        assert (after == HINTED).sum() == 0
        assert moved.start_hinting() == device.cmd_id + 1
        assert copy.poll() == int((after == FREE).sum()) > 0
        assert copy.selfcheck().ok
        if hints:
            assert result.hinting and result.pages_skipped > 0
    finally:
        destination.close()
