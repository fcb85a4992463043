//! What the queues offer the VMM and what it negotiated: the virtio and vhost-user features,
//! the backend request channel, and the config space.

use std::io;
use std::sync::atomic::Ordering;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};

use super::{lock, Queues};
use crate::config::{self, DeviceSpec, CONFIG_LEN, CONFIG_WRITEBACK_OFFSET};
use crate::vmm_channel::VmmChannel;

/// The vhost-user protocol features offered.
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    // The channel a config-change message goes out on after a live resize.
    .union(VhostUserProtocolFeatures::BACKEND_REQ)
    // Requests in flight survive a backend restart (src/inflight.rs).
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    // The dirty log of a live migration comes as a shared memfd (src/dirty_log.rs).
    .union(VhostUserProtocolFeatures::LOG_SHMFD);

impl Queues {
    /// How many queues.
    pub fn num_queues(&self) -> usize {
        usize::from(self.spec.num_queues)
    }

    /// The largest queue size offered.
    pub fn max_queue_size(&self) -> usize {
        usize::from(self.spec.queue_size)
    }

    /// The virtio features offered.
    pub fn features(&self) -> u64 {
        self.spec.features()
    }

    /// The driver acknowledged `features`: serve them (write cache, rings, limits).
    pub fn set_acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        self.update_write_cache();
        if let Err(e) = self.arm_rings(false) {
            error!("cannot serve the negotiated features: {e}");
        }
    }

    /// The VMM's backend request channel (SET_BACKEND_REQ_FD), for config-change messages.
    pub fn set_channel(&self, channel: vhost::vhost_user::Backend) {
        let mut slot = lock(&self.channel);
        // Forget (and close) a channel this connection sent before, so that it is not taken for
        // the new one.
        *slot = None;
        match VmmChannel::adopt(channel) {
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

    /// `size` bytes of the config space at `offset` (empty: outside it).
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let wb = self.shared.writeback.load(Ordering::Acquire);
        // The capacity is the image's now (it changes with a live resize).
        let spec = DeviceSpec {
            size_bytes: self.image.size(),
            ..self.spec.clone()
        };
        let space = spec.config_space(wb);
        config::config_read(&space, offset, size).unwrap_or_else(|| {
            warn!("config read of {size} bytes at {offset} is outside the {CONFIG_LEN}-byte config space");
            Vec::new()
        })
    }

    /// The driver writes the config space: only the writeback byte, with CONFIG_WCE.
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce = self.acked_has(VIRTIO_BLK_F_CONFIG_WCE);
        if wce && offset as usize == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 {
            self.image.write_cache.set(buf[0] != 0);
            self.update_write_cache();
            return Ok(());
        }
        warn!(
            "refused config write of {} bytes at offset {offset}",
            buf.len()
        );
        Err(io::Error::from(io::ErrorKind::InvalidInput))
    }

    pub(super) fn acked_has(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Acquire) & (1u64 << bit) != 0
    }

    /// The features the rings must serve: the acknowledged ones once the driver has acked,
    /// else everything offered.
    pub(super) fn effective(&self, bit: u32) -> bool {
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
    pub(super) fn update_write_cache(&self) {
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
}
