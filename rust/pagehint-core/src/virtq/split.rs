//! The split virtqueue (virtio 1.2 §2.7), device side.
//!
//! Layout in guest memory (all little-endian):
//!
//! ```text
//! descriptor table  align 16  16 * size       {addr u64, len u32, flags u16, next u16}[size]
//! available ring    align 2   6 + 2 * size    {flags u16, idx u16, ring u16[size], used_event u16}
//! used ring         align 4   6 + 8 * size    {flags u16, idx u16, {id u32, len u32}[size], avail_event u16}
//! ```
//!
//! Rules chosen here (each bad element is counted by reason, returned with used length 0, and
//! the queue goes on; see [`ElementError`]):
//! - Every descriptor is read once, as 16 bytes, into a local copy, then validated, then used:
//!   the guest changing it meanwhile cannot make a checked value differ from a used one.
//! - A chain may follow at most as many descriptors as its table holds (the queue size for the
//!   descriptor table, `len / 16` for an indirect table); one more is a loop. QEMU resets its
//!   limit the same way on entering an indirect table. So one element costs at most
//!   `2 * size` descriptor reads.
//! - An indirect table must hold 1 to `size` descriptors (§2.7.5.3.1: "A driver MUST NOT
//!   create a descriptor chain longer than the Queue Size of the device"), be a multiple of 16
//!   bytes, lie in guest RAM, and have no NEXT flag; so it is always the last descriptor of
//!   the direct chain, which §2.7.5.3.2 allows ("zero or more normal chained descriptors
//!   followed by a single descriptor with INDIRECT"). Its WRITE flag is ignored (§2.7.5.3.2).
//!   Descriptors inside it must not be INDIRECT.
//! - Zero-length buffers are rejected, as QEMU's `virtqueue_map_desc` does ("zero sized
//!   buffers are not allowed"): a 0-byte hint means nothing and a 0-byte out-buffer cannot
//!   hold a command id.
//! - Buffers are never dereferenced here; only their `(addr, len)` is checked to be entirely
//!   RAM in a [`MemoryMap`] (by default the one of the [`GuestRam`]), and the sum of the
//!   lengths to fit 32 bits.
//! - Device-readable buffers must come before device-writable ones (§2.7.4.2).
//!
//! A batch of calls (a drain) resolves the three rings to their bytes in the host buffer once
//! ([`SplitQueue::rings`]), so a ring field costs a bounds check and one load or store of its
//! width; it writes each used element as it is returned and publishes them all with one Release
//! fence and used index write at the end ([`SplitQueue::flush_used_in`]), as QEMU's
//! `virtqueue_fill`/`virtqueue_flush` do. Single calls (`pop`, `add_used`) do both each time.
//!
//! Queue faults (see [`QueueError`]) stop the queue: a head index at or past the queue size
//! (QEMU `virtqueue_get_head`), an available index more than `size` ahead (QEMU
//! `virtqueue_num_heads`), or a ring access that fails.
//!
//! With `VIRTIO_RING_F_EVENT_IDX`, the reader writes `avail_event` = the next available index
//! it will read after each element it takes, as QEMU's `virtqueue_split_pop` does, so the
//! driver notifies for every new buffer; and [`SplitQueue::needs_interrupt`] follows
//! `used_event` with QEMU's `virtio_split_should_notify` logic. Without it, it honours
//! `VIRTQ_AVAIL_F_NO_INTERRUPT` and leaves the used ring's flags alone.

use std::sync::atomic::{Ordering, fence};

use super::{
    Chain, DESC_SIZE, ElementError, MAX_QUEUE_SIZE, QueueError, RejectCounts, Ring,
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    check_indirect_table, push_buffer, vring_need_event,
};
use crate::guest_memory::{GuestRam, RamArea};
use crate::memmap::MemoryMap;

/// A split queue's three rings in one guest RAM, resolved once ([`GuestRam::area`]) for a
/// batch of elements taken and returned, and the memory map buffers are checked against.
/// Made by [`SplitQueue::rings`]; it reads nothing by itself.
#[derive(Debug, Clone, Copy)]
pub struct SplitRings<'a> {
    ram: GuestRam<'a>,
    layout: &'a MemoryMap,
    desc: RamArea<'a>,
    avail: RamArea<'a>,
    used: RamArea<'a>,
}

/// A descriptor as read from guest memory, before any check.
#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl RawDesc {
    /// Reads descriptor `index` of `table` as two little-endian words (one load each when
    /// aligned, as the descriptor table always is).
    fn read(table: &RamArea<'_>, index: u32) -> Option<Self> {
        let [addr, rest] = table.read_u64s::<2>(DESC_SIZE * u64::from(index)).ok()?;
        // The fields of the second word, by their byte offsets 8, 12 and 14.
        #[allow(clippy::cast_possible_truncation)]
        Some(Self {
            addr,
            len: rest as u32,
            flags: (rest >> 32) as u16,
            next: (rest >> 48) as u16,
        })
    }
}

/// A fault while reading one element: of the element, or of the whole queue.
enum Fault {
    Element(ElementError),
    Queue(QueueError),
}

impl From<ElementError> for Fault {
    fn from(e: ElementError) -> Self {
        Self::Element(e)
    }
}

/// A split virtqueue, read by the device.
#[derive(Debug, Clone)]
pub struct SplitQueue {
    size: u16,
    desc_gpa: u64,
    avail_gpa: u64,
    used_gpa: u64,
    event_idx: bool,
    /// Next available-ring index to read.
    last_avail: u16,
    /// The available index as last read from guest memory (QEMU's `shadow_avail_idx`).
    shadow_avail: u16,
    /// Next used-ring index to write.
    next_used: u16,
    /// Whether used elements were written after the last used index write.
    used_unpublished: bool,
    /// Used index at the last interrupt decision, if any (QEMU's `signalled_used`).
    signalled_used: Option<u16>,
    /// How many times each head was taken and not yet returned; `size` entries. (A driver
    /// that makes a head available again while it is in flight breaks the ring's rules, but
    /// QEMU serves it, and so does this reader: the head is then in flight twice.)
    in_flight: Vec<u32>,
    /// Sum of `in_flight`. The elements in flight number `last_avail - next_used`; those not
    /// counted here were in flight before the last `set_indices`, with heads unknown.
    known_in_flight: u32,
    error: Option<QueueError>,
    counts: RejectCounts,
}

impl SplitQueue {
    /// A queue of `size` descriptors with its three rings at the given guest-physical
    /// addresses; indices start at 0. Checks the size (non-zero, at most 32768, a power of
    /// two), each ring's alignment (16, 2, 4) and that each ring lies entirely in `ram`.
    pub fn new(
        ram: &GuestRam<'_>,
        size: u16,
        desc_gpa: u64,
        avail_gpa: u64,
        used_gpa: u64,
        event_idx: bool,
    ) -> Result<Self, QueueError> {
        if size == 0 {
            return Err(QueueError::ZeroSize);
        }
        if size > MAX_QUEUE_SIZE {
            return Err(QueueError::SizeTooLarge { size });
        }
        if !size.is_power_of_two() {
            return Err(QueueError::SizeNotPowerOfTwo { size });
        }
        let n = u64::from(size);
        let rings = [
            (Ring::Desc, desc_gpa, 16, DESC_SIZE * n),
            (Ring::Avail, avail_gpa, 2, 6 + 2 * n),
            (Ring::Used, used_gpa, 4, 6 + 8 * n),
        ];
        for (ring, gpa, align, _) in rings {
            if !gpa.is_multiple_of(align) {
                return Err(QueueError::Misaligned { ring, gpa, align });
            }
        }
        for (ring, gpa, _, len) in rings {
            if !ram.contains(gpa, len) {
                return Err(QueueError::RingOutsideRam { ring, gpa, len });
            }
        }
        // The rings are in RAM, so their ends do not overflow.
        let used_end = used_gpa + 6 + 8 * n;
        for (ring, gpa, _, len) in &rings[..2] {
            if *gpa < used_end && used_gpa < gpa + len {
                return Err(QueueError::UsedRingOverlaps { ring: *ring });
            }
        }
        Ok(Self {
            size,
            desc_gpa,
            avail_gpa,
            used_gpa,
            event_idx,
            last_avail: 0,
            shadow_avail: 0,
            next_used: 0,
            used_unpublished: false,
            signalled_used: None,
            in_flight: vec![0; usize::from(size)],
            known_in_flight: 0,
            error: None,
            counts: RejectCounts::default(),
        })
    }

    /// Queue size (descriptors).
    pub const fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical address of the descriptor table.
    pub const fn desc_gpa(&self) -> u64 {
        self.desc_gpa
    }

    /// Guest-physical address of the available ring.
    pub const fn avail_gpa(&self) -> u64 {
        self.avail_gpa
    }

    /// Guest-physical address of the used ring.
    pub const fn used_gpa(&self) -> u64 {
        self.used_gpa
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub const fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The next available-ring index the reader will take.
    pub const fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// The next used-ring index the reader will write.
    pub const fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Why the queue broke, if it did; a broken queue takes and returns nothing more.
    pub const fn error(&self) -> Option<&QueueError> {
        self.error.as_ref()
    }

    /// Whether the queue broke.
    pub const fn is_broken(&self) -> bool {
        self.error.is_some()
    }

    /// Rejected elements by reason.
    pub const fn counts(&self) -> &RejectCounts {
        &self.counts
    }

    /// Resumes at the given indices (after migration, or from a dump): the next element taken
    /// is available-ring index `last_avail`, the next one returned goes to used-ring index
    /// `next_used`. Forgets the last interrupt decision (the next `needs_interrupt` with
    /// EVENT_IDX says yes, as QEMU does after loading a queue). A broken queue stays broken.
    /// Refuses (changing nothing) a used index ahead of the available one or more than a queue
    /// behind it, as QEMU's `virtio_load` does: elements in flight cannot exceed the queue.
    ///
    /// The `last_avail - next_used` elements in flight then were taken before, by a reader
    /// whose heads this one cannot know (the device that took them knows): until they are
    /// returned, [`add_used`](Self::add_used) accepts that many heads it did not take itself,
    /// as QEMU trusts a loaded device (`vq->inuse`). Elements filled and not yet flushed
    /// ([`fill_used_in`](Self::fill_used_in)) stay unpublished: flush first.
    pub fn set_indices(&mut self, last_avail: u16, next_used: u16) -> Result<(), QueueError> {
        if last_avail.wrapping_sub(next_used) > self.size {
            return Err(QueueError::IndicesInconsistent {
                last_avail,
                next_used,
                size: self.size,
            });
        }
        self.last_avail = last_avail;
        self.shadow_avail = last_avail;
        self.next_used = next_used;
        self.used_unpublished = false;
        self.signalled_used = None;
        self.in_flight.fill(0);
        self.known_in_flight = 0;
        Ok(())
    }

    /// Elements in flight: taken and not yet returned.
    pub const fn in_flight(&self) -> u16 {
        self.last_avail.wrapping_sub(self.next_used)
    }

    /// Elements in flight since before the last `set_indices`, whose heads are unknown.
    fn unknown_in_flight(&self) -> u32 {
        u32::from(self.in_flight()).saturating_sub(self.known_in_flight)
    }

    fn fail<T>(&mut self, e: QueueError) -> Option<T> {
        self.error = Some(e);
        None
    }

    const fn ring_error(&self, ring: Ring) -> QueueError {
        let n = self.size as u64;
        let (gpa, len) = match ring {
            Ring::Desc => (self.desc_gpa, DESC_SIZE * n),
            Ring::Avail => (self.avail_gpa, 6 + 2 * n),
            Ring::Used => (self.used_gpa, 6 + 8 * n),
        };
        QueueError::RingOutsideRam { ring, gpa, len }
    }

    /// The rings in `ram`, resolved for many calls of [`pop_in`](Self::pop_in),
    /// [`fill_used_in`](Self::fill_used_in) and [`flush_used_in`](Self::flush_used_in), with
    /// buffers checked against `ram`'s memory map.
    pub fn rings<'a>(&self, ram: &GuestRam<'a>) -> SplitRings<'a> {
        self.rings_with_layout(ram, ram.map())
    }

    /// [`rings`](Self::rings), with buffers checked against `layout` (see
    /// [`pop_with_layout`](Self::pop_with_layout)).
    pub fn rings_with_layout<'a>(
        &self,
        ram: &GuestRam<'a>,
        layout: &'a MemoryMap,
    ) -> SplitRings<'a> {
        let n = u64::from(self.size);
        SplitRings {
            ram: *ram,
            layout,
            desc: ram.area(self.desc_gpa, DESC_SIZE * n),
            avail: ram.area(self.avail_gpa, 6 + 2 * n),
            used: ram.area(self.used_gpa, 6 + 8 * n),
        }
    }

    /// Takes the next available element, checking its buffers against `ram`'s memory map.
    /// See [`pop_with_layout`](Self::pop_with_layout).
    pub fn pop(
        &mut self,
        ram: &GuestRam<'_>,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        self.pop_in(&self.rings(ram), chain)
    }

    /// Takes the next available element: reads the rings and descriptor tables through
    /// `ram`, and checks each buffer's `(addr, len)` to be RAM in `layout` (buffers are
    /// never dereferenced, so `layout` may describe more RAM than `ram` holds, e.g. a replay
    /// of a dump that keeps only the ring pages).
    ///
    /// - `Some(Ok(head))`: `chain` holds the element's buffers; give it back with
    ///   [`add_used`](Self::add_used).
    /// - `Some(Err(reason))`: the element was rejected, counted, and already returned to the
    ///   used ring with length 0; call again for the next one.
    /// - `None`: nothing available, or the queue is broken (see [`error`](Self::error)).
    ///
    /// Allocates nothing once `chain` has grown to the longest chain seen.
    pub fn pop_with_layout(
        &mut self,
        ram: &GuestRam<'_>,
        layout: &MemoryMap,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        self.pop_in(&self.rings_with_layout(ram, layout), chain)
    }

    /// [`pop_with_layout`](Self::pop_with_layout) through rings already resolved.
    pub fn pop_in(
        &mut self,
        rings: &SplitRings<'_>,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        if self.error.is_some() {
            return None;
        }
        if self.last_avail == self.shadow_avail {
            let Ok(avail_idx) = rings.avail.read_u16(2) else {
                return self.fail(self.ring_error(Ring::Avail));
            };
            let pending = avail_idx.wrapping_sub(self.last_avail);
            if pending > self.size {
                return self.fail(QueueError::AvailIdxJump {
                    avail_idx,
                    last_avail: self.last_avail,
                    size: self.size,
                });
            }
            self.shadow_avail = avail_idx;
            if pending == 0 {
                return None;
            }
            // The ring entries and descriptors were written before the index: read them
            // only after it (pairs with the driver's write barrier before publishing idx).
            fence(Ordering::Acquire);
        }
        let slot = u64::from(self.last_avail & (self.size - 1));
        let Ok(head) = rings.avail.read_u16(4 + 2 * slot) else {
            return self.fail(self.ring_error(Ring::Avail));
        };
        if head >= self.size {
            self.counts.head_out_of_range = self.counts.head_out_of_range.saturating_add(1);
            return self.fail(QueueError::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        self.last_avail = self.last_avail.wrapping_add(1);
        if self.event_idx {
            let avail_event = 4 + 8 * u64::from(self.size);
            if rings.used.write_u16(avail_event, self.last_avail).is_err() {
                return self.fail(self.ring_error(Ring::Used));
            }
        }
        match self.read_chain(rings, head, chain) {
            Ok(()) => {
                let taken = &mut self.in_flight[usize::from(head)];
                *taken = taken.saturating_add(1);
                self.known_in_flight = self.known_in_flight.saturating_add(1);
                Some(Ok(head))
            }
            Err(Fault::Element(e)) => {
                self.counts.record(&e);
                if let Err(q) = self.push_used(rings, head, 0) {
                    return self.fail(q);
                }
                Some(Err(e))
            }
            Err(Fault::Queue(q)) => self.fail(q),
        }
    }

    /// Walks the chain at `head` (< size) into `chain`, checking every step.
    fn read_chain(
        &self,
        rings: &SplitRings<'_>,
        head: u16,
        chain: &mut Chain,
    ) -> Result<(), Fault> {
        chain.clear();
        let size = u32::from(self.size);
        let mut table = rings.desc;
        let mut entries = size;
        // The indirect table's address, once the chain has entered one.
        let mut indirect = None;
        let mut index = u32::from(head);
        let mut steps = 0u32;
        loop {
            steps += 1;
            if steps > entries {
                return Err(ElementError::ChainTooLong { limit: entries }.into());
            }
            let Some(d) = RawDesc::read(&table, index) else {
                return Err(match indirect {
                    // Unreachable while the map is unchanged: the table was checked.
                    Some(addr) => Fault::Element(ElementError::IndirectOutsideRam {
                        addr,
                        len: entries * 16,
                    }),
                    None => Fault::Queue(self.ring_error(Ring::Desc)),
                });
            };
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if indirect.is_some() {
                    return Err(ElementError::NestedIndirect.into());
                }
                if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(ElementError::IndirectWithNext.into());
                }
                let n = check_indirect_table(&rings.ram, d.addr, d.len, self.size)?;
                table = rings.ram.area(d.addr, u64::from(d.len));
                entries = n;
                indirect = Some(d.addr);
                index = 0;
                steps = 0;
                continue;
            }
            push_buffer(
                rings.layout,
                chain,
                d.addr,
                d.len,
                d.flags & VIRTQ_DESC_F_WRITE != 0,
            )?;
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            if u32::from(d.next) >= entries {
                return Err(ElementError::NextOutOfRange {
                    next: d.next,
                    limit: entries,
                }
                .into());
            }
            index = u32::from(d.next);
        }
    }

    /// Writes the used element at `next_used` and moves past it, without publishing it
    /// (QEMU's `virtqueue_fill`): the driver sees it at the next [`publish_used`](Self::publish_used).
    fn write_used_elem(
        &mut self,
        rings: &SplitRings<'_>,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used & (self.size - 1));
        // `{id: le32, len: le32}`: 4-aligned, as the used ring is.
        rings
            .used
            .write_u32s(4 + 8 * slot, [u32::from(head), len])
            .map_err(|_| self.ring_error(Ring::Used))?;
        self.next_used = self.next_used.wrapping_add(1);
        self.used_unpublished = true;
        Ok(())
    }

    /// Writes the used element, then publishes it with the used index.
    fn push_used(&mut self, rings: &SplitRings<'_>, head: u16, len: u32) -> Result<(), QueueError> {
        self.write_used_elem(rings, head, len)?;
        self.publish_used(rings)
    }

    /// Publishes every used element written since the last publication: a Release fence, then
    /// the used index (QEMU's `virtqueue_flush`). Nothing to publish writes nothing.
    fn publish_used(&mut self, rings: &SplitRings<'_>) -> Result<(), QueueError> {
        if !self.used_unpublished {
            return Ok(());
        }
        // The elements must be visible before the index that publishes them.
        fence(Ordering::Release);
        rings
            .used
            .write_u16(2, self.next_used)
            .map_err(|_| self.ring_error(Ring::Used))?;
        self.used_unpublished = false;
        Ok(())
    }

    /// Returns element `head` to the driver with `len` bytes written: writes the used
    /// element, a Release fence, then the used index. Refuses (changing nothing) a `head` at
    /// or past the queue size or not in flight (see [`check_used`](Self::check_used)), and
    /// does nothing on a broken queue; a failing ring write breaks the queue.
    pub fn add_used(&mut self, ram: &GuestRam<'_>, head: u16, len: u32) -> Result<(), QueueError> {
        let rings = self.rings(ram);
        self.fill_used_in(&rings, head, len)?;
        self.flush_used_in(&rings)
    }

    /// [`add_used`](Self::add_used) without the used index (QEMU's `virtqueue_fill`): the
    /// element is written, but the driver need not see it before
    /// [`flush_used_in`](Self::flush_used_in) publishes every element filled so far with one
    /// index write. (Taking a rejected element publishes them too.)
    pub fn fill_used_in(
        &mut self,
        rings: &SplitRings<'_>,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        self.check_used(&[head])?;
        self.write_used_elem(rings, head, len).inspect_err(|&e| {
            self.error = Some(e);
        })?;
        let taken = &mut self.in_flight[usize::from(head)];
        if *taken > 0 {
            *taken -= 1;
            self.known_in_flight -= 1;
        }
        Ok(())
    }

    /// Publishes the elements filled since the last publication
    /// ([`fill_used_in`](Self::fill_used_in)): a Release fence, then one used index write
    /// (QEMU's `virtqueue_flush`). Runs on a broken queue too, so elements filled before it
    /// broke still reach the driver; a failing write breaks the queue.
    pub fn flush_used_in(&mut self, rings: &SplitRings<'_>) -> Result<(), QueueError> {
        self.publish_used(rings).inspect_err(|&e| {
            self.error = Some(e);
        })
    }

    /// Checks, changing nothing, that `heads` could all be returned now, in any order: each
    /// below the queue size and in flight at least as many times as it appears, where heads
    /// this reader did not take count against the elements in flight since the last
    /// [`set_indices`](Self::set_indices). The error of a broken queue, `HeadOutOfRange` or
    /// `HeadNotInFlight` otherwise; an empty batch is always fine (nothing to return).
    pub fn check_used(&self, heads: &[u16]) -> Result<(), QueueError> {
        if heads.is_empty() {
            return Ok(());
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut unknown = self.unknown_in_flight();
        if let &[head] = heads {
            // add_used's own check, without sorting.
            return self.check_times(head, 1, &mut unknown);
        }
        let mut sorted = heads.to_vec();
        sorted.sort_unstable();
        sorted.chunk_by(|a, b| a == b).try_for_each(|run| {
            let times = u32::try_from(run.len()).unwrap_or(u32::MAX);
            self.check_times(run[0], times, &mut unknown)
        })
    }

    /// Whether `head` can be returned `times` more times, taking what its own count lacks
    /// from `unknown` (elements in flight whose heads are unknown).
    fn check_times(&self, head: u16, times: u32, unknown: &mut u32) -> Result<(), QueueError> {
        let Some(&taken) = self.in_flight.get(usize::from(head)) else {
            return Err(QueueError::HeadOutOfRange {
                head,
                size: self.size,
            });
        };
        *unknown = unknown
            .checked_sub(times.saturating_sub(taken))
            .ok_or(QueueError::HeadNotInFlight { head })?;
        Ok(())
    }

    /// Whether the driver wants a used-buffer notification now, for the elements returned
    /// since the last call.
    ///
    /// Without EVENT_IDX: unless the available ring's flags have `VIRTQ_AVAIL_F_NO_INTERRUPT`.
    /// With EVENT_IDX: if the used index moved past `used_event` since the last decision
    /// (`vring_need_event(used_event, new, old)`), or when there was no decision yet (QEMU's
    /// `signalled_used_valid`). A broken queue never asks; a failing ring read breaks the
    /// queue and answers yes (drivers must tolerate spurious notifications, §2.7.7.1).
    pub fn needs_interrupt(&mut self, ram: &GuestRam<'_>) -> bool {
        if self.error.is_some() {
            return false;
        }
        // The used index store must be ordered before the read of flags / used_event.
        fence(Ordering::SeqCst);
        if !self.event_idx {
            return match ram.read_u16(self.avail_gpa) {
                Ok(flags) => flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0,
                Err(_) => {
                    self.error = Some(self.ring_error(Ring::Avail));
                    true
                }
            };
        }
        let at = self.avail_gpa + 4 + 2 * u64::from(self.size);
        let Ok(used_event) = ram.read_u16(at) else {
            self.error = Some(self.ring_error(Ring::Avail));
            return true;
        };
        let new = self.next_used;
        let old = self.signalled_used.replace(new);
        old.is_none_or(|old| vring_need_event(used_event, new, old))
    }
}
