//! What queue drains, pops, `apply_hints` and dirty ring harvests return: frozen value classes built once from the
//! core's results. Columns are numpy arrays (no Python object per element or per range); the
//! small parts (counts, a control element) are plain attributes.

use numpy::ndarray::ArrayView1;
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pagehint_core::free_page::ControlElement;
use pagehint_core::virtq::PoppedElements;
use pagehint_core::{HarvestOutcome, HintOutcome};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// `(pfn, pages)` ranges as a `uint64` array of shape `(N, 2)`.
pub fn ranges_array(py: Python<'_>, ranges: Vec<(u64, u64)>) -> PyResult<Py<PyArray2<u64>>> {
    let rows = ranges.len();
    let flat: Vec<u64> = ranges.into_iter().flat_map(|(p, n)| [p, n]).collect();
    Ok(PyArray1::from_vec(py, flat).reshape([rows, 2])?.unbind())
}

/// Whether two optional arrays are both absent or hold equal shapes and values.
/// Counts by reason from a Python dict (the constructors' `rejected` argument).
fn rejected_counts(rejected: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(String, u64)>> {
    rejected.map_or_else(
        || Ok(Vec::new()),
        |d| {
            d.iter()
                .map(|(k, v)| Ok((k.extract::<String>()?, v.extract::<u64>()?)))
                .collect()
        },
    )
}

/// Counts by reason as a new Python dict (what `rejected` getters return).
fn rejected_dict<'py>(py: Python<'py>, counts: &[(String, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (reason, n) in counts {
        d.set_item(reason, n)?;
    }
    Ok(d)
}

/// The sum of counts by reason (cannot overflow: at most a few u64 summed in u128).
fn rejected_total(counts: &[(String, u64)]) -> u128 {
    counts.iter().map(|&(_, n)| u128::from(n)).sum()
}

fn same_ranges(
    py: Python<'_>,
    a: Option<&Py<PyArray2<u64>>>,
    b: Option<&Py<PyArray2<u64>>>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            let (a, b) = (a.bind(py), b.bind(py));
            match (a.try_readonly(), b.try_readonly()) {
                (Ok(a), Ok(b)) => a.as_array() == b.as_array(),
                _ => false,
            }
        }
        _ => false,
    }
}

/// What one batch of hints did.
///
/// `pages_cleared` is the drop in dirty pages (QEMU's `migration_dirty_pages -=` for the
/// batch); `pages_hinted` counts pages fully covered by accepted hints, twice if hinted twice;
/// `rejected` counts rejected hints by reason (`zero_length`, `overflow`, `outside_ram`).
/// `ranges`, when the hints were applied with `record=True`, holds the `(pfn, pages)` ranges
/// cleared, in order, as a `uint64` array of shape `(N, 2)`; otherwise None.
#[derive(Debug)]
#[pyclass(name = "HintResult", module = "pagehint._core", frozen)]
pub struct PyHintResult {
    /// Hints seen.
    #[pyo3(get)]
    hints: u64,
    /// Pages fully covered by accepted hints.
    #[pyo3(get)]
    pages_hinted: u64,
    /// Pages that were dirty and are now clear.
    #[pyo3(get)]
    pages_cleared: u64,
    rejected: Vec<(String, u64)>,
    ranges: Option<Py<PyArray2<u64>>>,
}

impl PyHintResult {
    /// The result of a core run, with its recorded ranges if any.
    pub fn from_outcome(out: &HintOutcome, ranges: Option<Py<PyArray2<u64>>>) -> Self {
        Self {
            hints: out.hints,
            pages_hinted: out.pages_hinted,
            pages_cleared: out.pages_cleared,
            rejected: out
                .rejected
                .by_reason()
                .iter()
                .map(|&(k, n)| (k.to_owned(), n))
                .collect(),
            ranges,
        }
    }

    fn rejected_count(&self, reason: &str) -> Option<u64> {
        self.rejected
            .iter()
            .find_map(|(k, n)| (k == reason).then_some(*n))
    }
}

#[pymethods]
impl PyHintResult {
    #[new]
    #[pyo3(signature = (hints, pages_hinted, pages_cleared, rejected = None, ranges = None))]
    fn new(
        hints: u64,
        pages_hinted: u64,
        pages_cleared: u64,
        rejected: Option<&Bound<'_, PyDict>>,
        ranges: Option<Bound<'_, PyArray2<u64>>>,
    ) -> PyResult<Self> {
        let rejected = rejected_counts(rejected)?;
        Ok(Self {
            hints,
            pages_hinted,
            pages_cleared,
            rejected,
            ranges: ranges.map(Bound::unbind),
        })
    }

    /// Rejected hints by reason (a new dict each time).
    #[getter]
    fn rejected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        rejected_dict(py, &self.rejected)
    }

    /// Hints rejected for any reason.
    #[getter]
    fn rejected_total(&self) -> u128 {
        rejected_total(&self.rejected)
    }

    /// With `record=True`: the `(pfn, pages)` ranges cleared, shape `(N, 2)`; else None.
    #[getter]
    fn ranges(&self, py: Python<'_>) -> Option<Py<PyArray2<u64>>> {
        self.ranges.as_ref().map(|r| r.clone_ref(py))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let rejected = self.rejected(py)?.repr()?;
        let ranges = match &self.ranges {
            None => String::new(),
            Some(r) => format!(", ranges={}", r.bind(py).repr()?),
        };
        Ok(format!(
            "HintResult(hints={}, pages_hinted={}, pages_cleared={}, rejected={rejected}{ranges})",
            self.hints, self.pages_hinted, self.pages_cleared
        ))
    }

    /// Equal counts, equal `rejected` (as dicts: order does not matter) and equal `ranges`.
    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> bool {
        let Ok(o) = other.cast::<Self>() else {
            return false;
        };
        let o = o.get();
        (self.hints, self.pages_hinted, self.pages_cleared)
            == (o.hints, o.pages_hinted, o.pages_cleared)
            && self.rejected.len() == o.rejected.len()
            && self
                .rejected
                .iter()
                .all(|(k, n)| o.rejected_count(k) == Some(*n))
            && same_ranges(py, self.ranges.as_ref(), o.ranges.as_ref())
    }
}

/// An element with a device-readable buffer, popped but not yet used.
///
/// For the free page queue that is a cmd id: `cmd_id` is its first 4 bytes (little endian), or
/// None when the out-buffers hold fewer than 4 bytes (QEMU puts the device in an error state
/// then). `hints` are the element's device-writable buffers as `(gpa, len)`, to apply only if
/// the device state allows. Give the element back with `add_used([head], [0])`.
#[derive(Debug)]
#[pyclass(name = "ControlElement", module = "pagehint._core", frozen)]
pub struct PyControlElement {
    /// Its id, for `add_used`.
    #[pyo3(get)]
    head: u16,
    /// The cmd id, or None if the out-buffers hold fewer than 4 bytes.
    #[pyo3(get)]
    cmd_id: Option<u32>,
    inner_hints: Vec<(u64, u32)>,
}

impl From<ControlElement> for PyControlElement {
    fn from(c: ControlElement) -> Self {
        Self {
            head: c.head,
            cmd_id: c.cmd_id,
            inner_hints: c.hints,
        }
    }
}

#[pymethods]
impl PyControlElement {
    #[new]
    fn new(head: u16, cmd_id: Option<u32>, hints: Vec<(u64, u32)>) -> Self {
        Self {
            head,
            cmd_id,
            inner_hints: hints,
        }
    }

    /// The device-writable buffers as `(gpa, len)` (a new list each time).
    #[getter]
    fn hints(&self) -> Vec<(u64, u32)> {
        self.inner_hints.clone()
    }

    fn __repr__(&self) -> String {
        let cmd_id = self
            .cmd_id
            .map_or_else(|| "None".to_owned(), |c| c.to_string());
        let hints: Vec<String> = self
            .inner_hints
            .iter()
            .map(|(a, l)| format!("({a}, {l})"))
            .collect();
        format!(
            "ControlElement(head={}, cmd_id={cmd_id}, hints=[{}])",
            self.head,
            hints.join(", ")
        )
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<Self>().is_ok_and(|o| {
            let o = o.get();
            (self.head, self.cmd_id, &self.inner_hints) == (o.head, o.cmd_id, &o.inner_hints)
        })
    }
}

/// What one `drain_hints` call did: the hints applied (`result`), how many hint elements were
/// returned used (`elements`), the control element that stopped it, if any (`control`), and
/// whether the element budget ran out first (`limited`: more may be available). With
/// `record=True`, `ranges` holds the `(pfn, pages)` ranges cleared, shape `(N, 2)` (the same
/// array as `result.ranges`); otherwise None.
#[derive(Debug)]
#[pyclass(name = "HintDrain", module = "pagehint._core", frozen)]
pub struct PyHintDrain {
    /// The hints applied.
    #[pyo3(get)]
    result: Py<PyHintResult>,
    /// Hint elements returned used.
    #[pyo3(get)]
    elements: usize,
    /// The element with a cmd id that stopped the drain, not used yet; or None.
    #[pyo3(get)]
    control: Option<Py<PyControlElement>>,
    /// Whether the element budget ran out first.
    #[pyo3(get)]
    limited: bool,
    /// With `record=True`: the `(pfn, pages)` ranges cleared, shape `(N, 2)`.
    #[pyo3(get)]
    ranges: Option<Py<PyArray2<u64>>>,
}

impl PyHintDrain {
    /// A drain's result as Python objects.
    pub fn build(
        py: Python<'_>,
        outcome: &HintOutcome,
        ranges: Option<Vec<(u64, u64)>>,
        elements: usize,
        control: Option<ControlElement>,
        limited: bool,
    ) -> PyResult<Self> {
        let ranges = ranges.map(|r| ranges_array(py, r)).transpose()?;
        let result = PyHintResult::from_outcome(outcome, ranges.as_ref().map(|r| r.clone_ref(py)));
        Ok(Self {
            result: Py::new(py, result)?,
            elements,
            control: control
                .map(|c| Py::new(py, PyControlElement::from(c)))
                .transpose()?,
            limited,
            ranges,
        })
    }
}

#[pymethods]
impl PyHintDrain {
    #[new]
    #[pyo3(signature = (result, elements, control, limited = false, ranges = None))]
    fn new(
        result: Py<PyHintResult>,
        elements: usize,
        control: Option<Py<PyControlElement>>,
        limited: bool,
        ranges: Option<Py<PyArray2<u64>>>,
    ) -> Self {
        Self {
            result,
            elements,
            control,
            limited,
            ranges,
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let control = match &self.control {
            None => "None".to_owned(),
            Some(c) => c.bind(py).repr()?.to_string(),
        };
        let ranges = match &self.ranges {
            None => "None".to_owned(),
            Some(r) => r.bind(py).repr()?.to_string(),
        };
        Ok(format!(
            "HintDrain(result={}, elements={}, control={control}, limited={}, ranges={ranges})",
            self.result.bind(py).repr()?,
            self.elements,
            if self.limited { "True" } else { "False" },
        ))
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<bool> {
        let Ok(o) = other.cast::<Self>() else {
            return Ok(false);
        };
        let o = o.get();
        let control = match (&self.control, &o.control) {
            (None, None) => true,
            (Some(a), Some(b)) => a.get().__eq__(b.bind(py).as_any()),
            _ => false,
        };
        Ok(self.elements == o.elements
            && self.limited == o.limited
            && control
            && self.result.get().__eq__(py, o.result.bind(py).as_any())
            && same_ranges(py, self.ranges.as_ref(), o.ranges.as_ref()))
    }
}

/// Elements popped from a queue, as parallel arrays (no Python object per element).
///
/// `heads[i]` is element `i`'s id (what `add_used` takes back). Descriptor `j` belongs to
/// element `desc_element[j]`; descriptors are in chain order, device-readable (out) buffers
/// before device-writable (in) ones.
#[derive(Debug)]
#[pyclass(name = "Elements", module = "pagehint._core", frozen)]
pub struct PyElements {
    /// Element ids (`uint16`).
    #[pyo3(get)]
    heads: Py<PyArray1<u16>>,
    /// Per descriptor: the index of its element in `heads` (`uint32`).
    #[pyo3(get)]
    desc_element: Py<PyArray1<u32>>,
    /// Per descriptor: guest-physical address (`uint64`).
    #[pyo3(get)]
    desc_addr: Py<PyArray1<u64>>,
    /// Per descriptor: bytes (`uint32`).
    #[pyo3(get)]
    desc_len: Py<PyArray1<u32>>,
    /// Per descriptor: whether it is device-writable (`bool`).
    #[pyo3(get)]
    desc_writable: Py<PyArray1<bool>>,
}

/// `(element, addr, len)` columns of the descriptors of one direction.
type Buffers<'py> = (
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u32>>,
);

impl PyElements {
    /// The core's columns as arrays.
    pub fn from_popped(py: Python<'_>, p: PoppedElements) -> Self {
        Self {
            heads: PyArray1::from_vec(py, p.heads).unbind(),
            desc_element: PyArray1::from_vec(py, p.desc_element).unbind(),
            desc_addr: PyArray1::from_vec(py, p.desc_addr).unbind(),
            desc_len: PyArray1::from_vec(py, p.desc_len).unbind(),
            desc_writable: PyArray1::from_vec(py, p.desc_writable).unbind(),
        }
    }

    /// Calls `f` with every descriptor's `(element, addr, len, writable)`, in order (the
    /// shortest column bounds the walk, should the arrays have been built unequal).
    fn each_desc(&self, py: Python<'_>, mut f: impl FnMut(u32, u64, u32, bool)) -> PyResult<()> {
        let elem = self.desc_element.bind(py).try_readonly()?;
        let addr = self.desc_addr.bind(py).try_readonly()?;
        let len = self.desc_len.bind(py).try_readonly()?;
        let writable = self.desc_writable.bind(py).try_readonly()?;
        let (elem, addr, len, writable): (
            ArrayView1<'_, u32>,
            ArrayView1<'_, u64>,
            ArrayView1<'_, u32>,
            ArrayView1<'_, bool>,
        ) = (
            elem.as_array(),
            addr.as_array(),
            len.as_array(),
            writable.as_array(),
        );
        for (((&e, &a), &l), &w) in elem.iter().zip(addr).zip(len).zip(writable) {
            f(e, a, l, w);
        }
        Ok(())
    }

    fn buffers_of<'py>(&self, py: Python<'py>, want_writable: bool) -> PyResult<Buffers<'py>> {
        let (mut elem, mut addr, mut len) = (Vec::new(), Vec::new(), Vec::new());
        self.each_desc(py, |e, a, l, w| {
            if w == want_writable {
                elem.push(e);
                addr.push(a);
                len.push(l);
            }
        })?;
        Ok((
            PyArray1::from_vec(py, elem),
            PyArray1::from_vec(py, addr),
            PyArray1::from_vec(py, len),
        ))
    }
}

#[pymethods]
impl PyElements {
    #[new]
    fn new(
        heads: Py<PyArray1<u16>>,
        desc_element: Py<PyArray1<u32>>,
        desc_addr: Py<PyArray1<u64>>,
        desc_len: Py<PyArray1<u32>>,
        desc_writable: Py<PyArray1<bool>>,
    ) -> Self {
        Self {
            heads,
            desc_element,
            desc_addr,
            desc_len,
            desc_writable,
        }
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        PyUntypedArrayMethods::len(self.heads.bind(py))
    }

    /// Element `i`'s descriptors as `(addr, len, writable)`.
    fn buffers(&self, py: Python<'_>, i: i128) -> PyResult<Vec<(u64, u32, bool)>> {
        let mut out = Vec::new();
        if let Ok(i) = u32::try_from(i) {
            self.each_desc(py, |e, a, l, w| {
                if e == i {
                    out.push((a, l, w));
                }
            })?;
        }
        Ok(out)
    }

    /// Device-readable buffers: `(element, addr, len)`.
    fn out_buffers<'py>(&self, py: Python<'py>) -> PyResult<Buffers<'py>> {
        self.buffers_of(py, false)
    }

    /// Device-writable buffers: `(element, addr, len)`; for a free page queue, the hints.
    fn in_buffers<'py>(&self, py: Python<'py>) -> PyResult<Buffers<'py>> {
        self.buffers_of(py, true)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "Elements(heads={}, desc_element={}, desc_addr={}, desc_len={}, desc_writable={})",
            self.heads.bind(py).repr()?,
            self.desc_element.bind(py).repr()?,
            self.desc_addr.bind(py).repr()?,
            self.desc_len.bind(py).repr()?,
            self.desc_writable.bind(py).repr()?,
        ))
    }
}

/// What one `DirtyBitmap.harvest_dirty_ring` call did.
///
/// `entries` counts the ring entries collected (marked RESET), rejected ones included: what the
/// VMM's `KVM_RESET_DIRTY_RINGS` resets for this ring. `pages_dirtied` counts pages that were
/// clean and are now dirty. `rejected` counts entries collected but not applied, by reason
/// (`unknown_slot`, `address_space`, `offset_past_slot`). `fetch_index` is where the next
/// harvest of this ring starts.
#[derive(Debug)]
#[pyclass(name = "DirtyRingHarvest", module = "pagehint._core", frozen)]
pub struct PyDirtyRingHarvest {
    /// Entries collected, rejected ones included.
    #[pyo3(get)]
    entries: u64,
    /// Pages that were clean and are now dirty.
    #[pyo3(get)]
    pages_dirtied: u64,
    /// Where the next harvest of this ring starts.
    #[pyo3(get)]
    fetch_index: u32,
    rejected: Vec<(String, u64)>,
}

impl From<&HarvestOutcome> for PyDirtyRingHarvest {
    fn from(out: &HarvestOutcome) -> Self {
        Self {
            entries: out.entries,
            pages_dirtied: out.pages_dirtied,
            fetch_index: out.fetch_index,
            rejected: out
                .rejected
                .by_reason()
                .iter()
                .map(|&(k, n)| (k.to_owned(), n))
                .collect(),
        }
    }
}

impl PyDirtyRingHarvest {
    fn rejected_count(&self, reason: &str) -> Option<u64> {
        self.rejected
            .iter()
            .find_map(|(k, n)| (k == reason).then_some(*n))
    }
}

#[pymethods]
impl PyDirtyRingHarvest {
    #[new]
    #[pyo3(signature = (entries, pages_dirtied, fetch_index, rejected = None))]
    fn new(
        entries: u64,
        pages_dirtied: u64,
        fetch_index: u32,
        rejected: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let rejected = rejected_counts(rejected)?;
        Ok(Self {
            entries,
            pages_dirtied,
            fetch_index,
            rejected,
        })
    }

    /// Rejected entries by reason (a new dict each time).
    #[getter]
    fn rejected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        rejected_dict(py, &self.rejected)
    }

    /// Entries rejected for any reason.
    #[getter]
    fn rejected_total(&self) -> u128 {
        rejected_total(&self.rejected)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "DirtyRingHarvest(entries={}, pages_dirtied={}, fetch_index={}, rejected={})",
            self.entries,
            self.pages_dirtied,
            self.fetch_index,
            self.rejected(py)?.repr()?
        ))
    }

    /// Equal counts and index, and equal `rejected` (as dicts: order does not matter).
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<Self>().is_ok_and(|o| {
            let o = o.get();
            (self.entries, self.pages_dirtied, self.fetch_index)
                == (o.entries, o.pages_dirtied, o.fetch_index)
                && self.rejected.len() == o.rejected.len()
                && self
                    .rejected
                    .iter()
                    .all(|(k, n)| o.rejected_count(k) == Some(*n))
        })
    }
}
