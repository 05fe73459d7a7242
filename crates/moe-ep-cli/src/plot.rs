//! `--plot FILE.svg`: median latency against T for each collective and baseline, log scales.

use crate::report::{Report, TokensResult};
use plotters::prelude::*;
use std::path::Path;

/// One line of the plot: a name and its (T, median us) points.
struct Series {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Draws the report's medians against T: our dispatch and combine, each baseline's, and the
/// copy-engine ceiling, where they ran. Points at T = 0 are left out (log scale).
pub fn latency_svg(path: &Path, report: &Report) -> Result<(), String> {
    let series_of = |name, color, pick: &dyn Fn(&TokensResult) -> Option<f64>| Series {
        name,
        color,
        points: report
            .results
            .iter()
            .filter(|r| r.tokens > 0)
            .filter_map(|r| {
                pick(r)
                    .filter(|v| v.is_finite())
                    .map(|v| (r.tokens as f64, v.max(1e-3)))
            })
            .collect(),
    };
    let baseline = |name: &'static str, combine: bool| {
        move |r: &TokensResult| {
            r.baseline(name).map(|b| match combine {
                true => b.combine.median_us(),
                false => b.dispatch.median_us(),
            })
        }
    };
    let series: Vec<Series> = [
        series_of("dispatch", BLUE, &|r| Some(r.dispatch.median_us)),
        series_of("combine", RED, &|r| Some(r.combine.median_us)),
        series_of(
            "nccl dispatch",
            RGBColor(0, 150, 150),
            &baseline("nccl", false),
        ),
        series_of(
            "nccl combine",
            RGBColor(200, 120, 0),
            &baseline("nccl", true),
        ),
        series_of(
            "allgather dispatch",
            RGBColor(120, 60, 180),
            &baseline("allgather", false),
        ),
        series_of(
            "allgather combine",
            RGBColor(150, 100, 60),
            &baseline("allgather", true),
        ),
        series_of("copy-engine ceiling", RGBColor(90, 90, 90), &|r| {
            r.ceiling.as_ref().map(|c| c.dispatch.median_us())
        }),
    ]
    .into_iter()
    .filter(|s| !s.points.is_empty())
    .collect();
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
