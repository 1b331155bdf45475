//! Clearing a batch of page ranges (free-page hints), in whichever of two ways costs less for
//! the batch:
//!
//! - **sparse**: range after range in the order given, prefetching a few ranges ahead
//!   ([`Kernels::clear_ranges`]). Each range costs about a cache miss at each end, so a batch
//!   that covers much of a large bitmap in shuffled order costs several passes over it.
//! - **dense**: the whole blocks of words each range covers are marked in a mark bitmap (one
//!   bit per block of `1 << shift` words, the largest block every range of the batch starts
//!   and ends on, up to 64 words: for 4 MiB hints 16 words, so 32 KiB of marks for a 32 MiB
//!   bitmap, which stay in L1 while set in random order), whatever of a range is not whole
//!   blocks is cleared at once, and then the marked blocks are swept in address order by the
//!   count-and-clear kernel ([`Kernels::clear_marked`]): about one sequential pass, which the
//!   hardware prefetcher streams, whatever the ranges' order.
//!
//! Both count each cleared page once however the ranges overlap: a block marked twice is swept
//! once, and a page a direct clear already took is no longer set when the sweep reaches it.
//! [`Path::for_batch`] chooses between them.

use std::cell::Cell;
use std::ops::Range;

use crate::kernels::{Kernels, RangesBounds, generic};
use crate::span::{WORD_BITS, span, word_of};

/// The dense path pays when the batch has at least one range per this many words of the span
/// it touches. Measured with shuffled 4 MiB hints (16 words each) over a 2^28-page bitmap on
/// a Sapphire Rapids VM (best of 40, sparse / dense): one range per 16 words 5.4 / 2.9 ms,
/// per 32 words 2.7 / 2.4, per 48 words 1.80 / 1.83, per 64 words 1.35 / 1.46, per 128 words
/// 0.69 / 0.82. The sweep's cost follows the span (the hardware prefetcher streams the lines
/// between marked blocks too), the sparse path's the number of ranges.
pub const DENSE_SPAN_WORDS_PER_RANGE: usize = 48;

/// Batches of fewer ranges always take the sparse path: allocating and scanning marks does
/// not pay for a handful of misses.
pub const DENSE_MIN_RANGES: usize = 64;

/// How a batch of ranges is cleared (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Range by range, in the order given, with prefetching.
    Sparse,
    /// Marked, then swept in address order.
    Dense,
}

impl Path {
    /// The path for `nranges` ranges touching a span of `span_words` bitmap words.
    pub const fn for_batch(nranges: usize, span_words: usize) -> Self {
        if nranges >= dense_from(span_words) {
            Self::Dense
        } else {
            Self::Sparse
        }
    }
}

/// From how many ranges a batch touching `span_words` bitmap words takes the dense path.
pub const fn dense_from(span_words: usize) -> usize {
    let per_span = span_words / DENSE_SPAN_WORDS_PER_RANGE;
    if per_span > DENSE_MIN_RANGES {
        per_span
    } else {
        DENSE_MIN_RANGES
    }
}

/// The bitmap words from the first to the last that non-empty ranges among
/// `[starts[i], starts[i] + counts[i])` touch (all validated; empty when all are empty).
pub fn span_words(starts: &[u64], counts: &[u64]) -> Range<usize> {
    let mut first = u64::MAX;
    let mut end = 0;
    for (&s, &n) in starts.iter().zip(counts) {
        if n != 0 {
            first = first.min(s);
            end = end.max(s + n);
        }
    }
    words_of(first.min(end)..end)
}

/// The words holding pages `pages`.
fn words_of(pages: Range<u64>) -> Range<usize> {
    if pages.is_empty() {
        0..0
    } else {
        word_of(pages.start)..word_of(pages.end - 1) + 1
    }
}

/// The largest mark block (log2 of its words) that every range given by `align` (its starts
/// and lengths ORed) starts and ends on, between one word and [`MAX_BLOCK_SHIFT`]: then no
/// range has a partly covered block to clear directly. 4 MiB hints give 16 words, and 2^28
/// pages 32 KiB of marks, which stay in L1 while they are set in random order.
pub fn block_shift_for(align: u64) -> u32 {
    align
        .trailing_zeros()
        .saturating_sub(WORD_BITS.trailing_zeros())
        .min(MAX_BLOCK_SHIFT)
}

/// The largest mark block: 64 words (a mark word then covers 32 KiB of bitmap).
pub const MAX_BLOCK_SHIFT: u32 = 6;

/// Clears every range `[starts[i], starts[i] + counts[i])` (validated against `words`;
/// overlapping, unsorted, any length or alignment) and returns how many pages were set, by
/// the path [`Path::for_batch`] chooses. `bounds` is what checking the batch found.
pub fn clear_batch(
    kernels: &Kernels,
    words: &mut [u64],
    starts: &[u64],
    counts: &[u64],
    bounds: &RangesBounds,
) -> u64 {
    let span = words_of(bounds.first.min(bounds.end)..bounds.end);
    match Path::for_batch(starts.len(), span.len()) {
        Path::Sparse => kernels.clear_ranges(words, starts, counts),
        Path::Dense => {
            let marks = BlockMarks::new(span, block_shift_for(bounds.align));
            clear_dense(kernels, words, starts, counts, marks, bounds.align)
        }
    }
}

/// [`clear_batch`] by the path given, and for the dense path with marks of `1 << block_shift`
/// words: every path and block size gives the same result on every batch.
pub fn clear_batch_by(
    path: Path,
    block_shift: u32,
    kernels: &Kernels,
    words: &mut [u64],
    starts: &[u64],
    counts: &[u64],
) -> u64 {
    match path {
        Path::Sparse => kernels.clear_ranges(words, starts, counts),
        Path::Dense => {
            let marks = BlockMarks::new(span_words(starts, counts), block_shift);
            let align = starts.iter().chain(counts).fold(0, |a, &x| a | x);
            clear_dense(kernels, words, starts, counts, marks, align)
        }
    }
}

/// The dense path, with marks whose words hold every non-empty range; `align` is every start
/// and length ORed.
fn clear_dense(
    kernels: &Kernels,
    words: &mut [u64],
    starts: &[u64],
    counts: &[u64],
    mut marks: BlockMarks,
    align: u64,
) -> u64 {
    let direct = if align.trailing_zeros() >= WORD_BITS.trailing_zeros() + marks.shift {
        // Whole blocks only (4 MiB hints): nothing to clear directly.
        marks.add_blocks(kernels, starts, counts);
        0
    } else {
        starts
            .iter()
            .zip(counts)
            .map(|(&s, &n)| marks.add(words, s, s + n))
            .sum()
    };
    direct + marks.sweep(kernels, words)
}

/// The mark bitmap of the dense path: bit `b` of `marks[k]` marks the block of `1 << shift`
/// bitmap words at word `first_word + ((64k + b) << shift)` for clearing.
#[derive(Debug)]
pub struct BlockMarks {
    first_word: usize,
    shift: u32,
    /// The blocks covered, counted from word 0: `[first_block, end_block)`.
    first_block: u64,
    end_block: u64,
    marks: Vec<u64>,
}

/// Mark words a thread keeps between batches: fresh memory for every batch would cost a page
/// fault per 4 KiB of marks, more than the marking itself. Up to 4 MiB of them are kept.
const KEEP_MARK_WORDS: usize = 1 << 19;

thread_local! {
    static SPARE_MARKS: Cell<Vec<u64>> = const { Cell::new(Vec::new()) };
}

impl BlockMarks {
    /// Marks in blocks of `1 << shift` words (`shift <= MAX_BLOCK_SHIFT`) for the bitmap words
    /// `words`, none marked yet.
    pub fn new(words: Range<usize>, shift: u32) -> Self {
        let shift = shift.min(MAX_BLOCK_SHIFT);
        let first_word = words.start >> shift << shift;
        let blocks = (words.end.max(first_word) - first_word).div_ceil(1 << shift);
        let mut marks = SPARE_MARKS.take();
        marks.clear();
        marks.resize(blocks.div_ceil(64), 0);
        Self {
            first_word,
            shift,
            first_block: (first_word >> shift) as u64,
            end_block: words.end.div_ceil(1 << shift) as u64,
            marks,
        }
    }

    /// Takes pages `[start, end)` (validated against `words`, their words inside the marks'
    /// range): clears the parts not made of whole blocks now (partly covered words, and whole
    /// words in blocks the range covers only partly) and marks its whole blocks for the sweep.
    /// Returns how many pages the direct clears found set.
    #[inline(always)]
    pub fn add(&mut self, words: &mut [u64], start: u64, end: u64) -> u64 {
        let page_shift = WORD_BITS.trailing_zeros() + self.shift;
        // Hints are whole blocks almost always: nothing to clear directly then.
        if (start | end) & ((1 << page_shift) - 1) == 0 {
            self.mark_blocks(start >> page_shift, end >> page_shift);
            return 0;
        }
        let block = 1usize << self.shift;
        let s = span(start, end);
        let mut cleared = generic::clear_edges(words, &s);
        let body = s.body;
        let lo = body.start.next_multiple_of(block).min(body.end);
        let hi = (body.end & !(block - 1)).max(lo);
        cleared += generic::clear_count(&mut words[body.start..lo]);
        cleared += generic::clear_count(&mut words[hi..body.end]);
        self.mark_blocks((lo >> self.shift) as u64, (hi >> self.shift) as u64);
        cleared
    }

    /// Marks ranges that all start and end on block boundaries (inside the marks' range): the
    /// hot loop of a dense batch of hints, a kernel so that its variable shifts are BMI2's.
    fn add_blocks(&mut self, kernels: &Kernels, starts: &[u64], counts: &[u64]) {
        let page_shift = WORD_BITS.trailing_zeros() + self.shift;
        let blocks = self.first_block..self.end_block;
        kernels.mark_blocks(&mut self.marks, starts, counts, blocks, page_shift);
    }

    /// Marks blocks `[lo, hi)` (counted from word 0, inside the marks' range).
    #[inline(always)]
    fn mark_blocks(&mut self, lo: u64, hi: u64) {
        generic::mark_block_range(&mut self.marks, self.first_block..self.end_block, lo, hi);
    }

    /// Clears every marked block in address order, returning how many pages were set.
    pub fn sweep(&self, kernels: &Kernels, words: &mut [u64]) -> u64 {
        kernels.clear_marked(words, &self.marks, self.first_word, self.shift)
    }
}

impl Drop for BlockMarks {
    fn drop(&mut self) {
        if self.marks.capacity() <= KEEP_MARK_WORDS {
            SPARE_MARKS.set(std::mem::take(&mut self.marks));
        }
    }
}
