//! Live resize, through real parts: the image grows or shrinks on the host, the daemon is told
//! (SIGHUP, or `ringfence resize` on its stats socket), and then
//! - a vhost-user frontend (the `vhost` crate's, the VMM's side of the protocol) that handed
//!   over a backend request channel receives `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on it and
//!   reads the new capacity with GET_CONFIG;
//! - a virtio-blk driver on the same connection finds requests past the old end served after a
//!   grow, and requests past the new end refused after a shrink, while the daemon carries on.
//!
//! `guest-tests/tests/qemu_guest.rs` has the same with a Linux guest under QEMU.

mod common;

use std::fs::OpenOptions;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

const START: u64 = 8 * MIB;

fn start() -> (Backend, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.sock");
    let b = Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            size: START,
            extra: vec!["--stats-socket".into(), stats.display().to_string()],
            ..BackendOpts::default()
        },
    );
    (b, stats, dir)
}

fn set_len(image: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(image)
        .and_then(|f| f.set_len(len))
        .expect("resize the image on the host");
}

/// SIGHUP the daemon and wait (bounded) for the log line of the resize that holds `expect`;
/// returns that line.
fn sighup(b: &mut Backend, expect: &str) -> String {
    send_signal(b.daemon().pid(), libc::SIGHUP);
    let needle = format!("resize: {expect}");
    let found = b.daemon().wait_for_log(&needle, IO_TIMEOUT);
    assert!(found, "no '{needle}' logged after SIGHUP:\n{}", b.stderr());
    b.stderr()
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default()
        .to_string()
}

fn capacity_sectors(c: &RawClient) -> u64 {
    c.config().capacity.to_native()
}

#[test]
fn the_vmm_is_told_on_its_backend_channel() {
    let (mut b, _stats, _dir) = start();
    let f = Frontend::connect(&b.socket, 1).expect("connect as a VMM");
    // The frontend's waits are unbounded: every exchange runs under `bounded`.
    let (f, offered) = bounded("handshake", move || {
        f.set_owner().unwrap();
        let features = f.get_features().unwrap();
        f.set_features(features).unwrap();
        let mut f = f;
        let offered = f.get_protocol_features().unwrap();
        (f, offered)
    });
    assert!(
        offered.contains(VhostUserProtocolFeatures::BACKEND_REQ),
        "BACKEND_REQ not offered: {offered:?}"
    );
    let (vmm_end, backend_end) = UnixStream::pair().unwrap();
    let f = bounded("SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD", move || {
        let mut f = f;
        f.set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::REPLY_ACK,
        )
        .unwrap();
        f.set_backend_request_fd(&backend_end).unwrap();
        f
    });

    // The capacity in the config space, as GET_CONFIG returns it.
    let config = |f: Frontend| -> (Frontend, u64) {
        bounded("GET_CONFIG", move || {
            let mut f = f;
            let (_, buf) = f
                .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
                .expect("GET_CONFIG");
            (f, u64::from_le_bytes(buf[..8].try_into().unwrap()))
        })
    };
    let (f, capacity) = config(f);
    assert_eq!(capacity, START / 512);

    set_len(&b.image, 2 * START);
    let line = sighup(&mut b, &format!("capacity {START} -> {}", 2 * START));
    assert!(line.contains("the VMM was told (config change)"), "{line}");
    let mut msg = [0u8; 12];
    vmm_end.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    (&vmm_end)
        .read_exact(&mut msg)
        .expect("the config-change message on the backend channel");
    // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (2), version 1, no payload.
    assert_eq!(msg, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let (f, capacity) = config(f);
    assert_eq!(capacity, 2 * START / 512);

    // No change, no message.
    sighup(&mut b, "capacity unchanged");
    vmm_end.set_nonblocking(true).unwrap();
    let mut more = [0u8; 1];
    assert!(
        (&vmm_end).read(&mut more).is_err(),
        "a message for no change"
    );
    assert!(b.is_alive());
    drop(f);
}

#[test]
fn requests_follow_the_capacity_through_grow_and_shrink() {
    let (mut b, stats, _dir) = start();
    let mut c = RawClient::connect(&b.socket).expect("connect");
    let sectors = START / 512;
    assert_eq!(capacity_sectors(&c), sectors);
    let past_old_end = sectors;
    let (st, _) = c.request(VIRTIO_BLK_T_IN, past_old_end, &[], 4096);
    assert_eq!(
        st, VIRTIO_BLK_S_IOERR,
        "read past the end before the resize"
    );

    // Grow (SIGHUP): the same connection may use the new end.
    set_len(&b.image, 2 * START);
    sighup(&mut b, &format!("capacity {START} -> {}", 2 * START));
    assert_eq!(capacity_sectors(&c), 2 * sectors);
    let data = pattern(9, START, 4096);
    let (st, _) = c.request(VIRTIO_BLK_T_OUT, past_old_end, &data, 0);
    assert_eq!(st, VIRTIO_BLK_S_OK, "write past the old end after a grow");
    let (st, back) = c.request(VIRTIO_BLK_T_IN, past_old_end, &[], 4096);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_same("read back past the old end", START, &back, &data);
    assert_same("the image", START, &b.read_image(START, 4096), &data);
    let (st, _) = c.request(VIRTIO_BLK_T_IN, 2 * sectors - 1, &[], 1024);
    assert_eq!(st, VIRTIO_BLK_S_IOERR, "a read that crosses the new end");

    // Shrink (the stats socket's command, as `ringfence resize` sends it) below data in use.
    set_len(&b.image, START / 2);
    let out = run_to_exit(
        Command::new(ringfence_bin())
            .arg("resize")
            .arg("--stats-socket")
            .arg(&stats),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("-> {} bytes", START / 2)) && out.stdout.contains("shrink"),
        "{}",
        out.stdout
    );
    assert_eq!(capacity_sectors(&c), sectors / 2);
    for sector in [past_old_end, sectors / 2] {
        let (st, _) = c.request(VIRTIO_BLK_T_IN, sector, &[], 512);
        assert_eq!(
            st, VIRTIO_BLK_S_IOERR,
            "read at sector {sector} after the shrink"
        );
        let (st, _) = c.request(VIRTIO_BLK_T_OUT, sector, &[7u8; 512], 0);
        assert_eq!(
            st, VIRTIO_BLK_S_IOERR,
            "write at sector {sector} after the shrink"
        );
    }
    let (st, _) = c.request(VIRTIO_BLK_T_IN, sectors / 2 - 1, &[], 512);
    assert_eq!(st, VIRTIO_BLK_S_OK, "the last sector of the shrunk disk");
    assert_eq!(
        std::fs::metadata(&b.image).unwrap().len(),
        START / 2,
        "a refused write grew the image again"
    );

    // A size that is no multiple of 512 is refused; the capacity stays.
    set_len(&b.image, START / 2 + 100);
    let out = run_to_exit(
        Command::new(ringfence_bin())
            .arg("resize")
            .arg("--stats-socket")
            .arg(&stats),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("not a multiple of 512"),
        "{}",
        out.stderr
    );
    assert_eq!(capacity_sectors(&c), sectors / 2);

    // The counters saw it all: two resizes, the refused requests.
    let metrics = ringfence_metrics(&stats);
    assert!(
        metrics.contains("\nringfence_resizes_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nringfence_capacity_bytes 4194304\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringfence_request_errors_total{kind=\"out_of_range\"} 6\n"),
        "{metrics}"
    );

    // A new connection starts with the new capacity.
    drop(c);
    let c = b.connect(ClientOpts::default());
    assert_eq!(c.capacity(), START / 2);
    drop(c);
    assert!(b.is_alive());
    assert_eq!(b.stop(), Some(0));
}

fn ringfence_metrics(stats: &Path) -> String {
    let mut s = UnixStream::connect(stats).expect("stats socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    std::io::Write::write_all(&mut s, b"metrics\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// What a process wrote to one end of a socket pair (its stdout or stderr, as journald's
/// stream sockets take them under systemd), collected by a thread.
struct SocketLog {
    text: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl SocketLog {
    fn new(ours: UnixStream) -> SocketLog {
        let text = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let t = text.clone();
        std::thread::spawn(move || {
            let mut ours = ours;
            let mut buf = [0u8; 4096];
            while let Ok(n) = ours.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.0.lock().unwrap().extend_from_slice(&buf[..n]);
                t.1.notify_all();
            }
        });
        SocketLog { text }
    }

    fn bytes(&self) -> Vec<u8> {
        self.text.0.lock().unwrap().clone()
    }

    fn string(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Wait (bounded) until `needle` was written; true if it was.
    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut got = self.text.0.lock().unwrap();
        loop {
            if String::from_utf8_lossy(&got).contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            got = self.text.1.wait_timeout(got, left).unwrap().0;
        }
    }
}

/// Issue 21, item 5: under systemd, stdout and stderr are unnamed unix stream sockets
/// (journald's), so the channel cannot be found as "the one unnamed socket". Here the daemon's
/// stdout and stderr are socket pairs (as journald's), the VMM's channel is a socket with a name (an accepted
/// connection, which the old lookup skipped: it then took stderr for the channel), and the VMM
/// passes another socket in another message (as an inflight region, refused). The config
/// change reaches the channel, and nothing else.
#[test]
fn the_channel_is_found_with_stdout_and_stderr_on_sockets() {
    channel_among_other_sockets(true);
}

/// The same with stderr alone on a socket: the old lookup found exactly one unnamed socket,
/// stderr, and sent the message there.
#[test]
fn the_channel_is_found_with_stderr_on_a_socket() {
    channel_among_other_sockets(false);
}

fn channel_among_other_sockets(stdout_on_socket: bool) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    create_image(&image, START, None);
    let socket = dir.path().join("vhost.sock");
    let (out_ours, out_theirs) = UnixStream::pair().unwrap();
    let (err_ours, err_theirs) = UnixStream::pair().unwrap();
    let out = if stdout_on_socket {
        std::process::Stdio::from(std::os::fd::OwnedFd::from(out_theirs))
    } else {
        drop(out_theirs);
        std::process::Stdio::null()
    };
    let child = Command::new(ringfence_bin())
        .arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&image)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            err_theirs,
        )))
        .spawn()
        .expect("spawn ringfence");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id() as i32;
    let _kill = Kill(child);
    let stdout = SocketLog::new(out_ours);
    let stderr = SocketLog::new(err_ours);
    assert!(
        stderr.wait_for("ringfence: ready", IO_TIMEOUT),
        "not ready:\n{}",
        stderr.string()
    );

    // The VMM's channel: the accepted end of a connection to a listener of the test's own.
    let l = std::os::unix::net::UnixListener::bind(dir.path().join("vmm-side.sock")).unwrap();
    let vmm_end = UnixStream::connect(dir.path().join("vmm-side.sock")).unwrap();
    let (backend_end, _) = l.accept().unwrap();
    let (decoy, decoy_peer) = UnixStream::pair().unwrap();
    let f = Frontend::connect(&socket, 1).expect("connect as a VMM");
    let f = bounded(
        "handshake, SET_BACKEND_REQ_FD, a socket as inflight fd",
        move || {
            f.set_owner().unwrap();
            let features = f.get_features().unwrap();
            f.set_features(features).unwrap();
            let mut f = f;
            f.get_protocol_features().unwrap();
            f.set_protocol_features(
                VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::BACKEND_REQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            )
            .unwrap();
            f.set_backend_request_fd(&backend_end).unwrap();
            let inflight = VhostUserInflight {
                // Large enough for one queue of 256: refused only for what the fd is.
                mmap_size: 8192,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: 256,
            };
            // Refused (a socket is no sealed memfd: logged); the connection goes on.
            f.set_inflight_fd(&inflight, decoy.as_raw_fd())
                .expect("SET_INFLIGHT_FD sent");
            let (_, buf) = f
                .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
                .expect("GET_CONFIG after the refusal");
            assert_eq!(
                u64::from_le_bytes(buf[..8].try_into().unwrap()),
                START / 512
            );
            drop(backend_end);
            (f, decoy)
        },
    );

    set_len(&image, 2 * START);
    send_signal(pid, libc::SIGHUP);
    let needle = format!("resize: capacity {START} -> {}", 2 * START);
    assert!(
        stderr.wait_for(&needle, IO_TIMEOUT),
        "no '{needle}':\n{}",
        stderr.string()
    );
    let log = stderr.string();
    assert!(
        log.contains("inflight region") && !log.contains("inflight region in use"),
        "the socket passed as an inflight region was refused:\n{log}"
    );
    let line = log.lines().find(|l| l.contains(&needle)).unwrap();
    assert!(
        line.contains("the VMM was told (config change)"),
        "{line}\n{log}"
    );
    let mut msg = [0u8; 12];
    vmm_end.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    (&vmm_end)
        .read_exact(&mut msg)
        .expect("the config-change message on the channel");
    assert_eq!(msg, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    // Nothing of it on stdout, stderr or the socket passed as an inflight region.
    let raw = [2u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    for (what, bytes) in [("stdout", stdout.bytes()), ("stderr", stderr.bytes())] {
        assert!(
            !bytes.windows(raw.len()).any(|w| w == raw),
            "the message went to {what}"
        );
    }
    decoy_peer.set_nonblocking(true).unwrap();
    assert!(
        (&decoy_peer).read(&mut [0u8; 1]).is_err(),
        "the message went to the socket passed as an inflight fd"
    );
    drop(f);
}
