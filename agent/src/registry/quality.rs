//! Model quality in the field, on the device: what a model slot asks
//! beyond serving one version.
//!
//! - [`drift`]: per-interval statistics of summary features of each
//!   request's inputs and outputs, binned as the slot's drift spec says.
//! - [`shadow`]: a candidate version run after the caller has its answer,
//!   on a sampled share of requests, its outputs compared with the served
//!   version's.
//! - [`split`]: an A/B test, choosing per client key which version serves.
//!
//! A request goes through [`ModelQuality::observe`] before inference and
//! [`ModelQuality::answered`] after a successful one; neither ever waits on
//! the candidate.

pub mod drift;
mod random;
pub mod shadow;
pub mod split;

use std::sync::{Arc, PoisonError, RwLock};

use edgefleet_shared::quality::DriftSpec;

use crate::tensor::Tensor;

/// What a slot's quality settings attach to one served model. Each part
/// can be replaced while the model serves (a new desired state may change
/// them without changing the version).
#[derive(Default)]
pub struct ModelQuality {
    drift: RwLock<Option<Arc<drift::DriftCollector>>>,
    shadow: RwLock<Option<Arc<shadow::Shadow>>>,
    split: RwLock<Option<Arc<split::Split>>>,
}

impl std::fmt::Debug for ModelQuality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelQuality").finish_non_exhaustive()
    }
}

/// What [`ModelQuality::observe`] kept of a request for after its answer.
#[derive(Default)]
pub struct Observed {
    drift: Option<(Arc<drift::DriftCollector>, drift::InputFeatures)>,
    shadow: Option<(Arc<shadow::Shadow>, Vec<Tensor>)>,
}

fn read<T: Clone>(lock: &RwLock<Option<T>>) -> Option<T> {
    lock.read().unwrap_or_else(PoisonError::into_inner).clone()
}

fn write<T>(lock: &RwLock<Option<T>>, value: Option<T>) {
    *lock.write().unwrap_or_else(PoisonError::into_inner) = value;
}

impl Observed {
    /// The device is busy serving: a request sampled for the shadow
    /// candidate is dropped (and counted) instead of queued.
    pub fn drop_shadow(&mut self) {
        if let Some((shadow, _)) = self.shadow.take() {
            shadow.drop_busy();
        }
    }
}

impl ModelQuality {
    pub fn drift(&self) -> Option<Arc<drift::DriftCollector>> {
        read(&self.drift)
    }

    pub fn set_drift(&self, collector: Option<Arc<drift::DriftCollector>>) {
        write(&self.drift, collector)
    }

    /// Bins by `spec` from now on; the statistics gathered so far are kept
    /// when the spec is unchanged.
    pub fn apply_drift(&self, spec: Option<&DriftSpec>) {
        match (self.drift(), spec) {
            (Some(current), Some(spec)) if current.spec() == spec => {}
            (_, spec) => {
                self.set_drift(spec.map(|s| Arc::new(drift::DriftCollector::new(s.clone()))))
            }
        }
    }

    pub fn shadow(&self) -> Option<Arc<shadow::Shadow>> {
        read(&self.shadow)
    }

    pub fn set_shadow(&self, shadow: Option<Arc<shadow::Shadow>>) {
        write(&self.shadow, shadow)
    }

    pub fn split(&self) -> Option<Arc<split::Split>> {
        read(&self.split)
    }

    pub fn set_split(&self, split: Option<Arc<split::Split>>) {
        write(&self.split, split)
    }

    /// Before inference: the input features drift needs, and a copy of the
    /// inputs when this request is sampled for the shadow candidate.
    pub fn observe(&self, inputs: &[Tensor]) -> Observed {
        let drift = self.drift().map(|d| {
            let features = d.input_features(inputs);
            (d, features)
        });
        let shadow = self
            .shadow()
            .filter(|s| s.sample())
            .map(|s| (s, inputs.to_vec()));
        Observed { drift, shadow }
    }

    /// After a successful inference: records drift statistics and hands a
    /// sampled request to the shadow queue (which drops it when full).
    pub fn answered(observed: Observed, outputs: &[Tensor]) {
        if let Some((collector, features)) = observed.drift {
            collector.record(features, outputs);
        }
        if let Some((shadow, inputs)) = observed.shadow {
            shadow.offer(inputs, outputs);
        }
    }
}
