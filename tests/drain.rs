//! Writes in flight when a connection ends, or when the daemon is told to exit, land before
//! the next connection is served, before the image lock is released and before the process
//! exits. (When a connection ends, Linux itself also holds each worker thread's exit until the
//! writes it punted to io-wq are done; the daemon's own wait covers what the block layer holds.) The disk is an ext4 filesystem on a loop device that the test freezes (FIFREEZE):
//! every write to it waits until the test thaws it, so the test decides when completions come.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::*;
use ringfence_guest_tests::daemon::Daemon;

/// An ext4 filesystem in a file, on a loop device, mounted in a temporary directory.
struct Freezable {
    mnt: tempfile::TempDir,
    loopdev: String,
    _backing: tempfile::TempDir,
    frozen: std::cell::Cell<bool>,
}

/// Thaws on drop. Made after the backend, so it is dropped first: a failing test must not
/// leave the daemon's writes (and so its exit, and the test's cleanup) stuck.
struct ThawOnDrop<'a>(&'a Freezable);

impl Drop for ThawOnDrop<'_> {
    fn drop(&mut self) {
        if self.0.frozen.get() {
            self.0.thaw();
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Freezable {
    fn new() -> Freezable {
        let backing = tempfile::tempdir().expect("tempdir");
        let file = backing.path().join("fs.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(64 * MIB))
            .expect("backing file");
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file));
        let loopdev = run(Command::new("losetup").args(["-f", "--show"]).arg(&file));
        let mnt = tempfile::tempdir().expect("mount point");
        run(Command::new("mount").arg(&loopdev).arg(mnt.path()));
        Freezable {
            mnt,
            loopdev,
            _backing: backing,
            frozen: std::cell::Cell::new(false),
        }
    }

    fn path(&self) -> PathBuf {
        self.mnt.path().to_path_buf()
    }

    fn freeze(&self) {
        run(Command::new("fsfreeze").arg("-f").arg(self.mnt.path()));
        self.frozen.set(true);
    }

    fn thaw(&self) {
        run(Command::new("fsfreeze").arg("-u").arg(self.mnt.path()));
        self.frozen.set(false);
    }
}

impl Drop for Freezable {
    fn drop(&mut self) {
        if self.frozen.get() {
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

/// The daemon, serving an image on the freezable filesystem; its socket lives elsewhere (a
/// frozen filesystem would hold the socket's creation and removal too).
struct Served {
    daemon: Daemon,
    image: PathBuf,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(fs: &Freezable) -> Served {
        let dir = tempfile::tempdir().expect("socket dir");
        let image = fs.path().join("disk.img");
        create_image(&image, 8 * MIB, None);
        let socket = dir.path().join("vhost.sock");
        let image_arg = image.to_str().expect("utf-8 path");
        let daemon = Daemon::ringfence_at(ringfence_bin(), &socket, &["--blk-file", image_arg]);
        Served {
            daemon,
            image,
            socket,
            _dir: dir,
        }
    }

    fn connect(&self) -> Client {
        Client::connect(&self.socket, ClientOpts::default()).expect("connect")
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
    let fs = Freezable::new();
    let b = Served::start(&fs);
    let _thaw = ThawOnDrop(&fs);
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
    let fs = Freezable::new();
    let mut b = Served::start(&fs);
    let _thaw = ThawOnDrop(&fs);
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
