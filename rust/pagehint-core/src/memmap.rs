//! The guest memory map: which guest-physical addresses are RAM, and where each RAM region sits
//! in the dirty bitmap and in the host buffer holding guest RAM.
//!
//! Regions are numbered in the order given: region `i` covers bitmap pages (and buffer bytes)
//! right after region `i - 1`, so a map with holes (x86's PCI hole below 4 GiB) still has a
//! dense bitmap and a dense RAM buffer, as in QEMU's RAM blocks.

use std::fmt;

/// Up to this many regions, lookups scan instead of searching.
const LINEAR_REGIONS: usize = 4;

/// Largest guest page size accepted (arm64's 64 KiB granule).
pub const MAX_PAGE_SIZE: u64 = 64 << 10;

/// One RAM region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical start, page aligned.
    pub gpa: u64,
    /// Bytes, a non-zero multiple of the page size.
    pub size: u64,
    /// Bitmap page of `gpa`: the pages of all earlier regions come first.
    pub first_pfn: u64,
    /// Offset of `gpa` in the RAM buffer: the bytes of all earlier regions come first.
    pub offset: u64,
}

impl Region {
    /// One past the last guest-physical address.
    pub const fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// Why a memory map was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapError {
    /// The page size is not 4, 16 or 64 KiB.
    BadPageSize(u64),
    /// A region is empty.
    EmptyRegion {
        /// The region's position in the list given to [`MemoryMap::new`].
        index: usize,
    },
    /// A region's start or size is not a multiple of the page size.
    Unaligned {
        /// The region's position in the list given to [`MemoryMap::new`].
        index: usize,
        /// Its guest-physical start.
        gpa: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// A region runs past the top of the 64-bit address space.
    Overflow {
        /// The region's position in the list given (or the one that takes the total RAM past
        /// 2^64 bytes).
        index: usize,
    },
    /// Two regions share addresses.
    Overlap {
        /// The lower-numbered of the two regions.
        first: usize,
        /// The higher-numbered one.
        second: usize,
    },
    /// The x86 layout was asked for more RAM below 4 GiB than fits there.
    BelowFourGig {
        /// The requested RAM below 4 GiB: more than 4 GiB, or not page aligned.
        below_4g: u64,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadPageSize(p) => write!(f, "page size {p} is not 4096, 16384 or 65536"),
            Self::EmptyRegion { index } => write!(f, "region {index} is empty"),
            Self::Unaligned { index, gpa, size } => write!(
                f,
                "region {index} (gpa {gpa:#x}, size {size:#x}) is not page aligned"
            ),
            Self::Overflow { index } => write!(f, "region {index} runs past 2^64"),
            Self::Overlap { first, second } => write!(f, "regions {first} and {second} overlap"),
            Self::BelowFourGig { below_4g } => {
                write!(
                    f,
                    "below_4g {below_4g:#x} is more than 4 GiB or not page aligned"
                )
            }
        }
    }
}

impl std::error::Error for MapError {}

/// Guest RAM regions with their bitmap pages and buffer offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMap {
    regions: Vec<Region>,
    /// Region indices sorted by gpa, for lookups.
    by_gpa: Vec<usize>,
    page_shift: u32,
    npages: u64,
    ram_bytes: u64,
}

impl MemoryMap {
    /// Builds a map from `(gpa, size)` regions, in bitmap order.
    pub fn new(regions: &[(u64, u64)], page_size: u64) -> Result<Self, MapError> {
        if !matches!(page_size, 4096 | 16384 | 65536) {
            return Err(MapError::BadPageSize(page_size));
        }
        let mut out = Vec::with_capacity(regions.len());
        let mut offset = 0u64;
        for (index, &(gpa, size)) in regions.iter().enumerate() {
            if size == 0 {
                return Err(MapError::EmptyRegion { index });
            }
            if !gpa.is_multiple_of(page_size) || !size.is_multiple_of(page_size) {
                return Err(MapError::Unaligned { index, gpa, size });
            }
            if gpa.checked_add(size).is_none() {
                return Err(MapError::Overflow { index });
            }
            out.push(Region {
                gpa,
                size,
                first_pfn: offset / page_size,
                offset,
            });
            offset = offset
                .checked_add(size)
                .ok_or(MapError::Overflow { index })?;
        }
        let mut by_gpa: Vec<usize> = (0..out.len()).collect();
        by_gpa.sort_by_key(|&i| out[i].gpa);
        for pair in by_gpa.windows(2) {
            if out[pair[0]].end() > out[pair[1]].gpa {
                let (first, second) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
                return Err(MapError::Overlap { first, second });
            }
        }
        Ok(Self {
            regions: out,
            by_gpa,
            page_shift: page_size.trailing_zeros(),
            npages: offset / page_size,
            ram_bytes: offset,
        })
    }

    /// The PC layout: `below_4g` bytes of RAM from 0, the rest from 4 GiB (QEMU's pc and q35
    /// split RAM at 3 GiB or 2 GiB around the PCI hole).
    pub fn x86(ram_bytes: u64, below_4g: u64, page_size: u64) -> Result<Self, MapError> {
        const FOUR_GIG: u64 = 1 << 32;
        if below_4g > FOUR_GIG || !below_4g.is_multiple_of(page_size) {
            return Err(MapError::BelowFourGig { below_4g });
        }
        let low = ram_bytes.min(below_4g);
        let mut regions = vec![(0, low)];
        if ram_bytes > low {
            regions.push((FOUR_GIG, ram_bytes - low));
        }
        Self::new(&regions, page_size)
    }

    /// The regions, in bitmap order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Bytes per page.
    pub const fn page_size(&self) -> u64 {
        1 << self.page_shift
    }

    /// log2 of the page size.
    pub const fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// Pages of RAM: the bitmap size.
    pub const fn npages(&self) -> u64 {
        self.npages
    }

    /// Bytes of RAM: the size of the buffer holding it.
    pub const fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// The region holding `gpa`, if it is RAM. Called for every ring access and every hint:
    /// a PC guest has one to three regions, scanned directly; larger maps are searched.
    #[inline]
    pub fn region_of(&self, gpa: u64) -> Option<&Region> {
        if self.regions.len() <= LINEAR_REGIONS {
            return self.regions.iter().find(|r| r.gpa <= gpa && gpa < r.end());
        }
        // The last region starting at or below gpa is the only candidate.
        let i = self.by_gpa.partition_point(|&i| self.regions[i].gpa <= gpa);
        let r = &self.regions[*self.by_gpa.get(i.checked_sub(1)?)?];
        (gpa < r.end()).then_some(r)
    }

    /// Bitmap page of a guest-physical address.
    pub fn pfn_of(&self, gpa: u64) -> Option<u64> {
        self.region_of(gpa)
            .map(|r| r.first_pfn + ((gpa - r.gpa) >> self.page_shift))
    }

    /// Guest-physical address of a bitmap page.
    pub fn gpa_of(&self, pfn: u64) -> Option<u64> {
        let i = self
            .regions
            .partition_point(|r| r.first_pfn <= pfn)
            .checked_sub(1)?;
        let r = &self.regions[i];
        let off = (pfn - r.first_pfn).checked_shl(self.page_shift)?;
        (off < r.size).then(|| r.gpa + off)
    }

    /// Calls `f(region, gpa, len)` for each piece of `[gpa, gpa + len)` in its region, in
    /// address order; `None` (and no call) if `len` is 0, the end overflows, or any byte is not
    /// RAM. Regions that touch in guest-physical space are crossed.
    pub fn pieces(&self, gpa: u64, len: u64) -> Option<Pieces<'_>> {
        let end = gpa.checked_add(len)?;
        if len == 0 {
            return None;
        }
        let mut at = gpa;
        while at < end {
            at = self.region_of(at)?.end();
        }
        Some(Pieces {
            map: self,
            at: gpa,
            end,
        })
    }
}

/// The pieces of a RAM range, one per region it crosses: `(region, gpa, len)`.
#[derive(Debug)]
pub struct Pieces<'a> {
    map: &'a MemoryMap,
    at: u64,
    end: u64,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = (&'a Region, u64, u64);

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let r = self.map.region_of(self.at)?;
        let piece_end = r.end().min(self.end);
        let item = (r, self.at, piece_end - self.at);
        self.at = piece_end;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_layout_maps_around_the_hole() {
        let m = MemoryMap::x86(4 << 30, 2 << 30, 4096).expect("valid");
        assert_eq!(m.npages(), 1 << 20);
        assert_eq!(m.pfn_of(0), Some(0));
        assert_eq!(m.pfn_of((2 << 30) - 1), Some((1 << 19) - 1));
        assert_eq!(m.pfn_of(2 << 30), None);
        assert_eq!(m.pfn_of(4 << 30), Some(1 << 19));
        assert_eq!(m.gpa_of(1 << 19), Some(4 << 30));
        assert_eq!(m.gpa_of(1 << 20), None);
        assert!(m.pieces((2 << 30) - 4096, 8192).is_none());
        assert!(m.pieces(0, 0).is_none());
        assert!(m.pieces(u64::MAX - 10, 100).is_none());
    }

    #[test]
    fn touching_regions_are_crossed() {
        let m = MemoryMap::new(&[(1 << 20, 1 << 20), (0, 1 << 20)], 4096).expect("valid");
        let p: Vec<_> = m
            .pieces((1 << 20) - 4096, 8192)
            .expect("ram")
            .map(|(r, g, l)| (r.first_pfn, g, l))
            .collect();
        assert_eq!(p, vec![(256, (1 << 20) - 4096, 4096), (0, 1 << 20, 4096)]);
    }

    #[test]
    fn refuses_bad_maps() {
        assert_eq!(
            MemoryMap::new(&[(0, 4096)], 8192),
            Err(MapError::BadPageSize(8192))
        );
        assert!(matches!(
            MemoryMap::new(&[(0, 0)], 4096),
            Err(MapError::EmptyRegion { .. })
        ));
        assert!(matches!(
            MemoryMap::new(&[(1, 4096)], 4096),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            MemoryMap::new(&[(0, 8192), (4096, 4096)], 4096),
            Err(MapError::Overlap {
                first: 0,
                second: 1
            })
        ));
        assert!(matches!(
            MemoryMap::new(&[(u64::MAX - 4095, 8192)], 4096),
            Err(MapError::Unaligned { .. } | MapError::Overflow { .. })
        ));
    }
}
