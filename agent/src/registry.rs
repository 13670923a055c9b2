//! The models the agent is serving right now.
//!
//! Requests take an `Arc` to a [`ServedModel`] and keep using it even if an
//! update swaps a new version in meanwhile; the swap itself is one pointer
//! replacement under a short write lock, so serving never pauses for an
//! update.

pub mod quality;

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use edgefleet_shared::{ModelFormat, ModelStatus};

use crate::engine::{Engine, Selection, Trial};

pub use crate::stats::ModelStats;

/// A loaded model and what it came from.
pub struct ServedModel {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub format: ModelFormat,
    pub engine: Box<dyn Engine>,
    /// How each runtime fared when the model was activated.
    pub trials: Vec<Trial>,
    pub stats: ModelStats,
    /// Queue each result for upload (the model's `upload_results`).
    pub upload_results: bool,
    /// Shadow candidate, A/B split and drift statistics, as the slot asks.
    pub quality: quality::ModelQuality,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("runtime", &self.engine.runtime())
            .finish()
    }
}

/// Models whose measured latency is below this run on the request's own
/// worker thread: handing them to the blocking pool would cost more than
/// the inference itself.
const INLINE_BELOW_US: f64 = 1000.0;
/// Below this they run as plain code on the worker: even
/// `block_in_place`'s hand-over of the worker to another thread (a thread
/// wake-up, tens of microseconds) would cost more than the model.
const DIRECT_BELOW_US: f64 = 50.0;

/// Where a request's inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On the async worker, as plain code (a few microseconds).
    Direct,
    /// On the async worker, which hands its other tasks to a new one.
    InPlace,
    /// On the blocking pool, under the request timeout.
    Pool,
}

impl ServedModel {
    /// A model ready to serve with the engine its runtime selection chose.
    pub fn new(
        name: String,
        version: u64,
        sha256: String,
        format: ModelFormat,
        selection: Selection,
    ) -> Self {
        Self {
            name,
            version,
            sha256,
            format,
            engine: selection.engine,
            trials: selection.trials,
            stats: Default::default(),
            upload_results: false,
            quality: Default::default(),
        }
    }

    /// Where to run this model's inference, from its measured latency
    /// (models never timed go to the blocking pool).
    pub fn placement(&self) -> Placement {
        let p50_us = self.trials.iter().find_map(|t| match t.outcome {
            crate::engine::TrialOutcome::Timed { p50_us, .. }
                if t.runtime == self.engine.runtime() =>
            {
                Some(p50_us)
            }
            _ => None,
        });
        match p50_us {
            Some(us) if us < DIRECT_BELOW_US => Placement::Direct,
            Some(us) if us < INLINE_BELOW_US => Placement::InPlace,
            _ => Placement::Pool,
        }
    }

    pub fn status(&self) -> ModelStatus {
        ModelStatus {
            name: self.name.clone(),
            version: self.version,
            sha256: self.sha256.clone(),
            runtime: self.engine.runtime().to_string(),
        }
    }
}

/// Name → served model, shared by the API and the updater.
#[derive(Debug, Default, Clone)]
pub struct ModelRegistry {
    /// Each change is one insert or remove, so a map whose lock a panic
    /// poisoned is still whole and goes on being used.
    models: Arc<RwLock<BTreeMap<String, Arc<ServedModel>>>>,
}

impl ModelRegistry {
    /// The model served under `name`.
    pub fn get(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Serves `model` under its name, replacing any previous version.
    pub fn insert(&self, model: ServedModel) -> Option<Arc<ServedModel>> {
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(model.name.clone(), Arc::new(model))
    }

    /// Serves an already shared model under its name.
    pub fn insert_arc(&self, model: Arc<ServedModel>) -> Option<Arc<ServedModel>> {
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(model.name.clone(), model)
    }

    /// Stops serving `name`; returns what it served.
    pub fn remove(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
    }

    /// Every served model, by name.
    pub fn all(&self) -> Vec<Arc<ServedModel>> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// What is served, as the status message reports it.
    pub fn statuses(&self) -> Vec<ModelStatus> {
        self.all().iter().map(|m| m.status()).collect()
    }
}
