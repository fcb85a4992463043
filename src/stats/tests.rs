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

#[test]
fn io_limits_and_throttled_requests_are_encoded() {
    let q = QueueCounters::default();
    // No limits: no limit sample, the throttling counters at zero.
    let text = encode(&[q.snapshot()], &DeviceInfo::default());
    assert!(!text.contains("ringfence_io_limit{"), "{text}");
    assert!(!text.contains("ringfence_io_limit_burst{"), "{text}");
    assert_eq!(
        sample(&text, "ringfence_throttled_requests_total"),
        Some("0")
    );
    assert_eq!(
        sample(&text, "ringfence_throttled_seconds_total"),
        Some("0.0")
    );

    let info = DeviceInfo {
        limits: vec![
            IoLimitInfo {
                name: "iops-total".into(),
                rate: 2000,
                burst: Some(4000),
            },
            IoLimitInfo {
                name: "bps-read".into(),
                rate: 20 << 20,
                burst: None,
            },
        ],
        throttled_requests: 17,
        throttled_seconds: 1.25,
        ..DeviceInfo::default()
    };
    let text = encode(&[q.snapshot()], &info);
    let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    assert_eq!(get("ringfence_io_limit{limit=\"iops-total\"}"), "2000");
    assert_eq!(get("ringfence_io_limit{limit=\"bps-read\"}"), "20971520");
    assert_eq!(
        get("ringfence_io_limit_burst{limit=\"iops-total\"}"),
        "4000"
    );
    assert!(sample(&text, "ringfence_io_limit_burst{limit=\"bps-read\"}").is_none());
    assert_eq!(get("ringfence_throttled_requests_total"), "17");
    assert_eq!(get("ringfence_throttled_seconds_total"), "1.25");
    assert!(text.contains("# TYPE ringfence_io_limit gauge"));
    assert!(text.contains("# TYPE ringfence_io_limit_burst gauge"));
    assert!(text.contains("# TYPE ringfence_throttled_requests_total counter"));
    assert!(text.contains("# TYPE ringfence_throttled_seconds_total counter"));
    assert!(text.contains("# HELP ringfence_io_limit I/O limits set"));
}
