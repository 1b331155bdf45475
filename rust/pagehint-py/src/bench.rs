//! Helpers for the benchmark suite only, not part of pagehint's API (underscore names, kept
//! out of `pagehint.__all__`): rows that need a memory pattern numpy cannot express.

use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::args;

/// Benchmarks only (the "floor" row of B1): for each range `[starts[i], starts[i] + counts[i])`,
/// in the order given, two plain stores of zero into `words` (a writable 1-D C-contiguous
/// `uint64` array) at the words holding the range's first and last page. No read, no count:
/// what touching a batch's bitmap lines in its order costs at the least. Empty ranges store
/// nothing. Raises `ValueError`, writing nothing, if a range reaches past the array.
#[pyfunction]
pub fn _floor_stores(
    py: Python<'_>,
    words: &Bound<'_, PyAny>,
    starts: &Bound<'_, PyAny>,
    counts: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let Ok(array) = words.cast::<PyArray1<u64>>() else {
        return Err(PyTypeError::new_err(
            "words must be a 1-D numpy array of uint64",
        ));
    };
    let mut rw = array
        .try_readwrite()
        .map_err(|e| PyValueError::new_err(format!("words cannot be borrowed: {e}")))?;
    let words = rw.as_slice_mut()?;
    let starts = args::u64_array(starts, "starts")?;
    let counts = args::u64_array(counts, "counts")?;
    let (starts, counts) = (starts.as_slice()?, counts.as_slice()?);
    if starts.len() != counts.len() {
        return Err(PyValueError::new_err("starts and counts differ in length"));
    }
    let npages = words.len() as u64 * 64;
    for (&s, &n) in starts.iter().zip(counts) {
        if s.checked_add(n).is_none_or(|end| end > npages) {
            return Err(PyValueError::new_err(format!(
                "range [{s}, {s} + {n}) is past the array's {npages} pages"
            )));
        }
    }
    py.detach(|| {
        for (&s, &n) in starts.iter().zip(counts) {
            if n != 0 {
                // In range: checked above.
                words[word(s)] = 0;
                words[word(s + n - 1)] = 0;
            }
        }
    });
    Ok(())
}

/// Word index of a page known to be inside the array (so the index fits `usize`).
#[allow(clippy::cast_possible_truncation)]
const fn word(pfn: u64) -> usize {
    (pfn / 64) as usize
}
