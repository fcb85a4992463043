//! Intake: take descriptor chains off the avail ring (heads left in flight by a previous
//! backend first), parse them and start each request (`build`, `zeroing`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{debug, warn};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{suppressed_note, QueueState, Shared, VringState, STATUS_IOERR, STATUS_OK};
use crate::config::SERIAL_LEN;
use crate::request::{self, Desc, Op, Parsed};
use crate::stats::{ErrorKind, OpKind};
use crate::throttle::{Dir, Reservation, Throttle};

/// A request the I/O limits let go this much before its reservation's time starts at once:
/// one wakeup serves every request due within it (the rate over time is the limits' own).
const THROTTLE_SLACK: Duration = Duration::from_millis(2);

/// The reservation of the request at the head of the avail ring, which the I/O limits hold
/// back: it is popped again, and started, once the reservation's time has come.
pub(super) struct Held {
    /// The avail ring position it was popped from, and its head.
    pos: u16,
    head: u16,
    dir: Dir,
    bytes: u64,
    since: Instant,
    reservation: Reservation,
}

/// Whether a request was started, or held back by the I/O limits (it goes back to the ring).
#[derive(PartialEq, Eq)]
enum Taken {
    Yes,
    HeldBack,
}

impl QueueState {
    pub(super) fn take_requests(
        &mut self,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        rearm: bool,
        stop: &AtomicBool,
    ) {
        // Rounds in a row that popped nothing although the avail index said "more".
        let mut empty_rounds = 0;
        // A guest that keeps refilling the ring must not keep the worker here (and the queue
        // locked) forever: at most two rings' worth of requests per pass, and none once the
        // control thread asks for the queue. What is left is taken on the next wakeup.
        let mut budget = 2 * usize::from(vs.get_queue().size()).max(1);
        // The start time of the requests taken next (refreshed after each submission).
        self.clock = Instant::now();
        self.throttled_until = None;
        loop {
            if let Err(e) = vs.disable_notification() {
                debug!("queue {}: disable_notification: {e}", self.index);
            }
            let mut popped = 0usize;
            // What a previous backend left in flight goes first (see src/inflight.rs).
            while let Some(head) = self.resubmit.pop_front() {
                let q = vs.get_queue();
                crate::inflight::read_chain(mem, q.desc_table(), q.size(), head, &mut self.descs);
                self.take_one(head, None, vs, mem, shared, &mut popped, &mut budget);
                if budget == 0 || stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            while budget > 0 && !stop.load(Ordering::Relaxed) {
                let pos = vs.get_queue().next_avail();
                let Some(chain) = vs.get_queue_mut().pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                self.descs.clear();
                self.descs.extend(chain.map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                }));
                let taken =
                    self.take_one(head, Some(pos), vs, mem, shared, &mut popped, &mut budget);
                if taken == Taken::HeldBack {
                    // Back into the ring: the worker looks again when the limits let it go
                    // (notifications stay off meanwhile: a kick would change nothing).
                    vs.get_queue_mut().set_next_avail(pos);
                    self.engine.submit();
                    return;
                }
            }
            if stop.load(Ordering::Relaxed) {
                // The control thread wakes the worker when it hands the queue back.
                return;
            }
            if budget == 0 {
                // Leave notifications off and come back: nothing is lost, nothing waits on a kick.
                self.wake_self();
                return;
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
                        if let Some(n) = self.warn_limit.allow(Instant::now()) {
                            warn!(
                                "queue {}: avail index {:?} is inconsistent with the ring; \
                                 waiting for the next kick{}",
                                self.index,
                                vs.get_queue().avail_idx(mem, Ordering::Acquire).ok(),
                                suppressed_note(n)
                            );
                        }
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

    /// Start one request whose descriptors are in `self.descs` (popped from avail ring
    /// position `pos`, or None: resubmitted after a restart, never held back), and submit what
    /// is queued once a batch is full.
    #[allow(clippy::too_many_arguments)]
    fn take_one(
        &mut self,
        head: u16,
        pos: Option<u16>,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        popped: &mut usize,
        budget: &mut usize,
    ) -> Taken {
        if self.start(head, pos, vs, mem, shared) == Taken::HeldBack {
            return Taken::HeldBack;
        }
        *popped += 1;
        *budget = budget.saturating_sub(1);
        if self.engine.queued() >= self.submit_batch {
            self.engine.submit();
            self.clock = Instant::now();
        }
        Taken::Yes
    }

    /// Whether the I/O limits let the request at avail position `pos` start now; if not, its
    /// reservation is kept and the worker's next look is set for its time.
    fn admit(&mut self, pos: u16, head: u16, dir: Dir, bytes: u64, throttle: &Throttle) -> bool {
        let now = Instant::now();
        let generation = throttle.generation();
        let held = match self.held.take() {
            // The same request (a guest may change a chain it made available: a larger one
            // than reserved is reserved again).
            Some(h)
                if h.pos == pos
                    && h.head == head
                    && h.dir == dir
                    && bytes <= h.bytes
                    && h.reservation.generation == generation =>
            {
                h
            }
            other => Held {
                pos,
                head,
                dir,
                bytes,
                since: other
                    .filter(|h| h.pos == pos && h.head == head)
                    .map_or(now, |h| h.since),
                reservation: throttle.reserve(dir, bytes, now),
            },
        };
        if held.reservation.ready <= now + THROTTLE_SLACK {
            if held.since < now {
                throttle.count_wait(now - held.since);
            }
            return true;
        }
        self.throttled_until = Some(held.reservation.ready);
        self.held = Some(held);
        false
    }

    /// Whether `head` can start a request: in range and not in flight already (a guest that
    /// says otherwise has its chain dropped, with a rate-limited warning).
    fn head_usable(&mut self, head: u16, vs: &VringState<'_>) -> bool {
        let why = if usize::from(head) >= self.slots.len()
            || usize::from(head) >= usize::from(vs.get_queue().size())
        {
            "is out of range; dropped"
        } else if self.slots.is_busy(head) {
            "made available again while in flight; ignored"
        } else {
            return true;
        };
        self.counters.error(ErrorKind::Dropped, 1);
        if let Some(n) = self.warn_limit.allow(Instant::now()) {
            warn!(
                "queue {}: descriptor head {head} {why}{}",
                self.index,
                suppressed_note(n)
            );
        }
        false
    }

    /// Start one request whose descriptors are in `self.descs`, unless the I/O limits hold it
    /// back (only a request popped from the avail ring, at `pos`).
    fn start(
        &mut self,
        head: u16,
        pos: Option<u16>,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
    ) -> Taken {
        let Some(limits) = self.limits else {
            return Taken::Yes;
        };
        if !self.head_usable(head, vs) {
            return Taken::Yes;
        }
        let req = request::parse(&self.descs, mem, &limits, &mut self.segs, &mut self.ranges);
        if let (Some(pos), true) = (pos, shared.throttle.active()) {
            if let Some((dir, bytes)) = throttled_cost(&req.parsed) {
                if !self.admit(pos, head, dir, bytes, &shared.throttle) {
                    return Taken::HeldBack;
                }
            }
        }
        if let Some(t) = self.inflight.as_mut() {
            t.mark(head);
        }
        match req.parsed {
            Parsed::Fail(status, reason) => {
                debug!("queue {}: request {head} refused: {reason:?}", self.index);
                self.counters.error(reason.into(), 1);
                self.publish(head, req.status, status, 1, vs, mem);
            }
            Parsed::Op(Op::Nop) => {
                // A FLUSH on a read-only disk: nothing to make durable.
                self.account(OpKind::Flush, 0, Some(self.clock), None);
                self.publish(head, req.status, STATUS_OK, 1, vs, mem)
            }
            Parsed::Op(Op::GetId) => self.serve_get_id(head, req.status, vs, mem, shared),
            Parsed::Op(Op::Read { offset, len }) => {
                self.start_rw(head, req.status, offset, len, false, vs, mem, shared)
            }
            Parsed::Op(Op::Write { offset, len }) => {
                self.start_rw(head, req.status, offset, len, true, vs, mem, shared)
            }
            Parsed::Op(Op::Flush) => self.start_flush(head, req.status),
            Parsed::Op(Op::Zero) => self.start_zero(head, req.status, vs, mem, shared),
        }
        Taken::Yes
    }

    /// GET_ID: the serial, written at once (no I/O).
    fn serve_get_id(
        &mut self,
        head: u16,
        status_addr: Option<u64>,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
    ) {
        let mut written = 0u32;
        let mut ok = true;
        for s in &self.segs {
            let end = (written + s.len) as usize;
            let src = &shared.serial[written as usize..end.min(SERIAL_LEN)];
            ok &= mem.write_slice(src, GuestAddress(s.addr)).is_ok();
            written += s.len;
        }
        if let Some(log) = &self.log {
            for s in &self.segs {
                log.mark(s.addr, u64::from(s.len));
            }
        }
        let (status, used) = if ok {
            (STATUS_OK, written + 1)
        } else {
            (STATUS_IOERR, 1)
        };
        let error = (!ok).then_some(ErrorKind::BadAddress);
        self.account(OpKind::GetId, u64::from(written), Some(self.clock), error);
        self.publish(head, status_addr, status, used, vs, mem);
    }
}

/// What a request counts for under the I/O limits (see `crate::throttle`): reads and writes
/// their bytes; FLUSH, DISCARD and WRITE_ZEROES one write of no bytes; nothing else counts.
fn throttled_cost(parsed: &Parsed) -> Option<(Dir, u64)> {
    match parsed {
        Parsed::Op(Op::Read { len, .. }) => Some((Dir::Read, *len)),
        Parsed::Op(Op::Write { len, .. }) => Some((Dir::Write, *len)),
        Parsed::Op(Op::Flush | Op::Zero) => Some((Dir::Write, 0)),
        _ => None,
    }
}
