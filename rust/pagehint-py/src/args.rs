//! Converting Python arguments: page numbers and counts from any integer, page arrays from
//! 1-D C-contiguous `uint64` numpy arrays. Every refusal is a `TypeError`, `ValueError` or
//! `IndexError` naming the argument.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyIndexError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// An integer argument as an `i128` (every Python int that can matter), saturated beyond it.
fn integer(obj: &Bound<'_, PyAny>) -> PyResult<i128> {
    match obj.extract::<i128>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
            Ok(if obj.lt(0)? { i128::MIN } else { i128::MAX })
        }
        Err(_) => Err(PyTypeError::new_err(format!(
            "expected an int, not {}",
            obj.get_type().name()?
        ))),
    }
}

/// A page number or position. Negative or beyond 64 bits is an `IndexError`.
#[derive(Debug, Clone, Copy)]
pub struct Pfn(pub u64);

impl<'a, 'py> FromPyObject<'a, 'py> for Pfn {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let v = integer(&obj)?;
        if v < 0 {
            return Err(PyIndexError::new_err(format!("page {v} is negative")));
        }
        u64::try_from(v)
            .map(Self)
            .map_err(|_| PyIndexError::new_err(format!("page {v} is past the end of any bitmap")))
    }
}

/// A number of pages. Negative is a `ValueError`; too large saturates as for [`Pfn`].
#[derive(Debug, Clone, Copy)]
pub struct Pages(pub u64);

impl<'a, 'py> FromPyObject<'a, 'py> for Pages {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let v = integer(&obj)?;
        if v < 0 {
            return Err(PyValueError::new_err(format!("page count {v} is negative")));
        }
        Ok(Self(u64::try_from(v).unwrap_or(u64::MAX)))
    }
}

/// Any Python int, checked later against the range of the argument it is (see
/// [`Int::unsigned`]), so that the refusal can name that argument: guest-physical addresses,
/// sizes, ring indices, heads and limits. A non-int is a `TypeError`.
#[derive(Debug, Clone, Copy)]
pub struct Int(pub i128);

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        integer(&obj).map(Self)
    }
}

impl Int {
    /// The value as an unsigned integer up to `max`; a `ValueError` naming the argument
    /// `name` when it is negative or larger.
    pub fn unsigned(self, name: &str, max: u64) -> PyResult<u64> {
        match u64::try_from(self.0) {
            Ok(v) if v <= max => Ok(v),
            _ if self.0 < 0 => Err(PyValueError::new_err(format!(
                "{name} is negative ({})",
                self.0
            ))),
            _ if max == u64::MAX => Err(PyValueError::new_err(format!(
                "{name} is not below 2**64 ({})",
                self.0
            ))),
            _ => Err(PyValueError::new_err(format!(
                "{name} is more than {max} ({})",
                self.0
            ))),
        }
    }

    /// A guest-physical address or a size in bytes: any value in `[0, 2**64)`.
    pub fn u64(self, name: &str) -> PyResult<u64> {
        self.unsigned(name, u64::MAX)
    }

    /// A 16-bit ring index or head.
    pub fn u16(self, name: &str) -> PyResult<u16> {
        let v = self.unsigned(name, u64::from(u16::MAX))?;
        Ok(u16::try_from(v).unwrap_or(u16::MAX))
    }

    /// A 32-bit length.
    pub fn u32(self, name: &str) -> PyResult<u32> {
        let v = self.unsigned(name, u64::from(u32::MAX))?;
        Ok(u32::try_from(v).unwrap_or(u32::MAX))
    }

    /// A count that only limits work: negative is a `ValueError`, anything larger than
    /// `usize` saturates.
    pub fn limit(self, name: &str) -> PyResult<usize> {
        let v = self
            .u64(name)
            .or_else(|e| if self.0 < 0 { Err(e) } else { Ok(u64::MAX) })?;
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    }
}

/// A 1-D C-contiguous `uint64` array, borrowed read-only.
pub fn u64_array<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray1<'py, u64>> {
    let Ok(array) = obj.cast::<PyArray1<u64>>() else {
        let what = match (obj.getattr("dtype"), obj.getattr("ndim")) {
            (Ok(dtype), Ok(ndim)) => format!("a {ndim}-D array of {dtype}"),
            _ => obj.get_type().name()?.to_string(),
        };
        return Err(PyTypeError::new_err(format!(
            "{name} must be a 1-D numpy array of uint64, not {what}"
        )));
    };
    if !array.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    array
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name} cannot be borrowed: {e}")))
}

/// A KVM memslot id (the low 16 bits of a dirty ring entry's `slot`). Outside `[0, 65535]` is a
/// `ValueError`.
#[derive(Debug, Clone, Copy)]
pub struct SlotId(pub u16);

impl<'a, 'py> FromPyObject<'a, 'py> for SlotId {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let v = integer(&obj)?;
        u16::try_from(v)
            .map(Self)
            .map_err(|_| PyValueError::new_err(format!("slot id {v} is not in [0, 65535]")))
    }
}

/// A dirty ring's fetch index: KVM's free-running `u32`. Outside `[0, 2**32)` is a `ValueError`.
#[derive(Debug, Clone, Copy)]
pub struct FetchIndex(pub u32);

impl<'a, 'py> FromPyObject<'a, 'py> for FetchIndex {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let v = integer(&obj)?;
        u32::try_from(v)
            .map(Self)
            .map_err(|_| PyValueError::new_err(format!("fetch_index {v} is not in [0, 2**32)")))
    }
}

/// `(slot_id, first_page, npages)` rows: a `uint64` array of shape `(N, 3)`, or any sequence of
/// 3-tuples of ints.
pub fn slot_rows(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(u16, u64, u64)>> {
    if let Ok(array) = obj.cast::<PyArray2<u64>>() {
        if array.shape()[1] != 3 {
            return Err(PyValueError::new_err(format!(
                "slots must have shape (N, 3), not {:?}",
                array.shape()
            )));
        }
        let ro = array
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("slots cannot be borrowed: {e}")))?;
        return ro
            .as_array()
            .rows()
            .into_iter()
            .map(|r| {
                let id = u16::try_from(r[0]).map_err(|_| {
                    PyValueError::new_err(format!("slot id {} is not in [0, 65535]", r[0]))
                })?;
                Ok((id, r[1], r[2]))
            })
            .collect();
    }
    let items: Vec<Bound<'_, PyAny>> = obj.extract().map_err(|_| {
        PyTypeError::new_err(
            "slots must be a sequence of (slot_id, first_page, npages) or a uint64 array of \
             shape (N, 3)",
        )
    })?;
    items
        .iter()
        .map(|item| {
            let (s, f, n) = item.extract::<(SlotId, Pfn, Pages)>()?;
            Ok((s.0, f.0, n.0))
        })
        .collect()
}
