//! `pagehint._core.SplitQueue`: the core split-ring reader over a Python buffer of guest RAM.

use std::sync::atomic::AtomicU8;
use std::sync::{Mutex, PoisonError};

use numpy::PyArray1;
use pagehint_core::HintApplier;
use pagehint_core::free_page::{DrainStop, drain_hints};
use pagehint_core::virtq::{Chain, QueueError, SplitQueue};
use pagehint_core::{GuestRam, MemoryMap};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::bitmap::PyDirtyBitmap;
use crate::errors::bitmap_err;
use crate::memmap::PyMemoryMap;

/// Elements popped in one call, as parallel arrays (no Python object per element).
type Popped = (Vec<u16>, Vec<u32>, Vec<u64>, Vec<u32>, Vec<bool>);

/// A split virtqueue read from guest RAM held in a writable Python buffer (`bytearray`,
/// `mmap`, a numpy `uint8` array) laid out by a `MemoryMap`.
#[derive(Debug)]
#[pyclass(name = "SplitQueue", module = "pagehint._core", frozen, subclass)]
pub struct PySplitQueue {
    /// The buffer export, held for the queue's life: the memory cannot move or shrink (a
    /// `bytearray` refuses to resize while exported).
    mem: PyBuffer<u8>,
    map: MemoryMap,
    state: Mutex<(SplitQueue, Chain)>,
}

fn queue_err(e: QueueError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Guest RAM over a buffer export.
fn guest_ram<'a>(mem: &'a PyBuffer<u8>, map: &'a MemoryMap) -> PyResult<GuestRam<'a>> {
    let len = mem.len_bytes();
    // SAFETY: the export pins `len` bytes at `buf_ptr` for as long as `mem` lives, which
    // outlives the returned borrow. `AtomicU8` has the size and alignment of `u8`, and every
    // access through it is atomic, so the guest (or another thread) writing the same bytes
    // concurrently is a race on values the reader validates, not on memory safety.
    let bytes = unsafe { std::slice::from_raw_parts(mem.buf_ptr().cast::<AtomicU8>(), len) };
    GuestRam::new(map, bytes).ok_or_else(|| {
        PyValueError::new_err(format!(
            "the buffer has {len} bytes but the memory map needs {}",
            map.ram_bytes()
        ))
    })
}

impl PySplitQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, (SplitQueue, Chain)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[pymethods]
impl PySplitQueue {
    #[new]
    #[pyo3(signature = (mem, memmap, size, desc_gpa, avail_gpa, used_gpa, *, event_idx = false))]
    fn new(
        mem: &Bound<'_, PyAny>,
        memmap: &Bound<'_, PyMemoryMap>,
        size: u32,
        desc_gpa: u64,
        avail_gpa: u64,
        used_gpa: u64,
        event_idx: bool,
    ) -> PyResult<Self> {
        let mem = PyBuffer::<u8>::get(mem).map_err(|e| {
            PyTypeError::new_err(format!("mem must be a writable byte buffer: {e}"))
        })?;
        if mem.readonly() {
            return Err(PyTypeError::new_err(
                "mem must be writable (the device writes the used ring)",
            ));
        }
        if !mem.is_c_contiguous() {
            return Err(PyValueError::new_err("mem must be contiguous"));
        }
        let size = u16::try_from(size)
            .map_err(|_| PyValueError::new_err(format!("queue size {size} is more than 32768")))?;
        let map = memmap.get().map.clone();
        let q = SplitQueue::new(
            &guest_ram(&mem, &map)?,
            size,
            desc_gpa,
            avail_gpa,
            used_gpa,
            event_idx,
        )
        .map_err(queue_err)?;
        Ok(Self {
            mem,
            map,
            state: Mutex::new((q, Chain::new())),
        })
    }

    /// Queue size.
    #[getter]
    fn size(&self) -> u16 {
        self.lock().0.size()
    }

    /// Next available-ring index the device will read.
    #[getter]
    fn last_avail(&self) -> u16 {
        self.lock().0.last_avail()
    }

    /// Next used-ring index the device will write.
    #[getter]
    fn next_used(&self) -> u16 {
        self.lock().0.next_used()
    }

    /// Why the queue stopped (a broken ring), or None.
    #[getter]
    fn error(&self) -> Option<String> {
        self.lock().0.error().map(ToString::to_string)
    }

    /// Rejected elements so far, by reason.
    #[getter]
    fn rejected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (reason, n) in self.lock().0.counts().by_reason() {
            d.set_item(reason, n)?;
        }
        Ok(d)
    }

    /// Resumes at the given indices (e.g. from a saved device state or a dump).
    fn set_indices(&self, last_avail: u16, next_used: u16) {
        self.lock().0.set_indices(last_avail, next_used);
    }

    /// Pops up to `max_elements` available elements with the GIL released. Returns parallel
    /// arrays: the accepted elements' head ids (`uint16`), and per descriptor the index of its
    /// element in that list (`uint32`), its address (`uint64`), length (`uint32`) and whether it
    /// is device-writable (`bool`), in chain order. Rejected elements are counted in
    /// `rejected` and already returned used with length 0.
    fn pop_batch<'py>(
        &self,
        py: Python<'py>,
        max_elements: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let ram = guest_ram(&self.mem, &self.map)?;
        let (heads, elem, addr, len, writable): Popped = py.detach(|| {
            let mut guard = self.lock();
            let (queue, chain) = &mut *guard;
            let mut out: Popped = Default::default();
            while out.0.len() < max_elements {
                match queue.pop(&ram, chain) {
                    None => break,
                    Some(Err(_)) => {}
                    Some(Ok(head)) => {
                        // At most `max_elements` elements, each index fits u32 for any sane
                        // request; saturate rather than wrap otherwise.
                        let e = u32::try_from(out.0.len()).unwrap_or(u32::MAX);
                        out.0.push(head);
                        for d in chain.descs() {
                            out.1.push(e);
                            out.2.push(d.addr);
                            out.3.push(d.len);
                            out.4.push(d.writable);
                        }
                    }
                }
            }
            out
        });
        PyTuple::new(
            py,
            [
                PyArray1::from_vec(py, heads).into_any(),
                PyArray1::from_vec(py, elem).into_any(),
                PyArray1::from_vec(py, addr).into_any(),
                PyArray1::from_vec(py, len).into_any(),
                PyArray1::from_vec(py, writable).into_any(),
            ],
        )
    }

    /// Returns elements to the driver: `heads[i]` with `lens[i]` bytes written, in order.
    fn add_used(&self, py: Python<'_>, heads: Vec<u16>, lens: Vec<u32>) -> PyResult<()> {
        if heads.len() != lens.len() {
            return Err(PyValueError::new_err(format!(
                "heads and lens differ in length: {} and {}",
                heads.len(),
                lens.len()
            )));
        }
        let ram = guest_ram(&self.mem, &self.map)?;
        py.detach(|| {
            let mut guard = self.lock();
            heads
                .iter()
                .zip(&lens)
                .try_for_each(|(&h, &l)| guard.0.add_used(&ram, h, l))
        })
        .map_err(queue_err)
    }

    /// The free page queue's hot path, with the GIL released: applies every available hint
    /// element (device-writable buffers only) to `bitmap` through this queue's memory map and
    /// returns it used with length 0, up to `max_elements` elements or the first element with
    /// a device-readable buffer (a cmd id), which is returned unused for the caller's state
    /// machine. Returns `(hints, pages_hinted, pages_cleared, hint_rejects, elements, control)`
    /// where `control` is None or `(head, cmd_id or None if shorter than 4 bytes, [(addr, len)
    /// of its writable buffers])`.
    #[pyo3(name = "_drain_hints", signature = (bitmap, max_elements = 65536))]
    fn drain_hints<'py>(
        &self,
        py: Python<'py>,
        bitmap: &Bound<'py, PyDirtyBitmap>,
        max_elements: usize,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let ram = guest_ram(&self.mem, &self.map)?;
        let (outcome, applied, stop) = bitmap
            .get()
            .heavy_write(py, |bm| {
                let mut applier = HintApplier::new(bm, &self.map)?;
                let mut guard = self.lock();
                let (queue, chain) = &mut *guard;
                let (applied, stop) = drain_hints(queue, &ram, chain, &mut applier, max_elements);
                Ok((applier.finish(), applied, stop))
            })
            .map_err(bitmap_err)?;
        let rejected = PyDict::new(py);
        for (reason, n) in outcome.rejected.by_reason() {
            rejected.set_item(reason, n)?;
        }
        let control = match stop {
            DrainStop::Control(c) => Some((c.head, c.cmd_id, c.hints)),
            DrainStop::Empty | DrainStop::Limit => None,
        };
        (
            outcome.hints,
            outcome.pages_hinted,
            outcome.pages_cleared,
            rejected,
            applied,
            control,
        )
            .into_pyobject(py)
    }

    /// Whether the driver wants an interrupt for what was used since the last decision.
    fn needs_interrupt(&self) -> PyResult<bool> {
        let ram = guest_ram(&self.mem, &self.map)?;
        Ok(self.lock().0.needs_interrupt(&ram))
    }
}
