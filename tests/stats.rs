//! Statistics as an operator reads them: the daemon's `--stats-socket` (Prometheus text, raw
//! or over HTTP) and `ringfence stat`, after a blkio client did a known set of requests on a
//! real socket. The counters must say exactly what the client did: the same operations, the
//! same bytes, per queue and in total, and the failures by kind.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// What a client did, per operation: (requests, bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Did {
    reads: (u64, u64),
    writes: (u64, u64),
    flushes: u64,
    discards: (u64, u64),
    write_zeroes: (u64, u64),
}

/// A ringfence with a stats socket (in a directory of its own, which outlives the daemon).
fn start(queues: u16, extra: &[&str]) -> (Backend, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.sock");
    let mut args = vec!["--stats-socket".to_string(), stats.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let b = Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            size: 64 * MIB,
            num_queues: queues,
            extra: args,
            ..BackendOpts::default()
        },
    );
    (b, stats, dir)
}

/// One connection's answer to `send` (then a shutdown of our side).
fn ask(stats: &Path, send: &str) -> String {
    let mut s = UnixStream::connect(stats).expect("connect to the stats socket");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(send.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the stats answer");
    out
}

/// The value of the series `series` (name and labels exactly as written), or a panic with the
/// whole text.
#[track_caller]
fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Queue `q` does a fixed mix of requests whose sizes depend on `q`, and says what it did.
fn workload(c: &mut Client, q: usize) -> Did {
    let mut did = Did::default();
    let queue = &mut c.queues[q];
    let base = q as u64 * 16 * MIB;
    let k = q as u64 + 1;
    for i in 0..(5 * k) {
        let len = 4096 * (i + 1) as usize;
        let data = pattern(q as u64, base + i * 65536, len);
        queue.write(base + i * 65536, &data).expect("write");
        did.writes.0 += 1;
        did.writes.1 += len as u64;
    }
    for i in 0..(7 * k) {
        let len = 512 * (i + 1) as usize;
        queue.read(base + i * 4096, len).expect("read");
        did.reads.0 += 1;
        did.reads.1 += len as u64;
    }
    // Many at once: several requests per kick.
    let reqs: Vec<(u64, usize, usize)> = (0..16)
        .map(|i| (base + i * 8192, i as usize * 8192, 8192))
        .collect();
    assert!(queue.read_many(&reqs).iter().all(|&r| r == 0));
    did.reads.0 += 16;
    did.reads.1 += 16 * 8192;
    for _ in 0..k {
        queue.flush().expect("flush");
        did.flushes += 1;
    }
    queue.discard(base + 8 * MIB, MIB * k).expect("discard");
    did.discards = (1, MIB * k);
    queue
        .write_zeroes(base + 10 * MIB, 65536 * k, false)
        .expect("write zeroes");
    queue
        .write_zeroes(base + 11 * MIB, 4096, true)
        .expect("write zeroes, unmap");
    did.write_zeroes = (2, 65536 * k + 4096);
    did
}

#[track_caller]
fn check_op(text: &str, prefix: &str, labels: &str, op: &str, want: (u64, u64)) {
    let sep = if labels.is_empty() { "" } else { "," };
    let got = (
        value(
            text,
            &format!("{prefix}requests_total{{{labels}{sep}op=\"{op}\"}}"),
        ),
        value(
            text,
            &format!("{prefix}io_bytes_total{{{labels}{sep}op=\"{op}\"}}"),
        ),
    );
    assert_eq!(got, want, "{prefix} {labels} {op}: (requests, bytes)");
}

#[test]
fn counters_match_what_a_blkio_client_did() {
    let (mut b, stats, _dir) = start(2, &[]);
    let before = ask(&stats, "metrics\n");
    assert_eq!(value(&before, "ringfence_queues"), 2);
    assert_eq!(value(&before, "ringfence_capacity_bytes"), 64 * MIB);
    assert_eq!(value(&before, "ringfence_requests_total{op=\"read\"}"), 0);

    let mut c = b.connect(ClientOpts {
        num_queues: 2,
        ..ClientOpts::default()
    });
    let did = [workload(&mut c, 0), workload(&mut c, 1)];
    // Two refused requests on queue 1: past the end of the disk.
    assert!(c.queues[1].read(64 * MIB, 4096).is_err());
    assert!(c.queues[1].write(64 * MIB - 512, &[0u8; 1024]).is_err());

    let text = ask(&stats, "metrics\n");
    let mut total = Did::default();
    for (q, d) in did.iter().enumerate() {
        let l = format!("queue=\"{q}\"");
        check_op(&text, "ringfence_queue_", &l, "read", d.reads);
        check_op(&text, "ringfence_queue_", &l, "write", d.writes);
        check_op(&text, "ringfence_queue_", &l, "flush", (d.flushes, 0));
        check_op(&text, "ringfence_queue_", &l, "discard", d.discards);
        check_op(
            &text,
            "ringfence_queue_",
            &l,
            "write_zeroes",
            d.write_zeroes,
        );
        total.reads.0 += d.reads.0;
        total.reads.1 += d.reads.1;
        total.writes.0 += d.writes.0;
        total.writes.1 += d.writes.1;
        total.flushes += d.flushes;
        total.discards.0 += d.discards.0;
        total.discards.1 += d.discards.1;
        total.write_zeroes.0 += d.write_zeroes.0;
        total.write_zeroes.1 += d.write_zeroes.1;
    }
    check_op(&text, "ringfence_", "", "read", total.reads);
    check_op(&text, "ringfence_", "", "write", total.writes);
    check_op(&text, "ringfence_", "", "flush", (total.flushes, 0));
    check_op(&text, "ringfence_", "", "discard", total.discards);
    check_op(&text, "ringfence_", "", "write_zeroes", total.write_zeroes);
    // The refused requests: counted as errors of their kind, on their queue, and nowhere else.
    assert_eq!(
        value(
            &text,
            "ringfence_request_errors_total{kind=\"out_of_range\"}"
        ),
        2
    );
    assert_eq!(
        value(
            &text,
            "ringfence_queue_request_errors_total{queue=\"1\",kind=\"out_of_range\"}"
        ),
        2
    );
    assert_eq!(
        value(
            &text,
            "ringfence_queue_request_errors_total{queue=\"0\",kind=\"out_of_range\"}"
        ),
        0
    );
    for kind in ["invalid", "io", "refused", "bad_address", "dropped"] {
        assert_eq!(
            value(
                &text,
                &format!("ringfence_request_errors_total{{kind=\"{kind}\"}}")
            ),
            0,
            "{kind}"
        );
    }
    assert_eq!(value(&text, "ringfence_kernel_refusals_total"), 0);
    assert_eq!(value(&text, "ringfence_requests_in_flight"), 0);
    // Every completed request is in its latency histogram once.
    for op in ["read", "write", "flush", "discard", "write_zeroes"] {
        let n = value(&text, &format!("ringfence_requests_total{{op=\"{op}\"}}"));
        assert_eq!(
            value(
                &text,
                &format!("ringfence_request_duration_seconds_count{{op=\"{op}\"}}")
            ),
            n
        );
        assert_eq!(
            value(
                &text,
                &format!("ringfence_request_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}}")
            ),
            n
        );
    }
    // At least one SQE per read and write, and batches: the 16 reads went in fewer enters.
    let sqes = value(&text, "ringfence_sqes_total");
    let enters = value(&text, "ringfence_io_uring_enters_total");
    assert!(sqes >= total.reads.0 + total.writes.0, "{sqes} SQEs");
    assert!(enters < sqes, "{enters} enters for {sqes} SQEs");
    assert!(value(&text, "ringfence_wakeups_total") > 0);
    // The client waited for its completions, so it was signalled, at most once per request.
    let requests: u64 = [
        "read",
        "write",
        "flush",
        "discard",
        "write_zeroes",
        "get_id",
    ]
    .iter()
    .map(|op| value(&text, &format!("ringfence_requests_total{{op=\"{op}\"}}")))
    .sum();
    let notified = value(&text, "ringfence_guest_notifications_total");
    assert!(
        notified > 0 && notified <= requests,
        "{notified} notifications for {requests} requests"
    );
    assert_eq!(value(&text, "ringfence_vmm_connected"), 1);
    drop(c);
    assert!(b.is_alive());
}

/// Run `ringfence stat ARGS` to its end.
fn stat(stats: &Path, args: &[&str]) -> Finished {
    run_to_exit(
        Command::new(ringfence_bin())
            .arg("stat")
            .arg("--stats-socket")
            .arg(stats)
            .args(args),
    )
}

/// Columns of the row of `op` in a `ringfence stat` table: op, ops/s, MiB/s, ops, bytes, ...
fn row<'a>(table: &'a str, op: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(op))
        .unwrap_or_else(|| panic!("no row {op} in:\n{table}"))
        .split_whitespace()
        .collect()
}

#[test]
fn ringfence_stat_shows_the_clients_numbers() {
    let (b, stats, _dir) = start(1, &[]);
    let mut c = b.connect(ClientOpts::default());
    let did = workload(&mut c, 0);

    let out = stat(&stats, &[]);
    assert!(out.status.success(), "{}", out.stderr);
    let t = &out.stdout;
    let cols = row(t, "read");
    assert_eq!(cols[3], did.reads.0.to_string(), "{t}");
    assert_eq!(cols[4], did.reads.1.to_string(), "{t}");
    let cols = row(t, "write");
    assert_eq!(cols[3], did.writes.0.to_string(), "{t}");
    assert_eq!(cols[4], did.writes.1.to_string(), "{t}");
    assert_eq!(row(t, "flush")[3], did.flushes.to_string(), "{t}");
    assert_eq!(row(t, "discard")[4], did.discards.1.to_string(), "{t}");
    assert!(t.contains("errors: none"), "{t}");
    assert!(t.contains("VMM connected"), "{t}");
    assert!(t.contains("kernel refusals 0"), "{t}");

    // --watch: the second table's rates are over the interval, in which nothing happened.
    let out = stat(&stats, &["--watch", "--interval", "0.2", "--count", "2"]);
    assert!(out.status.success(), "{}", out.stderr);
    let tables: Vec<&str> = out.stdout.split("\n\n").collect();
    assert_eq!(tables.len(), 2, "{}", out.stdout);
    assert!(tables[1].contains("rates over the last"), "{}", tables[1]);
    let cols = row(tables[1], "read");
    assert_eq!(
        (cols[1], cols[3]),
        ("0.0", &*did.reads.0.to_string()),
        "{}",
        tables[1]
    );

    // A dead socket is one line and status 1.
    let out = stat(&b.dir.path().join("nothing.sock"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.starts_with("ringfence: error: cannot connect"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_stats_socket_speaks_raw_http_and_to_silent_readers() {
    let (_b, stats, _dir) = start(1, &[]);
    // HTTP, as curl --unix-socket or a TCP-to-unix proxy in front of Prometheus send it.
    let http = ask(&stats, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = http.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    assert_eq!(value(body, "ringfence_queues"), 1);
    let missing = ask(&stats, "GET /nothing HTTP/1.1\r\n\r\n");
    assert!(missing.starts_with("HTTP/1.0 404"), "{missing}");
    let unknown = ask(&stats, "frobnicate\n");
    assert!(unknown.starts_with("error: unknown request"), "{unknown}");

    // A client that only reads (nothing sent, its side left open) gets the snapshot after the
    // short wait for a request line.
    let mut s = UnixStream::connect(&stats).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let t = Instant::now();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(value(&out, "ringfence_capacity_bytes"), 64 * MIB);
    // Base units and the text format's types.
    assert!(out.contains("# TYPE ringfence_request_duration_seconds histogram"));
    assert!(out.contains("# TYPE ringfence_io_bytes_total counter"));
}

#[test]
fn the_stats_socket_is_refused_when_live_and_removed_on_exit() {
    let (mut b, stats, _dir) = start(1, &[]);
    // A second daemon on the same stats socket: one line, status 1.
    let other = b.dir.path().join("other.img");
    create_image(&other, MIB, None);
    let out = run_to_exit(
        Command::new(ringfence_bin())
            .arg("--socket-path")
            .arg(b.dir.path().join("other.sock"))
            .arg("--blk-file")
            .arg(&other)
            .arg("--stats-socket")
            .arg(&stats),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("already in use"), "{}", out.stderr);
    assert_eq!(b.stop(), Some(0));
    assert!(!stats.exists(), "the stats socket was left behind");
}
