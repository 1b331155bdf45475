"""A deterministic guest that drives free page hinting the way a Linux guest does.

``SimulatedGuest`` models what a migration sees of a guest: page contents as per-page version
numbers (numpy, lazily allocated, so multi-TiB guests are cheap while idle), an allocator of
free blocks of the hint order, workloads that allocate, write and free, the Linux
virtio-balloon driver (``guest.driver``, ``pagehint.sim.driver``), the balloon shrinker, page
poisoning, and a KVM dirty log in classic or manual-protect mode. Only the driver's rings live
in the RAM buffer.

Page contents are ``pagehint.sim.contents.PageContents`` (a version number per page, blocks
written whole kept per block); the dirty log is ``pagehint.sim.dirty_log.DirtyLog``; workloads
are in ``pagehint.sim.workloads``. Every write is recorded in the dirty log.
"""

from __future__ import annotations

import mmap
from typing import Literal

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.migration.runs import expand_runs
from pagehint.sim.contents import MAP_NORESERVE, PageContents, data_version, zero_version
from pagehint.sim.dirty_log import DirtyLog
from pagehint.sim.driver import LinuxBalloonDriver
from pagehint.sim.workloads import Workload

__all__ = [
    "FREE",
    "HINTED",
    "HINT_BLOCK_BYTES",
    "PAGE_POISON",
    "USED",
    "SimulatedGuest",
]

_I64Array = npt.NDArray[np.int64]
_U64Array = npt.NDArray[np.uint64]


PAGE_POISON = 0xAA
"""Linux's PAGE_POISON byte: what ``page_poison=1`` writes into freed pages."""

# Block states of the allocator.
FREE = 0
USED = 1
HINTED = 2

# Guest-page-size -> hint block bytes: MAX_PAGE_ORDER blocks (10 with 4 KiB pages, 11 with
# 16 KiB, 13 with 64 KiB on arm64).
HINT_BLOCK_BYTES = {4096: 4 << 20, 16384: 32 << 20, 65536: 512 << 20}


class SimulatedGuest:
    """A seeded guest on ``memmap`` with free page hinting.

    ``used`` is the fraction of RAM in use at boot (kernel, page cache, ...), taken in whole
    hint blocks; ``used_data`` is the fraction of those blocks' pages that hold data at boot
    (the first pages of each block; the rest stay zero pages, as most of a small kernel's
    first block). ``free_order`` is the order of the free list at boot: ``random`` (a guest
    that ran a while) or ``address`` (lowest address on top, as a freshly booted allocator
    such as pagehint's KVM test guest hands blocks out; the boot blocks are then the lowest).
    ``init_on_alloc`` (Debian's default) zeroes every block the allocator hands
    out, including the driver's hint blocks. ``poison`` is the page poisoning value written
    into freed pages (``0`` for ``init_on_free=1``, ``PAGE_POISON`` for ``page_poison=1``) or
    None for none: with it the driver accepts PAGE_POISON and tells the device. Guest RAM is
    ``ram`` if given (a ``uint8`` array of ``memmap.ram_bytes``), else an anonymous
    ``MAP_NORESERVE`` mapping in which only the ring pages are ever touched.
    """

    def __init__(
        self,
        memmap: _core.MemoryMap,
        *,
        seed: int = 0,
        used: float = 0.1,
        used_data: float = 1.0,
        free_order: Literal["random", "address"] = "random",
        init_on_alloc: bool = True,
        poison: int | None = None,
        log_mode: Literal["classic", "manual", "ring"] = "classic",
        block_bytes: int | None = None,
        ram: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        if not 0.0 <= used <= 1.0:
            raise ValueError(f"used is a fraction of RAM, not {used}")
        if not 0.0 <= used_data <= 1.0:
            raise ValueError(f"used_data is a fraction of the used blocks' pages, not {used_data}")
        if free_order not in ("random", "address"):
            raise ValueError(f"free_order must be 'random' or 'address', not {free_order!r}")
        page = memmap.page_size
        if block_bytes is None:
            block_bytes = HINT_BLOCK_BYTES[page]
        if block_bytes < page or block_bytes % page or block_bytes & (block_bytes - 1):
            raise ValueError(f"block_bytes must be a power-of-two multiple of {page}")
        if poison is not None and not 0 <= poison <= 0xFFFF_FFFF:
            raise ValueError(f"poison must be a u32 or None, not {poison}")
        self.memmap = memmap
        self.page_size = page
        self.npages = memmap.npages
        self.block_bytes = block_bytes
        self.pages_per_block = block_bytes // page
        self.init_on_alloc = init_on_alloc
        self.poison = poison
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self._seq = 1
        # Naturally aligned blocks entirely inside one region.
        gpas: list[_U64Array] = []
        for gpa, size in memmap.regions:
            first = -(-gpa // block_bytes) * block_bytes
            last = (gpa + size) // block_bytes * block_bytes
            if last > first:
                gpas.append(np.arange(first, last, block_bytes, dtype=np.uint64))
        self.block_gpa = np.concatenate(gpas) if gpas else np.zeros(0, np.uint64)
        self.nblocks = len(self.block_gpa)
        if self.nblocks < 2:
            raise ValueError("the guest needs at least two hint blocks of RAM")
        self.block_pfn = self._pfns_of(self.block_gpa)
        self.contents = PageContents(self.npages, self.block_pfn, self.pages_per_block)
        self.log = DirtyLog(self.npages, log_mode)
        self.state = np.full(self.nblocks, FREE, dtype=np.uint8)
        # The free list: a stack, most recently freed on top (the buddy allocator's LIFO).
        if free_order == "random":
            self._free = self.rng.permutation(self.nblocks).astype(np.int64)
        else:
            self._free = np.arange(self.nblocks - 1, -1, -1, dtype=np.int64)
        self._nfree = self.nblocks
        # Blocks held by the balloon driver (its free_page_list), most recent on top.
        self._hinted = np.zeros(self.nblocks, dtype=np.int64)
        self._nhinted = 0
        self.hinted_under = np.zeros(self.nblocks, dtype=np.uint32)
        """The cmd id each block was last hinted under (0: never)."""
        self.hint_seq = np.zeros(self.nblocks, dtype=np.uint32)
        """The write sequence number at each block's last hint (0: never hinted): a page
        whose content is older than its block's hint was not written since."""
        self.workloads: list[Workload] = []
        # Boot: the kernel and its caches hold `used` of RAM, the ring block included.
        boot = max(1, round(used * self.nblocks))
        self._kernel_blocks = self.alloc_blocks(boot)
        if used_data == 1.0:
            self.write_blocks(self._kernel_blocks)
        else:
            data = round(used_data * self.pages_per_block)
            starts = self.block_pfn[self._kernel_blocks]
            self.write_pages((starts[:, None] + np.arange(data, dtype=np.int64)).ravel())
        if ram is None:
            self._mapping = mmap.mmap(
                -1, memmap.ram_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            )
            ram = np.frombuffer(self._mapping, dtype=np.uint8)
        if ram.dtype != np.uint8 or ram.size != memmap.ram_bytes:
            raise ValueError(f"ram must be a uint8 array of {memmap.ram_bytes} bytes")
        self.ram = ram
        self.driver = LinuxBalloonDriver(self, int(self.block_gpa[self._kernel_blocks[0]]))
        """The virtio-balloon driver, with its rings in the first kernel block."""

    # -- pages and blocks ----------------------------------------------------------------------

    def _pfns_of(self, gpas: _U64Array) -> _I64Array:
        regions = sorted((g, s, self.memmap.pfn_of(g)) for g, s in self.memmap.regions)
        starts = np.array([r[0] for r in regions], dtype=np.uint64)
        first = np.array([r[2] for r in regions], dtype=np.int64)
        i = np.searchsorted(starts, gpas, side="right") - 1
        return first[i] + ((gpas - starts[i]) // np.uint64(self.page_size)).astype(np.int64)

    def blocks_for(self, nbytes: int) -> int:
        """Blocks needed to hold ``nbytes``."""
        return -(-int(nbytes) // self.block_bytes)

    def block_pages(self, blocks: _I64Array) -> _I64Array:
        """The page numbers of ``blocks``."""
        return self.contents.block_pages(blocks)

    def block_pages_at(self, blocks: _I64Array, index: _I64Array) -> _I64Array:
        """``block_pages(blocks)[index]``, without making the list of every page."""
        ppb = self.pages_per_block
        pfns: _I64Array = self.block_pfn[blocks[index // ppb]] + index % ppb
        return pfns

    @property
    def kernel_page_count(self) -> int:
        """How many pages the kernel's boot blocks hold."""
        return len(self._kernel_blocks) * self.pages_per_block

    def kernel_pages(self, index: _I64Array | None = None) -> _I64Array:
        """Pages of the blocks the kernel holds since boot, block by block; with ``index``,
        only those at ``index`` in that list (without making it)."""
        if index is None:
            return self.block_pages(self._kernel_blocks)
        return self.block_pages_at(self._kernel_blocks, index)

    def used_blocks(self, *, kernel: bool = True) -> _I64Array:
        """The blocks in use (allocated by a workload or the kernel, not held as hints), in
        block order; without the kernel's boot blocks unless ``kernel``."""
        used = self.state == USED
        if not kernel:
            used[self._kernel_blocks] = False
        return np.flatnonzero(used).astype(np.int64)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def write_blocks(self, blocks: _I64Array, *, zero: bool = False) -> None:
        """The guest writes every page of ``blocks`` (zeros if ``zero``)."""
        if not len(blocks):
            return
        seq = self._next_seq()
        self.contents.write_blocks(blocks, zero_version(seq) if zero else data_version(seq))
        starts = self.block_pfn[blocks].astype(np.uint64)
        self.log.record(starts, np.full(len(blocks), self.pages_per_block, dtype=np.uint64))

    def write_pages(self, pfns: _I64Array, *, zero: bool = False) -> None:
        """The guest writes pages ``pfns``."""
        if not len(pfns):
            return
        seq = self._next_seq()
        self.contents.write_pages(pfns, zero_version(seq) if zero else data_version(seq))
        self.log.record(pfns.astype(np.uint64), np.ones(len(pfns), dtype=np.uint64))

    def write_gpa_range(self, gpa: int, nbytes: int) -> None:
        """The guest writes the pages holding ``nbytes`` at ``gpa``."""
        first = self.memmap.pfn_of(gpa)
        last = self.memmap.pfn_of(gpa + nbytes - 1)
        self.write_pages(np.arange(first, last + 1, dtype=np.int64))

    # -- the allocator -------------------------------------------------------------------------

    @property
    def free_block_count(self) -> int:
        """Blocks on the free list."""
        return self._nfree

    @property
    def hinted_block_count(self) -> int:
        """Blocks the balloon driver holds as hints."""
        return self._nhinted

    def hinted_blocks(self) -> _I64Array:
        """The blocks the balloon driver holds, most recently hinted last."""
        return self._hinted[: self._nhinted].copy()

    def _pop_free(self, k: int) -> _I64Array:
        k = min(k, self._nfree)
        blocks = self._free[self._nfree - k : self._nfree][::-1].copy()
        self._nfree -= k
        return blocks

    def alloc_blocks(self, k: int, *, reclaim: bool = True) -> _I64Array:
        """Allocates up to ``k`` blocks (fewer if memory runs out), most recently freed first.
        Under memory pressure the balloon shrinker gives hinted blocks back first (if
        ``reclaim``). With ``init_on_alloc`` the blocks are zeroed."""
        if k < 0:
            raise ValueError(f"cannot allocate {k} blocks")
        if reclaim and k > self._nfree:
            self.shrink(k - self._nfree)
        blocks = self._pop_free(k)
        self.state[blocks] = USED
        if self.init_on_alloc:
            self.write_blocks(blocks, zero=True)
        return blocks

    def free_blocks(self, blocks: _I64Array) -> None:
        """Frees ``blocks`` (page poisoning writes the poison value into them)."""
        if not len(blocks):
            return
        if np.any(self.state[blocks] == FREE):
            raise ValueError("freeing a block that is already free")
        if np.any(self.state[blocks] == HINTED):
            # The driver still lists it: a later shrink or DONE would free it again.
            raise ValueError("freeing a block the balloon driver holds")
        if len(np.unique(blocks)) != len(blocks):
            # It would go on the free list twice and be handed out twice.
            raise ValueError("freeing a block twice")
        self.state[blocks] = FREE
        if self.poison is not None:
            self.write_blocks(blocks, zero=self.poison == 0)
        self._free[self._nfree : self._nfree + len(blocks)] = blocks
        self._nfree += len(blocks)

    def hint_blocks(self, k: int, cmd_id: int) -> _I64Array:
        """The balloon driver allocates up to ``k`` free blocks to hint under ``cmd_id``
        (fewer if fewer are free): they stay allocated, in the driver's list, until DONE or
        the shrinker gives them back. With ``init_on_alloc`` they are zeroed first."""
        blocks = self._pop_free(k)
        if len(blocks):
            self.state[blocks] = HINTED
            self.hinted_under[blocks] = cmd_id
            if self.init_on_alloc:
                self.write_blocks(blocks, zero=True)
            self.hint_seq[blocks] = self._next_seq()
            self._hinted[self._nhinted : self._nhinted + len(blocks)] = blocks
            self._nhinted += len(blocks)
        return blocks

    def shrink(self, nblocks: int) -> int:
        """The balloon shrinker under memory pressure: gives up to ``nblocks`` hinted blocks
        back to the allocator, most recently hinted first, whether or not the device has used
        their buffers yet. Returns how many."""
        k = min(nblocks, self._nhinted)
        blocks = self._hinted[self._nhinted - k : self._nhinted][::-1].copy()
        self._nhinted -= k
        self.state[blocks] = USED  # the driver's allocation, freed as any other
        self.free_blocks(blocks)
        return k

    # -- workloads -----------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Runs every workload for ``seconds`` of guest time."""
        if seconds < 0:
            raise ValueError(f"time runs forward, not by {seconds}")
        for w in self.workloads:
            w.step(self, seconds)
        self.now += seconds

    def run(self, workload: Workload, seconds: float = 0.0) -> None:
        """Runs one workload (not kept) for ``seconds``."""
        workload.step(self, seconds)
        self.now += seconds

    def lost_pages(self, destination: PageContents, chunk: int = 1 << 22) -> _I64Array:
        """The oracle: pages whose ``destination`` content differs from this guest's and
        that are not excused by a hint (hinted, and not written since the hint), ascending.
        Blocks written whole on both sides are compared per block; the other pages page by
        page, ``chunk`` pages at a time."""
        blocks, content = self.contents.differing_blocks(destination)
        seq = self.hint_seq[blocks]
        lost = [self.block_pages(blocks[~((seq > 0) & ((content >> 1) < seq))])]
        starts, counts = self.contents.mixed_runs(destination, chunk)
        group = (np.cumsum(counts) - counts) // chunk  # runs of one chunk's worth together
        bounds = np.flatnonzero(np.diff(group)) + 1
        for st, ct in zip(np.split(starts, bounds), np.split(counts, bounds), strict=True):
            src = self.contents.read_runs(st, ct).page_values()
            bad = np.flatnonzero(src != destination.read_runs(st, ct).page_values())
            if not len(bad):
                continue
            pfns = expand_runs(st, ct)[bad]
            blk = self.contents.block_of(pfns)
            excused = blk >= 0
            seq = self.hint_seq[blk[excused]]
            excused[excused] = (seq > 0) & ((src[bad][excused] >> 1) < seq)
            lost.append(pfns[~excused])
        return np.sort(np.concatenate(lost))
