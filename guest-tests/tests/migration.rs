//! Live migration of a real guest under load, between two QEMU processes on this host, each
//! with its own backend on the same image (`guest-tests/src/migration.rs` drives a run,
//! `guest-tests/qemu/guest-init.sh`'s `migrate` scenario and `qemu/holdbuf.c` are the guest's
//! side; guest-tests/qemu/README.md, "Live migration", has the measurements).
//!
//! Every run: TCG, `-smp 2`, 512 MiB of guest RAM in a shared memfd, a disk with two queues;
//! fio rounds (two jobs, random writes of 4k-128k verified with crc32c) run without pause and
//! one of them runs through the switchover (it starts on the source, ends and verifies on the
//! destination); holdbuf reads a region of known content with O_DIRECT while QEMU copies RAM
//! (after the first full pass, so its pages were sent once already with their filler), the
//! host overwrites that region on disk after the switchover, and the buffer must still hash to
//! the original content on the destination: only RAM the migration carried, including the
//! pages the backend's io_uring wrote (which QEMU learns of only from the backend's dirty log),
//! gives that hash. `query-migrate` must say `completed`, the guest's kernel log must have no
//! I/O error, and neither backend may log a warning or an error.
//!
//! QEMU: 10.0 from bookworm-backports (guest-tests/qemu/migration-qemu.sh fetches and extracts
//! it, nothing is installed): bookworm's QEMU 7.2 corrupts TCG guests across a migration even
//! with its own virtio-blk (7 of 10 runs passed). With 10.0 the reference passed 10 of 10.
//!
//! These tests gate CI. `migration_matrix` (ignored) is the measuring tool: rounds of chosen
//! backends and plans under chosen settings, one line each (see its doc).

use ringfence_guest_tests::daemon::ringfence_bin;
use ringfence_guest_tests::migration::{self, Backend, Limits, Plan, Report, Setup};

fn setup() -> Setup {
    Setup::from_env(&migration::assets())
}

fn ringfence() -> Backend {
    Backend::Ringfence(ringfence_bin())
}

fn run(backend: &Backend, plan: Plan) -> Report {
    let setup = setup();
    let _slot = migration::slot();
    let r = migration::run(backend, &setup, plan, Limits::default());
    eprintln!(
        "{} / {}: {} (status {:?}, total-time {:?} ms, downtime {:?} ms) in {:.1} s",
        backend.name(),
        plan.name(),
        r.outcome,
        r.status,
        r.total_time_ms,
        r.downtime_ms,
        r.elapsed.as_secs_f64()
    );
    r
}

fn assert_passed(r: &Report, what: &str) {
    assert!(
        r.passed(),
        "{what} failed ({}):\n  {}\n{}",
        r.outcome,
        r.problems.join("\n  "),
        r.transcript
    );
}

/// Lines of `log` that contain `needle`, in order, for messages.
fn has(log: &str, needle: &str) -> bool {
    log.lines().any(|l| l.contains(needle))
}

/// The full check, with QEMU's own virtio-blk first (the reference: the same guest, load and
/// host checks without vhost-user; if it fails, QEMU or the harness is at fault) and then
/// ringfence. Ringfence's source must have logged (dirty logging on), given the image up when
/// QEMU stopped its device, and the destination taken it over.
#[test]
fn ringfence_migrates_under_load_like_the_reference() {
    let reference = run(&Backend::Reference, Plan::Complete);
    assert_passed(
        &reference,
        "the reference migration (QEMU's own virtio-blk)",
    );
    let r = run(&ringfence(), Plan::Complete);
    assert_passed(&r, "the migration on ringfence");
    let (src, dst) = (&r.source_backend_log, &r.destination_backend_log);
    assert!(
        has(src, "dirty logging on"),
        "the source's ringfence never logged dirty pages:\n{src}"
    );
    assert!(
        has(src, "given up"),
        "the source's ringfence never gave the image up:\n{src}"
    );
    assert!(
        has(dst, "taken over"),
        "the destination's ringfence never took the image over:\n{dst}"
    );
}

/// `migrate_cancel` while QEMU copies RAM (after holdbuf's read): the VM goes on on the
/// source, fio's rounds verify there, the held buffer is intact.
#[test]
fn ringfence_migration_cancelled_mid_way_keeps_the_vm_on_the_source() {
    let r = run(&ringfence(), Plan::Cancel);
    assert_passed(&r, "the cancelled migration on ringfence");
    assert!(
        !has(&r.destination_backend_log, "taken over"),
        "the destination's ringfence took the image over in a cancelled migration:\n{}",
        r.destination_backend_log
    );
}

/// The destination QEMU is killed while QEMU copies RAM: the migration fails, the VM goes on
/// on the source.
#[test]
fn ringfence_destination_killed_mid_way_keeps_the_vm_on_the_source() {
    let r = run(&ringfence(), Plan::KillDestination);
    assert_passed(&r, "the migration whose destination died, on ringfence");
}

/// The destination QEMU is killed at the switchover, after the source stopped the VM and its
/// device (`pause-before-switchover`): the source's ringfence has given the image up and must
/// take it back when QEMU resumes the VM there; the guest's I/O and checks go on on the source.
#[test]
fn ringfence_destination_killed_at_switchover_source_takes_the_image_back() {
    let r = run(&ringfence(), Plan::KillDestinationAtSwitchover);
    assert_passed(
        &r,
        "the migration that failed at the switchover, on ringfence",
    );
    let src = &r.source_backend_log;
    let gave = src.find("given up");
    let took = src.rfind("taken over");
    assert!(
        matches!((gave, took), (Some(g), Some(t)) if t > g),
        "the source's ringfence did not give the image up and take it back:\n{src}"
    );
}

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The measuring tool (not a gate): `RINGFENCE_MIG_ROUNDS` (default 1) rounds of every backend
/// in `RINGFENCE_MIG_BACKENDS` (`reference,qsd,ringfence`; default all three) and plan in
/// `RINGFENCE_MIG_PLANS` (`complete,cancel,kill,kill-switchover,idle,busy`; default
/// `complete`), one `MIGRATION-RESULT` line each, then pass counts and the times. Settings from
/// the environment (`Setup::from_env`: `RINGFENCE_MIG_QEMU`, `..._ACCEL`, `..._CPU`,
/// `..._MACHINE`, `..._APPEND`, `..._EXTRA`, `..._CAPS`, `..._KERNEL`, `..._PRIVATE_RAM`);
/// `RINGFENCE_MIG_TRANSCRIPT=1` prints the transcript of every failed run.
///
/// ```sh
/// RINGFENCE_MIG_ROUNDS=10 RINGFENCE_MIG_BACKENDS=reference RINGFENCE_MIG_QEMU=qemu-system-x86_64 \
///   cargo test -p ringfence-guest-tests --test migration -- --ignored --nocapture migration_matrix
/// ```
#[test]
#[ignore = "a measurement, not a gate: run it with --ignored (see its doc)"]
fn migration_matrix() {
    let setup = setup();
    let _slot = migration::slot();
    let rounds: usize = std::env::var("RINGFENCE_MIG_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let backends: Vec<Backend> = list("RINGFENCE_MIG_BACKENDS", "reference,qsd,ringfence")
        .iter()
        .map(|b| match b.as_str() {
            "reference" => Backend::Reference,
            "qsd" => Backend::Qsd,
            "ringfence" => ringfence(),
            other => panic!("RINGFENCE_MIG_BACKENDS: unknown backend {other:?}"),
        })
        .collect();
    let plans: Vec<Plan> = list("RINGFENCE_MIG_PLANS", "complete")
        .iter()
        .map(|p| match p.as_str() {
            "complete" => Plan::Complete,
            "cancel" => Plan::Cancel,
            "kill" => Plan::KillDestination,
            "kill-switchover" => Plan::KillDestinationAtSwitchover,
            "idle" => Plan::Measure { busy: false },
            "busy" => Plan::Measure { busy: true },
            other => panic!("RINGFENCE_MIG_PLANS: unknown plan {other:?}"),
        })
        .collect();
    eprintln!("settings: {}", setup.describe());
    type Tally = (usize, usize, Vec<u64>, Vec<u64>);
    let mut tally: std::collections::BTreeMap<(String, String), Tally> = Default::default();
    for i in 0..rounds {
        for b in &backends {
            for p in &plans {
                let r = migration::run(b, &setup, *p, Limits::default());
                eprintln!(
                    "MIGRATION-RESULT round={} backend={:?} plan={} outcome={:?} status={} total_ms={:?} downtime_ms={:?} elapsed={:.1}s",
                    i + 1,
                    b.name(),
                    p.name(),
                    r.outcome,
                    r.status,
                    r.total_time_ms,
                    r.downtime_ms,
                    r.elapsed.as_secs_f64()
                );
                let e = tally
                    .entry((b.name().to_string(), p.name().to_string()))
                    .or_default();
                e.1 += 1;
                if r.passed() {
                    e.0 += 1;
                    e.2.extend(r.total_time_ms);
                    e.3.extend(r.downtime_ms);
                } else {
                    eprintln!("  problems: {}", r.problems.join("\n  "));
                    if std::env::var_os("RINGFENCE_MIG_TRANSCRIPT").is_some() {
                        eprintln!("{}", r.transcript);
                    }
                }
            }
        }
    }
    let stats = |v: &[u64]| {
        if v.is_empty() {
            return "-".to_string();
        }
        let mut v = v.to_vec();
        v.sort_unstable();
        format!(
            "median {} (min {}, max {})",
            v[v.len() / 2],
            v[0],
            v[v.len() - 1]
        )
    };
    for ((b, p), (ok, n, total, down)) in &tally {
        eprintln!(
            "MIGRATION-SUMMARY {b} / {p}: {ok}/{n} passed; total-time ms {}; downtime ms {}",
            stats(total),
            stats(down)
        );
    }
}
