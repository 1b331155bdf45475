"""A live pre-copy migration of the running KVM guest on the wall clock, to a destination VM
in a second process fed over a Unix socket: the guest's vCPU keeps writing and hinting while
the loop syncs and sends, stop-and-copy stops it wherever it is, and after the switchover the
copy checks every page it holds. Nothing may differ but pages of blocks hinted since their
last write (the oracle, from the destination's page digests). The balloon's state moves with
it: the copy takes DONE and hints again."""

from __future__ import annotations

import pytest

from helpers import KVM_LAYOUT, KVM_MMIO_BASE, MIB, Booted
from pagehint.device import FreePageHintDevice, HintState, VirtioMmioTransport
from pagehint.kvm import DestinationProcess, GuestProgram, KvmSource, Vm
from pagehint.migration import Precopy, PrecopyConfig, WallClockLink
from pagehint.migration.stream import STREAM_WIRE


def attach_balloon(vm: Vm, guest: GuestProgram) -> VirtioMmioTransport:
    device = FreePageHintDevice(vm.ram, vm.memmap)
    device.guest_write = vm.mark_dirty
    transport = VirtioMmioTransport(device)
    vm.add_mmio(KVM_MMIO_BASE, transport.size, transport)
    guest.probe()
    return transport


@pytest.mark.parametrize("seed", [3, 11])
@pytest.mark.parametrize("hints", [False, True], ids=["hints-off", "hints-on"])
@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_the_running_guest_migrates_to_another_process_and_its_copy_checks_itself(
    booted: Booted, log_mode: str, hints: bool, seed: int
) -> None:
    vm, guest = booted(log_mode)
    transport = attach_balloon(vm, guest)
    guest.alloc_write(10)
    guest.free(6)  # stale data in free blocks: what hints save sending
    guest.run(pages_per_step=32, seed=seed)
    source = KvmSource(vm, guest, transport)
    with DestinationProcess(KVM_LAYOUT, mmio_base=KVM_MMIO_BASE, timeout=60) as destination:
        link = WallClockLink(256 * MIB, wire=STREAM_WIRE)
        config = PrecopyConfig(max_downtime=0.3, hints=hints, batch_pages=1024)
        result = Precopy(source, destination, link, config).run()
        assert result.status == "completed", result.error
        assert result.dirty_sync_count >= 3 and result.remaining == 0
        # ram.transferred is what went over the socket in PAGES records.
        assert result.transferred == destination.page_bytes_sent > 0
        assert destination.pages_sent == result.normal + result.duplicate
        moved = destination.switchover(source)
        # The oracle (the source paused, the destination's digests taken before its guest
        # ran): a page may differ only if its block was hinted and not written since.
        assert moved.lost_pages == 0
        report = moved.report
        assert report.pages_received == destination.pages_sent
        assert report.bytes_received == destination.bytes_sent
        assert report.steps > 0  # the run the source started ends on the destination
        assert report.bad_pages == 0 and report.bad_state == 0, report
        # The balloon moved too: the copy takes DONE (with hints), no block stays hinted,
        # and a new round on the destination's device hints every free block.
        assert report.hint_state == (HintState.DONE if hints else HintState.STOP).value
        assert report.hinted_after_done == 0
        assert report.rehinted == report.free_blocks > 0
        assert report.check_after_rehint_ok and report.ok
        assert 0 < moved.downtime < 5
        if hints:
            assert result.hinting and result.pages_skipped > 0
        else:
            assert result.pages_skipped == 0
