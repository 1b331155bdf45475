"""Every refused call raises the contract's exception and leaves the bitmap exactly as it was;
the words() view is read-only, keeps its bitmap alive, and may be fed back in."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from model import ModelBitmap
from pagehint import DirtyBitmap

U64Array = npt.NDArray[np.uint64]

N = 1000  # not a multiple of 64: the last word has 24 tail bits that must stay zero
SEED_RANGES = [(0, 1), (5, 100), (63, 3), (127, 2), (600, 37), (990, 10)]


def u64(*values: int) -> U64Array:
    return np.array(values, dtype=np.uint64)


def seeded(npages: int = N) -> DirtyBitmap:
    bm = DirtyBitmap(npages)
    for s, n in SEED_RANGES:
        if s + n <= npages:
            bm.set_range(s, n)
    return bm


def strided(*values: int) -> U64Array:
    """A non-contiguous uint64 array holding ``values``."""
    base = np.zeros(2 * len(values), dtype=np.uint64)
    base[::2] = values
    view: U64Array = base[::2]
    assert not view.flags.c_contiguous or len(values) <= 1
    return view


def log_with_page(page: int, words: int, offset: int = 0) -> U64Array:
    """A dirty log of ``words`` words (at ``offset``) with page ``page`` set."""
    log = np.zeros(words, dtype=np.uint64)
    rel = page - offset
    log[rel // 64] = np.uint64(1 << (rel % 64))
    return log


# The bitmap is typed Any in the tables: they pass wrong types on purpose.
Call = Callable[[Any], object]
WRAP = 2**64  # values at or past this wrap a u64


def ranges_cases(op: str) -> list[tuple[str, Call, type[Exception]]]:
    """``clear_ranges`` and ``set_ranges`` share their argument checks: the same table."""
    return [
        (
            f"{op} int64 starts",
            lambda b: getattr(b, op)(np.array([5], np.int64), u64(1)),
            TypeError,
        ),
        (
            f"{op} int64 counts",
            lambda b: getattr(b, op)(u64(5), np.array([1], np.int64)),
            TypeError,
        ),
        (
            f"{op} uint32",
            lambda b: getattr(b, op)(np.array([5], np.uint32), np.array([1], np.uint32)),
            TypeError,
        ),
        (f"{op} float64", lambda b: getattr(b, op)(np.array([5.0]), u64(1)), TypeError),
        (
            f"{op} big-endian",
            lambda b: getattr(b, op)(np.array([5], ">u8"), np.array([1], ">u8")),
            TypeError,
        ),
        (f"{op} list", lambda b: getattr(b, op)([5], [1]), TypeError),
        (f"{op} None", lambda b: getattr(b, op)(None, u64(1)), TypeError),
        (
            f"{op} 2-D",
            lambda b: getattr(b, op)(u64(5, 6).reshape(1, 2), u64(1, 1).reshape(1, 2)),
            TypeError,
        ),
        (f"{op} 2-D counts", lambda b: getattr(b, op)(u64(5), u64(1).reshape(1, 1)), TypeError),
        (
            f"{op} 0-D",
            lambda b: getattr(b, op)(np.array(5, np.uint64), np.array(1, np.uint64)),
            TypeError,
        ),
        (f"{op} strided starts", lambda b: getattr(b, op)(strided(5, 600), u64(1, 1)), ValueError),
        (f"{op} strided counts", lambda b: getattr(b, op)(u64(5, 600), strided(1, 1)), ValueError),
        (f"{op} reversed", lambda b: getattr(b, op)(u64(5, 600)[::-1], u64(1, 1)), ValueError),
        (f"{op} length mismatch", lambda b: getattr(b, op)(u64(5, 600), u64(1)), ValueError),
        (f"{op} empty vs one", lambda b: getattr(b, op)(u64(), u64(1)), ValueError),
        (
            f"{op} last past end",
            lambda b: getattr(b, op)(u64(0, 5, 600, N - 1), u64(1, 100, 37, 2)),
            IndexError,
        ),
        (
            f"{op} last empty past end",
            lambda b: getattr(b, op)(u64(5, N + 1), u64(100, 0)),
            IndexError,
        ),
        (f"{op} last wraps", lambda b: getattr(b, op)(u64(5, 2**64 - 1), u64(100, 2)), IndexError),
        (
            f"{op} last n wraps",
            lambda b: getattr(b, op)(u64(5, 10), u64(100, 2**64 - 5)),
            IndexError,
        ),
        (f"{op} first past end", lambda b: getattr(b, op)(u64(N, 5), u64(1, 100)), IndexError),
    ]


# (id, call, exception). Every call is made on a seeded bitmap of N pages.
CASES: list[tuple[str, Call, type[Exception]]] = [
    # set_range / clear_range: positions, counts, ends, overflow, types
    ("set_range neg start", lambda b: b.set_range(-1, 1), IndexError),
    ("set_range neg n", lambda b: b.set_range(0, -1), ValueError),
    ("set_range huge neg start", lambda b: b.set_range(-(2**70), 1), IndexError),
    ("set_range huge neg n", lambda b: b.set_range(0, -(2**70)), ValueError),
    ("set_range start at end n=1", lambda b: b.set_range(N, 1), IndexError),
    ("set_range past end by one", lambda b: b.set_range(N - 1, 2), IndexError),
    ("set_range whole+1", lambda b: b.set_range(0, N + 1), IndexError),
    ("set_range empty past end", lambda b: b.set_range(N + 1, 0), IndexError),
    ("set_range wrap start", lambda b: b.set_range(WRAP - 1, 2), IndexError),
    ("set_range wrap n", lambda b: b.set_range(10, WRAP - 5), IndexError),
    ("set_range wrap both", lambda b: b.set_range(2**63, 2**63 + 10), IndexError),
    ("set_range start 2**64", lambda b: b.set_range(WRAP, 0), IndexError),
    ("set_range start 2**70", lambda b: b.set_range(2**70, 1), IndexError),
    ("set_range n 2**70", lambda b: b.set_range(0, 2**70), IndexError),
    ("set_range float start", lambda b: b.set_range(1.0, 1), TypeError),
    ("set_range float n", lambda b: b.set_range(0, 1.0), TypeError),
    ("set_range np.float64", lambda b: b.set_range(np.float64(3), 1), TypeError),
    ("set_range str", lambda b: b.set_range("0", 1), TypeError),
    ("set_range None start", lambda b: b.set_range(None, 1), TypeError),
    ("set_range None n", lambda b: b.set_range(0, None), TypeError),
    ("set_range missing n", lambda b: b.set_range(0), TypeError),
    ("clear_range neg start", lambda b: b.clear_range(-1, 1), IndexError),
    ("clear_range neg n", lambda b: b.clear_range(0, -1), ValueError),
    ("clear_range past end", lambda b: b.clear_range(5, N), IndexError),
    ("clear_range empty past end", lambda b: b.clear_range(N + 1, 0), IndexError),
    ("clear_range wrap", lambda b: b.clear_range(WRAP - 1, 2), IndexError),
    ("clear_range wrap n", lambda b: b.clear_range(5, WRAP - 1), IndexError),
    ("clear_range 2**70", lambda b: b.clear_range(0, 2**70), IndexError),
    ("clear_range float", lambda b: b.clear_range(0.0, 5), TypeError),
    ("clear_range str n", lambda b: b.clear_range(0, "5"), TypeError),
    # count
    ("count neg start", lambda b: b.count(-1), IndexError),
    ("count neg n", lambda b: b.count(0, -1), ValueError),
    ("count start past end", lambda b: b.count(N + 1), IndexError),
    ("count range past end", lambda b: b.count(5, N), IndexError),
    ("count wrap", lambda b: b.count(WRAP - 1, 2), IndexError),
    ("count 2**70", lambda b: b.count(2**70), IndexError),
    ("count float", lambda b: b.count(1.5), TypeError),
    ("count float n", lambda b: b.count(0, 2.0), TypeError),
    # test / test_and_clear
    ("test neg", lambda b: b.test(-1), IndexError),
    ("test at end", lambda b: b.test(N), IndexError),
    ("test 2**64", lambda b: b.test(WRAP), IndexError),
    ("test 2**70", lambda b: b.test(2**70), IndexError),
    ("test float", lambda b: b.test(5.0), TypeError),
    ("test None", lambda b: b.test(None), TypeError),
    ("test_and_clear neg", lambda b: b.test_and_clear(-1), IndexError),
    ("test_and_clear at end", lambda b: b.test_and_clear(N), IndexError),
    ("test_and_clear 2**70", lambda b: b.test_and_clear(2**70), IndexError),
    ("test_and_clear float", lambda b: b.test_and_clear(5.0), TypeError),
    ("test_and_clear str", lambda b: b.test_and_clear("5"), TypeError),
    # next_dirty
    ("next_dirty neg", lambda b: b.next_dirty(-1), IndexError),
    ("next_dirty past end", lambda b: b.next_dirty(N + 1), IndexError),
    ("next_dirty 2**70", lambda b: b.next_dirty(2**70), IndexError),
    ("next_dirty float", lambda b: b.next_dirty(0.0), TypeError),
    # take_dirty
    ("take_dirty neg max", lambda b: b.take_dirty(-1), ValueError),
    ("take_dirty huge neg max", lambda b: b.take_dirty(-(2**70)), ValueError),
    ("take_dirty neg start", lambda b: b.take_dirty(10, -1), IndexError),
    ("take_dirty start past end", lambda b: b.take_dirty(10, N + 1), IndexError),
    ("take_dirty start 2**70", lambda b: b.take_dirty(10, 2**70), IndexError),
    ("take_dirty float max", lambda b: b.take_dirty(10.0), TypeError),
    ("take_dirty float start", lambda b: b.take_dirty(10, 1.0), TypeError),
    ("take_dirty None max", lambda b: b.take_dirty(None), TypeError),
    # take_dirty_runs
    ("take_dirty_runs neg max", lambda b: b.take_dirty_runs(-1), ValueError),
    ("take_dirty_runs neg start", lambda b: b.take_dirty_runs(10, -1), IndexError),
    ("take_dirty_runs start past end", lambda b: b.take_dirty_runs(10, N + 1), IndexError),
    ("take_dirty_runs float max", lambda b: b.take_dirty_runs(10.0), TypeError),
    ("take_dirty_runs None max", lambda b: b.take_dirty_runs(None), TypeError),
    # dirty_runs
    ("dirty_runs neg start", lambda b: b.dirty_runs(-1), IndexError),
    ("dirty_runs neg n", lambda b: b.dirty_runs(0, -1), ValueError),
    ("dirty_runs start past end", lambda b: b.dirty_runs(N + 1), IndexError),
    ("dirty_runs range past end", lambda b: b.dirty_runs(1, N), IndexError),
    ("dirty_runs wrap", lambda b: b.dirty_runs(WRAP - 1, 2), IndexError),
    ("dirty_runs float", lambda b: b.dirty_runs(0.5), TypeError),
    ("dirty_runs float n", lambda b: b.dirty_runs(0, 3.0), TypeError),
    # clear_ranges and set_ranges: array types, shapes, layout, lengths
    *ranges_cases("clear_ranges"),
    *ranges_cases("set_ranges"),
    # merge_log
    ("merge_log offset 1", lambda b: b.merge_log(u64(1), 1), ValueError),
    ("merge_log offset 63", lambda b: b.merge_log(u64(1), 63), ValueError),
    ("merge_log offset 65", lambda b: b.merge_log(u64(1), 65), ValueError),
    ("merge_log offset neg", lambda b: b.merge_log(u64(1), -64), IndexError),
    ("merge_log offset past end", lambda b: b.merge_log(u64(1), 1024), IndexError),
    ("merge_log empty log past end", lambda b: b.merge_log(u64(), 1024), IndexError),
    ("merge_log offset 2**64", lambda b: b.merge_log(u64(1), WRAP), IndexError),
    ("merge_log offset 2**70", lambda b: b.merge_log(u64(1), 2**70), IndexError),
    ("merge_log offset float", lambda b: b.merge_log(u64(1), 64.0), TypeError),
    ("merge_log bit at npages", lambda b: b.merge_log(log_with_page(N, 16)), IndexError),
    ("merge_log last tail bit", lambda b: b.merge_log(log_with_page(1023, 16)), IndexError),
    (
        "merge_log bit in extra word",
        lambda b: b.merge_log(log_with_page(1024 + 70, 18)),
        IndexError,
    ),
    (
        "merge_log tail bit at offset",
        lambda b: b.merge_log(log_with_page(N, 1, 960), 960),
        IndexError,
    ),
    (
        "merge_log tail after valid words",
        lambda b: b.merge_log(np.concatenate([np.full(15, 2**64 - 1, np.uint64), u64(1 << 40)])),
        IndexError,
    ),
    ("merge_log int64", lambda b: b.merge_log(np.array([1], np.int64)), TypeError),
    ("merge_log uint32", lambda b: b.merge_log(np.array([1, 1], np.uint32)), TypeError),
    ("merge_log big-endian", lambda b: b.merge_log(np.array([1], ">u8")), TypeError),
    ("merge_log bytes", lambda b: b.merge_log(b"\xff" * 8), TypeError),
    ("merge_log list", lambda b: b.merge_log([1]), TypeError),
    ("merge_log 2-D", lambda b: b.merge_log(np.full((2, 2), 2**64 - 1, np.uint64)), TypeError),
    ("merge_log strided", lambda b: b.merge_log(strided(2**64 - 1, 2**64 - 1)), ValueError),
    (
        "merge_log F-order 2-D",
        lambda b: b.merge_log(np.asfortranarray(np.ones((2, 2), np.uint64))),
        TypeError,
    ),
]


@pytest.fixture
def bm() -> DirtyBitmap:
    return seeded()


@pytest.mark.parametrize(("call", "exc"), [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_refused_call_changes_nothing(bm: DirtyBitmap, call: Call, exc: type[Exception]) -> None:
    before = bm.words().copy()
    count_before = bm.count()
    with pytest.raises(exc) as info:
        call(bm)
    # The exact type: e.g. IndexError where ValueError is due (or vice versa) is a failure.
    assert info.type is exc, f"raised {info.type.__name__}: {info.value}"
    assert str(info.value), "the exception has no message"
    assert bm.words().tolist() == before.tolist(), "a refused call changed the bitmap"
    assert bm.count() == count_before
    assert bm.npages == N


def test_refused_calls_are_checked_against_the_model() -> None:
    """The model raises the same exception for the cases it can express (keeps both honest)."""
    for case_id, call, exc in CASES:
        model = ModelBitmap(N)
        for s, n in SEED_RANGES:
            model.set_range(s, n)
        with pytest.raises(exc):
            call(model)
        assert model == ModelBitmap.from_words(N, seeded().words()), case_id


AnyBitmap: Any = DirtyBitmap

CTOR_CASES: list[tuple[str, Callable[[], object], type[Exception]]] = [
    ("negative", lambda: AnyBitmap(-1), ValueError),
    ("huge negative", lambda: AnyBitmap(-(2**70)), ValueError),
    ("float", lambda: AnyBitmap(64.0), TypeError),
    ("str", lambda: AnyBitmap("64"), TypeError),
    ("None", lambda: AnyBitmap(None), TypeError),
    ("dirty positional", lambda: AnyBitmap(64, True), TypeError),
    ("2**70 pages", lambda: AnyBitmap(2**70), ValueError),
]


@pytest.mark.parametrize(("call", "exc"), [pytest.param(c, e, id=i) for i, c, e in CTOR_CASES])
def test_refused_constructor(call: Callable[[], object], exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        call()
    assert info.type is exc, f"raised {info.type.__name__}: {info.value}"


# -- edge calls that must be accepted ------------------------------------------------------

Accepted = Callable[[Any, ModelBitmap], tuple[object, object]]
ACCEPTED: list[tuple[str, Accepted]] = [
    ("empty range at end", lambda b, m: (b.set_range(N, 0), m.set_range(N, 0))),
    ("empty clear at end", lambda b, m: (b.clear_range(N, 0), m.clear_range(N, 0))),
    ("count at end", lambda b, m: (b.count(N), m.count(N))),
    ("count empty at end", lambda b, m: (b.count(N, 0), m.count(N, 0))),
    ("next_dirty at end", lambda b, m: (b.next_dirty(N), m.next_dirty(N))),
    ("take_dirty at end", lambda b, m: (b.take_dirty(5, N).tolist(), m.take_dirty(5, N).tolist())),
    ("take_dirty zero", lambda b, m: (b.take_dirty(0).tolist(), m.take_dirty(0).tolist())),
    (
        "take_dirty huge max",
        lambda b, m: (b.take_dirty(2**70, 600).tolist(), m.take_dirty(2**70, 600).tolist()),
    ),
    ("dirty_runs at end", lambda b, m: (b.dirty_runs(N)[0].tolist(), m.dirty_runs(N)[0].tolist())),
    (
        "take_dirty_runs huge max",
        lambda b, m: (
            [a.tolist() for a in b.take_dirty_runs(2**70, 600)],
            [a.tolist() for a in m.take_dirty_runs(2**70, 600)],
        ),
    ),
    (
        "numpy int args",
        lambda b, m: (b.set_range(np.int64(200), np.uint64(3)), m.set_range(200, 3)),
    ),
    ("numpy uint64 pfn", lambda b, m: (b.test_and_clear(np.uint64(5)), m.test_and_clear(5))),
    ("bool args", lambda b, m: (b.test(True), m.test(1))),
    ("keyword args", lambda b, m: (b.count(start=5, n=10), m.count(5, 10))),
    (
        "keyword take",
        lambda b, m: (b.take_dirty(max_pages=3, start=6).tolist(), m.take_dirty(3, 6).tolist()),
    ),
    ("empty clear_ranges", lambda b, m: (b.clear_ranges(u64(), u64()), 0)),
    ("empty set_ranges", lambda b, m: (b.set_ranges(u64(), u64()), 0)),
    (
        "set_ranges to the end",
        lambda b, m: (b.set_ranges(u64(990, 0), u64(10, N)), m.set_ranges(u64(990, 0), u64(10, N))),
    ),
    (
        "set_ranges overlapping",
        lambda b, m: (
            b.set_ranges(u64(5, 7, 5), u64(10, 2, 1)),
            m.set_ranges(u64(5, 7, 5), u64(10, 2, 1)),
        ),
    ),
    (
        "clear_ranges to the end",
        lambda b, m: (
            b.clear_ranges(u64(990, 0), u64(10, N)),
            m.clear_ranges(u64(990, 0), u64(10, N)),
        ),
    ),
    (
        "clear_ranges read-only input",
        lambda b, m: (
            b.clear_ranges(_readonly(u64(5)), _readonly(u64(10))),
            m.clear_ranges(u64(5), u64(10)),
        ),
    ),
    (
        "clear_ranges 1-element strided",
        lambda b, m: (b.clear_ranges(u64(5, 6)[:1], u64(3, 4)[:1]), m.clear_ranges(u64(5), u64(3))),
    ),
    ("merge_log empty", lambda b, m: (b.merge_log(u64()), 0)),
    (
        "merge_log at last word",
        lambda b, m: (b.merge_log(u64((1 << 40) - 1), 960), m.merge_log(u64((1 << 40) - 1), 960)),
    ),
    (
        "merge_log long zero tail",
        lambda b, m: (
            b.merge_log(np.concatenate([u64(1 << 7), np.zeros(100, np.uint64)])),
            m.merge_log(u64(1 << 7)),
        ),
    ),
    (
        "merge_log keyword",
        lambda b, m: (b.merge_log(log=u64(2), page_offset=64), m.merge_log(u64(2), 64)),
    ),
    (
        "merge_log read-only",
        lambda b, m: (b.merge_log(_readonly(u64(1 << 9))), m.merge_log(u64(1 << 9))),
    ),
]


def _readonly(a: U64Array) -> U64Array:
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in ACCEPTED])
def test_edge_call_accepted(call: Accepted) -> None:
    bm = seeded()
    model = ModelBitmap.from_words(N, bm.words())
    got, want = call(bm, model)
    assert got == want
    assert bm.words().tolist() == model.words().tolist()


def test_merge_log_at_offset_npages_on_word_boundary() -> None:
    bm = seeded(1024)
    before = bm.words().copy()
    assert bm.merge_log(u64(), 1024) == 0
    assert bm.merge_log(np.zeros(3, np.uint64), 1024) == 0
    assert bm.words().tolist() == before.tolist()
    with pytest.raises(IndexError):
        bm.merge_log(u64(1), 1024)
    with pytest.raises(IndexError):
        bm.merge_log(u64(0), 1088)
    assert bm.words().tolist() == before.tolist()


# -- the words() view ----------------------------------------------------------------------


def test_words_view_is_read_only() -> None:
    bm = seeded()
    w = bm.words()
    before = w.copy()
    assert w.dtype == np.uint64 and w.shape == ((N + 63) // 64,)
    assert w.nbytes == bm.nbytes
    assert not w.flags.writeable
    with pytest.raises(ValueError):
        w[0] = 0
    with pytest.raises(ValueError):
        w[:] = 2**64 - 1
    with pytest.raises(ValueError):
        w += np.uint64(1)
    with pytest.raises(ValueError):
        w.flags.writeable = True
    with pytest.raises(ValueError):
        w.setflags(write=True)
    # Views of the view cannot be made writeable either.
    v = w[2:5]
    with pytest.raises(ValueError):
        v.flags.writeable = True
    a = np.asarray(w)
    with pytest.raises(ValueError):
        a.setflags(write=True)
    with pytest.raises(ValueError):
        np.copyto(w, np.zeros_like(before))
    assert bm.words().tolist() == before.tolist()


def test_words_view_is_live_and_zero_copy() -> None:
    bm = DirtyBitmap(200)
    w = bm.words()
    assert not w.any()
    bm.set_range(60, 10)
    assert w.tolist() == [0xF << 60, 0x3F, 0, 0]
    bm.set_all()
    assert w.tolist() == [2**64 - 1] * 3 + [(1 << 8) - 1]
    bm.clear_all()
    assert not w.any()
    # Two views share the memory.
    assert np.shares_memory(w, bm.words())
    assert bm.words().ctypes.data == w.ctypes.data


def test_words_view_keeps_bitmap_alive() -> None:
    bm = seeded()
    expected = bm.words().tolist()
    ref = weakref.ref(bm) if _weakrefable(bm) else None
    w = bm.words()
    del bm
    gc.collect()
    if ref is not None:
        assert ref() is not None, "the view does not keep the bitmap alive"
    # Fill the heap with other allocations; a dangling view would read their data.
    junk = [DirtyBitmap(N, dirty=True) for _ in range(50)]
    blobs = [np.full(16, 0xAB, dtype=np.uint64) for _ in range(200)]
    assert w.tolist() == expected
    del junk, blobs
    sub = w[3:]
    del w
    gc.collect()
    assert sub.tolist() == expected[3:]


def test_words_view_of_large_bitmap_survives_del() -> None:
    """512 KiB of words: large enough that freeing them would unmap the memory, so a view that
    did not keep the bitmap alive would crash or read garbage here."""
    npages = 64 * 65536
    bm = DirtyBitmap(npages, dirty=True)
    bm.clear_range(64 * 100, 64)
    w = bm.words()
    del bm
    gc.collect()
    _churn = [np.ones(65536, dtype=np.uint64) for _ in range(8)]
    assert w.size == 65536
    assert int(w[100]) == 0
    assert int((w == np.uint64(2**64 - 1)).sum()) == 65535
    del _churn


def _weakrefable(obj: object) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def test_words_of_empty_bitmap() -> None:
    bm = DirtyBitmap(0)
    w = bm.words()
    assert w.shape == (0,) and w.dtype == np.uint64
    assert bm.nbytes == 0
    assert bm.merge_log(w) == 0
    assert bm.clear_ranges(w, w) == 0


# -- aliasing: the bitmap's own words as input ---------------------------------------------


def test_merge_own_words_adds_nothing() -> None:
    bm = seeded()
    before = bm.words().copy()
    assert bm.merge_log(bm.words()) == 0
    assert bm.words().tolist() == before.tolist()
    assert bm.merge_log(bm.words()[3:], 64 * 3) == 0
    assert bm.words().tolist() == before.tolist()


@pytest.mark.parametrize("shift", [1, 2, 3, 7, 8, 9])
def test_merge_own_words_shifted(shift: int) -> None:
    """Merging words()[:-shift] at offset 64*shift reads words the merge writes: the result must
    be that of merging a snapshot taken before the call."""
    npages = 64 * 40
    rng = np.random.default_rng(shift)
    bm = DirtyBitmap(npages)
    bm.merge_log(
        rng.integers(0, 2**64, size=40, dtype=np.uint64)
        & rng.integers(0, 2**64, size=40, dtype=np.uint64)
    )
    model = ModelBitmap.from_words(npages, bm.words())
    snapshot = bm.words()[:-shift].copy()
    want = model.merge_log(snapshot, 64 * shift)
    assert bm.merge_log(bm.words()[:-shift], 64 * shift) == want
    assert bm.words().tolist() == model.words().tolist()
    # And the other direction (reading words after the ones written).
    snapshot = bm.words()[shift:].copy()
    want = model.merge_log(snapshot, 0)
    assert bm.merge_log(bm.words()[shift:], 0) == want
    assert bm.words().tolist() == model.words().tolist()


def test_merge_other_bitmaps_words() -> None:
    a = seeded()
    b = DirtyBitmap(N)
    b.set_range(300, 50)
    b.set_range(5, 3)
    model = ModelBitmap.from_words(N, a.words())
    want = model.merge_log(b.words().copy())
    assert a.merge_log(b.words()) == want
    assert a.words().tolist() == model.words().tolist()
    # A log from a longer bitmap with nothing past our end is fine.
    big = DirtyBitmap(4 * N)
    big.set_range(10, 20)
    assert a.merge_log(big.words()) == model.merge_log(big.words().copy())
    big.set_range(N, 1)
    before = a.words().copy()
    with pytest.raises(IndexError):
        a.merge_log(big.words())
    assert a.words().tolist() == before.tolist()


def test_clear_ranges_with_own_words_as_counts() -> None:
    """counts aliases the words the first range clears; the second range must use the count the
    array held when the call was made."""
    bm = DirtyBitmap(4096)
    bm.set_range(2, 1)
    bm.set_range(5, 2)  # word 0 = 0b1100100 = 100
    bm.set_range(64, 2)  # word 1 = 3
    bm.set_range(200, 3)
    w = bm.words()
    assert w[:2].tolist() == [100, 3]
    model = ModelBitmap.from_words(4096, w)
    starts = u64(0, 200)
    want = model.clear_ranges(starts, w[:2].copy())
    assert want == 8
    assert bm.clear_ranges(starts, bm.words()[:2]) == want
    assert bm.words().tolist() == model.words().tolist()
    assert bm.count() == 0


def test_clear_ranges_with_own_words_as_starts() -> None:
    bm = DirtyBitmap(4096)
    bm.set_range(3, 1)
    bm.set_range(8, 1)  # word 0 = 264
    bm.set_range(264, 10)
    model = ModelBitmap.from_words(4096, bm.words())
    counts = u64(5)
    want = model.clear_ranges(bm.words()[:1].copy(), counts)
    assert bm.clear_ranges(bm.words()[:1], counts) == want == 5
    assert bm.words().tolist() == model.words().tolist()


def test_equality_with_other_types() -> None:
    bm = seeded()
    assert (bm == 5) is False
    assert (bm != 5) is True
    assert (bm == None) is False  # noqa: E711 - __eq__ with None, on purpose
    assert not (bm == ModelBitmap(N))  # noqa: SIM201 - __eq__ itself, not __ne__
    assert bm != ModelBitmap(N)
    assert (bm == "DirtyBitmap") is False
