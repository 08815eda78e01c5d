//! Alert rules, evaluated once per interval on what the interval measured. An alert fires
//! when its condition starts to hold (and again after it has cleared), as a `warn` event with
//! a suggested action; the caller counts it in `rio.alerts` by kind.

use serde::Serialize;

use super::trends::TrendWindow;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// p99 above the latency target for N intervals in a row.
    P99AboveTarget,
    /// Failed I/Os above a fraction of all I/Os in the interval.
    ErrorRate,
    /// IOPS fell well below what the trailing trend predicts.
    IopsDrop,
    /// A buffer pool class ran out (all buffers in use and gets missing).
    PoolExhaustion,
    /// An NVMe controller reported a SMART/health critical warning (an asynchronous event).
    DeviceHealth,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::P99AboveTarget,
        AlertKind::ErrorRate,
        AlertKind::IopsDrop,
        AlertKind::PoolExhaustion,
        AlertKind::DeviceHealth,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AlertKind::P99AboveTarget => "p99_above_target",
            AlertKind::ErrorRate => "error_rate",
            AlertKind::IopsDrop => "iops_drop",
            AlertKind::PoolExhaustion => "pool_exhaustion",
            AlertKind::DeviceHealth => "device_health",
        }
    }

    /// What an operator should try.
    pub fn action(self) -> &'static str {
        match self {
            AlertKind::P99AboveTarget => {
                "lower the queue depth (--iodepth, or --iodepth auto with --lat-target), or spread the load over more queues/devices"
            }
            AlertKind::ErrorRate => {
                "check the device's SMART/health (rio info) and the kernel log; the error.type attribute names the NVMe/OS status"
            }
            AlertKind::IopsDrop => {
                "look for contention (other jobs, CPU frequency, thermal throttling) or a device entering garbage collection"
            }
            AlertKind::PoolExhaustion => {
                "raise buffer_pool_bytes / pool_initial_buffers, or keep fewer buffers in flight per core"
            }
            AlertKind::DeviceHealth => {
                "read the device's SMART/health log (rio info): spare below threshold, temperature, reliability or read-only mode; cool, drain or replace the device"
            }
        }
    }
}

/// One raised alert.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    /// Interval end, seconds since telemetry started.
    pub t: f64,
    pub value: f64,
    pub threshold: f64,
    pub message: String,
}

/// Thresholds of the rules.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertRules {
    /// p99 target (µs); the p99 rule is off without one.
    pub p99_target_us: Option<u64>,
    /// Intervals in a row above the target before the alert fires.
    pub p99_intervals: u32,
    /// Failed fraction of the interval's I/Os.
    pub error_rate: f64,
    /// Fraction below the trend's prediction that counts as a drop.
    pub iops_drop: f64,
    /// Intervals of history the IOPS rule needs before it judges.
    pub min_history: usize,
    /// Trailing window of the trends, in intervals.
    pub trend_window: usize,
}

impl Default for AlertRules {
    fn default() -> Self {
        AlertRules {
            p99_target_us: None,
            p99_intervals: 3,
            error_rate: 0.001,
            iops_drop: 0.3,
            min_history: 5,
            trend_window: 30,
        }
    }
}

/// What one interval measured, all jobs together.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IntervalStats {
    /// Interval end, seconds since telemetry started.
    pub t: f64,
    pub ios: u64,
    pub errors: u64,
    pub iops: f64,
    /// 0 when no I/O completed.
    pub p99_us: f64,
    /// Pool classes exhausted in the interval, as (core, class size).
    pub pools_exhausted: Vec<(usize, usize)>,
    /// NVMe controllers with a SMART critical warning, as (name, warning bits).
    pub critical_warnings: Vec<(String, u8)>,
}

/// The rules' state across intervals.
#[derive(Debug)]
pub struct AlertEngine {
    rules: AlertRules,
    p99_streak: u32,
    active: [bool; 5],
    pub(crate) iops: TrendWindow,
    pub(crate) p99: TrendWindow,
}

impl AlertEngine {
    pub fn new(rules: AlertRules) -> AlertEngine {
        let w = rules.trend_window;
        AlertEngine {
            rules,
            p99_streak: 0,
            active: [false; 5],
            iops: TrendWindow::new(w),
            p99: TrendWindow::new(w),
        }
    }

    /// Judges one interval; returns the alerts that start firing now. Idle intervals (no I/O
    /// and no errors) feed no trend and fire nothing.
    pub fn evaluate(&mut self, s: &IntervalStats) -> Vec<Alert> {
        let mut out = Vec::new();
        let idle = s.ios == 0 && s.errors == 0;

        // p99 above target for N intervals.
        let (over, target) = match self.rules.p99_target_us {
            Some(t) if !idle && s.ios > 0 => (s.p99_us > t as f64, t as f64),
            Some(t) => (false, t as f64),
            None => (false, 0.0),
        };
        if !idle {
            self.p99_streak = if over { self.p99_streak + 1 } else { 0 };
        }
        let n = self.rules.p99_intervals.max(1);
        self.edge(
            &mut out,
            AlertKind::P99AboveTarget,
            self.p99_streak >= n,
            s,
            s.p99_us,
            target,
            format!(
                "p99 {:.1} us above the {target:.0} us target for {} intervals",
                s.p99_us, self.p99_streak
            ),
        );

        // Error rate.
        let total = s.ios + s.errors;
        let rate = if total > 0 {
            s.errors as f64 / total as f64
        } else {
            0.0
        };
        self.edge(
            &mut out,
            AlertKind::ErrorRate,
            s.errors > 0 && rate > self.rules.error_rate,
            s,
            rate,
            self.rules.error_rate,
            format!("{} of {total} I/Os failed ({:.3}%)", s.errors, rate * 100.0),
        );

        // IOPS against the trailing trend (judged before this interval joins it).
        if !idle {
            let expect = (self.iops.len() >= self.rules.min_history)
                .then(|| self.iops.predict(s.t))
                .flatten()
                .unwrap_or(0.0);
            let floor = expect * (1.0 - self.rules.iops_drop);
            let drop = expect > 0.0 && s.iops < floor;
            self.edge(
                &mut out,
                AlertKind::IopsDrop,
                drop,
                s,
                s.iops,
                floor,
                format!(
                    "{:.0} IOPS, {:.0}% below the trailing trend's {expect:.0}",
                    s.iops,
                    if expect > 0.0 {
                        100.0 * (1.0 - s.iops / expect)
                    } else {
                        0.0
                    }
                ),
            );
            // A drop does not join the trend, so a lasting drop keeps firing against the
            // level before it rather than becoming the new normal at once.
            if !drop {
                self.iops.push(s.t, s.iops);
            }
            if s.ios > 0 {
                self.p99.push(s.t, s.p99_us);
            }
        }

        // Pool exhaustion.
        let exhausted = !s.pools_exhausted.is_empty();
        let which = s
            .pools_exhausted
            .iter()
            .map(|(c, z)| format!("core {c} class {z} B"))
            .collect::<Vec<_>>()
            .join(", ");
        self.edge(
            &mut out,
            AlertKind::PoolExhaustion,
            exhausted,
            s,
            s.pools_exhausted.len() as f64,
            0.0,
            format!("buffer pool exhausted: {which}"),
        );

        // Device health (from the controllers' asynchronous events).
        let warned: Vec<String> = s
            .critical_warnings
            .iter()
            .filter(|(_, w)| *w != 0)
            .map(|(n, w)| format!("{n}: critical warning {w:#04x}"))
            .collect();
        self.edge(
            &mut out,
            AlertKind::DeviceHealth,
            !warned.is_empty(),
            s,
            warned.len() as f64,
            0.0,
            format!("NVMe health warning: {}", warned.join(", ")),
        );
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn edge(
        &mut self,
        out: &mut Vec<Alert>,
        kind: AlertKind,
        cond: bool,
        s: &IntervalStats,
        value: f64,
        threshold: f64,
        message: String,
    ) {
        let i = kind as usize;
        if cond && !self.active[i] {
            out.push(Alert {
                kind,
                t: s.t,
                value,
                threshold,
                message,
            });
        }
        self.active[i] = cond;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(t: f64, iops: f64, p99: f64) -> IntervalStats {
        IntervalStats {
            t,
            ios: iops as u64,
            errors: 0,
            iops,
            p99_us: p99,
            pools_exhausted: vec![],
            critical_warnings: vec![],
        }
    }

    fn kinds(a: &[Alert]) -> Vec<AlertKind> {
        a.iter().map(|a| a.kind).collect()
    }

    #[test]
    fn p99_fires_after_n_intervals_once_and_rearms() {
        let mut e = AlertEngine::new(AlertRules {
            p99_target_us: Some(100),
            p99_intervals: 3,
            ..AlertRules::default()
        });
        assert!(e.evaluate(&st(1.0, 1000.0, 150.0)).is_empty());
        assert!(e.evaluate(&st(2.0, 1000.0, 150.0)).is_empty());
        let a = e.evaluate(&st(3.0, 1000.0, 150.0));
        assert_eq!(kinds(&a), vec![AlertKind::P99AboveTarget]);
        assert_eq!(a[0].threshold, 100.0);
        assert!(e.evaluate(&st(4.0, 1000.0, 150.0)).is_empty(), "fires once");
        assert!(e.evaluate(&st(5.0, 1000.0, 50.0)).is_empty());
        for t in 6..8 {
            assert!(e.evaluate(&st(t as f64, 1000.0, 150.0)).is_empty());
        }
        assert_eq!(
            kinds(&e.evaluate(&st(8.0, 1000.0, 150.0))),
            vec![AlertKind::P99AboveTarget]
        );
    }

    #[test]
    fn no_target_no_p99_alert() {
        let mut e = AlertEngine::new(AlertRules::default());
        for t in 0..10 {
            assert!(e.evaluate(&st(t as f64, 1000.0, 1e6)).is_empty());
        }
    }

    #[test]
    fn error_rate() {
        let mut e = AlertEngine::new(AlertRules::default());
        let mut s = st(1.0, 10_000.0, 10.0);
        s.errors = 5; // 0.05% < 0.1%
        assert!(e.evaluate(&s).is_empty());
        s.errors = 50;
        let a = e.evaluate(&s);
        assert_eq!(kinds(&a), vec![AlertKind::ErrorRate]);
        assert!(a[0].message.contains("50 of 10050"));
        assert!(AlertKind::ErrorRate.action().contains("error.type"));
    }

    #[test]
    fn iops_drop_against_trend() {
        let mut e = AlertEngine::new(AlertRules::default());
        for t in 0..10 {
            // Steady with a little noise.
            let v = 100_000.0 + if t % 2 == 0 { 500.0 } else { -500.0 };
            assert!(e.evaluate(&st(t as f64, v, 10.0)).is_empty());
        }
        // 20% lower: within the 30% band.
        assert!(e.evaluate(&st(10.0, 80_000.0, 10.0)).is_empty());
        let a = e.evaluate(&st(11.0, 50_000.0, 10.0));
        assert_eq!(kinds(&a), vec![AlertKind::IopsDrop]);
        assert!(a[0].threshold > 60_000.0 && a[0].threshold < 80_000.0);
        // Still low: no repeat; recovery re-arms.
        assert!(e.evaluate(&st(12.0, 50_000.0, 10.0)).is_empty());
        assert!(e.evaluate(&st(13.0, 100_000.0, 10.0)).is_empty());
        assert_eq!(
            kinds(&e.evaluate(&st(14.0, 10_000.0, 10.0))),
            vec![AlertKind::IopsDrop]
        );
    }

    #[test]
    fn too_little_history_no_drop_alert() {
        let mut e = AlertEngine::new(AlertRules::default());
        e.evaluate(&st(0.0, 100_000.0, 10.0));
        e.evaluate(&st(1.0, 100_000.0, 10.0));
        assert!(e.evaluate(&st(2.0, 1_000.0, 10.0)).is_empty());
    }

    #[test]
    fn device_health_fires_on_a_critical_warning_once() {
        let mut e = AlertEngine::new(AlertRules::default());
        let mut s = st(1.0, 0.0, 0.0);
        s.critical_warnings = vec![("0000:00:04.0".into(), 0)];
        assert!(kinds(&e.evaluate(&s)).is_empty());
        s.critical_warnings[0].1 = 0x02;
        let a = e.evaluate(&s);
        assert_eq!(kinds(&a), vec![AlertKind::DeviceHealth]);
        assert!(a[0].message.contains("0x02"), "{}", a[0].message);
        assert!(e.evaluate(&s).is_empty(), "fires once while it lasts");
        s.critical_warnings[0].1 = 0;
        assert!(e.evaluate(&s).is_empty());
    }

    #[test]
    fn pool_exhaustion() {
        let mut e = AlertEngine::new(AlertRules::default());
        let mut s = st(1.0, 10.0, 10.0);
        s.pools_exhausted = vec![(0, 4096)];
        let a = e.evaluate(&s);
        assert_eq!(kinds(&a), vec![AlertKind::PoolExhaustion]);
        assert!(a[0].message.contains("core 0 class 4096 B"));
    }
}
