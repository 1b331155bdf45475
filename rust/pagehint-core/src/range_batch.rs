//! Clearing a batch of page ranges (free-page hints), in whichever of two ways costs less for
//! the batch:
//!
//! - **sparse**: range after range in the order given, prefetching a few ranges ahead
//!   ([`Kernels::clear_ranges`]). Each range costs about a cache miss at each end, so a batch
//!   that covers much of a large bitmap in shuffled order costs far more than a pass over it.
//! - **dense**: the whole words each range covers are marked in a mark bitmap (one bit per
//!   bitmap word: 1/64 of the bitmap span the batch touches, 512 KiB for a 32 MiB bitmap, so
//!   it stays in L2), the partly covered words at a range's ends are cleared at once, and then
//!   the marked words are swept in address order by the count-and-clear kernel
//!   ([`Kernels::clear_marked`]): about one sequential pass, whatever the ranges' order.
//!
//! Both count each cleared page once however the ranges overlap: a word marked twice is swept
//! once, and a page an edge clear already took is no longer set when the sweep reaches it.
//! [`Path::for_batch`] chooses between them.

use std::cell::Cell;
use std::ops::Range;

use crate::kernels::{Kernels, generic};
use crate::span::{WORD_BITS, span, word_of};

/// The dense path pays when the batch has at least one range per this many words of the span
/// it touches. Measured with 4 MiB hints (16 words each) over a 2^28-page bitmap (B1): the
/// sweep costs about 1/20 of a sparse range's miss per span word it scans past, so below one
/// range per 512 words the mark scan starts to cost more than the ranges' misses it saves.
pub const DENSE_SPAN_WORDS_PER_RANGE: usize = 32;

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
    if first >= end {
        0..0
    } else {
        word_of(first)..word_of(end - 1) + 1
    }
}

/// Clears every range `[starts[i], starts[i] + counts[i])` (validated against `words`;
/// overlapping, unsorted, any length or alignment) and returns how many pages were set, by
/// the path [`Path::for_batch`] chooses.
pub fn clear_batch(kernels: &Kernels, words: &mut [u64], starts: &[u64], counts: &[u64]) -> u64 {
    let span = span_words(starts, counts);
    let path = Path::for_batch(starts.len(), span.len());
    clear_batch_by(path, kernels, words, starts, counts)
}

/// [`clear_batch`] by the path given: both paths give the same result on every batch.
pub fn clear_batch_by(
    path: Path,
    kernels: &Kernels,
    words: &mut [u64],
    starts: &[u64],
    counts: &[u64],
) -> u64 {
    match path {
        Path::Sparse => kernels.clear_ranges(words, starts, counts),
        Path::Dense => {
            let mut marks = WordMarks::new(span_words(starts, counts));
            let edges: u64 = starts
                .iter()
                .zip(counts)
                .map(|(&s, &n)| marks.add(words, s, s + n))
                .sum();
            edges + marks.sweep(kernels, words)
        }
    }
}

/// The mark bitmap of the dense path: bit `b` of `marks[k]` marks bitmap word
/// `first_word + 64k + b` for clearing.
#[derive(Debug)]
pub struct WordMarks {
    first_word: usize,
    end_word: usize,
    marks: Vec<u64>,
}

/// Mark words a thread keeps between batches: fresh memory for every batch would cost a page
/// fault per 4 KiB of marks, more than the marking itself. Up to 4 MiB, the marks of a 2^31-page
/// span, are kept.
const KEEP_MARK_WORDS: usize = 1 << 19;

thread_local! {
    static SPARE_MARKS: Cell<Vec<u64>> = const { Cell::new(Vec::new()) };
}

impl WordMarks {
    /// No word of `words` (a range of bitmap words) marked yet.
    pub fn new(words: Range<usize>) -> Self {
        let mut marks = SPARE_MARKS.take();
        marks.clear();
        marks.resize(words.len().div_ceil(64), 0);
        Self {
            first_word: words.start,
            end_word: words.end,
            marks,
        }
    }

    /// Takes pages `[start, end)` (validated against `words`, their words inside the marks'
    /// range): clears the partly covered words at its ends now and marks its whole words for
    /// the sweep. Returns how many pages the edge clears found set.
    #[inline(always)]
    pub fn add(&mut self, words: &mut [u64], start: u64, end: u64) -> u64 {
        // Hints are whole words almost always (a 4 MiB hint is 16): no edges to clear then.
        if start.is_multiple_of(WORD_BITS) && end.is_multiple_of(WORD_BITS) {
            self.mark(word_of(start)..word_of(end));
            return 0;
        }
        let s = span(start, end);
        let cleared = generic::clear_edges(words, &s);
        self.mark(s.body);
        cleared
    }

    /// Marks bitmap words `words` (inside the marks' range).
    #[inline(always)]
    fn mark(&mut self, words: Range<usize>) {
        if words.is_empty() {
            return;
        }
        assert!(
            self.first_word <= words.start && words.end <= self.end_word,
            "words outside the marked range"
        );
        let (lo, hi) = (words.start - self.first_word, words.end - self.first_word);
        let (first, last) = (lo / 64, (hi - 1) / 64);
        let head = u64::MAX << (lo % 64);
        let tail = u64::MAX >> (63 - (hi - 1) % 64);
        if first == last {
            self.marks[first] |= head & tail;
        } else {
            self.marks[first] |= head;
            if last > first + 1 {
                self.marks[first + 1..last].fill(u64::MAX);
            }
            self.marks[last] |= tail;
        }
    }

    /// Clears every marked word in address order, returning how many pages were set.
    pub fn sweep(&self, kernels: &Kernels, words: &mut [u64]) -> u64 {
        kernels.clear_marked(words, &self.marks, self.first_word)
    }
}

impl Drop for WordMarks {
    fn drop(&mut self) {
        if self.marks.capacity() <= KEEP_MARK_WORDS {
            SPARE_MARKS.set(std::mem::take(&mut self.marks));
        }
    }
}
