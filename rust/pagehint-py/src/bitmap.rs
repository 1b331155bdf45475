//! `pagehint.DirtyBitmap`: the core bitmap behind a lock, with the GIL released for heavy work.
//!
//! The class is frozen (no PyO3 borrow flags): every method takes `&self` and goes through the
//! `RwLock`, so threads that released the GIL serialise on the bitmap itself and no interleaving
//! of a merge and a clear can lose a bit. The lock is taken without the GIL held for anything
//! O(n), and tried with it held for O(1) calls, which fall back to waiting without the GIL.

use std::borrow::Cow;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use numpy::PyArray1;
use numpy::ndarray::ArrayView1;
use pagehint_core::{
    BitmapError, DirtyBitmap, DirtyRing, IMAGE_CHUNK_WORDS, SlotTable, TAKE_SPARE,
    advise_huge_pages,
};

/// Pages `take_dirty` takes into a first buffer before it sizes the rest of a larger request
/// exactly (8 MiB of pfns).
const LARGE_TAKE: usize = 1 << 20;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::args::{self, FetchIndex, Pages, Pfn};
use crate::errors::{bitmap_err, ring_err};
use crate::results::PyDirtyRingHarvest;

/// A `DirtyBitmap` batch over `(starts, counts)`: `set_ranges` or `clear_ranges`.
type RangesOp = fn(&mut DirtyBitmap, &[u64], &[u64]) -> Result<u64, BitmapError>;

/// A dirty bitmap over guest pages `[0, npages)`, in the KVM dirty-log word layout.
#[derive(Debug)]
#[pyclass(name = "DirtyBitmap", module = "pagehint._core", frozen)]
pub struct PyDirtyBitmap {
    inner: RwLock<DirtyBitmap>,
    npages: u64,
    /// Address range of the words, fixed for the object's life (they never move), used to spot
    /// an input array that is a view of this very bitmap.
    words_at: (usize, usize),
}

impl PyDirtyBitmap {
    fn wrap(bm: DirtyBitmap) -> Self {
        let words = bm.words().as_ptr_range();
        Self {
            npages: bm.npages(),
            words_at: (words.start as usize, words.end as usize),
            inner: RwLock::new(bm),
        }
    }

    // A panic inside a critical section would be a bug in the core; the bitmap is still a
    // valid bitmap afterwards, so carry on rather than wedge every later call.
    fn read(&self) -> RwLockReadGuard<'_, DirtyBitmap> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, DirtyBitmap> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// O(1) read: try the lock with the GIL held; if another thread holds it, wait without it.
    fn quick_read<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&DirtyBitmap) -> T + Send) -> T {
        match self.inner.try_read() {
            Ok(g) => f(&g),
            Err(TryLockError::Poisoned(p)) => f(&p.into_inner()),
            Err(TryLockError::WouldBlock) => py.detach(|| f(&self.read())),
        }
    }

    /// O(1) write, as `quick_read`.
    fn quick_write<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut DirtyBitmap) -> T + Send,
    ) -> T {
        match self.inner.try_write() {
            Ok(mut g) => f(&mut g),
            Err(TryLockError::Poisoned(p)) => f(&mut p.into_inner()),
            Err(TryLockError::WouldBlock) => py.detach(|| f(&mut self.write())),
        }
    }

    /// O(n) read with the GIL released.
    fn heavy_read<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&DirtyBitmap) -> T + Send) -> T {
        py.detach(|| f(&self.read()))
    }

    /// O(n) write with the GIL released.
    pub(crate) fn heavy_write<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut DirtyBitmap) -> T + Send,
    ) -> T {
        py.detach(|| f(&mut self.write()))
    }

    /// `input` itself, or a copy of it when it lies in this bitmap's words (a view from
    /// `words()`): the kernels must not read memory they are writing.
    fn unaliased<'a>(&self, input: &'a [u64]) -> Cow<'a, [u64]> {
        let r = input.as_ptr_range();
        let (lo, hi) = (r.start as usize, r.end as usize);
        if lo < self.words_at.1 && self.words_at.0 < hi {
            Cow::Owned(input.to_vec())
        } else {
            Cow::Borrowed(input)
        }
    }

    /// A batch operation over `(starts, counts)` arrays: converted, unaliased, run with the
    /// GIL released.
    fn ranges_op(
        &self,
        py: Python<'_>,
        starts: &Bound<'_, PyAny>,
        counts: &Bound<'_, PyAny>,
        op: RangesOp,
    ) -> PyResult<u64> {
        let starts = args::u64_array(starts, "starts")?;
        let counts = args::u64_array(counts, "counts")?;
        let (starts, counts) = (
            self.unaliased(starts.as_slice()?),
            self.unaliased(counts.as_slice()?),
        );
        self.heavy_write(py, |bm| op(bm, &starts, &counts))
            .map_err(bitmap_err)
    }

    /// `n`, or the pages from `start` to the end when it is `None`.
    fn count_or_rest(&self, start: u64, n: Option<Pages>) -> u64 {
        n.map_or(self.npages.saturating_sub(start), |n| n.0)
    }
}

#[pymethods]
impl PyDirtyBitmap {
    #[new]
    #[pyo3(signature = (npages, *, dirty = false))]
    fn new(py: Python<'_>, npages: Pages, dirty: bool) -> PyResult<Self> {
        let npages = npages.0;
        let bm = py
            .detach(|| {
                if dirty {
                    DirtyBitmap::new_dirty(npages)
                } else {
                    DirtyBitmap::new(npages)
                }
            })
            .map_err(bitmap_err)?;
        Ok(Self::wrap(bm))
    }

    /// Pages covered.
    #[getter]
    fn npages(&self) -> u64 {
        self.npages
    }

    /// Bytes of bitmap words (8 per 64 pages).
    #[getter]
    fn nbytes(&self) -> usize {
        self.words_at.1 - self.words_at.0
    }

    fn __len__(&self) -> usize {
        // `npages` is at most 2^48, which fits a 64-bit usize.
        usize::try_from(self.npages).unwrap_or(usize::MAX)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let dirty = self.heavy_read(py, DirtyBitmap::count_all);
        format!("DirtyBitmap(npages={}, dirty_pages={dirty})", self.npages)
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let Ok(other) = other.cast::<Self>() else {
            return Ok(py.NotImplemented());
        };
        let other = other.get();
        if std::ptr::eq(self, other) {
            return Ok(true.into_pyobject(py)?.to_owned().into_any().unbind());
        }
        // Lock in address order so two threads comparing a == b and b == a cannot deadlock.
        let equal = py.detach(|| {
            let (first, second) = if (self as *const Self) < (other as *const Self) {
                (self, other)
            } else {
                (other, self)
            };
            let a = first.read();
            let b = second.read();
            *a == *b
        });
        Ok(equal.into_pyobject(py)?.to_owned().into_any().unbind())
    }

    /// A copy of the bitmap (clean stretches stay unbacked in the copy too).
    fn copy(&self, py: Python<'_>) -> PyResult<Self> {
        let bm = self
            .heavy_read(py, DirtyBitmap::try_clone)
            .map_err(bitmap_err)?;
        Ok(Self::wrap(bm))
    }

    /// `copy.copy`: a copy, as `copy()`.
    fn __copy__(&self, py: Python<'_>) -> PyResult<Self> {
        self.copy(py)
    }

    /// `copy.deepcopy`: a copy, as `copy()` (a bitmap holds no Python objects).
    fn __deepcopy__(&self, py: Python<'_>, _memo: &Bound<'_, PyAny>) -> PyResult<Self> {
        self.copy(py)
    }

    /// Pickling: `(DirtyBitmap, (npages,), (512, chunks, words))`, the state being the bitmap's
    /// non-zero 4 KiB chunks of words (`chunks`: their indices, `words`: their words, both as
    /// little-endian u64 bytes), so a sparse bitmap pickles small whatever its size.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let this = slf.get();
        let image = this.heavy_read(py, DirtyBitmap::sparse_image);
        let state = (
            IMAGE_CHUNK_WORDS,
            PyBytes::new(py, &image.chunks),
            PyBytes::new(py, &image.words),
        );
        (slf.get_type(), (this.npages,), state).into_pyobject(py)
    }

    /// Unpickling: replaces the contents with a state made by `__reduce__` for a bitmap of
    /// this size. `TypeError` for what is not such a state, `ValueError` for one that does not
    /// fit this bitmap; nothing changes then.
    fn __setstate__(&self, py: Python<'_>, state: &Bound<'_, PyAny>) -> PyResult<()> {
        let (chunk_words, chunks, words): (usize, Bound<'_, PyBytes>, Bound<'_, PyBytes>) =
            state.extract().map_err(|_| {
                PyTypeError::new_err(
                    "a DirtyBitmap state is (512, chunk indices, words): an int and two bytes",
                )
            })?;
        if chunk_words != IMAGE_CHUNK_WORDS {
            return Err(PyValueError::new_err(format!(
                "a DirtyBitmap state in chunks of {chunk_words} words is not one this version \
                 reads (chunks of {IMAGE_CHUNK_WORDS})"
            )));
        }
        let (chunks, words) = (chunks.as_bytes(), words.as_bytes());
        self.heavy_write(py, |bm| bm.load_sparse_image(chunks, words))
            .map_err(bitmap_err)
    }

    /// Sets pages `[start, start + n)`; returns how many were newly set.
    fn set_range(&self, py: Python<'_>, start: Pfn, n: Pages) -> PyResult<u64> {
        let start = start.0;
        let n = n.0;
        self.heavy_write(py, |bm| bm.set_range(start, n))
            .map_err(bitmap_err)
    }

    /// Clears pages `[start, start + n)`; returns how many were set.
    fn clear_range(&self, py: Python<'_>, start: Pfn, n: Pages) -> PyResult<u64> {
        let start = start.0;
        let n = n.0;
        self.heavy_write(py, |bm| bm.clear_range(start, n))
            .map_err(bitmap_err)
    }

    /// Dirty pages in `[start, start + n)` (to the end when `n` is None).
    #[pyo3(signature = (start = Pfn(0), n = None))]
    fn count(&self, py: Python<'_>, start: Pfn, n: Option<Pages>) -> PyResult<u64> {
        let start = start.0;
        let n = self.count_or_rest(start, n);
        self.heavy_read(py, |bm| bm.count(start, n))
            .map_err(bitmap_err)
    }

    /// Whether page `pfn` is dirty.
    fn test(&self, py: Python<'_>, pfn: Pfn) -> PyResult<bool> {
        let pfn = pfn.0;
        self.quick_read(py, |bm| bm.test(pfn)).map_err(bitmap_err)
    }

    /// Clears page `pfn`; returns whether it was dirty.
    fn test_and_clear(&self, py: Python<'_>, pfn: Pfn) -> PyResult<bool> {
        let pfn = pfn.0;
        self.quick_write(py, |bm| bm.test_and_clear(pfn))
            .map_err(bitmap_err)
    }

    /// Marks every page dirty; `MemoryError` when the words are more than the machine's
    /// memory.
    fn set_all(&self, py: Python<'_>) -> PyResult<()> {
        self.heavy_write(py, DirtyBitmap::set_all)
            .map(drop)
            .map_err(bitmap_err)
    }

    /// Marks every page clean.
    fn clear_all(&self, py: Python<'_>) {
        self.heavy_write(py, DirtyBitmap::clear_all);
    }

    /// Sets `[starts[i], starts[i] + counts[i])` for every i (overlaps allowed); returns how
    /// many pages were newly set. Every range is checked before any is set.
    fn set_ranges(
        &self,
        py: Python<'_>,
        starts: &Bound<'_, PyAny>,
        counts: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        self.ranges_op(py, starts, counts, DirtyBitmap::set_ranges)
    }

    /// Clears `[starts[i], starts[i] + counts[i])` for every i (overlaps allowed); returns how
    /// many pages were set. Every range is checked before any is cleared.
    fn clear_ranges(
        &self,
        py: Python<'_>,
        starts: &Bound<'_, PyAny>,
        counts: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        self.ranges_op(py, starts, counts, DirtyBitmap::clear_ranges)
    }

    /// ORs a KVM-layout dirty log in at `page_offset` (a multiple of 64); returns how many
    /// pages became newly dirty.
    #[pyo3(signature = (log, page_offset = Pfn(0)))]
    fn merge_log(&self, py: Python<'_>, log: &Bound<'_, PyAny>, page_offset: Pfn) -> PyResult<u64> {
        let page_offset = page_offset.0;
        let log = args::u64_array(log, "log")?;
        let log = self.unaliased(log.as_slice()?);
        self.heavy_write(py, |bm| bm.merge_log(&log, page_offset))
            .map_err(bitmap_err)
    }

    /// Collects one vCPU's KVM dirty ring into the bitmap, with the GIL released.
    ///
    /// `ring` is the ring's memory, writable (the `mmap` of the vCPU fd at page 64, or a
    /// `bytearray` / numpy array standing in for it): `16 * 2**k` bytes of `kvm_dirty_gfn`
    /// entries, 8-byte aligned. `slots` maps memslot ids of address space 0 to bitmap pages:
    /// `(slot_id, first_page, npages)` rows. From `fetch_index` on, every entry whose flags are
    /// DIRTY is read (load-acquire), applied and marked RESET (store-release), up to the first
    /// entry that is not (or one lap); entries of another address space, an unknown slot or an
    /// offset past the slot are collected but not applied, and counted in `rejected`. The
    /// result's `fetch_index` is where the next harvest starts. `TypeError`/`ValueError` for a
    /// bad buffer or table, `IndexError` for a slot past the bitmap; then nothing changes.
    fn harvest_dirty_ring(
        &self,
        py: Python<'_>,
        ring: &Bound<'_, PyAny>,
        fetch_index: FetchIndex,
        slots: &Bound<'_, PyAny>,
    ) -> PyResult<PyDirtyRingHarvest> {
        let slots = SlotTable::new(&args::slot_rows(slots)?).map_err(ring_err)?;
        let buf = PyUntypedBuffer::get(ring)
            .map_err(|e| PyTypeError::new_err(format!("ring must be a writable buffer: {e}")))?;
        if buf.readonly() {
            return Err(PyTypeError::new_err(
                "ring must be writable (collected entries are marked RESET)",
            ));
        }
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("ring must be contiguous"));
        }
        // SAFETY: the export pins `len_bytes` writable bytes at `buf_ptr` until `buf` drops,
        // after the harvest returns. Every access the ring makes is atomic; the kernel (or
        // another thread) writing the ring concurrently follows the dirty-ring protocol or is
        // a race on values the harvester validates, not on memory safety. The bitmap's own
        // words are never this buffer: their only export, `words()`, is read-only.
        let ring =
            unsafe { DirtyRing::from_raw_parts(buf.buf_ptr().cast::<u8>(), buf.len_bytes()) }
                .map_err(ring_err)?;
        let fetch_index = fetch_index.0;
        let out = self
            .heavy_write(py, |bm| {
                pagehint_core::harvest_dirty_ring(bm, ring, fetch_index, &slots)
            })
            .map_err(ring_err)?;
        drop(buf);
        Ok(PyDirtyRingHarvest::from(&out))
    }

    /// The first dirty page at or after `start`, or None.
    #[pyo3(signature = (start = Pfn(0)))]
    fn next_dirty(&self, py: Python<'_>, start: Pfn) -> PyResult<Option<u64>> {
        let start = start.0;
        self.heavy_read(py, |bm| bm.next_dirty(start))
            .map_err(bitmap_err)
    }

    /// Test-and-clears up to `max_pages` dirty pages at or after `start`; returns their pfns,
    /// ascending, as a uint64 array.
    #[pyo3(signature = (max_pages, start = Pfn(0)))]
    fn take_dirty<'py>(
        &self,
        py: Python<'py>,
        max_pages: Pages,
        start: Pfn,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let max_pages = max_pages.0;
        let start = start.0;
        let max = usize::try_from(max_pages).unwrap_or(usize::MAX);
        let pfns = self
            .heavy_write(py, |bm| {
                // Up to LARGE_TAKE pages go straight into a buffer of that size. A larger
                // request that fills it counts what is left (one fast pass) and grows the buffer
                // once, to the exact size, rather than through doublings and their copies; a
                // sparse bitmap never pays for the count.
                let first = max.min(LARGE_TAKE);
                let mut out = Vec::with_capacity(first + TAKE_SPARE);
                advise_huge_pages(out.spare_capacity_mut());
                let resume = bm.take_dirty(first, start, &mut out)?;
                if out.len() == first && max > first {
                    let left = bm.count(resume, bm.npages() - resume)?;
                    let more = usize::try_from(left).unwrap_or(usize::MAX).min(max - first);
                    out.reserve_exact(more.saturating_add(TAKE_SPARE));
                    advise_huge_pages(out.spare_capacity_mut());
                    bm.take_dirty(more, resume, &mut out)?;
                }
                Ok(out)
            })
            .map_err(bitmap_err)?;
        Ok(PyArray1::from_vec(py, pfns))
    }

    /// Test-and-clears up to `max_pages` dirty pages at or after `start`, as `take_dirty`;
    /// returns them as runs: (run starts, run lengths) as uint64 arrays, ascending.
    #[pyo3(signature = (max_pages, start = Pfn(0)))]
    fn take_dirty_runs<'py>(
        &self,
        py: Python<'py>,
        max_pages: Pages,
        start: Pfn,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let max_pages = max_pages.0;
        let start = start.0;
        let (starts, lens) = self
            .heavy_write(py, |bm| {
                let (mut starts, mut lens) = (Vec::new(), Vec::new());
                bm.take_dirty_runs(max_pages, start, &mut starts, &mut lens)
                    .map(|_| (starts, lens))
            })
            .map_err(bitmap_err)?;
        PyTuple::new(
            py,
            [PyArray1::from_vec(py, starts), PyArray1::from_vec(py, lens)],
        )
    }

    /// Runs of dirty pages in `[start, start + n)`: (run starts, run lengths) as uint64 arrays.
    #[pyo3(signature = (start = Pfn(0), n = None))]
    fn dirty_runs<'py>(
        &self,
        py: Python<'py>,
        start: Pfn,
        n: Option<Pages>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let start = start.0;
        let n = self.count_or_rest(start, n);
        let (starts, lens) = self
            .heavy_read(py, |bm| {
                let (mut starts, mut lens) = (Vec::new(), Vec::new());
                bm.dirty_runs(start, n, &mut starts, &mut lens)
                    .map(|()| (starts, lens))
            })
            .map_err(bitmap_err)?;
        PyTuple::new(
            py,
            [PyArray1::from_vec(py, starts), PyArray1::from_vec(py, lens)],
        )
    }

    /// A read-only, zero-copy uint64 view of the words, valid as long as it exists (it keeps
    /// the bitmap alive). It is live: it shows later changes, so copy it to keep a snapshot.
    fn words<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let array = {
            let guard = slf.get().read();
            let view = ArrayView1::from(guard.words());
            // SAFETY: the words are one allocation that never moves or shrinks while the
            // bitmap lives, and the array's base object is the bitmap, which it keeps alive.
            unsafe { PyArray1::borrow_from_array(&view, slf.clone().into_any()) }
        };
        array.call_method1("setflags", (false,))?;
        Ok(array)
    }
}
