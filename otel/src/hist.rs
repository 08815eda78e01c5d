//! The exported latency histogram: explicit buckets, log-spaced over 250 ns .. 16 s and dense
//! around the latency target, filled from the hdrhistograms' recorded values (one update per
//! distinct value, not per I/O: the I/O path records nothing extra).

use hdrhistogram::Histogram;

/// Bucket bounds in nanoseconds: powers of two from 256 ns to 2^34 ns (~17 s), each split in
/// two (x1.5), plus target x {0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1, 1.05, 1.1, 1.2, 1.5, 2} when a
/// target is set.
pub fn bounds_ns(target_us: Option<u64>) -> Vec<u64> {
    let mut b = Vec::new();
    for e in 8..=34u32 {
        let p = 1u64 << e;
        b.push(p);
        b.push(p + p / 2);
    }
    if let Some(t) = target_us {
        let t = t.saturating_mul(1000) as f64;
        for f in [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.5, 2.0] {
            b.push((t * f) as u64);
        }
    }
    b.retain(|&x| x > 0);
    b.sort_unstable();
    b.dedup();
    b
}

/// Recorded values of an hdrhistogram as (value, count), smallest first: the compact form a
/// window crosses threads in (hundreds of entries, not the histogram's ~34k counters).
pub fn compact(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// A cumulative explicit-bucket histogram (OpenTelemetry's data point, values in ns).
#[derive(Clone, Debug, PartialEq)]
pub struct BucketHist {
    /// Upper bounds (inclusive), ns.
    pub bounds: Vec<u64>,
    /// `bounds.len() + 1` counts; the last is the overflow bucket.
    pub counts: Vec<u64>,
    pub count: u64,
    /// Sum of values, ns.
    pub sum: f64,
    pub min: u64,
    pub max: u64,
}

impl BucketHist {
    pub fn new(bounds: Vec<u64>) -> BucketHist {
        let n = bounds.len() + 1;
        BucketHist {
            bounds,
            counts: vec![0; n],
            count: 0,
            sum: 0.0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Adds `n` values equal to `v` ns.
    pub fn add(&mut self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        // Bucket i holds (bounds[i-1], bounds[i]].
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i] += n;
        self.count += n;
        self.sum += v as f64 * n as f64;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds every (value, count) pair.
    pub fn add_compact(&mut self, values: &[(u64, u64)]) {
        for &(v, n) in values {
            self.add(v, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_sorted_and_dense_around_the_target() {
        let b = bounds_ns(Some(100));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
        assert!(b.contains(&100_000) && b.contains(&95_000) && b.contains(&105_000));
        let near = b
            .iter()
            .filter(|&&x| (50_000..=200_000).contains(&x))
            .count();
        let without = bounds_ns(None)
            .iter()
            .filter(|&&x| (50_000..=200_000).contains(&x))
            .count();
        assert!(near >= without + 10, "{near} vs {without}");
    }

    #[test]
    fn buckets_follow_upper_inclusive_bounds() {
        let mut h = BucketHist::new(vec![10, 20, 30]);
        h.add(10, 2);
        h.add(11, 1);
        h.add(30, 1);
        h.add(31, 5);
        h.add(0, 0);
        assert_eq!(h.counts, vec![2, 1, 1, 5]);
        assert_eq!(h.count, 9);
        assert_eq!((h.min, h.max), (10, 31));
        assert_eq!(h.sum, (20 + 11 + 30 + 155) as f64);
    }

    #[test]
    fn compact_form_keeps_counts() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for v in [1000u64, 1000, 2000, 5_000_000] {
            h.record(v).unwrap();
        }
        let c = compact(&h);
        assert_eq!(c.iter().map(|x| x.1).sum::<u64>(), 4);
        assert_eq!(c.len(), 3);
        let mut b = BucketHist::new(bounds_ns(None));
        b.add_compact(&c);
        assert_eq!(b.count, 4);
        assert!(b.max >= 5_000_000 && b.max < 5_010_000);
    }
}
