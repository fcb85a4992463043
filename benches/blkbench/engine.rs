//! The closed-loop load generator. One engine for every target: the same file is driven either
//! natively through blkio's `io_uring` driver (O_DIRECT) or through any vhost-user-blk socket
//! through blkio's `virtio-blk-vhost-user` driver. Each queue gets one thread that keeps
//! exactly `qd` requests in flight (a new request is issued the moment one completes), like
//! fio's `iodepth` per job with one job per queue.
//!
//! How the refills reach the device is the client's [`Pattern`]: one submission (one kick, one
//! `io_uring_enter`) per request, groups of N, or the whole round of refills at once.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};

use crate::hist::Histogram;
use crate::procstat;

/// How long a queue may go without a single completion before the run is declared stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a client hands its requests to the device. blkio queues a request on `read`/`write`
/// (the virtio driver publishes it in the avail ring right away) and submits on `do_io`: the
/// io_uring driver with one `io_uring_enter`, the virtio driver with one kick of the queue's
/// eventfd (unless the device suppressed notifications with `VIRTIO_RING_F_EVENT_IDX`, as a
/// guest driver would see it too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// Submit every N refilled requests (`Batch(1)`: each request on its own, as its completion
    /// frees a slot, like fio's default `iodepth_batch_submit=1` or a guest virtio-blk driver
    /// without plugging). A group that is not full when the reaped completions run out is
    /// submitted by the `do_io` that then waits, so a request never waits for a later one.
    Batch(u32),
    /// Refill every completion that one `do_io` returned, then submit them all together with
    /// the wait for the next completion (blkbench's pattern before the patterns existed).
    Round,
}

impl Pattern {
    pub const PER_REQUEST: Pattern = Pattern::Batch(1);

    /// `1`, `per-request`, `8`, `round`.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        match s.trim() {
            "round" => Ok(Pattern::Round),
            "per-request" => Ok(Pattern::PER_REQUEST),
            n => n
                .parse()
                .ok()
                .filter(|&n| (1..=1024).contains(&n))
                .map(Pattern::Batch)
                .ok_or_else(|| {
                    format!("client pattern '{n}': use round, per-request or N in 1..=1024")
                }),
        }
    }

    /// `per-request`, `batch 8`, `round`.
    pub fn name(self) -> String {
        match self {
            Pattern::Batch(1) => "per-request".into(),
            Pattern::Batch(n) => format!("batch {n}"),
            Pattern::Round => "round".into(),
        }
    }

    /// At QD1 every pattern submits the one request as its completion frees the slot, with
    /// the next wait: the patterns are the same client there.
    pub fn effective(self, qd: u32) -> Pattern {
        match self {
            _ if qd == 1 => Pattern::PER_REQUEST,
            Pattern::Batch(n) if n >= qd => Pattern::Round,
            p => p,
        }
    }
}

/// One point of the matrix: access pattern, block size, depth, queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Random offsets (else sequential, each queue streaming through its own slice of the disk).
    pub random: bool,
    /// Share of reads in percent: 100 = read only, 0 = write only, else mixed.
    pub read_pct: u8,
    /// Block size in bytes.
    pub bs: u64,
    /// Requests in flight per queue.
    pub qd: u32,
    /// Number of queues (one thread each).
    pub queues: u32,
    /// Polled completions (fio's `hipri`): the client spins on its queue instead of sleeping
    /// until a completion wakes it, natively on the io_uring completion ring, through vhost-user
    /// on the used ring (the backend's call eventfd then wakes nobody).
    pub polled: bool,
    /// How the client submits its refills.
    pub pattern: Pattern,
}

impl Workload {
    pub const fn new(random: bool, read_pct: u8, bs: u64, qd: u32) -> Workload {
        Workload {
            random,
            read_pct,
            bs,
            qd,
            queues: 1,
            polled: false,
            pattern: Pattern::Round,
        }
    }

    /// The same workload with another client pattern.
    pub const fn with_pattern(self, pattern: Pattern) -> Workload {
        Workload { pattern, ..self }
    }

    /// The workload without its client pattern (rows that differ only in the pattern share it):
    /// what the best native baseline is chosen over.
    pub const fn base(self) -> Workload {
        self.with_pattern(Pattern::Round)
    }

    /// The same workload with polled completions.
    pub const fn polled(self) -> Workload {
        Workload {
            polled: true,
            ..self
        }
    }

    /// fio's name for the access pattern.
    pub fn rw_name(&self) -> &'static str {
        match (self.random, self.read_pct) {
            (true, 100) => "randread",
            (true, 0) => "randwrite",
            (true, _) => "randrw",
            (false, 100) => "read",
            (false, 0) => "write",
            (false, _) => "rw",
        }
    }

    pub fn is_sequential(&self) -> bool {
        !self.random
    }

    /// Human-readable: `4k randread QD32`, `4k randrw 70/30 QD16`, `128k seq read QD8 ×2q`.
    pub fn label(&self) -> String {
        let pattern = match (self.random, self.read_pct) {
            (true, 100) => "randread".to_string(),
            (true, 0) => "randwrite".to_string(),
            (true, r) => format!("randrw {r}/{}", 100 - r),
            (false, 100) => "seq read".to_string(),
            (false, 0) => "seq write".to_string(),
            (false, r) => format!("seq rw {r}/{}", 100 - r),
        };
        let mut s = format!("{} {pattern} QD{}", fmt_size(self.bs), self.qd);
        if self.queues > 1 {
            s.push_str(&format!(" ×{}q", self.queues));
        }
        if self.polled {
            s.push_str(" polled");
        }
        s
    }

    /// Parse `rw=randread,bs=4k,qd=32[,queues=2][,rwmixread=70][,hipri=1][,batch=1|N|round]`
    /// (fio's names, and `batch` for the client pattern, round when absent).
    pub fn parse(spec: &str) -> Result<Workload, String> {
        let mut w = Workload::new(true, 100, 4096, 1);
        let mut mix: Option<u8> = None;
        let mut rw_seen = false;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("job '{spec}': '{part}' is not key=value"))?;
            match k {
                "rw" => {
                    rw_seen = true;
                    (w.random, w.read_pct) = match v {
                        "randread" => (true, 100),
                        "randwrite" => (true, 0),
                        "randrw" => (true, 50),
                        "read" => (false, 100),
                        "write" => (false, 0),
                        "rw" => (false, 50),
                        _ => {
                            return Err(format!(
                                "job '{spec}': rw={v}: use randread, randwrite, randrw, read, write or rw"
                            ))
                        }
                    }
                }
                "bs" => {
                    w.bs = parse_size(v).map_err(|e| format!("job '{spec}': bs: {e}"))?;
                    if w.bs == 0 || !w.bs.is_multiple_of(512) {
                        return Err(format!("job '{spec}': bs must be a multiple of 512"));
                    }
                }
                "qd" | "iodepth" => {
                    w.qd = v
                        .parse()
                        .ok()
                        .filter(|&n| (1..=1024).contains(&n))
                        .ok_or_else(|| format!("job '{spec}': qd must be 1..=1024"))?
                }
                "queues" | "numjobs" => {
                    w.queues = v
                        .parse()
                        .ok()
                        .filter(|&n| (1..=64).contains(&n))
                        .ok_or_else(|| format!("job '{spec}': queues must be 1..=64"))?
                }
                "rwmixread" => {
                    mix = Some(
                        v.parse()
                            .ok()
                            .filter(|&n| n <= 100)
                            .ok_or_else(|| format!("job '{spec}': rwmixread must be 0..=100"))?,
                    )
                }
                "batch" => {
                    w.pattern = Pattern::parse(v).map_err(|e| format!("job '{spec}': {e}"))?
                }
                "hipri" => {
                    w.polled = match v {
                        "1" => true,
                        "0" => false,
                        _ => return Err(format!("job '{spec}': hipri must be 0 or 1")),
                    }
                }
                _ => {
                    return Err(format!(
                    "job '{spec}': unknown key '{k}' (rw, bs, qd, queues, rwmixread, hipri, batch)"
                ))
                }
            }
        }
        if !rw_seen {
            return Err(format!("job '{spec}': rw= is required"));
        }
        if let Some(m) = mix {
            if !matches!(w.read_pct, 0 | 100) {
                w.read_pct = m;
            } else {
                return Err(format!(
                    "job '{spec}': rwmixread only applies to rw=randrw or rw=rw"
                ));
            }
        }
        Ok(w)
    }
}

/// `4096` -> `4k`, `131072` -> `128k`, `1048576` -> `1M`.
pub fn fmt_size(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1024 && b.is_multiple_of(1024) {
        format!("{}k", b >> 10)
    } else {
        format!("{b}")
    }
}

/// `4k`, `128K`, `1M`, `1G`, `512` -> bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(format!("'{s}': unknown suffix (k, M, G, T)")),
            };
            (&s[..s.len() - 1], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 4k, 1G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Where the I/O goes.
pub enum Endpoint<'a> {
    /// The image itself, through blkio's io_uring driver with O_DIRECT.
    File(&'a Path),
    /// A vhost-user-blk socket.
    VhostUser(&'a Path),
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// What one run of one workload on one target measured.
#[derive(Clone)]
pub struct RunResult {
    /// I/Os completed inside the measurement window.
    pub ios: u64,
    pub bytes: u64,
    /// Length of the measurement window.
    pub secs: f64,
    pub mean_ns: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub p999_ns: f64,
    /// The whole latency distribution (absent for fio, which reports percentiles only).
    pub hist: Option<Histogram>,
    /// CPU time (user + system) the backend process spent in the window.
    pub backend_cpu_s: Option<f64>,
    /// CPU time the load generator itself spent in the window.
    pub client_cpu_s: Option<f64>,
}

impl RunResult {
    pub fn from_hist(
        hist: Histogram,
        bytes: u64,
        secs: f64,
        backend_cpu_s: Option<f64>,
        client_cpu_s: Option<f64>,
    ) -> RunResult {
        RunResult {
            ios: hist.count(),
            bytes,
            secs,
            mean_ns: hist.mean(),
            p50_ns: hist.quantile(0.5) as f64,
            p99_ns: hist.quantile(0.99) as f64,
            p999_ns: hist.quantile(0.999) as f64,
            hist: Some(hist),
            backend_cpu_s,
            client_cpu_s,
        }
    }

    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.secs
    }

    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / self.secs / (1024.0 * 1024.0)
    }

    /// Backend CPU per I/O in µs.
    pub fn backend_us_per_io(&self) -> Option<f64> {
        let cpu = self.backend_cpu_s?;
        (self.ios > 0).then(|| cpu * 1e6 / self.ios as f64)
    }

    pub fn client_us_per_io(&self) -> Option<f64> {
        let cpu = self.client_cpu_s?;
        (self.ios > 0).then(|| cpu * 1e6 / self.ios as f64)
    }
}

/// The virtqueue size to negotiate for a depth: blkio's virtio driver uses three descriptors
/// per request (no indirect descriptors), so `qd` requests need `3 * qd` ring entries.
pub fn vq_size_for(qd: u32) -> u32 {
    (3 * qd).next_power_of_two().clamp(256, 1024)
}

fn berr(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("blkio {what}: {e}")
}

fn round_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// Run `w` against `ep` for warm-up + duration; `backend_pid` is sampled for CPU time.
pub fn run(
    ep: &Endpoint,
    w: &Workload,
    timing: &Timing,
    backend_pid: Option<i32>,
) -> Result<RunResult, String> {
    let (driver, path, file) = match ep {
        Endpoint::File(p) => ("io_uring", *p, true),
        Endpoint::VhostUser(p) => ("virtio-blk-vhost-user", *p, false),
    };
    let path_str = path
        .to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", path.display()))?;
    let mut b = Blkio::new(driver).map_err(berr("new"))?;
    b.set_str("path", path_str).map_err(berr("set path"))?;
    if file {
        b.set_bool("direct", true).map_err(berr("set direct"))?;
    }
    b.connect()
        .map_err(|e| format!("blkio connect to {}: {e}", path.display()))?;
    let capacity = b.get_u64("capacity").map_err(berr("get capacity"))?;
    b.set_i32("num-queues", w.queues as i32)
        .map_err(berr("set num-queues"))?;
    if file {
        if w.qd > 128 {
            b.set_i32("num-entries", w.qd as i32)
                .map_err(berr("set num-entries"))?;
        }
    } else {
        b.set_i32("queue-size", vq_size_for(w.qd) as i32)
            .map_err(berr("set queue-size"))?;
    }
    let req_align = b.get_i32("request-alignment").map_err(berr("get"))? as u64;
    if !w.bs.is_multiple_of(req_align.max(1)) {
        return Err(format!(
            "block size {} is not a multiple of the request alignment {req_align}",
            w.bs
        ));
    }
    let blocks_total = capacity / w.bs;
    if blocks_total < u64::from(w.queues) {
        return Err(format!(
            "disk of {capacity} bytes is too small for {}",
            w.label()
        ));
    }
    let started = b.start().map_err(berr("start"))?;
    if started.queues.len() != w.queues as usize {
        return Err(format!(
            "asked for {} queues, got {}",
            w.queues,
            started.queues.len()
        ));
    }
    let page = 4096u64;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(berr("get mem-region-alignment"))?
        .max(page);
    let buf_align = b.get_i32("buf-alignment").map_err(berr("get"))?.max(1) as u64;
    if !w.bs.is_multiple_of(buf_align) {
        return Err(format!(
            "block size {} violates buf-alignment {buf_align}",
            w.bs
        ));
    }

    // One shared-memory region per queue holding `qd` buffers; the backend maps it.
    let mut bases = Vec::new();
    let region_len = round_up(u64::from(w.qd) * w.bs, align);
    for qi in 0..w.queues {
        let region = b
            .alloc_mem_region(region_len as usize)
            .map_err(berr("alloc_mem_region"))?;
        b.map_mem_region(&region).map_err(berr("map_mem_region"))?;
        // SAFETY: the region was just allocated by blkio: a fresh mapping of `region.len`
        // writable bytes that nothing else references yet.
        let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        let mut rng = Rng::new(0x5eed ^ u64::from(qi));
        for chunk in buf.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        bases.push(region.addr);
    }

    let start = Instant::now() + Duration::from_millis(5);
    let window = Window {
        start,
        measure: start + timing.warmup,
        end: start + timing.warmup + timing.duration,
    };
    let slice_blocks = blocks_total / u64::from(w.queues);
    let (workers, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = started
            .queues
            .into_iter()
            .zip(&bases)
            .enumerate()
            .map(|(qi, (q, &base))| {
                let wl = *w;
                let range = if w.random {
                    (0, blocks_total)
                } else {
                    (qi as u64 * slice_blocks, slice_blocks)
                };
                s.spawn(move || worker(q, base, wl, range, qi as u64, window))
            })
            .collect();
        sleep_until(window.measure);
        let b0 = backend_pid.and_then(procstat::cpu_seconds);
        let c0 = procstat::self_cpu_seconds();
        sleep_until(window.end);
        let b1 = backend_pid.and_then(procstat::cpu_seconds);
        let c1 = procstat::self_cpu_seconds();
        let workers: Vec<Result<Histogram, String>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("worker thread panicked".into()))
            })
            .collect();
        let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        (workers, (diff(b0, b1), diff(c0, c1)))
    });
    let mut hist = Histogram::new();
    for r in workers {
        hist.merge(&r?);
    }
    if hist.count() == 0 {
        return Err("no I/O completed in the measurement window".into());
    }
    let bytes = hist.count() * w.bs;
    Ok(RunResult::from_hist(
        hist,
        bytes,
        timing.duration.as_secs_f64(),
        cpu.0,
        cpu.1,
    ))
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure: Instant,
    end: Instant,
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// splitmix64: fast, and good enough to scatter offsets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Offsets and operations for one queue.
struct Issuer {
    rng: Rng,
    w: Workload,
    /// First block and number of blocks this queue may touch.
    first: u64,
    blocks: u64,
    next_seq: u64,
    base: usize,
}

impl Issuer {
    fn submit(&mut self, q: &mut Blkioq, slot: usize) {
        let bs = self.w.bs;
        let block = if self.w.random {
            self.first + self.rng.below(self.blocks)
        } else {
            let b = self.first + self.next_seq;
            self.next_seq = (self.next_seq + 1) % self.blocks;
            b
        };
        let read = match self.w.read_pct {
            100 => true,
            0 => false,
            pct => self.rng.below(100) < u64::from(pct),
        };
        let buf = (self.base + slot * bs as usize) as *mut u8;
        if read {
            q.read(block * bs, buf, bs as usize, slot, ReqFlags::empty());
        } else {
            q.write(block * bs, buf, bs as usize, slot, ReqFlags::empty());
        }
    }
}

fn worker(
    mut q: Blkioq,
    base: usize,
    w: Workload,
    (first, blocks): (u64, u64),
    qi: u64,
    win: Window,
) -> Result<Histogram, String> {
    let qd = w.qd as usize;
    let mut issuer = Issuer {
        rng: Rng::new(0xb10c ^ (qi << 32) ^ w.bs ^ u64::from(w.qd)),
        w,
        first,
        blocks,
        next_seq: 0,
        base,
    };
    let mut comps: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let mut hist = Histogram::new();
    sleep_until(win.start);
    // Requests queued in blkio since the last submission, and how many make a group.
    let group = match w.pattern {
        Pattern::Batch(n) => n as usize,
        Pattern::Round => usize::MAX,
    };
    let mut queued = 0usize;
    let mut sent = vec![Instant::now(); qd];
    for (slot, t) in sent.iter_mut().enumerate() {
        *t = Instant::now();
        issuer.submit(&mut q, slot);
        queued += 1;
        if queued >= group && slot + 1 < qd {
            submit_queued(&mut q)?;
            queued = 0;
        }
    }
    let mut in_flight = qd;
    while in_flight > 0 {
        let n = if w.polled {
            poll_completions(&mut q, &mut comps)?
        } else {
            let mut timeout = STALL_TIMEOUT;
            q.do_io(&mut comps, 1, Some(&mut timeout), None)
                .map_err(|e| {
                    if e.errno() == Errno::TIME {
                        format!("no completion within {STALL_TIMEOUT:?}: the backend stalled")
                    } else {
                        format!("blkio do_io: {e}")
                    }
                })?
        };
        let now = Instant::now();
        let measuring = now >= win.measure && now < win.end;
        for (i, c) in comps[..n].iter().enumerate() {
            // SAFETY: do_io() initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                let err = std::io::Error::from_raw_os_error(-c.ret);
                return Err(format!("I/O error in {}: {err}", w.label()));
            }
            let slot = c.user_data;
            if slot >= qd {
                return Err(format!("completion for unknown request {slot}"));
            }
            if measuring {
                hist.record(now.duration_since(sent[slot]).as_nanos() as u64);
            }
            if now < win.end {
                sent[slot] = now;
                issuer.submit(&mut q, slot);
                queued += 1;
                // A full group goes out now; the last one (full or not) goes out with the
                // wait for the next completion, which is the same single submission.
                if queued >= group && i + 1 < n {
                    submit_queued(&mut q)?;
                    queued = 0;
                }
            } else {
                in_flight -= 1;
            }
        }
        queued = 0;
    }
    Ok(hist)
}

/// Submit what is queued without reaping or waiting: one `io_uring_enter` natively, one kick
/// (if the device wants notifications) through vhost-user.
fn submit_queued(q: &mut Blkioq) -> Result<(), String> {
    q.do_io(&mut [], 0, None, None)
        .map(|_| ())
        .map_err(|e| format!("blkio do_io (submit): {e}"))
}

/// Spin on the queue (submitting what is queued) until at least one request completes.
fn poll_completions(
    q: &mut Blkioq,
    comps: &mut [MaybeUninit<Completion>],
) -> Result<usize, String> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let n = q
            .do_io(comps, 0, None, None)
            .map_err(|e| format!("blkio do_io: {e}"))?;
        if n > 0 {
            return Ok(n);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && start.elapsed() > STALL_TIMEOUT {
            return Err(format!(
                "no completion within {STALL_TIMEOUT:?}: the backend stalled"
            ));
        }
        std::hint::spin_loop();
    }
}

/// Parsing self-check for test mode.
pub fn self_check() -> Result<(), String> {
    let w = Workload::parse("rw=randrw,bs=4k,qd=16,rwmixread=70")?;
    if w != (Workload::new(true, 70, 4096, 16)) || w.label() != "4k randrw 70/30 QD16" {
        return Err(format!("workload parsing: {w:?}"));
    }
    let w = Workload::parse("rw=read,bs=128k,qd=8,queues=2")?;
    if w.label() != "128k seq read QD8 ×2q" || w.rw_name() != "read" {
        return Err(format!("workload label: {}", w.label()));
    }
    let w = Workload::parse("rw=randread,bs=4k,qd=1,hipri=1")?;
    if w != Workload::new(true, 100, 4096, 1).polled() || w.label() != "4k randread QD1 polled" {
        return Err(format!("polled workload: {w:?} {}", w.label()));
    }
    let w = Workload::parse("rw=randwrite,bs=4k,qd=32,batch=1")?;
    if w.pattern != Pattern::PER_REQUEST || w.base() != Workload::new(true, 0, 4096, 32) {
        return Err(format!("batch=1: {w:?}"));
    }
    if Workload::parse("rw=read,batch=round")?.pattern != Pattern::Round
        || Pattern::parse("per-request")? != Pattern::Batch(1)
        || Pattern::Batch(4).name() != "batch 4"
        || Pattern::Round.effective(1) != Pattern::PER_REQUEST
        || Pattern::Batch(32).effective(32) != Pattern::Round
        || Pattern::Batch(8).effective(32) != Pattern::Batch(8)
    {
        return Err("client pattern parsing".into());
    }
    for bad in [
        "rw=read,batch=0",
        "rw=read,batch=some",
        "rw=read,hipri=2",
        "rw=foo",
        "bs=4k",
        "rw=read,bs=1000",
        "rw=read,qd=0",
        "rw=read,rwmixread=5",
    ] {
        if Workload::parse(bad).is_ok() {
            return Err(format!("'{bad}' should not parse"));
        }
    }
    let mut r = Rng::new(1);
    if (0..10_000).any(|_| r.below(7) >= 7) {
        return Err("rng out of range".into());
    }
    Ok(())
}
