//! Guest RAM as a device sees it: a host buffer laid out by a [`MemoryMap`], which the guest
//! (a vCPU thread, or the simulator) may write while the device reads it.
//!
//! The buffer is a slice of `AtomicU8`: every access is atomic (relaxed), so a concurrent guest
//! write is never undefined behaviour here, only a value to validate. Byte strings go byte by
//! byte; an aligned ring field (`read_u16` .. `write_u64`) is one atomic access of its size, as
//! QEMU and Linux access them, which also spares the byte-wise copy's store-forwarding stall.
//! Nothing keeps a reference into guest memory: readers copy what they need out first, then
//! check it, then use the copy (no check-then-reread). Ordering between ring fields is the
//! caller's, with explicit fences, as the virtio spec describes.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU32, AtomicU64, Ordering};

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

    /// The bytes of `[gpa, gpa + len)` when they lie inside one region.
    #[inline]
    fn region_bytes(&self, gpa: u64, len: usize) -> Option<&'a [AtomicU8]> {
        let at = self.within_region(gpa, len)?;
        self.bytes.get(at..at.checked_add(len)?)
    }

    /// `N` consecutive little-endian `u64`s from `gpa`, each one atomic load when aligned (a
    /// split ring descriptor is `[addr, len | flags << 32 | next << 48]`).
    #[inline]
    pub fn read_u64s<const N: usize>(&self, gpa: u64) -> Result<[u64; N], OutsideRam> {
        let mut out = [0u64; N];
        if let Some(bytes) = self.region_bytes(gpa, 8 * N) {
            for (w, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *w = u64::load_le(b);
            }
        } else {
            // Across regions (or not RAM): checked whole, then one word at a time.
            let len = 8 * N as u64;
            if !self.contains(gpa, len) {
                return Err(OutsideRam { gpa, len });
            }
            for (i, w) in (0u64..).zip(out.iter_mut()) {
                *w = self.read_u64(gpa + 8 * i)?;
            }
        }
        Ok(out)
    }

    /// Writes `N` consecutive little-endian `u32`s at `gpa`, each one atomic store when
    /// aligned (a used element is `[id, len]`). Writes nothing unless all of it is RAM.
    #[inline]
    pub fn write_u32s<const N: usize>(&self, gpa: u64, words: [u32; N]) -> Result<(), OutsideRam> {
        if let Some(bytes) = self.region_bytes(gpa, 4 * N) {
            for (w, b) in words.into_iter().zip(bytes.chunks_exact(4)) {
                w.store_le(b);
            }
            return Ok(());
        }
        // Across regions (or not RAM): checked whole, then one word at a time.
        let len = 4 * N as u64;
        if !self.contains(gpa, len) {
            return Err(OutsideRam { gpa, len });
        }
        (0u64..)
            .zip(words)
            .try_for_each(|(i, w)| self.write_u32(gpa + 4 * i, w))
    }
}

/// A fixed guest-physical range, such as a ring, resolved once for many accesses at offsets
/// into it: when its bytes are one run of the buffer (it lies in one region), an access is a
/// bounds check and a load; otherwise each access goes through [`GuestRam`] by address, looked
/// up and checked as any other.
#[derive(Debug, Clone, Copy)]
pub struct RamArea<'a> {
    ram: GuestRam<'a>,
    gpa: u64,
    bytes: Option<&'a [AtomicU8]>,
}

impl<'a> GuestRam<'a> {
    /// `[gpa, gpa + len)` resolved for repeated accesses (see [`RamArea`]). Never fails: a range
    /// that is not all RAM fails at each access instead.
    #[inline]
    pub fn area(&self, gpa: u64, len: u64) -> RamArea<'a> {
        let bytes = usize::try_from(len)
            .ok()
            .and_then(|n| self.region_bytes(gpa, n));
        RamArea {
            ram: *self,
            gpa,
            bytes,
        }
    }
}

impl RamArea<'_> {
    /// The `n` bytes at `offset`, when the area is resolved and holds them.
    #[inline]
    fn bytes_at(&self, offset: u64, n: usize) -> Option<&[AtomicU8]> {
        let at = usize::try_from(offset).ok()?;
        self.bytes?.get(at..at.checked_add(n)?)
    }

    /// `access` of guest RAM at the address of `offset`: the way of an area that is not one
    /// run of the buffer, kept out of line so the resolved way stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn by_gpa<T>(
        &self,
        offset: u64,
        access: impl FnOnce(&GuestRam<'_>, u64) -> Result<T, OutsideRam>,
    ) -> Result<T, OutsideRam> {
        let gpa = self.gpa.checked_add(offset).ok_or(OutsideRam {
            gpa: self.gpa,
            len: offset,
        })?;
        access(&self.ram, gpa)
    }

    /// [`GuestRam::read_u16`] at `offset`.
    #[inline]
    pub fn read_u16(&self, offset: u64) -> Result<u16, OutsideRam> {
        match self.bytes_at(offset, 2) {
            Some(b) => Ok(u16::load_le(b)),
            None => self.by_gpa(offset, |ram, gpa| ram.read_u16(gpa)),
        }
    }

    /// [`GuestRam::write_u16`] at `offset`.
    #[inline]
    pub fn write_u16(&self, offset: u64, v: u16) -> Result<(), OutsideRam> {
        match self.bytes_at(offset, 2) {
            Some(b) => {
                v.store_le(b);
                Ok(())
            }
            None => self.by_gpa(offset, |ram, gpa| ram.write_u16(gpa, v)),
        }
    }

    /// [`GuestRam::read_u64s`] at `offset`.
    #[inline]
    pub fn read_u64s<const N: usize>(&self, offset: u64) -> Result<[u64; N], OutsideRam> {
        match self.bytes_at(offset, 8 * N) {
            Some(b) => {
                let mut out = [0u64; N];
                for (w, b) in out.iter_mut().zip(b.chunks_exact(8)) {
                    *w = u64::load_le(b);
                }
                Ok(out)
            }
            None => self.by_gpa(offset, |ram, gpa| ram.read_u64s(gpa)),
        }
    }

    /// [`GuestRam::write_u32s`] at `offset`.
    #[inline]
    pub fn write_u32s<const N: usize>(
        &self,
        offset: u64,
        words: [u32; N],
    ) -> Result<(), OutsideRam> {
        match self.bytes_at(offset, 4 * N) {
            Some(b) => {
                for (w, b) in words.into_iter().zip(b.chunks_exact(4)) {
                    w.store_le(b);
                }
                Ok(())
            }
            None => self.by_gpa(offset, |ram, gpa| ram.write_u32s(gpa, words)),
        }
    }
}

/// A ring field's integer type: loaded and stored as one atomic access of its size when its
/// host address is aligned, byte by byte otherwise.
trait Word: Sized {
    /// Little-endian value of `b` (`size_of::<Self>()` bytes).
    fn load_le(b: &[AtomicU8]) -> Self;
    /// Stores `self` little-endian into `b` (`size_of::<Self>()` bytes).
    fn store_le(self, b: &[AtomicU8]);
}

macro_rules! word {
    ($t:ty, $atomic:ty) => {
        impl Word for $t {
            #[inline]
            fn load_le(b: &[AtomicU8]) -> Self {
                let p = b.as_ptr().cast::<$atomic>();
                if b.len() == size_of::<Self>() && p.is_aligned() {
                    // SAFETY: `p` points to `b`'s `size_of::<Self>()` bytes, which outlive the
                    // borrow, and is aligned for `$atomic`, which has the size of `Self` and
                    // the in-memory representation of the `AtomicU8`s it covers. The only
                    // writer racing with it is the guest: a vCPU or another process, outside
                    // the Rust abstract machine, whose stores the hardware keeps single-copy
                    // atomic per aligned word (this crate's simulated guest runs on the
                    // device's thread, so it never races). Rust's model leaves racing atomics
                    // of mixed sizes undefined; the readers access each ring field with its
                    // own width only.
                    let word = unsafe { &*p };
                    return <$t>::from_le(word.load(Ordering::Relaxed));
                }
                let mut v = [0u8; size_of::<Self>()];
                for (d, s) in v.iter_mut().zip(b) {
                    *d = s.load(Ordering::Relaxed);
                }
                <$t>::from_le_bytes(v)
            }

            #[inline]
            fn store_le(self, b: &[AtomicU8]) {
                let p = b.as_ptr().cast::<$atomic>();
                if b.len() == size_of::<Self>() && p.is_aligned() {
                    // SAFETY: as in `load_le`.
                    let word = unsafe { &*p };
                    word.store(self.to_le(), Ordering::Relaxed);
                    return;
                }
                for (d, s) in b.iter().zip(self.to_le_bytes()) {
                    d.store(s, Ordering::Relaxed);
                }
            }
        }
    };
}

word!(u16, AtomicU16);
word!(u32, AtomicU32);
word!(u64, AtomicU64);

macro_rules! word_access {
    ($t:ty, $read:ident, $write:ident) => {
        impl GuestRam<'_> {
            #[doc = concat!("A little-endian `", stringify!($t), "` at `gpa`.")]
            #[inline]
            pub fn $read(&self, gpa: u64) -> Result<$t, OutsideRam> {
                if let Some(b) = self.region_bytes(gpa, size_of::<$t>()) {
                    return Ok(<$t>::load_le(b));
                }
                let mut b = [0; size_of::<$t>()];
                self.read(gpa, &mut b)?;
                Ok(<$t>::from_le_bytes(b))
            }

            #[doc = concat!("Writes a little-endian `", stringify!($t), "` at `gpa`.")]
            #[inline]
            pub fn $write(&self, gpa: u64, v: $t) -> Result<(), OutsideRam> {
                if let Some(b) = self.region_bytes(gpa, size_of::<$t>()) {
                    v.store_le(b);
                    return Ok(());
                }
                self.write(gpa, &v.to_le_bytes())
            }
        }
    };
}

word_access!(u16, read_u16, write_u16);
word_access!(u32, read_u32, write_u32);
word_access!(u64, read_u64, write_u64);

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

    /// Word accesses, aligned or not, inside a region or across touching regions that are
    /// apart in the buffer, agree with byte-wise copies; outside RAM they fail and write
    /// nothing.
    #[test]
    fn word_accesses_agree_with_byte_copies_at_every_offset() {
        // gpa 0x1000.. is buffer offset 0, gpa 0.. is offset 0x1000; then a hole.
        let map = MemoryMap::new(&[(0x1000, 0x1000), (0, 0x1000)], 4096).expect("map");
        let buf = zeroed_ram(0x2000);
        let ram = GuestRam::new(&map, &buf).expect("big enough");
        let pattern: Vec<u8> = (0..0x2000u32)
            .map(|i| (i * 7 + i / 256).to_le_bytes()[0])
            .collect();
        ram.write(0, &pattern).expect("ram");
        let bytes_at = |gpa: u64, n: usize| {
            let mut b = vec![0; n];
            ram.read(gpa, &mut b).map(|()| b)
        };
        for gpa in (0xfe0..0x1020).chain(0x1fe0..0x2000) {
            let le = |n| {
                bytes_at(gpa, n).map(|b| b.iter().rev().fold(0u64, |a, &x| a << 8 | u64::from(x)))
            };
            assert_eq!(ram.read_u16(gpa).map(u64::from), le(2), "{gpa:#x}");
            assert_eq!(ram.read_u32(gpa).map(u64::from), le(4), "{gpa:#x}");
            assert_eq!(ram.read_u64(gpa), le(8), "{gpa:#x}");
            let two = bytes_at(gpa, 16).map(|b| {
                [0, 8].map(|o| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes")))
            });
            assert_eq!(ram.read_u64s::<2>(gpa), two, "{gpa:#x}");
            assert_eq!(
                ram.area(gpa - 0x10, 0x40).read_u64s::<2>(0x10),
                two,
                "{gpa:#x}"
            );
            assert_eq!(
                ram.area(gpa - 0x10, 0x40).read_u16(0x10).map(u64::from),
                le(2),
                "{gpa:#x}"
            );
        }
        for gpa in (0xff0..0x1010).chain(0x1ff0..0x2000) {
            let before = bytes_at(0, 0x2000).expect("ram");
            let got = ram.write_u32s(gpa, [0x0403_0201, 0x0807_0605]);
            let after = bytes_at(0, 0x2000).expect("ram");
            let g = usize::try_from(gpa).expect("small");
            if gpa + 8 <= 0x2000 {
                assert_eq!(got, Ok(()));
                assert_eq!(after[g..g + 8], [1, 2, 3, 4, 5, 6, 7, 8], "{gpa:#x}");
                assert_eq!(
                    (&after[..g], &after[g + 8..]),
                    (&before[..g], &before[g + 8..])
                );
            } else {
                assert!(got.is_err());
                assert_eq!(after, before, "{gpa:#x}");
            }
            ram.area(gpa, 4).write_u16(0, 0xbeef).ok();
            assert_eq!(
                ram.read_u16(gpa).ok(),
                (gpa + 2 <= 0x2000).then_some(0xbeef)
            );
        }
        assert!(ram.read_u64s::<2>(u64::MAX - 8).is_err());
        assert!(ram.area(0x1ff8, 8).read_u64s::<2>(0).is_err());
        assert!(ram.area(u64::MAX, 8).read_u16(2).is_err());
    }
}
