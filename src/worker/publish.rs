//! The end of every request: its status byte, its used-ring entry (with the inflight region's
//! bookkeeping around it) and its counters. Completions come here, and so do requests answered
//! without I/O (refused, GET_ID, empty).

use std::time::Instant;

use log::debug;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{QueueState, VringState};
use crate::stats::{ErrorKind, OpKind};

impl QueueState {
    /// Count a request that completed: latency from its start to now (`self.clock`).
    pub(super) fn account(
        &self,
        op: OpKind,
        bytes: u64,
        start: Option<Instant>,
        error: Option<ErrorKind>,
    ) {
        let ns = start.map_or(0, |t| {
            self.clock.saturating_duration_since(t).as_nanos() as u64
        });
        self.counters.complete(op, bytes, ns, error);
    }

    /// Write the status byte and put the chain on the used ring.
    pub(super) fn publish(
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
