//! The sandbox, in one place: seccomp filters for the process and for the data-plane threads,
//! and signal handling.
//!
//! Ring restrictions stop an SQE from doing anything but fixed-buffer I/O on the image. They do
//! nothing against a thread that simply creates a new, unrestricted ring, or that calls
//! `openat(2)` itself. So:
//! - every thread, once startup is done, runs under a deny list: no exec, no fork, no new
//!   sockets or connections, no opening of files, no executable memory (nor `shmat` with
//!   `SHM_EXEC`), no ptrace or `process_vm_*`, no pidfds (`pidfd_open`/`pidfd_getfd` would
//!   take fds from a VMM of the same user), no signals to other processes (`kill`, `tgkill`,
//!   `rt_sigqueueinfo`... are allowed only with our own pid), no mounts (old and new mount
//!   API), no kernel module or BPF loading, no keyrings, `perf_event_open` or `userfaultfd`,
//!   no extended attributes (set or removed by path or fd, read by path), no file timestamps
//!   (`utimensat`, `utimes`...), no `prlimit64` on another process (pid 0 only: what
//!   `getrlimit`/`setrlimit` make), no `migrate_pages`, `move_pages` or `kcmp`;
//! - every thread but the signal thread also may not remove anything (`unlink`, `unlinkat`,
//!   `rmdir`): the signal thread removes the socket file on SIGTERM, so it is started before
//!   that filter, which goes on the main thread alone and is inherited by every thread the
//!   main thread creates afterwards (the vhost-user control thread, the workers);
//! - worker threads, which touch guest data, add a strict allowlist: the few calls the worker
//!   loop makes (io_uring_enter on its existing ring, eventfd read/write, epoll_wait, futex,
//!   memory management without PROT_EXEC, close). `io_uring_setup` and `io_uring_register`
//!   are among what they cannot do.
//!
//! Which threads keep `io_uring_setup`: the vhost-user control thread must, to build new rings
//! when the memory table changes; the main thread (which creates the control thread, so its
//! filters are the control thread's) and the signal thread keep it too. No worker does. The
//! control thread never interprets guest data beyond the vring addresses the VMM sends, and
//! every ring it builds is restricted before any worker can use it. On Linux 7.0+ the whole
//! process also carries a task-level io_uring allowlist (`restrict_process_rings`), so that
//! even a ring one of those threads could be tricked into creating can do nothing but
//! fixed-buffer I/O on registered files.
//!
//! The SIGBUS handler absorbs faults on guest RAM whose file the VMM shrank, and only there:
//! the mappings are registered with [`track_guest_ram`] when a memory table arrives, each with
//! the size of its pages (huge pages for hugetlbfs guest RAM), and the handler replaces the
//! whole faulting page; any other SIGBUS ends the process with a message.

use std::collections::BTreeMap;
use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use log::{info, warn};
use seccompiler::{
    apply_filter, apply_filter_all_threads, BpfProgram, SeccompAction, SeccompCmpArgLen,
    SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::cli::SandboxMode;
use crate::error::{KernelError, RingError, StartupError};
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
        // Other processes' memory placement, and comparing their kernel objects with ours.
        libc::SYS_migrate_pages,
        libc::SYS_move_pages,
        libc::SYS_kcmp,
    ];
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

/// Syscall numbers the libc crate may not name on every architecture (numbers from 424 on are
/// the same everywhere).
const SYS_FCHMODAT2: i64 = 452;
const SYS_SETXATTRAT: i64 = 463;
const SYS_GETXATTRAT: i64 = 464;
const SYS_LISTXATTRAT: i64 = 465;
const SYS_REMOVEXATTRAT: i64 = 466;
const SYS_OPEN_TREE_ATTR: i64 = 467;

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
    masked_rule(arg, libc::PROT_EXEC as u64, libc::PROT_EXEC as u64)
}

/// `arg & mask == value`.
fn masked_rule(arg: u8, mask: u64, value: u64) -> Result<SeccompRule, String> {
    let cond = SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
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
    deny.insert(
        libc::SYS_shmat,
        vec![masked_rule(
            2,
            libc::SHM_EXEC as u64,
            libc::SHM_EXEC as u64,
        )?],
    );
    // memfd_create only as GET_INFLIGHT_FD needs it (src/inflight.rs): sealable, close-on-exec,
    // never executable or huge-page backed.
    let inflight_memfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Ne,
        u64::from(libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING),
    )
    .map_err(|e| e.to_string())?;
    deny.insert(
        libc::SYS_memfd_create,
        vec![SeccompRule::new(vec![inflight_memfd]).map_err(|e| e.to_string())?],
    );
    // Resource limits only of this process: prlimit64 with pid 0 (what getrlimit and
    // setrlimit make), never another process's.
    let other_pid = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, 0)
        .map_err(|e| e.to_string())?;
    deny.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![other_pid]).map_err(|e| e.to_string())?],
    );
    // Signals only to ourselves: the pid argument must be our own (known now: no fork later).
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u32 as u64;
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        let other = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, me)
            .map_err(|e| e.to_string())?;
        deny.insert(
            nr,
            vec![SeccompRule::new(vec![other]).map_err(|e| e.to_string())?],
        );
    }
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

/// The filter of every thread but the signal thread: no removing of files or directories.
fn removal_filter() -> Result<BpfProgram, String> {
    compile(
        removal_denied().into_iter().map(|s| (s, vec![])).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )
}

/// Install the process-wide filters on every thread, then the removal filter (no `unlink*`,
/// `rmdir`) on the calling thread alone. Call on the main thread once the signal thread runs
/// (it alone keeps `unlink`, to remove the socket file on exit) and before any other thread is
/// created: every thread the caller creates afterwards inherits both.
pub fn apply_process_filter() -> Result<(), String> {
    for f in process_filters()? {
        apply_filter_all_threads(&f).map_err(|e| format!("cannot install seccomp filter: {e}"))?;
    }
    apply_filter(&removal_filter()?).map_err(|e| format!("cannot install seccomp filter: {e}"))
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
///
/// Fails closed: on a kernel that has task restrictions, or where the probe cannot tell,
/// anything but installing the allowlist refuses startup with the reason. Only a kernel
/// without the feature (the probe's "not supported" answers) goes on without it.
pub fn restrict_process_rings(read_only: bool) -> Result<Option<RingPolicy>, StartupError> {
    let kernel = Kernel::get();
    process_rings_decision(kernel)?;
    match kernel.task_restrictions {
        TaskRestrictions::Available => {
            let policy = RingPolicy::for_process(!read_only, kernel.vectored_fixed);
            restrict_current_task(&policy).map_err(RingError::RestrictProcess)?;
            Ok(Some(policy))
        }
        _ => Ok(None),
    }
}

/// Whether startup may go on given what the kernel probe found: `Ok(true)` to install the
/// process allowlist, `Ok(false)` where the kernel has none, else why not to start. Pure.
pub fn process_rings_decision(kernel: &Kernel) -> Result<bool, StartupError> {
    match kernel.task_restrictions {
        TaskRestrictions::Available => Ok(true),
        TaskRestrictions::Absent => Ok(false),
        TaskRestrictions::Inherited => Err(RingError::InheritedRestrictions.into()),
        // io_uring_register refused for every opcode: on a kernel that has task restrictions
        // the allowlist cannot go on. Before 7.0 there is nothing to install (and the rings
        // could not be built either: `kernel::check_io_uring` reports that first).
        TaskRestrictions::Blocked if kernel.at_least(7, 0) || kernel.version.is_none() => {
            Err(KernelError::TaskRestrictionsBlocked {
                release: kernel.release.clone(),
            }
            .into())
        }
        TaskRestrictions::Blocked => Ok(false),
        TaskRestrictions::Unknown(errno) => Err(KernelError::TaskProbeUnexpected {
            source: std::io::Error::from_raw_os_error(errno),
        }
        .into()),
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
             PROT_EXEC, ptrace, pidfds, signals to other processes, mounts, bpf, modules, \
             xattrs, timestamps, other processes' limits and pages, kcmp...) on \
             all threads, no unlink/rmdir but on the signal thread, strict allowlist on worker \
             threads (no io_uring_setup/register, no open*, no socket); {rings}"
        ),
        SandboxMode::None => {
            info!("sandbox: NONE (--sandbox none): no seccomp filter; {rings}")
        }
    }
}

/// Faults on guest RAM that the SIGBUS handler absorbed.
pub static GUEST_MEMORY_FAULTS: AtomicU64 = AtomicU64::new(0);

/// `f_type` of a hugetlbfs file (`HUGETLBFS_MAGIC` in linux/magic.h): a hugetlb memfd, or a
/// file under a hugetlbfs mount (QEMU's `-mem-path`).
const HUGETLBFS_MAGIC: u32 = 0x9584_58f6;

/// Most guest-RAM mappings the SIGBUS handler knows at once: a memory table has at most 509
/// regions (the slots vhost-user-backend offers), and the mappings of an older table stay
/// until its last requests complete. Mappings past this are not absorbed (the process ends
/// on a fault there, as on any other unknown address), and the log says so.
const GUEST_RAM_SLOTS: usize = 1024;

/// The guest-RAM mappings, for the SIGBUS handler: `[start, end)` host addresses and the size
/// of the pages backing each (4 KiB, or the huge-page size of a hugetlbfs file), published
/// with a sequence lock (odd while being rewritten) so that the handler reads them without
/// taking any lock. Written only under `TRACKED`.
struct GuestRam {
    seq: AtomicU64,
    len: AtomicUsize,
    start: [AtomicUsize; GUEST_RAM_SLOTS],
    end: [AtomicUsize; GUEST_RAM_SLOTS],
    page: [AtomicUsize; GUEST_RAM_SLOTS],
}

static GUEST_RAM: GuestRam = GuestRam {
    seq: AtomicU64::new(0),
    len: AtomicUsize::new(0),
    start: [const { AtomicUsize::new(0) }; GUEST_RAM_SLOTS],
    end: [const { AtomicUsize::new(0) }; GUEST_RAM_SLOTS],
    page: [const { AtomicUsize::new(0) }; GUEST_RAM_SLOTS],
};

/// One guest-RAM mapping as the SIGBUS handler sees it: `[start, end)`, both multiples of
/// `page`, the size of the pages backing it (a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRamRange {
    pub start: usize,
    pub end: usize,
    pub page: usize,
}

/// A memory table handed to [`track_guest_ram`]: its mappings last as long as the table.
struct Tracked {
    mem: Weak<GuestMemoryMmap>,
    ranges: Vec<GuestRamRange>,
}

static TRACKED: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());

/// The normal page size.
fn base_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 && (page as usize).is_power_of_two() {
        page as usize
    } else {
        4096
    }
}

/// The size of the pages backing a guest-RAM region: the huge-page size if its file is on
/// hugetlbfs, else the normal page size (also for a region without a file). Not for signal
/// context (fstatfs through the libc wrapper, and logging).
fn region_page_size(r: &GuestRegionMmap) -> usize {
    use std::os::fd::AsRawFd;
    let base = base_page_size();
    let Some(fo) = r.file_offset() else {
        return base;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct; fstatfs fills it in
    // from an fd the region owns (open for as long as `r`).
    let st = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fo.file().as_raw_fd(), &mut st) != 0 {
            warn!(
                "cannot fstatfs a guest RAM fd ({}): its mapping is tracked with {base}-byte \
                 pages",
                std::io::Error::last_os_error()
            );
            return base;
        }
        st
    };
    if st.f_type as u32 != HUGETLBFS_MAGIC {
        return base;
    }
    match usize::try_from(st.f_bsize) {
        Ok(huge) if huge.is_power_of_two() && huge >= base => huge,
        _ => {
            warn!(
                "hugetlbfs guest RAM with an unusable block size {}: its mapping is tracked \
                 with {base}-byte pages",
                st.f_bsize
            );
            base
        }
    }
}

/// The range the SIGBUS handler may replace page by page in a mapping `[start, start + len)`
/// backed by `page`-byte pages: the whole pages inside it. A hugetlb mapping starts and ends
/// on huge-page boundaries, so nothing is lost; if one does not, the log says which part a
/// fault there ends the process on.
fn whole_pages(start: usize, len: usize, page: usize) -> Option<GuestRamRange> {
    let end = start.checked_add(len)?;
    let first = start.checked_add(page - 1)? & !(page - 1);
    let last = end & !(page - 1);
    if first != start || last != end {
        warn!(
            "guest RAM mapping {start:#x}..{end:#x} is not aligned to its {page}-byte pages: \
             a fault outside {first:#x}..{last:#x} (the VMM shrinking its memory file) ends \
             the process"
        );
    }
    (first < last).then_some(GuestRamRange {
        start: first,
        end: last,
        page,
    })
}

/// Tell the SIGBUS handler about the guest-RAM mappings of a new memory table (call with the
/// table before anything reads it: `BlkBackend::set_memory` tracks the table the VMM sent
/// before it checks and publishes it, then the published table). Each mapping is recorded
/// with the size of the pages backing it (`fstatfs` of its file: huge pages on hugetlbfs).
/// Tables no longer alive (their mappings are gone) are forgotten at the same time; tables
/// still alive (requests of an older table in flight) stay known.
pub fn track_guest_ram(mem: &Arc<GuestMemoryMmap>) {
    let mut tracked = TRACKED.lock().unwrap_or_else(|p| p.into_inner());
    tracked.retain(|t| t.mem.strong_count() > 0);
    if !tracked
        .iter()
        .any(|t| std::ptr::eq(t.mem.as_ptr(), Arc::as_ptr(mem)))
    {
        tracked.push(Tracked {
            mem: Arc::downgrade(mem),
            ranges: mem
                .iter()
                .filter_map(|r| {
                    whole_pages(r.as_ptr() as usize, r.len() as usize, region_page_size(r))
                })
                .collect(),
        });
    }
    let ranges: Vec<GuestRamRange> = tracked
        .iter()
        .flat_map(|t| t.ranges.iter().copied())
        .collect();
    if ranges.len() > GUEST_RAM_SLOTS {
        warn!(
            "{} guest RAM mappings, of which the SIGBUS handler knows the first \
             {GUEST_RAM_SLOTS}: a fault on the others (the VMM shrinking their memory file) \
             ends the process",
            ranges.len()
        );
    }
    publish_guest_ram(&ranges);
}

/// The ranges the SIGBUS handler absorbs faults in (for tests and the log).
pub fn guest_ram_ranges() -> Vec<GuestRamRange> {
    let g = &GUEST_RAM;
    loop {
        let s1 = g.seq.load(Ordering::Acquire);
        let n = g.len.load(Ordering::Relaxed).min(GUEST_RAM_SLOTS);
        let v: Vec<GuestRamRange> = (0..n)
            .map(|i| GuestRamRange {
                start: g.start[i].load(Ordering::Relaxed),
                end: g.end[i].load(Ordering::Relaxed),
                page: g.page[i].load(Ordering::Relaxed),
            })
            .collect();
        fence(Ordering::Acquire);
        if s1 & 1 == 0 && g.seq.load(Ordering::Relaxed) == s1 {
            return v;
        }
        std::hint::spin_loop();
    }
}

/// Rewrite the table (the caller holds `TRACKED`).
fn publish_guest_ram(ranges: &[GuestRamRange]) {
    let g = &GUEST_RAM;
    let s = g.seq.load(Ordering::Relaxed);
    g.seq.store(s.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    let n = ranges.len().min(GUEST_RAM_SLOTS);
    for (i, r) in ranges.iter().take(n).enumerate() {
        g.start[i].store(r.start, Ordering::Relaxed);
        g.end[i].store(r.end, Ordering::Relaxed);
        g.page[i].store(r.page, Ordering::Relaxed);
    }
    g.len.store(n, Ordering::Relaxed);
    g.seq.store(s.wrapping_add(2), Ordering::Release);
}

/// The size of the page holding `addr` if that page lies wholly inside one guest-RAM mapping
/// (it is then `addr` rounded down to that size, plus that size), else `None`.
/// Async-signal-safe: atomic loads only, a bounded number of tries (a writer is never
/// interrupted by this handler on its own thread: writers do not touch guest RAM).
fn guest_ram_page(addr: usize) -> Option<usize> {
    let g = &GUEST_RAM;
    for _ in 0..1_000_000 {
        let s1 = g.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let n = g.len.load(Ordering::Relaxed).min(GUEST_RAM_SLOTS);
        let hit = (0..n).find_map(|i| {
            let (start, end) = (
                g.start[i].load(Ordering::Relaxed),
                g.end[i].load(Ordering::Relaxed),
            );
            let page = g.page[i].load(Ordering::Relaxed);
            if !(start <= addr && addr < end && page.is_power_of_two()) {
                return None;
            }
            let first = addr & !(page - 1);
            let inside = start <= first && first.checked_add(page).is_some_and(|e| e <= end);
            inside.then_some(page)
        });
        fence(Ordering::Acquire);
        if g.seq.load(Ordering::Relaxed) == s1 {
            return hit;
        }
    }
    None
}

/// Guest RAM is a file the VMM shares with us (a memfd, or a file on hugetlbfs). If the VMM
/// shrinks that file after handing it over, touching the vanished part raises SIGBUS. The
/// handler replaces the faulting page (the whole huge page in hugetlbfs guest RAM) with a
/// private zero-filled anonymous mapping and lets the access complete, but only if the page
/// lies in a guest-RAM mapping the daemon made ([`track_guest_ram`]): the guest sees zeroes
/// where its memory vanished, the daemon survives, and the worker logs what happened. Any
/// other SIGBUS ends the process with a message naming the address.
pub fn install_sigbus_handler() -> Result<(), String> {
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
    // async-signal-safe calls (atomic loads, mmap, write, _exit) follow. The mmap replaces a
    // page of a guest-RAM mapping the daemon made (nothing else lives there) with one of the
    // same size: a hugetlb mapping can only be replaced a whole huge page at a time (MAP_FIXED
    // over part of one fails with EINVAL). The replacement is a plain anonymous mapping, not
    // MAP_HUGETLB: it needs no reserved huge page, so it cannot fail for the lack of one.
    unsafe {
        let code = (*info).si_code;
        let addr = (*info).si_addr() as usize;
        if code == BUS_ADRERR {
            if let Some(page) = guest_ram_page(addr) {
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
                    GUEST_MEMORY_FAULTS.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let mut msg = [0u8; 128];
        let n = fatal_sigbus_message(&mut msg, addr, code);
        libc::write(2, msg.as_ptr().cast(), n);
        libc::_exit(70);
    }
}

/// "ringfence: fatal: SIGBUS at 0x..., outside guest RAM (si_code N)\n" into `buf`, without
/// allocating (signal context). Returns the length.
fn fatal_sigbus_message(buf: &mut [u8; 128], addr: usize, code: i32) -> usize {
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    put(b"ringfence: fatal: SIGBUS at 0x");
    let mut hex = [0u8; 16];
    for (i, h) in hex.iter_mut().enumerate() {
        let nib = (addr >> ((15 - i) * 4)) & 0xf;
        *h = b"0123456789abcdef"[nib];
    }
    put(&hex);
    put(b", outside guest RAM (si_code ");
    let mut dec = [0u8; 11];
    let mut i = dec.len();
    let neg = code < 0;
    let mut v = code.unsigned_abs();
    loop {
        i -= 1;
        dec[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        put(b"-");
    }
    put(&dec[i..]);
    put(b")\n");
    n
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
pub fn wait_for_signal() -> i32 {
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

    fn kernel(release: &str, task: TaskRestrictions) -> Kernel {
        Kernel {
            release: release.into(),
            version: release
                .split('.')
                .take(2)
                .map(|v| v.parse().ok())
                .collect::<Option<Vec<u32>>>()
                .map(|v| (v[0], v[1])),
            vectored_fixed: true,
            task_restrictions: task,
            bpf_filters: true,
        }
    }

    /// Issue 21, item 7: the process allowlist fails closed. Only a kernel without task
    /// restrictions starts without it; an unexpected probe answer, inherited restrictions, or
    /// a refused io_uring_register on a 7.x kernel refuse startup, each with its reason.
    #[test]
    fn the_process_allowlist_fails_closed() {
        use TaskRestrictions::*;
        assert!(process_rings_decision(&kernel("7.2.13", Available)).unwrap());
        assert!(!process_rings_decision(&kernel("6.12.1", Absent)).unwrap());
        assert!(!process_rings_decision(&kernel("6.1.0", Blocked)).unwrap());
        let refused = |k: Kernel| {
            process_rings_decision(&k)
                .expect_err("must refuse")
                .to_string()
        };
        assert!(refused(kernel("7.2.13", Unknown(libc::ENOMEM))).contains("unexpected answer"));
        assert!(refused(kernel("6.12.1", Unknown(libc::EINTR))).contains("unexpected answer"));
        assert!(refused(kernel("7.2.13", Blocked)).contains("allow io_uring_register"));
        assert!(refused(kernel("7.2.13", Inherited)).contains("task-level io_uring restrictions"));
    }

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
        assert!(!removal_filter().unwrap().is_empty());
        assert!(!worker_filter().unwrap().is_empty());
    }

    /// What src/vring.rs does on a worker: read the kick eventfd with preadv2(RWF_NOWAIT), and
    /// shut a socket down (the connection of a VMM whose kick fd is a semaphore).
    #[test]
    fn worker_can_read_kicks_without_waiting_and_drop_a_connection() {
        let efd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (nowait, shut) = in_worker(move || {
            let mut v = 0u64;
            let iov = libc::iovec {
                iov_base: (&mut v as *mut u64).cast(),
                iov_len: 8,
            };
            let fd = std::os::fd::AsRawFd::as_raw_fd(&efd);
            // SAFETY: one iovec of 8 bytes pointing at `v`, which we own.
            let rc = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
            let nowait = (rc, std::io::Error::last_os_error().raw_os_error());
            (nowait, a.shutdown(std::net::Shutdown::Both).is_ok())
        });
        // An empty eventfd without O_NONBLOCK: "would block", at once.
        assert_eq!(nowait, (-1, Some(libc::EAGAIN)));
        assert!(shut);
        let mut buf = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut &b, &mut buf).unwrap(),
            0,
            "peer sees EOF"
        );
    }

    #[test]
    fn the_fatal_sigbus_message_names_address_and_code() {
        let mut buf = [0u8; 128];
        let n = fatal_sigbus_message(&mut buf, 0x7f00_dead_b000, 2);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "ringfence: fatal: SIGBUS at 0x00007f00deadb000, outside guest RAM (si_code 2)\n"
        );
        let n = fatal_sigbus_message(&mut buf, 0, -6);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .ends_with("(si_code -6)\n"));
    }

    /// A shared mapping of a memfd of `pages` pages: (file, mapping address, length).
    fn memfd_pages(pages: usize) -> (std::fs::File, usize) {
        use std::os::fd::FromRawFd;
        let len = pages * 4096;
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned from here on.
        let file = unsafe {
            let fd = libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            std::fs::File::from_raw_fd(fd)
        };
        file.set_len(len as u64).expect("ftruncate");
        (file, len)
    }

    /// Touch one byte at `addr` (volatile: the read must happen).
    fn touch(addr: usize) -> u8 {
        // SAFETY: `addr` lies in a live mapping of ours; a SIGBUS there is what is tested.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    /// The child side of the SIGBUS tests (re-executed test binary, see `run_sigbus_child`):
    /// does nothing unless `RINGFENCE_SIGBUS_CHILD` says which case to run.
    #[test]
    fn sigbus_child() {
        use std::os::fd::AsRawFd;
        use vm_memory::{FileOffset, GuestAddress};
        let Ok(case) = std::env::var("RINGFENCE_SIGBUS_CHILD") else {
            return;
        };
        install_sigbus_handler().expect("handler");
        match case.as_str() {
            "guest" => {
                // Guest RAM as the crate maps it: a GuestMemoryMmap over the VMM's memfd.
                let (file, len) = memfd_pages(4);
                let f2 = file.try_clone().unwrap();
                let mem = Arc::new(
                    GuestMemoryMmap::from_ranges_with_files(&[(
                        GuestAddress(0x10_0000),
                        len,
                        Some(FileOffset::new(f2, 0)),
                    )])
                    .expect("guest memory"),
                );
                track_guest_ram(&mem);
                let host = mem.iter().next().unwrap().as_ptr() as usize;
                let whole = GuestRamRange {
                    start: host,
                    end: host + len,
                    page: base_page_size(),
                };
                assert_eq!(guest_ram_ranges(), vec![whole]);
                // An older table still alive stays known; a dead one is forgotten.
                let (file_b, len_b) = memfd_pages(1);
                let mem_b = Arc::new(
                    GuestMemoryMmap::from_ranges_with_files(&[(
                        GuestAddress(0),
                        len_b,
                        Some(FileOffset::new(file_b, 0)),
                    )])
                    .unwrap(),
                );
                track_guest_ram(&mem_b);
                assert_eq!(guest_ram_ranges().len(), 2);
                drop(mem_b);
                track_guest_ram(&mem);
                assert_eq!(guest_ram_ranges(), vec![whole]);
                // The VMM shrinks its file: the vanished pages read as zeroes.
                file.set_len(4096).expect("shrink");
                assert_eq!(touch(host + 2 * 4096 + 17), 0);
                assert_eq!(GUEST_MEMORY_FAULTS.load(Ordering::Relaxed), 1);
                assert_eq!(touch(host + 2 * 4096), 0, "the zero page stays");
                assert_eq!(GUEST_MEMORY_FAULTS.load(Ordering::Relaxed), 1);
                drop(file);
                println!("SIGBUS-CHILD-OK");
            }
            "hugetlb" => {
                // Hugetlbfs guest RAM (QEMU's memory-backend-memfd,hugetlb=on): 4 huge pages.
                let huge = huge_page_size();
                // SAFETY: memfd_create with a NUL-terminated name; the fd is owned from here.
                let file = unsafe {
                    let fd = libc::memfd_create(
                        c"guest-ram-huge".as_ptr(),
                        libc::MFD_CLOEXEC | libc::MFD_HUGETLB,
                    );
                    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
                    <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
                };
                let len = 4 * huge;
                file.set_len(len as u64).expect("ftruncate");
                let mem = Arc::new(
                    GuestMemoryMmap::from_ranges_with_files(&[(
                        GuestAddress(0x4000_0000),
                        len,
                        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
                    )])
                    .expect("guest memory"),
                );
                track_guest_ram(&mem);
                let host = mem.iter().next().unwrap().as_ptr() as usize;
                assert_eq!(
                    guest_ram_ranges(),
                    vec![GuestRamRange {
                        start: host,
                        end: host + len,
                        page: huge,
                    }],
                    "tracked with its huge-page size"
                );
                // Fill every huge page. vm-memory maps with MAP_NORESERVE: a huge page that
                // cannot be allocated would raise SIGBUS here, which the handler would absorb.
                for i in 0..4 {
                    // SAFETY: inside the live mapping.
                    unsafe { std::ptr::write_volatile((host + i * huge) as *mut u8, 1) };
                }
                assert_eq!(
                    GUEST_MEMORY_FAULTS.load(Ordering::Relaxed),
                    0,
                    "the huge pages could not be allocated"
                );
                // The VMM shrinks its file: the last huge page vanishes and reads as zeroes,
                // all of it, from one fault; what is written there stays.
                file.set_len((3 * huge) as u64).expect("shrink");
                let gone = host + 3 * huge;
                assert_eq!(touch(gone + 4096 + 17), 0);
                assert_eq!(GUEST_MEMORY_FAULTS.load(Ordering::Relaxed), 1);
                // SAFETY: inside the live mapping (now the private replacement).
                unsafe { std::ptr::write_volatile((gone + 5) as *mut u8, 9) };
                assert_eq!(touch(gone + 5), 9, "the replacement is writable and stays");
                assert_eq!(touch(gone), 0);
                assert_eq!(touch(gone + huge - 1), 0);
                assert_eq!(
                    GUEST_MEMORY_FAULTS.load(Ordering::Relaxed),
                    1,
                    "one fault replaced the whole huge page"
                );
                assert_eq!(
                    touch(host + 2 * huge),
                    1,
                    "the pages that stay are untouched"
                );
                drop(mem);
                drop(file);
                println!("SIGBUS-CHILD-OK");
            }
            "foreign" => {
                // A shared file mapping the daemon did not register as guest RAM.
                let (file, len) = memfd_pages(2);
                // SAFETY: a fresh shared mapping of our memfd; nothing else uses the range.
                let p = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ,
                        libc::MAP_SHARED,
                        file.as_raw_fd(),
                        0,
                    )
                };
                assert_ne!(p, libc::MAP_FAILED);
                file.set_len(0).expect("shrink");
                println!("SIGBUS-CHILD-ADDR {:#018x}", p as usize + 4096);
                touch(p as usize + 4096);
                unreachable!("the SIGBUS handler returned for a foreign address");
            }
            other => panic!("unknown case {other}"),
        }
    }

    /// Run `sigbus_child` with `case` in a fresh process (the handler is process-wide, and the
    /// foreign case ends the process): (exit code, stdout, stderr).
    fn run_sigbus_child(case: &str) -> (Option<i32>, String, String) {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "sandbox::tests::sigbus_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("RINGFENCE_SIGBUS_CHILD", case)
            .output()
            .expect("run the child");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn sigbus_on_guest_ram_is_absorbed() {
        let (code, out, err) = run_sigbus_child("guest");
        assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
        assert!(
            out.contains("SIGBUS-CHILD-OK"),
            "stdout:\n{out}\nstderr:\n{err}"
        );
    }

    /// The default huge-page size (`Hugepagesize` in /proc/meminfo), what MFD_HUGETLB uses.
    fn huge_page_size() -> usize {
        meminfo("Hugepagesize:").expect("Hugepagesize in /proc/meminfo") * 1024
    }

    /// A `/proc/meminfo` field, in its unit (kB, or pages for the HugePages_ counts).
    fn meminfo(field: &str) -> Option<usize> {
        std::fs::read_to_string("/proc/meminfo")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Hugetlbfs guest RAM the VMM shrinks: the handler replaces the whole huge page (a 4 KiB
    /// page cannot be mapped inside a huge-page mapping). Needs 4 free huge pages: reserves
    /// them in /proc/sys/vm/nr_hugepages if they are not (and restores it), and skips, saying
    /// so, only if they cannot be had.
    #[test]
    fn sigbus_on_hugetlb_guest_ram_is_absorbed() {
        const NEED: usize = 4;
        const NR: &str = "/proc/sys/vm/nr_hugepages";
        struct Restore(Option<String>);
        impl Drop for Restore {
            fn drop(&mut self) {
                if let Some(before) = &self.0 {
                    let _ = std::fs::write(NR, before);
                }
            }
        }
        let mut restore = Restore(None);
        let free = meminfo("HugePages_Free:").unwrap_or(0);
        if free < NEED {
            if let Ok(before) = std::fs::read_to_string(NR) {
                let before = before.trim().to_string();
                if let Ok(n) = before.parse::<usize>() {
                    if std::fs::write(NR, (n + NEED - free).to_string()).is_ok() {
                        restore.0 = Some(before);
                    }
                }
            }
        }
        let free = meminfo("HugePages_Free:").unwrap_or(0);
        if free < NEED {
            eprintln!(
                "SKIPPED sigbus_on_hugetlb_guest_ram_is_absorbed: {free} free huge page(s), \
                 {NEED} needed, and {NR} could not provide them (not root?)"
            );
            return;
        }
        let (code, out, err) = run_sigbus_child("hugetlb");
        drop(restore);
        assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
        assert!(
            out.contains("SIGBUS-CHILD-OK"),
            "stdout:\n{out}\nstderr:\n{err}"
        );
    }

    /// What the handler may replace in a mapping: whole pages of its size, and only those.
    #[test]
    fn tracked_ranges_hold_whole_pages() {
        const H: usize = 2 << 20;
        let r = |start, end, page| GuestRamRange { start, end, page };
        assert_eq!(
            whole_pages(0x4000_0000, 4 * H, H),
            Some(r(0x4000_0000, 0x4000_0000 + 4 * H, H))
        );
        assert_eq!(
            whole_pages(0x7000_1000, 0x3000, 4096),
            Some(r(0x7000_1000, 0x7000_4000, 4096))
        );
        // Not aligned to its huge pages: only the whole ones inside.
        assert_eq!(
            whole_pages(0x4000_1000, 3 * H, H),
            Some(r(0x4000_0000 + H, 0x4000_0000 + 3 * H, H))
        );
        assert_eq!(whole_pages(0x4000_1000, H, H), None);
        assert_eq!(whole_pages(usize::MAX - 4095, 8192, 4096), None);
    }

    #[test]
    fn sigbus_elsewhere_ends_the_process_with_a_message() {
        let (code, out, err) = run_sigbus_child("foreign");
        assert_eq!(code, Some(70), "stdout:\n{out}\nstderr:\n{err}");
        let addr = out
            .lines()
            .find_map(|l| l.split("SIGBUS-CHILD-ADDR ").nth(1))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no address in stdout:\n{out}"));
        let want = format!("ringfence: fatal: SIGBUS at {addr}, outside guest RAM (si_code 2)");
        assert!(err.contains(&want), "want {want:?} in stderr:\n{err}");
    }
}
