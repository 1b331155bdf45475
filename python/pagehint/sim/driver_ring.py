"""The driver side of a split virtqueue (virtio 1.2 §2.7), as Linux's ``virtio_ring.c`` writes
it: the guest simulator and the device tests use it to put real elements into guest RAM.

Elements are written in batches with numpy (no Python object per element): descriptors into
free table slots, their heads into the available ring, then the available index. Used
elements are reclaimed from the used ring and their slots reused, most recently freed first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pagehint import _core

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])

_Bytes = npt.NDArray[np.uint8]


def ring_bytes(size: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, available ring and used ring (with the
    event fields) for ``size`` entries."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


def ram_view(mem: _Bytes, memmap: _core.MemoryMap, gpa: int, nbytes: int) -> _Bytes:
    """The bytes ``[gpa, gpa + nbytes)`` of guest RAM in ``mem`` (laid out by ``memmap``);
    ``ValueError`` unless they are RAM in one region."""
    page = memmap.page_size
    first = memmap.pfn_of(gpa)
    last = memmap.pfn_of(gpa + nbytes - 1)
    if last - first != (gpa + nbytes - 1) // page - gpa // page:
        raise ValueError(f"[{gpa:#x}, {gpa + nbytes:#x}) is not contiguous guest RAM")
    off = first * page + gpa % page
    return mem[off : off + nbytes]


@dataclass(frozen=True)
class Used:
    """Elements the device returned: their heads, used lengths and the tokens given to
    ``add``."""

    heads: npt.NDArray[np.uint16]
    lens: npt.NDArray[np.uint32]
    tokens: npt.NDArray[np.int64]


class DriverSplitRing:
    """A split ring of ``size`` entries in guest RAM, written as a driver does.

    ``event_idx`` is whether VIRTIO_RING_F_EVENT_IDX was negotiated. ``callback=False`` is a
    queue without an interrupt handler (Linux's free page queue): without EVENT_IDX the driver
    sets VRING_AVAIL_F_NO_INTERRUPT; with it, ``used_event`` stays 0.
    """

    def __init__(
        self,
        mem: _Bytes,
        memmap: _core.MemoryMap,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool = False,
        callback: bool = False,
    ) -> None:
        if size < 1 or size > 32768 or size & (size - 1):
            raise ValueError(f"a split ring size is a power of two up to 32768, not {size}")
        dn, an, un = ring_bytes(size)
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self._desc = ram_view(mem, memmap, desc_gpa, dn).view(DESC_DTYPE)
        self._avail = ram_view(mem, memmap, avail_gpa, an).view("<u2")
        self._used_hdr = ram_view(mem, memmap, used_gpa, 4).view("<u2")
        self._used = ram_view(mem, memmap, used_gpa + 4, 8 * size).view("<u4").reshape(size, 2)
        self._avail_event = ram_view(mem, memmap, used_gpa + 4 + 8 * size, 2).view("<u2")
        self._event_idx = event_idx
        # Linux allocates ring memory zeroed (__GFP_ZERO): a ring set up again over old pages
        # (a re-probe after reset) must not see the old used index or avail_event.
        self._desc[:] = np.zeros(size, dtype=DESC_DTYPE)
        self._avail[:] = 0
        ram_view(mem, memmap, used_gpa, un)[:] = 0
        self._avail[0] = VIRTQ_AVAIL_F_NO_INTERRUPT if not (callback or event_idx) else 0
        # Free descriptor slots as a stack: the most recently freed is reused first.
        self._free = np.arange(size - 1, -1, -1, dtype=np.int64)
        self._nfree = size
        self._chain_len = np.zeros(size, dtype=np.int64)
        self._tokens = np.full(size, -1, dtype=np.int64)
        self._chain_slots: dict[int, npt.NDArray[np.int64]] = {}
        self._avail_idx = 0
        self._last_used = 0
        self._kicked_at = 0

    @property
    def num_free(self) -> int:
        """Free descriptors."""
        return self._nfree

    @property
    def avail_idx(self) -> int:
        """The available index as published."""
        return self._avail_idx

    @property
    def in_flight(self) -> int:
        """Descriptors made available and not yet reclaimed."""
        return self.size - self._nfree

    def gpa_ranges(self) -> list[tuple[int, int]]:
        """The ring's ``(gpa, len)`` areas."""
        dn, an, un = ring_bytes(self.size)
        return [(self.desc_gpa, dn), (self.avail_gpa, an), (self.used_gpa, un)]

    def add(
        self,
        addrs: npt.NDArray[np.uint64],
        lens: npt.NDArray[np.uint32] | int,
        *,
        writable: bool,
        tokens: npt.NDArray[np.int64] | None = None,
    ) -> None:
        """Makes one single-descriptor element available per address (device-writable
        "in" buffers if ``writable``), in order. ``ValueError`` if there are not enough free
        descriptors."""
        k = len(addrs)
        if k > self._nfree:
            raise ValueError(f"{k} descriptors wanted, {self._nfree} free")
        if k == 0:
            return
        heads = self._free[self._nfree - k : self._nfree][::-1].copy()
        self._nfree -= k
        d = self._desc
        d["addr"][heads] = addrs
        d["len"][heads] = lens
        d["flags"][heads] = VIRTQ_DESC_F_WRITE if writable else 0
        d["next"][heads] = 0
        self._chain_len[heads] = 1
        self._tokens[heads] = -1 if tokens is None else tokens
        self._publish(heads)

    def add_chain(self, buffers: list[tuple[int, int, bool]], token: int = -1) -> int:
        """Makes one element of chained descriptors ``(addr, len, writable)`` available
        (device-readable ones first, as the spec requires). Returns its head."""
        k = len(buffers)
        if k == 0 or k > self._nfree:
            raise ValueError(f"a chain of {k} descriptors with {self._nfree} free")
        ids = self._free[self._nfree - k : self._nfree][::-1].copy()
        self._nfree -= k
        for j, (addr, length, writable) in enumerate(buffers):
            i = int(ids[j])
            last = j == k - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self._desc[i] = (addr, length, flags, 0 if last else int(ids[j + 1]))
        head = int(ids[0])
        # The rest of the chain is freed with the head: remember its slots in chain order.
        self._chain_len[head] = k
        self._chain_slots[head] = ids
        self._tokens[head] = token
        self._publish(np.array([head], dtype=np.int64))
        return head

    def _publish(self, heads: npt.NDArray[np.int64]) -> None:
        k = len(heads)
        slots = (self._avail_idx + np.arange(k)) % self.size
        self._avail[2 + slots] = heads
        # The index goes last: the device reads ring entries only below it.
        self._avail_idx = (self._avail_idx + k) & 0xFFFF
        self._avail[1] = self._avail_idx

    def kick(self) -> bool:
        """Whether the device wants a notification for what was added since the last kick
        (VIRTQ_USED_F_NO_NOTIFY, or the avail_event with EVENT_IDX)."""
        old, new = self._kicked_at, self._avail_idx
        self._kicked_at = new
        if self._event_idx:
            event = int(self._avail_event[0])
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not int(self._used_hdr[0]) & VIRTQ_USED_F_NO_NOTIFY

    def get_used(self) -> Used:
        """Reclaims every element the device returned since the last call."""
        used_idx = int(self._used_hdr[1])
        n = (used_idx - self._last_used) & 0xFFFF
        if n > self.in_flight:
            raise RuntimeError(f"the device returned {n} elements with {self.in_flight} in flight")
        if not n:  # the common case, every simulation step: nothing to look at
            return Used(np.zeros(0, np.uint16), np.zeros(0, np.uint32), np.zeros(0, np.int64))
        slots = (self._last_used + np.arange(n)) % self.size
        entries = self._used[slots]
        heads = entries[:, 0].astype(np.int64)
        if n and (
            heads.max() >= self.size
            or np.any(self._chain_len[heads] == 0)
            or len(np.unique(heads)) != n
        ):
            raise RuntimeError("the device returned a head that is not in flight")
        self._last_used = used_idx
        tokens = self._tokens[heads].copy()
        for h in heads[self._chain_len[heads] > 1].tolist():
            ids = self._chain_slots.pop(h)
            self._chain_len[h] = 0
            self._free[self._nfree : self._nfree + len(ids)] = ids[::-1]
            self._nfree += len(ids)
        single = heads[self._chain_len[heads] == 1]
        self._chain_len[single] = 0
        self._tokens[heads] = -1
        self._free[self._nfree : self._nfree + len(single)] = single
        self._nfree += len(single)
        return Used(heads.astype(np.uint16), entries[:, 1].copy(), tokens)
