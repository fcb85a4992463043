//! The hostile-driver test rig: one backend (ringfence, or qemu-storage-daemon for
//! comparison) serving a pattern-filled image from a temporary directory, honest sessions
//! to drive it, and the checks every hostile case ends with:
//!
//! * the backend process is alive and a fresh connection serves a valid write and read;
//! * no byte of the image outside the ranges the case allows changed;
//! * no byte of any guest RAM the test handed to the backend changed outside the
//!   device-writable buffers and the used rings: for descriptor cases ([`run_case`]) since
//!   the hostile requests were published, for every other memory since it was created
//!   ([`Rig::keep_memory`], [`Rig::keep_session`]; a session simply dropped is compared
//!   too, and a memfd handed out and never compared is a test bug, see `memory.rs`);
//! * nothing hangs: every wait is bounded, and a missing reply is a finding.
//!
//! Against ringfence, descriptor cases are also held to what ringfence promises: every
//! request whose head is in range is answered (a request expected to fail with an error
//! status), a request answered with an error status leaves the image untouched, and each
//! queue a case touched still serves a valid request afterwards. qemu-storage-daemon, the
//! reference, is held to less where it legitimately does something else (see
//! [`run_case_with`]): it may stop a device it considers broken.
//!
//! Findings are collected and reported together, with the daemon's stderr, by
//! [`Rig::finish`].

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::blk::{self, S_OK};
use crate::daemon::Daemon;
use crate::frontend::{code, pfeat, vfeat, FeError, FeResult, Frontend};
use crate::image;
use crate::memory::{GuestMemory, Snapshot};
use crate::virtq::{Desc, SplitQueue, Used};

/// Size of the test image.
pub const IMAGE_SIZE: u64 = 64 << 20;
pub const CAPACITY: u64 = IMAGE_SIZE / blk::SECTOR;
/// Read by the pre-check and the health check; no case writes here.
pub const PROBE_OFFSET: u64 = 40 << 20;
/// Written by the health check.
pub const SCRATCH_OFFSET: u64 = 48 << 20;
pub const SCRATCH_LEN: u64 = 8192;

/// Guest RAM of a hostile session: region A holds the rings (64 KiB per queue from its start)
/// and the buffers (from A + 1 MiB); a 1 MiB gap; region B; region C right after B.
pub const RAM_A: (u64, u64) = (0x10_0000, 0x40_0000);
pub const GAP: (u64, u64) = (0x50_0000, 0x10_0000);
pub const RAM_B: (u64, u64) = (0x60_0000, 0x10_0000);
pub const RAM_C: (u64, u64) = (0x70_0000, 0x10_0000);
pub const RING_STRIDE: u64 = 0x1_0000;
pub const HEAP_START: u64 = RAM_A.0 + 0x10_0000;

/// Which backend the suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Ringfence,
    Qsd,
}

/// `RINGFENCE_HOSTILE_TARGET=qsd` points the suite at qemu-storage-daemon.
pub fn target() -> Target {
    match std::env::var("RINGFENCE_HOSTILE_TARGET").as_deref() {
        Ok("qsd") | Ok("qemu-storage-daemon") => Target::Qsd,
        Ok("ringfence") | Err(_) => Target::Ringfence,
        Ok(other) => panic!("RINGFENCE_HOSTILE_TARGET={other}: use ringfence or qsd"),
    }
}

/// How long a hostile request may go unanswered before we call the queue stopped
/// (`RINGFENCE_HOSTILE_WAIT_MS`, default 1000). Only paid when the backend does not answer.
pub fn hostile_wait() -> Duration {
    let ms = std::env::var("RINGFENCE_HOSTILE_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    Duration::from_millis(ms)
}

/// Bound on honest operations (replies, valid I/O): past it, the backend hangs.
pub const HONEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct RigOpts {
    pub read_only: bool,
    pub num_queues: u16,
    /// ringfence's `--queue-size` (the maximum it accepts).
    pub max_queue_size: u16,
    pub serial: Option<String>,
    /// Bound on honest operations (default [`HONEST_TIMEOUT`]); the control tests, which
    /// make the backend fail on purpose, shorten it.
    pub honest_timeout: Duration,
}

impl Default for RigOpts {
    fn default() -> Self {
        RigOpts {
            read_only: false,
            num_queues: 1,
            max_queue_size: 256,
            serial: None,
            honest_timeout: HONEST_TIMEOUT,
        }
    }
}

/// The virtio features ringfence offers (README, "The device"), besides
/// `VHOST_USER_F_PROTOCOL_FEATURES`: a writable disk gets the write features, a read-only
/// one `BLK_RO` instead.
pub fn ringfence_features(read_only: bool) -> u64 {
    let base = vfeat::VERSION_1
        | vfeat::PROTOCOL_FEATURES
        | vfeat::BLK_SIZE_MAX
        | vfeat::BLK_SEG_MAX
        | vfeat::BLK_BLK_SIZE
        | vfeat::BLK_TOPOLOGY
        | vfeat::BLK_MQ
        | vfeat::RING_INDIRECT_DESC
        | vfeat::RING_EVENT_IDX;
    if read_only {
        base | vfeat::BLK_RO
    } else {
        base | vfeat::BLK_FLUSH
            | vfeat::BLK_CONFIG_WCE
            | vfeat::BLK_DISCARD
            | vfeat::BLK_WRITE_ZEROES
    }
}

/// The vhost-user protocol features ringfence offers (README, "The device").
pub const RINGFENCE_PROTOCOL: u64 =
    pfeat::CONFIG | pfeat::MQ | pfeat::REPLY_ACK | pfeat::CONFIGURE_MEM_SLOTS;

/// What an honest session negotiates and lays out.
#[derive(Clone, Debug)]
pub struct SessionCfg {
    /// Virtio features we want (the intersection with the offer is acked).
    pub features: u64,
    /// Protocol features we want.
    pub protocol: u64,
    /// Queues to set up and enable.
    pub queues: u16,
    pub queue_size: u16,
    /// Guest RAM regions `(gpa, size)`; rings and buffers go in the first one.
    pub layout: Vec<(u64, u64)>,
}

/// Every virtio-blk feature we know how to drive.
pub const WANTED_FEATURES: u64 = vfeat::VERSION_1
    | vfeat::RING_INDIRECT_DESC
    | vfeat::PROTOCOL_FEATURES
    | vfeat::BLK_SIZE_MAX
    | vfeat::BLK_SEG_MAX
    | vfeat::BLK_BLK_SIZE
    | vfeat::BLK_TOPOLOGY
    | vfeat::BLK_FLUSH
    | vfeat::BLK_CONFIG_WCE
    | vfeat::BLK_MQ
    | vfeat::BLK_DISCARD
    | vfeat::BLK_WRITE_ZEROES
    | vfeat::BLK_RO;

pub const WANTED_PROTOCOL: u64 =
    pfeat::MQ | pfeat::REPLY_ACK | pfeat::CONFIG | pfeat::CONFIGURE_MEM_SLOTS;

impl Default for SessionCfg {
    fn default() -> Self {
        SessionCfg {
            features: WANTED_FEATURES,
            protocol: WANTED_PROTOCOL,
            queues: 1,
            queue_size: 256,
            layout: vec![RAM_A, RAM_B, RAM_C],
        }
    }
}

/// An honest connection with guest RAM and started queues.
pub struct Session {
    pub fe: Frontend,
    pub mem: GuestMemory,
    pub queues: Vec<SplitQueue>,
    /// Negotiated (acked) features.
    pub features: u64,
    pub protocol: u64,
    heap: u64,
    heap_end: u64,
}

impl Session {
    /// GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES (in QEMU's order).
    /// Returns (acked features, acked protocol features).
    pub fn negotiate(fe: &mut Frontend, cfg: &SessionCfg) -> FeResult<(u64, u64)> {
        let offered = fe.get_features()?;
        let mut protocol = 0;
        if offered & vfeat::PROTOCOL_FEATURES != 0 && cfg.features & vfeat::PROTOCOL_FEATURES != 0 {
            protocol = fe.get_protocol_features()? & cfg.protocol;
            fe.set_protocol_features(protocol)?;
            if protocol & pfeat::MQ != 0 {
                fe.get_queue_num()?;
            }
        }
        fe.set_owner()?;
        let features = offered & cfg.features;
        fe.set_features(features)?;
        Ok((features, protocol))
    }

    /// SET_VRING_NUM, BASE, ADDR, CALL, KICK and (with protocol features) ENABLE for `q`.
    pub fn start_queue(
        fe: &Frontend,
        mem: &GuestMemory,
        q: &SplitQueue,
        enable: bool,
    ) -> FeResult<()> {
        fe.set_vring_num(q.index, u32::from(q.size))?;
        fe.set_vring_base(q.index, u32::from(q.avail_idx))?;
        fe.set_vring_addr(
            q.index,
            mem.uaddr(q.desc),
            mem.uaddr(q.used),
            mem.uaddr(q.avail),
        )?;
        fe.set_vring_fd(code::SET_VRING_CALL, q.index, Some(q.call.as_raw_fd()))?;
        fe.set_vring_fd(code::SET_VRING_KICK, q.index, Some(q.kick.as_raw_fd()))?;
        if enable {
            fe.set_vring_enable(q.index, true)?;
        }
        Ok(())
    }

    /// Build a session from a connected frontend: negotiate, share guest RAM, start queues.
    pub fn establish(mut fe: Frontend, cfg: &SessionCfg) -> FeResult<Session> {
        let (features, protocol) = Session::negotiate(&mut fe, cfg)?;
        let mem = GuestMemory::new(&cfg.layout);
        // An honest setup that fails is a failure of its own (the callers panic or report
        // it), so the memory needs no comparison then: say so, or dropping it would panic.
        let failed = |mem: &GuestMemory, e: FeError| {
            mem.waive_comparison();
            e
        };
        let (table, fds) = mem.table();
        fe.set_mem_table(&table, &fds)
            .map_err(|e| failed(&mem, e))?;
        let base = cfg.layout[0].0;
        let mut queues = Vec::new();
        for i in 0..cfg.queues {
            let q = SplitQueue::new(
                &mem,
                u32::from(i),
                cfg.queue_size,
                base + RING_STRIDE * u64::from(i),
            );
            Session::start_queue(&fe, &mem, &q, features & vfeat::PROTOCOL_FEATURES != 0)
                .map_err(|e| failed(&mem, e))?;
            queues.push(q);
        }
        let heap = base + 0x10_0000.min(cfg.layout[0].1 / 2);
        Ok(Session {
            fe,
            mem,
            queues,
            features,
            protocol,
            heap,
            heap_end: base + cfg.layout[0].1,
        })
    }

    /// A session over parts set up by hand (for tests that lie during the setup). Buffers
    /// are allocated from `heap` up to the end of the region holding it.
    pub fn from_parts(
        fe: Frontend,
        mem: GuestMemory,
        queues: Vec<SplitQueue>,
        heap: u64,
    ) -> Session {
        let heap_end = mem
            .regions
            .iter()
            .find(|r| heap >= r.gpa && heap < r.end())
            .map(|r| r.end())
            .expect("test bug: heap outside guest RAM");
        Session {
            fe,
            mem,
            queues,
            features: 0,
            protocol: 0,
            heap,
            heap_end,
        }
    }

    /// Reserve `len` bytes of guest RAM for buffers (zeroed), aligned to `align`.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let a = (self.heap + align - 1) & !(align - 1);
        assert!(a + len <= self.heap_end, "test bug: guest heap exhausted");
        self.heap = a + len;
        self.mem.fill(a, len as usize, 0);
        a
    }

    /// Put `data` in guest RAM (8-byte aligned); returns its address.
    pub fn put(&mut self, data: &[u8]) -> u64 {
        let a = self.alloc(data.len() as u64, 8);
        self.mem.write(a, data);
        a
    }

    /// A status byte, pre-set to 0xff ("unwritten").
    pub fn status(&mut self) -> u64 {
        let a = self.alloc(1, 1);
        self.mem.write(a, &[0xff]);
        a
    }

    /// Write a chain on queue `q` and push it (not yet published). Returns the head.
    pub fn chain(&mut self, q: usize, segs: &[Desc]) -> u16 {
        let head = self.queues[q].chain(&self.mem, segs);
        self.queues[q].push(&self.mem, head);
        head
    }

    /// Write an indirect table at a fresh address and push a descriptor for it.
    pub fn indirect(&mut self, q: usize, segs: &[Desc]) -> u16 {
        let table = self.alloc(16 * segs.len().max(1) as u64, 16);
        let head = self.queues[q].indirect(&self.mem, table, segs);
        self.queues[q].push(&self.mem, head);
        head
    }

    /// Publish and kick queue `q`.
    pub fn kick(&self, q: usize) {
        self.queues[q].publish(&self.mem);
        self.queues[q].kick();
    }

    /// An honest request on queue `q`: header, `out` (device-readable, if any), `in_len`
    /// device-writable bytes (if any), status. Waits for it; returns (status, data in).
    pub fn io(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
    ) -> Result<(u8, Vec<u8>), String> {
        self.io_within(q, t, sector, out, in_len, HONEST_TIMEOUT)
    }

    /// [`Session::io`] with an explicit bound on the wait.
    pub fn io_within(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
        timeout: Duration,
    ) -> Result<(u8, Vec<u8>), String> {
        let hdr = self.put(&blk::header(t, sector));
        let mut segs = vec![Desc::r(hdr, 16)];
        if !out.is_empty() {
            let d = self.put(out);
            segs.push(Desc::r(d, out.len() as u32));
        }
        let din = if in_len > 0 {
            let d = self.alloc(in_len as u64, 512);
            segs.push(Desc::w(d, in_len as u32));
            Some(d)
        } else {
            None
        };
        let st = self.status();
        segs.push(Desc::w(st, 1));
        let head = self.chain(q, &segs);
        self.kick(q);
        let deadline = Instant::now() + timeout;
        let fd = self.fe.as_raw_fd();
        match self.queues[q].wait_used(&self.mem, deadline, Some(fd)) {
            None if self.fe.peer_hung_up() => Err("the backend closed the connection".into()),
            None => Err(format!("no answer within {timeout:?}")),
            Some(u) if u.id != u32::from(head) => Err(format!("used id {} for head {head}", u.id)),
            Some(_) => {
                let data = din.map(|d| self.mem.read(d, in_len)).unwrap_or_default();
                Ok((self.mem.read_u8(st), data))
            }
        }
    }

    /// Honest read of `len` bytes at byte offset `off` (sector aligned) that must succeed.
    pub fn read(&mut self, q: usize, off: u64, len: usize) -> Result<Vec<u8>, String> {
        self.read_within(q, off, len, HONEST_TIMEOUT)
    }

    /// [`Session::read`] with an explicit bound on the wait.
    pub fn read_within(
        &mut self,
        q: usize,
        off: u64,
        len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        match self.io_within(q, blk::T_IN, off / blk::SECTOR, &[], len, timeout)? {
            (S_OK, d) => Ok(d),
            (s, _) => Err(format!("read at {off:#x} answered {}", blk::status_name(s))),
        }
    }

    /// Honest write that must succeed.
    pub fn write(&mut self, q: usize, off: u64, data: &[u8]) -> Result<(), String> {
        self.write_within(q, off, data, HONEST_TIMEOUT)
    }

    /// [`Session::write`] with an explicit bound on the wait.
    pub fn write_within(
        &mut self,
        q: usize,
        off: u64,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), String> {
        match self.io_within(q, blk::T_OUT, off / blk::SECTOR, data, 0, timeout)? {
            (S_OK, _) => Ok(()),
            (s, _) => Err(format!(
                "write at {off:#x} answered {}",
                blk::status_name(s)
            )),
        }
    }

    /// Take the guest RAM and queues out of the session (it keeps an empty memory), e.g. to
    /// compare them after the connection is closed.
    pub fn take_memory(&mut self) -> (GuestMemory, Vec<SplitQueue>) {
        (
            std::mem::replace(&mut self.mem, GuestMemory::new(&[])),
            std::mem::take(&mut self.queues),
        )
    }

    /// Forget which ranges were device-writable so far (call before the hostile part).
    pub fn clear_writable(&mut self) {
        for q in &mut self.queues {
            q.writable.clear();
        }
    }

    /// Everything the device may legitimately write since [`Session::clear_writable`]:
    /// device-writable descriptors and the used rings.
    pub fn writable(&self) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for q in &self.queues {
            v.extend(q.writable.iter().copied());
            v.push(q.used_range());
        }
        v
    }
}

/// A session dropped with its guest RAM (not given to [`Rig::keep_session`]) closes its
/// connection, and its guest RAM waits for the rig's next memory comparison (in
/// [`Rig::finish`], after the health check): the backend may have written the
/// device-writable buffers the session made available and its used rings, nothing else.
impl Drop for Session {
    fn drop(&mut self) {
        if self.mem.regions.is_empty() || std::thread::panicking() {
            return;
        }
        let allowed = self.writable();
        let (mem, queues) = self.take_memory();
        ORPHANS.with(|o| {
            o.borrow_mut().0.push(Kept {
                what: "a session dropped before the end of the test".into(),
                mem,
                allowed,
                _queues: queues,
            })
        });
    }
}

/// Per-thread CPU time of a process: (thread name, clock ticks).
fn thread_cpu(pid: i32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = format!("{}/{}", &stat[l + 1..r], t.file_name().to_string_lossy());
        let f: Vec<&str> = stat[r + 2..].split(' ').collect();
        // After the name: state(0) ... utime is field 14 overall = index 11 here, stime 12.
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        out.push((name, ticks));
    }
    out
}

/// One line per thread of a process: tid, name, state, wait channel, current syscall
/// (for hang reports).
pub fn thread_dump(pid: i32) -> String {
    let mut out = String::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(process gone)\n".into();
    };
    let mut tids: Vec<_> = dir.flatten().map(|e| e.path()).collect();
    tids.sort();
    for t in tids {
        let rd = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
        let stat = rd("stat");
        let name = rd("comm").trim().to_string();
        let state = stat
            .rfind(')')
            .and_then(|r| stat[r + 2..].split(' ').next())
            .unwrap_or("?")
            .to_string();
        let sys = rd("syscall");
        let nr = sys.split(' ').next().unwrap_or("?").trim().to_string();
        out.push_str(&format!(
            "  tid {} {name:<16} state {state} wchan {:<24} syscall {nr}\n",
            t.file_name().unwrap().to_string_lossy(),
            rd("wchan"),
        ));
    }
    out
}

/// Guest RAM kept until the end of a test, to be compared then (after the health check,
/// when the backend has moved on).
struct Kept {
    what: String,
    mem: GuestMemory,
    /// What the backend may have written since the memory was created.
    allowed: Vec<(u64, u64)>,
    /// The queues laid out in it (their eventfds stay open as long as the memory).
    _queues: Vec<SplitQueue>,
}

/// Sessions dropped without [`Rig::keep_session`] (see `impl Drop for Session`), waiting for
/// the next [`Rig::check_kept_memory`] of this test's thread.
struct Orphans(Vec<Kept>);

impl Drop for Orphans {
    fn drop(&mut self) {
        // Left over at thread exit: the test ended without Rig::finish, so it failed or had
        // no rig; a panic here (in a thread-local destructor) would abort every test.
        for k in &self.0 {
            k.mem.waive_comparison();
        }
    }
}

thread_local! {
    static ORPHANS: std::cell::RefCell<Orphans> = const { std::cell::RefCell::new(Orphans(Vec::new())) };
}

/// A running backend with its image, and the findings of one test.
pub struct Rig {
    _dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub daemon: Daemon,
    pub opts: RigOpts,
    pub target: Target,
    findings: Vec<String>,
    notes: Vec<String>,
    /// Image ranges `(offset, len)` the case allows to change.
    pub image_writes: Vec<(u64, u64)>,
    health_checked: bool,
    kept: Vec<Kept>,
}

fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("hostile")
        .rsplit("::")
        .next()
        .unwrap_or("hostile")
        .to_string()
}

impl Rig {
    pub fn start(opts: RigOpts) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("ringfence-hostile-")
            .tempdir()
            .expect("temp dir");
        let image = dir.path().join("disk.img");
        let socket = dir.path().join("vhost.sock");
        image::create(&image, IMAGE_SIZE);
        let target = target();
        let daemon = match target {
            Target::Qsd => {
                Daemon::qemu_storage_daemon(&socket, &image, opts.read_only, opts.num_queues)
            }
            Target::Ringfence => {
                let nq = opts.num_queues.to_string();
                let qs = opts.max_queue_size.to_string();
                let mut args = vec![
                    "--blk-file",
                    image.to_str().unwrap(),
                    "--num-queues",
                    &nq,
                    "--queue-size",
                    &qs,
                ];
                if opts.read_only {
                    args.push("--read-only");
                }
                if let Some(s) = &opts.serial {
                    args.push("--serial");
                    args.push(s);
                }
                Daemon::ringfence(&socket, &args)
            }
        };
        Rig {
            _dir: dir,
            image,
            socket,
            daemon,
            opts,
            target,
            findings: Vec::new(),
            notes: Vec::new(),
            image_writes: Vec::new(),
            health_checked: false,
            kept: Vec::new(),
        }
    }

    /// Whether the strict oracles apply (ringfence's own promises, see the module docs).
    pub fn strict(&self) -> bool {
        self.target == Target::Ringfence
    }

    /// Bound on honest operations of this rig.
    pub fn honest_timeout(&self) -> Duration {
        self.opts.honest_timeout
    }

    /// Keep `mem` (handed to the backend) until the end of the test; [`Rig::finish`] then
    /// reports every byte the backend wrote outside `allowed` since it was created.
    pub fn keep_memory(
        &mut self,
        what: impl Into<String>,
        mem: GuestMemory,
        allowed: &[(u64, u64)],
    ) {
        self.kept.push(Kept {
            what: what.into(),
            mem,
            allowed: allowed.to_vec(),
            _queues: Vec::new(),
        });
    }

    /// Close a session's connection now (the backend serves one connection at a time) and
    /// keep its guest RAM: the backend may have written the device-writable buffers the
    /// session ever made available, its used rings, and `extra`; nothing else, ever.
    pub fn keep_session(&mut self, what: impl Into<String>, mut s: Session, extra: &[(u64, u64)]) {
        let mut allowed = s.writable();
        allowed.extend_from_slice(extra);
        let (mem, queues) = s.take_memory();
        drop(s);
        self.kept.push(Kept {
            what: what.into(),
            mem,
            allowed,
            _queues: queues,
        });
    }

    /// Compare every kept memory (see [`Rig::keep_memory`]), and that of every session
    /// dropped since (see `impl Drop for Session`), now; then forget it.
    pub fn check_kept_memory(&mut self) {
        let orphans = ORPHANS.with(|o| std::mem::take(&mut o.borrow_mut().0));
        self.kept.extend(orphans);
        for k in std::mem::take(&mut self.kept) {
            for f in k.mem.stray_writes_since_creation(&k.allowed) {
                self.fail(format!("{}: {f}", k.what));
            }
        }
    }

    /// Against ringfence, a session must have negotiated every feature it asked for that
    /// ringfence documents: a capability that silently went missing would skip checks.
    pub fn check_offer(&mut self, what: &str, s: &Session, cfg: &SessionCfg) {
        if !self.strict() {
            return;
        }
        let want = cfg.features & ringfence_features(self.opts.read_only);
        if want & !s.features != 0 {
            self.fail(format!(
                "{what}: ringfence did not offer virtio features {:#x} it documents",
                want & !s.features
            ));
        }
        let want_p = if s.features & vfeat::PROTOCOL_FEATURES != 0 {
            cfg.protocol & RINGFENCE_PROTOCOL
        } else {
            0
        };
        if want_p & !s.protocol != 0 {
            self.fail(format!(
                "{what}: ringfence did not offer protocol features {:#x} it documents",
                want_p & !s.protocol
            ));
        }
    }

    /// A new connection (panics if the socket refuses it: that is the daemon being gone).
    pub fn connect(&self) -> Frontend {
        match Frontend::connect(&self.socket) {
            Ok(fe) => fe,
            Err(e) => panic!(
                "connect to {}: {e}\n{}",
                self.socket.display(),
                self.stderr_tail()
            ),
        }
    }

    /// An honest session on a new connection, which must work (and, against ringfence,
    /// negotiate every documented feature it asks for).
    pub fn session(&mut self, cfg: &SessionCfg) -> Session {
        let s = match Session::establish(self.connect(), cfg) {
            Ok(s) => s,
            Err(e) => panic!("honest session setup failed: {e}\n{}", self.stderr_tail()),
        };
        self.check_offer("honest session", &s, cfg);
        s
    }

    /// Record a failure (reported by [`Rig::finish`]).
    pub fn fail(&mut self, msg: impl Into<String>) {
        self.findings.push(msg.into());
    }

    /// Record an observation (printed, not a failure).
    pub fn note(&mut self, msg: impl Into<String>) {
        let m = msg.into();
        eprintln!("HOSTILE-NOTE {}: {m}", test_name());
        self.notes.push(m);
    }

    pub fn findings(&self) -> &[String] {
        &self.findings
    }

    pub fn stderr_tail(&self) -> String {
        let s = self.daemon.stderr();
        let tail = if s.len() > 6000 {
            let mut i = s.len() - 6000;
            while !s.is_char_boundary(i) {
                i += 1;
            }
            &s[i..]
        } else {
            &s[..]
        };
        format!("--- daemon stderr (tail) ---\n{tail}--- end of daemon stderr ---")
    }

    /// The result of an exchange the backend must survive: a reply or a refusal is fine;
    /// a timeout is a hang. Returns whether the connection is still usable.
    pub fn judge(&mut self, what: &str, r: &FeResult<()>) -> bool {
        match r {
            Ok(()) => {
                self.note(format!("{what}: accepted"));
                true
            }
            Err(FeError::Nack(v)) => {
                self.note(format!("{what}: refused (nack {v:#x})"));
                true
            }
            Err(FeError::Closed) => {
                self.note(format!("{what}: connection closed by the backend"));
                false
            }
            Err(FeError::Timeout) => {
                self.fail(format!("{what}: no reply within the timeout (hang)"));
                false
            }
            Err(e) => {
                self.fail(format!("{what}: {e}"));
                false
            }
        }
    }

    /// After a hostile message: the connection must either answer GET_FEATURES in time or
    /// have been closed by the backend. Returns whether it still answers.
    pub fn responsive(&mut self, fe: &Frontend, what: &str) -> bool {
        match fe.ping() {
            Ok(_) => true,
            Err(FeError::Closed) => {
                self.note(format!("{what}: the backend closed the connection"));
                false
            }
            Err(FeError::Timeout) => {
                self.fail(format!(
                    "{what}: the connection hangs (GET_FEATURES unanswered for {:?})",
                    fe.timeout
                ));
                false
            }
            Err(e) => {
                self.fail(format!("{what}: GET_FEATURES afterwards failed: {e}"));
                false
            }
        }
    }

    fn dead_finding(&mut self) -> bool {
        if self.daemon.is_alive() {
            return false;
        }
        let st = self.daemon.exit_status();
        self.fail(format!("the backend process died (exit status {st:?})"));
        true
    }

    /// The backend is alive and a fresh connection serves a valid write and read.
    pub fn health_check(&mut self) {
        self.health_checked = true;
        if self.dead_finding() {
            return;
        }
        let fe = match Frontend::connect(&self.socket) {
            Ok(fe) => fe,
            Err(e) => return self.fail(format!("health check: connecting failed: {e}")),
        };
        let mut fe = fe;
        fe.timeout = self.honest_timeout();
        let cfg = SessionCfg {
            layout: vec![(0x4000_0000, 0x20_0000)],
            ..SessionCfg::default()
        };
        let mut s = match Session::establish(fe, &cfg) {
            Ok(s) => s,
            Err(e) => {
                let dump = thread_dump(self.daemon.pid());
                return self.fail(format!(
                    "health check: a fresh connection's setup failed: {e}; daemon threads at that moment:\n{dump}"
                ));
            }
        };
        self.check_offer("health check", &s, &cfg);
        let timeout = self.honest_timeout();
        let r = (|| -> Result<(), String> {
            let probe = s.read_within(0, PROBE_OFFSET, 4096, timeout)?;
            if probe != image::pattern(PROBE_OFFSET, 4096) {
                return Err(format!("reading {PROBE_OFFSET:#x} returned wrong data"));
            }
            if !self.opts.read_only {
                let data: Vec<u8> = (0..SCRATCH_LEN).map(|i| (i * 7 + 3) as u8).collect();
                s.write_within(0, SCRATCH_OFFSET, &data, timeout)?;
                if s.read_within(0, SCRATCH_OFFSET, SCRATCH_LEN as usize, timeout)? != data {
                    return Err("reading back the scratch write returned wrong data".into());
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            let dump = thread_dump(self.daemon.pid());
            self.fail(format!(
                "health check on a fresh connection: {e}; daemon threads at that moment:\n{dump}"
            ));
        }
        self.keep_session("health check's guest RAM", s, &[]);
        self.dead_finding();
    }

    /// Compare guest RAM with `snap` outside `allowed`; every stray write is a finding.
    /// Call after [`Rig::health_check`], so that the backend has moved on.
    pub fn check_memory(&mut self, mem: &GuestMemory, snap: &Snapshot, allowed: &[(u64, u64)]) {
        for f in mem.stray_writes(snap, allowed) {
            self.fail(f);
        }
    }

    /// CPU time the backend's threads used so far, in clock ticks (1/100 s), io_uring
    /// submission-poll threads excluded.
    pub fn cpu_ticks(&self) -> u64 {
        thread_cpu(self.daemon.pid())
            .iter()
            .filter(|(n, _)| !n.starts_with("iou-"))
            .map(|(_, t)| t)
            .sum()
    }

    /// Number of open fds of the backend process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.daemon.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The backend's open fds by kind (the target of /proc/PID/fd/N, numbers stripped).
    pub fn fd_kinds(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        if let Ok(d) = std::fs::read_dir(format!("/proc/{}/fd", self.daemon.pid())) {
            for e in d.flatten() {
                let t = std::fs::read_link(e.path())
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let kind: String = t.chars().filter(|c| !c.is_ascii_digit()).collect();
                *m.entry(kind).or_insert(0) += 1;
            }
        }
        m
    }

    /// Resident set size of the backend process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.daemon.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }

    /// Whether the backend process is still running (a finding if not).
    pub fn alive(&mut self, when: &str) -> bool {
        if self.daemon.is_alive() {
            return true;
        }
        let st = self.daemon.exit_status();
        self.fail(format!(
            "{when}: the backend process died (exit status {st:?})"
        ));
        false
    }

    /// Final checks (health check unless done, kept guest RAM, image, process alive);
    /// panics with every finding and the daemon's stderr if anything failed.
    pub fn finish(mut self) {
        if !self.health_checked {
            self.health_check();
        }
        self.check_kept_memory();
        let mut allowed = self.image_writes.clone();
        allowed.push((SCRATCH_OFFSET, SCRATCH_LEN));
        for f in image::verify(&self.image, IMAGE_SIZE, &allowed) {
            self.fail(f);
        }
        if !self.findings.is_empty() {
            let name = test_name();
            // Debugging aid: keep the daemon around to attach a debugger.
            if let Some(secs) = std::env::var("RINGFENCE_HOSTILE_PAUSE_ON_FAIL")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                eprintln!(
                    "HOSTILE-PAUSE {name}: daemon pid {} kept for {secs} s",
                    self.daemon.pid()
                );
                std::thread::sleep(Duration::from_secs(secs));
            }
            for f in &self.findings {
                eprintln!("HOSTILE-FAIL {name}: {f}");
            }
            panic!(
                "{name} against {:?}: {} finding(s):\n  - {}\n--- daemon threads ---\n{}{}",
                self.target,
                self.findings.len(),
                self.findings.join("\n  - "),
                thread_dump(self.daemon.pid()),
                self.stderr_tail()
            );
        }
        eprintln!("HOSTILE-PASS {} against {:?}", test_name(), self.target);
    }
}

/// `len` bytes of the image file at `path`, from `off`.
pub fn read_image(path: &std::path::Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .expect("open image")
        .read_exact_at(&mut buf, off)
        .expect("read image");
    buf
}

/// A check of guest RAM after a request answered OK.
pub type MemCheck = Box<dyn Fn(&GuestMemory) -> Result<(), String>>;

/// What the device is expected to do with one hostile request.
pub enum Expect {
    /// The request is invalid: the status must not be OK (against ringfence: it must be
    /// answered, with an error status wherever the status byte can be written).
    Error,
    /// Anything goes (the status cannot be judged), as long as nothing else breaks.
    Any,
    /// A legal (if odd) read: if answered OK, the `(gpa, len)` pieces hold the image's bytes
    /// from `offset` on.
    Read {
        offset: u64,
        pieces: Vec<(u64, u64)>,
    },
    /// A legal write: if answered OK, the image holds `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// A custom check of guest RAM, applied if answered OK.
    Check(MemCheck),
}

/// One request of a case.
pub struct Sub {
    pub queue: usize,
    pub head: u16,
    /// Address of the status byte (pre-set to 0xff), if it is where the device could write it.
    pub status: Option<u64>,
    pub expect: Expect,
    /// Also fail if it is not answered with OK (for layouts virtio explicitly allows).
    pub must_succeed: bool,
    /// Most bytes the device may report as written (sum of device-writable lengths).
    pub max_len: Option<u64>,
    /// Image ranges `(offset, len)` the request writes if it is served. Against ringfence
    /// they may change only if it was answered OK (or its status cannot be seen): ringfence
    /// decides every error status before any I/O exists, so a request it refuses leaves
    /// every byte of the image as it was.
    pub image: Vec<(u64, u64)>,
    /// Why even ringfence may leave this request unanswered (e.g. a head made available
    /// again while in flight: a used element for it would answer the first copy).
    pub unanswerable: Option<&'static str>,
    /// Why the device may be unable to see the status byte at [`Sub::status`] (it is still
    /// watched: an OK there is a finding), so that an answer without a status is fine.
    pub status_unseen: Option<&'static str>,
    pub what: String,
}

impl Sub {
    pub fn new(head: u16, status: Option<u64>, expect: Expect, what: impl Into<String>) -> Sub {
        Sub {
            queue: 0,
            head,
            status,
            expect,
            must_succeed: false,
            max_len: None,
            image: Vec::new(),
            unanswerable: None,
            status_unseen: None,
            what: what.into(),
        }
    }

    pub fn must_succeed(mut self) -> Sub {
        self.must_succeed = true;
        self
    }

    pub fn max_len(mut self, n: u64) -> Sub {
        self.max_len = Some(n);
        self
    }

    pub fn on_queue(mut self, q: usize) -> Sub {
        self.queue = q;
        self
    }

    /// The request writes `len` bytes of the image at `offset` if it is served.
    pub fn writes_image(mut self, offset: u64, len: u64) -> Sub {
        self.image.push((offset, len));
        self
    }

    /// Even ringfence may leave this request unanswered, because `why`.
    pub fn may_go_unanswered(mut self, why: &'static str) -> Sub {
        self.unanswerable = Some(why);
        self
    }

    /// The device may not see the status byte, because `why`: an answer that leaves it
    /// unwritten is fine (an OK written there is still a finding).
    pub fn status_unseen(mut self, why: &'static str) -> Sub {
        self.status_unseen = Some(why);
        self
    }
}

/// A hostile case: requests laid out in guest RAM (pushed, not yet published).
#[derive(Default)]
pub struct Plan {
    pub subs: Vec<Sub>,
    /// Image ranges `(offset, len)` that may change whatever the answers (prefer
    /// [`Sub::writes_image`], which ties a range to its request's answer).
    pub image_writes: Vec<(u64, u64)>,
    /// Guest RAM the device may write besides device-writable descriptors and used rings.
    pub mem_writes: Vec<(u64, u64)>,
    /// Publish this avail idx on queue `.0` instead of the pushed count.
    pub avail_override: Vec<(usize, u16)>,
    /// Queues to publish and kick (default: all with pushed entries, plus overrides).
    pub kick: Vec<usize>,
}

impl Plan {
    pub fn one(sub: Sub) -> Plan {
        Plan {
            subs: vec![sub],
            ..Plan::default()
        }
    }
}

/// Options of [`run_case_with`].
#[derive(Default)]
pub struct CaseOpts {
    pub rig: RigOpts,
    pub session: SessionCfg,
}

/// Run a descriptor-level hostile case with the default rig and session.
pub fn run_case(build: impl FnOnce(&mut Session) -> Plan) {
    run_case_with(CaseOpts::default(), build)
}

/// The image ranges hostile requests may have changed, given the status each was answered
/// with (`None`: unanswered, or its status cannot be seen). Against ringfence (`strict`) a
/// request answered with an error status may have changed nothing; qemu-storage-daemon
/// may have written part of a request it then failed (see [`run_case_with`]).
pub fn image_ranges_allowed(
    strict: bool,
    subs: &[Sub],
    statuses: &[Option<u8>],
) -> Vec<(u64, u64)> {
    subs.iter()
        .zip(statuses)
        .filter(|(_, st)| !strict || st.is_none_or(|st| st == S_OK))
        .flat_map(|(sub, _)| sub.image.iter().copied())
        .collect()
}

/// The request a case's queue must still serve after the hostile ones: a read of the
/// probe sector, made available on queue `qi` after the hostile window. Used elements that
/// answer a hostile request late are recorded in `answered`; any other is stray.
fn follow_up(
    s: &mut Session,
    qi: usize,
    subs: &[Sub],
    answered: &mut [Option<Used>],
    stray: &mut Vec<(usize, Used)>,
    timeout: Duration,
) -> Result<(), String> {
    let hdr = s.put(&blk::header(blk::T_IN, PROBE_OFFSET / blk::SECTOR));
    let d = s.alloc(4096, 512);
    let st = s.status();
    let head = s.chain(qi, &[Desc::r(hdr, 16), Desc::w(d, 4096), Desc::w(st, 1)]);
    s.kick(qi);
    let deadline = Instant::now() + timeout;
    let sock = s.fe.as_raw_fd();
    loop {
        let Some(u) = s.queues[qi].wait_used(&s.mem, deadline, Some(sock)) else {
            return Err(if s.fe.peer_hung_up() {
                "the backend closed the connection".into()
            } else {
                format!("no answer within {timeout:?}")
            });
        };
        if u.id == u32::from(head) {
            let stv = s.mem.read_u8(st);
            if stv != S_OK {
                return Err(format!("answered {}", blk::status_name(stv)));
            }
            if s.mem.read(d, 4096) != image::pattern(PROBE_OFFSET, 4096) {
                return Err("answered OK with wrong data".into());
            }
            return Ok(());
        }
        match subs.iter().enumerate().find(|(i, sub)| {
            sub.queue == qi && u32::from(sub.head) == u.id && answered[*i].is_none()
        }) {
            Some((i, _)) => answered[i] = Some(u),
            None => stray.push((qi, u)),
        }
    }
}

/// Start a backend, set up an honest session, check that a valid request works, let
/// `build` lay out the hostile requests, publish and kick, wait (bounded), make a valid
/// request available on every queue the case touched, then check the answers, the
/// connection, a fresh connection, guest RAM and the image.
///
/// What qemu-storage-daemon is held to less than ringfence, and why: libvhost-user stops
/// a device it finds broken (`vu_panic`: it drops the connection, or leaves the queue
/// alone), which virtio allows a device to do; so for qsd an unanswered request, a queue
/// that no longer serves, or a closed connection are noted, not failed. ringfence
/// promises more (it answers malformed requests with an error status and keeps serving),
/// and is held to it. Likewise a request qsd answers with an error may have written its
/// own range of the image (its block layer can fail a request after part of it was
/// written); ringfence refuses before any I/O exists.
pub fn run_case_with(opts: CaseOpts, build: impl FnOnce(&mut Session) -> Plan) {
    let trace_t = Instant::now();
    let trace = |what: &str| {
        if std::env::var_os("RINGFENCE_HOSTILE_TRACE").is_some() {
            eprintln!("[{:?}] {what}", trace_t.elapsed());
        }
    };
    let mut rig = Rig::start(opts.rig);
    let honest = rig.honest_timeout();
    trace("rig started");
    let mut s = rig.session(&opts.session);
    // The path works before we attack it (and leaves the queue in a used state).
    match s.read_within(0, PROBE_OFFSET, 4096, honest) {
        Ok(d) if d == image::pattern(PROBE_OFFSET, 4096) => {}
        Ok(_) => panic!(
            "pre-check: a valid read returned wrong data\n{}",
            rig.stderr_tail()
        ),
        Err(e) => panic!("pre-check: a valid read failed: {e}\n{}", rig.stderr_tail()),
    }
    trace("pre-check done");
    s.clear_writable();
    let base_avail: Vec<u16> = s.queues.iter().map(|q| q.avail_idx).collect();
    let plan = build(&mut s);
    rig.image_writes.extend(plan.image_writes.iter().copied());

    // Snapshot guest RAM, then publish (recording our own index writes) and kick.
    let mut snap: Snapshot = s.mem.snapshot();
    let mut kick: Vec<usize> = plan.kick.clone();
    if kick.is_empty() {
        kick = (0..s.queues.len())
            .filter(|&i| s.queues[i].avail_idx != base_avail[i])
            .chain(plan.avail_override.iter().map(|o| o.0))
            .collect();
        kick.sort_unstable();
        kick.dedup();
    }
    let cpu_before = thread_cpu(rig.daemon.pid());
    let t0 = Instant::now();
    for &qi in &kick {
        let q = &s.queues[qi];
        let idx = plan
            .avail_override
            .iter()
            .find(|o| o.0 == qi)
            .map(|o| o.1)
            .unwrap_or(q.avail_idx);
        s.mem.store_u16(q.avail_idx_gpa(), idx);
        snap.note_write(q.avail_idx_gpa(), &idx.to_le_bytes());
    }
    for &qi in &kick {
        s.queues[qi].kick();
    }

    // Wait for every request to be answered, the connection to close, or the deadline.
    let deadline = t0 + hostile_wait();
    let mut answered: Vec<Option<Used>> = (0..plan.subs.len()).map(|_| None).collect();
    let sock = s.fe.as_raw_fd();
    let mut closed = false;
    let mut stray_used: Vec<(usize, Used)> = Vec::new();
    // With nothing to answer (e.g. a corrupt avail index), watch the rings for the whole window.
    'wait: while plan.subs.is_empty() || answered.iter().any(Option::is_none) {
        let mut progressed = false;
        for qi in 0..s.queues.len() {
            while let Some(u) = s.queues[qi].pop_used(&s.mem) {
                progressed = true;
                match plan.subs.iter().enumerate().find(|(i, sub)| {
                    sub.queue == qi && u32::from(sub.head) == u.id && answered[*i].is_none()
                }) {
                    Some((i, _)) => answered[i] = Some(u),
                    None => stray_used.push((qi, u)),
                }
            }
        }
        if progressed {
            continue;
        }
        // Legal requests that must be served get the honest timeout, not the hostile one.
        let must_wait = plan
            .subs
            .iter()
            .zip(&answered)
            .any(|(sub, a)| sub.must_succeed && a.is_none());
        let now = Instant::now();
        if now >= deadline && !(must_wait && now < t0 + honest) {
            break;
        }
        if s.fe.peer_hung_up() {
            closed = true;
            // One last look at the rings.
            for qi in 0..s.queues.len() {
                while let Some(u) = s.queues[qi].pop_used(&s.mem) {
                    if let Some((i, _)) = plan.subs.iter().enumerate().find(|(i, sub)| {
                        sub.queue == qi && u32::from(sub.head) == u.id && answered[*i].is_none()
                    }) {
                        answered[i] = Some(u);
                    }
                }
            }
            break 'wait;
        }
        // Sleep on the first queue's call eventfd / the socket, at most 20 ms.
        let q0 = kick.first().copied().unwrap_or(0);
        let mut fds = [
            libc::pollfd {
                fd: s.queues[q0].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sock,
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let until = if must_wait { t0 + honest } else { deadline };
        let step = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(20));
        // SAFETY: a valid array of two pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, step.as_millis() as i32) };
        crate::frontend::eventfd_drain(s.queues[q0].call.as_raw_fd());
    }
    let waited = t0.elapsed();
    trace("wait done");
    let cpu_after = thread_cpu(rig.daemon.pid());

    // Each queue the case touched still serves a valid request.
    let mut follow_ups: Vec<(usize, Result<(), String>)> = Vec::new();
    if !closed {
        for &qi in &kick {
            let r = follow_up(
                &mut s,
                qi,
                &plan.subs,
                &mut answered,
                &mut stray_used,
                honest,
            );
            follow_ups.push((qi, r));
        }
    }
    trace("follow-ups done");
    if !stray_used.is_empty() {
        let first: Vec<String> = stray_used
            .iter()
            .take(3)
            .map(|(q, u)| format!("queue {q} {{id {}, len {}}}", u.id, u.len))
            .collect();
        rig.fail(format!(
            "{} used element(s) answer no request that was made available: {}{}",
            stray_used.len(),
            first.join(", "),
            if stray_used.len() > 3 { ", ..." } else { "" }
        ));
    }

    // A stalled queue must not be a spinning one.
    if waited >= Duration::from_millis(500) {
        let tick_ms = 1000 / 100u64; // USER_HZ
        for (name, after) in &cpu_after {
            let before = cpu_before
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .unwrap_or(0);
            let busy_ms = (after - before) * tick_ms;
            if !name.starts_with("iou-") && busy_ms as u128 * 10 >= waited.as_millis() * 4 {
                rig.fail(format!(
                    "thread {name} burned {busy_ms} ms of CPU in {} ms while the request stayed \
                     unanswered (busy loop?)",
                    waited.as_millis()
                ));
            }
        }
    }

    // Judge the answers.
    let strict = rig.strict();
    for (sub, ans) in plan.subs.iter().zip(&answered) {
        let Some(u) = ans else {
            let why = if closed {
                "connection closed"
            } else {
                "no answer (queue stopped)"
            };
            if sub.must_succeed {
                rig.fail(format!("{}: legal request not served: {why}", sub.what));
            } else if let Some(excuse) = sub.unanswerable {
                rig.note(format!("{}: not answered, fine: {excuse}", sub.what));
            } else if strict {
                rig.fail(format!(
                    "{}: {why}; ringfence answers every request whose head is in range",
                    sub.what
                ));
            } else {
                rig.note(format!("{}: {why}", sub.what));
            }
            continue;
        };
        let st = sub.status.map(|a| s.mem.read_u8(a));
        rig.note(format!(
            "{}: answered, used len {}, status {}",
            sub.what,
            u.len,
            st.map(blk::status_name).unwrap_or_else(|| "n/a".into())
        ));
        if let Some(max) = sub.max_len {
            if u64::from(u.len) > max {
                rig.fail(format!(
                    "{}: used len {} exceeds the {max} device-writable bytes of the chain",
                    sub.what, u.len
                ));
            }
        }
        if let Some(st) = st {
            if !matches!(st, 0 | 1 | 2 | 0xff) {
                rig.fail(format!(
                    "{}: status byte {st:#x} is no virtio-blk status",
                    sub.what
                ));
            }
        }
        let ok = st == Some(S_OK);
        if sub.must_succeed && !ok {
            rig.fail(format!(
                "{}: legal request answered {}",
                sub.what,
                st.map(blk::status_name).unwrap_or_default()
            ));
        }
        match &sub.expect {
            Expect::Error if ok => rig.fail(format!(
                "{}: invalid request answered with status OK",
                sub.what
            )),
            Expect::Error if strict && st == Some(0xff) && sub.status_unseen.is_none() => {
                rig.fail(format!(
                    "{}: answered, but the status byte the chain ends with was never written \
                 (ringfence writes an error status wherever the chain has a writable byte)",
                    sub.what
                ))
            }
            Expect::Read { offset, pieces } if ok => {
                let mut off = *offset;
                for &(gpa, len) in pieces {
                    if s.mem.read(gpa, len as usize) != image::pattern(off, len as usize) {
                        rig.fail(format!(
                            "{}: answered OK but guest buffer {gpa:#x}+{len:#x} does not hold image bytes {off:#x}..",
                            sub.what
                        ));
                    }
                    off += len;
                }
            }
            Expect::Check(f) if ok => {
                if let Err(e) = f(&s.mem) {
                    rig.fail(format!("{}: answered OK but {e}", sub.what));
                }
            }
            _ => {}
        }
    }
    for (qi, r) in &follow_ups {
        match r {
            Ok(()) => {}
            Err(e) if strict => rig.fail(format!(
                "queue {qi} no longer serves: a valid read made available after the hostile \
                 requests: {e}"
            )),
            Err(e) => rig.note(format!(
                "queue {qi}: a valid read after the hostile requests: {e}"
            )),
        }
    }
    if closed && strict {
        rig.fail(
            "the backend closed the connection instead of answering (ringfence answers \
             malformed requests with an error status and keeps serving the queue)",
        );
    }

    let statuses: Vec<Option<u8>> = plan
        .subs
        .iter()
        .zip(&answered)
        .map(|(sub, a)| a.and(sub.status).map(|st| s.mem.read_u8(st)))
        .collect();
    rig.image_writes
        .extend(image_ranges_allowed(strict, &plan.subs, &statuses));

    // The connection answers, or was closed.
    if !closed {
        rig.responsive(&s.fe, "after the hostile requests");
    }
    let (mem, queues) = s.take_memory();
    let writable: Vec<(u64, u64)> = queues
        .iter()
        .flat_map(|q| q.writable.iter().copied().chain([q.used_range()]))
        .chain(plan.mem_writes.iter().copied())
        .collect();
    trace("judged");
    // Close the connection (the session holds no memory any more).
    drop(s);
    rig.health_check();
    trace("health checked");

    // Only now (the backend has moved on to a new connection) compare guest RAM and image.
    for f in mem.stray_writes(&snap, &writable) {
        rig.fail(f);
    }
    for (sub, ans) in plan.subs.iter().zip(&answered) {
        if let Expect::Write { offset, data } = &sub.expect {
            let ok = ans.is_some() && sub.status.map(|a| mem.read_u8(a)) == Some(S_OK);
            if ok {
                let img = std::fs::read(&rig.image).expect("read image");
                let got = &img[*offset as usize..*offset as usize + data.len()];
                if got != &data[..] {
                    rig.fail(format!(
                        "{}: answered OK but the image at {offset:#x} does not hold the data written",
                        sub.what
                    ));
                }
            }
        }
    }
    drop(queues);
    drop(mem);
    trace("memory checked");
    rig.finish();
    trace("finished");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_request_may_change_no_image_byte_against_ringfence() {
        let sub = |what: &str| Sub::new(0, Some(0), Expect::Any, what).writes_image(4096, 512);
        let subs = [sub("OK"), sub("IOERR"), sub("unanswered"), sub("UNSUPP")];
        let statuses = [Some(S_OK), Some(blk::S_IOERR), None, Some(blk::S_UNSUPP)];
        assert_eq!(
            image_ranges_allowed(true, &subs, &statuses),
            vec![(4096, 512), (4096, 512)],
            "ringfence: only the OK and the unanswered request"
        );
        assert_eq!(image_ranges_allowed(false, &subs, &statuses).len(), 4);
    }
}

// ------------------------------------------------------------------------------------------
// Dirty logging (live migration): a guest laid out so that a dirty log can tell every part
// apart, and the frontend's side of switching logging on and off as QEMU does.
// ------------------------------------------------------------------------------------------

/// Guest RAM of a dirty-log session: region A (4 MiB at 1 MiB) holds the rings (each part
/// of each queue on a page of its own, queue `q` from `A + q * 32 KiB`; the used ring's
/// elements end at a page boundary, so `avail_event` has a page of its own), the device-readable
/// zone (headers, write data, indirect tables: from `A + 256 KiB`) and writable buffers (from
/// `A + 1 MiB`); region B (1 MiB at 6 MiB) and region C (1 MiB at 4 GiB: page numbers above
/// 2^20) hold writable buffers too.
pub const LOG_RAM: [(u64, u64); 3] = [
    (0x10_0000, 0x40_0000),
    (0x60_0000, 0x10_0000),
    (0x1_0000_0000, 0x10_0000),
];
/// Where guest RAM ends (what the log must cover).
pub const LOG_RAM_END: u64 = LOG_RAM[2].0 + LOG_RAM[2].1;
const LOG_RING_STRIDE: u64 = 0x8000;
const LOG_RO_ZONE: (u64, u64) = (LOG_RAM[0].0 + 0x4_0000, LOG_RAM[0].0 + 0x10_0000);

/// The virtio features a dirty-log session acks (with [`vfeat::LOG_ALL`] added while logging).
pub const LOG_SESSION_FEATURES: u64 = vfeat::VERSION_1
    | vfeat::PROTOCOL_FEATURES
    | vfeat::RING_INDIRECT_DESC
    | vfeat::BLK_SIZE_MAX
    | vfeat::BLK_SEG_MAX
    | vfeat::BLK_BLK_SIZE
    | vfeat::BLK_FLUSH
    | vfeat::BLK_MQ;

/// The protocol features a dirty-log session asks for.
pub const LOG_SESSION_PROTOCOL: u64 =
    pfeat::MQ | pfeat::REPLY_ACK | pfeat::CONFIG | pfeat::LOG_SHMFD;

/// One request of a dirty-log session.
#[derive(Clone, Debug)]
pub struct LogReq {
    pub q: usize,
    pub head: u16,
    pub what: String,
    /// The status byte.
    pub status: u64,
    /// The device-writable data buffers (read data, the GET_ID string).
    pub bufs: Vec<(u64, u64)>,
    /// For a read: the image offset it reads.
    pub read_off: Option<u64>,
}

impl LogReq {
    /// Every page the device writes when it serves the request: its buffers and status.
    pub fn pages(&self) -> std::collections::BTreeSet<u64> {
        self.bufs
            .iter()
            .chain(std::iter::once(&(self.status, 1)))
            .flat_map(|&(a, l)| crate::memory::pages_of(a, l))
            .collect()
    }
}

/// A connection and guest RAM for dirty-log tests (layout: [`LOG_RAM`]).
pub struct LogGuest {
    pub fe: Frontend,
    pub mem: GuestMemory,
    pub queues: Vec<SplitQueue>,
    /// Virtio features acked (without LOG_ALL) and protocol features.
    pub features: u64,
    pub protocol: u64,
    /// What GET_FEATURES / GET_PROTOCOL_FEATURES offered.
    pub offered: u64,
    pub offered_protocol: u64,
    /// Whether LOG_ALL was in the last SET_FEATURES.
    pub log_all: bool,
    /// The `log_guest_addr` SET_VRING_ADDR gives each queue while logging (default: the
    /// used ring's guest address, as QEMU does).
    pub vring_log_addr: Vec<u64>,
    ro: u64,
    rw: [u64; 3],
    /// Pages that hold only things the device reads (rings' descriptor tables and avail
    /// rings, headers, write data, indirect tables): no log bit may be set for them.
    pub ro_pages: std::collections::BTreeSet<u64>,
}

impl LogGuest {
    /// Guest RAM with `num_queues` queues of `queue_size` laid out (nothing sent yet).
    pub fn new(fe: Frontend, num_queues: u16, queue_size: u16) -> LogGuest {
        assert!(queue_size <= 256, "test bug: rings must fit their pages");
        let mem = GuestMemory::named("log-guest-ram", &LOG_RAM);
        let mut ro_pages = std::collections::BTreeSet::new();
        let queues: Vec<SplitQueue> = (0..num_queues)
            .map(|i| {
                let base = LOG_RAM[0].0 + LOG_RING_STRIDE * u64::from(i);
                // The used ring ends exactly where a page starts, so that `avail_event` (the
                // 2 bytes after its elements) lies alone on the next page.
                let used = (base + 0x5000 - (4 + 8 * u64::from(queue_size))) & !3;
                let q = SplitQueue::at(&mem, u32::from(i), queue_size, base, base + 0x2000, used);
                ro_pages.insert(q.desc / 4096);
                ro_pages.insert(q.avail / 4096);
                q
            })
            .collect();
        let vring_log_addr = queues.iter().map(|q| q.used).collect();
        LogGuest {
            fe,
            mem,
            queues,
            features: 0,
            protocol: 0,
            offered: 0,
            offered_protocol: 0,
            log_all: false,
            vring_log_addr,
            ro: LOG_RO_ZONE.0,
            rw: [LOG_RAM[0].0 + 0x10_0000, LOG_RAM[1].0, LOG_RAM[2].0],
            ro_pages,
        }
    }

    /// GET_FEATURES, GET/SET_PROTOCOL_FEATURES (`protocol` among those offered), GET_QUEUE_NUM,
    /// SET_OWNER, SET_FEATURES (`features` among those offered, LOG_ALL added if `log_all`
    /// and offered).
    pub fn negotiate(&mut self, features: u64, protocol: u64, log_all: bool) -> FeResult<()> {
        self.offered = self.fe.get_features()?;
        self.offered_protocol = self.fe.get_protocol_features()?;
        self.protocol = self.offered_protocol & protocol;
        self.fe.set_protocol_features(self.protocol)?;
        if self.protocol & pfeat::MQ != 0 {
            self.fe.get_queue_num()?;
        }
        self.fe.set_owner()?;
        self.features = self.offered & features & !vfeat::LOG_ALL;
        self.set_features(log_all)
    }

    /// SET_FEATURES with the acked features, LOG_ALL added if `log_all` (and offered).
    pub fn set_features(&mut self, log_all: bool) -> FeResult<()> {
        let la = if log_all {
            self.offered & vfeat::LOG_ALL
        } else {
            0
        };
        self.fe.set_features(self.features | la)?;
        self.log_all = la != 0;
        Ok(())
    }

    /// SET_MEM_TABLE with the honest table.
    pub fn share_memory(&self) -> FeResult<()> {
        let (table, fds) = self.mem.table();
        self.fe.set_mem_table(&table, &fds)
    }

    /// SET_VRING_ADDR for queue `i`, with VHOST_VRING_F_LOG and the queue's log address if
    /// `log`.
    pub fn set_vring_addr(&self, i: usize, log: bool) -> FeResult<()> {
        let q = &self.queues[i];
        let (flags, la) = if log {
            (crate::frontend::VRING_F_LOG, self.vring_log_addr[i])
        } else {
            (0, 0)
        };
        self.fe.set_vring_addr_log(
            q.index,
            flags,
            self.mem.uaddr(q.desc),
            self.mem.uaddr(q.used),
            self.mem.uaddr(q.avail),
            la,
        )
    }

    /// Start every queue (NUM, BASE, ADDR, KICK, CALL, ENABLE), SET_VRING_ADDR with the log
    /// flag if `log`.
    pub fn start_queues(&self, log: bool) -> FeResult<()> {
        for (i, q) in self.queues.iter().enumerate() {
            self.fe.set_vring_num(q.index, u32::from(q.size))?;
            self.fe.set_vring_base(q.index, u32::from(q.avail_idx))?;
            self.set_vring_addr(i, log)?;
            self.fe
                .set_vring_fd(code::SET_VRING_KICK, q.index, Some(q.kick.as_raw_fd()))?;
            self.fe
                .set_vring_fd(code::SET_VRING_CALL, q.index, Some(q.call.as_raw_fd()))?;
            self.fe.set_vring_enable(q.index, true)?;
        }
        Ok(())
    }

    /// The whole honest setup in QEMU's order, logging off.
    pub fn setup(&mut self, features: u64, protocol: u64) -> FeResult<()> {
        self.negotiate(features, protocol, false)?;
        self.share_memory()?;
        self.start_queues(false)
    }

    /// What QEMU does when migration starts on a running device: SET_LOG_BASE (waiting for
    /// the backend's reply), SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag for
    /// every queue. Returns the SET_LOG_BASE reply.
    pub fn start_logging(
        &mut self,
        log: &crate::memory::DirtyLog,
    ) -> FeResult<crate::frontend::Msg> {
        let reply = self.fe.set_log_base(log.size, log.offset, &[log.fd()])?;
        self.set_features(true)?;
        for i in 0..self.queues.len() {
            self.set_vring_addr(i, true)?;
        }
        Ok(reply)
    }

    /// What QEMU does when migration ends or is cancelled: SET_FEATURES without LOG_ALL,
    /// SET_VRING_ADDR without the log flag for every queue.
    pub fn stop_logging(&mut self) -> FeResult<()> {
        self.set_features(false)?;
        for i in 0..self.queues.len() {
            self.set_vring_addr(i, false)?;
        }
        Ok(())
    }

    /// `data` as device-readable bytes in the read-only zone: 16-byte aligned, page aligned
    /// from 512 bytes on (write data a backend can send to the disk with O_DIRECT).
    pub fn ro_put(&mut self, data: &[u8]) -> u64 {
        let align = if data.len() >= 512 { 4096 } else { 16 };
        let a = self.ro.next_multiple_of(align);
        assert!(
            a + data.len() as u64 <= LOG_RO_ZONE.1,
            "test bug: read-only zone exhausted"
        );
        self.ro = a + data.len() as u64;
        self.mem.write(a, data);
        for p in crate::memory::pages_of(a, data.len() as u64) {
            self.ro_pages.insert(p);
        }
        a
    }

    /// A device-writable buffer of `len` bytes in region `region` (0..3), `in_page` bytes
    /// into pages of its own (no other buffer shares them), filled with 0x5a.
    pub fn rw_buf(&mut self, region: usize, len: u64, in_page: u64) -> u64 {
        let start = self.rw[region].next_multiple_of(4096);
        let a = start + in_page;
        let end = (a + len).next_multiple_of(4096);
        assert!(
            end <= LOG_RAM[region].0 + LOG_RAM[region].1,
            "test bug: writable zone of region {region} exhausted"
        );
        self.rw[region] = end;
        self.mem.fill(a, len as usize, 0x5a);
        a
    }

    /// Start handing out writable buffers from the beginning of each region again (once
    /// every request using the earlier ones was answered).
    pub fn rw_reset(&mut self) {
        self.rw = [LOG_RAM[0].0 + 0x10_0000, LOG_RAM[1].0, LOG_RAM[2].0];
    }

    /// Lay out a request on queue `q` (header, `out` data, writable `bufs`, status) as a
    /// chain or an indirect table, and push it (not yet published).
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        out: &[u8],
        bufs: &[(u64, u64)],
        indirect: bool,
        what: &str,
    ) -> LogReq {
        let hdr = self.ro_put(&blk::header(t, sector));
        let mut segs = vec![Desc::r(hdr, 16)];
        if !out.is_empty() {
            let d = self.ro_put(out);
            segs.push(Desc::r(d, out.len() as u32));
        }
        for &(a, l) in bufs {
            segs.push(Desc::w(a, l as u32));
        }
        let status = self.rw_buf(0, 1, 0x7ff);
        self.mem.write(status, &[0xff]);
        segs.push(Desc::w(status, 1));
        let head = if indirect {
            let table = self.ro_put(&vec![0u8; 16 * segs.len()]);
            self.queues[q].indirect(&self.mem, table, &segs)
        } else {
            self.queues[q].chain(&self.mem, &segs)
        };
        self.queues[q].push(&self.mem, head);
        LogReq {
            q,
            head,
            what: format!("queue {q}: {what}"),
            status,
            bufs: bufs.to_vec(),
            read_off: (t == blk::T_IN).then_some(sector * blk::SECTOR),
        }
    }

    /// Publish and kick queue `q`.
    pub fn kick(&self, q: usize) {
        self.queues[q].publish(&self.mem);
        self.queues[q].kick();
    }

    /// Wait for every request of `reqs` to be answered (in any order, on their queues),
    /// calling `each` as soon as each one's used element is seen. Err with a description if
    /// one is not answered within `timeout`, or a used element answers none of them.
    pub fn complete(
        &mut self,
        reqs: &[LogReq],
        timeout: Duration,
        mut each: impl FnMut(&GuestMemory, &LogReq, Used),
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut done = vec![false; reqs.len()];
        while let Some(q) = reqs.iter().zip(&done).find(|(_, d)| !**d).map(|(r, _)| r.q) {
            let sock = self.fe.as_raw_fd();
            let Some(u) = self.queues[q].wait_used(&self.mem, deadline, Some(sock)) else {
                let left: Vec<&str> = reqs
                    .iter()
                    .zip(&done)
                    .filter(|(_, d)| !**d)
                    .map(|(r, _)| r.what.as_str())
                    .collect();
                return Err(format!("not answered within {timeout:?}: {left:?}"));
            };
            let Some(i) = reqs
                .iter()
                .enumerate()
                .position(|(i, r)| !done[i] && r.q == q && u32::from(r.head) == u.id)
            else {
                return Err(format!(
                    "queue {q}: used element {{id {}, len {}}} answers no request pending",
                    u.id, u.len
                ));
            };
            done[i] = true;
            each(&self.mem, &reqs[i], u);
        }
        Ok(())
    }

    /// Turn into a [`Session`] (to hand to [`Rig::keep_session`]).
    pub fn into_session(self) -> Session {
        let heap = LOG_RAM[1].0;
        let mut s = Session::from_parts(self.fe, self.mem, self.queues, heap);
        s.features = self.features;
        s.protocol = self.protocol;
        s
    }
}
