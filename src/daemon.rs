//! The daemon: the listening socket, signals, and the accept loop that gives every VMM
//! connection a fresh device (new vrings, new worker threads, new rings).

use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{Backend, BlkBackend, ThreadInit};
use crate::cli::{Options, SandboxMode};
use crate::config::{serial_bytes, DeviceSpec};
use crate::control::Device;
use crate::error::StartupError;
use crate::image::Image;
use crate::ops::Ops;
use crate::sandbox;
use crate::stats::DeviceStats;
use crate::worker::Tuning;

/// Printed on stderr once the socket accepts connections (tests and scripts wait for it).
pub const READY_MARKER: &str = "ringfence: ready, listening on";

/// Run the daemon until SIGTERM/SIGINT (or, with `--once`, until the first VMM leaves).
pub fn run(opts: &Options) -> Result<(), StartupError> {
    let path = opts.blk_file.as_deref().ok_or(StartupError::NoSocket)?;
    let image = Arc::new(Image::open(
        path,
        opts.create_size,
        opts.read_only,
        opts.cache,
        Duration::from_secs(opts.lock_wait),
        opts.incoming,
    )?);
    let default_serial = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let spec = DeviceSpec {
        size_bytes: image.size(),
        read_only: opts.read_only,
        num_queues: opts.num_queues,
        queue_size: opts.queue_size,
        serial: serial_bytes(opts.serial.as_deref(), &default_serial),
        physical_block_exp: image.physical_block_exp(),
    };
    // Fail now, with the reason and the fix, if the kernel refuses io_uring; then learn, once,
    // what it enforces.
    crate::kernel::check_io_uring()?;
    crate::kernel::Kernel::get();
    // Before the first thread: every thread and ring inherits it (Linux 7.0+).
    let process_rings = sandbox::restrict_process_rings(opts.read_only)?;

    // Kick and call fds are checked without open (see src/vring.rs): fail now if that cannot work.
    crate::vring::check_fd_inspection().map_err(StartupError::VhostUser)?;
    let (listener, socket_path) = listen(opts)?;
    // Before the sandbox: binding a socket is denied afterwards.
    let stats_listener = match &opts.stats_socket {
        Some(p) => Some(crate::ops::bind_stats_socket(p, opts.socket_mode)?),
        None => None,
    };
    sandbox::install_sigbus_handler().map_err(|e| StartupError::Sandbox(e.to_string()))?;
    info!(
        "serving {} ({} bytes, {}, {}), {} queue(s) of up to {} entries",
        image.path.display(),
        image.size(),
        if opts.read_only {
            "read-only"
        } else {
            "read-write"
        },
        if image.direct {
            "O_DIRECT"
        } else {
            "page cache"
        },
        spec.num_queues,
        spec.queue_size
    );

    let stats = Arc::new(DeviceStats::new(spec.num_queues));
    let ops = Arc::new(Ops::new(image.clone(), stats.clone()));

    sandbox::block_signals();
    let mut remove_on_exit: Vec<PathBuf> = socket_path.iter().cloned().collect();
    remove_on_exit.extend(opts.stats_socket.iter().cloned());
    spawn_signal_thread(remove_on_exit, image.clone(), ops.clone(), stats.clone());

    let mode = opts.sandbox.unwrap_or(SandboxMode::Seccomp);
    let sandboxed = mode == SandboxMode::Seccomp;
    if sandboxed {
        sandbox::apply_process_filter().map_err(|e| StartupError::Sandbox(e.to_string()))?;
    }
    sandbox::log_status(mode, process_rings.as_ref());
    if let (Some(l), Some(p)) = (stats_listener, &opts.stats_socket) {
        crate::ops::spawn_stats_server(l, ops.clone(), p.clone());
    }

    // Worker threads report here once they run under their own filter.
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    let tx = Mutex::new(tx);
    let thread_init: ThreadInit = Arc::new(move |thread| {
        let r = if sandboxed {
            sandbox::apply_worker_filter()
        } else {
            Ok(())
        }
        .map_err(|e| format!("worker {thread}: {e}"));
        if let Ok(tx) = tx.lock() {
            let _ = tx.send(r);
        }
    });

    let where_ = socket_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("fd {}", listener.as_raw_fd()));
    let mut ready_printed = false;
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(
            BlkBackend::new(
                spec.clone(),
                image.clone(),
                mem.clone(),
                thread_init.clone(),
                Tuning {
                    max_poll: Duration::from_micros(opts.poll_us),
                    submit_batch: opts.submit_batch as usize,
                },
                &stats,
            )
            .map_err(|e| StartupError::VhostUser(format!("cannot create the device: {e}")))?,
        );
        *lock_serving() = Some(backend.clone());
        // The vrings of this connection can drop it (a kick or call fd that is no eventfd).
        let conn = crate::vring::Connection::new();
        let device = Device::new(Backend(backend.clone()), mem, &conn)
            .map(|d| d.with_max_guest_ram(opts.max_guest_ram))
            .map_err(|e| StartupError::VhostUser(format!("cannot create the device: {e}")))?;
        let threads = device
            .spawn_workers()
            .map_err(|e| StartupError::VhostUser(format!("cannot start worker threads: {e}")))?;
        let device = Arc::new(Mutex::new(device));
        // Every worker installs its sandbox before this connection's first request.
        for _ in 0..threads.len() {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(StartupError::Sandbox(e)),
                Err(_) => {
                    return Err(StartupError::Sandbox(
                        "a worker thread did not start its sandbox".into(),
                    ))
                }
            }
        }
        if !ready_printed {
            eprintln!("{READY_MARKER} {where_}");
            ready_printed = true;
        }

        match accept(&listener) {
            Ok(stream) => {
                conn.attach(stream.try_clone().ok());
                VMM_CONNECTED.store(true, Ordering::Relaxed);
                info!("VMM connected");
                match crate::control::serve(stream, device.clone()) {
                    Ok(()) => info!("VMM disconnected"),
                    Err(e) => warn!("VMM connection ended: {e}"),
                }
                VMM_CONNECTED.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                error!("accepting a VMM connection failed: {e}");
                // E.g. out of file descriptors: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        lock_device(&device).stop_workers();
        // Nothing of this connection may land after the next one starts: wait for its I/O
        // (the kernel also holds each worker thread's exit for the requests it punted to
        // io-wq, but not for requests in flight in the block layer), however long the disk
        // takes. Before the threads are joined, so that the wait is logged and counted.
        drain_connection(&backend, &stats.drain);
        for t in threads {
            let _ = t.join();
        }
        lock_device(&device).connection_ended();
        drop(device);
        *lock_serving() = None;
        drop(backend);
        if opts.once {
            // As the listener did when it bound the path itself (under the sandbox only the
            // signal thread may unlink: the file then stays, as before).
            if let Some(p) = &socket_path {
                let _ = std::fs::remove_file(p);
            }
            return Ok(());
        }
    }
}

/// The next VMM connection.
fn accept(listener: &Listener) -> Result<UnixStream, vhost::vhost_user::Error> {
    loop {
        if let Some(s) = listener.accept()? {
            return Ok(s);
        }
    }
}

fn lock_device(d: &Mutex<Device>) -> std::sync::MutexGuard<'_, Device> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bind `--socket-path` (refusing one a live process listens on) or adopt `--fd`.
fn listen(opts: &Options) -> Result<(Listener, Option<PathBuf>), StartupError> {
    match (&opts.socket_path, opts.fd) {
        (Some(path), _) => {
            claim_socket_path(path)?;
            let l =
                bind_with_mode(path, opts.socket_mode).map_err(|e| StartupError::SocketBind {
                    path: path.clone(),
                    source: e,
                })?;
            // The signal thread removes the socket file on exit.
            Ok((Listener::from(l), Some(path.clone())))
        }
        (None, Some(fd)) => {
            check_listening_fd(fd)?;
            // SAFETY: `fd` is an open, listening unix socket handed to us by our parent
            // (checked above); from here on the Listener owns it.
            let l = unsafe { Listener::from_raw_fd(fd) };
            // SAFETY: setting FD_CLOEXEC on the fd we now own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok((l, None))
        }
        (None, None) => Err(StartupError::NoSocket),
    }
}

/// Bind a listening unix socket at `path` whose file has exactly the permission bits `mode`
/// (`--socket-mode`), whatever the umask: the file is created with them, so there is no
/// moment at which it is more open (a chmod after bind would leave one). The umask is the
/// process's: call while no other thread creates files (startup, before the daemon's threads).
pub(crate) fn bind_with_mode(
    path: &Path,
    mode: u32,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    // bind(2) creates the socket file with 0777 & ~umask.
    let mask = !(mode & 0o777) & 0o777;
    // SAFETY: umask takes a plain mask and only changes the process's file-creation mask,
    // which is restored right after the bind.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Remove a stale socket file; refuse a path a live process listens on, or a non-socket.
pub(crate) fn claim_socket_path(path: &Path) -> Result<(), StartupError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(StartupError::SocketBind {
            path: path.to_path_buf(),
            source: std::io::Error::other("exists and is not a socket"),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(StartupError::SocketInUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|e| StartupError::SocketBind {
        path: path.to_path_buf(),
        source: e,
    })
}

fn check_listening_fd(fd: i32) -> Result<(), StartupError> {
    let bad = |reason: &str| StartupError::BadFd {
        fd,
        reason: reason.into(),
    };
    if fd < 0 {
        return Err(bad("negative"));
    }
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut val as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(bad(&std::io::Error::last_os_error().to_string()));
    }
    if val == 0 {
        return Err(bad("not listening"));
    }
    let mut dom: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            &mut dom as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 || dom != libc::AF_UNIX {
        return Err(bad("not a unix socket"));
    }
    Ok(())
}

/// The device of the current connection, for the signal thread.
static SERVING: Mutex<Option<Arc<BlkBackend>>> = Mutex::new(None);

fn lock_serving() -> std::sync::MutexGuard<'static, Option<Arc<BlkBackend>>> {
    SERVING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device of the current connection (or of the one the daemon waits for).
pub(crate) fn serving() -> Option<Arc<BlkBackend>> {
    lock_serving().clone()
}

/// Whether a VMM is connected now.
static VMM_CONNECTED: AtomicBool = AtomicBool::new(false);

pub(crate) fn vmm_connected() -> bool {
    VMM_CONNECTED.load(Ordering::Relaxed)
}

/// While the daemon waits for I/O in flight (a disk that does not answer), it warns this
/// often, and a wait longer than this counts as slow (`ringfence_slow_drains_total`).
pub const DRAIN_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// How long SIGTERM waits for I/O in flight before the process exits without releasing the
/// image: the rings keep the image's lock until their last I/O has landed, so nothing of this
/// process lands after a restarted daemon took the lock.
pub const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Wait for every SQE of the ended connection's rings (see `BlkBackend::quiesce`), without a
/// deadline: the next connection is served, and the image released, only once nothing of this
/// one can land. Warns every [`DRAIN_WARN_INTERVAL`] while the disk holds some, and counts
/// them (`ringfence_io_awaited`). The workers are stopped: nothing new is submitted meanwhile.
fn drain_connection(backend: &BlkBackend, drain: &crate::stats::DrainCounters) {
    let started = std::time::Instant::now();
    let mut next_warning = started + DRAIN_WARN_INTERVAL;
    let mut slow = false;
    // A first look soon (the gauge shows the wait), then one per warning.
    let mut slice = Duration::from_secs(1).min(DRAIN_WARN_INTERVAL);
    loop {
        let left = backend.quiesce(slice, false);
        drain.set_awaited(left as u64);
        if left == 0 {
            break;
        }
        let now = std::time::Instant::now();
        if now >= next_warning {
            if !slow {
                slow = true;
                drain.count_slow();
            }
            warn!(
                "the connection ended {:.0?} ago: still waiting for {left} I/O operation(s) in \
                 flight (the disk does not answer); the next VMM is served, and the image \
                 released, only once they have landed",
                started.elapsed()
            );
            while next_warning <= now {
                next_warning += DRAIN_WARN_INTERVAL;
            }
        }
        slice = next_warning
            .saturating_duration_since(now)
            .max(Duration::from_millis(10));
    }
    if slow {
        info!(
            "the last I/O of the ended connection landed after {:.1?}",
            started.elapsed()
        );
    }
}

/// SIGHUP: re-read the image size (live resize). SIGTERM/SIGINT: remove our sockets, wait
/// up to [`EXIT_WAIT`] for I/O in flight, make the image durable, release it, exit 0. With I/O
/// still in flight then, exit 0 without syncing or releasing the image: the rings hold its
/// lock until their last I/O has landed.
fn spawn_signal_thread(
    sockets: Vec<PathBuf>,
    image: Arc<Image>,
    ops: Arc<Ops>,
    stats: Arc<DeviceStats>,
) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = loop {
                match sandbox::wait_for_signal() {
                    libc::SIGHUP => ops.resize_and_log(),
                    sig => break sig,
                }
            };
            info!("received signal {sig}; exiting");
            for p in sockets {
                let _ = std::fs::remove_file(p);
            }
            // Every write in flight lands before the data is synced and the lock released.
            let serving = lock_serving().clone();
            if let Some(b) = serving {
                // The queues stay locked: no worker starts another request.
                let left = b.quiesce(EXIT_WAIT, true);
                if left > 0 {
                    stats.drain.set_awaited(left as u64);
                    stats.drain.count_slow();
                    error!(
                        "exiting with {left} I/O operation(s) still in flight after {EXIT_WAIT:?} \
                         (the disk does not answer): the image is neither synced nor released; \
                         the kernel releases its lock with the rings once their last I/O has \
                         landed, and a restarted daemon waits for it (--lock-wait)"
                    );
                    std::process::exit(0);
                }
            }
            if !image.read_only {
                let _ = image.buffered.sync_data();
            }
            // Rings hold references to the image's open file description, and the kernel
            // tears them down asynchronously after exit: release the lock now so that a
            // restarted daemon can take it at once.
            image.unlock();
            std::process::exit(0);
        })
        .map(drop)
        .unwrap_or_else(|e| error!("cannot start the signal thread: {e}"));
}
