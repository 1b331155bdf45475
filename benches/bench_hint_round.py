"""B7: one free page hinting round of a 1 TiB guest with 90 % of its memory free (235,930
free 4 MiB blocks), end to end through the real ring: ``SimulatedGuest`` (the Linux driver:
cmd id, one in-buffer per block allocated from the free list and zeroed by init_on_alloc, the
id re-checked before each batch, STOP) alternating with ``FreePageHintDevice.process`` (cmd
ids, hints decoded from guest RAM and cleared in the bitmap) until both are idle.

Rows:

- pagehint: the whole round, guest side plus device side (target: <= 2 s wall);
- the same round with no bitmap bound, so the device returns every hint unapplied: the ring
  and simulator cost alone (a limit row: not checked).

Between rounds (untimed) DONE gives every block back and the bitmap is made all dirty again.
"""

from __future__ import annotations

import pytest

from benches.benchutil import Bench, Peer, Settings, check_then_measure
from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import FreePageHintDevice
from pagehint.sim import SimulatedGuest, run_until_idle

TIB = 1 << 40
MEMMAP = MemoryMap.x86(TIB)


class Round:
    """A 1 TiB guest attached to a device; ``run`` is one hinting round."""

    def __init__(self, bound: bool) -> None:
        self.guest = SimulatedGuest(MEMMAP, seed=5, used=0.1)
        self.bitmap = DirtyBitmap(MEMMAP.npages, dirty=True)
        self.device = FreePageHintDevice(self.guest.ram, MEMMAP, self.bitmap if bound else None)
        self.guest.driver.attach(self.device)
        self.free_blocks = self.guest.free_block_count

    def reset(self) -> None:
        self.device.stop_hinting()
        self.device.finish()
        self.guest.driver.run()
        self.bitmap.set_all()

    def run(self) -> int:
        self.device.start_hinting()
        r = run_until_idle(self.guest, self.device)
        assert r.blocks_hinted == self.free_blocks, (r.blocks_hinted, self.free_blocks)
        return r.pages_cleared


@pytest.fixture(scope="module")
def free_pages() -> int:
    guest = SimulatedGuest(MEMMAP, seed=5, used=0.1)
    return guest.free_block_count * guest.pages_per_block


@pytest.mark.benchmark(
    group="B7 hint round: 1 TiB guest, 90 % free (235,930 4 MiB blocks), guest + device"
)
@pytest.mark.parametrize("impl", ["pagehint", "ring-only"])
def bench_hint_round(benchmark: Bench, settings: Settings, free_pages: int, impl: str) -> None:
    r = Round(bound=impl == "pagehint")
    peer = Peer(
        "pagehint: SimulatedGuest.driver.run + FreePageHintDevice.process until idle"
        if impl == "pagehint"
        else "the same round, device bound to no bitmap (ring + simulator alone)",
        r.run,
        r.reset,
        role="pagehint" if impl == "pagehint" else "limit",
    )
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=peer,
        nbytes=MEMMAP.npages // 8,
        expected_result=free_pages,
    )
