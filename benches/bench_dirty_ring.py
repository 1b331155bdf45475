"""B9: harvesting one full KVM dirty ring of 65,536 ``kvm_dirty_gfn`` entries (KVM's largest
ring, 1 MiB) into a clean bitmap of a 1 TiB x86 guest (2^28 pages; memslot 0 below the PCI
hole, memslot 1 from 4 GiB). Every entry is dirtied and names a uniformly random page (a few
repeat), so each one touches a random line of the 32 MiB bitmap. Before every round the ring's
flags go back to DIRTY and the bitmap back to clean (untimed). The result is the number of pages
newly dirty; the GB/s column is ring bytes per second (entries/s = 65,536 / median).

Rows:

- pagehint ``DirtyBitmap.harvest_dirty_ring(ring, 0, slots)``: walk, check, set, count, mark
  RESET, with the GIL released;
- numpy: the same walk vectorised: flags in ring order from the fetch index, the dirtied
  prefix, slot/offset decode with the address-space, slot and offset checks, flags set to
  RESET, then ``np.unique`` + a test of the old bits (the count) + ``np.bitwise_or.at``;
- numpy decode + ``set_ranges``: the same decode, then pagehint's ``DirtyBitmap.set_ranges``
  of one-page ranges (which counts and sets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from benches.benchutil import (
    GUEST_PAGES,
    WORD_BITS,
    Bench,
    Peer,
    Settings,
    U64Array,
    check_then_measure,
)
from pagehint import DirtyBitmap

ENTRIES = 65536  # KVM_DIRTY_RING_MAX_ENTRIES
GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
DIRTY = np.uint32(1)  # KVM_DIRTY_GFN_F_DIRTY
RESET = np.uint32(2)  # KVM_DIRTY_GFN_F_RESET
LOW_PAGES = (2 << 30) // 4096  # memslot 0: RAM below the PCI hole
SLOTS = [(0, 0, LOW_PAGES), (1, LOW_PAGES, GUEST_PAGES - LOW_PAGES)]
IMPLS = ["pagehint", "numpy", "numpy-set_ranges"]

# The slot table as dense arrays indexed by slot id, for the numpy rows.
SLOT_FIRST = np.array([f for _, f, _ in SLOTS], dtype=np.uint64)
SLOT_PAGES = np.array([n for _, _, n in SLOTS], dtype=np.uint64)
_SIX = np.uint64(6)
_LOW6 = np.uint64(63)
_ONE = np.uint64(1)


@dataclass(frozen=True)
class Case:
    ring: np.ndarray  # the entries, flags DIRTY; every row copies it into its own ring
    expected_new: int
    expected_words: U64Array


@pytest.fixture(scope="module")
def case() -> Case:
    rng = np.random.default_rng(41)
    pages = rng.integers(0, GUEST_PAGES, size=ENTRIES, dtype=np.uint64)
    ring = np.zeros(ENTRIES, dtype=GFN)
    high = pages >= LOW_PAGES
    ring["slot"] = high.astype(np.uint32)
    ring["offset"] = np.where(high, pages - np.uint64(LOW_PAGES), pages)
    ring["flags"] = DIRTY
    bm = DirtyBitmap(GUEST_PAGES)
    work = ring.copy()
    new = bm.harvest_dirty_ring(work, 0, SLOTS).pages_dirtied
    assert (work["flags"] == RESET).all()
    assert new == np.unique(pages).size
    return Case(ring, new, bm.words().copy())


def numpy_decode(ring: np.ndarray, fetch: int) -> U64Array:
    """The pfns of the dirtied entries from ``fetch`` on (marking them RESET), rejects dropped."""
    size = ring.size
    order = (np.arange(size, dtype=np.uint64) + np.uint64(fetch)) % np.uint64(size)
    flags = ring["flags"][order]
    dirtied = (flags & np.uint32(3)) == DIRTY
    n = size if dirtied.all() else int(np.argmin(dirtied))  # stop at the first not dirtied
    taken = order[:n]
    slot = ring["slot"][taken]
    offset = ring["offset"][taken]
    ring["flags"][taken] = RESET
    sid = slot & np.uint32(0xFFFF)
    known = ((slot >> np.uint32(16)) == 0) & (sid < SLOT_FIRST.size)
    sid = np.where(known, sid, 0)
    ok = known & (offset < SLOT_PAGES[sid])
    pfns: U64Array = SLOT_FIRST[sid[ok]] + offset[ok]
    return pfns


def numpy_set(words: U64Array, pfns: U64Array) -> int:
    """Sets the pages, returning how many were clean."""
    u = np.unique(pfns)
    w = (u >> _SIX).astype(np.intp)
    bits = _ONE << (u & _LOW6)
    new = int(np.count_nonzero((words[w] & bits) == 0))
    np.bitwise_or.at(words, w, bits)
    return new


def _peer(case: Case, impl: str) -> Peer:
    ring = case.ring.copy()

    def rearm() -> None:
        ring["flags"] = DIRTY

    if impl == "pagehint":
        bm = DirtyBitmap(GUEST_PAGES)

        def ph_reset() -> None:
            rearm()
            bm.clear_all()

        return Peer(
            "pagehint `harvest_dirty_ring(ring, 0, slots)`",
            lambda: bm.harvest_dirty_ring(ring, 0, SLOTS).pages_dirtied,
            ph_reset,
            bm.words,
            role="pagehint",
        )
    if impl == "numpy":
        words = np.zeros(GUEST_PAGES // WORD_BITS, dtype=np.uint64)

        def np_reset() -> None:
            rearm()
            words.fill(0)

        return Peer(
            "numpy: vectorised walk and decode, `unique`, old-bit test, `bitwise_or.at`",
            lambda: numpy_set(words, numpy_decode(ring, 0)),
            np_reset,
            lambda: words,
        )
    if impl == "numpy-set_ranges":
        bm2 = DirtyBitmap(GUEST_PAGES)
        ones = np.ones(ENTRIES, dtype=np.uint64)

        def sr_reset() -> None:
            rearm()
            bm2.clear_all()

        def decode_then_set() -> int:
            pfns = numpy_decode(ring, 0)
            return bm2.set_ranges(pfns, ones[: pfns.size])

        return Peer(
            "numpy walk and decode, then pagehint `set_ranges` of one-page ranges",
            decode_then_set,
            sr_reset,
            bm2.words,
        )
    raise ValueError(impl)


@pytest.mark.benchmark(
    group="B9 dirty ring: harvest 65,536 kvm_dirty_gfn entries into a 2^28-page bitmap"
)
@pytest.mark.parametrize("impl", IMPLS)
def bench_dirty_ring(benchmark: Bench, settings: Settings, case: Case, impl: str) -> None:
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer(case, impl),
        nbytes=ENTRIES * GFN.itemsize,
        expected_result=case.expected_new,
        expected_state=case.expected_words,
    )
