"""The destination process refuses a malformed migration stream: an ERROR record back naming
the problem, exit status 1 and that one line on stderr; ``DestinationProcess`` raises
``DestinationFailed`` with the destination's reason. ``--listen unix:PATH`` takes one
connection; a bad ``--listen`` or ``--fd`` is exit 2. Refusals that come before the
destination builds its VM need no KVM; the others skip, saying why, without it."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import KVM_LAYOUT, KVM_MMIO_BASE, PAGE
from pagehint.kvm import DestinationFailed, DestinationProcess, KvmUnavailable, Vm
from pagehint.migration import PageRuns
from pagehint.migration.stream import (
    VERSION,
    Kind,
    StreamReader,
    StreamWriter,
    connected_pair,
)

NPAGES = KVM_LAYOUT.npages
COMMAND = [sys.executable, "-m", "pagehint.kvm.destination"]


@pytest.fixture
def kvm() -> None:
    try:
        Vm(KVM_LAYOUT).close()
    except KvmUnavailable as e:
        pytest.skip(f"the destination builds a KVM VM: {e}")


def hello(**over: Any) -> dict[str, Any]:
    """What ``DestinationProcess`` sends for KVM_LAYOUT, one vCPU and no balloon."""
    return {
        "version": VERSION,
        "page_size": PAGE,
        "npages": NPAGES,
        "regions": [list(r) for r in KVM_LAYOUT.regions],
        "vcpus": 1,
        "mmio_base": None,
        **over,
    }


def pages(*pfns: int) -> Callable[[StreamWriter], object]:
    """A PAGES record of normal pages (the writer does not check pfns; the reader does)."""
    pfn_array = np.array(pfns, dtype=np.int64)
    payload = np.full((len(pfns), PAGE), 0x5A, dtype=np.uint8)
    return lambda w: w.send_pages(pfn_array, payload, np.zeros(len(pfns), dtype=np.bool_))


def send(kind: Kind, value: Any) -> Callable[[StreamWriter], object]:
    return lambda w: w.send_json(kind, value)


END: Callable[[StreamWriter], object] = lambda w: w.send_end()
CLOSE: Callable[[StreamWriter], object] = lambda w: w.sock.shutdown(socket.SHUT_WR)
"""The source's end of the stream closes (the destination reads no more)."""
VCPU_KEYS = ("sregs", "regs", "fpu", "events")


class Destination:
    """``python -m pagehint.kvm.destination --fd N`` on one end of a socket pair; the test
    holds the other."""

    def __init__(self) -> None:
        ours, theirs = connected_pair()
        with theirs:
            self.process = subprocess.Popen(
                [*COMMAND, "--fd", str(theirs.fileno()), "--timeout", "10"],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        ours.settimeout(20)
        self.sock = ours
        self.writer = StreamWriter(ours, PAGE)
        self.reader = StreamReader(ours, PAGE, NPAGES)

    def refusal(self) -> str:
        """After the stream was sent: the destination's ERROR message, once it closed the
        connection, exited 1 and wrote that message as its one line on stderr."""
        record = self.reader.read()
        if record.kind is Kind.READY:  # a valid HELLO built the VM first
            record = self.reader.read()
        assert record.kind is Kind.ERROR, record
        message: str = record.value
        # Then nothing more: the destination closed (a reset if it left bytes unread).
        with contextlib.suppress(ConnectionResetError):
            assert self.sock.recv(1) == b""
        _, err = self.process.communicate(timeout=20)
        assert self.process.returncode == 1
        assert err.splitlines() == [f"pagehint destination: {' '.join(message.splitlines())}"]
        return message

    def close(self) -> None:
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def destination() -> Iterator[Destination]:
    made = Destination()
    yield made
    made.close()


def feed(destination: Destination, records: list[Callable[[StreamWriter], object]]) -> None:
    """Sends ``records``; the destination may refuse (and close) before it took them all."""
    try:
        for record in records:
            record(destination.writer)
    except (BrokenPipeError, ConnectionResetError):
        pass


# -- refused before the VM is built: no KVM needed -------------------------------------------------

BEFORE_VM = [
    ("version", [send(Kind.HELLO, hello(version=2))], "HELLO is not version 1"),
    ("not first", [send(Kind.STATE, {})], "the stream starts with STATE, not HELLO"),
    ("pages first", [pages(0)], "a PAGES record before HELLO"),
    ("regions", [send(Kind.HELLO, hello(regions="all"))], "HELLO's regions must be a list"),
    ("region pair", [send(Kind.HELLO, hello(regions=[[0]]))], "HELLO's regions must be a list"),
    (
        "negative region",
        [send(Kind.HELLO, hello(regions=[[0, -PAGE]], npages=1))],
        "HELLO's regions were refused",
    ),
    (
        "unaligned region",
        [send(Kind.HELLO, hello(regions=[[0, 100]], npages=1))],
        "HELLO's regions were refused: .*not page aligned",
    ),
    (
        "npages",
        [send(Kind.HELLO, hello(npages=5))],
        f"HELLO says 5 pages; its regions hold {NPAGES}",
    ),
    ("vcpus", [send(Kind.HELLO, hello(vcpus=0))], "HELLO's vcpus must be 1 to 16, not 0"),
    ("mmio_base", [send(Kind.HELLO, hello(mmio_base="x"))], "HELLO's mmio_base must be an"),
]


@pytest.mark.parametrize(
    "records, reason", [c[1:] for c in BEFORE_VM], ids=[c[0] for c in BEFORE_VM]
)
def test_a_malformed_hello_is_refused_with_an_error_record_and_status_1(
    destination: Destination, records: list[Callable[[StreamWriter], object]], reason: str
) -> None:
    feed(destination, records)
    message = destination.refusal()
    assert message.startswith("StreamError: ") and re.search(reason, message), message


# -- refused once the VM is built: KVM needed ------------------------------------------------------

NOT_IN_RUN = {"in_run": False}
GARBAGE_VCPU = {"vcpus": [dict.fromkeys(VCPU_KEYS, "00")], "transport": None, "guest": NOT_IN_RUN}
AFTER_VM = [
    ("pfn beyond", [pages(0, NPAGES)], f"page {NPAGES} beyond the guest's {NPAGES} pages"),
    (
        "cut",
        [pages(1), lambda w: w.sock.sendall(struct.pack("<II", Kind.PAGES, 2)), CLOSE],
        r"the stream ended inside a PAGES record's words \(0 of 16 bytes read\)",
    ),
    ("END before STATE", [pages(1), END], "END before the STATE record"),
    ("STATE shape", [send(Kind.STATE, {"vcpus": []}), END], "STATE must hold exactly 'vcpus'"),
    (
        "guest in_run",
        [send(Kind.STATE, {**GARBAGE_VCPU, "guest": {"in_run": 1}}), END],
        "STATE's guest must say whether it was in a run",
    ),
    ("STATE list", [send(Kind.STATE, [1, 2]), END], "STATE must hold exactly 'vcpus'"),
    (
        "vCPU count",
        [send(Kind.STATE, {"vcpus": [], "transport": None, "guest": NOT_IN_RUN}), END],
        "STATE must hold 1 vCPU states",
    ),
    (
        "vCPU keys",
        [
            send(Kind.STATE, {"vcpus": [{"regs": "00"}], "transport": None, "guest": NOT_IN_RUN}),
            END,
        ],
        "vCPU 0's state was refused: a vCPU state has exactly the keys",
    ),
    (
        "vCPU not hex",
        [
            send(
                Kind.STATE,
                {
                    "vcpus": [dict.fromkeys(VCPU_KEYS, "zz")],
                    "transport": None,
                    "guest": NOT_IN_RUN,
                },
            ),
            END,
        ],
        "vCPU 0's state was refused: a vCPU state's values are hex strings",
    ),
    (
        "vCPU garbage",
        [send(Kind.STATE, GARBAGE_VCPU), END],
        "vCPU 0's state was refused: KvmSregs state is 1 bytes",
    ),
    ("second STATE", [send(Kind.STATE, GARBAGE_VCPU)] * 2, "a second STATE record"),
    ("DIGESTS", [lambda w: w.send_digests(np.zeros(NPAGES, np.uint64))], "a DIGESTS record from"),
    ("source gave up", [lambda w: w.send_error("no disk\nat all")], "the source gave up: no disk"),
]


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize("records, reason", [c[1:] for c in AFTER_VM], ids=[c[0] for c in AFTER_VM])
def test_a_malformed_stream_is_refused_with_an_error_record_and_status_1(
    destination: Destination, records: list[Callable[[StreamWriter], object]], reason: str
) -> None:
    feed(destination, [send(Kind.HELLO, hello()), *records])
    message = destination.refusal()
    assert message.startswith("StreamError: ") and re.search(reason, message), message


@pytest.mark.usefixtures("kvm")
def test_a_garbage_balloon_state_is_refused(destination: Destination) -> None:
    state = {**GARBAGE_VCPU, "transport": {"registers": "none"}}
    feed(
        destination,
        [send(Kind.HELLO, hello(mmio_base=KVM_MMIO_BASE)), send(Kind.STATE, state), END],
    )
    assert "the balloon's state was refused: transport state" in destination.refusal()


# -- the source side: DestinationFailed with the destination's reason -----------------------------


class PausedSource:
    """What ``switchover`` asks of a paused source: its state (here whatever the test says)."""

    def __init__(self, state: Any) -> None:
        self.paused_at = time.monotonic()
        self.state = state

    def save_state(self) -> Any:
        return self.state

    def lost_pages(self, digests: Any) -> int:
        raise AssertionError("a refused stream has no digests")


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize(
    "pfn, state, reason",
    [
        (NPAGES, GARBAGE_VCPU, f"page {NPAGES} beyond the guest's {NPAGES} pages"),
        (0, {"vcpus": []}, "STATE must hold exactly 'vcpus', 'transport' and 'guest'"),
        (0, GARBAGE_VCPU, "vCPU 0's state was refused: KvmSregs state is 1 bytes"),
    ],
    ids=["pfn beyond", "STATE shape", "vCPU garbage"],
)
def test_the_source_raises_destination_failed_with_the_destinations_reason(
    pfn: int, state: Any, reason: str
) -> None:
    with DestinationProcess(KVM_LAYOUT, mmio_base=None, timeout=10) as destination:
        runs = PageRuns.of_pfns(np.array([pfn], dtype=np.int64))
        with pytest.raises(DestinationFailed, match=reason):
            # The refusal comes back on a later send or when the source waits for DIGESTS.
            destination.receive(runs, (np.ones((1, PAGE), np.uint8), np.zeros(1, np.bool_)))
            destination.switchover(PausedSource(state))  # type: ignore[arg-type]
        process = destination.process
    assert process.returncode == 1


# -- how the process is started -------------------------------------------------------------------


def test_listen_on_a_unix_socket_takes_one_connection(tmp_path: Path) -> None:
    path = tmp_path / "destination.sock"
    process = subprocess.Popen(
        [*COMMAND, "--listen", f"unix:{path}", "--timeout", "10"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        deadline = time.monotonic() + 20
        while True:
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "the destination never listened"
                time.sleep(0.02)
        with sock:
            StreamWriter(sock, PAGE).send_json(Kind.HELLO, hello(version=2))
            record = StreamReader(sock).read()
            assert record.kind is Kind.ERROR
            assert record.value.startswith("StreamError: HELLO is not version 1")
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1
    assert err.splitlines() == [f"pagehint destination: {record.value}"]
    assert not path.exists()  # taken once, then gone: the next run may listen there again


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "nohost"], "--listen takes unix:PATH or HOST:PORT, not 'nohost'"),
        (["--listen", "localhost:x"], "--listen takes unix:PATH or HOST:PORT"),
        (["--listen", ":8080"], "--listen takes unix:PATH or HOST:PORT"),
        (["--listen", "localhost:99999"], "not 'localhost:99999'"),
        (["--listen", "unix:/nonexistent/dir/destination.sock"], "No such file or directory"),
        (["--fd", "9999"], "Bad file descriptor"),
    ],
)
def test_a_bad_address_is_exit_2_in_one_line(args: list[str], message: str) -> None:
    done = subprocess.run(
        [*COMMAND, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("pagehint destination: ") and message in line, line
