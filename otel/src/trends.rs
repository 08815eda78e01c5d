//! Trends over a trailing window: least-squares slope, its confidence (R²) and a direction.
//! [`super::Telemetry::performance_trends`] reports them per metric; the IOPS-drop alert
//! compares each interval against the trailing trend's prediction.

use std::collections::VecDeque;

use serde::Serialize;

/// Which way a metric is heading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Rising,
    Falling,
    Flat,
}

/// A metric's trend over the trailing window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trend {
    pub metric: &'static str,
    pub direction: Direction,
    /// Change per second, in the metric's unit.
    pub slope: f64,
    /// R² of the fit, 0..1: how much of the variation the line explains.
    pub confidence: f64,
    pub mean: f64,
    pub last: f64,
    pub samples: usize,
}

/// A trailing window of (time s, value) samples.
#[derive(Clone, Debug)]
pub struct TrendWindow {
    cap: usize,
    pts: VecDeque<(f64, f64)>,
}

/// Below this R² the direction is `Flat` whatever the slope.
const MIN_CONFIDENCE: f64 = 0.5;
/// A change over the window smaller than this fraction of the mean is `Flat`.
const MIN_CHANGE: f64 = 0.05;

impl TrendWindow {
    pub fn new(cap: usize) -> TrendWindow {
        TrendWindow {
            cap: cap.max(2),
            pts: VecDeque::new(),
        }
    }

    pub fn push(&mut self, t: f64, v: f64) {
        if !(t.is_finite() && v.is_finite()) {
            return;
        }
        if self.pts.len() == self.cap {
            self.pts.pop_front();
        }
        self.pts.push_back((t, v));
    }

    pub fn len(&self) -> usize {
        self.pts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pts.is_empty()
    }

    /// (slope, intercept, R², mean) of the least-squares line, or None under 2 samples.
    fn fit(&self) -> Option<(f64, f64, f64, f64)> {
        let n = self.pts.len() as f64;
        if self.pts.len() < 2 {
            return None;
        }
        let mt = self.pts.iter().map(|p| p.0).sum::<f64>() / n;
        let mv = self.pts.iter().map(|p| p.1).sum::<f64>() / n;
        let (mut stt, mut stv, mut svv) = (0.0, 0.0, 0.0);
        for &(t, v) in &self.pts {
            stt += (t - mt) * (t - mt);
            stv += (t - mt) * (v - mv);
            svv += (v - mv) * (v - mv);
        }
        if stt <= 0.0 {
            return Some((0.0, mv, 0.0, mv));
        }
        let slope = stv / stt;
        let r2 = if svv > 0.0 {
            (stv * stv / (stt * svv)).clamp(0.0, 1.0)
        } else {
            // A constant series: the flat line explains it entirely.
            1.0
        };
        Some((slope, mv - slope * mt, r2, mv))
    }

    /// The trend of `metric`, or None under 2 samples.
    pub fn trend(&self, metric: &'static str) -> Option<Trend> {
        let (slope, _, r2, mean) = self.fit()?;
        let span = self.pts.back()?.0 - self.pts.front()?.0;
        let change = slope * span;
        let direction = if r2 < MIN_CONFIDENCE || change.abs() < MIN_CHANGE * mean.abs() {
            Direction::Flat
        } else if slope > 0.0 {
            Direction::Rising
        } else {
            Direction::Falling
        };
        Some(Trend {
            metric,
            direction,
            slope,
            confidence: r2,
            mean,
            last: self.pts.back()?.1,
            samples: self.pts.len(),
        })
    }

    /// What the trailing trend expects at time `t`: the fitted line when it explains the data
    /// (R² ≥ 0.5), else the window's mean.
    pub fn predict(&self, t: f64) -> Option<f64> {
        let (slope, icpt, r2, mean) = self.fit()?;
        Some(if r2 >= MIN_CONFIDENCE {
            slope * t + icpt
        } else {
            mean
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rising_falling_flat() {
        let mut w = TrendWindow::new(10);
        assert!(w.trend("x").is_none());
        for i in 0..10 {
            w.push(i as f64, 100.0 + 10.0 * i as f64);
        }
        let t = w.trend("x").unwrap();
        assert_eq!(t.direction, Direction::Rising);
        assert!((t.slope - 10.0).abs() < 1e-9 && t.confidence > 0.99);
        assert!((w.predict(10.0).unwrap() - 200.0).abs() < 1e-6);

        let mut w = TrendWindow::new(5);
        for i in 0..20 {
            w.push(i as f64, 1000.0 - 50.0 * i as f64);
        }
        assert_eq!(w.len(), 5, "the window trails");
        assert_eq!(w.trend("x").unwrap().direction, Direction::Falling);

        let mut w = TrendWindow::new(10);
        for i in 0..10 {
            // Noise around a constant: low R², flat.
            w.push(i as f64, if i % 2 == 0 { 1000.0 } else { 1010.0 });
        }
        let t = w.trend("x").unwrap();
        assert_eq!(t.direction, Direction::Flat);
        assert!((w.predict(11.0).unwrap() - 1005.0).abs() < 1e-6);
        w.push(f64::NAN, 1.0);
        assert_eq!(w.len(), 10, "non-finite samples are ignored");
    }
}
