//! The sandbox, in one place: seccomp filters for the process and for the data-plane threads,
//! and signal handling.
//!
//! Ring restrictions stop an SQE from doing anything but fixed-buffer I/O on the image. They do
//! nothing against a thread that simply creates a new, unrestricted ring, or that calls
//! `openat(2)` itself. So:
//! - every thread, once startup is done, runs under a deny list: no exec, no fork, no new
//!   sockets or connections, no opening of files, no executable memory, no ptrace, no kernel
//!   module or BPF loading;
//! - worker threads, which touch guest data, add a strict allowlist: the few calls the worker
//!   loop makes (io_uring_enter on its existing ring, eventfd read/write, epoll_wait, futex,
//!   memory management without PROT_EXEC, close). `io_uring_setup` and `io_uring_register`
//!   are among what they cannot do.
//!
//! The control thread (vhost-user messages) keeps `io_uring_setup`/`io_uring_register`: it
//! must build new rings when the memory table changes. It never interprets guest data beyond
//! the vring addresses the VMM sends, and every ring it builds is restricted before any
//! worker can use it. On Linux 7.0+ the whole process also carries a task-level io_uring
//! allowlist (`restrict_process_rings`), so that even a ring the control thread could be
//! tricked into creating can do nothing but fixed-buffer I/O on registered files.

use std::collections::BTreeMap;

use log::info;
use seccompiler::{
    apply_filter, apply_filter_all_threads, BpfProgram, SeccompAction, SeccompCmpArgLen,
    SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::cli::SandboxMode;
use crate::error::RingError;
use crate::kernel::{Kernel, TaskRestrictions};
use crate::ring::task::restrict_current_task;
use crate::ring::RingPolicy;

#[cfg(target_arch = "x86_64")]
pub(crate) const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
pub(crate) const ARCH: TargetArch = TargetArch::aarch64;

/// Syscalls no thread may make once the daemon has started.
fn process_denied() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_vfork,
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_personality,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_truncate,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_memfd_create,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_fork,
        libc::SYS_open,
        libc::SYS_creat,
        libc::SYS_mkdir,
        libc::SYS_mknod,
        libc::SYS_link,
        libc::SYS_symlink,
        libc::SYS_rename,
        libc::SYS_chmod,
        libc::SYS_chown,
        libc::SYS_lchown,
    ]);
    v
}

/// What a worker thread may do (everything else fails with EPERM).
fn worker_allowed() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_io_uring_enter,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_epoll_ctl,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_madvise,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        libc::SYS_getrandom,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
    ];
    #[cfg(target_arch = "x86_64")]
    v.push(libc::SYS_epoll_wait);
    v
}

/// `arg` of the syscall has no PROT_EXEC bit.
fn no_exec(arg: u8) -> Result<SeccompRule, String> {
    let cond = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )
    .map_err(|e| e.to_string())?;
    SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
}

fn with_exec(arg: u8) -> Result<SeccompRule, String> {
    let cond = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        libc::PROT_EXEC as u64,
    )
    .map_err(|e| e.to_string())?;
    SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    SeccompFilter::new(rules, mismatch, matched, ARCH)
        .and_then(|f| f.try_into())
        .map_err(|e| format!("cannot compile seccomp filter: {e}"))
}

/// The process-wide deny list (EPERM), plus clone3 answered ENOSYS so that the C library
/// falls back to clone(2), whose flags a filter can see: clone without CLONE_THREAD (a new
/// process) is denied.
fn process_filters() -> Result<Vec<BpfProgram>, String> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> =
        process_denied().into_iter().map(|s| (s, vec![])).collect();
    let new_process = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        0,
    )
    .map_err(|e| e.to_string())?])
    .map_err(|e| e.to_string())?;
    deny.insert(libc::SYS_clone, vec![new_process]);
    deny.insert(libc::SYS_mmap, vec![with_exec(2)?]);
    deny.insert(libc::SYS_mprotect, vec![with_exec(2)?]);
    deny.insert(libc::SYS_pkey_mprotect, vec![with_exec(2)?]);
    let eperm = compile(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )?;
    let clone3: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into();
    let enosys = compile(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    Ok(vec![eperm, enosys])
}

/// Install the process-wide filters on every thread.
pub fn apply_process_filter() -> Result<(), String> {
    for f in process_filters()? {
        apply_filter_all_threads(&f).map_err(|e| format!("cannot install seccomp filter: {e}"))?;
    }
    Ok(())
}

/// The worker allowlist.
pub fn worker_filter() -> Result<BpfProgram, String> {
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> =
        worker_allowed().into_iter().map(|s| (s, vec![])).collect();
    allow.insert(libc::SYS_mmap, vec![no_exec(2)?]);
    allow.insert(libc::SYS_mprotect, vec![no_exec(2)?]);
    // fcntl only to read and set file status flags (O_NONBLOCK on the guest's call fd).
    let fcntl_cmd = |cmd: i32| -> Result<SeccompRule, String> {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd as u64)
            .map_err(|e| e.to_string())?;
        SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
    };
    allow.insert(
        libc::SYS_fcntl,
        vec![fcntl_cmd(libc::F_GETFL)?, fcntl_cmd(libc::F_SETFL)?],
    );
    compile(
        allow,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )
}

/// Install the worker allowlist on the calling thread.
pub fn apply_worker_filter() -> Result<(), String> {
    apply_filter(&worker_filter()?).map_err(|e| format!("cannot install seccomp filter: {e}"))
}

/// Install the process-wide io_uring allowlist where the kernel has task-level restrictions
/// (Linux 7.0+). Call on the main thread before it spawns any thread: every thread and every
/// ring created afterwards inherits it. Returns the allowlist installed, if any.
pub fn restrict_process_rings(read_only: bool) -> Result<Option<RingPolicy>, RingError> {
    let kernel = Kernel::get();
    match kernel.task_restrictions {
        TaskRestrictions::Available => {
            let policy = RingPolicy::for_process(!read_only, kernel.vectored_fixed);
            restrict_current_task(&policy).map_err(RingError::RestrictProcess)?;
            Ok(Some(policy))
        }
        TaskRestrictions::Inherited => Err(RingError::InheritedRestrictions),
        TaskRestrictions::Absent | TaskRestrictions::Blocked => Ok(None),
    }
}

/// Log, once, what the kernel offers and what protects the data path on it.
pub fn log_status(mode: SandboxMode, process_rings: Option<&RingPolicy>) {
    info!("kernel: {}", Kernel::get());
    let rings = match process_rings {
        Some(p) => format!(
            "io_uring: every ring this process creates, on any thread, inherits the process \
             allowlist (task-level restrictions: {p}) and each is narrowed to its device's \
             opcodes by BPF filters"
        ),
        None => "io_uring: every ring carries its own allowlist (IORING_REGISTER_RESTRICTIONS: \
                 fixed files and buffers only, per-feature opcodes, FIXED_FILE required); no \
                 task-level restrictions on this kernel (Linux 7.0+), so a thread that creates \
                 a new ring is stopped only by seccomp, which denies io_uring_setup to worker \
                 threads but not to the control thread (it builds the rings)"
            .to_string(),
    };
    match mode {
        SandboxMode::Seccomp => info!(
            "sandbox: seccomp active: process deny list (exec, fork, socket/connect, open*, \
             PROT_EXEC, ptrace, bpf, modules...) on all threads, strict allowlist on worker \
             threads (no io_uring_setup/register, no open*, no socket); {rings}"
        ),
        SandboxMode::None => {
            info!("sandbox: NONE (--sandbox none): no seccomp filter; {rings}")
        }
    }
}

/// Faults on guest RAM that the SIGBUS handler absorbed.
pub static GUEST_MEMORY_FAULTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PAGE_SIZE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4096);

/// Guest RAM is a file the VMM shares with us (a memfd). If the VMM shrinks that file after
/// handing it over, touching the vanished part raises SIGBUS. The only file mappings this
/// process makes are guest RAM, so the handler replaces the faulting page with a private
/// zero page and lets the access complete: the guest sees zeroes where its memory vanished,
/// the daemon survives, and the worker logs what happened. Anything else ends the process
/// with a message.
pub fn install_sigbus_handler() -> Result<(), String> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE_SIZE.store(page as usize, std::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: an all-zero sigaction is a valid value of this plain C struct; we fill in the
    // handler and flags, and sigaction copies it.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "cannot install the SIGBUS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    const BUS_ADRERR: i32 = 2;
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; only
    // async-signal-safe calls (mmap, write, _exit) follow.
    unsafe {
        let code = (*info).si_code;
        let addr = (*info).si_addr() as usize;
        if code == BUS_ADRERR && addr != 0 {
            let page = PAGE_SIZE.load(std::sync::atomic::Ordering::Relaxed);
            let start = addr & !(page - 1);
            let p = libc::mmap(
                start as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p != libc::MAP_FAILED {
                GUEST_MEMORY_FAULTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
        const MSG: &[u8] = b"ringfence: fatal: SIGBUS that is not a vanished guest memory page\n";
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(70);
    }
}

/// Block SIGTERM/SIGINT/SIGHUP in this thread and every thread it creates from now on,
/// so that only the signal thread receives them.
pub fn block_signals() {
    // SAFETY: sigset operations on a set we own, then pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait for SIGTERM, SIGINT or SIGHUP (which `block_signals` blocked) and return it.
pub fn wait_for_termination() -> i32 {
    // SAFETY: sigwait on a set we own; it writes the signal number into `sig`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let mut sig = 0;
        loop {
            if libc::sigwait(&set, &mut sig) == 0 {
                return sig;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` on a fresh thread that first installs the worker filter.
    fn in_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            apply_worker_filter().expect("install worker filter");
            f()
        })
        .join()
        .expect("worker thread")
    }

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn worker_cannot_create_rings_open_files_or_sockets() {
        let results = in_worker(|| {
            let mut params = [0u8; 120];
            // SAFETY: raw syscalls with valid pointers to buffers we own; they are expected
            // to be refused by the filter before the kernel looks at the arguments.
            unsafe {
                vec![
                    (
                        "io_uring_setup",
                        errno_of(libc::syscall(
                            libc::SYS_io_uring_setup,
                            4,
                            params.as_mut_ptr(),
                        )),
                    ),
                    (
                        "io_uring_register",
                        errno_of(libc::syscall(libc::SYS_io_uring_register, 0, 0, 0, 0)),
                    ),
                    (
                        "openat",
                        errno_of(libc::syscall(
                            libc::SYS_openat,
                            libc::AT_FDCWD,
                            c"/etc/hostname".as_ptr(),
                            libc::O_RDONLY,
                        )),
                    ),
                    (
                        "socket",
                        errno_of(libc::syscall(
                            libc::SYS_socket,
                            libc::AF_INET,
                            libc::SOCK_STREAM,
                            0,
                        )),
                    ),
                    (
                        "connect",
                        errno_of(libc::syscall(libc::SYS_connect, 0, 0, 0)),
                    ),
                    (
                        "execve",
                        errno_of(libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0)),
                    ),
                    (
                        "ptrace",
                        errno_of(libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0)),
                    ),
                    (
                        "mmap(PROT_EXEC)",
                        errno_of(libc::syscall(
                            libc::SYS_mmap,
                            0,
                            4096,
                            libc::PROT_READ | libc::PROT_EXEC,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )),
                    ),
                ]
            }
        });
        for (name, errno) in results {
            assert_eq!(
                errno,
                libc::EPERM,
                "{name} must be refused with EPERM in a worker"
            );
        }
    }

    #[test]
    fn worker_keeps_what_the_loop_needs() {
        let efd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        let ok = in_worker(move || {
            let big = vec![7u8; 8 << 20];
            let fd = std::os::fd::AsRawFd::as_raw_fd(&efd);
            // SAFETY: fcntl on an eventfd we own.
            let nonblock = unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
            };
            nonblock && efd.write(1).is_ok() && efd.read().is_ok() && big.iter().all(|&b| b == 7)
        });
        assert!(ok);
    }

    #[test]
    fn filters_compile() {
        assert_eq!(process_filters().unwrap().len(), 2);
        assert!(!worker_filter().unwrap().is_empty());
    }
}
