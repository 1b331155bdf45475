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

from helpers import GIB
from pagehint import DirtyBitmap, MemoryMap, SplitQueue, apply_hints

DUMPS = Path(__file__).parent.parent / "data" / "ring-dumps"


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
        mem,
        memmap,
        ring["queue_size"],
        ring["desc_gpa"],
        ring["avail_gpa"],
        ring["used_gpa"],
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
    outbufs = {
        int(o["gpa"]): int(o["u32_le"])
        for o in json.loads((DUMPS / name / "outbufs.json").read_text())
    }
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
    with pytest.raises(ValueError, match=r"RAM|ram"):
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


def test_drain_hints_on_real_dump_stops_at_each_cmd_id() -> None:
    """pc-2G: the start cmd id, 458 hint elements, then STOP. The drain hands back the first
    out-buffer untouched, applies every hint when resumed, and stops again at STOP."""
    ring, memmap, mem = load("pc-2G-frozen-full")
    q = SplitQueue(
        mem,
        memmap,
        ring["queue_size"],
        ring["desc_gpa"],
        ring["avail_gpa"],
        ring["used_gpa"],
        event_idx=True,
    )
    bm = DirtyBitmap(memmap.npages, dirty=True)
    first = q.drain_hints(bm)
    assert first.elements == 0 and first.result.hints == 0
    assert first.control is not None
    assert (first.control.cmd_id, first.control.hints) == (0x80000001, [])
    q.add_used([first.control.head], [0])
    hints = q.drain_hints(bm)
    assert hints.elements == 458
    assert hints.result.hints == 458 and hints.result.rejected_total == 0
    assert hints.result.pages_cleared == hints.result.pages_hinted == 458 * 1024
    assert bm.count() == memmap.npages - 458 * 1024
    assert hints.control is not None and hints.control.cmd_id == 0  # STOP
    q.add_used([hints.control.head], [0])
    rest = q.drain_hints(bm)
    assert (rest.elements, rest.control) == (0, None)
    assert q.next_used == 460 and q.error is None


def test_drain_hints_limit_and_short_cmd_id() -> None:
    memmap = MemoryMap([(0, 1 << 22)])
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)
    size = 8
    desc, avail = 0x1000, 0x2000

    def put_desc(i: int, addr: int, length: int, flags: int) -> None:
        mem[desc + 16 * i : desc + 16 * i + 16] = np.frombuffer(
            struct.pack("<QIHH", addr, length, flags, 0), dtype=np.uint8
        )

    for i in range(3):  # three 64 KiB hints (device-writable)
        put_desc(i, 0x100000 + i * 0x10000, 0x10000, 2)
    put_desc(3, 0x8000, 2, 0)  # an out-buffer of 2 bytes: a short cmd id
    mem[avail : avail + 4] = np.frombuffer(struct.pack("<HH", 0, 4), dtype=np.uint8)
    mem[avail + 4 : avail + 12] = np.frombuffer(struct.pack("<4H", 0, 1, 2, 3), dtype=np.uint8)
    q = SplitQueue(mem, memmap, size, desc, avail, 0x3000)
    bm = DirtyBitmap(memmap.npages, dirty=True)
    two = q.drain_hints(bm, max_elements=2)
    assert (two.elements, two.control, two.result.pages_cleared) == (2, None, 32)
    rest = q.drain_hints(bm)
    assert rest.elements == 1 and rest.result.pages_cleared == 16
    assert rest.control is not None and rest.control.cmd_id is None and rest.control.head == 3
    assert bm.count() == memmap.npages - 48


def test_overlapping_used_ring_and_inconsistent_indices_are_refused() -> None:
    memmap = MemoryMap([(0, 1 << 20)])
    mem = bytearray(1 << 20)
    with pytest.raises(ValueError, match="overlaps"):
        SplitQueue(mem, memmap, 256, 0x1000, 0x8000, 0x8000)
    q = SplitQueue(mem, memmap, 256, 0x1000, 0x8000, 0x9000)
    with pytest.raises(ValueError, match="used index"):
        q.set_indices(0, 1)  # used ahead of avail: QEMU refuses to load this too
    q.set_indices(256, 0)
    assert (q.last_avail, q.next_used) == (256, 0)


def test_results_are_frozen_core_values() -> None:
    """The queue classes and their results are the core's own: no Python wrapper layer. The
    results are frozen values with a readable repr and value equality."""
    import pagehint
    from pagehint import _core

    assert pagehint.SplitQueue is _core.SplitQueue and pagehint.HintDrain is _core.HintDrain
    memmap = MemoryMap([(0, 1 << 22)])
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)
    desc, avail = 0x1000, 0x2000
    mem[desc : desc + 32] = np.frombuffer(
        struct.pack("<QIHHQIHH", 0x100000, 0x10000, 2, 0, 0x8000, 4, 0, 0), dtype=np.uint8
    )
    mem[0x8000:0x8004] = np.frombuffer(struct.pack("<I", 0x80000001), dtype=np.uint8)
    mem[avail : avail + 8] = np.frombuffer(struct.pack("<HHHH", 0, 2, 0, 1), dtype=np.uint8)
    q = SplitQueue(mem, memmap, 8, desc, avail, 0x3000)
    bm = DirtyBitmap(memmap.npages, dirty=True)
    drain = q.drain_hints(bm, record=True)
    assert drain.result == pagehint.HintResult(
        1,
        16,
        16,
        {"outside_ram": 0, "overflow": 0, "zero_length": 0},
        ranges=np.array([[256, 16]], dtype=np.uint64),
    )
    assert drain.ranges is drain.result.ranges
    assert drain.control == pagehint.ControlElement(1, 0x80000001, [])
    assert drain == pagehint.HintDrain(drain.result, 1, drain.control, False, drain.ranges)
    assert repr(drain.control) == "ControlElement(head=1, cmd_id=2147483649, hints=[])"
    assert repr(drain.result).startswith(
        "HintResult(hints=1, pages_hinted=16, pages_cleared=16, rejected={'zero_length': 0,"
    )
    with pytest.raises(AttributeError):
        drain.result.hints = 2  # type: ignore[misc]
    # The elements of a pop: the same arrays on every access, helpers in Rust.
    q2 = SplitQueue(mem, memmap, 8, desc, avail, 0x3000)
    els = q2.pop()
    assert els.heads is els.heads and len(els) == 2
    assert els.buffers(0) == [(0x100000, 0x10000, True)] and els.buffers(-1) == []
    assert [a.tolist() for a in els.out_buffers()] == [[1], [0x8000], [4]]
    assert [a.dtype for a in els.in_buffers()] == [np.uint32, np.uint64, np.uint32]
    assert repr(els).startswith("Elements(heads=array([0, 1], dtype=uint16)")
