"""SplitQueue from Python: real free-page-queue dumps from a Linux 6.1 guest under QEMU 10, read
from a guest-RAM buffer exactly as QEMU decoded them, and hostile rings that must never crash."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagehint import DirtyBitmap, MemoryMap, SplitQueue, apply_hints

DUMPS = Path(__file__).parent / "data" / "ring-dumps"
GIB = 1 << 30


def load(name: str) -> tuple[dict[str, Any], MemoryMap, np.ndarray[Any, np.dtype[np.uint8]]]:
    """The dump's ring metadata, its RAM layout, and a (lazily zeroed) RAM buffer with the
    rings and out-buffers placed at their guest-physical addresses."""
    d = DUMPS / name
    ring = json.loads((d / "ring.json").read_text())
    ram = int(ring["guest_ram_bytes"])
    # QEMU's RAM block: pc.ram from 0 up to 2 GiB (or all of it), the rest from 4 GiB.
    memmap = MemoryMap.x86(ram, below_4g=min(ram, 2 * GIB))
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)

    def place(gpa: int, data: bytes) -> None:
        off = gpa - memmap.gpa_of(memmap.pfn_of(gpa)) + memmap.pfn_of(gpa) * memmap.page_size
        mem[off : off + len(data)] = np.frombuffer(data, dtype=np.uint8)

    for f, key in (("desc.bin", "desc_gpa"), ("avail.bin", "avail_gpa"), ("used.bin", "used_gpa")):
        place(int(ring[key]), (d / f).read_bytes())
    for ob in json.loads((d / "outbufs.json").read_text()):
        place(int(ob["gpa"]), (d / ob["file"]).read_bytes())
    return ring, memmap, mem


@pytest.mark.parametrize("name", sorted(p.name for p in DUMPS.iterdir() if p.is_dir()))
def test_real_dump_decodes_exactly_as_qemu(name: str) -> None:
    ring, memmap, mem = load(name)
    q = SplitQueue(
        mem, memmap, ring["queue_size"], ring["desc_gpa"], ring["avail_gpa"], ring["used_gpa"],
        event_idx=True,
    )
    used = int(ring["used_idx_in_memory"])
    q.set_indices(used, used)
    els = q.pop()
    window = (int(ring["avail_idx_in_memory"]) - used) % 65536
    assert len(els) == window and q.error is None
    assert sum(q.rejected.values()) == 0
    qemu = json.loads((DUMPS / name / "qemu-elements.json").read_text())["by_index"]
    size = int(ring["queue_size"])
    for i in range(window):
        want = qemu[(used + i) % size]["element"]["descs"]
        got = els.buffers(i)
        assert [(g[0], g[1], g[2]) for g in got] == [
            (w["addr"], w["len"], "write" in w["flags"]) for w in want
        ], f"{name}: element {i}"
    # Out-buffers carry cmd ids (4 bytes); in-buffers are the 4 MiB hints.
    _, out_addr, out_len = els.out_buffers()
    offsets = [memmap.pfn_of(int(a)) * 4096 + int(a) % 4096 for a in out_addr]
    cmd_ids = [struct.unpack("<I", mem[o : o + 4].tobytes())[0] for o in offsets]
    assert set(out_len.tolist()) <= {4}
    outbufs = {int(o["gpa"]): int(o["u32_le"]) for o in json.loads((DUMPS / name / "outbufs.json").read_text())}
    assert cmd_ids == [outbufs[int(a)] for a in out_addr]
    _, hint_addr, hint_len = els.in_buffers()
    assert set(hint_len.tolist()) <= {4 << 20}
    assert np.all(hint_addr % (4 << 20) == 0)
    # Every element goes back to the driver; the used index then meets the avail index.
    q.add_used(els.heads.tolist(), [0] * len(els))
    assert q.next_used == int(ring["avail_idx_in_memory"]) % 65536
    # The hints apply cleanly to a migration bitmap: all 4 MiB blocks of RAM.
    bm = DirtyBitmap(memmap.npages, dirty=True)
    hints = np.stack([hint_addr, hint_len.astype(np.uint64)], axis=1)
    r = apply_hints(bm, memmap, np.ascontiguousarray(hints))
    assert r.rejected_total == 0 and r.pages_cleared == len(np.unique(hint_addr)) * 1024


def test_queue_setup_errors_are_value_errors() -> None:
    memmap = MemoryMap([(0, 1 << 20)])
    mem = bytearray(1 << 20)
    for size, desc in [(0, 0), (3, 0), (65535, 0), (65536, 0), (1 << 20, 0), (16, 8)]:
        with pytest.raises(ValueError):
            SplitQueue(mem, memmap, size, desc, 0x8000, 0x9000)
    with pytest.raises(ValueError, match="RAM|ram"):
        SplitQueue(mem, memmap, 256, 1 << 20, 0x8000, 0x9000)
    with pytest.raises(TypeError):
        SplitQueue(bytes(1 << 20), memmap, 256, 0, 0x8000, 0x9000)
    with pytest.raises(ValueError, match="bytes"):
        SplitQueue(bytearray(100), memmap, 256, 0, 0x8000, 0x9000)


@settings(max_examples=200, deadline=None)
@given(
    desc=st.binary(min_size=16 * 16, max_size=16 * 16),
    avail_idx=st.integers(0, 65535),
    ring=st.lists(st.integers(0, 65535), min_size=16, max_size=16),
    last=st.integers(0, 65535),
)
def test_hostile_ring_bytes_never_crash_and_always_terminate(
    desc: bytes, avail_idx: int, ring: list[int], last: int
) -> None:
    memmap = MemoryMap([(0, 1 << 16), (1 << 20, 1 << 16)])  # a hole between the regions
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)
    mem[0x1000 : 0x1000 + len(desc)] = np.frombuffer(desc, dtype=np.uint8)
    mem[0x2000:0x2004] = np.frombuffer(struct.pack("<HH", 0, avail_idx), dtype=np.uint8)
    mem[0x2004 : 0x2004 + 32] = np.frombuffer(struct.pack("<16H", *ring), dtype=np.uint8)
    q = SplitQueue(mem, memmap, 16, 0x1000, 0x2000, 0x3000)
    q.set_indices(last, last)
    els = q.pop(1000)
    pending = (avail_idx - last) % 65536
    assert len(els) + sum(q.rejected.values()) <= min(pending, 16) + 1
    if q.error is None:
        assert len(els) + sum(q.rejected.values()) == pending
    # Every buffer handed out is RAM (below the hole's start, or inside the second region).
    ends = els.desc_addr + els.desc_len
    in_first = ends <= (1 << 16)
    in_second = (els.desc_addr >= (1 << 20)) & (ends <= (1 << 20) + (1 << 16))
    assert np.all(in_first | in_second)
    assert np.all(els.desc_len > 0)
