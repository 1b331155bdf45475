"""pagehint: free-page-hint-aware live migration.

The Rust core (``pagehint._core``) holds the dirty bitmap, the hint decoder and the virtqueue
readers; this package re-exports them. Submodules: ``pagehint.balloon`` (the virtio-balloon
free page hinting device), ``pagehint.guest`` (a Linux-faithful guest simulator),
``pagehint.migration`` (pre-copy migration) and ``pagehint.simulation`` (what
``pagehint simulate`` runs).
"""

from pagehint._core import (
    ControlElement,
    DirtyBitmap,
    Elements,
    HintDrain,
    HintResult,
    MemoryMap,
    PackedQueue,
    SplitQueue,
    __version__,
    apply_hints,
    available_simd_levels,
    simd_level,
)

__all__ = [
    "ControlElement",
    "DirtyBitmap",
    "Elements",
    "HintDrain",
    "HintResult",
    "MemoryMap",
    "PackedQueue",
    "SplitQueue",
    "__version__",
    "apply_hints",
    "available_simd_levels",
    "simd_level",
]
