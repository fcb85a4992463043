use super::*;

#[test]
fn sizes_parse_with_suffixes_and_reject_nonsense() {
    assert_eq!(parse_size("512"), Ok(512));
    assert_eq!(parse_size("64M"), Ok(64 << 20));
    assert_eq!(parse_size("1g"), Ok(1 << 30));
    assert!(parse_size("0").is_err());
    assert!(parse_size("513").is_err());
    assert!(parse_size("12Q").is_err());
    assert!(parse_size("99999999999T").is_err());
    assert!(parse_size("").is_err());
}

#[test]
fn queue_size_must_be_power_of_two_in_range() {
    assert_eq!(parse_queue_size("256"), Ok(256));
    assert!(parse_queue_size("0").is_err());
    assert!(parse_queue_size("100").is_err());
    assert!(parse_queue_size("2048").is_err());
}

#[test]
fn serial_is_at_most_twenty_bytes() {
    assert!(parse_serial("01234567890123456789").is_ok());
    assert!(parse_serial("012345678901234567890").is_err());
}

#[test]
fn contract_option_names_parse() {
    let o = Options::try_parse_from([
        "ringfence",
        "--socket-path",
        "/tmp/x.sock",
        "--blk-file",
        "/tmp/x.img",
        "--read-only",
        "--num-queues",
        "2",
        "--cache",
        "none",
    ])
    .expect("contract options parse");
    assert!(o.read_only);
    assert_eq!(o.num_queues, 2);
    assert_eq!(o.cache, Some(CacheMode::None));
}

#[test]
fn commands_for_a_running_daemon_parse_without_daemon_options() {
    let o = Options::try_parse_from([
        "ringfence",
        "stat",
        "--stats-socket",
        "/run/x.stats",
        "--watch",
        "--interval",
        "0.5",
    ])
    .expect("stat parses without --blk-file");
    match o.command {
        Some(Command::Stat(s)) => {
            assert!(s.watch);
            assert_eq!(s.interval, 0.5);
            assert_eq!(s.stats_socket, PathBuf::from("/run/x.stats"));
        }
        other => panic!("{other:?}"),
    }
    let o = Options::try_parse_from(["ringfence", "resize", "--stats-socket", "/s"])
        .expect("resize parses");
    assert!(matches!(o.command, Some(Command::Resize(_))));
    // Daemon options and a command do not mix; a command needs its socket.
    assert!(Options::try_parse_from(["ringfence", "--blk-file", "x", "stat"]).is_err());
    assert!(Options::try_parse_from(["ringfence", "stat"]).is_err());
    assert!(Options::try_parse_from([
        "ringfence",
        "stat",
        "--stats-socket",
        "/s",
        "--interval",
        "0"
    ])
    .is_err());
    // The daemon still requires its image.
    assert!(Options::try_parse_from(["ringfence", "--socket-path", "/s"]).is_err());
}

#[test]
fn limits_parses_without_daemon_options() {
    let o = Options::try_parse_from(["ringfence", "limits", "--stats-socket", "/s"])
        .expect("limits parses without --blk-file");
    match o.command {
        Some(Command::Limits(l)) => {
            assert_eq!(l.stats_socket, PathBuf::from("/s"));
            assert!(!l.none);
            assert!(l.limits.words().is_empty());
        }
        other => panic!("{other:?}"),
    }
    let o = Options::try_parse_from([
        "ringfence",
        "limits",
        "--stats-socket",
        "/s",
        "--iops-total",
        "2000",
        "--bps-read",
        "20M",
        "--bps-read-max",
        "40M",
        "--bps-read-max-length",
        "3",
    ])
    .expect("limits with the daemon's limit flags");
    let Some(Command::Limits(l)) = o.command else {
        panic!("{:?}", o.command)
    };
    assert_eq!(
        l.limits.words(),
        [
            "iops-total=2000",
            "bps-read=20M",
            "bps-read-max=40M",
            "bps-read-max-length=3"
        ]
    );
    let limits = l.limits.to_limits().expect("valid limits");
    assert_eq!(
        limits.to_words(),
        [
            "iops-total=2000",
            "bps-read=20971520",
            "bps-read-max=41943040",
            "bps-read-max-length=3"
        ]
    );
    let o = Options::try_parse_from(["ringfence", "limits", "--stats-socket", "/s", "--none"])
        .expect("--none");
    assert!(matches!(o.command, Some(Command::Limits(l)) if l.none));
    // --none and a limit do not mix; the command needs its socket; a daemon option is not
    // one of its options.
    assert!(Options::try_parse_from([
        "ringfence",
        "limits",
        "--stats-socket",
        "/s",
        "--none",
        "--iops-write",
        "5"
    ])
    .is_err());
    assert!(Options::try_parse_from(["ringfence", "limits", "--iops-total", "5"]).is_err());
    assert!(Options::try_parse_from([
        "ringfence",
        "limits",
        "--stats-socket",
        "/s",
        "--blk-file",
        "x"
    ])
    .is_err());
    // The daemon takes the same flags.
    let o = Options::try_parse_from(["ringfence", "--blk-file", "x", "--iops-total", "2000"])
        .expect("daemon with a limit");
    assert_eq!(o.limits.words(), ["iops-total=2000"]);
}
