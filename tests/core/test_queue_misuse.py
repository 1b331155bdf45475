"""A queue cannot be misused from Python: ``add_used`` takes back only heads (buffer ids) in
flight, as often as they are, and refuses a bad batch whole; guest RAM can neither be resized
nor freed while a queue reads it (bytearray, mmap, numpy arrays and views of them); negative
addresses, sizes and indices are ``ValueError`` naming the argument. Every refusal leaves the
rings and the queue's indices as they were."""

from __future__ import annotations

import gc
import mmap
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from helpers import DESC, DEVICE_EVENT, DRIVER_EVENT, PackedDriver
from pagehint import MemoryMap, PackedQueue, SplitQueue

U8Array = npt.NDArray[np.uint8]

MEMMAP = MemoryMap([(0, 1 << 20)])
SIZE = 8
S_DESC, S_AVAIL, S_USED = 0x1000, 0x2000, 0x3000
DATA = 0x10000
WRITE = 2


Ram = U8Array | bytearray | mmap.mmap


def put(mem: Ram, at: int, data: bytes) -> None:
    """Writes ``data`` at offset ``at`` of guest RAM."""
    if isinstance(mem, np.ndarray):
        mem[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)
    else:
        mem[at : at + len(data)] = data


def write_split_ring(mem: Ram, heads: list[int]) -> None:
    """The driver's side of a split ring at ``S_DESC``: ``heads`` made available, each a
    one-buffer element."""
    for h in range(SIZE):
        put(mem, S_DESC + 16 * h, struct.pack("<QIHH", DATA + 0x1000 * h, 0x1000, WRITE, 0))
    put(mem, S_AVAIL, struct.pack("<HH", 0, len(heads)))
    for i, h in enumerate(heads):
        put(mem, S_AVAIL + 4 + 2 * i, struct.pack("<H", h))


def split_ring(mem: Ram, heads: list[int]) -> SplitQueue:
    """A split queue whose driver made ``heads`` available."""
    write_split_ring(mem, heads)
    return SplitQueue(mem, MEMMAP, SIZE, S_DESC, S_AVAIL, S_USED)


def used_ring(mem: Ram) -> bytes:
    return bytes(mem[S_USED : S_USED + 4 + 8 * SIZE])


@pytest.mark.parametrize(
    ("heads", "match"),
    [
        ([3], "head 3 is not in flight"),
        ([2, 2], "head 2 is not in flight"),
        ([5, 2, 5], "head 5 is not in flight"),
        ([2, 5, 0], "head 0 is not in flight"),
        ([2, 8], "head index 8 is not below the queue size 8"),
    ],
)
def test_split_add_used_refuses_heads_not_in_flight(heads: list[int], match: str) -> None:
    mem = np.zeros(MEMMAP.ram_bytes, dtype=np.uint8)
    q = split_ring(mem, [2, 5])
    els = q.pop()
    assert els.heads.tolist() == [2, 5]
    before = used_ring(mem)
    with pytest.raises(ValueError, match=match):
        q.add_used(heads, [1] * len(heads))
    assert used_ring(mem) == before, "a refused batch wrote to the used ring"
    assert (q.last_avail, q.next_used, q.error) == (2, 0, None)
    # The same elements can still be returned, in any order, each once.
    q.add_used([5, 2], [7, 9])
    assert q.next_used == 2
    assert struct.unpack("<HH4I", used_ring(mem)[:20]) == (0, 2, 5, 7, 2, 9)
    with pytest.raises(ValueError, match="head 5 is not in flight"):
        q.add_used([5], [0])


def test_split_add_used_on_a_fresh_queue_and_after_set_indices() -> None:
    mem = bytearray(MEMMAP.ram_bytes)
    q = split_ring(mem, [])
    with pytest.raises(ValueError, match="head 0 is not in flight"):
        q.add_used([0], [0])
    q.add_used([], [])  # nothing to return is never an error
    # Restored with two elements in flight, taken before by a reader whose heads are unknown.
    q.set_indices(2, 0)
    with pytest.raises(ValueError, match="not in flight"):
        q.add_used([1, 6, 7], [0, 0, 0])
    assert q.next_used == 0
    q.add_used([6, 1], [0, 0])
    with pytest.raises(ValueError, match="head 1 is not in flight"):
        q.add_used([1], [0])
    assert q.next_used == 2


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([1], "buffer id 1 is not in flight"),
        ([0, 0], "buffer id 0 is not in flight"),
        ([2, 8], "buffer id 8 is not below the queue size 8"),
    ],
)
def test_packed_add_used_refuses_a_bad_batch_whole(ids: list[int], match: str) -> None:
    mem = np.zeros(MEMMAP.ram_bytes, dtype=np.uint8)
    q = PackedQueue(mem, MEMMAP, SIZE, DESC, DRIVER_EVENT, DEVICE_EVENT)
    drv = PackedDriver(mem, SIZE)
    drv.post(DATA, 0x1000, writable=True)  # id 0
    drv.post(DATA + 0x1000, 0x1000, writable=True)  # id 1
    drv.post(DATA + 0x2000, 0x1000, writable=True)  # id 2
    assert q.pop().heads.tolist() == [0, 1, 2]
    q.add_used([1], [0])
    ring = mem[DESC : DESC + 16 * SIZE].tobytes()
    with pytest.raises(ValueError, match=match):
        q.add_used(ids, [0] * len(ids))
    assert mem[DESC : DESC + 16 * SIZE].tobytes() == ring
    assert q.next_used == (1, True) and q.error is None
    q.add_used([2, 0], [0, 0])
    assert q.next_used == (3, True)


@pytest.mark.parametrize("cls", [SplitQueue, PackedQueue])
def test_add_used_needs_equal_lengths(cls: type[SplitQueue] | type[PackedQueue]) -> None:
    mem = bytearray(MEMMAP.ram_bytes)
    q = cls(mem, MEMMAP, SIZE, 0x1000, 0x2000, 0x3000)
    with pytest.raises(ValueError, match="differ in length"):
        q.add_used([0, 1], [0])


# -- guest RAM stays where the queue reads it ---------------------------------------------------

QueueClass = type[SplitQueue] | type[PackedQueue]
BOTH: list[QueueClass] = [SplitQueue, PackedQueue]


def make_queue(cls: QueueClass, mem: object) -> SplitQueue | PackedQueue:
    return cls(mem, MEMMAP, SIZE, 0x1000, 0x2000, 0x3000)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", BOTH)
def test_a_bytearray_cannot_be_resized_under_a_queue(cls: QueueClass) -> None:
    mem = bytearray(MEMMAP.ram_bytes)
    q = make_queue(cls, mem)
    for resize in (
        lambda: mem.extend(b"x"),
        lambda: mem.pop(),
        lambda: mem.clear(),
        lambda: mem.__delitem__(slice(0, 4096)),
        lambda: mem.__setitem__(slice(0, 1), b"ab"),
    ):
        with pytest.raises(BufferError):
            resize()
    assert len(mem) == MEMMAP.ram_bytes
    assert len(q.pop()) == 0
    del q
    gc.collect()
    mem.extend(b"x")  # the export ends with the queue


@pytest.mark.parametrize("cls", BOTH)
def test_an_mmap_cannot_be_closed_under_a_queue_and_is_kept_alive(cls: QueueClass) -> None:
    ram = mmap.mmap(-1, MEMMAP.ram_bytes)
    q = make_queue(cls, ram)
    with pytest.raises(BufferError):
        ram.close()
    with pytest.raises(BufferError):
        ram.resize(2 * MEMMAP.ram_bytes)
    assert not ram.closed
    del ram
    gc.collect()
    assert len(q.pop()) == 0  # still mapped: the queue holds it
    q.add_used([], [])


def test_a_queue_reads_an_mmap_it_alone_keeps() -> None:
    ram = mmap.mmap(-1, MEMMAP.ram_bytes)
    q = split_ring(ram, [4])
    del ram
    gc.collect()
    els = q.pop()
    assert els.heads.tolist() == [4] and els.buffers(0) == [(DATA + 0x4000, 0x1000, True)]


def own_array() -> U8Array:
    return np.zeros(MEMMAP.ram_bytes, dtype=np.uint8)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("refcheck", [True, False])
def test_a_numpy_array_cannot_be_resized_under_a_queue(cls: QueueClass, refcheck: bool) -> None:
    """numpy does not count buffer exports: ``resize(refcheck=False)`` would free the memory
    the queue reads (a segfault). The queue keeps a weak reference to the array, which numpy
    refuses to resize under."""
    mem = own_array()
    q = make_queue(cls, mem)
    with pytest.raises(ValueError, match="cannot resize"):
        mem.resize(2 * MEMMAP.ram_bytes, refcheck=refcheck)
    assert mem.size == MEMMAP.ram_bytes
    mem[0x1000:0x1010] = 1  # still the queue's memory, still usable
    assert len(q.pop()) + sum(q.rejected.values()) <= SIZE
    del q
    gc.collect()
    mem.resize(2 * MEMMAP.ram_bytes, refcheck=False)  # the pin ends with the queue


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda a: a[:], id="slice"),
        pytest.param(lambda a: a.reshape(-1, 4096), id="reshape"),
        pytest.param(lambda a: a.view(np.uint8)[:], id="view of a view"),
        pytest.param(memoryview, id="memoryview"),
        pytest.param(lambda a: np.frombuffer(memoryview(a), dtype=np.uint8), id="frombuffer"),
    ],
)
def test_the_array_behind_a_view_cannot_be_resized_under_a_queue(view: Any) -> None:
    owner = own_array()
    mem = view(owner)
    if isinstance(mem, np.ndarray):
        mem = mem.reshape(-1)
    q = SplitQueue(mem, MEMMAP, SIZE, S_DESC, S_AVAIL, S_USED)
    del mem
    with pytest.raises(ValueError, match="cannot resize"):
        owner.resize(2 * MEMMAP.ram_bytes, refcheck=False)
    assert len(q.pop()) == 0


def test_an_mmap_behind_a_numpy_array_cannot_be_closed_under_a_queue() -> None:
    ram = mmap.mmap(-1, MEMMAP.ram_bytes)
    q = SplitQueue(np.frombuffer(ram, dtype=np.uint8), MEMMAP, SIZE, S_DESC, S_AVAIL, S_USED)
    with pytest.raises(BufferError):
        ram.close()
    assert len(q.pop()) == 0
    del q
    gc.collect()
    ram.close()


# -- integers out of range: ValueError naming the argument, nothing changed -----------------------

NEG_CASES: list[tuple[str, Callable[[bytearray], object], str]] = [
    ("split size", lambda m: SplitQueue(m, MEMMAP, -8, S_DESC, S_AVAIL, S_USED), "queue size"),
    ("split desc", lambda m: SplitQueue(m, MEMMAP, SIZE, -16, S_AVAIL, S_USED), "desc_gpa"),
    ("split avail", lambda m: SplitQueue(m, MEMMAP, SIZE, S_DESC, -2, S_USED), "avail_gpa"),
    ("split used", lambda m: SplitQueue(m, MEMMAP, SIZE, S_DESC, S_AVAIL, -4), "used_gpa"),
    ("split used 2**64", lambda m: SplitQueue(m, MEMMAP, 8, 0, 0x2000, 2**64), "used_gpa"),
    ("packed size", lambda m: PackedQueue(m, MEMMAP, -1, 0x1000, 0x2000, 0x2004), "queue size"),
    ("packed desc", lambda m: PackedQueue(m, MEMMAP, 8, -0x1000, 0x2000, 0x2004), "desc_gpa"),
    ("packed driver", lambda m: PackedQueue(m, MEMMAP, 8, 0x1000, -4, 0x2004), "driver_event"),
    ("packed device", lambda m: PackedQueue(m, MEMMAP, 8, 0x1000, 0x2000, -4), "device_event"),
    ("map gpa", lambda m: MemoryMap([(-4096, 4096)]), r"regions\[0\] gpa"),
    ("map size", lambda m: MemoryMap([(0, 4096), (8192, -4096)]), r"regions\[1\] size"),
    ("map page size", lambda m: MemoryMap([(0, 4096)], page_size=-4096), "page_size"),
    ("x86 ram", lambda m: MemoryMap.x86(-(1 << 30)), "ram_bytes"),
    ("x86 below_4g", lambda m: MemoryMap.x86(1 << 30, below_4g=-1), "below_4g"),
    ("pfn_of", lambda m: MEMMAP.pfn_of(-4096), "gpa"),
    ("pfn_of 2**64", lambda m: MEMMAP.pfn_of(2**64), "gpa"),
]


@pytest.mark.parametrize(("call", "match"), [pytest.param(c, r, id=i) for i, c, r in NEG_CASES])
def test_negative_addresses_and_sizes_are_value_errors(
    call: Callable[[bytearray], object], match: str
) -> None:
    mem = bytearray(MEMMAP.ram_bytes)
    with pytest.raises(ValueError, match=match) as info:
        call(mem)
    assert info.type is ValueError
    mem.extend(b"x")  # a refused queue holds no export


QUEUE_CALLS: list[tuple[str, Callable[[Any], object], type[Exception], str]] = [
    ("negative head", lambda q: q.add_used([2, -1], [0, 0]), ValueError, r"heads\[1\]"),
    ("head past 16 bits", lambda q: q.add_used([65538], [0]), ValueError, r"heads\[0\]"),
    ("negative len", lambda q: q.add_used([2], [-1]), ValueError, r"lens\[0\]"),
    ("len past 32 bits", lambda q: q.add_used([2], [2**32]), ValueError, r"lens\[0\]"),
    ("str head", lambda q: q.add_used(["2"], [0]), TypeError, "int"),
    ("float len", lambda q: q.add_used([2], [0.0]), TypeError, "int"),
    ("negative pop", lambda q: q.pop(-1), ValueError, "max_elements"),
    ("negative pop_batch", lambda q: q.pop_batch(-5), ValueError, "max_elements"),
    ("negative drain", lambda q: q.drain_hints(None, -1), ValueError, "max_elements"),
    ("negative last_avail", lambda q: q.set_indices(-1, 0), ValueError, "last_avail"),
    ("next_used past 16 bits", lambda q: q.set_indices(2, 65536), ValueError, "next_used"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [pytest.param(c, e, r, id=i) for i, c, e, r in QUEUE_CALLS]
)
def test_bad_queue_arguments_change_nothing(
    call: Callable[[Any], object], exc: type[Exception], match: str
) -> None:
    mem = np.zeros(MEMMAP.ram_bytes, dtype=np.uint8)
    q = split_ring(mem, [2, 5, 6])
    assert q.pop(2).heads.tolist() == [2, 5]
    before = mem.tobytes()
    with pytest.raises(exc, match=match) as info:
        call(q)
    assert info.type is exc
    assert mem.tobytes() == before
    assert (q.last_avail, q.next_used) == (2, 0)
    q.add_used([5, 2], [0, 0])  # both still in flight
    assert q.pop().heads.tolist() == [6]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda q: q.set_indices(-1, True, 0, True), "next_avail"),
        (lambda q: q.set_indices(0, True, 2**16, True), "next_used"),
        (lambda q: q.add_used([-1], [0]), r"heads\[0\]"),
    ],
)
def test_bad_packed_queue_arguments_are_value_errors(
    call: Callable[[Any], object], match: str
) -> None:
    mem = own_array()
    q = PackedQueue(mem, MEMMAP, SIZE, DESC, DRIVER_EVENT, DEVICE_EVENT)
    with pytest.raises(ValueError, match=match):
        call(q)
    assert q.next_avail == (0, True) and q.next_used == (0, True)
