//! The rings of the queues: made at startup (`make_ring_sets`: one set per queue, a ring per
//! opcode set the device can negotiate), armed with each memory table the VMM sends on the
//! ring that matches the negotiated features, and the memory tables they serve.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{error, info};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::{lock, Queues};
use crate::config::{self, DeviceSpec};
use crate::error::RingError;
use crate::guest_map::FixedBufferMap;
use crate::image::Image;
use crate::request::Limits;
use crate::ring::{RingPolicy, RingSet};
use crate::worker::{FILE_BUFFERED, FILE_PRIMARY};

/// Make every ring the daemon will use: for each queue, one ring per opcode set the device
/// can negotiate, with the image as fixed files and no fixed buffers yet. Called once at
/// startup, before the sandbox forbids `io_uring_setup`.
pub fn make_ring_sets(spec: &DeviceSpec, image: &Image) -> Result<Vec<RingSet>, RingError> {
    let mut files = vec![(
        image.primary.as_raw_fd(),
        format!(
            "{} ({})",
            image.path.display(),
            if image.direct {
                "O_DIRECT"
            } else {
                "page cache"
            }
        ),
    )];
    if image.direct {
        files.push((
            image.buffered.as_raw_fd(),
            format!(
                "{} (page cache, for unaligned buffers)",
                image.path.display()
            ),
        ));
    }
    // Fixed-file indices the worker uses.
    debug_assert_eq!(
        files.len() as u32 - 1,
        if image.direct {
            FILE_BUFFERED
        } else {
            FILE_PRIMARY
        }
    );
    let entries = (u32::from(spec.queue_size) * 4).clamp(64, 4096);
    let policies =
        RingPolicy::device_variants(!spec.read_only, crate::kernel::Kernel::get().vectored_fixed);
    (0..spec.num_queues)
        .map(|q| RingSet::build(q, entries, &files, &policies))
        .collect()
}

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

    /// Serve the current memory table on every queue from the ring for the negotiated
    /// features: each queue is drained, then its guest RAM registered on that ring (and
    /// unregistered from the one that served before). With `force` unset and the same policy,
    /// only the limits change (DISCARD and WRITE_ZEROES share FALLOCATE).
    pub(super) fn arm_rings(&self, force: bool) -> Result<(), RingError> {
        let _serial = lock(&self.rebuild);
        let mem = self.mem.memory().into_inner();
        if mem.num_regions() == 0 {
            return Ok(());
        }
        let policy = self.policy();
        if !force && lock(&self.built).as_ref() == Some(&policy) {
            let limits = self.limits(&policy);
            for q in &self.queues {
                lock(&q.state).set_limits(limits);
            }
            return Ok(());
        }
        *lock(&self.built) = None;
        check_regions(&mem)?;
        let map = FixedBufferMap::from_guest_memory(&*mem)?;
        let limits = self.limits(&policy);
        for (i, q) in self.queues.iter().enumerate() {
            q.when_idle(i, "a new memory table", |st| {
                st.arm(&policy, map.clone(), mem.clone(), limits)
            })?;
        }
        *lock(&self.built) = Some(policy);
        Ok(())
    }

    /// Stop serving guest RAM on every queue (each drained first): its fixed buffers are
    /// unregistered, and requests wait for the next table.
    fn disarm_rings(&self) {
        let _serial = lock(&self.rebuild);
        *lock(&self.built) = None;
        for (i, q) in self.queues.iter().enumerate() {
            if let Err(e) = q.when_idle(i, "a refused memory table", |st| st.disarm()) {
                error!("queue {i}: {e}");
            }
        }
    }

    /// Serve guest RAM `mem` from now on, through `atomic` (the table every vring and worker
    /// reads). Its mappings are made known to the SIGBUS handler and checked against their
    /// files before any worker can see them; a table that fails the check is refused and the
    /// current one stays. At most two tables are alive at once (the served one and this one:
    /// a table is served once every queue's ring holds it, and the previous one is dropped
    /// then), so that the SIGBUS handler's tracking holds every mapping a worker can touch.
    pub fn set_memory(
        &self,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
        mem: GuestMemoryMmap,
    ) -> io::Result<()> {
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
        match self.arm_rings(true) {
            Ok(()) => Ok(()),
            Err(e) => {
                error!("refusing the VMM's memory table: {e}");
                // No ring serves it: nothing may touch it.
                if let Ok(guard) = atomic.lock() {
                    guard.replace(GuestMemoryMmap::new());
                }
                self.disarm_rings();
                Err(io::Error::other(e.to_string()))
            }
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
