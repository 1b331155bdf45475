"""A live KVM migration that does not complete: the destination process killed mid-stream,
the connection closed under the source, the destination lost after stop-and-copy, and a
cancel. In every case the migration says so, the device has sent DONE, and the source guest
runs on with nothing lost: it frees its hinted blocks, keeps working, and checks itself."""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np
import pytest

from helpers import KVM_LAYOUT, KVM_MMIO_BASE, MIB, Booted
from pagehint.device import FreePageHintDevice, HintState, VirtioMmioTransport
from pagehint.kvm import DestinationFailed, DestinationProcess, GuestProgram, KvmSource
from pagehint.kvm.guest_program import HINTED
from pagehint.migration import MigrationResult, Precopy, PrecopyConfig, Progress, WallClockLink
from pagehint.migration.stream import STREAM_WIRE

Fault = Callable[[Precopy, DestinationProcess], None]


def running_source(booted: Booted, log_mode: str) -> tuple[KvmSource, FreePageHintDevice]:
    vm, guest = booted(log_mode)
    device = FreePageHintDevice(vm.ram, vm.memmap)
    device.guest_write = vm.mark_dirty
    transport = VirtioMmioTransport(device)
    vm.add_mmio(KVM_MMIO_BASE, transport.size, transport)
    guest.probe()
    guest.alloc_write(10)
    guest.free(6)
    guest.run(pages_per_step=32, seed=5)
    return KvmSource(vm, guest, transport), device


def migrate_with_fault(
    source: KvmSource, destination: DestinationProcess, fault: Fault, after_steps: int = 8
) -> MigrationResult:
    """Migrates with hints at 64 MiB/s (so the fault lands mid-stream); ``fault`` runs after
    ``after_steps`` send steps."""
    steps = 0
    migration: Precopy

    def progress(_: Progress) -> None:
        nonlocal steps
        steps += 1
        if steps == after_steps:
            fault(migration, destination)

    link = WallClockLink(64 * MIB, wire=STREAM_WIRE)
    config = PrecopyConfig(batch_pages=256)
    migration = Precopy(source, destination, link, config, progress=progress)
    return migration.run()


def assert_source_runs_on_with_nothing_lost(source: KvmSource, device: FreePageHintDevice) -> None:
    guest: GuestProgram = source.guest
    assert source.paused_at is None and guest.vcpu.running
    assert device.state is HintState.DONE  # migration_cleanup's DONE reached the guest's device
    assert guest.in_run
    assert guest.stop_run() > 0  # it kept working after the failure
    guest.poll()  # the guest takes DONE: its hinted blocks are free again
    _, state, _ = guest.blocks()
    assert np.count_nonzero(state == HINTED) == 0
    check = guest.selfcheck()
    assert check.ok, check


def kill_destination(_: Precopy, destination: DestinationProcess) -> None:
    destination.kill()


def close_connection(_: Precopy, destination: DestinationProcess) -> None:
    destination.sock.shutdown(socket.SHUT_RDWR)


def cancel(migration: Precopy, _: DestinationProcess) -> None:
    migration.cancel()


@pytest.mark.parametrize("log_mode", ["classic", "manual", "ring"])
def test_the_destination_process_killed_mid_stream_fails_the_migration_not_the_guest(
    booted: Booted, log_mode: str
) -> None:
    source, device = running_source(booted, log_mode)
    with DestinationProcess(KVM_LAYOUT, mmio_base=KVM_MMIO_BASE) as destination:
        result = migrate_with_fault(source, destination, kill_destination)
        assert result.status == "failed"
        assert result.error is not None and "destination process exited" in result.error
        assert destination.process.returncode is not None
    assert result.hinting and result.pages_hinted > 0
    assert_source_runs_on_with_nothing_lost(source, device)


def test_the_connection_closed_under_the_source_fails_the_migration_and_the_destination(
    booted: Booted,
) -> None:
    source, device = running_source(booted, "manual")
    with DestinationProcess(KVM_LAYOUT, mmio_base=KVM_MMIO_BASE, timeout=20) as destination:
        result = migrate_with_fault(source, destination, close_connection)
        assert result.status == "failed" and result.error is not None
        # The destination saw its stream end inside the migration and says so.
        assert destination.process.wait(20) == 1
    assert_source_runs_on_with_nothing_lost(source, device)


def test_cancel_sends_done_and_the_destination_sees_the_stream_end(booted: Booted) -> None:
    source, device = running_source(booted, "manual")
    with DestinationProcess(KVM_LAYOUT, mmio_base=KVM_MMIO_BASE, timeout=20) as destination:
        result = migrate_with_fault(source, destination, cancel)
        assert result.status == "cancelled" and result.error is None
        assert result.pages_hinted > 0
    assert destination.process.returncode == 1
    assert_source_runs_on_with_nothing_lost(source, device)


def test_the_destination_lost_after_stop_and_copy_leaves_the_source_to_resume(
    booted: Booted,
) -> None:
    """The RAM is all sent and the source paused when the destination dies: the switchover
    fails, and the source resumes, as QEMU's does after a failed completion."""
    source, device = running_source(booted, "classic")
    with DestinationProcess(KVM_LAYOUT, mmio_base=KVM_MMIO_BASE) as destination:
        link = WallClockLink(256 * MIB, wire=STREAM_WIRE)
        result = Precopy(source, destination, link, PrecopyConfig(batch_pages=1024)).run()
        assert result.status == "completed", result.error
        assert source.paused_at is not None
        destination.kill()
        with pytest.raises(DestinationFailed, match="destination process exited"):
            destination.switchover(source)
    source.resume()
    assert_source_runs_on_with_nothing_lost(source, device)
