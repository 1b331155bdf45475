"""DirtyBitmap against the pure-Python reference model: a stateful machine over every method,
plus property tests for unaligned heads and tails around word boundaries."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from model import ModelBitmap, int_to_words
from pagehint import DirtyBitmap

U64Array = npt.NDArray[np.uint64]

# Sizes that put the end of the bitmap on, just before and just after word and 8-word-chunk
# boundaries, plus arbitrary ones up to a few thousand pages.
BOUNDARY_SIZES = [0, 1, 2, 63, 64, 65, 127, 128, 129, 511, 512, 513, 575, 576, 577, 1023, 1024]
SIZES = st.one_of(
    st.sampled_from(BOUNDARY_SIZES),
    st.integers(min_value=0, max_value=4200),
    st.integers(min_value=0, max_value=70).map(lambda k: 64 * k),
)


def u64(values: list[int]) -> U64Array:
    return np.array(values, dtype=np.uint64)


def assert_same_array(actual: object, expected: U64Array, what: str) -> None:
    assert isinstance(actual, np.ndarray), f"{what}: {type(actual)} is not an ndarray"
    assert actual.dtype == np.uint64, f"{what}: dtype {actual.dtype}"
    assert actual.ndim == 1, f"{what}: ndim {actual.ndim}"
    assert actual.tolist() == expected.tolist(), f"{what}: {actual.tolist()} != {expected.tolist()}"


def assert_words(bm: DirtyBitmap, model: ModelBitmap) -> None:
    w = bm.words()
    assert w.dtype == np.uint64
    assert w.shape == (model.nwords,)
    assert w.tolist() == model.words().tolist()
    if model.npages % 64:
        assert int(w[-1]) >> (model.npages % 64) == 0, "bits past npages are set"


def position(data: st.DataObject, lo: int, hi: int, label: str) -> int:
    """A position in ``[lo, hi]``, often on or next to a word or chunk boundary."""
    if hi <= lo:
        return lo
    near_word = st.integers(lo // 64, hi // 64 + 1).flatmap(
        lambda k: st.integers(64 * k - 2, 64 * k + 2)
    )
    near_chunk = st.integers(lo // 512, hi // 512 + 1).flatmap(
        lambda k: st.integers(512 * k - 1, 512 * k + 1)
    )
    v = data.draw(
        st.one_of(
            st.integers(lo, hi),
            near_word,
            near_chunk,
            st.sampled_from([lo, hi]),
        ),
        label=label,
    )
    return min(max(v, lo), hi)


def page_range(data: st.DataObject, npages: int) -> tuple[int, int]:
    start = position(data, 0, npages, "start")
    end = position(data, start, npages, "end")
    return start, end - start


class BitmapMachine(RuleBasedStateMachine):
    """The real bitmap and the model, driven by the same calls."""

    def __init__(self) -> None:
        super().__init__()
        self.npages = 0
        self.bm = DirtyBitmap(0)
        self.model = ModelBitmap(0)
        self.view: U64Array = self.bm.words()
        self.cursor = 0
        # Other bitmaps (copies, or built independently) compared with == and !=.
        self.others: list[tuple[DirtyBitmap, ModelBitmap]] = []

    @initialize(npages=SIZES, dirty=st.booleans())
    def create(self, npages: int, dirty: bool) -> None:
        self.npages = npages
        self.bm = DirtyBitmap(npages, dirty=dirty)
        self.model = ModelBitmap(npages, dirty=dirty)
        # Taken once: the view is live, so it must track every later change.
        self.view = self.bm.words()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def words_match(self) -> None:
        assert_words(self.bm, self.model)
        assert self.view.tolist() == self.model.words().tolist(), "live view went stale"

    @invariant()
    def sizes(self) -> None:
        assert len(self.bm) == self.npages
        assert self.bm.npages == self.npages
        assert self.bm.nbytes == 8 * ((self.npages + 63) // 64)

    # -- ranges ----------------------------------------------------------------------------

    @rule(data=st.data())
    def set_range(self, data: st.DataObject) -> None:
        start, n = page_range(data, self.npages)
        assert self.bm.set_range(start, n) == self.model.set_range(start, n)

    @rule(data=st.data())
    def clear_range(self, data: st.DataObject) -> None:
        start, n = page_range(data, self.npages)
        assert self.bm.clear_range(start, n) == self.model.clear_range(start, n)

    @rule(data=st.data())
    def count(self, data: st.DataObject) -> None:
        start, n = page_range(data, self.npages)
        assert self.bm.count(start, n) == self.model.count(start, n)
        assert self.bm.count(start) == self.model.count(start)
        assert self.bm.count(start, None) == self.model.count(start, None)
        assert self.bm.count() == self.model.count()

    @precondition(lambda self: self.npages > 0)
    @rule(data=st.data())
    def test_page(self, data: st.DataObject) -> None:
        pfn = position(data, 0, self.npages - 1, "pfn")
        assert self.bm.test(pfn) is self.model.test(pfn)

    @precondition(lambda self: self.npages > 0)
    @rule(data=st.data())
    def test_and_clear(self, data: st.DataObject) -> None:
        pfn = position(data, 0, self.npages - 1, "pfn")
        assert self.bm.test_and_clear(pfn) is self.model.test_and_clear(pfn)
        assert self.bm.test(pfn) is False

    @rule()
    def set_all(self) -> None:
        assert self.bm.set_all() is None  # type: ignore[func-returns-value]
        self.model.set_all()
        assert self.bm.count() == self.npages

    @rule()
    def clear_all(self) -> None:
        assert self.bm.clear_all() is None  # type: ignore[func-returns-value]
        self.model.clear_all()
        assert self.bm.next_dirty() is None

    # -- batches ---------------------------------------------------------------------------

    @rule(data=st.data(), k=st.integers(0, 40), overlap=st.booleans(), setting=st.booleans())
    def set_or_clear_ranges(
        self, data: st.DataObject, k: int, overlap: bool, setting: bool
    ) -> None:
        ranges = [page_range(data, self.npages) for _ in range(k)]
        if overlap and ranges:
            # Repeat and nest some ranges so they overlap.
            s, n = ranges[0]
            ranges += [ranges[0], (s + n // 2, n - n // 2), (s, n // 3)]
        starts = u64([s for s, _ in ranges])
        counts = u64([n for _, n in ranges])
        if setting:
            assert self.bm.set_ranges(starts, counts) == self.model.set_ranges(starts, counts)
        else:
            assert self.bm.clear_ranges(starts, counts) == self.model.clear_ranges(starts, counts)

    @rule(data=st.data())
    def merge_log(self, data: st.DataObject) -> None:
        nwords = self.model.nwords
        first = data.draw(st.integers(0, nwords), label="first word")
        if 64 * first > self.npages:
            first = self.npages // 64
        offset = 64 * first
        covered = self.npages - offset  # pages from the offset to the end
        fit = (covered + 63) // 64
        # Logs shorter than, as long as, or longer than what is left of the bitmap.
        length = data.draw(st.integers(0, fit + 3), label="log words")
        density = data.draw(st.sampled_from(["sparse", "dense", "full", "zero"]), label="kind")
        word = {
            "sparse": st.integers(0, 2**64 - 1).map(lambda w: w & (w >> 7) & (w >> 13)),
            "dense": st.integers(0, 2**64 - 1),
            "full": st.just(2**64 - 1),
            "zero": st.just(0),
        }[density]
        words = [data.draw(word, label="log word") for _ in range(length)]
        # Only bits for pages of the bitmap may be set: clear the rest (a log may extend past
        # the end as long as those bits are zero).
        for j in range(length):
            lo = offset + 64 * j
            keep = max(0, min(64, self.npages - lo))
            words[j] &= (1 << keep) - 1
        log = u64(words)
        assert self.bm.merge_log(log, offset) == self.model.merge_log(log, offset)
        if offset == 0:
            assert self.bm.merge_log(log) == 0

    # -- scanning --------------------------------------------------------------------------

    @rule(data=st.data())
    def next_dirty(self, data: st.DataObject) -> None:
        start = position(data, 0, self.npages, "start")
        assert self.bm.next_dirty(start) == self.model.next_dirty(start)
        assert self.bm.next_dirty() == self.model.next_dirty()

    @rule(data=st.data(), max_pages=st.one_of(st.integers(0, 70), st.integers(0, 5000)))
    def take_dirty_from(self, data: st.DataObject, max_pages: int) -> None:
        start = position(data, 0, self.npages, "start")
        got = self.bm.take_dirty(max_pages, start)
        assert_same_array(got, self.model.take_dirty(max_pages, start), "take_dirty")

    @rule(max_pages=st.integers(0, 100))
    def take_dirty_cursor(self, max_pages: int) -> None:
        """The sender's loop: resume after the last page taken, wrap at the end."""
        got = self.bm.take_dirty(max_pages, self.cursor)
        assert_same_array(got, self.model.take_dirty(max_pages, self.cursor), "take cursor")
        if len(got) == max_pages and len(got) > 0:
            self.cursor = int(got[-1]) + 1
        else:
            self.cursor = 0
        assert 0 <= self.cursor <= self.npages

    @rule(data=st.data(), max_pages=st.one_of(st.integers(0, 70), st.integers(0, 5000)))
    def take_dirty_runs_from(self, data: st.DataObject, max_pages: int) -> None:
        start = position(data, 0, self.npages, "start")
        starts, lens = self.bm.take_dirty_runs(max_pages, start)
        want_starts, want_lens = self.model.take_dirty_runs(max_pages, start)
        assert_same_array(starts, want_starts, "take_dirty_runs starts")
        assert_same_array(lens, want_lens, "take_dirty_runs lengths")

    @rule(max_pages=st.integers(0, 100))
    def take_dirty_default_start(self, max_pages: int) -> None:
        assert_same_array(
            self.bm.take_dirty(max_pages), self.model.take_dirty(max_pages), "take default"
        )

    @rule(data=st.data(), whole=st.booleans())
    def dirty_runs(self, data: st.DataObject, whole: bool) -> None:
        if whole:
            got = self.bm.dirty_runs()
            want = self.model.dirty_runs()
        else:
            start, n = page_range(data, self.npages)
            got = self.bm.dirty_runs(start, n)
            want = self.model.dirty_runs(start, n)
            starts, lens = self.bm.dirty_runs(start)
            m_starts, m_lens = self.model.dirty_runs(start)
            assert_same_array(starts, m_starts, "run starts to the end")
            assert_same_array(lens, m_lens, "run lengths to the end")
        assert isinstance(got, tuple) and len(got) == 2
        assert_same_array(got[0], want[0], "run starts")
        assert_same_array(got[1], want[1], "run lengths")

    # -- copies and equality ---------------------------------------------------------------

    @rule(data=st.data())
    def copy_and_diverge(self, data: st.DataObject) -> None:
        c = self.bm.copy()
        cm = self.model.copy()
        assert type(c) is DirtyBitmap
        assert c is not self.bm
        assert c == self.bm and not (c != self.bm)  # noqa: SIM202 - both operators
        assert c.npages == self.npages
        assert c.words().tolist() == self.model.words().tolist()
        # Changing the copy leaves the original alone.
        start, n = page_range(data, self.npages)
        if data.draw(st.booleans(), label="set or clear"):
            assert c.set_range(start, n) == cm.set_range(start, n)
        else:
            assert c.clear_range(start, n) == cm.clear_range(start, n)
        assert (c == self.bm) == (cm == self.model)
        assert (c != self.bm) == (cm != self.model)
        assert_words(c, cm)
        self.others.append((c, cm))

    @rule(data=st.data(), npages=SIZES)
    def build_other(self, data: st.DataObject, npages: int) -> None:
        """An independent bitmap, often of the same size and sometimes with the same pages."""
        if data.draw(st.booleans(), label="same size"):
            npages = self.npages
        other = DirtyBitmap(npages)
        om = ModelBitmap(npages)
        if npages == self.npages and data.draw(st.booleans(), label="same pages"):
            # Rebuild the main bitmap's pages through merge_log of a model-made log.
            log = self.model.words()
            other.merge_log(log)
            om.merge_log(log)
        else:
            start, n = page_range(data, npages)
            other.set_range(start, n)
            om.set_range(start, n)
        assert_words(other, om)
        self.others.append((other, om))

    @precondition(lambda self: len(self.others) > 0)
    @rule(data=st.data())
    def compare(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.others) - 1), label="other")
        other, om = self.others[i]
        assert (self.bm == other) is (self.model == om)
        assert (other == self.bm) is (om == self.model)
        assert (self.bm != other) is (self.model != om)
        assert self.bm == self.bm
        assert not (self.bm != self.bm)  # noqa: SIM202 - __ne__ itself
        assert (self.bm == object()) is False
        assert (self.bm != object()) is True
        assert_words(other, om)

    @precondition(lambda self: len(self.others) > 0)
    @rule(data=st.data())
    def switch_to_other(self, data: st.DataObject) -> None:
        """Carry on with a copy (or an independent bitmap) as the main bitmap."""
        i = data.draw(st.integers(0, len(self.others) - 1), label="other")
        old = (self.bm, self.model)
        self.bm, self.model = self.others[i]
        self.others[i] = old
        self.npages = self.model.npages
        self.view = self.bm.words()
        self.cursor = 0

    # -- refused calls ---------------------------------------------------------------------

    @rule(data=st.data())
    def refused(self, data: st.DataObject) -> None:
        """An out-of-range call raises the model's exception and changes nothing."""
        before = self.bm.words().copy()
        past = data.draw(st.integers(self.npages + 1, self.npages + 200), label="past")
        calls: list[tuple[str, Callable[[DirtyBitmap | ModelBitmap], object]]] = [
            ("set_range", lambda b: b.set_range(past - 1, 2)),
            ("clear_range", lambda b: b.clear_range(0, past)),
            ("count", lambda b: b.count(past)),
            ("test", lambda b: b.test(past - 1)),
            ("test_and_clear", lambda b: b.test_and_clear(past - 1)),
            ("next_dirty", lambda b: b.next_dirty(past)),
            ("take_dirty", lambda b: b.take_dirty(10, past)),
            ("take_dirty_runs", lambda b: b.take_dirty_runs(10, past)),
            ("dirty_runs", lambda b: b.dirty_runs(0, past)),
            ("clear_ranges", lambda b: b.clear_ranges(u64([0, 0]), u64([self.npages, past]))),
            ("merge_log", lambda b: b.merge_log(u64([0]), 64 * (past // 64 + 1))),
            ("neg", lambda b: b.set_range(-1, 1)),
            ("negn", lambda b: b.clear_range(0, -1)),
        ]
        name, call = data.draw(st.sampled_from(calls), label="call")
        with pytest.raises((IndexError, ValueError)) as real:
            call(self.bm)
        with pytest.raises((IndexError, ValueError)) as modelled:
            call(self.model)
        assert real.type is modelled.type, name
        assert self.bm.words().tolist() == before.tolist(), f"refused {name} changed the bitmap"


BitmapMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBitmapMachine = BitmapMachine.TestCase


# -- property tests: one range at a time, around word boundaries ---------------------------

NEAR_BOUNDARY = st.one_of(
    st.integers(0, 700),
    st.integers(0, 12).flatmap(lambda k: st.integers(max(0, 64 * k - 3), 64 * k + 3)),
    st.integers(0, 2).flatmap(lambda k: st.integers(max(0, 512 * k - 2), 512 * k + 2)),
)


@st.composite
def sized_range(draw: st.DrawFn) -> tuple[int, int, int]:
    """(npages, start, n) with start and end near word boundaries."""
    start = draw(NEAR_BOUNDARY, label="start")
    n = draw(NEAR_BOUNDARY, label="n")
    slack = draw(st.one_of(st.just(0), st.integers(0, 3), NEAR_BOUNDARY), label="slack")
    return start + n + slack, start, n


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


@PROPERTY_SETTINGS
@given(sized_range())
def test_set_range_on_clean_bitmap(case: tuple[int, int, int]) -> None:
    npages, start, n = case
    bm = DirtyBitmap(npages)
    assert bm.set_range(start, n) == n
    model = ModelBitmap(npages)
    model.set_range(start, n)
    assert_words(bm, model)
    assert bm.count() == n
    assert bm.count(start, n) == n
    assert bm.next_dirty() == (start if n else None)
    runs = bm.dirty_runs()
    assert runs[0].tolist() == ([start] if n else [])
    assert runs[1].tolist() == ([n] if n else [])
    assert bm.set_range(start, n) == 0
    if start > 0:
        assert bm.test(start - 1) is False
    if start + n < npages:
        assert bm.test(start + n) is False
    if n:
        assert bm.test(start) and bm.test(start + n - 1)
    taken = bm.take_dirty(npages + 1)
    assert taken.tolist() == list(range(start, start + n))
    assert bm.count() == 0
    assert not bm.words().any()


@PROPERTY_SETTINGS
@given(sized_range())
def test_clear_range_on_dirty_bitmap(case: tuple[int, int, int]) -> None:
    npages, start, n = case
    bm = DirtyBitmap(npages, dirty=True)
    assert bm.count() == npages
    assert bm.count(start, n) == n
    assert bm.clear_range(start, n) == n
    model = ModelBitmap(npages, dirty=True)
    model.clear_range(start, n)
    assert_words(bm, model)
    assert bm.count() == npages - n
    assert bm.count(start, n) == 0
    assert bm.clear_range(start, n) == 0
    assert bm.dirty_runs(start, n)[0].size == 0
    if n:
        assert bm.next_dirty(start) == (start + n if start + n < npages else None)
    starts, lens = bm.dirty_runs()
    if n == 0:
        want = [(0, npages)] if npages else []
    else:
        want = [(0, start)] if start else []
        if start + n < npages:
            want.append((start + n, npages - start - n))
    assert list(zip(starts.tolist(), lens.tolist(), strict=True)) == want


@PROPERTY_SETTINGS
@given(sized_range(), st.data())
def test_clear_ranges_batch_matches_model(case: tuple[int, int, int], data: st.DataObject) -> None:
    npages, start, n = case
    bm = DirtyBitmap(npages, dirty=True)
    model = ModelBitmap(npages, dirty=True)
    pieces = data.draw(st.lists(st.tuples(NEAR_BOUNDARY, NEAR_BOUNDARY), max_size=8))
    ranges = [(start, n)] + [(min(s, npages), min(c, npages - min(s, npages))) for s, c in pieces]
    starts = u64([s for s, _ in ranges])
    counts = u64([c for _, c in ranges])
    assert bm.clear_ranges(starts, counts) == model.clear_ranges(starts, counts)
    assert_words(bm, model)
    assert bm.clear_ranges(starts, counts) == 0


@PROPERTY_SETTINGS
@given(
    npages=st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 3000)),
    first=st.integers(0, 60),
    words=st.lists(st.integers(0, 2**64 - 1), max_size=60),
    dirty_start=st.integers(0, 3000),
)
def test_merge_log_at_offsets(npages: int, first: int, words: list[int], dirty_start: int) -> None:
    offset = min(64 * first, npages - npages % 64)
    for j in range(len(words)):
        keep = max(0, min(64, npages - offset - 64 * j))
        words[j] &= (1 << keep) - 1
    bm = DirtyBitmap(npages)
    model = ModelBitmap(npages)
    s = min(dirty_start, npages)
    n = min(100, npages - s)
    bm.set_range(s, n)
    model.set_range(s, n)
    log = u64(words)
    assert bm.merge_log(log, offset) == model.merge_log(log, offset)
    assert_words(bm, model)
    assert bm.merge_log(log, offset) == 0


@PROPERTY_SETTINGS
@given(sized_range(), st.integers(0, 200))
def test_take_dirty_respects_start_and_max(case: tuple[int, int, int], max_pages: int) -> None:
    npages, start, _n = case
    bm = DirtyBitmap(npages, dirty=True)
    got = bm.take_dirty(max_pages, start)
    k = min(max_pages, npages - start)
    assert got.dtype == np.uint64
    assert got.tolist() == list(range(start, start + k))
    assert bm.count() == npages - k
    assert bm.count(start, k) == 0


@PROPERTY_SETTINGS
@given(
    npages=st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(1, 2000)),
    bits=st.integers(min_value=0),
    data=st.data(),
)
def test_scans_match_model_on_random_words(npages: int, bits: int, data: st.DataObject) -> None:
    model = ModelBitmap(npages)
    model.bits = bits & ((1 << npages) - 1)
    bm = DirtyBitmap(npages)
    bm.merge_log(model.words())
    assert_words(bm, model)
    start, n = page_range(data, npages)
    assert bm.count(start, n) == model.count(start, n)
    assert bm.next_dirty(start) == model.next_dirty(start)
    got = bm.dirty_runs(start, n)
    want = model.dirty_runs(start, n)
    assert_same_array(got[0], want[0], "starts")
    assert_same_array(got[1], want[1], "lengths")


def test_model_words_roundtrip() -> None:
    """The model itself: words layout is bit i of word j = page 64*j + i."""
    m = ModelBitmap(130)
    m.set_range(63, 3)
    m.test_and_clear(64)
    assert m.words().tolist() == [1 << 63, 1 << 1, 0]
    assert int_to_words(m.bits, 3).tolist() == m.words().tolist()
    assert m.pages() == [63, 65]


@pytest.mark.parametrize("npages", BOUNDARY_SIZES)
@pytest.mark.parametrize("dirty", [False, True])
def test_new_bitmap(npages: int, dirty: bool) -> None:
    bm = DirtyBitmap(npages, dirty=dirty)
    assert len(bm) == bm.npages == npages
    assert bm.nbytes == 8 * ((npages + 63) // 64)
    assert bm.count() == (npages if dirty else 0)
    assert_words(bm, ModelBitmap(npages, dirty=dirty))
    assert bm == DirtyBitmap(npages, dirty=dirty)
    if npages:
        assert bm != DirtyBitmap(npages, dirty=not dirty)
    assert bm != DirtyBitmap(npages + 1, dirty=dirty)
