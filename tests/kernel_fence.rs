//! The daemon on the kernel it runs on: with its defaults it starts, serves, and says truthfully
//! what fences its rings there; under task-level io_uring restrictions someone else installed
//! (Linux 7.0+) it refuses to start and says why. The kernel matrix
//! (`guest-tests/qemu/kernel-matrix.sh`) runs this file on 6.1, 6.12 and 7.x; each test states
//! what its kernel must show, so a wall missing where the kernel has it fails, it never skips.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::{pattern, ringfence_bin, run_to_exit, Backend, BackendOpts, ClientOpts, Target, MIB};
use ringfence::kernel::{Kernel, TaskRestrictions};
use ringfence::ring::task::TaskAllowlist;
use ringfence::ring::RingPolicy;

fn start(read_only: bool, num_queues: u16) -> Backend {
    Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            read_only,
            num_queues,
            fill_seed: Some(31),
            ..BackendOpts::default()
        },
    )
}

/// The log lines that say what protects the rings, as the kernel's probe says they must read:
/// every ring made at startup with its own allowlist, on every kernel; the rings serving carry
/// `sqe_ops`; on 7.0+ the process allowlist for any ring made later.
fn assert_fence_logged(b: &mut Backend, sqe_ops: &str) {
    assert!(b
        .daemon()
        .wait_for_log("serving from its ring", Duration::from_secs(20)));
    let log = b.stderr();
    let k = Kernel::get();
    assert!(
        log.contains(&format!("kernel: Linux {}", k.release)),
        "{log}"
    );
    let rings: Vec<&str> = log.lines().filter(|l| l.contains("ring enabled")).collect();
    assert!(!rings.is_empty(), "{log}");
    for r in rings {
        assert!(
            r.contains("ring allowlist: SQE opcodes [")
                && r.contains("register opcodes [BUFFERS UNREGISTER_BUFFERS]"),
            "{}: {r}",
            k.release
        );
    }
    let serving: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("serving from its ring"))
        .collect();
    for r in serving {
        assert!(
            r.contains(&format!("for SQE opcodes [{sqe_ops}]")),
            "{}: {r}",
            k.release
        );
    }
    assert!(
        log.contains("no thread can make another ring (seccomp denies io_uring_setup"),
        "{}: {log}",
        k.release
    );
    if k.at_least(7, 0) {
        assert!(
            log.contains(
                "would inherit the process allowlist (task-level restrictions: SQE opcodes"
            ),
            "{}: {log}",
            k.release
        );
    } else {
        assert!(
            log.contains("no task-level restrictions on this kernel (Linux 7.0+)"),
            "{}: {log}",
            k.release
        );
    }
}

#[test]
fn defaults_serve_two_queues_and_the_log_says_what_fences_the_rings() {
    let mut b = start(false, 2);
    let mut c = b.connect(ClientOpts {
        num_queues: 2,
        ..ClientOpts::default()
    });
    for (i, q) in c.queues.iter_mut().enumerate() {
        let off = i as u64 * 4 * MIB + 4096;
        let data = pattern(100 + i as u64, off, 256 << 10);
        q.write(off, &data).expect("write");
        q.flush().expect("flush");
        let back = q.read(off, data.len()).expect("read");
        common::assert_same("read back", off, &back, &data);
        // Untouched bytes next to the write keep the image's fill.
        let after = q.read(off + data.len() as u64, 4096).expect("read");
        common::assert_same(
            "next to the write",
            off + data.len() as u64,
            &after,
            &pattern(31, off + data.len() as u64, 4096),
        );
    }
    let vectored = if Kernel::get().vectored_fixed {
        " READV_FIXED WRITEV_FIXED"
    } else {
        ""
    };
    assert_fence_logged(
        &mut b,
        &format!("READ_FIXED WRITE_FIXED FSYNC FALLOCATE{vectored}"),
    );
    let on_disk = b.read_image(4 * MIB + 4096, 256 << 10);
    common::assert_same(
        "image",
        0,
        &on_disk,
        &pattern(101, 4 * MIB + 4096, 256 << 10),
    );
}

#[test]
fn read_only_daemon_serves_reads_with_read_fixed_alone() {
    let mut b = start(true, 1);
    let mut c = b.connect(ClientOpts {
        read_only: true,
        ..ClientOpts::default()
    });
    let back = c.q().read(8192, 8192).expect("read");
    common::assert_same("read", 8192, &back, &pattern(31, 8192, 8192));
    assert_fence_logged(&mut b, "READ_FIXED");
    if Kernel::get().at_least(7, 0) {
        let log = b.stderr();
        assert!(
            log.contains("task-level restrictions: SQE opcodes [READ_FIXED]"),
            "{log}"
        );
    }
}

/// A parent (a supervisor) that installed task-level io_uring restrictions hands them to the
/// process it starts: ringfence cannot then give its rings their own allowlist, and must say
/// so instead of serving with an allowlist it did not choose.
#[test]
fn startup_under_someone_elses_task_restrictions_is_refused_with_the_reason() {
    let k = Kernel::get();
    if !k.at_least(7, 0) {
        assert_eq!(k.task_restrictions, TaskRestrictions::Absent, "{k}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    common::create_image(&image, MIB, None);
    let allowlist =
        TaskAllowlist::new(&RingPolicy::for_device(true, true, true)).expect("a task allowlist");
    let mut cmd = Command::new(ringfence_bin());
    cmd.arg("--socket-path")
        .arg(dir.path().join("s.sock"))
        .arg("--blk-file")
        .arg(&image);
    // SAFETY: between fork and exec the hook makes two system calls (prctl and
    // io_uring_register on memory prepared before the fork) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || allowlist.install());
    }
    let done = run_to_exit(&mut cmd);
    assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
    assert!(
        done.stderr
            .contains("already carries task-level io_uring restrictions"),
        "{}",
        done.stderr
    );
    assert_eq!(
        done.stderr.trim().lines().count(),
        1,
        "one line: {}",
        done.stderr
    );
}

/// The ring that serves follows the features the driver negotiated (queues/rings.rs's
/// mapping), among the rings made at startup with their allowlists registered with the kernel: FALLOCATE only with DISCARD or WRITE_ZEROES, FSYNC
/// only with FLUSH or with DISCARD/WRITE_ZEROES (a writethrough cache syncs them), and the
/// vectored opcodes only where the kernel has them.
#[test]
fn ring_opcodes_follow_the_negotiated_features() {
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
    };
    let vectored = if Kernel::get().vectored_fixed {
        " READV_FIXED WRITEV_FIXED"
    } else {
        ""
    };
    let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
    let zeroing = (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
    let cases = [
        (0, "READ_FIXED WRITE_FIXED FSYNC FALLOCATE"),
        (flush | zeroing, "READ_FIXED WRITE_FIXED"),
        (zeroing, "READ_FIXED WRITE_FIXED FSYNC"),
        (flush, "READ_FIXED WRITE_FIXED FSYNC FALLOCATE"),
        (
            1u64 << VIRTIO_BLK_F_DISCARD,
            "READ_FIXED WRITE_FIXED FSYNC FALLOCATE",
        ),
    ];
    for (unwanted, ops) in cases {
        let mut b = start(false, 1);
        let raw = common::RawClient::connect_without(&b.socket, unwanted).expect("raw driver");
        assert_eq!(raw.features() & unwanted, 0);
        assert!(b
            .daemon()
            .wait_for_log("serving from its ring", Duration::from_secs(20)));
        let log = b.stderr();
        let last = log
            .lines()
            .rfind(|l| l.contains("serving from its ring"))
            .expect("a ring");
        let want = format!("SQE opcodes [{ops}{vectored}]");
        assert!(
            last.contains(&want),
            "without features {unwanted:#x}: want {want}, got {last}"
        );
        drop(raw);
    }
}
