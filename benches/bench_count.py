"""B2: ``count()`` of a whole bitmap of random words (half the pages dirty) at 2^28 pages
(32 MiB, about this machine's L3) and 2^32 pages (512 MiB, DRAM).

Peers, each reading its own copy of the same words:

- numpy: ``np.bitwise_count(words).sum()`` (one uint8 temporary per word, then a reduction);
- numpy, chunked: ``bitwise_count`` of 64 Ki-word slices into one reused uint8 buffer (cache
  resident), summed per slice;
- bitarray: ``ba.count()``;
- limit: the fastest read-only numpy pass over pagehint's own words (``bm.words()``), picked at run
  time among ``bitwise_or.reduce``, ``add.reduce``, ``max`` (uint64 and uint8 views) and
  ``count_nonzero``; its label names the winner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from benches.benchutil import (
    BIG_GUEST_PAGES,
    GUEST_PAGES,
    WORD_BITS,
    Bench,
    Peer,
    Settings,
    U8Array,
    U64Array,
    bitarray_of,
    check_then_measure,
    fastest_read_pass,
    random_words,
)
from pagehint import DirtyBitmap

IMPLS = ["pagehint", "numpy", "numpy-chunked", "bitarray", "limit"]
CHUNK_WORDS = 1 << 16


@dataclass(frozen=True)
class Case:
    words: U64Array
    bm: DirtyBitmap
    expected: int


def _make_case(npages: int, seed: int) -> Case:
    words = random_words(np.random.default_rng(seed), npages // WORD_BITS)
    bm = DirtyBitmap(npages)
    bm.merge_log(words)
    return Case(words, bm, bm.count())


@pytest.fixture(scope="module")
def case_2_28() -> Case:
    return _make_case(GUEST_PAGES, seed=21)


@pytest.fixture(scope="module")
def case_2_32() -> Case:
    return _make_case(BIG_GUEST_PAGES, seed=22)


def np_count_chunked(words: U64Array, buf: U8Array) -> int:
    total = 0
    for lo in range(0, words.size, CHUNK_WORDS):
        part = words[lo : lo + CHUNK_WORDS]
        counts = np.bitwise_count(part, out=buf[: part.size])
        total += int(counts.sum())
    return total


def _peer(case: Case, impl: str) -> Peer:
    words = case.words
    if impl == "pagehint":
        return Peer("pagehint `count()`", case.bm.count, role="pagehint")
    if impl == "numpy":
        return Peer(
            "numpy: `np.bitwise_count(words).sum()`",
            lambda: int(np.bitwise_count(words).sum()),
        )
    if impl == "numpy-chunked":
        buf = np.empty(CHUNK_WORDS, dtype=np.uint8)
        return Peer(
            "numpy: `bitwise_count` per 64 Ki-word chunk into a reused buffer",
            lambda: np_count_chunked(words, buf),
        )
    if impl == "bitarray":
        ba, _ = bitarray_of(words)
        return Peer("bitarray: `ba.count()`", ba.count)
    if impl == "limit":
        name, fn = fastest_read_pass(case.bm.words())
        return Peer(f"limit: read pass `{name}` (fastest of 5 numpy reads)", fn, role="limit")
    raise ValueError(impl)


def _bench(benchmark: Bench, settings: Settings, case: Case, impl: str) -> None:
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer(case, impl),
        nbytes=case.words.nbytes,
        expected_result=case.expected,
    )


@pytest.mark.benchmark(group="B2 count: 2^28 pages (32 MiB), random words")
@pytest.mark.parametrize("impl", IMPLS)
def bench_count_2_28(benchmark: Bench, settings: Settings, case_2_28: Case, impl: str) -> None:
    _bench(benchmark, settings, case_2_28, impl)


@pytest.mark.benchmark(group="B2 count: 2^32 pages (512 MiB), random words")
@pytest.mark.parametrize("impl", IMPLS)
def bench_count_2_32(benchmark: Bench, settings: Settings, case_2_32: Case, impl: str) -> None:
    _bench(benchmark, settings, case_2_32, impl)
