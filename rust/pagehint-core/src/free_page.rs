//! The free page queue's hot path: hint elements go straight from the ring into the bitmap,
//! and the loop stops at the first control element (a cmd id out-buffer) so the device model
//! can run its state machine before anything after it is applied.
//!
//! The Linux driver sends each free block as its own element with one device-writable buffer,
//! and cmd ids (the round's id, then STOP) as elements with one 4-byte device-readable buffer.
//! QEMU's `get_free_page_hints` reads the id from an element's out-buffers and applies its
//! in-buffers only in the START state; this module applies in-buffers of pure hint elements and
//! hands anything with an out-buffer back whole.

use crate::guest_memory::GuestRam;
use crate::hints::HintApplier;
use crate::virtq::{Chain, Desc, Virtqueue};

/// An element with device-readable buffers: the device model's business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlElement {
    /// Its id, for `add_used` once handled.
    pub head: u16,
    /// The first 4 readable bytes as a little-endian cmd id; `None` when the out-buffers hold
    /// fewer than 4 bytes (QEMU treats that as a device error).
    pub cmd_id: Option<u32>,
    /// Its device-writable buffers, to apply as hints if the state allows.
    pub hints: Vec<(u64, u32)>,
}

/// Why a drain stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainStop {
    /// Nothing more is available (or the queue is broken: see its `error()`).
    Empty,
    /// `max_elements` elements were taken.
    Limit,
    /// A control element was popped and not used yet.
    Control(ControlElement),
}

/// Takes every available hint element of `queue`, applies its buffers through `applier` (or
/// not at all when `applier` is `None`: hints outside a START window are returned unread) and
/// returns it to the driver used with length 0 (QEMU's used length for free page hints),
/// taking at most `max_elements` elements (rejected ones included, so a guest cannot keep the
/// loop going) or up to the first control element. Rejected elements are counted by the queue
/// and already returned. The used elements are published with one used index write when the
/// drain stops, as QEMU's `virtqueue_fill`/`virtqueue_flush` do. Returns how many hint elements
/// were returned used and why it stopped.
pub fn drain_hints<Q: Virtqueue>(
    queue: &mut Q,
    ram: &GuestRam<'_>,
    chain: &mut Chain,
    applier: Option<&mut HintApplier<'_>>,
    max_elements: usize,
) -> (usize, DrainStop) {
    let rings = queue.rings(ram);
    let (applied, stop) = fill_hints(queue, ram, &rings, chain, applier, max_elements);
    // A failing write breaks the queue, which records why; the caller sees it there.
    let _ = queue.flush_used_in(&rings);
    (applied, stop)
}

/// [`drain_hints`] up to the used index write.
fn fill_hints<Q: Virtqueue>(
    queue: &mut Q,
    ram: &GuestRam<'_>,
    rings: &Q::Rings<'_>,
    chain: &mut Chain,
    mut applier: Option<&mut HintApplier<'_>>,
    max_elements: usize,
) -> (usize, DrainStop) {
    let mut applied = 0usize;
    for _ in 0..max_elements {
        let head = match queue.pop_in(rings, chain) {
            None => return (applied, DrainStop::Empty),
            Some(Err(_)) => continue,
            Some(Ok(head)) => head,
        };
        if !chain.readable().is_empty() {
            let control = ControlElement {
                head,
                cmd_id: read_cmd_id(ram, chain.readable()),
                hints: chain.writable().iter().map(|d| (d.addr, d.len)).collect(),
            };
            return (applied, DrainStop::Control(control));
        }
        if let Some(applier) = applier.as_deref_mut() {
            for d in chain.writable() {
                applier.add(d.addr, u64::from(d.len));
            }
        }
        if queue.fill_used_in(rings, head, 0).is_err() {
            // The used ring broke; the queue records why and stops.
            return (applied, DrainStop::Empty);
        }
        applied += 1;
    }
    (applied, DrainStop::Limit)
}

/// The first 4 bytes of the out-buffers, gathered across descriptors like QEMU's
/// `iov_to_buf`, as a little-endian u32; `None` if there are fewer than 4 or one is unreadable.
fn read_cmd_id(ram: &GuestRam<'_>, readable: &[Desc]) -> Option<u32> {
    let mut id = [0u8; 4];
    let mut got = 0usize;
    for d in readable {
        let want = (4 - got).min(usize::try_from(d.len).unwrap_or(usize::MAX));
        ram.read(d.addr, &mut id[got..got + want]).ok()?;
        got += want;
        if got == 4 {
            return Some(u32::from_le_bytes(id));
        }
    }
    None
}
