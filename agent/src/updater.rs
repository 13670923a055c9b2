//! The update task: takes desired-state messages from the uplink, decides
//! with [`crate::update`], and carries the steps out (download, install,
//! load, test vector, atomic activation), reporting every outcome.

use edgefleet_shared::{DesiredState, DeviceId, EventKind, ModelSlot};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::download::Downloader;
use crate::engine::{Check, Engine, Runtimes, Selection};
use crate::model_store::{InstalledModel, ModelStore};
use crate::registry::{ModelRegistry, ServedModel};
use crate::report::Reporter;
use crate::trust::TrustStore;
use crate::update::{assess, envelope_digest, plan, Serving, Step, TrustView, Verdict};

/// Why one model of a desired state could not be activated.
#[derive(Debug, thiserror::Error)]
enum SlotError {
    #[error("{0}")]
    Download(#[from] crate::download::DownloadError),
    #[error("{0}")]
    Store(#[from] crate::model_store::StoreError),
    #[error("{0}")]
    Activation(String),
}

pub struct Updater {
    pub device: DeviceId,
    pub trust: TrustStore,
    pub store: ModelStore,
    pub registry: ModelRegistry,
    pub downloader: Downloader,
    pub reporter: Reporter,
    pub loading: Loading,
}

/// How models are matched to runtimes on this device.
#[derive(Debug, Clone)]
pub struct Loading {
    pub runtimes: Runtimes,
    /// Serve every model with this runtime (config `runtime.pin`).
    pub pin: Option<String>,
}

/// Loads a model file in every suitable runtime on a blocking thread,
/// checks each (the slot's signed test vector, or cross-comparison) and
/// keeps the fastest correct one.
pub async fn load_engine(
    installed: &InstalledModel,
    loading: &Loading,
) -> Result<Selection, String> {
    let path = installed.path.clone();
    let slot = installed.slot.clone();
    let loading = loading.clone();
    tokio::task::spawn_blocking(move || {
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let check = match &slot.test_vector {
            Some(tv) => Check::TestVector(tv),
            None => Check::CrossCompare,
        };
        let selection = loading
            .runtimes
            .select(
                slot.format,
                &bytes,
                &slot.inputs,
                check,
                loading.pin.as_deref(),
            )
            .map_err(|e| e.to_string())?;
        check_declared_interface(selection.engine.as_ref(), &slot)?;
        Ok(selection)
    })
    .await
    .map_err(|e| format!("loader task failed: {e}"))?
}

/// Serves every model the store has active. Used at start-up, before any
/// network, so a device that reboots offline serves at once.
pub async fn serve_installed(
    store: &ModelStore,
    registry: &ModelRegistry,
    loading: &Loading,
) -> anyhow::Result<()> {
    for installed in store.active_models()? {
        match load_engine(&installed, loading).await {
            Ok(selection) => {
                tracing::info!(model = %installed.slot.name, version = installed.slot.version, runtime = selection.engine.runtime(), "serving installed model");
                registry.insert(served(&installed, selection));
            }
            Err(e) => {
                tracing::error!(model = %installed.slot.name, error = %e, "installed model failed to load")
            }
        }
    }
    Ok(())
}

fn served(installed: &InstalledModel, selection: Selection) -> ServedModel {
    let slot = &installed.slot;
    ServedModel::new(
        slot.name.clone(),
        slot.version,
        slot.sha256.clone(),
        slot.format,
        selection,
    )
}

/// Checks the engine against the inputs the desired state declares.
fn check_declared_interface(engine: &dyn Engine, slot: &ModelSlot) -> Result<(), String> {
    for declared in &slot.inputs {
        let actual = engine
            .inputs()
            .iter()
            .find(|s| s.name == declared.name)
            .ok_or_else(|| {
                format!(
                    "model has no input {:?} declared in the desired state",
                    declared.name
                )
            })?;
        if actual.datatype.as_str() != declared.datatype {
            return Err(format!(
                "input {:?} is {} in the model but {} in the desired state",
                declared.name, actual.datatype, declared.datatype
            ));
        }
    }
    Ok(())
}

impl Updater {
    fn serving(&self) -> Vec<Serving> {
        self.registry
            .all()
            .iter()
            .map(|m| Serving {
                name: m.name.clone(),
                version: m.version,
                sha256: m.sha256.clone(),
            })
            .collect()
    }

    /// Runs until `shutdown`, applying each desired state that arrives.
    pub async fn run(
        mut self,
        mut desired_rx: mpsc::Receiver<Vec<u8>>,
        shutdown: CancellationToken,
    ) {
        self.resume().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = desired_rx.recv() => match msg {
                    Some(payload) => self.handle(&payload).await,
                    None => break,
                },
            }
        }
    }

    /// After a restart: finish applying the last accepted desired state.
    async fn resume(&mut self) {
        let Some(envelope) = self.trust.desired().cloned() else {
            self.publish_status();
            return;
        };
        match DesiredState::verify(
            &envelope,
            self.trust.root(),
            &self.device,
            edgefleet_shared::unix_now(),
        ) {
            Ok(doc) => self.reconcile(&doc).await,
            Err(e) => {
                tracing::warn!(error = %e, "stored desired state no longer valid; waiting for a new one")
            }
        }
        self.publish_status();
    }

    pub async fn handle(&mut self, payload: &[u8]) {
        let trust = TrustView {
            root: self.trust.root(),
            device: &self.device,
            desired_version: self.trust.desired_version(),
            desired_digest: self.trust.desired().map(envelope_digest),
        };
        match assess(payload, trust, edgefleet_shared::unix_now()) {
            Verdict::AlreadyApplied => {}
            Verdict::Refuse(e) => {
                tracing::warn!(reason = %e, "desired state refused");
                let offered = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v["signed"]["version"].as_u64());
                self.reporter
                    .event(EventKind::Refused, offered, None, Some(e.to_string()));
            }
            Verdict::Apply(boxed) => {
                let (envelope, doc) = *boxed;
                if let Err(e) = self.trust.accept_desired(&envelope, doc.version) {
                    tracing::error!(error = %e, "cannot persist desired state");
                    self.reporter.event(
                        EventKind::Refused,
                        Some(doc.version),
                        None,
                        Some(e.to_string()),
                    );
                    return;
                }
                tracing::info!(
                    version = doc.version,
                    models = doc.models.len(),
                    "desired state accepted"
                );
                self.reporter
                    .event(EventKind::Accepted, Some(doc.version), None, None);
                self.reconcile(&doc).await;
                self.publish_status();
            }
        }
    }

    async fn reconcile(&mut self, doc: &DesiredState) {
        for step in plan(doc, &self.serving()) {
            match step {
                Step::Install(slot) => match self.install(&slot).await {
                    Ok(runtime) => {
                        tracing::info!(model = %slot.name, version = slot.version, runtime, "model activated");
                        self.reporter.event(
                            EventKind::Activated,
                            Some(doc.version),
                            Some((&slot.name, slot.version)),
                            None,
                        );
                    }
                    Err(e) => {
                        let kind = match e {
                            SlotError::Download(_) => EventKind::DownloadFailed,
                            _ => EventKind::ActivationFailed,
                        };
                        tracing::error!(model = %slot.name, version = slot.version, error = %e, "model not activated; previous version keeps serving");
                        self.reporter.event(
                            kind,
                            Some(doc.version),
                            Some((&slot.name, slot.version)),
                            Some(e.to_string()),
                        );
                    }
                },
                Step::Remove(name) => {
                    self.registry.remove(&name);
                    if let Err(e) = self.store.deactivate(&name) {
                        tracing::error!(model = %name, error = %e, "could not remove model files");
                    }
                    tracing::info!(model = %name, "model no longer desired; stopped serving it");
                }
            }
        }
    }

    async fn install(&mut self, slot: &ModelSlot) -> Result<&'static str, SlotError> {
        let staging = self.store.staging_path(&slot.sha256);
        self.downloader.fetch(slot, &staging).await?;
        let installed = self.store.install(slot, &staging)?;
        let selection = load_engine(&installed, &self.loading)
            .await
            .map_err(SlotError::Activation)?;
        self.store.activate(&slot.name, slot.version)?;
        let runtime = selection.engine.runtime();
        self.registry.insert(served(&installed, selection));
        Ok(runtime)
    }

    fn publish_status(&self) {
        self.reporter
            .status(self.trust.desired_version(), self.registry.statuses());
    }
}
