//! An A/B split on the device: a second version (the variant, "b")
//! serves a share of the clients of one model name; the slot's own
//! version ("a") serves the rest.
//!
//! A client is identified by its key (the `X-Client-Key` header, or the
//! request's `client_key` parameter). The key is hashed with the
//! experiment's name (FNV-1a, then SplitMix64's finaliser: stable across
//! builds, processes and devices, unlike std's randomly seeded hasher) to
//! a point in [0, 1); below the share, the variant serves. So one key
//! always lands on the same version, on every device of the experiment,
//! and a new experiment reshuffles the keys. A request without a key is
//! assigned at random at the same share.
//!
//! The variant is a whole [`ServedModel`]: it keeps its own counts,
//! latency and errors, which telemetry reports as the "b" entry.

use std::sync::Arc;

use edgefleet_shared::quality::{SplitSpec, Variant};

use super::random::{self, Random};
use crate::registry::ServedModel;

/// The HTTP header that carries a request's client key.
pub const CLIENT_KEY_HEADER: &str = "x-client-key";

/// Two versions serving one model name by client key.
pub struct Split {
    spec: SplitSpec,
    variant: Arc<ServedModel>,
    random: Random,
}

impl std::fmt::Debug for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Split")
            .field("experiment", &self.spec.experiment)
            .field("share", &self.spec.share)
            .field("variant", &self.variant.version)
            .finish()
    }
}

impl Split {
    /// Splits as `spec` says (already validated with the signed
    /// document), with `variant` loaded from `spec.variant`.
    pub fn new(spec: SplitSpec, variant: Arc<ServedModel>) -> Self {
        Self {
            spec,
            variant,
            random: Random::new(),
        }
    }

    pub fn spec(&self) -> &SplitSpec {
        &self.spec
    }

    /// The variant's model ("b").
    pub fn variant(&self) -> &Arc<ServedModel> {
        &self.variant
    }

    /// Which variant serves a request with this client key (none: at
    /// random).
    pub fn choose(&self, client_key: Option<&str>) -> Variant {
        let point = match client_key {
            Some(key) => point(&self.spec.experiment, key),
            None => self.random.unit(),
        };
        if point < self.spec.share {
            Variant::B
        } else {
            Variant::A
        }
    }
}

/// Where `key` falls in [0, 1) in `experiment`.
pub fn point(experiment: &str, key: &str) -> f64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    // The separator keeps ("ab", "c") and ("a", "bc") apart.
    let bytes = experiment.bytes().chain([0xff]).chain(key.bytes());
    let hash = bytes.fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    // FNV-1a's low bits mix poorly on short keys; the finaliser spreads
    // every bit over the whole word before it becomes a point.
    random::unit(random::mix(hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_the_share_stick_and_reshuffle_per_experiment() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("client-{i}")).collect();
        for share in [0.1, 0.3, 0.5] {
            let b = keys.iter().filter(|k| point("exp-1", k) < share).count() as f64;
            let got = b / keys.len() as f64;
            assert!((got - share).abs() <= 0.03, "share {share}: {got}");
        }
        // Sticky: the same key, the same point, every time.
        for k in keys.iter().take(100) {
            assert_eq!(point("exp-1", k), point("exp-1", k));
        }
        // Another experiment reshuffles: of the keys in "b" at 0.3, about
        // 30 % (not all) are in "b" again.
        let in_b: Vec<&String> = keys.iter().filter(|k| point("exp-1", k) < 0.3).collect();
        let again = in_b.iter().filter(|k| point("exp-2", k) < 0.3).count() as f64;
        let overlap = again / in_b.len() as f64;
        assert!((overlap - 0.3).abs() <= 0.05, "{overlap}");
        // A fixed value (FNV-1a and SplitMix64 computed independently):
        // the hash must not change between builds, or keys would move
        // between variants when agents update.
        assert_eq!(point("exp-1", "client-0"), 0.5329341202854848);
        assert_ne!(point("ab", "c"), point("a", "bc"));
    }

    #[test]
    fn requests_split_by_key_or_at_random_at_the_share() {
        let registry_model = |version| {
            let bytes = std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../models/digits/digits_int8.onnx"),
            )
            .unwrap();
            let engine = crate::engine::tract::TractEngine::load_onnx(&bytes, &[]).unwrap();
            ServedModel::new(
                "digits".into(),
                version,
                "00".repeat(32),
                edgefleet_shared::ModelFormat::Onnx,
                crate::engine::Selection {
                    engine: Box::new(engine),
                    trials: Vec::new(),
                },
            )
        };
        let spec = SplitSpec {
            variant: edgefleet_shared::quality::ModelArtifact {
                version: 2,
                format: edgefleet_shared::ModelFormat::Onnx,
                sha256: "00".repeat(32),
                size: 1,
                urls: vec!["http://x/".into()],
                zstd: None,
            },
            share: 0.3,
            experiment: "exp-1".into(),
        };
        let split = Split::new(spec, Arc::new(registry_model(2)));
        let n = 10_000;
        let b = (0..n).filter(|_| split.choose(None) == Variant::B).count() as f64;
        assert!((b / n as f64 - 0.3).abs() <= 0.03, "{b}");
        for i in 0..100 {
            let key = format!("client-{i}");
            let expected = if point("exp-1", &key) < 0.3 {
                Variant::B
            } else {
                Variant::A
            };
            assert!(
                (0..5).all(|_| split.choose(Some(&key)) == expected),
                "{key}"
            );
        }
    }
}
