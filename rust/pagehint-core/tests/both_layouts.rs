//! What the split and the packed virtqueue readers must both do, one test body run over each
//! layout through the shared driver (`pagehint_core::test_utils`): every element rejection
//! reason (the table of bad elements), a drain bounded against a driver that keeps publishing
//! rejected elements, and the free page drain's stop at a cmd id.
//!
//! Layout-only behaviour lives in `split_queue.rs` and `packed_queue.rs`.

use std::collections::BTreeSet;

use pagehint_core::free_page::{ControlElement, DrainStop, drain_hints};
use pagehint_core::test_utils::rig::{DATA, HIGH_END, LOW_END, TABLE};
use pagehint_core::test_utils::{
    DescSpec, Driver, PackedDriver, SplitDriver, device_writable, rig,
};
use pagehint_core::virtq::{
    Chain, ElementError, PACKED_ONLY_REASONS, PackedQueue, SplitQueue, VIRTQ_DESC_F_AVAIL as AVAIL,
    VIRTQ_DESC_F_INDIRECT as INDIRECT, VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_USED as USED,
    VIRTQ_DESC_F_WRITE as WRITE, Virtqueue,
};
use pagehint_core::{DirtyBitmap, GuestRam, HintApplier, MemoryMap, RejectCounts};

/// The id (split: head) of the bad element of each case, and of the good one after it.
const BAD_ID: u16 = 3;
const GOOD_ID: u16 = 5;

/// One ring layout, as the tests here see it.
trait Layout: Driver + Sized {
    /// `RejectCounts` reasons this layout never counts for an element (queue breaks, the
    /// other layout's reasons).
    const NOT_ELEMENT_REASONS: &'static [&'static str];

    /// A queue of `size` in the standard test guest (`test_utils::rig`).
    fn rig(size: u16) -> Self;

    /// `pop_with_layout` of this layout's reader.
    fn pop_with_layout(
        q: &mut Self::Queue,
        ram: &GuestRam<'_>,
        layout: &MemoryMap,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>>;

    /// Checks, after the element at `BAD_ID` was rejected, that the device is past the whole
    /// element and holds nothing in flight.
    fn check_skipped(&self, q: &Self::Queue, case: &str);

    /// The next used element, `(id, len)`, with whatever else this layout checks on it.
    fn returned(&self) -> Option<(u32, u32)>;

    /// Bad elements only this layout has.
    fn own_cases() -> Vec<Case<Self>>;
}

impl Layout for SplitDriver {
    const NOT_ELEMENT_REASONS: &'static [&'static str] = &[
        "head_out_of_range",
        "indirect_in_chain",
        "buffer_id_out_of_range",
        "buffer_id_in_use",
        "chain_desc_not_available",
        "ring_overrun",
    ];

    fn rig(size: u16) -> Self {
        rig::split(size)
    }

    fn pop_with_layout(
        q: &mut SplitQueue,
        ram: &GuestRam<'_>,
        layout: &MemoryMap,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        q.pop_with_layout(ram, layout, chain)
    }

    fn check_skipped(&self, q: &SplitQueue, case: &str) {
        assert_eq!((q.last_avail(), q.next_used()), (1, 1), "{case}");
        assert_eq!(self.used_idx(), 1, "{case}: returned at once");
    }

    fn returned(&self) -> Option<(u32, u32)> {
        self.take_used()
    }

    fn own_cases() -> Vec<Case<Self>> {
        vec![
            Case {
                name: "next index past the table",
                build: Build::Raw(|r| {
                    r.desc(BAD_ID, DATA, 4, NEXT, 8);
                    r.push(BAD_ID);
                }),
                want: ElementError::NextOutOfRange { next: 8, limit: 8 },
                big_layout: false,
            },
            Case {
                name: "loop 3 -> 4 -> 3",
                build: Build::Raw(|r| {
                    r.desc(BAD_ID, DATA, 4, NEXT, 4);
                    r.desc(4, DATA, 4, NEXT, BAD_ID);
                    r.push(BAD_ID);
                }),
                want: ElementError::ChainTooLong { limit: 8 },
                big_layout: false,
            },
            Case {
                name: "self loop",
                build: Build::Raw(|r| {
                    r.desc(BAD_ID, DATA, 4, NEXT, BAD_ID);
                    r.push(BAD_ID);
                }),
                want: ElementError::ChainTooLong { limit: 8 },
                big_layout: false,
            },
            Case {
                name: "loop inside an indirect table",
                build: Build::Raw(|r| {
                    r.table_desc(TABLE, 0, DATA, 4, NEXT, 1);
                    r.table_desc(TABLE, 1, DATA, 4, NEXT, 0);
                    r.add(&[(TABLE, 32, INDIRECT)], BAD_ID);
                }),
                want: ElementError::ChainTooLong { limit: 2 },
                big_layout: false,
            },
            Case {
                name: "next past an indirect table",
                build: Build::Raw(|r| {
                    r.table_desc(TABLE, 0, DATA, 4, NEXT, 2);
                    r.add(&[(TABLE, 32, INDIRECT)], BAD_ID);
                }),
                want: ElementError::NextOutOfRange { next: 2, limit: 2 },
                big_layout: false,
            },
            Case {
                // A split chain may go on into an indirect table (§2.7.5.3.1 only forbids
                // INDIRECT with NEXT); the order rule still holds across both.
                name: "readable in an indirect table after a writable direct buffer",
                build: Build::Raw(|r| {
                    r.write_table(TABLE, &[(DATA + 64, 4, 0)]);
                    r.add(&[(DATA, 64, WRITE | NEXT), (TABLE, 16, INDIRECT)], BAD_ID);
                }),
                want: ElementError::ReadableAfterWritable,
                big_layout: false,
            },
        ]
    }
}

impl Layout for PackedDriver {
    const NOT_ELEMENT_REASONS: &'static [&'static str] = &[
        "head_out_of_range",
        "next_out_of_range",
        "buffer_id_out_of_range",
        "buffer_id_in_use",
        "chain_desc_not_available",
        "ring_overrun",
    ];

    fn rig(size: u16) -> Self {
        rig::packed(size)
    }

    fn pop_with_layout(
        q: &mut PackedQueue,
        ram: &GuestRam<'_>,
        layout: &MemoryMap,
        chain: &mut Chain,
    ) -> Option<Result<u16, ElementError>> {
        q.pop_with_layout(ram, layout, chain)
    }

    fn check_skipped(&self, q: &PackedQueue, case: &str) {
        // Returned in the first slot of the list, with the device's wrap counter 1.
        assert_eq!(
            self.slot(0),
            (BAD_ID, 0, AVAIL | USED),
            "{case}: id {BAD_ID}, len 0, used in lap 1"
        );
        // The whole list is skipped: the device reads and writes next where the driver
        // writes next.
        let (pos, wrap) = self.position();
        assert_eq!(
            (q.next_avail(), q.avail_wrap(), q.next_used(), q.used_wrap()),
            (pos, wrap, pos, wrap),
            "{case}: the whole list is skipped"
        );
        assert_eq!(q.in_flight(), 0, "{case}");
    }

    fn returned(&self) -> Option<(u32, u32)> {
        let (id, len, flags) = self.take_used_desc()?;
        assert_eq!(
            flags & WRITE != 0,
            len > 0,
            "WRITE marks a written used element"
        );
        Some((u32::from(id), len))
    }

    fn own_cases() -> Vec<Case<Self>> {
        vec![
            Case {
                name: "INDIRECT after a NEXT descriptor",
                build: Build::Raw(|r| {
                    r.entry(TABLE, 0, DATA, 4, 0);
                    r.list_raw(&[(DATA, 4, NEXT), (TABLE, 16, INDIRECT)], BAD_ID);
                }),
                want: ElementError::IndirectInChain,
                big_layout: false,
            },
            Case {
                name: "zero-length buffer first of a list of 3: the whole list is skipped",
                build: Build::Raw(|r| {
                    r.list_raw(
                        &[(DATA, 0, NEXT), (DATA, 4, NEXT), (DATA + 4, 4, WRITE)],
                        BAD_ID,
                    );
                }),
                want: ElementError::ZeroLengthBuffer { addr: DATA },
                big_layout: false,
            },
        ]
    }
}

/// How a bad element is written.
enum Build<D> {
    /// In both layouts' terms: indirect tables `(address, entries)`, then the element's
    /// descriptors made available with id `BAD_ID`.
    Chain {
        tables: &'static [(u64, &'static [DescSpec])],
        descs: &'static [DescSpec],
    },
    /// By hand, in one layout's terms; makes the element available with id `BAD_ID`.
    Raw(fn(&D)),
}

/// One hostile element in a queue of size 8 and the exact reason expected.
struct Case<D> {
    name: &'static str,
    build: Build<D>,
    want: ElementError,
    /// Check buffers against 8 GiB of RAM from 0 (they are only range-checked, never read),
    /// for buffers too big for the test guest.
    big_layout: bool,
}

/// A bad element described the same way for both layouts.
const fn chain<D>(
    name: &'static str,
    tables: &'static [(u64, &'static [DescSpec])],
    descs: &'static [DescSpec],
    want: ElementError,
) -> Case<D> {
    Case {
        name,
        build: Build::Chain { tables, descs },
        want,
        big_layout: false,
    }
}

fn shared_cases<D>() -> Vec<Case<D>> {
    vec![
        chain(
            "a list of every slot, NEXT on each (split: a loop back to the head)",
            &[],
            &[(DATA, 4, NEXT); 8],
            ElementError::ChainTooLong { limit: 8 },
        ),
        chain(
            "INDIRECT with NEXT",
            &[(TABLE, &[(DATA, 4, 0)])],
            &[(TABLE, 16, INDIRECT | NEXT), (DATA, 4, 0)],
            ElementError::IndirectWithNext,
        ),
        chain(
            "nested indirect",
            &[
                (TABLE, &[(TABLE + 0x100, 16, INDIRECT)]),
                (TABLE + 0x100, &[(DATA, 4, 0)]),
            ],
            &[(TABLE, 16, INDIRECT)],
            ElementError::NestedIndirect,
        ),
        chain(
            "indirect table of length 0",
            &[],
            &[(TABLE, 0, INDIRECT)],
            ElementError::IndirectEmpty,
        ),
        chain(
            "indirect table length not a multiple of 16",
            &[],
            &[(TABLE, 24, INDIRECT)],
            ElementError::IndirectLenNotMultiple { len: 24 },
        ),
        chain(
            "indirect table longer than the queue",
            &[],
            &[(TABLE, 16 * 9, INDIRECT)],
            ElementError::IndirectTooLarge {
                entries: 9,
                size: 8,
            },
        ),
        chain(
            "indirect table in the hole",
            &[],
            &[(LOW_END + 0x100, 32, INDIRECT)],
            ElementError::IndirectOutsideRam {
                addr: LOW_END + 0x100,
                len: 32,
            },
        ),
        chain(
            "indirect table crossing into the hole",
            &[],
            &[(LOW_END - 16, 32, INDIRECT)],
            ElementError::IndirectOutsideRam {
                addr: LOW_END - 16,
                len: 32,
            },
        ),
        chain(
            "zero-length buffer",
            &[],
            &[(DATA, 0, WRITE)],
            ElementError::ZeroLengthBuffer { addr: DATA },
        ),
        chain(
            "zero-length buffer inside an indirect table",
            &[(TABLE, &[(DATA, 0, 0)])],
            &[(TABLE, 16, INDIRECT)],
            ElementError::ZeroLengthBuffer { addr: DATA },
        ),
        chain(
            "buffer in the hole",
            &[],
            &[(LOW_END + 0x1000, 4096, WRITE)],
            ElementError::BufferOutsideRam {
                addr: LOW_END + 0x1000,
                len: 4096,
            },
        ),
        chain(
            "buffer crossing into the hole",
            &[],
            &[(LOW_END - 0x1000, 0x2000, WRITE)],
            ElementError::BufferOutsideRam {
                addr: LOW_END - 0x1000,
                len: 0x2000,
            },
        ),
        chain(
            "buffer past the end of RAM",
            &[],
            &[(HIGH_END - 4, 8, 0)],
            ElementError::BufferOutsideRam {
                addr: HIGH_END - 4,
                len: 8,
            },
        ),
        chain(
            "buffer wrapping past 2^64",
            &[],
            &[(u64::MAX - 10, 100, WRITE)],
            ElementError::BufferOutsideRam {
                addr: u64::MAX - 10,
                len: 100,
            },
        ),
        chain(
            "second buffer of a chain outside RAM",
            &[],
            &[(DATA, 4, NEXT), (HIGH_END, 4096, WRITE)],
            ElementError::BufferOutsideRam {
                addr: HIGH_END,
                len: 4096,
            },
        ),
        chain(
            "buffer inside an indirect table outside RAM",
            &[(TABLE, &[(DATA, 4, NEXT), (LOW_END, 4, WRITE)])],
            &[(TABLE, 32, INDIRECT)],
            ElementError::BufferOutsideRam {
                addr: LOW_END,
                len: 4,
            },
        ),
        Case {
            big_layout: true,
            ..chain(
                "total length over 2^32 - 1",
                &[],
                &[(0, 0xffff_f000, WRITE | NEXT), (0, 0x2000, WRITE)],
                ElementError::LengthOverflow {
                    total: 0xffff_f000 + 0x2000,
                },
            )
        },
        chain(
            "readable after writable",
            &[],
            &[(DATA, 64, WRITE | NEXT), (DATA + 64, 4, 0)],
            ElementError::ReadableAfterWritable,
        ),
        chain(
            "readable after writable inside an indirect table",
            &[(TABLE, &[(DATA, 64, WRITE | NEXT), (DATA + 64, 4, 0)])],
            &[(TABLE, 32, INDIRECT)],
            ElementError::ReadableAfterWritable,
        ),
    ]
}

/// Every bad element is rejected with its reason, returned at once with length 0, counted
/// once under that reason, and the queue goes on with the next element.
fn every_bad_element_is_rejected<L: Layout>() {
    let mut seen = BTreeSet::new();
    for case in shared_cases::<L>().into_iter().chain(L::own_cases()) {
        let name = case.name;
        let drv = L::rig(8);
        match case.build {
            Build::Chain { tables, descs } => {
                for &(table, entries) in tables {
                    drv.write_table(table, entries);
                }
                drv.add(descs, BAD_ID);
            }
            Build::Raw(build) => build(&drv),
        }
        let ram = drv.ram();
        let mut q = drv.queue(false).expect("queue");
        let layout = if case.big_layout {
            MemoryMap::new(&[(0, 8 << 30)], 4096).expect("map")
        } else {
            drv.mem().map().clone()
        };
        let mut chain = Chain::new();
        let got = L::pop_with_layout(&mut q, &ram, &layout, &mut chain);
        assert_eq!(got, Some(Err(case.want)), "{name}");
        assert_eq!(
            drv.returned(),
            Some((u32::from(BAD_ID), 0)),
            "{name}: returned at once, with len 0"
        );
        assert_eq!(drv.returned(), None, "{name}");
        drv.check_skipped(&q, name);
        let counts = q.counts();
        assert_eq!(counts.total(), 1, "{name}");
        let by_reason = counts.by_reason();
        let hit: Vec<_> = by_reason.iter().filter(|(_, n)| *n == 1).collect();
        assert_eq!(hit, [&(case.want.reason(), 1)], "{name}");
        assert!(!case.want.to_string().is_empty());
        seen.insert(case.want.reason());
        // Processing goes on with the next element.
        assert_eq!(L::pop_with_layout(&mut q, &ram, &layout, &mut chain), None);
        drv.add(&[(DATA + 0x800, 4096, WRITE)], GOOD_ID);
        let got = L::pop_with_layout(&mut q, &ram, &layout, &mut chain);
        assert_eq!(got, Some(Ok(GOOD_ID)), "{name}");
        assert_eq!(
            chain.descs(),
            [device_writable(DATA + 0x800, 4096)],
            "{name}"
        );
        assert_eq!(L::pop_with_layout(&mut q, &ram, &layout, &mut chain), None);
        q.add_used(&ram, GOOD_ID, 10).expect("in flight");
        assert_eq!(drv.returned(), Some((u32::from(GOOD_ID), 10)), "{name}");
        assert!(q.error().is_none(), "{name}");
    }
    // Every element reason of the layout has a case (the queue-breaking ones are tested in
    // each layout's own file).
    for (r, _) in RejectCounts::default().by_reason() {
        if !L::NOT_ELEMENT_REASONS.contains(&r) {
            assert!(seen.contains(r), "no case for {r}");
        }
    }
}

#[test]
fn split_every_bad_element_is_rejected_with_its_reason_returned_with_len_0_and_processing_goes_on()
{
    every_bad_element_is_rejected::<SplitDriver>();
}

#[test]
fn packed_every_bad_element_is_rejected_with_its_reason_returned_with_len_0_and_processing_goes_on()
{
    every_bad_element_is_rejected::<PackedDriver>();
}

#[test]
fn the_packed_only_reasons_are_counted_fields_and_not_split_element_reasons() {
    for r in PACKED_ONLY_REASONS {
        assert!(
            RejectCounts::default()
                .by_reason()
                .iter()
                .any(|(n, _)| *n == r)
        );
        assert!(SplitDriver::NOT_ELEMENT_REASONS.contains(&r));
    }
}

/// Found by the split_queue fuzz target: a driver (there, the device's own used-ring writes)
/// that keeps publishing elements that are all rejected could keep a drain going. A drain
/// takes at most the elements it was allowed, rejected ones included. Here every element is
/// rejected (zero-length buffers) and the driver publishes four more after each drain.
fn a_drain_of_rejected_elements_stops_at_its_limit<L: Layout>() {
    let drv = L::rig(4);
    let ram = drv.ram();
    let map = drv.mem().map();
    let mut q = drv.queue(false).expect("queue");
    let mut chain = Chain::new();
    let mut bitmap = DirtyBitmap::new(map.npages()).expect("bitmap");
    let mut applier = HintApplier::new(&mut bitmap, map).expect("fits");
    let mut taken = 0u32;
    for _ in 0..3 {
        for id in 0..4 {
            drv.add(&[(DATA, 0, 0)], id);
        }
        let (applied, stop) = drain_hints(&mut q, &ram, &mut chain, Some(&mut applier), 3);
        assert_eq!((applied, stop), (0, DrainStop::Limit));
        taken += 3;
        assert_eq!(u64::from(taken), q.counts().total());
        let (applied, stop) = drain_hints(&mut q, &ram, &mut chain, Some(&mut applier), 100);
        assert_eq!((applied, stop), (0, DrainStop::Empty));
        taken += 1;
        assert_eq!(u64::from(taken), q.counts().total());
    }
    assert_eq!(q.counts().zero_length_buffer, 12);
}

#[test]
fn split_a_drain_of_rejected_elements_stops_at_its_limit() {
    a_drain_of_rejected_elements_stops_at_its_limit::<SplitDriver>();
}

#[test]
fn packed_a_drain_of_rejected_elements_stops_at_its_limit() {
    a_drain_of_rejected_elements_stops_at_its_limit::<PackedDriver>();
}

/// Two hint elements of one page each, then a cmd id 0x8000_0001, with ids 0, 1, 2.
fn two_hints_and_a_cmd_id<L: Layout>(drv: &L) {
    drv.add(&[(DATA, 4096, WRITE)], 0);
    drv.add(&[(DATA + 4096, 4096, WRITE)], 1);
    drv.ram()
        .write(DATA + 0x2000, &0x8000_0001u32.to_le_bytes())
        .expect("ram");
    drv.add(&[(DATA + 0x2000, 4, 0)], 2);
}

/// Outside a START window the device returns hint elements without applying them, and still
/// stops at the next cmd id so the state machine sees it in order.
fn a_drain_without_an_applier_returns_hints_unapplied_and_stops_at_a_cmd_id<L: Layout>() {
    let drv = L::rig(8);
    two_hints_and_a_cmd_id(&drv);
    let ram = drv.ram();
    let mut q = drv.queue(false).expect("queue");
    let mut chain = Chain::new();
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
    assert_eq!(drv.returned(), Some((0, 0)));
    assert_eq!(drv.returned(), Some((1, 0)));
    assert_eq!(drv.returned(), None);
    // The same elements applied: the bitmap loses exactly the two hinted pages.
    let drv = L::rig(8);
    two_hints_and_a_cmd_id(&drv);
    let ram = drv.ram();
    let mut q = drv.queue(false).expect("queue");
    let map = drv.mem().map();
    let mut bitmap = DirtyBitmap::new(map.npages()).expect("bitmap");
    bitmap.set_all().expect("a small bitmap fits");
    let mut applier = HintApplier::new(&mut bitmap, map).expect("fits");
    let (returned, _) = drain_hints(&mut q, &ram, &mut chain, Some(&mut applier), 100);
    assert_eq!(returned, 2);
    assert_eq!(applier.finish().pages_cleared, 2);
}

#[test]
fn split_a_drain_without_an_applier_returns_hints_unapplied_and_stops_at_a_cmd_id() {
    a_drain_without_an_applier_returns_hints_unapplied_and_stops_at_a_cmd_id::<SplitDriver>();
}

#[test]
fn packed_a_drain_without_an_applier_returns_hints_unapplied_and_stops_at_a_cmd_id() {
    a_drain_without_an_applier_returns_hints_unapplied_and_stops_at_a_cmd_id::<PackedDriver>();
}
