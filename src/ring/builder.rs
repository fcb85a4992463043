//! The one place a ring is built and the one place its buffers change. A ring is created
//! `IORING_SETUP_R_DISABLED`, given its fixed files and completion eventfd, restricted
//! (`IORING_REGISTER_RESTRICTIONS`: its SQE opcodes, `IOSQE_FIXED_FILE` required, and of the
//! register opcodes only the two that swap fixed buffers), and only then enabled. After that
//! it can never gain an opcode, a file or an eventfd; what it can still be given is guest RAM
//! as fixed buffers ([`register_buffers`]), and the kernel checks every SQE against them.

use std::io;
use std::os::fd::RawFd;

use io_uring::IoUring;
use log::info;

use super::policy::RingPolicy;
use crate::error::RingError;
use crate::guest_map::FixedBufferMap;

/// Everything a ring is built from.
pub struct RingSetup<'a> {
    /// For the log: which ring this is (e.g. "queue 0").
    pub label: &'a str,
    /// Submission queue entries (rounded up to a power of two by the kernel).
    pub entries: u32,
    /// The fixed files, with a description of each for the log.
    pub files: &'a [(RawFd, String)],
    /// Signalled on completions.
    pub eventfd: Option<RawFd>,
    pub policy: &'a RingPolicy,
}

/// Build a restricted, enabled ring without fixed buffers.
pub fn build_ring(setup: &RingSetup<'_>) -> Result<IoUring, RingError> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(setup.entries)
        .map_err(crate::kernel::classify_setup_error)?;
    let submitter = ring.submitter();

    let fds: Vec<RawFd> = setup.files.iter().map(|(fd, _)| *fd).collect();
    submitter
        .register_files(&fds)
        .map_err(RingError::RegisterFiles)?;
    if let Some(efd) = setup.eventfd {
        submitter
            .register_eventfd(efd)
            .map_err(RingError::RegisterEventfd)?;
    }
    // EBUSY here would mean the ring inherited a task-level allowlist: startup refuses to run
    // under one it did not install (`ring::process`), and installs its own only after its
    // rings are made.
    submitter
        .register_restrictions(&mut setup.policy.restrictions())
        .map_err(RingError::Restrict)?;
    submitter
        .register_enable_rings()
        .map_err(RingError::Enable)?;

    let names: Vec<&str> = setup.files.iter().map(|(_, n)| n.as_str()).collect();
    info!(
        "{} ring enabled: fixed files [{}]; ring allowlist: {}",
        setup.label,
        names.join(", "),
        setup.policy
    );
    Ok(ring)
}

/// Register `buffers` as the ring's fixed buffers (it must have none).
///
/// # Safety
///
/// The kernel reads and writes the memory that `buffers` describes whenever an SQE names it,
/// until [`unregister_buffers`] or the ring's end. The caller must keep that memory mapped, and
/// treat it as shared with the kernel (never as memory Rust code owns exclusively), until then.
/// The daemon keeps the `GuestMemoryMmap` the buffers come from beside the ring
/// (`ring::RingSet`).
pub unsafe fn register_buffers(ring: &IoUring, buffers: &FixedBufferMap) -> Result<(), RingError> {
    let iovecs: Vec<libc::iovec> = buffers
        .buffers()
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.host as *mut libc::c_void,
            iov_len: b.len as usize,
        })
        .collect();
    if iovecs.is_empty() {
        return Ok(());
    }
    // SAFETY: every iovec describes memory that stays mapped, and shared with the kernel, until
    // the buffers are unregistered: this function's own contract.
    unsafe { ring.submitter().register_buffers(&iovecs) }
        .map_err(|e| classify_buffer_error(e, buffers.total_len()))
}

/// Drop the ring's fixed buffers (none registered: nothing to do). Call only when no SQE of
/// the ring is in flight: on Linux 6.1 the kernel would wait for them here.
pub fn unregister_buffers(ring: &IoUring) -> Result<(), RingError> {
    match ring.submitter().unregister_buffers() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(RingError::UnregisterBuffers(e)),
    }
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
