//! The operator's side of a running daemon: the stats socket (`--stats-socket PATH`) and live
//! resize (on SIGHUP, or the stats socket's `resize` command).
//!
//! The stats socket is bound at startup, before the sandbox forbids new sockets, and served by
//! its own thread (never a worker): it reads the counters without any lock (see
//! `crate::stats`), so a scrape never makes a worker wait. One connection, one answer:
//!
//! - nothing (the client only reads, or shuts down its side) or `metrics\n`: a snapshot in the
//!   Prometheus text format (version 0.0.4), then the connection is closed;
//! - `resize\n`: re-read the image's size and apply it (see [`Ops::resize`]); the answer is one
//!   line starting with `resize: ` (or `error: `). Only a client of the daemon's own uid or
//!   root may (its SO_PEERCRED); anyone who can connect may read the statistics;
//! - `limits\n`: the I/O limits, one line `limits: ...`; `limits NAME=VALUE...\n` (QEMU's
//!   throttle names, e.g. `limits iops-total=2000 bps-read=20M`) replaces all of them, and
//!   `limits none\n` removes them (the daemon's uid or root only, as resize); the answer is
//!   the limits now, or `error: ` and why, the running limits staying;
//! - an HTTP request line (`GET /metrics`, `GET /`, `POST /resize`, `GET /limits`,
//!   `POST /limits?iops-total=2000&bps-read=20M`): the same answers with an
//!   HTTP/1.0 status line and headers, so that `curl --unix-socket PATH http://x/metrics` or a
//!   TCP-to-unix proxy in front of Prometheus can scrape it.
//!
//! A client that sends nothing gets its snapshot after [`FIRST_LINE_WAIT`]; one that sends a
//! line or shuts down its writing side gets it at once. Clients are served one at a time, each
//! bounded by socket timeouts, so a stuck client delays the next scrape by seconds at most.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use crate::config::SECTOR_SIZE;
use crate::error::{ResizeError, StartupError};
use crate::image::Image;
use crate::queues::{Notified, Queues};
use crate::stats::{DeviceInfo, DeviceStats};
use crate::throttle::{IoLimits, LimitsError, Throttle};

/// How long a stats client has to send its request line before it is taken to want metrics.
pub const FIRST_LINE_WAIT: Duration = Duration::from_millis(500);
/// Bound on reading a request and writing an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request line read.
const MAX_LINE: usize = 4096;

/// What the daemon's operator-facing threads (signals, stats) share.
pub struct Ops {
    image: Arc<Image>,
    stats: Arc<DeviceStats>,
    throttle: Arc<Throttle>,
    start_time: f64,
    resizes: AtomicU64,
    /// One resize at a time (SIGHUP and the stats socket may ask together).
    resizing: Mutex<()>,
    serving: Serving,
}

/// What the daemon serves now, as the operator's threads (signals, stats) see it; the daemon
/// updates it as VMMs come and go.
#[derive(Default)]
pub struct Serving {
    /// The queues of the current connection (or of the one the daemon waits for).
    queues: Mutex<Option<Arc<Queues>>>,
    /// Whether a VMM is connected now.
    vmm_connected: AtomicBool,
}

impl Serving {
    pub fn set_queues(&self, queues: Option<Arc<Queues>>) {
        *self.queues.lock().unwrap_or_else(|p| p.into_inner()) = queues;
    }

    pub fn queues(&self) -> Option<Arc<Queues>> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_vmm_connected(&self, connected: bool) {
        self.vmm_connected.store(connected, Ordering::Relaxed);
    }

    pub fn vmm_connected(&self) -> bool {
        self.vmm_connected.load(Ordering::Relaxed)
    }
}

impl Ops {
    pub fn new(image: Arc<Image>, stats: Arc<DeviceStats>, throttle: Arc<Throttle>) -> Ops {
        let start_time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Ops {
            image,
            stats,
            throttle,
            start_time,
            resizes: AtomicU64::new(0),
            resizing: Mutex::new(()),
            serving: Serving::default(),
        }
    }

    /// What is being served (the daemon updates it).
    pub fn serving(&self) -> &Serving {
        &self.serving
    }

    /// The device's I/O limits now.
    pub fn limits(&self) -> IoLimits {
        self.throttle.limits()
    }

    /// Replace the device's I/O limits (a refused set leaves the running one): every worker
    /// looks again at once, so a request waiting under the old limits is held, or let go, by
    /// the new ones within its next pass.
    pub fn set_limits(&self, limits: IoLimits) -> Result<IoLimits, LimitsError> {
        self.throttle.set(limits)?;
        if let Some(q) = self.serving.queues() {
            q.wake_workers();
        }
        let now = self.throttle.limits();
        info!("I/O limits: {now}");
        Ok(now)
    }

    /// The device's throttle (its limits and what requests waited).
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// A snapshot of every counter, in the Prometheus text format.
    pub fn metrics(&self) -> String {
        let (waited, waited_seconds) = self.throttle.waits();
        let info = DeviceInfo {
            image: self.image.path.display().to_string(),
            capacity_bytes: self.image.size(),
            read_only: self.image.read_only,
            start_time_seconds: self.start_time,
            vmm_connected: self.serving.vmm_connected(),
            resizes: self.resizes.load(Ordering::Relaxed),
            io_awaited: self.stats.drain.awaited(),
            slow_drains: self.stats.drain.slow(),
            limits: self
                .throttle
                .limits()
                .named()
                .map(|(name, l)| crate::stats::IoLimitInfo {
                    name,
                    rate: l.rate,
                    burst: l.max,
                })
                .collect(),
            throttled_requests: waited,
            throttled_seconds: waited_seconds,
        };
        crate::stats::encode(&self.stats.snapshot(), &info)
    }

    /// Re-read the image's size on the host and serve it: the config space and the limits the
    /// data path enforces change, and the VMM is told (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`)
    /// so that the guest sees the new capacity without a reboot. The rings stay as they are.
    /// A size that is not a multiple of 512 is refused (the capacity stays). A shrink is the
    /// operator's call: requests past the new end fail from now on, and the daemon carries on.
    /// Returns one line for the log and the stats client.
    pub fn resize(&self) -> Result<String, ResizeError> {
        let _one = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let path = &self.image.path;
        let old = self.image.size();
        let new = self
            .image
            .current_size()
            .map_err(|source| ResizeError::Size {
                path: path.clone(),
                source,
                old,
            })?;
        if new % SECTOR_SIZE != 0 {
            return Err(ResizeError::Unaligned {
                path: path.clone(),
                new,
                old,
            });
        }
        if new == old {
            return Ok(format!("capacity unchanged: {new} bytes"));
        }
        self.image.set_size(new);
        self.resizes.fetch_add(1, Ordering::Relaxed);
        let told = match self.serving.queues() {
            Some(b) => b.capacity_changed(),
            None => Notified::NoChannel,
        };
        let shrink = if new < old {
            " (a shrink: requests past the new end now fail)"
        } else {
            ""
        };
        let vmm = match told {
            Notified::Sent => "the VMM was told (config change)".to_string(),
            Notified::NoChannel if self.serving.vmm_connected() => {
                "the VMM gave no backend request channel: the guest sees it when the VMM next \
                 reads the config space"
                    .to_string()
            }
            Notified::NoChannel => "no VMM connected".to_string(),
            Notified::Failed(e) => format!("telling the VMM failed: {e}"),
        };
        Ok(format!(
            "capacity {old} -> {new} bytes ({} sectors){shrink}; {vmm}",
            new / SECTOR_SIZE
        ))
    }

    /// Resize and log the outcome (SIGHUP).
    pub fn resize_and_log(&self) {
        match self.resize() {
            Ok(m) => info!("resize: {m}"),
            Err(e) => error!("resize: {e}"),
        }
    }
}

/// Bind the stats socket (replacing a stale socket file; refusing one a live process listens
/// on), its file created with the permission bits `mode` (`--socket-mode`). Call before the
/// sandbox closes (binding is denied afterwards) and before the daemon's threads start.
pub fn bind_stats_socket(path: &Path, mode: u32) -> Result<UnixListener, StartupError> {
    crate::socket::claim_socket_path(path)?;
    crate::socket::bind_with_mode(path, mode).map_err(|e| StartupError::SocketBind {
        path: path.to_path_buf(),
        source: e,
    })
}

/// The uid of the process at the other end of `conn` (SO_PEERCRED: fixed when it connected).
fn peer_uid(conn: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a client of uid `peer` may resize: the daemon's own uid (`daemon`) or root. Anyone
/// who can connect may read the statistics; changing what the guest sees is the operator's.
pub fn may_resize(peer: u32, daemon: u32) -> bool {
    peer == 0 || peer == daemon
}

/// Serve the stats socket on a thread of its own.
pub fn spawn_stats_server(listener: UnixListener, ops: Arc<Ops>, path: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            crate::sandbox::forbid_ring_registration_or_exit("stats");
            info!("stats: serving {}", path.display());
            loop {
                match listener.accept() {
                    Ok((conn, _)) => serve(&ops, conn),
                    Err(e) => {
                        warn!("stats: accept: {e}");
                        // E.g. out of file descriptors: do not spin.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        error!("cannot start the stats thread: {e}");
    }
}

/// What a stats client asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Metrics,
    Resize,
    /// The I/O limits now.
    Limits,
    /// Replace the I/O limits with these `NAME=VALUE` words (`none`: no limits).
    SetLimits(Vec<String>),
    Unknown(String),
}

/// Parse a client's first line: `(request, whether it spoke HTTP)`. Pure.
pub fn parse_request(line: &str) -> (Request, bool) {
    let line = line.trim_end_matches(['\r', '\n']).trim();
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (None, _) => (Request::Metrics, false),
        (Some("metrics"), None) => (Request::Metrics, false),
        (Some("resize"), None) => (Request::Resize, false),
        (Some("limits"), None) => (Request::Limits, false),
        (Some("limits"), Some(first)) => (
            Request::SetLimits(
                std::iter::once(first)
                    .chain(words)
                    .map(str::to_string)
                    .collect(),
            ),
            false,
        ),
        (Some("GET" | "HEAD"), Some("/" | "/metrics")) => (Request::Metrics, true),
        (Some("POST"), Some("/resize")) => (Request::Resize, true),
        (Some("GET" | "HEAD"), Some("/limits")) => (Request::Limits, true),
        // No words would read as "no limits": removing them takes an explicit `none`.
        (Some("POST"), Some(p)) if p.starts_with("/limits?") && p.len() > "/limits?".len() => (
            Request::SetLimits(
                p["/limits?".len()..]
                    .split('&')
                    .filter(|w| !w.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            true,
        ),
        (Some("GET" | "HEAD" | "POST" | "PUT" | "DELETE"), Some(p)) => {
            (Request::Unknown(p.chars().take(80).collect()), true)
        }
        _ => (Request::Unknown(line.chars().take(80).collect()), false),
    }
}

/// Whether the client may change the daemon (resize, limits): the daemon's uid or root, by
/// SO_PEERCRED; else the HTTP status and the answer that says why not.
fn may_change(conn: &UnixStream, what: &str) -> Result<(), (&'static str, String)> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match peer_uid(conn) {
        Ok(uid) if may_resize(uid, me) => Ok(()),
        Ok(uid) => {
            warn!("{what} (stats socket): refused to uid {uid} (only uid {me} and root)");
            Err((
                "403 Forbidden",
                format!(
                    "error: {what} refused: uid {uid} may read the statistics, but only the \
                     daemon's uid ({me}) and root may change it\n"
                ),
            ))
        }
        Err(e) => {
            warn!("{what} (stats socket): refused: the client's uid is unknown: {e}");
            Err((
                "403 Forbidden",
                format!("error: {what} refused: cannot tell who asked ({e})\n"),
            ))
        }
    }
}

/// The status and body answering `req`.
fn answer(ops: &Ops, req: Request, conn: &UnixStream) -> (&'static str, String) {
    match req {
        Request::Metrics => ("200 OK", ops.metrics()),
        Request::Resize => {
            if let Err(refused) = may_change(conn, "resize") {
                return refused;
            }
            match ops.resize() {
                Ok(m) => {
                    info!("resize (stats socket): {m}");
                    ("200 OK", format!("resize: {m}\n"))
                }
                Err(e) => {
                    error!("resize (stats socket): {e}");
                    ("500 Internal Server Error", format!("error: {e}\n"))
                }
            }
        }
        Request::Limits => ("200 OK", format!("limits: {}\n", ops.limits())),
        Request::SetLimits(words) => {
            if let Err(refused) = may_change(conn, "limits") {
                return refused;
            }
            if words.is_empty() {
                return (
                    "400 Bad Request",
                    format!(
                        "error: no limits given (`none` removes them); the limits stay {}\n",
                        ops.limits()
                    ),
                );
            }
            let parsed = if words == ["none"] {
                Ok(IoLimits::default())
            } else {
                IoLimits::parse_words(words.iter().map(String::as_str))
            };
            match parsed.and_then(|l| ops.set_limits(l)) {
                Ok(now) => ("200 OK", format!("limits: {now}\n")),
                Err(e) => {
                    warn!(
                        "limits (stats socket): refused: {e}; the limits stay {}",
                        ops.limits()
                    );
                    (
                        "400 Bad Request",
                        format!("error: {e}; the limits stay {}\n", ops.limits()),
                    )
                }
            }
        }
        Request::Unknown(what) => (
            "404 Not Found",
            format!(
                "error: unknown request '{what}': send nothing or `metrics` for the metrics, \
                 `resize` to re-read the image size, `limits [NAME=VALUE... | none]` for the I/O \
                 limits (HTTP: GET /metrics, POST /resize, GET /limits, POST \
                 /limits?NAME=VALUE&...)\n"
            ),
        ),
    }
}

fn serve(ops: &Ops, mut conn: UnixStream) {
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let line = read_first_line(&mut conn);
    let (req, http) = parse_request(&line);
    let head_only = http && line.starts_with("HEAD ");
    let (status, body) = answer(ops, req, &conn);
    let mut out = Vec::with_capacity(body.len() + 160);
    if http {
        let _ = write!(
            out,
            "HTTP/1.0 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: \
             close\r\n\r\n",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            body.len()
        );
    }
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    // A client that went away is its own problem.
    let _ = conn.write_all(&out);
}

/// The client's first line: what it sent up to a newline, its EOF, `MAX_LINE` bytes or
/// `FIRST_LINE_WAIT` for the first byte (then `IO_TIMEOUT` for the rest), whichever comes
/// first.
fn read_first_line(conn: &mut UnixStream) -> String {
    let mut buf = Vec::new();
    let first_deadline = Instant::now() + FIRST_LINE_WAIT;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut chunk = [0u8; 512];
    while buf.len() < MAX_LINE && !buf.contains(&b'\n') {
        let until = if buf.is_empty() {
            first_deadline
        } else {
            deadline
        };
        if !wait_readable(conn.as_raw_fd(), until) {
            break;
        }
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Wait until `fd` is readable (or closed) or `deadline`; true if readable.
fn wait_readable(fd: i32, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return true;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_daemons_uid_and_root_may_resize() {
        assert!(may_resize(0, 1000));
        assert!(may_resize(1000, 1000));
        assert!(may_resize(0, 0));
        assert!(!may_resize(65534, 1000));
        assert!(!may_resize(65534, 0));
        assert!(!may_resize(1001, 1000));
    }

    #[test]
    fn a_socket_pairs_peer_is_this_process_uid() {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        // SAFETY: geteuid has no preconditions.
        assert_eq!(peer_uid(&a).expect("SO_PEERCRED"), unsafe {
            libc::geteuid()
        });
    }

    #[test]
    fn requests_parse_raw_and_http() {
        assert_eq!(parse_request(""), (Request::Metrics, false));
        assert_eq!(parse_request("metrics\n"), (Request::Metrics, false));
        assert_eq!(parse_request("resize\r\n"), (Request::Resize, false));
        assert_eq!(
            parse_request("GET /metrics HTTP/1.1\r\n"),
            (Request::Metrics, true)
        );
        assert_eq!(parse_request("GET / HTTP/1.0"), (Request::Metrics, true));
        assert_eq!(
            parse_request("POST /resize HTTP/1.1"),
            (Request::Resize, true)
        );
        assert_eq!(
            parse_request("GET /other HTTP/1.1"),
            (Request::Unknown("/other".into()), true)
        );
        assert_eq!(
            parse_request("resize now"),
            (Request::Unknown("resize now".into()), false)
        );
    }
}
