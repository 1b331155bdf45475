"""Page contents as version numbers, for simulated guests and their migrated copies.

A page's content is a ``uint32``: the low bit says it holds data (0: all zeros), the other
bits the sequence number of the write that put it there, so two copies of a page are equal
exactly when they hold the same write. Whole-block writes (an allocation zeroing 4 MiB, a
program filling its heap) are kept per block and never touch per-page memory, so a multi-TiB
guest costs memory only for the blocks written page by page.
"""

from __future__ import annotations

import mmap

import numpy as np
import numpy.typing as npt

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.13 lacks it

_I64Array = npt.NDArray[np.int64]
_U32Array = npt.NDArray[np.uint32]


def data_version(seq: int) -> int:
    """The content a data write with sequence number ``seq`` leaves."""
    return (seq << 1 | 1) & 0xFFFF_FFFF


def zero_version(seq: int) -> int:
    """The content a zeroing write with sequence number ``seq`` leaves."""
    return (seq << 1) & 0xFFFF_FFFF


def is_zero(content: _U32Array) -> npt.NDArray[np.bool_]:
    """Which contents are all-zero pages."""
    zero: npt.NDArray[np.bool_] = (content & 1) == 0
    return zero


def lazy_zeros_u32(n: int) -> _U32Array:
    """A zeroed ``uint32`` array whose memory is mapped only where written, in 4 KiB pages.

    numpy asks for transparent huge pages on large arrays, so a few scattered writes to a
    GiB-sized ``np.zeros`` array fault in (and zero) 2 MiB each; an anonymous mapping left to
    the kernel's default costs one small page per page touched."""
    buf = mmap.mmap(-1, max(4, 4 * n), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    return np.frombuffer(buf, dtype=np.uint32, count=n)


class PageContents:
    """The content of ``npages`` pages, with blocks of ``pages_per_block`` pages starting at
    ``block_pfn`` (ascending) written whole in O(1) each. Every page starts as zeros."""

    def __init__(self, npages: int, block_pfn: _I64Array, pages_per_block: int) -> None:
        if len(block_pfn) > 1 and np.any(np.diff(block_pfn) < pages_per_block):
            raise ValueError("blocks must be ascending and not overlap")
        if len(block_pfn) and (block_pfn[0] < 0 or block_pfn[-1] + pages_per_block > npages):
            raise ValueError(f"blocks must lie inside the {npages} pages")
        self.npages = npages
        self.block_pfn = block_pfn
        self.pages_per_block = pages_per_block
        self._page = lazy_zeros_u32(npages)
        self._block_value = np.zeros(len(block_pfn), dtype=np.uint32)
        self._block_whole = np.zeros(len(block_pfn), dtype=np.bool_)

    def block_pages(self, blocks: _I64Array) -> _I64Array:
        """The page numbers of ``blocks``, block by block."""
        ar = np.arange(self.pages_per_block, dtype=np.int64)
        return (self.block_pfn[blocks][:, None] + ar).ravel()

    def block_of(self, pfns: _I64Array) -> _I64Array:
        """The block of each page, or -1 for a page in no block."""
        blk = np.searchsorted(self.block_pfn, pfns, side="right").astype(np.int64) - 1
        ok = blk >= 0
        ok[ok] = pfns[ok] < self.block_pfn[blk[ok]] + self.pages_per_block
        return np.where(ok, blk, -1)

    def write_blocks(self, blocks: _I64Array, value: int) -> None:
        """Every page of ``blocks`` now holds ``value``."""
        self._block_value[blocks] = value
        self._block_whole[blocks] = True

    def _split(self, blocks: _I64Array) -> None:
        """Blocks about to be written page by page: their per-page entries take over."""
        blocks = np.unique(blocks[blocks >= 0])
        blocks = blocks[self._block_whole[blocks]]
        if len(blocks):
            values = np.repeat(self._block_value[blocks], self.pages_per_block)
            self._page[self.block_pages(blocks)] = values
            self._block_whole[blocks] = False

    def write_pages(self, pfns: _I64Array, value: int | _U32Array) -> None:
        """Pages ``pfns`` now hold ``value`` (one for all, or one each)."""
        self._split(self.block_of(pfns))
        self._page[pfns] = value

    def get(self, pfns: _I64Array) -> _U32Array:
        """The contents of pages ``pfns``."""
        out = self._page[pfns].copy()
        blk = self.block_of(pfns)
        whole = blk >= 0
        whole[whole] = self._block_whole[blk[whole]]
        out[whole] = self._block_value[blk[whole]]
        return out

    def get_range(self, start: int, n: int) -> _U32Array:
        """The contents of pages ``[start, start + n)``."""
        if start < 0 or n < 0 or start + n > self.npages:
            raise IndexError(f"[{start}, +{n}) is not inside {self.npages} pages")
        out = self._page[start : start + n].copy()
        ppb = self.pages_per_block
        lo = int(np.searchsorted(self.block_pfn, start - ppb, side="right"))
        hi = int(np.searchsorted(self.block_pfn, start + n, side="left"))
        blocks = np.flatnonzero(self._block_whole[lo:hi]) + lo
        if len(blocks):
            # Whole blocks: fill their pages, clipped to the range at its two ends.
            offs = self.block_pfn[blocks] - start
            values = self._block_value[blocks]
            inside = (offs >= 0) & (offs + ppb <= n)
            idx = (offs[inside][:, None] + np.arange(ppb)).ravel()
            out[idx] = np.repeat(values[inside], ppb)
            for off, value in zip(offs[~inside].tolist(), values[~inside].tolist(), strict=True):
                out[max(off, 0) : min(off + ppb, n)] = value
        return out

    def copy_from(self, other: PageContents, pfns: _I64Array) -> None:
        """Pages ``pfns`` take ``other``'s contents (a page sent over the link)."""
        self.write_pages(pfns, other.get(pfns))
