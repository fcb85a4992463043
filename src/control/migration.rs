//! Live migration: the dirty log (SET_LOG_BASE, switched on and off with LOG_ALL) and the
//! image hand-over (given up once the device stopped and drained, so that the destination may
//! take it over).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{info, warn};
use vhost::vhost_user::message::{
    VhostUserLog, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Result as VhostUserResult;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::device::{invalid, Device};
use crate::dirty_log::{self, DirtyLog};
use crate::error::DirtyLogError;

impl Device {
    /// SET_LOG_FD: an eventfd to signal after the dirty log was written (no fd: none). Only an
    /// eventfd is accepted, made non-blocking. Returns whether it was accepted.
    pub fn set_log_fd(&mut self, mut fds: Vec<File>) -> bool {
        let file = match fds.len() {
            0 => None,
            1 => fds.pop(),
            n => {
                warn!("refusing SET_LOG_FD with {n} fds (one eventfd, or none)");
                return false;
            }
        };
        if let Some(f) = &file {
            if let Err(what) = crate::vring::check_eventfd(f.as_raw_fd())
                .and_then(|()| crate::vring::make_nonblocking(f.as_raw_fd()))
            {
                warn!("refusing the VMM's log fd (SET_LOG_FD): it is {what}, not an eventfd");
                return false;
            }
        }
        self.queues.set_log_kick(file.map(Arc::new));
        true
    }

    /// Whether the VMM negotiated REPLY_ACK.
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    pub(super) fn logging(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// Hand the workers the log while LOG_ALL is negotiated; without it, drop (unmap) the log.
    pub(super) fn apply_logging(&mut self) {
        if self.logging() {
            match &self.log {
                Some(log) => info!("dirty logging on ({} bytes of log)", log.len()),
                // QEMU sends SET_LOG_BASE right after when it starts a device mid-migration.
                None => info!("dirty logging asked for; no log yet (SET_LOG_BASE)"),
            }
            self.queues.set_dirty_log(self.log.clone());
        } else if self.log.is_some() {
            self.queues.set_dirty_log(None);
            self.log = None;
            info!("dirty logging off; log unmapped");
        }
    }

    pub(super) fn do_set_log_base(
        &mut self,
        log: &VhostUserLog,
        file: File,
    ) -> VhostUserResult<()> {
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
            self.queues.set_dirty_log(self.log.clone());
        }
        Ok(())
    }

    pub(super) fn check_log_covers(&self) {
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

    /// The device stopped (every queue got GET_VRING_BASE): give the image up if nothing is in
    /// flight, so that a migration's destination may take it over; else once it drains.
    pub(super) fn maybe_give_up_image(&mut self) {
        let stopped = self.vrings.iter().all(|v| !v.get_ref().get_queue().ready());
        if !stopped {
            return;
        }
        let left = self.queues.sqes_in_flight();
        let image = self.queues.image();
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
        self.queues.set_dirty_log(None);
        self.log = None;
    }
}
