//! The benchmark's figures: the printed tables (comfy-table) and the `--json` file (serde_json).
//!
//! Conventions. Each sample of a collective is the slowest rank's time for one iteration (the
//! collective ends when its last rank does); tables show medians. "Remote" bytes are the bytes
//! that leave a GPU under the wire rule (one row per (token, destination rank other than its
//! own)); "logical" bytes are the rows a rank receives including its own tokens (DeepEP's
//! convention). Both count the bytes the contract needs moved, whatever a path actually sends, so
//! every path's GB/s is comparable (what the baselines really send is in the JSON as `wire_*`).
//! A ratio to a baseline is its time over ours (above 1: we are faster); % of ceiling is the
//! copy-engine all-to-all's time over ours.

use comfy_table::{presets, CellAlignment, Table};
use serde::Serialize;
use std::path::Path;

/// Everything `bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: ConfigReport,
    pub baselines: BaselinesReport,
    pub results: Vec<TokensResult>,
}

/// The run's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub backend: String,
    pub world: usize,
    pub hidden: usize,
    pub num_experts: usize,
    pub topk: usize,
    pub dtype: String,
    pub combine_dtype: String,
    pub layout: String,
    /// Expert-major only.
    pub align: Option<usize>,
    pub scale_columns: usize,
    pub placement: String,
    pub max_tokens_per_rank: usize,
    pub tokens: Vec<usize>,
    /// uniform, zipf (exponent s), or trace.
    pub routing: String,
    pub warmup: usize,
    pub iters: usize,
    pub seed: u64,
    /// `--num-sms`, when given.
    pub num_sms: Option<u32>,
    /// How calls are timed: CUDA events on the call's stream, or the host clock (cpu backend).
    pub timing: String,
}

/// Which baselines ran, and why the others did not.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BaselinesReport {
    /// What `--baselines` asked for.
    pub requested: Vec<String>,
    /// The NCCL version of the NCCL paths, when they ran.
    pub nccl_version: Option<String>,
    /// (baseline, reason) for each requested baseline that did not run (for every T or some).
    pub skipped: Vec<(String, String)>,
}

/// Timings of one collective over the timed iterations; each sample is the slowest rank's time.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub samples_us: Vec<f64>,
}

impl Stats {
    pub fn from_samples(samples_us: Vec<f64>) -> Stats {
        let mut sorted = samples_us.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median_us = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Stats {
            median_us,
            min_us: sorted.first().copied().unwrap_or(f64::NAN),
            max_us: sorted.last().copied().unwrap_or(f64::NAN),
            samples_us,
        }
    }
}

/// One operation's figures: its timings and its bandwidth by both conventions.
#[derive(Debug, Clone, Serialize)]
pub struct OpResult {
    pub stats: Stats,
    pub remote_gb_per_s: f64,
    pub logical_gb_per_s: f64,
}

impl OpResult {
    pub fn new(stats: Stats, remote_bytes: f64, logical_bytes: f64) -> OpResult {
        OpResult {
            remote_gb_per_s: gb_per_s(remote_bytes, stats.median_us),
            logical_gb_per_s: gb_per_s(logical_bytes, stats.median_us),
            stats,
        }
    }

    pub fn median_us(&self) -> f64 {
        self.stats.median_us
    }
}

/// A baseline path's figures for one T.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineResult {
    /// `nccl` or `allgather`.
    pub name: String,
    pub dispatch: OpResult,
    pub combine: OpResult,
    pub end_to_end: OpResult,
    /// Bytes the path really sends to other GPUs per rank (averaged), dispatch and combine.
    pub wire_dispatch_bytes_per_rank: f64,
    pub wire_combine_bytes_per_rank: f64,
    /// Its median over ours: above 1, we are faster.
    pub dispatch_ratio: f64,
    pub combine_ratio: f64,
    pub end_to_end_ratio: f64,
    pub check_ok: bool,
    /// "ok", or the first difference from what the path must produce.
    pub check: String,
}

/// The copy-engine all-to-all of the bytes dispatch (and combine) must move, for one T.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingResult {
    /// Dispatch's remote bytes, every rank to every peer at once.
    pub dispatch: OpResult,
    /// Combine's remote bytes (the reverse direction, combine dtype).
    pub combine: OpResult,
    /// Ceiling time over ours, in percent: how close we get.
    pub dispatch_percent: f64,
    pub cached_dispatch_percent: f64,
    pub combine_percent: f64,
}

/// How long each of our calls took to return on the host: the queuing of its work (device
/// allocations, launches). A call whose device work is shorter than this is bound by the host.
/// Each sample is the slowest rank's.
#[derive(Debug, Clone, Serialize)]
pub struct HostQueuing {
    pub dispatch: Stats,
    pub cached_dispatch: Stats,
    pub combine: Stats,
}

/// The figures for one T (tokens per rank).
#[derive(Debug, Clone, Serialize)]
pub struct TokensResult {
    pub tokens: usize,
    pub dispatch: Stats,
    pub cached_dispatch: Stats,
    pub combine: Stats,
    /// Dispatch then combine back to back, one timer around both.
    pub end_to_end: Stats,
    /// How long our calls took to return on the host.
    pub host_queuing: HostQueuing,
    /// Rows that left a rank for another rank in one dispatch, averaged over ranks (combine sends
    /// the same rows back).
    pub remote_rows_per_rank: f64,
    /// Rows a rank receives in one dispatch, its own tokens included, averaged over ranks.
    pub received_rows_per_rank: f64,
    /// The remote rows' payload bytes (x, plus scales) per dispatch, averaged over ranks.
    pub dispatch_bytes_per_rank: f64,
    /// The same rows in the combine dtype.
    pub combine_bytes_per_rank: f64,
    /// The received rows' bytes (own tokens included): dispatch, combine.
    pub dispatch_logical_bytes_per_rank: f64,
    pub combine_logical_bytes_per_rank: f64,
    /// Remote GB/s.
    pub dispatch_gb_per_s: f64,
    pub cached_dispatch_gb_per_s: f64,
    pub combine_gb_per_s: f64,
    pub end_to_end_gb_per_s: f64,
    /// Logical GB/s.
    pub dispatch_logical_gb_per_s: f64,
    pub cached_dispatch_logical_gb_per_s: f64,
    pub combine_logical_gb_per_s: f64,
    pub end_to_end_logical_gb_per_s: f64,
    /// The baselines that ran for this T.
    pub baselines: Vec<BaselineResult>,
    pub ceiling: Option<CeilingResult>,
    pub check_ok: bool,
    /// "ok", or the first mismatch against the oracle.
    pub check: String,
}

impl TokensResult {
    pub fn baseline(&self, name: &str) -> Option<&BaselineResult> {
        self.baselines.iter().find(|b| b.name == name)
    }
}

/// Bytes per second in GB/s (1e9), from bytes and microseconds.
pub fn gb_per_s(bytes: f64, us: f64) -> f64 {
    if us > 0.0 {
        bytes / us / 1e3
    } else {
        0.0
    }
}

/// `theirs / ours`: how many times faster we are (NaN when either is missing).
pub fn ratio(theirs_us: f64, ours_us: f64) -> f64 {
    if ours_us > 0.0 && theirs_us.is_finite() {
        theirs_us / ours_us
    } else {
        f64::NAN
    }
}

/// The one-line header printed above the tables.
pub fn header(c: &ConfigReport) -> String {
    let layout = match c.align {
        Some(a) => format!("{} (align {a})", c.layout),
        None => c.layout.clone(),
    };
    let dtype = if c.combine_dtype == c.dtype {
        c.dtype.clone()
    } else {
        format!("{} (combine {})", c.dtype, c.combine_dtype)
    };
    let sms = c.num_sms.map(|n| format!(", {n} SMs")).unwrap_or_default();
    format!(
        "moe-ep bench: backend {}, world {}, H {}, E {}, K {}, dtype {dtype}, layout {layout}, routing {}{sms}; median of {} iterations after {} warmup, timed with {}",
        c.backend, c.world, c.hidden, c.num_experts, c.topk, c.routing, c.iters, c.warmup, c.timing
    )
}

/// What ran next to the dispatcher, and why the rest did not: one line each.
pub fn baselines_lines(b: &BaselinesReport) -> Vec<String> {
    if b.requested.is_empty() {
        return vec!["baselines: none (--baselines none)".into()];
    }
    let ran: Vec<String> = b
        .requested
        .iter()
        .filter(|name| !b.skipped.iter().any(|(s, _)| s == *name))
        .map(|name| match (name.as_str(), &b.nccl_version) {
            ("nccl", Some(v)) => format!("nccl (NCCL {v} all-to-all)"),
            ("allgather", Some(v)) => format!("allgather (NCCL {v} all-gather, reduce-scatter)"),
            ("ceiling", _) => "ceiling (copy-engine all-to-all)".into(),
            (other, _) => other.to_string(),
        })
        .collect();
    let mut lines = Vec::new();
    if !ran.is_empty() {
        lines.push(format!("baselines: {}", ran.join(", ")));
    }
    // One line per reason, naming every baseline it stopped.
    let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
    for (name, why) in &b.skipped {
        match reasons.iter_mut().find(|(w, _)| w == why) {
            Some((_, names)) => names.push(name),
            None => reasons.push((why, vec![name])),
        }
    }
    for (why, names) in reasons {
        let noun = if names.len() == 1 {
            "baseline"
        } else {
            "baselines"
        };
        lines.push(format!("{noun} {} skipped: {why}", names.join(", ")));
    }
    lines
}

const CHECK_WIDTH: usize = 60;

fn us(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.1}"),
        _ => "-".into(),
    }
}

fn gbs(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}"),
        _ => "-".into(),
    }
}

fn times(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}x"),
        _ => "-".into(),
    }
}

fn percent(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.0}%"),
        _ => "-".into(),
    }
}

fn new_table(header: Vec<&str>) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::ASCII_MARKDOWN);
    let n = header.len();
    table.set_header(header);
    for i in 0..n {
        if let Some(col) = table.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

fn short(check: &str) -> String {
    if check.chars().count() > CHECK_WIDTH {
        check.chars().take(CHECK_WIDTH - 3).collect::<String>() + "..."
    } else {
        check.to_string()
    }
}

/// All checks of one T in one cell: ours, then each baseline's failure.
fn check_cell(t: &TokensResult) -> String {
    let mut parts = vec![t.check.clone()];
    for b in t.baselines.iter().filter(|b| !b.check_ok) {
        parts.push(format!("{}: {}", b.name, b.check));
    }
    short(&parts.join("; "))
}

/// Latency: the median time of every operation, ours and the baselines'.
pub fn latency_table(r: &Report) -> Table {
    let mut table = new_table(vec![
        "T",
        "dispatch",
        "cached",
        "combine",
        "end-to-end",
        "nccl dispatch",
        "nccl combine",
        "nccl e2e",
        "allgather dispatch",
        "allgather combine",
        "allgather e2e",
        "ceiling",
        "check",
    ]);
    for t in &r.results {
        let b = |name: &str, pick: fn(&BaselineResult) -> f64| us(t.baseline(name).map(pick));
        table.add_row(vec![
            t.tokens.to_string(),
            us(Some(t.dispatch.median_us)),
            us(Some(t.cached_dispatch.median_us)),
            us(Some(t.combine.median_us)),
            us(Some(t.end_to_end.median_us)),
            b("nccl", |b| b.dispatch.median_us()),
            b("nccl", |b| b.combine.median_us()),
            b("nccl", |b| b.end_to_end.median_us()),
            b("allgather", |b| b.dispatch.median_us()),
            b("allgather", |b| b.combine.median_us()),
            b("allgather", |b| b.end_to_end.median_us()),
            us(t.ceiling.as_ref().map(|c| c.dispatch.median_us())),
            check_cell(t),
        ]);
    }
    if let Some(col) = table.column_mut(12) {
        col.set_cell_alignment(CellAlignment::Left);
    }
    table
}

/// How long our calls took to return on the host, beside their times on the device.
pub fn host_table(r: &Report) -> Table {
    let mut table = new_table(vec![
        "T",
        "dispatch host",
        "cached host",
        "combine host",
        "dispatch",
        "cached",
        "combine",
    ]);
    for t in &r.results {
        let h = &t.host_queuing;
        table.add_row(vec![
            t.tokens.to_string(),
            us(Some(h.dispatch.median_us)),
            us(Some(h.cached_dispatch.median_us)),
            us(Some(h.combine.median_us)),
            us(Some(t.dispatch.median_us)),
            us(Some(t.cached_dispatch.median_us)),
            us(Some(t.combine.median_us)),
        ]);
    }
    table
}

/// Bandwidth (remote and logical GB/s) and the share of the copy-engine ceiling.
pub fn bandwidth_table(r: &Report) -> Table {
    let mut table = new_table(vec![
        "T",
        "remote MB",
        "dispatch remote",
        "dispatch logical",
        "cached remote",
        "combine remote",
        "combine logical",
        "e2e remote",
        "ceiling remote",
        "dispatch % ceil",
        "cached % ceil",
        "combine % ceil",
    ]);
    for t in &r.results {
        let c = t.ceiling.as_ref();
        table.add_row(vec![
            t.tokens.to_string(),
            format!("{:.3}", t.dispatch_bytes_per_rank / 1e6),
            gbs(Some(t.dispatch_gb_per_s)),
            gbs(Some(t.dispatch_logical_gb_per_s)),
            gbs(Some(t.cached_dispatch_gb_per_s)),
            gbs(Some(t.combine_gb_per_s)),
            gbs(Some(t.combine_logical_gb_per_s)),
            gbs(Some(t.end_to_end_gb_per_s)),
            gbs(c.map(|c| c.dispatch.remote_gb_per_s)),
            percent(c.map(|c| c.dispatch_percent)),
            percent(c.map(|c| c.cached_dispatch_percent)),
            percent(c.map(|c| c.combine_percent)),
        ]);
    }
    table
}

/// Ours against each baseline: their time over ours, and their bandwidth.
pub fn ratio_table(r: &Report) -> Table {
    let mut table = new_table(vec![
        "T",
        "vs nccl dispatch",
        "vs nccl combine",
        "vs nccl e2e",
        "nccl dispatch GB/s",
        "vs allgather dispatch",
        "vs allgather combine",
        "vs allgather e2e",
        "allgather dispatch GB/s",
    ]);
    for t in &r.results {
        let b = |name: &str, pick: fn(&BaselineResult) -> f64| t.baseline(name).map(pick);
        table.add_row(vec![
            t.tokens.to_string(),
            times(b("nccl", |b| b.dispatch_ratio)),
            times(b("nccl", |b| b.combine_ratio)),
            times(b("nccl", |b| b.end_to_end_ratio)),
            gbs(b("nccl", |b| b.dispatch.remote_gb_per_s)),
            times(b("allgather", |b| b.dispatch_ratio)),
            times(b("allgather", |b| b.combine_ratio)),
            times(b("allgather", |b| b.end_to_end_ratio)),
            gbs(b("allgather", |b| b.dispatch.remote_gb_per_s)),
        ]);
    }
    table
}

/// The short table printed last.
pub fn summary_table(r: &Report) -> Table {
    let mut table = new_table(vec![
        "T",
        "dispatch us",
        "combine us",
        "e2e us",
        "x nccl e2e",
        "x allgather e2e",
        "% ceiling",
        "check",
    ]);
    for t in &r.results {
        let ok = t.check_ok && t.baselines.iter().all(|b| b.check_ok);
        table.add_row(vec![
            t.tokens.to_string(),
            us(Some(t.dispatch.median_us)),
            us(Some(t.combine.median_us)),
            us(Some(t.end_to_end.median_us)),
            times(t.baseline("nccl").map(|b| b.end_to_end_ratio)),
            times(t.baseline("allgather").map(|b| b.end_to_end_ratio)),
            percent(t.ceiling.as_ref().map(|c| c.dispatch_percent)),
            if ok { "ok" } else { "FAILED" }.into(),
        ]);
    }
    table
}

/// Everything printed, in order: header, baselines, then latency, bandwidth, ratios, summary.
pub fn print(r: &Report) {
    println!("{}", header(&r.config));
    for line in baselines_lines(&r.baselines) {
        println!("{line}");
    }
    println!();
    println!("Latency (median us per call; each sample is the slowest rank's)");
    println!("{}", latency_table(r));
    println!();
    println!("Bandwidth (GB/s at the median; remote: bytes that left the GPU; logical: rows received, own included)");
    println!("{}", bandwidth_table(r));
    println!();
    println!("Against the baselines (their median over ours: above 1x we are faster)");
    println!("{}", ratio_table(r));
    println!();
    println!("Host queuing (median us until each call returned, beside its time on the device)");
    println!("{}", host_table(r));
    println!();
    println!("Summary");
    println!("{}", summary_table(r));
}

pub fn write_json(path: &Path, r: &Report) -> Result<(), String> {
    let text = serde_json::to_string_pretty(r).map_err(|e| format!("--json: {e}"))?;
    std::fs::write(path, text + "\n").map_err(|e| format!("--json {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = Stats::from_samples(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median_us, s.min_us, s.max_us), (2.0, 1.0, 3.0));
        assert_eq!(s.samples_us, vec![3.0, 1.0, 2.0]);
        assert_eq!(Stats::from_samples(vec![4.0, 1.0, 2.0, 3.0]).median_us, 2.5);
    }

    #[test]
    fn bandwidth_and_ratios() {
        assert_eq!(gb_per_s(2e9, 1e6), 2.0);
        assert_eq!(gb_per_s(1.0, 0.0), 0.0);
        assert_eq!(ratio(300.0, 100.0), 3.0);
        assert!(ratio(300.0, 0.0).is_nan());
        assert_eq!(times(Some(2.5)), "2.50x");
        assert_eq!(times(None), "-");
        assert_eq!(percent(Some(41.6)), "42%");
        assert_eq!(us(Some(f64::NAN)), "-");
    }

    #[test]
    fn skipped_baselines_say_why() {
        let b = BaselinesReport {
            requested: vec!["nccl".into(), "allgather".into(), "ceiling".into()],
            nccl_version: None,
            skipped: vec![
                ("nccl".into(), "no GPUs".into()),
                ("allgather".into(), "no GPUs".into()),
            ],
        };
        assert_eq!(
            baselines_lines(&b),
            vec![
                "baselines: ceiling (copy-engine all-to-all)".to_string(),
                "baselines nccl, allgather skipped: no GPUs".to_string()
            ]
        );
        let one = BaselinesReport {
            requested: vec!["ceiling".into()],
            nccl_version: None,
            skipped: vec![("ceiling".into(), "T=3: no memory".into())],
        };
        assert_eq!(
            baselines_lines(&one),
            vec!["baseline ceiling skipped: T=3: no memory".to_string()]
        );
        assert_eq!(
            baselines_lines(&BaselinesReport::default()),
            vec!["baselines: none (--baselines none)".to_string()]
        );
    }
}
