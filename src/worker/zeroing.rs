//! Discard and write-zeroes: the fallocate steps of each range, and the fallback where the
//! filesystem refuses one (tmpfs has no FALLOC_FL_ZERO_RANGE: punch a hole, then allocate it
//! again; where holes cannot be punched, zero in place). A refused step is replaced by another
//! with the same result, now and for every later request of the queue.

use std::sync::atomic::Ordering;

use io_uring::{opcode, squeue, types};
use vm_memory::GuestMemoryMmap;

use super::slots::Started;
use super::user_data::{Step, UserData};
use super::{QueueState, Shared, VringState, FILE_PRIMARY, STATUS_OK};
use crate::request::{ZeroMode, ZeroRange};
use crate::stats::OpKind;

/// What the filesystem under the image was found to refuse.
#[derive(Debug, Default)]
pub(super) struct Zeroing {
    /// It refused FALLOC_FL_ZERO_RANGE (tmpfs): zero in place by punching a hole and
    /// allocating it again.
    zero_range_unsupported: bool,
    /// It refused FALLOC_FL_PUNCH_HOLE: write-zeroes with UNMAP zeroes in place.
    punch_unsupported: bool,
}

impl Zeroing {
    /// The first step of a range.
    pub fn first_step(&self, mode: ZeroMode) -> Step {
        match mode {
            ZeroMode::Discard => Step::Discard,
            ZeroMode::Unmap if self.punch_unsupported => Step::ZeroRange,
            ZeroMode::Unmap => Step::Punch,
            ZeroMode::InPlace if self.zero_range_unsupported => Step::PunchRealloc,
            ZeroMode::InPlace => Step::ZeroRange,
        }
    }

    /// The step a range needs after `step` completed with `res`: one that replaces it (the
    /// filesystem refused it) or the second half of zeroing by punch and allocate. None: the
    /// range is done (or failed).
    pub fn next_step(&mut self, step: Step, res: i32) -> Option<Step> {
        let unsupported = res == -libc::EOPNOTSUPP;
        match step {
            // Zeroing in place: punch a hole, then allocate it again (reads back as zeroes,
            // stays allocated).
            Step::ZeroRange if unsupported => {
                self.zero_range_unsupported = true;
                Some(Step::PunchRealloc)
            }
            // UNMAP is a hint: where holes cannot be punched, zero in place.
            Step::Punch if unsupported => {
                self.punch_unsupported = true;
                Some(Step::ZeroRange)
            }
            Step::PunchRealloc if res >= 0 => Some(Step::Alloc),
            _ => None,
        }
    }
}

/// The fallocate SQE of one step of a discard or write-zeroes range.
pub(super) fn fallocate_sqe(ud: UserData, r: &ZeroRange) -> squeue::Entry {
    let mode = match ud.step {
        Step::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        Step::Alloc => libc::FALLOC_FL_KEEP_SIZE,
        _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
    };
    opcode::Fallocate::new(types::Fixed(FILE_PRIMARY), r.len)
        .offset(r.offset)
        .mode(mode)
        .build()
        .user_data(ud.encode())
}

impl QueueState {
    /// Start a discard or write-zeroes request whose ranges are in `self.ranges`.
    pub(super) fn start_zero(
        &mut self,
        head: u16,
        status: Option<u64>,
        vs: &mut VringState<'_>,
        mem: &GuestMemoryMmap,
        shared: &Shared,
    ) {
        let op = if self.ranges.iter().any(|r| r.mode == ZeroMode::Discard) {
            OpKind::Discard
        } else {
            OpKind::WriteZeroes
        };
        let bytes = self.ranges.iter().map(|r| r.len).sum();
        // A segment of zero sectors asks for nothing: it completes OK.
        let ranges = std::mem::take(&mut self.ranges);
        let work = ranges.iter().filter(|r| r.len > 0).count() as u32;
        if work == 0 {
            self.account(op, 0, Some(self.clock), None);
            self.publish(head, status, STATUS_OK, 1, vs, mem);
            return;
        }
        let started = Started {
            status,
            pending: work,
            used_len: 1,
            op,
            bytes,
            start: self.clock,
        };
        let slot = self.occupy(head, started, ranges);
        // Under a writethrough cache the change must be durable before it completes.
        slot.sync_after = !shared.writeback.load(Ordering::Relaxed);
        // The slot keeps the ranges; the SQEs are built from a copy of each.
        for i in 0..slot.ranges.len() {
            let Some(slot) = self.slots.busy_mut(head) else {
                return;
            };
            let r = slot.ranges[i];
            if r.len == 0 {
                continue;
            }
            // `i` < MAX_DISCARD_SEG, which fits in a u8 (see `user_data`).
            let ud = UserData::new(head, self.zeroing.first_step(r.mode)).range(i as u8);
            self.engine.push(fallocate_sqe(ud, &r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNSUPPORTED: i32 = -libc::EOPNOTSUPP;

    #[test]
    fn zero_range_refused_becomes_punch_then_alloc_for_good() {
        let mut z = Zeroing::default();
        assert_eq!(z.first_step(ZeroMode::InPlace), Step::ZeroRange);
        assert_eq!(
            z.next_step(Step::ZeroRange, UNSUPPORTED),
            Some(Step::PunchRealloc)
        );
        assert_eq!(z.next_step(Step::PunchRealloc, 0), Some(Step::Alloc));
        assert_eq!(z.next_step(Step::Alloc, 0), None);
        // Later requests go straight to the replacement.
        assert_eq!(z.first_step(ZeroMode::InPlace), Step::PunchRealloc);
        assert_eq!(z.first_step(ZeroMode::Unmap), Step::Punch);
    }

    #[test]
    fn punch_refused_becomes_zero_range_for_good() {
        let mut z = Zeroing::default();
        assert_eq!(z.first_step(ZeroMode::Unmap), Step::Punch);
        assert_eq!(z.next_step(Step::Punch, UNSUPPORTED), Some(Step::ZeroRange));
        assert_eq!(z.first_step(ZeroMode::Unmap), Step::ZeroRange);
        assert_eq!(z.first_step(ZeroMode::InPlace), Step::ZeroRange);
    }

    #[test]
    fn other_results_end_the_range() {
        let mut z = Zeroing::default();
        assert_eq!(z.next_step(Step::ZeroRange, 0), None);
        assert_eq!(z.next_step(Step::ZeroRange, -libc::EIO), None);
        assert_eq!(z.next_step(Step::PunchRealloc, -libc::EIO), None);
        // Discard is advisory: a refusal is not replaced (it counts as done).
        assert_eq!(z.next_step(Step::Discard, UNSUPPORTED), None);
        assert_eq!(z.first_step(ZeroMode::Discard), Step::Discard);
    }
}
