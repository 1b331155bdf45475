"""The seam between the pre-copy loop and time: a ``Link`` carries the page stream and keeps
the clock. ``Precopy`` decides what to send and when to sync; the link says what a batch costs
on the wire, how long it takes, and what time it is.

Two implementations: ``pagehint.sim.SimulatedLink`` advances a simulated guest as simulated
time passes (event driven, deterministic), and ``WallClockLink`` here, for a guest that runs
by itself (a vCPU thread): time is the monotonic clock, and sending is paced to a bandwidth
limit over QEMU's 100 ms rate-limit windows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WireFormat:
    """Bytes a page costs in the stream: by default QEMU's 8-byte header (the page offset with
    flags in a be64) before each page, and one fill byte after the header for a zero page;
    ``batch_header_bytes`` before each batch of pages (pagehint's own socket stream,
    ``pagehint.migration.stream``, has an 8-byte record header and no fill byte)."""

    page_header_bytes: int = 8
    zero_page_bytes: int = 1
    batch_header_bytes: int = 0

    def __post_init__(self) -> None:
        if min(self.page_header_bytes, self.zero_page_bytes, self.batch_header_bytes) < 0:
            raise ValueError(
                "page_header_bytes, zero_page_bytes and batch_header_bytes must not be negative"
            )

    def stream_bytes(self, normal: int, zero: int, page_size: int) -> int:
        """Stream bytes for a batch of ``normal`` pages sent whole and ``zero`` pages sent as
        a header."""
        if normal + zero == 0:
            return 0
        return (
            self.batch_header_bytes
            + normal * (self.page_header_bytes + page_size)
            + zero * (self.page_header_bytes + self.zero_page_bytes)
        )


class Link(Protocol):
    """The migration stream's link and clock, as ``Precopy`` uses them."""

    @property
    def wire(self) -> WireFormat:
        """What pages cost in the stream."""

    def now(self) -> float:
        """Seconds since ``start()``."""

    def start(self) -> None:
        """The migration begins (set-up: the clock starts)."""

    def transmit(self, stream_bytes: int, read_bytes: int, *, running: bool) -> None:
        """A batch of ``stream_bytes`` (``read_bytes`` of guest pages read to make it) was
        handed to the destination; returns when the link can take the next one. ``running``
        says whether the guest runs meanwhile (not in stop-and-copy)."""

    def window_budget(self, seconds: float) -> float:
        """Bytes the link may send in a rate-limit window of ``seconds``."""

    def switchover(self) -> None:
        """RAM is sent and the guest is paused: the rest of the switchover happens."""


class WallClockLink:
    """A link on the wall clock for a guest that runs by itself.

    ``bandwidth`` (bytes/s, None for unlimited) paces sending as QEMU's rate limit does: the
    bytes of each 100 ms window (``window``) may not run ahead of the limit, so ``transmit``
    sleeps until they no longer do. The migration measures its own bandwidth from the clock.
    ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        bandwidth: float | None = None,
        *,
        wire: WireFormat | None = None,
        window: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive or None, not {bandwidth}")
        if not window > 0:
            raise ValueError(f"window must be positive, not {window}")
        self.bandwidth = bandwidth
        self._wire = wire or WireFormat()
        self.window = window
        self._clock = clock
        self._sleep = sleep
        self._t0 = clock()
        self._window_start = 0.0
        self._window_bytes = 0
        self.slept = 0.0
        """Seconds spent pacing so far."""

    @property
    def wire(self) -> WireFormat:
        return self._wire

    def now(self) -> float:
        return self._clock() - self._t0

    def start(self) -> None:
        self._t0 = self._clock()
        self._window_start = 0.0
        self._window_bytes = 0

    def transmit(self, stream_bytes: int, read_bytes: int, *, running: bool) -> None:
        if self.bandwidth is None:
            return
        now = self.now()
        if now - self._window_start >= self.window:
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += stream_bytes
        due = self._window_start + self._window_bytes / self.bandwidth
        if due > now:
            self._sleep(due - now)
            self.slept += due - now

    def window_budget(self, seconds: float) -> float:
        return float("inf") if self.bandwidth is None else self.bandwidth * seconds

    def switchover(self) -> None:
        """Nothing to model: the real switchover's time is on the clock."""
