//! `apply_hints` (and the streaming `HintApplier` behind it) against a naive oracle.
//!
//! The input becomes a memory map (1-4 regions of 4, 16 or 64 KiB pages, at most 2^20 pages in
//! all; refused maps are checked against a naive validity rule and then skipped), a dirty
//! bitmap of the map's size (sometimes larger, sometimes one page too small) with fuzzed
//! initial bits, and up to 700 `(gpa, len)` hints aimed around region edges, holes and 2^64.
//! After `apply_hints`:
//! - every hint is classified the same way (zero length, overflow, outside RAM, accepted) and
//!   `hints == accepted + rejected.total()`;
//! - the bitmap is exactly `before & !covered`, where `covered` holds the pages lying entirely
//!   inside some accepted hint (computed hint by hint, region by region, in u128). So no page
//!   that no accepted hint fully covers became clean, and every dirty covered page did;
//! - `pages_cleared` is the drop of the dirty count, `pages_hinted` the covered pages with
//!   multiplicity;
//! - applying the same hints again clears nothing;
//! - a bitmap smaller than the map is refused and left unchanged.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pagehint_core::{BitmapError, DirtyBitmap, HintApplier, HintRejects, MemoryMap, apply_hints};

const MAX_TOTAL_PAGES: u64 = 1 << 20;
const MAX_HINTS: usize = 700; // more than two of the decoder's 256-range batches
const TWO_64: u128 = 1 << 64;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

/// A region as the oracle sees it: guest-physical `[gpa, end)` and its first bitmap page.
#[derive(Debug, Clone, Copy)]
struct R {
    gpa: u128,
    end: u128,
    first_pfn: u64,
}

fn gen_regions(u: &mut Unstructured<'_>, page: u64) -> Result<Vec<(u64, u64)>> {
    let n = u.int_in_range(1..=4usize)?;
    let mut regions: Vec<(u64, u64)> = Vec::with_capacity(n);
    let mut budget = MAX_TOTAL_PAGES;
    for _ in 0..n {
        let pages: u64 = match u.int_in_range(0..=7u8)? {
            0 => 0, // refused: empty
            1..=4 => u64::from(u.int_in_range(1..=200u8)?),
            5 | 6 => u64::from(u.arbitrary::<u16>()?) + 1,
            _ => u.int_in_range(1..=MAX_TOTAL_PAGES)?,
        };
        let pages = pages.min(budget);
        budget -= pages;
        let mut size = pages * page;
        let prev = regions.last().copied();
        let mut gpa = match (u.int_in_range(0..=5u8)?, prev) {
            // Right after the previous region (touching), or right before it.
            (0, Some((g, s))) => g.wrapping_add(s),
            (1, Some((g, _))) => g.wrapping_sub(size),
            // A gap of a few pages after the previous one.
            (2, Some((g, s))) => g
                .wrapping_add(s)
                .wrapping_add(u64::from(u.int_in_range(1..=8u8)?) * page),
            // Near the top of the address space.
            (3, _) => (u64::MAX / page - u64::from(u.arbitrary::<u16>()?)) * page,
            // Anywhere (page aligned).
            (4, _) => u.arbitrary::<u64>()? / page * page,
            _ => u64::from(u.arbitrary::<u16>()?) * page,
        };
        // Rarely unaligned: refused.
        if u.ratio(1, 32)? {
            if u.arbitrary::<bool>()? {
                gpa = gpa.wrapping_add(u64::from(u.int_in_range(1..=255u8)?));
            } else {
                size = size.wrapping_add(u64::from(u.int_in_range(1..=255u8)?));
            }
        }
        regions.push((gpa, size));
    }
    Ok(regions)
}

/// Whether `MemoryMap::new` must accept these regions (page size already valid).
fn naive_valid(regions: &[(u64, u64)], page: u64) -> bool {
    let mut total: u128 = 0;
    for &(g, s) in regions {
        if s == 0 || g % page != 0 || s % page != 0 || u128::from(g) + u128::from(s) >= TWO_64 {
            return false;
        }
        total += u128::from(s);
    }
    for (i, &(a, sa)) in regions.iter().enumerate() {
        for &(b, sb) in &regions[i + 1..] {
            let (a, b) = (u128::from(a), u128::from(b));
            if a < b + u128::from(sb) && b < a + u128::from(sa) {
                return false;
            }
        }
    }
    total < TWO_64
}

/// Whether every byte of `[gpa, end)` (non-empty) is in some region.
fn naive_is_ram(rs: &[R], gpa: u128, end: u128) -> bool {
    let mut at = gpa;
    while at < end {
        match rs.iter().find(|r| r.gpa <= at && at < r.end) {
            Some(r) => at = r.end,
            None => return false,
        }
    }
    true
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn gen_words(u: &mut Unstructured<'_>, npages: u64) -> Result<Vec<u64>> {
    let nwords = usize::try_from(npages.div_ceil(64)).expect("small");
    let mut rng = XorShift(u.arbitrary::<u64>()? | 1);
    let mut words: Vec<u64> = match u.int_in_range(0..=5u8)? {
        0 => vec![u64::MAX; nwords],
        1 => vec![0; nwords],
        2 => (0..nwords).map(|_| rng.next()).collect(),
        3 => (0..nwords)
            .map(|_| rng.next() & rng.next() & rng.next())
            .collect(),
        4 => (0..nwords).map(|_| rng.next() | rng.next()).collect(),
        _ => {
            let pattern: Vec<u64> = (0..u.int_in_range(1..=8usize)?)
                .map(|_| u.arbitrary::<u64>())
                .collect::<Result<_>>()?;
            (0..nwords).map(|i| pattern[i % pattern.len()]).collect()
        }
    };
    if let Some(last) = words.last_mut()
        && !npages.is_multiple_of(64)
    {
        *last &= (1u64 << (npages % 64)) - 1;
    }
    Ok(words)
}

fn gen_hints(
    u: &mut Unstructured<'_>,
    regions: &[(u64, u64)],
    page: u64,
) -> Result<Vec<(u64, u64)>> {
    let n = u.int_in_range(0..=MAX_HINTS)?;
    let mut anchors: Vec<u64> = vec![0, u64::MAX];
    for &(g, s) in regions {
        anchors.push(g);
        anchors.push(g.wrapping_add(s));
    }
    let mut hints = Vec::with_capacity(n);
    for _ in 0..n {
        if u.is_empty() {
            break;
        }
        let gpa = match u.int_in_range(0..=3u8)? {
            0 => u.arbitrary::<u64>()?,
            1 => u
                .choose(&anchors)?
                .wrapping_add(i64::from(u.arbitrary::<i16>()?) as u64),
            _ => {
                let pages = i64::from(u.arbitrary::<i8>()?);
                let bytes = i64::from(u.arbitrary::<i8>()?);
                u.choose(&anchors)?
                    .wrapping_add((pages * page as i64 + bytes) as u64)
            }
        };
        let len = match u.int_in_range(0..=5u8)? {
            0 => u64::from(u.arbitrary::<u16>()?),
            1 => u.arbitrary::<u64>()?,
            // Up to 2^64 and just past it.
            2 => (u64::MAX - gpa).wrapping_add(u64::from(u.int_in_range(0..=2u8)?)),
            // To another anchor, give or take a few bytes.
            3 => u
                .choose(&anchors)?
                .wrapping_sub(gpa)
                .wrapping_add(i64::from(u.arbitrary::<i8>()?) as u64),
            _ => (u64::from(u.arbitrary::<u8>()?) * page)
                .wrapping_add(i64::from(u.arbitrary::<i8>()?) as u64),
        };
        hints.push((gpa, len));
    }
    Ok(hints)
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let page = *u.choose(&[4096u64, 16384, 65536])?;
    let regions = gen_regions(u, page)?;
    let map = MemoryMap::new(&regions, page);
    assert_eq!(
        map.is_ok(),
        naive_valid(&regions, page),
        "MemoryMap::new({regions:?}, {page}) = {map:?}"
    );
    let Ok(map) = map else { return Ok(()) };

    let mut rs = Vec::with_capacity(regions.len());
    let mut pfn = 0u64;
    for &(g, s) in &regions {
        rs.push(R {
            gpa: u128::from(g),
            end: u128::from(g) + u128::from(s),
            first_pfn: pfn,
        });
        pfn += s / page;
    }
    let map_pages = pfn;
    assert_eq!(map.npages(), map_pages);
    assert!(map_pages <= MAX_TOTAL_PAGES);

    let npages = match u.int_in_range(0..=15u8)? {
        0 => map_pages - 1, // too small: refused
        1 | 2 => map_pages + u64::from(u.int_in_range(1..=130u8)?),
        _ => map_pages,
    };
    let before = gen_words(u, npages)?;
    let hints = gen_hints(u, &regions, page)?;

    let mut bm = DirtyBitmap::new(npages).expect("small bitmap");
    bm.merge_log(&before, 0).expect("log fits the bitmap");
    assert_eq!(bm.words(), &before[..]);
    let dirty_before = bm.count_all();

    let got = apply_hints(&mut bm, &map, hints.iter().copied());
    if npages < map_pages {
        assert_eq!(
            got,
            Err(BitmapError::MapLargerThanBitmap { map_pages, npages })
        );
        assert_eq!(
            bm.words(),
            &before[..],
            "a refused apply changed the bitmap"
        );
        return Ok(());
    }
    let out = got.expect("bitmap holds the map");

    // The oracle: classify every hint, collect the pfn ranges it fully covers.
    let mut rejected = HintRejects::default();
    let mut accepted = 0u64;
    let mut hinted = 0u64;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &(gpa, len) in &hints {
        let (g, e) = (u128::from(gpa), u128::from(gpa) + u128::from(len));
        if len == 0 {
            rejected.zero_length += 1;
        } else if e > TWO_64 {
            rejected.overflow += 1;
        } else if e == TWO_64 || !naive_is_ram(&rs, g, e) {
            rejected.outside_ram += 1;
        } else {
            accepted += 1;
            let p = u128::from(page);
            for r in &rs {
                let (lo, hi) = (g.max(r.gpa), e.min(r.end));
                if lo >= hi {
                    continue;
                }
                let first = (lo - r.gpa).div_ceil(p);
                let last = (hi - r.gpa) / p;
                if last > first {
                    let a = r.first_pfn + u64::try_from(first).expect("small");
                    let b = r.first_pfn + u64::try_from(last).expect("small");
                    hinted += b - a;
                    ranges.push((a, b));
                }
            }
        }
        // Cross-check the map's own lookup on the hint's first byte.
        let naive_pfn = rs
            .iter()
            .find(|r| r.gpa <= g && g < r.end)
            .map(|r| r.first_pfn + u64::try_from((g - r.gpa) / u128::from(page)).expect("small"));
        assert_eq!(map.pfn_of(gpa), naive_pfn, "pfn_of({gpa:#x})");
    }
    assert_eq!(out.hints, hints.len() as u64);
    assert_eq!(out.rejected, rejected, "hints {hints:x?}");
    assert_eq!(out.hints, accepted + out.rejected.total());
    assert_eq!(out.pages_hinted, hinted, "pages_hinted");

    let mut covered = vec![0u64; before.len()];
    for &(a, b) in &ranges {
        for p in a..b {
            covered[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    let expected: Vec<u64> = before.iter().zip(&covered).map(|(b, c)| b & !c).collect();
    if bm.words() != &expected[..] {
        let pfn = bm
            .words()
            .iter()
            .zip(&expected)
            .enumerate()
            .find(|(_, (g, w))| g != w)
            .map(|(i, (g, w))| i as u64 * 64 + u64::from((g ^ w).trailing_zeros()))
            .expect("differs");
        let was_dirty = before[(pfn / 64) as usize] >> (pfn % 64) & 1 == 1;
        let is_dirty = bm.test(pfn).expect("in range");
        panic!(
            "page {pfn} (gpa {:x?}): dirty before {was_dirty}, after {is_dirty}, fully covered by an \
             accepted hint: {}; map {regions:x?} page {page}",
            map.gpa_of(pfn),
            covered[(pfn / 64) as usize] >> (pfn % 64) & 1 == 1,
        );
    }
    let dirty_after = bm.count_all();
    assert_eq!(
        out.pages_cleared,
        dirty_before - dirty_after,
        "pages_cleared"
    );

    // Idempotence, through the streaming applier: the same hints again clear nothing more.
    let mut applier = HintApplier::new(&mut bm, &map).expect("fits");
    for &(gpa, len) in &hints {
        applier.add(gpa, len);
    }
    let again = applier.finish();
    assert_eq!(again.pages_cleared, 0);
    assert_eq!(
        (again.hints, again.pages_hinted, again.rejected),
        (out.hints, out.pages_hinted, out.rejected)
    );
    assert_eq!(bm.words(), &expected[..]);
    Ok(())
}
