"""pagehint: free-page-hint-aware live migration.

The Rust core (``pagehint._core``) holds the dirty bitmap; this package re-exports it.
"""

from pagehint._core import DirtyBitmap, __version__, available_simd_levels, simd_level

__all__ = ["DirtyBitmap", "__version__", "available_simd_levels", "simd_level"]
