//! The bitmap's word storage: a zeroed heap allocation that the kernel backs lazily.
//!
//! `vec![0u64; n]` would also be lazily zeroed, but it aborts the process when the allocator
//! refuses; a bitmap sized from guest input must fail with an error instead.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::error::BitmapError;

/// An owned, fixed-length, zero-initialised `[u64]` that never reallocates, so views of it
/// stay valid for its whole life.
pub struct Words {
    ptr: NonNull<u64>,
    len: usize,
}

// SAFETY: `Words` owns its allocation exclusively, like `Box<[u64]>`, which is Send and Sync.
unsafe impl Send for Words {}
// SAFETY: shared access only hands out `&[u64]`; mutation needs `&mut Words`.
unsafe impl Sync for Words {}

impl Words {
    /// `len` zero words, or `AllocationFailed` when the allocator refuses.
    pub fn zeroed(len: usize) -> Result<Self, BitmapError> {
        let bytes = (len as u64).saturating_mul(8);
        let layout =
            Layout::array::<u64>(len).map_err(|_| BitmapError::AllocationFailed { bytes })?;
        if layout.size() == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: the layout has a non-zero size, as `alloc_zeroed` requires.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<u64>()).ok_or(BitmapError::AllocationFailed { bytes })?;
        let mut words = Self { ptr, len };
        advise_huge_pages(&mut words);
        Ok(words)
    }

    fn layout(&self) -> Option<Layout> {
        Layout::array::<u64>(self.len)
            .ok()
            .filter(|l| l.size() != 0)
    }
}

/// Below this a buffer is not worth a huge-page hint.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `buf` with transparent huge pages where it can (Linux's `madvise`
/// mode, the default on many distributions, uses them only when asked). A fault then maps 2 MiB
/// at once: filling a 256 MiB buffer takes 128 faults instead of 65,536, which matters most in a
/// VM where every fault is an exit. Memory that is never touched stays unbacked. A refusal is
/// harmless, so the result is ignored.
pub fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (lo, hi) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `buf`, memory this process owns; MADV_HUGEPAGE only
            // changes how the kernel backs it, never its contents or its mapping.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (buf, HUGE_PAGE);
}

impl Drop for Words {
    fn drop(&mut self) {
        if let Some(layout) = self.layout() {
            // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr().cast::<u8>(), layout) };
        }
    }
}

impl Deref for Words {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed) u64s for as long as `self`
        // lives, or dangling and well aligned with `len == 0`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Words {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Words {
    /// A copy, or `AllocationFailed`.
    pub fn try_clone(&self) -> Result<Self, BitmapError> {
        let mut copy = Self::zeroed(self.len)?;
        // Copy only non-zero stretches so a sparse bitmap's copy stays sparse in memory.
        for (dst, src) in copy.chunks_mut(512).zip(self.chunks(512)) {
            if src.iter().any(|&w| w != 0) {
                dst.copy_from_slice(src);
            }
        }
        Ok(copy)
    }
}

impl PartialEq for Words {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Words {}

impl fmt::Debug for Words {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Words({} x u64)", self.len)
    }
}
