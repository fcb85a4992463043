//! The worker loop of one virtqueue: pop descriptor chains, parse them, translate their
//! buffers, turn them into SQEs on the queue's restricted ring, and turn completions back into
//! used-ring entries. One kick that brings N requests makes one `io_uring_enter`.
//!
//! By job: this file holds the queue's state and the wakeup loop (polling, notifications);
//! `intake` pops and starts requests, `sqe` builds and submits their SQEs, `complete` reaps
//! completions into used-ring entries, `poll` is the adaptive polling window, `queue_loop` is
//! the worker thread's epoll loop.

mod call;
mod complete;
mod intake;
mod poll;
mod queue_loop;
mod sqe;

pub use poll::PollWindow;
pub use queue_loop::QueueLoop;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use log::{debug, info, warn};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::SERIAL_LEN;
use crate::dirty_log::DirtyLog;
use crate::guest_map::{FixedBufferMap, Piece};
use crate::inflight::QueueInflight;
use crate::request::{Desc, Limits, Segment, ZeroRange};
use crate::stats::{ErrorKind, OpKind, QueueCounters, QueueSnapshot};

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
}

#[derive(Clone, Debug, Default)]
struct Slot {
    busy: bool,
    pending: u32,
    /// Why the request failed, once one of its SQEs did.
    error: Option<ErrorKind>,
    /// What it asked for and how many bytes it moves if it succeeds (for the counters).
    op: OpKind,
    bytes: u64,
    /// When it was taken off the virtqueue.
    start: Option<Instant>,
    status: Option<u64>,
    used_len: u32,
    ranges: Vec<ZeroRange>,
    /// Make the request's effect durable (fdatasync) before it completes: discard and
    /// write-zeroes under a writethrough cache.
    sync_after: bool,
    /// iovecs of a vectored request, alive until it completes.
    iov: Vec<[u64; 2]>,
    /// Guest-physical ranges a read lands in, logged when it completes (the kernel writes
    /// them; nothing else sees those writes).
    landed: Vec<[u64; 2]>,
}

const _: () = assert!(
    std::mem::size_of::<[u64; 2]>() == std::mem::size_of::<libc::iovec>()
        && std::mem::align_of::<libc::iovec>() <= std::mem::align_of::<[u64; 2]>()
);

/// Everything one queue's worker owns. Locked by the worker for each event, and by the
/// control thread to install a new ring or to wait for in-flight requests.
pub struct QueueState {
    pub index: u16,
    engine: Option<Engine>,
    /// Rings of an older memory layout, kept until their last request completes.
    retiring: Vec<Engine>,
    slots: Vec<Slot>,
    inflight_reqs: usize,
    limits: Option<Limits>,
    /// The filesystem refused FALLOC_FL_ZERO_RANGE (tmpfs): zero in place by punching a hole
    /// and allocating it again.
    zero_range_unsupported: bool,
    /// The filesystem refused FALLOC_FL_PUNCH_HOLE: write-zeroes with UNMAP zeroes in place.
    punch_unsupported: bool,
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
    /// The migration's dirty log while the VMM asks for logging (`crate::dirty_log`).
    log: Option<Arc<DirtyLog>>,
    /// Where the VMM wants used-ring writes logged besides the ring itself
    /// (SET_VRING_ADDR's `log_guest_addr` with VHOST_VRING_F_LOG).
    used_log_addr: Option<u64>,
    // Scratch space reused for every request: no allocation on the hot path.
    descs: Vec<Desc>,
    segs: Vec<Segment>,
    ranges: Vec<ZeroRange>,
    pieces: Vec<Piece>,
    cqes: Vec<(u64, i32)>,
}

impl QueueState {
    pub fn new(
        index: u16,
        max_queue_size: u16,
        tuning: Tuning,
        counters: Arc<QueueCounters>,
    ) -> std::io::Result<Self> {
        Ok(QueueState {
            index,
            engine: None,
            retiring: Vec::new(),
            slots: vec![Slot::default(); usize::from(max_queue_size)],
            inflight_reqs: 0,
            limits: None,
            zero_range_unsupported: false,
            punch_unsupported: false,
            used_added: false,
            poll: PollWindow::new(tuning.max_poll),
            submit_batch: tuning.submit_batch.max(1),
            counters_at_start: counters.snapshot(),
            counters,
            clock: Instant::now(),
            faults_seen: 0,
            warn_limit: WarnLimit::new(),
            security_limit: WarnLimit::new(),
            completion_fd: EventFd::new(EFD_NONBLOCK)?,
            call_watch: call::CallWatch::new(),
            call_wedged: false,
            inflight: None,
            resubmit: std::collections::VecDeque::new(),
            log: None,
            used_log_addr: None,
            descs: Vec::new(),
            segs: Vec::new(),
            ranges: Vec::new(),
            pieces: Vec::new(),
            cqes: Vec::new(),
        })
    }

    /// The eventfd every ring of this queue signals on completion; the worker's epoll
    /// watches it.
    pub fn completion_fd(&self) -> &EventFd {
        &self.completion_fd
    }

    /// This queue's counters.
    pub fn counters(&self) -> &QueueCounters {
        &self.counters
    }

    /// Count a request that completed: latency from its start to now (`self.clock`).
    fn account(&self, op: OpKind, bytes: u64, start: Option<Instant>, error: Option<ErrorKind>) {
        let ns = start.map_or(0, |t| {
            self.clock.saturating_duration_since(t).as_nanos() as u64
        });
        self.counters.complete(op, bytes, ns, error);
    }

    /// Requests in flight (each completes to the guest: a stopped queue waits for them).
    pub fn inflight_requests(&self) -> usize {
        self.inflight_reqs
    }

    /// Rings of an older memory table still waiting for their last requests.
    pub fn retiring_rings(&self) -> usize {
        self.retiring.len()
    }

    /// SQEs submitted on any ring of this queue and not yet completed.
    pub fn sqes_in_flight(&self) -> usize {
        self.engine
            .iter()
            .chain(self.retiring.iter())
            .map(|e| e.inflight)
            .sum()
    }

    /// Wait until every SQE of every ring of this queue has completed, or `deadline`; the
    /// completions are consumed without touching guest memory (the VMM is gone, or the process
    /// is ending). Returns the SQEs still in flight (0: nothing of this queue can land later).
    pub fn quiesce(&mut self, deadline: Instant) -> usize {
        let waiting: usize = self
            .engine
            .iter()
            .chain(self.retiring.iter())
            .map(|e| e.inflight)
            .sum();
        if waiting > 0 {
            info!(
                "queue {}: waiting for {waiting} I/O operation(s) in flight",
                self.index
            );
        }
        for e in self.engine.iter_mut().chain(self.retiring.iter_mut()) {
            while e.inflight > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let slice = left.min(Duration::from_millis(200));
                let ts = io_uring::types::Timespec::from(slice);
                let args = io_uring::types::SubmitArgs::new().timespec(&ts);
                match e.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(err) if matches!(err.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                    Err(err) => {
                        warn!("queue {}: waiting for completions: {err}", self.index);
                        break;
                    }
                }
                let done = e.ring.completion().count();
                e.inflight = e.inflight.saturating_sub(done);
            }
        }
        self.retiring.retain(|e| e.inflight > 0);
        self.engine
            .iter()
            .chain(self.retiring.iter())
            .map(|e| e.inflight)
            .sum()
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

    /// Log used-ring writes at `addr` too (SET_VRING_ADDR with VHOST_VRING_F_LOG).
    pub fn set_used_log_addr(&mut self, addr: Option<u64>) {
        self.used_log_addr = addr;
    }

    /// Make `engine` the ring for new requests; the previous one retires once idle.
    pub fn install(&mut self, engine: Engine, limits: Limits) {
        if let Some(old) = self.engine.replace(engine) {
            if old.inflight > 0 {
                self.retiring.push(old);
            }
        }
        self.limits = Some(limits);
    }

    /// Stop serving: no ring, no limits; requests wait until a new ring is installed.
    pub fn uninstall(&mut self) {
        if let Some(old) = self.engine.take() {
            if old.inflight > 0 {
                self.retiring.push(old);
            }
        }
        self.limits = None;
    }

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
        let serving = self.engine.is_some()
            && self.limits.is_some()
            && vs.get_queue().ready()
            && vs.is_enabled();
        let budget = if serving {
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
            return;
        }

        self.set_completion_signals(false);
        let entered = Instant::now();
        let mut last = entered;
        self.step(&mut vs, mem, shared, true, false, stop);
        self.notify(&mut vs);
        loop {
            if self.has_completions() || self.has_requests(&vs, mem) {
                self.counters.poll_hits.add(1);
                self.step(&mut vs, mem, shared, true, false, stop);
                self.notify(&mut vs);
                last = Instant::now();
            } else if last.elapsed() >= budget {
                self.poll.gave_up(Instant::now());
                break;
            }
            if stop.load(Ordering::Relaxed) || entered.elapsed() >= MAX_POLL_STRETCH {
                break;
            }
            std::hint::spin_loop();
        }
        // Back to sleeping: signals on, then one more look so that nothing that arrived
        // before they were on is left behind.
        self.set_completion_signals(true);
        self.step(&mut vs, mem, shared, true, true, stop);
        self.notify(&mut vs);
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
        // fdatasync): submit until nothing is left queued, so none waits for an unrelated kick.
        for _ in 0..8 {
            self.submit(vs, mem);
            self.reap(vs, mem);
            if self.queued_sqes() == 0 {
                return;
            }
        }
        // Still more: come back at once rather than hold the queue lock.
        self.wake_self();
    }

    /// Make the worker run again soon (work left over from a bounded pass).
    fn wake_self(&self) {
        let _ = self.completion_fd.write(1);
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

    fn set_completion_signals(&mut self, on: bool) {
        for e in self.engine.iter_mut().chain(self.retiring.iter_mut()) {
            let cq = e.ring.completion();
            if on {
                cq.enable_eventfd();
            } else {
                cq.disable_eventfd();
            }
        }
    }

    fn has_completions(&mut self) -> bool {
        self.engine
            .iter_mut()
            .chain(self.retiring.iter_mut())
            .any(|e| !e.ring.completion().is_empty())
    }

    fn has_requests(&self, vs: &VringState<'_>, mem: &GuestMemoryMmap) -> bool {
        let q = vs.get_queue();
        q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map(|idx| idx.0 != q.next_avail())
            .unwrap_or(false)
    }

    /// Tell the guest about new used entries, if it wants to hear.
    fn notify(&mut self, vs: &mut VringState<'_>) {
        if self.log.is_some() {
            self.log_used_ring(vs);
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
}

impl QueueState {
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
mod tests {
    use super::*;
    use crate::guest_map::MAX_FIXED_BUFFER;
    use crate::ring::{build_ring, RingPolicy, RingSetup};
    use vm_memory::GuestMemoryAtomic;

    /// A refused SQE, for real: a FLUSH's fdatasync submitted on a ring built (by the daemon's
    /// builder) for a read-only disk, whose allowlist holds READ_FIXED alone. The kernel
    /// completes it with -EACCES; the worker must fail the request, count a kernel refusal and
    /// a `refused` error, and spend its security warning on it.
    #[test]
    fn a_refused_sqe_is_counted_and_fails_its_request() {
        let image = tempfile::tempfile().unwrap();
        image.set_len(1 << 16).unwrap();
        let buf = vec![0u8; 4096];
        let map = FixedBufferMap::from_regions([(0, 4096, buf.as_ptr() as u64)], MAX_FIXED_BUFFER)
            .unwrap();
        let files = [(image.as_raw_fd(), "test image".to_string())];
        let policy = RingPolicy::for_device(false, false, false);
        // SAFETY: `buf` outlives the ring (dropped at the end of the test, after `st`), and no
        // SQE of this test names it.
        let ring = unsafe {
            build_ring(&RingSetup {
                label: "test",
                entries: 8,
                files: &files,
                buffers: &map,
                eventfd: None,
                policy: &policy,
            })
        }
        .expect("build a restricted ring (is io_uring enabled?)");
        let counters = Arc::new(QueueCounters::default());
        let tuning = Tuning {
            max_poll: Duration::ZERO,
            submit_batch: 8,
        };
        let mut st = QueueState::new(0, 8, tuning, counters.clone()).unwrap();
        let limits = Limits {
            capacity_sectors: 128,
            seg_max: 6,
            size_max: 1 << 20,
            max_discard_seg: 1,
            max_discard_sectors: 1,
            read_only: true,
            flush: false,
            discard: false,
            write_zeroes: false,
        };
        st.install(
            Engine::new(ring, map, Arc::new(GuestMemoryMmap::new())),
            limits,
        );
        let vring = Vring::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 8).unwrap();
        let mut vs = vring.get_mut();
        let mem = GuestMemoryMmap::new();

        st.occupy(0, None, 1, 1, Vec::new());
        st.tag(0, OpKind::Flush, 0);
        st.push(sqe::fsync_sqe(0), &mut vs, &mem);
        st.submit(&mut vs, &mem);
        st.engine
            .as_ref()
            .unwrap()
            .ring
            .submitter()
            .submit_and_wait(1)
            .unwrap();
        st.reap(&mut vs, &mem);

        let s = counters.snapshot();
        assert_eq!(s.kernel_refusals, 1);
        assert_eq!(s.errors[ErrorKind::Refused as usize], 1);
        assert_eq!(s.ops[OpKind::Flush as usize].requests, 1);
        assert_eq!(s.sqes, 1);
        assert_eq!(st.inflight_requests(), 0);
        assert_eq!(st.security_limit.in_window, 1, "the incident was logged");
        drop(vs);
        drop(st);
        drop(buf);
    }

    /// A sealed memfd of `len` bytes and the dirty log over all of it.
    fn log_of(len: u64) -> (std::fs::File, Arc<DirtyLog>) {
        use std::os::fd::FromRawFd;
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"log".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd we own.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        // SAFETY: fcntl F_ADD_SEALS on our own fd.
        assert_eq!(
            unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
            0
        );
        let log = Arc::new(DirtyLog::adopt(&f, 0, len).unwrap());
        (f, log)
    }

    /// Dirty logging through the real data path: a read submitted on a real restricted ring
    /// before logging is switched on, completed by the kernel after, lands in guest RAM across
    /// three pages and two memory regions. Its pages, its status byte and the used ring must be logged; the pages the
    /// device only reads (descriptor table, avail ring) must not be, nor a write's data.
    #[test]
    fn completed_requests_log_their_data_status_and_used_ring() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestAddress};
        const PAGE: u64 = crate::dirty_log::LOG_PAGE;
        let image = tempfile::tempfile().unwrap();
        image.write_all_at(&[0xab; 1 << 16], 0).unwrap();
        // Two regions: the read below lands across the boundary between them.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x6000),
            (GuestAddress(0x6000), 0xf_a000),
        ])
        .unwrap();
        let map = FixedBufferMap::from_guest_memory(&mem).unwrap();
        let files = [(image.as_raw_fd(), "test image".to_string())];
        let policy = RingPolicy::for_device(true, false, false);
        // SAFETY: `mem` (whose RAM the buffers describe) is kept alive by the Engine.
        let ring = unsafe {
            build_ring(&RingSetup {
                label: "test",
                entries: 8,
                files: &files,
                buffers: &map,
                eventfd: None,
                policy: &policy,
            })
        }
        .expect("build a restricted ring (is io_uring enabled?)");
        let counters = Arc::new(QueueCounters::default());
        let tuning = Tuning {
            max_poll: Duration::ZERO,
            submit_batch: 8,
        };
        let mut st = QueueState::new(0, 8, tuning, counters).unwrap();
        let limits = Limits {
            capacity_sectors: 128,
            seg_max: 6,
            size_max: 1 << 20,
            max_discard_seg: 1,
            max_discard_sectors: 1,
            read_only: false,
            flush: false,
            discard: false,
            write_zeroes: false,
        };
        st.install(Engine::new(ring, map, Arc::new(mem.clone())), limits);
        let shared = Shared {
            serial: [0; SERIAL_LEN],
            direct: false,
            dio_mem_align: 512,
            dio_offset_align: 512,
            vectored: false,
            writeback: AtomicBool::new(true),
        };
        // Descriptor table on page 1, avail ring on page 2, used ring on page 3.
        let vring = Vring::new(GuestMemoryAtomic::new(mem.clone()), 8).unwrap();
        vring.set_queue_size(8);
        vring.set_queue_info(PAGE, 2 * PAGE, 3 * PAGE).unwrap();
        vring.set_queue_ready(true);
        let mut vs = vring.get_mut();
        let (_f, log) = log_of(64);

        // Read 8 KiB into [0x5800, 0x7800): pages 5, 6 and 7, in both regions; status on page 9.
        st.segs = vec![Segment {
            addr: 0x5800,
            len: 0x2000,
        }];
        st.start_rw(0, Some(9 * PAGE), 0, 0x2000, false, &mut vs, &mem, &shared);
        // Write 4 KiB from page 12; status on page 13.
        st.segs = vec![Segment {
            addr: 12 * PAGE,
            len: 0x1000,
        }];
        st.start_rw(
            1,
            Some(13 * PAGE),
            0x4000,
            0x1000,
            true,
            &mut vs,
            &mem,
            &shared,
        );
        st.submit(&mut vs, &mem);
        // Logging goes on while both are in flight.
        st.set_dirty_log(Some(log.clone()));
        while st.inflight_requests() > 0 {
            st.engine
                .as_ref()
                .unwrap()
                .ring
                .submitter()
                .submit_and_wait(1)
                .unwrap();
            st.reap(&mut vs, &mem);
        }
        st.notify(&mut vs);

        let mut data = [0u8; 0x2000];
        mem.read_slice(&mut data, GuestAddress(0x5800)).unwrap();
        assert!(data.iter().all(|&b| b == 0xab), "the read landed");
        let marked: Vec<u64> = (0..16).filter(|&p| log.is_marked(p * PAGE)).collect();
        assert_eq!(
            marked,
            [3, 5, 6, 7, 9, 13],
            "used ring, read data, both status bytes"
        );

        // Logging off: nothing more is marked, and the queue no longer holds the log.
        st.set_dirty_log(None);
        assert_eq!(Arc::strong_count(&log), 1, "the worker dropped the log");
        drop(vs);
        drop(st);
    }

    #[test]
    fn guest_triggered_warnings_are_rate_limited_and_counted() {
        let mut l = WarnLimit::new();
        let t = Instant::now();
        let logged = (0..1000).filter(|_| l.allow(t).is_some()).count();
        assert_eq!(logged, WarnLimit::BURST as usize);
        // The next window logs again and reports what was suppressed.
        assert_eq!(l.allow(t + WarnLimit::WINDOW), Some(1000 - 5));
        assert_eq!(l.allow(t + WarnLimit::WINDOW), Some(0));
        assert_eq!(suppressed_note(0), "");
        assert!(suppressed_note(3).contains("3 similar"));
    }
}
