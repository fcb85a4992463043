//! Starting and stopping the backends under test: ringfence itself, and qemu-storage-daemon's
//! vhost-user-blk export as the reference peer. Readiness is signalled by the daemons
//! themselves (ringfence's "ready" line on stderr, qemu-storage-daemon's `--daemonize`, whose
//! parent exits only once the export exists), never guessed with sleeps.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The line ringfence prints on stderr once its socket accepts connections.
pub const READY_MARKER: &str = "ringfence: ready, listening on";

/// Path of the ringfence binary: `$RINGFENCE_BIN` if set, else the workspace's release build,
/// built on first use.
pub fn ringfence_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGFENCE_BIN") {
        return PathBuf::from(p);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "ringfence",
                    "--bin",
                    "ringfence",
                ])
                .current_dir(&root)
                .status()
                .expect("run cargo build for the ringfence binary");
            assert!(status.success(), "building the ringfence binary failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            let target = if target.is_absolute() {
                target
            } else {
                root.join(target)
            };
            target.join("release").join("ringfence")
        })
        .clone()
}

/// The workspace root (the directory above `guest-tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("guest-tests lives inside the workspace")
        .to_path_buf()
}

/// A running backend. Dropping it kills the process.
pub struct Daemon {
    child: Option<Child>,
    /// For a daemonized qemu-storage-daemon: its pid.
    pid: Option<i32>,
    pub socket: PathBuf,
    stderr: Arc<(Mutex<String>, Condvar)>,
}

impl Daemon {
    /// Start ringfence listening on `socket`, with `args` appended (e.g. `--blk-file`, ...).
    /// Panics with the daemon's stderr if it exits or does not become ready in 60 s.
    pub fn ringfence(socket: &Path, args: &[&str]) -> Daemon {
        Self::ringfence_at(&ringfence_bin(), socket, args)
    }

    /// Like [`Daemon::ringfence`], with an explicit binary (e.g. `env!("CARGO_BIN_EXE_ringfence")`).
    pub fn ringfence_at(bin: &Path, socket: &Path, args: &[&str]) -> Daemon {
        let mut child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringfence");
        let stderr = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("piped stderr");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if std::env::var_os("RINGFENCE_TEST_LOG").is_some() {
                    eprintln!("[ringfence] {line}");
                }
                {
                    let mut l = log.0.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                log.1.notify_all();
                if line.contains(READY_MARKER) {
                    let _ = tx.send(());
                }
            }
        });
        let mut d = Daemon {
            child: Some(child),
            pid: None,
            socket: socket.to_path_buf(),
            stderr,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let status = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!(
                "ringfence did not become ready (exit status {status:?}); stderr:\n{}",
                d.stderr()
            );
        }
        d
    }

    /// Start qemu-storage-daemon exporting `image` (a file or a block device) as vhost-user-blk
    /// on `socket`.
    pub fn qemu_storage_daemon(
        socket: &Path,
        image: &Path,
        read_only: bool,
        num_queues: u16,
    ) -> Daemon {
        let pidfile = socket.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let ro = if read_only { "on" } else { "off" };
        // QEMU's `file` driver refuses block devices; `host_device` is its driver for them.
        let driver = match std::fs::metadata(image) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {
                "host_device"
            }
            _ => "file",
        };
        let out = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver={driver},node-name=file0,filename={},cache.direct=on,aio=io_uring,read-only={ro}",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable={},num-queues={num_queues}",
                socket.display(),
                if read_only { "off" } else { "on" }
            ))
            .arg("--daemonize")
            .arg("--pidfile")
            .arg(&pidfile)
            .output()
            .expect("qemu-storage-daemon not found: apt-get install qemu-system-x86 (or qemu-storage-daemon)");
        assert!(
            out.status.success(),
            "qemu-storage-daemon failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("qemu-storage-daemon pidfile")
            .trim()
            .parse()
            .expect("pid in pidfile");
        Daemon {
            child: None,
            pid: Some(pid),
            socket: socket.to_path_buf(),
            stderr: Arc::new((Mutex::new(String::new()), Condvar::new())),
        }
    }

    /// Wait until the daemon's stderr holds `needle` (ringfence only); `false` after `timeout`.
    /// The reader thread signals every line, so this waits on the event, not on a clock.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let (log, cv) = &*self.stderr;
        let guard = log.lock().unwrap();
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |l| !l.contains(needle))
            .unwrap();
        guard.contains(needle)
    }

    /// Everything the daemon wrote to stderr so far (ringfence only).
    pub fn stderr(&self) -> String {
        self.stderr.0.lock().unwrap().clone()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        match (&self.child, self.pid) {
            (Some(c), _) => c.id() as i32,
            (None, Some(p)) => p,
            (None, None) => unreachable!("a daemon has a child or a pid"),
        }
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            // SAFETY: kill with signal 0 only checks that the pid exists.
            None => unsafe { libc::kill(self.pid(), 0) == 0 },
        }
    }

    /// Stop the process (SIGSTOP) and wait, at most `timeout`, until every one of its
    /// threads is stopped: `kill` only queues the signal, and a thread running on another
    /// CPU goes on for a moment. Returns whether all of them stopped. The wait watches the
    /// threads' state in /proc (the process need not be our child).
    pub fn stop(&self, timeout: Duration) -> bool {
        let pid = self.pid();
        // SAFETY: sending a signal to the backend this test started.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            return false;
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if all_threads_stopped(pid) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            // Not a synchronisation by time: the loop ends on the observed state; this only
            // spaces out the looks at /proc.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Let a stopped process go on (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: sending a signal to the backend this test started.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
    }

    /// Send SIGTERM and wait for the exit; returns the exit code (ringfence only).
    pub fn terminate(mut self) -> Option<i32> {
        // SAFETY: sending a signal to our own child / daemon pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let code = self
            .child
            .as_mut()
            .and_then(|c| c.wait().ok())
            .and_then(|s| s.code());
        self.child = None;
        self.pid = None;
        code
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(p) = self.pid {
            // SAFETY: killing the daemonized qemu-storage-daemon we started.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

impl Daemon {
    /// The exit status if the process has ended (ringfence only; `None` while it runs or for
    /// a daemonized qemu-storage-daemon).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

/// Whether every thread of `pid` is in the stopped state (`T`) according to /proc.
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in dir.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|r| stat.get(r + 2..r + 3))
            .unwrap_or("?");
        if state != "T" && state != "t" {
            return false;
        }
        any = true;
    }
    any
}

impl Daemon {
    /// How many bytes of stderr the daemon wrote so far (ringfence only): a position for
    /// [`Daemon::wait_for_log_after`].
    pub fn log_len(&self) -> usize {
        self.stderr.0.lock().unwrap().len()
    }

    /// Wait until a line written after byte `from` of the daemon's stderr satisfies `pred`;
    /// returns it, or `None` after `timeout` (ringfence only). Waits on the reader thread's
    /// signal, not on a clock.
    pub fn wait_for_log_after(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let (log, cv) = &*self.stderr;
        let find = |l: &str| -> Option<String> {
            l.get(from..)
                .unwrap_or("")
                .lines()
                .find(|line| pred(line))
                .map(str::to_string)
        };
        let guard = log.lock().unwrap();
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |l| find(l).is_none())
            .unwrap();
        find(&guard)
    }
}

/// Start ringfence (`$RINGFENCE_BIN` or the workspace's build) on `socket` with `args`, when
/// it is expected to refuse to start: waits (at most `timeout`) for it to exit, and returns
/// its exit code and stderr. Panics if it becomes ready instead, or does not exit in time.
pub fn ringfence_refused(socket: &Path, args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(ringfence_bin())
        .arg("--socket-path")
        .arg(socket)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringfence");
    let pipe = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    // The reader ends at EOF, when the process (and every copy of its stderr) is gone.
    std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        let _ = tx.send(all);
    });
    match rx.recv_timeout(timeout) {
        Ok(all) => {
            let status = child.wait().expect("wait for ringfence");
            if all.contains(READY_MARKER) {
                panic!("ringfence started although it should have refused to:\n{all}");
            }
            (status.code(), all)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringfence neither refused to start nor exited within {timeout:?}");
        }
    }
}

fn run_cmd(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An ext4 filesystem in a file, on a loop device, mounted in a temporary directory: a disk
/// the test controls. [`LoopFs::freeze`] holds every write to it inside the kernel (FIFREEZE;
/// reads pass) until [`LoopFs::thaw`]; [`ReadThrottle`] holds reads and writes of chosen
/// processes. Needs root, `losetup`, `mkfs.ext4`, `fsfreeze`.
///
/// The one such helper: `tests/drain.rs`, `guest-tests/tests/{inflight,qemu_guest,hardening,
/// dirty_log,handover}.rs` use it.
pub struct LoopFs {
    mnt: tempfile::TempDir,
    loopdev: String,
    _backing: tempfile::TempDir,
    /// Shared with the threads a test runs beside the daemon.
    frozen: std::sync::atomic::AtomicBool,
}

impl LoopFs {
    /// A fresh filesystem of `size` bytes.
    pub fn new(size: u64) -> LoopFs {
        let backing = tempfile::tempdir().expect("tempdir");
        let file = backing.path().join("fs.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size))
            .expect("backing file");
        run_cmd(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file));
        let loopdev = run_cmd(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let mnt = tempfile::tempdir().expect("mount point");
        run_cmd(Command::new("mount").arg(&loopdev).arg(mnt.path()));
        LoopFs {
            mnt,
            loopdev,
            _backing: backing,
            frozen: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The mount point.
    pub fn path(&self) -> PathBuf {
        self.mnt.path().to_path_buf()
    }

    /// The loop device's `major:minor`.
    pub fn devnum(&self) -> String {
        let md = std::fs::metadata(&self.loopdev).expect("stat the loop device");
        use std::os::unix::fs::MetadataExt;
        let rdev = md.rdev();
        format!("{}:{}", libc::major(rdev), libc::minor(rdev))
    }

    /// Hold every write to the filesystem until [`LoopFs::thaw`].
    pub fn freeze(&self) {
        run_cmd(Command::new("fsfreeze").arg("-f").arg(self.mnt.path()));
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Let held writes go (a no-op when not frozen).
    pub fn thaw(&self) {
        if self.frozen.swap(false, std::sync::atomic::Ordering::SeqCst) {
            run_cmd(Command::new("fsfreeze").arg("-u").arg(self.mnt.path()));
        }
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A guard that thaws the filesystem when dropped. Make it after the daemons that write
    /// to the filesystem, so that it is dropped before them: a failing test must not leave a
    /// daemon's held writes (and so its exit, and the test's cleanup) stuck.
    pub fn thaw_guard(&self) -> ThawOnDrop<'_> {
        ThawOnDrop(self)
    }
}

/// See [`LoopFs::thaw_guard`].
pub struct ThawOnDrop<'a>(&'a LoopFs);

impl Drop for ThawOnDrop<'_> {
    fn drop(&mut self) {
        self.0.thaw();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.is_frozen() {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(self.mnt.path())
                .status();
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mnt.path())
            .status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

/// A blkio cgroup (cgroup v1 `blkio.throttle.*`, or cgroup v2 `io.max`) that holds the I/O
/// of the processes put in it on one block device: limited to 1 byte/s, a request of a few KiB
/// waits inside the kernel (the block layer's throttle queue) until [`ReadThrottle::release`]
/// lifts the limit, and then goes at once. Unlike a frozen filesystem this holds reads, which
/// a test needs to keep a device's read in flight while it changes something. Dropping it
/// releases the limit, moves the processes back to the root group and removes the group.
pub struct ReadThrottle {
    dir: PathBuf,
    root: PathBuf,
    v2: bool,
    dev: String,
    pids: Vec<i32>,
}

impl ReadThrottle {
    /// A new group for device `dev` (`major:minor`), no limit yet: [`ReadThrottle::add`]
    /// puts processes in it, [`ReadThrottle::hold`] starts holding their I/O. Panics with the
    /// reason if the machine has no blkio controller.
    pub fn new(dev: &str) -> ReadThrottle {
        let name = format!("ringfence-test-{}-{}", std::process::id(), unique());
        let v1 = Path::new("/sys/fs/cgroup/blkio");
        let (root, v2) = if v1.join("blkio.throttle.read_bps_device").exists() {
            (v1.to_path_buf(), false)
        } else {
            let candidates = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
            let found = candidates.iter().map(Path::new).find(|p| {
                std::fs::read_to_string(p.join("cgroup.controllers"))
                    .map(|c| c.split_whitespace().any(|x| x == "io"))
                    .unwrap_or(false)
            });
            let Some(p) = found else {
                panic!(
                    "this test holds reads in flight with the block layer's throttle and needs a \
                     blkio (cgroup v1) or io (cgroup v2) controller: none is mounted"
                );
            };
            let _ = std::fs::write(p.join("cgroup.subtree_control"), "+io");
            (p.to_path_buf(), true)
        };
        let dir = root.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let t = ReadThrottle {
            dir,
            root,
            v2,
            dev: dev.to_string(),
            pids: Vec::new(),
        };
        t.limit(false, false);
        t
    }

    /// Hold the group's reads (and writes, with `writes`) on the device from now on.
    pub fn hold(&self, writes: bool) {
        self.limit(true, writes);
    }

    fn limit(&self, on: bool, writes: bool) {
        if self.v2 {
            let v = if on { "1" } else { "max" };
            let w = if on && writes { "1" } else { "max" };
            let line = format!("{} rbps={v} wbps={w}", self.dev);
            std::fs::write(self.dir.join("io.max"), line).expect("write io.max");
        } else {
            let v = if on { "1" } else { "0" };
            let w = if on && writes { "1" } else { "0" };
            std::fs::write(
                self.dir.join("blkio.throttle.read_bps_device"),
                format!("{} {v}", self.dev),
            )
            .expect("write blkio.throttle.read_bps_device");
            std::fs::write(
                self.dir.join("blkio.throttle.write_bps_device"),
                format!("{} {w}", self.dev),
            )
            .expect("write blkio.throttle.write_bps_device");
        }
    }

    /// Put process `pid` (all its threads) in the group.
    pub fn add(&mut self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.dir.display()));
        self.pids.push(pid);
    }

    /// Lift the limit: everything held goes to the disk now.
    pub fn release(&self) {
        self.limit(false, false);
    }
}

impl Drop for ReadThrottle {
    fn drop(&mut self) {
        self.limit(false, false);
        for p in &self.pids {
            let _ = std::fs::write(self.root.join("cgroup.procs"), p.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Daemon {
    /// Whether the process maps a memfd named `name` (a line `/memfd:NAME (deleted)` in
    /// /proc/PID/maps).
    pub fn maps_memfd(&self, name: &str) -> bool {
        let needle = format!("/memfd:{name} ");
        let needle_end = format!("/memfd:{name}");
        std::fs::read_to_string(format!("/proc/{}/maps", self.pid()))
            .map(|m| {
                m.lines()
                    .any(|l| l.contains(&needle) || l.ends_with(&needle_end))
            })
            .unwrap_or(false)
    }
}
