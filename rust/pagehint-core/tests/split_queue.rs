//! The split virtqueue reader against hand-built rings: every rejection reason, queue breaks,
//! happy paths (chains, indirect tables, index wrap-around, notifications) and random rings.

use pagehint_core::free_page::{ControlElement, DrainStop, drain_hints};
use pagehint_core::test_utils::rig::{
    self as guest, DATA, DESC, DEVICE_AREA as USED, DRIVER_AREA as AVAIL, HIGH, HIGH_END, LOW_END,
    TABLE,
};
use pagehint_core::test_utils::{
    Driver, TestRam, device_readable as out, device_writable as inb, drain_checked,
};
use pagehint_core::virtq::{
    Chain, QueueError, Ring, SplitQueue, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as WRITE,
    Virtqueue, vring_need_event,
};
use proptest::prelude::*;

#[test]
fn queue_setup_is_checked() {
    let rig = guest::split(8);
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
    let big_mem = TestRam::new(&[(0, 1 << 20)], 4096).expect("map");
    let big = big_mem.ram();
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
    let rig = guest::split(8);
    rig.desc(0, DATA, 4, 0, 0);
    rig.set_avail_idx(9);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
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
    let rig = guest::split(8);
    rig.desc(0, DATA, 4, 0, 0);
    for _ in 0..8 {
        rig.push(0);
    }
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
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
    let rig = guest::split(8);
    rig.desc(0, DATA, 4, 0, 0);
    rig.push(0);
    rig.push(8);
    rig.push(0);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
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
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    assert_eq!(
        q.add_used(&ram, 8, 0),
        Err(QueueError::HeadOutOfRange { head: 8, size: 8 })
    );
    assert!(!q.is_broken());
    assert_eq!(rig.used_idx(), 0);
    rig.desc(3, DATA, 0x100, WRITE, 0);
    rig.push(3);
    assert_eq!(q.pop(&ram, &mut Chain::new()), Some(Ok(3)));
    q.add_used(&ram, 3, 17).expect("ok");
    assert_eq!((rig.used_idx(), rig.used(0)), (1, (3, 17)));
}

#[test]
fn add_used_refuses_heads_not_in_flight_and_changes_nothing() {
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    // Nothing taken yet: no head can be returned.
    assert_eq!(
        q.add_used(&ram, 0, 0),
        Err(QueueError::HeadNotInFlight { head: 0 })
    );
    for h in [2u16, 5] {
        rig.desc(h, DATA, 0x100, WRITE, 0);
        rig.push(h);
    }
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(2)));
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(5)));
    assert_eq!(q.in_flight(), 2);
    for (heads, bad) in [
        (&[3u16][..], QueueError::HeadNotInFlight { head: 3 }),
        (&[2, 2], QueueError::HeadNotInFlight { head: 2 }),
        (&[5, 2, 5], QueueError::HeadNotInFlight { head: 5 }),
        (&[2, 8], QueueError::HeadOutOfRange { head: 8, size: 8 }),
    ] {
        assert_eq!(q.check_used(heads), Err(bad), "{heads:?}");
        let used: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 1)).collect();
        assert_eq!(q.add_used_batch(&ram, &used), Err(bad), "{heads:?}");
        assert_eq!((q.next_used(), rig.used_idx(), q.in_flight()), (0, 0, 2));
    }
    assert!(!q.is_broken());
    // Returned in any order, each once.
    q.add_used_batch(&ram, &[(5, 7), (2, 9)])
        .expect("both in flight");
    assert_eq!(
        (rig.used(0), rig.used(1), rig.used_idx()),
        ((5, 7), (2, 9), 2)
    );
    assert_eq!(
        q.add_used(&ram, 5, 0),
        Err(QueueError::HeadNotInFlight { head: 5 })
    );
    // A driver that makes a head available again while it is in flight (against the rules,
    // served as QEMU serves it) has it in flight twice: it can be returned twice.
    rig.push(2);
    rig.push(2);
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(2)));
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(2)));
    assert_eq!(
        q.add_used_batch(&ram, &[(2, 0), (2, 0), (2, 0)]),
        Err(QueueError::HeadNotInFlight { head: 2 })
    );
    q.add_used_batch(&ram, &[(2, 0), (2, 0)])
        .expect("in flight twice");
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn elements_in_flight_across_set_indices_are_returned_by_any_head() {
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    // Restored with three elements in flight, taken by a reader whose heads are unknown.
    q.set_indices(13, 10).expect("consistent");
    assert_eq!(q.in_flight(), 3);
    assert_eq!(
        q.check_used(&[1, 2, 3, 4]),
        Err(QueueError::HeadNotInFlight { head: 4 })
    );
    q.add_used_batch(&ram, &[(4, 0), (4, 0)])
        .expect("two of the three");
    q.add_used(&ram, 7, 0).expect("the third");
    assert_eq!(
        q.add_used(&ram, 7, 0),
        Err(QueueError::HeadNotInFlight { head: 7 })
    );
    assert_eq!((q.next_used(), q.in_flight(), rig.used_idx()), (13, 0, 13));
}

#[test]
fn a_queue_whose_rings_are_not_in_the_given_ram_breaks() {
    let rig = guest::split(8);
    let mut q0 = rig.queue(false).expect("queue");
    q0.set_indices(1, 0).expect("one element in flight");
    // The same queue used with a smaller guest RAM that lacks its rings.
    let small = TestRam::new(&[(0, 0x1000)], 4096).expect("map");
    let ram = small.ram();
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
    let rig = guest::split(8);
    rig.desc(0, DATA, 16, NEXT, 3);
    rig.desc(3, DATA + 16, 4, NEXT, 5);
    rig.desc(5, HIGH, 4096, WRITE | NEXT, 2);
    // A writable buffer across two regions that touch? No: across nothing, ends at RAM end.
    rig.desc(2, HIGH_END - 8, 8, WRITE, 7);
    rig.push(0);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
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
    let rig = guest::split(8);
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
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    assert_eq!((chain.readable().len(), chain.writable().len()), (7, 1));
}

#[test]
fn indirect_tables_after_direct_descriptors() {
    let rig = guest::split(8);
    rig.desc(4, DATA, 12, NEXT, 1);
    // WRITE on the descriptor naming the table is ignored (spec 2.7.5.3.2).
    rig.desc(1, TABLE, 48, INDIRECT | WRITE, 0);
    rig.table_desc(TABLE, 0, DATA + 12, 4, NEXT, 2);
    rig.table_desc(TABLE, 2, HIGH + 0x1000, 0x3000, WRITE | NEXT, 1);
    rig.table_desc(TABLE, 1, DATA + 0x100, 1, WRITE, 0);
    // A table of exactly `size` entries, alone.
    for i in 0..8u16 {
        rig.table_desc(
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
    let mut q = rig.queue(true).expect("queue");
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
    let rig = guest::split(8);
    let start = 65533u16;
    rig.set_avail_idx(start);
    for h in 0..5u16 {
        rig.desc(h, DATA + 0x100 * u64::from(h), 0x100, WRITE, 0);
        rig.push(h);
    }
    assert_eq!(rig.avail_idx(), 2);
    let ram = rig.ram();
    let mut q = rig.queue(true).expect("queue");
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
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    q.set_indices(2, 0).expect("two elements in flight");
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(q.needs_interrupt(&ram));
    rig.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
    q.add_used(&ram, 0, 0).expect("ok");
    assert!(!q.needs_interrupt(&ram));
    // used_event is ignored without EVENT_IDX.
    rig.set_used_event(1);
    assert!(!q.needs_interrupt(&ram));
}

#[test]
fn needs_interrupt_with_event_idx_follows_used_event() {
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(true).expect("queue");
    q.set_indices(8, 0).expect("eight elements in flight");
    // The flag is ignored with EVENT_IDX.
    rig.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
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
    q.set_indices(1, 65534).expect("consistent indices");
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
        let rig = guest::split(size);
        let ram = rig.ram();
        ram.write(DESC, &desc[..16 * usize::from(size)]).expect("ram");
        ram.write(AVAIL, &avail[..6 + 2 * usize::from(size)]).expect("ram");
        ram.write(TABLE, &data).expect("ram");
        ram.write_u16(USED + 2, last_avail).expect("ram");
        let mut q = rig.queue(event_idx).expect("queue");
        q.set_indices(last_avail, last_avail).expect("consistent indices");
        let (ok, bad) = drain_checked(&mut q, &ram);
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
        let rig = guest::split(size);
        let addrs = [DATA, TABLE, LOW_END - 8, HIGH, u64::MAX - 3, HIGH_END - 16];
        for (i, &(a, len, flags, next)) in descs.iter().take(usize::from(size)).enumerate() {
            rig.desc(u16::try_from(i).expect("small"), addrs[a], len, flags, next);
        }
        for (i, &(a, len, flags, next)) in table.iter().enumerate() {
            rig.table_desc(TABLE, u16::try_from(i).expect("small"), addrs[a], len, flags, next);
        }
        for &h in heads.iter().take(usize::from(pending)) {
            rig.push(h);
        }
        if usize::from(pending) > heads.len() {
            rig.set_avail_idx(pending);
        }
        let ram = rig.ram();
        let mut q = rig.queue(true).expect("queue");
        let (ok, bad) = drain_checked(&mut q, &ram);
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
    let rig = guest::split(4);
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
    let mut q = rig.queue(false).expect("queue");
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
    // 3. A drain takes at most the elements it was allowed, rejected ones included: in
    // `both_layouts.rs`, for both layouts.
}

/// `pop_batch` takes at most its budget and leaves the rest available for the next call.
#[test]
fn pop_batch_takes_at_most_its_budget() {
    use pagehint_core::virtq::pop_batch;
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
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
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
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
    let rig = guest::split(8);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
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

/// Filled elements are in the used ring at once but reach the driver only with the used index
/// a flush writes; a drain flushes when it stops, here at a cmd id, with every hint before it.
#[test]
fn filled_elements_are_published_by_the_flush_and_by_a_drain_that_stops() {
    let rig = guest::split(8);
    for i in 0..3 {
        rig.desc(i, DATA + 0x1000 * u64::from(i), 4096, WRITE, 0);
        rig.push(i);
    }
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let rings = q.rings(&ram);
    let mut chain = Chain::new();
    assert_eq!(q.pop_in(&rings, &mut chain), Some(Ok(0)));
    assert_eq!(q.pop_in(&rings, &mut chain), Some(Ok(1)));
    q.fill_used_in(&rings, 1, 7).expect("in flight");
    q.fill_used_in(&rings, 0, 9).expect("in flight");
    assert_eq!((rig.used(0), rig.used(1)), ((1, 7), (0, 9)));
    assert_eq!((rig.used_idx(), q.next_used()), (0, 2));
    q.flush_used_in(&rings).expect("ring");
    assert_eq!(rig.used_idx(), 2);
    // A head filled once is no longer in flight: refused, nothing written.
    assert_eq!(
        q.fill_used_in(&rings, 0, 1),
        Err(QueueError::HeadNotInFlight { head: 0 })
    );
    assert_eq!((rig.used_idx(), q.next_used()), (2, 2));

    // The drain: one more hint, then a cmd id; both hints used before the drain returns.
    rig.desc(3, DATA + 0x4000, 4096, WRITE, 0);
    rig.push(3);
    rig.desc(4, DATA + 0x5000, 4, 0, 0);
    rig.push(4);
    let (applied, stop) = drain_hints(&mut q, &ram, &mut chain, None, 100);
    assert_eq!(applied, 2);
    assert!(matches!(
        stop,
        DrainStop::Control(ControlElement { head: 4, .. })
    ));
    assert_eq!(rig.used_idx(), 4);
    assert_eq!((rig.used(2), rig.used(3)), ((2, 0), (3, 0)));
    assert_eq!(q.in_flight(), 1);
}

/// Rings that cross from one region into another that touches it in guest-physical space
/// but not in the buffer (the map lists the higher region first) are read and written field
/// by field through the map, with the same results.
#[test]
fn rings_across_touching_regions_work_field_by_field() {
    // Four 64 KiB regions, listed from the top: each boundary is a jump in the buffer.
    let mem = TestRam::new(
        &[
            (0x3_0000, 0x1_0000),
            (0x2_0000, 0x1_0000),
            (0x1_0000, 0x1_0000),
            (0, 0x1_0000),
        ],
        4096,
    )
    .expect("map");
    let ring = pagehint_core::test_utils::SplitRing {
        size: 4,
        // Entries 0 and 1 below the boundary, 2 and 3 above.
        desc: 0x1_0000 - 32,
        // flags, idx, ring[0] below; ring[1..] and used_event above.
        avail: 0x2_0000 - 6,
        // flags, idx, used[0].id below; used[0].len onwards above.
        used: 0x3_0000 - 8,
    };
    let rig = pagehint_core::test_utils::SplitDriver::new(mem, ring);
    for i in 0..4u16 {
        rig.desc(
            i,
            DATA + 0x1000 * u64::from(i),
            100 + u32::from(i),
            WRITE,
            0,
        );
        rig.push(3 - i);
    }
    let ram = rig.ram();
    let mut q = SplitQueue::new(&ram, 4, ring.desc, ring.avail, ring.used, true).expect("queue");
    let mut chain = Chain::new();
    for i in 0..4u16 {
        let head = 3 - i;
        assert_eq!(q.pop(&ram, &mut chain), Some(Ok(head)));
        assert_eq!(
            chain.writable(),
            [inb(DATA + 0x1000 * u64::from(head), 100 + u32::from(head))]
        );
        q.add_used(&ram, head, 1000 + u32::from(head))
            .expect("in flight");
        assert_eq!(rig.used(i), (u32::from(head), 1000 + u32::from(head)));
        assert_eq!(rig.used_idx(), i + 1);
        assert_eq!(rig.avail_event(), i + 1);
    }
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert!(!q.is_broken());
}
