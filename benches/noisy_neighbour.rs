//! A noisy neighbour on a shared disk, with and without I/O limits (issue 25): two ringfence
//! daemons serve two images on the same filesystem; the *victim* client reads 4k at random at
//! QD1 (latency-bound, like a database's reads) while the *neighbour* client reads 4k at random
//! at QD32 as fast as it can. Runs alternate (A B A B) between the neighbour's daemon without
//! limits and with `--iops-total LIMIT`, after one run of the victim alone; each prints the
//! victim's p50 and p99 latency and both clients' IOPS. blkbench's own load generator
//! (`benches/blkbench/engine.rs`) drives both.
//!
//! `cargo bench --bench noisy_neighbour [-- --limit 2000 --seconds 5 --rounds 2 --work-dir DIR]`

#[allow(dead_code)]
#[path = "blkbench/engine.rs"]
mod engine;
#[allow(dead_code)]
#[path = "blkbench/hist.rs"]
mod hist;
#[allow(dead_code)]
#[path = "blkbench/procstat.rs"]
mod procstat;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use engine::{Endpoint, Pattern, RunResult, Timing, Workload};

const IMAGE_SIZE: u64 = 1 << 30;

struct Args {
    limit: u64,
    seconds: f64,
    rounds: usize,
    work_dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        limit: 2000,
        seconds: 5.0,
        rounds: 2,
        work_dir: PathBuf::from("target/blkbench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--limit" => a.limit = v().parse().expect("--limit N"),
            "--seconds" => a.seconds = v().parse().expect("--seconds S"),
            "--rounds" => a.rounds = v().parse().expect("--rounds N"),
            "--work-dir" => a.work_dir = PathBuf::from(v()),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

/// A fully written image (reads of holes would never reach the disk).
fn prepare(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == IMAGE_SIZE) {
        return;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("create the image");
    let chunk = vec![0x5au8; 1 << 20];
    // O_DIRECT wants an aligned buffer: copy into one.
    let layout = std::alloc::Layout::from_size_align(chunk.len(), 4096).expect("layout");
    // SAFETY: a fresh allocation of `layout`'s size, freed below; written before it is read.
    let buf = unsafe { std::alloc::alloc(layout) };
    assert!(!buf.is_null());
    // SAFETY: `buf` holds chunk.len() bytes.
    let aligned = unsafe {
        std::ptr::copy_nonoverlapping(chunk.as_ptr(), buf, chunk.len());
        std::slice::from_raw_parts(buf, chunk.len())
    };
    for _ in 0..(IMAGE_SIZE >> 20) {
        f.write_all(aligned).expect("write the image");
    }
    f.sync_all().expect("sync the image");
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
}

/// A ringfence daemon on `image`, ready on `sock`.
fn daemon(bin: &Path, image: &Path, sock: &Path, extra: &[String]) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(bin)
        .arg("--socket-path")
        .arg(sock)
        .arg("--blk-file")
        .arg(image)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringfence");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(ringfence::daemon::READY_MARKER) => break,
            Some(Ok(_)) => continue,
            _ => panic!("ringfence did not start"),
        }
    }
    // Keep reading its stderr so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

fn stop(mut c: Child) {
    // SAFETY: kill with a pid we own and a valid signal.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

fn workload(qd: u32) -> Workload {
    let mut w = Workload::new(true, 100, 4096, qd);
    w.pattern = Pattern::Batch(1);
    w
}

/// The victim's run, and the neighbour's if there is one, side by side.
fn run_pair(victim: &Path, neighbour: Option<&Path>, t: &Timing) -> (RunResult, Option<RunResult>) {
    std::thread::scope(|s| {
        let n = neighbour
            .map(|p| s.spawn(move || engine::run(&Endpoint::VhostUser(p), &workload(32), t, None)));
        let v =
            engine::run(&Endpoint::VhostUser(victim), &workload(1), t, None).expect("victim run");
        let n = n.map(|h| h.join().expect("neighbour thread").expect("neighbour run"));
        (v, n)
    })
}

fn main() {
    let a = args();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ringfence"));
    std::fs::create_dir_all(&a.work_dir).expect("work dir");
    let (img_v, img_n) = (
        a.work_dir.join("victim.img"),
        a.work_dir.join("neighbour.img"),
    );
    prepare(&img_v);
    prepare(&img_n);
    let (sock_v, sock_n) = (
        a.work_dir.join("victim.sock"),
        a.work_dir.join("neighbour.sock"),
    );
    let t = Timing {
        warmup: Duration::from_millis(500),
        duration: Duration::from_secs_f64(a.seconds),
    };
    let v_daemon = daemon(&bin, &img_v, &sock_v, &[]);
    println!(
        "| neighbour | victim 4k QD1 p50 µs | p99 µs | victim IOPS | neighbour 4k QD32 IOPS |"
    );
    println!("| --- | --: | --: | --: | --: |");
    let row = |what: &str, v: &RunResult, n: Option<&RunResult>| {
        println!(
            "| {what} | {:.1} | {:.1} | {:.0} | {} |",
            v.p50_ns / 1e3,
            v.p99_ns / 1e3,
            v.iops(),
            n.map_or("—".to_string(), |n| format!("{:.0}", n.iops()))
        );
    };
    let (alone, _) = run_pair(&sock_v, None, &t);
    row("none (victim alone)", &alone, None);
    let limit = format!("{}", a.limit);
    for _ in 0..a.rounds {
        for limited in [false, true] {
            let extra: Vec<String> = if limited {
                vec!["--iops-total".into(), limit.clone()]
            } else {
                Vec::new()
            };
            let n_daemon = daemon(&bin, &img_n, &sock_n, &extra);
            let (v, n) = run_pair(&sock_v, Some(&sock_n), &t);
            let what = if limited {
                format!("--iops-total {limit}")
            } else {
                "no limit".to_string()
            };
            row(&what, &v, n.as_ref());
            stop(n_daemon);
        }
    }
    stop(v_daemon);
}
