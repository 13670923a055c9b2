//! Compact streaming statistics of what a model sees and answers, and how
//! far one distribution has moved from another: what an agent keeps per
//! telemetry interval and the server compares with a model version's
//! reference profile.
//!
//! [`Moments`] keeps count, mean, variance (Welford's update, stable in
//! one pass), minimum and maximum; [`Histogram`] counts values in fixed
//! bins between two edges, with one bin below and one above. Both merge,
//! so per-interval statistics add up per device, per hardware class and
//! fleet-wide. [`psi`] is the population stability index between two
//! histograms with the same bins: `sum((c - r) * ln(c / r))` over the
//! bins' shares, each share floored at [`PSI_FLOOR`] so an empty bin does
//! not make it infinite. The usual reading: below 0.1 no shift, 0.1 to
//! 0.25 a moderate one, above 0.25 a large one.

use serde::{Deserialize, Serialize};

/// The smallest share a bin counts with in [`psi`].
pub const PSI_FLOOR: f64 = 1e-4;

/// Count, mean, variance, minimum and maximum of a stream of values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub mean: f64,
    /// Sum of squared differences from the mean (Welford's `M2`).
    pub m2: f64,
    pub min: f64,
    pub max: f64,
}

impl Moments {
    /// Takes one value; NaN and infinities are not counted.
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if self.count == 0 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
    }

    /// Adds another stream's statistics (Chan et al.'s parallel update).
    pub fn merge(&mut self, other: &Moments) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let n = (self.count + other.count) as f64;
        let delta = other.mean - self.mean;
        self.m2 += other.m2 + delta * delta * self.count as f64 * other.count as f64 / n;
        self.mean += delta * other.count as f64 / n;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The population standard deviation (0 for fewer than two values).
    pub fn std(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            (self.m2 / self.count as f64).sqrt()
        }
    }
}

/// Why two histograms cannot be compared or merged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriftError {
    #[error("histograms have different bins: {0}")]
    DifferentBins(String),
    #[error("a histogram needs lo < hi and at least one bin, got lo {lo}, hi {hi}, {bins} bins")]
    BadBins { lo: f64, hi: f64, bins: usize },
    #[error("an empty histogram has no distribution to compare")]
    Empty,
}

/// Counts of values in `bins` equal bins between `lo` and `hi`, plus one
/// bin for values below `lo` and one for values at or above `hi`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    /// `bins + 2` counts: below `lo`, the bins in order, at or above `hi`.
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn new(lo: f64, hi: f64, bins: usize) -> Result<Self, DriftError> {
        if !(lo.is_finite() && hi.is_finite() && lo < hi && bins > 0) {
            return Err(DriftError::BadBins { lo, hi, bins });
        }
        Ok(Self {
            lo,
            hi,
            counts: vec![0; bins + 2],
        })
    }

    fn bins(&self) -> usize {
        self.counts.len() - 2
    }

    /// Counts one value; NaN is not counted.
    pub fn push(&mut self, x: f64) {
        if x.is_nan() {
            return;
        }
        let slot = if x < self.lo {
            0
        } else if x >= self.hi {
            self.counts.len() - 1
        } else {
            let width = (self.hi - self.lo) / self.bins() as f64;
            1 + (((x - self.lo) / width) as usize).min(self.bins() - 1)
        };
        self.counts[slot] += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn check_same_bins(&self, other: &Histogram) -> Result<(), DriftError> {
        if self.lo != other.lo || self.hi != other.hi || self.counts.len() != other.counts.len() {
            return Err(DriftError::DifferentBins(format!(
                "[{}, {}) in {} bins against [{}, {}) in {}",
                self.lo,
                self.hi,
                self.bins(),
                other.lo,
                other.hi,
                other.bins()
            )));
        }
        Ok(())
    }

    /// Adds another histogram's counts (same bins).
    pub fn merge(&mut self, other: &Histogram) -> Result<(), DriftError> {
        self.check_same_bins(other)?;
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }
}

/// The population stability index of `current` against `reference`
/// (same bins; see the module docs).
pub fn psi(reference: &Histogram, current: &Histogram) -> Result<f64, DriftError> {
    reference.check_same_bins(current)?;
    let (r_total, c_total) = (reference.total(), current.total());
    if r_total == 0 || c_total == 0 {
        return Err(DriftError::Empty);
    }
    let share = |count: u64, total: u64| (count as f64 / total as f64).max(PSI_FLOOR);
    Ok(reference
        .counts
        .iter()
        .zip(&current.counts)
        .map(|(&r, &c)| {
            let (r, c) = (share(r, r_total), share(c, c_total));
            (c - r) * (c / r).ln()
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reproducible standard normal samples (a 64-bit LCG and Box-Muller).
    fn normal(n: usize, mean: f64, std: f64, seed: u64) -> Vec<f64> {
        let mut state = seed;
        let mut unit = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (unit(), unit());
                mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect()
    }

    fn histogram(values: &[f64]) -> Histogram {
        let mut h = Histogram::new(-4.0, 4.0, 16).unwrap();
        values.iter().for_each(|&x| h.push(x));
        h
    }

    #[test]
    fn moments_match_a_two_pass_computation_and_merge_like_one_stream() {
        let xs = normal(10_000, 3.0, 2.0, 1);
        let mut all = Moments::default();
        xs.iter().for_each(|&x| all.push(x));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!((all.mean - mean).abs() < 1e-9);
        assert!((all.std() - var.sqrt()).abs() < 1e-9);
        assert!((all.mean - 3.0).abs() < 0.1 && (all.std() - 2.0).abs() < 0.1);
        let (mut a, mut b) = (Moments::default(), Moments::default());
        xs[..3_000].iter().for_each(|&x| a.push(x));
        xs[3_000..].iter().for_each(|&x| b.push(x));
        a.merge(&b);
        assert_eq!(a.count, all.count);
        assert!((a.mean - all.mean).abs() < 1e-9 && (a.std() - all.std()).abs() < 1e-9);
        assert_eq!((a.min, a.max), (all.min, all.max));
        // Non-finite values are not counted; merging nothing changes nothing.
        a.push(f64::NAN);
        a.push(f64::INFINITY);
        a.merge(&Moments::default());
        assert_eq!(a.count, all.count);
    }

    #[test]
    fn histograms_count_edges_and_outliers_and_merge_only_with_the_same_bins() {
        let mut h = Histogram::new(0.0, 1.0, 4).unwrap();
        for x in [-0.5, 0.0, 0.24, 0.25, 0.99, 1.0, 7.0, f64::NAN] {
            h.push(x);
        }
        assert_eq!(h.counts, vec![1, 2, 1, 0, 1, 2]);
        let other = Histogram::new(0.0, 2.0, 4).unwrap();
        assert!(matches!(h.merge(&other), Err(DriftError::DifferentBins(_))));
        let copy = h.clone();
        h.merge(&copy).unwrap();
        assert_eq!(h.total(), 14);
        assert!(Histogram::new(1.0, 1.0, 4).is_err());
        assert!(Histogram::new(0.0, 1.0, 0).is_err());
    }

    #[test]
    fn psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() {
        let reference = histogram(&normal(20_000, 0.0, 1.0, 2));
        let same = histogram(&normal(20_000, 0.0, 1.0, 3));
        let small = histogram(&normal(20_000, 0.1, 1.0, 4));
        let shifted = histogram(&normal(20_000, 1.0, 1.0, 5));
        let wider = histogram(&normal(20_000, 0.0, 2.0, 6));
        let same_psi = psi(&reference, &same).unwrap();
        assert!(same_psi < 0.01, "{same_psi}");
        let small_psi = psi(&reference, &small).unwrap();
        assert!(small_psi > same_psi && small_psi < 0.1, "{small_psi}");
        // A one-standard-deviation shift of a normal: PSI about 1.
        let shifted_psi = psi(&reference, &shifted).unwrap();
        assert!(shifted_psi > 0.25, "{shifted_psi}");
        assert!((shifted_psi - 1.0).abs() < 0.25, "{shifted_psi}");
        assert!(psi(&reference, &wider).unwrap() > 0.25);
        // Symmetric in its two arguments.
        assert!((psi(&shifted, &reference).unwrap() - shifted_psi).abs() < 1e-9);
    }

    #[test]
    fn psi_refuses_empty_or_mismatched_histograms() {
        let empty = Histogram::new(-4.0, 4.0, 16).unwrap();
        let full = histogram(&normal(100, 0.0, 1.0, 7));
        assert_eq!(psi(&empty, &full), Err(DriftError::Empty));
        let other = Histogram::new(-4.0, 4.0, 8).unwrap();
        assert!(matches!(
            psi(&full, &other),
            Err(DriftError::DifferentBins(_))
        ));
    }
}
