"""The simulator's ``Link``: simulated time, which passes as batches go over a modelled link
and runs the simulated guest for exactly that long."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pagehint.migration.link import WireFormat


class Runnable(Protocol):
    """What runs while simulated time passes (``SimulatedSource``)."""

    def run(self, seconds: float) -> None:
        """Runs the guest, its driver and the device for ``seconds``."""


@dataclass(frozen=True)
class LinkModel:
    """The modelled link. Defaults: 10 Gbit/s, QEMU's page header and zero page fill byte, a
    sender that reads 8 GB/s to find zero pages, no set-up or switchover cost."""

    bandwidth: float = 10e9 / 8
    """Link bytes per second."""
    scan_rate: float = 8e9
    """Bytes per second the sender reads pages (to detect zero pages) and queues them."""
    wire: WireFormat = field(default_factory=WireFormat)
    setup_time: float = 0.0
    """Seconds before the first round (bitmap and log set-up)."""
    switchover_time: float = 0.0
    """Seconds of downtime beyond sending RAM (device state, network switch)."""
    startup_wait: float = 0.0
    """Seconds the sender waits, the guest running, for a destination that is still starting
    up and takes no stream yet (``pagehint migrate-kvm``'s process): the first batch that
    finds ``startup_buffer`` full waits that long."""
    startup_buffer: int = 0
    """Stream bytes the link holds before the destination reads (a socket's send buffer)."""

    def __post_init__(self) -> None:
        for name in ("bandwidth", "scan_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("setup_time", "switchover_time", "startup_wait", "startup_buffer"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")


class SimulatedLink:
    """Event-driven time: a batch takes its stream bytes over the bandwidth, or its page bytes
    over the sender's scan rate, whichever is longer (a pipelined sender), and ``guest`` runs
    for exactly that long while the migration is not in stop-and-copy."""

    def __init__(self, guest: Runnable, model: LinkModel | None = None) -> None:
        self.guest = guest
        self.model = model or LinkModel()
        self._now = 0.0
        self._buffered: int | None = 0
        """Stream bytes sent before the destination reads; None once it does."""

    @property
    def wire(self) -> WireFormat:
        return self.model.wire

    def now(self) -> float:
        return self._now

    def start(self) -> None:
        self._now = self.model.setup_time
        self._buffered = 0
        self.guest.run(self.model.setup_time)

    def transmit(self, stream_bytes: int, read_bytes: int, *, running: bool) -> None:
        m = self.model
        dt = max(stream_bytes / m.bandwidth, read_bytes / m.scan_rate)
        if self._buffered is not None:
            self._buffered += stream_bytes
            if self._buffered > m.startup_buffer:
                self._buffered = None
                dt += m.startup_wait
        self._now += dt
        if running:
            self.guest.run(dt)

    def window_budget(self, seconds: float) -> float:
        return self.model.bandwidth * seconds

    def switchover(self) -> None:
        self._now += self.model.switchover_time
