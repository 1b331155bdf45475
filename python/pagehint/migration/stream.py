"""pagehint's migration stream: what a source VMM sends a destination process over a socket
(Unix or TCP), and what the destination answers on the same connection.

Every record is an 8-byte header, ``u32 kind`` and ``u32 count`` (little-endian, as every
integer here), and a body:

============  ====  =====================  ===============================================
record        kind  count                  body
============  ====  =====================  ===============================================
``HELLO``     1     body bytes             UTF-8 JSON: ``version``, ``page_size``,
                                           ``npages`` and what the receiver needs to build
                                           the VM (for the KVM destination: ``regions``,
                                           ``mmio_base``...). Always first, and once;
                                           ``page_size`` a power of two, 16 to
                                           ``MAX_PAGE_SIZE``.
``PAGES``     2     pages *n* (1 to        *n* u64 page words, each the page's RAM offset
                    ``MAX_BATCH_PAGES``)   (pfn x page size, as QEMU's offset in its
                                           RAMBlock) or'ed with one flag, ``ZERO`` (0x02)
                                           or ``PAGE`` (0x08), QEMU's RAM_SAVE_FLAG values;
                                           then the data of each ``PAGE`` page, in order.
                                           A zero page is its word only.
``STATE``     3     body bytes             UTF-8 JSON: the paused guest's vCPU and device
                                           state, after the last ``PAGES``.
``END``       4     0                      none: the source has sent everything.
``DIGESTS``   5     pages                  destination to source: a u64 digest of every
                                           page of RAM as received, in pfn order.
``REPORT``    6     body bytes             destination to source: UTF-8 JSON.
``ERROR``     7     body bytes             either way: a UTF-8 message; the sender closes.
``READY``     8     0                      destination to source, after HELLO: the VM is
                                           built; the source starts sending pages (so the
                                           migration does not wait on a receiver starting).
============  ====  =====================  ===============================================

A batch of *n* pages, *z* of them zero, is therefore ``8 + 8n + page_size x (n - z)`` bytes:
``STREAM_WIRE`` says so to ``Precopy``, whose ``ram.transferred`` is then the bytes the
``PAGES`` records put on the socket (the tests hold them equal). The reader checks every
header before it reads a body (kind, count bounds, flags, pfns within ``npages``) and raises
``StreamError`` with what was wrong.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from pagehint.migration.link import WireFormat

VERSION = 1
FLAG_ZERO = 0x02
FLAG_PAGE = 0x08
HEADER_BYTES = 8
MAX_BATCH_PAGES = 1 << 20
MAX_PAGE_SIZE = 1 << 16
"""The largest page size of a stream (``MemoryMap``'s largest): it bounds a batch's data."""
MAX_JSON_BYTES = 64 << 20
STREAM_WIRE = WireFormat(page_header_bytes=8, zero_page_bytes=0, batch_header_bytes=HEADER_BYTES)
"""What a batch costs in this stream (for ``Precopy``'s byte counts)."""

_DIGEST_SEED = 0x5048_4D49_4752_3031  # any fixed odd-making seed: both ends agree


class Kind(IntEnum):
    """Record kinds."""

    HELLO = 1
    PAGES = 2
    STATE = 3
    END = 4
    DIGESTS = 5
    REPORT = 6
    ERROR = 7
    READY = 8


class StreamError(Exception):
    """The peer sent what this format does not allow, or the stream ended early."""


@dataclass(frozen=True)
class PageBatch:
    """A ``PAGES`` record: ``pfns``, which of them are ``zero``, and the ``data`` of the
    others (one row per non-zero page, in order)."""

    pfns: npt.NDArray[np.int64]
    zero: npt.NDArray[np.bool_]
    data: npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Record:
    """One record read: its kind and, by kind, ``batch`` (PAGES), ``value`` (HELLO, STATE,
    REPORT: the JSON; ERROR: the message) or ``digests`` (DIGESTS)."""

    kind: Kind
    batch: PageBatch | None = None
    value: Any = None
    digests: npt.NDArray[np.uint64] | None = None


def page_digests(ram: npt.NDArray[np.uint8], page_size: int) -> npt.NDArray[np.uint64]:
    """A 64-bit digest of every page of ``ram`` (a weighted sum of its words by fixed odd
    weights, modulo 2**64): a page whose content differs in one word always digests
    differently. Both ends compute it the same way, for the oracle."""
    if page_size % 8 or len(ram) % page_size:
        raise ValueError("ram must be whole pages of a multiple of 8 bytes")
    words = ram.view("<u8").reshape(-1, page_size // 8)
    weights = np.random.default_rng(_DIGEST_SEED).integers(
        0, 1 << 63, size=page_size // 8, dtype=np.uint64
    ) * np.uint64(2) + np.uint64(1)
    out = np.empty(len(words), dtype=np.uint64)
    step = 2048  # pages per chunk: the product stays small
    for first in range(0, len(words), step):
        out[first : first + step] = (words[first : first + step] * weights).sum(
            axis=1, dtype=np.uint64
        )
    return out


class StreamWriter:
    """Writes records to a connected socket; counts the bytes (``bytes_sent``, and
    ``page_bytes_sent`` for the ``PAGES`` records alone)."""

    def __init__(self, sock: socket.socket, page_size: int) -> None:
        if not 16 <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
            raise ValueError(
                f"page_size must be a power of two from 16 to {MAX_PAGE_SIZE}, not {page_size}"
            )
        self.sock = sock
        self.page_size = page_size
        self.bytes_sent = 0
        self.page_bytes_sent = 0

    def _send(self, *parts: bytes | memoryview) -> int:
        n = 0
        for part in parts:
            self.sock.sendall(part)
            n += len(part)
        self.bytes_sent += n
        return n

    @staticmethod
    def _header(kind: Kind, count: int) -> bytes:
        return int(kind).to_bytes(4, "little") + count.to_bytes(4, "little")

    def send_json(self, kind: Kind, value: Any) -> None:
        """A HELLO, STATE or REPORT record."""
        body = json.dumps(value, separators=(",", ":")).encode()
        if len(body) > MAX_JSON_BYTES:
            raise ValueError(f"a {kind.name} record of {len(body)} bytes is too large")
        self._send(self._header(kind, len(body)), body)

    def send_error(self, message: str) -> None:
        body = message.encode()[:MAX_JSON_BYTES]
        self._send(self._header(Kind.ERROR, len(body)), body)

    def send_pages(
        self,
        pfns: npt.NDArray[np.int64],
        payload: npt.NDArray[np.uint8],
        zero: npt.NDArray[np.bool_],
    ) -> int:
        """A PAGES record (split into several if over ``MAX_BATCH_PAGES``); returns its bytes.
        ``payload`` has a row of ``page_size`` bytes per pfn; rows flagged ``zero`` are not
        sent."""
        n = len(pfns)
        if n == 0:
            return 0
        if payload.shape != (n, self.page_size) or zero.shape != (n,):
            raise ValueError("payload must be (pages, page_size) and zero one flag per page")
        if n > MAX_BATCH_PAGES:
            return sum(
                self.send_pages(
                    pfns[i : i + MAX_BATCH_PAGES],
                    payload[i : i + MAX_BATCH_PAGES],
                    zero[i : i + MAX_BATCH_PAGES],
                )
                for i in range(0, n, MAX_BATCH_PAGES)
            )
        words = pfns.astype("<u8") * np.uint64(self.page_size) | np.where(
            zero, np.uint64(FLAG_ZERO), np.uint64(FLAG_PAGE)
        ).astype("<u8")
        parts: list[bytes | memoryview] = [self._header(Kind.PAGES, n), words.tobytes()]
        data = np.ascontiguousarray(payload[~zero])
        if data.size:
            parts.append(data.data.cast("B"))
        sent = self._send(*parts)
        self.page_bytes_sent += sent
        return sent

    def send_digests(self, digests: npt.NDArray[np.uint64]) -> None:
        self._send(self._header(Kind.DIGESTS, len(digests)), digests.astype("<u8").tobytes())

    def send_end(self) -> None:
        self._send(self._header(Kind.END, 0))

    def send_ready(self) -> None:
        self._send(self._header(Kind.READY, 0))


class StreamReader:
    """Reads records from a connected socket, checking each. ``npages`` (from HELLO, or
    given) bounds the pfns a PAGES record may name and the length of DIGESTS."""

    def __init__(
        self, sock: socket.socket, page_size: int | None = None, npages: int | None = None
    ) -> None:
        self.sock = sock
        self.page_size = page_size
        self.npages = npages
        self.bytes_received = 0

    def _read_into(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise StreamError(
                    f"the stream ended inside {what} ({got} of {len(view)} bytes read)"
                )
            got += n
        self.bytes_received += got

    @staticmethod
    def _too_large(what: str, nbytes: int) -> StreamError:
        # The counts are checked (MAX_BATCH_PAGES pages of MAX_PAGE_SIZE, npages digests), and
        # memory is committed only as the bytes arrive; but the bounds are large, and a
        # process that may not reserve that much says so here rather than with MemoryError.
        return StreamError(f"{what} of {nbytes} bytes is more than this process can allocate")

    def _read(self, nbytes: int, what: str) -> bytearray:
        try:
            buf = bytearray(nbytes)
        except MemoryError:
            raise self._too_large(what, nbytes) from None
        self._read_into(memoryview(buf), what)
        return buf

    def read(self) -> Record:
        """The next record (``StreamError`` if the stream ends first or breaks the format;
        an ERROR record from the peer is returned, not raised)."""
        first = self.sock.recv(HEADER_BYTES)
        if not first:
            raise StreamError("the stream ended (the peer closed the connection)")
        head = bytes(first)
        if len(head) < HEADER_BYTES:
            self.bytes_received += len(head)
            head += self._read(HEADER_BYTES - len(head), "a record header")
        else:
            self.bytes_received += len(head)
        kind_value = int.from_bytes(head[:4], "little")
        count = int.from_bytes(head[4:], "little")
        try:
            kind = Kind(kind_value)
        except ValueError:
            raise StreamError(f"unknown record kind {kind_value}") from None
        if kind is Kind.HELLO and (self.page_size is not None or self.npages is not None):
            # Once: a second one would move the bounds the receiver built its VM on.
            raise StreamError("a second HELLO (the stream's page_size and npages are set)")
        if kind in (Kind.HELLO, Kind.STATE, Kind.REPORT, Kind.ERROR):
            if count > MAX_JSON_BYTES:
                raise StreamError(f"a {kind.name} record of {count} bytes is over the limit")
            body = bytes(self._read(count, f"a {kind.name} record"))
            if kind is Kind.ERROR:
                return Record(kind, value=body.decode(errors="replace"))
            try:
                value = json.loads(body)
            except (ValueError, RecursionError) as e:
                # ValueError: not UTF-8, not JSON, or an integer of more digits than Python
                # converts; RecursionError: nested deeper than the decoder recurses.
                raise StreamError(f"a {kind.name} record is not JSON: {e}") from None
            if kind is Kind.HELLO:
                self._hello(value)
            return Record(kind, value=value)
        if kind in (Kind.END, Kind.READY):
            if count:
                raise StreamError(f"an {kind.name} record has count {count}, not 0")
            return Record(kind)
        if self.page_size is None or self.npages is None:
            raise StreamError(f"a {kind.name} record before HELLO")
        if kind is Kind.DIGESTS:
            if count != self.npages:
                raise StreamError(f"DIGESTS for {count} pages, not the guest's {self.npages}")
            raw = self._read(8 * count, "a DIGESTS record")
            return Record(kind, digests=np.frombuffer(raw, dtype="<u8").astype(np.uint64))
        return Record(kind, batch=self._pages(count))

    def _hello(self, value: Any) -> None:
        # type() is int: JSON's true and 1.0 are not integers here.
        version = value.get("version") if isinstance(value, dict) else None
        if type(version) is not int or version != VERSION:
            raise StreamError(f"HELLO is not version {VERSION} of this stream: {value!r:.200}")
        page_size, npages = value.get("page_size"), value.get("npages")
        if (
            type(page_size) is not int
            or not 16 <= page_size <= MAX_PAGE_SIZE
            or page_size & (page_size - 1)
            or type(npages) is not int
            or npages < 1
        ):
            raise StreamError(
                f"HELLO needs a power-of-two page_size from 16 to {MAX_PAGE_SIZE} and a "
                f"positive npages, not {page_size!r:.40} and {npages!r:.40}"
            )
        self.page_size, self.npages = page_size, npages

    def _pages(self, count: int) -> PageBatch:
        assert self.page_size is not None and self.npages is not None
        if not 1 <= count <= MAX_BATCH_PAGES:
            raise StreamError(f"a PAGES record of {count} pages (1 to {MAX_BATCH_PAGES})")
        words = np.frombuffer(self._read(8 * count, "a PAGES record's words"), dtype="<u8")
        flags = words & np.uint64(self.page_size - 1)
        bad = (flags != FLAG_ZERO) & (flags != FLAG_PAGE)
        if bad.any():
            at = int(np.argmax(bad))
            raise StreamError(f"page word {at} has flags {int(flags[at]):#x}, not ZERO or PAGE")
        pfns = (words // np.uint64(self.page_size)).astype(np.int64)
        if int(pfns.max()) >= self.npages:
            raise StreamError(f"a page {int(pfns.max())} beyond the guest's {self.npages} pages")
        zero = flags == FLAG_ZERO
        normal = count - int(np.count_nonzero(zero))
        try:
            data = np.empty((normal, self.page_size), dtype=np.uint8)
        except MemoryError:
            raise self._too_large("a PAGES record's data", normal * self.page_size) from None
        if normal:
            self._read_into(data.data.cast("B"), "a PAGES record's data")
        return PageBatch(pfns, zero, data)


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected Unix stream sockets (one end for a child process)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


__all__ = [
    "FLAG_PAGE",
    "FLAG_ZERO",
    "MAX_BATCH_PAGES",
    "MAX_PAGE_SIZE",
    "STREAM_WIRE",
    "VERSION",
    "Kind",
    "PageBatch",
    "Record",
    "StreamError",
    "StreamReader",
    "StreamWriter",
    "connected_pair",
    "page_digests",
]
