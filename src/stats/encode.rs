//! The Prometheus text encoding of the counters (`prometheus-client`).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::*;

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
        self.encode_device(&mut enc)?;
        self.encode_totals(&mut enc, &total)?;
        self.encode_queues(&mut enc)
    }
}

impl Metrics {
    /// What the device is and what the daemon does beside the queues.
    fn encode_device(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let info = &self.info;
        family(
            enc,
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
            enc,
            "capacity",
            "Capacity the guest is offered.",
            Some(Unit::Bytes),
            [(vec![], gauge(info.capacity_bytes as i64))],
        )?;
        family(
            enc,
            "queues",
            "Virtqueues (one worker and one ring each).",
            None,
            [(vec![], gauge(self.queues.len() as i64))],
        )?;
        family(
            enc,
            "start_time",
            "Start time of the daemon since the Unix epoch.",
            Some(Unit::Seconds),
            [(vec![], ConstGauge::new(info.start_time_seconds))],
        )?;
        family(
            enc,
            "vmm_connected",
            "Whether a VMM is connected (1) or not (0).",
            None,
            [(vec![], gauge(i64::from(info.vmm_connected)))],
        )?;
        family(
            enc,
            "resizes",
            "Capacity changes applied (SIGHUP, or `resize` on the stats socket).",
            None,
            [(vec![], counter(info.resizes))],
        )?;
        family(
            enc,
            "io_awaited",
            "I/O operations in flight that the daemon waits for before it serves the next VMM \
             connection or exits (a disk that does not answer holds it).",
            None,
            [(vec![], gauge(info.io_awaited as i64))],
        )?;
        family(
            enc,
            "slow_drains",
            "Waits for I/O in flight, at a connection's end or at exit, that lasted longer than \
             the warning interval (10 s).",
            None,
            [(vec![], counter(info.slow_drains))],
        )?;
        self.encode_limits(enc)
    }

    /// The I/O limits set (no sample when none is), and the requests that waited for them.
    fn encode_limits(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let info = &self.info;
        let clamp = |v: u64| gauge(i64::try_from(v).unwrap_or(i64::MAX));
        family(
            enc,
            "io_limit",
            "I/O limits set, by limit (QEMU's names: iops-total, iops-read, iops-write in operations per second; bps-total, bps-read, bps-write in bytes per second). No sample: no limit.",
            None,
            info.limits
                .iter()
                .map(|l| (vec![("limit", l.name.clone())], clamp(l.rate))),
        )?;
        family(
            enc,
            "io_limit_burst",
            "Burst rates of the I/O limits that have one (the -max options), by limit, in the limit's unit per second.",
            None,
            info.limits.iter().filter_map(|l| {
                Some((vec![("limit", l.name.clone())], clamp(l.burst?)))
            }),
        )?;
        family(
            enc,
            "throttled_requests",
            "Requests that waited in the backend for the I/O limits before they started (never failed).",
            None,
            [(vec![], counter(info.throttled_requests))],
        )?;
        family(
            enc,
            "throttled",
            "Time requests waited for the I/O limits, all requests together.",
            Some(Unit::Seconds),
            [(vec![], ConstCounter::new(info.throttled_seconds))],
        )
    }

    /// Device totals: every queue summed.
    fn encode_totals(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        total: &QueueSnapshot,
    ) -> Result<(), std::fmt::Error> {
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
            enc,
            "requests",
            "Requests completed to the guest, successfully or not, by operation.",
            None,
            ops(total, |o| o.requests),
        )?;
        family(
            enc,
            "io",
            "Bytes of the requests that succeeded, by operation.",
            Some(Unit::Bytes),
            ops(total, |o| o.bytes),
        )?;
        family(
            enc,
            "request_errors",
            "Requests that failed, by kind: invalid, out_of_range, read_only, unsupported, bad_address (a buffer outside guest RAM), io (the host failed it), refused (the kernel refused an SQE), dropped (a chain that could not be answered).",
            None,
            ErrorKind::ALL
                .iter()
                .map(|&e| (vec![("kind", e.name().to_string())], counter(total.errors[e as usize]))),
        )?;
        family(
            enc,
            "requests_in_flight",
            "Requests submitted and not yet completed.",
            None,
            [(vec![], gauge(total.inflight as i64))],
        )?;
        for (name, help, get) in QUEUE_COUNTERS {
            family(enc, name, help, None, [(vec![], counter(get(total)))])?;
        }
        family(
            enc,
            "request_duration",
            "Time from taking a request off the virtqueue to putting it on the used ring, by operation.",
            Some(Unit::Seconds),
            OpKind::ALL
                .iter()
                .map(|&o| (vec![("op", o.name().to_string())], Latency(total.ops[o as usize]))),
        )?;

        Ok(())
    }

    /// The same counters per queue (`ringfence_queue_*{queue="N"}`).
    fn encode_queues(&self, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
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
            enc,
            "queue_requests",
            "Requests completed to the guest, by queue and operation.",
            None,
            per_op(|o| o.requests),
        )?;
        family(
            enc,
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
            enc,
            "queue_request_errors",
            "Requests that failed, by queue and kind.",
            None,
            errs,
        )?;
        family(
            enc,
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
                enc,
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
