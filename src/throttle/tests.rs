use super::*;

/// Requests of `bytes` in `dir`, each started as soon as its reservation allows, over
/// `seconds` of simulated time from `t0`: how many started, and when each did.
fn run(t: &Throttle, dir: Dir, bytes: u64, seconds: f64, t0: Instant) -> Vec<Instant> {
    let end = t0 + Duration::from_secs_f64(seconds);
    let mut now = t0;
    let mut started = Vec::new();
    loop {
        let r = t.reserve(dir, bytes, now);
        if r.ready >= end {
            return started;
        }
        now = r.ready;
        started.push(now);
    }
}

fn limits(words: &str) -> IoLimits {
    IoLimits::parse_words(words.split_whitespace()).expect("limits parse")
}

#[test]
fn an_iops_limit_holds_over_five_seconds_after_a_tenth_of_a_second_of_bucket() {
    let t = Throttle::new(limits("iops-total=2000"));
    let n = run(&t, Dir::Read, 4096, 5.0, Instant::now()).len();
    // 5 s at 2000/s, plus the bucket (0.1 s worth) at the start.
    assert!((10_000..=10_201).contains(&n), "{n}");
}

#[test]
fn a_bandwidth_limit_counts_bytes_and_only_its_direction() {
    let t = Throttle::new(limits("bps-write=20M"));
    let n = run(&t, Dir::Write, 128 << 10, 5.0, Instant::now()).len();
    // 20 MiB/s of 128 KiB writes: 160/s.
    assert!((800..=817).contains(&n), "{n}");
    // Reads are not limited by a write limit: they never wait.
    let now = Instant::now();
    assert_eq!(t.reserve(Dir::Read, 1 << 20, now).ready, now);
}

#[test]
fn flush_and_discard_count_as_one_write_of_no_bytes() {
    let t = Throttle::new(limits("bps-total=1M iops-write=10"));
    let t0 = Instant::now();
    // No bytes: the bandwidth limit never holds a flush back; the write IOPS limit does.
    let n = run(&t, Dir::Write, 0, 2.0, t0).len();
    assert!((20..=22).contains(&n), "{n}");
}

#[test]
fn a_burst_runs_at_the_burst_rate_then_at_the_limit() {
    let t = Throttle::new(limits(
        "iops-total=1000 iops-total-max=3000 iops-total-max-length=2",
    ));
    let t0 = Instant::now();
    let started = run(&t, Dir::Read, 4096, 6.0, t0);
    let in_window = |a: f64, b: f64| {
        started
            .iter()
            .filter(|s| {
                let x = s.duration_since(t0).as_secs_f64();
                x >= a && x < b
            })
            .count()
    };
    // The bucket holds (3000 - 1000) * 2 = 4000 more: drained at 3000 - 1000 = 2000 a second
    // over the limit, so about 2 s at the burst rate, then the limit.
    let first = in_window(0.0, 1.0);
    assert!((2900..=3400).contains(&first), "first second: {first}");
    let late = in_window(4.0, 6.0);
    assert!((1990..=2010).contains(&late), "seconds 4 to 6: {late}");
}

#[test]
fn total_and_direction_limits_both_hold() {
    let t = Throttle::new(limits("iops-total=1000 iops-read=100"));
    let t0 = Instant::now();
    let reads = run(&t, Dir::Read, 512, 2.0, t0).len();
    assert!((200..=211).contains(&reads), "{reads}");
}

#[test]
fn a_new_set_replaces_every_limit_and_moves_the_generation_on() {
    let t = Throttle::new(limits("iops-total=10"));
    assert!(t.active());
    let g = t.generation();
    t.set(IoLimits::default()).expect("no limits");
    assert!(!t.active());
    assert_eq!(t.generation(), g + 1);
    let bad = limits("iops-total=5");
    let mut worse = bad.clone();
    worse.iops[0] = Some(Limit::new(0));
    assert!(t.set(worse).is_err());
    assert!(!t.active(), "a refused set leaves the running one");
    assert_eq!(t.generation(), g + 1);
}

#[test]
fn bad_limits_are_refused_with_their_name() {
    let err = |w: &str| {
        IoLimits::parse_words(w.split_whitespace())
            .expect_err(w)
            .to_string()
    };
    assert!(err("iops-total=0").contains("iops-total: must be a positive"));
    assert!(err("iops-total=-5").contains("iops-total: must be a positive number"));
    assert!(err("iops-total=five").contains("iops-total: 'five' is not a number"));
    assert!(err("bps-read=99999999999999999999").contains("bps-read: above the largest"));
    assert!(err("bps-read=2T").contains("above the largest limit"));
    assert!(err("bps-read=100").contains("below the smallest limit"));
    assert!(err("iops-read=100 iops-read-max=50").contains("must be above the rate"));
    assert!(err("iops-read=100 iops-read-max=500 iops-read-max-length=0").contains("max-length"));
    assert!(err("iops-write-max=5").contains("without iops-write"));
    assert!(err("iops-everything=5").contains("unknown limit"));
    assert!(err("iops-total").contains("unknown limit"));
}

#[test]
fn limits_read_back_as_they_were_written() {
    let l = limits("bps-read=20M iops-total=2000 iops-total-max=4000 iops-total-max-length=3");
    assert_eq!(l.bps[Dir::Read as usize], Some(Limit::new(20 << 20)));
    assert_eq!(
        l.to_string(),
        "iops-total=2000 iops-total-max=4000 iops-total-max-length=3 bps-read=20971520"
    );
    assert_eq!(limits(&l.to_string()), l);
    assert_eq!(IoLimits::default().to_string(), "none");
    assert_eq!(limits(""), IoLimits::default());
}
