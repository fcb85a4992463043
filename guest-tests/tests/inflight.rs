//! Inflight I/O tracking (vhost-user protocol feature `INFLIGHT_SHMFD`, requests
//! `GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`, issue 13), driven by the project's own vhost-user
//! frontend doing exactly what QEMU does when a vhost-user-blk backend dies:
//!
//! * at the first start, QEMU asks the backend for an inflight region (GET_INFLIGHT_FD), keeps
//!   the memfd and hands it back with SET_INFLIGHT_FD on this and every later connection;
//! * when the backend dies, QEMU's GET_VRING_BASE fails and it rewinds the queue's
//!   `last_avail_idx` to the used index; after the reconnect it sends that too-small value with
//!   SET_VRING_BASE. A backend that honours it redoes requests that had completed and loses
//!   those that had not; one that tracks requests in the region resubmits exactly the heads
//!   still marked in flight and carries on after them.
//!
//! The region's layout is the one of vhost-user.rst and libvhost-user: queue `i` at
//! `i * align_up(16 + 16 * queue_size, 64)`, a 16-byte header {u64 features, u16 version,
//! u16 desc_num, u16 last_batch_head, u16 used_idx}, then one 16-byte `DescStateSplit`
//! {u8 inflight, u8 pad[5], u16 next, u64 counter} per entry.
//!
//! A request is kept in flight the way `tests/drain.rs` does it: the image lives on an ext4
//! filesystem on a loop device that the test freezes (FIFREEZE), so a write waits inside the
//! kernel until the test thaws it, while reads pass. The daemon is killed with SIGKILL while the
//! write is held. The crashed daemon's write still lands when the filesystem thaws (the kernel
//! had it), so before the new daemon starts the test puts the range back as it was: the state
//! of a crash in which the write never reached the disk, so that only a resubmission can put
//! the data there.
//!
//! The tests wait on eventfds and ring indices, with generous bounds as failure detectors, never
//! on the clock.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk;
use ringfence_guest_tests::daemon::{Daemon, LoopFs};
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::memory::GuestMemory;
use ringfence_guest_tests::rig;
use ringfence_guest_tests::virtq::{Desc, SplitQueue, Used};

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 8 * MIB;
/// Bound on anything that should happen promptly (a reply, an I/O, an exit): a hang detector.
const WAIT: Duration = Duration::from_secs(10);
/// Guest RAM: rings from its start (64 KiB per queue), buffers from 1 MiB in.
const RAM: (u64, u64) = (0x10_0000, 0x40_0000);
const RING_STRIDE: u64 = 0x1_0000;
const HEAP: u64 = RAM.0 + 0x10_0000;
/// The largest queue ringfence is started with (`--queue-size`).
const MAX_QUEUE_SIZE: u16 = 256;

/// Virtio features the frontend acks (those the backend offers among them).
const FEATURES: u64 = vfeat::VERSION_1
    | vfeat::PROTOCOL_FEATURES
    | vfeat::RING_INDIRECT_DESC
    | vfeat::BLK_SIZE_MAX
    | vfeat::BLK_SEG_MAX
    | vfeat::BLK_BLK_SIZE
    | vfeat::BLK_FLUSH
    | vfeat::BLK_MQ;

/// Where the held write goes, and its size.
const W_OFF: u64 = MIB;
const W_LEN: usize = 64 << 10;
/// What the completed read reads.
const R_OFF: u64 = 4 * MIB;
const R_LEN: usize = 4096;
/// The request made after the reconnect.
const X_OFF: u64 = 2 * MIB;
const X_LEN: usize = 4096;
/// What the test puts in the buffers and status bytes of a request that has completed, so that
/// a second execution of it shows.
const STALE: u8 = 0xee;
const UNWRITTEN: u8 = 0xff;

// ------------------------------------------------------------------------------------------
// A freezable filesystem: `LoopFs` (guest-tests/src/daemon.rs)
// ------------------------------------------------------------------------------------------

/// The image on the freezable filesystem, its socket elsewhere (a frozen filesystem would hold
/// the socket's creation too), and the daemon serving it.
struct Bench {
    num_queues: u16,
    image: PathBuf,
    socket: PathBuf,
    /// Declared before `fs`: Drop thaws first, then the daemon goes (its exit waits for the
    /// writes it has in flight), then the filesystem.
    daemon: Option<Daemon>,
    fs: LoopFs,
    _dir: tempfile::TempDir,
}

impl Drop for Bench {
    fn drop(&mut self) {
        if self.fs.is_frozen() {
            self.fs.thaw();
        }
        self.daemon.take();
    }
}

impl Bench {
    fn new(num_queues: u16) -> Bench {
        let fs = LoopFs::new(64 * MIB);
        let dir = tempfile::tempdir().expect("socket dir");
        let image = fs.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create the image");
        let mut b = Bench {
            num_queues,
            image,
            socket: dir.path().join("vhost.sock"),
            daemon: None,
            fs,
            _dir: dir,
        };
        b.start();
        b
    }

    fn start(&mut self) {
        assert!(self.daemon.is_none(), "test bug: a daemon is running");
        let nq = self.num_queues.to_string();
        let qs = MAX_QUEUE_SIZE.to_string();
        let image = self.image.to_str().expect("utf-8 path");
        self.daemon = Some(Daemon::ringfence(
            &self.socket,
            &[
                "--blk-file",
                image,
                "--num-queues",
                &nq,
                "--queue-size",
                &qs,
            ],
        ));
    }

    fn stderr_tail(&self) -> String {
        let Some(d) = &self.daemon else {
            return "(no daemon)".into();
        };
        let s = d.stderr();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// What QEMU lives through when its backend crashes: SIGKILL with a write held by the
    /// frozen filesystem, the connection gone; then the test thaws (the process cannot finish
    /// exiting before its write is done) and waits for the exit.
    fn crash(&mut self, fe: Frontend) {
        let d = self.daemon.take().expect("a daemon is running");
        let pid = d.pid();
        // SAFETY: kill only sends a signal to the daemon this test started.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "SIGKILL: {}", std::io::Error::last_os_error());
        drop(fe);
        self.fs.thaw();
        assert!(
            wait_exit(pid, WAIT),
            "the killed daemon did not exit within {WAIT:?} of the thaw"
        );
        // Dropping it reaps it. The dead process's rings are torn down by the kernel after it
        // exits, and they hold the image (and so its lock) until then: wait for that here
        // rather than rely on the new daemon's --lock-wait.
        drop(d);
        let deadline = Instant::now() + WAIT;
        while image_locked(&self.image) {
            assert!(
                Instant::now() < deadline,
                "the image is still locked {WAIT:?} after the killed daemon exited"
            );
            // Not a synchronisation by time: the loop ends on the observed state; this only
            // spaces out the looks.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Put `len` zero bytes at `off` of the image (the state before the held write).
    fn zero_range(&self, off: u64, len: usize) {
        let f = OpenOptions::new()
            .write(true)
            .open(&self.image)
            .expect("open image");
        f.write_all_at(&vec![0u8; len], off).expect("write image");
        f.sync_all().expect("sync image");
    }

    fn read_image(&self, off: u64, len: usize) -> Vec<u8> {
        rig::read_image(&self.image, off, len)
    }
}

/// Whether some process holds a lock on the image (a daemon's OFD lock).
fn image_locked(image: &std::path::Path) -> bool {
    let f = std::fs::File::open(image).expect("open image");
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we own.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(rc, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Wait (bounded) until process `pid` has exited, on a pidfd.
fn wait_exit(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    poll_fd(fd.as_raw_fd(), libc::POLLIN, Instant::now() + timeout) != 0
}

// ------------------------------------------------------------------------------------------
// Guest RAM, requests
// ------------------------------------------------------------------------------------------

struct Guest {
    mem: GuestMemory,
    queues: Vec<SplitQueue>,
    heap: u64,
}

/// A request made available: its head, where its status byte is, its data buffer.
#[derive(Clone, Copy, Debug)]
struct Req {
    head: u16,
    status: u64,
    data: u64,
    len: usize,
}

impl Guest {
    fn new(num_queues: u16, queue_size: u16) -> Guest {
        let mem = GuestMemory::named("inflight-guest-ram", &[RAM]);
        // The test checks every byte of guest RAM it cares about (used rings, status bytes,
        // buffers) itself.
        mem.waive_comparison();
        let queues = (0..num_queues)
            .map(|i| {
                SplitQueue::new(
                    &mem,
                    u32::from(i),
                    queue_size,
                    RAM.0 + RING_STRIDE * u64::from(i),
                )
            })
            .collect();
        Guest {
            mem,
            queues,
            heap: HEAP,
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let a = self.heap.next_multiple_of(align);
        assert!(a + len <= RAM.0 + RAM.1, "test bug: guest heap exhausted");
        self.heap = a + len;
        a
    }

    fn put(&mut self, data: &[u8]) -> u64 {
        let a = self.alloc(data.len() as u64, 16);
        self.mem.write(a, data);
        a
    }

    /// Lay out a request on queue `q` (as a chain, or as an indirect table), make it available
    /// and kick.
    fn submit(
        &mut self,
        q: usize,
        t: u32,
        off: u64,
        out: &[u8],
        in_len: usize,
        indirect: bool,
    ) -> Req {
        let hdr = self.put(&blk::header(t, off / blk::SECTOR));
        let mut segs = vec![Desc::r(hdr, 16)];
        let (data, len) = if !out.is_empty() {
            let d = self.put(out);
            segs.push(Desc::r(d, out.len() as u32));
            (d, out.len())
        } else {
            let d = self.alloc(in_len as u64, 512);
            self.mem.fill(d, in_len, 0);
            segs.push(Desc::w(d, in_len as u32));
            (d, in_len)
        };
        let status = self.put(&[UNWRITTEN]);
        segs.push(Desc::w(status, 1));
        let head = if indirect {
            let table = self.alloc(16 * segs.len() as u64, 16);
            self.queues[q].indirect(&self.mem, table, &segs)
        } else {
            self.queues[q].chain(&self.mem, &segs)
        };
        self.queues[q].push(&self.mem, head);
        self.queues[q].publish(&self.mem);
        self.queues[q].kick();
        Req {
            head,
            status,
            data,
            len,
        }
    }

    fn write(&mut self, q: usize, off: u64, data: &[u8], indirect: bool) -> Req {
        self.submit(q, blk::T_OUT, off, data, 0, indirect)
    }

    fn read(&mut self, q: usize, off: u64, len: usize) -> Req {
        self.submit(q, blk::T_IN, off, &[], len, false)
    }

    fn status(&self, r: &Req) -> u8 {
        self.mem.read_u8(r.status)
    }

    /// Mark a completed request's status byte and buffer, so that doing it again shows.
    fn mark_stale(&self, r: &Req) {
        self.mem.write(r.status, &[UNWRITTEN]);
        self.mem.fill(r.data, r.len, STALE);
    }

    /// Whether the status byte and buffer are still as [`Guest::mark_stale`] left them.
    fn untouched_since_stale(&self, r: &Req) -> bool {
        self.status(r) == UNWRITTEN && self.mem.read(r.data, r.len).iter().all(|&b| b == STALE)
    }

    /// The next used element of queue `q`, waiting at most [`WAIT`] (on the call eventfd).
    fn next_used(&mut self, q: usize) -> Option<Used> {
        self.queues[q].wait_used(&self.mem, Instant::now() + WAIT, None)
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used_idx(&self.mem)
    }
}

/// A 64 KiB pattern no earlier run can have left in an image.
fn pattern(tag: u8, len: usize) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = u64::from(nanos) ^ (u64::from(tag) << 40) ^ u64::from(std::process::id());
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// The inflight region, read at the offsets of the specification
// ------------------------------------------------------------------------------------------

/// The memfd QEMU keeps, mapped here as QEMU maps it.
struct Region {
    info: Inflight,
    fd: OwnedFd,
    ptr: *const u8,
    map_len: usize,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in Region::map.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.map_len) };
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DescState {
    inflight: u8,
    next: u16,
    counter: u64,
}

/// One queue's part of the region, as read at one moment.
#[derive(Clone, Debug)]
struct QueueState {
    features: u64,
    version: u16,
    desc_num: u16,
    last_batch_head: u16,
    used_idx: u16,
    descs: Vec<DescState>,
}

impl QueueState {
    /// The heads marked in flight, with their counters.
    fn in_flight(&self) -> Vec<(u16, u64)> {
        self.descs
            .iter()
            .enumerate()
            .filter(|(_, d)| d.inflight != 0)
            .map(|(i, d)| (i as u16, d.counter))
            .collect()
    }
}

impl std::fmt::Display for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{{features {:#x}, version {}, desc_num {}, last_batch_head {}, used_idx {}, in flight (head, counter): {:?}}}",
            self.features,
            self.version,
            self.desc_num,
            self.last_batch_head,
            self.used_idx,
            self.in_flight()
        )
    }
}

impl Region {
    /// GET_INFLIGHT_FD as QEMU sends it at the first start, checked against the layout, and
    /// the memfd mapped.
    fn get(fe: &Frontend, num_queues: u16, queue_size: u16) -> Region {
        let (info, fd) = fe
            .get_inflight_fd(num_queues, queue_size)
            .unwrap_or_else(|e| panic!("GET_INFLIGHT_FD: {e}"));
        let need = u64::from(num_queues) * inflight_queue_region_size(queue_size);
        assert!(
            info.mmap_size >= need,
            "GET_INFLIGHT_FD answered {info:?}: {num_queues} queues of {queue_size} need {need} bytes"
        );
        // SAFETY: fstat fills a stat struct we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on the fd we own.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        let map_len = (info.mmap_offset + info.mmap_size) as usize;
        assert!(
            st.st_size as usize >= map_len,
            "the inflight fd holds {} bytes, the reply says {info:?}",
            st.st_size
        );
        // SAFETY: a fresh shared read-only mapping of `map_len` bytes of a file at least that
        // large (checked above); the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "mmap of the inflight fd: {}",
            std::io::Error::last_os_error()
        );
        let region = Region {
            info: Inflight {
                num_queues,
                queue_size,
                ..info
            },
            fd,
            ptr: ptr as *const u8,
            map_len,
        };
        for q in 0..num_queues {
            let s = region.queue(q);
            assert!(
                region.fresh(q),
                "queue {q} of a fresh inflight region must read as fresh: all zeroes (version \
                 0, nothing in flight, zero counters), but for desc_num, which the backend may \
                 fill in already (0 or {queue_size}); it reads {s}"
            );
        }
        region
    }

    /// Whether queue `q`'s part of the region is as GET_INFLIGHT_FD must hand it out: every
    /// byte zero, except `desc_num`, which libvhost-user fills in at SET_INFLIGHT_FD and a
    /// backend may fill in at once.
    fn fresh(&self, q: u16) -> bool {
        let qs = self.info.queue_size;
        let base = self.info.mmap_offset as usize
            + usize::from(q) * inflight_queue_region_size(qs) as usize;
        let mut b = self.bytes(base, 16 + 16 * usize::from(qs));
        let desc_num = u16::from_ne_bytes([b[10], b[11]]);
        b[10..12].fill(0);
        (desc_num == 0 || desc_num == qs) && b.iter().all(|&x| x == 0)
    }

    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.map_len, "test bug: past the region");
        (0..len)
            // SAFETY: inside the live mapping (checked above); volatile because the backend
            // writes it concurrently.
            .map(|i| unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) })
            .collect()
    }

    /// Queue `q`'s header and descriptor states, at the specification's offsets.
    fn queue(&self, q: u16) -> QueueState {
        let qs = self.info.queue_size;
        let base = self.info.mmap_offset as usize
            + usize::from(q) * inflight_queue_region_size(qs) as usize;
        let b = self.bytes(base, 16 + 16 * usize::from(qs));
        let u16_at = |i: usize| u16::from_ne_bytes(b[i..i + 2].try_into().unwrap());
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
        QueueState {
            features: u64_at(0),
            version: u16_at(8),
            desc_num: u16_at(10),
            last_batch_head: u16_at(12),
            used_idx: u16_at(14),
            descs: (0..usize::from(qs))
                .map(|i| {
                    let o = 16 + 16 * i;
                    DescState {
                        inflight: b[o],
                        next: u16_at(o + 6),
                        counter: u64_at(o + 8),
                    }
                })
                .collect(),
        }
    }

    /// Wait (bounded) until queue `q`'s state satisfies `ok`: the backend updates the region
    /// right after it publishes a used entry, so a frontend that saw the entry may look a
    /// moment early. Returns the last state read, `Err` if it never satisfied `ok`.
    fn wait_for(&self, q: u16, ok: impl Fn(&QueueState) -> bool) -> Result<QueueState, QueueState> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.queue(q);
            if ok(&s) {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(s);
            }
            // Not a synchronisation by time: the loop ends on the observed state; this only
            // spaces out the looks.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

// ------------------------------------------------------------------------------------------
// The frontend's side of a (re)connection
// ------------------------------------------------------------------------------------------

/// Connect and set the device up in QEMU's order: GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, SET_OWNER, (GET_INFLIGHT_FD the first time,) SET_INFLIGHT_FD, SET_FEATURES,
/// SET_MEM_TABLE, then per queue SET_VRING_NUM, BASE (`bases[q]`), ADDR, KICK, CALL, and
/// SET_VRING_ENABLE for each. With `track` false the frontend does not negotiate
/// INFLIGHT_SHMFD (as a QEMU facing a backend without it).
fn connect(
    b: &Bench,
    g: &Guest,
    track: bool,
    region: &mut Option<Region>,
    bases: &[u16],
) -> Frontend {
    let mut fe = Frontend::connect(&b.socket).expect("connect to the backend");
    fe.timeout = WAIT;
    let nq = g.queues.len() as u16;
    let qs = g.queues[0].size;
    let offered = fe.get_features().expect("GET_FEATURES");
    assert!(
        offered & vfeat::PROTOCOL_FEATURES != 0,
        "no VHOST_USER_F_PROTOCOL_FEATURES"
    );
    let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    if track {
        assert!(
            pf & pfeat::INFLIGHT_SHMFD != 0,
            "the backend does not offer the INFLIGHT_SHMFD protocol feature (bit 12; offered \
             protocol features {pf:#x}): QEMU cannot track requests in flight, and a crash of \
             the backend loses or repeats them"
        );
    }
    let mut want = pfeat::MQ | pfeat::REPLY_ACK;
    if track {
        want |= pfeat::INFLIGHT_SHMFD;
    }
    fe.set_protocol_features(pf & want)
        .expect("SET_PROTOCOL_FEATURES");
    assert!(fe.reply_ack, "REPLY_ACK not offered");
    let queues = fe.get_queue_num().expect("GET_QUEUE_NUM");
    assert!(queues >= u64::from(nq), "the backend has {queues} queues");
    fe.set_owner().expect("SET_OWNER");
    if track {
        let r = region.get_or_insert_with(|| Region::get(&fe, nq, qs));
        fe.set_inflight_fd(&r.info, r.fd.as_raw_fd())
            .unwrap_or_else(|e| panic!("SET_INFLIGHT_FD {:?}: {e}", r.info));
    }
    fe.set_features(offered & FEATURES).expect("SET_FEATURES");
    let (table, fds) = g.mem.table();
    fe.set_mem_table(&table, &fds).expect("SET_MEM_TABLE");
    for (q, base) in g.queues.iter().zip(bases) {
        fe.start_vring(
            q.index,
            q.size,
            *base,
            g.mem.uaddr(q.desc),
            g.mem.uaddr(q.used),
            g.mem.uaddr(q.avail),
            q.kick.as_raw_fd(),
            q.call.as_raw_fd(),
        )
        .unwrap_or_else(|e| panic!("starting vring {}: {e}", q.index));
    }
    for q in &g.queues {
        fe.set_vring_enable(q.index, true)
            .unwrap_or_else(|e| panic!("SET_VRING_ENABLE {}: {e}", q.index));
    }
    fe
}

fn expect_used(g: &mut Guest, q: usize, head: u16, what: &str, b: &Bench) -> Used {
    let u = g.next_used(q).unwrap_or_else(|| {
        panic!(
            "{what}: no used entry on queue {q} within {WAIT:?} (used idx {}); backend stderr:\n{}",
            g.used_idx(q),
            b.stderr_tail()
        )
    });
    assert_eq!(
        u.id,
        u32::from(head),
        "{what}: used entry {} of queue {q} is head {}, expected head {head}",
        g.queues[q].last_used,
        u.id
    );
    u
}

// ------------------------------------------------------------------------------------------
// The crash scenario
// ------------------------------------------------------------------------------------------

struct Crash {
    /// Negotiate INFLIGHT_SHMFD (the control test does not).
    track: bool,
    /// The (first) held write is an indirect descriptor (chain in an indirect table).
    indirect: bool,
    /// Writes held in flight (each to its own range), before the read.
    held_writes: usize,
    num_queues: u16,
    queue_size: u16,
    /// The queue that gets the held writes and the read that completes.
    busy: usize,
}

impl Crash {
    /// The scenario of the issue: one write held, one read completed behind it, one queue.
    fn one_write() -> Crash {
        Crash {
            track: true,
            indirect: false,
            held_writes: 1,
            num_queues: 1,
            queue_size: MAX_QUEUE_SIZE,
            busy: 0,
        }
    }
}

/// A write held in flight: the request, where it writes, what.
struct Held {
    req: Req,
    off: u64,
    data: Vec<u8>,
}

/// What the scenario left, for the test to judge.
struct AfterCrash {
    b: Bench,
    g: Guest,
    fe: Frontend,
    region: Option<Region>,
    /// The held writes, in the order they were made available.
    ws: Vec<Held>,
    r: Req,
    /// Reads completed on the other queues before the crash (nothing in flight there).
    idle_reads: Vec<(usize, Req)>,
}

/// Steps 1 to 5: the daemon serves an image on a frozen filesystem; queue `busy` gets writes
/// W, held, then a read R, which completes; every other queue gets a read that completes. The
/// region must say so. SIGKILL, thaw, exit; the image ranges of the writes back to zeroes; a new
/// daemon, and the frontend reconnects as QEMU does after a backend crash, SET_VRING_BASE being
/// the used index (1) on every queue.
fn crash_with_writes_in_flight(c: Crash) -> AfterCrash {
    let mut b = Bench::new(c.num_queues);
    let mut g = Guest::new(c.num_queues, c.queue_size);
    let mut region = None;
    let zeros = vec![0u16; usize::from(c.num_queues)];
    let fe = connect(&b, &g, c.track, &mut region, &zeros);
    if let Some(r) = &region {
        for q in 0..c.num_queues {
            let s = r.queue(q);
            assert!(
                s.in_flight().is_empty(),
                "queue {q}: heads in flight in a region no request went through: {s}"
            );
        }
    }

    // The other queues: one read each, completed, nothing in flight.
    let mut idle_reads = Vec::new();
    for q in (0..usize::from(c.num_queues)).filter(|&q| q != c.busy) {
        let r = g.read(q, R_OFF, R_LEN);
        let u = expect_used(&mut g, q, r.head, "a read on an idle queue", &b);
        assert_eq!(g.status(&r), blk::S_OK, "read status (used {u:?})");
        g.mark_stale(&r);
        idle_reads.push((q, r));
    }

    b.fs.freeze();
    let ws: Vec<Held> = (0..c.held_writes)
        .map(|i| {
            let off = W_OFF + (i * W_LEN) as u64;
            let data = pattern(1 + i as u8, W_LEN);
            let req = g.write(c.busy, off, &data, c.indirect && i == 0);
            Held { req, off, data }
        })
        .collect();
    let r = g.read(c.busy, R_OFF, R_LEN);
    expect_used(
        &mut g,
        c.busy,
        r.head,
        "the read behind the held writes",
        &b,
    );
    assert_eq!(
        blk::status_name(g.status(&r)),
        blk::status_name(blk::S_OK),
        "the read's status"
    );
    assert_eq!(
        g.used_idx(c.busy),
        1,
        "a write completed although the filesystem is frozen: the scenario holds nothing"
    );
    for w in &ws {
        assert_eq!(
            g.status(&w.req),
            UNWRITTEN,
            "a held write has a status already"
        );
    }
    g.mark_stale(&r);
    let heads: Vec<u16> = ws.iter().map(|w| w.req.head).collect();

    // Step 3: the region at the specification's offsets.
    if let Some(reg) = &region {
        let busy = c.busy as u16;
        let want = |s: &QueueState| {
            s.version == 1
                && s.desc_num == c.queue_size
                && heads.iter().all(|&h| s.descs[usize::from(h)].inflight == 1)
                && s.descs[usize::from(r.head)].inflight == 0
                && s.used_idx == 1
        };
        let s = reg.wait_for(busy, want).unwrap_or_else(|s| {
            panic!(
                "queue {busy} of the inflight region, with write head(s) {heads:?} held and read \
                 head {} completed (used idx 1), should read version 1, desc_num {}, inflight 1 \
                 for the writes, desc[{}].inflight 0, used_idx 1; it reads {s}",
                r.head, c.queue_size, r.head
            )
        });
        let marked: Vec<u16> = s.in_flight().iter().map(|&(h, _)| h).collect();
        let mut want_marked = heads.clone();
        want_marked.sort();
        assert_eq!(
            marked, want_marked,
            "queue {busy}: exactly the held writes are in flight: {s}"
        );
        let counters: Vec<u64> = heads
            .iter()
            .map(|&h| s.descs[usize::from(h)].counter)
            .collect();
        assert!(
            counters.windows(2).all(|p| p[0] < p[1]),
            "queue {busy}: the counters of the writes held in flight (heads {heads:?}, made \
             available in that order) must increase: {counters:?}"
        );
        for (q, _) in &idle_reads {
            let q = *q as u16;
            reg.wait_for(q, |s| {
                s.version == 1
                    && s.desc_num == c.queue_size
                    && s.used_idx == 1
                    && s.in_flight().is_empty()
            })
            .unwrap_or_else(|s| {
                panic!(
                    "queue {q} of the inflight region (at byte {}), after one completed read, \
                     should read version 1, desc_num {}, used_idx 1, nothing in flight; it \
                     reads {s}",
                    u64::from(q) * inflight_queue_region_size(c.queue_size),
                    c.queue_size
                )
            });
        }
    }

    // Step 4: the crash. Step 5: a new daemon, and QEMU's reconnect.
    b.crash(fe);
    for w in &ws {
        b.zero_range(w.off, W_LEN);
    }
    b.start();
    let rewound = vec![1u16; usize::from(c.num_queues)];
    let fe = connect(&b, &g, c.track, &mut region, &rewound);
    AfterCrash {
        b,
        g,
        fe,
        region,
        ws,
        r,
        idle_reads,
    }
}

/// Step 6 with tracking: the held writes complete again on their own (no kick: a guest with
/// nothing more to submit would otherwise wait forever), as the next used entries, in any
/// order; R is not redone; a new request X is the used entry after them; the region ends with
/// nothing in flight.
fn expect_resubmission(a: &mut AfterCrash, busy: usize) {
    let AfterCrash {
        b,
        g,
        fe,
        region,
        ws,
        r,
        ..
    } = a;
    let heads: Vec<u16> = ws.iter().map(|w| w.req.head).collect();
    let mut done: Vec<u16> = Vec::new();
    while done.len() < heads.len() {
        let entry = 2 + done.len();
        match g.next_used(busy) {
            Some(u) if heads.contains(&(u.id as u16)) && !done.contains(&(u.id as u16)) => {
                done.push(u.id as u16)
            }
            got => {
                // Say what the backend does instead: kick, as the next guest request would.
                let seen = got.or_else(|| {
                    g.queues[busy].kick();
                    g.next_used(busy)
                });
                let what = match seen {
                    Some(u) if u.id == u32::from(r.head) => format!(
                        "used entry {entry} is head {} (the read R, redone: the backend \
                         honoured the rewound SET_VRING_BASE 1), and the write(s) never came",
                        r.head
                    ),
                    Some(u) if heads.contains(&(u.id as u16)) && got.is_none() => format!(
                        "write head {} was resubmitted only after a kick; the backend must \
                         resubmit on its own when the queue starts",
                        u.id
                    ),
                    Some(u) => format!(
                        "used entry {entry} is head {} (not one of the held writes still due, \
                         nor R)",
                        u.id
                    ),
                    None => "nothing completed, even after a kick".to_string(),
                };
                panic!(
                    "after the crash and reconnect, the held write(s) (heads {heads:?}; done \
                     again so far: {done:?}) were not all completed again: {what}; region: {}; \
                     backend stderr:\n{}",
                    region
                        .as_ref()
                        .map(|r| r.queue(busy as u16).to_string())
                        .unwrap_or_default(),
                    b.stderr_tail()
                );
            }
        }
    }
    for w in ws.iter() {
        assert_eq!(
            blk::status_name(g.status(&w.req)),
            blk::status_name(blk::S_OK),
            "the resubmitted write's status (head {})",
            w.req.head
        );
        assert!(
            b.read_image(w.off, W_LEN) == w.data,
            "the resubmitted write (head {}) completed OK but its data is not in the image",
            w.req.head
        );
    }
    let x_data = pattern(9, X_LEN);
    let x = g.write(busy, X_OFF, &x_data, false);
    expect_used(g, busy, x.head, "a new request after the reconnect", b);
    assert_eq!(g.status(&x), blk::S_OK, "the new request's status");
    let used = 2 + ws.len() as u16;
    assert_eq!(
        g.used_idx(busy),
        used,
        "used entries: R, the held writes (resubmitted), X and nothing else"
    );
    assert!(
        g.untouched_since_stale(r),
        "the completed read R was executed again (its status byte or buffer was written)"
    );
    assert!(b.read_image(X_OFF, X_LEN) == x_data, "X's data");
    if let Some(reg) = region {
        reg.wait_for(busy as u16, |s| {
            s.used_idx == used && s.in_flight().is_empty()
        })
        .unwrap_or_else(|s| {
            panic!(
                "after the writes and X completed, queue {busy}'s region should show \
                     used_idx {used} and nothing in flight: {s}"
            )
        });
    }
    let _ = fe;
}

// ------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------

#[test]
fn a_write_in_flight_when_the_backend_dies_is_resubmitted_and_a_completed_read_is_not() {
    let mut a = crash_with_writes_in_flight(Crash::one_write());
    expect_resubmission(&mut a, 0);
}

/// The same crash without INFLIGHT_SHMFD: the backend can only honour the rewound
/// SET_VRING_BASE, so the read that had completed is done again and the write in flight is
/// lost. This proves the scenario is sharp: the tests above fail on any backend that does not
/// track its requests.
#[test]
fn control_without_inflight_tracking_the_read_is_redone_and_the_write_lost() {
    let mut a = crash_with_writes_in_flight(Crash {
        track: false,
        ..Crash::one_write()
    });
    let AfterCrash { b, g, ws, r, .. } = &mut a;
    let w = &ws[0].req;
    let x = g.write(0, X_OFF, &pattern(3, X_LEN), false);
    expect_used(
        g,
        0,
        r.head,
        "without tracking, the rewound base makes the backend redo R first",
        b,
    );
    expect_used(g, 0, x.head, "then the new request X", b);
    assert_eq!(
        g.status(r),
        blk::S_OK,
        "the redone read's status was written again"
    );
    assert_eq!(
        g.status(w),
        UNWRITTEN,
        "the write W should be lost (never completed) without tracking"
    );
    assert!(
        b.read_image(W_OFF, W_LEN).iter().all(|&x| x == 0),
        "the write W's data reached the image without tracking"
    );
    assert_eq!(g.used_idx(0), 3, "used entries: R, R again, X");
}

#[test]
fn an_indirect_write_in_flight_is_resubmitted() {
    let mut a = crash_with_writes_in_flight(Crash {
        indirect: true,
        ..Crash::one_write()
    });
    expect_resubmission(&mut a, 0);
}

/// Two writes held, made available one after the other: the region marks both, with
/// increasing counters; both are resubmitted (in whatever order they complete) and the next
/// request comes after them.
#[test]
fn two_writes_in_flight_are_both_resubmitted() {
    let mut a = crash_with_writes_in_flight(Crash {
        held_writes: 2,
        ..Crash::one_write()
    });
    expect_resubmission(&mut a, 0);
}

/// Two queues of 128 (QEMU's default size, a region of 2 × 2112 bytes): queue 1 holds the
/// write, queue 0 has completed a read and is idle. Queue 1's state is found at its own
/// offset; after the reconnect queue 1 resubmits its write, and queue 0 neither redoes its read
/// nor invents anything: its next request is its next used entry.
#[test]
fn two_queues_a_write_in_flight_on_queue_1_while_queue_0_is_idle() {
    let mut a = crash_with_writes_in_flight(Crash {
        num_queues: 2,
        queue_size: 128,
        busy: 1,
        ..Crash::one_write()
    });
    expect_resubmission(&mut a, 1);
    let AfterCrash {
        b,
        g,
        region,
        idle_reads,
        ..
    } = &mut a;
    assert_eq!(g.used_idx(0), 1, "queue 0 completed something by itself");
    let x0 = g.read(0, X_OFF, X_LEN);
    expect_used(g, 0, x0.head, "a new request on the idle queue 0", b);
    assert_eq!(g.status(&x0), blk::S_OK);
    assert_eq!(g.used_idx(0), 2, "queue 0: its read, then the new one");
    for (q, r) in idle_reads.iter() {
        assert!(
            g.untouched_since_stale(r),
            "queue {q}'s completed read was executed again"
        );
    }
    let reg = region.as_ref().expect("a region");
    reg.wait_for(0, |s| s.used_idx == 2 && s.in_flight().is_empty())
        .unwrap_or_else(|s| panic!("queue 0's region after its second read: {s}"));
}

/// A region fresh from GET_INFLIGHT_FD is all zeroes (version 0; `desc_num` may be filled in
/// already); once the queue runs it is
/// initialised (version 1, desc_num the queue size), and normal I/O, many requests at once,
/// leaves no head marked in flight and `used_idx` equal to the used ring's index.
#[test]
fn a_fresh_region_is_initialised_and_normal_io_leaves_nothing_in_flight() {
    let b = Bench::new(1);
    let mut g = Guest::new(1, MAX_QUEUE_SIZE);
    // Region::get (inside connect) checks that the region is fresh (version 0, zeroes) before
    // it is handed back with SET_INFLIGHT_FD.
    let mut region = None;
    let fe = connect(&b, &g, true, &mut region, &[0]);
    let reg = region.as_ref().expect("a region");
    let mut rounds = 0;
    for round in 0..4u64 {
        // 24 requests in flight together: writes and reads over distinct ranges.
        let mut reqs = Vec::new();
        for i in 0..12u64 {
            let off = MIB + (round * 12 + i) * 8192;
            reqs.push(g.write(0, off, &pattern(i as u8, 4096), i % 3 == 0));
            reqs.push(g.read(0, off + 4096, 4096));
        }
        for _ in &reqs {
            g.next_used(0).unwrap_or_else(|| {
                panic!(
                    "normal I/O did not complete; backend stderr:\n{}",
                    b.stderr_tail()
                )
            });
        }
        for r in &reqs {
            assert_eq!(g.status(r), blk::S_OK, "request status");
        }
        let used = g.used_idx(0);
        reg.wait_for(0, |s| {
            s.version == 1
                && s.desc_num == MAX_QUEUE_SIZE
                && s.used_idx == used
                && s.in_flight().is_empty()
        })
        .unwrap_or_else(|s| {
            panic!(
                "after round {round} of normal I/O (used ring index {used}) the region should \
                 read version 1, desc_num {MAX_QUEUE_SIZE}, used_idx {used}, nothing in flight; \
                 it reads {s}"
            )
        });
        rounds += 1;
    }
    assert_eq!(rounds, 4);
    assert_eq!(g.used_idx(0), 96);
    drop(fe);
}
