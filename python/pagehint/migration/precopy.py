"""Pre-copy live migration with free page hinting, over any ``MigrationSource`` and ``Link``.

``Precopy`` is the policy of QEMU's ``migration/migration.c`` and ``migration/ram.c``; its
methods are named after the functions they model. The bitmap starts all dirty
(``ram_save_setup``); every sync is {``stop_hinting()``, merge the dirty log,
``start_hinting()`` while the guest runs} (``migration_bitmap_sync_precopy`` with the free
page hint notifiers); ``ram_save_iterate`` takes dirty pages in batches for one rate-limit
window while the guest keeps writing and hints keep clearing the bitmap; when the remaining
pages would fit the maximum downtime at the bandwidth measured over the last window, it syncs
(``migration_iteration_run``), and completes if they still fit or when the round limit is hit:
the guest is paused, a last sync runs, the device gets DONE, and the rest is sent
(``migration_completion``). Cancel or failure also sends DONE. Zero pages cost a header only
(QEMU's "duplicate").

Time and the wire belong to the ``Link`` (``pagehint.migration.link``): the simulator's link
advances the simulated guest while a batch is on the wire; the wall-clock link lets a real
guest run by itself and paces to a bandwidth limit. Hinting strategies with a manual-protect
dirty log:

- ``safe`` (default): right after each sync every reported page is write-protected again
  (``clear_dirty_log`` of all memory) before the hint window opens, so a write after the guest
  reuses a hinted page is always logged; applying a hint touches only the migration bitmap.
- ``qemu``: the log is cleared lazily, per 1 GiB chunk before its pages are sent, and for the
  chunks a hint touches when it is applied (QEMU since 2021): a block the shrinker gave back and
  the guest wrote before the hint was applied is lost.

With the classic log (get clears and re-protects) both are the same and safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.device import FreePageHintDevice
from pagehint.migration.link import Link
from pagehint.migration.result import MigrationResult, Progress, RoundStats, Status
from pagehint.migration.runs import PageRuns, expand_runs

LogMode = Literal["classic", "manual", "ring"]
Strategy = Literal["safe", "qemu"]

_I64Array = npt.NDArray[np.int64]
_U64Array = npt.NDArray[np.uint64]


class MigrationSource(Protocol):
    """A running guest as the migration loop sees it. It runs by itself (a vCPU thread) or
    as its ``Link`` advances it (the simulator)."""

    @property
    def memmap(self) -> _core.MemoryMap:
        """Guest RAM layout: the bitmap has one bit per page of it."""

    @property
    def log_mode(self) -> LogMode:
        """``classic`` (getting the log clears it), ``manual`` (KVM_CLEAR_DIRTY_LOG), or
        ``ring`` (harvesting the dirty rings resets them: for the loop, as ``classic``)."""

    @property
    def device(self) -> FreePageHintDevice | None:
        """The free page hinting device, if the guest has one."""

    def get_dirty_log(self) -> _U64Array:
        """KVM_GET_DIRTY_LOG over all of RAM, as ``uint64`` words."""

    def clear_dirty_log(self, first_page: int, num_pages: int) -> int:
        """KVM_CLEAR_DIRTY_LOG (manual mode): clears and write-protects the pages."""

    def pause(self) -> None:
        """Stops the guest's vCPUs (stop-and-copy)."""

    def resume(self) -> None:
        """Lets the guest run again (after a cancel or failure)."""

    def read_pages(self, runs: PageRuns) -> tuple[Any, int]:
        """What sending the pages of ``runs`` carries (for the destination, which knows its
        source's kind) and how many of them are all zero."""


class MigrationDestination(Protocol):
    """Where pages go."""

    def receive(self, runs: PageRuns, payload: Any) -> None:
        """The pages of ``runs`` arrive with ``payload`` (from ``read_pages``); one call is
        one batch on the wire."""


@dataclass(frozen=True)
class PrecopyConfig:
    """Limits and policy (what the link costs is the ``Link``'s). Defaults: QEMU's 300 ms
    maximum downtime, 30 rounds at most, QEMU's 100 ms rate-limit window and 1 GiB dirty-log
    clear chunks."""

    max_downtime: float = 0.3
    """Seconds the guest may be paused for the last copy."""
    max_rounds: int = 30
    """Rounds (syncs after the set-up one) after which completion is forced, converged or
    not; the final sync in stop-and-copy comes on top."""
    iteration_time: float = 0.1
    """How often convergence is checked while sending (QEMU's BUFFER_DELAY)."""
    batch_pages: int = 32768
    """Pages taken per send step (the simulator's time resolution)."""
    clear_chunk_pages: int = 1 << 18
    """Pages per lazily cleared dirty-log chunk (QEMU's clear_bmap_shift of 18)."""
    hints: bool = True
    """Use free page hinting when the source's device negotiated it."""
    strategy: Strategy = "safe"
    postcopy: bool = False
    """Postcopy possible: then QEMU does not hint, and neither does this."""

    def __post_init__(self) -> None:
        if not self.iteration_time > 0:
            raise ValueError(f"iteration_time must be positive, not {self.iteration_time}")
        if self.max_downtime < 0:
            raise ValueError(f"max_downtime must not be negative, not {self.max_downtime}")
        if self.max_rounds < 1 or self.batch_pages < 1:
            raise ValueError("max_rounds and batch_pages must be at least 1")
        if self.clear_chunk_pages < 64 or self.clear_chunk_pages % 64:
            raise ValueError(
                f"clear_chunk_pages must be a multiple of 64, not {self.clear_chunk_pages}"
            )
        if self.strategy not in ("safe", "qemu"):
            raise ValueError(f"strategy must be 'safe' or 'qemu', not {self.strategy!r}")


class MigrationCancelled(Exception):
    """``Precopy.cancel()`` was called."""


@dataclass
class _Sent:
    """Pages and stream bytes sent (QEMU's ram counters)."""

    normal: int = 0
    duplicate: int = 0
    bytes: int = 0

    def add(self, normal: int, duplicate: int, nbytes: int) -> None:
        self.normal += normal
        self.duplicate += duplicate
        self.bytes += nbytes


@dataclass(frozen=True)
class _HintTotals:
    """The device's running totals, to tell a round's share."""

    hinted: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class _RoundStart:
    time: float = 0.0
    dirty: int = 0
    new_dirty: int = 0


@dataclass(frozen=True)
class _Window:
    """A rate-limit window's start: its time and the bytes sent by then."""

    time: float = 0.0
    bytes: int = 0


class Precopy:
    """One pre-copy migration of ``source`` to ``destination`` over ``link`` (``run()``
    once).

    ``lost_pages`` is an optional oracle (the simulated source's) asked at completion.
    ``progress`` is called after every send step. ``cancel()`` may be called from another
    thread (or from ``progress``): the run ends as QMP's ``migrate_cancel`` does, sending DONE.
    """

    def __init__(
        self,
        source: MigrationSource,
        destination: MigrationDestination,
        link: Link,
        config: PrecopyConfig | None = None,
        *,
        progress: Callable[[Progress], None] | None = None,
        lost_pages: Callable[[], int] | None = None,
    ) -> None:
        self.source = source
        self.destination = destination
        self.link = link
        self.config = config or PrecopyConfig()
        self._progress = progress
        self._lost_pages = lost_pages
        self._cancel = threading.Event()
        memmap = source.memmap
        self.npages = memmap.npages
        self.page_size = memmap.page_size
        self.bitmap = _core.DirtyBitmap(self.npages, dirty=True)
        # QEMU's migration_dirty_pages: the bitmap's count, kept as merges add pages, sends
        # take them and hints clear them (the device's total since it was bound), rather
        # than a pass over the bitmap at every check.
        self._dirty_pages = self.npages
        self._cleared_at_bind = 0
        dev = source.device
        cfg = self.config
        hinting = cfg.hints and not cfg.postcopy and dev is not None and dev.hinting
        self.device = dev if hinting else None
        manual = source.log_mode == "manual"
        # Lazy per-chunk clearing of a manual log: QEMU always; 'safe' re-protects everything
        # at each sync instead once hints are on.
        self._lazy_clear = manual and not (self.device is not None and cfg.strategy == "safe")
        nchunks = -(-self.npages // cfg.clear_chunk_pages)
        self._clear_bmap = np.zeros(nchunks, dtype=np.bool_)
        # The device may apply hints (and call _on_hints) on its own thread.
        self._clear_lock = threading.Lock()
        self._cursor = 0
        self._syncs = 0
        self._sent = _Sent()
        self._round_sent = _Sent()
        self._rounds: list[RoundStats] = []
        self._round_start = _RoundStart()
        self._hint_base = _HintTotals()
        self._window = _Window()

    def cancel(self) -> None:
        """Ends the migration at the next step (thread safe)."""
        self._cancel.set()

    # -- the bitmap and the dirty log -------------------------------------------------------

    def _hint_totals(self) -> _HintTotals:
        d = self.device
        return (
            _HintTotals() if d is None else _HintTotals(d.pages_hinted_total, d.pages_cleared_total)
        )

    def _migration_bitmap_sync(self, *, running: bool) -> int:
        """migration_bitmap_sync_precopy with the free page hint notifiers around it: returns
        the pages the log found newly dirty."""
        src, dev = self.source, self.device
        if dev is not None:
            dev.stop_hinting()
        new = self.bitmap.merge_log(src.get_dirty_log())
        self._dirty_pages += new
        self._syncs += 1
        if src.log_mode == "manual":
            if self._lazy_clear:
                with self._clear_lock:
                    self._clear_bmap[:] = True
            else:
                src.clear_dirty_log(0, self.npages)
        if dev is not None:
            if running:
                dev.start_hinting()
            else:
                dev.finish()
        return new

    def _dirty_count(self) -> int:
        """Pages dirty in the bitmap now (what ``bitmap.count()`` would say)."""
        d = self.device
        cleared = 0 if d is None else d.pages_cleared_total - self._cleared_at_bind
        return self._dirty_pages - cleared

    def _clear_chunks(self, chunks: _I64Array) -> None:
        """migration_clear_memory_region_dirty_bitmap: clears the manual dirty log of
        ``chunks`` still to be cleared since the sync."""
        size = self.config.clear_chunk_pages
        with self._clear_lock:
            chunks = chunks[self._clear_bmap[chunks]]
            self._clear_bmap[chunks] = False
            for c in chunks.tolist():
                first = c * size
                self.source.clear_dirty_log(first, min(size, self.npages - first))

    def _on_hints(self, ranges: _U64Array) -> None:
        """qemu strategy: qemu_guest_free_page_hint clears the log of every chunk a hint
        touches."""
        if len(ranges):
            chunk = self.config.clear_chunk_pages
            first = ranges[:, 0].astype(np.int64)
            last = first + ranges[:, 1].astype(np.int64) - 1
            chunks = np.unique(np.concatenate([first // chunk, last // chunk]))
            self._clear_chunks(chunks)

    # -- sending ---------------------------------------------------------------------------

    def _ram_save_host_pages(self, max_pages: int, *, running: bool) -> int:
        """ram_find_and_save_block over a batch: takes up to ``max_pages`` dirty pages from
        the cursor and sends them; returns the stream bytes."""
        starts, counts = self.bitmap.take_dirty_runs(max_pages, self._cursor)
        taken = int(counts.sum())
        if taken < max_pages:
            # Wrap around: the rest of the pass starts again from page 0.
            more_starts, more_counts = self.bitmap.take_dirty_runs(max_pages - taken, 0)
            starts = np.concatenate([starts, more_starts])
            counts = np.concatenate([counts, more_counts])
        if not len(starts):
            # The bitmap is empty, so the kept count is 0: say so, rather than let a count
            # read while a device thread was between its clear and its total (or any drift)
            # keep the loop iterating over nothing.
            self._dirty_pages -= self._dirty_count()
            return 0
        runs = PageRuns(starts.astype(np.int64), counts.astype(np.int64))
        self._dirty_pages -= runs.pages
        last = runs.last()
        self._cursor = last + 1 if last + 1 < self.npages else 0
        if self._lazy_clear:
            size = self.config.clear_chunk_pages
            first = runs.starts // size
            self._clear_chunks(
                np.unique(expand_runs(first, (runs.starts + runs.counts - 1) // size - first + 1))
            )
        payload, nzero = self.source.read_pages(runs)
        self.destination.receive(runs, payload)
        normal = runs.pages - nzero
        nbytes = self.link.wire.stream_bytes(normal, nzero, self.page_size)
        self._sent.add(normal, nzero, nbytes)
        self._round_sent.add(normal, nzero, nbytes)
        self.link.transmit(nbytes, runs.pages * self.page_size, running=running)
        return nbytes

    def _ram_save_iterate(self) -> None:
        """One rate-limit window: its bytes or its time (QEMU also leaves ram_save_iterate
        after 50 ms), or until the bitmap is empty."""
        link, cfg = self.link, self.config
        self._window = _Window(link.now(), self._sent.bytes)
        budget = link.window_budget(cfg.iteration_time)
        until = link.now() + cfg.iteration_time
        sent = 0
        while sent < budget and link.now() < until:
            step = self._ram_save_host_pages(cfg.batch_pages, running=True)
            if step == 0:
                break
            sent += step
            self._report()
            if self._cancel.is_set():
                raise MigrationCancelled

    def _threshold_size(self) -> float:
        """migration_update_counters: the bandwidth measured over the last window times the
        downtime limit; nothing is measured before the first window, so no early
        switchover."""
        window, now = self._window, self.link.now()
        measured = (
            (self._sent.bytes - window.bytes) / (now - window.time) if now > window.time else 0.0
        )
        return measured * self.config.max_downtime

    def _migration_iteration_run(self) -> bool:
        """Whether to go on iterating: syncs when what is pending fits the threshold, and
        stops once it still fits after the sync or the round limit is hit."""
        if self._cancel.is_set():
            raise MigrationCancelled
        threshold = self._threshold_size()
        pending = self._dirty_count() * self.page_size
        if pending <= threshold or pending == 0:
            self._end_round(self._migration_bitmap_sync(running=True))
            pending = self._dirty_count() * self.page_size
            if pending <= threshold or self._syncs > self.config.max_rounds:
                return False
        self._ram_save_iterate()
        return True

    def _migration_completion(self) -> float:
        """Stop and copy: pause, last sync (DONE), send the rest; returns the downtime."""
        self.source.pause()
        paused_at = self.link.now()
        if self.device is not None:
            self.device.stop_hinting()
        self._migration_bitmap_sync(running=False)
        while self._ram_save_host_pages(self.config.batch_pages, running=False):
            self._report()
        self.link.switchover()
        downtime = self.link.now() - paused_at
        self._end_round(0)
        return downtime

    # -- bookkeeping -------------------------------------------------------------------------

    def _end_round(self, new_dirty: int) -> None:
        start, now = self._round_start, self.link.now()
        hinted = self._hint_totals()
        sent = self._round_sent
        self._rounds.append(
            RoundStats(
                round=len(self._rounds),
                start=start.time,
                duration=now - start.time,
                dirty_at_start=start.dirty,
                new_dirty=start.new_dirty,
                normal=sent.normal,
                duplicate=sent.duplicate,
                transferred=sent.bytes,
                pages_hinted=hinted.hinted - self._hint_base.hinted,
                pages_skipped=hinted.skipped - self._hint_base.skipped,
            )
        )
        self._round_sent = _Sent()
        self._hint_base = hinted
        self._round_start = _RoundStart(now, self._dirty_count(), new_dirty)

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(
                Progress(
                    self.link.now(),
                    len(self._rounds),
                    self._dirty_count(),
                    self._round_start.dirty,
                    self._sent.normal + self._sent.duplicate,
                    self.npages,
                )
            )

    # -- the migration -----------------------------------------------------------------------

    def _ram_save_setup(self) -> float:
        """The link starts (set-up), the first sync opens the first hint window; returns the
        set-up time."""
        self.link.start()
        new = self._migration_bitmap_sync(running=True)
        setup = self.link.now()
        self._hint_base = self._hint_totals()
        self._round_start = _RoundStart(setup, self._dirty_count(), new)
        self._window = _Window(setup, 0)
        return setup

    def run(self) -> MigrationResult:
        """Migrates; returns the result (``status`` says how it ended)."""
        cfg, src, dev = self.config, self.source, self.device
        status: Status = "failed"
        error: str | None = None
        setup = downtime = 0.0
        if dev is not None:
            dev.bind(self.bitmap)
            self._cleared_at_bind = dev.pages_cleared_total
            if src.log_mode == "manual" and cfg.strategy == "qemu":
                dev.hint_listener = self._on_hints
        try:
            setup = self._ram_save_setup()
            while self._migration_iteration_run():
                pass
            downtime = self._migration_completion()
            status = "completed"
        except MigrationCancelled:
            status = "cancelled"
        except Exception as e:  # noqa: BLE001 - a failed migration is a result, like QMP's
            status, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            if dev is not None:
                dev.hint_listener = None
                # DONE unless the final sync already sent it (migration_cleanup).
                dev.finish()
            if status != "completed":
                src.resume()
        hinted = self._hint_totals()
        return MigrationResult(
            status=status,
            total_time=self.link.now(),
            downtime=downtime,
            setup_time=setup,
            ram_total=self.npages * self.page_size,
            transferred=self._sent.bytes,
            duplicate=self._sent.duplicate,
            normal=self._sent.normal,
            normal_bytes=self._sent.normal * self.page_size,
            dirty_sync_count=self._syncs,
            remaining=self.bitmap.count() * self.page_size,
            hinting=dev is not None,
            pages_hinted=hinted.hinted,
            pages_skipped=hinted.skipped,
            rounds=self._rounds,
            lost_pages=self._lost_pages() if status == "completed" and self._lost_pages else None,
            error=error,
        )
