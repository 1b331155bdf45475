"""``DirtyBitmap`` and ``MemoryMap`` under ``copy.copy``, ``copy.deepcopy`` and pickle: round
trips are equal, copies are independent, a big sparse bitmap pickles to the chunks that are set
in it, and a state that does not fit is refused without changing the bitmap."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagehint import DirtyBitmap, MemoryMap

KiB = 1 << 10
PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)
Copier = Callable[[Any], Any]
COPIERS: list[tuple[str, Copier]] = [
    ("copy", copy.copy),
    ("deepcopy", copy.deepcopy),
    *[(f"pickle{p}", lambda x, p=p: pickle.loads(pickle.dumps(x, protocol=p))) for p in PROTOCOLS],
]
COPIER_PARAMS = [pytest.param(c, id=i) for i, c in COPIERS]


def seeded(npages: int) -> DirtyBitmap:
    """A bitmap with ranges at its start, around word and 4 KiB-chunk boundaries, and its end."""
    bm = DirtyBitmap(npages)
    for start, n in [(0, 1), (60, 10), (32760, 20), (npages - 3, 3)]:
        if start >= 0 and start + n <= npages:
            bm.set_range(start, n)
    return bm


@pytest.mark.parametrize("copier", COPIER_PARAMS)
@pytest.mark.parametrize("npages", [0, 1, 63, 64, 65, 1000, 32768 + 5, 100_000, 1 << 21])
def test_bitmap_copies_are_equal_and_independent(copier: Copier, npages: int) -> None:
    bm = seeded(npages)
    before = bm.words().copy()
    c = copier(bm)
    assert type(c) is DirtyBitmap and c is not bm
    assert c == bm and c.npages == npages and c.count() == bm.count()
    assert np.array_equal(c.words(), before)
    if npages:
        c.set_all()
        assert bm.count() == int(np.unpackbits(before.view(np.uint8)).sum())
        bm.clear_all()
        assert c.count() == npages


@settings(max_examples=100, deadline=None)
@given(
    npages=st.integers(0, 70_000),
    ranges=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 5000)), max_size=10),
    protocol=st.sampled_from(list(PROTOCOLS)),
)
def test_pickle_round_trips_any_bitmap(
    npages: int, ranges: list[tuple[float, int]], protocol: int
) -> None:
    bm = DirtyBitmap(npages)
    for at, n in ranges:
        start = min(int(at * npages), npages)
        bm.set_range(start, min(n, npages - start))
    back = pickle.loads(pickle.dumps(bm, protocol=protocol))
    assert back == bm
    assert np.array_equal(back.words(), bm.words())


def test_deepcopy_keeps_shared_bitmaps_shared() -> None:
    bm = seeded(1000)
    a, b = copy.deepcopy([bm, bm])
    assert a is b and a is not bm and a == bm


@pytest.mark.slow
def test_a_big_sparse_bitmap_pickles_small() -> None:
    npages = 2**36  # 8 GiB of words
    bm = DirtyBitmap(npages)
    ranges = [(0, 1), (npages // 3, 5000), (npages // 2 - 7, 100), (npages - 70, 70)]
    for start, n in ranges:
        bm.set_range(start, n)
    data = pickle.dumps(bm, protocol=pickle.HIGHEST_PROTOCOL)
    # Each range lies in at most two 4 KiB chunks of words.
    assert len(data) < 2 * len(ranges) * 4 * KiB + KiB, f"{len(data)} bytes"
    back = pickle.loads(data)
    assert back.count() == sum(n for _, n in ranges)
    assert back.dirty_runs()[0].tolist() == [s for s, _ in ranges]
    assert back == bm


def test_a_dense_bitmap_pickles_to_its_words() -> None:
    bm = DirtyBitmap(1 << 24, dirty=True)
    data = pickle.dumps(bm, protocol=pickle.HIGHEST_PROTOCOL)
    assert bm.nbytes < len(data) < bm.nbytes * 1.01 + KiB
    assert len(pickle.dumps(DirtyBitmap(1 << 24))) < 200


BAD_STATES: list[tuple[str, object, type[Exception], str]] = [
    ("not a tuple", b"", TypeError, "state"),
    ("two items", (512, b""), TypeError, "state"),
    ("str words", (512, b"", ""), TypeError, "state"),
    ("other chunk size", (256, b"", b""), ValueError, "chunks of 256"),
    ("partial index", (512, b"\0" * 7, b""), ValueError, "whole u64s"),
    ("chunk past the end", (512, (5).to_bytes(8, "little"), b"\0" * 8 * 512), ValueError, "past"),
    ("missing words", (512, (0).to_bytes(8, "little"), b"\0" * 8), ValueError, "hold"),
    (
        "unsorted",
        (512, (1).to_bytes(8, "little") + (0).to_bytes(8, "little"), b"\0" * 8 * 1024),
        ValueError,
        "not after",
    ),
    ("tail bits", (512, (1).to_bytes(8, "little"), b"\xff" * 8 * 4), ValueError, "past"),
]


@pytest.mark.parametrize(
    ("state", "exc", "match"), [pytest.param(s, e, m, id=i) for i, s, e, m in BAD_STATES]
)
def test_a_state_that_does_not_fit_changes_nothing(
    state: object, exc: type[Exception], match: str
) -> None:
    bm = seeded(512 * 64 + 200)  # two chunks, the second of four words with an 8-bit tail
    before = bm.words().copy()
    with pytest.raises(exc, match=match) as info:
        bm.__setstate__(state)  # type: ignore[arg-type]
    assert info.type is exc
    assert np.array_equal(bm.words(), before)


def test_setstate_replaces_the_contents() -> None:
    src, dst = seeded(5000), DirtyBitmap(5000, dirty=True)
    dst.__setstate__(src.__reduce__()[2])
    assert dst == src


@pytest.mark.parametrize("copier", COPIER_PARAMS)
@pytest.mark.parametrize(
    "memmap",
    [
        MemoryMap.x86(6 << 30),
        MemoryMap([(1 << 32, 1 << 20), (0, 1 << 20)], page_size=16384),
        MemoryMap([]),
    ],
    ids=["x86", "unordered 16k", "empty"],
)
def test_memory_map_copies_are_equal(copier: Copier, memmap: MemoryMap) -> None:
    c = copier(memmap)
    assert type(c) is MemoryMap and c is not memmap
    assert c == memmap
    assert (c.regions, c.page_size, c.npages) == (memmap.regions, memmap.page_size, memmap.npages)
    if memmap.npages:
        assert c.gpa_of(memmap.npages - 1) == memmap.gpa_of(memmap.npages - 1)
