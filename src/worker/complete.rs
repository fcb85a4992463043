//! Completing: each CQE back to its request; the request's last one finishes it (`publish`).
//! A completion that needs one more step of its request (a zeroing fallback, a writethrough
//! fdatasync) says so with a [`FollowUp`]; the pass builds and submits it.

use log::{debug, error};
use vm_memory::GuestMemoryMmap;

use super::user_data::{Step, UserData};
use super::{suppressed_note, QueueState, VringState, STATUS_IOERR, STATUS_OK};
use crate::request::ZeroRange;
use crate::stats::ErrorKind;

/// One more SQE a request needs before it can complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FollowUp {
    /// Make it durable first (writethrough).
    Fsync { head: u16 },
    /// A zeroing step that replaces or follows the one that completed.
    Fallocate { ud: UserData, range: ZeroRange },
}

impl QueueState {
    /// Account one CQE to its request; completes the request to the guest when it was the
    /// last. Returns the SQE its request needs next, if any.
    pub(super) fn on_completion(
        &mut self,
        raw: u64,
        res: i32,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
    ) -> Option<FollowUp> {
        let q = self.index;
        let Some(ud) = UserData::decode(raw) else {
            error!("queue {q}: completion with unknown user data {raw:#x}");
            return None;
        };
        let head = ud.head;
        if res == -libc::EACCES {
            self.kernel_refusal(head, ud.step);
        }
        let Some(slot) = self.slots.busy_mut(head) else {
            error!("queue {q}: completion for idle slot {head}");
            return None;
        };
        if let Some(&range) = slot.ranges.get(usize::from(ud.range)) {
            if let Some(step) = self.zeroing.next_step(ud.step, res) {
                return Some(FollowUp::Fallocate {
                    ud: UserData::new(head, step).range(ud.range),
                    range,
                });
            }
        }
        let ok = match ud.step {
            Step::Rw => res >= 0 && res as u32 == ud.expected,
            // Discard is advisory (virtio 1.2 §5.2.6.2): a filesystem without holes ignores it.
            Step::Discard => res >= 0 || res == -libc::EOPNOTSUPP,
            _ => res >= 0,
        };
        if !ok {
            let expected = ud.expected;
            debug!("queue {q}: request {head} failed: result {res}, expected {expected}");
            if slot.error.is_none() {
                slot.error = Some(if res == -libc::EACCES {
                    ErrorKind::Refused
                } else {
                    ErrorKind::Io
                });
            }
        }
        slot.pending = slot.pending.saturating_sub(1);
        if slot.pending > 0 {
            return None;
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
            return Some(FollowUp::Fsync { head });
        }
        let done = self.slots.finish(head);
        // Counted before the guest can see the completion.
        self.counters.inflight.set(self.slots.in_flight() as u64);
        self.account(done.op, done.bytes, done.start, done.error);
        let status = if done.error.is_some() {
            STATUS_IOERR
        } else {
            STATUS_OK
        };
        self.publish(head, done.status_addr, status, done.used_len, vs, mem);
        None
    }

    /// The kernel refused an SQE with -EACCES: the ring's allowlist stopped something this
    /// worker submitted. The worker builds only SQEs its ring allows, so this is a security
    /// incident (a bug, or memory corruption steering an SQE): counted, and logged as such.
    #[cold]
    fn kernel_refusal(&mut self, head: u16, step: Step) {
        self.counters.kernel_refusals.add(1);
        let what = match step {
            Step::Rw => "read or write",
            Step::Fsync => "fdatasync",
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
}
