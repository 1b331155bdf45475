//! Every kernel at every level this CPU has, against a naive bit-by-bit oracle.
// Test oracles index small Vec<bool> models by page number; the sizes are tiny.
#![allow(clippy::cast_possible_truncation, clippy::cast_lossless)]

use pagehint_core::range_batch::{MAX_BLOCK_SHIFT, Path, clear_batch_by};
use pagehint_core::{Kernels, Level};
use proptest::collection::vec;
use proptest::prelude::*;

fn levels() -> Vec<Kernels> {
    Level::available()
        .into_iter()
        .map(|l| Kernels::for_level(l).expect("available levels load"))
        .collect()
}

fn bit(words: &[u64], p: u64) -> bool {
    words[(p / 64) as usize] >> (p % 64) & 1 == 1
}

fn clear_bit(words: &mut [u64], p: u64) {
    words[(p / 64) as usize] &= !(1 << (p % 64));
}

/// Words with a mix of empty, full and random values, so the chunk fast paths all run.
fn words_strategy(max_len: usize) -> impl Strategy<Value = Vec<u64>> {
    vec(
        prop_oneof![
            Just(0u64),
            Just(u64::MAX),
            any::<u64>(),
            (0u32..64).prop_map(|b| 1u64 << b)
        ],
        0..max_len,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn count_matches_oracle(words in words_strategy(300)) {
        let expect = (0..words.len() as u64 * 64).filter(|&p| bit(&words, p)).count() as u64;
        for k in levels() {
            prop_assert_eq!(k.count(&words), expect, "{:?}", k.level());
        }
    }

    #[test]
    fn clear_and_set_count_match_oracle(words in words_strategy(300)) {
        let ones = (0..words.len() as u64 * 64).filter(|&p| bit(&words, p)).count() as u64;
        let zeros = words.len() as u64 * 64 - ones;
        for k in levels() {
            let mut w = words.clone();
            prop_assert_eq!(k.clear_count(&mut w), ones, "{:?}", k.level());
            prop_assert!(w.iter().all(|&x| x == 0));
            let mut w = words.clone();
            prop_assert_eq!(k.set_count(&mut w), zeros, "{:?}", k.level());
            prop_assert!(w.iter().all(|&x| x == u64::MAX));
        }
    }

    #[test]
    fn merge_count_matches_oracle(dst in words_strategy(300), log in words_strategy(300)) {
        let n = dst.len().min(log.len());
        let mut expect = dst.clone();
        let mut new = 0u64;
        for p in 0..n as u64 * 64 {
            if bit(&log, p) && !bit(&expect, p) {
                new += 1;
                expect[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        for k in levels() {
            let mut d = dst.clone();
            prop_assert_eq!(k.merge_count(&mut d, &log), new, "{:?}", k.level());
            prop_assert_eq!(&d, &expect, "{:?}", k.level());
        }
    }

    #[test]
    fn find_matches_oracle(words in words_strategy(300)) {
        let nonzero = words.iter().position(|&w| w != 0);
        let not_full = words.iter().position(|&w| w != u64::MAX);
        for k in levels() {
            prop_assert_eq!(k.find_nonzero(&words), nonzero, "{:?}", k.level());
            prop_assert_eq!(k.find_not_full(&words), not_full, "{:?}", k.level());
        }
    }

    #[test]
    fn clear_ranges_matches_oracle_on_both_paths(
        words in words_strategy(200),
        ranges in vec((any::<u64>(), 0u64..400, any::<bool>()), 0..40),
        grain in 0u32..=4,
        all_whole in any::<bool>(),
    ) {
        let npages = words.len() as u64 * 64;
        // Clip random ranges into the words (the bitmap validates before calling the kernel);
        // some, or all, are whole blocks of `64 << grain` pages, the usual shape of hints.
        let block = 64u64 << grain;
        let (starts, counts): (Vec<u64>, Vec<u64>) = ranges
            .iter()
            .map(|&(s, n, whole)| {
                let s = if npages == 0 { 0 } else { s % npages };
                if whole || all_whole {
                    let s = s / block * block;
                    let n = (n * 11).div_ceil(block) * block;
                    (s, n.min((npages - s) / block * block))
                } else {
                    (s, n.min(npages - s))
                }
            })
            .unzip();
        let mut expect = words.clone();
        let mut cleared = 0u64;
        for (&s, &n) in starts.iter().zip(&counts) {
            for p in s..s + n {
                if bit(&expect, p) {
                    cleared += 1;
                    clear_bit(&mut expect, p);
                }
            }
        }
        for k in levels() {
            let mut w = words.clone();
            prop_assert_eq!(k.clear_ranges(&mut w, &starts, &counts), cleared, "{:?}", k.level());
            prop_assert_eq!(&w, &expect, "{:?}", k.level());
            // The sparse path, and the dense one with every block size.
            let paths = [(Path::Sparse, 0)]
                .into_iter()
                .chain((0..=MAX_BLOCK_SHIFT).map(|shift| (Path::Dense, shift)));
            for (path, shift) in paths {
                let mut w = words.clone();
                prop_assert_eq!(
                    clear_batch_by(path, shift, &k, &mut w, &starts, &counts),
                    cleared,
                    "{:?} {:?} {}",
                    k.level(),
                    path,
                    shift
                );
                prop_assert_eq!(&w, &expect, "{:?} {:?} {}", k.level(), path, shift);
            }
        }
    }

    #[test]
    fn ranges_bounds_matches_oracle(
        ranges in vec(
            (
                prop_oneof![0u64..2000, any::<u64>()],
                prop_oneof![Just(0u64), 0u64..500, any::<u64>()],
            ),
            0..70,
        ),
        npages in 0u64..3000,
    ) {
        let (starts, counts): (Vec<u64>, Vec<u64>) = ranges.iter().copied().unzip();
        let inside = ranges
            .iter()
            .all(|&(s, n)| s.checked_add(n).is_some_and(|e| e <= npages));
        let first = ranges.iter().map(|r| r.0).min().unwrap_or(u64::MAX);
        let end = ranges.iter().map(|r| r.0.wrapping_add(r.1)).max().unwrap_or(0);
        let align = ranges.iter().fold(0, |a, r| a | r.0 | r.1);
        for k in levels() {
            let got = k.ranges_bounds(&starts, &counts, npages);
            prop_assert_eq!(got.inside, inside, "{:?}", k.level());
            prop_assert_eq!((got.first, got.align), (first, align), "{:?}", k.level());
            // The end only means something for a batch inside the bitmap.
            if inside {
                prop_assert_eq!(got.end, end, "{:?}", k.level());
            }
        }
    }

    #[test]
    fn clear_marked_matches_oracle(
        words in words_strategy(600),
        first in any::<usize>(),
        marks in vec(any::<u64>(), 0..6),
        shift in 0u32..=MAX_BLOCK_SHIFT,
    ) {
        let first = if words.is_empty() { 0 } else { first % words.len() };
        let block = 1usize << shift;
        // Only blocks wholly inside `words` may be marked.
        let marks: Vec<u64> = marks
            .iter()
            .enumerate()
            .map(|(k, &m)| {
                (0..64)
                    .filter(|b| first + ((k * 64 + b + 1) << shift) <= words.len())
                    .fold(0, |acc, b| acc | (m & (1 << b)))
            })
            .collect();
        let mut expect = words.clone();
        let mut cleared = 0u64;
        for (k, &m) in marks.iter().enumerate() {
            for b in 0..64 {
                if m >> b & 1 == 1 {
                    let at = first + ((k * 64 + b) << shift);
                    for w in &mut expect[at..at + block] {
                        cleared += u64::from(w.count_ones());
                        *w = 0;
                    }
                }
            }
        }
        for k in levels() {
            let mut w = words.clone();
            prop_assert_eq!(
                k.clear_marked(&mut w, &marks, first, shift),
                cleared,
                "{:?}",
                k.level()
            );
            prop_assert_eq!(&w, &expect, "{:?}", k.level());
        }
    }

    #[test]
    fn take_matches_oracle(
        words in words_strategy(200),
        start in any::<u64>(),
        end_back in 0u64..300,
        max in 0usize..2000,
    ) {
        let npages = words.len() as u64 * 64;
        let start = if npages == 0 { 0 } else { start % npages };
        let end = npages.saturating_sub(end_back).max(start);
        check_take(&words, start, end, max).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn take_matches_oracle_at_any_density(
        density in prop_oneof![Just(0), 0u64..3300, 0u64..DENSITY_ONE, Just(DENSITY_ONE)],
        nwords in 0usize..400,
        seed in any::<u64>(),
        start in any::<u64>(),
        end_back in 0u64..200,
        max in prop_oneof![0usize..200, Just(usize::MAX)],
    ) {
        let words = bernoulli_words(nwords, density, seed);
        let npages = words.len() as u64 * 64;
        let start = if npages == 0 { 0 } else { start % npages };
        let end = npages.saturating_sub(end_back).max(start);
        check_take(&words, start, end, max).map_err(TestCaseError::fail)?;
    }
}

/// A density of 1 (every page dirty) in the 1/65536 steps `bernoulli_words` takes.
const DENSITY_ONE: u64 = 1 << 16;

/// Words whose bits are each set with probability `density / DENSITY_ONE` (xorshift,
/// reproducible by `seed`).
fn bernoulli_words(n: usize, density: u64, seed: u64) -> Vec<u64> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            (0..64).fold(0, |w, b| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                w | u64::from((s >> 48) < density) << b
            })
        })
        .collect()
}

/// Every level's `take` against taking page by page: the same pfns, the same words after, and a
/// resume point between the page after the last one taken and the next dirty page.
fn check_take(words: &[u64], start: u64, end: u64, max: usize) -> Result<(), String> {
    let mut expect = words.to_vec();
    let mut pfns = Vec::new();
    let mut resume = end;
    for p in start..end {
        if pfns.len() == max {
            resume = p;
            break;
        }
        if bit(&expect, p) {
            pfns.push(p);
            clear_bit(&mut expect, p);
        }
    }
    let next_dirty = (resume..end).find(|&p| bit(&expect, p)).unwrap_or(end);
    let at = format!("start {start}, end {end}, max {max}");
    for k in levels() {
        let mut w = words.to_vec();
        // Something already in `out`: take appends.
        let mut out = vec![7];
        let got_resume = k.take(&mut w, start, end, max, &mut out);
        if out[0] != 7 || out[1..] != pfns[..] {
            return Err(format!(
                "{:?} ({at}): pfns {:?}, want {pfns:?}",
                k.level(),
                &out[1..]
            ));
        }
        if w != expect {
            return Err(format!("{:?} ({at}): words after differ", k.level()));
        }
        let low = pfns.last().map_or(start, |p| p + 1);
        if got_resume < low || got_resume > next_dirty {
            return Err(format!(
                "{:?} ({at}): resume {got_resume} outside [{low}, {next_dirty}]",
                k.level()
            ));
        }
    }
    Ok(())
}

/// The sender's loop at the densities a migration sees, over blocks of every kind (empty,
/// sparse, dense, full) with batches that end inside words and a start inside a word.
#[test]
fn take_batches_at_every_density_match_oracle() {
    // 0, 0.1 %, 2 %, 10 %, 50 %, 100 %.
    for (i, density) in [0, 66, 1311, 6554, 32768, DENSITY_ONE]
        .into_iter()
        .enumerate()
    {
        let words = bernoulli_words(64 * 9 + 5, density, 99 + i as u64);
        let npages = words.len() as u64 * 64;
        for start in [0, 1, 63, 64, 64 * 64 + 37] {
            for end in [npages, npages - 1, npages - 100] {
                for batch in [1, 7, 65, 1000, 4096, usize::MAX] {
                    if let Err(e) = check_take(&words, start, end, batch) {
                        panic!("density {density}/65536: {e}");
                    }
                    // The loop itself: every batch from where the last one resumed.
                    for k in levels() {
                        let mut w = words.clone();
                        let (mut all, mut cursor) = (Vec::new(), start);
                        loop {
                            let mut out = Vec::new();
                            cursor = k.take(&mut w, cursor, end, batch, &mut out);
                            assert!(out.len() <= batch);
                            if out.is_empty() {
                                break;
                            }
                            all.extend(out);
                        }
                        let want: Vec<u64> = (start..end).filter(|&p| bit(&words, p)).collect();
                        assert_eq!(
                            all,
                            want,
                            "{:?} density {density}/65536 batch {batch}",
                            k.level()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_level_names_round_trip() {
    for l in [Level::Scalar, Level::Avx2, Level::Avx512, Level::Neon] {
        assert_eq!(Level::from_name(l.name()), Ok(l));
    }
    assert!(Level::from_name("sse9").is_err());
    assert!(Level::available().contains(&Level::Scalar));
}
