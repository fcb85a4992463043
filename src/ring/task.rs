//! Task-level io_uring restrictions (Linux 7.0+): an allowlist set on a task, copied into every
//! ring that task creates afterwards and into every thread it spawns afterwards.
//!
//! Per-ring restrictions do nothing against a thread that creates a fresh ring. Installed on
//! the main thread before it spawns any other, the process allowlist closes that gap for every
//! thread, the control thread included: whatever ring any of them creates can do fixed-buffer
//! I/O on registered files and nothing else (no OPENAT, SOCKET, CONNECT...), with
//! `IOSQE_FIXED_FILE` required. A ring that inherited restrictions can be given no allowlist of
//! its own (the kernel answers EBUSY), so the builder narrows it to its device's opcodes with
//! io_uring BPF filters instead (`builder.rs`).

use std::io;

use super::policy::RingPolicy;
use crate::kernel::abi::{TaskRestrictionHeader, IORING_REGISTER_RESTRICTIONS};
use crate::kernel::register_blind;

/// A task-level allowlist, laid out for the kernel ahead of time so that installing it only
/// makes two system calls (and so can run where allocation cannot, e.g. between fork and exec).
pub struct TaskAllowlist {
    /// `struct io_uring_task_restriction` followed by its entries, in u64 words for alignment.
    buf: Vec<u64>,
}

impl TaskAllowlist {
    pub fn new(policy: &RingPolicy) -> io::Result<Self> {
        let entries = policy.restrictions();
        let nr_res = u16::try_from(entries.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many restrictions"))?;
        let header = TaskRestrictionHeader {
            flags: 0,
            nr_res,
            resv: [0; 3],
        };
        let head_len = std::mem::size_of::<TaskRestrictionHeader>();
        let entry_len = std::mem::size_of_val(entries.as_slice());
        let mut buf = vec![0u64; (head_len + entry_len).div_ceil(8)];
        let base = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` holds head_len + entry_len bytes; both sources are plain C structures
        // (`Restriction` is a transparent `io_uring_restriction`) that do not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&header as *const TaskRestrictionHeader).cast::<u8>(),
                base,
                head_len,
            );
            std::ptr::copy_nonoverlapping(
                entries.as_ptr().cast::<u8>(),
                base.add(head_len),
                entry_len,
            );
        }
        Ok(TaskAllowlist { buf })
    }

    /// Install it as the calling thread's task-level io_uring restrictions. The kernel requires
    /// no_new_privs or CAP_SYS_ADMIN: no_new_privs is set first (ringfence never execs). A
    /// task's restrictions are permanent and can be set once; threads and rings the task
    /// creates afterwards inherit them.
    pub fn install(&self) -> io::Result<()> {
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes plain integers and affects only this task.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The kernel only reads the buffer.
        register_blind(
            IORING_REGISTER_RESTRICTIONS,
            self.buf.as_ptr() as *mut libc::c_void,
            1,
        )
    }
}

/// Install `policy` as the calling thread's task-level io_uring restrictions.
pub fn restrict_current_task(policy: &RingPolicy) -> io::Result<()> {
    TaskAllowlist::new(policy)?.install()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{Kernel, TaskRestrictions};
    use crate::ring::builder::tests::{assert_every_register_opcode_refused, fixture, run};
    use io_uring::{opcode, squeue::Flags, types, IoUring};

    #[test]
    fn header_layout_matches_the_kernel() {
        // include/uapi/linux/io_uring.h: __u16 flags, __u16 nr_res, __u32 resv[3], entries.
        assert_eq!(std::mem::size_of::<TaskRestrictionHeader>(), 16);
        assert_eq!(
            std::mem::size_of::<io_uring::register::Restriction>(),
            16,
            "struct io_uring_restriction"
        );
    }

    /// The allowlist the daemon installs on itself (writable disk, every feature).
    fn process_policy() -> RingPolicy {
        RingPolicy::for_process(true, Kernel::get().vectored_fixed)
    }

    /// What a fresh, plain ring (no R_DISABLED, no files) created by this task can do.
    fn attempts_on_a_fresh_ring() -> Vec<(&'static str, i32)> {
        let mut ring = IoUring::new(8).expect("a restricted task can still create rings");
        let path = c"/tmp";
        let fixed = Flags::FIXED_FILE;
        let mut buf = [0u8; 16];
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 9u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let openat = || {
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
                .flags(libc::O_RDONLY | libc::O_DIRECTORY)
        };
        vec![
            ("OPENAT", run(&mut ring, openat().build())),
            (
                "OPENAT+FIXED_FILE",
                run(&mut ring, openat().build().flags(fixed)),
            ),
            (
                "SOCKET",
                run(
                    &mut ring,
                    opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build(),
                ),
            ),
            (
                "SOCKET+FIXED_FILE",
                run(
                    &mut ring,
                    opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0)
                        .build()
                        .flags(fixed),
                ),
            ),
            (
                "CONNECT+FIXED_FILE",
                run(
                    &mut ring,
                    opcode::Connect::new(
                        types::Fixed(0),
                        (&addr as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                    .build()
                    .flags(fixed),
                ),
            ),
            (
                "READ",
                run(
                    &mut ring,
                    opcode::Read::new(types::Fd(0), buf.as_mut_ptr(), 16).build(),
                ),
            ),
            (
                "NOP+FIXED_FILE",
                run(&mut ring, opcode::Nop::new().build().flags(fixed)),
            ),
        ]
    }

    /// On 7.0+, a thread restricted with the daemon's process allowlist, and a thread it
    /// spawns afterwards, cannot make a fresh ring open files, create sockets or connect: the
    /// kernel refuses each SQE with -EACCES. Before 7.0 the kernel must refuse to install them
    /// at all (and the daemon relies on seccomp instead); a 7.x kernel that refuses fails here.
    #[test]
    fn a_restricted_task_cannot_open_or_connect_through_a_fresh_ring() {
        let k = Kernel::get();
        let result = std::thread::spawn(|| {
            restrict_current_task(&process_policy())?;
            let own = attempts_on_a_fresh_ring();
            let child = std::thread::spawn(attempts_on_a_fresh_ring)
                .join()
                .expect("child thread");
            Ok::<_, io::Error>((own, child))
        })
        .join()
        .expect("restricted thread");
        if !k.at_least(7, 0) {
            let e = result.expect_err("task-level restrictions before Linux 7.0");
            assert!(
                matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::EINVAL)),
                "{}: {e}",
                k.release
            );
            return;
        }
        let (own, child) = result.unwrap_or_else(|e| panic!("{}: {e}", k.release));
        for (who, attempts) in [("restricted thread", own), ("its child thread", child)] {
            for (what, res) in attempts {
                assert_eq!(res, -libc::EACCES, "{who}: {what} on {}", k.release);
            }
        }
    }

    /// On 7.0+, the daemon's order: a ring built before the task allowlist keeps its own
    /// allowlist afterwards (its opcodes, and its buffer swap); a ring created after it
    /// inherits the task allowlist, so the builder cannot give it one of its own (EBUSY), and
    /// only the buffer swap is left of the register opcodes. A second task-level set is
    /// refused (EPERM) and probes as inherited.
    #[test]
    fn rings_made_before_the_task_allowlist_keep_their_own() {
        let k = Kernel::get();
        if !k.at_least(7, 0) {
            assert_eq!(k.task_restrictions, TaskRestrictions::Absent, "{k}");
            return;
        }
        std::thread::spawn(|| {
            // A read-only disk's ring, made first.
            let mut f = fixture(&RingPolicy::for_device(false, false, false));
            restrict_current_task(&process_policy()).expect("restrict");
            let host = f.map.buffers()[0].host as *mut u8;
            let read = opcode::ReadFixed::new(types::Fixed(0), host, 512, 0)
                .offset(512)
                .build();
            assert_eq!(run(&mut f.ring, read), 512, "READ_FIXED is served");
            assert_eq!(f.buf[0], (512 % 253) as u8);
            let write = opcode::WriteFixed::new(types::Fixed(0), host, 512, 0).build();
            assert_eq!(run(&mut f.ring, write), -libc::EACCES, "WRITE_FIXED");
            let bare = opcode::ReadFixed::new(types::Fd(f.image_fd), host, 512, 0).build();
            assert_eq!(run(&mut f.ring, bare), -libc::EACCES, "without FIXED_FILE");
            crate::ring::unregister_buffers(&f.ring).expect("its own buffer swap");
            // A ring made now carries the task allowlist: no allowlist of its own.
            let late = std::thread::spawn(|| {
                std::panic::catch_unwind(|| fixture(&RingPolicy::for_device(true, false, false)))
                    .is_err()
            })
            .join()
            .expect("late ring thread");
            assert!(
                late,
                "a ring made after the task allowlist took one of its own"
            );
            let plain = IoUring::new(4).expect("a plain ring");
            let allowed: Vec<u8> = process_policy()
                .register_ops()
                .iter()
                .map(|r| r.code())
                .collect();
            assert_eq!(allowed, [0, 1]);
            assert_every_register_opcode_refused(&plain, &allowed);
            let e = restrict_current_task(&process_policy()).expect_err("a second set");
            assert_eq!(e.raw_os_error(), Some(libc::EPERM));
            assert_eq!(probe_in_child(), TaskRestrictions::Inherited);
        })
        .join()
        .expect("restricted thread");
    }

    fn probe_in_child() -> TaskRestrictions {
        std::thread::spawn(crate::kernel::probe_task_restrictions)
            .join()
            .expect("probe")
    }
}
