//! The one place where core errors become Python exceptions.

use pagehint_core::{BitmapError, MapError, SimdError};
use pyo3::PyErr;
use pyo3::exceptions::{PyIndexError, PyMemoryError, PyValueError};

/// Maps a core error to the exception its contract names: a page outside the bitmap is an
/// `IndexError`, a malformed request a `ValueError`, a refused allocation a `MemoryError`.
pub fn bitmap_err(e: BitmapError) -> PyErr {
    match e {
        BitmapError::OutOfRange { .. } | BitmapError::LogPastEnd { .. } => {
            PyIndexError::new_err(e.to_string())
        }
        BitmapError::AllocationFailed { .. } => PyMemoryError::new_err(e.to_string()),
        BitmapError::TooLarge { .. }
        | BitmapError::LengthMismatch { .. }
        | BitmapError::MisalignedOffset { .. }
        | BitmapError::MapLargerThanBitmap { .. } => PyValueError::new_err(e.to_string()),
    }
}

/// A bad `PAGEHINT_SIMD` request.
pub fn simd_err(e: SimdError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A memory map that cannot be built.
pub fn map_err(e: MapError) -> PyErr {
    PyValueError::new_err(e.to_string())
}
