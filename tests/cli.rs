//! The ringfence binary as an operator meets it: mistakes on the command line end with one
//! clear line on stderr and a non-zero exit (never a panic), and the lifecycle of the process
//! (image creation, capabilities, signals, reconnecting VMMs, an inherited socket) works.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use ringfence_guest_tests::daemon::{Daemon, READY_MARKER};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ringfence-cli")
        .tempdir()
        .expect("tempdir")
}

/// The binary with a clean environment for error tests: no log filter (so the default output
/// is what an operator sees), and backtraces on, so that a panic could not hide.
fn ringfence() -> Command {
    let mut c = Command::new(ringfence_bin());
    c.env_remove("RUST_LOG").env("RUST_BACKTRACE", "1");
    c
}

/// Run and check the CLI-error contract: non-zero exit (not a signal), stderr is exactly one
/// non-empty line, no panic or backtrace. Returns that line, or what is wrong.
fn one_line_error(cmd: &mut Command, case: &str) -> Result<String, String> {
    let f = run_to_exit(cmd);
    let code = f.status.code();
    if code.is_none() || code == Some(0) {
        return Err(format!(
            "{case}: expected a non-zero exit, got {:?}; stderr:\n{}",
            f.status, f.stderr
        ));
    }
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        if f.stderr.contains(bad) {
            return Err(format!("{case}: stderr has '{bad}':\n{}", f.stderr));
        }
    }
    let text = f.stderr.trim_end();
    if text.trim().is_empty() {
        return Err(format!("{case}: stderr is empty"));
    }
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != 1 {
        return Err(format!(
            "{case}: expected one line on stderr, got {}:\n{}",
            lines.len(),
            f.stderr
        ));
    }
    Ok(lines[0].to_string())
}

#[track_caller]
fn expect_one_line_error(cmd: &mut Command, case: &str) -> String {
    one_line_error(cmd, case).unwrap_or_else(|e| panic!("{e}"))
}

fn sparse(path: &Path, size: u64) {
    create_image(path, size, None);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ------------------------------------------------------------------------------------------
// Errors at startup
// ------------------------------------------------------------------------------------------

#[test]
fn missing_image_without_create_size() {
    let d = tempdir();
    let img = d.path().join("nope.img");
    let sock = d.path().join("s.sock");
    let line = expect_one_line_error(
        ringfence().args(["--socket-path", s(&sock), "--blk-file", s(&img)]),
        "missing image",
    );
    assert!(line.contains(s(&img)), "the error names the image: {line}");
    assert!(!img.exists(), "no image was created without --create-size");
}

#[test]
fn unreadable_image() {
    let d = tempdir();
    let img = d.path().join("secret.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 4 * MIB);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).unwrap();
    let mut cmd = ringfence();
    cmd.args(["--socket-path", s(&sock), "--blk-file", s(&img)]);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root reads anything: run as nobody, with the directory open to it for the socket.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    let line = expect_one_line_error(&mut cmd, "unreadable image");
    assert!(line.contains(s(&img)), "the error names the image: {line}");
}

#[test]
fn image_size_not_a_multiple_of_512() {
    let d = tempdir();
    let sock = d.path().join("s.sock");
    for size in [1000u64, 4 * MIB + 1] {
        let img = d.path().join(format!("odd-{size}.img"));
        std::fs::write(&img, vec![0u8; size as usize]).unwrap();
        let line = expect_one_line_error(
            ringfence().args(["--socket-path", s(&sock), "--blk-file", s(&img)]),
            &format!("image of {size} bytes"),
        );
        assert!(line.contains(s(&img)), "the error names the image: {line}");
        assert!(line.contains("512"), "the error says what is wrong: {line}");
    }
}

#[test]
fn empty_image() {
    let d = tempdir();
    let img = d.path().join("empty.img");
    std::fs::write(&img, b"").unwrap();
    let line = expect_one_line_error(
        ringfence().args([
            "--socket-path",
            s(&d.path().join("s.sock")),
            "--blk-file",
            s(&img),
        ]),
        "empty image",
    );
    assert!(line.contains(s(&img)), "the error names the image: {line}");
}

#[test]
fn image_is_a_directory() {
    let d = tempdir();
    let line = expect_one_line_error(
        ringfence().args([
            "--socket-path",
            s(&d.path().join("s.sock")),
            "--blk-file",
            s(d.path()),
        ]),
        "image is a directory",
    );
    assert!(
        line.contains(s(d.path())),
        "the error names the image: {line}"
    );
}

#[test]
fn socket_in_use_by_a_live_listener() {
    let d = tempdir();
    let (img1, img2) = (d.path().join("1.img"), d.path().join("2.img"));
    let sock = d.path().join("s.sock");
    sparse(&img1, 4 * MIB);
    sparse(&img2, 4 * MIB);
    let first = Daemon::ringfence_at(ringfence_bin(), &sock, &["--blk-file", s(&img1)]);
    let line = expect_one_line_error(
        ringfence().args(["--socket-path", s(&sock), "--blk-file", s(&img2)]),
        "second ringfence on the same socket",
    );
    assert!(
        line.contains(s(&sock)),
        "the error names the socket: {line}"
    );
    // The first one is undisturbed: its socket still works.
    let mut c = Client::connect(&sock, ClientOpts::default()).unwrap_or_else(|e| {
        panic!(
            "the first ringfence no longer serves: {e}; stderr:\n{}",
            first.stderr()
        )
    });
    assert_eq!(c.capacity(), 4 * MIB);
    c.q().write(0, &[7; 512]).unwrap();
    assert_eq!(
        read_file_at(&img1, 0, 512),
        vec![7; 512],
        "served from the first image"
    );
}

#[test]
fn a_stale_socket_file_is_replaced() {
    // A socket file nobody listens on (a crashed daemon's) does not block a new start.
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 4 * MIB);
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let daemon = Daemon::ringfence_at(ringfence_bin(), &sock, &["--blk-file", s(&img)]);
    let c = Client::connect(&sock, ClientOpts::default())
        .unwrap_or_else(|e| panic!("connect: {e}; stderr:\n{}", daemon.stderr()));
    assert_eq!(c.capacity(), 4 * MIB);
}

#[test]
fn image_already_served_by_another_ringfence() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let (s1, s2) = (d.path().join("1.sock"), d.path().join("2.sock"));
    sparse(&img, 4 * MIB);
    let first = Daemon::ringfence_at(ringfence_bin(), &s1, &["--blk-file", s(&img)]);
    let line = expect_one_line_error(
        ringfence().args([
            "--socket-path",
            s(&s2),
            "--blk-file",
            s(&img),
            "--lock-wait",
            "0",
        ]),
        "second ringfence on the same image",
    );
    assert!(line.contains(s(&img)), "the error names the image: {line}");
    let c = Client::connect(&s1, ClientOpts::default()).unwrap_or_else(|e| {
        panic!(
            "the first ringfence no longer serves: {e}; stderr:\n{}",
            first.stderr()
        )
    });
    assert_eq!(c.capacity(), 4 * MIB);
    // Read-only does not get around the lock either: the writer could change data under it.
    expect_one_line_error(
        ringfence().args([
            "--socket-path",
            s(&s2),
            "--blk-file",
            s(&img),
            "--read-only",
            "--lock-wait",
            "0",
        ]),
        "read-only ringfence on an image already served",
    );
}

/// A daemon restarted after a crash finds the image still locked for a moment (the kernel
/// releases the dead daemon's rings once their I/O has completed): it waits for the lock
/// (`--lock-wait`) and serves as soon as the holder lets go.
#[test]
fn a_second_daemon_waits_for_the_image_lock_and_serves_once_it_is_free() {
    use std::io::{BufRead, BufReader};
    let d = tempdir();
    let img = d.path().join("d.img");
    let (s1, s2) = (d.path().join("1.sock"), d.path().join("2.sock"));
    sparse(&img, 4 * MIB);
    let first = Daemon::ringfence_at(ringfence_bin(), &s1, &["--blk-file", s(&img)]);
    let mut second = ringfence()
        .args([
            "--socket-path",
            s(&s2),
            "--blk-file",
            s(&img),
            "--lock-wait",
            "120",
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the second ringfence");
    let mut lines = BufReader::new(second.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let mut next = |what: &str, seen: &mut String| loop {
        match lines.next() {
            Some(Ok(l)) => {
                seen.push_str(&l);
                seen.push('\n');
                if l.contains(what) {
                    return;
                }
            }
            _ => panic!("the second ringfence ended before {what:?}:\n{seen}"),
        }
    };
    next("locked by another process; waiting", &mut seen);
    send_signal(first.pid(), libc::SIGTERM);
    next(READY_MARKER, &mut seen);
    let c = Client::connect(&s2, ClientOpts::default()).expect("the second ringfence serves");
    assert_eq!(c.capacity(), 4 * MIB);
    drop(c);
    let _ = second.kill();
    let _ = second.wait();
}

#[test]
fn two_read_only_servers_share_an_image() {
    // README: the lock is shared with --read-only.
    let d = tempdir();
    let img = d.path().join("d.img");
    let (s1, s2) = (d.path().join("1.sock"), d.path().join("2.sock"));
    create_image(&img, 4 * MIB, Some(31));
    let a = Daemon::ringfence_at(
        ringfence_bin(),
        &s1,
        &["--blk-file", s(&img), "--read-only"],
    );
    let b = Daemon::ringfence_at(
        ringfence_bin(),
        &s2,
        &["--blk-file", s(&img), "--read-only"],
    );
    for (sock, daemon) in [(&s1, &a), (&s2, &b)] {
        let ro = ClientOpts {
            read_only: true,
            ..Default::default()
        };
        let mut c = Client::connect(sock, ro)
            .unwrap_or_else(|e| panic!("connect: {e}; stderr:\n{}", daemon.stderr()));
        assert_same(
            "read-only data",
            0,
            &c.q().read(0, 8192).unwrap(),
            &pattern(31, 0, 8192),
        );
    }
    // ...but not with a writer.
    expect_one_line_error(
        ringfence().args([
            "--socket-path",
            s(&d.path().join("3.sock")),
            "--blk-file",
            s(&img),
            "--lock-wait",
            "0",
        ]),
        "read-write ringfence on an image served read-only",
    );
}

/// Refuse io_uring_setup with EPERM in the child, as `kernel.io_uring_disabled=2` (or a
/// container runtime's seccomp profile) does.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring_setup(cmd: &mut Command) {
    deny_syscall(cmd, libc::SYS_io_uring_setup);
}

/// Like `deny_io_uring_setup`, for any system call.
#[cfg(target_arch = "x86_64")]
fn deny_syscall(cmd: &mut Command, nr: i64) {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ld_abs = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // seccomp_data: nr at offset 0, arch at offset 4.
    let filter: &'static [libc::sock_filter] = Box::leak(Box::new([
        stmt(ld_abs, 4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ld_abs, 0),
        jeq(nr as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ]));
    let prog: &'static libc::sock_fprog = Box::leak(Box::new(libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    }));
    // An address, so that the hook is Send; the program is leaked, so it stays valid.
    let prog = prog as *const libc::sock_fprog as usize;
    // SAFETY: the hook runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe, with a filter program leaked for the life of the test process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_refused_by_the_kernel() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 4 * MIB);
    let mut cmd = ringfence();
    cmd.args(["--socket-path", s(&sock), "--blk-file", s(&img)]);
    deny_io_uring_setup(&mut cmd);
    let line = expect_one_line_error(&mut cmd, "io_uring_setup refused with EPERM");
    assert!(
        line.contains("io_uring"),
        "the error names io_uring: {line}"
    );
    assert!(!sock.exists(), "no socket left behind ({line})");
}

/// A profile that lets rings be created but not configured (io_uring_register denied) is
/// caught at startup too, not at the first VMM connection.
#[cfg(target_arch = "x86_64")]
#[test]
fn io_uring_register_refused_by_a_seccomp_profile() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 4 * MIB);
    let mut cmd = ringfence();
    cmd.args(["--socket-path", s(&sock), "--blk-file", s(&img)]);
    deny_syscall(&mut cmd, libc::SYS_io_uring_register);
    let line = expect_one_line_error(&mut cmd, "io_uring_register refused with EPERM");
    assert!(line.contains("io_uring_register is blocked"), "{line}");
    assert!(!sock.exists(), "no socket left behind ({line})");
}

/// A ramfs mount, removed on drop: a filesystem without O_DIRECT on every kernel (tmpfs has it
/// from Linux 6.6).
struct Ramfs(tempfile::TempDir);

impl Ramfs {
    fn mount() -> Ramfs {
        let d = tempdir();
        let path = std::ffi::CString::new(s(d.path())).unwrap();
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"ramfs".as_ptr(),
                path.as_ptr(),
                c"ramfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount ramfs: {}", std::io::Error::last_os_error());
        Ramfs(d)
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let path = std::ffi::CString::new(s(self.0.path())).unwrap();
        // SAFETY: umount2(2) with a NUL-terminated string that outlives the call.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

/// By default an image on a filesystem that refuses O_DIRECT is served through the page cache
/// and the log says so; an explicit `--cache none` refuses to start, with the fix.
#[test]
fn an_image_on_a_filesystem_without_o_direct() {
    let fs = Ramfs::mount();
    let d = tempdir();
    let img = fs.0.path().join("d.img");
    sparse(&img, 4 * MIB);
    let mut cmd = ringfence();
    cmd.args([
        "--socket-path",
        s(&d.path().join("a.sock")),
        "--blk-file",
        s(&img),
        "--cache",
        "none",
    ]);
    let line = expect_one_line_error(&mut cmd, "--cache none on ramfs");
    assert!(
        line.contains("refuses O_DIRECT") && line.contains("--cache writeback"),
        "{line}"
    );

    let sock = d.path().join("b.sock");
    let mut cmd = Command::new(ringfence_bin());
    cmd.args(["--socket-path", s(&sock), "--blk-file", s(&img)])
        .env("RUST_LOG", "info");
    serves_after_logging(&mut cmd, &sock, &img, "serving it through the page cache");
}

/// Start `cmd` (a ringfence serving `img` on `sock`), check its log says `needle`, then write
/// through a blkio client and find the data read back and in the image file.
fn serves_after_logging(cmd: &mut Command, sock: &Path, img: &Path, needle: &str) {
    let p = Proc::spawn_until_ready(cmd);
    assert!(p.stderr().contains(needle), "{}", p.stderr());
    let mut c = Client::connect(sock, ClientOpts::default()).expect("connect");
    let data = pattern(6, 512, 8192);
    c.q().write(512, &data).unwrap();
    c.q().flush().unwrap();
    assert_eq!(c.q().read(512, 8192).unwrap(), data);
    assert_same("image file", 512, &read_file_at(img, 512, 8192), &data);
}

#[test]
fn bad_option_values() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 4 * MIB);
    let base = ["--socket-path", s(&sock), "--blk-file", s(&img)];
    let long_serial = "x".repeat(21);
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("--num-queues 0", vec!["--num-queues", "0"]),
        ("--num-queues 65", vec!["--num-queues", "65"]),
        ("--num-queues abc", vec!["--num-queues", "abc"]),
        ("--queue-size 100", vec!["--queue-size", "100"]),
        ("--queue-size 2048", vec!["--queue-size", "2048"]),
        ("--queue-size 1", vec!["--queue-size", "1"]),
        ("--create-size 513", vec!["--create-size", "513"]),
        ("--create-size 12Q", vec!["--create-size", "12Q"]),
        ("--create-size 0", vec!["--create-size", "0"]),
        ("--serial of 21 bytes", vec!["--serial", &long_serial]),
        ("--cache bogus", vec!["--cache", "bogus"]),
        ("--sandbox bogus", vec!["--sandbox", "bogus"]),
        ("--poll-us abc", vec!["--poll-us", "abc"]),
        ("--submit-batch 0", vec!["--submit-batch", "0"]),
        ("--submit-batch 4096", vec!["--submit-batch", "4096"]),
        ("unknown option", vec!["--frobnicate"]),
    ];
    // Every case runs; the failures are reported together.
    let mut failures = Vec::new();
    let mut check = |cmd: &mut Command, case: &str| match one_line_error(cmd, case) {
        Ok(line) if sock.exists() => {
            failures.push(format!("{case}: left a socket behind ({line})"));
            let _ = std::fs::remove_file(&sock);
        }
        Ok(_) => {}
        Err(e) => failures.push(e),
    };
    for (case, extra) in cases {
        check(ringfence().args(base).args(extra), case);
    }
    // Options missing altogether.
    check(ringfence().args(["--blk-file", s(&img)]), "no socket");
    check(
        ringfence().args(["--socket-path", s(&sock)]),
        "no --blk-file",
    );
    check(
        ringfence().args([
            "--socket-path",
            s(&sock),
            "--fd",
            "3",
            "--blk-file",
            s(&img),
        ]),
        "--socket-path and --fd together",
    );
    // --fd that is not a listening unix socket: not open, a regular file.
    check(
        ringfence().args(["--fd", "987", "--blk-file", s(&img)]),
        "--fd not open",
    );
    let file = std::fs::File::open(&img).unwrap();
    let fd = file.as_raw_fd();
    let mut cmd = ringfence();
    cmd.args(["--fd", &fd.to_string(), "--blk-file", s(&img)]);
    inherit_fd(&mut cmd, fd);
    check(&mut cmd, "--fd of a regular file");
    assert!(
        failures.is_empty(),
        "{} of the cases fail:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Let the child inherit `fd` under the same number.
fn inherit_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: the hook runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe, on an fd the parent keeps open until the spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ------------------------------------------------------------------------------------------
// Lifecycle
// ------------------------------------------------------------------------------------------

#[test]
fn create_size_creates_a_sparse_image() {
    let d = tempdir();
    let img = d.path().join("new.img");
    let sock = d.path().join("s.sock");
    let daemon = Daemon::ringfence_at(
        ringfence_bin(),
        &sock,
        &["--blk-file", s(&img), "--create-size", "64M"],
    );
    let m = std::fs::metadata(&img).expect("the image was created");
    assert!(m.is_file());
    assert_eq!(m.len(), 64 * MIB, "image size");
    assert!(
        m.blocks() * 512 < MIB,
        "the new image is sparse: {} bytes allocated",
        m.blocks() * 512
    );
    let mut c = Client::connect(&sock, ClientOpts::default())
        .unwrap_or_else(|e| panic!("connect: {e}; stderr:\n{}", daemon.stderr()));
    assert_eq!(c.capacity(), 64 * MIB);
    assert_eq!(
        c.q().read(32 * MIB, 4096).unwrap(),
        vec![0; 4096],
        "a new image reads zeroes"
    );
}

#[test]
fn create_size_leaves_an_existing_image_alone() {
    let d = tempdir();
    let img = d.path().join("old.img");
    let sock = d.path().join("s.sock");
    create_image(&img, 8 * MIB, Some(21));
    let daemon = Daemon::ringfence_at(
        ringfence_bin(),
        &sock,
        &["--blk-file", s(&img), "--create-size", "64M"],
    );
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        8 * MIB,
        "not resized"
    );
    let mut c = Client::connect(&sock, ClientOpts::default())
        .unwrap_or_else(|e| panic!("connect: {e}; stderr:\n{}", daemon.stderr()));
    assert_eq!(c.capacity(), 8 * MIB);
    assert_same(
        "existing data",
        0,
        &c.q().read(0, 64 * 1024).unwrap(),
        &pattern(21, 0, 64 * 1024),
    );
}

#[test]
fn print_capabilities() {
    // Works without an image or a socket, as vhost-user backend conventions require.
    // What the vhost-user.json schema defines for block backends (checked member by member in
    // tests/vhost_user_json.rs).
    let f = run_to_exit(ringfence().arg("--print-capabilities"));
    assert_eq!(f.status.code(), Some(0), "stderr:\n{}", f.stderr);
    assert_eq!(f.stderr, "", "nothing on stderr");
    let caps: serde_json::Value =
        serde_json::from_str(&f.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", f.stdout));
    assert_eq!(
        caps,
        serde_json::json!({"type": "block", "features": ["read-only", "blk-file"]}),
        "{}",
        f.stdout
    );
}

/// Send `sig` to a running ringfence and check it exits promptly with status 0, removing its
/// socket; a new ringfence then starts on the same path.
fn exits_cleanly_on(sig: i32, with_client: bool) {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 4 * MIB);
    let daemon = Daemon::ringfence_at(ringfence_bin(), &sock, &["--blk-file", s(&img)]);
    let client = with_client.then(|| {
        let mut c = Client::connect(&sock, ClientOpts::default())
            .unwrap_or_else(|e| panic!("connect: {e}; stderr:\n{}", daemon.stderr()));
        c.q().write(0, &[9; 4096]).unwrap();
        c
    });
    let pid = daemon.pid();
    let pidfd = pidfd_open(pid);
    send_signal(pid, sig);
    assert!(
        wait_readable(pidfd.as_raw_fd(), EXIT_TIMEOUT),
        "ringfence did not exit within {EXIT_TIMEOUT:?} of signal {sig}; stderr:\n{}",
        daemon.stderr()
    );
    let stderr = daemon.stderr();
    let code = daemon.terminate(); // only reaps: it has exited
    assert_eq!(
        code,
        Some(0),
        "exit status after signal {sig}; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
    drop(client);
    assert!(!sock.exists(), "the socket file is removed on exit");
    if with_client {
        assert_eq!(
            read_file_at(&img, 0, 4096),
            vec![9; 4096],
            "data written before the signal"
        );
    }
    let again = Daemon::ringfence_at(ringfence_bin(), &sock, &["--blk-file", s(&img)]);
    let c = Client::connect(&sock, ClientOpts::default()).unwrap_or_else(|e| {
        panic!(
            "restart on the same socket: {e}; stderr:\n{}",
            again.stderr()
        )
    });
    assert_eq!(c.capacity(), 4 * MIB);
}

#[test]
fn sigterm_exits_cleanly() {
    exits_cleanly_on(libc::SIGTERM, false);
}

#[test]
fn sigterm_with_a_connected_client_exits_cleanly() {
    exits_cleanly_on(libc::SIGTERM, true);
}

#[test]
fn sigint_exits_cleanly() {
    exits_cleanly_on(libc::SIGINT, true);
}

#[test]
fn a_new_vmm_connection_is_accepted_after_one_disconnects() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 8 * MIB);
    let mut daemon = Daemon::ringfence_at(ringfence_bin(), &sock, &["--blk-file", s(&img)]);
    let connect = |daemon: &Daemon| {
        Client::connect(&sock, ClientOpts::default())
            .unwrap_or_else(|e| panic!("connect: {e}; stderr:\n{}", daemon.stderr()))
    };
    for round in 0..4u64 {
        // Some VMMs go away before starting the device, or right after negotiating.
        match round {
            1 => {
                let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
                b.set_str("path", s(&sock)).unwrap();
                b.connect().unwrap();
                drop(b);
            }
            2 => drop(std::os::unix::net::UnixStream::connect(&sock).unwrap()),
            _ => {}
        }
        let mut c = connect(&daemon);
        let off = round * MIB;
        let data = pattern(round, off, 8192);
        c.q().write(off, &data).unwrap();
        for r in 0..=round {
            assert_same(
                &format!("round {round}: data of round {r}"),
                r * MIB,
                &c.q().read(r * MIB, 8192).unwrap(),
                &pattern(r, r * MIB, 8192),
            );
        }
        drop(c);
        assert!(
            daemon.is_alive(),
            "round {round}: ringfence exited; stderr:\n{}",
            daemon.stderr()
        );
    }
}

#[test]
fn once_exits_after_the_first_connection() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("s.sock");
    sparse(&img, 4 * MIB);
    let daemon = Daemon::ringfence_at(ringfence_bin(), &sock, &["--blk-file", s(&img), "--once"]);
    let pidfd = pidfd_open(daemon.pid());
    let mut c = Client::connect(&sock, ClientOpts::default())
        .unwrap_or_else(|e| panic!("connect: {e}; stderr:\n{}", daemon.stderr()));
    c.q().write(0, &[3; 512]).unwrap();
    drop(c);
    assert!(
        wait_readable(pidfd.as_raw_fd(), EXIT_TIMEOUT),
        "--once: still running after the client left; stderr:\n{}",
        daemon.stderr()
    );
    let stderr = daemon.stderr();
    assert_eq!(daemon.terminate(), Some(0), "stderr:\n{stderr}");
    assert_eq!(read_file_at(&img, 0, 512), vec![3; 512]);
}

#[test]
fn serves_an_inherited_listening_socket() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock: PathBuf = d.path().join("activated.sock");
    sparse(&img, 4 * MIB);
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(ringfence_bin());
    cmd.args(["--fd", &fd.to_string(), "--blk-file", s(&img)])
        .env("RUST_LOG", "info");
    inherit_fd(&mut cmd, fd);
    let p = Proc::spawn_until_ready(&mut cmd);
    drop(listener); // ringfence has its own copy
    let mut c = Client::connect(&sock, ClientOpts::default()).unwrap_or_else(|e| {
        panic!(
            "connect through the inherited socket: {e}; stderr:\n{}",
            p.stderr()
        )
    });
    assert_eq!(c.capacity(), 4 * MIB);
    let data = pattern(5, 4096, 8192);
    c.q().write(4096, &data).unwrap();
    assert_eq!(c.q().read(4096, 8192).unwrap(), data);
    assert_same("image file", 4096, &read_file_at(&img, 4096, 8192), &data);
}

/// A minimal guest or container may have no /proc: the daemon still starts and serves (kick
/// and call fds are then checked by their inode alone, and the log says so).
#[test]
fn serves_without_proc() {
    let d = tempdir();
    let img = d.path().join("d.img");
    let sock = d.path().join("np.sock");
    sparse(&img, 4 * MIB);
    let script = format!(
        "umount -l /proc && exec {} --socket-path {} --blk-file {}",
        s(ringfence_bin()),
        s(&sock),
        s(&img)
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "info");
    serves_after_logging(&mut cmd, &sock, &img, "/proc is not mounted");
}
