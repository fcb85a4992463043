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

/// Whether the kernel has READV_FIXED and WRITEV_FIXED (Linux 6.15+). Probed once, on a
/// throwaway ring.
pub fn vectored_fixed_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Ok(ring) = IoUring::new(2) else {
            return false;
        };
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(io_uring::opcode::ReadvFixed::CODE)
            && probe.is_supported(io_uring::opcode::WritevFixed::CODE)
    })
}

const IORING_REGISTER_RESTRICTIONS: libc::c_long = 11;
const IORING_REGISTER_BPF_FILTER: libc::c_long = 37;

/// Whether the kernel has task-level io_uring restrictions and io_uring BPF filters
/// (Linux 7.0+): `io_uring_register` with the "blind" fd -1 applies them to the calling task.
/// Older kernels answer EBADF, or EINVAL once they know the blind fd for other opcodes
/// (6.13+); a kernel that has the opcode reads the (null) argument and answers EFAULT, or
/// EACCES for BPF filters without privileges. Probed once, on a throwaway thread, with arguments no kernel
/// accepts, so that the probe itself can never restrict a thread that builds rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskRestrictionSupport {
    pub restrictions: bool,
    pub bpf_filter: bool,
}

pub fn task_restriction_support() -> TaskRestrictionSupport {
    static SUPPORT: std::sync::OnceLock<TaskRestrictionSupport> = std::sync::OnceLock::new();
    *SUPPORT.get_or_init(|| {
        let probe = |op: libc::c_long| {
            // SAFETY: io_uring_register on the blind fd with a null argument array: the kernel
            // only validates it; nothing is read or written.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    -1,
                    op,
                    std::ptr::null::<u8>(),
                    1,
                )
            };
            let errno = io::Error::last_os_error().raw_os_error();
            rc == 0 || !matches!(errno, Some(libc::EBADF) | Some(libc::EINVAL))
        };
        std::thread::spawn(move || TaskRestrictionSupport {
            restrictions: probe(IORING_REGISTER_RESTRICTIONS),
            bpf_filter: probe(IORING_REGISTER_BPF_FILTER),
        })
        .join()
        .unwrap_or(TaskRestrictionSupport {
            restrictions: false,
            bpf_filter: false,
        })
    })
}

/// Apply `policy` as task-level io_uring restrictions to the calling thread (Linux 7.0+):
/// every ring it could ever create inherits them. Used on worker threads, which never create
/// rings, as a second wall beside the seccomp filter that denies them `io_uring_setup`.
pub fn restrict_current_task(policy: &RingPolicy) -> io::Result<()> {
    let mut res = policy.restrictions();
    // SAFETY: `res` is an array of `io_uring_restriction` (Restriction is repr(transparent)),
    // valid for the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            -1,
            IORING_REGISTER_RESTRICTIONS,
            res.as_mut_ptr(),
            res.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

/// These tests run against the real kernel: they build rings with the same builder and
/// policy the daemon uses, and submit what an attacker would.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::policy::RingPolicy;
    use io_uring::{opcode, types};
    use std::io::Write;
    use std::os::fd::AsRawFd;

    const IMAGE_LEN: usize = 64 << 10;

    struct Fixture {
        ring: IoUring,
        _image: tempfile::NamedTempFile,
        image_fd: i32,
        buf: Vec<u8>,
        map: FixedBufferMap,
    }

    fn fixture(policy: &RingPolicy) -> Fixture {
        let mut image = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 253) as u8).collect();
        image.write_all(&data).unwrap();
        image.flush().unwrap();
        let image_fd = image.as_file().as_raw_fd();
        // One fixed buffer over the first half of a heap allocation; the second half is
        // ordinary, unregistered memory.
        let buf = vec![0u8; 2 * IMAGE_LEN];
        let map = FixedBufferMap::from_regions(
            [(0, IMAGE_LEN as u64, buf.as_ptr() as u64)],
            crate::guest_map::MAX_FIXED_BUFFER,
        )
        .unwrap();
        let files = [(image_fd, "test image".to_string())];
        let ring = build_ring(&RingSetup {
            label: "test",
            entries: 8,
            files: &files,
            buffers: &map,
            eventfd: None,
            policy,
        })
        .expect("build a restricted ring (is io_uring enabled?)");
        Fixture {
            ring,
            _image: image,
            image_fd,
            buf,
            map,
        }
    }

    /// Submit one SQE and return its result.
    fn run(ring: &mut IoUring, e: io_uring::squeue::Entry) -> i32 {
        // SAFETY: every SQE in these tests points at memory that outlives the wait below.
        unsafe { ring.submission().push(&e.user_data(7)).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().expect("a completion");
        assert_eq!(cqe.user_data(), 7);
        cqe.result()
    }

    fn read_fixed(f: &Fixture, len: u32) -> io_uring::squeue::Entry {
        opcode::ReadFixed::new(types::Fixed(0), f.map.buffers()[0].host as *mut u8, len, 0)
            .offset(512)
            .build()
    }

    #[test]
    fn allowed_read_fixed_works() {
        let mut f = fixture(&RingPolicy::for_device(false, false, false));
        let e = read_fixed(&f, 4096);
        assert_eq!(run(&mut f.ring, e), 4096);
        assert!(f.buf[..4096]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((i + 512) % 253) as u8));
    }

    #[test]
    fn opcodes_outside_the_allowlist_complete_with_eacces() {
        let mut f = fixture(&RingPolicy::for_device(true, true, true));
        let buf = f.buf.as_mut_ptr();
        let path = c"/etc/hostname";
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 1u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let cases: Vec<(&str, io_uring::squeue::Entry)> = vec![
            ("READ", opcode::Read::new(types::Fixed(0), buf, 512).build()),
            (
                "WRITE",
                opcode::Write::new(types::Fixed(0), buf, 512).build(),
            ),
            (
                "READV",
                opcode::Readv::new(types::Fixed(0), std::ptr::null(), 0).build(),
            ),
            (
                "OPENAT",
                opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build(),
            ),
            (
                "CONNECT",
                opcode::Connect::new(
                    types::Fixed(0),
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of_val(&addr) as u32,
                )
                .build(),
            ),
            (
                "SOCKET",
                opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build(),
            ),
            ("NOP", opcode::Nop::new().build()),
        ];
        for (name, e) in cases {
            assert_eq!(run(&mut f.ring, e), -libc::EACCES, "{name} must be refused");
        }
        // The ring keeps working after refusals.
        let e = read_fixed(&f, 512);
        assert_eq!(run(&mut f.ring, e), 512);
    }

    #[test]
    fn sqe_without_fixed_file_completes_with_eacces() {
        let mut f = fixture(&RingPolicy::for_device(true, true, true));
        let host = f.map.buffers()[0].host as *mut u8;
        let e = opcode::ReadFixed::new(types::Fd(f.image_fd), host, 512, 0).build();
        assert_eq!(run(&mut f.ring, e), -libc::EACCES);
        // Extra flags are refused too, even with FIXED_FILE.
        let e = read_fixed(&f, 512).flags(io_uring::squeue::Flags::IO_LINK);
        assert_eq!(run(&mut f.ring, e), -libc::EACCES);
    }

    #[test]
    fn write_fixed_on_a_read_only_ring_completes_with_eacces() {
        let mut f = fixture(&RingPolicy::for_device(false, true, true));
        let host = f.map.buffers()[0].host as *const u8;
        let e = opcode::WriteFixed::new(types::Fixed(0), host, 512, 0).build();
        assert_eq!(run(&mut f.ring, e), -libc::EACCES);
        let e = opcode::Fsync::new(types::Fixed(0)).build();
        assert_eq!(run(&mut f.ring, e), -libc::EACCES);
        let e = opcode::Fallocate::new(types::Fixed(0), 512).build();
        assert_eq!(run(&mut f.ring, e), -libc::EACCES);
    }

    #[test]
    fn read_fixed_outside_the_registered_buffers_fails_with_efault() {
        let mut f = fixture(&RingPolicy::for_device(false, false, false));
        // Unregistered memory just past the buffer, and a range straddling its end.
        // SAFETY: in bounds of `buf` (2 * IMAGE_LEN bytes).
        let past = unsafe { f.buf.as_mut_ptr().add(IMAGE_LEN) };
        let e = opcode::ReadFixed::new(types::Fixed(0), past, 512, 0).build();
        assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
        // SAFETY: in bounds of `buf`.
        let straddle = unsafe { f.buf.as_mut_ptr().add(IMAGE_LEN - 256) };
        let e = opcode::ReadFixed::new(types::Fixed(0), straddle, 512, 0).build();
        assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
        // A buffer index that does not exist, and a file index that does not exist.
        let host = f.map.buffers()[0].host as *mut u8;
        let e = opcode::ReadFixed::new(types::Fixed(0), host, 512, 1).build();
        assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
        let e = opcode::ReadFixed::new(types::Fixed(1), host, 512, 0).build();
        assert_eq!(run(&mut f.ring, e), -libc::EBADF);
    }

    #[test]
    fn vectored_fixed_reads_stay_inside_their_buffer() {
        if !vectored_fixed_supported() {
            eprintln!("kernel without READV_FIXED: nothing to test");
            return;
        }
        let mut f = fixture(&RingPolicy::for_device(true, false, false).with_vectored());
        let base = f.map.buffers()[0].host;
        let iov = [
            libc::iovec {
                iov_base: (base + 4096) as *mut libc::c_void,
                iov_len: 512,
            },
            libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: 1024,
            },
        ];
        let e = opcode::ReadvFixed::new(types::Fixed(0), iov.as_ptr(), 2, 0)
            .offset(0)
            .build();
        assert_eq!(run(&mut f.ring, e), 1536);
        assert!(f.buf[4096..4608]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 253) as u8));
        assert!(f.buf[..1024]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((i + 512) % 253) as u8));
        // One iovec past the registered buffer: the kernel refuses the whole request.
        let bad = [
            libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: 512,
            },
            libc::iovec {
                iov_base: (base + IMAGE_LEN as u64) as *mut libc::c_void,
                iov_len: 512,
            },
        ];
        let e = opcode::ReadvFixed::new(types::Fixed(0), bad.as_ptr(), 2, 0).build();
        assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
        // Without the vectored opcodes in the policy they are refused.
        let mut g = fixture(&RingPolicy::for_device(false, false, false));
        let e = opcode::ReadvFixed::new(types::Fixed(0), iov.as_ptr(), 2, 0).build();
        assert_eq!(run(&mut g.ring, e), -libc::EACCES);
    }

    #[test]
    fn register_opcodes_are_refused_after_enabling() {
        let f = fixture(&RingPolicy::for_device(true, true, true));
        let s = f.ring.submitter();
        let extra = vec![0u8; 4096];
        let iov = [libc::iovec {
            iov_base: extra.as_ptr() as *mut libc::c_void,
            iov_len: extra.len(),
        }];
        let refused = |r: std::io::Result<()>, what: &str| {
            let e = r.expect_err(what);
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{what}: {e}");
        };
        refused(s.unregister_buffers(), "UNREGISTER_BUFFERS");
        // SAFETY: `extra` outlives the (refused) registration.
        refused(unsafe { s.register_buffers(&iov) }, "REGISTER_BUFFERS");
        refused(s.unregister_files(), "UNREGISTER_FILES");
        refused(s.register_files(&[0]), "REGISTER_FILES");
        refused(
            s.register_files_update(0, &[0]).map(drop),
            "REGISTER_FILES_UPDATE",
        );
        refused(s.register_eventfd(0), "REGISTER_EVENTFD");
        refused(s.register_personality().map(drop), "REGISTER_PERSONALITY");
        refused(s.register_enable_rings(), "ENABLE_RINGS");
        refused(
            s.register_restrictions(&mut RingPolicy::for_device(true, true, true).restrictions()),
            "REGISTER_RESTRICTIONS",
        );
        // The one allowed register opcode (PROBE) either works or, on kernels that refuse every
        // register opcode once restricted (6.18 measured), is refused: never anything else.
        let mut probe = io_uring::Probe::new();
        if let Err(e) = s.register_probe(&mut probe) {
            assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        }
    }

    #[test]
    fn task_level_restriction_detection_matches_the_kernel() {
        let support = task_restriction_support();
        match kernel_release() {
            // Task-level restrictions and BPF filters arrived in Linux 7.0.
            Some((major, _)) if major < 7 => {
                assert!(!support.restrictions && !support.bpf_filter, "{support:?}")
            }
            _ => {}
        }
        if !support.restrictions {
            // And applying them says so with the kernel's own answer.
            let e = std::thread::spawn(|| {
                restrict_current_task(&RingPolicy::for_device(false, false, false))
            })
            .join()
            .unwrap()
            .expect_err("no task-level restrictions on this kernel");
            assert!(
                matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::EINVAL)),
                "{e}"
            );
        }
    }

    #[test]
    fn restrictions_cannot_be_installed_on_an_enabled_or_plain_ring() {
        let plain = IoUring::new(4).unwrap();
        let mut r = RingPolicy::for_device(false, false, false).restrictions();
        assert!(plain.submitter().register_restrictions(&mut r).is_err());
    }
}
