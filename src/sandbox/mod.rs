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
//!
//! | file | job |
//! | --- | --- |
//! | `seccomp.rs` | the three filters: process deny list, removal filter, worker allowlist |
//! | `sigbus.rs` | guest-RAM tracking and the async-signal-safe SIGBUS handler |
//! | `signals.rs` | blocking the shutdown signals, and waiting for one |
//! | `error.rs` | [`SandboxError`] |
//!
//! The process ring restrictions live with the other ring code (`ring::process`, `ring::task`);
//! they are re-exported here, where the daemon has always found them.

use log::info;

use crate::config::SandboxMode;
use crate::kernel::Kernel;
use crate::ring::RingPolicy;

mod error;
pub mod seccomp;
pub mod sigbus;
pub mod signals;

pub use crate::ring::process::{process_rings_decision, restrict_process_rings};
pub use error::SandboxError;
pub use seccomp::{apply_process_filter, apply_worker_filter, worker_filter};
pub use sigbus::{
    guest_ram_ranges, install_sigbus_handler, track_guest_ram, GuestRamRange, GUEST_MEMORY_FAULTS,
};
pub use signals::{block_signals, wait_for_signal};

/// Log, once, what the kernel offers and what protects the data path on it.
pub fn log_status(mode: SandboxMode, process_rings: Option<&RingPolicy>) {
    info!("kernel: {}", Kernel::get());
    let rings = crate::ring::process::describe(process_rings);
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
