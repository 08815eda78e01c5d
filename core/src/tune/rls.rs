//! Recursive least squares with exponential forgetting.
//!
//! Estimates `y ≈ θᵀx` one observation at a time (Ljung's form):
//!
//! ```text
//! k = P x / (λ + xᵀ P x)        gain
//! e = y − θᵀ x                  a-priori error
//! θ ← θ + k e
//! P ← (P − k xᵀ P) / λ
//! ```
//!
//! `λ < 1` forgets: an observation's weight halves every `ln 2 / −ln λ` updates, so the
//! estimate follows a device whose curve moves (a write cliff, background work). Forgetting
//! has a known failure: while the input does not vary, `P` grows by `1/λ` per update in the
//! directions nothing excites ("covariance wind-up"), and the next informative sample then
//! swings θ wildly. Two guards keep it bounded over millions of updates:
//! - `P` is re-symmetrised after each update (rounding otherwise drifts it asymmetric and
//!   eventually indefinite);
//! - its trace is capped: when it exceeds `max_trace`, `P` is scaled down to it.
//!
//! The residual variance is tracked with the same forgetting, which gives each prediction a
//! standard error and the estimate a confidence figure.

use ndarray::{Array1, Array2};

/// An RLS estimator over `n` features.
#[derive(Clone, Debug)]
pub struct Rls {
    theta: Array1<f64>,
    p: Array2<f64>,
    lambda: f64,
    p0: f64,
    max_trace: f64,
    /// Forgetting-weighted mean of squared a-priori errors, and the weight behind it.
    err2: f64,
    weight: f64,
    updates: u64,
}

impl Rls {
    /// `n` features, forgetting factor `lambda` (0.9..=1), initial covariance `p0 · I` (large:
    /// the prior is weak).
    pub fn new(n: usize, lambda: f64, p0: f64) -> Rls {
        let lambda = lambda.clamp(0.5, 1.0);
        Rls {
            theta: Array1::zeros(n),
            p: Array2::eye(n) * p0,
            lambda,
            p0,
            max_trace: p0 * n as f64,
            err2: 0.0,
            weight: 0.0,
            updates: 0,
        }
    }

    /// Number of updates taken.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The coefficient estimate.
    pub fn theta(&self) -> &Array1<f64> {
        &self.theta
    }

    /// Trace of the covariance (a scale of how unsure the estimate is).
    pub fn trace(&self) -> f64 {
        self.p.diag().sum()
    }

    /// Takes one observation. Non-finite inputs are ignored (returns false): one bad sample
    /// must not poison the estimate.
    pub fn update(&mut self, x: &[f64], y: f64) -> bool {
        if x.len() != self.theta.len() || !y.is_finite() || x.iter().any(|v| !v.is_finite()) {
            return false;
        }
        let x = Array1::from(x.to_vec());
        let px = self.p.dot(&x);
        let denom = self.lambda + x.dot(&px);
        if !(denom.is_finite() && denom > 0.0) {
            self.reset_covariance();
            return false;
        }
        let k = &px / denom;
        let e = y - self.theta.dot(&x);
        self.theta.scaled_add(e, &k);
        // P ← (P − k (Px)ᵀ) / λ, using P's symmetry: xᵀP = (Px)ᵀ.
        let n = k.len();
        for i in 0..n {
            for j in 0..n {
                self.p[[i, j]] = (self.p[[i, j]] - k[i] * px[j]) / self.lambda;
            }
        }
        for i in 0..n {
            for j in (i + 1)..n {
                let m = 0.5 * (self.p[[i, j]] + self.p[[j, i]]);
                self.p[[i, j]] = m;
                self.p[[j, i]] = m;
            }
            // Rounding can push a variance to zero or below; keep it a covariance.
            if self.p[[i, i]].is_nan() || self.p[[i, i]] <= 1e-12 {
                self.p[[i, i]] = 1e-12;
            }
        }
        let tr = self.trace();
        if !tr.is_finite() {
            self.reset_covariance();
        } else if tr > self.max_trace {
            self.p *= self.max_trace / tr;
        }
        self.err2 = self.lambda * self.err2 + e * e;
        self.weight = self.lambda * self.weight + 1.0;
        self.updates += 1;
        true
    }

    fn reset_covariance(&mut self) {
        self.p = Array2::eye(self.theta.len()) * self.p0;
    }

    /// Prediction at `x` and its standard error (residual spread plus parameter
    /// uncertainty). Before any update the error is infinite.
    pub fn predict(&self, x: &[f64]) -> (f64, f64) {
        let x = Array1::from(x.to_vec());
        let y = self.theta.dot(&x);
        if self.weight < 1.0 {
            return (y, f64::INFINITY);
        }
        let s2 = self.err2 / self.weight;
        let xpx = x.dot(&self.p.dot(&x)).max(0.0);
        (y, (s2 * (1.0 + xpx)).sqrt())
    }

    /// Confidence in `[0, 1]`: how far the estimate has settled. 0 before the model has seen
    /// enough samples (twice the features), then `1 / (1 + rms residual / scale)`.
    pub fn confidence(&self, scale: f64) -> f64 {
        if self.updates < 2 * self.theta.len() as u64 || self.weight < 1.0 {
            return 0.0;
        }
        let rms = (self.err2 / self.weight).sqrt();
        1.0 / (1.0 + rms / scale.abs().max(1e-12))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn noise(r: &mut Rng, amp: f64) -> f64 {
        (r.below(2_000_001) as f64 / 1_000_000.0 - 1.0) * amp
    }

    #[test]
    fn recovers_known_coefficients_within_5_percent() {
        let truth = [3.0, -1.5, 0.25];
        let mut m = Rls::new(3, 0.995, 1e4);
        let mut r = Rng::new(7);
        for _ in 0..2000 {
            let l = r.below(9) as f64;
            let x = [1.0, l, l * l];
            let y = truth[0] + truth[1] * l + truth[2] * l * l + noise(&mut r, 0.2);
            assert!(m.update(&x, y));
        }
        for (i, t) in truth.iter().enumerate() {
            let got = m.theta()[i];
            assert!(
                ((got - t) / t).abs() < 0.05,
                "coefficient {i}: got {got}, want {t}"
            );
        }
        let (y, se) = m.predict(&[1.0, 4.0, 16.0]);
        assert!((y - 1.0).abs() < 0.05, "prediction {y}");
        assert!(se > 0.0 && se < 0.5, "standard error {se}");
        assert!(m.confidence(1.0) > 0.8);
    }

    #[test]
    fn forgets_after_the_curve_changes() {
        let mut m = Rls::new(2, 0.98, 1e4);
        let mut r = Rng::new(11);
        let mut feed = |m: &mut Rls, a: f64, b: f64, n: usize| {
            for _ in 0..n {
                let q = r.below(64) as f64;
                m.update(&[1.0, q], a + b * q + noise(&mut r, 0.01));
            }
        };
        feed(&mut m, 10.0, 2.0, 3000);
        assert!((m.theta()[1] - 2.0).abs() < 0.02);
        // The device changes: the slope triples. Within a few forgetting horizons (1/(1-λ) =
        // 50 samples) the old curve is gone.
        feed(&mut m, 10.0, 6.0, 300);
        assert!(
            (m.theta()[1] - 6.0).abs() / 6.0 < 0.05,
            "slope {}",
            m.theta()[1]
        );
        assert!((m.theta()[0] - 10.0).abs() / 10.0 < 0.05);
        // Without forgetting the estimate stays a blend of both curves.
        let mut keep = Rls::new(2, 1.0, 1e4);
        feed(&mut keep, 10.0, 2.0, 3000);
        feed(&mut keep, 10.0, 6.0, 300);
        assert!(keep.theta()[1] < 3.0, "λ=1 slope {}", keep.theta()[1]);
    }

    #[test]
    fn stable_over_a_million_updates_without_excitation() {
        // The wind-up case: the input is constant for a long stretch, then moves. Covariance
        // stays bounded and symmetric, and the estimate stays sane.
        let mut m = Rls::new(3, 0.95, 100.0);
        let n = if cfg!(debug_assertions) {
            200_000
        } else {
            1_000_000
        };
        let mut r = Rng::new(3);
        for i in 0..n {
            let l = if i % 100_000 < 99_000 {
                3.0
            } else {
                r.below(9) as f64
            };
            let y = 2.0 + 0.5 * l + noise(&mut r, 0.05);
            m.update(&[1.0, l, l * l], y);
            if i % 10_000 == 0 {
                let tr = m.trace();
                assert!(tr.is_finite() && tr <= 300.0 + 1e-6, "trace {tr} at {i}");
            }
        }
        for i in 0..3 {
            for j in 0..3 {
                assert_eq!(m.p[[i, j]], m.p[[j, i]]);
            }
            assert!(m.p[[i, i]] > 0.0);
        }
        let (y, _) = m.predict(&[1.0, 3.0, 9.0]);
        assert!((y - 3.5).abs() < 0.05, "prediction {y}");
        assert_eq!(m.updates(), n);
    }

    #[test]
    fn bad_samples_are_refused() {
        let mut m = Rls::new(2, 0.99, 10.0);
        assert!(!m.update(&[1.0, f64::NAN], 1.0));
        assert!(!m.update(&[1.0, 2.0], f64::INFINITY));
        assert!(!m.update(&[1.0], 1.0));
        assert_eq!(m.updates(), 0);
        assert_eq!(m.predict(&[1.0, 1.0]).1, f64::INFINITY);
        assert_eq!(m.confidence(1.0), 0.0);
    }
}
