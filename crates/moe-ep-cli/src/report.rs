//! The benchmark's figures: the printed table (comfy-table) and the `--json` file (serde_json).

use comfy_table::{presets, CellAlignment, Table};
use serde::Serialize;
use std::path::Path;

/// Everything `bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: ConfigReport,
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

/// The figures for one T (tokens per rank).
#[derive(Debug, Clone, Serialize)]
pub struct TokensResult {
    pub tokens: usize,
    pub dispatch: Stats,
    pub combine: Stats,
    /// Rows that left a rank for another rank in one dispatch, averaged over ranks (combine sends
    /// the same rows back).
    pub remote_rows_per_rank: f64,
    /// Those rows' payload bytes (x, plus scales) per dispatch, averaged over ranks.
    pub dispatch_bytes_per_rank: f64,
    /// The same rows in the combine dtype.
    pub combine_bytes_per_rank: f64,
    pub dispatch_gb_per_s: f64,
    pub combine_gb_per_s: f64,
    pub check_ok: bool,
    /// "ok", or the first mismatch against the oracle.
    pub check: String,
}

/// Bytes per second in GB/s (1e9), from bytes and microseconds.
pub fn gb_per_s(bytes: f64, us: f64) -> f64 {
    if us > 0.0 {
        bytes / us / 1e3
    } else {
        0.0
    }
}

/// The one-line header printed above the table.
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
    format!(
        "moe-ep bench: backend {}, world {}, H {}, E {}, K {}, dtype {dtype}, layout {layout}, routing {}; median of {} iterations after {} warmup",
        c.backend, c.world, c.hidden, c.num_experts, c.topk, c.routing, c.iters, c.warmup
    )
}

const CHECK_WIDTH: usize = 60;

/// The results table.
pub fn table(r: &Report) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::ASCII_MARKDOWN);
    table.set_header(vec![
        "T",
        "dispatch us",
        "combine us",
        "bytes moved (MB)",
        "dispatch GB/s",
        "combine GB/s",
        "check",
    ]);
    for t in &r.results {
        let mut check = t.check.clone();
        if check.chars().count() > CHECK_WIDTH {
            check = check.chars().take(CHECK_WIDTH - 3).collect::<String>() + "...";
        }
        table.add_row(vec![
            t.tokens.to_string(),
            format!("{:.1}", t.dispatch.median_us),
            format!("{:.1}", t.combine.median_us),
            format!("{:.3}", t.dispatch_bytes_per_rank / 1e6),
            format!("{:.2}", t.dispatch_gb_per_s),
            format!("{:.2}", t.combine_gb_per_s),
            check,
        ]);
    }
    for i in 0..6 {
        if let Some(col) = table.column_mut(i) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
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
    fn bandwidth() {
        assert_eq!(gb_per_s(2e9, 1e6), 2.0);
        assert_eq!(gb_per_s(1.0, 0.0), 0.0);
    }
}
