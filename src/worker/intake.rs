//! Popping: take descriptor chains off the avail ring, parse them and start each request.

use std::sync::atomic::Ordering;

use io_uring::{opcode, types};
use log::{debug, warn};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::sqe::{fallocate_sqe, user_data, KIND_DISCARD, KIND_FSYNC, KIND_PUNCH, KIND_ZERO_RANGE};
use super::{QueueState, Shared, VringState, FILE_PRIMARY, STATUS_IOERR, STATUS_OK};
use crate::config::SERIAL_LEN;
use crate::request::{self, Desc, Op, Parsed, ZeroMode};

impl QueueState {
    pub(super) fn take_requests(
        &mut self,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        rearm: bool,
    ) {
        // Rounds in a row that popped nothing although the avail index said "more".
        let mut empty_rounds = 0;
        loop {
            if let Err(e) = vs.disable_notification() {
                debug!("queue {}: disable_notification: {e}", self.index);
            }
            let mut popped = 0usize;
            while let Some(chain) = vs.get_queue_mut().pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                self.descs.clear();
                self.descs.extend(chain.map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                }));
                self.start(head, vs, mem, shared);
                if self.queued_sqes() >= self.submit_batch {
                    self.submit(vs, mem);
                }
            }
            if !rearm {
                break;
            }
            // Re-enabling reports whether requests arrived meanwhile (the guest may have seen
            // notifications off and not kicked): if so, go round again.
            match vs.enable_notification() {
                Ok(true) => {
                    empty_rounds = if popped == 0 { empty_rounds + 1 } else { 0 };
                    if empty_rounds >= 3 {
                        // The index says "more" yet nothing can be popped: the ring is corrupt
                        // (e.g. the index jumped by more than the queue size).
                        warn!(
                            "queue {}: avail index {:?} is inconsistent with the ring; waiting for \
                             the next kick",
                            self.index,
                            vs.get_queue().avail_idx(mem, Ordering::Acquire).ok()
                        );
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    debug!("queue {}: enable_notification: {e}", self.index);
                    break;
                }
            }
        }
    }

    /// Start one request whose descriptors are in `self.descs`.
    fn start(
        &mut self,
        head: u16,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
    ) {
        let Some(limits) = self.limits else { return };
        self.stats.requests += 1;
        let hi = usize::from(head);
        if hi >= self.slots.len() || usize::from(head) >= usize::from(vs.get_queue().size()) {
            warn!(
                "queue {}: descriptor head {head} is out of range; dropped",
                self.index
            );
            return;
        }
        if self.slots[hi].busy {
            warn!(
                "queue {}: descriptor head {head} made available again while in flight; ignored",
                self.index
            );
            return;
        }
        let req = request::parse(&self.descs, mem, &limits, &mut self.segs, &mut self.ranges);
        match req.parsed {
            Parsed::Fail(status, reason) => {
                debug!("queue {}: request {head} refused: {reason:?}", self.index);
                self.complete(head, req.status, status, 1, vs, mem);
            }
            Parsed::Op(Op::Nop) => self.complete(head, req.status, STATUS_OK, 1, vs, mem),
            Parsed::Op(Op::GetId) => {
                let mut written = 0u32;
                let mut ok = true;
                for s in &self.segs {
                    let end = (written + s.len) as usize;
                    let src = &shared.serial[written as usize..end.min(SERIAL_LEN)];
                    ok &= mem.write_slice(src, GuestAddress(s.addr)).is_ok();
                    written += s.len;
                }
                let (status, used) = if ok {
                    (STATUS_OK, written + 1)
                } else {
                    (STATUS_IOERR, 1)
                };
                self.complete(head, req.status, status, used, vs, mem);
            }
            Parsed::Op(Op::Read { offset, len }) => {
                self.start_rw(head, req.status, offset, len, false, vs, mem, shared)
            }
            Parsed::Op(Op::Write { offset, len }) => {
                self.start_rw(head, req.status, offset, len, true, vs, mem, shared)
            }
            Parsed::Op(Op::Flush) => {
                self.occupy(head, req.status, 1, 1, Vec::new());
                let e = opcode::Fsync::new(types::Fixed(FILE_PRIMARY))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(user_data(head, KIND_FSYNC, 0, 0));
                self.push(e, vs, mem);
            }
            Parsed::Op(Op::Zero) => {
                let ranges = std::mem::take(&mut self.ranges);
                self.occupy(head, req.status, ranges.len() as u32, 1, ranges);
                for i in 0..self.slots[hi].ranges.len() {
                    let r = self.slots[hi].ranges[i];
                    let kind = match r.mode {
                        ZeroMode::Discard => KIND_DISCARD,
                        ZeroMode::Unmap => KIND_PUNCH,
                        ZeroMode::InPlace if self.zero_range_unsupported => KIND_PUNCH,
                        ZeroMode::InPlace => KIND_ZERO_RANGE,
                    };
                    let e = fallocate_sqe(head, kind, i, &r);
                    self.push(e, vs, mem);
                }
            }
        }
    }
}
