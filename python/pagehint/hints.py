"""Applying free-page hints to a dirty bitmap through a guest memory map."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from pagehint import _core


@dataclass(frozen=True)
class HintResult:
    """What one batch of hints did.

    ``pages_cleared`` is the drop in dirty pages (QEMU's ``migration_dirty_pages -=`` for the
    batch); ``pages_hinted`` counts pages fully covered by accepted hints, twice if hinted twice.
    """

    hints: int
    pages_hinted: int
    pages_cleared: int
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        """Hints rejected for any reason."""
        return sum(self.rejected.values())


def apply_hints(
    bitmap: _core.DirtyBitmap,
    memmap: _core.MemoryMap,
    hints: npt.NDArray[np.uint64],
) -> HintResult:
    """Clears the pages that ``(gpa, len)`` hints fully cover, in one pass with the GIL released.

    ``hints`` is a C-contiguous ``uint64`` array of shape ``(N, 2)``. A hint's start is rounded
    up and its end down to page boundaries; a hint of zero length, one whose end wraps past
    2**64, or one touching any byte outside RAM is rejected whole and counted by reason in
    ``rejected`` (``zero_length``, ``overflow``, ``outside_ram``). Raises ``ValueError`` if the
    bitmap has fewer pages than the map, ``TypeError``/``ValueError`` for a malformed array.
    """
    n, hinted, cleared, rejected = _core.apply_hints(bitmap, memmap, hints)
    return HintResult(n, hinted, cleared, rejected)
