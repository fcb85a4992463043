//! The vhost-user front-end requests of one connection: how the `vhost` crate's
//! `BackendReqHandler` (which frames and decodes each message) reaches [`Device`]. Each request
//! is answered here or by the part of the device that does its job; a refusal raises the
//! device's refusal flag (see [`Device::take_refused`]).

use std::fs::File;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    self, Error as VhostUserError, GpuBackend, Result as VhostUserResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;

use super::device::{invalid, refused, Device};
use super::memory::MAX_MEM_SLOTS;
use super::vrings::RingAddrs;
use crate::queues::PROTOCOL_FEATURES;

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
        Ok(())
    }

    fn get_features(&mut self) -> VhostUserResult<u64> {
        Ok(self.queues.features())
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
        let max = self.queues.max_queue_size();
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
        let addrs = RingAddrs {
            flags,
            descriptor,
            used,
            available,
            log,
        };
        let r = self.set_ring_addrs(index, addrs);
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
        Ok(PROTOCOL_FEATURES)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostUserResult<()> {
        // Valid before SET_FEATURES too (vhost-user spec).
        let offered = PROTOCOL_FEATURES.bits();
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
        Ok(self.queues.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostUserResult<()> {
        let r = self
            .queues
            .set_config(offset, buf)
            .map_err(VhostUserError::ReqHandlerError);
        refused(&mut self.refused, r)
    }

    fn set_backend_req_fd(&mut self, channel: vhost_user::Backend) {
        if self.acked_protocol_features & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            channel.set_reply_ack_flag(true);
        }
        self.queues.set_channel(channel);
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
        let r = self
            .do_add_mem_region(region, fd, postcopy_listening)
            .map(|()| None);
        refused(&mut self.refused, r)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostUserResult<()> {
        let r = self.do_remove_mem_region(region);
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
