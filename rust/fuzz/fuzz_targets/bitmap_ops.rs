//! `DirtyBitmap` against a `Vec<bool>` model, as in `rust/pagehint-core/tests/bitmap.rs`.
//!
//! The input is a bitmap size (0 to 8192 pages, biased to word edges) and up to 64 operations
//! (set_range, clear_range, count, test, test_and_clear, clear_ranges, merge_log, take_dirty,
//! dirty_runs, next_dirty, set_all, clear_all, try_clone) with positions and lengths biased to
//! word boundaries, the end of the bitmap and overflow. After every operation:
//! - the result matches the model, and it is an `Err` exactly when the model says the
//!   arguments are invalid, with the error the documentation describes;
//! - an `Err` left the words exactly as they were;
//! - the words equal the model's (so the bits past `npages` stay zero) and `count_all` agrees.
//!
//! One more operation runs every kernel level this CPU has (`Kernels::for_level`: scalar,
//! AVX2, AVX-512) on a window of the current words and compares each with a naive version:
//! the process-wide level only exercises one of them.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pagehint_core::{BitmapError, DirtyBitmap, Kernels, Level};

const MAX_PAGES: u64 = 8192;
const MAX_OPS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64),
    Clear(u64, u64),
    Count(u64, u64),
    Test(u64),
    TestAndClear(u64),
    /// Ranges, and whether to drop the last count (a length mismatch).
    ClearRanges(Vec<(u64, u64)>, bool),
    Merge(Vec<u64>, u64),
    Take(usize, u64, usize),
    Runs(u64, u64),
    Next(u64),
    SetAll,
    ClearAll,
    Clone,
    Kernels(KernelCase),
}

#[derive(Debug, Clone)]
struct KernelCase {
    /// Word window `[lo, hi)` of the bitmap, and a pattern XORed into it.
    lo: usize,
    hi: usize,
    xor: u64,
    log: Vec<u64>,
    ranges: Vec<(u64, u64)>,
    take: (u64, u64, usize),
}

/// A page position: near a word edge, near the end, anywhere inside, or wild.
fn pos(u: &mut Unstructured<'_>, npages: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 | 1 => u.int_in_range(0..=npages + 2)?,
        2 | 3 => {
            let w = u.int_in_range(0..=npages / 64 + 1)?;
            (w * 64).wrapping_add(i64::from(u.int_in_range(-2..=2i8)?) as u64)
        }
        4 => npages.wrapping_add(i64::from(u.int_in_range(-3..=3i8)?) as u64),
        5 => u64::MAX - u64::from(u.int_in_range(0..=2u8)?),
        6 => u.arbitrary()?,
        _ => u64::from(u.int_in_range(0..=130u8)?),
    })
}

/// A length: tiny, about a word, up to the bitmap, to its end, or wild.
fn len(u: &mut Unstructured<'_>, npages: u64, start: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 | 1 => u64::from(u.int_in_range(0..=3u8)?),
        2 => u.int_in_range(60..=70u64)?,
        3 | 4 => u.int_in_range(0..=npages + 2)?,
        5 => npages
            .wrapping_sub(start)
            .wrapping_add(i64::from(u.int_in_range(-2..=2i8)?) as u64),
        6 => u64::MAX - u64::from(u.int_in_range(0..=2u8)?),
        _ => u.arbitrary()?,
    })
}

fn word(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 => 0,
        1 => u64::MAX,
        2 => 1 << u.int_in_range(0..=63u32)?,
        _ => u.arbitrary()?,
    })
}

fn gen_op(u: &mut Unstructured<'_>, npages: u64) -> Result<Op> {
    let nwords = npages.div_ceil(64);
    Ok(match u.int_in_range(0..=13u8)? {
        0 => {
            let s = pos(u, npages)?;
            Op::Set(s, len(u, npages, s)?)
        }
        1 => {
            let s = pos(u, npages)?;
            Op::Clear(s, len(u, npages, s)?)
        }
        2 => {
            let s = pos(u, npages)?;
            Op::Count(s, len(u, npages, s)?)
        }
        3 => Op::Test(pos(u, npages)?),
        4 => Op::TestAndClear(pos(u, npages)?),
        5 => {
            let n = u.int_in_range(0..=8usize)?;
            let mut rs = Vec::with_capacity(n);
            for _ in 0..n {
                let s = pos(u, npages)?;
                rs.push((s, len(u, npages, s)?));
            }
            Op::ClearRanges(rs, u.ratio(1, 16)?)
        }
        6 => {
            let n = u.int_in_range(0..=nwords + 3)?;
            let mut log = Vec::new();
            for _ in 0..n {
                log.push(if u.ratio(3, 4)? { word(u)? } else { 0 });
            }
            let off = if u.ratio(15, 16)? {
                u.int_in_range(0..=nwords + 2)? * 64
            } else {
                pos(u, npages)?
            };
            Op::Merge(log, off)
        }
        7 => {
            let max = match u.int_in_range(0..=3u8)? {
                0 => 0,
                1 => u.int_in_range(1..=70usize)?,
                2 => usize::MAX,
                _ => u.int_in_range(0..=MAX_PAGES as usize + 1)?,
            };
            // Pages already in `out`: take_dirty appends.
            Op::Take(max, pos(u, npages)?, u.int_in_range(0..=2usize)?)
        }
        8 => {
            let s = pos(u, npages)?;
            Op::Runs(s, len(u, npages, s)?)
        }
        9 => Op::Next(pos(u, npages)?),
        10 => Op::SetAll,
        11 => Op::ClearAll,
        12 => Op::Clone,
        _ => {
            let nw = usize::try_from(nwords).expect("small");
            let lo = u.int_in_range(0..=nw)?;
            let hi = u.int_in_range(lo..=nw)?;
            let xor = if u.arbitrary()? { 0 } else { word(u)? };
            let n = u.int_in_range(0..=(hi - lo) + 2)?;
            let mut log = Vec::with_capacity(n);
            for _ in 0..n {
                log.push(word(u)?);
            }
            let bits = (hi - lo) as u64 * 64;
            let mut ranges = Vec::new();
            for _ in 0..u.int_in_range(0..=6u8)? {
                let s = u.int_in_range(0..=bits)?;
                ranges.push((s, u.int_in_range(0..=bits - s)?));
            }
            let start = u.int_in_range(0..=bits)?;
            let end = u.int_in_range(start..=bits)?;
            let max = u.int_in_range(0..=(bits as usize) + 1)?;
            Op::Kernels(KernelCase {
                lo,
                hi,
                xor,
                log,
                ranges,
                take: (start, end, max),
            })
        }
    })
}

struct Model(Vec<bool>);

impl Model {
    fn npages(&self) -> u64 {
        self.0.len() as u64
    }
    fn in_range(&self, s: u64, n: u64) -> bool {
        s.checked_add(n).is_some_and(|e| e <= self.npages())
    }
    fn oor(&self, start: u64, n: u64) -> BitmapError {
        BitmapError::OutOfRange {
            start,
            n,
            npages: self.npages(),
        }
    }
    fn get(&self, p: u64) -> bool {
        self.0[p as usize]
    }
    fn count(&self, s: u64, n: u64) -> u64 {
        (s..s + n).filter(|&p| self.get(p)).count() as u64
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

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let npages = match u.int_in_range(0..=3u8)? {
        0 => *u.choose(&[0u64, 1, 63, 64, 65, 127, 128, 129, 511, 512, 513])?,
        1 => u.int_in_range(0..=MAX_PAGES)?,
        _ => u.int_in_range(0..=1100u64)?,
    };
    let nops = u.int_in_range(1..=MAX_OPS)?;
    let mut ops = Vec::with_capacity(nops);
    for _ in 0..nops {
        ops.push(gen_op(u, npages)?);
    }
    check(npages, &ops);
    Ok(())
}

fn check(npages: u64, ops: &[Op]) {
    let mut bm = DirtyBitmap::new(npages).expect("small bitmap");
    let mut m = Model(vec![false; npages as usize]);
    for op in ops {
        let before = bm.words().to_vec();
        let ok = match op.clone() {
            Op::Set(s, n) => {
                let got = bm.set_range(s, n);
                if m.in_range(s, n) {
                    let r = n - m.count(s, n);
                    (s..s + n).for_each(|p| m.0[p as usize] = true);
                    assert_eq!(got, Ok(r), "{op:?}");
                    true
                } else {
                    assert_eq!(got, Err(m.oor(s, n)), "{op:?}");
                    false
                }
            }
            Op::Clear(s, n) => {
                let got = bm.clear_range(s, n);
                if m.in_range(s, n) {
                    let r = m.count(s, n);
                    (s..s + n).for_each(|p| m.0[p as usize] = false);
                    assert_eq!(got, Ok(r), "{op:?}");
                    true
                } else {
                    assert_eq!(got, Err(m.oor(s, n)), "{op:?}");
                    false
                }
            }
            Op::Count(s, n) => {
                let got = bm.count(s, n);
                if m.in_range(s, n) {
                    assert_eq!(got, Ok(m.count(s, n)), "{op:?}");
                    true
                } else {
                    assert_eq!(got, Err(m.oor(s, n)), "{op:?}");
                    false
                }
            }
            Op::Test(p) => {
                let got = bm.test(p);
                if p < npages {
                    assert_eq!(got, Ok(m.get(p)), "{op:?}");
                    true
                } else {
                    assert_eq!(got, Err(m.oor(p, 1)), "{op:?}");
                    false
                }
            }
            Op::TestAndClear(p) => {
                let got = bm.test_and_clear(p);
                if p < npages {
                    assert_eq!(got, Ok(m.get(p)), "{op:?}");
                    m.0[p as usize] = false;
                    true
                } else {
                    assert_eq!(got, Err(m.oor(p, 1)), "{op:?}");
                    false
                }
            }
            Op::ClearRanges(rs, mismatch) => {
                let (s, mut n): (Vec<u64>, Vec<u64>) = rs.iter().copied().unzip();
                if mismatch {
                    n.pop();
                    if n.len() == s.len() {
                        n.push(0); // both were empty: make the counts the longer one
                    }
                }
                let got = bm.clear_ranges(&s, &n);
                if s.len() != n.len() {
                    let e = BitmapError::LengthMismatch {
                        left: s.len(),
                        right: n.len(),
                    };
                    assert_eq!(got, Err(e), "{op:?}");
                    false
                } else if let Some(&(bs, bn)) = rs.iter().find(|&&(s, n)| !m.in_range(s, n)) {
                    assert_eq!(got, Err(m.oor(bs, bn)), "{op:?}");
                    false
                } else {
                    let mut r = 0;
                    for &(s, n) in &rs {
                        for p in s..s + n {
                            r += u64::from(m.get(p));
                            m.0[p as usize] = false;
                        }
                    }
                    assert_eq!(got, Ok(r), "{op:?}");
                    true
                }
            }
            Op::Merge(log, off) => {
                let got = bm.merge_log(&log, off);
                let set_bits = || {
                    (0..log.len() as u64 * 64)
                        .filter(|&b| log[(b / 64) as usize] >> (b % 64) & 1 == 1)
                };
                let first_past = set_bits()
                    .map(|b| u128::from(off) + u128::from(b))
                    .find(|&p| p >= u128::from(npages));
                if off % 64 != 0 {
                    assert_eq!(
                        got,
                        Err(BitmapError::MisalignedOffset { page_offset: off }),
                        "{op:?}"
                    );
                    false
                } else if off > npages {
                    assert_eq!(got, Err(m.oor(off, 0)), "{op:?}");
                    false
                } else if let Some(pfn) = first_past {
                    let pfn = u64::try_from(pfn).expect("off <= npages, log is short");
                    assert_eq!(got, Err(BitmapError::LogPastEnd { pfn, npages }), "{op:?}");
                    false
                } else {
                    let mut r = 0;
                    for b in set_bits() {
                        let p = (off + b) as usize;
                        r += u64::from(!m.0[p]);
                        m.0[p] = true;
                    }
                    assert_eq!(got, Ok(r), "{op:?}");
                    true
                }
            }
            Op::Take(max, s, prefilled) => {
                let mut out: Vec<u64> = (0..prefilled as u64).map(|i| u64::MAX - i).collect();
                let prefix = out.clone();
                let got = bm.take_dirty(max, s, &mut out);
                if s <= npages {
                    let want: Vec<u64> = (s..npages).filter(|&p| m.get(p)).take(max).collect();
                    want.iter().for_each(|&p| m.0[p as usize] = false);
                    let resume = got.unwrap_or_else(|e| panic!("{op:?}: {e:?}"));
                    assert_eq!(&out[..prefix.len()], &prefix[..], "{op:?} overwrote out");
                    assert_eq!(&out[prefix.len()..], &want[..], "{op:?}");
                    // Resume point: past every page taken, within the bitmap, and nothing
                    // dirty skipped in [s, resume); the end when fewer than max were found.
                    assert!(resume >= s && resume <= npages, "{op:?}: resume {resume}");
                    if let Some(&last) = want.last() {
                        assert!(resume > last, "{op:?}: resume {resume} <= {last}");
                    }
                    assert_eq!(
                        m.count(s, resume - s),
                        0,
                        "{op:?}: skipped pages before {resume}"
                    );
                    if want.len() < max {
                        assert_eq!(resume, npages, "{op:?}");
                    }
                    true
                } else {
                    assert_eq!(got, Err(m.oor(s, 0)), "{op:?}");
                    assert_eq!(out, prefix, "{op:?}: a refused take changed out");
                    false
                }
            }
            Op::Runs(s, n) => {
                let (mut rs, mut rl) = (vec![7], vec![9]);
                let got = bm.dirty_runs(s, n, &mut rs, &mut rl);
                if m.in_range(s, n) {
                    assert_eq!(got, Ok(()), "{op:?}");
                    let (mut ws, mut wl) = (vec![7], vec![9]);
                    let mut p = s;
                    while p < s + n {
                        if m.get(p) {
                            let start = p;
                            while p < s + n && m.get(p) {
                                p += 1;
                            }
                            ws.push(start);
                            wl.push(p - start);
                        } else {
                            p += 1;
                        }
                    }
                    assert_eq!((rs, rl), (ws, wl), "{op:?}");
                    true
                } else {
                    assert_eq!(got, Err(m.oor(s, n)), "{op:?}");
                    assert_eq!((rs, rl), (vec![7], vec![9]), "{op:?}");
                    false
                }
            }
            Op::Next(s) => {
                let got = bm.next_dirty(s);
                if s <= npages {
                    assert_eq!(got, Ok((s..npages).find(|&p| m.get(p))), "{op:?}");
                    true
                } else {
                    assert_eq!(got, Err(m.oor(s, 0)), "{op:?}");
                    false
                }
            }
            Op::SetAll => {
                let newly = m.0.iter().filter(|&&b| !b).count() as u64;
                assert_eq!(bm.set_all(), Ok(newly));
                m.0.iter_mut().for_each(|b| *b = true);
                true
            }
            Op::ClearAll => {
                let was = m.0.iter().filter(|&&b| b).count() as u64;
                assert_eq!(bm.clear_all(), was);
                m.0.iter_mut().for_each(|b| *b = false);
                true
            }
            Op::Clone => {
                let c = bm.try_clone().expect("small clone");
                assert_eq!(c, bm);
                assert_eq!(c.npages(), npages);
                true
            }
            Op::Kernels(k) => {
                check_kernels(&bm.words()[k.lo..k.hi], &k);
                true
            }
        };
        if !ok {
            assert_eq!(
                bm.words(),
                &before[..],
                "a refused {op:?} changed the bitmap"
            );
        }
        assert_eq!(bm.words(), &m.words()[..], "after {op:?}");
        assert_eq!(bm.count_all(), m.0.iter().filter(|&&b| b).count() as u64);
        assert_eq!(bm.npages(), npages);
    }
}

fn bit(w: &[u64], p: u64) -> bool {
    w[(p / 64) as usize] >> (p % 64) & 1 == 1
}

fn clear_bit(w: &mut [u64], p: u64) {
    w[(p / 64) as usize] &= !(1 << (p % 64));
}

/// Every available kernel level against naive versions, on copies of a window of words.
fn check_kernels(window: &[u64], k: &KernelCase) {
    let words: Vec<u64> = window.iter().map(|w| w ^ k.xor).collect();
    let pop = |w: &[u64]| w.iter().map(|x| u64::from(x.count_ones())).sum::<u64>();
    for level in Level::available() {
        let kn = Kernels::for_level(level).expect("available");
        let ctx = format!("{level:?} on {words:x?}, case {k:?}");
        assert_eq!(kn.count(&words), pop(&words), "count: {ctx}");
        assert_eq!(
            kn.find_nonzero(&words),
            words.iter().position(|&w| w != 0),
            "find_nonzero: {ctx}"
        );
        assert_eq!(
            kn.find_not_full(&words),
            words.iter().position(|&w| w != u64::MAX),
            "find_not_full: {ctx}"
        );

        let mut c = words.clone();
        assert_eq!(kn.clear_count(&mut c), pop(&words), "clear_count: {ctx}");
        assert!(c.iter().all(|&w| w == 0), "clear_count: {ctx}");

        let mut c = words.clone();
        let zeros: u64 = words.iter().map(|x| u64::from(x.count_zeros())).sum();
        assert_eq!(kn.set_count(&mut c), zeros, "set_count: {ctx}");
        assert!(c.iter().all(|&w| w == u64::MAX), "set_count: {ctx}");

        let mut c = words.clone();
        let mut want = words.clone();
        let mut fresh = 0;
        for (w, l) in want.iter_mut().zip(&k.log) {
            fresh += u64::from((l & !*w).count_ones());
            *w |= l;
        }
        assert_eq!(kn.merge_count(&mut c, &k.log), fresh, "merge_count: {ctx}");
        assert_eq!(c, want, "merge_count: {ctx}");

        let mut c = words.clone();
        let mut want = words.clone();
        let mut cleared = 0;
        for &(s, n) in &k.ranges {
            for p in s..s + n {
                cleared += u64::from(bit(&want, p));
                clear_bit(&mut want, p);
            }
        }
        let (starts, counts): (Vec<u64>, Vec<u64>) = k.ranges.iter().copied().unzip();
        assert_eq!(
            kn.clear_ranges(&mut c, &starts, &counts),
            cleared,
            "clear_ranges: {ctx}"
        );
        assert_eq!(c, want, "clear_ranges: {ctx}");

        let (start, end, max) = k.take;
        let mut c = words.clone();
        let mut want = words.clone();
        let taken: Vec<u64> = (start..end).filter(|&p| bit(&words, p)).take(max).collect();
        taken.iter().for_each(|&p| clear_bit(&mut want, p));
        let mut out = Vec::new();
        let resume = kn.take(&mut c, start, end, max, &mut out);
        assert_eq!(out, taken, "take: {ctx}");
        assert_eq!(c, want, "take: {ctx}");
        assert!(
            resume >= start && resume <= end,
            "take resume {resume}: {ctx}"
        );
        if let Some(&last) = taken.last() {
            assert!(resume > last, "take resume {resume}: {ctx}");
        }
        assert!(
            (start..resume).all(|p| !bit(&c, p)),
            "take skipped a page: {ctx}"
        );
        if taken.len() < max {
            assert_eq!(resume, end, "take resume: {ctx}");
        }
    }
}
