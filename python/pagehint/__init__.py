"""pagehint: free-page-hint-aware live migration.

The Rust core (``pagehint._core``) holds the dirty bitmap, the hint decoder and the virtqueue
readers; this package re-exports them. Packages: ``pagehint.device`` (the virtio-balloon
device: protocol constants, free page hinting, free page reporting), ``pagehint.migration``
(the pre-copy loop, its link and clock, the QMP-named result), ``pagehint.sim`` (the simulated
world: guest, Linux driver, workloads, simulated source and link, scenarios) and
``pagehint.cli`` (the command line). ``device`` and ``migration`` never import ``sim``.
"""

import os as _os
import sys as _sys

try:
    import pagehint._core  # noqa: F401 - fails with the reason on a bad PAGEHINT_SIMD
except ValueError as _e:
    # The command line (the ``pagehint`` script, or ``python -m pagehint``, whose argv[0] is
    # "-m" while the package is imported): one line and exit 2, as for any bad option.
    if "PAGEHINT_SIMD" in str(_e) and _os.path.basename(_sys.argv[0]) in ("pagehint", "-m"):
        print(f"pagehint: {_e}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise

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
