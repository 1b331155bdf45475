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
use crate::memmap::MemoryMap;

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

/// Decoded page ranges waiting to be cleared.
struct Batch<'a> {
    words: &'a mut [u64],
    kernels: &'static kernels::Kernels,
    starts: [u64; BATCH],
    counts: [u64; BATCH],
    n: usize,
    cleared: u64,
}

impl Batch<'_> {
    fn push(&mut self, pfn: u64, pages: u64) {
        if self.n == BATCH {
            self.flush();
        }
        // Start fetching the range's bitmap lines now; it is cleared when the batch is full,
        // by when they have arrived.
        kernels::generic::prefetch_range(self.words, pfn, pages);
        self.starts[self.n] = pfn;
        self.counts[self.n] = pages;
        self.n += 1;
    }

    fn flush(&mut self) {
        // Every range lies inside the map, so inside the bitmap.
        self.cleared +=
            self.kernels
                .clear_ranges(self.words, &self.starts[..self.n], &self.counts[..self.n]);
        self.n = 0;
    }
}

/// Decodes hints into bitmap page ranges and clears them, a batch at a time.
#[derive(Debug, Default)]
pub struct HintDecoder {
    _private: (),
}

impl HintDecoder {
    /// Applies `(gpa, len)` hints to `bitmap` through `map`. Fails (changing nothing) only when
    /// the bitmap has fewer pages than the map: hints themselves are guest input, so a bad one
    /// is counted, never an error.
    pub fn apply(
        &mut self,
        bitmap: &mut DirtyBitmap,
        map: &MemoryMap,
        hints: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<HintOutcome, BitmapError> {
        if bitmap.npages() < map.npages() {
            return Err(BitmapError::MapLargerThanBitmap {
                map_pages: map.npages(),
                npages: bitmap.npages(),
            });
        }
        let mut batch = Batch {
            words: bitmap.words_mut(),
            kernels: kernels::active(),
            starts: [0; BATCH],
            counts: [0; BATCH],
            n: 0,
            cleared: 0,
        };
        let mut out = HintOutcome::default();
        let (shift, page) = (map.page_shift(), map.page_size());
        // Pages fully inside `[offset, offset + len)` of a region: regions are page aligned, so
        // rounding inside a region is rounding the hint.
        let mut add = |batch: &mut Batch<'_>, first_pfn: u64, offset: u64, len: u64| {
            let first = offset.div_ceil(page);
            let last = (offset + len) >> shift;
            if last > first {
                batch.push(first_pfn + first, last - first);
                out.pages_hinted += last - first;
            }
        };
        let mut hints_seen = 0;
        let mut rejected = HintRejects::default();
        for (gpa, len) in hints {
            hints_seen += 1;
            if len == 0 {
                rejected.zero_length += 1;
                continue;
            }
            let Some(end) = gpa.checked_add(len) else {
                // Ending exactly at 2^64 wraps nothing; it is simply not RAM (no region reaches
                // there, since a region's end must be representable).
                if gpa.wrapping_add(len) == 0 {
                    rejected.outside_ram += 1;
                } else {
                    rejected.overflow += 1;
                }
                continue;
            };
            match map.region_of(gpa) {
                // The usual case: the whole hint inside one region.
                Some(r) if end <= r.end() => add(&mut batch, r.first_pfn, gpa - r.gpa, len),
                _ => {
                    let Some(pieces) = map.pieces(gpa, len) else {
                        rejected.outside_ram += 1;
                        continue;
                    };
                    for (r, at, l) in pieces {
                        add(&mut batch, r.first_pfn, at - r.gpa, l);
                    }
                }
            }
        }
        batch.flush();
        out.hints = hints_seen;
        out.rejected = rejected;
        out.pages_cleared = batch.cleared;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clears_only_fully_covered_pages_and_counts_rejects() {
        let map = MemoryMap::x86(8 << 20, 4 << 20, 4096).expect("map"); // 4 MiB low, 4 MiB at 4 GiB
        let mut bm = DirtyBitmap::new_dirty(map.npages()).expect("bitmap");
        let mut dec = HintDecoder::default();
        let hints = [
            (4096 + 1, 3 * 4096),     // pages 2 and 3 only: start rounded up, end down
            (0, 0),                   // zero length
            (u64::MAX - 10, 20),      // overflow
            ((4 << 20) - 4096, 8192), // runs into the hole
            (1 << 32, 4096),          // first page above 4 GiB: bitmap page 1024
            (100, 200),               // covers no whole page: accepted, clears nothing
        ];
        let out = dec.apply(&mut bm, &map, hints).expect("fits");
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
        assert!(dec.apply(small, &map, []).is_err());
    }
}
