"""Real KVM: a small VMM on ``/dev/kvm`` (``vm``: memslots, vCPU threads, exits, the dirty log
in three modes), the KVM userspace API it uses (``uapi``, checked against ``<linux/kvm.h>`` by
the tests), long mode set up by the VMM (``boot``), the test guest (``guest/``, built by
``build``, driven by ``guest_program``), and the guest as a live migration's source
(``migrate``) with its destination in a second process (``destination``) fed by the migration
stream. Linux x86_64 only; ``KvmUnavailable`` says why not."""

from pagehint.kvm.guest_program import GuestError, GuestProgram, SelfCheck
from pagehint.kvm.migrate import DestinationFailed, DestinationProcess, KvmSource, Switchover
from pagehint.kvm.report import DestinationReport
from pagehint.kvm.vm import KvmUnavailable, MemorySlot, Vcpu, VcpuState, Vm, VmLogMode

__all__ = [
    "DestinationFailed",
    "DestinationProcess",
    "DestinationReport",
    "GuestError",
    "GuestProgram",
    "KvmSource",
    "KvmUnavailable",
    "MemorySlot",
    "SelfCheck",
    "Switchover",
    "Vcpu",
    "VcpuState",
    "Vm",
    "VmLogMode",
]
