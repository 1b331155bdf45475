"""Pages as runs of consecutive page numbers: what the sender takes from the migration bitmap
in one batch, and what a source reads and a destination receives. A dirty bitmap is mostly
long runs, so whatever keeps its state per block or per range (the simulator's page contents)
costs per run, not per page; a real source expands the runs into page numbers (``pfns()``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["PageRuns", "expand_runs"]

_I64Array = npt.NDArray[np.int64]


def expand_runs(starts: _I64Array, counts: _I64Array) -> _I64Array:
    """``starts[i], starts[i] + 1, ..., starts[i] + counts[i] - 1`` for every ``i``, in order."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    # One arange, shifted per run: each run's numbers continue from its start.
    shift = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    out: _I64Array = np.arange(total, dtype=np.int64) + shift
    return out


@dataclass(frozen=True, eq=False)
class PageRuns:
    """Runs ``[starts[i], starts[i] + counts[i])`` of pages, in sending order (each run
    ascending; a batch that wrapped around the bitmap goes on from a lower page). No run is
    empty and no page is in two runs."""

    starts: _I64Array
    counts: _I64Array
    pages: int = field(init=False)
    """Pages in all runs."""

    def __post_init__(self) -> None:
        if self.starts.shape != self.counts.shape or self.starts.ndim != 1:
            raise ValueError("run starts and counts must be 1-d arrays of one length")
        object.__setattr__(self, "pages", int(self.counts.sum()))

    @classmethod
    def of_pfns(cls, pfns: _I64Array) -> PageRuns:
        """The runs of ``pfns`` (page numbers in sending order): a new run wherever the next
        page is not the one after."""
        if not len(pfns):
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty.copy())
        breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
        first = np.concatenate([[0], breaks])
        counts = np.diff(np.concatenate([first, [len(pfns)]]))
        return cls(pfns[first].astype(np.int64), counts.astype(np.int64))

    def pfns(self) -> _I64Array:
        """Every page number, in sending order."""
        return expand_runs(self.starts, self.counts)

    def last(self) -> int:
        """The last page sent (-1 for no pages)."""
        if not len(self.starts):
            return -1
        return int(self.starts[-1] + self.counts[-1] - 1)
