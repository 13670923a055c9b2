//! Model quality in the field: what a model slot may ask of the agent
//! beyond serving one version, and what the agent reports back.
//!
//! - [`ShadowSpec`]: a candidate version runs on a sampled share of live
//!   requests after the caller has its answer; its outputs are compared
//!   with the served version's ([`Comparison`], per output) and the
//!   agreement is reported as [`ShadowTelemetry`].
//! - [`SplitSpec`]: an A/B test; a share of client keys is served by a
//!   second version. Each variant reports its own [`crate::ModelTelemetry`]
//!   entry, labelled with [`Variant`].
//! - [`DriftSpec`]: which summary features of the inputs and outputs the
//!   agent bins, with which bins; the agent reports a
//!   [`DriftTelemetry`] per interval and the server scores it against the
//!   version's reference profile ([`crate::drift::psi`]).
//!
//! Every field here travels inside the signed desired state or in
//! telemetry; none carries raw inputs.

use serde::{Deserialize, Serialize};

use crate::drift::{Histogram, Moments};
use crate::{Compressed, ModelFormat};

/// A model file a slot names besides its served version: a shadow
/// candidate or an A/B variant. Downloaded and verified like the slot's
/// own file (size, SHA-256, signed with the document).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArtifact {
    pub version: u64,
    pub format: ModelFormat,
    /// Lowercase hex SHA-256 of the model file.
    pub sha256: String,
    /// Exact size in bytes.
    pub size: u64,
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd: Option<Compressed>,
}

impl ModelArtifact {
    pub(crate) fn validate(&self, what: &str) -> Result<(), String> {
        if !is_sha256_hex(&self.sha256) {
            return Err(format!(
                "{what}: sha256 must be 64 lowercase hex characters"
            ));
        }
        if self.size == 0 {
            return Err(format!("{what}: size must be positive"));
        }
        if self.urls.is_empty() {
            return Err(format!("{what}: no download URL"));
        }
        Ok(())
    }
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// How one output of a shadow candidate is compared with the served
/// version's output for the same request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Comparison {
    /// The index of the largest value along the last axis is the same in
    /// every row (classifiers).
    Top1,
    /// Every element is within `limit` of the served one.
    MaxAbs { limit: f64 },
    /// Every element differs by at most `limit` times the served one's
    /// magnitude (elements near zero compare absolutely against `limit`).
    MaxRel { limit: f64 },
    /// The cosine similarity of the two outputs, flattened, is at least
    /// `min` (embeddings).
    Cosine { min: f64 },
}

impl Comparison {
    /// Whether its figure is usable.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::Top1 => Ok(()),
            Self::MaxAbs { limit } | Self::MaxRel { limit } => {
                if limit.is_finite() && limit >= 0.0 {
                    Ok(())
                } else {
                    Err(format!(
                        "comparison limit must be finite and >= 0, not {limit}"
                    ))
                }
            }
            Self::Cosine { min } => {
                if (-1.0..=1.0).contains(&min) {
                    Ok(())
                } else {
                    Err(format!(
                        "cosine minimum must be between -1 and 1, not {min}"
                    ))
                }
            }
        }
    }
}

/// The comparison for one named output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputComparison {
    pub output: String,
    #[serde(flatten)]
    pub comparison: Comparison,
}

/// Run a candidate version in shadow beside the served one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowSpec {
    pub candidate: ModelArtifact,
    /// Share of successful requests also run on the candidate, in (0, 1].
    pub sample_rate: f64,
    /// Per output; an output not listed is compared by [`Comparison::Top1`].
    /// A request agrees when every output agrees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compare: Vec<OutputComparison>,
    /// Sampled requests waiting for the candidate at most; more are
    /// dropped (and counted), never waited for.
    #[serde(default = "default_shadow_queue")]
    pub max_queue: u32,
    /// Share of one core the candidate may use, averaged over a few
    /// seconds; sampled requests over the budget are dropped.
    #[serde(default = "default_cpu_budget")]
    pub cpu_budget: f64,
}

fn default_shadow_queue() -> u32 {
    8
}

fn default_cpu_budget() -> f64 {
    0.25
}

impl ShadowSpec {
    /// The comparison for `output`.
    pub fn comparison(&self, output: &str) -> Comparison {
        self.compare
            .iter()
            .find(|c| c.output == output)
            .map(|c| c.comparison)
            .unwrap_or(Comparison::Top1)
    }

    pub(crate) fn validate(&self, model: &str) -> Result<(), String> {
        let what = format!("model {model}: shadow candidate");
        self.candidate.validate(&what)?;
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return Err(format!("{what}: sample rate must be in (0, 1]"));
        }
        if !(self.cpu_budget > 0.0 && self.cpu_budget <= 1.0) {
            return Err(format!("{what}: cpu budget must be in (0, 1]"));
        }
        if self.max_queue == 0 || self.max_queue > 1024 {
            return Err(format!("{what}: queue must hold 1 to 1024 requests"));
        }
        for c in &self.compare {
            c.comparison
                .validate()
                .map_err(|e| format!("{what}: output {}: {e}", c.output))?;
        }
        Ok(())
    }
}

/// An A/B test: `share` of client keys are served by `variant` ("b"),
/// the rest by the slot's own version ("a").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub variant: ModelArtifact,
    /// Share of client keys (or of requests without a key) served by the
    /// variant, in [0, 1].
    pub share: f64,
    /// Names the experiment; hashed with the client key, so one key lands
    /// on the same variant on every device of the experiment and a new
    /// experiment reshuffles keys.
    pub experiment: String,
}

impl SplitSpec {
    pub(crate) fn validate(&self, model: &str) -> Result<(), String> {
        let what = format!("model {model}: A/B variant");
        self.variant.validate(&what)?;
        if !(0.0..=1.0).contains(&self.share) {
            return Err(format!("{what}: share must be in [0, 1]"));
        }
        if self.experiment.is_empty() || self.experiment.len() > 128 {
            return Err(format!("{what}: experiment name must be 1 to 128 bytes"));
        }
        Ok(())
    }
}

/// Which variant of an A/B test a telemetry entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The slot's own version.
    A,
    /// The split's variant.
    B,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }
}

/// A number summarising one tensor of one request, binned for drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    Mean,
    Std,
    Min,
    Max,
    /// Index of the largest element (a classifier's class).
    Argmax,
    /// The largest element (a classifier's score).
    MaxValue,
}

impl Feature {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Std => "std",
            Self::Min => "min",
            Self::Max => "max",
            Self::Argmax => "argmax",
            Self::MaxValue => "max_value",
        }
    }
}

/// One binned feature of one input or output tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureBins {
    /// The input or output tensor's name.
    pub tensor: String,
    pub feature: Feature,
    pub lo: f64,
    pub hi: f64,
    pub bins: u32,
}

impl FeatureBins {
    /// An empty histogram with these bins.
    pub fn histogram(&self) -> Result<Histogram, crate::drift::DriftError> {
        Histogram::new(self.lo, self.hi, self.bins as usize)
    }
}

/// Which features the agent bins per telemetry interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftSpec {
    pub features: Vec<FeatureBins>,
}

/// Most features one model may bin (each costs a histogram per interval
/// in telemetry).
pub const MAX_DRIFT_FEATURES: usize = 32;
/// Most bins one feature may have.
pub const MAX_DRIFT_BINS: u32 = 64;

impl DriftSpec {
    pub(crate) fn validate(&self, model: &str) -> Result<(), String> {
        if self.features.len() > MAX_DRIFT_FEATURES {
            return Err(format!(
                "model {model}: at most {MAX_DRIFT_FEATURES} drift features"
            ));
        }
        for f in &self.features {
            if f.bins == 0 || f.bins > MAX_DRIFT_BINS {
                return Err(format!(
                    "model {model}: drift feature {}/{}: 1 to {MAX_DRIFT_BINS} bins",
                    f.tensor,
                    f.feature.as_str()
                ));
            }
            f.histogram().map_err(|e| {
                format!(
                    "model {model}: drift feature {}/{}: {e}",
                    f.tensor,
                    f.feature.as_str()
                )
            })?;
        }
        Ok(())
    }
}

/// What the shadow candidate did in one telemetry interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowTelemetry {
    pub candidate_version: u64,
    /// Requests run on both versions and compared.
    pub compared: u64,
    /// Of those, requests where every output agreed.
    pub agreed: u64,
    /// Requests the candidate failed on (counted as disagreeing by gates).
    pub errors: u64,
    /// Sampled requests dropped: queue full, over the CPU budget, or the
    /// device busy.
    pub dropped: u64,
    /// Candidate latency percentiles over the interval, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    /// Largest absolute difference seen in any compared output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs_error: Option<f64>,
    /// Smallest cosine similarity seen in an output compared by cosine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cosine: Option<f64>,
}

impl ShadowTelemetry {
    /// Agreement over compared and failed requests, if any.
    pub fn agreement(&self) -> Option<f64> {
        let total = self.compared + self.errors;
        (total > 0).then(|| self.agreed as f64 / total as f64)
    }
}

/// One feature's statistics over one telemetry interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    pub tensor: String,
    pub feature: Feature,
    pub moments: Moments,
    pub histogram: Histogram,
}

/// A model's drift statistics over one telemetry interval, one entry per
/// feature of the slot's [`DriftSpec`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DriftTelemetry {
    pub features: Vec<FeatureStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact() -> ModelArtifact {
        ModelArtifact {
            version: 2,
            format: ModelFormat::Onnx,
            sha256: "ab".repeat(32),
            size: 10,
            urls: vec!["http://x/a".into()],
            zstd: None,
        }
    }

    #[test]
    fn shadow_specs_are_checked_and_default_to_top1() {
        let json = serde_json::json!({
            "candidate": artifact(),
            "sample_rate": 0.1,
            "compare": [{"output": "emb", "kind": "cosine", "min": 0.99}],
        });
        let spec: ShadowSpec = serde_json::from_value(json).unwrap();
        assert_eq!(spec.max_queue, 8);
        assert_eq!(spec.comparison("emb"), Comparison::Cosine { min: 0.99 });
        assert_eq!(spec.comparison("probs"), Comparison::Top1);
        spec.validate("m").unwrap();
        let mut bad = spec.clone();
        bad.sample_rate = 0.0;
        assert!(bad.validate("m").unwrap_err().contains("sample rate"));
        let mut bad = spec;
        bad.compare[0].comparison = Comparison::MaxAbs { limit: f64::NAN };
        assert!(bad.validate("m").unwrap_err().contains("output emb"));
    }

    #[test]
    fn splits_and_drift_specs_are_checked() {
        let split = SplitSpec {
            variant: artifact(),
            share: 1.5,
            experiment: "e".into(),
        };
        assert!(split.validate("m").unwrap_err().contains("share"));
        let spec = DriftSpec {
            features: vec![FeatureBins {
                tensor: "x".into(),
                feature: Feature::Mean,
                lo: 1.0,
                hi: 0.0,
                bins: 10,
            }],
        };
        assert!(spec.validate("m").unwrap_err().contains("x/mean"));
    }

    #[test]
    fn agreement_counts_candidate_failures_against_it() {
        let t = ShadowTelemetry {
            compared: 8,
            agreed: 8,
            errors: 2,
            ..Default::default()
        };
        assert_eq!(t.agreement(), Some(0.8));
        assert_eq!(ShadowTelemetry::default().agreement(), None);
    }
}
