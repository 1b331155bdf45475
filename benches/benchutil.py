"""Shared pieces of the benchmark suite: sizes, data, the timing protocol and the peers' kernels.

Every benchmark times pagehint and its peers (numpy on a ``uint64`` word array, bitarray, and a
"limit": a plain memory pass over the same bytes) on the same input in the same run. Before
anything is timed, each peer's result is checked against pagehint's on that input.

Timing: ``benchmark.pedantic`` with one call per round and a setup that restores the input state
before every round (outside the timed region). The number of rounds comes from a time budget
(see :class:`Settings`), so slow peers (bitarray's Python loops) do not dominate the run.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from bitarray import bitarray

U64Array = npt.NDArray[np.uint64]
U8Array = npt.NDArray[np.uint8]
IntpArray = npt.NDArray[np.intp]

GUEST_PAGES = 1 << 28  # a 1 TiB guest of 4 KiB pages: a 32 MiB bitmap
BIG_GUEST_PAGES = 1 << 32  # a 16 TiB guest: a 512 MiB bitmap
HINT_PAGES = 1024  # one 4 MiB free-page hint (order-10 block on x86-64)
BATCH_PAGES = 65536  # pages a migration sender takes per take_dirty call
WORD_BITS = 64

QUICK_ENV = "PAGEHINT_BENCH_QUICK"
ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_ONE = np.uint64(1)
_SIX = np.uint64(6)

T = TypeVar("T")


class Bench(Protocol):
    """The part of pytest-benchmark's ``BenchmarkFixture`` the suite uses (it is untyped)."""

    extra_info: dict[str, Any]

    def pedantic(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] = ...,
        kwargs: dict[str, Any] | None = ...,
        setup: Callable[[], Any] | None = ...,
        teardown: Callable[..., Any] | None = ...,
        rounds: int = ...,
        warmup_rounds: int = ...,
        iterations: int = ...,
    ) -> Any: ...


@dataclass(frozen=True)
class Settings:
    """How long to time each benchmark.

    Rounds are ``ceil(budget_s / one call)`` clamped to ``[min_rounds, max_rounds]``; the estimate
    of one call comes from the (untimed) correctness run.
    """

    quick: bool
    budget_s: float
    min_rounds: int
    max_rounds: int
    warmup_rounds: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick=True, budget_s=0.25, min_rounds=1, max_rounds=5, warmup_rounds=0)
        return cls(quick=False, budget_s=2.0, min_rounds=5, max_rounds=60, warmup_rounds=1)

    def rounds_for(self, one_call_s: float) -> int:
        want = math.ceil(self.budget_s / max(one_call_s, 1e-6))
        return max(self.min_rounds, min(self.max_rounds, want))


def quick_from_env() -> bool:
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and how long it took, in seconds."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


UNCHECKED_ROLES = ("limit", "floor")  # rows that do other work than the operation


@dataclass
class Peer:
    """One implementation of a benchmark's operation.

    ``run`` does the timed work and returns what is compared with pagehint's result; ``reset``
    restores the input state (run before every round, untimed); ``state`` returns the words after
    ``run`` (for operations that mutate). ``role`` is ``pagehint``, ``peer`` (a competitor,
    checked against pagehint), ``floor`` (what pagehint's own work cannot go below: pagehint's
    plainer path, or the least any implementation must do in the operation's own access
    pattern, e.g. one store per line it touches in the input's order; not a competitor) or
    ``limit`` (a plain memory pass over the same bytes). Floors and limits are not checked.
    """

    label: str
    run: Callable[[], object]
    reset: Callable[[], object] | None = None
    state: Callable[[], U64Array] | None = None
    role: str = "peer"


def check_then_measure(
    benchmark: Bench,
    settings: Settings,
    *,
    impl: str,
    peer: Peer,
    nbytes: int,
    expected_result: object,
    expected_state: U64Array | None = None,
) -> None:
    """Runs ``peer`` once on the reset input and checks it against pagehint's result (and final
    words), then times it. ``nbytes`` is the bitmap bytes the operation covers (for GB/s);
    ``report.py`` reads ``impl``, ``role``, ``label`` and ``bytes`` from the JSON's ``extra_info``.
    """
    if peer.role not in ("pagehint", "peer", *UNCHECKED_ROLES):
        raise ValueError(f"unknown role {peer.role!r}")
    if peer.reset is not None:
        peer.reset()
    result, one_call_s = timed(peer.run)
    if peer.role not in UNCHECKED_ROLES:
        assert_same(impl, result, expected_result)
        if expected_state is not None:
            assert peer.state is not None, f"{impl}: no state to check"
            got = peer.state()
            if not np.array_equal(got, expected_state):
                diff = np.flatnonzero(got != expected_state)
                raise AssertionError(
                    f"{impl} disagrees with pagehint: {diff.size} words differ after the "
                    f"operation, first at word {int(diff[0])}"
                )
    benchmark.extra_info.update(impl=impl, role=peer.role, label=peer.label, bytes=nbytes)

    def setup() -> None:
        if peer.reset is not None:
            peer.reset()

    benchmark.pedantic(
        peer.run,
        setup=setup,
        rounds=settings.rounds_for(one_call_s),
        warmup_rounds=settings.warmup_rounds,
        iterations=1,
    )


def assert_same(impl: str, got: object, want: object) -> None:
    """``got == want`` for ints and arrays, with a message naming the implementation."""
    if isinstance(want, np.ndarray):
        if not isinstance(got, np.ndarray):
            raise AssertionError(f"{impl} returned {type(got).__name__}, not an array")
        if got.shape != want.shape or not np.array_equal(got, want):
            first = int(np.flatnonzero(got[: want.size] != want[: got.size])[:1].sum())
            raise AssertionError(
                f"{impl} disagrees with pagehint: {got.size} items vs {want.size}, "
                f"first difference near index {first}"
            )
    elif got != want:
        raise AssertionError(f"{impl} disagrees with pagehint: {got!r} != {want!r}")


# --------------------------------------------------------------------------------------------
# Data


def random_words(rng: np.random.Generator, nwords: int) -> U64Array:
    """Uniformly random words: every page dirty with p = 1/2."""
    return rng.integers(0, ALL_ONES, size=nwords, dtype=np.uint64, endpoint=True)


def bernoulli_words(rng: np.random.Generator, npages: int, p: float) -> U64Array:
    """A bitmap of ``npages`` pages, each dirty with probability ``p`` (generated in chunks)."""
    if npages % WORD_BITS:
        raise ValueError("npages must be a multiple of 64")
    out = np.empty(npages // WORD_BITS, dtype=np.uint64)
    out_bytes = out.view(np.uint8)
    chunk = 1 << 24
    for lo in range(0, npages, chunk):
        hi = min(npages, lo + chunk)
        bits = rng.random(hi - lo, dtype=np.float32) < np.float32(p)
        out_bytes[lo // 8 : hi // 8] = np.packbits(bits, bitorder="little")
    return out


def bitarray_of(words: U64Array) -> tuple[bitarray, U64Array]:
    """A bitarray (its own allocation) holding ``words`` in the same layout, and a writable
    ``uint64`` view of its buffer, for resetting it with a memcpy."""
    ba = bitarray(words.size * WORD_BITS, endian="little")
    view = np.frombuffer(memoryview(ba), dtype=np.uint64)
    np.copyto(view, words)
    return ba, view


# --------------------------------------------------------------------------------------------
# numpy peers for take_dirty


def np_extract_pfns(word_index: IntpArray, vals: U64Array) -> U64Array:
    """Ascending pfns of the set bits of ``vals`` (non-zero words at ascending ``word_index``).

    Peels off the lowest set bit of every word per pass (``v & (v - 1)``), writing each bit's pfn
    straight to its final slot (prefix sum of the popcounts + pass number), and drops finished
    words; passes = the largest popcount. Faster than ``unpackbits`` + ``flatnonzero`` at both
    0.1 % and 10 % density, and needs no sort.
    """
    if vals.size == 0:
        return np.empty(0, dtype=np.uint64)
    pc = np.bitwise_count(vals).astype(np.intp)
    slot = np.cumsum(pc) - pc
    out = np.empty(int(slot[-1] + pc[-1]), dtype=np.uint64)
    base = word_index.astype(np.uint64) << _SIX
    v = vals
    while v.size:
        rest = v & (v - _ONE)
        out[slot] = base + np.bitwise_count((v ^ rest) - _ONE)
        keep = np.flatnonzero(rest != 0)
        v, slot, base = rest[keep], slot[keep] + 1, base[keep]
    return out


def np_take_all(words: U64Array, chunk_words: int = 1 << 16) -> U64Array:
    """Every dirty pfn, ascending, leaving ``words`` clean (``take_dirty(npages)``).

    Works per 64 Ki-word (512 KiB) chunk so the temporaries stay in L2: about 1.3x faster than
    one pass over the whole array at 10 % density, and no slower at 0.1 %.
    """
    parts: list[U64Array] = []
    for lo in range(0, words.size, chunk_words):
        seg = words[lo : lo + chunk_words]
        nz = np.flatnonzero(seg != 0)  # faster than flatnonzero(seg)
        parts.append(np_extract_pfns(nz + lo, seg[nz]))
    words.fill(0)  # everything at or after page 0 was taken
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def _mask_from(bit: int) -> np.uint64:
    """Bits ``bit..63``."""
    return np.uint64((0xFFFF_FFFF_FFFF_FFFF << bit) & 0xFFFF_FFFF_FFFF_FFFF)


def _mask_upto(bit: int) -> np.uint64:
    """Bits ``0..bit`` inclusive."""
    return np.uint64((1 << (bit + 1)) - 1)


class NumpyTaker:
    """``take_dirty(max_pages, start)`` on a numpy word array, for the sender's batch loop.

    Scans a window of words from ``start`` (sized from the previous call, doubled while it falls
    short), finds where the ``max_pages``-th dirty page lies with a cumulative popcount, extracts
    only those pfns and clears ``[start, last pfn]`` (every dirty page in it was taken).
    """

    def __init__(self, words: U64Array) -> None:
        self.words = words
        self.window = 1024

    def take(self, max_pages: int, start: int = 0) -> U64Array:
        w = self.words
        nw = int(w.size)
        parts: list[U64Array] = []
        need = max_pages
        pos = start >> 6
        if start & 63 and pos < nw and need > 0:
            # The partial first word, in Python ints.
            word = int(w[pos]) & int(_mask_from(start & 63))
            got: list[int] = []
            while word and len(got) < need:
                low = word & -word
                got.append(pos * WORD_BITS + low.bit_length() - 1)
                word ^= low
            if got:
                w[pos] &= ~_mask_upto(got[-1] & 63) | ~_mask_from(start & 63)
                parts.append(np.array(got, dtype=np.uint64))
                need -= len(got)
            pos += 1
        first = pos
        window = self.window
        while need > 0 and pos < nw:
            end = min(nw, pos + window)
            seg = w[pos:end]
            nz = np.flatnonzero(seg != 0)
            vals = seg[nz]
            csum = np.cumsum(np.bitwise_count(vals), dtype=np.intp)
            have = int(csum[-1]) if csum.size else 0
            if have >= need:
                k = int(np.searchsorted(csum, need))  # first word reaching `need`
                pfns = np_extract_pfns(nz[: k + 1] + pos, vals[: k + 1])[:need]
                last = int(pfns[-1])
                lw = last >> 6
                w[pos:lw] = 0
                w[lw] &= ~_mask_upto(last & 63)
                parts.append(pfns)
                need = 0
                pos = lw + 1
            else:
                parts.append(np_extract_pfns(nz + pos, vals))
                seg.fill(0)
                need -= have
                pos = end
                window *= 2
        self.window = max(1024, (pos - first) + (pos - first) // 8)
        if not parts:
            return np.empty(0, dtype=np.uint64)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# bitarray peers for take_dirty


def ba_take(ba: bitarray, max_pages: int, start: int = 0) -> U64Array:
    """``take_dirty`` on a bitarray: ``search`` for 1s, then clear ``[start, last]``."""
    pfns = np.fromiter(itertools.islice(ba.search(1, start), max_pages), dtype=np.uint64)
    if pfns.size:
        ba[start : int(pfns[-1]) + 1] = 0
    return pfns


def ba_take_all(ba: bitarray) -> U64Array:
    """Every dirty pfn, ascending, leaving ``ba`` clean."""
    pfns = np.fromiter(ba.search(1), dtype=np.uint64)
    ba.setall(0)
    return pfns


def batch_loop(take: Callable[[int, int], U64Array], batch: int = BATCH_PAGES) -> int:
    """The sender's loop: take batches from a cursor until empty; returns pages taken."""
    cursor = 0
    total = 0
    while True:
        pfns = take(batch, cursor)
        if pfns.size == 0:
            return total
        total += int(pfns.size)
        cursor = int(pfns[-1]) + 1


def batch_loop_collect(take: Callable[[int, int], U64Array], batch: int = BATCH_PAGES) -> U64Array:
    """:func:`batch_loop`, keeping the pfns (for the correctness check)."""
    cursor = 0
    parts: list[U64Array] = []
    while True:
        pfns = take(batch, cursor)
        if pfns.size == 0:
            break
        if pfns.size > batch:
            raise AssertionError(f"a batch of {pfns.size} pages exceeds max_pages={batch}")
        parts.append(pfns)
        cursor = int(pfns[-1]) + 1
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


# --------------------------------------------------------------------------------------------
# Limits


def fastest_read_pass(words: U64Array) -> tuple[str, Callable[[], object]]:
    """The fastest read-only numpy pass over ``words`` among a few candidates (each tried three
    times, best kept): the floor for any operation that must read every byte once."""
    u8 = words.view(np.uint8)
    candidates: list[tuple[str, Callable[[], object]]] = [
        ("np.bitwise_or.reduce(words)", lambda: np.bitwise_or.reduce(words)),
        ("np.add.reduce(words)", lambda: np.add.reduce(words)),
        ("np.max(words)", lambda: np.max(words)),
        ("np.max(words.view(uint8))", lambda: np.max(u8)),
        ("np.count_nonzero(words)", lambda: np.count_nonzero(words)),
    ]
    best: tuple[float, str, Callable[[], object]] | None = None
    for name, fn in candidates:
        t = min(timed(fn)[1] for _ in range(3))
        if best is None or t < best[0]:
            best = (t, name, fn)
    assert best is not None
    return best[1], best[2]
