//! `SplitQueue` over guest RAM filled with fuzz bytes.
//!
//! Guest RAM is 16 KiB in two 8 KiB regions with a hole between them, listed high region
//! first so buffer offsets differ from guest addresses: RAM `[0, 0x2000)` and
//! `[0x4000, 0x6000)`, hole `[0x2000, 0x4000)`. A short header picks the queue size, EVENT_IDX,
//! where the three rings go (packed at 0, split across the hole, or anywhere), the starting
//! indices, the layout buffers are checked against, and a second round of driver writes; the
//! rest of the input is the RAM contents, in address order from gpa 0 (so in the packed layout
//! the descriptor table is the first bytes after the header).
//!
//! Checked:
//! - `SplitQueue::new` accepts exactly the valid configurations (size, alignment, rings in RAM);
//! - every drain terminates: at most `size` elements per read of the available index, and a
//!   hard cap on `pop` calls per drain;
//! - every accepted element has 1 to `2 * size` buffers, each non-empty and entirely RAM in the
//!   layout (checked naively, in u128), readable ones first, total length within u32;
//! - each element's result (buffers, or the reason it was refused) equals a reference walk of
//!   the descriptor chain written from the rules in `virtq/split.rs`'s documentation, whenever
//!   the queue's own ring writes cannot have changed what it read;
//! - rejected elements are counted by reason and returned with length 0; `add_used` writes
//!   exactly the used element and index; a broken queue stays broken and returns nothing;
//! - `drain_hints` over the same ring stops within its element budget.
#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use pagehint_core::free_page::drain_hints;
use pagehint_core::test_utils::{SplitRing, TestRam, write_split_desc};
use pagehint_core::virtq::{
    Chain, Desc, QueueError, SplitQueue, VIRTQ_DESC_F_INDIRECT as INDIRECT,
    VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as WRITE,
};
use pagehint_core::{DirtyBitmap, GuestRam, HintApplier, MemoryMap};

const PAGE: u64 = 4096;
/// Guest RAM, in bitmap (buffer) order: the high region first.
const RAM_REGIONS: [(u64, u64); 2] = [(0x4000, 0x2000), (0, 0x2000)];
const RAM_TOP: u64 = 0x6000;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

/// `[gpa, gpa + len)` is non-empty and entirely inside the union of `regions` (u128, no
/// wrap-around).
fn in_regions(regions: &[(u64, u64)], gpa: u64, len: u64) -> bool {
    let (mut at, end) = (u128::from(gpa), u128::from(gpa) + u128::from(len));
    if len == 0 || end > u128::from(u64::MAX) + 1 {
        return false;
    }
    while at < end {
        match regions
            .iter()
            .map(|&(g, s)| (u128::from(g), u128::from(g) + u128::from(s)))
            .find(|&(g, e)| g <= at && at < e)
        {
            Some((_, e)) => at = e,
            None => return false,
        }
    }
    true
}

/// What the reference walk says about one element.
#[derive(Debug, PartialEq, Eq)]
enum Walk {
    Ok(Vec<Desc>),
    Element(&'static str),
    /// A descriptor of the main table could not be read: the queue breaks.
    QueueBreak,
}

/// The chain at `head`, walked from the documented rules. `reads` gets every byte range read.
fn reference_walk(
    ram: &GuestRam<'_>,
    layout: &[(u64, u64)],
    desc_gpa: u64,
    size: u16,
    head: u16,
    reads: &mut Vec<(u64, u64)>,
) -> Walk {
    let (mut table, mut entries, mut indirect) = (desc_gpa, u32::from(size), false);
    let (mut index, mut followed) = (u32::from(head), 0u32);
    let mut descs: Vec<Desc> = Vec::new();
    let mut total = 0u64;
    loop {
        // A chain may follow at most as many descriptors as its table holds.
        followed += 1;
        if followed > entries {
            return Walk::Element("chain_too_long");
        }
        let at = table + 16 * u64::from(index);
        let mut b = [0u8; 16];
        reads.push((at, 16));
        if !in_regions(&RAM_REGIONS, at, 16) || ram.read(at, &mut b).is_err() {
            return if indirect {
                Walk::Element("indirect_outside_ram")
            } else {
                Walk::QueueBreak
            };
        }
        let addr = u64::from_le_bytes(b[..8].try_into().expect("8"));
        let len = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        let flags = u16::from_le_bytes([b[12], b[13]]);
        let next = u16::from_le_bytes([b[14], b[15]]);
        if flags & INDIRECT != 0 {
            if indirect {
                return Walk::Element("nested_indirect");
            }
            if flags & NEXT != 0 {
                return Walk::Element("indirect_with_next");
            }
            if len == 0 {
                return Walk::Element("indirect_empty");
            }
            if len % 16 != 0 {
                return Walk::Element("indirect_len_not_multiple");
            }
            if len / 16 > u32::from(size) {
                return Walk::Element("indirect_too_large");
            }
            if !in_regions(&RAM_REGIONS, addr, u64::from(len)) {
                return Walk::Element("indirect_outside_ram");
            }
            (table, entries, indirect, index, followed) = (addr, len / 16, true, 0, 0);
            continue;
        }
        if len == 0 {
            return Walk::Element("zero_length_buffer");
        }
        if !in_regions(layout, addr, u64::from(len)) {
            return Walk::Element("buffer_outside_ram");
        }
        let writable = flags & WRITE != 0;
        if !writable && descs.iter().any(|d| d.writable) {
            return Walk::Element("readable_after_writable");
        }
        total += u64::from(len);
        if total > u64::from(u32::MAX) {
            return Walk::Element("length_overflow");
        }
        descs.push(Desc {
            addr,
            len,
            writable,
        });
        if flags & NEXT == 0 {
            return Walk::Ok(descs);
        }
        if u32::from(next) >= entries {
            return Walk::Element("next_out_of_range");
        }
        index = u32::from(next);
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    let (a0, a1) = (u128::from(a.0), u128::from(a.0) + u128::from(a.1));
    let (b0, b1) = (u128::from(b.0), u128::from(b.0) + u128::from(b.1));
    a0 < b1 && b0 < a1
}

struct Setup {
    size: u16,
    event_idx: bool,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    inflight: u16,
    layout: Vec<(u64, u64)>,
    /// Second round: (gpa, value) u16 pokes, then the available index moves by `bump`.
    pokes: Vec<(u64, u16)>,
    bump: u16,
    used_lens: Vec<u32>,
}

impl Setup {
    /// The rings as the driver writes them.
    const fn ring(&self) -> SplitRing {
        SplitRing {
            size: self.size,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }
}

fn setup(u: &mut Unstructured<'_>) -> Result<Setup> {
    let size: u16 = if u.ratio(1, 32)? {
        u.arbitrary()?
    } else {
        1 << u.int_in_range(0..=8u8)?
    };
    let n = u64::from(size);
    let (desc, avail, used) = match u.int_in_range(0..=7u8)? {
        // Packed from 0, as a driver lays out a legacy-style ring.
        0..=3 => {
            let avail = 16 * n;
            (0, avail, (avail + 6 + 2 * n).next_multiple_of(4))
        }
        // Descriptors low, rings above the hole.
        4 | 5 => (0, 0x4000, 0x5000),
        // Anywhere near RAM, any alignment.
        6 => (
            u.int_in_range(0..=RAM_TOP + 0x100)?,
            u.int_in_range(0..=RAM_TOP + 0x100)?,
            u.int_in_range(0..=RAM_TOP + 0x100)?,
        ),
        _ => (u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
    };
    let last_avail = match u.int_in_range(0..=3u8)? {
        0 => 0,
        1 => u16::MAX - u.int_in_range(0..=3u16)?,
        _ => u.arbitrary()?,
    };
    // Elements the device already holds (restored after migration): used trails avail by
    // 0..=size, QEMU's rule on load (last_avail - used_idx <= size), which `set_indices`
    // enforces; sometimes try an index pair outside it (used ahead, or too far behind).
    let inflight = match u.int_in_range(0..=7u8)? {
        0 | 1 => u.int_in_range(0..=size)?,
        2 => u.arbitrary()?,
        _ => 0,
    };
    let layout = match u.int_in_range(0..=5u8)? {
        0 => vec![(0, 0x1000)],
        1 => vec![(0, 0x2000), (0x4000, 0x2000), (0x1_0000, 0x1_0000)],
        2 => vec![(0, 8 << 30)],
        3 => vec![(u64::MAX - 0xfff - 0xffff_f000, 0xffff_f000)],
        _ => RAM_REGIONS.to_vec(),
    };
    let mut pokes = Vec::new();
    for _ in 0..u.int_in_range(0..=4u8)? {
        pokes.push((u.int_in_range(0..=RAM_TOP)?, u.arbitrary()?));
    }
    let bump = if u.arbitrary()? {
        u.int_in_range(0..=size.saturating_add(1))?
    } else {
        0
    };
    let mut used_lens = Vec::new();
    for _ in 0..u.int_in_range(0..=3u8)? {
        used_lens.push(u.arbitrary()?);
    }
    Ok(Setup {
        size,
        event_idx: u.arbitrary()?,
        desc,
        avail,
        used,
        last_avail,
        inflight,
        layout,
        pokes,
        bump,
        used_lens,
    })
}

/// Writes descriptor chains and available-ring entries from compact specs instead of raw
/// bytes, so that long chains, indirect tables and buffers at region edges are reached quickly:
/// each table (the queue's and two indirect-table spots) gets a run of descriptors chained
/// `i -> i + 1`, readable then writable, with occasional wrong flags, `next` indices and
/// indirect descriptors; addresses are picked from RAM edges, the hole and 2^64, lengths from
/// a few shapes.
fn structured(u: &mut Unstructured<'_>, ram: &GuestRam<'_>, s: &Setup) -> Result<()> {
    const TABLES: [u64; 2] = [0x1800, 0x5800];
    const ANCHORS: [u64; 12] = [
        0x1000,
        0x1800,
        0x4000,
        0x5800,
        0,
        0x1ff8,
        0x2000,
        0x3ff8,
        0x5ff0,
        0x6000,
        0x1_0000,
        u64::MAX - 7,
    ];
    let limit = s.size.clamp(1, 32);
    for table in [s.desc, TABLES[0], TABLES[1]] {
        let k = u.int_in_range(0..=limit)?;
        let writable_from = u.int_in_range(0..=k)?;
        for i in 0..k {
            let mut flags = 0u16;
            if i + 1 < k {
                flags |= NEXT;
            }
            if i >= writable_from {
                flags |= WRITE;
            }
            let (mut addr, mut len): (u64, u32);
            if u.ratio(1, 8)? {
                // An indirect table: at one of the two spots, mostly a sane length.
                flags = (flags & !NEXT) | INDIRECT;
                addr = *u.choose(&TABLES)?;
                len = 16 * u32::from(u.int_in_range(0..=limit)?);
            } else {
                addr = if u.ratio(3, 4)? {
                    *u.choose(&ANCHORS[..5])?
                } else {
                    *u.choose(&ANCHORS)?
                };
                addr = addr.wrapping_add(16 * u64::from(u.int_in_range(0..=15u8)?));
                len = match u.int_in_range(0..=7u8)? {
                    0 => 0,
                    1 => 0x1000,
                    2 => u32::MAX - u.int_in_range(0..=1u32)?,
                    3 => u.arbitrary()?,
                    _ => u.int_in_range(1..=64u32)?,
                };
            }
            if u.ratio(1, 16)? {
                flags ^= u16::from(u.int_in_range(1..=7u8)?);
            }
            if u.ratio(1, 64)? {
                (addr, len, flags) = (u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
            }
            let next = if u.ratio(7, 8)? {
                i + 1
            } else {
                u.int_in_range(0..=limit.saturating_add(1))?
            };
            // (The configuration is not validated yet: the writer wraps rather than overflows.)
            let _ = write_split_desc(ram, table, i, addr, len, flags, next);
        }
    }
    let pending = if u.ratio(1, 16)? {
        u.arbitrary()?
    } else {
        u.int_in_range(0..=s.size.saturating_add(1))?
    };
    let ring = s.ring();
    for k in 0..pending.min(s.size) {
        let head = if u.ratio(1, 32)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=limit.saturating_sub(1))?
        };
        let _ = ring.set_avail_head(ram, s.last_avail.wrapping_add(k), head);
    }
    let _ = ring.set_avail_idx(ram, s.last_avail.wrapping_add(pending));
    Ok(())
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let s = setup(u)?;
    let mem = TestRam::new(&RAM_REGIONS, PAGE).expect("valid map");
    let layout_map = MemoryMap::new(&s.layout, PAGE).expect("valid layout");
    let ram = mem.ram();
    let ring = s.ring();
    if u.arbitrary()? {
        structured(u, &ram, &s)?;
    } else {
        let bytes = u.bytes(u.len())?;
        let (low, high) = bytes.split_at(bytes.len().min(0x2000));
        ram.write(0, low).expect("low region");
        ram.write(0x4000, &high[..high.len().min(0x2000)])
            .expect("high region");
    }

    let n = u64::from(s.size);
    let rings = [
        (s.desc, 16, 16 * n),
        (s.avail, 2, 6 + 2 * n),
        (s.used, 4, 6 + 8 * n),
    ];
    let valid = s.size != 0
        && s.size <= 32768
        && s.size.is_power_of_two()
        && rings.iter().all(|&(g, a, _)| g % a == 0)
        && rings
            .iter()
            .all(|&(g, _, l)| in_regions(&RAM_REGIONS, g, l))
        // The used ring may not share bytes with what the device reads.
        && rings[..2]
            .iter()
            .all(|&(g, _, l)| s.used + 6 + 8 * n <= g || g + l <= s.used);
    let q = SplitQueue::new(&ram, s.size, s.desc, s.avail, s.used, s.event_idx);
    assert_eq!(
        q.is_ok(),
        valid,
        "SplitQueue::new(size {}, {:#x?}) = {q:?}",
        s.size,
        rings
    );
    let Ok(mut q) = q else { return Ok(()) };
    // With EVENT_IDX the queue writes avail_event (2 bytes after the used ring's elements)
    // before it walks the chain; a reference walk made before `pop` is only comparable when
    // that write cannot touch what the walk read.
    let avail_event = (s.used + 4 + 8 * n, 2);

    let next_used0 = s.last_avail.wrapping_sub(s.inflight);
    let consistent = s.inflight <= s.size;
    assert_eq!(
        q.set_indices(s.last_avail, next_used0).is_ok(),
        consistent,
        "set_indices({}, {next_used0}) with size {}",
        s.last_avail,
        s.size
    );
    if !consistent {
        return Ok(());
    }
    ring.set_used_idx(&ram, next_used0).expect("ring in RAM");

    let mut chain = Chain::new();
    let mut held: Vec<u16> = Vec::new();
    let mut rejected = 0u64;
    for round in 0..2 {
        if round == 1 {
            for &(gpa, v) in &s.pokes {
                let _ = ram.write_u16(gpa, v);
            }
            if s.bump != 0 {
                let idx = ring.avail_idx(&ram).expect("ring in RAM");
                ring.set_avail_idx(&ram, idx.wrapping_add(s.bump))
                    .expect("ring in RAM");
            }
        }
        // Pending elements are re-read only after the previous batch is consumed, and each
        // batch is at most `size`; the queue's own ring writes (rings may overlap) can
        // republish a few more, but never without bound.
        let cap = 8 * usize::from(s.size) + 16;
        let mut pops = 0usize;
        loop {
            pops += 1;
            assert!(
                pops <= cap,
                "pop did not stop after {cap} calls (size {})",
                s.size
            );
            let broken_before = q.is_broken();
            let last_avail = q.last_avail();
            let next_used = q.next_used();
            let counts_before = *q.counts();
            // The reference walk, from the head the queue will take (if it takes one now).
            let pending = ring
                .avail_idx(&ram)
                .map(|i| i.wrapping_sub(last_avail))
                .unwrap_or(0);
            let head = ring.avail_head(&ram, last_avail).ok();
            let mut reads = Vec::new();
            let want = head
                .filter(|&h| h < s.size)
                .map(|h| reference_walk(&ram, &s.layout, s.desc, s.size, h, &mut reads));
            let comparable = !s.event_idx || !reads.iter().any(|&r| overlaps(r, avail_event));

            let got = q.pop_with_layout(&ram, &layout_map, &mut chain);
            if broken_before {
                assert!(got.is_none(), "a broken queue returned an element");
            }
            match got {
                // Nothing available, or the queue broke: checked below.
                None => {}
                Some(Ok(h)) => {
                    assert!(h < s.size);
                    assert_eq!(Some(h), head, "head");
                    assert_eq!(q.last_avail(), last_avail.wrapping_add(1));
                    assert_eq!(q.next_used(), next_used);
                    assert_eq!(q.counts(), &counts_before);
                    check_chain(&chain, &s, &s.layout);
                    if comparable {
                        assert_eq!(want, Some(Walk::Ok(chain.descs().to_vec())), "element {h}");
                    }
                    held.push(h);
                }
                Some(Err(e)) => {
                    rejected += 1;
                    assert_eq!(q.last_avail(), last_avail.wrapping_add(1));
                    assert_eq!(q.next_used(), next_used.wrapping_add(1));
                    assert_eq!(
                        q.counts().total(),
                        counts_before.total() + 1,
                        "{e:?} counted"
                    );
                    let field = q
                        .counts()
                        .by_reason()
                        .iter()
                        .zip(counts_before.by_reason())
                        .find(|(a, b)| a.1 != b.1)
                        .map(|(a, _)| a.0);
                    assert_eq!(field, Some(e.reason()));
                    if comparable {
                        assert_eq!(want, Some(Walk::Element(e.reason())), "{e:?}");
                    }
                    // Returned with length 0 (unless the used element overlaps the index).
                    let at = ring.used_elem_gpa(next_used);
                    if !overlaps((at, 8), (s.used + 2, 2)) {
                        assert_eq!(ram.read_u32(at + 4), Ok(0), "used length of {e:?}");
                        assert_eq!(ring.used_idx(&ram), Ok(next_used.wrapping_add(1)));
                    }
                }
            }
            if q.is_broken() && !broken_before {
                match q.error() {
                    Some(QueueError::HeadOutOfRange { head: h, size }) => {
                        assert_eq!(*size, s.size);
                        assert_eq!(
                            q.counts().head_out_of_range,
                            counts_before.head_out_of_range + 1
                        );
                        assert!(*h >= s.size);
                        assert_eq!(Some(*h), head);
                    }
                    Some(QueueError::AvailIdxJump { .. }) => assert!(pending > s.size),
                    Some(QueueError::RingOutsideRam { .. }) => {
                        // Only a descriptor of the main table can be out of RAM (rings were
                        // checked at creation): the reference must agree.
                        if comparable {
                            assert_eq!(want, Some(Walk::QueueBreak));
                        }
                    }
                    e => panic!("unexpected queue error {e:?}"),
                }
                assert!(q.pop_with_layout(&ram, &layout_map, &mut chain).is_none());
                break;
            }
            if got.is_none() {
                break;
            }
        }
        // Give back what was taken, with the fuzzed lengths.
        for (i, &h) in held.iter().enumerate() {
            let len = s.used_lens.get(i).copied().unwrap_or(0);
            let next_used = q.next_used();
            let got = q.add_used(&ram, h, len);
            if q.is_broken() && got.is_err() {
                break;
            }
            assert_eq!(got, Ok(()));
            assert_eq!(q.next_used(), next_used.wrapping_add(1));
            let at = ring.used_elem_gpa(next_used);
            if !overlaps((at, 8), (s.used + 2, 2)) {
                assert_eq!(ring.used_elem(&ram, next_used), Ok((u32::from(h), len)));
            }
            assert_eq!(ring.used_idx(&ram), Ok(q.next_used()));
        }
        held.clear();
        assert!(
            q.add_used(&ram, s.size, 1).is_err(),
            "add_used accepted a head past the queue"
        );
        let _ = q.needs_interrupt(&ram);
    }
    assert!(q.counts().total() >= rejected);
    assert!(q.counts().total() <= rejected + 1);

    // The free page path on a fresh queue over the same bytes: bounded by its budget, and
    // it clears no more pages than RAM has.
    let Ok(mut q2) = SplitQueue::new(&ram, s.size, s.desc, s.avail, s.used, s.event_idx) else {
        return Ok(());
    };
    q2.set_indices(s.last_avail, next_used0)
        .expect("the same indices were accepted above");
    let map = mem.map();
    let mut bm = DirtyBitmap::new_dirty(map.npages()).expect("small bitmap");
    let budget = usize::from(u.int_in_range(0..=8u8)?);
    let (applied, _) = {
        let mut applier = HintApplier::new(&mut bm, map).expect("fits");
        drain_hints(&mut q2, &ram, &mut chain, Some(&mut applier), budget)
    };
    assert!(applied <= budget);
    assert!(bm.count_all() <= map.npages());
    Ok(())
}

fn check_chain(chain: &Chain, s: &Setup, layout: &[(u64, u64)]) {
    let max = 2 * usize::from(s.size);
    assert!(
        !chain.is_empty() && chain.len() <= max,
        "{} buffers",
        chain.len()
    );
    let mut total = 0u64;
    for d in chain.descs() {
        assert!(d.len > 0, "empty buffer {d:?}");
        assert!(
            in_regions(layout, d.addr, u64::from(d.len)),
            "buffer {d:x?} is not RAM in {layout:x?}"
        );
        total += u64::from(d.len);
    }
    assert_eq!(chain.total_len(), total);
    assert!(total <= u64::from(u32::MAX));
    assert!(chain.readable().iter().all(|d| !d.writable));
    assert!(chain.writable().iter().all(|d| d.writable));
    assert_eq!(chain.readable().len() + chain.writable().len(), chain.len());
}
