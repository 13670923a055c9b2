//! The update task: takes desired-state messages from the uplink, decides
//! with [`super::decide`], and carries the steps out (download, install,
//! load, test vector, atomic activation, soak), driving each version
//! through [`crate::activation::Phase`] and reporting every outcome.
//!
//! Its side effects on the outside world go through narrow traits: time
//! through a [`Clock`] (expiry, soak periods, refusal summaries, the soak
//! check interval), downloads through a [`Fetcher`]. The unit tests
//! (`task/tests.rs`) drive it with a fake clock and a fake fetcher over a
//! real model store and real models.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_shared::{
    AgentSlot, DesiredState, DeviceId, EventKind, ModelSlot, SoakPolicy, VerifyError,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::decide::{assess, envelope_digest, plan, Serving, Step, TrustView, Verdict};
use super::{served, StartupRollback};
use crate::activation::{judge, Failure, Input, Judgement, Phase, Window};
use crate::agent_update::install::{AgentInstaller, AgentStep};
use crate::clock::{Clock, SystemClock};
use crate::download::{Artifact, Fetcher};
use crate::engine::load::{load_installed, Loading};
use crate::model_store::{ModelStore, Soaking, MAX_DIED_LOADING};
use crate::probe::{self, Probe, Refusal, Subject};
use crate::registry::{ModelRegistry, ServedModel};
use crate::report::refusals::{self, RefusalCollapser, RefusalKind};
use crate::report::Reporter;
use crate::stats::Counts;
use crate::trust::TrustStore;
use crate::uplink::{FromFleet, ServerKeys};

mod quality;
#[cfg(test)]
mod tests;

/// How often soaking versions are judged.
pub const SOAK_CHECK: Duration = Duration::from_secs(1);

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

fn window(counts: &Counts) -> Window {
    Window {
        requests: counts.successes + counts.failures,
        errors: counts.failures,
        p95_us: counts.percentile_us(0.95),
    }
}

/// The update task's state: what it trusts, the store it installs into,
/// the registry it serves from, and where it reports.
pub struct Updater {
    device: DeviceId,
    trust: TrustStore,
    store: ModelStore,
    registry: ModelRegistry,
    fetcher: Box<dyn Fetcher>,
    reporter: Reporter,
    loading: Loading,
    /// Where panics abort the process: new versions are first loaded in a
    /// child process (see `probe.rs`).
    probe: Option<Probe>,
    clock: Arc<dyn Clock>,
    /// Rollbacks [`super::serve_installed`] made, reported once running.
    startup_rollbacks: Vec<StartupRollback>,
    watches: Vec<Watch>,
    /// The last desired state refused for its signing key or because the
    /// trusted root had expired: it is tried again when a newer root
    /// arrives (the chain and the document it signs may arrive in either
    /// order).
    unknown_signer: Option<Vec<u8>>,
    server_keys: Option<ServerKeys>,
    /// Which refusals are reported, and the count of those that are not.
    refusals: RefusalCollapser,
    /// Installs agent releases (fleet mode under the supervisor).
    agent: Option<AgentInstaller>,
    /// Cancelled to stop the agent for a switch to a new release.
    shutdown: CancellationToken,
    /// Models the config serves from local files: the fleet's desired
    /// state neither lists nor removes them.
    local_models: Vec<String>,
}

impl Updater {
    /// An update task for `device`, on the real clock, loading new
    /// versions in-process (see [`Updater::with_probe`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device: DeviceId,
        trust: TrustStore,
        store: ModelStore,
        registry: ModelRegistry,
        fetcher: impl Fetcher + 'static,
        reporter: Reporter,
        loading: Loading,
        startup_rollbacks: Vec<StartupRollback>,
    ) -> Self {
        Self {
            device,
            trust,
            store,
            registry,
            fetcher: Box::new(fetcher),
            reporter,
            loading,
            probe: None,
            clock: Arc::new(SystemClock),
            startup_rollbacks,
            watches: Vec::new(),
            unknown_signer: None,
            server_keys: None,
            refusals: RefusalCollapser::default(),
            agent: None,
            shutdown: CancellationToken::new(),
            local_models: Vec::new(),
        }
    }

    /// Leaves the config's local models (`names`) alone: a desired state
    /// that does not list them does not stop them.
    pub fn with_local_models(mut self, names: Vec<String>) -> Self {
        self.local_models = names;
        self
    }

    /// Installs the agent releases desired states name with `installer`.
    pub fn with_agent_installer(mut self, installer: AgentInstaller) -> Self {
        self.agent = Some(installer);
        self
    }

    /// The agent release running, as the downgrade rule compares it.
    fn agent_release(&self) -> String {
        self.agent
            .as_ref()
            .and_then(|a| a.identity.release.clone())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string())
    }

    /// Loads each new version in a child process first (builds that abort
    /// on panic).
    pub fn with_probe(mut self, probe: Option<Probe>) -> Self {
        self.probe = probe;
        self
    }

    /// Judges time by `clock` instead of the system's.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Keeps `keys` (what the uplink checks receipts and the server's
    /// status against) in step with the trusted root as it rotates.
    pub fn share_server_keys(&mut self, keys: ServerKeys) {
        keys.set(self.trust.root());
        self.server_keys = Some(keys);
    }

    fn serving(&self) -> Vec<Serving> {
        self.registry
            .all()
            .iter()
            .filter(|m| !self.local_models.contains(&m.name))
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
        self.shutdown = shutdown.clone();
        self.resume().await;
        let mut next_check = self.clock.now() + SOAK_CHECK;
        loop {
            let summary_due = self.refusals.next_due();
            let summary_at = summary_due.unwrap_or_else(|| self.clock.now());
            let soak_check = self.clock.sleep_until(next_check);
            let summary = self.clock.sleep_until(summary_at);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = desired_rx.recv() => match msg {
                    Some(FromFleet::Desired(payload)) => self.handle(&payload).await,
                    Some(FromFleet::Roots(payload)) => self.handle_roots(&payload).await,
                    None => break,
                },
                _ = soak_check, if !self.watches.is_empty() => {
                    self.check_soaks().await;
                    next_check = self.clock.now() + SOAK_CHECK;
                }
                _ = summary, if summary_due.is_some() => {
                    self.report_due_refusals(self.clock.now());
                }
            }
            if self.watches.is_empty() {
                // The first check of a version that starts soaking comes a
                // whole interval after it does.
                next_check = self.clock.now() + SOAK_CHECK;
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
        let now = self.clock.now();
        for refusal in self.refusals.refused(refusal, now) {
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
                self.clock.unix_now(),
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

    /// Acts on one desired-state message: ignores a redelivery of the
    /// accepted document, reports a refusal, or accepts it and brings the
    /// served models to it.
    pub async fn handle(&mut self, payload: &[u8]) {
        let serving = self.serving();
        let agent_release = self.agent_release();
        let trust = TrustView {
            root: self.trust.root(),
            device: &self.device,
            desired_version: self.trust.desired_version(),
            desired_digest: self.trust.desired().map(envelope_digest),
            serving: &serving,
            agent_release: &agent_release,
        };
        match assess(payload, trust, self.clock.unix_now()) {
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
        let accepted = match self.trust.walk_roots_at(&chain, self.clock.unix_now()) {
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
        // A slot's quality settings may change without a new version.
        self.apply_quality(doc).await;
        let candidates = Self::quality_artifacts(doc);
        let mut wanted: Vec<&str> = doc.models.iter().map(|m| m.sha256.as_str()).collect();
        wanted.extend(&candidates);
        self.store.clean_staging(&wanted);
        self.store.clean_candidates(&candidates);
        // After the models: the new agent's self-test loads them.
        if let Some(agent) = &doc.agent {
            self.update_agent(agent, doc.version).await;
        }
    }

    /// Takes the agent to the release `slot` names: download and verify
    /// its build for this target, install it into the free slot,
    /// self-test it, then switch (the agent stops and its supervisor
    /// starts the new release). Any failure leaves this agent serving and
    /// is reported; a release that failed its self-test is never tried
    /// again.
    async fn update_agent(&mut self, slot: &AgentSlot, desired_version: u64) {
        let Some(installer) = self.agent.clone() else {
            return;
        };
        let release = slot.version.as_str();
        let build = match installer.decide(slot) {
            AgentStep::Nothing => return,
            AgentStep::Unusable(reason) => {
                tracing::warn!(%release, %reason, "agent release not installed");
                let kind = EventKind::ActivationFailed;
                let reason = Some(reason);
                self.reporter
                    .agent_event(kind, Some(desired_version), release, reason);
                return;
            }
            AgentStep::Install(build) => build,
        };
        let (kind, reason) = match self.switch_agent(&installer, release, build).await {
            Ok(self_test) => (EventKind::Activated, self_test),
            Err((kind, reason)) => {
                tracing::error!(%release, %reason, "agent release not switched to; this agent keeps running");
                (kind, reason)
            }
        };
        self.reporter
            .agent_event(kind, Some(desired_version), release, Some(reason));
        if kind == EventKind::Activated {
            crate::agent_update::request_switch(&self.shutdown);
        }
    }

    /// Downloads, installs and self-tests `build` of `release`, then
    /// records the switch to it; says how the self-test went, or which
    /// failure to report and why.
    async fn switch_agent(
        &self,
        installer: &AgentInstaller,
        release: &str,
        build: &edgefleet_shared::AgentBuild,
    ) -> Result<String, (EventKind, String)> {
        let failed = |reason: String| (EventKind::ActivationFailed, reason);
        tracing::info!(%release, target = crate::agent_update::TARGET, size = build.size, "downloading agent release");
        let staging = installer.staging_path(&build.sha256);
        if let Some(dir) = staging.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let artifact = Artifact::agent(release, build);
        self.fetcher
            .fetch(&artifact, &staging)
            .await
            .map_err(|e| (EventKind::DownloadFailed, e.to_string()))?;
        let (free, exe) = installer
            .install(&staging)
            .map_err(|e| failed(format!("cannot install the agent executable: {e}")))?;
        let started = Instant::now();
        let report = installer.self_test(&exe).await.map_err(|reason| {
            installer.refuse(release, &build.sha256, &reason);
            let _ = std::fs::remove_file(&exe);
            failed(reason)
        })?;
        let millis = started.elapsed().as_millis();
        tracing::info!(%release, self_test_ms = millis as u64, models = report.models.len(), "agent release passed its self-test; switching");
        installer
            .switch(free, release, &build.sha256)
            .map_err(|e| failed(format!("cannot record the switch: {e}")))?;
        Ok(format!("self-test passed in {millis} ms"))
    }

    /// Takes one version from verified to serving (or to a failure with
    /// its reason); returns the phase it ended in.
    async fn install(&mut self, slot: &ModelSlot, desired_version: u64) -> Phase {
        let step = |phase: Phase, input: Input| {
            phase
                .next(input)
                .expect("the update task feeds the activation state machine only inputs legal in the phase it returned")
        };
        let mut phase = step(Phase::Verified, Input::DownloadStarted);
        let staging = self.store.staging_path(&slot.sha256);
        let version = slot.version.to_string();
        let artifact = Artifact::model(slot, &version);
        if let Err(e) = self.fetcher.fetch(&artifact, &staging).await {
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
        let loaded = match probe::gate(self.probe.as_ref(), subject).await {
            Ok(()) => load_installed(&installed, &self.loading).await,
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
        let since = self.clock.unix_now();
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
        let now = self.clock.unix_now();
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
        // update task: nothing else is installed meanwhile).
        let installed = match self.store.load_version(name, previous) {
            Ok(installed) => installed,
            Err(e) => {
                tracing::error!(model = %name, error = %e, "previous version unreadable");
                return;
            }
        };
        match load_installed(&installed, &self.loading).await {
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
