//! The queue's armed ring (`ring::RingSet`): push SQEs, submit them, reap their completions.
//! Knows nothing of requests: what a completion means is `complete`'s business. The ring set
//! itself is made at startup and lent to the queue for one connection; the control thread
//! re-arms it (`QueueState::arm`) only when nothing is in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use log::{error, info, warn};
use vm_memory::GuestMemoryMmap;

use crate::error::RingError;
use crate::guest_map::FixedBufferMap;
use crate::ring::{RingPolicy, RingSet};
use crate::stats::QueueCounters;

/// A queue's rings, the SQEs in flight on them, and the completions taken from them and not
/// yet handled.
pub struct Engine {
    queue: u16,
    /// None only once the connection handed the set back ([`Engine::take_set`]).
    set: Option<RingSet>,
    /// SQEs submitted and not yet completed.
    inflight: usize,
    /// Completions taken off the ring early (to make room for submission), and SQEs that could
    /// not be queued, completed here with -ECANCELED: handled by the next [`Engine::reap`].
    done: Vec<(u64, i32)>,
    counters: Arc<QueueCounters>,
}

impl Engine {
    pub fn new(queue: u16, set: RingSet, counters: Arc<QueueCounters>) -> Self {
        Engine {
            queue,
            set: Some(set),
            inflight: 0,
            done: Vec::new(),
            counters,
        }
    }

    /// Serve `mem` from the ring whose allowlist is `policy`. Refused while SQEs are in flight
    /// or completions wait: the caller drains the queue first.
    pub fn arm(
        &mut self,
        policy: &RingPolicy,
        map: FixedBufferMap,
        mem: Arc<GuestMemoryMmap>,
    ) -> Result<(), RingError> {
        self.expect_idle()?;
        match self.set.as_mut() {
            Some(set) => set.arm(policy, map, mem),
            None => Err(RingError::NoRing {
                queue: self.queue,
                ops: policy.sqe_op_names(),
            }),
        }
    }

    /// Serve nothing (the guest RAM is unregistered). Refused while SQEs are in flight.
    pub fn disarm(&mut self) -> Result<(), RingError> {
        self.expect_idle()?;
        self.set.as_mut().map_or(Ok(()), |s| s.disarm())
    }

    /// Hand the ring set back, disarmed (the connection is over and nothing is in flight).
    pub fn take_set(&mut self) -> Result<RingSet, RingError> {
        self.disarm()?;
        self.done.clear();
        self.set.take().ok_or(RingError::NoRing {
            queue: self.queue,
            ops: String::new(),
        })
    }

    fn expect_idle(&self) -> Result<(), RingError> {
        if self.inflight > 0 || !self.done.is_empty() {
            return Err(RingError::Layout(format!(
                "queue {}: the ring's buffers cannot change with {} I/O operation(s) in flight",
                self.queue,
                self.inflight + self.done.len()
            )));
        }
        Ok(())
    }

    pub fn is_armed(&self) -> bool {
        self.map().is_some()
    }

    /// The fixed buffers of the armed ring.
    pub fn map(&self) -> Option<&FixedBufferMap> {
        self.set.as_ref().and_then(|s| s.map())
    }

    /// SQEs submitted and not yet completed.
    pub fn sqes_in_flight(&self) -> usize {
        self.inflight
    }

    /// SQEs queued and not submitted, plus completions not yet handled: work a pass must
    /// finish before it sleeps.
    pub fn unfinished(&mut self) -> usize {
        self.queued() + self.done.len()
    }

    pub fn queued(&mut self) -> usize {
        self.ring().map_or(0, |r| r.submission().len())
    }

    fn ring(&mut self) -> Option<&mut io_uring::IoUring> {
        self.set.as_mut().and_then(|s| s.ring_mut())
    }

    /// Whether the ring holds completions (polling's question).
    pub fn has_completions(&mut self) -> bool {
        !self.done.is_empty() || self.ring().is_some_and(|r| !r.completion().is_empty())
    }

    /// Switch the ring's completion eventfd signals on or off (off while polling).
    pub fn set_completion_signals(&mut self, on: bool) {
        if let Some(r) = self.ring() {
            let cq = r.completion();
            if on {
                cq.enable_eventfd();
            } else {
                cq.disable_eventfd();
            }
        }
    }

    /// Move every completion to `out` (emptied first).
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.clear();
        std::mem::swap(out, &mut self.done);
        self.drain(out);
    }

    /// Move the ring's completions to `out`.
    fn drain(&mut self, out: &mut Vec<(u64, i32)>) {
        let before = out.len();
        if let Some(r) = self.set.as_mut().and_then(|s| s.ring_mut()) {
            out.extend(r.completion().map(|c| (c.user_data(), c.result())));
        }
        self.inflight = self.inflight.saturating_sub(out.len() - before);
    }

    /// Queue one SQE, submitting what is queued if the submission queue is full. An SQE that
    /// cannot be queued (no ring, or a queue that stays full) completes with -ECANCELED, as if
    /// the kernel had failed it: no request waits forever for a lost SQE.
    pub fn push(&mut self, e: squeue::Entry) {
        if !self.try_push(&e) {
            self.done.push((e.get_user_data(), -libc::ECANCELED));
        }
    }

    fn try_push(&mut self, e: &squeue::Entry) -> bool {
        for _ in 0..1000 {
            let queue = self.queue;
            let Some(ring) = self.ring() else {
                error!("queue {queue}: no ring to submit to; the request fails");
                return false;
            };
            // SAFETY: the SQE names only fixed files and fixed buffers of this ring; its buffer
            // pointer lies in a registered buffer (checked by translation, re-checked by the
            // kernel), which the ring set keeps mapped while it is registered.
            if unsafe { ring.submission().push(e) }.is_ok() {
                self.inflight += 1;
                self.counters.sqes.add(1);
                self.count_durability(e);
                return true;
            }
            self.submit();
        }
        error!(
            "queue {}: submission queue stays full; the request fails",
            self.queue
        );
        false
    }

    /// Count what the kernel is told to make durable, from the SQE itself.
    fn count_durability(&self, e: &squeue::Entry) {
        let flags = sqe_op_flags(e);
        match e.get_opcode() as u8 {
            opcode::WriteFixed::CODE | opcode::WritevFixed::CODE
                if flags & libc::RWF_DSYNC as u32 != 0 =>
            {
                self.counters.dsync_writes.add(1)
            }
            opcode::Fsync::CODE if flags & types::FsyncFlags::DATASYNC.bits() != 0 => {
                self.counters.fdatasyncs.add(1)
            }
            _ => {}
        }
    }

    /// Hand queued SQEs to the kernel: one io_uring_enter for the whole batch.
    pub fn submit(&mut self) {
        for _ in 0..1000 {
            let Some(ring) = self.ring() else {
                return;
            };
            if ring.submission().is_empty() {
                return;
            }
            let submitted = ring.submit();
            self.counters.enters.add(1);
            match submitted {
                Ok(_) => continue,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The completion queue is full: take its completions (handled by the
                    // next reap) to make room.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                        let mut done = std::mem::take(&mut self.done);
                        self.drain(&mut done);
                        self.done = done;
                    }
                    _ => {
                        error!("queue {}: io_uring_enter failed: {e}", self.queue);
                        return;
                    }
                },
            }
        }
    }

    /// Wait until every SQE has completed, or `deadline`; completions (also those taken
    /// earlier) are dropped unhandled. Returns the SQEs still in flight.
    pub fn quiesce(&mut self, deadline: Instant) -> usize {
        if self.inflight > 0 {
            info!(
                "queue {}: waiting for {} I/O operation(s) in flight",
                self.queue, self.inflight
            );
        }
        let queue = self.queue;
        while self.inflight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(ring) = self.ring() else {
                break;
            };
            let slice = left.min(Duration::from_millis(200));
            let ts = types::Timespec::from(slice);
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(err) if matches!(err.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(err) => {
                    warn!("queue {queue}: waiting for completions: {err}");
                    break;
                }
            }
            let done = ring.completion().count();
            self.inflight = self.inflight.saturating_sub(done);
        }
        self.done.clear();
        self.inflight
    }

    /// Block until the current ring has at least one completion (tests drive the kernel).
    #[cfg(test)]
    pub fn wait_for_completion(&mut self) {
        if let Some(r) = self.ring() {
            r.submitter().submit_and_wait(1).expect("io_uring_enter");
        }
    }
}

/// The `op_flags` word of an SQE (rw_flags, fsync_flags...), as the kernel will read it.
fn sqe_op_flags(e: &squeue::Entry) -> u32 {
    use crate::kernel::abi::{SQE_OP_FLAGS_OFFSET, SQE_SIZE};
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == SQE_SIZE);
    // SAFETY: `Entry` is a repr(C) wrapper around `struct io_uring_sqe` (its size asserted
    // above), whose op_flags union is the u32 at SQE_OP_FLAGS_OFFSET; the read stays inside `e`.
    unsafe {
        std::ptr::read_unaligned(
            (e as *const squeue::Entry)
                .cast::<u8>()
                .add(SQE_OP_FLAGS_OFFSET)
                .cast::<u32>(),
        )
    }
}
