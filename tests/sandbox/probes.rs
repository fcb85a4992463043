//! The probes of `process_filters_refuse_each_denied_call`: every call the process filters
//! deny, made so that it would fail harmlessly (or do nothing) if let through, and what they
//! must leave alone.

use ringfence::kernel::abi::{
    SYS_FCHMODAT2, SYS_GETXATTRAT, SYS_LISTXATTRAT, SYS_OPEN_TREE_ATTR, SYS_REMOVEXATTRAT,
    SYS_SETXATTRAT,
};

/// A raw system call: the return value, or the errno.
pub fn sys(nr: i64, a: [usize; 6]) -> Result<i64, i32> {
    // SAFETY: every probe passes null pointers, bad fds or harmless values (signal 0, a flag
    // that makes the call fail), so that the call, if the kernel ran it, could only fail or do
    // nothing lasting; the exceptions (fork, mmap, mprotect, shmat) are cleaned up by the probe.
    let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if rc < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(rc)
    }
}

pub const NEG1: usize = usize::MAX;

/// A probe: a denied call made so that, were it allowed, it would fail harmlessly with another
/// errno (or succeed harmlessly); `baseline` says whether it is safe to make before the filter.
pub struct Probe {
    pub name: &'static str,
    pub call: Box<dyn Fn() -> Result<i64, i32>>,
    /// What the filter answers.
    pub want: i32,
    pub baseline: bool,
}

fn probe(name: &'static str, nr: i64, a: [usize; 6]) -> Probe {
    Probe {
        name,
        call: Box::new(move || sys(nr, a)),
        want: libc::EPERM,
        baseline: true,
    }
}

/// A call that creates a process if the kernel runs it: the child exits at once, the parent
/// reaps it. Not made before the filter.
fn new_process(name: &'static str, nr: i64, a: [usize; 6]) -> Probe {
    Probe {
        name,
        call: Box::new(move || {
            let r = sys(nr, a);
            match r {
                // SAFETY: in the child of a fork-like call: leave at once.
                Ok(0) => unsafe { libc::_exit(0) },
                Ok(pid) => {
                    // SAFETY: reaping the child we just created.
                    unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
                }
                Err(_) => {}
            }
            r
        }),
        want: libc::EPERM,
        baseline: false,
    }
}

/// siginfo for rt_sigqueueinfo: si_code SI_QUEUE, as sigqueue(3) sends.
fn queued_siginfo() -> &'static libc::siginfo_t {
    // SAFETY: an all-zero siginfo is a valid value of this plain C struct; si_code is its third
    // int on Linux.
    let info: &'static mut libc::siginfo_t = Box::leak(Box::new(unsafe { std::mem::zeroed() }));
    info.si_code = libc::SI_QUEUE;
    info
}

/// Every call the README's deny list names, and those of issue 11, each made so that it would
/// fail harmlessly (or do nothing) if the filter let it through. This list is the test's own:
/// emptying the filter's list must make it fail.
pub fn denied_probes() -> Vec<Probe> {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() } as usize;
    let mut v = process_probes(parent);
    v.extend(file_probes(parent));
    v.extend(signal_and_memory_probes(parent));
    #[cfg(target_arch = "x86_64")]
    v.extend(legacy_probes());
    v
}

/// New processes and programs, sockets, other processes' memory, the kernel's modules and
/// keys, namespaces and mounts.
fn process_probes(parent: usize) -> Vec<Probe> {
    use libc::*;
    let z = [0usize; 6];
    vec![
        probe("execve", SYS_execve, z),
        probe("execveat", SYS_execveat, [NEG1, 0, 0, 0, 0, 0]),
        new_process(
            "clone without CLONE_THREAD",
            SYS_clone,
            [SIGCHLD as usize, 0, 0, 0, 0, 0],
        ),
        Probe {
            want: ENOSYS,
            ..probe(
                "clone3 (ENOSYS, so that libc falls back to clone)",
                SYS_clone3,
                z,
            )
        },
        probe("socket", SYS_socket, [NEG1, 0, 0, 0, 0, 0]),
        probe("socketpair", SYS_socketpair, [NEG1, 0, 0, 0, 0, 0]),
        probe("connect", SYS_connect, [NEG1, 0, 0, 0, 0, 0]),
        probe("bind", SYS_bind, [NEG1, 0, 0, 0, 0, 0]),
        probe("listen", SYS_listen, [NEG1, 0, 0, 0, 0, 0]),
        probe(
            "ptrace",
            SYS_ptrace,
            [PTRACE_PEEKDATA as usize, NEG1, 0, 0, 0, 0],
        ),
        probe(
            "process_vm_readv",
            SYS_process_vm_readv,
            [parent, 0, 0, 0, 0, 1],
        ),
        probe(
            "process_vm_writev",
            SYS_process_vm_writev,
            [parent, 0, 0, 0, 0, 1],
        ),
        probe("kexec_load", SYS_kexec_load, [0, 0, 0, NEG1, 0, 0]),
        probe(
            "kexec_file_load",
            SYS_kexec_file_load,
            [NEG1, NEG1, 0, 0, NEG1, 0],
        ),
        probe("init_module", SYS_init_module, z),
        probe("finit_module", SYS_finit_module, [NEG1, 0, 0, 0, 0, 0]),
        probe("delete_module", SYS_delete_module, z),
        probe("bpf", SYS_bpf, [NEG1, 0, 0, 0, 0, 0]),
        probe("mount", SYS_mount, z),
        probe("umount2", SYS_umount2, z),
        probe("pivot_root", SYS_pivot_root, z),
        probe("chroot", SYS_chroot, z),
        probe("unshare(0)", SYS_unshare, z),
        probe("setns", SYS_setns, [NEG1, 0, 0, 0, 0, 0]),
        probe("keyctl", SYS_keyctl, [NEG1, 0, 0, 0, 0, 0]),
        probe("add_key", SYS_add_key, z),
        probe("request_key", SYS_request_key, z),
        probe(
            "perf_event_open",
            SYS_perf_event_open,
            [0, 0, NEG1, NEG1, 0, 0],
        ),
        probe("userfaultfd", SYS_userfaultfd, [0xffff, 0, 0, 0, 0, 0]),
        probe(
            "personality (query)",
            SYS_personality,
            [0xffff_ffff, 0, 0, 0, 0, 0],
        ),
    ]
}

/// Files (opened, created, renamed, changed, their extended attributes and timestamps),
/// pidfds, the new mount API, other processes' limits and pages.
fn file_probes(parent: usize) -> Vec<Probe> {
    use libc::*;
    let fdcwd = AT_FDCWD as isize as usize;
    let z = [0usize; 6];
    vec![
        probe("openat", SYS_openat, [fdcwd, 0, 0, 0, 0, 0]),
        probe("openat2", SYS_openat2, [fdcwd, 0, 0, 0, 0, 0]),
        probe(
            "open_by_handle_at",
            SYS_open_by_handle_at,
            [NEG1, 0, 0, 0, 0, 0],
        ),
        probe(
            "name_to_handle_at",
            SYS_name_to_handle_at,
            [NEG1, 0, 0, 0, 0, 0],
        ),
        probe("mkdirat", SYS_mkdirat, [fdcwd, 0, 0, 0, 0, 0]),
        probe("mknodat", SYS_mknodat, [fdcwd, 0, 0, 0, 0, 0]),
        probe("linkat", SYS_linkat, [fdcwd, 0, fdcwd, 0, 0, 0]),
        probe("symlinkat", SYS_symlinkat, [0, fdcwd, 0, 0, 0, 0]),
        probe("renameat", SYS_renameat, [fdcwd, 0, fdcwd, 0, 0, 0]),
        probe("renameat2", SYS_renameat2, [fdcwd, 0, fdcwd, 0, 0, 0]),
        probe("truncate", SYS_truncate, z),
        probe("fchmodat", SYS_fchmodat, [fdcwd, 0, 0, 0, 0, 0]),
        probe("fchmodat2", SYS_FCHMODAT2, [fdcwd, 0, 0, 0, 0, 0]),
        probe("fchownat", SYS_fchownat, [fdcwd, 0, 0, 0, 0, 0]),
        probe("memfd_create", SYS_memfd_create, z),
        // Issue 11: no thread needs these after startup.
        probe("pidfd_open", SYS_pidfd_open, [parent, NEG1, 0, 0, 0, 0]),
        probe("pidfd_getfd", SYS_pidfd_getfd, [NEG1, 0, 0, 0, 0, 0]),
        probe(
            "pidfd_send_signal",
            SYS_pidfd_send_signal,
            [NEG1, 0, 0, 0, 0, 0],
        ),
        probe("open_tree", SYS_open_tree, [NEG1, 0, 0, 0, 0, 0]),
        probe("open_tree_attr", SYS_OPEN_TREE_ATTR, [NEG1, 0, 0, 0, 0, 0]),
        probe("fsopen", SYS_fsopen, z),
        probe("fsconfig", SYS_fsconfig, [NEG1, 0, 0, 0, 0, 0]),
        probe("fsmount", SYS_fsmount, [NEG1, 0, 0, 0, 0, 0]),
        probe("fspick", SYS_fspick, [NEG1, 0, 0, 0, 0, 0]),
        probe("move_mount", SYS_move_mount, [NEG1, 0, NEG1, 0, 0, 0]),
        probe("mount_setattr", SYS_mount_setattr, [NEG1, 0, 0, 0, 0, 0]),
        // Issue 21, item 11: extended attributes (a null path or a bad fd: EFAULT or EBADF if
        // let through), timestamps, other processes' limits and pages, kcmp.
        probe("setxattr", SYS_setxattr, z),
        probe("lsetxattr", SYS_lsetxattr, z),
        probe("fsetxattr", SYS_fsetxattr, [NEG1, 0, 0, 0, 0, 0]),
        probe("removexattr", SYS_removexattr, z),
        probe("lremovexattr", SYS_lremovexattr, z),
        probe("fremovexattr", SYS_fremovexattr, [NEG1, 0, 0, 0, 0, 0]),
        probe("getxattr", SYS_getxattr, z),
        probe("lgetxattr", SYS_lgetxattr, z),
        probe("listxattr", SYS_listxattr, z),
        probe("llistxattr", SYS_llistxattr, z),
        probe("setxattrat", SYS_SETXATTRAT, [fdcwd, 0, 0, 0, 0, 0]),
        probe("getxattrat", SYS_GETXATTRAT, [fdcwd, 0, 0, 0, 0, 0]),
        probe("listxattrat", SYS_LISTXATTRAT, [fdcwd, 0, 0, 0, 0, 0]),
        probe("removexattrat", SYS_REMOVEXATTRAT, [fdcwd, 0, 0, 0, 0, 0]),
        probe("utimensat", SYS_utimensat, [fdcwd, 0, 0, 0, 0, 0]),
        probe(
            "prlimit64(parent, RLIMIT_NOFILE): another process's limits",
            SYS_prlimit64,
            [parent, RLIMIT_NOFILE as usize, 0, 0, 0, 0],
        ),
        probe("migrate_pages", SYS_migrate_pages, [NEG1, 0, 0, 0, 0, 0]),
        probe("move_pages", SYS_move_pages, [NEG1, 0, 0, 0, 0, 0]),
        probe("kcmp", SYS_kcmp, [parent, parent, NEG1, 0, 0, 0]),
    ]
}

/// Removing files, signals to other processes, executable memory.
fn signal_and_memory_probes(parent: usize) -> Vec<Probe> {
    use libc::*;
    let info = queued_siginfo() as *const siginfo_t as usize;
    let fdcwd = AT_FDCWD as isize as usize;
    let z = [0usize; 6];
    let mut v = vec![
        probe(
            "unlinkat (removal filter)",
            SYS_unlinkat,
            [fdcwd, 0, 0, 0, 0, 0],
        ),
        probe("kill(parent, 0)", SYS_kill, [parent, 0, 0, 0, 0, 0]),
        probe("kill(0, 0): our process group", SYS_kill, z),
        probe(
            "kill(-1, 0): every process",
            SYS_kill,
            [NEG1, 0, 0, 0, 0, 0],
        ),
        probe(
            "tgkill(parent, parent, 0)",
            SYS_tgkill,
            [parent, parent, 0, 0, 0, 0],
        ),
        probe("tkill(parent, 0)", SYS_tkill, [parent, 0, 0, 0, 0, 0]),
        probe(
            "rt_sigqueueinfo(parent)",
            SYS_rt_sigqueueinfo,
            [parent, 0, info, 0, 0, 0],
        ),
        probe(
            "rt_tgsigqueueinfo(parent)",
            SYS_rt_tgsigqueueinfo,
            [parent, parent, 0, info, 0, 0],
        ),
        probe(
            "shmat(SHM_EXEC)",
            SYS_shmat,
            [NEG1, 0, SHM_EXEC as usize, 0, 0, 0],
        ),
        Probe {
            baseline: false,
            ..probe(
                "mmap(PROT_EXEC)",
                SYS_mmap,
                [
                    0,
                    4096,
                    (PROT_READ | PROT_EXEC) as usize,
                    (MAP_PRIVATE | MAP_ANONYMOUS) as usize,
                    NEG1,
                    0,
                ],
            )
        },
    ];
    // mprotect / pkey_mprotect to PROT_EXEC on a page of our own.
    // SAFETY: a fresh private anonymous page, leaked: the probes only change its protection.
    let page = unsafe {
        mmap(
            std::ptr::null_mut(),
            4096,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    assert_ne!(page, MAP_FAILED as usize);
    let exec = (PROT_READ | PROT_EXEC) as usize;
    v.push(Probe {
        baseline: false,
        ..probe(
            "mprotect(PROT_EXEC)",
            SYS_mprotect,
            [page, 4096, exec, 0, 0, 0],
        )
    });
    v.push(Probe {
        baseline: false,
        ..probe(
            "pkey_mprotect(PROT_EXEC)",
            SYS_pkey_mprotect,
            [page, 4096, exec, NEG1, 0, 0],
        )
    });
    // Every ring is made at startup: none afterwards, on any thread.
    v.push(Probe {
        name: "io_uring_setup",
        call: Box::new(|| io_uring_probe().map(|()| 0)),
        want: EPERM,
        baseline: false,
    });
    // io_uring_register only to swap fixed buffers (opcodes 0 and 1, checked in
    // `allowed_checks`); a bad fd, so that a call let through fails with EBADF.
    for (name, op) in [
        ("io_uring_register(REGISTER_FILES)", 2usize),
        ("io_uring_register(REGISTER_EVENTFD)", 4),
        ("io_uring_register(REGISTER_PERSONALITY)", 9),
        ("io_uring_register(REGISTER_RESTRICTIONS)", 11),
        ("io_uring_register(ENABLE_RINGS)", 12),
        ("io_uring_register(BUFFERS|USE_REGISTERED_RING)", 1 << 31),
    ] {
        v.push(probe(name, SYS_io_uring_register, [9999, op, 0, 0, 0, 0]));
    }
    v
}

/// The x86_64 calls that newer architectures only have as `*at` forms.
#[cfg(target_arch = "x86_64")]
fn legacy_probes() -> Vec<Probe> {
    use libc::*;
    let fdcwd = AT_FDCWD as isize as usize;
    let z = [0usize; 6];
    vec![
        new_process("fork", SYS_fork, z),
        probe("open", SYS_open, z),
        probe("creat", SYS_creat, z),
        probe("mkdir", SYS_mkdir, z),
        probe("mknod", SYS_mknod, z),
        probe("link", SYS_link, z),
        probe("symlink", SYS_symlink, z),
        probe("rename", SYS_rename, z),
        probe("chmod", SYS_chmod, z),
        probe("chown", SYS_chown, z),
        probe("lchown", SYS_lchown, z),
        probe("utime", SYS_utime, z),
        probe("utimes", SYS_utimes, z),
        probe("futimesat", SYS_futimesat, [fdcwd, 0, 0, 0, 0, 0]),
        probe("unlink (removal filter)", SYS_unlink, z),
        probe("rmdir (removal filter)", SYS_rmdir, z),
    ]
}

/// What the process filters must leave alone (the daemon's threads need it), each checked for
/// the answer it must give.
pub fn allowed_checks() -> Vec<(&'static str, Result<(), String>)> {
    use libc::*;
    // SAFETY: getpid/gettid have no preconditions.
    let (me, tid) = unsafe { (getpid() as usize, gettid() as usize) };
    let info = queued_siginfo() as *const siginfo_t as usize;
    let ok = |r: Result<i64, i32>| r.map(drop).map_err(|e| format!("errno {e}"));
    let errno = |r: Result<i64, i32>, want: i32| match r {
        Err(e) if e == want => Ok(()),
        other => Err(format!("{other:?}, want errno {want}")),
    };
    let mut v = vec![
        ("kill(self, 0)", ok(sys(SYS_kill, [me, 0, 0, 0, 0, 0]))),
        // The control thread swaps the rings' fixed buffers (a bad fd: EBADF once let through).
        (
            "io_uring_register(UNREGISTER_BUFFERS)",
            errno(sys(SYS_io_uring_register, [9999, 1, 0, 0, 0, 0]), EBADF),
        ),
        (
            "io_uring_register(REGISTER_BUFFERS)",
            errno(sys(SYS_io_uring_register, [9999, 0, 0, 0, 0, 0]), EBADF),
        ),
        (
            "tgkill(self, self, 0)",
            ok(sys(SYS_tgkill, [me, tid, 0, 0, 0, 0])),
        ),
        (
            "rt_sigqueueinfo(self, 0)",
            ok(sys(SYS_rt_sigqueueinfo, [me, 0, info, 0, 0, 0])),
        ),
        (
            "shmat without SHM_EXEC reaches the kernel",
            errno(sys(SYS_shmat, [NEG1, 0, 0, 0, 0, 0]), EINVAL),
        ),
        (
            "a thread (clone with CLONE_THREAD)",
            std::thread::spawn(|| 7)
                .join()
                .map_err(|_| "join".to_string())
                .and_then(|v| if v == 7 { Ok(()) } else { Err("value".into()) }),
        ),
        (
            "the kick/call fd checks (fstat, readlinkat of /proc/self/fd)",
            ringfence::vring::check_fd_inspection(),
        ),
        (
            "getrlimit (prlimit64 on pid 0)",
            // SAFETY: getrlimit writes into the struct we own.
            (unsafe {
                let mut rl: rlimit = std::mem::zeroed();
                getrlimit(RLIMIT_NOFILE, &mut rl)
            } == 0)
                .then_some(())
                .ok_or_else(|| format!("{}", std::io::Error::last_os_error())),
        ),
        (
            "prlimit64(0, RLIMIT_NOFILE, NULL, &old)",
            ok(sys(
                SYS_prlimit64,
                [
                    0,
                    RLIMIT_NOFILE as usize,
                    0,
                    Box::leak(Box::new([0u64; 2])).as_mut_ptr() as usize,
                    0,
                    0,
                ],
            )),
        ),
    ];
    // Memory without PROT_EXEC.
    // SAFETY: map, write, protect and unmap a private anonymous page of our own.
    let mem = unsafe {
        let p = mmap(
            std::ptr::null_mut(),
            4096,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == MAP_FAILED {
            Err(format!("mmap: {}", std::io::Error::last_os_error()))
        } else {
            *(p as *mut u8) = 1;
            let r = if mprotect(p, 4096, PROT_READ) == 0 {
                Ok(())
            } else {
                Err(format!("mprotect: {}", std::io::Error::last_os_error()))
            };
            munmap(p, 4096);
            r
        }
    };
    v.push(("mmap/mprotect without PROT_EXEC", mem));
    // eventfds, read and written.
    let efd = vmm_sys_util::eventfd::EventFd::new(0).map_err(|e| e.to_string());
    v.push((
        "eventfd write and read",
        efd.and_then(|e| {
            e.write(3).map_err(|e| e.to_string())?;
            match e.read() {
                Ok(3) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }),
    ));
    v
}

/// io_uring_setup(4): Ok if the kernel made a ring (closed again), else the errno.
pub fn io_uring_probe() -> Result<(), i32> {
    let mut params = [0u8; 120];
    let fd = sys(
        libc::SYS_io_uring_setup,
        [4, params.as_mut_ptr() as usize, 0, 0, 0, 0],
    )?;
    // SAFETY: closing the ring fd we just created.
    unsafe { libc::close(fd as i32) };
    Ok(())
}
