//! The bulk loops, written once. Each level instantiates them inside a function compiled with
//! its target features (see `mod.rs`), so LLVM vectorizes the same source for AVX-512
//! (VPOPCNTQ), AVX2, NEON or the baseline. Inputs are validated by the caller; nothing here can
//! index out of bounds except through a caller bug, which panics rather than corrupts.
//!
//! Loops work in chunks of one cache line (8 words) and skip the store when a chunk would not
//! change: clearing or merging into a lazily allocated bitmap must not fault in pages that stay
//! zero, and clean cache lines are not written back.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::RangesBounds;
use crate::span::{Span, WORD_BITS, span, word_of};

/// Words per block of the modifying loops: 512 bytes, small enough to stay in L1 between the
/// counting pass and the store pass, large enough that the horizontal sum is rare.
const BLOCK: usize = 64;

/// Words per chunk of the search loops: one cache line.
const CHUNK: usize = 8;

// The loops below are kept flat (one iterator chain per pass) because that is the form LLVM's
// loop vectorizer turns into VPOPCNTQ / PSHUFB-popcount with vector accumulators.

#[inline(always)]
fn popcount(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[inline(always)]
fn zeros(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_zeros())).sum()
}

#[inline(always)]
fn or_reduce(words: &[u64]) -> u64 {
    words.iter().fold(0, |acc, w| acc | w)
}

#[inline(always)]
fn and_reduce(words: &[u64]) -> u64 {
    words.iter().fold(u64::MAX, |acc, w| acc & w)
}

/// Pages set in `words`.
#[inline(always)]
pub fn count(words: &[u64]) -> u64 {
    popcount(words)
}

/// Clears `words`, returning how many pages were set.
#[inline(always)]
pub fn clear_count(words: &mut [u64]) -> u64 {
    let mut cleared = 0;
    for block in words.chunks_mut(BLOCK) {
        let n = popcount(block);
        if n != 0 {
            cleared += n;
            block.fill(0);
        }
    }
    cleared
}

/// Sets `words`, returning how many pages were newly set.
#[inline(always)]
pub fn set_count(words: &mut [u64]) -> u64 {
    let mut set = 0;
    for block in words.chunks_mut(BLOCK) {
        let n = zeros(block);
        if n != 0 {
            set += n;
            block.fill(u64::MAX);
        }
    }
    set
}

/// ORs `log` into `dst` over their common length, returning how many pages were newly set.
/// A block of the log with no bit set is skipped without a store: if it has any bit, either
/// `dst` has it already (so that memory was written before) or it is new and must be written,
/// so the fused count-and-OR pass never faults in an untouched page needlessly.
#[inline(always)]
pub fn merge_count(dst: &mut [u64], log: &[u64]) -> u64 {
    let mut new = 0;
    for (d, l) in dst.chunks_mut(BLOCK).zip(log.chunks(BLOCK)) {
        if or_reduce(l) != 0 {
            new += d
                .iter_mut()
                .zip(l)
                .map(|(d, l)| {
                    let fresh = l & !*d;
                    *d |= l;
                    u64::from(fresh.count_ones())
                })
                .sum::<u64>();
        }
    }
    new
}

/// Index of the first non-zero word.
#[inline(always)]
pub fn find_nonzero(words: &[u64]) -> Option<usize> {
    let chunks = words.chunks_exact(CHUNK);
    let rest_at = words.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        if or_reduce(chunk) != 0 {
            return chunk.iter().position(|&w| w != 0).map(|i| c * CHUNK + i);
        }
    }
    words[rest_at..]
        .iter()
        .position(|&w| w != 0)
        .map(|i| rest_at + i)
}

/// Index of the first word that is not all ones.
#[inline(always)]
pub fn find_not_full(words: &[u64]) -> Option<usize> {
    let chunks = words.chunks_exact(CHUNK);
    let rest_at = words.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        if and_reduce(chunk) != u64::MAX {
            return chunk
                .iter()
                .position(|&w| w != u64::MAX)
                .map(|i| c * CHUNK + i);
        }
    }
    words[rest_at..]
        .iter()
        .position(|&w| w != u64::MAX)
        .map(|i| rest_at + i)
}

/// Clears pages `[start, end)` (`start <= end <= 64 * words.len()`), returning how many were set.
#[inline(always)]
pub fn clear_range(words: &mut [u64], start: u64, end: u64) -> u64 {
    let s = span(start, end);
    clear_edges(words, &s) + clear_count(&mut words[s.body])
}

/// Clears the partly covered head and tail words of `s`, returning how many of their pages
/// were set. A word with nothing to clear is not written.
#[inline(always)]
pub fn clear_edges(words: &mut [u64], s: &Span) -> u64 {
    let mut cleared = 0;
    for (w, mask) in s.head.into_iter().chain(s.tail) {
        let was = words[w] & mask;
        if was != 0 {
            cleared += u64::from(was.count_ones());
            words[w] &= !mask;
        }
    }
    cleared
}

/// What a batch of ranges spans (see [`RangesBounds`]). Plain reductions, so that it
/// vectorizes: checking a batch of hints costs a fraction of clearing it.
#[inline(always)]
pub fn ranges_bounds(starts: &[u64], counts: &[u64], npages: u64) -> RangesBounds {
    let (mut first, mut last_start, mut longest, mut end) = (u64::MAX, 0u64, 0u64, 0u64);
    let mut align = 0;
    for (&s, &n) in starts.iter().zip(counts) {
        first = first.min(s);
        last_start = last_start.max(s);
        longest = longest.max(n);
        end = end.max(s.wrapping_add(n));
        align |= s | n;
    }
    // Starts and lengths both at most `npages` (< 2^63) cannot wrap when added, so then `end`
    // is the true highest end.
    RangesBounds {
        inside: last_start <= npages && longest <= npages && end <= npages,
        first,
        end,
        align,
    }
}

/// How far ahead `clear_ranges` looks to start fetching a hint's cache lines. Measured on
/// Zen 4 (B1 benchmark): no prefetch 18 ms, 8-24 ranges ahead 6.5-7.5 ms, 32 or more ahead
/// 14 ms (more prefetches in flight than the core tracks, so they are dropped).
const PREFETCH_AHEAD: usize = 12;

/// Clears every range `[starts[i], starts[i] + counts[i])`, all validated by the caller, and
/// returns how many pages were set. Hints arrive in no useful order, so the line of a range
/// `PREFETCH_AHEAD` further on is requested while this one is cleared: the loop is bound by
/// memory latency, not by arithmetic.
#[inline(always)]
pub fn clear_ranges(words: &mut [u64], starts: &[u64], counts: &[u64]) -> u64 {
    let mut cleared = 0;
    for (i, (&start, &n)) in starts.iter().zip(counts).enumerate() {
        if let (Some(&ahead), Some(&len)) = (
            starts.get(i + PREFETCH_AHEAD),
            counts.get(i + PREFETCH_AHEAD),
        ) {
            // Both ends: a 4 MiB hint spans two cache lines of bitmap.
            prefetch_write(words, word_of(ahead));
            prefetch_write(words, word_of(ahead.saturating_add(len.saturating_sub(1))));
        }
        cleared += clear_range(words, start, start + n);
    }
    cleared
}

/// Clears the blocks of `1 << shift` words that `marks` marks, in address order, returning how
/// many pages were set: bit `b` of `marks[k]` stands for the block at word
/// `first_word + ((64 * k + b) << shift)`. Every marked block is inside `words` (the caller
/// marked only blocks of validated ranges). One pass over the marks and the marked words in
/// ascending order, which the hardware prefetcher streams, whatever order the ranges came in.
#[inline(always)]
pub fn clear_marked(words: &mut [u64], marks: &[u64], first_word: usize, shift: u32) -> u64 {
    let mut cleared = 0;
    for (k, &mark) in marks.iter().enumerate() {
        if mark == 0 {
            continue;
        }
        let base = first_word + (k << (6 + shift));
        if mark == u64::MAX {
            cleared += clear_count(&mut words[base..base + (64 << shift)]);
            continue;
        }
        // Each run of marked blocks at once.
        let mut rest = mark;
        while rest != 0 {
            let lo = rest.trailing_zeros();
            let len = (!(rest >> lo)).trailing_zeros();
            let at = base + ((lo as usize) << shift);
            cleared += clear_count(&mut words[at..at + ((len as usize) << shift)]);
            rest &= !crate::span::bits_mask(u64::from(lo), u64::from(lo + len));
        }
    }
    cleared
}

/// Sets the mark bits of blocks `[lo, hi)`, counted from block 0, in `marks`, whose bit 0 is
/// block `blocks.start`; `[lo, hi)` must lie inside `blocks` (else a panic: a caller bug).
#[inline(always)]
pub fn mark_block_range(marks: &mut [u64], blocks: Range<u64>, lo: u64, hi: u64) {
    if lo >= hi {
        return;
    }
    assert!(
        blocks.start <= lo && hi <= blocks.end,
        "blocks outside the marked range"
    );
    let (lo, hi) = (bit_index(lo - blocks.start), bit_index(hi - blocks.start));
    if hi - lo == 1 {
        marks[lo / 64] |= 1 << (lo % 64);
        return;
    }
    let (first, last) = (lo / 64, (hi - 1) / 64);
    let head = u64::MAX << (lo % 64);
    let tail = u64::MAX >> (63 - (hi - 1) % 64);
    if first == last {
        marks[first] |= head & tail;
    } else {
        marks[first] |= head;
        if last > first + 1 {
            marks[first + 1..last].fill(u64::MAX);
        }
        marks[last] |= tail;
    }
}

/// Marks, for every range `[starts[i], starts[i] + counts[i])` (each starting and ending on a
/// block of `1 << page_shift` pages, inside `blocks`), its blocks in `marks` (see
/// [`mark_block_range`]).
#[inline(always)]
pub fn mark_blocks(
    marks: &mut [u64],
    starts: &[u64],
    counts: &[u64],
    blocks: Range<u64>,
    page_shift: u32,
) {
    for (&s, &n) in starts.iter().zip(counts) {
        mark_block_range(
            marks,
            blocks.clone(),
            s >> page_shift,
            (s + n) >> page_shift,
        );
    }
}

/// A mark bit's index as a `usize`: marks cover at most the bitmap's words, which fit.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
const fn bit_index(bit: u64) -> usize {
    bit as usize
}

/// Prefetches the first and last bitmap line of pages `[pfn, pfn + pages)`.
#[inline(always)]
pub fn prefetch_range(words: &[u64], pfn: u64, pages: u64) {
    prefetch_write(words, word_of(pfn));
    prefetch_write(words, word_of(pfn.saturating_add(pages.saturating_sub(1))));
}

#[inline(always)]
fn prefetch_write(words: &[u64], index: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(w) = words.get(index) {
        // SAFETY: `_mm_prefetch` needs SSE, part of the x86_64 baseline; a prefetch is only a
        // hint and never faults, and the address is that of a live word anyway.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                std::ptr::from_ref(w).cast::<i8>(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (words, index);
}

/// Words per block of `take`: a block's pages are counted first, and a block that fits in what
/// may still be taken is decoded without a check per page (32 KiB of output at most). 32-word
/// blocks measured slower; more than 64 would not fit the sparse path's mask of words.
const TAKE_BLOCK: usize = 64;
const _: () = assert!(
    TAKE_BLOCK <= 64,
    "take_block's mask of non-zero words is a u64"
);

/// Output slots `take` may write past the pages it keeps (one word's worth), so that its word
/// decoders store whole vectors; it reserves them in `out`, beyond its length.
pub const TAKE_SPARE: usize = 64;

/// Turns one word's set bits into pfns.
///
/// # Safety
/// `take` marks the slots as initialised on the strength of `decode`'s count: an implementation
/// must write every slot it counts, as documented on `decode`.
pub unsafe trait DecodeWord: Copy {
    /// Writes `base + b` for every set bit `b` of `w`, ascending, to `dst[..w.count_ones()]` and
    /// returns `w.count_ones()`. `dst` holds at least [`TAKE_SPARE`] slots, all of which may be
    /// written. `DENSE` says the block averages [`DENSE_WORD`] pages a word or more, so a
    /// decoder may do more work up front to branch less.
    fn decode<const DENSE: bool>(self, w: u64, base: u64, dst: &mut [MaybeUninit<u64>]) -> usize;
}

/// Pages per word from which a block counts as dense for [`DecodeWord::decode`].
pub const DENSE_WORD: usize = 4;

/// The portable decoder: the first 4 pages of a word (8 in a dense block) without a
/// data-dependent branch, then a bit at a time.
#[derive(Debug, Clone, Copy)]
pub struct ScalarDecode;

// SAFETY: `decode` writes the first 4 or 8 slots, then one more for each set bit left, so
// `dst[..w.count_ones()]` at least, and returns `w.count_ones()`.
unsafe impl DecodeWord for ScalarDecode {
    #[inline(always)]
    fn decode<const DENSE: bool>(self, w: u64, base: u64, dst: &mut [MaybeUninit<u64>]) -> usize {
        let mut bits = w;
        let (first, rest) = dst.split_at_mut(if DENSE { 8 } else { 4 });
        for slot in first {
            // Past the last set bit this writes `base + 64`, a slot the caller does not keep.
            slot.write(base + u64::from(bits.trailing_zeros()));
            bits &= bits.wrapping_sub(1);
        }
        let mut i = 0;
        while bits != 0 {
            rest[i].write(base + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
            i += 1;
        }
        w.count_ones() as usize
    }
}

/// Test-and-clears up to `max` set pages in `[start, end)`, ascending, appending their pfns to
/// `out`. Returns the page after the last one taken (or `end`), where the next call resumes.
#[inline(always)]
pub fn take(words: &mut [u64], start: u64, end: u64, max: usize, out: &mut Vec<u64>) -> u64 {
    take_with(words, start, end, max, out, ScalarDecode)
}

/// [`take`], with `decode` turning whole words into pfns.
///
/// Partial words at both ends and the block where `max` runs out go a page at a time; every
/// other block is counted, then decoded whole into `out`'s spare capacity by `decode`, sparse
/// blocks (fewer pages than words) visiting only their non-zero words.
#[inline(always)]
pub fn take_with<D: DecodeWord>(
    words: &mut [u64],
    start: u64,
    end: u64,
    max: usize,
    out: &mut Vec<u64>,
    decode: D,
) -> u64 {
    if max == 0 || start >= end {
        return start.min(end);
    }
    let s = span(start, end);
    let mut left = max;
    if let Some((w, mask)) = s.head {
        left -= take_limited(&mut words[w], mask, word_base(w), left, out);
        if left == 0 {
            return resume_after(out, start);
        }
    }
    let body_base = word_base(s.body.start);
    for (b, block) in words[s.body].chunks_mut(TAKE_BLOCK).enumerate() {
        let base = body_base + (b * TAKE_BLOCK) as u64 * WORD_BITS;
        let n: usize = block.iter().map(|w| w.count_ones() as usize).sum();
        if n == 0 {
            continue;
        }
        if n <= left {
            take_block(block, base, n, out, decode);
            left -= n;
        } else {
            for (i, word) in block.iter_mut().enumerate() {
                left -= take_limited(word, u64::MAX, base + i as u64 * WORD_BITS, left, out);
                if left == 0 {
                    break;
                }
            }
        }
        if left == 0 {
            return resume_after(out, start);
        }
    }
    if let Some((w, mask)) = s.tail {
        left -= take_limited(&mut words[w], mask, word_base(w), left, out);
        if left == 0 {
            return resume_after(out, start);
        }
    }
    end
}

/// First page of word `w`.
#[inline(always)]
fn word_base(w: usize) -> u64 {
    w as u64 * WORD_BITS
}

/// Where a `take` that stopped at its `max` resumes: after the last page it took (it took at
/// least one, since `max > 0`).
#[inline(always)]
fn resume_after(out: &[u64], start: u64) -> u64 {
    out.last().map_or(start, |&p| p + 1)
}

/// Takes up to `limit` pages of `*word & mask`, lowest first; returns how many.
#[inline(always)]
fn take_limited(word: &mut u64, mask: u64, base: u64, limit: usize, out: &mut Vec<u64>) -> usize {
    let mut bits = *word & mask;
    let mut took = 0u64;
    let mut n = 0;
    while bits != 0 && n < limit {
        let b = bits.trailing_zeros();
        out.push(base + u64::from(b));
        took |= 1 << b;
        bits &= bits - 1;
        n += 1;
    }
    *word &= !took;
    n
}

/// Takes every page of `block` (`n` of them, first page `base`) into `out`, and clears it.
#[inline(always)]
fn take_block<D: DecodeWord>(
    block: &mut [u64],
    base: u64,
    n: usize,
    out: &mut Vec<u64>,
    decode: D,
) {
    out.reserve(n + TAKE_SPARE);
    let len = out.len();
    let dst = &mut out.spare_capacity_mut()[..n + TAKE_SPARE];
    let mut at = 0;
    if n < block.len() {
        // Sparse: visit the non-zero words only, a page at a time (most hold one), and store
        // only to them.
        let mut nonzero = block
            .iter()
            .enumerate()
            .fold(0u64, |m, (i, &w)| m | u64::from(w != 0) << i);
        while nonzero != 0 {
            let i = nonzero.trailing_zeros() as usize;
            nonzero &= nonzero - 1;
            let mut bits = block[i];
            block[i] = 0;
            let word_base = base + i as u64 * WORD_BITS;
            while bits != 0 {
                dst[at].write(word_base + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
                at += 1;
            }
        }
    } else {
        if n >= DENSE_WORD * block.len() {
            for (i, &w) in block.iter().enumerate() {
                at += decode.decode::<true>(w, base + i as u64 * WORD_BITS, &mut dst[at..]);
            }
        } else {
            for (i, &w) in block.iter().enumerate() {
                at += decode.decode::<false>(w, base + i as u64 * WORD_BITS, &mut dst[at..]);
            }
        }
        block.fill(0);
    }
    // The words' count cannot change under `&mut`, so this holds; checked, as `set_len` trusts it.
    assert_eq!(at, n, "take: decoded pages disagree with the block's count");
    // SAFETY: `dst[..n]` (the `n` slots after `len`, inside the capacity reserved above) were
    // all written: each word's pages went to the slots from `at` on, as many as `at` then
    // advanced by (the loop above, or `DecodeWord`'s contract), and `at` ended at `n`.
    unsafe { out.set_len(len + n) };
}
