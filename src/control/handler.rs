//! The vhost-user front-end requests of one connection: [`Device`], the handler the `vhost`
//! crate's `BackendReqHandler` calls after it has framed and decoded each message.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use log::{error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as BackendChannel, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::backend::Backend;
use crate::dirty_log::{self, DirtyLog};
use crate::error::DirtyLogError;
use crate::inflight::{self, InflightMap};
use crate::vring::{Connection, Mem};
use crate::worker::QueueLoop;
use crate::worker::{Vring, WarnLimit};

/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's limit for vhost-user).
const MAX_MEM_SLOTS: u64 = 509;

/// Largest queue an inflight region is made for (the virtio split-ring maximum).
const MAX_INFLIGHT_QUEUE_SIZE: u16 = 32768;

/// Where one region of the VMM's address space lies in guest-physical memory (the VMM gives
/// vring addresses in its own address space).
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The device as one VMM connection drives it.
pub struct Device {
    backend: Backend,
    mem: Mem,
    vrings: Vec<Vring>,
    loops: Vec<Arc<QueueLoop>>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    mappings: Vec<AddrMapping>,
    /// The inflight region the VMM handed over (SET_INFLIGHT_FD).
    inflight: Option<Arc<InflightMap>>,
    /// The dirty log the VMM handed over (SET_LOG_BASE), in use while it asks for LOG_ALL.
    log: Option<Arc<DirtyLog>>,
    /// The device stopped with I/O still in flight: the image is given up once it drains.
    give_up_pending: bool,
    /// The request being handled was refused and its answer (a nack, where the VMM asked for
    /// one) went out: the connection goes on. Cleared before every request
    /// ([`Device::begin_request`]), so that it never outlives its request.
    refused: bool,
    /// Per queue: its ring addresses were accepted (SET_VRING_ADDR). A queue without valid
    /// rings is never started: nothing may read or write its default addresses (0).
    rings_valid: Vec<bool>,
    /// Most guest RAM a memory table may add up to (`--max-guest-ram`): it is pinned, so
    /// fully populated on the host.
    max_guest_ram: u64,
    refusal_log: WarnLimit,
}

/// Count a refusal (see [`Device::take_refused`]).
fn refused<T>(flag: &mut bool, r: VhostUserResult<T>) -> VhostUserResult<T> {
    if r.is_err() {
        *flag = true;
    }
    r
}

/// The host's RAM (MemTotal), the default `--max-guest-ram`. From sysinfo(2), which needs no
/// open: the process filter forbids opening /proc/meminfo once the daemon runs.
fn host_ram() -> u64 {
    // SAFETY: an all-zero sysinfo is a valid value of this plain C struct; sysinfo fills it.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo writes into `si`, which we own.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        warn!(
            "cannot read the host's RAM size ({}): guest RAM is not capped",
            io::Error::last_os_error()
        );
        return u64::MAX;
    }
    (si.totalram as u64).saturating_mul(u64::from(si.mem_unit.max(1)))
}

fn invalid(what: impl Into<String>) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what.into()))
}

impl Device {
    /// The device of a new connection: its vrings (belonging to `conn`) and one worker loop per
    /// queue (the threads are started by [`Device::spawn_workers`]).
    pub fn new(backend: Backend, mem: Mem, conn: &Arc<Connection>) -> io::Result<Device> {
        let n = backend.num_queues();
        let max = u16::try_from(backend.max_queue_size())
            .map_err(|_| io::Error::other("queue size too large"))?;
        let vrings = conn.scope(|| {
            (0..n)
                .map(|_| Vring::new(mem.clone(), max).map_err(|e| io::Error::other(e.to_string())))
                .collect::<io::Result<Vec<_>>>()
        })?;
        let loops = backend
            .0
            .completion_fds()
            .into_iter()
            .map(|fd| QueueLoop::new(fd).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Device {
            backend,
            mem,
            vrings,
            loops,
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            mappings: Vec::new(),
            inflight: None,
            log: None,
            give_up_pending: false,
            refused: false,
            rings_valid: vec![false; n],
            max_guest_ram: host_ram(),
            refusal_log: WarnLimit::new(),
        })
    }

    /// Cap guest RAM at `max` bytes (`--max-guest-ram`; None: the host's RAM, the default).
    pub fn with_max_guest_ram(mut self, max: Option<u64>) -> Device {
        if let Some(m) = max {
            self.max_guest_ram = m;
        }
        self
    }

    /// Start one worker thread per queue. They run until [`Device::stop_workers`].
    pub fn spawn_workers(&self) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
        let mut threads = Vec::new();
        for (i, (l, v)) in self.loops.iter().zip(&self.vrings).enumerate() {
            let (l, v, b) = (l.clone(), v.clone(), self.backend.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("queue{i}"))
                    .spawn(move || l.run(&b.0, i, &v))?,
            );
        }
        Ok(threads)
    }

    /// Ask every worker loop to end.
    pub fn stop_workers(&self) {
        for l in &self.loops {
            l.exit();
        }
    }

    /// A new request is about to be read: no refusal of an earlier one may be taken for this one's.
    pub fn begin_request(&mut self) {
        self.refused = false;
    }

    /// Whether the request that ended in `e` was refused with its answer sent (clears it): the
    /// connection continues. Logs the refusal (rate-limited). Only errors a handler returns
    /// qualify: a message that could not be framed or decoded, or an answer that could not be
    /// sent, always ends the connection.
    pub fn take_refused(&mut self, e: &VhostUserError) -> bool {
        if !std::mem::take(&mut self.refused) {
            return false;
        }
        if !matches!(
            e,
            VhostUserError::ReqHandlerError(_)
                | VhostUserError::InvalidOperation(_)
                | VhostUserError::InvalidParam
                | VhostUserError::InactiveFeature(_)
                | VhostUserError::BackendInternalError
        ) {
            return false;
        }
        if let Some(n) = self.refusal_log.allow(Instant::now()) {
            let more = if n > 0 {
                format!(" ({n} similar refusal(s) not logged)")
            } else {
                String::new()
            };
            warn!("refused a request of the VMM: {e}; the connection goes on{more}");
        }
        true
    }

    fn vring(&self, index: u32) -> VhostUserResult<&Vring> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VhostUserResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| invalid(format!("address {va:#x} is in no memory region")))
    }

    /// Watch the kick fd of queue `index` while the queue is started and enabled.
    fn update_registration(&self, index: usize) -> VhostUserResult<()> {
        let (Some(vring), Some(l)) = (self.vrings.get(index), self.loops.get(index)) else {
            return Err(VhostUserError::InvalidParam);
        };
        let st = vring.get_ref();
        let fd = match st.get_kick() {
            Some(k) if st.get_queue().ready() && st.is_enabled() => Some(k.as_raw_fd()),
            _ => None,
        };
        drop(st);
        l.watch_kick(fd).map_err(VhostUserError::ReqHandlerError)
    }

    /// Start queue `index` (its kick fd arrived): pick up its inflight region (resubmitting
    /// what a previous backend left in flight), then serve it.
    fn start_queue(&mut self, index: usize) -> VhostUserResult<()> {
        if !self.rings_valid.get(index).copied().unwrap_or(false) {
            // Started once its addresses are accepted (SET_VRING_ADDR then calls here).
            if let Some(n) = self.refusal_log.allow(Instant::now()) {
                warn!(
                    "queue {index}: not started: it has no valid ring addresses{}",
                    if n > 0 {
                        format!(" ({n} similar warning(s) not logged)")
                    } else {
                        String::new()
                    }
                );
            }
            return self.update_registration(index);
        }
        let image = self.backend.0.image();
        match image.take_over() {
            Ok(true) => info!("image {}: taken over; serving it", image.path.display()),
            Ok(false) => {}
            Err(e) => {
                error!("queue {index}: not served: {e}");
                return Err(invalid(e.to_string()));
            }
        }
        self.give_up_pending = false;
        let vring = self.vrings[index].clone();
        let mut tracking = None;
        if let Some(map) = &self.inflight {
            let size = vring.get_ref().get_queue().size();
            match (map.queue(index as u16), vring.queue_used_idx()) {
                (Some(_), _) if size > map.queue_size() => warn!(
                    "queue {index}: {size} entries but the inflight region has room for {}: \
                     requests of this queue are not tracked",
                    map.queue_size()
                ),
                (Some(mut q), Ok(used)) => {
                    let r = q.start(size, used);
                    if let Some(next) = r.next_avail {
                        if next != vring.queue_next_avail() || !r.resubmit.is_empty() {
                            info!(
                                "queue {index}: resuming after a restart: {} request(s) in \
                                 flight resubmitted, next avail index {next}",
                                r.resubmit.len()
                            );
                        }
                        vring.set_queue_next_avail(next);
                        vring.set_queue_next_used(used);
                    }
                    tracking = Some((q, r.resubmit));
                }
                (Some(_), Err(e)) => warn!(
                    "queue {index}: cannot read the used ring ({e}): requests of this queue are \
                     not tracked"
                ),
                (None, _) => warn!(
                    "queue {index}: the inflight region has no part for it: requests of this \
                     queue are not tracked"
                ),
            }
        }
        self.backend.0.set_inflight(index, tracking);
        vring.set_queue_ready(true);
        self.update_registration(index)
    }

    /// After a kick or call fd arrived: start the queue if it now can be.
    fn maybe_start(&mut self, index: usize) -> VhostUserResult<()> {
        let st = self.vrings[index].get_ref();
        let needs = !st.get_queue().ready() && st.get_kick().is_some();
        drop(st);
        if needs {
            self.start_queue(index)
        } else {
            self.update_registration(index)
        }
    }

    /// Serve `mem` from now on: its mappings are known to the SIGBUS handler and checked
    /// against their files before any worker can see them (`BlkBackend::set_memory`).
    fn install_memory(&mut self, mem: GuestMemoryMmap) -> VhostUserResult<()> {
        self.backend
            .0
            .set_memory(&self.mem, mem)
            .map_err(VhostUserError::ReqHandlerError)
    }

    /// Refuse guest RAM of `total` bytes above `--max-guest-ram`, before anything is mapped.
    fn check_guest_ram(&self, total: Option<u64>) -> VhostUserResult<()> {
        match total {
            Some(t) if t <= self.max_guest_ram => Ok(()),
            _ => {
                let t = total.map_or_else(|| "more than 2^64".into(), |t| t.to_string());
                error!(
                    "refusing a memory table of {t} bytes of guest RAM: more than \
                     --max-guest-ram ({} bytes); guest RAM is pinned, so fully populated on \
                     this host",
                    self.max_guest_ram
                );
                Err(invalid(format!(
                    "guest RAM of {t} bytes exceeds --max-guest-ram ({} bytes)",
                    self.max_guest_ram
                )))
            }
        }
    }

    /// Stop queue `index` and wait for its requests in flight (GET_VRING_BASE, RESET_DEVICE).
    fn stop_queue(&mut self, index: usize) -> VhostUserResult<()> {
        let vring = self.vring(index as u32)?.clone();
        vring.set_queue_ready(false);
        self.update_registration(index)?;
        self.backend
            .stop_vring(index as u32)
            .map_err(VhostUserError::ReqHandlerError)
    }

    fn do_set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.backend.features() != 0 {
            return Err(invalid(format!(
                "features {features:#x} include bits that were not offered"
            )));
        }
        self.acked_features = features;
        // Without VHOST_USER_F_PROTOCOL_FEATURES every ring is enabled at once (vhost-user spec,
        // "Ring states").
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..self.vrings.len() {
                self.vrings[i].set_enabled(true);
                self.update_registration(i)?;
            }
        }
        self.apply_logging();
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        self.backend.acked_features(features);
        Ok(())
    }

    fn logging(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Hand the workers the log while LOG_ALL is negotiated; without it, drop (unmap) the log.
    fn apply_logging(&mut self) {
        if self.logging() {
            match &self.log {
                Some(log) => info!("dirty logging on ({} bytes of log)", log.len()),
                // QEMU sends SET_LOG_BASE right after when it starts a device mid-migration.
                None => info!("dirty logging asked for; no log yet (SET_LOG_BASE)"),
            }
            self.backend.0.set_dirty_log(self.log.clone());
        } else if self.log.is_some() {
            self.backend.0.set_dirty_log(None);
            self.log = None;
            info!("dirty logging off; log unmapped");
        }
    }

    /// Guest-physical addresses below this are guest RAM.
    fn guest_ram_end(&self) -> u64 {
        self.mappings
            .iter()
            .map(|m| m.gpa_base.saturating_add(m.size))
            .max()
            .unwrap_or(0)
    }

    fn do_set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostUserResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let map = DirtyLog::adopt(&file, offset, size).and_then(|map| {
            let end = self.guest_ram_end();
            if map.covers(end) {
                Ok(map)
            } else {
                Err(DirtyLogError::TooSmall {
                    len: size,
                    end,
                    need: dirty_log::bytes_for(end),
                })
            }
        });
        let map = match map {
            Ok(m) => Arc::new(m),
            Err(e) => {
                warn!("refusing the VMM's dirty log ({size} bytes at offset {offset}): {e}");
                return Err(invalid(format!("dirty log: {e}")));
            }
        };
        info!("dirty log: {size} bytes at offset {offset}");
        self.log = Some(map);
        if self.logging() {
            // The reply goes out after this: from then on nothing is written to the old log.
            self.backend.0.set_dirty_log(self.log.clone());
        }
        Ok(())
    }

    /// The device stopped (every queue got GET_VRING_BASE): give the image up if nothing is in
    /// flight, so that a migration's destination may take it over; else once it drains.
    fn maybe_give_up_image(&mut self) {
        let stopped = self.vrings.iter().all(|v| !v.get_ref().get_queue().ready());
        if !stopped {
            return;
        }
        let left = self.backend.0.sqes_in_flight();
        let image = self.backend.0.image();
        if left > 0 {
            if image.held() {
                warn!(
                    "device stopped with {left} I/O operation(s) in flight: keeping image {} \
                     until they complete",
                    image.path.display()
                );
            }
            self.give_up_pending = true;
        } else if image.give_up() {
            self.give_up_pending = false;
            info!(
                "device stopped and drained: image {} given up (a migration's destination may \
                 take it over; it is taken back when the device starts again)",
                image.path.display()
            );
        }
    }

    /// The connection is over and its I/O waited for: finish a give-up the device's stop left
    /// pending.
    pub fn connection_ended(&mut self) {
        if self.give_up_pending {
            self.maybe_give_up_image();
        }
        self.backend.0.set_dirty_log(None);
        self.log = None;
    }

    fn do_set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> VhostUserResult<()> {
        if ctx.len() as u64 > MAX_MEM_SLOTS {
            return Err(invalid(format!(
                "{} memory regions: more than the {MAX_MEM_SLOTS} slots offered",
                ctx.len()
            )));
        }
        self.check_guest_ram(
            ctx.iter()
                .try_fold(0u64, |sum, r| sum.checked_add(r.memory_size)),
        )?;
        // Any order is valid vhost-user; vm-memory wants the regions sorted by guest address.
        let mut table: Vec<(&VhostUserMemoryRegion, File)> = ctx.iter().zip(files).collect();
        table.sort_by_key(|(r, _)| r.guest_phys_addr);
        let mut regions = Vec::with_capacity(table.len());
        let mut mappings = Vec::with_capacity(table.len());
        for (r, file) in table {
            let region =
                GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(r.guest_phys_addr))
                    .ok_or_else(|| invalid("a memory region wraps around the address space"))?;
            mappings.push(AddrMapping {
                vmm_addr: r.user_addr,
                size: r.memory_size,
                gpa_base: r.guest_phys_addr,
            });
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| invalid(format!("memory table: {e}")))?;
        self.install_memory(mem)?;
        self.mappings = mappings;
        self.check_log_covers();
        Ok(())
    }

    /// Queue `index`'s rings were refused: it must never be served (nor its rings written)
    /// until valid addresses arrive.
    fn invalidate_rings(&mut self, index: usize) {
        let Some(v) = self.rings_valid.get_mut(index) else {
            return;
        };
        *v = false;
        let vring = self.vrings[index].clone();
        if vring.get_ref().get_queue().ready() {
            warn!("queue {index}: its new ring addresses were refused: the queue stops");
            vring.set_queue_ready(false);
            let _ = self.update_registration(index);
        }
    }

    fn check_log_covers(&self) {
        let end = self.guest_ram_end();
        if let Some(log) = self.log.as_ref().filter(|l| !l.covers(end)) {
            warn!(
                "dirty log: {} bytes cannot log guest RAM up to {end:#x} ({} bytes needed): \
                 writes past it are not logged",
                log.len(),
                dirty_log::bytes_for(end)
            );
        }
    }

    fn do_set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostUserResult<()> {
        let vring = self.vring(index)?;
        if self.mappings.is_empty() {
            return Err(invalid("vring addresses before any memory table"));
        }
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used_gpa = self.vmm_va_to_gpa(used)?;
        let log_addr = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        self.backend.0.set_used_log_addr(index as usize, log_addr);
        {
            // A running queue gets the same addresses again when the VMM switches logging on or
            // off: nothing else changes (its used index moves under us).
            let st = vring.get_ref();
            let q = st.get_queue();
            if q.ready()
                && q.desc_table() == desc
                && q.avail_ring() == avail
                && q.used_ring() == used_gpa
            {
                return Ok(());
            }
        }
        vring
            .set_queue_info(desc, avail, used_gpa)
            .map_err(|e| invalid(format!("vring addresses: {e}")))?;
        // The used index the guest sees (0 after a guest reset, where it left off otherwise).
        let idx = vring
            .queue_used_idx()
            .map_err(|e| invalid(format!("cannot read the used ring: {e}")))?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn do_set_vring_fd(
        &mut self,
        index: u8,
        file: Option<File>,
        kick: bool,
    ) -> VhostUserResult<()> {
        let i = usize::from(index);
        let vring = self.vring(u32::from(index))?.clone();
        if kick {
            // Stop watching the old fd before it is closed.
            self.loops[i]
                .watch_kick(None)
                .map_err(VhostUserError::ReqHandlerError)?;
            vring.set_kick(file);
        } else {
            vring.set_call(file);
        }
        self.maybe_start(i)
    }

    fn do_get_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let queues = self.backend.num_queues();
        if req.num_queues == 0
            || usize::from(req.num_queues) > queues
            || req.queue_size == 0
            || req.queue_size > MAX_INFLIGHT_QUEUE_SIZE
        {
            return Err(invalid(format!(
                "an inflight region for {} queue(s) of {} entries (this device has {queues} \
                 queue(s))",
                req.num_queues, req.queue_size
            )));
        }
        let (file, size) = inflight::create_region(req.num_queues, req.queue_size)
            .map_err(VhostUserError::ReqHandlerError)?;
        info!(
            "inflight region created: {} queue(s) of {} entries, {size} bytes",
            req.num_queues, req.queue_size
        );
        Ok((
            VhostUserInflight::new(size, 0, req.num_queues, req.queue_size),
            file,
        ))
    }

    fn do_set_inflight_fd(&mut self, req: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let map = InflightMap::adopt(
            &file,
            req.mmap_offset,
            req.mmap_size,
            req.num_queues,
            req.queue_size,
        )
        .map_err(|e| invalid(format!("inflight region: {e}")))?;
        info!(
            "inflight region in use: {} queue(s) of {} entries",
            req.num_queues, req.queue_size
        );
        self.inflight = Some(map);
        Ok(())
    }
}

impl VhostUserBackendReqHandlerMut for Device {
    fn set_owner(&mut self) -> VhostUserResult<()> {
        let r = if self.owned {
            Err(VhostUserError::InvalidOperation("already claimed"))
        } else {
            self.owned = true;
            Ok(())
        };
        refused(&mut self.refused, r)
    }

    fn reset_owner(&mut self) -> VhostUserResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VhostUserResult<()> {
        // Back to the initial state: every queue stopped, disabled and drained (its requests in
        // flight land first, as for GET_VRING_BASE), its fds dropped.
        for i in 0..self.vrings.len() {
            let r = self.stop_queue(i);
            refused(&mut self.refused, r)?;
            let v = &self.vrings[i];
            v.set_enabled(false);
            v.set_kick(None);
            v.set_call(None);
            self.rings_valid[i] = false;
        }
        self.acked_features = 0;
        self.backend.reset_device();
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VhostUserResult<()> {
        let r = self.do_set_features(features);
        refused(&mut self.refused, r)
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let r = if postcopy_listening.is_some() {
            Err(VhostUserError::InvalidOperation(
                "postcopy is not supported",
            ))
        } else {
            self.do_set_mem_table(ctx, files)
        };
        refused(&mut self.refused, r).map(|()| None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostUserResult<()> {
        let max = self.backend.max_queue_size();
        let r = self.vring(index).and_then(|v| {
            if num == 0 || num as usize > max {
                return Err(invalid(format!(
                    "queue {index}: size {num} is outside 1..={max}"
                )));
            }
            v.set_queue_size(num as u16);
            Ok(())
        });
        refused(&mut self.refused, r)
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VhostUserResult<()> {
        let r = self.do_set_vring_addr(index, flags, descriptor, used, available, log);
        let r = match r {
            Ok(()) => {
                if let Some(v) = self.rings_valid.get_mut(index as usize) {
                    *v = true;
                }
                // A kick fd that came first: the queue starts now.
                self.maybe_start(index as usize)
            }
            Err(e) => {
                self.invalidate_rings(index as usize);
                Err(e)
            }
        };
        refused(&mut self.refused, r)
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostUserResult<()> {
        let r = self
            .vring(index)
            .map(|v| v.set_queue_next_avail(base as u16));
        refused(&mut self.refused, r)
    }

    fn get_vring_base(&mut self, index: u32) -> VhostUserResult<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        // Stop the ring (vhost-user spec): no new requests, and wait for those in flight.
        self.stop_queue(index as usize)?;
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        self.maybe_give_up_image();
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let r = self.do_set_vring_fd(index, fd, true);
        refused(&mut self.refused, r)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let r = self.do_set_vring_fd(index, fd, false);
        refused(&mut self.refused, r)
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostUserResult<()> {
        let r = self.vring(u32::from(index)).map(|v| v.set_err(fd));
        refused(&mut self.refused, r)
    }

    fn get_protocol_features(&mut self) -> VhostUserResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        // Valid before SET_FEATURES too (vhost-user spec).
        let offered = self.backend.protocol_features().bits();
        let r = if features & !offered != 0 {
            Err(invalid(format!(
                "protocol features {features:#x} include bits that were not offered ({:#x})",
                features & !offered
            )))
        } else {
            self.acked_protocol_features = features;
            Ok(())
        };
        refused(&mut self.refused, r)
    }

    fn get_queue_num(&mut self) -> VhostUserResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostUserResult<()> {
        let r = if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            Err(VhostUserError::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ))
        } else {
            self.vring(index).and_then(|v| {
                v.set_enabled(enable);
                self.update_registration(index as usize)
            })
        };
        refused(&mut self.refused, r)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<Vec<u8>> {
        Ok(self.backend.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        let r = self
            .backend
            .set_config(offset, buf)
            .map_err(VhostUserError::ReqHandlerError);
        refused(&mut self.refused, r)
    }

    fn set_backend_req_fd(&mut self, channel: BackendChannel) {
        if self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            channel.set_reply_ack_flag(true);
        }
        self.backend.set_backend_req_fd(channel);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostUserResult<()> {
        refused(
            &mut self.refused,
            Err(VhostUserError::InvalidOperation("not a GPU")),
        )
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostUserResult<File> {
        Err(VhostUserError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        // No answer is sent on an error: the connection ends.
        self.do_get_inflight_fd(inflight)
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostUserResult<()> {
        let r = self.do_set_inflight_fd(inflight, file);
        refused(&mut self.refused, r)
    }

    fn get_max_mem_slots(&mut self) -> VhostUserResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<Option<VhostUserMemoryRegionBase>> {
        let r = (|| {
            if postcopy_listening.is_some() {
                return Err(VhostUserError::InvalidOperation(
                    "postcopy is not supported",
                ));
            }
            let current = self.mem.memory();
            if current.num_regions() as u64 >= MAX_MEM_SLOTS {
                return Err(invalid(format!(
                    "a memory region past the {MAX_MEM_SLOTS} slots offered"
                )));
            }
            self.check_guest_ram(
                current
                    .iter()
                    .map(|r| r.len())
                    .try_fold(region.memory_size, |sum, l| sum.checked_add(l)),
            )?;
            drop(current);
            let guest_region = Arc::new(
                GuestRegionMmap::new(
                    region.mmap_region(fd)?,
                    GuestAddress(region.guest_phys_addr),
                )
                .ok_or_else(|| invalid("a memory region wraps around the address space"))?,
            );
            let mem = self
                .mem
                .memory()
                .insert_region(guest_region)
                .map_err(|e| invalid(format!("memory region: {e}")))?;
            self.install_memory(mem)?;
            self.mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            Ok(None)
        })();
        refused(&mut self.refused, r)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let r = (|| {
            let (mem, _) = self
                .mem
                .memory()
                .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
                .map_err(|e| invalid(format!("memory region: {e}")))?;
            self.install_memory(mem)?;
            self.mappings
                .retain(|m| m.gpa_base != region.guest_phys_addr);
            Ok(())
        })();
        refused(&mut self.refused, r)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostUserResult<Option<File>> {
        Err(VhostUserError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VhostUserResult<()> {
        // The vhost crate answers with a value (1: failed) and goes on: not a refusal.
        Err(VhostUserError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VhostUserResult<VhostUserShMemConfig> {
        Err(VhostUserError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostUserResult<()> {
        // Not a refusal the connection survives: the vhost crate cannot nack SET_LOG_BASE, and a
        // VMM waits for its reply, so an unusable log ends the connection.
        self.do_set_log_base(log, file)
    }
}
