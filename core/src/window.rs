//! Measurement windows: what a stream of I/Os did in about 100 ms.
//!
//! A [`Window`] holds counts, a latency histogram per direction, the queue depth and batch in
//! force, and an LBA heat row. Whoever runs I/O closes one every [`WINDOW`] of its own clock:
//! a bench job (the CLI's `rio_cli::bench`), or a runtime poller when a tuner or a sink wants
//! them. Its readers are off the I/O path:
//! - the queue-depth tuner ([`crate::tune::qd`]) steers by them;
//! - a [`WindowSink`] sees each window as it closes (the OpenTelemetry exporter in `rio-otel`
//!   hangs here; the sink must be cheap, it runs on the I/O thread);
//! - the bench keeps one point per window for its reports.
//!
//! This is the lowest layer both the runtime and the exporters can name, so the type lives
//! here and neither needs the CLI. Recording costs one histogram update and one counter
//! increment per completion; the histogram is reset (no allocation) when the window closes.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::op::OpKind;

/// Length of a control/reporting window.
pub const WINDOW: Duration = Duration::from_millis(100);

/// Columns of the LBA heat map: the job's region is split into this many equal slices.
pub const HEAT_BUCKETS: usize = 64;

/// The latency histogram every window and report keeps: 1 ns to 1 hour, 3 significant digits
/// (0.1% resolution).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// What one direction (read or write) of one job measured.
pub struct DirCount {
    pub ios: u64,
    pub bytes: u64,
    pub hist: Histogram<u64>,
}

impl DirCount {
    /// One I/O of `bytes` that took `lat_ns`.
    #[inline]
    pub fn record(&mut self, bytes: u64, lat_ns: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.hist.saturating_record(lat_ns.max(1));
    }

    pub fn new() -> Self {
        DirCount {
            ios: 0,
            bytes: 0,
            hist: new_hist(),
        }
    }
}

impl Default for DirCount {
    fn default() -> Self {
        DirCount::new()
    }
}

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
    pub fn new(job: u32) -> Window {
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
    pub fn record(&mut self, op: OpKind, bytes: u64, lat_ns: u64, slice: usize) {
        if op == OpKind::Read {
            self.read.record(bytes, lat_ns);
        } else {
            self.write.record(bytes, lat_ns);
        }
        self.heat[slice.min(HEAT_BUCKETS - 1)] += 1;
    }

    /// Clears the counts for the next window, keeping the histograms' memory.
    pub fn reset(&mut self, start: Duration) {
        self.start = start;
        self.len = Duration::ZERO;
        for d in [&mut self.read, &mut self.write] {
            d.ios = 0;
            d.bytes = 0;
            // A reset clears every count (~33k of them); a direction that recorded nothing
            // (the writes of a read job) has nothing to clear.
            if !d.hist.is_empty() {
                d.hist.reset();
            }
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
        w.reset(Duration::from_millis(100));
        assert_eq!(w.ios(), 0);
        assert_eq!(w.pct(99.0), 0);
        assert_eq!(w.heat.iter().sum::<u32>(), 0);
        assert_eq!(w.start, Duration::from_millis(100));
        // A window after one with writes, then one without: what the reset skips (a
        // direction that recorded nothing) carries nothing into the next window.
        for d in [&w.read, &w.write] {
            assert!(d.hist.is_empty());
            assert_eq!((d.hist.min(), d.hist.max()), (0, 0));
        }
        w.record(OpKind::Read, 4096, 7_000, 0);
        w.reset(Duration::from_millis(200));
        w.record(OpKind::Write, 4096, 9_000, 0);
        assert_eq!(w.read.hist.len(), 0);
        assert_eq!(w.write.hist.len(), 1);
        assert_eq!(w.pct(50.0), w.write.hist.value_at_percentile(50.0));
        assert!((8_990..=9_010).contains(&w.pct(50.0)));
    }
}
