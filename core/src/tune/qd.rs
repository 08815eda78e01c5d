//! Queue-depth control under a p99 target.
//!
//! Each control window (100 ms) the controller is told the depth that was in force, and the
//! p99 and mean latency and the IOPS measured at it. Two RLS models learn the device's curve
//! in log-log space, `ln p99 ≈ a + b·l` and `ln mean ≈ c + d·l` with `l = log2(qd)`. The
//! fit is local, not global: old windows are forgotten (λ = 0.9 per window) and the
//! controller only trusts it within ×1.5 of the depths it saw lately. Locally the slope `b`
//! is the device's state — 0 below the knee, 1 where latency grows in step with depth. (A
//! quadratic in `l` fits a whole knee better but, fed only dithered samples near one depth,
//! its curvature term wanders and its extrapolations go wild.) Throughput is predicted by
//! Little's law, `IOPS = qd / mean latency`, which keeps it rising-then-saturating (a
//! quadratic fitted to IOPS directly invents a peak wherever the samples bunch up).
//! One tuner serves one operation class (block size and read mix) on one queue or device.
//!
//! The decision, in order:
//! 1. **Breach** — the measured p99 is above target: cut the depth at once, in proportion to
//!    the overshoot, by 15% to 50% (blk-wbt's reaction), and note it. Nothing is
//!    trusted over a measurement.
//! 2. **Probe** — until the first breach or saturation, double the depth each window while
//!    p99 stays under 70% of target and IOPS still grows by 3% or more (TCP slow start); this
//!    also gives the models a spread of depths to learn from.
//! 3. **Track** — pick the depth that maximises predicted IOPS while predicted p99, padded by
//!    its standard error, stays under 90% of target; among depths within 1% of the best IOPS,
//!    the shallowest (the same work at lower latency). The move toward the choice is
//!    rate-limited (×1.5 per window), and at the choice the depth is dithered ±8% on
//!    alternate windows so the model keeps seeing variation.
//!
//! The submission batch (commands per doorbell or `io_uring_enter`) is learned the same way,
//! by measurement: two arms, `1` (every command goes out at once) and `clamp(qd / 4, 1, 32)`
//! (amortise the doorbell or syscall over a quarter of the depth). Each window's IOPS is
//! scored against what the latency model expects at that depth, so the comparison is fair
//! across dithered depths; the better-scoring arm is used, and the other is tried one window
//! in eight. (Measured: on io_uring over a virtio disk the batch of 8 costs 8% IOPS at QD 32;
//! on the polled driver a doorbell per batch is what makes QD 128 reach 14M IOPS — no one
//! fixed rule fits both.)

use std::time::Duration;

use super::rls::Rls;

/// Bounds and target of one controller.
#[derive(Clone, Copy, Debug)]
pub struct QdConfig {
    pub min: u32,
    pub max: u32,
    pub target_p99: Duration,
    /// Depth to start from.
    pub initial: u32,
    /// RLS forgetting factor per window (0.9: a window's weight halves in about 7 windows).
    pub lambda: f64,
    /// Windows with fewer completions than this carry no usable p99 and are skipped.
    pub min_samples: u64,
}

impl QdConfig {
    pub fn new(target_p99: Duration, max: u32) -> QdConfig {
        QdConfig {
            min: 1,
            max: max.max(1),
            target_p99,
            initial: 1,
            lambda: 0.9,
            min_samples: 20,
        }
    }
}

/// Why a depth was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Reason {
    /// Too few completions in the window to judge; depth kept.
    Insufficient,
    /// Measured p99 above target: cut.
    Breach,
    /// Growing while far under target.
    Probe,
    /// The model's choice.
    Model,
    /// Dithering around the model's choice.
    Dither,
}

/// One decision, with everything that went into it.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Decision {
    /// Depth in force during the window just measured.
    pub qd_was: u32,
    /// Depth for the next window.
    pub qd: u32,
    /// Submission batch for the next window.
    pub batch: u32,
    pub reason: Reason,
    pub measured_p99_us: f64,
    pub measured_iops: f64,
    /// The model's best depth (before rate limit and dither), and what it predicts there.
    pub best_qd: u32,
    pub predicted_p99_us: f64,
    pub predicted_iops: f64,
    /// 0..1: how settled the latency model is.
    pub confidence: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Probe,
    Track,
}

/// The controller for one queue (or one device).
#[derive(Clone, Debug)]
pub struct QdTuner {
    cfg: QdConfig,
    lat: Rls,
    mean: Rls,
    phase: Phase,
    cur: u32,
    /// The depth the model chose last (dither is applied around it).
    aim: u32,
    dither_up: bool,
    /// Shallowest and deepest depths seen, decaying toward recent ones so old excursions stop
    /// widening the search.
    seen_lo: f64,
    seen_hi: f64,
    last_iops: f64,
    breaches: u64,
    windows: u64,
    last: Option<Decision>,
    arms: BatchArms,
    /// What was measured at each depth used: smoothed p99 (µs), IOPS, windows. The model is
    /// local; this table is the curve as seen, for reports and advice.
    seen: std::collections::BTreeMap<u32, Seen>,
}

/// Measurements at one depth (exponentially smoothed, newest weighted 1/4).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Seen {
    pub p99_us: f64,
    pub iops: f64,
    pub windows: u64,
}

fn feat(qd: u32) -> [f64; 2] {
    [1.0, (qd.max(1) as f64).log2()]
}

/// The large submission batch for a depth (arm 1).
pub fn batch_for(qd: u32) -> u32 {
    (qd / 4).clamp(1, 32)
}

/// Window-by-window choice between the two batch arms.
#[derive(Clone, Copy, Debug, Default)]
struct BatchArms {
    /// Smoothed IOPS / model-expected IOPS per arm, and windows scored.
    score: [f64; 2],
    n: [u64; 2],
    /// Arm in force for the window being measured.
    used: usize,
    /// Windows since the last exploration.
    since: u32,
}

impl BatchArms {
    fn learn(&mut self, ratio: f64) {
        if !ratio.is_finite() || ratio <= 0.0 {
            return;
        }
        let a = self.used;
        self.score[a] = if self.n[a] == 0 {
            ratio
        } else {
            self.score[a] + 0.25 * (ratio - self.score[a])
        };
        self.n[a] += 1;
    }

    /// Picks the arm for the next window.
    fn next(&mut self) -> usize {
        let best = if self.n[0] >= 2 && self.n[1] >= 2 {
            usize::from(self.score[1] > self.score[0] * 1.01)
        } else {
            0
        };
        self.since += 1;
        self.used = if self.since >= 8 || (self.n[1 - best] < 2 && self.since >= 2) {
            self.since = 0;
            1 - best
        } else {
            best
        };
        self.used
    }

    fn batch(&self, qd: u32) -> u32 {
        if self.used == 0 { 1 } else { batch_for(qd) }
    }
}

impl QdTuner {
    pub fn new(cfg: QdConfig) -> QdTuner {
        let mut cfg = cfg;
        cfg.min = cfg.min.max(1);
        cfg.max = cfg.max.max(cfg.min);
        let cur = cfg.initial.clamp(cfg.min, cfg.max);
        QdTuner {
            lat: Rls::new(2, cfg.lambda, 1e3),
            mean: Rls::new(2, cfg.lambda, 1e3),
            phase: Phase::Probe,
            cur,
            aim: cur,
            dither_up: true,
            seen_lo: cur as f64,
            seen_hi: cur as f64,
            last_iops: 0.0,
            breaches: 0,
            windows: 0,
            last: None,
            arms: BatchArms::default(),
            seen: Default::default(),
            cfg,
        }
    }

    /// Depth to use now.
    pub fn depth(&self) -> u32 {
        self.cur
    }

    /// Submission batch to use now.
    pub fn batch(&self) -> u32 {
        self.arms.batch(self.cur)
    }

    pub fn config(&self) -> &QdConfig {
        &self.cfg
    }

    /// Windows in which the measured p99 exceeded the target.
    pub fn breaches(&self) -> u64 {
        self.breaches
    }

    pub fn last(&self) -> Option<&Decision> {
        self.last.as_ref()
    }

    /// Predicted p99 (µs) and IOPS at `qd`, with the latency model's relative standard error.
    pub fn predict(&self, qd: u32) -> (f64, f64, f64) {
        let x = feat(qd);
        let (lp, se) = self.lat.predict(&x);
        let (lm, _) = self.mean.predict(&x);
        (lp.exp(), qd.max(1) as f64 / lm.exp() * 1e6, se)
    }

    /// The curve as measured: (qd, smoothed p99 µs, smoothed IOPS, windows), by depth.
    pub fn curve(&self) -> Vec<(u32, f64, f64, u64)> {
        self.seen
            .iter()
            .map(|(q, s)| (*q, s.p99_us, s.iops, s.windows))
            .collect()
    }

    /// Local slope of the latency curve, `d ln p99 / d log2 qd`: about 0 below the knee (depth
    /// is free), about 1 where latency grows in step with depth (the device is saturated).
    pub fn slope(&self) -> f64 {
        self.lat.theta()[1]
    }

    /// Confidence of the latency model (0..1).
    pub fn confidence(&self) -> f64 {
        // Residuals are in ln units: 0.1 ≈ 10% error.
        self.lat.confidence(0.1)
    }

    /// Learns from one window run at `qd_was` and returns the next depth. `p99_ns`,
    /// `mean_ns` and `iops` are what the window measured; `ios` how many completions it saw.
    pub fn observe(
        &mut self,
        qd_was: u32,
        p99_ns: u64,
        mean_ns: f64,
        iops: f64,
        ios: u64,
    ) -> Decision {
        self.windows += 1;
        let target_us = self.cfg.target_p99.as_secs_f64() * 1e6;
        let p99_us = p99_ns as f64 / 1000.0;
        let mut d = Decision {
            qd_was,
            qd: self.cur,
            batch: self.arms.batch(self.cur),
            reason: Reason::Insufficient,
            measured_p99_us: p99_us,
            measured_iops: iops,
            best_qd: self.aim,
            predicted_p99_us: 0.0,
            predicted_iops: 0.0,
            confidence: self.confidence(),
        };
        // A window with too few completions says little about p99 — unless even those few
        // broke the target, which is a fact.
        if ios < self.cfg.min_samples && !(ios > 0 && p99_us > target_us) {
            self.last = Some(d);
            return d;
        }
        if ios >= self.cfg.min_samples && p99_us > 0.0 && mean_ns > 0.0 && iops.is_finite() {
            let x = feat(qd_was);
            if self.mean.updates() >= 4 {
                let expect = self.predict(qd_was).1;
                self.arms.learn(iops / expect);
            }
            self.lat.update(&x, p99_us.ln());
            self.mean.update(&x, (mean_ns / 1000.0).ln());
            let e = self.seen.entry(qd_was).or_insert(Seen {
                p99_us,
                iops,
                windows: 0,
            });
            e.p99_us += 0.25 * (p99_us - e.p99_us);
            e.iops += 0.25 * (iops - e.iops);
            e.windows += 1;
        }
        self.seen_hi = (self.seen_hi * 0.97).max(qd_was as f64);
        self.seen_lo = (self.seen_lo * 1.03).min(qd_was as f64);
        let next = if p99_us > target_us {
            self.breaches += 1;
            self.phase = Phase::Track;
            d.reason = Reason::Breach;
            // Cut in proportion to the overshoot: by 15% at least, half at most.
            let f = (0.9 * target_us / p99_us).clamp(0.5, 0.85);
            let n = ((qd_was as f64 * f).floor() as u32).max(self.cfg.min);
            self.aim = n;
            n
        } else if self.phase == Phase::Probe {
            let gain = if self.last_iops > 0.0 {
                iops / self.last_iops
            } else {
                f64::INFINITY
            };
            if p99_us < 0.7 * target_us && gain >= 1.03 && qd_was < self.cfg.max {
                d.reason = Reason::Probe;
                let n = qd_was.saturating_mul(2).min(self.cfg.max);
                self.aim = n;
                n
            } else {
                self.phase = Phase::Track;
                self.track(qd_was, target_us, &mut d)
            }
        } else {
            self.track(qd_was, target_us, &mut d)
        };
        self.last_iops = iops;
        self.cur = next.clamp(self.cfg.min, self.cfg.max);
        d.qd = self.cur;
        // Only while tracking: the probe's doubling would make every arm look the same.
        if self.phase == Phase::Track {
            self.arms.next();
        }
        d.batch = self.arms.batch(self.cur);
        d.confidence = self.confidence();
        d.best_qd = self.aim;
        if d.predicted_p99_us == 0.0 {
            let (p, i, _) = self.predict(d.best_qd.max(1));
            d.predicted_p99_us = p;
            d.predicted_iops = i;
        }
        self.last = Some(d);
        d
    }

    fn track(&mut self, qd_was: u32, target_us: f64, d: &mut Decision) -> u32 {
        // Candidates: the depths seen lately, widened by ×1.5 each way. A local fit says little
        // far from its data (it once put QD 1 at 2 µs after a stretch of dithering at 20).
        let lo = ((self.seen_lo / 1.5).floor() as u32).clamp(self.cfg.min, self.cfg.max);
        let hi = ((self.seen_hi * 1.5).ceil() as u32).clamp(lo, self.cfg.max);
        // Aim at 90% of target: the up-dither and the window-to-window spread need room.
        let limit = 0.9 * target_us;
        let mut best: Option<(u32, f64, f64)> = None;
        let mut feasible: Vec<(u32, f64, f64)> = Vec::with_capacity(128);
        let mut q = lo;
        while q <= hi {
            let (p, i, se) = self.predict(q);
            // Pad by the standard error (ln units, so a factor), capped: the error includes
            // the curve's misfit, and an uncapped pad would pin the depth low for good.
            if p * se.min(0.1).exp() <= limit && i.is_finite() {
                feasible.push((q, p, i));
                if best.is_none_or(|b| i > b.2) {
                    best = Some((q, p, i));
                }
            }
            // Every depth up to 64, then a ×1.0625 grid: the curve is smooth there.
            q = if q < 64 { q + 1 } else { q + q / 16 };
        }
        let Some(best) = best else {
            // Nothing predicted feasible in reach (the target is near or below the device's
            // floor, or the model is unsure): the measurement was within target, so step down.
            d.reason = Reason::Model;
            self.aim = lo.min(qd_was.saturating_sub(1)).max(self.cfg.min);
            return self
                .aim
                .max((qd_was as f64 / 1.5).ceil() as u32)
                .min(qd_was);
        };
        // Among depths within 1% of the best throughput, the shallowest: the same work at
        // lower latency.
        let (aim, p, i) = feasible
            .iter()
            .copied()
            .find(|f| f.2 >= 0.99 * best.2)
            .unwrap_or(best);
        d.predicted_p99_us = p;
        d.predicted_iops = i;
        self.aim = aim;
        // Rate limit: at most ×1.5 (and at least ±1) per window from where we are.
        let up = ((qd_was as f64 * 1.5).floor() as u32).max(qd_was + 1);
        let down = ((qd_was as f64 / 1.5).ceil() as u32).min(qd_was.saturating_sub(1));
        let step = aim.clamp(down.max(self.cfg.min), up);
        if step != aim {
            d.reason = Reason::Model;
            return step;
        }
        // At the aim: dither ±8% (at least 1) on alternate windows.
        self.dither_up = !self.dither_up;
        let delta = ((aim as f64 * 0.08).round() as u32).max(1);
        d.reason = Reason::Dither;
        if self.dither_up {
            aim + delta
        } else {
            aim.saturating_sub(delta).max(self.cfg.min)
        }
    }
}

/// Advice from a tuner's measured curve and model, in words.
pub fn recommendations(t: &QdTuner) -> Vec<String> {
    let cfg = t.config();
    let target = cfg.target_p99.as_secs_f64() * 1e6;
    let mut out = Vec::new();
    if t.confidence() < 0.2 {
        out.push(format!(
            "low confidence ({:.2}): run longer before trusting the curve",
            t.confidence()
        ));
    }
    let curve = t.curve();
    let ok = curve.iter().filter(|c| c.1 <= target).max_by_key(|c| c.0);
    // The edge: the shallowest depth over target beyond the deepest one within it (a
    // transient breach at a shallower depth does not move it).
    let over = curve
        .iter()
        .filter(|c| c.1 > target && ok.is_none_or(|k| c.0 > k.0))
        .min_by_key(|c| c.0);
    match (ok, over) {
        (None, Some(o)) => out.push(format!(
            "p99 target {target:.0} µs unreachable on this device: even QD {} measured {:.0} µs",
            o.0, o.1
        )),
        (Some(k), Some(o)) => out.push(format!(
            "p99 target {target:.0} µs unreachable above QD {}: QD {} measured {:.0} µs",
            k.0, o.0, o.1
        )),
        (Some(k), None) if k.0 >= cfg.max => out.push(format!(
            "p99 stays under {target:.0} µs up to QD {} (the bound): raise the depth limit for more",
            k.0
        )),
        _ => {}
    }
    if let Some(best) = curve
        .iter()
        .filter(|c| c.1 <= target)
        .max_by(|a, b| a.2.total_cmp(&b.2))
    {
        out.push(format!(
            "best measured under target: {:.0} IOPS at QD {} (p99 {:.0} µs); now at QD {}",
            best.2,
            best.0,
            best.1,
            t.depth()
        ));
    }
    let slope = t.slope();
    if t.confidence() >= 0.2 {
        if slope > 0.7 {
            out.push(format!(
                "latency grows almost in step with depth here (slope {slope:.2}): the device is saturated, more depth buys latency, not IOPS"
            ));
        } else if slope < 0.2 {
            out.push(format!(
                "latency barely moves with depth here (slope {slope:.2}): depth is nearly free"
            ));
        }
    }
    if t.breaches() > 0 {
        out.push(format!(
            "{} window(s) broke the target; each cut the depth at once",
            t.breaches()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with a latency knee: `base + max(0, qd − knee) · per` (µs), throughput by
    /// Little's law.
    fn device(qd: u32, base: f64, knee: u32, per: f64) -> (u64, f64) {
        let lat = base + qd.saturating_sub(knee) as f64 * per;
        ((lat * 1000.0) as u64, qd as f64 / lat * 1e6)
    }

    fn feed(t: &mut QdTuner, qd: u32, p99: u64, iops: f64, ios: u64) -> Decision {
        // The model device has no spread: mean = p99.
        t.observe(qd, p99, p99 as f64, iops, ios)
    }

    fn run(t: &mut QdTuner, windows: usize, base: f64, knee: u32, per: f64) -> Vec<Decision> {
        (0..windows)
            .map(|_| {
                let qd = t.depth();
                let (p99, iops) = device(qd, base, knee, per);
                feed(t, qd, p99, iops, 1000)
            })
            .collect()
    }

    #[test]
    fn converges_under_the_target_near_the_best_depth() {
        // 50 µs + 4 µs per command past 8; target 200 µs → the deepest feasible depth is 45.
        let mut t = QdTuner::new(QdConfig::new(Duration::from_micros(200), 256));
        let ds = run(&mut t, 60, 50.0, 8, 4.0);
        let tail = &ds[20..];
        for d in tail {
            assert!(d.measured_p99_us <= 200.0 * 1.1, "{d:?}");
        }
        let best_iops = device(45, 50.0, 8, 4.0).1;
        let mean: f64 = tail.iter().map(|d| d.measured_iops).sum::<f64>() / tail.len() as f64;
        assert!(mean >= 0.95 * best_iops, "mean {mean} best {best_iops}");
        assert!(t.confidence() > 0.5);
    }

    #[test]
    fn never_leaves_its_bounds() {
        let mut cfg = QdConfig::new(Duration::from_micros(100), 48);
        cfg.min = 4;
        cfg.initial = 1;
        let mut t = QdTuner::new(cfg);
        assert_eq!(t.depth(), 4);
        // A device that is always over target, one that never is, and garbage in between.
        for i in 0..500u64 {
            let qd = t.depth();
            assert!((4..=48).contains(&qd), "depth {qd}");
            let (p99, iops) = match i % 5 {
                0 => (10_000_000, 10.0),
                1 => (1_000, 1e7),
                2 => (0, 0.0),
                3 => (u64::MAX / 2, f64::MAX),
                _ => device(qd, 20.0, 2, 3.0),
            };
            let d = feed(&mut t, qd, p99, iops, if i % 7 == 0 { 0 } else { 500 });
            assert!(
                (4..=48).contains(&d.qd) && (1..=32).contains(&d.batch),
                "{d:?}"
            );
        }
    }

    #[test]
    fn breach_cuts_at_once_and_relearns_a_changed_curve() {
        let mut t = QdTuner::new(QdConfig::new(Duration::from_micros(200), 256));
        run(&mut t, 40, 50.0, 8, 4.0);
        let before = t.depth();
        assert!(before >= 35, "settled at {before}");
        // The device slows: 8 µs per command past 4 → the feasible depth drops to 22.
        let ds = run(&mut t, 40, 50.0, 4, 8.0);
        assert_eq!(ds[0].reason, Reason::Breach);
        assert!(ds[0].qd <= before * 3 / 4);
        for d in &ds[20..] {
            assert!(d.qd_was <= 24 && d.measured_p99_us <= 220.0, "{d:?}");
        }
        let best = device(22, 50.0, 4, 8.0).1;
        let mean: f64 = ds[20..].iter().map(|d| d.measured_iops).sum::<f64>() / 20.0;
        assert!(mean >= 0.93 * best, "mean {mean} best {best}");
    }

    #[test]
    fn batch_arm_follows_the_measurement() {
        // A device where big batches cost 10% (the kernel path), then one where they gain
        // 10% (a doorbell that is expensive): the tuner settles on the better arm each time.
        for (gain, want_big) in [(0.9, false), (1.1, true)] {
            let mut t = QdTuner::new(QdConfig::new(Duration::from_micros(200), 256));
            let mut big = 0;
            for w in 0..200 {
                let qd = t.depth();
                let (p99, iops) = device(qd, 50.0, 8, 4.0);
                let f = if t.batch() > 1 { gain } else { 1.0 };
                feed(&mut t, qd, p99, iops * f, 1000);
                if w >= 100 && t.batch() > 1 {
                    big += 1;
                }
            }
            // Exploration keeps one window in eight on the other arm.
            if want_big {
                assert!(big >= 80, "gain {gain}: big batch in {big}/100 windows");
            } else {
                assert!(big <= 20, "gain {gain}: big batch in {big}/100 windows");
            }
        }
    }

    #[test]
    fn unreachable_target_goes_to_the_floor() {
        // The device's floor (80 µs) is above the target.
        let mut t = QdTuner::new(QdConfig::new(Duration::from_micros(50), 64));
        run(&mut t, 30, 80.0, 1, 10.0);
        assert_eq!(t.depth(), 1);
        assert!(t.breaches() > 0);
    }
}
