//! I/O limits as an operator sets them (issue 25): bad limits on the daemon's command line are
//! refused at startup with one line naming the option; `ringfence limits` reads a running
//! daemon's limits, replaces them (limits not given are removed), checks them before it sends
//! anything, and `--none` removes them; the stats socket refuses a bad set and keeps the
//! running limits; only the daemon's uid or root may change them; the Prometheus text and
//! `ringfence stat` show the limits and the requests that waited for them; the systemd
//! environment file's examples are options the daemon takes.
//!
//! Runs the binary in `$RINGFENCE_BIN` if set (e.g. the release build), else the one cargo
//! built for the tests. Every wait is on something the daemon says: its ready line, the end of
//! a command, a socket's answer.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The ringfence binary under test.
fn bin() -> PathBuf {
    std::env::var_os("RINGFENCE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| ringfence_bin().to_path_buf())
}

/// A running daemon with a stats socket, and its files.
struct Running {
    proc: Proc,
    socket: PathBuf,
    stats: PathBuf,
    // Last: the directory outlives the daemon.
    dir: tempfile::TempDir,
}

fn start(limits: &[&str]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    create_image(&image, 16 * MIB, None);
    let socket = dir.path().join("vhost.sock");
    let stats = dir.path().join("stats.sock");
    let proc = Proc::spawn_until_ready(
        Command::new(bin())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--blk-file")
            .arg(&image)
            .arg("--stats-socket")
            .arg(&stats)
            .args(limits)
            .env("RUST_LOG", "info"),
    );
    Running {
        proc,
        socket,
        stats,
        dir,
    }
}

/// `ringfence limits --stats-socket STATS ARGS`, run to its end.
fn limits(stats: &Path, args: &[&str]) -> Finished {
    run_to_exit(
        Command::new(bin())
            .arg("limits")
            .arg("--stats-socket")
            .arg(stats)
            .args(args),
    )
}

/// `ringfence limits ...` that must succeed: its one line of output.
#[track_caller]
fn limits_ok(stats: &Path, args: &[&str]) -> String {
    let out = limits(stats, args);
    assert!(
        out.status.success(),
        "ringfence limits {args:?}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    out.stdout.trim_end().to_string()
}

/// `ringfence limits ...` that must fail: its one line on stderr (status 1, nothing on stdout).
#[track_caller]
fn limits_err(stats: &Path, args: &[&str]) -> String {
    let out = limits(stats, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "ringfence limits {args:?} should fail\nstdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.stdout, "", "ringfence limits {args:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    out.stderr.trim_end().to_string()
}

/// Whether the daemon's log says `needle`, waiting (bounded) for the line to reach us: it is
/// written before the answer that the test saw, but read by another thread.
fn logged(proc: &Proc, needle: &str) -> bool {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while !proc.stderr().contains(needle) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    true
}

/// One connection to the stats socket: send `line`, shut down our side, read the answer.
fn ask(stats: &Path, line: &str) -> String {
    let mut s = UnixStream::connect(stats).expect("connect to the stats socket");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    out
}

/// The value of the series `series` (name and labels as written), if there is one.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn bad_limits_on_the_command_line_are_refused_at_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    create_image(&image, MIB, None);
    let socket = dir.path().join("vhost.sock");
    // (the limit options, what the one line on stderr must say)
    let cases: &[(&[&str], &[&str])] = &[
        (&["--iops-total", "0"], &["iops-total", "positive"]),
        (&["--bps-read", "0"], &["bps-read", "positive"]),
        (
            &["--iops-write", "-5"],
            &["iops-write", "must be a positive number"],
        ),
        (
            &["--bps-write=-1M"],
            &["bps-write", "must be a positive number"],
        ),
        (&["--bps-total", "2T"], &["bps-total", "above the largest"]),
        (
            &["--iops-total", "99999999999999999999"],
            &["iops-total", "above the largest limit"],
        ),
        (&["--iops-read", "many"], &["iops-read", "'many'"]),
        (
            &["--bps-write", "100"],
            &["bps-write", "below the smallest"],
        ),
        (
            &["--iops-read", "1000", "--iops-read-max", "500"],
            &["iops-read-max", "must be above the rate"],
        ),
        (
            &["--bps-total", "10M", "--bps-total-max", "10M"],
            &["bps-total-max", "must be above the rate"],
        ),
        (
            &["--iops-write-max", "4000"],
            &["iops-write-max", "without iops-write"],
        ),
        (
            &["--bps-read-max-length", "5"],
            &["bps-read-max-length", "without bps-read"],
        ),
        (
            &[
                "--iops-total",
                "100",
                "--iops-total-max",
                "200",
                "--iops-total-max-length",
                "0",
            ],
            &["iops-total-max-length", "between 1 and 3600"],
        ),
    ];
    for (args, says) in cases {
        let out = run_to_exit(
            Command::new(bin())
                .arg("--socket-path")
                .arg(&socket)
                .arg("--blk-file")
                .arg(&image)
                .args(*args),
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} should be refused with status 1; stderr:\n{}",
            out.stderr
        );
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?}: one line expected:\n{}",
            out.stderr
        );
        assert!(
            lines[0].starts_with("ringfence: error: I/O limits: "),
            "{args:?}: {}",
            lines[0]
        );
        for word in *says {
            assert!(
                lines[0].contains(word),
                "{args:?}: no '{word}' in: {}",
                lines[0]
            );
        }
        assert!(!socket.exists(), "{args:?}: the socket was created");
    }
}

#[test]
fn ringfence_limits_reads_replaces_and_removes_a_running_daemons_limits() {
    let d = start(&[]);
    let stats = &d.stats;
    assert_eq!(limits_ok(stats, &[]), "limits: none");
    let m = ask(stats, "metrics\n");
    assert!(!m.contains("ringfence_io_limit{"), "{m}");
    assert_eq!(series(&m, "ringfence_throttled_requests_total"), Some(0.0));

    // Set, and read back.
    let set = "limits: iops-total=2000 bps-read=20971520";
    assert_eq!(
        limits_ok(stats, &["--iops-total", "2000", "--bps-read", "20M"]),
        set
    );
    assert_eq!(limits_ok(stats, &[]), set);
    let m = ask(stats, "metrics\n");
    assert!(
        m.lines()
            .any(|l| l == "ringfence_io_limit{limit=\"iops-total\"} 2000"),
        "{m}"
    );
    assert_eq!(
        series(&m, "ringfence_io_limit{limit=\"bps-read\"}"),
        Some(20971520.0)
    );
    assert_eq!(series(&m, "ringfence_io_limit{limit=\"iops-read\"}"), None);
    assert!(!m.contains("ringfence_io_limit_burst{"), "{m}");
    assert!(
        m.contains("# TYPE ringfence_throttled_seconds_total counter"),
        "{m}"
    );
    // HTTP, as curl --unix-socket asks.
    let http = ask(stats, "GET /limits HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(http.starts_with("HTTP/1.0 200 OK"), "{http}");
    assert!(http.ends_with(&format!("\r\n\r\n{set}\n")), "{http}");

    // A bad set is refused before anything is sent: the same line whether or not a daemon
    // listens, and the running limits stay.
    let e = limits_err(stats, &["--iops-total", "0"]);
    assert!(
        e.starts_with("ringfence: error: I/O limits: iops-total: must be a positive number"),
        "{e}"
    );
    let dead = d.dir.path().join("nobody.sock");
    assert_eq!(limits_err(&dead, &["--iops-total", "0"]), e);
    let e = limits_err(stats, &["--bps-write-max", "40M"]);
    assert!(e.contains("bps-write-max"), "{e}");
    // The flags are the daemon's: a negative number is a value, refused as such.
    let e = limits_err(stats, &["--iops-read", "-3"]);
    assert!(
        e.contains("iops-read") && e.contains("must be a positive number"),
        "{e}"
    );
    assert_eq!(limits_ok(stats, &[]), set);
    // --none and limits do not mix.
    let e = limits_err(stats, &["--none", "--iops-total", "5"]);
    assert!(e.contains("--none"), "{e}");
    assert_eq!(limits_ok(stats, &[]), set);

    // The daemon refuses what the client would have: `error: `, and the limits stay.
    let raw = ask(stats, "limits iops-total=0\n");
    assert!(
        raw.starts_with("error: iops-total: must be a positive number"),
        "{raw}"
    );
    assert!(
        raw.ends_with(&format!("the limits stay {}\n", &set["limits: ".len()..])),
        "{raw}"
    );
    let raw = ask(stats, "limits iops-total=100 iops-total-max=50\n");
    assert!(raw.starts_with("error: iops-total-max:"), "{raw}");
    let raw = ask(stats, "limits frobnicate=3\n");
    assert!(
        raw.starts_with("error: unknown limit 'frobnicate'"),
        "{raw}"
    );
    let http = ask(stats, "POST /limits?iops-total=0 HTTP/1.1\r\n\r\n");
    assert!(http.starts_with("HTTP/1.0 400"), "{http}");
    assert_eq!(limits_ok(stats, &[]), set);
    assert_eq!(
        series(
            &ask(stats, "metrics\n"),
            "ringfence_io_limit{limit=\"iops-total\"}"
        ),
        Some(2000.0)
    );

    // Limits given replace all of them: those not given are removed.
    assert_eq!(
        limits_ok(
            stats,
            &[
                "--iops-write",
                "500",
                "--iops-write-max",
                "1000",
                "--iops-write-max-length",
                "4"
            ]
        ),
        "limits: iops-write=500 iops-write-max=1000 iops-write-max-length=4"
    );
    let m = ask(stats, "metrics\n");
    assert_eq!(
        series(&m, "ringfence_io_limit{limit=\"iops-total\"}"),
        None,
        "{m}"
    );
    assert_eq!(
        series(&m, "ringfence_io_limit{limit=\"iops-write\"}"),
        Some(500.0)
    );
    assert_eq!(
        series(&m, "ringfence_io_limit_burst{limit=\"iops-write\"}"),
        Some(1000.0)
    );

    // --none removes them all.
    assert_eq!(limits_ok(stats, &["--none"]), "limits: none");
    assert_eq!(limits_ok(stats, &[]), "limits: none");
    let m = ask(stats, "metrics\n");
    assert!(!m.contains("ringfence_io_limit"), "{m}");
    // The daemon logged each change.
    assert!(logged(&d.proc, "I/O limits: none"), "{}", d.proc.stderr());
}

#[test]
fn an_error_answer_fails_the_command_with_the_daemons_words() {
    // A stand-in for the daemon: records the line it gets, answers an error.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stats.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).expect("read the request");
        c.write_all(b"error: limits refused: uid 1234 may read the statistics\n")
            .expect("answer");
        got
    });
    let e = limits_err(
        &path,
        &[
            "--iops-total",
            "5",
            "--bps-total-max",
            "2M",
            "--bps-total",
            "1M",
        ],
    );
    assert_eq!(
        e,
        "ringfence: error: limits refused: uid 1234 may read the statistics"
    );
    // The line sent: every limit in bytes and operations per second, as the daemon reads it.
    assert_eq!(
        server.join().expect("server"),
        "limits iops-total=5 bps-total=1048576 bps-total-max=2097152 bps-total-max-length=1\n"
    );
}

#[test]
fn limits_from_the_command_line_show_in_limits_metrics_and_stat() {
    let d = start(&[
        "--iops-total",
        "50",
        "--iops-total-max",
        "100",
        "--bps-total",
        "64M",
    ]);
    let stats = &d.stats;
    let set = "limits: iops-total=50 iops-total-max=100 iops-total-max-length=1 bps-total=67108864";
    assert_eq!(limits_ok(stats, &[]), set);
    let m = ask(stats, "metrics\n");
    assert_eq!(
        series(&m, "ringfence_io_limit{limit=\"iops-total\"}"),
        Some(50.0)
    );
    assert_eq!(
        series(&m, "ringfence_io_limit_burst{limit=\"iops-total\"}"),
        Some(100.0)
    );
    assert_eq!(
        series(&m, "ringfence_io_limit{limit=\"bps-total\"}"),
        Some(67108864.0)
    );

    // 60 reads at once against 50 IOPS with a burst of 100 for 1 s (50 operations of
    // tolerance, and a tenth of a second of the burst rate): some of them wait.
    let mut c = Client::connect(&d.socket, ClientOpts::default()).expect("connect a client");
    let reqs: Vec<(u64, usize, usize)> = (0..60).map(|i| (i * 4096, 0, 4096)).collect();
    let rets = c.queues[0].read_many(&reqs);
    assert!(rets.iter().all(|&r| r == 0), "{rets:?}");
    let m = ask(stats, "metrics\n");
    let waited = series(&m, "ringfence_throttled_requests_total").expect("counter");
    let seconds = series(&m, "ringfence_throttled_seconds_total").expect("counter");
    assert!(waited > 0.0 && seconds > 0.0, "{waited} {seconds}\n{m}");

    // `ringfence stat`: the limits and the waits, the rest of the table as it was.
    let out = run_to_exit(
        Command::new(bin())
            .arg("stat")
            .arg("--stats-socket")
            .arg(stats),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let t = &out.stdout;
    assert!(t.lines().any(|l| l == set), "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with("throttled: "))
        .unwrap_or_else(|| panic!("no throttled line in:\n{t}"));
    assert!(
        line.starts_with(&format!("throttled: {waited} requests waited (")),
        "{line}"
    );
    let read = t
        .lines()
        .find(|l| l.split_whitespace().next() == Some("read"))
        .unwrap_or_else(|| panic!("no read row in:\n{t}"));
    assert_eq!(read.split_whitespace().nth(3), Some("60"), "{t}");

    // Without limits, stat says so in one line, and nothing about waits.
    assert_eq!(limits_ok(stats, &["--none"]), "limits: none");
    let out = run_to_exit(
        Command::new(bin())
            .arg("stat")
            .arg("--stats-socket")
            .arg(stats),
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.lines().any(|l| l == "limits: none"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("throttled:"), "{}", out.stdout);
    drop(c);
}

#[test]
fn the_systemd_env_examples_are_options_the_daemon_takes() {
    use clap::Parser;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/ringfence.env");
    let text = std::fs::read_to_string(&path).expect("contrib/systemd/ringfence.env");
    let examples: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#RINGFENCE_OPTS="))
        .collect();
    assert!(
        examples.iter().any(|e| e.contains("--iops-total")),
        "{examples:?}"
    );
    for opts in examples {
        // As the unit runs it: its own options, then $RINGFENCE_OPTS split at spaces.
        let argv = ["ringfence", "--fd", "3", "--blk-file", "/x.img"]
            .into_iter()
            .chain(opts.split_whitespace());
        let o =
            ringfence::cli::Options::try_parse_from(argv).unwrap_or_else(|e| panic!("{opts}: {e}"));
        o.limits
            .to_limits()
            .unwrap_or_else(|e| panic!("{opts}: {e}"));
    }
}

/// With a stats socket everyone may connect to, another uid (nobody, through `setpriv`) reads
/// the limits but may not change them, and they stay; the refusal is logged. As `resize`:
/// `tests/access.rs`.
#[test]
fn only_the_daemons_uid_or_root_may_change_the_limits() {
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    let d = start(&["--socket-mode", "666", "--iops-total", "2000"]);
    // Traversable by nobody, so that only the socket's mode decides.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let as_nobody = |args: &[&str]| {
        run_to_exit(
            Command::new("setpriv")
                .arg(format!("--reuid={NOBODY}"))
                .arg(format!("--regid={NOBODY}"))
                .arg("--clear-groups")
                .arg(bin())
                .arg("limits")
                .arg("--stats-socket")
                .arg(&d.stats)
                .args(args),
        )
    };
    let out = as_nobody(&[]);
    assert!(
        out.status.success() && out.stdout == "limits: iops-total=2000\n",
        "nobody may read the limits: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    for args in [&["--iops-total", "1"][..], &["--none"]] {
        let out = as_nobody(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.stdout);
        assert!(
            out.stderr
                .starts_with("ringfence: error: limits refused: uid 65534"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(limits_ok(&d.stats, &[]), "limits: iops-total=2000");
    assert!(
        logged(&d.proc, "limits (stats socket): refused to uid 65534"),
        "the refusal is logged:\n{}",
        d.proc.stderr()
    );
}
