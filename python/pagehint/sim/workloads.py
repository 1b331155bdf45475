"""Guest workloads for the simulator: what a guest allocates, writes and frees over time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from pagehint.sim.guest import SimulatedGuest

_I64Array = npt.NDArray[np.int64]


class Workload(Protocol):
    """Guest activity over simulated time."""

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        """Runs for ``seconds`` of guest time."""


@dataclass
class Idle:
    """An idle guest: the kernel writes ``pages_per_s`` of its own pages (timers, logs)."""

    pages_per_s: float = 0.0
    _carry: float = 0.0

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        self._carry += self.pages_per_s * seconds
        n = int(self._carry)
        self._carry -= n
        if n:
            kernel = guest.kernel_pages()
            guest.write_pages(kernel[guest.rng.integers(0, len(kernel), n)])


@dataclass
class MemoryHog:
    """Allocates ``nbytes`` (at ``bytes_per_s``, or at once if None), writes every page, then
    frees it all: what ``stress-ng --vm`` or a finished batch job leaves behind."""

    nbytes: int
    bytes_per_s: float | None = None
    done: bool = False
    _blocks: list[_I64Array] = field(default_factory=list)
    _allocated: int = 0
    _carry: float = 0.0

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        if self.done:
            return
        total = guest.blocks_for(self.nbytes)
        want = total - self._allocated
        if self.bytes_per_s is not None:
            self._carry += self.bytes_per_s * seconds / guest.block_bytes
            want = min(want, int(self._carry))
            self._carry -= want
        stalled = False
        if want > 0:
            got = guest.alloc_blocks(want)
            guest.write_blocks(got)
            self._blocks.append(got)
            self._allocated += len(got)
            stalled = len(got) < want  # out of memory: the hog gives up and exits
        if self._allocated >= total or stalled:
            for b in self._blocks:
                guest.free_blocks(b)
            self._blocks.clear()
            self.done = True


@dataclass
class SteadyWriter:
    """Allocates a working set of ``working_set_bytes`` and writes ``pages_per_s`` random
    pages of it (a database or cache at steady state)."""

    working_set_bytes: int
    pages_per_s: float
    _pages: _I64Array | None = None
    _carry: float = 0.0

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        if self._pages is None:
            blocks = guest.alloc_blocks(guest.blocks_for(self.working_set_bytes))
            guest.write_blocks(blocks)
            self._pages = guest.block_pages(blocks)
        self._carry += self.pages_per_s * seconds
        n = int(self._carry)
        self._carry -= n
        if n and len(self._pages):
            guest.write_pages(self._pages[guest.rng.integers(0, len(self._pages), n)])


@dataclass
class KernelCompile:
    """``make -j`` churn: compiler processes allocate and fill ``alloc_bytes_per_s`` of
    anonymous memory that lives ``lifetime_s`` and is freed, while the page cache grows by
    ``cache_bytes_per_s`` (written once and kept)."""

    alloc_bytes_per_s: float = 768 << 20
    lifetime_s: float = 1.5
    cache_bytes_per_s: float = 24 << 20
    _live: list[tuple[float, _I64Array]] = field(default_factory=list)
    _carry: float = 0.0
    _cache_carry: float = 0.0

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        t = guest.now + seconds
        while self._live and self._live[0][0] <= t:
            guest.free_blocks(self._live.pop(0)[1])
        self._carry += self.alloc_bytes_per_s * seconds / guest.block_bytes
        self._cache_carry += self.cache_bytes_per_s * seconds / guest.block_bytes
        n, c = int(self._carry), int(self._cache_carry)
        self._carry -= n
        self._cache_carry -= c
        if n:
            blocks = guest.alloc_blocks(n)
            guest.write_blocks(blocks)
            self._live.append((t + self.lifetime_s, blocks))
        if c:
            guest.write_blocks(guest.alloc_blocks(c))
