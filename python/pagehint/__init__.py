"""pagehint: free-page-hint-aware live migration.

The Rust core (``pagehint._core``) holds the dirty bitmap, the hint decoder and the virtqueue
readers; this package re-exports them. Packages: ``pagehint.device`` (the virtio-balloon
device: protocol constants, free page hinting, free page reporting), ``pagehint.migration``
(the pre-copy loop, its link and clock, the QMP-named result), ``pagehint.sim`` (the simulated
world: guest, Linux driver, workloads, simulated source and link, scenarios) and
``pagehint.cli`` (the command line). ``device`` and ``migration`` never import ``sim``.
"""

from pagehint._core import (
    ControlElement,
    DirtyBitmap,
    DirtyRingHarvest,
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
    "DirtyRingHarvest",
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
