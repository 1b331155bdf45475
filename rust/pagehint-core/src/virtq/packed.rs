//! The packed virtqueue (virtio 1.2 §2.8), device side.
//!
//! Layout in guest memory (all little-endian; [`Ring`] names the parts `Desc`, `Avail` and
//! `Used` after the split queue's descriptor, driver and device areas):
//!
//! ```text
//! descriptor ring  align 16  16 * size  {addr u64, len u32, id u16, flags u16}[size]
//! driver area      align 4   4          {off_wrap u16, flags u16}  driver event suppression
//! device area      align 4   4          {off_wrap u16, flags u16}  device event suppression
//! ```
//!
//! The size need not be a power of two (§2.8 "Structure Size and Alignment": "The Queue Size
//! value does not have to be a power of 2"); it is at most 2^15 ("Packed virtqueues support up
//! to 2^15 entries each").
//!
//! Both sides keep a one-bit ring wrap counter that starts at 1 and flips each time their
//! index passes the end of the ring (§2.8 "Driver and Device Ring Wrap Counters"). A
//! descriptor is available in the lap with wrap counter `w` when its AVAIL bit equals `w` and
//! its USED bit does not; the device marks a used descriptor with both bits equal to its own
//! counter. The reader keeps the driver-side position it will read next (`next_avail`,
//! `avail_wrap`) and the device-side position it will write next (`next_used`, `used_wrap`).
//!
//! Rules chosen here (each bad element is counted by reason, returned used with length 0, and
//! the queue goes on; see [`ElementError`]):
//! - A list is the run of consecutive ring descriptors linked by NEXT, wrapping from the last
//!   slot to slot 0 with the expected wrap counter flipped (§2.8 "Next Flag: Descriptor
//!   Chaining"). Every descriptor of it is read once, as 16 bytes, into a local copy, then
//!   checked, then used. The buffer id is the `id` of the last descriptor.
//! - The list is always walked to its end, even after a fault, so that a rejected element is
//!   skipped and returned whole: the next element starts right after it and the used
//!   descriptor names its id and advances the used index by its descriptor count.
//! - A list may hold at most `size` descriptors (§2.8 "Scatter-Gather Support", driver
//!   requirements: "A driver MUST NOT create a descriptor list longer than the Queue Size";
//!   "loops in the descriptor list are forbidden"). When the `size`-th still has NEXT, the
//!   element is rejected as [`ElementError::ChainTooLong`] and ends there: it takes the whole
//!   ring and its id is that of the `size`-th descriptor.
//! - INDIRECT is honoured only on a list's single descriptor (§2.8 "Indirect Descriptors",
//!   driver requirements: "A driver MUST NOT write direct descriptors with DESC_F_INDIRECT set
//!   in a scatter-gather list linked by VIRTQ_DESC_F_NEXT"): with NEXT it is
//!   [`ElementError::IndirectWithNext`], after other descriptors
//!   [`ElementError::IndirectInChain`]. Its WRITE flag is ignored ("In descriptors with
//!   VIRTQ_DESC_F_INDIRECT set VIRTQ_DESC_F_WRITE is reserved and is ignored by the device").
//!   A table holds 1 to `size` descriptors (QEMU: "Invalid size for indirect buffer table";
//!   "If not limited, the maximum number of descriptors in a list is the virt queue size"),
//!   lies in RAM, and is read in order: every entry is a buffer, NEXT and `id` inside it are
//!   ignored ("The VIRTQ_DESC_F_WRITE flags bit is the only valid flag for descriptors in the
//!   indirect table. Others are reserved and are ignored by the device. Buffer ID is also
//!   reserved"), except INDIRECT, which is rejected as [`ElementError::NestedIndirect`]
//!   ("The driver MUST NOT set any flags except DESC_F_WRITE within an indirect descriptor";
//!   interpreting it either way would guess). An indirect element takes one ring slot.
//! - Buffers: non-zero length (QEMU `virtqueue_map_desc`), entirely RAM in the layout, 32-bit
//!   total, device-readable before device-writable (§2.8 "Scatter-Gather Support": "The driver
//!   MUST place any device-writable descriptor elements after any device-readable descriptor
//!   elements").
//!
//! Queue faults (see [`QueueError`]) stop the queue, because the element cannot be returned
//! to the driver in a form it accepts, or cannot be delimited: a buffer id at or past the
//! queue size, a buffer id still in flight, a list descriptor that is not available in its
//! lap, more descriptors in flight than the ring holds, or a ring access that fails.
//!
//! Used descriptors are written in completion order at `next_used`, overwriting the first
//! slot of the list (§2.8 "Next Flag: Descriptor Chaining": "the used descriptor overwriting
//! the first available descriptor in the list"): `len` and `id` first, then (Release) the
//! flags with AVAIL = USED = the device wrap counter, and WRITE when `len > 0` (§2.8 "Write
//! Flag": in a used descriptor it says whether any data was written). The used index then
//! advances by the element's descriptor count, flipping `used_wrap` past the end (QEMU
//! `virtqueue_packed_fill_desc` / `virtqueue_packed_flush`).
//!
//! Notifications: with `VIRTIO_RING_F_EVENT_IDX` the reader writes the device area after each
//! element it takes, `off_wrap = next_avail | avail_wrap << 15` and flags DESC, so the driver
//! notifies for the next descriptor it makes available (as QEMU's
//! `virtio_queue_packed_set_notification` does with notifications on); without it, it leaves
//! the device area alone (zero: ENABLE). [`PackedQueue::needs_interrupt`] reads the driver
//! area like QEMU's `virtio_packed_should_notify`.

use std::sync::atomic::{Ordering, fence};

use super::{
    Chain, DESC_SIZE, ElementError, MAX_QUEUE_SIZE, QueueError, RejectCounts, Ring,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, check_indirect_table,
    push_buffer, vring_need_event,
};
use crate::guest_memory::GuestRam;
use crate::memmap::MemoryMap;

/// Packed descriptor flag: the available bit (§2.8 "Driver and Device Ring Wrap Counters").
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// Packed descriptor flag: the used bit.
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;
/// Event suppression flags: notify always (§2.8 "Driver and Device Event Suppression").
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// Event suppression flags: never notify.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// Event suppression flags: notify for the descriptor at `desc_event_off_wrap` (only with
/// `VIRTIO_RING_F_EVENT_IDX`).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;

/// Bytes of one event suppression structure.
const EVENT_SIZE: u64 = 4;

/// Whether `flags` mark a descriptor available in the lap with wrap counter `wrap`.
const fn is_avail(flags: u16, wrap: bool) -> bool {
    let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
    let used = flags & VIRTQ_DESC_F_USED != 0;
    avail == wrap && used != wrap
}

/// `(pos, wrap)` moved `n` slots on in a ring of `size`; `pos < size` and `n <= size`.
fn advance(pos: u16, wrap: bool, n: u32, size: u16) -> (u16, bool) {
    let p = u32::from(pos) + n;
    let size = u32::from(size);
    let (p, wrap) = if p >= size {
        (p - size, !wrap)
    } else {
        (p, wrap)
    };
    // p < size <= 32768 here, so it fits.
    (u16::try_from(p).unwrap_or(0), wrap)
}

/// A packed descriptor as read from guest memory, before any check.
#[derive(Debug, Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

impl RawDesc {
    /// Reads the descriptor at `gpa` as two little-endian words (one load each when aligned,
    /// as the ring and indirect tables of a well-behaved driver are).
    fn read(ram: &GuestRam<'_>, gpa: u64) -> Option<Self> {
        let [addr, rest] = ram.read_u64s::<2>(gpa).ok()?;
        // The fields of the second word, by their byte offsets 8, 12 and 14.
        #[allow(clippy::cast_possible_truncation)]
        Some(Self {
            addr,
            len: rest as u32,
            id: (rest >> 32) as u16,
            flags: (rest >> 48) as u16,
        })
    }
}

/// One list, walked to its end.
struct Scan {
    /// Buffer id (of the last descriptor).
    id: u16,
    /// Ring slots the list takes.
    descs: u32,
    /// The first fault of the element, if any.
    fault: Option<ElementError>,
}

/// A packed virtqueue, read by the device.
#[derive(Debug, Clone)]
pub struct PackedQueue {
    size: u16,
    desc_gpa: u64,
    driver_event_gpa: u64,
    device_event_gpa: u64,
    event_idx: bool,
    /// Next ring slot to read, and the driver wrap counter expected there.
    next_avail: u16,
    avail_wrap: bool,
    /// Next ring slot to write a used descriptor to, and the device wrap counter.
    next_used: u16,
    used_wrap: bool,
    /// Ring slots of each buffer id in flight (0: not in flight); `size` entries.
    in_flight: Vec<u16>,
    /// Sum of `in_flight`.
    in_flight_descs: u32,
    /// Used slots written since the last interrupt decision, if there was one.
    since_signal: Option<u32>,
    error: Option<QueueError>,
    counts: RejectCounts,
}

impl PackedQueue {
    /// A queue of `size` descriptors with its descriptor ring and its driver and device event
    /// suppression structures at the given guest-physical addresses; both wrap counters start
    /// at 1 and both indices at 0. Checks the size (1 to 32768, any value), each part's
    /// alignment (16, 4, 4) and that each part lies entirely in `ram`.
    pub fn new(
        ram: &GuestRam<'_>,
        size: u16,
        desc_gpa: u64,
        driver_event_gpa: u64,
        device_event_gpa: u64,
        event_idx: bool,
    ) -> Result<Self, QueueError> {
        if size == 0 {
            return Err(QueueError::ZeroSize);
        }
        if size > MAX_QUEUE_SIZE {
            return Err(QueueError::SizeTooLarge { size });
        }
        let parts = [
            (Ring::Desc, desc_gpa, 16, DESC_SIZE * u64::from(size)),
            (Ring::Avail, driver_event_gpa, 4, EVENT_SIZE),
            (Ring::Used, device_event_gpa, 4, EVENT_SIZE),
        ];
        for (ring, gpa, align, _) in parts {
            if !gpa.is_multiple_of(align) {
                return Err(QueueError::Misaligned { ring, gpa, align });
            }
        }
        for (ring, gpa, _, len) in parts {
            if !ram.contains(gpa, len) {
                return Err(QueueError::RingOutsideRam { ring, gpa, len });
            }
        }
        Ok(Self {
            size,
            desc_gpa,
            driver_event_gpa,
            device_event_gpa,
            event_idx,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            in_flight: vec![0; usize::from(size)],
            in_flight_descs: 0,
            since_signal: None,
            error: None,
            counts: RejectCounts::default(),
        })
    }

    /// Queue size (descriptors).
    pub const fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical address of the descriptor ring.
    pub const fn desc_gpa(&self) -> u64 {
        self.desc_gpa
    }

    /// Guest-physical address of the driver event suppression structure.
    pub const fn driver_event_gpa(&self) -> u64 {
        self.driver_event_gpa
    }

    /// Guest-physical address of the device event suppression structure.
    pub const fn device_event_gpa(&self) -> u64 {
        self.device_event_gpa
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub const fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// The ring slot the reader will look at next for an available descriptor.
    pub const fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The driver ring wrap counter the reader expects at [`next_avail`](Self::next_avail).
    pub const fn avail_wrap(&self) -> bool {
        self.avail_wrap
    }

    /// The ring slot the next used descriptor goes to.
    pub const fn next_used(&self) -> u16 {
        self.next_used
    }

    /// The device ring wrap counter.
    pub const fn used_wrap(&self) -> bool {
        self.used_wrap
    }

    /// Ring slots taken by elements popped and not yet returned.
    pub const fn in_flight(&self) -> u32 {
        self.in_flight_descs
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

    /// Resumes at the given positions (after migration, or from a dump), with nothing in
    /// flight: elements popped earlier and not returned are forgotten. Forgets the last
    /// interrupt decision. Refuses (changing nothing) an index at or past the queue size. A
    /// broken queue stays broken.
    pub fn set_indices(
        &mut self,
        next_avail: u16,
        avail_wrap: bool,
        next_used: u16,
        used_wrap: bool,
    ) -> Result<(), QueueError> {
        for index in [next_avail, next_used] {
            if index >= self.size {
                return Err(QueueError::IndexOutOfRange {
                    index,
                    size: self.size,
                });
            }
        }
        self.next_avail = next_avail;
        self.avail_wrap = avail_wrap;
        self.next_used = next_used;
        self.used_wrap = used_wrap;
        self.in_flight.fill(0);
        self.in_flight_descs = 0;
        self.since_signal = None;
        Ok(())
    }

    fn fail<T>(&mut self, e: QueueError) -> Option<T> {
        self.error = Some(e);
        None
    }

    const fn ring_error(&self, ring: Ring) -> QueueError {
        let (gpa, len) = match ring {
            Ring::Desc => (self.desc_gpa, DESC_SIZE * self.size as u64),
            Ring::Avail => (self.driver_event_gpa, EVENT_SIZE),
            Ring::Used => (self.device_event_gpa, EVENT_SIZE),
        };
        QueueError::RingOutsideRam { ring, gpa, len }
    }

    /// Guest-physical address of ring slot `pos` (< size).
    fn slot(&self, pos: u16) -> u64 {
        self.desc_gpa + DESC_SIZE * u64::from(pos)
    }

    /// Takes the next available element, checking its buffers against `ram`'s memory map.
    /// See [`pop_with_layout`](Self::pop_with_layout).
    pub fn pop(
        &mut self,
        ram: &GuestRam<'_>,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        self.pop_with_layout(ram, ram.map(), chain)
    }

    /// Takes the next available element: reads the descriptor ring and indirect tables
    /// through `ram`, and checks each buffer's `(addr, len)` to be RAM in `layout` (buffers
    /// are never dereferenced).
    ///
    /// - `Some(Ok(id))`: `chain` holds the element's buffers; give it back with
    ///   [`add_used`](Self::add_used) and its buffer id.
    /// - `Some(Err(reason))`: the element was rejected, counted, and already returned as a
    ///   used descriptor with length 0; call again for the next one.
    /// - `None`: nothing available, or the queue is broken (see [`error`](Self::error)).
    ///
    /// One call reads at most `size` ring descriptors and `size` indirect-table descriptors,
    /// and allocates nothing once `chain` has grown to the longest element seen.
    pub fn pop_with_layout(
        &mut self,
        ram: &GuestRam<'_>,
        layout: &MemoryMap,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        if self.error.is_some() {
            return None;
        }
        let Ok(flags) = ram.read_u16(self.slot(self.next_avail) + 14) else {
            return self.fail(self.ring_error(Ring::Desc));
        };
        if !is_avail(flags, self.avail_wrap) {
            return None;
        }
        // The descriptors were written before the first one's flags: read them only after
        // (pairs with the driver's barrier before it publishes the flags).
        fence(Ordering::Acquire);
        let scan = match self.scan(ram, layout, chain) {
            Ok(s) => s,
            Err(q) => {
                if matches!(q, QueueError::ChainDescNotAvailable { .. }) {
                    self.counts.chain_desc_not_available =
                        self.counts.chain_desc_not_available.saturating_add(1);
                }
                return self.fail(q);
            }
        };
        let Scan { id, descs, fault } = scan;
        let size = self.size;
        if id >= size {
            self.counts.buffer_id_out_of_range =
                self.counts.buffer_id_out_of_range.saturating_add(1);
            return self.fail(QueueError::BufferIdOutOfRange { id, size });
        }
        if self.in_flight[usize::from(id)] != 0 {
            self.counts.buffer_id_in_use = self.counts.buffer_id_in_use.saturating_add(1);
            return self.fail(QueueError::BufferIdInUse { id });
        }
        if self.in_flight_descs + descs > u32::from(size) {
            self.counts.ring_overrun = self.counts.ring_overrun.saturating_add(1);
            return self.fail(QueueError::RingOverrun {
                in_flight: self.in_flight_descs,
                list: descs,
                size,
            });
        }
        (self.next_avail, self.avail_wrap) = advance(self.next_avail, self.avail_wrap, descs, size);
        if self.event_idx
            && let Err(q) = self.write_device_event(ram)
        {
            return self.fail(q);
        }
        match fault {
            None => {
                // descs <= size <= 32768.
                self.in_flight[usize::from(id)] = u16::try_from(descs).unwrap_or(u16::MAX);
                self.in_flight_descs += descs;
                Some(Ok(id))
            }
            Some(e) => {
                self.counts.record(&e);
                if let Err(q) = self.push_used(ram, id, 0, descs) {
                    return self.fail(q);
                }
                Some(Err(e))
            }
        }
    }

    /// Asks the driver to notify for the descriptor at `next_avail`: off_wrap, then
    /// (Release) the flags.
    fn write_device_event(&self, ram: &GuestRam<'_>) -> Result<(), QueueError> {
        let off_wrap = self.next_avail | (u16::from(self.avail_wrap) << 15);
        ram.write_u16(self.device_event_gpa, off_wrap)
            .map_err(|_| self.ring_error(Ring::Used))?;
        fence(Ordering::Release);
        ram.write_u16(self.device_event_gpa + 2, RING_EVENT_FLAGS_DESC)
            .map_err(|_| self.ring_error(Ring::Used))
    }

    /// Walks the list at `next_avail` (known available) to its end, collecting its buffers
    /// into `chain` until the first fault.
    fn scan(
        &self,
        ram: &GuestRam<'_>,
        layout: &MemoryMap,
        chain: &mut Chain,
    ) -> Result<Scan, QueueError> {
        chain.clear();
        let size = u32::from(self.size);
        let (mut pos, mut wrap) = (self.next_avail, self.avail_wrap);
        let mut descs = 0u32;
        let mut fault = None;
        loop {
            let Some(d) = RawDesc::read(ram, self.slot(pos)) else {
                return Err(self.ring_error(Ring::Desc));
            };
            descs += 1;
            // The first one too: it must not have changed since its flags were checked.
            if !is_avail(d.flags, wrap) {
                return Err(QueueError::ChainDescNotAvailable { index: pos, wrap });
            }
            if fault.is_none()
                && let Err(e) = self.take(ram, layout, &d, descs == 1, chain)
            {
                fault = Some(e);
            }
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(Scan {
                    id: d.id,
                    descs,
                    fault,
                });
            }
            if descs >= size {
                return Ok(Scan {
                    id: d.id,
                    descs,
                    fault: Some(ElementError::ChainTooLong { limit: size }),
                });
            }
            (pos, wrap) = advance(pos, wrap, 1, self.size);
        }
    }

    /// Checks one ring descriptor (`first` of its list or not) and appends its buffers.
    fn take(
        &self,
        ram: &GuestRam<'_>,
        layout: &MemoryMap,
        d: &RawDesc,
        first: bool,
        chain: &mut Chain,
    ) -> Result<(), ElementError> {
        if d.flags & VIRTQ_DESC_F_INDIRECT == 0 {
            return push_buffer(
                layout,
                chain,
                d.addr,
                d.len,
                d.flags & VIRTQ_DESC_F_WRITE != 0,
            );
        }
        if !first {
            return Err(ElementError::IndirectInChain);
        }
        if d.flags & VIRTQ_DESC_F_NEXT != 0 {
            return Err(ElementError::IndirectWithNext);
        }
        let entries = check_indirect_table(ram, d.addr, d.len, self.size)?;
        let outside = ElementError::IndirectOutsideRam {
            addr: d.addr,
            len: d.len,
        };
        for i in 0..entries {
            // The table lies in RAM, so this cannot overflow; a failing read means the map
            // changed under us.
            let t = RawDesc::read(ram, d.addr + DESC_SIZE * u64::from(i)).ok_or(outside)?;
            if t.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(ElementError::NestedIndirect);
            }
            push_buffer(
                layout,
                chain,
                t.addr,
                t.len,
                t.flags & VIRTQ_DESC_F_WRITE != 0,
            )?;
        }
        Ok(())
    }

    /// Writes a used descriptor at `next_used` (`len` and `id`, then (Release) the flags) and
    /// moves `next_used` on by `descs` slots.
    fn push_used(
        &mut self,
        ram: &GuestRam<'_>,
        id: u16,
        len: u32,
        descs: u32,
    ) -> Result<(), QueueError> {
        let at = self.slot(self.next_used);
        let mut body = [0u8; 6];
        body[..4].copy_from_slice(&len.to_le_bytes());
        body[4..].copy_from_slice(&id.to_le_bytes());
        ram.write(at + 8, &body)
            .map_err(|_| self.ring_error(Ring::Desc))?;
        // The id and length must be visible before the flags that publish them.
        fence(Ordering::Release);
        let mut flags = if self.used_wrap {
            VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        } else {
            0
        };
        if len > 0 {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        ram.write_u16(at + 14, flags)
            .map_err(|_| self.ring_error(Ring::Desc))?;
        (self.next_used, self.used_wrap) =
            advance(self.next_used, self.used_wrap, descs, self.size);
        if let Some(n) = self.since_signal.as_mut() {
            *n = n.saturating_add(descs);
        }
        Ok(())
    }

    /// Returns element `id` to the driver with `len` bytes written: writes a used descriptor
    /// at `next_used` and moves on by the element's descriptor count. Refuses (changing
    /// nothing) an `id` at or past the queue size or not in flight, and does nothing on a
    /// broken queue; a failing ring write breaks the queue.
    pub fn add_used(&mut self, ram: &GuestRam<'_>, id: u16, len: u32) -> Result<(), QueueError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if id >= self.size {
            return Err(QueueError::BufferIdOutOfRange {
                id,
                size: self.size,
            });
        }
        let descs = u32::from(self.in_flight[usize::from(id)]);
        if descs == 0 {
            return Err(QueueError::BufferIdNotInFlight { id });
        }
        self.push_used(ram, id, len, descs).inspect_err(|&e| {
            self.error = Some(e);
        })?;
        self.in_flight[usize::from(id)] = 0;
        self.in_flight_descs -= descs;
        Ok(())
    }

    /// Checks, changing nothing, that `ids` could all be returned now, in any order: each below
    /// the queue size, in flight, and given once. The error of a broken queue,
    /// `BufferIdOutOfRange` or `BufferIdNotInFlight` otherwise; an empty batch is always fine.
    pub fn check_used(&self, ids: &[u16]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        for run in sorted.chunk_by(|a, b| a == b) {
            let id = run[0];
            let Some(&descs) = self.in_flight.get(usize::from(id)) else {
                return Err(QueueError::BufferIdOutOfRange {
                    id,
                    size: self.size,
                });
            };
            if descs == 0 || run.len() > 1 {
                return Err(QueueError::BufferIdNotInFlight { id });
            }
        }
        Ok(())
    }

    /// Whether the driver wants a used-buffer notification now, for the used descriptors
    /// written since the last call. Reads the driver area (flags, then off_wrap):
    ///
    /// - DISABLE: no; ENABLE: yes.
    /// - DESC with EVENT_IDX: yes when the used descriptors written since the last decision
    ///   covered the slot `desc_event_off` in the lap `desc_event_wrap` (QEMU
    ///   `vring_packed_need_event`: the offset minus the size when its wrap counter differs
    ///   from the device's, then `vring_need_event`), or when there was no decision yet.
    ///   A batch of `size` slots or more covers every slot.
    /// - DESC without EVENT_IDX, or the reserved value 3: yes (a driver must tolerate
    ///   spurious notifications; a missing one could hang it).
    ///
    /// A broken queue never asks; a failing read breaks the queue and answers yes.
    pub fn needs_interrupt(&mut self, ram: &GuestRam<'_>) -> bool {
        if self.error.is_some() {
            return false;
        }
        // The used descriptors' flags must be ordered before the read of the driver area.
        fence(Ordering::SeqCst);
        let Ok(flags) = ram.read_u16(self.driver_event_gpa + 2) else {
            self.error = Some(self.ring_error(Ring::Avail));
            return true;
        };
        fence(Ordering::Acquire);
        let Ok(off_wrap) = ram.read_u16(self.driver_event_gpa) else {
            self.error = Some(self.ring_error(Ring::Avail));
            return true;
        };
        let since = self.since_signal.replace(0);
        match flags & 3 {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_ENABLE => true,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                since.is_none_or(|n| self.passed(off_wrap, n))
            }
            _ => true,
        }
    }

    /// Whether the last `n` used slots, ending at `next_used`, include the slot named by
    /// `off_wrap`.
    fn passed(&self, off_wrap: u16, n: u32) -> bool {
        let size = self.size;
        if n >= u32::from(size) {
            return true;
        }
        let off = off_wrap & 0x7fff;
        let wrap = off_wrap >> 15 == 1;
        // Slots as offsets from the start of the device's current lap: the previous lap is
        // negative. `n < size`, so the batch spans less than one lap.
        let event = if wrap == self.used_wrap {
            off
        } else {
            off.wrapping_sub(size)
        };
        // n < size <= 32768, so it fits.
        let old = self
            .next_used
            .wrapping_sub(u16::try_from(n).unwrap_or(u16::MAX));
        vring_need_event(event, self.next_used, old)
    }
}
