//! Completing: turn CQEs into status bytes and used-ring entries.

use log::{debug, error};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::sqe::{fallocate_sqe, KIND_DISCARD, KIND_PUNCH, KIND_RW, KIND_ZERO_RANGE};
use super::{QueueState, VringState, STATUS_IOERR, STATUS_OK};

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
        let cqes = std::mem::take(&mut self.cqes);
        for &(ud, res) in &cqes {
            self.on_completion(ud, res, vs, mem);
        }
        self.cqes = cqes;
    }

    fn on_completion(&mut self, ud: u64, res: i32, vs: &mut VringState<'_>, mem: &GuestMemoryMmap) {
        let head = (ud & 0xffff) as u16;
        let kind = (ud >> 16) & 0xff;
        let idx = ((ud >> 24) & 0xff) as usize;
        let expected = (ud >> 32) as u32;
        let q = self.index;
        let Some(slot) = self.slots.get_mut(usize::from(head)).filter(|s| s.busy) else {
            error!("queue {q}: completion for idle slot {head}");
            return;
        };
        let ok = match kind {
            KIND_RW => res >= 0 && res as u32 == expected,
            KIND_ZERO_RANGE if res == -libc::EOPNOTSUPP => {
                // The filesystem cannot zero in place: punch a hole instead (it reads back as
                // zeroes too), now and from now on.
                self.zero_range_unsupported = true;
                if let Some(r) = slot.ranges.get(idx).copied() {
                    let e = fallocate_sqe(head, KIND_PUNCH, idx, &r);
                    self.push(e, vs, mem);
                    return;
                }
                false
            }
            KIND_DISCARD => res >= 0 || res == -libc::EOPNOTSUPP,
            _ => res >= 0,
        };
        if !ok {
            debug!("queue {q}: request {head} failed: result {res}, expected {expected}");
        }
        let Some(slot) = self.slots.get_mut(usize::from(head)) else {
            return;
        };
        slot.failed |= !ok;
        slot.pending = slot.pending.saturating_sub(1);
        if slot.pending > 0 {
            return;
        }
        slot.busy = false;
        let (status, used) = if slot.failed {
            (STATUS_IOERR, 1)
        } else {
            (STATUS_OK, slot.used_len)
        };
        let addr = slot.status;
        self.inflight_reqs -= 1;
        self.complete(head, addr, status, used, vs, mem);
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
            Some(a) if mem.write_obj(status, GuestAddress(a)).is_ok() => used_len,
            _ => 0,
        };
        if let Err(e) = vs.add_used(head, len) {
            debug!("queue {}: add_used({head}): {e}", self.index);
        }
        self.used_added = true;
    }
}
