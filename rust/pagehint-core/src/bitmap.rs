//! The dirty bitmap: one bit per guest page in the word layout of `KVM_GET_DIRTY_LOG` and of
//! QEMU's migration bitmap (bit `i` of little-endian `u64` word `j` is page `64*j + i`).
//!
//! Every method validates all of its arguments before it writes anything, so an error leaves
//! the bitmap exactly as it was. Bits past `npages` in the last word are always zero.

use crate::error::BitmapError;
use crate::kernels::{self, Kernels, RangesBounds};
use crate::range_batch;
use crate::span::{WORD_BITS, bit_of, span, word_of};
use crate::words::{Words, machine_memory};

/// The largest bitmap: 2^48 pages (1 EiB of 4 KiB pages, a 32 TiB bitmap). A bitmap larger
/// than the machine's memory can be created and used: its words are reserved, not committed,
/// and only the parts written cost memory (see [`crate::words`]). When the system refuses even
/// the reservation, creation fails with an error rather than an abort.
pub const MAX_PAGES: u64 = 1 << 48;

/// Words per chunk of a [`SparseImage`]: 4 KiB, a page of words.
pub const IMAGE_CHUNK_WORDS: usize = 512;

/// A bitmap's contents as its non-zero chunks of [`IMAGE_CHUNK_WORDS`] words, in a portable
/// byte form (what a Python pickle of a bitmap stores): a sparse bitmap's image is as small as
/// what is set in it, a dense one costs 8 bytes per 4 KiB more than its words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SparseImage {
    /// The index `k` of each non-zero chunk (words `[512k, 512k + 512)`), ascending, as
    /// little-endian `u64`s.
    pub chunks: Vec<u8>,
    /// Those chunks' words as little-endian `u64`s, one chunk after another; only the
    /// bitmap's last chunk may be shorter than 512 words.
    pub words: Vec<u8>,
}

/// The little-endian `u64` in `bytes` (exactly 8 of them).
fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes);
    u64::from_le_bytes(b)
}

/// Words that setting pages `[start, end)` (already checked) writes.
const fn span_words(start: u64, end: u64) -> u64 {
    if start == end {
        0
    } else {
        (end - 1) / WORD_BITS - start / WORD_BITS + 1
    }
}

/// Refuses to set `pages` pages whose `words` words are more than the machine's memory: a
/// single call writing them would back them all at once. Nothing is refused where the
/// machine's memory is unknown.
fn check_commit(pages: u64, words: u64) -> Result<(), BitmapError> {
    let bytes = words.saturating_mul(8);
    match machine_memory() {
        Some(memory) if bytes > memory => Err(BitmapError::ExceedsMemory {
            pages,
            bytes,
            memory,
        }),
        _ => Ok(()),
    }
}

/// A dirty bitmap over pages `[0, npages)`.
#[derive(Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Words,
    npages: u64,
}

impl DirtyBitmap {
    /// A clean bitmap. The words are reserved and lazily zeroed: pages of them that are never
    /// written are never backed by memory, so the bitmap may be larger than the machine's
    /// memory.
    pub fn new(npages: u64) -> Result<Self, BitmapError> {
        if npages > MAX_PAGES {
            return Err(BitmapError::TooLarge {
                npages,
                max: MAX_PAGES,
            });
        }
        let words = Words::zeroed(word_of(npages.div_ceil(WORD_BITS) * WORD_BITS))?;
        Ok(Self { words, npages })
    }

    /// A bitmap with every page dirty (the state at the start of a migration). This writes
    /// every word, so it is refused with `ExceedsMemory` (before allocating anything) when the
    /// words are more than the machine's memory.
    pub fn new_dirty(npages: u64) -> Result<Self, BitmapError> {
        check_commit(npages, npages.div_ceil(WORD_BITS))?;
        let mut bm = Self::new(npages)?;
        bm.set_all()?;
        Ok(bm)
    }

    /// A copy, or `AllocationFailed`; clean stretches stay unbacked in the copy too.
    pub fn try_clone(&self) -> Result<Self, BitmapError> {
        Ok(Self {
            words: self.words.try_clone()?,
            npages: self.npages,
        })
    }

    /// Pages covered.
    pub const fn npages(&self) -> u64 {
        self.npages
    }

    /// The words, `ceil(npages / 64)` of them.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The words, for kernels applying ranges already checked against `npages` (hint decoding).
    /// Writing bits past `npages` would break the tail invariant; callers check their ranges.
    pub(crate) fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    fn kernels() -> &'static Kernels {
        kernels::active()
    }

    /// Checks that `[start, start + n)` lies inside the bitmap and returns its end.
    pub fn check_range(&self, start: u64, n: u64) -> Result<u64, BitmapError> {
        match start.checked_add(n) {
            Some(end) if end <= self.npages => Ok(end),
            _ => Err(BitmapError::OutOfRange {
                start,
                n,
                npages: self.npages,
            }),
        }
    }

    fn check_page(&self, pfn: u64) -> Result<(), BitmapError> {
        if pfn < self.npages {
            Ok(())
        } else {
            Err(BitmapError::OutOfRange {
                start: pfn,
                n: 1,
                npages: self.npages,
            })
        }
    }

    /// Sets pages `[start, start + n)`, returning how many were newly set. Refused with
    /// `ExceedsMemory` when the range's words are more than the machine's memory.
    pub fn set_range(&mut self, start: u64, n: u64) -> Result<u64, BitmapError> {
        let end = self.check_range(start, n)?;
        check_commit(n, span_words(start, end))?;
        Ok(self.set_span(start, end))
    }

    /// Sets every range `[starts[i], starts[i] + counts[i])` (overlaps allowed) and returns how
    /// many pages were newly set: a guest's writes, or a dirty log made from ranges. Every
    /// range is checked before any is set, each as [`set_range`](Self::set_range) checks it.
    pub fn set_ranges(&mut self, starts: &[u64], counts: &[u64]) -> Result<u64, BitmapError> {
        self.check_ranges(starts, counts)?;
        for (&start, &n) in starts.iter().zip(counts) {
            check_commit(n, span_words(start, start + n))?;
        }
        Ok(starts
            .iter()
            .zip(counts)
            .map(|(&start, &n)| self.set_span(start, start + n))
            .sum())
    }

    /// Checks a batch of ranges: equal lengths, every range inside the bitmap. Returns where
    /// the batch lies.
    fn check_ranges(&self, starts: &[u64], counts: &[u64]) -> Result<RangesBounds, BitmapError> {
        if starts.len() != counts.len() {
            return Err(BitmapError::LengthMismatch {
                left: starts.len(),
                right: counts.len(),
            });
        }
        let bounds = Self::kernels().ranges_bounds(starts, counts, self.npages);
        if !bounds.inside {
            // Name the first range outside.
            for (&start, &n) in starts.iter().zip(counts) {
                self.check_range(start, n)?;
            }
        }
        Ok(bounds)
    }

    /// Sets pages `[start, end)`, already checked.
    fn set_span(&mut self, start: u64, end: u64) -> u64 {
        let s = span(start, end);
        let mut set = 0;
        for (w, mask) in s.head.into_iter().chain(s.tail) {
            set += u64::from((!self.words[w] & mask).count_ones());
            self.words[w] |= mask;
        }
        set + Self::kernels().set_count(&mut self.words[s.body])
    }

    /// Clears pages `[start, start + n)`, returning how many were set (QEMU's dirty counter
    /// drops by exactly this).
    pub fn clear_range(&mut self, start: u64, n: u64) -> Result<u64, BitmapError> {
        self.check_range(start, n)?;
        Ok(Self::kernels().clear_ranges(&mut self.words, &[start], &[n]))
    }

    /// Pages set in `[start, start + n)`.
    pub fn count(&self, start: u64, n: u64) -> Result<u64, BitmapError> {
        let end = self.check_range(start, n)?;
        let s = span(start, end);
        let edges: u64 = s
            .head
            .into_iter()
            .chain(s.tail)
            .map(|(w, mask)| u64::from((self.words[w] & mask).count_ones()))
            .sum();
        Ok(edges + Self::kernels().count(&self.words[s.body]))
    }

    /// Pages set in the whole bitmap.
    pub fn count_all(&self) -> u64 {
        Self::kernels().count(&self.words)
    }

    /// Whether page `pfn` is dirty.
    pub fn test(&self, pfn: u64) -> Result<bool, BitmapError> {
        self.check_page(pfn)?;
        Ok(self.words[word_of(pfn)] & bit_of(pfn) != 0)
    }

    /// Clears page `pfn`, returning whether it was dirty.
    pub fn test_and_clear(&mut self, pfn: u64) -> Result<bool, BitmapError> {
        self.check_page(pfn)?;
        let w = &mut self.words[word_of(pfn)];
        let was = *w & bit_of(pfn) != 0;
        *w &= !bit_of(pfn);
        Ok(was)
    }

    /// Marks every page dirty, returning how many were newly set. Refused with
    /// `ExceedsMemory` when the bitmap's words are more than the machine's memory.
    pub fn set_all(&mut self) -> Result<u64, BitmapError> {
        self.set_range(0, self.npages)
    }

    /// Marks every page clean, returning how many were set.
    pub fn clear_all(&mut self) -> u64 {
        Self::kernels().clear_count(&mut self.words)
    }

    /// Clears every range `[starts[i], starts[i] + counts[i])` (overlaps allowed) and returns how
    /// many pages were set: the hint hot path. All ranges are checked before any is applied; a
    /// batch dense in the span it touches is swept in address order (see
    /// [`crate::range_batch`]).
    pub fn clear_ranges(&mut self, starts: &[u64], counts: &[u64]) -> Result<u64, BitmapError> {
        let bounds = self.check_ranges(starts, counts)?;
        Ok(range_batch::clear_batch(
            Self::kernels(),
            &mut self.words,
            starts,
            counts,
            &bounds,
        ))
    }

    /// ORs a KVM-layout dirty log into the bitmap: bit `i` of `log[j]` is page
    /// `page_offset + 64*j + i`. Returns how many pages became newly dirty. `page_offset` must be
    /// a multiple of 64; a log longer than the bitmap is accepted as long as every bit it sets is
    /// a page of the bitmap.
    pub fn merge_log(&mut self, log: &[u64], page_offset: u64) -> Result<u64, BitmapError> {
        if !page_offset.is_multiple_of(WORD_BITS) {
            return Err(BitmapError::MisalignedOffset { page_offset });
        }
        if page_offset > self.npages {
            return Err(BitmapError::OutOfRange {
                start: page_offset,
                n: 0,
                npages: self.npages,
            });
        }
        let first = word_of(page_offset);
        let fit = (self.words.len() - first).min(log.len());
        // Bits for pages past the end can only be in the bitmap's last word (past its tail)
        // or in log words beyond it: check just those, not the whole log.
        let tail_bits = self.npages % WORD_BITS;
        let reaches_last_word = fit > 0 && first + fit == self.words.len();
        let past_tail = match log.get(fit.wrapping_sub(1)) {
            Some(&w) if reaches_last_word && tail_bits != 0 => w & !((1u64 << tail_bits) - 1),
            _ => 0,
        };
        let past_end = if past_tail != 0 {
            Some((fit - 1, past_tail))
        } else {
            let beyond = &log[fit..];
            Self::kernels()
                .find_nonzero(beyond)
                .map(|i| (fit + i, beyond[i]))
        };
        if let Some((j, w)) = past_end {
            let pfn = page_offset + j as u64 * WORD_BITS + u64::from(w.trailing_zeros());
            return Err(BitmapError::LogPastEnd {
                pfn,
                npages: self.npages,
            });
        }
        Ok(Self::kernels().merge_count(&mut self.words[first..first + fit], &log[..fit]))
    }

    /// The first dirty page at or after `start`, if any.
    pub fn next_dirty(&self, start: u64) -> Result<Option<u64>, BitmapError> {
        self.check_range(start, 0)?;
        Ok(self.next_set(start, self.npages))
    }

    fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        if from >= end {
            return None;
        }
        let w = word_of(from);
        let head = self.words[w] & !(bit_of(from) - 1);
        let found = if head != 0 {
            Some(w as u64 * WORD_BITS + u64::from(head.trailing_zeros()))
        } else {
            let last = word_of(end - 1);
            Self::kernels()
                .find_nonzero(&self.words[w + 1..=last])
                .map(|i| {
                    let k = w + 1 + i;
                    k as u64 * WORD_BITS + u64::from(self.words[k].trailing_zeros())
                })
        };
        found.filter(|&p| p < end)
    }

    /// The first clean page at or after `from` and before `end`, or `end`.
    fn next_clear(&self, from: u64, end: u64) -> u64 {
        if from >= end {
            return end;
        }
        let w = word_of(from);
        let head = !self.words[w] & !(bit_of(from) - 1);
        let found = if head != 0 {
            w as u64 * WORD_BITS + u64::from(head.trailing_zeros())
        } else {
            let last = word_of(end - 1);
            match Self::kernels().find_not_full(&self.words[w + 1..=last]) {
                Some(i) => {
                    let k = w + 1 + i;
                    k as u64 * WORD_BITS + u64::from((!self.words[k]).trailing_zeros())
                }
                None => end,
            }
        };
        found.min(end)
    }

    /// The bitmap's non-zero chunks (see [`SparseImage`]); untouched stretches are skipped
    /// with the search kernel, so an image of a huge sparse bitmap costs one scan.
    pub fn sparse_image(&self) -> SparseImage {
        let mut image = SparseImage::default();
        let mut at = 0;
        while let Some(i) = Self::kernels().find_nonzero(&self.words[at..]) {
            let chunk = (at + i) / IMAGE_CHUNK_WORDS;
            let start = chunk * IMAGE_CHUNK_WORDS;
            let end = (start + IMAGE_CHUNK_WORDS).min(self.words.len());
            image
                .chunks
                .extend_from_slice(&(chunk as u64).to_le_bytes());
            for w in &self.words[start..end] {
                image.words.extend_from_slice(&w.to_le_bytes());
            }
            at = end;
        }
        image
    }

    /// Replaces the contents with a [`SparseImage`] (every page outside its chunks clean).
    /// Everything is checked before anything changes: chunk indices ascending and inside the
    /// bitmap, the words exactly as many as the chunks hold, and no bit past `npages`;
    /// `BadImage` otherwise.
    pub fn load_sparse_image(&mut self, chunks: &[u8], words: &[u8]) -> Result<(), BitmapError> {
        let bad = |reason: String| Err(BitmapError::BadImage { reason });
        if !chunks.len().is_multiple_of(8) || !words.len().is_multiple_of(8) {
            return bad(format!(
                "{} bytes of chunk indices and {} of words are not whole u64s",
                chunks.len(),
                words.len()
            ));
        }
        let nwords = self.words.len();
        let nchunks = nwords.div_ceil(IMAGE_CHUNK_WORDS);
        let mut spans = Vec::with_capacity(chunks.len() / 8);
        let mut expected = 0usize;
        let mut previous: Option<u64> = None;
        for raw in chunks.chunks_exact(8) {
            let chunk = le_u64(raw);
            if previous.is_some_and(|p| chunk <= p) {
                return bad(format!("chunk {chunk} is not after chunk {previous:?}"));
            }
            let Some(start) = usize::try_from(chunk)
                .ok()
                .filter(|&c| c < nchunks)
                .map(|c| c * IMAGE_CHUNK_WORDS)
            else {
                return bad(format!(
                    "chunk {chunk} is past the bitmap's {nchunks} chunks"
                ));
            };
            let end = (start + IMAGE_CHUNK_WORDS).min(nwords);
            expected += end - start;
            spans.push((start, end));
            previous = Some(chunk);
        }
        if words.len() / 8 != expected {
            return bad(format!(
                "{} words for chunks that hold {expected}",
                words.len() / 8
            ));
        }
        let tail_bits = self.npages % WORD_BITS;
        let reaches_tail = spans.last().is_some_and(|&(_, end)| end == nwords);
        if tail_bits != 0 && reaches_tail && le_u64(&words[words.len() - 8..]) >> tail_bits != 0 {
            return bad(format!(
                "bits past the bitmap's {} pages are set",
                self.npages
            ));
        }
        Self::kernels().clear_count(&mut self.words);
        let mut from = words.chunks_exact(8);
        for (start, end) in spans {
            for (dst, src) in self.words[start..end].iter_mut().zip(&mut from) {
                *dst = le_u64(src);
            }
        }
        Ok(())
    }

    /// Test-and-clears up to `max_pages` dirty pages at or after `start`, appending their pfns to
    /// `out` in ascending order (the sender's loop). Returns the pfn to resume from.
    ///
    /// `out` grows as needed; a caller sizing it up front should add [`crate::TAKE_SPARE`]
    /// slots, which the decoding may write (not keep) past the last page.
    pub fn take_dirty(
        &mut self,
        max_pages: usize,
        start: u64,
        out: &mut Vec<u64>,
    ) -> Result<u64, BitmapError> {
        self.check_range(start, 0)?;
        let npages = self.npages;
        Ok(Self::kernels().take(&mut self.words, start, npages, max_pages, out))
    }

    /// Test-and-clears up to `max_pages` dirty pages at or after `start`, as
    /// [`take_dirty`](Self::take_dirty) does, appending them as runs of consecutive pages (first
    /// page, length) to `starts` and `lens` in ascending order: a sender whose pages travel as
    /// ranges pays per run, not per page. Returns the pages taken.
    pub fn take_dirty_runs(
        &mut self,
        max_pages: u64,
        start: u64,
        starts: &mut Vec<u64>,
        lens: &mut Vec<u64>,
    ) -> Result<u64, BitmapError> {
        self.check_range(start, 0)?;
        let end = self.npages;
        let mut left = max_pages;
        let mut pfn = start;
        while left > 0 {
            let Some(run) = self.next_set(pfn, end) else {
                break;
            };
            // Look no further than the pages still wanted: a clean page may be far off.
            let limit = end.min(run.saturating_add(left));
            let n = self.next_clear(run, limit) - run;
            Self::kernels().clear_ranges(&mut self.words, &[run], &[n]);
            starts.push(run);
            lens.push(n);
            left -= n;
            pfn = run + n;
        }
        Ok(max_pages - left)
    }

    /// Runs of consecutive dirty pages inside `[start, start + n)`, clipped to it: their starts
    /// and lengths are appended to `starts` and `lens`.
    pub fn dirty_runs(
        &self,
        start: u64,
        n: u64,
        starts: &mut Vec<u64>,
        lens: &mut Vec<u64>,
    ) -> Result<(), BitmapError> {
        let end = self.check_range(start, n)?;
        let mut pfn = start;
        while let Some(run) = self.next_set(pfn, end) {
            let run_end = self.next_clear(run, end);
            starts.push(run);
            lens.push(run_end - run);
            pfn = run_end;
        }
        Ok(())
    }
}
