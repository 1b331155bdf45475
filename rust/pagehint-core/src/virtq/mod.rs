//! Virtqueue readers: the device side of a virtio queue in guest memory.
//!
//! Everything here reads guest-written memory through [`GuestRam`] and treats
//! it as hostile: every index is bounded, every length checked, every loop has a step limit,
//! and nothing panics on any input. A fault of one element (a bad descriptor chain) is counted
//! by reason in [`RejectCounts`], the element is returned to the driver with length 0, and
//! processing goes on. A fault of the queue itself (a bad ring address, a head index past the
//! table, an available index that jumps too far) is a [`QueueError`]: the queue stops and
//! keeps the error for the caller to query, as QEMU's `virtio_error()` marks a device broken.
//!
//! Section numbers refer to the virtio 1.2 specification, "Split Virtqueues" (§2.7) and
//! "Packed Virtqueues" (§2.8).

pub mod batch;
pub mod packed;
pub mod split;

use std::fmt;

use crate::guest_memory::GuestRam;

pub use batch::{PoppedElements, pop_batch};
pub use packed::{
    PackedQueue, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED,
};
pub use split::{SplitQueue, SplitRings};

/// Descriptor flag: the chain goes on at `next` (§2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of indirect descriptors (§2.7.5.3).
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available-ring flag: the driver asks for no used-buffer notifications (§2.7.7).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Largest queue size the specification allows (§2.7: "The maximum Queue Size value is 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes of one descriptor: `{addr: le64, len: le32, flags: le16, next: le16}`.
pub const DESC_SIZE: u64 = 16;

/// One validated buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes, never 0.
    pub len: u32,
    /// Device-writable (the driver's "in" buffer); otherwise device-readable ("out").
    pub writable: bool,
}

/// A reusable buffer for one element's descriptors: readable ones first, then writable ones
/// (§2.7.4.2, "The driver MUST place any device-writable descriptor elements after any
/// device-readable descriptor elements"; the reader rejects any other order).
///
/// A queue reader clears and refills it for each element, so after the first few elements no
/// processing step allocates. After a rejected element its contents are unspecified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    descs: Vec<Desc>,
    readable: usize,
    total_len: u64,
}

impl Chain {
    /// An empty chain.
    pub const fn new() -> Self {
        Self {
            descs: Vec::new(),
            readable: 0,
            total_len: 0,
        }
    }

    /// An empty chain with room for `n` descriptors.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            descs: Vec::with_capacity(n),
            readable: 0,
            total_len: 0,
        }
    }

    /// All buffers, in chain order.
    pub fn descs(&self) -> &[Desc] {
        &self.descs
    }

    /// The device-readable buffers (they come first).
    pub fn readable(&self) -> &[Desc] {
        &self.descs[..self.readable]
    }

    /// The device-writable buffers (they come last).
    pub fn writable(&self) -> &[Desc] {
        &self.descs[self.readable..]
    }

    /// Number of buffers.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether there are no buffers.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Sum of all buffer lengths; at most `u32::MAX` for an accepted element.
    pub const fn total_len(&self) -> u64 {
        self.total_len
    }

    pub(crate) fn clear(&mut self) {
        self.descs.clear();
        self.readable = 0;
        self.total_len = 0;
    }

    /// Appends a buffer, enforcing out-before-in and the 32-bit total.
    pub(crate) fn push(&mut self, d: Desc) -> Result<(), ElementError> {
        if !d.writable && self.readable != self.descs.len() {
            return Err(ElementError::ReadableAfterWritable);
        }
        let total = self.total_len + u64::from(d.len);
        if total > u64::from(u32::MAX) {
            return Err(ElementError::LengthOverflow { total });
        }
        self.total_len = total;
        if !d.writable {
            self.readable += 1;
        }
        self.descs.push(d);
        Ok(())
    }
}

/// Why one element (one descriptor chain) was rejected. The element is returned to the
/// driver with used length 0 and the queue goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementError {
    /// A `next` index is not below the table's entry count (the queue size, or the indirect
    /// table's length / 16). QEMU: "Desc next is %u".
    NextOutOfRange {
        /// The descriptor's `next` field.
        next: u16,
        /// Entries of the table it indexes.
        limit: u32,
    },
    /// More descriptors than the table holds were followed: a loop (§2.7.5.2 "loops in the
    /// descriptor chain are forbidden"; QEMU: "Looped descriptor").
    ChainTooLong {
        /// Entries of the table being walked (packed: the queue size).
        limit: u32,
    },
    /// A descriptor has both INDIRECT and NEXT (§2.7.5.3.1 "A driver MUST NOT set both").
    IndirectWithNext,
    /// A descriptor inside an indirect table has INDIRECT (§2.7.5.3.1 "only one table per
    /// descriptor"; QEMU: "Indirect buffer in indirect buffer").
    NestedIndirect,
    /// An indirect table of length 0 (QEMU: "Invalid size for indirect buffer table").
    IndirectEmpty,
    /// An indirect table whose length is not a multiple of 16 (same QEMU message).
    IndirectLenNotMultiple {
        /// The table's length in bytes (the INDIRECT descriptor's `len`).
        len: u32,
    },
    /// An indirect table with more entries than the queue size (§2.7.5.3.1 "A driver MUST NOT
    /// create a descriptor chain longer than the Queue Size of the device").
    IndirectTooLarge {
        /// Entries of the table (`len / 16`).
        entries: u32,
        /// The queue size.
        size: u16,
    },
    /// An indirect table not entirely in guest RAM (QEMU: "Cannot map indirect buffer").
    IndirectOutsideRam {
        /// Guest-physical address of the table.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// A buffer of length 0 (QEMU `virtqueue_map_desc`: "virtio: zero sized buffers are not
    /// allowed").
    ZeroLengthBuffer {
        /// The descriptor's guest-physical address.
        addr: u64,
    },
    /// A buffer not entirely in guest RAM: in a hole, past the end, crossing from RAM into a
    /// hole, or wrapping past 2^64 (QEMU: "virtio: bogus descriptor or out of resources").
    BufferOutsideRam {
        /// The buffer's guest-physical address.
        addr: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// The buffers add up to more than `u32::MAX` bytes (§2.7.5.2 "Drivers MUST NOT add a
    /// descriptor chain longer than 2^32 bytes in total"; the used length is 32-bit).
    LengthOverflow {
        /// The chain's length so far, including the descriptor that broke the limit.
        total: u64,
    },
    /// A device-readable buffer after a device-writable one (§2.7.4.2; QEMU: "Incorrect
    /// order for descriptors").
    ReadableAfterWritable,
    /// Packed ring: an INDIRECT descriptor that is not the first of its list (§2.8 "Indirect
    /// Descriptors", driver requirements: "A driver MUST NOT write direct descriptors with
    /// DESC_F_INDIRECT set in a scatter-gather list linked by VIRTQ_DESC_F_NEXT").
    IndirectInChain,
}

impl ElementError {
    /// A short stable name of the reason, for reports (`snake_case`, the [`RejectCounts`]
    /// field name).
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::NextOutOfRange { .. } => "next_out_of_range",
            Self::ChainTooLong { .. } => "chain_too_long",
            Self::IndirectWithNext => "indirect_with_next",
            Self::NestedIndirect => "nested_indirect",
            Self::IndirectEmpty => "indirect_empty",
            Self::IndirectLenNotMultiple { .. } => "indirect_len_not_multiple",
            Self::IndirectTooLarge { .. } => "indirect_too_large",
            Self::IndirectOutsideRam { .. } => "indirect_outside_ram",
            Self::ZeroLengthBuffer { .. } => "zero_length_buffer",
            Self::BufferOutsideRam { .. } => "buffer_outside_ram",
            Self::LengthOverflow { .. } => "length_overflow",
            Self::ReadableAfterWritable => "readable_after_writable",
            Self::IndirectInChain => "indirect_in_chain",
        }
    }
}

impl fmt::Display for ElementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NextOutOfRange { next, limit } => {
                write!(f, "descriptor next index {next} is not below {limit}")
            }
            Self::ChainTooLong { limit } => write!(
                f,
                "descriptor chain longer than its table's {limit} entries (a loop)"
            ),
            Self::IndirectWithNext => write!(f, "descriptor has both INDIRECT and NEXT"),
            Self::NestedIndirect => write!(f, "INDIRECT descriptor inside an indirect table"),
            Self::IndirectEmpty => write!(f, "indirect descriptor table of length 0"),
            Self::IndirectLenNotMultiple { len } => write!(
                f,
                "indirect descriptor table length {len} is not a multiple of 16"
            ),
            Self::IndirectTooLarge { entries, size } => write!(
                f,
                "indirect descriptor table of {entries} entries exceeds the queue size {size}"
            ),
            Self::IndirectOutsideRam { addr, len } => write!(
                f,
                "indirect descriptor table ({len} bytes at {addr:#x}) is not all guest RAM"
            ),
            Self::ZeroLengthBuffer { addr } => write!(f, "zero-length buffer at {addr:#x}"),
            Self::BufferOutsideRam { addr, len } => {
                write!(f, "buffer ({len} bytes at {addr:#x}) is not all guest RAM")
            }
            Self::LengthOverflow { total } => write!(
                f,
                "descriptor chain totals {total} bytes, more than 2^32 - 1"
            ),
            Self::ReadableAfterWritable => {
                write!(f, "device-readable descriptor after a device-writable one")
            }
            Self::IndirectInChain => {
                write!(
                    f,
                    "INDIRECT descriptor after the first of a NEXT-linked list"
                )
            }
        }
    }
}

impl std::error::Error for ElementError {}

/// Which part of a virtqueue: its descriptor area, driver area or device area (§2.6). The
/// names are the split queue's; for a packed queue they mean the descriptor ring, the driver
/// event suppression structure and the device event suppression structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table (device-read); packed: the descriptor ring (device-read and
    /// device-written).
    Desc,
    /// The available ring (driver area, device-read); packed: the driver event suppression
    /// structure.
    Avail,
    /// The used ring (device area, device-written); packed: the device event suppression
    /// structure.
    Used,
}

impl fmt::Display for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Desc => "descriptor table",
            Self::Avail => "available ring",
            Self::Used => "used ring",
        })
    }
}

/// Why a queue was refused or broke. A broken queue processes nothing more until it is
/// set up again; the error stays visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// Queue size 0.
    ZeroSize,
    /// Queue size above 32768 (§2.7).
    SizeTooLarge {
        /// The queue size asked for.
        size: u16,
    },
    /// Queue size not a power of two (§2.7 "Queue Size value is always a power of 2").
    SizeNotPowerOfTwo {
        /// The queue size asked for.
        size: u16,
    },
    /// A ring's address breaks its alignment (§2.7: desc 16, avail 2, used 4).
    Misaligned {
        /// Which part.
        ring: Ring,
        /// Its guest-physical address.
        gpa: u64,
        /// The alignment that part needs, in bytes.
        align: u64,
    },
    /// A ring is not entirely guest RAM (or an access to it failed).
    RingOutsideRam {
        /// Which part.
        ring: Ring,
        /// Its guest-physical address.
        gpa: u64,
        /// Its length in bytes for this queue size.
        len: u64,
    },
    /// The available index is more than the queue size ahead of the last one processed
    /// (QEMU `virtqueue_num_heads`: "Guest moved used index from %u to %u").
    AvailIdxJump {
        /// The available ring's `idx` as the driver wrote it.
        avail_idx: u16,
        /// The device's next available index to read (QEMU's `last_avail_idx`).
        last_avail: u16,
        /// The queue size.
        size: u16,
    },
    /// The available ring names a head at or past the queue size (QEMU
    /// `virtqueue_get_head`: "Guest says index %u is available"). Returned without breaking
    /// the queue when the caller passes such a head to `add_used`.
    HeadOutOfRange {
        /// The head index read from the available ring (or passed to `add_used`).
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// Packed ring: the last descriptor of an available list carries a buffer id at or past
    /// the queue size. It cannot be returned: a driver rejects such a used id (Linux
    /// `virtqueue_get_buf_ctx_packed`: "id %u out of range"; the example in §2.8 "Receiving
    /// Used Buffers From The Device" asserts `id < vq->size`). Also returned, without
    /// breaking the queue, when the caller passes such an id to `add_used`.
    BufferIdOutOfRange {
        /// The buffer id.
        id: u16,
        /// The queue size.
        size: u16,
    },
    /// Packed ring: an available list reuses the buffer id of an element still in flight
    /// (§2.8 "Placing Available Buffers Into The Descriptor Ring": "Get the next free buffer
    /// id value"; returning both would make the driver see one id twice, Linux: "id %u is not
    /// a head!").
    BufferIdInUse {
        /// The buffer id made available twice.
        id: u16,
    },
    /// Packed ring: `add_used` with a buffer id that is not in flight (caller misuse; the
    /// queue is not broken).
    BufferIdNotInFlight {
        /// The buffer id passed to `add_used`.
        id: u16,
    },
    /// Split ring: `add_used` with a head that is not in flight (or more times than it is;
    /// caller misuse, the queue is not broken). Returning it would hand the driver a chain it
    /// did not make available (Linux: "id %u is not a head!").
    HeadNotInFlight {
        /// The head passed to `add_used`.
        head: u16,
    },
    /// Packed ring: a descriptor after the first of a NEXT-linked list is not available in
    /// the lap it is read in (§2.8 "Next Flag: Descriptor Chaining": "The driver always makes
    /// the first descriptor in the list available after the rest of the list has been written
    /// out ... the device will never observe a partial scatter/gather list"; its flags,
    /// including AVAIL/USED, "must be set/cleared correctly in all descriptors in the list").
    /// The list cannot be delimited.
    ChainDescNotAvailable {
        /// Ring slot of the descriptor.
        index: u16,
        /// The device's available wrap counter for that slot: the AVAIL bit the descriptor
        /// should carry, with USED its inverse.
        wrap: bool,
    },
    /// Packed ring: taking a list would put more descriptors in flight than the ring holds:
    /// the driver made available slots the device has not used yet (QEMU
    /// `virtqueue_packed_pop`: "Virtqueue size exceeded").
    RingOverrun {
        /// Descriptors already taken and not yet returned used.
        in_flight: u32,
        /// Descriptors in the new list.
        list: u32,
        /// The queue size.
        size: u16,
    },
    /// Packed ring: `set_indices` with a ring index at or past the queue size.
    IndexOutOfRange {
        /// The ring index given.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// Split ring: the used ring shares bytes with the descriptor table or the available
    /// ring. The device would be writing what it then reads as driver input: returning an
    /// element could publish a new available one, without end.
    UsedRingOverlaps {
        /// The part the used ring overlaps.
        ring: Ring,
    },
    /// Split ring: `set_indices` with a used index ahead of the available one or more than a
    /// queue behind it (QEMU refuses to load such a queue: "VQ %d size 0x%x < last_avail_idx
    /// 0x%x - used_idx 0x%x").
    IndicesInconsistent {
        /// The next available index to read, as given.
        last_avail: u16,
        /// The next used index to write, as given.
        next_used: u16,
        /// The queue size.
        size: u16,
    },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroSize => write!(f, "queue size is 0"),
            Self::SizeTooLarge { size } => {
                write!(f, "queue size {size} is more than {MAX_QUEUE_SIZE}")
            }
            Self::SizeNotPowerOfTwo { size } => {
                write!(f, "queue size {size} is not a power of two")
            }
            Self::Misaligned { ring, gpa, align } => {
                write!(f, "{ring} at {gpa:#x} is not {align}-byte aligned")
            }
            Self::RingOutsideRam { ring, gpa, len } => {
                write!(f, "{ring} ({len} bytes at {gpa:#x}) is not all guest RAM")
            }
            Self::AvailIdxJump {
                avail_idx,
                last_avail,
                size,
            } => write!(
                f,
                "available index moved from {last_avail} to {avail_idx}, more than the queue size {size}"
            ),
            Self::HeadOutOfRange { head, size } => {
                write!(f, "head index {head} is not below the queue size {size}")
            }
            Self::BufferIdOutOfRange { id, size } => {
                write!(f, "buffer id {id} is not below the queue size {size}")
            }
            Self::BufferIdInUse { id } => {
                write!(f, "buffer id {id} made available again while in flight")
            }
            Self::BufferIdNotInFlight { id } => write!(f, "buffer id {id} is not in flight"),
            Self::HeadNotInFlight { head } => write!(f, "head {head} is not in flight"),
            Self::ChainDescNotAvailable { index, wrap } => write!(
                f,
                "descriptor {index} inside a list is not available for wrap counter {}",
                u8::from(*wrap)
            ),
            Self::RingOverrun {
                in_flight,
                list,
                size,
            } => write!(
                f,
                "a list of {list} descriptors with {in_flight} in flight overruns the ring of {size}"
            ),
            Self::IndexOutOfRange { index, size } => {
                write!(f, "ring index {index} is not below the queue size {size}")
            }
            Self::UsedRingOverlaps { ring } => {
                write!(
                    f,
                    "the used ring overlaps the {ring}, which the device reads"
                )
            }
            Self::IndicesInconsistent {
                last_avail,
                next_used,
                size,
            } => write!(
                f,
                "used index {next_used} is not within a queue of {size} behind available index {last_avail}"
            ),
        }
    }
}

impl std::error::Error for QueueError {}

/// Rejected elements, counted by reason: one field per [`ElementError`] variant, plus the
/// queue-breaking guest faults (counted once, when they break the queue): the split ring's
/// bad head, and the packed ring's bad or reused buffer id, unavailable list descriptor and
/// ring overrun. A split queue never counts the packed-only reasons
/// ([`PACKED_ONLY_REASONS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RejectCounts {
    /// Split ring: [`QueueError::HeadOutOfRange`] (breaks the queue).
    pub head_out_of_range: u64,
    /// [`ElementError::NextOutOfRange`].
    pub next_out_of_range: u64,
    /// [`ElementError::ChainTooLong`].
    pub chain_too_long: u64,
    /// [`ElementError::IndirectWithNext`].
    pub indirect_with_next: u64,
    /// [`ElementError::NestedIndirect`].
    pub nested_indirect: u64,
    /// [`ElementError::IndirectEmpty`].
    pub indirect_empty: u64,
    /// [`ElementError::IndirectLenNotMultiple`].
    pub indirect_len_not_multiple: u64,
    /// [`ElementError::IndirectTooLarge`].
    pub indirect_too_large: u64,
    /// [`ElementError::IndirectOutsideRam`].
    pub indirect_outside_ram: u64,
    /// [`ElementError::ZeroLengthBuffer`].
    pub zero_length_buffer: u64,
    /// [`ElementError::BufferOutsideRam`].
    pub buffer_outside_ram: u64,
    /// [`ElementError::LengthOverflow`].
    pub length_overflow: u64,
    /// [`ElementError::ReadableAfterWritable`].
    pub readable_after_writable: u64,
    /// Packed ring: [`ElementError::IndirectInChain`].
    pub indirect_in_chain: u64,
    /// Packed ring: [`QueueError::BufferIdOutOfRange`] (breaks the queue).
    pub buffer_id_out_of_range: u64,
    /// Packed ring: [`QueueError::BufferIdInUse`] (breaks the queue).
    pub buffer_id_in_use: u64,
    /// Packed ring: [`QueueError::ChainDescNotAvailable`] (breaks the queue).
    pub chain_desc_not_available: u64,
    /// Packed ring: [`QueueError::RingOverrun`] (breaks the queue).
    pub ring_overrun: u64,
}

/// The [`RejectCounts`] reasons only a packed queue records.
pub const PACKED_ONLY_REASONS: [&str; 5] = [
    "indirect_in_chain",
    "buffer_id_out_of_range",
    "buffer_id_in_use",
    "chain_desc_not_available",
    "ring_overrun",
];

impl RejectCounts {
    /// Counts one rejected element.
    pub fn record(&mut self, e: &ElementError) {
        let field = match e {
            ElementError::NextOutOfRange { .. } => &mut self.next_out_of_range,
            ElementError::ChainTooLong { .. } => &mut self.chain_too_long,
            ElementError::IndirectWithNext => &mut self.indirect_with_next,
            ElementError::NestedIndirect => &mut self.nested_indirect,
            ElementError::IndirectEmpty => &mut self.indirect_empty,
            ElementError::IndirectLenNotMultiple { .. } => &mut self.indirect_len_not_multiple,
            ElementError::IndirectTooLarge { .. } => &mut self.indirect_too_large,
            ElementError::IndirectOutsideRam { .. } => &mut self.indirect_outside_ram,
            ElementError::ZeroLengthBuffer { .. } => &mut self.zero_length_buffer,
            ElementError::BufferOutsideRam { .. } => &mut self.buffer_outside_ram,
            ElementError::LengthOverflow { .. } => &mut self.length_overflow,
            ElementError::ReadableAfterWritable => &mut self.readable_after_writable,
            ElementError::IndirectInChain => &mut self.indirect_in_chain,
        };
        *field = field.saturating_add(1);
    }

    /// Every count with its reason name ([`ElementError::reason`], then the queue-breaking
    /// ones: `head_out_of_range` and the packed ring's).
    pub const fn by_reason(&self) -> [(&'static str, u64); 18] {
        [
            ("head_out_of_range", self.head_out_of_range),
            ("next_out_of_range", self.next_out_of_range),
            ("chain_too_long", self.chain_too_long),
            ("indirect_with_next", self.indirect_with_next),
            ("nested_indirect", self.nested_indirect),
            ("indirect_empty", self.indirect_empty),
            ("indirect_len_not_multiple", self.indirect_len_not_multiple),
            ("indirect_too_large", self.indirect_too_large),
            ("indirect_outside_ram", self.indirect_outside_ram),
            ("zero_length_buffer", self.zero_length_buffer),
            ("buffer_outside_ram", self.buffer_outside_ram),
            ("length_overflow", self.length_overflow),
            ("readable_after_writable", self.readable_after_writable),
            ("indirect_in_chain", self.indirect_in_chain),
            ("buffer_id_out_of_range", self.buffer_id_out_of_range),
            ("buffer_id_in_use", self.buffer_id_in_use),
            ("chain_desc_not_available", self.chain_desc_not_available),
            ("ring_overrun", self.ring_overrun),
        ]
    }

    /// All rejections.
    pub fn total(&self) -> u64 {
        self.by_reason()
            .iter()
            .fold(0u64, |acc, &(_, n)| acc.saturating_add(n))
    }
}

/// `vring_need_event` (§2.7.10 / Linux `include/uapi/linux/virtio_ring.h`): whether moving
/// the used index from `old` to `new` passed `event` (the driver's `used_event`), in 16-bit
/// wrapping arithmetic.
pub const fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// What a device does with either ring layout: take available elements, return them used,
/// decide on interrupts. Lets the free page path and the bindings serve split and packed
/// queues with one piece of code.
///
/// A batch of calls (a drain) resolves the queue's rings in guest RAM once
/// ([`rings`](Self::rings)), then takes and returns elements through them
/// ([`pop_in`](Self::pop_in), [`fill_used_in`](Self::fill_used_in)) and publishes what it
/// returned at the end ([`flush_used_in`](Self::flush_used_in)), as QEMU's
/// `virtqueue_fill`/`virtqueue_flush` do.
pub trait Virtqueue {
    /// The rings resolved in one guest RAM: [`SplitRings`] for a split
    /// queue; the RAM itself for a packed one.
    type Rings<'a>;
    /// Resolves the rings in `ram`; buffers are checked against `ram`'s memory map.
    fn rings<'a>(&self, ram: &GuestRam<'a>) -> Self::Rings<'a>;
    /// Takes the next available element (see [`SplitQueue::pop`]); for a packed queue the
    /// returned id is the buffer id.
    fn pop_in(
        &mut self,
        rings: &Self::Rings<'_>,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>>;
    /// Returns element `id` with `len` bytes written, like [`add_used`](Self::add_used), but
    /// the driver need not see it before the next [`flush_used_in`](Self::flush_used_in).
    fn fill_used_in(
        &mut self,
        rings: &Self::Rings<'_>,
        id: u16,
        len: u32,
    ) -> Result<(), QueueError>;
    /// Publishes every element filled since the last flush; call it before handing control
    /// back after any [`fill_used_in`](Self::fill_used_in).
    fn flush_used_in(&mut self, rings: &Self::Rings<'_>) -> Result<(), QueueError>;
    /// Takes the next available element (see [`pop_in`](Self::pop_in)).
    fn pop(&mut self, ram: &GuestRam<'_>, chain: &mut Chain) -> Option<Result<u16, ElementError>> {
        let rings = self.rings(ram);
        self.pop_in(&rings, chain)
    }
    /// Returns element `id` with `len` bytes written, published at once.
    fn add_used(&mut self, ram: &GuestRam<'_>, id: u16, len: u32) -> Result<(), QueueError> {
        let rings = self.rings(ram);
        self.fill_used_in(&rings, id, len)?;
        self.flush_used_in(&rings)
    }
    /// Checks, changing nothing, that every id of `ids` could be returned now (see
    /// [`SplitQueue::check_used`] and [`PackedQueue::check_used`]).
    fn check_used(&self, ids: &[u16]) -> Result<(), QueueError>;
    /// Returns every `(id, len)` of `used`, in order, or none of them: the whole batch is
    /// checked first ([`check_used`](Self::check_used)), so an id not in flight (or given
    /// more often than it is) changes nothing. A ring write that fails midway breaks the
    /// queue, as in [`add_used`](Self::add_used); what was written before it is published.
    fn add_used_batch(
        &mut self,
        ram: &GuestRam<'_>,
        used: &[(u16, u32)],
    ) -> Result<(), QueueError> {
        let ids: Vec<u16> = used.iter().map(|&(id, _)| id).collect();
        self.check_used(&ids)?;
        let rings = self.rings(ram);
        let filled = used
            .iter()
            .try_for_each(|&(id, len)| self.fill_used_in(&rings, id, len));
        let flushed = self.flush_used_in(&rings);
        filled.and(flushed)
    }
    /// Whether the driver wants an interrupt for what was used since the last decision.
    fn needs_interrupt(&mut self, ram: &GuestRam<'_>) -> bool;
    /// Why the queue stopped, if it did.
    fn error(&self) -> Option<&QueueError>;
    /// Rejected elements by reason.
    fn counts(&self) -> &RejectCounts;
    /// Queue size.
    fn size(&self) -> u16;
}

/// The methods both layouts implement alike, by their inherent ones.
macro_rules! impl_virtqueue_common {
    ($q:ty) => {
        fn check_used(&self, ids: &[u16]) -> Result<(), QueueError> {
            <$q>::check_used(self, ids)
        }
        fn needs_interrupt(&mut self, ram: &GuestRam<'_>) -> bool {
            <$q>::needs_interrupt(self, ram)
        }
        fn error(&self) -> Option<&QueueError> {
            <$q>::error(self)
        }
        fn counts(&self) -> &RejectCounts {
            <$q>::counts(self)
        }
        fn size(&self) -> u16 {
            <$q>::size(self)
        }
    };
}

impl Virtqueue for SplitQueue {
    type Rings<'a> = split::SplitRings<'a>;
    fn rings<'a>(&self, ram: &GuestRam<'a>) -> Self::Rings<'a> {
        Self::rings(self, ram)
    }
    fn pop_in(
        &mut self,
        rings: &Self::Rings<'_>,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        Self::pop_in(self, rings, chain)
    }
    fn fill_used_in(
        &mut self,
        rings: &Self::Rings<'_>,
        id: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        Self::fill_used_in(self, rings, id, len)
    }
    fn flush_used_in(&mut self, rings: &Self::Rings<'_>) -> Result<(), QueueError> {
        Self::flush_used_in(self, rings)
    }
    impl_virtqueue_common!(SplitQueue);
}

/// The packed ring publishes each used element by its own flags write, so filling is
/// returning and there is nothing to flush.
impl Virtqueue for PackedQueue {
    type Rings<'a> = GuestRam<'a>;
    fn rings<'a>(&self, ram: &GuestRam<'a>) -> Self::Rings<'a> {
        *ram
    }
    fn pop_in(
        &mut self,
        ram: &Self::Rings<'_>,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        Self::pop(self, ram, chain)
    }
    fn fill_used_in(&mut self, ram: &Self::Rings<'_>, id: u16, len: u32) -> Result<(), QueueError> {
        Self::add_used(self, ram, id, len)
    }
    fn flush_used_in(&mut self, _ram: &Self::Rings<'_>) -> Result<(), QueueError> {
        Ok(())
    }
    impl_virtqueue_common!(PackedQueue);
}

/// The rules for a descriptor that points to an indirect table, shared by both layouts
/// (§2.7.5.3 and §2.8 "Indirect Flag"): a non-empty whole number of 16-byte entries, no more
/// than the queue size, entirely RAM. Returns the number of entries. (INDIRECT with NEXT and
/// nesting are each layout's own checks, since they depend on where the descriptor sits.)
pub(crate) fn check_indirect_table(
    ram: &GuestRam<'_>,
    addr: u64,
    len: u32,
    size: u16,
) -> Result<u32, ElementError> {
    if len == 0 {
        return Err(ElementError::IndirectEmpty);
    }
    if !len.is_multiple_of(16) {
        return Err(ElementError::IndirectLenNotMultiple { len });
    }
    let entries = len / 16;
    if entries > u32::from(size) {
        return Err(ElementError::IndirectTooLarge { entries, size });
    }
    if !ram.contains(addr, u64::from(len)) {
        return Err(ElementError::IndirectOutsideRam { addr, len });
    }
    Ok(entries)
}

/// Checks one buffer descriptor (non-empty, entirely RAM in `layout`) and appends it to the
/// chain, which enforces the order and total-length rules.
pub(crate) fn push_buffer(
    layout: &crate::memmap::MemoryMap,
    chain: &mut Chain,
    addr: u64,
    len: u32,
    writable: bool,
) -> Result<(), ElementError> {
    if len == 0 {
        return Err(ElementError::ZeroLengthBuffer { addr });
    }
    // Usually inside one region: one lookup; otherwise checked piece by piece.
    let end = addr.checked_add(u64::from(len));
    let in_one_region = layout
        .region_of(addr)
        .is_some_and(|r| end.is_some_and(|end| end <= r.end()));
    if !in_one_region && layout.pieces(addr, u64::from(len)).is_none() {
        return Err(ElementError::BufferOutsideRam { addr, len });
    }
    chain.push(Desc {
        addr,
        len,
        writable,
    })
}
