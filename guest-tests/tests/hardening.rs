//! Issue 21, the control plane's part: a hostile VMM cannot wedge a queue through its call
//! eventfd, cannot make the daemon pin more guest RAM than `--max-guest-ram`, cannot grow a
//! memory table past the slots offered, cannot make a queue without valid rings touch guest
//! RAM; a stop (GET_VRING_BASE, RESET_DEVICE) is answered only once nothing of the queue can
//! land any more; a refusal never outlives its request, and unoffered protocol features are
//! refused.
//!
//! Driven by the project's own vhost-user frontend against a real daemon. Waits are on
//! replies, ring indices and log lines, with generous bounds as hang detectors; a bounded wait
//! for something that must NOT happen (a reply while a write is held) is the assertion itself.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk;
use ringfence_guest_tests::daemon::{Daemon, LoopFs};
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::image;
use ringfence_guest_tests::memory::GuestMemory;
use ringfence_guest_tests::rig::*;
use ringfence_guest_tests::virtq::{Desc, SplitQueue};

/// Bound on anything that should happen promptly: a hang detector.
const WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

fn set_nonblocking(fd: RawFd, on: bool) {
    // SAFETY: F_GETFL/F_SETFL on an fd this test owns.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        let fl = if on {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        libc::fcntl(fd, libc::F_SETFL, fl);
    }
}

/// What a hostile VMM does to the call eventfd it shares with the daemon: keep its counter at
/// the maximum (2^64-2) and O_NONBLOCK cleared, again and again (the daemon sets it on every
/// pass). It refills the counter, with O_NONBLOCK set for that one write so that it never
/// blocks itself, whenever the counter has room (nothing here reads it). Returns the number
/// of rounds.
fn attack_call_fd(fd: RawFd, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let full = 0xffff_ffff_ffff_fffe_u64;
        let mut rounds = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own, without waiting.
            let room = unsafe { libc::poll(&mut p, 1, 0) } == 1 && p.revents & libc::POLLOUT != 0;
            if room {
                set_nonblocking(fd, true);
                // SAFETY: an 8-byte write from `full`.
                unsafe { libc::write(fd, (&full as *const u64).cast(), 8) };
            }
            set_nonblocking(fd, false);
            rounds += 1;
        }
        set_nonblocking(fd, true);
        rounds
    })
}

/// Make a read of 4 KiB at `sector` available on queue `q` and kick; returns its head and
/// status address.
fn submit_read(s: &mut Session, q: usize, sector: u64) -> (u16, u64) {
    let hdr = s.put(&blk::header(blk::T_IN, sector));
    let buf = s.alloc(4096, 4096);
    let st = s.status();
    let head = s.chain(q, &[Desc::r(hdr, 16), Desc::w(buf, 4096), Desc::w(st, 1)]);
    s.kick(q);
    (head, st)
}

/// Wait (at most `timeout`) until queue `q`'s used index reaches `idx`, looking at the ring
/// itself: the call eventfd is the attacker's, and reading it would release a blocked write.
fn wait_used_idx(s: &Session, q: usize, idx: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if s.queues[q].used_idx(&s.mem) == idx {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
}

/// Send SIGTERM and wait (at most `timeout`) for the exit; returns the exit code.
fn terminate_within(d: &mut Daemon, timeout: Duration) -> Option<Option<i32>> {
    // SAFETY: a signal to the daemon this test started.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = d.exit_status() {
            return Some(st.code());
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Not a synchronisation by time: the loop ends on the observed exit.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Item 1: the VMM fills its call eventfd and clears O_NONBLOCK in a loop while the guest
/// reads. Every read is still answered, GET_VRING_BASE is answered, the next connection is
/// served, and SIGTERM ends the daemon, all while the attack goes on.
#[test]
fn a_vmm_that_fills_its_call_eventfd_cannot_wedge_a_queue() {
    let mut rig = Rig::start(RigOpts::default());
    let mut s = rig.session(&SessionCfg::default());
    let call = s.queues[0].call.as_raw_fd();
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = attack_call_fd(call, stop.clone());
    let mut answered = 0;
    for i in 0..16u64 {
        let (_, st) = submit_read(&mut s, 0, i * 8);
        let want = s.queues[0].avail_idx;
        if !wait_used_idx(&s, 0, want, WAIT) {
            break;
        }
        assert_eq!(s.mem.read_u8(st), blk::S_OK, "read {i}");
        answered += 1;
    }
    let r = s.fe.get_vring_base(0);
    stop.store(true, Ordering::Relaxed);
    let rounds = attacker.join().expect("attacker");
    let pid = rig.daemon.pid();
    assert_eq!(
        answered,
        16,
        "reads went unanswered under the call-fd attack ({rounds} attack rounds); daemon \
         threads:\n{}{}",
        thread_dump(pid),
        rig.stderr_tail()
    );
    assert!(
        r.is_ok(),
        "GET_VRING_BASE under the call-fd attack: {r:?}; daemon threads:\n{}{}",
        thread_dump(pid),
        rig.stderr_tail()
    );
    assert!(
        rig.daemon.stderr().contains("cannot signal the guest"),
        "the dropped notifications were not logged"
    );
    drop(s);
    // The next connection is served (and the first one's guest RAM compared: nothing outside
    // its buffers and used ring was written).
    rig.health_check();
    rig.check_kept_memory();
    assert!(rig.findings().is_empty(), "{:?}", rig.findings());

    // SIGTERM while a queue is under attack, with reads going on.
    let mut s = rig.session(&SessionCfg::default());
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = attack_call_fd(s.queues[0].call.as_raw_fd(), stop.clone());
    for i in 0..4u64 {
        submit_read(&mut s, 0, i * 8);
    }
    let exit = terminate_within(&mut rig.daemon, WAIT);
    stop.store(true, Ordering::Relaxed);
    attacker.join().expect("attacker");
    s.mem.waive_comparison();
    assert_eq!(
        exit,
        Some(Some(0)),
        "SIGTERM under the call-fd attack: no clean exit within {WAIT:?}; daemon threads:\n{}",
        thread_dump(pid)
    );
    std::mem::forget(s);
}

/// A ringfence daemon on a fresh 64 MiB image with `extra` arguments.
fn daemon(dir: &Path, extra: &[&str]) -> Daemon {
    let img = dir.join("disk.img");
    image::create(&img, 64 * MIB);
    let mut args = vec!["--blk-file", img.to_str().unwrap(), "--queue-size", "256"];
    args.extend_from_slice(extra);
    Daemon::ringfence(&dir.join("vhost.sock"), &args)
}

fn negotiated(sock: &Path) -> Frontend {
    let mut fe = Frontend::connect(sock).expect("connect");
    fe.timeout = WAIT;
    Session::negotiate(&mut fe, &SessionCfg::default()).expect("negotiate");
    fe
}

/// Blocks the memfd of region `i` occupies (0: no page was ever populated).
fn blocks(mem: &GuestMemory, i: usize) -> i64 {
    // SAFETY: an all-zero stat is valid; fstat fills it from an fd we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd we own, into `st`.
    assert_eq!(unsafe { libc::fstat(mem.fd(i), &mut st) }, 0);
    st.st_blocks
}

/// RssShmem of a process, in KiB.
fn rss_shmem_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("RssShmem:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Item 2: guest RAM above `--max-guest-ram` is refused before anything is mapped: as a
/// whole table, and as a region that would grow a table past it. No page of the refused
/// memory is populated; the connection goes on.
#[test]
fn guest_ram_above_the_cap_is_refused_and_never_populated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(dir.path(), &["--max-guest-ram", "16M"]);
    let fe = negotiated(&d.socket);
    let shmem_before = rss_shmem_kib(d.pid());

    let big = GuestMemory::named("too-big", &[(0, 64 * MIB)]);
    let (table, fds) = big.table();
    let r = fe.set_mem_table(&table, &fds);
    assert!(
        matches!(r, Err(FeError::Nack(_))),
        "a 64 MiB table under --max-guest-ram 16M: {r:?}\n{}",
        d.stderr()
    );
    assert!(
        d.wait_for_log("more than --max-guest-ram", WAIT),
        "no log line for the refusal:\n{}",
        d.stderr()
    );
    assert_eq!(
        blocks(&big, 0),
        0,
        "the refused table's memory was populated"
    );

    // A table within the cap is served; a region that would take it past the cap is not.
    let small = GuestMemory::named("small", &[(0, 8 * MIB)]);
    let (table, fds) = small.table();
    fe.set_mem_table(&table, &fds)
        .expect("an 8 MiB table is within the cap");
    let extra = GuestMemory::named("extra", &[(0x100_0000, 12 * MIB)]);
    let (table, fds) = extra.table();
    let r = fe.add_mem_reg(&table[0], fds[0]);
    assert!(
        matches!(r, Err(FeError::Nack(_))),
        "8 + 12 MiB under --max-guest-ram 16M: {r:?}"
    );
    assert_eq!(blocks(&extra, 0), 0, "the refused region was populated");
    // The daemon's shared memory grew by the accepted 8 MiB at most.
    let grown = rss_shmem_kib(d.pid()).saturating_sub(shmem_before);
    assert!(
        grown <= 8 * 1024 + 1024,
        "the daemon's RssShmem grew by {grown} KiB"
    );
    fe.ping()
        .expect("the connection goes on after the refusals");
    for m in [&big, &small, &extra] {
        m.waive_comparison();
    }
}

/// Item 3: ADD_MEM_REG past the slots offered (GET_MAX_MEM_SLOTS) is refused.
#[test]
fn add_mem_reg_past_the_slots_offered_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = daemon(dir.path(), &[]);
    let fe = negotiated(&d.socket);
    let slots = fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
    assert_eq!(slots, 509);
    let layout: Vec<(u64, u64)> = (0..=slots).map(|i| (i * 0x10_0000, 0x1_0000)).collect();
    let mem = GuestMemory::named("slot", &layout);
    let (table, fds) = mem.table();
    for i in 0..slots as usize {
        fe.add_mem_reg(&table[i], fds[i])
            .unwrap_or_else(|e| panic!("region {i} of {slots}: {e}\n{}", d.stderr()));
    }
    let r = fe.add_mem_reg(&table[slots as usize], fds[slots as usize]);
    assert!(
        matches!(r, Err(FeError::Nack(_))),
        "region {} past the {slots} slots offered: {r:?}",
        slots + 1
    );
    fe.ping().expect("the connection goes on");
    mem.waive_comparison();
}

/// Item 3: a memory table that fails its check (a region past the end of its file) is refused
/// before it is published: the table in use stays, and the queue goes on serving from it.
#[test]
fn a_refused_memory_region_leaves_the_table_in_use() {
    let mut rig = Rig::start(RigOpts::default());
    let mut s = rig.session(&SessionCfg::default());
    s.read(0, PROBE_OFFSET, 4096).expect("a read before");
    // A 64 KiB memfd announced as a 2 MiB region.
    let short = GuestMemory::named("short", &[(0x4000_0000, 0x1_0000)]);
    let (mut table, fds) = short.table();
    table[0].size = 0x20_0000;
    let r = s.fe.add_mem_reg(&table[0], fds[0]);
    assert!(
        matches!(r, Err(FeError::Nack(_))),
        "a region past the end of its file: {r:?}"
    );
    let data = s
        .read_within(0, PROBE_OFFSET, 4096, WAIT)
        .unwrap_or_else(|e| panic!("a read after the refusal: {e}\n{}", rig.stderr_tail()));
    assert_eq!(data, image::pattern(PROBE_OFFSET, 4096));
    short.waive_comparison();
    rig.keep_session("the session", s, &[]);
    rig.finish();
}

/// Hugetlbfs guest RAM (QEMU's `memory-backend-memfd,hugetlb=on`) is served.
/// Needs free 2 MiB huge pages (the test reserves them in `/proc/sys/vm/nr_hugepages`).
#[test]
fn hugetlb_guest_ram_is_served() {
    hugetlb(false);
}

/// The VMM shrinks a hugetlb memfd it shared: the daemon absorbs the fault (as for ordinary
/// memfds) rather than die. Its SIGBUS handler replaces the whole huge page (src/sandbox/sigbus.rs: a
/// 4 KiB page cannot be mapped inside a huge-page mapping). Needs free 2 MiB huge pages, as
/// above.
#[test]
fn hugetlb_guest_ram_shrink_is_absorbed() {
    hugetlb(true);
}

/// Write a split-ring descriptor at `p`.
///
/// # Safety
/// `p` must point at 16 writable bytes.
unsafe fn put_desc(p: *mut u8, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: the caller's promise.
    unsafe {
        std::ptr::copy_nonoverlapping(addr.to_le_bytes().as_ptr(), p, 8);
        std::ptr::copy_nonoverlapping(len.to_le_bytes().as_ptr(), p.add(8), 4);
        std::ptr::copy_nonoverlapping(flags.to_le_bytes().as_ptr(), p.add(12), 2);
        std::ptr::copy_nonoverlapping(next.to_le_bytes().as_ptr(), p.add(14), 2);
    }
}

/// The hugetlb tests change a system-wide setting: one at a time.
static HUGE_PAGES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn hugetlb(shrink: bool) {
    const HUGE: u64 = 2 * MIB;
    let _one_at_a_time = HUGE_PAGES.lock().unwrap_or_else(|p| p.into_inner());
    let nr = "/proc/sys/vm/nr_hugepages";
    let before = std::fs::read_to_string(nr).expect("nr_hugepages");
    let before: u64 = before.trim().parse().expect("a number");
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.to_string());
        }
    }
    let _restore = Restore(before);
    std::fs::write(nr, (before + 8).to_string()).expect("reserve huge pages (root?)");

    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"huge-ram".as_ptr(), libc::MFD_HUGETLB) };
    assert!(
        fd >= 0,
        "memfd_create(MFD_HUGETLB): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: we own the new fd.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let len = 4 * HUGE;
    file.set_len(len).expect("size the hugetlb memfd");
    // SAFETY: a shared mapping of the whole memfd, unmapped when the test ends.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "map the hugetlb memfd");
    let gpa0 = 0x100_0000u64;
    let uaddr = |gpa: u64| base as u64 + (gpa - gpa0);
    let ptr = |gpa: u64| (base as u64 + (gpa - gpa0)) as *mut u8;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = daemon(dir.path(), &[]);
    let fe = negotiated(&d.socket);
    let region = MemRegion {
        gpa: gpa0,
        size: len,
        uaddr: base as u64,
        mmap_offset: 0,
    };
    fe.set_mem_table(&[region], &[fd])
        .unwrap_or_else(|e| panic!("a hugetlb memory table: {e}\n{}", d.stderr()));

    // One queue of 16 entries at the start of the region, laid out by hand.
    let (desc, avail, used) = (gpa0, gpa0 + 0x1000, gpa0 + 0x2000);
    let kick = eventfd();
    let callfd = eventfd();
    fe.set_vring_num(0, 16).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, uaddr(desc), uaddr(used), uaddr(avail))
        .unwrap();
    fe.set_vring_fd(code::SET_VRING_CALL, 0, Some(callfd.as_raw_fd()))
        .unwrap();
    fe.set_vring_fd(code::SET_VRING_KICK, 0, Some(kick.as_raw_fd()))
        .unwrap();
    fe.set_vring_enable(0, true).unwrap();

    // Request `n` (0-based): a 4 KiB read at sector 0 into `buf`, status at `status`.
    let request = |n: u16, buf: u64, status: u64| {
        let hdr = gpa0 + 0x3000 + 16 * u64::from(n);
        // SAFETY: rings, header and descriptors lie in the first huge page, which stays.
        unsafe {
            std::ptr::copy_nonoverlapping(blk::header(blk::T_IN, 0).as_ptr(), ptr(hdr), 16);
            let d0 = 3 * n;
            put_desc(ptr(desc + 16 * u64::from(d0)), hdr, 16, 1, d0 + 1);
            put_desc(ptr(desc + 16 * u64::from(d0 + 1)), buf, 4096, 1 | 2, d0 + 2);
            put_desc(ptr(desc + 16 * u64::from(d0 + 2)), status, 1, 2, 0);
            std::ptr::write_volatile(ptr(avail + 4 + 2 * u64::from(n)) as *mut u16, d0);
            std::sync::atomic::fence(Ordering::SeqCst);
            std::ptr::write_volatile(ptr(avail + 2) as *mut u16, n + 1);
        }
        eventfd_signal(kick.as_raw_fd());
    };
    let wait_used = |d: &mut Daemon, n: u16| {
        let deadline = Instant::now() + WAIT;
        // SAFETY: the used index lies in the first huge page.
        while unsafe { std::ptr::read_volatile(ptr(used + 2) as *const u16) } != n {
            assert!(
                d.is_alive(),
                "the daemon died (hugetlb guest RAM):\n{}",
                d.stderr()
            );
            assert!(Instant::now() < deadline, "no answer\n{}", d.stderr());
            std::thread::yield_now();
        }
    };

    // A read into the third huge page, its status in the first.
    let (buf, status) = (gpa0 + 2 * HUGE + 0x1000, gpa0 + 0x4000);
    // SAFETY: the status byte lies in the mapping.
    unsafe { *ptr(status) = 0xff };
    request(0, buf, status);
    wait_used(&mut d, 1);
    // SAFETY: status and buffer lie in the mapping.
    let (st, data) = unsafe {
        (
            *ptr(status),
            std::slice::from_raw_parts(ptr(buf), 4096).to_vec(),
        )
    };
    assert_eq!(st, blk::S_OK);
    assert_eq!(data, image::pattern(0, 4096));

    if shrink {
        // The VMM shrinks the memfd: the last huge page vanishes. A request whose status byte
        // lies there makes the daemon touch it.
        file.set_len(3 * HUGE).expect("shrink the hugetlb memfd");
        let gone = gpa0 + 3 * HUGE;
        request(1, gone + 0x1000, gone);
        wait_used(&mut d, 2);
        assert!(d.is_alive(), "the daemon died:\n{}", d.stderr());
        assert!(
            d.wait_for_log("guest RAM vanished", WAIT),
            "the absorbed fault was not logged"
        );
    }
    fe.ping().expect("the connection goes on");
    drop(fe);
    drop(d);
    // SAFETY: unmapping what this test mapped.
    unsafe { libc::munmap(base, len as usize) };
}

/// The image on a filesystem the test freezes: a write to it is held inside the kernel.
struct Held {
    fs: LoopFs,
    daemon: Daemon,
    _sock_dir: tempfile::TempDir,
}

impl Held {
    fn new() -> Held {
        let fs = LoopFs::new(128 * MIB);
        let img = fs.path().join("disk.img");
        image::create(&img, 64 * MIB);
        let sock_dir = tempfile::tempdir().expect("tempdir");
        let stats = sock_dir.path().join("stats.sock");
        let daemon = Daemon::ringfence(
            &sock_dir.path().join("vhost.sock"),
            &[
                "--blk-file",
                img.to_str().unwrap(),
                "--queue-size",
                "256",
                "--stats-socket",
                stats.to_str().unwrap(),
            ],
        );
        Held {
            fs,
            daemon,
            _sock_dir: sock_dir,
        }
    }

    /// The reply to a message just sent on `s`: it must not come while the write is held
    /// (for 3 s; `held` says what came instead), and must come once the filesystem thaws
    /// (`after` names it).
    fn reply_after_thaw(&self, s: &Session, held: &str, after: &str) -> Msg {
        let r = s.fe.recv(Duration::from_secs(3));
        assert!(
            matches!(r, Err(FeError::Timeout)),
            "{held}: {:?}",
            r.map(|m| (m.code, m.payload))
        );
        self.fs.thaw();
        s.fe.recv(WAIT).unwrap_or_else(|e| panic!("{after}: {e}"))
    }

    /// The daemon's statistics (Prometheus text).
    fn metrics(&self) -> String {
        use std::io::Read;
        let mut c =
            std::os::unix::net::UnixStream::connect(self._sock_dir.path().join("stats.sock"))
                .expect("connect to the stats socket");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read the statistics");
        out
    }

    fn session(&self) -> Session {
        let mut fe = Frontend::connect(&self.daemon.socket).expect("connect");
        fe.timeout = WAIT;
        let cfg = SessionCfg {
            protocol: WANTED_PROTOCOL,
            ..SessionCfg::default()
        };
        Session::establish(fe, &cfg).expect("session")
    }
}

/// Put a 4 KiB write at `sector` in flight on queue 0, held by the frozen filesystem: submit
/// it, then a read behind it, and wait for the read (reads pass a frozen filesystem). The
/// worker takes requests in order, so once the read is back the write is in the kernel.
/// Returns the write's head and status address.
fn write_in_flight(s: &mut Session, sector: u64) -> (u16, u64) {
    let hdr = s.put(&blk::header(blk::T_OUT, sector));
    let data = s.put(&[0x5a; 4096]);
    let st = s.status();
    let head = s.chain(0, &[Desc::r(hdr, 16), Desc::r(data, 4096), Desc::w(st, 1)]);
    let used = s.queues[0].used_idx(&s.mem);
    let (read_head, _) = submit_read(s, 0, 0);
    let deadline = Instant::now() + WAIT;
    let u = s.queues[0]
        .wait_used(&s.mem, deadline, None)
        .expect("the read behind the held write is answered");
    assert_eq!(u.id, u32::from(read_head), "the held write completed");
    assert_eq!(s.queues[0].used_idx(&s.mem), used.wrapping_add(1));
    (head, st)
}

/// Item 4: GET_VRING_BASE with a write held by a frozen filesystem is not answered while the
/// write is held (longer than the 30 s after which it used to be answered anyway), warns
/// meanwhile, and is answered once the write lands, with its used entry published first.
#[test]
fn get_vring_base_waits_for_a_held_write() {
    let h = Held::new();
    let mut s = h.session();
    let _thaw = h.fs.thaw_guard();
    h.fs.freeze();
    let (head, st) = write_in_flight(&mut s, 2048);
    let from = h.daemon.log_len();
    s.fe.send_get_vring_base(0).expect("send GET_VRING_BASE");
    let held = Duration::from_secs(35);
    let r = s.fe.recv_vring_base(held);
    assert!(
        matches!(r, Err(FeError::Timeout)),
        "GET_VRING_BASE answered while a write was held: {r:?}\n{}",
        h.daemon.stderr()
    );
    assert!(
        h.daemon
            .wait_for_log_after(from, WAIT, |l| l.contains("request(s) still in flight"))
            .is_some(),
        "no warning while the stop waited:\n{}",
        h.daemon.stderr()
    );
    assert_eq!(s.queues[0].used_idx(&s.mem), 1, "the held write completed?");
    let m = h.metrics();
    assert!(
        m.contains("ringfence_queue_slow_stops_total{queue=\"0\"} 1"),
        "the slow stop is not counted:\n{m}"
    );
    h.fs.thaw();
    let base = s
        .fe
        .recv_vring_base(WAIT)
        .unwrap_or_else(|e| panic!("GET_VRING_BASE after the thaw: {e}\n{}", h.daemon.stderr()));
    assert_eq!(base, 2, "next avail index");
    assert_eq!(
        s.queues[0].used_idx(&s.mem),
        2,
        "the write's used entry was not published before the answer"
    );
    let u = s.queues[0].pop_used(&s.mem).expect("used entry");
    assert_eq!(u.id, u32::from(head));
    assert_eq!(s.mem.read_u8(st), blk::S_OK);
    s.mem.waive_comparison();
    drop(s);
}

/// Item 3 (and issue 23): the memory tables alive at once are bounded (the SIGBUS handler
/// tracks the mappings of every one), and no ring is ever made for a new table: the queue's
/// existing ring swaps its fixed buffers only once nothing of the queue is in flight. With a
/// write held on the first table, a second table is answered only once the write landed; the
/// queue then serves from it.
#[test]
fn a_new_memory_table_waits_for_the_queues_io() {
    let h = Held::new();
    let mut s = h.session();
    let _thaw = h.fs.thaw_guard();
    h.fs.freeze();
    let (head, st) = write_in_flight(&mut s, 6144);
    let more = GuestMemory::named("more", &[(0x4000_0000, MIB)]);
    let (table, fds) = more.table();
    s.fe.send(
        code::ADD_MEM_REG,
        FLAG_NEED_REPLY,
        &single_region_payload(&table[0]),
        &[fds[0]],
    )
    .expect("send ADD_MEM_REG");
    let m = h.reply_after_thaw(
        &s,
        "a new table was served while the queue's ring had a write in flight",
        "the new table, once the write landed",
    );
    assert_eq!((m.code, m.u64().ok()), (code::ADD_MEM_REG, Some(0)));
    let u = s.queues[0]
        .wait_used(&s.mem, Instant::now() + WAIT, None)
        .expect("the held write's used entry");
    assert_eq!(u.id, u32::from(head));
    assert_eq!(s.mem.read_u8(st), blk::S_OK);
    // And the queue serves from the new table.
    let data = s.read_within(0, 0, 4096, WAIT).expect("a read afterwards");
    assert_eq!(data, image::pattern(0, 4096));
    more.waive_comparison();
    s.mem.waive_comparison();
}

/// Item 8: RESET_DEVICE stops the queues and waits for their I/O as GET_VRING_BASE does.
/// (SET_PROTOCOL_FEATURES with RESET_DEVICE, never offered, is refused; the vhost crate then
/// lets RESET_DEVICE through all the same, so the reset itself must be safe.)
#[test]
fn reset_device_waits_for_a_held_write() {
    let h = Held::new();
    let mut s = h.session();
    let r = s.fe.set_acked(
        code::SET_PROTOCOL_FEATURES,
        &(s.protocol | pfeat::RESET_DEVICE).to_ne_bytes(),
        &[],
    );
    assert!(
        matches!(r, Err(FeError::Nack(_))),
        "SET_PROTOCOL_FEATURES with RESET_DEVICE (never offered): {r:?}"
    );
    let _thaw = h.fs.thaw_guard();
    h.fs.freeze();
    let (head, st) = write_in_flight(&mut s, 4096);
    s.fe.send(code::RESET_DEVICE, FLAG_NEED_REPLY, &[], &[])
        .expect("send RESET_DEVICE");
    let m = h.reply_after_thaw(
        &s,
        "RESET_DEVICE answered while a write was held",
        "RESET_DEVICE answered after the thaw",
    );
    assert_eq!(m.code, code::RESET_DEVICE);
    assert_eq!(s.queues[0].used_idx(&s.mem), 2, "the write's used entry");
    assert_eq!(
        s.queues[0].pop_used(&s.mem).map(|u| u.id),
        Some(u32::from(head))
    );
    assert_eq!(s.mem.read_u8(st), blk::S_OK);
    // The queue is stopped: a request made available now is not served.
    let used_before = s.queues[0].used_idx(&s.mem);
    submit_read(&mut s, 0, 0);
    s.fe.ping().expect("the connection goes on");
    assert_eq!(s.queues[0].used_idx(&s.mem), used_before);
    s.mem.waive_comparison();
    std::mem::forget(s);
}

/// Item 8: a refusal answered by value (CHECK_DEVICE_STATE) must not make a following
/// undecodable message look like a refusal: the connection ends.
#[test]
fn an_undecodable_message_after_check_device_state_ends_the_connection() {
    let rig = Rig::start(RigOpts::default());
    let fe = negotiated(&rig.socket);
    let m = fe
        .call(code::CHECK_DEVICE_STATE, &[], &[])
        .expect("CHECK_DEVICE_STATE answered");
    assert_ne!(
        m.u64().expect("a u64"),
        0,
        "device state transfer is not supported"
    );
    // SET_FEATURES with a 4-byte payload: cannot be decoded.
    fe.send(code::SET_FEATURES, FLAG_NEED_REPLY, &[0u8; 4], &[])
        .expect("send");
    assert!(
        fe.wait_closed(Duration::from_secs(3)),
        "the connection went on after an undecodable message"
    );
    rig.finish();
}

/// Item 8: protocol features never offered are refused.
#[test]
fn unoffered_protocol_features_are_refused() {
    let rig = Rig::start(RigOpts::default());
    let mut fe = Frontend::connect(&rig.socket).expect("connect");
    fe.timeout = WAIT;
    // As QEMU does first (the vhost crate acks only once it saw PROTOCOL_FEATURES offered).
    fe.get_features().expect("GET_FEATURES");
    let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert_eq!(offered & pfeat::RESET_DEVICE, 0);
    let r = fe.set_acked(
        code::SET_PROTOCOL_FEATURES,
        &(offered | pfeat::RESET_DEVICE | pfeat::STATUS).to_ne_bytes(),
        &[],
    );
    assert!(matches!(r, Err(FeError::Nack(_))), "{r:?}");
    fe.set_acked(code::SET_PROTOCOL_FEATURES, &offered.to_ne_bytes(), &[])
        .expect("the offered ones are accepted");
    drop(fe);
    rig.finish();
}

/// Item 9: a queue whose ring addresses were refused is never served, nor are its rings
/// written: neither when the addresses are refused before the kick fd arrives, nor after.
/// Guest RAM starts at 0, so the default ring addresses (0) are guest RAM.
#[test]
fn a_queue_with_refused_rings_touches_no_guest_ram() {
    for kick_first in [false, true] {
        let mut rig = Rig::start(RigOpts::default());
        let mut fe = rig.connect();
        fe.timeout = WAIT;
        Session::negotiate(&mut fe, &SessionCfg::default()).expect("negotiate");
        let mem = GuestMemory::new(&[(0, 0x40_0000)]);
        mem.fill(0, 0x1_0000, 0xa5);
        let (table, fds) = mem.table();
        fe.set_mem_table(&table, &fds).expect("memory table");
        let q = SplitQueue::new(&mem, 0, 256, 0x2_0000);
        fe.set_vring_num(0, 256).unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let refuse = |fe: &Frontend| {
            // Addresses outside guest RAM.
            let r = fe.set_vring_addr(0, 0xdead_0000_0000, 0xdead_0001_0000, 0xdead_0002_0000);
            assert!(
                matches!(r, Err(FeError::Nack(_))),
                "bad ring addresses: {r:?}"
            );
        };
        if !kick_first {
            refuse(&fe);
        }
        fe.set_vring_fd(code::SET_VRING_CALL, 0, Some(q.call.as_raw_fd()))
            .unwrap();
        fe.set_vring_fd(code::SET_VRING_KICK, 0, Some(q.kick.as_raw_fd()))
            .unwrap();
        if kick_first {
            refuse(&fe);
        }
        fe.set_vring_enable(0, true).unwrap();
        // A request made available where the rings would be by default (0): a device that
        // serves the queue writes its used ring there.
        mem.write_u16(2, 1);
        q.kick();
        fe.ping().expect("the connection goes on");
        let what = if kick_first {
            "kick fd, then refused ring addresses"
        } else {
            "refused ring addresses, then kick fd"
        };
        drop(fe);
        // Compared after the health check (the connection is over, its I/O quiesced):
        // nothing may have been written anywhere.
        rig.keep_memory(what, mem, &[]);
        drop(q);
        rig.finish();
    }
}
