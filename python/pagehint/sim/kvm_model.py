"""The simulator's model of a ``pagehint migrate-kvm`` run: pagehint's KVM test guest
(``pagehint.kvm``, ``kvm/guest/guest.c``) as a ``Scenario``, and its predicted migration.

The KVM guest has RAM in two memslots of ``memory / 2`` at 0 and 4 GiB, a kernel in its first
4 MiB block (mostly zero pages: page tables, its code, its state), and a 4 MiB block allocator
that hands out the lowest free block first. Before migrating it writes ``write_blocks`` blocks
and frees the last ``free_blocks`` of them again (LIFO); while migrating it runs by itself,
each step rewriting ``pages_per_step`` uniformly random pages of its used blocks (not the
kernel's) and their version words in its kernel block, and polling the balloon (a hinting
round hints every free block). The migration is ``Precopy`` on a link paced to
``bandwidth``, in batches of ``batch_pages``. ``kvm_scenario`` says all that as a scenario
(``scenario_to_toml`` writes it as a file ``pagehint simulate FILE`` runs);
``predict_kvm_run`` runs it with hints off and on.

What only the machine knows is how fast things ran, and the model takes three such figures,
best measured on the run being predicted, since on a nested KVM shared with other work they
vary from run to run:

- the guest's steps per second (``step_rate``), which decide how many pages it dirties while
  it migrates; ``estimated_step_rate`` gives a typical figure;
- the sender's rate, if it could not keep the link's pacing (``measured_sender_rate``): the
  real sender is Python feeding a destination process over a socket, on CPUs it shares with
  the vCPU thread;
- how long the sender waited for the destination process to start reading the stream
  (``SendTimeline.startup_wait``): ``migrate-kvm`` starts the migration as soon as it has
  started the process, which then needs some 0.2-0.6 s (Python, imports, its VM) before it
  reads; once the socket's buffer is full the sender waits, the guest runs and dirties
  meanwhile, and all of that is sent again.

``hint_rate`` (blocks a hinting round puts in the ring per second: a VM exit per block) and
``scan_rate`` (how fast the sender reads pages, which is what zero pages cost) were measured
on the machine this was written on; they move the times more than the bytes. Not modelled:
the switchover after stop-and-copy (``migrate-kvm``'s downtime includes sending the device
state and resuming on the destination), and a sender faster once the guest is paused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagehint.migration import LogMode, MigrationResult, PrecopyConfig, Progress, WireFormat
from pagehint.migration.precopy import Strategy
from pagehint.migration.stream import STREAM_WIRE
from pagehint.sim.link import LinkModel
from pagehint.sim.scenario import Scenario, WorkloadSpec, run_scenario

__all__ = [
    "HINT_RATE",
    "PAGE_WRITE_SECONDS",
    "SCAN_RATE",
    "SOCKET_BUFFER",
    "STEP_SECONDS",
    "Comparison",
    "KvmPrediction",
    "KvmRunParams",
    "SendTimeline",
    "compare",
    "estimated_step_rate",
    "kvm_scenario",
    "measured_sender_rate",
    "predict_kvm_run",
    "simulate_kvm_run",
    "step_rate",
]

PAGE = 4096
HINT_RATE = 9000.0
"""Blocks per second the test guest hints (a poll of the interrupt status, a VM exit, per
block; 53 blocks in about 6 ms on a nested KVM at ~1.5 M guest instructions/s)."""
SCAN_RATE = 1.5e9
"""Bytes per second the wall-clock sender gets through zero pages (reads them, finds them
zero, sends their 8-byte headers): a batch of 256 in about 0.6 ms on the same machine. (In
stop-and-copy, with data pages filling the socket between them, 13,312 took 75-140 ms.)"""
STEP_SECONDS = 0.4e-3
"""A step's cost besides its page writes: two VM exits (the balloon's interrupt status, the
checkpoint) handled in Python."""
PAGE_WRITE_SECONDS = 0.052e-3
"""A page write's cost in the guest (finding the page, two stores, its version): about 80
instructions at ~1.5 M guest instructions/s."""
SOCKET_BUFFER = 212992
"""Bytes a Unix stream socket buffers before its reader reads: Linux's default
``net.core.wmem_default``, which the stream's socket pair keeps."""
_KERNEL_FIXED_DATA_PAGES = 16
"""Pages of the test guest's kernel block holding data besides its page versions: page
tables, boot info, stack, code and data, its block arrays and its ring."""
_KERNEL_FIXED_STEP_PAGES = 3
"""Pages of the kernel block a step writes besides the version words of the used blocks:
the stack, the program's data, and one more version page where the used blocks' versions
straddle a page boundary."""


@dataclass(frozen=True)
class KvmRunParams:
    """What a ``pagehint migrate-kvm`` run was (its options, the test guest's layout) and how
    fast its guest ran. Defaults: the command's."""

    memory: int = 256 << 20
    """Guest RAM, in two memslots of half each, at 0 and 4 GiB."""
    block_bytes: int = 4 << 20
    kernel_bytes: int = 4 << 20
    """RAM the guest's kernel keeps from gpa 0 (its first block)."""
    write_blocks: int = 50
    free_blocks: int = 40
    pages_per_step: int = 32
    step_rate: float | None = None
    """Steps per second the guest ran while migrating (measure it: ``step_rate``); None to
    estimate it from ``pages_per_step`` (``estimated_step_rate``)."""
    bandwidth: float = float(512 << 20)
    """The link's pacing, bytes per second."""
    sender_rate: float | None = None
    """Stream bytes per second the real sender moved while the guest ran, if it could not
    keep the pacing (measure it: ``measured_sender_rate``); the simulated link goes at the
    lower of the two. None: it kept the pace."""
    startup_wait: float = 0.0
    """Seconds the sender waited for the destination process to start reading, the guest
    running (measure it: ``SendTimeline.startup_wait``)."""
    startup_buffer: int = SOCKET_BUFFER
    """Stream bytes that went before the wait (the socket's send buffer)."""
    max_downtime: float = 0.3
    log_mode: LogMode = "manual"
    strategy: Strategy = "safe"
    batch_pages: int = 256
    wire: WireFormat = STREAM_WIRE
    """What a batch costs on the wire: the socket stream's (``pagehint.migration.stream``)."""
    hint_rate: float = HINT_RATE
    scan_rate: float = SCAN_RATE
    kernel_data_pages: int | None = None
    """Pages of the kernel's blocks holding data when the migration starts; None to estimate
    (the test guest's fixed pages plus the page versions of the blocks it wrote)."""
    step_kernel_pages: int | None = None
    """Kernel pages each step rewrites (page versions, stack); None to estimate."""
    seed: int = 1

    def __post_init__(self) -> None:
        b = self.block_bytes
        if b < PAGE or b & (b - 1):
            raise ValueError(f"block_bytes must be a power of two of at least {PAGE}, not {b}")
        if self.memory <= 0 or self.memory % (2 * b):
            raise ValueError(f"memory must be a positive multiple of 2 blocks, not {self.memory}")
        if not 0 < self.kernel_bytes <= self.memory // 2:
            raise ValueError("the kernel must fit in the first memslot")
        if self.write_blocks < 0 or not 0 <= self.free_blocks <= self.write_blocks:
            raise ValueError("need 0 <= free_blocks <= write_blocks")
        if self.pages_per_step < 0 or (self.step_rate is not None and not self.step_rate >= 0):
            raise ValueError("pages_per_step and step_rate must not be negative")
        for name in ("bandwidth", "hint_rate", "scan_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.sender_rate is not None and not self.sender_rate > 0:
            raise ValueError(f"sender_rate must be positive or None, not {self.sender_rate}")
        if not self.startup_wait >= 0 or self.startup_buffer < 0:
            raise ValueError("startup_wait and startup_buffer must not be negative")

    @property
    def pages_per_block(self) -> int:
        return self.block_bytes // PAGE

    @property
    def kernel_blocks(self) -> int:
        return -(-self.kernel_bytes // self.block_bytes)

    @property
    def blocks(self) -> int:
        return self.memory // self.block_bytes

    @property
    def written_blocks(self) -> int:
        """Blocks the guest could write (all it asked for, if memory allows)."""
        return min(self.write_blocks, self.blocks - self.kernel_blocks)

    @property
    def used_blocks(self) -> int:
        """Blocks in use outside the kernel's when the migration starts."""
        return self.written_blocks - min(self.free_blocks, self.written_blocks)

    def timing(self) -> dict[str, float | None]:
        """The machine's figures the prediction used (JSON names; steps/s, bytes/s, ms)."""
        return {
            "step-rate": self.steps_per_s,
            "sender-rate": self.sender_rate,
            "startup-wait": self.startup_wait * 1000,  # ms, as every JSON time
        }

    @property
    def link_rate(self) -> float:
        """What the simulated link carries per second: the pacing, or the sender's rate if
        lower."""
        if self.sender_rate is None:
            return self.bandwidth
        return min(self.bandwidth, self.sender_rate)

    @property
    def steps_per_s(self) -> float:
        """``step_rate``, or ``estimated_step_rate(pages_per_step)``."""
        if self.step_rate is not None:
            return self.step_rate
        return estimated_step_rate(self.pages_per_step)

    def _version_pages(self, blocks: int) -> int:
        # The guest keeps a 4-byte version per page, in its kernel block.
        return math.ceil(blocks * self.pages_per_block * 4 / PAGE)

    def estimated_kernel_data_pages(self) -> int:
        """``kernel_data_pages``, or the test guest's fixed pages plus the page versions of
        the blocks it wrote (66 pages for the defaults; 66 measured)."""
        if self.kernel_data_pages is not None:
            return self.kernel_data_pages
        return _KERNEL_FIXED_DATA_PAGES + self._version_pages(self.written_blocks)

    def estimated_step_kernel_pages(self) -> int:
        """``step_kernel_pages``, or the page versions of the used blocks plus the stack and
        the program's data (13 pages for the defaults; 13 measured)."""
        if self.step_kernel_pages is not None:
            return self.step_kernel_pages
        if not self.used_blocks:
            return 0
        return _KERNEL_FIXED_STEP_PAGES + self._version_pages(self.used_blocks)


def estimated_step_rate(pages_per_step: int) -> float:
    """The test guest's steps per second, from its cost per step and per page written
    (``STEP_SECONDS``, ``PAGE_WRITE_SECONDS``, measured on the machine this was written on:
    about 480 steps/s at 32 pages a step; runs there varied from 230 to 620). A measured rate
    predicts better."""
    return 1.0 / (STEP_SECONDS + PAGE_WRITE_SECONDS * pages_per_step)


def step_rate(steps: int, result: MigrationResult) -> float:
    """The guest's steps per second during a migration: ``steps`` (``KvmRun.steps``: its
    run's steps, the one its copy finishes included) over the time it ran, from the
    migration's start to its last sync before stop-and-copy (the start of the last round;
    the pause follows within a step). It counts the step or two the guest runs between
    ``run`` and the migration's start as if they were in it: a little high, for a short
    run."""
    running = result.rounds[-1].start if result.rounds else result.total_time
    return steps / running if running > 0 else 0.0


class SendTimeline:
    """A ``Precopy`` progress callback (``migrate_once(..., progress=timeline)``) that
    records when each send step ended, and passes each ``Progress`` on to ``chain``."""

    def __init__(self, chain: Callable[[Progress], None] | None = None) -> None:
        self.chain = chain
        self.times: list[float] = []

    def __call__(self, progress: Progress) -> None:
        self.times.append(progress.time)
        if self.chain is not None:
            self.chain(progress)

    def startup_wait(self, within: int = 32) -> float:
        """How long the sender stalled early on beyond a usual step: the longest of the first
        ``within`` gaps between send steps less the median gap (the destination process
        starting up while the socket's buffer is full)."""
        if len(self.times) < 3:
            return 0.0
        gaps = sorted(b - a for a, b in itertools.pairwise(self.times))
        early = [b - a for a, b in itertools.pairwise(self.times[: within + 1])]
        return max(0.0, max(early) - gaps[len(gaps) // 2])


def measured_sender_rate(result: MigrationResult, startup_wait: float = 0.0) -> float | None:
    """Stream bytes per second the sender moved in the first round (the guest running),
    without its ``startup_wait``: the pacing, or less if the sender could not keep it. None
    if the run has no such round."""
    if not result.rounds:
        return None
    r = result.rounds[0]
    sending = r.duration - startup_wait
    return r.transferred / sending if sending > 0 and r.transferred > 0 else None


def kvm_scenario(p: KvmRunParams) -> Scenario:
    """The run as a simulator scenario (hints are ``run_scenario``'s to set)."""
    kernel_pages = p.kernel_blocks * p.pages_per_block
    data = min(p.estimated_kernel_data_pages(), kernel_pages)
    return Scenario(
        name="migrate-kvm",
        description=(
            f"pagehint migrate-kvm's guest: {p.memory >> 20} MiB in two memslots, "
            f"{p.write_blocks} blocks written, {p.free_blocks} freed, "
            f"{p.pages_per_step} pages a step at {p.steps_per_s:.0f} steps/s, "
            f"{p.link_rate / (1 << 20):.0f} MiB/s link, {p.log_mode} log, {p.strategy} strategy"
        ),
        memory=p.memory,
        layout="x86",
        below_4g=p.memory // 2,
        block_bytes=p.block_bytes,
        used=p.kernel_blocks / p.blocks,
        used_data=data / kernel_pages,
        free_order="address",
        init_on_alloc=False,
        poison=None,
        log_mode=p.log_mode,
        seed=p.seed,
        hint_rate=p.hint_rate,
        history=(
            WorkloadSpec(
                "write-free",
                {
                    "write": p.write_blocks * p.block_bytes,
                    "free": p.free_blocks * p.block_bytes,
                },
            ),
        ),
        workload=WorkloadSpec(
            "used-writer",
            {
                "pages_per_s": p.steps_per_s * p.pages_per_step,
                "kernel_pages": p.estimated_step_kernel_pages(),
            },
        ),
        precopy=PrecopyConfig(
            max_downtime=p.max_downtime, strategy=p.strategy, batch_pages=p.batch_pages
        ),
        link=LinkModel(
            bandwidth=p.link_rate,
            scan_rate=p.scan_rate,
            wire=p.wire,
            startup_wait=p.startup_wait,
            startup_buffer=p.startup_buffer,
        ),
    )


@dataclass(frozen=True)
class Comparison:
    """A measured figure against its prediction."""

    figure: str
    hints: bool
    measured: float
    predicted: float

    @property
    def difference(self) -> float:
        """(predicted - measured) / measured; 0 if both are 0, inf if only measured is."""
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else math.inf
        return (self.predicted - self.measured) / self.measured

    def to_dict(self) -> dict[str, Any]:
        """JSON: times in ms (as QMP gives them); an infinite difference is null."""
        scale = 1000.0 if self.figure in _TIMES else 1.0
        difference = self.difference
        return {
            "figure": self.figure,
            "hints": self.hints,
            "measured": self.measured * scale,
            "predicted": self.predicted * scale,
            "difference": None if math.isinf(difference) else difference,
        }


_TIMES = ("total_time", "downtime")


_FIGURES = ("transferred", "pages_skipped", "total_time", "downtime", "dirty_sync_count")


def compare(
    measured_off: MigrationResult, measured_on: MigrationResult, prediction: KvmPrediction
) -> list[Comparison]:
    """Each figure of ``_FIGURES`` measured against predicted, hints off then on."""
    rows: list[Comparison] = []
    for hints, measured, predicted in (
        (False, measured_off, prediction.off),
        (True, measured_on, prediction.on),
    ):
        rows.extend(
            Comparison(name, hints, float(getattr(measured, name)), float(getattr(predicted, name)))
            for name in _FIGURES
        )
    return rows


@dataclass(frozen=True)
class KvmPrediction:
    """The simulator's migrations of the runs, hints off and on (each from its own
    parameters: the runs' guests may have run at different rates)."""

    params_off: KvmRunParams
    params_on: KvmRunParams
    off: MigrationResult
    on: MigrationResult

    def to_dict(self) -> dict[str, Any]:
        """The predicted figures (QMP names, as ``MigrationResult.to_dict``) and the
        machine's figures they assumed."""
        return {
            "params": {
                "hints-off": self.params_off.timing(),
                "hints-on": self.params_on.timing(),
            },
            "hints-off": self.off.to_dict(),
            "hints-on": self.on.to_dict(),
        }


def simulate_kvm_run(p: KvmRunParams, *, hints: bool) -> MigrationResult:
    """The run's migration in the simulator (about 0.05 s for the defaults)."""
    return run_scenario(kvm_scenario(p), hints=hints)


def predict_kvm_run(off: KvmRunParams, on: KvmRunParams | None = None) -> KvmPrediction:
    """Predicts a ``migrate-kvm`` run: the migration with hints off from ``off``, with hints
    on from ``on`` (``off``'s if None; typically they differ only in the step rate measured on
    each run)."""
    on = off if on is None else on
    return KvmPrediction(
        off, on, simulate_kvm_run(off, hints=False), simulate_kvm_run(on, hints=True)
    )
