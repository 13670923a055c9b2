//! Applying each slot's quality settings (drift statistics, shadow
//! candidate, A/B split) to the version it serves: a desired state may
//! change them without changing the version.
//!
//! A shadow candidate or A/B variant is fetched like a version (the same
//! verified download, size and hash checks, staging, zstd copies) but
//! kept apart in the model store's candidates, by hash, so it is never
//! served as the model's version and a restart finds it without a new
//! download. It is loaded through the same runtime selection as a
//! version (cross-checked between runtimes: its slot carries no test
//! vector of its own), so it is judged on the runtime it would serve on.
//! A spec that did not change keeps what is attached; one that did is
//! loaded afresh from the kept file; a removed one detaches. A candidate
//! or variant that cannot be fetched or loaded is reported
//! ([`EventKind::QualityFailed`]) and the served version goes on as it was.

use std::sync::Arc;

use edgefleet_shared::quality::ModelArtifact;
use edgefleet_shared::{DesiredState, EventKind, ModelSlot};

use super::Updater;
use crate::download::Artifact;
use crate::engine::load::load_installed;
use crate::engine::Selection;
use crate::model_store::InstalledModel;
use crate::registry::quality::shadow::{Candidate, Shadow};
use crate::registry::quality::split::Split;
use crate::registry::ServedModel;

impl Updater {
    pub(super) async fn apply_quality(&mut self, doc: &DesiredState) {
        for slot in &doc.models {
            let Some(model) = self.registry.get(&slot.name) else {
                continue;
            };
            if model.version != slot.version {
                continue;
            }
            model.quality.apply_drift(slot.drift.as_ref());
            self.apply_shadow(slot, &model, doc.version).await;
            self.apply_split(slot, &model, doc.version).await;
        }
    }

    /// The hashes of every candidate and variant `doc` names (their
    /// staged downloads and kept files are not cleaned).
    pub(super) fn quality_artifacts(doc: &DesiredState) -> Vec<&str> {
        let shadows = doc.models.iter().filter_map(|m| m.shadow.as_ref());
        let splits = doc.models.iter().filter_map(|m| m.split.as_ref());
        shadows
            .map(|s| s.candidate.sha256.as_str())
            .chain(splits.map(|s| s.variant.sha256.as_str()))
            .collect()
    }

    async fn apply_shadow(&mut self, slot: &ModelSlot, model: &ServedModel, desired: u64) {
        let spec = match (&slot.shadow, model.quality.shadow()) {
            (None, None) => return,
            (Some(spec), Some(current)) if current.spec() == spec => return,
            (None, Some(current)) => {
                tracing::info!(model = %slot.name, candidate = current.candidate_version(), "shadow candidate detached");
                model.quality.set_shadow(None);
                return;
            }
            (Some(spec), _) => spec,
        };
        // What ran before ran against another spec: it goes either way.
        model.quality.set_shadow(None);
        let version = spec.candidate.version;
        let attached = match self.load_artifact(slot, &spec.candidate).await {
            Ok(selection) => {
                let candidate = Candidate {
                    version,
                    engine: selection.engine,
                };
                Shadow::new(spec.clone(), candidate).map_err(|e| e.to_string())
            }
            Err(reason) => Err(reason),
        };
        match attached {
            Ok(shadow) => {
                tracing::info!(model = %slot.name, candidate = version, runtime = shadow.runtime(), sample_rate = spec.sample_rate, "shadow candidate attached");
                model.quality.set_shadow(Some(Arc::new(shadow)));
            }
            Err(reason) => self.quality_failed(slot, "shadow candidate", version, desired, reason),
        }
    }

    async fn apply_split(&mut self, slot: &ModelSlot, model: &ServedModel, desired: u64) {
        let spec = match (&slot.split, model.quality.split()) {
            (None, None) => return,
            (Some(spec), Some(current)) if current.spec() == spec => return,
            (Some(spec), Some(current)) if current.spec().variant == spec.variant => {
                // Only the share or the experiment changed: the loaded
                // variant (and its counts) carries on.
                let variant = current.variant().clone();
                model
                    .quality
                    .set_split(Some(Arc::new(Split::new(spec.clone(), variant))));
                return;
            }
            (None, Some(current)) => {
                tracing::info!(model = %slot.name, variant = current.variant().version, "A/B split ended");
                model.quality.set_split(None);
                return;
            }
            (Some(spec), _) => spec,
        };
        model.quality.set_split(None);
        let artifact = &spec.variant;
        match self.load_artifact(slot, artifact).await {
            Ok(selection) => {
                let mut variant = ServedModel::new(
                    slot.name.clone(),
                    artifact.version,
                    artifact.sha256.clone(),
                    artifact.format,
                    selection,
                );
                variant.upload_results = slot.upload_results;
                tracing::info!(model = %slot.name, variant = artifact.version, runtime = variant.engine.runtime(), share = spec.share, experiment = %spec.experiment, "A/B split started");
                let split = Split::new(spec.clone(), Arc::new(variant));
                model.quality.set_split(Some(Arc::new(split)));
            }
            Err(reason) => {
                self.quality_failed(slot, "A/B variant", artifact.version, desired, reason)
            }
        }
    }

    fn quality_failed(
        &self,
        slot: &ModelSlot,
        what: &str,
        version: u64,
        desired: u64,
        reason: String,
    ) {
        let reason = format!(
            "{what} version {version} of model {} not attached: {reason}; version {} serves as before",
            slot.name, slot.version
        );
        tracing::error!(model = %slot.name, %reason, "{what} failed");
        self.reporter.event(
            EventKind::QualityFailed,
            Some(desired),
            Some((&slot.name, version)),
            Some(reason),
        );
    }

    /// Fetches `artifact` (unless the store kept it already) and loads it
    /// with the runtime selection a version of `slot` would get.
    async fn load_artifact(
        &self,
        slot: &ModelSlot,
        artifact: &ModelArtifact,
    ) -> Result<Selection, String> {
        let path = match self.store.candidate(&artifact.sha256, artifact.format) {
            Some(path) => path,
            None => {
                let staging = self.store.staging_path(&artifact.sha256);
                let version = artifact.version.to_string();
                let download = Artifact {
                    name: &slot.name,
                    version: &version,
                    sha256: &artifact.sha256,
                    size: artifact.size,
                    urls: &artifact.urls,
                    zstd: artifact.zstd.as_ref(),
                };
                self.fetcher
                    .fetch(&download, &staging)
                    .await
                    .map_err(|e| format!("download failed: {e}"))?;
                self.store
                    .keep_candidate(&staging, &artifact.sha256, artifact.format)
                    .map_err(|e| format!("cannot keep the file: {e}"))?
            }
        };
        // The slot's interface and shape hints, the artifact's file; the
        // slot's test vector belongs to its own version.
        let installed = InstalledModel {
            slot: ModelSlot {
                version: artifact.version,
                format: artifact.format,
                sha256: artifact.sha256.clone(),
                size: artifact.size,
                urls: artifact.urls.clone(),
                zstd: artifact.zstd.clone(),
                test_vector: None,
                shadow: None,
                split: None,
                drift: None,
                soak: None,
                ..slot.clone()
            },
            path,
        };
        load_installed(&installed, &self.loading)
            .await
            .map_err(|e| format!("does not load: {e}"))
    }
}
