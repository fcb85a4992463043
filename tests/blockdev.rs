//! A block device as the image, the way distributed storage reaches ringfence: a Ceph RBD
//! mapped with `krbd` (/dev/rbdN), an NVMe-oF namespace (/dev/nvmeXnY) or an iSCSI LUN
//! (/dev/sdX) is a local block device, and `--blk-file` serves it like a file. Here the block
//! device is a loop device over a file (what this machine allows without a storage cluster):
//! the same kernel interfaces (O_DIRECT on a block device, size from the device, BLKDISCARD and
//! zeroing through fallocate on the device, OFD locks on the device node), and the same live
//! resize an `rbd resize` causes (the device grows under the daemon, which re-reads its size).
//!
//! Where no loop device can be set up (no root, no /dev/loop-control: some containers), the
//! test says so and checks nothing else.

mod common;

use std::fs::OpenOptions;
use std::process::Command;

use common::*;

/// A loop device over a file in a temporary directory; detached on drop.
struct Loop {
    dev: String,
    backing: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(size: u64) -> Result<Loop, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let backing = dir.path().join("backing.img");
        create_image(&backing, size, None);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup -f --show: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            backing,
            _dir: dir,
        })
    }

    /// Grow the backing file and have the loop device take the new size (`losetup -c`), as a
    /// storage cluster grows an RBD or a LUN under a running host.
    fn grow(&self, size: u64) {
        OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .and_then(|f| f.set_len(size))
            .expect("grow the backing file");
        let st = Command::new("losetup")
            .args(["-c", &self.dev])
            .status()
            .expect("losetup -c");
        assert!(st.success(), "losetup -c {}", self.dev);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

#[test]
fn a_block_device_serves_as_the_image_and_grows_live() {
    let lo = match Loop::new(32 * MIB) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "SKIPPED: no loop device on this machine ({e}); nothing was checked. The \
                 block-device path (size from the device, O_DIRECT, fallocate on a device, \
                 resize) then stays untested here."
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let stats = dir.path().join("stats.sock");
    let mut p = Proc::spawn_until_ready(
        Command::new(ringfence_bin())
            .arg("--socket-path")
            .arg(&socket)
            .args(["--blk-file", &lo.dev, "--cache", "none"])
            .arg("--stats-socket")
            .arg(&stats)
            .env("RUST_LOG", "info"),
    );
    let log = p.stderr();
    assert!(
        log.contains(&format!("serving {} ({} bytes", lo.dev, 32 * MIB)),
        "{log}"
    );
    assert!(
        log.contains("O_DIRECT"),
        "a block device is served O_DIRECT:\n{log}"
    );

    let mut c = Client::connect(&socket, ClientOpts::default()).expect("connect");
    assert_eq!(c.capacity(), 32 * MIB);
    let data = pattern(11, 3 * MIB + 4096, 256 * 1024);
    c.q().write(3 * MIB + 4096, &data).unwrap();
    c.q().flush().unwrap();
    assert_same(
        "read back from the device",
        3 * MIB + 4096,
        &c.q().read(3 * MIB + 4096, data.len()).unwrap(),
        &data,
    );
    // Through the loop device into its backing file.
    assert_same(
        "the backing file",
        3 * MIB + 4096,
        &read_file_at(&lo.backing, 3 * MIB + 4096, data.len()),
        &data,
    );
    // Zeroing and discard on a device (fallocate on a block device: zero-out and discard).
    c.q().write_zeroes(3 * MIB + 4096, 65536, false).unwrap();
    c.q()
        .write_zeroes(3 * MIB + 65536 + 4096, 65536, true)
        .unwrap();
    let back = c.q().read(3 * MIB + 4096, 2 * 65536).unwrap();
    assert!(
        back.iter().all(|&b| b == 0),
        "write-zeroes on a block device"
    );
    c.q().discard(8 * MIB, MIB).unwrap();
    // Past the end of the device: refused.
    assert!(c.q().read(32 * MIB, 4096).is_err());

    // The device grows under the daemon (rbd resize, a LUN grown on the array); the operator
    // tells ringfence (`ringfence resize` answers once the new size is served).
    lo.grow(48 * MIB);
    let out = run_to_exit(
        Command::new(ringfence_bin())
            .arg("resize")
            .arg("--stats-socket")
            .arg(&stats),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("capacity {} -> {}", 32 * MIB, 48 * MIB)),
        "{}",
        out.stdout
    );
    let tail = pattern(12, 40 * MIB, 65536);
    c.q().write(40 * MIB, &tail).unwrap();
    assert_same(
        "past the old end",
        40 * MIB,
        &c.q().read(40 * MIB, 65536).unwrap(),
        &tail,
    );
    drop(c);
    // A new connection sees the grown device.
    let c = Client::connect(&socket, ClientOpts::default()).expect("reconnect");
    assert_eq!(c.capacity(), 48 * MIB);
    drop(c);
    send_signal(p.child.id() as i32, libc::SIGTERM);
    assert!(wait_pid_exit(p.child.id() as i32, EXIT_TIMEOUT));
    assert_eq!(p.child.wait().unwrap().code(), Some(0));
}
