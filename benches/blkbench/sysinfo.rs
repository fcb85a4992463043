//! What the report says about the machine and the software under test.

use std::path::Path;
use std::process::Command;

pub struct Machine {
    pub date: String,
    pub host: String,
    pub cpu: String,
    pub cpus: usize,
    pub mem_gib: f64,
    pub kernel: String,
    pub os: String,
    pub fs: String,
    pub commit: String,
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn cmd(prog: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(prog).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Filesystem type and source device of the mount holding `path` (longest mount prefix).
fn filesystem_of(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(usize, String)> = None;
    for line in read("/proc/self/mountinfo").lines() {
        // id parent major:minor root mountpoint opts ... - fstype source superopts
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(mp), Some(dash)) = (f.get(4), f.iter().position(|x| *x == "-")) else {
            continue;
        };
        if !path.starts_with(mp) {
            continue;
        }
        let fstype = f.get(dash + 1).copied().unwrap_or("?");
        let source = f.get(dash + 2).copied().unwrap_or("?");
        if best.as_ref().is_none_or(|(l, _)| mp.len() >= *l) {
            best = Some((mp.len(), format!("{fstype} on {source}")));
        }
    }
    best.map(|b| b.1).unwrap_or_else(|| "?".into())
}

pub fn machine(image: &Path, date: String) -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "?".into());
    let root = env!("CARGO_MANIFEST_DIR");
    let mut commit = cmd("git", &["-C", root, "rev-parse", "--short", "HEAD"]).unwrap_or_default();
    if cmd("git", &["-C", root, "diff", "--quiet", "HEAD", "--", "src"]).is_none()
        && !commit.is_empty()
    {
        commit.push_str(" + uncommitted src/ changes");
    }
    Machine {
        date,
        host: cmd("hostname", &[]).unwrap_or_else(|| read("/etc/hostname").trim().to_string()),
        cpu,
        cpus,
        mem_gib: mem_kib / (1024.0 * 1024.0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        os,
        fs: filesystem_of(image),
        commit,
    }
}

/// UTC date and time, `YYYY-MM-DD HH:MM UTC`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}
