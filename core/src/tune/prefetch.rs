//! Read-ahead for one stream, generic over the handle of an in-flight read (`T`), so the
//! policy is tested without I/O.
//!
//! On each read the stream's [`Classifier`] votes. For a sequential or strided stream the
//! prefetcher asks for the next `distance` reads along the stride (each the size of the
//! current read) that are not already cached, within a byte budget; the caller issues them
//! and hands back the handles. A later read that matches a cached `(offset, len)` takes the
//! handle instead of going to the device. For any other pattern nothing is read ahead and
//! the cache is dropped: a random stream pays only the classification.
//!
//! The distance adapts to what it buys, every [`ADAPT_EVERY`] predictable reads:
//! - **late hits** (the read found its prefetch still in flight) above 10% mean the device
//!   needs more lead: the distance doubles, up to the budget;
//! - **waste** (prefetched and then dropped unread) above 30% halves it;
//! - **latency gained**: the caller reports each read's latency. When, over 64+ reads of each
//!   kind in a predictable stretch, a hit is not at least 5% faster than a miss (a page cache already does the work),
//!   prefetch switches itself off for [`BACKOFF_READS`] reads and then tries again.

use std::time::Instant;

use super::pattern::{Classifier, Pattern};

/// Largest distance (reads ahead).
pub const MAX_DISTANCE: usize = 64;
/// Reads between distance adjustments.
pub const ADAPT_EVERY: u64 = 32;
/// Reads prefetch stays off after it was found not to pay.
pub const BACKOFF_READS: u64 = 1024;

/// Settings of a prefetcher.
#[derive(Clone, Copy, Debug)]
pub struct PrefetchConfig {
    pub enabled: bool,
    /// Bytes that may be cached or in flight ahead of the reader (at least one read ahead is
    /// always allowed, even when a single read is larger).
    pub budget: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enabled: true,
            budget: 8 << 20,
        }
    }
}

/// Counters, for reports and telemetry.
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PrefetchStats {
    pub reads: u64,
    /// Reads served by a finished prefetch, and by one still in flight.
    pub hits: u64,
    pub late_hits: u64,
    pub misses: u64,
    pub issued: u64,
    pub wasted: u64,
    /// Times prefetch switched itself off for not paying.
    pub backoffs: u64,
    pub distance: u32,
}

struct Entry<T> {
    offset: u64,
    len: u64,
    handle: T,
}

/// Smoothed latency (µs) with a sample count.
#[derive(Clone, Copy, Debug, Default)]
struct Ewma {
    v: f64,
    n: u64,
}

impl Ewma {
    fn add(&mut self, x: f64) {
        self.v = if self.n == 0 {
            x
        } else {
            self.v + 0.05 * (x - self.v)
        };
        self.n += 1;
    }
}

/// Reads the caller should issue ahead: `(offset, len)` pairs (a fixed array: planning does
/// not allocate).
pub struct Plan {
    ahead: [(u64, u64); MAX_DISTANCE],
    n: usize,
}

impl Plan {
    pub fn reads(&self) -> &[(u64, u64)] {
        &self.ahead[..self.n]
    }
}

/// The prefetcher of one stream.
pub struct Prefetcher<T> {
    cfg: PrefetchConfig,
    class: Classifier,
    entries: Vec<Entry<T>>,
    distance: u32,
    stats: PrefetchStats,
    hit_lat: Ewma,
    miss_lat: Ewma,
    off_until: u64,
    /// Since the last adjustment.
    late: u64,
    served: u64,
    issued: u64,
    wasted: u64,
    predictable_reads: u64,
}

impl<T> Prefetcher<T> {
    pub fn new(cfg: PrefetchConfig) -> Prefetcher<T> {
        Prefetcher {
            cfg,
            class: Classifier::default(),
            entries: Vec::with_capacity(MAX_DISTANCE),
            distance: 2,
            stats: PrefetchStats::default(),
            hit_lat: Ewma::default(),
            miss_lat: Ewma::default(),
            off_until: 0,
            late: 0,
            served: 0,
            issued: 0,
            wasted: 0,
            predictable_reads: 0,
        }
    }

    pub fn pattern(&self) -> Pattern {
        self.class.pattern()
    }

    pub fn stats(&self) -> PrefetchStats {
        PrefetchStats {
            distance: self.distance,
            ..self.stats
        }
    }

    /// Largest distance the budget allows for reads of `len` bytes.
    fn max_distance(&self, len: u64) -> u32 {
        ((self.cfg.budget / len.max(1)) as usize).clamp(1, MAX_DISTANCE) as u32
    }

    fn drop_all(&mut self) {
        let n = self.entries.len() as u64;
        self.entries.clear();
        self.wasted += n;
        self.stats.wasted += n;
    }

    /// A read of `len` bytes at `offset` of a stream `size` bytes long, made at `now`.
    /// Returns the handle of a prefetch that serves it (if any; `done` tells whether a handle
    /// has finished) and the reads to issue ahead.
    pub fn on_read(
        &mut self,
        offset: u64,
        len: u64,
        size: u64,
        now: Instant,
        done: impl Fn(&T) -> bool,
    ) -> (Option<T>, Plan) {
        let mut plan = Plan {
            ahead: [(0, 0); MAX_DISTANCE],
            n: 0,
        };
        self.stats.reads += 1;
        let pattern = self.class.observe(offset, len, now);
        let hit = self
            .entries
            .iter()
            .position(|e| e.offset == offset && e.len == len)
            .map(|i| self.entries.swap_remove(i).handle);
        match &hit {
            Some(h) if done(h) => {
                self.stats.hits += 1;
                self.served += 1;
            }
            Some(_) => {
                self.stats.late_hits += 1;
                self.late += 1;
                self.served += 1;
            }
            None => self.stats.misses += 1,
        }
        let stride = match pattern {
            Pattern::Sequential => len as i128,
            Pattern::Strided(d) => d as i128,
            _ => 0,
        };
        if !self.cfg.enabled || stride == 0 || self.stats.reads < self.off_until {
            self.drop_all();
            return (hit, plan);
        }
        self.predictable_reads += 1;
        if self.predictable_reads.is_multiple_of(ADAPT_EVERY) {
            self.adapt(len);
        }
        let distance = self.distance.min(self.max_distance(len)) as i128;
        // Keep only entries on the path ahead; the rest will not be read.
        let before = self.entries.len();
        self.entries.retain(|e| {
            let k = (e.offset as i128 - offset as i128) / stride;
            (e.offset as i128 - offset as i128) % stride == 0
                && k >= 1
                && k <= distance
                && e.len == len
        });
        let dropped = (before - self.entries.len()) as u64;
        self.wasted += dropped;
        self.stats.wasted += dropped;
        for k in 1..=distance {
            let o = offset as i128 + k * stride;
            if o < 0 || o + len as i128 > size as i128 {
                break;
            }
            let o = o as u64;
            if !self.entries.iter().any(|e| e.offset == o) && plan.n < MAX_DISTANCE {
                plan.ahead[plan.n] = (o, len);
                plan.n += 1;
            }
        }
        (hit, plan)
    }

    /// A read planned by [`on_read`](Self::on_read) was issued.
    pub fn insert(&mut self, offset: u64, len: u64, handle: T) {
        self.stats.issued += 1;
        self.issued += 1;
        self.entries.push(Entry {
            offset,
            len,
            handle,
        });
    }

    /// A write to `[offset, offset+len)`: cached reads overlapping it are stale.
    pub fn invalidate(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let before = self.entries.len();
        self.entries
            .retain(|e| e.offset.saturating_add(e.len) <= offset || e.offset >= end);
        let dropped = (before - self.entries.len()) as u64;
        self.stats.wasted += dropped;
        self.wasted += dropped;
    }

    /// Drops every cached read (e.g. while a write is in flight anywhere in the stream).
    pub fn clear(&mut self) {
        self.drop_all();
    }

    /// The latency of a finished read, and whether a prefetch served it.
    pub fn record_latency(&mut self, hit: bool, micros: f64) {
        // Only reads of a predictable stream say what prefetch gains: the misses of a random
        // stretch would set a bar that sequential hits are then measured against.
        if !self.class.pattern().predictable() {
            return;
        }
        if hit {
            self.hit_lat.add(micros);
        } else {
            self.miss_lat.add(micros);
        }
        if self.hit_lat.n >= 64 && self.miss_lat.n >= 64 && self.hit_lat.v >= 0.95 * self.miss_lat.v
        {
            // Not paying: off for a while, then measure afresh.
            self.stats.backoffs += 1;
            self.off_until = self.stats.reads + BACKOFF_READS;
            self.hit_lat = Ewma::default();
            self.miss_lat = Ewma::default();
            self.drop_all();
        }
    }

    fn adapt(&mut self, len: u64) {
        let max = self.max_distance(len);
        let late = self.late as f64 / self.served.max(1) as f64;
        let waste = self.wasted as f64 / self.issued.max(1) as f64;
        if waste > 0.3 && self.distance > 1 {
            self.distance /= 2;
        } else if late > 0.1 && self.distance < max {
            self.distance = (self.distance * 2).min(max);
        }
        self.late = 0;
        self.served = 0;
        self.issued = 0;
        self.wasted = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use std::time::Duration;

    /// A handle that "finishes" when the simulated clock passes its due time.
    #[derive(Debug)]
    struct H {
        due: u64,
    }

    /// Replays reads against a device with `dev_us` latency and unlimited parallelism;
    /// returns (hits + late hits) / reads and the prefetcher.
    fn replay(offsets: &[u64], dev_us: u64, budget: u64) -> (f64, Prefetcher<H>) {
        let mut p = Prefetcher::new(PrefetchConfig {
            enabled: true,
            budget,
        });
        let t0 = Instant::now();
        let mut clock = 0u64;
        for off in offsets {
            let (hit, plan) = p.on_read(
                *off,
                4096,
                1 << 40,
                t0 + Duration::from_micros(clock),
                |h: &H| h.due <= clock,
            );
            let lat = match hit {
                Some(h) => h.due.saturating_sub(clock).max(1),
                None => dev_us,
            };
            p.record_latency(lat < dev_us, lat as f64);
            clock += lat;
            for &(o, l) in plan.reads() {
                p.insert(
                    o,
                    l,
                    H {
                        due: clock + dev_us,
                    },
                );
            }
        }
        let s = p.stats();
        ((s.hits + s.late_hits) as f64 / s.reads as f64, p)
    }

    #[test]
    fn sequential_stream_is_served_ahead_and_distance_grows() {
        let offs: Vec<u64> = (0..5000).map(|i| i * 4096).collect();
        let (served, p) = replay(&offs, 100, 8 << 20);
        assert!(served > 0.95, "served {served}");
        let s = p.stats();
        assert!(s.distance > 2, "distance stayed {}", s.distance);
        assert!(s.wasted < s.issued / 20, "{s:?}");
        assert_eq!(p.pattern(), Pattern::Sequential);
    }

    #[test]
    fn strided_stream_is_served_and_budget_bounds_the_distance() {
        let offs: Vec<u64> = (0..3000).map(|i| i * 3 * 4096).collect();
        let (served, p) = replay(&offs, 100, 16 << 10);
        assert!(served > 0.9, "served {served}");
        assert!(p.stats().distance <= 4, "{:?}", p.stats());
        assert!(p.entries.len() <= 4);
    }

    #[test]
    fn random_stream_prefetches_nothing() {
        let mut r = Rng::new(1);
        let offs: Vec<u64> = (0..3000).map(|_| r.below(1 << 20) * 4096).collect();
        let (_, p) = replay(&offs, 100, 8 << 20);
        let s = p.stats();
        // Only the first accesses, before the vote settles, may have been read ahead.
        assert!(s.issued <= 8, "{s:?}");
        assert!(p.entries.is_empty());
    }

    #[test]
    fn writes_invalidate_and_no_gain_backs_off() {
        let mut p: Prefetcher<u32> = Prefetcher::new(PrefetchConfig::default());
        let t0 = Instant::now();
        for i in 0..10u64 {
            let (_, plan) = p.on_read(i * 4096, 4096, 1 << 30, t0, |_| true);
            for &(o, l) in plan.reads() {
                p.insert(o, l, 0);
            }
        }
        assert!(!p.entries.is_empty());
        let next = p.entries.iter().map(|e| e.offset).min().unwrap();
        p.invalidate(next + 100, 10);
        assert!(p.entries.iter().all(|e| e.offset != next));
        // Hits no faster than misses: prefetch turns itself off.
        for _ in 0..64 {
            p.record_latency(true, 10.0);
            p.record_latency(false, 10.0);
        }
        assert_eq!(p.stats().backoffs, 1);
        let (_, plan) = p.on_read(10 * 4096, 4096, 1 << 30, t0, |_| true);
        assert!(plan.reads().is_empty());
    }
}
