"""A short self-benchmark of the bitmap engine on a 1 TiB guest (2^28 pages).

It times pagehint against numpy doing the same work in the same run and reports ratios, so
the figures mean something on a noisy machine. For the full comparison use ``benches/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pagehint._core import DirtyBitmap

GUEST_PAGES = 1 << 28  # 1 TiB of 4 KiB pages
HINT_PAGES = 1024  # one 4 MiB free block, the Linux driver's hint size on x86-64


@dataclass(frozen=True)
class BenchRow:
    """One operation timed for pagehint and for numpy doing the same work."""

    name: str
    pagehint_ms: float
    numpy_ms: float

    @property
    def speedup(self) -> float:
        """How many times faster pagehint is than numpy."""
        return self.numpy_ms / self.pagehint_ms if self.pagehint_ms > 0 else float("inf")


def _best_ms(fn: Callable[[], object], setup: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run(repeats: int = 3, seed: int = 0) -> list[BenchRow]:
    """Times count, clear_ranges (every 4 MiB hint, shuffled) and merge_log on 2^28 pages."""
    rng = np.random.default_rng(seed)
    nwords = GUEST_PAGES // 64
    bm = DirtyBitmap(GUEST_PAGES, dirty=True)
    ref: npt.NDArray[np.uint64] = np.full(nwords, np.iinfo(np.uint64).max, dtype=np.uint64)
    blocks = rng.permutation(GUEST_PAGES // HINT_PAGES).astype(np.uint64)
    starts = blocks * np.uint64(HINT_PAGES)
    counts = np.full(blocks.size, HINT_PAGES, dtype=np.uint64)
    ref_blocks = ref.reshape(-1, HINT_PAGES // 64)
    log = rng.integers(0, 1 << 63, nwords, dtype=np.uint64)

    def numpy_clear() -> int:
        hit = ref_blocks[blocks.astype(np.intp)]
        n = int(np.bitwise_count(hit).sum())
        ref_blocks[blocks.astype(np.intp)] = 0
        return n

    def numpy_merge() -> int:
        new = int(np.bitwise_count(log & ~ref).sum())
        np.bitwise_or(ref, log, out=ref)
        return new

    def refill() -> None:
        bm.set_all()
        ref.fill(np.iinfo(np.uint64).max)

    def empty() -> None:
        bm.clear_all()
        ref.fill(0)

    rows = [
        BenchRow(
            "count 2^28 pages",
            _best_ms(bm.count, refill, repeats),
            _best_ms(lambda: int(np.bitwise_count(ref).sum()), refill, repeats),
        ),
        BenchRow(
            "clear_ranges 262,144 hints",
            _best_ms(lambda: bm.clear_ranges(starts, counts), refill, repeats),
            _best_ms(numpy_clear, refill, repeats),
        ),
        BenchRow(
            "merge_log 2^28 pages",
            _best_ms(lambda: bm.merge_log(log), empty, repeats),
            _best_ms(numpy_merge, empty, repeats),
        ),
    ]
    # The same work must give the same answers, or the timings compare nothing.
    refill()
    if bm.clear_ranges(starts, counts) != numpy_clear():
        raise AssertionError("pagehint and numpy disagree on clear_ranges")
    empty()
    if bm.merge_log(log) != numpy_merge():
        raise AssertionError("pagehint and numpy disagree on merge_log")
    return rows
