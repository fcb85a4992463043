//! The seccomp filters: the process deny list (every thread), the removal filter (every
//! thread but the signal thread) and the worker allowlist. What each holds, and why, is in
//! the module documentation of `sandbox`.

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter, apply_filter_all_threads, BpfProgram, SeccompAction, SeccompCmpArgLen,
    SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use super::SandboxError;
use crate::kernel::abi::{
    SYS_FCHMODAT2, SYS_GETXATTRAT, SYS_LISTXATTRAT, SYS_OPEN_TREE_ATTR, SYS_REMOVEXATTRAT,
    SYS_SETXATTRAT,
};
use crate::ring::RegisterOp;

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
        // pidfds: pidfd_getfd takes any fd from a process of the same user (the VMM).
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_getfd,
        libc::SYS_pidfd_send_signal,
        // Signals to a thread of any process (tgkill and the others are checked below).
        libc::SYS_tkill,
        // The new mount API.
        libc::SYS_open_tree,
        SYS_OPEN_TREE_ATTR,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_mount_setattr,
        // Other processes' memory placement, and comparing their kernel objects with ours.
        libc::SYS_migrate_pages,
        libc::SYS_move_pages,
        libc::SYS_kcmp,
        // Every ring is made at startup (`queues::make_ring_sets`): a ring made later would
        // carry no allowlist of ours.
        libc::SYS_io_uring_setup,
    ];
    v.extend(files_denied());
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_utime,
        libc::SYS_utimes,
        libc::SYS_futimesat,
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

/// The part of the deny list about files: opening, creating, renaming, changing them.
fn files_denied() -> Vec<i64> {
    vec![
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
        SYS_FCHMODAT2,
        // Extended attributes: by path (any file the process can reach), and written through
        // an fd (the image). Nothing in the daemon reads or writes them.
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_removexattr,
        libc::SYS_lremovexattr,
        libc::SYS_fremovexattr,
        libc::SYS_getxattr,
        libc::SYS_lgetxattr,
        libc::SYS_listxattr,
        libc::SYS_llistxattr,
        SYS_SETXATTRAT,
        SYS_GETXATTRAT,
        SYS_LISTXATTRAT,
        SYS_REMOVEXATTRAT,
        // Timestamps of any file (by path), or of the image (by fd).
        libc::SYS_utimensat,
    ]
}

/// Syscalls that remove directory entries: denied to every thread but the signal thread, which
/// removes the socket file on SIGTERM.
fn removal_denied() -> Vec<i64> {
    let mut v = vec![libc::SYS_unlinkat];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_unlink, libc::SYS_rmdir]);
    v
}

/// What a worker thread may do (everything else fails with EPERM).
fn worker_allowed() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_io_uring_enter,
        libc::SYS_read,
        // The kick eventfd is read with preadv2(RWF_NOWAIT) (src/vring.rs).
        libc::SYS_preadv2,
        // Dropping the connection when the kick fd turns out to be a semaphore (src/vring.rs).
        libc::SYS_shutdown,
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

/// A rule of one condition on a 32-bit argument: `arg <op> value`.
fn rule(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, SandboxError> {
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(SandboxError::Rule)?;
    SeccompRule::new(vec![cond]).map_err(SandboxError::Rule)
}

/// `arg & mask == value`.
fn masked_rule(arg: u8, mask: u64, value: u64) -> Result<SeccompRule, SandboxError> {
    rule(arg, SeccompCmpOp::MaskedEq(mask), value)
}

/// `arg` of the syscall has no PROT_EXEC bit.
fn no_exec(arg: u8) -> Result<SeccompRule, SandboxError> {
    masked_rule(arg, libc::PROT_EXEC as u64, 0)
}

fn with_exec(arg: u8) -> Result<SeccompRule, SandboxError> {
    masked_rule(arg, libc::PROT_EXEC as u64, libc::PROT_EXEC as u64)
}

/// Every syscall of `nrs`, whatever its arguments.
fn unconditional(nrs: Vec<i64>) -> BTreeMap<i64, Vec<SeccompRule>> {
    nrs.into_iter().map(|s| (s, vec![])).collect()
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    SeccompFilter::new(rules, mismatch, matched, ARCH)
        .and_then(|f| f.try_into())
        .map_err(SandboxError::Compile)
}

/// The process-wide deny list (EPERM), plus clone3 answered ENOSYS so that the C library
/// falls back to clone(2), whose flags a filter can see: clone without CLONE_THREAD (a new
/// process) is denied.
pub(crate) fn process_filters() -> Result<Vec<BpfProgram>, SandboxError> {
    let mut deny = unconditional(process_denied());
    let new_process = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        0,
    )
    .map_err(SandboxError::Rule)?])
    .map_err(SandboxError::Rule)?;
    deny.insert(libc::SYS_clone, vec![new_process]);
    deny.insert(libc::SYS_mmap, vec![with_exec(2)?]);
    deny.insert(libc::SYS_mprotect, vec![with_exec(2)?]);
    deny.insert(libc::SYS_pkey_mprotect, vec![with_exec(2)?]);
    let shm_exec = libc::SHM_EXEC as u64;
    deny.insert(libc::SYS_shmat, vec![masked_rule(2, shm_exec, shm_exec)?]);
    // memfd_create only as GET_INFLIGHT_FD needs it (src/inflight.rs): sealable, close-on-exec,
    // never executable or huge-page backed.
    let inflight_memfd = u64::from(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
    deny.insert(
        libc::SYS_memfd_create,
        vec![rule(1, SeccompCmpOp::Ne, inflight_memfd)?],
    );
    // Resource limits only of this process: prlimit64 with pid 0 (what getrlimit and
    // setrlimit make), never another process's.
    deny.insert(libc::SYS_prlimit64, vec![rule(0, SeccompCmpOp::Ne, 0)?]);
    // io_uring_register only to swap a ring's fixed buffers (what the control thread does for
    // a new memory table; every other thread drops even that: `ring_registration_filter`).
    // The rings' own allowlists refuse the rest too; this holds even where they could not.
    let swap_buffers = SeccompRule::new(vec![
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            u64::from(RegisterOp::Buffers.code()),
        )
        .map_err(SandboxError::Rule)?,
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            u64::from(RegisterOp::UnregisterBuffers.code()),
        )
        .map_err(SandboxError::Rule)?,
    ])
    .map_err(SandboxError::Rule)?;
    deny.insert(libc::SYS_io_uring_register, vec![swap_buffers]);
    // Signals only to ourselves: the pid argument must be our own (known now: no fork later).
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u32 as u64;
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        deny.insert(nr, vec![rule(0, SeccompCmpOp::Ne, me)?]);
    }
    let eperm = compile(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )?;
    let enosys = compile(
        unconditional(vec![libc::SYS_clone3]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    Ok(vec![eperm, enosys])
}

/// The filter of every thread but the signal thread: no removing of files or directories.
pub(crate) fn removal_filter() -> Result<BpfProgram, SandboxError> {
    compile(
        unconditional(removal_denied()),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )
}

/// Install the process-wide filters on every thread, then the removal filter (no `unlink*`,
/// `rmdir`) on the calling thread alone. Call on the main thread once the signal thread runs
/// (it alone keeps `unlink`, to remove the socket file on exit) and before any other thread is
/// created: every thread the caller creates afterwards inherits both.
pub fn apply_process_filter() -> Result<(), SandboxError> {
    apply_process_filters()?;
    apply_removal_filter()
}

/// The process-wide filters, on every thread (TSYNC: call before any thread installed a filter
/// of its own).
pub fn apply_process_filters() -> Result<(), SandboxError> {
    for f in process_filters()? {
        apply_filter_all_threads(&f).map_err(SandboxError::Install)?;
    }
    Ok(())
}

/// The removal filter on the calling thread and the threads it creates afterwards.
pub fn apply_removal_filter() -> Result<(), SandboxError> {
    apply_filter(&removal_filter()?).map_err(SandboxError::Install)
}

/// No `io_uring_register` at all: the filter of every thread but the control thread (which
/// swaps the rings' fixed buffers) and the workers (whose allowlist lacks it anyway).
pub(crate) fn ring_registration_filter() -> Result<BpfProgram, SandboxError> {
    compile(
        unconditional(vec![libc::SYS_io_uring_register]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )
}

/// Called first by every thread that is neither the control thread nor a worker (signals,
/// stats, the call watchdog): if the process runs under its seccomp filters, this thread
/// gives up `io_uring_register` too. A daemon started with `--sandbox none` has no filter,
/// and this does nothing.
pub fn forbid_ring_registration() -> Result<(), SandboxError> {
    // SAFETY: PR_GET_SECCOMP takes no pointer; it returns this thread's seccomp mode.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode != libc::SECCOMP_MODE_FILTER as i32 {
        return Ok(());
    }
    apply_filter(&ring_registration_filter()?).map_err(SandboxError::Install)
}

/// The worker allowlist.
pub fn worker_filter() -> Result<BpfProgram, SandboxError> {
    let mut allow = unconditional(worker_allowed());
    allow.insert(libc::SYS_mmap, vec![no_exec(2)?]);
    allow.insert(libc::SYS_mprotect, vec![no_exec(2)?]);
    // fcntl only to read and set file status flags (O_NONBLOCK on the guest's call fd).
    let fcntl_cmd = |cmd: i32| rule(1, SeccompCmpOp::Eq, cmd as u64);
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
pub fn apply_worker_filter() -> Result<(), SandboxError> {
    apply_filter(&worker_filter()?).map_err(SandboxError::Install)
}

#[cfg(test)]
mod tests;
