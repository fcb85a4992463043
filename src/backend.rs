//! vhost-user glue: the device behind one VMM connection, as the control plane
//! (`crate::control`) drives it through the `VhostUserBackend` trait. Its rings are (re)built
//! here, on the control thread, whenever the memory table or the negotiated features change.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;

use crate::config::{self, DeviceSpec, CONFIG_LEN, CONFIG_WRITEBACK_OFFSET};
use crate::dirty_log::DirtyLog;
use crate::error::RingError;
use crate::guest_map::FixedBufferMap;
use crate::image::Image;
use crate::inflight::QueueInflight;
use crate::request::Limits;
use crate::ring::{build_ring, RingPolicy, RingSetup};
use crate::stats::DeviceStats;
use crate::vmm_channel::BackendChannel;
use crate::worker::{Engine, QueueState, Shared, Tuning, Vring, FILE_BUFFERED, FILE_PRIMARY};

/// A queue stop (GET_VRING_BASE, RESET_DEVICE) waits for its requests in flight for as long as
/// they take; it warns when they have taken this long, and again every time as long after.
pub const DRAIN_WARN_AFTER: Duration = Duration::from_secs(5);

/// Called once on each worker thread, before it handles its first event (the sandbox).
pub type ThreadInit = Arc<dyn Fn(usize) + Send + Sync>;

struct QueueSlot {
    state: Mutex<QueueState>,
    drained: Condvar,
    /// Raised while the control thread waits for the queue: the worker stops polling.
    stop: AtomicBool,
}

/// The device as one connection sees it.
pub struct BlkBackend {
    spec: DeviceSpec,
    image: Arc<Image>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    queues: Vec<QueueSlot>,
    shared: Shared,
    acked: AtomicU64,
    event_idx: AtomicBool,
    /// The policy the current rings were built with.
    built: Mutex<Option<RingPolicy>>,
    /// Serialises ring rebuilds.
    rebuild: Mutex<()>,
    thread_init: ThreadInit,
    /// The VMM's backend request channel, once it sent one (see `crate::vmm_channel`).
    channel: Mutex<Option<BackendChannel>>,
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

impl BlkBackend {
    pub fn new(
        spec: DeviceSpec,
        image: Arc<Image>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        thread_init: ThreadInit,
        tuning: Tuning,
        stats: &DeviceStats,
    ) -> io::Result<Self> {
        let queues = (0..spec.num_queues)
            .map(|i| {
                let counters = stats
                    .queues
                    .get(usize::from(i))
                    .cloned()
                    .unwrap_or_default();
                Ok(QueueSlot {
                    state: Mutex::new(QueueState::new(i, spec.queue_size, tuning, counters)?),
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
        };
        Ok(BlkBackend {
            spec,
            image,
            mem,
            queues,
            shared,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
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

    fn acked_has(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Acquire) & (1u64 << bit) != 0
    }

    /// The features the rings must serve: the acknowledged ones once the driver has acked,
    /// else everything offered.
    fn effective(&self, bit: u32) -> bool {
        let acked = self.acked.load(Ordering::Acquire);
        let set = if acked == 0 {
            self.spec.features()
        } else {
            acked
        };
        set & (1u64 << bit) != 0
    }

    /// Serve the write cache virtio 1.2 §5.2.6 prescribes for the negotiated features and the
    /// guest's choice (see `config::serves_writeback`), and say when it changes.
    fn update_write_cache(&self) {
        let wb = crate::config::serves_writeback(
            self.effective(VIRTIO_BLK_F_FLUSH),
            self.effective(VIRTIO_BLK_F_CONFIG_WCE),
            self.image.write_cache.get(),
        );
        if self.shared.writeback.swap(wb, Ordering::AcqRel) != wb {
            info!(
                "write cache: {}",
                if wb {
                    "writeback (FLUSH makes writes durable)"
                } else {
                    "writethrough (every write is durable before it completes)"
                }
            );
        }
    }

    fn policy(&self) -> RingPolicy {
        let p = RingPolicy::for_device(
            !self.spec.read_only,
            self.effective(VIRTIO_BLK_F_FLUSH),
            self.effective(VIRTIO_BLK_F_DISCARD) || self.effective(VIRTIO_BLK_F_WRITE_ZEROES),
        );
        if self.shared.vectored {
            p.with_vectored()
        } else {
            p
        }
    }

    fn limits(&self, policy: &RingPolicy) -> Limits {
        use crate::ring::SqeOp;
        Limits {
            capacity_sectors: self.image.size() / config::SECTOR_SIZE,
            seg_max: self.spec.seg_max(),
            size_max: config::SIZE_MAX,
            max_discard_seg: config::MAX_DISCARD_SEG,
            max_discard_sectors: config::MAX_DISCARD_SECTORS,
            read_only: self.spec.read_only,
            flush: policy.allows(SqeOp::Fsync) && self.effective(VIRTIO_BLK_F_FLUSH),
            discard: policy.allows(SqeOp::Fallocate) && self.effective(VIRTIO_BLK_F_DISCARD),
            write_zeroes: policy.allows(SqeOp::Fallocate)
                && self.effective(VIRTIO_BLK_F_WRITE_ZEROES),
        }
    }

    /// Build one restricted ring per queue for the current memory table and features, and
    /// hand them to the workers. Old rings retire once their in-flight requests complete.
    fn rebuild_rings(&self, force: bool) -> Result<(), RingError> {
        let _serial = lock(&self.rebuild);
        let mem = self.mem.memory().into_inner();
        if mem.num_regions() == 0 {
            return Ok(());
        }
        let policy = self.policy();
        if !force && lock(&self.built).as_ref() == Some(&policy) {
            // Same rings; the limits may still differ (DISCARD and WRITE_ZEROES share FALLOCATE).
            let limits = self.limits(&policy);
            for q in &self.queues {
                lock(&q.state).set_limits(limits);
            }
            return Ok(());
        }
        check_regions(&mem)?;
        let map = FixedBufferMap::from_guest_memory(&*mem)?;
        let mut files = vec![(
            self.image.primary.as_raw_fd(),
            format!(
                "{} ({})",
                self.image.path.display(),
                if self.image.direct {
                    "O_DIRECT"
                } else {
                    "page cache"
                }
            ),
        )];
        if self.image.direct {
            files.push((
                self.image.buffered.as_raw_fd(),
                format!(
                    "{} (page cache, for unaligned buffers)",
                    self.image.path.display()
                ),
            ));
        }
        // Fixed-file indices the worker uses.
        debug_assert_eq!(
            files.len() as u32 - 1,
            if self.image.direct {
                FILE_BUFFERED
            } else {
                FILE_PRIMARY
            }
        );
        let entries = (u32::from(self.spec.queue_size) * 4).clamp(64, 4096);
        let mut engines = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let efd = crate::worker::completion_raw_fd(&lock(&q.state));
            let label = format!("queue {i}");
            // SAFETY: `map` describes the regions of `mem`, which the Engine keeps alive as long
            // as the ring; guest RAM is shared memory that Rust code only reads and writes
            // through vm-memory's volatile accessors.
            let ring = unsafe {
                build_ring(&RingSetup {
                    label: &label,
                    entries,
                    files: &files,
                    buffers: &map,
                    eventfd: Some(efd),
                    policy: &policy,
                })
            }?;
            engines.push(Engine::new(ring, map.clone(), mem.clone()));
        }
        let limits = self.limits(&policy);
        for (q, e) in self.queues.iter().zip(engines) {
            q.stop.store(true, Ordering::Relaxed);
            let mut st = lock(&q.state);
            q.stop.store(false, Ordering::Relaxed);
            st.install(e, limits);
            // Requests may have arrived while no ring existed: have the worker look.
            let _ = st.completion_fd().write(1);
        }
        *lock(&self.built) = Some(policy);
        Ok(())
    }

    /// Wait (until `timeout`) for every SQE of every ring to complete, so that nothing of this
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

    /// Serve guest RAM `mem` from now on, through `atomic` (the table every vring and worker
    /// reads). Its mappings are made known to the SIGBUS handler and checked against their
    /// files before any worker can see them; a table that fails the check is refused and the
    /// current one stays. At most two tables are alive at once (see `wait_for_older_tables`),
    /// so that the SIGBUS handler's tracking holds every mapping a worker can touch.
    pub fn set_memory(
        &self,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
        mem: GuestMemoryMmap,
    ) -> io::Result<()> {
        self.wait_for_older_tables();
        // Known to the SIGBUS handler before anything can touch it. vm-memory publishes a new
        // Arc of its own, sharing the mappings: the staged table's entries cover them until the
        // published table's replace them (in one update, so the handler never tracks both).
        let staged = Arc::new(mem.clone());
        crate::sandbox::track_guest_ram(&staged);
        if let Err(e) = check_regions(&staged) {
            error!("refusing the VMM's memory table: {e}");
            drop(staged);
            // Forget the refused table's mappings (gone with it); the current table stays.
            crate::sandbox::track_guest_ram(&atomic.memory().into_inner());
            return Err(io::Error::other(e.to_string()));
        }
        atomic
            .lock()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?
            .replace(mem);
        drop(staged);
        let published = atomic.memory().into_inner();
        crate::sandbox::track_guest_ram(&published);
        info!(
            "memory table: {} region(s), {} MiB",
            published.num_regions(),
            published.iter().map(|r| r.len()).sum::<u64>() >> 20
        );
        drop(published);
        match self.rebuild_rings(true) {
            Ok(()) => Ok(()),
            Err(e) => {
                error!("refusing the VMM's memory table: {e}");
                // No ring serves it: nothing may touch it.
                if let Ok(guard) = atomic.lock() {
                    guard.replace(GuestMemoryMmap::new());
                }
                for q in &self.queues {
                    lock(&q.state).uninstall();
                }
                *lock(&self.built) = None;
                Err(io::Error::other(e.to_string()))
            }
        }
    }

    /// Wait until no ring of a memory table older than the current one has requests in
    /// flight, and no worker holds such a table: the tables alive are then the current one and
    /// the one about to be published. (Each can have up to `MAX_MEM_SLOTS` mappings; without
    /// this wait a VMM could pile up tables behind requests a stuck disk holds.)
    fn wait_for_older_tables(&self) {
        let start = Instant::now();
        let mut next_warn = start + DRAIN_WARN_AFTER;
        for (i, q) in self.queues.iter().enumerate() {
            q.stop.store(true, Ordering::Relaxed);
            let mut st = lock(&q.state);
            while st.retiring_rings() > 0 {
                let now = Instant::now();
                if now >= next_warn {
                    next_warn = now + DRAIN_WARN_AFTER;
                    warn!(
                        "queue {i}: a new memory table waits for the requests of an older one \
                         still in flight since {}s",
                        now.duration_since(start).as_secs()
                    );
                }
                // The worker signals `drained` when the queue is idle; an older ring can
                // retire before that, so look again every few milliseconds.
                st = q
                    .drained
                    .wait_timeout(st, Duration::from_millis(5))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            q.stop.store(false, Ordering::Relaxed);
        }
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
    /// done once `exiting` is raised (the connection is over).
    pub fn serve_queue(&self, index: usize, vring: &Vring, completion: bool, exiting: &AtomicBool) {
        let Some(q) = self.queues.get(index) else {
            return;
        };
        let mut st = lock(&q.state);
        if exiting.load(Ordering::Acquire) {
            return;
        }
        // Loaded under the queue lock: a worker waiting for the lock holds no table, so that
        // `wait_for_older_tables` bounds the tables alive.
        let mem = self.mem.memory();
        st.run(vring, &mem, &self.shared, completion, &q.stop);
        st.report_memory_faults();
        if st.inflight_requests() == 0 {
            q.drained.notify_all();
        }
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
}

impl QueueSlot {
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

/// Refuse memory tables whose regions extend past the end of their backing file: touching
/// such a mapping would kill the process with SIGBUS.
fn check_regions(mem: &GuestMemoryMmap) -> Result<(), RingError> {
    for r in mem.iter() {
        if let Some(fo) = r.file_offset() {
            let flen = fo
                .file()
                .metadata()
                .map_err(|e| RingError::Layout(format!("cannot stat a guest RAM fd: {e}")))?
                .len();
            let end = fo.start().checked_add(r.len());
            if end.is_none_or(|e| e > flen) {
                return Err(RingError::Layout(format!(
                    "guest RAM region at {:#x} maps {:#x} bytes at offset {:#x} of a {flen}-byte file",
                    r.start_addr().0,
                    r.len(),
                    fo.start()
                )));
            }
        }
    }
    Ok(())
}

/// A shared handle on the device (the `VhostUserBackend` trait wants `Clone`).
#[derive(Clone)]
pub struct Backend(pub Arc<BlkBackend>);

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.spec.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.spec.queue_size)
    }

    fn features(&self) -> u64 {
        self.0.spec.features()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Release);
        self.0.update_write_cache();
        if let Err(e) = self.0.rebuild_rings(false) {
            error!("cannot rebuild rings for the negotiated features: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // The channel a config-change message goes out on after a live resize.
            | VhostUserProtocolFeatures::BACKEND_REQ
            // Requests in flight survive a backend restart (src/inflight.rs).
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // The dirty log of a live migration comes as a shared memfd (src/dirty_log.rs).
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        let mut slot = lock(&self.0.channel);
        // Forget (and close) a channel this connection sent before, so that it is not taken for
        // the new one.
        *slot = None;
        match BackendChannel::adopt(backend) {
            Ok(ch) => {
                debug!("backend request channel received");
                *slot = Some(ch);
            }
            Err(e) => warn!(
                "backend request channel: {e}; a resize will reach the guest only when the \
                 VMM next reads the config space"
            ),
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let wb = self.0.shared.writeback.load(Ordering::Acquire);
        // The capacity is the image's now (it changes with a live resize).
        let spec = DeviceSpec {
            size_bytes: self.0.image.size(),
            ..self.0.spec.clone()
        };
        let space = spec.config_space(wb);
        config::config_read(&space, offset, size).unwrap_or_else(|| {
            warn!("config read of {size} bytes at {offset} is outside the {CONFIG_LEN}-byte config space");
            Vec::new()
        })
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = self.0.acked_has(VIRTIO_BLK_F_CONFIG_WCE);
        if wce && offset as usize == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 {
            self.0.image.write_cache.set(buf[0] != 0);
            self.0.update_write_cache();
            return Ok(());
        }
        warn!(
            "refused config write of {} bytes at offset {offset}",
            buf.len()
        );
        Err(io::Error::from(io::ErrorKind::InvalidInput))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // Not how the control plane installs a table (`BlkBackend::set_memory` checks and
        // tracks it before publishing it); here the table is published already.
        crate::sandbox::track_guest_ram(&mem.memory().into_inner());
        self.0
            .rebuild_rings(true)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.spec.num_queues).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(q) = self.0.queues.get(queue_index as usize) else {
            return Ok(());
        };
        // The VMM is told the queue stopped only once nothing of it can land any more (as
        // QEMU's own drain does): a read answered later would write guest RAM behind its back,
        // and its inflight mark would outlive it. However long the disk takes: warn meanwhile.
        let start = Instant::now();
        let mut warned = false;
        let mut next_warn = start + DRAIN_WARN_AFTER;
        q.stop.store(true, Ordering::Relaxed);
        let mut st = lock(&q.state);
        while st.inflight_requests() > 0 {
            let now = Instant::now();
            if now >= next_warn {
                if !warned {
                    st.counters().slow_stops.add(1);
                }
                warned = true;
                next_warn = now + DRAIN_WARN_AFTER;
                warn!(
                    "queue {queue_index}: stopping it waits for {} request(s) still in flight \
                     since {}s: the disk does not answer; the stop is answered once they land",
                    st.inflight_requests(),
                    now.duration_since(start).as_secs()
                );
            }
            st = q
                .drained
                .wait_timeout(st, next_warn.saturating_duration_since(now))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        q.stop.store(false, Ordering::Relaxed);
        if warned {
            warn!(
                "queue {queue_index}: stopped after waiting {:.1}s for its requests in flight",
                start.elapsed().as_secs_f64()
            );
        }
        debug!("queue {queue_index} stopped");
        Ok(())
    }

    /// Events come through `crate::control::QueueLoop`, which calls `serve_queue`.
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        Ok(())
    }
}
