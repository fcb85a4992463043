//! Writes in flight when a connection ends, or when the daemon is told to exit, land before
//! the next connection is served, before the image lock is released and before the process
//! exits. (When a connection ends, Linux itself also holds each worker thread's exit until the
//! writes it punted to io-wq are done; the daemon's own wait covers what the block layer holds.) The disk is an ext4 filesystem on a loop device that the test freezes (FIFREEZE):
//! every write to it waits until the test thaws it, so the test decides when completions come.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use ringfence_guest_tests::daemon::{Daemon, LoopFs};

/// The daemon, serving an image on the freezable filesystem; its socket lives elsewhere (a
/// frozen filesystem would hold the socket's creation and removal too).
struct Served {
    daemon: Daemon,
    image: PathBuf,
    socket: PathBuf,
    stats: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(fs: &LoopFs) -> Served {
        let dir = tempfile::tempdir().expect("socket dir");
        let image = fs.path().join("disk.img");
        create_image(&image, 8 * MIB, None);
        let socket = dir.path().join("vhost.sock");
        let stats = dir.path().join("stats.sock");
        let image_arg = image.to_str().expect("utf-8 path");
        let stats_arg = stats.to_str().expect("utf-8 path");
        let daemon = Daemon::ringfence_at(
            ringfence_bin(),
            &socket,
            &["--blk-file", image_arg, "--stats-socket", stats_arg],
        );
        Served {
            daemon,
            image,
            socket,
            stats,
            _dir: dir,
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.socket, ClientOpts::default()).expect("connect")
    }

    /// The value of a metric without labels, from the stats socket.
    fn metric(&self, name: &str) -> u64 {
        let mut s = UnixStream::connect(&self.stats).expect("stats socket");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.write_all(b"metrics\n").expect("ask");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    /// Wait (bounded) for the `n`-th line (from 1) of the log holding `needle`; the log up to
    /// it.
    fn wait_for_nth(&self, needle: &str, n: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut from = 0;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .daemon
                .wait_for_log_after(from, left, |l| l.contains(needle))?;
            let log = self.daemon.stderr();
            from = log[from..].find(&line).map(|i| from + i + line.len())?;
        }
        Some(self.daemon.stderr()[..from].to_string())
    }
}

/// Put a write of `data` at `off` in flight on queue 0: submit it, then a read behind it on the
/// same queue, and wait for the read (reads pass a frozen filesystem). The worker takes
/// requests in order, so once the read is back the write has been handed to the kernel.
fn write_in_flight(c: &mut Client, off: u64, data: &[u8]) {
    let q = c.q();
    q.buf()[..data.len()].copy_from_slice(data);
    let ptr = q.buf_ptr(0);
    q.q.write(off, ptr, data.len(), 1, ReqFlags::empty());
    let rptr = q.buf_ptr(data.len());
    q.q.read(0, rptr, 4096, 2, ReqFlags::empty());
    let done = q.wait(1);
    assert_eq!(
        (done[0].user_data, done[0].ret),
        (2, 0),
        "the read behind the write completes, the write does not"
    );
}

/// Whether another process holds a lock on the image (the daemon's OFD lock).
fn image_locked(image: &Path) -> bool {
    let f = std::fs::File::open(image).expect("open image");
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we own.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

#[test]
fn a_new_connection_is_served_only_after_the_last_ones_writes_landed() {
    let fs = LoopFs::new(64 * MIB);
    let b = Served::start(&fs);
    let _thaw = fs.thaw_guard();
    let data = pattern(41, 1 << 20, 64 << 10);
    {
        let mut c = b.connect();
        fs.freeze();
        write_in_flight(&mut c, 1 << 20, &data);
        // The client goes away with its write held by the frozen filesystem.
    }
    assert!(
        b.daemon
            .wait_for_log("waiting for 1 I/O operation(s) in flight", IO_TIMEOUT),
        "the end of the connection must wait for its write:\n{}",
        b.daemon.stderr()
    );
    let connected_before = b.daemon.stderr().matches("VMM connected").count();
    fs.thaw();
    let mut c = b.connect();
    let log = b.daemon.stderr();
    assert_eq!(log.matches("VMM connected").count(), connected_before + 1);
    let waited = log
        .find("waiting for 1 I/O operation(s)")
        .expect("wait logged");
    let second = log.rfind("VMM connected").expect("second connection");
    assert!(waited < second, "served before the writes landed:\n{log}");
    // The old write landed, before anything the new connection does.
    assert_eq!(c.q().read(1 << 20, data.len()).unwrap(), data);
}

#[test]
fn exit_waits_for_writes_in_flight_before_it_releases_the_image() {
    let fs = LoopFs::new(64 * MIB);
    let mut b = Served::start(&fs);
    let _thaw = fs.thaw_guard();
    let data = pattern(42, 2 << 20, 64 << 10);
    let mut c = b.connect();
    fs.freeze();
    write_in_flight(&mut c, 2 << 20, &data);
    let pid = b.daemon.pid();
    send_signal(pid, libc::SIGTERM);
    assert!(
        b.daemon
            .wait_for_log("waiting for 1 I/O operation(s) in flight", IO_TIMEOUT),
        "exit must wait for the write:\n{}",
        b.daemon.stderr()
    );
    assert!(b.daemon.is_alive(), "exited with a write in flight");
    assert!(
        image_locked(&b.image),
        "lock released with a write in flight"
    );
    fs.thaw();
    assert!(
        wait_pid_exit(pid, EXIT_TIMEOUT),
        "no exit after the write landed"
    );
    drop(c);
    assert_same(
        "image",
        2 << 20,
        &read_file_at(&b.image, 2 << 20, data.len()),
        &data,
    );
}

/// Wait (bounded) until process `pid` is gone or exiting: its main thread is a zombie, so
/// every thread of it has been told to exit and none runs the daemon's code any more.
fn wait_exiting(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            // The state follows the command name in parentheses.
            Ok(stat) if stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')) => {
                return true
            }
            Ok(_) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Not a synchronisation by time: the loop ends on the observed state; this only
        // spaces out the looks at /proc.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The daemon warns every 10 s while it waits (`DRAIN_WARN_INTERVAL`); a wait is bounded by
/// three of them, so that a daemon that never warns fails here.
const PAST_THE_WARNINGS: Duration = Duration::from_secs(40);

/// Issue 21, item 4: a write held far past the warning interval (and past any timeout the
/// daemon had: the old one served the next VMM 60 s later) keeps the next connection waiting,
/// warned about and counted, until the write has landed.
#[test]
fn a_write_held_past_the_warnings_keeps_the_next_connection_waiting() {
    let fs = LoopFs::new(64 * MIB);
    let b = Served::start(&fs);
    let _thaw = fs.thaw_guard();
    let data = pattern(43, 3 << 20, 64 << 10);
    {
        let mut c = b.connect();
        fs.freeze();
        write_in_flight(&mut c, 3 << 20, &data);
    }
    let connected = b.daemon.stderr().matches("VMM connected").count();
    // The next VMM connects now and reads where the held write goes, once it is served.
    let socket = b.socket.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut c = Client::connect(&socket, ClientOpts::default()).expect("connect");
        let _ = tx.send(c.q().read(3 << 20, 64 << 10));
    });
    let warning = "still waiting for 1 I/O operation(s) in flight";
    // The wait shows in the statistics at once (within its first second).
    assert!(
        b.daemon
            .wait_for_log("waiting for 1 I/O operation(s) in flight", IO_TIMEOUT),
        "{}",
        b.daemon.stderr()
    );
    assert!(
        b.wait_for_nth("waiting for 1 I/O operation(s) in flight", 2, IO_TIMEOUT)
            .is_some(),
        "no second look at the I/O in flight:\n{}",
        b.daemon.stderr()
    );
    assert_eq!(b.metric("ringfence_io_awaited"), 1);
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the next VMM got an answer with the write in flight"
    );
    assert!(
        b.wait_for_nth(warning, 1, PAST_THE_WARNINGS).is_some(),
        "no warning while the write is held:\n{}",
        b.daemon.stderr()
    );
    assert_eq!(b.metric("ringfence_io_awaited"), 1);
    assert_eq!(b.metric("ringfence_slow_drains_total"), 1);
    // A second warning, one interval later: still nobody served.
    let log = b
        .wait_for_nth(warning, 2, PAST_THE_WARNINGS)
        .unwrap_or_else(|| panic!("no second warning:\n{}", b.daemon.stderr()));
    assert_eq!(
        log.matches("VMM connected").count(),
        connected,
        "the next VMM was served with the write in flight:\n{log}"
    );
    assert!(
        matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the next VMM got an answer with the write in flight"
    );
    fs.thaw();
    let got = rx
        .recv_timeout(IO_TIMEOUT)
        .expect("the next VMM is served once the write landed")
        .expect("read");
    assert_same("what the next VMM reads", 3 << 20, &got, &data);
    assert_eq!(b.metric("ringfence_io_awaited"), 0);
}

/// Issue 21, item 4: SIGTERM with a write held past its wait (`EXIT_WAIT`, 10 s) leaves the
/// process without releasing the image: the lock stays (with the rings) until the write has
/// landed, and is gone only after.
#[test]
fn exit_with_a_write_held_past_its_wait_does_not_release_the_image() {
    let fs = LoopFs::new(64 * MIB);
    let b = Served::start(&fs);
    let _thaw = fs.thaw_guard();
    let data = pattern(44, 4 << 20, 64 << 10);
    let mut c = b.connect();
    fs.freeze();
    write_in_flight(&mut c, 4 << 20, &data);
    let pid = b.daemon.pid();
    send_signal(pid, libc::SIGTERM);
    assert!(
        b.daemon.wait_for_log(
            "exiting with 1 I/O operation(s) still in flight",
            PAST_THE_WARNINGS
        ),
        "exit past its wait must say so:\n{}",
        b.daemon.stderr()
    );
    // The process exits (Linux holds the end of its exit until the write lands): once its
    // main thread is gone, nothing of the daemon's own code runs any more.
    assert!(
        wait_exiting(pid, EXIT_TIMEOUT),
        "the process did not exit:\n{}",
        b.daemon.stderr()
    );
    assert!(
        image_locked(&b.image),
        "the image lock was released with a write in flight"
    );
    // Another process that wants the image waits for the lock; it gets it only after the
    // write has landed.
    let (tx, rx) = mpsc::channel();
    let image = b.image.clone();
    let landed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = landed.clone();
    std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .expect("open image");
        // SAFETY: an all-zero flock is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_OFD_SETLKW reads the flock struct we own; it blocks until granted.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLKW, &fl) };
        let _ = tx.send((rc, seen.load(std::sync::atomic::Ordering::SeqCst)));
    });
    landed.store(true, std::sync::atomic::Ordering::SeqCst);
    fs.thaw();
    let (rc, after_thaw) = rx
        .recv_timeout(EXIT_TIMEOUT)
        .expect("the lock is free once the write landed and the process is gone");
    assert_eq!(rc, 0, "F_OFD_SETLKW");
    assert!(
        after_thaw,
        "the lock was granted before the write could land"
    );
    assert!(wait_pid_exit(pid, EXIT_TIMEOUT), "no exit after the write");
    drop(c);
    assert_same(
        "image",
        4 << 20,
        &read_file_at(&b.image, 4 << 20, data.len()),
        &data,
    );
}
