//! Live migration of a real QEMU guest between two QEMU processes on one host (see
//! `tests/migration.rs`).
//!
//! One run: a source QEMU and a destination QEMU (`-incoming defer`, then QMP
//! `migrate-incoming` on a unix socket), each with its own backend on the same disk image, the
//! guest's RAM in a shared memfd, `-smp 2` and two queues. The guest (guest-init.sh's `migrate`
//! scenario) runs fio rounds (random writes of 4k-128k verified with crc32c) and `holdbuf`
//! (`qemu/holdbuf.c`), which reads a region of known content with O_DIRECT into a buffer and
//! keeps it. The host drives everything through events: console lines of the guest, QMP answers
//! and events (`MIGRATION`, `MIGRATION_PASS`, `RESUME`), and the guest's second serial port
//! (`/dev/ttyS1`, a unix socket on the host) to give holdbuf its words `read` and `check`.
//!
//! Backends: QEMU's own `virtio-blk-pci` (the reference: no vhost-user at all),
//! qemu-storage-daemon's vhost-user-blk export, and ringfence (the destination with
//! `--incoming`).
//!
//! QEMU, its accelerator options and the guest kernel's parameters are a [`Setup`]: the test
//! measured which settings make TCG migration reliable (see `tests/migration.rs`).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::{workspace_root, Daemon};

pub const MIB: u64 = 1 << 20;
/// The disk: fio uses [64 MiB, 120 MiB) (guest-init.sh), the held region lies below.
pub const DISK_SIZE: u64 = 128 * MIB;
/// The region holdbuf reads and keeps, seeded by the host with `pattern MIG:<seed>`.
pub const HOLD_OFF: u64 = 8 * MIB;
pub const HOLD_LEN: u64 = 4 * MIB;
/// MiB of its own memory that holdbuf dirties every 10 ms until its read has landed.
pub const SWEEP_MIB: u64 = 32;
/// Each fio job's share per round (two jobs, one per queue).
pub const FIO_MB: u64 = 16;
/// Migration bandwidth while the host holds the migration back (until holdbuf's read): below
/// holdbuf's dirty rate, so QEMU keeps iterating.
pub const HOLD_BANDWIDTH: u64 = 64 * MIB;
/// Downtime limit while holding: its threshold (bandwidth x limit) is far below what holdbuf
/// dirties between two passes.
pub const HOLD_DOWNTIME_MS: u64 = 50;
/// Bandwidth once released and for the measured runs: more than a unix socket carries here,
/// i.e. unlimited in effect.
pub const FREE_BANDWIDTH: u64 = 4096 * MIB;
/// QEMU's default downtime limit.
pub const FREE_DOWNTIME_MS: u64 = 300;

/// What serves the guest's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// QEMU's own virtio-blk-pci on a `file` node: no vhost-user.
    Reference,
    /// qemu-storage-daemon's vhost-user-blk export (one daemon per QEMU, `locking=off`).
    Qsd,
    /// ringfence from this binary; the destination's daemon gets `--incoming`.
    Ringfence(PathBuf),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Reference => "virtio-blk (reference)",
            Backend::Qsd => "qemu-storage-daemon",
            Backend::Ringfence(_) => "ringfence",
        }
    }

    /// The serial the guest sees.
    fn serial(&self) -> &'static str {
        match self {
            Backend::Qsd => "vhost_user_blk",
            _ => "rf-mig",
        }
    }
}

/// QEMU and guest settings of a run.
#[derive(Clone, Debug)]
pub struct Setup {
    pub qemu: String,
    /// `-accel` value, e.g. `tcg` or `tcg,thread=single`.
    pub accel: String,
    pub cpu: String,
    /// `-machine` type (the memory backend is added).
    pub machine: String,
    pub smp: u16,
    pub mem_mib: u64,
    pub kernel: String,
    pub initrd: String,
    /// Extra guest kernel parameters.
    pub append: String,
    /// Extra QEMU arguments (both QEMUs).
    pub extra: Vec<String>,
    /// Extra migration capabilities to enable (besides `events`).
    pub caps: Vec<String>,
    /// `memory-backend-memfd,share=on` (vhost-user needs it; the reference may go without).
    pub shared_memory: bool,
}

impl Setup {
    /// The settings this project uses (see tests/migration.rs for what was measured), with the
    /// assets from prepare-assets.sh. Environment overrides for experiments:
    /// `RINGFENCE_MIG_QEMU`, `..._ACCEL`, `..._CPU`, `..._MACHINE`, `..._APPEND` (replaces the
    /// extra kernel parameters), `..._EXTRA` (space-separated QEMU arguments), `..._CAPS`,
    /// `..._KERNEL`, `..._INITRD`, `..._PRIVATE_RAM=1` (reference only).
    pub fn from_env(assets: &Assets) -> Setup {
        let (kernel, initrd) = (assets.kernel.as_str(), assets.initrd.as_str());
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        let words = |s: String| -> Vec<String> { s.split_whitespace().map(String::from).collect() };
        Setup {
            qemu: var("RINGFENCE_MIG_QEMU", &assets.qemu),
            accel: var("RINGFENCE_MIG_ACCEL", DEFAULT_ACCEL),
            cpu: var("RINGFENCE_MIG_CPU", DEFAULT_CPU),
            machine: var("RINGFENCE_MIG_MACHINE", "q35"),
            smp: 2,
            mem_mib: 512,
            kernel: var("RINGFENCE_MIG_KERNEL", kernel),
            initrd: var("RINGFENCE_MIG_INITRD", initrd),
            append: var("RINGFENCE_MIG_APPEND", DEFAULT_APPEND),
            extra: words(var("RINGFENCE_MIG_EXTRA", DEFAULT_EXTRA)),
            caps: words(var("RINGFENCE_MIG_CAPS", "")),
            shared_memory: std::env::var("RINGFENCE_MIG_PRIVATE_RAM").as_deref() != Ok("1"),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} -accel {} -cpu {} -machine {} {}{}; kernel {} [{}]{}",
            self.qemu,
            self.accel,
            self.cpu,
            self.machine,
            self.extra.join(" "),
            if self.shared_memory {
                ""
            } else {
                " (private RAM)"
            },
            Path::new(&self.kernel)
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            self.append,
            if self.caps.is_empty() {
                String::new()
            } else {
                format!("; caps {}", self.caps.join(","))
            }
        )
    }
}

/// The defaults (what the measurements chose; see tests/migration.rs).
pub const DEFAULT_ACCEL: &str = "tcg";
pub const DEFAULT_CPU: &str = "max";
pub const DEFAULT_APPEND: &str = "";
pub const DEFAULT_EXTRA: &str = "";

/// What a run does around the migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Migrate under load, holding the migration until holdbuf's read has landed: the full
    /// check.
    Complete,
    /// As `Complete`, then `migrate_cancel` while QEMU still copies RAM: the VM goes on on the
    /// source.
    Cancel,
    /// As `Complete`, then SIGKILL the destination QEMU while QEMU still copies RAM.
    KillDestination,
    /// As `Complete`, with `pause-before-switchover`: once the source has stopped the VM (and its
    /// device) SIGKILL the destination and let the source go on: the switchover fails and the
    /// VM resumes on the source, whose backend must take the image back.
    KillDestinationAtSwitchover,
    /// A plain migration for the figures: holdbuf reads before it starts, default downtime
    /// limit, bandwidth unlimited; `busy` runs fio through it.
    Measure { busy: bool },
}

impl Plan {
    pub fn name(&self) -> &'static str {
        match self {
            Plan::Complete => "complete",
            Plan::Cancel => "cancel",
            Plan::KillDestination => "kill-destination",
            Plan::KillDestinationAtSwitchover => "kill-destination-at-switchover",
            Plan::Measure { busy: false } => "measure-idle",
            Plan::Measure { busy: true } => "measure-busy",
        }
    }

    fn busy(&self) -> bool {
        !matches!(self, Plan::Measure { busy: false })
    }
}

/// The outcome of one run.
#[derive(Debug, Default)]
pub struct Report {
    /// Everything that went wrong; empty when the run passed.
    pub problems: Vec<String>,
    /// A short classification for tables: `pass`, or where it failed.
    pub outcome: String,
    /// query-migrate's final status on the source.
    pub status: String,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Consoles, QEMU and backend output, for failure messages.
    pub transcript: String,
    /// The backends' stderr (ringfence, qemu-storage-daemon; empty for the reference).
    pub source_backend_log: String,
    pub destination_backend_log: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Event plumbing: a growing text (console, stderr) whose lines are signalled as they arrive.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Text {
    text: Mutex<String>,
    cv: Condvar,
    closed: Mutex<bool>,
}

impl Text {
    fn follow(self: &Arc<Self>, from: impl Read + Send + 'static, echo: Option<String>) {
        let me = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                if let Some(tag) = &echo {
                    eprintln!("[{tag}] {line}");
                }
                let mut t = me.text.lock().unwrap_or_else(|p| p.into_inner());
                t.push_str(&line);
                t.push('\n');
                drop(t);
                me.cv.notify_all();
            }
            *me.closed.lock().unwrap_or_else(|p| p.into_inner()) = true;
            me.cv.notify_all();
        });
    }

    /// Wait (at most `timeout`) until `done(text, closed)` answers; `false` at the deadline.
    fn wait_on(&self, timeout: Duration, done: impl Fn(&str, bool) -> Option<bool>) -> bool {
        let deadline = Instant::now() + timeout;
        let mut t = self.text.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let closed = *self.closed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = done(&t, closed) {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            t = self
                .cv
                .wait_timeout(t, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wait (at most `timeout`) until the stream has ended.
    fn wait_closed(&self, timeout: Duration) -> bool {
        self.wait_on(timeout, |_, closed| closed.then_some(true))
    }

    fn get(&self) -> String {
        self.text.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Wait (at most `timeout`) until the text holds `needle`; `false` if it does not by then
    /// or the stream ended without it.
    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_on(timeout, |t, closed| {
            if t.contains(needle) {
                Some(true)
            } else {
                closed.then_some(false)
            }
        })
    }
}

/// Accept one connection on `l` within `timeout`.
fn accept(l: &UnixListener, timeout: Duration) -> std::io::Result<UnixStream> {
    let mut pfd = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "nobody connected",
        ));
    }
    let (s, _) = l.accept()?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// QMP
// ---------------------------------------------------------------------------------------------

/// A QMP connection (QEMU connects to a socket the test listens on).
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    events: Vec<Value>,
    /// Every message received, for transcripts.
    pub log: Vec<String>,
}

impl Qmp {
    fn new(stream: UnixStream) -> Result<Qmp, String> {
        let mut q = Qmp {
            stream,
            buf: Vec::new(),
            events: Vec::new(),
            log: Vec::new(),
        };
        let greeting = q.read_msg(Duration::from_secs(30))?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_msg(&mut self, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if text.is_empty() {
                    continue;
                }
                self.log.push(text.clone());
                return serde_json::from_str(&text).map_err(|e| format!("QMP: {e}: {text}"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err("QMP: no message in time".into());
            }
            self.stream
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| e.to_string())?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("QMP: connection closed".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err("QMP: no message in time".into())
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("QMP: {e}")),
            }
        }
    }

    /// Run a command; its `return`, or the error.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": cmd, "arguments": args});
        self.stream
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| format!("QMP {cmd}: {e}"))?;
        loop {
            let v = self.read_msg(Duration::from_secs(60))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {e}"));
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Wait for an event that `pred` accepts (events that came with command answers count);
    /// also returns early with `Err` when `stop` accepts one.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(&mut pred) {
                return Ok(self.events.remove(i));
            }
            self.events.clear();
            let now = Instant::now();
            if now >= deadline {
                return Err("no such event in time".into());
            }
            let v = self.read_msg(deadline - now)?;
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

fn event_is(v: &Value, name: &str) -> bool {
    v.get("event").and_then(Value::as_str) == Some(name)
}

fn migration_status(v: &Value) -> Option<&str> {
    if !event_is(v, "MIGRATION") {
        return None;
    }
    v.pointer("/data/status").and_then(Value::as_str)
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A child process killed on drop, with its output followed.
struct Proc {
    name: String,
    child: Child,
    out: Arc<Text>,
    err: Arc<Text>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, echo: bool) -> Result<Proc, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours:
        // a test that dies (even by SIGKILL) takes its QEMUs and daemons with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn {name}: {e}"))?;
        let out = Arc::new(Text::default());
        let err = Arc::new(Text::default());
        if let Some(o) = child.stdout.take() {
            out.follow(o, echo.then(|| name.to_string()));
        }
        if let Some(e) = child.stderr.take() {
            err.follow(e, echo.then(|| format!("{name} stderr")));
        }
        Ok(Proc {
            name: name.into(),
            child,
            out,
            err,
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Wait for the process to exit on its own (bounded: killed after `timeout`). The event is
    /// the end of its stdout, which QEMU closes only by exiting.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        if self.out.wait_closed(timeout) {
            return self.child.wait().ok();
        }
        self.kill();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One QEMU: its console (ttyS0, stdout), QMP, and the control port (ttyS1).
struct Vm {
    proc: Proc,
    qmp: Qmp,
    ctl: UnixStream,
}

impl Vm {
    fn console(&self) -> &Arc<Text> {
        &self.proc.out
    }

    fn say(&mut self, word: &str) -> Result<(), String> {
        self.ctl
            .write_all(format!("{word}\n").as_bytes())
            .map_err(|e| {
                format!(
                    "{}: writing '{word}' to the control port: {e}",
                    self.proc.name
                )
            })
    }
}

/// A backend process (ringfence, qemu-storage-daemon) for one QEMU; nothing for the reference.
enum Served {
    None,
    Ringfence(Daemon),
    Qsd(Proc, #[allow(dead_code)] UnixStream),
}

impl Served {
    fn stderr(&self) -> String {
        match self {
            Served::None => String::new(),
            Served::Ringfence(d) => d.stderr(),
            Served::Qsd(p, _) => p.err.get(),
        }
    }

    /// Lines that show the backend complained.
    fn complaints(&self) -> Vec<String> {
        let text = self.stderr();
        text.lines()
            .filter(|l| match self {
                Served::Ringfence(_) => {
                    let l = l.to_ascii_lowercase();
                    l.contains("[ringfence warn") || l.contains("[ringfence error")
                }
                Served::Qsd(..) => l.contains("warning") || l.contains("error"),
                Served::None => false,
            })
            .map(String::from)
            .collect()
    }
}

struct Run<'a> {
    backend: &'a Backend,
    setup: &'a Setup,
    dir: &'a Path,
    image: PathBuf,
    echo: bool,
}

impl Run<'_> {
    fn start_backend(&self, role: &str, incoming: bool) -> Result<Served, String> {
        let socket = self.dir.join(format!("{role}-vhost.sock"));
        let image = self.image.to_str().ok_or("non-UTF-8 temp path")?;
        match self.backend {
            Backend::Reference => Ok(Served::None),
            Backend::Ringfence(bin) => {
                let mut args = vec![
                    "--blk-file",
                    image,
                    "--num-queues",
                    "2",
                    "--serial",
                    self.backend.serial(),
                ];
                if incoming {
                    args.push("--incoming");
                }
                Ok(Served::Ringfence(Daemon::ringfence_at(bin, &socket, &args)))
            }
            Backend::Qsd => {
                // Readiness: qemu-storage-daemon handles its options in order, so it connects
                // its monitor (the last option) to our listener once the export exists.
                let mon_path = self.dir.join(format!("{role}-qsd-mon.sock"));
                let mon = UnixListener::bind(&mon_path).map_err(|e| e.to_string())?;
                let mut cmd = Command::new("qemu-storage-daemon");
                cmd.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=file0,filename={image},cache.direct=on,aio=io_uring,locking=off"
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues=2",
                        socket.display()
                    ))
                    .arg("--chardev")
                    .arg(format!("socket,id=mon0,path={}", mon_path.display()))
                    .arg("--monitor")
                    .arg("chardev=mon0");
                let p = Proc::spawn(&format!("{role} qsd"), &mut cmd, self.echo)?;
                let s = accept(&mon, Duration::from_secs(60)).map_err(|e| {
                    format!(
                        "qemu-storage-daemon ({role}) not ready: {e}; stderr: {}",
                        p.err.get()
                    )
                })?;
                Ok(Served::Qsd(p, s))
            }
        }
    }

    fn start_qemu(&self, role: &str, incoming: bool, params: &str) -> Result<Vm, String> {
        let s = self.setup;
        let qmp_path = self.dir.join(format!("{role}-qmp.sock"));
        let ctl_path = self.dir.join(format!("{role}-ctl.sock"));
        let qmp_l = UnixListener::bind(&qmp_path).map_err(|e| e.to_string())?;
        let ctl_l = UnixListener::bind(&ctl_path).map_err(|e| e.to_string())?;
        let mem = format!("{}M", s.mem_mib);
        let mut cmd = Command::new(&s.qemu);
        cmd.arg("-accel").arg(&s.accel).arg("-cpu").arg(&s.cpu);
        if s.shared_memory || !matches!(self.backend, Backend::Reference) {
            cmd.arg("-machine")
                .arg(format!("{},memory-backend=mem", s.machine))
                .arg("-object")
                .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"));
        } else {
            cmd.arg("-machine").arg(&s.machine);
        }
        cmd.arg("-m")
            .arg(&mem)
            .arg("-smp")
            .arg(s.smp.to_string())
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .args(["-serial", "stdio"])
            .arg("-chardev")
            .arg(format!("socket,id=ctl0,path={}", ctl_path.display()))
            .args(["-serial", "chardev:ctl0"])
            .arg("-qmp")
            .arg(format!("unix:{}", qmp_path.display()));
        let image = self.image.display();
        match self.backend {
            Backend::Reference => {
                cmd.arg("-blockdev")
                    .arg(format!(
                        "driver=file,node-name=disk0,filename={image},cache.direct=on,aio=threads"
                    ))
                    .arg("-device")
                    .arg("virtio-blk-pci,drive=disk0,num-queues=2,serial=rf-mig");
            }
            Backend::Qsd | Backend::Ringfence(_) => {
                cmd.arg("-chardev")
                    .arg(format!(
                        "socket,id=vub0,path={}",
                        self.dir.join(format!("{role}-vhost.sock")).display()
                    ))
                    .arg("-device")
                    .arg("vhost-user-blk-pci,chardev=vub0,num-queues=2");
            }
        }
        cmd.args(&s.extra);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.arg("-kernel")
            .arg(&s.kernel)
            .arg("-initrd")
            .arg(&s.initrd)
            .arg("-append")
            .arg(params);
        let mut proc = Proc::spawn(role, &mut cmd, self.echo)?;
        let qmp = accept(&qmp_l, Duration::from_secs(60))
            .map_err(|e| e.to_string())
            .and_then(Qmp::new);
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                proc.kill();
                return Err(format!(
                    "{role} QEMU: no QMP: {e}; stderr: {}",
                    proc.err.get()
                ));
            }
        };
        let ctl = accept(&ctl_l, Duration::from_secs(60))
            .map_err(|e| format!("{role} QEMU: no control port connection: {e}"))?;
        Ok(Vm { proc, qmp, ctl })
    }
}

/// `pattern TAG LEN` of guest-init.sh: `TAG\n` repeated, cut at `len`.
pub fn pattern(tag: &str, len: u64) -> Vec<u8> {
    format!("{tag}\n")
        .bytes()
        .cycle()
        .take(len as usize)
        .collect()
}

/// 64-bit FNV-1a, as holdbuf prints it.
pub fn fnv1a(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((u64::from(std::process::id()) << 20) ^ u64::from(nanos)) % 1_000_000_007
}

/// Bounds of the waits of a run (failure detectors, not synchronisation).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub boot: Duration,
    pub migration: Duration,
    pub finish: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            boot: Duration::from_secs(240),
            migration: Duration::from_secs(300),
            finish: Duration::from_secs(240),
        }
    }
}

/// Run one migration of `plan` with `backend` under `setup`.
pub fn run(backend: &Backend, setup: &Setup, plan: Plan, limits: Limits) -> Report {
    let started = Instant::now();
    let mut report = Report::default();
    let dir = match tempfile::Builder::new().prefix("rf-migrate-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            report.problems.push(format!("temp dir: {e}"));
            report.outcome = "setup".into();
            return report;
        }
    };
    let image = dir.path().join("disk.img");
    let echo = std::env::var_os("RINGFENCE_TEST_LOG").is_some();
    let r = Run {
        backend,
        setup,
        dir: dir.path(),
        image,
        echo,
    };
    let mut st = State::default();
    let res = drive(&r, plan, limits, &mut report, &mut st);
    if let Err((stage, msg)) = res {
        report.outcome = stage.to_string();
        report.problems.push(msg);
    }
    // Collect.
    for vm in [&mut st.src, &mut st.dst].into_iter().flatten() {
        vm.proc.wait_exit(Duration::from_secs(0));
    }
    let mut t = String::new();
    for (role, vm) in [("source", &st.src), ("destination", &st.dst)] {
        if let Some(vm) = vm {
            let con: Vec<String> = vm.console().get().lines().map(String::from).collect();
            t.push_str(&format!(
                "--- {role} console (last 80 lines) ---\n{}\n--- {role} QEMU stderr ---\n{}\n",
                con[con.len().saturating_sub(80)..].join("\n"),
                vm.proc.err.get()
            ));
            let q = &vm.qmp.log;
            t.push_str(&format!(
                "--- {role} QMP (last 25 messages) ---\n{}\n",
                q[q.len().saturating_sub(25)..].join("\n")
            ));
        }
    }
    for (role, b) in [("source", &st.src_b), ("destination", &st.dst_b)] {
        if let Some(b) = b {
            let e: Vec<String> = b.stderr().lines().map(String::from).collect();
            if !e.is_empty() {
                t.push_str(&format!(
                    "--- {role} backend stderr (last 40 lines) ---\n{}\n",
                    e[e.len().saturating_sub(40)..].join("\n")
                ));
            }
            for c in b.complaints() {
                report
                    .problems
                    .push(format!("the {role} backend complained: {c}"));
                if report.outcome.is_empty() {
                    report.outcome = "backend warning".into();
                }
            }
        }
    }
    report.transcript = t;
    report.source_backend_log = st.src_b.as_ref().map(Served::stderr).unwrap_or_default();
    report.destination_backend_log = st.dst_b.as_ref().map(Served::stderr).unwrap_or_default();
    if report.problems.is_empty() {
        report.outcome = "pass".into();
    } else if report.outcome.is_empty() {
        report.outcome = "checks".into();
    }
    report.elapsed = started.elapsed();
    report
}

#[derive(Default)]
struct State {
    src: Option<Vm>,
    dst: Option<Vm>,
    src_b: Option<Served>,
    dst_b: Option<Served>,
}

type Step<T> = Result<T, (&'static str, String)>;

fn at<T>(stage: &'static str, r: Result<T, String>) -> Step<T> {
    r.map_err(|e| (stage, e))
}

fn need(stage: &'static str, ok: bool, msg: impl FnOnce() -> String) -> Step<()> {
    if ok {
        Ok(())
    } else {
        Err((stage, msg()))
    }
}

fn drive(r: &Run, plan: Plan, limits: Limits, report: &mut Report, st: &mut State) -> Step<()> {
    let seed = seed();
    let original = pattern(&format!("MIG:{seed}"), HOLD_LEN);
    let replaced = pattern(&format!("MIG2:{seed}"), HOLD_LEN);
    let img = at(
        "setup",
        File::create(&r.image)
            .and_then(|f| {
                f.set_len(DISK_SIZE)?;
                f.write_all_at(&original, HOLD_OFF)?;
                f.sync_all()
            })
            .map_err(|e| format!("image: {e}")),
    );
    img?;

    st.src_b = Some(at("setup", r.start_backend("source", false))?);
    st.dst_b = Some(at("setup", r.start_backend("destination", true))?);

    let sweep = if matches!(plan, Plan::Measure { .. }) {
        0
    } else {
        SWEEP_MIB
    };
    let params = format!(
        "console=ttyS0 panic=-1 loglevel=4 mitigations=off rf_scenario=migrate rf_size={DISK_SIZE} \
         rf_lbs=512 rf_nq=2 rf_ro=0 rf_serial={} rf_seed={seed} rf_off={HOLD_OFF} rf_len={HOLD_LEN} \
         rf_fio_mb={FIO_MB} rf_sweep_mb={sweep} rf_fio={} {}",
        r.backend.serial(),
        u8::from(plan.busy()),
        r.setup.append
    );
    st.src = Some(at("setup", r.start_qemu("source", false, &params))?);
    st.dst = Some(at("setup", r.start_qemu("destination", true, &params))?);
    let mig_uri = format!("unix:{}", r.dir.join("migration.sock").display());
    let (Some(src), Some(dst)) = (st.src.as_mut(), st.dst.as_mut()) else {
        return Err(("setup", "no VMs".into()));
    };
    at(
        "setup",
        dst.qmp.execute("migrate-incoming", json!({"uri": mig_uri})),
    )?;

    // The guest booted, holds its (filler) buffer, and its load runs.
    need(
        "boot",
        src.console()
            .wait_for("RINGFENCE-HOLDBUF-FILLED", limits.boot),
        || "the source guest never said RINGFENCE-HOLDBUF-FILLED".into(),
    )?;
    if plan.busy() {
        need(
            "boot",
            src.console()
                .wait_for("RINGFENCE-MIGRATE-FIO-ROUND-START 1", limits.boot),
            || "the guest's fio never started".into(),
        )?;
    }
    let mut caps = vec![json!({"capability": "events", "state": true})];
    for c in &r.setup.caps {
        caps.push(json!({"capability": c, "state": true}));
    }
    if plan == Plan::KillDestinationAtSwitchover {
        caps.push(json!({"capability": "pause-before-switchover", "state": true}));
    }
    at(
        "setup",
        src.qmp
            .execute("migrate-set-capabilities", json!({ "capabilities": caps })),
    )?;

    let hold_hash = fnv1a(&original);
    if let Plan::Measure { .. } = plan {
        at("hold", src.say("read"))?;
        need(
            "hold",
            src.console()
                .wait_for("RINGFENCE-HOLDBUF-HOLDING", limits.finish),
            || "holdbuf never read its region".into(),
        )?;
        at(
            "setup",
            src.qmp.execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": FREE_BANDWIDTH, "downtime-limit": FREE_DOWNTIME_MS}),
            ),
        )?;
        if plan.busy() {
            wait_fresh_round(src, limits.finish)?;
        }
        at(
            "migrate",
            src.qmp.execute("migrate", json!({"uri": mig_uri})),
        )?;
    } else {
        at(
            "setup",
            src.qmp.execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": HOLD_BANDWIDTH, "downtime-limit": HOLD_DOWNTIME_MS}),
            ),
        )?;
        at(
            "migrate",
            src.qmp.execute("migrate", json!({"uri": mig_uri})),
        )?;
        // Every page has been sent once (the buffer with its filler too) when the second
        // dirty-bitmap pass begins.
        let ev = src.qmp.wait_event(limits.migration, |v| {
            (event_is(v, "MIGRATION_PASS")
                && v.pointer("/data/pass").and_then(Value::as_u64) >= Some(2))
                || matches!(
                    migration_status(v),
                    Some("failed" | "cancelled" | "completed" | "pre-switchover")
                )
        });
        let ev = at(
            "migrate",
            ev.map_err(|e| format!("waiting for pass 2: {e}")),
        )?;
        need("migrate", event_is(&ev, "MIGRATION_PASS"), || {
            format!("the migration ended before its second pass: {ev}")
        })?;
        at("hold", src.say("read"))?;
        need(
            "hold",
            src.console()
                .wait_for("RINGFENCE-HOLDBUF-HOLDING", limits.finish),
            || "holdbuf never read its region during the migration".into(),
        )?;
        let q = at("hold", src.qmp.execute("query-migrate", json!({})))?;
        need(
            "hold",
            q.get("status").and_then(Value::as_str) == Some("active"),
            || {
                format!(
                    "the migration was no longer copying RAM when holdbuf's read had landed: {q}"
                )
            },
        )?;
    }

    match plan {
        Plan::Cancel | Plan::KillDestination => {
            if plan == Plan::Cancel {
                at("cancel", src.qmp.execute("migrate_cancel", json!({})))?;
            } else {
                dst.proc.kill();
            }
            let want = if plan == Plan::Cancel {
                "cancelled"
            } else {
                "failed"
            };
            let ev = src.qmp.wait_event(limits.migration, |v| {
                matches!(
                    migration_status(v),
                    Some("failed" | "cancelled" | "completed")
                )
            });
            let ev = at("cancel", ev)?;
            report.status = migration_status(&ev).unwrap_or_default().to_string();
            need("cancel", report.status == want, || {
                format!("the migration ended {ev}, want {want}")
            })?;
            return finish_on(src, None, r, &replaced, &hold_hash, limits, report, plan);
        }
        Plan::KillDestinationAtSwitchover => {
            at(
                "release",
                src.qmp.execute(
                    "migrate-set-parameters",
                    json!({"max-bandwidth": FREE_BANDWIDTH, "downtime-limit": FREE_DOWNTIME_MS}),
                ),
            )?;
            let ev = src.qmp.wait_event(limits.migration, |v| {
                matches!(
                    migration_status(v),
                    Some("failed" | "cancelled" | "completed" | "pre-switchover")
                )
            });
            let ev = at("switchover", ev)?;
            need(
                "switchover",
                migration_status(&ev) == Some("pre-switchover"),
                || format!("want pre-switchover, got {ev}"),
            )?;
            dst.proc.kill();
            at(
                "switchover",
                src.qmp
                    .execute("migrate-continue", json!({"state": "pre-switchover"})),
            )?;
            let ev = src.qmp.wait_event(limits.migration, |v| {
                matches!(
                    migration_status(v),
                    Some("failed" | "cancelled" | "completed")
                )
            });
            let ev = at("switchover", ev)?;
            report.status = migration_status(&ev).unwrap_or_default().to_string();
            need("switchover", report.status == "failed", || {
                format!("want failed, got {ev}")
            })?;
            return finish_on(src, None, r, &replaced, &hold_hash, limits, report, plan);
        }
        Plan::Complete | Plan::Measure { .. } => {}
    }

    if plan == Plan::Complete {
        wait_fresh_round(src, limits.finish)?;
        at(
            "release",
            src.qmp.execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": FREE_BANDWIDTH, "downtime-limit": FREE_DOWNTIME_MS}),
            ),
        )?;
    }
    let ev = src.qmp.wait_event(limits.migration, |v| {
        matches!(
            migration_status(v),
            Some("failed" | "cancelled" | "completed")
        )
    });
    let ev = at("migrate", ev)?;
    let q = at("migrate", src.qmp.execute("query-migrate", json!({})))?;
    report.status = q
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    report.total_time_ms = q.get("total-time").and_then(Value::as_u64);
    report.downtime_ms = q.get("downtime").and_then(Value::as_u64);
    report.setup_time_ms = q.get("setup-time").and_then(Value::as_u64);
    need("migrate", report.status == "completed", || {
        format!("the migration did not complete: {ev}; query-migrate: {q}")
    })?;
    let resumed = dst
        .qmp
        .wait_event(Duration::from_secs(60), |v| event_is(v, "RESUME"));
    at(
        "resume",
        resumed.map_err(|e| format!("the destination never resumed the VM: {e}")),
    )?;
    finish_on(
        dst,
        Some(src),
        r,
        &replaced,
        &hold_hash,
        limits,
        report,
        plan,
    )
}

/// Wait until the guest starts a new fio round on `vm` (one beyond those it has started so
/// far): the switchover that follows within a fraction of a round then falls inside that
/// round, so a round runs through it.
fn wait_fresh_round(vm: &mut Vm, timeout: Duration) -> Step<()> {
    let started = vm
        .console()
        .get()
        .matches("RINGFENCE-MIGRATE-FIO-ROUND-START ")
        .count();
    let next = format!("RINGFENCE-MIGRATE-FIO-ROUND-START {}\n", started + 1);
    if vm.console().wait_for(&next, timeout) {
        return Ok(());
    }
    // Say why: a migration that completed while the host held it back means QEMU lost the
    // guest's own writes to RAM (QEMU 7.2's TCG did).
    let q = vm
        .qmp
        .execute("query-migrate", json!({}))
        .map(|q| q.get("status").cloned().unwrap_or_default().to_string())
        .unwrap_or_else(|e| e);
    Err((
        "load",
        format!(
            "the guest never started fio round {} on the source (migration status: {q})",
            started + 1
        ),
    ))
}

/// After the migration (or its failure): overwrite the held region on disk, tell holdbuf on
/// `vm` (where the guest runs now) to check, wait for the guest to finish, check what it said.
#[allow(clippy::too_many_arguments)]
fn finish_on(
    vm: &mut Vm,
    source: Option<&mut Vm>,
    r: &Run,
    replaced: &[u8],
    hold_hash: &str,
    limits: Limits,
    report: &mut Report,
    plan: Plan,
) -> Step<()> {
    at(
        "finish",
        OpenOptions::new()
            .write(true)
            .open(&r.image)
            .and_then(|f| {
                f.write_all_at(replaced, HOLD_OFF)?;
                f.sync_all()
            })
            .map_err(|e| format!("overwriting the held region: {e}")),
    )?;
    at("finish", vm.say("check"))?;
    let done = vm.console().wait_for("RINGFENCE-DONE", limits.finish);
    need("stall after switchover", done, || {
        format!(
            "the guest did not finish on the {} within {:?} of the host's 'check'",
            if source.is_some() {
                "destination"
            } else {
                "source"
            },
            limits.finish
        )
    })?;
    vm.proc.wait_exit(Duration::from_secs(60));

    // The guest's own checks.
    let con = vm.console().get();
    let src_con = source.as_ref().map(|s| s.console().get());
    let all = format!("{}{}", src_con.clone().unwrap_or_default(), con);
    let mut expected = vec![
        "device",
        "size",
        "logical_block_size",
        "queues",
        "read_only_flag",
        "serial",
        "held_buffer_intact",
        "region_overwritten_by_host",
        "migrate_no_io_errors",
    ];
    if plan.busy() {
        expected.push("migrate_fio_verify");
    }
    for name in expected {
        let tag = format!("RINGFENCE-CHECK {name} ");
        match all
            .lines()
            .find_map(|l| l.find(&tag).map(|p| &l[p + tag.len()..]))
        {
            None => report.problems.push(format!("check {name} did not run")),
            Some(rest) if !rest.starts_with("PASS") => {
                report.problems.push(format!("check {name}: {rest}"))
            }
            Some(_) => {}
        }
    }
    for l in all.lines() {
        if let Some(p) = l.find("RINGFENCE-CHECK ") {
            if l[p..].split(' ').nth(2) == Some("FAIL")
                && !report.problems.iter().any(|x| x.contains(&l[p + 16..]))
            {
                report.problems.push(l[p..].to_string());
            }
        }
    }
    if !all.contains("RINGFENCE-DONE failed=0") {
        report
            .problems
            .push("the guest reported failed checks".into());
    }
    // The host's view of holdbuf's hashes.
    let hash_of = |marker: &str| {
        all.lines()
            .find_map(|l| l.split(marker).nth(1))
            .map(|s| s.trim().to_string())
    };
    let held = hash_of("RINGFENCE-HOLDBUF-HOLDING hash=");
    let after = hash_of("RINGFENCE-HOLDBUF-HASH hash=");
    if held.as_deref() != Some(hold_hash) || after.as_deref() != Some(hold_hash) {
        report.problems.push(format!(
            "holdbuf's buffer: read {held:?}, after {after:?}, want {hold_hash}"
        ));
    }
    if let Some(src_con) = src_con {
        // The read landed on the source, before the switchover; the check ran on the
        // destination.
        if !src_con.contains("RINGFENCE-HOLDBUF-HOLDING")
            || src_con.contains("RINGFENCE-HOLDBUF-HASH")
        {
            report.problems.push(
                "holdbuf's read was not on the source, or its check not on the destination".into(),
            );
        }
        if plan.busy() {
            // A fio round started on the source and ended (verified) on the destination.
            let last_start = src_con
                .lines()
                .filter_map(|l| l.split("RINGFENCE-MIGRATE-FIO-ROUND-START ").nth(1))
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .max();
            match last_start {
                Some(n) if !src_con.contains(&format!("RINGFENCE-MIGRATE-FIO-ROUND-END {n} "))
                    && con.contains(&format!("RINGFENCE-MIGRATE-FIO-ROUND-END {n} PASS")) => {}
                _ => report.problems.push(format!(
                    "no fio round ran through the switchover (last round started on the source: {last_start:?})"
                )),
            }
        }
    }
    Ok(())
}

/// One migration at a time in this process (two QEMUs each; the machines are small).
pub fn slot() -> std::sync::MutexGuard<'static, ()> {
    static SLOT: Mutex<()> = Mutex::new(());
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

/// The guest's kernel and initramfs (prepare-assets.sh) and the migration tests' QEMU
/// (migration-qemu.sh: QEMU 10 from bookworm-backports, extracted, not installed).
#[derive(Clone, Debug)]
pub struct Assets {
    pub kernel: String,
    pub initrd: String,
    pub qemu: String,
}

/// Run the preparing scripts once per test process.
pub fn assets() -> Assets {
    static A: std::sync::OnceLock<Assets> = std::sync::OnceLock::new();
    A.get_or_init(|| {
        let run = |script: &str| {
            let path = workspace_root().join("guest-tests/qemu").join(script);
            let out = Command::new("bash")
                .arg(&path)
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
            assert!(
                out.status.success(),
                "{} failed ({}); see its messages above",
                path.display(),
                out.status
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let text = run("prepare-assets.sh") + &run("migration-qemu.sh");
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
                .to_string()
        };
        Assets {
            kernel: get("RINGFENCE_GUEST_KERNEL"),
            initrd: get("RINGFENCE_GUEST_INITRD"),
            qemu: get("RINGFENCE_MIGRATION_QEMU"),
        }
    })
    .clone()
}
