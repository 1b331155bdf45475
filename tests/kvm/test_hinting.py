"""The test guest hints through virtio-mmio on real KVM: its driver probes the transport,
takes the config change, posts its cmd id and one 4 MiB in-buffer per free block, and the
device clears exactly those blocks in the bitmap; DONE gives them back. Both transport
paths: the device processing on the vCPU thread at QueueNotify, and on a device thread of
its own. Pages the device writes (the used ring) reach the dirty log only because the VMM
marks them: with the marking off, a page that changed is missing from the log."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
import pytest

from helpers import KVM_MMIO_BASE, Booted
from pagehint import DirtyBitmap
from pagehint.device import (
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    FreePageHintDevice,
    HintState,
    VirtioMmioTransport,
)
from pagehint.kvm import GuestProgram, Vm
from pagehint.kvm.guest_program import FREE, HINTED, USED

PAGES_PER_BLOCK = 1024


@contextmanager
def balloon(
    vm: Vm, *, device_thread: bool
) -> Iterator[tuple[FreePageHintDevice, VirtioMmioTransport, DirtyBitmap]]:
    """The balloon on ``vm``: a dirty bitmap (all dirty, as a migration starts), the device
    marking what it writes, and its virtio-mmio window; with ``device_thread`` the queue
    work runs on a thread of its own instead of the vCPU's."""
    bitmap = DirtyBitmap(vm.npages, dirty=True)
    device = FreePageHintDevice(vm.ram, vm.memmap, bitmap, record_ranges=True)
    device.guest_write = vm.mark_dirty
    transport = VirtioMmioTransport(device, process_on_notify=not device_thread)
    vm.add_mmio(KVM_MMIO_BASE, transport.size, transport)
    stop = threading.Event()
    worker = None
    if device_thread:

        def serve() -> None:
            while not stop.is_set():
                if transport.notified.wait(0.05):
                    transport.process_pending()

        worker = threading.Thread(target=serve, name="balloon", daemon=True)
        worker.start()
    try:
        yield device, transport, bitmap
    finally:
        stop.set()
        if worker is not None:
            worker.join(5)


def block_pages(vm: Vm, gpas: npt.NDArray[np.uint64]) -> set[int]:
    out: set[int] = set()
    for gpa in gpas.tolist():
        first = vm.memmap.pfn_of(gpa)
        out.update(range(first, first + PAGES_PER_BLOCK))
    return out


def clean_pages(bitmap: DirtyBitmap) -> set[int]:
    bits = np.unpackbits(bitmap.words().view(np.uint8), bitorder="little")[: len(bitmap)]
    return set(np.flatnonzero(bits == 0).tolist())


def probe(guest: GuestProgram) -> None:
    status = guest.probe()
    assert status & STATUS_DRIVER_OK and status & STATUS_FEATURES_OK, hex(status)


@pytest.mark.parametrize("device_thread", [False, True], ids=["on-notify", "device-thread"])
@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_the_device_clears_exactly_the_blocks_the_guest_hinted(
    booted: Booted, log_mode: str, device_thread: bool
) -> None:
    vm, guest = booted(log_mode)
    with balloon(vm, device_thread=device_thread) as (device, transport, bitmap):
        probe(guest)
        guest.alloc_write(12)
        guest.free(5)  # used blocks, and free ones holding stale data
        _, before, _ = guest.blocks()
        cmd = device.start_hinting()
        assert cmd is not None
        hinted = guest.poll()
        device.process()  # whatever a device thread has not taken yet
        gpas, state, under = guest.blocks()
        # Every block free before the round went to the device, under this round's id.
        assert hinted == int((before == FREE).sum()) > 0
        assert np.array_equal(state == HINTED, before == FREE)
        assert (under[state == HINTED] == cmd).all()
        # The device cleared exactly those blocks' pages, nothing else.
        assert clean_pages(bitmap) == block_pages(vm, gpas[state == HINTED])
        assert device.state is HintState.STOP  # the guest ended its round with STOP
        assert sum(device.rejected.values()) == 0 and device.error is None
        # DONE: the guest gives the hinted blocks back to its allocator.
        device.finish()
        assert guest.poll() == 0
        _, after, _ = guest.blocks()
        assert np.array_equal(after == FREE, before == FREE) and (after == USED).sum() > 0
        assert guest.selfcheck().ok
        assert transport.faults == {}


def test_a_round_stops_at_the_next_sync_and_a_new_id_starts_another(booted: Booted) -> None:
    vm, guest = booted()
    with balloon(vm, device_thread=False) as (device, _, bitmap):
        probe(guest)
        first = device.start_hinting()
        guest.poll()
        device.stop_hinting()  # the migration syncs
        device.finish()
        guest.poll()  # DONE: everything back
        bitmap.set_all()
        second = device.start_hinting()
        assert second == (first or 0) + 1
        assert guest.poll() > 0
        _, state, under = guest.blocks()
        assert (under[state == HINTED] == second).all()


def test_the_shrinker_takes_hinted_blocks_back_and_writes_them(booted: Booted) -> None:
    vm, guest = booted()
    with balloon(vm, device_thread=False) as (device, _, _):
        probe(guest)
        device.start_hinting()
        hinted = guest.poll()
        assert guest.shrink(3) == 3
        _, state, _ = guest.blocks()
        assert (state == HINTED).sum() == hinted - 3
        assert guest.selfcheck().ok  # the taken blocks hold what the guest wrote since


@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_the_log_has_the_guests_writes_and_the_devices_and_needs_the_vmm_for_the_latter(
    booted: Booted, log_mode: str
) -> None:
    vm, guest = booted(log_mode)
    with balloon(vm, device_thread=False) as (device, _, _):
        probe(guest)
        guest.alloc_write(2)
        ring_gpa, ring_bytes = guest.ring_pages()
        ring = set(
            range(vm.memmap.pfn_of(ring_gpa), vm.memmap.pfn_of(ring_gpa + ring_bytes - 1) + 1)
        )

        def changed_but_not_logged() -> set[int]:
            vm.get_dirty_log()
            vm.clear_dirty_log(0, vm.npages)
            before = vm.ram.copy()
            device.start_hinting()
            guest.poll()
            device.stop_hinting()
            device.finish()
            guest.poll()
            log = vm.get_dirty_log()
            vm.clear_dirty_log(0, vm.npages)
            logged = set(
                np.flatnonzero(np.unpackbits(log.view(np.uint8), bitorder="little")).tolist()
            )
            diff = (before != vm.ram).reshape(-1, 4096).any(axis=1)
            return set(np.flatnonzero(diff).tolist()) - logged

        assert changed_but_not_logged() == set()  # the VMM marked the used ring
        vm.mark_device_writes = False  # a VMM that trusts KVM's log alone
        missing = changed_but_not_logged()
        assert missing and missing <= ring  # the used ring changed, and no log says so
