//! Dirty logging for live migration (issue "Live migration"), checked deterministically from
//! the frontend's side: the test is the VMM. It negotiates `VHOST_F_LOG_ALL` and the
//! `LOG_SHMFD` protocol feature, hands over a sealed log memfd with guard bytes around the log
//! (SET_LOG_BASE), switches logging on and off exactly as QEMU does (SET_FEATURES with or
//! without LOG_ALL, SET_VRING_ADDR with or without `VHOST_VRING_F_LOG`), and runs requests
//! whose every part lies on pages of its own, so that the log can be judged page by page:
//!
//! * every guest page the device wrote (read data landed by the kernel, status bytes, GET_ID
//!   strings, the used ring) has its bit set, and the bits of a request's pages are set when
//!   its used element becomes visible, not later (QEMU's last log sync follows the last
//!   completion it saw);
//! * pages the device only reads (descriptor tables, avail rings, headers, write data,
//!   indirect tables) are clear, and so is every other page (against ringfence);
//! * nothing outside the log changes in the log's memfd (guard bytes);
//! * with logging off nothing is marked; a request in flight when logging starts is marked
//!   when it completes; a second SET_LOG_BASE replaces the log.
//!
//! Requests are held in flight with the block layer's throttle (`daemon::ReadThrottle`: the
//! image on a loop device, the backend's I/O limited to 1 byte/s until the test lifts the
//! limit), which, unlike a frozen filesystem, holds reads too: a read taken before logging
//! starts and completed after it is the case a backend that decides at submission time gets
//! wrong. That a request is held (taken off the ring, not completed) is shown by a GET_ID made
//! available after it, which completes while its status byte is still unwritten.
//!
//! `RINGFENCE_HOSTILE_TARGET=qsd` runs the same tests against qemu-storage-daemon
//! (libvhost-user), which validates them: where libvhost-user marks otherwise (it marks the
//! used ring only at `log_guest_addr`, and does not mark `avail_event`), the test notes it and
//! holds only ringfence to the stricter rule.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk;
use ringfence_guest_tests::daemon::{Daemon, LoopFs, ReadThrottle};
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::image;
use ringfence_guest_tests::memory::{pages_of, DirtyLog, GuestMemory, Snapshot};
use ringfence_guest_tests::rig::*;

const WAIT: Duration = Duration::from_secs(10);
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// The log for [`LOG_RAM`] as QEMU sizes it, a guard page on each side.
fn new_log(name: &str) -> DirtyLog {
    DirtyLog::guarded(name, LOG_RAM_END, None)
}

/// Who judges: the rig against the rig's target, or a bench (throttled image) against its own.
trait Judge {
    fn strict(&self) -> bool;
    fn fail(&mut self, msg: String);
    fn note(&mut self, msg: String);
}

impl Judge for Rig {
    fn strict(&self) -> bool {
        Rig::strict(self)
    }
    fn fail(&mut self, msg: String) {
        Rig::fail(self, msg)
    }
    fn note(&mut self, msg: String) {
        Rig::note(self, msg)
    }
}

/// The backend offers what dirty logging needs.
fn check_offer(j: &mut dyn Judge, g: &LogGuest) {
    if g.offered & vfeat::LOG_ALL == 0 {
        j.fail(format!(
            "GET_FEATURES {:#x} lacks VHOST_F_LOG_ALL (bit 26)",
            g.offered
        ));
    }
    if g.offered_protocol & pfeat::LOG_SHMFD == 0 {
        j.fail(format!(
            "GET_PROTOCOL_FEATURES {:#x} lacks LOG_SHMFD (bit 1)",
            g.offered_protocol
        ));
    }
}

/// The SET_LOG_BASE reply: ringfence echoes the 16-byte payload (the `vhost` crate's way);
/// libvhost-user answers 8 bytes.
fn check_log_reply(j: &mut dyn Judge, reply: &Msg, log: &DirtyLog) {
    let want = log_base_payload(log.size, log.offset);
    if reply.payload != want {
        let m = format!(
            "SET_LOG_BASE reply carries {} bytes {:02x?}, the request carried {:02x?}",
            reply.payload.len(),
            reply.payload,
            want
        );
        if j.strict() {
            j.fail(m);
        } else {
            j.note(m);
        }
    }
}

/// Wait (bounded) until every page of `pages` is marked in `log`; returns those that never
/// were. The used ring is marked right after the backend writes it, so a frontend that saw a
/// used element may look a moment early.
fn wait_marked(log: &DirtyLog, pages: &BTreeSet<u64>) -> BTreeSet<u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let missing: BTreeSet<u64> = pages.iter().copied().filter(|&p| !log.is_set(p)).collect();
        if missing.is_empty() || Instant::now() >= deadline {
            return missing;
        }
        // Not a synchronisation by time: the loop ends on the observed state; this only
        // spaces out the looks.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The pages of queue `q`'s used ring, and of its `log_guest_addr` range when logging with
/// VHOST_VRING_F_LOG.
fn used_pages(g: &LogGuest, q: usize) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (u, len) = g.queues[q].used_range();
    let ring = pages_of(u, len).collect();
    let at_log_addr = pages_of(g.vring_log_addr[q], len).collect();
    (ring, at_log_addr)
}

fn fmt_pages(p: &BTreeSet<u64>) -> String {
    let v: Vec<String> = p
        .iter()
        .take(12)
        .map(|x| format!("{:#x}", x * 4096))
        .collect();
    format!(
        "{} page(s) at GPA {}{}",
        p.len(),
        v.join(", "),
        if p.len() > 12 { ", ..." } else { "" }
    )
}

/// A read of [`workload`]: offset from the round's base, buffers as (region, length, offset
/// into its first page), indirect, what.
type WorkloadRead = (u64, &'static [(usize, u64, u64)], bool, &'static str);

/// The requests of one round on queue `q`: reads of every shape (one page, several pages,
/// two segments in two regions, across a page boundary, part of a page, indirect, 256 KiB,
/// above 4 GiB), writes (chain and indirect), a flush and a GET_ID. Returns the requests and
/// the image ranges the writes change. `round` keeps the image ranges of rounds apart.
fn workload(g: &mut LogGuest, q: usize, round: u64) -> (Vec<LogReq>, Vec<(u64, u64)>) {
    let base = (q as u64 * 8 + round) * MIB % (32 * MIB);
    let mut reqs = Vec::new();
    let mut writes = Vec::new();
    let reads: [WorkloadRead; 6] = [
        (0, &[(0, 4096, 0)], false, "read of one page"),
        (
            64 * KIB,
            &[(0, 8192, 0), (1, 8192, 0)],
            false,
            "read of 16 KiB in two segments, regions A and B",
        ),
        (
            128 * KIB,
            &[(2, 4096, 2048)],
            false,
            "read of 4 KiB across a page boundary, above 4 GiB",
        ),
        (
            192 * KIB,
            &[(0, 512, 1024)],
            false,
            "read of 512 bytes inside a page",
        ),
        (
            256 * KIB,
            &[(2, 8192, 0)],
            true,
            "indirect read of 8 KiB above 4 GiB",
        ),
        (512 * KIB, &[(0, 256 * KIB, 0)], false, "read of 256 KiB"),
    ];
    for (off, bufs, indirect, what) in reads {
        let bufs: Vec<(u64, u64)> = bufs
            .iter()
            .map(|&(region, len, in_page)| (g.rw_buf(region, len, in_page), len))
            .collect();
        let sector = (base + off) / blk::SECTOR;
        reqs.push(g.request(q, blk::T_IN, sector, &[], &bufs, indirect, what));
    }
    // (offset from 16 MiB + `base`, length, data byte i = i * mul + add, indirect, what)
    let woff = 16 * MIB + base;
    let wrs = [
        (0, 8192, 13, q as u32, false, "write of 8 KiB"),
        (64 * KIB, 4096, 7, 1, true, "indirect write of 4 KiB"),
    ];
    for (off, len, mul, add, indirect, what) in wrs {
        let data: Vec<u8> = (0..len as u32).map(|i| (i * mul + add) as u8).collect();
        let sector = (woff + off) / blk::SECTOR;
        reqs.push(g.request(q, blk::T_OUT, sector, &data, &[], indirect, what));
        writes.push((woff + off, len));
    }
    reqs.push(g.request(q, blk::T_FLUSH, 0, &[], &[], false, "flush"));
    let id = g.rw_buf(1, blk::ID_LEN as u64, 100);
    let id_buf = [(id, blk::ID_LEN as u64)];
    reqs.push(g.request(q, blk::T_GET_ID, 0, &[], &id_buf, false, "GET_ID"));
    (reqs, writes)
}

/// Check one answered request: status OK, read data right, and (if `logging`) every page it
/// wrote marked already, now that its used element is visible.
fn judge_completion(j: &mut dyn Judge, mem: &GuestMemory, log: Option<&DirtyLog>, r: &LogReq) {
    let st = mem.read_u8(r.status);
    if st != blk::S_OK {
        j.fail(format!("{}: answered {}", r.what, blk::status_name(st)));
        return;
    }
    if let Some(off) = r.read_off {
        let mut o = off;
        for &(a, l) in &r.bufs {
            if mem.read(a, l as usize) != image::pattern(o, l as usize) {
                j.fail(format!("{}: the data read is not the image's", r.what));
            }
            o += l;
        }
    }
    if let Some(log) = log {
        let missing: BTreeSet<u64> = r.pages().into_iter().filter(|&p| !log.is_set(p)).collect();
        if !missing.is_empty() {
            j.fail(format!(
                "{}: {} written by the device not marked in the log when its used element was \
                 visible",
                r.what,
                fmt_pages(&missing)
            ));
        }
    }
}

/// Judge the whole log after requests `reqs` completed while logging (everything else the
/// device wrote is in `changed`): written pages marked, read-only pages clear, nothing else
/// marked (against ringfence), guards intact.
fn judge_log(
    j: &mut dyn Judge,
    g: &LogGuest,
    log: &DirtyLog,
    reqs: &[LogReq],
    changed: &BTreeSet<u64>,
    queues: &[usize],
) {
    let mut expected: BTreeSet<u64> = reqs.iter().flat_map(|r| r.pages()).collect();
    // Pages the reference may leave unmarked (noted below), left out of the other checks.
    let mut excused: BTreeSet<u64> = BTreeSet::new();
    for &q in queues {
        let (mut ring, mut at_addr) = used_pages(g, q);
        let event_page = g.queues[q].avail_event_gpa() / 4096;
        if !j.strict() && g.vring_log_addr[q] == g.queues[q].used {
            // libvhost-user does not log avail_event (vring_set_avail_event), which lies on
            // a page of its own here.
            if !log.is_set(event_page) {
                j.note(format!(
                    "queue {q}: the page of avail_event ({:#x}) is not marked",
                    event_page * 4096
                ));
                excused.insert(event_page);
                ring.remove(&event_page);
                at_addr.remove(&event_page);
            }
        }
        let missing = wait_marked(log, &at_addr);
        if !missing.is_empty() {
            j.fail(format!(
                "queue {q}: the used ring's log range at log_guest_addr {:#x} (VHOST_VRING_F_LOG): \
                 {} not marked",
                g.vring_log_addr[q],
                fmt_pages(&missing)
            ));
        }
        expected.extend(at_addr.iter().copied());
        let missing = wait_marked(log, &ring);
        if !missing.is_empty() {
            let m = format!(
                "queue {q}: the used ring at GPA {:#x}, written by the device: {} not marked",
                g.queues[q].used,
                fmt_pages(&missing)
            );
            if j.strict() || g.vring_log_addr[q] == g.queues[q].used {
                j.fail(m);
            } else {
                j.note(format!(
                    "{m} (libvhost-user marks the used ring at log_guest_addr only)"
                ));
                excused.extend(missing);
            }
        }
        expected.extend(ring.iter().copied());
    }
    let marked = log.pages();
    let marked_or_excused: BTreeSet<u64> = marked.union(&excused).copied().collect();
    let unmarked_writes: BTreeSet<u64> = changed.difference(&marked_or_excused).copied().collect();
    if !unmarked_writes.is_empty() {
        j.fail(format!(
            "guest pages the device changed are not marked: {}",
            fmt_pages(&unmarked_writes)
        ));
    }
    let missing: BTreeSet<u64> = expected.difference(&marked_or_excused).copied().collect();
    if !missing.is_empty() {
        j.fail(format!(
            "pages the device wrote (buffers, status bytes, used rings) not marked: {}",
            fmt_pages(&missing)
        ));
    }
    let ro: BTreeSet<u64> = marked.intersection(&g.ro_pages).copied().collect();
    if !ro.is_empty() {
        j.fail(format!(
            "pages the device only reads (descriptor tables, avail rings, headers, write \
             data, indirect tables) are marked: {}",
            fmt_pages(&ro)
        ));
    }
    let extra: BTreeSet<u64> = marked
        .difference(&expected)
        .copied()
        .filter(|p| !g.ro_pages.contains(p))
        .collect();
    if !extra.is_empty() {
        let m = format!(
            "pages the device never wrote are marked: {}",
            fmt_pages(&extra)
        );
        if j.strict() {
            j.fail(m);
        } else {
            j.note(m);
        }
    }
    for f in log.guard_changes() {
        j.fail(f);
    }
}

/// Lay out one round of [`workload`] on every queue, publish and kick, wait for every
/// answer (judging each as it comes), and return the requests, the image ranges written and
/// the pages the device changed.
fn run_round(
    j: &mut dyn Judge,
    g: &mut LogGuest,
    log: Option<&DirtyLog>,
    round: u64,
) -> (Vec<LogReq>, Vec<(u64, u64)>, BTreeSet<u64>) {
    let mut reqs = Vec::new();
    let mut writes = Vec::new();
    for q in 0..g.queues.len() {
        let (r, w) = workload(g, q, round);
        reqs.extend(r);
        writes.extend(w);
    }
    let snap = g.mem.snapshot();
    for q in 0..g.queues.len() {
        g.kick(q);
    }
    let changed = complete_judged(j, g, &reqs, log, &snap, &format!("round {round}"));
    (reqs, writes, changed)
}

/// Wait for `reqs` (made available since `snap`) to be answered, judging each as it comes
/// (see [`judge_completion`]); one that is not is a finding, `what: why`. Returns the pages
/// the device changed since `snap`.
fn complete_judged(
    j: &mut dyn Judge,
    g: &mut LogGuest,
    reqs: &[LogReq],
    log: Option<&DirtyLog>,
    snap: &Snapshot,
    what: &str,
) -> BTreeSet<u64> {
    let mut findings = Vec::new();
    let r = g.complete(reqs, WAIT, |mem, r, _u| {
        let mut c = Collect::default();
        judge_completion(&mut c, mem, log, r);
        findings.extend(c.0);
    });
    for f in findings {
        j.fail(f);
    }
    if let Err(e) = r {
        j.fail(format!("{what}: {e}"));
    }
    g.mem.changed_pages(snap)
}

/// Findings gathered inside a closure (strict: used where the judge cannot be borrowed).
#[derive(Default)]
struct Collect(Vec<String>);

impl Judge for Collect {
    fn strict(&self) -> bool {
        target() == Target::Ringfence
    }
    fn fail(&mut self, msg: String) {
        self.0.push(msg);
    }
    fn note(&mut self, msg: String) {
        eprintln!("NOTE: {msg}");
    }
}

/// A read on every queue, waited for: once its used element is visible, the worker has done
/// (and logged) everything for the requests before it on that queue.
fn sentinel(j: &mut dyn Judge, g: &mut LogGuest, log: Option<&DirtyLog>) -> Vec<LogReq> {
    let mut reqs = Vec::new();
    for q in 0..g.queues.len() {
        let b = g.rw_buf(0, 4096, 0);
        reqs.push(g.request(
            q,
            blk::T_IN,
            (PROBE_OFFSET + q as u64 * 4096) / blk::SECTOR,
            &[],
            &[(b, 4096)],
            false,
            "sentinel read",
        ));
        g.kick(q);
    }
    let mut findings = Vec::new();
    if let Err(e) = g.complete(&reqs, WAIT, |mem, r, _| {
        let mut c = Collect::default();
        judge_completion(&mut c, mem, log, r);
        findings.extend(c.0);
    }) {
        findings.push(format!("sentinel: {e}"));
    }
    for f in findings {
        j.fail(f);
    }
    reqs
}

fn log_rig(num_queues: u16) -> Rig {
    Rig::start(RigOpts {
        num_queues,
        ..RigOpts::default()
    })
}

fn end(mut rig: Rig, g: LogGuest, logs: &[&DirtyLog], writes: &[(u64, u64)]) {
    for l in logs {
        for f in l.guard_changes() {
            rig.fail(f);
        }
    }
    rig.image_writes.extend_from_slice(writes);
    rig.keep_session("guest RAM", g.into_session(), &[]);
    rig.finish();
}

/// The main case: two queues, every kind of request, logging switched on as QEMU does at
/// the start of a migration (`at_start` false: SET_LOG_BASE, SET_FEATURES with LOG_ALL,
/// SET_VRING_ADDR with the log flag, on running queues) or as it starts a device while
/// migrating (`at_start`: SET_FEATURES with LOG_ALL, memory table, rings with the log flag,
/// then SET_LOG_BASE).
fn every_written_page_is_marked(event_idx: bool, at_start: bool) {
    let mut rig = log_rig(2);
    let mut g = LogGuest::new(rig.connect(), 2, 256);
    let features = LOG_SESSION_FEATURES | if event_idx { vfeat::RING_EVENT_IDX } else { 0 };
    let log = new_log("dirty-log");
    let mut writes = Vec::new();
    let reply = if at_start {
        g.negotiate(features, LOG_SESSION_PROTOCOL, true)
            .and_then(|_| g.share_memory())
            .and_then(|_| g.start_queues(true))
            .and_then(|_| g.fe.set_log_base(log.size, log.offset, &[log.fd()]))
    } else {
        let r = g.setup(features, LOG_SESSION_PROTOCOL);
        if let Err(e) = r {
            panic!("setup: {e}\n{}", rig.stderr_tail());
        }
        // Requests before logging: nothing to judge in the log, which does not exist yet.
        let (_, w, _) = run_round(&mut rig, &mut g, None, 0);
        writes.extend(w);
        g.start_logging(&log)
    };
    let reply = reply.unwrap_or_else(|e| panic!("setting up logging: {e}\n{}", rig.stderr_tail()));
    check_offer(&mut rig, &g);
    check_log_reply(&mut rig, &reply, &log);
    if event_idx && g.features & vfeat::RING_EVENT_IDX == 0 {
        rig.fail("RING_EVENT_IDX not offered");
    }
    assert!(
        g.log_all,
        "LOG_ALL not offered: nothing to test\n{}",
        rig.stderr_tail()
    );
    let (reqs, w, changed) = run_round(&mut rig, &mut g, Some(&log), 1);
    writes.extend(w);
    judge_log(&mut rig, &g, &log, &reqs, &changed, &[0, 1]);
    // The end of a migration: the rings stop (GET_VRING_BASE); the log holds what it held.
    for q in 0..2 {
        if let Err(e) = g.fe.get_vring_base(q) {
            rig.fail(format!("GET_VRING_BASE {q}: {e}"));
        }
    }
    end(rig, g, &[&log], &writes);
}

#[test]
fn every_page_the_device_writes_is_marked_and_no_other() {
    every_written_page_is_marked(false, false);
}

#[test]
fn with_event_idx_and_logging_from_the_start_every_written_page_is_marked() {
    every_written_page_is_marked(true, true);
}

#[test]
fn nothing_is_marked_while_logging_is_off() {
    let mut rig = log_rig(2);
    let mut g = LogGuest::new(rig.connect(), 2, 256);
    let log = new_log("dirty-log-off");
    g.setup(LOG_SESSION_FEATURES, LOG_SESSION_PROTOCOL)
        .unwrap_or_else(|e| panic!("setup: {e}\n{}", rig.stderr_tail()));
    check_offer(&mut rig, &g);
    let mut writes = Vec::new();

    // 1. A log, but LOG_ALL never acked: nothing is marked.
    let reply =
        g.fe.set_log_base(log.size, log.offset, &[log.fd()])
            .unwrap_or_else(|e| panic!("SET_LOG_BASE: {e}\n{}", rig.stderr_tail()));
    check_log_reply(&mut rig, &reply, &log);
    let (_, w, _) = run_round(&mut rig, &mut g, None, 0);
    writes.extend(w);
    sentinel(&mut rig, &mut g, None);
    let marked = log.pages();
    if !marked.is_empty() {
        rig.fail(format!(
            "with a log set but LOG_ALL not acked, {} marked",
            fmt_pages(&marked)
        ));
    }

    // 2. LOG_ALL on: marked.
    g.set_features(true).expect("SET_FEATURES with LOG_ALL");
    for q in 0..2 {
        g.set_vring_addr(q, true)
            .expect("SET_VRING_ADDR with the log flag");
    }
    let (reqs, w, changed) = run_round(&mut rig, &mut g, Some(&log), 1);
    writes.extend(w);
    judge_log(&mut rig, &g, &log, &reqs, &changed, &[0, 1]);

    // 3. LOG_ALL off again (QEMU's order): nothing new is marked, and the log is unmapped.
    g.stop_logging().expect("SET_FEATURES without LOG_ALL");
    let deadline = Instant::now() + WAIT;
    while rig.daemon.maps_memfd("dirty-log-off") && Instant::now() < deadline {
        // Not a synchronisation by time: the loop ends on the observed state; this only
        // spaces out the looks.
        std::thread::sleep(Duration::from_millis(1));
    }
    if rig.daemon.maps_memfd("dirty-log-off") {
        let m = "after SET_FEATURES without LOG_ALL the backend still maps the log".to_string();
        if rig.strict() {
            rig.fail(m);
        } else {
            rig.note(m);
        }
    }
    // Whatever was marked up to the end of step 2 may stay; clear it.
    log.take();
    let (_, w, _) = run_round(&mut rig, &mut g, None, 2);
    writes.extend(w);
    sentinel(&mut rig, &mut g, None);
    let marked = log.pages();
    if !marked.is_empty() {
        rig.fail(format!(
            "after SET_FEATURES without LOG_ALL, {} marked",
            fmt_pages(&marked)
        ));
    }
    end(rig, g, &[&log], &writes);
}

/// VHOST_VRING_F_LOG with a `log_guest_addr` that is not the used ring's address: the range
/// there is marked (libvhost-user marks only that range; ringfence marks the used ring too).
#[test]
fn the_vring_log_address_is_marked() {
    let mut rig = log_rig(2);
    let mut g = LogGuest::new(rig.connect(), 2, 256);
    g.setup(LOG_SESSION_FEATURES, LOG_SESSION_PROTOCOL)
        .unwrap_or_else(|e| panic!("setup: {e}\n{}", rig.stderr_tail()));
    for q in 0..2 {
        g.vring_log_addr[q] = g.rw_buf(1, 4096, 0);
    }
    let log = new_log("dirty-log-addr");
    let reply = g
        .start_logging(&log)
        .unwrap_or_else(|e| panic!("logging on: {e}\n{}", rig.stderr_tail()));
    check_log_reply(&mut rig, &reply, &log);
    let (reqs, writes, changed) = run_round(&mut rig, &mut g, Some(&log), 0);
    judge_log(&mut rig, &g, &log, &reqs, &changed, &[0, 1]);
    end(rig, g, &[&log], &writes);
}

/// SET_LOG_FD (which the `vhost` crate does not dispatch: ringfence takes it off the socket
/// itself): an eventfd the backend signals after it wrote the log. Accepted (acked), signalled
/// once logging has written something; a pipe is refused with a nack and the connection goes
/// on; a SET_LOG_FD without an fd takes it back.
#[test]
fn the_log_fd_is_signalled_after_the_log_is_written() {
    use ringfence_guest_tests::frontend::{code, eventfd, eventfd_drain, pipe, FeError};
    use std::os::fd::AsRawFd;
    let mut rig = log_rig(2);
    let mut g = LogGuest::new(rig.connect(), 2, 256);
    g.setup(LOG_SESSION_FEATURES, LOG_SESSION_PROTOCOL)
        .unwrap_or_else(|e| panic!("setup: {e}\n{}", rig.stderr_tail()));
    let log = new_log("dirty-log-fd");
    let (r, _w) = pipe();
    match g.fe.set_acked(code::SET_LOG_FD, &[], &[r.as_raw_fd()]) {
        Err(FeError::Nack(_)) => {}
        other => rig.fail(format!("SET_LOG_FD with a pipe: {other:?}, not a nack")),
    }
    let efd = eventfd();
    g.fe.set_acked(code::SET_LOG_FD, &[], &[efd.as_raw_fd()])
        .unwrap_or_else(|e| panic!("SET_LOG_FD with an eventfd: {e}\n{}", rig.stderr_tail()));
    let reply = g
        .start_logging(&log)
        .unwrap_or_else(|e| panic!("logging on: {e}\n{}", rig.stderr_tail()));
    check_log_reply(&mut rig, &reply, &log);
    eventfd_drain(efd.as_raw_fd());
    let (reqs, writes, changed) = run_round(&mut rig, &mut g, Some(&log), 0);
    judge_log(&mut rig, &g, &log, &reqs, &changed, &[0, 1]);
    if !eventfd_drain(efd.as_raw_fd()) {
        rig.fail("the log was written and the SET_LOG_FD eventfd was not signalled".to_string());
    }
    // No fd: the backend forgets it; nothing more is signalled.
    g.fe.set_acked(code::SET_LOG_FD, &[], &[])
        .unwrap_or_else(|e| panic!("SET_LOG_FD without fd: {e}\n{}", rig.stderr_tail()));
    let (_, w2, _) = run_round(&mut rig, &mut g, Some(&log), 1);
    if eventfd_drain(efd.as_raw_fd()) {
        rig.fail("the eventfd was signalled after SET_LOG_FD took it back".to_string());
    }
    let writes: Vec<_> = writes.into_iter().chain(w2).collect();
    end(rig, g, &[&log], &writes);
}

// ------------------------------------------------------------------------------------------
// Requests held in flight: the image on a loop device whose I/O the test throttles.
// ------------------------------------------------------------------------------------------

const BENCH_IMAGE: u64 = 64 * MIB;

/// A backend (the suite's target) serving a pattern image on a loop device, in a blkio
/// group the test can hold. Drop order: the throttle is lifted first, then the backend goes,
/// then the filesystem.
struct Bench {
    throttle: ReadThrottle,
    daemon: Daemon,
    image: PathBuf,
    findings: Vec<String>,
    _fs: LoopFs,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        let fs = LoopFs::new(128 * MIB);
        let dir = tempfile::tempdir().expect("socket dir");
        let image = fs.path().join("disk.img");
        image::create(&image, BENCH_IMAGE);
        std::fs::File::open(&image)
            .and_then(|f| f.sync_all())
            .expect("sync the image");
        let socket = dir.path().join("vhost.sock");
        let daemon = match target() {
            Target::Ringfence => Daemon::ringfence(
                &socket,
                &["--blk-file", image.to_str().unwrap(), "--num-queues", "1"],
            ),
            Target::Qsd => Daemon::qemu_storage_daemon(&socket, &image, false, 1),
        };
        let mut throttle = ReadThrottle::new(&fs.devnum());
        throttle.add(daemon.pid());
        Bench {
            throttle,
            daemon,
            image,
            findings: Vec::new(),
            _fs: fs,
            _dir: dir,
        }
    }

    fn connect(&self) -> Frontend {
        let mut fe = Frontend::connect(&self.daemon.socket).expect("connect");
        fe.timeout = WAIT;
        fe
    }

    fn stderr_tail(&self) -> String {
        let s = self.daemon.stderr();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn finish(mut self, g: LogGuest, logs: &[&DirtyLog], writes: &[(u64, u64)]) {
        for l in logs {
            for f in l.guard_changes() {
                self.findings.push(f);
            }
        }
        let mut allowed = g.queues.iter().map(|q| q.used_range()).collect::<Vec<_>>();
        allowed.extend(g.queues.iter().flat_map(|q| q.writable.iter().copied()));
        drop(g.fe);
        for f in g.mem.stray_writes_since_creation(&allowed) {
            self.findings.push(f);
        }
        self.throttle.release();
        let img_findings = image::verify(&self.image, BENCH_IMAGE, writes);
        self.findings.extend(img_findings);
        if !self.daemon.is_alive() {
            self.findings.push("the backend died".into());
        }
        assert!(
            self.findings.is_empty(),
            "{} finding(s):\n  - {}\n--- backend stderr ---\n{}",
            self.findings.len(),
            self.findings.join("\n  - "),
            self.stderr_tail()
        );
    }
}

impl Judge for Bench {
    fn strict(&self) -> bool {
        target() == Target::Ringfence
    }
    fn fail(&mut self, msg: String) {
        self.findings.push(msg);
    }
    fn note(&mut self, msg: String) {
        eprintln!("NOTE: {msg}");
    }
}

/// Hold the device's I/O, make `held` available on queue 0 with a GET_ID behind them, and
/// wait for the GET_ID: the held requests were taken before it and are in flight. Panics if
/// one of them completed anyway (the scenario would hold nothing).
fn hold(b: &mut Bench, g: &mut LogGuest, held: &[LogReq]) -> LogReq {
    let id = g.rw_buf(1, blk::ID_LEN as u64, 0);
    let gid = g.request(
        0,
        blk::T_GET_ID,
        0,
        &[],
        &[(id, blk::ID_LEN as u64)],
        false,
        "GET_ID",
    );
    g.kick(0);
    if let Err(e) = g.complete(std::slice::from_ref(&gid), WAIT, |_, _, _| {}) {
        panic!(
            "the GET_ID behind the held requests: {e} (used idx {})\n{}",
            g.queues[0].used_idx(&g.mem),
            b.stderr_tail()
        );
    }
    for r in held {
        assert_eq!(
            g.mem.read_u8(r.status),
            0xff,
            "{} completed although its I/O is throttled: the scenario holds nothing",
            r.what
        );
    }
    gid
}

/// Lay out (not kick) a 64 KiB read across 17 pages above 4 GiB and a 4 KiB write on
/// queue 0.
fn held_pair(g: &mut LogGuest) -> (LogReq, LogReq, (u64, u64)) {
    let buf = g.rw_buf(2, 64 * KIB, 512);
    let r = g.request(
        0,
        blk::T_IN,
        MIB / blk::SECTOR,
        &[],
        &[(buf, 64 * KIB)],
        false,
        "held read of 64 KiB",
    );
    let data = vec![0x3c; 4096];
    let woff = 2 * MIB;
    let w = g.request(
        0,
        blk::T_OUT,
        woff / blk::SECTOR,
        &data,
        &[],
        true,
        "held indirect write",
    );
    (r, w, (woff, 4096))
}

/// A read and a write taken off the ring before logging starts and completed after it: the
/// read's data (landed by the kernel after logging started), both status bytes and the used
/// ring are marked, by the time each used element is visible.
#[test]
fn requests_in_flight_when_logging_starts_are_marked_when_they_complete() {
    let mut b = Bench::new();
    let mut g = LogGuest::new(b.connect(), 1, 256);
    g.setup(LOG_SESSION_FEATURES, LOG_SESSION_PROTOCOL)
        .unwrap_or_else(|e| panic!("setup: {e}\n{}", b.stderr_tail()));
    check_offer(&mut b, &g);
    b.throttle.hold(true);
    let (r, w, wr) = held_pair(&mut g);
    let gid = hold(&mut b, &mut g, &[r.clone(), w.clone()]);

    let log = new_log("dirty-log-inflight");
    let reply = g
        .start_logging(&log)
        .unwrap_or_else(|e| panic!("logging on: {e}\n{}", b.stderr_tail()));
    check_log_reply(&mut b, &reply, &log);
    for x in [&r, &w] {
        assert_eq!(
            g.mem.read_u8(x.status),
            0xff,
            "{} completed before the throttle was lifted",
            x.what
        );
    }
    let snap = g.mem.snapshot();
    b.throttle.release();
    let held = [r.clone(), w.clone()];
    let lifted = "after the throttle was lifted";
    let changed = complete_judged(&mut b, &mut g, &held, Some(&log), &snap, lifted);
    judge_log(&mut b, &g, &log, &[r, w], &changed, &[0]);
    // The GET_ID completed before logging started: its pages are not in the log.
    let early: BTreeSet<u64> = gid.pages().into_iter().filter(|&p| log.is_set(p)).collect();
    if !early.is_empty() {
        b.fail(format!(
            "the GET_ID answered before logging started is marked: {}",
            fmt_pages(&early)
        ));
    }
    b.finish(g, &[&log], &[wr]);
}

/// A second SET_LOG_BASE replaces the log: a read in flight across the replacement is marked
/// in the new log when it completes, and once the reply came nothing is written to the old.
#[test]
fn a_second_log_base_replaces_the_first() {
    let mut b = Bench::new();
    let mut g = LogGuest::new(b.connect(), 1, 256);
    g.setup(LOG_SESSION_FEATURES, LOG_SESSION_PROTOCOL)
        .unwrap_or_else(|e| panic!("setup: {e}\n{}", b.stderr_tail()));
    let old = new_log("dirty-log-old");
    let reply = g
        .start_logging(&old)
        .unwrap_or_else(|e| panic!("logging on: {e}\n{}", b.stderr_tail()));
    check_log_reply(&mut b, &reply, &old);
    let (reqs, mut writes, changed) = run_round(&mut b, &mut g, Some(&old), 0);
    judge_log(&mut b, &g, &old, &reqs, &changed, &[0]);

    b.throttle.hold(true);
    let (r, w, wr) = held_pair(&mut g);
    writes.push(wr);
    hold(&mut b, &mut g, &[r.clone(), w.clone()]);
    let new = new_log("dirty-log-new");
    let reply =
        g.fe.set_log_base(new.size, new.offset, &[new.fd()])
            .unwrap_or_else(|e| panic!("the second SET_LOG_BASE: {e}\n{}", b.stderr_tail()));
    check_log_reply(&mut b, &reply, &new);
    // Everything marked in the old log up to the reply was fine; from now on, nothing.
    old.take();
    let snap = g.mem.snapshot();
    b.throttle.release();
    let held = [r.clone(), w.clone()];
    let lifted = "after the throttle was lifted";
    let changed = complete_judged(&mut b, &mut g, &held, Some(&new), &snap, lifted);
    judge_log(&mut b, &g, &new, &[r, w], &changed, &[0]);
    new.take();
    let (reqs, w2, changed) = run_round(&mut b, &mut g, Some(&new), 1);
    writes.extend(w2);
    judge_log(&mut b, &g, &new, &reqs, &changed, &[0]);
    sentinel(&mut b, &mut g, Some(&new));
    let stale = old.pages();
    if !stale.is_empty() {
        b.fail(format!(
            "after the second SET_LOG_BASE was answered, {} marked in the old log",
            fmt_pages(&stale)
        ));
    }
    if b.daemon.maps_memfd("dirty-log-old") {
        b.note("the old log is still mapped after it was replaced".into());
    }
    b.finish(g, &[&old, &new], &writes);
}
