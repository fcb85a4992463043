//! One pass of the worker after a wakeup: reap, take requests, submit, poll while busy, and
//! tell the guest. The only place that goes round the whole corridor: intake → build →
//! engine → completion, and a completion's follow-up step back to the engine.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::build::follow_up_sqe;
use super::{call, suppressed_note, QueueState, Shared, Vring, VringState, MAX_POLL_STRETCH};

/// Longest a completion waits for the I/O limits' next timeout instead of waking the worker.
const HOLD_COMPLETIONS_FOR: Duration = Duration::from_millis(5);

impl QueueState {
    /// Handle one wakeup of the worker: reap completions, take new requests, and while the
    /// queue is busy keep polling (see [`PollWindow`]) with guest kicks and completion
    /// eventfd signals switched off, so that a busy queue costs no wakeups at all. `stop`
    /// is raised by the control thread when it needs the queue (GET_VRING_BASE, a new ring).
    pub fn run(
        &mut self,
        vring: &Vring,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        completion_event: bool,
        stop: &AtomicBool,
    ) {
        self.counters.wakeups.add(1);
        if completion_event {
            // Reset the eventfd before reaping, so a completion that lands after the reap
            // wakes us again.
            let _ = self.completion_fd.read();
        }
        let mut vs = vring.get_mut();
        self.call_wedged = false;
        self.guard_call_fd(&vs);
        let serving = self.engine.is_armed()
            && self.limits.is_some()
            && vs.get_queue().ready()
            && vs.is_enabled();
        // A queue the I/O limits hold back is not busy: no polling (its completions and the
        // limits' timeout wake it).
        let budget = if serving && self.throttled_until.is_none() {
            self.poll.budget(Instant::now())
        } else {
            Duration::ZERO
        };
        if budget.is_zero() {
            self.step(&mut vs, mem, shared, serving, true, stop);
            self.notify(&mut vs);
            if serving {
                self.poll.gave_up(Instant::now());
            }
            self.hold_completions(&mut vs, mem, shared, stop);
            return;
        }

        self.engine.set_completion_signals(false);
        let entered = Instant::now();
        let mut last = entered;
        self.step(&mut vs, mem, shared, true, false, stop);
        self.notify(&mut vs);
        loop {
            // A request the I/O limits hold back is looked at again when they let it go, not
            // polled for.
            let requests = self.throttled_until.is_none() && self.has_requests(&vs, mem);
            if self.engine.has_completions() || requests {
                self.counters.poll_hits.add(1);
                self.step(&mut vs, mem, shared, true, false, stop);
                self.notify(&mut vs);
                last = Instant::now();
            } else if last.elapsed() >= budget {
                self.poll.gave_up(Instant::now());
                break;
            }
            if stop.load(Ordering::Relaxed)
                || entered.elapsed() >= MAX_POLL_STRETCH
                || self.throttled_until.is_some()
            {
                break;
            }
            std::hint::spin_loop();
        }
        // Back to sleeping: signals on, then one more look so that nothing that arrived
        // before they were on is left behind.
        self.engine.set_completion_signals(true);
        self.completions_held = false;
        self.step(&mut vs, mem, shared, true, true, stop);
        self.notify(&mut vs);
        self.hold_completions(&mut vs, mem, shared, stop);
    }

    /// While the I/O limits hold a request back for a short while, the completions of the
    /// requests they let go wait for that timeout (one wakeup for several, at most
    /// [`HOLD_COMPLETIONS_FOR`] later); otherwise they signal as usual, and what landed while
    /// they did not is reaped now.
    fn hold_completions(
        &mut self,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        stop: &AtomicBool,
    ) {
        let hold = self
            .throttled_until
            .is_some_and(|t| t <= Instant::now() + HOLD_COMPLETIONS_FOR);
        if hold == self.completions_held {
            return;
        }
        self.completions_held = hold;
        self.engine.set_completion_signals(!hold);
        if !hold {
            self.step(vs, mem, shared, true, true, stop);
            self.notify(vs);
        }
    }

    /// Warn once per new fault absorbed by the SIGBUS handler.
    pub fn report_memory_faults(&mut self) {
        let n = crate::sandbox::GUEST_MEMORY_FAULTS.load(Ordering::Relaxed);
        if n != self.faults_seen {
            self.faults_seen = n;
            warn!(
                "queue {}: guest RAM vanished under us ({n} page(s) so far): the VMM shrank a \
                 memory file it had shared; those pages now read as zeroes",
                self.index
            );
        }
    }

    /// Reap, take new requests, submit them, and reap what already completed. With
    /// `rearm`, guest notifications are re-enabled after taking requests; without, they stay
    /// off (the guest does not kick while we poll).
    fn step(
        &mut self,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        serving: bool,
        rearm: bool,
        stop: &AtomicBool,
    ) {
        self.reap(vs, mem);
        if serving {
            self.take_requests(vs, mem, shared, rearm, stop);
        }
        // Reaping can queue follow-up SQEs (a write-zeroes fallback, a writethrough
        // fdatasync), and an SQE that cannot be queued comes back as a completion: go round
        // until nothing is left, so none waits for an unrelated kick.
        for _ in 0..8 {
            self.engine.submit();
            self.reap(vs, mem);
            if self.engine.unfinished() == 0 {
                return;
            }
        }
        // Still more: come back at once rather than hold the queue lock.
        self.wake_self();
    }

    /// The guest's call fd must never block us: a VMM could hand over the write end of a
    /// full pipe. Make it non-blocking (a lost notification is the VMM's own doing).
    fn guard_call_fd(&mut self, vs: &VringState<'_>) {
        let Some(call) = vs.get_call() else { return };
        let fd = call.as_raw_fd();
        // SAFETY: fcntl on an fd the vring owns; F_GETFL/F_SETFL only change status flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
    }

    /// Signal the guest's call fd, never blocking for longer than the watchdog allows (see
    /// `call`). A write that fails is the VMM's doing (it filled the counter): the
    /// notification is dropped, and the call fd is left alone for the rest of this pass.
    fn signal_call(&mut self, vs: &VringState<'_>) {
        if self.call_wedged {
            return;
        }
        let Some(call) = vs.get_call() else { return };
        if let Err(e) = self.call_watch.signal(call.as_raw_fd()) {
            self.call_wedged = true;
            if let Some(n) = self.warn_limit.allow(Instant::now()) {
                call::warn_dropped(self.index, &e, &suppressed_note(n));
            }
        }
    }

    /// Tell the VMM the dirty log was written (SET_LOG_FD), never blocking (see `call.rs`).
    #[cold]
    fn kick_log(&self) {
        if let Some(f) = &self.log_kick {
            if let Err(e) = self.call_watch.signal(f.as_raw_fd()) {
                debug!("queue {}: cannot signal the log fd: {e}", self.index);
            }
        }
    }

    /// Hand every completion to its request, and the follow-up steps requests ask for to the
    /// engine (queued: the caller submits).
    pub(super) fn reap(&mut self, vs: &mut VringState<'_>, mem: &GuestMemoryMmap) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.engine.reap(&mut cqes);
        if !cqes.is_empty() {
            // One clock read for the whole batch: the completion time of its requests.
            self.clock = Instant::now();
        }
        for &(ud, res) in &cqes {
            if let Some(next) = self.on_completion(ud, res, vs, mem) {
                self.engine.push(follow_up_sqe(next));
            }
        }
        self.cqes = cqes;
    }

    fn has_requests(&self, vs: &VringState<'_>, mem: &GuestMemoryMmap) -> bool {
        let q = vs.get_queue();
        q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map(|idx| idx.0 != q.next_avail())
            .unwrap_or(false)
    }

    /// Tell the guest about new used entries, if it wants to hear.
    pub(super) fn notify(&mut self, vs: &mut VringState<'_>) {
        if self.log.is_some() {
            self.log_used_ring(vs);
            self.kick_log();
        }
        if std::mem::take(&mut self.used_added) {
            match vs.needs_notification() {
                Ok(true) => {
                    self.counters.notifications.add(1);
                    self.signal_call(vs);
                }
                Ok(false) => {}
                Err(e) => debug!("queue {}: cannot read used_event: {e}", self.index),
            }
        }
    }

    /// Log the whole used ring: its elements and index (written by `add_used`) and
    /// `avail_event` (written when notifications are re-enabled with EVENT_IDX). A few pages
    /// at most, once per pass, before the guest is signalled.
    #[cold]
    fn log_used_ring(&self, vs: &VringState<'_>) {
        let Some(log) = &self.log else { return };
        let q = vs.get_queue();
        // flags, idx, ring[size], avail_event
        let len = 6 + 8 * u64::from(q.size());
        log.mark(q.used_ring(), len);
        if let Some(a) = self.used_log_addr.filter(|&a| a != q.used_ring()) {
            log.mark(a, len);
        }
    }
}
