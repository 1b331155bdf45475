"""What the test packages share: sizes, array builders, and the rigs that wire a simulated
guest to a device and migrate it. Plain functions, importable from any test file (pytest puts
``tests/`` on the path, see ``pyproject.toml``); fixtures live in ``conftest.py``."""

from __future__ import annotations

import argparse
import struct
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import FreePageHintDevice, HintState, VirtioMmioTransport
from pagehint.kvm import GuestProgram, Vm
from pagehint.kvm.guest_program import MMIO_BASE
from pagehint.migration import MigrationResult, Precopy, PrecopyConfig, Progress
from pagehint.sim import (
    LinkModel,
    SimulatedDestination,
    SimulatedGuest,
    SimulatedLink,
    SimulatedSource,
)

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096

U64Array = npt.NDArray[np.uint64]
I64Array = npt.NDArray[np.int64]


def u64(values: Iterable[int]) -> U64Array:
    """A ``uint64`` array."""
    return np.array(list(values), dtype=np.uint64)


def i64(values: Iterable[int]) -> I64Array:
    """An ``int64`` array (page numbers, block numbers)."""
    return np.array(list(values), dtype=np.int64)


def attached_guest(
    memmap: MemoryMap,
    *,
    bitmap: DirtyBitmap | None = None,
    device_kw: dict[str, Any] | None = None,
    **guest_kw: Any,
) -> tuple[SimulatedGuest, FreePageHintDevice]:
    """A simulated guest on ``memmap`` whose Linux driver probed a free page hinting device
    (hints applied to ``bitmap`` if given)."""
    guest = SimulatedGuest(memmap, **guest_kw)
    device = FreePageHintDevice(guest.ram, memmap, bitmap, **(device_kw or {}))
    guest.driver.attach(device)
    return guest, device


def migrate_simulated(
    source: SimulatedSource,
    config: PrecopyConfig | None = None,
    link: LinkModel | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[Precopy], None] | None = None,
) -> tuple[MigrationResult, SimulatedDestination]:
    """Migrates ``source`` over a simulated link to a fresh destination, with the
    nothing-lost oracle; ``on_start`` sees the ``Precopy`` before it runs (to cancel it from
    ``progress``, say)."""
    guest = source.guest
    destination = SimulatedDestination(guest)
    migration = Precopy(
        source,
        destination,
        SimulatedLink(source, link),
        config,
        progress=progress,
        lost_pages=lambda: len(guest.lost_pages(destination.contents)),
    )
    if on_start is not None:
        on_start(migration)
    return migration.run(), destination


# -- a driver's side of the virtio-mmio transport -------------------------------------------------


def r32(t: VirtioMmioTransport, offset: int) -> int:
    """A 32-bit register read, as a guest's ``readl``."""
    return int.from_bytes(t.read(offset, 4), "little")


def w32(t: VirtioMmioTransport, offset: int, value: int) -> None:
    """A 32-bit register write, as a guest's ``writel``."""
    t.write(offset, value.to_bytes(4, "little"))


def state(dev: FreePageHintDevice) -> HintState:
    """The device's hinting state, read through a call so mypy does not keep an earlier
    narrowing of the property."""
    return dev.state


# -- a packed ring's driver side ---------------------------------------------------------------

WRITE, AVAIL, USED = 2, 1 << 7, 1 << 15
"""Packed descriptor flags (virtio 1.2 §2.8.1)."""
DESC, DRIVER_EVENT, DEVICE_EVENT = 0x1000, 0x2000, 0x2004
MIB4 = 4 << 20


class PackedDriver:
    """The driver's side of a packed ring at ``DESC`` in a RAM buffer whose first region starts
    at gpa 0: one descriptor per element, in ring order."""

    def __init__(self, mem: npt.NDArray[np.uint8], size: int) -> None:
        self.mem, self.size, self.next, self.wrap = mem, size, 0, True
        self.ids = 0

    def post(self, addr: int, length: int, writable: bool) -> int:
        flags = (WRITE if writable else 0) | (AVAIL if self.wrap else USED)
        bid = self.ids % self.size
        self.ids += 1
        at = DESC + 16 * self.next
        self.mem[at : at + 16] = np.frombuffer(
            struct.pack("<QIHH", addr, length, bid, flags), dtype=np.uint8
        )
        self.next += 1
        if self.next == self.size:
            self.next, self.wrap = 0, not self.wrap
        return bid

    def used_slot(self, slot: int) -> tuple[int, int, int]:
        raw = self.mem[DESC + 16 * slot : DESC + 16 * slot + 16].tobytes()
        _, length, bid, flags = struct.unpack("<QIHH", raw)
        return bid, length, flags


# -- real KVM ----------------------------------------------------------------------------------

KVM_MMIO_BASE = MMIO_BASE
"""The balloon's virtio-mmio window in the KVM tests, in the hole below 4 GiB."""
KVM_LAYOUT = MemoryMap([(0, 64 * MIB), (4 << 30, 64 * MIB)])
"""128 MiB: 64 MiB below the hole and 64 MiB above 4 GiB (two memslots)."""

Booted = Callable[..., tuple[Vm, GuestProgram]]
"""The ``booted`` fixture: ``booted(log_mode="classic", memmap=KVM_LAYOUT, **guest_kw)``."""


def migrate_kvm_options(**over: Any) -> argparse.Namespace:
    """``pagehint migrate-kvm``'s defaults as its ``run`` leaves them parsed (sizes and rates
    converted too); ``over`` replaces any."""
    args = argparse.Namespace(
        memory="256M",
        log_mode="manual",
        strategy="safe",
        bandwidth="512MiB",
        downtime="300ms",
        write_blocks=50,
        free_blocks=40,
        pages_per_step=32,
        bandwidth_bps=float(512 << 20),
        downtime_s=0.3,
        seed=1,
        predict=False,
    )
    for key, value in over.items():
        setattr(args, key, value)
    return args


def completed_result(**over: Any) -> MigrationResult:
    """A completed ``MigrationResult`` of zeros, with ``over`` replacing any field."""
    fields: dict[str, Any] = {
        "status": "completed",
        "total_time": 0.0,
        "downtime": 0.0,
        "setup_time": 0.0,
        "ram_total": 0,
        "transferred": 0,
        "duplicate": 0,
        "normal": 0,
        "normal_bytes": 0,
        "dirty_sync_count": 0,
        "remaining": 0,
        "hinting": False,
        "pages_hinted": 0,
        "pages_skipped": 0,
    }
    fields.update(over)
    return MigrationResult(**fields)
