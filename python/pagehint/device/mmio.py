"""A virtio-mmio transport (virtio 1.2 §4.2, the non-legacy "version 2" register layout) in
front of a ``FreePageHintDevice``, so a guest drives the device through MMIO exits.

A VMM maps the window (``size`` bytes at ``base``) and hands each ``KVM_EXIT_MMIO`` inside it
to ``read(offset, size)`` / ``write(offset, data)``. Sources: the virtio 1.2 spec (§2.1 device
status, §2.2 feature bits, §2.5 config generation, §3.1 device initialisation, §4.2.2 the
register layout and its requirements, §4.2.3 initialisation, queue set-up and notifications)
and QEMU's ``hw/virtio/virtio-mmio.c`` for what the spec leaves open.

Guest mistakes never raise: each is handled as the spec or QEMU does (ignored, read as 0, or
``DEVICE_NEEDS_RESET``) and counted by reason in ``faults``:

====================================  ===================================================
``unaligned``, ``wrong_width``         a register access that is not 32-bit and aligned
                                       (§4.2.2.2): reads 0, writes ignored (QEMU)
``beyond_window``                      an access running past the end of the window
``unknown_register``                   no register at that offset (QueueReset included:
                                       VIRTIO_F_RING_RESET is not offered)
``legacy_register``                    GuestPageSize, QueueAlign, QueuePFN: version 1 only
``read_write_only``                    read of a write-only register: reads 0 (QEMU)
``write_read_only``                    write to a read-only register: ignored (QEMU)
``config_width``                       config access of 3, 5, 6 or 7 bytes: reads 0
``config_out_of_range``                config access past the device's config (the device
                                       reads all ones there and ignores writes, as QEMU)
``driver_features_high``               DriverFeatures bits written above bit 63: no such
                                       feature is offered, so FEATURES_OK is refused
``features_after_features_ok``         DriverFeatures written after FEATURES_OK (§3.1.1
                                       step 5): ignored
``features_refused``                   FEATURES_OK refused (§2.2.1): unoffered bits, or no
                                       VERSION_1 (§6.1, a version 2 transport is modern)
``status_cleared_bits``                a non-zero Status write clearing bits (§2.1.1):
                                       the set bits stay
``status_needs_reset_bit``             the driver set DEVICE_NEEDS_RESET: ignored
``driver_ok_without_features_ok``      DRIVER_OK before FEATURES_OK (§3.1.1 order): taken,
                                       but no queue can be made ready
``queue_does_not_exist``               a queue register written for a QueueSel whose
                                       QueueNumMax is 0: ignored
``queue_write_while_ready``            QueueNum or a queue address written while
                                       QueueReady is 1 (§4.2.2.2): ignored
``queue_ready_before_features_ok``     QueueReady=1 before FEATURES_OK (§3.1.1 step 7)
``queue_size_zero``,                   QueueReady=1 with QueueNum 0, above QueueNumMax, or
``queue_size_too_large``,              not a power of two for a split ring (§2.7)
``queue_size_not_power_of_2``
``queue_refused``                      the device refused the ring (not in guest RAM,
                                       overlapping areas)
``notify_unknown_queue``               QueueNotify for a queue that does not exist: ignored
``notify_queue_not_ready``             QueueNotify for a queue that is not ready: ignored
``notify_before_driver_ok``            QueueNotify before DRIVER_OK: kept, served at DRIVER_OK
                                       (§2.1.2: no buffer is consumed before it)
``notify_during_reset``                a queue reset by another vCPU while being served
``interrupt_ack_undefined_bits``       InterruptACK with bits other than 0 and 1 (§4.2.2.2)
====================================  ===================================================

A refused QueueReady leaves QueueReady 0 and does not set DEVICE_NEEDS_RESET: the spec gives
the device no duty here, the driver sees the refusal by reading QueueReady back (§4.2.3.2 step
2 reads it) and can fix the parameters and try again; the device itself is not in an error
state. DEVICE_NEEDS_RESET is set when the device model reports an error (QEMU's
``virtio_error``: a malformed cmd id, a broken ring), with a configuration change notification
if DRIVER_OK is set (§2.1.2).

Interrupts (§4.2.3.4): one interrupt line, asserted while InterruptStatus is non-zero. Bit 0
(used buffer notification) is set when the device returned buffers and the driver wants to be
told (``ProcessResult.interrupt``: EVENT_IDX or VRING_AVAIL_F_NO_INTERRUPT), bit 1
(configuration change) when the device's config changed with DRIVER_OK set; each such event
calls ``interrupt(True)`` (again if the line is already up, so an edge-triggered irqfd fires
for it), and an InterruptACK that leaves InterruptStatus zero calls ``interrupt(False)``. A
level-triggered line (``KVM_IRQ_LINE``) follows the calls exactly. A guest without an irqchip
polls InterruptStatus instead: the bits are set whether or not ``interrupt`` is given. The
callback runs outside the register lock, serialised with the other interrupt calls so the last
call always matches InterruptStatus; it must not wait for another thread that raises an
interrupt through this transport.

Threading: one register lock; a vCPU thread calls ``read``/``write`` while the migration thread
calls ``device.start_hinting()``, whose config notification lands in this transport. Queue work
(``device.process()``) runs outside the register lock, on the vCPU thread that wrote
QueueNotify or, with ``process_on_notify=False``, on the VMM's device thread, which waits on
``notified`` and calls ``process_pending()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pagehint.device import _state
from pagehint.device.free_page_hint import FreePageHintDevice, ProcessResult, _SavedState
from pagehint.device.protocol import (
    F_RING_PACKED,
    F_VERSION_1,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_ID_BALLOON,
)
from pagehint.device.reporting import ReportResult

# Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100
"""The device-specific configuration space starts here."""
# Version 1 ("legacy") registers, not part of the version 2 layout.
LEGACY_REGISTERS = (0x028, 0x03C, 0x040)  # GuestPageSize, QueueAlign, QueuePFN

MAGIC = 0x7472_6976
"""``"virt"`` read as a little-endian u32."""
MMIO_VERSION = 2
"""The non-legacy register layout."""
VENDOR_PAGEHINT = 0x5448_4750
"""``"PGHT"`` as a little-endian u32; drivers do not look at the vendor ID."""
WINDOW_SIZE = 0x200
"""Registers and config space: QEMU's window, and the spec's device tree example."""

INT_USED_BUFFER = 1
"""InterruptStatus bit 0: used buffer notification."""
INT_CONFIG_CHANGE = 2
"""InterruptStatus bit 1: configuration change notification."""

_STATUS_BITS = 0xFF
_U32 = 0xFFFF_FFFF

# Access rights of the version 2 registers: R read-only, W write-only, RW both.
REGISTERS: dict[int, str] = {
    MAGIC_VALUE: "R",
    VERSION: "R",
    DEVICE_ID: "R",
    VENDOR_ID: "R",
    DEVICE_FEATURES: "R",
    DEVICE_FEATURES_SEL: "W",
    DRIVER_FEATURES: "W",
    DRIVER_FEATURES_SEL: "W",
    QUEUE_SEL: "W",
    QUEUE_NUM_MAX: "R",
    QUEUE_NUM: "W",
    QUEUE_READY: "RW",
    QUEUE_NOTIFY: "W",
    INTERRUPT_STATUS: "R",
    INTERRUPT_ACK: "W",
    STATUS: "RW",
    QUEUE_DESC_LOW: "W",
    QUEUE_DESC_HIGH: "W",
    QUEUE_DRIVER_LOW: "W",
    QUEUE_DRIVER_HIGH: "W",
    QUEUE_DEVICE_LOW: "W",
    QUEUE_DEVICE_HIGH: "W",
    SHM_SEL: "W",
    SHM_LEN_LOW: "R",
    SHM_LEN_HIGH: "R",
    SHM_BASE_LOW: "R",
    SHM_BASE_HIGH: "R",
    CONFIG_GENERATION: "R",
}

# Queue address registers: offset -> (field, high half).
_QUEUE_ADDRESS = {
    QUEUE_DESC_LOW: ("desc", False),
    QUEUE_DESC_HIGH: ("desc", True),
    QUEUE_DRIVER_LOW: ("driver", False),
    QUEUE_DRIVER_HIGH: ("driver", True),
    QUEUE_DEVICE_LOW: ("device", False),
    QUEUE_DEVICE_HIGH: ("device", True),
}

QueueResult = ProcessResult | ReportResult


@dataclass
class _Queue:
    """One queue's registers as the driver wrote them."""

    num: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    ready: bool = False


class VirtioMmioTransport:
    """The virtio-mmio registers of one ``FreePageHintDevice`` (device ID 5, balloon).

    ``read(offset, size)`` and ``write(offset, data)`` take offsets inside the window (``size``
    bytes; ``base`` is where the VMM mapped it, see ``contains``); values are little endian.
    Registers below 0x100 are 32-bit; the config space from 0x100 takes 1, 2, 4 and 8 byte
    accesses and goes to ``device.read_config`` / ``write_config``.

    Status (§2.1, the low 8 bits; bits only accumulate until the reset): writing 0 resets the
    transport and the device (``device.reset()``), queue state included. FEATURES_OK
    negotiates the 64-bit DriverFeatures (two halves through DriverFeaturesSel) with
    ``device.negotiate()`` and sticks only if the device accepts them (``features_ok``) and
    VERSION_1 is among them; otherwise the device is reset to unnegotiated and the bit reads
    back clear (§3.1.1 step 6).

    Queues: which exist comes from ``device.queue_indices()``; QueueNumMax is
    ``device.queue_max()`` (0 for none); QueueReady=1 hands the ring to ``device.set_queue``
    and QueueReady=0 takes it back (``device.drop_queue``: §4.2.2.1, the device does not touch
    a queue that is not ready). QueueNotify on the free page queue runs ``device.process()``,
    on the reporting queue ``device.process_reporting()``, with ``process_on_notify``;
    otherwise the index is recorded, ``notified`` is set, and the VMM's device thread calls
    ``process_pending()``. Every accepted notification is also passed to ``queue_notify``
    (the inflate, deflate and stats queues are the VMM's to serve: ``signal_used()`` raises
    their used buffer interrupt).

    The transport installs itself as the device's ``notify_config``, calling any callback
    already there after its own work: each config change bumps ConfigGeneration and, with
    DRIVER_OK set, raises a configuration change interrupt.

    ``ValueError``/``TypeError`` are for the VMM's mistakes only (an offset outside the window,
    a size other than 1 to 8, data that is not bytes).
    """

    def __init__(
        self,
        device: FreePageHintDevice,
        *,
        base: int = 0,
        process_on_notify: bool = True,
        interrupt: Callable[[bool], None] | None = None,
        queue_notify: Callable[[int], None] | None = None,
        vendor_id: int = VENDOR_PAGEHINT,
    ) -> None:
        if base < 0:
            raise ValueError(f"base must not be negative, not {base}")
        if not 0 <= vendor_id <= _U32:
            raise ValueError(f"vendor_id is a u32, not {vendor_id}")
        self.device = device
        self.base = base
        """Where the VMM mapped the window (guest-physical)."""
        self.process_on_notify = process_on_notify
        self.interrupt = interrupt
        """Called with the interrupt line's level (see the module docstring)."""
        self.queue_notify = queue_notify
        """Called with the queue index of every accepted QueueNotify, outside the lock."""
        self.vendor_id = vendor_id
        self.notified = threading.Event()
        """Set when a notification waits for ``process_pending()`` (``process_on_notify``
        False)."""
        self._lock = threading.Lock()
        # Serialises InterruptStatus changes with the interrupt calls that report them, so the
        # last call always matches the register. Taken before _lock, never inside it.
        self._irq_lock = threading.RLock()
        self._faults: dict[str, int] = {}
        self._generation = 0
        self._epoch = 0  # bumped at each reset: work started before it raises nothing after
        self._reset_registers()
        self._chained = device.notify_config
        device.notify_config = self._config_changed

    # -- the VMM's side ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The window's size in bytes (0x200: registers, then the config space at 0x100)."""
        return WINDOW_SIZE

    def contains(self, addr: int, length: int = 1) -> bool:
        """Whether ``[addr, addr + length)`` (guest-physical) starts inside this window: the
        access is this transport's, at offset ``addr - base``."""
        return self.base <= addr < self.base + WINDOW_SIZE and length > 0

    @property
    def faults(self) -> dict[str, int]:
        """Guest mistakes so far, by reason (see the module docstring)."""
        with self._lock:
            return dict(self._faults)

    @property
    def status(self) -> int:
        """The device status register."""
        return self._status

    @property
    def interrupt_status(self) -> int:
        """The InterruptStatus register."""
        return self._isr

    @property
    def config_generation(self) -> int:
        """The ConfigGeneration register."""
        return self._generation

    @property
    def driver_features(self) -> int:
        """The 64 bits the driver wrote to DriverFeatures (both halves)."""
        return self._driver_features[0] | self._driver_features[1] << 32

    def queue_ready(self, index: int) -> bool:
        """Whether queue ``index`` is ready (QueueReady reads 1)."""
        with self._lock:
            queue = self._queues.get(index)
            return queue is not None and queue.ready

    def queue_rings(self, index: int) -> tuple[int, int, int, int] | None:
        """``(size, desc, driver, device)`` of queue ``index`` if it is ready, else None: how
        a VMM finds the rings of the queues it serves itself (inflate, deflate, stats)."""
        with self._lock:
            queue = self._queues.get(index)
            if queue is None or not queue.ready:
                return None
            return queue.num, queue.desc, queue.driver, queue.device

    # -- MMIO accesses ---------------------------------------------------------------------------

    def _check(self, offset: int, size: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        if not 0 <= offset < WINDOW_SIZE:
            raise ValueError(f"offset {offset:#x} is outside the {WINDOW_SIZE:#x}-byte window")
        if not 1 <= size <= 8:
            raise ValueError(f"an MMIO access is 1 to 8 bytes, not {size}")

    def _fault(self, reason: str) -> None:
        """Counts a guest mistake; under the lock."""
        self._faults[reason] = self._faults.get(reason, 0) + 1

    def read(self, offset: int, size: int) -> bytes:
        """The guest reads ``size`` bytes at ``offset`` in the window (little endian)."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        self._check(offset, size)
        if offset + size > WINDOW_SIZE:
            with self._lock:
                self._fault("beyond_window")
            return bytes(size)
        if offset >= CONFIG:
            return self._read_config(offset - CONFIG, size)
        with self._lock:
            if offset % 4:
                self._fault("unaligned")
                return bytes(size)
            if size != 4:
                self._fault("wrong_width")
                return bytes(size)
            return self._read_register(offset).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        """The guest writes ``data`` (1 to 8 bytes, little endian) at ``offset`` in the
        window."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        raw = bytes(data)
        self._check(offset, len(raw))
        if offset + len(raw) > WINDOW_SIZE:
            with self._lock:
                self._fault("beyond_window")
            return
        if offset >= CONFIG:
            self._write_config(offset - CONFIG, raw)
            return
        with self._lock:
            if offset % 4:
                self._fault("unaligned")
                return
            if len(raw) != 4:
                self._fault("wrong_width")
                return
        value = int.from_bytes(raw, "little")
        if offset == STATUS:
            self._write_status(value)
        elif offset == QUEUE_NOTIFY:
            self._write_notify(value)
        elif offset == INTERRUPT_ACK:
            self._write_ack(value)
        else:
            with self._lock:
                self._write_register(offset, value)

    # -- registers -------------------------------------------------------------------------------

    def _reset_registers(self) -> None:
        """The transport's state at reset (§4.2.2.1: InterruptStatus and every QueueReady
        clear); under the lock or before it exists."""
        self._status = 0
        self._isr = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = [0, 0]
        self._driver_features_high = False
        self._queue_sel = 0
        self._shm_sel = 0
        self._queues: dict[int, _Queue] = {}
        self._pending: set[int] = set()
        self._deferred: set[int] = set()
        self._line = False
        self.notified.clear()

    def _read_register(self, offset: int) -> int:
        """A 32-bit aligned register read; under the lock."""
        access = REGISTERS.get(offset)
        if access is None:
            self._fault("legacy_register" if offset in LEGACY_REGISTERS else "unknown_register")
            return 0
        if access == "W":
            self._fault("read_write_only")
            return 0
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return VIRTIO_ID_BALLOON
        if offset == VENDOR_ID:
            return self.vendor_id
        if offset == DEVICE_FEATURES:
            sel = self._device_features_sel
            return self.device.features >> (32 * sel) & _U32 if sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return self.device.queue_max(self._queue_sel)
        if offset == QUEUE_READY:
            queue = self._queues.get(self._queue_sel)
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            return self._isr
        if offset == STATUS:
            return self._status
        if offset == CONFIG_GENERATION:
            return self._generation & _U32
        # SHMLen and SHMBase: no shared memory region exists, which reads as -1 (§4.2.2;
        # Linux's vm_get_shm_region stops at a length of -1).
        return _U32

    def _selected_queue(self) -> _Queue | None:
        """The selected queue's registers, or None (counted) if it does not exist."""
        index = self._queue_sel
        if self.device.queue_max(index) == 0:
            self._fault("queue_does_not_exist")
            return None
        return self._queues.setdefault(index, _Queue())

    def _write_register(self, offset: int, value: int) -> None:
        """A 32-bit aligned write to any register but Status, QueueNotify and InterruptACK;
        under the lock."""
        access = REGISTERS.get(offset)
        if access is None:
            self._fault("legacy_register" if offset in LEGACY_REGISTERS else "unknown_register")
        elif access == "R":
            self._fault("write_read_only")
        elif offset == DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self._queue_sel = value
        elif offset == SHM_SEL:
            self._shm_sel = value
        elif offset == QUEUE_READY:
            self._write_queue_ready(value)
        else:  # QueueNum and the queue addresses
            queue = self._selected_queue()
            if queue is None:
                return
            if queue.ready:
                self._fault("queue_write_while_ready")
                return
            if offset == QUEUE_NUM:
                queue.num = value
                return
            field, high = _QUEUE_ADDRESS[offset]
            old = getattr(queue, field)
            new = (old & _U32) | value << 32 if high else (old & ~_U32) | value
            setattr(queue, field, new)

    def _write_driver_features(self, value: int) -> None:
        if self._status & STATUS_FEATURES_OK:
            self._fault("features_after_features_ok")
            return
        sel = self._driver_features_sel
        if sel < 2:
            self._driver_features[sel] = value
        elif value:
            self._fault("driver_features_high")
            self._driver_features_high = True

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            return
        index = self._queue_sel
        if not value:
            if queue.ready:
                queue.ready = False
                self._deferred.discard(index)
                self._pending.discard(index)
                self.device.drop_queue(index)
            return
        if queue.ready:
            return  # already in use: setting the ring up again would lose its indices
        if not self._status & STATUS_FEATURES_OK:
            self._fault("queue_ready_before_features_ok")
            return
        packed = self.device.has(F_RING_PACKED)
        if queue.num == 0:
            self._fault("queue_size_zero")
            return
        if queue.num > self.device.queue_max(index):
            self._fault("queue_size_too_large")
            return
        if not packed and queue.num & (queue.num - 1):
            self._fault("queue_size_not_power_of_2")
            return
        try:
            self.device.set_queue(index, queue.num, queue.desc, queue.driver, queue.device)
        except ValueError:
            self._fault("queue_refused")
            return
        queue.ready = True

    # -- status and features -----------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        value &= _STATUS_BITS
        if value == 0:
            with self._irq_lock:
                with self._lock:
                    was_up = self._line
                    self._reset_registers()
                    self._epoch += 1
                    self.device.reset()
                if was_up and self.interrupt is not None:
                    self.interrupt(False)
            return
        with self._lock:
            old = self._status
            if old & ~value:
                self._fault("status_cleared_bits")
            new = value & ~old
            if new & STATUS_DEVICE_NEEDS_RESET:
                self._fault("status_needs_reset_bit")
                new &= ~STATUS_DEVICE_NEEDS_RESET
            if new & STATUS_FEATURES_OK and not self._accept_features():
                self._fault("features_refused")
                new &= ~STATUS_FEATURES_OK
            if new & STATUS_DRIVER_OK and not (old | new) & STATUS_FEATURES_OK:
                self._fault("driver_ok_without_features_ok")
            self._status = old | new
            deferred: set[int] = set()
            if new & STATUS_DRIVER_OK:
                deferred, self._deferred = self._deferred, set()
        for index in sorted(deferred):
            self._dispatch(index)

    def _accept_features(self) -> bool:
        """FEATURES_OK is being set: negotiates, under the lock. False (the device reset to
        unnegotiated) if the device refuses the features or VERSION_1 is missing."""
        features = self.driver_features
        self.device.negotiate(features)
        ok = (
            self.device.features_ok
            and not self._driver_features_high
            and bool(features >> F_VERSION_1 & 1)
        )
        self._queues.clear()  # negotiation decides which queues exist
        if not ok:
            self.device.reset()
        return ok

    # -- notifications and interrupts -----------------------------------------------------------

    def _write_notify(self, value: int) -> None:
        with self._lock:
            index = value  # no VIRTIO_F_NOTIFICATION_DATA: the value is the queue index
            if self.device.queue_max(index) == 0:
                self._fault("notify_unknown_queue")
                return
            queue = self._queues.get(index)
            if queue is None or not queue.ready:
                self._fault("notify_queue_not_ready")
                return
            name = {i: n for n, i in self.device.queue_indices().items()}[index]
            ours = name in ("free_page", "reporting")
            if ours and not self._status & STATUS_DRIVER_OK:
                self._fault("notify_before_driver_ok")
                self._deferred.add(index)
                return
        self._dispatch(index)

    def _dispatch(self, index: int) -> None:
        """An accepted notification, outside the lock: served now or left for the device
        thread; ``queue_notify`` sees it either way."""
        name = self.device.queue_indices()
        if index in (name.get("free_page"), name.get("reporting")):
            if self.process_on_notify:
                self._serve(index)
            else:
                with self._lock:
                    self._pending.add(index)
                    self.notified.set()
        callback = self.queue_notify
        if callback is not None:
            callback(index)

    def process_pending(self) -> dict[int, QueueResult]:
        """Serves the notifications recorded since the last call (``process_on_notify``
        False): what each queue's processing did, by queue index. Clears ``notified``."""
        with self._lock:
            pending, self._pending = self._pending, set()
            self.notified.clear()
        results: dict[int, QueueResult] = {}
        for index in sorted(pending):
            result = self._serve(index)
            if result is not None:
                results[index] = result
        return results

    def _serve(self, index: int) -> QueueResult | None:
        """Runs the device's queue processing for queue ``index``, outside the lock, then
        raises the used buffer interrupt if the driver asked for it and sets
        DEVICE_NEEDS_RESET if the device failed."""
        with self._lock:
            queue = self._queues.get(index)
            if queue is None or not queue.ready or not self._status & STATUS_DRIVER_OK:
                return None
            epoch = self._epoch
        names = self.device.queue_indices()
        result: QueueResult
        try:
            if index == names.get("free_page"):
                result = self.device.process()
            elif index == names.get("reporting"):
                result = self.device.process_reporting()
            else:
                return None
        except RuntimeError:  # another vCPU reset the device or dropped the queue meanwhile
            with self._lock:
                self._fault("notify_during_reset")
            return None
        if result.interrupt:
            self._raise(INT_USED_BUFFER, epoch)
        self._check_device_error(epoch)
        return result

    def signal_used(self) -> None:
        """A used buffer notification for a queue the VMM serves itself (inflate, deflate,
        stats): sets InterruptStatus bit 0 and raises the interrupt, once DRIVER_OK is set."""
        with self._lock:
            epoch = self._epoch
        self._raise(INT_USED_BUFFER, epoch)

    def _raise(self, bits: int, epoch: int) -> None:
        """Sets ``bits`` in InterruptStatus and asserts the line, unless the driver is not
        ready for interrupts (§2.1.2: none before DRIVER_OK) or a reset came in between."""
        with self._irq_lock:
            with self._lock:
                if epoch != self._epoch or not self._status & STATUS_DRIVER_OK:
                    return
                self._isr |= bits
                self._line = True
            if self.interrupt is not None:
                self.interrupt(True)

    def _write_ack(self, value: int) -> None:
        with self._irq_lock:
            with self._lock:
                if value & ~(INT_USED_BUFFER | INT_CONFIG_CHANGE):
                    self._fault("interrupt_ack_undefined_bits")
                self._isr &= ~value
                lower = self._isr == 0 and self._line
                if lower:
                    self._line = False
            if lower and self.interrupt is not None:
                self.interrupt(False)

    def _config_changed(self) -> None:
        """The device's ``notify_config``: ConfigGeneration changes with every config change
        (§2.5.1; QEMU bumps it only with DRIVER_OK set), and with DRIVER_OK set the driver gets
        a configuration change interrupt (bit 1 only: QEMU sets 0x3, a legacy habit). Then the
        callback that was installed before this transport."""
        with self._lock:
            self._generation += 1
            epoch = self._epoch
        self._raise(INT_CONFIG_CHANGE, epoch)
        self._check_device_error(epoch)
        chained = self._chained
        if chained is not None:
            chained()

    def _check_device_error(self, epoch: int) -> None:
        """DEVICE_NEEDS_RESET once the device reports an error, with a configuration change
        notification if DRIVER_OK is set (§2.1.2)."""
        if self.device.error is None:
            return
        with self._lock:
            if epoch != self._epoch or self._status & STATUS_DEVICE_NEEDS_RESET:
                return
            self._status |= STATUS_DEVICE_NEEDS_RESET
            self._generation += 1
        self._raise(INT_CONFIG_CHANGE, epoch)

    # -- config space ---------------------------------------------------------------------------

    def _config_access(self, offset: int, size: int) -> bool:
        """Whether a config access is one the device takes; counts the others."""
        if size not in (1, 2, 4, 8):
            with self._lock:
                self._fault("config_width")
            return False
        if offset + size > self.device.config_size:
            with self._lock:
                self._fault("config_out_of_range")
        return True

    def _read_config(self, offset: int, size: int) -> bytes:
        if not self._config_access(offset, size):
            return bytes(size)
        return self.device.read_config(offset, size)

    def _write_config(self, offset: int, data: bytes) -> None:
        if self._config_access(offset, len(data)):
            self.device.write_config(offset, data)

    # -- migration ---------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The transport's registers and, under ``device``, the device's ``save_state()``:
        one dict of ints, strs, bools, lists and None for live migration (QEMU's
        virtio-mmio vmstate with the virtio device's).

        Call it while the guest's vCPUs are stopped and no queue work runs (the device must
        be quiescent, see ``FreePageHintDevice.save_state``). Saved: Status, the device and
        driver feature selects, DriverFeatures (both halves, and whether bits above 63 were
        written), QueueSel, SHMSel, each queue's Num, Desc, Driver, Device and Ready,
        InterruptStatus, ConfigGeneration, the notifications held before DRIVER_OK
        (``deferred``) or waiting for ``process_pending()`` (``pending``), and ``faults``."""
        with self._lock:
            queues: list[object] = [
                {
                    "index": index,
                    "num": q.num,
                    "desc": q.desc,
                    "driver": q.driver,
                    "device": q.device,
                    "ready": q.ready,
                }
                for index, q in sorted(self._queues.items())
            ]
            return {
                "version": _state.STATE_VERSION,
                "status": self._status,
                "device_features_sel": self._device_features_sel,
                "driver_features_sel": self._driver_features_sel,
                "driver_features": list(self._driver_features),
                "driver_features_high": self._driver_features_high,
                "queue_sel": self._queue_sel,
                "shm_sel": self._shm_sel,
                "queues": queues,
                "interrupt_status": self._isr,
                "config_generation": self._generation,
                "pending": sorted(self._pending),
                "deferred": sorted(self._deferred),
                "faults": dict(sorted(self._faults.items())),
                "device": self.device.save_state(),
            }

    def restore_state(self, state: object) -> None:
        """Takes a state ``save_state`` returned on the source, on a transport (and device)
        built on the destination with the same arguments: the device's state first (its
        queue readers made from the saved rings at the saved indices; no ``negotiate`` or
        ``set_queue``, which would start the rings over), then the registers.

        Call it before the guest runs and with no queue work running. Everything is checked
        before anything changes: ``ValueError`` (transport and device unchanged) for a
        malformed state, the device's refusals (see ``FreePageHintDevice.restore_state``), or
        registers that disagree with the device state (FEATURES_OK without the features
        negotiated, a ready queue the negotiated device does not have or whose ring differs
        from the device's, a device queue that is not ready, a held notification for a queue
        that is not ready). The interrupt line is set to match the restored InterruptStatus:
        ``interrupt(True)`` if it is non-zero, ``interrupt(False)`` if it is zero and the line
        was up. Pending notifications set ``notified``."""
        what = "transport state"
        d = _state.fields(state, what, _TRANSPORT_KEYS)
        loaded = self.device._check_state(d["device"])
        regs = self._check_registers(d, what, loaded)
        with self._irq_lock:
            with self._lock:
                was_up = self._line
                self.device._load_state(loaded)
                self._status = regs.status
                self._device_features_sel = regs.device_features_sel
                self._driver_features_sel = regs.driver_features_sel
                self._driver_features = list(regs.driver_features)
                self._driver_features_high = regs.driver_features_high
                self._queue_sel = regs.queue_sel
                self._shm_sel = regs.shm_sel
                self._queues = regs.queues
                self._isr = regs.isr
                self._line = regs.isr != 0
                self._generation = regs.generation
                self._pending = set(regs.pending)
                self._deferred = set(regs.deferred)
                self._faults = dict(regs.faults)
                self._epoch += 1
                if self._pending:
                    self.notified.set()
                else:
                    self.notified.clear()
                level = self._line
            if self.interrupt is not None and (level or was_up):
                self.interrupt(level)

    def _check_registers(self, d: dict[str, object], what: str, loaded: _SavedState) -> _Registers:
        """The register part of a saved state, checked against the checked device state."""
        status = _state.integer(d, "status", what, _STATUS_BITS)
        halves = _state.listing(d, "driver_features", what)
        if len(halves) != 2:
            raise ValueError(f"{what}.driver_features must be two u32 halves, not {halves!r}")
        pair = {"lo": halves[0], "hi": halves[1]}
        lo = _state.integer(pair, "lo", f"{what}.driver_features", _U32)
        hi = _state.integer(pair, "hi", f"{what}.driver_features", _U32)
        regs = _Registers(
            status=status,
            device_features_sel=_state.integer(d, "device_features_sel", what, _U32),
            driver_features_sel=_state.integer(d, "driver_features_sel", what, _U32),
            driver_features=(lo, hi),
            driver_features_high=_state.boolean(d, "driver_features_high", what),
            queue_sel=_state.integer(d, "queue_sel", what, _U32),
            shm_sel=_state.integer(d, "shm_sel", what, _U32),
            isr=_state.integer(d, "interrupt_status", what, INT_USED_BUFFER | INT_CONFIG_CHANGE),
            generation=_state.integer(d, "config_generation", what),
        )
        features_ok = bool(status & STATUS_FEATURES_OK)
        features = lo | hi << 32
        if features_ok and not (
            loaded.features_ok
            and loaded.negotiated == features
            and features >> F_VERSION_1 & 1
            and not regs.driver_features_high
        ):
            raise ValueError(
                f"{what}: FEATURES_OK is set but the device did not accept DriverFeatures "
                f"{features:#x} (negotiated {loaded.negotiated:#x})"
            )
        if not features_ok and (loaded.negotiated or loaded.queues):
            raise ValueError(f"{what}: the device negotiated features without FEATURES_OK")
        names = {i: n for n, i in self.device._queue_indices_for(loaded.negotiated).items()}
        for i, raw in enumerate(_state.listing(d, "queues", what)):
            at = f"{what}.queues[{i}]"
            q = _state.fields(raw, at, ("index", "num", "desc", "driver", "device", "ready"))
            index = _state.integer(q, "index", at, _U32)
            if index not in names or index in regs.queues:
                raise ValueError(f"{at}: queue {index} does not exist or is saved twice")
            regs.queues[index] = _Queue(
                _state.integer(q, "num", at, _U32),
                _state.integer(q, "desc", at),
                _state.integer(q, "driver", at),
                _state.integer(q, "device", at),
                _state.boolean(q, "ready", at),
            )
        for name, (ring, _) in loaded.queues.items():
            queue = regs.queues.get(ring.index)
            if queue is None or not queue.ready:
                raise ValueError(f"{what}: the device reads the {name} queue, which is not ready")
            if (queue.num, queue.desc, queue.driver, queue.device) != (
                ring.size,
                ring.desc,
                ring.driver,
                ring.device,
            ):
                raise ValueError(f"{what}: the {name} queue's registers differ from its ring")
        for index, queue in regs.queues.items():
            if queue.ready and not features_ok:
                raise ValueError(f"{what}: queue {index} is ready without FEATURES_OK")
            read_by_device = names[index] in ("free_page", "reporting")
            if queue.ready and read_by_device and names[index] not in loaded.queues:
                raise ValueError(f"{what}: queue {index} is ready but the device has no ring")
        ours = {loaded.negotiated_index(self.device, n) for n in ("free_page", "reporting")}
        for key in ("pending", "deferred"):
            held = []
            for j, raw_index in enumerate(_state.listing(d, key, what)):
                index = _state.integer({"i": raw_index}, "i", f"{what}.{key}[{j}]", _U32)
                queue = regs.queues.get(index)
                if index not in ours or queue is None or not queue.ready or index in held:
                    raise ValueError(f"{what}.{key}: {index} is not a ready queue of the device")
                held.append(index)
            setattr(regs, key, held)
        if regs.deferred and status & STATUS_DRIVER_OK:
            raise ValueError(f"{what}: notifications held before DRIVER_OK with DRIVER_OK set")
        faults = d["faults"]
        if not isinstance(faults, dict):
            raise ValueError(f"{what}.faults must be a dict, not {type(faults).__name__}")
        for reason in faults:
            if not isinstance(reason, str):
                raise ValueError(f"{what}.faults has a key that is not a str: {reason!r}")
            regs.faults[reason] = _state.integer(faults, reason, f"{what}.faults")
        return regs


_TRANSPORT_KEYS = (
    "version",
    "status",
    "device_features_sel",
    "driver_features_sel",
    "driver_features",
    "driver_features_high",
    "queue_sel",
    "shm_sel",
    "queues",
    "interrupt_status",
    "config_generation",
    "pending",
    "deferred",
    "faults",
    "device",
)


@dataclass
class _Registers:
    """The registers of a saved transport state that passed ``restore_state``'s checks."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: tuple[int, int]
    driver_features_high: bool
    queue_sel: int
    shm_sel: int
    isr: int
    generation: int
    queues: dict[int, _Queue] = field(default_factory=dict)
    pending: list[int] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
