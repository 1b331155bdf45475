//! pagehint-core: the dirty-bitmap engine and free-page-hint decoding behind pagehint, in pure
//! Rust with no Python, for a VMM to depend on directly.
//!
//! During pre-copy live migration a VMM sends every page its dirty bitmap marks. A guest with
//! virtio-balloon free page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`, virtio 1.2 §5.5,
//! "Free Page Hinting") reports memory it is not using as `(gpa, len)` buffers on the free
//! page queue; clearing those pages from the bitmap means they are not sent. This crate is
//! that path, device side:
//!
//! - [`DirtyBitmap`]: one bit per guest page in the `KVM_GET_DIRTY_LOG` word layout (bit `i`
//!   of `u64` word `j` is pfn `64*j + i`, as in QEMU's migration bitmap), its words reserved
//!   rather than committed so a bitmap may be larger than RAM and costs memory only where it
//!   was written.
//! - [`kernels`]: its bulk loops (count, clear, set, merge a dirty log, search), compiled per
//!   instruction-set level (scalar, AVX2, AVX-512, NEON) and chosen once at run time by CPU
//!   detection or `PAGEHINT_SIMD`.
//! - [`MemoryMap`]: which guest-physical addresses are RAM (with holes, such as x86's PCI
//!   hole) and where each region sits in the dense bitmap and RAM buffer; [`GuestRam`] is that
//!   buffer as the device reads it.
//! - [`hints`]: decoding `(gpa, len)` hints into bitmap pages. Only pages a hint covers
//!   completely are cleared (start rounded up, end down), and a hint with any byte outside RAM
//!   is rejected whole and counted, never an error.
//! - [`virtq`]: device-side readers of split (§2.7) and packed (§2.8) virtqueues, which treat
//!   guest memory as hostile: every index bounded, every descriptor copied once and then
//!   checked, loops limited; a bad element is counted and returned to the driver, a bad queue
//!   stops with a [`QueueError`].
//! - [`dirty_ring`]: harvesting KVM's per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`) into the
//!   bitmap, with the acquire/release protocol of `kvm_dirty_gfn` entries; a bad entry is
//!   counted and still collected, so the ring always drains.
//! - [`free_page`]: the free page queue drain, [`free_page::drain_hints`]: hint elements go
//!   from the ring straight into the bitmap, stopping at the first cmd id element so the
//!   device model's state machine (QEMU's `get_free_page_hints`) sees it in order.
//!
//! The other modules: [`error`] (API misuse errors, which leave the bitmap unchanged),
//! [`guest_memory`], [`memmap`], [`span`] (page ranges as masked words) and [`words`] (the
//! bitmap's storage). With the `test-utils` feature, `test_utils` holds a driver-side ring
//! writer for tests and fuzzing.
//!
//! # Safety and threads
//!
//! Guest RAM is a slice of `AtomicU8`: a vCPU may write it while the device reads, which is
//! never undefined behaviour here, only input to validate. The queue readers put in the fences
//! between ring fields that §2.7 and §2.8 require. A [`DirtyBitmap`] is `Send + Sync` and
//! changes only through `&mut`; a queue reader is used by one thread at a time (its methods
//! take `&mut self`). The `unsafe` code is the bitmap's allocation (`mmap`, `sysinfo`) and `madvise`, a prefetch,
//! the word-sized atomic view of an aligned ring field in guest RAM, and the calls into
//! `#[target_feature]` kernels, which a [`Kernels`] table allows only
//! after checking the CPU; each block states why it is sound.
//!
//! # Example: the hint path
//!
//! A guest with 64 KiB of RAM, a 64 KiB hole, then 64 KiB more; a split queue of 4 on which the
//! guest's driver has made three free page hint elements available, each one device-writable
//! buffer as Linux sends them: 12 KiB at gpa `0x8000`, 8 KiB at `0x2_0800` (not page aligned)
//! and 4 KiB at `0x1_0000`, inside the hole.
//!
//! ```
//! use pagehint_core::free_page::{DrainStop, drain_hints};
//! use pagehint_core::guest_memory::zeroed_ram;
//! use pagehint_core::{Chain, DirtyBitmap, GuestRam, HintApplier, MemoryMap, SplitQueue};
//! # use pagehint_core::test_utils::SplitRing;
//! # use pagehint_core::virtq::VIRTQ_DESC_F_WRITE;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//!
//! // 4 KiB pages: pfns 0..16 are gpa 0..0x1_0000, pfns 16..32 are gpa 0x2_0000..0x3_0000.
//! let map = MemoryMap::new(&[(0, 0x1_0000), (0x2_0000, 0x1_0000)], 4096)?;
//! let buf = zeroed_ram(usize::try_from(map.ram_bytes())?);
//! let ram = GuestRam::new(&map, &buf).ok_or("buffer smaller than the map")?;
//! // The guest's side, hidden here: descriptors 0, 1, 2 and heads 0, 1, 2 on the available
//! // ring (written with the `test-utils` feature's `test_utils::SplitRing`).
//! # let ring = SplitRing { size: 4, desc: 0x1000, avail: 0x2000, used: 0x3000 };
//! # for (head, (addr, len)) in [(0x8000, 0x3000), (0x2_0800, 0x2000), (0x1_0000, 0x1000)]
//! #     .into_iter()
//! #     .enumerate()
//! # {
//! #     let head = u16::try_from(head)?;
//! #     ring.write_desc(&ram, head, addr, len, VIRTQ_DESC_F_WRITE, 0)?;
//! #     ring.publish(&ram, head)?;
//! # }
//!
//! // The device side: the queue as the driver configured it, every page dirty to start.
//! let mut queue = SplitQueue::new(&ram, 4, 0x1000, 0x2000, 0x3000, false)?;
//! let mut bitmap = DirtyBitmap::new_dirty(map.npages())?;
//! let mut applier = HintApplier::new(&mut bitmap, &map)?;
//! let mut chain = Chain::new();
//! let (returned, stop) = drain_hints(&mut queue, &ram, &mut chain, Some(&mut applier), 64);
//! let outcome = applier.finish();
//!
//! // Two hint elements were applied and returned used; the one in the hole was rejected by
//! // the queue reader (and returned with length 0 too).
//! assert_eq!((returned, stop), (2, DrainStop::Empty));
//! assert_eq!(queue.counts().buffer_outside_ram, 1);
//! assert_eq!(queue.next_used(), 3);
//!
//! // pfns 8, 9, 10, and 17: the only page [0x2_0800, 0x2_2800) covers completely.
//! assert_eq!(outcome.pages_cleared, 4);
//! assert_eq!(bitmap.count_all(), 32 - 4);
//! for pfn in [8, 9, 10, 17] {
//!     assert!(!bitmap.test(pfn)?);
//! }
//! assert!(bitmap.test(16)? && bitmap.test(18)?);
//! # fn send_sync<T: Send + Sync>() {}
//! # send_sync::<DirtyBitmap>();
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod bitmap;
pub mod dirty_ring;
pub mod error;
pub mod free_page;
pub mod guest_memory;
pub mod hints;
pub mod kernels;
pub mod memmap;
pub mod range_batch;
pub mod span;
#[cfg(feature = "test-utils")]
pub mod test_utils;
pub mod virtq;
pub mod words;

pub use bitmap::{DirtyBitmap, IMAGE_CHUNK_WORDS, MAX_PAGES, SparseImage};
pub use dirty_ring::{
    DirtyGfn, DirtyRing, HarvestOutcome, RingError, RingRejects, SlotPages, SlotTable,
    harvest as harvest_dirty_ring,
};
pub use error::{BitmapError, SimdError};
pub use guest_memory::{GuestRam, OutsideRam, RamArea};
pub use hints::{HintApplier, HintOutcome, HintRejects, apply_hints, apply_hints_recording};
pub use kernels::{Kernels, Level, TAKE_SPARE};
pub use memmap::{MapError, MemoryMap, Region};
pub use virtq::PackedQueue;
pub use virtq::{Chain, Desc, ElementError, QueueError, RejectCounts, SplitQueue};
pub use words::advise_huge_pages;
