//! The bitmap's word storage: zeroed memory that costs nothing until it is written.
//!
//! A bitmap may be larger than the machine's memory (a 2^38-page bitmap is 32 GiB of words)
//! as long as only part of it is ever written, so on Linux a large one is an anonymous private
//! mapping with `MAP_NORESERVE`: the kernel reserves address space only, charges no commit for
//! it, and backs a page with memory the first time it is written. Reading a page never written
//! maps the shared zero page (a huge zero page under `MADV_HUGEPAGE`), which is not resident
//! memory of this process. Memory actually written beyond what the machine has is the OOM
//! killer's, as for any overcommitted memory; the bitmap refuses the calls that would do that
//! at once (see [`machine_memory`]). Under strict overcommit (`vm.overcommit_memory = 2`) the
//! kernel ignores `MAP_NORESERVE` and charges the whole mapping, so a bitmap is then limited by
//! the commit limit and refused with [`BitmapError::AllocationFailed`] beyond it.
//!
//! Small bitmaps, and every bitmap on other systems, come from the global allocator's
//! `alloc_zeroed` (`vec![0u64; n]` would also be lazily zeroed, but it aborts the process when
//! the allocator refuses; a bitmap sized from guest input must fail with an error instead).
//!
//! Either way the words are at least 8-byte aligned (page aligned when mapped), never move and
//! never change length, so the SIMD kernels (unaligned loads) and views of them stay valid.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::OnceLock;

use crate::error::BitmapError;

/// An owned, fixed-length, zero-initialised `[u64]` that never reallocates, so views of it
/// stay valid for its whole life.
pub struct Words {
    ptr: NonNull<u64>,
    len: usize,
    backing: Backing,
}

/// Where the words came from, which decides how they are given back.
#[derive(Debug, Clone, Copy)]
enum Backing {
    /// No memory: `len == 0` and `ptr` is dangling.
    Empty,
    /// The global allocator, with this layout.
    Heap(Layout),
    /// An anonymous mapping of this many bytes.
    #[cfg(target_os = "linux")]
    Mapped(usize),
}

// SAFETY: `Words` owns its memory exclusively, like `Box<[u64]>`, which is Send and Sync.
unsafe impl Send for Words {}
// SAFETY: shared access only hands out `&[u64]`; mutation needs `&mut Words`.
unsafe impl Sync for Words {}

/// From this many bytes on, Linux gets the words from a `MAP_NORESERVE` mapping; below it a
/// bitmap is too small for reserving to matter and the allocator packs it better.
#[cfg(target_os = "linux")]
const MAP_THRESHOLD: usize = HUGE_PAGE;

impl Words {
    /// `len` zero words, reserved rather than committed where the system allows it (see the
    /// module notes), or `AllocationFailed` when the system refuses even that.
    pub fn zeroed(len: usize) -> Result<Self, BitmapError> {
        let bytes = (len as u64).saturating_mul(8);
        let layout =
            Layout::array::<u64>(len).map_err(|_| BitmapError::AllocationFailed { bytes })?;
        if layout.size() == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
                backing: Backing::Empty,
            });
        }
        #[cfg(target_os = "linux")]
        if layout.size() >= MAP_THRESHOLD {
            let ptr = map_reserved(layout.size()).ok_or(BitmapError::AllocationFailed { bytes })?;
            return Ok(Self::adopt(ptr, len, Backing::Mapped(layout.size())));
        }
        // SAFETY: the layout has a non-zero size, as `alloc_zeroed` requires.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<u64>()).ok_or(BitmapError::AllocationFailed { bytes })?;
        Ok(Self::adopt(ptr, len, Backing::Heap(layout)))
    }

    /// Takes ownership of `len` zeroed words at `ptr`, obtained as `backing` says.
    fn adopt(ptr: NonNull<u64>, len: usize, backing: Backing) -> Self {
        let mut words = Self { ptr, len, backing };
        advise_huge_pages(&mut words);
        words
    }
}

/// A private anonymous mapping of `bytes` zero bytes (`bytes > 0`), readable and writable,
/// with no commit charge (`MAP_NORESERVE`): nothing is backed until written. `None` when the
/// kernel refuses (no address space left, `RLIMIT_AS`, or strict overcommit over its limit).
#[cfg(target_os = "linux")]
fn map_reserved(bytes: usize) -> Option<NonNull<u64>> {
    // SAFETY: a new mapping at an address the kernel picks cannot overlap any memory in use;
    // no existing memory is touched, and the caller becomes its only owner.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    // Page aligned, so aligned for u64 (and for any SIMD load width).
    NonNull::new(raw.cast::<u64>())
}

/// The memory this machine can back: RAM plus swap, as Linux's default overcommit heuristic
/// counts it (`sysinfo`), read once. A call that would write more bitmap words than this at
/// once is refused with [`BitmapError::ExceedsMemory`] instead of running into the OOM killer.
/// `None` where it is unknown (other systems), and then no such limit applies. (A cgroup's
/// memory limit is not taken into account.)
pub fn machine_memory() -> Option<u64> {
    static MEMORY: OnceLock<Option<u64>> = OnceLock::new();
    *MEMORY.get_or_init(read_machine_memory)
}

#[cfg(target_os = "linux")]
fn read_machine_memory() -> Option<u64> {
    // SAFETY: `struct sysinfo` is plain integers, for which all-zero bytes are a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `struct sysinfo`, the only memory the call writes.
    if unsafe { libc::sysinfo(&raw mut info) } != 0 {
        return None;
    }
    let unit = u64::from(info.mem_unit.max(1));
    #[allow(clippy::useless_conversion)] // c_ulong is u32 on 32-bit targets
    let (ram, swap) = (u64::from(info.totalram), u64::from(info.totalswap));
    ram.checked_add(swap)?.checked_mul(unit)
}

#[cfg(not(target_os = "linux"))]
const fn read_machine_memory() -> Option<u64> {
    None
}

/// Below this a buffer is not worth a huge-page hint.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `buf` with transparent huge pages where it can (Linux's `madvise`
/// mode, the default on many distributions, uses them only when asked). A fault then maps 2 MiB
/// at once: filling a 256 MiB buffer takes 128 faults instead of 65,536, which matters most in a
/// VM where every fault is an exit. Memory that is never touched stays unbacked (reads of it map
/// the huge zero page); the cost is that writing one bit backs the 2 MiB around it. A refusal
/// is harmless, so the result is ignored.
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
        match self.backing {
            Backing::Empty => {}
            Backing::Heap(layout) => {
                // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed
                // once; no borrow of the words outlives `self`.
                unsafe { alloc::dealloc(self.ptr.as_ptr().cast::<u8>(), layout) };
            }
            #[cfg(target_os = "linux")]
            Backing::Mapped(bytes) => {
                // SAFETY: `ptr` starts a mapping of exactly `bytes` bytes that this value owns
                // and unmaps once; no borrow of the words outlives `self`.
                unsafe { libc::munmap(self.ptr.as_ptr().cast::<libc::c_void>(), bytes) };
            }
        }
    }
}

impl Deref for Words {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        // SAFETY: `ptr` is valid for `len` initialised u64s (zeroed by the allocator or the
        // kernel) for as long as `self` lives, or dangling and well aligned with `len == 0`.
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
        let kernels = crate::kernels::active();
        for (dst, src) in copy.chunks_mut(512).zip(self.chunks(512)) {
            if kernels.find_nonzero(src).is_some() {
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
