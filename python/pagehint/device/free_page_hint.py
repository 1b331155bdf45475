"""The virtio-balloon device's free page hinting, as a VMM embeds it.

``FreePageHintDevice`` models what QEMU's ``hw/virtio/virtio-balloon.c`` does for
VIRTIO_BALLOON_F_FREE_PAGE_HINT (and for VIRTIO_BALLOON_F_REPORTING): feature negotiation, the
config space, the STOP / REQUESTED / START / DONE state machine driven by the migration
(``start_hinting``, ``stop_hinting``, ``finish``) and by the driver's cmd id out-buffers, and
the free page queue drained through the Rust queue reader. The inflate, deflate and stats
queues are not modelled: a VMM keeps its own.

Threading: ``process()`` may run on a device thread while the migration thread calls
``stop_hinting()``. One lock covers the state and each bounded chunk of queue work (as QEMU's
``free_page_lock``), so once ``stop_hinting()`` returns no hint of the old id is applied.
Config-change callbacks run after the lock is released.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.device import _state
from pagehint.device.protocol import (
    BALLOON_PFN_SHIFT,
    CMD_ID_DONE,
    CMD_ID_MIN,
    CMD_ID_STOP,
    CONFIG_ACTUAL,
    CONFIG_POISON_VAL,
    F_DEFLATE_ON_OOM,
    F_EVENT_IDX,
    F_FREE_PAGE_HINT,
    F_INDIRECT_DESC,
    F_PAGE_POISON,
    F_REPORTING,
    F_RING_PACKED,
    F_STATS_VQ,
    F_VERSION_1,
    FREE_PAGE_QUEUE_MAX,
    OTHER_QUEUE_MAX,
    REPORTING_QUEUE_MAX,
    bit,
)
from pagehint.device.reporting import FreePageReporting, ReportResult
from pagehint.hints import HintResult, apply_hints
from pagehint.virtqueue import ControlElement, PackedQueue, SplitQueue

if TYPE_CHECKING:
    from typing_extensions import Buffer

# Queue elements handled per lock hold: bounds how long stop_hinting() can wait for process().
_CHUNK = 1024

_U64Array = npt.NDArray[np.uint64]


class HintState(enum.Enum):
    """QEMU's FREE_PAGE_HINT_S_* states."""

    STOP = "stop"
    REQUESTED = "requested"
    START = "start"
    DONE = "done"


@dataclass(frozen=True)
class ProcessResult:
    """What one ``process()`` call did on the free page queue.

    ``elements`` counts elements returned used (hint elements and cmd id elements; rejected
    elements are counted in the device's ``rejected``). ``hints`` covers the in-buffers applied
    in START; ``hint_elements_ignored`` were returned unapplied because the state was not START
    (or no bitmap was bound). ``interrupt`` says whether the driver asked to be interrupted.
    With ``record_ranges``, ``ranges`` holds the ``(pfn, pages)`` ranges cleared, in order.
    """

    elements: int
    hint_elements_applied: int
    hint_elements_ignored: int
    cmd_ids: list[int]
    hints: HintResult
    state: HintState
    interrupt: bool
    more: bool
    error: str | None
    ranges: npt.NDArray[np.uint64] | None = None


_Queue = SplitQueue | PackedQueue

_QUEUE_MAX = {"free_page": FREE_PAGE_QUEUE_MAX, "reporting": REPORTING_QUEUE_MAX}


@dataclass(frozen=True)
class _Ring:
    """Where the driver put one queue: its index, size and the three areas' guest addresses
    (split: descriptor table, available ring, used ring; packed: descriptor ring, driver and
    device event areas)."""

    index: int
    size: int
    desc: int
    driver: int
    device: int

    def written(self, packed: bool) -> tuple[int, int]:
        """What returning elements writes: the used ring (split: flags, idx, the ring and
        avail_event), or the descriptor ring itself (packed)."""
        return (self.desc, 16 * self.size) if packed else (self.device, 6 + 8 * self.size)


@dataclass
class _ProcessTotals:
    """What one ``process()`` call did so far, over its chunks."""

    elements: int = 0
    applied: int = 0
    ignored: int = 0
    hints: int = 0
    pages_hinted: int = 0
    pages_cleared: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    cmd_ids: list[int] = field(default_factory=list)
    ranges: list[_U64Array] = field(default_factory=list)

    def add(self, result: HintResult) -> None:
        self.hints += result.hints
        self.pages_hinted += result.pages_hinted
        self.pages_cleared += result.pages_cleared
        for reason, n in result.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + n

    def ranges_array(self) -> _U64Array:
        return np.concatenate(self.ranges) if self.ranges else np.zeros((0, 2), dtype=np.uint64)


class FreePageHintDevice:
    """A virtio-balloon device offering free page hinting, over guest RAM in a buffer.

    ``mem`` is the writable buffer holding guest RAM as laid out by ``memmap`` (an ``mmap``, a
    numpy ``uint8`` array or a ``bytearray``); ``bitmap`` is the migration's dirty bitmap
    (bind or replace it later with ``bind``). Offered features: FREE_PAGE_HINT always,
    STATS_VQ and PAGE_POISON by default (as QEMU), DEFLATE_ON_OOM and REPORTING if asked, plus
    VERSION_1, INDIRECT_DESC, EVENT_IDX and, with ``packed_ring``, RING_PACKED.

    ``queue_numbering="dense"`` (the default, what QEMU and Linux do) numbers only existing
    queues: inflate 0, deflate 1, stats 2 if negotiated, then the free page queue, then the
    reporting queue. ``"spec"`` uses virtio 1.2's fixed numbers (free page 3, reporting 4).

    During START the config shows the active cmd id; ``qemu_compat=True`` shows 0 instead, as
    QEMU does, which makes the Linux driver end its round at the next config interrupt.
    ``notify_config`` is called after every change the driver must see (a config interrupt);
    ``discard`` receives the reporting queue's page ranges as a ``uint64`` ``(N, 2)`` array of
    ``(gpa, len)``. ``record_ranges=True`` makes ``process()`` return the ``(pfn, pages)``
    ranges it cleared, for a VMM that clears the hypervisor's dirty log there (QEMU does).
    """

    def __init__(
        self,
        mem: Buffer | npt.NDArray[np.uint8],
        memmap: _core.MemoryMap,
        bitmap: _core.DirtyBitmap | None = None,
        *,
        stats_vq: bool = True,
        page_poison: bool = True,
        deflate_on_oom: bool = False,
        reporting: bool = False,
        packed_ring: bool = False,
        queue_numbering: Literal["dense", "spec"] = "dense",
        qemu_compat: bool = False,
        notify_config: Callable[[], None] | None = None,
        discard: Callable[[_U64Array], None] | None = None,
        record_ranges: bool = False,
    ) -> None:
        if queue_numbering not in ("dense", "spec"):
            raise ValueError(f"queue_numbering must be 'dense' or 'spec', not {queue_numbering!r}")
        if bitmap is not None and bitmap.npages < memmap.npages:
            raise ValueError(
                f"the bitmap has {bitmap.npages} pages but the memory map has {memmap.npages}"
            )
        self._mem = mem
        self._memmap = memmap
        self._bitmap = bitmap
        self._numbering = queue_numbering
        self.qemu_compat = qemu_compat
        self.notify_config = notify_config
        self.guest_write: Callable[[int, int], None] | None = None
        """Called with ``(gpa, nbytes)`` after the device wrote guest memory (the used side
        of a queue it returned elements on). KVM does not log what the VMM writes, so a VMM
        marks these pages dirty for migration here, as QEMU's ``address_space_write`` does."""
        self._rings: dict[str, _Ring] = {}
        """The free page and reporting queues' rings, by name, as set up."""
        self._reporting = FreePageReporting(memmap, discard)
        self.record_ranges = record_ranges
        """Whether ``process()`` reports the page ranges it cleared (``ProcessResult.ranges``)."""
        self.hint_listener: Callable[[_U64Array], None] | None = None
        """Called under the device lock with the ``(pfn, pages)`` ranges of each chunk of hints
        applied, before any later hint is: where a VMM clears the hypervisor's dirty log for
        hinted memory as QEMU's qemu_guest_free_page_hint does."""
        self.pages_hinted_total = 0
        """Pages covered by hints applied since the device was made."""
        self.pages_cleared_total = 0
        """Dirty pages those hints cleared."""
        offered = bit(F_FREE_PAGE_HINT) | bit(F_VERSION_1) | bit(F_INDIRECT_DESC)
        offered |= bit(F_EVENT_IDX)
        for on, feature in (
            (stats_vq, F_STATS_VQ),
            (page_poison, F_PAGE_POISON),
            (deflate_on_oom, F_DEFLATE_ON_OOM),
            (reporting, F_REPORTING),
            (packed_ring, F_RING_PACKED),
        ):
            if on:
                offered |= bit(feature)
        self.features: int = offered
        """Features the device offers."""
        self._lock = threading.Lock()
        # The balloon target and size survive a device reset (QEMU keeps them too).
        self.num_pages = 0
        self.actual = 0
        self.retired_at_start = 0
        """Elements returned unapplied by ``start_hinting`` (made available before it)."""
        self._cmd_id = CMD_ID_MIN  # QEMU's realize; the first round gets CMD_ID_MIN + 1
        self._reset_locked()

    # -- negotiation and queues -------------------------------------------------------------

    def _reset_locked(self) -> None:
        self._negotiated = 0
        self._features_ok = False
        self._state = HintState.STOP
        self._error: str | None = None
        self._queue: _Queue | None = None
        self._reporting.set_queue(None)
        self.poison_val = 0
        self.config_faults = 0

    def reset(self) -> None:
        """A device reset: negotiation, queues, ``poison_val`` and the error state start over.
        The cmd id counter, ``num_pages`` and ``actual`` are kept, as QEMU keeps them."""
        with self._lock:
            self._reset_locked()

    def negotiate(self, driver_features: int) -> int:
        """Takes the driver's accepted feature set; returns the negotiated set (what both
        have). Bits the device did not offer are dropped and ``features_ok`` is False, as a
        transport refuses FEATURES_OK then. Queues are set up afresh afterwards."""
        if driver_features < 0 or driver_features >= 1 << 64:
            raise ValueError(f"driver_features must be a 64-bit mask, not {driver_features}")
        with self._lock:
            self._negotiated = driver_features & self.features
            self._features_ok = driver_features & ~self.features == 0
            self._queue = None
            self._reporting.set_queue(None)
            if not self.has(F_PAGE_POISON):
                self.poison_val = 0
            return self._negotiated

    @property
    def negotiated(self) -> int:
        """The negotiated feature set."""
        return self._negotiated

    @property
    def features_ok(self) -> bool:
        """False if the driver accepted a feature the device did not offer."""
        return self._features_ok

    def has(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bool(self._negotiated >> bit & 1)

    @property
    def hinting(self) -> bool:
        """Whether free page hinting was negotiated (if not, the hinting calls do nothing)."""
        return self.has(F_FREE_PAGE_HINT)

    def queue_indices(self) -> dict[str, int]:
        """The negotiated device's queues by name: ``inflate``, ``deflate``, ``stats``,
        ``free_page``, ``reporting`` (each only if it exists)."""
        return self._queue_indices_for(self._negotiated)

    def _queue_indices_for(self, negotiated: int) -> dict[str, int]:
        """``queue_indices`` for the feature set ``negotiated``."""
        names = ["inflate", "deflate"]
        fixed = {"inflate": 0, "deflate": 1, "stats": 2, "free_page": 3, "reporting": 4}
        for feature, name in (
            (F_STATS_VQ, "stats"),
            (F_FREE_PAGE_HINT, "free_page"),
            (F_REPORTING, "reporting"),
        ):
            if negotiated >> feature & 1:
                names.append(name)
        if self._numbering == "spec":
            return {n: fixed[n] for n in names}
        return {n: i for i, n in enumerate(names)}

    @property
    def free_page_queue_index(self) -> int | None:
        """The free page queue's index, or None if hinting was not negotiated."""
        return self.queue_indices().get("free_page")

    def set_queue(
        self, index: int, size: int, desc_gpa: int, driver_gpa: int, device_gpa: int
    ) -> None:
        """The driver enabled queue ``index`` with ``size`` entries at these guest addresses
        (split ring: descriptor table, available ring, used ring; packed ring: descriptor
        ring, driver and device event areas). Only the free page and reporting queues are
        read by this model; the others are accepted and left to the VMM. ``ValueError`` for
        an index the negotiated device does not have, a size above the queue's maximum, or a
        ring the reader refuses."""
        ring = _Ring(index, size, desc_gpa, driver_gpa, device_gpa)
        name, queue = self._make_queue(ring, self._negotiated)
        if queue is None:
            return
        if name == "free_page":
            with self._lock:
                self._queue = queue
                self._rings["free_page"] = ring
        else:
            self._rings["reporting"] = ring
            self._reporting.set_queue(queue)

    def _make_queue(self, ring: _Ring, negotiated: int) -> tuple[str, _Queue | None]:
        """The reader of ``ring`` for a device that negotiated ``negotiated``: the queue's
        name and its reader (None for a queue the VMM serves); ``ValueError`` as
        ``set_queue``."""
        queues = {i: n for n, i in self._queue_indices_for(negotiated).items()}
        if ring.index not in queues:
            raise ValueError(f"queue {ring.index} does not exist (queues: {sorted(queues)})")
        name = queues[ring.index]
        limit = _QUEUE_MAX.get(name, OTHER_QUEUE_MAX)
        if not 1 <= ring.size <= limit:
            raise ValueError(f"the {name} queue takes 1 to {limit} entries, not {ring.size}")
        if name not in ("free_page", "reporting"):
            return name, None
        packed = negotiated >> F_RING_PACKED & 1
        cls: type[_Queue] = PackedQueue if packed else SplitQueue
        queue = cls(
            self._mem,
            self._memmap,
            ring.size,
            ring.desc,
            ring.driver,
            ring.device,
            event_idx=bool(negotiated >> F_EVENT_IDX & 1),
        )
        return name, queue

    def queue_max(self, index: int) -> int:
        """The most entries queue ``index`` of the negotiated device takes (QEMU's sizes:
        ``FREE_PAGE_QUEUE_MAX``, ``REPORTING_QUEUE_MAX``, ``OTHER_QUEUE_MAX``), 0 if there is
        no such queue: what a transport shows as the queue's maximum size."""
        queues = {i: n for n, i in self.queue_indices().items()}
        name = queues.get(index)
        if name is None:
            return 0
        return _QUEUE_MAX.get(name, OTHER_QUEUE_MAX)

    def drop_queue(self, index: int) -> None:
        """The driver stopped using queue ``index`` (a transport's queue-ready bit went to 0):
        the device no longer reads or writes that ring, not even in ``start_hinting()``, until
        ``set_queue`` gives it one again. An index the device does not read is ignored."""
        name = {i: n for n, i in self.queue_indices().items()}.get(index)
        if name == "free_page":
            with self._lock:
                self._queue = None
        elif name == "reporting":
            self._reporting.set_queue(None)

    @property
    def free_page_queue(self) -> _Queue | None:
        """The free page queue's reader, once set up."""
        return self._queue

    def bind(self, bitmap: _core.DirtyBitmap | None) -> None:
        """Applies later hints to ``bitmap`` (None: hints are returned unapplied)."""
        if bitmap is not None and bitmap.npages < self._memmap.npages:
            raise ValueError(
                f"the bitmap has {bitmap.npages} pages but the memory map has {self._memmap.npages}"
            )
        with self._lock:
            self._bitmap = bitmap

    # -- config space ------------------------------------------------------------------------

    @property
    def config_size(self) -> int:
        """8, 12 with FREE_PAGE_HINT offered, 16 with PAGE_POISON offered (QEMU's sizes)."""
        if self.features >> F_PAGE_POISON & 1:
            return 16
        if self.features >> F_FREE_PAGE_HINT & 1:
            return 12
        return 8

    def _config_cmd_id(self) -> int:
        state = self._state
        if state is HintState.REQUESTED:
            return self._cmd_id
        if state is HintState.START:
            return 0 if self.qemu_compat else self._cmd_id
        if state is HintState.DONE:
            return CMD_ID_DONE
        return CMD_ID_STOP

    def _config_bytes(self) -> bytes:
        fields = (self.num_pages, self.actual, self._config_cmd_id(), self.poison_val)
        return b"".join(f.to_bytes(4, "little") for f in fields)[: self.config_size]

    @staticmethod
    def _check_access(offset: int, size: int) -> None:
        if offset < 0:
            raise ValueError(f"config offset must not be negative, not {offset}")
        if size not in (1, 2, 4, 8):
            raise ValueError(f"config accesses are 1, 2, 4 or 8 bytes, not {size}")

    def read_config(self, offset: int, size: int) -> bytes:
        """The driver reads ``size`` bytes of config at ``offset`` (little endian). A read past
        the config returns all ones and counts in ``config_faults``, as QEMU."""
        self._check_access(offset, size)
        with self._lock:
            config = self._config_bytes()
            if offset + size > len(config):
                self.config_faults += 1
                return b"\xff" * size
            return config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver writes config bytes. Only ``actual`` and, when PAGE_POISON was
        negotiated, ``poison_val`` take the written values (QEMU's set_config); writes past
        the config are ignored and counted in ``config_faults``."""
        self._check_access(offset, len(data))
        with self._lock:
            config = bytearray(self._config_bytes())
            if offset + len(data) > len(config):
                self.config_faults += 1
                return
            config[offset : offset + len(data)] = data
            self.actual = int.from_bytes(config[CONFIG_ACTUAL : CONFIG_ACTUAL + 4], "little")
            self.poison_val = 0
            if self.has(F_PAGE_POISON) and len(config) >= CONFIG_POISON_VAL + 4:
                self.poison_val = int.from_bytes(config[CONFIG_POISON_VAL:], "little")

    def set_target(self, num_pages: int) -> None:
        """Asks the guest to balloon to ``num_pages`` 4 KiB pages (QEMU's
        virtio_balloon_to_target): sets ``num_pages`` and raises a config interrupt."""
        if not 0 <= num_pages <= 0xFFFF_FFFF:
            raise ValueError(f"num_pages is a u32 of 4 KiB pages, not {num_pages}")
        with self._lock:
            self.num_pages = num_pages
        self._notify_config()

    @property
    def actual_bytes(self) -> int:
        """The balloon's size as the driver reports it: ``actual`` is in 4 KiB balloon pages
        whatever the guest's page size (VIRTIO_BALLOON_PFN_SHIFT is 12)."""
        return self.actual << BALLOON_PFN_SHIFT

    @property
    def target_bytes(self) -> int:
        """The requested balloon size: ``num_pages`` 4 KiB balloon pages."""
        return self.num_pages << BALLOON_PFN_SHIFT

    # -- the hinting state machine -------------------------------------------------------------

    @property
    def state(self) -> HintState:
        """The hinting state."""
        return self._state

    @property
    def cmd_id(self) -> int:
        """The latest cmd id issued (``CMD_ID_MIN`` before the first)."""
        return self._cmd_id

    @property
    def error(self) -> str | None:
        """Why the device needs a reset (QEMU's virtio_error), or None."""
        return self._error

    def _wrote(self, queue: str) -> None:
        """Tells ``guest_write`` that elements were returned on ``queue``."""
        notify, ring = self.guest_write, self._rings.get(queue)
        if notify is not None and ring is not None:
            notify(*ring.written(self.has(F_RING_PACKED)))

    def _notify_config(self) -> None:
        notify = self.notify_config
        if notify is not None:
            notify()

    def start_hinting(self) -> int | None:
        """After a dirty bitmap sync while the guest runs: a new cmd id (the counter plus one,
        from ``CMD_ID_MIN + 1``; after 0xFFFFFFFF back to ``CMD_ID_MIN``, as QEMU), state
        REQUESTED, config interrupt. Returns the id, or None
        (doing nothing) if hinting was not negotiated.

        Elements the driver made available before this call are first returned unapplied:
        the guest cannot have seen the new id yet, but Linux keeps the round's id in one
        buffer (``vb->cmd_id_active``) that it rewrites when it starts the next round, so an
        old round's unread id element would read as the new id and open the window early for
        the old round's hints, including blocks the shrinker gave back and the guest wrote
        before the sync (lost pages). QEMU has this hole; this device closes it."""
        if not self.hinting:
            return None
        with self._lock:
            retired = self._retire_available()
            self.retired_at_start += retired
            self._cmd_id = CMD_ID_MIN if self._cmd_id >= 0xFFFF_FFFF else self._cmd_id + 1
            self._state = HintState.REQUESTED
            cmd_id = self._cmd_id
        if retired:
            self._wrote("free_page")
        self._notify_config()
        return cmd_id

    def _leave(self, to: HintState) -> None:
        if not self.hinting:
            return
        with self._lock:
            changed = self._state is not to
            self._state = to
        if changed:
            self._notify_config()

    def stop_hinting(self) -> None:
        """Before a dirty bitmap sync: STOP (config interrupt if the state changed). When this
        returns, no hint is being applied and none of this round will be."""
        self._leave(HintState.STOP)

    def finish(self) -> None:
        """After the final sync, or on cancel or failure: DONE, so the guest frees every
        hinted page (config interrupt if the state changed)."""
        self._leave(HintState.DONE)

    def _retire_available(self) -> int:
        """Under the lock: returns every available element of the free page queue used,
        applying nothing (cmd ids still drive the state machine). Bounded by two rings'
        worth, so a guest refilling concurrently cannot hold the caller."""
        queue = self._queue
        if queue is None:
            return 0
        retired = 0
        budget = 2 * queue.size
        while budget > 0 and self._error is None:
            drain = queue.drain_hints(None, budget)
            retired += drain.elements
            budget -= drain.elements
            if drain.control is not None:
                self._control(drain.control)
                queue.add_used([drain.control.head], [0])
                retired += 1
                budget -= 1
            elif not drain.limited:
                break
        if queue.error is not None and self._error is None:
            self._error = f"free page queue: {queue.error}"
        return retired

    def _control(self, ctl: ControlElement) -> None:
        """A cmd id element, under the lock: QEMU's get_free_page_hints for out-buffers."""
        if ctl.cmd_id is None:
            self._error = "received an incorrect cmd id (fewer than 4 bytes)"
            return
        if self._state is HintState.REQUESTED and ctl.cmd_id == self._cmd_id:
            self._state = HintState.START
        elif self._state is HintState.START:
            # Any other out-buffer ends a started round; a stale id before START is ignored.
            self._state = HintState.STOP

    def process(self, max_elements: int = 1 << 20) -> ProcessResult:
        """Drains the free page queue: QEMU's virtio_ballloon_get_free_page_hints, the queue
        notification handler. Cmd id out-buffers drive the state machine, hint in-buffers are
        applied to the bound bitmap only in START, every element is returned used with length
        0. Takes at most ``max_elements`` elements (rejected ones count), one lock hold per
        chunk of at most 1024; ``more`` says whether the budget ran out first.
        ``RuntimeError`` if the free page queue is not set up."""
        if max_elements < 0:
            raise ValueError(f"max_elements must not be negative, not {max_elements}")
        queue = self._queue
        if queue is None:
            raise RuntimeError("the free page queue is not set up (negotiate, then set_queue)")
        totals = _ProcessTotals()
        budget = max_elements
        more = budget == 0
        while budget > 0:
            with self._lock:
                if self._error is not None or self._queue is not queue:
                    break
                taken, go_on = self._get_free_page_hints(queue, min(budget, _CHUNK), totals)
            budget -= taken
            if not go_on:
                break
            more = budget <= 0
        if totals.elements:
            self._wrote("free_page")
        return ProcessResult(
            elements=totals.elements,
            hint_elements_applied=totals.applied,
            hint_elements_ignored=totals.ignored,
            cmd_ids=totals.cmd_ids,
            hints=HintResult(
                totals.hints, totals.pages_hinted, totals.pages_cleared, totals.rejected
            ),
            state=self._state,
            interrupt=totals.elements > 0 and queue.needs_interrupt(),
            more=more,
            error=self._error,
            ranges=totals.ranges_array() if self.record_ranges else None,
        )

    def _get_free_page_hints(
        self, queue: _Queue, budget: int, totals: _ProcessTotals
    ) -> tuple[int, bool]:
        """QEMU's get_free_page_hints over up to ``budget`` elements, under the lock: the hint
        elements before the next cmd id element go straight into the bitmap in START (returned
        unapplied otherwise); that cmd id element drives the state machine, and its own
        in-buffers are applied if the state is then START. Returns the budget used (rejected
        elements use it too, so a guest cannot keep this going) and whether more may wait."""
        bitmap = self._bitmap if self._state is HintState.START else None
        refused = sum(queue.rejected.values())
        record = self.record_ranges or self.hint_listener is not None
        drain = queue.drain_hints(bitmap, budget, record=record)
        self._qemu_guest_free_page_hint(drain.result, totals)
        used = drain.elements
        if bitmap is not None:
            totals.applied += drain.elements
        else:
            totals.ignored += drain.elements
        ctl = drain.control
        if ctl is not None:
            if ctl.cmd_id is not None:
                totals.cmd_ids.append(ctl.cmd_id)
            self._control(ctl)
            if (
                ctl.hints
                and self._error is None
                and self._state is HintState.START
                and self._bitmap is not None
            ):
                hints = np.array(ctl.hints, dtype=np.uint64).reshape(-1, 2)
                applied = apply_hints(self._bitmap, self._memmap, hints, record=record)
                self._qemu_guest_free_page_hint(applied, totals)
            queue.add_used([ctl.head], [0])
            used += 1
        if queue.error is not None and self._error is None:
            self._error = f"free page queue: {queue.error}"
        totals.elements += used
        return used + sum(queue.rejected.values()) - refused, ctl is not None or drain.limited

    def _qemu_guest_free_page_hint(self, result: HintResult, totals: _ProcessTotals) -> None:
        """Hints applied (under the lock): counted, their ranges recorded and handed to the
        ``hint_listener``, where QEMU's qemu_guest_free_page_hint clears the dirty log."""
        totals.add(result)
        self.pages_hinted_total += result.pages_hinted
        self.pages_cleared_total += result.pages_cleared
        ranges = result.ranges
        if ranges is not None and len(ranges):
            if self.record_ranges:
                totals.ranges.append(ranges)
            if self.hint_listener is not None:
                self.hint_listener(ranges)

    def process_reporting(self, max_elements: int = 1 << 16) -> ReportResult:
        """Drains the free page reporting queue: each in-buffer that is page aligned and
        inside one RAM region goes to ``discard`` (skipped while ``poison_val`` is non-zero),
        and every element is returned used with length 0. ``RuntimeError`` if the reporting
        queue is not set up."""
        result = self._reporting.process(max_elements, self.poison_val)
        if result.elements:
            self._wrote("reporting")
        return result

    @property
    def rejected(self) -> dict[str, int]:
        """Free page queue elements rejected so far, by reason (see ``SplitQueue``)."""
        return {} if self._queue is None else self._queue.rejected

    # -- migration ---------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """The device's state for live migration, as QEMU's vmstate saves a virtio device: a
        dict of ints, strs, bools, lists and None (``json.dumps`` takes it as it is).

        Call it while the device is quiescent (the guest's vCPUs stopped, no ``process()``
        or ``process_reporting()`` running and none to come): the queue indices saved are
        where the readers stopped, and an element popped but not yet returned would be lost.
        The device lock is held while the state is read. Saved: the offered and negotiated
        features, ``features_ok``, the hint state, the cmd id counter, ``num_pages``,
        ``actual``, ``poison_val``, ``error``, ``config_faults``, ``retired_at_start``, the
        page totals, and each set-up free page or reporting queue (``name``, ``index``,
        ``size``, the ``desc``/``driver``/``device`` addresses and its indices: split
        ``last_avail``, ``next_used``; packed ``next_avail``, ``avail_wrap``, ``next_used``,
        ``used_wrap``). Not saved: a queue reader's ``rejected`` counts and a broken reader's
        error (the device's ``error`` is saved), and what the VMM wires up (the bitmap, the
        callbacks, the constructor's options)."""
        with self._lock:
            queues: list[object] = []
            for name, queue in (("free_page", self._queue), ("reporting", self._reporting.queue)):
                ring = self._rings.get(name)
                if queue is None or ring is None:
                    continue
                saved: dict[str, object] = {
                    "name": name,
                    "index": ring.index,
                    "size": ring.size,
                    "desc": ring.desc,
                    "driver": ring.driver,
                    "device": ring.device,
                }
                if isinstance(queue, PackedQueue):
                    (avail, avail_wrap), (used, used_wrap) = queue.next_avail, queue.next_used
                    saved |= {
                        "next_avail": avail,
                        "avail_wrap": avail_wrap,
                        "next_used": used,
                        "used_wrap": used_wrap,
                    }
                else:
                    saved |= {"last_avail": queue.last_avail, "next_used": queue.next_used}
                queues.append(saved)
            return {
                "version": _state.STATE_VERSION,
                "features": self.features,
                "negotiated": self._negotiated,
                "features_ok": self._features_ok,
                "state": self._state.value,
                "cmd_id": self._cmd_id,
                "num_pages": self.num_pages,
                "actual": self.actual,
                "poison_val": self.poison_val,
                "error": self._error,
                "config_faults": self.config_faults,
                "retired_at_start": self.retired_at_start,
                "pages_hinted_total": self.pages_hinted_total,
                "pages_cleared_total": self.pages_cleared_total,
                "queues": queues,
            }

    def restore_state(self, state: object) -> None:
        """Takes a state ``save_state`` returned (on the source), on a device built over the
        destination's RAM buffer and memory map with the same constructor arguments: the
        queue readers are made afresh from the saved rings and continue at the saved indices
        (the reader checks them, as QEMU's ``virtio_load`` does: a split ring's used index
        may not be ahead of the available one or more than a queue behind it, a packed
        ring's positions must be below its size).

        Call it while the device is quiescent (no ``process()`` running, the guest not
        running yet); the device lock is held while the state is replaced. Everything is
        checked first: ``ValueError`` (the device unchanged) for a key missing or unknown, a
        value of the wrong type or out of range, offered features other than this device's,
        negotiated features it does not offer, a queue the negotiated features do not have
        or in the wrong ring layout, or indices the reader refuses. No config interrupt is
        raised: the driver saw the config before the migration."""
        loaded = self._check_state(state)
        self._load_state(loaded)

    def _check_state(self, state: object) -> _SavedState:
        """``state`` checked and its queue readers made, changing nothing (``ValueError``)."""
        what = "device state"
        d = _state.fields(state, what, _DEVICE_KEYS)
        features = _state.integer(d, "features", what)
        if features != self.features:
            raise ValueError(
                f"{what}: the source offered features {features:#x}, this device offers "
                f"{self.features:#x} (build it with the same arguments)"
            )
        negotiated = _state.integer(d, "negotiated", what)
        if negotiated & ~self.features:
            raise ValueError(
                f"{what}: negotiated features {negotiated & ~self.features:#x} are not offered"
            )
        raw_state = d["state"]
        try:
            hint_state = HintState(raw_state)
        except ValueError:
            raise ValueError(f"{what}.state must be a HintState value, not {raw_state!r}") from None
        if hint_state is not HintState.STOP and not negotiated >> F_FREE_PAGE_HINT & 1:
            raise ValueError(f"{what}: state {hint_state.value} without FREE_PAGE_HINT")
        poison_val = _state.integer(d, "poison_val", what, _state.U32)
        if poison_val and not negotiated >> F_PAGE_POISON & 1:
            raise ValueError(f"{what}: poison_val {poison_val} without PAGE_POISON negotiated")
        error = d["error"]
        if error is not None and not isinstance(error, str):
            raise ValueError(f"{what}.error must be a str or None, not {type(error).__name__}")
        loaded = _SavedState(
            negotiated=negotiated,
            features_ok=_state.boolean(d, "features_ok", what),
            state=hint_state,
            cmd_id=_state.integer(d, "cmd_id", what, _state.U32, CMD_ID_MIN),
            num_pages=_state.integer(d, "num_pages", what, _state.U32),
            actual=_state.integer(d, "actual", what, _state.U32),
            poison_val=poison_val,
            error=error,
            config_faults=_state.integer(d, "config_faults", what),
            retired_at_start=_state.integer(d, "retired_at_start", what),
            pages_hinted_total=_state.integer(d, "pages_hinted_total", what),
            pages_cleared_total=_state.integer(d, "pages_cleared_total", what),
        )
        for i, raw in enumerate(_state.listing(d, "queues", what)):
            self._check_queue(raw, f"{what}.queues[{i}]", loaded)
        return loaded

    def _check_queue(self, raw: object, what: str, loaded: _SavedState) -> None:
        """One saved queue: its reader made at its indices, into ``loaded.queues``."""
        packed = bool(loaded.negotiated >> F_RING_PACKED & 1)
        q = _state.fields(raw, what, _PACKED_QUEUE_KEYS if packed else _SPLIT_QUEUE_KEYS)
        name = q["name"]
        if name not in ("free_page", "reporting") or name in loaded.queues:
            raise ValueError(f"{what}.name must be a new 'free_page' or 'reporting', not {name!r}")
        ring = _Ring(
            _state.integer(q, "index", what, _state.U16),
            _state.integer(q, "size", what, _state.U16),
            _state.integer(q, "desc", what),
            _state.integer(q, "driver", what),
            _state.integer(q, "device", what),
        )
        if loaded.negotiated_index(self, str(name)) != ring.index:
            raise ValueError(
                f"{what}: the negotiated features have no {name} queue at index {ring.index}"
            )
        indices: tuple[int, bool, int, bool] | tuple[int, int]
        if packed:
            indices = (
                _state.integer(q, "next_avail", what, _state.U16),
                _state.boolean(q, "avail_wrap", what),
                _state.integer(q, "next_used", what, _state.U16),
                _state.boolean(q, "used_wrap", what),
            )
        else:
            indices = (
                _state.integer(q, "last_avail", what, _state.U16),
                _state.integer(q, "next_used", what, _state.U16),
            )
        try:
            _, queue = self._make_queue(ring, loaded.negotiated)
            assert queue is not None  # the free page and reporting queues have readers
            if isinstance(queue, PackedQueue):
                assert len(indices) == 4
                queue.set_indices(*indices)
            else:
                assert len(indices) == 2
                queue.set_indices(*indices)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        loaded.queues[str(name)] = (ring, queue)

    def _load_state(self, loaded: _SavedState) -> None:
        """Replaces the device's state with a checked one, under the lock."""
        with self._lock:
            self._negotiated = loaded.negotiated
            self._features_ok = loaded.features_ok
            self._state = loaded.state
            self._cmd_id = loaded.cmd_id
            self.num_pages = loaded.num_pages
            self.actual = loaded.actual
            self.poison_val = loaded.poison_val
            self._error = loaded.error
            self.config_faults = loaded.config_faults
            self.retired_at_start = loaded.retired_at_start
            self.pages_hinted_total = loaded.pages_hinted_total
            self.pages_cleared_total = loaded.pages_cleared_total
            self._rings = {name: ring for name, (ring, _) in loaded.queues.items()}
            free_page = loaded.queues.get("free_page")
            reporting = loaded.queues.get("reporting")
            self._queue = None if free_page is None else free_page[1]
            self._reporting.set_queue(None if reporting is None else reporting[1])


_DEVICE_KEYS = (
    "version",
    "features",
    "negotiated",
    "features_ok",
    "state",
    "cmd_id",
    "num_pages",
    "actual",
    "poison_val",
    "error",
    "config_faults",
    "retired_at_start",
    "pages_hinted_total",
    "pages_cleared_total",
    "queues",
)
_RING_KEYS = ("name", "index", "size", "desc", "driver", "device")
_SPLIT_QUEUE_KEYS = (*_RING_KEYS, "last_avail", "next_used")
_PACKED_QUEUE_KEYS = (*_RING_KEYS, "next_avail", "avail_wrap", "next_used", "used_wrap")


@dataclass
class _SavedState:
    """A device state that passed ``restore_state``'s checks, with its queue readers made."""

    negotiated: int
    features_ok: bool
    state: HintState
    cmd_id: int
    num_pages: int
    actual: int
    poison_val: int
    error: str | None
    config_faults: int
    retired_at_start: int
    pages_hinted_total: int
    pages_cleared_total: int
    queues: dict[str, tuple[_Ring, _Queue]] = field(default_factory=dict)

    def negotiated_index(self, device: FreePageHintDevice, name: str) -> int | None:
        """Queue ``name``'s index on ``device`` with these negotiated features."""
        return device._queue_indices_for(self.negotiated).get(name)
