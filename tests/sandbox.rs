//! The running daemon's threads are sandboxed as the README says: every thread under the
//! process filters, every thread but the signal thread under the removal filter, worker threads
//! under one more (their allowlist), and the log says so. What the worker allowlist refuses is
//! tested in `src/sandbox/seccomp/tests.rs`; what the process filters refuse, call by call, is tested here
//! in a child process under the real filters (`process_filters_refuse_each_denied_call`).

mod common;
#[path = "sandbox/probes.rs"]
mod probes;

use std::time::Duration;

use common::{Backend, BackendOpts, ClientOpts, Target};
use probes::{allowed_checks, denied_probes, io_uring_probe, sys};

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
    // With a stats socket: its thread must be under the process filters too.
    let stats_dir = tempfile::tempdir().unwrap();
    let stats = stats_dir.path().join("stats.sock");
    let mut b = Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            num_queues: 2,
            extra: vec!["--stats-socket".into(), stats.display().to_string()],
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
    // Worker threads are named after their queue.
    let workers: Vec<_> = ts.iter().filter(|t| t.0.starts_with("queue")).collect();
    assert_eq!(workers.len(), 2, "{ts:?}");
    assert_eq!(ts.iter().filter(|t| t.0 == "signals").count(), 1, "{ts:?}");
    assert_eq!(ts.iter().filter(|t| t.0 == "stats").count(), 1, "{ts:?}");
    for (name, mode, filters) in &ts {
        assert_eq!(
            *mode, 2,
            "thread {name} is not in seccomp filter mode: {ts:?}"
        );
        // The process filters (2) on every thread; the removal filter on every thread but the
        // signal thread (it removes the socket file on exit); the allowlist on workers; no
        // io_uring_register on every thread but the control thread (main) and the workers.
        let want = match name.as_str() {
            "signals" => 3,
            "stats" | "call-watchdog" => 4,
            n if n.starts_with("queue") => 4,
            _ => 3,
        };
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
    // One opcode set for a read-only disk: one ring for its one queue.
    assert_eq!(rings.len(), 1, "{log}");
    for l in rings {
        assert!(l.contains("SQE opcodes [READ_FIXED]"), "{l}");
        assert!(
            l.contains("register opcodes [BUFFERS UNREGISTER_BUFFERS]"),
            "{l}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// The process-wide filters, call by call (the probes: tests/sandbox/probes.rs)
// ------------------------------------------------------------------------------------------

/// Run in a child process (see `process_filters_refuse_each_denied_call`): make every probe
/// before and after the real process filters. Does nothing in a normal test run.
#[test]
fn process_filter_child() {
    if std::env::var_os("RINGFENCE_PROCESS_FILTER_CHILD").is_none() {
        return;
    }
    let probes = denied_probes();
    let before: Vec<Option<Result<i64, i32>>> = probes
        .iter()
        .map(|p| p.baseline.then(|| (p.call)()))
        .collect();
    // The kernel gives rings before the filter (else io_uring_setup's refusal proves nothing).
    let ring_before = io_uring_probe();
    // A thread that exists before the filters, as the signal thread does: it keeps unlink.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let early = std::thread::spawn(move || {
        wait.recv().expect("go");
        sys(
            libc::SYS_unlinkat,
            [libc::AT_FDCWD as isize as usize, 0, 0, 0, 0, 0],
        )
    });
    ringfence::sandbox::apply_process_filter().expect("install the process filters");

    let mut failures = Vec::new();
    let mut inconclusive = Vec::new();
    for (p, base) in probes.iter().zip(&before) {
        let got = (p.call)();
        println!("PROBE {:<50} before {base:?} after {got:?}", p.name);
        if got != Err(p.want) {
            failures.push(format!(
                "{}: {got:?} under the filter, want errno {}",
                p.name, p.want
            ));
        } else if base == &Some(Err(p.want)) {
            // The kernel would have said the same without the filter (no privilege here).
            inconclusive.push(p.name);
        }
    }
    for (name, r) in allowed_checks() {
        println!("ALLOWED {name:<50} {r:?}");
        if let Err(e) = r {
            failures.push(format!("{name}: must still work under the filter: {e}"));
        }
    }
    println!("BEFORE io_uring_setup: {ring_before:?}");
    if ring_before.is_err() {
        inconclusive.push("io_uring_setup");
    }
    go.send(()).expect("wake the early thread");
    let early = early.join().expect("early thread");
    println!("EARLY-THREAD unlinkat {early:?}");
    if early == Err(libc::EPERM) {
        failures.push("a thread started before the filter (the signal thread) lost unlink".into());
    }
    let late = std::thread::spawn(|| {
        sys(
            libc::SYS_unlinkat,
            [libc::AT_FDCWD as isize as usize, 0, 0, 0, 0, 0],
        )
    })
    .join()
    .expect("late thread");
    println!("LATE-THREAD unlinkat {late:?}");
    if late != Err(libc::EPERM) {
        failures.push(format!(
            "a thread created after the filter may unlink: {late:?}"
        ));
    }
    // The signal and stats threads and the call watchdog give up io_uring_register at their
    // start; the control thread (here: this one) keeps the buffer swap.
    let register = || {
        sys(
            libc::SYS_io_uring_register,
            [9999, 0, 0, 0, 0, 0], // REGISTER_BUFFERS on a bad fd: EBADF once let through
        )
    };
    let other = std::thread::spawn(move || {
        ringfence::sandbox::forbid_ring_registration().expect("the ring-registration filter");
        register()
    })
    .join()
    .expect("a thread like the stats thread");
    let control = register();
    println!("REGISTER_BUFFERS: control thread {control:?}, other thread {other:?}");
    if control != Err(libc::EBADF) || other != Err(libc::EPERM) {
        failures.push(format!(
            "io_uring_register(REGISTER_BUFFERS): the control thread got {control:?} (want \
             EBADF: let through), a thread that gave it up {other:?} (want EPERM)"
        ));
    }
    if !inconclusive.is_empty() {
        println!(
            "INCONCLUSIVE (refused with EPERM even without the filter): {}",
            inconclusive.join(", ")
        );
    }
    assert!(
        failures.is_empty(),
        "{} finding(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    println!("PROCESS-FILTER-CHILD-OK {} probes", probes.len());
}

/// Issue 15: the process-wide deny list had no behavioural test. In a child process (this test
/// binary again, running `process_filter_child`) under the real `apply_process_filter()`, every
/// denied call must fail with EPERM (clone3 with ENOSYS), what the daemon needs must still
/// work, and only a thread that existed before the filter may unlink.
#[test]
fn process_filters_refuse_each_denied_call() {
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "process_filter_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RINGFENCE_PROCESS_FILTER_CHILD", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("PROCESS-FILTER-CHILD-OK"),
        "child {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // Running as root, every probe is conclusive: the kernel would have answered otherwise.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(
            !stdout.contains("INCONCLUSIVE"),
            "some probes prove nothing here:\n{stdout}"
        );
    }
}
