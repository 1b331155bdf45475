"""The simulated KVM dirty log (``pagehint.sim.DirtyLog``) against the real one.

A tiny KVM harness in pure Python (ioctl, ctypes, mmap; the structs and numbers of
``pagehint.kvm.uapi``, which tests/kvm/test_uapi.py checks against ``<linux/kvm.h>``): one VM
with one 1 MiB memory slot logging dirty pages, one real-mode vCPU whose only code is ``mov
[bx], al; hlt``. Each test plays the same guest writes, ``KVM_GET_DIRTY_LOG`` and
``KVM_CLEAR_DIRTY_LOG`` calls on the real VM and on ``DirtyLog`` and asserts that both report
the same pages, and the pages expected: classic mode (get clears), and manual-protect mode
(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) with QEMU's late clear losing a write made after the sync,
the clear right after the sync keeping it, and a clear of a chunk leaving a page first written
after the get dirty. This is what DESIGN.md section 5 says of real KVM.

The tests skip, saying what is missing, when the host is not x86_64, /dev/kvm cannot be
opened, its API version is not 12 or it lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import platform
import struct
from collections.abc import Iterator
from typing import Literal

import numpy as np
import numpy.typing as npt
import pytest

from helpers import PAGE
from pagehint.kvm.uapi import (
    KVM_API_VERSION,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CHECK_EXTENSION,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_ENABLE_CAP,
    KVM_EXIT_HLT,
    KVM_GET_API_VERSION,
    KVM_GET_DIRTY_LOG,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    RUN_EXIT_REASON,
    KvmClearDirtyLog,
    KvmDirtyLog,
    KvmEnableCap,
    KvmRegs,
    KvmSregs,
    KvmUserspaceMemoryRegion,
)
from pagehint.sim import DirtyLog

U64Array = npt.NDArray[np.uint64]

KVM_RUN_EXIT_REASON_OFFSET = RUN_EXIT_REASON

# The harness's guest.
SLOT = 0
RAM_BYTES = 1 << 20
NPAGES = RAM_BYTES // PAGE  # 256: four 64-page chunks
CODE_GPA = 0x1000
CODE = bytes([0x88, 0x07, 0xF4])  # mov [bx], al; hlt
CODE_PFN = CODE_GPA // PAGE

# Written pages: A and B share chunk 1 (pages 64..127), away from the code page in chunk 0.
A = 70
B = 100
CHUNK = 64


class KvmVm:
    """One VM, one memory slot of ``RAM_BYTES`` at gpa 0 logging dirty pages, one vCPU."""

    def __init__(self, mode: Literal["classic", "manual"]) -> None:
        self._fds: list[int] = []
        self._maps: list[mmap.mmap] = []
        self._ram: npt.NDArray[np.uint8] | None = None
        try:
            self._open(mode)
        except BaseException:
            self.close()
            raise

    def _open(self, mode: Literal["classic", "manual"]) -> None:
        if platform.machine() != "x86_64":
            pytest.skip(f"the KVM harness runs x86 real-mode code; host is {platform.machine()}")
        try:
            kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            pytest.skip(f"cannot open /dev/kvm: {e}")
        self._fds.append(kvm)
        version = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            pytest.skip(f"KVM_GET_API_VERSION is {version}, not {KVM_API_VERSION}")
        self.vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        self._fds.append(self.vm)
        # Asked of the VM fd: the answer may depend on the VM type.
        if fcntl.ioctl(self.vm, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == 0:
            pytest.skip("KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (cap 168)")
        if mode == "manual":
            cap = KvmEnableCap(cap=KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE  # not KVM_DIRTY_LOG_INITIALLY_SET
            fcntl.ioctl(self.vm, KVM_ENABLE_CAP, cap)

        ram_map = mmap.mmap(-1, RAM_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._maps.append(ram_map)
        self._ram = np.frombuffer(ram_map, dtype=np.uint8)
        self._ram[CODE_GPA : CODE_GPA + len(CODE)] = np.frombuffer(CODE, dtype=np.uint8)
        region = KvmUserspaceMemoryRegion(
            slot=SLOT,
            flags=KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr=0,
            memory_size=RAM_BYTES,
            userspace_addr=self._ram.ctypes.data,
        )
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)

        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        self._fds.append(self.vcpu)
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        self._run = mmap.mmap(
            self.vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._maps.append(self._run)

    def close(self) -> None:
        """Closes the fds (vCPU and VM first) and unmaps the memory."""
        self._ram = None  # the numpy view holds an export of the mapping
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()
        for m in reversed(self._maps):
            m.close()
        self._maps.clear()

    def write(self, gpa: int, value: int) -> None:
        """The vCPU writes the byte ``value`` at ``gpa``: ``mov [bx], al`` with
        ``ds = gpa >> 4 & 0xF000`` (real mode, base = selector << 4), then ``hlt``."""
        assert 0 <= gpa < RAM_BYTES and 0 <= value < 256
        sregs = KvmSregs()
        fcntl.ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        sregs.cs.base = 0
        sregs.cs.selector = 0
        sregs.ds.selector = gpa >> 4 & 0xF000
        sregs.ds.base = sregs.ds.selector << 4
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, sregs)
        regs = KvmRegs(rip=CODE_GPA, rbx=gpa & 0xFFFF, rax=value, rflags=0x2)
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, regs)
        fcntl.ioctl(self.vcpu, KVM_RUN, 0)
        (reason,) = struct.unpack_from("<I", self._run, KVM_RUN_EXIT_REASON_OFFSET)
        assert reason == KVM_EXIT_HLT, f"KVM_RUN exited with reason {reason}, not HLT"
        fcntl.ioctl(self.vcpu, KVM_GET_REGS, regs)
        assert regs.rip == CODE_GPA + len(CODE), hex(regs.rip)
        assert self._ram is not None and self._ram[gpa] == value, "the write did not land"

    def get(self) -> U64Array:
        """KVM_GET_DIRTY_LOG: one bit per page, bit i of word j = page 64j + i."""
        words = np.zeros(-(-NPAGES // 64), dtype=np.uint64)
        log = KvmDirtyLog(slot=SLOT, dirty_bitmap=words.ctypes.data)
        fcntl.ioctl(self.vm, KVM_GET_DIRTY_LOG, log)
        return words

    def clear(self, first_page: int, bits: U64Array) -> None:
        """KVM_CLEAR_DIRTY_LOG of the pages set in ``bits`` (a bitmap of 64-page words from
        ``first_page``, a multiple of 64)."""
        assert first_page % 64 == 0
        bitmap = np.ascontiguousarray(bits, dtype=np.uint64)
        clear = KvmClearDirtyLog(
            slot=SLOT,
            num_pages=64 * len(bitmap),
            first_page=first_page,
            dirty_bitmap=bitmap.ctypes.data,
        )
        fcntl.ioctl(self.vm, KVM_CLEAR_DIRTY_LOG, clear)


def pages_of(words: U64Array) -> set[int]:
    """The page numbers set in a KVM-layout log (little-endian host), the code page left out:
    the vCPU fetches it, and only the pages the test writes are compared."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return {int(p) for p in np.flatnonzero(bits)} - {CODE_PFN}


class Both:
    """The same guest writes and log calls on real KVM and on the model; each ``get`` asserts
    both report the same pages and returns them."""

    def __init__(self, vm: KvmVm, mode: Literal["classic", "manual"]) -> None:
        self.vm = vm
        self.model = DirtyLog(NPAGES, mode)
        self.last_kvm = np.zeros(-(-NPAGES // 64), dtype=np.uint64)
        self._value = 0

    def write(self, pfn: int) -> None:
        self._value = self._value % 255 + 1  # a different non-zero byte each time
        self.vm.write(pfn * PAGE + 8, self._value)
        self.model.record(np.array([pfn], np.uint64), np.array([1], np.uint64))

    def get(self) -> set[int]:
        self.last_kvm = self.vm.get()
        kvm, model = pages_of(self.last_kvm), pages_of(self.model.get())
        assert kvm == model, f"real KVM reports {sorted(kvm)}, the model {sorted(model)}"
        return kvm

    def clear_chunk(self, pfn: int) -> None:
        """Clears ``pfn``'s 64-page chunk passing the bits the last get reported (as QEMU)."""
        first = pfn // CHUNK * CHUNK
        self.vm.clear(first, self.last_kvm[first // 64 : first // 64 + CHUNK // 64])
        self.model.clear(first, CHUNK)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _both(mode: Literal["classic", "manual"]) -> Iterator[Both]:
    before = _open_fds()
    vm = KvmVm(mode)
    try:
        yield Both(vm, mode)
    finally:
        vm.close()
    assert _open_fds() <= before, "the harness left fds open"


@pytest.fixture
def classic() -> Iterator[Both]:
    yield from _both("classic")


@pytest.fixture
def manual() -> Iterator[Both]:
    yield from _both("manual")


def test_struct_sizes_match_the_uapi() -> None:
    if platform.machine() != "x86_64":
        pytest.skip(f"the sizes are x86_64's; host is {platform.machine()}")
    assert KVM_GET_DIRTY_LOG == 0x4010AE42
    assert KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert KVM_GET_SREGS == 0x8138AE83
    assert KVM_ENABLE_CAP == 0x4068AEA3


def test_classic_get_clears_and_every_later_write_is_logged(classic: Both) -> None:
    classic.write(A)
    assert classic.get() == {A}
    classic.write(A)
    classic.write(B)
    assert classic.get() == {A, B}
    assert classic.get() == set()


def test_manual_clear_after_a_rewrite_loses_it(manual: Both) -> None:
    """QEMU's way: the reported page stays writable and untracked after the get, the guest
    writes it again, then the clear of its chunk drops the bit: the next get misses it."""
    manual.write(A)
    assert manual.get() == {A}
    manual.write(A)  # writable since the first write: untracked
    manual.clear_chunk(A)
    assert manual.get() == set()  # the second write is lost
    manual.write(A)  # the clear write-protected it again: tracked
    assert manual.get() == {A}


def test_manual_clear_right_after_the_get_keeps_the_rewrite(manual: Both) -> None:
    """The safe way: the clear runs right after the get, so the rewrite is logged."""
    manual.write(A)
    assert manual.get() == {A}
    manual.clear_chunk(A)
    manual.write(A)
    assert manual.get() == {A}


def test_manual_page_first_written_after_the_get_survives_a_clear_of_its_chunk(
    manual: Both,
) -> None:
    """KVM_CLEAR_DIRTY_LOG clears only the bits passed in (those the get reported)."""
    assert A // CHUNK == B // CHUNK
    manual.write(A)
    assert manual.get() == {A}
    manual.write(B)
    manual.clear_chunk(A)
    assert manual.get() == {B}


def test_manual_get_does_not_clear(manual: Both) -> None:
    manual.write(A)
    assert manual.get() == {A}
    assert manual.get() == {A}
