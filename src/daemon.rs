//! The daemon: the rings (all made at startup), the listening socket, signals, and the accept
//! loop that gives every VMM connection a fresh device (new vrings, new worker threads) served
//! by the same rings.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::cli::Options;
use crate::config::{serial_bytes, DeviceSpec, SandboxMode};
use crate::control::Device;
use crate::error::StartupError;
use crate::image::Image;
use crate::ops::Ops;
use crate::queues::{Lent, Queues, ThreadInit};
use crate::ring::RingSet;
use crate::sandbox;
use crate::stats::DeviceStats;
use crate::throttle::Throttle;
use crate::worker::Tuning;

/// Printed on stderr once the socket accepts connections (tests and scripts wait for it).
pub const READY_MARKER: &str = "ringfence: ready, listening on";

/// Run the daemon until SIGTERM/SIGINT (or, with `--once`, until the first VMM leaves).
pub fn run(opts: &Options) -> Result<(), StartupError> {
    let limits = opts.limits.to_limits()?;
    let (image, spec) = open_image(opts)?;
    // Fail now, with the reason and the fix, if the kernel refuses io_uring; then learn, once,
    // what it enforces.
    crate::kernel::check_io_uring()?;
    let kernel = crate::kernel::Kernel::get();
    sandbox::process_rings_decision(kernel)?;

    // Kick and call fds are checked without open (see src/vring.rs): fail now if that cannot work.
    crate::vring::check_fd_inspection().map_err(StartupError::VhostUser)?;
    let (listener, socket_path) = crate::socket::listen(opts)?;
    // Before the sandbox: binding a socket is denied afterwards.
    let stats_listener = match &opts.stats_socket {
        Some(p) => Some(crate::ops::bind_stats_socket(p, opts.socket_mode)?),
        None => None,
    };
    // Every ring the daemon will use, each with its own allowlist: once the sandbox is on, no
    // thread can create another.
    let rings = crate::queues::make_ring_sets(&spec, &image)?;
    // Then, before the first thread, the allowlist a ring created later would inherit (Linux
    // 7.0+), for every thread.
    let process_rings = sandbox::restrict_process_rings(opts.read_only)?;
    sandbox::install_sigbus_handler().map_err(|e| StartupError::Sandbox(e.to_string()))?;
    log_serving(&image, &spec);

    let stats = Arc::new(DeviceStats::new(spec.num_queues));
    if !limits.is_empty() {
        info!("I/O limits: {limits}");
    }
    let throttle = Arc::new(Throttle::new(limits));
    let ops = Arc::new(Ops::new(image.clone(), stats.clone(), throttle.clone()));

    sandbox::block_signals();
    let mode = opts.sandbox.unwrap_or(SandboxMode::Seccomp);
    let sandboxed = mode == SandboxMode::Seccomp;
    // The process filters on the only thread there is; the signal thread inherits them and
    // keeps unlink (the removal filter goes on the main thread after it started).
    if sandboxed {
        sandbox::apply_process_filters().map_err(|e| StartupError::Sandbox(e.to_string()))?;
    }
    let mut remove_on_exit: Vec<PathBuf> = socket_path.iter().cloned().collect();
    remove_on_exit.extend(opts.stats_socket.iter().cloned());
    spawn_signal_thread(remove_on_exit, image.clone(), ops.clone(), stats.clone());
    if sandboxed {
        sandbox::apply_removal_filter().map_err(|e| StartupError::Sandbox(e.to_string()))?;
    }
    sandbox::log_status(mode, process_rings.as_ref());
    if let (Some(l), Some(p)) = (stats_listener, &opts.stats_socket) {
        crate::ops::spawn_stats_server(l, ops.clone(), p.clone());
    }

    let (thread_init, workers_ready) = worker_init(sandboxed);
    let where_ = socket_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("fd {}", listener.as_raw_fd()));
    let daemon = Connections {
        opts,
        spec,
        image,
        stats,
        ops,
        thread_init,
        workers_ready,
        listener,
        rings: Mutex::new(rings),
        throttle,
    };
    let mut ready = Some(where_);
    loop {
        daemon.serve_one(ready.take())?;
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

/// Open (or create) the image and describe the device that serves it.
fn open_image(opts: &Options) -> Result<(Arc<Image>, DeviceSpec), StartupError> {
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
    Ok((image, spec))
}

fn log_serving(image: &Image, spec: &DeviceSpec) {
    info!(
        "serving {} ({} bytes, {}, {}), {} queue(s) of up to {} entries",
        image.path.display(),
        image.size(),
        if spec.read_only {
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
}

/// What each worker thread runs first (its sandbox), and where it reports that it did.
fn worker_init(sandboxed: bool) -> (ThreadInit, mpsc::Receiver<Result<(), String>>) {
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
    (thread_init, rx)
}

/// The accept loop's state: every VMM connection gets a fresh device from it.
struct Connections<'a> {
    opts: &'a Options,
    spec: DeviceSpec,
    image: Arc<Image>,
    stats: Arc<DeviceStats>,
    ops: Arc<Ops>,
    thread_init: ThreadInit,
    /// Worker threads report here once they run under their own filter.
    workers_ready: mpsc::Receiver<Result<(), String>>,
    listener: Listener,
    /// The rings made at startup, between connections (each connection borrows them).
    rings: Mutex<Vec<RingSet>>,
    /// The device's I/O limits, for the life of the process.
    throttle: Arc<Throttle>,
}

impl Connections<'_> {
    /// Make a fresh device, wait for a VMM and serve it until it leaves, then wait for the
    /// connection's I/O. `ready`: announce that the socket accepts connections (the first time).
    fn serve_one(&self, ready: Option<String>) -> Result<(), StartupError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let queues = Arc::new(
            Queues::new(
                self.spec.clone(),
                self.image.clone(),
                mem.clone(),
                self.thread_init.clone(),
                Tuning {
                    max_poll: Duration::from_micros(self.opts.poll_us),
                    submit_batch: self.opts.submit_batch as usize,
                },
                &self.stats,
                Lent {
                    rings: std::mem::take(&mut *lock(&self.rings)),
                    throttle: self.throttle.clone(),
                },
            )
            .map_err(|e| StartupError::VhostUser(format!("cannot create the device: {e}")))?,
        );
        self.ops.serving().set_queues(Some(queues.clone()));
        // The vrings of this connection can drop it (a kick or call fd that is no eventfd).
        let conn = crate::vring::Connection::new();
        let device = Device::new(queues.clone(), mem, &conn)
            .map(|d| d.with_max_guest_ram(self.opts.max_guest_ram))
            .map_err(|e| StartupError::VhostUser(format!("cannot create the device: {e}")))?;
        let threads = device
            .spawn_workers()
            .map_err(|e| StartupError::VhostUser(format!("cannot start worker threads: {e}")))?;
        let device = Arc::new(Mutex::new(device));
        self.wait_for_workers(threads.len())?;
        if let Some(where_) = ready {
            eprintln!("{READY_MARKER} {where_}");
        }

        match accept(&self.listener) {
            Ok(stream) => {
                conn.attach(stream.try_clone().ok());
                self.ops.serving().set_vmm_connected(true);
                info!("VMM connected");
                match crate::control::serve(stream, device.clone()) {
                    Ok(()) => info!("VMM disconnected"),
                    Err(e) => warn!("VMM connection ended: {e}"),
                }
                self.ops.serving().set_vmm_connected(false);
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
        drain_connection(&queues, &self.stats.drain);
        for t in threads {
            let _ = t.join();
        }
        lock_device(&device).connection_ended();
        drop(device);
        self.ops.serving().set_queues(None);
        // Nothing is in flight: the rings serve the next connection (their guest RAM is
        // unregistered now).
        *lock(&self.rings) = queues
            .take_ring_sets()
            .map_err(|e| StartupError::VhostUser(format!("cannot reuse the rings: {e}")))?;
        Ok(())
    }

    /// Every worker installs its sandbox before the connection's first request.
    fn wait_for_workers(&self, n: usize) -> Result<(), StartupError> {
        for _ in 0..n {
            match self.workers_ready.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(StartupError::Sandbox(e)),
                Err(_) => {
                    return Err(StartupError::Sandbox(
                        "a worker thread did not start its sandbox".into(),
                    ))
                }
            }
        }
        Ok(())
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
    lock(d)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// While the daemon waits for I/O in flight (a disk that does not answer), it warns this
/// often, and a wait longer than this counts as slow (`ringfence_slow_drains_total`).
pub const DRAIN_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// How long SIGTERM waits for I/O in flight before the process exits without releasing the
/// image: the rings keep the image's lock until their last I/O has landed, so nothing of this
/// process lands after a restarted daemon took the lock.
pub const EXIT_WAIT: Duration = Duration::from_secs(10);

/// Wait for every SQE of the ended connection's rings (see `Queues::quiesce`), without a
/// deadline: the next connection is served, and the image released, only once nothing of this
/// one can land. Warns every [`DRAIN_WARN_INTERVAL`] while the disk holds some, and counts
/// them (`ringfence_io_awaited`). The workers are stopped: nothing new is submitted meanwhile.
fn drain_connection(queues: &Queues, drain: &crate::stats::DrainCounters) {
    let started = std::time::Instant::now();
    let mut next_warning = started + DRAIN_WARN_INTERVAL;
    let mut slow = false;
    // A first look soon (the gauge shows the wait), then one per warning.
    let mut slice = Duration::from_secs(1).min(DRAIN_WARN_INTERVAL);
    loop {
        let left = queues.quiesce(slice, false);
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
            sandbox::forbid_ring_registration_or_exit("signals");
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
            if let Some(b) = ops.serving().queues() {
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
