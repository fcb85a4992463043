//! I/O statistics: what each queue's worker counts, the snapshot the stats thread takes, and
//! its encoding in the Prometheus text format (with `prometheus-client`).
//!
//! Cost on the data path: each queue owns one [`QueueCounters`] block (aligned so that two
//! queues never share a cache line). Only the thread that holds the queue's state lock writes
//! it (the worker, or the control thread while it holds that lock), so an increment is a plain
//! load and store of an atomic with `Relaxed` ordering: no locked instruction, no allocation,
//! no syscall. The stats thread reads the same atomics at any time without taking any lock, so
//! a scrape never makes a worker wait, and a busy worker never holds up a scrape. A snapshot
//! taken while requests complete may mix counters from one instant and the next; every counter
//! is monotonic, which is all Prometheus needs.
//!
//! The blocks live as long as the process (they are handed to every connection's queues), so
//! the counters are totals since the daemon started, as Prometheus expects of a `_total`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::request::Reason;

/// What a completed request asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpKind {
    #[default]
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

pub const N_OPS: usize = 6;

impl OpKind {
    pub const ALL: [OpKind; N_OPS] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
        OpKind::GetId,
    ];

    /// The `op` label.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::GetId => "get_id",
        }
    }
}

/// Why a request failed (the `kind` label of the error counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed: framing, header, alignment, segment count or size, discard payload.
    Invalid,
    /// Sectors past the end of the disk.
    OutOfRange,
    /// A write, discard or write-zeroes on a read-only disk.
    ReadOnly,
    /// A request type or flag the device does not offer or the driver did not negotiate
    /// (answered `VIRTIO_BLK_S_UNSUPP`).
    Unsupported,
    /// A buffer outside guest RAM.
    BadAddress,
    /// The host failed the I/O (an error or a short transfer), or it could not be submitted.
    Io,
    /// The kernel refused an SQE (`-EACCES`: the ring's allowlist stopped it). A security
    /// incident: ringfence never builds such an SQE on purpose.
    Refused,
    /// A descriptor chain that could not even be answered (its head out of range, or already
    /// in flight): no used-ring entry.
    Dropped,
}

pub const N_ERRORS: usize = 8;

impl ErrorKind {
    pub const ALL: [ErrorKind; N_ERRORS] = [
        ErrorKind::Invalid,
        ErrorKind::OutOfRange,
        ErrorKind::ReadOnly,
        ErrorKind::Unsupported,
        ErrorKind::BadAddress,
        ErrorKind::Io,
        ErrorKind::Refused,
        ErrorKind::Dropped,
    ];

    /// The `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::BadAddress => "bad_address",
            ErrorKind::Io => "io",
            ErrorKind::Refused => "refused",
            ErrorKind::Dropped => "dropped",
        }
    }
}

impl From<Reason> for ErrorKind {
    fn from(r: Reason) -> Self {
        match r {
            Reason::OutOfRange => ErrorKind::OutOfRange,
            Reason::ReadOnly => ErrorKind::ReadOnly,
            Reason::NotNegotiated | Reason::UnknownType(_) | Reason::BadFlags => {
                ErrorKind::Unsupported
            }
            Reason::Unreadable => ErrorKind::BadAddress,
            Reason::ShortHeader
            | Reason::ReadableAfterWritable
            | Reason::ReadableData
            | Reason::NoData
            | Reason::Unaligned
            | Reason::TooManySegments
            | Reason::SegmentTooLarge
            | Reason::BadDiscardPayload => ErrorKind::Invalid,
        }
    }
}

/// Finite latency buckets: upper bounds of 1 µs × 2^i for i in 0..21, from 1 µs to about
/// 1.05 s; index `LATENCY_BUCKETS` counts what took longer.
pub const LATENCY_BUCKETS: usize = 21;

/// The bucket of a latency of `ns` nanoseconds: the smallest i with ns <= 1000 × 2^i, or
/// `LATENCY_BUCKETS` beyond the last bound. A division by a constant and a leading-zeros
/// count: no loop, no floating point.
#[inline]
pub fn latency_bucket(ns: u64) -> usize {
    if ns <= 1000 {
        return 0;
    }
    // ceil(log2(ceil(ns / 1000))) for ns > 1000, computed as the bit length of (ns - 1) / 1000.
    let i = (64 - ((ns - 1) / 1000).leading_zeros()) as usize;
    i.min(LATENCY_BUCKETS)
}

/// Upper bound of finite bucket `i`, in seconds.
pub fn bucket_upper_seconds(i: usize) -> f64 {
    1e-6 * (1u64 << i) as f64
}

/// A counter of one queue. Written by one thread at a time (the holder of the queue's state
/// lock), read by anyone.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `n`. A plain load and store: correct because the queue's state lock admits one
    /// writer at a time; readers see either the old or the new value.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The counters of one operation.
#[derive(Debug, Default)]
pub struct OpCounters {
    /// Requests completed to the guest (successfully or not).
    pub requests: Counter,
    /// Bytes of the requests that succeeded (data read or written; for discard and
    /// write-zeroes, the bytes of the ranges; for GET_ID, the bytes of the serial written).
    pub bytes: Counter,
    /// Sum of the latencies of the completed requests, in nanoseconds.
    pub latency_sum_ns: Counter,
    /// Latency histogram (not cumulative): see [`latency_bucket`].
    pub latency: [Counter; LATENCY_BUCKETS + 1],
}

/// Everything one queue counts.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueCounters {
    pub ops: [OpCounters; N_OPS],
    pub errors: [Counter; N_ERRORS],
    /// Requests in flight (a gauge, set whenever a request starts or completes).
    pub inflight: Counter,
    /// Times the worker was woken (a guest kick or a completion signal).
    pub wakeups: Counter,
    /// Events (new requests or completions) the polling window found: each one a wakeup saved.
    pub poll_hits: Counter,
    /// Times the guest was signalled (its call eventfd written) about new used entries.
    pub notifications: Counter,
    /// SQEs handed to the kernel, and the `io_uring_enter` calls that carried them.
    pub sqes: Counter,
    pub enters: Counter,
    /// Completions the kernel refused with `-EACCES` (see [`ErrorKind::Refused`]).
    pub kernel_refusals: Counter,
    /// Write SQEs that carried RWF_DSYNC (writethrough).
    pub dsync_writes: Counter,
    /// fdatasync SQEs (FLUSH, and writethrough discard/write-zeroes).
    pub fdatasyncs: Counter,
    /// Requests that ended without completing an operation: refused by the parser, dropped,
    /// or given up on (also counted in `errors`).
    pub without_op: Counter,
    /// Queue stops (GET_VRING_BASE, RESET_DEVICE) that waited longer than the warning interval
    /// for requests in flight.
    pub slow_stops: Counter,
}

impl QueueCounters {
    /// One request of `op` completed: `bytes` transferred if it succeeded, after `latency_ns`;
    /// `error` says why it failed.
    #[inline]
    pub fn complete(&self, op: OpKind, bytes: u64, latency_ns: u64, error: Option<ErrorKind>) {
        let c = &self.ops[op as usize];
        c.requests.add(1);
        c.latency_sum_ns.add(latency_ns);
        c.latency[latency_bucket(latency_ns)].add(1);
        match error {
            None => c.bytes.add(bytes),
            Some(e) => self.errors[e as usize].add(1),
        }
    }

    /// `n` requests that failed without completing an operation (refused by the parser,
    /// dropped, given up on).
    #[inline]
    pub fn error(&self, e: ErrorKind, n: u64) {
        self.errors[e as usize].add(n);
        self.without_op.add(n);
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let mut s = QueueSnapshot::default();
        for (o, c) in s.ops.iter_mut().zip(&self.ops) {
            o.requests = c.requests.get();
            o.bytes = c.bytes.get();
            o.latency_sum_ns = c.latency_sum_ns.get();
            for (b, l) in o.latency.iter_mut().zip(&c.latency) {
                *b = l.get();
            }
        }
        for (e, c) in s.errors.iter_mut().zip(&self.errors) {
            *e = c.get();
        }
        s.inflight = self.inflight.get();
        s.wakeups = self.wakeups.get();
        s.poll_hits = self.poll_hits.get();
        s.notifications = self.notifications.get();
        s.sqes = self.sqes.get();
        s.enters = self.enters.get();
        s.kernel_refusals = self.kernel_refusals.get();
        s.dsync_writes = self.dsync_writes.get();
        s.fdatasyncs = self.fdatasyncs.get();
        s.without_op = self.without_op.get();
        s.slow_stops = self.slow_stops.get();
        s
    }
}

/// A plain copy of one operation's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    pub requests: u64,
    pub bytes: u64,
    pub latency_sum_ns: u64,
    pub latency: [u64; LATENCY_BUCKETS + 1],
}

/// A plain copy of a queue's counters (or of their sum over queues).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub ops: [OpSnapshot; N_OPS],
    pub errors: [u64; N_ERRORS],
    pub inflight: u64,
    pub wakeups: u64,
    pub poll_hits: u64,
    pub notifications: u64,
    pub sqes: u64,
    pub enters: u64,
    pub kernel_refusals: u64,
    pub dsync_writes: u64,
    pub fdatasyncs: u64,
    pub without_op: u64,
    pub slow_stops: u64,
}

impl QueueSnapshot {
    /// Add `o` to `self` (totals over queues).
    pub fn accumulate(&mut self, o: &QueueSnapshot) {
        for (a, b) in self.ops.iter_mut().zip(&o.ops) {
            a.requests += b.requests;
            a.bytes += b.bytes;
            a.latency_sum_ns += b.latency_sum_ns;
            for (x, y) in a.latency.iter_mut().zip(&b.latency) {
                *x += y;
            }
        }
        for (a, b) in self.errors.iter_mut().zip(&o.errors) {
            *a += b;
        }
        self.inflight += o.inflight;
        self.wakeups += o.wakeups;
        self.poll_hits += o.poll_hits;
        self.notifications += o.notifications;
        self.sqes += o.sqes;
        self.enters += o.enters;
        self.kernel_refusals += o.kernel_refusals;
        self.dsync_writes += o.dsync_writes;
        self.fdatasyncs += o.fdatasyncs;
        self.without_op += o.without_op;
        self.slow_stops += o.slow_stops;
    }

    /// Requests taken off the virtqueue and finished with: completed operations, and those
    /// that ended without one.
    pub fn requests(&self) -> u64 {
        self.ops.iter().map(|o| o.requests).sum::<u64>() + self.without_op
    }
}

/// The counters of every queue of the device, for the life of the process.
#[derive(Debug)]
pub struct DeviceStats {
    pub queues: Vec<std::sync::Arc<QueueCounters>>,
    /// The daemon's waits for I/O in flight at a connection's end or at exit.
    pub drain: DrainCounters,
}

/// What the daemon waits for before it serves the next VMM or exits: nothing of the old
/// connection may land after that, so a disk that does not answer holds it (issue 21, item 4).
/// Written by one thread at a time (the connection loop, or the signal thread at exit).
#[derive(Debug, Default)]
pub struct DrainCounters {
    /// I/O operations in flight the daemon waits for now.
    awaited: AtomicU64,
    /// Waits that outlasted the warning interval (each counted once).
    slow: AtomicU64,
}

impl DrainCounters {
    /// `n` I/O operations are awaited now (0: none).
    pub fn set_awaited(&self, n: u64) {
        self.awaited.store(n, Relaxed);
    }

    /// A wait outlasted the warning interval.
    pub fn count_slow(&self) {
        self.slow.fetch_add(1, Relaxed);
    }

    pub fn awaited(&self) -> u64 {
        self.awaited.load(Relaxed)
    }

    pub fn slow(&self) -> u64 {
        self.slow.load(Relaxed)
    }
}

impl DeviceStats {
    pub fn new(num_queues: u16) -> DeviceStats {
        DeviceStats {
            queues: (0..num_queues).map(|_| Default::default()).collect(),
            drain: DrainCounters::default(),
        }
    }

    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        self.queues.iter().map(|q| q.snapshot()).collect()
    }
}

/// What the metrics say about the device besides its counters.
#[derive(Clone, Debug, Default)]
pub struct DeviceInfo {
    pub image: String,
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// Unix time the daemon started, in seconds.
    pub start_time_seconds: f64,
    pub vmm_connected: bool,
    /// Capacity changes applied (SIGHUP or the stats socket's `resize`).
    pub resizes: u64,
    /// I/O operations in flight the daemon waits for before it serves the next VMM or exits.
    pub io_awaited: u64,
    /// Such waits that lasted longer than the warning interval.
    pub slow_drains: u64,
}

/// Encode `queues` (one snapshot per queue) and `info` in the Prometheus text format
/// (version 0.0.4). Device-wide families have no `queue` label; the per-queue ones are
/// `ringfence_queue_*{queue="N"}`, so that summing a family never counts anything twice.
pub fn encode(queues: &[QueueSnapshot], info: &DeviceInfo) -> String {
    let mut registry = Registry::with_prefix("ringfence");
    registry.register_collector(Box::new(Metrics {
        queues: queues.to_vec(),
        info: info.clone(),
    }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Metrics {
    queues: Vec<QueueSnapshot>,
    info: DeviceInfo,
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: name, help, unit, type, and (labels, value) samples.
fn family<V: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> Result<(), std::fmt::Error> {
    let mut samples: Vec<(Labels, V)> = samples.into_iter().collect();
    let Some((_, first)) = samples.first() else {
        return Ok(());
    };
    let metric_type = first.metric_type();
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), metric_type)?;
    if samples.len() == 1 && samples[0].0.is_empty() {
        // One sample without labels.
        if let Some((_, v)) = samples.pop() {
            v.encode(m)?;
        }
        return Ok(());
    }
    for (labels, v) in &samples {
        v.encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: i64) -> ConstGauge<i64> {
    ConstGauge::new(v)
}

/// A latency histogram as `prometheus-client` encodes it.
#[derive(Debug)]
struct Latency(OpSnapshot);

impl EncodeMetric for Latency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = (0..LATENCY_BUCKETS)
            .map(|i| (bucket_upper_seconds(i), self.0.latency[i]))
            .collect();
        let count: u64 = self.0.latency.iter().sum();
        encoder.encode_histogram::<NoLabelSet>(
            self.0.latency_sum_ns as f64 / 1e9,
            count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The counters every queue has, as (name, help, value of a snapshot).
type Field = (&'static str, &'static str, fn(&QueueSnapshot) -> u64);

const QUEUE_COUNTERS: &[Field] = &[
    (
        "wakeups",
        "Times a worker was woken (a guest kick or a completion signal).",
        |s| s.wakeups,
    ),
    (
        "poll_hits",
        "Events (new requests, completions) found by the polling window after a wakeup: each a wakeup saved.",
        |s| s.poll_hits,
    ),
    (
        "guest_notifications",
        "Times the guest was signalled (call eventfd) about new used entries.",
        |s| s.notifications,
    ),
    (
        "sqes",
        "Submission queue entries handed to the kernel.",
        |s| s.sqes,
    ),
    (
        "io_uring_enters",
        "io_uring_enter calls that submitted SQEs (SQEs per call = sqes / io_uring_enters).",
        |s| s.enters,
    ),
    (
        "kernel_refusals",
        "Completions the kernel refused with -EACCES (the ring's allowlist stopped an SQE): a security incident.",
        |s| s.kernel_refusals,
    ),
    (
        "slow_stops",
        "Queue stops (GET_VRING_BASE, RESET_DEVICE) that waited longer than 5 s for requests in flight (the stop is answered only once they land).",
        |s| s.slow_stops,
    ),
    (
        "dsync_writes",
        "Write SQEs that carried RWF_DSYNC (writethrough cache).",
        |s| s.dsync_writes,
    ),
    (
        "fdatasyncs",
        "fdatasync SQEs (FLUSH, and discard or write-zeroes under a writethrough cache).",
        |s| s.fdatasyncs,
    ),
];

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut total = QueueSnapshot::default();
        for q in &self.queues {
            total.accumulate(q);
        }
        let info = &self.info;
        family(
            &mut enc,
            "info",
            "The served image (value 1).",
            None,
            [(
                vec![
                    ("image", info.image.clone()),
                    ("read_only", info.read_only.to_string()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                gauge(1),
            )],
        )?;
        family(
            &mut enc,
            "capacity",
            "Capacity the guest is offered.",
            Some(Unit::Bytes),
            [(vec![], gauge(info.capacity_bytes as i64))],
        )?;
        family(
            &mut enc,
            "queues",
            "Virtqueues (one worker and one ring each).",
            None,
            [(vec![], gauge(self.queues.len() as i64))],
        )?;
        family(
            &mut enc,
            "start_time",
            "Start time of the daemon since the Unix epoch.",
            Some(Unit::Seconds),
            [(vec![], ConstGauge::new(info.start_time_seconds))],
        )?;
        family(
            &mut enc,
            "vmm_connected",
            "Whether a VMM is connected (1) or not (0).",
            None,
            [(vec![], gauge(i64::from(info.vmm_connected)))],
        )?;
        family(
            &mut enc,
            "resizes",
            "Capacity changes applied (SIGHUP, or `resize` on the stats socket).",
            None,
            [(vec![], counter(info.resizes))],
        )?;
        family(
            &mut enc,
            "io_awaited",
            "I/O operations in flight that the daemon waits for before it serves the next VMM \
             connection or exits (a disk that does not answer holds it).",
            None,
            [(vec![], gauge(info.io_awaited as i64))],
        )?;
        family(
            &mut enc,
            "slow_drains",
            "Waits for I/O in flight, at a connection's end or at exit, that lasted longer than \
             the warning interval (10 s).",
            None,
            [(vec![], counter(info.slow_drains))],
        )?;

        // Device totals.
        let ops =
            |s: &QueueSnapshot, f: fn(&OpSnapshot) -> u64| -> Vec<(Labels, ConstCounter<u64>)> {
                OpKind::ALL
                    .iter()
                    .map(|&o| {
                        (
                            vec![("op", o.name().to_string())],
                            counter(f(&s.ops[o as usize])),
                        )
                    })
                    .collect()
            };
        family(
            &mut enc,
            "requests",
            "Requests completed to the guest, successfully or not, by operation.",
            None,
            ops(&total, |o| o.requests),
        )?;
        family(
            &mut enc,
            "io",
            "Bytes of the requests that succeeded, by operation.",
            Some(Unit::Bytes),
            ops(&total, |o| o.bytes),
        )?;
        family(
            &mut enc,
            "request_errors",
            "Requests that failed, by kind: invalid, out_of_range, read_only, unsupported, bad_address (a buffer outside guest RAM), io (the host failed it), refused (the kernel refused an SQE), dropped (a chain that could not be answered).",
            None,
            ErrorKind::ALL
                .iter()
                .map(|&e| (vec![("kind", e.name().to_string())], counter(total.errors[e as usize]))),
        )?;
        family(
            &mut enc,
            "requests_in_flight",
            "Requests submitted and not yet completed.",
            None,
            [(vec![], gauge(total.inflight as i64))],
        )?;
        for (name, help, get) in QUEUE_COUNTERS {
            family(&mut enc, name, help, None, [(vec![], counter(get(&total)))])?;
        }
        family(
            &mut enc,
            "request_duration",
            "Time from taking a request off the virtqueue to putting it on the used ring, by operation.",
            Some(Unit::Seconds),
            OpKind::ALL
                .iter()
                .map(|&o| (vec![("op", o.name().to_string())], Latency(total.ops[o as usize]))),
        )?;

        // Per queue.
        let per_op = |f: fn(&OpSnapshot) -> u64| {
            let mut v: Vec<(Labels, ConstCounter<u64>)> = Vec::new();
            for (i, q) in self.queues.iter().enumerate() {
                for &o in &OpKind::ALL {
                    v.push((
                        vec![("queue", i.to_string()), ("op", o.name().to_string())],
                        counter(f(&q.ops[o as usize])),
                    ));
                }
            }
            v
        };
        family(
            &mut enc,
            "queue_requests",
            "Requests completed to the guest, by queue and operation.",
            None,
            per_op(|o| o.requests),
        )?;
        family(
            &mut enc,
            "queue_io",
            "Bytes of the requests that succeeded, by queue and operation.",
            Some(Unit::Bytes),
            per_op(|o| o.bytes),
        )?;
        let mut errs: Vec<(Labels, ConstCounter<u64>)> = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            for &e in &ErrorKind::ALL {
                errs.push((
                    vec![("queue", i.to_string()), ("kind", e.name().to_string())],
                    counter(q.errors[e as usize]),
                ));
            }
        }
        family(
            &mut enc,
            "queue_request_errors",
            "Requests that failed, by queue and kind.",
            None,
            errs,
        )?;
        family(
            &mut enc,
            "queue_requests_in_flight",
            "Requests submitted and not yet completed, by queue.",
            None,
            self.queues
                .iter()
                .enumerate()
                .map(|(i, q)| (vec![("queue", i.to_string())], gauge(q.inflight as i64))),
        )?;
        for (name, help, get) in QUEUE_COUNTERS {
            family(
                &mut enc,
                &format!("queue_{name}"),
                help,
                None,
                self.queues
                    .iter()
                    .enumerate()
                    .map(|(i, q)| (vec![("queue", i.to_string())], counter(get(q)))),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1000), 0);
        assert_eq!(latency_bucket(1001), 1);
        assert_eq!(latency_bucket(2000), 1);
        assert_eq!(latency_bucket(2001), 2);
        assert_eq!(latency_bucket(3999), 2);
        assert_eq!(latency_bucket(4000), 2);
        assert_eq!(latency_bucket(4001), 3);
        // Each bucket holds exactly the latencies at or below its bound and above the last.
        for i in 1..LATENCY_BUCKETS {
            let bound = 1000u64 << i;
            assert_eq!(latency_bucket(bound), i, "{bound} ns");
            assert_eq!(latency_bucket(bound + 1), i + 1, "{bound} ns + 1");
        }
        assert_eq!(latency_bucket(1_048_576_000), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket(1_048_576_001), LATENCY_BUCKETS);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
        assert!((bucket_upper_seconds(0) - 1e-6).abs() < 1e-12);
        assert!((bucket_upper_seconds(20) - 1.048576).abs() < 1e-9);
    }

    #[test]
    fn counters_add_and_snapshot() {
        let q = QueueCounters::default();
        q.complete(OpKind::Read, 4096, 1500, None);
        q.complete(OpKind::Read, 4096, 3_000_000_000, Some(ErrorKind::Io));
        q.complete(OpKind::Write, 512, 10, None);
        q.error(ErrorKind::OutOfRange, 1);
        q.sqes.add(3);
        q.enters.add(1);
        let s = q.snapshot();
        let r = s.ops[OpKind::Read as usize];
        assert_eq!((r.requests, r.bytes), (2, 4096));
        assert_eq!(r.latency[1], 1);
        assert_eq!(r.latency[LATENCY_BUCKETS], 1);
        assert_eq!(s.errors[ErrorKind::Io as usize], 1);
        assert_eq!(s.errors[ErrorKind::OutOfRange as usize], 1);
        // 3 completed operations and one refused before it had one.
        assert_eq!(s.requests(), 4);
        let mut t = QueueSnapshot::default();
        t.accumulate(&s);
        t.accumulate(&s);
        assert_eq!(t.ops[OpKind::Write as usize].bytes, 1024);
        assert_eq!(t.sqes, 6);
    }

    #[test]
    fn queue_counters_do_not_share_cache_lines() {
        assert_eq!(std::mem::align_of::<QueueCounters>(), 128);
        assert_eq!(std::mem::size_of::<QueueCounters>() % 128, 0);
    }

    fn sample<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .map(|l| l[series.len() + 1..].trim())
    }

    #[test]
    fn prometheus_text_has_base_units_totals_and_queues() {
        let a = QueueCounters::default();
        a.complete(OpKind::Read, 4096, 1500, None);
        a.complete(OpKind::Write, 8192, 3000, None);
        let b = QueueCounters::default();
        b.complete(OpKind::Read, 512, 500, None);
        b.error(ErrorKind::Invalid, 1);
        let info = DeviceInfo {
            image: "/x/disk.img".into(),
            capacity_bytes: 1 << 30,
            start_time_seconds: 1.5e9,
            vmm_connected: true,
            io_awaited: 3,
            slow_drains: 1,
            ..DeviceInfo::default()
        };
        let text = encode(&[a.snapshot(), b.snapshot()], &info);
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        assert_eq!(get("ringfence_requests_total{op=\"read\"}"), "2");
        assert_eq!(get("ringfence_io_bytes_total{op=\"read\"}"), "4608");
        assert_eq!(get("ringfence_io_bytes_total{op=\"write\"}"), "8192");
        assert_eq!(
            get("ringfence_queue_requests_total{queue=\"1\",op=\"read\"}"),
            "1"
        );
        assert_eq!(
            get("ringfence_queue_io_bytes_total{queue=\"0\",op=\"read\"}"),
            "4096"
        );
        assert_eq!(get("ringfence_request_errors_total{kind=\"invalid\"}"), "1");
        assert_eq!(get("ringfence_capacity_bytes"), "1073741824");
        assert_eq!(get("ringfence_vmm_connected"), "1");
        assert_eq!(get("ringfence_queues"), "2");
        assert_eq!(get("ringfence_io_awaited"), "3");
        assert_eq!(get("ringfence_slow_drains_total"), "1");
        // Histograms: cumulative buckets in seconds, +Inf equal to the count.
        assert_eq!(
            get("ringfence_request_duration_seconds_bucket{op=\"read\",le=\"1e-06\"}"),
            "1"
        );
        assert_eq!(
            get("ringfence_request_duration_seconds_bucket{op=\"read\",le=\"2e-06\"}"),
            "2"
        );
        assert_eq!(
            get("ringfence_request_duration_seconds_bucket{op=\"read\",le=\"+Inf\"}"),
            "2"
        );
        assert_eq!(
            get("ringfence_request_duration_seconds_count{op=\"read\"}"),
            "2"
        );
        assert!(text.contains("# TYPE ringfence_request_duration_seconds histogram"));
        assert!(text.contains("# TYPE ringfence_io_bytes_total counter"));
        assert!(text.contains("# TYPE ringfence_capacity_bytes gauge"));
    }
}
