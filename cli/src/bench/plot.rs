//! `rio bench --report FILE.html|FILE.svg`: the run drawn as real plots (plotters, SVG).
//!
//! Six plots: latency histogram and CDF (from the merged hdrhistogram), IOPS and p99 over
//! time, the queue depth in force over time (the tuner's choices show here), and an
//! LBA-by-time heat map of where the I/Os went. An `.svg` file stacks them in one image; an
//! `.html` file holds each as inline SVG under a summary table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::report::{BenchResult, human_bytes, human_count};
use super::series::{HEAT_BUCKETS, Point};

/// Plot titles, in order (tests look for them).
pub const TITLES: [&str; 6] = [
    "Latency histogram",
    "Latency CDF",
    "IOPS over time",
    "p99 latency over time",
    "Queue depth over time",
    "LBA heat map",
];

const W: u32 = 900;
const H: u32 = 380;
/// Most heat-map columns; longer runs merge neighbouring windows.
const MAX_HEAT_COLS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("--report {}: expected a file name ending in .html or .svg", .0.display())]
    Extension(PathBuf),
    #[error("drawing the {plot} plot: {reason}")]
    Draw { plot: &'static str, reason: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Format of a report file, from its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Html,
    Svg,
}

impl ReportFormat {
    pub fn from_path(p: &Path) -> Result<ReportFormat, PlotError> {
        match p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("html") | Some("htm") => Ok(ReportFormat::Html),
            Some("svg") => Ok(ReportFormat::Svg),
            _ => Err(PlotError::Extension(p.to_path_buf())),
        }
    }
}

/// Writes the report for `r` to `path` (format from the extension).
pub fn write_report(r: &BenchResult, path: &Path) -> Result<(), PlotError> {
    let fmt = ReportFormat::from_path(path)?;
    let text = render(r, fmt)?;
    std::fs::write(path, text).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The report as text.
pub fn render(r: &BenchResult, fmt: ReportFormat) -> Result<String, PlotError> {
    let plots = plots(r)?;
    Ok(match fmt {
        ReportFormat::Svg => {
            let mut s = format!(
                "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\">\n",
                H as usize * plots.len(),
                H as usize * plots.len()
            );
            for (i, (_, svg)) in plots.iter().enumerate() {
                // Nested <svg> elements placed one under the other.
                let body = strip_xml_decl(svg);
                s.push_str(&body.replacen("<svg ", &format!("<svg y=\"{}\" ", i as u32 * H), 1));
                s.push('\n');
            }
            s.push_str("</svg>\n");
            s
        }
        ReportFormat::Html => {
            let mut s = String::from(
                "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>rio bench report</title>\n<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{text-align:left}</style></head><body>\n<h1>rio bench report</h1>\n",
            );
            s.push_str(&summary_table(r));
            for (title, svg) in &plots {
                s.push_str(&format!(
                    "<h2>{}</h2>\n<div class=\"plot\">{}</div>\n",
                    esc(title),
                    strip_xml_decl(svg)
                ));
            }
            s.push_str("</body></html>\n");
            s
        }
    })
}

fn strip_xml_decl(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn summary_table(r: &BenchResult) -> String {
    let o = &r.options;
    let j = r.job();
    let mut rows = vec![
        ("target".to_string(), esc(&r.target.path)),
        ("backend".into(), esc(r.backend.backend.name())),
        (
            "workload".into(),
            format!(
                "rw={} bs={} iodepth={} numjobs={}",
                o.rw.name(),
                human_bytes(o.bs as u64),
                o.iodepth,
                o.numjobs
            ),
        ),
    ];
    for (name, d) in [("read", &j.read), ("write", &j.write)] {
        if d.total_ios == 0 {
            continue;
        }
        rows.push((
            format!("{name} IOPS / bandwidth"),
            format!("{} / {}/s", human_count(d.iops), human_bytes(d.bw_bytes)),
        ));
        rows.push((
            format!("{name} latency p50 / p99 / p99.9 (µs)"),
            format!(
                "{:.1} / {:.1} / {:.1}",
                d.pct(50.0) as f64 / 1e3,
                d.pct(99.0) as f64 / 1e3,
                d.pct(99.9) as f64 / 1e3
            ),
        ));
    }
    rows.push((
        "CPU per million I/Os".into(),
        format!("{:.2} s", j.cpu_s_per_mio),
    ));
    let mut s = String::from("<table class=\"summary\">\n");
    for (k, v) in rows {
        s.push_str(&format!("<tr><th>{k}</th><td>{v}</td></tr>\n"));
    }
    s.push_str("</table>\n");
    s
}

fn draw_err<E: std::fmt::Debug>(plot: &'static str) -> impl Fn(E) -> PlotError {
    move |e| PlotError::Draw {
        plot,
        reason: format!("{e:?}"),
    }
}

/// Each plot as a standalone SVG document, with its title.
pub fn plots(r: &BenchResult) -> Result<Vec<(&'static str, String)>, PlotError> {
    Ok(vec![
        (TITLES[0], latency_histogram(r)?),
        (TITLES[1], latency_cdf(r)?),
        (
            TITLES[2],
            over_time(r, TITLES[2], "IOPS", |p| p.iops, true)?,
        ),
        (
            TITLES[3],
            over_time(r, TITLES[3], "p99 (µs)", |p| p.p99_us, false)?,
        ),
        (TITLES[4], depth_over_time(r)?),
        (TITLES[5], heat_map(r)?),
    ])
}

/// (lo, hi) with hi > lo.
fn span(lo: f64, hi: f64) -> (f64, f64) {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        let lo = if lo.is_finite() && lo > 0.0 { lo } else { 1.0 };
        (lo, lo * 2.0 + 1.0)
    } else {
        (lo, hi)
    }
}

fn latency_histogram(r: &BenchResult) -> Result<String, PlotError> {
    let t = TITLES[0];
    let h = &r.latency;
    // 20 log-spaced bins per decade between the smallest and largest latency (µs).
    let (lo, hi) = if h.is_empty() {
        (1.0, 10.0)
    } else {
        span(h.min().max(1) as f64 / 1e3, h.max() as f64 / 1e3 * 1.05)
    };
    let per_decade = 20.0;
    let nbins = (((hi / lo).log10() * per_decade).ceil() as usize).clamp(1, 400);
    let step = (hi / lo).powf(1.0 / nbins as f64);
    let mut bins = vec![0u64; nbins];
    if !h.is_empty() {
        for v in h.iter_recorded() {
            let us = v.value_iterated_to() as f64 / 1e3;
            let i = ((us / lo).ln() / step.ln()).floor().max(0.0) as usize;
            bins[i.min(nbins - 1)] += v.count_at_value();
        }
    }
    let ymax = bins.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(t))?;
        let mut c = ChartBuilder::on(&root)
            .caption(t, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..ymax)
            .map_err(draw_err(t))?;
        c.configure_mesh()
            .x_desc("latency (µs)")
            .y_desc("I/Os")
            .draw()
            .map_err(draw_err(t))?;
        c.draw_series(bins.iter().enumerate().filter(|b| *b.1 > 0).map(|(i, &n)| {
            let a = lo * step.powi(i as i32);
            Rectangle::new([(a, 0.0), (a * step, n as f64)], BLUE.mix(0.7).filled())
        }))
        .map_err(draw_err(t))?;
        root.present().map_err(draw_err(t))?;
    }
    Ok(s)
}

fn latency_cdf(r: &BenchResult) -> Result<String, PlotError> {
    let t = TITLES[1];
    let h = &r.latency;
    let pts: Vec<(f64, f64)> = if h.is_empty() {
        Vec::new()
    } else {
        h.iter_quantiles(4)
            .map(|v| {
                (
                    (v.value_iterated_to().max(1)) as f64 / 1e3,
                    v.quantile_iterated_to() * 100.0,
                )
            })
            .collect()
    };
    let (lo, hi) = span(
        pts.first().map(|p| p.0).unwrap_or(1.0),
        pts.last().map(|p| p.0 * 1.05).unwrap_or(10.0),
    );
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(t))?;
        let mut c = ChartBuilder::on(&root)
            .caption(t, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)
            .map_err(draw_err(t))?;
        c.configure_mesh()
            .x_desc("latency (µs)")
            .y_desc("percent of I/Os at or below")
            .draw()
            .map_err(draw_err(t))?;
        c.draw_series(LineSeries::new(pts, RED.stroke_width(2)))
            .map_err(draw_err(t))?;
        root.present().map_err(draw_err(t))?;
    }
    Ok(s)
}

/// Windows grouped by end time (rounded to 10 ms) across jobs.
fn by_time(series: &[Point]) -> BTreeMap<i64, Vec<&Point>> {
    let mut m: BTreeMap<i64, Vec<&Point>> = BTreeMap::new();
    for p in series {
        m.entry((p.t * 10.0).round() as i64).or_default().push(p);
    }
    m
}

fn over_time(
    r: &BenchResult,
    t: &'static str,
    ydesc: &str,
    f: fn(&Point) -> f64,
    sum: bool,
) -> Result<String, PlotError> {
    let pts: Vec<(f64, f64)> = by_time(&r.series)
        .into_iter()
        .map(|(k, ps)| {
            let v = if sum {
                ps.iter().map(|p| f(p)).sum()
            } else {
                ps.iter().map(|p| f(p)).fold(0.0, f64::max)
            };
            (k as f64 / 10.0, v)
        })
        .collect();
    let tmax = pts.last().map(|p| p.0).unwrap_or(1.0).max(0.1);
    let ymax = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.1;
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(t))?;
        let mut c = ChartBuilder::on(&root)
            .caption(t, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(draw_err(t))?;
        c.configure_mesh()
            .x_desc("time (s)")
            .y_desc(ydesc)
            .draw()
            .map_err(draw_err(t))?;
        c.draw_series(LineSeries::new(pts, BLUE.stroke_width(2)))
            .map_err(draw_err(t))?;
        root.present().map_err(draw_err(t))?;
    }
    Ok(s)
}

fn depth_over_time(r: &BenchResult) -> Result<String, PlotError> {
    let t = TITLES[4];
    let mut jobs: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    for p in &r.series {
        jobs.entry(p.job).or_default().push((p.t, p.iodepth as f64));
    }
    let tmax = r.series.iter().map(|p| p.t).fold(0.1, f64::max);
    let ymax = r
        .series
        .iter()
        .map(|p| p.iodepth as f64)
        .fold(1.0, f64::max)
        * 1.2;
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(t))?;
        let mut c = ChartBuilder::on(&root)
            .caption(t, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..tmax, 0f64..ymax)
            .map_err(draw_err(t))?;
        c.configure_mesh()
            .x_desc("time (s)")
            .y_desc("queue depth")
            .draw()
            .map_err(draw_err(t))?;
        for (i, (job, pts)) in jobs.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(draw_err(t))?
                .label(format!("job {job}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err(t))?;
        root.present().map_err(draw_err(t))?;
    }
    Ok(s)
}

/// Heat-map cells: columns of summed heat rows (at most `MAX_HEAT_COLS`) and the time each
/// column ends at.
pub fn heat_columns(series: &[Point]) -> Vec<(f64, [u64; HEAT_BUCKETS])> {
    let cols: Vec<(f64, [u64; HEAT_BUCKETS])> = by_time(series)
        .into_iter()
        .map(|(k, ps)| {
            let mut row = [0u64; HEAT_BUCKETS];
            for p in ps {
                for (i, &v) in p.heat.iter().take(HEAT_BUCKETS).enumerate() {
                    row[i] += v as u64;
                }
            }
            (k as f64 / 10.0, row)
        })
        .collect();
    let merge = cols.len().div_ceil(MAX_HEAT_COLS).max(1);
    cols.chunks(merge)
        .map(|c| {
            let mut row = [0u64; HEAT_BUCKETS];
            for (_, r) in c {
                for i in 0..HEAT_BUCKETS {
                    row[i] += r[i];
                }
            }
            (c[c.len() - 1].0, row)
        })
        .collect()
}

fn heat_map(r: &BenchResult) -> Result<String, PlotError> {
    let t = TITLES[5];
    let cols = heat_columns(&r.series);
    let max = cols
        .iter()
        .flat_map(|c| c.1.iter())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let n = cols.len().max(1);
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err(t))?;
        let mut c = ChartBuilder::on(&root)
            .caption(t, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, 0f64..HEAT_BUCKETS as f64)
            .map_err(draw_err(t))?;
        let tend = cols.last().map(|c| c.0).unwrap_or(0.0);
        c.configure_mesh()
            .disable_mesh()
            .x_desc(format!("window (run of {tend:.1} s)"))
            .y_desc("LBA (1/64 of the region)")
            .draw()
            .map_err(draw_err(t))?;
        c.draw_series(cols.iter().enumerate().flat_map(|(x, (_, row))| {
            row.iter().enumerate().map(move |(y, &v)| {
                let f = v as f64 / max;
                let col = RGBColor(
                    (255.0 * f.sqrt()) as u8,
                    (40.0 + 120.0 * f) as u8,
                    (90.0 * (1.0 - f)) as u8,
                );
                Rectangle::new(
                    [(x as f64, y as f64), (x as f64 + 1.0, y as f64 + 1.0)],
                    col.filled(),
                )
            })
        }))
        .map_err(draw_err(t))?;
        root.present().map_err(draw_err(t))?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions() {
        assert_eq!(
            ReportFormat::from_path(Path::new("a/b.HTML")).unwrap(),
            ReportFormat::Html
        );
        assert_eq!(
            ReportFormat::from_path(Path::new("x.svg")).unwrap(),
            ReportFormat::Svg
        );
        let e = ReportFormat::from_path(Path::new("x.png")).unwrap_err();
        assert!(e.to_string().contains(".html or .svg"), "{e}");
        assert!(ReportFormat::from_path(Path::new("noext")).is_err());
    }

    fn pt(job: u32, t: f64, depth: u32, hot: usize) -> Point {
        let mut heat = vec![0u32; HEAT_BUCKETS];
        heat[hot] = 10;
        Point {
            job,
            t,
            measuring: true,
            iops: 1000.0,
            bw: 4096e3,
            p50_us: 10.0,
            p99_us: 20.0,
            p999_us: 30.0,
            iodepth: depth,
            batch: 1,
            heat,
        }
    }

    #[test]
    fn heat_columns_sum_jobs_and_cap_width() {
        let s: Vec<Point> = (0..10)
            .flat_map(|i| [pt(0, i as f64 / 10.0, 4, 1), pt(1, i as f64 / 10.0, 4, 2)])
            .collect();
        let c = heat_columns(&s);
        assert_eq!(c.len(), 10);
        assert_eq!((c[3].1[1], c[3].1[2]), (10, 10));
        let long: Vec<Point> = (0..1000).map(|i| pt(0, i as f64 / 10.0, 4, 0)).collect();
        let c = heat_columns(&long);
        assert!(c.len() <= MAX_HEAT_COLS);
        assert_eq!(c.iter().map(|x| x.1[0]).sum::<u64>(), 10_000);
    }
}
