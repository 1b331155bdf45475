"""VirtioMmioTransport against virtio 1.2 §4.2 (the version 2 register layout), §2.1 (device
status), §3.1.1 (driver initialisation) and QEMU's hw/virtio/virtio-mmio.c: the register
table, feature negotiation through the select registers, FEATURES_OK refusal, reset, a driver
bring-up that hints through split and packed rings in guest RAM via QueueNotify, interrupt
status and acknowledgement, config generation, guest mistakes counted and never raised, and
random accesses that keep the transport's invariants."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MIB, PAGE, r32, state, w32
from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import (
    CONFIG_FREE_PAGE_HINT_CMD_ID,
    F_EVENT_IDX,
    F_FREE_PAGE_HINT,
    F_MUST_TELL_HOST,
    F_RING_PACKED,
    F_VERSION_1,
    FREE_PAGE_QUEUE_MAX,
    OTHER_QUEUE_MAX,
    REPORTING_QUEUE_MAX,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    FreePageHintDevice,
    HintState,
    VirtioMmioTransport,
    bit,
)
from pagehint.device import mmio as M
from pagehint.sim.driver_ring import DriverSplitRing, ram_view

BLOCK = 4 * MIB
BLOCK_PAGES = BLOCK // PAGE
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # free page ring, 256 entries
R_DESC, R_AVAIL, R_USED = 0x4000, 0x4400, 0x4800  # reporting ring, 32 entries
CMD_AREA = 0x8000
HI = 128 * MIB

Ram = npt.NDArray[np.uint8]
U64Array = npt.NDArray[np.uint64]

BRING_UP = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK


@dataclass
class Rig:
    """A device over a guest with a hole, its transport, and what the VMM callbacks saw."""

    memmap: MemoryMap
    mem: Ram
    bm: DirtyBitmap
    dev: FreePageHintDevice
    t: VirtioMmioTransport
    levels: list[bool] = field(default_factory=list)
    notes: list[int] = field(default_factory=list)
    discards: list[U64Array] = field(default_factory=list)
    next_buf: int = CMD_AREA

    def put(self, data: bytes) -> int:
        gpa = self.next_buf
        self.next_buf += 16
        ram_view(self.mem, self.memmap, gpa, len(data))[:] = np.frombuffer(data, np.uint8)
        return gpa

    def line(self) -> bool:
        """The interrupt line as the VMM last set it."""
        return self.levels[-1] if self.levels else False


def make_rig(
    *,
    small: bool = False,
    process_on_notify: bool = True,
    reporting: bool = False,
    packed_ring: bool = False,
) -> Rig:
    memmap = MemoryMap([(0, 4 * MIB)]) if small else MemoryMap([(0, 64 * MIB), (HI, 64 * MIB)])
    mem: Ram = np.zeros(memmap.ram_bytes, np.uint8)
    bm = DirtyBitmap(memmap.npages, dirty=True)
    rig_notes: list[int] = []
    discards: list[U64Array] = []
    dev = FreePageHintDevice(
        mem,
        memmap,
        bm,
        notify_config=lambda: rig_notes.append(1),
        discard=lambda a: discards.append(a.copy()),
        reporting=reporting,
        packed_ring=packed_ring,
    )
    levels: list[bool] = []
    t = VirtioMmioTransport(
        dev, base=0xD000_0000, process_on_notify=process_on_notify, interrupt=levels.append
    )
    return Rig(memmap, mem, bm, dev, t, levels, rig_notes, discards)


def offered(t: VirtioMmioTransport) -> int:
    """DeviceFeatures, both halves, as a driver reads them (§4.2.2.2: select first)."""
    w32(t, M.DEVICE_FEATURES_SEL, 0)
    lo = r32(t, M.DEVICE_FEATURES)
    w32(t, M.DEVICE_FEATURES_SEL, 1)
    return lo | r32(t, M.DEVICE_FEATURES) << 32


def write_features(t: VirtioMmioTransport, features: int) -> None:
    w32(t, M.DRIVER_FEATURES_SEL, 0)
    w32(t, M.DRIVER_FEATURES, features & 0xFFFF_FFFF)
    w32(t, M.DRIVER_FEATURES_SEL, 1)
    w32(t, M.DRIVER_FEATURES, features >> 32)


def negotiate(t: VirtioMmioTransport, drop: int = 0) -> bool:
    """§3.1.1 steps 1 to 6: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, re-read.
    Returns whether FEATURES_OK stuck."""
    w32(t, M.STATUS, 0)
    assert (r32(t, M.MAGIC_VALUE), r32(t, M.VERSION), r32(t, M.DEVICE_ID)) == (M.MAGIC, 2, 5)
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE)
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    write_features(t, offered(t) & ~drop)
    w32(t, M.STATUS, BRING_UP)
    return bool(r32(t, M.STATUS) & STATUS_FEATURES_OK)


def setup_queue(
    t: VirtioMmioTransport, index: int, size: int, desc: int, driver: int, device: int
) -> None:
    """§4.2.3.2: select, check not in use, check the maximum, size, addresses, ready."""
    w32(t, M.QUEUE_SEL, index)
    assert r32(t, M.QUEUE_READY) == 0
    assert size <= r32(t, M.QUEUE_NUM_MAX)
    w32(t, M.QUEUE_NUM, size)
    for low, gpa in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, driver)):
        w32(t, low, gpa & 0xFFFF_FFFF)
        w32(t, low + 4, gpa >> 32)
    w32(t, M.QUEUE_DEVICE_LOW, device & 0xFFFF_FFFF)
    w32(t, M.QUEUE_DEVICE_HIGH, device >> 32)
    w32(t, M.QUEUE_READY, 1)
    assert r32(t, M.QUEUE_READY) == 1


def bring_up(rig: Rig, *, drop: int = 0, callback: bool = False) -> DriverSplitRing:
    """The whole §3.1.1 sequence with the free page queue as a split ring; DRIVER_OK."""
    assert negotiate(rig.t, drop)
    index = rig.dev.free_page_queue_index
    assert index is not None
    ring = DriverSplitRing(
        rig.mem,
        rig.memmap,
        256,
        DESC,
        AVAIL,
        USED,
        event_idx=rig.dev.has(F_EVENT_IDX),
        callback=callback,
    )
    setup_queue(rig.t, index, 256, DESC, AVAIL, USED)
    w32(rig.t, M.STATUS, BRING_UP | STATUS_DRIVER_OK)
    assert r32(rig.t, M.STATUS) == BRING_UP | STATUS_DRIVER_OK
    return ring


def send_id(rig: Rig, ring: DriverSplitRing, cmd_id: int) -> None:
    ring.add(np.array([rig.put(struct.pack("<I", cmd_id))], np.uint64), 4, writable=False)


def hint(ring: DriverSplitRing, gpa: int) -> None:
    ring.add(np.array([gpa], np.uint64), BLOCK, writable=True)


def kick(rig: Rig, index: int | None = None) -> None:
    queue = rig.dev.free_page_queue_index if index is None else index
    assert queue is not None
    w32(rig.t, M.QUEUE_NOTIFY, queue)


def config_interrupt(rig: Rig) -> int:
    """The driver's config interrupt handler: reads and acknowledges InterruptStatus, then
    reads the cmd id, retrying while ConfigGeneration moves (§2.5.1)."""
    isr = r32(rig.t, M.INTERRUPT_STATUS)
    assert isr & M.INT_CONFIG_CHANGE
    w32(rig.t, M.INTERRUPT_ACK, isr)
    while True:
        before = r32(rig.t, M.CONFIG_GENERATION)
        cmd = int.from_bytes(rig.t.read(M.CONFIG + CONFIG_FREE_PAGE_HINT_CMD_ID, 4), "little")
        if r32(rig.t, M.CONFIG_GENERATION) == before:
            return cmd


# -- 1. the register table ------------------------------------------------------------------

# (name, offset, access, value after reset) for a default device: §4.2.2, table 4.1.
REGISTER_TABLE = [
    ("MagicValue", 0x000, "R", 0x7472_6976),  # "virt"; §4.2.2.1 MUST
    ("Version", 0x004, "R", 2),  # §4.2.2.1: 0x2, the non-legacy layout
    ("DeviceID", 0x008, "R", 5),  # §5: 5 is the traditional memory balloon
    ("VendorID", 0x00C, "R", M.VENDOR_PAGEHINT),
    ("DeviceFeatures", 0x010, "R", None),  # bits 0-31 with DeviceFeaturesSel 0
    ("DeviceFeaturesSel", 0x014, "W", 0),
    ("DriverFeatures", 0x020, "W", 0),
    ("DriverFeaturesSel", 0x024, "W", 0),
    ("QueueSel", 0x030, "W", 0),
    ("QueueNumMax", 0x034, "R", OTHER_QUEUE_MAX),  # queue 0, inflate, exists before FEATURES_OK
    ("QueueNum", 0x038, "W", 0),
    ("QueueReady", 0x044, "RW", 0),  # §4.2.2.1: reset clears every ready bit
    ("QueueNotify", 0x050, "W", 0),
    ("InterruptStatus", 0x060, "R", 0),  # §4.2.2.1: reset clears every bit
    ("InterruptACK", 0x064, "W", 0),
    ("Status", 0x070, "RW", 0),  # §2.1.2: 0 after reset
    ("QueueDescLow", 0x080, "W", 0),
    ("QueueDescHigh", 0x084, "W", 0),
    ("QueueDriverLow", 0x090, "W", 0),
    ("QueueDriverHigh", 0x094, "W", 0),
    ("QueueDeviceLow", 0x0A0, "W", 0),
    ("QueueDeviceHigh", 0x0A4, "W", 0),
    ("SHMSel", 0x0AC, "W", 0),
    ("SHMLenLow", 0x0B0, "R", 0xFFFF_FFFF),  # §4.2.2: no such region reads as -1
    ("SHMLenHigh", 0x0B4, "R", 0xFFFF_FFFF),
    ("SHMBaseLow", 0x0B8, "R", 0xFFFF_FFFF),
    ("SHMBaseHigh", 0x0BC, "R", 0xFFFF_FFFF),
    ("ConfigGeneration", 0x0FC, "R", 0),
]


def test_the_register_table_matches_the_module_constants() -> None:
    assert {off: acc for _, off, acc, _ in REGISTER_TABLE} == M.REGISTERS
    assert [getattr(M, n) for n in ("QUEUE_READY", "QUEUE_NOTIFY", "STATUS", "CONFIG")] == [
        0x44,
        0x50,
        0x70,
        0x100,
    ]


@pytest.mark.parametrize(("name", "offset", "access", "value"), REGISTER_TABLE)
def test_register_after_reset(name: str, offset: int, access: str, value: int | None) -> None:
    rig = make_rig(small=True)
    t = rig.t
    if value is None:
        value = rig.dev.features & 0xFFFF_FFFF
    if "R" in access:
        assert r32(t, offset) == value, name
    else:  # §4.2.2.2: the driver MUST NOT read a write-only register; QEMU reads it as 0
        assert r32(t, offset) == 0 and t.faults == {"read_write_only": 1}, name
    if access == "R":  # the driver MUST NOT write a read-only register: ignored
        w32(t, offset, 0x1234_5678)
        assert r32(t, offset) == value and t.faults == {"write_read_only": 1}, name


def test_accesses_that_are_not_32_bit_aligned_registers_are_counted() -> None:
    t = make_rig(small=True).t
    assert t.read(M.MAGIC_VALUE, 2) == b"\0\0"  # wrong width: 0 (QEMU)
    assert t.read(M.MAGIC_VALUE + 1, 4) == bytes(4)
    assert t.read(M.MAGIC_VALUE, 8) == bytes(8)
    t.write(M.STATUS, b"\x01")  # ignored
    assert r32(t, M.STATUS) == 0
    assert t.read(0x028, 4) == bytes(4)  # GuestPageSize: version 1 only
    w32(t, 0x040, 1)  # QueuePFN
    assert t.read(M.QUEUE_RESET, 4) == bytes(4)  # RING_RESET not offered
    w32(t, 0x0F0, 1)
    assert t.read(0x1FC, 8) == bytes(8)  # runs off the window
    t.write(0x1FE, b"\1\2\3\4")
    assert t.faults == {
        "wrong_width": 3,
        "unaligned": 1,
        "legacy_register": 2,
        "unknown_register": 2,
        "beyond_window": 2,
    }


def test_vmm_mistakes_raise() -> None:
    t = make_rig(small=True).t
    with pytest.raises(ValueError, match="outside"):
        t.read(-4, 4)
    with pytest.raises(ValueError, match="outside"):
        t.write(t.size, b"\0\0\0\0")
    with pytest.raises(ValueError, match="1 to 8"):
        t.read(0, 0)
    with pytest.raises(ValueError, match="1 to 8"):
        t.write(0, bytes(16))
    with pytest.raises(TypeError, match="bytes"):
        t.write(0, 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="offset"):
        t.read(1.0, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base"):
        VirtioMmioTransport(make_rig(small=True).dev, base=-1)
    assert t.faults == {}
    assert t.size == 0x200 and t.contains(0xD000_0000 + 0x1FF) and not t.contains(0xD000_0200)


# -- 2. features and status --------------------------------------------------------------------


def test_feature_negotiation_through_both_halves() -> None:
    rig = make_rig(small=True, packed_ring=True)
    t, dev = rig.t, rig.dev
    assert offered(t) == dev.features
    w32(t, M.DEVICE_FEATURES_SEL, 2)  # no bits above 63: reads 0
    assert r32(t, M.DEVICE_FEATURES) == 0
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    want = bit(F_FREE_PAGE_HINT) | bit(F_VERSION_1) | bit(F_RING_PACKED)
    write_features(t, want)
    assert t.driver_features == want and dev.negotiated == 0  # nothing before FEATURES_OK
    w32(t, M.STATUS, BRING_UP)
    assert r32(t, M.STATUS) == BRING_UP
    assert dev.negotiated == want and dev.features_ok and dev.has(F_RING_PACKED)
    # §3.1.1 step 5: no new feature bits after FEATURES_OK.
    write_features(t, want | bit(F_EVENT_IDX))
    assert dev.negotiated == want and t.faults == {"features_after_features_ok": 2}
    # Only the existing queues have a maximum: inflate, deflate, free page (no stats).
    sizes = []
    for index in range(5):
        w32(t, M.QUEUE_SEL, index)
        sizes.append(r32(t, M.QUEUE_NUM_MAX))
    assert sizes == [OTHER_QUEUE_MAX, OTHER_QUEUE_MAX, FREE_PAGE_QUEUE_MAX, 0, 0]


@pytest.mark.parametrize(
    "features",
    [
        pytest.param(bit(F_MUST_TELL_HOST) | bit(F_VERSION_1), id="unoffered-low-bit"),
        pytest.param(bit(F_VERSION_1) | bit(40), id="unoffered-high-bit"),
        pytest.param(bit(F_FREE_PAGE_HINT), id="no-version-1"),
    ],
)
def test_features_ok_is_refused_for_features_the_device_does_not_take(features: int) -> None:
    """§2.2.1: the device MUST fail to set FEATURES_OK; §3.1.1 step 6: the driver re-reads."""
    rig = make_rig(small=True)
    t, dev = rig.t, rig.dev
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    write_features(t, features)
    w32(t, M.STATUS, BRING_UP)
    assert r32(t, M.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER
    assert t.faults == {"features_refused": 1}
    assert dev.negotiated == 0 and not dev.features_ok
    w32(t, M.QUEUE_SEL, 0)  # no queue can be made ready without FEATURES_OK
    w32(t, M.QUEUE_NUM, 64)
    w32(t, M.QUEUE_READY, 1)
    assert r32(t, M.QUEUE_READY) == 0
    assert t.faults["queue_ready_before_features_ok"] == 1
    # The driver gives up (FAILED), resets, and tries again with what the device offers.
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FAILED)
    assert r32(t, M.STATUS) & STATUS_FAILED
    assert negotiate(t) and dev.features_ok


def test_driver_features_above_bit_63_refuse_features_ok() -> None:
    t = make_rig(small=True).t
    write_features(t, bit(F_VERSION_1))
    w32(t, M.DRIVER_FEATURES_SEL, 2)
    w32(t, M.DRIVER_FEATURES, 1)
    w32(t, M.STATUS, BRING_UP)
    assert not r32(t, M.STATUS) & STATUS_FEATURES_OK
    assert t.faults == {"driver_features_high": 1, "features_refused": 1}


def test_status_bits_only_accumulate_and_needs_reset_is_the_devices() -> None:
    """§2.1.1: the driver MUST NOT clear a bit; writing 0 is the reset."""
    t = make_rig(small=True).t
    assert negotiate(t)
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE)  # would clear DRIVER and FEATURES_OK
    assert r32(t, M.STATUS) == BRING_UP
    w32(t, M.STATUS, BRING_UP | STATUS_DEVICE_NEEDS_RESET)
    assert r32(t, M.STATUS) == BRING_UP
    w32(t, M.STATUS, 0x1_0000 | BRING_UP)  # bits above the byte are not status
    assert r32(t, M.STATUS) == BRING_UP
    assert t.faults == {"status_cleared_bits": 1, "status_needs_reset_bit": 1}
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert t.faults["status_cleared_bits"] == 2


def test_driver_ok_without_features_ok_is_counted() -> None:
    t = make_rig(small=True).t
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert r32(t, M.STATUS) == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK
    assert t.faults == {"driver_ok_without_features_ok": 1}


def test_writing_zero_resets_the_transport_and_the_device() -> None:
    rig = make_rig()
    t, dev = rig.t, rig.dev
    bring_up(rig)
    w32(t, M.DEVICE_FEATURES_SEL, 1)
    w32(t, M.QUEUE_SEL, 3)
    dev.start_hinting()  # a config interrupt is pending
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_CONFIG_CHANGE and rig.line()
    generation = r32(t, M.CONFIG_GENERATION)
    w32(t, M.STATUS, 0)
    assert r32(t, M.STATUS) == 0 and r32(t, M.INTERRUPT_STATUS) == 0
    assert rig.levels == [True, False]  # the line goes down with the bits
    assert t.driver_features == 0 and not t.queue_ready(3)
    assert r32(t, M.DEVICE_FEATURES) == dev.features & 0xFFFF_FFFF  # DeviceFeaturesSel is 0
    assert r32(t, M.QUEUE_NUM_MAX) == OTHER_QUEUE_MAX  # QueueSel 0, inflate
    w32(t, M.QUEUE_SEL, 3)
    assert r32(t, M.QUEUE_READY) == 0 and r32(t, M.QUEUE_NUM_MAX) == 0  # not negotiated
    assert dev.negotiated == 0 and dev.free_page_queue is None and dev.state is HintState.STOP
    assert r32(t, M.CONFIG_GENERATION) == generation  # it only ever moves on
    assert t.faults == {}


# -- 3. bring-up and hinting -------------------------------------------------------------------


def test_bring_up_then_hint_through_a_split_ring() -> None:
    """§3.1.1 in full, then a hinting round as Linux runs it: the config interrupt, the cmd
    id read under ConfigGeneration, the id and a hint made available, QueueNotify. Only the
    block hinted after the id is cleared; the one before it was sent outside START."""
    rig = make_rig()
    t, dev, bm = rig.t, rig.dev, rig.bm
    ring = bring_up(rig, drop=bit(F_EVENT_IDX))
    assert dev.queue_indices() == {"inflate": 0, "deflate": 1, "stats": 2, "free_page": 3}
    assert rig.levels == [] and r32(t, M.CONFIG_GENERATION) == 0
    cmd = dev.start_hinting()  # the migration thread, after a sync
    assert cmd is not None and rig.notes == [1]  # the previous notify_config still runs
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_CONFIG_CHANGE and rig.levels == [True]
    assert r32(t, M.CONFIG_GENERATION) == 1
    assert config_interrupt(rig) == cmd
    assert r32(t, M.INTERRUPT_STATUS) == 0 and rig.levels == [True, False]
    hint(ring, 8 * MIB)  # before the id: the device is still REQUESTED
    send_id(rig, ring, cmd)
    hint(ring, 16 * MIB)
    assert ring.kick()
    kick(rig)
    assert dev.state is HintState.START
    runs, lens = bm.dirty_runs()
    first = 16 * MIB // PAGE
    assert runs.tolist() == [0, first + BLOCK_PAGES]
    assert lens.tolist() == [first, rig.memmap.npages - first - BLOCK_PAGES]
    assert ring.get_used().lens.tolist() == [0, 0, 0]
    # VRING_AVAIL_F_NO_INTERRUPT (Linux's free page queue has no callback): no bit 0.
    assert r32(t, M.INTERRUPT_STATUS) == 0 and rig.levels == [True, False]
    dev.stop_hinting()
    assert config_interrupt(rig) == 0  # CMD_ID_STOP
    assert r32(t, M.CONFIG_GENERATION) == 2 and t.faults == {}


def test_used_buffer_interrupts_follow_the_drivers_suppression() -> None:
    """Bit 0 is set, and the line raised, only when the ring asks for an interrupt."""
    rig = make_rig()
    t, dev = rig.t, rig.dev
    ring = bring_up(rig, drop=bit(F_EVENT_IDX), callback=True)
    cmd = dev.start_hinting()
    assert cmd is not None
    config_interrupt(rig)
    send_id(rig, ring, cmd)
    kick(rig)
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_USED_BUFFER and rig.levels == [True, False, True]
    hint(ring, 4 * MIB)
    kick(rig)  # a second event while the line is up: asserted again
    assert rig.levels == [True, False, True, True]
    dev.stop_hinting()  # and a config change on top
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_USED_BUFFER | M.INT_CONFIG_CHANGE
    w32(t, M.INTERRUPT_ACK, M.INT_USED_BUFFER)  # part: the line stays up
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_CONFIG_CHANGE and rig.line()
    w32(t, M.INTERRUPT_ACK, M.INT_CONFIG_CHANGE | 0x80)  # undefined bit: counted
    assert r32(t, M.INTERRUPT_STATUS) == 0 and rig.levels[-1] is False
    assert t.faults == {"interrupt_ack_undefined_bits": 1}
    w32(t, M.INTERRUPT_ACK, 3)  # nothing left: no second lowering
    assert rig.levels.count(False) == 2
    assert len(ring.get_used().heads) == 2


def test_config_changes_before_driver_ok_bump_the_generation_only() -> None:
    """§2.5.1: ConfigGeneration follows every change; no interrupt before DRIVER_OK."""
    rig = make_rig(small=True)
    t, dev = rig.t, rig.dev
    dev.set_target(256)
    assert r32(t, M.CONFIG_GENERATION) == 1 and r32(t, M.INTERRUPT_STATUS) == 0
    assert rig.levels == [] and rig.notes == [1]
    assert t.read(M.CONFIG, 4) == (256).to_bytes(4, "little")
    assert t.read(M.CONFIG, 8) == (256).to_bytes(4, "little") + bytes(4)
    t.write(M.CONFIG + 4, (7).to_bytes(4, "little"))  # actual
    assert dev.actual == 7
    t.write(M.CONFIG + 4, (9).to_bytes(2, "little"))
    assert dev.actual == 9
    assert t.read(M.CONFIG + 14, 4) == b"\xff" * 4  # past the 16-byte config (QEMU)
    assert t.read(M.CONFIG, 3) == bytes(3)
    assert t.faults == {"config_out_of_range": 1, "config_width": 1}


def test_notify_config_installed_by_the_transport_chains_and_survives_reset() -> None:
    rig = make_rig()
    bring_up(rig)
    rig.dev.set_target(1)
    w32(rig.t, M.STATUS, 0)
    bring_up(rig)
    rig.dev.set_target(2)
    assert rig.notes == [1, 1] and r32(rig.t, M.CONFIG_GENERATION) == 2
    assert r32(rig.t, M.INTERRUPT_STATUS) == M.INT_CONFIG_CHANGE


def test_packed_ring_bring_up() -> None:
    """With RING_PACKED negotiated the queue registers name the descriptor ring and the
    driver and device event areas; a size need not be a power of two."""
    rig = make_rig(packed_ring=True)
    t, dev, bm = rig.t, rig.dev, rig.bm
    assert negotiate(t, drop=bit(F_EVENT_IDX)) and dev.has(F_RING_PACKED)
    index = dev.free_page_queue_index
    assert index is not None
    size = 6
    setup_queue(t, index, size, DESC, AVAIL, AVAIL + 4)
    w32(t, M.STATUS, BRING_UP | STATUS_DRIVER_OK)
    slot, wrap, ids = 0, True, 0

    def post(addr: int, length: int, writable: bool) -> None:
        nonlocal slot, wrap, ids
        avail, used = 1 << 7, 1 << 15
        flags = (2 if writable else 0) | (avail if wrap else used)
        at = DESC + 16 * slot
        rig.mem[at : at + 16] = np.frombuffer(
            struct.pack("<QIHH", addr, length, ids % size, flags), np.uint8
        )
        ids += 1
        slot += 1
        if slot == size:
            slot, wrap = 0, not wrap

    cmd = dev.start_hinting()
    assert cmd is not None and config_interrupt(rig) == cmd
    post(rig.put(struct.pack("<I", cmd)), 4, False)
    blocks = [BLOCK * k for k in range(1, 9)]  # across a lap of the 6-slot ring
    for gpa in blocks[:5]:
        post(gpa, BLOCK, True)
    kick(rig)
    for gpa in blocks[5:]:
        post(gpa, BLOCK, True)
    kick(rig)
    assert dev.state is HintState.START
    assert bm.count() == rig.memmap.npages - len(blocks) * BLOCK_PAGES
    assert dev.error is None and t.faults == {}


def test_reporting_queue_notify_discards() -> None:
    rig = make_rig(reporting=True)
    t, dev = rig.t, rig.dev
    bring_up(rig)
    index = dev.queue_indices()["reporting"]
    w32(t, M.QUEUE_SEL, index)
    assert r32(t, M.QUEUE_NUM_MAX) == REPORTING_QUEUE_MAX
    ring = DriverSplitRing(rig.mem, rig.memmap, 32, R_DESC, R_AVAIL, R_USED, callback=True)
    w32(t, M.STATUS, 0)  # queues are set up before DRIVER_OK: start over
    assert negotiate(t)
    setup_queue(t, 3, 256, DESC, AVAIL, USED)
    setup_queue(t, index, 32, R_DESC, R_AVAIL, R_USED)
    w32(t, M.STATUS, BRING_UP | STATUS_DRIVER_OK)
    ring.add(np.array([32 * MIB], np.uint64), 2 * MIB, writable=True)
    kick(rig, index)
    assert [a.tolist() for a in rig.discards] == [[[32 * MIB, 2 * MIB]]]
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_USED_BUFFER


# -- 4. queue set-up mistakes -----------------------------------------------------------------


def test_queue_ready_refusals_leave_it_zero() -> None:
    rig = make_rig()
    t = rig.t
    assert negotiate(t)
    fp = 3

    def try_ready(size: int, desc: int = DESC) -> int:
        w32(t, M.QUEUE_SEL, fp)
        w32(t, M.QUEUE_NUM, size)
        w32(t, M.QUEUE_DESC_LOW, desc)
        w32(t, M.QUEUE_DRIVER_LOW, AVAIL)
        w32(t, M.QUEUE_DEVICE_LOW, USED)
        w32(t, M.QUEUE_READY, 1)
        return r32(t, M.QUEUE_READY)

    assert try_ready(0) == 0
    assert try_ready(2048) == 0
    assert try_ready(100) == 0
    assert try_ready(256, desc=80 * MIB) == 0  # the hole
    assert t.faults == {
        "queue_size_zero": 1,
        "queue_size_too_large": 1,
        "queue_size_not_power_of_2": 1,
        "queue_refused": 1,
    }
    assert r32(t, M.STATUS) == BRING_UP  # not DEVICE_NEEDS_RESET: the driver may retry
    assert try_ready(256) == 1 and rig.dev.free_page_queue is not None
    w32(t, M.QUEUE_NUM, 128)  # §4.2.2.2: not while ready
    w32(t, M.QUEUE_DESC_HIGH, 1)
    assert t.queue_rings(fp) == (256, DESC, AVAIL, USED)
    w32(t, M.QUEUE_READY, 1)  # again: nothing changes
    assert t.faults["queue_write_while_ready"] == 2
    w32(t, M.QUEUE_SEL, 9)  # no such queue
    w32(t, M.QUEUE_NUM, 8)
    w32(t, M.QUEUE_READY, 1)
    assert r32(t, M.QUEUE_READY) == 0 and t.faults["queue_does_not_exist"] == 2


def test_a_queue_made_not_ready_is_left_alone() -> None:
    """§4.2.2.1: the device MUST NOT access a queue whose QueueReady is 0, so the device
    drops it, and start_hinting() no longer retires its elements."""
    rig = make_rig()
    t, dev = rig.t, rig.dev
    ring = bring_up(rig)
    hint(ring, 4 * MIB)
    w32(t, M.QUEUE_SEL, 3)
    w32(t, M.QUEUE_READY, 0)
    assert r32(t, M.QUEUE_READY) == 0 and dev.free_page_queue is None
    dev.start_hinting()
    assert dev.retired_at_start == 0 and ring.get_used().heads.tolist() == []
    kick(rig)
    assert t.faults == {"notify_queue_not_ready": 1}
    setup_queue(t, 3, 256, DESC, AVAIL, USED)  # the driver may set it up again
    assert dev.free_page_queue is not None


def test_notifications_wait_for_driver_ok() -> None:
    """§2.1.2: no buffer is consumed before DRIVER_OK; the kick is served when it comes."""
    rig = make_rig()
    t, dev = rig.t, rig.dev
    assert negotiate(t, drop=bit(F_EVENT_IDX))
    ring = DriverSplitRing(rig.mem, rig.memmap, 256, DESC, AVAIL, USED)
    setup_queue(t, 3, 256, DESC, AVAIL, USED)
    send_id(rig, ring, 0)
    kick(rig)
    kick(rig, 99)
    assert t.faults == {"notify_before_driver_ok": 1, "notify_unknown_queue": 1}
    assert ring.get_used().heads.tolist() == []
    w32(t, M.STATUS, BRING_UP | STATUS_DRIVER_OK)
    assert len(ring.get_used().heads) == 1 and dev.error is None


def test_vmm_queues_are_passed_to_queue_notify() -> None:
    rig = make_rig()
    seen: list[int] = []
    rig.t.queue_notify = seen.append
    bring_up(rig)
    setup_queue(rig.t, 2, 64, 0x20000, 0x21000, 0x22000)  # stats: the VMM's queue
    assert rig.t.queue_rings(2) == (64, 0x20000, 0x21000, 0x22000)
    kick(rig, 2)
    kick(rig, 3)
    assert seen == [2, 3]
    rig.t.signal_used()
    assert r32(rig.t, M.INTERRUPT_STATUS) == M.INT_USED_BUFFER and rig.line()


def test_a_device_error_sets_needs_reset_with_a_config_interrupt() -> None:
    """QEMU's virtio_error on a cmd id buffer of fewer than 4 bytes; §2.1.2: with DRIVER_OK
    set, DEVICE_NEEDS_RESET comes with a configuration change notification."""
    rig = make_rig()
    t, dev = rig.t, rig.dev
    ring = bring_up(rig, drop=bit(F_EVENT_IDX))
    ring.add(np.array([rig.put(b"\1\0")], np.uint64), 2, writable=False)
    kick(rig)
    assert dev.error is not None
    assert r32(t, M.STATUS) == BRING_UP | STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_CONFIG_CHANGE and rig.line()
    assert r32(t, M.CONFIG_GENERATION) == 1
    w32(t, M.STATUS, 0)
    assert bring_up(rig) is not None and dev.error is None


# -- 5. threads ------------------------------------------------------------------------------


def test_process_on_notify_false_leaves_the_work_to_the_device_thread() -> None:
    rig = make_rig(process_on_notify=False)
    t, dev = rig.t, rig.dev
    ring = bring_up(rig, drop=bit(F_EVENT_IDX), callback=True)
    cmd = dev.start_hinting()
    assert cmd is not None
    config_interrupt(rig)
    send_id(rig, ring, cmd)
    hint(ring, 4 * MIB)
    kick(rig)
    assert t.notified.is_set() and dev.state is HintState.REQUESTED
    results: list[object] = []

    def device_thread() -> None:
        assert t.notified.wait(10)
        results.append(t.process_pending())

    th = threading.Thread(target=device_thread)
    th.start()
    th.join(10)
    assert not t.notified.is_set() and state(dev) is HintState.START
    [done] = results
    assert isinstance(done, dict) and done[3].hint_elements_applied == 1
    assert r32(t, M.INTERRUPT_STATUS) == M.INT_USED_BUFFER
    assert t.process_pending() == {}


def test_config_interrupts_from_the_migration_thread_keep_the_line_right() -> None:
    """A vCPU thread takes interrupts while the migration thread runs rounds: the line as
    last set always matches InterruptStatus, and no change is lost."""
    rig = make_rig()
    t, dev = rig.t, rig.dev
    bring_up(rig)
    rounds = 300
    done = threading.Event()

    def migration() -> None:
        for _ in range(rounds):
            dev.start_hinting()
            dev.stop_hinting()
        done.set()

    acked = 0
    th = threading.Thread(target=migration)
    th.start()
    while not done.is_set() or r32(t, M.INTERRUPT_STATUS):
        isr = r32(t, M.INTERRUPT_STATUS)
        if isr:
            w32(t, M.INTERRUPT_ACK, isr)
            acked += 1
    th.join()
    assert r32(t, M.CONFIG_GENERATION) == 2 * rounds
    assert acked >= 1 and rig.line() is False and t.faults == {}


# -- 6. random accesses ----------------------------------------------------------------------

_OFFSETS = st.one_of(
    st.sampled_from([*sorted(M.REGISTERS), M.CONFIG, M.CONFIG + 4, M.CONFIG + 8, M.CONFIG + 12]),
    st.integers(0, 0x1FF),
)
_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 8, 15, 16, 64, 128, 255, 256, 1024, 0x1000, 0xFFFF_FFFF]),
    st.integers(0, (1 << 64) - 1),
)
_ACCESS = st.tuples(st.booleans(), _OFFSETS, st.sampled_from([1, 2, 3, 4, 8]), _VALUES)


def check_invariants(rig: Rig) -> None:
    t, dev = rig.t, rig.dev
    assert r32(t, M.MAGIC_VALUE) == M.MAGIC and r32(t, M.VERSION) == 2
    status = r32(t, M.STATUS)
    isr = r32(t, M.INTERRUPT_STATUS)
    assert status == t.status and status <= 0xFF
    if status & STATUS_FEATURES_OK:
        assert dev.features_ok and dev.has(F_VERSION_1)
    assert isr & ~3 == 0
    if isr:
        assert status & STATUS_DRIVER_OK
    assert rig.line() == bool(isr)
    for index in range(8):
        if t.queue_ready(index):
            assert status & STATUS_FEATURES_OK and dev.queue_max(index) > 0
            rings = t.queue_rings(index)
            assert rings is not None and 1 <= rings[0] <= dev.queue_max(index)
    assert all(isinstance(n, int) and n > 0 for n in t.faults.values())


@settings(max_examples=150, deadline=None)
@given(
    live=st.booleans(),
    accesses=st.lists(_ACCESS, max_size=40),
    migration=st.lists(st.sampled_from(["start", "stop", "finish", "target"]), max_size=4),
)
def test_random_accesses_never_raise_and_keep_invariants(
    live: bool, accesses: list[tuple[bool, int, int, int]], migration: list[str]
) -> None:
    rig = make_rig(small=True, reporting=True, packed_ring=live)
    if live:  # a device in use, so random notifies reach a real ring
        assert negotiate(rig.t, drop=bit(F_RING_PACKED))
        DriverSplitRing(rig.mem, rig.memmap, 64, DESC, AVAIL, USED, callback=True)
        setup_queue(rig.t, 3, 64, DESC, AVAIL, USED)
        w32(rig.t, M.STATUS, BRING_UP | STATUS_DRIVER_OK)
    actions = iter(migration)
    for is_write, offset, size, value in accesses:
        if offset + size > rig.t.size:
            size = 1
        if is_write:
            rig.t.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(rig.t.read(offset, size)) == size
        step = next(actions, None)
        if step == "start":
            rig.dev.start_hinting()
        elif step == "stop":
            rig.dev.stop_hinting()
        elif step == "finish":
            rig.dev.finish()
        elif step == "target":
            rig.dev.set_target(value & 0xFFFF)
        check_invariants(rig)
