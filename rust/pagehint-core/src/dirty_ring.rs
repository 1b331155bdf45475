//! Harvesting a KVM dirty ring into a [`DirtyBitmap`].
//!
//! With `KVM_CAP_DIRTY_LOG_RING` (or `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` on weakly ordered
//! hosts) KVM reports dirty pages per vCPU in a ring of `struct kvm_dirty_gfn { __u32 flags;
//! __u32 slot; __u64 offset; }` entries, mmapped from the vCPU fd at page offset
//! [`KVM_DIRTY_LOG_PAGE_OFFSET`] (Linux `Documentation/virt/kvm/api.rst`, "KVM_CAP_DIRTY_LOG_RING";
//! `include/uapi/linux/kvm.h`). `slot` is `(as_id << 16) | slot_id` and `offset` the page
//! offset inside that memslot.
//!
//! Each entry cycles through three states, told apart by its flags:
//!
//! ```text
//!   0 (invalid) --KVM pushes--> DIRTY --userspace collects--> RESET --KVM_RESET_DIRTY_RINGS--> 0
//! ```
//!
//! The kernel writes `slot` and `offset` and then publishes the entry with a store-release of
//! [`KVM_DIRTY_GFN_F_DIRTY`]. The collector, starting from the fetch index it keeps, reads the
//! flags with a load-acquire (so `slot` and `offset` are the ones published with them), reads
//! the two fields, and hands the entry back with a store-release of [`KVM_DIRTY_GFN_F_RESET`]
//! (so those reads are complete before the kernel, whose reset reads the flags with a
//! load-acquire, may reuse the entry). It stops at the first entry that is not dirtied: the
//! producer's position. This is the `ACQ_REL` contract; on x86 (TSO) the same code compiles to
//! plain loads and stores. QEMU's `kvm_dirty_ring_reap_one` in `accel/kvm/kvm-all.c` walks the
//! ring the same way; the VMM then issues `KVM_RESET_DIRTY_RINGS`, which this module leaves to
//! it.
//!
//! Everything in the ring is written by another party, so nothing read from it is trusted: an
//! entry naming an address space other than 0, a slot the [`SlotTable`] does not know, or an
//! offset past its slot's pages is not applied but counted by reason, and still collected, so
//! the ring drains and the vCPU is never left waiting on a full ring. A walk takes at most one
//! lap of the ring, however fast the producer refills it.

#![warn(missing_docs)]

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::bitmap::DirtyBitmap;
use crate::span::{bit_of, word_of};

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page not yet collected.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;

/// `KVM_DIRTY_GFN_F_RESET`: userspace collected the entry; the kernel may reset it.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// The page offset (in host pages) of the dirty ring in a vCPU fd's mmap space.
pub const KVM_DIRTY_LOG_PAGE_OFFSET: u64 = 64;

/// Bytes per ring entry (`sizeof(struct kvm_dirty_gfn)`).
pub const ENTRY_BYTES: usize = 16;

/// The two flag bits that encode an entry's state.
const STATE_BITS: u32 = KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET;

/// One `struct kvm_dirty_gfn`, in the kernel's layout, with every field atomic because the
/// kernel writes the ring while the collector reads it.
#[repr(C)]
#[derive(Debug, Default)]
pub struct DirtyGfn {
    flags: AtomicU32,
    slot: AtomicU32,
    offset: AtomicU64,
}

const _: () = assert!(size_of::<DirtyGfn>() == ENTRY_BYTES && align_of::<DirtyGfn>() == 8);

impl DirtyGfn {
    /// An invalid (empty) entry.
    pub const fn new() -> Self {
        Self {
            flags: AtomicU32::new(0),
            slot: AtomicU32::new(0),
            offset: AtomicU64::new(0),
        }
    }

    /// The flags, loaded with acquire ordering: if they say dirty, the `slot` and `offset`
    /// published with them are visible.
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    /// The `slot` field: `(as_id << 16) | slot_id`.
    pub fn slot(&self) -> u32 {
        self.slot.load(Ordering::Relaxed)
    }

    /// The `offset` field: the page offset inside the memslot.
    pub fn offset(&self) -> u64 {
        self.offset.load(Ordering::Relaxed)
    }

    /// Whether the entry is dirtied and not yet collected (DIRTY set, RESET clear; other
    /// flag bits are ignored).
    fn is_dirtied(flags: u32) -> bool {
        flags & STATE_BITS == KVM_DIRTY_GFN_F_DIRTY
    }

    /// The producer's side, as the kernel pushes a dirty page: writes `slot` and `offset`, then
    /// publishes them with a store-release of the DIRTY flag. For simulators and tests; the
    /// caller must own the entry (it is invalid or was collected).
    pub fn publish(&self, slot: u32, offset: u64) {
        self.slot.store(slot, Ordering::Relaxed);
        self.offset.store(offset, Ordering::Relaxed);
        self.flags.store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
    }

    /// The kernel's reset of one entry (`KVM_RESET_DIRTY_RINGS`): if the collector marked it
    /// RESET (seen with acquire), returns its `(slot, offset)` and makes it invalid again with
    /// a store-release; otherwise `None` and nothing changes. For simulators and tests.
    pub fn reset_if_collected(&self) -> Option<(u32, u64)> {
        if self.flags() & KVM_DIRTY_GFN_F_RESET == 0 {
            return None;
        }
        let fields = (self.slot(), self.offset());
        self.flags.store(0, Ordering::Release);
        Some(fields)
    }

    /// Collects a dirtied entry: store-release of RESET, after its fields were read.
    fn set_collected(&self) {
        self.flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
    }
}

/// Why a ring or a slot table was refused. Every refusal happens before anything is read from
/// the ring or written to the bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// The ring's bytes are not a whole number of 16-byte entries.
    PartialEntry {
        /// Bytes given.
        bytes: usize,
    },
    /// The ring does not start on an 8-byte boundary (an mmapped ring starts on a page).
    Misaligned {
        /// The start address.
        addr: usize,
    },
    /// The entry count is not a power of two of at most 2^32 (KVM's ring sizes are).
    NotPowerOfTwo {
        /// Entries given.
        entries: usize,
    },
    /// A slot id appears twice in a slot table.
    DuplicateSlot {
        /// The slot id.
        slot: u16,
    },
    /// A slot's pages `[first_page, first_page + npages)` are not all inside the bitmap.
    SlotPastBitmap {
        /// The slot id.
        slot: u16,
        /// Its first bitmap page.
        first_page: u64,
        /// Its pages.
        npages: u64,
        /// Pages in the bitmap.
        bitmap_pages: u64,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PartialEntry { bytes } => write!(
                f,
                "a dirty ring of {bytes} bytes is not a whole number of {ENTRY_BYTES}-byte entries"
            ),
            Self::Misaligned { addr } => {
                write!(f, "the dirty ring at {addr:#x} is not 8-byte aligned")
            }
            Self::NotPowerOfTwo { entries } => write!(
                f,
                "a dirty ring of {entries} entries: the count must be a power of two up to 2^32"
            ),
            Self::DuplicateSlot { slot } => write!(f, "slot {slot} appears twice"),
            Self::SlotPastBitmap {
                slot,
                first_page,
                npages,
                bitmap_pages,
            } => write!(
                f,
                "slot {slot}: pages [{first_page}, {first_page}+{npages}) are not inside the \
                 bitmap's {bitmap_pages} pages"
            ),
        }
    }
}

impl std::error::Error for RingError {}

/// One vCPU's dirty ring: a power-of-two number of entries.
#[derive(Debug, Clone, Copy)]
pub struct DirtyRing<'a> {
    entries: &'a [DirtyGfn],
    /// `entries.len() - 1`: the ring index of a free-running `u32` fetch index.
    mask: u32,
}

impl<'a> DirtyRing<'a> {
    /// A ring over `entries`; `NotPowerOfTwo` unless their count is a power of two up to 2^32.
    pub fn new(entries: &'a [DirtyGfn]) -> Result<Self, RingError> {
        let n = entries.len();
        if !n.is_power_of_two() {
            return Err(RingError::NotPowerOfTwo { entries: n });
        }
        let mask = u32::try_from(n - 1).map_err(|_| RingError::NotPowerOfTwo { entries: n })?;
        Ok(Self { entries, mask })
    }

    /// A ring over `bytes` bytes of memory at `ptr` (an mmapped vCPU ring, or a buffer standing
    /// in for one). Refused unless `ptr` is 8-byte aligned and `bytes` is 16 times a power of
    /// two (up to 2^32 entries); nothing is read before that check.
    ///
    /// # Safety
    ///
    /// For all of `'a`, the `bytes` bytes at `ptr` must be valid for reads and writes, and every
    /// other access to them must be atomic or the kernel's dirty-ring protocol (no Rust `&mut`,
    /// no non-atomic writes by this process).
    pub unsafe fn from_raw_parts(ptr: *mut u8, bytes: usize) -> Result<Self, RingError> {
        if !bytes.is_multiple_of(ENTRY_BYTES) {
            return Err(RingError::PartialEntry { bytes });
        }
        let addr = ptr as usize;
        if !addr.is_multiple_of(align_of::<DirtyGfn>()) || ptr.is_null() {
            return Err(RingError::Misaligned { addr });
        }
        let n = bytes / ENTRY_BYTES;
        if !n.is_power_of_two() {
            return Err(RingError::NotPowerOfTwo { entries: n });
        }
        // SAFETY: `ptr` is non-null and aligned for `DirtyGfn` (checked above); the caller
        // guarantees the `n * 16` bytes are valid for reads and writes for `'a` and are only
        // accessed atomically elsewhere, and `DirtyGfn` is `repr(C)` atomics of the kernel's
        // layout for which every bit pattern is valid.
        let entries = unsafe { std::slice::from_raw_parts(ptr.cast_const().cast::<DirtyGfn>(), n) };
        Self::new(entries)
    }

    /// Entries in the ring.
    pub const fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false: a ring has at least one entry.
    pub const fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in ring order.
    pub const fn entries(&self) -> &'a [DirtyGfn] {
        self.entries
    }

    /// The entry a free-running index points at.
    pub fn at(&self, index: u32) -> &'a DirtyGfn {
        // `index & mask < len` for a power-of-two length; a u32 fits usize on every target
        // this crate builds for (it needs 64-bit words).
        &self.entries[(index & self.mask) as usize]
    }
}

/// Where a memslot's pages sit in the bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPages {
    /// The bitmap page of the slot's page 0.
    pub first_page: u64,
    /// Pages in the slot.
    pub npages: u64,
}

/// Memslot ids (of address space 0) to bitmap pages: what a dirty ring entry's `(slot,
/// offset)` means. Slots may share bitmap pages (aliases); an id may appear once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotTable {
    by_id: Vec<Option<SlotPages>>,
}

impl SlotTable {
    /// A table of `(slot_id, first_page, npages)`; `DuplicateSlot` if an id repeats. Whether the
    /// pages fit a bitmap is checked against that bitmap when harvesting.
    pub fn new(slots: &[(u16, u64, u64)]) -> Result<Self, RingError> {
        let len = slots.iter().map(|&(id, _, _)| usize::from(id) + 1).max();
        let mut by_id = vec![None; len.unwrap_or(0)];
        for &(slot, first_page, npages) in slots {
            let entry = &mut by_id[usize::from(slot)];
            if entry.is_some() {
                return Err(RingError::DuplicateSlot { slot });
            }
            *entry = Some(SlotPages { first_page, npages });
        }
        Ok(Self { by_id })
    }

    /// The pages of slot `id`, if the table has it.
    pub fn get(&self, id: u16) -> Option<SlotPages> {
        self.by_id.get(usize::from(id)).copied().flatten()
    }

    /// The slots as `(slot_id, pages)`, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u16, SlotPages)> + '_ {
        (0..=u16::MAX)
            .zip(&self.by_id)
            .filter_map(|(id, s)| s.map(|s| (id, s)))
    }

    /// Checks that every slot's pages lie inside a bitmap of `bitmap_pages` pages.
    pub fn check(&self, bitmap_pages: u64) -> Result<(), RingError> {
        for (slot, s) in self.iter() {
            if s.first_page
                .checked_add(s.npages)
                .is_none_or(|end| end > bitmap_pages)
            {
                return Err(RingError::SlotPastBitmap {
                    slot,
                    first_page: s.first_page,
                    npages: s.npages,
                    bitmap_pages,
                });
            }
        }
        Ok(())
    }
}

/// Ring entries collected but not applied, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingRejects {
    /// The entry names a slot id the table does not have.
    pub unknown_slot: u64,
    /// The entry's address space id (`slot >> 16`) is not 0.
    pub address_space: u64,
    /// The entry's offset is at or past its slot's page count.
    pub offset_past_slot: u64,
}

impl RingRejects {
    /// Every reason with its name, for reports.
    pub const fn by_reason(&self) -> [(&'static str, u64); 3] {
        [
            ("unknown_slot", self.unknown_slot),
            ("address_space", self.address_space),
            ("offset_past_slot", self.offset_past_slot),
        ]
    }

    /// All rejected entries.
    pub const fn total(&self) -> u64 {
        self.unknown_slot + self.address_space + self.offset_past_slot
    }
}

/// What one harvest of a ring did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestOutcome {
    /// Entries collected (marked RESET), rejected ones included: what the VMM's
    /// `KVM_RESET_DIRTY_RINGS` will reset for this ring.
    pub entries: u64,
    /// Pages that were clean in the bitmap and are now dirty.
    pub pages_dirtied: u64,
    /// Entries collected but not applied, by reason.
    pub rejected: RingRejects,
    /// Where the next harvest of this ring starts (the old index plus `entries`, wrapping).
    pub fetch_index: u32,
}

/// Collects every dirtied entry of `ring` from `fetch_index` on into `bitmap` through `slots`,
/// marking each collected, and stops at the first entry that is not dirtied (or after one lap).
///
/// Refused, with nothing read or written, only when a slot's pages are not inside the bitmap
/// (`SlotPastBitmap`); bad entries are counted in the outcome, never an error.
pub fn harvest(
    bitmap: &mut DirtyBitmap,
    ring: DirtyRing<'_>,
    fetch_index: u32,
    slots: &SlotTable,
) -> Result<HarvestOutcome, RingError> {
    slots.check(bitmap.npages())?;
    let words = bitmap.words_mut();
    let mut out = HarvestOutcome {
        fetch_index,
        ..HarvestOutcome::default()
    };
    for _ in 0..ring.len() {
        let entry = ring.at(out.fetch_index);
        if !DirtyGfn::is_dirtied(entry.flags()) {
            break;
        }
        let (slot, offset) = (entry.slot(), entry.offset());
        entry.set_collected();
        out.entries += 1;
        out.fetch_index = out.fetch_index.wrapping_add(1);
        match page_of(slots, slot, offset, &mut out.rejected) {
            // Every slot was checked to lie inside the bitmap and `offset < npages`, so the
            // word exists; `get_mut` keeps even a broken invariant from panicking.
            Some(pfn) => {
                if let Some(w) = words.get_mut(word_of(pfn)) {
                    let bit = bit_of(pfn);
                    out.pages_dirtied += u64::from(*w & bit == 0);
                    *w |= bit;
                }
            }
            None => continue,
        }
    }
    Ok(out)
}

/// The bitmap page of a ring entry, or `None` with the reason counted.
#[inline]
fn page_of(slots: &SlotTable, slot: u32, offset: u64, rejected: &mut RingRejects) -> Option<u64> {
    if slot >> 16 != 0 {
        rejected.address_space += 1;
        return None;
    }
    // The high half is zero, so the low half is the whole value.
    let id = u16::try_from(slot).unwrap_or(u16::MAX);
    let Some(pages) = slots.get(id) else {
        rejected.unknown_slot += 1;
        return None;
    };
    if offset >= pages.npages {
        rejected.offset_past_slot += 1;
        return None;
    }
    Some(pages.first_page + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> Vec<DirtyGfn> {
        (0..n).map(|_| DirtyGfn::new()).collect()
    }

    #[test]
    fn harvests_applies_and_collects_up_to_the_producer() {
        let entries = ring(8);
        let r = DirtyRing::new(&entries).expect("power of two");
        let slots = SlotTable::new(&[(0, 0, 100), (3, 100, 50)]).expect("table");
        let mut bm = DirtyBitmap::new(200).expect("bitmap");
        bm.set_range(5, 1).expect("in range");
        entries[0].publish(0, 5); // already dirty
        entries[1].publish(3, 7); // page 107
        entries[2].publish(3, 7); // same page again
        entries[3].publish(9, 0); // unknown slot
        entries[4].publish(1 << 16, 1); // address space 1
        entries[5].publish(3, 50); // past the slot
        let out = harvest(&mut bm, r, 0, &slots).expect("fits");
        assert_eq!(out.entries, 6);
        assert_eq!(out.pages_dirtied, 1);
        assert_eq!(out.fetch_index, 6);
        assert_eq!(
            out.rejected,
            RingRejects {
                unknown_slot: 1,
                address_space: 1,
                offset_past_slot: 1
            }
        );
        assert_eq!(bm.count_all(), 2);
        assert!(bm.test(107).expect("in range"));
        for (i, e) in entries.iter().enumerate() {
            let want = if i < 6 { KVM_DIRTY_GFN_F_RESET } else { 0 };
            assert_eq!(e.flags(), want, "entry {i}");
        }
        // Nothing new: the next harvest starts where this one stopped and finds nothing.
        let again = harvest(&mut bm, r, out.fetch_index, &slots).expect("fits");
        assert_eq!((again.entries, again.fetch_index), (0, 6));
    }

    #[test]
    fn stops_at_collected_or_odd_flags_and_takes_one_lap_at_most() {
        let entries = ring(4);
        let r = DirtyRing::new(&entries).expect("power of two");
        let slots = SlotTable::new(&[(0, 0, 64)]).expect("table");
        let mut bm = DirtyBitmap::new(64).expect("bitmap");
        for (i, e) in (0u64..).zip(&entries) {
            e.publish(0, i);
        }
        // DIRTY | RESET is not "dirtied": the walk stops there.
        entries[2].flags.store(
            KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET,
            Ordering::Relaxed,
        );
        let out = harvest(&mut bm, r, 0, &slots).expect("fits");
        assert_eq!((out.entries, out.fetch_index), (2, 2));
        // Unknown high flag bits are ignored; a full ring is one lap, then the walk returns.
        for (i, e) in (0u64..).zip(&entries) {
            e.publish(0, 10 + i);
            e.flags
                .store(KVM_DIRTY_GFN_F_DIRTY | 0x100, Ordering::Relaxed);
        }
        let out = harvest(&mut bm, r, u32::MAX, &slots).expect("fits");
        assert_eq!((out.entries, out.fetch_index), (4, 3));
        assert_eq!(bm.count(10, 4), Ok(4));
    }

    #[test]
    fn refuses_bad_geometry_and_slots_before_touching_anything() {
        assert_eq!(
            DirtyRing::new(&ring(6)).map(|r| r.len()),
            Err(RingError::NotPowerOfTwo { entries: 6 })
        );
        assert!(DirtyRing::new(&[]).is_err());
        let mut words = [0u64; 8];
        let p = words.as_mut_ptr().cast::<u8>();
        // SAFETY: `words` is 64 writable bytes that outlive the ring and nothing else touches
        // them; no ring is built from misaligned or partial input.
        let ok = unsafe { DirtyRing::from_raw_parts(p, 64) }.map(|r| r.len());
        assert_eq!(ok, Ok(4));
        // SAFETY: as above; the call refuses the length before building anything.
        let partial = unsafe { DirtyRing::from_raw_parts(p, 40) }.map(|r| r.len());
        assert_eq!(partial, Err(RingError::PartialEntry { bytes: 40 }));
        // SAFETY: as above; the call refuses the count (3 entries) before building anything.
        let three = unsafe { DirtyRing::from_raw_parts(p, 48) }.map(|r| r.len());
        assert_eq!(three, Err(RingError::NotPowerOfTwo { entries: 3 }));
        let odd = p.wrapping_add(4);
        // SAFETY: as above; the call refuses the alignment before building anything.
        let misaligned = unsafe { DirtyRing::from_raw_parts(odd, 32) }.map(|r| r.len());
        assert_eq!(
            misaligned,
            Err(RingError::Misaligned { addr: odd as usize })
        );
        assert_eq!(
            SlotTable::new(&[(1, 0, 1), (1, 5, 1)]),
            Err(RingError::DuplicateSlot { slot: 1 })
        );

        let entries = ring(2);
        entries[0].publish(0, 0);
        let r = DirtyRing::new(&entries).expect("power of two");
        let mut bm = DirtyBitmap::new(10).expect("bitmap");
        for table in [&[(0, 5, 6)][..], &[(0, 0, 1), (7, u64::MAX, 2)]] {
            let slots = SlotTable::new(table).expect("table");
            assert!(matches!(
                harvest(&mut bm, r, 0, &slots),
                Err(RingError::SlotPastBitmap { .. })
            ));
        }
        assert_eq!(entries[0].flags(), KVM_DIRTY_GFN_F_DIRTY, "not collected");
        assert_eq!(bm.count_all(), 0);
    }

    #[test]
    fn reset_only_takes_collected_entries() {
        let e = DirtyGfn::new();
        assert_eq!(e.reset_if_collected(), None);
        e.publish(2, 9);
        assert_eq!(e.reset_if_collected(), None);
        e.set_collected();
        assert_eq!(e.reset_if_collected(), Some((2, 9)));
        assert_eq!(e.flags(), 0);
    }
}
