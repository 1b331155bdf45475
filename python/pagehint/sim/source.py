"""The simulated guest as a migration source and a destination that keeps page contents for
the nothing-lost oracle."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.device import FreePageHintDevice
from pagehint.migration import LogMode, PageRuns
from pagehint.sim.contents import PageContents, RunContents
from pagehint.sim.guest import SimulatedGuest

_U64Array = npt.NDArray[np.uint64]


GUEST_HINT_RATE = 100_000.0
"""Default blocks per second the guest driver allocates and queues (about 10 us a block: an
order-10 allocation, zeroing by init_on_alloc aside, a descriptor and a kick)."""
DEVICE_RATE = 1_000_000.0
"""Default elements per second the device takes off the free page queue."""


class SimulatedSource:
    """A simulated guest and its device, as ``Precopy`` drives a source.

    While the migration sends, ``run(dt)`` runs the guest's workloads for ``dt``, then lets
    its balloon driver queue up to ``hint_rate * dt`` blocks and the device process up to
    ``device_rate * dt`` elements (alternating, as the ring fills and drains)."""

    def __init__(
        self,
        guest: SimulatedGuest,
        device: FreePageHintDevice | None,
        *,
        hint_rate: float = GUEST_HINT_RATE,
        device_rate: float = DEVICE_RATE,
    ) -> None:
        if hint_rate <= 0 or device_rate <= 0:
            raise ValueError("hint_rate and device_rate must be positive")
        self.guest = guest
        self._device = device
        self.hint_rate = hint_rate
        self.device_rate = device_rate
        self.paused = False
        self._hint_carry = 0.0
        self._device_carry = 0.0

    @property
    def memmap(self) -> _core.MemoryMap:
        return self.guest.memmap

    @property
    def log_mode(self) -> LogMode:
        return self.guest.log.mode

    @property
    def device(self) -> FreePageHintDevice | None:
        return self._device

    def get_dirty_log(self) -> _U64Array:
        return self.guest.log.get()

    def clear_dirty_log(self, first_page: int, num_pages: int) -> int:
        return self.guest.log.clear(first_page, num_pages)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def run(self, seconds: float) -> None:
        if self.paused or seconds <= 0:
            return
        guest = self.guest
        guest.advance(seconds)
        self._hint_carry += self.hint_rate * seconds
        self._device_carry += self.device_rate * seconds
        device = self._device
        queue_ready = device is not None and device.free_page_queue is not None
        while True:
            blocks = int(self._hint_carry)
            step = guest.driver.run(blocks)
            self._hint_carry -= step.blocks_hinted
            used = 0
            if queue_ready and device is not None:
                elements = int(self._device_carry)
                if elements:
                    r = device.process(elements)
                    used = r.elements
                    self._device_carry -= used
                    if used:
                        guest.driver.note_device_writes()
            if not step.blocks_hinted and not step.cmd_ids_sent and not used:
                break
        # Work the driver had no budget for waits; unused device time does not bank up.
        self._device_carry = min(self._device_carry, 1.0)
        if not guest.driver.in_round:
            self._hint_carry = min(self._hint_carry, 1.0)

    def read_pages(self, runs: PageRuns) -> tuple[RunContents, int]:
        """The runs' contents (per block where the guest keeps them per block) and how many
        of the pages are zero pages."""
        content = self.guest.contents.read_runs(runs.starts, runs.counts)
        return content, content.zero_pages()


class SimulatedDestination:
    """The destination's copy of guest memory (contents only)."""

    def __init__(self, guest: SimulatedGuest) -> None:
        self.contents = PageContents(guest.npages, guest.block_pfn, guest.pages_per_block)

    def receive(self, runs: PageRuns, payload: RunContents) -> None:
        self.contents.write_runs(payload)
