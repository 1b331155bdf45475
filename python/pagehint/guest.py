"""A deterministic guest that drives free page hinting the way a Linux guest does.

``SimulatedGuest`` models what a migration sees of a guest: page contents as per-page version
numbers (numpy, lazily allocated, so multi-TiB guests are cheap while idle), an allocator of
free blocks of the hint order, workloads that allocate, write and free, the Linux
virtio-balloon driver's free page hinting (``drivers/virtio/virtio_balloon.c``) writing real
elements into a real split ring in guest RAM, its shrinker, page poisoning, and a KVM dirty
log in classic or manual-protect mode. Only the rings live in the RAM buffer.

Page contents are ``pagehint.contents.PageContents`` (a version number per page, blocks
written whole kept per block); the dirty log is ``pagehint.dirty_log.DirtyLog``; workloads are
in ``pagehint.workloads`` (re-exported here). Every write is recorded in the dirty log.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.balloon import (
    CMD_ID_DONE,
    CMD_ID_STOP,
    CONFIG_FREE_PAGE_HINT_CMD_ID,
    CONFIG_POISON_VAL,
    F_DEFLATE_ON_OOM,
    F_EVENT_IDX,
    F_FREE_PAGE_HINT,
    F_INDIRECT_DESC,
    F_MUST_TELL_HOST,
    F_PAGE_POISON,
    F_STATS_VQ,
    F_VERSION_1,
    FREE_PAGE_QUEUE_MAX,
    FreePageHintDevice,
    ProcessResult,
)
from pagehint.contents import MAP_NORESERVE, PageContents, data_version, zero_version
from pagehint.dirty_log import DirtyLog
from pagehint.driver_ring import DriverSplitRing, ring_bytes
from pagehint.workloads import Idle, KernelCompile, MemoryHog, SteadyWriter, Workload

__all__ = [
    "FREE",
    "HINTED",
    "HINT_BLOCK_BYTES",
    "PAGE_POISON",
    "USED",
    "DirtyLog",
    "DriverStep",
    "Idle",
    "KernelCompile",
    "MemoryHog",
    "RoundResult",
    "SimulatedGuest",
    "SteadyWriter",
    "Workload",
    "run_until_idle",
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


@dataclass(frozen=True)
class DriverStep:
    """What one ``run_driver`` call did: blocks put in the ring as hints, cmd ids sent (the
    round's id, then STOP), hinted blocks given back to the allocator on DONE, whether a round
    is still going, and whether it stopped for lack of ring space."""

    blocks_hinted: int = 0
    cmd_ids_sent: tuple[int, ...] = ()
    blocks_returned: int = 0
    in_round: bool = False
    ring_full: bool = False
    kick: bool = False


class SimulatedGuest:
    """A seeded guest on ``memmap`` with free page hinting.

    ``used`` is the fraction of RAM in use at boot (kernel, page cache, ...), taken in whole
    hint blocks. ``init_on_alloc`` (Debian's default) zeroes every block the allocator hands
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
        init_on_alloc: bool = True,
        poison: int | None = None,
        log_mode: Literal["classic", "manual"] = "classic",
        block_bytes: int | None = None,
        ram: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        if not 0.0 <= used <= 1.0:
            raise ValueError(f"used is a fraction of RAM, not {used}")
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
        self._lock = threading.Lock()
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
        self._free = self.rng.permutation(self.nblocks).astype(np.int64)
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
        self.write_blocks(self._kernel_blocks)
        if ram is None:
            self._mapping = mmap.mmap(
                -1, memmap.ram_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
            )
            ram = np.frombuffer(self._mapping, dtype=np.uint8)
        if ram.dtype != np.uint8 or ram.size != memmap.ram_bytes:
            raise ValueError(f"ram must be a uint8 array of {memmap.ram_bytes} bytes")
        self.ram = ram
        # Driver state (virtio_balloon.c's struct virtio_balloon).
        self.device: FreePageHintDevice | None = None
        self.negotiated = 0
        self.queue: DriverSplitRing | None = None
        self._ring_base = int(self.block_gpa[self._kernel_blocks[0]])
        self._read_cmd_id = False  # VIRTIO_BALLOON_CONFIG_READ_CMD_ID
        self._work_queued = False  # report_free_page_work
        self._cmd_id_received = CMD_ID_STOP
        self.cmd_id_active = CMD_ID_STOP
        self._in_round = False
        self.config_interrupts = 0

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

    def kernel_pages(self) -> _I64Array:
        """Pages of the blocks the kernel holds since boot."""
        return self.block_pages(self._kernel_blocks)

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

    def _write_gpa_range(self, gpa: int, nbytes: int) -> None:
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

    # -- the balloon driver --------------------------------------------------------------------

    def attach(self, device: FreePageHintDevice) -> int:
        """Probes ``device`` as Linux's virtio_balloon does: negotiates (PAGE_POISON only
        with page poisoning, REPORTING never: this guest does not report), sets up the free
        page queue in kernel memory with the device's maximum size, writes ``poison_val``,
        and takes config interrupts. Returns the negotiated features."""
        wanted = sum(1 << b for b in (F_MUST_TELL_HOST, F_STATS_VQ, F_DEFLATE_ON_OOM,
                                      F_FREE_PAGE_HINT, F_VERSION_1, F_EVENT_IDX,
                                      F_INDIRECT_DESC))
        if self.poison is not None:
            wanted |= 1 << F_PAGE_POISON
        self.negotiated = device.negotiate(wanted & device.features)
        self.device = device
        device.notify_config = self.config_changed
        index = device.free_page_queue_index
        if index is not None:
            size = FREE_PAGE_QUEUE_MAX
            desc, avail, used = self._ring_layout(size)
            event_idx = bool(self.negotiated >> F_EVENT_IDX & 1)
            self.queue = DriverSplitRing(self.ram, self.memmap, size, desc, avail, used,
                                         event_idx=event_idx)
            device.set_queue(index, size, desc, avail, used)
            self._write_gpa_range(self._ring_base, self._ring_area(size) + 8)
        if self.negotiated >> F_PAGE_POISON & 1:
            assert self.poison is not None
            device.write_config(CONFIG_POISON_VAL, self.poison.to_bytes(4, "little"))
        self._cmd_id_received = self.cmd_id_active = CMD_ID_STOP
        return self.negotiated

    def _ring_layout(self, size: int) -> tuple[int, int, int]:
        dn, an, _ = ring_bytes(size)
        desc = self._ring_base
        avail = desc + dn
        used = -(-(avail + an) // 4096) * 4096
        return desc, avail, used

    def _ring_area(self, size: int) -> int:
        """Bytes from the descriptor table to the end of the used ring."""
        desc, _, used = self._ring_layout(size)
        return used + ring_bytes(size)[2] - desc

    @property
    def _cmd_gpas(self) -> tuple[int, int]:
        # cmd_id_active and cmd_id_stop: 4-byte out-buffers after the rings.
        base = self._ring_base + self._ring_area(FREE_PAGE_QUEUE_MAX)
        return base, base + 4

    def config_changed(self) -> None:
        """The config interrupt (virtballoon_changed): re-read the cmd id next time, and
        queue the free page work. Safe to call from another thread."""
        with self._lock:
            self.config_interrupts += 1
            self._read_cmd_id = True
            self._work_queued = True

    def _cmd_id(self) -> int:
        """virtio_balloon_cmd_id_received: the config is read only after a config interrupt."""
        with self._lock:
            read, self._read_cmd_id = self._read_cmd_id, False
        if read and self.device is not None:
            raw = self.device.read_config(CONFIG_FREE_PAGE_HINT_CMD_ID, 4)
            self._cmd_id_received = int.from_bytes(raw, "little")
        return self._cmd_id_received

    def _send_cmd_id(self, gpa: int, cmd_id: int) -> None:
        assert self.queue is not None
        self.ram[self._ram_offset(gpa) : self._ram_offset(gpa) + 4] = np.frombuffer(
            cmd_id.to_bytes(4, "little"), dtype=np.uint8
        )
        self.queue.add(np.array([gpa], dtype=np.uint64), 4, writable=False)

    def _ram_offset(self, gpa: int) -> int:
        return self.memmap.pfn_of(gpa) * self.page_size + gpa % self.page_size

    def run_driver(self, max_blocks: int | None = None, *, late: bool = False) -> DriverStep:
        """Runs the driver's pending free page work: on a new cmd id, an out-buffer with it,
        then one in-buffer per free block (allocated from the free list, so zeroed with
        ``init_on_alloc``) while the id in config is unchanged, then a STOP out-buffer; on
        DONE, every hinted block goes back to the allocator. Adds at most ``max_blocks``
        blocks, and stops early when the ring is full (one entry stays free for the cmd id);
        the round then continues on the next call. Used buffers are reclaimed first.

        The id is re-checked before every block; as the config changes only through the
        device, a batch between two device calls sees one value, so checking per batch is
        the same check. Config interrupts from another thread land between batches.

        ``late=True`` plays the vCPU race a real guest has: the id was checked just before
        the config changed, so the first batch of a round in progress goes out under the old
        id without looking again."""
        if self.queue is None:
            return DriverStep()
        queue = self.queue
        queue.get_used()
        budget = -1 if max_blocks is None else max_blocks
        hinted = returned = 0
        sent: list[int] = []
        ring_full = False
        active_gpa, stop_gpa = self._cmd_gpas
        while True:
            if not self._in_round:
                with self._lock:
                    queued, self._work_queued = self._work_queued, False
                if not queued:
                    break
                received = self._cmd_id()
                if received == CMD_ID_DONE:
                    returned += self.shrink(self._nhinted)
                elif received not in (CMD_ID_STOP, self.cmd_id_active):
                    # send_cmd_id_start
                    self.cmd_id_active = received
                    self._send_cmd_id(active_gpa, received)
                    sent.append(received)
                    self._in_round = True
                continue
            # send_free_pages: stop on a changed id, or when no block is free.
            if late:
                late = False
            elif self._cmd_id() != self.cmd_id_active:
                self._end_round(stop_gpa, sent)
                continue
            space = queue.num_free - 1
            want = space if budget < 0 else min(space, budget)
            if want <= 0:
                ring_full = space <= 0
                break
            blocks = self._pop_free(want)
            if len(blocks):
                self.state[blocks] = HINTED
                self.hinted_under[blocks] = self.cmd_id_active
                if self.init_on_alloc:
                    self.write_blocks(blocks, zero=True)
                self.hint_seq[blocks] = self._next_seq()
                queue.add(self.block_gpa[blocks], self.block_bytes, writable=True,
                          tokens=blocks)
                self._hinted[self._nhinted : self._nhinted + len(blocks)] = blocks
                self._nhinted += len(blocks)
                hinted += len(blocks)
                if budget > 0:
                    budget -= len(blocks)
            if len(blocks) < want:
                self._end_round(stop_gpa, sent)  # the allocation failed: all free blocks sent
        touched = hinted or sent
        if touched:
            self._write_gpa_range(self._ring_base, self._ring_area(queue.size) + 8)
        return DriverStep(hinted, tuple(sent), returned, self._in_round, ring_full,
                          bool(touched) and queue.kick())

    def _end_round(self, stop_gpa: int, sent: list[int]) -> None:
        self._send_cmd_id(stop_gpa, CMD_ID_STOP)
        sent.append(CMD_ID_STOP)
        self._in_round = False

    @property
    def in_round(self) -> bool:
        """Whether a hinting round is going (its STOP not sent yet)."""
        return self._in_round

    @property
    def work_pending(self) -> bool:
        """Whether a config interrupt left free page work to do."""
        return self._work_queued

    def lost_pages(self, destination: PageContents, chunk: int = 1 << 22) -> _I64Array:
        """The oracle: pages whose ``destination`` content differs from this guest's and
        that are not excused by a hint (hinted, and not written since the hint)."""
        lost: list[_I64Array] = []
        for start in range(0, self.npages, chunk):
            n = min(chunk, self.npages - start)
            src = self.contents.get_range(start, n)
            bad = np.flatnonzero(src != destination.get_range(start, n))
            if not len(bad):
                continue
            pfns = bad + start
            blk = self.contents.block_of(pfns)
            excused = blk >= 0
            seq = self.hint_seq[blk[excused]]
            excused[excused] = (seq > 0) & ((src[bad][excused] >> 1) < seq)
            lost.append(pfns[~excused])
        return np.concatenate(lost) if lost else np.zeros(0, dtype=np.int64)

    def note_device_writes(self) -> None:
        """The device wrote the used ring: those pages changed (call after ``process``)."""
        if self.queue is not None:
            _, _, used = self._ring_layout(self.queue.size)
            self._write_gpa_range(used, ring_bytes(self.queue.size)[2])


@dataclass(frozen=True)
class RoundResult:
    """A hinting round run to its end: blocks the guest hinted, what the device applied and
    cleared, and how many driver/device steps it took."""

    blocks_hinted: int
    pages_hinted: int
    pages_cleared: int
    hint_elements_ignored: int
    steps: int
    cmd_ids: list[int]


def run_until_idle(
    guest: SimulatedGuest,
    device: FreePageHintDevice,
    *,
    max_blocks_per_step: int | None = None,
    max_steps: int = 1 << 20,
    between: Callable[[int], None] | None = None,
) -> RoundResult:
    """Alternates the guest's driver and the device's queue processing until the guest has
    no free page work left and the device's queue is empty. ``between(step)`` runs after each
    step (workloads, a stop_hinting(), ...)."""
    blocks = hinted = cleared = ignored = steps = 0
    cmd_ids: list[int] = []
    while steps < max_steps:
        s = guest.run_driver(max_blocks_per_step)
        r: ProcessResult = device.process()
        if r.elements:
            guest.note_device_writes()
        blocks += s.blocks_hinted
        hinted += r.hints.pages_hinted
        cleared += r.hints.pages_cleared
        ignored += r.hint_elements_ignored
        cmd_ids.extend(r.cmd_ids)
        steps += 1
        if between is not None:
            between(steps)
        if not guest.in_round and not guest.work_pending and r.elements == 0 \
                and not s.blocks_hinted and not s.cmd_ids_sent:
            break
    return RoundResult(blocks, hinted, cleared, ignored, steps, cmd_ids)
