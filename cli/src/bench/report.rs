//! Results: per-job hdrhistograms merged into fio-like statistics, JSON and a human summary.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::spec::BenchSpec;
use rio::OpKind;
use rio::engine::{Engine, Selection};
use rio::target::{Geometry, TargetKind};

/// Percentiles reported, as fio names them.
pub const PERCENTILES: [f64; 6] = [50.0, 90.0, 95.0, 99.0, 99.9, 99.99];

pub use rio::window::DirCount;
use rio::window::new_hist;

/// What one job measured in its window.
pub struct JobOutcome {
    pub read: DirCount,
    pub write: DirCount,
    pub window: Duration,
    pub verified: u64,
    /// One point per 100 ms window (see [`super::series`]).
    pub series: Vec<super::series::Point>,
    /// What `--iodepth auto` did (per job in queue scope).
    pub tuner: Option<super::autotune::TunerReport>,
    /// Time the job spent handing its windows to the sink (telemetry's cost on the I/O
    /// thread), over the measured phase.
    pub sink: Duration,
    /// The job thread's own CPU time over its measured phase (`None`: it measured nothing).
    pub thread_cpu: Option<Duration>,
}

impl JobOutcome {
    pub fn new() -> Self {
        JobOutcome {
            read: DirCount::new(),
            write: DirCount::new(),
            window: Duration::ZERO,
            verified: 0,
            series: Vec::new(),
            tuner: None,
            sink: Duration::ZERO,
            thread_cpu: None,
        }
    }

    #[inline]
    pub fn record(&mut self, op: OpKind, bytes: u64, lat_ns: u64) {
        self.dir(op).record(bytes, lat_ns);
    }

    /// The direction an operation counts in.
    #[inline]
    pub(crate) fn dir(&mut self, op: OpKind) -> &mut DirCount {
        if op == OpKind::Read {
            &mut self.read
        } else {
            &mut self.write
        }
    }
}

impl JobOutcome {
    /// Adds a measured window's counts and histograms.
    pub(crate) fn add_window(&mut self, w: &super::series::Window) {
        for (d, s) in [(&mut self.read, &w.read), (&mut self.write, &w.write)] {
            d.ios += s.ios;
            d.bytes += s.bytes;
            if s.ios > 0 {
                d.hist.add(&s.hist).expect("same histogram bounds");
            }
        }
    }
}

impl Default for JobOutcome {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency statistics in nanoseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LatStats {
    pub min: u64,
    pub max: u64,
    pub mean: f64,
    pub stddev: f64,
    #[serde(rename = "N")]
    pub n: u64,
    /// Keyed as fio does: "99.000000".
    pub percentile: BTreeMap<String, u64>,
}

/// One direction's statistics, fio's field names.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DirStats {
    pub io_bytes: u64,
    /// Bytes per second.
    pub bw_bytes: u64,
    pub iops: f64,
    pub total_ios: u64,
    /// Milliseconds.
    pub runtime: u64,
    pub lat_ns: LatStats,
}

impl DirStats {
    fn from(ios: u64, bytes: u64, hist: &Histogram<u64>, window: Duration) -> DirStats {
        let secs = window.as_secs_f64();
        let rate = |x: u64| if secs > 0.0 { x as f64 / secs } else { 0.0 };
        let mut percentile = BTreeMap::new();
        if ios > 0 {
            for p in PERCENTILES {
                percentile.insert(format!("{p:.6}"), hist.value_at_quantile(p / 100.0));
            }
        }
        DirStats {
            io_bytes: bytes,
            bw_bytes: rate(bytes) as u64,
            iops: rate(ios),
            total_ios: ios,
            runtime: if ios > 0 {
                window.as_millis() as u64
            } else {
                0
            },
            lat_ns: LatStats {
                min: if ios > 0 { hist.min() } else { 0 },
                max: if ios > 0 { hist.max() } else { 0 },
                mean: if ios > 0 { hist.mean() } else { 0.0 },
                stddev: if ios > 0 { hist.stdev() } else { 0.0 },
                n: ios,
                percentile,
            },
        }
    }

    /// A percentile in nanoseconds (0 when nothing was measured).
    pub fn pct(&self, p: f64) -> u64 {
        self.lat_ns
            .percentile
            .get(&format!("{p:.6}"))
            .copied()
            .unwrap_or(0)
    }
}

/// The merged result of all jobs (fio's group reporting).
#[derive(Clone, Debug, Serialize)]
pub struct JobReport {
    pub jobname: String,
    pub read: DirStats,
    pub write: DirStats,
    /// Percent of one CPU, user and system, over the measured window (whole process).
    pub usr_cpu: f64,
    pub sys_cpu: f64,
    /// CPU seconds (user + system) per million I/Os.
    pub cpu_s_per_mio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    pub path: String,
    pub kind: TargetKind,
    pub geometry: Geometry,
    pub direct: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatTarget {
    pub target_us: u64,
    pub p99_us: f64,
    pub met: bool,
}

/// CPU seconds spent by the threads of one name.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ThreadShare {
    pub name: String,
    pub cpu_s: f64,
}

/// The CPU a run used over its measured window: the process's user and system time, and
/// each thread name's share.
pub(crate) struct CpuUse {
    pub process: Option<(Duration, Duration)>,
    pub by_thread: Vec<ThreadShare>,
}

/// Per-name CPU time between two snapshots of the process's threads: a thread in both counts
/// its difference, one that started in between all of its time. The job threads (`rio-job-N`)
/// count what each measured of itself over its own measured phase instead: all but the last
/// job may have ended before the closing snapshot.
pub(crate) fn thread_shares(
    start: &[rio_sys::rusage::ThreadCpu],
    end: &[rio_sys::rusage::ThreadCpu],
    jobs: &[JobOutcome],
) -> Vec<ThreadShare> {
    let mut by_name: Vec<ThreadShare> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| {
            j.thread_cpu.map(|d| ThreadShare {
                name: format!("rio-job-{i}"),
                cpu_s: d.as_secs_f64(),
            })
        })
        .collect();
    for t in end.iter().filter(|t| !t.name.starts_with("rio-job-")) {
        let before = start
            .iter()
            .find(|s| s.tid == t.tid)
            .map_or(0, |s| s.on_cpu_ns);
        let cpu_s = t.on_cpu_ns.saturating_sub(before) as f64 / 1e9;
        match by_name.iter_mut().find(|s| s.name == t.name) {
            Some(s) => s.cpu_s += cpu_s,
            None => by_name.push(ThreadShare {
                name: t.name.clone(),
                cpu_s,
            }),
        }
    }
    by_name.sort_by(|a, b| b.cpu_s.total_cmp(&a.cpu_s).then(a.name.cmp(&b.name)));
    by_name
}

/// Everything `rio bench` reports.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    #[serde(rename = "rio version")]
    pub version: &'static str,
    pub backend: Selection,
    /// The clock of latencies and submission stamps (`--clocksource`), and why.
    pub clock: super::clock::ClockReport,
    pub target: TargetReport,
    pub options: BenchSpec,
    pub jobs: Vec<JobReport>,
    /// Blocks whose contents were checked (`--verify`).
    pub verified_blocks: Option<u64>,
    pub latency_target: Option<LatTarget>,
    /// Seconds spent laying out the region before the run.
    pub layout_seconds: Option<f64>,
    /// The run was ended early (Ctrl-C); the figures cover what ran.
    pub interrupted: bool,
    /// Every job's 100 ms windows, in time order (ramp included, flagged).
    pub series: Vec<super::series::Point>,
    /// `--iodepth auto`: the tuner's report (job 0's in queue scope; the device's otherwise).
    pub tuner: Option<super::autotune::TunerReport>,
    /// Where the process's CPU went over the measured window: each thread name's time on a
    /// CPU (the scheduler's count, by name, largest first; telemetry's threads are
    /// `rio-otel-*`, `OpenTelemetry.*` and reqwest's). The job threads (`rio-job-N`) count
    /// their own time over their own measured phase; other threads that ended inside the
    /// window are missing. Empty where the kernel keeps no per-thread `schedstat`.
    pub cpu_by_thread: Vec<ThreadShare>,
    /// Seconds the jobs spent handing windows to the sink (the telemetry exporter's cost on
    /// the I/O threads), over the measured window; part of their `rio-job-N` time.
    pub sink_seconds: f64,
    /// Merged latency histogram of the measured window, both directions (ns), for `--report`.
    #[serde(skip)]
    pub latency: Histogram<u64>,
}

/// How a run went, beside what it measured.
pub(crate) struct RunFacts {
    /// Ended early (Ctrl-C).
    pub interrupted: bool,
    pub layout_seconds: Option<f64>,
    pub clock: super::clock::ClockReport,
}

impl BenchResult {
    pub(crate) fn build(
        engine: &Engine,
        spec: &BenchSpec,
        jobs: Vec<JobOutcome>,
        cpu: CpuUse,
        run: RunFacts,
        series: Vec<super::series::Point>,
    ) -> BenchResult {
        let RunFacts {
            interrupted,
            layout_seconds,
            clock,
        } = run;
        let tuner = jobs.iter().find_map(|j| j.tuner.clone());
        let mut read = new_hist();
        let mut write = new_hist();
        let (mut rio, mut rb, mut wio, mut wb, mut verified) = (0, 0, 0, 0, 0);
        let mut window = Duration::ZERO;
        let mut sink = Duration::ZERO;
        for j in &jobs {
            sink += j.sink;
            read.add(&j.read.hist).expect("same bounds");
            write.add(&j.write.hist).expect("same bounds");
            rio += j.read.ios;
            rb += j.read.bytes;
            wio += j.write.ios;
            wb += j.write.bytes;
            verified += j.verified;
            window = window.max(j.window);
        }
        let secs = window.as_secs_f64();
        let mut latency = read.clone();
        latency.add(&write).expect("same bounds");
        let CpuUse {
            process,
            by_thread: cpu_by_thread,
        } = cpu;
        let (usr, sys) = process.unwrap_or_default();
        let pct = |d: Duration| {
            if secs > 0.0 {
                100.0 * d.as_secs_f64() / secs
            } else {
                0.0
            }
        };
        let total = rio + wio;
        let report = JobReport {
            jobname: format!("{}-{}", spec.rw.name(), spec.bs),
            read: DirStats::from(rio, rb, &read, window),
            write: DirStats::from(wio, wb, &write, window),
            usr_cpu: pct(usr),
            sys_cpu: pct(sys),
            cpu_s_per_mio: if total > 0 {
                (usr + sys).as_secs_f64() / total as f64 * 1e6
            } else {
                0.0
            },
        };
        let latency_target = engine.config().target_latency_us.map(|t| {
            let p99 = report.read.pct(99.0).max(report.write.pct(99.0)) as f64 / 1000.0;
            LatTarget {
                target_us: t,
                p99_us: p99,
                met: p99 <= t as f64,
            }
        });
        let t = engine.target();
        BenchResult {
            version: env!("CARGO_PKG_VERSION"),
            backend: engine.selection().clone(),
            clock,
            target: TargetReport {
                path: t.path.display().to_string(),
                kind: t.kind.clone(),
                geometry: t.geometry,
                direct: t.direct,
            },
            options: spec.clone(),
            jobs: vec![report],
            verified_blocks: spec.verify.then_some(verified),
            latency_target,
            layout_seconds,
            interrupted,
            series,
            tuner,
            cpu_by_thread,
            sink_seconds: sink.as_secs_f64(),
            latency,
        }
    }

    /// The merged job.
    pub fn job(&self) -> &JobReport {
        &self.jobs[0]
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("result serializes")
    }

    /// fio-style human summary.
    pub fn to_human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let o = &self.options;
        let kind = match &self.target.kind {
            TargetKind::File => "regular file".to_string(),
            TargetKind::BlockDevice { name, .. } => format!("block device {name}"),
            TargetKind::Nvme { controller, nsid } => {
                format!("NVMe namespace {nsid} of {controller}")
            }
            TargetKind::Directory => "directory (files by descriptor)".to_string(),
        };
        let _ = writeln!(
            s,
            "rio bench: rw={} bs={} iodepth={} numjobs={} on {} ({kind}, {}, {} B blocks, direct={})",
            o.rw.name(),
            human_bytes(o.bs as u64),
            o.iodepth,
            o.numjobs,
            self.target.path,
            human_bytes(self.target.geometry.size),
            self.target.geometry.block_size,
            self.target.direct as u8
        );
        let _ = writeln!(
            s,
            "  backend: {} ({})",
            self.backend.backend.name(),
            self.backend.reason
        );
        let _ = writeln!(
            s,
            "  clock: {} ({}{})",
            self.clock.source,
            self.clock.reason,
            self.clock
                .tsc_mhz
                .map_or(String::new(), |m| format!(", {m:.1} MHz"))
        );
        if let Some(l) = self.layout_seconds {
            let _ = writeln!(s, "  layout: {l:.1}s");
        }
        let j = self.job();
        for (name, d) in [("read", &j.read), ("write", &j.write)] {
            if d.total_ios == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "  {name}: IOPS={}, BW={}/s ({} in {} ms)",
                human_count(d.iops),
                human_bytes(d.bw_bytes),
                human_bytes(d.io_bytes),
                d.runtime
            );
            let l = &d.lat_ns;
            let _ = writeln!(
                s,
                "    lat (usec): min={:.1}, max={:.1}, avg={:.1}, stdev={:.1}",
                l.min as f64 / 1e3,
                l.max as f64 / 1e3,
                l.mean / 1e3,
                l.stddev / 1e3
            );
            let ps: Vec<String> = PERCENTILES
                .iter()
                .map(|p| format!("p{}={:.1}", p, d.pct(*p) as f64 / 1e3))
                .collect();
            let _ = writeln!(s, "    lat percentiles (usec): {}", ps.join(", "));
        }
        let _ = writeln!(
            s,
            "  cpu: usr={:.1}%, sys={:.1}%, {:.2} CPU-s per million I/Os",
            j.usr_cpu, j.sys_cpu, j.cpu_s_per_mio
        );
        // Where it went, when more than the job threads spent a visible share (telemetry's
        // threads, a model's device thread): the top five names.
        let total: f64 = self.cpu_by_thread.iter().map(|t| t.cpu_s).sum();
        let others: f64 = self
            .cpu_by_thread
            .iter()
            .filter(|t| !t.name.starts_with("rio-job-"))
            .map(|t| t.cpu_s)
            .sum();
        if total > 0.0 && others >= 0.005 * total {
            let top: Vec<String> = self
                .cpu_by_thread
                .iter()
                .take(5)
                .map(|t| format!("{} {:.3} s", t.name, t.cpu_s))
                .collect();
            let _ = writeln!(s, "  cpu by thread: {}", top.join(", "));
        }
        if let Some(v) = self.verified_blocks {
            let _ = writeln!(s, "  verify: {v} blocks checked, all good");
        }
        if let Some(t) = &self.latency_target {
            let _ = writeln!(
                s,
                "  p99 target {} us: {} (p99 {:.1} us)",
                t.target_us,
                if t.met { "met" } else { "MISSED" },
                t.p99_us
            );
        }
        if let Some(t) = &self.tuner {
            let _ = writeln!(
                s,
                "  tuner ({:?} scope): final QD {} per job, {} decisions, {} breaches, {}, confidence {:.2}",
                t.scope,
                t.final_qd,
                t.decisions,
                t.breaches,
                match t.converged_after_s {
                    Some(c) => format!("p99 under target from {c:.1}s on"),
                    None => "p99 never settled under target".to_string(),
                },
                t.confidence
            );
            for r in &t.recommendations {
                let _ = writeln!(s, "    - {r}");
            }
        }
        if self.interrupted {
            let _ = writeln!(s, "  (interrupted: figures cover the time that ran)");
        }
        s
    }
}

pub use rio::units::{human_bytes, human_count};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_shares_are_differences_by_name_largest_first() {
        use rio_sys::rusage::ThreadCpu;
        let t = |tid, name: &str, ns| ThreadCpu {
            tid,
            name: name.into(),
            on_cpu_ns: ns,
        };
        let start = [t(1, "rio", 5_000_000), t(2, "rio-job-0", 1_000_000_000)];
        // rio-job-0's snapshots would say 5 s; its own count is what is reported.
        // Thread 3 started inside the window (all of its time counts); thread 4 shares a
        // name with it; the main thread did not run.
        let end = [
            t(1, "rio", 5_000_000),
            t(2, "rio-job-0", 6_000_000_000),
            t(3, "rio-otel-agg", 10_000_000),
            t(4, "rio-otel-agg", 5_000_000),
        ];
        // The job's own count (2 s) replaces the snapshots' for its thread.
        let mut job = JobOutcome::new();
        job.thread_cpu = Some(Duration::from_secs(2));
        let s = thread_shares(&start, &end, &[job]);
        let names: Vec<&str> = s.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["rio-job-0", "rio-otel-agg", "rio"]);
        for (got, want) in s.iter().map(|x| x.cpu_s).zip([2.0, 0.015, 0.0]) {
            assert!((got - want).abs() < 1e-12, "{s:?}");
        }
    }

    #[test]
    fn merged_percentiles_and_rates() {
        let mut a = JobOutcome::new();
        let mut b = JobOutcome::new();
        for i in 1..=1000u64 {
            a.record(OpKind::Read, 4096, i * 1000);
            b.record(OpKind::Read, 4096, i * 1000 + 500);
        }
        let mut h = new_hist();
        h.add(&a.read.hist).unwrap();
        h.add(&b.read.hist).unwrap();
        let d = DirStats::from(2000, 2000 * 4096, &h, Duration::from_secs(2));
        assert_eq!(d.iops, 1000.0);
        assert_eq!(d.bw_bytes, 1000 * 4096);
        let p50 = d.pct(50.0) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.01, "{p50}");
        let p99 = d.pct(99.0) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.01, "{p99}");
        assert_eq!(d.lat_ns.min, 1000);
        assert!(d.lat_ns.percentile.contains_key("99.990000"));
    }
}
