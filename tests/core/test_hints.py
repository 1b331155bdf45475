"""MemoryMap and apply_hints against a page-by-page Python oracle, and every reject reason."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pagehint
from helpers import GIB
from pagehint import DirtyBitmap, MemoryMap, apply_hints

U64Array = npt.NDArray[np.uint64]


def hint_array(pairs: list[tuple[int, int]]) -> U64Array:
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


def oracle(
    regions: list[tuple[int, int]], page: int, dirty: set[int], hints: list[tuple[int, int]]
) -> tuple[set[int], int, int, dict[str, int]]:
    """Page by page: which bitmap pages a batch clears, and what it reports."""
    rejected = {"zero_length": 0, "overflow": 0, "outside_ram": 0}
    first_pfn = []
    at = 0
    for _, size in regions:
        first_pfn.append(at)
        at += size // page

    def pfn(gpa: int) -> int | None:
        for (g, size), f in zip(regions, first_pfn, strict=True):
            if g <= gpa < g + size:
                return f + (gpa - g) // page
        return None

    hinted = 0
    cleared = 0
    dirty = set(dirty)
    for gpa, n in hints:
        if n == 0:
            rejected["zero_length"] += 1
            continue
        if gpa + n > 2**64:
            rejected["overflow"] += 1
            continue
        # Every byte must be RAM: check region by region.
        g = gpa
        ok = True
        while g < gpa + n:
            reg = next(((rg, rs) for rg, rs in regions if rg <= g < rg + rs), None)
            if reg is None:
                ok = False
                break
            g = reg[0] + reg[1]
        if not ok:
            rejected["outside_ram"] += 1
            continue
        first = -(-gpa // page) * page
        end = (gpa + n) // page * page
        for p_gpa in range(first, end, page):
            p = pfn(p_gpa)
            assert p is not None
            hinted += 1
            if p in dirty:
                dirty.remove(p)
                cleared += 1
    return dirty, hinted, cleared, rejected


def test_each_reject_reason_is_counted_and_the_batch_goes_on() -> None:
    m = MemoryMap.x86(8 << 20, below_4g=4 << 20)
    bm = DirtyBitmap(m.npages, dirty=True)
    hints = hint_array(
        [
            (4096 + 1, 3 * 4096),  # pages 2, 3
            (0, 0),  # zero length
            (2**64 - 10, 20),  # overflow
            ((4 << 20) - 4096, 8192),  # into the PCI hole
            (16 << 20, 4096),  # past the end of low RAM, below 4 GiB
            ((1 << 32) + (4 << 20), 4096),  # past the end of high RAM
            (1 << 32, 4096),  # first page above 4 GiB: bitmap page 1024
            (100, 200),  # no whole page: accepted, clears nothing
        ]
    )
    r = apply_hints(bm, m, hints)
    assert r == pagehint.HintResult(
        hints=8,
        pages_hinted=3,
        pages_cleared=3,
        rejected={"zero_length": 1, "overflow": 1, "outside_ram": 3},
    )
    assert r.rejected_total == 5
    assert [bm.test(p) for p in (1, 2, 3, 4, 1023, 1024, 1025)] == [
        True,
        False,
        False,
        True,
        True,
        False,
        True,
    ]
    # Hinting the same pages again clears nothing more but still counts them as hinted.
    again = apply_hints(bm, m, hints[:1])
    assert (again.pages_hinted, again.pages_cleared) == (2, 0)


@st.composite
def maps_and_hints(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, int]], int, list[tuple[int, int]], list[int]]:
    page = draw(st.sampled_from([4096, 16384, 65536]))
    nregions = draw(st.integers(1, 3))
    regions = []
    gpa = draw(st.integers(0, 4)) * page
    for _ in range(nregions):
        size = draw(st.integers(1, 40)) * page
        regions.append((gpa, size))
        gpa += size + draw(st.sampled_from([0, page, 3 * page]))  # 0: regions touch
    if draw(st.booleans()):
        regions.reverse()  # bitmap order need not be address order
    top = gpa + 4 * page
    point = st.one_of(st.integers(0, top), st.integers(0, top // page).map(lambda p: p * page))
    length = st.one_of(
        st.integers(0, 5 * page), st.integers(0, 12).map(lambda k: k * page), st.just(2**64 - 1)
    )
    hints = draw(st.lists(st.tuples(point, length), max_size=30))
    npages = sum(s for _, s in regions) // page
    dirty = draw(st.lists(st.integers(0, npages - 1), max_size=npages))
    return regions, page, hints, dirty


@settings(max_examples=300, deadline=None)
@given(maps_and_hints())
def test_apply_hints_matches_page_by_page_oracle(
    case: tuple[list[tuple[int, int]], int, list[tuple[int, int]], list[int]],
) -> None:
    regions, page, hints, dirty = case
    m = MemoryMap(regions, page_size=page)
    bm = DirtyBitmap(m.npages)
    for p in dirty:
        bm.set_range(p, 1)
    want_dirty, hinted, cleared, rejected = oracle(regions, page, set(dirty), hints)
    r = apply_hints(bm, m, hint_array(hints))
    assert (r.hints, r.pages_hinted, r.pages_cleared, r.rejected) == (
        len(hints),
        hinted,
        cleared,
        rejected,
    )
    starts, lengths = bm.dirty_runs()
    got = {int(s) + i for s, n in zip(starts, lengths, strict=True) for i in range(int(n))}
    assert got == want_dirty


@settings(max_examples=200, deadline=None)
@given(maps_and_hints())
def test_recorded_ranges_are_exactly_the_pages_cleared(
    case: tuple[list[tuple[int, int]], int, list[tuple[int, int]], list[int]],
) -> None:
    """``record=True`` reports the core's own rounding: on an all-dirty bitmap the ranges cover
    exactly the pages that became clean, a page once per hint that covered it."""
    regions, page, hints, _ = case
    m = MemoryMap(regions, page_size=page)
    bm = DirtyBitmap(m.npages, dirty=True)
    assert apply_hints(DirtyBitmap(m.npages), m, hint_array(hints)).ranges is None
    r = apply_hints(bm, m, hint_array(hints), record=True)
    assert r.ranges is not None and r.ranges.dtype == np.uint64 and r.ranges.shape[1] == 2
    pages = [int(p) + i for p, n in r.ranges.tolist() for i in range(int(n))]
    assert len(pages) == r.pages_hinted
    starts, lengths = bm.dirty_runs()
    still = {int(s) + i for s, n in zip(starts, lengths, strict=True) for i in range(int(n))}
    assert set(pages) == set(range(m.npages)) - still
    assert len(set(pages)) == r.pages_cleared


def test_memory_map_lookups_and_layout() -> None:
    m = MemoryMap.x86(4 * GIB)  # q35: 2 GiB low, 2 GiB from 4 GiB
    assert m.regions == [(0, 2 * GIB), (4 * GIB, 2 * GIB)]
    assert (m.npages, m.page_size, m.ram_bytes, len(m)) == (1 << 20, 4096, 4 * GIB, 2)
    assert m.pfn_of(4 * GIB + 8192) == (1 << 19) + 2
    assert m.gpa_of((1 << 19) + 2) == 4 * GIB + 8192
    assert m == MemoryMap([(0, 2 * GIB), (4 * GIB, 2 * GIB)])
    with pytest.raises(ValueError, match="not guest RAM"):
        m.pfn_of(3 * GIB)
    with pytest.raises(IndexError):
        m.gpa_of(1 << 20)
    small = MemoryMap.x86(1 * GIB)
    assert small.regions == [(0, GIB)]
    arm = MemoryMap([(1 << 30, 1 << 30)], page_size=65536)
    assert arm.npages == 1 << 14 and arm.pfn_of((1 << 30) + 65536) == 1


@pytest.mark.parametrize(
    ("regions", "page_size"),
    [
        ([(0, 4096)], 8192),  # page size
        ([(0, 0)], 4096),  # empty region
        ([(1, 4096)], 4096),  # unaligned start
        ([(0, 4097)], 4096),  # unaligned size
        ([(0, 8192), (4096, 4096)], 4096),  # overlap
        ([(2**64 - 4096, 8192)], 4096),  # wraps past 2**64
        ([(-4096, 8192)], 4096),  # negative gpa
        ([(0, -4096)], 4096),  # negative size
        ([(2**64, 4096)], 4096),  # gpa past 64 bits
        ([(0, 4096)], -4096),  # negative page size
    ],
)
def test_bad_maps_are_refused(regions: list[tuple[int, int]], page_size: int) -> None:
    with pytest.raises(ValueError) as info:
        MemoryMap(regions, page_size=page_size)
    assert info.type is ValueError


def test_api_misuse_raises_and_changes_nothing() -> None:
    m = MemoryMap([(0, 1 << 20)])
    bm = DirtyBitmap(m.npages, dirty=True)
    before = bm.words().copy()
    good = hint_array([(0, 1 << 20)])
    for bad, exc in [
        (good.astype(np.int64), TypeError),
        (good.reshape(-1), TypeError),
        (np.zeros((2, 3), np.uint64), ValueError),
        (np.asfortranarray(np.zeros((3, 2), np.uint64)), ValueError),
    ]:
        with pytest.raises(exc):
            apply_hints(bm, m, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bitmap only"):
        apply_hints(DirtyBitmap(10, dirty=True), m, good)
    assert np.array_equal(bm.words(), before)
    assert apply_hints(bm, m, np.zeros((0, 2), np.uint64)).hints == 0
