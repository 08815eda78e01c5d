//! `--iodepth auto`: the queue-depth tuner driving a bench job.
//!
//! Scope `queue`: each job's queue has its own [`QdTuner`], fed by that job's windows.
//! Scope `device`: one tuner for the whole device. Each job's window is merged into the
//! current epoch (histograms added, IOPS summed); when every running job has reported (or one
//! job reports twice, its window having rolled over before a slower job's: the epoch's depth
//! and IOPS are then scaled to all running jobs), the tuner sees the total depth, the merged
//! p99 and the summed IOPS, and its choice is split evenly over the running jobs. A job takes
//! the new depth at its next window; a finished job leaves.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::series::Window;
use rio::tune::{Decision, QdConfig, QdTuner};

/// Where the tuner acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Queue,
    Device,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        match s {
            "queue" => Ok(Scope::Queue),
            "device" => Ok(Scope::Device),
            _ => Err(format!("expected queue or device, got '{s}'")),
        }
    }
}

/// The auto-depth settings of a bench.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct AutoDepth {
    /// p99 latency the depth is chosen under.
    #[serde(serialize_with = "micros")]
    pub target_p99: Duration,
    pub scope: Scope,
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e6)
}

/// What the tuner did over a run.
#[derive(Clone, Debug, Serialize)]
pub struct TunerReport {
    pub scope: Scope,
    pub target_p99_us: f64,
    /// Depth per job at the end.
    pub final_qd: u32,
    pub decisions: u64,
    pub breaches: u64,
    /// Seconds from the start until the measured p99 stayed under target for good (`None`:
    /// it never did).
    pub converged_after_s: Option<f64>,
    /// The curve as measured: queue depth, smoothed p99 (µs), smoothed IOPS, windows at it.
    pub curve: Vec<(u32, f64, f64, u64)>,
    /// The latency model's local slope (d ln p99 / d log2 qd: 0 = depth is free, 1 =
    /// saturated) and its confidence.
    pub slope: f64,
    pub confidence: f64,
    /// Human-readable advice drawn from the curve.
    pub recommendations: Vec<String>,
}

struct DevState {
    tuner: QdTuner,
    hist: Histogram<u64>,
    reported: Vec<bool>,
    /// Jobs still running (a finished job no longer reports).
    active: Vec<bool>,
    depth_sum: u32,
    ios: u64,
    iops: f64,
    lat_sum: f64,
    /// Decisions taken for the device (each job counts only those its windows triggered).
    decisions: u64,
}

/// The device-wide tuner shared by a bench's jobs.
pub struct DeviceTuner {
    state: Mutex<DevState>,
    per_job: AtomicU32,
    batch: AtomicU32,
    /// A job's own depth bound (`--iodepth-max`).
    job_max: u32,
}

impl DeviceTuner {
    pub fn new(cfg: QdConfig, jobs: u32) -> DeviceTuner {
        let jobs = jobs.max(1);
        let job_max = cfg.max.div_ceil(jobs).max(1);
        let tuner = QdTuner::new(cfg);
        let per_job = tuner.depth().div_ceil(jobs).max(1);
        DeviceTuner {
            state: Mutex::new(DevState {
                tuner,
                hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("bounds"),
                reported: vec![false; jobs as usize],
                active: vec![true; jobs as usize],
                depth_sum: 0,
                ios: 0,
                iops: 0.0,
                lat_sum: 0.0,
                decisions: 0,
            }),
            per_job: AtomicU32::new(per_job),
            batch: AtomicU32::new(1),
            job_max,
        }
    }

    fn window(&self, w: &Window) -> Option<Decision> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let j = (w.job as usize).min(st.reported.len() - 1);
        let mut out = None;
        if st.reported[j] {
            out = Some(self.decide(&mut st));
        }
        st.reported[j] = true;
        st.depth_sum += w.iodepth;
        st.ios += w.ios();
        st.iops += w.iops();
        for d in [&w.read, &w.write] {
            if d.ios > 0 {
                let _ = st.hist.add(&d.hist);
                st.lat_sum += d.hist.mean() * d.ios as f64;
            }
        }
        if st.reported.iter().zip(&st.active).all(|(r, a)| *r || !*a) {
            out = Some(self.decide(&mut st));
        }
        out
    }

    /// Job `job` finished: epochs no longer wait for it, and the depth is split over the
    /// jobs still running.
    fn leave(&self, job: u32) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let j = (job as usize).min(st.active.len() - 1);
        st.active[j] = false;
    }

    fn decide(&self, st: &mut DevState) -> Decision {
        let p99 = if st.ios > 0 {
            st.hist.value_at_percentile(99.0)
        } else {
            0
        };
        let mean = if st.ios > 0 {
            st.lat_sum / st.ios as f64
        } else {
            0.0
        };
        // An epoch cut short (one job's window rolled over before another's closed) covers
        // only the jobs that reported: scale its depth and IOPS to every running job, so the
        // tuner sees the device's figures, not a fraction of them.
        let active = st.active.iter().filter(|a| **a).count().max(1) as u32;
        let reported = st.reported.iter().filter(|r| **r).count().max(1) as u32;
        let scale = active.max(reported) as f64 / reported as f64;
        let depth = ((st.depth_sum as f64 * scale).round() as u32).max(1);
        let (ios, iops) = (st.ios, st.iops * scale);
        let d = st.tuner.observe(depth, p99, mean, iops, ios);
        st.decisions += 1;
        // Split over the running jobs, each within its own bound (after a job leaves, the
        // others cannot take up its share beyond `--iodepth-max`).
        let per_job = d.qd.div_ceil(active).clamp(1, self.job_max);
        self.per_job.store(per_job, Relaxed);
        // The arm is the tuner's; its size follows each job's own depth.
        let batch = if d.batch > 1 {
            rio::tune::qd::batch_for(per_job)
        } else {
            1
        };
        self.batch.store(batch, Relaxed);
        st.hist.reset();
        st.reported.iter_mut().for_each(|r| *r = false);
        st.depth_sum = 0;
        st.ios = 0;
        st.iops = 0.0;
        st.lat_sum = 0.0;
        d
    }
}

/// A job's handle on its tuner.
pub enum JobTuner<'a> {
    Queue(Box<QdTuner>),
    Device(&'a DeviceTuner),
}

impl JobTuner<'_> {
    /// Depth this job should run at now.
    pub fn depth(&self) -> u32 {
        match self {
            JobTuner::Queue(t) => t.depth(),
            JobTuner::Device(d) => d.per_job.load(Relaxed),
        }
    }

    /// The job finished (device scope: it stops counting toward the device's epochs).
    pub fn leave(&self, job: u32) {
        if let JobTuner::Device(d) = self {
            d.leave(job);
        }
    }

    /// Submission batch this job should use now.
    pub fn batch(&self) -> u32 {
        match self {
            JobTuner::Queue(t) => t.batch(),
            JobTuner::Device(d) => d.batch.load(Relaxed),
        }
    }

    /// Feeds a closed window; returns the decision if one was taken.
    pub fn window(&mut self, w: &Window) -> Option<Decision> {
        match self {
            JobTuner::Queue(t) => {
                Some(t.observe(w.iodepth, w.pct(99.0), w.mean_ns(), w.iops(), w.ios()))
            }
            JobTuner::Device(d) => d.window(w),
        }
    }

    /// Depth bounds are per job; in device scope the tuner's are for the whole device, and so
    /// is the count of decisions (`decisions` is this job's own, used in queue scope).
    pub fn report(&self, converged_after_s: Option<f64>, decisions: u64) -> TunerReport {
        let guard;
        let (t, scope, final_qd, decisions): (&QdTuner, Scope, u32, u64) = match self {
            JobTuner::Queue(t) => (t, Scope::Queue, t.depth(), decisions),
            JobTuner::Device(d) => {
                guard = d.state.lock().unwrap_or_else(|p| p.into_inner());
                let n = guard.decisions;
                (&guard.tuner, Scope::Device, d.per_job.load(Relaxed), n)
            }
        };
        TunerReport {
            scope,
            target_p99_us: t.config().target_p99.as_secs_f64() * 1e6,
            final_qd,
            decisions,
            breaches: t.breaches(),
            converged_after_s,
            curve: t.curve(),
            slope: t.slope(),
            confidence: t.confidence(),
            recommendations: rio::tune::recommendations(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rio::OpKind;

    /// A window of `job` at `qd` on a device whose latency is flat at 50 µs (depth is free).
    fn window(job: u32, qd: u32) -> Window {
        let mut w = Window::new(job);
        w.len = Duration::from_millis(100);
        w.iodepth = qd;
        for _ in 0..(qd as u64 * 200) {
            w.record(OpKind::Read, 4096, 50_000, 0);
        }
        w
    }

    #[test]
    fn device_scope_splits_the_depth_and_survives_a_finished_job() {
        let d = DeviceTuner::new(QdConfig::new(Duration::from_micros(200), 64), 2);
        let (a, b) = (JobTuner::Device(&d), JobTuner::Device(&d));
        let mut decisions = 0;
        for _ in 0..6 {
            decisions += a.depth_window(0) as u32;
            decisions += b.depth_window(1) as u32;
        }
        assert!(decisions >= 5, "{decisions} decisions in 6 epochs");
        // The report counts the device's decisions, whichever job's window triggered them
        // (job 0's own count may be 0: job 1's windows close the epochs here).
        assert_eq!(a.report(None, 0).decisions, decisions as u64);
        assert_eq!(b.report(None, 0).decisions, decisions as u64);
        let grown = a.depth();
        assert!(
            grown >= 8,
            "per-job depth {grown} on a device where depth is free"
        );
        assert_eq!(a.depth(), b.depth());
        // Job 1 finishes. Job 0's windows alone now make the epochs, and the depth does not
        // collapse (before: each lone window read as the whole device's depth, halved).
        b.leave(1);
        for _ in 0..10 {
            a.depth_window(0);
        }
        assert!(
            a.depth() >= grown,
            "per-job depth fell to {} from {grown}",
            a.depth()
        );
    }

    impl JobTuner<'_> {
        /// Feeds this job's next window at its current depth; whether a decision came of it.
        fn depth_window(&self, job: u32) -> bool {
            match self {
                JobTuner::Device(d) => d.window(&window(job, self.depth())).is_some(),
                JobTuner::Queue(_) => unreachable!(),
            }
        }
    }
}
