//! The rings of the queues: one restricted ring per queue, built for the memory table and the
//! negotiated features, and the memory tables they serve.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::{lock, Queues, DRAIN_WARN_AFTER};
use crate::config;
use crate::error::RingError;
use crate::guest_map::FixedBufferMap;
use crate::request::Limits;
use crate::ring::{build_ring, RingPolicy, RingSetup};
use crate::worker::{Engine, FILE_BUFFERED, FILE_PRIMARY};

impl Queues {
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
    pub(super) fn rebuild_rings(&self, force: bool) -> Result<(), RingError> {
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
