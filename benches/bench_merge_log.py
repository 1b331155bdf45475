"""B3: ``merge_log`` of a 2^28-page KVM dirty log (each bit set with p = 0.1) into a bitmap that
already has another random 10 % of its pages dirty; the result is the number of pages newly dirty.
The destination is restored before every round (pagehint: ``clear_all`` + ``merge_log(base)``;
the others: a memcpy of the base words).

Peers:

- numpy: ``new = log & ~dst`` (into a preallocated temporary), ``bitwise_count(new).sum()``,
  ``dst |= log`` (the textbook formulation, three full passes);
- numpy, chunked: the same per 32 Ki-word slice with slice-sized temporaries that stay in L2;
- bitarray: ``new = log & ~dst; new.count(); dst |= log`` (allocates two temporaries);
- bitarray, count_or: ``count_or(dst, log) - dst.count(); dst |= log`` (no temporaries);
- limit: ``np.bitwise_or(dst, log, out=dst)``: one read+read+write pass, no counting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from bitarray import bitarray
from bitarray.util import count_or

from benches.benchutil import (
    GUEST_PAGES,
    Bench,
    Peer,
    Settings,
    U8Array,
    U64Array,
    bernoulli_words,
    bitarray_of,
    check_then_measure,
)
from pagehint import DirtyBitmap

IMPLS = ["pagehint", "numpy", "numpy-chunked", "bitarray", "bitarray-count_or", "limit"]
CHUNK_WORDS = 1 << 15
DENSITY = 0.1


@dataclass(frozen=True)
class Case:
    base: U64Array
    log: U64Array
    expected_new: int
    expected_words: U64Array


@pytest.fixture(scope="module")
def case() -> Case:
    rng = np.random.default_rng(31)
    base = bernoulli_words(rng, GUEST_PAGES, DENSITY)
    log = bernoulli_words(rng, GUEST_PAGES, DENSITY)
    bm = DirtyBitmap(GUEST_PAGES)
    bm.merge_log(base)
    new = bm.merge_log(log)
    return Case(base, log, new, bm.words().copy())


def np_merge_chunked(dst: U64Array, log: U64Array, tmp: U64Array, counts: U8Array) -> int:
    new = 0
    for lo in range(0, dst.size, CHUNK_WORDS):
        d = dst[lo : lo + CHUNK_WORDS]
        lg = log[lo : lo + CHUNK_WORDS]
        t = tmp[: d.size]
        np.invert(d, out=t)
        np.bitwise_and(t, lg, out=t)
        new += int(np.bitwise_count(t, out=counts[: d.size]).sum())
        np.bitwise_or(d, lg, out=d)
    return new


def _peer(case: Case, impl: str) -> Peer:
    base, log = case.base, case.log
    if impl == "pagehint":
        bm = DirtyBitmap(GUEST_PAGES)

        def ph_reset() -> None:
            bm.clear_all()
            bm.merge_log(base)

        return Peer(
            "pagehint `merge_log(log)`",
            lambda: bm.merge_log(log),
            ph_reset,
            bm.words,
            role="pagehint",
        )
    if impl in ("numpy", "numpy-chunked", "limit"):
        dst = base.copy()

        def np_reset() -> None:
            np.copyto(dst, base)

        if impl == "numpy":
            tmp = np.empty_like(base)

            def np_merge() -> int:
                np.invert(dst, out=tmp)
                np.bitwise_and(tmp, log, out=tmp)
                new = int(np.bitwise_count(tmp).sum())
                np.bitwise_or(dst, log, out=dst)
                return new

            return Peer(
                "numpy: `new = log & ~dst`, `bitwise_count(new).sum()`, `dst |= log`",
                np_merge,
                np_reset,
                lambda: dst,
            )
        if impl == "numpy-chunked":
            ctmp = np.empty(CHUNK_WORDS, dtype=np.uint64)
            counts = np.empty(CHUNK_WORDS, dtype=np.uint8)
            return Peer(
                "numpy: the same per 32 Ki-word chunk (L2-resident temporaries)",
                lambda: np_merge_chunked(dst, log, ctmp, counts),
                np_reset,
                lambda: dst,
            )
        return Peer(
            "limit: `np.bitwise_or(dst, log, out=dst)` (read+read+write)",
            lambda: np.bitwise_or(dst, log, out=dst),
            np_reset,
            role="limit",
        )
    if impl in ("bitarray", "bitarray-count_or"):
        dst_ba, dst_view = bitarray_of(base)
        log_ba, _ = bitarray_of(log)

        def ba_reset() -> None:
            np.copyto(dst_view, base)

        if impl == "bitarray":

            def ba_merge() -> int:
                nonlocal dst_ba
                new: bitarray = log_ba & ~dst_ba
                n = new.count()
                dst_ba |= log_ba
                return n

            return Peer(
                "bitarray: `new = log & ~dst`, `new.count()`, `dst |= log`",
                ba_merge,
                ba_reset,
                lambda: dst_view,
            )

        def ba_merge_count_or() -> int:
            nonlocal dst_ba
            n = count_or(dst_ba, log_ba) - dst_ba.count()
            dst_ba |= log_ba
            return n

        return Peer(
            "bitarray: `count_or(dst, log) - dst.count()`, `dst |= log`",
            ba_merge_count_or,
            ba_reset,
            lambda: dst_view,
        )
    raise ValueError(impl)


@pytest.mark.benchmark(group="B3 merge_log: 2^28-page log, 10 % dirty, into a 10 % dirty bitmap")
@pytest.mark.parametrize("impl", IMPLS)
def bench_merge_log(benchmark: Bench, settings: Settings, case: Case, impl: str) -> None:
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer(case, impl),
        nbytes=case.log.nbytes,
        expected_result=case.expected_new,
        expected_state=case.expected_words,
    )
