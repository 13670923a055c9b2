//! A cheap, lock-free source of random numbers for sampling requests and
//! for splitting requests that carry no client key: one atomic add per
//! draw (a Weyl sequence) mixed by SplitMix64's finaliser. Not for
//! anything secret.

use std::sync::atomic::{AtomicU64, Ordering};

/// The golden-ratio increment of SplitMix64.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A random 64-bit stream shared by every thread that draws from it.
#[derive(Debug)]
pub struct Random {
    state: AtomicU64,
}

impl Random {
    /// A stream seeded from the clock and this value's address, so two
    /// streams created together still differ.
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let random = Self::seeded(nanos);
        let address = &random as *const Self as u64;
        random.state.fetch_xor(mix(address), Ordering::Relaxed);
        random
    }

    /// A stream with a fixed seed (tests).
    pub fn seeded(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    pub fn next_u64(&self) -> u64 {
        mix(self
            .state
            .fetch_add(GOLDEN, Ordering::Relaxed)
            .wrapping_add(GOLDEN))
    }

    /// A uniform number in [0, 1).
    pub fn unit(&self) -> f64 {
        unit(self.next_u64())
    }
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

/// SplitMix64's finaliser: every input bit affects every output bit.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 53 bits of `x` as a number in [0, 1).
pub fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_enough_for_sampling() {
        let random = Random::seeded(7);
        let n = 100_000;
        let mut buckets = [0u32; 10];
        for _ in 0..n {
            let u = random.unit();
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!(
                (b as f64 - n as f64 / 10.0).abs() < n as f64 * 0.005,
                "{buckets:?}"
            );
        }
        assert_ne!(Random::new().next_u64(), Random::new().next_u64());
    }
}
