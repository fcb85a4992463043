//! The targets and their peers: starting and stopping ringfence and qemu-storage-daemon around
//! each run, the native and fio baselines, and the disk image they all share.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringfence_guest_tests::daemon::Daemon;

use crate::engine::{self, Endpoint, RunResult, Timing, Workload};
use crate::{fio, procstat};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The image itself through blkio's io_uring driver (O_DIRECT).
    Native,
    /// ringfence, `--cache none`.
    Ringfence,
    /// qemu-storage-daemon's vhost-user-blk export, `aio=io_uring,cache.direct=on`.
    Qsd,
    /// fio's io_uring engine with `--direct=1` on the image, its default submission (one
    /// `io_uring_enter` per request): a second native baseline (matrix rows, not polled ones).
    Fio,
    /// fio's libblkio engine on the image through libblkio's `io_uring` driver: the native
    /// baseline of the independent client (matrix rows, not polled ones).
    FioLbNative,
    /// fio's libblkio engine on ringfence's socket (`virtio-blk-vhost-user`).
    FioLbRingfence,
    /// fio's libblkio engine on qemu-storage-daemon's socket.
    FioLbQsd,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Native,
        Kind::Ringfence,
        Kind::Qsd,
        Kind::Fio,
        Kind::FioLbNative,
        Kind::FioLbRingfence,
        Kind::FioLbQsd,
    ];

    /// The targets fio's libblkio engine drives, and the blkbench target each stands beside.
    pub const FIO_LB: [(Kind, Kind); 3] = [
        (Kind::FioLbNative, Kind::Native),
        (Kind::FioLbRingfence, Kind::Ringfence),
        (Kind::FioLbQsd, Kind::Qsd),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Native => "native",
            Kind::Ringfence => "ringfence",
            Kind::Qsd => "qsd",
            Kind::Fio => "fio",
            Kind::FioLbNative => "fio-lb-native",
            Kind::FioLbRingfence => "fio-lb-ringfence",
            Kind::FioLbQsd => "fio-lb-qsd",
        }
    }

    /// What is measured, without the client: `native`, `ringfence`, `qsd` (fio's libblkio
    /// runs), `fio` (fio's io_uring engine on the image).
    pub fn target_name(self) -> &'static str {
        match self {
            Kind::FioLbNative => "native",
            Kind::FioLbRingfence => "ringfence",
            Kind::FioLbQsd => "qsd",
            k => k.name(),
        }
    }

    /// fio's libblkio engine is the client.
    pub fn is_fio_lb(self) -> bool {
        matches!(
            self,
            Kind::FioLbNative | Kind::FioLbRingfence | Kind::FioLbQsd
        )
    }

    /// fio is the client (its own submission pattern; one run per round, matrix rows only).
    pub fn is_fio_client(self) -> bool {
        self == Kind::Fio || self.is_fio_lb()
    }

    /// The backend process this target runs against, if any.
    fn backend(self) -> Option<Kind> {
        match self {
            Kind::Ringfence | Kind::FioLbRingfence => Some(Kind::Ringfence),
            Kind::Qsd | Kind::FioLbQsd => Some(Kind::Qsd),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Native => "the image through blkio's `io_uring` driver, O_DIRECT (same engine)",
            Kind::Ringfence => "ringfence `--cache none`, through blkio's `virtio-blk-vhost-user`",
            Kind::Qsd => {
                "qemu-storage-daemon vhost-user-blk export, `aio=io_uring,cache.direct=on`, through blkio's `virtio-blk-vhost-user`"
            }
            Kind::Fio => {
                "`fio --ioengine=io_uring --direct=1` on the image with fio's default submission (`iodepth_batch_submit=1`): a second native baseline on every matrix row that is not polled"
            }
            Kind::FioLbNative => {
                "fio's `libblkio` engine (`--libblkio_driver=io_uring`, `--direct=1`) on the image with fio's default submission: the native baseline of the independent client, and one more native in the best native of each round"
            }
            Kind::FioLbRingfence => {
                "fio's `libblkio` engine (`--libblkio_driver=virtio-blk-vhost-user`) on ringfence's socket (`--cache none`) with fio's default submission: an independent client, one request submitted and kicked at a time"
            }
            Kind::FioLbQsd => {
                "fio's `libblkio` engine (`--libblkio_driver=virtio-blk-vhost-user`) on qemu-storage-daemon's socket with fio's default submission"
            }
        }
    }

    pub fn parse(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown target '{s}' (native, ringfence, qsd, fio, fio-lb-native, \
                     fio-lb-ringfence, fio-lb-qsd)"
                )
            })
    }

    /// Whether this target runs `w` at all (fio has no polled client here: its `hipri` needs
    /// a device with poll queues).
    pub fn applies_to(self, w: &Workload) -> bool {
        !self.is_fio_client() || !w.polled
    }

    /// A native baseline: the best of these in a round is what every ratio is taken against.
    pub fn is_native(self) -> bool {
        matches!(self, Kind::Native | Kind::Fio | Kind::FioLbNative)
    }

    fn has_backend(self) -> bool {
        matches!(self, Kind::Ringfence | Kind::Qsd)
    }
}

/// Everything the runs share.
pub struct Env {
    pub image: PathBuf,
    pub capacity: u64,
    /// Where the vhost-user sockets go.
    pub sock_dir: PathBuf,
    pub ringfence_bin: Option<PathBuf>,
    /// A fio with the libblkio engine (for the fio-lb-* targets).
    pub fio_libblkio: Option<PathBuf>,
    pub counter: std::cell::Cell<u32>,
}

impl Env {
    /// The same targets on another image or block device (a ceiling medium).
    pub fn on(&self, image: PathBuf, capacity: u64) -> Env {
        Env {
            image,
            capacity,
            sock_dir: self.sock_dir.clone(),
            ringfence_bin: self.ringfence_bin.clone(),
            fio_libblkio: self.fio_libblkio.clone(),
            counter: std::cell::Cell::new(0),
        }
    }
}

fn fio_lb_bin(env: &Env) -> Result<&Path, String> {
    env.fio_libblkio
        .as_deref()
        .ok_or_else(|| "no fio with the libblkio engine".to_string())
}

/// Run `w` once on `kind`, starting and stopping its backend around the run.
pub fn run_once(kind: Kind, env: &Env, w: &Workload, t: &Timing) -> Result<RunResult, String> {
    // If the client hangs (a backend that never answers the vhost-user handshake or loses
    // requests), killing the backend unblocks it.
    let limit = t.warmup + t.duration + Duration::from_secs(30);
    let backend = match (kind, kind.backend()) {
        (_, Some(b)) => b,
        (Kind::Native, None) => return engine::run(&Endpoint::File(&env.image), w, t, None),
        (Kind::Fio, None) => return fio::run(&env.image, env.capacity, w, t),
        (_, None) => {
            let target = fio::LbTarget::Image(&env.image);
            return fio::run_libblkio(fio_lb_bin(env)?, target, env.capacity, w, t, limit);
        }
    };
    let n = env.counter.get() + 1;
    env.counter.set(n);
    let sock = env.sock_dir.join(format!("{}-{n}.sock", backend.name()));
    let _ = std::fs::remove_file(&sock);
    let mut daemon = start(backend, env, &sock, w)?;
    let pid = daemon.pid();
    let (tx, rx) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: signalling the backend process this run started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        } else {
            false
        }
    });
    let r = if kind.is_fio_lb() {
        // fio is killed a little after the backend would be, should it hang even then.
        fio_lb_bin(env).and_then(|bin| {
            let target = fio::LbTarget::Socket(&sock);
            let fio_limit = limit + Duration::from_secs(10);
            fio::run_libblkio(bin, target, env.capacity, w, t, fio_limit)
        })
    } else {
        engine::run(&Endpoint::VhostUser(&sock), w, t, Some(pid))
    };
    drop(tx);
    let fired = watchdog.join().unwrap_or(false);
    let died = !alive(backend, &mut daemon);
    let log = daemon.stderr();
    stop(backend, daemon);
    let _ = std::fs::remove_file(&sock);
    wait_image_unlocked(&env.image);
    let name = backend.name();
    match r {
        Ok(r) if !died => Ok(r),
        Ok(_) => Err(format!("{name} exited during the run{}", tail(&log))),
        Err(e) if fired => Err(format!("{e} (run exceeded {limit:?}; backend killed)")),
        Err(e) if died => Err(format!("{e}; {name} exited{}", tail(&log))),
        // fio's own client failed: what the backend said is part of the story.
        Err(e) if kind.is_fio_lb() && !log.trim().is_empty() => {
            Err(format!("{e}; {name}'s log{}", tail(&log)))
        }
        Err(e) => Err(e),
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(5);
    format!(": {}", lines[from..].join(" | "))
}

/// Start a backend; the launcher panics on failure, which becomes an error here.
fn start(kind: Kind, env: &Env, sock: &Path, w: &Workload) -> Result<Daemon, String> {
    let image = env.image.to_string_lossy().into_owned();
    let queues = w.queues.to_string();
    let vq = engine::vq_size_for(w.qd).to_string();
    let bin = match (kind, env.ringfence_bin.as_deref()) {
        (Kind::Ringfence, None) => return Err("no ringfence binary".into()),
        (_, b) => b.unwrap_or(Path::new("ringfence")),
    };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| match kind {
        Kind::Ringfence => {
            let args = [
                "--blk-file",
                &image,
                "--cache",
                "none",
                "--num-queues",
                &queues,
                "--queue-size",
                &vq,
            ];
            Daemon::ringfence_at(bin, sock, &args)
        }
        _ => Daemon::qemu_storage_daemon(sock, &env.image, false, w.queues as u16),
    }));
    std::panic::set_hook(hook);
    r.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "launcher panicked".into());
        format!("starting {}: {}", kind.name(), msg.trim())
    })
}

fn reap(pid: i32) {
    // SAFETY: waitpid on a pid with a null status pointer; it only reaps our own children
    // (a daemonized qemu-storage-daemon is one, since we are a child subreaper).
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
}

fn alive(kind: Kind, d: &mut Daemon) -> bool {
    if kind == Kind::Ringfence {
        d.is_alive()
    } else {
        reap(d.pid());
        procstat::is_running(d.pid())
    }
}

/// SIGTERM, wait up to 5 s, then SIGKILL.
fn stop(kind: Kind, mut d: Daemon) {
    let pid = d.pid();
    let deadline = Instant::now() + Duration::from_secs(5);
    if kind == Kind::Ringfence {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        while d.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(d); // kills (if needed) and waits
    } else {
        d.terminate(); // SIGTERM; the launcher forgets the pid
        while alive_pid(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if alive_pid(pid) {
            // SAFETY: the qemu-storage-daemon this run started ignored SIGTERM.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(50));
            reap(pid);
        }
    }
}

/// Wait (up to 10 s) until no process holds a lock on the image. Backends lock it (ringfence
/// a whole-file OFD lock, qemu-storage-daemon its permission bytes), and a backend's io_uring
/// rings can keep its open file, and so the lock, alive for a moment after the process is gone:
/// the next backend would find the image locked.
pub fn wait_image_unlocked(image: &Path) {
    let Ok(f) = std::fs::File::open(image) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: an all-zero flock is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_OFD_GETLK on an open descriptor; it writes only into `fl`.
        let rc = unsafe {
            libc::fcntl(
                std::os::unix::io::AsRawFd::as_raw_fd(&f),
                libc::F_OFD_GETLK,
                &mut fl,
            )
        };
        if rc != 0 || fl.l_type == libc::F_UNLCK as libc::c_short || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn alive_pid(pid: i32) -> bool {
    reap(pid);
    procstat::is_running(pid)
}

/// Become a child subreaper so that the daemonized qemu-storage-daemon is reparented to us and
/// can be reaped (no zombies that look alive).
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer argument only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

/// Make sure qemu-storage-daemon is installed (installing `qemu-system-x86` with apt-get
/// when it is missing); its version string.
pub fn ensure_qsd() -> Result<String, String> {
    let version = || {
        Command::new("qemu-storage-daemon")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    eprintln!("blkbench: qemu-storage-daemon missing; running apt-get install -y qemu-system-x86");
    let status = Command::new("apt-get")
        .args(["install", "-y", "qemu-system-x86"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    match status {
        Ok(s) if s.success() => version().ok_or_else(|| {
            "qemu-storage-daemon still missing after installing qemu-system-x86".into()
        }),
        Ok(s) => Err(format!(
            "apt-get install qemu-system-x86 failed ({s}); install qemu-storage-daemon by hand"
        )),
        Err(e) => Err(format!(
            "qemu-storage-daemon missing and apt-get unavailable ({e}); install qemu-system-x86"
        )),
    }
}

/// The ringfence binary: `--ringfence-bin`, else the one cargo built for this bench
/// (`CARGO_BIN_EXE_ringfence`, the release profile), else `cargo build --release`.
pub fn ringfence_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("--ringfence-bin {}: no such file", p.display()))
        };
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_ringfence").map(PathBuf::from) {
        if p.is_file() {
            return Ok(p);
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release").join("ringfence");
    if !bin.is_file() {
        eprintln!("blkbench: building ringfence: cargo build --release --bin ringfence");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "ringfence"])
            .current_dir(root)
            .status()
            .map_err(|e| format!("running cargo: {e}"))?;
        if !status.success() {
            return Err(format!(
                "cargo build --release --bin ringfence failed ({status})"
            ));
        }
    }
    Ok(bin)
}

/// Create (or check) a fully written, non-sparse image of `size` bytes; its size.
pub fn prepare_image(path: &Path, size: u64) -> Result<u64, String> {
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        let allocated = meta.blocks() * 512;
        if allocated < meta.len() {
            return Err(format!(
                "{} is sparse ({} of {} bytes allocated); delete it to let blkbench write a full one",
                path.display(),
                allocated,
                meta.len()
            ));
        }
        if meta.len() < 1 << 20 {
            return Err(format!("{} is smaller than 1 MiB", path.display()));
        }
        return Ok(meta.len() / 4096 * 4096);
    }
    if size < 1 << 20 || !size.is_multiple_of(4096) {
        return Err(format!(
            "image size {size} must be a multiple of 4 KiB, at least 1 MiB"
        ));
    }
    let t0 = Instant::now();
    eprint!(
        "blkbench: writing a {} image at {} ... ",
        engine::fmt_size(size),
        path.display()
    );
    let mut f =
        std::fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 4 << 20];
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut left = size;
    while left > 0 {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    // Drop the now-clean pages so O_DIRECT I/O does not have to invalidate them.
    // SAFETY: posix_fadvise on an open file descriptor we own.
    unsafe {
        libc::posix_fadvise(
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(size)
}

/// Start the backend, connect, do a few I/Os, stop: whether the target works at all.
pub fn probe(kind: Kind, env: &Env) -> Result<(), String> {
    let w = Workload::new(true, 100, 4096, 4);
    let t = Timing {
        warmup: Duration::from_millis(20),
        duration: Duration::from_millis(100),
    };
    run_once(kind, env, &w, &t).map(|_| ())
}

pub fn has_backend(kind: Kind) -> bool {
    kind.has_backend()
}
