"""The Linux virtio-balloon driver's free page hinting (``drivers/virtio/virtio_balloon.c``),
writing real elements into a real split ring in the simulated guest's RAM.

``LinuxBalloonDriver`` is the guest kernel's driver: it probes the device, takes config
interrupts, and on a new cmd id sends the id, one in-buffer per free block of the hint order,
then STOP; on DONE it gives every hinted block back. The blocks themselves come from and go
back to the guest's allocator (``SimulatedGuest.hint_blocks`` and ``shrink``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pagehint.device import (
    CMD_ID_DONE,
    CMD_ID_STOP,
    CONFIG_FREE_PAGE_HINT_CMD_ID,
    CONFIG_POISON_VAL,
    F_DEFLATE_ON_OOM,
    F_EVENT_IDX,
    F_FREE_PAGE_HINT,
    F_INDIRECT_DESC,
    F_MUST_TELL_HOST,
    F_PAGE_POISON,
    F_STATS_VQ,
    F_VERSION_1,
    FREE_PAGE_QUEUE_MAX,
    FreePageHintDevice,
    ProcessResult,
)
from pagehint.sim.driver_ring import DriverSplitRing, ring_bytes

if TYPE_CHECKING:
    from pagehint.sim.guest import SimulatedGuest

__all__ = ["DriverStep", "LinuxBalloonDriver", "RoundResult", "run_until_idle"]


@dataclass(frozen=True)
class DriverStep:
    """What one ``run`` call did: blocks put in the ring as hints, cmd ids sent (the
    round's id, then STOP), hinted blocks given back to the allocator on DONE, whether a round
    is still going, and whether it stopped for lack of ring space."""

    blocks_hinted: int = 0
    cmd_ids_sent: tuple[int, ...] = ()
    blocks_returned: int = 0
    in_round: bool = False
    ring_full: bool = False
    kick: bool = False


class LinuxBalloonDriver:
    """The driver of ``guest``, its rings and cmd id buffers at ``ring_base`` (kernel
    memory). State as ``struct virtio_balloon``: the cmd id received from config (read only
    after a config interrupt), the active round's id (``cmd_id_active``, one buffer that
    each round rewrites), whether free page work is queued."""

    def __init__(self, guest: SimulatedGuest, ring_base: int) -> None:
        self.guest = guest
        self.device: FreePageHintDevice | None = None
        self.negotiated = 0
        self.queue: DriverSplitRing | None = None
        self._ring_base = ring_base
        self._lock = threading.Lock()
        self._read_cmd_id = False  # VIRTIO_BALLOON_CONFIG_READ_CMD_ID
        self._work_queued = False  # report_free_page_work
        self._cmd_id_received = CMD_ID_STOP
        self.cmd_id_active = CMD_ID_STOP
        self._in_round = False
        self.config_interrupts = 0

    def attach(self, device: FreePageHintDevice) -> int:
        """Probes ``device`` as Linux's virtballoon_probe does: negotiates (PAGE_POISON only
        with page poisoning, REPORTING never: this guest does not report), sets up the free
        page queue in kernel memory with the device's maximum size, writes ``poison_val``,
        and takes config interrupts. Returns the negotiated features."""
        guest = self.guest
        wanted = sum(
            1 << b
            for b in (
                F_MUST_TELL_HOST,
                F_STATS_VQ,
                F_DEFLATE_ON_OOM,
                F_FREE_PAGE_HINT,
                F_VERSION_1,
                F_EVENT_IDX,
                F_INDIRECT_DESC,
            )
        )
        if guest.poison is not None:
            wanted |= 1 << F_PAGE_POISON
        self.negotiated = device.negotiate(wanted & device.features)
        self.device = device
        device.notify_config = self.config_changed
        index = device.free_page_queue_index
        if index is not None:
            size = FREE_PAGE_QUEUE_MAX
            desc, avail, used = self._ring_layout(size)
            event_idx = bool(self.negotiated >> F_EVENT_IDX & 1)
            self.queue = DriverSplitRing(
                guest.ram, guest.memmap, size, desc, avail, used, event_idx=event_idx
            )
            device.set_queue(index, size, desc, avail, used)
            guest.write_gpa_range(self._ring_base, self._ring_area(size) + 8)
        if self.negotiated >> F_PAGE_POISON & 1:
            assert guest.poison is not None
            device.write_config(CONFIG_POISON_VAL, guest.poison.to_bytes(4, "little"))
        self._cmd_id_received = self.cmd_id_active = CMD_ID_STOP
        return self.negotiated

    def _ring_layout(self, size: int) -> tuple[int, int, int]:
        dn, an, _ = ring_bytes(size)
        desc = self._ring_base
        avail = desc + dn
        used = -(-(avail + an) // 4096) * 4096
        return desc, avail, used

    def _ring_area(self, size: int) -> int:
        """Bytes from the descriptor table to the end of the used ring."""
        desc, _, used = self._ring_layout(size)
        return used + ring_bytes(size)[2] - desc

    @property
    def _cmd_gpas(self) -> tuple[int, int]:
        # cmd_id_active and cmd_id_stop: 4-byte out-buffers after the rings.
        base = self._ring_base + self._ring_area(FREE_PAGE_QUEUE_MAX)
        return base, base + 4

    def config_changed(self) -> None:
        """The config interrupt (virtballoon_changed): re-read the cmd id next time, and
        queue the free page work. Safe to call from another thread."""
        with self._lock:
            self.config_interrupts += 1
            self._read_cmd_id = True
            self._work_queued = True

    def _cmd_id(self) -> int:
        """virtio_balloon_cmd_id_received: the config is read only after a config interrupt."""
        with self._lock:
            read, self._read_cmd_id = self._read_cmd_id, False
        if read and self.device is not None:
            raw = self.device.read_config(CONFIG_FREE_PAGE_HINT_CMD_ID, 4)
            self._cmd_id_received = int.from_bytes(raw, "little")
        return self._cmd_id_received

    def _send_cmd_id(self, gpa: int, cmd_id: int) -> None:
        assert self.queue is not None
        offset = self._ram_offset(gpa)
        self.guest.ram[offset : offset + 4] = np.frombuffer(
            cmd_id.to_bytes(4, "little"), dtype=np.uint8
        )
        self.queue.add(np.array([gpa], dtype=np.uint64), 4, writable=False)

    def _ram_offset(self, gpa: int) -> int:
        memmap = self.guest.memmap
        return memmap.pfn_of(gpa) * memmap.page_size + gpa % memmap.page_size

    def run(self, max_blocks: int | None = None, *, late: bool = False) -> DriverStep:
        """Runs the driver's pending free page work: on a new cmd id, an out-buffer with it,
        then one in-buffer per free block (allocated from the free list, so zeroed with
        ``init_on_alloc``) while the id in config is unchanged, then a STOP out-buffer; on
        DONE, every hinted block goes back to the allocator. Adds at most ``max_blocks``
        blocks, and stops early when the ring is full (one entry stays free for the cmd id);
        the round then continues on the next call. Used buffers are reclaimed first.

        The id is re-checked before every block; as the config changes only through the
        device, a batch between two device calls sees one value, so checking per batch is
        the same check. Config interrupts from another thread land between batches.

        ``late=True`` plays the vCPU race a real guest has: the id was checked just before
        the config changed, so the first batch of a round in progress goes out under the old
        id without looking again."""
        if self.queue is None:
            return DriverStep()
        guest, queue = self.guest, self.queue
        queue.get_used()
        budget = -1 if max_blocks is None else max_blocks
        hinted = returned = 0
        sent: list[int] = []
        ring_full = False
        active_gpa, stop_gpa = self._cmd_gpas
        while True:
            if not self._in_round:
                with self._lock:
                    queued, self._work_queued = self._work_queued, False
                if not queued:
                    break
                received = self._cmd_id()
                if received == CMD_ID_DONE:
                    returned += guest.shrink(guest.hinted_block_count)
                elif received not in (CMD_ID_STOP, self.cmd_id_active):
                    # send_cmd_id_start
                    self.cmd_id_active = received
                    self._send_cmd_id(active_gpa, received)
                    sent.append(received)
                    self._in_round = True
                continue
            # send_free_pages: stop on a changed id, or when no block is free.
            if late:
                late = False
            elif self._cmd_id() != self.cmd_id_active:
                self._end_round(stop_gpa, sent)
                continue
            space = queue.num_free - 1
            want = space if budget < 0 else min(space, budget)
            if want <= 0:
                ring_full = space <= 0
                break
            blocks = guest.hint_blocks(want, self.cmd_id_active)
            if len(blocks):
                queue.add(guest.block_gpa[blocks], guest.block_bytes, writable=True, tokens=blocks)
                hinted += len(blocks)
                if budget > 0:
                    budget -= len(blocks)
            if len(blocks) < want:
                self._end_round(stop_gpa, sent)  # the allocation failed: all free blocks sent
        touched = hinted or sent
        if touched:
            guest.write_gpa_range(self._ring_base, self._ring_area(queue.size) + 8)
        return DriverStep(
            hinted, tuple(sent), returned, self._in_round, ring_full, bool(touched) and queue.kick()
        )

    def _end_round(self, stop_gpa: int, sent: list[int]) -> None:
        self._send_cmd_id(stop_gpa, CMD_ID_STOP)
        sent.append(CMD_ID_STOP)
        self._in_round = False

    @property
    def in_round(self) -> bool:
        """Whether a hinting round is going (its STOP not sent yet)."""
        return self._in_round

    @property
    def work_pending(self) -> bool:
        """Whether a config interrupt left free page work to do."""
        return self._work_queued

    def note_device_writes(self) -> None:
        """The device wrote the used ring: those pages changed (call after ``process``)."""
        if self.queue is not None:
            _, _, used = self._ring_layout(self.queue.size)
            self.guest.write_gpa_range(used, ring_bytes(self.queue.size)[2])


@dataclass(frozen=True)
class RoundResult:
    """A hinting round run to its end: blocks the guest hinted, what the device applied and
    cleared, and how many driver/device steps it took."""

    blocks_hinted: int
    pages_hinted: int
    pages_cleared: int
    hint_elements_ignored: int
    steps: int
    cmd_ids: list[int]


def run_until_idle(
    guest: SimulatedGuest,
    device: FreePageHintDevice,
    *,
    max_blocks_per_step: int | None = None,
    max_steps: int = 1 << 20,
    between: Callable[[int], None] | None = None,
) -> RoundResult:
    """Alternates the guest's driver and the device's queue processing until the guest has
    no free page work left and the device's queue is empty. ``between(step)`` runs after each
    step (workloads, a stop_hinting(), ...)."""
    blocks = hinted = cleared = ignored = steps = 0
    cmd_ids: list[int] = []
    while steps < max_steps:
        s = guest.driver.run(max_blocks_per_step)
        r: ProcessResult = device.process()
        if r.elements:
            guest.driver.note_device_writes()
        blocks += s.blocks_hinted
        hinted += r.hints.pages_hinted
        cleared += r.hints.pages_cleared
        ignored += r.hint_elements_ignored
        cmd_ids.extend(r.cmd_ids)
        steps += 1
        if between is not None:
            between(steps)
        if (
            not guest.driver.in_round
            and not guest.driver.work_pending
            and r.elements == 0
            and not s.blocks_hinted
            and not s.cmd_ids_sent
        ):
            break
    return RoundResult(blocks, hinted, cleared, ignored, steps, cmd_ids)
