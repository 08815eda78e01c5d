//! The windows a bench result keeps: one [`Point`] per [`Window`] for `--report` and the JSON
//! output. The window itself, and the [`WindowSink`] that sees each as it closes, are the
//! engine's (`rio::window`): the runtime's pollers and the exporters use them too.

use serde::Serialize;

pub use rio::window::{HEAT_BUCKETS, NoSink, WINDOW, Window, WindowSink};

/// One window as the result keeps it.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub job: u32,
    /// Window end, seconds from the job's start.
    pub t: f64,
    pub measuring: bool,
    pub iops: f64,
    /// Bytes per second.
    pub bw: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub iodepth: u32,
    pub batch: u32,
    /// I/Os per LBA slice (not in the JSON output: `--report` draws it).
    #[serde(skip)]
    pub heat: Vec<u32>,
}

impl From<&Window> for Point {
    fn from(w: &Window) -> Point {
        let s = w.len.as_secs_f64();
        let us = |p: f64| w.pct(p) as f64 / 1000.0;
        Point {
            job: w.job,
            t: (w.start + w.len).as_secs_f64(),
            measuring: w.measuring,
            iops: w.iops(),
            bw: if s > 0.0 {
                (w.read.bytes + w.write.bytes) as f64 / s
            } else {
                0.0
            },
            p50_us: us(50.0),
            p99_us: us(99.0),
            p999_us: us(99.9),
            iodepth: w.iodepth,
            batch: w.batch,
            heat: w.heat.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rio::OpKind;
    use std::time::Duration;

    #[test]
    fn a_point_keeps_the_window_s_heat_and_end() {
        let mut w = Window::new(3);
        for i in 1..=100u64 {
            w.record(OpKind::Read, 4096, i * 1000, (i % 70) as usize);
        }
        w.record(OpKind::Write, 4096, 1_000_000, 0);
        w.start = Duration::from_millis(200);
        w.len = Duration::from_millis(100);
        let p = Point::from(&w);
        assert_eq!(p.heat.iter().sum::<u32>(), 101);
        assert_eq!(p.heat[HEAT_BUCKETS - 1], 7);
        assert!((p.t - 0.3).abs() < 1e-9);
        assert!((p.iops - 1010.0).abs() < 1e-6);
        assert!(p.p99_us >= 999.0);
    }
}
