"""A queue cannot be misused from Python: ``add_used`` takes back only heads (buffer ids) in
flight, as often as they are, and refuses a bad batch whole; every refusal is a ``ValueError``
that leaves the rings and the queue's indices as they were."""

from __future__ import annotations

import struct

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


def put(mem: U8Array | bytearray, at: int, data: bytes) -> None:
    """Writes ``data`` at offset ``at`` of a bytearray or a numpy uint8 array."""
    if isinstance(mem, bytearray):
        mem[at : at + len(data)] = data
    else:
        mem[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)


def split_ring(mem: U8Array | bytearray, heads: list[int]) -> SplitQueue:
    """A split queue whose driver made ``heads`` available, each a one-buffer element."""
    for h in range(SIZE):
        put(mem, S_DESC + 16 * h, struct.pack("<QIHH", DATA + 0x1000 * h, 0x1000, WRITE, 0))
    put(mem, S_AVAIL, struct.pack("<HH", 0, len(heads)))
    for i, h in enumerate(heads):
        put(mem, S_AVAIL + 4 + 2 * i, struct.pack("<H", h))
    return SplitQueue(mem, MEMMAP, SIZE, S_DESC, S_AVAIL, S_USED)


def used_ring(mem: U8Array | bytearray) -> bytes:
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
