//! Building the SQEs of a parsed read, write or flush (discard and write-zeroes: `zeroing`), and
//! of the follow-up steps completions ask for. Built SQEs go to the engine.

use std::sync::atomic::Ordering;

use io_uring::{opcode, squeue, types};
use log::debug;
use vm_memory::GuestMemoryMmap;

use super::complete::FollowUp;
use super::slots::Started;
use super::user_data::{Step, UserData};
use super::zeroing::fallocate_sqe;
use super::{QueueState, Shared, VringState, FILE_BUFFERED, FILE_PRIMARY, STATUS_IOERR, STATUS_OK};
use crate::stats::{ErrorKind, OpKind};

/// How the SQEs of one read or write are built.
#[derive(Clone, Copy)]
struct Rw {
    head: u16,
    offset: u64,
    write: bool,
    file: u32,
    rw_flags: i32,
}

/// fdatasync of the image (FLUSH, and writethrough discard/write-zeroes).
pub(super) fn fsync_sqe(head: u16) -> squeue::Entry {
    opcode::Fsync::new(types::Fixed(FILE_PRIMARY))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(UserData::new(head, Step::Fsync).encode())
}

/// The SQE of a step a completion asked for.
pub(super) fn follow_up_sqe(f: FollowUp) -> squeue::Entry {
    match f {
        FollowUp::Fsync { head } => fsync_sqe(head),
        FollowUp::Fallocate { ud, range } => fallocate_sqe(ud, &range),
    }
}

impl QueueState {
    /// Start a FLUSH: one fdatasync.
    pub(super) fn start_flush(&mut self, head: u16, status: Option<u64>) {
        let started = Started {
            status,
            pending: 1,
            used_len: 1,
            op: OpKind::Flush,
            bytes: 0,
            start: self.clock,
        };
        self.occupy(head, started, Vec::new());
        self.engine.push(fsync_sqe(head));
    }

    /// Start a read or write of `len` bytes at `offset`, whose segments are in `self.segs`.
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
        let Some(map) = self.engine.map() else {
            return;
        };
        let op = if write { OpKind::Write } else { OpKind::Read };
        self.pieces.clear();
        for s in &self.segs {
            if let Err(e) = map.translate(s.addr, s.len, |p| self.pieces.push(p)) {
                debug!("queue {}: request {head}: {e}", self.index);
                self.account(op, 0, Some(self.clock), Some(ErrorKind::BadAddress));
                self.publish(head, status, STATUS_IOERR, 1, vs, mem);
                return;
            }
        }
        if self.pieces.is_empty() {
            self.account(op, 0, Some(self.clock), None);
            self.publish(head, status, STATUS_OK, 1, vs, mem);
            return;
        }
        let file = if shared.direct && self.direct_ok(offset, shared) {
            FILE_PRIMARY
        } else if shared.direct {
            FILE_BUFFERED
        } else {
            FILE_PRIMARY
        };
        let dsync = write && !shared.writeback.load(Ordering::Relaxed);
        let rw = Rw {
            head,
            offset,
            write,
            file,
            rw_flags: if dsync { libc::RWF_DSYNC } else { 0 },
        };
        let vectored = shared.vectored && self.pieces.len() > 1;
        // One READV_FIXED/WRITEV_FIXED per run of pieces in the same fixed buffer (the kernel
        // requires every iovec of one SQE to lie in the buffer it names); else one SQE a piece.
        let pending = if vectored {
            1 + self
                .pieces
                .windows(2)
                .filter(|w| w[0].buf_index != w[1].buf_index)
                .count()
        } else {
            self.pieces.len()
        };
        let started = Started {
            status,
            pending: pending as u32,
            used_len: if write {
                1
            } else {
                (len as u32).saturating_add(1)
            },
            op,
            bytes: len,
            start: self.clock,
        };
        self.occupy(head, started, Vec::new());
        if let Some(slot) = self.slots.busy_mut(head).filter(|_| !write) {
            // Where the read lands in guest RAM, logged when it completes (logging may be
            // switched on while it is in flight).
            let segs = self.segs.iter().map(|s| [s.addr, u64::from(s.len)]);
            slot.landed.extend(segs);
        }
        if vectored {
            self.push_vectored(rw);
        } else {
            self.push_pieces(rw);
        }
    }

    /// One SQE per run of pieces in the same fixed buffer.
    fn push_vectored(&mut self, rw: Rw) {
        let Some(slot) = self.slots.busy_mut(rw.head) else {
            return;
        };
        slot.iov.clear();
        slot.iov
            .extend(self.pieces.iter().map(|p| [p.host, u64::from(p.len)]));
        let mut off = rw.offset;
        let mut a = 0;
        while a < self.pieces.len() {
            let idx = self.pieces[a].buf_index;
            let b = a + self.pieces[a..]
                .iter()
                .take_while(|p| p.buf_index == idx)
                .count();
            let total: u64 = self.pieces[a..b].iter().map(|p| u64::from(p.len)).sum();
            let Some(slot) = self.slots.busy_mut(rw.head) else {
                return;
            };
            // `[u64; 2]` has the layout of `struct iovec` on 64-bit Linux (checked at compile
            // time in `slots`); the slot keeps the array until the request completes.
            let ptr = slot.iov[a..].as_ptr() as *const libc::iovec;
            let n = (b - a) as u32;
            // total <= len, and a request's len fits in u32 (seg_max * size_max).
            let ud = UserData::new(rw.head, Step::Rw).expected(total as u32);
            let e = if rw.write {
                opcode::WritevFixed::new(types::Fixed(rw.file), ptr, n, idx)
                    .offset(off)
                    .rw_flags(rw.rw_flags)
                    .build()
            } else {
                opcode::ReadvFixed::new(types::Fixed(rw.file), ptr, n, idx)
                    .offset(off)
                    .build()
            };
            self.engine.push(e.user_data(ud.encode()));
            off += total;
            a = b;
        }
    }

    /// One READ_FIXED/WRITE_FIXED per piece.
    fn push_pieces(&mut self, rw: Rw) {
        let mut off = rw.offset;
        for i in 0..self.pieces.len() {
            let p = self.pieces[i];
            let ud = UserData::new(rw.head, Step::Rw).expected(p.len);
            let file = types::Fixed(rw.file);
            let e = if rw.write {
                opcode::WriteFixed::new(file, p.host as *const u8, p.len, p.buf_index)
                    .offset(off)
                    .rw_flags(rw.rw_flags)
                    .build()
            } else {
                opcode::ReadFixed::new(file, p.host as *mut u8, p.len, p.buf_index)
                    .offset(off)
                    .build()
            };
            self.engine.push(e.user_data(ud.encode()));
            off += u64::from(p.len);
        }
    }

    /// Whether every piece of the current request meets the O_DIRECT alignment.
    fn direct_ok(&self, offset: u64, shared: &Shared) -> bool {
        offset.is_multiple_of(shared.dio_offset_align)
            && self.pieces.iter().all(|p| {
                p.host % shared.dio_mem_align == 0
                    && u64::from(p.len) % shared.dio_offset_align == 0
            })
    }
}
