//! The device one VMM connection drives: its state, its worker threads, the refusal flag of
//! the request being handled, and feature negotiation. What each request does is split by job:
//! `memory.rs` (memory tables), `vrings.rs` (queues start and stop, ring addresses, inflight
//! regions), `migration.rs` (dirty log, image hand-over); `handler.rs` maps messages to them.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use log::warn;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Error as VhostUserError, Result as VhostUserResult};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::memory::AddrMapping;
use crate::dirty_log::DirtyLog;
use crate::inflight::InflightMap;
use crate::queues::Queues;
use crate::vring::{Connection, Mem};
use crate::worker::{QueueLoop, Vring, WarnLimit};

/// The device as one VMM connection drives it: what the `vhost` crate's handler calls
/// (`handler.rs`), in front of the [`Queues`] that serve its I/O.
pub struct Device {
    pub(super) queues: Arc<Queues>,
    pub(super) mem: Mem,
    pub(super) vrings: Vec<Vring>,
    pub(super) loops: Vec<Arc<QueueLoop>>,
    pub(super) owned: bool,
    pub(super) acked_features: u64,
    pub(super) acked_protocol_features: u64,
    pub(super) mappings: Vec<AddrMapping>,
    /// The inflight region the VMM handed over (SET_INFLIGHT_FD).
    pub(super) inflight: Option<Arc<InflightMap>>,
    /// The dirty log the VMM handed over (SET_LOG_BASE), in use while it asks for LOG_ALL.
    pub(super) log: Option<Arc<DirtyLog>>,
    /// The device stopped with I/O still in flight: the image is given up once it drains.
    pub(super) give_up_pending: bool,
    /// The request being handled was refused and its answer (a nack, where the VMM asked for
    /// one) went out: the connection goes on. Cleared before every request
    /// ([`Device::begin_request`]), so that it never outlives its request.
    pub(super) refused: bool,
    /// Per queue: its ring addresses were accepted (SET_VRING_ADDR). A queue without valid
    /// rings is never started: nothing may read or write its default addresses (0).
    pub(super) rings_valid: Vec<bool>,
    /// Most guest RAM a memory table may add up to (`--max-guest-ram`): it is pinned, so
    /// fully populated on the host.
    pub(super) max_guest_ram: u64,
    pub(super) refusal_log: WarnLimit,
}

/// Count a refusal (see [`Device::take_refused`]).
pub(super) fn refused<T>(flag: &mut bool, r: VhostUserResult<T>) -> VhostUserResult<T> {
    if r.is_err() {
        *flag = true;
    }
    r
}

pub(super) fn invalid(what: impl Into<String>) -> VhostUserError {
    VhostUserError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what.into()))
}

impl Device {
    /// The device of a new connection: its vrings (belonging to `conn`) and one worker loop per
    /// queue (the threads are started by [`Device::spawn_workers`]).
    pub fn new(queues: Arc<Queues>, mem: Mem, conn: &Arc<Connection>) -> io::Result<Device> {
        let n = queues.num_queues();
        let max = u16::try_from(queues.max_queue_size())
            .map_err(|_| io::Error::other("queue size too large"))?;
        let vrings = conn.scope(|| {
            (0..n)
                .map(|_| Vring::new(mem.clone(), max).map_err(|e| io::Error::other(e.to_string())))
                .collect::<io::Result<Vec<_>>>()
        })?;
        let loops = queues
            .completion_fds()
            .into_iter()
            .map(|fd| QueueLoop::new(fd).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Device {
            queues,
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
            max_guest_ram: super::memory::host_ram(),
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
            let (l, v, q) = (l.clone(), v.clone(), self.queues.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("queue{i}"))
                    .spawn(move || l.run(&*q, i, &v))?,
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

    pub(super) fn vring(&self, index: u32) -> VhostUserResult<&Vring> {
        self.vrings
            .get(index as usize)
            .ok_or(VhostUserError::InvalidParam)
    }

    pub(super) fn do_set_features(&mut self, features: u64) -> VhostUserResult<()> {
        if features & !self.queues.features() != 0 {
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
        self.queues.set_acked_features(features);
        Ok(())
    }
}
