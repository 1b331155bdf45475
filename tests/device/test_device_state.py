"""Live migration of the device state (issue 11): ``save_state`` / ``restore_state`` of
``FreePageHintDevice`` and ``VirtioMmioTransport``, as QEMU's vmstate for a virtio device. The
state survives JSON; a destination built over a copy of the source's RAM continues the free
page queue exactly where the source stopped (no hint lost, none applied twice, the round's
state machine going on); a malformed state is refused without changing anything."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest

from helpers import MIB, PAGE, PackedDriver, r32, state, w32
from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import (
    CMD_ID_STOP,
    CONFIG_FREE_PAGE_HINT_CMD_ID,
    F_EVENT_IDX,
    F_RING_PACKED,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
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
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # split free page ring, 256 entries
P_DESC, P_DRIVER, P_DEVICE = 0x1000, 0x2000, 0x2004  # packed ring (helpers.PackedDriver's)
CMD_AREA = 0x8000
HI = 128 * MIB
BRING_UP = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK

Ram = npt.NDArray[np.uint8]
State = dict[str, object]


@dataclass
class Side:
    """One end of the migration: guest RAM, the dirty bitmap, the device and its transport,
    and the interrupt levels the VMM was given."""

    memmap: MemoryMap
    mem: Ram
    bm: DirtyBitmap
    dev: FreePageHintDevice
    t: VirtioMmioTransport
    levels: list[bool] = field(default_factory=list)


def make_side(mem: Ram | None = None, *, packed_ring: bool = False) -> Side:
    """A device and transport over a guest with a hole; ``mem`` is the RAM (zeroes if not
    given). Every page starts dirty."""
    memmap = MemoryMap([(0, 64 * MIB), (HI, 64 * MIB)])
    ram: Ram = np.zeros(memmap.ram_bytes, np.uint8) if mem is None else mem
    bm = DirtyBitmap(memmap.npages, dirty=True)
    dev = FreePageHintDevice(ram, memmap, bm, packed_ring=packed_ring)
    levels: list[bool] = []
    t = VirtioMmioTransport(dev, base=0xD000_0000, interrupt=levels.append)
    return Side(memmap, ram, bm, dev, t, levels)


def bring_up(side: Side, size: int, desc: int, driver: int, device: int) -> None:
    """§3.1.1 through the registers, without EVENT_IDX; the free page queue at these rings."""
    t = side.t
    w32(t, M.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    w32(t, M.DEVICE_FEATURES_SEL, 0)
    lo = r32(t, M.DEVICE_FEATURES)
    w32(t, M.DEVICE_FEATURES_SEL, 1)
    features = (lo | r32(t, M.DEVICE_FEATURES) << 32) & ~bit(F_EVENT_IDX)
    for sel in (0, 1):
        w32(t, M.DRIVER_FEATURES_SEL, sel)
        w32(t, M.DRIVER_FEATURES, features >> (32 * sel) & 0xFFFF_FFFF)
    w32(t, M.STATUS, BRING_UP)
    index = side.dev.free_page_queue_index
    assert index is not None
    w32(t, M.QUEUE_SEL, index)
    w32(t, M.QUEUE_NUM, size)
    for low, gpa in ((M.QUEUE_DESC_LOW, desc), (M.QUEUE_DRIVER_LOW, driver)):
        w32(t, low, gpa)
    w32(t, M.QUEUE_DEVICE_LOW, device)
    w32(t, M.QUEUE_READY, 1)
    w32(t, M.STATUS, BRING_UP | STATUS_DRIVER_OK)
    assert r32(t, M.STATUS) == BRING_UP | STATUS_DRIVER_OK


def read_cmd_id(side: Side) -> int:
    """The driver's config interrupt: acknowledge, then read the cmd id."""
    w32(side.t, M.INTERRUPT_ACK, r32(side.t, M.INTERRUPT_STATUS))
    return int.from_bytes(side.t.read(M.CONFIG + CONFIG_FREE_PAGE_HINT_CMD_ID, 4), "little")


def kick(side: Side) -> None:
    index = side.dev.free_page_queue_index
    assert index is not None
    w32(side.t, M.QUEUE_NOTIFY, index)


def moved(ring: DriverSplitRing, mem: Ram, memmap: MemoryMap) -> DriverSplitRing:
    """The driver's ring as the guest sees it after the migration: the same driver state (it
    is guest memory too), its ring views now in the destination's RAM."""
    out = copy.copy(ring)
    n = ring.size
    out._desc = ram_view(mem, memmap, ring.desc_gpa, 16 * n).view(out._desc.dtype)
    out._avail = ram_view(mem, memmap, ring.avail_gpa, 6 + 2 * n).view("<u2")
    out._used_hdr = ram_view(mem, memmap, ring.used_gpa, 4).view("<u2")
    out._used = ram_view(mem, memmap, ring.used_gpa + 4, 8 * n).view("<u4").reshape(n, 2)
    out._avail_event = ram_view(mem, memmap, ring.used_gpa + 4 + 8 * n, 2).view("<u2")
    return out


@dataclass
class Source:
    """A source mid-round: hints the device took, then hints and a STOP it has not."""

    side: Side
    ring: DriverSplitRing
    cmd_id: int
    processed: list[int]
    unprocessed: list[int]


def source_mid_round() -> Source:
    side = make_side()
    bring_up(side, 256, DESC, AVAIL, USED)
    ring = DriverSplitRing(side.mem, side.memmap, 256, DESC, AVAIL, USED)
    cmd = side.dev.start_hinting()
    assert cmd is not None and read_cmd_id(side) == cmd
    ram_view(side.mem, side.memmap, CMD_AREA, 8)[:] = np.frombuffer(
        struct.pack("<II", cmd, CMD_ID_STOP), np.uint8
    )
    ring.add(np.array([CMD_AREA], np.uint64), 4, writable=False)
    processed = [BLOCK * k for k in (1, 2, 3)] + [HI + BLOCK]
    ring.add(np.array(processed, np.uint64), BLOCK, writable=True)
    kick(side)
    assert side.dev.state is HintState.START
    assert len(ring.get_used().heads) == 1 + len(processed)
    unprocessed = [BLOCK * k for k in (4, 5)] + [HI + 2 * BLOCK]
    ring.add(np.array(unprocessed, np.uint64), BLOCK, writable=True)
    ring.add(np.array([CMD_AREA + 4], np.uint64), 4, writable=False)  # STOP ends the round
    side.dev.set_target(64)  # a config interrupt the driver has not acknowledged yet
    return Source(side, ring, cmd, processed, unprocessed)


def block_pfns(memmap: MemoryMap, gpas: list[int]) -> set[int]:
    return {memmap.pfn_of(g) + i for g in gpas for i in range(BLOCK_PAGES)}


def clean_pages(bm: DirtyBitmap) -> set[int]:
    words = bm.words()
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: bm.npages]
    dirty = set(np.flatnonzero(bits).tolist())
    return set(range(bm.npages)) - dirty


# -- round trips -----------------------------------------------------------------------------


def test_state_survives_json_and_restores_to_the_same_state() -> None:
    src = source_mid_round()
    saved = src.side.t.save_state()
    wire = json.loads(json.dumps(saved))
    assert wire == saved
    device = saved["device"]
    assert isinstance(device, dict)
    assert device["state"] == "start" and device["cmd_id"] == src.cmd_id
    assert device["queues"] == [
        {
            "name": "free_page",
            "index": 3,
            "size": 256,
            "desc": DESC,
            "driver": AVAIL,
            "device": USED,
            "last_avail": 5,
            "next_used": 5,
        }
    ]
    dst = make_side(src.side.mem.copy())
    dst.t.restore_state(wire)
    assert dst.t.save_state() == saved
    assert dst.dev.save_state() == src.side.dev.save_state()


def test_a_destination_applies_exactly_the_hints_the_source_did_not() -> None:
    src = source_mid_round()
    s = src.side
    before = clean_pages(s.bm)
    assert before == block_pfns(s.memmap, src.processed)
    # Stop-and-copy: the guest is paused, RAM goes over, then the device state.
    mem = s.mem.copy()
    saved = json.loads(json.dumps(s.t.save_state()))
    registers = [r32(s.t, off) for off in (M.INTERRUPT_STATUS, M.CONFIG_GENERATION, M.STATUS)]
    dst = make_side(mem)
    dst.t.restore_state(saved)
    regs = [r32(dst.t, off) for off in (M.INTERRUPT_STATUS, M.CONFIG_GENERATION, M.STATUS)]
    assert regs == registers and registers[0] == M.INT_CONFIG_CHANGE
    assert dst.levels == [True]  # the line is up on the destination, as on the source
    config = [(M.CONFIG + off, 8) for off in (0, 8)]
    assert [dst.t.read(*a) for a in config] == [s.t.read(*a) for a in config]
    assert dst.dev.state is HintState.START and dst.dev.cmd_id == src.cmd_id
    # The guest resumes on the destination and kicks the queue.
    ring = moved(src.ring, dst.mem, dst.memmap)
    kick(dst)
    assert state(dst.dev) is HintState.STOP  # the STOP out-buffer ended the round
    assert clean_pages(dst.bm) == block_pfns(dst.memmap, src.unprocessed)
    used = ring.get_used()  # raises if a head came back twice
    assert len(used.heads) == len(src.unprocessed) + 1 and ring.in_flight == 0
    assert dst.dev.pages_hinted_total == BLOCK_PAGES * (len(src.processed) + len(src.unprocessed))
    assert clean_pages(s.bm) == before  # the source applied nothing more
    assert dst.dev.error is None and dst.t.faults == {}
    # And the driver goes on: the next round works on the destination.
    cmd = dst.dev.start_hinting()
    assert cmd == src.cmd_id + 1 and read_cmd_id(dst) == cmd


def test_a_packed_ring_continues_across_a_lap() -> None:
    src = make_side(packed_ring=True)
    bring_up(src, 6, P_DESC, P_DRIVER, P_DEVICE)
    assert src.dev.has(F_RING_PACKED)
    driver = PackedDriver(src.mem, 6)
    cmd = src.dev.start_hinting()
    assert cmd is not None and read_cmd_id(src) == cmd
    src.mem[CMD_AREA : CMD_AREA + 4] = np.frombuffer(struct.pack("<I", cmd), np.uint8)
    driver.post(CMD_AREA, 4, False)
    first = [BLOCK * k for k in range(1, 5)]
    for gpa in first:
        driver.post(gpa, BLOCK, True)
    kick(src)
    later = [BLOCK * k for k in range(5, 8)]  # wraps past slot 5 into the next lap
    for gpa in later:
        driver.post(gpa, BLOCK, True)
    saved = json.loads(json.dumps(src.t.save_state()))
    device = saved["device"]
    assert isinstance(device, dict) and isinstance(device["queues"], list)
    assert {k: device["queues"][0][k] for k in ("next_avail", "avail_wrap")} == {
        "next_avail": 5,
        "avail_wrap": True,
    }
    dst = make_side(src.mem.copy(), packed_ring=True)
    dst.t.restore_state(saved)
    driver.mem = dst.mem
    kick(dst)
    assert clean_pages(dst.bm) == block_pfns(dst.memmap, later)
    assert dst.dev.save_state()["queues"] == [
        dict(device["queues"][0], next_avail=2, avail_wrap=False, next_used=2, used_wrap=False)
    ]
    assert dst.dev.error is None and dst.t.faults == {}


# -- refusals --------------------------------------------------------------------------------

Mutate = Callable[[State], None]


def dev_set(key: str, value: object) -> Mutate:
    def mutate(state: State) -> None:
        device = state["device"]
        assert isinstance(device, dict)
        device[key] = value

    return mutate


def queue_set(key: str, value: object) -> Mutate:
    def mutate(state: State) -> None:
        device = state["device"]
        assert isinstance(device, dict)
        device["queues"][0][key] = value

    return mutate


def dev_del(key: str) -> Mutate:
    def mutate(state: State) -> None:
        device = state["device"]
        assert isinstance(device, dict)
        del device[key]

    return mutate


def t_set(key: str, value: object) -> Mutate:
    def mutate(state: State) -> None:
        state[key] = value

    return mutate


def t_queue_set(key: str, value: object) -> Mutate:
    def mutate(state: State) -> None:
        queues = state["queues"]
        assert isinstance(queues, list)
        for q in queues:
            if q["index"] == 3:
                q[key] = value

    return mutate


def dup_queue(state: State) -> None:
    device = state["device"]
    assert isinstance(device, dict)
    device["queues"].append(dict(device["queues"][0]))


# (id, mutation, whether the device's own restore_state refuses it too)
BAD: list[tuple[str, Mutate, bool]] = [
    ("device-unknown-key", dev_set("bogus", 1), True),
    ("device-missing-key", dev_del("cmd_id"), True),
    ("device-version", dev_set("version", 2), True),
    ("cmd-id-str", dev_set("cmd_id", "0x80000001"), True),
    ("num-pages-bool", dev_set("num_pages", True), True),
    ("cmd-id-below-min", dev_set("cmd_id", 5), True),
    ("actual-above-u32", dev_set("actual", 1 << 32), True),
    ("negative-total", dev_set("pages_hinted_total", -1), True),
    ("unknown-hint-state", dev_set("state", "running"), True),
    ("hint-state-list", dev_set("state", ["start"]), True),
    ("offered-differs", dev_set("features", 1), True),
    ("negotiated-unoffered", dev_set("negotiated", bit(F_RING_PACKED) | bit(32) | bit(3)), True),
    ("error-not-str", dev_set("error", 5), True),
    ("features-ok-int", dev_set("features_ok", 1), True),
    ("queues-not-list", dev_set("queues", {}), True),
    ("queue-not-negotiated", queue_set("index", 7), True),
    ("queue-wrong-name", queue_set("name", "stats"), True),
    ("queue-too-big", queue_set("size", 2048), True),
    ("queue-packed-keys", queue_set("avail_wrap", True), True),
    ("queue-not-ram", queue_set("desc", 96 * MIB), True),
    ("queue-indices-inconsistent", queue_set("last_avail", 300), True),
    ("queue-index-not-u16", queue_set("next_used", 1 << 16), True),
    ("queue-twice", dup_queue, True),
    ("transport-unknown-key", t_set("bogus", 0), False),
    ("transport-empty", lambda s: s.clear(), False),
    ("status-above-byte", t_set("status", 0x100), False),
    ("no-features-ok", t_set("status", STATUS_ACKNOWLEDGE | STATUS_DRIVER), False),
    ("driver-features-one-half", t_set("driver_features", [1]), False),
    ("driver-features-differ", t_set("driver_features", [0, 1]), False),
    ("interrupt-status-bit-2", t_set("interrupt_status", 4), False),
    ("queue-not-ready", t_queue_set("ready", False), False),
    ("queue-ring-differs", t_queue_set("desc", 0x5000), False),
    ("pending-unknown-queue", t_set("pending", [0]), False),
    ("deferred-after-driver-ok", t_set("deferred", [3]), False),
    ("fault-negative", t_set("faults", {"unaligned": -1}), False),
    ("device-none", t_set("device", None), False),
]


@pytest.mark.parametrize(("mutate", "device_too"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_restore_refuses_a_malformed_state_and_changes_nothing(
    mutate: Mutate, device_too: bool
) -> None:
    src = source_mid_round()
    bad = copy.deepcopy(src.side.t.save_state())
    mutate(bad)
    dst = make_side(src.side.mem.copy())
    dst.dev.set_target(3)  # something to keep
    before = dst.t.save_state()
    with pytest.raises(ValueError):
        dst.t.restore_state(bad)
    if device_too:
        with pytest.raises(ValueError):
            dst.dev.restore_state(bad["device"])
    assert dst.t.save_state() == before
    assert dst.dev.free_page_queue is None and dst.levels == []


def test_a_state_not_a_dict_is_refused() -> None:
    side = make_side()
    with pytest.raises(ValueError, match="dict"):
        side.t.restore_state([])
    with pytest.raises(ValueError, match="dict"):
        side.dev.restore_state("state")
