//! CPU time of a process from /proc/PID/stat (utime + stime over all its threads, including
//! io_uring workers, which the kernel accounts to the owning process).

use std::sync::OnceLock;

fn clock_ticks() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            t as f64
        } else {
            100.0
        }
    })
}

/// Fields after the command name: index 0 is the state (field 3 of proc(5)).
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn cpu_of(path: &str) -> Option<f64> {
    let f = stat_fields(path)?;
    // utime is field 14, stime field 15 (indexes 11 and 12 here).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// user + system CPU seconds of `pid` so far.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    cpu_of(&format!("/proc/{pid}/stat"))
}

/// user + system CPU seconds of this process so far.
pub fn self_cpu_seconds() -> Option<f64> {
    cpu_of("/proc/self/stat")
}

/// Whether `pid` exists and is not a zombie.
pub fn is_running(pid: i32) -> bool {
    match stat_fields(&format!("/proc/{pid}/stat")) {
        Some(f) => f.first().map(String::as_str) != Some("Z"),
        None => false,
    }
}
