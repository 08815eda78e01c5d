//! `rio tune`: probe a target briefly at a ladder of queue depths, feed the tuner, and print
//! the curve it learned and the depth it would choose.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::Serialize;

use super::run::{BenchError, RunOptions, run};
use super::spec::BenchSpec;
use rio::engine::Engine;
use rio::tune::{QdConfig, QdTuner};

/// What one depth measured.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeStep {
    pub qd: u32,
    pub iops: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The probe's result.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub target_p99_us: Option<f64>,
    pub steps: Vec<ProbeStep>,
    /// Most IOPS with measured p99 under target (the shallowest within 1% of it); `None`
    /// without a target or when no depth met it.
    pub choice: Option<u32>,
    /// The shallowest depth giving 90% of the most IOPS seen: past it, depth buys latency.
    pub knee: u32,
    /// The latency model's local slope at the deep end (d ln p99 / d log2 qd).
    pub slope: f64,
    pub confidence: f64,
    pub recommendations: Vec<String>,
}

/// Runs `spec` for `step` (after a ramp of a quarter of it, at most 200 ms) at each depth 1,
/// 2, 4, … up to `max_qd`, stopping early once the mean latency passes twice the target.
/// `stop` ends it (Ctrl-C) with what was measured.
pub fn probe(
    engine: &Engine,
    spec: &BenchSpec,
    max_qd: u32,
    step: Duration,
    target: Option<Duration>,
    stop: &AtomicBool,
) -> Result<ProbeReport, BenchError> {
    // Without a target the tuner still learns the curve; its target is then out of reach.
    let mut tuner = QdTuner::new(QdConfig::new(
        target.unwrap_or(Duration::from_secs(3600)),
        max_qd.max(1),
    ));
    let mut steps: Vec<ProbeStep> = Vec::new();
    let mut qd = 1u32;
    while qd <= max_qd.max(1) && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let s = BenchSpec {
            iodepth: qd,
            runtime: Some(step),
            time_based: true,
            // Each depth gets a short unmeasured ramp: the first moments of a run (a device
            // thread waking up, caches) are not the curve.
            ramp_time: (step / 4).min(Duration::from_millis(200)),
            auto: None,
            ..spec.clone()
        };
        let r = run(engine, &s, RunOptions::default(), stop, &mut |_| {})?;
        let j = r.job();
        let ios = j.read.total_ios + j.write.total_ios;
        let iops = j.read.iops + j.write.iops;
        let pick = |f: &dyn Fn(&super::report::DirStats) -> f64| {
            if j.read.total_ios >= j.write.total_ios {
                f(&j.read)
            } else {
                f(&j.write)
            }
        };
        let p99_us = j.read.pct(99.0).max(j.write.pct(99.0)) as f64 / 1000.0;
        let st = ProbeStep {
            qd,
            iops,
            mean_us: pick(&|d| d.lat_ns.mean / 1000.0),
            p50_us: pick(&|d| d.pct(50.0) as f64 / 1000.0),
            p99_us,
        };
        tuner.observe(qd, (p99_us * 1000.0) as u64, st.mean_us * 1000.0, iops, ios);
        let st_mean_us = st.mean_us;
        tracing::debug!(target: "rio::tune", qd, iops, p99_us, "probe step");
        steps.push(st);
        // Far past the target: deeper only adds latency. Judged on the mean, which one stall
        // of the host cannot move the way it moves a p99 of a few hundred I/Os.
        if let Some(t) = target
            && st_mean_us > 2.0 * t.as_secs_f64() * 1e6
        {
            break;
        }
        qd *= 2;
    }
    let best = steps.iter().map(|s| s.iops).fold(0.0, f64::max);
    let knee = steps
        .iter()
        .find(|s| s.iops >= 0.9 * best)
        .map_or(1, |s| s.qd);
    let choice = target.and_then(|t| {
        let t = t.as_secs_f64() * 1e6;
        let ok: Vec<_> = steps.iter().filter(|s| s.p99_us <= t).collect();
        let top = ok.iter().map(|s| s.iops).fold(0.0, f64::max);
        ok.iter().find(|s| s.iops >= 0.99 * top).map(|s| s.qd)
    });
    let mut recommendations = Vec::new();
    if target.is_some() {
        recommendations = rio::tune::recommendations(&tuner);
        // The probe does not run at its choice, so "now at QD" would mislead.
        // (nor do breaches cut anything here).
        recommendations.retain(|r| {
            !r.starts_with("best measured")
                && !r.starts_with("low confidence")
                && !r.contains("broke the target")
        });
        match choice {
            Some(c) => recommendations.push(format!(
                "choose QD {c}, or run with --iodepth auto to let rio follow the device"
            )),
            None => recommendations.push(
                "no depth met the target: lower the load per queue or raise the target".to_string(),
            ),
        }
    } else {
        recommendations.push(format!(
            "no p99 target given (--lat-target): the knee is QD {knee}; deeper buys latency, not IOPS"
        ));
    }
    Ok(ProbeReport {
        target_p99_us: target.map(|t| t.as_secs_f64() * 1e6),
        steps,
        choice,
        knee,
        slope: tuner.slope(),
        confidence: tuner.confidence(),
        recommendations,
    })
}

impl ProbeReport {
    /// The learned curve and the choice, for a terminal.
    pub fn to_human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>6} {:>12} {:>10} {:>10} {:>10}",
            "QD", "IOPS", "mean us", "p50 us", "p99 us"
        );
        for st in &self.steps {
            let mark = match self.target_p99_us {
                Some(t) if st.p99_us > t => "  over target",
                _ => "",
            };
            let _ = writeln!(
                s,
                "{:>6} {:>12.0} {:>10.1} {:>10.1} {:>10.1}{mark}{}",
                st.qd,
                st.iops,
                st.mean_us,
                st.p50_us,
                st.p99_us,
                if Some(st.qd) == self.choice {
                    "  <- choice"
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            s,
            "knee: QD {}; latency slope at the deep end {:.2} (0: depth is free, 1: saturated), confidence {:.2}",
            self.knee, self.slope, self.confidence
        );
        for r in &self.recommendations {
            let _ = writeln!(s, "  - {r}");
        }
        s
    }
}
