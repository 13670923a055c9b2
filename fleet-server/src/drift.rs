//! Drift monitoring on the server: a model version's reference profile,
//! and how far what devices see has moved from it.
//!
//! A **reference profile** holds, per summary feature of an input or
//! output tensor ([`Feature`]), the bins the agents count with and the
//! reference histogram and moments in those bins. It comes from a
//! reference file ([`ReferenceFile`], computed here because the server
//! has no inference runtime: the file carries input samples and, where
//! outputs are to be watched, the model's outputs for them) or from a
//! period of stored traffic ([`ReferenceProfile::from_traffic`]). Its
//! bins travel to the agents as the slot's [`DriftSpec`], so the
//! statistics they report per interval are directly comparable.
//!
//! Features, per sample (one row of a batch): every input gets `mean` and
//! `std` of its elements; an output whose last dimension looks like
//! classes (2 to [`MAX_DRIFT_BINS`] elements per row) gets `argmax` (one
//! bin per class) and `max_value`; any other output gets `mean`. Bins
//! other than argmax's are [`BINS`] equal bins over the reference's
//! observed range widened by [`MARGIN`] of it on each side, so a slightly
//! wider spread in the field still lands inside the bins and anything far
//! off lands in the outer bins (which PSI punishes).
//!
//! [`view`] keeps the scores: per device, per hardware class and
//! fleet-wide.

pub mod view;

use std::collections::BTreeMap;

use edgefleet_shared::drift::{DriftError, Histogram, Moments};
use edgefleet_shared::quality::{
    DriftSpec, DriftTelemetry, Feature, FeatureBins, MAX_DRIFT_BINS, MAX_DRIFT_FEATURES,
};
use edgefleet_shared::TensorSpec;
use serde::{Deserialize, Serialize};

use crate::store::ModelSpec;

pub use view::DriftView;

/// Equal bins per continuous feature.
pub const BINS: u32 = 16;
/// How far the bins reach beyond the reference's observed range, as a
/// share of that range on each side.
pub const MARGIN: f64 = 0.25;
/// Samples a reference file may hold at most.
pub const MAX_SAMPLES: usize = 100_000;
/// The drift score at or above which a model counts as drifting, unless
/// the server is configured otherwise (the usual reading of PSI: above
/// 0.25 a large shift).
pub const DEFAULT_ALERT_PSI: f64 = 0.25;

/// Why a reference could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("the reference file is not valid JSON of the form {{\"samples\": [{{\"inputs\": {{NAME: [numbers]}}, \"outputs\": {{NAME: [numbers]}}}}]}}: {0}")]
    NotJson(String),
    #[error("the reference file holds no samples")]
    NoSamples,
    #[error("the reference file holds {0} samples; at most {MAX_SAMPLES} are taken")]
    TooManySamples(usize),
    #[error("sample {sample}: {kind} {tensor:?} is not one of the model's declared {kind}s ({declared})")]
    UnknownTensor {
        sample: usize,
        kind: &'static str,
        tensor: String,
        declared: String,
    },
    #[error("sample {sample}: {kind} {tensor:?} has {got} values, but its declared shape {shape:?} holds {want} per sample")]
    WrongCount {
        sample: usize,
        kind: &'static str,
        tensor: String,
        got: usize,
        want: u64,
        shape: Vec<i64>,
    },
    #[error("sample {sample}: {kind} {tensor:?} has {got} values where sample 0 had {first}")]
    Inconsistent {
        sample: usize,
        kind: &'static str,
        tensor: String,
        got: usize,
        first: usize,
    },
    #[error("{kind} {tensor:?} is missing from sample {sample} (every sample must carry the same tensors)")]
    Missing {
        sample: usize,
        kind: &'static str,
        tensor: String,
    },
    #[error("sample {sample}: {kind} {tensor:?} is not in sample 0 (every sample must carry the same tensors)")]
    Extra {
        sample: usize,
        kind: &'static str,
        tensor: String,
    },
    #[error(
        "sample {sample}: {kind} {tensor:?} holds no values or a value that is not a finite number"
    )]
    BadValues {
        sample: usize,
        kind: &'static str,
        tensor: String,
    },
    #[error("the reference would bin {0} features; at most {MAX_DRIFT_FEATURES} are allowed (send fewer tensors)")]
    TooManyFeatures(usize),
    #[error("no drift statistics of {model} v{version} were stored between {since} and {until}; traffic statistics exist only while a reference is in force (set one from a file first) and devices report them")]
    NoTraffic {
        model: String,
        version: u64,
        since: u64,
        until: u64,
    },
    #[error("the stored statistics do not fit the reference's bins: {0}")]
    Bins(#[from] DriftError),
}

/// A reference file: input samples and, optionally, the model's outputs
/// for them; each tensor a flat array of one sample's values.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferenceFile {
    pub samples: Vec<ReferenceSample>,
}

/// One sample of a [`ReferenceFile`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferenceSample {
    pub inputs: BTreeMap<String, Vec<f64>>,
    #[serde(default)]
    pub outputs: BTreeMap<String, Vec<f64>>,
}

/// One binned feature of a reference profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceFeature {
    pub bins: FeatureBins,
    pub moments: Moments,
    pub histogram: Histogram,
}

/// A model version's reference profile (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceProfile {
    /// Samples (or requests, from traffic) it was made of.
    pub samples: u64,
    /// `file` or `traffic`.
    pub source: String,
    pub features: Vec<ReferenceFeature>,
}

impl ReferenceProfile {
    /// The bins agents count with.
    pub fn spec(&self) -> DriftSpec {
        DriftSpec {
            features: self.features.iter().map(|f| f.bins.clone()).collect(),
        }
    }

    /// The feature for `tensor`/`feature`.
    pub fn feature(&self, tensor: &str, feature: Feature) -> Option<&ReferenceFeature> {
        self.features
            .iter()
            .find(|f| f.bins.tensor == tensor && f.bins.feature == feature)
    }

    /// A profile from stored traffic: `spec`'s bins, with every
    /// interval's statistics merged. Statistics of features the spec does
    /// not name, or in other bins (reported under an older spec), are
    /// left out.
    pub fn from_traffic<'a>(
        spec: &DriftSpec,
        intervals: impl IntoIterator<Item = &'a DriftTelemetry>,
    ) -> Result<Self, ReferenceError> {
        let mut features = spec
            .features
            .iter()
            .map(|bins| {
                Ok(ReferenceFeature {
                    bins: bins.clone(),
                    moments: Moments::default(),
                    histogram: bins.histogram()?,
                })
            })
            .collect::<Result<Vec<_>, DriftError>>()?;
        let mut requests = 0;
        for interval in intervals {
            let mut most = 0;
            for stats in &interval.features {
                let Some(f) = features
                    .iter_mut()
                    .find(|f| f.bins.tensor == stats.tensor && f.bins.feature == stats.feature)
                else {
                    continue;
                };
                if f.histogram.merge(&stats.histogram).is_ok() {
                    f.moments.merge(&stats.moments);
                    most = most.max(stats.histogram.total());
                }
            }
            requests += most;
        }
        Ok(Self {
            samples: requests,
            source: "traffic".into(),
            features,
        })
    }
}

/// Computes a reference profile from a reference file's bytes, checked
/// against the model's declared interface (where it declares one).
pub fn from_file(spec: &ModelSpec, bytes: &[u8]) -> Result<ReferenceProfile, ReferenceError> {
    let file: ReferenceFile =
        serde_json::from_slice(bytes).map_err(|e| ReferenceError::NotJson(e.to_string()))?;
    from_samples(spec, &file.samples)
}

/// Computes a reference profile from samples (see [`from_file`]).
pub fn from_samples(
    spec: &ModelSpec,
    samples: &[ReferenceSample],
) -> Result<ReferenceProfile, ReferenceError> {
    let first = samples.first().ok_or(ReferenceError::NoSamples)?;
    if samples.len() > MAX_SAMPLES {
        return Err(ReferenceError::TooManySamples(samples.len()));
    }
    for (i, sample) in samples.iter().enumerate() {
        for (kind, names, first_names) in [
            ("input", &sample.inputs, &first.inputs),
            ("output", &sample.outputs, &first.outputs),
        ] {
            if let Some(extra) = names.keys().find(|n| !first_names.contains_key(*n)) {
                return Err(ReferenceError::Extra {
                    sample: i,
                    kind,
                    tensor: extra.clone(),
                });
            }
        }
    }
    let mut features = Vec::new();
    for (kind, declared, names) in [
        ("input", &spec.inputs, first.inputs.keys()),
        ("output", &spec.outputs, first.outputs.keys()),
    ] {
        for name in names {
            let tensor = Tensor {
                kind,
                name,
                declared: declared.iter().find(|t| &t.name == name),
            };
            let rows = tensor.rows(declared, samples)?;
            features.extend(tensor.features(&rows)?);
        }
    }
    if features.len() > MAX_DRIFT_FEATURES {
        return Err(ReferenceError::TooManyFeatures(features.len()));
    }
    Ok(ReferenceProfile {
        samples: samples.len() as u64,
        source: "file".into(),
        features,
    })
}

/// One tensor of a reference file being summarised.
struct Tensor<'a> {
    kind: &'static str,
    name: &'a str,
    declared: Option<&'a TensorSpec>,
}

impl Tensor<'_> {
    fn values<'s>(&self, sample: &'s ReferenceSample) -> Option<&'s Vec<f64>> {
        match self.kind {
            "input" => sample.inputs.get(self.name),
            _ => sample.outputs.get(self.name),
        }
    }

    /// Every sample's values of this tensor, checked.
    fn rows<'s>(
        &self,
        declared_all: &[TensorSpec],
        samples: &'s [ReferenceSample],
    ) -> Result<Vec<&'s [f64]>, ReferenceError> {
        if self.declared.is_none() && !declared_all.is_empty() {
            return Err(ReferenceError::UnknownTensor {
                sample: 0,
                kind: self.kind,
                tensor: self.name.to_string(),
                declared: declared_all
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        // Elements per sample: the declared shape without its leading
        // (batch) dimension, when every other dimension is fixed.
        let want = self.declared.and_then(|t| {
            let rest = t.shape.get(1..).unwrap_or_default();
            rest.iter().try_fold(1u64, |n, &d| {
                u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
            })
        });
        let mut rows = Vec::with_capacity(samples.len());
        let mut first_len = None;
        for (i, sample) in samples.iter().enumerate() {
            let values = self.values(sample).ok_or_else(|| ReferenceError::Missing {
                sample: i,
                kind: self.kind,
                tensor: self.name.to_string(),
            })?;
            if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
                return Err(ReferenceError::BadValues {
                    sample: i,
                    kind: self.kind,
                    tensor: self.name.to_string(),
                });
            }
            if let (Some(want), Some(t)) = (want, self.declared) {
                if values.len() as u64 != want {
                    return Err(ReferenceError::WrongCount {
                        sample: i,
                        kind: self.kind,
                        tensor: self.name.to_string(),
                        got: values.len(),
                        want,
                        shape: t.shape.clone(),
                    });
                }
            }
            let first = *first_len.get_or_insert(values.len());
            if values.len() != first {
                return Err(ReferenceError::Inconsistent {
                    sample: i,
                    kind: self.kind,
                    tensor: self.name.to_string(),
                    got: values.len(),
                    first,
                });
            }
            rows.push(values.as_slice());
        }
        Ok(rows)
    }

    /// The features this tensor is watched by, binned from `rows`.
    fn features(&self, rows: &[&[f64]]) -> Result<Vec<ReferenceFeature>, ReferenceError> {
        let width = rows.first().map_or(0, |r| r.len());
        let classes = self.kind == "output" && (2..=MAX_DRIFT_BINS as usize).contains(&width);
        let features: &[Feature] = match (self.kind, classes) {
            ("input", _) => &[Feature::Mean, Feature::Std],
            (_, true) => &[Feature::Argmax, Feature::MaxValue],
            _ => &[Feature::Mean],
        };
        features
            .iter()
            .map(|&feature| {
                let values: Vec<f64> = rows.iter().map(|r| feature_value(feature, r)).collect();
                let bins = if feature == Feature::Argmax {
                    FeatureBins {
                        tensor: self.name.to_string(),
                        feature,
                        lo: 0.0,
                        hi: width as f64,
                        bins: width as u32,
                    }
                } else {
                    continuous_bins(self.name, feature, &values)
                };
                let mut histogram = bins.histogram()?;
                let mut moments = Moments::default();
                for &v in &values {
                    histogram.push(v);
                    moments.push(v);
                }
                Ok(ReferenceFeature {
                    bins,
                    moments,
                    histogram,
                })
            })
            .collect()
    }
}

/// [`BINS`] equal bins over the values' range widened by [`MARGIN`]; a
/// range of one value is widened by half its magnitude (or by 0.5).
fn continuous_bins(tensor: &str, feature: Feature, values: &[f64]) -> FeatureBins {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = hi - lo;
    let pad = if range > 0.0 {
        range * MARGIN
    } else {
        (lo.abs() * 0.5).max(0.5)
    };
    FeatureBins {
        tensor: tensor.to_string(),
        feature,
        lo: lo - pad,
        hi: hi + pad,
        bins: BINS,
    }
}

/// One feature of one sample's values (never empty, all finite).
pub fn feature_value(feature: Feature, values: &[f64]) -> f64 {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    match feature {
        Feature::Mean => mean,
        Feature::Std => (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt(),
        Feature::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
        Feature::Max | Feature::MaxValue => {
            values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        }
        Feature::Argmax => {
            let mut best = 0;
            for (i, v) in values.iter().enumerate() {
                if *v > values[best] {
                    best = i;
                }
            }
            best as f64
        }
    }
}

#[cfg(test)]
mod tests;
