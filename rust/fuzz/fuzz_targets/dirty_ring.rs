//! `harvest_dirty_ring` over a ring of raw fuzz bytes, as hostile as a ring can be.
//!
//! The input is a bitmap size (0 to 4096 pages) with fuzzed dirty bits, a slot table of up to
//! 6 slots (ids, first pages and page counts near the bitmap's end, sometimes past it or
//! repeated), a fetch index (often near 2^32) and a ring of 1 to 256 entries whose bytes are
//! raw fuzz input (any flags, any slot, any offset), sometimes cut to a length that is not a
//! power of two or a whole entry. Oracle, from a naive decode of a snapshot of the bytes:
//! - the ring and the table are refused exactly when their geometry or pages are bad, and then
//!   neither the ring bytes nor the bitmap change;
//! - otherwise exactly the entries from the fetch index up to the first one whose flags are not
//!   DIRTY-without-RESET (at most one lap) are collected: their flags become RESET and nothing
//!   else in the ring changes;
//! - each collected entry is applied or rejected as the naive rules say; the bitmap after is
//!   the bitmap before plus exactly the applied pages, `pages_dirtied` is the growth of the
//!   dirty count, and `fetch_index` is the old one plus `entries`, wrapping.
#![no_main]

use std::collections::BTreeSet;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pagehint_core::dirty_ring::{ENTRY_BYTES, KVM_DIRTY_GFN_F_RESET, RingError, harvest};
use pagehint_core::{DirtyBitmap, DirtyRing, SlotTable};

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let npages = u64::from(u.int_in_range(0..=4096u16)?);
    let mut bm = DirtyBitmap::new(npages).expect("small");
    for _ in 0..u.int_in_range(0..=16u8)? {
        let p = u.int_in_range(0..=npages)?;
        let _ = bm.set_range(p, u64::from(u.int_in_range(0..=80u8)?));
    }
    let mut table = Vec::new();
    for _ in 0..u.int_in_range(0..=6u8)? {
        let id = if u.ratio(1, 8)? {
            u.arbitrary::<u16>()?
        } else {
            u.int_in_range(0..=7u16)?
        };
        let first = if u.ratio(1, 16)? {
            u.arbitrary::<u64>()?
        } else {
            u.int_in_range(0..=npages)?
        };
        let room = npages.saturating_sub(first);
        let n = if u.ratio(1, 16)? {
            room + u64::from(u.int_in_range(1..=3u8)?)
        } else {
            u.int_in_range(0..=room)?
        };
        table.push((id, first, n));
    }
    let fetch = if u.arbitrary()? {
        u32::MAX - u32::from(u.arbitrary::<u8>()?)
    } else {
        u.arbitrary()?
    };
    let entries = 1usize << u.int_in_range(0..=8u8)?;
    let mut bytes = entries * ENTRY_BYTES;
    if u.ratio(1, 16)? {
        bytes = u.int_in_range(0..=bytes + 40)?;
    }
    // The ring's bytes, raw fuzz input, mostly with dirtied flags so walks get long; then the
    // same bytes in 8-byte aligned words (native endian, as the kernel writes them).
    let mut raw = vec![0u8; bytes.div_ceil(8) * 8];
    u.fill_buffer(&mut raw)?;
    for e in 0..bytes / ENTRY_BYTES {
        if u.ratio(3, 4)? {
            raw[e * ENTRY_BYTES..e * ENTRY_BYTES + 4].copy_from_slice(&1u32.to_ne_bytes());
        }
    }
    let mut words: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let before_ring = words.clone();
    let before_bm = bm.words().to_vec();
    let table_ok = SlotTable::new(&table);
    // SAFETY: `words` owns at least `bytes` initialized, 8-byte aligned bytes, the pointer comes
    // from `as_mut_ptr` (so the ring may write them), and nothing else touches `words` until
    // the harvest has returned.
    let ring = unsafe { DirtyRing::from_raw_parts(words.as_mut_ptr().cast::<u8>(), bytes) };

    let geometry_ok = bytes.is_multiple_of(ENTRY_BYTES) && (bytes / ENTRY_BYTES).is_power_of_two();
    assert_eq!(ring.is_ok(), geometry_ok, "{bytes} bytes");
    let ids: BTreeSet<u16> = table.iter().map(|&(id, _, _)| id).collect();
    assert_eq!(table_ok.is_ok(), ids.len() == table.len());
    let (Ok(ring), Ok(slots)) = (ring, table_ok) else {
        return Ok(());
    };
    let fits = table
        .iter()
        .all(|&(_, f, n)| f.checked_add(n).is_some_and(|e| e <= npages));
    let out = harvest(&mut bm, ring, fetch, &slots);
    if !fits {
        assert!(matches!(out, Err(RingError::SlotPastBitmap { .. })));
        assert_eq!(bm.words(), &before_bm[..]);
        assert_eq!(words, before_ring);
        return Ok(());
    }
    let out = out.expect("the table fits");
    // A cut length can still be a valid ring, of fewer entries.
    let entries = bytes / ENTRY_BYTES;
    assert_eq!(ring.len(), entries);

    // The naive walk over the snapshot.
    let field = |e: usize, at: usize, n: usize| -> u64 {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&raw[e * ENTRY_BYTES + at..e * ENTRY_BYTES + at + n]);
        if n == 8 {
            u64::from_ne_bytes(v)
        } else {
            u64::from(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
        }
    };
    let mask = u32::try_from(entries - 1).expect("small");
    let mut taken = Vec::new();
    let mut index = fetch;
    for _ in 0..entries {
        let e = (index & mask) as usize;
        if field(e, 0, 4) & 3 != 1 {
            break;
        }
        taken.push(e);
        index = index.wrapping_add(1);
    }
    assert_eq!(out.entries, taken.len() as u64);
    assert_eq!(out.fetch_index, index);
    let mut applied = BTreeSet::new();
    let mut rejected = 0;
    for &e in &taken {
        let (slot, offset) = (field(e, 4, 4), field(e, 8, 8));
        let hit = table.iter().find(|&&(id, _, _)| u64::from(id) == slot);
        match hit {
            Some(&(_, first, n)) if offset < n => {
                applied.insert(first + offset);
            }
            _ => rejected += 1,
        }
    }
    assert_eq!(out.rejected.total(), rejected);
    // The ring: collected entries are RESET, everything else untouched.
    let after: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let snap = &raw;
    for e in 0..entries {
        let (s, a) = (
            &snap[e * ENTRY_BYTES..(e + 1) * ENTRY_BYTES],
            &after[e * ENTRY_BYTES..(e + 1) * ENTRY_BYTES],
        );
        if taken.contains(&e) {
            assert_eq!(&a[..4], &KVM_DIRTY_GFN_F_RESET.to_ne_bytes());
            assert_eq!(&a[4..], &s[4..]);
        } else {
            assert_eq!(a, s, "entry {e} changed");
        }
    }
    // The bitmap: before | applied.
    let mut want = before_bm.clone();
    for &p in &applied {
        want[(p / 64) as usize] |= 1 << (p % 64);
    }
    assert_eq!(bm.words(), &want[..]);
    let before_count: u64 = before_bm.iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(out.pages_dirtied, bm.count_all() - before_count);
    Ok(())
}
