//! The requests in flight on one queue, one slot per descriptor head.

use std::time::Instant;

use crate::request::ZeroRange;
use crate::stats::{ErrorKind, OpKind};

#[derive(Clone, Debug, Default)]
pub(super) struct Slot {
    busy: bool,
    /// SQEs of the request not yet completed.
    pub pending: u32,
    /// Why the request failed, once one of its SQEs did.
    pub error: Option<ErrorKind>,
    /// What it asked for and how many bytes it moves if it succeeds (for the counters).
    op: OpKind,
    bytes: u64,
    /// When it was taken off the virtqueue.
    start: Option<Instant>,
    status: Option<u64>,
    used_len: u32,
    pub ranges: Vec<ZeroRange>,
    /// Make the request's effect durable (fdatasync) before it completes: discard and
    /// write-zeroes under a writethrough cache.
    pub sync_after: bool,
    /// iovecs of a vectored request, alive until it completes.
    pub iov: Vec<[u64; 2]>,
    /// Guest-physical ranges a read lands in, logged when it completes (the kernel writes
    /// them; nothing else sees those writes).
    pub landed: Vec<[u64; 2]>,
}

const _: () = assert!(
    std::mem::size_of::<[u64; 2]>() == std::mem::size_of::<libc::iovec>()
        && std::mem::align_of::<libc::iovec>() <= std::mem::align_of::<[u64; 2]>()
);

/// A request as it is taken: what its slot starts with.
pub(super) struct Started {
    /// Where its status byte goes.
    pub status: Option<u64>,
    /// SQEs it is made of.
    pub pending: u32,
    /// The used length it completes with if it succeeds.
    pub used_len: u32,
    pub op: OpKind,
    pub bytes: u64,
    pub start: Instant,
}

/// A request whose last SQE completed: what to tell the guest and the counters.
pub(super) struct Finished {
    pub status_addr: Option<u64>,
    pub used_len: u32,
    pub op: OpKind,
    pub bytes: u64,
    pub start: Option<Instant>,
    pub error: Option<ErrorKind>,
}

/// One slot per descriptor head, and how many are busy.
pub(super) struct SlotTable {
    slots: Vec<Slot>,
    in_flight: usize,
}

impl SlotTable {
    pub fn new(n: u16) -> Self {
        SlotTable {
            slots: vec![Slot::default(); usize::from(n)],
            in_flight: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Requests taken and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn is_busy(&self, head: u16) -> bool {
        self.slots.get(usize::from(head)).is_some_and(|s| s.busy)
    }

    /// Take `head`'s slot (in range and idle: the caller checked) for a new request.
    pub fn occupy(&mut self, head: u16, r: Started, ranges: Vec<ZeroRange>) -> &mut Slot {
        self.in_flight += 1;
        let slot = &mut self.slots[usize::from(head)];
        slot.busy = true;
        slot.pending = r.pending;
        slot.error = None;
        slot.op = r.op;
        slot.bytes = r.bytes;
        slot.start = Some(r.start);
        slot.status = r.status;
        slot.used_len = r.used_len;
        slot.ranges = ranges;
        slot.sync_after = false;
        slot.landed.clear();
        slot
    }

    /// The slot of a request in flight (None: `head` is out of range or idle).
    pub fn busy_mut(&mut self, head: u16) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(head)).filter(|s| s.busy)
    }

    /// Free `head`'s slot (busy: the caller checked); what the request comes to.
    pub fn finish(&mut self, head: u16) -> Finished {
        let slot = &mut self.slots[usize::from(head)];
        slot.busy = false;
        self.in_flight -= 1;
        Finished {
            status_addr: slot.status,
            used_len: if slot.error.is_some() {
                1
            } else {
                slot.used_len
            },
            op: slot.op,
            bytes: slot.bytes,
            start: slot.start,
            error: slot.error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(pending: u32) -> Started {
        Started {
            status: Some(0x1000),
            pending,
            used_len: 513,
            op: OpKind::Read,
            bytes: 512,
            start: Instant::now(),
        }
    }

    #[test]
    fn occupy_and_finish_keep_the_count() {
        let mut t = SlotTable::new(4);
        assert_eq!((t.len(), t.in_flight()), (4, 0));
        t.occupy(1, started(2), Vec::new());
        t.occupy(3, started(1), Vec::new());
        assert_eq!(t.in_flight(), 2);
        assert!(t.is_busy(1) && t.is_busy(3) && !t.is_busy(0));
        let done = t.finish(3);
        assert_eq!(
            (done.status_addr, done.used_len, done.error),
            (Some(0x1000), 513, None)
        );
        assert_eq!(t.in_flight(), 1);
        assert!(!t.is_busy(3) && t.busy_mut(3).is_none());
    }

    #[test]
    fn a_failed_request_finishes_with_the_status_byte_only() {
        let mut t = SlotTable::new(2);
        t.occupy(0, started(1), Vec::new()).error = Some(ErrorKind::Io);
        let done = t.finish(0);
        assert_eq!((done.used_len, done.error), (1, Some(ErrorKind::Io)));
    }

    #[test]
    fn a_slot_taken_again_forgets_its_previous_request() {
        let mut t = SlotTable::new(1);
        let s = t.occupy(0, started(1), Vec::new());
        s.error = Some(ErrorKind::Io);
        s.sync_after = true;
        s.landed.push([0, 1]);
        t.finish(0);
        let s = t.occupy(0, started(1), Vec::new());
        assert!(s.error.is_none() && !s.sync_after && s.landed.is_empty());
    }

    #[test]
    fn heads_out_of_range_are_never_busy() {
        let mut t = SlotTable::new(2);
        assert!(!t.is_busy(2) && !t.is_busy(u16::MAX));
        assert!(t.busy_mut(u16::MAX).is_none());
    }
}
