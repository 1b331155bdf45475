"""A plain-Python reference model of ``pagehint.DirtyBitmap``.

The whole bitmap is one Python int: bit ``i`` is page ``i``. Every method has the contract's
signature, return value and exceptions, so tests can run the same call on both and compare.
Arguments are validated in the order the contract implies (argument types, then signs, then
ranges); an invalid call raises and leaves the model unchanged, like the real bitmap.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

U64Array = npt.NDArray[np.uint64]

WORD_BITS = 64
WORD_MASK = (1 << WORD_BITS) - 1


def _int(value: object, name: str) -> int:
    """An integer argument (anything with ``__index__`` except floats), else TypeError."""
    if isinstance(value, (float, np.floating)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def _pos(value: object, name: str = "start") -> int:
    """A page number: negative is an IndexError."""
    v = _int(value, name)
    if v < 0:
        raise IndexError(f"{name} {v} is negative")
    return v


def _count(value: object, name: str = "n") -> int:
    """A number of pages: negative is a ValueError."""
    v = _int(value, name)
    if v < 0:
        raise ValueError(f"{name} {v} is negative")
    return v


def _u64_array(value: object, name: str) -> list[int]:
    """A 1-D C-contiguous native uint64 numpy array, as a list of ints."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, not {type(value).__name__}")
    if value.ndim != 1 or value.dtype != np.dtype(np.uint64):
        raise TypeError(f"{name} must be a 1-D uint64 array, not {value.ndim}-D {value.dtype}")
    if not value.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return [int(x) for x in value.tolist()]


def words_to_int(words: Sequence[int] | U64Array) -> int:
    """The int whose bit ``64*j + i`` is bit ``i`` of ``words[j]``."""
    arr = np.ascontiguousarray(np.asarray(words, dtype=np.uint64))
    return int.from_bytes(arr.astype("<u8").tobytes(), "little")


def int_to_words(bits: int, nwords: int) -> U64Array:
    """``nwords`` uint64 words holding ``bits`` (which must fit)."""
    raw = bits.to_bytes(8 * nwords, "little")
    out: U64Array = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    return out


def lowest_set(bits: int) -> int:
    """Index of the lowest set bit of a non-zero int."""
    return (bits & -bits).bit_length() - 1


class ModelBitmap:
    """Reference dirty bitmap over pages ``[0, npages)``."""

    def __init__(self, npages: object, *, dirty: bool = False) -> None:
        self._npages = _count(npages, "npages")
        self._full = (1 << self._npages) - 1
        self.bits = self._full if dirty else 0

    @classmethod
    def from_words(cls, npages: int, words: Sequence[int] | U64Array) -> ModelBitmap:
        m = cls(npages)
        bits = words_to_int(words)
        if bits & ~m._full:
            raise ValueError("words set bits past npages")
        m.bits = bits
        return m

    @classmethod
    def from_pages(cls, npages: int, pages: Sequence[int]) -> ModelBitmap:
        m = cls(npages)
        for p in pages:
            m.bits |= 1 << p
        if m.bits & ~m._full:
            raise ValueError("page past npages")
        return m

    # -- size ------------------------------------------------------------------------------

    @property
    def npages(self) -> int:
        return self._npages

    @property
    def nwords(self) -> int:
        return -(-self._npages // WORD_BITS)

    @property
    def nbytes(self) -> int:
        return 8 * self.nwords

    def __len__(self) -> int:
        return self._npages

    def copy(self) -> ModelBitmap:
        m = ModelBitmap(self._npages)
        m.bits = self.bits
        return m

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelBitmap):
            return NotImplemented
        return self._npages == other._npages and self.bits == other.bits

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        if eq is NotImplemented:
            return NotImplemented
        return not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ModelBitmap(npages={self._npages}, dirty_pages={self.count()})"

    # -- checks ----------------------------------------------------------------------------

    def _range(self, start: object, n: object) -> tuple[int, int]:
        s = _pos(start, "start")
        c = _count(n, "n")
        if s + c > self._npages:
            raise IndexError(f"pages [{s}, {s}+{c}) are not inside {self._npages} pages")
        return s, c

    def _page(self, pfn: object) -> int:
        p = _pos(pfn, "pfn")
        if p >= self._npages:
            raise IndexError(f"page {p} is not inside {self._npages} pages")
        return p

    def _start(self, start: object) -> int:
        s = _pos(start, "start")
        if s > self._npages:
            raise IndexError(f"start {s} is past {self._npages} pages")
        return s

    def _rest(self, start: object, n: object | None) -> tuple[int, int]:
        if n is None:
            s = self._start(start)
            return s, self._npages - s
        return self._range(start, n)

    @staticmethod
    def _mask(start: int, n: int) -> int:
        return ((1 << n) - 1) << start

    # -- single pages and ranges -----------------------------------------------------------

    def set_range(self, start: object, n: object) -> int:
        s, c = self._range(start, n)
        mask = self._mask(s, c)
        new = (mask & ~self.bits).bit_count()
        self.bits |= mask
        return new

    def clear_range(self, start: object, n: object) -> int:
        s, c = self._range(start, n)
        mask = self._mask(s, c)
        was = (mask & self.bits).bit_count()
        self.bits &= ~mask
        return was

    def count(self, start: object = 0, n: object | None = None) -> int:
        s, c = self._rest(start, n)
        return (self.bits & self._mask(s, c)).bit_count()

    def test(self, pfn: object) -> bool:
        p = self._page(pfn)
        return bool(self.bits >> p & 1)

    def test_and_clear(self, pfn: object) -> bool:
        p = self._page(pfn)
        was = bool(self.bits >> p & 1)
        self.bits &= ~(1 << p)
        return was

    def set_all(self) -> None:
        self.bits = self._full

    def clear_all(self) -> None:
        self.bits = 0

    # -- batches ---------------------------------------------------------------------------

    def _ranges_mask(self, starts: object, counts: object) -> int:
        ss = _u64_array(starts, "starts")
        cs = _u64_array(counts, "counts")
        if len(ss) != len(cs):
            raise ValueError(f"arrays of different lengths: {len(ss)} and {len(cs)}")
        for s, c in zip(ss, cs, strict=True):
            self._range(s, c)
        mask = 0
        for s, c in zip(ss, cs, strict=True):
            mask |= self._mask(s, c)
        return mask

    def set_ranges(self, starts: object, counts: object) -> int:
        mask = self._ranges_mask(starts, counts)
        new = (mask & ~self.bits).bit_count()
        self.bits |= mask
        return new

    def clear_ranges(self, starts: object, counts: object) -> int:
        mask = self._ranges_mask(starts, counts)
        was = (mask & self.bits).bit_count()
        self.bits &= ~mask
        return was

    def merge_log(self, log: object, page_offset: object = 0) -> int:
        off = _pos(page_offset, "page_offset")
        words = _u64_array(log, "log")
        if off % WORD_BITS:
            raise ValueError(f"page_offset {off} is not a multiple of 64")
        if off > self._npages:
            raise IndexError(f"page_offset {off} is past {self._npages} pages")
        incoming = words_to_int(words) << off
        if incoming & ~self._full:
            pfn = lowest_set(incoming & ~self._full)
            raise IndexError(f"the dirty log marks page {pfn}, past {self._npages} pages")
        new = (incoming & ~self.bits).bit_count()
        self.bits |= incoming
        return new

    # -- scanning --------------------------------------------------------------------------

    def next_dirty(self, start: object = 0) -> int | None:
        s = self._start(start)
        rest = self.bits >> s
        return None if rest == 0 else s + lowest_set(rest)

    def _bitstring(self, start: int, end: int) -> str:
        """Pages ``[start, end)`` as a string of '0'/'1', page ``start`` first."""
        width = end - start
        if width <= 0:
            return ""
        chunk = (self.bits >> start) & ((1 << width) - 1)
        return format(chunk, f"0{width}b")[::-1]

    def take_dirty(self, max_pages: object, start: object = 0) -> U64Array:
        m = _count(max_pages, "max_pages")
        s = self._start(start)
        text = self._bitstring(s, self._npages)
        taken: list[int] = []
        i = text.find("1")
        while i >= 0 and len(taken) < m:
            taken.append(s + i)
            i = text.find("1", i + 1)
        if taken:
            # Every dirty page from start to the last one taken was taken.
            self.bits &= ~self._mask(s, taken[-1] + 1 - s)
        return np.array(taken, dtype=np.uint64)

    def take_dirty_runs(self, max_pages: object, start: object = 0) -> tuple[U64Array, U64Array]:
        taken = self.take_dirty(max_pages, start).astype(np.int64)
        breaks = np.flatnonzero(np.diff(taken) != 1) + 1
        first = np.concatenate([[0], breaks]) if len(taken) else np.zeros(0, np.int64)
        lens = np.diff(np.concatenate([first, [len(taken)]])) if len(taken) else first
        return taken[first].astype(np.uint64), lens.astype(np.uint64)

    def dirty_runs(self, start: object = 0, n: object | None = None) -> tuple[U64Array, U64Array]:
        s, c = self._rest(start, n)
        text = self._bitstring(s, s + c)
        starts: list[int] = []
        lens: list[int] = []
        i = text.find("1")
        while i >= 0:
            j = text.find("0", i)
            if j < 0:
                j = len(text)
            starts.append(s + i)
            lens.append(j - i)
            i = text.find("1", j)
        return np.array(starts, dtype=np.uint64), np.array(lens, dtype=np.uint64)

    # -- words -----------------------------------------------------------------------------

    def words(self) -> U64Array:
        return int_to_words(self.bits, self.nwords)

    def pages(self) -> list[int]:
        """Every dirty page, ascending."""
        text = self._bitstring(0, self._npages)
        return [i for i, b in enumerate(text) if b == "1"]
