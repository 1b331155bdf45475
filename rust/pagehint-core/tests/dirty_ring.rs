//! The dirty-ring harvester against a naive model (entries in a `Vec`, dirty pages in a
//! `BTreeSet`), across index wrap-around and hostile entries, and with a producer thread
//! publishing entries while the ring is harvested.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use pagehint_core::dirty_ring::{KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, harvest};
use pagehint_core::{DirtyBitmap, DirtyGfn, DirtyRing, RingRejects, SlotTable};
use proptest::collection::vec;
use proptest::prelude::*;

const NPAGES: u64 = 700;

/// The model's view of a harvest: what it must set, count and collect.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    entries: u64,
    pages_dirtied: u64,
    rejected: RingRejects,
    fetch_index: u32,
}

/// The model: a slot table as a list, the pages as a set.
fn model_harvest(
    pushed: &[(u32, u64)],
    table: &[(u16, u64, u64)],
    dirty: &mut BTreeSet<u64>,
    fetch_index: u32,
) -> Expected {
    let mut e = Expected {
        fetch_index,
        ..Expected::default()
    };
    for &(slot, offset) in pushed {
        e.entries += 1;
        e.fetch_index = e.fetch_index.wrapping_add(1);
        if slot >> 16 != 0 {
            e.rejected.address_space += 1;
            continue;
        }
        match table.iter().find(|&&(id, _, _)| u32::from(id) == slot) {
            None => e.rejected.unknown_slot += 1,
            Some(&(_, _, n)) if offset >= n => e.rejected.offset_past_slot += 1,
            Some(&(_, first, _)) => {
                if dirty.insert(first + offset) {
                    e.pages_dirtied += 1;
                }
            }
        }
    }
    e
}

/// Slot tables with distinct ids whose pages fit `NPAGES` (they may overlap: aliases).
fn table() -> impl Strategy<Value = Vec<(u16, u64, u64)>> {
    vec((0u16..12, 0u64..NPAGES, 0u64..300), 0..5).prop_map(|slots| {
        let mut seen = BTreeSet::new();
        slots
            .into_iter()
            .filter(|&(id, _, _)| seen.insert(id))
            .map(|(id, first, n)| (id, first, n.min(NPAGES - first)))
            .collect()
    })
}

/// An entry's `(slot, offset)`: mostly plausible, sometimes hostile.
fn entry() -> impl Strategy<Value = (u32, u64)> {
    prop_oneof![
        6 => (0u32..14, 0u64..320),
        1 => (1u32..4, 0u64..10).prop_map(|(a, o)| (a << 16, o)),
        1 => (any::<u32>(), any::<u64>()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn harvest_matches_the_model(
        log2 in 0u32..6,
        start in prop_oneof![any::<u32>(), (u32::MAX - 70)..=u32::MAX],
        table in table(),
        seed_pages in vec(0u64..NPAGES, 0..40),
        rounds in vec((vec(entry(), 0..40), any::<bool>()), 1..8),
    ) {
        let size = 1usize << log2;
        let size32 = 1u32 << log2;
        let entries: Vec<DirtyGfn> = (0..size).map(|_| DirtyGfn::new()).collect();
        let ring = DirtyRing::new(&entries).expect("power of two");
        let slots = SlotTable::new(&table).expect("distinct ids");
        let mut bm = DirtyBitmap::new(NPAGES).expect("bitmap");
        let mut dirty = BTreeSet::new();
        for &p in &seed_pages {
            bm.set_range(p, 1).expect("in range");
            dirty.insert(p);
        }
        // The producer's free-running index, and the kernel's reset index.
        let (mut produced, mut reset) = (start, start);
        let mut fetch = start;
        for (batch, reset_first) in rounds {
            if reset_first {
                // KVM_RESET_DIRTY_RINGS: every collected entry becomes free again.
                while reset != fetch {
                    prop_assert!(ring.at(reset).reset_if_collected().is_some());
                    reset = reset.wrapping_add(1);
                }
            }
            let free = size - produced.wrapping_sub(reset) as usize;
            let pushed = &batch[..batch.len().min(free)];
            for &(slot, offset) in pushed {
                ring.at(produced).publish(slot, offset);
                produced = produced.wrapping_add(1);
            }
            let want = model_harvest(pushed, &table, &mut dirty, fetch);
            let got = harvest(&mut bm, ring, fetch, &slots).expect("slots fit");
            prop_assert_eq!(
                (got.entries, got.pages_dirtied, got.rejected, got.fetch_index),
                (want.entries, want.pages_dirtied, want.rejected, want.fetch_index)
            );
            // The walk stopped at the producer. From the reset index up to it every entry is
            // collected; the rest of the ring is free.
            prop_assert_eq!(got.fetch_index, produced);
            let collected = produced.wrapping_sub(reset);
            for k in 0..size32 {
                let flags = ring.at(reset.wrapping_add(k)).flags();
                let want = if k < collected { KVM_DIRTY_GFN_F_RESET } else { 0 };
                prop_assert_eq!(flags, want);
            }
            fetch = got.fetch_index;
            let pages: BTreeSet<u64> = (0..NPAGES).filter(|&p| bm.test(p) == Ok(true)).collect();
            prop_assert_eq!(&pages, &dirty);
        }
    }
}

#[test]
fn a_concurrent_producer_loses_nothing() {
    // Every page of the bitmap is published exactly once, through a small ring the producer
    // must wait on (as a vCPU exits on a full ring), so any lost or misread entry shows as a
    // missing page or a short count.
    const SIZE: usize = 64;
    const PAGES: u64 = 200_000;
    let entries: Vec<DirtyGfn> = (0..SIZE).map(|_| DirtyGfn::new()).collect();
    let ring = DirtyRing::new(&entries).expect("power of two");
    // Two slots, so both `slot` and `offset` must be read consistently with the flags.
    let half = PAGES / 2;
    let slots = SlotTable::new(&[(1, 0, half), (2, half, PAGES - half)]).expect("table");
    let mut bm = DirtyBitmap::new(PAGES).expect("bitmap");
    let done = AtomicBool::new(false);
    let (mut harvested, mut dirtied, mut fetch, mut rounds) = (0u64, 0u64, u32::MAX - 1000, 0u64);
    thread::scope(|s| {
        let producer = s.spawn(|| {
            let mut index = u32::MAX - 1000;
            // Spread the pages so consecutive entries hit different words and slots.
            for k in 0..PAGES {
                let page = (k * 7919) % PAGES;
                let (slot, offset) = if page < half {
                    (1, page)
                } else {
                    (2, page - half)
                };
                let e = ring.at(index);
                // Wait for the entry to be free: the kernel only reuses an entry it has reset,
                // and resets only what the collector marked RESET (seen with acquire).
                while e.flags() != 0 && e.reset_if_collected().is_none() {
                    std::hint::spin_loop();
                    thread::yield_now();
                }
                e.publish(slot, offset);
                index = index.wrapping_add(1);
            }
            done.store(true, Ordering::Release);
        });
        loop {
            let finished = done.load(Ordering::Acquire);
            let out = harvest(&mut bm, ring, fetch, &slots).expect("slots fit");
            assert_eq!(out.rejected.total(), 0);
            harvested += out.entries;
            dirtied += out.pages_dirtied;
            fetch = out.fetch_index;
            rounds += 1;
            if finished && out.entries == 0 {
                break;
            }
            if out.entries == 0 {
                thread::yield_now();
            }
        }
        producer.join().expect("producer");
    });
    assert_eq!(harvested, PAGES);
    assert_eq!(dirtied, PAGES);
    assert_eq!(bm.count_all(), PAGES);
    assert_eq!(
        fetch,
        (u32::MAX - 1000).wrapping_add(u32::try_from(PAGES).expect("small"))
    );
    assert!(rounds > 1);
    for e in &entries {
        assert_ne!(e.flags() & KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_DIRTY);
    }
}
