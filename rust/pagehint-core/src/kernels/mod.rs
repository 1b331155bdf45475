//! Runtime CPU dispatch for the bitmap's bulk loops (count, clear, set, merge, search), which
//! are written once in the private `generic` module.
//!
//! Each level is the same source compiled under different target features; the level is chosen
//! once (CPU detection, or `PAGEHINT_SIMD`) and cached as a table of function pointers, the way
//! memchr caches its choice. Every level stays callable for tests that compare it with scalar.
//!
//! One kernel has a hand-written part: `take` decodes words with VBMI2's `vpcompressb` (module
//! `vbmi2`) at the avx512 level when the CPU has it, and with the generic decoder otherwise.

pub(crate) mod generic;
#[cfg(target_arch = "x86_64")]
mod vbmi2;

pub use generic::TAKE_SPARE;

use std::ops::Range;
use std::sync::OnceLock;

use crate::error::SimdError;

/// An instruction-set level for the bitmap kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// The architecture's baseline code (x86_64 SSE2; on aarch64 NEON is baseline, so this
    /// compiles to the same code as `Neon`).
    Scalar,
    /// x86_64 AVX2 with POPCNT and BMI1/2.
    Avx2,
    /// x86_64 AVX-512 F/BW/VL with VPOPCNTDQ (and VBMI2 for `take`, where present).
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Level {
    /// The name `PAGEHINT_SIMD` and `simd_level()` use.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
            Self::Neon => "neon",
        }
    }

    /// Parses a level name.
    pub fn from_name(name: &str) -> Result<Self, SimdError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(Self::Scalar),
            "avx2" => Ok(Self::Avx2),
            "avx512" => Ok(Self::Avx512),
            "neon" => Ok(Self::Neon),
            _ => Err(SimdError::UnknownLevel(name.to_owned())),
        }
    }

    /// Whether this CPU can run the level; `Err` names what it lacks.
    pub fn check(self) -> Result<(), SimdError> {
        let missing = match self {
            Self::Scalar => None,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => x86::missing_avx2(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => x86::missing_avx512(),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 | Self::Avx512 => Some("x86_64"),
            #[cfg(target_arch = "aarch64")]
            Self::Neon => None,
            #[cfg(not(target_arch = "aarch64"))]
            Self::Neon => Some("aarch64 NEON"),
        };
        missing.map_or(Ok(()), |missing| {
            Err(SimdError::Unsupported {
                level: self.name(),
                missing,
            })
        })
    }

    /// Every level this CPU can run, best last.
    pub fn available() -> Vec<Self> {
        [Self::Scalar, Self::Neon, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|l| l.check().is_ok())
            .collect()
    }

    /// The best level this CPU can run.
    pub fn detect() -> Self {
        Self::available().last().copied().unwrap_or(Self::Scalar)
    }

    /// The level `PAGEHINT_SIMD` asks for, or the detected one when it is unset or empty.
    pub fn from_env() -> Result<Self, SimdError> {
        match std::env::var("PAGEHINT_SIMD") {
            Ok(v) if !v.trim().is_empty() => {
                let level = Self::from_name(&v)?;
                level.check()?;
                Ok(level)
            }
            _ => Ok(Self::detect()),
        }
    }
}

// The tables hold `unsafe fn` pointers because a `#[target_feature]` function is only safe to
// call on a CPU that has the features; `Kernels::for_level` is the one place that checks this.
type CountFn = unsafe fn(&[u64]) -> u64;
type ModifyFn = unsafe fn(&mut [u64]) -> u64;
type MergeFn = unsafe fn(&mut [u64], &[u64]) -> u64;
type FindFn = unsafe fn(&[u64]) -> Option<usize>;
type ClearRangesFn = unsafe fn(&mut [u64], &[u64], &[u64]) -> u64;
type ClearMarkedFn = unsafe fn(&mut [u64], &[u64], usize, u32) -> u64;
type RangesBoundsFn = unsafe fn(&[u64], &[u64], u64) -> RangesBounds;
type MarkBlocksFn = unsafe fn(&mut [u64], &[u64], &[u64], Range<u64>, u32);
type TakeFn = unsafe fn(&mut [u64], u64, u64, usize, &mut Vec<u64>) -> u64;

/// Where a batch of ranges `[starts[i], starts[i] + counts[i])` lies, from one pass over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangesBounds {
    /// Every range ends inside the pages given, without overflowing.
    pub inside: bool,
    /// The lowest start (`u64::MAX` for no ranges).
    pub first: u64,
    /// The highest end (0 for no ranges); the true one when `inside`.
    pub end: u64,
    /// Every start and length ORed: its trailing zeros are the alignment they all share.
    pub align: u64,
}

/// One level's kernels. Obtainable only through [`Kernels::for_level`], which checks the CPU, so
/// holding one proves its functions may be called.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    level: Level,
    count: CountFn,
    clear_count: ModifyFn,
    set_count: ModifyFn,
    merge_count: MergeFn,
    find_nonzero: FindFn,
    find_not_full: FindFn,
    clear_ranges: ClearRangesFn,
    clear_marked: ClearMarkedFn,
    ranges_bounds: RangesBoundsFn,
    mark_blocks: MarkBlocksFn,
    take: TakeFn,
}

/// Instantiates every generic kernel inside functions compiled with `$features` (x86_64 only:
/// aarch64 runs the baseline, which is NEON already).
#[cfg(target_arch = "x86_64")]
macro_rules! instantiate {
    ($features:literal) => {
        use crate::kernels::generic;

        #[target_feature(enable = $features)]
        pub(crate) fn count(w: &[u64]) -> u64 {
            generic::count(w)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn clear_count(w: &mut [u64]) -> u64 {
            generic::clear_count(w)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn set_count(w: &mut [u64]) -> u64 {
            generic::set_count(w)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn merge_count(d: &mut [u64], l: &[u64]) -> u64 {
            generic::merge_count(d, l)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn find_nonzero(w: &[u64]) -> Option<usize> {
            generic::find_nonzero(w)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn find_not_full(w: &[u64]) -> Option<usize> {
            generic::find_not_full(w)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn clear_ranges(w: &mut [u64], s: &[u64], c: &[u64]) -> u64 {
            generic::clear_ranges(w, s, c)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn clear_marked(w: &mut [u64], marks: &[u64], first: usize, shift: u32) -> u64 {
            generic::clear_marked(w, marks, first, shift)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn ranges_bounds(
            s: &[u64],
            c: &[u64],
            npages: u64,
        ) -> crate::kernels::RangesBounds {
            generic::ranges_bounds(s, c, npages)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn mark_blocks(
            m: &mut [u64],
            s: &[u64],
            c: &[u64],
            blocks: std::ops::Range<u64>,
            page_shift: u32,
        ) {
            generic::mark_blocks(m, s, c, blocks, page_shift)
        }
        #[target_feature(enable = $features)]
        pub(crate) fn take(
            w: &mut [u64],
            start: u64,
            end: u64,
            max: usize,
            out: &mut Vec<u64>,
        ) -> u64 {
            generic::take(w, start, end, max, out)
        }
    };
}

/// Builds a table from a module made by `instantiate!` (or `generic` itself for the baseline).
macro_rules! table {
    ($level:expr, $m:path) => {{
        use $m as m;
        Kernels {
            level: $level,
            count: m::count,
            clear_count: m::clear_count,
            set_count: m::set_count,
            merge_count: m::merge_count,
            find_nonzero: m::find_nonzero,
            find_not_full: m::find_not_full,
            clear_ranges: m::clear_ranges,
            clear_marked: m::clear_marked,
            ranges_bounds: m::ranges_bounds,
            mark_blocks: m::mark_blocks,
            take: m::take,
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    pub(crate) fn missing_avx2() -> Option<&'static str> {
        if !std::arch::is_x86_feature_detected!("avx2") {
            Some("avx2")
        } else if !std::arch::is_x86_feature_detected!("popcnt") {
            Some("popcnt")
        } else if !std::arch::is_x86_feature_detected!("bmi1") {
            Some("bmi1")
        } else if !std::arch::is_x86_feature_detected!("bmi2") {
            Some("bmi2")
        } else {
            None
        }
    }

    pub(crate) fn missing_avx512() -> Option<&'static str> {
        if let Some(m) = missing_avx2() {
            Some(m)
        } else if !std::arch::is_x86_feature_detected!("avx512f") {
            Some("avx512f")
        } else if !std::arch::is_x86_feature_detected!("avx512bw") {
            Some("avx512bw")
        } else if !std::arch::is_x86_feature_detected!("avx512vl") {
            Some("avx512vl")
        } else if !std::arch::is_x86_feature_detected!("avx512vpopcntdq") {
            Some("avx512vpopcntdq")
        } else {
            None
        }
    }

    pub(super) mod avx2 {
        instantiate!("avx2,popcnt,bmi1,bmi2");
    }

    pub(super) mod avx512 {
        instantiate!("avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx2,popcnt,bmi1,bmi2");

        /// `take` with VBMI2's compress decoding the words.
        #[target_feature(
            enable = "avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx512vbmi2,avx2,popcnt,bmi1,bmi2"
        )]
        pub(crate) fn take_vbmi2(
            w: &mut [u64],
            start: u64,
            end: u64,
            max: usize,
            out: &mut Vec<u64>,
        ) -> u64 {
            // SAFETY: this function's features include VBMI2, so it runs only on a CPU with them.
            let decode = unsafe { crate::kernels::vbmi2::Vbmi2Decode::new() };
            generic::take_with(w, start, end, max, out, decode)
        }
    }

    pub(crate) fn has_vbmi2() -> bool {
        std::arch::is_x86_feature_detected!("avx512vbmi2")
    }
}

impl Kernels {
    /// The kernels of `level`, or why this CPU cannot run them.
    pub fn for_level(level: Level) -> Result<Self, SimdError> {
        level.check()?;
        Ok(match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => table!(level, x86::avx2),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                let mut k = table!(level, x86::avx512);
                if x86::has_vbmi2() {
                    k.take = x86::avx512::take_vbmi2;
                }
                k
            }
            // NEON is baseline on aarch64: the generic build already uses it.
            _ => table!(level, generic),
        })
    }

    /// The level these kernels were built for.
    pub const fn level(&self) -> Level {
        self.level
    }
}

// SAFETY (for every method below): a `Kernels` exists only via `for_level`, which returned it
// after `Level::check` confirmed the CPU has the level's target features, so calling its
// `#[target_feature]` functions is sound. Their bodies are safe code.
impl Kernels {
    /// Pages set in `words`.
    #[inline]
    pub fn count(&self, words: &[u64]) -> u64 {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.count)(words) }
    }

    /// Clears `words`, returning how many pages were set.
    #[inline]
    pub fn clear_count(&self, words: &mut [u64]) -> u64 {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.clear_count)(words) }
    }

    /// Sets `words`, returning how many pages were newly set.
    #[inline]
    pub fn set_count(&self, words: &mut [u64]) -> u64 {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.set_count)(words) }
    }

    /// ORs `log` into `dst` over their common length, returning how many pages were newly set.
    #[inline]
    pub fn merge_count(&self, dst: &mut [u64], log: &[u64]) -> u64 {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.merge_count)(dst, log) }
    }

    /// Index of the first non-zero word.
    #[inline]
    pub fn find_nonzero(&self, words: &[u64]) -> Option<usize> {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.find_nonzero)(words) }
    }

    /// Index of the first word that is not all ones.
    #[inline]
    pub fn find_not_full(&self, words: &[u64]) -> Option<usize> {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.find_not_full)(words) }
    }

    /// Clears validated ranges one after another (prefetching ahead), returning how many
    /// pages were set: the path for sparse batches (see [`crate::range_batch`]).
    #[inline]
    pub fn clear_ranges(&self, words: &mut [u64], starts: &[u64], counts: &[u64]) -> u64 {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.clear_ranges)(words, starts, counts) }
    }

    /// Clears the blocks of `1 << shift` words marked in `marks` (bit `b` of `marks[k]` is the
    /// block at word `first_word + ((64k + b) << shift)`, each inside `words`) in address order,
    /// returning how many pages were set: the sweep of dense batches (see
    /// [`crate::range_batch`]).
    #[inline]
    pub fn clear_marked(
        &self,
        words: &mut [u64],
        marks: &[u64],
        first_word: usize,
        shift: u32,
    ) -> u64 {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.clear_marked)(words, marks, first_word, shift) }
    }

    /// Where the ranges `[starts[i], starts[i] + counts[i])` (over the common length) lie
    /// against `npages` pages, `npages < 2^63`.
    #[inline]
    pub fn ranges_bounds(&self, starts: &[u64], counts: &[u64], npages: u64) -> RangesBounds {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.ranges_bounds)(starts, counts, npages) }
    }

    /// Marks in `marks` the blocks of `1 << page_shift` pages of every range (each whole
    /// blocks inside `blocks`; bit 0 of `marks` is block `blocks.start`): the dense path's
    /// marking of hints (see [`crate::range_batch`]).
    #[inline]
    pub fn mark_blocks(
        &self,
        marks: &mut [u64],
        starts: &[u64],
        counts: &[u64],
        blocks: Range<u64>,
        page_shift: u32,
    ) {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.mark_blocks)(marks, starts, counts, blocks, page_shift) }
    }

    /// Test-and-clears up to `max` set pages of `[start, end)` into `out`; returns the resume pfn.
    #[inline]
    pub fn take(
        &self,
        words: &mut [u64],
        start: u64,
        end: u64,
        max: usize,
        out: &mut Vec<u64>,
    ) -> u64 {
        // SAFETY: see the impl comment: the CPU has this table's features.
        unsafe { (self.take)(words, start, end, max, out) }
    }
}

static ACTIVE: OnceLock<Kernels> = OnceLock::new();

/// Fixes the process-wide level from `PAGEHINT_SIMD` (or detection). The first call decides;
/// later calls return the level already chosen. Fails only for a bad or unsupported request,
/// and then leaves the choice open.
pub fn init_from_env() -> Result<Level, SimdError> {
    if let Some(k) = ACTIVE.get() {
        return Ok(k.level);
    }
    let kernels = Kernels::for_level(Level::from_env()?)?;
    Ok(ACTIVE.get_or_init(|| kernels).level)
}

/// The process-wide kernels; an invalid `PAGEHINT_SIMD` that nobody checked through
/// [`init_from_env`] falls back to detection rather than failing mid-operation.
pub fn active() -> &'static Kernels {
    ACTIVE.get_or_init(|| {
        let level = Level::from_env().unwrap_or_else(|_| Level::detect());
        Kernels::for_level(level)
            .or_else(|_| Kernels::for_level(Level::Scalar))
            .unwrap_or(table!(Level::Scalar, generic))
    })
}
