//! The report: a Markdown file with the tables, two hand-written SVG plots (IOPS against queue
//! depth, and the latency CDF at QD1), and a CSV with every round.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::ceiling::Medium;
use crate::engine::{Pattern, RunResult, Timing, Workload};
use crate::hist::Histogram;
use crate::sysinfo::Machine;
use crate::targets::Kind;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    Main,
    /// Matrix rows again on a memory-backed medium (`--ceiling`).
    Ceiling(Medium),
    QdScaling,
    QueueScaling,
}

impl Section {
    /// Matrix rows (on the disk or a ceiling medium): every client pattern, and the fio
    /// clients.
    pub fn is_matrix(self) -> bool {
        matches!(self, Section::Main | Section::Ceiling(_))
    }

    pub fn medium(self) -> Option<Medium> {
        match self {
            Section::Ceiling(m) => Some(m),
            _ => None,
        }
    }

    /// A row's name in the report: `4k randread QD32`, on a ceiling medium
    /// `4k randread QD32 (tmpfs)`.
    pub fn label(self, w: &Workload) -> String {
        match self {
            Section::Ceiling(m) => format!("{} ({})", w.label(), m.name()),
            _ => w.label(),
        }
    }
}

pub struct Record {
    pub section: Section,
    pub w: Workload,
    pub round: u32,
    pub kind: Kind,
    pub result: Result<RunResult, String>,
}

pub struct RunInfo {
    pub command: String,
    pub rounds: u32,
    pub scale_rounds: u32,
    pub main: Timing,
    pub scale: Timing,
    pub image: String,
    pub versions: Vec<(String, String)>,
    pub unavailable: Vec<(Kind, String)>,
    pub targets: Vec<Kind>,
    pub fio_example: Option<String>,
    pub fio_lb_example: Option<String>,
    /// The ceiling media that ran, and what each was (`--ceiling`).
    pub ceiling: Vec<(Medium, String)>,
    /// Ceiling media or targets that did not run, and why.
    pub ceiling_notes: Vec<String>,
    pub interrupted: bool,
}

/// One target's (queue depth, median IOPS) points.
type Series = (Kind, Vec<(u32, f64)>);

pub const IOPS_SVG: &str = "iops_vs_qd.svg";
pub const CDF_SVG: &str = "lat_cdf_qd1.svg";

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn color(k: Kind) -> &'static str {
    match k {
        Kind::Native => "#555555",
        Kind::Ringfence => "#1f77b4",
        Kind::Qsd => "#ff7f0e",
        Kind::Fio => "#2ca02c",
        Kind::FioLbNative => "#7f7f7f",
        Kind::FioLbRingfence => "#17becf",
        Kind::FioLbQsd => "#d62728",
    }
}

fn fmt_iops(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_us(ns: f64) -> String {
    let us = ns / 1000.0;
    if us >= 1000.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

/// All the rounds of one (section, workload, target).
struct Cell<'a> {
    rounds: BTreeMap<u32, &'a RunResult>,
    errors: Vec<&'a str>,
}

impl Cell<'_> {
    fn med(&self, f: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
        median(self.rounds.values().filter_map(|r| f(r)).collect())
    }

    fn iops(&self) -> Option<f64> {
        self.med(|r| Some(r.iops()))
    }

    fn merged_hist(&self) -> Option<Histogram> {
        let mut h = Histogram::new();
        let mut any = false;
        for r in self.rounds.values() {
            if let Some(x) = &r.hist {
                h.merge(x);
                any = true;
            }
        }
        any.then_some(h)
    }
}

pub struct Report<'a> {
    pub machine: &'a Machine,
    pub info: &'a RunInfo,
    pub records: &'a [Record],
}

impl<'a> Report<'a> {
    /// Workloads of a section in order of first appearance.
    fn workloads(&self, s: Section) -> Vec<Workload> {
        let mut out: Vec<Workload> = Vec::new();
        for r in self.records.iter().filter(|r| r.section == s) {
            if !out.contains(&r.w) {
                out.push(r.w);
            }
        }
        out
    }

    fn kinds(&self, s: Section, w: &Workload) -> Vec<Kind> {
        let mut ks: Vec<Kind> = self
            .records
            .iter()
            .filter(|r| r.section == s && r.w == *w)
            .map(|r| r.kind)
            .collect();
        ks.sort();
        ks.dedup();
        ks
    }

    fn cell(&self, s: Section, w: &Workload, k: Kind) -> Cell<'a> {
        let mut c = Cell {
            rounds: BTreeMap::new(),
            errors: Vec::new(),
        };
        for r in self.records {
            if r.section == s && r.w == *w && r.kind == k {
                match &r.result {
                    Ok(res) => {
                        c.rounds.insert(r.round, res);
                    }
                    Err(e) => c.errors.push(e),
                }
            }
        }
        c
    }

    /// Per-round `f(target) / f(base)` for the rounds where both ran.
    fn ratios(
        &self,
        s: Section,
        w: &Workload,
        k: Kind,
        base: Kind,
        f: impl Fn(&RunResult) -> f64,
    ) -> Vec<f64> {
        let a = self.cell(s, w, k);
        let b = self.cell(s, w, base);
        a.rounds
            .iter()
            .filter_map(|(round, r)| Some(f(r) / f(b.rounds.get(round)?)))
            .collect()
    }

    pub fn markdown(&self, img_prefix: &str) -> String {
        let m = self.machine;
        let i = self.info;
        let mut o = String::new();
        let _ = writeln!(o, "### blkbench results, {}\n", m.date);
        if i.interrupted {
            let _ = writeln!(o, "**Interrupted: partial results.**\n");
        }
        let _ = writeln!(
            o,
            "Machine: `{}`, {} × {}, {:.0} GiB RAM, Linux {}, {}; image on {} ({}). \
             ringfence at {}.\n",
            m.host,
            m.cpus,
            m.cpu,
            m.mem_gib,
            m.kernel,
            m.os,
            m.fs,
            i.image,
            if m.commit.is_empty() { "?" } else { &m.commit }
        );
        let _ = writeln!(
            o,
            "Command: `{}`. Targets interleaved round by round; matrix: {} of {} s \
             after {} s warm-up; scaling points: {} of {} s after {} s. Values are medians \
             over rounds; \"vs best native\" is the median of the per-round IOPS ratios to the \
             best native run of the same round (each round's ratio in parentheses), \"vs qsd\" \
             the same against qemu-storage-daemon under the same client pattern. Client \
             patterns: per-request submits each request on its own as its completion frees a \
             slot (one `io_uring_enter`, or one kick when the device asks for it, per \
             request); batch N in groups of N; round refills every completion one wait \
             returned and submits them together. Latencies in µs; CPU/IO is the backend \
             process's user+system CPU time per I/O in µs (from /proc/PID/stat).\n",
            i.command,
            rounds(i.rounds),
            secs(i.main.duration),
            secs(i.main.warmup),
            rounds(i.scale_rounds),
            secs(i.scale.duration),
            secs(i.scale.warmup)
        );
        let _ = writeln!(o, "Targets:");
        for k in &i.targets {
            let _ = writeln!(o, "- **{}**: {}", k.name(), k.describe());
        }
        for (k, why) in &i.unavailable {
            let _ = writeln!(o, "- ~~{}~~: not run: {}", k.name(), one_line(why, 300));
        }
        if !i.versions.is_empty() {
            let v: Vec<String> = i.versions.iter().map(|(a, b)| format!("{a} {b}")).collect();
            let _ = writeln!(o, "\nVersions: {}.", v.join("; "));
        }
        o.push('\n');

        if self.records.iter().any(|r| r.section == Section::Main) {
            self.headline(&mut o);
            self.main_table(&mut o);
            self.fio_lb_table(&mut o);
            self.fio_table(&mut o);
            self.goals(&mut o);
        }
        self.ceiling(&mut o);

        for (s, title, col) in [
            (Section::QdScaling, "Queue-depth scaling", "QD (1 queue)"),
            (Section::QueueScaling, "Queue scaling", "queues"),
        ] {
            let ws = self.workloads(s);
            if ws.is_empty() {
                continue;
            }
            let kinds = self.kinds_in(s);
            let _ = writeln!(
                o,
                "**{title}** ({}, {} client; IOPS, with the median per-round ratio to native):\n",
                scaling_base_label(&ws[0], s),
                ws.iter()
                    .find(|w| w.qd > 1)
                    .unwrap_or(&ws[0])
                    .pattern
                    .name()
            );
            let mut hdr = format!("| {col} |");
            let mut sep = "|--:|".to_string();
            for k in &kinds {
                let _ = write!(hdr, " {} |", k.name());
                sep.push_str("--:|");
            }
            if kinds.iter().any(|k| k.has_cpu()) {
                for k in kinds.iter().filter(|k| k.has_cpu()) {
                    let _ = write!(hdr, " {} CPU/IO |", k.name());
                    sep.push_str("--:|");
                }
            }
            let _ = writeln!(o, "{hdr}\n{sep}");
            for w in &ws {
                let x = if s == Section::QdScaling {
                    w.qd
                } else {
                    w.queues
                };
                let mut line = format!("| {x} |");
                for k in &kinds {
                    let c = self.cell(s, w, *k);
                    let ratio = median(self.ratios_best(s, w, *k, RunResult::iops));
                    let cell = match (c.iops(), ratio) {
                        (None, _) => "—".to_string(),
                        (Some(v), Some(r)) if *k != Kind::Native => {
                            format!("{} ({r:.2})", fmt_iops(v))
                        }
                        (Some(v), _) => fmt_iops(v),
                    };
                    let _ = write!(line, " {cell} |");
                }
                for k in kinds.iter().filter(|k| k.has_cpu()) {
                    let c = self.cell(s, w, *k);
                    let _ = write!(
                        line,
                        " {} |",
                        opt(c.med(RunResult::backend_us_per_io), |v| format!("{v:.2}"))
                    );
                }
                let _ = writeln!(o, "{line}");
            }
            o.push('\n');
        }

        if self.qd_series().is_some() {
            let _ = writeln!(o, "![IOPS against queue depth]({img_prefix}{IOPS_SVG})\n");
        }
        if self.cdf_source().is_some() {
            let _ = writeln!(o, "![Latency CDF at QD1]({img_prefix}{CDF_SVG})\n");
        }
        if let Some(f) = &i.fio_example {
            let _ = writeln!(o, "fio baseline command (one row; the others change --rw, --bs, --iodepth, --numjobs): `{f}`\n");
        }
        if let Some(f) = &i.fio_lb_example {
            let _ = writeln!(o, "fio libblkio client command (one row, on a backend's socket; native uses `--libblkio_driver=io_uring --libblkio_path=<image>`; several queues add `--thread`): `{f}`\n");
        }
        o
    }

    fn kinds_in(&self, s: Section) -> Vec<Kind> {
        let mut ks: Vec<Kind> = self
            .records
            .iter()
            .filter(|r| r.section == s)
            .map(|r| r.kind)
            .collect();
        ks.sort();
        ks.dedup();
        ks
    }

    /// Base workloads (without the client pattern) of a section, in order of first appearance.
    fn groups(&self, s: Section) -> Vec<Workload> {
        let mut out: Vec<Workload> = Vec::new();
        for r in self.records.iter().filter(|r| r.section == s) {
            if !out.contains(&r.w.base()) {
                out.push(r.w.base());
            }
        }
        out
    }

    /// The client patterns of a section (fio's own client aside), in order of first appearance.
    fn patterns(&self, s: Section) -> Vec<Pattern> {
        let mut out: Vec<Pattern> = Vec::new();
        for r in self
            .records
            .iter()
            .filter(|r| r.section == s && !r.kind.is_fio_client())
        {
            if !out.contains(&r.w.pattern) {
                out.push(r.w.pattern);
            }
        }
        out
    }

    /// The (target, workload with its pattern) rows of a group: pattern by pattern, the targets
    /// in their order, then the fio clients (fio, fio's libblkio engine).
    fn variants(&self, s: Section, base: &Workload) -> Vec<(Kind, Workload)> {
        let mut out: Vec<(Kind, Workload)> = Vec::new();
        for p in self.patterns(s) {
            let w = base.with_pattern(p);
            for k in self.kinds(s, &w) {
                if !k.is_fio_client() {
                    out.push((k, w));
                }
            }
        }
        for k in self.kinds(s, base) {
            if k.is_fio_client() {
                out.push((k, *base));
            }
        }
        out
    }

    /// The row of `k` under client pattern `p` in a group (at QD1 every pattern is one client).
    fn row(&self, base: &Workload, p: Pattern) -> Workload {
        base.with_pattern(p.effective(base.qd))
    }

    /// Per round, the native run with the most IOPS among every native pattern and fio.
    fn best_native(
        &self,
        s: Section,
        base: &Workload,
    ) -> BTreeMap<u32, (Kind, Pattern, &'a RunResult)> {
        let mut best: BTreeMap<u32, (Kind, Pattern, &'a RunResult)> = BTreeMap::new();
        for r in self.records {
            let Ok(res) = &r.result else { continue };
            if r.section != s || !r.kind.is_native() || r.w.base() != *base {
                continue;
            }
            let e = best.entry(r.round).or_insert((r.kind, r.w.pattern, res));
            if res.iops() > e.2.iops() {
                *e = (r.kind, r.w.pattern, res);
            }
        }
        best
    }

    /// Per-round `f(target) / f(best native of that round)`.
    fn ratios_best(
        &self,
        s: Section,
        w: &Workload,
        k: Kind,
        f: impl Fn(&RunResult) -> f64,
    ) -> Vec<f64> {
        let best = self.best_native(s, &w.base());
        self.cell(s, w, k)
            .rounds
            .iter()
            .filter_map(|(round, r)| Some(f(r) / f(best.get(round)?.2)))
            .collect()
    }

    /// Median per-round p50 minus the best native's p50, in µs.
    fn p50_delta_best(&self, s: Section, w: &Workload, k: Kind) -> Option<f64> {
        let best = self.best_native(s, &w.base());
        let d = self
            .cell(s, w, k)
            .rounds
            .iter()
            .filter_map(|(round, r)| Some((r.p50_ns - best.get(round)?.2.p50_ns) / 1000.0))
            .collect();
        median(d)
    }

    /// Median per-round mean latency minus the best native's, in µs: at the same depth, the
    /// time each request spends outside the fastest native path.
    fn mean_delta_best(&self, s: Section, w: &Workload, k: Kind) -> Option<f64> {
        let best = self.best_native(s, &w.base());
        let d = self
            .cell(s, w, k)
            .rounds
            .iter()
            .filter_map(|(round, r)| Some((r.mean_ns - best.get(round)?.2.mean_ns) / 1000.0))
            .collect();
        median(d)
    }

    /// Which native won the rounds: `native round 3/5, fio 2/5`.
    fn winners(&self, s: Section, base: &Workload) -> String {
        let best = self.best_native(s, base);
        let mut counts: Vec<(String, usize)> = Vec::new();
        for (k, p, _) in best.values() {
            let name = variant_name(*k, *p, base.qd);
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some(c) => c.1 += 1,
                None => counts.push((name, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        let n = best.len();
        counts
            .iter()
            .map(|(name, c)| format!("{name} {c}/{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn ratio_cell(rs: Vec<f64>) -> String {
        match median(rs.clone()) {
            None => "—".into(),
            Some(m) => {
                let per: Vec<String> = rs.iter().map(|r| format!("{r:.2}")).collect();
                format!("**{m:.2}** ({})", per.join(" "))
            }
        }
    }

    /// The compact table: every client pattern's ratio to the best native, and ringfence to
    /// qemu-storage-daemon under the same pattern.
    fn headline(&self, o: &mut String) {
        let s = Section::Main;
        let lb_any = [Kind::FioLbRingfence, Kind::FioLbQsd]
            .into_iter()
            .any(|k| self.records.iter().any(|r| r.section == s && r.kind == k));
        let lb_native = self
            .records
            .iter()
            .any(|r| r.section == s && r.kind == Kind::FioLbNative);
        let _ = writeln!(
            o,
            "Against the best native (per round, the native run with the most IOPS: blkio \
             `io_uring` under each client pattern, and fio{}), median of the per-round IOPS ratios; \
             at QD1 also the median per-round p50 difference to that run. At QD1 the patterns \
             are one client (one request, submitted with the wait for its completion).{}\n",
            if lb_native {
                ", and fio's libblkio engine on `io_uring`"
            } else {
                ""
            },
            if !lb_any {
                ""
            } else {
                " The fio-libblkio columns are the same backends under fio's libblkio engine \
                 (fio's default submission), an independent client."
            }
        );
        let rows: Vec<(Section, Workload)> = self.groups(s).into_iter().map(|w| (s, w)).collect();
        self.headline_table(o, &rows, false);
    }

    /// The headline's table for `rows` (each a base workload in its section); with `spread`,
    /// each ratio is followed by the range of its per-round values.
    fn headline_table(&self, o: &mut String, rows: &[(Section, Workload)], spread: bool) {
        let mut sections: Vec<Section> = Vec::new();
        for (s, _) in rows {
            if !sections.contains(s) {
                sections.push(*s);
            }
        }
        let mut pats: Vec<Pattern> = Vec::new();
        for s in &sections {
            for p in self.patterns(*s) {
                if !pats.contains(&p) {
                    pats.push(p);
                }
            }
        }
        let ran = |k: Kind| {
            self.records
                .iter()
                .any(|r| sections.contains(&r.section) && r.kind == k)
        };
        let contenders: Vec<Kind> = [Kind::Ringfence, Kind::Qsd]
            .into_iter()
            .filter(|k| ran(*k))
            .collect();
        let mut hdr = "| Workload | best native: IOPS (won the round) |".to_string();
        let mut sep = "|---|---|".to_string();
        for k in &contenders {
            for p in &pats {
                let _ = write!(hdr, " {} {} |", k.name(), p.name());
                sep.push_str("--:|");
            }
        }
        let both = contenders.len() == 2;
        if both {
            for p in &pats {
                let _ = write!(hdr, " ringfence / qsd, {} |", p.name());
                sep.push_str("--:|");
            }
        }
        // fio's libblkio engine, the independent client: its runs against the best native,
        // and ringfence against qsd under it.
        let lb: Vec<Kind> = [Kind::FioLbRingfence, Kind::FioLbQsd]
            .into_iter()
            .filter(|k| ran(*k))
            .collect();
        for k in &lb {
            let _ = write!(hdr, " {} fio-libblkio |", k.target_name());
            sep.push_str("--:|");
        }
        let lb_both = lb.len() == 2;
        if lb_both {
            hdr.push_str(" ringfence / qsd, fio-libblkio |");
            sep.push_str("--:|");
        }
        let _ = writeln!(o, "{hdr}\n{sep}");
        let ratio = |rs: Vec<f64>| {
            let r = median(rs.clone());
            let mut cell = opt(r, |r| format!("{r:.2}×"));
            if spread && r.is_some() {
                cell.push_str(&spread_note(&rs));
            }
            cell
        };
        for &(s, base) in rows {
            let best = self.best_native(s, &base);
            let best_iops = median(best.values().map(|b| b.2.iops()).collect());
            let mut line = format!(
                "| {} | {} ({}) |",
                s.label(&base),
                opt(best_iops, fmt_iops),
                self.winners(s, &base)
            );
            for k in &contenders {
                for p in &pats {
                    let w = self.row(&base, *p);
                    let mut cell = ratio(self.ratios_best(s, &w, *k, RunResult::iops));
                    if base.qd == 1 {
                        if let Some(d) = self.p50_delta_best(s, &w, *k) {
                            let _ = write!(cell, ", p50 {d:+.1} µs");
                        }
                    }
                    let _ = write!(line, " {cell} |");
                }
            }
            if both {
                for p in &pats {
                    let w = self.row(&base, *p);
                    let cell =
                        ratio(self.ratios(s, &w, Kind::Ringfence, Kind::Qsd, RunResult::iops));
                    let _ = write!(line, " {cell} |");
                }
            }
            for k in &lb {
                let mut cell = ratio(self.ratios_best(s, &base, *k, RunResult::iops));
                if base.qd == 1 {
                    if let Some(d) = self.p50_delta_best(s, &base, *k) {
                        let _ = write!(cell, ", p50 {d:+.1} µs");
                    }
                }
                let _ = write!(line, " {cell} |");
            }
            if lb_both {
                let cell = ratio(self.ratios(
                    s,
                    &base,
                    Kind::FioLbRingfence,
                    Kind::FioLbQsd,
                    RunResult::iops,
                ));
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(o, "{line}");
        }
        o.push('\n');
    }

    /// Every row with its latencies and CPU, each round's ratio in parentheses.
    fn main_table(&self, o: &mut String) {
        self.rows_table(o, Section::Main);
    }

    /// The full table of a matrix section. A ceiling medium's has two more columns: the range
    /// of the per-round ratios to the best native, and the median per-round difference of the
    /// mean latency to the best native's.
    fn rows_table(&self, o: &mut String, s: Section) {
        let ceiling = s.medium().is_some();
        if ceiling {
            let _ = writeln!(
                o,
                "| Workload | Client | Target | IOPS | MiB/s | mean | p50 | p99 | p99.9 | CPU/IO | vs best native | spread | mean − best native's | vs qsd |"
            );
            let _ = writeln!(
                o,
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|--:|---|"
            );
        } else {
            let _ = writeln!(
                o,
                "| Workload | Client | Target | IOPS | MiB/s | mean | p50 | p99 | p99.9 | CPU/IO | vs best native | vs qsd |"
            );
            let _ = writeln!(o, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|");
        }
        for base in self.groups(s) {
            let label = s.label(&base);
            for (k, w) in self.variants(s, &base) {
                let c = self.cell(s, &w, k);
                let client = variant_client(k, w.pattern, base.qd);
                if c.rounds.is_empty() {
                    let e = c.errors.first().copied().unwrap_or("no result");
                    let _ = writeln!(
                        o,
                        "| {label} | {client} | {} | failed: {} ||||||||{} |",
                        k.target_name(),
                        one_line(e, 160),
                        if ceiling { "|||" } else { "|" }
                    );
                    continue;
                }
                // ringfence against qsd under the same client.
                let peer = match k {
                    Kind::Ringfence => Some(Kind::Qsd),
                    Kind::FioLbRingfence => Some(Kind::FioLbQsd),
                    _ => None,
                };
                let vs_qsd = match peer {
                    Some(q) if self.has_in(s, &w, q) => {
                        Self::ratio_cell(self.ratios(s, &w, k, q, RunResult::iops))
                    }
                    _ => String::new(),
                };
                let vs_best = self.ratios_best(s, &w, k, RunResult::iops);
                let extra = if ceiling {
                    let delta = if k.is_native() {
                        String::new()
                    } else {
                        opt(self.mean_delta_best(s, &w, k), |d| format!("{d:+.1} µs"))
                    };
                    format!(" {} | {delta} |", spread_range(&vs_best))
                } else {
                    String::new()
                };
                let _ = writeln!(
                    o,
                    "| {label} | {client} | {} | {} | {} | {} | {} | {} | {} | {} | {} |{extra} {vs_qsd} |",
                    k.target_name(),
                    opt(c.iops(), fmt_iops),
                    opt(c.med(|r| Some(r.mib_s())), |v| format!("{v:.0}")),
                    opt(c.med(|r| Some(r.mean_ns)), fmt_us),
                    opt(c.med(|r| Some(r.p50_ns)), fmt_us),
                    opt(c.med(|r| Some(r.p99_ns)), fmt_us),
                    opt(c.med(|r| Some(r.p999_ns)), fmt_us),
                    opt(c.med(RunResult::backend_us_per_io), |v| format!("{v:.2}")),
                    Self::ratio_cell(vs_best) + &failed_note(c.errors.len()),
                );
            }
            let best = self.best_native(s, &base);
            if !best.is_empty() {
                let _ = writeln!(
                    o,
                    "| {label} | | **best native** | {} | {} | | {} | | | | won by {} |{} |",
                    opt(
                        median(best.values().map(|b| b.2.iops()).collect()),
                        fmt_iops
                    ),
                    opt(median(best.values().map(|b| b.2.mib_s()).collect()), |v| {
                        format!("{v:.0}")
                    }),
                    opt(median(best.values().map(|b| b.2.p50_ns).collect()), fmt_us),
                    self.winners(s, &base),
                    if ceiling { " | |" } else { "" }
                );
            }
        }
        o.push('\n');
    }

    /// The software ceiling (`--ceiling`): the ceiling rows beside the disk's, each against the
    /// best native on its own medium, then every ceiling row in full.
    fn ceiling(&self, o: &mut String) {
        let i = self.info;
        let mut media: Vec<Medium> = Vec::new();
        for r in self.records {
            if let Some(m) = r.section.medium() {
                if !media.contains(&m) {
                    media.push(m);
                }
            }
        }
        if media.is_empty() && i.ceiling.is_empty() && i.ceiling_notes.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "**Software ceiling** (`--ceiling`): the backend's own cost per request without the \
             disk: native io_uring and ringfence on memory-backed storage; the difference is the \
             hand-off cost. The 4k rows again, with the same targets and client patterns, \
             interleaved round by round as on the disk, on:\n"
        );
        for (m, what) in &i.ceiling {
            let _ = writeln!(o, "- **{}**: {what}", m.name());
        }
        for n in &i.ceiling_notes {
            let _ = writeln!(o, "- {}", one_line(n, 300));
        }
        o.push('\n');
        if media.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "Each ratio is against the best native on the same medium in the same round (the \
             native run with the most IOPS, as on the disk), the median of the per-round ratios \
             with their range (min–max) in parentheses; the disk's row stands above the ceiling \
             rows of the same workload.\n"
        );
        let mut rows: Vec<(Section, Workload)> = Vec::new();
        let mut bases: Vec<Workload> = Vec::new();
        for m in &media {
            for w in self.groups(Section::Ceiling(*m)) {
                if !bases.contains(&w) {
                    bases.push(w);
                }
            }
        }
        let disk = self.groups(Section::Main);
        for base in bases {
            if disk.contains(&base) {
                rows.push((Section::Main, base));
            }
            for m in &media {
                if self.groups(Section::Ceiling(*m)).contains(&base) {
                    rows.push((Section::Ceiling(*m), base));
                }
            }
        }
        self.headline_table(o, &rows, true);
        let _ = writeln!(
            o,
            "Every ceiling row, each round's ratio to the best native in parentheses, and their \
             range; \"mean − best native's\" is the median per-round difference of the mean \
             latency to the best native run of the round: at the same depth, the time each \
             request spends outside the fastest native path.\n"
        );
        for m in media {
            self.rows_table(o, Section::Ceiling(m));
        }
    }

    /// fio's libblkio engine, the independent client (issue 12: it should reproduce the 4k QD32
    /// ratios within noise): each target's IOPS under it, its ratios, and blkbench's own
    /// per-request client's ratios beside them.
    fn fio_lb_table(&self, o: &mut String) {
        let s = Section::Main;
        let rows: Vec<Workload> = self
            .groups(s)
            .into_iter()
            .filter(|w| Kind::FIO_LB.iter().any(|(k, _)| self.has(w, *k)))
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "Independent client, fio's libblkio engine (fio's default submission: each request \
             submitted, and the device kicked, on its own): median IOPS of native (libblkio \
             `io_uring` on the image), ringfence and qsd (libblkio `virtio-blk-vhost-user`), and \
             the medians of the per-round ratios (each round's in parentheses); best native as \
             above (it includes the fio-libblkio native run). The last two columns are \
             blkbench's own per-request client on the same rounds, for comparison.\n"
        );
        let _ = writeln!(
            o,
            "| Workload | native | ringfence | qsd | ringfence / best native | qsd / best native | ringfence / qsd | ringfence / native (same client) | blkbench per-request: ringfence / best native | blkbench per-request: ringfence / qsd |"
        );
        let _ = writeln!(o, "|---|--:|--:|--:|---|---|---|---|---|---|");
        for base in rows {
            let iops = |k: Kind| {
                let c = self.cell(s, &base, k);
                match c.iops() {
                    Some(v) => fmt_iops(v) + &failed_note(c.errors.len()),
                    None if !c.errors.is_empty() => {
                        format!("failed: {}", one_line(c.errors[0], 120))
                    }
                    None => "—".into(),
                }
            };
            let best = |k: Kind| Self::ratio_cell(self.ratios_best(s, &base, k, RunResult::iops));
            let pair = |a: Kind, b: Kind, w: &Workload| {
                Self::ratio_cell(self.ratios(s, w, a, b, RunResult::iops))
            };
            let per_request = self.row(&base, Pattern::PER_REQUEST);
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                base.label(),
                iops(Kind::FioLbNative),
                iops(Kind::FioLbRingfence),
                iops(Kind::FioLbQsd),
                best(Kind::FioLbRingfence),
                best(Kind::FioLbQsd),
                pair(Kind::FioLbRingfence, Kind::FioLbQsd, &base),
                pair(Kind::FioLbRingfence, Kind::FioLbNative, &base),
                Self::ratio_cell(self.ratios_best(
                    s,
                    &per_request,
                    Kind::Ringfence,
                    RunResult::iops
                )),
                pair(Kind::Ringfence, Kind::Qsd, &per_request),
            );
        }
        o.push('\n');
    }

    fn fio_table(&self, o: &mut String) {
        let s = Section::Main;
        let rows: Vec<Workload> = self
            .groups(s)
            .into_iter()
            .filter(|w| w.is_sequential() && self.has(w, Kind::Fio))
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "Sequential rows against fio's io_uring engine alone (per-round IOPS ratio to fio):\n"
        );
        let _ = writeln!(o, "| Workload | Client | Target | vs fio |");
        let _ = writeln!(o, "|---|---|---|---|");
        for base in rows {
            for (k, w) in self.variants(s, &base) {
                if k == Kind::Fio {
                    continue;
                }
                let a = self.cell(s, &w, k);
                let b = self.cell(s, &base, Kind::Fio);
                let rs = a
                    .rounds
                    .iter()
                    .filter_map(|(round, r)| Some(r.iops() / b.rounds.get(round)?.iops()))
                    .collect();
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} |",
                    base.label(),
                    variant_client(k, w.pattern, base.qd),
                    k.target_name(),
                    Self::ratio_cell(rs)
                );
            }
        }
        o.push('\n');
    }

    /// The targets of issue 12, checked for ringfence (and qemu-storage-daemon for reference)
    /// under each client pattern.
    fn goals(&self, o: &mut String) {
        let s = Section::Main;
        let groups = self.groups(s);
        let pats = self.patterns(s);
        let cols: Vec<(Kind, Pattern)> = [Kind::Ringfence, Kind::Qsd]
            .into_iter()
            .filter(|k| self.records.iter().any(|r| r.section == s && r.kind == *k))
            .flat_map(|k| pats.iter().map(move |p| (k, *p)))
            .collect();
        if cols.is_empty() || !groups.iter().any(|w| !self.best_native(s, w).is_empty()) {
            return;
        }
        let find = |w: Workload| groups.iter().find(|x| **x == w).copied();
        let mut lines: Vec<(String, Vec<String>)> = Vec::new();
        let cells =
            |f: &dyn Fn(Kind, &Workload) -> Option<String>, base: &Workload| -> Vec<String> {
                cols.iter()
                    .map(|(k, p)| f(*k, &self.row(base, *p)).unwrap_or_else(|| "—".into()))
                    .collect()
            };
        let vs_best = |k: Kind, w: &Workload| {
            let r = median(self.ratios_best(s, w, k, RunResult::iops))?;
            Some(format!("{} {r:.2}", mark(r >= 0.95)))
        };
        let qd32 = [
            (Workload::new(true, 100, 4096, 32), "4k randread QD32"),
            (Workload::new(true, 0, 4096, 32), "4k randwrite QD32"),
        ];
        for (w, what) in qd32 {
            if let Some(w) = find(w) {
                lines.push((
                    format!("{what} ≥ 0.95 × best native IOPS"),
                    cells(&vs_best, &w),
                ));
            }
        }
        if cols.iter().any(|(k, _)| *k == Kind::Qsd) {
            for (w, what) in qd32 {
                let Some(w) = find(w) else { continue };
                let vs_qsd = |k: Kind, w: &Workload| {
                    if k != Kind::Ringfence {
                        return Some(String::new());
                    }
                    let r = median(self.ratios(s, w, k, Kind::Qsd, RunResult::iops))?;
                    Some(format!("{} {r:.2}", mark(r >= 1.10)))
                };
                lines.push((
                    format!("{what} ≥ 1.10 × qemu-storage-daemon IOPS"),
                    cells(&vs_qsd, &w),
                ));
            }
        }
        if let Some(w) = find(Workload::new(true, 100, 4096, 1)) {
            let lat = |k: Kind, w: &Workload| {
                let d = self.p50_delta_best(s, w, k)?;
                Some(format!("{} {d:+.1} µs", mark(d <= 5.0)))
            };
            lines.push((
                "4k randread QD1 p50 ≤ best native + 5 µs".into(),
                cells(&lat, &w),
            ));
        }
        for (w, what) in [
            (Workload::new(false, 100, 128 << 10, 8), "128k seq read QD8"),
            (Workload::new(false, 0, 128 << 10, 8), "128k seq write QD8"),
        ] {
            let Some(w) = find(w) else { continue };
            if !self.has(&w, Kind::Fio) {
                continue;
            }
            let vs_fio = |k: Kind, x: &Workload| {
                let fio = self.cell(s, &w, Kind::Fio);
                let rs = self
                    .cell(s, x, k)
                    .rounds
                    .iter()
                    .filter_map(|(round, r)| Some(r.iops() / fio.rounds.get(round)?.iops()))
                    .collect();
                let r = median(rs)?;
                Some(format!("{} {r:.2}", mark(r >= 0.95)))
            };
            lines.push((
                format!("{what} ≥ 0.95 × fio io_uring IOPS"),
                cells(&vs_fio, &w),
            ));
        }
        if let Some(w) = groups.iter().find(|w| w.queues == 2 && !w.polled) {
            lines.push((
                format!("{} ≥ 0.95 × best native (2 threads)", w.label()),
                cells(&vs_best, w),
            ));
        }
        if let Some(w) = find(Workload::new(true, 100, 4096, 1)) {
            if cols.iter().any(|(k, _)| *k == Kind::Qsd) {
                let cpu = |k: Kind, w: &Workload| {
                    if k != Kind::Ringfence {
                        return Some(String::new());
                    }
                    let a = self.cell(s, w, k).med(RunResult::backend_us_per_io)?;
                    let b = self
                        .cell(s, w, Kind::Qsd)
                        .med(RunResult::backend_us_per_io)?;
                    Some(format!("{} {a:.1} vs {b:.1} µs", mark(a <= b)))
                };
                lines.push((
                    "4k randread QD1 backend CPU per I/O ≤ qemu-storage-daemon's".into(),
                    cells(&cpu, &w),
                ));
            }
        }
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(o, "Targets (issue 12; benchmarks, not tests):\n");
        let mut hdr = "| Target |".to_string();
        let mut sep = "|---|".to_string();
        for (k, p) in &cols {
            let _ = write!(hdr, " {} {} |", k.name(), p.name());
            sep.push_str("---|");
        }
        let _ = writeln!(o, "{hdr}\n{sep}");
        for (g, cells) in lines {
            let _ = writeln!(o, "| {g} | {} |", cells.join(" | "));
        }
        o.push('\n');
    }

    fn has(&self, w: &Workload, k: Kind) -> bool {
        self.has_in(Section::Main, w, k)
    }

    fn has_in(&self, s: Section, w: &Workload, k: Kind) -> bool {
        !self.cell(s, w, k).rounds.is_empty()
    }

    /// (target, [(qd, median IOPS)]) from the QD-scaling section.
    fn qd_series(&self) -> Option<Vec<Series>> {
        let ws = self.workloads(Section::QdScaling);
        if ws.len() < 2 {
            return None;
        }
        let series: Vec<Series> = self
            .kinds_in(Section::QdScaling)
            .into_iter()
            .map(|k| {
                let pts = ws
                    .iter()
                    .filter_map(|w| Some((w.qd, self.cell(Section::QdScaling, w, k).iops()?)))
                    .collect();
                (k, pts)
            })
            .filter(|(_, p): &(Kind, Vec<_>)| !p.is_empty())
            .collect();
        (!series.is_empty()).then_some(series)
    }

    /// The QD1 workload whose latency distribution is plotted.
    fn cdf_source(&self) -> Option<(Section, Workload)> {
        let pick = |s: Section| {
            self.workloads(s)
                .into_iter()
                .find(|w| w.qd == 1 && w.queues == 1 && w.random && w.read_pct == 100 && !w.polled)
                .or_else(|| self.workloads(s).into_iter().find(|w| w.qd == 1))
                .map(|w| (s, w))
        };
        pick(Section::Main).or_else(|| pick(Section::QdScaling))
    }

    pub fn iops_svg(&self) -> Option<String> {
        let series = self.qd_series()?;
        let ws = self.workloads(Section::QdScaling);
        let base = scaling_base_label(&ws[0], Section::QdScaling);
        let ymax = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.1))
            .fold(0.0, f64::max);
        let qmin = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.0))
            .min()?;
        let qmax = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.0))
            .max()?;
        let (lo, hi) = (
            f64::from(qmin).log2(),
            f64::from(qmax).log2().max(f64::from(qmin).log2() + 1.0),
        );
        let ytop = nice_ceil(ymax * 1.05);
        let mut c = Canvas::new(&format!(
            "IOPS vs queue depth: {base} (median of {})",
            rounds(self.info.scale_rounds)
        ));
        let g = c.g;
        let xs = |q: f64| g.x(((q.log2() - lo) / (hi - lo)).clamp(0.0, 1.0));
        // x grid: powers of two
        let mut q = 1u32;
        while q <= qmax {
            if q >= qmin {
                let x = xs(f64::from(q));
                c.vline(x, &q.to_string());
            }
            q *= 2;
        }
        for i in 0..=5 {
            let v = ytop * f64::from(i) / 5.0;
            let y = g.y(v / ytop);
            c.hline(y, &fmt_iops(v));
        }
        c.axis_labels("queue depth (requests in flight, 1 queue)", "IOPS");
        for (k, pts) in &series {
            let p: Vec<(f64, f64)> = pts
                .iter()
                .map(|(q, v)| (xs(f64::from(*q)), g.y(v / ytop)))
                .collect();
            c.polyline(&p, color(*k), true);
        }
        c.legend(&series.iter().map(|(k, _)| *k).collect::<Vec<_>>());
        Some(c.finish())
    }

    pub fn cdf_svg(&self) -> Option<String> {
        let (s, w) = self.cdf_source()?;
        let hists: Vec<(Kind, Histogram)> = self
            .kinds(s, &w)
            .into_iter()
            .filter_map(|k| Some((k, self.cell(s, &w, k).merged_hist()?)))
            .filter(|(_, h)| h.count() > 0)
            .collect();
        if hists.is_empty() {
            return None;
        }
        let lo_ns = hists.iter().map(|(_, h)| h.quantile(0.0005)).min()? as f64;
        let hi_ns = hists.iter().map(|(_, h)| h.quantile(0.999)).max()? as f64;
        let (lo, hi) = nice_log_range(lo_ns / 1000.0, hi_ns / 1000.0);
        let mut c = Canvas::new(&format!("Latency CDF: {} (all rounds merged)", w.label()));
        let g = c.g;
        let xs =
            |us: f64| g.x(((us.log10() - lo.log10()) / (hi.log10() - lo.log10())).clamp(0.0, 1.0));
        for t in log_ticks(lo, hi) {
            let x = xs(t);
            c.vline(x, &fmt_tick(t));
        }
        for i in 0..=5 {
            let f = f64::from(i) / 5.0;
            let y = g.y(f);
            c.hline(y, &format!("{:.0}%", f * 100.0));
        }
        c.axis_labels("latency (µs, log scale)", "fraction of I/Os ≤ latency");
        for (k, h) in &hists {
            let mut pts = Vec::new();
            let mut prev = 0.0;
            for (ns, frac) in h.cdf() {
                let x = xs(ns as f64 / 1000.0);
                pts.push((x, g.y(prev)));
                pts.push((x, g.y(frac)));
                prev = frac;
            }
            c.polyline(&pts, color(*k), false);
        }
        c.legend(&hists.iter().map(|(k, _)| *k).collect::<Vec<_>>());
        Some(c.finish())
    }

    pub fn csv(&self) -> String {
        let mut o = String::from(
            "section,workload,client,round,target,iops,mib_s,mean_us,p50_us,p99_us,p999_us,backend_cpu_us_per_io,client_cpu_us_per_io,error\n",
        );
        for r in self.records {
            let sec = match r.section {
                Section::Main => "main",
                Section::Ceiling(_) => "ceiling",
                Section::QdScaling => "qd",
                Section::QueueScaling => "queues",
            };
            let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
            match &r.result {
                Ok(x) => {
                    let _ = writeln!(
                        o,
                        "{sec},{},{},{},{},{:.1},{:.2},{:.3},{:.3},{:.3},{:.3},{},{},",
                        r.section.label(&r.w),
                        variant_client(r.kind, r.w.pattern, r.w.qd),
                        r.round,
                        r.kind.target_name(),
                        x.iops(),
                        x.mib_s(),
                        x.mean_ns / 1e3,
                        x.p50_ns / 1e3,
                        x.p99_ns / 1e3,
                        x.p999_ns / 1e3,
                        f(x.backend_us_per_io()),
                        f(x.client_us_per_io()),
                    );
                }
                Err(e) => {
                    let _ = writeln!(
                        o,
                        "{sec},{},{},{},{},,,,,,,,,\"{}\"",
                        r.section.label(&r.w),
                        variant_client(r.kind, r.w.pattern, r.w.qd),
                        r.round,
                        r.kind.target_name(),
                        one_line(e, 400).replace('"', "'")
                    );
                }
            }
        }
        o
    }

    /// Write results.md, the SVGs and results.csv into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let put = |name: &str, body: &str| {
            std::fs::write(dir.join(name), body)
                .map_err(|e| format!("writing {}: {e}", dir.join(name).display()))
        };
        put("results.md", &self.markdown(""))?;
        put("results.csv", &self.csv())?;
        match self.iops_svg() {
            Some(s) => put(IOPS_SVG, &s)?,
            None => {
                let _ = std::fs::remove_file(dir.join(IOPS_SVG));
            }
        }
        match self.cdf_svg() {
            Some(s) => put(CDF_SVG, &s)?,
            None => {
                let _ = std::fs::remove_file(dir.join(CDF_SVG));
            }
        }
        Ok(())
    }
}

impl Kind {
    fn has_cpu(&self) -> bool {
        crate::targets::has_backend(*self)
    }
}

/// The client column: the pattern, `fio defaults` for fio, and at QD1 the one client it is.
fn variant_client(k: Kind, p: Pattern, qd: u32) -> String {
    match k {
        Kind::Fio => "fio defaults".into(),
        _ if k.is_fio_lb() => "fio-libblkio defaults".into(),
        _ if qd == 1 => "per-request = round".into(),
        _ => p.name(),
    }
}

/// `native round`, `native per-request`, `fio`.
fn variant_name(k: Kind, p: Pattern, qd: u32) -> String {
    match k {
        Kind::Fio => "fio".into(),
        _ if k.is_fio_lb() => format!("fio-libblkio {}", k.target_name()),
        _ if qd == 1 => k.name().into(),
        _ => format!("{} {}", k.name(), p.name()),
    }
}

/// Seconds with up to three decimals, trailing zeros trimmed.
fn secs(d: std::time::Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn rounds(n: u32) -> String {
    if n == 1 {
        "1 round".into()
    } else {
        format!("{n} rounds")
    }
}

/// `0.89–0.93`: the range of per-round ratios.
fn spread_range(rs: &[f64]) -> String {
    let lo = rs
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::INFINITY, f64::min);
    let hi = rs
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if lo > hi {
        "—".into()
    } else {
        format!("{lo:.2}–{hi:.2}")
    }
}

/// ` (0.89–0.93)` after a median ratio.
fn spread_note(rs: &[f64]) -> String {
    format!(" ({})", spread_range(rs))
}

fn failed_note(n: usize) -> String {
    match n {
        0 => String::new(),
        1 => " · 1 run failed".into(),
        n => format!(" · {n} runs failed"),
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "✅"
    } else {
        "❌"
    }
}

fn one_line(s: &str, max: usize) -> String {
    let s: String = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "/");
    if s.chars().count() > max {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    } else {
        s
    }
}

fn scaling_base_label(w: &Workload, s: Section) -> String {
    let mut w = *w;
    match s {
        Section::QdScaling => {
            // "4k randread" without the QD.
            w.qd = 1;
            w.label().trim_end_matches(" QD1").to_string()
        }
        _ => {
            w.queues = 1;
            format!("{} per queue", w.label())
        }
    }
}

fn nice_ceil(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

/// A log range covering [lo, hi] with a little room, snapped to 1-2-5 values.
fn nice_log_range(lo: f64, hi: f64) -> (f64, f64) {
    let lo = lo.max(0.1);
    let hi = hi.max(lo * 2.0);
    let snap_down = |v: f64| {
        let p = 10f64.powf(v.log10().floor());
        [5.0, 2.0, 1.0]
            .into_iter()
            .map(|m| m * p)
            .find(|c| *c <= v)
            .unwrap_or(p)
    };
    let snap_up = |v: f64| {
        let p = 10f64.powf(v.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * p)
            .find(|c| *c >= v)
            .unwrap_or(10.0 * p)
    };
    (snap_down(lo), snap_up(hi))
}

fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let t = m * p;
            if t >= lo * 0.9999 && t <= hi * 1.0001 {
                out.push(t);
            }
        }
        p *= 10.0;
    }
    out
}

fn fmt_tick(us: f64) -> String {
    if us >= 1000.0 {
        format!("{}ms", us / 1000.0)
    } else {
        format!("{us}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Plot geometry: the SVG size and the margins around the plot area.
#[derive(Clone, Copy)]
struct Geom {
    w: f64,
    h: f64,
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
}

impl Geom {
    /// Plot-area x for a fraction 0..1.
    fn x(&self, f: f64) -> f64 {
        self.left + f * (self.w - self.left - self.right)
    }

    fn y(&self, f: f64) -> f64 {
        self.h - self.bottom - f * (self.h - self.top - self.bottom)
    }
}

/// A minimal SVG plot.
struct Canvas {
    out: String,
    g: Geom,
}

impl Canvas {
    fn new(title: &str) -> Canvas {
        let (w, h) = (760.0, 440.0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            w / 2.0,
            esc(title)
        );
        Canvas {
            out,
            g: Geom {
                w,
                h,
                left: 80.0,
                right: 150.0,
                top: 40.0,
                bottom: 55.0,
            },
        }
    }

    fn vline(&mut self, x: f64, label: &str) {
        let _ = writeln!(
            self.out,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#dddddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            self.g.top,
            self.g.h - self.g.bottom,
            self.g.h - self.g.bottom + 16.0,
            esc(label)
        );
    }

    fn hline(&mut self, y: f64, label: &str) {
        let _ = writeln!(
            self.out,
            r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            self.g.left,
            self.g.w - self.g.right,
            self.g.left - 6.0,
            y + 4.0,
            esc(label)
        );
    }

    fn axis_labels(&mut self, x: &str, y: &str) {
        let _ = writeln!(
            self.out,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#888888"/>"##,
            self.g.left,
            self.g.top,
            self.g.w - self.g.left - self.g.right,
            self.g.h - self.g.top - self.g.bottom
        );
        let _ = writeln!(
            self.out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            (self.g.left + self.g.w - self.g.right) / 2.0,
            self.g.h - 14.0,
            esc(x)
        );
        let cy = (self.g.top + self.g.h - self.g.bottom) / 2.0;
        let _ = writeln!(
            self.out,
            r#"<text x="18" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 18 {cy:.1})">{}</text>"#,
            esc(y)
        );
    }

    fn polyline(&mut self, pts: &[(f64, f64)], color: &str, markers: bool) {
        let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            self.out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            p.join(" ")
        );
        if markers {
            for (x, y) in pts {
                let _ = writeln!(
                    self.out,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{color}"/>"#
                );
            }
        }
    }

    fn legend(&mut self, kinds: &[Kind]) {
        let x = self.g.w - self.g.right + 15.0;
        for (i, k) in kinds.iter().enumerate() {
            let y = self.g.top + 10.0 + 20.0 * i as f64;
            let _ = writeln!(
                self.out,
                r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                x + 22.0,
                color(*k),
                x + 28.0,
                y + 4.0,
                k.name()
            );
        }
    }

    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// Splice `block` between the README's result markers.
pub fn update_readme(readme: &Path, block: &str) -> Result<(), String> {
    const BEGIN: &str = "<!-- blkbench:results:begin -->";
    const END: &str = "<!-- blkbench:results:end -->";
    let text = std::fs::read_to_string(readme)
        .map_err(|e| format!("reading {}: {e}", readme.display()))?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        return Err(format!("{} has no result markers", readme.display()));
    };
    if e < b {
        return Err(format!("{}: result markers out of order", readme.display()));
    }
    let new = format!(
        "{}{BEGIN}\n{}\n{}",
        &text[..b],
        block.trim_end(),
        &text[e..]
    );
    std::fs::write(readme, new).map_err(|e| format!("writing {}: {e}", readme.display()))
}

/// Self-check of the helpers for test mode.
pub fn self_check() -> Result<(), String> {
    if median(vec![3.0, 1.0, 2.0]) != Some(2.0) || median(vec![1.0, 2.0]) != Some(1.5) {
        return Err("median".into());
    }
    if nice_log_range(13.0, 480.0) != (10.0, 500.0) || log_ticks(10.0, 500.0).len() != 6 {
        return Err("log ticks".into());
    }
    // The ceiling rows come after the disk's tables and leave them as they were.
    let disk = synthetic_report(&synthetic_records(&[Section::Main])).0;
    if let Some(p) = std::env::var_os("BLKBENCH_DUMP") {
        let _ = std::fs::write(p, &disk);
    }
    let sections = [
        Section::Main,
        Section::Ceiling(Medium::Tmpfs),
        Section::Ceiling(Medium::Loop),
    ];
    let records = synthetic_records(&sections);
    let all = synthetic_report(&records).0;
    if let Some(p) = std::env::var_os("BLKBENCH_DUMP") {
        let _ = std::fs::write(
            std::path::PathBuf::from(p).with_extension("ceiling.md"),
            &all,
        );
    }
    // The plots and the commands come after the ceiling tables.
    let (head, rest) = disk.split_at(disk.find("![").unwrap_or(disk.len()));
    let tail = match all.strip_prefix(head).and_then(|t| t.strip_suffix(rest)) {
        Some(t) => t,
        None => return Err("the ceiling rows changed the disk's tables".into()),
    };
    for want in [
        "**Software ceiling**",
        "| 4k randread QD32 (tmpfs) | ",
        "| 4k randwrite QD32 (loop) | ",
        "| 4k randread QD1 (tmpfs) | per-request = round | ringfence | ",
        "| 4k randread QD32 | ",
    ] {
        if !tail.contains(want) {
            return Err(format!("the ceiling tables have no '{want}'"));
        }
    }
    if disk.contains("(tmpfs)") || tail.contains("128k seq read QD8") {
        return Err("ceiling rows in the wrong place".into());
    }
    let csv = synthetic_report(&records).1;
    if !csv.contains("\nceiling,4k randwrite QD32 (tmpfs),per-request,1,ringfence,")
        || !csv.contains("\nmain,4k randwrite QD32,per-request,1,ringfence,")
    {
        return Err("ceiling rows in the CSV".into());
    }
    if spread_range(&[0.93, 0.891, f64::NAN, 0.9]) != "0.89–0.93" || spread_range(&[]) != "—" {
        return Err("spread".into());
    }
    Ok(())
}

/// Records of a made-up run (deterministic figures) for the self-check of the report.
fn synthetic_records(sections: &[Section]) -> Vec<Record> {
    let mut out = Vec::new();
    let rows = [
        Workload::new(true, 100, 4096, 1),
        Workload::new(true, 100, 4096, 32),
        Workload::new(true, 0, 4096, 32),
        Workload::new(false, 100, 128 << 10, 8),
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for &section in sections {
        for round in 1..=3 {
            for base in rows {
                if section.medium().is_some() && !crate::ceiling::is_ceiling_row(&base) {
                    continue;
                }
                let pats: &[Pattern] = if base.qd == 1 {
                    &[Pattern::PER_REQUEST]
                } else {
                    &[Pattern::PER_REQUEST, Pattern::Round]
                };
                let mut runs: Vec<(Kind, Workload)> = Vec::new();
                for p in pats {
                    for k in [Kind::Native, Kind::Ringfence, Kind::Qsd] {
                        runs.push((k, base.with_pattern(*p)));
                    }
                }
                for k in [
                    Kind::Fio,
                    Kind::FioLbNative,
                    Kind::FioLbRingfence,
                    Kind::FioLbQsd,
                ] {
                    runs.push((k, base));
                }
                for (kind, w) in runs {
                    let lat_ns = 20_000 + next() % 400_000;
                    let mut h = Histogram::new();
                    for i in 0..200 {
                        h.record(lat_ns + i * 37);
                    }
                    let secs = 1.0 + (next() % 1000) as f64 / 1000.0;
                    let bytes = h.count() * w.bs;
                    let result = if next() % 29 == 0 {
                        Err("made-up failure".to_string())
                    } else {
                        let cpu = crate::targets::has_backend(kind).then_some(0.001 * secs);
                        Ok(RunResult::from_hist(h, bytes, secs, cpu, Some(0.002)))
                    };
                    out.push(Record {
                        section,
                        w,
                        round,
                        kind,
                        result,
                    });
                }
            }
        }
    }
    out
}

/// The Markdown and the CSV of a report of made-up records, for the self-check.
fn synthetic_report(records: &[Record]) -> (String, String) {
    let machine = Machine {
        date: "2026-12-08 00:00 UTC".into(),
        host: "selfcheck".into(),
        cpu: "cpu".into(),
        cpus: 2,
        mem_gib: 24.0,
        kernel: "6.18".into(),
        os: "os".into(),
        fs: "ext4".into(),
        commit: "0000000".into(),
    };
    let t = Timing {
        warmup: std::time::Duration::from_millis(300),
        duration: std::time::Duration::from_millis(1500),
    };
    let info = RunInfo {
        command: "cargo bench --bench blkbench".into(),
        rounds: 3,
        scale_rounds: 3,
        main: t,
        scale: t,
        image: "1 GiB temporary file, fully written".into(),
        versions: vec![("blkio crate".into(), "0.5".into())],
        unavailable: Vec::new(),
        targets: Kind::ALL.to_vec(),
        fio_example: None,
        fio_lb_example: None,
        ceiling: [Medium::Tmpfs, Medium::Loop]
            .into_iter()
            .filter(|m| records.iter().any(|r| r.section.medium() == Some(*m)))
            .map(|m| (m, m.describe().to_string()))
            .collect(),
        ceiling_notes: Vec::new(),
        interrupted: false,
    };
    let rep = Report {
        machine: &machine,
        info: &info,
        records,
    };
    (rep.markdown(""), rep.csv())
}
