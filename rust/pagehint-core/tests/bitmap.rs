//! DirtyBitmap against a `Vec<bool>` model: every operation, random ranges around word
// Test oracles index small Vec<bool> models by page number; the sizes are tiny.
#![allow(clippy::cast_possible_truncation, clippy::cast_lossless)]
//! boundaries, and the rule that an error changes nothing.

use pagehint_core::{BitmapError, DirtyBitmap};
use proptest::collection::vec;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64),
    Clear(u64, u64),
    Count(u64, u64),
    TestAndClear(u64),
    ClearRanges(Vec<(u64, u64)>),
    SetRanges(Vec<(u64, u64)>),
    Merge(Vec<u64>, u64),
    Take(usize, u64),
    TakeRuns(u64, u64),
    Runs(u64, u64),
    Next(u64),
    SetAll,
    ClearAll,
}

fn op() -> impl Strategy<Value = Op> {
    let pos = 0u64..1200;
    let len = prop_oneof![0u64..3, 60u64..70, 0u64..1300];
    prop_oneof![
        (pos.clone(), len.clone()).prop_map(|(s, n)| Op::Set(s, n)),
        (pos.clone(), len.clone()).prop_map(|(s, n)| Op::Clear(s, n)),
        (pos.clone(), len.clone()).prop_map(|(s, n)| Op::Count(s, n)),
        pos.clone().prop_map(Op::TestAndClear),
        vec((pos.clone(), len.clone()), 0..8).prop_map(Op::ClearRanges),
        vec((pos.clone(), len.clone()), 0..8).prop_map(Op::SetRanges),
        (vec(any::<u64>(), 0..20), (0u64..20).prop_map(|w| w * 64))
            .prop_map(|(l, o)| Op::Merge(l, o)),
        (0usize..300, pos.clone()).prop_map(|(m, s)| Op::Take(m, s)),
        (0u64..300, pos.clone()).prop_map(|(m, s)| Op::TakeRuns(m, s)),
        (pos.clone(), len).prop_map(|(s, n)| Op::Runs(s, n)),
        pos.prop_map(Op::Next),
        Just(Op::SetAll),
        Just(Op::ClearAll),
    ]
}

struct Model(Vec<bool>);

impl Model {
    fn in_range(&self, s: u64, n: u64) -> bool {
        s.checked_add(n).is_some_and(|e| e <= self.0.len() as u64)
    }
    fn words(&self) -> Vec<u64> {
        let mut w = vec![0u64; self.0.len().div_ceil(64)];
        for (p, &b) in self.0.iter().enumerate() {
            if b {
                w[p / 64] |= 1 << (p % 64);
            }
        }
        w
    }
}

fn run(npages: u64, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut bm = DirtyBitmap::new(npages).expect("small bitmap");
    let mut m = Model(vec![false; npages as usize]);
    for op in ops {
        let before = bm.words().to_vec();
        let ok = match op.clone() {
            Op::Set(s, n) => {
                let got = bm.set_range(s, n);
                if m.in_range(s, n) {
                    let r = (s..s + n).filter(|&p| !m.0[p as usize]).count() as u64;
                    (s..s + n).for_each(|p| m.0[p as usize] = true);
                    prop_assert_eq!(got, Ok(r));
                }
                m.in_range(s, n)
            }
            Op::Clear(s, n) => {
                let got = bm.clear_range(s, n);
                if m.in_range(s, n) {
                    let r = (s..s + n).filter(|&p| m.0[p as usize]).count() as u64;
                    (s..s + n).for_each(|p| m.0[p as usize] = false);
                    prop_assert_eq!(got, Ok(r));
                }
                m.in_range(s, n)
            }
            Op::Count(s, n) => {
                let got = bm.count(s, n);
                if m.in_range(s, n) {
                    prop_assert_eq!(
                        got,
                        Ok((s..s + n).filter(|&p| m.0[p as usize]).count() as u64)
                    );
                }
                m.in_range(s, n)
            }
            Op::TestAndClear(p) => {
                let got = bm.test_and_clear(p);
                if p < npages {
                    prop_assert_eq!(got, Ok(m.0[p as usize]));
                    m.0[p as usize] = false;
                }
                p < npages
            }
            Op::ClearRanges(rs) => {
                let (s, n): (Vec<u64>, Vec<u64>) = rs.iter().copied().unzip();
                let got = bm.clear_ranges(&s, &n);
                let valid = rs.iter().all(|&(s, n)| m.in_range(s, n));
                if valid {
                    let mut r = 0;
                    for &(s, n) in &rs {
                        for p in s..s + n {
                            r += u64::from(m.0[p as usize]);
                            m.0[p as usize] = false;
                        }
                    }
                    prop_assert_eq!(got, Ok(r));
                }
                valid
            }
            Op::SetRanges(rs) => {
                let (s, n): (Vec<u64>, Vec<u64>) = rs.iter().copied().unzip();
                let got = bm.set_ranges(&s, &n);
                let valid = rs.iter().all(|&(s, n)| m.in_range(s, n));
                if valid {
                    let mut r = 0;
                    for &(s, n) in &rs {
                        for p in s..s + n {
                            r += u64::from(!m.0[p as usize]);
                            m.0[p as usize] = true;
                        }
                    }
                    prop_assert_eq!(got, Ok(r));
                }
                valid
            }
            Op::Merge(log, off) => {
                let got = bm.merge_log(&log, off);
                let past = (0..log.len() as u64 * 64)
                    .any(|b| log[(b / 64) as usize] >> (b % 64) & 1 == 1 && off + b >= npages);
                let valid = off <= npages && !past;
                if valid {
                    let mut r = 0;
                    for b in 0..log.len() as u64 * 64 {
                        if log[(b / 64) as usize] >> (b % 64) & 1 == 1 {
                            let p = (off + b) as usize;
                            r += u64::from(!m.0[p]);
                            m.0[p] = true;
                        }
                    }
                    prop_assert_eq!(got, Ok(r));
                }
                valid
            }
            Op::Take(max, s) => {
                let mut out = Vec::new();
                let got = bm.take_dirty(max, s, &mut out);
                if s <= npages {
                    let want: Vec<u64> =
                        (s..npages).filter(|&p| m.0[p as usize]).take(max).collect();
                    want.iter().for_each(|&p| m.0[p as usize] = false);
                    prop_assert!(got.is_ok());
                    prop_assert_eq!(out, want);
                }
                s <= npages
            }
            Op::TakeRuns(max, s) => {
                let (mut rs, mut rl) = (Vec::new(), Vec::new());
                let got = bm.take_dirty_runs(max, s, &mut rs, &mut rl);
                if s <= npages {
                    // The pages take_dirty would take, grouped into runs of consecutive pages.
                    let want: Vec<u64> = (s..npages)
                        .filter(|&p| m.0[p as usize])
                        .take(max as usize)
                        .collect();
                    want.iter().for_each(|&p| m.0[p as usize] = false);
                    let (mut ws, mut wl): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
                    for &p in &want {
                        match (ws.last(), wl.last_mut()) {
                            (Some(&start), Some(len)) if start + *len == p => *len += 1,
                            _ => {
                                ws.push(p);
                                wl.push(1);
                            }
                        }
                    }
                    prop_assert_eq!(got, Ok(want.len() as u64));
                    prop_assert_eq!((rs, rl), (ws, wl));
                }
                s <= npages
            }
            Op::Runs(s, n) => {
                let (mut rs, mut rl) = (Vec::new(), Vec::new());
                let got = bm.dirty_runs(s, n, &mut rs, &mut rl);
                if m.in_range(s, n) {
                    prop_assert!(got.is_ok());
                    let (mut ws, mut wl) = (Vec::new(), Vec::new());
                    let mut p = s;
                    while p < s + n {
                        if m.0[p as usize] {
                            let start = p;
                            while p < s + n && m.0[p as usize] {
                                p += 1;
                            }
                            ws.push(start);
                            wl.push(p - start);
                        } else {
                            p += 1;
                        }
                    }
                    prop_assert_eq!((rs, rl), (ws, wl));
                }
                m.in_range(s, n)
            }
            Op::Next(s) => {
                let got = bm.next_dirty(s);
                if s <= npages {
                    prop_assert_eq!(got, Ok((s..npages).find(|&p| m.0[p as usize])));
                }
                s <= npages
            }
            Op::SetAll => {
                let newly = m.0.iter().filter(|&&b| !b).count() as u64;
                prop_assert_eq!(bm.set_all(), Ok(newly));
                m.0.iter_mut().for_each(|b| *b = true);
                true
            }
            Op::ClearAll => {
                bm.clear_all();
                m.0.iter_mut().for_each(|b| *b = false);
                true
            }
        };
        if !ok {
            prop_assert_eq!(
                bm.words(),
                &before[..],
                "a refused {:?} changed the bitmap",
                op
            );
        }
        prop_assert_eq!(bm.words(), &m.words()[..], "after {:?}", op);
        prop_assert_eq!(bm.count_all(), m.0.iter().filter(|&&b| b).count() as u64);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn bitmap_matches_model(
        npages in prop_oneof![Just(0u64), Just(1), Just(63), Just(64), Just(65), 0u64..1100],
        ops in vec(op(), 1..40),
    ) {
        run(npages, &ops)?;
    }
}

#[test]
fn errors_name_the_problem() {
    let mut bm = DirtyBitmap::new(100).expect("alloc");
    assert!(matches!(
        bm.set_range(u64::MAX, 2),
        Err(BitmapError::OutOfRange { .. })
    ));
    assert!(matches!(
        bm.merge_log(&[1], 3),
        Err(BitmapError::MisalignedOffset { .. })
    ));
    assert_eq!(
        bm.merge_log(&[0, 1 << 40], 0),
        Err(BitmapError::LogPastEnd {
            pfn: 104,
            npages: 100
        })
    );
    assert!(matches!(
        bm.clear_ranges(&[1], &[]),
        Err(BitmapError::LengthMismatch { .. })
    ));
    assert!(matches!(
        DirtyBitmap::new(1 << 60),
        Err(BitmapError::TooLarge { .. })
    ));
}

#[test]
fn huge_bitmap_is_lazy_and_usable() {
    // 2^36 pages is an 8 GiB allocation: only possible because nothing touches it.
    let Ok(mut bm) = DirtyBitmap::new(1 << 36) else {
        return; // A machine without overcommit refuses; the error path is what matters then.
    };
    let last = (1u64 << 36) - 1;
    assert_eq!(bm.set_range(last - 99, 100), Ok(100));
    assert_eq!(bm.next_dirty(1 << 30), Ok(Some(last - 99)));
    assert_eq!(bm.count(last - 199, 200), Ok(100));
}

/// Pages of the smallest power-of-two bitmap whose words exceed the machine's memory, or
/// `None` where that is unknown or the kernel charges every reservation (strict overcommit).
fn bigger_than_memory() -> Option<u64> {
    let memory = pagehint_core::words::machine_memory()?;
    let mode = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").ok()?;
    if mode.trim() == "2" {
        return None;
    }
    let mut npages = 1u64 << 20;
    while npages / 8 <= memory {
        npages <<= 1;
    }
    Some(npages)
}

#[test]
fn bitmap_larger_than_memory_is_reserved_and_refuses_writing_it_all() {
    let Some(npages) = bigger_than_memory() else {
        return;
    };
    let mut bm = DirtyBitmap::new(npages).expect("reserving is not committing");
    let last = npages - 1;
    assert_eq!(bm.set_range(0, 3), Ok(3));
    assert_eq!(bm.set_range(npages / 2 - 10, 20), Ok(20));
    assert_eq!(bm.set_range(last - 99, 100), Ok(100));
    assert_eq!(bm.count(npages / 2 - 64, 128), Ok(20));
    assert_eq!(bm.next_dirty(3), Ok(Some(npages / 2 - 10)));
    assert_eq!(bm.clear_range(npages / 8, npages / 4), Ok(0));

    let memory = pagehint_core::words::machine_memory().expect("known above");
    let all = BitmapError::ExceedsMemory {
        pages: npages,
        bytes: npages / 8,
        memory,
    };
    assert_eq!(bm.set_all(), Err(all.clone()));
    assert_eq!(bm.set_range(0, npages), Err(all));
    assert!(matches!(
        bm.set_ranges(&[0, 5], &[1, npages - 5]),
        Err(BitmapError::ExceedsMemory { pages, .. }) if pages == npages - 5
    ));
    assert_eq!(
        bm.count(0, npages),
        Ok(123),
        "a refused call changes nothing"
    );
    assert_eq!(
        DirtyBitmap::new_dirty(npages),
        Err(BitmapError::ExceedsMemory {
            pages: npages,
            bytes: npages / 8,
            memory,
        })
    );
    let text = DirtyBitmap::new_dirty(npages)
        .expect_err("too large")
        .to_string();
    assert!(text.contains(&format!("{memory} bytes")), "{text}");
}

#[test]
fn words_are_aligned_and_copies_equal() {
    use pagehint_core::words::Words;
    // Below, at and above the size from which Linux maps the words instead of allocating.
    for len in [
        1usize,
        100,
        (2 << 20) / 8 - 1,
        (2 << 20) / 8,
        (8 << 20) / 8 + 3,
    ] {
        let mut w = Words::zeroed(len).expect("small");
        assert_eq!(w.len(), len);
        assert!(w.iter().all(|&x| x == 0));
        assert_eq!(w.as_ptr().align_offset(8), 0);
        if len >= (2 << 20) / 8 && cfg!(target_os = "linux") {
            assert_eq!(
                w.as_ptr().align_offset(4096),
                0,
                "a mapping is page aligned"
            );
        }
        w[0] = 1;
        w[len - 1] |= 1 << 63;
        let copy = w.try_clone().expect("small");
        assert_eq!(copy, w);
    }
}

proptest! {
    #[test]
    fn sparse_image_round_trips(
        npages in prop_oneof![0u64..200, 32_700u64..32_900, 100_000u64..140_000],
        ranges in vec((0u64..1_000_000, 0u64..3000), 0..12),
    ) {
        let mut bm = DirtyBitmap::new(npages).expect("small");
        for (at, n) in ranges {
            let start = at * npages / 1_000_000;
            let _ = bm.set_range(start, n.min(npages - start));
        }
        let image = bm.sparse_image();
        let nonzero = bm.words().chunks(512).filter(|c| c.iter().any(|&w| w != 0)).count();
        prop_assert_eq!(image.chunks.len(), 8 * nonzero);
        let mut copy = DirtyBitmap::new(npages).expect("small");
        copy.set_range(npages / 2, npages / 3).expect("inside");
        copy.load_sparse_image(&image.chunks, &image.words).expect("its own image");
        prop_assert_eq!(&copy, &bm);
    }
}

#[test]
fn a_bad_sparse_image_changes_nothing() {
    let npages = 512 * 64 * 2 + 100; // three chunks, the last of two words with a 36-bit tail
    let mut src = DirtyBitmap::new(npages).expect("small");
    src.set_range(5, 10).expect("inside");
    src.set_range(npages - 1, 1).expect("inside");
    let good = src.sparse_image();
    assert_eq!(good.chunks.len(), 16);
    assert_eq!(good.words.len(), 8 * (512 + 2));
    let le = |v: &[u64]| v.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
    let mut past_tail = good.words.clone();
    let n = past_tail.len();
    past_tail[n - 1] |= 0x80;
    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (good.chunks[..7].to_vec(), good.words.clone(), "whole u64s"),
        (
            good.chunks.clone(),
            good.words[..good.words.len() - 4].to_vec(),
            "whole u64s",
        ),
        (le(&[2, 0]), good.words.clone(), "is not after"),
        (le(&[0, 0]), good.words.clone(), "is not after"),
        (
            le(&[0, 3]),
            good.words.clone(),
            "past the bitmap's 3 chunks",
        ),
        (
            le(&[0, 1]),
            good.words.clone(),
            "words for chunks that hold 1024",
        ),
        (
            good.chunks.clone(),
            good.words[..good.words.len() - 8].to_vec(),
            "hold 514",
        ),
        (good.chunks.clone(), past_tail, "bits past"),
    ];
    let mut bm = DirtyBitmap::new(npages).expect("small");
    bm.set_range(1000, 3).expect("inside");
    for (chunks, words, why) in cases {
        match bm.load_sparse_image(&chunks, &words) {
            Err(BitmapError::BadImage { reason }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{why}: {other:?}"),
        }
        assert_eq!(
            bm.count(0, npages),
            Ok(3),
            "{why}: a refused image changes nothing"
        );
    }
    bm.load_sparse_image(&good.chunks, &good.words)
        .expect("good");
    assert_eq!(bm, src);
    // An empty image clears.
    bm.load_sparse_image(&[], &[]).expect("empty");
    assert_eq!(bm.count_all(), 0);
}

/// `clear_ranges` on batches either side of the density rule (few ranges: sparse; many in a
/// small span: dense), with overlapping, unaligned and whole-word ranges in no order, against a
/// page-by-page model.
#[test]
fn clear_ranges_agrees_with_a_model_on_both_sides_of_the_density_rule() {
    use pagehint_core::range_batch::{Path, span_words};
    let npages = 64 * 1000;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    // The last batch is all whole 1024-page blocks, as free page hints are: marked a block
    // per bit without any direct clear.
    for (nranges, path, kinds) in [
        (10, Path::Sparse, 3),
        (400, Path::Dense, 3),
        (400, Path::Dense, 1),
    ] {
        let mut bm = DirtyBitmap::new(npages).expect("bitmap");
        let (mut starts, mut counts) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let s = next(npages);
            bm.set_range(s, next(200).min(npages - s))
                .expect("in range");
        }
        for i in 0..nranges {
            let (s, n) = match i % kinds {
                0 if kinds == 1 => (next(npages / 1024) * 1024, 1024), // a 4 MiB hint
                0 => (next(npages), next(300)),                        // unaligned
                1 => (next(npages / 64) * 64, 64 * 16),                // 16 words
                _ => (next(npages / 2), next(npages / 8)),             // long, overlapping others
            };
            let n = n.min(npages - s);
            starts.push(s);
            counts.push(n);
        }
        let span = span_words(&starts, &counts);
        assert_eq!(
            Path::for_batch(nranges, span.len()),
            path,
            "{nranges} ranges"
        );
        let mut model: Vec<bool> = (0..npages).map(|p| bm.test(p) == Ok(true)).collect();
        let mut expect = 0;
        for (&s, &n) in starts.iter().zip(&counts) {
            for p in s..s + n {
                expect += u64::from(std::mem::take(&mut model[p as usize]));
            }
        }
        assert_eq!(bm.clear_ranges(&starts, &counts), Ok(expect), "{path:?}");
        for (p, &dirty) in model.iter().enumerate() {
            assert_eq!(bm.test(p as u64), Ok(dirty), "page {p} after {path:?}");
        }
    }
}
