"""PackedQueue from Python: a Linux-like free page round through a packed ring, laps with
wrap counters, and hostile ring bytes that must never crash."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import AVAIL, DESC, DEVICE_EVENT, DRIVER_EVENT, MIB4, USED, PackedDriver
from pagehint import DirtyBitmap, MemoryMap, PackedQueue


def test_a_free_page_round_through_a_packed_ring_with_laps() -> None:
    memmap = MemoryMap.x86(64 << 20, below_4g=32 << 20)
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)
    size = 8
    q = PackedQueue(mem, memmap, size, DESC, DRIVER_EVENT, DEVICE_EVENT)
    drv = PackedDriver(mem, size)
    bm = DirtyBitmap(memmap.npages, dirty=True)
    mem[0x3000:0x3004] = np.frombuffer(struct.pack("<I", 0x80000001), dtype=np.uint8)
    drv.post(0x3000, 4, writable=False)  # the round's cmd id
    first = q.drain_hints(bm)
    assert first.control is not None and first.control.cmd_id == 0x80000001
    q.add_used([first.control.head], [0])
    # 20 hints across laps of an 8-slot ring, 4 MiB blocks in both regions.
    gpas = [MIB4 * k for k in range(1, 8)] + [(1 << 32) + MIB4 * k for k in range(8)]
    applied = 0
    for gpa in gpas:
        drv.post(gpa, MIB4, writable=True)
        r = q.drain_hints(bm)
        assert r.control is None and r.result.rejected_total == 0
        applied += r.elements
    assert applied == len(gpas)
    assert bm.count() == memmap.npages - 1024 * len(gpas)
    assert q.error is None and sum(q.rejected.values()) == 0
    slot, wrap = q.next_used
    assert (slot, wrap) == ((1 + len(gpas)) % size, ((1 + len(gpas)) // size) % 2 == 0)
    _bid, length, flags = drv.used_slot((slot - 1) % size)
    assert length == 0 and bool(flags & AVAIL) == bool(flags & USED)


@settings(max_examples=200, deadline=None)
@given(
    ring=st.binary(min_size=16 * 8, max_size=16 * 8), start=st.integers(0, 7), wrap=st.booleans()
)
def test_hostile_packed_ring_bytes_never_crash(ring: bytes, start: int, wrap: bool) -> None:
    memmap = MemoryMap([(0, 1 << 16), (1 << 20, 1 << 16)])
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)
    mem[DESC : DESC + len(ring)] = np.frombuffer(ring, dtype=np.uint8)
    q = PackedQueue(mem, memmap, 8, DESC, DRIVER_EVENT, DEVICE_EVENT)
    q.set_indices(start, wrap, start, wrap)
    els = q.pop(1000)
    assert len(els) + sum(q.rejected.values()) <= 8
    ends = els.desc_addr + els.desc_len
    in_ram = (ends <= (1 << 16)) | ((els.desc_addr >= (1 << 20)) & (ends <= (1 << 20) + (1 << 16)))
    assert np.all(in_ram) and np.all(els.desc_len > 0)
    q.add_used(els.heads.tolist(), [0] * len(els))
