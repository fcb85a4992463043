//! The vring type the backend serves: the `vhost-user-backend` crate's `VringRwLock`, behind a
//! guard on the two fds the VMM hands over for each queue.
//!
//! The worker thread reads the kick fd (its epoll loop calls [`Vring::take_kick`]
//! before our backend runs) and writes the call fd, both while it holds the vring's lock. A
//! VMM that sends anything but an eventfd could make that read or write wait for ever: the
//! read end of a pipe holding one byte (the crate reads 8), a socket, a full pipe as call fd.
//! GET_VRING_BASE would then never be answered, and, since the accept loop waits for the
//! connection's threads, no later VMM could connect. So:
//!
//! - `set_kick`/`set_call` accept an **eventfd** and nothing else, and make it non-blocking.
//!   Anything else is refused: the fd is closed, the queue keeps none, and the connection is
//!   dropped ([`Connection`]), as qemu-storage-daemon does.
//! - `read_kick` never blocks, whatever the VMM does to the file afterwards (it shares the
//!   open file description, so it can clear O_NONBLOCK again): it reads with
//!   `preadv2(RWF_NOWAIT)`, and "would block" means "nothing to read".
//! - `read_kick` never spins: an eventfd in semaphore mode (EFD_SEMAPHORE) hands its counter
//!   out one by one, so one write of 2^64-2 would wake the worker for ever. Such a kick fd is
//!   recognised (a run of reads that each return exactly 1) and the connection is dropped.
//!
//! **How an eventfd is recognised without opening anything.** After startup the process
//! filter forbids `open*` on every thread, the control thread (which runs `set_kick`) included,
//! so `/proc/self/fdinfo/N` cannot be read. Two checks that need no open:
//! 1. `fstat(fd)` gives the device and inode of the kernel's shared anonymous inode, the same
//!    as an eventfd we create ourselves (every eventfd, epoll, timerfd, signalfd... file
//!    shares that one inode; pipes, sockets and files have their own);
//! 2. `readlinkat("/proc/self/fd/N")` (a readlink, not an open) names it
//!    `anon_inode:[eventfd]`: the anonymous-inode file the kernel made for `eventfd(2)`, a name
//!    no path can have (paths start with `/`).
//!
//! [`check_fd_inspection`] runs both on fds of known kinds at startup, so that a machine
//! without `/proc` fails then, with the reason, rather than refusing every VMM.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLockReadGuard, RwLockWriteGuard};

use log::warn;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the vrings see it.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// What `readlink(/proc/self/fd/N)` says for an eventfd.
const EVENTFD_LINK: &str = "anon_inode:[eventfd]";

/// A kick fd that has handed out exactly 1 this many times in a row (and never more) is
/// looked at closely: is it a semaphore?
const CHECK_EVERY: u32 = 64;

/// Reads in a row, each returning exactly 1, that make a kick fd a semaphore. A normal eventfd
/// is zero after a read, so a second read returns 1 only if the VMM kicked in the few hundred
/// nanoseconds between the two; fifteen such kicks, each landing between two of our reads, is
/// no VMM's behaviour.
const SEMAPHORE_RUN: u32 = 16;

/// One VMM connection as its vrings see it: what drops it when the VMM sends a kick or call
/// fd we refuse.
///
/// The vrings are created (`crate::control::Device::new`) before the connection is accepted,
/// so a refusal is remembered, and [`Connection::attach`] carries it out if it came first.
pub struct Connection {
    shutdown: Mutex<Option<UnixStream>>,
    refused: AtomicBool,
    next_queue: AtomicUsize,
}

thread_local! {
    /// The connection the vrings created on this thread belong to (see [`Connection::scope`]).
    static SCOPE: RefCell<Option<Arc<Connection>>> = const { RefCell::new(None) };
}

impl Connection {
    pub fn new() -> Arc<Connection> {
        Arc::new(Connection {
            shutdown: Mutex::new(None),
            refused: AtomicBool::new(false),
            next_queue: AtomicUsize::new(0),
        })
    }

    /// Run `f` (which creates the vrings) so that every [`Vring`] it
    /// creates on this thread belongs to this connection.
    pub fn scope<R>(self: &Arc<Self>, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Arc<Connection>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let prev = self.0.take();
                SCOPE.with(|s| *s.borrow_mut() = prev);
            }
        }
        let prev = SCOPE.with(|s| s.borrow_mut().replace(self.clone()));
        let _restore = Restore(prev);
        f()
    }

    /// The connection is accepted: `stream` (a clone of its socket) ends it. If an fd was
    /// refused already, the connection is ended now.
    pub fn attach(&self, stream: Option<UnixStream>) {
        let mut slot = self.shutdown.lock().unwrap_or_else(|p| p.into_inner());
        *slot = stream;
        if self.refused.load(Ordering::Acquire) {
            if let Some(s) = slot.as_ref() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Whether this connection was dropped for an fd it sent.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }

    /// Drop the connection: the VMM sees it closed (no reply to the message that carried the
    /// fd), and the daemon goes on to accept the next one.
    fn refuse(&self) {
        let slot = self.shutdown.lock().unwrap_or_else(|p| p.into_inner());
        self.refused.store(true, Ordering::Release);
        if let Some(s) = slot.as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// What we know of the current kick fd of one queue.
#[derive(Default)]
struct KickState {
    /// It was found to be a semaphore: not read again, and the connection is being dropped.
    refused: AtomicBool,
    /// A read returned more than 1: a normal eventfd (a semaphore hands out 1 at a time).
    normal: AtomicBool,
    /// Reads that returned exactly 1 since the last close look.
    ones: AtomicU32,
}

impl KickState {
    fn reset(&self) {
        self.refused.store(false, Ordering::Relaxed);
        self.normal.store(false, Ordering::Relaxed);
        self.ones.store(0, Ordering::Relaxed);
    }
}

/// The vring type the backend serves (see the module documentation).
#[derive(Clone)]
pub struct Vring {
    inner: VringRwLock<Mem>,
    conn: Arc<Connection>,
    /// Queue index, for the log.
    queue: usize,
    kick: Arc<KickState>,
}

impl Vring {
    /// The connection this vring belongs to.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.conn
    }

    /// `file` if it is an eventfd, made non-blocking; else refuse it and drop the connection.
    fn admit(&self, file: File, role: &str) -> Option<File> {
        let fd = file.as_raw_fd();
        match check_eventfd(fd).and_then(|()| {
            set_nonblocking(fd)
                .map_err(|e| format!("an eventfd that cannot be made non-blocking ({e})"))
        }) {
            Ok(()) => Some(file),
            Err(what) => {
                warn!(
                    "queue {}: refusing the VMM's {role} fd: it is {what}, not an eventfd; \
                     dropping the connection",
                    self.queue
                );
                self.conn.refuse();
                None
            }
        }
    }
}

impl Vring {
    /// Consume a kick (see `read_kick`): whether the queue is enabled, so worth a look.
    pub fn take_kick(&self) -> bool {
        self.read_kick().unwrap_or(false)
    }
}

impl<'a> VringStateGuard<'a, Mem> for Vring {
    type G = RwLockReadGuard<'a, VringState<Mem>>;
}

impl<'a> VringStateMutGuard<'a, Mem> for Vring {
    type G = RwLockWriteGuard<'a, VringState<Mem>>;
}

impl VringT<Mem> for Vring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        let conn = SCOPE
            .with(|s| s.borrow().clone())
            .unwrap_or_else(Connection::new);
        let queue = conn.next_queue.fetch_add(1, Ordering::Relaxed);
        Ok(Vring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            conn,
            queue,
            kick: Arc::new(KickState::default()),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        let file = file.and_then(|f| self.admit(f, "kick"));
        // What was learnt of the old fd does not apply to the new one. (A worker still reading
        // the old fd may bump a counter: the counters only decide when to look closely.)
        self.kick.reset();
        self.inner.set_kick(file);
    }

    /// Consume a kick. Never blocks (RWF_NOWAIT: "would block" is "nothing to read") and
    /// never returns an error.
    fn read_kick(&self) -> io::Result<bool> {
        let st = self.inner.get_ref();
        if self.kick.refused.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let enabled = st.is_enabled();
        let Some(kick) = st.get_kick() else {
            return Ok(enabled);
        };
        let fd = kick.as_raw_fd();
        let got = match read_nowait(fd) {
            Ok(got) => got,
            Err(e) => {
                // Not an eventfd after all (possible only where /proc could not tell): it
                // would stay readable and wake the worker for ever.
                drop(st);
                self.kick.refused.store(true, Ordering::Relaxed);
                warn!(
                    "queue {}: the VMM's kick fd cannot be read as an eventfd ({e}); dropping \
                     the connection",
                    self.queue
                );
                self.conn.refuse();
                return Ok(false);
            }
        };
        if got.is_some_and(|v| v > 1) {
            self.kick.normal.store(true, Ordering::Relaxed);
        } else if got == Some(1)
            && !self.kick.normal.load(Ordering::Relaxed)
            && self.kick.ones.fetch_add(1, Ordering::Relaxed) + 1 >= CHECK_EVERY
        {
            self.kick.ones.store(0, Ordering::Relaxed);
            if is_semaphore(fd) {
                drop(st);
                self.kick.refused.store(true, Ordering::Relaxed);
                warn!(
                    "queue {}: the VMM's kick eventfd is a semaphore (EFD_SEMAPHORE) with a \
                     large count, which would wake the worker for ever; dropping the connection",
                    self.queue
                );
                self.conn.refuse();
                return Ok(false);
            }
        }
        Ok(enabled)
    }

    fn set_call(&self, file: Option<File>) {
        let file = file.and_then(|f| self.admit(f, "call"));
        self.inner.set_call(file)
    }

    /// The error fd is kept as the crate keeps it: nothing ever reads or writes it.
    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

/// `Ok` if `fd` is an eventfd; else what it is, for the log (e.g. "a pipe (pipe:[1234])").
pub fn check_eventfd(fd: RawFd) -> Result<(), String> {
    let st = fstat(fd).map_err(|e| format!("an fd that cannot be inspected ({e})"))?;
    let link = fd_link(fd);
    let anon = anon_inode()?;
    if (st.st_dev, st.st_ino) == anon && link.as_deref().ok() == Some(EVENTFD_LINK) {
        return Ok(());
    }
    if (st.st_dev, st.st_ino) == anon && !PROC_FD.load(Ordering::Relaxed) {
        // Without /proc an anonymous-inode file is as close as we can tell; a kick fd that
        // then cannot be read as an eventfd drops the connection (`read_kick`).
        return Ok(());
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO => "a pipe",
        libc::S_IFREG => "a regular file",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFDIR => "a directory",
        _ if (st.st_dev, st.st_ino) == anon => "an anonymous-inode file",
        _ => "a file of an unknown kind",
    };
    Err(match link {
        Ok(l) => format!("{kind} ({l})"),
        Err(e) => format!("{kind} (/proc/self/fd/{fd} unreadable: {e})"),
    })
}

/// Whether `/proc/self/fd` tells an eventfd from other anonymous-inode files (it does where
/// /proc is mounted).
static PROC_FD: AtomicBool = AtomicBool::new(true);

/// Check, at startup, that fds can be told apart as `set_kick`/`set_call` need: an eventfd is
/// recognised and a pipe is not. Where /proc is not mounted (a minimal initramfs), say so and
/// check kick and call fds by their inode alone.
pub fn check_fd_inspection() -> Result<(), String> {
    let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC)
        .map_err(|e| format!("cannot create an eventfd: {e}"))?;
    if let Err(e) = fd_link(efd.as_raw_fd()) {
        if e.raw_os_error() == Some(libc::ENOENT) {
            PROC_FD.store(false, Ordering::Relaxed);
            warn!(
                "/proc is not mounted: kick and call fds can only be checked to be \
                 anonymous-inode files (mount /proc to have them checked as eventfds)"
            );
        }
    }
    check_eventfd(efd.as_raw_fd()).map_err(|e| {
        format!("cannot recognise an eventfd (it looks like {e}); is /proc mounted?")
    })?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we own; we own them from here on.
    let (r, _w) = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(format!(
                "cannot create a pipe: {}",
                io::Error::last_os_error()
            ));
        }
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    if check_eventfd(r.as_raw_fd()).is_ok() {
        return Err("a pipe passes for an eventfd".into());
    }
    Ok(())
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct; fstat fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st`, which we own; `fd` is only inspected.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The target of `/proc/self/fd/N`: a readlink, which the process filter allows (an open would
/// not be).
fn fd_link(fd: RawFd) -> io::Result<String> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).map_err(io::Error::other)?;
    let mut buf = [0u8; 256];
    // SAFETY: readlinkat writes at most `buf.len()` bytes into `buf`, which we own; `path` is
    // NUL-terminated and outlives the call.
    let n = unsafe {
        libc::readlinkat(
            libc::AT_FDCWD,
            path.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

/// (device, inode) of the kernel's shared anonymous inode, learnt from an eventfd of our own.
fn anon_inode() -> Result<(u64, u64), String> {
    static ANON: OnceLock<(u64, u64)> = OnceLock::new();
    if let Some(v) = ANON.get() {
        return Ok(*v);
    }
    let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC)
        .map_err(|e| format!("an fd that cannot be compared with an eventfd ({e})"))?;
    let st = fstat(efd.as_raw_fd())
        .map_err(|e| format!("an fd that cannot be compared with an eventfd ({e})"))?;
    Ok(*ANON.get_or_init(|| (st.st_dev, st.st_ino)))
}

/// `set_nonblocking` with the error in words (for a refusal's log line).
pub fn make_nonblocking(fd: RawFd) -> Result<(), String> {
    set_nonblocking(fd).map_err(|e| format!("an eventfd that cannot be made non-blocking ({e})"))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL/F_SETFL on an fd we hold change only its status flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK == 0
            && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Kernels whose eventfd refuses RWF_NOWAIT (before Linux 5.x): fall back to a plain read,
/// non-blocking only as long as the VMM leaves O_NONBLOCK set.
static NOWAIT_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Read an eventfd's counter without ever waiting: `None` if there is nothing to read.
/// One non-blocking 8-byte read: `Ok(Some(v))`, `Ok(None)` when there is nothing to read, or
/// the error of an fd that cannot be read as an eventfd.
fn read_nowait(fd: RawFd) -> io::Result<Option<u64>> {
    let mut v = 0u64;
    let iov = libc::iovec {
        iov_base: (&mut v as *mut u64).cast(),
        iov_len: 8,
    };
    loop {
        let n = if NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
            // SAFETY: reads at most 8 bytes into `v`, which we own.
            unsafe { libc::read(fd, iov.iov_base, 8) }
        } else {
            // SAFETY: one iovec of 8 bytes pointing at `v`, which we own; offset -1 reads at
            // the file position, as read(2) does.
            unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) }
        };
        if n == 8 {
            return Ok(Some(v));
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            if NOWAIT_UNSUPPORTED.swap(true, Ordering::Relaxed) {
                return Ok(None);
            }
            continue;
        }
        return match (n, err.raw_os_error()) {
            // Nothing to read; or interrupted, and the fd is still ready, so epoll brings us back.
            (_, Some(libc::EAGAIN) | Some(libc::EINTR)) if n < 0 => Ok(None),
            (n, _) if n < 0 => Err(err),
            _ => Err(io::Error::other(format!("a read of {n} bytes"))),
        };
    }
}

/// Whether the kick fd hands out its counter one at a time, a lot of it left.
fn is_semaphore(fd: RawFd) -> bool {
    (0..SEMAPHORE_RUN).all(|_| matches!(read_nowait(fd), Ok(Some(1))))
}

#[cfg(test)]
mod tests;
