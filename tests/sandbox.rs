//! The running daemon's threads are sandboxed as the README says: every thread under the
//! process filters, worker threads under one more (their allowlist), and the log says so.
//! What the filters refuse is tested in `src/sandbox.rs`; this checks they are in force.

mod common;

use std::time::Duration;

use common::{Backend, BackendOpts, ClientOpts, Target};

/// (thread name, Seccomp mode, number of filters) of every thread of `pid`.
fn threads(pid: i32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let dir = t.expect("task").path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.push((
            name.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out
}

fn start(extra: &[&str]) -> Backend {
    Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..BackendOpts::default()
        },
    )
}

#[test]
fn every_thread_is_filtered_and_workers_more_strictly() {
    let mut b = Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            num_queues: 2,
            ..BackendOpts::default()
        },
    );
    // Connected: the vhost-user control thread and both workers exist.
    let _client = b.connect(ClientOpts {
        num_queues: 2,
        ..ClientOpts::default()
    });
    let pid = b.daemon().pid();
    let ts = threads(pid);
    let workers: Vec<_> = ts.iter().filter(|t| t.0 == "vring_worker").collect();
    assert_eq!(workers.len(), 2, "{ts:?}");
    for (name, mode, filters) in &ts {
        assert_eq!(
            *mode, 2,
            "thread {name} is not in seccomp filter mode: {ts:?}"
        );
        let want = if name == "vring_worker" { 3 } else { 2 };
        assert_eq!(*filters, want, "thread {name}: {ts:?}");
    }
    assert!(b
        .daemon()
        .wait_for_log("ring enabled", Duration::from_secs(10)));
    let log = b.stderr();
    assert!(log.contains("sandbox: seccomp active"), "{log}");
    // What the kernel enforces is reported once, as the probe found it (tests/kernel_fence.rs
    // checks each kernel's wording); the sandbox line never claims more.
    assert_eq!(log.matches("kernel: Linux ").count(), 1, "{log}");
    let k = ringfence::kernel::Kernel::get();
    assert!(log.contains(&format!("kernel: {k}")), "{log}");
}

#[test]
fn sandbox_none_leaves_threads_unfiltered_and_says_so() {
    let mut b = start(&["--sandbox", "none"]);
    let _client = b.connect(ClientOpts::default());
    let ts = threads(b.daemon().pid());
    assert!(ts.iter().all(|t| t.1 == 0), "{ts:?}");
    assert!(b
        .daemon()
        .wait_for_log("ring enabled", Duration::from_secs(10)));
    let log = b.stderr();
    assert!(log.contains("sandbox: NONE"), "{log}");
    // The rings are restricted regardless.
    assert!(log.contains("required SQE flags [FIXED_FILE]"), "{log}");
}

#[test]
fn read_only_rings_allow_read_fixed_alone() {
    let mut b = Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            read_only: true,
            ..BackendOpts::default()
        },
    );
    let _client = b.connect(ClientOpts {
        read_only: true,
        ..ClientOpts::default()
    });
    assert!(b
        .daemon()
        .wait_for_log("ring enabled", Duration::from_secs(10)));
    let log = b.stderr();
    let rings: Vec<&str> = log.lines().filter(|l| l.contains("ring enabled")).collect();
    assert!(!rings.is_empty(), "{log}");
    // From Linux 7.0 the rings inherit the process allowlist's register opcodes
    // (tests/kernel_fence.rs).
    let own_allowlist = !ringfence::kernel::Kernel::get().at_least(7, 0);
    for l in rings {
        assert!(l.contains("SQE opcodes [READ_FIXED]"), "{l}");
        if own_allowlist {
            assert!(l.contains("register opcodes [PROBE]"), "{l}");
        }
    }
}
