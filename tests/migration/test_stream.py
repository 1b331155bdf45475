"""The migration stream on a real socket pair: batches, JSON records, END, DIGESTS and ERROR
round-trip, and every byte is counted the same on both ends and by ``STREAM_WIRE``; a reader
fed hostile bytes refuses each malformed record with a ``StreamError`` that says what was wrong
(from the header alone where the header is enough: no body is waited for or allocated), and
arbitrary bytes give nothing but clean records and ``StreamError``; ``page_digests`` tells every
one-word change apart."""

from __future__ import annotations

import json
import socket
import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MIB, PAGE
from pagehint.migration.stream import (
    FLAG_PAGE,
    FLAG_ZERO,
    MAX_BATCH_PAGES,
    STREAM_WIRE,
    VERSION,
    Kind,
    Record,
    StreamError,
    StreamReader,
    StreamWriter,
    connected_pair,
    page_digests,
)
from pagehint.migration.stream import MAX_JSON_BYTES as MAX_JSON

NPAGES = 8
"""The guest of the hostile-input tests: 8 pages of 4 KiB."""
WAIT = 2.0
"""Seconds a reader waits for bytes before the test fails (a reader that waits for a body it
should have refused from the header times out instead of raising ``StreamError``)."""


# -- the bytes of records, written by hand --------------------------------------------------------


def header(kind: int, count: int) -> bytes:
    return struct.pack("<II", kind, count)


def json_record(kind: int, value: Any) -> bytes:
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    return header(kind, len(body)) + body


def hello(page_size: Any = PAGE, npages: Any = NPAGES, **extra: Any) -> dict[str, Any]:
    """A HELLO body; the tests also pass values of the wrong type."""
    return {"version": VERSION, "page_size": page_size, "npages": npages, **extra}


HELLO = json_record(Kind.HELLO, hello())


def words(*entries: tuple[int, int], page_size: int = PAGE) -> bytes:
    """Page words for ``(pfn, flags)`` entries."""
    return b"".join(struct.pack("<Q", pfn * page_size | flags) for pfn, flags in entries)


def pages_record(*entries: tuple[int, int], data: bytes | None = None) -> bytes:
    """A PAGES record; ``data`` defaults to a page of 0x5a for each ``PAGE`` entry."""
    if data is None:
        data = b"\x5a" * PAGE * sum(1 for _, flags in entries if flags == FLAG_PAGE)
    return header(Kind.PAGES, len(entries)) + words(*entries) + data


# -- a socket pair with a writer in the background -------------------------------------------------


def background(fn: Callable[[], object]) -> Callable[[], None]:
    """Runs ``fn`` in a thread (the writer side, whose sends could fill the socket's buffer);
    the returned ``join`` waits for it and raises what it raised."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout=30)
        assert not thread.is_alive(), "the writer thread did not finish"
        if errors:
            raise errors[0]

    return join


@contextmanager
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = connected_pair()
    with ours, theirs:
        ours.settimeout(30)
        theirs.settimeout(30)
        yield ours, theirs


@contextmanager
def fed(raw: bytes, *, close: bool = True, **reader_kw: Any) -> Iterator[StreamReader]:
    """A reader of ``raw``, sent from the other end of a socket pair, which is then shut down
    (``close``) or left open (a reader that wants more than ``raw`` then times out)."""
    with pair() as (ours, theirs):

        def send() -> None:
            ours.sendall(raw)
            if close:
                ours.shutdown(socket.SHUT_WR)

        join = background(send)
        theirs.settimeout(WAIT)
        yield StreamReader(theirs, **reader_kw)
        join()


def read_all(reader: StreamReader) -> tuple[list[Record], StreamError]:
    """Every record until the reader raises ``StreamError`` (any other exception fails)."""
    records: list[Record] = []
    while True:
        try:
            records.append(reader.read())
        except StreamError as e:
            return records, e


# -- round trips and byte accounting ---------------------------------------------------------------

Batch = tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.uint8]]


@st.composite
def page_batches(draw: st.DrawFn) -> tuple[int, int, list[Batch]]:
    """``(page_size, npages, batches)``: each batch its pfns (repeats allowed), zero flags
    and one row of bytes per page (a zero-flagged row holds garbage: it must not be sent)."""
    page_size = draw(st.sampled_from([4096, 16384]))
    npages = draw(st.integers(1, 64))
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 12))
        pfns = np.array(draw(st.lists(st.integers(0, npages - 1), min_size=n, max_size=n)))
        zero = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=np.bool_)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        payload = rng.integers(0, 256, size=(n, page_size), dtype=np.uint8)
        batches.append((pfns.astype(np.int64), zero, payload))
    return page_size, npages, batches


@settings(deadline=None)
@given(page_batches())
def test_page_batches_round_trip_and_every_byte_is_counted(
    case: tuple[int, int, list[Batch]],
) -> None:
    page_size, npages, batches = case
    with pair() as (ours, theirs):
        writer = StreamWriter(ours, page_size)
        returned: list[int] = []

        def send() -> None:
            writer.send_json(Kind.HELLO, hello(page_size, npages))
            for pfns, zero, payload in batches:
                returned.append(writer.send_pages(pfns, payload, zero))
            writer.send_end()

        join = background(send)
        reader = StreamReader(theirs)
        assert reader.read().value == hello(page_size, npages)
        received: list[int] = []  # what each PAGES record took off the socket
        for pfns, zero, payload in batches:
            before = reader.bytes_received
            record = reader.read()
            received.append(reader.bytes_received - before)
            assert record.kind is Kind.PAGES and record.batch is not None
            batch = record.batch
            np.testing.assert_array_equal(batch.pfns, pfns)
            np.testing.assert_array_equal(batch.zero, zero)
            np.testing.assert_array_equal(batch.data, payload[~zero])
            assert batch.data.shape == (len(pfns) - int(zero.sum()), page_size)
        assert reader.read().kind is Kind.END
        join()
    for (pfns, zero, _), sent in zip(batches, returned, strict=True):
        nzero = int(zero.sum())
        assert sent == STREAM_WIRE.stream_bytes(len(pfns) - nzero, nzero, page_size)
        assert sent == 8 + 8 * len(pfns) + page_size * (len(pfns) - nzero)
    assert received == returned
    assert writer.page_bytes_sent == sum(returned)
    assert writer.bytes_sent == reader.bytes_received > writer.page_bytes_sent


def test_an_empty_batch_sends_nothing() -> None:
    with pair() as (ours, _):
        writer = StreamWriter(ours, PAGE)
        empty = np.zeros(0, dtype=np.int64)
        sent = writer.send_pages(empty, np.zeros((0, PAGE), np.uint8), np.zeros(0, np.bool_))
        assert sent == STREAM_WIRE.stream_bytes(0, 0, PAGE) == 0
        assert writer.bytes_sent == writer.page_bytes_sent == 0


def test_a_batch_over_the_limit_goes_as_several_records() -> None:
    page_size, n = 16, MAX_BATCH_PAGES + 3
    pfns = np.arange(n, dtype=np.int64)
    zero = np.ones(n, dtype=np.bool_)
    zero[-5:] = False  # two normal pages in the first record, three in the second
    payload = np.zeros((n, page_size), dtype=np.uint8)
    payload[~zero] = np.arange(5, dtype=np.uint8)[:, None] + 1
    with pair() as (ours, theirs):
        writer = StreamWriter(ours, page_size)
        returned: list[int] = []
        join = background(lambda: returned.append(writer.send_pages(pfns, payload, zero)))
        reader = StreamReader(theirs, page_size, n)
        first, second = reader.read().batch, reader.read().batch
        join()
    assert first is not None and second is not None
    assert (len(first.pfns), len(second.pfns)) == (MAX_BATCH_PAGES, 3)
    np.testing.assert_array_equal(np.concatenate([first.pfns, second.pfns]), pfns)
    np.testing.assert_array_equal(np.concatenate([first.data, second.data]), payload[~zero])
    # Each record is a batch as STREAM_WIRE counts it.
    assert returned == [
        STREAM_WIRE.stream_bytes(2, MAX_BATCH_PAGES - 2, page_size)
        + STREAM_WIRE.stream_bytes(3, 0, page_size)
    ]
    assert writer.bytes_sent == reader.bytes_received == returned[0]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(deadline=None)
@given(
    extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in hello()), json_values),
    state=json_values,
    report=json_values,
    message=st.text(),
    digests=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40),
)
def test_json_end_digests_and_error_records_round_trip(
    extra: dict[str, Any], state: Any, report: Any, message: str, digests: list[int]
) -> None:
    npages = len(digests)
    with pair() as (ours, theirs):
        writer = StreamWriter(ours, PAGE)

        def send() -> None:
            writer.send_json(Kind.HELLO, hello(PAGE, npages, **extra))
            writer.send_json(Kind.STATE, state)
            writer.send_json(Kind.REPORT, report)
            writer.send_digests(np.array(digests, dtype=np.uint64))
            writer.send_error(message)
            writer.send_end()

        join = background(send)
        reader = StreamReader(theirs)
        records = [reader.read() for _ in range(6)]
        join()
    assert [r.kind for r in records] == [
        Kind.HELLO,
        Kind.STATE,
        Kind.REPORT,
        Kind.DIGESTS,
        Kind.ERROR,
        Kind.END,
    ]
    assert records[0].value == hello(PAGE, npages, **extra)
    assert (reader.page_size, reader.npages) == (PAGE, npages)
    assert records[1].value == state and records[2].value == report
    assert records[3].digests is not None and records[3].digests.tolist() == digests
    assert records[4].value == message
    assert records[5].value is None and records[5].batch is None
    assert writer.bytes_sent == reader.bytes_received


def test_the_writer_refuses_what_the_format_cannot_carry() -> None:
    with pair() as (ours, _):
        for page_size in (0, 8, 4095, 3 * 4096, 1 << 17, 1 << 40):
            with pytest.raises(ValueError, match="page_size"):
                StreamWriter(ours, page_size)
        writer = StreamWriter(ours, PAGE)
        pfns = np.arange(2, dtype=np.int64)
        with pytest.raises(ValueError, match="payload"):
            writer.send_pages(pfns, np.zeros((2, 16), np.uint8), np.zeros(2, np.bool_))
        with pytest.raises(ValueError, match="too large"):
            writer.send_json(Kind.STATE, "x" * MAX_JSON)
        assert writer.bytes_sent == 0


# -- hostile input ---------------------------------------------------------------------------------

# (id, the bytes after a valid HELLO, what the StreamError says, whether the sender then closes)
HOSTILE: list[tuple[str, bytes, str, bool]] = [
    ("kind 0", header(0, 0), "unknown record kind 0", False),
    ("kind 9", header(9, 4), "unknown record kind 9", False),
    ("kind max", header(0xFFFF_FFFF, 0), "unknown record kind 4294967295", False),
    # HELLO once only: a second one would move the bounds the first set.
    ("second HELLO", json_record(Kind.HELLO, hello(npages=1 << 20)), "second HELLO", False),
    ("no flag", pages_record((0, FLAG_ZERO), (1, 0)), "page word 1 has flags 0x0,", False),
    ("both flags", pages_record((1, FLAG_ZERO | FLAG_PAGE)), "page word 0 has flags 0xa", False),
    ("low bit", pages_record((1, FLAG_PAGE | 1)), "page word 0 has flags 0x9", False),
    ("flag 0x04", pages_record((2, 0x04)), "flags 0x4,", False),
    ("high flag bit", pages_record((2, 0x800 | FLAG_ZERO)), "flags 0x802", False),
    ("pfn npages", pages_record((NPAGES, FLAG_PAGE)), "page 8 beyond the guest's 8", False),
    ("pfn far", pages_record((0, FLAG_ZERO), (1 << 40, FLAG_ZERO)), "page 1099511627776", False),
    (
        "pfn wraps",
        header(Kind.PAGES, 1) + struct.pack("<Q", 0xFFFF_FFFF_FFFF_F000 | FLAG_ZERO),
        "page 4503599627370495 beyond",
        False,
    ),
    ("count 0", header(Kind.PAGES, 0), "PAGES record of 0 pages", False),
    (
        "count over",
        header(Kind.PAGES, MAX_BATCH_PAGES + 1),
        f"PAGES record of {MAX_BATCH_PAGES + 1} pages",
        False,
    ),
    ("count max", header(Kind.PAGES, 0xFFFF_FFFF), "PAGES record of 4294967295 pages", False),
    ("STATE not UTF-8", json_record(Kind.STATE, b'"\xff"'), "STATE record is not JSON", False),
    ("REPORT not JSON", json_record(Kind.REPORT, b"nul"), "REPORT record is not JSON", False),
    ("STATE empty", header(Kind.STATE, 0), "STATE record is not JSON", False),
    (
        "STATE too deep",
        json_record(Kind.STATE, b"[" * 100_000 + b"]" * 100_000),
        "STATE record is not JSON",
        False,
    ),
    (
        "STATE huge integer",
        json_record(Kind.STATE, b"9" * 5000),
        "STATE record is not JSON",
        False,
    ),
    ("STATE over", header(Kind.STATE, MAX_JSON + 1), "STATE record of 67108865 bytes", False),
    ("REPORT over", header(Kind.REPORT, 0xFFFF_FFFF), "REPORT record of 4294967295", False),
    ("ERROR over", header(Kind.ERROR, MAX_JSON + 1), "ERROR record of 67108865 bytes", False),
    ("END count", header(Kind.END, 1), "END record has count 1, not 0", False),
    ("DIGESTS short", header(Kind.DIGESTS, NPAGES - 1), "DIGESTS for 7 pages", False),
    ("DIGESTS long", header(Kind.DIGESTS, 0xFFFF_FFFF), "DIGESTS for 4294967295 pages", False),
    # Cut short: the message says inside what.
    ("at a boundary", b"", "the stream ended", True),
    ("in a header", header(Kind.PAGES, 1)[:3], "inside a record header", True),
    (
        "in the words",
        header(Kind.PAGES, 4) + words((0, FLAG_ZERO), (1, FLAG_ZERO)),
        r"inside a PAGES record's words \(16 of 32 bytes",
        True,
    ),
    (
        "in the data",
        pages_record((0, FLAG_PAGE), (3, FLAG_ZERO), (5, FLAG_PAGE), data=bytes(PAGE + 100)),
        rf"inside a PAGES record's data \({PAGE + 100} of {2 * PAGE} bytes",
        True,
    ),
    ("in a JSON body", json_record(Kind.STATE, b"[1, 2, 3]")[:-2], "inside a STATE record", True),
    ("in an ERROR", json_record(Kind.ERROR, b"gone")[:-1], "inside a ERROR record", True),
    (
        "in the digests",
        header(Kind.DIGESTS, NPAGES) + bytes(8 * NPAGES - 1),
        "inside a DIGESTS record",
        True,
    ),
]


@pytest.mark.parametrize(
    "raw, message, close", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_a_malformed_record_is_refused_saying_what_was_wrong(
    raw: bytes, message: str, close: bool
) -> None:
    with fed(HELLO + raw, close=close) as reader:
        assert reader.read().kind is Kind.HELLO
        with pytest.raises(StreamError, match=message):
            reader.read()


@pytest.mark.parametrize(
    "value, message",
    [
        ([1], "not version 1"),
        ("hello", "not version 1"),
        (hello(version=0), "not version 1"),
        (hello(version=2), "not version 1"),
        (hello(version="1"), "not version 1"),
        (hello(version=True), "not version 1"),
        (hello(version=1.0), "not version 1"),
        ({"page_size": PAGE, "npages": NPAGES}, "not version 1"),
        *(
            (hello(page_size=bad), "page_size")
            for bad in (0, 8, 4095, 4097, -4096, "4096", 4096.0, True, None, 1 << 17, 2**70)
        ),
        ({"version": VERSION, "npages": NPAGES}, "page_size"),
        *((hello(npages=bad), "npages") for bad in (0, -1, "8", True, 8.5, None)),
        ({"version": VERSION, "page_size": PAGE}, "npages"),
    ],
)
def test_a_hello_of_another_version_or_shape_is_refused(value: Any, message: str) -> None:
    with fed(json_record(Kind.HELLO, value), close=False) as reader:
        with pytest.raises(StreamError, match=message):
            reader.read()
        assert reader.page_size is None and reader.npages is None


@pytest.mark.parametrize(
    "raw, message",
    [
        (json_record(Kind.HELLO, b"{"), "HELLO record is not JSON"),
        (json_record(Kind.HELLO, b"\xff"), "HELLO record is not JSON"),
        (header(Kind.HELLO, MAX_JSON + 1), f"HELLO record of {MAX_JSON + 1} bytes is over"),
    ],
)
def test_a_hello_that_is_not_json_or_over_the_limit_is_refused(raw: bytes, message: str) -> None:
    with fed(raw, close=False) as reader, pytest.raises(StreamError, match=message):
        reader.read()


@pytest.mark.parametrize(
    "raw", [header(Kind.PAGES, 1) + words((0, FLAG_ZERO)), header(Kind.DIGESTS, 1) + bytes(8)]
)
def test_pages_or_digests_before_hello_are_refused(raw: bytes) -> None:
    kind = Kind(struct.unpack_from("<I", raw)[0]).name
    with fed(raw, close=False) as reader, pytest.raises(StreamError, match=f"{kind} record before"):
        reader.read()


@pytest.mark.parametrize(
    "raw",
    [
        header(Kind.PAGES, 0xFFFF_FFFF),
        header(Kind.PAGES, MAX_BATCH_PAGES + 1),
        header(Kind.STATE, 0xFFFF_FFFF),
        header(Kind.ERROR, MAX_JSON + 1),
        header(Kind.DIGESTS, 0xFFFF_FFFF),
    ],
    ids=["pages max", "pages over", "state max", "error over", "digests max"],
)
def test_a_count_over_the_limit_is_refused_before_anything_is_allocated(raw: bytes) -> None:
    # No body follows and the connection stays open: a reader that went on to read one would
    # time out instead of raising StreamError.
    with fed(HELLO + raw, close=False) as reader:
        reader.read()
        tracemalloc.start()
        try:
            with pytest.raises(StreamError):
                reader.read()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < MIB


def test_a_batch_or_digests_the_reader_cannot_hold_are_refused() -> None:
    # In the limits but 64 GiB of data (2**20 pages of 64 KiB) and 32 GiB of digests (for a
    # guest of 2**32 - 1 pages): the reader holds them or says so, and never fails with
    # another exception (MemoryError where the reservation is refused).
    page_size = 1 << 16
    big = json_record(Kind.HELLO, hello(page_size=page_size, npages=1 << 30))
    entries = np.arange(MAX_BATCH_PAGES, dtype=np.uint64) * np.uint64(page_size) | FLAG_PAGE
    raw = big + header(Kind.PAGES, MAX_BATCH_PAGES) + entries.astype("<u8").tobytes()
    with fed(raw) as reader:
        reader.read()
        with pytest.raises(StreamError, match="PAGES record's data"):
            reader.read()
    raw = json_record(Kind.HELLO, hello(npages=0xFFFF_FFFF)) + header(Kind.DIGESTS, 0xFFFF_FFFF)
    with fed(raw) as reader:
        reader.read()
        with pytest.raises(StreamError, match="DIGESTS record"):
            reader.read()


def test_an_error_record_is_returned_not_raised_even_if_not_utf8() -> None:
    with fed(json_record(Kind.ERROR, b"bad \xff byte")) as reader:
        record = reader.read()
    assert record.kind is Kind.ERROR and record.value == "bad \ufffd byte"


any_record = st.one_of(
    # Headers of every kind, with counts near the limits, and a short body of any bytes.
    st.builds(
        lambda kind, count, body: header(kind, count) + body,
        st.integers(0, 9),
        st.one_of(
            st.integers(0, 40),
            st.sampled_from(
                [MAX_BATCH_PAGES, MAX_BATCH_PAGES + 1, MAX_JSON, MAX_JSON + 1, 0xFFFF_FFFF]
            ),
        ),
        st.binary(max_size=200),
    ),
    # PAGES records with well-formed or nearly well-formed words and maybe their data.
    st.builds(
        lambda entries, data: header(Kind.PAGES, len(entries)) + words(*entries) + data,
        st.lists(
            st.tuples(st.integers(0, 12), st.sampled_from([FLAG_ZERO, FLAG_PAGE, 0, 0x0A, 1])),
            min_size=1,
            max_size=6,
        ),
        st.binary(max_size=2 * PAGE).map(lambda b: b * 3),
    ),
    # HELLO records that would pass if they came first.
    st.builds(
        lambda page_size, npages: json_record(Kind.HELLO, hello(page_size, npages)),
        st.sampled_from([16, PAGE]),
        st.integers(1, 1 << 20),
    ),
    # JSON records that parse.
    st.builds(json_record, st.sampled_from([Kind.STATE, Kind.REPORT, Kind.HELLO]), json_values),
    st.binary(max_size=64),
)


@settings(deadline=None)
@given(st.lists(any_record, max_size=8))
def test_arbitrary_bytes_give_clean_records_or_stream_error(parts: list[bytes]) -> None:
    with fed(HELLO + b"".join(parts)) as reader:
        records, error = read_all(reader)
    assert records[0].kind is Kind.HELLO
    assert str(error)
    for record in records[1:]:
        assert isinstance(record.kind, Kind) and record.kind is not Kind.HELLO
        if record.kind is Kind.PAGES:
            batch = record.batch
            assert batch is not None and 1 <= len(batch.pfns) <= MAX_BATCH_PAGES
            assert int(batch.pfns.min()) >= 0 and int(batch.pfns.max()) < NPAGES
            normal = len(batch.pfns) - int(batch.zero.sum())
            assert batch.data.shape == (normal, PAGE)
        elif record.kind is Kind.DIGESTS:
            assert record.digests is not None and len(record.digests) == NPAGES
        elif record.kind is Kind.END:
            assert record.value is None


# -- page digests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [4096, 16384])
def test_equal_pages_digest_equal_and_different_pages_not(page_size: int) -> None:
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 256, size=(6, page_size), dtype=np.uint8)
    pages[3] = pages[0]
    pages[4] = 0
    pages[5] = 0
    digests = page_digests(pages.reshape(-1), page_size)
    assert digests.dtype == np.uint64 and len(digests) == 6
    assert digests[0] == digests[3] and digests[4] == digests[5]
    assert len(set(digests[[0, 1, 2, 4]].tolist())) == 4
    # The same on both ends: what went over the stream digests as what was sent.
    assert page_digests(pages.copy().reshape(-1), page_size).tolist() == digests.tolist()


@settings(deadline=None)
@given(
    page_size=st.sampled_from([4096, 16384]),
    page=st.integers(0, 4),
    word=st.integers(0, 16384 // 8 - 1),
    value=st.integers(0, 2**64 - 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_changing_one_word_changes_that_pages_digest_and_no_other(
    page_size: int, page: int, word: int, value: int, seed: int
) -> None:
    word %= page_size // 8
    ram = np.random.default_rng(seed).integers(0, 256, size=5 * page_size, dtype=np.uint8)
    before = page_digests(ram, page_size)
    words64 = ram.view("<u8")
    at = page * (page_size // 8) + word
    if int(words64[at]) == value:
        value ^= 1 << (value % 64)
    words64[at] = value
    after = page_digests(ram, page_size)
    changed = np.flatnonzero(before != after).tolist()
    assert changed == [page]


@pytest.mark.parametrize(
    "nbytes, page_size", [(PAGE + 8, PAGE), (PAGE - 8, PAGE), (3 * PAGE, 12), (40, 24)]
)
def test_digests_refuse_a_buffer_that_is_not_whole_pages(nbytes: int, page_size: int) -> None:
    with pytest.raises(ValueError, match="whole pages"):
        page_digests(np.zeros(nbytes, dtype=np.uint8), page_size)
