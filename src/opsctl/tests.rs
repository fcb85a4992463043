use super::*;
use crate::stats::{encode, DeviceInfo, QueueCounters};

#[test]
fn text_lines_parse_with_labels_and_escapes() {
    let s = parse_text(
        "# HELP x y\n# TYPE x counter\nx_total 3\ny{a=\"1\",b=\"q\\\"\\\\z\"} 2.5\nz{le=\"+Inf\"} +Inf\n",
    )
    .unwrap();
    assert_eq!(s[0].name, "x_total");
    assert_eq!(s[0].value, 3.0);
    assert_eq!(
        s[1].labels,
        vec![("a".into(), "1".into()), ("b".into(), "q\"\\z".into())]
    );
    assert_eq!(s[1].value, 2.5);
    assert!(s[2].value.is_infinite());
    assert!(parse_text("bad{a=1} 2").is_err());
}

#[test]
fn quantiles_interpolate_inside_buckets() {
    let b = [(1.0, 10.0), (2.0, 20.0), (f64::INFINITY, 20.0)];
    assert_eq!(quantile(&b, 0.5), Some(1.0));
    assert_eq!(quantile(&b, 0.75), Some(1.5));
    assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    assert_eq!(
        quantile(&[(1.0, 0.0), (f64::INFINITY, 4.0)], 0.5),
        Some(1.0)
    );
}

#[test]
fn the_table_shows_what_the_daemon_encoded() {
    let q = QueueCounters::default();
    for _ in 0..10 {
        q.complete(OpKind::Read, 4096, 3000, None);
    }
    q.complete(OpKind::Write, 512, 1000, None);
    q.error(ErrorKind::OutOfRange, 1);
    q.sqes.add(11);
    q.enters.add(2);
    let info = DeviceInfo {
        image: "/img".into(),
        capacity_bytes: 1 << 20,
        start_time_seconds: 100.0,
        ..Default::default()
    };
    let v = View::parse(&encode(&[q.snapshot()], &info)).unwrap();
    assert_eq!(v.ops["read"].requests, 10.0);
    assert_eq!(v.ops["read"].bytes, 40960.0);
    assert_eq!(v.queues[&0].requests, 11.0);
    let t = render(None, &v, 10.0);
    let read = t.lines().find(|l| l.starts_with("read ")).unwrap();
    let cols: Vec<&str> = read.split_whitespace().collect();
    // op, ops/s, MiB/s, ops, bytes, avg, p50, p99
    assert_eq!(cols[1], "1.0");
    assert_eq!(cols[3], "10");
    assert_eq!(cols[4], "40960");
    assert_eq!(cols[5], "3.0");
    assert!(t.contains("errors: out_of_range 1"), "{t}");
    assert!(t.contains("SQEs per io_uring_enter 5.50"), "{t}");
    // Against a previous snapshot: the rates are the differences.
    q.complete(OpKind::Read, 4096, 3000, None);
    let v2 = View::parse(&encode(&[q.snapshot()], &info)).unwrap();
    let t = render(Some(&v), &v2, 0.5);
    let read = t.lines().find(|l| l.starts_with("read ")).unwrap();
    assert_eq!(read.split_whitespace().nth(1), Some("2.0"), "{t}");
}

#[test]
fn the_table_shows_the_limits_and_what_waited_for_them() {
    let q = QueueCounters::default();
    let mut info = DeviceInfo {
        image: "/img".into(),
        capacity_bytes: 1 << 20,
        ..Default::default()
    };
    // A daemon that does not answer `limits`: no line.
    let v = View::parse(&encode(&[q.snapshot()], &info)).unwrap();
    assert!(!render(None, &v, 1.0).contains("limits:"));
    // No limits: one line saying so, nothing about waits.
    let mut v = View::parse(&encode(&[q.snapshot()], &info)).unwrap();
    v.limits = Some("none".into());
    let t = render(None, &v, 1.0);
    assert!(t.lines().any(|l| l == "limits: none"), "{t}");
    assert!(!t.contains("throttled"), "{t}");
    // Limits: the words, and the waits, with rates over the interval.
    info.throttled_requests = 10;
    info.throttled_seconds = 2.0;
    let mut v = View::parse(&encode(&[q.snapshot()], &info)).unwrap();
    v.limits = Some("iops-total=2000".into());
    assert_eq!((v.throttled_requests, v.throttled_seconds), (10.0, 2.0));
    info.throttled_requests = 30;
    info.throttled_seconds = 3.0;
    let mut v2 = View::parse(&encode(&[q.snapshot()], &info)).unwrap();
    v2.limits = v.limits.clone();
    let t = render(Some(&v), &v2, 2.0);
    assert!(t.lines().any(|l| l == "limits: iops-total=2000"), "{t}");
    assert!(
        t.contains("throttled: 30 requests waited (10.0/s), 3.000 s waited in all (0.500 s/s)"),
        "{t}"
    );
    // The rest of the table is as it was.
    assert!(t.lines().any(|l| l.starts_with("read ")), "{t}");
    assert!(t.contains("errors: none"), "{t}");
}

#[test]
fn limits_are_checked_before_they_are_sent() {
    use crate::cli::{Command, Options};
    use clap::Parser;
    let line = |args: &[&str]| {
        let mut all = vec!["ringfence", "limits", "--stats-socket", "/s"];
        all.extend_from_slice(args);
        match Options::try_parse_from(all).expect("parses").command {
            Some(Command::Limits(o)) => limits_request(&o),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(line(&[]).unwrap(), "limits\n");
    assert_eq!(line(&["--none"]).unwrap(), "limits none\n");
    assert_eq!(
        line(&["--iops-total", "2000", "--bps-read", "20M"]).unwrap(),
        "limits iops-total=2000 bps-read=20971520\n"
    );
    for bad in [
        &["--iops-total", "0"][..],
        &["--iops-total", "-1"],
        &["--bps-total", "2T"],
        &["--iops-read", "99999999999999999999"],
        &["--iops-write", "100", "--iops-write-max", "50"],
        &["--bps-write-max", "1M"],
    ] {
        let e = line(bad).expect_err("refused");
        assert!(matches!(e, OpsctlError::Limits(_)), "{bad:?}: {e}");
    }
}
