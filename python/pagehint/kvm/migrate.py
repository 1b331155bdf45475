"""The KVM guest as a migration source, and the destination as a second process fed over a
socket, for ``Precopy`` on the wall clock (``pagehint.migration.WallClockLink``): the guest
runs by itself in its vCPU thread while the loop syncs, hints and sends.

``KvmSource.pause`` stops the vCPUs wherever they are (pending I/O completed first), as a VMM's
stop-and-copy does. ``DestinationProcess`` starts ``python -m pagehint.kvm.destination`` on one
end of a Unix socket pair and is the loop's ``MigrationDestination``: each batch of pages is
one PAGES record of the stream (``pagehint.migration.stream``), so what ``Precopy`` counts as
``ram.transferred`` is what went over the socket. ``switchover`` then sends the paused guest's
vCPU and balloon state and END; the destination resumes the guest, which checks itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pagehint import _core
from pagehint.device import DeviceThread, FreePageHintDevice, VirtioMmioTransport
from pagehint.kvm.guest_program import HINTED, GuestProgram
from pagehint.kvm.report import DestinationReport
from pagehint.kvm.vm import Vm, VmLogMode
from pagehint.migration.runs import PageRuns
from pagehint.migration.stream import (
    VERSION,
    Kind,
    StreamError,
    StreamReader,
    StreamWriter,
    connected_pair,
    page_digests,
)

_I64Array = npt.NDArray[np.int64]
PAGE = 4096


class DestinationFailed(RuntimeError):
    """The destination process refused the stream, died, or closed the connection."""


class KvmSource:
    """``guest`` on ``vm`` as a ``MigrationSource``, with its balloon behind ``transport`` (if
    it has one)."""

    def __init__(
        self,
        vm: Vm,
        guest: GuestProgram,
        transport: VirtioMmioTransport | None = None,
        *,
        device_thread: DeviceThread | None = None,
    ) -> None:
        self.vm = vm
        self.guest = guest
        self.transport = transport
        self.device_thread = device_thread
        """The thread serving ``transport`` (if it does not serve on the vCPU thread): held
        while the guest is paused, so the device's state is still when it is saved."""
        self._device = None if transport is None else transport.device
        self.paused_at: float | None = None
        """``time.monotonic()`` when stop-and-copy paused the vCPUs (None while running)."""

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
        """Stop-and-copy: every vCPU stops at its next instruction boundary (a signal
        interrupts one that makes no exits), its last exit's I/O completed."""
        self.vm.pause()
        if self.device_thread is not None:
            self.device_thread.hold()
        self.paused_at = time.monotonic()

    def resume(self) -> None:
        """After a cancel or failure: the guest runs on here."""
        if self.paused_at is not None:
            if self.device_thread is not None:
                self.device_thread.release()
            self.vm.resume()
            self.paused_at = None

    def save_state(self) -> dict[str, Any]:
        """The paused guest's state for the STATE record: each vCPU's, the balloon's
        (virtio-mmio registers with the device's hinting state and queue indices), and
        whether the test guest was in a ``run`` (the destination then ends it)."""
        if self.paused_at is None:
            raise RuntimeError("save_state needs the guest paused")
        return {
            "vcpus": [v.save_state().to_dict() for v in self.vm.vcpus],
            "transport": None if self.transport is None else self.transport.save_state(),
            "guest": {"in_run": self.guest.in_run},
        }

    def lost_pages(self, destination_digests: npt.NDArray[np.uint64]) -> int:
        """The oracle, with the source paused: pages whose digest differs on the destination
        and that no hint excuses (only a page of a block the guest holds hinted may differ:
        it was hinted after its last write)."""
        if len(destination_digests) != self.vm.npages:
            raise ValueError(f"{len(destination_digests)} digests for {self.vm.npages} pages")
        differ = page_digests(np.asarray(self.vm.ram), PAGE) != destination_digests
        gpas, state, _ = self.guest.blocks()
        per_block = self.guest.block_bytes // PAGE
        for gpa in gpas[state == HINTED].tolist():
            first = self.vm.memmap.pfn_of(gpa)
            differ[first : first + per_block] = False
        return int(np.count_nonzero(differ))

    def read_pages(
        self, runs: PageRuns
    ) -> tuple[tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]], int]:
        """The pages' bytes and which are all zero (the destination's payload), and how many
        are."""
        pages = self.vm.ram.reshape(-1, PAGE)[runs.pfns()]
        zero: npt.NDArray[np.bool_] = np.asarray(~pages.any(axis=1), dtype=np.bool_)
        return (pages, zero), int(np.count_nonzero(zero))


@dataclass(frozen=True)
class Switchover:
    """How the guest moved: the oracle's count, the destination's report, and the downtime
    from the source's pause to the guest running on the destination (the verification's
    digesting excluded)."""

    lost_pages: int
    report: DestinationReport
    downtime: float


class DestinationProcess:
    """The destination VM in a second process, as ``Precopy``'s ``MigrationDestination``.

    Starting it sends HELLO (the memory map, the vCPU count and where the balloon's
    virtio-mmio window is) and waits for READY (the destination's VM built); ``receive``
    sends each batch as a PAGES record; ``switchover`` finishes a completed migration;
    ``close`` ends the process (``kill`` ends it at once, to test a failure)."""

    def __init__(
        self,
        memmap: _core.MemoryMap,
        *,
        mmio_base: int | None,
        vcpus: int = 1,
        timeout: float = 60.0,
    ) -> None:
        self.memmap = memmap
        self.timeout = timeout
        ours, theirs = connected_pair()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - kept for the process's life
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pagehint.kvm.destination",
                    "--fd",
                    str(theirs.fileno()),
                    "--timeout",
                    str(timeout),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError:
            ours.close()
            self._stderr.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.writer = StreamWriter(ours, memmap.page_size)
        self.reader = StreamReader(ours, memmap.page_size, memmap.npages)
        self.pages_sent = 0
        hello = {
            "version": VERSION,
            "page_size": memmap.page_size,
            "npages": memmap.npages,
            "regions": [list(r) for r in memmap.regions],
            "vcpus": vcpus,
            "mmio_base": mmio_base,
        }
        ours.settimeout(timeout)
        try:
            self._guard(lambda: self.writer.send_json(Kind.HELLO, hello))
            # The destination builds its VM first: pages sent before it reads would wait in
            # the socket while the guest runs on, and be sent again.
            self._expect(Kind.READY)
        except BaseException:
            self.close()
            raise

    def _why(self) -> str:
        """The process's exit status and last stderr line, if it has ended."""
        try:
            rc = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "the destination process still runs"
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        tail = f": {lines[-1]}" if lines else ""
        return f"the destination process exited with status {rc}{tail}"

    def _guard(self, send: Any) -> Any:
        try:
            return send()
        except (OSError, StreamError) as e:
            raise DestinationFailed(f"{e}; {self._why()}") from e

    @property
    def bytes_sent(self) -> int:
        """Bytes of the whole stream sent so far."""
        return self.writer.bytes_sent

    @property
    def page_bytes_sent(self) -> int:
        """Bytes of the PAGES records alone (what ``ram.transferred`` counts)."""
        return self.writer.page_bytes_sent

    def receive(
        self, runs: PageRuns, payload: tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]
    ) -> None:
        """Sends the pages of ``runs`` with ``payload`` (``KvmSource.read_pages``'s)."""
        pages, zero = payload
        self._guard(lambda: self.writer.send_pages(runs.pfns(), pages, zero))
        self.pages_sent += runs.pages

    def _expect(self, kind: Kind) -> Any:
        record = self._guard(self.reader.read)
        if record.kind is Kind.ERROR:
            raise DestinationFailed(f"the destination refused: {record.value}")
        if record.kind is not kind:
            raise DestinationFailed(f"the destination sent {record.kind.name}, not {kind.name}")
        return record

    def switchover(self, source: KvmSource) -> Switchover:
        """After ``Precopy`` completed (the source paused, every page sent): sends the state
        and END, and collects the digests (asking the oracle) and the report. The source stays
        paused."""
        if source.paused_at is None:
            raise RuntimeError("switchover needs the source paused by a completed migration")
        state = source.save_state()
        self._guard(lambda: self.writer.send_json(Kind.STATE, state))
        self._guard(self.writer.send_end)
        digests = self._expect(Kind.DIGESTS).digests
        resumed = time.monotonic()
        lost = source.lost_pages(digests)
        try:
            report = DestinationReport.from_dict(self._expect(Kind.REPORT).value)
        except StreamError as e:
            raise DestinationFailed(str(e)) from e
        downtime = resumed - source.paused_at - report.digest_seconds
        return Switchover(lost, report, downtime)

    def kill(self) -> None:
        """Ends the process at once (a destination host failing mid-migration)."""
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """Closes the connection and waits for the process (killing it after ``timeout``)."""
        self.sock.close()
        try:
            self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._stderr.close()

    def __enter__(self) -> DestinationProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
