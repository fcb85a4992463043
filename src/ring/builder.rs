//! The one place a ring is built: created `IORING_SETUP_R_DISABLED`, given its fixed files,
//! fixed buffers and completion eventfd, restricted, and only then enabled. After this
//! function returns, the ring can never gain an opcode, a file or a buffer.

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
    pub buffers: &'a FixedBufferMap,
    /// Signalled on completions.
    pub eventfd: Option<RawFd>,
    pub policy: &'a RingPolicy,
}

/// Build a restricted, enabled ring.
pub fn build_ring(setup: &RingSetup<'_>) -> Result<IoUring, RingError> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(setup.entries)
        .map_err(classify_setup_error)?;
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
        // SAFETY: every iovec describes a guest RAM mapping that stays mapped at least as long
        // as this ring: the caller keeps the `GuestMemoryMmap` it came from alive alongside the
        // ring (see `worker::Engine`). The kernel pins the pages; it never frees them.
        unsafe { submitter.register_buffers(&iovecs) }
            .map_err(|e| classify_buffer_error(e, setup.buffers.total_len()))?;
    }

    if let Some(efd) = setup.eventfd {
        submitter
            .register_eventfd(efd)
            .map_err(RingError::RegisterEventfd)?;
    }

    submitter
        .register_restrictions(&mut setup.policy.restrictions())
        .map_err(RingError::Restrict)?;
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
        setup.policy
    );
    Ok(ring)
}

/// Check that the kernel lets this process create rings at all, so that a refusal is reported
/// at startup with its cause, not at the first VMM connection.
pub fn probe_io_uring() -> Result<(), RingError> {
    IoUring::new(2).map(drop).map_err(classify_setup_error)
}

/// The running kernel's (major, minor) release.
/// Read once, before the sandbox forbids opening files.
pub fn kernel_release() -> Option<(u32, u32)> {
    static RELEASE: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *RELEASE.get_or_init(|| {
        let s = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let mut it = s.trim().split(['.', '-']);
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some((major, minor))
    })
}

fn classify_setup_error(e: io::Error) -> RingError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) => RingError::Refused {
            hint: refusal_hint(),
            source: e,
        },
        _ => RingError::Setup(e),
    }
}

/// Why the kernel may refuse io_uring, and what to do about it.
pub fn refusal_hint() -> String {
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
