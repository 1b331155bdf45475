"""Randomized differential check of every DirtyBitmap method against the reference model.

Run as a script by test_simd_levels.py with ``PAGEHINT_SIMD`` set, so the process uses one
kernel level:

    PAGEHINT_SIMD=avx2 python tests/simd_differential.py avx2 [seed] [ops]

Exits 0 when every call matched the model, 1 (printing the failing call) otherwise, and 2 when
the process is not running the expected level.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import numpy.typing as npt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pagehint
from model import ModelBitmap
from pagehint import DirtyBitmap

U64Array = npt.NDArray[np.uint64]
FULL = 2**64 - 1

# Ends on, before and after word (64) and 8-word chunk (512) boundaries, and large bitmaps
# whose ranges run thousands of words so the vector loops do real work.
SIZES = [
    1, 2, 63, 64, 65, 127, 511, 512, 513, 575, 576, 577, 1023, 1025,
    4095, 4096, 4097, 64 * 8 * 40 + 3, 64 * 3000 + 37, 64 * 8000,
]  # fmt: skip


class Mismatch(AssertionError):
    pass


class Checker:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.calls = 0
        self.trail: list[str] = []

    # -- random arguments ------------------------------------------------------------------

    def below(self, hi: int) -> int:
        """Uniform in [0, hi)."""
        return int(self.rng.integers(0, hi)) if hi > 0 else 0

    def position(self, npages: int) -> int:
        """A position in [0, npages], often on or next to a word or chunk boundary."""
        mode = self.below(4)
        if mode == 0:
            return self.below(npages + 1)
        unit = 64 if mode == 1 else 512
        if mode == 3:
            return npages - min(npages, self.below(130))
        k = self.below(npages // unit + 1)
        return min(max(k * unit + self.below(5) - 2, 0), npages)

    def page_range(self, npages: int) -> tuple[int, int]:
        mode = self.below(5)
        start = self.position(npages)
        if mode == 0:  # short, around boundaries
            n = self.below(140)
        elif mode == 1:  # long: up to the end, thousands of words on big bitmaps
            n = self.below(npages - start + 1)
        elif mode == 2:  # to the end
            n = npages - start
        elif mode == 3:  # end on a boundary
            end = self.position(npages)
            start, end = min(start, end), max(start, end)
            n = end - start
        else:  # the whole bitmap or nearly
            start = min(self.below(3), npages)
            n = npages - start - self.below(3)
        n = max(0, min(n, npages - start))
        return start, n

    def log_words(self, length: int) -> U64Array:
        kind = self.below(6)
        size = (length,)
        r = self.rng
        if kind == 0:
            w = r.integers(0, 2**64, size=size, dtype=np.uint64)
        elif kind == 1:  # sparse
            w = (
                r.integers(0, 2**64, size=size, dtype=np.uint64)
                & r.integers(0, 2**64, size=size, dtype=np.uint64)
                & r.integers(0, 2**64, size=size, dtype=np.uint64)
            )
        elif kind == 2:  # mostly zero words, a few non-zero
            w = np.where(
                r.random(size) < 0.05, r.integers(0, 2**64, size=size, dtype=np.uint64), 0
            ).astype(np.uint64)
        elif kind == 3:
            w = np.full(size, FULL, dtype=np.uint64)
        elif kind == 4:
            w = np.zeros(size, dtype=np.uint64)
        else:  # dense
            w = r.integers(0, 2**64, size=size, dtype=np.uint64) | r.integers(
                0, 2**64, size=size, dtype=np.uint64
            )
        out: U64Array = np.ascontiguousarray(w, dtype=np.uint64)
        return out

    # -- comparison ------------------------------------------------------------------------

    def same(self, what: str, got: object, want: object) -> None:
        if isinstance(want, np.ndarray):
            ok = (
                isinstance(got, np.ndarray)
                and got.dtype == np.uint64
                and got.ndim == 1
                and got.tolist() == want.tolist()
            )
        elif isinstance(want, tuple):
            ok = isinstance(got, tuple) and len(got) == len(want)
            if ok:
                assert isinstance(got, tuple)
                for g, w in zip(got, want, strict=True):
                    self.same(what, g, w)
        else:
            ok = type(got) is type(want) and got == want
        if not ok:
            raise Mismatch(f"{what}: got {_short(got)}, model {_short(want)}")

    def words(self, bm: DirtyBitmap, model: ModelBitmap, what: str) -> None:
        w = bm.words()
        want = model.words()
        if w.shape != want.shape or not np.array_equal(w, want):
            diff = np.flatnonzero(w != want)[:5].tolist() if w.shape == want.shape else "shape"
            raise Mismatch(f"after {what}: words differ from the model at {diff}")
        if model.npages % 64 and int(w[-1]) >> (model.npages % 64):
            raise Mismatch(f"after {what}: tail bits set past npages")

    # -- one operation ---------------------------------------------------------------------

    def step(self, bm: DirtyBitmap, model: ModelBitmap) -> None:
        n = model.npages
        op = self.below(15)
        call: str
        if op == 0:
            s, c = self.page_range(n)
            call = f"set_range({s}, {c})"
            self.trail.append(call)
            self.same(call, bm.set_range(s, c), model.set_range(s, c))
        elif op == 1:
            s, c = self.page_range(n)
            call = f"clear_range({s}, {c})"
            self.trail.append(call)
            self.same(call, bm.clear_range(s, c), model.clear_range(s, c))
        elif op == 2:
            s, c = self.page_range(n)
            call = f"count({s}, {c})"
            self.trail.append(call)
            self.same(call, bm.count(s, c), model.count(s, c))
            self.same(f"count({s})", bm.count(s), model.count(s))
        elif op == 3:
            p = min(self.position(n), n - 1)
            call = f"test({p}) / test_and_clear({p})"
            self.trail.append(call)
            self.same(call, bm.test(p), model.test(p))
            self.same(call, bm.test_and_clear(p), model.test_and_clear(p))
        elif op == 4:
            call = "set_all() or clear_all()"
            self.trail.append(call)
            if self.below(2):
                bm.set_all()
                model.set_all()
            else:
                bm.clear_all()
                model.clear_all()
        elif op in (5, 6):
            k = self.below(60)
            ranges = [self.page_range(n) for _ in range(k)]
            if ranges and self.below(2):
                s, c = ranges[0]
                ranges += [(s, c), (s + c // 2, c - c // 2), (s, c // 3)]
            starts = np.array([r[0] for r in ranges], dtype=np.uint64)
            counts = np.array([r[1] for r in ranges], dtype=np.uint64)
            call = f"clear_ranges({len(ranges)} ranges)"
            self.trail.append(call)
            self.same(call, bm.clear_ranges(starts, counts), model.clear_ranges(starts, counts))
        elif op in (7, 8):
            first = self.below(n // 64 + 1)
            offset = 64 * first
            fit = (n - offset + 63) // 64
            length = self.below(fit + 3)
            log = self.log_words(length)
            # Clear bits for pages past the end (the log may extend past it when they are 0).
            for j in range(length):
                keep = max(0, min(64, n - offset - 64 * j))
                if keep < 64:
                    log[j] &= np.uint64((1 << keep) - 1)
            call = f"merge_log({length} words, {offset})"
            self.trail.append(call)
            self.same(call, bm.merge_log(log, offset), model.merge_log(log, offset))
        elif op == 9:
            s = self.position(n)
            call = f"next_dirty({s})"
            self.trail.append(call)
            self.same(call, bm.next_dirty(s), model.next_dirty(s))
            self.same("next_dirty()", bm.next_dirty(), model.next_dirty())
        elif op == 10:
            s = self.position(n)
            m = self.below(70) if self.below(2) else self.below(5000)
            call = f"take_dirty({m}, {s})"
            self.trail.append(call)
            self.same(call, bm.take_dirty(m, s), model.take_dirty(m, s))
        elif op == 11:
            s, c = self.page_range(n)
            if n > 20000 and self.below(4):
                c = min(c, 64 * 300)  # keep most run listings of big random bitmaps short
            call = f"dirty_runs({s}, {c})"
            self.trail.append(call)
            self.same(call, bm.dirty_runs(s, c), model.dirty_runs(s, c))
            if n - s <= 64 * 300 or not self.below(4):
                self.same(f"dirty_runs({s})", bm.dirty_runs(s), model.dirty_runs(s))
        elif op == 12:
            call = "copy() / =="
            self.trail.append(call)
            c_bm, c_model = bm.copy(), model.copy()
            self.same("copy == original", c_bm == bm, True)
            self.same("copy npages", c_bm.npages, n)
            s, c = self.page_range(n)
            self.same("diverge", c_bm.set_range(s, c), c_model.set_range(s, c))
            self.same("copy == original after set", c_bm == bm, c_model == model)
            self.same("copy != original after set", c_bm != bm, c_model != model)
            self.words(c_bm, c_model, "copy")
        elif op == 13:
            # Densify: a long set, so clears and scans meet long dirty stretches too.
            s, c = self.page_range(n)
            call = f"set_range({s}, {c}) [dense]"
            self.trail.append(call)
            self.same(call, bm.set_range(s, c), model.set_range(s, c))
        else:
            call = "take_dirty cursor loop"
            self.trail.append(call)
            cursor = self.position(n)
            for _ in range(5):
                m = self.below(200)
                got = bm.take_dirty(m, cursor)
                self.same(f"take_dirty({m}, {cursor})", got, model.take_dirty(m, cursor))
                cursor = int(got[-1]) + 1 if got.size == m and m else 0
        self.words(bm, model, call)
        self.same("count()", bm.count(), model.count())
        self.calls += 1

    def run_size(self, npages: int, steps: int) -> None:
        dirty = bool(self.below(2))
        bm = DirtyBitmap(npages, dirty=dirty)
        model = ModelBitmap(npages, dirty=dirty)
        self.trail = [f"DirtyBitmap({npages}, dirty={dirty})"]
        self.words(bm, model, "new")
        self.same("len", len(bm), npages)
        self.same("npages", bm.npages, npages)
        self.same("nbytes", bm.nbytes, model.nbytes)
        for _ in range(steps):
            self.step(bm, model)


def _short(x: object) -> str:
    text = repr(x.tolist()) if isinstance(x, np.ndarray) else repr(x)
    return text if len(text) < 300 else text[:300] + "..."


def run(level: str, seed: int, ops: int) -> int:
    actual = pagehint.simd_level()
    if actual != level:
        print(f"simd_level() is {actual!r}, expected {level!r}", file=sys.stderr)
        return 2
    if level not in pagehint.available_simd_levels():
        print(f"{level} is not in available_simd_levels()", file=sys.stderr)
        return 2
    checker = Checker(np.random.default_rng(seed))
    per_size = max(1, ops // len(SIZES))
    try:
        for npages in SIZES:
            checker.run_size(npages, per_size)
    except Exception as e:  # noqa: BLE001 - a mismatch, or an unexpected exception
        kind = "MISMATCH" if isinstance(e, Mismatch) else type(e).__name__
        print(f"[{level}, seed {seed}] {kind}: {e}", file=sys.stderr)
        print("calls on this bitmap (last 15):", file=sys.stderr)
        for line in checker.trail[-15:]:
            print("   ", line, file=sys.stderr)
        return 1
    print(f"{level}: {checker.calls} operations matched the model")
    return 0


def main(argv: list[str]) -> int:
    level = argv[1]
    seed = int(argv[2]) if len(argv) > 2 else 12345
    ops = int(argv[3]) if len(argv) > 3 else 6000
    return run(level, seed, ops)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
