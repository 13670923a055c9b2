//! The update task: takes desired-state messages from the uplink, decides
//! with [`crate::update`], and carries the steps out (download, install,
//! load, test vector, atomic activation, soak), driving each version
//! through [`crate::activation::Phase`] and reporting every outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_shared::{DesiredState, DeviceId, EventKind, ModelSlot, SoakPolicy, VerifyError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::activation::{judge, Failure, Input, Judgement, Phase, Window};
use crate::download::Downloader;
use crate::engine::{Check, Engine, EngineError, Runtimes, Selection};
use crate::model_store::{
    InstalledModel, ModelStore, Soaking, MAX_DIED_LOADING, MAX_SOAK_RESTARTS,
};
use crate::probe::{self, Refusal, Subject};
use crate::registry::{ModelRegistry, ServedModel};
use crate::report::refusals::{self, RefusalCollapser, RefusalKind};
use crate::report::Reporter;
use crate::stats::Counts;
use crate::trust::TrustStore;
use crate::update::{assess, envelope_digest, plan, Serving, Step, TrustView, Verdict};
use crate::uplink::FromFleet;

/// How often soaking versions are judged.
const SOAK_CHECK: Duration = Duration::from_secs(1);

/// A version being watched after its activation.
#[derive(Debug)]
struct Watch {
    model: Arc<ServedModel>,
    policy: SoakPolicy,
    /// Unix seconds of the activation.
    since: u64,
    baseline: Option<Window>,
    desired_version: Option<u64>,
}

/// A rollback done at start-up, before the updater could report it.
#[derive(Debug, Clone)]
pub struct StartupRollback {
    pub name: String,
    pub version: u64,
    pub reason: String,
}

/// The monotonic time refusals are counted in: tokio's clock, the one the
/// summary timer sleeps on (the wall clock may jump on boards without one).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn window(counts: &Counts) -> Window {
    Window {
        requests: counts.successes + counts.failures,
        errors: counts.failures,
        p95_us: counts.percentile_us(0.95),
    }
}

pub struct Updater {
    pub device: DeviceId,
    pub trust: TrustStore,
    pub store: ModelStore,
    pub registry: ModelRegistry,
    pub downloader: Downloader,
    pub reporter: Reporter,
    pub loading: Loading,
    /// Rollbacks [`serve_installed`] made, reported once connected.
    pub startup_rollbacks: Vec<StartupRollback>,
    watches: Vec<Watch>,
    /// The last desired state refused for its signing key or because the
    /// trusted root had expired: it is tried again when a newer root
    /// arrives (the chain and the document it signs may arrive in either
    /// order).
    unknown_signer: Option<Vec<u8>>,
    server_keys: Option<crate::uplink::ServerKeys>,
    /// Which refusals are reported, and the count of those that are not.
    refusals: RefusalCollapser,
}

/// How models are matched to runtimes on this device.
#[derive(Debug, Clone)]
pub struct Loading {
    pub runtimes: Runtimes,
    /// Serve every model with this runtime (config `runtime.pin`).
    pub pin: Option<String>,
    /// Where panics abort the process: new versions are first loaded in a
    /// child process ([`crate::probe`]).
    pub probe: Option<crate::probe::Probe>,
}

/// Loads a model file in every suitable runtime on a blocking thread,
/// checks each (the slot's signed test vector, or cross-comparison) and
/// keeps the fastest correct one.
pub async fn load_engine(
    installed: &InstalledModel,
    loading: &Loading,
) -> Result<Selection, Failure> {
    let installed = installed.clone();
    let loading = loading.clone();
    tokio::task::spawn_blocking(move || select_engine(&installed, &loading))
        .await
        .map_err(|e| Failure::Load(format!("loader task failed: {e}")))?
}

/// [`load_engine`]'s work, on the calling thread.
pub fn select_engine(installed: &InstalledModel, loading: &Loading) -> Result<Selection, Failure> {
    let (path, slot) = (&installed.path, &installed.slot);
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::Load(format!("cannot read {}: {e}", path.display())))?;
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
        .map_err(|e| match e {
            EngineError::Incorrect(_) => Failure::TestVector(e.to_string()),
            e => Failure::Load(e.to_string()),
        })?;
    check_declared_interface(selection.engine.as_ref(), slot).map_err(Failure::Load)?;
    Ok(selection)
}

/// Serves every model the store has active. Used at start-up, before any
/// network, so a device that reboots offline serves at once. A version
/// that was soaking counts one more start; one that has now started
/// [`MAX_SOAK_RESTARTS`] times without finishing its soak is taken to be
/// what keeps bringing the agent down, and the previous version is served
/// instead. Returns those rollbacks, for the updater to report.
pub async fn serve_installed(
    store: &ModelStore,
    registry: &ModelRegistry,
    loading: &Loading,
) -> anyhow::Result<Vec<StartupRollback>> {
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
        match load_engine(&installed, loading).await {
            Ok(selection) => {
                tracing::info!(model = %name, version = installed.slot.version, runtime = selection.engine.runtime(), "serving installed model");
                registry.insert(served(&installed, selection));
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "installed model failed to load")
            }
        }
    }
    Ok(rollbacks)
}

fn served(installed: &InstalledModel, selection: Selection) -> ServedModel {
    let slot = &installed.slot;
    let mut model = ServedModel::new(
        slot.name.clone(),
        slot.version,
        slot.sha256.clone(),
        slot.format,
        selection,
    );
    model.upload_results = slot.upload_results;
    model
}

/// Checks the engine against the inputs the desired state declares.
fn check_declared_interface(engine: &dyn Engine, slot: &ModelSlot) -> Result<(), String> {
    for (kind, declared, actual) in [
        ("input", &slot.inputs, engine.inputs()),
        ("output", &slot.outputs, engine.outputs()),
    ] {
        for d in declared {
            let a = actual.iter().find(|s| s.name == d.name).ok_or_else(|| {
                let names: Vec<&str> = actual.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "model has no {kind} {:?} declared in the desired state (it has {names:?})",
                    d.name
                )
            })?;
            if a.datatype.as_str() != d.datatype {
                return Err(format!(
                    "{kind} {:?} is {} in the model but {} in the desired state",
                    d.name, a.datatype, d.datatype
                ));
            }
        }
    }
    Ok(())
}

impl Updater {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: DeviceId,
        trust: TrustStore,
        store: ModelStore,
        registry: ModelRegistry,
        downloader: Downloader,
        reporter: Reporter,
        loading: Loading,
        startup_rollbacks: Vec<StartupRollback>,
    ) -> Self {
        Self {
            device,
            trust,
            store,
            registry,
            downloader,
            reporter,
            loading,
            startup_rollbacks,
            watches: Vec::new(),
            unknown_signer: None,
            server_keys: None,
            refusals: RefusalCollapser::default(),
        }
    }

    /// Keeps `keys` (what the uplink checks receipts and the server's
    /// status against) in step with the trusted root as it rotates.
    pub fn share_server_keys(&mut self, keys: crate::uplink::ServerKeys) {
        keys.set(self.trust.root());
        self.server_keys = Some(keys);
    }

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

    /// Runs until `shutdown`, applying each desired state that arrives and
    /// watching soaking versions.
    pub async fn run(
        mut self,
        mut desired_rx: mpsc::Receiver<FromFleet>,
        shutdown: CancellationToken,
    ) {
        self.resume().await;
        let mut tick = tokio::time::interval(SOAK_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let summary_due = self.refusals.next_due();
            let summary_at = tokio::time::Instant::from_std(summary_due.unwrap_or_else(now));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = desired_rx.recv() => match msg {
                    Some(FromFleet::Desired(payload)) => self.handle(&payload).await,
                    Some(FromFleet::Roots(payload)) => self.handle_roots(&payload).await,
                    None => break,
                },
                _ = tick.tick(), if !self.watches.is_empty() => self.check_soaks().await,
                _ = tokio::time::sleep_until(summary_at), if summary_due.is_some() => {
                    self.report_due_refusals(now());
                }
            }
        }
        // Summaries still waiting; best effort, as the outbox writer may
        // already have written its last batch.
        for refusal in self.refusals.drain() {
            self.report_refusal(refusal);
        }
    }

    /// Passes a refusal through the collapser and reports what it says to.
    fn refuse(&mut self, kind: RefusalKind, desired_version: Option<u64>, reason: String) {
        tracing::debug!(%kind, %reason, "refused");
        let refusal = refusals::Refusal {
            kind,
            desired_version,
            reason,
        };
        for refusal in self.refusals.refused(refusal, now()) {
            self.report_refusal(refusal);
        }
    }

    /// Reports the summaries of repeated refusals due by `now`.
    fn report_due_refusals(&mut self, now: Instant) {
        for refusal in self.refusals.due(now) {
            self.report_refusal(refusal);
        }
    }

    fn report_refusal(&self, refusal: refusals::Refusal) {
        tracing::warn!(reason = %refusal.reason, "{} refused", refusal.kind.document());
        self.reporter.event(
            EventKind::Refused,
            refusal.desired_version,
            None,
            Some(refusal.reason),
        );
    }

    /// After a restart: report rollbacks made at start, go on watching
    /// versions that were soaking, and finish applying the last accepted
    /// desired state.
    async fn resume(&mut self) {
        for r in std::mem::take(&mut self.startup_rollbacks) {
            self.reporter.event(
                EventKind::RolledBack,
                self.trust.desired_version(),
                Some((&r.name, r.version)),
                Some(r.reason),
            );
        }
        let desired = self.trust.desired().cloned().and_then(|envelope| {
            DesiredState::verify(
                &envelope,
                self.trust.root(),
                &self.device,
                edgefleet_shared::unix_now(),
            )
            .map_err(|e| tracing::warn!(error = %e, "stored desired state no longer valid; waiting for a new one"))
            .ok()
        });
        for model in self.registry.all() {
            let Ok(Some(pointer)) = self.store.active_pointer(&model.name) else {
                continue;
            };
            let (Some(soaking), Ok(installed)) = (
                pointer.soaking,
                self.store.load_version(&model.name, pointer.version),
            ) else {
                continue;
            };
            if let Some(policy) = installed.slot.soak.clone() {
                tracing::info!(model = %model.name, version = model.version, "still soaking after a restart");
                self.watches.push(Watch {
                    model,
                    policy,
                    since: soaking.since,
                    baseline: soaking.baseline.map(|(requests, errors, p95_us)| Window {
                        requests,
                        errors,
                        p95_us,
                    }),
                    desired_version: desired.as_ref().map(|d| d.version),
                });
            }
        }
        if let Some(doc) = desired {
            self.reconcile(&doc).await;
        }
        self.publish_status();
    }

    pub async fn handle(&mut self, payload: &[u8]) {
        let serving = self.serving();
        let trust = TrustView {
            root: self.trust.root(),
            device: &self.device,
            desired_version: self.trust.desired_version(),
            desired_digest: self.trust.desired().map(envelope_digest),
            serving: &serving,
        };
        match assess(payload, trust, edgefleet_shared::unix_now()) {
            Verdict::AlreadyApplied => {}
            Verdict::Refuse(e) => {
                // Kept for when a newer root arrives: one that trusts its
                // signer, or a fresh one after the trusted root expired.
                if matches!(
                    e,
                    VerifyError::UnknownKey { .. }
                        | VerifyError::ThresholdNotMet { .. }
                        | VerifyError::RootExpired { .. }
                ) {
                    self.unknown_signer = Some(payload.to_vec());
                }
                let offered = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v["signed"]["version"].as_u64());
                self.refuse(RefusalKind::desired(&e), offered, e.to_string());
            }
            Verdict::Apply(boxed) => {
                let (envelope, doc) = *boxed;
                if let Err(e) = self.trust.accept_desired(&envelope, doc.version) {
                    tracing::error!(error = %e, "cannot persist desired state");
                    self.refuse(
                        RefusalKind::DESIRED_NOT_STORED,
                        Some(doc.version),
                        e.to_string(),
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

    /// Walks the root chain forward; then retries a desired state that was
    /// refused for its signer, which the new root may trust.
    pub async fn handle_roots(&mut self, payload: &[u8]) {
        let chain: Vec<edgefleet_shared::Signed> = match serde_json::from_slice(payload) {
            Ok(chain) => chain,
            Err(e) => {
                let reason = format!("root chain is not a JSON array of signed documents: {e}");
                self.refuse(RefusalKind::ROOT_CHAIN_NOT_JSON, None, reason);
                return;
            }
        };
        let accepted = match self.trust.walk_roots(&chain) {
            Ok(accepted) => accepted,
            Err((accepted, e)) => {
                self.refuse(RefusalKind::root_chain(&e), None, e.to_string());
                accepted
            }
        };
        if accepted.is_empty() {
            return;
        }
        if let Some(keys) = &self.server_keys {
            keys.set(self.trust.root());
        }
        if let Some(pending) = self.unknown_signer.take() {
            self.handle(&pending).await;
        }
        self.publish_status();
    }

    /// Records that `slot` failed here for good: it is never installed again.
    fn reject(&self, slot: &ModelSlot, failure: &Failure) {
        if let Err(e) =
            self.store
                .reject(&slot.name, slot.version, &slot.sha256, &failure.to_string())
        {
            tracing::error!(error = %e, "cannot record the rejected version");
        }
    }

    /// Whether this device already found `slot` bad.
    fn rejected(&self, slot: &ModelSlot) -> bool {
        self.store.rejected(&slot.name).is_ok_and(|list| {
            list.iter()
                .any(|r| r.version == slot.version && r.sha256 == slot.sha256)
        })
    }

    async fn reconcile(&mut self, doc: &DesiredState) {
        for step in plan(doc, &self.serving()) {
            match step {
                Step::Install(slot) if self.rejected(&slot) => {
                    tracing::debug!(model = %slot.name, version = slot.version, "version failed here before; not installed again");
                }
                Step::Install(slot) => {
                    let phase = self.install(&slot, doc.version).await;
                    let model = Some((slot.name.as_str(), slot.version));
                    match phase {
                        Phase::Failed(failure) => {
                            let kind = match failure {
                                Failure::Download(_) => EventKind::DownloadFailed,
                                _ => EventKind::ActivationFailed,
                            };
                            tracing::error!(model = %slot.name, version = slot.version, reason = %failure, "model not activated; previous version keeps serving");
                            // A model that is wrong on this hardware stays
                            // wrong: never try it again. Downloads are
                            // retried with the next desired state or start.
                            if matches!(failure, Failure::TestVector(_)) {
                                self.reject(&slot, &failure);
                            }
                            self.reporter.event(
                                kind,
                                Some(doc.version),
                                model,
                                Some(failure.to_string()),
                            );
                        }
                        phase => {
                            tracing::info!(model = %slot.name, version = slot.version, ?phase, "model activated");
                            self.reporter.event(
                                EventKind::Activated,
                                Some(doc.version),
                                model,
                                None,
                            );
                            // Loading and selecting runtimes ran code the
                            // idle agent does not need resident.
                            crate::trim::page_out_after(Duration::from_secs(2));
                            if phase == Phase::Confirmed {
                                self.reporter.event(
                                    EventKind::Confirmed,
                                    Some(doc.version),
                                    model,
                                    None,
                                );
                            }
                        }
                    }
                }
                Step::Remove(name) => {
                    self.watches.retain(|w| w.model.name != name);
                    self.registry.remove(&name);
                    if let Err(e) = self.store.deactivate(&name) {
                        tracing::error!(model = %name, error = %e, "could not remove model files");
                    }
                    tracing::info!(model = %name, "model no longer desired; stopped serving it");
                }
            }
        }
        let wanted: Vec<&str> = doc.models.iter().map(|m| m.sha256.as_str()).collect();
        self.store.clean_staging(&wanted);
    }

    /// Takes one version from verified to serving (or to a failure with
    /// its reason); returns the phase it ended in.
    async fn install(&mut self, slot: &ModelSlot, desired_version: u64) -> Phase {
        let step = |phase: Phase, input: Input| {
            phase
                .next(input)
                .expect("the updater follows the activation state machine")
        };
        let mut phase = step(Phase::Verified, Input::DownloadStarted);
        let staging = self.store.staging_path(&slot.sha256);
        if let Err(e) = self.downloader.fetch(slot, &staging).await {
            return step(phase, Input::Failed(Failure::Download(e.to_string())));
        }
        phase = step(phase, Input::DownloadDone);
        let installed = match self.store.install(slot, &staging) {
            Ok(installed) => installed,
            Err(e) => return step(phase, Input::Failed(Failure::Load(e.to_string()))),
        };
        // The load is noted first: an agent that dies during it (a power
        // cut, an OOM kill, or a runtime crash where no probe process could
        // run) finds the note at its next try, and after MAX_DIED_LOADING
        // such deaths refuses the version instead of looping through
        // restarts.
        match self
            .store
            .begin_load(&slot.name, slot.version, &slot.sha256)
        {
            Ok(died) if died >= MAX_DIED_LOADING => {
                let failure = Failure::Load(format!(
                    "the agent died {died} times while loading this version (a runtime crashed on it, or the process was killed); it is not loaded again"
                ));
                self.reject(slot, &failure);
                let _ = self.store.end_load(&slot.name);
                return step(phase, Input::Failed(failure));
            }
            Ok(_) => {}
            Err(e) => return step(phase, Input::Failed(Failure::Load(e.to_string()))),
        }
        // Loading and checking happen together: every runtime loads it,
        // then each is run on the signed test vector. Where a panic would
        // abort the agent, a child process does it first.
        let subject = Subject::Installed(installed.dir());
        let loaded = match probe::gate(self.loading.probe.as_ref(), subject).await {
            Ok(()) => load_engine(&installed, &self.loading).await,
            Err(Refusal::Failed(failure)) => Err(failure),
            Err(Refusal::Crashed(reason)) => {
                // It would do the same to the agent: never try it again.
                let failure = Failure::Load(reason);
                self.reject(slot, &failure);
                Err(failure)
            }
        };
        if let Err(e) = self.store.end_load(&slot.name) {
            tracing::warn!(error = %e, "cannot clear the loading mark");
        }
        let selection = match loaded {
            Ok(selection) => selection,
            Err(f @ Failure::TestVector(_)) => {
                phase = step(phase, Input::LoadDone);
                return step(phase, Input::Failed(f));
            }
            Err(f) => return step(phase, Input::Failed(f)),
        };
        phase = step(phase, Input::LoadDone);
        phase = step(phase, Input::TestPassed);
        let previous = self.registry.get(&slot.name);
        let baseline = previous.as_ref().map(|m| window(&m.stats.counts()));
        let since = edgefleet_shared::unix_now();
        let soaking = slot.soak.as_ref().map(|_| Soaking {
            since,
            restarts: 0,
            baseline: baseline.map(|w| (w.requests, w.errors, w.p95_us)),
        });
        if let Err(e) = self.store.activate(&slot.name, slot.version, soaking) {
            return step(phase, Input::Failed(Failure::Activate(e.to_string())));
        }
        let model = Arc::new(served(&installed, selection));
        self.registry.insert_arc(model.clone());
        phase = step(phase, Input::Activated);
        self.watches.retain(|w| w.model.name != slot.name);
        match &slot.soak {
            Some(policy) => {
                self.watches.push(Watch {
                    model,
                    policy: policy.clone(),
                    since,
                    baseline,
                    desired_version: Some(desired_version),
                });
                step(phase, Input::SoakStarted { policy: true })
            }
            None => step(phase, Input::SoakStarted { policy: false }),
        }
    }

    /// Judges every soaking version; confirms or rolls back those whose
    /// verdict is in.
    async fn check_soaks(&mut self) {
        let now = edgefleet_shared::unix_now();
        let mut still = Vec::new();
        for watch in std::mem::take(&mut self.watches) {
            let new = window(&watch.model.stats.counts());
            let elapsed = now.saturating_sub(watch.since);
            let name = watch.model.name.clone();
            let model = Some((name.as_str(), watch.model.version));
            match judge(&watch.policy, new, watch.baseline, elapsed) {
                Judgement::Continue => still.push(watch),
                Judgement::Confirm => {
                    tracing::info!(model = %name, version = watch.model.version, "soak passed");
                    if let Err(e) = self.store.confirm(&name) {
                        tracing::error!(error = %e, "cannot record the confirmation");
                    }
                    self.reporter
                        .event(EventKind::Confirmed, watch.desired_version, model, None);
                }
                Judgement::Breach(reason) => {
                    tracing::error!(model = %name, version = watch.model.version, %reason, "soak breached; rolling back");
                    self.roll_back(&watch, &reason).await;
                    self.reporter.event(
                        EventKind::RolledBack,
                        watch.desired_version,
                        model,
                        Some(reason),
                    );
                    self.publish_status();
                }
            }
        }
        self.watches = still;
    }

    /// Serves the previous version of a breaching model again.
    async fn roll_back(&mut self, watch: &Watch, reason: &str) {
        let name = &watch.model.name;
        let previous = match self.store.roll_back(name, reason) {
            Ok(Some(previous)) => previous,
            Ok(None) => {
                tracing::warn!(model = %name, "no previous version to roll back to; the new one keeps serving");
                return;
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "rollback failed");
                return;
            }
        };
        // The previous version's engine is gone; load it again (on the
        // updater task: nothing else is installed meanwhile).
        let installed = match self.store.load_version(name, previous) {
            Ok(installed) => installed,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "previous version unreadable");
                return;
            }
        };
        match load_engine(&installed, &self.loading).await {
            Ok(selection) => {
                self.registry.insert(served(&installed, selection));
                tracing::info!(model = %name, version = previous, "previous version serving again");
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "previous version failed to load")
            }
        }
    }

    fn publish_status(&self) {
        self.reporter
            .status(self.trust.desired_version(), self.registry.statuses());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use edgefleet_shared::{RootDocument, SecretKey, Signed, UpdateEvent};
    use tokio::sync::watch;

    use super::*;
    use crate::outbox::{OutboxHandle, Sequence, Stream, StreamPolicy};
    use crate::report::refusals::REFUSAL_PERIOD;

    /// An updater on a fresh data directory trusting `online` for desired
    /// states, with the outbox it reports to.
    fn updater(dir: &std::path::Path, online: &SecretKey) -> (Updater, OutboxHandle) {
        let root_key = SecretKey::from_seed([1; 32]);
        let root = RootDocument::new(1, u64::MAX, &[root_key.public()], 1, &[online.public()]);
        let pinned = dir.join("root.json");
        std::fs::write(&pinned, Signed::sign(&root, &[&root_key]).to_json()).unwrap();
        let outbox = OutboxHandle::open(
            &dir.join("outbox.db"),
            Stream::ALL.map(StreamPolicy::default_for),
            1 << 30,
            1000,
            Sequence::persistent(&dir.join("seq")).unwrap(),
        )
        .unwrap();
        let device = DeviceId::new("pi-1").unwrap();
        let updater = Updater::new(
            device.clone(),
            TrustStore::open(dir, &pinned).unwrap(),
            ModelStore::open(dir).unwrap(),
            ModelRegistry::default(),
            Downloader::new(Duration::from_secs(5), 1),
            Reporter::new(
                device,
                outbox.clone(),
                watch::channel(None).0,
                watch::channel(None).0,
            ),
            Loading {
                runtimes: crate::engine::Runtimes::builtin(),
                pin: None,
                probe: None,
            },
            Vec::new(),
        );
        (updater, outbox)
    }

    /// A desired state `version` with no models, signed by `key`.
    fn desired(key: &SecretKey, version: u64) -> Vec<u8> {
        let now = edgefleet_shared::unix_now();
        let doc = DesiredState::new(
            DeviceId::new("pi-1").unwrap(),
            version,
            now,
            now + 3600,
            vec![],
        );
        Signed::sign(&doc, &[key]).to_json()
    }

    fn events(outbox: &OutboxHandle) -> Vec<UpdateEvent> {
        outbox.flush().unwrap();
        outbox
            .next_batch(100_000, &HashSet::new())
            .unwrap()
            .into_iter()
            .filter(|r| r.stream == Stream::Events)
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_flood_of_replayed_desired_states_makes_two_refused_events() {
        let dir = tempfile::tempdir().unwrap();
        let online = SecretKey::from_seed([2; 32]);
        let (mut updater, outbox) = updater(dir.path(), &online);
        updater.handle(&desired(&online, 10_001)).await;
        // A broker replays 10,000 old, genuinely signed desired states,
        // each refused as a rollback with its own version in the reason;
        // half way through the fleet publishes a real new one.
        for version in 1..=10_000 {
            updater.handle(&desired(&online, version)).await;
            if version == 5_000 {
                updater.handle(&desired(&online, 10_002)).await;
            }
        }
        updater.report_due_refusals(now() + REFUSAL_PERIOD);
        let events = events(&outbox);
        let accepted: Vec<Option<u64>> = events
            .iter()
            .filter(|e| e.kind == EventKind::Accepted)
            .map(|e| e.desired_version)
            .collect();
        assert_eq!(
            accepted,
            vec![Some(10_001), Some(10_002)],
            "genuine events are all there"
        );
        let refused: Vec<&UpdateEvent> = events
            .iter()
            .filter(|e| e.kind == EventKind::Refused)
            .collect();
        assert_eq!(refused.len(), 2, "{refused:#?}");
        assert_eq!(refused[0].desired_version, Some(1));
        assert!(
            refused[0]
                .reason
                .as_deref()
                .unwrap()
                .starts_with("desired state version 1 is not newer"),
            "{:?}",
            refused[0].reason
        );
        assert_eq!(refused[1].desired_version, Some(10_000));
        let summary = refused[1].reason.as_deref().unwrap();
        assert!(
            summary.starts_with("desired state version 10000 is not newer"),
            "{summary}"
        );
        assert!(
            summary.ends_with("(and 9,998 more like it within 60 s)"),
            "{summary}"
        );
        // Nothing more is due: the next refusal after a quiet period is
        // reported at once.
        updater.report_due_refusals(now() + 2 * REFUSAL_PERIOD);
        assert!(events_after(&outbox, &events).is_empty());
    }

    /// Events stored since `before` was read.
    fn events_after(outbox: &OutboxHandle, before: &[UpdateEvent]) -> Vec<UpdateEvent> {
        let seen: HashSet<u64> = before.iter().map(|e| e.seq).collect();
        events(outbox)
            .into_iter()
            .filter(|e| !seen.contains(&e.seq))
            .collect()
    }
}
