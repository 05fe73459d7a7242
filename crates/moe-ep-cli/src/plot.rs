//! `--plot FILE.svg`: median latency against T for each collective, log scales.

use crate::report::Report;
use plotters::prelude::*;
use std::path::Path;

/// One line of the plot: a name and its (T, median us) points.
struct Series {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Draws the report's medians against T. Points at T = 0 are left out (log scale).
pub fn latency_svg(path: &Path, report: &Report) -> Result<(), String> {
    let series_of = |name, color, pick: fn(&crate::report::TokensResult) -> f64| Series {
        name,
        color,
        points: report
            .results
            .iter()
            .filter(|r| r.tokens > 0)
            .map(|r| (r.tokens as f64, pick(r).max(1e-3)))
            .collect(),
    };
    let series = [
        series_of("dispatch", BLUE, |r| r.dispatch.median_us),
        series_of("combine", RED, |r| r.combine.median_us),
    ];
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        (x_lo, x_hi, y_lo, y_hi) = (x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y));
    }
    if x_lo > x_hi {
        return Err(format!("--plot {}: no T > 0 to plot", path.display()));
    }
    let err = |e: String| format!("--plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let c = &report.config;
    let title = format!(
        "moe-ep {}: world {}, H {}, top-{} of {}, {}, {}",
        c.backend, c.world, c.hidden, c.topk, c.num_experts, c.dtype, c.layout
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (x_lo / 1.5..x_hi * 1.5).log_scale(),
            (y_lo / 1.5..y_hi * 1.5).log_scale(),
        )
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("tokens per rank (T)")
        .y_desc("median time per call (us)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for s in &series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}
