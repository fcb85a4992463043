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
    /// The I/O limits set, each with its QEMU name (`iops-total`, `bps-read`...): the rate,
    /// and the burst rate if it has one.
    pub limits: Vec<IoLimitInfo>,
    /// Requests that waited for the I/O limits, and the seconds they waited in all.
    pub throttled_requests: u64,
    pub throttled_seconds: f64,
}

/// One I/O limit, as the metrics show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoLimitInfo {
    /// QEMU's name: `iops-total`, `bps-read`...
    pub name: String,
    /// Operations or bytes per second.
    pub rate: u64,
    /// The burst rate, if any.
    pub burst: Option<u64>,
}

mod encode;
pub use encode::encode;

#[cfg(test)]
mod tests;
