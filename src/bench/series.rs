//! Per-window samples of a running bench.
//!
//! Each job closes a [`Window`] every [`WINDOW`] (100 ms) of its own clock: counts, a latency
//! histogram per direction, the queue depth and batch in force, and an LBA heat row. Three
//! consumers read them, none on the I/O path:
//! - the queue-depth tuner (`--iodepth auto`) steers by them, inside the job thread;
//! - a [`WindowSink`] given to [`run_with`](super::run::run_with) sees every window as it
//!   closes (telemetry export hangs here; the sink must be cheap, it runs on the job thread);
//! - the result keeps a [`Point`] per window for `--report` and the JSON output.
//!
//! Recording costs one extra histogram update and one counter increment per completion; the
//! histogram is reset (no allocation) when the window closes.

use std::time::Duration;

use serde::Serialize;

use super::report::DirCount;
use crate::queue::OpKind;

/// Length of a control/reporting window.
pub const WINDOW: Duration = Duration::from_millis(100);

/// Columns of the LBA heat map: the job's region is split into this many equal slices.
pub const HEAT_BUCKETS: usize = 64;

/// What one job did in one window.
pub struct Window {
    /// Job index.
    pub job: u32,
    /// Window start, from the job's start.
    pub start: Duration,
    /// Window length (about [`WINDOW`]; the last one may be shorter).
    pub len: Duration,
    /// The window lies in the measured phase (not the ramp).
    pub measuring: bool,
    pub read: DirCount,
    pub write: DirCount,
    /// Queue depth the job aimed at during the window.
    pub iodepth: u32,
    /// Submission batch (commands per doorbell / `io_uring_enter`) in force.
    pub batch: u32,
    /// I/Os per LBA slice of the job's region.
    pub heat: [u32; HEAT_BUCKETS],
}

impl Window {
    pub(crate) fn new(job: u32) -> Window {
        Window {
            job,
            start: Duration::ZERO,
            len: Duration::ZERO,
            measuring: false,
            read: DirCount::new(),
            write: DirCount::new(),
            iodepth: 0,
            batch: 0,
            heat: [0; HEAT_BUCKETS],
        }
    }

    /// Records one completion; `slice` is its heat column.
    #[inline]
    pub(crate) fn record(&mut self, op: OpKind, bytes: u64, lat_ns: u64, slice: usize) {
        if op == OpKind::Read {
            self.read.record(bytes, lat_ns);
        } else {
            self.write.record(bytes, lat_ns);
        }
        self.heat[slice.min(HEAT_BUCKETS - 1)] += 1;
    }

    /// Clears the counts for the next window, keeping the histograms' memory.
    pub(crate) fn reset(&mut self, start: Duration) {
        self.start = start;
        self.len = Duration::ZERO;
        for d in [&mut self.read, &mut self.write] {
            d.ios = 0;
            d.bytes = 0;
            d.hist.reset();
        }
        self.heat = [0; HEAT_BUCKETS];
    }

    /// I/Os completed in the window, both directions.
    pub fn ios(&self) -> u64 {
        self.read.ios + self.write.ios
    }

    /// Mean latency over both directions, in nanoseconds (0: no I/O).
    pub fn mean_ns(&self) -> f64 {
        let n = self.ios();
        if n == 0 {
            return 0.0;
        }
        (self.read.hist.mean() * self.read.ios as f64
            + self.write.hist.mean() * self.write.ios as f64)
            / n as f64
    }

    /// I/Os per second over the window.
    pub fn iops(&self) -> f64 {
        let s = self.len.as_secs_f64();
        if s > 0.0 { self.ios() as f64 / s } else { 0.0 }
    }

    /// Latency at percentile `p` (0..100), in nanoseconds (0: no I/O): the larger of the
    /// reads' and the writes' (conservative for a mixed workload: the tuner keeps the slower
    /// direction under target).
    pub fn pct(&self, p: f64) -> u64 {
        let r = (self.read.ios > 0).then(|| self.read.hist.value_at_percentile(p));
        let w = (self.write.ios > 0).then(|| self.write.hist.value_at_percentile(p));
        r.into_iter().chain(w).max().unwrap_or(0)
    }
}

/// Sees each window as a job closes it. Called on the job's thread: keep it short.
pub trait WindowSink: Sync {
    fn window(&self, w: &Window);

    /// An I/O of job `job` failed (the run ends with this error). Default: ignored.
    fn io_error(&self, _job: u32, _e: &crate::error::IoError) {}
}

/// A sink that ignores everything.
pub struct NoSink;

impl WindowSink for NoSink {
    fn window(&self, _: &Window) {}
}

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

    #[test]
    fn window_counts_percentiles_and_reset() {
        let mut w = Window::new(3);
        for i in 1..=100u64 {
            w.record(OpKind::Read, 4096, i * 1000, (i % 70) as usize);
        }
        w.record(OpKind::Write, 4096, 1_000_000, 0);
        w.len = Duration::from_millis(100);
        assert_eq!(w.ios(), 101);
        assert!((w.iops() - 1010.0).abs() < 1e-6);
        // The write's 1 ms dominates the max; p50 comes from the reads.
        assert!(w.pct(99.0) >= 999_000);
        assert!((49_900..=50_100).contains(&w.read.hist.value_at_percentile(50.0)));
        // Slices 63..=69 all land in the last column.
        assert_eq!(w.heat[HEAT_BUCKETS - 1], 7);
        let p = Point::from(&w);
        assert_eq!(p.heat.iter().sum::<u32>(), 101);
        assert!((p.t - 0.1).abs() < 1e-9);
        w.reset(Duration::from_millis(100));
        assert_eq!(w.ios(), 0);
        assert_eq!(w.pct(99.0), 0);
        assert_eq!(w.heat.iter().sum::<u32>(), 0);
        assert_eq!(w.start, Duration::from_millis(100));
    }
}
