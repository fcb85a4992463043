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
//!   `getrlimit`/`setrlimit` make), no `migrate_pages`, `move_pages` or `kcmp`, no
//!   `io_uring_setup`, and `io_uring_register` only to swap fixed buffers;
//! - every thread but the signal thread also may not remove anything (`unlink`, `unlinkat`,
//!   `rmdir`): the signal thread removes the socket file on SIGTERM, so it is started before
//!   that filter, which goes on the main thread alone and is inherited by every thread the
//!   main thread creates afterwards (the workers, the stats thread);
//! - worker threads, which touch guest data, add a strict allowlist: the few calls the worker
//!   loop makes (io_uring_enter on its existing ring, eventfd read/write, epoll_wait, futex,
//!   memory management without PROT_EXEC, close). `io_uring_setup` and `io_uring_register`
//!   are among what they cannot do.
//!
//! No thread keeps `io_uring_setup`: every ring is made at startup, before the filters go on
//! (`queues::make_ring_sets`), and each carries its own allowlist. Only the control thread (the
//! main thread) keeps `io_uring_register`, and the process filter lets it through only for
//! swapping a ring's fixed buffers (REGISTER_BUFFERS, UNREGISTER_BUFFERS) for a new memory
//! table; the signal and stats threads and the call watchdog drop it at their start
//! ([`forbid_ring_registration`]), and the workers' allowlist never had it. On Linux 7.0+ the
//! process also carries a task-level io_uring allowlist (`restrict_process_rings`), installed
//! once the rings are made: a ring created despite seccomp would inherit it.
//!
//! The SIGBUS handler absorbs faults on guest RAM whose file the VMM shrank, and only there:
//! the mappings are registered with [`track_guest_ram`] when a memory table arrives, each with
//! the size of its pages (huge pages for hugetlbfs guest RAM), and the handler replaces the
//! whole faulting page; any other SIGBUS ends the process with a message.
//!
//! | file | job |
//! | --- | --- |
//! | `seccomp.rs` | the filters: process deny list, removal filter, ring-registration filter, worker allowlist |
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
pub use seccomp::{
    apply_process_filter, apply_process_filters, apply_removal_filter, apply_worker_filter,
    forbid_ring_registration, worker_filter,
};
pub use sigbus::{
    guest_ram_ranges, install_sigbus_handler, track_guest_ram, GuestRamRange, GUEST_MEMORY_FAULTS,
};
pub use signals::{block_signals, wait_for_signal};

/// [`forbid_ring_registration`] for a thread that must not run without it: the process ends
/// if the filter cannot be installed (it never runs a thread less fenced than it says).
pub fn forbid_ring_registration_or_exit(thread: &str) {
    if let Err(e) = forbid_ring_registration() {
        log::error!("thread {thread}: cannot give up io_uring_register: {e}");
        std::process::exit(1);
    }
}

/// Log, once, what the kernel offers and what protects the data path on it.
pub fn log_status(mode: SandboxMode, process_rings: Option<&RingPolicy>) {
    info!("kernel: {}", Kernel::get());
    let rings = crate::ring::process::describe(mode == SandboxMode::Seccomp, process_rings);
    match mode {
        SandboxMode::Seccomp => info!(
            "sandbox: seccomp active: process deny list (exec, fork, socket/connect, open*, \
             PROT_EXEC, ptrace, pidfds, signals to other processes, mounts, bpf, modules, \
             xattrs, timestamps, other processes' limits and pages, kcmp...) on \
             all threads, no unlink/rmdir but on the signal thread, strict allowlist on worker \
             threads (no io_uring_register, no open*, no socket); {rings}"
        ),
        SandboxMode::None => {
            info!("sandbox: NONE (--sandbox none): no seccomp filter; {rings}")
        }
    }
}
