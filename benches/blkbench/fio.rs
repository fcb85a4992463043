//! fio as an extra native baseline: `fio --ioengine=io_uring --direct=1` on the same image.
//! fio's io_uring engine reads large blocks noticeably faster than blkio's io_uring driver on
//! some machines, so large sequential I/O is also compared against it.
//!
//! fio's `libblkio` engine as an independent client: the same backends (and the image natively
//! through libblkio's `io_uring` driver) driven by fio's own submission pattern rather than
//! blkbench's. It needs a fio >= 3.34 built with libblkio, which
//! `benches/fio/build-fio-libblkio.sh` builds into a cache shared by worktrees.

use std::io::{BufRead as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::engine::{self, RunResult, Timing, Workload};

/// fio's version string, if fio is installed.
pub fn version() -> Option<String> {
    let out = Command::new("fio").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The fio command line equivalent to `w` on `image` (also printed in the report).
pub fn args(image: &Path, capacity: u64, w: &Workload, t: &Timing) -> Vec<String> {
    let head = vec![
        "--name=blkbench".to_string(),
        format!("--filename={}", image.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
    ];
    job_args(head, capacity, w, t)
}

/// The engine-independent part of a job: `head` (name, engine and its options), then the
/// workload, the timing and the output format.
fn job_args(mut a: Vec<String>, capacity: u64, w: &Workload, t: &Timing) -> Vec<String> {
    a.extend([
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
    ]);
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

/// What fio's libblkio engine drives.
#[derive(Clone, Copy, Debug)]
pub enum LbTarget<'a> {
    /// The image through libblkio's `io_uring` driver (O_DIRECT).
    Image(&'a Path),
    /// A vhost-user-blk backend's socket, through libblkio's `virtio-blk-vhost-user` driver.
    Socket(&'a Path),
}

/// The fio command line for `w` through the libblkio engine (also printed in the report):
/// fio's default submission (`iodepth_batch_submit=1`), one connection, and with several
/// queues one thread per queue on it (`thread`, `numjobs`: the engine gives each threaded job
/// its own queue of one shared blkio instance). The virtqueue size matches the backend's
/// `--queue-size` and blkbench's own client.
pub fn libblkio_args(target: LbTarget, capacity: u64, w: &Workload, t: &Timing) -> Vec<String> {
    let mut head = vec!["--name=blkbench".to_string(), "--ioengine=libblkio".into()];
    match target {
        LbTarget::Image(image) => {
            head.push("--libblkio_driver=io_uring".into());
            head.push(format!("--libblkio_path={}", image.display()));
            if w.qd > 128 {
                head.push(format!("--libblkio_num_entries={}", w.qd));
            }
        }
        LbTarget::Socket(sock) => {
            head.push("--libblkio_driver=virtio-blk-vhost-user".into());
            head.push(format!("--libblkio_path={}", sock.display()));
            head.push(format!(
                "--libblkio_queue_size={}",
                engine::vq_size_for(w.qd)
            ));
        }
    }
    head.push("--direct=1".into());
    if w.queues > 1 {
        head.push("--thread".into());
    }
    job_args(head, capacity, w, t)
}

/// Where `benches/fio/build-fio-libblkio.sh` puts its fio:
/// `${RINGFENCE_BENCH_CACHE:-$HOME/.cache/ringfence-bench}/fio-libblkio/bin/fio`.
pub fn libblkio_cached_binary() -> Option<PathBuf> {
    let root = std::env::var_os("RINGFENCE_BENCH_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache").join("ringfence-bench"))
        })?;
    Some(root.join("fio-libblkio").join("bin").join("fio"))
}

/// The build script's path in this checkout.
pub fn libblkio_build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches")
        .join("fio")
        .join("build-fio-libblkio.sh")
}

/// Whether `bin` is a fio that has the libblkio engine; its version string if so.
pub fn libblkio_version(bin: &Path) -> Result<String, String> {
    let help = Command::new(bin)
        .arg("--enghelp=libblkio")
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if !help.status.success() || !String::from_utf8_lossy(&help.stdout).contains("libblkio_driver")
    {
        return Err(format!(
            "{} has no libblkio engine ({}{})",
            bin.display(),
            String::from_utf8_lossy(&help.stdout).trim(),
            String::from_utf8_lossy(&help.stderr).trim()
        ));
    }
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A fio with the libblkio engine: the cached build, or (with `build`) the one the build
/// script makes now. Its path and version.
pub fn libblkio_binary(build: bool) -> Result<(PathBuf, String), String> {
    let cached = libblkio_cached_binary();
    if let Some(bin) = cached.as_deref().filter(|b| b.is_file()) {
        if let Ok(v) = libblkio_version(bin) {
            return Ok((bin.to_path_buf(), v));
        }
    }
    let script = libblkio_build_script();
    if !build {
        return Err(format!(
            "no fio with the libblkio engine at {} (build it with {})",
            cached
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "$RINGFENCE_BENCH_CACHE/fio-libblkio/bin/fio".into()),
            script.display()
        ));
    }
    eprintln!(
        "blkbench: no fio with the libblkio engine in the cache; running {}",
        script.display()
    );
    // Its progress goes on to our stderr as it comes; the last lines are kept for the reason.
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let mut stdout_pipe = child.stdout.take();
    let out_t = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(r) = stdout_pipe.as_mut() {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    });
    let mut last: Vec<String> = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            last.push(line);
            if last.len() > 3 {
                last.remove(0);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {}: {e}", script.display()))?;
    let stdout = out_t.join().unwrap_or_default();
    if !status.success() {
        let why = last
            .iter()
            .rev()
            .find(|l| l.contains("ERROR"))
            .or(last.last())
            .map(|l| l.trim().to_string())
            .unwrap_or_default();
        return Err(format!("{} failed ({status}): {why}", script.display()));
    }
    let printed = String::from_utf8_lossy(&stdout);
    let bin = printed
        .lines()
        .last()
        .map(|l| PathBuf::from(l.trim()))
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("{} printed no fio binary", script.display()))?;
    let v = libblkio_version(&bin)?;
    Ok((bin, v))
}

/// The version of the libblkio the build script extracted beside `bin` (from its blkio.pc).
pub fn libblkio_lib_version(bin: &Path) -> Option<String> {
    let lib = bin
        .parent()?
        .parent()?
        .join("libblkio")
        .join("usr")
        .join("lib");
    let mut dirs = vec![lib.join("pkgconfig")];
    for e in std::fs::read_dir(&lib).ok()?.flatten() {
        dirs.push(e.path().join("pkgconfig"));
    }
    dirs.iter().find_map(|d| {
        let text = std::fs::read_to_string(d.join("blkio.pc")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_string())
    })
}

/// Run `w` once through fio's libblkio engine; fio is killed if it runs past `limit`.
pub fn run_libblkio(
    bin: &Path,
    target: LbTarget,
    capacity: u64,
    w: &Workload,
    t: &Timing,
    limit: Duration,
) -> Result<RunResult, String> {
    let mut child = Command::new(bin)
        .args(libblkio_args(target, capacity, w, t))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    // Drain both pipes on their own threads so that fio never blocks on a full pipe.
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let mut killed = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if Instant::now() >= deadline && !killed => {
                let _ = child.kill();
                killed = true;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("waiting for fio: {e}")),
        }
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    let status = status?;
    if killed {
        return Err(format!(
            "fio (libblkio) did not finish within {limit:?} and was killed: {}",
            stderr.trim()
        ));
    }
    if !status.success() {
        return Err(format!(
            "fio (libblkio) failed ({status}): {}{}",
            stderr.trim(),
            stdout.trim()
        ));
    }
    parse_output(&stdout)
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
    // The libblkio command lines: the driver and path per target, one thread per queue.
    let t = Timing {
        warmup: Duration::from_millis(300),
        duration: Duration::from_millis(1500),
    };
    let w = Workload {
        queues: 2,
        ..Workload::new(true, 100, 4096, 16)
    };
    let sock = libblkio_args(LbTarget::Socket(Path::new("/s.sock")), 1 << 30, &w, &t);
    let img = libblkio_args(LbTarget::Image(Path::new("/d.img")), 1 << 30, &w, &t);
    let has = |a: &[String], x: &str| a.iter().any(|y| y == x);
    if !has(&sock, "--libblkio_driver=virtio-blk-vhost-user")
        || !has(&sock, "--libblkio_path=/s.sock")
        || !has(&sock, "--libblkio_queue_size=256")
        || !has(&sock, "--thread")
        || !has(&sock, "--numjobs=2")
        || !has(&img, "--libblkio_driver=io_uring")
        || !has(&img, "--libblkio_path=/d.img")
        || has(&img, "--filename=/d.img")
    {
        return Err(format!("fio libblkio args: {sock:?} {img:?}"));
    }
    Ok(())
}
