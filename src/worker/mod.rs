//! The worker loop of one virtqueue: pop descriptor chains, parse them, translate their
//! buffers, turn them into SQEs on the queue's restricted ring, and turn completions back into
//! used-ring entries. One kick that brings N requests makes one `io_uring_enter`.
//!
//! By job, in the order a request goes (calls go one way, down this list):
//! - `queue_loop`: the worker thread's epoll loop; each wakeup runs one pass;
//! - `pass`: one pass (reap, take, submit, poll while busy, notify the guest);
//! - `intake`: take chains off the avail ring, parse them, start each request;
//! - `build` (reads, writes, flushes) and `zeroing` (discard, write-zeroes and their fallback
//!   where the filesystem refuses a step): the request's SQEs, tagged with a `UserData`;
//! - `engine`: the queue's armed ring: push, submit, reap;
//! - `complete`: a CQE back to its request (`slots`); one more step, if the request needs it,
//!   is returned to the pass as a value (`FollowUp`);
//! - `publish`: the status byte, used-ring entry and counters of a finished request;
//! - `call`: signalling the guest without ever blocking; `poll`: the polling window.
//!
//! This file holds the queue's state and what the control thread calls.

mod build;
mod call;
mod complete;
mod engine;
mod intake;
mod pass;
mod poll;
mod publish;
mod queue_loop;
mod slots;
mod user_data;
mod zeroing;

pub use poll::PollWindow;
pub use queue_loop::{QueueLoop, Serve};

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::SERIAL_LEN;
use crate::dirty_log::DirtyLog;
use crate::error::RingError;
use crate::guest_map::{FixedBufferMap, Piece};
use crate::inflight::QueueInflight;
use crate::request::{Desc, Limits, Segment, ZeroRange};
use crate::ring::{RingPolicy, RingSet};
use crate::stats::{QueueCounters, QueueSnapshot};
use engine::Engine;
use slots::{Slot, SlotTable, Started};
use zeroing::Zeroing;

/// The vring type the backend serves.
pub use crate::vring::Vring;
type VringState<'a> = std::sync::RwLockWriteGuard<
    'a,
    vhost_user_backend::VringState<vm_memory::GuestMemoryAtomic<GuestMemoryMmap>>,
>;

/// Fixed-file indices in every ring.
pub const FILE_PRIMARY: u32 = 0;
pub const FILE_BUFFERED: u32 = 1;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

/// Longest a worker keeps polling in one go before it returns to epoll, however busy.
const MAX_POLL_STRETCH: Duration = Duration::from_millis(2);

/// Rate limit for warnings a guest can trigger at will (a busy head made available again, an
/// out-of-range head, a corrupt avail index): at most `BURST` per `WINDOW` per queue, and the
/// next one that is logged says how many were suppressed.
#[derive(Debug)]
pub struct WarnLimit {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl WarnLimit {
    const BURST: u32 = 5;
    const WINDOW: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        WarnLimit {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to log a warning now; `Some(n)`: log it, and say that `n` were suppressed
    /// since the last one logged.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.window_start {
            Some(t) if now.saturating_duration_since(t) < Self::WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl Default for WarnLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// " (N similar warnings suppressed)", or nothing.
fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar warning(s) suppressed)")
    }
}

/// How a queue's worker trades CPU for latency and throughput (`--poll-us`,
/// `--submit-batch`).
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Longest polling window after a wakeup (see [`PollWindow`]); zero disables polling.
    pub max_poll: Duration,
    /// Most SQEs queued before they go to the kernel. One kick can bring a whole queue's worth
    /// of requests; submitting them in groups lets the disk start on the first while the rest
    /// are parsed, and its completions come back spread out rather than all at once, so a
    /// closed-loop guest refills the queue continuously instead of in lock-step rounds.
    pub submit_batch: usize,
}

/// Settings shared by every queue of one connection.
pub struct Shared {
    pub serial: [u8; SERIAL_LEN],
    /// Whether fixed file 0 is opened O_DIRECT (then fixed file 1 is the buffered twin).
    pub direct: bool,
    pub dio_mem_align: u64,
    pub dio_offset_align: u64,
    /// Whether rings allow READV_FIXED/WRITEV_FIXED (Linux 6.15+), used for requests that
    /// translate to more than one piece.
    pub vectored: bool,
    /// The guest's `writeback` config byte: when clear, writes are made durable (RWF_DSYNC)
    /// before they complete.
    pub writeback: AtomicBool,
    /// The device's I/O limits, shared by its queues.
    pub throttle: Arc<crate::throttle::Throttle>,
}

/// Everything one queue's worker owns. Locked by the worker for each event, and by the
/// control thread to install a new ring or to wait for in-flight requests.
pub struct QueueState {
    pub index: u16,
    /// The queue's rings (made at startup, lent for the connection) and what is in flight.
    engine: Engine,
    /// The requests in flight.
    slots: SlotTable,
    limits: Option<Limits>,
    /// What the filesystem refused of discard and write-zeroes, and what replaces it.
    zeroing: Zeroing,
    used_added: bool,
    poll: PollWindow,
    /// Most SQEs queued before they are submitted (see [`Tuning`]).
    submit_batch: usize,
    /// This queue's counters (for the life of the process: see `crate::stats`), and their
    /// values when this connection's queue state was made (for the log line at its end).
    counters: Arc<QueueCounters>,
    counters_at_start: QueueSnapshot,
    /// A recent time, read once per batch of requests taken or completions reaped rather than
    /// once per request: request latencies are measured with it.
    clock: Instant,
    faults_seen: u64,
    /// Guest-triggered warnings of this queue.
    warn_limit: WarnLimit,
    /// Security incidents of this queue (SQEs the kernel refused): rate-limited on their own,
    /// so that guest-triggered noise never hides one.
    security_limit: WarnLimit,
    completion_fd: EventFd,
    /// The watchdog's view of this queue's call-fd writes (see `call`).
    call_watch: Arc<call::CallWatch>,
    /// A call-fd write failed in this pass (the VMM filled the counter): no more in this pass.
    call_wedged: bool,
    /// This queue's part of the VMM's inflight region (INFLIGHT_SHMFD), if it gave one.
    inflight: Option<QueueInflight>,
    /// Heads a previous backend left in flight, oldest first: taken before the avail ring.
    resubmit: std::collections::VecDeque<u16>,
    /// The request at the head of the avail ring while the I/O limits hold it back (it stays
    /// in the ring meanwhile), and when the worker must look at it again (its epoll timeout).
    held: Option<intake::Held>,
    throttled_until: Option<Instant>,
    /// Completion signals are off while the limits' timeout is near (see `pass`).
    completions_held: bool,
    /// The migration's dirty log while the VMM asks for logging (`crate::dirty_log`).
    log: Option<Arc<DirtyLog>>,
    /// Where the VMM wants used-ring writes logged besides the ring itself
    /// (SET_VRING_ADDR's `log_guest_addr` with VHOST_VRING_F_LOG).
    used_log_addr: Option<u64>,
    /// The VMM's eventfd to signal after writing the dirty log (SET_LOG_FD).
    log_kick: Option<Arc<std::fs::File>>,
    // Scratch space reused for every request: no allocation on the hot path.
    descs: Vec<Desc>,
    segs: Vec<Segment>,
    ranges: Vec<ZeroRange>,
    pieces: Vec<Piece>,
    cqes: Vec<(u64, i32)>,
}

impl QueueState {
    /// The state of queue `index`, served by `rings` (the queue's ring set, lent for the
    /// connection and handed back by [`QueueState::take_ring_set`]).
    pub fn new(
        index: u16,
        max_queue_size: u16,
        tuning: Tuning,
        counters: Arc<QueueCounters>,
        rings: RingSet,
    ) -> std::io::Result<Self> {
        let completion_fd = rings.completion_fd().try_clone()?;
        Ok(QueueState {
            index,
            engine: Engine::new(index, rings, counters.clone()),
            slots: SlotTable::new(max_queue_size),
            limits: None,
            zeroing: Zeroing::default(),
            used_added: false,
            poll: PollWindow::new(tuning.max_poll),
            submit_batch: tuning.submit_batch.max(1),
            counters_at_start: counters.snapshot(),
            counters,
            clock: Instant::now(),
            faults_seen: 0,
            warn_limit: WarnLimit::new(),
            security_limit: WarnLimit::new(),
            completion_fd,
            call_watch: call::CallWatch::new(),
            call_wedged: false,
            inflight: None,
            resubmit: std::collections::VecDeque::new(),
            held: None,
            throttled_until: None,
            completions_held: false,
            log: None,
            used_log_addr: None,
            log_kick: None,
            descs: Vec::new(),
            segs: Vec::new(),
            ranges: Vec::new(),
            pieces: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// The eventfd every ring of this queue signals on completion (the ring set's); the
    /// worker's epoll watches it.
    pub fn completion_fd(&self) -> &EventFd {
        &self.completion_fd
    }

    /// This queue's counters.
    pub fn counters(&self) -> &QueueCounters {
        &self.counters
    }

    /// Make the worker run again soon (work left over from a bounded pass).
    fn wake_self(&self) {
        let _ = self.completion_fd.write(1);
    }

    /// Take `head`'s slot for a request that starts now.
    fn occupy(&mut self, head: u16, started: Started, ranges: Vec<ZeroRange>) -> &mut Slot {
        // Counted with the request it is about to take.
        let n = self.slots.in_flight() + 1;
        self.counters.inflight.set(n as u64);
        self.slots.occupy(head, started, ranges)
    }

    /// When the worker must look again at a request the I/O limits hold back (None: none is).
    pub fn throttled_until(&self) -> Option<Instant> {
        self.throttled_until
    }

    /// Requests in flight (each completes to the guest: a stopped queue waits for them).
    pub fn inflight_requests(&self) -> usize {
        self.slots.in_flight()
    }

    /// SQEs submitted on this queue's ring and not yet completed.
    pub fn sqes_in_flight(&self) -> usize {
        self.engine.sqes_in_flight()
    }

    /// Wait until every SQE of this queue has completed, or `deadline`; the
    /// completions are consumed without touching guest memory (the VMM is gone, or the process
    /// is ending). Returns the SQEs still in flight (0: nothing of this queue can land later).
    pub fn quiesce(&mut self, deadline: Instant) -> usize {
        self.engine.quiesce(deadline)
    }

    /// New limits for the same rings (a renegotiation that changed DISCARD or WRITE_ZEROES but
    /// not the ring policy).
    pub fn set_limits(&mut self, limits: Limits) {
        if self.limits.is_some() {
            self.limits = Some(limits);
        }
    }

    /// A new capacity (a live resize): requests parsed from now on are checked against it.
    pub fn set_capacity(&mut self, sectors: u64) {
        if let Some(l) = self.limits.as_mut() {
            l.capacity_sectors = sectors;
        }
    }

    /// Track this queue's requests in an inflight region (or stop tracking them), and
    /// resubmit the heads listed first. The worker is woken to do so.
    pub fn set_inflight(&mut self, tracking: Option<(QueueInflight, Vec<u16>)>) {
        match tracking {
            Some((t, heads)) => {
                self.inflight = Some(t);
                self.resubmit = heads.into();
            }
            None => {
                self.inflight = None;
                self.resubmit.clear();
            }
        }
        self.wake_self();
    }

    /// Log every write to guest RAM in `log` from now on (None: stop logging). Requests in
    /// flight are logged when they complete, whenever they started.
    pub fn set_dirty_log(&mut self, log: Option<Arc<DirtyLog>>) {
        self.log = log;
    }

    /// Signal `fd` after each pass that wrote the dirty log (SET_LOG_FD).
    pub fn set_log_kick(&mut self, fd: Option<Arc<std::fs::File>>) {
        self.log_kick = fd;
    }

    /// Log used-ring writes at `addr` too (SET_VRING_ADDR with VHOST_VRING_F_LOG).
    pub fn set_used_log_addr(&mut self, addr: Option<u64>) {
        self.used_log_addr = addr;
    }

    /// Serve guest RAM `mem` (as fixed buffers `map`) from the queue's ring for `policy`,
    /// parsing requests against `limits`. Called by the control thread once the queue has
    /// nothing in flight (else refused); the worker thread never registers anything. On
    /// failure the queue serves nothing until the next arm.
    pub fn arm(
        &mut self,
        policy: &RingPolicy,
        map: FixedBufferMap,
        mem: Arc<GuestMemoryMmap>,
        limits: Limits,
    ) -> Result<(), RingError> {
        self.limits = None;
        self.engine.arm(policy, map, mem)?;
        self.limits = Some(limits);
        Ok(())
    }

    /// Stop serving: no guest RAM, no limits; requests wait until the next arm. Refused while
    /// I/O is in flight.
    pub fn disarm(&mut self) -> Result<(), RingError> {
        self.limits = None;
        self.engine.disarm()
    }

    /// Hand the queue's ring set back, disarmed: the connection is over and nothing is in
    /// flight (else refused).
    pub fn take_ring_set(&mut self) -> Result<RingSet, RingError> {
        self.limits = None;
        self.engine.take_set()
    }
}

impl Drop for QueueState {
    fn drop(&mut self) {
        // What this connection did: the counters now, less what they were when it began.
        let now = self.counters.snapshot();
        let was = &self.counters_at_start;
        let requests = now.requests().saturating_sub(was.requests());
        if requests > 0 {
            info!(
                "queue {}: {} requests, {} SQEs in {} io_uring_enter calls, {} wakeups; \
                 {} RWF_DSYNC writes, {} fdatasyncs",
                self.index,
                requests,
                now.sqes - was.sqes,
                now.enters - was.enters,
                now.wakeups - was.wakeups,
                now.dsync_writes - was.dsync_writes,
                now.fdatasyncs - was.fdatasyncs
            );
        }
        self.counters.inflight.set(0);
    }
}

/// Raw fd of a queue's completion eventfd (for epoll registration).
pub fn completion_raw_fd(q: &QueueState) -> i32 {
    q.completion_fd.as_raw_fd()
}

#[cfg(test)]
mod tests;
