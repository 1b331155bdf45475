//! Errors of the core API. Guest faults are counted elsewhere; these are API misuse by the
//! caller (the VMM or a Python prototype), and every one leaves the bitmap unchanged.

use std::fmt;

/// Why a bitmap call was refused. Each variant maps to one Python exception in the binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapError {
    /// A page or page range lies (partly) outside `[0, npages)`.
    OutOfRange {
        /// First page of the request.
        start: u64,
        /// Pages requested.
        n: u64,
        /// Pages the bitmap holds.
        npages: u64,
    },
    /// The bitmap cannot hold that many pages.
    TooLarge {
        /// Pages asked for.
        npages: u64,
        /// [`MAX_PAGES`](crate::MAX_PAGES).
        max: u64,
    },
    /// The allocator refused the words (the machine cannot back them).
    AllocationFailed {
        /// Bytes of words requested.
        bytes: u64,
    },
    /// Setting these pages would write more bitmap words at once than the machine has memory
    /// to back ([`machine_memory`](crate::words::machine_memory): RAM + swap). Refused before
    /// anything is allocated or written, where the OOM killer would otherwise end the process.
    ExceedsMemory {
        /// Pages to be set.
        pages: u64,
        /// Bytes of words that writes.
        bytes: u64,
        /// The machine's memory in bytes.
        memory: u64,
    },
    /// A [`SparseImage`](crate::bitmap::SparseImage) that does not fit the bitmap it is loaded
    /// into, or is malformed.
    BadImage {
        /// What is wrong with it.
        reason: String,
    },
    /// Two arrays that go together have different lengths.
    LengthMismatch {
        /// Length of the first array (`starts`).
        left: usize,
        /// Length of the second array (`counts`).
        right: usize,
    },
    /// A dirty log's page offset is not a multiple of 64 (KVM's own rule).
    MisalignedOffset {
        /// Bitmap page of the log's bit 0 (a memslot's first page).
        page_offset: u64,
    },
    /// A dirty log sets a bit for a page past the end of the bitmap.
    LogPastEnd {
        /// Bitmap page of the first offending bit.
        pfn: u64,
        /// Pages the bitmap holds.
        npages: u64,
    },
    /// A memory map has more pages than the bitmap it is applied to.
    MapLargerThanBitmap {
        /// Pages of RAM in the map.
        map_pages: u64,
        /// Pages the bitmap holds.
        npages: u64,
    },
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange { start, n, npages } => write!(
                f,
                "pages [{start}, {start}+{n}) are not inside the bitmap's {npages} pages"
            ),
            Self::TooLarge { npages, max } => {
                write!(f, "{npages} pages is more than the {max} a bitmap can hold")
            }
            Self::AllocationFailed { bytes } => write!(
                f,
                "could not reserve {bytes} bytes ({}) of bitmap words",
                Gib(*bytes)
            ),
            Self::ExceedsMemory {
                pages,
                bytes,
                memory,
            } => write!(
                f,
                "setting {pages} pages at once writes {bytes} bytes ({}) of bitmap words, more \
                 than this machine's {memory} bytes ({}) of memory (RAM + swap); create the \
                 bitmap clean and set only what is dirty",
                Gib(*bytes),
                Gib(*memory)
            ),
            Self::BadImage { reason } => write!(f, "not an image of this bitmap: {reason}"),
            Self::LengthMismatch { left, right } => {
                write!(f, "arrays of different lengths: {left} and {right}")
            }
            Self::MisalignedOffset { page_offset } => write!(
                f,
                "page_offset {page_offset} is not a multiple of 64 (a dirty log starts on a word)"
            ),
            Self::LogPastEnd { pfn, npages } => write!(
                f,
                "the dirty log marks page {pfn} dirty, past the bitmap's {npages} pages"
            ),
            Self::MapLargerThanBitmap { map_pages, npages } => write!(
                f,
                "the memory map has {map_pages} pages but the bitmap only {npages}"
            ),
        }
    }
}

impl std::error::Error for BitmapError {}

/// A byte count in GiB with one decimal, for messages.
struct Gib(u64);

impl fmt::Display for Gib {
    #[allow(clippy::cast_precision_loss)] // one decimal of a message
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} GiB", self.0 as f64 / f64::from(1u32 << 30))
    }
}

/// Why a `PAGEHINT_SIMD` request cannot be met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimdError {
    /// The value is not a level name this build knows.
    UnknownLevel(String),
    /// The level exists but this CPU (or architecture) lacks the instructions for it.
    Unsupported {
        /// The level asked for ([`Level::name`](crate::Level::name)).
        level: &'static str,
        /// The CPU feature (or architecture) it needs and this machine lacks.
        missing: &'static str,
    },
}

impl fmt::Display for SimdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownLevel(v) => write!(
                f,
                "PAGEHINT_SIMD={v:?} is not a level; use scalar, avx2, avx512 or neon"
            ),
            Self::Unsupported { level, missing } => {
                write!(f, "PAGEHINT_SIMD={level} but this CPU lacks {missing}")
            }
        }
    }
}

impl std::error::Error for SimdError {}
