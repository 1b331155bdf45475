"""Long mode set up by the VMM, so the guest starts in 64-bit code with no mode-switch stub:
identity-mapped page tables with 2 MiB pages in guest RAM, a flat GDT, and CR0/CR4/EFER/CR3
and the segment caches loaded with KVM_SET_SREGS (Intel SDM vol. 3, 9.8.5 "Initializing
IA-32e Mode")."""

from __future__ import annotations

import struct

from pagehint.kvm import uapi
from pagehint.kvm.vm import Vcpu, Vm

PML4_GPA = 0x1000
PDPT_GPA = 0x2000
PD_GPA = 0x3000
MAX_IDENTITY_GIB = 8
"""Page directories at 0x3000..0xAFFF map the first 8 GiB; the boot info follows at 0xB000."""
GDT_GPA = 0x500

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

_PRESENT, _WRITABLE, _HUGE = 1 << 0, 1 << 1, 1 << 7
_CODE_SELECTOR, _DATA_SELECTOR = 0x08, 0x10


def write_page_tables(vm: Vm, map_bytes: int) -> None:
    """Identity-maps ``[0, map_bytes)`` (RAM, holes and MMIO alike) with 2 MiB pages."""
    gib = -(-map_bytes // (1 << 30))
    if not 1 <= gib <= MAX_IDENTITY_GIB:
        raise ValueError(f"the identity map covers 1 to 8 GiB, not {map_bytes} bytes")
    vm.write(PML4_GPA, struct.pack("<Q", PDPT_GPA | _PRESENT | _WRITABLE))
    vm.write(
        PDPT_GPA,
        struct.pack(f"<{gib}Q", *(PD_GPA + i * 0x1000 | _PRESENT | _WRITABLE for i in range(gib))),
    )
    entries = [(i << 21) | _PRESENT | _WRITABLE | _HUGE for i in range(gib * 512)]
    vm.write(PD_GPA, struct.pack(f"<{len(entries)}Q", *entries))
    # A flat GDT: null, 64-bit code, data (what the segment caches below describe).
    vm.write(GDT_GPA, struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF))


def enter_long_mode(vcpu: Vcpu, *, entry: int, stack_top: int) -> None:
    """Loads the vCPU's registers so that its next KVM_RUN executes ``entry`` in 64-bit mode
    with paging on (``write_page_tables`` first)."""
    sregs = vcpu.get_sregs()
    code = uapi.KvmSegment(
        base=0,
        limit=0xFFFFFFFF,
        selector=_CODE_SELECTOR,
        type=11,
        present=1,
        dpl=0,
        db=0,
        s=1,
        l=1,
        g=1,
    )
    data = uapi.KvmSegment(
        base=0,
        limit=0xFFFFFFFF,
        selector=_DATA_SELECTOR,
        type=3,
        present=1,
        dpl=0,
        db=1,
        s=1,
        l=0,
        g=1,
    )
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base, sregs.gdt.limit = GDT_GPA, 3 * 8 - 1
    sregs.cr3 = PML4_GPA
    sregs.cr4 = CR4_PAE
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(uapi.KvmRegs(rip=entry, rsp=stack_top, rflags=0x2))
