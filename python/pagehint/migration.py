"""Pre-copy live migration with free page hinting, over any ``MigrationSource``.

``Precopy`` follows QEMU's ``migration/ram.c`` and ``migration.c``: the bitmap starts all dirty;
every sync is {``stop_hinting()``, merge the dirty log, ``start_hinting()`` while the guest
runs}; the sender takes dirty pages in batches at link speed while the guest keeps writing and
hints keep clearing the bitmap; when the remaining pages would fit the maximum downtime at the
measured bandwidth it syncs, and completes if they still fit (or when the round limit is hit):
the guest is paused, a last sync runs, the device gets DONE, and the rest is sent. Cancel or
failure also sends DONE. Zero pages cost a header only (QEMU's "duplicate").

Time is simulated and event driven: sending a batch takes its wire bytes over the bandwidth
(or its bytes over the sender's scan rate, whichever is longer), and the source runs for
exactly that long. Hinting strategies with a manual-protect dirty log:

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
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.balloon import FreePageHintDevice

LogMode = Literal["classic", "manual"]
Strategy = Literal["safe", "qemu"]

_I64Array = npt.NDArray[np.int64]
_U64Array = npt.NDArray[np.uint64]


class MigrationSource(Protocol):
    """A running guest as the migration loop sees it."""

    @property
    def memmap(self) -> _core.MemoryMap:
        """Guest RAM layout: the bitmap has one bit per page of it."""

    @property
    def log_mode(self) -> LogMode:
        """``classic`` (getting the log clears it) or ``manual`` (KVM_CLEAR_DIRTY_LOG)."""

    @property
    def device(self) -> FreePageHintDevice | None:
        """The free page hinting device, if the guest has one."""

    def get_dirty_log(self) -> _U64Array:
        """KVM_GET_DIRTY_LOG over all of RAM, as ``uint64`` words."""

    def clear_dirty_log(self, first_page: int, num_pages: int) -> int:
        """KVM_CLEAR_DIRTY_LOG (manual mode): clears and write-protects the pages."""

    def run(self, seconds: float) -> None:
        """Lets the guest (its workloads, its driver and the device) run for ``seconds``."""

    def pause(self) -> None:
        """Stops the guest's vCPUs (stop-and-copy)."""

    def resume(self) -> None:
        """Lets the guest run again (after a cancel or failure)."""

    def read_pages(self, pfns: _I64Array) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
        """What sending ``pfns`` carries (one row per page) and which pages are all zero."""


class MigrationDestination(Protocol):
    """Where pages go."""

    def receive(self, pfns: _I64Array, payload: npt.NDArray[Any]) -> None:
        """Pages ``pfns`` arrive with ``payload`` (from ``read_pages``)."""


@dataclass(frozen=True)
class PrecopyConfig:
    """Link, limits and policy. Defaults: a 10 Gbit/s link, QEMU's 300 ms maximum downtime
    and 8-byte page header, a sender that reads 8 GB/s to find zero pages, 30 rounds at most,
    QEMU's 100 ms rate-limit window and 1 GiB dirty-log clear chunks."""

    bandwidth: float = 10e9 / 8
    """Link bytes per second."""
    max_downtime: float = 0.3
    """Seconds the guest may be paused for the last copy."""
    page_header_bytes: int = 8
    """Stream bytes before each page (QEMU: the page offset with flags in a be64)."""
    zero_page_bytes: int = 1
    """Bytes after the header for a zero page (QEMU's fill byte)."""
    scan_rate: float = 8e9
    """Bytes per second the sender reads pages (to detect zero pages) and queues them."""
    setup_time: float = 0.0
    """Seconds before the first round (bitmap and log set-up)."""
    switchover_time: float = 0.0
    """Seconds of downtime beyond sending RAM (device state, network switch)."""
    max_rounds: int = 30
    """Rounds (syncs after the set-up one) after which completion is forced, converged or
    not; the final sync in stop-and-copy comes on top."""
    iteration_time: float = 0.1
    """How often convergence is checked while sending (QEMU's BUFFER_DELAY)."""
    batch_pages: int = 32768
    """Pages taken per send step: the time resolution of the simulation."""
    clear_chunk_pages: int = 1 << 18
    """Pages per lazily cleared dirty-log chunk (QEMU's clear_bmap_shift of 18)."""
    hints: bool = True
    """Use free page hinting when the source's device negotiated it."""
    strategy: Strategy = "safe"
    postcopy: bool = False
    """Postcopy possible: then QEMU does not hint, and neither does this."""

    def __post_init__(self) -> None:
        for name in ("bandwidth", "scan_rate", "iteration_time"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("max_downtime", "setup_time", "switchover_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.max_rounds < 1 or self.batch_pages < 1:
            raise ValueError("max_rounds and batch_pages must be at least 1")
        if self.clear_chunk_pages < 64 or self.clear_chunk_pages % 64:
            raise ValueError(f"clear_chunk_pages must be a multiple of 64, not "
                             f"{self.clear_chunk_pages}")
        if self.strategy not in ("safe", "qemu"):
            raise ValueError(f"strategy must be 'safe' or 'qemu', not {self.strategy!r}")


@dataclass(frozen=True)
class RoundStats:
    """One round: from a sync to the next (round 0 starts at set-up)."""

    round: int
    start: float
    duration: float
    dirty_at_start: int
    """Pages dirty in the bitmap when the round began (after its sync)."""
    new_dirty: int
    """Pages the sync that began the round found newly dirty."""
    normal: int
    duplicate: int
    transferred: int
    pages_hinted: int
    pages_skipped: int
    """Dirty pages hints cleared from the bitmap during the round (not sent)."""


@dataclass(frozen=True)
class MigrationResult:
    """A migration's outcome, in QMP ``query-migrate`` terms plus pagehint's own."""

    status: Literal["completed", "cancelled", "failed"]
    total_time: float
    downtime: float
    setup_time: float
    ram_total: int
    transferred: int
    duplicate: int
    normal: int
    normal_bytes: int
    dirty_sync_count: int
    remaining: int
    hinting: bool
    pages_hinted: int
    pages_skipped: int
    rounds: list[RoundStats] = field(default_factory=list)
    lost_pages: int | None = None
    """Pages the destination got wrong (None if the source cannot tell)."""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """QMP ``query-migrate`` names (times in ms, sizes in bytes) plus pagehint's."""
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(self.total_time * 1000, 3),
            "downtime": round(self.downtime * 1000, 3),
            "setup-time": round(self.setup_time * 1000, 3),
            "ram": {
                "transferred": self.transferred,
                "total": self.ram_total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal_bytes,
                "dirty-sync-count": self.dirty_sync_count,
                "remaining": self.remaining,
            },
            "free-page-hinting": self.hinting,
            "pages-hinted": self.pages_hinted,
            "pages-skipped": self.pages_skipped,
            "lost-pages": self.lost_pages,
            "rounds": [
                {k.replace("_", "-"): v for k, v in asdict(r).items()} for r in self.rounds
            ],
        }
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Progress:
    """Passed to the progress callback after every send step: simulated seconds, the round,
    pages still dirty, pages dirty when the round began, pages sent so far, guest pages."""

    time: float
    round: int
    remaining: int
    round_dirty: int
    sent: int
    npages: int


class MigrationCancelled(Exception):
    """``Precopy.cancel()`` was called."""


class Precopy:
    """One pre-copy migration of ``source`` to ``destination`` (``run()`` once).

    ``lost_pages`` is an optional oracle (the simulated source's) asked at completion.
    ``progress`` is called after every send step. ``cancel()`` may be called from another
    thread (or from ``progress``): the run ends as QMP's ``migrate_cancel`` does, sending DONE.
    """

    def __init__(
        self,
        source: MigrationSource,
        destination: MigrationDestination,
        config: PrecopyConfig | None = None,
        *,
        progress: Callable[[Progress], None] | None = None,
        lost_pages: Callable[[], int] | None = None,
    ) -> None:
        self.source = source
        self.destination = destination
        self.config = config or PrecopyConfig()
        self._progress = progress
        self._lost_pages = lost_pages
        self._cancel = threading.Event()
        memmap = source.memmap
        self.npages = memmap.npages
        self.page_size = memmap.page_size
        self.bitmap = _core.DirtyBitmap(self.npages, dirty=True)
        dev = source.device
        cfg = self.config
        self.device = dev if cfg.hints and not cfg.postcopy and dev is not None and dev.hinting \
            else None
        manual = source.log_mode == "manual"
        # Lazy per-chunk clearing of a manual log: QEMU always; 'safe' re-protects everything
        # at each sync instead once hints are on.
        self._lazy_clear = manual and not (self.device is not None and cfg.strategy == "safe")
        nchunks = -(-self.npages // cfg.clear_chunk_pages)
        self._clear_bmap = np.zeros(nchunks, dtype=np.bool_)
        # The device may apply hints (and call _on_hints) on its own thread.
        self._clear_lock = threading.Lock()
        self._now = 0.0
        self._cursor = 0
        self._syncs = 0
        self._sent = [0, 0, 0]  # normal, duplicate, bytes
        self._round_sent = [0, 0, 0]
        self._rounds: list[RoundStats] = []
        self._round_start = (0.0, 0, 0)  # time, dirty at start, new dirty
        self._hint_base = (0, 0)
        self._window = (0.0, 0)  # iteration start time, bytes sent by then

    def cancel(self) -> None:
        """Ends the migration at the next step (thread safe)."""
        self._cancel.set()

    # -- pieces ----------------------------------------------------------------------------

    def _hint_totals(self) -> tuple[int, int]:
        d = self.device
        return (0, 0) if d is None else (d.pages_hinted_total, d.pages_cleared_total)

    def _sync(self, running: bool) -> int:
        """QEMU's migration_bitmap_sync_precopy with the free page hint notifiers."""
        src, dev = self.source, self.device
        if dev is not None:
            dev.stop_hinting()
        new = self.bitmap.merge_log(src.get_dirty_log())
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

    def _clear_chunks(self, chunks: _I64Array) -> None:
        """Clears the manual dirty log of ``chunks`` still to be cleared since the sync."""
        size = self.config.clear_chunk_pages
        with self._clear_lock:
            chunks = chunks[self._clear_bmap[chunks]]
            self._clear_bmap[chunks] = False
            for c in chunks.tolist():
                first = c * size
                self.source.clear_dirty_log(first, min(size, self.npages - first))

    def _on_hints(self, ranges: _U64Array) -> None:
        """qemu strategy: QEMU clears the log of every chunk a hint touches."""
        if len(ranges):
            chunk = self.config.clear_chunk_pages
            first = ranges[:, 0].astype(np.int64)
            last = first + ranges[:, 1].astype(np.int64) - 1
            chunks = np.unique(np.concatenate([first // chunk, last // chunk]))
            self._clear_chunks(chunks)

    def _send_step(self, max_pages: int, *, running: bool) -> int:
        """Takes up to ``max_pages`` dirty pages from the cursor and sends them; the guest
        runs while they are on the wire. Returns the bytes sent."""
        taken = self.bitmap.take_dirty(max_pages, self._cursor)
        if len(taken) < max_pages:
            # Wrap around: the rest of the pass starts again from page 0.
            taken = np.concatenate([taken, self.bitmap.take_dirty(max_pages - len(taken), 0)])
        if not len(taken):
            return 0
        pfns = taken.astype(np.int64)
        self._cursor = int(pfns[-1]) + 1 if int(pfns[-1]) + 1 < self.npages else 0
        if self._lazy_clear:
            self._clear_chunks(np.unique(pfns // self.config.clear_chunk_pages))
        payload, zero = self.source.read_pages(pfns)
        self.destination.receive(pfns, payload)
        cfg = self.config
        nzero = int(np.count_nonzero(zero))
        normal = len(pfns) - nzero
        nbytes = normal * (cfg.page_header_bytes + self.page_size) + nzero * (
            cfg.page_header_bytes + cfg.zero_page_bytes
        )
        dt = max(nbytes / cfg.bandwidth, len(pfns) * self.page_size / cfg.scan_rate)
        for acc in (self._sent, self._round_sent):
            acc[0] += normal
            acc[1] += nzero
            acc[2] += nbytes
        self._now += dt
        if running:
            self.source.run(dt)
        return nbytes

    def _end_round(self, new_dirty: int) -> None:
        t0, dirty0, new0 = self._round_start
        hinted = self._hint_totals()
        normal, dup, nbytes = self._round_sent
        self._rounds.append(RoundStats(
            round=len(self._rounds), start=t0, duration=self._now - t0, dirty_at_start=dirty0,
            new_dirty=new0, normal=normal, duplicate=dup, transferred=nbytes,
            pages_hinted=hinted[0] - self._hint_base[0],
            pages_skipped=hinted[1] - self._hint_base[1],
        ))
        self._round_sent = [0, 0, 0]
        self._hint_base = hinted
        self._round_start = (self._now, self.bitmap.count(), new_dirty)

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(Progress(self._now, len(self._rounds), self.bitmap.count(),
                                    self._round_start[1], self._sent[0] + self._sent[1],
                                    self.npages))

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> MigrationResult:
        """Migrates; returns the result (``status`` says how it ended)."""
        cfg, src, dev = self.config, self.source, self.device
        status: Literal["completed", "cancelled", "failed"] = "failed"
        error: str | None = None
        setup = downtime = 0.0
        done = False
        if dev is not None:
            dev.bind(self.bitmap)
            if src.log_mode == "manual" and cfg.strategy == "qemu":
                dev.hint_listener = self._on_hints
        try:
            self._now = cfg.setup_time
            src.run(cfg.setup_time)
            new = self._sync(running=True)
            setup = self._now
            self._hint_base = self._hint_totals()
            self._round_start = (self._now, self.bitmap.count(), new)
            self._window = (self._now, 0)
            while True:
                if self._cancel.is_set():
                    raise MigrationCancelled
                # QEMU's threshold: the bandwidth measured over the last window times the
                # downtime limit; nothing is measured before the first window, so no early
                # switchover.
                t0, b0 = self._window
                measured = (self._sent[2] - b0) / (self._now - t0) if self._now > t0 else 0.0
                threshold = measured * cfg.max_downtime
                pending = self.bitmap.count() * self.page_size
                if pending <= threshold or pending == 0:
                    new = self._sync(running=True)
                    self._end_round(new)
                    pending = self.bitmap.count() * self.page_size
                    if pending <= threshold or self._syncs > cfg.max_rounds:
                        break
                # One window: the rate limit's bytes or its time (QEMU also leaves
                # ram_save_iterate after 50 ms), or until the bitmap is empty.
                self._window = (self._now, self._sent[2])
                budget = cfg.bandwidth * cfg.iteration_time
                until = self._now + cfg.iteration_time
                sent = 0
                while sent < budget and self._now < until:
                    step = self._send_step(cfg.batch_pages, running=True)
                    if step == 0:
                        break
                    sent += step
                    self._report()
                    if self._cancel.is_set():
                        raise MigrationCancelled
            # Stop and copy.
            src.pause()
            paused_at = self._now
            if dev is not None:
                dev.stop_hinting()
            self._sync(running=False)
            done = True
            while self._send_step(cfg.batch_pages, running=False):
                self._report()
            self._now += cfg.switchover_time
            downtime = self._now - paused_at
            self._end_round(0)
            status = "completed"
        except MigrationCancelled:
            status = "cancelled"
        except Exception as e:  # noqa: BLE001 - a failed migration is a result, like QMP's
            status, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            if dev is not None:
                dev.hint_listener = None
                if not done:
                    dev.finish()
            if status != "completed":
                src.resume()
        hinted = self._hint_totals()
        return MigrationResult(
            status=status,
            total_time=self._now,
            downtime=downtime,
            setup_time=setup,
            ram_total=self.npages * self.page_size,
            transferred=self._sent[2],
            duplicate=self._sent[1],
            normal=self._sent[0],
            normal_bytes=self._sent[0] * self.page_size,
            dirty_sync_count=self._syncs,
            remaining=self.bitmap.count() * self.page_size,
            hinting=dev is not None,
            pages_hinted=hinted[0],
            pages_skipped=hinted[1],
            rounds=self._rounds,
            lost_pages=self._lost_pages() if status == "completed" and self._lost_pages else None,
            error=error,
        )
