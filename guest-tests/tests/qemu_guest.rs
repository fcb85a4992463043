//! The device as users run it: a real Linux guest (a Debian cloud kernel with a busybox
//! initramfs) in real QEMU, attached to the backend as `vhost-user-blk-pci`, checking its disk
//! from inside with the kernel's own virtio-blk driver, dd, blkdiscard and fio.
//!
//! Each test boots one guest (two for the reboot test) with `guest-tests/qemu/run-guest.sh`; the
//! guest's init (`guest-tests/qemu/guest-init.sh`) reports `RINGFENCE-CHECK <name> PASS|FAIL`
//! lines on the serial console and the test requires every check it expects to be there and to
//! pass. The assets (QEMU, kernel, initramfs) are prepared once per run by
//! `guest-tests/qemu/prepare-assets.sh`, which installs what is missing.
//!
//! Backend: ringfence (the binary from `$RINGFENCE_BIN`, or built), or with
//! `RINGFENCE_GUEST_BACKEND=qsd` qemu-storage-daemon's vhost-user-blk export, to tell a backend
//! bug from a harness fault. `RINGFENCE_GUEST_TIMEOUT` (seconds, default 300) bounds each QEMU
//! run; `RINGFENCE_TEST_LOG=1` prints every guest console.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use ringfence_guest_tests::daemon::{workspace_root, Daemon, LoopFs};

const MIB: u64 = 1 << 20;
/// Every test disk: large enough for the guest's layout (patterns in the first 64 MiB, fio in
/// [64 MiB, 120 MiB), a 2 MiB write at 120 MiB, the last 4 KiB), small enough to stay cheap.
const DISK_SIZE: u64 = 128 * MIB;
/// What both backends report without being told otherwise.
const LOGICAL_BLOCK_SIZE: u32 = 512;
/// The serial qemu-storage-daemon's vhost-user-blk export always reports.
const QSD_SERIAL: &str = "vhost_user_blk";

/// The checks every scenario runs first (guest-init.sh's `identity`).
const IDENTITY: &[&str] = &[
    "device",
    "size",
    "logical_block_size",
    "queues",
    "read_only_flag",
    "serial",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Ringfence,
    QemuStorageDaemon,
}

fn backend() -> Backend {
    match std::env::var("RINGFENCE_GUEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("ringfence") => Backend::Ringfence,
        Ok("qsd") | Ok("qemu-storage-daemon") => Backend::QemuStorageDaemon,
        Ok(other) => panic!("RINGFENCE_GUEST_BACKEND must be ringfence or qsd, not {other:?}"),
    }
}

fn qemu_dir() -> PathBuf {
    workspace_root().join("guest-tests").join("qemu")
}

/// Kernel, initramfs and accelerator, from prepare-assets.sh (run once per test process).
struct Assets {
    kernel: String,
    initrd: String,
    accel: String,
}

const INSTALL_HINT: &str = "the QEMU guest tests need QEMU: install it with \
    `apt-get install qemu-system-x86` (or run guest-tests/qemu/prepare-assets.sh as root, which \
    installs QEMU, fio, busybox-static and fetches the guest kernel)";

fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let script = qemu_dir().join("prepare-assets.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}); {INSTALL_HINT}",
            script.display(),
            out.status
        );
        let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
        assert!(
            qemu.as_ref().is_ok_and(|o| o.status.success()),
            "qemu-system-x86_64 does not run ({:?}); {INSTALL_HINT}",
            qemu.err()
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("prepare-assets.sh printed no {key}:\n{text}"))
                .to_string()
        };
        Assets {
            kernel: get("RINGFENCE_GUEST_KERNEL"),
            initrd: get("RINGFENCE_GUEST_INITRD"),
            accel: get("RINGFENCE_GUEST_ACCEL"),
        }
    })
}

/// One QEMU at a time: the machines are small and shared, and TCG guests are CPU-bound.
fn qemu_slot() -> MutexGuard<'static, ()> {
    static SLOT: Mutex<()> = Mutex::new(());
    SLOT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A per-run value, so that data left by an earlier run (or a backend that ignores writes and
/// serves stale data) cannot pass.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((u64::from(std::process::id()) << 20) ^ u64::from(nanos)) % 1_000_000_007
}

/// The bytes guest-init.sh's `pattern TAG LEN` produces: `TAG\n` repeated, cut at `len`.
fn pattern(tag: &str, len: u64) -> Vec<u8> {
    let unit = format!("{tag}\n");
    unit.bytes().cycle().take(len as usize).collect()
}

/// A disk image and the socket of the backend that serves it.
struct Disk {
    dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    read_only: bool,
    num_queues: u16,
    serial: String,
}

impl Disk {
    /// A sparse image of `DISK_SIZE`. `name` makes the serial (ringfence's `--serial`).
    fn new(name: &str, read_only: bool, num_queues: u16) -> Disk {
        let dir = tempfile::Builder::new()
            .prefix("rf-guest-")
            .tempdir()
            .expect("temp dir");
        let image = dir.path().join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(DISK_SIZE))
            .expect("create the image");
        let socket = dir.path().join("vhost.sock");
        let serial = match backend() {
            Backend::Ringfence => format!("rf-{name}").chars().take(20).collect(),
            Backend::QemuStorageDaemon => QSD_SERIAL.to_string(),
        };
        Disk {
            dir,
            image,
            socket,
            read_only,
            num_queues,
            serial,
        }
    }

    fn start(&self) -> Daemon {
        match backend() {
            Backend::Ringfence => {
                let nq = self.num_queues.to_string();
                let image = self.image.to_str().expect("utf-8 temp path");
                let mut args = vec![
                    "--blk-file",
                    image,
                    "--num-queues",
                    &nq,
                    "--serial",
                    &self.serial,
                ];
                if self.read_only {
                    args.push("--read-only");
                }
                Daemon::ringfence(&self.socket, &args)
            }
            Backend::QemuStorageDaemon => Daemon::qemu_storage_daemon(
                &self.socket,
                &self.image,
                self.read_only,
                self.num_queues,
            ),
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .open(&self.image)
            .expect("open image");
        f.write_all_at(data, offset).expect("write image");
        f.sync_all().expect("sync image");
    }

    fn read_at(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        File::open(&self.image)
            .expect("open image")
            .read_exact_at(&mut buf, offset)
            .expect("read image");
        buf
    }

    fn checksum(&self) -> u64 {
        // FNV-1a over the whole image: enough to notice any changed byte in a test.
        let mut f = BufReader::new(File::open(&self.image).expect("open image"));
        let mut buf = vec![0u8; 1 << 20];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        loop {
            let n = f.read(&mut buf).expect("read image");
            if n == 0 {
                return h;
            }
            for &b in &buf[..n] {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
}

struct Check {
    name: String,
    status: String,
    detail: String,
}

/// What one guest boot printed.
struct GuestRun {
    label: String,
    console: String,
    runner_log: String,
    exit: Option<i32>,
    checks: Vec<Check>,
    done: bool,
}

impl GuestRun {
    fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The end of the console and of the runner's log, for failure messages.
    fn transcript(&self) -> String {
        let tail = |s: &str, n: usize| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "--- guest console ({}; last 150 lines) ---\n{}\n--- run-guest.sh / QEMU (last 40 lines) ---\n{}\n---",
            self.label,
            tail(&self.console, 150),
            tail(&self.runner_log, 40)
        )
    }
}

fn guest_timeout() -> u64 {
    std::env::var("RINGFENCE_GUEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

/// Boot the guest once against `disk`'s running backend and collect its report.
fn boot(disk: &Disk, scenario: &str, params: &[(&str, u64)]) -> GuestRun {
    boot_with(disk, scenario, params, |_| {})
}

/// Like [`boot`], calling `on_line` with every console line as it arrives (the host's side of a
/// scenario that waits for it).
fn boot_with(
    disk: &Disk,
    scenario: &str,
    params: &[(&str, u64)],
    on_line: impl FnMut(&str) + Send + 'static,
) -> GuestRun {
    boot_full(disk, scenario, params, &[], guest_timeout(), on_line)
}

/// Like [`boot_with`], with more options for run-guest.sh (`runner_args`) and a bound of its own
/// on the QEMU run.
fn boot_full(
    disk: &Disk,
    scenario: &str,
    params: &[(&str, u64)],
    runner_args: &[&str],
    timeout: u64,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> GuestRun {
    let assets = assets();
    let _slot = qemu_slot();
    let mut cmd = Command::new("bash");
    cmd.arg(qemu_dir().join("run-guest.sh"))
        .arg("--socket")
        .arg(&disk.socket)
        .args(["--scenario", scenario])
        .args(["--num-queues", &disk.num_queues.to_string()])
        .args(["--size", &DISK_SIZE.to_string()])
        .args(["--lbs", &LOGICAL_BLOCK_SIZE.to_string()])
        .args(["--serial", &disk.serial])
        .args(["--timeout", &timeout.to_string()]);
    if disk.read_only {
        cmd.arg("--read-only");
    }
    cmd.args(runner_args);
    for (k, v) in params {
        cmd.arg("--param").arg(format!("rf_{k}={v}"));
    }
    cmd.env("RINGFENCE_GUEST_KERNEL", &assets.kernel)
        .env("RINGFENCE_GUEST_INITRD", &assets.initrd)
        .env("RINGFENCE_GUEST_ACCEL", &assets.accel)
        .env("TMPDIR", disk.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a runaway run can be ended as a whole.
        .process_group(0);
    let label = format!("{scenario} on {:?}", backend());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("run guest-tests/qemu/run-guest.sh");

    let echo = std::env::var_os("RINGFENCE_TEST_LOG").is_some();
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if echo {
                eprintln!("[guest] {line}");
            }
            on_line(&line);
            text.push_str(&line);
            text.push('\n');
        }
        let _ = tx.send(());
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    // The runner's own timeout ends QEMU; this one only catches a runner that itself hangs.
    let limit = Duration::from_secs(timeout + 120);
    if rx.recv_timeout(limit).is_err() {
        let pgid = child.id() as i32;
        // SAFETY: signalling the process group of the runner we spawned (its own group).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let status = child.wait().expect("wait for run-guest.sh");
    let console = out_reader.join().expect("console reader");
    let runner_log = err_reader.join().expect("stderr reader");
    eprintln!(
        "guest run '{label}' took {:.1} s (exit {status})",
        started.elapsed().as_secs_f64()
    );

    let mut checks = Vec::new();
    let mut done = false;
    for line in console.lines() {
        // Kernel messages may share the console: look for the markers anywhere in a line.
        if let Some(pos) = line.find("RINGFENCE-CHECK ") {
            let mut parts = line[pos + "RINGFENCE-CHECK ".len()..].splitn(3, ' ');
            checks.push(Check {
                name: parts.next().unwrap_or_default().to_string(),
                status: parts.next().unwrap_or_default().to_string(),
                detail: parts.next().unwrap_or_default().trim().to_string(),
            });
        }
        if line.contains("RINGFENCE-DONE failed=0") {
            done = true;
        }
    }
    GuestRun {
        label,
        console,
        runner_log,
        exit: status.code(),
        checks,
        done,
    }
}

/// Every `expected` check ran and passed, no check failed, the guest finished, the runner said
/// success. Panics with the failing checks and the transcript otherwise.
fn assert_passed(run: &GuestRun, expected: &[&str], daemon: &Daemon) {
    assert_passed_with(run, expected, &daemon.stderr(), Vec::new());
}

/// [`assert_passed`] for a run served by several backend processes (`stderr`: all of theirs),
/// with the host's own `problems` added to the guest's.
fn assert_passed_with(run: &GuestRun, expected: &[&str], stderr: &str, mut problems: Vec<String>) {
    for c in &run.checks {
        if c.status == "FAIL" {
            problems.push(format!("check {} FAILED: {}", c.name, c.detail));
        }
    }
    for name in expected {
        match run.check(name) {
            None => problems.push(format!("check {name} did not run")),
            Some(c) if c.status != "PASS" && c.status != "FAIL" => {
                problems.push(format!("check {name}: {} {}", c.status, c.detail))
            }
            Some(_) => {}
        }
    }
    if !run.done {
        problems.push("the guest did not finish (no RINGFENCE-DONE failed=0)".into());
    }
    if run.exit != Some(0) {
        problems.push(format!("run-guest.sh exited with {:?}", run.exit));
    }
    // The guest is a well-behaved driver: nothing it does should make the backend complain
    // (e.g. declare a ring corrupt and stop serving it).
    for line in stderr.lines() {
        if line.contains("[ringfence warn]") || line.contains("[ringfence error]") {
            problems.push(format!(
                "the backend complained about a well-behaved guest: {line}"
            ));
        }
    }
    if !problems.is_empty() {
        let stderr: Vec<&str> = stderr.lines().collect();
        panic!(
            "guest run '{}' failed:\n  {}\n{}\n--- backend stderr (last 40 lines) ---\n{}",
            run.label,
            problems.join("\n  "),
            run.transcript(),
            stderr[stderr.len().saturating_sub(40)..].join("\n")
        );
    }
    if std::env::var_os("RINGFENCE_TEST_LOG").is_some() {
        for c in &run.checks {
            eprintln!("  {} {} {}", c.name, c.status, c.detail);
        }
    }
}

fn with_identity(extra: &[&'static str]) -> Vec<&'static str> {
    IDENTITY.iter().chain(extra).copied().collect()
}

fn assert_alive(daemon: &mut Daemon, when: &str) {
    assert!(
        daemon.is_alive(),
        "the backend exited {when} (status {:?}); stderr:\n{}",
        daemon.exit_status(),
        daemon.stderr()
    );
}

#[test]
fn guest_sees_the_disk_as_configured() {
    let disk = Disk::new("identity", false, 1);
    let daemon = disk.start();
    let run = boot(&disk, "identity", &[]);
    assert_passed(&run, IDENTITY, &daemon);
}

/// The (offset, length) ranges guest-init.sh's `pattern_ranges` writes, for a disk of
/// `DISK_SIZE`; the pattern of range `i` is `pattern("RF:<seed>:<i>", length)`.
fn pattern_ranges() -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = (0..32u64)
        .map(|i| {
            (
                i * 2 * MIB + (i % 8) * 512 + (i % 3) * 4096,
                512 * (1 + (i * 7) % 16),
            )
        })
        .collect();
    v.push((120 * MIB, 2 * MIB + 512));
    v.push((DISK_SIZE - 4096, 4096));
    v
}

#[test]
fn guest_data_integrity_with_o_direct_patterns_and_fio_verify() {
    let disk = Disk::new("integrity", false, 1);
    let daemon = disk.start();
    let seed = seed();
    let run = boot(&disk, "integrity", &[("seed", seed), ("fio_mb", 48)]);
    assert_passed(
        &run,
        &with_identity(&[
            "pattern_write",
            "pattern_readback",
            "fio_randwrite_verify",
            "pattern_after_fio",
        ]),
        &daemon,
    );
    // What the guest wrote is in the image, where it wrote it.
    for (i, (off, len)) in pattern_ranges().into_iter().enumerate() {
        assert!(
            disk.read_at(off, len) == pattern(&format!("RF:{seed}:{i}"), len),
            "the image does not hold the guest's pattern {i} ({len} bytes at {off})"
        );
    }
}

#[test]
fn guest_discard_and_write_zeroes() {
    let disk = Disk::new("discard", false, 1);
    let daemon = disk.start();
    let seed = seed();
    let run = boot(&disk, "discard", &[("seed", seed)]);
    assert_passed(
        &run,
        &with_identity(&[
            "discard_limits",
            "write_zeroes_reads_zero",
            "write_zeroes_sub_4k",
            "discard_accepted",
            "discard_bounded",
        ]),
        &daemon,
    );
    // The guest zeroed [16 MiB, 20 MiB) of its 8 MiB pattern at 16 MiB; the host agrees.
    assert!(
        disk.read_at(16 * MIB, 4 * MIB).iter().all(|&b| b == 0),
        "write-zeroes over [16 MiB, 20 MiB) did not leave zeroes in the image"
    );
    let dz = pattern(&format!("DZ:{seed}"), 8 * MIB);
    assert!(
        disk.read_at(21 * MIB, MIB) == dz[5 * MIB as usize..6 * MIB as usize],
        "the image lost the guest's pattern at [21 MiB, 22 MiB), next to a discard"
    );
}

#[test]
fn read_only_export_refuses_guest_writes() {
    let disk = Disk::new("readonly", true, 1);
    let seed = seed();
    let (off, len) = (5 * MIB + 512, 64 * 1024);
    disk.write_at(off, &pattern(&format!("RO:{seed}"), len));
    let before = disk.checksum();
    let daemon = disk.start();
    let run = boot(
        &disk,
        "readonly",
        &[("seed", seed), ("off", off), ("len", len)],
    );
    assert_passed(
        &run,
        &with_identity(&[
            "ro_read_host_pattern",
            "ro_write_refused",
            "ro_discard_refused",
            "ro_zeroout_refused",
            "ro_data_unchanged",
        ]),
        &daemon,
    );
    assert_eq!(
        disk.checksum(),
        before,
        "the read-only image changed during the guest run"
    );
}

#[test]
fn multiqueue_guest_uses_both_queues() {
    let disk = Disk::new("multiqueue", false, 2);
    let daemon = disk.start();
    let run = boot(&disk, "multiqueue", &[("seed", seed()), ("fio_mb", 16)]);
    assert_passed(
        &run,
        &with_identity(&["mq_parallel_fio_verify", "mq_both_queues_used"]),
        &daemon,
    );
}

#[test]
fn host_image_holds_what_the_guest_wrote() {
    let disk = Disk::new("hostwrite", false, 1);
    let seed = seed();
    // Sector- but not page-aligned, spanning several pages.
    let (off, len) = (3 * MIB + 1536, 192 * 1024);
    // A range the guest will write zeroes over, inside a larger one the host fills first.
    let (zoff, zlen) = (40 * MIB + 4096, 256 * 1024);
    disk.write_at(zoff - 4096, &vec![0xa5; (zlen + 8192) as usize]);
    let daemon = disk.start();
    let run = boot(
        &disk,
        "hostwrite",
        &[
            ("seed", seed),
            ("off", off),
            ("len", len),
            ("zoff", zoff),
            ("zlen", zlen),
        ],
    );
    assert_passed(
        &run,
        &with_identity(&["host_pattern_written", "host_zeroes_written"]),
        &daemon,
    );
    let got = disk.read_at(off, len);
    let want = pattern(&format!("HOST:{seed}"), len);
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "the image differs from what the guest wrote at byte {} (offset {}): {:?} != {:?}",
            i,
            off + i as u64,
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
    assert!(
        disk.read_at(off - 512, 512).iter().all(|&b| b == 0)
            && disk.read_at(off + len, 512).iter().all(|&b| b == 0),
        "the guest's write spilled outside [{off}, {})",
        off + len
    );
    assert!(
        disk.read_at(zoff, zlen).iter().all(|&b| b == 0),
        "write-zeroes at [{zoff}, {}) did not zero the image",
        zoff + zlen
    );
    assert!(
        disk.read_at(zoff - 4096, 4096).iter().all(|&b| b == 0xa5)
            && disk.read_at(zoff + zlen, 4096).iter().all(|&b| b == 0xa5),
        "write-zeroes at [{zoff}, {}) changed bytes outside its range",
        zoff + zlen
    );
}

#[test]
fn guest_sees_a_live_resize() {
    // The guest says when it is ready; the host then grows the image by 128 MiB and sends the
    // backend SIGHUP. The guest must see the new capacity (its driver logs it on the config
    // interrupt QEMU raises after ringfence's config-change message) and use the new end.
    if backend() == Backend::QemuStorageDaemon {
        eprintln!("skipped: qemu-storage-daemon resizes through QMP block_resize, not SIGHUP");
        return;
    }
    let disk = Disk::new("resize", false, 1);
    let daemon = disk.start();
    let seed = seed();
    let new_size = DISK_SIZE + 128 * MIB;
    let image = disk.image.clone();
    let pid = daemon.pid();
    let resized = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = resized.clone();
    let run = boot_with(
        &disk,
        "resize",
        &[("seed", seed), ("newsize", new_size)],
        move |line| {
            if line.contains("RINGFENCE-RESIZE-READY") && !flag.swap(true, Ordering::SeqCst) {
                OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .and_then(|f| f.set_len(new_size))
                    .expect("grow the image");
                // SAFETY: kill only sends a signal to the backend process this test started.
                let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
                assert_eq!(rc, 0, "SIGHUP to the backend");
            }
        },
    );
    assert!(
        resized.load(Ordering::SeqCst),
        "the guest never asked for the resize:\n{}",
        run.transcript()
    );
    assert_passed(
        &run,
        &with_identity(&["resize_seen", "resize_write_read_new_end"]),
        &daemon,
    );
    assert!(
        daemon.stderr().contains("the VMM was told (config change)"),
        "ringfence did not say it told the VMM:\n{}",
        daemon.stderr()
    );
    assert!(
        disk.read_at(new_size - 65536, 65536) == pattern(&format!("GROWN:{seed}"), 65536),
        "the image does not hold what the guest wrote past the old end"
    );
}

#[test]
fn backend_survives_guest_poweroff_and_serves_a_second_boot() {
    let disk = Disk::new("reboot", false, 1);
    let mut daemon = disk.start();
    let seed = seed();
    let params = [("seed", seed), ("off", 7 * MIB), ("len", 128 * 1024)];

    let first = boot(&disk, "reboot1", &params);
    assert_passed(&first, &with_identity(&["boot1_pattern_written"]), &daemon);
    assert_alive(
        &mut daemon,
        "after the first guest powered off and QEMU disconnected",
    );

    let second = boot(&disk, "reboot2", &params);
    assert_passed(
        &second,
        &with_identity(&["boot2_pattern_readback", "boot2_write_read"]),
        &daemon,
    );
    assert_alive(&mut daemon, "after the second guest powered off");
}

// ------------------------------------------------------------------------------------------
// Backend crashes under load (issue 13: inflight I/O tracking)
// ------------------------------------------------------------------------------------------

/// Times the backend is killed during one guest run.
const CRASH_KILLS: u32 = 3;
/// Writes a backend process must have completed before the host starts holding writes for the
/// next kill: QEMU has reconnected and the guest's load flows again.
const WRITES_BEFORE_KILL: u64 = 40;
/// Reads that must complete while writes are held before the kill: the used ring has moved
/// past requests still in flight, the case a rewound SET_VRING_BASE gets wrong.
const READS_PAST_HELD_WRITES: u64 = 8;
/// iodepth of each guest reader job (the in-flight count beyond the readers' is writes).
const READER_DEPTH: u64 = 2;
/// QEMU's delay before it reconnects to a lost backend (`-chardev socket,...,reconnect=1`).
const RECONNECT_SECS: &str = "1";
/// Bound on one crash run: a backend that loses a request hangs the guest until this.
const CRASH_RUN_TIMEOUT: u64 = 150;
/// Bound on every wait of the host's side (a reconnect, the next requests, an exit): a stall
/// detector (under TCG the guest's load resumes within a few seconds of a reconnect).
const CRASH_WAIT: Duration = Duration::from_secs(30);
/// The queue size QEMU's vhost-user-blk-pci uses by default (its `queue-size` property).
const QEMU_QUEUE_SIZE: u64 = 128;

/// One answer of ringfence's stats socket, or `None` if it does not answer (yet).
fn scrape(stats: &std::path::Path) -> Option<String> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(stats).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"metrics\n").ok()?;
    s.shutdown(std::net::Shutdown::Write).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The sum of every sample of the series `name` (all label sets matching `labels`, a prefix
/// of the label list such as `op="read"`, or every one if empty) in a scrape.
fn metric_sum(text: &str, name: &str, labels: &str) -> u64 {
    text.lines()
        .filter(|l| match l.strip_prefix(name) {
            Some(rest) if labels.is_empty() => rest.starts_with(' ') || rest.starts_with('{'),
            Some(rest) => rest.starts_with(&format!("{{{labels}")),
            None => false,
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Counters of the running backend process that the crash runs watch.
#[derive(Clone, Copy, Debug)]
struct Served {
    reads: u64,
    writes: u64,
    in_flight: u64,
}

fn served(stats: &std::path::Path) -> Option<Served> {
    let text = scrape(stats)?;
    Some(Served {
        reads: metric_sum(&text, "ringfence_requests_total", "op=\"read\""),
        writes: metric_sum(&text, "ringfence_requests_total", "op=\"write\""),
        in_flight: metric_sum(&text, "ringfence_requests_in_flight", ""),
    })
}

/// The memfds QEMU (`pid`) holds: the target of each /proc/PID/fd link that is one
/// (`/memfd:NAME (deleted)`), with its size.
fn memfds(pid: i32) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut v: Vec<(String, u64)> = dir
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            if !target.starts_with("/memfd:") {
                return None;
            }
            let size = std::fs::metadata(e.path()).map(|m| m.len()).unwrap_or(0);
            Some((target, size))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Wait (bounded) until process `pid` has exited, on a pidfd.
fn wait_exit(pid: i32, timeout: Duration) -> bool {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    n == 1
}

/// End the QEMU of a crash run whose guest stalled (SIGKILL to the pid it wrote), so that the
/// test fails now rather than at the run's timeout.
fn stop_qemu(pidfile: &std::path::Path) {
    if let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        // SAFETY: kill only sends a signal to the QEMU this test started (its own pidfile).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Console events of a crash run, sent by the console reader to the host's side.
enum LoadEvent {
    Started,
    FioDone,
}

/// What the host's side of a crash run did and found.
#[derive(Default)]
struct CrashReport {
    kills: u32,
    problems: Vec<String>,
    notes: Vec<String>,
    /// stderr of every backend process, in order.
    stderr: String,
    last: Option<Daemon>,
}

/// Start ringfence for `disk` with a stats socket (the crash runs watch its counters).
fn start_with_stats(disk: &Disk, stats: &std::path::Path) -> Daemon {
    let nq = disk.num_queues.to_string();
    let image = disk.image.to_str().expect("utf-8 temp path");
    let stats = stats.to_str().expect("utf-8 temp path");
    Daemon::ringfence(
        &disk.socket,
        &[
            "--blk-file",
            image,
            "--num-queues",
            &nq,
            "--serial",
            &disk.serial,
            "--stats-socket",
            stats,
        ],
    )
}

/// Wait until `cond` holds for the backend's counters, looking every 20 ms (the spacing of the
/// looks, not a synchronisation: the wait ends on the counters or on the guest's news), at most
/// [`CRASH_WAIT`]. `Err(true)` if the guest's fio ended meanwhile, `Err(false)` on timeout.
fn wait_served(
    stats: &std::path::Path,
    events: &mpsc::Receiver<LoadEvent>,
    cond: impl Fn(&Served) -> bool,
) -> Result<Served, bool> {
    let deadline = Instant::now() + CRASH_WAIT;
    while Instant::now() < deadline {
        if let Some(s) = served(stats) {
            if cond(&s) {
                return Ok(s);
            }
        }
        match events.recv_timeout(Duration::from_millis(20)) {
            Ok(LoadEvent::FioDone) | Err(mpsc::RecvTimeoutError::Disconnected) => return Err(true),
            _ => {}
        }
    }
    Err(false)
}

/// The host's side of a crash run. Once the guest's load runs, [`CRASH_KILLS`] times: wait
/// until the current backend process has completed [`WRITES_BEFORE_KILL`] writes; look at
/// QEMU's fds for the inflight region; freeze the image's filesystem and wait until writes are
/// held in flight while [`READS_PAST_HELD_WRITES`] reads complete past them; SIGKILL the
/// backend, thaw, wait for its exit and for the image to be free, start a new one on the same
/// socket and wait for QEMU to reconnect to it. Every wait ends on an event (a console line, a
/// counter, a log line, an exit), bounded by [`CRASH_WAIT`].
fn crash_loop(
    disk: &Disk,
    fs: &LoopFs,
    stats: &std::path::Path,
    qemu_pidfile: &std::path::Path,
    first: Daemon,
    events: mpsc::Receiver<LoadEvent>,
) -> CrashReport {
    let mut r = CrashReport::default();
    let mut daemon = first;
    let _thaw = fs.thaw_guard();
    match events.recv_timeout(Duration::from_secs(CRASH_RUN_TIMEOUT)) {
        Ok(LoadEvent::Started) => {}
        _ => {
            r.problems
                .push("the guest never said its load started".into());
            r.last = Some(daemon);
            return r;
        }
    }
    let nq = u64::from(disk.num_queues);
    let min_region = nq * (16 + 16 * QEMU_QUEUE_SIZE).next_multiple_of(64);
    let fio_ended = |r: &mut CrashReport| {
        r.problems.push(format!(
            "the guest's fio ended after {} kill(s) of {CRASH_KILLS}: make the load longer",
            r.kills
        ))
    };
    while r.kills < CRASH_KILLS {
        let k = r.kills + 1;
        match wait_served(stats, &events, |s| s.writes >= WRITES_BEFORE_KILL) {
            Ok(_) => {}
            Err(true) => {
                fio_ended(&mut r);
                break;
            }
            Err(false) => {
                r.problems.push(format!(
                    "the guest's writes stalled: backend process {k} completed fewer than \
                     {WRITES_BEFORE_KILL} writes within {CRASH_WAIT:?} ({:?}); QEMU was \
                     stopped then rather than left to its timeout",
                    served(stats)
                ));
                stop_qemu(qemu_pidfile);
                break;
            }
        }
        // QEMU keeps the inflight region it got with GET_INFLIGHT_FD for the device's life.
        let qemu: Option<i32> = std::fs::read_to_string(qemu_pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        match qemu {
            None => r
                .problems
                .push(format!("no QEMU pid in {}", qemu_pidfile.display())),
            Some(pid) => {
                let fds = memfds(pid);
                match fds.iter().find(|(n, _)| n.contains("inflight")) {
                    Some((name, size)) if *size >= min_region => r.notes.push(format!(
                        "before kill {k}: QEMU holds {name} of {size} bytes"
                    )),
                    Some((name, size)) => r.problems.push(format!(
                        "before kill {k}: QEMU's inflight memfd {name} has {size} bytes, \
                         {nq} queue(s) of {QEMU_QUEUE_SIZE} need {min_region}"
                    )),
                    None => r.problems.push(format!(
                        "before kill {k}: QEMU holds no inflight region (no memfd named \
                         *inflight* among its fds; its memfds: {fds:?}): the backend did not \
                         negotiate INFLIGHT_SHMFD"
                    )),
                }
            }
        }
        // Hold the writes in flight; reads go on and complete past them.
        fs.freeze();
        let Some(before) = served(stats) else {
            r.problems.push(format!(
                "backend process {k}'s stats socket does not answer"
            ));
            break;
        };
        let held = wait_served(stats, &events, |s| {
            s.in_flight > READER_DEPTH * nq && s.reads >= before.reads + READS_PAST_HELD_WRITES
        });
        let held = match held {
            Ok(s) => s,
            Err(true) => {
                fio_ended(&mut r);
                break;
            }
            Err(false) => {
                r.problems.push(format!(
                    "kill {k}: no writes held in flight with reads completing past them within \
                     {CRASH_WAIT:?} (at the freeze: {before:?}; now {:?}); QEMU was stopped then",
                    served(stats)
                ));
                stop_qemu(qemu_pidfile);
                break;
            }
        };
        let pid = daemon.pid();
        // SAFETY: kill only sends a signal to the backend process this test started.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "SIGKILL: {}", std::io::Error::last_os_error());
        fs.thaw();
        r.kills = k;
        r.notes.push(format!(
            "kill {k}: backend pid {pid} with {} requests in flight ({} reads completed since \
             the writes were held; {} writes, {} reads in all)",
            held.in_flight,
            held.reads - before.reads,
            held.writes,
            held.reads
        ));
        if !wait_exit(pid, CRASH_WAIT) {
            r.problems.push(format!(
                "killed backend {pid} did not exit within {CRASH_WAIT:?}"
            ));
            break;
        }
        r.stderr.push_str(&daemon.stderr());
        // Dropping it reaps it. Restarted at once, as a supervisor would: the kernel releases
        // the dead process's rings, and with them the image's lock, only once their last I/O
        // has landed, and the new process waits for the lock (`--lock-wait`, 5 s by default).
        drop(daemon);
        daemon = start_with_stats(disk, stats);
        if !daemon.wait_for_log("VMM connected", CRASH_WAIT) {
            r.problems.push(format!(
                "QEMU did not reconnect to backend process {} within {CRASH_WAIT:?}",
                k + 1
            ));
            break;
        }
    }
    r.last = Some(daemon);
    r
}

/// The guest runs fio (random writes of 4k-128k, iodepth 16 per job, one job per queue, every
/// block verified with crc32c, and random 4k readers on every queue beside them) while the host
/// kills ringfence with SIGKILL [`CRASH_KILLS`] times, each time with writes held in flight (the
/// image's filesystem frozen) and reads completed past them, and restarts it on the same socket;
/// QEMU reconnects (`reconnect=1`), rewinds each queue to its used index and must hand the new
/// process its inflight region. The guest must finish with every block verified and no I/O
/// error in its kernel log, and QEMU must hold the inflight region (a memfd named
/// `*inflight*`) throughout.
fn guest_survives_backend_crashes_under_load(num_queues: u16) {
    if backend() == Backend::QemuStorageDaemon {
        eprintln!("skipped: this test restarts ringfence itself");
        return;
    }
    let fs = LoopFs::new(DISK_SIZE + 64 * MIB);
    let mut disk = Disk::new(&format!("crash{num_queues}"), false, num_queues);
    disk.image = fs.path().join("disk.img");
    File::create(&disk.image)
        .and_then(|f| f.set_len(DISK_SIZE))
        .expect("create the image");
    let stats = disk.dir.path().join("stats.sock");
    let qemu_pidfile = disk.dir.path().join("qemu.pid");
    let first = start_with_stats(&disk, &stats);
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let (run, report) = std::thread::scope(|scope| {
        let host = scope.spawn(|| crash_loop(&disk, &fs, &stats, &qemu_pidfile, first, rx));
        let run = boot_full(
            &disk,
            "crashload",
            &[
                ("seed", seed()),
                ("fio_mb", 48 / u64::from(num_queues)),
                ("reader_depth", READER_DEPTH),
            ],
            &[
                "--reconnect",
                RECONNECT_SECS,
                "--pidfile",
                qemu_pidfile.to_str().expect("utf-8 temp path"),
            ],
            CRASH_RUN_TIMEOUT,
            move |line| {
                let ev = if line.contains("RINGFENCE-CRASHLOAD-STARTED") {
                    Some(LoadEvent::Started)
                } else if line.contains("RINGFENCE-CRASHLOAD-FIO-DONE") {
                    Some(LoadEvent::FioDone)
                } else {
                    None
                };
                if let Some(ev) = ev {
                    let _ = tx.send(ev);
                }
            },
        );
        (run, host.join().expect("the host's side of the crash run"))
    });
    eprintln!(
        "crash run on {num_queues} queue(s): {} kill(s) in {:.1} s\n  {}",
        report.kills,
        started.elapsed().as_secs_f64(),
        report.notes.join("\n  ")
    );
    let mut problems = report.problems;
    if report.kills < CRASH_KILLS {
        problems.push(format!(
            "the backend was killed {} time(s), not {CRASH_KILLS}",
            report.kills
        ));
    }
    let mut last = report.last.expect("the last backend process");
    let stderr = format!("{}{}", report.stderr, last.stderr());
    assert_passed_with(
        &run,
        &with_identity(&["crashload_fio_verify", "crashload_no_io_errors"]),
        &stderr,
        problems,
    );
    assert_alive(&mut last, "after the crash run");
}

#[test]
fn guest_survives_backend_crashes_under_load_one_queue() {
    guest_survives_backend_crashes_under_load(1);
}

#[test]
fn guest_survives_backend_crashes_under_load_two_queues() {
    guest_survives_backend_crashes_under_load(2);
}
