//! What dirty logging costs end to end: ringfence serving 4k random reads at queue depth 32
//! to our own vhost-user frontend (`guest-tests/src/frontend.rs`), with the migration's dirty
//! log off (A) and on (B: SET_LOG_BASE with a sealed memfd, then SET_FEATURES with LOG_ALL, the
//! order QEMU uses), interleaved A B A B on one connection so that the machine's drift hits both
//! alike. The frontend refills each request as soon as its completion is seen (one kick per
//! batch of completions). The `blkio` client of `blkbench` cannot do this: it never negotiates
//! LOG_ALL.
//!
//! `cargo bench --bench log_ab [-- --rounds N --secs S]` (defaults 6 rounds of 2 s each way)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk;
use ringfence_guest_tests::daemon::Daemon;
use ringfence_guest_tests::frontend::{pfeat, vfeat, Frontend};
use ringfence_guest_tests::memory::DirtyLog;
use ringfence_guest_tests::rig::{Session, SessionCfg, WANTED_FEATURES, WANTED_PROTOCOL};
use ringfence_guest_tests::virtq::Desc;

const DEPTH: usize = 32;
const IMAGE: u64 = 1 << 30;
const RAM: (u64, u64) = (0x10_0000, 16 << 20);

fn main() {
    let (mut rounds, mut secs) = (6u32, 2.0f64);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--secs" => secs = args.next().and_then(|v| v.parse().ok()).expect("--secs S"),
            _ => {}
        }
    }
    // On the disk (not tmpfs): the project's benches measure a real disk with O_DIRECT.
    let dir = tempfile::Builder::new()
        .prefix("log-ab-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch directory");
    let image: PathBuf = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(IMAGE))
        .expect("create the image");
    // Fill it, so that reads come from the disk rather than from holes.
    std::fs::write(&image, vec![0x5a; IMAGE as usize]).expect("fill the image");
    let sock = dir.path().join("rf.sock");
    let image_arg = image.to_string_lossy().into_owned();
    let daemon = Daemon::ringfence(&sock, &["--blk-file", &image_arg]);

    let cfg = SessionCfg {
        features: WANTED_FEATURES | vfeat::RING_EVENT_IDX,
        protocol: WANTED_PROTOCOL | pfeat::LOG_SHMFD,
        queues: 1,
        queue_size: 256,
        layout: vec![RAM],
    };
    let fe = Frontend::connect(&sock).expect("connect to ringfence");
    let mut s = Session::establish(fe, &cfg).expect("set up the session");
    let offered = s.fe.get_features().expect("GET_FEATURES");
    assert_ne!(offered & vfeat::LOG_ALL, 0, "LOG_ALL is offered");
    assert_ne!(s.protocol & pfeat::LOG_SHMFD, 0, "LOG_SHMFD is offered");
    let features = s.features;
    s.mem.waive_comparison();
    let log = DirtyLog::guarded("vhost-log", RAM.0 + RAM.1, None);

    // DEPTH requests, each with a header, a 4 KiB buffer and a status byte of its own.
    let mut hdrs = Vec::new();
    let mut heads = Vec::new();
    for i in 0..DEPTH {
        let hdr = s.put(&blk::header(blk::T_IN, i as u64 * 8));
        let data = s.alloc(4096, 4096);
        let st = s.status();
        let head = s.queues[0].chain(
            &s.mem,
            &[Desc::r(hdr, 16), Desc::w(data, 4096), Desc::w(st, 1)],
        );
        hdrs.push(hdr);
        heads.push(head);
    }
    let by_head = |h: u32| {
        heads
            .iter()
            .position(|&x| u32::from(x) == h)
            .expect("a head of ours")
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut sector = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % (IMAGE / 4096)) * 8
    };
    for &h in &heads {
        s.queues[0].push(&s.mem, h);
    }
    s.kick(0);

    let mut run = |s: &mut Session, dur: Duration| -> f64 {
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < dur {
            // EVENT_IDX: ask for a notification at the next used entry, as a guest driver does.
            let q = &s.queues[0];
            s.mem.store_u16(q.used_event_gpa(), q.last_used);
            let deadline = Instant::now() + Duration::from_secs(10);
            let first = s.queues[0]
                .wait_used(&s.mem, deadline, None)
                .expect("a completion within 10 s");
            let mut refill = vec![first];
            while let Some(u) = s.queues[0].pop_used(&s.mem) {
                refill.push(u);
            }
            for u in refill {
                let i = by_head(u.id);
                s.mem.write_u64(hdrs[i] + 8, sector());
                s.queues[0].push(&s.mem, heads[i]);
                done += 1;
            }
            s.kick(0);
        }
        done as f64 / start.elapsed().as_secs_f64()
    };

    let dur = Duration::from_secs_f64(secs);
    run(&mut s, Duration::from_millis(500)); // warm-up
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        s.fe.set_features(features).expect("LOG_ALL off");
        let a = run(&mut s, dur);
        s.fe.set_log_base(log.size, log.offset, &[log.fd()])
            .expect("SET_LOG_BASE");
        s.fe.set_features(features | vfeat::LOG_ALL)
            .expect("LOG_ALL on");
        let b = run(&mut s, dur);
        println!(
            "round {r}: logging off {a:.0} IOPS, on {b:.0} IOPS, on/off {:.3}",
            b / a
        );
        off.push(a);
        on.push(b);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut ratios: Vec<f64> = on.iter().zip(&off).map(|(b, a)| b / a).collect();
    println!(
        "4k randread QD{DEPTH}: logging off {:.0} IOPS, on {:.0} IOPS (medians); median of per-round \
         ratios on/off {:.3} ({} pages marked in the log)",
        median(&mut off),
        median(&mut on),
        median(&mut ratios),
        log.pages().len()
    );
    drop(s);
    log.mem.waive_comparison();
    drop(daemon);
}
