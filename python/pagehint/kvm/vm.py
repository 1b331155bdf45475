"""A small VMM on ``/dev/kvm``: a VM over a guest memory map (one memslot per RAM region, so
a layout with a hole has several), guest RAM in one anonymous mapping laid out as the
``MemoryMap`` lays out its RAM buffer, vCPUs that each run ``KVM_RUN`` in their own thread
(the ioctl goes through ctypes, which releases the GIL), port I/O and MMIO exits dispatched to
device models, and the dirty log in three modes.

Dirty-log modes (``log_mode``):

- ``classic``: ``KVM_GET_DIRTY_LOG`` returns a slot's dirty pages and write-protects them again.
- ``manual``: with ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` the get leaves reported pages writable
  and untracked until ``KVM_CLEAR_DIRTY_LOG`` re-protects them; ``clear_dirty_log`` passes what
  the last get reported (as QEMU does). ``initially_set=True`` adds KVM_DIRTY_LOG_INITIALLY_SET,
  QEMU's choice when KVM offers it: the log starts with every page dirty and writable.
- ``ring``: ``KVM_CAP_DIRTY_LOG_RING(_ACQ_REL)``: each vCPU pushes dirty gfns into a ring mapped
  from its fd; the VMM harvests them (``harvest``), and ``KVM_RESET_DIRTY_RINGS`` re-protects.

KVM never logs what the VMM itself writes into guest RAM (a device's used ring): ``mark_dirty``
records those pages, and ``get_dirty_log`` reports them with the guest's own (QEMU's
``address_space_write`` does the same for its migration bitmap).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import platform
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.kvm import uapi

VmLogMode = Literal["classic", "manual", "ring"]
_U64Array = npt.NDArray[np.uint64]

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.ioctl.restype = ctypes.c_int


class KvmUnavailable(RuntimeError):
    """This machine cannot run the VM: no /dev/kvm, a missing capability, another arch. The
    message says what is missing (tests skip with it)."""


class MmioDevice(Protocol):
    """A device model behind an MMIO window."""

    def read(self, offset: int, size: int) -> bytes:
        """The guest reads ``size`` bytes at ``offset`` into the window."""

    def write(self, offset: int, data: bytes) -> None:
        """The guest writes ``data`` at ``offset`` into the window."""


IoHandler = Callable[[int, bytes | None, int], bytes | None]
"""``handler(port, data, size)``: ``data`` for an OUT (returns None), None for an IN (returns
``size`` bytes)."""


@dataclass(frozen=True)
class MemorySlot:
    """One KVM memslot: a RAM region of the memory map."""

    slot: int
    gpa: int
    size: int
    first_page: int
    """The region's first page in the bitmap (and its offset in RAM, in pages)."""

    @property
    def npages(self) -> int:
        return self.size // 4096


def _ioctl(fd: int, request: int, arg: int = 0) -> int:
    rc: int = _libc.ioctl(fd, request, arg)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _ioctl_struct(fd: int, request: int, struct: ctypes.Structure) -> int:
    return _ioctl(fd, request, ctypes.addressof(struct))


class Vm:
    """A KVM VM with guest RAM laid out by ``memmap`` (4 KiB pages) and ``vcpus`` vCPUs.

    ``KvmUnavailable`` says why not when the machine cannot. ``close()`` (or ``with``) frees
    everything; vCPU threads are stopped first.
    """

    def __init__(
        self,
        memmap: _core.MemoryMap,
        *,
        log_mode: VmLogMode = "classic",
        vcpus: int = 1,
        ring_entries: int = 65536,
        reap_interval: float = 0.01,
        initially_set: bool = False,
    ) -> None:
        if memmap.page_size != 4096:
            raise ValueError(f"x86 KVM guests have 4 KiB pages, not {memmap.page_size}")
        if log_mode not in ("classic", "manual", "ring"):
            raise ValueError(f"log_mode must be classic, manual or ring, not {log_mode!r}")
        if not 1 <= vcpus <= 16:
            raise ValueError(f"vcpus must be 1 to 16, not {vcpus}")
        if ring_entries < 64 or ring_entries & (ring_entries - 1):
            raise ValueError(f"ring_entries must be a power of two >= 64, not {ring_entries}")
        for gpa, size in memmap.regions:
            if size % (64 * 4096):
                raise ValueError(
                    f"region at {gpa:#x} is not a multiple of 256 KiB (64 pages), so its "
                    "dirty log would not start on a bitmap word"
                )
        if initially_set and log_mode != "manual":
            raise ValueError("initially_set is a manual-protect option")
        self.memmap = memmap
        self.log_mode: VmLogMode = log_mode
        self.initially_set = initially_set
        """Manual mode with KVM_DIRTY_LOG_INITIALLY_SET (as QEMU enables it when KVM has it):
        every page starts dirty and writable, and is write-protected only when first
        cleared."""
        self.npages = memmap.npages
        self._fds: list[int] = []
        self._closed = False
        self._mmio: list[tuple[int, int, MmioDevice]] = []
        self._io: dict[int, IoHandler] = {}
        self.vcpus: list[Vcpu] = []
        self.ring_entries = ring_entries
        self._ring_acq_rel = False
        self._vmm_dirty = _core.DirtyBitmap(self.npages)
        self._ring_log = _core.DirtyBitmap(self.npages)
        self._harvest_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._reaper_stop = threading.Event()
        self.reap_interval = reap_interval
        self.mark_device_writes = True
        """Whether ``mark_dirty`` records the VMM's writes (off only to show they matter)."""
        self._last_log: dict[int, _U64Array] = {}
        try:
            self._open(vcpus)
        except BaseException:
            self.close()
            raise

    # -- set-up -------------------------------------------------------------------------------

    def _open(self, nvcpus: int) -> None:
        if platform.machine() != "x86_64":
            raise KvmUnavailable(f"pagehint's KVM guests are x86_64; this is {platform.machine()}")
        try:
            kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"cannot open /dev/kvm: {e.strerror}") from None
        self._fds.append(kvm)
        self._kvm = kvm
        version = fcntl.ioctl(kvm, uapi.KVM_GET_API_VERSION)
        if version != uapi.KVM_API_VERSION:
            raise KvmUnavailable(f"KVM API version {version}, not {uapi.KVM_API_VERSION}")
        self.fd = fcntl.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
        self._fds.append(self.fd)
        if self.log_mode == "manual":
            if not self.check_extension(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
                raise KvmUnavailable("KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
            flags = uapi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if self.initially_set:
                supported = self.check_extension(uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                if not supported & uapi.KVM_DIRTY_LOG_INITIALLY_SET:
                    raise KvmUnavailable("KVM lacks KVM_DIRTY_LOG_INITIALLY_SET")
                flags |= uapi.KVM_DIRTY_LOG_INITIALLY_SET
            cap = uapi.KvmEnableCap(cap=uapi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            cap.args[0] = flags
            _ioctl_struct(self.fd, uapi.KVM_ENABLE_CAP, cap)
        elif self.log_mode == "ring":
            self._enable_dirty_ring()
        self._map_ram()
        run_size = fcntl.ioctl(kvm, uapi.KVM_GET_VCPU_MMAP_SIZE)
        for index in range(nvcpus):
            self.vcpus.append(Vcpu(self, index, run_size))
        if self.log_mode == "ring":
            # A reaper, as QEMU's kvm_dirty_ring_reaper_thread: this KVM logs every guest store,
            # so a ring fills in a fraction of a second, and its full exit can come too late.
            self._reaper = threading.Thread(
                target=self._reap, name="dirty-ring-reaper", daemon=True
            )
            self._reaper.start()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (answers may depend on the VM type)."""
        return int(fcntl.ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap))

    def _enable_dirty_ring(self) -> None:
        # Prefer the acquire/release ring (the one defined for weakly ordered hosts too).
        offered = [
            (cap, acq_rel, self.check_extension(cap))
            for cap, acq_rel in (
                (uapi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, True),
                (uapi.KVM_CAP_DIRTY_LOG_RING, False),
            )
        ]
        usable = [o for o in offered if o[2]]
        if not usable:
            raise KvmUnavailable("KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
        cap, acq_rel, max_bytes = usable[0]
        size = self.ring_entries * ctypes.sizeof(uapi.KvmDirtyGfn)
        if size > max_bytes:
            raise KvmUnavailable(f"a {size}-byte dirty ring is more than KVM's {max_bytes}")
        enable = uapi.KvmEnableCap(cap=cap)
        enable.args[0] = size
        _ioctl_struct(self.fd, uapi.KVM_ENABLE_CAP, enable)
        self._ring_acq_rel = acq_rel

    def _map_ram(self) -> None:
        memmap = self.memmap
        self._ram_map = mmap.mmap(
            -1, memmap.ram_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        )
        self.ram = np.frombuffer(self._ram_map, dtype=np.uint8)
        """Guest RAM, laid out as the memory map's RAM buffer (region after region)."""
        base = self.ram.ctypes.data
        self.slots: list[MemorySlot] = []
        for i, (gpa, size) in enumerate(sorted(memmap.regions)):
            first = memmap.pfn_of(gpa)
            region = uapi.KvmUserspaceMemoryRegion(
                slot=i,
                flags=uapi.KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr=gpa,
                memory_size=size,
                userspace_addr=base + first * 4096,
            )
            _ioctl_struct(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region)
            self.slots.append(MemorySlot(i, gpa, size, first))

    # -- devices --------------------------------------------------------------------------------

    def add_mmio(self, base: int, size: int, device: MmioDevice) -> None:
        """Guest accesses to ``[base, base + size)`` go to ``device`` (the window must not be
        RAM: KVM exits only for unbacked addresses)."""
        if size <= 0 or base < 0:
            raise ValueError("an MMIO window needs a non-negative base and a positive size")
        for gpa, rsize in self.memmap.regions:
            if base < gpa + rsize and gpa < base + size:
                raise ValueError(f"the MMIO window at {base:#x} overlaps RAM at {gpa:#x}")
        for b, s, _ in self._mmio:
            if base < b + s and b < base + size:
                raise ValueError(f"the MMIO window at {base:#x} overlaps another at {b:#x}")
        self._mmio.append((base, size, device))

    def add_io(self, port: int, handler: IoHandler) -> None:
        """Port ``port`` goes to ``handler``."""
        if not 0 <= port <= 0xFFFF or port in self._io:
            raise ValueError(f"port {port:#x} is not a free 16-bit port")
        self._io[port] = handler

    def mmio_device(self, gpa: int) -> tuple[int, MmioDevice] | None:
        for base, size, device in self._mmio:
            if base <= gpa < base + size:
                return base, device
        return None

    def io_handler(self, port: int) -> IoHandler | None:
        return self._io.get(port)

    # -- guest memory ---------------------------------------------------------------------------

    def ram_offset(self, gpa: int) -> int:
        """Where ``gpa`` is in ``ram`` (``ValueError`` in a hole)."""
        return self.memmap.pfn_of(gpa) * 4096 + gpa % 4096

    def write(self, gpa: int, data: bytes) -> None:
        """The VMM writes guest RAM (within one region) and marks the pages dirty."""
        at = self.ram_offset(gpa)
        if len(data):
            self.ram_offset(gpa + len(data) - 1)  # the end is RAM too
        self.ram[at : at + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.mark_dirty(gpa, len(data))

    def mark_dirty(self, gpa: int, nbytes: int) -> None:
        """Pages the VMM wrote (KVM does not log them): reported by the next ``get_dirty_log``.
        Not recorded while ``mark_device_writes`` is off."""
        if nbytes <= 0 or not self.mark_device_writes:
            return
        first = self.memmap.pfn_of(gpa)
        last = self.memmap.pfn_of(gpa + nbytes - 1)
        self._vmm_dirty.set_range(first, last - first + 1)

    # -- the dirty log --------------------------------------------------------------------------

    def get_dirty_log(self) -> _U64Array:
        """The pages dirtied since the last call, as ``uint64`` words over all of RAM (bitmap
        layout): the KVM log of every slot (or the harvested rings), plus what the VMM wrote."""
        words = np.zeros(-(-self.npages // 64), dtype=np.uint64)
        if self.log_mode == "ring":
            self.harvest()
            with self._harvest_lock:
                words |= self._ring_log.words()
                self._ring_log.clear_all()
        else:
            for s in self.slots:
                log = np.zeros(-(-s.npages // 64), dtype=np.uint64)
                arg = uapi.KvmDirtyLog(slot=s.slot, dirty_bitmap=log.ctypes.data)
                _ioctl_struct(self.fd, uapi.KVM_GET_DIRTY_LOG, arg)
                self._last_log[s.slot] = log
                words[s.first_page // 64 : s.first_page // 64 + len(log)] |= log
        words |= self._vmm_dirty.words()
        self._vmm_dirty.clear_all()
        return words

    def clear_dirty_log(self, first_page: int, num_pages: int) -> int:
        """Manual mode: re-protects the pages of ``[first_page, first_page + num_pages)`` that
        the last get reported (KVM_CLEAR_DIRTY_LOG on 64-page aligned ranges). Returns the
        pages cleared. In classic and ring mode there is nothing to clear: 0."""
        if self.log_mode != "manual":
            return 0
        if first_page < 0 or num_pages < 0 or first_page + num_pages > self.npages:
            raise IndexError(f"pages {first_page}+{num_pages} are not all in RAM")
        cleared = 0
        for s in self.slots:
            lo = max(first_page, s.first_page)
            hi = min(first_page + num_pages, s.first_page + s.npages)
            log = self._last_log.get(s.slot)
            if lo >= hi or log is None:
                continue
            # KVM wants 64-page aligned ranges within the slot: widen, then mask to the range.
            start = (lo - s.first_page) // 64 * 64
            end = min(-(-(hi - s.first_page) // 64) * 64, s.npages)
            bits = log[start // 64 : -(-end // 64)].copy()
            pages = np.arange(start, start + 64 * len(bits))
            keep = (pages >= lo - s.first_page) & (pages < hi - s.first_page)
            mask = np.packbits(keep, bitorder="little").view("<u8").astype(np.uint64)
            bits &= mask
            arg = uapi.KvmClearDirtyLog(
                slot=s.slot, num_pages=end - start, first_page=start, dirty_bitmap=bits.ctypes.data
            )
            _ioctl_struct(self.fd, uapi.KVM_CLEAR_DIRTY_LOG, arg)
            cleared += int(np.unpackbits(bits.view(np.uint8)).sum())
        return cleared

    def _reap(self) -> None:
        while not self._reaper_stop.wait(self.reap_interval):
            try:
                self.harvest()
            except OSError as e:
                self.reaper_error = f"dirty ring reaper: {e}"
                return

    reaper_error: str | None = None
    """Why the ring reaper stopped, if it did."""

    def harvest(self) -> int:
        """Ring mode: collects every vCPU's dirty ring into the log and resets the rings
        (KVM_RESET_DIRTY_RINGS). Returns the entries harvested. If a ring may have lost
        entries, every page is reported dirty by the next ``get_dirty_log`` (a migration
        then sends more, never less). Safe from any thread."""
        if self.log_mode != "ring":
            return 0
        with self._harvest_lock:
            n = 0
            overrun = False
            for v in self.vcpus:
                got, lost = v.harvest_ring(self._ring_log)
                n += got
                overrun |= lost
            if overrun:
                self._ring_log.set_all()
            reset = _ioctl(self.fd, uapi.KVM_RESET_DIRTY_RINGS)
            # After an overrun KVM's index may be laps ahead of what one reset can walk: mark
            # the rings collected again and reset until a reset no longer walks a whole lap.
            for _ in range(1024):
                if not overrun or reset < self.ring_entries:
                    break
                for v in self.vcpus:
                    v.mark_ring_collected()
                reset = _ioctl(self.fd, uapi.KVM_RESET_DIRTY_RINGS)
            return n

    # -- life -------------------------------------------------------------------------------------

    def pause(self, timeout: float = 10.0) -> None:
        """Stops every running vCPU wherever it is (a signal interrupts a guest that makes
        no exits), each with its last exit's I/O completed; returns once all are parked."""
        for v in self.vcpus:
            v.request_pause()
        for v in self.vcpus:
            v.wait_paused(timeout)

    def resume(self) -> None:
        """Lets the paused vCPUs run again."""
        for v in self.vcpus:
            v.resume()

    def close(self) -> None:
        """Stops the vCPUs and frees the VM (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        for v in self.vcpus:
            v.stop()
        for v in self.vcpus:
            v.close()
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()
        if hasattr(self, "ram"):
            del self.ram  # the numpy view holds an export of the mapping
            # A device model may still hold RAM: the mapping then goes with its last user.
            with contextlib.suppress(BufferError):
                self._ram_map.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class VcpuState:
    """A vCPU's saved state as the raw KVM structs (same host architecture on both ends)."""

    sregs: bytes
    regs: bytes
    fpu: bytes
    events: bytes

    def parts(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.sregs, self.regs, self.fpu, self.events)

    def to_dict(self) -> dict[str, str]:
        """Hex strings, for a JSON state record."""
        return {f.name: getattr(self, f.name).hex() for f in fields(self)}

    @classmethod
    def from_dict(cls, d: object) -> VcpuState:
        """The inverse of ``to_dict`` (``ValueError`` for anything else)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or sorted(d) != sorted(names):
            raise ValueError(f"a vCPU state has exactly the keys {names}")
        try:
            return cls(**{n: bytes.fromhex(d[n]) for n in names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"a vCPU state's values are hex strings: {e}") from None


_STATE_PARTS: tuple[tuple[type[ctypes.Structure], tuple[int, int]], ...] = (
    (uapi.KvmSregs, (uapi.KVM_GET_SREGS, uapi.KVM_SET_SREGS)),
    (uapi.KvmRegs, (uapi.KVM_GET_REGS, uapi.KVM_SET_REGS)),
    (uapi.KvmFpu, (uapi.KVM_GET_FPU, uapi.KVM_SET_FPU)),
    (uapi.KvmVcpuEvents, (uapi.KVM_GET_VCPU_EVENTS, uapi.KVM_SET_VCPU_EVENTS)),
)


def _install_kick_handler() -> bool:
    """A no-op SIGUSR1 handler, so that signalling a vCPU thread interrupts its KVM_RUN
    (EINTR). Only the main thread may install it; without it, a pause waits for the guest's
    next exit."""
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    return True


class Vcpu:
    """One vCPU: its fd, its ``kvm_run`` mapping, its dirty ring (ring mode) and its thread."""

    def __init__(self, vm: Vm, index: int, run_size: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fcntl.ioctl(vm.fd, uapi.KVM_CREATE_VCPU, index)
        self._run = mmap.mmap(self.fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._ring: mmap.mmap | None = None
        self._ring_fetch = 0
        self.ring_overflows = 0
        self._full_without_entries = 0
        """Harvests after which entries may have been lost (every page was then reported)."""
        if vm.log_mode == "ring":
            self._ring = mmap.mmap(
                self.fd,
                vm.ring_entries * 16,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
                offset=uapi.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE,
            )
        self.exits: dict[str, int] = {}
        self.error: str | None = None
        self.halted = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pause = threading.Event()
        self._parked = threading.Event()
        self._resume = threading.Event()
        self._kick = _install_kick_handler()

    # -- registers ------------------------------------------------------------------------------

    def get_regs(self) -> uapi.KvmRegs:
        regs = uapi.KvmRegs()
        _ioctl_struct(self.fd, uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.KvmRegs) -> None:
        _ioctl_struct(self.fd, uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.KvmSregs:
        sregs = uapi.KvmSregs()
        _ioctl_struct(self.fd, uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.KvmSregs) -> None:
        _ioctl_struct(self.fd, uapi.KVM_SET_SREGS, sregs)

    def save_state(self) -> VcpuState:
        """What a paused vCPU needs to go on elsewhere: general and special registers, FPU
        and SSE state, and pending events (with the interrupt shadow)."""
        parts = []
        for cls, request in _STATE_PARTS:
            struct = cls()
            _ioctl_struct(self.fd, request[0], struct)
            parts.append(bytes(struct))
        return VcpuState(*parts)

    def restore_state(self, state: VcpuState) -> None:
        """Loads ``state`` (from ``save_state`` on another VM's vCPU) before this one runs;
        the special registers first, as they set the mode the others are read in."""
        for (cls, request), blob in zip(_STATE_PARTS, state.parts(), strict=True):
            if len(blob) != ctypes.sizeof(cls):
                raise ValueError(
                    f"{cls.__name__} state is {len(blob)} bytes, not {ctypes.sizeof(cls)}"
                )
            _ioctl_struct(self.fd, request[1], cls.from_buffer_copy(blob))

    # -- running --------------------------------------------------------------------------------

    def start(self) -> None:
        """Runs the vCPU in its own thread until it halts, fails or is stopped."""
        if self._thread is not None:
            raise RuntimeError(f"vCPU {self.index} is already started")
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _set_immediate_exit(self, on: bool) -> None:
        self._run[uapi.RUN_IMMEDIATE_EXIT] = 1 if on else 0

    def _interrupt(self) -> None:
        self._set_immediate_exit(True)
        thread = self._thread
        if self._kick and thread is not None and thread.ident is not None and thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread.ident, signal.SIGUSR1)

    def request_pause(self) -> None:
        """Asks the vCPU to stop at its next exit and returns at once (an exit handler on the
        vCPU's own thread may call this); ``wait_paused`` waits for it."""
        if not self.running:
            return
        self._resume.clear()
        self._parked.clear()
        self._pause.set()
        self._interrupt()

    def wait_paused(self, timeout: float = 10.0) -> None:
        """Waits until a requested pause has parked the vCPU (``TimeoutError`` if not)."""
        if not self._parked.wait(timeout) and self.running:
            raise TimeoutError(f"vCPU {self.index} did not pause within {timeout} s")

    def pause(self, timeout: float = 10.0) -> None:
        """Stops the vCPU at its next exit, with the exit's pending I/O completed (a KVM_RUN
        with immediate_exit), so its registers can be saved. Returns once it is parked."""
        self.request_pause()
        self.wait_paused(timeout)

    def resume(self) -> None:
        """Lets a paused vCPU run again."""
        self._pause.clear()
        self._set_immediate_exit(False)
        self._resume.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the vCPU thread (it can not be started again)."""
        self._stop.set()
        self._resume.set()
        if self._thread is not None:
            self._interrupt()
            self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _kvm_run(self) -> int | None:
        """One KVM_RUN: the exit reason, or None when interrupted (EINTR, EAGAIN)."""
        rc = _libc.ioctl(self.fd, uapi.KVM_RUN, 0)
        if rc < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return None
            raise OSError(err, f"KVM_RUN: {os.strerror(err)}")
        return int.from_bytes(self._run[uapi.RUN_EXIT_REASON : uapi.RUN_EXIT_REASON + 4], "little")

    def _park(self) -> None:
        # Complete the pending I/O of the last exit (RIP still points at an IN until then).
        self._set_immediate_exit(True)
        self._kvm_run()
        self._parked.set()
        while not self._resume.wait(0.1):
            if self._stop.is_set():
                return
        self._resume.clear()
        self._set_immediate_exit(False)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self._pause.is_set():
                    self._park()
                    continue
                reason = self._kvm_run()
                if reason is None:
                    continue
                name = uapi.EXIT_REASONS.get(reason, str(reason))
                self.exits[name] = self.exits.get(name, 0) + 1
                if not self._dispatch(reason):
                    break
        except Exception as e:  # noqa: BLE001 - the vCPU's end is reported, not raised
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self._parked.set()

    def _dispatch(self, reason: int) -> bool:
        """Handles one exit; False when the vCPU cannot go on."""
        run = self._run
        if reason == uapi.KVM_EXIT_IO:
            direction = run[uapi.RUN_IO_DIRECTION]
            size = run[uapi.RUN_IO_SIZE]
            port = int.from_bytes(run[uapi.RUN_IO_PORT : uapi.RUN_IO_PORT + 2], "little")
            count = int.from_bytes(run[uapi.RUN_IO_COUNT : uapi.RUN_IO_COUNT + 4], "little")
            at = int.from_bytes(
                run[uapi.RUN_IO_DATA_OFFSET : uapi.RUN_IO_DATA_OFFSET + 8], "little"
            )
            handler = self.vm.io_handler(port)
            for i in range(count):
                slot = slice(at + i * size, at + (i + 1) * size)
                if direction == uapi.KVM_EXIT_IO_OUT:
                    if handler is not None:
                        handler(port, bytes(run[slot]), size)
                else:
                    data = handler(port, None, size) if handler is not None else None
                    run[slot] = (data or b"\xff" * size)[:size].ljust(size, b"\xff")
            return not self._stop.is_set() and self.error is None
        if reason == uapi.KVM_EXIT_MMIO:
            gpa = int.from_bytes(
                run[uapi.RUN_MMIO_PHYS_ADDR : uapi.RUN_MMIO_PHYS_ADDR + 8], "little"
            )
            length = int.from_bytes(run[uapi.RUN_MMIO_LEN : uapi.RUN_MMIO_LEN + 4], "little")
            length = min(length, 8)
            found = self.vm.mmio_device(gpa)
            if run[uapi.RUN_MMIO_IS_WRITE]:
                if found is not None:
                    base, device = found
                    device.write(
                        gpa - base, bytes(run[uapi.RUN_MMIO_DATA : uapi.RUN_MMIO_DATA + length])
                    )
            else:
                data = b"\xff" * length
                if found is not None:
                    base, device = found
                    data = device.read(gpa - base, length)[:length].ljust(length, b"\xff")
                run[uapi.RUN_MMIO_DATA : uapi.RUN_MMIO_DATA + length] = data
            return True
        if reason == uapi.KVM_EXIT_HLT:
            self.halted = True
            return False
        if reason == uapi.KVM_EXIT_DIRTY_RING_FULL:
            if self.vm.harvest() == 0:
                self._full_without_entries += 1
                if self._full_without_entries >= 10_000:
                    self.error = (
                        f"vCPU {self.index}: the dirty ring stays full after harvest "
                        "and reset (a larger ring_entries may help)"
                    )
                    return False
            else:
                self._full_without_entries = 0
            return True
        if reason == uapi.KVM_EXIT_INTR:
            return True
        detail = ""
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            sub = int.from_bytes(
                run[uapi.RUN_INTERNAL_SUBERROR : uapi.RUN_INTERNAL_SUBERROR + 4], "little"
            )
            detail = f" (suberror {sub})"
        elif reason == uapi.KVM_EXIT_FAIL_ENTRY:
            hw = int.from_bytes(
                run[uapi.RUN_FAIL_ENTRY_REASON : uapi.RUN_FAIL_ENTRY_REASON + 8], "little"
            )
            detail = f" (hardware reason {hw:#x})"
        name = uapi.EXIT_REASONS.get(reason, f"exit {reason}")
        self.error = f"vCPU {self.index} stopped on {name}{detail}"
        return False

    # -- the dirty ring ---------------------------------------------------------------------------

    def harvest_ring(self, log: _core.DirtyBitmap) -> tuple[int, bool]:
        """Collects this vCPU's dirty ring into ``log`` (ring mode), marking the entries for
        KVM_RESET_DIRTY_RINGS. Returns the entries collected and whether the ring may have
        lost entries: a whole lap collected at once (KVM wrote past a full ring: this
        software-assisted KVM logs every guest store, not every page, and its soft-full exit
        can come too late), or dirty entries away from where the ring was expected to go on.
        The caller must then treat every page as dirty."""
        ring = self._ring
        if ring is None:
            return 0, False
        slots = [(s.slot, s.first_page, s.npages) for s in self.vm.slots]
        result = log.harvest_dirty_ring(ring, self._ring_fetch, slots)
        self._ring_fetch = result.fetch_index
        entries = int(result.entries)
        lost = entries >= self.vm.ring_entries
        # Dirty entries away from where the walk stopped mean the ring goes on elsewhere: find
        # the start of their run (the one whose predecessor is not dirty) and go on there.
        flags = np.frombuffer(ring, dtype=np.uint32)[0::4]
        pending = (flags & (uapi.KVM_DIRTY_GFN_F_DIRTY | uapi.KVM_DIRTY_GFN_F_RESET)) == (
            uapi.KVM_DIRTY_GFN_F_DIRTY
        )
        starts = np.flatnonzero(pending & ~np.roll(pending, 1))
        size = self.vm.ring_entries
        # A run starting right where the walk stopped is the vCPU pushing meanwhile: normal.
        if len(starts) and not (len(starts) == 1 and int(starts[0]) == self._ring_fetch % size):
            lost = True
            result = log.harvest_dirty_ring(ring, int(starts[0]), slots)
            self._ring_fetch = result.fetch_index
            entries += int(result.entries)
        if lost:
            # KVM's reset walks from its reset index while entries are marked collected, and an
            # overwritten ring leaves unmarked entries in its way (the ring would stay full for
            # good). Mark them all: the pages are reported dirty anyway, and re-protecting a
            # page again costs at most one more fault.
            flags |= uapi.KVM_DIRTY_GFN_F_RESET
            self.ring_overflows += 1
        del flags, pending  # views of the mapping
        return entries, lost

    def mark_ring_collected(self) -> None:
        """Marks every entry of the ring collected (only after an overrun: see harvest)."""
        if self._ring is not None:
            flags = np.frombuffer(self._ring, dtype=np.uint32)[0::4]
            flags |= uapi.KVM_DIRTY_GFN_F_RESET
            del flags

    def close(self) -> None:
        self.stop()
        if self._ring is not None:
            self._ring.close()
        self._run.close()
        os.close(self.fd)


__all__ = [
    "IoHandler",
    "KvmUnavailable",
    "MemorySlot",
    "MmioDevice",
    "Vcpu",
    "Vm",
    "VmLogMode",
]
