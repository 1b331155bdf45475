"""Guest-sized bitmaps: a 2**36-page (256 TiB guest, 8 GiB of words) bitmap costs no memory
until touched and works at its far end; a bitmap larger than the machine's memory can be
created and used sparsely, committing only what is written, while writing all of it at once is
refused; a 2**28-page (1 TiB guest) dirty bitmap is cleared exactly by one batch of every 4 MiB
block in random order."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from pagehint import DirtyBitmap

STATUS = Path("/proc/self/status")
MEMINFO = Path("/proc/meminfo")
OVERCOMMIT = Path("/proc/sys/vm/overcommit_memory")
MiB = 1 << 20
GiB = 1 << 30


def rss_bytes() -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


@pytest.fixture
def rss() -> None:
    if not STATUS.exists():
        pytest.skip("/proc/self/status is not available: cannot read the resident set size")
    try:
        rss_bytes()
    except (OSError, AssertionError) as e:
        pytest.skip(f"cannot read VmRSS from /proc/self/status: {e}")


@pytest.mark.slow
@pytest.mark.usefixtures("rss")
def test_huge_bitmap_is_lazy_and_works_at_the_far_end() -> None:
    end = 2**36
    gc.collect()
    before = rss_bytes()
    try:
        bm = DirtyBitmap(end)
    except MemoryError as e:
        pytest.skip(f"the OS refused 8 GiB of address space (strict overcommit?): {e}")
    created = rss_bytes()
    assert bm.npages == len(bm) == end
    assert bm.nbytes == 8 * 2**30
    assert created - before < 64 * MiB, f"creating it grew RSS by {(created - before) // MiB} MiB"

    # Ranges at the far end.
    assert bm.set_range(end - 100, 100) == 100
    assert bm.set_range(end - 100, 100) == 0
    assert bm.test(end - 1) is True
    assert bm.test(end - 101) is False
    assert bm.count(end - 1000, 1000) == 100
    assert bm.count(end - 10**6) == 100
    assert bm.next_dirty(end - 10**6) == end - 100
    assert bm.next_dirty(end - 99) == end - 99
    assert bm.next_dirty(end) is None
    assert bm.set_range(end - 5000, 3) == 3
    starts, lens = bm.dirty_runs(end - 10**6)
    assert starts.tolist() == [end - 5000, end - 100]
    assert lens.tolist() == [3, 100]
    starts, lens = bm.dirty_runs(end - 4999, 4950)
    assert starts.tolist() == [end - 4999, end - 100]
    assert lens.tolist() == [2, 51]
    assert bm.clear_range(end - 50, 50) == 50
    assert bm.count(end - 10**6) == 53
    assert bm.test_and_clear(end - 51) is True
    taken = bm.take_dirty(10, end - 10**6)
    assert taken.tolist() == [end - 5000, end - 4999, end - 4998, *list(range(end - 100, end - 93))]
    assert bm.count(end - 10**6) == 52 - 10
    # A KVM log for the last 1024 pages, all dirty.
    log = np.full(16, 2**64 - 1, dtype=np.uint64)
    assert bm.merge_log(log, end - 1024) == 1024 - 42
    assert bm.count(end - 10**6) == 1024
    assert bm.count(end - 1024, 1024) == 1024
    # A log longer than the rest of the bitmap is fine while its extra bits are zero.
    assert bm.merge_log(np.concatenate([log, np.zeros(4, np.uint64)]), end - 1024) == 0
    with pytest.raises(IndexError):
        bm.merge_log(np.concatenate([log, np.ones(1, np.uint64)]), end - 1024)
    starts_arr = np.array([end - 1024, end - 512, end - 1], dtype=np.uint64)
    counts_arr = np.array([256, 512, 1], dtype=np.uint64)
    assert bm.clear_ranges(starts_arr, counts_arr) == 256 + 512
    assert bm.count(end - 2048) == 1024 - 768
    # The first page still works too, and the view reaches the last word.
    assert bm.set_range(0, 1) == 1
    w = bm.words()
    assert w.size == 2**30
    assert int(w[0]) == 1
    assert int(w[-1]) == 0
    assert int(w[-9]) == 2**64 - 1
    assert bm.take_dirty(1).tolist() == [0]
    after = rss_bytes()
    assert after - before < 64 * MiB, f"RSS grew by {(after - before) // MiB} MiB"
    del w, bm
    gc.collect()


def machine_memory() -> int:
    """RAM plus swap in bytes, as /proc/meminfo counts them (what the bitmap compares with)."""
    fields = {}
    for line in MEMINFO.read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = rest.split()
    total = 0
    for name in ("MemTotal", "SwapTotal"):
        value, unit = fields[name]
        assert unit == "kB", name
        total += int(value) * 1024
    return total


@pytest.fixture
def bigger_than_ram() -> int:
    """Pages of the smallest power-of-two bitmap whose words exceed the machine's RAM + swap
    (2**38 pages, 32 GiB of words, on a 24 GiB machine without swap)."""
    if not MEMINFO.exists():
        pytest.skip("/proc/meminfo is not available: the machine's memory is unknown")
    if OVERCOMMIT.exists() and OVERCOMMIT.read_text().strip() == "2":
        pytest.skip("strict overcommit (vm.overcommit_memory=2) charges every reservation")
    npages = 1 << 20
    while npages // 8 <= machine_memory():
        npages <<= 1
    assert npages <= 2**48, "more memory than a bitmap can describe"
    return npages


@pytest.mark.slow
@pytest.mark.usefixtures("rss")
def test_bitmap_larger_than_memory_commits_only_what_is_written(bigger_than_ram: int) -> None:
    npages = bigger_than_ram
    gc.collect()
    before = rss_bytes()
    bm = DirtyBitmap(npages)
    assert bm.nbytes == npages // 8 > machine_memory()
    created = rss_bytes()
    assert created - before < 16 * MiB, f"creating it grew RSS by {(created - before) // MiB} MiB"

    # Far-apart ranges: the first page, two straddling word and 2 MiB (huge page) boundaries,
    # one in the middle, the last pages.
    ranges = [(0, 1), (npages // 4 - 30, 100), (npages // 2 + 12345, 777), (npages - 70, 70)]
    for start, n in ranges:
        assert bm.set_range(start, n) == n
    assert bm.count() == sum(n for _, n in ranges)
    assert bm.count(npages // 4 - 64, 256) == 100
    assert bm.test(npages - 1) and not bm.test(npages - 71)
    assert bm.clear_range(npages // 2 + 12345, 700) == 700
    # Clearing and counting untouched stretches writes nothing.
    assert bm.clear_range(npages // 16, npages // 8) == 0
    assert bm.next_dirty(1) == npages // 4 - 30
    taken = bm.take_dirty(1000)
    assert taken.tolist() == [
        0,
        *range(npages // 4 - 30, npages // 4 + 70),
        *range(npages // 2 + 13045, npages // 2 + 13122),
        *range(npages - 70, npages),
    ]
    assert bm.count() == 0
    touched = rss_bytes()
    # Each range backs at most the 2 MiB huge page (two, when it straddles one) around it.
    limit = 2 * len(ranges) * 2 * MiB + 16 * MiB
    assert touched - before < limit, f"4 ranges grew RSS by {(touched - before) // MiB} MiB"

    # Writing every word at once cannot be backed: refused, naming the sizes, nothing changed.
    bm.set_range(npages - 1, 1)
    too_much = r"bytes \(\d+\.\d GiB\) of memory \(RAM \+ swap\)"
    with pytest.raises(MemoryError, match=too_much):
        bm.set_all()
    for start, n in [(0, npages), (1, npages - 1)]:
        with pytest.raises(MemoryError, match=too_much):
            bm.set_range(start, n)
        with pytest.raises(MemoryError, match=too_much):
            bm.set_ranges(np.array([5, start], np.uint64), np.array([1, n], np.uint64))
    assert bm.count() == 1
    with pytest.raises(MemoryError, match=f"writes {npages // 8} bytes"):
        DirtyBitmap(npages, dirty=True)
    assert rss_bytes() - before < limit
    del bm
    gc.collect()


@pytest.mark.slow
def test_one_tib_guest_cleared_by_shuffled_4mib_blocks() -> None:
    npages = 2**28
    bm = DirtyBitmap(npages, dirty=True)
    assert bm.count() == npages
    assert bm.nbytes == npages // 8
    starts = np.arange(0, npages, 1024, dtype=np.uint64)
    np.random.default_rng(2024).shuffle(starts)
    counts = np.full(starts.size, 1024, dtype=np.uint64)
    assert starts.size == 2**18
    assert bm.clear_ranges(starts, counts) == npages
    assert bm.count() == 0
    assert bm.next_dirty() is None
    assert not bm.words().any()
    assert bm.clear_ranges(starts, counts) == 0
    # Half the blocks dirty again, cleared with the others overlapping them.
    bm.set_all()
    assert bm.clear_ranges(starts[::2].copy(), counts[::2].copy()) == npages // 2
    assert bm.count() == npages // 2
    assert bm.clear_ranges(starts, counts) == npages // 2
    assert bm.count() == 0


@pytest.mark.parametrize("max_pages", [2**20 - 1, 2**20, 2**20 + 1, 3 * 2**20 + 5, 2**62])
def test_take_dirty_past_its_first_buffer(max_pages: int) -> None:
    """Above 2**20 pages, take_dirty fills a first buffer, then counts and sizes the rest: the
    seam loses, repeats and reorders nothing, and max_pages still holds across it."""
    npages = 5 * 2**20
    words = np.random.default_rng(7).integers(0, 2**64, npages // 64, dtype=np.uint64)
    bm = DirtyBitmap(npages)
    bm.merge_log(words)
    dirty = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))
    start = 12345
    want = dirty[dirty >= start][:max_pages].astype(np.uint64)
    got = bm.take_dirty(max_pages, start)
    assert got.dtype == np.uint64
    assert np.array_equal(got, want)
    assert bm.count() == dirty.size - want.size
    assert bm.count(start, int(want[-1]) + 1 - start) == 0
