//! Splitting a page range into the words that hold it: a masked head word, whole words, and a
//! masked tail word. Every range operation of the bitmap goes through here, so the mask
//! arithmetic exists once.

use std::ops::Range;

/// Bits per bitmap word (KVM's dirty log and QEMU's migration bitmap use 64-bit words).
pub const WORD_BITS: u64 = 64;

/// The words covering pages `[start, end)`, `start < end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// A partly covered first word and the mask of covered bits in it.
    pub head: Option<(usize, u64)>,
    /// Fully covered words.
    pub body: Range<usize>,
    /// A partly covered last word and its mask (never the same word as `head`).
    pub tail: Option<(usize, u64)>,
}

/// Word index of a page. Callers have checked `pfn < npages`, and a bitmap's word count fits in
/// `usize`, so the quotient does too.
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
pub const fn word_of(pfn: u64) -> usize {
    (pfn / WORD_BITS) as usize
}

/// Bit position of a page inside its word.
#[inline(always)]
pub const fn bit_of(pfn: u64) -> u64 {
    1u64 << (pfn % WORD_BITS)
}

/// Mask of bits `[lo, hi)` of one word, `lo < hi <= 64`.
#[inline(always)]
pub const fn bits_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= WORD_BITS {
        u64::MAX
    } else {
        (1u64 << hi) - 1
    };
    upper & !((1u64 << lo) - 1)
}

/// Splits `[start, end)`; an empty range gives an empty span.
#[inline(always)]
pub fn span(start: u64, end: u64) -> Span {
    if start >= end {
        return Span {
            head: None,
            body: 0..0,
            tail: None,
        };
    }
    let first = word_of(start);
    let last = word_of(end - 1);
    let lo = start % WORD_BITS;
    let hi = (end - 1) % WORD_BITS + 1;
    if first == last {
        let mask = bits_mask(lo, hi);
        return if mask == u64::MAX {
            Span {
                head: None,
                body: first..first + 1,
                tail: None,
            }
        } else {
            Span {
                head: Some((first, mask)),
                body: first + 1..first + 1,
                tail: None,
            }
        };
    }
    let (head, body_start) = if lo == 0 {
        (None, first)
    } else {
        (Some((first, bits_mask(lo, WORD_BITS))), first + 1)
    };
    let (tail, body_end) = if hi == WORD_BITS {
        (None, last + 1)
    } else {
        (Some((last, bits_mask(0, hi))), last)
    };
    Span {
        head,
        body: body_start..body_end,
        tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(s: &Span) -> Vec<u64> {
        let mut pages = Vec::new();
        let mut push_mask = |w: usize, m: u64| {
            for b in 0..64 {
                if m >> b & 1 == 1 {
                    pages.push(w as u64 * 64 + b);
                }
            }
        };
        if let Some((w, m)) = s.head {
            push_mask(w, m);
        }
        for w in s.body.clone() {
            push_mask(w, u64::MAX);
        }
        if let Some((w, m)) = s.tail {
            push_mask(w, m);
        }
        pages
    }

    #[test]
    fn span_covers_exactly_the_range() {
        for start in 0..200u64 {
            for len in 0..200u64 {
                let s = span(start, start + len);
                assert_eq!(
                    covered(&s),
                    (start..start + len).collect::<Vec<_>>(),
                    "{start}+{len}"
                );
            }
        }
    }
}
