"""Concurrent use of one DirtyBitmap: threads owning interleaved pages (so they share every
word) must see exact results, merged bits must survive concurrent clears, concurrent
take_dirty consumers must take each page exactly once, and O(n) calls release the GIL."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from pagehint import DirtyBitmap

U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]

T = TypeVar("T")


def pack(state: BoolArray) -> U64Array:
    """Bool-per-page array -> KVM-layout uint64 words (little-endian bit order)."""
    npages = state.size
    nwords = (npages + 63) // 64
    padded = np.zeros(64 * nwords, dtype=np.bool_)
    padded[:npages] = state
    words: U64Array = np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)
    return words


def log_of(pfns: U64Array, offset: int, nwords: int) -> U64Array:
    """A dirty log of ``nwords`` words at page ``offset`` with ``pfns`` set."""
    log = np.zeros(nwords, dtype=np.uint64)
    rel = pfns - np.uint64(offset)
    np.bitwise_or.at(
        log, (rel >> np.uint64(6)).astype(np.intp), np.uint64(1) << (rel & np.uint64(63))
    )
    return log


def run_threads(targets: list[Callable[[], None]]) -> None:
    """Starts every target together, joins them, re-raises the first failure."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(e)
                barrier.abort()

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- (a) disjoint interleaved page sets ----------------------------------------------------

NTHREADS = 4
NPAGES_A = NTHREADS * 2**16 + 37  # 4097 words, a partial last word
ROUNDS = 1000
BATCH = 256


class Owner:
    """One thread's pages (pfn % NTHREADS == k) and what it expects of them."""

    def __init__(self, k: int, bm: DirtyBitmap) -> None:
        self.k = k
        self.bm = bm
        self.rng = np.random.default_rng(1000 + k)
        self.own = np.arange(k, NPAGES_A, NTHREADS, dtype=np.uint64)
        self.state = np.zeros(NPAGES_A, dtype=np.bool_)
        self.ops = 0
        self.calls = 0

    def pick(self, size: int) -> U64Array:
        picked: U64Array = self.rng.choice(self.own, size=size)
        return picked

    def check(self, got: object, want: object, what: str) -> None:
        if got != want:
            raise AssertionError(f"thread {self.k}: {what}: got {got!r}, want {want!r}")

    def run(self) -> None:
        bm, st = self.bm, self.state
        for r in range(ROUNDS):
            # Single-page calls.
            for p in self.pick(4).tolist():
                self.check(bm.set_range(p, 1), int(not st[p]), f"set_range({p}, 1)")
                st[p] = True
            for p in self.pick(4).tolist():
                self.check(bm.test_and_clear(p), bool(st[p]), f"test_and_clear({p})")
                st[p] = False
            for p in self.pick(2).tolist():
                self.check(bm.test(p), bool(st[p]), f"test({p})")
            p = int(self.pick(1)[0])
            self.check(bm.clear_range(p, 1), int(st[p]), f"clear_range({p}, 1)")
            st[p] = False
            self.calls += 12
            self.ops += 12
            # A batch clear of own pages (duplicates included), one page per range.
            starts = self.pick(BATCH // (2 if r % 2 else 1))
            want = int(st[np.unique(starts)].sum())
            self.check(
                bm.clear_ranges(starts, np.ones(starts.size, dtype=np.uint64)),
                want,
                "clear_ranges",
            )
            st[starts] = False
            self.ops += starts.size
            # A merge of a log with only own bits, in a window at a word offset.
            first = int(self.rng.integers(0, NPAGES_A // 64))
            offset = 64 * first
            nwords = int(self.rng.integers(1, (NPAGES_A - offset) // 64 + 3))
            window = self.own[(self.own >= offset) & (self.own < offset + 64 * nwords)]
            pfns: U64Array = self.rng.choice(window, size=min(BATCH, window.size))
            log = log_of(pfns, offset, nwords)
            want = int((~st[np.unique(pfns)]).sum())
            self.check(bm.merge_log(log, offset), want, f"merge_log at {offset}")
            st[pfns] = True
            self.ops += pfns.size
            self.calls += 2


def test_disjoint_interleaved_owners_exact() -> None:
    bm = DirtyBitmap(NPAGES_A)
    owners = [Owner(k, bm) for k in range(NTHREADS)]
    run_threads([o.run for o in owners])
    total_ops = sum(o.ops for o in owners)
    assert total_ops >= 10**6, total_ops
    assert sum(o.calls for o in owners) >= 10_000
    expected = np.zeros(NPAGES_A, dtype=np.bool_)
    for o in owners:
        mine = np.zeros(NPAGES_A, dtype=np.bool_)
        mine[o.own] = True
        # Each owner only ever touched its own pages.
        assert not (o.state & ~mine).any()
        expected |= o.state
    words = bm.words()
    assert words.tolist() == pack(expected).tolist()
    assert bm.count() == int(expected.sum())
    for o in owners:
        assert bm.count() >= int(o.state.sum())


def test_concurrent_take_dirty_takes_each_page_once() -> None:
    """Consumers racing take_dirty over one bitmap: no page lost, none taken twice."""
    npages = 64 * 3000 + 11
    bm = DirtyBitmap(npages, dirty=True)
    rng = np.random.default_rng(7)
    # Holes so some words are partial.
    holes = rng.choice(npages, size=20_000, replace=False).astype(np.uint64)
    bm.clear_ranges(holes, np.ones(holes.size, dtype=np.uint64))
    expected = np.ones(npages, dtype=np.bool_)
    expected[holes] = False
    taken: list[list[U64Array]] = [[] for _ in range(4)]

    def consumer(i: int) -> Callable[[], None]:
        def run() -> None:
            r = np.random.default_rng(i)
            empty_passes = 0
            while empty_passes < 2:
                start = int(r.integers(0, npages)) if i % 2 else 0
                got = bm.take_dirty(int(r.integers(1, 300)), start)
                if got.size:
                    if np.any(np.diff(got.astype(np.int64)) <= 0):
                        raise AssertionError("take_dirty result not strictly ascending")
                    if int(got[0]) < start:
                        raise AssertionError("take_dirty returned a page before start")
                    taken[i].append(got)
                    empty_passes = 0
                elif bm.next_dirty() is None:
                    empty_passes += 1

        return run

    run_threads([consumer(i) for i in range(4)])
    assert bm.count() == 0
    everything = np.concatenate([a for t in taken for a in t])
    assert everything.size == int(expected.sum()), "pages lost or taken twice"
    assert np.unique(everything).size == everything.size, "a page was taken twice"
    got = np.zeros(npages, dtype=np.bool_)
    got[everything] = True
    assert (got == expected).all()


# -- (b) merges are not lost under concurrent clears in the same words ---------------------

NPAGES_B = 64 * 2048
MERGE_ROUNDS = 1500
CLEARERS = 3


def test_merged_bits_survive_concurrent_clears() -> None:
    bm = DirtyBitmap(NPAGES_B)
    # Start with every odd page dirty so the clearers really write the shared words.
    odd = np.arange(1, NPAGES_B, 2, dtype=np.uint64)
    bm.merge_log(log_of(odd, 0, NPAGES_B // 64))
    even = np.arange(0, NPAGES_B, 2, dtype=np.uint64)
    merged = np.zeros(NPAGES_B, dtype=np.bool_)
    stop = threading.Event()
    clearer_state = [np.zeros(NPAGES_B, dtype=np.bool_) for _ in range(CLEARERS)]
    clearer_pages = [
        odd[(odd // np.uint64(2)) % np.uint64(CLEARERS) == np.uint64(c)] for c in range(CLEARERS)
    ]
    for c in range(CLEARERS):
        clearer_state[c][clearer_pages[c]] = True

    def merger() -> None:
        rng = np.random.default_rng(99)
        try:
            for _ in range(MERGE_ROUNDS):
                first = int(rng.integers(0, NPAGES_B // 64))
                nwords = int(rng.integers(1, min(64, NPAGES_B // 64 - first) + 1))
                offset = 64 * first
                window = even[(even >= offset) & (even < offset + 64 * nwords)]
                pfns: U64Array = rng.choice(
                    window, size=int(rng.integers(1, window.size + 1)), replace=False
                )
                want = int((~merged[pfns]).sum())
                got = bm.merge_log(log_of(pfns, offset, nwords), offset)
                if got != want:
                    raise AssertionError(f"merge_log returned {got}, want {want}")
                merged[pfns] = True
        finally:
            stop.set()

    def clearer(c: int) -> Callable[[], None]:
        def run() -> None:
            rng = np.random.default_rng(c)
            mine, st = clearer_pages[c], clearer_state[c]
            while not stop.is_set():
                starts: U64Array = rng.choice(mine, size=256)
                want = int(st[np.unique(starts)].sum())
                got = bm.clear_ranges(starts, np.ones(starts.size, dtype=np.uint64))
                if got != want:
                    raise AssertionError(f"clearer {c}: clear_ranges {got} != {want}")
                st[starts] = False
                for p in rng.choice(mine, size=8).tolist():
                    if bm.clear_range(p, 1) != int(st[p]):
                        raise AssertionError(f"clearer {c}: clear_range({p}, 1)")
                    st[p] = False
                for p in rng.choice(mine, size=8).tolist():
                    if bm.set_range(p, 1) != int(not st[p]):
                        raise AssertionError(f"clearer {c}: set_range({p}, 1)")
                    st[p] = True

        return run

    run_threads([merger] + [clearer(c) for c in range(CLEARERS)])
    assert merged.sum() > NPAGES_B // 4
    words = bm.words()
    expected = merged.copy()
    for st in clearer_state:
        expected |= st
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), bitorder="little")[:NPAGES_B].astype(
        np.bool_
    )
    lost = np.flatnonzero(merged & ~bits)
    assert lost.size == 0, f"merged even pages lost: {lost[:20].tolist()}"
    assert not (bits[0::2] & ~merged[0::2]).any(), "even pages set that were never merged"
    assert words.tolist() == pack(expected).tolist()


# -- (c) the GIL is released during O(n) calls ---------------------------------------------

BIG = 2**31  # 256 MiB of words: every O(n) call below takes tens of milliseconds


def progress_during(call: Callable[[], T]) -> tuple[int, T]:
    """Runs ``call`` in a worker thread while this thread counts loop iterations; returns how
    many iterations happened between the worker reading the counter just before the call and
    just after it.

    The switch interval is raised for the duration so the interpreter never forces the worker
    to hand the GIL over: the only way this thread can run while the worker is between its two
    reads is for ``call`` to release the GIL. A call that holds it gives exactly 0."""
    counter = [0]
    done = threading.Event()
    result: list[T] = []
    during: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            before = counter[0]
            value = call()
            after = counter[0]
            during.append(after - before)
            result.append(value)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
        finally:
            done.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        while not done.is_set():
            counter[0] += 1
            if counter[0] % 1024 == 0:
                # Block briefly (releasing the GIL) so a finished worker can take it back.
                done.wait(0.0005)
        t.join()
    finally:
        sys.setswitchinterval(old)
    if errors:
        raise errors[0]
    return during[0], result[0]


def test_progress_harness_detects_a_call_holding_the_gil() -> None:
    """The harness itself: a long C call that keeps the GIL (sum over a range) gives 0, and a
    call that releases it (a blocking wait) gives > 0, so the tests below can fail."""
    held, total = progress_during(lambda: sum(range(2 * 10**7)))
    assert total == (2 * 10**7 - 1) * 10**7
    assert held == 0
    released, _ = progress_during(lambda: threading.Event().wait(0.05))
    assert released > 0


@pytest.fixture(scope="module")
def big_dirty() -> DirtyBitmap:
    return DirtyBitmap(BIG, dirty=True)


def _blocks(n: int, size: int) -> tuple[U64Array, U64Array]:
    starts = np.arange(0, n, size, dtype=np.uint64)
    return starts, np.full(starts.size, size, dtype=np.uint64)


Call = Callable[[], object]


def _set_all(b: DirtyBitmap) -> Call:
    b.clear_range(5, 1)
    return b.set_all


def _set_range(b: DirtyBitmap) -> Call:
    b.clear_all()
    return lambda: b.set_range(1, BIG - 1)


def _merge_log(b: DirtyBitmap) -> Call:
    b.clear_all()
    log = np.full(BIG // 64, 2**64 - 1, np.uint64)
    return lambda: b.merge_log(log)


def _clear_ranges(b: DirtyBitmap) -> Call:
    starts, counts = _blocks(BIG, 512)
    return lambda: b.clear_ranges(starts, counts)


def _next_dirty(b: DirtyBitmap) -> Call:
    b.clear_all()
    return b.next_dirty


def _take_dirty(b: DirtyBitmap) -> Call:
    b.clear_range(0, BIG - 1)
    return lambda: b.take_dirty(10).tolist()


def _eq(b: DirtyBitmap) -> Call:
    other = b.copy()
    return lambda: b == other


# name: (prepare a fresh copy of the dirty bitmap and return the one call to measure, the
# call's expected result). Preparation happens outside the measured window.
HEAVY: dict[str, tuple[Callable[[DirtyBitmap], Call], object]] = {
    "count": (lambda b: b.count, BIG),
    "count_range": (lambda b: lambda: b.count(1, BIG - 2), BIG - 2),
    "set_all": (_set_all, None),
    "set_range": (_set_range, BIG - 1),
    "clear_range": (lambda b: lambda: b.clear_range(1, BIG - 2), BIG - 2),
    "clear_all": (lambda b: b.clear_all, None),
    "clear_ranges": (_clear_ranges, BIG),
    "merge_log": (_merge_log, BIG),
    "next_dirty": (_next_dirty, None),
    "take_dirty": (_take_dirty, [BIG - 1]),
    "dirty_runs": (lambda b: lambda: [a.tolist() for a in b.dirty_runs()], [[0], [BIG]]),
    "copy": (lambda b: lambda: b.copy().npages, BIG),
    "eq": (_eq, True),
}


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_gil_released_during_heavy_call(name: str, big_dirty: DirtyBitmap) -> None:
    prepare, expected = HEAVY[name]
    bm = big_dirty.copy()
    call = prepare(bm)
    iterations, value = progress_during(call)
    assert value == expected
    assert iterations > 0, f"{name}: the main thread made no progress while it ran"


def test_gil_released_while_creating_big_bitmap() -> None:
    iterations, bm = progress_during(lambda: DirtyBitmap(BIG, dirty=True))
    assert bm.npages == BIG
    assert iterations > 0
    del bm


def test_gil_released_by_repeated_clear_ranges_on_shared_bitmap(big_dirty: DirtyBitmap) -> None:
    bm = big_dirty.copy()
    starts, counts = _blocks(BIG, 1024)
    rng = np.random.default_rng(3)
    rng.shuffle(starts)

    def clear_in_batches() -> int:
        return sum(
            bm.clear_ranges(s, c)
            for s, c in zip(np.array_split(starts, 4), np.array_split(counts, 4), strict=True)
        )

    iterations, cleared = progress_during(clear_in_batches)
    assert cleared == BIG
    assert iterations > 0
    assert bm.count() == 0
