//! What serves I/O: the queues of the device behind one VMM connection, each with its worker
//! state ([`crate::worker::QueueState`]) and its restricted rings. [`crate::control::Device`]
//! (the VMM's side) calls it directly; each queue's worker loop calls [`Queues::serve_queue`].
//! Its rings are made at startup and lent to it for the connection (`rings.rs`); the control
//! thread re-arms them, each queue drained first, whenever the memory table or the negotiated
//! features change. The negotiated features and the config space are in `features.rs`.

mod features;
mod rings;

pub use features::PROTOCOL_FEATURES;
pub use rings::make_ring_sets;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{self, DeviceSpec};
use crate::dirty_log::DirtyLog;
use crate::error::RingError;
use crate::image::Image;
use crate::inflight::QueueInflight;
use crate::ring::{RingPolicy, RingSet};
use crate::stats::DeviceStats;
use crate::throttle::Throttle;
use crate::vmm_channel::VmmChannel;
use crate::worker::{QueueState, Shared, Tuning, Vring};

/// A queue stop (GET_VRING_BASE, RESET_DEVICE) waits for its requests in flight for as long as
/// they take; it warns when they have taken this long, and again every time as long after.
pub const DRAIN_WARN_AFTER: Duration = Duration::from_secs(5);

/// What the daemon lends each connection's queues, for the life of the process: the rings
/// made at startup (one set per queue: [`make_ring_sets`]) and the device's I/O limits.
pub struct Lent {
    pub rings: Vec<RingSet>,
    pub throttle: Arc<Throttle>,
}

/// Called once on each worker thread, before it handles its first event (the sandbox).
pub type ThreadInit = Arc<dyn Fn(usize) + Send + Sync>;

struct QueueSlot {
    state: Mutex<QueueState>,
    drained: Condvar,
    /// Raised while the control thread waits for the queue: the worker stops polling.
    stop: AtomicBool,
}

/// The queues of the device behind one VMM connection, and what they serve.
pub struct Queues {
    spec: DeviceSpec,
    image: Arc<Image>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    queues: Vec<QueueSlot>,
    shared: Shared,
    acked: AtomicU64,
    /// The policy of the armed rings (None: no table served).
    built: Mutex<Option<RingPolicy>>,
    /// Serialises re-arming.
    rebuild: Mutex<()>,
    thread_init: ThreadInit,
    /// The VMM's backend request channel, once it sent one (see `crate::vmm_channel`).
    channel: Mutex<Option<VmmChannel>>,
}

/// What a resize told the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum Notified {
    /// The config-change message went out on the backend request channel.
    Sent,
    /// The VMM gave no backend request channel: the guest sees the new capacity when the VMM
    /// next reads the config space (its next connection or reset).
    NoChannel,
    /// Sending failed (the VMM went away, or does not read its channel).
    Failed(String),
}

thread_local! {
    /// Whether this worker thread has run `thread_init`.
    static INITED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Queues {
    /// The queues of one connection, served by what the daemon lends it (`lent.rings`, which
    /// [`Queues::take_ring_sets`] hands back at its end).
    pub fn new(
        spec: DeviceSpec,
        image: Arc<Image>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        thread_init: ThreadInit,
        tuning: Tuning,
        stats: &DeviceStats,
        lent: Lent,
    ) -> io::Result<Self> {
        let Lent { rings, throttle } = lent;
        if rings.len() != usize::from(spec.num_queues) {
            return Err(io::Error::other(format!(
                "{} ring sets for {} queues",
                rings.len(),
                spec.num_queues
            )));
        }
        let queues = (0..spec.num_queues)
            .zip(rings)
            .map(|(i, set)| {
                let counters = stats
                    .queues
                    .get(usize::from(i))
                    .cloned()
                    .unwrap_or_default();
                Ok(QueueSlot {
                    state: Mutex::new(QueueState::new(i, spec.queue_size, tuning, counters, set)?),
                    drained: Condvar::new(),
                    stop: AtomicBool::new(false),
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        let shared = Shared {
            serial: spec.serial,
            direct: image.direct,
            dio_mem_align: u64::from(image.dio_mem_align),
            dio_offset_align: u64::from(image.dio_offset_align),
            // A read-only disk's rings allow READ_FIXED alone.
            vectored: !spec.read_only && crate::kernel::Kernel::get().vectored_fixed,
            writeback: AtomicBool::new(crate::config::serves_writeback(
                !spec.read_only,
                !spec.read_only,
                image.write_cache.get(),
            )),
            throttle,
        };
        Ok(Queues {
            spec,
            image,
            mem,
            queues,
            shared,
            acked: AtomicU64::new(0),
            built: Mutex::new(None),
            rebuild: Mutex::new(()),
            thread_init,
            channel: Mutex::new(None),
        })
    }

    /// The image's capacity changed (`Image::set_size` was called): enforce the new limit on
    /// every queue from the next request on, and tell the VMM, which then reads the config
    /// space again and raises a config interrupt in the guest. Requests already parsed keep the
    /// limit they were checked against. Each queue is locked only to store its new limits.
    pub fn capacity_changed(&self) -> Notified {
        {
            let _serial = lock(&self.rebuild);
            let sectors = self.image.size() / config::SECTOR_SIZE;
            for q in &self.queues {
                q.with_state(|st| st.set_capacity(sectors));
            }
        }
        match lock(&self.channel).as_ref() {
            None => Notified::NoChannel,
            Some(ch) => match ch.notify_config_change() {
                Ok(()) => Notified::Sent,
                Err(e) => Notified::Failed(e.to_string()),
            },
        }
    }

    /// Raw fds of the queues' completion eventfds, in queue order.
    pub fn completion_fds(&self) -> Vec<i32> {
        self.queues
            .iter()
            .map(|q| crate::worker::completion_raw_fd(&lock(&q.state)))
            .collect()
    }

    /// Wake every worker (used to run `thread_init` before the first connection is served).
    pub fn wake_workers(&self) {
        for q in &self.queues {
            let _ = lock(&q.state).completion_fd().write(1);
        }
    }

    /// connection lands after the next one starts, the image lock is released or the process
    /// exits. Call when no worker serves the queues any more (the connection is over, or the
    /// process is ending); the queues stay locked by the caller's thread meanwhile only for
    /// the wait. Returns the SQEs still in flight at the deadline.
    ///
    /// With `hold`, every queue stays locked afterwards (for the process's exit: no worker may
    /// start another request).
    pub fn quiesce(&self, timeout: Duration, hold: bool) -> usize {
        let deadline = Instant::now() + timeout;
        let mut guards: Vec<_> = self
            .queues
            .iter()
            .map(|q| {
                q.stop.store(true, Ordering::Relaxed);
                lock(&q.state)
            })
            .collect();
        let left = guards.iter_mut().map(|st| st.quiesce(deadline)).sum();
        if hold {
            // The process exits next: the queues must never be unlocked again.
            std::mem::forget(guards);
        }
        left
    }
    /// Run once on each worker thread before it serves its queue (installs its sandbox).
    pub fn init_worker_thread(&self, thread_id: usize) {
        if !INITED.get() {
            (self.thread_init)(thread_id);
            INITED.set(true);
        }
    }

    /// Serve queue `index` after an event: a kick, a completion (`completion`), or a request to
    /// look (the queue was started or enabled). Errors are logged, never returned. Nothing is
    /// done once `exiting` is raised (the connection is over). Returns when to look again
    /// without an event (a request the I/O limits hold back).
    pub fn serve_queue(
        &self,
        index: usize,
        vring: &Vring,
        completion: bool,
        exiting: &AtomicBool,
    ) -> Option<Instant> {
        let q = self.queues.get(index)?;
        let mut st = lock(&q.state);
        if exiting.load(Ordering::Acquire) {
            return None;
        }
        // Loaded under the queue lock: a worker waiting for the lock holds no table (at most
        // two are alive: see `set_memory`).
        let mem = self.mem.memory();
        st.run(vring, &mem, &self.shared, completion, &q.stop);
        st.report_memory_faults();
        if st.inflight_requests() == 0 {
            q.drained.notify_all();
        }
        st.throttled_until()
    }

    /// The image this device serves.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// Log every write to guest RAM in `log` (None: stop logging), on every queue. When this
    /// returns, no worker writes to a log it replaced.
    pub fn set_dirty_log(&self, log: Option<Arc<DirtyLog>>) {
        for q in &self.queues {
            q.with_state(|st| st.set_dirty_log(log.clone()));
        }
    }

    /// Signal `fd` (an eventfd, SET_LOG_FD) after each pass that wrote the dirty log.
    pub fn set_log_kick(&self, fd: Option<Arc<std::fs::File>>) {
        for q in &self.queues {
            q.with_state(|st| st.set_log_kick(fd.clone()));
        }
    }

    /// Log queue `index`'s used-ring writes at `addr` too (VHOST_VRING_F_LOG).
    pub fn set_used_log_addr(&self, index: usize, addr: Option<u64>) {
        if let Some(q) = self.queues.get(index) {
            q.with_state(|st| st.set_used_log_addr(addr));
        }
    }

    /// I/O operations still in flight on any ring of any queue (requests given up on
    /// included): zero means nothing of this device can land in the image any more.
    pub fn sqes_in_flight(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.with_state(|st| st.sqes_in_flight()))
            .sum()
    }

    /// Queue `index` starts: track its requests in `tracking`'s inflight region (None: not
    /// tracked), resubmitting the heads it lists first.
    pub fn set_inflight(&self, index: usize, tracking: Option<(QueueInflight, Vec<u16>)>) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        q.stop.store(true, Ordering::Relaxed);
        let mut st = lock(&q.state);
        q.stop.store(false, Ordering::Relaxed);
        st.set_inflight(tracking);
    }

    /// Stop queue `queue_index`: wait for its requests in flight (GET_VRING_BASE, RESET_DEVICE).
    pub fn stop_queue(&self, queue_index: u32) {
        let Some(q) = self.queues.get(queue_index as usize) else {
            return;
        };
        // The VMM is told the queue stopped only once nothing of it can land any more (as
        // QEMU's own drain does): a read answered later would write guest RAM behind its back,
        // and its inflight mark would outlive it. However long the disk takes: warn meanwhile.
        q.when_idle(queue_index as usize, "stopping it", |_| {
            debug!("queue {queue_index} stopped")
        });
    }

    /// Hand every queue's ring set back, disarmed, for the next connection. Call once the
    /// connection is over and nothing is in flight (`quiesce` returned 0).
    pub fn take_ring_sets(&self) -> Result<Vec<RingSet>, RingError> {
        self.queues
            .iter()
            .map(|q| lock(&q.state).take_ring_set())
            .collect()
    }
}

impl QueueSlot {
    /// Run `f` on the queue's state once nothing of it is in flight, then wake the worker.
    /// Meanwhile the worker takes no new request and completes those in flight; the wait lasts
    /// as long as the disk takes, with a warning every [`DRAIN_WARN_AFTER`] (`why` says what
    /// waits), and counts as a slow stop once it warned.
    fn when_idle<R>(&self, index: usize, why: &str, f: impl FnOnce(&mut QueueState) -> R) -> R {
        let start = Instant::now();
        let mut warned = false;
        let mut next_warn = start + DRAIN_WARN_AFTER;
        self.stop.store(true, Ordering::Relaxed);
        let mut st = lock(&self.state);
        while st.inflight_requests() > 0 || st.sqes_in_flight() > 0 {
            let now = Instant::now();
            if now >= next_warn {
                if !warned {
                    st.counters().slow_stops.add(1);
                }
                warned = true;
                next_warn = now + DRAIN_WARN_AFTER;
                warn!(
                    "queue {index}: {why} waits for {} request(s) still in flight since {}s: \
                     the disk does not answer; it goes on once they land",
                    st.inflight_requests(),
                    now.duration_since(start).as_secs()
                );
            }
            // The worker signals `drained` when its last request completes; an SQE that
            // outlived its request is looked for again every few milliseconds.
            let mut slice = next_warn.saturating_duration_since(now);
            if st.inflight_requests() == 0 {
                slice = slice.min(Duration::from_millis(5));
            }
            st = self
                .drained
                .wait_timeout(st, slice)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        self.stop.store(false, Ordering::Relaxed);
        if warned {
            warn!(
                "queue {index}: {why} went on after waiting {:.1}s for requests in flight",
                start.elapsed().as_secs_f64()
            );
        }
        let r = f(&mut st);
        let _ = st.completion_fd().write(1);
        r
    }

    /// Run `f` on the queue's state, taken from its worker (which stops polling and taking
    /// requests when asked, leaving the rest in the avail ring), then wake the worker: a kick
    /// it already consumed must not wait for the next one.
    fn with_state<R>(&self, f: impl FnOnce(&mut QueueState) -> R) -> R {
        self.stop.store(true, Ordering::Relaxed);
        let mut st = lock(&self.state);
        self.stop.store(false, Ordering::Relaxed);
        let r = f(&mut st);
        let _ = st.completion_fd().write(1);
        r
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a worker panicked mid-request; the state is still coherent
    // enough to keep serving other requests.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl crate::worker::Serve for Queues {
    fn init_thread(&self, index: usize) {
        self.init_worker_thread(index);
    }

    fn serve(
        &self,
        index: usize,
        vring: &Vring,
        completion: bool,
        exiting: &AtomicBool,
    ) -> Option<Instant> {
        self.serve_queue(index, vring, completion, exiting)
    }
}
