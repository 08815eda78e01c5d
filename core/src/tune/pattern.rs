//! Access-pattern classification of one stream (a file, or a region of LBAs).
//!
//! Leap's majority vote, over the last [`WINDOW`] accesses:
//! - a vote for **sequential** when an access starts where the previous one ended;
//! - otherwise a vote for the offset delta from the previous access's start: if one delta
//!   holds the majority, the stream is **strided** by it (a backwards scan is a negative
//!   stride);
//! - with no spatial majority the stream is **random**, or **bursty** when it is also uneven
//!   in time: the inter-arrival gaps' coefficient of variation is above 1.5 (requests come in
//!   clumps separated by idle time).
//!
//! The vote needs half the window plus one, so a few stray accesses in a scan do not flip it.

use std::time::Instant;

/// Accesses the vote looks at.
pub const WINDOW: usize = 16;

/// What a stream looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Pattern {
    /// Too few accesses yet.
    Unknown,
    Sequential,
    /// Each access starts this many bytes after the previous one's start.
    Strided(i64),
    Random,
    Bursty,
}

impl Pattern {
    /// Whether reading ahead can pay off.
    pub fn predictable(self) -> bool {
        matches!(self, Pattern::Sequential | Pattern::Strided(_))
    }
}

/// One vote: sequential, or a start-to-start delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vote {
    Seq,
    Delta(i64),
}

/// The classifier of one stream.
#[derive(Clone, Debug)]
pub struct Classifier {
    votes: [Vote; WINDOW],
    gaps: [f64; WINDOW],
    n: usize,
    at: usize,
    last: Option<(u64, u64, Instant)>,
    pattern: Pattern,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier {
            votes: [Vote::Delta(0); WINDOW],
            gaps: [0.0; WINDOW],
            n: 0,
            at: 0,
            last: None,
            pattern: Pattern::Unknown,
        }
    }
}

impl Classifier {
    pub fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// Takes an access of `len` bytes at `offset`, made at `now`; returns the new verdict.
    pub fn observe(&mut self, offset: u64, len: u64, now: Instant) -> Pattern {
        if let Some((off, l, t)) = self.last.replace((offset, len, now)) {
            let vote = if off.checked_add(l) == Some(offset) {
                Vote::Seq
            } else {
                Vote::Delta(
                    (offset as i128 - off as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                )
            };
            self.votes[self.at] = vote;
            self.gaps[self.at] = now.saturating_duration_since(t).as_secs_f64();
            self.at = (self.at + 1) % WINDOW;
            self.n = (self.n + 1).min(WINDOW);
            self.pattern = self.classify();
        }
        self.pattern
    }

    fn classify(&self) -> Pattern {
        if self.n < 4 {
            return Pattern::Unknown;
        }
        let votes = &self.votes[..self.n];
        let need = self.n / 2 + 1;
        // Boyer–Moore majority candidate, then a count to confirm it.
        let mut cand = votes[0];
        let mut c = 0usize;
        for v in votes {
            if c == 0 {
                cand = *v;
                c = 1;
            } else if *v == cand {
                c += 1;
            } else {
                c -= 1;
            }
        }
        if votes.iter().filter(|v| **v == cand).count() >= need {
            return match cand {
                Vote::Seq => Pattern::Sequential,
                Vote::Delta(d) => Pattern::Strided(d),
            };
        }
        let gaps = &self.gaps[..self.n];
        let mean = gaps.iter().sum::<f64>() / self.n as f64;
        let var = gaps.iter().map(|g| (g - mean) * (g - mean)).sum::<f64>() / self.n as f64;
        if mean > 0.0 && var.sqrt() / mean > 1.5 {
            Pattern::Bursty
        } else {
            Pattern::Random
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use std::time::Duration;

    /// An access: offset, length, time from the trace's start.
    type Access = (u64, u64, Duration);

    /// Feeds a trace; returns the share of verdicts after warm-up that equal `want`.
    fn accuracy(trace: &[Access], want: fn(Pattern) -> bool) -> f64 {
        let t0 = Instant::now();
        let mut c = Classifier::default();
        let mut good = 0;
        let mut total = 0;
        for (i, (off, len, at)) in trace.iter().enumerate() {
            let p = c.observe(*off, *len, t0 + *at);
            if i >= WINDOW {
                total += 1;
                good += usize::from(want(p));
            }
        }
        good as f64 / total as f64
    }

    fn even(i: u64) -> Duration {
        Duration::from_micros(50 * i)
    }

    #[test]
    fn classifies_synthetic_traces() {
        let mut r = Rng::new(5);
        let n = 2000u64;
        let seq: Vec<_> = (0..n).map(|i| (i * 4096, 4096, even(i))).collect();
        // A sequential scan with one random access in ten.
        let noisy: Vec<_> = (0..n)
            .map(|i| {
                let off = if i % 10 == 9 {
                    r.below(1 << 20) * 4096
                } else {
                    i * 4096
                };
                (off, 4096, even(i))
            })
            .collect();
        let strided: Vec<_> = (0..n).map(|i| (i * 65536, 4096, even(i))).collect();
        let backwards: Vec<_> = (0..n).map(|i| ((n - i) * 8192, 4096, even(i))).collect();
        let random: Vec<_> = (0..n)
            .map(|i| (r.below(1 << 20) * 4096, 4096, even(i)))
            .collect();
        // Random offsets in clumps of 8 a microsecond apart, 10 ms between clumps.
        let bursty: Vec<_> = (0..n)
            .map(|i| {
                let at = Duration::from_millis(10 * (i / 8)) + Duration::from_micros(i % 8);
                (r.below(1 << 20) * 4096, 4096, at)
            })
            .collect();
        type Case<'a> = (&'a str, &'a [Access], fn(Pattern) -> bool, f64);
        let cases: [Case; 6] = [
            ("sequential", &seq, |p| p == Pattern::Sequential, 1.0),
            (
                "noisy sequential",
                &noisy,
                |p| p == Pattern::Sequential,
                0.99,
            ),
            ("strided", &strided, |p| p == Pattern::Strided(65536), 1.0),
            (
                "backwards",
                &backwards,
                |p| p == Pattern::Strided(-8192),
                1.0,
            ),
            ("random", &random, |p| p == Pattern::Random, 0.95),
            ("bursty", &bursty, |p| p == Pattern::Bursty, 0.95),
        ];
        for (name, trace, want, min) in cases {
            let a = accuracy(trace, want);
            assert!(a >= min, "{name}: accuracy {a:.3} < {min}");
        }
    }

    #[test]
    fn follows_a_change_of_pattern() {
        let t0 = Instant::now();
        let mut c = Classifier::default();
        let mut r = Rng::new(9);
        for i in 0..100u64 {
            c.observe(i * 4096, 4096, t0 + even(i));
        }
        assert_eq!(c.pattern(), Pattern::Sequential);
        for i in 100..100 + WINDOW as u64 {
            c.observe(r.below(1 << 30) * 4096, 4096, t0 + even(i));
        }
        assert_eq!(c.pattern(), Pattern::Random);
        assert!(!c.pattern().predictable());
        // Unknown until enough accesses; huge offsets do not overflow.
        let mut c = Classifier::default();
        assert_eq!(c.observe(u64::MAX - 10, 4096, t0), Pattern::Unknown);
        assert_eq!(c.observe(0, 4096, t0), Pattern::Unknown);
    }
}
