"""The destination of a live KVM migration, in a process of its own: it reads the migration
stream (``pagehint.migration.stream``) from a socket into a second VM's RAM, restores the
guest's vCPU and balloon state, resumes the guest, and answers with the digest of every page
it received (for the source's oracle) and a report of what the guest found when it checked
itself.

Run as ``python -m pagehint.kvm.destination --fd N`` (a connected socket inherited from the
source: what ``DestinationProcess`` does) or ``--listen unix:PATH`` / ``--listen HOST:PORT``
(waits for one connection). After the report it waits for the source to close the
connection, then exits: 0 when the stream was whole, 1 (with an ERROR record and one line on
stderr) when it was not.

What it does once the stream has ended, in order:

1. restores the balloon (virtio-mmio registers and ``FreePageHintDevice`` state) and each
   vCPU's state, before any vCPU runs;
2. digests every page as received (``DIGESTS``), then starts the vCPUs: the guest goes on
   wherever the source stopped it;
3. ends the run the source started, if the guest was in one (its next step is told to
   stop), and asks the guest for its self-check;
4. exercises the balloon that moved: the guest takes the DONE the migration sent (its hinted
   blocks become free again), the device starts a new round, the guest hints its free blocks
   to it, and checks itself once more;
5. sends ``REPORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from typing import Any

import numpy as np

from pagehint import _core
from pagehint.device import FreePageHintDevice, VirtioMmioTransport
from pagehint.kvm.guest_program import FREE, HINTED, GuestProgram
from pagehint.kvm.report import DestinationReport
from pagehint.kvm.vm import VcpuState, Vm
from pagehint.migration.stream import (
    Kind,
    StreamError,
    StreamReader,
    StreamWriter,
    page_digests,
)


class _Receiver:
    """One migration received into a new VM."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.reader = StreamReader(sock)
        self.writer: StreamWriter | None = None
        self.timeout = timeout
        self.vm: Vm | None = None
        self.pages_received = 0

    def _hello(self) -> dict[str, Any]:
        record = self.reader.read()
        if record.kind is not Kind.HELLO:
            raise StreamError(f"the stream starts with {record.kind.name}, not HELLO")
        hello: dict[str, Any] = record.value
        regions = hello.get("regions")
        if not isinstance(regions, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
            for r in regions
        ):
            raise StreamError("HELLO's regions must be a list of [gpa, size] pairs")
        try:
            memmap = _core.MemoryMap([(gpa, size) for gpa, size in regions], hello["page_size"])
        except (ValueError, OverflowError) as e:  # unaligned, overlapping, negative, > u64
            raise StreamError(f"HELLO's regions were refused: {e}") from None
        if memmap.npages != hello["npages"]:
            raise StreamError(
                f"HELLO says {hello['npages']} pages; its regions hold {memmap.npages}"
            )
        vcpus, mmio_base = hello.get("vcpus"), hello.get("mmio_base")
        if not isinstance(vcpus, int) or not 1 <= vcpus <= 16:
            raise StreamError(f"HELLO's vcpus must be 1 to 16, not {vcpus!r}")
        if mmio_base is not None and not isinstance(mmio_base, int):
            raise StreamError("HELLO's mmio_base must be an integer or null")
        self.vm = Vm(memmap, vcpus=vcpus)
        self.writer = StreamWriter(self.reader.sock, memmap.page_size)
        self.writer.send_ready()
        return hello

    def _pages_until_end(self) -> Any:
        assert self.vm is not None
        ram = self.vm.ram.reshape(-1, self.vm.memmap.page_size)
        state: Any = None
        while True:
            record = self.reader.read()
            if record.kind is Kind.PAGES:
                assert record.batch is not None
                batch = record.batch
                ram[batch.pfns[~batch.zero]] = batch.data
                ram[batch.pfns[batch.zero]] = 0
                self.pages_received += len(batch.pfns)
            elif record.kind is Kind.STATE:
                if state is not None:
                    raise StreamError("a second STATE record")
                state = record.value
            elif record.kind is Kind.END:
                if state is None:
                    raise StreamError("END before the STATE record")
                return state
            elif record.kind is Kind.ERROR:
                raise StreamError(f"the source gave up: {record.value}")
            else:
                raise StreamError(f"a {record.kind.name} record from the source")

    def run(self) -> DestinationReport:
        hello = self._hello()
        assert self.vm is not None and self.writer is not None
        vm = self.vm
        state = self._pages_until_end()
        ended = time.monotonic()
        if not isinstance(state, dict) or set(state) != {"vcpus", "transport", "guest"}:
            raise StreamError("STATE must hold exactly 'vcpus', 'transport' and 'guest'")
        in_run = state["guest"].get("in_run") if isinstance(state["guest"], dict) else None
        if not isinstance(in_run, bool):
            raise StreamError("STATE's guest must say whether it was in a run (in_run)")
        saved_vcpus = state["vcpus"]
        if not isinstance(saved_vcpus, list) or len(saved_vcpus) != len(vm.vcpus):
            raise StreamError(f"STATE must hold {len(vm.vcpus)} vCPU states")
        mmio_base = hello.get("mmio_base")
        transport: VirtioMmioTransport | None = None
        if mmio_base is not None:
            device = FreePageHintDevice(vm.ram, vm.memmap)
            device.guest_write = vm.mark_dirty
            transport = VirtioMmioTransport(device)
            try:
                transport.restore_state(state["transport"])
            except ValueError as e:
                raise StreamError(f"the balloon's state was refused: {e}") from None
            vm.add_mmio(mmio_base, transport.size, transport)
        guest = GuestProgram(vm, mmio_base=mmio_base or 0, load=False, timeout=self.timeout)
        for vcpu, saved in zip(vm.vcpus, saved_vcpus, strict=True):
            try:
                vcpu.restore_state(VcpuState.from_dict(saved))
            except (ValueError, OSError) as e:
                raise StreamError(f"vCPU {vcpu.index}'s state was refused: {e}") from None
        t0 = time.monotonic()
        digests = page_digests(np.asarray(vm.ram), vm.memmap.page_size)
        digest_seconds = time.monotonic() - t0
        for vcpu in vm.vcpus:
            vcpu.start()
        resume_seconds = time.monotonic() - ended - digest_seconds
        self.writer.send_digests(digests)
        steps = guest.collect() if in_run else 0
        check = guest.selfcheck()
        hint_state, hinted_left, free, rehinted, check_after = None, 0, 0, 0, check.ok
        if transport is not None:
            device = transport.device
            hint_state = device.state.value
            guest.poll()  # takes DONE: the hinted blocks are free again
            _, blocks, _ = guest.blocks()
            hinted_left = int(np.count_nonzero(blocks == HINTED))
            free = int(np.count_nonzero(blocks == FREE))
            if device.hinting:
                device.start_hinting()
                rehinted = guest.poll()
            check_after = guest.selfcheck().ok
        return DestinationReport(
            pages_received=self.pages_received,
            bytes_received=self.reader.bytes_received,
            digest_seconds=digest_seconds,
            resume_seconds=resume_seconds,
            steps=steps,
            bad_pages=check.bad_pages,
            bad_state=check.bad_state,
            hint_state=hint_state,
            hinted_after_done=hinted_left,
            free_blocks=free,
            rehinted=rehinted,
            check_after_rehint_ok=check_after,
        )

    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()


def serve(sock: socket.socket, *, timeout: float = 60.0) -> DestinationReport:
    """Receives one migration on ``sock`` and answers it (see the module's docstring); an
    ERROR record goes back when the stream is refused or the guest fails, and the error is
    raised."""
    receiver = _Receiver(sock, timeout)
    try:
        report = receiver.run()
        assert receiver.writer is not None
        receiver.writer.send_json(Kind.REPORT, report.to_dict())
        # The source closes once it has read the report.
        sock.settimeout(timeout)
        while sock.recv(4096):
            pass
        return report
    except Exception as e:
        writer = receiver.writer or StreamWriter(sock, 4096)
        with contextlib.suppress(OSError):
            writer.send_error(f"{type(e).__name__}: {e}")
        raise
    finally:
        receiver.close()


def _listen(address: str) -> socket.socket:
    if address.startswith("unix:"):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address[5:])
    else:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"--listen takes unix:PATH or HOST:PORT, not {address!r}")
        server = socket.create_server((host, int(port)))
    try:
        with server:
            server.listen(1)
            conn, _ = server.accept()
    finally:
        if address.startswith("unix:"):
            # One connection only: the path goes once it is taken (or the wait ends).
            with contextlib.suppress(OSError):
                os.unlink(address[5:])
    return conn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pagehint.kvm.destination",
        description="Receives one live KVM migration of pagehint's test guest and reports "
        "what the resumed guest found.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="a connected stream socket inherited from the source")
    where.add_argument("--listen", metavar="ADDRESS", help="unix:PATH or HOST:PORT")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the guest")
    args = p.parse_args(argv)
    try:
        sock = socket.socket(fileno=args.fd) if args.fd is not None else _listen(args.listen)
    except (OSError, ValueError) as e:
        print(f"pagehint destination: {e}", file=sys.stderr)
        return 2
    with sock:
        try:
            serve(sock, timeout=args.timeout)
        except Exception as e:  # noqa: BLE001 - one line for the source's log
            # One line even if the message has several (an ERROR from the source, say).
            message = " ".join(f"{type(e).__name__}: {e}".splitlines())
            print(f"pagehint destination: {message}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
