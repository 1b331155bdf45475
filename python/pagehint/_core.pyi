"""Type stubs for the Rust extension module ``pagehint._core``."""

from collections.abc import Sequence
from typing import ClassVar, TypeAlias, final

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer, disjoint_base

__all__ = [
    "ControlElement",
    "DirtyBitmap",
    "DirtyRingHarvest",
    "Elements",
    "HintDrain",
    "HintResult",
    "MemoryMap",
    "PackedQueue",
    "SplitQueue",
    "__version__",
    "_floor_stores",
    "apply_hints",
    "available_simd_levels",
    "simd_level",
]

__version__: str

_U64Array: TypeAlias = npt.NDArray[np.uint64]
_Slots: TypeAlias = Sequence[tuple[int, int, int]] | npt.NDArray[np.uint64]

def simd_level() -> str:
    """The kernel level in use: "avx512", "avx2", "neon" or "scalar"."""

def available_simd_levels() -> list[str]:
    """Every level this CPU can run, baseline first."""

def _floor_stores(
    words: npt.NDArray[np.uint64], starts: npt.NDArray[np.uint64], counts: npt.NDArray[np.uint64]
) -> None:
    """Benchmarks only, not API: two plain stores of zero per range into ``words``, at the words
    of its first and last page, in the order given (the "floor" row of B1)."""

@final
class DirtyBitmap:
    """A dirty bitmap over guest pages ``[0, npages)`` in the KVM dirty-log word layout.

    Bit ``i`` of little-endian ``uint64`` word ``j`` is page ``64*j + i``. Safe to share
    between threads; O(n) methods release the GIL.
    """

    def __new__(cls, npages: int, *, dirty: bool = False) -> DirtyBitmap: ...
    @property
    def npages(self) -> int:
        """Pages covered."""
    @property
    def nbytes(self) -> int:
        """Bytes of bitmap words (8 per 64 pages)."""
    def __len__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def copy(self) -> DirtyBitmap:
        """A copy of the bitmap."""
    def __copy__(self) -> DirtyBitmap:
        """``copy.copy``: a copy, as ``copy()``."""
    def __deepcopy__(self, _memo: dict[int, object]) -> DirtyBitmap:
        """``copy.deepcopy``: a copy, as ``copy()``."""
    def __reduce__(self) -> tuple[type[DirtyBitmap], tuple[int], tuple[int, bytes, bytes]]:
        """Pickling: the type, ``(npages,)`` and the non-zero 4 KiB chunks of words as
        ``(512, chunk indices, words)`` (little-endian u64 bytes)."""
    def __setstate__(self, state: tuple[int, bytes, bytes], /) -> None:
        """Unpickling: replaces the contents with a ``__reduce__`` state; ``TypeError`` or
        ``ValueError`` for one that does not fit, changing nothing."""
    def set_range(self, start: int, n: int) -> int:
        """Sets pages ``[start, start + n)``; returns how many were newly set."""
    def clear_range(self, start: int, n: int) -> int:
        """Clears pages ``[start, start + n)``; returns how many were set."""
    def count(self, start: int = ..., n: int | None = None) -> int:
        """Dirty pages in ``[start, start + n)`` (to the end when ``n`` is None)."""
    def test(self, pfn: int) -> bool:
        """Whether page ``pfn`` is dirty."""
    def test_and_clear(self, pfn: int) -> bool:
        """Clears page ``pfn``; returns whether it was dirty."""
    def set_all(self) -> None:
        """Marks every page dirty; ``MemoryError`` when the words are more than the machine's
        memory (RAM + swap)."""
    def clear_all(self) -> None:
        """Marks every page clean."""
    def set_ranges(self, starts: _U64Array, counts: _U64Array) -> int:
        """Sets ``[starts[i], starts[i] + counts[i])`` for every i; returns pages newly set."""
    def clear_ranges(self, starts: _U64Array, counts: _U64Array) -> int:
        """Clears ``[starts[i], starts[i] + counts[i])`` for every i; returns the pages that
        were set."""
    def merge_log(self, log: _U64Array, page_offset: int = ...) -> int:
        """ORs a KVM-layout dirty log in at ``page_offset``; returns pages newly dirty."""
    def harvest_dirty_ring(
        self, ring: Buffer | npt.NDArray[np.generic], fetch_index: int, slots: _Slots
    ) -> DirtyRingHarvest:
        """Collects one vCPU's KVM dirty ring into the bitmap, with the GIL released.

        ``ring`` is the ring's writable memory (the vCPU fd's ``mmap`` at page 64, or a
        ``bytearray``/numpy array standing in for it): ``16 * 2**k`` bytes of ``kvm_dirty_gfn``
        entries, 8-byte aligned. ``slots`` maps memslot ids of address space 0 to bitmap pages as
        ``(slot_id, first_page, npages)`` rows. From ``fetch_index`` on, every DIRTY entry is
        read (load-acquire), applied and marked RESET (store-release), up to the first entry
        that is not (or one lap); entries of another address space, an unknown slot or an offset
        past the slot are collected, not applied, and counted in ``rejected``. The result's
        ``fetch_index`` is where the next harvest starts. ``TypeError``/``ValueError`` for a bad
        buffer or table, ``IndexError`` for a slot past the bitmap; then nothing changes.
        """
    def next_dirty(self, start: int = ...) -> int | None:
        """The first dirty page at or after ``start``, or None."""
    def take_dirty(self, max_pages: int, start: int = ...) -> _U64Array:
        """Test-and-clears up to ``max_pages`` dirty pages at or after ``start``, ascending."""
    def take_dirty_runs(self, max_pages: int, start: int = ...) -> tuple[_U64Array, _U64Array]:
        """Test-and-clears up to ``max_pages`` dirty pages at or after ``start``, as
        ``take_dirty``; returns them as runs (starts, lengths), ascending."""
    def dirty_runs(self, start: int = ..., n: int | None = None) -> tuple[_U64Array, _U64Array]:
        """Runs of dirty pages in ``[start, start + n)``: (starts, lengths)."""
    def words(self) -> _U64Array:
        """A read-only zero-copy view of the words (live: it shows later changes)."""
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class MemoryMap:
    """Guest RAM regions ``(gpa, size)``, numbered into consecutive bitmap pages in order."""

    def __new__(cls, regions: list[tuple[int, int]], page_size: int = 4096) -> MemoryMap: ...
    @staticmethod
    def x86(ram_bytes: int, *, below_4g: int = 2147483648, page_size: int = 4096) -> MemoryMap:
        """RAM from 0 up to ``below_4g``, the rest from 4 GiB (QEMU's PC layout)."""
    @property
    def npages(self) -> int:
        """Pages of RAM."""
    @property
    def page_size(self) -> int:
        """Bytes per page."""
    @property
    def ram_bytes(self) -> int:
        """Bytes of RAM."""
    @property
    def regions(self) -> list[tuple[int, int]]:
        """The regions as ``(gpa, size)``, in bitmap order."""
    def pfn_of(self, gpa: int) -> int:
        """The bitmap page of a guest-physical address (ValueError in a hole, or negative)."""
    def gpa_of(self, pfn: int) -> int:
        """The guest-physical address of a bitmap page (IndexError past the end)."""
    def __len__(self) -> int: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __copy__(self) -> MemoryMap:
        """``copy.copy``: an equal map."""
    def __deepcopy__(self, _memo: dict[int, object]) -> MemoryMap:
        """``copy.deepcopy``: an equal map."""
    def __reduce__(self) -> tuple[type[MemoryMap], tuple[list[tuple[int, int]], int]]:
        """Pickling: ``(MemoryMap, (regions, page_size))``."""
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

def apply_hints(
    bitmap: DirtyBitmap,
    memmap: MemoryMap,
    hints: npt.NDArray[np.uint64],
    *,
    record: bool = False,
) -> HintResult:
    """Clears the pages that ``(gpa, len)`` hints fully cover, in one pass with the GIL released.

    ``hints`` is a C-contiguous ``uint64`` array of shape ``(N, 2)``. A hint's start is rounded
    up and its end down to page boundaries; a hint of zero length, one whose end wraps past
    2**64, or one touching any byte outside RAM is rejected whole and counted by reason in
    ``rejected`` (``zero_length``, ``overflow``, ``outside_ram``). With ``record=True`` the
    result's ``ranges`` holds the ``(pfn, pages)`` ranges cleared. Raises ``ValueError`` if the
    bitmap has fewer pages than the map, ``TypeError``/``ValueError`` for a malformed array.
    """

@final
class HintResult:
    """What one batch of hints did.

    ``pages_cleared`` is the drop in dirty pages (QEMU's ``migration_dirty_pages -=`` for the
    batch); ``pages_hinted`` counts pages fully covered by accepted hints, twice if hinted twice.
    """

    def __new__(
        cls,
        hints: int,
        pages_hinted: int,
        pages_cleared: int,
        rejected: dict[str, int] | None = None,
        ranges: _U64Array | None = None,
    ) -> HintResult: ...
    @property
    def hints(self) -> int:
        """Hints seen."""
    @property
    def pages_hinted(self) -> int:
        """Pages fully covered by accepted hints."""
    @property
    def pages_cleared(self) -> int:
        """Pages that were dirty and are now clear."""
    @property
    def rejected(self) -> dict[str, int]:
        """Rejected hints by reason."""
    @property
    def rejected_total(self) -> int:
        """Hints rejected for any reason."""
    @property
    def ranges(self) -> _U64Array | None:
        """With ``record=True``: the ``(pfn, pages)`` ranges cleared, shape ``(N, 2)``."""
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class DirtyRingHarvest:
    """What one ``DirtyBitmap.harvest_dirty_ring`` call did."""

    def __new__(
        cls,
        entries: int,
        pages_dirtied: int,
        fetch_index: int,
        rejected: dict[str, int] | None = None,
    ) -> DirtyRingHarvest: ...
    @property
    def entries(self) -> int:
        """Entries collected (marked RESET), rejected ones included."""
    @property
    def pages_dirtied(self) -> int:
        """Pages that were clean and are now dirty."""
    @property
    def fetch_index(self) -> int:
        """Where the next harvest of this ring starts."""
    @property
    def rejected(self) -> dict[str, int]:
        """Entries collected but not applied, by reason (``unknown_slot``, ``address_space``,
        ``offset_past_slot``)."""
    @property
    def rejected_total(self) -> int:
        """Entries rejected for any reason."""
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class ControlElement:
    """An element with a device-readable buffer (a cmd id), popped but not yet used."""

    def __new__(
        cls, head: int, cmd_id: int | None, hints: list[tuple[int, int]]
    ) -> ControlElement: ...
    @property
    def head(self) -> int:
        """Its id, for ``add_used``."""
    @property
    def cmd_id(self) -> int | None:
        """The first 4 out-buffer bytes (little endian), or None if there are fewer."""
    @property
    def hints(self) -> list[tuple[int, int]]:
        """Its device-writable buffers as ``(gpa, len)``."""
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

@final
class HintDrain:
    """What one ``drain_hints`` call did."""

    def __new__(
        cls,
        result: HintResult,
        elements: int,
        control: ControlElement | None,
        limited: bool = False,
        ranges: _U64Array | None = None,
    ) -> HintDrain: ...
    @property
    def result(self) -> HintResult:
        """The hints applied."""
    @property
    def elements(self) -> int:
        """Hint elements returned used."""
    @property
    def control(self) -> ControlElement | None:
        """The element with a cmd id that stopped the drain, not used yet."""
    @property
    def limited(self) -> bool:
        """Whether the element budget ran out first (more may be available)."""
    @property
    def ranges(self) -> _U64Array | None:
        """With ``record=True``: the ``(pfn, pages)`` ranges cleared, shape ``(N, 2)``."""
    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

_Buffers: TypeAlias = tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64], npt.NDArray[np.uint32]]

@final
class Elements:
    """Elements popped from a queue, as parallel arrays (no Python object per element)."""

    def __new__(
        cls,
        heads: npt.NDArray[np.uint16],
        desc_element: npt.NDArray[np.uint32],
        desc_addr: npt.NDArray[np.uint64],
        desc_len: npt.NDArray[np.uint32],
        desc_writable: npt.NDArray[np.bool_],
    ) -> Elements: ...
    @property
    def heads(self) -> npt.NDArray[np.uint16]:
        """Element ids."""
    @property
    def desc_element(self) -> npt.NDArray[np.uint32]:
        """Per descriptor: the index of its element in ``heads``."""
    @property
    def desc_addr(self) -> npt.NDArray[np.uint64]:
        """Per descriptor: guest-physical address."""
    @property
    def desc_len(self) -> npt.NDArray[np.uint32]:
        """Per descriptor: bytes."""
    @property
    def desc_writable(self) -> npt.NDArray[np.bool_]:
        """Per descriptor: whether it is device-writable."""
    def __len__(self) -> int: ...
    def buffers(self, i: int) -> list[tuple[int, int, bool]]:
        """Element ``i``'s descriptors as ``(addr, len, writable)``."""
    def out_buffers(self) -> _Buffers:
        """Device-readable buffers: ``(element, addr, len)``."""
    def in_buffers(self) -> _Buffers:
        """Device-writable buffers: ``(element, addr, len)``."""

class _Queue:
    """What both queue layouts share (not a runtime class)."""

    @property
    def size(self) -> int:
        """Queue size."""
    @property
    def error(self) -> str | None:
        """Why the queue stopped, or None."""
    @property
    def rejected(self) -> dict[str, int]:
        """Rejected elements so far, by reason."""
    def pop(self, max_elements: int = 65536) -> Elements:
        """Takes up to ``max_elements`` available elements (GIL released)."""
    def pop_batch(
        self, max_elements: int
    ) -> tuple[
        npt.NDArray[np.uint16],
        npt.NDArray[np.uint32],
        npt.NDArray[np.uint64],
        npt.NDArray[np.uint32],
        npt.NDArray[np.bool_],
    ]:
        """``pop`` as a tuple of its arrays."""
    def add_used(self, heads: Sequence[int], lens: Sequence[int]) -> None:
        """Returns elements to the driver: ``heads[i]`` with ``lens[i]`` bytes written. The
        batch is checked whole first: a head not in flight (or given more often than it is)
        is a ``ValueError`` and nothing is returned."""
    def drain_hints(
        self, bitmap: DirtyBitmap | None, max_elements: int = 65536, *, record: bool = False
    ) -> HintDrain:
        """Applies hint elements until empty, the limit, or a control element."""
    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt now."""

@disjoint_base
class SplitQueue(_Queue):
    """A split virtqueue (virtio 1.2 §2.7) in guest RAM held by a writable buffer, which the
    queue keeps from being resized, closed or freed while it lives."""

    def __new__(
        cls,
        mem: Buffer | npt.NDArray[np.uint8],
        memmap: MemoryMap,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool = False,
    ) -> SplitQueue: ...
    @property
    def last_avail(self) -> int:
        """Next available-ring index the device reads."""
    @property
    def next_used(self) -> int:
        """Next used-ring index the device writes."""
    def set_indices(self, last_avail: int, next_used: int) -> None:
        """Resumes at the given indices; the ``last_avail - next_used`` elements then in flight
        may be returned by any heads (the reader cannot know them)."""

@disjoint_base
class PackedQueue(_Queue):
    """A packed virtqueue (virtio 1.2 §2.8) in guest RAM held by a writable buffer, which the
    queue keeps from being resized, closed or freed while it lives."""

    def __new__(
        cls,
        mem: Buffer | npt.NDArray[np.uint8],
        memmap: MemoryMap,
        size: int,
        desc_gpa: int,
        driver_event_gpa: int,
        device_event_gpa: int,
        *,
        event_idx: bool = False,
    ) -> PackedQueue: ...
    @property
    def next_avail(self) -> tuple[int, bool]:
        """Next ring slot the device reads, and the wrap counter expected there."""
    @property
    def next_used(self) -> tuple[int, bool]:
        """Next ring slot the device writes used, and its wrap counter."""
    def set_indices(
        self, next_avail: int, avail_wrap: bool, next_used: int, used_wrap: bool
    ) -> None:
        """Resumes at the given slots and wrap counters, with nothing in flight."""
