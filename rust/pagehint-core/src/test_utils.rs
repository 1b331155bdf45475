//! The driver side of a virtqueue, for tests and fuzzing (cargo feature `test-utils`).
//!
//! The readers in [`virtq`](crate::virtq) are the device side: they read what a driver wrote
//! into guest memory. This module is that driver, in the shape of rust-vmm virtio-queue's
//! `mock.rs`: guest RAM owned in a buffer ([`TestRam`]), and writers for both ring layouts
//! that put descriptors, indirect tables and available elements where the specification
//! says, read back what the device returned and set the event suppression fields.
//!
//! Two levels for each layout:
//! - [`SplitRing`] and [`PackedRing`] are only the ring addresses. Their methods take any
//!   [`GuestRam`], compute addresses with wrapping arithmetic and return [`OutsideRam`]
//!   instead of panicking, so a fuzz target can aim them at a configuration that is not
//!   valid yet.
//! - [`SplitDriver`] and [`PackedDriver`] own their RAM and keep the driver's state (where the
//!   next element goes, which used element comes next). They panic when a write misses RAM:
//!   a test that writes outside its own RAM is wrong.
//!
//! Nothing here is hardened or fast; it is test code that ships behind a feature so that the
//! crate's integration tests and the fuzz targets share one writer.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU8;

use crate::guest_memory::{GuestRam, OutsideRam, zeroed_ram};
use crate::memmap::{MapError, MemoryMap};
use crate::virtq::{
    Chain, Desc, PackedQueue, QueueError, SplitQueue, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE, Virtqueue,
};

/// One descriptor as a driver describes it before placing it: `(addr, len, flags)`. Where it
/// goes decides the rest (a split descriptor's `next`, a packed descriptor's id and
/// AVAIL/USED bits).
pub type DescSpec = (u64, u32, u16);

/// The id written into packed descriptors whose id the device must ignore (all but the last
/// of a list, and every indirect table entry).
pub const UNUSED_ID: u16 = 0xbeef;

/// A device-readable buffer as a reader returns it in a [`Chain`].
pub const fn device_readable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

/// A device-writable buffer as a reader returns it in a [`Chain`].
pub const fn device_writable(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

/// Guest RAM for a test: a memory map and a zeroed buffer of its size.
#[derive(Debug)]
pub struct TestRam {
    map: MemoryMap,
    bytes: Vec<AtomicU8>,
}

impl TestRam {
    /// RAM laid out as `MemoryMap::new(regions, page_size)`, all zero.
    pub fn new(regions: &[(u64, u64)], page_size: u64) -> Result<Self, MapError> {
        MemoryMap::new(regions, page_size).map(Self::from_map)
    }

    /// RAM for `map`, all zero. Allocates `map.ram_bytes()`: for small maps only.
    pub fn from_map(map: MemoryMap) -> Self {
        let len = usize::try_from(map.ram_bytes()).unwrap_or(usize::MAX);
        Self {
            bytes: zeroed_ram(len),
            map,
        }
    }

    /// The memory map.
    pub const fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// The RAM as the device reads it.
    pub fn ram(&self) -> GuestRam<'_> {
        GuestRam::new(&self.map, &self.bytes).expect("the buffer is the map's size")
    }

    /// Copies `data` to `gpa`; panics if it is not all RAM.
    pub fn poke(&self, gpa: u64, data: &[u8]) {
        self.ram()
            .write(gpa, data)
            .unwrap_or_else(|e| panic!("test write: {e}"));
    }
}

/// The 16 bytes of a split descriptor (§2.7.5): `{addr: le64, len: le32, flags: le16, next:
/// le16}`.
pub fn split_desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..].copy_from_slice(&next.to_le_bytes());
    b
}

/// The 16 bytes of a packed descriptor (§2.8.13): `{addr: le64, len: le32, id: le16, flags:
/// le16}`.
pub fn packed_desc_bytes(addr: u64, len: u32, id: u16, flags: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&id.to_le_bytes());
    b[14..].copy_from_slice(&flags.to_le_bytes());
    b
}

/// Guest-physical address of entry `i` of a descriptor table at `table` (wrapping).
fn entry_gpa(table: u64, i: u16) -> u64 {
    table.wrapping_add(16 * u64::from(i))
}

/// The addresses of a split queue's three rings (§2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitRing {
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring: `{flags, idx, ring[size], used_event}`.
    pub avail: u64,
    /// Used ring: `{flags, idx, ring[size] of {id: le32, len: le32}, avail_event}`.
    pub used: u64,
}

impl SplitRing {
    /// The available ring's slot for available index `idx` (0 for a queue of size 0).
    fn slot(&self, idx: u16) -> u64 {
        u64::from(idx.checked_rem(self.size).unwrap_or(0))
    }

    /// Writes descriptor `i` of the descriptor table.
    pub fn write_desc(
        &self,
        ram: &GuestRam<'_>,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), OutsideRam> {
        write_split_desc(ram, self.desc, i, addr, len, flags, next)
    }

    /// The available ring's flags (`VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub fn set_avail_flags(&self, ram: &GuestRam<'_>, flags: u16) -> Result<(), OutsideRam> {
        ram.write_u16(self.avail, flags)
    }

    /// The available index.
    pub fn avail_idx(&self, ram: &GuestRam<'_>) -> Result<u16, OutsideRam> {
        ram.read_u16(self.avail.wrapping_add(2))
    }

    /// Sets the available index (the driver's publish step, or a hostile jump).
    pub fn set_avail_idx(&self, ram: &GuestRam<'_>, idx: u16) -> Result<(), OutsideRam> {
        ram.write_u16(self.avail.wrapping_add(2), idx)
    }

    /// The head in the available ring's slot for available index `idx`.
    pub fn avail_head(&self, ram: &GuestRam<'_>, idx: u16) -> Result<u16, OutsideRam> {
        ram.read_u16(self.avail.wrapping_add(4 + 2 * self.slot(idx)))
    }

    /// Writes `head` into the available ring's slot for available index `idx`, without
    /// publishing it.
    pub fn set_avail_head(
        &self,
        ram: &GuestRam<'_>,
        idx: u16,
        head: u16,
    ) -> Result<(), OutsideRam> {
        ram.write_u16(self.avail.wrapping_add(4 + 2 * self.slot(idx)), head)
    }

    /// Makes `head` available: `ring[idx % size] = head`, then `idx + 1` (§2.7.13). Returns the
    /// new available index.
    pub fn publish(&self, ram: &GuestRam<'_>, head: u16) -> Result<u16, OutsideRam> {
        let idx = self.avail_idx(ram)?;
        self.set_avail_head(ram, idx, head)?;
        let next = idx.wrapping_add(1);
        self.set_avail_idx(ram, next)?;
        Ok(next)
    }

    /// `used_event`, after the available ring (EVENT_IDX, §2.7.10).
    pub fn set_used_event(&self, ram: &GuestRam<'_>, v: u16) -> Result<(), OutsideRam> {
        ram.write_u16(self.avail.wrapping_add(4 + 2 * u64::from(self.size)), v)
    }

    /// The used index.
    pub fn used_idx(&self, ram: &GuestRam<'_>) -> Result<u16, OutsideRam> {
        ram.read_u16(self.used.wrapping_add(2))
    }

    /// Sets the used index (a restored queue, or a hostile poke).
    pub fn set_used_idx(&self, ram: &GuestRam<'_>, idx: u16) -> Result<(), OutsideRam> {
        ram.write_u16(self.used.wrapping_add(2), idx)
    }

    /// Guest-physical address of the used element for used index `i`.
    pub fn used_elem_gpa(&self, i: u16) -> u64 {
        self.used.wrapping_add(4 + 8 * self.slot(i))
    }

    /// The used element for used index `i`: `(id, len)`.
    pub fn used_elem(&self, ram: &GuestRam<'_>, i: u16) -> Result<(u32, u32), OutsideRam> {
        let at = self.used_elem_gpa(i);
        Ok((ram.read_u32(at)?, ram.read_u32(at.wrapping_add(4))?))
    }

    /// `avail_event`, after the used ring (EVENT_IDX, §2.7.10).
    pub fn avail_event(&self, ram: &GuestRam<'_>) -> Result<u16, OutsideRam> {
        ram.read_u16(self.used.wrapping_add(4 + 8 * u64::from(self.size)))
    }
}

/// Writes entry `i` of a split descriptor table at `table` (the queue's, or an indirect one).
pub fn write_split_desc(
    ram: &GuestRam<'_>,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), OutsideRam> {
    ram.write(
        entry_gpa(table, i),
        &split_desc_bytes(addr, len, flags, next),
    )
}

/// Writes entry `i` of a packed descriptor ring or indirect table at `table`.
pub fn write_packed_desc(
    ram: &GuestRam<'_>,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
) -> Result<(), OutsideRam> {
    ram.write(
        entry_gpa(table, i),
        &packed_desc_bytes(addr, len, id, flags),
    )
}

/// What every driver of these tests can do, whatever the layout: lets one test body run over
/// both.
pub trait Driver {
    /// The device-side reader of this layout.
    type Queue: Virtqueue;

    /// The guest RAM.
    fn mem(&self) -> &TestRam;

    /// The guest RAM as the device reads it.
    fn ram(&self) -> GuestRam<'_> {
        self.mem().ram()
    }

    /// Queue size.
    fn size(&self) -> u16;

    /// The device's reader of this queue, with indices at their start.
    fn queue(&self, event_idx: bool) -> Result<Self::Queue, QueueError>;

    /// Writes an indirect table at `table` in this layout's descriptor format, entries in
    /// order (a split entry with NEXT points at the following one).
    fn write_table(&self, table: u64, descs: &[DescSpec]);

    /// Makes one element available, its descriptors with exactly the given flags (NEXT is not
    /// added or removed). Split: descriptors `id`, `id + 1`, ... (modulo the size), head
    /// `id`. Packed: the next ring slots, buffer id `id` in the last.
    fn add(&self, descs: &[DescSpec], id: u16);

    /// The next used element the device returned, `(id, len)`, if there is one.
    fn take_used(&self) -> Option<(u32, u32)>;
}

/// A driver of a split queue with its own guest RAM.
#[derive(Debug)]
pub struct SplitDriver {
    mem: TestRam,
    ring: SplitRing,
    /// The next used index the driver looks at.
    last_used: Cell<u16>,
}

impl SplitDriver {
    /// A driver of `ring` in `mem`. Writes nothing: fresh RAM is a valid empty queue.
    pub const fn new(mem: TestRam, ring: SplitRing) -> Self {
        Self {
            mem,
            ring,
            last_used: Cell::new(0),
        }
    }

    /// The ring addresses.
    pub const fn ring(&self) -> &SplitRing {
        &self.ring
    }

    /// The memory map.
    pub const fn map(&self) -> &MemoryMap {
        self.mem.map()
    }

    fn ok<T>(r: Result<T, OutsideRam>) -> T {
        r.unwrap_or_else(|e| panic!("split driver: {e}"))
    }

    /// Writes descriptor `i` of the queue's table.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        Self::ok(self.ring.write_desc(&self.ram(), i, addr, len, flags, next));
    }

    /// Writes entry `i` of an indirect table at `table`.
    pub fn table_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        Self::ok(write_split_desc(
            &self.ram(),
            table,
            i,
            addr,
            len,
            flags,
            next,
        ));
    }

    /// Writes a chain into descriptors `first`, `first + 1`, ... (modulo the size), each
    /// `next` naming the following one; the flags are as given.
    pub fn write_chain(&self, first: u16, descs: &[DescSpec]) {
        let mut i = first;
        for &(addr, len, flags) in descs {
            let next = i.wrapping_add(1).checked_rem(self.ring.size).unwrap_or(0);
            self.desc(i, addr, len, flags, next);
            i = next;
        }
    }

    /// Makes `head` available (`ring[idx % size] = head`, `idx + 1`).
    pub fn push(&self, head: u16) {
        Self::ok(self.ring.publish(&self.ram(), head));
    }

    /// The available index.
    pub fn avail_idx(&self) -> u16 {
        Self::ok(self.ring.avail_idx(&self.ram()))
    }

    /// Sets the available index.
    pub fn set_avail_idx(&self, idx: u16) {
        Self::ok(self.ring.set_avail_idx(&self.ram(), idx));
    }

    /// Sets the available ring's flags.
    pub fn set_avail_flags(&self, flags: u16) {
        Self::ok(self.ring.set_avail_flags(&self.ram(), flags));
    }

    /// Sets `used_event`.
    pub fn set_used_event(&self, v: u16) {
        Self::ok(self.ring.set_used_event(&self.ram(), v));
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        Self::ok(self.ring.used_idx(&self.ram()))
    }

    /// The used element at used index `i`: `(id, len)`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        Self::ok(self.ring.used_elem(&self.ram(), i))
    }

    /// `avail_event`.
    pub fn avail_event(&self) -> u16 {
        Self::ok(self.ring.avail_event(&self.ram()))
    }

    /// Makes the driver look for used elements from used index `i` on.
    pub fn set_last_used(&self, i: u16) {
        self.last_used.set(i);
    }
}

impl Driver for SplitDriver {
    type Queue = SplitQueue;

    fn mem(&self) -> &TestRam {
        &self.mem
    }

    fn size(&self) -> u16 {
        self.ring.size
    }

    fn queue(&self, event_idx: bool) -> Result<SplitQueue, QueueError> {
        let r = &self.ring;
        SplitQueue::new(&self.ram(), r.size, r.desc, r.avail, r.used, event_idx)
    }

    fn write_table(&self, table: u64, descs: &[DescSpec]) {
        for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
            self.table_desc(table, i, addr, len, flags, i.wrapping_add(1));
        }
    }

    fn add(&self, descs: &[DescSpec], id: u16) {
        self.write_chain(id, descs);
        self.push(id);
    }

    fn take_used(&self) -> Option<(u32, u32)> {
        let i = self.last_used.get();
        if i == self.used_idx() {
            return None;
        }
        self.last_used.set(i.wrapping_add(1));
        Some(self.used(i))
    }
}

/// AVAIL/USED bits of a descriptor made available in the lap with wrap counter `wrap`
/// (§2.8.1: AVAIL equal to the wrap counter, USED the inverse).
pub const fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL
    } else {
        VIRTQ_DESC_F_USED
    }
}

/// AVAIL/USED bits of a descriptor the device used in the lap with wrap counter `wrap` (both
/// equal to it).
pub const fn used_bits(wrap: bool) -> u16 {
    if wrap {
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
    } else {
        0
    }
}

/// `flags` with the AVAIL/USED bits replaced by `bits`.
pub const fn with_bits(flags: u16, bits: u16) -> u16 {
    (flags & !(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | bits
}

/// The addresses of a packed queue's three parts (§2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedRing {
    /// Queue size.
    pub size: u16,
    /// Descriptor ring.
    pub desc: u64,
    /// Driver event suppression structure `{off_wrap: le16, flags: le16}`.
    pub driver_event: u64,
    /// Device event suppression structure, same shape.
    pub device_event: u64,
}

impl PackedRing {
    /// Writes ring slot `pos`.
    pub fn write_desc(
        &self,
        ram: &GuestRam<'_>,
        pos: u16,
        addr: u64,
        len: u32,
        id: u16,
        flags: u16,
    ) -> Result<(), OutsideRam> {
        write_packed_desc(ram, self.desc, pos, addr, len, id, flags)
    }

    /// Ring slot `pos` as the driver reads it back: `(id, len, flags)`.
    pub fn read_desc(&self, ram: &GuestRam<'_>, pos: u16) -> Result<(u16, u32, u16), OutsideRam> {
        let at = entry_gpa(self.desc, pos);
        Ok((
            ram.read_u16(at.wrapping_add(12))?,
            ram.read_u32(at.wrapping_add(8))?,
            ram.read_u16(at.wrapping_add(14))?,
        ))
    }

    /// Sets only the flags of ring slot `pos` (the driver's last, publishing write).
    pub fn set_flags(&self, ram: &GuestRam<'_>, pos: u16, flags: u16) -> Result<(), OutsideRam> {
        ram.write_u16(entry_gpa(self.desc, pos).wrapping_add(14), flags)
    }

    /// Writes the driver event suppression structure.
    pub fn set_driver_event(
        &self,
        ram: &GuestRam<'_>,
        off_wrap: u16,
        flags: u16,
    ) -> Result<(), OutsideRam> {
        ram.write_u16(self.driver_event, off_wrap)?;
        ram.write_u16(self.driver_event.wrapping_add(2), flags)
    }

    /// The device event suppression structure: `(off_wrap, flags)`.
    pub fn device_event(&self, ram: &GuestRam<'_>) -> Result<(u16, u16), OutsideRam> {
        Ok((
            ram.read_u16(self.device_event)?,
            ram.read_u16(self.device_event.wrapping_add(2))?,
        ))
    }
}

/// `(pos, wrap)` one slot on in a ring of `size`.
fn step(pos: u16, wrap: bool, size: u16) -> (u16, bool) {
    let next = pos.wrapping_add(1);
    if next >= size {
        (0, !wrap)
    } else {
        (next, wrap)
    }
}

/// A driver of a packed queue with its own guest RAM, making lists available as in the
/// specification's example (§2.8.21): consecutive slots, the wrap counter flipping past the
/// end, the buffer id in the last descriptor, the first descriptor's flags written last; and
/// reading used descriptors back as its example driver does (§2.8.22).
#[derive(Debug)]
pub struct PackedDriver {
    mem: TestRam,
    ring: PackedRing,
    /// Next slot to make available, and the driver's wrap counter.
    next: Cell<(u16, bool)>,
    /// Next slot to look for a used descriptor at, and the wrap counter expected there.
    used: Cell<(u16, bool)>,
    /// Slots each buffer id took when last made available.
    slots_of: RefCell<BTreeMap<u16, u32>>,
}

impl PackedDriver {
    /// A driver of `ring` in `mem`, at slot 0 with both wrap counters 1 (§2.8.1).
    pub fn new(mem: TestRam, ring: PackedRing) -> Self {
        Self {
            mem,
            ring,
            next: Cell::new((0, true)),
            used: Cell::new((0, true)),
            slots_of: RefCell::new(BTreeMap::new()),
        }
    }

    /// The part addresses.
    pub const fn ring(&self) -> &PackedRing {
        &self.ring
    }

    /// The memory map.
    pub const fn map(&self) -> &MemoryMap {
        self.mem.map()
    }

    fn ok<T>(r: Result<T, OutsideRam>) -> T {
        r.unwrap_or_else(|e| panic!("packed driver: {e}"))
    }

    /// Where the next list goes: `(slot, wrap counter)`.
    pub fn position(&self) -> (u16, bool) {
        self.next.get()
    }

    /// Moves both the available and the used side to `(pos, wrap)` (a queue restored with
    /// `set_indices(pos, wrap, pos, wrap)`).
    pub fn set_position(&self, pos: u16, wrap: bool) {
        self.next.set((pos, wrap));
        self.used.set((pos, wrap));
    }

    /// Writes ring slot `pos` exactly as given (a raw poke).
    pub fn raw(&self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        Self::ok(self.ring.write_desc(&self.ram(), pos, addr, len, id, flags));
    }

    /// Writes entry `i` of an indirect table at `table` (its id is [`UNUSED_ID`]).
    pub fn entry(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16) {
        Self::ok(write_packed_desc(
            &self.ram(),
            table,
            i,
            addr,
            len,
            UNUSED_ID,
            flags,
        ));
    }

    /// Ring slot `pos`: `(id, len, flags)`.
    pub fn slot(&self, pos: u16) -> (u16, u32, u16) {
        Self::ok(self.ring.read_desc(&self.ram(), pos))
    }

    /// Writes the driver event suppression structure.
    pub fn set_driver_event(&self, off_wrap: u16, flags: u16) {
        Self::ok(self.ring.set_driver_event(&self.ram(), off_wrap, flags));
    }

    /// The device event suppression structure: `(off_wrap, flags)`.
    pub fn device_event(&self) -> (u16, u16) {
        Self::ok(self.ring.device_event(&self.ram()))
    }

    /// Makes a list available with exactly the given flags plus the AVAIL/USED bits of each
    /// slot's lap; buffer id `id` in the last descriptor, [`UNUSED_ID`] in the others.
    pub fn list_raw(&self, descs: &[DescSpec], id: u16) {
        let size = self.ring.size;
        let (first, first_wrap) = self.next.get();
        let (mut pos, mut wrap) = (first, first_wrap);
        let mut first_flags = None;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let this_id = if i + 1 == descs.len() { id } else { UNUSED_ID };
            let flags = flags | avail_bits(wrap);
            if i == 0 {
                // Everything but the flags now; the flags, which publish the list, last.
                let (_, _, old) = self.slot(pos);
                self.raw(pos, addr, len, this_id, old);
                first_flags = Some(flags);
            } else {
                self.raw(pos, addr, len, this_id, flags);
            }
            (pos, wrap) = step(pos, wrap, size);
        }
        if let Some(flags) = first_flags {
            Self::ok(self.ring.set_flags(&self.ram(), first, flags));
        }
        self.next.set((pos, wrap));
        let slots = u32::try_from(descs.len()).unwrap_or(u32::MAX);
        self.slots_of.borrow_mut().insert(id, slots);
    }

    /// Makes a list of buffers `(addr, len, writable)` available, NEXT on all but the last.
    pub fn list(&self, bufs: &[(u64, u32, bool)], id: u16) {
        let descs: Vec<DescSpec> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VIRTQ_DESC_F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                (addr, len, flags)
            })
            .collect();
        self.list_raw(&descs, id);
    }

    /// The next used descriptor, `(id, len, flags)`, if the device wrote one: a slot whose
    /// AVAIL and USED bits both equal the used wrap counter (Linux `is_used_desc_packed`; the
    /// USED bit alone also matches a slot made available in the previous lap and skipped).
    /// The driver then moves on by as many slots as that id's list took (one if it never made
    /// that id available).
    pub fn take_used_desc(&self) -> Option<(u16, u32, u16)> {
        let (pos, wrap) = self.used.get();
        let (id, len, flags) = self.slot(pos);
        let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
        let used = flags & VIRTQ_DESC_F_USED != 0;
        if avail != used || used != wrap {
            return None;
        }
        let slots = self.slots_of.borrow_mut().remove(&id).unwrap_or(1);
        let size = u32::from(self.ring.size);
        let next = u32::from(pos) + slots.min(size);
        let (next, wrap) = if next >= size {
            (next - size, !wrap)
        } else {
            (next, wrap)
        };
        self.used.set((u16::try_from(next).unwrap_or(0), wrap));
        Some((id, len, flags))
    }
}

impl Driver for PackedDriver {
    type Queue = PackedQueue;

    fn mem(&self) -> &TestRam {
        &self.mem
    }

    fn size(&self) -> u16 {
        self.ring.size
    }

    fn queue(&self, event_idx: bool) -> Result<PackedQueue, QueueError> {
        let r = &self.ring;
        PackedQueue::new(
            &self.ram(),
            r.size,
            r.desc,
            r.driver_event,
            r.device_event,
            event_idx,
        )
    }

    fn write_table(&self, table: u64, descs: &[DescSpec]) {
        for (i, &(addr, len, flags)) in (0u16..).zip(descs) {
            self.entry(table, i, addr, len, flags);
        }
    }

    fn add(&self, descs: &[DescSpec], id: u16) {
        self.list_raw(descs, id);
    }

    fn take_used(&self) -> Option<(u32, u32)> {
        self.take_used_desc()
            .map(|(id, len, _)| (u32::from(id), len))
    }
}

/// The device side of a test: pops `q` until it returns `None`, checking every accepted
/// element (non-empty, each buffer non-empty and entirely RAM, readable before writable,
/// total within `u32`, id below the size) and returning it used at once with length 0.
/// Returns `(accepted, rejected)`. At most `size` elements can be pending, so panics if more
/// than `size + 1` calls do not end it.
pub fn drain_checked<Q: Virtqueue>(q: &mut Q, ram: &GuestRam<'_>) -> (u32, u32) {
    let size = q.size();
    let mut chain = Chain::new();
    let (mut ok, mut bad) = (0u32, 0u32);
    for _ in 0..=size {
        match q.pop(ram, &mut chain) {
            None => return (ok, bad),
            Some(Ok(id)) => {
                assert!(id < size, "id {id} of a queue of {size}");
                assert!(!chain.is_empty());
                let first_writable = chain
                    .descs()
                    .iter()
                    .position(|d| d.writable)
                    .unwrap_or(chain.len());
                assert!(chain.descs()[first_writable..].iter().all(|d| d.writable));
                assert_eq!(chain.readable().len(), first_writable);
                for d in chain.descs() {
                    assert!(d.len > 0 && ram.contains(d.addr, u64::from(d.len)));
                }
                assert!(chain.total_len() <= u64::from(u32::MAX));
                ok += 1;
                if let Err(e) = q.add_used(ram, id, 0) {
                    panic!("returning {id}: {e}");
                }
            }
            Some(Err(e)) => {
                assert!(!e.reason().is_empty());
                bad += 1;
            }
        }
    }
    panic!("the reader did not stop after {size} elements");
}

/// The guest of the crate's queue tests: RAM `[0, 64 KiB)` and `[128 KiB, 192 KiB)` with a
/// hole between them and nothing after, a queue's three parts at 4, 8 and 12 KiB, room for
/// indirect tables at 16 KiB and for buffers from 32 KiB.
pub mod rig {
    use super::{PackedDriver, PackedRing, SplitDriver, SplitRing, TestRam};

    /// End of the low region, start of the hole.
    pub const LOW_END: u64 = 0x1_0000;
    /// Start of the high region, end of the hole.
    pub const HIGH: u64 = 0x2_0000;
    /// End of RAM.
    pub const HIGH_END: u64 = 0x3_0000;
    /// Descriptor table (split) or ring (packed).
    pub const DESC: u64 = 0x1000;
    /// Available ring (split) or driver event suppression structure (packed).
    pub const DRIVER_AREA: u64 = 0x2000;
    /// Used ring (split) or device event suppression structure (packed).
    pub const DEVICE_AREA: u64 = 0x3000;
    /// Where indirect tables go.
    pub const TABLE: u64 = 0x4000;
    /// Where buffers go.
    pub const DATA: u64 = 0x8000;

    /// The RAM, all zero.
    pub fn ram() -> TestRam {
        TestRam::new(&[(0, LOW_END), (HIGH, HIGH_END - HIGH)], 4096).expect("a valid map")
    }

    /// A split queue of `size` in a fresh guest.
    pub fn split(size: u16) -> SplitDriver {
        SplitDriver::new(
            ram(),
            SplitRing {
                size,
                desc: DESC,
                avail: DRIVER_AREA,
                used: DEVICE_AREA,
            },
        )
    }

    /// A packed queue of `size` in a fresh guest.
    pub fn packed(size: u16) -> PackedDriver {
        PackedDriver::new(
            ram(),
            PackedRing {
                size,
                desc: DESC,
                driver_event: DRIVER_AREA,
                device_event: DEVICE_AREA,
            },
        )
    }
}
