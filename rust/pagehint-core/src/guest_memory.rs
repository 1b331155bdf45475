//! Guest RAM as a device sees it: a host buffer laid out by a [`MemoryMap`], which the guest
//! (a vCPU thread, or the simulator) may write while the device reads it.
//!
//! The buffer is a slice of `AtomicU8`: every access is an atomic (relaxed) byte access, so a
//! concurrent guest write is never undefined behaviour here, only a value to validate. Nothing
//! keeps a reference into guest memory: readers copy what they need out first, then check it,
//! then use the copy (no check-then-reread). Ordering between ring fields is the caller's, with
//! explicit fences, as the virtio spec describes.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::memmap::MemoryMap;

/// An access that is not entirely inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutsideRam {
    /// Guest-physical start of the access.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

impl fmt::Display for OutsideRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes at gpa {:#x} are not all guest RAM",
            self.len, self.gpa
        )
    }
}

impl std::error::Error for OutsideRam {}

/// Guest RAM: a memory map and the buffer it lays out (`map.ram_bytes()` long, or longer).
#[derive(Debug, Clone, Copy)]
pub struct GuestRam<'a> {
    map: &'a MemoryMap,
    bytes: &'a [AtomicU8],
}

impl<'a> GuestRam<'a> {
    /// Guest RAM over `bytes`; `None` if the buffer is smaller than the map's RAM.
    pub fn new(map: &'a MemoryMap, bytes: &'a [AtomicU8]) -> Option<Self> {
        (bytes.len() as u64 >= map.ram_bytes()).then_some(Self { map, bytes })
    }

    /// The memory map.
    pub const fn map(&self) -> &'a MemoryMap {
        self.map
    }

    /// Buffer byte ranges of `[gpa, gpa + len)`, region by region.
    fn spans(
        &self,
        gpa: u64,
        len: usize,
    ) -> Result<impl Iterator<Item = (usize, usize)> + 'a, OutsideRam> {
        let len64 = len as u64;
        let pieces = self
            .map
            .pieces(gpa, len64)
            .ok_or(OutsideRam { gpa, len: len64 })?;
        // Offsets are below ram_bytes <= bytes.len(), so they fit usize.
        Ok(pieces.map(|(r, g, l)| {
            let at = usize::try_from(r.offset + (g - r.gpa)).unwrap_or(usize::MAX);
            (at, usize::try_from(l).unwrap_or(usize::MAX))
        }))
    }

    /// The buffer offset of `[gpa, gpa + len)` when it lies inside one region: the case of
    /// every ring field and descriptor, looked up with one search.
    #[inline]
    fn within_region(&self, gpa: u64, len: usize) -> Option<usize> {
        let r = self.map.region_of(gpa)?;
        let end = gpa.checked_add(len as u64)?;
        (end <= r.end()).then(|| usize::try_from(r.offset + (gpa - r.gpa)).unwrap_or(usize::MAX))
    }

    /// Copies `buf.len()` bytes from guest-physical `gpa`. A zero-length read is always fine.
    #[inline]
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam> {
        if buf.is_empty() {
            return Ok(());
        }
        let n = buf.len();
        if let Some(at) = self.within_region(gpa, n) {
            for (dst, src) in buf.iter_mut().zip(&self.bytes[at..at + n]) {
                *dst = src.load(Ordering::Relaxed);
            }
            return Ok(());
        }
        let mut done = 0;
        for (at, len) in self.spans(gpa, buf.len())? {
            for (dst, src) in buf[done..done + len]
                .iter_mut()
                .zip(&self.bytes[at..at + len])
            {
                *dst = src.load(Ordering::Relaxed);
            }
            done += len;
        }
        Ok(())
    }

    /// Copies `data` to guest-physical `gpa`. A zero-length write is always fine.
    #[inline]
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), OutsideRam> {
        if data.is_empty() {
            return Ok(());
        }
        if let Some(at) = self.within_region(gpa, data.len()) {
            for (dst, src) in self.bytes[at..at + data.len()].iter().zip(data) {
                dst.store(*src, Ordering::Relaxed);
            }
            return Ok(());
        }
        let mut done = 0;
        for (at, len) in self.spans(gpa, data.len())? {
            for (dst, src) in self.bytes[at..at + len].iter().zip(&data[done..done + len]) {
                dst.store(*src, Ordering::Relaxed);
            }
            done += len;
        }
        Ok(())
    }

    /// Whether `[gpa, gpa + len)` is entirely RAM (`len > 0`, no overflow).
    #[inline]
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.map.pieces(gpa, len).is_some()
    }

    /// A little-endian `u16` at `gpa`.
    #[inline]
    pub fn read_u16(&self, gpa: u64) -> Result<u16, OutsideRam> {
        let mut b = [0; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// A little-endian `u32` at `gpa`.
    #[inline]
    pub fn read_u32(&self, gpa: u64) -> Result<u32, OutsideRam> {
        let mut b = [0; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A little-endian `u64` at `gpa`.
    #[inline]
    pub fn read_u64(&self, gpa: u64) -> Result<u64, OutsideRam> {
        let mut b = [0; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u16` at `gpa`.
    #[inline]
    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<(), OutsideRam> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Writes a little-endian `u32` at `gpa`.
    #[inline]
    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), OutsideRam> {
        self.write(gpa, &v.to_le_bytes())
    }
}

/// A zeroed buffer of atomic bytes, for tests and the simulator.
pub fn zeroed_ram(len: usize) -> Vec<AtomicU8> {
    (0..len).map(|_| AtomicU8::new(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_across_touching_regions_and_refuses_holes() {
        let map = MemoryMap::new(&[(0, 8192), (8192, 4096), (1 << 20, 4096)], 4096).expect("map");
        let buf = zeroed_ram(usize::try_from(map.ram_bytes()).expect("small"));
        let ram = GuestRam::new(&map, &buf).expect("big enough");
        ram.write(8190, &[1, 2, 3, 4]).expect("ram");
        let mut b = [0; 4];
        ram.read(8190, &mut b).expect("ram");
        assert_eq!(b, [1, 2, 3, 4]);
        ram.write_u32(1 << 20, 0xdead_beef).expect("ram");
        assert_eq!(ram.read_u32(1 << 20), Ok(0xdead_beef));
        assert_eq!(buf[12288].load(Ordering::Relaxed), 0xef);
        assert!(ram.read_u16(12287).is_err());
        assert!(ram.read_u64(u64::MAX - 3).is_err());
        assert!(GuestRam::new(&map, &buf[..100]).is_none());
    }
}
