//! Serving the installed models at start-up, before any network, so a
//! device that reboots offline serves at once; and rolling back a version
//! whose soak the agent keeps dying in.

use crate::engine::load::{load_installed, Loading};
use crate::model_store::{ModelStore, StoreError, MAX_SOAK_RESTARTS};
use crate::registry::ModelRegistry;

/// A rollback done at start-up, before the update task could report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupRollback {
    /// The model rolled back.
    pub name: String,
    /// The version taken out of service.
    pub version: u64,
    /// Why, for the report.
    pub reason: String,
}

/// Serves every model the store has active. A version that was soaking
/// counts one more start; one that has now started [`MAX_SOAK_RESTARTS`]
/// times without finishing its soak is taken to be what keeps bringing
/// the agent down, and the previous version is served instead. Returns
/// those rollbacks, for the update task to report. A version that does
/// not load is logged and not served; only a store that cannot be read is
/// an error.
pub async fn serve_installed(
    store: &ModelStore,
    registry: &ModelRegistry,
    loading: &Loading,
) -> Result<Vec<StartupRollback>, StoreError> {
    let mut rollbacks = Vec::new();
    for installed in store.active_models()? {
        let name = installed.slot.name.clone();
        let mut installed = installed;
        let pointer = store.count_restart(&name)?;
        if let Some(soaking) = pointer.as_ref().and_then(|p| p.soaking.as_ref()) {
            if soaking.restarts >= MAX_SOAK_RESTARTS {
                let reason = format!(
                    "the agent restarted {} times while version {} soaked",
                    soaking.restarts, installed.slot.version
                );
                tracing::error!(model = %name, %reason, "rolling back");
                if let Some(previous) = store.roll_back(&name, &reason)? {
                    rollbacks.push(StartupRollback {
                        name: name.clone(),
                        version: installed.slot.version,
                        reason,
                    });
                    installed = store.load_version(&name, previous)?;
                }
            }
        }
        match load_installed(&installed, loading).await {
            Ok(selection) => {
                tracing::info!(model = %name, version = installed.slot.version, runtime = selection.engine.runtime(), "serving installed model");
                registry.insert(super::served(&installed, selection));
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "installed model failed to load")
            }
        }
    }
    Ok(rollbacks)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use edgefleet_shared::{ModelFormat, ModelSlot};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::engine::Runtimes;
    use crate::model_store::Soaking;

    /// Installs the repository model `file` as `version` of "digits".
    fn install(store: &ModelStore, version: u64, file: &str) {
        install_with_drift(store, version, file, None)
    }

    fn install_with_drift(
        store: &ModelStore,
        version: u64,
        file: &str,
        drift: Option<edgefleet_shared::quality::DriftSpec>,
    ) {
        let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let slot = ModelSlot {
            name: "digits".into(),
            version,
            format: ModelFormat::Onnx,
            sha256: sha256.clone(),
            size: bytes.len() as u64,
            urls: vec![],
            inputs: vec![],
            outputs: vec![],
            test_vector: None,
            soak: None,
            upload_results: false,
            zstd: None,
            shadow: None,
            split: None,
            drift,
        };
        let staged = store.staging_path(&sha256);
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, &bytes).unwrap();
        store.install(&slot, &staged).unwrap();
    }

    #[tokio::test]
    async fn a_version_the_agent_keeps_dying_in_while_it_soaks_is_rolled_back_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        install(&store, 1, "../models/digits/digits_fp32.onnx");
        store.activate("digits", 1, None).unwrap();
        install(&store, 2, "../models/digits/digits_int8.onnx");
        let soaking = Soaking {
            since: 1_000,
            restarts: 0,
            baseline: None,
        };
        store.activate("digits", 2, Some(soaking)).unwrap();
        let loading = Loading {
            runtimes: Runtimes::builtin(),
            pin: None,
        };
        // Each start while version 2 soaks counts; below the limit it is
        // served again.
        for start in 1..MAX_SOAK_RESTARTS {
            let registry = ModelRegistry::default();
            let rollbacks = serve_installed(&store, &registry, &loading).await.unwrap();
            assert!(rollbacks.is_empty(), "start {start}: {rollbacks:?}");
            assert_eq!(registry.get("digits").map(|m| m.version), Some(2));
        }
        let registry = ModelRegistry::default();
        let rollbacks = serve_installed(&store, &registry, &loading).await.unwrap();
        assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
        assert_eq!(
            (rollbacks[0].name.as_str(), rollbacks[0].version),
            ("digits", 2)
        );
        assert!(
            rollbacks[0]
                .reason
                .contains(&format!("restarted {MAX_SOAK_RESTARTS} times")),
            "{}",
            rollbacks[0].reason
        );
        assert_eq!(registry.get("digits").map(|m| m.version), Some(1));
        let pointer = store.active_pointer("digits").unwrap().unwrap();
        assert_eq!((pointer.version, pointer.soaking), (1, None));
        assert_eq!(store.rejected("digits").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_model_served_from_the_store_bins_drift_as_its_slot_asks() {
        use edgefleet_shared::quality::{DriftSpec, Feature, FeatureBins};

        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let spec = DriftSpec {
            features: vec![FeatureBins {
                tensor: "input".into(),
                feature: Feature::Mean,
                lo: 0.0,
                hi: 16.0,
                bins: 16,
            }],
        };
        install_with_drift(
            &store,
            1,
            "../models/digits/digits_fp32.onnx",
            Some(spec.clone()),
        );
        store.activate("digits", 1, None).unwrap();
        let loading = Loading {
            runtimes: Runtimes::builtin(),
            pin: None,
        };
        // A start with no desired state to apply (none stored, or expired).
        let registry = ModelRegistry::default();
        serve_installed(&store, &registry, &loading).await.unwrap();
        let model = registry.get("digits").unwrap();
        let collector = model
            .quality
            .drift()
            .expect("drift collector attached at start");
        assert_eq!(collector.spec(), &spec);
    }
}
