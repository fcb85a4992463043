//! What the running kernel enforces for ringfence, in one place: probed once, before any
//! thread, ring or sandbox exists, logged once, and read everywhere else.
//!
//! | wall | kernels | used for |
//! | --- | --- | --- |
//! | ring allowlists (`IORING_REGISTER_RESTRICTIONS` on an `R_DISABLED` ring) | all supported | every ring (all made at startup) |
//! | `READV_FIXED` / `WRITEV_FIXED` | 6.15+ | vectored requests on writable disks |
//! | task-level restrictions (`io_uring_register(-1, IORING_REGISTER_RESTRICTIONS)`) | 7.0+ | the whole process, once its rings are made: a ring created later (seccomp forbids it) would inherit the data-path allowlist |
//!
//! The probes use arguments no kernel accepts, so they change nothing; each answer is the
//! errno the kernel (7.2's `io_uring/register.c`) gives before it looks at the argument.

use std::fmt;
use std::io;
use std::sync::OnceLock;

use io_uring::IoUring;

use crate::error::RingError;

pub mod abi;

use abi::IORING_REGISTER_RESTRICTIONS;

/// Task-level io_uring restrictions (Linux 7.0+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskRestrictions {
    /// The kernel has none (before 7.0): `io_uring_register(-1, ...)` answers EBADF, or
    /// EINVAL for an unknown blind opcode (6.13+).
    Absent,
    /// The kernel has them and this task carries none: they can be installed.
    Available,
    /// This task already carries task-level restrictions that whoever started the process
    /// installed (the kernel answers EPERM): every ring it creates inherits them, and a ring
    /// that inherited restrictions can be given no allowlist of its own.
    Inherited,
    /// `io_uring_register` itself is refused (EPERM for any opcode: a seccomp or LSM policy).
    Blocked,
    /// The probe got an answer that none of the above explains (the errno, or 0 if the probe
    /// thread died): nothing is known, so the daemon does not start (see
    /// `ring::process::restrict_process_rings`). Never read as "absent".
    Unknown(i32),
}

/// What the running kernel offers the fence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// `uname -r`, e.g. "7.2.13+deb14-cloud-amd64".
    pub release: String,
    /// (major, minor) of the release, when it parses.
    pub version: Option<(u32, u32)>,
    /// READV_FIXED and WRITEV_FIXED (Linux 6.15+).
    pub vectored_fixed: bool,
    pub task_restrictions: TaskRestrictions,
}

impl Kernel {
    /// The running kernel, probed on first use.
    pub fn get() -> &'static Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        KERNEL.get_or_init(Kernel::probe)
    }

    /// Probe now, uncached (tests compare fresh probes with the cached one).
    pub fn probe() -> Kernel {
        let release = read_release();
        let version = parse_version(&release);
        // On a throwaway thread: should a future kernel ever accept a probe's argument, what it
        // installed would die with that thread.
        let task_restrictions = std::thread::spawn(probe_task_restrictions)
            .join()
            .unwrap_or(TaskRestrictions::Unknown(0));
        Kernel {
            release,
            version,
            vectored_fixed: probe_vectored_fixed(),
            task_restrictions,
        }
    }

    /// Whether this kernel is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        self.version.is_some_and(|v| v >= (major, minor))
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let task = match self.task_restrictions {
            TaskRestrictions::Absent => "absent (Linux 7.0+)",
            TaskRestrictions::Available => "available",
            TaskRestrictions::Inherited => "already set on this process by its parent",
            TaskRestrictions::Blocked => "unknown (io_uring_register is refused)",
            TaskRestrictions::Unknown(_) => "unknown (the probe got an unexpected answer)",
        };
        write!(
            f,
            "Linux {}: ring allowlists yes; READV/WRITEV_FIXED {}; task-level io_uring \
             restrictions {}",
            self.release,
            if self.vectored_fixed {
                "yes"
            } else {
                "no (Linux 6.15+)"
            },
            task,
        )
    }
}

/// Check that the kernel lets this process create and configure rings at all, so that a
/// refusal is reported at startup with its cause and its fix, not at the first VMM
/// connection.
pub fn check_io_uring() -> Result<(), RingError> {
    let ring = IoUring::new(2).map_err(classify_setup_error)?;
    let mut probe = io_uring::Probe::new();
    match ring.submitter().register_probe(&mut probe) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(RingError::Refused {
            hint: "io_uring_register is blocked (a seccomp profile or LSM policy): allow \
                   io_uring_setup, io_uring_enter and io_uring_register"
                .into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Classify an io_uring_setup failure: refusals get their cause and fix.
pub fn classify_setup_error(e: io::Error) -> RingError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) => RingError::Refused {
            hint: refusal_hint(),
            source: e,
        },
        _ => RingError::Setup(e),
    }
}

/// Why the kernel may refuse io_uring, and what to do about it.
fn refusal_hint() -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    match disabled.as_str() {
        "2" => "the sysctl kernel.io_uring_disabled=2 disables io_uring for everyone; run \
                `sysctl -w kernel.io_uring_disabled=0`"
            .into(),
        "1" => "the sysctl kernel.io_uring_disabled=1 allows io_uring only to root/CAP_SYS_ADMIN \
                and the group in kernel.io_uring_group; run as a member of that group or set \
                `sysctl -w kernel.io_uring_disabled=0`"
            .into(),
        _ => "a seccomp profile (e.g. Docker's or a container runtime's default) blocks \
              io_uring_setup; run with a profile that allows io_uring_setup, io_uring_enter and \
              io_uring_register (Docker: --security-opt seccomp=<profile>), or check that the \
              kernel has CONFIG_IO_URING"
            .into(),
    }
}

/// `io_uring_register(-1, op, arg, nr)`: the "blind" form, which acts on the calling task.
pub(crate) fn register_blind(op: u32, arg: *mut libc::c_void, nr: u32) -> io::Result<()> {
    // SAFETY: the caller passes either a null argument (the kernel then faults the copy and
    // returns EFAULT) or a pointer to memory it owns for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_io_uring_register, -1, op, arg, nr) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn errno(r: io::Result<()>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

/// Task-level restrictions, probed with a null argument (7.2: EPERM when the task already
/// carries restrictions, EACCES without no_new_privs and CAP_SYS_ADMIN, then EFAULT copying the
/// null header). Older kernels answer EBADF (no blind fd) or EINVAL (blind fd, unknown opcode).
/// An EPERM is only believed when an opcode no kernel knows is not refused with EPERM too:
/// a seccomp profile that denies io_uring_register says EPERM to everything.
pub fn probe_task_restrictions() -> TaskRestrictions {
    classify_task_probe(
        errno(register_blind(
            IORING_REGISTER_RESTRICTIONS,
            std::ptr::null_mut(),
            1,
        )),
        // Opcode 0x7fff_ffff: past every kernel's last opcode (EINVAL), or EBADF for the fd
        // on kernels without blind opcodes. Never EPERM from the kernel itself. Asked only
        // when the first answer is EPERM.
        || errno(register_blind(0x7fff_ffff, std::ptr::null_mut(), 0)),
    )
}

/// What the task-restriction probe's errno means (0: the call succeeded, which it cannot with
/// a null argument). Only the answers of a kernel without the feature read as
/// [`TaskRestrictions::Absent`]: EBADF (no blind fd -1, before 6.13) and EINVAL (a blind fd,
/// an opcode it does not know). Anything else (ENOMEM, EINTR, a success, an errno some
/// policy invented...) is [`TaskRestrictions::Unknown`]: the daemon then refuses to start
/// rather than drop a wall the kernel may have. `unknown_opcode_errno` is the answer to an
/// opcode no kernel knows, asked only to tell a refused `io_uring_register` from inherited
/// restrictions.
pub fn classify_task_probe(
    errno: i32,
    unknown_opcode_errno: impl FnOnce() -> i32,
) -> TaskRestrictions {
    match errno {
        libc::EFAULT | libc::EACCES => TaskRestrictions::Available,
        libc::EPERM => {
            if unknown_opcode_errno() == libc::EPERM {
                TaskRestrictions::Blocked
            } else {
                TaskRestrictions::Inherited
            }
        }
        libc::EBADF | libc::EINVAL => TaskRestrictions::Absent,
        other => TaskRestrictions::Unknown(other),
    }
}

/// READV_FIXED and WRITEV_FIXED, from the kernel's opcode probe on a throwaway ring.
fn probe_vectored_fixed() -> bool {
    let Ok(ring) = IoUring::new(2) else {
        return false;
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).is_ok()
        && probe.is_supported(io_uring::opcode::ReadvFixed::CODE)
        && probe.is_supported(io_uring::opcode::WritevFixed::CODE)
}

/// uname(2)'s release: no /proc needed.
fn read_release() -> String {
    // SAFETY: an all-zero utsname is a valid value of this plain C struct; uname fills it in.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into `u`, which we own.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "(unknown release)".into();
    }
    // SAFETY: uname NUL-terminates `release` within the array.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(['.', '-', '+']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// These tests state, per kernel, what the probes must find: the kernel matrix
/// (`guest-tests/qemu/kernel-matrix.sh`) runs them on 6.1, 6.12 and 7.x, and a probe that
/// reports a wall missing on a kernel that has it fails there.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("6.1.0-57-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_version("7.2.13+deb14-cloud-amd64"), Some((7, 2)));
        assert_eq!(parse_version("6.18.44-fc-v857"), Some((6, 18)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn probes_match_the_kernel_version() {
        let k = Kernel::probe();
        assert!(k.version.is_some(), "cannot parse {}", k.release);
        assert_eq!(
            k.vectored_fixed,
            k.at_least(6, 15),
            "READV/WRITEV_FIXED on {}",
            k.release
        );
        if k.at_least(7, 0) {
            assert_eq!(k.task_restrictions, TaskRestrictions::Available, "{k}");
        } else {
            assert_eq!(k.task_restrictions, TaskRestrictions::Absent, "{k}");
        }
        assert_eq!(&k, Kernel::get(), "the cached probe is the same");
    }

    /// Issue 21, item 7: only the answers of a kernel without task restrictions read as
    /// absent; an unexpected errno is unknown, never absent (the daemon then refuses to start).
    #[test]
    fn only_not_supported_errnos_read_as_absent() {
        let never = || -> i32 { panic!("asked only after EPERM") };
        assert_eq!(
            classify_task_probe(libc::EBADF, never),
            TaskRestrictions::Absent
        );
        assert_eq!(
            classify_task_probe(libc::EINVAL, never),
            TaskRestrictions::Absent
        );
        assert_eq!(
            classify_task_probe(libc::EFAULT, never),
            TaskRestrictions::Available
        );
        assert_eq!(
            classify_task_probe(libc::EACCES, never),
            TaskRestrictions::Available
        );
        assert_eq!(
            classify_task_probe(libc::EPERM, || libc::EINVAL),
            TaskRestrictions::Inherited
        );
        assert_eq!(
            classify_task_probe(libc::EPERM, || libc::EBADF),
            TaskRestrictions::Inherited
        );
        assert_eq!(
            classify_task_probe(libc::EPERM, || libc::EPERM),
            TaskRestrictions::Blocked
        );
        for e in [
            libc::ENOMEM,
            libc::EINTR,
            libc::ENOSYS,
            libc::EOPNOTSUPP,
            libc::EBUSY,
            libc::E2BIG,
            0,
        ] {
            assert_eq!(
                classify_task_probe(e, never),
                TaskRestrictions::Unknown(e),
                "errno {e}"
            );
        }
    }

    /// A seccomp profile that refuses io_uring_register must not be read as "this task
    /// already carries restrictions".
    #[test]
    fn a_seccomp_refusal_is_not_read_as_inherited_restrictions() {
        let got = std::thread::spawn(|| {
            let rules = [(libc::SYS_io_uring_register, vec![])].into();
            let filter = seccompiler::SeccompFilter::new(
                rules,
                seccompiler::SeccompAction::Allow,
                seccompiler::SeccompAction::Errno(libc::EPERM as u32),
                crate::sandbox::seccomp::ARCH,
            )
            .expect("filter");
            let prog: seccompiler::BpfProgram = filter.try_into().expect("compile");
            seccompiler::apply_filter(&prog).expect("apply");
            probe_task_restrictions()
        })
        .join()
        .expect("probe thread");
        assert_eq!(got, TaskRestrictions::Blocked);
    }
}
