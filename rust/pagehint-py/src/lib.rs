//! pagehint._core: the PyO3 bindings of pagehint-core. Thin wrappers only: argument checks,
//! error mapping (in `errors`) and GIL release; the work happens in the core crate.

mod args;
mod bench;
mod bitmap;
mod errors;
mod memmap;
mod results;
mod virtq;

use pagehint_core::{Level, kernels};
use pyo3::prelude::*;

/// The kernel level in use: "avx512", "avx2", "neon" or "scalar".
#[pyfunction]
fn simd_level() -> &'static str {
    kernels::active().level().name()
}

/// Every level this CPU can run, baseline first; each can be forced with `PAGEHINT_SIMD`.
#[pyfunction]
fn available_simd_levels() -> Vec<&'static str> {
    Level::available().into_iter().map(Level::name).collect()
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Fail the import, with the reason, when PAGEHINT_SIMD asks for what the CPU lacks.
    kernels::init_from_env().map_err(errors::simd_err)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<bitmap::PyDirtyBitmap>()?;
    m.add_class::<memmap::PyMemoryMap>()?;
    m.add_function(wrap_pyfunction!(memmap::apply_hints, m)?)?;
    m.add_class::<results::PyHintResult>()?;
    m.add_class::<results::PyHintDrain>()?;
    m.add_class::<results::PyControlElement>()?;
    m.add_class::<results::PyElements>()?;
    m.add_class::<results::PyDirtyRingHarvest>()?;
    m.add_class::<virtq::PySplitQueue>()?;
    m.add_class::<virtq::PyPackedQueue>()?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(bench::_floor_stores, m)?)?;
    Ok(())
}
