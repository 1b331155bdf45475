"""B1: ``clear_ranges`` of free-page hints (4 MiB-aligned 1024-page ranges) in a full 2^28-page
bitmap: every block once in shuffled order (262,144 hints), and a random quarter (65,536).

Peers, on the same hints and an all-dirty bitmap restored before every round:

- numpy, block mask: words viewed as (2^18, 16); a boolean mask of the hinted blocks, then
  ``bitwise_count`` of ``W[mask]`` and ``W[mask] = 0`` (sequential, best for many hints);
- numpy, take: ``np.take(W, blocks, axis=0)``, ``bitwise_count``, ``W[blocks] = 0`` (gather and
  scatter in hint order, best for few hints).
  Both numpy peers rely on every range being one aligned 1024-page block (the block index is
  ``start >> 10``); arbitrary ranges would need a much slower general approach.
- bitarray: a Python loop of ``ba.count(1, s, s + n)`` and ``ba[s:s + n] = 0`` per hint (general).
- limit: one sequential read+write pass (``np.invert(out=)``) over as many bytes as the hints
  cover (all 32 MiB for 262,144 hints, 8 MiB for 65,536), i.e. what streaming through the
  touched bytes costs without the random order.
- floor: two plain stores per hint, at the words of its first and last page, in the batch's
  order (from Rust: ``pagehint._core._floor_stores``, a benchmark-only helper), i.e. what
  touching the hinted lines in the hints' order costs without reading or counting anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from benches.benchutil import (
    ALL_ONES,
    GUEST_PAGES,
    HINT_PAGES,
    WORD_BITS,
    Bench,
    IntpArray,
    Peer,
    Settings,
    U64Array,
    bitarray_of,
    check_then_measure,
)
from pagehint import DirtyBitmap
from pagehint._core import _floor_stores

NBLOCKS = GUEST_PAGES // HINT_PAGES  # 262,144
BLOCK_WORDS = HINT_PAGES // WORD_BITS  # 16 words = 128 bytes
IMPLS = ["pagehint", "numpy-mask", "numpy-take", "bitarray", "limit", "floor"]


@dataclass(frozen=True)
class Case:
    starts: U64Array
    counts: U64Array
    expected_count: int
    expected_words: U64Array

    @property
    def nbytes(self) -> int:
        return self.starts.size * BLOCK_WORDS * 8


def _make_case(nhints: int, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(NBLOCKS)[:nhints].astype(np.uint64)
    starts = blocks * np.uint64(HINT_PAGES)
    counts = np.full(nhints, HINT_PAGES, dtype=np.uint64)
    bm = DirtyBitmap(GUEST_PAGES, dirty=True)
    cleared = bm.clear_ranges(starts, counts)
    # The bitmap was all dirty, so the answer is known independently of any peer too.
    assert cleared == nhints * HINT_PAGES, (cleared, nhints * HINT_PAGES)
    return Case(starts, counts, cleared, bm.words().copy())


@pytest.fixture(scope="module")
def case_all() -> Case:
    return _make_case(NBLOCKS, seed=11)


@pytest.fixture(scope="module")
def case_subset() -> Case:
    return _make_case(NBLOCKS // 4, seed=12)


def _block_index(starts: U64Array) -> IntpArray:
    return (starts >> np.uint64(10)).astype(np.intp)


def _peer(case: Case, impl: str) -> Peer:
    starts, counts = case.starts, case.counts
    nwords = GUEST_PAGES // WORD_BITS
    if impl == "pagehint":
        bm = DirtyBitmap(GUEST_PAGES, dirty=True)
        return Peer(
            "pagehint `clear_ranges(starts, counts)`",
            lambda: bm.clear_ranges(starts, counts),
            bm.set_all,
            bm.words,
            role="pagehint",
        )
    if impl == "floor":
        floor_words = np.full(nwords, ALL_ONES, dtype=np.uint64)
        return Peer(
            "floor: two plain stores per hint (first and last word), in hint order (Rust)",
            lambda: _floor_stores(floor_words, starts, counts),
            lambda: floor_words.fill(ALL_ONES),
            role="floor",
        )
    if impl in ("numpy-mask", "numpy-take", "limit"):
        w = np.full(nwords, ALL_ONES, dtype=np.uint64)
        blocks_view = w.reshape(NBLOCKS, BLOCK_WORDS)

        def refill() -> None:
            w.fill(ALL_ONES)

        if impl == "numpy-mask":

            def np_mask() -> int:
                mask = np.zeros(NBLOCKS, dtype=np.bool_)
                mask[_block_index(starts)] = True
                n = int(np.bitwise_count(blocks_view[mask]).sum())
                blocks_view[mask] = 0
                return n

            return Peer(
                "numpy: block mask, `bitwise_count(W[mask])`, `W[mask] = 0`",
                np_mask,
                refill,
                lambda: w,
            )
        if impl == "numpy-take":

            def np_take() -> int:
                idx = _block_index(starts)
                n = int(np.bitwise_count(np.take(blocks_view, idx, axis=0)).sum())
                blocks_view[idx] = 0
                return n

            return Peer(
                "numpy: `np.take(W, blocks)`, `bitwise_count`, `W[blocks] = 0`",
                np_take,
                refill,
                lambda: w,
            )
        span = w[: starts.size * BLOCK_WORDS]
        return Peer(
            "limit: sequential read+write of the same byte count (`np.invert(out=)`)",
            lambda: np.invert(span, out=span),
            refill,
            role="limit",
        )
    if impl == "bitarray":
        ones = np.full(nwords, ALL_ONES, dtype=np.uint64)
        ba, view = bitarray_of(ones)
        del ones

        def ba_loop() -> int:
            n = 0
            for s, c in zip(starts.tolist(), counts.tolist(), strict=True):
                n += ba.count(1, s, s + c)
                ba[s : s + c] = 0
            return n

        return Peer(
            "bitarray: per hint `count(1, s, e)` + `ba[s:e] = 0` (Python loop)",
            ba_loop,
            lambda: view.fill(ALL_ONES),
            lambda: view,
        )
    raise ValueError(impl)


def _bench(benchmark: Bench, settings: Settings, case: Case, impl: str) -> None:
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer(case, impl),
        nbytes=case.nbytes,
        expected_result=case.expected_count,
        expected_state=case.expected_words,
    )


@pytest.mark.benchmark(group="B1 clear_ranges: 262,144 hints x 1024 pages, all blocks shuffled")
@pytest.mark.parametrize("impl", IMPLS)
def bench_clear_ranges_all(benchmark: Bench, settings: Settings, case_all: Case, impl: str) -> None:
    _bench(benchmark, settings, case_all, impl)


@pytest.mark.benchmark(group="B1 clear_ranges: 65,536 hints x 1024 pages, random subset")
@pytest.mark.parametrize("impl", IMPLS)
def bench_clear_ranges_subset(
    benchmark: Bench, settings: Settings, case_subset: Case, impl: str
) -> None:
    _bench(benchmark, settings, case_subset, impl)
