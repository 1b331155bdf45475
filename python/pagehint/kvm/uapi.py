"""The KVM userspace API as pagehint uses it (x86_64): ioctl numbers, structs and constants
from ``<linux/kvm.h>`` and ``<asm/kvm.h>``.

Nothing here is trusted by hand: ``tests/kvm/test_uapi.py`` compiles a C program against the
machine's headers with gcc and checks every struct size, field offset, ioctl number and
constant below against it.
"""

from __future__ import annotations

import ctypes

# -- ioctl numbers (include/uapi/asm-generic/ioctl.h) ------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | KVMIO << 8 | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct_type: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct_type))


def _iow(nr: int, struct_type: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct_type))


def _iowr(nr: int, struct_type: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct_type))


# -- structs --------------------------------------------------------------------------------


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class KvmDirtyLog(ctypes.Structure):
    """struct kvm_dirty_log (the bitmap pointer in its union)."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),
    )


class KvmClearDirtyLog(ctypes.Structure):
    """struct kvm_clear_dirty_log."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_uint64),
    )


class KvmEnableCap(ctypes.Structure):
    """struct kvm_enable_cap."""

    _fields_ = (
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    )


class KvmRegs(ctypes.Structure):
    """struct kvm_regs (arch/x86/include/uapi/asm/kvm.h)."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    )


class KvmSegment(ctypes.Structure):
    """struct kvm_segment."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs."""

    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    )


class KvmFpu(ctypes.Structure):
    """struct kvm_fpu: the x87 and SSE state (fxsave layout)."""

    _fields_ = (
        ("fpr", ctypes.c_uint8 * 128),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", ctypes.c_uint8 * 256),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    )


class KvmVcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events: pending and injected exceptions, interrupts and NMIs, and the
    interrupt shadow (a vCPU stopped right after ``sti`` or ``mov ss`` carries one). Moved
    whole; the sub-structs are kept as bytes."""

    _fields_ = (
        ("exception", ctypes.c_uint8 * 8),
        ("interrupt", ctypes.c_uint8 * 4),
        ("nmi", ctypes.c_uint8 * 4),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("smi", ctypes.c_uint8 * 4),
        ("triple_fault", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 26),
        ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    )


class KvmDirtyGfn(ctypes.Structure):
    """struct kvm_dirty_gfn: one dirty ring entry."""

    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("offset", ctypes.c_uint64),
    )


# struct kvm_run: the fields read and written, by offset (its union is large and arch-specific).
RUN_IMMEDIATE_EXIT = 1  # __u8 immediate_exit
RUN_EXIT_REASON = 8  # __u32 exit_reason
RUN_IO_DIRECTION = 32  # io.direction (__u8), then size (__u8), port (__u16), count (__u32)
RUN_IO_SIZE = 33
RUN_IO_PORT = 34
RUN_IO_COUNT = 36
RUN_IO_DATA_OFFSET = 40  # io.data_offset (__u64), relative to the kvm_run start
RUN_MMIO_PHYS_ADDR = 32  # mmio.phys_addr (__u64), data[8], len (__u32), is_write (__u8)
RUN_MMIO_DATA = 40
RUN_MMIO_LEN = 48
RUN_MMIO_IS_WRITE = 52
RUN_INTERNAL_SUBERROR = 32  # internal.suberror (__u32)
RUN_FAIL_ENTRY_REASON = 32  # fail_entry.hardware_entry_failure_reason (__u64)

# -- ioctls ---------------------------------------------------------------------------------

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, KvmDirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_GET_FPU = _ior(0x8C, KvmFpu)
KVM_SET_FPU = _iow(0x8D, KvmFpu)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
KVM_ENABLE_CAP = _iow(0xA3, KvmEnableCap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, KvmClearDirtyLog)
KVM_RESET_DIRTY_RINGS = _io(0xC7)

# -- constants ------------------------------------------------------------------------------

KVM_API_VERSION = 12
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # x86: the dirty ring's page offset in the vCPU mapping
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_REASONS = {
    KVM_EXIT_IO: "io",
    KVM_EXIT_HLT: "hlt",
    KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_SHUTDOWN: "shutdown",
    KVM_EXIT_FAIL_ENTRY: "fail_entry",
    KVM_EXIT_INTR: "intr",
    KVM_EXIT_INTERNAL_ERROR: "internal_error",
    KVM_EXIT_DIRTY_RING_FULL: "dirty_ring_full",
}
