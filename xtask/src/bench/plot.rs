//! `conn_rate.png`: connection rate versus Service count, one line per contender, with the
//! min–max range of the rounds as error bars.
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::{prelude::*, style::FontStyle};
use twill_lab::bench::harness::Metric;

const COLORS: [RGBColor; 5] = [BLACK, RED, MAGENTA, BLUE, GREEN];

/// A TrueType font for the labels, if the machine has one. plotters' `ab_glyph` backend needs
/// the bytes registered by hand (no fontconfig here); a machine without fonts gets a chart
/// without text and the legend lives in results.md.
fn find_font() -> Option<PathBuf> {
    let preferred = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    if let Some(p) = preferred.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(p);
    }
    let mut stack = vec![PathBuf::from("/usr/share/fonts")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "ttf") {
                return Some(p);
            }
        }
    }
    None
}

fn register_font() -> bool {
    let Some(path) = find_font() else {
        return false;
    };
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    // plotters keeps the font for the life of the process: it needs 'static bytes.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

/// (Services, median, min, max) of one contender, by Service count.
fn points(metric: &Metric, name: &str) -> Vec<(f64, f64, f64, f64)> {
    #[expect(clippy::cast_precision_loss, reason = "Service counts")]
    let mut points: Vec<(f64, f64, f64, f64)> = metric
        .series
        .iter()
        .filter(|s| s.contender == name)
        .filter_map(|s| {
            s.summary
                .map(|x| (s.services as f64, x.median, x.min, x.max))
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// Draws the chart into `path`. Returns whether it has text.
pub fn conn_rate(metric: &Metric, contenders: &[String], path: &Path) -> Result<bool> {
    let with_text = register_font();
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let ymax = metric
        .series
        .iter()
        .filter_map(|s| s.summary.map(|x| x.max))
        .fold(0.0_f64, f64::max)
        * 1.15;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
    let xs: Vec<usize> = metric.series.iter().map(|s| s.services).collect();
    #[expect(clippy::cast_precision_loss, reason = "Service counts")]
    let (xmin, xmax) = (
        xs.iter().copied().min().unwrap_or(10) as f64 / 2.0,
        xs.iter().copied().max().unwrap_or(10_000) as f64 * 2.0,
    );
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption(
                "Connections/s through a ClusterIP (connect, 1 B request/response, close)",
                ("sans-serif", 22),
            )
            .x_label_area_size(45)
            .y_label_area_size(80);
    } else {
        builder.x_label_area_size(10).y_label_area_size(10);
    }
    let mut chart = builder
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    if with_text {
        chart
            .configure_mesh()
            .x_desc("Services present")
            .y_desc("connections per second")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    } else {
        chart
            .configure_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    for (i, name) in contenders.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = points(metric, name);
        if points.is_empty() {
            continue;
        }
        let line = chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        if with_text {
            line.label(name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, color.filled(), 8)),
            )
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
            )
            .map_err(|e| anyhow!("{e}"))?;
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(with_text)
}
