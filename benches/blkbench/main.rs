//! blkbench: a fio-style closed-loop benchmark of vhost-user-blk backends.
//!
//! `cargo bench --bench blkbench` runs the default matrix against native io_uring, ringfence
//! and qemu-storage-daemon under each client pattern (plus fio as a second native when
//! installed), interleaving the targets round by round, compares every run with the best native
//! run of its round, and writes `benches/results/` (Markdown, SVG plots, CSV) and the
//! results block of `benches/README.md`. `cargo bench --bench blkbench -- --help` lists the
//! options. Without `--bench` (as `cargo test --benches` runs it) it only self-checks.

mod ceiling;
mod engine;
mod fio;
mod hist;
mod procstat;
mod report;
mod sysinfo;
mod targets;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use ceiling::Medium;
use engine::{Pattern, Timing, Workload};
use report::{Record, Report, RunInfo, Section};
use targets::{Env, Kind};

/// The default matrix (issues 6 and 12). Each row runs once per client pattern (`--patterns`).
const MATRIX: [Workload; 8] = [
    Workload::new(true, 100, 4096, 1),
    Workload::new(true, 100, 4096, 1).polled(),
    Workload::new(true, 100, 4096, 32),
    Workload::new(true, 0, 4096, 32),
    Workload::new(true, 70, 4096, 16),
    Workload::new(false, 100, 128 << 10, 8),
    Workload::new(false, 0, 128 << 10, 8),
    // 2 queues (ringfence --num-queues 2) against native with 2 submitting threads.
    Workload {
        queues: 2,
        ..Workload::new(true, 100, 4096, 16)
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FioMode {
    /// Add fio to every matrix row that is not polled when fio is installed.
    Auto,
    /// Require fio.
    On,
    /// Never run fio.
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum FioLbMode {
    /// Use the cached fio with the libblkio engine; without one, run
    /// benches/fio/build-fio-libblkio.sh once, and skip these runs (saying why) if that fails.
    Auto,
    /// Like auto, but a missing or unbuildable fio is an error.
    On,
    /// Never run fio's libblkio engine.
    Off,
}

/// Closed-loop block I/O benchmark of vhost-user-blk backends (ringfence,
/// qemu-storage-daemon) against native io_uring on the same image.
#[derive(Parser, Debug)]
#[command(
    name = "blkbench",
    after_help = "Run as: cargo bench --bench blkbench -- [OPTIONS]\n\
                  Job specs use fio's names: rw=randread|randwrite|randrw|read|write|rw, \
                  bs=4k, qd=32, queues=1, rwmixread=70."
)]
struct Opts {
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,

    /// Bench-name filters as in `cargo bench NAME`; ignored (use --job).
    #[arg(hide = true)]
    filters: Vec<String>,

    /// Targets, interleaved in this order every round.
    #[arg(long, value_delimiter = ',', default_value = "native,ringfence,qsd")]
    targets: Vec<String>,

    /// fio (`--ioengine=io_uring --direct=1`, its default submission) as a second native
    /// baseline on every matrix row that is not polled.
    #[arg(long, value_enum, default_value_t = FioMode::Auto)]
    fio: FioMode,

    /// fio's libblkio engine as an independent client, with fio's default submission (one
    /// request submitted and kicked at a time): on every matrix row that is not polled, against
    /// ringfence and qsd (`virtio-blk-vhost-user` on a backend started for the run) and native
    /// (`io_uring` on the image), interleaved with the other targets. Needs a fio >= 3.34 built
    /// with libblkio (`benches/fio/build-fio-libblkio.sh`, cached under
    /// $RINGFENCE_BENCH_CACHE or ~/.cache/ringfence-bench).
    #[arg(long, value_enum, default_value_t = FioLbMode::Auto)]
    fio_libblkio: FioLbMode,

    /// Client patterns each matrix row runs with: `1` (or `per-request`) submits every request
    /// on its own as its completion frees a slot, `N` in groups of N, `round` a whole round of
    /// refills at once. A job with `batch=` runs that pattern only; at QD1 all are one.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,round",
        value_name = "LIST"
    )]
    patterns: Vec<String>,

    /// Rounds per matrix workload [default: 5; 2 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,

    /// Rounds per scaling point [default: 3; 2 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    scale_rounds: Option<u32>,

    /// Measured seconds per matrix run [default: 1.5; 1 with --quick].
    #[arg(long, value_parser = parse_secs)]
    duration: Option<f64>,

    /// Warm-up seconds before each matrix measurement [default: 0.3; 0.25 with --quick].
    #[arg(long, value_parser = parse_secs)]
    warmup: Option<f64>,

    /// Measured seconds per scaling point [default: 1; 0.5 with --quick].
    #[arg(long, value_parser = parse_secs)]
    scale_duration: Option<f64>,

    /// Warm-up seconds per scaling point [default: 0.25; 0.1 with --quick].
    #[arg(long, value_parser = parse_secs)]
    scale_warmup: Option<f64>,

    /// Short runs for development: 2 rounds, 1 s matrix points, 0.5 s scaling points.
    #[arg(long)]
    quick: bool,

    /// A workload to run instead of the default matrix (repeatable), e.g.
    /// `rw=randread,bs=4k,qd=32` or `rw=randrw,bs=4k,qd=16,rwmixread=70,queues=2`.
    #[arg(long = "job", value_name = "SPEC")]
    jobs: Vec<String>,

    /// Skip the matrix (run only the scaling series, and the ceiling rows if --ceiling is
    /// given).
    #[arg(long)]
    no_matrix: bool,

    /// Software-ceiling rows: the backend's own cost per request without the disk: native
    /// io_uring and ringfence on memory-backed storage; the difference is the hand-off cost.
    /// After the matrix, its 4k randread QD32, 4k randwrite QD32 and 4k randread QD1 rows (those
    /// of them it has; all three with --no-matrix) run again on each medium with the same
    /// targets, client patterns and rounds, interleaved round by round, each against the best
    /// native on the same medium. `tmpfs`: a fully written image in /dev/shm (O_DIRECT on tmpfs
    /// needs Linux >= 6.6); `loop`: a loop device over that file (`losetup --direct-io=off`)
    /// served as a block device, set up and detached by blkbench (skipped, saying why, when
    /// losetup fails); `tmpfs,loop` both; `none` to skip [default: tmpfs; none with
    /// --no-matrix].
    #[arg(long, value_name = "LIST")]
    ceiling: Option<String>,

    /// Queue depths of the QD-scaling series (1 queue), or `none`.
    #[arg(long, default_value = "1,2,4,8,16,32,64,128", value_name = "LIST")]
    qd_scaling: String,

    /// Queue counts of the queue-scaling series, or `none`.
    #[arg(long, default_value = "1,2,4", value_name = "LIST")]
    queue_scaling: String,

    /// Depth per queue in the queue-scaling series.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    queue_scaling_qd: u32,

    /// Access pattern and block size of both scaling series.
    #[arg(long, default_value = "rw=randread,bs=4k", value_name = "SPEC")]
    scaling_job: String,

    /// Use this image (created fully written if missing; kept afterwards). Default: a
    /// temporary image in the work directory, deleted at the end.
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,

    /// Size of a created image (k, M, G suffixes).
    #[arg(long, default_value = "1G", value_name = "SIZE")]
    image_size: String,

    /// Directory for the temporary image [default: <target dir>/blkbench].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,

    /// Where results.md, the SVGs and results.csv go [default: benches/results].
    #[arg(long, value_name = "DIR")]
    results_dir: Option<PathBuf>,

    /// Do not update the results block of benches/README.md (it is only updated when writing
    /// to the default results directory).
    #[arg(long)]
    no_readme: bool,

    /// The ringfence binary [default: the release build cargo made for this bench].
    #[arg(long, value_name = "PATH")]
    ringfence_bin: Option<PathBuf>,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
        return Err(format!("{s}: seconds must be in (0, 3600]"));
    }
    Ok(v)
}

fn parse_list(name: &str, s: &str, max: u32) -> Result<Vec<u32>, String> {
    if s.trim().is_empty() || s.trim() == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("--{name}: '{x}' is not a number in 1..={max}"))
        })
        .collect()
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// First Ctrl-C: finish the current run, stop the backends, write a partial report.
/// Second: the default action.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe; SA_RESETHAND restores the default after the first signal.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn default_work_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                manifest_dir().join(t)
            }
        })
        .unwrap_or_else(|| manifest_dir().join("target"));
    target.join("blkbench")
}

fn default_results_dir() -> PathBuf {
    manifest_dir().join("benches").join("results")
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

struct Plan {
    section: Section,
    /// The workload; its pattern is replaced by each of `patterns`.
    w: Workload,
    patterns: Vec<Pattern>,
    t: Timing,
    rounds: u32,
}

impl Plan {
    /// Runs per round: every pattern on every target but fio's, and each fio client once
    /// (matrix rows only, on the disk or a ceiling medium).
    fn runs(&self, kinds: &[Kind]) -> usize {
        kinds
            .iter()
            .filter(|k| k.applies_to(&self.w) && (!k.is_fio_client() || self.section.is_matrix()))
            .map(|k| {
                if k.is_fio_client() {
                    1
                } else {
                    self.patterns.len()
                }
            })
            .sum()
    }
}

/// The patterns a row runs with: `batch=` in its job spec, else `--patterns`, collapsed where
/// they are the same client (every pattern at QD1, groups of at least QD).
fn patterns_for(w: &Workload, spec: Option<&str>, list: &[Pattern]) -> Vec<Pattern> {
    let given = spec.is_some_and(|s| s.split(',').any(|p| p.trim().starts_with("batch=")));
    let from: Vec<Pattern> = if given {
        vec![w.pattern]
    } else {
        list.to_vec()
    };
    let mut out: Vec<Pattern> = Vec::new();
    for p in from.into_iter().map(|p| p.effective(w.qd)) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let libtest_flag = |a: &String| {
        [
            "--nocapture",
            "--quiet",
            "-q",
            "--list",
            "--exact",
            "--ignored",
            "--include-ignored",
            "--show-output",
        ]
        .contains(&a.as_str())
            || a.starts_with("--test-threads")
            || a.starts_with("--format")
            || a.starts_with("--color")
    };
    if !args.iter().any(|a| a == "--bench") && args.iter().all(libtest_flag) {
        // Run as a test (`cargo test --benches`): check the machinery, measure nothing.
        if args.iter().any(|a| a == "--list") {
            return;
        }
        match self_check() {
            Ok(msg) => {
                println!("blkbench: {msg} (run `cargo bench --bench blkbench` to benchmark)")
            }
            Err(e) => {
                eprintln!("blkbench self-check failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let opts = Opts::parse();
    if !opts.filters.is_empty() {
        eprintln!(
            "blkbench: ignoring filter {:?} (select workloads with --job)",
            opts.filters
        );
    }
    if let Err(e) = run(opts, &args) {
        eprintln!("blkbench: {e}");
        std::process::exit(1);
    }
}

fn self_check() -> Result<String, String> {
    hist::self_check()?;
    engine::self_check()?;
    fio::self_check()?;
    report::self_check()?;
    ceiling::self_check()?;
    // A real, tiny run of the engine on the native target.
    let work = default_work_dir();
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("selfcheck-")
        .tempdir_in(&work)
        .map_err(|e| format!("temp dir in {}: {e}", work.display()))?;
    let image = dir.path().join("disk.img");
    let cap = targets::prepare_image(&image, 16 << 20)?;
    let t = Timing {
        warmup: Duration::from_millis(20),
        duration: Duration::from_millis(150),
    };
    for spec in [
        "rw=randrw,bs=4k,qd=4,rwmixread=70",
        "rw=read,bs=128k,qd=2,queues=2",
    ] {
        let w = Workload::parse(spec)?;
        match engine::run(&engine::Endpoint::File(&image), &w, &t, None) {
            Ok(r) if r.ios > 0 && r.p50_ns > 0.0 => {}
            Ok(_) => return Err(format!("{spec}: no I/O measured")),
            Err(e) if e.contains("connect") => {
                return Ok(format!(
                    "self-check ok; native run skipped ({e}: no O_DIRECT here?)"
                ))
            }
            Err(e) => return Err(format!("{spec}: {e}")),
        }
    }
    let _ = cap;
    Ok("self-check ok".into())
}

fn run(o: Opts, raw_args: &[String]) -> Result<(), String> {
    let rounds = o.rounds.unwrap_or(if o.quick { 2 } else { 5 });
    let scale_rounds = o.scale_rounds.unwrap_or(if o.quick { 2 } else { 3 });
    let secs = |v: Option<f64>, normal: f64, quick: f64| {
        Duration::from_secs_f64(v.unwrap_or(if o.quick { quick } else { normal }))
    };
    let main_t = Timing {
        warmup: secs(o.warmup, 0.3, 0.25),
        duration: secs(o.duration, 1.5, 1.0),
    };
    let scale_t = Timing {
        warmup: secs(o.scale_warmup, 0.25, 0.1),
        duration: secs(o.scale_duration, 1.0, 0.5),
    };

    // What to run.
    let patterns: Vec<Pattern> = o
        .patterns
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| Pattern::parse(p).map_err(|e| format!("--patterns: {e}")))
        .collect::<Result<_, _>>()?;
    if patterns.is_empty() {
        return Err("--patterns: no pattern".into());
    }
    let mut plan: Vec<Plan> = Vec::new();
    if !o.no_matrix {
        let matrix: Vec<(Workload, Option<&str>)> = if o.jobs.is_empty() {
            MATRIX.iter().map(|w| (*w, None)).collect()
        } else {
            o.jobs
                .iter()
                .map(|j| Ok((Workload::parse(j)?, Some(j.as_str()))))
                .collect::<Result<_, String>>()?
        };
        plan.extend(matrix.into_iter().map(|(w, spec)| Plan {
            section: Section::Main,
            patterns: patterns_for(&w, spec, &patterns),
            w,
            t: main_t,
            rounds,
        }));
    }
    // The software ceiling: the matrix's ceiling rows again on each medium, right after it.
    let media: Vec<Medium> = match &o.ceiling {
        Some(list) => ceiling::parse(list)?,
        None if o.no_matrix => Vec::new(),
        None => vec![Medium::Tmpfs],
    };
    let mut ceiling_notes: Vec<String> = Vec::new();
    if !media.is_empty() {
        let rows: Vec<(Workload, Vec<Pattern>)> = if o.no_matrix {
            ceiling::JOBS
                .iter()
                .map(|w| (*w, patterns_for(w, None, &patterns)))
                .collect()
        } else {
            plan.iter()
                .filter(|p| ceiling::is_ceiling_row(&p.w))
                .map(|p| (p.w, p.patterns.clone()))
                .collect()
        };
        if rows.is_empty() {
            let msg = "--ceiling: the matrix has none of the ceiling rows (4k randread QD32, 4k \
                       randwrite QD32, 4k randread QD1), so none ran"
                .to_string();
            eprintln!("blkbench: {msg}");
            ceiling_notes.push(msg);
        }
        for &m in &media {
            plan.extend(rows.iter().map(|(w, pats)| Plan {
                section: Section::Ceiling(m),
                w: *w,
                patterns: pats.clone(),
                t: main_t,
                rounds,
            }));
        }
    }
    let base = Workload::parse(&o.scaling_job).map_err(|e| format!("--scaling-job: {e}"))?;
    for qd in parse_list("qd-scaling", &o.qd_scaling, 1024)? {
        plan.push(Plan {
            section: Section::QdScaling,
            w: Workload {
                qd,
                queues: 1,
                ..base
            },
            patterns: vec![base.pattern.effective(qd)],
            t: scale_t,
            rounds: scale_rounds,
        });
    }
    for queues in parse_list("queue-scaling", &o.queue_scaling, 64)? {
        plan.push(Plan {
            section: Section::QueueScaling,
            w: Workload {
                qd: o.queue_scaling_qd,
                queues,
                ..base
            },
            patterns: vec![base.pattern.effective(o.queue_scaling_qd)],
            t: scale_t,
            rounds: scale_rounds,
        });
    }
    if plan.is_empty() {
        return Err("nothing to run (--no-matrix with no scaling series)".into());
    }

    // Which targets.
    let mut kinds: Vec<Kind> = Vec::new();
    for t in o.targets.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let k = Kind::parse(t)?;
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    let fio_version = fio::version();
    let want_fio = match o.fio {
        FioMode::Off => false,
        FioMode::On => true,
        FioMode::Auto => kinds.contains(&Kind::Fio) || fio_version.is_some(),
    } && plan
        .iter()
        .any(|p| p.section.is_matrix() && Kind::Fio.applies_to(&p.w));
    kinds.retain(|k| *k != Kind::Fio);
    if want_fio {
        kinds.push(Kind::Fio);
    }
    // fio's libblkio engine: the fio-lb-* targets named in --targets, else one beside each of
    // native, ringfence and qsd that runs.
    let lb_rows = plan
        .iter()
        .any(|p| p.section.is_matrix() && Kind::FioLbNative.applies_to(&p.w));
    let lb_kinds: Vec<Kind> = if o.fio_libblkio == FioLbMode::Off || !lb_rows {
        Vec::new()
    } else if kinds.iter().any(|k| k.is_fio_lb()) {
        Kind::FIO_LB
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| kinds.contains(k))
            .collect()
    } else {
        Kind::FIO_LB
            .iter()
            .filter(|(_, beside)| kinds.contains(beside))
            .map(|(k, _)| *k)
            .collect()
    };
    kinds.retain(|k| !k.is_fio_lb());
    kinds.extend(lb_kinds);
    if kinds.is_empty() {
        return Err("no targets".into());
    }

    install_signal_handlers();
    targets::become_subreaper();

    // The image and the sockets.
    let work = o.work_dir.clone().unwrap_or_else(default_work_dir);
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&work)
        .map_err(|e| format!("temp dir in {}: {e}", work.display()))?;
    let sock_tmp = tempfile::Builder::new()
        .prefix("blkbench-")
        .tempdir()
        .map_err(|e| format!("temp dir for sockets: {e}"))?;
    let size = engine::parse_size(&o.image_size).map_err(|e| format!("--image-size: {e}"))?;
    let image = o
        .image
        .clone()
        .unwrap_or_else(|| tmp.path().join("disk.img"));
    let capacity = targets::prepare_image(&image, size)?;

    let mut versions = Vec::new();
    let mut unavailable: Vec<(Kind, String)> = Vec::new();
    let mut ringfence_bin = None;
    // A backend is needed for its own target and for fio's libblkio engine on it.
    let needs = |k: Kind| {
        kinds.contains(&k)
            || Kind::FIO_LB
                .iter()
                .any(|(lb, beside)| *beside == k && kinds.contains(lb))
    };
    if needs(Kind::Ringfence) {
        match targets::ringfence_binary(o.ringfence_bin.as_deref()) {
            Ok(b) => ringfence_bin = Some(b),
            Err(e) => unavailable.push((Kind::Ringfence, e)),
        }
    }
    if needs(Kind::Qsd) {
        match targets::ensure_qsd() {
            Ok(v) => versions.push((
                "qemu-storage-daemon".to_string(),
                v.trim_start_matches("qemu-storage-daemon version ")
                    .to_string(),
            )),
            Err(e) => unavailable.push((Kind::Qsd, e)),
        }
    }
    if kinds.contains(&Kind::Fio) {
        match &fio_version {
            Some(v) => versions.push(("fio".into(), v.trim_start_matches("fio-").to_string())),
            None => unavailable.push((Kind::Fio, "fio not installed (apt-get install fio)".into())),
        }
    }
    let mut fio_libblkio = None;
    if kinds.iter().any(|k| k.is_fio_lb()) {
        match fio::libblkio_binary(true) {
            Ok((bin, v)) => {
                eprintln!("blkbench: fio's libblkio engine: {}", bin.display());
                let mut v = v.trim_start_matches("fio-").to_string();
                if let Some(lib) = fio::libblkio_lib_version(&bin) {
                    v.push_str(&format!(" with libblkio {lib}"));
                }
                versions.push(("fio (libblkio engine)".into(), v));
                fio_libblkio = Some(bin);
            }
            Err(e) if o.fio_libblkio == FioLbMode::On => {
                return Err(format!("--fio-libblkio on: {e}"));
            }
            Err(e) => {
                eprintln!("blkbench: skipping the fio-libblkio runs: {e}");
                for k in kinds.iter().filter(|k| k.is_fio_lb()) {
                    unavailable.push((*k, format!("fio's libblkio engine unavailable: {e}")));
                }
            }
        }
    }
    versions.push(("blkio crate".into(), "0.5".into()));
    let env = Env {
        image: image.clone(),
        capacity,
        sock_dir: sock_tmp.path().to_path_buf(),
        ringfence_bin,
        fio_libblkio,
        counter: std::cell::Cell::new(0),
    };

    // Does each target work at all?
    for k in kinds.clone() {
        if unavailable.iter().any(|(u, _)| *u == k) || k.is_fio_client() {
            continue;
        }
        eprint!("blkbench: checking {} ... ", k.name());
        let _ = std::io::stderr().flush();
        match targets::probe(k, &env) {
            Ok(()) => eprintln!("ok"),
            Err(e) => {
                eprintln!("unavailable: {e}");
                unavailable.push((k, e));
            }
        }
    }
    // fio's libblkio engine needs the backend its target stands beside.
    for (k, beside) in Kind::FIO_LB {
        let missing = unavailable.iter().any(|(u, _)| *u == beside)
            && !unavailable.iter().any(|(u, _)| *u == k);
        if kinds.contains(&k) && missing {
            unavailable.push((k, format!("needs {}, which is unavailable", beside.name())));
        }
    }
    kinds.retain(|k| !unavailable.iter().any(|(u, _)| u == k));
    if kinds.is_empty() {
        return Err("no target works".into());
    }

    // The ceiling media: the image in /dev/shm (and the loop device over it) live until the
    // end of the run; the loop device is detached first (it is declared last), even on errors
    // and after Ctrl-C.
    let mut shm_dir: Option<ceiling::ShmDir> = None;
    let mut loop_dev: Option<ceiling::LoopDev> = None;
    let mut ceiling_envs: Vec<(Medium, Env)> = Vec::new();
    let mut ceiling_info: Vec<(Medium, String)> = Vec::new();
    // Targets off on a medium (None: the disk), from the checks or repeated failures.
    let mut off: Vec<(Option<Medium>, Kind)> = Vec::new();
    let wanted: Vec<Medium> = media
        .iter()
        .copied()
        .filter(|m| plan.iter().any(|p| p.section == Section::Ceiling(*m)))
        .collect();
    if !wanted.is_empty() {
        let size = capacity.min(ceiling::MAX_SIZE) / 4096 * 4096;
        let made = ceiling::ShmDir::create(size).and_then(|d| {
            let img = d.path.join("disk.img");
            targets::prepare_image(&img, size).map(|_| (d, img))
        });
        match made {
            Err(e) => {
                eprintln!("blkbench: no ceiling rows: {e}");
                for m in &wanted {
                    ceiling_notes.push(format!("~~{}~~: not run: {e}", m.name()));
                }
            }
            Ok((dir, img)) => {
                shm_dir = Some(dir);
                for &m in &wanted {
                    let (path, cap, what) = match m {
                        Medium::Tmpfs => (
                            img.clone(),
                            size,
                            format!(
                                "{} ({}, {})",
                                m.describe(),
                                img.display(),
                                engine::fmt_size(size)
                            ),
                        ),
                        Medium::Loop => {
                            let attached = ceiling::LoopDev::attach(&img)
                                .and_then(|l| l.size().map(|cap| (l, cap)));
                            match attached {
                                Ok((l, cap)) => {
                                    eprintln!(
                                        "blkbench: {} over {}",
                                        l.path.display(),
                                        img.display()
                                    );
                                    let what = format!(
                                        "{} ({} over {}, {})",
                                        m.describe(),
                                        l.path.display(),
                                        img.display(),
                                        engine::fmt_size(cap)
                                    );
                                    let path = l.path.clone();
                                    loop_dev = Some(l);
                                    (path, cap, what)
                                }
                                Err(e) => {
                                    eprintln!("blkbench: skipping the loop rows: {e}");
                                    ceiling_notes.push(format!("~~loop~~: not run: {e}"));
                                    continue;
                                }
                            }
                        }
                    };
                    let menv = env.on(path, cap);
                    // Does each target work on this medium?
                    for &k in kinds.iter().filter(|k| !k.is_fio_client()) {
                        eprint!("blkbench: checking {} on {} ... ", k.name(), m.name());
                        let _ = std::io::stderr().flush();
                        match targets::probe(k, &menv) {
                            Ok(()) => eprintln!("ok"),
                            Err(e) => {
                                eprintln!("unavailable: {e}");
                                ceiling_notes.push(format!(
                                    "{}: ~~{}~~ not run: {e}",
                                    m.name(),
                                    k.name()
                                ));
                                off.push((Some(m), k));
                            }
                        }
                    }
                    for (k, beside) in Kind::FIO_LB {
                        if kinds.contains(&k) && off.contains(&(Some(m), beside)) {
                            off.push((Some(m), k));
                        }
                    }
                    if off.contains(&(Some(m), Kind::Native)) {
                        ceiling_notes.push(format!(
                            "~~{}~~: not run: native io_uring does not work on it",
                            m.name()
                        ));
                        continue;
                    }
                    ceiling_envs.push((m, menv));
                    ceiling_info.push((m, what));
                }
            }
        }
        // A medium that does not work is left out, and the report says why; the run goes on
        // (even with nothing left to run).
        plan.retain(|p| match p.section.medium() {
            Some(m) => ceiling_envs.iter().any(|(x, _)| *x == m),
            None => true,
        });
    }
    let kinds_on = |off: &[(Option<Medium>, Kind)], s: Section| -> Vec<Kind> {
        kinds
            .iter()
            .copied()
            .filter(|k| !off.contains(&(s.medium(), *k)))
            .collect()
    };

    let total_runs: usize = plan
        .iter()
        .map(|p| p.rounds as usize * p.runs(&kinds_on(&off, p.section)))
        .sum();
    let per_run_overhead = Duration::from_millis(300);
    let mut remaining: Duration = plan
        .iter()
        .map(|p| {
            (p.t.warmup + p.t.duration + per_run_overhead)
                * (p.rounds * p.runs(&kinds_on(&off, p.section)) as u32)
        })
        .sum();
    let scaling = plan.iter().any(|p| !p.section.is_matrix());
    let matrix = plan.iter().any(|p| p.section.is_matrix());
    let rounds_text = match (matrix, scaling) {
        (true, true) => format!("{rounds} rounds ({scale_rounds} for scaling points)"),
        (true, false) => format!("{rounds} rounds"),
        _ => format!("{scale_rounds} rounds"),
    };
    eprintln!(
        "blkbench: {} workloads × {rounds_text} × [{}] = {total_runs} runs, about {}",
        plan.len(),
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        fmt_dur(remaining)
    );

    let started = Instant::now();
    let mut records: Vec<Record> = Vec::new();
    let mut failures: std::collections::HashMap<(Option<Medium>, Kind), u32> = Default::default();
    let mut done = 0usize;
    'outer: for p in &plan {
        let medium = p.section.medium();
        let penv = match medium {
            None => &env,
            Some(m) => match ceiling_envs.iter().find(|(x, _)| *x == m) {
                Some((_, e)) => e,
                None => continue,
            },
        };
        for round in 1..=p.rounds {
            // Pattern by pattern, each target in turn; the fio clients (their own submission)
            // once each at the end.
            let mut runs: Vec<(Kind, Workload)> = Vec::new();
            for &pat in &p.patterns {
                for &k in kinds.iter().filter(|k| !k.is_fio_client()) {
                    runs.push((k, p.w.with_pattern(pat)));
                }
            }
            if p.section.is_matrix() {
                for &k in kinds.iter().filter(|k| k.is_fio_client()) {
                    runs.push((k, p.w.base()));
                }
            }
            for (k, w) in runs {
                if !k.applies_to(&w) || off.contains(&(medium, k)) {
                    continue;
                }
                if STOP.load(Ordering::SeqCst) {
                    eprintln!("blkbench: interrupted");
                    break 'outer;
                }
                let result = targets::run_once(k, penv, &w, &p.t);
                done += 1;
                remaining = remaining.saturating_sub(p.t.warmup + p.t.duration + per_run_overhead);
                let status = match &result {
                    Ok(r) => {
                        failures.insert((medium, k), 0);
                        format!(
                            "{:>8} IOPS {:>7.0} MiB/s  p50 {:>7.1} µs  p99 {:>7.1} µs{}",
                            fmt_k(r.iops()),
                            r.mib_s(),
                            r.p50_ns / 1e3,
                            r.p99_ns / 1e3,
                            r.backend_us_per_io()
                                .map(|c| format!("  cpu {c:.2} µs/IO"))
                                .unwrap_or_default()
                        )
                    }
                    Err(e) => {
                        let n = failures.entry((medium, k)).or_insert(0);
                        *n += 1;
                        if *n >= 2 {
                            off.push((medium, k));
                            let why = format!("dropped after repeated failures: {e}");
                            match medium {
                                None => unavailable.push((k, why)),
                                Some(m) => ceiling_notes.push(format!(
                                    "{}: ~~{}~~ {why}",
                                    m.name(),
                                    k.name()
                                )),
                            }
                        }
                        format!("FAILED: {e}")
                    }
                };
                let client = if k == Kind::Fio {
                    "fio".to_string()
                } else if k.is_fio_lb() {
                    "fio-libblkio".to_string()
                } else {
                    w.pattern.name()
                };
                eprintln!(
                    "[{done:>3}/{total_runs} {:>5} left] {:<24} round {round}/{}  {:<9} {:<11} {status}",
                    fmt_dur(remaining),
                    p.section.label(&w),
                    p.rounds,
                    k.target_name(),
                    client,
                );
                records.push(Record {
                    section: p.section,
                    w,
                    round,
                    kind: k,
                    result,
                });
            }
        }
    }
    let interrupted = STOP.load(Ordering::SeqCst);
    eprintln!("blkbench: {done} runs in {}", fmt_dur(started.elapsed()));

    // The report.
    let machine = sysinfo::machine(&image, sysinfo::now_utc());
    let mut cmd = "cargo bench --bench blkbench".to_string();
    let user_args: Vec<&String> = raw_args.iter().filter(|a| *a != "--bench").collect();
    if !user_args.is_empty() {
        cmd.push_str(" --");
        for a in user_args {
            cmd.push(' ');
            cmd.push_str(a);
        }
    }
    let fio_example = kinds.contains(&Kind::Fio).then(|| {
        let w = plan
            .iter()
            .filter(|p| p.section == Section::Main && !p.w.polled)
            .map(|p| p.w)
            .next()
            .unwrap_or(MATRIX[2]);
        format!("fio {}", fio::args(&image, capacity, &w, &main_t).join(" "))
    });
    let fio_lb_example = kinds.iter().any(|k| k.is_fio_lb()).then(|| {
        let w = plan
            .iter()
            .filter(|p| p.section == Section::Main && !p.w.polled)
            .map(|p| p.w)
            .next()
            .unwrap_or(MATRIX[2]);
        let sock = Path::new("<backend socket>");
        let args = fio::libblkio_args(fio::LbTarget::Socket(sock), capacity, &w, &main_t);
        format!("fio {}", args.join(" "))
    });
    let image_desc = format!(
        "{} {}, fully written",
        engine::fmt_size(capacity),
        if o.image.is_some() {
            image.display().to_string()
        } else {
            "temporary file".into()
        }
    );
    let info = RunInfo {
        command: cmd,
        rounds,
        scale_rounds,
        main: main_t,
        scale: scale_t,
        image: image_desc,
        versions,
        unavailable,
        targets: kinds.clone(),
        fio_example,
        fio_lb_example,
        ceiling: ceiling_info,
        ceiling_notes,
        interrupted,
    };
    let rep = Report {
        machine: &machine,
        info: &info,
        records: &records,
    };
    let results_dir = o.results_dir.clone().unwrap_or_else(default_results_dir);
    rep.write(&results_dir)?;
    println!("{}", rep.markdown(&format!("{}/", results_dir.display())));
    eprintln!("blkbench: results in {}", results_dir.display());
    if o.results_dir.is_none() && !o.no_readme && !interrupted && !records.is_empty() {
        let readme = manifest_dir().join("benches").join("README.md");
        match report::update_readme(&readme, &rep.markdown("results/")) {
            Ok(()) => eprintln!("blkbench: updated {}", readme.display()),
            Err(e) => eprintln!("blkbench: README not updated: {e}"),
        }
    }
    drop(loop_dev);
    drop(shm_dir);
    drop(tmp);
    Ok(())
}

fn fmt_k(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
