//! The one place a ring is built: created `IORING_SETUP_R_DISABLED`, given its fixed files,
//! fixed buffers and completion eventfd, restricted, and only then enabled. After this
//! function returns, the ring can never gain an opcode, a file or a buffer.
//!
//! "Restricted" means one of two things, and the kernel says which:
//! - the ring's own allowlist (`IORING_REGISTER_RESTRICTIONS`), on every supported kernel;
//! - on Linux 7.0+ in a process that installed its task-level allowlist (`task.rs`), the ring
//!   already carries that allowlist from its creation and the kernel refuses a second one
//!   (EBUSY). The builder then narrows it to this ring's opcodes with io_uring BPF filters:
//!   one "allow" filter per opcode, the last registered with `DENY_REST`, so every other
//!   opcode is refused with -EACCES.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::IoUring;
use log::info;

use super::policy::{RingPolicy, SqeOp};
use crate::error::RingError;
use crate::guest_map::FixedBufferMap;
use crate::kernel::abi::{
    IoUringBpf, IORING_REGISTER_BPF_FILTER, IO_URING_BPF_CMD_FILTER, IO_URING_BPF_FILTER_DENY_REST,
};

/// Everything a ring is built from.
pub struct RingSetup<'a> {
    /// For the log: which ring this is (e.g. "queue 0").
    pub label: &'a str,
    /// Submission queue entries (rounded up to a power of two by the kernel).
    pub entries: u32,
    /// The fixed files, with a description of each for the log.
    pub files: &'a [(RawFd, String)],
    pub buffers: &'a FixedBufferMap,
    /// Signalled on completions.
    pub eventfd: Option<RawFd>,
    pub policy: &'a RingPolicy,
}

/// Build a restricted, enabled ring.
///
/// # Safety
///
/// The kernel reads and writes the memory that `setup.buffers` describes for as long as the
/// returned ring lives, whenever an SQE names it. The caller must keep that memory mapped, and
/// treat it as shared with the kernel (never as memory Rust code owns exclusively), until the
/// ring is dropped. The daemon does so by keeping the `GuestMemoryMmap` the buffers come from
/// alongside the ring (`worker::Engine`).
pub unsafe fn build_ring(setup: &RingSetup<'_>) -> Result<IoUring, RingError> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(setup.entries)
        .map_err(crate::kernel::classify_setup_error)?;
    let submitter = ring.submitter();

    let fds: Vec<RawFd> = setup.files.iter().map(|(fd, _)| *fd).collect();
    submitter
        .register_files(&fds)
        .map_err(RingError::RegisterFiles)?;

    let iovecs: Vec<libc::iovec> = setup
        .buffers
        .buffers()
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.host as *mut libc::c_void,
            iov_len: b.len as usize,
        })
        .collect();
    if !iovecs.is_empty() {
        // SAFETY: every iovec describes memory that stays mapped, and shared with the kernel,
        // at least as long as this ring: this function's own contract.
        unsafe { submitter.register_buffers(&iovecs) }
            .map_err(|e| classify_buffer_error(e, setup.buffers.total_len()))?;
    }

    if let Some(efd) = setup.eventfd {
        submitter
            .register_eventfd(efd)
            .map_err(RingError::RegisterEventfd)?;
    }

    let allowlist = match submitter.register_restrictions(&mut setup.policy.restrictions()) {
        Ok(()) => format!("ring allowlist: {}", setup.policy),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            narrow_with_bpf_filters(ring.as_raw_fd(), setup.policy.sqe_ops())
                .map_err(RingError::Narrow)?;
            format!(
                "process allowlist (inherited), narrowed by BPF filters to SQE opcodes [{}]",
                setup.policy.sqe_op_names()
            )
        }
        Err(e) => return Err(RingError::Restrict(e)),
    };
    submitter
        .register_enable_rings()
        .map_err(RingError::Enable)?;

    let names: Vec<&str> = setup.files.iter().map(|(_, n)| n.as_str()).collect();
    info!(
        "{} ring enabled: fixed files [{}]; {} fixed buffers, {} MiB of guest RAM; {}",
        setup.label,
        names.join(", "),
        setup.buffers.buffers().len(),
        setup.buffers.total_len() >> 20,
        allowlist
    );
    Ok(ring)
}

/// Attach an "allow" filter to each of `ops` on the ring, the last one with `DENY_REST`: the
/// kernel then refuses every other opcode with -EACCES. Filters can only refuse more, so the
/// ring's inherited allowlist still applies on top.
fn narrow_with_bpf_filters(ring_fd: RawFd, ops: &[SqeOp]) -> io::Result<()> {
    // One classic BPF instruction: return 1 (allow).
    let allow = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    for (i, op) in ops.iter().enumerate() {
        let mut reg = IoUringBpf {
            cmd_type: IO_URING_BPF_CMD_FILTER,
            cmd_flags: 0,
            resv: 0,
            opcode: u32::from(op.code()),
            flags: if i + 1 == ops.len() {
                IO_URING_BPF_FILTER_DENY_REST
            } else {
                0
            },
            filter_len: allow.len() as u32,
            pdu_size: 0,
            filter_resv: [0; 3],
            filter_ptr: allow.as_ptr() as u64,
            resv2: [0; 5],
        };
        // SAFETY: `reg` and the program it points to live across the call; the kernel reads
        // both and writes back only `reg`'s pdu_size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring_fd,
                IORING_REGISTER_BPF_FILTER,
                &mut reg as *mut IoUringBpf,
                1,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn classify_buffer_error(e: io::Error, bytes: u64) -> RingError {
    match e.raw_os_error() {
        Some(libc::EFAULT) | Some(libc::EOPNOTSUPP) => RingError::Unpinnable { source: e },
        Some(libc::ENOMEM) => RingError::Memlock {
            bytes,
            limit: memlock_limit(),
            source: e,
        },
        _ => RingError::RegisterBuffers(e),
    }
}

fn memlock_limit() -> String {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) };
    if rc != 0 {
        return "unknown".into();
    }
    if rl.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} bytes", rl.rlim_cur)
    }
}

/// These tests run against the real kernel: they build rings with the same builder and
/// policy the daemon uses, and submit what an attacker would.
#[cfg(test)]
pub(crate) mod tests;
