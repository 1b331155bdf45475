"""DirtyBitmap.harvest_dirty_ring over KVM dirty rings built with numpy: exact pages, RESET
marking, rejected entries, index wrap-around, misuse that changes nothing, a Python model, and
a writer thread publishing entries while another thread harvests."""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagehint import DirtyBitmap, DirtyRingHarvest

# struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; } (include/uapi/linux/kvm.h)
GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
DIRTY = 1  # KVM_DIRTY_GFN_F_DIRTY
RESET = 2  # KVM_DIRTY_GFN_F_RESET
NO_REJECTS = {"unknown_slot": 0, "address_space": 0, "offset_past_slot": 0}

Ring = npt.NDArray[np.void]
Slots = list[tuple[int, int, int]]


def new_ring(entries: int) -> Ring:
    return np.zeros(entries, dtype=GFN)


def push(ring: Ring, index: int, slot: int, offset: int) -> None:
    """The kernel's push: the fields first, then the DIRTY flag."""
    e = ring[index % ring.size]
    e["slot"] = slot
    e["offset"] = offset
    ring["flags"][index % ring.size] = DIRTY


def pages_of(bm: DirtyBitmap) -> set[int]:
    starts, lens = bm.dirty_runs()
    return {p for s, n in zip(starts.tolist(), lens.tolist(), strict=True) for p in range(s, s + n)}


SLOTS: Slots = [(0, 0, 100), (3, 100, 50)]


def test_sets_exact_pages_marks_reset_and_counts_rejects() -> None:
    ring = new_ring(16)
    bm = DirtyBitmap(200)
    bm.set_range(5, 1)
    for i, (slot, offset) in enumerate(
        [(0, 5), (3, 7), (3, 7), (9, 0), (1 << 16, 1), (3, 50), (0, 99), (3, 0)]
    ):
        push(ring, i, slot, offset)
    r = bm.harvest_dirty_ring(ring, 0, SLOTS)
    assert r == DirtyRingHarvest(
        8, 3, 8, {"unknown_slot": 1, "address_space": 1, "offset_past_slot": 1}
    )
    assert (r.entries, r.pages_dirtied, r.fetch_index, r.rejected_total) == (8, 3, 8, 3)
    assert pages_of(bm) == {5, 107, 99, 100}
    assert ring["flags"].tolist() == [RESET] * 8 + [0] * 8
    # Fields are left as they were: the kernel reads them again when it resets the entries.
    assert ring["offset"][:3].tolist() == [5, 7, 7]
    # Nothing new: the next harvest starts where this one stopped and takes nothing.
    again = bm.harvest_dirty_ring(ring, r.fetch_index, SLOTS)
    assert again == DirtyRingHarvest(0, 0, 8, NO_REJECTS)


def test_stops_at_the_first_entry_not_dirtied() -> None:
    ring = new_ring(8)
    for i in range(6):
        push(ring, i, 0, i)
    ring["flags"][2] = DIRTY | RESET  # collected already: not dirtied
    bm = DirtyBitmap(200)
    r = bm.harvest_dirty_ring(ring, 0, SLOTS)
    assert (r.entries, r.fetch_index) == (2, 2)
    assert pages_of(bm) == {0, 1}
    assert ring["flags"].tolist() == [RESET, RESET, DIRTY | RESET, DIRTY, DIRTY, DIRTY, 0, 0]


def test_fetch_index_wraps_around_2_32() -> None:
    ring = new_ring(8)
    start = 2**32 - 3
    for k in range(6):
        push(ring, start + k, 0, 10 + k)
    bm = DirtyBitmap(200)
    r = bm.harvest_dirty_ring(ring, start, SLOTS)
    assert (r.entries, r.pages_dirtied, r.fetch_index) == (6, 6, 3)
    assert pages_of(bm) == set(range(10, 16))
    # Slots 5, 6, 7, 0, 1, 2 were used, in that order.
    assert ring["flags"].tolist() == [RESET] * 3 + [0, 0] + [RESET] * 3
    assert ring["offset"].tolist() == [13, 14, 15, 0, 0, 10, 11, 12]


def test_a_full_ring_is_one_lap() -> None:
    ring = new_ring(4)
    for k in range(4):
        push(ring, k, 0, k)
    bm = DirtyBitmap(200)
    r = bm.harvest_dirty_ring(ring, 1, SLOTS)
    assert (r.entries, r.fetch_index) == (4, 5)
    assert (ring["flags"] == RESET).all()


@pytest.mark.parametrize(
    "as_buffer",
    [
        pytest.param(lambda ring: ring, id="structured"),
        pytest.param(lambda ring: ring.view(np.uint8), id="uint8"),
        pytest.param(lambda ring: ring.view(np.uint64), id="uint64"),
        pytest.param(lambda ring: memoryview(ring.view(np.uint8)), id="memoryview"),
    ],
)
def test_ring_buffer_kinds(as_buffer: Any) -> None:
    ring = new_ring(4)
    push(ring, 0, 3, 1)
    bm = DirtyBitmap(200)
    r = bm.harvest_dirty_ring(as_buffer(ring), 0, np.array(SLOTS, dtype=np.uint64))
    assert (r.entries, r.pages_dirtied) == (1, 1)
    assert bm.test(101)
    assert ring["flags"][0] == RESET


def test_an_mmapped_ring() -> None:
    with mmap.mmap(-1, 4096) as m:
        ring = np.frombuffer(m, dtype=GFN)  # 256 entries, page aligned, like the vCPU's
        push(ring, 255, 0, 42)
        bm = DirtyBitmap(200)
        r = bm.harvest_dirty_ring(m, 255, SLOTS)
        assert (r.entries, r.fetch_index) == (1, 256)
        assert bm.test(42)
        assert ring["flags"][255] == RESET
        del ring  # release the export before the mmap closes


def _bytes_of(ring: Any) -> npt.NDArray[np.uint8] | None:
    """A byte view of a contiguous buffer, to check it is left alone; None for anything else."""
    try:
        view: npt.NDArray[np.uint8] = np.frombuffer(ring, dtype=np.uint8)
        return view
    except (TypeError, ValueError, BufferError):
        return None


def _misaligned() -> memoryview:
    return memoryview(bytearray(40))[4:36]


MISUSE: list[tuple[str, Any, Any, Any, type[Exception]]] = [
    ("read-only bytes", lambda: bytes(64), 0, SLOTS, TypeError),
    ("not a buffer", lambda: "ring", 0, SLOTS, TypeError),
    ("3 entries", lambda: bytearray(48), 0, SLOTS, ValueError),
    ("partial entry", lambda: bytearray(40), 0, SLOTS, ValueError),
    ("empty", lambda: bytearray(0), 0, SLOTS, ValueError),
    ("misaligned", _misaligned, 0, SLOTS, ValueError),
    ("strided", lambda: np.zeros(8, dtype=np.uint64)[::2], 0, SLOTS, ValueError),
    ("negative index", lambda: bytearray(64), -1, SLOTS, ValueError),
    ("index past u32", lambda: bytearray(64), 2**32, SLOTS, ValueError),
    ("index not an int", lambda: bytearray(64), 1.5, SLOTS, TypeError),
    ("slot past bitmap", lambda: bytearray(64), 0, [(0, 150, 51)], IndexError),
    ("slot past 2**64", lambda: bytearray(64), 0, [(0, 2**64 - 1, 2)], IndexError),
    ("negative first page", lambda: bytearray(64), 0, [(0, -1, 2)], IndexError),
    ("negative npages", lambda: bytearray(64), 0, [(0, 0, -2)], ValueError),
    ("slot id past 16 bits", lambda: bytearray(64), 0, [(65536, 0, 1)], ValueError),
    ("duplicate slot", lambda: bytearray(64), 0, [(1, 0, 1), (1, 5, 1)], ValueError),
    ("short row", lambda: bytearray(64), 0, [(1, 0)], ValueError),
    ("slots not a sequence", lambda: bytearray(64), 0, 5, TypeError),
    ("array of 2 columns", lambda: bytearray(64), 0, np.zeros((1, 2), np.uint64), ValueError),
]


@pytest.mark.parametrize(
    ("make_ring", "index", "slots", "exc"),
    [pytest.param(*case[1:], id=case[0]) for case in MISUSE],
)
def test_misuse_raises_and_changes_nothing(
    make_ring: Any, index: Any, slots: Any, exc: type[Exception]
) -> None:
    bm = DirtyBitmap(200)
    bm.set_range(7, 3)
    before = bm.copy()
    ring = make_ring()
    raw = _bytes_of(ring)
    if raw is not None and raw.size >= 16 and raw.flags.writeable:
        # A dirtied entry that a refused call must not collect.
        raw[:16] = np.frombuffer(np.array([(DIRTY, 0, 1)], dtype=GFN).tobytes(), np.uint8)
    snapshot = None if raw is None else raw.copy()
    with pytest.raises(exc):
        bm.harvest_dirty_ring(ring, index, slots)
    assert bm == before
    if raw is not None and snapshot is not None:
        assert np.array_equal(raw, snapshot)


def test_a_read_only_numpy_ring_is_refused() -> None:
    ring = new_ring(4)
    push(ring, 0, 0, 1)
    ring.flags.writeable = False
    bm = DirtyBitmap(200)
    with pytest.raises(TypeError, match="writable"):
        bm.harvest_dirty_ring(ring, 0, SLOTS)
    assert bm.count() == 0 and ring["flags"][0] == DIRTY


# -- against a Python model ----------------------------------------------------------------


def model(
    entries: Sequence[tuple[int, int]], slots: Slots, dirty: set[int]
) -> tuple[int, dict[str, int]]:
    table = {s: (first, n) for s, first, n in slots}
    new = 0
    rejected = dict(NO_REJECTS)
    for slot, offset in entries:
        if slot >> 16:
            rejected["address_space"] += 1
        elif slot not in table:
            rejected["unknown_slot"] += 1
        elif offset >= table[slot][1]:
            rejected["offset_past_slot"] += 1
        elif table[slot][0] + offset not in dirty:
            dirty.add(table[slot][0] + offset)
            new += 1
    return new, rejected


ENTRY = st.one_of(
    st.tuples(st.integers(0, 5), st.integers(0, 120)),
    st.tuples(st.integers(1, 3).map(lambda a: a << 16), st.integers(0, 5)),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=150, deadline=None)
@given(
    log2=st.integers(0, 5),
    start=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 40, 2**32 - 1)),
    batches=st.lists(st.lists(ENTRY, max_size=40), min_size=1, max_size=5),
    seed=st.lists(st.integers(0, 299), max_size=20),
)
def test_matches_the_model(
    log2: int, start: int, batches: list[list[tuple[int, int]]], seed: list[int]
) -> None:
    slots: Slots = [(0, 0, 100), (2, 150, 100), (5, 90, 20)]
    ring = new_ring(1 << log2)
    bm = DirtyBitmap(300)
    dirty = set(seed)
    for p in seed:
        bm.set_range(p, 1)
    fetch = start
    for batch in batches:
        taken = batch[: ring.size]
        # The kernel resets collected entries before reusing them (KVM_RESET_DIRTY_RINGS).
        ring["flags"][ring["flags"] == RESET] = 0
        for k, (slot, offset) in enumerate(taken):
            push(ring, fetch + k, slot, offset)
        new, rejected = model(taken, slots, dirty)
        r = bm.harvest_dirty_ring(ring, fetch, slots)
        assert r == DirtyRingHarvest(len(taken), new, (fetch + len(taken)) % 2**32, rejected)
        assert pages_of(bm) == dirty
        assert (ring["flags"] != DIRTY).all()
        fetch = r.fetch_index


# -- concurrency ---------------------------------------------------------------------------


def test_a_writer_thread_and_a_harvester_lose_nothing() -> None:
    """A writer publishes every page of the bitmap once through a 64-entry ring, waiting for
    entries to be collected (as a vCPU exits on a full ring), while the harvester runs with the
    GIL released. Every page must arrive, exactly once."""
    npages = 20_000
    ring = new_ring(64)
    flags = ring["flags"]
    slots: Slots = [(1, 0, npages // 2), (2, npages // 2, npages - npages // 2)]
    bm = DirtyBitmap(npages)
    order = np.random.default_rng(5).permutation(npages).tolist()
    start = 2**32 - 100
    done = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            for k, page in enumerate(order):
                i = (start + k) % ring.size
                while flags[i] == DIRTY:  # not collected yet: the ring is full
                    time.sleep(0)  # lets the harvester run
                slot, offset = (1, page) if page < npages // 2 else (2, page - npages // 2)
                ring["slot"][i] = slot
                ring["offset"][i] = offset
                flags[i] = DIRTY
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            failures.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    fetch, entries, dirtied, rounds = start, 0, 0, 0
    while True:
        finished = done.is_set()
        r = bm.harvest_dirty_ring(ring, fetch, slots)
        assert r.rejected_total == 0
        fetch, entries, dirtied, rounds = (
            r.fetch_index,
            entries + r.entries,
            dirtied + r.pages_dirtied,
            rounds + 1,
        )
        if finished and r.entries == 0:
            break
    t.join()
    if failures:
        raise failures[0]
    assert (entries, dirtied, bm.count()) == (npages, npages, npages)
    assert fetch == (start + npages) % 2**32
    assert rounds > 1
