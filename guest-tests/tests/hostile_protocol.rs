//! The hostile driver, vhost-user message level (issue 4; issue 15, oracles that can
//! fail): a compromised VMM process lies in its messages. Every test ends with the common
//! checks of `Rig::finish`: the backend is alive, a fresh connection serves a valid write
//! and read, the image is unchanged outside the ranges allowed, and no byte of any memory
//! the test handed to the backend (guest RAM, lying tables' memfds, log and inflight fds)
//! changed outside the device-writable buffers the test made available, whether the
//! backend accepted or refused what came with it (`Rig::keep_memory`,
//! `Rig::keep_session`). A refused message (nack, closed connection) is fine unless the
//! test says ringfence must accept or refuse it; a message left unanswered (a hang) or a
//! crash is a failure.
//!
//! `RINGFENCE_HOSTILE_TARGET=qsd` runs the same cases against qemu-storage-daemon.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk::*;
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::image;
use ringfence_guest_tests::memory::{GuestMemory, MemFd};
use ringfence_guest_tests::rig::*;
use ringfence_guest_tests::virtq::{Desc, SplitQueue};

fn start() -> Rig {
    Rig::start(RigOpts::default())
}

/// A new connection with features negotiated honestly (REPLY_ACK included).
fn negotiated(rig: &mut Rig) -> Frontend {
    let mut fe = match Frontend::connect(&rig.socket) {
        Ok(fe) => fe,
        Err(e) => {
            if rig.alive("connecting") {
                rig.fail(format!("connecting failed: {e}"));
            }
            rig_abort(rig)
        }
    };
    match Session::negotiate(&mut fe, &SessionCfg::default()) {
        Ok(_) => fe,
        Err(e) => {
            rig.fail(format!(
                "a new connection could not negotiate features: {e}"
            ));
            rig_abort(rig)
        }
    }
}

/// Give up on the test: report what was found so far.
fn rig_abort(rig: &mut Rig) -> ! {
    panic!(
        "giving up after findings:\n  - {}\n--- daemon stderr ---\n{}",
        rig.findings().join("\n  - "),
        rig.daemon.stderr()
    )
}

/// After a hostile message: keep the connection if it still answers, else open a new one.
fn after(rig: &mut Rig, fe: Frontend, what: &str) -> Frontend {
    if rig.responsive(&fe, what) {
        fe
    } else {
        drop(fe);
        if !rig.alive(what) {
            rig_abort(rig);
        }
        negotiated(rig)
    }
}

/// Send a SET-style message asking for an ack and judge the outcome.
/// Returns whether the connection is still usable.
fn set_judged(
    rig: &mut Rig,
    fe: &Frontend,
    code: u32,
    payload: &[u8],
    fds: &[RawFd],
    what: &str,
) -> bool {
    let r = fe.set_acked(code, payload, fds);
    rig.judge(what, &r)
}

/// Make a valid read of the probe sector available on queue 0 (kicked by `kick`) and wait
/// (bounded) for it. An answer must be correct; no answer is fine (the backend may have
/// refused the setup). Completions of requests made available earlier are skipped.
/// Returns whether it was answered OK.
fn probe_with(rig: &mut Rig, s: &mut Session, what: &str, kick: &dyn Fn(&Session)) -> bool {
    let sector = PROBE_OFFSET / SECTOR;
    let hdr = s.put(&header(T_IN, sector));
    let d = s.alloc(4096, 512);
    let st = s.status();
    let head = s.chain(0, &[Desc::r(hdr, 16), Desc::w(d, 4096), Desc::w(st, 1)]);
    s.queues[0].publish(&s.mem);
    kick(s);
    let deadline = Instant::now() + hostile_wait();
    let fd = s.fe.as_raw_fd();
    loop {
        match s.queues[0].wait_used(&s.mem, deadline, Some(fd)) {
            None => rig.note(format!("{what}: the probe read was not answered")),
            Some(u) if u.id == u32::from(head) => {
                let stv = s.mem.read_u8(st);
                rig.note(format!(
                    "{what}: probe read answered {} (len {})",
                    status_name(stv),
                    u.len
                ));
                if stv == S_OK && s.mem.read(d, 4096) != image::pattern(PROBE_OFFSET, 4096) {
                    rig.fail(format!(
                        "{what}: the probe read answered OK with wrong data"
                    ));
                    return false;
                }
                return stv == S_OK;
            }
            Some(u) if s.queues[0].heads.iter().any(|&h| u32::from(h) == u.id) => continue,
            Some(u) => rig.fail(format!(
                "{what}: used element {{id {}, len {}}} answers no request ever made available",
                u.id, u.len
            )),
        }
        return false;
    }
}

fn probe(rig: &mut Rig, s: &mut Session, what: &str) -> bool {
    probe_with(rig, s, what, &|s: &Session| s.queues[0].kick())
}

/// Memfds the test hands to the backend outside any session (lying tables, log and
/// inflight fds...): one region each of `sizes`, named `name-N` (the backend's
/// /proc/PID/fd shows the name). Keep them with [`keep_lies`]: the backend has no business
/// writing to them.
fn lie_memory(name: &str, sizes: &[u64]) -> GuestMemory {
    let layout: Vec<(u64, u64)> = sizes
        .iter()
        .scan(0u64, |gpa, &len| {
            let r = (*gpa, len);
            *gpa += len.next_multiple_of(1 << 20);
            Some(r)
        })
        .collect();
    GuestMemory::named(name, &layout)
}

/// Keep lie memory until the end of the test: not one byte of it may change.
fn keep_lies(rig: &mut Rig, what: &str, mem: GuestMemory) {
    rig.keep_memory(what, mem, &[]);
}

/// SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE for `q`, each judged. Returns whether the
/// connection survived.
fn start_queue_judged(
    rig: &mut Rig,
    fe: &Frontend,
    mem: &GuestMemory,
    q: &SplitQueue,
    what: &str,
) -> bool {
    let i = q.index;
    set_judged(
        rig,
        fe,
        code::SET_VRING_NUM,
        &vring_state(i, u32::from(q.size)),
        &[],
        &format!("{what}: SET_VRING_NUM"),
    ) && set_judged(
        rig,
        fe,
        code::SET_VRING_BASE,
        &vring_state(i, 0),
        &[],
        &format!("{what}: SET_VRING_BASE"),
    ) && set_judged(
        rig,
        fe,
        code::SET_VRING_ADDR,
        &vring_addr(
            i,
            0,
            mem.uaddr(q.desc),
            mem.uaddr(q.used),
            mem.uaddr(q.avail),
            0,
        ),
        &[],
        &format!("{what}: SET_VRING_ADDR"),
    ) && set_judged(
        rig,
        fe,
        code::SET_VRING_CALL,
        &u64::from(i).to_ne_bytes(),
        &[q.call.as_raw_fd()],
        &format!("{what}: SET_VRING_CALL"),
    ) && set_judged(
        rig,
        fe,
        code::SET_VRING_KICK,
        &u64::from(i).to_ne_bytes(),
        &[q.kick.as_raw_fd()],
        &format!("{what}: SET_VRING_KICK"),
    ) && set_judged(
        rig,
        fe,
        code::SET_VRING_ENABLE,
        &vring_state(i, 1),
        &[],
        &format!("{what}: SET_VRING_ENABLE"),
    )
}

/// On a negotiated connection: share `mem` with the honest table, start queue 0 at the
/// start of the first region, and wrap it all in a session (buffers from first region +
/// 1 MiB). `None` if the backend closed the connection on the way (then `mem` is kept for
/// the final comparison: the backend may have written queue 0's used ring, nothing else).
fn continue_session(rig: &mut Rig, fe: Frontend, mem: GuestMemory, what: &str) -> Option<Session> {
    let (table, fds) = mem.table();
    if !set_judged(
        rig,
        &fe,
        code::SET_MEM_TABLE,
        &mem_table_payload(&table),
        &fds,
        &format!("{what}: SET_MEM_TABLE"),
    ) {
        rig.keep_memory(format!("{what}: guest RAM"), mem, &[]);
        return None;
    }
    let base = mem.regions[0].gpa;
    let q = SplitQueue::new(&mem, 0, 256, base);
    if !start_queue_judged(rig, &fe, &mem, &q, what) {
        let used = q.used_range();
        rig.keep_memory(format!("{what}: guest RAM"), mem, &[used]);
        return None;
    }
    Some(Session::from_parts(fe, mem, vec![q], base + 0x10_0000))
}

/// A memory table entry that maps `size` bytes of `m`, from its start, at `gpa`.
fn mapping(m: &MemFd, gpa: u64, size: u64) -> MemRegion {
    MemRegion {
        gpa,
        size,
        uaddr: m.addr(),
        mmap_offset: 0,
    }
}

/// Two adjacent 1 MiB regions at GPA 0 and 1 MiB, both mapping the start of `m`.
fn two_regions(m: &MemFd) -> [MemRegion; 2] {
    [mapping(m, 0, 1 << 20), mapping(m, 1 << 20, 1 << 20)]
}

fn std_memory() -> GuestMemory {
    GuestMemory::new(&[RAM_A, RAM_B, RAM_C])
}

// =======================================================================================
// Framing: unknown codes, bad flags, wrong sizes, truncated messages, stray fds.

#[test]
fn unknown_request_codes() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    for c in [0u32, 26, 27, 28, 33, 41, 44, 45, 99, 1000, 0xffff, u32::MAX] {
        for payload in [&[][..], &[0u8; 8][..], &[0xffu8; 64][..]] {
            let what = format!("request code {c} with {} payload bytes", payload.len());
            let _ = fe.send(c, FLAG_NEED_REPLY, payload, &[]);
            fe = after(&mut rig, fe, &what);
        }
    }
    drop(fe);
    rig.finish();
}

#[test]
fn bad_header_flags() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    for flags in [
        0u32,
        2,
        3,
        VERSION | FLAG_REPLY,
        VERSION | 0xffff_fff0,
        u32::MAX,
    ] {
        let what = format!("GET_PROTOCOL_FEATURES with flags {flags:#x}");
        let _ = fe.send_raw(&message(code::GET_PROTOCOL_FEATURES, flags, 0, &[]), &[]);
        fe = after(&mut rig, fe, &what);
        let what = format!("SET_VRING_NUM with flags {flags:#x}");
        let p = vring_state(0, 64);
        let _ = fe.send_raw(
            &message(code::SET_VRING_NUM, flags, p.len() as u32, &p),
            &[],
        );
        fe = after(&mut rig, fe, &what);
    }
    drop(fe);
    rig.finish();
}

#[test]
fn payload_sizes_that_do_not_fit_the_request() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    let lie = lie_memory("lie", &[1 << 20]);
    let m = &lie.regions[0].mem;
    let two = two_regions(m);
    let mut two_claimed = mem_table_payload(&two[..1]);
    two_claimed[0..4].copy_from_slice(&2u32.to_ne_bytes());
    let mut one_claimed = mem_table_payload(&two);
    one_claimed[0..4].copy_from_slice(&1u32.to_ne_bytes());
    let mfd = [m.fd()];
    let cases: Vec<(u32, Vec<u8>, &[RawFd], &str)> = vec![
        (
            code::SET_FEATURES,
            vec![0; 4],
            &[],
            "SET_FEATURES with 4 bytes",
        ),
        (
            code::SET_FEATURES,
            vec![0; 16],
            &[],
            "SET_FEATURES with 16 bytes",
        ),
        (
            code::SET_PROTOCOL_FEATURES,
            vec![0; 2],
            &[],
            "SET_PROTOCOL_FEATURES with 2 bytes",
        ),
        (
            code::SET_VRING_NUM,
            vec![0; 4],
            &[],
            "SET_VRING_NUM with 4 bytes",
        ),
        (
            code::SET_VRING_NUM,
            vec![0; 12],
            &[],
            "SET_VRING_NUM with 12 bytes",
        ),
        (
            code::SET_VRING_BASE,
            vec![0; 3],
            &[],
            "SET_VRING_BASE with 3 bytes",
        ),
        (
            code::SET_VRING_ADDR,
            vec![0; 8],
            &[],
            "SET_VRING_ADDR with 8 bytes",
        ),
        (
            code::SET_VRING_ADDR,
            vec![0; 48],
            &[],
            "SET_VRING_ADDR with 48 bytes",
        ),
        (
            code::SET_VRING_KICK,
            vec![0; 4],
            &[],
            "SET_VRING_KICK with 4 bytes",
        ),
        (
            code::SET_VRING_CALL,
            vec![0; 16],
            &[],
            "SET_VRING_CALL with 16 bytes",
        ),
        (
            code::SET_VRING_ENABLE,
            vec![1],
            &[],
            "SET_VRING_ENABLE with 1 byte",
        ),
        (
            code::GET_VRING_BASE,
            vec![0; 2],
            &[],
            "GET_VRING_BASE with 2 bytes",
        ),
        (
            code::SET_OWNER,
            vec![0; 100],
            &[],
            "SET_OWNER with 100 bytes",
        ),
        (
            code::GET_FEATURES,
            vec![0; 8],
            &[],
            "GET_FEATURES with 8 bytes",
        ),
        (
            code::GET_CONFIG,
            config_payload(0, 60, 0, &[]),
            &[],
            "GET_CONFIG of 60 carrying 0",
        ),
        (
            code::GET_CONFIG,
            config_payload(0, 8, 0, &[0; 60]),
            &[],
            "GET_CONFIG of 8 carrying 60",
        ),
        (code::GET_CONFIG, vec![0; 4], &[], "GET_CONFIG with 4 bytes"),
        (
            code::SET_CONFIG,
            config_payload(32, 1, 0, &[]),
            &[],
            "SET_CONFIG of 1 carrying 0",
        ),
        (
            code::SET_MEM_TABLE,
            vec![0; 4],
            &[],
            "SET_MEM_TABLE with 4 bytes",
        ),
        (
            code::SET_MEM_TABLE,
            two_claimed,
            &mfd,
            "SET_MEM_TABLE claiming 2 regions, carrying 1",
        ),
        (
            code::SET_MEM_TABLE,
            one_claimed,
            &mfd,
            "SET_MEM_TABLE claiming 1 region, carrying 2",
        ),
        (
            code::ADD_MEM_REG,
            vec![0; 16],
            &mfd,
            "ADD_MEM_REG with 16 bytes",
        ),
        (
            code::REM_MEM_REG,
            vec![0; 8],
            &[],
            "REM_MEM_REG with 8 bytes",
        ),
        (
            code::GET_MAX_MEM_SLOTS,
            vec![0; 8],
            &[],
            "GET_MAX_MEM_SLOTS with 8 bytes",
        ),
    ];
    for (c, payload, fds, what) in cases {
        let _ = fe.send(c, FLAG_NEED_REPLY, &payload, fds);
        fe = after(&mut rig, fe, what);
    }
    drop(fe);
    keep_lies(&mut rig, "the memfd of the lying tables", lie);
    rig.finish();
}

#[test]
fn announced_payload_larger_than_any_message_then_eof() {
    let mut rig = start();
    for size in [0x1001u32, 0x10_0000, 0x7fff_ffff, u32::MAX] {
        let fe = rig.connect();
        let _ = fe.send_raw(&message(code::SET_FEATURES, VERSION, size, &[0u8; 64]), &[]);
        // The backend may refuse at once or wait for the rest; the rest never comes.
        fe.shutdown_write();
        if !fe.wait_closed(HONEST_TIMEOUT) {
            rig.fail(format!(
                "a message announcing {size:#x} payload bytes, then EOF: the connection was not closed within {HONEST_TIMEOUT:?}"
            ));
        }
        drop(fe);
        if !rig.alive(&format!("payload size {size:#x}")) {
            break;
        }
    }
    rig.finish();
}

#[test]
fn messages_cut_short_by_eof() {
    let mut rig = start();
    let lie = lie_memory("lie", &[1 << 20]);
    let m = &lie.regions[0].mem;
    let table = mem_table_payload(&[mapping(m, 0, 1 << 20)]);
    let msgs: Vec<(Vec<u8>, Vec<RawFd>, &str)> = vec![
        (
            message(code::SET_FEATURES, VERSION, 8, &1u64.to_ne_bytes()),
            vec![],
            "SET_FEATURES",
        ),
        (
            message(code::SET_MEM_TABLE, VERSION, table.len() as u32, &table),
            vec![m.fd()],
            "SET_MEM_TABLE",
        ),
        (
            message(
                code::SET_VRING_ADDR,
                VERSION,
                40,
                &vring_addr(0, 0, 1, 2, 3, 0),
            ),
            vec![],
            "SET_VRING_ADDR",
        ),
        (
            message(
                code::GET_CONFIG,
                VERSION,
                72,
                &config_payload(0, 60, 0, &[0; 60]),
            ),
            vec![],
            "GET_CONFIG",
        ),
    ];
    for (bytes, fds, what) in msgs {
        for cut in [6, 12, 12 + (bytes.len() - 12) / 2, bytes.len() - 1] {
            let fe = negotiated(&mut rig);
            let _ = fe.send_raw(&bytes[..cut], &fds);
            fe.shutdown_write();
            if !fe.wait_closed(HONEST_TIMEOUT) {
                rig.fail(format!(
                    "{what} cut after {cut} of {} bytes, then EOF: the connection was not closed within {HONEST_TIMEOUT:?}",
                    bytes.len()
                ));
            }
            drop(fe);
            if !rig.alive(&format!("{what} cut after {cut} bytes")) {
                rig_abort(&mut rig);
            }
        }
    }
    keep_lies(&mut rig, "the memfd of the cut SET_MEM_TABLE", lie);
    rig.finish();
}

#[test]
fn fds_attached_to_messages_that_take_none_are_not_kept() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    let stray = lie_memory("stray", &[4096]);
    let m = &stray.regions[0].mem;
    let strays = |rig: &Rig| {
        rig.fd_kinds()
            .iter()
            .filter(|(k, _)| k.contains("memfd:stray"))
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    for i in 0..64 {
        let fds = [m.fd(); 8];
        let r = fe.call(code::GET_FEATURES, &[], &fds).map(|_| ());
        if !rig.judge(&format!("GET_FEATURES #{i} carrying 8 fds"), &r) {
            fe = negotiated(&mut rig);
        }
    }
    let r = fe.set_acked(code::SET_VRING_NUM, &vring_state(0, 64), &[m.fd(); 4]);
    rig.judge("SET_VRING_NUM carrying 4 fds", &r);
    fe = after(&mut rig, fe, "SET_VRING_NUM carrying 4 fds");
    let kept = strays(&rig);
    if kept > 0 {
        rig.fail(format!(
            "the backend keeps {kept} of the 516 fds sent with messages that take none (connection still open)"
        ));
    }
    drop(fe);
    // A new connection answered means the old one is torn down.
    let fe = negotiated(&mut rig);
    let kept = strays(&rig);
    if kept > 0 {
        rig.fail(format!(
            "the backend still holds {kept} stray fds after the connection closed"
        ));
    }
    drop(fe);
    keep_lies(&mut rig, "the memfd sent as stray fds", stray);
    rig.finish();
}

#[test]
fn connections_do_not_leak_fds() {
    let mut rig = start();
    // Baseline: one negotiated connection open, the previous ones torn down.
    let fe = negotiated(&mut rig);
    let (before, kinds_before) = (rig.fd_count(), rig.fd_kinds());
    drop(fe);
    for i in 0..32 {
        let mut s = rig.session(&SessionCfg::default());
        // The previous connection is torn down now that this one answered: compare its
        // guest RAM (and free it) before going on.
        rig.check_kept_memory();
        if i % 2 == 0 {
            let _ = probe(&mut rig, &mut s, "I/O on a short-lived connection");
        }
        rig.keep_session(format!("short-lived connection #{i}"), s, &[]);
    }
    let fe = negotiated(&mut rig);
    let (after, kinds_after) = (rig.fd_count(), rig.fd_kinds());
    if after > before + 4 {
        rig.fail(format!(
            "open fds grew from {before} to {after} over 32 connections (before: {kinds_before:?}; after: {kinds_after:?})"
        ));
    }
    drop(fe);
    rig.finish();
}

#[test]
fn messages_missing_their_fds() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    let lie = lie_memory("lie", &[1 << 20]);
    let m = &lie.regions[0].mem;
    let two = two_regions(m);
    let region = two[0];
    let cases: Vec<(u32, Vec<u8>, Vec<RawFd>, &str)> = vec![
        (
            code::SET_MEM_TABLE,
            mem_table_payload(&[region]),
            vec![],
            "SET_MEM_TABLE without its fd",
        ),
        (
            code::SET_MEM_TABLE,
            mem_table_payload(&two),
            vec![m.fd()],
            "SET_MEM_TABLE of 2 regions with 1 fd",
        ),
        (
            code::SET_MEM_TABLE,
            mem_table_payload(&[region]),
            vec![m.fd(), m.fd(), m.fd()],
            "SET_MEM_TABLE of 1 region with 3 fds",
        ),
        (
            code::SET_VRING_KICK,
            0u64.to_ne_bytes().to_vec(),
            vec![],
            "SET_VRING_KICK without fd or NOFD flag",
        ),
        (
            code::SET_VRING_CALL,
            0u64.to_ne_bytes().to_vec(),
            vec![],
            "SET_VRING_CALL without fd or NOFD flag",
        ),
        (
            code::SET_VRING_ERR,
            0u64.to_ne_bytes().to_vec(),
            vec![],
            "SET_VRING_ERR without fd or NOFD flag",
        ),
        (
            code::ADD_MEM_REG,
            single_region_payload(&region),
            vec![],
            "ADD_MEM_REG without fd",
        ),
        (code::SET_LOG_FD, vec![], vec![], "SET_LOG_FD without fd"),
    ];
    for (c, payload, fds, what) in cases {
        let r = fe.set_acked(c, &payload, &fds);
        rig.judge(what, &r);
        fe = after(&mut rig, fe, what);
    }
    // The connection (or a new one) still sets up and serves a read.
    if let Some(mut s) = continue_session(&mut rig, fe, std_memory(), "after the lies") {
        probe(&mut rig, &mut s, "after the lies");
        rig.keep_session("the session after the lies", s, &[]);
    }
    keep_lies(&mut rig, "the memfd of the lies", lie);
    rig.finish();
}

#[test]
fn connect_and_hang_up_at_every_step() {
    let mut rig = start();
    // Close after each prefix of an honest setup.
    for steps in 0..8 {
        let mut fe = rig.connect();
        let mem = std_memory();
        let q = SplitQueue::new(&mem, 0, 256, RAM_A.0);
        let r = (|| -> FeResult<()> {
            if steps > 0 {
                Session::negotiate(&mut fe, &SessionCfg::default())?;
            }
            if steps > 1 {
                let (t, fds) = mem.table();
                fe.set_mem_table(&t, &fds)?;
            }
            if steps > 2 {
                fe.set_vring_num(0, 256)?;
            }
            if steps > 3 {
                fe.set_vring_addr(0, mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail))?;
            }
            if steps > 4 {
                fe.set_vring_fd(code::SET_VRING_KICK, 0, Some(q.kick.as_raw_fd()))?;
            }
            if steps > 5 {
                fe.set_vring_fd(code::SET_VRING_CALL, 0, Some(q.call.as_raw_fd()))?;
            }
            if steps > 6 {
                fe.set_vring_enable(0, true)?;
                q.kick();
            }
            Ok(())
        })();
        if let Err(e) = r {
            rig.fail(format!("honest setup step {steps} failed: {e}"));
        }
        drop(fe);
        let used = q.used_range();
        drop(q);
        if steps > 1 {
            rig.keep_memory(
                format!("guest RAM of the setup cut after {steps} steps"),
                mem,
                &[used],
            );
        }
        if !rig.alive(&format!("hang-up after {steps} setup steps")) {
            break;
        }
    }
    rig.finish();
}

// =======================================================================================
// Features.

/// A session whose SET_FEATURES (after honest negotiation) is `features`, exactly.
fn with_features(rig: &mut Rig, features: u64, what: &str) {
    let fe = negotiated(rig);
    if !set_judged(
        rig,
        &fe,
        code::SET_FEATURES,
        &features.to_ne_bytes(),
        &[],
        what,
    ) {
        return;
    }
    let Some(mut s) = continue_session(rig, fe, std_memory(), what) else {
        return;
    };
    probe(rig, &mut s, what);
    rig.keep_session(what, s, &[]);
}

#[test]
fn set_features_with_unoffered_bits() {
    let mut rig = start();
    let offered = rig.connect().get_features().unwrap();
    let lie = offered
        | vfeat::RING_PACKED
        | vfeat::IN_ORDER
        | vfeat::ACCESS_PLATFORM
        | vfeat::RING_RESET
        | 1 << 63
        | 1 << 50;
    with_features(
        &mut rig,
        lie & !offered | vfeat::VERSION_1 | vfeat::PROTOCOL_FEATURES,
        "SET_FEATURES with unoffered bits (packed ring, in-order, ...)",
    );
    rig.finish();
}

#[test]
fn set_features_all_ones() {
    let mut rig = start();
    with_features(&mut rig, u64::MAX, "SET_FEATURES 0xffffffffffffffff");
    rig.finish();
}

#[test]
fn set_features_without_version_1() {
    let mut rig = start();
    with_features(
        &mut rig,
        vfeat::PROTOCOL_FEATURES,
        "SET_FEATURES without VERSION_1",
    );
    rig.finish();
}

#[test]
fn set_features_changed_while_queue_runs() {
    let mut rig = start();
    let mut s = rig.session(&SessionCfg::default());
    probe(&mut rig, &mut s, "before the change");
    let f = s.features ^ vfeat::RING_EVENT_IDX ^ vfeat::RING_INDIRECT_DESC;
    let r = s.fe.set_acked(code::SET_FEATURES, &f.to_ne_bytes(), &[]);
    if rig.judge(
        "SET_FEATURES toggling EVENT_IDX and INDIRECT_DESC on a running queue",
        &r,
    ) {
        probe(&mut rig, &mut s, "after the change");
    }
    rig.keep_session("the session", s, &[]);
    rig.finish();
}

#[test]
fn set_protocol_features_with_unoffered_bits() {
    let mut rig = start();
    let mut fe = rig.connect();
    let offered = fe.get_features().unwrap();
    let _ = fe.get_protocol_features();
    // Without REPLY_ACK negotiated yet the ack is optional: send, then ping.
    let _ = fe.send(code::SET_PROTOCOL_FEATURES, 0, &u64::MAX.to_ne_bytes(), &[]);
    if !rig.responsive(&fe, "SET_PROTOCOL_FEATURES 0xffffffffffffffff") {
        drop(fe);
        return rig.finish();
    }
    // Carry on without asking for acks (we cannot know what the backend accepted).
    fe.reply_ack = false;
    let r = (|| -> FeResult<()> {
        fe.set_owner()?;
        fe.set_features(offered & WANTED_FEATURES)?;
        Ok(())
    })();
    if !rig.judge("owner and features after the lie", &r) {
        return rig.finish();
    }
    let mem = std_memory();
    let (t, fds) = mem.table();
    let q = SplitQueue::new(&mem, 0, 256, RAM_A.0);
    let r = fe
        .set_mem_table(&t, &fds)
        .and_then(|_| Session::start_queue(&fe, &mem, &q, true));
    rig.judge("memory and queue after the lie", &r);
    let mut s = Session::from_parts(fe, mem, vec![q], HEAP_START);
    if rig.responsive(&s.fe, "after setting up the queue") {
        probe(&mut rig, &mut s, "with all protocol features claimed");
    }
    rig.keep_session("the session", s, &[]);
    rig.finish();
}

#[test]
fn owner_and_device_resets_mid_session() {
    let mut rig = start();
    for (c, what) in [
        (code::SET_OWNER, "a second SET_OWNER"),
        (code::RESET_OWNER, "RESET_OWNER"),
        (code::RESET_DEVICE, "RESET_DEVICE (not offered)"),
    ] {
        let mut s = rig.session(&SessionCfg::default());
        // I/O in flight while the reset arrives.
        for _ in 0..16 {
            let hdr = s.put(&header(T_IN, 0));
            let d = s.alloc(65536, 4096);
            let st = s.status();
            s.chain(0, &[Desc::r(hdr, 16), Desc::w(d, 65536), Desc::w(st, 1)]);
        }
        s.kick(0);
        let r = s.fe.set_acked(c, &[], &[]);
        if rig.judge(what, &r) {
            probe(&mut rig, &mut s, &format!("after {what}"));
        }
        // Guest RAM: the in-flight reads may land too (their buffers are device-writable).
        rig.keep_session(format!("the session reset by {what}"), s, &[]);
    }
    rig.finish();
}

#[test]
fn log_and_inflight_messages_without_their_features() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    let log = lie_memory("log", &[4096]);
    let m = &log.regions[0].mem;
    let log_base = {
        let mut p = (1u64 << 40).to_ne_bytes().to_vec();
        p.extend_from_slice(&0u64.to_ne_bytes());
        p
    };
    let inflight = {
        let mut p = (1u64 << 40).to_ne_bytes().to_vec(); // mmap_size
        p.extend_from_slice(&0u64.to_ne_bytes()); // mmap_offset
        p.extend_from_slice(&0xffffu16.to_ne_bytes()); // num_queues
        p.extend_from_slice(&0xffffu16.to_ne_bytes()); // queue_size
        p.extend_from_slice(&[0; 4]);
        p
    };
    let cases: Vec<(u32, Vec<u8>, Vec<RawFd>, &str)> = vec![
        (
            code::SET_LOG_BASE,
            log_base,
            vec![m.fd()],
            "SET_LOG_BASE of 1 TiB over a 4 KiB memfd",
        ),
        (code::SET_LOG_FD, vec![], vec![m.fd()], "SET_LOG_FD"),
        (
            code::SET_INFLIGHT_FD,
            inflight.clone(),
            vec![m.fd()],
            "SET_INFLIGHT_FD of 1 TiB",
        ),
        (
            code::SET_VRING_ENDIAN,
            vring_state(0, 1),
            vec![],
            "SET_VRING_ENDIAN big",
        ),
        (
            code::SET_STATUS,
            0xffu64.to_ne_bytes().to_vec(),
            vec![],
            "SET_STATUS 0xff",
        ),
        (
            code::VRING_KICK,
            vring_state(0, 0),
            vec![],
            "in-band VRING_KICK",
        ),
        (
            code::SET_DEVICE_STATE_FD,
            vec![0; 8],
            vec![m.fd()],
            "SET_DEVICE_STATE_FD",
        ),
        (code::IOTLB_MSG, vec![0xff; 64], vec![], "IOTLB_MSG"),
    ];
    for (c, payload, fds, what) in cases {
        let r = fe.set_acked(c, &payload, &fds);
        rig.judge(what, &r);
        fe = after(&mut rig, fe, what);
    }
    let r = fe.call(code::GET_INFLIGHT_FD, &inflight, &[]).map(|_| ());
    rig.judge("GET_INFLIGHT_FD for 0xffff queues of 0xffff", &r);
    fe = after(&mut rig, fe, "GET_INFLIGHT_FD");
    let r = fe.call(code::GET_STATUS, &[], &[]).map(|_| ());
    rig.judge("GET_STATUS", &r);
    fe = after(&mut rig, fe, "GET_STATUS");
    drop(fe);
    // Without LOG_SHMFD, INFLIGHT_SHMFD or device-state transfer negotiated, nothing may
    // land in the memfd handed over as log, inflight and device-state fd.
    keep_lies(
        &mut rig,
        "the memfd sent as log, inflight and device-state fd",
        log,
    );
    rig.finish();
}

#[test]
fn backend_channel_without_the_feature_is_not_used() {
    // A socket whose other end nobody reads: a backend that writes to it blocks forever.
    let mut rig = start();
    let fe = negotiated(&mut rig);
    let mut sv = [0; 2];
    // SAFETY: socketpair fills two fds into a valid array.
    assert_eq!(
        unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        },
        0
    );
    // SAFETY: two fresh fds nobody else owns.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    let r = fe.set_acked(code::SET_BACKEND_REQ_FD, &[], &[theirs.as_raw_fd()]);
    drop(theirs);
    rig.judge("SET_BACKEND_REQ_FD without BACKEND_REQ", &r);
    if rig.responsive(&fe, "SET_BACKEND_REQ_FD") {
        if let Some(mut s) =
            continue_session(&mut rig, fe, std_memory(), "after SET_BACKEND_REQ_FD")
        {
            probe(&mut rig, &mut s, "after SET_BACKEND_REQ_FD");
            rig.keep_session("the session", s, &[]);
        }
    }
    rig.finish();
    drop(ours);
}

// =======================================================================================
// Config space.

#[test]
fn config_reads_outside_the_config_space_are_refused() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    // Inside: the capacity.
    match fe.get_config(0, 8) {
        Ok(c) if c.data.len() == 8 => {
            let cap = u64::from_le_bytes(c.data[..8].try_into().unwrap());
            if cap != CAPACITY {
                rig.fail(format!(
                    "GET_CONFIG capacity {cap}, image has {CAPACITY} sectors"
                ));
            }
        }
        other => rig.fail(format!("GET_CONFIG of the capacity failed: {other:?}")),
    }
    // The config space is virtio 1.2's virtio_blk_config: 60 bytes up to
    // write_zeroes_may_unmap and its padding, or 96 with the secure-erase and zoned fields.
    let len: u32 = match (fe.get_config(0, 96), fe.get_config(0, 60)) {
        (Ok(c), _) if c.data.len() == 96 => 96,
        (_, Ok(c)) if c.data.len() == 60 => 60,
        other => {
            rig.fail(format!(
                "GET_CONFIG of neither 96 nor 60 bytes is answered: {other:?}"
            ));
            60
        }
    };
    rig.note(format!("config space: {len} bytes"));
    for (off, size) in [
        (0u32, len + 1),
        (len - 4, 8),
        (len - 1, 2),
        (len, 1),
        (0, 256),
        (0, 4096),
        (0x100, 8),
        (0x1000, 8),
        (0xffff_fff0, 0x20),
        (u32::MAX, 1),
        (1 << 31, 8),
    ] {
        let what = format!("GET_CONFIG offset {off:#x} size {size}");
        match fe.get_config(off, size) {
            Ok(c) if c.size == 0 && c.data.is_empty() => rig.note(format!("{what}: refused")),
            Ok(c) => {
                let n = c.data.len().min(16);
                rig.fail(format!(
                    "{what} reaches past the {len}-byte config space, yet was answered with size {} and {} bytes: {:02x?}...",
                    c.size,
                    c.data.len(),
                    &c.data[..n]
                ));
            }
            Err(FeError::Closed) => {
                rig.note(format!("{what}: connection closed"));
                fe = negotiated(&mut rig);
            }
            Err(e) => {
                rig.fail(format!("{what}: {e}"));
                fe = after(&mut rig, fe, &what);
            }
        }
    }
    // Size 0 and a payload shorter than announced.
    for (payload, what) in [
        (config_payload(0, 0, 0, &[]), "GET_CONFIG of size 0"),
        (
            config_payload(0, 60, 0xffff_ffff, &[0; 60]),
            "GET_CONFIG with flags 0xffffffff",
        ),
    ] {
        match fe.get_config_raw(&payload) {
            Ok(c) if c.data.is_empty() => rig.note(format!("{what}: refused")),
            Ok(c) => rig.note(format!("{what}: answered {} bytes", c.data.len())),
            Err(e) => {
                rig.note(format!("{what}: {e}"));
                fe = after(&mut rig, fe, what);
            }
        }
    }
    drop(fe);
    rig.finish();
}

#[test]
fn config_writes_cannot_change_the_capacity() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    // The config space as virtio 1.0 drivers read it (60 bytes: both targets answer that).
    let space = |fe: &Frontend| match fe.get_config(0, 60) {
        Ok(c) if c.data.len() == 60 => Ok(c.data),
        Ok(c) => Err(format!("{} bytes", c.data.len())),
        Err(e) => Err(e.to_string()),
    };
    let before = match space(&fe) {
        Ok(b) => b,
        Err(e) => {
            rig.fail(format!("GET_CONFIG of 60 bytes: {e}"));
            rig_abort(&mut rig)
        }
    };
    let huge = (u64::MAX / 1024).to_le_bytes();
    for flags in [0u32, 1] {
        for (off, data, what) in [
            (0u32, huge.to_vec(), "SET_CONFIG capacity = 2^54"),
            (
                0,
                CAPACITY.to_le_bytes().to_vec(),
                "SET_CONFIG capacity = itself",
            ),
            (0, vec![0xff; 60], "SET_CONFIG of all 60 bytes"),
            (56, vec![0xff; 16], "SET_CONFIG across the end"),
            (u32::MAX, vec![1], "SET_CONFIG at offset 0xffffffff"),
            (34, vec![0xff, 0xff], "SET_CONFIG num_queues = 0xffff"),
        ] {
            let what = format!("{what} (flags {flags})");
            // An offset past any config space makes the message malformed for the vhost
            // crate, which frames messages for ringfence: nacked, then the connection ends.
            let malformed = off == u32::MAX;
            let r = fe.set_acked(
                code::SET_CONFIG,
                &config_payload(off, data.len() as u32, flags, &data),
                &[],
            );
            // Only the 1-byte writeback field is writable (virtio 1.2, 5.2.4): each of these
            // must be refused. qsd is held to less: libvhost-user acks the message even when
            // its device refused the write (the config space below must still not change).
            match &r {
                Err(FeError::Nack(v)) => rig.note(format!("{what}: refused (nack {v:#x})")),
                Ok(()) if !rig.strict() => rig.note(format!("{what}: acked")),
                Ok(()) => rig.fail(format!(
                    "{what}: accepted; only the 1-byte writeback field may be written"
                )),
                Err(FeError::Closed) if rig.strict() => {
                    rig.fail(format!("{what}: connection closed instead of a nack"))
                }
                Err(FeError::Closed) => rig.note(format!("{what}: connection closed")),
                Err(e) => rig.fail(format!("{what}: {e}")),
            }
            // On the same connection (a new one gets a new device): the config space,
            // capacity included, is what it was.
            match space(&fe) {
                Ok(now) => {
                    let cap = u64::from_le_bytes(now[..8].try_into().unwrap());
                    if cap != CAPACITY {
                        rig.fail(format!(
                            "after {what}, GET_CONFIG on the same connection reports capacity \
                             {cap}; the image has {CAPACITY} sectors"
                        ));
                    } else if now != before {
                        rig.fail(format!(
                            "after {what}, the config space changed: was {before:02x?}, now \
                             {now:02x?}"
                        ));
                    }
                }
                // ringfence nacks the write and goes on: the capacity is checked on the same
                // connection. qsd's libvhost-user answers a refused config write with
                // vu_panic: there the capacity is checked on the next connection (`after`
                // reconnects) and below, on the device behind it, which serves the same image.
                Err(e) if rig.strict() && !malformed => rig.fail(format!(
                    "after {what}: GET_CONFIG on the same connection: {e} (the connection \
                     must survive a refused request)"
                )),
                Err(e) => rig.note(format!(
                    "after {what}: GET_CONFIG {e} (the connection ended after the refusal)"
                )),
            }
            fe = after(&mut rig, fe, &what);
        }
    }
    // And the device behind the connection still holds the true capacity: the last 4 KiB
    // read back, a write past them fails.
    if let Some(mut s) = continue_session(&mut rig, fe, std_memory(), "after SET_CONFIG lies") {
        let last = (CAPACITY - 8) * SECTOR;
        match s.read_within(0, last, 4096, rig.honest_timeout()) {
            Ok(d) if d == image::pattern(last, 4096) => {}
            Ok(_) => rig.fail("after SET_CONFIG lies, the last 4 KiB read back wrong data"),
            Err(e) => rig.fail(format!(
                "after SET_CONFIG lies, reading the last 4 KiB: {e}"
            )),
        }
        match s.io(0, T_OUT, CAPACITY + 8, &[0x66; 4096], 0) {
            Ok((S_OK, _)) => {
                rig.fail("after SET_CONFIG lies, a write past the true capacity answered OK")
            }
            Ok((st, _)) => rig.note(format!("write past the capacity: {}", status_name(st))),
            Err(e) => rig.fail(format!(
                "after SET_CONFIG lies, a write past the capacity: {e}"
            )),
        }
        rig.keep_session("the session after the SET_CONFIG lies", s, &[]);
    }
    rig.finish();
}

// =======================================================================================
// Memory tables.

/// A memory table whose regions are not sorted by guest address is valid vhost-user
/// (qemu-storage-daemon accepts it): it must be taken and served, in any order.
#[test]
fn memory_tables_in_any_order_are_served() {
    let mut rig = start();
    for order in ["descending", "shuffled"] {
        let fe = negotiated(&mut rig);
        let mem = std_memory();
        let (mut table, mut fds) = mem.table();
        let mut pairs: Vec<_> = table.drain(..).zip(fds.drain(..)).collect();
        match order {
            "descending" => pairs.reverse(),
            _ => pairs.rotate_left(1),
        }
        assert!(pairs.windows(2).any(|w| w[0].0.gpa > w[1].0.gpa));
        let (table, fds): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let what = format!("a memory table in {order} order");
        let r = fe.set_acked(code::SET_MEM_TABLE, &mem_table_payload(&table), &fds);
        if r.is_err() {
            rig.fail(format!("{what}: refused ({r:?}); it is valid vhost-user"));
            rig.keep_memory(format!("{what}: guest RAM"), mem, &[]);
            continue;
        }
        let base = mem.regions[0].gpa;
        let q = SplitQueue::new(&mem, 0, 256, base);
        if !start_queue_judged(&mut rig, &fe, &mem, &q, &what) {
            rig.fail(format!("{what}: the queue cannot be started"));
            let used = q.used_range();
            rig.keep_memory(format!("{what}: guest RAM"), mem, &[used]);
            continue;
        }
        let mut s = Session::from_parts(fe, mem, vec![q], base + 0x10_0000);
        if !probe(&mut rig, &mut s, &what) {
            rig.fail(format!("{what}: a read is not served"));
        }
        rig.keep_session(format!("the session with {what}"), s, &[]);
    }
    rig.finish();
}

/// Send `table` with `fds` as SET_MEM_TABLE on a new negotiated connection; then, if the
/// connection survives, an honest memory table and a probe read on the same connection.
/// Returns whether the lying table was accepted. The caller keeps the memfds of the lie.
fn mem_table_lie(rig: &mut Rig, table: &[MemRegion], fds: &[RawFd], what: &str) -> bool {
    let fe = negotiated(rig);
    let r = fe.set_acked(code::SET_MEM_TABLE, &mem_table_payload(table), fds);
    let accepted = r.is_ok();
    if !rig.judge(what, &r) || !rig.responsive(&fe, what) {
        return accepted;
    }
    let Some(mut s) = continue_session(rig, fe, std_memory(), &format!("after {what}")) else {
        return accepted;
    };
    // Against ringfence the lie cost nothing: the same connection, given an honest table,
    // serves (continue_session failed above if any step of that was refused).
    if !probe(rig, &mut s, &format!("honest table after {what}")) && rig.strict() {
        rig.fail(format!(
            "after {what}, an honest table and queue on the same connection do not serve a read"
        ));
    }
    rig.keep_session(format!("the session after {what}"), s, &[]);
    accepted
}

/// Against ringfence, a memory table whose region extends past the end of its file must be
/// refused (README, "What the daemon enforces"): touching that part would raise SIGBUS.
fn past_eof_refused(rig: &mut Rig, accepted: bool, what: &str) {
    if accepted && rig.strict() {
        rig.fail(format!(
            "{what}: accepted; ringfence refuses regions that extend past the end of their file"
        ));
    }
}

#[test]
fn mem_table_without_regions() {
    let mut rig = start();
    mem_table_lie(&mut rig, &[], &[], "SET_MEM_TABLE with 0 regions");
    rig.finish();
}

#[test]
fn mem_table_with_too_many_regions() {
    let mut rig = start();
    for n in [9usize, 33, 64] {
        let sizes = vec![1 << 16; n];
        let lie = lie_memory(&format!("r{n}"), &sizes);
        let table: Vec<MemRegion> = lie
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| mapping(&r.mem, (i as u64) << 20, 1 << 16))
            .collect();
        let raw: Vec<RawFd> = (0..n).map(|i| lie.fd(i)).collect();
        let what = format!("SET_MEM_TABLE with {n} regions");
        mem_table_lie(&mut rig, &table, &raw, &what);
        keep_lies(&mut rig, &what, lie);
    }
    // A count far above what the payload carries.
    let lie = lie_memory("r", &[1 << 16]);
    let mut p = mem_table_payload(&[mapping(&lie.regions[0].mem, 0, 1 << 16)]);
    p[0..4].copy_from_slice(&100_000u32.to_ne_bytes());
    let fe = negotiated(&mut rig);
    let r = fe.set_acked(code::SET_MEM_TABLE, &p, &[lie.fd(0)]);
    rig.judge("SET_MEM_TABLE claiming 100000 regions", &r);
    let _ = after(&mut rig, fe, "SET_MEM_TABLE claiming 100000 regions");
    keep_lies(&mut rig, "SET_MEM_TABLE claiming 100000 regions", lie);
    rig.finish();
}

#[test]
fn mem_table_with_invalid_regions() {
    let mut rig = start();
    let lie = lie_memory("r", &[1 << 20]);
    let ok = mapping(&lie.regions[0].mem, 0x10_0000, 1 << 20);
    // (region, what, whether it reaches past the end of the 1 MiB memfd)
    for (r, what, past_eof) in [
        (MemRegion { size: 0, ..ok }, "region of size 0", false),
        (
            MemRegion {
                gpa: u64::MAX - 0xfff,
                ..ok
            },
            "region whose guest end overflows",
            false,
        ),
        (
            MemRegion {
                gpa: u64::MAX - 0xfffff,
                ..ok
            },
            "region ending exactly at 2^64",
            false,
        ),
        (
            MemRegion {
                uaddr: u64::MAX - 0xfff,
                ..ok
            },
            "region whose user address end overflows",
            false,
        ),
        (
            MemRegion {
                mmap_offset: u64::MAX - 0xfff,
                ..ok
            },
            "region whose mmap offset end overflows",
            true,
        ),
        (
            MemRegion {
                mmap_offset: 16 << 20,
                ..ok
            },
            "mmap offset past the end of the fd",
            true,
        ),
        (
            MemRegion {
                mmap_offset: 1,
                ..ok
            },
            "mmap offset not page aligned",
            false,
        ),
        (
            MemRegion {
                size: 1 << 46,
                ..ok
            },
            "region of 64 TiB over a 1 MiB memfd",
            true,
        ),
        (
            MemRegion {
                size: (1 << 20) + 1,
                ..ok
            },
            "region size not page aligned (1 byte past the end of the fd)",
            true,
        ),
    ] {
        let what = format!("SET_MEM_TABLE: {what}");
        let accepted = mem_table_lie(&mut rig, &[r], &[lie.fd(0)], &what);
        if past_eof {
            past_eof_refused(&mut rig, accepted, &what);
        }
    }
    keep_lies(&mut rig, "the memfd of the invalid regions", lie);
    rig.finish();
}

#[test]
fn mem_table_with_overlapping_regions() {
    let mut rig = start();
    let lie = lie_memory("ab", &[2 << 20, 2 << 20]);
    let (a, b) = (&lie.regions[0].mem, &lie.regions[1].mem);
    let ra = mapping(a, 0x10_0000, 2 << 20);
    for (rb, what) in [
        (
            MemRegion {
                gpa: 0x20_0000,
                uaddr: b.addr(),
                ..ra
            },
            "guest ranges overlap",
        ),
        (
            MemRegion {
                gpa: 0x10_0000,
                uaddr: b.addr(),
                ..ra
            },
            "identical guest ranges",
        ),
        (
            MemRegion {
                gpa: 0x100_0000,
                ..ra
            },
            "user address ranges identical",
        ),
        (
            MemRegion {
                gpa: 0x100_0000,
                uaddr: a.addr() + (1 << 20),
                ..ra
            },
            "user address ranges overlap",
        ),
    ] {
        mem_table_lie(
            &mut rig,
            &[ra, rb],
            &[lie.fd(0), lie.fd(1)],
            &format!("SET_MEM_TABLE: {what}"),
        );
    }
    keep_lies(&mut rig, "the memfds of the overlapping regions", lie);
    rig.finish();
}

#[test]
fn mem_table_with_bad_fds() {
    let mut rig = start();
    let (pr, pw) = pipe();
    let ev = eventfd();
    let dir = std::fs::File::open("/").unwrap();
    let file = tempfile::tempfile().unwrap();
    file.set_len(1 << 20).unwrap();
    let lie = lie_memory("ro", &[1 << 20]);
    let ro = std::fs::File::open(format!("/proc/self/fd/{}", lie.fd(0))).unwrap();
    let sock = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let region = mapping(&lie.regions[0].mem, 0x10_0000, 1 << 20);
    for (fd, what) in [
        (pr.as_raw_fd(), "pipe read end"),
        (pw.as_raw_fd(), "pipe write end"),
        (ev.as_raw_fd(), "eventfd"),
        (dir.as_raw_fd(), "directory"),
        (ro.as_raw_fd(), "read-only memfd"),
        (sock.as_raw_fd(), "socket"),
        (devnull.as_raw_fd(), "/dev/null"),
        (file.as_raw_fd(), "regular file"),
    ] {
        mem_table_lie(
            &mut rig,
            &[region],
            &[fd],
            &format!("SET_MEM_TABLE backed by a {what}"),
        );
    }
    // The regular file could be mapped as guest RAM: nothing may have been written to it.
    let mut contents = Vec::new();
    use std::io::{Read, Seek};
    let mut f = &file;
    f.rewind().unwrap();
    f.read_to_end(&mut contents).unwrap();
    if let Some(i) = contents.iter().position(|&b| b != 0) {
        rig.fail(format!(
            "the regular file handed over as guest RAM changed at offset {i:#x}"
        ));
    }
    keep_lies(&mut rig, "the memfd handed over read-only", lie);
    rig.finish();
}

/// Guest RAM whose region A is declared `declared` bytes long while its memfd has only
/// `RAM_A.1`. The README says ringfence refuses such a table; if a backend accepts it, I/O
/// lands beyond the end of the fd.
#[test]
fn mem_table_region_larger_than_its_fd() {
    let mut rig = start();
    let fe = negotiated(&mut rig);
    let mem = GuestMemory::new(&[RAM_A]);
    let declared = 64 << 20;
    let table = [MemRegion {
        size: declared,
        ..mem.regions[0].table_entry()
    }];
    let what = "region A declared 64 MiB over a 4 MiB memfd";
    let r = fe.set_acked(
        code::SET_MEM_TABLE,
        &mem_table_payload(&table),
        &[mem.fd(0)],
    );
    let accepted = r.is_ok();
    let usable = rig.judge(what, &r) && rig.responsive(&fe, what);
    past_eof_refused(&mut rig, accepted, what);
    if !accepted || !usable {
        // Refused: the same connection takes an honest table and serves a read.
        rig.keep_memory(format!("{what}: the refused memory"), mem, &[]);
        if usable {
            match continue_session(&mut rig, fe, std_memory(), &format!("after {what}")) {
                Some(mut s) => {
                    if !probe(&mut rig, &mut s, &format!("honest table after {what}"))
                        && rig.strict()
                    {
                        rig.fail(format!(
                            "after refusing {what}, an honest table on the same connection does \
                             not serve a read"
                        ));
                    }
                    rig.keep_session("the session after the refusal", s, &[]);
                }
                None if rig.strict() => rig.fail(format!(
                    "after refusing {what}, the same connection does not take an honest table"
                )),
                None => {}
            }
        }
        return rig.finish();
    }
    // Accepted (qsd: libvhost-user maps what it is told): I/O into the part past the fd.
    let q = SplitQueue::new(&mem, 0, 256, RAM_A.0);
    if !start_queue_judged(&mut rig, &fe, &mem, &q, what) {
        let used = q.used_range();
        rig.keep_memory(format!("{what}: guest RAM"), mem, &[used]);
        return rig.finish();
    }
    let mut s = Session::from_parts(fe, mem, vec![q], HEAP_START);
    // Data and status beyond the end of the fd, inside the declared region.
    let beyond = RAM_A.0 + RAM_A.1 + (8 << 20);
    let hdr = s.put(&header(T_IN, 0));
    s.chain(
        0,
        &[
            Desc::r(hdr, 16),
            Desc::w(beyond, 4096),
            Desc::w(beyond + 4096, 1),
        ],
    );
    let hdr2 = s.put(&header(T_GET_ID, 0));
    s.chain(
        0,
        &[
            Desc::r(hdr2, 16),
            Desc::w(beyond + 8192, 20),
            Desc::w(beyond + 8192 + 20, 1),
        ],
    );
    // And a header beyond it.
    s.chain(
        0,
        &[
            Desc::r(beyond + 12288, 16),
            Desc::w(beyond, 512),
            Desc::w(beyond + 4096, 1),
        ],
    );
    s.kick(0);
    let deadline = Instant::now() + hostile_wait();
    let fd = s.fe.as_raw_fd();
    let mut answered = 0;
    while answered < 3 && s.queues[0].wait_used(&s.mem, deadline, Some(fd)).is_some() {
        answered += 1;
    }
    rig.note(format!(
        "{what}: {answered} of 3 requests into the part past the fd answered"
    ));
    rig.alive(what);
    probe(&mut rig, &mut s, what);
    rig.keep_session("the session over the oversized region", s, &[]);
    rig.finish();
}

/// What ringfence logs when its SIGBUS handler absorbed a fault on vanished guest RAM
/// (`report_memory_faults` in src/worker.rs).
const SIGBUS_WARNING: &str = "guest RAM vanished under us";

/// Against ringfence: the SIGBUS handler ran and said so (a bounded wait on the log line).
fn sigbus_reported(rig: &mut Rig, what: &str) {
    if rig.strict()
        && !rig
            .daemon
            .wait_for_log(SIGBUS_WARNING, rig.honest_timeout())
    {
        rig.fail(format!(
            "{what}: no \"{SIGBUS_WARNING}\" warning within {:?}: the vanished pages were never \
             touched, or the SIGBUS handler did not run or report",
            rig.honest_timeout()
        ));
    }
}

#[test]
fn memfd_shrunk_under_a_running_queue() {
    // The VMM truncates guest RAM's memfd after sharing it: the backend's mapping of the
    // missing part now raises SIGBUS on access.
    let mut rig = start();
    let mut s = rig.session(&SessionCfg::default());
    probe(&mut rig, &mut s, "before the shrink");
    // Rings stay (the first 64 KiB); buffers (from +1 MiB) vanish.
    s.mem.regions[0].mem.truncate(0x1_0000).unwrap();
    let beyond = HEAP_START + 0x8_0000;
    let hdr = beyond;
    let q = &mut s.queues[0];
    let f = q.chain(
        &s.mem,
        &[
            Desc::r(hdr, 16),
            Desc::w(beyond + 4096, 4096),
            Desc::w(beyond + 8192, 1),
        ],
    );
    q.push(&s.mem, f);
    s.kick(0);
    let deadline = Instant::now() + hostile_wait();
    let fd = s.fe.as_raw_fd();
    let u = s.queues[0].wait_used(&s.mem, deadline, Some(fd));
    rig.note(format!("request into truncated memory: {u:?}"));
    // The header lies in the vanished part: parsing it touches a missing page.
    sigbus_reported(&mut rig, "a request whose header vanished");
    rig.alive("after a request into the truncated part of guest RAM");
    rig.keep_session("the session over the shrunk memfd", s, &[]);
    rig.finish();
}

#[test]
fn memfd_shrunk_to_nothing_under_a_running_queue() {
    let mut rig = start();
    let mut s = rig.session(&SessionCfg::default());
    probe(&mut rig, &mut s, "before the shrink");
    s.mem.regions[0].mem.truncate(0).unwrap();
    // The rings are gone too: the kick makes the backend read the avail ring.
    s.queues[0].kick();
    sigbus_reported(&mut rig, "a kick on rings whose memfd was truncated to 0");
    rig.responsive(&s.fe, "after the rings' memfd was truncated to 0");
    rig.alive("after the rings' memfd was truncated to 0");
    // Regions B and C are still there, and nothing may have been written to them.
    rig.keep_session("the session over the emptied memfd", s, &[]);
    rig.finish();
}

#[test]
fn mem_table_replaced_under_a_running_queue() {
    let mut rig = start();
    let mut s = rig.session(&SessionCfg::default());
    probe(&mut rig, &mut s, "before the swap");
    // New guest RAM elsewhere: the queue's addresses point nowhere now.
    let other = GuestMemory::named("other", &[(0x8000_0000, 1 << 20)]);
    let (t, fds) = other.table();
    let r =
        s.fe.set_acked(code::SET_MEM_TABLE, &mem_table_payload(&t), &fds);
    if rig.judge("SET_MEM_TABLE without the rings' region", &r) {
        probe(&mut rig, &mut s, "queue in memory that was removed");
    }
    rig.keep_session("the session whose memory was replaced", s, &[]);
    // No queue lives in the new memory: nothing may be written there.
    rig.keep_memory("the replacement memory", other, &[]);
    rig.finish();
}

/// One ADD_MEM_REG / REM_MEM_REG lie of [`memory_slot_lies`]: the region, made from the
/// session's region A and a fresh 1 MiB region.
type SlotLie = (
    u32,
    fn(MemRegion, MemRegion) -> MemRegion,
    bool,
    bool,
    &'static str,
);

#[test]
fn memory_slot_lies() {
    let mut rig = start();
    let mut s = rig.session(&SessionCfg::default());
    if s.protocol & pfeat::CONFIGURE_MEM_SLOTS == 0 {
        // ringfence documents CONFIGURE_MEM_SLOTS: skipping these lies is a failure.
        if rig.strict() {
            rig.fail(
                "CONFIGURE_MEM_SLOTS was not offered, so the ADD/REM_MEM_REG lies could not run",
            );
        } else {
            rig.note("CONFIGURE_MEM_SLOTS not offered: ADD/REM_MEM_REG lies skipped");
        }
        rig.keep_session("the session", s, &[]);
        return rig.finish();
    }
    let slots = match s.fe.get_max_mem_slots() {
        Ok(n) => n,
        Err(e) => {
            rig.fail(format!(
                "GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS negotiated: {e}"
            ));
            0
        }
    };
    rig.note(format!("GET_MAX_MEM_SLOTS = {slots}"));
    let extra = lie_memory("extra", &[1 << 20]);
    let fresh = mapping(&extra.regions[0].mem, 0x4000_0000, 1 << 20);
    // (message, region from (A, fresh), with the fd, must ringfence refuse it, what)
    let cases: Vec<SlotLie> = vec![
        (
            code::ADD_MEM_REG,
            |a, f| MemRegion {
                gpa: a.gpa + 0x1000,
                ..f
            },
            true,
            false,
            "ADD_MEM_REG overlapping region A",
        ),
        (
            code::ADD_MEM_REG,
            |a, _| a,
            true,
            false,
            "ADD_MEM_REG of region A again",
        ),
        (
            code::ADD_MEM_REG,
            |_, f| MemRegion {
                size: 64 << 20,
                ..f
            },
            true,
            true,
            "ADD_MEM_REG of 64 MiB over a 1 MiB memfd",
        ),
        (
            code::ADD_MEM_REG,
            |_, f| MemRegion {
                gpa: u64::MAX - 0xfff,
                ..f
            },
            true,
            false,
            "ADD_MEM_REG whose end overflows",
        ),
        (
            code::REM_MEM_REG,
            |_, f| MemRegion {
                gpa: 0x7000_0000,
                ..f
            },
            false,
            false,
            "REM_MEM_REG of a region never added",
        ),
        (
            code::REM_MEM_REG,
            |a, _| MemRegion { size: 4096, ..a },
            false,
            false,
            "REM_MEM_REG of part of region A",
        ),
    ];
    // A backend may close the connection on a refusal: every lie still gets its turn, on
    // a new session if need be.
    let renew = |rig: &mut Rig, s: Session, what: &str| -> Session {
        rig.keep_session(format!("the session that ended after {what}"), s, &[]);
        rig.session(&SessionCfg::default())
    };
    for (c, region, with_fd, past_eof, what) in cases {
        let r = region(s.mem.regions[0].table_entry(), fresh);
        let fds = if with_fd { vec![extra.fd(0)] } else { vec![] };
        let res = s.fe.set_acked(c, &single_region_payload(&r), &fds);
        if past_eof {
            past_eof_refused(&mut rig, res.is_ok(), what);
        }
        rig.judge(what, &res);
        if !rig.responsive(&s.fe, what) {
            s = renew(&mut rig, s, what);
        }
    }
    // More regions than there are slots.
    let mut slot_mem = Vec::new();
    let tries = slots.min(600) + 2;
    for i in 0..tries {
        let m = lie_memory("slot", &[4096]);
        let r = mapping(&m.regions[0].mem, 0x1_0000_0000 + (i << 20), 4096);
        let res =
            s.fe.set_acked(code::ADD_MEM_REG, &single_region_payload(&r), &[m.fd(0)]);
        slot_mem.push(m);
        match res {
            Ok(()) => {}
            Err(FeError::Nack(_)) => {
                rig.note(format!("ADD_MEM_REG #{i} refused"));
                break;
            }
            Err(e) => {
                rig.judge(&format!("ADD_MEM_REG #{i}"), &Err(e));
                break;
            }
        }
    }
    if slot_mem.len() as u64 == tries && rig.responsive(&s.fe, "more regions than slots") {
        rig.note(format!(
            "all {tries} ADD_MEM_REGs accepted, with 3 regions there already and {slots} slots \
             announced"
        ));
    }
    if !rig.responsive(&s.fe, "more regions than slots") {
        s = renew(&mut rig, s, "more regions than slots");
    }
    // Finally remove the region holding the rings while the queue runs, and kick.
    let a = s.mem.regions[0].table_entry();
    let res =
        s.fe.set_acked(code::REM_MEM_REG, &single_region_payload(&a), &[]);
    if rig.judge(
        "REM_MEM_REG of the rings' region under a running queue",
        &res,
    ) {
        probe(&mut rig, &mut s, "queue whose region was removed");
    }
    rig.keep_session("the last session", s, &[]);
    keep_lies(&mut rig, "the memfd of the lying ADD_MEM_REGs", extra);
    for (i, m) in slot_mem.into_iter().enumerate() {
        keep_lies(&mut rig, &format!("the memfd of ADD_MEM_REG #{i}"), m);
    }
    rig.finish();
}

// =======================================================================================
// Vrings.

/// Honest negotiation and memory, then queue 0 set up with the given lies. Returns the
/// session (if the connection survived) and the probe.
struct VringLie {
    num: Option<u32>,
    base: Option<u32>,
    /// (desc, used, avail) user addresses.
    addr: Option<(u64, u64, u64)>,
    /// Ring entries to lay out (defaults to 256).
    layout: u16,
    /// SET_VRING_ADDR flags and log address.
    addr_flags: u32,
    log: u64,
}

impl Default for VringLie {
    fn default() -> Self {
        VringLie {
            num: None,
            base: None,
            addr: None,
            layout: 256,
            addr_flags: 0,
            log: 0,
        }
    }
}

fn vring_lie(rig: &mut Rig, lie: VringLie, what: &str) {
    let fe = negotiated(rig);
    let mem = std_memory();
    let (t, fds) = mem.table();
    if let Err(e) = fe.set_mem_table(&t, &fds) {
        rig.fail(format!("{what}: honest SET_MEM_TABLE failed: {e}"));
        rig.keep_memory(format!("{what}: guest RAM"), mem, &[]);
        return;
    }
    let q = SplitQueue::new(&mem, 0, lie.layout, RAM_A.0);
    let num = lie.num.unwrap_or(u32::from(q.size));
    let (d, u, a) = lie
        .addr
        .unwrap_or((mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail)));
    let steps: Vec<(u32, Vec<u8>, Vec<RawFd>, String)> = vec![
        (
            code::SET_VRING_NUM,
            vring_state(0, num),
            vec![],
            format!("{what}: SET_VRING_NUM {num}"),
        ),
        (
            code::SET_VRING_BASE,
            vring_state(0, lie.base.unwrap_or(0)),
            vec![],
            format!("{what}: SET_VRING_BASE"),
        ),
        (
            code::SET_VRING_ADDR,
            vring_addr(0, lie.addr_flags, d, u, a, lie.log),
            vec![],
            format!("{what}: SET_VRING_ADDR"),
        ),
        (
            code::SET_VRING_CALL,
            0u64.to_ne_bytes().to_vec(),
            vec![q.call.as_raw_fd()],
            format!("{what}: SET_VRING_CALL"),
        ),
        (
            code::SET_VRING_KICK,
            0u64.to_ne_bytes().to_vec(),
            vec![q.kick.as_raw_fd()],
            format!("{what}: SET_VRING_KICK"),
        ),
        (
            code::SET_VRING_ENABLE,
            vring_state(0, 1),
            vec![],
            format!("{what}: SET_VRING_ENABLE"),
        ),
    ];
    // The device may write a used ring as large as it was told, wherever it was told.
    let mut extra = vec![q.used_range()];
    let used_len = 6 + 8 * u64::from(num.min(1 << 16));
    for r in &mem.regions {
        let ua = r.mem.addr();
        if u >= ua && u < ua + r.mem.len() as u64 {
            extra.push((r.gpa + (u - ua), used_len));
        }
    }
    for (c, p, fds, w) in steps {
        if !set_judged(rig, &fe, c, &p, &fds, &w) {
            rig.keep_memory(format!("{what}: guest RAM"), mem, &extra);
            return;
        }
    }
    let mut s = Session::from_parts(fe, mem, vec![q], HEAP_START);
    probe(rig, &mut s, what);
    rig.keep_session(what, s, &extra);
}

#[test]
fn vring_sizes_that_are_invalid() {
    let mut rig = start();
    for num in [
        0u32,
        1,
        3,
        255,
        257,
        512,
        1024,
        2048,
        32768,
        65535,
        65536,
        u32::MAX,
    ] {
        let layout = if (3..=1024).contains(&num) {
            num as u16
        } else {
            256
        };
        let lie = VringLie {
            num: Some(num),
            layout,
            ..VringLie::default()
        };
        vring_lie(&mut rig, lie, &format!("vring size {num}"));
    }
    rig.finish();
}

#[test]
fn vring_bases_that_are_invalid() {
    let mut rig = start();
    for base in [300u32, 0x8000, 0xffff, 0x1_0000, u32::MAX] {
        let lie = VringLie {
            base: Some(base),
            ..VringLie::default()
        };
        vring_lie(&mut rig, lie, &format!("vring base {base:#x}"));
    }
    rig.finish();
}

#[test]
fn vring_addresses_outside_guest_memory() {
    let mut rig = start();
    let mem = std_memory();
    let q = SplitQueue::new(&mem, 0, 256, RAM_A.0);
    let (d, u, a) = (mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail));
    let a_end_u = mem.uaddr(RAM_A.0) + RAM_A.1;
    let gap_u = a_end_u + 0x1000; // not ours to share: nothing of the table covers it
    for ((dd, uu, aa), what) in [
        (
            (0xdead_0000_0000, u, a),
            "descriptor table outside guest RAM",
        ),
        ((d, 0xdead_0000_0000, a), "used ring outside guest RAM"),
        ((d, u, 0xdead_0000_0000), "avail ring outside guest RAM"),
        (
            (a_end_u - 16, u, a),
            "descriptor table across the end of region A",
        ),
        ((d, a_end_u - 8, a), "used ring across the end of region A"),
        ((d, u, a_end_u - 4), "avail ring across the end of region A"),
        ((gap_u, u, a), "descriptor table in unshared memory"),
        (
            (u64::MAX - 7, u, a),
            "descriptor table address + size overflows",
        ),
        ((d + 1, u, a), "descriptor table misaligned"),
        ((d, u + 2, a), "used ring misaligned"),
        ((d, u, a + 1), "avail ring misaligned"),
        ((d, d, d), "all three rings at one address"),
        ((d, a, u), "used and avail rings swapped"),
        ((0, 0, 0), "null ring addresses"),
    ] {
        let lie = VringLie {
            addr: Some((dd, uu, aa)),
            ..VringLie::default()
        };
        vring_lie(&mut rig, lie, what);
    }
    drop(q);
    drop(mem);
    rig.finish();
}

#[test]
fn vring_address_with_log_flag_but_no_log() {
    let mut rig = start();
    for (flags, log, what) in [
        (
            1u32,
            0xdead_0000_0000u64,
            "SET_VRING_ADDR with VHOST_VRING_F_LOG and a wild log address",
        ),
        (0xffff_ffff, u64::MAX, "SET_VRING_ADDR with all flags set"),
    ] {
        let lie = VringLie {
            addr_flags: flags,
            log,
            ..VringLie::default()
        };
        vring_lie(&mut rig, lie, what);
    }
    rig.finish();
}

#[test]
fn two_queues_sharing_one_ring() {
    // Queue 1 is given queue 0's rings: two workers race over one ring.
    let mut rig = Rig::start(RigOpts {
        num_queues: 2,
        ..RigOpts::default()
    });
    let mut s = rig.session(&SessionCfg::default());
    let q0 = &s.queues[0];
    let kick1 = eventfd();
    let call1 = eventfd();
    let (d, u, a) = (
        s.mem.uaddr(q0.desc),
        s.mem.uaddr(q0.used),
        s.mem.uaddr(q0.avail),
    );
    let fe = &s.fe;
    let r = fe
        .set_vring_num(1, 256)
        .and_then(|_| fe.set_vring_base(1, 0))
        .and_then(|_| fe.set_vring_addr(1, d, u, a))
        .and_then(|_| fe.set_vring_fd(code::SET_VRING_CALL, 1, Some(call1.as_raw_fd())))
        .and_then(|_| fe.set_vring_fd(code::SET_VRING_KICK, 1, Some(kick1.as_raw_fd())))
        .and_then(|_| fe.set_vring_enable(1, true));
    if rig.judge("queue 1 on queue 0's rings", &r) {
        for i in 0..64u64 {
            let hdr = s.put(&header(if i % 4 == 3 { T_OUT } else { T_IN }, i * 8));
            let buf = s.alloc(4096, 4096);
            let st = s.status();
            let data = if i % 4 == 3 {
                Desc::r(buf, 4096)
            } else {
                Desc::w(buf, 4096)
            };
            s.chain(0, &[Desc::r(hdr, 16), data, Desc::w(st, 1)]);
            if i % 4 == 3 {
                rig.image_writes.push((i * 8 * SECTOR, 4096));
            }
        }
        s.queues[0].publish(&s.mem);
        eventfd_signal(kick1.as_raw_fd());
        s.queues[0].kick();
        // Both workers see the same 64 requests; whatever they make of it, they must survive.
        let deadline = Instant::now() + hostile_wait();
        let fd = s.fe.as_raw_fd();
        let mut n = 0;
        while s.queues[0].wait_used(&s.mem, deadline, Some(fd)).is_some() {
            n += 1;
        }
        rig.note(format!(
            "{n} used elements for 64 requests seen by two queues"
        ));
        rig.responsive(&s.fe, "two queues on one ring");
    }
    rig.keep_session("the session with two queues on one ring", s, &[]);
    drop((kick1, call1));
    rig.finish();
}

#[test]
fn config_messages_without_the_config_feature() {
    let mut rig = start();
    let mut fe = rig.connect();
    let cfg = SessionCfg {
        protocol: WANTED_PROTOCOL & !pfeat::CONFIG,
        ..SessionCfg::default()
    };
    if let Err(e) = Session::negotiate(&mut fe, &cfg) {
        rig.fail(format!("negotiation without CONFIG failed: {e}"));
        return rig.finish();
    }
    match fe.get_config(0, 60) {
        Ok(c) => rig.note(format!("GET_CONFIG without CONFIG: {} bytes", c.data.len())),
        Err(FeError::Timeout) => rig.fail("GET_CONFIG without CONFIG: no reply (hang)"),
        Err(e) => rig.note(format!("GET_CONFIG without CONFIG: {e}")),
    }
    fe = after(&mut rig, fe, "GET_CONFIG without CONFIG");
    let r = fe.set_acked(code::SET_CONFIG, &config_payload(32, 1, 0, &[0]), &[]);
    rig.judge("SET_CONFIG without CONFIG", &r);
    fe = after(&mut rig, fe, "SET_CONFIG without CONFIG");
    drop(fe);
    rig.finish();
}

#[test]
fn vring_messages_for_queues_that_do_not_exist() {
    let mut rig = start();
    let mut fe = negotiated(&mut rig);
    let ev = eventfd();
    for idx in [1u32, 2, 63, 64, 255, 256, 0x1_0000, u32::MAX] {
        let msgs: Vec<(u32, Vec<u8>, Vec<RawFd>, &str)> = vec![
            (
                code::SET_VRING_NUM,
                vring_state(idx, 64),
                vec![],
                "SET_VRING_NUM",
            ),
            (
                code::SET_VRING_BASE,
                vring_state(idx, 0),
                vec![],
                "SET_VRING_BASE",
            ),
            (
                code::SET_VRING_ADDR,
                vring_addr(idx, 0, 0x1000, 0x2000, 0x3000, 0),
                vec![],
                "SET_VRING_ADDR",
            ),
            (
                code::SET_VRING_ENABLE,
                vring_state(idx, 1),
                vec![],
                "SET_VRING_ENABLE",
            ),
            (
                code::SET_VRING_KICK,
                u64::from(idx).to_ne_bytes().to_vec(),
                vec![ev.as_raw_fd()],
                "SET_VRING_KICK",
            ),
            (
                code::SET_VRING_CALL,
                u64::from(idx).to_ne_bytes().to_vec(),
                vec![ev.as_raw_fd()],
                "SET_VRING_CALL",
            ),
            (
                code::SET_VRING_ERR,
                u64::from(idx).to_ne_bytes().to_vec(),
                vec![ev.as_raw_fd()],
                "SET_VRING_ERR",
            ),
        ];
        for (c, p, fds, name) in msgs {
            let what = format!("{name} for vring {idx:#x}");
            let r = fe.set_acked(c, &p, &fds);
            rig.judge(&what, &r);
            fe = after(&mut rig, fe, &what);
        }
        let what = format!("GET_VRING_BASE for vring {idx:#x}");
        let r = fe
            .call(code::GET_VRING_BASE, &vring_state(idx, 0), &[])
            .map(|_| ());
        rig.judge(&what, &r);
        fe = after(&mut rig, fe, &what);
    }
    // Garbage in the high bits of the kick/call payload.
    for v in [0xffff_ffff_ffff_fe00u64, 1 << 63 | 1 << 8] {
        let what = format!("SET_VRING_KICK payload {v:#x}");
        let r = fe.set_acked(code::SET_VRING_KICK, &v.to_ne_bytes(), &[ev.as_raw_fd()]);
        rig.judge(&what, &r);
        fe = after(&mut rig, fe, &what);
    }
    drop(fe);
    rig.finish();
}

#[test]
fn vring_enabled_and_kicked_before_it_is_configured() {
    let mut rig = start();
    // No memory table, no addresses: only a kick fd and an enable.
    let fe = negotiated(&mut rig);
    let kick = eventfd();
    let call = eventfd();
    let ok = set_judged(
        &mut rig,
        &fe,
        code::SET_VRING_CALL,
        &0u64.to_ne_bytes(),
        &[call.as_raw_fd()],
        "SET_VRING_CALL",
    ) && set_judged(
        &mut rig,
        &fe,
        code::SET_VRING_KICK,
        &0u64.to_ne_bytes(),
        &[kick.as_raw_fd()],
        "SET_VRING_KICK first",
    ) && set_judged(
        &mut rig,
        &fe,
        code::SET_VRING_ENABLE,
        &vring_state(0, 1),
        &[],
        "SET_VRING_ENABLE unconfigured",
    );
    if ok {
        eventfd_signal(kick.as_raw_fd());
        rig.responsive(&fe, "kick of an unconfigured vring");
        // Memory arrives, addresses never do.
        let mem = std_memory();
        let (t, fds) = mem.table();
        let r = fe.set_acked(code::SET_MEM_TABLE, &mem_table_payload(&t), &fds);
        rig.judge("SET_MEM_TABLE after the enable", &r);
        eventfd_signal(kick.as_raw_fd());
        rig.responsive(&fe, "kick of a vring without addresses");
        // The vring has no addresses: not one byte of guest RAM is the device's to write.
        rig.keep_memory("guest RAM of the vring without addresses", mem, &[]);
    }
    drop(fe);
    rig.finish();
}

#[test]
fn vring_enable_with_odd_values() {
    let mut rig = start();
    let mut s = rig.session(&SessionCfg::default());
    for v in [2u32, 0xffff, u32::MAX] {
        let r =
            s.fe.set_acked(code::SET_VRING_ENABLE, &vring_state(0, v), &[]);
        rig.judge(&format!("SET_VRING_ENABLE {v:#x}"), &r);
    }
    probe(&mut rig, &mut s, "after odd enables");
    rig.keep_session("the session", s, &[]);
    rig.finish();
}

#[test]
fn vring_stopped_and_restarted_with_a_lying_base() {
    let mut rig = start();
    let mut s = rig.session(&SessionCfg::default());
    // I/O in flight, then GET_VRING_BASE (stop), then restart claiming 200 entries consumed.
    for _ in 0..32 {
        let hdr = s.put(&header(T_IN, 0));
        let d = s.alloc(32768, 4096);
        let st = s.status();
        s.chain(0, &[Desc::r(hdr, 16), Desc::w(d, 32768), Desc::w(st, 1)]);
    }
    s.kick(0);
    match s.fe.get_vring_base(0) {
        Ok(b) => rig.note(format!("GET_VRING_BASE with I/O in flight = {b}")),
        Err(e) => rig.fail(format!("GET_VRING_BASE with I/O in flight: {e}")),
    }
    let q = &s.queues[0];
    let fe = &s.fe;
    let mem = &s.mem;
    let r = fe
        .set_vring_num(0, 256)
        .and_then(|_| fe.set_vring_base(0, u32::from(q.avail_idx) + 200))
        .and_then(|_| {
            fe.set_vring_addr(0, mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail))
        })
        .and_then(|_| fe.set_vring_fd(code::SET_VRING_KICK, 0, Some(q.kick.as_raw_fd())))
        .and_then(|_| fe.set_vring_fd(code::SET_VRING_CALL, 0, Some(q.call.as_raw_fd())))
        .and_then(|_| fe.set_vring_enable(0, true));
    if rig.judge("restart with base = avail idx + 200", &r) {
        probe(&mut rig, &mut s, "after the lying restart");
    }
    rig.keep_session("the restarted session", s, &[]);
    rig.finish();
}

// =======================================================================================
// Kick and call fds that are not eventfds.

/// Replace queue 0's kick (or call) fd of an honest session with `fd`; probe with `kick`.
/// With `measure_idle`, also check that the backend then idles (no busy loop) for 1.5 s.
fn fd_lie(
    rig: &mut Rig,
    call: bool,
    fd: RawFd,
    what: &str,
    kick: &dyn Fn(&Session),
    measure_idle: bool,
) {
    let mut s = rig.session(&SessionCfg::default());
    let c = if call {
        code::SET_VRING_CALL
    } else {
        code::SET_VRING_KICK
    };
    let r = s.fe.set_acked(c, &0u64.to_ne_bytes(), &[fd]);
    if !rig.judge(what, &r) {
        rig.keep_session(what, s, &[]);
        return;
    }
    let before = rig.cpu_ticks();
    let t0 = Instant::now();
    probe_with(rig, &mut s, what, kick);
    // Whatever the backend does with the fd, it must stay responsive.
    rig.responsive(&s.fe, what);
    if measure_idle {
        // A measurement window, not a synchronisation: an idle backend burns nothing.
        poll_fd(
            s.fe.as_raw_fd(),
            libc::POLLRDHUP,
            t0 + Duration::from_millis(1500),
        );
        let busy = rig.cpu_ticks().saturating_sub(before) * 10;
        let wall = t0.elapsed().as_millis() as u64;
        if wall < 200 {
            // The backend closed the connection at once: there was no window to measure.
            rig.note(format!(
                "{what}: connection closed after {wall} ms, idle not measured"
            ));
        } else if busy * 10 >= wall * 5 {
            rig.fail(format!(
                "{what}: the backend burned {busy} ms of CPU in {wall} ms (busy loop)"
            ));
        } else {
            rig.note(format!("{what}: {busy} ms of CPU in {wall} ms"));
        }
    }
    rig.keep_session(what, s, &[]);
}

#[test]
fn kick_fd_that_is_a_pipe_with_odd_writes() {
    let mut rig = start();
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    let kick = move |_: &Session| {
        // Three bytes: not the 8 an eventfd read returns.
        // SAFETY: writing 3 bytes from a valid buffer to our pipe.
        unsafe { libc::write(wfd, [1u8, 2, 3].as_ptr().cast(), 3) };
    };
    fd_lie(
        &mut rig,
        false,
        r.as_raw_fd(),
        "kick fd = pipe (3-byte writes)",
        &kick,
        false,
    );
    rig.finish();
    drop(w);
}

#[test]
fn kick_fd_that_is_always_readable() {
    // /dev/zero and a pipe at EOF are readable forever: a backend that trusts them spins.
    let mut rig = start();
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let (r, w) = pipe();
    drop(w);
    for (fd, what) in [
        (zero.as_raw_fd(), "kick fd = /dev/zero"),
        (r.as_raw_fd(), "kick fd = pipe at EOF"),
    ] {
        fd_lie(&mut rig, false, fd, what, &|_| {}, true);
    }
    rig.finish();
}

/// Queue 0's kick fd (`call`: its call fd) of an honest session replaced by a regular file.
fn fd_is_a_regular_file(call: bool, what: &str) {
    let mut rig = start();
    let f = tempfile::tempfile().unwrap();
    let kick = |s: &Session| {
        if call {
            s.queues[0].kick()
        }
    };
    fd_lie(&mut rig, call, f.as_raw_fd(), what, &kick, false);
    rig.finish();
}

#[test]
fn kick_fd_that_is_a_regular_file() {
    fd_is_a_regular_file(false, "kick fd = regular file");
}

#[test]
fn call_fd_that_is_a_pipe_nobody_reads() {
    // Writing to it raises SIGPIPE in the backend unless it is ignored.
    let mut rig = start();
    let (r, w) = pipe();
    drop(r);
    fd_lie(
        &mut rig,
        true,
        w.as_raw_fd(),
        "call fd = pipe without reader",
        &|s| s.queues[0].kick(),
        false,
    );
    rig.finish();
}

#[test]
fn call_fd_that_is_a_full_pipe() {
    // A blocking write to it never returns while we hold the read end.
    let mut rig = start();
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    // SAFETY: fcntl on our own pipe: fill it without blocking, then make it blocking again.
    unsafe {
        libc::fcntl(wfd, libc::F_SETFL, libc::O_NONBLOCK);
        let chunk = [0u8; 4096];
        while libc::write(wfd, chunk.as_ptr().cast(), chunk.len()) > 0 {}
        libc::fcntl(wfd, libc::F_SETFL, 0);
    }
    fd_lie(
        &mut rig,
        true,
        wfd,
        "call fd = full pipe",
        &|s| s.queues[0].kick(),
        false,
    );
    // The read end stays open through the health check: the backend must not be stuck.
    rig.health_check();
    rig.check_kept_memory();
    drop(r);
    rig.finish();
}

#[test]
fn call_fd_that_is_a_regular_file() {
    fd_is_a_regular_file(true, "call fd = regular file");
}

// =======================================================================================
// Connections.

#[test]
fn disconnect_with_io_in_flight() {
    let opts = RigOpts {
        num_queues: 2,
        ..RigOpts::default()
    };
    let mut rig = Rig::start(opts);
    let cfg = SessionCfg {
        queues: 2,
        ..SessionCfg::default()
    };
    let mut s = rig.session(&cfg);
    let mut image_writes = Vec::new();
    for q in 0..2 {
        for i in 0..20u64 {
            let sector = (q as u64 * 20 + i) * 256;
            let hdr = s.put(&header(if i % 2 == 0 { T_IN } else { T_OUT }, sector));
            let d = s.alloc(65536, 4096);
            s.mem.fill(d, 65536, 0x3c);
            let st = s.status();
            let data = if i % 2 == 0 {
                Desc::w(d, 65536)
            } else {
                Desc::r(d, 65536)
            };
            if i % 2 == 1 {
                image_writes.push((sector * SECTOR, 65536));
            }
            s.chain(q, &[Desc::r(hdr, 16), data, Desc::w(st, 1)]);
        }
    }
    s.kick(0);
    s.kick(1);
    // Hang up at once.
    rig.image_writes.extend(image_writes);
    rig.keep_session("the session that hung up", s, &[]);
    rig.finish();
}

#[test]
fn second_connection_while_the_first_is_active() {
    let mut rig = start();
    let mut a = rig.session(&SessionCfg::default());
    // B talks while A is being served; B may wait in the backlog or be served.
    let b = rig.connect();
    let bm = GuestMemory::named("second", &[(0, 1 << 20)]);
    let (t, fds) = bm.table();
    let _ = b.send(code::SET_OWNER, 0, &[], &[]);
    let _ = b.send(code::SET_MEM_TABLE, 0, &mem_table_payload(&t), &fds);
    let _ = b.send(code::SET_VRING_NUM, 0, &vring_state(0, 0), &[]);
    let _ = b.send(code::RESET_OWNER, 0, &[], &[]);
    match a.read(0, PROBE_OFFSET, 4096) {
        Ok(d) if d == image::pattern(PROBE_OFFSET, 4096) => {}
        Ok(_) => rig.fail(
            "the first connection's read returned wrong data while a second connection talked",
        ),
        Err(e) => rig.fail(format!(
            "the first connection stopped working while a second connection talked: {e}"
        )),
    }
    probe(&mut rig, &mut a, "first connection");
    drop(b);
    rig.keep_session("the first connection's session", a, &[]);
    // The second connection never set up a queue: nothing may be written to its memory.
    rig.keep_memory("the second connection's guest RAM", bm, &[]);
    rig.finish();
}

#[test]
fn many_connections_opened_and_dropped() {
    let mut rig = start();
    for i in 0..100 {
        let fe = rig.connect();
        if i % 3 == 0 {
            let _ = fe.send(code::GET_FEATURES, 0, &[], &[]);
        }
        if i % 5 == 0 {
            let _ = fe.send_raw(&[1, 0, 0], &[]);
        }
        drop(fe);
    }
    rig.alive("after 100 connections");
    rig.finish();
}

#[test]
fn repeated_mem_tables_do_not_leak() {
    let mut rig = start();
    let fe = negotiated(&mut rig);
    let before = (rig.fd_count(), rig.rss_kib());
    for i in 0..200 {
        let m = GuestMemory::new(&[(0x10_0000, 1 << 20), (0x100_0000, 1 << 20)]);
        let (t, fds) = m.table();
        let r = fe.set_acked(code::SET_MEM_TABLE, &mem_table_payload(&t), &fds);
        // No queue ever lives in these tables: not one byte of them is the backend's to
        // write. Compared at once (200 of them would be 400 MiB to keep).
        for f in m.stray_writes_since_creation(&[]) {
            rig.fail(format!("memory table #{i}: {f}"));
        }
        if !rig.judge(&format!("SET_MEM_TABLE #{i}"), &r) {
            break;
        }
    }
    let after = (rig.fd_count(), rig.rss_kib());
    if after.0 > before.0 + 16 {
        rig.fail(format!(
            "open fds grew from {} to {} over 200 SET_MEM_TABLEs",
            before.0, after.0
        ));
    }
    rig.note(format!(
        "fds {} -> {}, RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1
    ));
    drop(fe);
    rig.finish();
}
