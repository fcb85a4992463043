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

/// `io_uring_register` opcodes a ring may use: after it is enabled (per-ring allowlists), or
/// at all (a ring that inherited the process allowlist, whose register opcodes the kernel
/// checks even while the ring is disabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RegisterOp {
    /// IORING_REGISTER_BUFFERS, IORING_REGISTER_FILES, IORING_REGISTER_EVENTFD: what the
    /// builder registers. Each can succeed once per ring: again, the kernel answers EBUSY.
    Buffers,
    Files,
    Eventfd,
    /// IORING_REGISTER_PROBE: reads which opcodes the kernel supports; changes nothing.
    /// Listed so that the set always holds a REGISTER_OP entry: kernels from 7.0 restrict
    /// register opcodes only when it does.
    Probe,
    /// IORING_REGISTER_ENABLE_RINGS: only a disabled ring can be enabled (else EBADFD).
    EnableRings,
    /// IORING_REGISTER_RESTRICTIONS: on an inherited ring the kernel answers EBUSY, which is
    /// how the builder learns that the ring already carries the process allowlist.
    Restrictions,
    /// IORING_REGISTER_BPF_FILTER: filters can only refuse more, never allow more.
    BpfFilter,
}

impl RegisterOp {
    pub fn code(self) -> u8 {
        match self {
            RegisterOp::Buffers => 0,
            RegisterOp::Files => 2,
            RegisterOp::Eventfd => 4,
            RegisterOp::Probe => 8,
            RegisterOp::EnableRings => 12,
            RegisterOp::Restrictions => 11,
            RegisterOp::BpfFilter => 37,
        }
    }

    fn name(self) -> &'static str {
        match self {
            RegisterOp::Buffers => "BUFFERS",
            RegisterOp::Files => "FILES",
            RegisterOp::Eventfd => "EVENTFD",
            RegisterOp::Probe => "PROBE",
            RegisterOp::EnableRings => "ENABLE_RINGS",
            RegisterOp::Restrictions => "RESTRICTIONS",
            RegisterOp::BpfFilter => "BPF_FILTER",
        }
    }
}

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
            register_ops: vec![RegisterOp::Probe],
        }
    }

    /// The task-level allowlist the daemon installs on itself (Linux 7.0+), which every ring
    /// it creates inherits: the broadest device policy it can serve, and the register opcodes
    /// the ring builder needs. Each ring is then narrowed to its own device policy.
    pub fn for_process(writable: bool, vectored: bool) -> Self {
        let device = RingPolicy::for_device(writable, true, true);
        let mut p = if vectored {
            device.with_vectored()
        } else {
            device
        };
        p.register_ops = vec![
            RegisterOp::Buffers,
            RegisterOp::Files,
            RegisterOp::Eventfd,
            RegisterOp::Probe,
            RegisterOp::EnableRings,
            RegisterOp::Restrictions,
            RegisterOp::BpfFilter,
        ];
        p
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
        // 1 opcode + allowed flags + required flags + 1 register op.
        assert_eq!(p.restrictions().len(), 4);
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
        // What the builder registers, and nothing that could undo a registration.
        let codes: Vec<u8> = p.register_ops().iter().map(|r| r.code()).collect();
        assert_eq!(codes, [0, 2, 4, 8, 12, 11, 37]);
    }
}
