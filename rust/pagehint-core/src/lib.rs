//! pagehint-core: the dirty-bitmap engine behind pagehint, free of Python.
//!
//! A [`DirtyBitmap`] holds one bit per guest page in the KVM dirty-log word layout; its bulk
//! loops live in [`kernels`], compiled per instruction-set level and chosen at run time.
//! [`dirty_ring`] harvests KVM's per-vCPU dirty rings into it.

pub mod bitmap;
pub mod dirty_ring;
pub mod error;
pub mod free_page;
pub mod guest_memory;
pub mod hints;
pub mod kernels;
pub mod memmap;
pub mod span;
#[cfg(feature = "test-utils")]
pub mod test_utils;
pub mod virtq;
pub mod words;

pub use bitmap::{DirtyBitmap, MAX_PAGES};
pub use dirty_ring::{
    DirtyGfn, DirtyRing, HarvestOutcome, RingError, RingRejects, SlotPages, SlotTable,
    harvest as harvest_dirty_ring,
};
pub use error::{BitmapError, SimdError};
pub use guest_memory::{GuestRam, OutsideRam};
pub use hints::{HintApplier, HintOutcome, HintRejects, apply_hints, apply_hints_recording};
pub use kernels::{Kernels, Level};
pub use memmap::{MapError, MemoryMap, Region};
pub use virtq::PackedQueue;
pub use virtq::{Chain, Desc, ElementError, QueueError, RejectCounts, SplitQueue};
pub use words::advise_huge_pages;
