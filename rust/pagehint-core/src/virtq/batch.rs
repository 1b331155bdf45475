//! Taking many elements at once as parallel arrays, for callers that hand them on in bulk (the
//! Python binding's `pop`): no object per element or per descriptor, one allocation per column.

use super::{Chain, Virtqueue};
use crate::guest_memory::GuestRam;

/// Elements taken by [`pop_batch`], as parallel columns.
///
/// `heads[i]` is element `i`'s id (what `add_used` takes back). Descriptor `j` belongs to element
/// `desc_element[j]` and has address `desc_addr[j]`, length `desc_len[j]` and direction
/// `desc_writable[j]`; descriptors are in chain order, so each element's device-readable (out)
/// buffers come before its device-writable (in) ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoppedElements {
    /// Accepted elements' ids, in the order they were taken.
    pub heads: Vec<u16>,
    /// Per descriptor: the index in `heads` of its element.
    pub desc_element: Vec<u32>,
    /// Per descriptor: guest-physical address.
    pub desc_addr: Vec<u64>,
    /// Per descriptor: bytes (never 0).
    pub desc_len: Vec<u32>,
    /// Per descriptor: device-writable (in) rather than device-readable (out).
    pub desc_writable: Vec<bool>,
}

impl PoppedElements {
    /// Accepted elements.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// Whether no element was accepted.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    fn push(&mut self, head: u16, chain: &Chain) {
        // At most `max_elements` heads; an index past u32 saturates rather than wraps (it
        // cannot happen below 2^32 elements, and a queue holds at most 32768 in flight).
        let e = u32::try_from(self.heads.len()).unwrap_or(u32::MAX);
        self.heads.push(head);
        for d in chain.descs() {
            self.desc_element.push(e);
            self.desc_addr.push(d.addr);
            self.desc_len.push(d.len);
            self.desc_writable.push(d.writable);
        }
    }
}

/// Takes up to `max_elements` available elements of `queue`. Rejected elements count against
/// the budget too, so a guest that keeps making bad elements available cannot keep the loop
/// going; they are counted by the queue and already returned used with length 0, and do not
/// appear in the result. Stops early when nothing more is available (or the queue broke: see
/// its `error()`). `chain` is scratch space, reused across elements.
pub fn pop_batch<Q: Virtqueue + ?Sized>(
    queue: &mut Q,
    ram: &GuestRam<'_>,
    chain: &mut Chain,
    max_elements: usize,
) -> PoppedElements {
    let mut out = PoppedElements::default();
    let rings = queue.rings(ram);
    for _ in 0..max_elements {
        match queue.pop_in(&rings, chain) {
            None => break,
            Some(Err(_)) => {}
            Some(Ok(head)) => out.push(head, chain),
        }
    }
    out
}
