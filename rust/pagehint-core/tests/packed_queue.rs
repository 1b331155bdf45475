//! The packed virtqueue reader against hand-built rings: every rejection reason, queue breaks,
//! happy paths (lists straddling the ring end, indirect tables, out-of-order completion,
//! notifications), a driver model round trip, and random rings.

use std::collections::VecDeque;

use pagehint_core::RejectCounts;
use pagehint_core::test_utils::rig::{
    self as guest, DATA, DESC, DEVICE_AREA as DEVICE_EV, DRIVER_AREA as DRIVER_EV, HIGH, HIGH_END,
    LOW_END, TABLE,
};
use pagehint_core::test_utils::{
    Driver, PackedDriver, TestRam, UNUSED_ID as JUNK_ID, avail_bits, device_readable as out,
    device_writable as inb, drain_checked, used_bits, with_bits,
};
use pagehint_core::virtq::{
    Chain, Desc, PackedQueue, QueueError, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE, Ring, VIRTQ_DESC_F_AVAIL as AVAIL, VIRTQ_DESC_F_INDIRECT as INDIRECT,
    VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_USED as USED, VIRTQ_DESC_F_WRITE as WRITE, Virtqueue,
};
use proptest::prelude::*;

#[test]
fn queue_setup_is_checked() {
    let rig = guest::packed(8);
    let ram = rig.ram();
    let new = |size: u16, d: u64, a: u64, u: u64| PackedQueue::new(&ram, size, d, a, u, true);
    assert_eq!(
        new(0, DESC, DRIVER_EV, DEVICE_EV).err(),
        Some(QueueError::ZeroSize)
    );
    assert_eq!(
        new(32769, DESC, DRIVER_EV, DEVICE_EV).err(),
        Some(QueueError::SizeTooLarge { size: 32769 })
    );
    // Not a power of two: fine for a packed ring.
    for size in [1, 3, 5, 6, 7, 100] {
        let q = new(size, DESC, DRIVER_EV, DEVICE_EV).expect("any size");
        assert_eq!(q.size(), size);
    }
    assert_eq!(
        new(8, DESC + 8, DRIVER_EV, DEVICE_EV).err(),
        Some(QueueError::Misaligned {
            ring: Ring::Desc,
            gpa: DESC + 8,
            align: 16
        })
    );
    assert_eq!(
        new(8, DESC, DRIVER_EV + 2, DEVICE_EV).err(),
        Some(QueueError::Misaligned {
            ring: Ring::Avail,
            gpa: DRIVER_EV + 2,
            align: 4
        })
    );
    assert_eq!(
        new(8, DESC, DRIVER_EV, DEVICE_EV + 1).err(),
        Some(QueueError::Misaligned {
            ring: Ring::Used,
            gpa: DEVICE_EV + 1,
            align: 4
        })
    );
    assert_eq!(
        new(8, LOW_END - 64, DRIVER_EV, DEVICE_EV).err(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Desc,
            gpa: LOW_END - 64,
            len: 128
        })
    );
    assert_eq!(
        new(8, DESC, LOW_END, DEVICE_EV).err(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Avail,
            gpa: LOW_END,
            len: 4
        })
    );
    assert_eq!(
        new(8, DESC, DRIVER_EV, HIGH_END).err(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Used,
            gpa: HIGH_END,
            len: 4
        })
    );
    // The largest size: 512 KiB of descriptors.
    let big_mem = TestRam::new(&[(0, 1 << 20)], 4096).expect("map");
    let big = big_mem.ram();
    let q = PackedQueue::new(&big, 32768, 0, 0x8_0000, 0x8_0004, false).expect("fits");
    assert_eq!(q.size(), 32768);
    assert!(PackedQueue::new(&big, 32768, 0x8_0010, 0, 4, false).is_err());
    let q = new(8, DESC, DRIVER_EV, DEVICE_EV).expect("valid");
    assert_eq!(
        (
            q.size(),
            q.desc_gpa(),
            q.driver_event_gpa(),
            q.device_event_gpa(),
            q.event_idx()
        ),
        (8, DESC, DRIVER_EV, DEVICE_EV, true)
    );
    // Both wrap counters start at 1 (spec: "initialized to 1").
    assert_eq!(
        (q.next_avail(), q.avail_wrap(), q.next_used(), q.used_wrap()),
        (0, true, 0, true)
    );
    for e in [
        QueueError::BufferIdOutOfRange { id: 9, size: 8 },
        QueueError::BufferIdInUse { id: 1 },
        QueueError::BufferIdNotInFlight { id: 1 },
        QueueError::ChainDescNotAvailable {
            index: 1,
            wrap: false,
        },
        QueueError::RingOverrun {
            in_flight: 8,
            list: 1,
            size: 8,
        },
        QueueError::IndexOutOfRange { index: 8, size: 8 },
    ] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn a_buffer_id_past_the_queue_breaks_it_and_is_counted() {
    let rig = guest::packed(8);
    rig.list(&[(DATA, 4, false)], 0);
    rig.list(&[(DATA, 4, false), (DATA + 8, 4, true)], 8);
    rig.list(&[(DATA, 4, false)], 1);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    q.add_used(&ram, 0, 0).expect("ok");
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!(
        q.error(),
        Some(&QueueError::BufferIdOutOfRange { id: 8, size: 8 })
    );
    assert_eq!(q.counts().buffer_id_out_of_range, 1);
    assert_eq!(q.counts().total(), 1);
    // Nothing more is taken or written: slot 1 still holds the driver's descriptor.
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!((q.next_avail(), q.next_used()), (1, 1));
    assert_eq!(rig.slot(1), (JUNK_ID, 4, NEXT | AVAIL));
    assert!(q.is_broken());
    assert!(!q.needs_interrupt(&ram));
}

#[test]
fn a_buffer_id_reused_while_in_flight_breaks_the_queue() {
    let rig = guest::packed(8);
    rig.list(&[(DATA, 4, true)], 2);
    rig.list(&[(DATA + 4, 4, true)], 2);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(2)));
    assert_eq!(q.pop(&ram, &mut chain), None);
    let want = QueueError::BufferIdInUse { id: 2 };
    assert_eq!(q.error(), Some(&want));
    assert_eq!(q.counts().buffer_id_in_use, 1);
    assert_eq!(q.add_used(&ram, 2, 0), Err(want));
}

#[test]
fn a_list_descriptor_not_available_breaks_the_queue() {
    // Slot 1 was never made available (still zero), though slot 0 says NEXT.
    let rig = guest::packed(8);
    rig.raw(0, DATA, 4, 0, NEXT | AVAIL);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!(
        q.error(),
        Some(&QueueError::ChainDescNotAvailable {
            index: 1,
            wrap: true
        })
    );
    assert_eq!(q.counts().chain_desc_not_available, 1);
    assert_eq!(rig.slot(0), (0, 4, NEXT | AVAIL));

    // A list straddling the end whose second part keeps the old lap's bits: slot 0 of the
    // next lap must have AVAIL = 0 and USED = 1.
    let rig = guest::packed(4);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    q.set_indices(3, true, 3, true).expect("in range");
    rig.raw(0, DATA, 4, 7, AVAIL);
    rig.raw(3, DATA, 4, JUNK_ID, NEXT | AVAIL);
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!(
        q.error(),
        Some(&QueueError::ChainDescNotAvailable {
            index: 0,
            wrap: false
        })
    );
}

#[test]
fn making_available_slots_still_in_flight_breaks_the_queue() {
    let rig = guest::packed(4);
    rig.list(&[(DATA, 4, false), (DATA + 4, 4, true)], 0);
    rig.list(&[(DATA, 4, false), (DATA + 4, 4, true)], 1);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(1)));
    assert_eq!(q.in_flight(), 4);
    assert_eq!((q.next_avail(), q.avail_wrap()), (0, false));
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert!(!q.is_broken());
    // The driver overwrites slot 0, which the device has not used yet.
    rig.list(&[(DATA, 4, true)], 2);
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert_eq!(
        q.error(),
        Some(&QueueError::RingOverrun {
            in_flight: 4,
            list: 1,
            size: 4
        })
    );
    assert_eq!(q.counts().ring_overrun, 1);
}

#[test]
fn add_used_refuses_ids_not_in_flight_without_breaking() {
    let rig = guest::packed(8);
    rig.list(&[(DATA, 4, true), (DATA + 4, 4, true)], 6);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    assert_eq!(
        q.add_used(&ram, 8, 0),
        Err(QueueError::BufferIdOutOfRange { id: 8, size: 8 })
    );
    assert_eq!(
        q.add_used(&ram, 6, 0),
        Err(QueueError::BufferIdNotInFlight { id: 6 })
    );
    assert!(!q.is_broken());
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(6)));
    q.add_used(&ram, 6, 3).expect("in flight");
    assert_eq!(
        q.add_used(&ram, 6, 3),
        Err(QueueError::BufferIdNotInFlight { id: 6 })
    );
    assert_eq!(rig.slot(0), (6, 3, AVAIL | USED | WRITE));
    assert_eq!((q.next_used(), q.in_flight()), (2, 0));
    assert!(!q.is_broken());
}

#[test]
fn add_used_batch_is_refused_whole() {
    let rig = guest::packed(8);
    rig.list(&[(DATA, 4, true)], 1);
    rig.list(&[(DATA + 4, 4, true)], 4);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(1)));
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(4)));
    for (used, bad) in [
        (
            &[(4u16, 0u32), (1, 0), (4, 0)][..],
            QueueError::BufferIdNotInFlight { id: 4 },
        ),
        (&[(1, 0), (2, 0)], QueueError::BufferIdNotInFlight { id: 2 }),
        (
            &[(1, 0), (8, 0)],
            QueueError::BufferIdOutOfRange { id: 8, size: 8 },
        ),
    ] {
        assert_eq!(q.add_used_batch(&ram, used), Err(bad), "{used:?}");
        assert_eq!(
            (q.next_used(), q.in_flight()),
            (0, 2),
            "{used:?}: nothing returned"
        );
    }
    q.add_used_batch(&ram, &[(4, 2), (1, 3)])
        .expect("both in flight");
    assert_eq!(
        (rig.slot(0), rig.slot(1)),
        ((4, 2, AVAIL | USED | WRITE), (1, 3, AVAIL | USED | WRITE))
    );
    assert_eq!((q.next_used(), q.in_flight()), (2, 0));
}

#[test]
fn set_indices_checks_its_range() {
    let rig = guest::packed(5);
    let mut q = rig.queue(false).expect("queue");
    assert_eq!(
        q.set_indices(5, true, 0, true),
        Err(QueueError::IndexOutOfRange { index: 5, size: 5 })
    );
    assert_eq!(
        q.set_indices(0, true, 7, true),
        Err(QueueError::IndexOutOfRange { index: 7, size: 5 })
    );
    assert_eq!((q.next_avail(), q.next_used()), (0, 0));
    q.set_indices(4, false, 2, true).expect("in range");
    assert_eq!(
        (q.next_avail(), q.avail_wrap(), q.next_used(), q.used_wrap()),
        (4, false, 2, true)
    );
}

#[test]
fn a_queue_whose_parts_are_not_in_the_given_ram_breaks() {
    let rig = guest::packed(8);
    let q0 = rig.queue(false).expect("queue");
    let small = TestRam::new(&[(0, 0x1000)], 4096).expect("map");
    let ram = small.ram();
    let mut chain = Chain::new();
    let mut q = q0.clone();
    assert_eq!(q.pop(&ram, &mut chain), None);
    assert!(matches!(
        q.error(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Desc,
            ..
        })
    ));
    let mut q = q0;
    assert!(q.needs_interrupt(&ram));
    assert!(matches!(
        q.error(),
        Some(QueueError::RingOutsideRam {
            ring: Ring::Avail,
            ..
        })
    ));
}

#[test]
fn single_buffers_over_several_laps_flip_both_wrap_counters() {
    let rig = guest::packed(3);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    for k in 0..10u16 {
        let pos = k % 3;
        let wrap = (k / 3) % 2 == 0;
        let id = (k + 1) % 3;
        rig.list(&[(DATA + u64::from(k), 1, k % 2 == 0)], id);
        assert_eq!((q.next_avail(), q.avail_wrap()), (pos, wrap));
        assert_eq!(q.pop(&ram, &mut chain), Some(Ok(id)), "k = {k}");
        assert_eq!(chain.len(), 1);
        assert_eq!(chain.descs()[0].writable, k % 2 == 0);
        assert_eq!(q.pop(&ram, &mut chain), None);
        let len = u32::from(k % 2);
        q.add_used(&ram, id, len).expect("in flight");
        let write = if len > 0 { WRITE } else { 0 };
        assert_eq!(rig.slot(pos), (id, len, used_bits(wrap) | write), "k = {k}");
    }
    assert_eq!(
        (q.next_avail(), q.avail_wrap(), q.next_used(), q.used_wrap()),
        (1, false, 1, false)
    );
}

#[test]
fn a_list_straddling_the_ring_end_flips_the_wrap_counter_mid_list() {
    let rig = guest::packed(5);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    q.set_indices(3, true, 3, true).expect("in range");
    rig.set_position(3, true);
    let bufs = [
        (DATA, 16, false),
        (DATA + 16, 4, false),
        (HIGH, 4096, true),
        (HIGH_END - 8, 8, true),
    ];
    rig.list(&bufs, 4);
    // Slots 3, 4 in lap 1; slots 0, 1 in lap 0.
    assert_eq!(rig.slot(4).2, NEXT | AVAIL);
    assert_eq!(rig.slot(0).2, WRITE | NEXT | USED);
    assert_eq!(rig.slot(1), (4, 8, WRITE | USED));
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(4)));
    assert_eq!(chain.readable(), [out(DATA, 16), out(DATA + 16, 4)]);
    assert_eq!(chain.writable(), [inb(HIGH, 4096), inb(HIGH_END - 8, 8)]);
    assert_eq!(
        (q.next_avail(), q.avail_wrap(), q.in_flight()),
        (2, false, 4)
    );
    assert_eq!(q.pop(&ram, &mut chain), None);
    // The next list, at slot 2 of lap 0.
    rig.list(&[(DATA, 8, true)], 0);
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    q.add_used(&ram, 4, 100).expect("in flight");
    assert_eq!(rig.slot(3), (4, 100, AVAIL | USED | WRITE));
    assert_eq!((q.next_used(), q.used_wrap()), (2, false));
    q.add_used(&ram, 0, 0).expect("in flight");
    assert_eq!(rig.slot(2), (0, 0, 0));
    assert_eq!((q.next_used(), q.used_wrap(), q.in_flight()), (3, false, 0));
}

#[test]
fn a_list_may_take_every_slot() {
    let rig = guest::packed(7);
    let bufs: Vec<_> = (0..7u64).map(|i| (DATA + 64 * i, 64, i == 6)).collect();
    rig.list(&bufs, 6);
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(6)));
    assert_eq!((chain.readable().len(), chain.writable().len()), (6, 1));
    assert_eq!(
        (q.next_avail(), q.avail_wrap(), q.in_flight()),
        (0, false, 7)
    );
    assert_eq!(q.pop(&ram, &mut chain), None);
    q.add_used(&ram, 6, 0).expect("in flight");
    assert_eq!((q.next_used(), q.used_wrap()), (0, false));
}

#[test]
fn indirect_tables_take_one_slot_and_ignore_next_and_ids_inside() {
    let rig = guest::packed(8);
    rig.entry(TABLE, 0, DATA, 12, NEXT);
    rig.entry(TABLE, 1, DATA + 12, 4, 0);
    rig.entry(TABLE, 2, HIGH + 0x1000, 0x3000, WRITE | NEXT);
    rig.entry(TABLE, 3, DATA + 0x100, 1, WRITE);
    // WRITE on the descriptor naming the table is ignored.
    rig.list_raw(&[(TABLE, 64, INDIRECT | WRITE)], 7);
    // A table of exactly `size` entries.
    for i in 0..8u16 {
        rig.entry(
            TABLE + 0x200,
            i,
            DATA + u64::from(i),
            1,
            if i == 7 { WRITE } else { 0 },
        );
    }
    rig.list_raw(&[(TABLE + 0x200, 128, INDIRECT)], 0);
    let ram = rig.ram();
    let mut q = rig.queue(true).expect("queue");
    let mut chain = Chain::new();
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(7)));
    assert_eq!(chain.readable(), [out(DATA, 12), out(DATA + 12, 4)]);
    assert_eq!(
        chain.writable(),
        [inb(HIGH + 0x1000, 0x3000), inb(DATA + 0x100, 1)]
    );
    assert_eq!((q.next_avail(), q.in_flight()), (1, 1));
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    assert_eq!((chain.readable().len(), chain.writable().len()), (7, 1));
    assert_eq!((q.next_avail(), q.in_flight()), (2, 2));
    assert_eq!(q.counts().total(), 0);
}

#[test]
fn out_of_order_completion_advances_the_used_index_by_each_list_length() {
    let rig = guest::packed(8);
    rig.list(&[(DATA, 4, false), (DATA + 4, 4, true)], 0);
    rig.list(&[(DATA + 8, 4, true)], 1);
    rig.list(
        &[(DATA, 4, false), (DATA + 4, 4, false), (DATA + 8, 4, true)],
        2,
    );
    let ram = rig.ram();
    let mut q = rig.queue(false).expect("queue");
    let mut chain = Chain::new();
    for id in 0..3 {
        assert_eq!(q.pop(&ram, &mut chain), Some(Ok(id)));
    }
    assert_eq!(q.in_flight(), 6);
    q.add_used(&ram, 2, 30).expect("ok");
    q.add_used(&ram, 0, 0).expect("ok");
    q.add_used(&ram, 1, 10).expect("ok");
    // Used descriptors in completion order; each one's slot count skipped after it.
    assert_eq!(rig.slot(0), (2, 30, AVAIL | USED | WRITE));
    assert_eq!(rig.slot(3), (0, 0, AVAIL | USED));
    assert_eq!(rig.slot(5), (1, 10, AVAIL | USED | WRITE));
    assert_eq!((q.next_used(), q.in_flight()), (6, 0));
}

#[test]
fn event_idx_writes_the_device_area_and_plain_mode_leaves_it() {
    let rig = guest::packed(4);
    for id in 0..2 {
        rig.list(&[(DATA, 4, true), (DATA + 4, 4, true)], id);
    }
    let ram = rig.ram();
    let mut chain = Chain::new();
    let mut plain = rig.queue(false).expect("queue");
    assert_eq!(plain.pop(&ram, &mut chain), Some(Ok(0)));
    assert_eq!(rig.device_event(), (0, RING_EVENT_FLAGS_ENABLE));
    let mut q = rig.queue(true).expect("queue");
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
    assert_eq!(rig.device_event(), (2 | 1 << 15, RING_EVENT_FLAGS_DESC));
    assert_eq!(q.pop(&ram, &mut chain), Some(Ok(1)));
    // Next slot 0 of lap 0.
    assert_eq!(rig.device_event(), (0, RING_EVENT_FLAGS_DESC));
}

#[test]
fn needs_interrupt_follows_the_driver_event_flags() {
    for event_idx in [false, true] {
        let rig = guest::packed(8);
        let ram = rig.ram();
        let mut chain = Chain::new();
        let mut q = rig.queue(event_idx).expect("queue");
        rig.set_driver_event(0, RING_EVENT_FLAGS_DISABLE);
        assert!(!q.needs_interrupt(&ram));
        rig.set_driver_event(0, RING_EVENT_FLAGS_ENABLE);
        assert!(q.needs_interrupt(&ram));
        // Reserved flags value: notify.
        rig.set_driver_event(0, 3);
        assert!(q.needs_interrupt(&ram));
        // Reserved upper bits are ignored.
        rig.set_driver_event(0, 0xfffc | RING_EVENT_FLAGS_DISABLE);
        assert!(!q.needs_interrupt(&ram));
        // DESC without EVENT_IDX is not valid: notify.
        rig.set_driver_event(5 | 1 << 15, RING_EVENT_FLAGS_DESC);
        rig.list(&[(DATA, 4, true)], 0);
        assert_eq!(q.pop(&ram, &mut chain), Some(Ok(0)));
        q.add_used(&ram, 0, 0).expect("ok");
        assert_eq!(q.needs_interrupt(&ram), !event_idx);
    }
}

#[test]
fn needs_interrupt_with_event_idx_follows_the_event_descriptor_across_the_wrap() {
    let rig = guest::packed(5);
    let ram = rig.ram();
    let mut q = rig.queue(true).expect("queue");
    let mut chain = Chain::new();
    let mut one = |q: &mut PackedQueue, slots: usize| {
        let bufs = vec![(DATA, 4, true); slots];
        rig.list(&bufs, 1);
        assert_eq!(q.pop(&ram, &mut chain), Some(Ok(1)));
        q.add_used(&ram, 1, 0).expect("ok");
    };
    // No decision yet: notify, whatever the event.
    rig.set_driver_event(4 | 1 << 15, RING_EVENT_FLAGS_DESC);
    assert!(q.needs_interrupt(&ram));
    // Nothing used since: no.
    assert!(!q.needs_interrupt(&ram));
    // Event at slot 4 of lap 1. Used 0 -> 2: no; 2 -> 4: no; 4 -> 0 (lap 0): yes.
    one(&mut q, 2);
    assert!(!q.needs_interrupt(&ram));
    one(&mut q, 2);
    assert!(!q.needs_interrupt(&ram));
    one(&mut q, 1);
    assert_eq!((q.next_used(), q.used_wrap()), (0, false));
    assert!(q.needs_interrupt(&ram));
    // Event at slot 1 of lap 0, passed inside a list straddling... 0 -> 3 covers 0, 1, 2.
    rig.set_driver_event(1, RING_EVENT_FLAGS_DESC);
    one(&mut q, 3);
    assert!(q.needs_interrupt(&ram));
    // Event at slot 1 of lap 1 (the next lap): 3 -> 0 (lap 1) covers 3, 4: no; then 0 -> 2
    // covers 0, 1: yes.
    rig.set_driver_event(1 | 1 << 15, RING_EVENT_FLAGS_DESC);
    one(&mut q, 2);
    assert_eq!((q.next_used(), q.used_wrap()), (0, true));
    assert!(!q.needs_interrupt(&ram));
    one(&mut q, 2);
    assert!(q.needs_interrupt(&ram));
    // An event in the lap behind, straddled by one batch: 2 -> 1 (lap 0) covers 2, 3, 4, 0.
    rig.set_driver_event(4 | 1 << 15, RING_EVENT_FLAGS_DESC);
    one(&mut q, 2);
    one(&mut q, 2);
    assert_eq!((q.next_used(), q.used_wrap()), (1, false));
    assert!(q.needs_interrupt(&ram));
    // A batch of a whole lap or more covers every slot.
    rig.set_driver_event(1, RING_EVENT_FLAGS_DESC);
    one(&mut q, 5);
    assert!(q.needs_interrupt(&ram));
    // set_indices forgets the decision.
    q.set_indices(0, true, 0, true).expect("ok");
    assert!(q.needs_interrupt(&ram));
}

/// Queue-breaking counts.
fn breaks(c: &RejectCounts) -> u64 {
    c.buffer_id_out_of_range + c.buffer_id_in_use + c.chain_desc_not_available + c.ring_overrun
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Raw random bytes in the descriptor ring and the table area, any start position and
    /// wrap counters.
    #[test]
    fn random_ring_bytes_never_panic_and_stop(
        size in 1u16..=9,
        desc in proptest::collection::vec(any::<u8>(), 16 * 9),
        table in proptest::collection::vec(any::<u8>(), 512),
        start in 0u16..9,
        wrap in any::<bool>(),
        avail_bits_bias in proptest::collection::vec(any::<bool>(), 9),
        event_idx in any::<bool>(),
        driver_event in any::<u32>(),
    ) {
        let rig = guest::packed(size);
        let ram = rig.ram();
        ram.write(DESC, &desc[..16 * usize::from(size)]).expect("ram");
        // Bias half the slots to be available in the starting lap so lists get long.
        for (i, &b) in avail_bits_bias.iter().take(usize::from(size)).enumerate() {
            if b {
                let pos = u16::try_from(i).expect("small");
                let (_, _, flags) = rig.slot(pos);
                let at = DESC + 16 * u64::from(pos) + 14;
                ram.write_u16(at, with_bits(flags, avail_bits(wrap))).expect("ram");
            }
        }
        ram.write(TABLE, &table).expect("ram");
        ram.write(DRIVER_EV, &driver_event.to_le_bytes()).expect("ram");
        let mut q = rig.queue(event_idx).expect("queue");
        let start = start % size;
        q.set_indices(start, wrap, start, wrap).expect("in range");
        let (ok, bad) = drain_checked(&mut q, &ram);
        prop_assert!(ok + bad <= u32::from(size));
        prop_assert_eq!(q.in_flight(), 0);
        prop_assert_eq!(q.counts().total(), u64::from(bad) + breaks(q.counts()));
        prop_assert!(breaks(q.counts()) <= 1);
        prop_assert_eq!(breaks(q.counts()) == 1, q.is_broken());
        let _ = q.needs_interrupt(&ram);
    }

    /// Structured random lists: addresses in RAM, in the hole or at an indirect table; small
    /// lengths; any flags; ids near the size; AVAIL/USED bits right or wrong.
    #[test]
    fn random_structured_lists_never_panic_and_stop(
        size in 1u16..=9,
        descs in proptest::collection::vec(
            (0usize..6, prop_oneof![Just(0u32), 1u32..64, Just(16), Just(32), Just(48), any::<u32>()],
             0u16..8, 0u16..11, 0u8..8),
            9),
        table in proptest::collection::vec(
            (0usize..6, prop_oneof![Just(0u32), 1u32..64, Just(16), any::<u32>()], 0u16..8),
            4),
        start in 0u16..9,
        wrap in any::<bool>(),
    ) {
        let rig = guest::packed(size);
        let addrs = [DATA, TABLE, LOW_END - 8, HIGH, u64::MAX - 3, HIGH_END - 16];
        let mut q = rig.queue(true).expect("queue");
        let start = start % size;
        q.set_indices(start, wrap, start, wrap).expect("in range");
        for (i, &(a, len, flags, id, bits)) in descs.iter().take(usize::from(size)).enumerate() {
            let pos = u16::try_from(i).expect("small");
            // Slots before `start` belong to the next lap.
            let lap = if pos < start { !wrap } else { wrap };
            let bits = match bits {
                0 => 0,
                1 => AVAIL | USED,
                2 => avail_bits(!lap),
                _ => avail_bits(lap),
            };
            rig.raw(pos, addrs[a], len, id, flags | bits);
        }
        for (i, &(a, len, flags)) in table.iter().enumerate() {
            rig.entry(TABLE, u16::try_from(i).expect("small"), addrs[a], len, flags);
        }
        let ram = rig.ram();
        let (ok, bad) = drain_checked(&mut q, &ram);
        prop_assert!(ok + bad <= u32::from(size));
        prop_assert_eq!(q.counts().total(), u64::from(bad) + breaks(q.counts()));
    }

    /// A driver following the spec against the reader, with out-of-order completion and
    /// lists of every length straddling the ring end: every buffer comes back exactly once,
    /// with its length, where the driver looks for it.
    #[test]
    fn a_well_behaved_driver_gets_every_buffer_back(
        size in 1u16..=9,
        ops in proptest::collection::vec((0u8..4, 0usize..64, any::<bool>()), 1..300),
    ) {
        let rig = guest::packed(size);
        let ram = rig.ram();
        let mut q = rig.queue(true).expect("queue");
        let mut m = Model::new(size);
        let mut chain = Chain::new();
        let mut pending: Vec<u16> = vec![];
        for (op, n, indirect) in ops {
            match op {
                0 => m.add(&rig, 1 + n % usize::from(size), indirect),
                1 => match q.pop(&ram, &mut chain) {
                    None => prop_assert!(m.avail.is_empty()),
                    Some(r) => {
                        let id = r.expect("a good element");
                        let (want_id, bufs) = m.avail.pop_front().expect("one was available");
                        prop_assert_eq!(id, want_id);
                        prop_assert_eq!(chain.descs(), bufs.as_slice());
                        pending.push(id);
                    }
                },
                2 => if !pending.is_empty() {
                    let id = pending.remove(n % pending.len());
                    let len = u32::from(id) * 7 + 1;
                    q.add_used(&ram, id, len).expect("in flight");
                    m.used.push_back((id, len));
                },
                _ => m.reap(&rig),
            }
            prop_assert!(!q.is_broken(), "{:?}", q.error());
        }
        // Finish: take everything, return everything, reap everything.
        while let Some(r) = q.pop(&ram, &mut chain) {
            let id = r.expect("good");
            prop_assert_eq!(Some(id), m.avail.pop_front().map(|(id, _)| id));
            pending.push(id);
        }
        for id in pending {
            q.add_used(&ram, id, 0).expect("in flight");
            m.used.push_back((id, 0));
        }
        m.reap(&rig);
        prop_assert!(m.used.is_empty());
        prop_assert_eq!(m.free_slots, u32::from(size));
        prop_assert_eq!(q.in_flight(), 0);
        prop_assert_eq!((q.next_used(), q.used_wrap()), (q.next_avail(), q.avail_wrap()));
        prop_assert_eq!(q.counts().total(), 0);
    }
}

/// The bookkeeping of the round-trip test's driver: free ids and slots, lists made available
/// and not yet taken, used descriptors expected in order. The shared driver writes the lists
/// and finds the used descriptors.
struct Model {
    size: u16,
    free_ids: Vec<u16>,
    free_slots: u32,
    slots_of: Vec<u32>,
    avail: VecDeque<(u16, Vec<Desc>)>,
    used: VecDeque<(u16, u32)>,
}

impl Model {
    fn new(size: u16) -> Self {
        Self {
            size,
            free_ids: (0..size).rev().collect(),
            free_slots: u32::from(size),
            slots_of: vec![0; usize::from(size)],
            avail: VecDeque::new(),
            used: VecDeque::new(),
        }
    }

    fn add(&mut self, rig: &PackedDriver, k: usize, indirect: bool) {
        let slots = if indirect {
            1
        } else {
            u32::try_from(k).expect("small")
        };
        if slots > self.free_slots {
            return;
        }
        let Some(id) = self.free_ids.pop() else {
            return;
        };
        let bufs: Vec<Desc> = (0..k)
            .map(|i| {
                let j = u64::try_from(i).expect("small");
                Desc {
                    addr: DATA + 0x40 * (u64::from(id) * 16 + j),
                    len: 0x10 + u32::from(id),
                    writable: 2 * i >= k,
                }
            })
            .collect();
        if indirect {
            let table = TABLE + 0x100 * u64::from(id);
            let entries: Vec<_> = bufs
                .iter()
                .map(|b| (b.addr, b.len, if b.writable { WRITE } else { 0 }))
                .collect();
            rig.write_table(table, &entries);
            let len = 16 * u32::try_from(k).expect("small");
            rig.list_raw(&[(table, len, INDIRECT)], id);
        } else {
            let list: Vec<_> = bufs.iter().map(|b| (b.addr, b.len, b.writable)).collect();
            rig.list(&list, id);
        }
        self.free_slots -= slots;
        self.slots_of[usize::from(id)] = slots;
        self.avail.push_back((id, bufs));
    }

    /// Reads used descriptors as the spec's driver example does.
    fn reap(&mut self, rig: &PackedDriver) {
        while let Some((id, len, flags)) = rig.take_used_desc() {
            assert!(id < self.size);
            assert_eq!(self.used.pop_front(), Some((id, len)));
            assert_eq!(flags & WRITE != 0, len > 0);
            let slots = self.slots_of[usize::from(id)];
            assert!(slots > 0, "id {id} not in flight");
            self.slots_of[usize::from(id)] = 0;
            self.free_slots += slots;
            self.free_ids.push(id);
        }
        assert!(
            self.used.is_empty(),
            "no used descriptor where the driver looks, though {:?} were returned",
            self.used
        );
    }
}
