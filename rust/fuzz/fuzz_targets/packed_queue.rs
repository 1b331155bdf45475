//! `PackedQueue` (and the free page drain over it) on guest RAM filled with fuzz bytes.
//!
//! Guest RAM is 16 KiB in two 8 KiB regions with a hole between them, high region first in
//! buffer order: RAM `[0, 0x2000)` and `[0x4000, 0x6000)`, hole `[0x2000, 0x4000)`. A short
//! header picks the queue size, EVENT_IDX, where the descriptor ring and the two event areas
//! go, and the starting slot and wrap counter; the rest is the RAM contents from gpa 0.
//!
//! Checked:
//! - `PackedQueue::new` accepts only valid configurations (size 1..=32768, descriptor ring
//!   aligned to 16 and event areas to 4, all in RAM);
//! - `set_indices` accepts a slot exactly when it is below the size;
//! - popping ends (returns None) within the ring size, without the guest writing anything;
//! - every accepted element has a buffer id below the size and 1 or more buffers, each
//!   non-empty and entirely RAM (checked naively, in u128), readable ones before writable;
//! - each rejected element is counted once; every accepted id can be returned used;
//! - `drain_hints` over the same ring stops within its element budget and clears only pages
//!   that lie entirely inside RAM.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pagehint_core::free_page::drain_hints;
use pagehint_core::test_utils::TestRam;
use pagehint_core::virtq::{Chain, PackedQueue};
use pagehint_core::{DirtyBitmap, HintApplier};

const PAGE: u64 = 4096;
const RAM_REGIONS: [(u64, u64); 2] = [(0x4000, 0x2000), (0, 0x2000)];
const RAM_TOP: u64 = 0x6000;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

/// `[gpa, gpa + len)` is non-empty and entirely inside the union of the RAM regions.
fn in_ram(gpa: u64, len: u64) -> bool {
    let (mut at, end) = (u128::from(gpa), u128::from(gpa) + u128::from(len));
    if len == 0 {
        return false;
    }
    while at < end {
        match RAM_REGIONS
            .iter()
            .map(|&(g, s)| (u128::from(g), u128::from(g) + u128::from(s)))
            .find(|&(g, e)| g <= at && at < e)
        {
            Some((_, e)) => at = e,
            None => return false,
        }
    }
    true
}

fn place(u: &mut Unstructured<'_>, align: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => u.int_in_range(0..=0x1fffu64)? / align * align,
        1 => 0x4000 + u.int_in_range(0..=0x1fffu64)? / align * align,
        2 => u.arbitrary::<u64>()?,
        _ => u.int_in_range(0..=RAM_TOP)? / align * align,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let size = match u.int_in_range(0..=3u8)? {
        0 => u.int_in_range(0..=3u16)?,
        1 => u.int_in_range(1..=16u16)?,
        2 => u.int_in_range(17..=256u16)?,
        _ => u.arbitrary()?,
    };
    let event_idx: bool = u.arbitrary()?;
    let (desc, drv, dev) = (place(u, 16)?, place(u, 4)?, place(u, 4)?);
    let start: u16 = if u.ratio(1, 8)? { u.arbitrary()? } else { u.int_in_range(0..=size)? };
    let wrap: bool = u.arbitrary()?;

    let mem = TestRam::new(&RAM_REGIONS, PAGE).expect("valid map");
    let (map, ram) = (mem.map(), mem.ram());
    let contents = u.bytes(u.len().min(usize::try_from(RAM_TOP).expect("small")))?;
    for (gpa, chunk) in (0u64..).step_by(512).zip(contents.chunks(512)) {
        let _ = ram.write(gpa, chunk); // bytes over the hole are dropped
    }

    let q = PackedQueue::new(&ram, size, desc, drv, dev, event_idx);
    let n = u64::from(size);
    if q.is_ok() {
        assert!(size >= 1 && size <= 32768, "size {size}");
        assert!(desc % 16 == 0 && drv % 4 == 0 && dev % 4 == 0);
        assert!(in_ram(desc, 16 * n) && in_ram(drv, 4) && in_ram(dev, 4));
    }
    let Ok(mut q) = q else { return Ok(()) };
    assert_eq!(q.set_indices(start, wrap, start, wrap).is_ok(), start < size);
    if start >= size {
        return Ok(());
    }

    let mut chain = Chain::new();
    let mut held = Vec::new();
    let mut ended = false;
    for _ in 0..=size {
        let before = q.counts().total();
        match q.pop(&ram, &mut chain) {
            None => {
                ended = true;
                break;
            }
            Some(Err(_)) => assert_eq!(q.counts().total(), before + 1),
            Some(Ok(id)) => {
                assert!(id < size, "buffer id {id} >= size {size}");
                assert!(!chain.is_empty());
                let readable = chain.readable().len();
                for (i, d) in chain.descs().iter().enumerate() {
                    assert!(in_ram(d.addr, u64::from(d.len)), "{d:?} not RAM");
                    assert_eq!(d.writable, i >= readable);
                }
                held.push(id);
            }
        }
    }
    assert!(ended || q.is_broken(), "more than a ring's worth of elements without a refill");
    for id in held {
        if !q.is_broken() {
            q.add_used(&ram, id, 0).expect("an id just taken is in flight");
        }
    }

    // The free page path on a fresh queue over the same bytes: bounded, and only RAM cleared.
    let Ok(mut q2) = PackedQueue::new(&ram, size, desc, drv, dev, event_idx) else {
        return Ok(());
    };
    let _ = q2.set_indices(start, wrap, start, wrap);
    let mut bm = DirtyBitmap::new_dirty(map.npages()).expect("small bitmap");
    let budget = usize::from(u.int_in_range(0..=8u8)?);
    let (applied, _) = {
        let mut applier = HintApplier::new(&mut bm, map).expect("fits");
        drain_hints(&mut q2, &ram, &mut chain, Some(&mut applier), budget)
    };
    assert!(applied <= budget);
    assert!(bm.count_all() <= map.npages());
    Ok(())
}
