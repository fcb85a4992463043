//! The seccomp gap, demonstrated against real parts: the `ringfence-seccomp-gap` binary
//! installs a seccomp filter that blocks socket/connect/open*, then submits the same io_uring
//! operations to a plain ring and to a ring from ringfence's builder. These tests own the
//! listener and the directory, and assert on what they saw: a connection and a file through
//! the plain ring, nothing at all through ringfence's ring.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const DEMO: &str = env!("CARGO_BIN_EXE_ringfence-seccomp-gap");
/// Hang detector: the demo finishes in milliseconds; each completion wait inside it is bounded
/// by 10 s.
const DEMO_TIMEOUT: Duration = Duration::from_secs(60);
const PAYLOAD: &str = "written through io_uring despite seccomp\n";
const EACCES: i32 = 13;

/// Run the demo to completion, killing it if it outlives `DEMO_TIMEOUT`.
fn run_bounded(args: &[&str]) -> Output {
    let child = Command::new(DEMO)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringfence-seccomp-gap");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEMO_TIMEOUT) {
        Ok(r) => r.expect("wait for ringfence-seccomp-gap"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped (the
            // waiting thread has not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("ringfence-seccomp-gap {args:?} did not exit within {DEMO_TIMEOUT:?}");
        }
    }
}

/// Run the demo (bounded) and return its stdout; panics with its output unless it exits 0.
fn demo(args: &[&str]) -> String {
    let out = run_bounded(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ringfence-seccomp-gap {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// The `ring=<kind> op=<NAME> res=<N>` lines, by op name.
fn ring_results(out: &str, kind: &str) -> BTreeMap<String, i32> {
    let prefix = format!("ring={kind} op=");
    out.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (op, rest) = rest.split_once(" res=").expect("res= field");
            let res = rest
                .split_whitespace()
                .next()
                .and_then(|r| r.parse().ok())
                .unwrap_or_else(|| panic!("bad result in {rest:?}"));
            (op.to_string(), res)
        })
        .collect()
}

/// The filter was in force, and the syscalls themselves were refused with EPERM.
fn assert_syscalls_blocked(out: &str, names: &[&str]) {
    assert!(
        out.lines()
            .any(|l| l == "seccomp: /proc/self/status Seccomp: 2"),
        "the demo must run in seccomp filter mode:\n{out}"
    );
    for name in names {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("syscall {name}")))
            .unwrap_or_else(|| panic!("no report of {name}:\n{out}"));
        assert!(
            line.contains("errno=1 ") && line.ends_with("blocked by seccomp"),
            "{name} must fail with EPERM: {line}"
        );
    }
}

fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback listener");
    l.set_nonblocking(true).expect("non-blocking listener");
    let port = l.local_addr().expect("local addr").port();
    (l, port)
}

/// Whether a connection is queued on the listener. The demo has exited when this is called:
/// the kernel queues a completed connection at connect time, so the answer is final.
fn pending_connection(l: &TcpListener) -> Option<std::net::SocketAddr> {
    match l.accept() {
        Ok((_, peer)) => Some(peer),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept on the listener: {e}"),
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the temp dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn plain_ring_connects_although_seccomp_blocks_connect() {
    let (l, port) = listener();
    assert_eq!(pending_connection(&l), None, "fresh listener");
    let out = demo(&["connect", "--ring", "plain", "--port", &port.to_string()]);
    assert_syscalls_blocked(&out, &["socket(2)", "connect(2)"]);
    let res = ring_results(&out, "plain");
    assert!(
        res.get("SOCKET").is_some_and(|&fd| fd >= 0),
        "IORING_OP_SOCKET must work on a plain ring:\n{out}"
    );
    assert_eq!(res.get("CONNECT"), Some(&0), "CONNECT:\n{out}");
    let peer = pending_connection(&l)
        .unwrap_or_else(|| panic!("the listener must have received the demo's connection:\n{out}"));
    assert!(peer.ip().is_loopback(), "peer {peer}");
    assert_eq!(pending_connection(&l), None, "exactly one connection");
}

#[test]
fn ringfence_ring_refuses_socket_and_connect() {
    let (l, port) = listener();
    let out = demo(&[
        "connect",
        "--ring",
        "ringfence",
        "--port",
        &port.to_string(),
    ]);
    assert_syscalls_blocked(&out, &["socket(2)", "connect(2)"]);
    let res = ring_results(&out, "ringfence");
    for op in ["SOCKET", "CONNECT", "CONNECT+FIXED_FILE"] {
        assert_eq!(
            res.get(op),
            Some(&-EACCES),
            "{op} on a ringfence ring must complete with -EACCES:\n{out}"
        );
    }
    // The refusals come from the restrictions, not from a dead ring.
    assert_eq!(res.get("READ_FIXED"), Some(&4096), "READ_FIXED:\n{out}");
    assert!(out.contains("READ_FIXED on the image returned the image's bytes"));
    assert_eq!(
        pending_connection(&l),
        None,
        "no connection may reach the listener through a ringfence ring:\n{out}"
    );
}

#[test]
fn plain_ring_creates_a_file_although_seccomp_blocks_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("escaped.txt");
    let p = path.to_str().expect("utf-8 temp path");
    let out = demo(&["openat", "--ring", "plain", "--path", p]);
    assert_syscalls_blocked(&out, &["openat(2)"]);
    assert!(
        out.contains("std::fs::File::create: Operation not permitted"),
        "{out}"
    );
    let res = ring_results(&out, "plain");
    assert!(
        res.get("OPENAT").is_some_and(|&fd| fd >= 0),
        "OPENAT must work on a plain ring:\n{out}"
    );
    assert_eq!(res.get("WRITE"), Some(&(PAYLOAD.len() as i32)), "{out}");
    let content = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{p} must exist after the plain ring opened it ({e}):\n{out}"));
    assert_eq!(content, PAYLOAD);
}

#[test]
fn ringfence_ring_refuses_openat() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("escaped.txt");
    let p = path.to_str().expect("utf-8 temp path");
    let out = demo(&["openat", "--ring", "ringfence", "--path", p]);
    assert_syscalls_blocked(&out, &["openat(2)"]);
    let res = ring_results(&out, "ringfence");
    for op in ["OPENAT", "OPENAT+FIXED_FILE"] {
        assert_eq!(
            res.get(op),
            Some(&-EACCES),
            "{op} on a ringfence ring must complete with -EACCES:\n{out}"
        );
    }
    assert_eq!(res.get("READ_FIXED"), Some(&4096), "READ_FIXED:\n{out}");
    assert!(
        !path.exists(),
        "{p} must not exist: the ringfence ring refused to open it"
    );
    assert_eq!(entries(dir.path()), Vec::<String>::new(), "nothing created");
}

/// Linux 7.0+: the last gap is closed. A plain ring created by a thread of a process that made
/// the daemon's process-wide allowlist call first can neither connect nor open. Before 7.0 the
/// kernel has no task-level restrictions: the demo says so and its ring connects, as the README
/// states (seccomp on worker threads is then what stops them creating rings).
#[test]
fn a_fresh_ring_after_the_process_allowlist() {
    let kernel = ringfence::kernel::Kernel::get();
    let (l, port) = listener();
    let out = demo(&["connect", "--ring", "process", "--port", &port.to_string()]);
    assert_syscalls_blocked(&out, &["socket(2)", "connect(2)"]);
    let res = ring_results(&out, "process");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("escaped.txt");
    let p = path.to_str().expect("utf-8 temp path");
    let out_open = demo(&["openat", "--ring", "process", "--path", p]);
    let res_open = ring_results(&out_open, "process");
    if kernel.at_least(7, 0) {
        assert!(out.contains("process allowlist: installed"), "{out}");
        for op in ["SOCKET", "CONNECT+FIXED_FILE"] {
            assert_eq!(
                res.get(op),
                Some(&-EACCES),
                "{}: {op}:\n{out}",
                kernel.release
            );
        }
        assert_eq!(
            pending_connection(&l),
            None,
            "{}: connected:\n{out}",
            kernel.release
        );
        for op in ["OPENAT", "OPENAT+FIXED_FILE"] {
            assert_eq!(
                res_open.get(op),
                Some(&-EACCES),
                "{}: {op}:\n{out_open}",
                kernel.release
            );
        }
        assert_eq!(entries(dir.path()), Vec::<String>::new(), "nothing created");
    } else {
        assert!(
            out.contains("process allowlist: none on this kernel"),
            "{out}"
        );
        assert_eq!(res.get("CONNECT"), Some(&0), "{out}");
        assert!(pending_connection(&l).is_some(), "{out}");
        assert!(
            res_open.get("OPENAT").is_some_and(|&fd| fd >= 0),
            "{out_open}"
        );
    }
}

#[test]
fn bad_arguments_are_reported_not_panicked() {
    let out = run_bounded(&["connect", "--ring", "bogus", "--port", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'bogus'"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
