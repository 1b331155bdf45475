//! Applying free-page hints: `(gpa, len)` ranges a guest reported free, mapped through the
//! memory map to bitmap pages and cleared.
//!
//! Only pages a hint covers completely are cleared: its start is rounded up and its end down to
//! page boundaries. (QEMU rounds the start and the length down separately, which can clear the
//! page after a misaligned hint, a page the guest never said was free.) A hint of zero length,
//! one whose end wraps past 2^64, or one with any byte outside RAM is rejected whole and counted;
//! the next hint is processed regardless.

use crate::bitmap::DirtyBitmap;
use crate::error::BitmapError;
use crate::kernels;
use crate::memmap::{MemoryMap, Region};
use crate::range_batch::{self, BlockMarks};
use crate::span::WORD_BITS;

/// Mark blocks of the dense path (log2 words): 16 words, 1024 pages. Hints come one by one,
/// so their common alignment is not known ahead; Linux hints whole blocks of at least this
/// (4 MiB of 4 KiB pages, 32 MiB of 16 KiB, 512 MiB of 64 KiB), and the part of any other
/// hint outside whole blocks is cleared directly.
const HINT_BLOCK_SHIFT: u32 = 4;

/// The bitmap words the map's pages occupy: the span of every range decoded through it.
fn map_words(map: &MemoryMap) -> usize {
    usize::try_from(map.npages().div_ceil(WORD_BITS)).unwrap_or(usize::MAX)
}

/// Why hints were rejected, counted by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintRejects {
    /// `len == 0`.
    pub zero_length: u64,
    /// `gpa + len` wraps past 2^64 (ending exactly at 2^64 is `outside_ram`).
    pub overflow: u64,
    /// Some byte of the range is not guest RAM (a hole, or past the end of RAM).
    pub outside_ram: u64,
}

impl HintRejects {
    /// Every reason with its name, for reports.
    pub const fn by_reason(&self) -> [(&'static str, u64); 3] {
        [
            ("zero_length", self.zero_length),
            ("overflow", self.overflow),
            ("outside_ram", self.outside_ram),
        ]
    }

    /// All rejected hints.
    pub const fn total(&self) -> u64 {
        self.zero_length + self.overflow + self.outside_ram
    }
}

/// What applying a batch of hints did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintOutcome {
    /// Hints seen.
    pub hints: u64,
    /// Pages fully covered by accepted hints (a page hinted twice counts twice).
    pub pages_hinted: u64,
    /// Pages that were dirty and are now clear: QEMU's dirty counter drops by exactly this.
    pub pages_cleared: u64,
    /// Rejected hints by reason.
    pub rejected: HintRejects,
}

/// Ranges decoded per kernel call: they stay in L1 between decoding and clearing, and the
/// kernel's prefetching runs across the batch.
const BATCH: usize = 256;

/// Applies hints one at a time to a bitmap; [`finish`](Self::finish) clears the rest and
/// reports. While the hints are few for the map's size they are cleared in L1-sized batches
/// with each range's lines prefetched as it is decoded (the sparse path of
/// [`crate::range_batch`]); once they are many (or [`expecting`](Self::expecting) says they
/// will be), the ranges are marked and the marked words swept in address order at the end
/// (the dense path). Used by [`apply_hints`] for flat arrays and by the queue readers for hints
/// straight from a ring, so both share one decoding path.
#[derive(Debug)]
pub struct HintApplier<'a> {
    map: &'a MemoryMap,
    words: &'a mut [u64],
    kernels: &'static kernels::Kernels,
    starts: [u64; BATCH],
    counts: [u64; BATCH],
    n: usize,
    /// Ranges queued so far, and from how many on the dense path pays for the map.
    queued: usize,
    dense_from: usize,
    /// The dense path's marks over the map's words, once taken.
    marks: Option<BlockMarks>,
    /// The region of the last hint that lay in one (an empty one at first).
    last_region: Region,
    out: HintOutcome,
    /// `(pfn, pages)` of every range queued, when asked for with [`Self::recording`].
    ranges: Option<Vec<(u64, u64)>>,
}

impl<'a> HintApplier<'a> {
    /// An applier of hints through `map` to `bitmap`. Fails (changing nothing) only when the
    /// bitmap has fewer pages than the map: hints themselves are guest input, so a bad one is
    /// counted, never an error.
    pub fn new(bitmap: &'a mut DirtyBitmap, map: &'a MemoryMap) -> Result<Self, BitmapError> {
        if bitmap.npages() < map.npages() {
            return Err(BitmapError::MapLargerThanBitmap {
                map_pages: map.npages(),
                npages: bitmap.npages(),
            });
        }
        Ok(Self {
            map,
            words: bitmap.words_mut(),
            kernels: kernels::active(),
            starts: [0; BATCH],
            counts: [0; BATCH],
            n: 0,
            queued: 0,
            dense_from: range_batch::dense_from(map_words(map)),
            marks: None,
            last_region: Region::default(),
            out: HintOutcome::default(),
            ranges: None,
        })
    }

    /// Tells the applier that about `hints` hints are coming, so that a batch large enough
    /// for the dense path takes it from the first hint.
    #[must_use]
    pub fn expecting(mut self, hints: usize) -> Self {
        if range_batch::Path::for_batch(hints, map_words(self.map)) == range_batch::Path::Dense {
            self.go_dense();
        }
        self
    }

    /// Clears what is buffered and marks every range from now on.
    fn go_dense(&mut self) {
        if self.marks.is_none() {
            self.flush();
            self.marks = Some(BlockMarks::new(0..map_words(self.map), HINT_BLOCK_SHIFT));
        }
    }

    /// Also keeps the page ranges it clears, for [`Self::finish_with_ranges`]: a VMM that
    /// clears the hypervisor's dirty log for hinted memory, as QEMU does, needs to know where.
    #[must_use]
    pub fn recording(mut self) -> Self {
        self.ranges = Some(Vec::new());
        self
    }

    /// Takes one `(gpa, len)` hint: rejects it whole (counted) or queues the pages it fully
    /// covers for clearing.
    #[inline(always)]
    pub fn add(&mut self, gpa: u64, len: u64) {
        self.out.hints += 1;
        if len == 0 {
            self.out.rejected.zero_length += 1;
            return;
        }
        let Some(end) = gpa.checked_add(len) else {
            // Ending exactly at 2^64 wraps nothing; it is simply not RAM (no region reaches
            // there, since a region's end must be representable).
            if gpa.wrapping_add(len) == 0 {
                self.out.rejected.outside_ram += 1;
            } else {
                self.out.rejected.overflow += 1;
            }
            return;
        };
        // The usual case: the whole hint inside the region of the previous one (a 1 TiB
        // guest has two regions, the 4 GiB below the PCI hole being the smaller).
        let last = self.last_region;
        if last.gpa <= gpa && end <= last.end() {
            self.add_piece(last.first_pfn, gpa - last.gpa, len);
            return;
        }
        match self.map.region_of(gpa) {
            Some(r) if end <= r.end() => {
                self.last_region = *r;
                self.add_piece(r.first_pfn, gpa - r.gpa, len);
            }
            _ => {
                let Some(pieces) = self.map.pieces(gpa, len) else {
                    self.out.rejected.outside_ram += 1;
                    return;
                };
                for (r, at, l) in pieces {
                    self.add_piece(r.first_pfn, at - r.gpa, l);
                }
            }
        }
    }

    /// Queues the pages fully inside `[offset, offset + len)` of the region starting at bitmap
    /// page `first_pfn`: regions are page aligned, so rounding inside a region is rounding the
    /// hint.
    #[inline(always)]
    fn add_piece(&mut self, first_pfn: u64, offset: u64, len: u64) {
        let shift = self.map.page_shift();
        // Rounded up with shifts: a division per hint costs more than the rest of decoding.
        let first = (offset >> shift) + u64::from(offset & ((1 << shift) - 1) != 0);
        let last = (offset + len) >> shift;
        if last <= first {
            return;
        }
        let (pfn, pages) = (first_pfn + first, last - first);
        self.out.pages_hinted += pages;
        if let Some(marks) = self.marks.as_mut() {
            // Every range lies inside the map, so inside the marks.
            self.out.pages_cleared += marks.add(self.words, pfn, pfn + pages);
            if let Some(ranges) = self.ranges.as_mut() {
                ranges.push((pfn, pages));
            }
            return;
        }
        if self.n == BATCH {
            self.flush();
        }
        // Start fetching the range's bitmap lines now; by the time the batch is cleared they
        // have arrived.
        kernels::generic::prefetch_range(self.words, pfn, pages);
        self.starts[self.n] = pfn;
        self.counts[self.n] = pages;
        self.n += 1;
        self.queued += 1;
        if self.queued >= self.dense_from {
            self.go_dense();
        }
    }

    fn flush(&mut self) {
        if let Some(ranges) = self.ranges.as_mut() {
            ranges.extend(
                self.starts[..self.n]
                    .iter()
                    .copied()
                    .zip(self.counts[..self.n].iter().copied()),
            );
        }
        // Every range lies inside the map, so inside the bitmap.
        self.out.pages_cleared +=
            self.kernels
                .clear_ranges(self.words, &self.starts[..self.n], &self.counts[..self.n]);
        self.n = 0;
    }

    /// Clears what is still queued and reports the whole run.
    pub fn finish(self) -> HintOutcome {
        self.finish_with_ranges().0
    }

    /// [`Self::finish`], with the `(pfn, pages)` ranges cleared in order if
    /// [`Self::recording`] (empty otherwise).
    pub fn finish_with_ranges(mut self) -> (HintOutcome, Vec<(u64, u64)>) {
        self.flush();
        if let Some(marks) = self.marks.take() {
            self.out.pages_cleared += marks.sweep(self.kernels, self.words);
        }
        (self.out, self.ranges.take().unwrap_or_default())
    }
}

/// Applies `(gpa, len)` hints to `bitmap` through `map` (see [`HintApplier`]).
pub fn apply_hints(
    bitmap: &mut DirtyBitmap,
    map: &MemoryMap,
    hints: impl IntoIterator<Item = (u64, u64)>,
) -> Result<HintOutcome, BitmapError> {
    let hints = hints.into_iter();
    let mut applier = HintApplier::new(bitmap, map)?.expecting(hints.size_hint().0);
    for (gpa, len) in hints {
        applier.add(gpa, len);
    }
    Ok(applier.finish())
}

/// [`apply_hints`], also returning the `(pfn, pages)` ranges cleared, in order (see
/// [`HintApplier::recording`]): the one rounding rule, for callers that need to know where it
/// cleared.
pub fn apply_hints_recording(
    bitmap: &mut DirtyBitmap,
    map: &MemoryMap,
    hints: impl IntoIterator<Item = (u64, u64)>,
) -> Result<(HintOutcome, Vec<(u64, u64)>), BitmapError> {
    let hints = hints.into_iter();
    let mut applier = HintApplier::new(bitmap, map)?
        .recording()
        .expecting(hints.size_hint().0);
    for (gpa, len) in hints {
        applier.add(gpa, len);
    }
    Ok(applier.finish_with_ranges())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_keeps_every_range_cleared_in_order() {
        let map = MemoryMap::x86(8 << 20, 4 << 20, 4096).expect("map");
        let mut bm = DirtyBitmap::new_dirty(map.npages()).expect("bitmap");
        let mut applier = HintApplier::new(&mut bm, &map).expect("fits").recording();
        // 300 ranges (more than one batch), a reject, and a hint split at the hole.
        for i in 0..300u64 {
            applier.add(i * 4096 * 3, 4096);
        }
        applier.add(0, 0);
        applier.add((4 << 20) - 4096, 4096);
        let (out, ranges) = applier.finish_with_ranges();
        assert_eq!(out.hints, 302);
        assert_eq!(ranges.len(), 301);
        assert_eq!(ranges[..2], [(0, 1), (3, 1)]);
        assert_eq!(ranges[300], (1023, 1));
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), out.pages_hinted);
    }

    #[test]
    fn dense_sparse_and_switching_appliers_agree() {
        // 8 MiB low, 8 MiB at 4 GiB: 4096 pages, 64 words, so the dense path starts at 64 ranges.
        let map = MemoryMap::x86(16 << 20, 8 << 20, 4096).expect("map");
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        // Unaligned, whole 4 MiB blocks, some across the hole or outside RAM, overlapping.
        let hints: Vec<(u64, u64)> = (0..500)
            .map(|i| match i % 4 {
                0 => (next(8 << 20), next(300_000)),
                1 => ((4 << 30) + (next(2) << 22), 4 << 20),
                2 => ((8 << 20) - next(40_000), next(80_000)),
                _ => ((4 << 30) + next(8 << 20), next(1 << 20)),
            })
            .collect();
        let mut dirty = DirtyBitmap::new(map.npages()).expect("bitmap");
        for _ in 0..200 {
            let s = next(map.npages());
            dirty
                .set_range(s, next(100).min(map.npages() - s))
                .expect("in range");
        }
        let run = |expect: usize, chunk: usize| {
            let mut bm = dirty.try_clone().expect("clone");
            let mut out = HintOutcome::default();
            for part in hints.chunks(chunk) {
                let mut a = HintApplier::new(&mut bm, &map)
                    .expect("fits")
                    .expecting(expect);
                for &(gpa, len) in part {
                    a.add(gpa, len);
                }
                let o = a.finish();
                out.hints += o.hints;
                out.pages_hinted += o.pages_hinted;
                out.pages_cleared += o.pages_cleared;
                out.rejected.overflow += o.rejected.overflow;
                out.rejected.outside_ram += o.rejected.outside_ram;
                out.rejected.zero_length += o.rejected.zero_length;
            }
            (out, bm)
        };
        // Dense from the start; sparse until 64 ranges, then dense; sparse only (< 64 each).
        let dense = run(500, 500);
        let switching = run(0, 500);
        let sparse = run(0, 40);
        assert!(dense.0.pages_cleared > 0 && dense.0.rejected.total() > 0);
        assert_eq!(dense, switching);
        assert_eq!(dense, sparse);
    }

    #[test]
    fn apply_hints_recording_reports_what_apply_hints_clears() {
        let map = MemoryMap::x86(8 << 20, 4 << 20, 4096).expect("map");
        let hints = [
            (4096 + 1, 3 * 4096),
            (0, 0),
            ((4 << 20) - 4096, 4096),
            (1 << 32, 8192),
        ];
        let mut plain = DirtyBitmap::new_dirty(map.npages()).expect("bitmap");
        let mut recorded = DirtyBitmap::new_dirty(map.npages()).expect("bitmap");
        let out = apply_hints(&mut plain, &map, hints).expect("fits");
        let (rec_out, ranges) = apply_hints_recording(&mut recorded, &map, hints).expect("fits");
        assert_eq!(out, rec_out);
        assert_eq!(plain, recorded);
        assert_eq!(ranges, [(2, 2), (1023, 1), (1024, 2)]);
    }

    #[test]
    fn clears_only_fully_covered_pages_and_counts_rejects() {
        let map = MemoryMap::x86(8 << 20, 4 << 20, 4096).expect("map"); // 4 MiB low, 4 MiB at 4 GiB
        let mut bm = DirtyBitmap::new_dirty(map.npages()).expect("bitmap");
        let hints = [
            (4096 + 1, 3 * 4096),     // pages 2 and 3 only: start rounded up, end down
            (0, 0),                   // zero length
            (u64::MAX - 10, 20),      // overflow
            ((4 << 20) - 4096, 8192), // runs into the hole
            (1 << 32, 4096),          // first page above 4 GiB: bitmap page 1024
            (100, 200),               // covers no whole page: accepted, clears nothing
        ];
        let out = apply_hints(&mut bm, &map, hints).expect("fits");
        assert_eq!(out.hints, 6);
        assert_eq!(out.pages_hinted, 3);
        assert_eq!(out.pages_cleared, 3);
        assert_eq!(
            out.rejected,
            HintRejects {
                zero_length: 1,
                overflow: 1,
                outside_ram: 1
            }
        );
        for p in [0, 1, 4, 1023, 1025] {
            assert_eq!(bm.test(p), Ok(true), "page {p}");
        }
        for p in [2, 3, 1024] {
            assert_eq!(bm.test(p), Ok(false), "page {p}");
        }
        let small = &mut DirtyBitmap::new(10).expect("bitmap");
        assert!(apply_hints(small, &map, []).is_err());
    }
}
