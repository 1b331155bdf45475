//! `pagehint.MemoryMap` and `apply_hints`: guest RAM layout and hint application.

use numpy::{PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pagehint_core::MemoryMap;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::args::{Int, Pfn};
use crate::bitmap::PyDirtyBitmap;
use crate::errors::{bitmap_err, map_err, not_ram_err, past_map_err};
use crate::results::{PyHintResult, ranges_array};

/// Guest RAM regions `(gpa, size)`, numbered into consecutive bitmap pages in the order given.
#[derive(Debug)]
#[pyclass(name = "MemoryMap", module = "pagehint._core", frozen)]
pub struct PyMemoryMap {
    pub(crate) map: MemoryMap,
}

impl PyMemoryMap {
    const fn wrap(map: MemoryMap) -> Self {
        Self { map }
    }
}

#[pymethods]
impl PyMemoryMap {
    #[new]
    #[pyo3(signature = (regions, page_size = Int(4096)), text_signature = "(regions, page_size=4096)")]
    fn new(regions: Vec<(Int, Int)>, page_size: Int) -> PyResult<Self> {
        let regions = regions
            .iter()
            .enumerate()
            .map(|(i, &(gpa, size))| {
                Ok((
                    gpa.u64(&format!("regions[{i}] gpa"))?,
                    size.u64(&format!("regions[{i}] size"))?,
                ))
            })
            .collect::<PyResult<Vec<_>>>()?;
        MemoryMap::new(&regions, page_size.u64("page_size")?)
            .map(Self::wrap)
            .map_err(map_err)
    }

    /// The PC layout: `below_4g` bytes of RAM from address 0 and the rest from 4 GiB, as QEMU
    /// splits RAM around the PCI hole (q35 puts 2 GiB below 4 GiB once RAM reaches 2.75 GiB,
    /// pc 3 GiB once it reaches 3.5 GiB).
    #[staticmethod]
    #[pyo3(
        signature = (ram_bytes, *, below_4g = Int(2_147_483_648), page_size = Int(4096)),
        text_signature = "(ram_bytes, *, below_4g=2147483648, page_size=4096)"
    )]
    fn x86(ram_bytes: Int, below_4g: Int, page_size: Int) -> PyResult<Self> {
        MemoryMap::x86(
            ram_bytes.u64("ram_bytes")?,
            below_4g.u64("below_4g")?,
            page_size.u64("page_size")?,
        )
        .map(Self::wrap)
        .map_err(map_err)
    }

    /// Pages of RAM (the bitmap a migration of this guest needs).
    #[getter]
    fn npages(&self) -> u64 {
        self.map.npages()
    }

    /// Bytes per page.
    #[getter]
    fn page_size(&self) -> u64 {
        self.map.page_size()
    }

    /// Bytes of RAM: the size of a buffer holding it.
    #[getter]
    fn ram_bytes(&self) -> u64 {
        self.map.ram_bytes()
    }

    /// The regions as `(gpa, size)`, in bitmap order.
    #[getter]
    fn regions(&self) -> Vec<(u64, u64)> {
        self.map.regions().iter().map(|r| (r.gpa, r.size)).collect()
    }

    /// The bitmap page of a guest-physical address; `ValueError` for an address in a hole
    /// (or a negative one).
    fn pfn_of(&self, gpa: Int) -> PyResult<u64> {
        let gpa = gpa.u64("gpa")?;
        self.map.pfn_of(gpa).ok_or_else(|| not_ram_err(gpa))
    }

    /// The guest-physical address of a bitmap page; `IndexError` past the last page.
    fn gpa_of(&self, pfn: Pfn) -> PyResult<u64> {
        self.map
            .gpa_of(pfn.0)
            .ok_or_else(|| past_map_err(pfn.0, self.map.npages()))
    }

    fn __len__(&self) -> usize {
        self.map.regions().len()
    }

    fn __repr__(&self) -> String {
        let regions: Vec<String> = self
            .map
            .regions()
            .iter()
            .map(|r| format!("({:#x}, {:#x})", r.gpa, r.size))
            .collect();
        format!(
            "MemoryMap([{}], page_size={})",
            regions.join(", "),
            self.map.page_size()
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<Self>().is_ok_and(|o| o.get().map == self.map)
    }

    /// `copy.copy`: an equal map.
    fn __copy__(&self) -> Self {
        Self::wrap(self.map.clone())
    }

    /// `copy.deepcopy`: an equal map (a map holds no Python objects).
    fn __deepcopy__(&self, _memo: &Bound<'_, PyAny>) -> Self {
        Self::wrap(self.map.clone())
    }

    /// Pickling: `(MemoryMap, (regions, page_size))`.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let map = &slf.get().map;
        let regions: Vec<(u64, u64)> = map.regions().iter().map(|r| (r.gpa, r.size)).collect();
        (slf.get_type(), (regions, map.page_size())).into_pyobject(slf.py())
    }
}

/// Clears the pages that `(gpa, len)` hints fully cover, in one pass with the GIL released.
///
/// `hints` is a C-contiguous `uint64` array of shape `(N, 2)`. A hint's start is rounded up and
/// its end down to page boundaries; a hint of zero length, one whose end wraps past 2**64, or
/// one touching any byte outside RAM is rejected whole and counted by reason in `rejected`
/// (`zero_length`, `overflow`, `outside_ram`). With `record=True` the result's `ranges` holds
/// the `(pfn, pages)` ranges cleared, in order. Raises `ValueError` if the bitmap has fewer
/// pages than the map, `TypeError`/`ValueError` for a malformed array.
#[pyfunction]
#[pyo3(signature = (bitmap, memmap, hints, *, record = false))]
pub fn apply_hints(
    py: Python<'_>,
    bitmap: &Bound<'_, PyDirtyBitmap>,
    memmap: &Bound<'_, PyMemoryMap>,
    hints: &Bound<'_, PyAny>,
    record: bool,
) -> PyResult<PyHintResult> {
    let Ok(array) = hints.cast::<PyArray2<u64>>() else {
        return Err(PyTypeError::new_err(
            "hints must be a numpy uint64 array of shape (N, 2)",
        ));
    };
    if array.shape()[1] != 2 {
        return Err(PyValueError::new_err(format!(
            "hints must have shape (N, 2), not {:?}",
            array.shape()
        )));
    }
    if !array.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "hints must be C-contiguous (numpy.ascontiguousarray)",
        ));
    }
    let ro = array
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("hints: {e}")))?;
    let flat = ro.as_slice()?;
    let (bitmap, memmap) = (bitmap.get(), memmap.get());
    let pairs = flat.chunks_exact(2).map(|h| (h[0], h[1]));
    let (out, ranges) = bitmap
        .heavy_write(py, |bm| {
            if record {
                pagehint_core::apply_hints_recording(bm, &memmap.map, pairs)
                    .map(|(out, ranges)| (out, Some(ranges)))
            } else {
                pagehint_core::apply_hints(bm, &memmap.map, pairs).map(|out| (out, None))
            }
        })
        .map_err(bitmap_err)?;
    let ranges = ranges.map(|r| ranges_array(py, r)).transpose()?;
    Ok(PyHintResult::from_outcome(&out, ranges))
}
