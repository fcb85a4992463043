//! Building SQEs for a parsed request and handing them to the kernel.

use std::sync::atomic::Ordering;

use io_uring::{opcode, squeue, types};
use log::{debug, error};
use vm_memory::GuestMemoryMmap;

use super::{QueueState, Shared, VringState, FILE_BUFFERED, FILE_PRIMARY, STATUS_IOERR, STATUS_OK};
use crate::request::ZeroRange;
use crate::stats::{ErrorKind, OpKind};

// user_data layout: head (16 bits) | kind (8) | range index (8) | expected length (32).
pub(super) const KIND_RW: u64 = 0;
pub(super) const KIND_FSYNC: u64 = 1;
pub(super) const KIND_ZERO_RANGE: u64 = 2;
pub(super) const KIND_PUNCH: u64 = 3;
pub(super) const KIND_DISCARD: u64 = 4;
/// A hole punched as the first half of zeroing in place where the filesystem cannot zero a
/// range (tmpfs): its completion re-allocates the range (`KIND_ALLOC`), so that write-zeroes
/// without UNMAP leaves the range allocated, as the guest asked.
pub(super) const KIND_PUNCH_REALLOC: u64 = 5;
pub(super) const KIND_ALLOC: u64 = 6;

pub(super) fn user_data(head: u16, kind: u64, idx: usize, len: u32) -> u64 {
    u64::from(head) | kind << 16 | ((idx as u64) & 0xff) << 24 | u64::from(len) << 32
}

impl QueueState {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_rw(
        &mut self,
        head: u16,
        status: Option<u64>,
        offset: u64,
        len: u64,
        write: bool,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
    ) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        let op = if write { OpKind::Write } else { OpKind::Read };
        self.pieces.clear();
        for s in &self.segs {
            if let Err(e) = engine.map.translate(s.addr, s.len, |p| self.pieces.push(p)) {
                debug!("queue {}: request {head}: {e}", self.index);
                self.account(op, 0, Some(self.clock), Some(ErrorKind::BadAddress));
                self.complete(head, status, STATUS_IOERR, 1, vs, mem);
                return;
            }
        }
        if self.pieces.is_empty() {
            self.account(op, 0, Some(self.clock), None);
            self.complete(head, status, STATUS_OK, 1, vs, mem);
            return;
        }
        let file = if shared.direct && self.direct_ok(offset, shared) {
            FILE_PRIMARY
        } else if shared.direct {
            FILE_BUFFERED
        } else {
            FILE_PRIMARY
        };
        let used_len = if write {
            1
        } else {
            (len as u32).saturating_add(1)
        };
        let dsync = write && !shared.writeback.load(Ordering::Relaxed);
        let rw_flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let hi = usize::from(head);
        if shared.vectored && self.pieces.len() > 1 {
            // One READV_FIXED/WRITEV_FIXED per run of pieces in the same fixed buffer: the
            // kernel requires every iovec of one SQE to lie in the buffer it names.
            let groups = 1 + self
                .pieces
                .windows(2)
                .filter(|w| w[0].buf_index != w[1].buf_index)
                .count();
            self.occupy(head, status, groups as u32, used_len, Vec::new());
            self.tag(head, op, len);
            if !write {
                self.record_landing(head);
            }
            let iov = &mut self.slots[hi].iov;
            iov.clear();
            iov.extend(self.pieces.iter().map(|p| [p.host, u64::from(p.len)]));
            let mut off = offset;
            let mut a = 0;
            while a < self.pieces.len() {
                let idx = self.pieces[a].buf_index;
                let b = a + self.pieces[a..]
                    .iter()
                    .take_while(|p| p.buf_index == idx)
                    .count();
                let total: u64 = self.pieces[a..b].iter().map(|p| u64::from(p.len)).sum();
                // `[u64; 2]` has the layout of `struct iovec` on 64-bit Linux (checked at
                // compile time below); the slot keeps the array until the request completes.
                let ptr = self.slots[hi].iov[a..].as_ptr() as *const libc::iovec;
                let n = (b - a) as u32;
                // total <= len, and a request's len fits in u32 (seg_max * size_max).
                let ud = user_data(head, KIND_RW, 0, total as u32);
                let e = if write {
                    opcode::WritevFixed::new(types::Fixed(file), ptr, n, idx)
                        .offset(off)
                        .rw_flags(rw_flags)
                        .build()
                } else {
                    opcode::ReadvFixed::new(types::Fixed(file), ptr, n, idx)
                        .offset(off)
                        .build()
                };
                self.push(e.user_data(ud), vs, mem);
                off += total;
                a = b;
            }
            return;
        }
        self.occupy(head, status, self.pieces.len() as u32, used_len, Vec::new());
        self.tag(head, op, len);
        if !write {
            self.record_landing(head);
        }
        let mut off = offset;
        for i in 0..self.pieces.len() {
            let p = self.pieces[i];
            let ud = user_data(head, KIND_RW, 0, p.len);
            let e = if write {
                opcode::WriteFixed::new(types::Fixed(file), p.host as *const u8, p.len, p.buf_index)
                    .offset(off)
                    .rw_flags(rw_flags)
                    .build()
            } else {
                opcode::ReadFixed::new(types::Fixed(file), p.host as *mut u8, p.len, p.buf_index)
                    .offset(off)
                    .build()
            };
            self.push(e.user_data(ud), vs, mem);
            off += u64::from(p.len);
        }
    }

    /// Remember where the current read lands in guest RAM, to log it when it completes
    /// (logging may be switched on while it is in flight).
    fn record_landing(&mut self, head: u16) {
        let slot = &mut self.slots[usize::from(head)];
        slot.landed
            .extend(self.segs.iter().map(|s| [s.addr, u64::from(s.len)]));
    }

    /// Whether every piece of the current request meets the O_DIRECT alignment.
    fn direct_ok(&self, offset: u64, shared: &Shared) -> bool {
        offset.is_multiple_of(shared.dio_offset_align)
            && self.pieces.iter().all(|p| {
                p.host % shared.dio_mem_align == 0
                    && u64::from(p.len) % shared.dio_offset_align == 0
            })
    }

    pub(super) fn occupy(
        &mut self,
        head: u16,
        status: Option<u64>,
        pending: u32,
        used_len: u32,
        ranges: Vec<ZeroRange>,
    ) {
        let slot = &mut self.slots[usize::from(head)];
        slot.busy = true;
        slot.pending = pending;
        slot.error = None;
        slot.op = OpKind::Read;
        slot.bytes = 0;
        slot.start = Some(self.clock);
        slot.status = status;
        slot.used_len = used_len;
        slot.ranges = ranges;
        slot.sync_after = false;
        slot.landed.clear();
        self.inflight_reqs += 1;
        self.counters.inflight.set(self.inflight_requests() as u64);
    }

    /// What an occupied slot's request does, for the counters.
    pub(super) fn tag(&mut self, head: u16, op: OpKind, bytes: u64) {
        let slot = &mut self.slots[usize::from(head)];
        slot.op = op;
        slot.bytes = bytes;
    }

    /// Queue one SQE, submitting what is queued if the submission queue is full. An SQE that
    /// cannot be queued (no ring, or a queue that stays full) fails its part of the request
    /// at once, as if the kernel had failed it: no request waits forever for a lost SQE.
    pub(super) fn push(
        &mut self,
        e: squeue::Entry,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
    ) {
        if !self.try_push(&e, vs, mem) {
            self.on_completion(e.get_user_data(), -libc::ECANCELED, vs, mem);
        }
    }

    fn try_push(
        &mut self,
        e: &squeue::Entry,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
    ) -> bool {
        for _ in 0..1000 {
            let Some(engine) = self.engine.as_mut() else {
                error!(
                    "queue {}: no ring to submit to; the request fails",
                    self.index
                );
                return false;
            };
            // SAFETY: the SQE names only fixed files and fixed buffers of this ring; its buffer
            // pointer lies in a registered buffer (checked by translation, re-checked by the
            // kernel), which `Engine::_mem` keeps mapped while the ring lives.
            if unsafe { engine.ring.submission().push(e) }.is_ok() {
                engine.inflight += 1;
                self.counters.sqes.add(1);
                self.count_durability(e);
                return true;
            }
            self.submit(vs, mem);
        }
        error!(
            "queue {}: submission queue stays full; the request fails",
            self.index
        );
        false
    }

    /// Count what the kernel is told to make durable, from the SQE itself.
    fn count_durability(&mut self, e: &squeue::Entry) {
        let flags = sqe_op_flags(e);
        match e.get_opcode() as u8 {
            opcode::WriteFixed::CODE | opcode::WritevFixed::CODE
                if flags & libc::RWF_DSYNC as u32 != 0 =>
            {
                self.counters.dsync_writes.add(1)
            }
            opcode::Fsync::CODE if flags & types::FsyncFlags::DATASYNC.bits() != 0 => {
                self.counters.fdatasyncs.add(1)
            }
            _ => {}
        }
    }

    pub(super) fn queued_sqes(&mut self) -> usize {
        self.engine
            .as_mut()
            .map(|e| e.ring.submission().len())
            .unwrap_or(0)
    }

    /// Hand queued SQEs to the kernel: one io_uring_enter for the whole batch.
    pub(super) fn submit(&mut self, vs: &mut VringState<'_>, mem: &GuestMemoryMmap) {
        for _ in 0..1000 {
            let Some(engine) = self.engine.as_mut() else {
                return;
            };
            if engine.ring.submission().is_empty() {
                return;
            }
            self.counters.enters.add(1);
            match engine.ring.submit() {
                Ok(_) => continue,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => self.reap(vs, mem),
                    _ => {
                        error!("queue {}: io_uring_enter failed: {e}", self.index);
                        return;
                    }
                },
            }
        }
    }
}

/// The `op_flags` word of an SQE (rw_flags, fsync_flags...), as the kernel will read it.
fn sqe_op_flags(e: &squeue::Entry) -> u32 {
    const OP_FLAGS_OFFSET: usize = 28;
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: `Entry` is a repr(C) wrapper around `struct io_uring_sqe` (64 bytes, asserted
    // above), whose op_flags union is the u32 at offset 28; the read stays inside `e`.
    unsafe {
        std::ptr::read_unaligned(
            (e as *const squeue::Entry)
                .cast::<u8>()
                .add(OP_FLAGS_OFFSET)
                .cast::<u32>(),
        )
    }
}

/// fdatasync of the image (FLUSH, and writethrough discard/write-zeroes).
pub(super) fn fsync_sqe(head: u16) -> squeue::Entry {
    opcode::Fsync::new(types::Fixed(FILE_PRIMARY))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(user_data(head, KIND_FSYNC, 0, 0))
}

/// The fallocate SQE of one step of a discard or write-zeroes range.
pub(super) fn fallocate_sqe(head: u16, kind: u64, idx: usize, r: &ZeroRange) -> squeue::Entry {
    let mode = match kind {
        KIND_ZERO_RANGE => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        KIND_ALLOC => libc::FALLOC_FL_KEEP_SIZE,
        _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    };
    opcode::Fallocate::new(types::Fixed(FILE_PRIMARY), r.len)
        .offset(r.offset)
        .mode(mode)
        .build()
        .user_data(user_data(head, kind, idx, 0))
}
