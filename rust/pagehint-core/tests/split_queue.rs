//! The split virtqueue reader against hand-built rings: every rejection reason, queue breaks,
//! happy paths (chains, indirect tables, index wrap-around, notifications) and random rings.

use std::sync::atomic::AtomicU8;

use pagehint_core::guest_memory::zeroed_ram;
use pagehint_core::virtq::{
    Chain, Desc, ElementError, QueueError, Ring, SplitQueue, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as WRITE,
    vring_need_event,
};
use pagehint_core::{GuestRam, MemoryMap};
use proptest::prelude::*;

/// RAM [0, 64 KiB) and [128 KiB, 192 KiB): a hole in between, nothing after.
const LOW_END: u64 = 0x1_0000;
const HIGH: u64 = 0x2_0000;
const HIGH_END: u64 = 0x3_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Where buffers and indirect tables go.
const DATA: u64 = 0x8000;
const TABLE: u64 = 0x4000;

/// A guest with a hole and a queue's rings at fixed places; writes rings like a driver.
struct Rig {
    map: MemoryMap,
    buf: Vec<AtomicU8>,
    size: u16,
}

impl Rig {
    fn new(size: u16) -> Self {
        let map = MemoryMap::new(&[(0, LOW_END), (HIGH, HIGH_END - HIGH)], 4096).expect("map");
        let buf = zeroed_ram(usize::try_from(map.ram_bytes()).expect("small"));
        Self { map, buf, size }
    }

    fn ram(&self) -> GuestRam<'_> {
        GuestRam::new(&self.map, &self.buf).expect("sized")
    }

    fn queue(&self, event_idx: bool) -> SplitQueue {
        SplitQueue::new(&self.ram(), self.size, DESC, AVAIL, USED, event_idx).expect("queue")
    }

    /// Writes descriptor `i` of the table at `table`.
    fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        self.ram()
            .write(table + 16 * u64::from(i), &b)
            .expect("in ram");
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(DESC, i, addr, len, flags, next);
    }

    fn avail_idx(&self) -> u16 {
        self.ram().read_u16(AVAIL + 2).expect("ram")
    }

    fn set_avail_idx(&self, idx: u16) {
        self.ram().write_u16(AVAIL + 2, idx).expect("ram");
    }

    /// Makes `head` available: ring[idx % size] = head, then idx + 1.
    fn push(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = u64::from(idx % self.size);
        self.ram()
            .write_u16(AVAIL + 4 + 2 * slot, head)
            .expect("ram");
        self.set_avail_idx(idx.wrapping_add(1));
    }

    fn used_idx(&self) -> u16 {
        self.ram().read_u16(USED + 2).expect("ram")
    }

    /// Used element at used-ring index `i`: (id, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % self.size);
        let ram = self.ram();
        (
            ram.read_u32(at).expect("ram"),
            ram.read_u32(at + 4).expect("ram"),
        )
    }

    fn set_used_event(&self, v: u16) {
        self.ram()
            .write_u16(AVAIL + 4 + 2 * u64::from(self.size), v)
            .expect("ram");
    }

    fn avail_event(&self) -> u16 {
        self.ram()
            .read_u16(USED + 4 + 8 * u64::from(self.size))
            .expect("ram")
    }
}

const fn out(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: false,
    }
}

const fn inb(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        writable: true,
    }
}

/// A layout with 8 GiB of RAM from 0, for buffers too big for the test buffer (buffers are
/// only range-checked, never read).
fn big_layout() -> MemoryMap {
    MemoryMap::new(&[(0, 8 << 30)], 4096).expect("map")
}

/// One hostile element: how to write it at head 0 (size 8), and the exact reason expected.
struct Case {
    name: &'static str,
    build: fn(&Rig),
    want: ElementError,
    big_layout: bool,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "next index past the table",
            build: |r| r.desc(0, DATA, 4, NEXT, 8),
            want: ElementError::NextOutOfRange { next: 8, limit: 8 },
            big_layout: false,
        },
        Case {
            name: "loop 0 -> 1 -> 0",
            build: |r| {
                r.desc(0, DATA, 4, NEXT, 1);
                r.desc(1, DATA, 4, NEXT, 0);
            },
            want: ElementError::ChainTooLong { limit: 8 },
            big_layout: false,
        },
        Case {
            name: "self loop",
            build: |r| r.desc(0, DATA, 4, NEXT, 0),
            want: ElementError::ChainTooLong { limit: 8 },
            big_layout: false,
        },
        Case {
            name: "loop inside an indirect table",
            build: |r| {
                r.desc(0, TABLE, 32, INDIRECT, 0);
                r.desc_at(TABLE, 0, DATA, 4, NEXT, 1);
                r.desc_at(TABLE, 1, DATA, 4, NEXT, 0);
            },
            want: ElementError::ChainTooLong { limit: 2 },
            big_layout: false,
        },
        Case {
            name: "next past an indirect table",
            build: |r| {
                r.desc(0, TABLE, 32, INDIRECT, 0);
                r.desc_at(TABLE, 0, DATA, 4, NEXT, 2);
            },
            want: ElementError::NextOutOfRange { next: 2, limit: 2 },
            big_layout: false,
        },
        Case {
            name: "INDIRECT with NEXT",
            build: |r| {
                r.desc(0, TABLE, 16, INDIRECT | NEXT, 1);
                r.desc_at(TABLE, 0, DATA, 4, 0, 0);
                r.desc(1, DATA, 4, 0, 0);
            },
            want: ElementError::IndirectWithNext,
            big_layout: false,
        },
        Case {
            name: "nested indirect",
            build: |r| {
                r.desc(0, TABLE, 16, INDIRECT, 0);
                r.desc_at(TABLE, 0, TABLE + 0x100, 16, INDIRECT, 0);
                r.desc_at(TABLE + 0x100, 0, DATA, 4, 0, 0);
            },
            want: ElementError::NestedIndirect,
            big_layout: false,
        },
        Case {
            name: "indirect table of length 0",
            build: |r| r.desc(0, TABLE, 0, INDIRECT, 0),
            want: ElementError::IndirectEmpty,
            big_layout: false,
        },
        Case {
            name: "indirect table length not a multiple of 16",
            build: |r| r.desc(0, TABLE, 24, INDIRECT, 0),
            want: ElementError::IndirectLenNotMultiple { len: 24 },
            big_layout: false,
        },
        Case {
            name: "indirect table longer than the queue",
            build: |r| r.desc(0, TABLE, 16 * 9, INDIRECT, 0),
            want: ElementError::IndirectTooLarge {
                entries: 9,
                size: 8,
            },
            big_layout: false,
        },
        Case {
            name: "indirect table in the hole",
            build: |r| r.desc(0, LOW_END + 0x100, 32, INDIRECT, 0),
            want: ElementError::IndirectOutsideRam {
                addr: LOW_END + 0x100,
                len: 32,
            },
            big_layout: false,
        },
        Case {
            name: "indirect table crossing into the hole",
            build: |r| r.desc(0, LOW_END - 16, 32, INDIRECT, 0),
            want: ElementError::IndirectOutsideRam {
                addr: LOW_END - 16,
                len: 32,
            },
            big_layout: false,
        },
        Case {
            name: "zero-length buffer",
            build: |r| r.desc(0, DATA, 0, WRITE, 0),
            want: ElementError::ZeroLengthBuffer { addr: DATA },
            big_layout: false,
        },
        Case {
            name: "zero-length buffer inside an indirect table",
            build: |r| {
                r.desc(0, TABLE, 16, INDIRECT, 0);
                r.desc_at(TABLE, 0, DATA, 0, 0, 0);
            },
            want: ElementError::ZeroLengthBuffer { addr: DATA },
            big_layout: false,
        },
        Case {
            name: "buffer in the hole",
            build: |r| r.desc(0, LOW_END + 0x1000, 4096, WRITE, 0),
            want: ElementError::BufferOutsideRam {
                addr: LOW_END + 0x1000,
                len: 4096,
            },
            big_layout: false,
        },
        Case {
            name: "buffer crossing into the hole",
            build: |r| r.desc(0, LOW_END - 0x1000, 0x2000, WRITE, 0),
            want: ElementError::BufferOutsideRam {
                addr: LOW_END - 0x1000,
                len: 0x2000,
            },
            big_layout: false,
        },
        Case {
            name: "buffer past the end of RAM",
            build: |r| r.desc(0, HIGH_END - 4, 8, 0, 0),
            want: ElementError::BufferOutsideRam {
                addr: HIGH_END - 4,
                len: 8,
            },
            big_layout: false,
        },
        Case {
            name: "buffer wrapping past 2^64",
            build: |r| r.desc(0, u64::MAX - 10, 100, WRITE, 0),
            want: ElementError::BufferOutsideRam {
                addr: u64::MAX - 10,
                len: 100,
            },
            big_layout: false,
        },
        Case {
            name: "second buffer of a chain outside RAM",
            build: |r| {
                r.desc(0, DATA, 4, NEXT, 5);
                r.desc(5, HIGH_END, 4096, WRITE, 0);
            },
            want: ElementError::BufferOutsideRam {
                addr: HIGH_END,
                len: 4096,
            },
            big_layout: false,
        },
        Case {
            name: "total length over 2^32 - 1",
            build: |r| {
                r.desc(0, 0, 0xffff_f000, WRITE | NEXT, 1);
                r.desc(1, 0, 0x2000, WRITE, 0);
            },
            want: ElementError::LengthOverflow {
                total: 0xffff_f000 + 0x2000,
            },
            big_layout: true,
        },
        Case {
            name: "readable after writable",
            build: |r| {
                r.desc(0, DATA, 64, WRITE | NEXT, 1);
                r.desc(1, DATA + 64, 4, 0, 0);
            },
            want: ElementError::ReadableAfterWritable,
            big_layout: false,
        },
        Case {
            name: "readable in an indirect table after a writable direct buffer",
            build: |r| {
                r.desc(0, DATA, 64, WRITE | NEXT, 1);
                r.desc(1, TABLE, 16, INDIRECT, 0);
                r.desc_at(TABLE, 0, DATA + 64, 4, 0, 0);
            },
            want: ElementError::ReadableAfterWritable,
            big_layout: false,
        },
    ]
}

#[test]
fn every_bad_element_is_rejected_with_its_reason_returned_with_len_0_and_processing_goes_on() {
    let mut seen = std::collections::BTreeSet::new();
    for case in cases() {
        let rig = Rig::new(8);
        (case.build)(&rig);
        // A good element after the bad one.
        rig.desc(7, DATA + 0x800, 4096, WRITE, 0);
        rig.push(0);
        rig.push(7);
        let ram = rig.ram();
        let mut q = rig.queue(false);
        let layout = if case.big_layout {
            big_layout()
        } else {
            rig.map.clone()
        };
        let mut chain = Chain::new();
        let got = q.pop_with_layout(&ram, &layout, &mut chain);
        assert_eq!(got, Some(Err(case.want)), "{}", case.name);
        assert_eq!(rig.used_idx(), 1, "{}: returned at once", case.name);
        assert_eq!(rig.used(0), (0, 0), "{}: head 0 with len 0", case.name);
        let counts = q.counts();
        assert_eq!(counts.total(), 1, "{}", case.name);
        let by_reason = counts.by_reason();
        let hit: Vec<_> = by_reason.iter().filter(|(_, n)| *n == 1).collect();
        assert_eq!(hit, [&(case.want.reason(), 1)], "{}", case.name);
        assert!(!case.want.to_string().is_empty());
        seen.insert(case.want.reason());
        // Processing goes on with the next element.
        let got = q.pop_with_layout(&ram, &layout, &mut chain);
        assert_eq!(got, Some(Ok(7)), "{}", case.name);
        assert_eq!(chain.descs(), [inb(DATA + 0x800, 4096)], "{}", case.name);
        assert_eq!(q.pop_with_layout(&ram, &layout, &mut chain), None);
        assert!(q.error().is_none(), "{}", case.name);
    }
    // Every element reason has a case (head_out_of_range breaks the queue: tested below).
    let all: Vec<_> = pagehint_core::RejectCounts::default()
        .by_reason()
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| {
            *r != "head_out_of_range" && !pagehint_core::virtq::PACKED_ONLY_REASONS.contains(r)
        })
        .collect();
    for r in all {
        assert!(seen.contains(r), "no case for {r}");
    }
}

#[test]
fn queue_setup_is_checked() {
    let rig = Rig::new(8);
    let ram = rig.ram();
    let new = |size: u16, d: u64, a: u64, u: u64| SplitQueue::new(&ram, size, d, a, u, true);
    assert_eq!(new(0, DESC, AVAIL, USED).err(), Some(QueueError::ZeroSize));
    assert_eq!(
        new(49152, DESC, AVAIL, USED).err(),
        Some(QueueError::SizeTooLarge { size: 49152 })
    );
    assert_eq!(
        new(6, DESC, AVAIL, USED).err(),
        Some(QueueError::SizeNotPowerOfTwo { size: 6 })
    );
    assert_eq!(
        new(8, DESC + 8, AVAIL, USED).err(),
        Some(QueueError::Misaligned {
            ring: Ring::Desc,
            gpa: DESC + 8,
            align: 16
        })
    );
    assert_eq!(
        new(8, DESC, AVAIL + 1, USED).err(),
        Some(QueueError::Misaligned {
            ring: Ring::Avail,
            gpa: AVAIL + 1,
            align: 2
        })
    );
    assert_eq!(
        new(8, DESC, AVAIL, USED + 2).err(),
        Some(QueueError::Misaligned {
            ring: Ring::Used,
            gpa: USED + 2,
            align: 4
        })
    );
    assert_eq!(
        new(8, LOW_END, AVAIL, USED).err(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Desc,
            gpa: LOW_END,
            len: 128
        })
    );
    // 6 + 2 * 8 = 22 bytes: crossing into the hole.
    assert_eq!(
        new(8, DESC, LOW_END - 16, USED).err(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Avail,
            gpa: LOW_END - 16,
            len: 22
        })
    );
    assert_eq!(
        new(8, DESC, AVAIL, HIGH_END - 64).err(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Used,
            gpa: HIGH_END - 64,
            len: 70
        })
    );
    // The largest size is accepted when its rings fit: 512 KiB of descriptors, 64 KiB + 6
    // of available ring, 256 KiB + 6 of used ring.
    let map = MemoryMap::new(&[(0, 1 << 20)], 4096).expect("map");
    let buf = zeroed_ram(1 << 20);
    let big = GuestRam::new(&map, &buf).expect("sized");
    let q = SplitQueue::new(&big, 32768, 0, 0x8_0000, 0x9_2000, true).expect("fits");
    assert_eq!(q.size(), 32768);
    assert!(SplitQueue::new(&big, 32768, 0, 0x8_0000, 0xc_2000, true).is_err());
    let q = new(8, DESC, AVAIL, USED).expect("valid");
    assert_eq!(
        (
            q.size(),
            q.desc_gpa(),
            q.avail_gpa(),
            q.used_gpa(),
            q.event_idx()
        ),
        (8, DESC, AVAIL, USED, true)
    );
    for e in [
        QueueError::ZeroSize,
        QueueError::AvailIdxJump {
            avail_idx: 9,
            last_avail: 0,
            size: 8,
        },
        QueueError::HeadOutOfRange { head: 8, size: 8 },
    ] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn an_available_index_jump_breaks_the_queue() {
    let rig = Rig::new(8);
    rig.desc(0, DATA, 4, 0, 0);
    rig.set_avail_idx(9);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), None);
    let want = QueueError::AvailIdxJump {
        avail_idx: 9,
        last_avail: 0,
        size: 8,
    };
    assert_eq!(q.error(), Some(&want));
    // Broken stays broken, even once the index looks fine again.
    rig.set_avail_idx(1);
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!(q.add_used(&ram, 0, 0), Err(want));
    assert!(!q.needs_interrupt(&ram));
    assert_eq!(rig.used_idx(), 0);
    assert_eq!(q.counts().total(), 0);
}

#[test]
fn exactly_size_pending_is_fine_one_more_is_not() {
    let rig = Rig::new(8);
    rig.desc(0, DATA, 4, 0, 0);
    for _ in 0..8 {
        rig.push(0);
    }
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    let mut n = 0;
    while let Some(r) = q.pop(&ram, &mut chain) {
        assert_eq!(r, Ok(0));
        q.add_used(&ram, 0, 0).expect("ok");
        n += 1;
    }
    assert_eq!((n, q.error()), (8, None));
}

#[test]
fn a_bad_head_breaks_the_queue_and_is_counted() {
    let rig = Rig::new(8);
    rig.desc(0, DATA, 4, 0, 0);
    rig.push(0);
    rig.push(8);
    rig.push(0);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    q.add_used(&ram, 0, 0).expect("ok");
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!(
        q.error(),
        Some(&QueueError::HeadOutOfRange { head: 8, size: 8 })
    );
    assert_eq!(q.counts().head_out_of_range, 1);
    assert_eq!(q.counts().total(), 1);
    // The third element is never taken; nothing more is written.
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!(q.last_avail(), 1);
    assert_eq!(rig.used_idx(), 1);
    assert!(q.is_broken());
}

#[test]
fn add_used_refuses_a_head_past_the_queue_without_breaking_it() {
    let rig = Rig::new(8);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    assert_eq!(
        q.add_used(&ram, 8, 0),
        Err(QueueError::HeadOutOfRange { head: 8, size: 8 })
    );
    assert!(!q.is_broken());
    assert_eq!(rig.used_idx(), 0);
    q.add_used(&ram, 3, 17).expect("ok");
    assert_eq!((rig.used_idx(), rig.used(0)), (1, (3, 17)));
}

#[test]
fn a_queue_whose_rings_are_not_in_the_given_ram_breaks() {
    let rig = Rig::new(8);
    let q0 = rig.queue(false);
    // The same queue used with a smaller guest RAM that lacks its rings.
    let small = MemoryMap::new(&[(0, 0x1000)], 4096).expect("map");
    let buf = zeroed_ram(0x1000);
    let ram = GuestRam::new(&small, &buf).expect("sized");
    let mut q = q0.clone();
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert!(matches!(
        q.error(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Avail,
            ..
        })
    ));
    let mut q = q0;
    assert!(matches!(
        q.add_used(&ram, 0, 0),
        Err(QueueError::RingOutsideRam {
            ring: Ring::Used,
            ..
        })
    ));
    assert!(q.is_broken());
}

#[test]
fn next_chains_mix_readable_then_writable_buffers() {
    let rig = Rig::new(8);
    rig.desc(0, DATA, 16, NEXT, 3);
    rig.desc(3, DATA + 16, 4, NEXT, 5);
    rig.desc(5, HIGH, 4096, WRITE | NEXT, 2);
    // A writable buffer across two regions that touch? No: across nothing, ends at RAM end.
    rig.desc(2, HIGH_END - 8, 8, WRITE, 7);
    rig.push(0);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::with_capacity(4);
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    assert_eq!(chain.readable(), [out(DATA, 16), out(DATA + 16, 4)]);
    assert_eq!(chain.writable(), [inb(HIGH, 4096), inb(HIGH_END - 8, 8)]);
    assert_eq!((chain.len(), chain.total_len()), (4, 16 + 4 + 4096 + 8));
    assert!(!chain.is_empty());
    q.add_used(&ram, 0, 100).expect("ok");
    assert_eq!((rig.used_idx(), rig.used(0)), (1, (0, 100)));
    assert_eq!(q.next_used(), 1);
    assert_eq!(q.pop(&ram, &mut chain), None);
}

#[test]
fn a_chain_may_use_every_descriptor() {
    let rig = Rig::new(8);
    for i in 0..8u16 {
        let last = i == 7;
        rig.desc(
            i,
            DATA + 64 * u64::from(i),
            64,
            if last { WRITE } else { NEXT },
            i + 1,
        );
    }
    rig.push(0);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    assert_eq!((chain.readable().len(), chain.writable().len()), (7, 1));
}

#[test]
fn indirect_tables_after_direct_descriptors() {
    let rig = Rig::new(8);
    rig.desc(4, DATA, 12, NEXT, 1);
    // WRITE on the descriptor naming the table is ignored (spec 2.7.5.3.2).
    rig.desc(1, TABLE, 48, INDIRECT | WRITE, 0);
    rig.desc_at(TABLE, 0, DATA + 12, 4, NEXT, 2);
    rig.desc_at(TABLE, 2, HIGH + 0x1000, 0x3000, WRITE | NEXT, 1);
    rig.desc_at(TABLE, 1, DATA + 0x100, 1, WRITE, 0);
    // A table of exactly `size` entries, alone.
    for i in 0..8u16 {
        rig.desc_at(
            TABLE + 0x200,
            i,
            DATA + u64::from(i),
            1,
            if i == 7 { WRITE } else { NEXT },
            i + 1,
        );
    }
    rig.desc(6, TABLE + 0x200, 128, INDIRECT, 0);
    rig.push(4);
    rig.push(6);
    let ram = rig.ram();
    let mut q = rig.queue(true);
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(4)));
    assert_eq!(chain.readable(), [out(DATA, 12), out(DATA + 12, 4)]);
    assert_eq!(
        chain.writable(),
        [inb(HIGH + 0x1000, 0x3000), inb(DATA + 0x100, 1)]
    );
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(6)));
    assert_eq!((chain.readable().len(), chain.writable().len()), (7, 1));
    assert_eq!(q.counts().total(), 0);
}

#[test]
fn sixteen_bit_indices_wrap() {
    let rig = Rig::new(8);
    let start = 65533u16;
    rig.set_avail_idx(start);
    for h in 0..5u16 {
        rig.desc(h, DATA + 0x100 * u64::from(h), 0x100, WRITE, 0);
        rig.push(h);
    }
    assert_eq!(rig.avail_idx(), 2);
    let ram = rig.ram();
    let mut q = rig.queue(true);
    q.set_indices(start, start).expect("consistent indices");
    assert_eq!((q.last_avail(), q.next_used()), (start, start));
    let mut chain = Chain::new();
    let mut heads = vec![];
    while let Some(r) = q.pop(&ram, &mut chain) {
        let h = r.expect("good");
        assert_eq!(chain.descs(), [inb(DATA + 0x100 * u64::from(h), 0x100)]);
        // The device's avail_event follows last_avail (as QEMU writes it).
        assert_eq!(rig.avail_event(), q.last_avail());
        q.add_used(&ram, h, u32::from(h) + 1).expect("ok");
        heads.push(h);
    }
    assert_eq!(heads, [0, 1, 2, 3, 4]);
    assert_eq!((q.last_avail(), q.next_used(), rig.used_idx()), (2, 2, 2));
    for (k, h) in heads.iter().enumerate() {
        let i = start.wrapping_add(u16::try_from(k).expect("small"));
        assert_eq!(rig.used(i), (u32::from(*h), u32::from(*h) + 1));
    }
    assert!(q.error().is_none());
}

#[test]
fn needs_interrupt_without_event_idx_follows_no_interrupt() {
    let rig = Rig::new(8);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(q.needs_interrupt(&ram));
    ram.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
        .expect("ram");
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(!q.needs_interrupt(&ram));
    // used_event is ignored without EVENT_IDX.
    rig.set_used_event(1);
    assert!(!q.needs_interrupt(&ram));
}

#[test]
fn needs_interrupt_with_event_idx_follows_used_event() {
    let rig = Rig::new(8);
    let ram = rig.ram();
    let mut q = rig.queue(true);
    // The flag is ignored with EVENT_IDX.
    ram.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
        .expect("ram");
    // No decision yet: notify.
    assert!(q.needs_interrupt(&ram));
    // The driver wants to hear once used entry 2 is written (used idx reaches 3).
    rig.set_used_event(2);
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(!q.needs_interrupt(&ram)); // 0 -> 1
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(!q.needs_interrupt(&ram)); // 1 -> 2
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(q.needs_interrupt(&ram)); // 2 -> 3 passes 2
    q.add_used(&ram, 0, 0).expect("ok");
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(!q.needs_interrupt(&ram)); // 3 -> 5 does not pass 2 again
    // A batch that passes the event at once.
    rig.set_used_event(6);
    for _ in 0..3 {
        q.add_used(&ram, 0, 0).expect("ok");
    }
    assert!(q.needs_interrupt(&ram)); // 5 -> 8 passes 6
    // Nothing new: no interrupt.
    assert!(!q.needs_interrupt(&ram));
    // Across the 16-bit wrap.
    q.set_indices(0, 65534).expect("consistent indices");
    assert!(q.needs_interrupt(&ram)); // forgotten decision
    rig.set_used_event(65535);
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(!q.needs_interrupt(&ram)); // 65534 -> 65535
    q.add_used(&ram, 0, 0).expect("ok");
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(q.needs_interrupt(&ram)); // 65535 -> 1 passes 65535
    assert_eq!(q.next_used(), 1);
}

#[test]
fn vring_need_event_matches_the_spec_example() {
    // "if used_event is 0, then a device ... would send a notification after the first
    // buffer is used (and again after the 65536th buffer)".
    assert!(vring_need_event(0, 1, 0));
    assert!(!vring_need_event(0, 2, 1));
    assert!(vring_need_event(0, 1, 65535));
    assert!(vring_need_event(5, 10, 0));
    assert!(!vring_need_event(5, 5, 0));
}

/// Pops until `None`, checking every accepted chain; at most `size` elements can be pending
/// so more than `size + 1` calls means the reader does not stop.
fn drain(q: &mut SplitQueue, ram: &GuestRam<'_>, size: u16) -> (u32, u32) {
    let mut chain = Chain::new();
    let (mut ok, mut bad) = (0u32, 0u32);
    for _ in 0..=size {
        match q.pop(ram, &mut chain) {
            None => return (ok, bad),
            Some(Ok(head)) => {
                assert!(head < size);
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
                q.add_used(ram, head, 0).expect("not broken");
            }
            Some(Err(e)) => {
                assert!(!e.reason().is_empty());
                bad += 1;
            }
        }
    }
    panic!("the reader did not stop after {size} elements");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Raw random bytes in the descriptor table, the available ring and the data area.
    #[test]
    fn random_ring_bytes_never_panic_and_stop(
        size_log in 0u32..6,
        desc in proptest::collection::vec(any::<u8>(), 16 * 32),
        avail in proptest::collection::vec(any::<u8>(), 6 + 2 * 32),
        data in proptest::collection::vec(any::<u8>(), 512),
        last_avail in any::<u16>(),
        event_idx in any::<bool>(),
    ) {
        let size = 1u16 << size_log;
        let rig = Rig::new(size);
        let ram = rig.ram();
        ram.write(DESC, &desc[..16 * usize::from(size)]).expect("ram");
        ram.write(AVAIL, &avail[..6 + 2 * usize::from(size)]).expect("ram");
        ram.write(TABLE, &data).expect("ram");
        ram.write_u16(USED + 2, last_avail).expect("ram");
        let mut q = rig.queue(event_idx);
        q.set_indices(last_avail, last_avail).expect("consistent indices");
        let (ok, bad) = drain(&mut q, &ram, size);
        prop_assert!(ok + bad <= u32::from(size));
        prop_assert_eq!(rig.used_idx(), last_avail.wrapping_add(u16::try_from(ok + bad).expect("small")));
        prop_assert_eq!(q.counts().total(), u64::from(bad) + q.counts().head_out_of_range);
        let _ = q.needs_interrupt(&ram);
    }

    /// Structured random descriptors that reach deep paths: addresses in RAM, in the hole or
    /// at an indirect table; small lengths; any flags; next indices near the table size.
    #[test]
    fn random_structured_chains_never_panic_and_stop(
        size_log in 0u32..5,
        descs in proptest::collection::vec(
            (0usize..6, prop_oneof![Just(0u32), 1u32..64, Just(16), Just(32), Just(48), any::<u32>()],
             0u16..8, 0u16..20),
            32),
        table in proptest::collection::vec(
            (0usize..6, prop_oneof![Just(0u32), 1u32..64, Just(16), Just(32), any::<u32>()],
             0u16..8, 0u16..6),
            4),
        heads in proptest::collection::vec(0u16..20, 16),
        pending in 0u16..20,
    ) {
        let size = 1u16 << size_log;
        let rig = Rig::new(size);
        let addrs = [DATA, TABLE, LOW_END - 8, HIGH, u64::MAX - 3, HIGH_END - 16];
        for (i, &(a, len, flags, next)) in descs.iter().take(usize::from(size)).enumerate() {
            rig.desc(u16::try_from(i).expect("small"), addrs[a], len, flags, next);
        }
        for (i, &(a, len, flags, next)) in table.iter().enumerate() {
            rig.desc_at(TABLE, u16::try_from(i).expect("small"), addrs[a], len, flags, next);
        }
        for &h in heads.iter().take(usize::from(pending)) {
            rig.push(h);
        }
        if usize::from(pending) > heads.len() {
            rig.set_avail_idx(pending);
        }
        let ram = rig.ram();
        let mut q = rig.queue(true);
        let (ok, bad) = drain(&mut q, &ram, size);
        prop_assert!(ok + bad <= u32::from(size));
        if pending > size {
            prop_assert!(q.is_broken());
        }
    }
}

/// Found by the split_queue fuzz target: with the used ring on top of the available ring and
/// the used index ahead of the available one, every rejected element's used-index write
/// published another available element, so a drain never ended. Each of three defences
/// stops it on its own.
#[test]
fn a_self_feeding_ring_cannot_keep_the_device_busy() {
    let rig = Rig::new(4);
    let ram = rig.ram();
    // 1. The used ring may not overlap what the device reads.
    assert_eq!(
        SplitQueue::new(&ram, 4, DESC, AVAIL, AVAIL, false).err(),
        Some(QueueError::UsedRingOverlaps { ring: Ring::Avail })
    );
    assert_eq!(
        SplitQueue::new(&ram, 4, DESC, AVAIL, DESC + 32, false).err(),
        Some(QueueError::UsedRingOverlaps { ring: Ring::Desc })
    );
    // 2. Restored indices must be consistent (QEMU's virtio_load rule).
    let mut q = rig.queue(false);
    assert_eq!(
        q.set_indices(0, 1),
        Err(QueueError::IndicesInconsistent {
            last_avail: 0,
            next_used: 1,
            size: 4
        })
    );
    assert!(q.set_indices(5, 0).is_err());
    q.set_indices(4, 0)
        .expect("a full queue in flight is consistent");
    // 3. A drain takes at most the elements it was allowed, rejected ones included: here every
    // element is rejected (zero-length buffers) and the driver keeps publishing more.
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    for i in 0..4 {
        rig.desc(i, DATA, 0, 0, 0);
    }
    let mut bitmap = pagehint_core::DirtyBitmap::new(rig.map.npages()).expect("bitmap");
    let mut applier = pagehint_core::HintApplier::new(&mut bitmap, &rig.map).expect("fits");
    let mut taken = 0u32;
    for _ in 0..3 {
        for head in 0..4 {
            rig.push(head);
        }
        let (applied, stop) =
            pagehint_core::free_page::drain_hints(&mut q, &ram, &mut chain, Some(&mut applier), 3);
        assert_eq!(
            (applied, stop),
            (0, pagehint_core::free_page::DrainStop::Limit)
        );
        taken += 3;
        assert_eq!(u64::from(taken), q.counts().total());
        let (applied, stop) = pagehint_core::free_page::drain_hints(
            &mut q,
            &ram,
            &mut chain,
            Some(&mut applier),
            100,
        );
        assert_eq!(
            (applied, stop),
            (0, pagehint_core::free_page::DrainStop::Empty)
        );
        taken += 1;
        assert_eq!(u64::from(taken), q.counts().total());
    }
    assert_eq!(q.counts().zero_length_buffer, 12);
}

/// Outside a START window the device returns hint elements without applying them, and still
/// stops at the next cmd id so the state machine sees it in order.
#[test]
fn a_drain_without_an_applier_returns_hints_unapplied_and_stops_at_a_cmd_id() {
    use pagehint_core::free_page::{ControlElement, DrainStop, drain_hints};
    let rig = Rig::new(8);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    // Two hint elements of one page each, then a cmd id 0x8000_0001.
    rig.desc(0, DATA, 4096, WRITE, 0);
    rig.desc(1, DATA + 4096, 4096, WRITE, 0);
    rig.desc(2, DATA + 0x2000, 4, 0, 0);
    ram.write(DATA + 0x2000, &0x8000_0001u32.to_le_bytes())
        .expect("ram");
    for head in 0..3 {
        rig.push(head);
    }
    let (returned, stop) = drain_hints(&mut q, &ram, &mut chain, None, 100);
    assert_eq!(returned, 2);
    assert_eq!(
        stop,
        DrainStop::Control(ControlElement {
            head: 2,
            cmd_id: Some(0x8000_0001),
            hints: vec![]
        })
    );
    assert_eq!(rig.used_idx(), 2);
    assert_eq!((rig.used(0), rig.used(1)), ((0, 0), (1, 0)));
    // The same ring applied: the bitmap loses exactly the two hinted pages.
    let mut q = rig.queue(false);
    let mut bitmap = pagehint_core::DirtyBitmap::new(rig.map.npages()).expect("bitmap");
    bitmap.set_all();
    let mut applier = pagehint_core::HintApplier::new(&mut bitmap, &rig.map).expect("fits");
    let (returned, _) = drain_hints(&mut q, &ram, &mut chain, Some(&mut applier), 100);
    assert_eq!(returned, 2);
    assert_eq!(applier.finish().pages_cleared, 2);
}

/// `pop_batch` takes at most its budget and leaves the rest available for the next call.
#[test]
fn pop_batch_takes_at_most_its_budget() {
    use pagehint_core::virtq::pop_batch;
    let rig = Rig::new(8);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    for head in 0..5u16 {
        rig.desc(head, DATA + 4096 * u64::from(head), 4096, WRITE, 0);
        rig.push(head);
    }
    let first = pop_batch(&mut q, &ram, &mut chain, 3);
    assert_eq!(first.heads, [0, 1, 2]);
    assert_eq!(first.desc_element, [0, 1, 2]);
    let rest = pop_batch(&mut q, &ram, &mut chain, 100);
    assert_eq!(rest.heads, [3, 4]);
    assert_eq!(rest.desc_addr, [DATA + 3 * 4096, DATA + 4 * 4096]);
    assert!(pop_batch(&mut q, &ram, &mut chain, 100).is_empty());
    assert!(pop_batch(&mut q, &ram, &mut chain, 0).is_empty());
    assert_eq!(q.last_avail(), 5);
}

/// A rejected element uses the budget like an accepted one (a guest cannot keep the loop
/// going with bad elements), is returned used with length 0 and is absent from the result.
#[test]
fn pop_batch_counts_rejected_elements_against_the_budget() {
    use pagehint_core::virtq::pop_batch;
    let rig = Rig::new(8);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    rig.desc(0, DATA, 0, WRITE, 0); // zero length: rejected
    rig.desc(1, DATA, 4096, WRITE, 0);
    rig.desc(2, LOW_END, 4096, WRITE, 0); // in the hole: rejected
    rig.desc(3, DATA + 4096, 4096, WRITE, 0);
    for head in 0..4u16 {
        rig.push(head);
    }
    let two = pop_batch(&mut q, &ram, &mut chain, 2);
    assert_eq!(two.heads, [1]);
    assert_eq!(q.counts().total(), 1);
    assert_eq!((rig.used_idx(), rig.used(0)), (1, (0, 0)));
    let one = pop_batch(&mut q, &ram, &mut chain, 1);
    assert!(one.is_empty());
    assert_eq!(q.counts().buffer_outside_ram, 1);
    let last = pop_batch(&mut q, &ram, &mut chain, 1);
    assert_eq!(last.heads, [3]);
    assert_eq!(q.counts().total(), 2);
    assert_eq!(q.last_avail(), 4);
}

/// Descriptors come in chain order, out-buffers before in-buffers, tagged with the index of
/// their element in `heads` (not the head itself).
#[test]
fn pop_batch_keeps_chain_order_out_then_in() {
    use pagehint_core::virtq::pop_batch;
    let rig = Rig::new(8);
    let ram = rig.ram();
    let mut q = rig.queue(false);
    let mut chain = Chain::new();
    // Element at head 5: out 4 bytes, out 8 bytes, in 4096; element at head 2: in 4096 only.
    rig.desc(5, DATA, 4, NEXT, 6);
    rig.desc(6, DATA + 0x10, 8, NEXT, 7);
    rig.desc(7, DATA + 0x1000, 4096, WRITE, 0);
    rig.desc(2, DATA + 0x2000, 4096, WRITE, 0);
    rig.push(5);
    rig.push(2);
    let els = pop_batch(&mut q, &ram, &mut chain, 10);
    assert_eq!(els.len(), 2);
    assert_eq!(els.heads, [5, 2]);
    assert_eq!(els.desc_element, [0, 0, 0, 1]);
    assert_eq!(
        els.desc_addr,
        [DATA, DATA + 0x10, DATA + 0x1000, DATA + 0x2000]
    );
    assert_eq!(els.desc_len, [4, 8, 4096, 4096]);
    assert_eq!(els.desc_writable, [false, false, true, true]);
    assert_eq!(q.counts().total(), 0);
}
