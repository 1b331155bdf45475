"""Free page reporting (VIRTIO_BALLOON_F_REPORTING): the guest hands finished free pages to the
host to discard, outside any migration. QEMU's ``virtio_balloon_handle_report``: each in-buffer
that is page aligned and inside one RAM region is discarded, none while ``poison_val`` is
non-zero, and every element is returned used with length 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.virtqueue import PackedQueue, SplitQueue

_U64Array = npt.NDArray[np.uint64]


@dataclass(frozen=True)
class ReportResult:
    """What one ``process_reporting()`` call did on the free page reporting queue.

    ``ranges`` were handed to ``discard`` as ``(gpa, len)`` rows; ``skipped_poison`` elements
    were returned without discarding because ``poison_val`` is non-zero (the guest expects freed
    pages to keep its poison pattern; QEMU's rule). ``rejected`` counts buffers that were not
    page aligned or not entirely inside one RAM region (QEMU ignores those too).
    """

    elements: int
    ranges: int
    bytes: int
    skipped_poison: int
    rejected: dict[str, int] = field(default_factory=dict)
    interrupt: bool = False


class FreePageReporting:
    """The reporting queue of one device: set up by ``set_queue``, drained by ``process``.

    ``discard`` receives the page ranges as a ``uint64`` ``(N, 2)`` array of ``(gpa, len)``,
    outside the lock."""

    def __init__(
        self, memmap: _core.MemoryMap, discard: Callable[[_U64Array], None] | None
    ) -> None:
        self._memmap = memmap
        self._discard = discard
        self._lock = threading.Lock()
        self._queue: SplitQueue | PackedQueue | None = None

    def set_queue(self, queue: SplitQueue | PackedQueue | None) -> None:
        """Reads ``queue`` from now on (None: the queue is gone, after a reset)."""
        with self._lock:
            self._queue = queue

    @property
    def queue(self) -> SplitQueue | PackedQueue | None:
        """The reporting queue's reader, once set up."""
        return self._queue

    def process(self, max_elements: int, poison_val: int) -> ReportResult:
        """Drains up to ``max_elements`` elements; ``RuntimeError`` without a queue."""
        if max_elements < 0:
            raise ValueError(f"max_elements must not be negative, not {max_elements}")
        with self._lock:
            queue = self._queue
            if queue is None:
                raise RuntimeError("the reporting queue is not set up (negotiate REPORTING)")
            els = queue.pop(max_elements)
            n = len(els)
            ranges = np.empty((0, 2), dtype=np.uint64)
            rejected: dict[str, int] = {}
            skipped = 0
            if poison_val != 0:
                skipped = n
            elif n:
                _, addr, length = els.in_buffers()
                ranges, rejected = page_ranges(self._memmap, addr, length.astype(np.uint64))
            if n:
                queue.add_used(els.heads.tolist(), [0] * n)
            interrupt = n > 0 and queue.needs_interrupt()
        if len(ranges) and self._discard is not None:
            self._discard(ranges)
        return ReportResult(n, len(ranges), int(ranges[:, 1].sum()), skipped, rejected, interrupt)


def page_ranges(
    memmap: _core.MemoryMap, addr: _U64Array, length: _U64Array
) -> tuple[_U64Array, dict[str, int]]:
    """The ``(gpa, len)`` buffers that are page aligned, non-empty and inside one RAM region,
    as an ``(N, 2)`` array; the others counted by reason."""
    page = memmap.page_size
    aligned = (addr % page == 0) & (length % page == 0) & (length > 0)
    regions = sorted(memmap.regions)
    starts = np.array([r[0] for r in regions], dtype=np.uint64)
    ends = np.array([r[0] + r[1] for r in regions], dtype=np.uint64)
    region = np.searchsorted(starts, addr, side="right").astype(np.int64) - 1
    end = addr + length
    inside = (region >= 0) & (end >= addr)
    idx = np.clip(region, 0, len(starts) - 1)
    inside &= (addr >= starts[idx]) & (end <= ends[idx])
    ok = aligned & inside
    rejected = {"unaligned": int((~aligned).sum()), "outside_ram": int((aligned & ~inside).sum())}
    return np.ascontiguousarray(np.stack([addr[ok], length[ok]], axis=1)), rejected
