"""The test guest (``guest/guest.c``) on a ``Vm``: loaded, booted in long mode, and driven
command by command through port I/O, with its own state readable in guest RAM.

The guest asks for work by reading port 0x510; the VMM answers with the next command (or
NOP after 50 ms, so an idle guest exits about 20 times a second and can always be paused),
the guest reads the arguments from 0x511, runs the command and writes its result to 0x512. A
panic code on 0x513 stops it.
"""

from __future__ import annotations

import ctypes
import queue
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.kvm.boot import enter_long_mode, write_page_tables
from pagehint.kvm.build import LOAD_GPA, build_guest
from pagehint.kvm.vm import Vm

MMIO_BASE = 0xD000_0000
"""Where pagehint puts the balloon's virtio-mmio window: in the hole below 4 GiB."""
BOOT_INFO_GPA = 0xB000
BOOT_MAGIC = 0x3154534555474850  # "PHGUEST1"
MAX_REGIONS = 4
STACK_TOP = 0x80000
STATE_BASE = 0x200000
"""The guest keeps its state (allocator, page versions, the free page ring) from here."""

PORT_CMD, PORT_ARG, PORT_RESULT, PORT_PANIC = 0x510, 0x511, 0x512, 0x513
PORT_AP, PORT_AP_DONE, PORT_RUN = 0x514, 0x515, 0x516
AP_ENTRY_OFFSET = 16
"""The second vCPU's entry point, from the image's start (``guest.c``'s ``_start``)."""
AP_AREA_GPA = 0x180000
AP_PAGES = 64
AP_STACK_TOP = 0x98000
_AP_NOTHING = 0xFFFFFFFF
CMD_NOP, CMD_ALLOC_WRITE, CMD_FREE, CMD_WRITE_PAGES, CMD_POLL = 0, 1, 2, 3, 4
CMD_SHRINK, CMD_SELFCHECK, CMD_PROBE, CMD_HALT, CMD_PING, CMD_WRITE_AT = 5, 6, 7, 8, 9, 10
CMD_RUN = 11

FREE, USED, HINTED = 0, 1, 2
"""Block states of the guest's allocator."""

_u64, _u32 = ctypes.c_uint64, ctypes.c_uint32


class BootInfo(ctypes.Structure):
    """struct boot_info (``guest/boot_info.h``)."""

    _fields_ = (
        ("magic", _u64),
        ("mmio_base", _u64),
        ("block_bytes", _u64),
        ("kernel_bytes", _u64),
        ("state_base", _u64),
        ("nregions", _u32),
        ("queue_size", _u32),
        ("region_gpa", _u64 * MAX_REGIONS),
        ("region_size", _u64 * MAX_REGIONS),
        ("nblocks", _u64),
        ("npages", _u64),
        ("block_gpa_at", _u64),
        ("block_state_at", _u64),
        ("hinted_under_at", _u64),
        ("page_version_at", _u64),
        ("desc_at", _u64),
        ("avail_at", _u64),
        ("used_at", _u64),
        ("cmd_id_buf_at", _u64),
        ("free_page_queue", _u64),
        ("features", _u64),
        ("driver_status", _u32),
        ("cmd_id_active", _u32),
        ("rounds", _u64),
        ("blocks_hinted", _u64),
        ("blocks_returned", _u64),
        ("config_changes", _u64),
    )


def kernel_bytes_for(
    memmap: _core.MemoryMap, *, block_bytes: int = 4 << 20, queue_size: int = 256
) -> int:
    """The RAM the guest's kernel keeps for ``memmap``: code, stack and its state from
    ``STATE_BASE`` (laid out as ``guest.c``'s ``init`` does; a version per page is most of it),
    rounded up to whole blocks. 4 MiB up to a 1 GiB guest."""

    def field(cursor: int, nbytes: int) -> int:
        return (cursor + nbytes + 63) & ~63

    nblocks = npages = 0
    for gpa, size in memmap.regions:
        lo = -(-gpa // block_bytes) * block_bytes
        hi = (gpa + size) // block_bytes * block_bytes
        nblocks += max(0, hi - lo) // block_bytes
        npages += size // 4096
    cursor = STATE_BASE
    for nbytes in (8 * MAX_REGIONS, 8 * nblocks, nblocks, 4 * nblocks, 4 * npages):
        cursor = field(cursor, nbytes)
    for _ in range(3):  # the free, hinted and used stacks
        cursor = field(cursor, 4 * nblocks)
    cursor = field(_page_up(cursor), 16 * queue_size)
    cursor = field(cursor, 6 + 2 * queue_size)
    cursor = field(_page_up(cursor), 6 + 8 * queue_size)
    cursor = field(_page_up(cursor), 8)
    return -(-cursor // block_bytes) * block_bytes


def _page_up(at: int) -> int:
    return (at + 4095) & ~4095


class GuestError(RuntimeError):
    """The guest panicked, its vCPU stopped, or a command timed out."""


@dataclass(frozen=True)
class SelfCheck:
    """The guest's own verdict: pages in use whose content is not what it last wrote, and
    facts of its allocator and ring that do not add up."""

    bad_pages: int
    bad_state: int

    @property
    def ok(self) -> bool:
        return self.bad_pages == 0 and self.bad_state == 0


class GuestProgram:
    """The test guest on ``vm`` (its first vCPU), with its virtio-mmio device expected at
    ``mmio_base``. The kernel keeps the first ``kernel_bytes`` of RAM (by default what
    ``kernel_bytes_for`` says the memory map needs; code at 1 MiB, stack,
    state); the rest is its 4 MiB block allocator's. ``load=False`` only attaches the command
    ports, for a VM whose RAM and vCPU state arrive from a migration."""

    def __init__(
        self,
        vm: Vm,
        *,
        mmio_base: int,
        queue_size: int = 256,
        block_bytes: int = 4 << 20,
        kernel_bytes: int | None = None,
        timeout: float = 120.0,
        load: bool = True,
    ) -> None:
        regions = sorted(vm.memmap.regions)
        if kernel_bytes is None:
            kernel_bytes = kernel_bytes_for(
                vm.memmap, block_bytes=block_bytes, queue_size=queue_size
            )
        if len(regions) > MAX_REGIONS:
            raise ValueError(f"the guest knows at most {MAX_REGIONS} RAM regions")
        if regions[0][0] != 0 or regions[0][1] < kernel_bytes:
            raise ValueError("the first RAM region must start at 0 and hold the kernel")
        if not 1 <= queue_size <= 1024 or queue_size & (queue_size - 1):
            raise ValueError(f"queue_size must be a power of two up to 1024, not {queue_size}")
        self.vm = vm
        self.vcpu = vm.vcpus[0]
        self.timeout = timeout
        self.block_bytes = block_bytes
        self._go_on = threading.Event()
        self._register_ports()
        if load:
            self._load(mmio_base, queue_size, block_bytes, kernel_bytes)

    def _load(self, mmio_base: int, queue_size: int, block_bytes: int, kernel_bytes: int) -> None:
        vm = self.vm
        regions = sorted(vm.memmap.regions)
        image = build_guest()
        if LOAD_GPA + len(image) > STATE_BASE:
            raise ValueError("the guest image runs into its state")
        top = max(gpa + size for gpa, size in regions)
        write_page_tables(vm, max(top, mmio_base + 0x1000))
        vm.write(LOAD_GPA, image)
        info = BootInfo(
            magic=BOOT_MAGIC,
            mmio_base=mmio_base,
            block_bytes=block_bytes,
            kernel_bytes=kernel_bytes,
            state_base=STATE_BASE,
            nregions=len(regions),
            queue_size=queue_size,
        )
        for i, (gpa, size) in enumerate(regions):
            info.region_gpa[i], info.region_size[i] = gpa, size
        vm.write(BOOT_INFO_GPA, bytes(info))
        enter_long_mode(self.vcpu, entry=LOAD_GPA, stack_top=STACK_TOP)

    def _register_ports(self) -> None:
        vm = self.vm
        self._commands: queue.Queue[tuple[int, tuple[int, ...]]] = queue.Queue()
        self._results: queue.Queue[int | None] = queue.Queue()
        self._args: deque[int] = deque()
        self._lock = threading.Lock()
        self.panic: int | None = None
        self._ap_work: queue.Queue[tuple[int, int]] = queue.Queue()
        self._ap_args: deque[int] = deque()
        self._ap_done: queue.Queue[int] = queue.Queue()
        for port, handler in (
            (PORT_CMD, self._on_cmd),
            (PORT_ARG, self._on_arg),
            (PORT_RESULT, self._on_result),
            (PORT_PANIC, self._on_panic),
            (PORT_AP, self._on_ap),
            (PORT_AP_DONE, self._on_ap_done),
            (PORT_RUN, self._on_run),
        ):
            vm.add_io(port, handler)

    # -- the port protocol (vCPU thread) ------------------------------------------------------

    def _on_cmd(self, port: int, data: bytes | None, size: int) -> bytes | None:
        if data is not None:
            return None
        try:
            cmd, args = self._commands.get(timeout=0.05)
        except queue.Empty:
            cmd, args = CMD_NOP, ()
        self._args = deque(args)
        return cmd.to_bytes(4, "little")[:size]

    def _on_arg(self, port: int, data: bytes | None, size: int) -> bytes | None:
        if data is not None:
            return None
        value = self._args.popleft() if self._args else 0
        return (value & 0xFFFFFFFF).to_bytes(4, "little")[:size]

    def _on_result(self, port: int, data: bytes | None, size: int) -> bytes | None:
        if data is not None:
            self._results.put(int.from_bytes(data, "little"))
        return None

    def _on_panic(self, port: int, data: bytes | None, size: int) -> bytes | None:
        if data is not None:
            self.panic = int.from_bytes(data, "little")
            self._results.put(None)
        return None

    def _on_ap(self, port: int, data: bytes | None, size: int) -> bytes | None:
        if data is not None:
            return None
        if self._ap_args:
            value = self._ap_args.popleft()
        else:
            try:
                npages, round_ = self._ap_work.get(timeout=0.05)
            except queue.Empty:
                npages, round_ = _AP_NOTHING, 0
            if npages not in (0, _AP_NOTHING):
                self._ap_args.append(round_)
            value = npages
        return value.to_bytes(4, "little")[:size]

    def _on_ap_done(self, port: int, data: bytes | None, size: int) -> bytes | None:
        if data is not None:
            self._ap_done.put(int.from_bytes(data, "little"))
        return None

    def _on_run(self, port: int, data: bytes | None, size: int) -> bytes | None:
        if data is not None:
            return None
        return (1 if self._go_on.is_set() else 0).to_bytes(4, "little")[:size]

    # -- running by itself -----------------------------------------------------------------------

    def run(self, pages_per_step: int, seed: int = 0) -> None:
        """The guest runs by itself (``CMD_RUN``): it rewrites ``pages_per_step`` pages of its
        used blocks, takes the balloon's config changes (hinting rounds), and asks to go on,
        step after step, until ``stop_run``. A copy of the guest resumed elsewhere ends its run at
        its next step (the destination's VMM answers "stop")."""
        self._go_on.set()
        self._commands.put((CMD_RUN, (pages_per_step, seed)))

    @property
    def in_run(self) -> bool:
        """Whether a ``run`` was started and not stopped."""
        return self._go_on.is_set()

    def stop_run(self) -> int:
        """Ends a ``run`` at its next step; returns the steps it ran."""
        self._go_on.clear()
        return self.collect()

    def collect(self, results: int = 1) -> int:
        """The result of a command already running (``run``, or one resumed on a
        destination)."""
        return self._collect(results)[0]

    # -- the second vCPU ------------------------------------------------------------------------

    def start_ap(self) -> None:
        """Starts the VM's second vCPU in the guest's second entry point: it writes pages of
        its own area (``AP_AREA_GPA``, ``AP_PAGES``) when asked (``ap_write``)."""
        if len(self.vm.vcpus) < 2:
            raise ValueError("the VM has one vCPU; make it with vcpus=2")
        ap = self.vm.vcpus[1]
        enter_long_mode(ap, entry=LOAD_GPA + AP_ENTRY_OFFSET, stack_top=AP_STACK_TOP)
        ap.start()

    def ap_write(self, npages: int, round_: int, *, wait: bool = True) -> None:
        """The second vCPU writes ``npages`` pages of its area (round-robin), each stamped
        with ``round_``; with ``wait``, returns once it has."""
        if not 1 <= npages < _AP_NOTHING:
            raise ValueError(f"npages must be positive, not {npages}")
        self._ap_work.put((npages, round_ & 0xFFFFFFFF))
        if wait:
            self.ap_wait()

    def ap_wait(self) -> int:
        """Waits for the second vCPU's current request; returns the pages it wrote."""
        try:
            return self._ap_done.get(timeout=self.timeout)
        except queue.Empty:
            ap = self.vm.vcpus[1]
            why = f"; {ap.error}" if ap.error else ""
            raise GuestError(f"the second vCPU did not answer in {self.timeout} s{why}") from None

    def ap_halt(self) -> None:
        """The second vCPU halts; its thread ends."""
        self._ap_work.put((0, 0))
        self.vm.vcpus[1].join(self.timeout)

    # -- commands -----------------------------------------------------------------------------

    def start(self) -> None:
        """Runs the guest's vCPU (its boot, then it waits for commands)."""
        self.vcpu.start()

    def command(self, cmd: int, *args: int, results: int = 1) -> list[int]:
        """Runs one command and returns its results (``GuestError`` if the guest cannot)."""
        with self._lock:
            self._commands.put((cmd, args))
            return self._collect(results, cmd)

    def _collect(self, results: int, cmd: int | None = None) -> list[int]:
        out: list[int] = []
        while len(out) < results:
            try:
                value = self._results.get(timeout=self.timeout)
            except queue.Empty:
                what = "a running command" if cmd is None else f"command {cmd}"
                raise GuestError(self._why(f"no answer to {what} in {self.timeout} s")) from None
            if value is None:
                raise GuestError(self._why("the guest panicked"))
            out.append(value)
        return out

    def _why(self, what: str) -> str:
        facts = [what]
        if self.panic is not None:
            facts.append(f"panic code {self.panic:#x}")
        if self.vcpu.error:
            facts.append(self.vcpu.error)
        if not self.vcpu.running:
            facts.append("the vCPU is not running")
        return "; ".join(facts)

    def ping(self, n: int) -> int:
        return self.command(CMD_PING, n)[0]

    def probe(self) -> int:
        """Probes the virtio-mmio balloon; returns the device status the driver left."""
        return self.command(CMD_PROBE)[0]

    def alloc_write(self, nblocks: int) -> int:
        """Allocates and writes up to ``nblocks`` blocks; returns how many."""
        return self.command(CMD_ALLOC_WRITE, nblocks)[0]

    def free(self, nblocks: int) -> int:
        """Frees the ``nblocks`` most recently allocated blocks; returns how many."""
        return self.command(CMD_FREE, nblocks)[0]

    def write_pages(self, npages: int, seed: int) -> int:
        """Rewrites ``npages`` pseudo-random pages of the used blocks."""
        return self.command(CMD_WRITE_PAGES, npages, seed)[0]

    def write_at(self, gpa: int, npages: int) -> int:
        """Writes ``npages`` pages from ``gpa`` (page aligned, RAM, outside the kernel's first
        ``kernel_bytes``): the pages a dirty-log test names."""
        if gpa % 4096 or npages < 0:
            raise ValueError("write_at takes a page-aligned gpa and a page count")
        return self.command(CMD_WRITE_AT, gpa >> 12, npages)[0]

    def poll(self) -> int:
        """Handles a pending config change (a hinting round); returns the blocks hinted."""
        return self.command(CMD_POLL)[0]

    def shrink(self, nblocks: int) -> int:
        """The shrinker takes ``nblocks`` hinted blocks back (newest first) and writes them."""
        return self.command(CMD_SHRINK, nblocks)[0]

    def selfcheck(self) -> SelfCheck:
        bad_pages, bad_state = self.command(CMD_SELFCHECK, results=2)
        return SelfCheck(bad_pages, bad_state)

    def halt(self) -> None:
        """The guest halts; its vCPU thread ends."""
        self._commands.put((CMD_HALT, ()))
        self.vcpu.join(self.timeout)

    # -- the guest's state in its RAM ------------------------------------------------------------

    def boot_info(self) -> BootInfo:
        at = self.vm.ram_offset(BOOT_INFO_GPA)
        return BootInfo.from_buffer_copy(bytes(self.vm.ram[at : at + ctypes.sizeof(BootInfo)]))

    def _array(self, gpa: int, count: int, dtype: type[np.generic]) -> npt.NDArray[np.generic]:
        at = self.vm.ram_offset(gpa)
        return np.frombuffer(self.vm.ram, dtype=dtype, count=count, offset=at).copy()

    def blocks(
        self,
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8], npt.NDArray[np.uint32]]:
        """Each block's gpa, state (FREE, USED, HINTED) and the cmd id it was last hinted
        under, copied out of guest RAM."""
        info = self.boot_info()
        n = int(info.nblocks)
        return (
            self._array(info.block_gpa_at, n, np.uint64).astype(np.uint64),
            self._array(info.block_state_at, n, np.uint8).astype(np.uint8),
            self._array(info.hinted_under_at, n, np.uint32).astype(np.uint32),
        )

    def ring_pages(self) -> tuple[int, int]:
        """The gpa and size of the guest's free page ring (descriptors to used ring)."""
        info = self.boot_info()
        used_end = int(info.used_at) + 6 + 8 * int(info.queue_size)
        return int(info.desc_at), used_end - int(info.desc_at)
