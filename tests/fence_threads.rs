//! Once the daemon serves, no thread of it can create an io_uring ring, and only the control
//! thread (the main thread, `ringfence`) may call `io_uring_register`, and then only to register
//! buffers (opcode 0) or unregister them (opcode 1). Checked on the real daemon's own filters.
//!
//! How: the daemon (with a stats socket) serves a 2-queue blkio client that writes and reads on
//! each queue, so every thread exists and has run. Each thread (the kernel's `iou-wrk` workers
//! aside: they never run user code) is stopped with ptrace (`PTRACE_SEIZE`, `PTRACE_INTERRUPT`,
//! waited for), its seccomp filters are read back with `PTRACE_SECCOMP_GET_FILTER` (as many as
//! `Seccomp_filters:` in its status says) and it is let go. Then, for each call, a forked child
//! of this test installs that thread's filters in their original order and makes the call with
//! raw system calls: `io_uring_setup`, and `io_uring_register` on a bad fd for opcodes 0..=40,
//! with the `IORING_REGISTER_USE_REGISTERED_RING` bit, and with bit 32 (which the kernel drops).
//! The same call in a child without filters is the baseline: EPERM, or death by a signal, where
//! the baseline got otherwise is a refusal; the baseline's answer is a pass; anything else
//! fails the test as unexplained. With `--sandbox none` the same method sees every call allowed.
//!
//! Needs root, a test process outside seccomp, and a kernel with `CONFIG_CHECKPOINT_RESTORE` and
//! `CONFIG_SECCOMP_FILTER` (for `PTRACE_SECCOMP_GET_FILTER`): without them it fails, saying why.

mod common;

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::{wait_readable, Backend, BackendOpts, ClientOpts, Target, IO_TIMEOUT};

/// linux/ptrace.h (Linux 4.4, `CONFIG_CHECKPOINT_RESTORE`); not in the `libc` crate.
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// linux/io_uring.h `IORING_REGISTER_USE_REGISTERED_RING` (Linux 6.3).
const USE_REGISTERED_RING: u64 = 1 << 31;
/// An fd no test process has open: a register call the filters let through fails on it.
const BAD_FD: usize = 9999;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    Setup,
    Register(u64),
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Call::Setup => write!(f, "io_uring_setup"),
            Call::Register(op) => write!(f, "io_uring_register opcode {op:#x}"),
        }
    }
}

fn calls() -> Vec<Call> {
    let mut v = vec![Call::Setup];
    v.extend((0..=40).map(Call::Register));
    v.extend([USE_REGISTERED_RING, USE_REGISTERED_RING | 1, (1 << 32) | 2].map(Call::Register));
    v
}

/// The target: the control thread registers and unregisters buffers; nothing else, anywhere.
fn allowed(call: Call, control: bool) -> bool {
    control && matches!(call, Call::Register(0 | 1))
}

/// What a child saw: the call's return value or errno, its death by a signal, or a broken setup.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Returned(Result<i64, i32>),
    Killed(i32),
    Broken(String),
}

/// In a forked child: install `filters` (oldest first), make `call`, report through a pipe.
fn in_child(filters: &[Vec<libc::sock_filter>], call: Call) -> Answer {
    let progs: Vec<libc::sock_fprog> = filters
        .iter()
        .map(|f| libc::sock_fprog {
            len: u16::try_from(f.len()).expect("a filter has at most 4096 instructions"),
            filter: f.as_ptr().cast_mut(),
        })
        .collect();
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new fds into the array we own.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and nothing else owns them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child runs `child`, which makes raw system calls on memory prepared before the
    // fork (no allocation, no lock: this process has other threads) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: `progs` and the filters they point to were copied into the child by fork.
        unsafe { child(&progs, call, wr.as_raw_fd()) }
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    drop(wr);
    assert!(
        wait_readable(rd.as_raw_fd(), IO_TIMEOUT),
        "the child making {call} did not answer within {IO_TIMEOUT:?}"
    );
    let mut msg = [0i64; 2];
    // SAFETY: reading at most 16 bytes into the 16-byte array.
    let n = unsafe { libc::read(rd.as_raw_fd(), msg.as_mut_ptr().cast(), 16) };
    let mut status = 0;
    // SAFETY: reaping our own child; `status` is a valid int.
    let w = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(w, pid, "waitpid: {}", std::io::Error::last_os_error());
    match (n, msg) {
        (16, [0, r]) => Answer::Returned(if r < 0 { Err(-r as i32) } else { Ok(r) }),
        (16, [s, e]) => Answer::Broken(format!("setup step {s} failed: errno {}", -e)),
        _ if libc::WIFSIGNALED(status) => Answer::Killed(libc::WTERMSIG(status)),
        _ => Answer::Broken(format!("no answer (read {n}), wait status {status:#x}")),
    }
}

/// The forked child. Writes `[step, result]`: 0 and the call's result (or -errno), or the setup
/// step that failed and -errno (1: prctl, 2 and on: installing the filters).
///
/// # Safety
/// Only in a child just forked; `progs` point to valid filters.
unsafe fn child(progs: &[libc::sock_fprog], call: Call, out: libc::c_int) -> ! {
    let errno = || -i64::from(*libc::__errno_location());
    let mut msg = [0i64; 2];
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1usize, 0usize, 0usize, 0usize) != 0 {
        msg = [1, errno()];
    }
    let mode = libc::SECCOMP_SET_MODE_FILTER as usize;
    for (i, p) in progs.iter().enumerate() {
        if msg[0] == 0 && libc::syscall(libc::SYS_seccomp, mode, 0usize, p) != 0 {
            msg = [i as i64 + 2, errno()];
        }
    }
    if msg[0] == 0 {
        let mut params = [0u64; 15]; // struct io_uring_params: 120 bytes, zeroed
        let r = match call {
            Call::Setup => libc::syscall(libc::SYS_io_uring_setup, 4usize, params.as_mut_ptr()),
            Call::Register(op) => {
                libc::syscall(libc::SYS_io_uring_register, BAD_FD, op, 0usize, 0usize)
            }
        };
        msg[1] = if r < 0 { errno() } else { r };
    }
    libc::write(out, msg.as_ptr().cast(), 16);
    libc::_exit(0)
}

/// A refusal (EPERM or a signal where the baseline got otherwise), a pass (the baseline's
/// answer), or something this test cannot explain.
fn verdict(base: &Answer, got: &Answer) -> Result<bool, String> {
    match (base, got) {
        (Answer::Returned(Ok(_)), Answer::Returned(Ok(_))) => Ok(true),
        (b, g) if b == g => Ok(true),
        (_, Answer::Returned(Err(libc::EPERM)) | Answer::Killed(_)) => Ok(false),
        _ => Err(format!("{got:?} (without filters: {base:?})")),
    }
}

struct Thread {
    tid: i32,
    name: String,
    /// `Seccomp:` of its status (0: none, 2: filters).
    mode: u32,
    /// Oldest first, as the kernel numbers them: index 0 is the first filter installed (ptrace(2)
    /// says the newest, but a worker's allowlist, installed last, reads back last).
    filters: Vec<Vec<libc::sock_filter>>,
}

fn status_field(pid: i32, tid: i32, key: &str) -> u32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the status of thread {tid}:\n{s}"))
}

/// The threads of `pid` that run its code: not the kernel's io_uring workers (`iou-wrk-*`,
/// flag PF_IO_WORKER), which never run user code and come and go with the load.
fn tids(pid: i32) -> Vec<i32> {
    const PF_IO_WORKER: u64 = 0x10;
    // Field 9 of its stat, `flags`: the 7th after the comm's closing parenthesis.
    let flags = |tid: &i32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split(' ').nth(7)?.parse().ok()
    };
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid| flags(tid).is_some_and(|f| f & PF_IO_WORKER == 0))
        .collect();
    v.sort();
    v
}

/// Stop `tid` with ptrace, read its seccomp filters (oldest first), let it go.
fn dump_filters(tid: i32, mode: u32) -> Vec<Vec<libc::sock_filter>> {
    let err = std::io::Error::last_os_error;
    // SEIZE, INTERRUPT, DETACH: no memory of ours is passed, `data` is a number.
    let ctl = |req: libc::c_uint, data: usize, what: &str| {
        // SAFETY: a request of the three above on a thread of our own child.
        let r = unsafe { libc::ptrace(req, tid, 0usize, data) };
        assert_eq!(r, 0, "{what} of thread {tid}: {} (root needed)", err());
    };
    ctl(libc::PTRACE_SEIZE, 0, "PTRACE_SEIZE");
    ctl(libc::PTRACE_INTERRUPT, 0, "PTRACE_INTERRUPT");
    let mut status = 0;
    // SAFETY: waiting for our tracee's stop; `status` is a valid int.
    let w = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    let stopped = w == tid && libc::WIFSTOPPED(status);
    assert!(
        stopped,
        "thread {tid} did not stop: {w}, {status:#x}: {}",
        err()
    );
    let mut filters = Vec::new();
    let end = loop {
        let i = filters.len();
        let nul = std::ptr::null_mut::<libc::sock_filter>();
        // SAFETY: with a null buffer the kernel only returns the filter's length.
        let n = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, i, nul) };
        if n < 0 {
            break err();
        }
        let mut buf = Vec::<libc::sock_filter>::with_capacity(n as usize);
        // SAFETY: `buf` has room for the `n` instructions the kernel said filter `i` has.
        let m = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, i, buf.as_mut_ptr()) };
        assert_eq!(m, n, "filter {i} of thread {tid} changed length: {}", err());
        // SAFETY: the kernel wrote `m` instructions (plain integers) into `buf`.
        unsafe { buf.set_len(m as usize) };
        filters.push(buf);
    };
    // A signal-delivery stop (rather than our interrupt's) must get its signal back.
    let resend = if status >> 16 == 0 {
        libc::WSTOPSIG(status)
    } else {
        0
    };
    ctl(libc::PTRACE_DETACH, resend as usize, "PTRACE_DETACH");
    match end.raw_os_error() {
        Some(libc::ENOENT) => {}
        // Not in filter mode at all (`Seccomp: 0`): no filters to read.
        Some(libc::EINVAL) if filters.is_empty() && mode == 0 => {}
        _ => panic!(
            "PTRACE_SECCOMP_GET_FILTER, thread {tid}, filter {}: {end}. It needs root \
             (CAP_SYS_ADMIN), a test process outside seccomp, and a kernel with \
             CONFIG_CHECKPOINT_RESTORE and CONFIG_SECCOMP_FILTER (EIO or EINVAL: it lacks them)",
            filters.len()
        ),
    }
    filters
}

/// A daemon with a statistics socket (so a `stats` thread), serving a 2-queue client that has
/// written and read on both queues (so both `queue<N>` threads have run).
fn serving(mut extra: Vec<String>) -> (Backend, common::Client, tempfile::TempDir) {
    let stats_dir = tempfile::tempdir().expect("tempdir");
    let stats = stats_dir.path().join("stats.sock").display().to_string();
    extra.extend(["--stats-socket".into(), stats]);
    let opts = BackendOpts {
        num_queues: 2,
        extra,
        ..BackendOpts::default()
    };
    let b = Backend::start_on(Target::Ringfence, opts);
    let mut client = b.connect(ClientOpts {
        num_queues: 2,
        ..ClientOpts::default()
    });
    for (i, q) in client.queues.iter_mut().enumerate() {
        let data = common::pattern(i as u64 + 1, i as u64 * 4096, 4096);
        q.write(i as u64 * 4096, &data).expect("write");
        let got = q.read(i as u64 * 4096, 4096).expect("read");
        common::assert_same("read back", i as u64 * 4096, &got, &data);
    }
    (b, client, stats_dir)
}

/// Every thread of `pid` with its filters, their number checked against its status.
fn threads(pid: i32) -> Vec<Thread> {
    let before = tids(pid);
    let mut threads = Vec::new();
    for &tid in &before {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"));
        let name = comm.expect("comm").trim().to_string();
        let mode = status_field(pid, tid, "Seccomp:");
        let filters = dump_filters(tid, mode);
        let count = status_field(pid, tid, "Seccomp_filters:") as usize;
        assert_eq!(
            filters.len(),
            count,
            "{name} ({tid}): filters read vs status"
        );
        threads.push(Thread {
            tid,
            name,
            mode,
            filters,
        });
    }
    let after = tids(pid);
    assert_eq!(after, before, "threads came or went while they were read");
    let names: Vec<&str> = threads.iter().map(|t| t.name.as_str()).collect();
    for want in ["ringfence", "signals", "stats", "queue0", "queue1"] {
        assert!(names.contains(&want), "no thread {want} among {names:?}");
    }
    threads
}

/// `io_uring_setup, register 0x0-0x1, 0x3`: calls, register opcodes as ranges.
fn describe(calls: &[Call]) -> String {
    let (mut out, mut runs) = (Vec::new(), Vec::<(u64, u64)>::new());
    for c in calls {
        match (c, runs.last_mut()) {
            (Call::Setup, _) => out.push(c.to_string()),
            (Call::Register(op), Some((_, end))) if *op == *end + 1 => *end = *op,
            (Call::Register(op), _) => runs.push((*op, *op)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|&(a, b)| {
            if a == b {
                format!("{a:#x}")
            } else {
                format!("{a:#x}-{b:#x}")
            }
        })
        .collect();
    if !runs.is_empty() {
        out.push(format!("register {}", runs.join(", ")));
    }
    if out.is_empty() {
        "nothing".into()
    } else {
        out.join("; ")
    }
}
/// For each of `threads` (of `pid`): which calls its filters let through. Prints what each
/// thread could do, returns a line for each thread that differs from `want(call, control)`.
fn check(pid: i32, threads: &[Thread], want: impl Fn(Call, bool) -> bool) -> Vec<String> {
    let calls = calls();
    let base: Vec<Answer> = calls.iter().map(|&c| in_child(&[], c)).collect();
    assert!(
        matches!(base[0], Answer::Returned(Ok(_))),
        "io_uring_setup fails without any filter ({:?}): is kernel.io_uring_disabled set? \
         Nothing can be proved here",
        base[0]
    );
    for (c, b) in calls.iter().zip(&base).skip(1) {
        assert!(
            matches!(b, Answer::Returned(Err(e)) if *e != libc::EPERM),
            "{c} on a bad fd without filters: {b:?}, want an errno other than EPERM"
        );
    }
    let mut failures = Vec::new();
    for t in threads {
        let control = t.tid == pid;
        if control {
            assert_eq!(t.name, "ringfence", "the main thread's name");
        }
        let who = format!("thread {} (tid {})", t.name, t.tid);
        let (mut can, mut cannot) = (Vec::new(), Vec::new());
        for (&call, b) in calls.iter().zip(&base) {
            match verdict(b, &in_child(&t.filters, call)) {
                Ok(true) => can.push(call),
                Ok(false) => cannot.push(call),
                Err(e) => failures.push(format!("{who}: {call}: cannot tell: {e}")),
            }
        }
        let unlike = |calls: &[Call], may: bool| -> Vec<Call> {
            let differs = |c: &&Call| want(**c, control) != may;
            calls.iter().filter(differs).copied().collect()
        };
        let (wrongly_can, wrongly_cannot) = (unlike(&can, true), unlike(&cannot, false));
        let sizes: Vec<usize> = t.filters.iter().map(Vec::len).collect();
        println!(
            "{who:<30} Seccomp {} filters {sizes:?}: ALLOWED {}; refused {}",
            t.mode,
            describe(&can),
            describe(&cannot)
        );
        if !wrongly_can.is_empty() {
            failures.push(format!("{who} can make {}", describe(&wrongly_can)));
        }
        if !wrongly_cannot.is_empty() {
            failures.push(format!("{who} is refused {}", describe(&wrongly_cannot)));
        }
    }
    failures
}

#[test]
fn no_thread_makes_a_ring_and_only_the_control_thread_registers_buffers() {
    let (mut b, mut client, _dir) = serving(Vec::new());
    let pid = b.daemon().pid();
    let failures = check(pid, &threads(pid), allowed);
    let after = client.q().read(0, 4096);
    assert!(after.is_ok(), "no I/O after the ptrace stops: {after:?}");
    assert!(
        failures.is_empty(),
        "the daemon's threads are not fenced as they must be (the control thread may make \
         register opcodes 0x0-0x1 alone, the others nothing):\n  {}",
        failures.join("\n  ")
    );
}

/// The method sees an allowed call: without the sandbox every thread makes rings and registers.
#[test]
fn without_the_sandbox_every_thread_can_make_a_ring() {
    let (mut b, _client, _dir) = serving(vec!["--sandbox".into(), "none".into()]);
    let pid = b.daemon().pid();
    let threads = threads(pid);
    for t in &threads {
        assert_eq!((t.mode, t.filters.len()), (0, 0), "{} is filtered", t.name);
    }
    let failures = check(pid, &threads, |_, _| true);
    assert!(
        failures.is_empty(),
        "without filters:\n  {}",
        failures.join("\n  ")
    );
}
