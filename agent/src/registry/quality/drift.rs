//! Drift statistics on the device: per telemetry interval, the
//! distribution of a few summary features of each request's inputs and
//! outputs, binned as the slot's [`DriftSpec`] says. The server compares
//! each interval with the version's reference profile
//! ([`edgefleet_shared::drift::psi`]); no raw input leaves the device.
//!
//! A request goes through [`DriftCollector::input_features`] before
//! inference (the inputs move into the engine, so their features are
//! taken first) and [`DriftCollector::record`] after a successful one.
//! Both compute their features without the lock; the lock is held only
//! to add the finished values, so concurrent requests do not queue
//! behind each other's arithmetic. [`DriftCollector::take`] hands the
//! interval to telemetry and starts the next.
//!
//! What each [`Feature`] means for a tensor:
//! - `mean`, `std` (population), `min`, `max`: over all its elements,
//!   one value per request.
//! - `argmax`, `max_value` of an output: per row along the last axis (a
//!   `[batch, classes]` output gives one value per batch row, a
//!   `[classes]` output one); of an input, over the whole tensor
//!   (row-major index), one value per request.
//!
//! A feature's tensor is looked for among the inputs first, then the
//! outputs. A request without it (or where the feature has no finite
//! value: an empty tensor, NaN elements) is counted as skipped for that
//! feature and logged with the interval; booleans count as 0 and 1.
//!
//! Memory is fixed by the spec, not by traffic: one [`Moments`] and one
//! [`Histogram`] per feature, at most [`MAX_DRIFT_FEATURES`] features of
//! at most [`MAX_DRIFT_BINS`] bins.

use std::sync::{Mutex, PoisonError};

use edgefleet_shared::drift::{Histogram, Moments};
use edgefleet_shared::quality::{
    DriftSpec, DriftTelemetry, Feature, FeatureStats, MAX_DRIFT_BINS, MAX_DRIFT_FEATURES,
};

use crate::tensor::Tensor;

mod features;
#[cfg(test)]
pub(crate) mod tests;

use features::{row_maxima, Needs, RowMax, Summary};

/// Per-interval statistics of one model's inputs and outputs.
#[derive(Debug)]
pub struct DriftCollector {
    spec: DriftSpec,
    plan: Plan,
    interval: Mutex<Vec<Accumulator>>,
}

/// Summary features of one request's inputs, taken before inference.
#[derive(Debug, Default)]
pub struct InputFeatures {
    /// Per planned tensor: its summary when it is one of the inputs.
    tensors: Vec<Option<Summary>>,
}

/// What the collector computes per request, worked out once from the
/// spec: each tensor it reads (once, however many features name it) and
/// each feature it bins.
#[derive(Debug)]
struct Plan {
    tensors: Vec<TensorPlan>,
    features: Vec<Binned>,
}

#[derive(Debug)]
struct TensorPlan {
    name: String,
    /// Whole-tensor statistics when the tensor is an input.
    as_input: Needs,
    /// Whole-tensor statistics when it is an output.
    as_output: Needs,
    /// Whether an output's row maxima are needed.
    rows: bool,
}

#[derive(Debug)]
struct Binned {
    tensor: usize,
    feature: Feature,
    empty: Histogram,
}

/// One feature's statistics so far this interval.
#[derive(Debug, Clone)]
struct Accumulator {
    moments: Moments,
    histogram: Histogram,
    /// Requests that gave this feature no value.
    skipped: u64,
}

impl Accumulator {
    fn push(&mut self, x: Option<f64>) {
        match x {
            Some(x) if x.is_finite() => {
                self.moments.push(x);
                self.histogram.push(x);
            }
            _ => self.skipped += 1,
        }
    }
}

/// Where one planned tensor's values came from in one request.
enum Source {
    Input(Summary),
    Output {
        whole: Option<Summary>,
        rows: Vec<Option<RowMax>>,
    },
    Missing,
}

impl Plan {
    fn new(spec: &DriftSpec) -> Self {
        let mut plan = Plan {
            tensors: Vec::new(),
            features: Vec::new(),
        };
        for (i, f) in spec.features.iter().enumerate() {
            // The signed document's validation refuses such specs; the
            // bound is kept here too, so memory never depends on it.
            let empty = match f.histogram() {
                Ok(h) if i < MAX_DRIFT_FEATURES && f.bins <= MAX_DRIFT_BINS => h,
                Ok(_) => {
                    tracing::error!(tensor = %f.tensor, feature = f.feature.as_str(), "drift feature over the limits; not binned");
                    continue;
                }
                Err(e) => {
                    tracing::error!(tensor = %f.tensor, feature = f.feature.as_str(), error = %e, "drift feature not binned");
                    continue;
                }
            };
            let tensor = match plan.tensors.iter().position(|t| t.name == f.tensor) {
                Some(t) => t,
                None => {
                    plan.tensors.push(TensorPlan {
                        name: f.tensor.clone(),
                        as_input: Needs::default(),
                        as_output: Needs::default(),
                        rows: false,
                    });
                    plan.tensors.len() - 1
                }
            };
            let t = &mut plan.tensors[tensor];
            match f.feature {
                Feature::Mean => {
                    t.as_input.sum = true;
                    t.as_output.sum = true;
                }
                Feature::Std => {
                    t.as_input.squares = true;
                    t.as_output.squares = true;
                }
                Feature::Min => {
                    t.as_input.min = true;
                    t.as_output.min = true;
                }
                Feature::Max => {
                    t.as_input.max = true;
                    t.as_output.max = true;
                }
                Feature::Argmax | Feature::MaxValue => {
                    t.as_input.max = true;
                    t.rows = true;
                }
            }
            plan.features.push(Binned {
                tensor,
                feature: f.feature,
                empty,
            });
        }
        plan
    }

    fn empty_interval(&self) -> Vec<Accumulator> {
        self.features
            .iter()
            .map(|f| Accumulator {
                moments: Moments::default(),
                histogram: f.empty.clone(),
                skipped: 0,
            })
            .collect()
    }
}

/// A tensor's rows along its last axis are this long (a scalar is one
/// row of one).
fn row_len(tensor: &Tensor) -> usize {
    tensor.shape.last().copied().unwrap_or(1)
}

impl DriftCollector {
    /// A collector binning what `spec` names (already validated with the
    /// signed document).
    pub fn new(spec: DriftSpec) -> Self {
        let plan = Plan::new(&spec);
        let interval = Mutex::new(plan.empty_interval());
        Self {
            spec,
            plan,
            interval,
        }
    }

    /// The spec it bins by.
    pub fn spec(&self) -> &DriftSpec {
        &self.spec
    }

    /// Before inference: one pass over each input the spec names.
    pub fn input_features(&self, inputs: &[Tensor]) -> InputFeatures {
        InputFeatures {
            tensors: self
                .plan
                .tensors
                .iter()
                .map(|t| {
                    let input = inputs.iter().find(|i| i.name == t.name)?;
                    Some(Summary::of(&input.data, t.as_input))
                })
                .collect(),
        }
    }

    /// After a successful inference: computes the output features and
    /// adds this request's values to the interval.
    pub fn record(&self, features: InputFeatures, outputs: &[Tensor]) {
        let sources: Vec<Source> = self
            .plan
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if let Some(Some(summary)) = features.tensors.get(i) {
                    return Source::Input(*summary);
                }
                let Some(output) = outputs.iter().find(|o| o.name == t.name) else {
                    return Source::Missing;
                };
                Source::Output {
                    whole: t
                        .as_output
                        .any()
                        .then(|| Summary::of(&output.data, t.as_output)),
                    rows: if t.rows {
                        row_maxima(&output.data, row_len(output))
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        let mut interval = self.interval.lock().unwrap_or_else(PoisonError::into_inner);
        for (binned, acc) in self.plan.features.iter().zip(interval.iter_mut()) {
            let Some(source) = sources.get(binned.tensor) else {
                acc.skipped += 1;
                continue;
            };
            match (source, binned.feature) {
                (Source::Missing, _) => acc.skipped += 1,
                (Source::Input(s), feature) => acc.push(whole_tensor(s, feature)),
                (Source::Output { rows, .. }, Feature::Argmax | Feature::MaxValue) => {
                    let mut any = false;
                    for row in rows.iter().flatten() {
                        any = true;
                        acc.push(Some(match binned.feature {
                            Feature::Argmax => row.index as f64,
                            _ => row.value,
                        }));
                    }
                    if !any {
                        acc.skipped += 1;
                    }
                }
                (Source::Output { whole, .. }, feature) => {
                    acc.push(whole.as_ref().and_then(|s| whole_tensor(s, feature)))
                }
            }
        }
    }

    /// The interval's statistics, one entry per feature in spec order;
    /// the next interval starts empty.
    pub fn take(&self) -> DriftTelemetry {
        let fresh = self.plan.empty_interval();
        let taken = std::mem::replace(
            &mut *self.interval.lock().unwrap_or_else(PoisonError::into_inner),
            fresh,
        );
        DriftTelemetry {
            features: self
                .plan
                .features
                .iter()
                .zip(taken)
                .map(|(binned, acc)| {
                    let tensor = &self.plan.tensors[binned.tensor].name;
                    if acc.skipped > 0 {
                        tracing::warn!(
                            %tensor,
                            feature = binned.feature.as_str(),
                            skipped = acc.skipped,
                            binned = acc.moments.count,
                            "drift feature had no value in some requests (tensor missing, empty or not finite)"
                        );
                    }
                    FeatureStats {
                        tensor: tensor.clone(),
                        feature: binned.feature,
                        moments: acc.moments,
                        histogram: acc.histogram,
                    }
                })
                .collect(),
        }
    }
}

/// A whole-tensor feature's value from its summary.
fn whole_tensor(s: &Summary, feature: Feature) -> Option<f64> {
    match feature {
        Feature::Mean => s.mean(),
        Feature::Std => s.std(),
        Feature::Min => s.min(),
        Feature::Max | Feature::MaxValue => s.max(),
        Feature::Argmax => s.argmax(),
    }
}
