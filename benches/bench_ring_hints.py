"""B6: the same 262,144 shuffled 4 MiB hints as B5 (1 TiB x86 guest, 2^28 pages), this time read
from a real split ring of size 1024 in guest RAM, batch by batch as the guest refills it: the
guest writes 1024 descriptors (one device-writable 4 MiB buffer each) and bumps the avail
index, the device drains the ring into the bitmap and returns the elements used.

Guest RAM is a 1 TiB anonymous ``MAP_NORESERVE`` mapping (only the ring pages are ever touched),
as a VMM maps it. Rows, each from an all-dirty bitmap and with the same guest refills:

- pagehint ``SplitQueue.drain_hints(bitmap)`` per batch (decode, check, apply, used ring);
- floor: pagehint ``apply_hints`` of each batch's 1024 hints as the guest refills, no ring:
  what the ring path must do at least, so the row over this is the ring's own cost (B5 applies
  all 262,144 at once, which lets it sweep the bitmap in address order; 1024 hints spread over
  2^28 pages are too sparse for that, so each costs about one cache miss);
- numpy: a vectorised device on the same ring (avail ring -> heads -> descriptor table ->
  writable 4 MiB buffers -> gpa -> pfn -> block-mask clear -> used ring), the Python baseline;
- guest alone: the 256 refills with no device, to show what both ring rows include.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
import pytest

from benches.bench_apply_hints import MEMMAP, NBLOCKS, _hints, numpy_decode
from benches.benchutil import (
    ALL_ONES,
    GUEST_PAGES,
    HINT_PAGES,
    WORD_BITS,
    Bench,
    Peer,
    Settings,
    U64Array,
    check_then_measure,
)
from pagehint import DirtyBitmap, SplitQueue, apply_hints

QSIZE = 1024
DESC_GPA, AVAIL_GPA, USED_GPA = 0x100000, 0x110000, 0x111000
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; Python < 3.13 lacks it
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
VIRTQ_DESC_F_WRITE = 2
BLOCK_WORDS = HINT_PAGES // WORD_BITS


class Guest:
    """Guest RAM with the ring, and the driver's side: refill the ring one batch at a time."""

    def __init__(self, hints: U64Array) -> None:
        self.ram = mmap.mmap(
            -1, MEMMAP.ram_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        )
        self.mem = np.frombuffer(self.ram, dtype=np.uint8)
        batches = hints.reshape(-1, QSIZE, 2)
        self.tables = np.zeros(batches.shape[:2], dtype=DESC_DTYPE)
        self.tables["addr"] = batches[:, :, 0]
        self.tables["len"] = batches[:, :, 1]
        self.tables["flags"] = VIRTQ_DESC_F_WRITE
        self.desc = self.mem[DESC_GPA : DESC_GPA + 16 * QSIZE].view(DESC_DTYPE)
        # A refill copies the table as words: numpy assigns a structured array field by
        # field, ~40 us a batch here, which would make the guest the bulk of both ring rows.
        self.desc_words = self.desc.view(np.uint64)
        self.table_words = self.tables.view(np.uint64)
        self.avail_idx = self.mem[AVAIL_GPA + 2 : AVAIL_GPA + 4].view(np.uint16)
        self.avail_ring = self.mem[AVAIL_GPA + 4 : AVAIL_GPA + 4 + 2 * QSIZE].view(np.uint16)
        self.avail_ring[:] = np.arange(QSIZE, dtype=np.uint16)  # element i uses descriptor i
        self.used_idx = self.mem[USED_GPA + 2 : USED_GPA + 4].view(np.uint16)
        self.used_ring = self.mem[USED_GPA + 4 : USED_GPA + 4 + 8 * QSIZE].view(np.uint32)

    def refill(self, k: int) -> None:
        self.desc_words[:] = self.table_words[k]
        self.avail_idx[0] = (int(self.avail_idx[0]) + QSIZE) % 65536

    def rounds(self, device: Callable[[], int]) -> int:
        """Every batch: refill, then let the device drain. Returns the pages cleared."""
        cleared = 0
        for k in range(self.tables.shape[0]):
            self.refill(k)
            cleared += device()
        return cleared


def numpy_device(guest: Guest, blocks_view: U64Array, state: dict[str, int]) -> int:
    """The numpy baseline of one drain: everything the Rust reader does, vectorised."""
    avail = int(guest.avail_idx[0])
    n = (avail - state["last_avail"]) % 65536
    slots = (state["last_avail"] + np.arange(n)) % QSIZE
    heads = guest.avail_ring[slots]
    d = guest.desc[heads]
    ok = (heads < QSIZE) & (d["flags"] == VIRTQ_DESC_F_WRITE) & (d["len"] > 0)
    hints = np.stack([d["addr"][ok], d["len"][ok].astype(np.uint64)], axis=1)
    first, _ = numpy_decode(hints)
    mask = np.zeros(NBLOCKS, dtype=np.bool_)
    mask[(first >> np.uint64(10)).astype(np.intp)] = True
    cleared = int(np.bitwise_count(blocks_view[mask]).sum())
    blocks_view[mask] = 0
    used_slots = (state["next_used"] + np.arange(n)) % QSIZE
    guest.used_ring[2 * used_slots] = heads
    guest.used_ring[2 * used_slots + 1] = 0
    state["last_avail"] = avail
    state["next_used"] = (state["next_used"] + n) % 65536
    guest.used_idx[0] = np.uint16(state["next_used"])
    return cleared


@pytest.fixture(scope="module")
def case() -> tuple[U64Array, U64Array, U64Array]:
    return _hints(seed=21)


def _peer(impl: str, hints: U64Array) -> Peer:
    guest = Guest(hints)
    if impl == "apply-hints-batches":
        bm_floor = DirtyBitmap(GUEST_PAGES, dirty=True)
        batches = hints.reshape(-1, QSIZE, 2)

        def by_batch() -> int:
            each = iter(batches)
            return guest.rounds(lambda: apply_hints(bm_floor, MEMMAP, next(each)).pages_cleared)

        return Peer(
            "floor: guest refills + `apply_hints` of each batch's 1024 hints, no ring",
            by_batch,
            bm_floor.set_all,
            bm_floor.words,
            role="floor",
        )
    if impl == "pagehint":
        bm = DirtyBitmap(GUEST_PAGES, dirty=True)
        q = SplitQueue(guest.mem, MEMMAP, QSIZE, DESC_GPA, AVAIL_GPA, USED_GPA)

        def drain() -> int:
            r = q.drain_hints(bm, QSIZE)
            assert r.control is None and r.elements == QSIZE
            return r.result.pages_cleared

        return Peer(
            "pagehint: guest refills + `SplitQueue.drain_hints` per 1024-element batch",
            lambda: guest.rounds(drain),
            bm.set_all,
            bm.words,
            role="pagehint",
        )
    w = np.full(GUEST_PAGES // WORD_BITS, ALL_ONES, dtype=np.uint64)
    if impl == "numpy":
        state = {"last_avail": int(guest.avail_idx[0]), "next_used": int(guest.used_idx[0])}
        blocks_view = w.reshape(NBLOCKS, BLOCK_WORDS)
        return Peer(
            "numpy: guest refills + vectorised ring decode, hint decode, block-mask clear",
            lambda: guest.rounds(lambda: numpy_device(guest, blocks_view, state)),
            lambda: w.fill(ALL_ONES),
            lambda: w,
        )
    return Peer(
        "guest refills alone (included in both ring rows)",
        lambda: guest.rounds(lambda: 0),
        role="limit",
    )


@pytest.mark.benchmark(
    group="B6 ring: 262,144 4 MiB hints through a 1024-entry split ring, 1 TiB x86 guest"
)
@pytest.mark.parametrize("impl", ["pagehint", "apply-hints-batches", "numpy", "guest-only"])
def bench_ring_hints(
    benchmark: Bench, settings: Settings, case: tuple[U64Array, U64Array, U64Array], impl: str
) -> None:
    hints, starts, counts = case
    ref = DirtyBitmap(GUEST_PAGES, dirty=True)
    ref.clear_ranges(starts, counts)
    check_then_measure(
        benchmark,
        settings,
        impl=impl,
        peer=_peer(impl, hints),
        nbytes=GUEST_PAGES // 8,
        expected_result=GUEST_PAGES,
        expected_state=ref.words().copy(),
    )
