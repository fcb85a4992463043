//! Every error the daemon can report, in one place. Messages name the cause and, where the
//! operator can do something about it, the fix.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Errors at startup (the CLI, the image, the socket): each ends the process with one line.
#[derive(Debug, Error)]
pub enum StartupError {
    #[error("image {path}: does not exist (pass --create-size SIZE to create a sparse image)")]
    ImageMissing { path: PathBuf },
    #[error("image {path}: cannot open: {source}")]
    ImageOpen { path: PathBuf, source: io::Error },
    #[error("image {path}: cannot create: {source}")]
    ImageCreate { path: PathBuf, source: io::Error },
    #[error("image {path}: is neither a regular file nor a block device")]
    ImageKind { path: PathBuf },
    #[error("image {path}: size {size} bytes is not a multiple of 512")]
    ImageSize { path: PathBuf, size: u64 },
    #[error("image {path}: is empty")]
    ImageEmpty { path: PathBuf },
    #[error("image {path}: already served by another process (it holds a lock on the file)")]
    ImageLocked { path: PathBuf },
    #[error("image {path}: cannot lock: {source}")]
    ImageLock { path: PathBuf, source: io::Error },
    #[error("image {path}: the filesystem refuses O_DIRECT, which --cache none requires ({source}); use --cache writeback")]
    DirectIoRefused { path: PathBuf, source: io::Error },
    #[error("socket {path}: already in use by a listening process")]
    SocketInUse { path: PathBuf },
    #[error("socket {path}: cannot listen: {source}")]
    SocketBind { path: PathBuf, source: io::Error },
    #[error("--fd {fd}: not a listening unix socket ({reason})")]
    BadFd { fd: i32, reason: String },
    #[error("one of --socket-path or --fd is required")]
    NoSocket,
    #[error("{0}")]
    IoUring(#[from] RingError),
    #[error("sandbox: {0}")]
    Sandbox(String),
    #[error("I/O limits: {0}")]
    Limits(#[from] crate::throttle::LimitsError),
    #[error("vhost-user: {0}")]
    VhostUser(String),
    #[error(
        "image {path}: the path named another file when it was opened again for O_DIRECT \
         (renamed or replaced during startup); start again"
    )]
    ImageReplaced { path: PathBuf },
    #[error("{0}")]
    Kernel(#[from] KernelError),
}

/// Errors while building a restricted ring. They reach the log and refuse the VMM's
/// memory table; each names what to change.
#[derive(Debug, Error)]
pub enum RingError {
    #[error("io_uring is refused by the kernel ({source}): {hint}")]
    Refused { source: io::Error, hint: String },
    #[error("io_uring_setup failed: {0}")]
    Setup(io::Error),
    #[error("registering the image as a fixed file failed: {0}")]
    RegisterFiles(io::Error),
    #[error(
        "guest RAM cannot be pinned as io_uring fixed buffers ({source}): the VMM must back guest \
         memory with shareable anonymous memory, e.g. QEMU `-object \
         memory-backend-memfd,id=mem,size=...,share=on -machine memory-backend=mem` (file-backed \
         memory on a regular filesystem cannot be pinned)"
    )]
    Unpinnable { source: io::Error },
    #[error(
        "guest RAM ({bytes} bytes) exceeds the locked-memory limit RLIMIT_MEMLOCK ({limit}): raise \
         it (`ulimit -l unlimited`, systemd LimitMEMLOCK=infinity) or grant CAP_IPC_LOCK ({source})"
    )]
    Memlock {
        bytes: u64,
        limit: String,
        source: io::Error,
    },
    #[error("registering guest RAM as fixed buffers failed: {0}")]
    RegisterBuffers(io::Error),
    #[error("registering the completion eventfd failed: {0}")]
    RegisterEventfd(io::Error),
    #[error("installing ring restrictions failed: {0}")]
    Restrict(io::Error),
    #[error("unregistering the fixed buffers of a memory table no longer served failed: {0}")]
    UnregisterBuffers(io::Error),
    #[error(
        "queue {queue} has no ring for SQE opcodes [{ops}] (rings are made at startup for every \
         opcode set the device can negotiate)"
    )]
    NoRing { queue: u16, ops: String },
    #[error(
        "this process already carries task-level io_uring restrictions, set by the program \
         that started it (Linux 7.0+): every ring it creates inherits them, and ringfence can \
         neither install its own process allowlist nor give its rings allowlists of their \
         own; start ringfence without io_uring task restrictions (it installs its own)"
    )]
    InheritedRestrictions,
    #[error("installing the process-wide io_uring allowlist failed: {0}")]
    RestrictProcess(io::Error),
    #[error("enabling the ring failed: {0}")]
    Enable(io::Error),
    #[error("guest memory layout cannot be used: {0}")]
    Layout(String),
}

/// Why a dirty log the VMM handed over (SET_LOG_BASE) cannot be used.
#[derive(Debug, Error)]
pub enum DirtyLogError {
    #[error("a log of {size} bytes (it must be 1 byte to 1 GiB)")]
    Size { size: u64 },
    #[error(
        "the fd is not a memfd sealed against shrinking (F_SEAL_SHRINK): the VMM could shrink \
         it under our writes"
    )]
    NotSealed,
    #[error("cannot stat the log fd: {0}")]
    Stat(io::Error),
    #[error("{size} bytes at offset {offset} lie past the end of the {file_len}-byte log file")]
    PastEnd {
        offset: u64,
        size: u64,
        file_len: u64,
    },
    #[error("cannot map the log: {0}")]
    Map(io::Error),
    #[error("the log has {len} bytes, too few for guest RAM up to {end:#x} ({need} bytes)")]
    TooSmall { len: u64, end: u64, need: u64 },
}

/// What the kernel answered that the daemon cannot start on (issue 21, item 7).
#[derive(Debug, Error)]
pub enum KernelError {
    #[error(
        "probing task-level io_uring restrictions (Linux 7.0+) got an unexpected answer \
         ({source}): ringfence cannot tell whether the kernel has them, and does not start \
         without the wall it may have; report this with the kernel version"
    )]
    TaskProbeUnexpected { source: io::Error },
    #[error(
        "this kernel ({release}) has task-level io_uring restrictions, but io_uring_register \
         is refused (a seccomp profile or LSM policy), so the process allowlist cannot be \
         installed; allow io_uring_register"
    )]
    TaskRestrictionsBlocked { release: String },
}

/// An inflight region the VMM handed over (SET_INFLIGHT_FD) that cannot be used.
#[derive(Debug, Error)]
pub enum InflightError {
    #[error("no queue, or queues of no entry")]
    NoQueues,
    #[error(
        "{size} bytes cannot hold {num_queues} queue(s) of {queue_size} entries ({need} bytes)"
    )]
    TooSmall {
        size: u64,
        num_queues: u16,
        queue_size: u16,
        need: u64,
    },
    #[error("the fd is not a memfd sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    #[error("cannot stat it: {0}")]
    Stat(io::Error),
    #[error("{need} bytes at offset {offset} lie past the end of the {file_len}-byte file")]
    PastEnd {
        need: u64,
        offset: u64,
        file_len: u64,
    },
    #[error("too large")]
    TooLarge,
    #[error("cannot map it: {0}")]
    Map(io::Error),
}

/// The VMM's backend request channel cannot be told from the process's other sockets (see
/// `crate::vmm_channel`).
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error(
        "no socket descriptor closed with the crate's channel: it is held elsewhere, or was not \
         a socket"
    )]
    NothingClosed,
    #[error(
        "{} socket descriptors closed at once (fds {fds:?}); cannot tell which was the channel",
        fds.len()
    )]
    Ambiguous { fds: Vec<i32> },
}

/// A live resize that did not happen: the capacity stays.
#[derive(Debug, Error)]
pub enum ResizeError {
    #[error("cannot read the size of {path}: {source}; capacity stays {old} bytes")]
    Size {
        path: PathBuf,
        source: io::Error,
        old: u64,
    },
    #[error("{path} is now {new} bytes, not a multiple of 512; capacity stays {old} bytes")]
    Unaligned { path: PathBuf, new: u64, old: u64 },
}

/// `ringfence stat` and `ringfence resize` (the client side of the stats socket).
#[derive(Debug, Error)]
pub enum OpsctlError {
    #[error("cannot connect to the stats socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("writing to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("reading from {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The daemon answered with an error (its text).
    #[error("{0}")]
    Answer(String),
    /// The answer is not what the stats socket serves (what is wrong with it).
    #[error("{0}")]
    Malformed(String),
    /// Limits refused before anything was sent (`ringfence limits`).
    #[error("I/O limits: {0} (nothing was sent: the daemon's limits stay)")]
    Limits(#[from] crate::throttle::LimitsError),
}
