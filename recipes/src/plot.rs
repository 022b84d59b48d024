//! `kiln plot`: the curves of one or more runs as a PNG, one panel per metric and one line
//! per run, drawn from the runs' TensorBoard event files (or `metrics.jsonl` where a run has
//! none) with `plotters`; the font is compiled in (`data/fonts`), so no system fonts or
//! Python are needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_trainer::report::tensorboard::read_scalars;
use kiln_trainer::report::{METRICS_FILE, read_metrics_jsonl};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{RecipeError, Result};

/// The panels drawn when no metric is named: per-step training loss, validation loss, and
/// validation accuracy where a run has it.
pub const DEFAULT_METRICS: [&str; 3] =
    ["loss/train_step", "loss/validation", "accuracy/validation"];

/// DejaVu Sans Mono (see data/fonts/LICENSE).
static FONT: &[u8] = include_bytes!("../../data/fonts/DejaVuSansMono.ttf");

/// One run's series of a metric: (step, value).
type Series = Vec<(f64, f64)>;

/// What was drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Plotted {
    /// The PNG written.
    pub out: PathBuf,
    /// The panels, in order.
    pub metrics: Vec<String>,
    /// Points drawn per run (all panels).
    pub points: Vec<(String, usize)>,
}

/// Draws `metrics` (or [`DEFAULT_METRICS`], those some run has) of `runs` into `out`.
///
/// # Errors
/// [`RecipeError::Plot`] naming the run or metric: a run with no curves, a named metric no
/// run has (with the ones they have), or a PNG that cannot be written.
pub fn plot_runs(runs: &[PathBuf], metrics: &[String], out: &Path) -> Result<Plotted> {
    let bad = |reason: String| RecipeError::Plot { reason };
    if runs.is_empty() {
        return Err(bad("name at least one run directory".into()));
    }
    let mut curves = Vec::new();
    for run in runs {
        let scalars = run_scalars(run)?;
        if scalars.is_empty() {
            return Err(bad(format!(
                "{} holds no curves (no TensorBoard event files, no {METRICS_FILE})",
                run.display()
            )));
        }
        curves.push((run_label(run), scalars));
    }
    let available: std::collections::BTreeSet<&String> =
        curves.iter().flat_map(|(_, s)| s.keys()).collect();
    let panels: Vec<String> = if metrics.is_empty() {
        DEFAULT_METRICS
            .iter()
            .map(|m| m.to_string())
            .filter(|m| available.contains(m))
            .collect()
    } else {
        metrics.to_vec()
    };
    if let Some(missing) = panels.iter().find(|m| !available.contains(m)) {
        let names: Vec<&str> = available.iter().map(|s| s.as_str()).collect();
        return Err(bad(format!(
            "no run has the metric {missing:?}; they have: {}",
            names.join(", ")
        )));
    }
    if panels.is_empty() {
        return Err(bad(
            "the runs have none of the default metrics: name one with --metric".into(),
        ));
    }
    draw(&curves, &panels, out).map_err(|e| bad(format!("cannot draw {}: {e}", out.display())))?;
    Ok(Plotted {
        out: out.to_path_buf(),
        points: curves
            .iter()
            .map(|(label, s)| {
                (
                    label.clone(),
                    panels.iter().filter_map(|m| s.get(m)).map(Vec::len).sum(),
                )
            })
            .collect(),
        metrics: panels,
    })
}

/// A run's name on the chart: its directory's name.
fn run_label(run: &Path) -> String {
    run.file_name().map_or_else(
        || run.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Every scalar series of a run, by tag: its event files, else its `metrics.jsonl`.
fn run_scalars(run: &Path) -> Result<BTreeMap<String, Series>> {
    if !run.is_dir() {
        return Err(RecipeError::Plot {
            reason: format!("{} is not a run directory", run.display()),
        });
    }
    let mut series: BTreeMap<String, Series> = BTreeMap::new();
    for scalar in read_scalars(run)? {
        series
            .entry(scalar.tag)
            .or_default()
            .push((scalar.step as f64, f64::from(scalar.value)));
    }
    if series.is_empty() {
        for m in read_metrics_jsonl(run) {
            let x = m.step as f64;
            series
                .entry("loss/train".into())
                .or_default()
                .push((x, m.train_loss));
            series
                .entry("loss/validation".into())
                .or_default()
                .push((x, m.test_loss));
            if let Some(a) = m.test_accuracy {
                series
                    .entry("accuracy/validation".into())
                    .or_default()
                    .push((x, a));
            }
        }
    }
    for points in series.values_mut() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(series)
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(
    curves: &[(String, BTreeMap<String, Series>)],
    panels: &[String],
    out: &Path,
) -> DrawResult {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if !*REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    }) {
        return Err("the compiled-in font does not load".into());
    }
    let width = 560 * panels.len().min(3) as u32;
    let rows = panels.len().div_ceil(3) as u32;
    let root = BitMapBackend::new(out, (width, 420 * rows)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows as usize, panels.len().min(3)));
    for (area, metric) in areas.iter().zip(panels) {
        draw_panel(area, curves, metric)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    curves: &[(String, BTreeMap<String, Series>)],
    metric: &str,
) -> DrawResult {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let points: Vec<(f64, f64)> = curves
        .iter()
        .filter_map(|(_, s)| s.get(metric))
        .flat_map(|s| s.iter().filter(finite).copied())
        .collect();
    let (x0, x1) = bounds(points.iter().map(|p| p.0));
    let (y0, y1) = bounds(points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(metric, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, (label, series)) in curves.iter().enumerate() {
        let Some(points) = series.get(metric) else {
            continue;
        };
        let color = PALETTE[i % PALETTE.len()];
        let line = points.iter().filter(finite).copied();
        let drawn = chart.draw_series(LineSeries::new(line, color.stroke_width(2)))?;
        drawn.label(label.as_str()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
        });
        // Epoch-level series have few points: mark them.
        if points.len() <= 50 {
            let marks = points
                .iter()
                .filter(finite)
                .map(|&p| Circle::new(p, 3, color.filled()));
            chart.draw_series(marks)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// A range holding every value, padded; (0, 1) when there are none.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(hi.abs().max(1e-6) * 1e-3);
    (lo - pad, hi + pad)
}

/// File name of the curves a training run draws at its end.
pub const CURVES_FILE: &str = "curves.png";

/// Draws a finished run's default curves into `run_dir/curves.png`. The run's results are
/// already safe, so a chart that cannot be drawn is a warning on stderr, not an error.
pub(crate) fn write_run_curves(run_dir: &Path, quiet: bool) -> Option<PathBuf> {
    match plot_runs(&[run_dir.to_path_buf()], &[], &run_dir.join(CURVES_FILE)) {
        Ok(plotted) => Some(plotted.out),
        Err(e) => {
            if !quiet {
                eprintln!("warning: no {CURVES_FILE}: {e}");
            }
            None
        }
    }
}
