//! Completing: turn CQEs into status bytes and used-ring entries.

use std::time::Instant;

use log::{debug, error};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::sqe::{
    fallocate_sqe, fsync_sqe, KIND_ALLOC, KIND_DISCARD, KIND_FSYNC, KIND_PUNCH, KIND_PUNCH_REALLOC,
    KIND_RW, KIND_ZERO_RANGE,
};
use super::{suppressed_note, QueueState, VringState, STATUS_IOERR, STATUS_OK};
use crate::stats::ErrorKind;

impl QueueState {
    /// Turn every available completion into used-ring entries.
    pub(super) fn reap(&mut self, vs: &mut VringState<'_>, mem: &GuestMemoryMmap) {
        self.cqes.clear();
        for engine in self.engine.iter_mut().chain(self.retiring.iter_mut()) {
            let before = self.cqes.len();
            self.cqes.extend(
                engine
                    .ring
                    .completion()
                    .map(|c| (c.user_data(), c.result())),
            );
            engine.inflight = engine.inflight.saturating_sub(self.cqes.len() - before);
        }
        self.retiring.retain(|e| e.inflight > 0);
        if self.cqes.is_empty() {
            return;
        }
        // One clock read for the whole batch: the completion time of its requests.
        self.clock = Instant::now();
        let cqes = std::mem::take(&mut self.cqes);
        for &(ud, res) in &cqes {
            self.on_completion(ud, res, vs, mem);
        }
        self.cqes = cqes;
    }

    pub(super) fn on_completion(
        &mut self,
        ud: u64,
        res: i32,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
    ) {
        let head = (ud & 0xffff) as u16;
        let kind = (ud >> 16) & 0xff;
        let idx = ((ud >> 24) & 0xff) as usize;
        let expected = (ud >> 32) as u32;
        let q = self.index;
        if res == -libc::EACCES {
            self.kernel_refusal(head, kind);
        }
        let Some(slot) = self.slots.get_mut(usize::from(head)).filter(|s| s.busy) else {
            error!("queue {q}: completion for idle slot {head}");
            return;
        };
        let range = slot.ranges.get(idx).copied();
        let unsupported = res == -libc::EOPNOTSUPP;
        // A step of a zeroing range that the filesystem cannot do is replaced by another that
        // gives the same result, now and for every later request.
        let next = match (kind, range) {
            // Zeroing in place: punch a hole, then allocate it again (reads back as zeroes,
            // stays allocated).
            (KIND_ZERO_RANGE, Some(r)) if unsupported => {
                self.zero_range_unsupported = true;
                Some((KIND_PUNCH_REALLOC, r))
            }
            // UNMAP is a hint: where holes cannot be punched, zero in place.
            (KIND_PUNCH, Some(r)) if unsupported => {
                self.punch_unsupported = true;
                Some((KIND_ZERO_RANGE, r))
            }
            (KIND_PUNCH_REALLOC, Some(r)) if res >= 0 => Some((KIND_ALLOC, r)),
            _ => None,
        };
        if let Some((kind, r)) = next {
            let e = fallocate_sqe(head, kind, idx, &r);
            self.push(e, vs, mem);
            return;
        }
        let ok = match kind {
            KIND_RW => res >= 0 && res as u32 == expected,
            // Discard is advisory (virtio 1.2 §5.2.6.2): a filesystem without holes ignores it.
            KIND_DISCARD => res >= 0 || unsupported,
            _ => res >= 0,
        };
        if !ok {
            debug!("queue {q}: request {head} failed: result {res}, expected {expected}");
        }
        let Some(slot) = self.slots.get_mut(usize::from(head)) else {
            return;
        };
        if !ok && slot.error.is_none() {
            slot.error = Some(if res == -libc::EACCES {
                ErrorKind::Refused
            } else {
                ErrorKind::Io
            });
        }
        slot.pending = slot.pending.saturating_sub(1);
        if slot.pending > 0 {
            return;
        }
        // The kernel put a read's data in guest RAM: logged before anything makes it visible
        // (also when it failed part-way: the bytes may have landed).
        if let Some(log) = &self.log {
            for r in &slot.landed {
                log.mark(r[0], r[1]);
            }
        }
        if std::mem::take(&mut slot.sync_after) && slot.error.is_none() {
            // Durable before it completes (writethrough): one fdatasync, then complete.
            slot.pending = 1;
            let e = fsync_sqe(head);
            self.push(e, vs, mem);
            return;
        }
        slot.busy = false;
        let (status, used) = if slot.error.is_some() {
            (STATUS_IOERR, 1)
        } else {
            (STATUS_OK, slot.used_len)
        };
        let addr = slot.status;
        let (op, bytes, start, err) = (slot.op, slot.bytes, slot.start, slot.error);
        self.inflight_reqs -= 1;
        // Counted before the guest can see the completion.
        self.counters.inflight.set(self.inflight_requests() as u64);
        self.account(op, bytes, start, err);
        self.complete(head, addr, status, used, vs, mem);
    }

    /// The kernel refused an SQE with -EACCES: the ring's allowlist stopped something this
    /// worker submitted. The worker builds only SQEs its ring allows, so this is a security
    /// incident (a bug, or memory corruption steering an SQE): counted, and logged as such.
    #[cold]
    fn kernel_refusal(&mut self, head: u16, kind: u64) {
        self.counters.kernel_refusals.add(1);
        let what = match kind {
            KIND_RW => "read or write",
            KIND_FSYNC => "fdatasync",
            _ => "fallocate",
        };
        if let Some(n) = self.security_limit.allow(self.clock) {
            error!(
                "SECURITY: queue {}: the kernel refused an SQE ({what} of request {head}) with \
                 -EACCES: the ring's allowlist stopped an operation ringfence must never submit; \
                 the request fails. Report this: it means a bug or memory corruption in the \
                 daemon{}",
                self.index,
                suppressed_note(n)
            );
        }
    }

    /// Write the status byte and put the chain on the used ring.
    pub(super) fn complete(
        &mut self,
        head: u16,
        status_addr: Option<u64>,
        status: u8,
        used_len: u32,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
    ) {
        let len = match status_addr {
            Some(a) if mem.write_obj(status, GuestAddress(a)).is_ok() => {
                if let Some(log) = &self.log {
                    log.mark(a, 1);
                }
                used_len
            }
            _ => 0,
        };
        if let Some(t) = &self.inflight {
            t.before_publish(head);
        }
        match vs.add_used(head, len) {
            Ok(()) => {
                if let Some(t) = &self.inflight {
                    t.after_publish(head, vs.get_queue().next_used());
                }
            }
            Err(e) => debug!("queue {}: add_used({head}): {e}", self.index),
        }
        self.used_added = true;
    }
}
