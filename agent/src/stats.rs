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
}

impl Default for ModelStats {
    fn default() -> Self {
        Self {
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            success_nanos: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
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
    }

    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let percentile = |q: f64| {
            if total == 0 {
                return None;
            }
            let rank = (q * total as f64).ceil().max(1.0) as u64;
            let mut seen = 0;
            counts.iter().enumerate().find_map(|(i, &c)| {
                seen += c;
                (seen >= rank).then(|| bucket_upper_micros(i))
            })
        };
        StatsSnapshot {
            successes: self.successes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            success_nanos: self.success_nanos.load(Ordering::Relaxed),
            p50_us: percentile(0.50),
            p90_us: percentile(0.90),
            p99_us: percentile(0.99),
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
