//! The one place where core errors become Python exceptions.

use pagehint_core::{BitmapError, MapError, QueueError, RingError, SimdError};
use pyo3::PyErr;
use pyo3::exceptions::{PyIndexError, PyMemoryError, PyValueError};

/// Maps a core error to the exception its contract names: a page outside the bitmap is an
/// `IndexError`, a malformed request a `ValueError`, a refused allocation, or pages to set
/// whose words the machine's memory cannot hold at once, a `MemoryError`.
pub fn bitmap_err(e: BitmapError) -> PyErr {
    match e {
        BitmapError::OutOfRange { .. } | BitmapError::LogPastEnd { .. } => {
            PyIndexError::new_err(e.to_string())
        }
        BitmapError::AllocationFailed { .. } | BitmapError::ExceedsMemory { .. } => {
            PyMemoryError::new_err(e.to_string())
        }
        BitmapError::TooLarge { .. }
        | BitmapError::BadImage { .. }
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

/// A queue that cannot be set up, broke, or was handed a bad id or index: `ValueError`.
pub fn queue_err(e: QueueError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Guest RAM refused by the core: the buffer does not hold the bytes the memory map lays out.
pub fn ram_size_err(len: usize, ram_bytes: u64) -> PyErr {
    PyValueError::new_err(format!(
        "the buffer has {len} bytes but the memory map needs {ram_bytes}"
    ))
}

/// An address the memory map does not place in RAM (`MemoryMap.pfn_of`): `ValueError`.
pub fn not_ram_err(gpa: u64) -> PyErr {
    PyValueError::new_err(format!("gpa {gpa:#x} is not guest RAM"))
}

/// A page past the memory map's last (`MemoryMap.gpa_of`): `IndexError`.
pub fn past_map_err(pfn: u64, npages: u64) -> PyErr {
    PyIndexError::new_err(format!("page {pfn} is past the map's {npages} pages"))
}

/// A dirty ring or slot table refused by the core: a slot whose pages are not inside the bitmap
/// is an `IndexError`, a malformed ring or table a `ValueError`.
pub fn ring_err(e: RingError) -> PyErr {
    match e {
        RingError::SlotPastBitmap { .. } => PyIndexError::new_err(e.to_string()),
        RingError::PartialEntry { .. }
        | RingError::Misaligned { .. }
        | RingError::NotPowerOfTwo { .. }
        | RingError::DuplicateSlot { .. } => PyValueError::new_err(e.to_string()),
    }
}
