"""Page contents as version numbers, for simulated guests and their migrated copies.

A page's content is a ``uint32``: the low bit says it holds data (0: all zeros), the other
bits the sequence number of the write that put it there, so two copies of a page are equal
exactly when they hold the same write. Whole-block writes (an allocation zeroing 4 MiB, a
program filling its heap) are kept per block and never touch per-page memory, so a multi-TiB
guest costs memory only for the blocks written page by page.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pagehint.migration.runs import expand_runs

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.13 lacks it

_I64Array = npt.NDArray[np.int64]
_U32Array = npt.NDArray[np.uint32]
_BoolArray = npt.NDArray[np.bool_]


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


@dataclass(frozen=True, eq=False)
class RunContents:
    """The contents of runs of pages, as segments that each lie inside one block or outside
    every block: a segment of a block written whole is one ``value``; any other segment has
    its pages' contents in ``values``, from ``offsets[i]`` on. What a page costs here is what
    it costs in the ``PageContents`` it was read from."""

    starts: _I64Array
    counts: _I64Array
    uniform: _BoolArray
    value: _U32Array
    """Each uniform segment's content (0 for the others)."""
    offsets: _I64Array
    """Where each other segment's pages start in ``values`` (0 for uniform ones)."""
    values: _U32Array
    block: _I64Array
    """Each segment's block (-1 for none) in the blocks it was read from, ``block_pfn``."""
    block_pfn: _I64Array
    pages_per_block: int

    def zero_pages(self) -> int:
        """Pages that are all zeros."""
        uniform_zero = self.uniform & is_zero(self.value)
        return int(self.counts[uniform_zero].sum()) + int(np.count_nonzero(is_zero(self.values)))

    def page_values(self) -> _U32Array:
        """Every page's content, in order (a value per page: for the oracle's mixed pages)."""
        out = np.repeat(self.value, self.counts)
        mixed = ~self.uniform
        if np.any(mixed):
            out[np.repeat(mixed, self.counts)] = self.values
        return out


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
        # Every block starts whole, as zeros: a block nobody wrote costs per block too.
        self._block_value = np.zeros(len(block_pfn), dtype=np.uint32)
        self._block_whole = np.ones(len(block_pfn), dtype=np.bool_)
        # Where runs are cut into segments: every block's first page and the page after it.
        bounds = np.stack([block_pfn, block_pfn + pages_per_block], axis=1).ravel()
        self._edges = bounds[np.diff(bounds, prepend=-1) != 0]  # a block's end is the next's start
        # The block from each edge to the next (-1: none), and a last -1 for before the first.
        self._edge_block = np.append(self.block_of(self._edges), -1)
        self._edges_after = np.append(self._edges, 0)  # indexable one past the last edge

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

    def write_blocks(self, blocks: _I64Array, value: int | _U32Array) -> None:
        """Every page of ``blocks`` now holds ``value`` (one for all, or one each)."""
        self._block_value[blocks] = value
        self._block_whole[blocks] = True

    def _split(self, blocks: _I64Array) -> None:
        """Blocks about to be written page by page: their per-page entries take over."""
        blocks = blocks[blocks >= 0]
        blocks = np.unique(blocks[self._block_whole[blocks]])
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

    def _segments(
        self, starts: _I64Array, counts: _I64Array
    ) -> tuple[_I64Array, _I64Array, _I64Array, _I64Array, _I64Array]:
        """Runs ``[starts[i], +counts[i])`` (none empty) cut at block edges: each segment's
        start, length, block (-1 for none), run and offset inside its run."""
        ends = starts + counts
        # The edges strictly inside each run cut it: run i has cuts[i] + 1 segments.
        first_cut = self._edges.searchsorted(starts, side="right")
        cuts = self._edges.searchsorted(ends, side="left") - first_cut
        nseg = cuts + 1
        run = np.repeat(np.arange(len(starts), dtype=np.int64), nseg)
        k = np.arange(len(run), dtype=np.int64) - np.repeat(np.cumsum(nseg) - nseg, nseg)
        # The last edge at or before segment k's start (-1: none); the segment lies between
        # it and the next edge, so in that edge's block or in none.
        prev = np.repeat(first_cut - 1, nseg) + k
        seg_start = np.where(k == 0, starts[run], self._edges_after[prev])
        seg_end = np.where(k == cuts[run], ends[run], self._edges_after[prev + 1])
        offset = seg_start - starts[run]
        return seg_start, seg_end - seg_start, self._edge_block[prev], run, offset

    def read_runs(self, starts: _I64Array, counts: _I64Array) -> RunContents:
        """The contents of runs ``[starts[i], +counts[i])`` (none empty, none overlapping)."""
        seg_start, seg_count, block, _, _ = self._segments(starts, counts)
        inside = block >= 0
        uniform = inside.copy()
        uniform[inside] = self._block_whole[block[inside]]
        value = np.zeros(len(seg_start), dtype=np.uint32)
        value[uniform] = self._block_value[block[uniform]]
        mixed = ~uniform
        offsets = np.zeros(len(seg_start), dtype=np.int64)
        offsets[mixed] = np.cumsum(seg_count[mixed]) - seg_count[mixed]
        values = self._page[expand_runs(seg_start[mixed], seg_count[mixed])]
        return RunContents(
            seg_start, seg_count, uniform, value, offsets, values, block, self.block_pfn,
            self.pages_per_block,
        )  # fmt: skip

    def write_runs(self, runs: RunContents) -> None:
        """The pages of ``runs`` (read from any ``PageContents`` of as many pages) now hold
        its contents: a uniform segment that covers one of these blocks writes it whole."""
        if runs.block_pfn is self.block_pfn and runs.pages_per_block == self.pages_per_block:
            # Read from contents of these very blocks (the destination's copy of its source's
            # guest): the segments are cut at these blocks already.
            seg_start, seg_count, block = runs.starts, runs.counts, runs.block
            parent = np.arange(len(seg_start), dtype=np.int64)
            offset = np.zeros(len(seg_start), dtype=np.int64)
        else:
            seg_start, seg_count, block, parent, offset = self._segments(runs.starts, runs.counts)
        uniform = runs.uniform[parent]
        whole = uniform & (block >= 0) & (seg_count == self.pages_per_block)
        self.write_blocks(block[whole], runs.value[parent[whole]])
        part = ~whole
        self._split(block[part])
        count = seg_count[part]
        values = np.repeat(runs.value[parent[part]], count)
        mixed = ~uniform[part]
        if np.any(mixed):
            at = runs.offsets[parent[part][mixed]] + offset[part][mixed]
            values[np.repeat(mixed, count)] = runs.values[expand_runs(at, count[mixed])]
        self._page[expand_runs(seg_start[part], count)] = values

    def _check_same_blocks(self, other: PageContents) -> None:
        if (
            other.npages != self.npages
            or other.pages_per_block != self.pages_per_block
            or not np.array_equal(other.block_pfn, self.block_pfn)
        ):
            raise ValueError("the contents compared must have the same pages and blocks")

    def differing_blocks(self, other: PageContents) -> tuple[_I64Array, _U32Array]:
        """The blocks written whole here and in ``other`` (same pages and blocks) whose
        contents differ, ascending, with their content here."""
        self._check_same_blocks(other)
        both = self._block_whole & other._block_whole
        blocks = np.flatnonzero(both & (self._block_value != other._block_value)).astype(np.int64)
        return blocks, self._block_value[blocks]

    def mixed_runs(self, other: PageContents, longest: int) -> tuple[_I64Array, _I64Array]:
        """Runs of the pages ``differing_blocks`` does not compare (in a block kept page by
        page here or in ``other``, or in no block), ascending, none longer than ``longest``."""
        self._check_same_blocks(other)
        ppb = self.pages_per_block
        mixed = self.block_pfn[~(self._block_whole & other._block_whole)]
        gap_starts = np.concatenate([[0], self.block_pfn + ppb]).astype(np.int64)
        gap_ends = np.concatenate([self.block_pfn, [self.npages]]).astype(np.int64)
        gap = gap_ends > gap_starts
        starts = np.concatenate([mixed, gap_starts[gap]])
        counts = np.concatenate([np.full(len(mixed), ppb, np.int64), (gap_ends - gap_starts)[gap]])
        order = np.argsort(starts, kind="stable")
        starts, counts = starts[order], counts[order]
        # Long runs (pages in no block) in pieces of at most ``longest``.
        pieces = -(-counts // longest)
        k = np.arange(int(pieces.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(pieces) - pieces, pieces
        )
        run = np.repeat(np.arange(len(starts)), pieces)
        piece_start = starts[run] + k * longest
        return piece_start, np.minimum(longest, starts[run] + counts[run] - piece_start)

    def copy_from(self, other: PageContents, starts: _I64Array, counts: _I64Array) -> None:
        """Runs ``[starts[i], +counts[i])`` take ``other``'s contents (pages sent over the
        link)."""
        self.write_runs(other.read_runs(starts, counts))
