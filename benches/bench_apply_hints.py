"""B5: ``apply_hints`` of 262,144 aligned 4 MiB ``(gpa, len)`` hints on a 1 TiB guest with the
x86 layout (2 GiB below the PCI hole, the rest from 4 GiB; 2^28 pages), every block once in
shuffled order, into an all-dirty bitmap restored before every round.

Rows:

- pagehint ``apply_hints(bitmap, memmap, hints)``: map, split at region ends, round, count, clear;
- pagehint ``clear_ranges`` of the same page ranges, already decoded (the target is
  ``apply_hints`` <= 1.2x this);
- numpy: a vectorised decoder (``searchsorted`` over region starts, containment check, rounding
  the start up and the end down, gpa -> pfn) followed by the block-mask clear of B1. It assumes
  no hint crosses a region end, which holds here;
- limit: one sequential read+write pass over the 32 MiB bitmap.
"""

from __future__ import annotations

import numpy as np
import pytest

from benches.benchutil import (
    ALL_ONES,
    GUEST_PAGES,
    HINT_PAGES,
    WORD_BITS,
    Bench,
    Peer,
    Settings,
    U64Array,
    check_then_measure,
)
from pagehint import DirtyBitmap, MemoryMap, apply_hints

PAGE = 4096
NBLOCKS = GUEST_PAGES // HINT_PAGES
BLOCK_WORDS = HINT_PAGES // WORD_BITS
IMPLS = ["pagehint", "pagehint-clear-ranges", "numpy", "limit"]

MEMMAP = MemoryMap.x86(GUEST_PAGES * PAGE, below_4g=2 << 30)
REGION_GPA = np.array([g for g, _ in MEMMAP.regions], dtype=np.uint64)
REGION_END = np.array([g + s for g, s in MEMMAP.regions], dtype=np.uint64)
REGION_PFN = np.cumsum([0] + [s // PAGE for _, s in MEMMAP.regions[:-1]]).astype(np.uint64)


def _hints(seed: int) -> tuple[U64Array, U64Array, U64Array]:
    """(hints (N, 2) of gpa/len, the same as bitmap starts, counts)."""
    rng = np.random.default_rng(seed)
    pfns = rng.permutation(NBLOCKS).astype(np.uint64) * np.uint64(HINT_PAGES)
    low_pages = np.uint64(REGION_END[0] // PAGE)
    gpas = np.where(
        pfns < low_pages,
        pfns * np.uint64(PAGE),
        REGION_GPA[1] + (pfns - low_pages) * np.uint64(PAGE),
    ).astype(np.uint64)
    hints = np.stack([gpas, np.full(NBLOCKS, HINT_PAGES * PAGE, np.uint64)], axis=1)
    return np.ascontiguousarray(hints), pfns, np.full(NBLOCKS, HINT_PAGES, np.uint64)


def numpy_decode(hints: U64Array) -> tuple[U64Array, U64Array]:
    """Vectorised (gpa, len) -> (first pfn, pages fully covered) for hints inside one region."""
    gpa, length = hints[:, 0], hints[:, 1]
    end = gpa + length
    r = np.searchsorted(REGION_GPA, gpa, side="right") - 1
    ok = (r >= 0) & (length > 0) & (end > gpa)
    r = np.clip(r, 0, None)
    ok &= end <= REGION_END[r]
    first = (gpa - REGION_GPA[r] + np.uint64(PAGE - 1)) // np.uint64(PAGE)
    last = (end - REGION_GPA[r]) // np.uint64(PAGE)
    ok &= last > first
    return (REGION_PFN[r] + first)[ok], (last - first)[ok]


@pytest.fixture(scope="module")
def case() -> tuple[U64Array, U64Array, U64Array, int, U64Array]:
    hints, starts, counts = _hints(seed=21)
    bm = DirtyBitmap(GUEST_PAGES, dirty=True)
    r = apply_hints(bm, MEMMAP, hints)
    assert r.pages_cleared == GUEST_PAGES and r.rejected_total == 0
    return hints, starts, counts, r.pages_cleared, bm.words().copy()


def _peer(hints: U64Array, starts: U64Array, counts: U64Array, impl: str) -> Peer:
    nwords = GUEST_PAGES // WORD_BITS
    if impl == "pagehint":
        bm = DirtyBitmap(GUEST_PAGES, dirty=True)
        return Peer(
            "pagehint `apply_hints(bitmap, memmap, hints)`",
            lambda: apply_hints(bm, MEMMAP, hints).pages_cleared,
            bm.set_all,
            bm.words,
            role="pagehint",
        )
    if impl == "pagehint-clear-ranges":
        bm2 = DirtyBitmap(GUEST_PAGES, dirty=True)
        return Peer(
            "pagehint `clear_ranges` of the same ranges, pre-decoded",
            lambda: bm2.clear_ranges(starts, counts),
            bm2.set_all,
            bm2.words,
            role="floor",  # apply_hints decodes, then does this: its floor, not a competitor
        )
    w = np.full(nwords, ALL_ONES, dtype=np.uint64)
    blocks_view = w.reshape(NBLOCKS, BLOCK_WORDS)
    if impl == "numpy":

        def np_apply() -> int:
            first, _n = numpy_decode(hints)
            mask = np.zeros(NBLOCKS, dtype=np.bool_)
            mask[(first >> np.uint64(10)).astype(np.intp)] = True
            cleared = int(np.bitwise_count(blocks_view[mask]).sum())
            blocks_view[mask] = 0
            return cleared

        return Peer(
            "numpy: vectorised decode (`searchsorted`, round) + block-mask clear",
            np_apply,
            lambda: w.fill(ALL_ONES),
            lambda: w,
        )
    return Peer(
        "limit: sequential read+write of the bitmap (`np.invert(out=)`)",
        lambda: np.invert(w, out=w),
        lambda: w.fill(ALL_ONES),
        role="limit",
    )


@pytest.mark.benchmark(group="B5 apply_hints: 262,144 4 MiB hints, 1 TiB x86 guest (2^28 pages)")
@pytest.mark.parametrize("impl", IMPLS)
def bench_apply_hints(
    benchmark: Bench,
    settings: Settings,
    case: tuple[U64Array, U64Array, U64Array, int, U64Array],
    impl: str,
) -> None:
    hints, starts, counts, expected, words = case
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer(hints, starts, counts, impl),
        nbytes=GUEST_PAGES // 8,
        expected_result=expected,
        expected_state=words,
    )
