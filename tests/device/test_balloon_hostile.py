"""The device against a hostile driver: random descriptor tables, ring indices, cmd ids and
config accesses. ``process()`` must never raise or hang, must stay within its element budget,
and must clear only pages that a device-writable descriptor fully covers, and only while the
device is in START."""

from __future__ import annotations

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers import PAGE
from pagehint import DirtyBitmap, MemoryMap
from pagehint.device import FreePageHintDevice, HintState
from pagehint.sim.driver_ring import DESC_DTYPE, VIRTQ_DESC_F_WRITE, ram_view

# RAM [0, 1 MiB) and [2 MiB, 3 MiB): a hole between, nothing after.
MEMMAP = MemoryMap([(0, 1 << 20), (2 << 20, 1 << 20)])
SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
CMD = 0x4000  # where cmd ids may point

addrs = st.one_of(
    st.sampled_from([CMD, 0x10000, 0x11000, 0x20_0000, 0x2F_F000, 0xFF000, 0x10_0000]),
    st.integers(0, 0x40_0000),
    st.integers(0, 2**64 - 1),
)
lens = st.one_of(
    st.sampled_from([0, 2, 4, PAGE, 2 * PAGE, 0x10000, 0x100001]), st.integers(0, 2**32 - 1)
)
flags = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, VIRTQ_DESC_F_WRITE])
hostile_desc = st.tuples(addrs, lens, flags, st.integers(0, SIZE + 2))
# A well-formed round (the cmd id, then 4 KiB..16 KiB hints) with any slot replaced by a
# hostile descriptor, so the device gets past the first element often enough to matter.
WELL_FORMED = [(CMD, 4, 0, 0)] + [
    (0x10000 + 0x8000 * i, PAGE * (1 + i % 4), VIRTQ_DESC_F_WRITE, 0) for i in range(SIZE - 1)
]
# A slot is replaced when its selector is 3 (hypothesis draws small numbers more often).
descs = st.lists(st.tuples(st.integers(0, 3), hostile_desc), min_size=SIZE, max_size=SIZE).map(
    lambda t: [d if sel == 3 else w for w, (sel, d) in zip(WELL_FORMED, t, strict=False)]
)


def covered(table: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Pages some device-writable descriptor of the table covers whole, inside one region."""
    ok = np.zeros(MEMMAP.npages, dtype=bool)
    for addr, length, fl, _ in table:
        if not fl & VIRTQ_DESC_F_WRITE or length == 0 or addr + length > 2**64:
            continue
        first = -(-addr // PAGE)
        last = (addr + length) // PAGE
        for region_gpa, region_size in MEMMAP.regions:
            if region_gpa <= addr and addr + length <= region_gpa + region_size:
                for p in range(first, last):
                    ok[MEMMAP.pfn_of(p * PAGE)] = True
    return ok


@settings(max_examples=300, deadline=None)
@given(
    table=descs,
    heads=st.tuples(
        st.integers(0, 3), st.lists(st.integers(0, SIZE + 3), min_size=SIZE, max_size=SIZE)
    ).map(lambda t: t[1] if t[0] == 3 else list(range(SIZE))),
    avail_idx=st.tuples(st.integers(0, 3), st.integers(0, 0xFFFF), st.integers(1, SIZE)).map(
        lambda t: t[1] if t[0] == 3 else t[2]
    ),
    cmd_word=st.sampled_from(["current", "current", "current", "stale", "stop", "random"]),
    random_id=st.integers(0, 2**32 - 1),
    budget=st.sampled_from([1 << 16, 1 << 16, 3, 1]),
    stop_first=st.sampled_from([False, False, False, True]),
)
def test_process_survives_any_ring(
    table: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    cmd_word: str,
    random_id: int,
    budget: int,
    stop_first: bool,
) -> None:
    mem = np.zeros(MEMMAP.ram_bytes, dtype=np.uint8)
    bitmap = DirtyBitmap(MEMMAP.npages, dirty=True)
    device = FreePageHintDevice(mem, MEMMAP, bitmap)
    device.negotiate(device.features)
    index = device.free_page_queue_index
    assert index is not None
    device.set_queue(index, SIZE, DESC, AVAIL, USED)
    cmd_id = device.start_hinting()
    assert cmd_id is not None
    if stop_first:
        device.stop_hinting()
    word = {"current": cmd_id, "stale": cmd_id - 1, "stop": 0, "random": random_id}[cmd_word]
    ram_view(mem, MEMMAP, CMD, 4)[:] = np.frombuffer(word.to_bytes(4, "little"), np.uint8)
    d = ram_view(mem, MEMMAP, DESC, 16 * SIZE).view(DESC_DTYPE)
    for i, (addr, length, fl, nxt) in enumerate(table):
        d[i] = (addr, length, fl, nxt & 0xFFFF)
    avail = ram_view(mem, MEMMAP, AVAIL, 6 + 2 * SIZE).view("<u2")
    avail[2 : 2 + SIZE] = heads
    avail[1] = avail_idx

    r = device.process(budget)

    # Bounded: never more elements than the budget, nor more than were made available.
    assert r.elements <= min(budget, avail_idx if avail_idx <= SIZE else budget)
    cleared = ~np.unpackbits(bitmap.words().view(np.uint8), bitorder="little")[
        : MEMMAP.npages
    ].astype(bool)
    assert r.hints.pages_cleared == int(cleared.sum())
    event("pages cleared" if cleared.any() else "nothing cleared")
    event(f"device ended in {device.state.value}")
    q = device.free_page_queue
    assert q is not None
    event("queue broken" if q.error else "queue fine")
    if stop_first or cmd_word != "current":
        # The window never opened: nothing may be cleared.
        assert not cleared.any()
        assert device.state is not HintState.START
    assert not np.any(cleared & ~covered(table)), "a page no writable buffer covered was cleared"
    # A second call finds nothing new, or the queue/device reports why it stopped.
    again = device.process(budget)
    assert again.elements <= budget
