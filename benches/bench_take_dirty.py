"""B4: ``take_dirty`` (test-and-clear, ascending pfns) through a 2^28-page bitmap with 0.1 % and
10 % of its pages dirty (each page independently), in two ways:

- all at once: one call with ``max_pages = 2^28``;
- the sender's loop: batches of 65,536 pages from a cursor (``start = last pfn + 1``) until a
  call returns nothing.

The bitmap is restored before every round. Peers:

- numpy: ``flatnonzero(words != 0)``, then the set bits of the non-zero words, peeled lowest
  first (``v & (v - 1)``) straight into their ascending slots (faster than ``unpackbits`` +
  ``flatnonzero`` at both densities); all at once per 64 Ki-word chunk, then ``words.fill(0)``;
  the loop windowed (cumulative popcount finds the batch's last word, then ``[start, last]`` is
  cleared);
- bitarray: ``np.fromiter(ba.search(1, start))`` (``islice`` to the batch size in the loop), then
  ``setall(0)`` / ``ba[start:last + 1] = 0``;
- limit: a read+write pass over the bitmap (``np.invert(out=)``) plus writing the output's bytes
  (8 per dirty page): all at once into a new array, as ``take_dirty`` returns one (its pages are
  faulted in and zeroed by the kernel on first touch, which at 10 % dirty, 215 MB, costs about
  as much as the bitmap pass); in the loop into one preallocated array (the batches' small
  arrays are reused by the allocator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from benches.benchutil import (
    GUEST_PAGES,
    Bench,
    NumpyTaker,
    Peer,
    Settings,
    U64Array,
    ba_take,
    ba_take_all,
    batch_loop,
    batch_loop_collect,
    bernoulli_words,
    bitarray_of,
    check_then_measure,
    np_take_all,
)
from pagehint import DirtyBitmap

IMPLS = ["pagehint", "numpy", "bitarray", "limit"]


@dataclass(frozen=True)
class Case:
    density: float
    words: U64Array
    expected_pfns: U64Array

    @property
    def ndirty(self) -> int:
        return int(self.expected_pfns.size)


def _make_case(density: float, seed: int) -> Case:
    words = bernoulli_words(np.random.default_rng(seed), GUEST_PAGES, density)
    bm = DirtyBitmap(GUEST_PAGES)
    bm.merge_log(words)
    pfns = bm.take_dirty(GUEST_PAGES)
    assert bm.count() == 0
    # Independent of every peer: the pfns must be exactly the set bits, ascending.
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    assert np.array_equal(pfns, np.flatnonzero(bits).astype(np.uint64))
    return Case(density, words, pfns)


@pytest.fixture(scope="module")
def case_sparse() -> Case:
    return _make_case(0.001, seed=41)


@pytest.fixture(scope="module")
def case_dense() -> Case:
    return _make_case(0.1, seed=42)


def _limit(case: Case, *, new_output: bool) -> Peer:
    w = case.words.copy()
    out = np.zeros(case.ndirty, dtype=np.uint64)

    def limit() -> None:
        np.invert(w, out=w)
        (np.empty_like(out) if new_output else out).fill(0)

    where = "a new array" if new_output else "a preallocated array"
    return Peer(
        f"limit: read+write the bitmap (`np.invert(out=)`) + write 8 B/dirty page into {where}",
        limit,
        role="limit",
    )


def _peer_all(case: Case, impl: str) -> Peer:
    words = case.words
    if impl == "pagehint":
        bm = DirtyBitmap(GUEST_PAGES)

        def ph_reset() -> None:
            bm.clear_all()
            bm.merge_log(words)

        return Peer(
            "pagehint `take_dirty(2^28)`",
            lambda: bm.take_dirty(GUEST_PAGES),
            ph_reset,
            bm.words,
            role="pagehint",
        )
    if impl == "numpy":
        w = words.copy()
        return Peer(
            "numpy: per chunk, non-zero words, peel lowest bits into slots; `fill(0)`",
            lambda: np_take_all(w),
            lambda: np.copyto(w, words),
            lambda: w,
        )
    if impl == "bitarray":
        ba, view = bitarray_of(words)
        return Peer(
            "bitarray: `np.fromiter(ba.search(1))`, `setall(0)`",
            lambda: ba_take_all(ba),
            lambda: np.copyto(view, words),
            lambda: view,
        )
    if impl == "limit":
        return _limit(case, new_output=True)
    raise ValueError(impl)


def _peer_batches(case: Case, impl: str, collect: bool) -> Peer:
    """The loop; ``collect`` returns all pfns (the check) instead of their number (timed)."""
    words = case.words
    loop = batch_loop_collect if collect else batch_loop
    if impl == "pagehint":
        bm = DirtyBitmap(GUEST_PAGES)

        def ph_reset() -> None:
            bm.clear_all()
            bm.merge_log(words)

        return Peer(
            "pagehint `take_dirty(65536, start=cursor)` loop",
            lambda: loop(bm.take_dirty),
            ph_reset,
            bm.words,
            role="pagehint",
        )
    if impl == "numpy":
        w = words.copy()
        taker = NumpyTaker(w)
        return Peer(
            "numpy: windowed cumulative popcount + peel bits, clear `[start, last]`",
            lambda: loop(taker.take),
            lambda: np.copyto(w, words),
            lambda: w,
        )
    if impl == "bitarray":
        ba, view = bitarray_of(words)
        return Peer(
            "bitarray: `islice(ba.search(1, start), 65536)`, `ba[start:last+1] = 0`",
            lambda: loop(lambda n, start: ba_take(ba, n, start)),
            lambda: np.copyto(view, words),
            lambda: view,
        )
    if impl == "limit":
        return _limit(case, new_output=False)
    raise ValueError(impl)


def _bench_all(benchmark: Bench, settings: Settings, case: Case, impl: str) -> None:
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer_all(case, impl),
        nbytes=case.words.nbytes,
        expected_result=case.expected_pfns,
        expected_state=np.zeros_like(case.words),
    )


def _bench_batches(benchmark: Bench, settings: Settings, case: Case, impl: str) -> None:
    if impl != "limit":
        # The check: the concatenated batches are exactly pagehint's pfns and leave it clean.
        checked = _peer_batches(case, impl, collect=True)
        assert checked.reset is not None and checked.state is not None
        checked.reset()
        pfns = checked.run()
        assert isinstance(pfns, np.ndarray)
        if not np.array_equal(pfns, case.expected_pfns):
            raise AssertionError(f"{impl} batches disagree with pagehint's take_dirty")
        if np.count_nonzero(checked.state()):
            raise AssertionError(f"{impl} left dirty pages after the batch loop")
        del checked, pfns
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer_batches(case, impl, collect=False),
        nbytes=case.words.nbytes,
        expected_result=case.ndirty,
        expected_state=np.zeros_like(case.words),
    )


@pytest.mark.benchmark(group="B4 take_dirty: all at once, 2^28 pages, 0.1 % dirty")
@pytest.mark.parametrize("impl", IMPLS)
def bench_take_all_sparse(
    benchmark: Bench, settings: Settings, case_sparse: Case, impl: str
) -> None:
    _bench_all(benchmark, settings, case_sparse, impl)


@pytest.mark.benchmark(group="B4 take_dirty: all at once, 2^28 pages, 10 % dirty")
@pytest.mark.parametrize("impl", IMPLS)
def bench_take_all_dense(benchmark: Bench, settings: Settings, case_dense: Case, impl: str) -> None:
    _bench_all(benchmark, settings, case_dense, impl)


@pytest.mark.benchmark(group="B4 take_dirty: 65,536-page batches, 2^28 pages, 0.1 % dirty")
@pytest.mark.parametrize("impl", IMPLS)
def bench_take_batches_sparse(
    benchmark: Bench, settings: Settings, case_sparse: Case, impl: str
) -> None:
    _bench_batches(benchmark, settings, case_sparse, impl)


@pytest.mark.benchmark(group="B4 take_dirty: 65,536-page batches, 2^28 pages, 10 % dirty")
@pytest.mark.parametrize("impl", IMPLS)
def bench_take_batches_dense(
    benchmark: Bench, settings: Settings, case_dense: Case, impl: str
) -> None:
    _bench_batches(benchmark, settings, case_dense, impl)
