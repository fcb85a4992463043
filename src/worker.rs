//! The worker loop of one virtqueue: pop descriptor chains, parse them, translate their
//! buffers, turn them into SQEs on the queue's restricted ring, and turn completions back into
//! used-ring entries. One kick that brings N requests makes one `io_uring_enter`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use log::{debug, error, info, warn};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::SERIAL_LEN;
use crate::guest_map::{FixedBufferMap, Piece};
use crate::request::{self, Desc, Limits, Op, Parsed, Segment, ZeroMode, ZeroRange};

/// The vring type the backend serves.
pub type Vring = vhost_user_backend::VringRwLock<vm_memory::GuestMemoryAtomic<GuestMemoryMmap>>;
type VringState<'a> = std::sync::RwLockWriteGuard<
    'a,
    vhost_user_backend::VringState<vm_memory::GuestMemoryAtomic<GuestMemoryMmap>>,
>;

/// Fixed-file indices in every ring.
pub const FILE_PRIMARY: u32 = 0;
pub const FILE_BUFFERED: u32 = 1;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

// user_data layout: head (16 bits) | kind (8) | range index (8) | expected length (32).
const KIND_RW: u64 = 0;
const KIND_FSYNC: u64 = 1;
const KIND_ZERO_RANGE: u64 = 2;
const KIND_PUNCH: u64 = 3;
const KIND_DISCARD: u64 = 4;

/// Longest a worker keeps polling in one go before it returns to epoll, however busy.
const MAX_POLL_STRETCH: Duration = Duration::from_millis(2);

fn user_data(head: u16, kind: u64, idx: usize, len: u32) -> u64 {
    u64::from(head) | kind << 16 | ((idx as u64) & 0xff) << 24 | u64::from(len) << 32
}

/// The adaptive polling window after each wakeup, in the manner of KVM's halt polling.
///
/// After handling what woke it, the worker keeps polling (the virtqueue for new requests,
/// the rings for completions) until nothing has turned up for `current`. Each time polling
/// gives up and the worker sleeps, the next wakeup tells how long it was waiting: if the
/// event came so soon that a window of at most `max` would have caught it (a disk's own
/// latency at queue depth 1 is tens of µs), the window grows to cover that wait; if even
/// `max` would have missed it, the window closes (zero), so an idle disk, or one whose
/// completions are too far apart for polling to pay, costs no polling CPU.
pub struct PollWindow {
    current: Duration,
    max: Duration,
    /// When polling last gave up without finding anything (None: it found work).
    gave_up: Option<Instant>,
}

impl PollWindow {
    /// The first window, and the smallest non-zero one.
    const MIN: Duration = Duration::from_micros(4);

    pub fn new(max: Duration) -> Self {
        PollWindow {
            current: Duration::ZERO,
            max,
            gave_up: None,
        }
    }

    /// The window for this wakeup, given when it happened.
    fn budget(&mut self, now: Instant) -> Duration {
        if let Some(t) = self.gave_up.take() {
            // How long the worker waited for this event, counting the window it had polled.
            let waited = self.current + now.saturating_duration_since(t);
            if waited <= self.max {
                // A window of `waited` would have caught it: grow to cover it (with room).
                self.current = (waited + waited / 2)
                    .max(self.current * 2)
                    .max(Self::MIN)
                    .min(self.max);
            } else {
                // Even the longest window would have missed it: stop polling until events
                // come close together again (KVM's halt polling resets the same way).
                self.current = Duration::ZERO;
            }
        }
        self.current
    }

    /// Polling gave up at `now`: nothing turned up within the window.
    fn gave_up(&mut self, now: Instant) {
        self.gave_up = Some(now);
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

/// Counters of one queue, logged when its connection ends: they show whether batching and
/// polling work (SQEs per io_uring_enter, wakeups per request).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub wakeups: u64,
    pub requests: u64,
    pub sqes: u64,
    pub enters: u64,
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
    failed: bool,
    status: Option<u64>,
    used_len: u32,
    ranges: Vec<ZeroRange>,
    /// iovecs of a vectored request, alive until it completes.
    iov: Vec<[u64; 2]>,
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
    zero_range_unsupported: bool,
    used_added: bool,
    poll: PollWindow,
    /// Most SQEs queued before they are submitted (see [`Tuning`]).
    submit_batch: usize,
    stats: Stats,
    faults_seen: u64,
    completion_fd: EventFd,
    // Scratch space reused for every request: no allocation on the hot path.
    descs: Vec<Desc>,
    segs: Vec<Segment>,
    ranges: Vec<ZeroRange>,
    pieces: Vec<Piece>,
    cqes: Vec<(u64, i32)>,
}

impl QueueState {
    pub fn new(index: u16, max_queue_size: u16, tuning: Tuning) -> std::io::Result<Self> {
        Ok(QueueState {
            index,
            engine: None,
            retiring: Vec::new(),
            slots: vec![Slot::default(); usize::from(max_queue_size)],
            inflight_reqs: 0,
            limits: None,
            zero_range_unsupported: false,
            used_added: false,
            poll: PollWindow::new(tuning.max_poll),
            submit_batch: tuning.submit_batch.max(1),
            stats: Stats::default(),
            faults_seen: 0,
            completion_fd: EventFd::new(EFD_NONBLOCK)?,
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

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn inflight_requests(&self) -> usize {
        self.inflight_reqs
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
        self.stats.wakeups += 1;
        if completion_event {
            // Reset the eventfd before reaping, so a completion that lands after the reap
            // wakes us again.
            let _ = self.completion_fd.read();
        }
        let mut vs = vring.get_mut();
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
            self.step(&mut vs, mem, shared, serving, true);
            self.notify(&mut vs);
            if serving {
                self.poll.gave_up(Instant::now());
            }
            return;
        }

        self.set_completion_signals(false);
        let entered = Instant::now();
        let mut last = entered;
        self.step(&mut vs, mem, shared, true, false);
        self.notify(&mut vs);
        loop {
            if self.has_completions() || self.has_requests(&vs, mem) {
                self.step(&mut vs, mem, shared, true, false);
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
        self.step(&mut vs, mem, shared, true, true);
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
    ) {
        self.reap(vs, mem);
        if serving {
            self.take_requests(vs, mem, shared, rearm);
            self.submit(vs, mem);
            self.reap(vs, mem);
        }
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
        if std::mem::take(&mut self.used_added) {
            match vs.needs_notification() {
                Ok(true) => {
                    if let Err(e) = vs.signal_used_queue() {
                        debug!("queue {}: cannot signal the guest: {e}", self.index);
                    }
                }
                Ok(false) => {}
                Err(e) => debug!("queue {}: cannot read used_event: {e}", self.index),
            }
        }
    }

    fn take_requests(
        &mut self,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
        rearm: bool,
    ) {
        // Rounds in a row that popped nothing although the avail index said "more".
        let mut empty_rounds = 0;
        loop {
            if let Err(e) = vs.disable_notification() {
                debug!("queue {}: disable_notification: {e}", self.index);
            }
            let mut popped = 0usize;
            while let Some(chain) = vs.get_queue_mut().pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                self.descs.clear();
                self.descs.extend(chain.map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    writable: d.is_write_only(),
                }));
                self.start(head, vs, mem, shared);
                if self.queued_sqes() >= self.submit_batch {
                    self.submit(vs, mem);
                }
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
                        warn!(
                            "queue {}: avail index {:?} is inconsistent with the ring; waiting for \
                             the next kick",
                            self.index,
                            vs.get_queue().avail_idx(mem, Ordering::Acquire).ok()
                        );
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

    /// Start one request whose descriptors are in `self.descs`.
    fn start(
        &mut self,
        head: u16,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
    ) {
        let Some(limits) = self.limits else { return };
        self.stats.requests += 1;
        let hi = usize::from(head);
        if hi >= self.slots.len() || usize::from(head) >= usize::from(vs.get_queue().size()) {
            warn!(
                "queue {}: descriptor head {head} is out of range; dropped",
                self.index
            );
            return;
        }
        if self.slots[hi].busy {
            warn!(
                "queue {}: descriptor head {head} made available again while in flight; ignored",
                self.index
            );
            return;
        }
        let req = request::parse(&self.descs, mem, &limits, &mut self.segs, &mut self.ranges);
        match req.parsed {
            Parsed::Fail(status, reason) => {
                debug!("queue {}: request {head} refused: {reason:?}", self.index);
                self.complete(head, req.status, status, 1, vs, mem);
            }
            Parsed::Op(Op::Nop) => self.complete(head, req.status, STATUS_OK, 1, vs, mem),
            Parsed::Op(Op::GetId) => {
                let mut written = 0u32;
                let mut ok = true;
                for s in &self.segs {
                    let end = (written + s.len) as usize;
                    let src = &shared.serial[written as usize..end.min(SERIAL_LEN)];
                    ok &= mem.write_slice(src, GuestAddress(s.addr)).is_ok();
                    written += s.len;
                }
                let (status, used) = if ok {
                    (STATUS_OK, written + 1)
                } else {
                    (STATUS_IOERR, 1)
                };
                self.complete(head, req.status, status, used, vs, mem);
            }
            Parsed::Op(Op::Read { offset, len }) => {
                self.start_rw(head, req.status, offset, len, false, vs, mem, shared)
            }
            Parsed::Op(Op::Write { offset, len }) => {
                self.start_rw(head, req.status, offset, len, true, vs, mem, shared)
            }
            Parsed::Op(Op::Flush) => {
                self.occupy(head, req.status, 1, 1, Vec::new());
                let e = opcode::Fsync::new(types::Fixed(FILE_PRIMARY))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(user_data(head, KIND_FSYNC, 0, 0));
                self.push(e, vs, mem);
            }
            Parsed::Op(Op::Zero) => {
                let ranges = std::mem::take(&mut self.ranges);
                self.occupy(head, req.status, ranges.len() as u32, 1, ranges);
                for i in 0..self.slots[hi].ranges.len() {
                    let r = self.slots[hi].ranges[i];
                    let kind = match r.mode {
                        ZeroMode::Discard => KIND_DISCARD,
                        ZeroMode::Unmap => KIND_PUNCH,
                        ZeroMode::InPlace if self.zero_range_unsupported => KIND_PUNCH,
                        ZeroMode::InPlace => KIND_ZERO_RANGE,
                    };
                    let e = fallocate_sqe(head, kind, i, &r);
                    self.push(e, vs, mem);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_rw(
        &mut self,
        head: u16,
        status: Option<u64>,
        offset: u64,
        len: u64,
        write: bool,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
    ) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        self.pieces.clear();
        for s in &self.segs {
            if let Err(e) = engine.map.translate(s.addr, s.len, |p| self.pieces.push(p)) {
                debug!("queue {}: request {head}: {e}", self.index);
                self.complete(head, status, STATUS_IOERR, 1, vs, mem);
                return;
            }
        }
        if self.pieces.is_empty() {
            self.complete(head, status, STATUS_OK, 1, vs, mem);
            return;
        }
        let file = if shared.direct && self.direct_ok(offset, shared) {
            FILE_PRIMARY
        } else if shared.direct {
            FILE_BUFFERED
        } else {
            FILE_PRIMARY
        };
        let used_len = if write {
            1
        } else {
            (len as u32).saturating_add(1)
        };
        let dsync = write && !shared.writeback.load(Ordering::Relaxed);
        let rw_flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let hi = usize::from(head);
        if shared.vectored && self.pieces.len() > 1 {
            // One READV_FIXED/WRITEV_FIXED per run of pieces in the same fixed buffer: the
            // kernel requires every iovec of one SQE to lie in the buffer it names.
            let groups = 1 + self
                .pieces
                .windows(2)
                .filter(|w| w[0].buf_index != w[1].buf_index)
                .count();
            self.occupy(head, status, groups as u32, used_len, Vec::new());
            let iov = &mut self.slots[hi].iov;
            iov.clear();
            iov.extend(self.pieces.iter().map(|p| [p.host, u64::from(p.len)]));
            let mut off = offset;
            let mut a = 0;
            while a < self.pieces.len() {
                let idx = self.pieces[a].buf_index;
                let b = a + self.pieces[a..]
                    .iter()
                    .take_while(|p| p.buf_index == idx)
                    .count();
                let total: u64 = self.pieces[a..b].iter().map(|p| u64::from(p.len)).sum();
                // `[u64; 2]` has the layout of `struct iovec` on 64-bit Linux (checked at
                // compile time below); the slot keeps the array until the request completes.
                let ptr = self.slots[hi].iov[a..].as_ptr() as *const libc::iovec;
                let n = (b - a) as u32;
                // total <= len, and a request's len fits in u32 (seg_max * size_max).
                let ud = user_data(head, KIND_RW, 0, total as u32);
                let e = if write {
                    opcode::WritevFixed::new(types::Fixed(file), ptr, n, idx)
                        .offset(off)
                        .rw_flags(rw_flags)
                        .build()
                } else {
                    opcode::ReadvFixed::new(types::Fixed(file), ptr, n, idx)
                        .offset(off)
                        .build()
                };
                self.push(e.user_data(ud), vs, mem);
                off += total;
                a = b;
            }
            return;
        }
        self.occupy(head, status, self.pieces.len() as u32, used_len, Vec::new());
        let mut off = offset;
        for i in 0..self.pieces.len() {
            let p = self.pieces[i];
            let ud = user_data(head, KIND_RW, 0, p.len);
            let e = if write {
                opcode::WriteFixed::new(types::Fixed(file), p.host as *const u8, p.len, p.buf_index)
                    .offset(off)
                    .rw_flags(rw_flags)
                    .build()
            } else {
                opcode::ReadFixed::new(types::Fixed(file), p.host as *mut u8, p.len, p.buf_index)
                    .offset(off)
                    .build()
            };
            self.push(e.user_data(ud), vs, mem);
            off += u64::from(p.len);
        }
    }

    /// Whether every piece of the current request meets the O_DIRECT alignment.
    fn direct_ok(&self, offset: u64, shared: &Shared) -> bool {
        offset.is_multiple_of(shared.dio_offset_align)
            && self.pieces.iter().all(|p| {
                p.host % shared.dio_mem_align == 0
                    && u64::from(p.len) % shared.dio_offset_align == 0
            })
    }

    fn occupy(
        &mut self,
        head: u16,
        status: Option<u64>,
        pending: u32,
        used_len: u32,
        ranges: Vec<ZeroRange>,
    ) {
        let slot = &mut self.slots[usize::from(head)];
        slot.busy = true;
        slot.pending = pending;
        slot.failed = false;
        slot.status = status;
        slot.used_len = used_len;
        slot.ranges = ranges;
        self.inflight_reqs += 1;
    }

    /// Queue one SQE, submitting what is queued if the submission queue is full.
    fn push(&mut self, e: squeue::Entry, vs: &mut VringState<'_>, mem: &GuestMemoryMmap) {
        for _ in 0..1000 {
            let Some(engine) = self.engine.as_mut() else {
                return;
            };
            // SAFETY: the SQE names only fixed files and fixed buffers of this ring; its buffer
            // pointer lies in a registered buffer (checked by translation, re-checked by the
            // kernel), which `Engine::_mem` keeps mapped while the ring lives.
            if unsafe { engine.ring.submission().push(&e) }.is_ok() {
                engine.inflight += 1;
                self.stats.sqes += 1;
                return;
            }
            self.submit(vs, mem);
        }
        error!(
            "queue {}: submission queue stays full; request dropped",
            self.index
        );
    }

    fn queued_sqes(&mut self) -> usize {
        self.engine
            .as_mut()
            .map(|e| e.ring.submission().len())
            .unwrap_or(0)
    }

    /// Hand queued SQEs to the kernel: one io_uring_enter for the whole batch.
    fn submit(&mut self, vs: &mut VringState<'_>, mem: &GuestMemoryMmap) {
        for _ in 0..1000 {
            let Some(engine) = self.engine.as_mut() else {
                return;
            };
            if engine.ring.submission().is_empty() {
                return;
            }
            self.stats.enters += 1;
            match engine.ring.submit() {
                Ok(_) => continue,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => self.reap(vs, mem),
                    _ => {
                        error!("queue {}: io_uring_enter failed: {e}", self.index);
                        return;
                    }
                },
            }
        }
    }

    /// Turn every available completion into used-ring entries.
    fn reap(&mut self, vs: &mut VringState<'_>, mem: &GuestMemoryMmap) {
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
    fn complete(
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

impl Drop for QueueState {
    fn drop(&mut self) {
        let s = self.stats;
        if s.requests > 0 {
            info!(
                "queue {}: {} requests, {} SQEs in {} io_uring_enter calls, {} wakeups",
                self.index, s.requests, s.sqes, s.enters, s.wakeups
            );
        }
    }
}

fn fallocate_sqe(head: u16, kind: u64, idx: usize, r: &ZeroRange) -> squeue::Entry {
    let mode = match kind {
        KIND_ZERO_RANGE => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    };
    opcode::Fallocate::new(types::Fixed(FILE_PRIMARY), r.len)
        .offset(r.offset)
        .mode(mode)
        .build()
        .user_data(user_data(head, kind, idx, 0))
}

/// Raw fd of a queue's completion eventfd (for epoll registration).
pub fn completion_raw_fd(q: &QueueState) -> i32 {
    q.completion_fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn poll_window_starts_closed() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.budget(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn poll_window_grows_to_cover_a_disk_latency_within_max() {
        // Completions come 30 µs after polling gives up (a disk at queue depth 1): the window
        // must grow until it covers them, and not beyond max.
        let mut w = PollWindow::new(MAX);
        let mut t = Instant::now();
        let mut budget = w.budget(t);
        for _ in 0..8 {
            w.gave_up(t);
            t += us(30).saturating_sub(budget);
            budget = w.budget(t);
        }
        assert!(budget >= us(30), "{budget:?}");
        assert!(budget <= MAX, "{budget:?}");
    }

    #[test]
    fn poll_window_closes_when_events_come_later_than_max() {
        // An idle disk: every wakeup comes long after polling gave up. The window must close
        // within a few wakeups and stay closed.
        let mut w = PollWindow::new(MAX);
        let mut t = Instant::now();
        w.gave_up(t);
        t += us(10);
        assert!(w.budget(t) > Duration::ZERO);
        for _ in 0..8 {
            w.gave_up(t);
            t += Duration::from_millis(5);
            w.budget(t);
        }
        assert_eq!(w.budget(t), Duration::ZERO);
    }

    #[test]
    fn poll_window_zero_max_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        let t = Instant::now();
        for _ in 0..4 {
            w.gave_up(t);
            assert_eq!(w.budget(t), Duration::ZERO);
        }
    }

    #[test]
    fn poll_window_keeps_its_size_while_polling_finds_work() {
        let mut w = PollWindow::new(MAX);
        let t = Instant::now();
        w.gave_up(t);
        let b = w.budget(t + us(20));
        // No give-up in between (polling kept finding work): the next wakeup keeps the window.
        assert_eq!(w.budget(t + Duration::from_secs(1)), b);
    }
}
