//! `pagehint._core.SplitQueue` and `PackedQueue`: the core ring readers over a Python buffer of
//! guest RAM. Both classes are thin shells over one generic [`QueueCore`]; only construction
//! and index accessors differ between the layouts.

use std::sync::atomic::AtomicU8;
use std::sync::{Mutex, MutexGuard, PoisonError};

use numpy::{PyArray1, PyUntypedArray};
use pagehint_core::free_page::{DrainStop, drain_hints};
use pagehint_core::virtq::{
    Chain, PackedQueue, PoppedElements, QueueError, SplitQueue, Virtqueue, pop_batch,
};
use pagehint_core::{GuestRam, HintApplier, HintOutcome, MemoryMap};
use pyo3::buffer::{PyBuffer, PyUntypedBuffer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMemoryView, PyTuple, PyWeakrefReference};

use crate::args::Int;
use crate::bitmap::PyDirtyBitmap;
use crate::errors::{bitmap_err, queue_err, ram_size_err};
use crate::memmap::PyMemoryMap;
use crate::results::{PyElements, PyHintDrain};

/// Guest RAM over a buffer export.
fn guest_ram<'a>(mem: &'a PyBuffer<u8>, map: &'a MemoryMap) -> PyResult<GuestRam<'a>> {
    let len = mem.len_bytes();
    // SAFETY: the export pins `len` bytes at `buf_ptr` for as long as `mem` lives, which
    // outlives the returned borrow. `AtomicU8` has the size and alignment of `u8`, and every
    // access through it is atomic, so the guest (or another thread) writing the same bytes
    // concurrently is a race on values the reader validates, not on memory safety.
    let bytes = unsafe { std::slice::from_raw_parts(mem.buf_ptr().cast::<AtomicU8>(), len) };
    GuestRam::new(map, bytes).ok_or_else(|| ram_size_err(len, map.ram_bytes()))
}

/// A writable, contiguous byte buffer export.
fn writable_buffer(mem: &Bound<'_, PyAny>) -> PyResult<PyBuffer<u8>> {
    let buf = PyBuffer::<u8>::get(mem)
        .map_err(|e| PyTypeError::new_err(format!("mem must be a writable byte buffer: {e}")))?;
    if buf.readonly() {
        return Err(PyTypeError::new_err(
            "mem must be writable (the device writes the used ring)",
        ));
    }
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("mem must be contiguous"));
    }
    Ok(buf)
}

/// What keeps guest RAM where it is beyond the queue's own buffer export, found by walking
/// from `mem` through the objects whose memory it shows (a numpy array's `base`, a
/// memoryview's `obj`):
///
/// - a weak reference to each numpy array: numpy does not count buffer exports, so
///   `ndarray.resize(..., refcheck=False)` would free memory the queue reads, but it refuses
///   to resize an array that has weak references (`ValueError`);
/// - a buffer export of the object at the end, when it is not `mem` itself (say the `mmap` or
///   `bytearray` under `np.frombuffer`): then it too refuses to close or resize
///   (`BufferError`) while the queue lives, whether or not numpy holds an export of it.
#[derive(Debug)]
struct Pins {
    _weakrefs: Vec<Py<PyWeakrefReference>>,
    _export: Option<PyUntypedBuffer>,
}

impl Pins {
    /// Far more links than any real chain has; bounds the walk over a pathological one.
    const MAX_DEPTH: usize = 64;

    fn take(mem: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut weakrefs = Vec::new();
        let mut obj = mem.clone();
        for _ in 0..Self::MAX_DEPTH {
            let next = if let Ok(array) = obj.cast::<PyUntypedArray>() {
                weakrefs.push(PyWeakrefReference::new(array)?.unbind());
                array.getattr("base")?
            } else if obj.cast::<PyMemoryView>().is_ok() {
                obj.getattr("obj")?
            } else {
                break;
            };
            if next.is_none() {
                break;
            }
            obj = next;
        }
        let export = if obj.is(mem) {
            None
        } else {
            PyUntypedBuffer::get(&obj).ok()
        };
        Ok(Self {
            _weakrefs: weakrefs,
            _export: export,
        })
    }
}

/// A queue size as the readers take it; `ValueError` when negative or past 16 bits (the
/// readers refuse 32769 to 65535 themselves).
fn queue_size(size: Int) -> PyResult<u16> {
    if size.0 < 0 {
        return Err(PyValueError::new_err(format!(
            "queue size {} is negative",
            size.0
        )));
    }
    u16::try_from(size.0)
        .map_err(|_| PyValueError::new_err(format!("queue size {} is more than 32768", size.0)))
}

/// `heads` and `lens` of `add_used`, checked as 16-bit heads and 32-bit lengths of equal
/// number; `ValueError` naming the first bad one.
fn used_pairs(heads: &[Int], lens: &[Int]) -> PyResult<Vec<(u16, u32)>> {
    if heads.len() != lens.len() {
        return Err(PyValueError::new_err(format!(
            "heads and lens differ in length: {} and {}",
            heads.len(),
            lens.len()
        )));
    }
    heads
        .iter()
        .zip(lens)
        .enumerate()
        .map(|(i, (h, l))| {
            Ok((
                h.u16(&format!("heads[{i}]"))?,
                l.u32(&format!("lens[{i}]"))?,
            ))
        })
        .collect()
}

/// What both queue classes hold: the buffer export (held for the queue's life, so the memory
/// cannot move or shrink: a `bytearray` refuses to resize and an `mmap` to close while
/// exported), what pins the objects behind it (`Pins`: numpy arrays do not count
/// exports), the map, and the reader with its reusable chain behind a lock.
#[derive(Debug)]
struct QueueCore<Q> {
    mem: PyBuffer<u8>,
    _pins: Pins,
    map: MemoryMap,
    state: Mutex<(Q, Chain)>,
}

impl<Q: Virtqueue + Send> QueueCore<Q> {
    fn new(
        mem: &Bound<'_, PyAny>,
        memmap: &Bound<'_, PyMemoryMap>,
        make: impl FnOnce(&GuestRam<'_>) -> Result<Q, QueueError>,
    ) -> PyResult<Self> {
        let pins = Pins::take(mem)?;
        let mem = writable_buffer(mem)?;
        let map = memmap.get().map.clone();
        let queue = make(&guest_ram(&mem, &map)?).map_err(queue_err)?;
        Ok(Self {
            mem,
            _pins: pins,
            map,
            state: Mutex::new((queue, Chain::new())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, (Q, Chain)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self) -> Option<String> {
        self.lock().0.error().map(ToString::to_string)
    }

    fn rejected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (reason, n) in self.lock().0.counts().by_reason() {
            d.set_item(reason, n)?;
        }
        Ok(d)
    }

    fn pop(&self, py: Python<'_>, max_elements: usize) -> PyResult<PoppedElements> {
        let ram = guest_ram(&self.mem, &self.map)?;
        Ok(py.detach(|| {
            let mut guard = self.lock();
            let (queue, chain) = &mut *guard;
            pop_batch(queue, &ram, chain, max_elements)
        }))
    }

    fn add_used(&self, py: Python<'_>, heads: &[Int], lens: &[Int]) -> PyResult<()> {
        let used = used_pairs(heads, lens)?;
        let ram = guest_ram(&self.mem, &self.map)?;
        py.detach(|| self.lock().0.add_used_batch(&ram, &used))
            .map_err(queue_err)
    }

    fn drain_hints(
        &self,
        py: Python<'_>,
        bitmap: Option<&Bound<'_, PyDirtyBitmap>>,
        max_elements: usize,
        record: bool,
    ) -> PyResult<PyHintDrain> {
        let ram = guest_ram(&self.mem, &self.map)?;
        let drain = |applier: Option<&mut HintApplier<'_>>| {
            let mut guard = self.lock();
            let (queue, chain) = &mut *guard;
            drain_hints(queue, &ram, chain, applier, max_elements)
        };
        // Lock order everywhere: the bitmap, then the queue.
        let (outcome, ranges, applied, stop) = match bitmap {
            Some(bitmap) => bitmap
                .get()
                .heavy_write(py, |bm| {
                    let mut applier = HintApplier::new(bm, &self.map)?;
                    if record {
                        applier = applier.recording();
                    }
                    let (applied, stop) = drain(Some(&mut applier));
                    let (outcome, ranges) = applier.finish_with_ranges();
                    Ok((outcome, ranges, applied, stop))
                })
                .map_err(bitmap_err)?,
            None => {
                let (applied, stop) = py.detach(|| drain(None));
                (HintOutcome::default(), Vec::new(), applied, stop)
            }
        };
        let (control, limited) = match stop {
            DrainStop::Control(c) => (Some(c), false),
            DrainStop::Limit => (None, true),
            DrainStop::Empty => (None, false),
        };
        PyHintDrain::build(
            py,
            &outcome,
            record.then_some(ranges),
            applied,
            control,
            limited,
        )
    }

    fn needs_interrupt(&self) -> PyResult<bool> {
        let ram = guest_ram(&self.mem, &self.map)?;
        Ok(self.lock().0.needs_interrupt(&ram))
    }
}

/// The methods both queue classes expose, delegating to their `QueueCore`.
/// One `#[pymethods]` block per class: its own construction and index methods, then these.
macro_rules! queue_methods {
    ($class:ident { $($own:tt)* }) => {
        #[pymethods]
        impl $class {
            $($own)*

            /// Queue size.
            #[getter]
            fn size(&self) -> u16 {
                self.core.lock().0.size()
            }

            /// Why the queue stopped (a broken ring), or None.
            #[getter]
            fn error(&self) -> Option<String> {
                self.core.error()
            }

            /// Rejected elements so far, by reason.
            #[getter]
            fn rejected<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                self.core.rejected(py)
            }

            /// Takes up to `max_elements` available elements with the GIL released. Rejected
            /// elements count against `max_elements` too (a guest cannot keep the call going);
            /// they are counted in `rejected`, already returned used with length 0, and absent
            /// from the result.
            #[pyo3(
                signature = (max_elements = Int(65536)),
                text_signature = "($self, max_elements=65536)"
            )]
            fn pop(&self, py: Python<'_>, max_elements: Int) -> PyResult<PyElements> {
                let popped = self.core.pop(py, max_elements.limit("max_elements")?)?;
                Ok(PyElements::from_popped(py, popped))
            }

            /// `pop` as a tuple of its arrays: `(heads, desc_element, desc_addr, desc_len,
            /// desc_writable)`.
            fn pop_batch<'py>(
                &self,
                py: Python<'py>,
                max_elements: Int,
            ) -> PyResult<Bound<'py, PyTuple>> {
                let p = self.core.pop(py, max_elements.limit("max_elements")?)?;
                PyTuple::new(
                    py,
                    [
                        PyArray1::from_vec(py, p.heads).into_any(),
                        PyArray1::from_vec(py, p.desc_element).into_any(),
                        PyArray1::from_vec(py, p.desc_addr).into_any(),
                        PyArray1::from_vec(py, p.desc_len).into_any(),
                        PyArray1::from_vec(py, p.desc_writable).into_any(),
                    ],
                )
            }

            /// Returns elements to the driver: `heads[i]` with `lens[i]` bytes written. The
            /// whole batch is checked first: a head that is not in flight (or given more
            /// often than it is) is a `ValueError` and nothing is returned.
            fn add_used(&self, py: Python<'_>, heads: Vec<Int>, lens: Vec<Int>) -> PyResult<()> {
                self.core.add_used(py, &heads, &lens)
            }

            /// The free page queue's hot path, with the GIL released: applies available
            /// free-page-hint elements (device-writable buffers only) to `bitmap` through this
            /// queue's memory map and returns each used with length 0, until the queue is
            /// empty, `max_elements` were taken (rejected ones count), or an element with a
            /// device-readable buffer (a cmd id) comes up: that one is returned unused as
            /// `control`. With `bitmap=None` the hint elements are returned used without being
            /// applied (a device outside its START state). `record=True` also returns the page
            /// ranges cleared (`ranges`), for a VMM that clears the hypervisor's dirty log where
            /// hints landed.
            #[pyo3(
                signature = (bitmap, max_elements = Int(65536), *, record = false),
                text_signature = "($self, bitmap, max_elements=65536, *, record=False)"
            )]
            fn drain_hints(
                &self,
                py: Python<'_>,
                bitmap: Option<&Bound<'_, PyDirtyBitmap>>,
                max_elements: Int,
                record: bool,
            ) -> PyResult<PyHintDrain> {
                let max_elements = max_elements.limit("max_elements")?;
                self.core.drain_hints(py, bitmap, max_elements, record)
            }

            /// Whether the driver wants an interrupt for what was used since the last decision.
            fn needs_interrupt(&self) -> PyResult<bool> {
                self.core.needs_interrupt()
            }
        }
    };
}

/// A split virtqueue (virtio 1.2 §2.7) in guest RAM held by a writable buffer.
///
/// `SplitQueue(mem, memmap, size, desc_gpa, avail_gpa, used_gpa, *, event_idx=False)`: `mem`
/// is a `bytearray`, `mmap` or numpy `uint8` array laid out by `memmap` (it may be written by
/// the guest concurrently). The queue holds `mem` for its whole life and keeps it from being
/// resized, closed or freed (see `Pins`). Construction checks the size (a power of two up to
/// 32768), ring alignment and that the rings are RAM (`ValueError` otherwise). Every
/// guest-written field is validated: a bad element is counted in `rejected` and returned used
/// with length 0; a bad ring index stops the queue and sets `error`.
#[derive(Debug)]
#[pyclass(name = "SplitQueue", module = "pagehint._core", frozen, subclass)]
pub struct PySplitQueue {
    core: QueueCore<SplitQueue>,
}

queue_methods!(PySplitQueue {
    #[new]
    #[pyo3(signature = (mem, memmap, size, desc_gpa, avail_gpa, used_gpa, *, event_idx = false))]
    fn new(
        mem: &Bound<'_, PyAny>,
        memmap: &Bound<'_, PyMemoryMap>,
        size: Int,
        desc_gpa: Int,
        avail_gpa: Int,
        used_gpa: Int,
        event_idx: bool,
    ) -> PyResult<Self> {
        let size = queue_size(size)?;
        let desc_gpa = desc_gpa.u64("desc_gpa")?;
        let avail_gpa = avail_gpa.u64("avail_gpa")?;
        let used_gpa = used_gpa.u64("used_gpa")?;
        let core = QueueCore::new(mem, memmap, |ram| {
            SplitQueue::new(ram, size, desc_gpa, avail_gpa, used_gpa, event_idx)
        })?;
        Ok(Self { core })
    }

    /// Next available-ring index the device will read.
    #[getter]
    fn last_avail(&self) -> u16 {
        self.core.lock().0.last_avail()
    }

    /// Next used-ring index the device will write.
    #[getter]
    fn next_used(&self) -> u16 {
        self.core.lock().0.next_used()
    }

    /// Resumes at the given indices (e.g. from a saved device state or a dump); `ValueError`
    /// for a used index ahead of the available one or more than a queue behind it. The
    /// `last_avail - next_used` elements then in flight may be returned by any heads.
    fn set_indices(&self, last_avail: Int, next_used: Int) -> PyResult<()> {
        let last_avail = last_avail.u16("last_avail")?;
        let next_used = next_used.u16("next_used")?;
        self.core.lock().0.set_indices(last_avail, next_used).map_err(queue_err)
    }
});

/// A packed virtqueue (virtio 1.2 §2.8) in guest RAM held by a writable buffer.
///
/// `PackedQueue(mem, memmap, size, desc_gpa, driver_event_gpa, device_event_gpa, *,
/// event_idx=False)`: the same guarantees as `SplitQueue`; ids are buffer ids, and indices come
/// with their wrap counters (`next_avail`, `next_used`, `set_indices`).
#[derive(Debug)]
#[pyclass(name = "PackedQueue", module = "pagehint._core", frozen, subclass)]
pub struct PyPackedQueue {
    core: QueueCore<PackedQueue>,
}

queue_methods!(PyPackedQueue {
    #[new]
    #[pyo3(signature = (mem, memmap, size, desc_gpa, driver_event_gpa, device_event_gpa, *, event_idx = false))]
    fn new(
        mem: &Bound<'_, PyAny>,
        memmap: &Bound<'_, PyMemoryMap>,
        size: Int,
        desc_gpa: Int,
        driver_event_gpa: Int,
        device_event_gpa: Int,
        event_idx: bool,
    ) -> PyResult<Self> {
        let size = queue_size(size)?;
        let desc_gpa = desc_gpa.u64("desc_gpa")?;
        let driver_event_gpa = driver_event_gpa.u64("driver_event_gpa")?;
        let device_event_gpa = device_event_gpa.u64("device_event_gpa")?;
        let core = QueueCore::new(mem, memmap, |ram| {
            PackedQueue::new(ram, size, desc_gpa, driver_event_gpa, device_event_gpa, event_idx)
        })?;
        Ok(Self { core })
    }

    /// Next ring slot the device reads, and the driver's wrap counter it expects there.
    #[getter]
    fn next_avail(&self) -> (u16, bool) {
        let g = self.core.lock();
        (g.0.next_avail(), g.0.avail_wrap())
    }

    /// Next ring slot the device writes used, and its wrap counter.
    #[getter]
    fn next_used(&self) -> (u16, bool) {
        let g = self.core.lock();
        (g.0.next_used(), g.0.used_wrap())
    }

    /// Resumes at the given slots and wrap counters (e.g. from a saved device state), with
    /// nothing in flight.
    fn set_indices(
        &self,
        next_avail: Int,
        avail_wrap: bool,
        next_used: Int,
        used_wrap: bool,
    ) -> PyResult<()> {
        let next_avail = next_avail.u16("next_avail")?;
        let next_used = next_used.u16("next_used")?;
        self.core
            .lock()
            .0
            .set_indices(next_avail, avail_wrap, next_used, used_wrap)
            .map_err(queue_err)
    }
});
