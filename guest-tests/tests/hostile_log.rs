//! Hostile dirty logs (issue "Live migration"): a compromised VMM hands over logs that are
//! too small, lie about their offset or size, are no memfd or an unsealed one, come before any
//! memory table or without LOG_SHMFD, point the used ring's log at addresses far past the log,
//! or are replaced and switched on and off while I/O runs. Whatever the backend does with
//! them (refuse, accept, drop marks), it never writes outside the log's mapping (the guard
//! bytes around the log are checked on every path), never crashes or hangs, and goes on
//! serving (`Rig::finish`: process alive, a fresh connection served, image and guest RAM
//! unchanged outside what the requests may write).
//!
//! Against ringfence the README's rules are held strictly: a log that is not a memfd sealed
//! against shrinking, lies outside its file, or does not cover guest RAM is refused (the
//! connection ends, with a warning), and marks past the end of a log are
//! dropped with a warning. `RINGFENCE_HOSTILE_TARGET=qsd` runs the same cases against
//! qemu-storage-daemon, whose libvhost-user maps whatever it is given (and asserts, i.e.
//! aborts, on marks past the log's end): expect it to fail several of them.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk;
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::memory::{log_bytes_for, DirtyLog, QEMU_LOG_SEALS};
use ringfence_guest_tests::rig::*;

const WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

fn rig(num_queues: u16) -> Rig {
    Rig::start(RigOpts {
        num_queues,
        ..RigOpts::default()
    })
}

/// A connection with LOG_SHMFD (if `shmfd`) negotiated, guest RAM shared, queues started,
/// logging off.
fn guest(rig: &mut Rig, num_queues: u16, shmfd: bool) -> LogGuest {
    let mut g = LogGuest::new(rig.connect(), num_queues, 256);
    let proto = if shmfd {
        LOG_SESSION_PROTOCOL
    } else {
        LOG_SESSION_PROTOCOL & !pfeat::LOG_SHMFD
    };
    if let Err(e) = g.setup(LOG_SESSION_FEATURES, proto) {
        g.mem.waive_comparison();
        panic!("honest setup: {e}\n{}", rig.stderr_tail());
    }
    g
}

/// Keep a session's memory for the final comparison (the backend may have written its
/// buffers and used rings, nothing else) and check a log's guard bytes.
fn keep(rig: &mut Rig, g: LogGuest, what: &str) {
    rig.keep_session(format!("{what}: guest RAM"), g.into_session(), &[]);
}

fn check_guards(rig: &mut Rig, log: &DirtyLog, what: &str) {
    for f in log.guard_changes() {
        rig.fail(format!("{what}: {f}"));
    }
}

/// How a SET_LOG_BASE ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Refused,
}

/// Send SET_LOG_BASE (`size`, `offset`, `fds`) and judge: a reply is acceptance, a closed
/// connection refusal, a timeout a hang (finding). Against ringfence, `must_refuse` demands
/// the refusal and a warning about the dirty log on stderr.
fn log_base(
    rig: &mut Rig,
    g: &LogGuest,
    size: u64,
    offset: u64,
    fds: &[RawFd],
    must_refuse: bool,
    what: &str,
) -> Outcome {
    let from = rig.daemon.log_len();
    let outcome = match g.fe.set_log_base(size, offset, fds) {
        Ok(_) => Outcome::Accepted,
        Err(FeError::Closed) => Outcome::Refused,
        Err(FeError::Timeout) => {
            rig.fail(format!("{what}: SET_LOG_BASE unanswered (hang)"));
            Outcome::Refused
        }
        Err(e) => {
            rig.fail(format!("{what}: SET_LOG_BASE: {e}"));
            Outcome::Refused
        }
    };
    rig.note(format!("{what}: {outcome:?}"));
    if rig.strict() && must_refuse {
        if outcome == Outcome::Accepted {
            rig.fail(format!("{what}: accepted; ringfence must refuse it"));
        } else {
            match rig
                .daemon
                .wait_for_log_after(from, WAIT, |l| l.to_lowercase().contains("warn"))
            {
                None => rig.fail(format!("{what}: refused without a warning")),
                Some(l) if !l.to_lowercase().contains("dirty log") => rig.note(format!(
                    "{what}: the warning does not name the dirty log (the message was refused \
                     before ringfence's handler saw it): {l}"
                )),
                Some(_) => {}
            }
        }
    }
    if !rig.alive(what) {
        panic!("{what}: the backend died\n{}", rig.stderr_tail());
    }
    outcome
}

/// SET_LOG_BASE with the whole of `log` (judged as [`log_base`] judges, never demanding a
/// refusal).
fn log_whole(rig: &mut Rig, g: &LogGuest, log: &DirtyLog, what: &str) -> Outcome {
    log_base(rig, g, log.size, log.offset, &[log.fd()], false, what)
}

/// An honest log, which must be accepted: a refusal is a finding (and `false`).
fn honest_log(rig: &mut Rig, g: &LogGuest, log: &DirtyLog, what: &str) -> bool {
    if log_whole(rig, g, log, what) == Outcome::Accepted {
        return true;
    }
    rig.fail("an honest log was refused".to_string());
    false
}

/// Against ringfence, marks that fall past the log are dropped with a warning on stderr
/// (since log position `from`): a drop without one is a finding.
fn past_the_log_warned(rig: &mut Rig, from: usize, what: &str) {
    if rig.strict()
        && rig
            .daemon
            .wait_for_log_after(from, WAIT, |l| l.contains("past the end of the VMM's log"))
            .is_none()
    {
        rig.fail(format!(
            "{what}: marks past the log dropped without a warning"
        ));
    }
}

/// With the log accepted: LOG_ALL on, one round of reads on every queue; the data pages must
/// be marked in `log` when `marked` (false: the marks may be dropped).
fn io_with_logging(rig: &mut Rig, g: &mut LogGuest, log: &DirtyLog, marked: bool, what: &str) {
    if let Err(e) = g
        .set_features(true)
        .and_then(|_| (0..g.queues.len()).try_for_each(|q| g.set_vring_addr(q, true)))
    {
        rig.note(format!("{what}: switching LOG_ALL on: {e}"));
        return;
    }
    let reqs = reads(g, 4);
    let r = g.complete(&reqs, WAIT, |_, _, _| {});
    if let Err(e) = r {
        rig.fail(format!("{what}: reads with logging on: {e}"));
        return;
    }
    if marked {
        for r in &reqs {
            let missing: Vec<u64> = r.pages().into_iter().filter(|&p| !log.is_set(p)).collect();
            if !missing.is_empty() {
                rig.fail(format!(
                    "{what}: {}: pages {missing:#x?} not marked",
                    r.what
                ));
            }
        }
    }
}

/// `n` reads of 8 KiB on every queue, published and kicked, spread over the three regions.
fn reads(g: &mut LogGuest, n: usize) -> Vec<LogReq> {
    let mut v = Vec::new();
    for q in 0..g.queues.len() {
        for i in 0..n {
            let b = g.rw_buf(i % 3, 8192, 0);
            v.push(g.request(
                q,
                blk::T_IN,
                (i as u64 * 64 * 1024 + q as u64 * MIB) / blk::SECTOR,
                &[],
                &[(b, 8192)],
                i % 2 == 1,
                "read",
            ));
        }
        g.kick(q);
    }
    v
}

/// A log sized for [`LOG_RAM`] (QEMU's way), guard pages around it.
fn good_log(name: &str) -> DirtyLog {
    DirtyLog::guarded(name, LOG_RAM_END, None)
}

fn pipe_fds() -> (OwnedFd, OwnedFd) {
    pipe()
}

/// One refused-log case on a fresh rig: the log handed over with `size`/`offset`/`fds` must be
/// refused (against ringfence), nothing in `log` (if a memfd of ours) may change, the backend
/// serves on.
fn refused_case(what: &str, size: u64, offset: u64, log: Option<&DirtyLog>, other_fds: &[RawFd]) {
    let mut rig = rig(1);
    let mut g = guest(&mut rig, 1, true);
    let mut fds: Vec<RawFd> = other_fds.to_vec();
    if let Some(l) = log {
        fds.insert(0, l.fd());
    }
    let outcome = log_base(&mut rig, &g, size, offset, &fds, true, what);
    if outcome == Outcome::Accepted {
        // The reference accepted it: see whether it survives using it.
        if let Some(l) = log {
            io_with_logging(&mut rig, &mut g, l, false, what);
        }
    }
    if let Some(l) = log {
        if outcome == Outcome::Refused && !l.untouched() {
            rig.fail(format!("{what}: the refused log's memfd changed"));
        }
        check_guards(&mut rig, l, what);
    }
    keep(&mut rig, g, what);
    rig.finish();
}

#[test]
fn a_log_too_small_for_guest_ram_is_refused() {
    let need = log_bytes_for(LOG_RAM_END);
    let log = DirtyLog::guarded("log-small", LOG_RAM_END, Some(need - 1));
    refused_case(
        "a log one byte short of guest RAM",
        log.size,
        log.offset,
        Some(&log),
        &[],
    );
}

#[test]
fn an_offset_past_the_end_of_the_fd_is_refused() {
    let log = good_log("log-offset");
    let file = log.mem.len() as u64;
    refused_case(
        "offset past the end of the file",
        4096,
        file + 4096,
        Some(&log),
        &[],
    );
}

#[test]
fn a_log_reaching_past_the_end_of_the_fd_is_refused() {
    let log = good_log("log-overrun");
    let file = log.mem.len() as u64;
    refused_case(
        "offset + size past the end of the file",
        file,
        4096,
        Some(&log),
        &[],
    );
}

#[test]
fn huge_and_zero_sizes_are_refused() {
    let log = good_log("log-huge");
    refused_case("mmap_size 2^62", 1 << 62, 4096, Some(&log), &[]);
    let log = good_log("log-wrap");
    refused_case(
        "offset + size wrapping around 2^64",
        u64::MAX - 100,
        4096,
        Some(&log),
        &[],
    );
    let log = good_log("log-zero");
    refused_case("mmap_size 0", 0, 4096, Some(&log), &[]);
}

#[test]
fn an_unsealed_memfd_is_refused() {
    let need = log_bytes_for(LOG_RAM_END);
    let log = DirtyLog::new("log-unsealed", 8192 + need, 4096, need, 0);
    refused_case("an unsealed memfd", need, 4096, Some(&log), &[]);
    let log = DirtyLog::new(
        "log-grow-sealed",
        8192 + need,
        4096,
        need,
        libc::F_SEAL_GROW,
    );
    refused_case(
        "a memfd sealed against growing only",
        need,
        4096,
        Some(&log),
        &[],
    );
}

#[test]
fn fds_that_are_no_memfd_are_refused() {
    let need = log_bytes_for(LOG_RAM_END);
    // A regular file of the right size.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    let f = std::fs::File::create(&path).expect("log file");
    f.set_len(8192 + need).expect("size the log file");
    refused_case("a regular file", need, 4096, None, &[f.as_raw_fd()]);
    let unchanged = std::fs::read(&path).expect("read the log file");
    assert!(
        unchanged.iter().all(|&b| b == 0),
        "the regular file sent as a log was written to"
    );
    let (r, w) = pipe_fds();
    refused_case("a pipe", need, 0, None, &[r.as_raw_fd()]);
    drop(w);
    let e = eventfd();
    refused_case("an eventfd", need, 0, None, &[e.as_raw_fd()]);
    refused_case("no fd at all", need, 0, None, &[]);
}

/// A log whose offset is not page aligned: if accepted, the bits land at that offset and the
/// bytes before it (in the same page) are untouched.
#[test]
fn an_offset_not_page_aligned() {
    let mut rig = rig(1);
    let mut g = guest(&mut rig, 1, true);
    let need = log_bytes_for(LOG_RAM_END);
    let log = DirtyLog::new(
        "log-unaligned",
        100 + need + 4096,
        100,
        need,
        QEMU_LOG_SEALS,
    );
    let what = "a log at offset 100";
    if log_whole(&mut rig, &g, &log, what) == Outcome::Accepted {
        let strict = rig.strict();
        io_with_logging(&mut rig, &mut g, &log, strict, what);
    }
    check_guards(&mut rig, &log, what);
    keep(&mut rig, g, what);
    rig.finish();
}

/// Two fds with one SET_LOG_BASE: refused or the first used; the second is never written.
#[test]
fn two_fds_with_one_log_base() {
    let mut rig = rig(1);
    let mut g = guest(&mut rig, 1, true);
    let a = good_log("log-first");
    let b = good_log("log-second");
    let what = "SET_LOG_BASE with two fds";
    if log_base(
        &mut rig,
        &g,
        a.size,
        a.offset,
        &[a.fd(), b.fd()],
        false,
        what,
    ) == Outcome::Accepted
    {
        io_with_logging(&mut rig, &mut g, &a, false, what);
    }
    check_guards(&mut rig, &a, what);
    if !b.untouched() {
        rig.fail(format!("{what}: the second fd was written"));
    }
    keep(&mut rig, g, what);
    rig.finish();
}

/// SET_LOG_BASE before any memory table (so the log cannot be checked against guest RAM
/// yet), then a table that reaches past the log (region C at 4 GiB, the log covering 8 MiB):
/// marks past the log are dropped (ringfence: with a warning), never written outside it.
#[test]
fn a_log_before_any_memory_table_then_a_table_past_its_end() {
    let mut rig = rig(1);
    let mut g = LogGuest::new(rig.connect(), 1, 256);
    if let Err(e) = g.negotiate(LOG_SESSION_FEATURES, LOG_SESSION_PROTOCOL, true) {
        g.mem.waive_comparison();
        panic!("negotiation: {e}\n{}", rig.stderr_tail());
    }
    let small = log_bytes_for(8 * MIB);
    let log = DirtyLog::guarded("log-early", 8 * MIB, Some(small));
    let what = "SET_LOG_BASE before SET_MEM_TABLE";
    let from = rig.daemon.log_len();
    let outcome = log_whole(&mut rig, &g, &log, what);
    if outcome == Outcome::Accepted {
        let r = g.share_memory().and_then(|_| g.start_queues(true));
        match r {
            Err(e) => rig.note(format!("{what}: memory table past the log: {e}")),
            Ok(()) => {
                let reqs = reads(&mut g, 3);
                if let Err(e) = g.complete(&reqs, WAIT, |_, _, _| {}) {
                    rig.fail(format!("{what}: reads: {e}"));
                }
                // Region A's pages are inside the log: marked.
                for r in reqs.iter().filter(|r| r.bufs[0].0 < 8 * MIB) {
                    let missing: Vec<u64> =
                        r.pages().into_iter().filter(|&p| !log.is_set(p)).collect();
                    if !missing.is_empty() {
                        rig.fail(format!(
                            "{what}: pages {missing:#x?} inside the log not marked"
                        ));
                    }
                }
                past_the_log_warned(&mut rig, from, what);
            }
        }
    }
    check_guards(&mut rig, &log, what);
    keep(&mut rig, g, what);
    rig.finish();
}

/// A log set while LOG_SHMFD was not negotiated: nothing may land in the memfd, with LOG_ALL
/// on and I/O running.
#[test]
fn a_log_base_without_log_shmfd_is_never_written() {
    let mut rig = rig(1);
    let mut g = guest(&mut rig, 1, false);
    let log = good_log("log-noshmfd");
    let what = "SET_LOG_BASE without LOG_SHMFD";
    // Without LOG_SHMFD a frontend waits for no reply: send, then ping (which skips one).
    let sent = g.fe.send(
        code::SET_LOG_BASE,
        0,
        &log_base_payload(log.size, log.offset),
        &[log.fd()],
    );
    rig.judge(what, &sent);
    if rig.responsive(&g.fe, what) {
        let _ = g.set_features(true);
        for q in 0..g.queues.len() {
            let _ = g.set_vring_addr(q, true);
        }
        if rig.responsive(&g.fe, what) {
            let reqs = reads(&mut g, 3);
            if let Err(e) = g.complete(&reqs, WAIT, |_, _, _| {}) {
                rig.note(format!("{what}: reads: {e}"));
            }
        }
    }
    if !log.untouched() {
        let m = format!(
            "{what}: the memfd was written ({} pages marked)",
            log.pages().len()
        );
        if rig.strict() {
            rig.fail(m);
        } else {
            rig.note(m);
        }
    }
    check_guards(&mut rig, &log, what);
    keep(&mut rig, g, what);
    rig.finish();
}

/// VHOST_VRING_F_LOG with `log_guest_addr` far past the log (1 TiB) and at the top of the
/// address space: the marks are dropped (ringfence: counted, with a warning), never written
/// outside the log.
#[test]
fn vring_log_addresses_past_the_log() {
    for (addr, what) in [
        (1u64 << 40, "log_guest_addr 1 TiB"),
        (
            u64::MAX - 100,
            "log_guest_addr at the top of the address space",
        ),
    ] {
        let mut rig = rig(1);
        let mut g = guest(&mut rig, 1, true);
        let log = good_log("log-vring-addr");
        g.vring_log_addr[0] = addr;
        let from = rig.daemon.log_len();
        if log_whole(&mut rig, &g, &log, what) == Outcome::Accepted {
            io_with_logging(&mut rig, &mut g, &log, true, what);
            past_the_log_warned(&mut rig, from, what);
        }
        check_guards(&mut rig, &log, what);
        keep(&mut rig, g, what);
        rig.finish();
    }
}

/// Twenty logs in a row, each replacing the last while 8 reads per queue (two queues) are in
/// flight: once a replacement is answered nothing more lands in the old log; the last log
/// gets the marks; no guard byte of any log changes.
#[test]
fn logs_replaced_while_io_runs() {
    let mut rig = rig(2);
    let mut g = guest(&mut rig, 2, true);
    let first = good_log("log-replaced-0");
    if !honest_log(&mut rig, &g, &first, "first log") {
        keep(&mut rig, g, "first log");
        return rig.finish();
    }
    g.set_features(true).expect("LOG_ALL on");
    for q in 0..2 {
        g.set_vring_addr(q, true)
            .expect("SET_VRING_ADDR with the log flag");
    }
    let mut old: Vec<DirtyLog> = Vec::new();
    let mut cur = first;
    for round in 1..=20 {
        g.rw_reset();
        let reqs = reads(&mut g, 8);
        let next = good_log(&format!("log-replaced-{round}"));
        match g.fe.set_log_base(next.size, next.offset, &[next.fd()]) {
            Ok(_) => {}
            Err(e) => {
                rig.fail(format!("round {round}: replacing the log: {e}"));
                break;
            }
        }
        cur.take();
        old.push(std::mem::replace(&mut cur, next));
        if let Err(e) = g.complete(&reqs, WAIT, |_, _, _| {}) {
            rig.fail(format!("round {round}: {e}"));
            break;
        }
    }
    // One more round, waited for: everything before it is logged, in the current log only.
    let reqs = reads(&mut g, 2);
    if let Err(e) = g.complete(&reqs, WAIT, |_, _, _| {}) {
        rig.fail(format!("last round: {e}"));
    }
    let missing: BTreeSet<u64> = reqs
        .iter()
        .flat_map(|r| r.pages())
        .filter(|&p| !cur.is_set(p))
        .collect();
    if !missing.is_empty() {
        rig.fail(format!("the last log lacks marks for pages {missing:#x?}"));
    }
    for (i, l) in old.iter().enumerate() {
        let p = l.pages();
        if !p.is_empty() {
            rig.fail(format!(
                "log {i}: {} page(s) marked after its replacement was answered",
                p.len()
            ));
        }
        check_guards(&mut rig, l, &format!("log {i}"));
    }
    check_guards(&mut rig, &cur, "the last log");
    keep(&mut rig, g, "logs replaced under I/O");
    rig.finish();
}

/// LOG_ALL switched on and off 50 times while reads are in flight on two queues: no crash,
/// no wedge, no byte outside the log; switched off at the end, nothing more is marked;
/// switched on again, the reads are marked.
#[test]
fn log_all_toggled_under_load() {
    let mut rig = rig(2);
    let mut g = guest(&mut rig, 2, true);
    let log = good_log("log-toggled");
    if !honest_log(&mut rig, &g, &log, "the log") {
        check_guards(&mut rig, &log, "the log");
        keep(&mut rig, g, "the log");
        return rig.finish();
    }
    let t0 = Instant::now();
    for round in 0..50 {
        g.rw_reset();
        let reqs = reads(&mut g, 4);
        let on = round % 2 == 0;
        let r = if on {
            g.set_features(true)
                .and_then(|_| (0..2).try_for_each(|q| g.set_vring_addr(q, true)))
        } else {
            g.stop_logging()
        };
        if let Err(e) = r {
            rig.fail(format!("round {round}: switching LOG_ALL: {e}"));
            break;
        }
        if let Err(e) = g.complete(&reqs, WAIT, |_, _, _| {}) {
            rig.fail(format!("round {round}: {e}"));
            break;
        }
    }
    rig.note(format!("50 rounds in {:?}", t0.elapsed()));
    // Off (round 49 switched it off): a round waited for, then nothing may be marked.
    log.take();
    g.rw_reset();
    let reqs = reads(&mut g, 2);
    let _ = g.complete(&reqs, WAIT, |_, _, _| {});
    let reqs = reads(&mut g, 1);
    let _ = g.complete(&reqs, WAIT, |_, _, _| {});
    let p = log.pages();
    if !p.is_empty() {
        rig.fail(format!(
            "with LOG_ALL off after the toggling, {} page(s) marked",
            p.len()
        ));
    }
    // On: marked. The log must still be set (SET_FEATURES without LOG_ALL unmaps it in
    // ringfence: a new SET_LOG_BASE is QEMU's way; it sends one with each migration).
    let again = log_whole(&mut rig, &g, &log, "log again");
    if again == Outcome::Accepted {
        io_with_logging(
            &mut rig,
            &mut g,
            &log,
            true,
            "LOG_ALL on after the toggling",
        );
    }
    check_guards(&mut rig, &log, "the toggled log");
    keep(&mut rig, g, "LOG_ALL toggled");
    rig.finish();
}
