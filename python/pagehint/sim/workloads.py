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
            index = guest.rng.integers(0, guest.kernel_page_count, n)
            guest.write_pages(guest.kernel_pages(index))


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
    _blocks: _I64Array | None = None
    _carry: float = 0.0

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        if self._blocks is None:
            self._blocks = guest.alloc_blocks(guest.blocks_for(self.working_set_bytes))
            guest.write_blocks(self._blocks)
        self._carry += self.pages_per_s * seconds
        n = int(self._carry)
        self._carry -= n
        npages = len(self._blocks) * guest.pages_per_block
        if n and npages:
            index = guest.rng.integers(0, npages, n)
            guest.write_pages(guest.block_pages_at(self._blocks, index))


@dataclass
class WriteFree:
    """Allocates ``write_bytes`` in blocks, writes every page, and frees the last-allocated
    ``free_bytes`` of them again, most recent first (the allocator's LIFO): what pagehint's KVM
    test guest does before it migrates (``alloc_write``, then ``free``), leaving stale data in
    free blocks and the rest in use. It acts once, at its first step."""

    write_bytes: int
    free_bytes: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        if self.write_bytes < 0 or not 0 <= self.free_bytes <= self.write_bytes:
            raise ValueError(
                f"write-free needs 0 <= free ({self.free_bytes}) <= write ({self.write_bytes})"
            )

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        if self.done:
            return
        self.done = True
        blocks = guest.alloc_blocks(guest.blocks_for(self.write_bytes))
        guest.write_blocks(blocks)
        nfree = min(len(blocks), guest.blocks_for(self.free_bytes))
        if nfree:
            guest.free_blocks(blocks[::-1][:nfree])


@dataclass
class UsedWriter:
    """Writes ``pages_per_s`` pages, each a uniformly random page of the blocks in use outside
    the kernel's (whatever earlier workloads left allocated), and with every batch of writes
    also its own ``kernel_pages`` bookkeeping pages (the first pages of the kernel's blocks):
    pagehint's KVM test guest running by itself (its step rewrites random pages of its used
    blocks and their version words in its kernel block)."""

    pages_per_s: float
    kernel_pages: int = 0
    _carry: float = 0.0

    def __post_init__(self) -> None:
        if self.pages_per_s < 0 or self.kernel_pages < 0:
            raise ValueError("used-writer needs pages_per_s and kernel_pages not negative")

    def step(self, guest: SimulatedGuest, seconds: float) -> None:
        self._carry += self.pages_per_s * seconds
        n = int(self._carry)
        self._carry -= n
        if not n:
            return
        blocks = guest.used_blocks(kernel=False)
        if len(blocks):
            ppb = guest.pages_per_block
            which = blocks[guest.rng.integers(0, len(blocks), n)]
            offset = guest.rng.integers(0, ppb, n)
            guest.write_pages(guest.block_pfn[which] + offset)
        if self.kernel_pages:
            first = np.arange(min(self.kernel_pages, guest.kernel_page_count), dtype=np.int64)
            guest.write_pages(guest.kernel_pages(first))


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
