//! The AVX-512 VBMI2 word decoder for `take`: `vpcompressb` packs the indices of a word's set
//! bits into bytes under the word itself as mask, and each 8 of them widen to 8 pfns in one
//! store, so a word costs the same whatever its pages and no branch depends on them (up to 8,
//! or 16 in a dense block).

use std::arch::x86_64::{
    __m512i, _mm_loadl_epi64, _mm512_add_epi64, _mm512_cvtepu8_epi64, _mm512_maskz_compress_epi8,
    _mm512_set1_epi64, _mm512_storeu_epi8, _mm512_storeu_epi64,
};
use std::mem::MaybeUninit;

use super::generic::{DecodeWord, TAKE_SPARE};

/// The bytes 0, 1, ..., 63: the bit indices of a word.
const INDICES: [u8; 64] = {
    let mut a = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        #[allow(clippy::cast_possible_truncation)] // i < 64
        {
            a[i] = i as u8;
        }
        i += 1;
    }
    a
};

/// A proof that this CPU has AVX-512 F/BW and VBMI2: only [`Vbmi2Decode::new`] makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Vbmi2Decode(());

impl Vbmi2Decode {
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI2.
    #[inline(always)]
    pub(crate) unsafe fn new() -> Self {
        Self(())
    }
}

// SAFETY: `decode` stores whole groups of 8 slots from `dst[0]`, at least `ceil(n / 8)` of them
// for the `n` set bits it returns, so `dst[..n]` at least is written.
unsafe impl DecodeWord for Vbmi2Decode {
    #[inline(always)]
    fn decode<const DENSE: bool>(self, w: u64, base: u64, dst: &mut [MaybeUninit<u64>]) -> usize {
        // SAFETY: `self` exists only on a CPU with AVX-512 F/BW and VBMI2 (see `new`).
        unsafe { decode::<DENSE>(w, base, dst) }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
#[inline]
fn decode<const DENSE: bool>(w: u64, base: u64, dst: &mut [MaybeUninit<u64>]) -> usize {
    let n = w.count_ones() as usize;
    let dst = &mut dst[..TAKE_SPARE];
    // SAFETY: `INDICES` is 64 readable bytes; the load has no alignment requirement.
    let indices = unsafe { std::ptr::read_unaligned(INDICES.as_ptr().cast::<__m512i>()) };
    let packed = _mm512_maskz_compress_epi8(w, indices);
    let mut bytes = [0u8; 64];
    // SAFETY: `bytes` is 64 writable bytes; the store has no alignment requirement.
    unsafe { _mm512_storeu_epi8(bytes.as_mut_ptr().cast::<i8>(), packed) };
    let base = _mm512_set1_epi64(base.cast_signed());
    // One group of 8 always (two in a dense block: 16 slots of the 64 in `dst`), more only for
    // the rarer fuller word.
    let groups = n.div_ceil(8).max(if DENSE { 2 } else { 1 });
    for g in 0..groups {
        let (src, slots) = (&bytes[8 * g..8 * g + 8], &mut dst[8 * g..8 * g + 8]);
        // SAFETY: `src` is 8 readable bytes; the load has no alignment requirement.
        let eight = unsafe { _mm_loadl_epi64(src.as_ptr().cast()) };
        let pfns = _mm512_add_epi64(_mm512_cvtepu8_epi64(eight), base);
        // SAFETY: `slots` is 8 writable `MaybeUninit<u64>` (u64's layout), 64 bytes; the store
        // has no alignment requirement.
        unsafe { _mm512_storeu_epi64(slots.as_mut_ptr().cast::<i64>(), pfns) };
    }
    n
}
