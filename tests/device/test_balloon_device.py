"""FreePageHintDevice against the protocol facts of DESIGN.md §4 and QEMU's
hw/virtio/virtio-balloon.c: features, config space, cmd ids, queue numbering, the
STOP/REQUESTED/START/DONE machine driven by real split-ring elements in guest RAM, device
errors, locking against stop_hinting(), and the free page reporting queue."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from helpers import MIB, PAGE
from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import (
    CMD_ID_DONE,
    CMD_ID_MIN,
    CMD_ID_STOP,
    F_DEFLATE_ON_OOM,
    F_EVENT_IDX,
    F_FREE_PAGE_HINT,
    F_PAGE_POISON,
    F_REPORTING,
    F_RING_PACKED,
    F_STATS_VQ,
    F_VERSION_1,
    FreePageHintDevice,
    HintState,
)
from pagehint.sim.driver_ring import DriverSplitRing, ram_view

BLOCK = 4 * MIB  # Linux's hint size on x86-64 (MAX_PAGE_ORDER blocks)
BLOCK_PAGES = BLOCK // PAGE
# Free page ring, reporting ring and cmd id buffers at low gpas; hints go from 1 MiB up.
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
R_DESC, R_AVAIL, R_USED = 0x4000, 0x4400, 0x4800
CMD_AREA, CMD_AREA_END = 0x8000, 0x10000
# Two 64 MiB regions with a hole between: pfns 0..16383 at gpa 0, 16384..32767 at 128 MiB.
HI = 128 * MIB
HI_PFN = 16384

Ram = npt.NDArray[np.uint8]
U64Array = npt.NDArray[np.uint64]


def bit(n: int) -> int:
    return 1 << n


def hole_map() -> MemoryMap:
    return MemoryMap([(0, 64 * MIB), (HI, 64 * MIB)])


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def cfg32(dev: FreePageHintDevice, offset: int) -> int:
    return int.from_bytes(dev.read_config(offset, 4), "little")


@dataclass
class Rig:
    """A negotiated device over a hole-y guest with its free page queue set up, the driver's
    side of that ring, and what the callbacks saw."""

    memmap: MemoryMap
    mem: Ram
    bm: DirtyBitmap
    dev: FreePageHintDevice
    ring: DriverSplitRing
    notes: list[int]
    discards: list[U64Array]
    next_buf: int = CMD_AREA
    size: int = 256

    def put(self, data: bytes) -> int:
        """Writes ``data`` to a fresh buffer in guest RAM; returns its gpa."""
        gpa = self.next_buf
        self.next_buf += 16
        if self.next_buf > CMD_AREA_END:
            self.next_buf = CMD_AREA
        ram_view(self.mem, self.memmap, gpa, len(data))[:] = np.frombuffer(data, np.uint8)
        return gpa

    def send_id(self, cmd_id: int) -> None:
        """One element with a 4-byte out-buffer holding ``cmd_id``, as the Linux driver."""
        self.ring.add(np.array([self.put(u32(cmd_id))], np.uint64), 4, writable=False)

    def hint(self, gpa: int, length: int = BLOCK) -> None:
        """One element with one in-buffer, as the Linux driver sends a free block."""
        self.ring.add(np.array([gpa], np.uint64), length, writable=True)

    def cleared(self) -> int:
        return self.memmap.npages - self.bm.count()

    def start(self) -> int:
        """A round the driver accepted: REQUESTED, then its id processed, so START."""
        cmd = self.dev.start_hinting()
        assert cmd is not None
        self.send_id(cmd)
        r = self.dev.process()
        assert r.state is HintState.START and r.cmd_ids == [cmd]
        assert self.ring.get_used().lens.tolist() == [0]  # reclaimed: later checks see theirs
        return cmd


def poison_used_ring(mem: Ram, memmap: MemoryMap, used_gpa: int, size: int) -> None:
    """Fills the used elements (after the driver zeroed the ring, not the index) with 0xAB,
    so a used length the device did not write shows up as 0xABABABAB, not a lucky 0."""
    ram_view(mem, memmap, used_gpa + 4, 8 * size)[:] = 0xAB


def make_rig(
    *,
    size: int = 256,
    refuse: int = 0,
    page_poison: bool = True,
    stats_vq: bool = True,
    reporting: bool = False,
    qemu_compat: bool = False,
) -> Rig:
    memmap = hole_map()
    mem: Ram = np.zeros(memmap.ram_bytes, np.uint8)
    bm = DirtyBitmap(memmap.npages, dirty=True)
    notes: list[int] = []
    discards: list[U64Array] = []
    dev = FreePageHintDevice(
        mem,
        memmap,
        bm,
        page_poison=page_poison,
        stats_vq=stats_vq,
        reporting=reporting,
        qemu_compat=qemu_compat,
        notify_config=lambda: notes.append(1),
        discard=lambda a: discards.append(a.copy()),
    )
    dev.negotiate(dev.features & ~refuse)
    ring = DriverSplitRing(mem, memmap, size, DESC, AVAIL, USED, event_idx=dev.has(F_EVENT_IDX))
    poison_used_ring(mem, memmap, USED, size)
    index = dev.free_page_queue_index
    assert index is not None
    dev.set_queue(index, size, DESC, AVAIL, USED)
    return Rig(memmap, mem, bm, dev, ring, notes, discards, size=size)


def reporting_ring(rig: Rig, size: int = 32) -> DriverSplitRing:
    ring = DriverSplitRing(
        rig.mem, rig.memmap, size, R_DESC, R_AVAIL, R_USED, event_idx=rig.dev.has(F_EVENT_IDX)
    )
    poison_used_ring(rig.mem, rig.memmap, R_USED, size)
    rig.dev.set_queue(rig.dev.queue_indices()["reporting"], size, R_DESC, R_AVAIL, R_USED)
    return ring


def status(dev: FreePageHintDevice) -> tuple[str | None, HintState, int]:
    """Read through a call, so mypy does not keep earlier narrowings of the properties."""
    return dev.error, dev.state, dev.negotiated


def bare_device(**kw: Any) -> FreePageHintDevice:
    memmap = hole_map()
    return FreePageHintDevice(np.zeros(memmap.ram_bytes, np.uint8), memmap, **kw)


# -- 1. features ---------------------------------------------------------------------------


def test_feature_bit_numbers() -> None:
    assert (F_STATS_VQ, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_PAGE_POISON, F_REPORTING) == (
        1,
        2,
        3,
        4,
        5,
    )
    assert (F_EVENT_IDX, F_VERSION_1, F_RING_PACKED) == (29, 32, 34)


def test_default_offer_is_qemus_plus_free_page_hint() -> None:
    f = bare_device().features
    assert [
        bool(f & bit(b)) for b in (F_FREE_PAGE_HINT, F_STATS_VQ, F_PAGE_POISON, F_VERSION_1)
    ] == [True] * 4
    assert f & (bit(F_REPORTING) | bit(F_DEFLATE_ON_OOM) | bit(F_RING_PACKED)) == 0


def test_options_toggle_offered_features() -> None:
    f = bare_device(
        stats_vq=False, page_poison=False, deflate_on_oom=True, reporting=True, packed_ring=True
    ).features
    assert f & (bit(F_STATS_VQ) | bit(F_PAGE_POISON)) == 0
    want = bit(F_DEFLATE_ON_OOM) | bit(F_REPORTING) | bit(F_RING_PACKED) | bit(F_FREE_PAGE_HINT)
    assert f & want == want


def test_negotiate_returns_intersection_and_refuses_unoffered_bits() -> None:
    dev = bare_device()
    accepted = bit(F_FREE_PAGE_HINT) | bit(F_VERSION_1) | bit(F_STATS_VQ)
    assert dev.negotiate(accepted) == accepted and dev.features_ok
    # REPORTING and bit 63 were not offered: dropped, and FEATURES_OK must be refused.
    got = dev.negotiate(accepted | bit(F_REPORTING) | bit(63))
    assert got == accepted == dev.negotiated
    assert not dev.features_ok
    assert dev.has(F_FREE_PAGE_HINT) and not dev.has(F_REPORTING)
    assert dev.negotiate(bit(F_VERSION_1)) == bit(F_VERSION_1) and not dev.hinting


# -- 2. config space -----------------------------------------------------------------------


@pytest.mark.parametrize(("page_poison", "size"), [(True, 16), (False, 12)])
def test_config_size_is_qemus(page_poison: bool, size: int) -> None:
    dev = bare_device(page_poison=page_poison)
    assert dev.config_size == size
    assert len(dev.read_config(size - 4, 4)) == 4 and dev.config_faults == 0
    assert dev.read_config(size, 1) == b"\xff" and dev.config_faults == 1


def test_config_fields_little_endian_at_qemu_offsets() -> None:
    dev = bare_device()
    dev.negotiate(dev.features)
    dev.num_pages = 0x11223344
    dev.write_config(4, u32(0x55667788))
    dev.write_config(12, u32(0xAABBCCDD))
    cmd = dev.start_hinting()
    assert cmd == CMD_ID_MIN + 1
    assert dev.read_config(0, 8) == bytes.fromhex("4433221188776655")
    assert dev.read_config(8, 4) == bytes.fromhex("01000080")
    assert dev.read_config(12, 4) == bytes.fromhex("ddccbbaa")
    assert dev.read_config(5, 2) == bytes.fromhex("7766")  # sub-field access
    assert dev.config_faults == 0


@pytest.mark.parametrize(("offset", "size"), [(12, 4), (10, 4), (12, 1), (16, 8), (1000, 2)])
def test_config_read_past_end_is_all_ones(offset: int, size: int) -> None:
    dev = bare_device(page_poison=False)  # 12 bytes
    assert dev.read_config(offset, size) == b"\xff" * size
    assert dev.config_faults == 1


def test_config_write_past_end_is_ignored() -> None:
    dev = bare_device(page_poison=False)
    dev.negotiate(dev.features)
    dev.write_config(4, u32(7))
    dev.write_config(10, u32(0xFFFFFFFF))  # straddles the end: dropped whole
    dev.write_config(12, u32(0x1234))
    assert (dev.actual, dev.poison_val, dev.config_faults) == (7, 0, 2)
    assert dev.read_config(8, 4) == u32(CMD_ID_STOP)


def test_driver_writes_only_actual_and_negotiated_poison_val() -> None:
    dev = bare_device()
    dev.negotiate(dev.features)
    dev.num_pages = 1000
    cmd = dev.start_hinting()
    dev.write_config(0, u32(5))  # num_pages: the host's, read-only
    dev.write_config(8, u32(0))  # cmd id: read-only
    dev.write_config(4, u32(0x00010002))
    dev.write_config(6, (0x0003).to_bytes(2, "little"))  # half of actual
    dev.write_config(12, u32(0xAA))
    assert (dev.num_pages, dev.actual, dev.poison_val) == (1000, 0x00030002, 0xAA)
    assert (cfg32(dev, 0), cfg32(dev, 4), cfg32(dev, 8), cfg32(dev, 12)) == (
        1000,
        0x00030002,
        cmd,
        0xAA,
    )
    assert dev.state is HintState.REQUESTED
    # PAGE_POISON offered but not accepted: poison_val stays 0 (QEMU's set_config).
    dev.negotiate(dev.features & ~bit(F_PAGE_POISON))
    dev.write_config(12, u32(0xAA))
    assert dev.poison_val == 0 and cfg32(dev, 12) == 0


@pytest.mark.parametrize(("offset", "size"), [(0, 3), (0, 0), (4, 16), (-1, 4), (-4, 1)])
def test_bad_config_access_is_value_error_and_changes_nothing(offset: int, size: int) -> None:
    dev = bare_device()
    dev.negotiate(dev.features)
    dev.write_config(4, u32(9))
    with pytest.raises(ValueError):
        dev.read_config(offset, size)
    with pytest.raises(ValueError):
        dev.write_config(offset, b"\x01" * size)
    assert (dev.actual, dev.poison_val, dev.config_faults) == (9, 0, 0)


# -- 3. cmd ids and config interrupts -------------------------------------------------------


def test_cmd_ids_count_up_from_0x80000001_as_qemu_and_show_in_config() -> None:
    dev = bare_device()
    dev.negotiate(dev.features)
    assert dev.read_config(8, 4) == u32(CMD_ID_STOP)
    ids = [dev.start_hinting() for _ in range(3)]
    # QEMU's counter starts at 0x80000000 and is incremented before each round (the real
    # pc-2G dump's first id is 0x80000001).
    assert ids == [0x80000001, 0x80000002, 0x80000003]
    assert dev.cmd_id == 0x80000003 and cfg32(dev, 8) == 0x80000003
    assert dev.state is HintState.REQUESTED


def test_cmd_id_wraps_back_to_0x80000000() -> None:
    dev = bare_device()
    dev.negotiate(dev.features)
    dev._cmd_id = 0xFFFF_FFFE  # private: skips 2**31 rounds to reach the wrap
    assert [dev.start_hinting() for _ in range(3)] == [0xFFFF_FFFF, 0x8000_0000, 0x8000_0001]


def test_stop_and_done_ids_in_config() -> None:
    dev = bare_device()
    dev.negotiate(dev.features)
    dev.start_hinting()
    dev.stop_hinting()
    assert (dev.state, cfg32(dev, 8)) == (HintState.STOP, CMD_ID_STOP) == (HintState.STOP, 0)
    dev.finish()
    assert (dev.state, cfg32(dev, 8)) == (HintState.DONE, CMD_ID_DONE) == (HintState.DONE, 1)


def test_config_interrupts_on_every_start_and_each_state_change() -> None:
    notes: list[str] = []
    memmap = hole_map()
    dev = FreePageHintDevice(
        np.zeros(memmap.ram_bytes, np.uint8),
        memmap,
        notify_config=lambda: notes.append(dev.state.value),
    )
    dev.negotiate(dev.features)
    dev.stop_hinting()  # already STOP: nothing to tell
    dev.start_hinting()
    dev.start_hinting()  # a new id in REQUESTED still needs an interrupt
    dev.stop_hinting()
    dev.stop_hinting()
    dev.finish()
    dev.finish()
    dev.start_hinting()
    dev.finish()
    # The callback runs after the change (and after the lock: it could read config).
    assert notes == ["requested", "requested", "stop", "done", "requested", "done"]


def test_hinting_calls_do_nothing_unless_negotiated() -> None:
    notes: list[int] = []
    memmap = hole_map()
    dev = FreePageHintDevice(
        np.zeros(memmap.ram_bytes, np.uint8), memmap, notify_config=lambda: notes.append(1)
    )
    dev.negotiate(bit(F_VERSION_1) | bit(F_STATS_VQ))
    assert dev.start_hinting() is None
    dev.finish()
    assert (dev.state, dev.cmd_id, notes) == (HintState.STOP, CMD_ID_MIN, [])
    assert dev.free_page_queue_index is None


# -- 4. queue numbering --------------------------------------------------------------------


def test_dense_queue_indices_follow_negotiated_features() -> None:
    dev = bare_device(reporting=True)
    dev.negotiate(dev.features)
    assert dev.queue_indices() == {
        "inflate": 0,
        "deflate": 1,
        "stats": 2,
        "free_page": 3,
        "reporting": 4,
    }
    dev.negotiate(dev.features & ~bit(F_STATS_VQ))
    assert dev.queue_indices() == {"inflate": 0, "deflate": 1, "free_page": 2, "reporting": 3}
    assert dev.free_page_queue_index == 2
    dev.negotiate(dev.features & ~bit(F_STATS_VQ) & ~bit(F_FREE_PAGE_HINT))
    assert dev.queue_indices() == {"inflate": 0, "deflate": 1, "reporting": 2}


@pytest.mark.parametrize("stats", [True, False])
def test_spec_queue_numbering_is_fixed(stats: bool) -> None:
    dev = bare_device(reporting=True, queue_numbering="spec")
    dev.negotiate(dev.features & ~(0 if stats else bit(F_STATS_VQ)))
    got = dev.queue_indices()
    assert (got["free_page"], got["reporting"], "stats" in got) == (3, 4, stats)
    if not stats:
        with pytest.raises(ValueError, match="does not exist"):
            dev.set_queue(2, 64, DESC, AVAIL, USED)


def test_set_queue_rejects_missing_queues_and_oversize_rings() -> None:
    dev = bare_device(reporting=True)
    dev.negotiate(dev.features & ~bit(F_STATS_VQ))  # free page 2, reporting 3
    for index in (4, 5, -1):
        with pytest.raises(ValueError, match="does not exist"):
            dev.set_queue(index, 32, DESC, AVAIL, USED)
    for index, size in ((2, 2048), (2, 0), (3, 64), (0, 256)):
        with pytest.raises(ValueError, match="entries"):
            dev.set_queue(index, size, DESC, AVAIL, USED)
    assert dev.free_page_queue is None
    dev.set_queue(2, 1024, 0x100000, 0x110000, 0x111000)  # QEMU's VIRTQUEUE_MAX_SIZE fits
    assert dev.free_page_queue is not None and dev.free_page_queue.size == 1024


# -- 5. the state machine over real ring elements -------------------------------------------


def test_matching_id_starts_and_hints_are_applied() -> None:
    rig = make_rig()
    cmd = rig.dev.start_hinting()
    assert cmd is not None
    rig.send_id(cmd)
    rig.hint(32 * MIB)
    rig.hint(HI + BLOCK)
    r = rig.dev.process()
    assert (r.state, r.cmd_ids, r.elements) == (HintState.START, [cmd], 3)
    assert (r.hint_elements_applied, r.hint_elements_ignored) == (2, 0)
    assert (r.hints.hints, r.hints.pages_cleared) == (2, 2 * BLOCK_PAGES)
    assert rig.cleared() == 2 * BLOCK_PAGES
    assert rig.bm.count(32 * MIB // PAGE, BLOCK_PAGES) == 0
    assert rig.bm.count(HI_PFN + BLOCK_PAGES, BLOCK_PAGES) == 0
    assert rig.bm.test(32 * MIB // PAGE - 1) and rig.bm.test(HI_PFN + 2 * BLOCK_PAGES)


@pytest.mark.parametrize("stale", [CMD_ID_MIN, CMD_ID_STOP, CMD_ID_DONE, 0x80000002])
def test_mismatching_id_in_requested_is_ignored(stale: int) -> None:
    rig = make_rig()
    cmd = rig.dev.start_hinting()
    assert cmd == CMD_ID_MIN + 1
    rig.send_id(stale)  # e.g. the previous round's id or its STOP, still in flight
    rig.hint(32 * MIB)
    r = rig.dev.process()
    assert (r.state, r.cmd_ids, r.hint_elements_ignored, rig.cleared()) == (
        HintState.REQUESTED,
        [stale],
        1,
        0,
    )
    assert cfg32(rig.dev, 8) == cmd
    rig.send_id(cmd)
    rig.hint(36 * MIB)
    r = rig.dev.process()
    assert (r.state, r.hint_elements_applied, rig.cleared()) == (HintState.START, 1, BLOCK_PAGES)


@pytest.mark.parametrize("value", [CMD_ID_STOP, CMD_ID_DONE, "current", "next"])
def test_any_out_buffer_in_start_stops(value: int | str) -> None:
    rig = make_rig()
    cmd = rig.start()
    out = {"current": cmd, "next": cmd + 1}.get(str(value), value)
    assert isinstance(out, int)
    rig.hint(32 * MIB)
    rig.send_id(out)
    rig.hint(36 * MIB)
    r = rig.dev.process()
    assert (r.state, r.cmd_ids, r.hint_elements_applied, r.hint_elements_ignored) == (
        HintState.STOP,
        [out],
        1,
        1,
    )
    assert rig.cleared() == BLOCK_PAGES and rig.bm.count(36 * MIB // PAGE, BLOCK_PAGES) == (
        BLOCK_PAGES
    )
    assert cfg32(rig.dev, 8) == CMD_ID_STOP


def test_replayed_id_after_stop_hinting_does_not_restart() -> None:
    rig = make_rig()
    cmd = rig.start()
    rig.hint(32 * MIB)
    rig.dev.process()
    rig.dev.stop_hinting()
    # QEMU's fix: only REQUESTED takes the id; a replayed id in STOP must not reopen the round
    # whose pages the sync just re-dirtied.
    rig.send_id(cmd)
    rig.hint(36 * MIB)
    r = rig.dev.process()
    assert (r.state, r.cmd_ids, r.hint_elements_ignored) == (HintState.STOP, [cmd], 1)
    assert rig.cleared() == BLOCK_PAGES and cfg32(rig.dev, 8) == CMD_ID_STOP


def test_elements_queued_before_start_hinting_are_retired_unapplied() -> None:
    # Linux reuses one buffer (cmd_id_active) for every round's id: an old, unread id element
    # must not read as the new id once the guest rewrites that buffer (a hole QEMU has).
    rig = make_rig()
    buf = rig.put(u32(CMD_ID_MIN - 1))
    rig.ring.add(np.array([buf], np.uint64), 4, writable=False)
    rig.hint(32 * MIB)
    cmd = rig.dev.start_hinting()
    assert cmd == CMD_ID_MIN + 1
    used = rig.ring.get_used()
    assert (used.heads.size, used.lens.tolist()) == (2, [0, 0])
    ram_view(rig.mem, rig.memmap, buf, 4)[:] = np.frombuffer(u32(cmd), np.uint8)
    r = rig.dev.process()
    assert (r.elements, r.state, rig.cleared()) == (0, HintState.REQUESTED, 0)
    rig.ring.add(np.array([buf], np.uint64), 4, writable=False)  # the real id element
    rig.hint(32 * MIB)
    r = rig.dev.process()
    assert (r.state, rig.cleared()) == (HintState.START, BLOCK_PAGES)


def test_hints_apply_only_in_start() -> None:
    rig = make_rig()
    rig.hint(32 * MIB)  # STOP, before any round
    r = rig.dev.process()
    assert (r.state, r.hint_elements_ignored, rig.cleared()) == (HintState.STOP, 1, 0)
    cmd = rig.dev.start_hinting()
    assert cmd is not None
    rig.hint(32 * MIB)  # REQUESTED: the driver has not sent the id yet
    r = rig.dev.process()
    assert (r.state, r.hint_elements_ignored, rig.cleared()) == (HintState.REQUESTED, 1, 0)
    rig.send_id(cmd)
    rig.hint(32 * MIB)
    r = rig.dev.process()
    assert (r.state, r.hint_elements_applied, rig.cleared()) == (HintState.START, 1, BLOCK_PAGES)
    rig.dev.finish()
    rig.hint(40 * MIB)  # DONE
    r = rig.dev.process()
    assert (r.state, r.hint_elements_ignored, rig.cleared()) == (HintState.DONE, 1, BLOCK_PAGES)


def test_every_in_buffer_of_an_element_is_applied() -> None:
    rig = make_rig()
    rig.start()
    # QEMU once applied only in_sg[0]; all three must clear.
    rig.ring.add_chain([(8 * MIB, BLOCK, True), (20 * MIB, BLOCK, True), (HI, BLOCK, True)])
    r = rig.dev.process()
    assert (r.elements, r.hint_elements_applied, r.hints.hints) == (1, 1, 3)
    assert rig.cleared() == 3 * BLOCK_PAGES
    for pfn in (8 * MIB // PAGE, 20 * MIB // PAGE, HI_PFN):
        assert rig.bm.count(pfn, BLOCK_PAGES) == 0


def test_in_buffers_of_a_cmd_id_element_see_the_new_state() -> None:
    rig = make_rig()
    cmd = rig.dev.start_hinting()
    assert cmd is not None
    # The id moves REQUESTED to START before the element's own in-buffers are looked at.
    rig.ring.add_chain([(rig.put(u32(cmd)), 4, False), (8 * MIB, BLOCK, True), (HI, BLOCK, True)])
    r = rig.dev.process()
    assert (r.state, r.hints.hints, rig.cleared()) == (HintState.START, 2, 2 * BLOCK_PAGES)
    # STOP with in-buffers: START -> STOP first, so they are not applied.
    rig.ring.add_chain([(rig.put(u32(CMD_ID_STOP)), 4, False), (20 * MIB, BLOCK, True)])
    r = rig.dev.process()
    assert (r.state, r.hints.hints, rig.cleared()) == (HintState.STOP, 0, 2 * BLOCK_PAGES)
    # A stale id with in-buffers in REQUESTED: ignored, and so are they.
    cmd2 = rig.dev.start_hinting()
    assert cmd2 == cmd + 1
    rig.ring.add_chain([(rig.put(u32(cmd)), 4, False), (20 * MIB, BLOCK, True)])
    r = rig.dev.process()
    assert (r.state, r.hints.hints, rig.cleared()) == (HintState.REQUESTED, 0, 2 * BLOCK_PAGES)


def test_used_length_is_zero_for_every_element() -> None:
    rig = make_rig()
    cmd = rig.dev.start_hinting()
    assert cmd is not None
    rig.hint(4 * MIB)  # ignored hint
    rig.send_id(cmd - 1)  # stale id
    rig.send_id(cmd)
    rig.hint(8 * MIB)  # applied hint
    rig.ring.add_chain([(12 * MIB, BLOCK, True), (16 * MIB, BLOCK, True)])
    rig.ring.add_chain([(rig.put(u32(CMD_ID_STOP)), 4, False), (20 * MIB, BLOCK, True)])
    rig.hint(24 * MIB)  # ignored again, after STOP
    r = rig.dev.process()
    assert r.elements == 7
    used = rig.ring.get_used()
    assert len(used.heads) == 7 and used.lens.tolist() == [0] * 7
    assert rig.ring.in_flight == 0 and rig.cleared() == 3 * BLOCK_PAGES


@pytest.mark.parametrize("started", [True, False])
def test_finish_after_cancel_gives_done(started: bool) -> None:
    rig = make_rig()
    cmd = rig.start() if started else rig.dev.start_hinting() or 0
    rig.notes.clear()
    rig.dev.finish()  # migration cancelled
    assert (rig.dev.state, cfg32(rig.dev, 8), rig.notes) == (HintState.DONE, CMD_ID_DONE, [1])
    rig.send_id(cmd)  # the guest's late id: DONE stays DONE
    rig.hint(32 * MIB)
    r = rig.dev.process()
    assert (r.state, r.hint_elements_ignored, rig.cleared()) == (HintState.DONE, 1, 0)


def test_budget_limits_elements_per_call() -> None:
    rig = make_rig()
    rig.start()
    for i in range(5):
        rig.hint(8 * MIB + i * BLOCK)
    r = rig.dev.process(max_elements=2)
    assert (r.elements, r.more, rig.cleared()) == (2, True, 2 * BLOCK_PAGES)
    r = rig.dev.process(max_elements=0)
    assert (r.elements, r.more) == (0, True)
    r = rig.dev.process()
    assert (r.elements, r.more, rig.cleared()) == (3, False, 5 * BLOCK_PAGES)


# -- 6. short cmd ids: device error ------------------------------------------------------------


def test_short_out_buffer_is_a_device_error() -> None:
    rig = make_rig()
    cmd = rig.dev.start_hinting()
    assert cmd is not None
    rig.hint(4 * MIB)
    rig.ring.add(np.array([rig.put(u32(cmd)[:2])], np.uint64), 2, writable=False)
    rig.send_id(cmd)  # must not be looked at: the device is broken now
    rig.hint(8 * MIB)
    r = rig.dev.process()
    assert r.error is not None and rig.dev.error == r.error
    assert (r.elements, r.state, rig.cleared()) == (2, HintState.REQUESTED, 0)
    used = rig.ring.get_used()
    assert (used.heads.tolist(), used.lens.tolist()) == ([0, 1], [0, 0])  # the bad one too
    assert rig.dev.process().elements == 0 and rig.ring.get_used().heads.size == 0
    assert rig.dev.state is HintState.REQUESTED and rig.ring.in_flight == 2
    rig.dev.reset()
    assert status(rig.dev) == (None, HintState.STOP, 0)
    with pytest.raises(RuntimeError):
        rig.dev.process()


def test_device_works_again_after_reset() -> None:
    rig = make_rig()
    cmd = rig.dev.start_hinting()
    assert cmd is not None
    rig.send_id(cmd)
    rig.ring.add(np.array([rig.put(b"\x00")], np.uint64), 1, writable=False)
    assert rig.dev.process().error is not None
    rig.dev.reset()
    dev = rig.dev
    dev.negotiate(dev.features)
    # The re-probed driver reuses the ring's pages; Linux allocates ring memory zeroed, so the
    # old used index (2) must not read as 2 elements returned to the new ring.
    rig.ring = DriverSplitRing(rig.mem, rig.memmap, 64, DESC, AVAIL, USED, event_idx=True)
    assert rig.ring.get_used().heads.size == 0
    index = dev.free_page_queue_index
    assert index is not None
    dev.set_queue(index, 64, DESC, AVAIL, USED)
    cmd2 = dev.start_hinting()
    assert cmd2 == cmd + 1  # ids are never reused across a reset
    rig.send_id(cmd2)
    assert rig.ring.kick()  # the first element: a stale avail_event must not silence it
    rig.hint(32 * MIB)
    r = dev.process()
    assert (r.error, r.state, r.elements, rig.cleared()) == (None, HintState.START, 2, BLOCK_PAGES)
    assert rig.ring.get_used().lens.tolist() == [0, 0]


def test_cmd_id_gathered_across_out_descriptors() -> None:
    rig = make_rig()
    cmd = rig.dev.start_hinting()
    assert cmd == 0x80000001
    raw = u32(cmd)
    # 4 bytes in two 2-byte descriptors at unrelated addresses: QEMU's iov_to_buf gathers.
    rig.ring.add_chain([(rig.put(raw[:2]), 2, False), (rig.put(raw[2:]), 2, False)])
    rig.hint(32 * MIB)
    r = rig.dev.process()
    assert (r.error, r.cmd_ids, r.state, rig.cleared()) == (
        None,
        [cmd],
        HintState.START,
        BLOCK_PAGES,
    )
    # An 8-byte out-buffer: the first 4 bytes are the id (here STOP).
    rig.ring.add(np.array([rig.put(u32(0) + u32(cmd))], np.uint64), 8, writable=False)
    r = rig.dev.process()
    assert (r.error, r.cmd_ids, r.state) == (None, [0], HintState.STOP)


# -- 7. qemu_compat ---------------------------------------------------------------------------


@pytest.mark.parametrize("compat", [False, True])
def test_config_during_start(compat: bool) -> None:
    rig = make_rig(qemu_compat=compat)
    cmd = rig.dev.start_hinting()
    assert cmd is not None and cfg32(rig.dev, 8) == cmd
    rig.send_id(cmd)
    rig.dev.process()
    assert rig.dev.state is HintState.START
    assert cfg32(rig.dev, 8) == (0 if compat else cmd)


# -- 8. what a hint clears ---------------------------------------------------------------------


def test_only_fully_covered_pages_are_cleared() -> None:
    rig = make_rig()
    rig.start()
    base = 32 * MIB
    rig.hint(base + 100, 3 * PAGE)  # covers pages 1 and 2 fully, 0 and 3 partly
    rig.hint(base + 8 * PAGE, PAGE - 1)  # no whole page
    rig.hint(HI + 16 * PAGE, PAGE)  # exactly one page, second region
    r = rig.dev.process()
    pfn = base // PAGE
    assert [rig.bm.test(pfn + i) for i in range(4)] == [True, False, False, True]
    assert rig.bm.test(pfn + 8) and not rig.bm.test(HI_PFN + 16)
    assert (r.hints.hints, r.hints.pages_cleared, rig.cleared()) == (3, 3, 3)


def test_hints_outside_ram_are_rejected_whole() -> None:
    rig = make_rig()
    rig.start()
    rig.hint(64 * MIB, BLOCK)  # in the hole
    rig.hint(64 * MIB - PAGE, 2 * PAGE)  # last page of region 0 plus the hole
    rig.hint(192 * MIB, PAGE)  # past the end of RAM
    rig.hint(2**64 - PAGE, 2 * PAGE)  # wraps
    rig.hint(60 * MIB, BLOCK)  # fine
    r = rig.dev.process()
    # The queue reader refuses buffers that are not RAM before any hint is applied, so the
    # hint-level "outside_ram" counter stays 0 and the element-level one counts them.
    assert rig.dev.rejected["buffer_outside_ram"] == 4
    assert r.hints.rejected.get("outside_ram", 0) == 0
    assert (r.elements, rig.cleared()) == (1, BLOCK_PAGES)
    assert rig.bm.test(64 * MIB // PAGE - 1) is False  # cleared by the good hint only
    used = rig.ring.get_used()
    assert used.lens.tolist() == [0] * 5 and rig.ring.in_flight == 0


def test_partly_outside_block_in_a_chain_drops_the_element() -> None:
    rig = make_rig()
    rig.start()
    rig.ring.add_chain([(8 * MIB, BLOCK, True), (64 * MIB, PAGE, True)])
    r = rig.dev.process()
    # Conservative (QEMU would clear the first block): nothing of a bad element is used.
    assert (r.elements, rig.cleared(), rig.dev.rejected["buffer_outside_ram"]) == (0, 0, 1)
    assert rig.ring.get_used().lens.tolist() == [0]


# -- 9. stop_hinting() against a concurrent process() ----------------------------------------------


HINT = 64 * 1024


def test_no_hint_applied_after_stop_hinting_returns() -> None:
    for iteration in range(6):
        stop_hinting_while_the_device_thread_drains(iteration)


def stop_hinting_while_the_device_thread_drains(iteration: int) -> None:
    rig = make_rig(size=256)
    dev, ring, bm = rig.dev, rig.ring, rig.bm
    npages = rig.memmap.npages
    cmd = dev.start_hinting()
    assert cmd is not None
    rig.send_id(cmd)
    done = threading.Event()
    errors: list[BaseException] = []

    def device() -> None:
        try:
            while not done.is_set():
                dev.process(max_elements=8)
            dev.process()
        except BaseException as e:  # noqa: BLE001 - re-raised by the main thread
            errors.append(e)

    # Only this (main) thread touches the driver ring; the device thread only process()es.
    slots = np.arange(16, 60 * MIB // HINT, dtype=np.uint64) * np.uint64(HINT)
    cursor = 0

    def feed() -> int:
        nonlocal cursor
        ring.get_used()
        k = ring.num_free
        idx = (cursor + np.arange(k)) % len(slots)
        cursor += k
        ring.add(slots[idx], HINT, writable=True)
        return k

    def feed_for(n: int) -> int:
        """Feeds until ``n`` hints went in, sleeping so the device thread gets the GIL."""
        fed = 0
        deadline = time.monotonic() + 10
        while fed < n:
            fed += feed()
            time.sleep(0.0001)
            assert time.monotonic() < deadline, "the device stopped taking elements"
        return fed

    t = threading.Thread(target=device)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while bm.count() == npages:  # wait for the round to be running
            feed_for(1)
            assert time.monotonic() < deadline, "the device never applied a hint"
        feed_for(2 * rig.size)  # the device is busy applying when STOP comes
        dev.stop_hinting()
        stopped_at = bm.count()
        bm.set_all()
        fed_after = feed_for(4 * rig.size)  # a slow guest still hinting the old round
    finally:
        done.set()
        t.join(30)
    assert not t.is_alive() and errors == []
    ring.get_used()
    assert ring.in_flight == 0 and fed_after > 0 and stopped_at < npages
    assert bm.count() == npages, f"iteration {iteration}: a hint landed after STOP"
    assert dev.state is HintState.STOP


# -- 10. free page reporting -----------------------------------------------------------------------


def test_reporting_discards_page_aligned_ram_ranges() -> None:
    rig = make_rig(reporting=True)
    ring = reporting_ring(rig)
    ring.add_chain([(8 * MIB, 4 * MIB, True), (HI + 2 * MIB, 2 * MIB, True)])
    ring.add(
        np.array([20 * MIB + 512, 24 * MIB], np.uint64),
        np.array([PAGE, PAGE + 1], np.uint32),
        writable=True,
    )
    r = rig.dev.process_reporting()
    assert (r.elements, r.ranges, r.bytes, r.skipped_poison) == (3, 2, 6 * MIB, 0)
    assert r.rejected == {"unaligned": 2, "outside_ram": 0}
    assert len(rig.discards) == 1
    got = rig.discards[0]
    assert got.dtype == np.uint64 and got.shape == (2, 2)
    assert got.tolist() == [[8 * MIB, 4 * MIB], [HI + 2 * MIB, 2 * MIB]]
    used = ring.get_used()
    assert used.lens.tolist() == [0, 0, 0] and ring.in_flight == 0
    assert rig.cleared() == 0  # reporting never touches the migration bitmap


def test_reporting_rejects_ranges_crossing_regions() -> None:
    # Two adjacent regions: the range is RAM, but not inside one region (QEMU's RAMBlock).
    memmap = MemoryMap([(0, 32 * MIB), (32 * MIB, 32 * MIB)])
    seen: list[U64Array] = []
    mem: Ram = np.zeros(memmap.ram_bytes, np.uint8)
    dev = FreePageHintDevice(mem, memmap, reporting=True, discard=seen.append)
    dev.negotiate(dev.features)
    ring = DriverSplitRing(mem, memmap, 32, R_DESC, R_AVAIL, R_USED)
    dev.set_queue(dev.queue_indices()["reporting"], 32, R_DESC, R_AVAIL, R_USED)
    ring.add(np.array([32 * MIB - PAGE, 40 * MIB], np.uint64), 2 * PAGE, writable=True)
    r = dev.process_reporting()
    assert (r.elements, r.ranges, r.rejected) == (2, 1, {"unaligned": 0, "outside_ram": 1})
    assert [a.tolist() for a in seen] == [[[40 * MIB, 2 * PAGE]]]


def test_reporting_skipped_while_poison_val_is_set() -> None:
    rig = make_rig(reporting=True)
    ring = reporting_ring(rig)
    rig.dev.write_config(12, u32(0xAAAAAAAA))
    ring.add(np.array([8 * MIB, 16 * MIB], np.uint64), 4 * MIB, writable=True)
    r = rig.dev.process_reporting()
    assert (r.elements, r.ranges, r.bytes, r.skipped_poison, rig.discards) == (2, 0, 0, 2, [])
    assert ring.get_used().lens.tolist() == [0, 0]
    rig.dev.write_config(12, u32(0))
    ring.add(np.array([8 * MIB], np.uint64), 4 * MIB, writable=True)
    r = rig.dev.process_reporting()
    assert (r.ranges, r.skipped_poison, len(rig.discards)) == (1, 0, 1)


def test_reporting_poison_val_ignored_without_page_poison() -> None:
    rig = make_rig(reporting=True, refuse=bit(F_PAGE_POISON))
    ring = reporting_ring(rig)
    rig.dev.write_config(12, u32(0xAAAAAAAA))  # not negotiated: QEMU keeps poison_val 0
    ring.add(np.array([8 * MIB], np.uint64), 4 * MIB, writable=True)
    r = rig.dev.process_reporting()
    assert (r.ranges, r.skipped_poison, [a.tolist() for a in rig.discards]) == (
        1,
        0,
        [[[8 * MIB, 4 * MIB]]],
    )


# -- 11. API misuse ------------------------------------------------------------------------------


def test_process_needs_the_queue() -> None:
    dev = bare_device()
    with pytest.raises(RuntimeError):
        dev.process()
    dev.negotiate(dev.features)
    with pytest.raises(RuntimeError):
        dev.process()
    with pytest.raises(RuntimeError):
        bare_device(reporting=True).process_reporting()
    rig = make_rig()
    rig.dev.negotiate(rig.dev.features)  # renegotiation drops the queues
    with pytest.raises(RuntimeError):
        rig.dev.process()


def test_small_bitmaps_are_refused() -> None:
    memmap = hole_map()
    mem: Ram = np.zeros(memmap.ram_bytes, np.uint8)
    with pytest.raises(ValueError, match="pages"):
        FreePageHintDevice(mem, memmap, DirtyBitmap(memmap.npages - 1))
    rig = make_rig()
    with pytest.raises(ValueError, match="pages"):
        rig.dev.bind(DirtyBitmap(rig.memmap.npages - 1))
    rig.start()  # the old bitmap is still bound
    rig.hint(32 * MIB)
    rig.dev.process()
    assert rig.cleared() == BLOCK_PAGES


def test_bind_none_returns_hints_unapplied() -> None:
    rig = make_rig()
    rig.start()
    rig.dev.bind(None)
    rig.hint(32 * MIB)
    r = rig.dev.process()
    assert (r.hint_elements_ignored, rig.cleared()) == (1, 0)
    other = DirtyBitmap(rig.memmap.npages, dirty=True)
    rig.dev.bind(other)
    rig.hint(32 * MIB)
    rig.dev.process()
    assert (rig.memmap.npages - other.count(), rig.cleared()) == (BLOCK_PAGES, 0)


def test_bad_arguments_are_value_errors() -> None:
    rig = make_rig()
    with pytest.raises(ValueError, match="max_elements"):
        rig.dev.process(max_elements=-1)
    with pytest.raises(ValueError):
        rig.dev.negotiate(-1)
    with pytest.raises(ValueError):
        rig.dev.negotiate(1 << 64)
    with pytest.raises(ValueError, match="queue_numbering"):
        bare_device(queue_numbering="sparse")
    assert rig.dev.features_ok and rig.dev.free_page_queue is not None


def test_packed_ring_free_page_queue() -> None:
    """With RING_PACKED negotiated the device reads the free page queue as a packed ring
    (descriptor ring, driver and device event areas): a round across a lap of an 8-slot ring."""
    from helpers import DESC as P_DESC
    from helpers import DEVICE_EVENT, DRIVER_EVENT, PackedDriver

    memmap = MemoryMap.x86(64 * MIB, below_4g=32 * MIB)
    mem = np.zeros(memmap.ram_bytes, dtype=np.uint8)
    bm = DirtyBitmap(memmap.npages, dirty=True)
    dev = FreePageHintDevice(mem, memmap, bm, packed_ring=True)
    dev.negotiate(dev.features)
    assert dev.has(F_RING_PACKED)
    index = dev.free_page_queue_index
    assert index is not None
    dev.set_queue(index, 8, P_DESC, DRIVER_EVENT, DEVICE_EVENT)
    drv = PackedDriver(mem, 8)
    cmd = dev.start_hinting()
    assert cmd is not None
    mem[0x3000:0x3004] = np.frombuffer(u32(cmd), dtype=np.uint8)
    drv.post(0x3000, 4, writable=False)
    blocks = [4 * MIB * k for k in range(1, 7)]
    for gpa in blocks[:5]:
        drv.post(gpa, 4 * MIB, writable=True)
    r = dev.process()
    assert (r.cmd_ids, r.hint_elements_applied, dev.state) == ([cmd], 5, HintState.START)
    for gpa in blocks[5:]:  # the next lap
        drv.post(gpa, 4 * MIB, writable=True)
    mem[0x3004:0x3008] = 0
    drv.post(0x3004, 4, writable=False)  # STOP
    r = dev.process()
    assert (r.cmd_ids, r.hint_elements_applied, dev.state) == ([0], 1, HintState.STOP)
    assert bm.count() == memmap.npages - 6 * 1024
    assert dev.error is None and sum(dev.rejected.values()) == 0


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
def test_balloon_sizes_are_4k_units_whatever_the_page_size(page_size: int) -> None:
    memmap = MemoryMap.x86(1 << 30, below_4g=1 << 30, page_size=page_size)
    dev = FreePageHintDevice(np.zeros(memmap.ram_bytes, dtype=np.uint8), memmap)
    dev.negotiate(dev.features)
    dev.set_target(256 * MIB // 4096)  # 256 MiB, in 4 KiB balloon pages
    assert dev.read_config(0, 4) == u32(65536) and dev.target_bytes == 256 * MIB
    dev.write_config(4, u32(1024))  # the driver reports 1024 balloon pages: 4 MiB
    assert dev.actual_bytes == 4 * MIB


# -- 11. what the device writes into guest memory ------------------------------------------------


def test_guest_write_names_the_used_ring_after_elements_are_returned() -> None:
    rig = make_rig()
    writes: list[tuple[int, int]] = []
    rig.dev.guest_write = lambda gpa, n: writes.append((gpa, n))
    used_ring = (rig.ring.used_gpa, 6 + 8 * rig.size)
    rig.dev.process()
    assert writes == []  # nothing returned, nothing written
    rig.start()  # the cmd id element comes back used
    assert writes == [used_ring]
    rig.hint(8 * MIB)
    writes.clear()
    rig.dev.process()
    assert writes == [used_ring]
