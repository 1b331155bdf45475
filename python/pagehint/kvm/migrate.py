"""The KVM guest as a migration source, and a second VM as its destination, for ``Precopy``
on the wall clock (``pagehint.migration.WallClockLink``): the guest runs by itself in its
vCPU thread while the loop syncs, hints and sends.

This first cut keeps the destination in the same process and pauses the guest at its run
loop's checkpoint: the vCPU parks with its checkpoint IN completed (so its registers can be
copied), and the resumed copy ends its run at once and can check itself. The balloon moves
with it: the transport's registers and the device's state (hinting state, cmd id, queue
indices) are saved on the source after the pause and restored on the destination, so the
copy takes the DONE the migration sent and frees its hinted blocks, and can hint again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.device import FreePageHintDevice, VirtioMmioTransport
from pagehint.kvm.guest_program import HINTED, GuestProgram
from pagehint.kvm.vm import Vm, VmLogMode

_I64Array = npt.NDArray[np.int64]
PAGE = 4096


class KvmSource:
    """``guest`` on ``vm`` as a ``MigrationSource``, with its balloon behind ``transport`` (if
    it has one)."""

    def __init__(
        self, vm: Vm, guest: GuestProgram, transport: VirtioMmioTransport | None = None
    ) -> None:
        self.vm = vm
        self.guest = guest
        self.transport = transport
        self._device = None if transport is None else transport.device
        self.paused = False

    @property
    def memmap(self) -> _core.MemoryMap:
        return self.vm.memmap

    @property
    def log_mode(self) -> VmLogMode:
        return self.vm.log_mode

    @property
    def device(self) -> FreePageHintDevice | None:
        return self._device

    def get_dirty_log(self) -> npt.NDArray[np.uint64]:
        return self.vm.get_dirty_log()

    def clear_dirty_log(self, first_page: int, num_pages: int) -> int:
        return self.vm.clear_dirty_log(first_page, num_pages)

    def pause(self) -> None:
        """Stop-and-copy: the guest parks at its next checkpoint (its I/O completed)."""
        self.guest.pause_at_checkpoint()
        self.paused = True

    def resume(self) -> None:
        """After a cancel or failure: the guest runs again (its run ends at the next step,
        the checkpoint having answered 'stop')."""
        if self.paused:
            self.vm.vcpus[0].resume()
            self.paused = False

    def lost_pages(self, destination: KvmDestination) -> int:
        """The oracle, once the source is paused and before the copy runs: pages whose
        content differs on ``destination`` and that no hint excuses (only a page of a block the
        guest holds hinted may differ: it was hinted after its last write)."""
        differ = (self.vm.ram.reshape(-1, PAGE) != destination.vm.ram.reshape(-1, PAGE)).any(axis=1)
        gpas, state, _ = self.guest.blocks()
        per_block = self.guest.block_bytes // PAGE
        for gpa in gpas[state == HINTED].tolist():
            first = self.vm.memmap.pfn_of(gpa)
            differ[first : first + per_block] = False
        return int(np.count_nonzero(differ))

    def read_pages(self, pfns: _I64Array) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
        pages = self.vm.ram.reshape(-1, PAGE)[pfns]
        zero: npt.NDArray[np.bool_] = np.asarray(~pages.any(axis=1), dtype=np.bool_)
        return pages, zero


class KvmDestination:
    """A second VM on the same memory map receiving the pages; ``resume`` starts the guest
    there from the source's paused vCPU state."""

    def __init__(self, memmap: _core.MemoryMap, *, mmio_base: int) -> None:
        self.vm = Vm(memmap)
        self.mmio_base = mmio_base
        self.pages_received = 0
        self.guest: GuestProgram | None = None
        self.transport: VirtioMmioTransport | None = None
        """The balloon restored here by ``resume`` (its ``device`` applies hints)."""

    def receive(self, pfns: _I64Array, payload: npt.NDArray[Any]) -> None:
        self.vm.ram.reshape(-1, PAGE)[pfns] = payload
        self.pages_received += len(pfns)

    def resume(self, source: KvmSource) -> GuestProgram:
        """Copies the paused source's vCPU registers and balloon state, and starts the guest
        here."""
        src, dst = source.vm.vcpus[0], self.vm.vcpus[0]
        if source.transport is not None:
            device = FreePageHintDevice(self.vm.ram, self.vm.memmap)
            device.guest_write = self.vm.mark_dirty
            transport = VirtioMmioTransport(device)
            transport.restore_state(source.transport.save_state())
            self.vm.add_mmio(self.mmio_base, transport.size, transport)
            self.transport = transport
        dst.set_sregs(src.get_sregs())
        dst.set_regs(src.get_regs())
        guest = GuestProgram(
            self.vm, mmio_base=self.mmio_base, load=False, timeout=source.guest.timeout
        )
        guest.start()
        self.guest = guest
        return guest

    def close(self) -> None:
        self.vm.close()
