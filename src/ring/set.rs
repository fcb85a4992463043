//! The rings of one queue, made once at startup before the sandbox closes, and reused by every
//! VMM connection: one ring for each opcode set the device can negotiate
//! ([`RingPolicy::device_variants`]), all signalling the queue's completion eventfd. At most
//! one of them is *armed*: it holds the current memory table's guest RAM as fixed buffers and
//! serves the queue. A new memory table, or a negotiation that picks another opcode set,
//! unregisters the guest RAM of the armed ring and registers the new table on the ring that
//! matches, once the queue has nothing in flight; no ring is ever created after startup.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::IoUring;
use log::info;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::builder::{build_ring, register_buffers, unregister_buffers, RingSetup};
use super::policy::RingPolicy;
use crate::error::RingError;
use crate::guest_map::FixedBufferMap;

/// What an armed ring serves: the guest RAM it registered, kept mapped as long as it is.
struct Armed {
    ring: usize,
    map: FixedBufferMap,
    _mem: Arc<GuestMemoryMmap>,
}

/// One queue's rings and its completion eventfd.
pub struct RingSet {
    queue: u16,
    rings: Vec<(RingPolicy, IoUring)>,
    completion: EventFd,
    armed: Option<Armed>,
}

impl RingSet {
    /// Make queue `queue`'s rings: one per policy of `policies`, each with `files` as its fixed
    /// files, restricted and enabled, without fixed buffers.
    pub fn build(
        queue: u16,
        entries: u32,
        files: &[(RawFd, String)],
        policies: &[RingPolicy],
    ) -> Result<Self, RingError> {
        let completion = EventFd::new(EFD_NONBLOCK).map_err(RingError::RegisterEventfd)?;
        let rings = policies
            .iter()
            .enumerate()
            .map(|(i, policy)| {
                let label = format!("queue {queue} ({}/{})", i + 1, policies.len());
                let ring = build_ring(&RingSetup {
                    label: &label,
                    entries,
                    files,
                    eventfd: Some(completion.as_raw_fd()),
                    policy,
                })?;
                Ok((policy.clone(), ring))
            })
            .collect::<Result<Vec<_>, RingError>>()?;
        Ok(RingSet {
            queue,
            rings,
            completion,
            armed: None,
        })
    }

    /// The eventfd every ring of the set signals on completion.
    pub fn completion_fd(&self) -> &EventFd {
        &self.completion
    }

    /// Serve `mem` (laid out as fixed buffers by `map`) from the ring whose allowlist is
    /// `policy`, unregistering the guest RAM the set served before. The caller guarantees that
    /// no SQE of the set is in flight. On failure the set serves nothing.
    pub fn arm(
        &mut self,
        policy: &RingPolicy,
        map: FixedBufferMap,
        mem: Arc<GuestMemoryMmap>,
    ) -> Result<(), RingError> {
        self.disarm()?;
        let ring = self
            .rings
            .iter()
            .position(|(p, _)| p == policy)
            .ok_or_else(|| RingError::NoRing {
                queue: self.queue,
                ops: policy.sqe_op_names(),
            })?;
        let start = Instant::now();
        // SAFETY: `mem`, whose regions `map` describes, is kept in `self.armed` until the
        // buffers are unregistered (`disarm`) or the ring is dropped; guest RAM is shared
        // memory that Rust code only reads and writes through vm-memory's volatile accessors.
        unsafe { register_buffers(&self.rings[ring].1, &map) }?;
        info!(
            "queue {}: serving from its ring for SQE opcodes [{}]: {} fixed buffers, {} MiB of \
             guest RAM registered in {:.1?}",
            self.queue,
            policy.sqe_op_names(),
            map.buffers().len(),
            map.total_len() >> 20,
            start.elapsed()
        );
        self.armed = Some(Armed {
            ring,
            map,
            _mem: mem,
        });
        Ok(())
    }

    /// Unregister the guest RAM the set serves: it serves nothing afterwards. The caller
    /// guarantees that no SQE of the set is in flight.
    pub fn disarm(&mut self) -> Result<(), RingError> {
        if let Some(a) = self.armed.take() {
            unregister_buffers(&self.rings[a.ring].1)?;
        }
        Ok(())
    }

    /// The armed ring, if any.
    pub fn ring_mut(&mut self) -> Option<&mut IoUring> {
        let i = self.armed.as_ref()?.ring;
        self.rings.get_mut(i).map(|(_, r)| r)
    }

    /// The fixed buffers of the armed ring.
    pub fn map(&self) -> Option<&FixedBufferMap> {
        self.armed.as_ref().map(|a| &a.map)
    }

    /// The policy of the armed ring.
    pub fn armed_policy(&self) -> Option<&RingPolicy> {
        self.armed.as_ref().map(|a| &self.rings[a.ring].0)
    }

    /// How many rings the set holds.
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }
}
