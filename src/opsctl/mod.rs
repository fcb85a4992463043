//! The client side of the stats socket: `ringfence stat` (a table with rates, from the
//! Prometheus text the daemon serves), `ringfence resize` and `ringfence limits`. Parsing and
//! rendering are pure functions of the text; only [`request`] and its callers do I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::cli::{LimitsOptions, ResizeOptions, StatOptions};
use crate::error::OpsctlError;
use crate::stats::{ErrorKind, OpKind};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Send `line` on the stats socket at `path` and return the whole answer.
pub fn request(path: &Path, line: &str) -> Result<String, OpsctlError> {
    let mut s = UnixStream::connect(path).map_err(|source| OpsctlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let _ = s.set_write_timeout(Some(TIMEOUT));
    s.write_all(line.as_bytes())
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
        .map_err(|source| OpsctlError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|source| OpsctlError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(out)
}

/// The metrics the daemon serves now.
pub fn fetch(path: &Path) -> Result<String, OpsctlError> {
    request(path, "metrics\n")
}

/// `ringfence resize`: prints the daemon's answer; an error answer is an error.
pub fn resize(o: &ResizeOptions) -> Result<(), OpsctlError> {
    let answer = request(&o.stats_socket, "resize\n")?;
    let line = answer.trim_end();
    match line.strip_prefix("resize: ") {
        Some(m) => {
            println!("{m}");
            Ok(())
        }
        None => Err(OpsctlError::Answer(
            line.strip_prefix("error: ").unwrap_or(line).to_string(),
        )),
    }
}

/// The line `ringfence limits` sends: `limits` alone (print them), `limits none`, or `limits`
/// and the words of the limits given, validated here first (a refused set sends nothing).
pub fn limits_request(o: &LimitsOptions) -> Result<String, OpsctlError> {
    if o.none {
        return Ok("limits none\n".into());
    }
    if o.limits.words().is_empty() {
        return Ok("limits\n".into());
    }
    let limits = o.limits.to_limits()?;
    Ok(format!("limits {}\n", limits.to_words().join(" ")))
}

/// `ringfence limits`: prints the daemon's answer (`limits: ...`, the limits now); an error
/// answer is an error.
pub fn limits(o: &LimitsOptions) -> Result<(), OpsctlError> {
    let line = limits_request(o)?;
    let answer = request(&o.stats_socket, &line)?;
    let answer = answer.trim_end();
    if answer.starts_with("limits: ") {
        println!("{answer}");
        Ok(())
    } else if answer.is_empty() {
        Err(OpsctlError::Malformed(
            "the stats socket closed without an answer (is this a ringfence stats socket?)".into(),
        ))
    } else {
        Err(OpsctlError::Answer(
            answer.strip_prefix("error: ").unwrap_or(answer).to_string(),
        ))
    }
}

/// The daemon's limits as its `limits` request says them (`none`, or the words); `None` when
/// it does not answer that request (a daemon older than the I/O limits).
fn fetch_limits(path: &Path) -> Result<Option<String>, OpsctlError> {
    let answer = request(path, "limits\n")?;
    Ok(answer
        .trim_end()
        .strip_prefix("limits: ")
        .map(str::to_string))
}

/// One snapshot for the table: the metrics, and the limits.
fn snapshot(path: &Path) -> Result<View, OpsctlError> {
    let mut v = View::parse(&fetch(path)?)?;
    v.limits = fetch_limits(path)?;
    Ok(v)
}

/// `ringfence stat`.
pub fn stat(o: &StatOptions) -> Result<(), OpsctlError> {
    let first = snapshot(&o.stats_socket)?;
    let now = unix_now();
    print!("{}", render(None, &first, now - first.start_time));
    if !o.watch {
        return Ok(());
    }
    let mut prev = first;
    let mut at = Instant::now();
    let mut shown = 1;
    while o.count.is_none_or(|n| shown < n) {
        std::thread::sleep(Duration::from_secs_f64(o.interval));
        let cur = snapshot(&o.stats_socket)?;
        let now = Instant::now();
        println!();
        print!(
            "{}",
            render(Some(&prev), &cur, now.duration_since(at).as_secs_f64())
        );
        let _ = std::io::stdout().flush();
        prev = cur;
        at = now;
        shown += 1;
    }
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One sample of the text format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parse the Prometheus text format (comments and blank lines skipped). Pure.
pub fn parse_text(text: &str) -> Result<Vec<Sample>, OpsctlError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).ok_or_else(|| {
            OpsctlError::Malformed(format!("line {}: cannot parse '{line}'", n + 1))
        })?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=')?;
            let key = r[..eq].trim().to_string();
            let mut chars = r[eq + 1..].strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            r = &r[eq + 1 + 1 + end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Counters of one operation, as the table needs them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpView {
    pub requests: f64,
    pub bytes: f64,
    pub latency_sum: f64,
    /// (upper bound in seconds, cumulative count), in increasing order, +Inf last.
    pub buckets: Vec<(f64, f64)>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueView {
    pub requests: f64,
    pub bytes: f64,
    pub inflight: f64,
    pub wakeups: f64,
}

/// What the table shows, from one snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub image: String,
    pub read_only: bool,
    pub capacity: f64,
    pub start_time: f64,
    pub vmm_connected: bool,
    pub ops: BTreeMap<String, OpView>,
    pub errors: BTreeMap<String, f64>,
    pub inflight: f64,
    pub sqes: f64,
    pub enters: f64,
    pub wakeups: f64,
    pub poll_hits: f64,
    pub kernel_refusals: f64,
    pub resizes: f64,
    pub queues: BTreeMap<u32, QueueView>,
    /// The I/O limits (`none`, or their words), from the `limits` request: not in the metrics.
    pub limits: Option<String>,
    /// Requests that waited for the I/O limits, and the seconds they waited in all.
    pub throttled_requests: f64,
    pub throttled_seconds: f64,
}

impl View {
    pub fn parse(text: &str) -> Result<View, OpsctlError> {
        let samples = parse_text(text)?;
        if !samples.iter().any(|s| s.name == "ringfence_capacity_bytes") {
            return Err(OpsctlError::Malformed(
                "the answer holds no ringfence metrics (is this a ringfence stats socket?)".into(),
            ));
        }
        let mut v = View::default();
        let label = |s: &Sample, k: &str| -> Option<String> {
            s.labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        for s in &samples {
            let op = || v_op_key(label(s, "op"));
            match s.name.as_str() {
                "ringfence_info" => {
                    v.image = label(s, "image").unwrap_or_default();
                    v.read_only = label(s, "read_only").as_deref() == Some("true");
                }
                "ringfence_capacity_bytes" => v.capacity = s.value,
                "ringfence_start_time_seconds" => v.start_time = s.value,
                "ringfence_vmm_connected" => v.vmm_connected = s.value != 0.0,
                "ringfence_resizes_total" => v.resizes = s.value,
                "ringfence_requests_total" => v.ops.entry(op()).or_default().requests = s.value,
                "ringfence_io_bytes_total" => v.ops.entry(op()).or_default().bytes = s.value,
                "ringfence_request_duration_seconds_sum" => {
                    v.ops.entry(op()).or_default().latency_sum = s.value
                }
                "ringfence_request_duration_seconds_bucket" => {
                    let le = label(s, "le")
                        .and_then(|l| {
                            if l == "+Inf" {
                                Some(f64::INFINITY)
                            } else {
                                l.parse().ok()
                            }
                        })
                        .ok_or_else(|| {
                            OpsctlError::Malformed(format!("a bucket without a valid le: {s:?}"))
                        })?;
                    v.ops.entry(op()).or_default().buckets.push((le, s.value));
                }
                "ringfence_request_errors_total" => {
                    v.errors
                        .insert(label(s, "kind").unwrap_or_default(), s.value);
                }
                "ringfence_requests_in_flight" => v.inflight = s.value,
                "ringfence_sqes_total" => v.sqes = s.value,
                "ringfence_io_uring_enters_total" => v.enters = s.value,
                "ringfence_wakeups_total" => v.wakeups = s.value,
                "ringfence_poll_hits_total" => v.poll_hits = s.value,
                "ringfence_kernel_refusals_total" => v.kernel_refusals = s.value,
                "ringfence_throttled_requests_total" => v.throttled_requests = s.value,
                "ringfence_throttled_seconds_total" => v.throttled_seconds = s.value,
                name if name.starts_with("ringfence_queue_") => {
                    let Some(q) = label(s, "queue").and_then(|q| q.parse::<u32>().ok()) else {
                        continue;
                    };
                    let e = v.queues.entry(q).or_default();
                    match name {
                        "ringfence_queue_requests_total" => e.requests += s.value,
                        "ringfence_queue_io_bytes_total" => e.bytes += s.value,
                        "ringfence_queue_requests_in_flight" => e.inflight = s.value,
                        "ringfence_queue_wakeups_total" => e.wakeups = s.value,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        for o in v.ops.values_mut() {
            o.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(v)
    }
}

fn v_op_key(op: Option<String>) -> String {
    op.unwrap_or_default()
}

/// The `q` quantile (0..1) of a histogram given as cumulative buckets, interpolated linearly
/// inside its bucket (as Prometheus' `histogram_quantile` does); `None` without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                // Past the last finite bound: say the bound.
                return Some(lower);
            }
            let inside = cum - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = cum;
    }
    Some(lower)
}

fn delta(cur: f64, prev: Option<f64>) -> f64 {
    (cur - prev.unwrap_or(0.0)).max(0.0)
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn micros(s: Option<f64>) -> String {
    s.map_or_else(|| "-".to_string(), |s| format!("{:.1}", s * 1e6))
}

/// The table for `cur`; rates over `secs` against `prev` (the previous snapshot), or, without
/// one, the averages since the daemon started. Pure.
pub fn render(prev: Option<&View>, cur: &View, secs: f64) -> String {
    let secs = secs.max(1e-3);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ringfence {}{}: capacity {} ({} bytes), {} queue(s), VMM {}, {} resize(s)",
        cur.image,
        if cur.read_only { " (read-only)" } else { "" },
        human_bytes(cur.capacity),
        cur.capacity,
        cur.queues.len(),
        if cur.vmm_connected {
            "connected"
        } else {
            "not connected"
        },
        cur.resizes
    );
    let _ = writeln!(
        out,
        "{} {:.1} s",
        if prev.is_some() {
            "rates over the last"
        } else {
            "rates: averages since the daemon started,"
        },
        secs
    );
    render_ops(&mut out, prev, cur, secs);
    render_totals(&mut out, prev, cur, secs);
    render_queues(&mut out, prev, cur, secs);
    out
}

/// One line per operation: rates, totals and latencies.
fn render_ops(out: &mut String, prev: Option<&View>, cur: &View, secs: f64) {
    let _ = writeln!(
        out,
        "{:<13}{:>11}{:>11}{:>14}{:>16}{:>10}{:>10}{:>10}",
        "op", "ops/s", "MiB/s", "ops", "bytes", "avg µs", "p50 µs", "p99 µs"
    );
    for op in OpKind::ALL {
        let name = op.name();
        let c = cur.ops.get(name).cloned().unwrap_or_default();
        let p = prev.and_then(|p| p.ops.get(name));
        let n = delta(c.requests, p.map(|p| p.requests));
        let b = delta(c.bytes, p.map(|p| p.bytes));
        let lat_sum = delta(c.latency_sum, p.map(|p| p.latency_sum));
        let buckets: Vec<(f64, f64)> = c
            .buckets
            .iter()
            .map(|&(le, cum)| {
                let before = p
                    .and_then(|p| p.buckets.iter().find(|b| b.0 == le))
                    .map(|b| b.1);
                (le, delta(cum, before))
            })
            .collect();
        let avg = (n > 0.0).then(|| lat_sum / n);
        let _ = writeln!(
            out,
            "{:<13}{:>11.1}{:>11.2}{:>14}{:>16}{:>10}{:>10}{:>10}",
            name,
            n / secs,
            b / secs / (1024.0 * 1024.0),
            c.requests,
            c.bytes,
            micros(avg),
            micros(quantile(&buckets, 0.5)),
            micros(quantile(&buckets, 0.99)),
        );
    }
}

/// Errors, requests in flight, batching, wakeups and kernel refusals.
fn render_totals(out: &mut String, prev: Option<&View>, cur: &View, secs: f64) {
    let errors: Vec<String> = ErrorKind::ALL
        .iter()
        .filter_map(|k| {
            let v = cur.errors.get(k.name()).copied().unwrap_or(0.0);
            (v > 0.0).then(|| format!("{} {v}", k.name()))
        })
        .collect();
    let _ = writeln!(
        out,
        "errors: {}",
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        }
    );
    let d = |c: f64, p: Option<f64>| delta(c, p) / secs;
    let sqes = delta(cur.sqes, prev.map(|p| p.sqes));
    let enters = delta(cur.enters, prev.map(|p| p.enters));
    let _ = writeln!(
        out,
        "in flight {}, SQEs per io_uring_enter {}, wakeups/s {:.1}, poll hits/s {:.1}, \
         kernel refusals {}",
        cur.inflight,
        if enters > 0.0 {
            format!("{:.2}", sqes / enters)
        } else {
            "-".into()
        },
        d(cur.wakeups, prev.map(|p| p.wakeups)),
        d(cur.poll_hits, prev.map(|p| p.poll_hits)),
        cur.kernel_refusals
    );
    if cur.kernel_refusals > 0.0 {
        let _ = writeln!(
            out,
            "SECURITY: the kernel refused SQEs of this daemon (see its log)"
        );
    }
    render_limits(out, prev, cur, secs);
}

/// The I/O limits, and, while there are any, the requests that waited for them.
fn render_limits(out: &mut String, prev: Option<&View>, cur: &View, secs: f64) {
    let Some(limits) = &cur.limits else {
        return;
    };
    let _ = writeln!(out, "limits: {limits}");
    if limits == "none" {
        return;
    }
    let d = |c: f64, p: Option<f64>| delta(c, p) / secs;
    let _ = writeln!(
        out,
        "throttled: {} requests waited ({:.1}/s), {:.3} s waited in all ({:.3} s/s)",
        cur.throttled_requests,
        d(cur.throttled_requests, prev.map(|p| p.throttled_requests)),
        cur.throttled_seconds,
        d(cur.throttled_seconds, prev.map(|p| p.throttled_seconds)),
    );
}

/// One line per queue.
fn render_queues(out: &mut String, prev: Option<&View>, cur: &View, secs: f64) {
    let d = |c: f64, p: Option<f64>| delta(c, p) / secs;
    let _ = writeln!(
        out,
        "{:<8}{:>11}{:>11}{:>11}{:>12}",
        "queue", "ops/s", "MiB/s", "in flight", "wakeups/s"
    );
    for (q, c) in &cur.queues {
        let p = prev.and_then(|p| p.queues.get(q));
        let _ = writeln!(
            out,
            "{:<8}{:>11.1}{:>11.2}{:>11}{:>12.1}",
            q,
            d(c.requests, p.map(|p| p.requests)),
            d(c.bytes, p.map(|p| p.bytes)) / (1024.0 * 1024.0),
            c.inflight,
            d(c.wakeups, p.map(|p| p.wakeups)),
        );
    }
}

#[cfg(test)]
mod tests;
