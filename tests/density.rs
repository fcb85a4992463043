//! Density: operators run one backend per disk, dozens per host. This starts 16 ringfence
//! daemons on 16 images, connects a blkio client (a VMM) to each, does a little I/O, then leaves
//! them all connected and idle, and measures:
//!
//! - memory: from `/proc/PID/smaps_rollup`, each daemon's own memory (anonymous, plus its share
//!   of the binary's pages, which the 16 share: Pss_Anon + Pss_File) apart from guest RAM
//!   (RssShmem: the VMM's memory, mapped and pinned for io_uring, not allocated by ringfence);
//! - CPU while idle: user + system time of each whole process (all threads) over a window with
//!   no I/O. It must be zero: workers sleep in epoll once the polling window closes, and no
//!   thread wakes up on a timer.
//!
//! Run with `--nocapture` to see the report (README "Deployment" quotes it).

mod common;

use std::time::{Duration, Instant};

use common::*;

const DAEMONS: usize = 16;
/// How long the daemons are watched while idle.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// Fields of /proc/PID/smaps_rollup, in KiB.
fn smaps(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in smaps_rollup of {pid}:\n{text}"))
}

/// utime + stime of the whole process (all its threads), in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(") ").expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ") ".
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A field of /proc/PID/status, in KiB.
fn status_kib(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in status of {pid}"))
}

/// Wait (bounded) until every thread of `pid` sleeps (state S): after the last request, a
/// worker polls for at most --poll-us before it goes back to epoll.
fn wait_asleep(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut running = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let state = stat
                .rfind(") ")
                .and_then(|i| stat[i + 2..].split_whitespace().next())
                .unwrap_or("?");
            if state != "S" {
                running.push(format!("{} {state}", t.file_name().to_string_lossy()));
            }
        }
        if running.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "threads of {pid} still not asleep: {running:?}"
        );
        std::thread::yield_now();
    }
}

/// Per-thread CPU ticks (for the failure message).
fn thread_ticks(pid: i32) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(i) = stat.rfind(") ") {
            let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
            let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            v.push((comm.trim().to_string(), ticks));
        }
    }
    v
}

#[test]
fn sixteen_idle_daemons_cost_little_memory_and_no_cpu() {
    let mut backends: Vec<Backend> = (0..DAEMONS)
        .map(|_| {
            Backend::start_on(
                Target::Ringfence,
                BackendOpts {
                    size: 256 * MIB,
                    ..BackendOpts::default()
                },
            )
        })
        .collect();
    let mut clients: Vec<Client> = backends
        .iter()
        .map(|b| b.connect(ClientOpts::default()))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let data = pattern(i as u64, 0, 64 * 1024);
        c.q().write(0, &data).unwrap();
        assert_same("read back", 0, &c.q().read(0, data.len()).unwrap(), &data);
    }
    let pids: Vec<i32> = backends.iter_mut().map(|b| b.daemon().pid()).collect();

    // Idle, connected: the window opens once every thread sleeps (the workers' polling windows
    // after their last requests have closed).
    for &p in &pids {
        wait_asleep(p);
    }
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let threads_before: Vec<_> = pids.iter().map(|&p| thread_ticks(p)).collect();
    let t = Instant::now();
    std::thread::sleep(IDLE_WINDOW);
    let elapsed = t.elapsed();
    let after: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();

    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut anon = 0;
    let mut file = 0;
    let mut shmem = 0;
    let mut rss = 0;
    let mut pte = 0;
    for &p in &pids {
        pte += status_kib(p, "VmPTE");
        anon += smaps(p, "Pss_Anon");
        file += smaps(p, "Pss_File");
        shmem += status_kib(p, "RssShmem");
        rss += status_kib(p, "VmRSS");
    }
    let own = anon + file;
    let per = own as f64 / DAEMONS as f64;
    let idle_ticks: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    let report = format!(
        "density: {DAEMONS} daemons, each with a VMM (blkio client) connected and idle, 1 queue:\n\
         \x20 memory of their own (Pss_Anon + Pss_File): {own} KiB in total, {per:.0} KiB per \
         daemon, so about {:.0} daemons per GiB\n\
         \x20 VmRSS in total {rss} KiB, of which guest RAM mapped from the VMMs (RssShmem) \
         {shmem} KiB; page tables (VmPTE) {pte} KiB\n\
         \x20 CPU while idle over {:.1} s: {idle_ticks} ticks in total ({:.3} s; ticks of \
         1/{hz} s)",
        (1024.0 * 1024.0) / per,
        elapsed.as_secs_f64(),
        idle_ticks as f64 / hz,
    );
    eprintln!("{report}");
    if idle_ticks != 0 {
        let mut detail = String::new();
        for (i, &p) in pids.iter().enumerate() {
            let now = thread_ticks(p);
            for (name, t) in &now {
                let was = threads_before[i]
                    .iter()
                    .find(|(n, _)| n == name)
                    .map_or(0, |(_, t)| *t);
                if *t > was {
                    detail.push_str(&format!("  daemon {i} thread {name}: +{} ticks\n", t - was));
                }
            }
        }
        panic!("idle daemons used CPU:\n{detail}{report}");
    }
    // The memory budget this project states in its README: well under 16 MiB of its own per
    // daemon.
    assert!(per < 16.0 * 1024.0, "{report}");
    drop(clients.drain(..));
    for b in &mut backends {
        assert!(b.is_alive());
    }
}
