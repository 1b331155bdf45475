"""Real KVM: a small VMM on ``/dev/kvm`` (``vm``: memslots, vCPU threads, exits, the dirty log
in three modes), the KVM userspace API it uses (``uapi``, checked against ``<linux/kvm.h>`` by
the tests), long mode set up by the VMM (``boot``), and the test guest (``guest/``, built by
``build``, driven by ``guest_program``). Linux x86_64 only; ``KvmUnavailable`` says why not."""

from pagehint.kvm.guest_program import GuestError, GuestProgram, SelfCheck
from pagehint.kvm.vm import KvmUnavailable, MemorySlot, Vcpu, Vm, VmLogMode

__all__ = [
    "GuestError",
    "GuestProgram",
    "KvmUnavailable",
    "MemorySlot",
    "SelfCheck",
    "Vcpu",
    "Vm",
    "VmLogMode",
]
