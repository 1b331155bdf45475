"""The simulated Linux driver against the device model: the round's shape in the real ring,
re-reading the cmd id, DONE, the shrinker, init_on_alloc, poisoning and QEMU's START quirk.

Each test checks one fact of DESIGN.md §4 through what lands in guest RAM or the bitmap.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import GIB, MIB, attached_guest
from pagehint import DirtyBitmap, MemoryMap, SplitQueue
from pagehint.device import (
    CMD_ID_MIN,
    CMD_ID_STOP,
    F_PAGE_POISON,
    FREE_PAGE_QUEUE_MAX,
    FreePageHintDevice,
    HintState,
)
from pagehint.sim import FREE, HINTED, USED, SimulatedGuest, run_until_idle
from pagehint.sim.contents import is_zero
from pagehint.sim.driver_ring import DriverSplitRing, ram_view

FIRST_ID = CMD_ID_MIN + 1  # QEMU increments its counter before the first round


def rig(
    ram: int = 256 * MIB,
    *,
    page_size: int = 4096,
    qemu_compat: bool = False,
    **guest_kw: object,
) -> tuple[SimulatedGuest, FreePageHintDevice, DirtyBitmap]:
    """A guest (a hole below 4 GiB when large enough) attached to a device over a dirty
    bitmap with every page dirty."""
    memmap = MemoryMap.x86(ram, below_4g=min(ram, 2 * GIB), page_size=page_size)
    bitmap = DirtyBitmap(memmap.npages, dirty=True)
    guest, device = attached_guest(
        memmap, bitmap=bitmap, device_kw={"qemu_compat": qemu_compat}, seed=7, **guest_kw
    )
    return guest, device, bitmap


def ring_reader(guest: SimulatedGuest) -> SplitQueue:
    """An independent reader of the guest's free page ring, to see what the driver wrote."""
    q = guest.driver.queue
    assert q is not None
    return SplitQueue(guest.ram, guest.memmap, q.size, q.desc_gpa, q.avail_gpa, q.used_gpa)


def read_u32(guest: SimulatedGuest, gpa: int) -> int:
    off = guest.memmap.pfn_of(gpa) * guest.page_size + gpa % guest.page_size
    return int.from_bytes(bytes(guest.ram[off : off + 4]), "little")


def test_a_round_is_one_id_out_buffer_then_aligned_blocks_then_stop() -> None:
    guest, device, _ = rig(used=0.5)
    cmd_id = device.start_hinting()
    assert cmd_id == FIRST_ID
    free_before = guest.free_block_count
    step = guest.driver.run()
    # Everything free fits in the ring: the round ends within one call.
    assert step.cmd_ids_sent == (FIRST_ID, CMD_ID_STOP)
    assert step.blocks_hinted == free_before and guest.free_block_count == 0
    els = ring_reader(guest).pop()
    assert len(els) == free_before + 2
    first, *hints, last = [els.buffers(i) for i in range(len(els))]
    assert len(first) == 1 and first[0][1:] == (4, False)
    assert read_u32(guest, first[0][0]) == cmd_id
    assert len(last) == 1 and last[0][1:] == (4, False)
    assert read_u32(guest, last[0][0]) == CMD_ID_STOP
    bs = guest.block_bytes
    assert bs == 4 * MIB
    for h in hints:
        assert len(h) == 1
        gpa, length, writable = h[0]
        assert writable and length == bs and gpa % bs == 0
    gpas = sorted(h[0][0] for h in hints)
    assert len(set(gpas)) == len(gpas)
    assert np.all(guest.state[guest.hinted_blocks()] == HINTED)


@pytest.mark.parametrize(
    "page_size, block", [(4096, 4 * MIB), (16384, 32 * MIB), (65536, 512 * MIB)]
)
def test_hint_block_is_max_page_order_for_the_page_size(page_size: int, block: int) -> None:
    guest, device, _ = rig(8 * GIB, page_size=page_size, used=0.9)
    device.start_hinting()
    guest.driver.run()
    els = ring_reader(guest).pop()
    _, addr, length = els.in_buffers()
    assert len(addr) > 0
    assert np.all(length == block) and np.all(addr % block == 0)


def test_the_ring_keeps_one_entry_for_the_cmd_id() -> None:
    guest, device, _ = rig(8 * GIB)
    device.start_hinting()
    step = guest.driver.run()
    assert step.ring_full and step.in_round
    # The id, then hints until one descriptor is left: the STOP can always be sent.
    assert step.blocks_hinted == FREE_PAGE_QUEUE_MAX - 2
    assert guest.driver.queue is not None and guest.driver.queue.num_free == 1


def test_the_whole_round_through_the_device_clears_exactly_the_hinted_blocks() -> None:
    guest, device, bitmap = rig(8 * GIB, used=0.25)
    device.start_hinting()
    r = run_until_idle(guest, device)
    blocks = guest.hinted_blocks()
    assert r.blocks_hinted == len(blocks) == guest.nblocks - round(0.25 * guest.nblocks)
    assert r.cmd_ids == [FIRST_ID, CMD_ID_STOP]
    assert device.state is HintState.STOP and device.error is None
    pages = guest.block_pages(blocks)
    clear = np.ones(guest.npages, dtype=bool)
    clear[pages] = False
    # Hinted pages (and only they) are clean; the ring pages were written, so stay dirty.
    assert r.pages_cleared == len(pages) == guest.npages - bitmap.count()
    assert not any(bitmap.test(int(p)) for p in pages[:: guest.pages_per_block // 4])
    assert bitmap.count() == int(clear.sum())


def test_the_driver_rereads_the_id_and_stops_when_it_changes() -> None:
    guest, device, _bitmap = rig(8 * GIB)
    device.start_hinting()
    guest.driver.run(max_blocks=100)
    device.process()
    assert device.state is HintState.START
    device.stop_hinting()
    step = guest.driver.run()
    # Not one more block after the id changed: straight to STOP.
    assert step.blocks_hinted == 0 and step.cmd_ids_sent == (CMD_ID_STOP,)
    assert guest.hinted_block_count == 100


def test_a_new_id_mid_round_ends_it_and_starts_the_next() -> None:
    guest, device, _bitmap = rig(8 * GIB)
    first = device.start_hinting()
    guest.driver.run(max_blocks=50)
    device.process()
    device.stop_hinting()
    second = device.start_hinting()
    assert first is not None and second == first + 1
    step = guest.driver.run(max_blocks=30)
    assert step.cmd_ids_sent == (CMD_ID_STOP, second)
    # The old round's STOP is ignored in REQUESTED; the new id starts the window.
    r = device.process()
    assert r.cmd_ids == [CMD_ID_STOP, second]
    assert r.hint_elements_applied == 30 and r.hint_elements_ignored == 0
    assert device.state is HintState.START


def test_an_unread_old_id_cannot_open_the_new_window() -> None:
    """Linux keeps the round's id in one field (vb->cmd_id_active) and points every start
    out-buffer at it. If the device has not read the old round's id element before the next
    round starts, that element reads as the new id: in QEMU the window opens early and the old
    round's hints are applied under the new id (a block the shrinker gave back and the guest
    wrote before the sync would be lost). start_hinting() returns what is already available
    unapplied, so only elements published after the new id was issued can open the window."""
    guest, device, bitmap = rig(8 * GIB)
    device.start_hinting()
    guest.driver.run(max_blocks=50)
    # The old round's 50 hints are still in the ring; one of them gets reused and written.
    stale = guest.hinted_blocks()[-1:]
    guest.shrink(1)
    assert guest.alloc_blocks(1).tolist() == stale.tolist()
    guest.write_blocks(stale)
    device.stop_hinting()
    bitmap.merge_log(guest.log.get())  # the sync: the written block is dirty
    second = device.start_hinting()
    assert device.retired_at_start == 51  # the id element and 50 hints
    step = guest.driver.run(max_blocks=30)
    assert step.cmd_ids_sent == (CMD_ID_STOP, second)
    r = device.process()
    assert r.cmd_ids == [CMD_ID_STOP, second]
    assert r.hint_elements_applied == 30 and device.state is HintState.START
    pages = guest.block_pages(stale)
    assert all(bitmap.test(int(p)) for p in pages)


def test_done_gives_every_hinted_block_back() -> None:
    guest, device, _ = rig(used=0.2)
    device.start_hinting()
    run_until_idle(guest, device)
    n = guest.hinted_block_count
    assert n > 0
    device.finish()
    step = guest.driver.run()
    assert step.blocks_returned == n and guest.hinted_block_count == 0
    assert np.count_nonzero(guest.state == HINTED) == 0
    assert guest.free_block_count == n


def test_done_after_a_cancelled_round_also_gives_blocks_back() -> None:
    guest, device, _ = rig(8 * GIB)
    device.start_hinting()
    guest.driver.run(max_blocks=10)
    device.finish()  # cancelled before the device even saw the id
    step = guest.driver.run()
    assert step.cmd_ids_sent == (CMD_ID_STOP,)
    assert step.blocks_returned == 10 and guest.hinted_block_count == 0
    assert device.read_config(8, 4) == (1).to_bytes(4, "little")


def test_the_shrinker_takes_hinted_blocks_before_the_device_used_them() -> None:
    guest, device, bitmap = rig(used=0.9)
    device.start_hinting()
    guest.driver.run()
    hinted = guest.hinted_blocks()
    assert guest.free_block_count == 0 and len(hinted) > 4
    # Memory pressure: the shrinker frees the 3 newest hinted blocks, newest first, so the
    # allocator (LIFO) hands out the oldest of them first.
    reused = guest.alloc_blocks(3)
    assert reused.tolist() == hinted[-3:].tolist()
    assert np.all(guest.state[reused] == USED)
    guest.log.get()  # the sync before these writes is over; start the log afresh
    guest.write_blocks(reused)
    r = device.process()
    # The device still applies the now-stale hints (they were valid when sent) ...
    assert r.hint_elements_applied == len(hinted)
    pages = guest.block_pages(reused)
    assert not bitmap.test(int(pages[0]))
    # ... and the classic dirty log has the writes, so the next sync marks them again.
    bitmap.merge_log(guest.log.get())
    assert all(bitmap.test(int(p)) for p in pages)


@pytest.mark.parametrize("init_on_alloc", [True, False])
def test_init_on_alloc_makes_hinted_pages_dirty_zero_pages(init_on_alloc: bool) -> None:
    guest, device, _ = rig(used=0.5, init_on_alloc=init_on_alloc)
    guest.log.get()
    device.start_hinting()
    run_until_idle(guest, device)
    pages = guest.block_pages(guest.hinted_blocks())
    log = guest.log.get()
    dirty = (log[pages // 64] >> (pages % 64).astype(np.uint64)) & 1
    if init_on_alloc:
        assert np.all(dirty == 1)
        assert np.all(is_zero(guest.contents.get(pages)))
    else:
        assert not np.any(dirty)


@pytest.mark.parametrize("poison, negotiated", [(None, False), (0, True), (0xAA, True)])
def test_page_poisoning_is_negotiated_and_told_to_the_device(
    poison: int | None, negotiated: bool
) -> None:
    _guest, device, _ = rig(poison=poison)
    assert device.has(F_PAGE_POISON) is negotiated
    assert device.poison_val == (poison or 0)
    assert device.read_config(12, 4) == (poison or 0).to_bytes(4, "little")


def test_poisoning_writes_freed_hinted_blocks() -> None:
    guest, device, _ = rig(poison=0xAA, used=0.5)
    device.start_hinting()
    run_until_idle(guest, device)
    pages = guest.block_pages(guest.hinted_blocks())
    before = guest.contents.get(pages)
    device.finish()
    guest.driver.run()
    after = guest.contents.get(pages)
    assert np.all(after != before) and not np.any(is_zero(after))


@pytest.mark.parametrize("qemu_compat", [False, True])
def test_a_config_interrupt_during_start_ends_the_round_only_with_qemu_compat(
    qemu_compat: bool,
) -> None:
    guest, device, _ = rig(8 * GIB, qemu_compat=qemu_compat, used=0.1)
    device.start_hinting()
    free = guest.free_block_count
    steps = 0

    def balloon_request(step: int) -> None:
        # A balloon target change (any config interrupt) once the device is in START.
        if step == 2:
            assert device.state is HintState.START
            device.set_target(1024)

    r = run_until_idle(guest, device, max_blocks_per_step=64, between=balloon_request)
    steps = r.steps
    assert guest.driver.config_interrupts == 2
    if qemu_compat:
        # The guest reads 0 (STOP) for the id and ends its round after 2 steps' blocks.
        assert r.blocks_hinted == 128 and r.cmd_ids == [FIRST_ID, CMD_ID_STOP]
        assert device.state is HintState.STOP
    else:
        assert r.blocks_hinted == free and steps > free // 64
    assert device.error is None


def test_guest_pages_and_ring_stay_consistent_across_rounds() -> None:
    guest, device, bitmap = rig(8 * GIB, used=0.3)
    for _ in range(3):
        bitmap.set_all()
        device.start_hinting()
        run_until_idle(guest, device, max_blocks_per_step=500)
        device.stop_hinting()
        device.finish()
        guest.driver.run()
        assert guest.hinted_block_count == 0
        assert np.count_nonzero(guest.state == FREE) == guest.free_block_count
    assert device.error is None and sum(device.rejected.values()) == 0


def test_late_hints_of_the_old_round_are_not_applied_in_requested() -> None:
    guest, device, bitmap = rig(8 * GIB)
    first = device.start_hinting()
    guest.driver.run(max_blocks=10)
    device.process()
    device.stop_hinting()
    bitmap.set_all()
    second = device.start_hinting()
    # The vCPU checked the id just before the change: 5 more blocks go out under the old id.
    # Its next check sees the new id: STOP, then the new round's id.
    step = guest.driver.run(max_blocks=5, late=True)
    assert step.blocks_hinted == 5 and step.cmd_ids_sent == (CMD_ID_STOP, second)
    late = guest.hinted_blocks()[-5:]
    assert np.all(guest.hinted_under[late] == first)
    r = device.process()
    assert r.hint_elements_ignored == 5 and r.hints.pages_cleared == 0
    assert r.cmd_ids == [CMD_ID_STOP, second] and device.state is HintState.START
    step = guest.driver.run(max_blocks=5)
    assert step.blocks_hinted == 5
    r = device.process()
    assert r.hint_elements_applied == 5
    assert r.hints.pages_cleared == 5 * guest.pages_per_block


def test_recorded_ranges_are_exactly_the_hinted_blocks() -> None:
    guest, device, _bitmap = rig(used=0.5)
    device.record_ranges = True
    device.start_hinting()
    guest.driver.run()
    r = device.process()
    assert r.ranges is not None
    blocks = guest.hinted_blocks()
    want = np.stack([guest.block_pfn[blocks], np.full(len(blocks), guest.pages_per_block)], 1)
    assert r.ranges.tolist() == want.astype(np.uint64).tolist()
    assert int(r.ranges[:, 1].sum()) == r.hints.pages_cleared


def test_recorded_ranges_include_a_cmd_id_elements_in_buffers() -> None:
    # A map with touching regions: the element's buffers are split and rounded exactly as
    # apply_hints does (a buffer into a hole never gets here: the ring reader rejects it).
    memmap = MemoryMap([(0, 8 * MIB), (8 * MIB, 8 * MIB), (32 * MIB, 8 * MIB)])
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)
    bitmap = DirtyBitmap(memmap.npages, dirty=True)
    device = FreePageHintDevice(mem, memmap, bitmap, record_ranges=True)
    device.negotiate(device.features)
    index = device.free_page_queue_index
    assert index is not None
    device.set_queue(index, 16, 0x1000, 0x2000, 0x3000)
    ring = DriverSplitRing(mem, memmap, 16, 0x1000, 0x2000, 0x3000)
    cmd_id = device.start_hinting()
    assert cmd_id is not None
    ram_view(mem, memmap, 0x4000, 4)[:] = np.frombuffer(cmd_id.to_bytes(4, "little"), np.uint8)
    ring.add_chain(
        [
            (0x4000, 4, False),
            (8 * MIB - 4096 - 100, 8192 + 200, True),  # across the touching regions, rounded
            (32 * MIB + 1, 4096, True),  # covers no whole page
        ]
    )
    r = device.process()
    assert device.state is HintState.START and r.ranges is not None
    assert r.ranges.tolist() == [[2047, 1], [2048, 1]]
    assert r.hints.pages_cleared == 2 and r.hints.hints == 2
