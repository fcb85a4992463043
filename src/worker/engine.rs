//! The queue's restricted rings: push SQEs, submit them, reap their completions. Knows nothing
//! of requests: what a completion means is `complete`'s business.

use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use log::{error, info, warn};
use vm_memory::GuestMemoryMmap;

use crate::guest_map::FixedBufferMap;
use crate::stats::QueueCounters;

/// One restricted ring and the memory layout it was registered with.
pub struct Engine {
    ring: IoUring,
    map: FixedBufferMap,
    /// Keeps the guest RAM mappings behind the fixed buffers alive as long as the ring.
    _mem: Arc<GuestMemoryMmap>,
    /// SQEs submitted and not yet completed.
    inflight: usize,
}

impl Engine {
    pub fn new(ring: IoUring, map: FixedBufferMap, mem: Arc<GuestMemoryMmap>) -> Self {
        Engine {
            ring,
            map,
            _mem: mem,
            inflight: 0,
        }
    }

    /// Move every completion of this ring to `out`.
    fn drain(&mut self, out: &mut Vec<(u64, i32)>) {
        let before = out.len();
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.inflight = self.inflight.saturating_sub(out.len() - before);
    }
}

/// A queue's ring for new requests, the rings of older memory layouts still completing
/// requests, and the completions taken from them and not yet handled.
pub(super) struct Rings {
    queue: u16,
    current: Option<Engine>,
    /// Rings of an older memory layout, kept until their last request completes.
    retiring: Vec<Engine>,
    /// Completions taken off a ring early (to make room for submission), and SQEs that could
    /// not be queued, completed here with -ECANCELED: handled by the next [`Rings::reap`].
    done: Vec<(u64, i32)>,
    counters: Arc<QueueCounters>,
}

impl Rings {
    pub fn new(queue: u16, counters: Arc<QueueCounters>) -> Self {
        Rings {
            queue,
            current: None,
            retiring: Vec::new(),
            done: Vec::new(),
            counters,
        }
    }

    /// Make `engine` the ring for new requests (None: no ring); the previous one retires
    /// once idle.
    pub fn replace(&mut self, engine: Option<Engine>) {
        let old = std::mem::replace(&mut self.current, engine);
        if let Some(old) = old.filter(|e| e.inflight > 0) {
            self.retiring.push(old);
        }
    }

    pub fn is_installed(&self) -> bool {
        self.current.is_some()
    }

    /// The fixed buffers of the ring for new requests.
    pub fn map(&self) -> Option<&FixedBufferMap> {
        self.current.as_ref().map(|e| &e.map)
    }

    pub fn retiring(&self) -> usize {
        self.retiring.len()
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut Engine> {
        self.current.iter_mut().chain(self.retiring.iter_mut())
    }

    /// SQEs submitted on any ring and not yet completed.
    pub fn sqes_in_flight(&self) -> usize {
        let all = self.current.iter().chain(self.retiring.iter());
        all.map(|e| e.inflight).sum()
    }

    /// SQEs queued and not submitted, plus completions not yet handled: work a pass must
    /// finish before it sleeps.
    pub fn unfinished(&mut self) -> usize {
        self.queued() + self.done.len()
    }

    pub fn queued(&mut self) -> usize {
        self.current
            .as_mut()
            .map_or(0, |e| e.ring.submission().len())
    }

    /// Whether a ring holds completions (polling's question).
    pub fn has_completions(&mut self) -> bool {
        !self.done.is_empty() || self.all_mut().any(|e| !e.ring.completion().is_empty())
    }

    /// Switch the rings' completion eventfd signals on or off (off while polling).
    pub fn set_completion_signals(&mut self, on: bool) {
        for e in self.all_mut() {
            let cq = e.ring.completion();
            if on {
                cq.enable_eventfd();
            } else {
                cq.disable_eventfd();
            }
        }
    }

    /// Move every completion to `out` (emptied first); drop the rings that retired.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.clear();
        std::mem::swap(out, &mut self.done);
        for e in self.current.iter_mut().chain(self.retiring.iter_mut()) {
            e.drain(out);
        }
        self.retiring.retain(|e| e.inflight > 0);
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
            let Some(engine) = self.current.as_mut() else {
                error!(
                    "queue {}: no ring to submit to; the request fails",
                    self.queue
                );
                return false;
            };
            // SAFETY: the SQE names only fixed files and fixed buffers of this ring; its buffer
            // pointer lies in a registered buffer (checked by translation, re-checked by the
            // kernel), which `Engine::_mem` keeps mapped while the ring lives.
            if unsafe { engine.ring.submission().push(e) }.is_ok() {
                engine.inflight += 1;
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
            let Some(engine) = self.current.as_mut() else {
                return;
            };
            if engine.ring.submission().is_empty() {
                return;
            }
            self.counters.enters.add(1);
            match engine.ring.submit() {
                Ok(_) => continue,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The completion queue is full: take its completions (handled by the
                    // next reap) to make room.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => engine.drain(&mut self.done),
                    _ => {
                        error!("queue {}: io_uring_enter failed: {e}", self.queue);
                        return;
                    }
                },
            }
        }
    }

    /// Wait until every SQE of every ring has completed, or `deadline`; completions (also
    /// those taken earlier) are dropped unhandled. Returns the SQEs still in flight.
    pub fn quiesce(&mut self, deadline: Instant) -> usize {
        let waiting = self.sqes_in_flight();
        if waiting > 0 {
            info!(
                "queue {}: waiting for {waiting} I/O operation(s) in flight",
                self.queue
            );
        }
        let queue = self.queue;
        for e in self.all_mut() {
            while e.inflight > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let slice = left.min(Duration::from_millis(200));
                let ts = types::Timespec::from(slice);
                let args = types::SubmitArgs::new().timespec(&ts);
                match e.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(err) if matches!(err.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                    Err(err) => {
                        warn!("queue {queue}: waiting for completions: {err}");
                        break;
                    }
                }
                let done = e.ring.completion().count();
                e.inflight = e.inflight.saturating_sub(done);
            }
        }
        self.done.clear();
        self.retiring.retain(|e| e.inflight > 0);
        self.sqes_in_flight()
    }

    /// Block until the current ring has at least one completion (tests drive the kernel).
    #[cfg(test)]
    pub fn wait_for_completion(&mut self) {
        if let Some(e) = self.current.as_mut() {
            e.ring
                .submitter()
                .submit_and_wait(1)
                .expect("io_uring_enter");
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
