"""A simulated KVM dirty log (``KVM_GET_DIRTY_LOG`` / ``KVM_CLEAR_DIRTY_LOG``), in classic or
manual-protect mode, over a guest's pages. tests/sim/test_kvm_dirty_log.py checks it against
/dev/kvm."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from pagehint import _core

_U64Array = npt.NDArray[np.uint64]


class DirtyLog:
    """A simulated KVM dirty log over the guest's pages (``KVM_GET_DIRTY_LOG`` layout).

    ``classic``: ``get()`` returns the dirty pages and clears them, write-protecting them
    again, so every later write is logged. ``manual`` (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
    ``get()`` leaves reported pages dirty and writable, so writes to them are not tracked
    separately, until ``clear()`` of their 64-page chunk clears and write-protects them.
    ``clear()`` clears what the last ``get()`` reported in the range (the bitmap QEMU passes
    to KVM_CLEAR_DIRTY_LOG): a page first written after that ``get()`` stays dirty, a reported
    page written again since loses that write from the log. ``ring`` (KVM_CAP_DIRTY_LOG_RING):
    per-vCPU rings harvested and reset; as a set of pages per sync, what ``classic`` reports.
    """

    def __init__(self, npages: int, mode: Literal["classic", "manual", "ring"] = "classic") -> None:
        if mode not in ("classic", "manual", "ring"):
            raise ValueError(f"mode must be 'classic', 'manual' or 'ring', not {mode!r}")
        self.mode = mode
        self.npages = npages
        self._bits = _core.DirtyBitmap(npages)
        self._reported = _core.DirtyBitmap(npages)  # manual mode: from the last get()

    def record(self, starts: _U64Array, counts: _U64Array) -> None:
        """Guest writes to ``[starts[i], starts[i] + counts[i])``."""
        self._bits.set_ranges(starts, counts)

    def get(self) -> _U64Array:
        """The dirty log as ``uint64`` words (KVM_GET_DIRTY_LOG)."""
        words = self._bits.words().copy()
        if self.mode != "manual":
            self._bits.clear_all()
        else:
            self._reported.clear_all()
            self._reported.merge_log(words)
        return words

    def clear(self, first_page: int, num_pages: int) -> int:
        """KVM_CLEAR_DIRTY_LOG: clears and write-protects ``[first_page, +num_pages)``;
        returns how many were dirty. Manual mode only; ``first_page`` must be a multiple of
        64 and ``num_pages`` too unless the range reaches the last page."""
        if self.mode != "manual":
            raise ValueError("KVM_CLEAR_DIRTY_LOG needs manual-protect mode")
        if first_page < 0 or num_pages < 0 or first_page + num_pages > self.npages:
            raise ValueError(f"[{first_page}, +{num_pages}) is not inside {self.npages} pages")
        if first_page % 64 or (num_pages % 64 and first_page + num_pages != self.npages):
            raise ValueError(f"[{first_page}, +{num_pages}) is not 64-page aligned")
        starts, lengths = self._reported.dirty_runs(first_page, num_pages)
        self._reported.clear_range(first_page, num_pages)
        return self._bits.clear_ranges(starts, lengths)

    def count(self) -> int:
        """Pages dirty in the log now."""
        return self._bits.count()
