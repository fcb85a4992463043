//! A VMM that hands over kick and call fds that are not eventfds (issue 11): the read end of a
//! pipe holding one byte whose write end it keeps open, a socket likewise, a plain file, a full
//! pipe as call fd, and an eventfd in semaphore mode with a huge count. The backend must never
//! let such an fd block or busy a thread: GET_VRING_BASE is answered (or the connection is
//! dropped) within the reply timeout, the process stays up, and a fresh connection is served
//! (`Rig::health_check`, then `Rig::finish`: image unchanged, process alive). ringfence must
//! also refuse the fd and drop the connection, and say so in its log.
//!
//! `RINGFENCE_HOSTILE_TARGET=qsd` runs the same cases against qemu-storage-daemon, where only
//! the common checks apply.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk::T_IN;
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::memory::GuestMemory;
use ringfence_guest_tests::rig::*;
use ringfence_guest_tests::virtq::SplitQueue;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Kick,
    Call,
}

/// What the test does once the queue is set up and enabled (if the connection survived that).
enum Poke {
    Nothing,
    /// Make a valid read available and kick (the worker completes it and signals the call fd).
    Request,
    /// Write this value to the (eventfd) kick fd, then wait for the connection to be dropped.
    KickValue(RawFd, u64),
}

/// Set up queue 0 with `fd` as its kick or call fd, enable it, `poke`, then GET_VRING_BASE.
/// `log` is what ringfence must say about the refusal.
fn hostile_vring_fd(what: &str, role: Role, fd: RawFd, poke: Poke, log: &str) {
    let mut rig = Rig::start(RigOpts::default());
    let started = Instant::now();
    let mut fe = rig.connect();
    if let Err(e) = Session::negotiate(&mut fe, &SessionCfg::default()) {
        panic!("{what}: honest negotiation failed: {e}");
    }
    let mem = GuestMemory::new(&[RAM_A, RAM_B, RAM_C]);
    let (table, fds) = mem.table();
    fe.set_mem_table(&table, &fds)
        .unwrap_or_else(|e| panic!("{what}: honest memory table: {e}"));
    let q = SplitQueue::new(&mem, 0, 256, RAM_A.0);
    fe.set_vring_num(0, 256)
        .and_then(|()| fe.set_vring_base(0, 0))
        .and_then(|()| {
            fe.set_vring_addr(0, mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail))
        })
        .unwrap_or_else(|e| panic!("{what}: honest vring setup: {e}"));
    let (call, kick) = match role {
        Role::Kick => (q.call.as_raw_fd(), fd),
        Role::Call => (fd, q.kick.as_raw_fd()),
    };
    let mut open = rig.judge(
        &format!("{what}: SET_VRING_CALL"),
        &fe.set_vring_fd(code::SET_VRING_CALL, 0, Some(call)),
    ) && rig.judge(
        &format!("{what}: SET_VRING_KICK"),
        &fe.set_vring_fd(code::SET_VRING_KICK, 0, Some(kick)),
    ) && rig.judge(
        &format!("{what}: SET_VRING_ENABLE"),
        &fe.set_vring_enable(0, true),
    );
    let mut s = Session::from_parts(fe, mem, vec![q], RAM_A.0 + 0x10_0000);
    if open {
        match poke {
            Poke::Nothing => {}
            Poke::Request => {
                let r = s.io_within(0, T_IN, PROBE_OFFSET / 512, &[], 4096, hostile_wait());
                rig.note(format!("{what}: a valid read: {r:?}"));
            }
            Poke::KickValue(kfd, v) => {
                // SAFETY: writing 8 bytes from a valid buffer to the eventfd we made.
                let n = unsafe { libc::write(kfd, v.to_ne_bytes().as_ptr().cast(), 8) };
                assert_eq!(n, 8, "{what}: write to the kick eventfd");
                if rig.target == Target::Ringfence && !s.fe.wait_closed(HONEST_TIMEOUT) {
                    rig.fail(format!(
                        "{what}: the connection was not dropped within {HONEST_TIMEOUT:?}"
                    ));
                }
            }
        }
    }
    if open && !s.fe.peer_hung_up() {
        let t = Instant::now();
        match s.fe.get_vring_base(0) {
            Ok(base) => rig.note(format!(
                "{what}: GET_VRING_BASE answered {base} in {:?}",
                t.elapsed()
            )),
            Err(FeError::Closed) => {
                rig.note(format!("{what}: GET_VRING_BASE: connection closed"));
                open = false;
            }
            Err(FeError::Timeout) => rig.fail(format!(
                "{what}: GET_VRING_BASE unanswered for {:?} (a thread is stuck on the {} fd)",
                s.fe.timeout,
                if role == Role::Kick { "kick" } else { "call" }
            )),
            Err(e) => rig.fail(format!("{what}: GET_VRING_BASE: {e}")),
        }
    } else {
        open = false;
    }
    if rig.target == Target::Ringfence {
        if open {
            rig.fail(format!(
                "{what}: ringfence kept a connection whose {} fd is no eventfd",
                if role == Role::Kick { "kick" } else { "call" }
            ));
        }
        if !rig.daemon.wait_for_log(log, Duration::from_secs(5)) {
            rig.fail(format!("{what}: the log does not say {log:?}"));
        }
    }
    drop(s);
    // A fresh connection is served: valid write and read (`health_check`), and nothing hangs.
    rig.health_check();
    rig.note(format!("{what}: done in {:?}", started.elapsed()));
    rig.finish();
}

fn pipe_holding_one_byte() -> (OwnedFd, OwnedFd) {
    let (r, w) = pipe();
    let mut wf = std::fs::File::from(w);
    wf.write_all(&[1]).expect("write one byte");
    (r, OwnedFd::from(wf))
}

fn plain_file() -> std::fs::File {
    let mut f = tempfile::tempfile().expect("tempfile");
    f.write_all(&[7u8; 64]).expect("write");
    f
}

#[test]
fn kick_fd_is_a_pipe_holding_one_byte() {
    // The VMM keeps the write end open: an 8-byte read of the read end never completes.
    let (r, _w) = pipe_holding_one_byte();
    hostile_vring_fd(
        "kick = pipe read end with 1 byte",
        Role::Kick,
        r.as_raw_fd(),
        Poke::Nothing,
        "refusing the VMM's kick fd: it is a pipe",
    );
}

#[test]
fn kick_fd_is_a_socket_holding_one_byte() {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    (&b).write_all(&[1]).expect("write one byte");
    hostile_vring_fd(
        "kick = socket with 1 byte",
        Role::Kick,
        a.as_raw_fd(),
        Poke::Nothing,
        "refusing the VMM's kick fd: it is a socket",
    );
}

#[test]
fn kick_fd_is_a_plain_file() {
    let f = plain_file();
    hostile_vring_fd(
        "kick = plain file",
        Role::Kick,
        f.as_raw_fd(),
        Poke::Nothing,
        "refusing the VMM's kick fd: it is a regular file",
    );
}

#[test]
fn kick_fd_is_a_semaphore_eventfd_with_a_huge_count() {
    // SAFETY: eventfd with valid flags; the result is checked and owned from here on.
    let efd = unsafe {
        let fd = libc::eventfd(
            0,
            libc::EFD_SEMAPHORE | libc::EFD_NONBLOCK | libc::EFD_CLOEXEC,
        );
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    };
    hostile_vring_fd(
        "kick = semaphore eventfd counting 2^64-2",
        Role::Kick,
        efd.as_raw_fd(),
        Poke::KickValue(efd.as_raw_fd(), u64::MAX - 1),
        "kick eventfd is a semaphore",
    );
}

#[test]
fn call_fd_is_a_full_pipe() {
    let (_r, w) = pipe();
    // Fill it (non-blocking on our side), so that a blocking write would wait for ever.
    // SAFETY: fcntl on a pipe end we own.
    unsafe {
        let fl = libc::fcntl(w.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(w.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let chunk = [0u8; 4096];
    // SAFETY: writing from a valid buffer until the pipe is full (EAGAIN).
    while unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
    // Blocking again, as the VMM may leave it.
    // SAFETY: as above.
    unsafe {
        let fl = libc::fcntl(w.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(w.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    hostile_vring_fd(
        "call = full pipe",
        Role::Call,
        w.as_raw_fd(),
        Poke::Request,
        "refusing the VMM's call fd: it is a pipe",
    );
}

#[test]
fn call_fd_is_a_plain_file() {
    let f = plain_file();
    hostile_vring_fd(
        "call = plain file",
        Role::Call,
        f.as_raw_fd(),
        Poke::Request,
        "refusing the VMM's call fd: it is a regular file",
    );
    // Nothing was written into the VMM's file.
    assert_eq!(
        f.metadata().expect("stat").len(),
        64,
        "the call fd's file grew"
    );
}
