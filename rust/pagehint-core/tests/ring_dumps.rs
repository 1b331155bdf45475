//! The split virtqueue reader on real free-page-hint queues that a Linux 6.1 guest wrote under
//! QEMU 10.0.2 (see `tests/data/ring-dumps/README.md`), checked against QEMU's own decode.
//!
//! Guest memory is rebuilt in two layers, because a `Vec<AtomicU8>` of the guest's 2 or
//! 4 GiB would really be allocated and filled:
//! - the real RAM layout (QEMU's RAM block: `below_4g` from 0, the rest from 4 GiB, derived
//!   from `qemu_flatview_ram`), a [`MemoryMap`] that allocates nothing, against which every
//!   buffer's `(addr, len)` is checked; hints are never dereferenced, only range-checked;
//! - a small backing guest RAM (a `test_utils::TestRam`) holding just the pages of the three rings and of the
//!   out-buffers at their real guest-physical addresses, through which the reader reads the
//!   rings and the test reads the command ids.
//!
//! [`SplitQueue::pop_with_layout`] takes both.

use std::fs;
use std::path::{Path, PathBuf};

use pagehint_core::MemoryMap;
use pagehint_core::test_utils::TestRam;
use pagehint_core::virtq::{Chain, SplitQueue};
use serde_json::Value;

const PAGE: u64 = 4096;
const FOUR_GIG: u64 = 1 << 32;

fn dumps() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/ring-dumps"
    ))
    .to_path_buf()
}

fn json(dir: &Path, name: &str) -> Value {
    let text = fs::read_to_string(dir.join(name)).expect("dump file");
    serde_json::from_str(&text).expect("json")
}

fn u(v: &Value) -> u64 {
    v.as_u64().expect("unsigned integer")
}

fn u16_of(v: &Value) -> u16 {
    u16::try_from(u(v)).expect("u16")
}

/// `[[gpa, len, ...], ...]` as `(gpa, len)` pairs.
fn ranges(v: &Value) -> Vec<(u64, u64)> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| (u(&r[0]), u(&r[1])))
        .collect()
}

/// The page-rounded, merged regions covering `spans`.
fn page_regions(spans: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pages: Vec<(u64, u64)> = spans
        .iter()
        .map(|&(gpa, len)| {
            let start = gpa / PAGE * PAGE;
            (start, (gpa + len).next_multiple_of(PAGE))
        })
        .collect();
    pages.sort_unstable();
    let mut merged: Vec<(u64, u64)> = vec![];
    for (s, e) in pages {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// The small backing RAM: the pages of `contents`, each placed at its guest-physical address.
fn backing(name: &str, contents: &[(u64, Vec<u8>)]) -> TestRam {
    let spans: Vec<(u64, u64)> = contents
        .iter()
        .map(|(g, b)| (*g, u64::try_from(b.len()).expect("small")))
        .collect();
    let mem = TestRam::new(&page_regions(&spans), PAGE).expect("backing map");
    assert!(
        mem.map().ram_bytes() <= 1 << 20,
        "{name}: backing stays small"
    );
    for (gpa, bytes) in contents {
        mem.poke(*gpa, bytes);
    }
    mem
}

/// Everything the test needs about one dump.
struct Dump {
    name: &'static str,
    dir: PathBuf,
    ring: Value,
    elements: Value,
    outbufs: Value,
    verify: Value,
}

impl Dump {
    fn load(name: &'static str) -> Self {
        let dir = dumps().join(name);
        Self {
            name,
            ring: json(&dir, "ring.json"),
            elements: json(&dir, "qemu-elements.json"),
            outbufs: json(&dir, "outbufs.json"),
            verify: json(&dir, "verify.json"),
            dir,
        }
    }

    /// QEMU's RAM block laid out as the guest sees it: `below_4g` bytes from 0 (the end of
    /// the highest `pc.ram` piece below 4 GiB), the rest from 4 GiB.
    fn real_layout(&self) -> MemoryMap {
        let ram_bytes = u(&self.ring["guest_ram_bytes"]);
        let below_4g = self.ring["qemu_flatview_ram"]
            .as_array()
            .expect("flatview")
            .iter()
            .filter(|r| r[2] == "pc.ram" && u(&r[0]) < FOUR_GIG)
            .map(|r| u(&r[0]) + u(&r[1]))
            .max()
            .expect("low RAM");
        let map = MemoryMap::x86(ram_bytes, below_4g, PAGE).expect("layout");
        // Every RAM piece QEMU and the guest know of lies inside it.
        for r in self.ring["qemu_flatview_ram"].as_array().expect("flatview") {
            if r[2] == "pc.ram" {
                assert!(map.pieces(u(&r[0]), u(&r[1])).is_some(), "{}", self.name);
            }
        }
        for (gpa, len) in ranges(&self.ring["guest_memory_map"]) {
            assert!(map.pieces(gpa, len).is_some(), "{}", self.name);
        }
        map
    }

    fn file(&self, name: &str) -> Vec<u8> {
        fs::read(self.dir.join(name)).expect("dump file")
    }

    /// `(gpa, bytes)` of everything to place in guest memory.
    fn contents(&self) -> Vec<(u64, Vec<u8>)> {
        let r = &self.ring;
        let mut out = vec![
            (u(&r["desc_gpa"]), self.file("desc.bin")),
            (u(&r["avail_gpa"]), self.file("avail.bin")),
            (u(&r["used_gpa"]), self.file("used.bin")),
        ];
        for (name, len) in [
            ("desc.bin", "desc_bytes"),
            ("avail.bin", "avail_bytes"),
            ("used.bin", "used_bytes"),
        ] {
            assert_eq!(
                u64::try_from(self.file(name).len()).expect("small"),
                u(&r[len])
            );
        }
        for ob in self.outbufs.as_array().expect("outbufs") {
            let bytes = self.file(ob["file"].as_str().expect("file name"));
            assert_eq!(u64::try_from(bytes.len()).expect("small"), u(&ob["len"]));
            out.push((u(&ob["gpa"]), bytes));
        }
        out
    }
}

/// What the reader saw for one element.
struct Seen {
    avail_index: u16,
    head: u16,
    chain: Chain,
}

fn replay(name: &'static str) {
    let d = Dump::load(name);
    let r = &d.ring;
    let real = d.real_layout();

    // The small backing RAM with the ring and out-buffer pages.
    let contents = d.contents();
    let backing = backing(name, &contents);
    let ram = backing.ram();
    for (gpa, bytes) in &contents {
        // Each placed range is real RAM too.
        assert!(
            real.pieces(*gpa, u64::try_from(bytes.len()).expect("small"))
                .is_some()
        );
    }

    let size = u16_of(&r["queue_size"]);
    let event_idx = r["guest_features"]["transports"]
        .as_array()
        .expect("transports")
        .iter()
        .any(|t| {
            t.as_str()
                .is_some_and(|t| t.starts_with("VIRTIO_RING_F_EVENT_IDX"))
        });
    assert!(event_idx, "{name}: README says EVENT_IDX was negotiated");
    let (desc, avail, used) = (u(&r["desc_gpa"]), u(&r["avail_gpa"]), u(&r["used_gpa"]));
    let mut q = SplitQueue::new(&ram, size, desc, avail, used, event_idx).expect("queue");
    let last_avail = u16_of(&r["last_avail_idx"]);
    let used_idx = u16_of(&r["used_idx"]);
    q.set_indices(last_avail, used_idx)
        .expect("consistent indices");

    // The indices in memory are the ones the dump reports.
    let avail_idx = ram.read_u16(avail + 2).expect("ring");
    assert_eq!(avail_idx, u16_of(&r["avail_idx_in_memory"]), "{name}");
    assert_eq!(
        ram.read_u16(used + 2).expect("ring"),
        u16_of(&r["used_idx_in_memory"])
    );
    assert_eq!(avail_idx, u16_of(&d.verify["window"]["to_idx"]), "{name}");
    assert_eq!(used_idx, u16_of(&d.verify["window"]["from_idx"]), "{name}");

    // Read the window [used idx, avail idx).
    let mut seen = vec![];
    let mut chain = Chain::new();
    let mut index = last_avail;
    while let Some(res) = q.pop_with_layout(&ram, &real, &mut chain) {
        let head = res.unwrap_or_else(|e| panic!("{name}: element {index} rejected: {e}"));
        seen.push(Seen {
            avail_index: index,
            head,
            chain: chain.clone(),
        });
        index = index.wrapping_add(1);
    }
    assert!(q.error().is_none(), "{name}: {:?}", q.error());
    assert_eq!(q.counts().total(), 0);
    let window = avail_idx.wrapping_sub(used_idx);
    assert_eq!(seen.len(), usize::from(window), "{name}: window size");
    assert_eq!(
        u64::try_from(seen.len()).expect("small"),
        u(&d.verify["window"]["elements"])
    );

    // Each element exactly as QEMU decoded its avail slot.
    let by_index = d.elements["by_index"].as_array().expect("by_index");
    assert_eq!(by_index.len(), usize::from(size));
    let mut out_buffers = vec![];
    let mut hints = vec![];
    for (pos, s) in seen.iter().enumerate() {
        let slot = usize::from(s.avail_index % size);
        let entry = &by_index[slot];
        assert_eq!(u(&entry["index"]), u64::try_from(slot).expect("small"));
        let el = &entry["element"];
        assert_eq!(
            u64::from(s.head),
            u(&el["index"]),
            "{name} slot {slot}: head"
        );
        let qd = el["descs"].as_array().expect("descs");
        assert_eq!(s.chain.len(), qd.len(), "{name} slot {slot}: chain length");
        for (k, (ours, theirs)) in s.chain.descs().iter().zip(qd).enumerate() {
            assert_eq!(ours.addr, u(&theirs["addr"]), "{name} slot {slot}");
            assert_eq!(u64::from(ours.len), u(&theirs["len"]), "{name} slot {slot}");
            let mut flags: Vec<&str> = theirs["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .map(|f| f.as_str().expect("flag"))
                .collect();
            flags.sort_unstable();
            let mut want = vec![];
            if k + 1 < qd.len() {
                want.push("next");
            }
            if ours.writable {
                want.push("write");
            }
            want.sort_unstable();
            assert_eq!(flags, want, "{name} slot {slot} desc {k}: flags");
        }
        for b in s.chain.readable() {
            let mut id = [0u8; 4];
            assert_eq!(b.len, 4, "{name}: an out-buffer is a 4-byte cmd id");
            ram.read(b.addr, &mut id).expect("out-buffer placed");
            out_buffers.push((s.avail_index, pos, b.addr, u32::from_le_bytes(id)));
        }
        for b in s.chain.writable() {
            hints.push((b.addr, b.len));
        }
    }

    // The out-buffers: their cmd ids as in the outbuf files, verify.json and the config.
    let want_out: Vec<(u16, usize, u64, u32)> = d.verify["window_out_buffers"]
        .as_array()
        .expect("out buffers")
        .iter()
        .map(|o| {
            (
                u16_of(&o["idx"]),
                usize::try_from(u(&o["pos_in_window"])).expect("small"),
                u(&o["gpa"]),
                u32::try_from(u(&o["cmd_id"])).expect("u32"),
            )
        })
        .collect();
    assert_eq!(out_buffers, want_out, "{name}: out-buffers");
    for &(_, _, gpa, id) in &out_buffers {
        let file = d
            .outbufs
            .as_array()
            .expect("outbufs")
            .iter()
            .find(|o| u(&o["gpa"]) == gpa)
            .expect("outbuf file");
        assert_eq!(u64::from(id), u(&file["u32_le"]));
    }
    if let Some(&(_, 0, _, first)) = out_buffers.first() {
        // The round opens with the device's current command id.
        assert_eq!(
            u64::from(first),
            u(&r["device_config"]["free_page_hint_cmd_id"])
        );
    }

    // The hints: every one a 4 MiB block inside the real RAM and the guest's usable RAM.
    let wh = &d.verify["window_hints"];
    assert_eq!(
        u64::try_from(hints.len()).expect("small"),
        u(&wh["count"]),
        "{name}"
    );
    let usable = ranges(&r["guest_memory_map"]);
    let block = u(&r["hint_block_bytes"]);
    for &(addr, len) in &hints {
        let len = u64::from(len);
        assert_eq!(len, block);
        assert!(addr.is_multiple_of(block));
        assert!(real.pieces(addr, len).is_some());
        assert!(
            usable
                .iter()
                .any(|&(g, l)| g <= addr && addr + len <= g + l)
        );
    }
    if !hints.is_empty() {
        let bytes: u64 = hints.iter().map(|&(_, l)| u64::from(l)).sum();
        assert_eq!(bytes, u(&wh["bytes"]));
        let min = hints.iter().map(|&(a, _)| a).min().expect("some");
        let max_end = hints
            .iter()
            .map(|&(a, l)| a + u64::from(l))
            .max()
            .expect("some");
        assert_eq!((min, max_end), (u(&wh["min_gpa"]), u(&wh["max_end_gpa"])));
        let mut addrs: Vec<u64> = hints.iter().map(|&(a, _)| a).collect();
        addrs.sort_unstable();
        addrs.dedup();
        assert_eq!(
            u64::try_from(addrs.len()).expect("small"),
            u(&wh["distinct_gpas"])
        );
    }

    // Returning everything publishes the used ring up to the available index.
    for s in &seen {
        q.add_used(&ram, s.head, 0).expect("ring");
    }
    assert_eq!(ram.read_u16(used + 2).expect("ring"), avail_idx);
    let avail_event = ram.read_u16(used + 4 + 8 * u64::from(size)).expect("ring");
    if seen.is_empty() {
        // Nothing taken: the device wrote nothing.
        assert_eq!(u64::from(avail_event), u(&r["avail_event_in_memory"]));
    } else {
        assert_eq!(avail_event, avail_idx);
    }
}

#[test]
fn q35_4g_frozen_partial_matches_qemu() {
    replay("q35-4G-frozen-partial");
}

#[test]
fn pc_2g_frozen_full_matches_qemu() {
    replay("pc-2G-frozen-full");
}

#[test]
fn q35_4g_early_has_nothing_new() {
    replay("q35-4G-early");
}

#[test]
fn the_early_dump_history_decodes_as_qemu_says() {
    // Slots before the window were already used; their descriptors have since been reused
    // (only two distinct heads remain), so QEMU's decode of those slots is today's content.
    // Replaying them from index 0 must match QEMU slot by slot too.
    let d = Dump::load("q35-4G-early");
    let real = d.real_layout();
    let backing = backing(d.name, &d.contents());
    let ram = backing.ram();
    let r = &d.ring;
    let size = u16_of(&r["queue_size"]);
    let mut q = SplitQueue::new(
        &ram,
        size,
        u(&r["desc_gpa"]),
        u(&r["avail_gpa"]),
        u(&r["used_gpa"]),
        true,
    )
    .expect("queue");
    let history = u16_of(&d.verify["history_slots"]);
    q.set_indices(0, 0).expect("consistent indices");
    let by_index = d.elements["by_index"].as_array().expect("by_index");
    let mut chain = Chain::new();
    let mut heads = std::collections::BTreeSet::new();
    for i in 0..history {
        let head = q
            .pop_with_layout(&ram, &real, &mut chain)
            .expect("available")
            .expect("valid");
        let el = &by_index[usize::from(i)]["element"];
        assert_eq!(u64::from(head), u(&el["index"]));
        let qd = &el["descs"][0];
        assert_eq!(chain.len(), 1);
        assert_eq!(chain.descs()[0].addr, u(&qd["addr"]));
        assert_eq!(u64::from(chain.descs()[0].len), u(&qd["len"]));
        assert!(chain.descs()[0].writable);
        heads.insert(head);
    }
    assert!(q.pop_with_layout(&ram, &real, &mut chain).is_none());
    assert_eq!(
        u64::try_from(heads.len()).expect("small"),
        u(&d.verify["distinct_desc_indices_used_by_slots"])
    );
}
