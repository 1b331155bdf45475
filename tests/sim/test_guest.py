"""The simulated guest without its balloon driver: page contents against a naive model, the
hint block layout, determinism, the allocator (LIFO, shrinker, init_on_alloc, poisoning), the
simulated KVM dirty log in both modes, the workloads, and a 4 TiB guest's memory cost."""

from __future__ import annotations

import copy
import gc
import os
from itertools import pairwise
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import FreePageHintDevice
from pagehint.migration import PageRuns, expand_runs
from pagehint.sim import (
    FREE,
    HINT_BLOCK_BYTES,
    HINTED,
    PAGE_POISON,
    USED,
    DirtyLog,
    Idle,
    KernelCompile,
    MemoryHog,
    SimulatedGuest,
    SteadyWriter,
    UsedWriter,
    WriteFree,
)
from pagehint.sim.contents import PageContents, data_version, is_zero, zero_version

I64Array = npt.NDArray[np.int64]
U32Array = npt.NDArray[np.uint32]
U64Array = npt.NDArray[np.uint64]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# -- helpers -----------------------------------------------------------------------------------


def small_map() -> MemoryMap:
    """64 MiB in two 32 MiB regions (below 4 GiB and from 4 GiB): 16 blocks of 4 MiB."""
    return MemoryMap.x86(64 * MiB, below_4g=32 * MiB)


def holed_map() -> MemoryMap:
    """16 MiB at 0 and 32 MiB at 64 MiB: a hole in gpa but not in page numbers, 12 blocks."""
    return MemoryMap([(0, 16 * MiB), (64 * MiB, 32 * MiB)])


def i64(values: list[int] | range) -> I64Array:
    return np.array(list(values), dtype=np.int64)


def u64(values: list[int]) -> U64Array:
    return np.array(values, dtype=np.uint64)


def words_of(pages: set[int], npages: int) -> list[int]:
    """The KVM dirty-log words for ``pages``, built bit by bit (bit i of word j = 64j + i)."""
    words = [0] * (-(-npages // 64))
    for p in pages:
        words[p // 64] |= 1 << (p % 64)
    return words


def dirty_pages(words: U64Array) -> I64Array:
    """The dirty page numbers of a KVM-layout log, ascending (little-endian host)."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).astype(np.int64)


def everything(guest: SimulatedGuest) -> U32Array:
    return guest.contents.get_range(0, guest.npages)


def block_contents(guest: SimulatedGuest, blocks: I64Array) -> U32Array:
    """Contents of ``blocks`` as one row per block."""
    return guest.contents.get(guest.block_pages(blocks)).reshape(len(blocks), -1)


def seq_of(content: U32Array) -> U32Array:
    """The write sequence numbers behind contents (the low bit is data vs zero)."""
    out: U32Array = content >> np.uint32(1)
    return out


def used_blocks(guest: SimulatedGuest) -> set[int]:
    return set(np.flatnonzero(guest.state == USED).tolist())


def hint_all_free_blocks(guest: SimulatedGuest) -> I64Array:
    """Puts every free block in the HINTED state the way the Linux driver does: a device
    starts a round and the driver hints until its allocation fails. Returns the hinted blocks,
    most recently hinted last."""
    device = FreePageHintDevice(guest.ram, guest.memmap)
    guest.driver.attach(device)  # an existing guest: not attached_guest
    free = guest.free_block_count
    assert device.start_hinting() is not None
    step = guest.driver.run()
    assert step.blocks_hinted == free
    assert not guest.driver.in_round  # the allocation failed: the round ended with STOP
    assert guest.free_block_count == 0
    return guest.hinted_blocks()


def statm_rss_bytes() -> int:
    resident = int(Path("/proc/self/statm").read_text().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE")


# -- 1. PageContents against a naive model -----------------------------------------------------

PAGES_PER_BLOCK = st.sampled_from([1, 2, 3, 4, 8])
U32 = st.integers(0, 0xFFFF_FFFF)


@st.composite
def layouts(draw: st.DrawFn, npages: int) -> tuple[I64Array, int]:
    """Block starts with random gaps (and pages before, between and after blocks)."""
    ppb = draw(PAGES_PER_BLOCK)
    starts: list[int] = []
    pos = draw(st.integers(0, 5))
    for gap in draw(st.lists(st.integers(0, 5), max_size=12)):
        if pos + ppb > npages:
            break
        starts.append(pos)
        pos += ppb + gap
    return i64(starts), ppb


@st.composite
def contents_setups(draw: st.DrawFn) -> tuple[int, tuple[I64Array, int], tuple[I64Array, int]]:
    npages = draw(st.integers(1, 48))
    return npages, draw(layouts(npages)), draw(layouts(npages))


def naive_block_of(block_pfn: I64Array, ppb: int, pfn: int) -> int:
    for i, start in enumerate(block_pfn.tolist()):
        if start <= pfn < start + ppb:
            return i
    return -1


class PageContentsMachine(RuleBasedStateMachine):
    """Three PageContents of the same pages, each mirrored by a plain array of every page:
    the first two with different block layouts, the third with the first's blocks (as a
    destination has its source guest's); copy_from moves runs of pages between them."""

    def __init__(self) -> None:
        super().__init__()
        self.pcs: list[PageContents] = []
        self.models: list[U32Array] = []

    @initialize(setup=contents_setups())
    def setup(self, setup: tuple[int, tuple[I64Array, int], tuple[I64Array, int]]) -> None:
        npages, *layouts_ = setup
        for block_pfn, ppb in layouts_:
            self.pcs.append(PageContents(npages, block_pfn, ppb))
        self.pcs.append(PageContents(npages, self.pcs[0].block_pfn, self.pcs[0].pages_per_block))
        self.models = [np.zeros(npages, dtype=np.uint32) for _ in self.pcs]
        self.npages = npages

    def runs(self, data: st.DataObject) -> PageRuns:
        """Runs of distinct pages in any order, some cut in two."""
        pages = np.unique(self.pages(data, unique=True))
        cuts = data.draw(st.lists(st.integers(0, max(0, len(pages) - 1)), max_size=3))
        pfns = [pages[a:b] for a, b in pairwise([0, *sorted(cuts), len(pages)])]
        order = data.draw(st.permutations(range(len(pfns))))
        ordered = [PageRuns.of_pfns(pfns[i]) for i in order]
        return PageRuns(
            np.concatenate([r.starts for r in ordered]), np.concatenate([r.counts for r in ordered])
        )

    def pages(self, data: st.DataObject, *, unique: bool) -> I64Array:
        return i64(
            data.draw(
                st.lists(st.integers(0, self.npages - 1), unique=unique, max_size=self.npages + 4)
            )
        )

    @rule(data=st.data(), which=st.integers(0, 2), value=U32)
    def write_blocks(self, data: st.DataObject, which: int, value: int) -> None:
        pc = self.pcs[which]
        if not len(pc.block_pfn):
            return
        blocks = i64(data.draw(st.lists(st.integers(0, len(pc.block_pfn) - 1), max_size=6)))
        pc.write_blocks(blocks, value)
        for b in blocks.tolist():
            start = int(pc.block_pfn[b])
            self.models[which][start : start + pc.pages_per_block] = value

    @rule(data=st.data(), which=st.integers(0, 2), value=U32)
    def write_pages_one_value(self, data: st.DataObject, which: int, value: int) -> None:
        pfns = self.pages(data, unique=False)  # repeats are harmless with one value
        self.pcs[which].write_pages(pfns, value)
        self.models[which][pfns] = value

    @rule(data=st.data(), which=st.integers(0, 2))
    def write_pages_per_page(self, data: st.DataObject, which: int) -> None:
        # Unique pages: numpy does not define which of repeated assignments wins.
        pfns = self.pages(data, unique=True)
        values = np.array(
            data.draw(st.lists(U32, min_size=len(pfns), max_size=len(pfns))), dtype=np.uint32
        )
        self.pcs[which].write_pages(pfns, values)
        for p, v in zip(pfns.tolist(), values.tolist(), strict=True):
            self.models[which][p] = v

    @rule(data=st.data(), which=st.integers(0, 2))
    def get(self, data: st.DataObject, which: int) -> None:
        pfns = self.pages(data, unique=False)
        got = self.pcs[which].get(pfns)
        assert got.dtype == np.uint32
        assert got.tolist() == [int(self.models[which][p]) for p in pfns.tolist()]

    @rule(data=st.data(), which=st.integers(0, 2))
    def get_range(self, data: st.DataObject, which: int) -> None:
        start = data.draw(st.integers(0, self.npages))
        n = data.draw(st.integers(0, self.npages - start))
        got = self.pcs[which].get_range(start, n)
        assert got.tolist() == self.models[which][start : start + n].tolist()

    @rule(data=st.data(), which=st.integers(0, 2))
    def read_runs(self, data: st.DataObject, which: int) -> None:
        runs = self.runs(data)
        got = self.pcs[which].read_runs(runs.starts, runs.counts)
        expect = self.models[which][runs.pfns()]
        assert got.page_values().tolist() == expect.tolist()
        assert got.zero_pages() == np.count_nonzero(is_zero(expect))

    @rule(data=st.data(), into=st.integers(0, 2), step=st.integers(1, 2))
    def copy_from(self, data: st.DataObject, into: int, step: int) -> None:
        other = (into + step) % 3
        runs = self.runs(data)
        self.pcs[into].copy_from(self.pcs[other], runs.starts, runs.counts)
        pfns = runs.pfns()
        self.models[into][pfns] = self.models[other][pfns]

    @invariant()
    def compared_per_block_or_per_page(self) -> None:
        # Same blocks: every page that differs is in a block that differs, or in a run of
        # pages compared one by one; and no page is in both.
        a, b = self.pcs[0], self.pcs[2]
        blocks, content = a.differing_blocks(b)
        assert content.tolist() == a.get(a.block_pfn[blocks]).tolist()
        in_blocks = set(a.block_pages(blocks).tolist())
        starts, counts = a.mixed_runs(b, longest=3)
        assert np.all((counts >= 1) & (counts <= 3))
        mixed = expand_runs(starts, counts).tolist()
        assert mixed == sorted(set(mixed)) and not in_blocks & set(mixed)
        differ = set(np.flatnonzero(self.models[0] != self.models[2]).tolist())
        assert in_blocks | (differ & set(mixed)) == differ

    @invariant()
    def equal_to_model(self) -> None:
        for pc, model in zip(self.pcs, self.models, strict=True):
            assert pc.get_range(0, self.npages).tolist() == model.tolist()

    @invariant()
    def block_of_is_naive(self) -> None:
        all_pages = np.arange(self.npages, dtype=np.int64)
        for pc in self.pcs:
            expect = [
                naive_block_of(pc.block_pfn, pc.pages_per_block, p) for p in range(self.npages)
            ]
            assert pc.block_of(all_pages).tolist() == expect


PageContentsMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPageContents = PageContentsMachine.TestCase


def test_block_of_gives_minus_one_outside_blocks() -> None:
    # Blocks [2, 6), [10, 14), [20, 24) of 30 pages.
    pc = PageContents(30, i64([2, 10, 20]), 4)
    expect = [-1] * 2 + [0] * 4 + [-1] * 4 + [1] * 4 + [-1] * 6 + [2] * 4 + [-1] * 6
    assert pc.block_of(np.arange(30, dtype=np.int64)).tolist() == expect
    assert pc.block_pages(i64([2, 0])).tolist() == [20, 21, 22, 23, 2, 3, 4, 5]
    # A block write covers exactly its pages; a page write outside blocks only itself.
    pc.write_blocks(i64([1]), 7)
    pc.write_pages(i64([0, 29]), 9)
    expect_contents = [9] + [0] * 9 + [7] * 4 + [0] * 15 + [9]
    assert pc.get_range(0, 30).tolist() == expect_contents


def test_page_contents_rejects_overlapping_or_descending_blocks() -> None:
    with pytest.raises(ValueError):
        PageContents(30, i64([0, 3]), 4)
    with pytest.raises(ValueError):
        PageContents(30, i64([8, 0]), 4)
    PageContents(30, i64([0, 4]), 4)  # adjacent is fine
    PageContents(30, i64([]), 4)  # so is no block at all


def test_versions() -> None:
    assert data_version(5) == 11 and zero_version(5) == 10
    assert data_version(0x8000_0000) == 1  # wraps in 32 bits, keeping the data bit
    assert is_zero(np.array([zero_version(3), data_version(3), 0], dtype=np.uint32)).tolist() == [
        True,
        False,
        True,
    ]


# -- 2. block layout ---------------------------------------------------------------------------


def naive_blocks(memmap: MemoryMap, block_bytes: int) -> list[int]:
    """Every block_bytes-aligned window wholly inside one region, in region (bitmap) order."""
    out = []
    for gpa, size in memmap.regions:
        g = gpa // block_bytes * block_bytes
        while g + block_bytes <= gpa + size:
            if g >= gpa:
                out.append(g)
            g += block_bytes
    return out


# Region lists: aligned, with a gpa hole, unaligned starts, out of gpa order, odd sizes.
LAYOUT_MAPS: dict[str, list[tuple[int, int]]] = {
    "x86": small_map().regions,
    "hole": holed_map().regions,
    "unaligned": [(0, 6 * MiB), (10 * MiB, 16 * MiB)],
    "unsorted": [(64 * MiB, 32 * MiB), (0, 16 * MiB)],
    "odd-sizes": [(1 * MiB, 13 * MiB), (40 * MiB + 4 * KiB, 9 * MiB)],
}


@pytest.mark.parametrize("name", sorted(LAYOUT_MAPS))
def test_blocks_are_aligned_and_inside_one_region(name: str) -> None:
    memmap = MemoryMap(LAYOUT_MAPS[name])
    guest = SimulatedGuest(memmap, ram=None)
    bb = guest.block_bytes
    assert guest.block_gpa.tolist() == naive_blocks(memmap, bb)
    assert guest.nblocks == len(guest.block_gpa)
    for b, gpa in enumerate(guest.block_gpa.tolist()):
        assert gpa % bb == 0
        assert any(r <= gpa and gpa + bb <= r + s for r, s in memmap.regions)
        assert int(guest.block_pfn[b]) == memmap.pfn_of(gpa)
        # Every page of the block is the next page number: no hole inside a block.
        pages = guest.block_pages(i64([b]))
        assert pages.tolist() == list(range(memmap.pfn_of(gpa), memmap.pfn_of(gpa) + bb // 4096))
        assert memmap.pfn_of(gpa + bb - 1) == pages[-1]


def test_unaligned_region_start_blocks() -> None:
    # [0, 6 MiB) holds one block; [10, 26 MiB) holds 12, 16 and 20 MiB (not 8: it starts at 10).
    memmap = MemoryMap([(0, 6 * MiB), (10 * MiB, 16 * MiB)])
    guest = SimulatedGuest(memmap)
    assert guest.block_gpa.tolist() == [0, 12 * MiB, 16 * MiB, 20 * MiB]
    # The second region's pages start at 6 MiB / 4 KiB = 1536.
    assert guest.block_pfn.tolist() == [0, 2048, 3072, 4096]


@pytest.mark.parametrize(
    ("page", "block_bytes", "ram"),
    [(4096, 4 * MiB, 64 * MiB), (16384, 32 * MiB, 256 * MiB), (65536, 512 * MiB, 2 * GiB)],
)
def test_block_size_follows_page_size(page: int, block_bytes: int, ram: int) -> None:
    assert HINT_BLOCK_BYTES[page] == block_bytes
    guest = SimulatedGuest(MemoryMap([(0, ram)], page_size=page), ram=None)
    assert guest.page_size == page
    assert guest.block_bytes == block_bytes
    assert guest.pages_per_block == block_bytes // page
    assert guest.nblocks == ram // block_bytes
    assert guest.block_gpa.tolist() == list(range(0, ram, block_bytes))
    assert guest.block_pfn.tolist() == list(range(0, ram // page, block_bytes // page))


@pytest.mark.parametrize("block_bytes", [64 * KiB, 1 * MiB, 8 * MiB])
def test_block_bytes_override(block_bytes: int) -> None:
    memmap = small_map()
    guest = SimulatedGuest(memmap, block_bytes=block_bytes)
    assert guest.block_bytes == block_bytes
    assert guest.pages_per_block == block_bytes // 4096
    assert guest.block_gpa.tolist() == naive_blocks(memmap, block_bytes)
    assert guest.nblocks == 64 * MiB // block_bytes
    assert guest.blocks_for(block_bytes + 1) == 2 and guest.blocks_for(block_bytes) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"used": -0.01},
        {"used": 1.01},
        {"used": float("nan")},
        {"block_bytes": 2048},  # smaller than a page
        {"block_bytes": 0},
        {"block_bytes": 3 * 4096},  # not a power of two
        {"block_bytes": 6 * MiB},
        {"block_bytes": 4 * MiB + 1},
        {"block_bytes": 64 * MiB},  # no 64 MiB window fits in a 32 MiB region: no block
        {"poison": -1},
        {"poison": 1 << 32},
        {"log_mode": "lazy"},
        {"used_data": -0.5},
        {"used_data": 1.5},
        {"free_order": "sorted"},
        {"ram": np.zeros(64 * MiB - 4096, dtype=np.uint8)},
        {"ram": np.zeros(16 * MiB, dtype=np.uint32)},
    ],
    ids=repr,
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SimulatedGuest(small_map(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "regions",
    [[(0, 4 * MiB)], [(0, 7 * MiB)], [(1 * MiB, 6 * MiB)], [(0, 6 * MiB), (10 * MiB, 5 * MiB)]],
    ids=repr,
)
def test_tiny_guest_is_refused(regions: list[tuple[int, int]]) -> None:
    # At most one whole naturally aligned 4 MiB block in each of these.
    with pytest.raises(ValueError, match="two hint blocks"):
        SimulatedGuest(MemoryMap(regions))


def test_used_fraction_takes_whole_blocks() -> None:
    full = SimulatedGuest(small_map(), used=1.0)
    assert full.free_block_count == 0 and np.all(full.state == USED)
    empty = SimulatedGuest(small_map(), used=0.0)  # the kernel still holds one block
    assert empty.free_block_count == 15 and int(np.count_nonzero(empty.state == USED)) == 1
    tenth = SimulatedGuest(small_map(), used=0.1)  # round(1.6) = 2
    assert tenth.free_block_count == 14
    assert len(tenth.kernel_pages()) == 2 * 1024
    # Boot wrote the kernel's blocks with data; the rest is zeros.
    kernel = tenth.kernel_pages()
    contents = everything(tenth)
    assert not np.any(is_zero(contents[kernel]))
    assert int(np.count_nonzero(~is_zero(contents))) == len(kernel)


def test_pages_at_an_index_are_those_of_the_whole_list() -> None:
    guest = SimulatedGuest(holed_map(), used=0.3, seed=5)
    assert guest.kernel_page_count == len(guest.kernel_pages())
    index = np.random.default_rng(1).integers(0, guest.kernel_page_count, 500)
    assert guest.kernel_pages(index).tolist() == guest.kernel_pages()[index].tolist()
    blocks = i64([7, 2, 11])
    index = i64([0, 1023, 1024, 2047, 2048, 3071, 5])
    assert guest.block_pages_at(blocks, index).tolist() == (
        guest.block_pages(blocks)[index].tolist()
    )


def test_used_data_writes_only_the_first_pages_of_the_boot_blocks() -> None:
    guest = SimulatedGuest(small_map(), used=2 / 16, used_data=0.25)
    kernel = guest.kernel_pages().reshape(2, 1024)
    contents = everything(guest)
    assert not is_zero(contents[kernel[:, :256]]).any()
    assert is_zero(contents[kernel[:, 256:]]).all()
    assert int(np.count_nonzero(~is_zero(contents))) == 2 * 256
    # None at all: the boot blocks are still in use, but all zero pages.
    bare = SimulatedGuest(small_map(), used=0.0, used_data=0.0)
    assert int(np.count_nonzero(bare.state == USED)) == 1
    assert is_zero(everything(bare)).all()


def test_address_order_hands_out_the_lowest_block_first() -> None:
    guest = SimulatedGuest(small_map(), used=1 / 16, free_order="address")
    # The boot block is the lowest (gpa 0), as the KVM test guest's kernel.
    assert guest.used_blocks().tolist() == [0]
    assert int(guest.block_gpa[guest.kernel_pages()[0] // 1024]) == 0
    assert guest.alloc_blocks(3).tolist() == [1, 2, 3]
    # Freed blocks go back on top (LIFO), then the lowest never-used one.
    guest.free_blocks(i64([3, 2]))
    assert guest.alloc_blocks(3).tolist() == [2, 3, 4]
    # Address order needs no random draws: the rng is the seed's, untouched.
    assert guest.rng.integers(0, 1 << 30) == np.random.default_rng(0).integers(0, 1 << 30)


def test_used_blocks_leave_out_hints_free_blocks_and_optionally_the_kernel() -> None:
    guest = SimulatedGuest(small_map(), used=1 / 16, free_order="address")
    a = guest.alloc_blocks(4)
    guest.free_blocks(a[2:])
    assert guest.used_blocks().tolist() == [0, 1, 2]
    assert guest.used_blocks(kernel=False).tolist() == [1, 2]
    hint_all_free_blocks(guest)
    assert guest.used_blocks(kernel=False).tolist() == [1, 2]


def test_write_free_writes_then_frees_the_last_allocated_first() -> None:
    guest = SimulatedGuest(small_map(), used=1 / 16, free_order="address")
    guest.log.get()
    wf = WriteFree(write_bytes=6 * 4 * MiB, free_bytes=4 * 4 * MiB)
    guest.run(wf, 0.0)
    assert wf.done
    # Blocks 1..6 written (every page, data), 3..6 freed again with their data.
    assert guest.used_blocks(kernel=False).tolist() == [1, 2]
    written = guest.block_pages(i64(range(1, 7)))
    assert dirty_pages(guest.log.get()).tolist() == written.tolist()
    assert not is_zero(everything(guest)[written]).any()
    # LIFO: 6 was freed first and 3 last, so 3 is handed out first, then 4, 5, 6, then 7.
    assert guest.alloc_blocks(5).tolist() == [3, 4, 5, 6, 7]
    # It acts once.
    guest.log.get()  # (init_on_alloc zeroed what alloc_blocks handed out)
    guest.run(wf, 1.0)
    assert guest.log.count() == 0


@pytest.mark.parametrize("write, free", [(-1, 0), (4 * MiB, -1), (4 * MiB, 8 * MiB)])
def test_write_free_refuses_impossible_sizes(write: int, free: int) -> None:
    with pytest.raises(ValueError):
        WriteFree(write, free)


def test_used_writer_writes_random_pages_of_used_blocks_and_its_bookkeeping() -> None:
    guest = SimulatedGuest(small_map(), used=1 / 16, free_order="address")
    guest.run(WriteFree(write_bytes=5 * 4 * MiB, free_bytes=2 * 4 * MiB))
    guest.log.get()
    writer = UsedWriter(pages_per_s=1000, kernel_pages=3)
    guest.workloads = [writer]
    used = guest.block_pages(i64([1, 2, 3]))
    rng = copy.deepcopy(guest.rng)  # replays the writer's draws
    for n in (250, 250):
        guest.advance(0.25)
        blocks = i64([1, 2, 3])[rng.integers(0, 3, n)]
        expect = set((guest.block_pfn[blocks] + rng.integers(0, 1024, n)).tolist())
        dirty = set(dirty_pages(guest.log.get()).tolist())
        assert dirty - expect == {0, 1, 2}  # the first pages of the kernel's block
        assert expect <= dirty and expect <= set(used.tolist())
    # Nothing in use outside the kernel: only the bookkeeping.
    empty = SimulatedGuest(small_map(), used=1 / 16)
    empty.workloads = [UsedWriter(pages_per_s=100, kernel_pages=2)]
    empty.log.get()
    empty.advance(1.0)
    assert dirty_pages(empty.log.get()).tolist() == empty.kernel_pages()[:2].tolist()
    with pytest.raises(ValueError):
        UsedWriter(pages_per_s=-1)


# -- 3. determinism ----------------------------------------------------------------------------


def run_mixed(seed: int) -> SimulatedGuest:
    guest = SimulatedGuest(
        MemoryMap.x86(128 * MiB, below_4g=64 * MiB), seed=seed, poison=0, log_mode="manual"
    )
    guest.workloads = [
        Idle(pages_per_s=300),
        SteadyWriter(working_set_bytes=8 * MiB, pages_per_s=500),
        KernelCompile(alloc_bytes_per_s=8 * MiB, lifetime_s=1.0, cache_bytes_per_s=2 * MiB),
        MemoryHog(24 * MiB, bytes_per_s=16 * MiB),
    ]
    for _ in range(8):
        guest.advance(0.25)
    extra = guest.alloc_blocks(3)
    guest.write_pages(guest.block_pages(extra)[::7])
    guest.free_blocks(extra[:2])
    return guest


def test_same_seed_same_guest_different_seed_differs() -> None:
    a, b, c = run_mixed(7), run_mixed(7), run_mixed(8)
    assert np.array_equal(everything(a), everything(b))
    assert np.array_equal(a.state, b.state)
    assert np.array_equal(a.log.get(), b.log.get())
    assert a.free_block_count == b.free_block_count
    assert a.now == b.now == 2.0
    # Something was actually written besides the boot blocks.
    assert int(np.count_nonzero(~is_zero(everything(a)))) > len(a.kernel_pages())
    assert not np.array_equal(everything(a), everything(c))
    assert not np.array_equal(a.log.get(), c.log.get())


# -- 4. the allocator --------------------------------------------------------------------------


def test_alloc_takes_distinct_free_blocks_and_free_gives_them_back() -> None:
    guest = SimulatedGuest(small_map())
    free_before = set(np.flatnonzero(guest.state == FREE).tolist())
    assert len(free_before) == guest.free_block_count == 14
    got = guest.alloc_blocks(5)
    assert got.dtype == np.int64 and len(got) == 5
    assert len(set(got.tolist())) == 5
    assert set(got.tolist()) <= free_before
    assert np.all(guest.state[got] == USED)
    assert guest.free_block_count == 9
    assert set(np.flatnonzero(guest.state == FREE).tolist()) == free_before - set(got.tolist())
    more = guest.alloc_blocks(9)
    assert set(more.tolist()) == free_before - set(got.tolist())
    assert guest.free_block_count == 0
    guest.free_blocks(got)
    assert guest.free_block_count == 5
    assert np.all(guest.state[got] == FREE)
    assert len(guest.alloc_blocks(0)) == 0
    with pytest.raises(ValueError):
        guest.alloc_blocks(-1)


def test_allocation_is_lifo() -> None:
    guest = SimulatedGuest(small_map())
    a = guest.alloc_blocks(6)
    guest.free_blocks(a[:3])
    guest.free_blocks(a[3:])
    # Most recently freed first: a[5], a[4], a[3], then a[2], ...
    assert guest.alloc_blocks(1).tolist() == [int(a[5])]
    assert guest.alloc_blocks(4).tolist() == [int(a[4]), int(a[3]), int(a[2]), int(a[1])]
    guest.free_blocks(i64([int(a[2])]))
    assert guest.alloc_blocks(2).tolist() == [int(a[2]), int(a[0])]


def test_alloc_beyond_free_shrinks_hinted_blocks_first() -> None:
    guest = SimulatedGuest(small_map())
    held = guest.alloc_blocks(4)
    hinted = hint_all_free_blocks(guest)
    assert len(hinted) == 10 and guest.hinted_block_count == 10
    assert np.all(guest.state[hinted] == HINTED)

    # No free block: the shrinker gives back the most recently hinted ones.
    got = guest.alloc_blocks(3)
    assert sorted(got.tolist()) == sorted(hinted[-3:].tolist())
    assert np.all(guest.state[got] == USED)
    assert guest.hinted_blocks().tolist() == hinted[:7].tolist()
    assert guest.free_block_count == 0

    # Without reclaim nothing is taken from the balloon.
    assert len(guest.alloc_blocks(2, reclaim=False)) == 0
    assert guest.hinted_block_count == 7

    # One free block: only the shortfall (2) is shrunk.
    guest.free_blocks(held[:1])
    got = guest.alloc_blocks(3)
    assert sorted(got.tolist()) == sorted([int(held[0]), *hinted[5:7].tolist()])
    assert guest.hinted_blocks().tolist() == hinted[:5].tolist()

    # Asking for more than everything: all hinted blocks, and no more.
    got = guest.alloc_blocks(100)
    assert sorted(got.tolist()) == sorted(hinted[:5].tolist())
    assert guest.hinted_block_count == 0 and guest.free_block_count == 0
    assert len(guest.alloc_blocks(1)) == 0
    assert int(np.count_nonzero(guest.state == USED)) == guest.nblocks


def test_shrink_returns_at_most_the_hinted_blocks() -> None:
    guest = SimulatedGuest(small_map(), poison=0)
    hinted = hint_all_free_blocks(guest)
    guest.log.get()
    assert guest.shrink(4) == 4
    assert guest.free_block_count == 4
    assert np.all(guest.state[hinted[-4:]] == FREE)
    # The shrinker frees through the allocator, so poisoning zero-writes those blocks.
    assert dirty_pages(guest.log.get()).tolist() == sorted(guest.block_pages(hinted[-4:]).tolist())
    assert guest.shrink(100) == len(hinted) - 4
    assert guest.shrink(1) == 0
    assert guest.hinted_block_count == 0 and guest.free_block_count == len(hinted)


def test_freeing_a_free_block_raises() -> None:
    guest = SimulatedGuest(small_map())
    got = guest.alloc_blocks(3)
    guest.free_blocks(got[:1])
    with pytest.raises(ValueError):
        guest.free_blocks(got[:1])
    with pytest.raises(ValueError):
        guest.free_blocks(got)  # got[0] is free: nothing of it may be freed
    assert guest.free_block_count == 12
    assert guest.state[got].tolist() == [FREE, USED, USED]
    # The same block twice in one call is a double free too.
    with pytest.raises(ValueError):
        guest.free_blocks(i64([int(got[1]), int(got[1])]))
    assert guest.free_block_count == 12
    assert guest.state[got].tolist() == [FREE, USED, USED]
    # The allocator is intact: every block is handed out once.
    rest = guest.alloc_blocks(100)
    assert len(rest) == 12 and len(set(rest.tolist())) == 12


def test_freeing_a_hinted_block_raises() -> None:
    # The driver still lists it: freeing it would let a later shrink free it a second time,
    # under whoever allocated it meanwhile.
    guest = SimulatedGuest(small_map())
    hinted = hint_all_free_blocks(guest)
    with pytest.raises(ValueError):
        guest.free_blocks(hinted[:1])
    assert guest.free_block_count == 0 and guest.hinted_block_count == len(hinted)
    assert np.all(guest.state[hinted] == HINTED)
    assert guest.shrink(len(hinted)) == len(hinted)
    assert np.all(guest.state[hinted] == FREE)
    got = guest.alloc_blocks(100)
    assert sorted(got.tolist()) == sorted(hinted.tolist())


@pytest.mark.parametrize("init_on_alloc", [True, False])
def test_init_on_alloc(init_on_alloc: bool) -> None:
    guest = SimulatedGuest(small_map(), init_on_alloc=init_on_alloc)
    first = guest.alloc_blocks(3)
    guest.write_blocks(first)
    guest.free_blocks(first)
    guest.log.get()
    before = everything(guest)
    again = guest.alloc_blocks(3)
    assert sorted(again.tolist()) == sorted(first.tolist())  # LIFO: the same blocks
    after = everything(guest)
    pages = guest.block_pages(again)
    log = dirty_pages(guest.log.get())
    if not init_on_alloc:
        assert np.array_equal(after, before)
        assert len(log) == 0
        return
    # One zeroing write, newer than the data before it, of exactly those blocks.
    assert len(np.unique(after[pages])) == 1
    assert bool(is_zero(after[pages]).all())
    assert int(seq_of(after[pages])[0]) > int(seq_of(before[pages]).max())
    assert not np.any(is_zero(before[pages]))
    outside = np.ones(guest.npages, dtype=bool)
    outside[pages] = False
    assert np.array_equal(after[outside], before[outside])
    assert log.tolist() == sorted(pages.tolist())


@pytest.mark.parametrize("poison", [None, 0, PAGE_POISON])
def test_poison_on_free(poison: int | None) -> None:
    guest = SimulatedGuest(small_map(), poison=poison)
    blocks = guest.alloc_blocks(3)
    guest.write_blocks(blocks)
    guest.log.get()
    before = everything(guest)
    guest.free_blocks(blocks)
    after = everything(guest)
    pages = guest.block_pages(blocks)
    log = dirty_pages(guest.log.get())
    if poison is None:
        assert np.array_equal(after, before)
        assert len(log) == 0
        return
    assert len(np.unique(after[pages])) == 1
    assert bool(is_zero(after[pages]).all()) == (poison == 0)
    assert int(seq_of(after[pages])[0]) > int(seq_of(before[pages]).max())
    outside = np.ones(guest.npages, dtype=bool)
    outside[pages] = False
    assert np.array_equal(after[outside], before[outside])
    assert log.tolist() == sorted(pages.tolist())


# -- 5. the dirty log --------------------------------------------------------------------------


def test_classic_get_returns_kvm_words_and_clears() -> None:
    log = DirtyLog(200)  # not a multiple of 64: the last word is partial
    assert log.mode == "classic"
    log.record(u64([0, 63, 64, 130, 199]), u64([1, 3, 1, 5, 1]))  # 64 twice
    expect = {0, 63, 64, 65, 130, 131, 132, 133, 134, 199}
    assert log.count() == len(expect)
    words = log.get()
    assert words.dtype == np.uint64 and words.shape == (4,)
    assert [int(w) for w in words] == words_of(expect, 200)
    assert log.count() == 0
    assert [int(w) for w in log.get()] == [0, 0, 0, 0]
    # Writes after get() are in the next get(), and only those.
    log.record(u64([5, 64]), u64([1, 1]))
    assert [int(w) for w in log.get()] == words_of({5, 64}, 200)
    with pytest.raises(ValueError, match="manual"):
        log.clear(0, 64)


def test_manual_get_does_not_clear_and_clear_needs_alignment() -> None:
    log = DirtyLog(200, "manual")
    log.record(u64([0, 70, 150, 198]), u64([3, 1, 10, 2]))
    expect = {0, 1, 2, 70, *range(150, 160), 198, 199}
    first = log.get()
    assert [int(w) for w in first] == words_of(expect, 200)
    assert np.array_equal(log.get(), first)  # still there
    for bad in [(1, 64), (32, 64), (0, 63), (0, 100), (64, 65), (192, 7), (128, 71), (200, 0)]:
        with pytest.raises(ValueError, match="aligned"):
            log.clear(*bad)
    # Past the end is refused (KVM: EINVAL) and clears nothing.
    with pytest.raises((ValueError, IndexError)):
        log.clear(192, 64)
    assert log.count() == len(expect)
    assert log.clear(64, 64) == 1  # page 70
    assert log.clear(192, 8) == 2  # the partial last chunk, reaching npages
    assert [int(w) for w in log.get()] == words_of({0, 1, 2, *range(150, 160)}, 200)
    assert log.clear(128, 72) == 10  # a partial length is fine when it reaches the end
    assert log.clear(0, 200) == 3
    assert log.count() == 0


def test_bad_log_mode() -> None:
    with pytest.raises(ValueError):
        DirtyLog(64, "pml")  # type: ignore[arg-type]


def test_ring_mode_reports_as_classic_does_and_has_nothing_to_clear() -> None:
    ring, classic = DirtyLog(128, "ring"), DirtyLog(128, "classic")
    for log in (ring, classic):
        log.record(u64([3, 70]), u64([2, 1]))
    assert ring.get().tolist() == classic.get().tolist() == words_of({3, 4, 70}, 128)
    assert ring.count() == 0  # harvesting resets the ring: the next write is logged again
    with pytest.raises(ValueError, match="manual"):
        ring.clear(0, 64)


def test_manual_clear_after_rewrite_loses_the_write() -> None:
    # DESIGN §5: a page reported dirty, written again after the get(), then cleared for its
    # chunk (as QEMU does when applying a hint) is not reported by the next get().
    guest = SimulatedGuest(small_map(), log_mode="manual")
    block = guest.alloc_blocks(1)
    pfn = int(guest.block_pfn[block[0]]) + 5
    chunk = pfn // 64 * 64
    guest.log.get()  # KVM clears only what a get reported: report, then re-protect all
    guest.log.clear(0, guest.npages)
    guest.write_pages(i64([pfn]))
    assert pfn in dirty_pages(guest.log.get()).tolist()  # the sync
    guest.write_pages(i64([pfn]))  # the guest reuses the page
    assert guest.log.clear(chunk, 64) == 1
    assert pfn not in dirty_pages(guest.log.get()).tolist()  # lost
    assert guest.log.count() == 0


def test_manual_clear_before_rewrite_keeps_the_write() -> None:
    # The safe order: re-protect right after the sync, before the guest writes again.
    guest = SimulatedGuest(small_map(), log_mode="manual")
    block = guest.alloc_blocks(1)
    pfn = int(guest.block_pfn[block[0]]) + 5
    chunk = pfn // 64 * 64
    guest.log.get()  # KVM clears only what a get reported: report, then re-protect all
    guest.log.clear(0, guest.npages)
    guest.write_pages(i64([pfn]))
    assert pfn in dirty_pages(guest.log.get()).tolist()
    assert guest.log.clear(chunk, 64) == 1
    guest.write_pages(i64([pfn]))
    assert dirty_pages(guest.log.get()).tolist() == [pfn]


def test_classic_rewrite_after_get_is_reported() -> None:
    guest = SimulatedGuest(small_map())
    pfn = int(guest.block_pfn[guest.alloc_blocks(1)[0]]) + 5
    guest.log.get()
    guest.write_pages(i64([pfn]))
    assert dirty_pages(guest.log.get()).tolist() == [pfn]
    guest.write_pages(i64([pfn]))
    assert dirty_pages(guest.log.get()).tolist() == [pfn]


@pytest.mark.parametrize("mode", ["classic", "manual"])
def test_log_merges_into_a_bitmap(mode: str) -> None:
    guest = SimulatedGuest(holed_map(), log_mode=mode)  # type: ignore[arg-type]
    guest.run(MemoryHog(8 * MiB))
    guest.write_pages(i64([3, 4, 4000, guest.npages - 1]))
    n = guest.log.count()
    bitmap = DirtyBitmap(guest.npages)
    assert bitmap.merge_log(guest.log.get()) == n
    assert bitmap.count() == n
    assert bitmap.test(guest.npages - 1) and bitmap.test(4000)


# -- 6. workloads ------------------------------------------------------------------------------


def test_memory_hog_at_once() -> None:
    guest = SimulatedGuest(small_map())
    free = guest.free_block_count
    guest.log.get()
    before = everything(guest)
    hog = MemoryHog(10 * MiB)  # 3 blocks
    guest.run(hog)
    assert hog.done
    assert guest.free_block_count == free
    after = everything(guest)
    changed = np.flatnonzero(after != before)
    # Exactly three whole blocks changed, to one data write, and they are free again.
    blocks = np.unique(guest.contents.block_of(changed))
    assert len(blocks) == 3 and int(blocks.min()) >= 0
    assert changed.tolist() == sorted(guest.block_pages(blocks).tolist())
    assert not np.any(is_zero(after[changed]))
    assert len(np.unique(after[changed])) == 1
    assert np.all(guest.state[blocks] == FREE)
    assert dirty_pages(guest.log.get()).tolist() == changed.tolist()
    # A done hog does nothing more.
    guest.run(hog, 1.0)
    assert guest.log.count() == 0


def test_memory_hog_at_a_rate() -> None:
    guest = SimulatedGuest(small_map())
    free = guest.free_block_count
    hog = MemoryHog(32 * MiB, bytes_per_s=8 * MiB)  # 8 blocks, 2 a second
    guest.workloads = [hog]
    for step in range(1, 4):
        guest.advance(1.0)
        assert not hog.done
        assert guest.free_block_count == free - 2 * step
    guest.advance(1.0)
    assert hog.done
    assert guest.free_block_count == free
    # Quarter seconds: half a block a step, so 16 steps.
    slow = MemoryHog(32 * MiB, bytes_per_s=8 * MiB)
    guest.workloads = [slow]
    for step in range(1, 16):
        guest.advance(0.25)
        assert not slow.done
        assert guest.free_block_count == free - step // 2
    guest.advance(0.25)
    assert slow.done and guest.free_block_count == free


def test_memory_hog_out_of_memory_gives_up_and_frees() -> None:
    guest = SimulatedGuest(small_map())
    free = guest.free_block_count
    guest.log.get()
    hog = MemoryHog(1 * GiB)
    guest.run(hog)
    assert hog.done and guest.free_block_count == free
    # It got every free block and wrote them all.
    assert guest.log.count() == free * guest.pages_per_block


def test_steady_writer_writes_its_rate_inside_its_working_set() -> None:
    guest = SimulatedGuest(small_map())
    # LIFO: freeing [b, a] makes the writer's working set exactly [a, b], in that order.
    ws_blocks = guest.alloc_blocks(2)
    guest.free_blocks(ws_blocks[::-1])
    ws = guest.block_pages(ws_blocks)
    guest.log.get()
    writer = SteadyWriter(working_set_bytes=8 * MiB, pages_per_s=250)
    guest.workloads = [writer]
    guest.advance(0.0)  # allocates and fills the working set, writes nothing else
    assert np.all(guest.state[ws_blocks] == USED)
    assert dirty_pages(guest.log.get()).tolist() == sorted(ws.tolist())
    rng = copy.deepcopy(guest.rng)  # replays the writer's draws
    total = 0
    for n in (62, 63, 62, 63):  # 62.5 pages a step: the fraction carries
        guest.advance(0.25)
        expect = ws[rng.integers(0, len(ws), n)]
        total += n
        assert dirty_pages(guest.log.get()).tolist() == sorted(set(expect.tolist()))
        contents = everything(guest)
        assert len(np.unique(contents[expect])) == 1 and not is_zero(contents[expect]).any()
    assert total == 250


def test_kernel_compile_frees_after_lifetime_and_grows_the_cache() -> None:
    guest = SimulatedGuest(MemoryMap.x86(256 * MiB, below_4g=128 * MiB), used=0.0)
    boot = used_blocks(guest)
    # One block a second each for compilers (living 1.5 s) and the page cache, in half
    # seconds: both allocate at even steps, a compiler block is freed three steps later.
    cc = KernelCompile(alloc_bytes_per_s=4 * MiB, lifetime_s=1.5, cache_bytes_per_s=4 * MiB)
    guest.workloads = [cc]
    born: dict[int, set[int]] = {}
    for k in range(1, 13):
        prev = used_blocks(guest)
        guest.advance(0.5)
        now = used_blocks(guest)
        born[k] = now - prev
        # Compiler blocks from step 2j live until step 2j + 3; cache blocks stay.
        allocs = k // 2
        freed = sum(1 for j in range(1, allocs + 1) if 2 * j + 3 <= k)
        assert len(now) == len(boot) + (allocs - freed) + k // 2, k
        assert guest.free_block_count == guest.nblocks - len(now)
        if k % 2:
            assert not born[k]
            # Odd steps allocate nothing, so what left is exactly what expired.
            gone = prev - now
            assert len(gone) == (1 if k >= 5 else 0), k
            if k == 5:
                assert gone < born[2]  # the compiler block of step 2, not its cache block
        else:
            # A compiler and a cache block (possibly one freed at the step before).
            assert len(born[k]) == 2, k


def test_kernel_compile_frees_exactly_at_the_lifetime() -> None:
    guest = SimulatedGuest(MemoryMap.x86(256 * MiB, below_4g=128 * MiB), used=0.0)
    cc = KernelCompile(alloc_bytes_per_s=4 * MiB, lifetime_s=1.5, cache_bytes_per_s=0)
    guest.workloads = [cc]
    guest.advance(0.5)
    assert len(used_blocks(guest)) == 1  # boot only
    before = used_blocks(guest)
    guest.advance(0.5)  # t = 1.0: one compiler block, to be freed at t = 2.5
    (block,) = used_blocks(guest) - before
    guest.advance(0.5)
    guest.advance(0.5)  # t = 2.0: another allocation, this one still alive
    assert guest.state[block] == USED
    guest.advance(0.5)  # t = 2.5
    assert guest.state[block] == FREE
    assert len(used_blocks(guest)) == 2  # boot and the t = 2.0 block


def test_idle_writes_only_kernel_pages() -> None:
    guest = SimulatedGuest(small_map(), used=0.25)
    kernel = guest.kernel_pages()
    assert len(kernel) == 4 * 1024
    guest.workloads = [Idle(pages_per_s=800)]
    guest.log.get()
    rng = copy.deepcopy(guest.rng)
    for _ in range(4):
        before = everything(guest)
        guest.advance(0.125)  # 100 pages
        expect = set(kernel[rng.integers(0, len(kernel), 100)].tolist())
        assert dirty_pages(guest.log.get()).tolist() == sorted(expect)
        assert np.flatnonzero(everything(guest) != before).tolist() == sorted(expect)
    # Nothing at all when idle means idle.
    guest.workloads = [Idle()]
    guest.advance(10.0)
    assert guest.log.count() == 0


def test_advance_refuses_negative_time() -> None:
    guest = SimulatedGuest(small_map())
    with pytest.raises(ValueError):
        guest.advance(-0.5)
    guest.advance(1.5)
    guest.run(Idle(), 0.5)
    assert guest.now == 2.0


# -- 7. scale ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_tib_guest_is_cheap() -> None:
    if not Path("/proc/self/statm").exists():
        pytest.skip("no /proc/self/statm: cannot read the resident set size")
    gc.collect()
    before = statm_rss_bytes()
    try:
        guest = SimulatedGuest(MemoryMap.x86(4 * TiB), ram=None)
    except (MemoryError, OSError) as e:
        pytest.skip(f"the OS refused 4 TiB of address space (strict overcommit?): {e}")
    nblocks = (4 * TiB) // (4 * MiB)
    assert guest.npages == 1 << 30
    assert guest.nblocks == nblocks
    boot = round(0.1 * nblocks)
    assert guest.free_block_count == nblocks - boot
    hog = MemoryHog(64 * GiB)
    guest.run(hog)
    assert hog.done
    assert guest.free_block_count == nblocks - boot
    assert int(np.count_nonzero(guest.state == FREE)) == nblocks - boot
    # Boot and the hog's 16384 blocks, each written whole, and each dirty in the log.
    assert guest.log.count() == (boot + 16384) * 1024
    # Whole-block writes read back: the kernel's and the hog's blocks hold data, the rest
    # is still zero.
    first_pages = guest.contents.get(guest.block_pfn)
    data = ~is_zero(first_pages)
    assert int(np.count_nonzero(data)) == boot + 16384
    assert bool(np.all(data[guest.state == USED]))
    grown = statm_rss_bytes() - before
    assert grown < 512 * MiB, f"a 4 TiB guest grew RSS by {grown // MiB} MiB"
