"""What a scenario's two runs (hints off, then on) will cost this machine, estimated before
they start: ``estimate_run(scenario)``, and the machine's limits, ``machine_limits()``.
``RunEstimate.refusal(limits)`` says, in one line with the figure and the limit, why a run
should not start, or returns None.

What it counts, per run (the runs are one after the other, so memory is one run's):

- memory: the simulator's per-page state (the migration bitmap, the dirty log and its
  reported copy, a bit a page each, and a copy of the log at each sync; the source's and the
  destination's page contents, 4 bytes a page each, but only for the blocks the workload
  writes page by page and the pages in no block: a block written whole is one value), the
  per-block state of the allocator and the contents, the oracle's chunk of pages, a send
  batch, the pages the workload writes in one step (the longest step: a batch on the wire,
  the set-up time, the wait for the destination) and the workload's own arrays;
- address space: the guest's RAM mapping (never touched but for the rings) and the lazily
  mapped page contents;
- simulated work: the pages sent and written, blocks written and hinted, the pages kept page
  by page and the steps of both runs, each at a cost measured on the machine this was
  written on (``SEND_SECONDS`` and the others). A batch sent costs per run of pages and per
  block (``STEP_SECONDS``), a page only a little (``SEND_SECONDS``) unless it is kept page
  by page (``PAGED_SECONDS``). Pages sent follow the pre-copy rounds: the first round sends
  every page, the next one also the pages hints zeroed (``init_on_alloc``) and what the
  workload wrote once, and each later one what the workload dirtied while the one before
  was sent (at most its footprint, at most every page), until what is left fits the
  downtime or the round limit is hit. Pages written are the workload's page-by-page writes
  over the migration's simulated time. A ``[[history]]`` memory hog with a rate runs a step
  per simulated second.

It is an upper estimate: the shipped scenarios and large idle guests run in 15-70 % of the
time it says (the busier the machine, the more), and in less memory than it says (60-90 % of
it for large guests).
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from pathlib import Path

from pagehint.sim.guest import HINT_BLOCK_BYTES
from pagehint.sim.scenario import Scenario
from pagehint.sim.scenario_model import ram_regions, whole_blocks
from pagehint.sim.workloads import (
    Idle,
    KernelCompile,
    MemoryHog,
    SteadyWriter,
    UsedWriter,
    Workload,
    WriteFree,
)

__all__ = [
    "BLOCK_SECONDS",
    "HISTORY_STEP_SECONDS",
    "PAGED_SECONDS",
    "RUN_SECONDS",
    "SECONDS_LIMIT",
    "SEND_SECONDS",
    "STEP_SECONDS",
    "WRITE_SECONDS",
    "MachineLimits",
    "RunEstimate",
    "estimate_run",
    "machine_limits",
]

SEND_SECONDS = 8e-9
"""Wall seconds per page sent, beyond its batch's (``STEP_SECONDS``): pages travel as runs
and blocks, so a page costs next to nothing unless it is kept page by page
(``PAGED_SECONDS``); a 1 TiB idle guest sends 7.8e8 pages in 24,000 steps in 7-11 s."""
PAGED_SECONDS = 250e-9
"""Wall seconds per page kept page by page, per run: its block split, the page read and
written for the first round, compared by the oracle."""
RUN_SECONDS = 0.25
"""Wall seconds per run, whatever it does: the guest built, the oracle's pass over blocks."""
WRITE_SECONDS = 400e-9
"""Wall seconds per page a workload writes page by page: 175 ns measured for a steady writer
over a 1 GiB working set, 340 ns over 8 GiB (random writes miss the caches)."""
BLOCK_SECONDS = 2e-6
"""Wall seconds per block allocated, written, freed or hinted."""
STEP_SECONDS = 600e-6
"""Wall seconds per simulation step (a batch of up to ``batch_pages`` sent, the guest, its
driver and the device run for its time), whatever it does: Python's and numpy's per-call
share, 200-450 us measured."""
HISTORY_STEP_SECONDS = 50e-6
"""Wall seconds per step of a ``[[history]]`` workload (the guest alone, nothing sent)."""
SECONDS_LIMIT = 3600.0
"""The longest estimate ``pagehint simulate`` starts: an hour for both runs."""

_PAGE_BYTES = 4 / 8
"""Per guest page: four bitmaps' bits."""
_PAGED_BYTES = 4 + 4
"""Per page kept page by page: the source's and the destination's contents."""
_BLOCK_BYTES = 512
"""Per block: the allocator's arrays, the source's and the destination's per-block values
and block edges, and the temporaries of making them and of the oracle's pass over blocks
(about 400 bytes measured at the peak of a 4 TiB idle guest)."""
_RUN_BYTES = 32 << 20
"""Per run, whatever its size: the driver's rings, the device, numpy's temporaries."""
_INDEX_BYTES = 64
"""Per page handled in one go (a batch sent, the pages written in a step): the index
arrays numpy makes on the way."""
_ORACLE_CHUNK = 1 << 22
_ORACLE_BYTES = 40
_ADDRESS_SPACE = 1 << 47
"""A process's address space on x86-64 with 4-level page tables (128 TiB)."""
_MAX_ITERATIONS = 1000


@dataclass(frozen=True)
class MachineLimits:
    """What this machine gives a run: memory available (bytes, None if unknown), address
    space (bytes) and wall seconds."""

    memory: int | None
    memory_source: str
    address_space: int
    address_space_source: str
    seconds: float = SECONDS_LIMIT


def _meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def machine_limits() -> MachineLimits:
    """This machine's: MemAvailable from /proc/meminfo; the address space is the x86-64 user
    space (128 TiB) or RLIMIT_AS if lower, or what is left to commit if the kernel does not
    overcommit (vm.overcommit_memory = 2: MAP_NORESERVE is then ignored)."""
    info = _meminfo()
    memory = info.get("MemAvailable")
    space, space_source = _ADDRESS_SPACE, "a process's address space"
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < space:
        space, space_source = soft, "RLIMIT_AS"
    try:
        strict = Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2"
    except OSError:
        strict = False
    if strict and "CommitLimit" in info and "Committed_AS" in info:
        left = max(0, info["CommitLimit"] - info["Committed_AS"])
        if left < space:
            space, space_source = left, "CommitLimit less Committed_AS (no overcommit)"
    return MachineLimits(
        memory=memory,
        memory_source="MemAvailable",
        address_space=space,
        address_space_source=space_source,
    )


def _bytes(n: float) -> str:
    for unit, size in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


def _duration(seconds: float) -> str:
    for unit, size in (("years", 86400 * 365), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


@dataclass(frozen=True)
class RunEstimate:
    """A scenario's two runs, estimated: the memory and address space of one run, the
    work and wall time of both."""

    memory: float
    """Bytes resident at the peak of a run."""
    address_space: float
    """Bytes mapped by a run."""
    step_pages: float
    """The most pages the workload writes in one step."""
    pages_sent: float
    """Pages sent, both runs."""
    pages_written: float
    """Pages the workloads write page by page, both runs."""
    blocks: float
    """Blocks allocated, written or hinted, both runs."""
    steps: float
    """Simulation steps, both runs."""
    history_steps: float
    """Of those, the steps of the ``[[history]]`` (the guest alone, before migrating)."""
    paged: float
    """Pages kept page by page in a run (blocks written page by page, pages in no block)."""
    simulated_seconds: float
    """The longer run's simulated time."""

    @property
    def seconds(self) -> float:
        """Wall seconds for both runs, at the costs measured here."""
        return (
            self.pages_sent * SEND_SECONDS
            + self.pages_written * WRITE_SECONDS
            + self.blocks * BLOCK_SECONDS
            + (self.steps - self.history_steps) * STEP_SECONDS
            + self.history_steps * HISTORY_STEP_SECONDS
            + 2 * (RUN_SECONDS + self.paged * PAGED_SECONDS)
        )

    def refusal(self, limits: MachineLimits) -> str | None:
        """Why the run should not start on a machine with ``limits``, with the figure and the
        limit, in one line; None if it fits."""
        # Written so that a figure that is not a number (inf * 0) is refused too.
        if limits.memory is not None and not self.memory <= limits.memory:
            step = (
                f", {self.step_pages:.3g} pages written in one step"
                if self.step_pages * _INDEX_BYTES > self.memory / 2
                else ""
            )
            return (
                f"the run would need about {_bytes(self.memory)} of memory{step}; "
                f"this machine has {_bytes(limits.memory)} ({limits.memory_source})"
            )
        if not self.address_space <= limits.address_space:
            return (
                f"the run would map about {_bytes(self.address_space)}; this machine allows "
                f"{_bytes(limits.address_space)} ({limits.address_space_source})"
            )
        if not self.seconds <= limits.seconds:
            return (
                f"the runs would take about {_duration(self.seconds)} "
                f"({self.pages_sent:.3g} pages sent, {self.pages_written:.3g} written, "
                f"{self.steps:.3g} steps, {self.simulated_seconds:.3g} s simulated); the limit is "
                f"{_duration(limits.seconds)}"
            )
        return None


@dataclass(frozen=True)
class _Rates:
    page_writes: float = 0.0
    """Pages written page by page per simulated second."""
    block_writes: float = 0.0
    """Blocks written per simulated second."""
    footprint: float = 0.0
    """The most distinct pages it dirties."""
    once: float = 0.0
    """Pages it writes once, at its first step."""
    step_bytes: float = 0.0
    """Bytes of arrays it makes in every step."""
    kept_bytes: float = 0.0
    """Bytes of arrays it keeps."""
    step_pages: float = 0.0
    """Pages it writes at every step, whatever the step's length."""
    paged: float = 0.0
    """Pages of the blocks it writes page by page (kept page by page from then on)."""


def _rates(
    w: Workload, *, npages: int, ppb: int, page: int, block: int, kernel_pages: int
) -> _Rates:
    if isinstance(w, Idle):
        paged = kernel_pages if w.pages_per_s > 0 else 0.0
        return _Rates(w.pages_per_s, 0.0, kernel_pages, paged=paged)
    if isinstance(w, SteadyWriter):
        ws = min(npages, math.ceil(w.working_set_bytes / block) * ppb)
        paged = ws if w.pages_per_s > 0 else 0.0
        return _Rates(w.pages_per_s, 0.0, ws, once=ws, kept_bytes=8.0 * ws / ppb, paged=paged)
    if isinstance(w, UsedWriter):
        blocks = npages // ppb
        return _Rates(
            w.pages_per_s,
            0.0,
            npages,
            step_bytes=8.0 * blocks,
            step_pages=min(w.kernel_pages, kernel_pages),
            paged=npages,
        )
    if isinstance(w, KernelCompile):
        rate = (w.alloc_bytes_per_s + w.cache_bytes_per_s) / block
        return _Rates(0.0, rate, npages)
    if isinstance(w, MemoryHog):
        size = min(npages, math.ceil(w.nbytes / block) * ppb)
        if w.bytes_per_s is None:
            return _Rates(footprint=size, once=size)
        return _Rates(0.0, w.bytes_per_s / block, size)
    if isinstance(w, WriteFree):
        size = min(npages, math.ceil(w.write_bytes / block) * ppb)
        return _Rates(footprint=size, once=size)
    raise TypeError(f"no estimate for {type(w).__name__}")


def estimate_run(s: Scenario) -> RunEstimate:
    """The cost of ``pagehint simulate``'s two runs of ``s`` (see the module's doc)."""
    page = s.page_size
    block = HINT_BLOCK_BYTES[page] if s.block_bytes is None else s.block_bytes
    ppb = block // page
    regions = ram_regions(s.layout, s.memory, s.below_4g)
    npages = s.memory // page
    nblocks = whole_blocks(regions, block)
    boot = max(1, round(s.used * nblocks))
    kernel_pages = boot * ppb
    free_pages = (nblocks - boot) * ppb
    wire, link, pc = s.link.wire, s.link, s.precopy
    t_page = max((page + wire.page_header_bytes) / link.bandwidth, page / link.scan_rate)
    batch_seconds = pc.batch_pages * t_page + wire.batch_header_bytes / link.bandwidth
    longest_step = max(link.setup_time, link.startup_wait + batch_seconds)
    downtime_pages = link.bandwidth * pc.max_downtime / (page + wire.page_header_bytes)
    r = _rates(
        s.workload.build(), npages=npages, ppb=ppb, page=page, block=block,
        kernel_pages=kernel_pages,
    )  # fmt: skip
    dirty_rate = r.page_writes + r.block_writes * ppb
    steps_per_s = 1.0 / batch_seconds
    page_writes = r.page_writes + r.step_pages * steps_per_s

    # The [[history]]: a memory hog with a rate runs one step per simulated second.
    history_steps = 0.0
    history_bytes = 0.0
    for spec in s.history:
        h = spec.build()
        if isinstance(h, MemoryHog) and h.bytes_per_s is not None:
            history_steps += math.ceil(h.nbytes / h.bytes_per_s)
        if isinstance(h, SteadyWriter):
            history_bytes = max(history_bytes, 8.0 * min(npages, h.working_set_bytes / block))

    cap = min(npages, r.footprint)
    ratio = dirty_rate * t_page  # pages dirtied per page sent
    sent = writes = blocks = steps = 0.0
    longest = 0.0
    for hints in (False, True):
        extra = r.once + (free_pages if hints and s.init_on_alloc else 0)
        last = float(npages)  # round 0 sends every page
        run_sent, rounds, k = last, 1, 1
        while k <= pc.max_rounds:
            size = min(npages, min(cap, ratio * last) + (extra if k == 1 else 0))
            run_sent += size
            rounds += 1
            if size <= downtime_pages:
                last = size
                break
            if (k >= 2 and size == last) or k >= _MAX_ITERATIONS:
                # Each round from here on is at most this one.
                more = pc.max_rounds - k
                run_sent += size * more
                rounds += more
                last = size
                break
            last = size
            k += 1
        run_sent += min(cap, ratio * last)  # stop and copy
        simulated = link.setup_time + link.startup_wait + link.switchover_time + run_sent * t_page
        longest = max(longest, simulated)
        sent += run_sent
        writes += page_writes * simulated
        blocks += r.block_writes * simulated + (nblocks * rounds if hints else 0) + nblocks
        steps += run_sent / pc.batch_pages + rounds + history_steps

    step_pages = page_writes * longest_step + r.step_pages
    # Kept page by page: the blocks written so, the boot blocks partly written, no block's.
    partly = kernel_pages if s.used_data < 1.0 else 0
    paged = min(npages, r.paged + partly + npages - nblocks * ppb)
    memory = (
        _RUN_BYTES
        + _PAGE_BYTES * npages
        + _PAGED_BYTES * paged
        + _BLOCK_BYTES * nblocks
        + _ORACLE_BYTES * min(paged, 2 * _ORACLE_CHUNK)
        + _INDEX_BYTES * min(pc.batch_pages, npages)
        + _INDEX_BYTES * step_pages
        + r.step_bytes
        + r.kept_bytes
        + history_bytes
    )
    return RunEstimate(
        memory=memory,
        address_space=s.memory + 8.0 * npages + memory,
        step_pages=step_pages,
        pages_sent=sent,
        pages_written=writes,
        blocks=blocks,
        steps=steps,
        history_steps=2 * history_steps,
        paged=paged,
        simulated_seconds=longest,
    )
