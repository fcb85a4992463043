//! fio as an extra native baseline: `fio --ioengine=io_uring --direct=1` on the same image.
//! fio's io_uring engine reads large blocks noticeably faster than blkio's io_uring driver on
//! some machines, so large sequential I/O is also compared against it.

use std::path::Path;
use std::process::Command;

use crate::engine::{RunResult, Timing, Workload};

/// fio's version string, if fio is installed.
pub fn version() -> Option<String> {
    let out = Command::new("fio").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The fio command line equivalent to `w` on `image` (also printed in the report).
pub fn args(image: &Path, capacity: u64, w: &Workload, t: &Timing) -> Vec<String> {
    let mut a = vec![
        "--name=blkbench".to_string(),
        format!("--filename={}", image.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={}", w.rw_name()),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.qd),
        format!("--numjobs={}", w.queues),
        "--group_reporting".into(),
        "--time_based".into(),
        format!("--ramp_time={}ms", t.warmup.as_millis().max(1)),
        format!("--runtime={}ms", t.duration.as_millis().max(1)),
        "--lat_percentiles=1".into(),
        "--percentile_list=50:99:99.9".into(),
        "--output-format=json".into(),
    ];
    if !matches!(w.read_pct, 0 | 100) {
        a.push(format!("--rwmixread={}", w.read_pct));
    }
    if w.random {
        a.push("--norandommap".into());
        a.push("--randrepeat=0".into());
        a.push(format!("--size={capacity}"));
    } else {
        // Like the engine: each job streams through its own slice.
        let slice = capacity / u64::from(w.queues) / w.bs * w.bs;
        a.push(format!("--size={slice}"));
        a.push(format!("--offset_increment={slice}"));
    }
    a
}

pub fn run(image: &Path, capacity: u64, w: &Workload, t: &Timing) -> Result<RunResult, String> {
    let out = Command::new("fio")
        .args(args(image, capacity, w, t))
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "fio failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        ));
    }
    parse_output(&stdout)
}

fn parse_output(stdout: &str) -> Result<RunResult, String> {
    // fio may print notes before the JSON document.
    let start = stdout.find('{').ok_or("fio printed no JSON")?;
    let doc = Json::parse(&stdout[start..])?;
    let job = doc
        .get("jobs")
        .and_then(|j| j.index(0))
        .ok_or("fio JSON has no jobs[0]")?;
    let mut ios = 0.0;
    let mut bytes = 0.0;
    let mut secs: f64 = 0.0;
    let mut lat_weighted = [0.0f64; 4];
    for dir in ["read", "write"] {
        let Some(d) = job.get(dir) else { continue };
        let n = |k: &str| d.get(k).and_then(Json::num).unwrap_or(0.0);
        let runtime_s = n("runtime") / 1000.0;
        let dir_ios = n("iops") * runtime_s;
        if dir_ios <= 0.0 {
            continue;
        }
        ios += dir_ios;
        bytes += n("bw_bytes") * runtime_s;
        secs = secs.max(runtime_s);
        let lat = d.get("lat_ns").ok_or("fio JSON lacks lat_ns")?;
        let pct = lat
            .get("percentile")
            .or_else(|| d.get("clat_ns").and_then(|c| c.get("percentile")))
            .ok_or("fio JSON lacks latency percentiles")?;
        let p = |k: &str| {
            pct.get(k)
                .and_then(Json::num)
                .ok_or(format!("fio JSON lacks percentile {k}"))
        };
        let vals = [
            lat.get("mean").and_then(Json::num).unwrap_or(0.0),
            p("50.000000")?,
            p("99.000000")?,
            p("99.900000")?,
        ];
        for (acc, v) in lat_weighted.iter_mut().zip(vals) {
            *acc += v * dir_ios;
        }
    }
    if ios <= 0.0 || secs <= 0.0 {
        return Err("fio completed no I/O".into());
    }
    // Mixed workloads: I/O-weighted average of the two directions' percentiles (approximate).
    let [mean, p50, p99, p999] = lat_weighted.map(|v| v / ios);
    Ok(RunResult {
        ios: ios.round() as u64,
        bytes: bytes.round() as u64,
        secs,
        mean_ns: mean,
        p50_ns: p50,
        p99_ns: p99,
        p999_ns: p999,
        hist: None,
        backend_cpu_s: None,
        client_cpu_s: None,
    })
}

/// Just enough JSON for fio's output.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(s: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
        };
        p.value()
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn index(&self, i: usize) -> Option<&Json> {
        match self {
            Json::Arr(a) => a.get(i),
            _ => None,
        }
    }

    fn num(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn err(&self, what: &str) -> String {
        format!("fio JSON: {what} at byte {}", self.i)
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut m = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    let v = self.value()?;
                    m.push((k, v));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.word("true", Json::Bool(true)),
            Some(b'f') => self.word("false", Json::Bool(false)),
            Some(b'n') => self.word("null", Json::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let st = self.i;
                while self.i < self.s.len()
                    && matches!(
                        self.s[self.i],
                        b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[st..self.i]).map_err(|_| self.err("number"))?;
                t.parse().map(Json::Num).map_err(|_| self.err("bad number"))
            }
            _ => Err(self.err("unexpected input")),
        }
    }

    fn word(&mut self, w: &str, v: Json) -> Result<Json, String> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            Err(self.err("bad literal"))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.s.get(self.i) != Some(&b'"') {
            return Err(self.err("expected string"));
        }
        self.i += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|_| self.err("bad UTF-8")),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or_else(|| self.err("bad escape"))?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self
                                .s
                                .get(self.i..self.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok())
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(|| self.err("bad \\u escape"))?;
                            self.i += 4;
                            let ch = char::from_u32(hex).unwrap_or('\u{fffd}');
                            out.extend_from_slice(ch.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                _ => out.push(c),
            }
        }
        Err(self.err("unterminated string"))
    }
}

/// Self-check of the JSON reader on a trimmed fio 3.x document.
pub fn self_check() -> Result<(), String> {
    let doc = r#"note: both iodepth >= 1 and iodepth_low >= 1
{ "fio version" : "fio-3.33", "jobs" : [ { "jobname" : "blkbench",
  "read" : { "io_bytes" : 1000, "bw_bytes" : 2048000, "iops" : 500.0, "runtime" : 2000,
    "total_ios" : 1000, "clat_ns" : { "mean" : 1.0 },
    "lat_ns" : { "min" : 1, "max" : 9, "mean" : 2000.5, "stddev" : 1e2, "N" : 1000,
      "percentile" : { "50.000000" : 1900, "99.000000" : 5000, "99.900000" : 8000 } } },
  "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.000000, "runtime" : 0,
    "lat_ns" : { "mean" : 0.0 } }, "desc": "a \"quoted\" \u00e9", "x": [true, false, null, -1.5] } ] }"#;
    let r = parse_output(doc)?;
    if r.ios != 1000 || (r.iops() - 500.0).abs() > 1e-9 || r.p50_ns != 1900.0 || r.p999_ns != 8000.0
    {
        return Err(format!(
            "fio JSON parse: ios {} iops {} p50 {}",
            r.ios,
            r.iops(),
            r.p50_ns
        ));
    }
    Ok(())
}
