//! Ring policy as a small typed value: the SQE opcodes, SQE flags and register opcodes a
//! ring allows, derived from the negotiated device features and nothing more.

use std::fmt;

use io_uring::opcode;
use io_uring::register::Restriction;
use io_uring::squeue::Flags;

/// SQE opcodes the data path may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SqeOp {
    ReadFixed,
    WriteFixed,
    Fsync,
    Fallocate,
    ReadvFixed,
    WritevFixed,
}

impl SqeOp {
    pub fn code(self) -> u8 {
        match self {
            SqeOp::ReadFixed => opcode::ReadFixed::CODE,
            SqeOp::WriteFixed => opcode::WriteFixed::CODE,
            SqeOp::Fsync => opcode::Fsync::CODE,
            SqeOp::Fallocate => opcode::Fallocate::CODE,
            SqeOp::ReadvFixed => opcode::ReadvFixed::CODE,
            SqeOp::WritevFixed => opcode::WritevFixed::CODE,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SqeOp::ReadFixed => "READ_FIXED",
            SqeOp::WriteFixed => "WRITE_FIXED",
            SqeOp::Fsync => "FSYNC",
            SqeOp::Fallocate => "FALLOCATE",
            SqeOp::ReadvFixed => "READV_FIXED",
            SqeOp::WritevFixed => "WRITEV_FIXED",
        }
    }
}

/// `io_uring_register` opcodes a ring may use once it is enabled: what swapping its guest RAM
/// needs, and nothing else (no files, eventfd, personality, restrictions or enabling).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RegisterOp {
    /// IORING_REGISTER_BUFFERS: a new memory table's guest RAM, once the old is unregistered
    /// (the kernel answers EBUSY while buffers are registered).
    Buffers,
    /// IORING_UNREGISTER_BUFFERS: the guest RAM of a memory table that is no longer served.
    UnregisterBuffers,
}

impl RegisterOp {
    pub fn code(self) -> u8 {
        match self {
            RegisterOp::Buffers => 0,
            RegisterOp::UnregisterBuffers => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RegisterOp::Buffers => "BUFFERS",
            RegisterOp::UnregisterBuffers => "UNREGISTER_BUFFERS",
        }
    }
}

/// The register opcodes of every ring the daemon makes (see [`RegisterOp`]).
const REGISTER_OPS: [RegisterOp; 2] = [RegisterOp::Buffers, RegisterOp::UnregisterBuffers];

/// What a ring allows once enabled. Built only by [`RingPolicy::for_device`] (one ring) and
/// [`RingPolicy::for_process`] (every ring the process creates, on Linux 7.0+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingPolicy {
    sqe_ops: Vec<SqeOp>,
    register_ops: Vec<RegisterOp>,
}

impl RingPolicy {
    /// The policy for a device: a read-only disk gets READ_FIXED alone; a writable one adds
    /// WRITE_FIXED; DISCARD or WRITE_ZEROES add FALLOCATE; a negotiated FLUSH adds FSYNC, and
    /// so do DISCARD or WRITE_ZEROES (under a writethrough cache they end with an fdatasync).
    pub fn for_device(writable: bool, flush: bool, zeroing: bool) -> Self {
        let mut sqe_ops = vec![SqeOp::ReadFixed];
        if writable {
            sqe_ops.push(SqeOp::WriteFixed);
            if flush || zeroing {
                sqe_ops.push(SqeOp::Fsync);
            }
            if zeroing {
                sqe_ops.push(SqeOp::Fallocate);
            }
        }
        RingPolicy {
            sqe_ops,
            register_ops: REGISTER_OPS.to_vec(),
        }
    }

    /// Every opcode set a device can negotiate, one ring each: a read-only disk has one
    /// (READ_FIXED); a writable one three (without FLUSH or zeroing; with FLUSH; with DISCARD or
    /// WRITE_ZEROES), each with the vectored opcodes where the kernel has them. Rings are made
    /// for all of them at startup, before the negotiation: the one matching it serves.
    pub fn device_variants(writable: bool, vectored: bool) -> Vec<Self> {
        let sets: &[(bool, bool)] = if writable {
            &[(false, false), (true, false), (true, true)]
        } else {
            &[(false, false)]
        };
        sets.iter()
            .map(|&(flush, zeroing)| {
                let p = RingPolicy::for_device(writable, flush, zeroing);
                if vectored {
                    p.with_vectored()
                } else {
                    p
                }
            })
            .collect()
    }

    /// The task-level allowlist the daemon installs on itself (Linux 7.0+) once its rings are
    /// made, which a ring created afterwards would inherit (seccomp forbids creating one): the
    /// broadest device policy it can serve, and the register opcodes of its own rings.
    pub fn for_process(writable: bool, vectored: bool) -> Self {
        let device = RingPolicy::for_device(writable, true, true);
        if vectored {
            device.with_vectored()
        } else {
            device
        }
    }

    /// Add the vectored fixed-buffer opcodes (Linux 6.15+), READV_FIXED and WRITEV_FIXED,
    /// to a writable disk's policy. A read-only disk keeps READ_FIXED alone.
    pub fn with_vectored(mut self) -> Self {
        if self.allows(SqeOp::WriteFixed) {
            self.sqe_ops.push(SqeOp::ReadvFixed);
            self.sqe_ops.push(SqeOp::WritevFixed);
        }
        self
    }

    pub fn sqe_ops(&self) -> &[SqeOp] {
        &self.sqe_ops
    }

    pub fn allows(&self, op: SqeOp) -> bool {
        self.sqe_ops.contains(&op)
    }

    /// Every SQE must carry IOSQE_FIXED_FILE, and may carry nothing else.
    pub fn required_flags(&self) -> Flags {
        Flags::FIXED_FILE
    }

    pub fn allowed_flags(&self) -> Flags {
        Flags::FIXED_FILE
    }

    pub fn register_ops(&self) -> &[RegisterOp] {
        &self.register_ops
    }

    /// The restriction entries handed to IORING_REGISTER_RESTRICTIONS.
    pub fn restrictions(&self) -> Vec<Restriction> {
        let mut r: Vec<Restriction> = self
            .sqe_ops
            .iter()
            .map(|op| Restriction::sqe_op(op.code()))
            .collect();
        r.push(Restriction::sqe_flags_allowed(self.allowed_flags().bits()));
        r.push(Restriction::sqe_flags_required(
            self.required_flags().bits(),
        ));
        r.extend(
            self.register_ops
                .iter()
                .map(|op| Restriction::register_op(op.code())),
        );
        r
    }
}

impl RingPolicy {
    /// The SQE opcodes' names, space-separated, for the log.
    pub fn sqe_op_names(&self) -> String {
        let ops: Vec<&str> = self.sqe_ops.iter().map(|o| o.name()).collect();
        ops.join(" ")
    }
}

impl fmt::Display for RingPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let regs: Vec<&str> = self.register_ops.iter().map(|o| o.name()).collect();
        write!(
            f,
            "SQE opcodes [{}], required SQE flags [FIXED_FILE], allowed SQE flags [FIXED_FILE], \
             register opcodes [{}]",
            self.sqe_op_names(),
            regs.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_gets_read_fixed_alone() {
        let p = RingPolicy::for_device(false, true, true);
        assert_eq!(p.sqe_ops(), &[SqeOp::ReadFixed]);
    }

    #[test]
    fn features_add_exactly_their_opcodes() {
        assert_eq!(
            RingPolicy::for_device(true, false, false).sqe_ops(),
            &[SqeOp::ReadFixed, SqeOp::WriteFixed]
        );
        assert_eq!(
            RingPolicy::for_device(true, true, false).sqe_ops(),
            &[SqeOp::ReadFixed, SqeOp::WriteFixed, SqeOp::Fsync]
        );
        assert_eq!(
            RingPolicy::for_device(true, false, true).sqe_ops(),
            &[
                SqeOp::ReadFixed,
                SqeOp::WriteFixed,
                SqeOp::Fsync,
                SqeOp::Fallocate
            ]
        );
        assert_eq!(
            RingPolicy::for_device(true, true, true).sqe_ops(),
            &[
                SqeOp::ReadFixed,
                SqeOp::WriteFixed,
                SqeOp::Fsync,
                SqeOp::Fallocate
            ]
        );
    }

    #[test]
    fn vectored_follows_the_scalar_opcodes() {
        assert_eq!(
            RingPolicy::for_device(false, true, true)
                .with_vectored()
                .sqe_ops(),
            &[SqeOp::ReadFixed]
        );
        assert_eq!(
            RingPolicy::for_device(true, false, false)
                .with_vectored()
                .sqe_ops(),
            &[
                SqeOp::ReadFixed,
                SqeOp::WriteFixed,
                SqeOp::ReadvFixed,
                SqeOp::WritevFixed
            ]
        );
    }

    #[test]
    fn restrictions_always_hold_a_register_op_and_the_flags() {
        let p = RingPolicy::for_device(false, false, false);
        // 1 opcode + allowed flags + required flags + 2 register ops.
        assert_eq!(p.restrictions().len(), 5);
        assert!(!p.register_ops().is_empty());
        assert_eq!(p.required_flags(), Flags::FIXED_FILE);
        assert!(p.to_string().contains("READ_FIXED"));
    }

    #[test]
    fn the_process_allowlist_covers_every_device_policy_and_nothing_else() {
        let p = RingPolicy::for_process(true, true);
        for w in [false, true] {
            for f in [false, true] {
                for z in [false, true] {
                    let d = RingPolicy::for_device(w, f, z).with_vectored();
                    assert!(d.sqe_ops().iter().all(|op| p.allows(*op)), "{d}");
                }
            }
        }
        assert_eq!(p.sqe_ops().len(), 6);
        assert_eq!(
            RingPolicy::for_process(false, true).sqe_ops(),
            &[SqeOp::ReadFixed]
        );
        assert_eq!(RingPolicy::for_process(true, false).sqe_ops().len(), 4);
        // Swapping guest RAM, and nothing else.
        let codes: Vec<u8> = p.register_ops().iter().map(|r| r.code()).collect();
        assert_eq!(codes, [0, 1]);
    }

    #[test]
    fn one_variant_per_opcode_set_a_negotiation_can_pick() {
        assert_eq!(
            RingPolicy::device_variants(false, true),
            [RingPolicy::for_device(false, true, true)]
        );
        let rw = RingPolicy::device_variants(true, false);
        assert_eq!(rw.len(), 3);
        for f in [false, true] {
            for z in [false, true] {
                let d = RingPolicy::for_device(true, f, z);
                assert!(rw.contains(&d), "{d}");
                assert!(RingPolicy::device_variants(true, true).contains(&d.with_vectored()));
            }
        }
    }
}
