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

    /// Start qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`.
    pub fn qemu_storage_daemon(
        socket: &Path,
        image: &Path,
        read_only: bool,
        num_queues: u16,
    ) -> Daemon {
        let pidfile = socket.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let ro = if read_only { "on" } else { "off" };
        let out = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,aio=io_uring,read-only={ro}",
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
