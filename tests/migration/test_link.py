"""The link seam: the wall-clock link's pacing on an injected clock, and a real pre-copy
migration on the wall clock of a source whose pages a real thread writes meanwhile."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from helpers import MIB, PAGE
from pagehint import MemoryMap
from pagehint.device import FreePageHintDevice
from pagehint.migration import (
    LogMode,
    PageRuns,
    Precopy,
    PrecopyConfig,
    WallClockLink,
    WireFormat,
)


class FakeClock:
    """Time that passes only when the link sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.t += seconds


def fake_link(bandwidth: float | None, window: float = 0.1) -> tuple[WallClockLink, FakeClock]:
    fake = FakeClock()
    link = WallClockLink(bandwidth, window=window, clock=fake.clock, sleep=fake.sleep)
    link.start()
    return link, fake


def test_pacing_keeps_the_average_rate_to_the_limit() -> None:
    link, fake = fake_link(10 * MIB)
    for _ in range(20):
        link.transmit(MIB // 2, MIB // 2, running=True)
    # 10 MiB at 10 MiB/s: one second on the clock, all of it spent pacing.
    assert link.now() == pytest.approx(1.0)
    assert sum(fake.sleeps) == pytest.approx(1.0) and link.slept == pytest.approx(1.0)


def test_an_idle_spell_earns_no_burst() -> None:
    link, fake = fake_link(10 * MIB)
    fake.t += 5.0  # the sender had nothing to send for five seconds
    link.transmit(MIB, MIB, running=True)
    # A fresh window: the megabyte still takes its 100 ms.
    assert fake.sleeps == [pytest.approx(0.1)]


def test_time_the_sender_spent_itself_is_not_slept_again() -> None:
    link, fake = fake_link(10 * MIB)
    link.transmit(MIB // 2, MIB // 2, running=True)  # due at 50 ms
    fake.t += 0.03  # reading and sending took 30 ms of the 50
    assert fake.sleeps == [pytest.approx(0.05)]
    link.transmit(MIB // 4, MIB // 4, running=True)  # due at 75 ms; now is 80 ms
    assert len(fake.sleeps) == 1


def test_without_a_limit_nothing_sleeps_and_a_window_is_unbounded() -> None:
    link, fake = fake_link(None)
    for _ in range(10):
        link.transmit(100 * MIB, 100 * MIB, running=True)
    assert fake.sleeps == [] and link.now() == 0.0
    assert link.window_budget(0.1) == float("inf")
    limited, _ = fake_link(8 * MIB)
    assert limited.window_budget(0.1) == pytest.approx(0.8 * MIB)


@pytest.mark.parametrize("kw", [{"bandwidth": 0.0}, {"bandwidth": -1.0}, {"window": 0.0}])
def test_bad_wall_clock_links_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        WallClockLink(**kw)


def test_the_wire_format_counts_headers_and_zero_pages() -> None:
    assert WireFormat().stream_bytes(3, 5, PAGE) == 3 * (8 + PAGE) + 5 * (8 + 1)
    assert WireFormat(16, 0).stream_bytes(1, 1, 16384) == 16 + 16384 + 16
    with pytest.raises(ValueError):
        WireFormat(page_header_bytes=-1)


class ThreadedSource:
    """A guest whose vCPU is a real thread: it writes a version number into random pages of
    a working set, with a classic dirty log, until paused."""

    def __init__(self, npages: int, working_set: int, seed: int) -> None:
        self.memmap = MemoryMap([(0, npages * PAGE)])
        self.contents = np.ones(npages, dtype=np.uint32)  # every page holds data
        self._log = np.zeros(npages, dtype=np.bool_)
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._quit = False
        self._rng = np.random.default_rng(seed)
        self._working_set = working_set
        self.writes = 0
        self.version = 1
        self._thread = threading.Thread(target=self._vcpu, daemon=True)

    @property
    def log_mode(self) -> LogMode:
        return "classic"

    @property
    def device(self) -> FreePageHintDevice | None:
        return None

    def start(self) -> None:
        self._running.set()
        self._thread.start()

    def stop(self) -> None:
        self._quit = True
        self._running.set()
        self._thread.join()

    def _vcpu(self) -> None:
        while not self._quit:
            if not self._running.is_set():
                self._stopped.set()
                self._running.wait()
                continue
            pfns = self._rng.integers(0, self._working_set, 8)
            with self._lock:
                self.version += 1
                self.contents[pfns] = self.version
                self._log[pfns] = True
                self.writes += len(pfns)
            time.sleep(0.0005)

    def get_dirty_log(self) -> npt.NDArray[np.uint64]:
        with self._lock:
            bits = np.packbits(self._log, bitorder="little")
            self._log[:] = False
        padded = np.zeros(-(-len(bits) // 8) * 8, dtype=np.uint8)
        padded[: len(bits)] = bits
        return padded.view("<u8").astype(np.uint64)

    def clear_dirty_log(self, first_page: int, num_pages: int) -> int:
        raise AssertionError("a classic log is never cleared by hand")

    def pause(self) -> None:
        self._stopped.clear()
        self._running.clear()
        self._stopped.wait()

    def resume(self) -> None:
        self._running.set()

    def read_pages(self, runs: PageRuns) -> tuple[npt.NDArray[np.uint32], int]:
        with self._lock:
            content = self.contents[runs.pfns()].copy()
        return content, int(np.count_nonzero(content == 0))


class ArrayDestination:
    def __init__(self, npages: int) -> None:
        self.contents = np.zeros(npages, dtype=np.uint32)

    def receive(self, runs: PageRuns, payload: npt.NDArray[np.uint32]) -> None:
        self.contents[runs.pfns()] = payload


def test_a_wall_clock_migration_of_a_guest_written_by_a_real_thread_loses_nothing() -> None:
    npages = 4096  # 16 MiB
    source = ThreadedSource(npages, working_set=256, seed=5)
    destination = ArrayDestination(npages)
    bandwidth = 64 * MIB
    link = WallClockLink(bandwidth)
    migration = Precopy(
        source,
        destination,
        link,
        PrecopyConfig(max_downtime=0.05, batch_pages=256),
        lost_pages=lambda: int(np.count_nonzero(source.contents != destination.contents)),
    )
    source.start()
    try:
        writes_before = source.writes
        result = migration.run()
        writes_during = source.writes - writes_before
    finally:
        source.stop()
    assert result.status == "completed", result.error
    assert result.lost_pages == 0
    assert np.array_equal(source.contents, destination.contents)
    # The guest ran by itself while the loop sent, and the loop synced again for its writes.
    assert writes_during > 0 and result.dirty_sync_count >= 3
    assert result.normal >= npages and sum(r.normal for r in result.rounds[1:]) > 0
    # Pacing: the stream cannot have gone faster than the limit (a lower bound on time only).
    assert result.total_time >= 0.9 * result.transferred / bandwidth
    assert link.slept > 0
