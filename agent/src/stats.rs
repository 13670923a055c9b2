//! Per-model inference statistics: counts and a lock-free latency
//! histogram, cheap enough to update on every request.
//!
//! Buckets are logarithmic, four per doubling from 1 µs to about 70 s, so a
//! percentile read from them is within ±10% of the true value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS_PER_DOUBLING: f64 = 4.0;
const BUCKETS: usize = 104;

/// Counters and latency histogram of one model.
#[derive(Debug)]
pub struct ModelStats {
    successes: AtomicU64,
    failures: AtomicU64,
    /// Total inference time of successful requests, in nanoseconds.
    success_nanos: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
    /// Latency of the most recent successful request, in nanoseconds.
    last_nanos: AtomicU64,
}

impl Default for ModelStats {
    fn default() -> Self {
        Self {
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            success_nanos: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            last_nanos: AtomicU64::new(0),
        }
    }
}

/// Plain counts read from [`ModelStats`]; the difference of two readings
/// describes the interval between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub successes: u64,
    pub failures: u64,
    pub success_nanos: u64,
    buckets: Vec<u64>,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            successes: 0,
            failures: 0,
            success_nanos: 0,
            buckets: vec![0; BUCKETS],
        }
    }
}

impl Counts {
    /// What happened since `earlier`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            successes: self.successes.saturating_sub(earlier.successes),
            failures: self.failures.saturating_sub(earlier.failures),
            success_nanos: self.success_nanos.saturating_sub(earlier.success_nanos),
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }

    /// The latency below which a fraction `q` of requests fell, in
    /// microseconds (`None` without requests).
    pub fn percentile_us(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        self.buckets.iter().enumerate().find_map(|(i, &c)| {
            seen += c;
            (seen >= rank).then(|| bucket_upper_micros(i))
        })
    }
}

fn bucket_of(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros <= 1.0 {
        return 0;
    }
    ((micros.log2() * BUCKETS_PER_DOUBLING).floor() as usize + 1).min(BUCKETS - 1)
}

/// Upper edge of a bucket, in microseconds.
fn bucket_upper_micros(index: usize) -> f64 {
    2f64.powf(index as f64 / BUCKETS_PER_DOUBLING)
}

/// A snapshot for reporting.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    pub successes: u64,
    pub failures: u64,
    pub success_nanos: u64,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
}

impl ModelStats {
    pub fn record_success(&self, latency: Duration) {
        self.successes.fetch_add(1, Ordering::Relaxed);
        self.success_nanos.fetch_add(
            latency.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
        self.buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
        self.last_nanos.store(
            latency.as_nanos().clamp(1, u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Latency of the most recent successful request.
    pub fn last_latency(&self) -> Option<Duration> {
        match self.last_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            success_nanos: self.success_nanos.load(Ordering::Relaxed),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let c = self.counts();
        StatsSnapshot {
            successes: c.successes,
            failures: c.failures,
            success_nanos: c.success_nanos,
            p50_us: c.percentile_us(0.50),
            p90_us: c.percentile_us(0.90),
            p99_us: c.percentile_us(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_the_bucket_resolution() {
        let stats = ModelStats::default();
        for i in 1..=1000u64 {
            stats.record_success(Duration::from_micros(i * 10));
        }
        stats.record_failure();
        let s = stats.snapshot();
        assert_eq!((s.successes, s.failures), (1000, 1));
        let close = |got: Option<f64>, want: f64| {
            let got = got.unwrap();
            assert!((got - want).abs() / want < 0.2, "{got} vs {want}");
        };
        close(s.p50_us, 5_000.0);
        close(s.p90_us, 9_000.0);
        close(s.p99_us, 9_900.0);
        assert_eq!(
            s.success_nanos,
            (1..=1000u64).map(|i| i * 10_000).sum::<u64>()
        );
    }

    #[test]
    fn interval_counts_cover_only_their_interval() {
        let stats = ModelStats::default();
        for _ in 0..100 {
            stats.record_success(Duration::from_micros(10));
        }
        let before = stats.counts();
        for _ in 0..10 {
            stats.record_success(Duration::from_millis(10));
        }
        stats.record_failure();
        let interval = stats.counts().since(&before);
        assert_eq!((interval.successes, interval.failures), (10, 1));
        let p50 = interval.percentile_us(0.5).unwrap();
        assert!((p50 - 10_000.0).abs() / 10_000.0 < 0.2, "{p50}");
        assert_eq!(stats.last_latency(), Some(Duration::from_millis(10)));
        assert_eq!(Counts::default().percentile_us(0.5), None);
    }

    #[test]
    fn empty_and_extreme_latencies() {
        let stats = ModelStats::default();
        assert_eq!(stats.snapshot().p50_us, None);
        stats.record_success(Duration::from_nanos(10));
        stats.record_success(Duration::from_secs(10_000));
        let s = stats.snapshot();
        assert_eq!(s.p50_us, Some(1.0));
        assert!(s.p99_us.unwrap() > 1e7);
    }
}
