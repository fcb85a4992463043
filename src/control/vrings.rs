//! The queues as the VMM sets them up: ring sizes, addresses and fds, start (with the inflight
//! region a previous backend left) and stop (waiting for the requests in flight), and the
//! inflight regions themselves. A queue whose ring addresses were refused is never served.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Instant;

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserVringAddrFlags};
use vhost::vhost_user::{Error as VhostUserError, Result as VhostUserResult};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::device::{invalid, Device};
use crate::inflight::{self, InflightMap};

/// The addresses of SET_VRING_ADDR, as the VMM gave them (in its own address space).
pub(super) struct RingAddrs {
    pub flags: VhostUserVringAddrFlags,
    pub descriptor: u64,
    pub used: u64,
    pub available: u64,
    /// Where the used ring's writes are logged, with VHOST_VRING_F_LOG.
    pub log: u64,
}

/// Largest queue an inflight region is made for (the virtio split-ring maximum).
const MAX_INFLIGHT_QUEUE_SIZE: u16 = 32768;

impl Device {
    /// Watch the kick fd of queue `index` while the queue is started and enabled.
    pub(super) fn update_registration(&self, index: usize) -> VhostUserResult<()> {
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
    pub(super) fn start_queue(&mut self, index: usize) -> VhostUserResult<()> {
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
        let image = self.queues.image();
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
        self.queues.set_inflight(index, tracking);
        vring.set_queue_ready(true);
        self.update_registration(index)
    }

    /// After a kick or call fd arrived: start the queue if it now can be.
    pub(super) fn maybe_start(&mut self, index: usize) -> VhostUserResult<()> {
        let st = self.vrings[index].get_ref();
        let needs = !st.get_queue().ready() && st.get_kick().is_some();
        drop(st);
        if needs {
            self.start_queue(index)
        } else {
            self.update_registration(index)
        }
    }

    /// Stop queue `index` and wait for its requests in flight (GET_VRING_BASE, RESET_DEVICE).
    pub(super) fn stop_queue(&mut self, index: usize) -> VhostUserResult<()> {
        let vring = self.vring(index as u32)?.clone();
        vring.set_queue_ready(false);
        self.update_registration(index)?;
        self.queues.stop_queue(index as u32);
        Ok(())
    }

    /// Queue `index`'s rings were refused: it must never be served (nor its rings written)
    /// until valid addresses arrive.
    pub(super) fn invalidate_rings(&mut self, index: usize) {
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

    /// SET_VRING_ADDR: queue `index`'s rings are at `addrs` (the VMM's addresses). Accepted,
    /// the queue may start (a kick fd that came first starts it now); refused, it stops and may
    /// not be served until valid addresses arrive.
    pub(super) fn set_ring_addrs(&mut self, index: u32, addrs: RingAddrs) -> VhostUserResult<()> {
        match self.do_set_ring_addrs(index, addrs) {
            Ok(()) => {
                if let Some(v) = self.rings_valid.get_mut(index as usize) {
                    *v = true;
                }
                self.maybe_start(index as usize)
            }
            Err(e) => {
                self.invalidate_rings(index as usize);
                Err(e)
            }
        }
    }

    fn do_set_ring_addrs(&mut self, index: u32, addrs: RingAddrs) -> VhostUserResult<()> {
        let RingAddrs {
            flags,
            descriptor,
            used,
            available,
            log,
        } = addrs;
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
        self.queues.set_used_log_addr(index as usize, log_addr);
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

    pub(super) fn do_set_vring_fd(
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

    pub(super) fn do_get_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
    ) -> VhostUserResult<(VhostUserInflight, File)> {
        let queues = self.queues.num_queues();
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

    pub(super) fn do_set_inflight_fd(
        &mut self,
        req: &VhostUserInflight,
        file: File,
    ) -> VhostUserResult<()> {
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
