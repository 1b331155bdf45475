"""Virtqueues read from guest RAM: the elements a driver made available, as numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.hints import HintResult


@dataclass(frozen=True)
class Elements:
    """Elements popped from a queue, as parallel arrays (no Python object per element).

    ``heads[i]`` is element ``i``'s id (what ``add_used`` takes back). Descriptor ``j`` belongs to
    element ``desc_element[j]``; descriptors are in chain order, device-readable (out) buffers
    before device-writable (in) ones.
    """

    heads: npt.NDArray[np.uint16]
    desc_element: npt.NDArray[np.uint32]
    desc_addr: npt.NDArray[np.uint64]
    desc_len: npt.NDArray[np.uint32]
    desc_writable: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.heads.size)

    def buffers(self, i: int) -> list[tuple[int, int, bool]]:
        """Element ``i``'s descriptors as ``(addr, len, writable)``."""
        sel = self.desc_element == i
        return [
            (int(a), int(n), bool(w))
            for a, n, w in zip(self.desc_addr[sel], self.desc_len[sel], self.desc_writable[sel])
        ]

    def out_buffers(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64], npt.NDArray[np.uint32]]:
        """Device-readable buffers: ``(element, addr, len)``."""
        ro = ~self.desc_writable
        return self.desc_element[ro], self.desc_addr[ro], self.desc_len[ro]

    def in_buffers(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64], npt.NDArray[np.uint32]]:
        """Device-writable buffers: ``(element, addr, len)``; for a free page queue, the hints."""
        w = self.desc_writable
        return self.desc_element[w], self.desc_addr[w], self.desc_len[w]


@dataclass(frozen=True)
class ControlElement:
    """An element with a device-readable buffer, popped but not yet used.

    For the free page queue that is a cmd id: ``cmd_id`` is its first 4 bytes (little endian),
    or None when the out-buffers hold fewer than 4 bytes (QEMU puts the device in an error
    state then). ``hints`` are the element's device-writable buffers as ``(gpa, len)``, to apply
    only if the device state allows. Give the element back with ``add_used([head], [0])``.
    """

    head: int
    cmd_id: int | None
    hints: list[tuple[int, int]]


@dataclass(frozen=True)
class HintDrain:
    """What one ``drain_hints`` call did: the hints applied (``result``), how many hint
    elements were returned used, the control element that stopped it, if any, and whether
    the element budget ran out first (``limited``: more may be available)."""

    result: HintResult
    elements: int
    control: ControlElement | None
    limited: bool = False
    ranges: npt.NDArray[np.uint64] | None = None
    """With ``record=True``: the ``(pfn, pages)`` ranges cleared, shape ``(N, 2)``."""


class _Ring(Protocol):
    """The core methods both queue layouts share."""

    def pop_batch(self, max_elements: int) -> tuple[
        npt.NDArray[np.uint16],
        npt.NDArray[np.uint32],
        npt.NDArray[np.uint64],
        npt.NDArray[np.uint32],
        npt.NDArray[np.bool_],
    ]: ...

    def _drain_hints(
        self, bitmap: _core.DirtyBitmap | None, max_elements: int = ..., record: bool = ...
    ) -> tuple[
        int, int, int, dict[str, int], int, tuple[int, int | None, list[tuple[int, int]]] | None,
        bool, npt.NDArray[np.uint64] | None,
    ]: ...


class _Elements:
    """``pop`` and ``drain_hints`` as dataclasses, for either layout."""

    def pop(self: _Ring, max_elements: int = 1 << 16) -> Elements:
        """Takes up to ``max_elements`` available elements (GIL released)."""
        heads, elem, addr, length, writable = self.pop_batch(max_elements)
        return Elements(heads, elem, addr, length, writable)

    def drain_hints(
        self: _Ring,
        bitmap: _core.DirtyBitmap | None,
        max_elements: int = 1 << 16,
        *,
        record: bool = False,
    ) -> HintDrain:
        """Applies available free-page-hint elements to ``bitmap`` until the queue is empty,
        ``max_elements`` were taken, or an element with a cmd id comes up (GIL released).
        With ``bitmap=None`` the hint elements are returned used without being applied (a
        device outside its START state). ``record=True`` also returns the page ranges cleared
        (``ranges``), for a VMM that clears the hypervisor's dirty log where hints landed."""
        n, hinted, cleared, rejected, elements, control, limited, ranges = self._drain_hints(
            bitmap, max_elements, record
        )
        ctl = None if control is None else ControlElement(control[0], control[1], control[2])
        return HintDrain(HintResult(n, hinted, cleared, rejected), elements, ctl, limited, ranges)


class SplitQueue(_Elements, _core.SplitQueue):
    """A split virtqueue (virtio 1.2 §2.7) in guest RAM held by a writable buffer.

    ``SplitQueue(mem, memmap, size, desc_gpa, avail_gpa, used_gpa, *, event_idx=False)``:
    ``mem`` is a ``bytearray``, ``mmap`` or numpy ``uint8`` array laid out by ``memmap`` (it may
    be written by the guest concurrently). Construction checks the size (a power of two up to
    32768), ring alignment and that the rings are RAM (``ValueError`` otherwise). Every
    guest-written field is validated: a bad element is counted in ``rejected`` and returned used
    with length 0; a bad ring index stops the queue and sets ``error``.
    """


class PackedQueue(_Elements, _core.PackedQueue):
    """A packed virtqueue (virtio 1.2 §2.8) in guest RAM held by a writable buffer.

    ``PackedQueue(mem, memmap, size, desc_gpa, driver_event_gpa, device_event_gpa, *,
    event_idx=False)``: the same guarantees as ``SplitQueue``; ids are buffer ids, and indices
    come with their wrap counters (``next_avail``, ``next_used``, ``set_indices``).
    """
