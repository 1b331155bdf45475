"""A hypothesis state machine over the device and the simulated guest: the migration's start,
stop and finish, the guest's driver steps, workloads and shrinker, config interrupts, and the
device's queue processing, in any interleaving.

Invariants, after every step:
- a page the bitmap lost since the last start belongs to a block the guest hinted under the
  device's current cmd id (no hint of another round, no page outside a hint is ever cleared);
- nothing is cleared while the device is in STOP or DONE (stop_hinting() closes the window);
- the config shows the id rule of the state (REQUESTED/START: the id, STOP 0, DONE 1);
- the allocator's free list, hinted list and block states agree;
- a well-behaved driver never makes the device fail or reject an element;
- once the guest has seen DONE, it holds no hinted block.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from helpers import MIB, attached_guest
from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import CMD_ID_DONE, CMD_ID_STOP, HintState
from pagehint.sim import FREE, HINTED, USED


class HintingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # A hole between 32 MiB and 64 MiB; 4 KiB pages, 256 KiB blocks so rounds are long.
        memmap = MemoryMap([(0, 32 * MIB), (64 * MIB, 32 * MIB)])
        self.bitmap = DirtyBitmap(memmap.npages, dirty=True)
        self.guest, self.device = attached_guest(
            memmap, bitmap=self.bitmap, seed=3, used=0.25, block_bytes=256 * 1024
        )
        self.workload: list[np.ndarray] = []
        self.cleared_since_start = 0
        self.done_seen = False

    # -- the migration side ------------------------------------------------------------

    @rule()
    def start(self) -> None:
        # A sync marks every page dirty; then the round's window opens.
        self.bitmap.set_all()
        self.device.start_hinting()
        self.done_seen = False

    @rule()
    def stop(self) -> None:
        self.device.stop_hinting()

    @rule()
    def finish(self) -> None:
        self.device.finish()

    @rule(pages=st.integers(0, 1 << 20))
    def balloon_target(self, pages: int) -> None:
        self.device.set_target(pages)

    # -- the device ----------------------------------------------------------------------

    @rule(budget=st.sampled_from([1, 3, 50, 1 << 20]))
    def process(self, budget: int) -> None:
        before = self.device.state
        count = self.bitmap.count()
        r = self.device.process(budget)
        assert r.error is None and r.elements <= budget
        assert count - self.bitmap.count() == r.hints.pages_cleared
        if before in (HintState.STOP, HintState.DONE):
            # No out-buffer leaves STOP or DONE, so the window stays shut.
            assert r.hints.pages_cleared == 0 and r.hint_elements_applied == 0
        if r.elements:
            self.guest.driver.note_device_writes()

    # -- the guest -----------------------------------------------------------------------

    @rule(blocks=st.one_of(st.none(), st.integers(0, 40)), late=st.booleans())
    def driver(self, blocks: int | None, late: bool) -> None:
        saw_done = self.device.state is HintState.DONE and self.guest.driver.work_pending
        self.guest.driver.run(blocks, late=late)
        if saw_done and not self.guest.driver.in_round:
            self.done_seen = True

    @rule(k=st.integers(1, 30))
    def allocate_and_write(self, k: int) -> None:
        blocks = self.guest.alloc_blocks(k)
        self.guest.write_blocks(blocks)
        if len(blocks):
            self.workload.append(blocks)

    @rule()
    def free_oldest(self) -> None:
        if self.workload:
            self.guest.free_blocks(self.workload.pop(0))

    @rule(k=st.integers(1, 20))
    def shrink(self, k: int) -> None:
        self.guest.shrink(k)

    @rule(n=st.integers(1, 500))
    def write_pages(self, n: int) -> None:
        if self.workload:
            pages = self.guest.block_pages(self.workload[-1])
            self.guest.write_pages(pages[:n])

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def only_current_round_hints_are_cleared(self) -> None:
        g = self.guest
        clean = np.flatnonzero(~_dirty(self.bitmap))
        if not len(clean):
            return
        blk = g.contents.block_of(clean)
        assert np.all(blk >= 0), "a page outside every block was cleared"
        assert np.all(g.hinted_under[blk] == self.device.cmd_id), "a hint of another round"

    @invariant()
    def config_follows_the_state(self) -> None:
        got = int.from_bytes(self.device.read_config(8, 4), "little")
        want = {
            HintState.REQUESTED: self.device.cmd_id,
            HintState.START: self.device.cmd_id,
            HintState.STOP: CMD_ID_STOP,
            HintState.DONE: CMD_ID_DONE,
        }[self.device.state]
        assert got == want

    @invariant()
    def allocator_is_consistent(self) -> None:
        g = self.guest
        hinted = g.hinted_blocks()
        assert len(np.unique(hinted)) == len(hinted)
        assert np.all(g.state[hinted] == HINTED)
        assert np.count_nonzero(g.state == HINTED) == len(hinted)
        assert np.count_nonzero(g.state == FREE) == g.free_block_count
        in_use = np.concatenate(self.workload) if self.workload else np.zeros(0, np.int64)
        assert np.all(g.state[in_use] == USED)

    @invariant()
    def the_device_is_healthy(self) -> None:
        assert self.device.error is None
        assert sum(self.device.rejected.values()) == 0

    @invariant()
    def done_returns_every_block(self) -> None:
        if self.done_seen and self.device.state is HintState.DONE:
            assert self.guest.hinted_block_count == 0


def _dirty(bitmap: DirtyBitmap) -> np.ndarray:
    bits = np.unpackbits(bitmap.words().view(np.uint8), bitorder="little")
    return bits[: bitmap.npages].astype(bool)


TestHinting = HintingMachine.TestCase
TestHinting.settings = settings(max_examples=400, stateful_step_count=50, deadline=None)
