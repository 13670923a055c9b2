//! Staged rollouts, driven: the [`super::planner`] plus what it needs
//! around it: a store, the desired-state publisher and a clock, nothing
//! else, so the driver runs in unit tests on a manual clock. A rollout
//! moves devices to a model version or to an agent release; the planner
//! is the same for both, only what counts as a device's report differs
//! (see [`Rollouts::on_event`] and [`Rollouts::on_status`]). Creation
//! resolves the selection and each device's current version; operator
//! actions, device events, telemetry, devices joining and a one-second
//! clock go into the planner.
//!
//! Changes are stored in rounds, not one by one: the ingest loop feeds a
//! whole batch of device messages in, then [`Rollouts::flush`] stores each
//! changed rollout once, before the batch is acknowledged (so a crash loses
//! nothing a device sent), and only then hands the planner's commands to
//! the dispatcher. The dispatcher assigns versions in one transaction per
//! round and signs and publishes each device's desired state, apart from
//! the lock (`dispatch.rs`), so device messages keep flowing while
//! thousands of devices are asked to update. Only one active rollout may
//! target a device.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex};

use super::dispatch::{dispatch, Assign, Dispatch};
use super::planner::{self, Command, Gates, Override, Phase, Report, Rollout, WaveSize};
use super::replicas::{Input, Role};
use crate::clock::Clock;
use crate::desired::DesiredStates;
use crate::store::quality::ShadowSettings;
use crate::store::{DeviceRecord, Store, StoreError};

/// A rollout as stored: what it moves, which devices it selects, each
/// device's version before it, and the planner's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// The model a model rollout moves (empty in an agent rollout).
    #[serde(default)]
    pub model: String,
    /// The model version it moves devices to (0 in an agent rollout).
    #[serde(default)]
    pub version: u64,
    /// Each device's model version before the rollout.
    #[serde(default)]
    pub previous: BTreeMap<String, Option<u64>>,
    /// The agent release an agent rollout moves devices to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentRollout>,
    pub created_at: u64,
    #[serde(default)]
    pub selection: Selection,
    pub plan: Rollout,
    /// Changed since it was last stored.
    #[serde(skip)]
    dirty: bool,
    /// Commands to hand to the dispatcher once stored.
    #[serde(skip)]
    pending: Vec<Command>,
}

/// Which devices a rollout is for: all, those with every tag (and the
/// hardware class, if given), or a list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub hardware: Option<String>,
    #[serde(default)]
    pub devices: Vec<String>,
}

impl Selection {
    /// Whether a device (new, enrolled or re-tagged) falls in it.
    pub fn matches(&self, device: &DeviceRecord) -> bool {
        if device.revoked_at.is_some() {
            return false;
        }
        if !self.devices.is_empty() {
            return self.devices.contains(&device.id);
        }
        if self.all {
            return true;
        }
        let tagged = self.tags.iter().all(|(k, v)| device.tags.get(k) == Some(v));
        let hardware = self
            .hardware
            .as_ref()
            .is_none_or(|h| device.hardware.as_ref() == Some(h));
        (!self.tags.is_empty() || self.hardware.is_some()) && tagged && hardware
    }
}

/// What an agent rollout moves: a release, and each device's release
/// before it (what an abort puts back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRollout {
    pub version: String,
    /// Devices on a newer release may go back to this one.
    #[serde(default)]
    pub allow_downgrade: bool,
    #[serde(default)]
    pub previous: BTreeMap<String, Option<String>>,
}

impl RolloutRecord {
    pub fn active(&self) -> bool {
        !self.plan.ended()
    }

    /// What it moves devices to, for people: `digits v2`, `agent 1.2.0`.
    pub fn what(&self) -> String {
        match &self.agent {
            Some(a) => format!("agent {}", a.version),
            None => format!("{} v{}", self.model, self.version),
        }
    }

    /// What the dispatcher assigns to `device` for a planner command.
    fn assignment(&self, command: Command) -> (String, Option<Assign>) {
        match (&self.agent, command) {
            (None, Command::Update(d)) => (
                d,
                Some(Assign::Model {
                    model: self.model.clone(),
                    version: self.version,
                }),
            ),
            (None, Command::Revert(d)) => {
                let previous = self.previous.get(&d).copied().flatten();
                let assign = previous.map(|version| Assign::Model {
                    model: self.model.clone(),
                    version,
                });
                (d, assign)
            }
            (None, Command::Shadow(d)) => {
                let settings = ShadowSettings {
                    version: self.version,
                    sample_rate: self.plan.gates.shadow_sample_rate,
                    compare: self.plan.gates.shadow_compare.clone(),
                };
                let assign = Assign::Quality {
                    model: self.model.clone(),
                    shadow: serde_json::to_string(&settings).ok(),
                };
                (d, Some(assign))
            }
            (None, Command::EndShadow(d)) => (
                d,
                Some(Assign::Quality {
                    model: self.model.clone(),
                    shadow: None,
                }),
            ),
            // Agent rollouts have no shadow gate.
            (Some(_), Command::Shadow(d) | Command::EndShadow(d)) => (d, None),
            (Some(a), Command::Update(d)) => (
                d,
                Some(Assign::Agent {
                    version: a.version.clone(),
                    allow_downgrade: a.allow_downgrade,
                }),
            ),
            // The previous release may be older: going back must be
            // allowed explicitly, or devices refuse it.
            (Some(a), Command::Revert(d)) => {
                let previous = a.previous.get(&d).cloned().flatten();
                let assign = previous.map(|version| Assign::Agent {
                    version,
                    allow_downgrade: true,
                });
                (d, assign)
            }
        }
    }

    #[cfg(test)]
    pub(super) fn pending_mut(&mut self) -> &mut Vec<Command> {
        &mut self.pending
    }

    /// Takes the planner's commands for the next flush.
    fn changed(&mut self, commands: Vec<Command>) {
        self.dirty = true;
        self.pending.extend(commands);
    }
}

/// `POST /api/v1/rollouts`: a staged rollout of a model version (`model`
/// and `version`) or of an agent release (`agent`). Select with exactly
/// one of `devices`, `all`, or `tags` and/or `hardware`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub id: String,
    /// The model to move (with `version`); not with `agent`.
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub version: u64,
    /// The agent release to move devices to (a semantic version); not
    /// with `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// With `agent`: devices on a newer release may go back to it.
    #[serde(default)]
    pub allow_downgrade: bool,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Only devices of this hardware class (with `tags`, or alone).
    #[serde(default)]
    pub hardware: Option<String>,
    /// Cumulative wave sizes: `{"count": 1}`, `{"percent": 25}`.
    #[serde(default)]
    #[schema(value_type = Vec<super::schemas::WaveSize>)]
    pub waves: Vec<WaveSize>,
    /// Or an exponential ramp, `[base, factor]`: `base` devices, times
    /// `factor` per wave.
    #[serde(default)]
    #[schema(value_type = Option<Vec<f64>>)]
    pub ramp: Option<(u32, f64)>,
    #[serde(default)]
    #[schema(value_type = Option<super::schemas::Gates>)]
    pub gates: Option<Gates>,
    /// Only show which devices fall in which wave.
    #[serde(default)]
    pub dry_run: bool,
}

/// The server's rollouts, in memory and stored.
#[derive(Clone)]
pub struct Rollouts {
    pub(super) inner: Arc<Mutex<BTreeMap<String, RolloutRecord>>>,
    /// Whether this server drives the rollouts, and what it passes to
    /// the one that does (`replicas.rs`).
    pub(super) role: Arc<Role>,
    pub(super) dispatch: mpsc::UnboundedSender<Dispatch>,
    /// Taken by [`Rollouts::run`], which starts the dispatcher.
    pub(super) receiver: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<Dispatch>>>>,
    pub(super) store: Store,
    pub(super) desired: DesiredStates,
    pub(super) clock: Arc<dyn Clock>,
}

/// Why an action on a rollout was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// No server replica drives rollouts right now.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Rollouts {
    /// Loads the stored rollouts; `desired` signs and publishes what they
    /// assign, `clock` times them.
    pub async fn load(
        store: Store,
        desired: DesiredStates,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        Self::load_as(store, desired, clock, super::replicas::ONLY_SERVER).await
    }

    /// [`Self::load`] for the server replica named `holder`: it drives the
    /// rollouts if it takes the driver's lease now, else it passes what it
    /// hears to the replica that does.
    pub async fn load_as(
        store: Store,
        desired: DesiredStates,
        clock: Arc<dyn Clock>,
        holder: &str,
    ) -> Result<Self, StoreError> {
        let (dispatch, receiver) = mpsc::unbounded_channel();
        let rollouts = Self {
            inner: Arc::new(Mutex::new(BTreeMap::new())),
            role: Arc::new(Role::new(holder)),
            dispatch,
            receiver: Arc::new(std::sync::Mutex::new(Some(receiver))),
            store,
            desired,
            clock,
        };
        rollouts.take_lease().await?;
        Ok(rollouts)
    }

    /// The stored rollouts and the commands each had stored but perhaps
    /// not carried out.
    pub(super) async fn stored(&self) -> Result<Vec<(RolloutRecord, Vec<Command>)>, StoreError> {
        let mut out = Vec::new();
        for (id, _, state) in self.store.list_rollouts().await? {
            let parsed = serde_json::from_str::<serde_json::Value>(&state).and_then(|mut v| {
                let pending = v
                    .as_object_mut()
                    .and_then(|o| o.remove("pending"))
                    .map(serde_json::from_value::<Vec<Command>>)
                    .transpose()?
                    .unwrap_or_default();
                Ok((serde_json::from_value::<RolloutRecord>(v)?, pending))
            });
            match parsed {
                Ok(record) => out.push(record),
                Err(e) => {
                    tracing::error!(rollout = %id, error = %e, "stored rollout unreadable; skipped")
                }
            }
        }
        Ok(out)
    }

    /// Takes over from the stored state: this server now drives. Commands
    /// a previous driver stored are carried out again where its devices
    /// do not hold them yet.
    pub(super) async fn take_over(&self) -> Result<(), StoreError> {
        let stored = self.stored().await?;
        let mut map = self.inner.lock().await;
        map.clear();
        for (record, pending) in stored {
            for command in pending {
                let (device, assign) = record.assignment(command);
                if let Some(assign) = assign {
                    let _ = self.dispatch.send(Dispatch {
                        device,
                        assign,
                        again: true,
                    });
                }
            }
            map.insert(record.plan.id.clone(), record);
        }
        self.role.hint(map.values());
        Ok(())
    }

    /// A copy of one rollout as it stands.
    pub async fn record(&self, id: &str) -> Option<RolloutRecord> {
        if !self.role.driving() {
            return self.records().await.into_iter().find(|r| r.plan.id == id);
        }
        self.inner.lock().await.get(id).cloned()
    }

    /// A copy of every rollout as it stands, by id.
    pub async fn records(&self) -> Vec<RolloutRecord> {
        if !self.role.driving() {
            // The driver's last stored word.
            return match self.stored().await {
                Ok(stored) => {
                    let mut records: Vec<_> = stored.into_iter().map(|(r, _)| r).collect();
                    records.sort_by(|a, b| a.plan.id.cmp(&b.plan.id));
                    records
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the rollouts");
                    Vec::new()
                }
            };
        }
        self.inner.lock().await.values().cloned().collect()
    }

    /// Creates a rollout (or, with `dry_run`, only plans it): returns it
    /// as created.
    pub async fn create(
        &self,
        req: CreateRollout,
        devices: Vec<String>,
    ) -> Result<RolloutRecord, RolloutError> {
        edgefleet_shared::ids::validate_name("rollout id", &req.id)
            .map_err(|e| RolloutError::BadRequest(e.to_string()))?;
        match &req.agent {
            Some(release) => {
                if !req.model.is_empty() || req.version != 0 {
                    return Err(RolloutError::BadRequest(
                        "give a model and version, or an agent release, not both".into(),
                    ));
                }
                release
                    .parse::<edgefleet_shared::ReleaseVersion>()
                    .map_err(|e| RolloutError::BadRequest(e.to_string()))?;
                if self.store.agent_builds(Some(release)).await?.is_empty() {
                    return Err(RolloutError::NotFound(format!(
                        "agent release {release} does not exist; push it first (fleetctl agent push)"
                    )));
                }
            }
            None => {
                if req.model.is_empty() || req.version == 0 {
                    return Err(RolloutError::BadRequest(
                        "give a model and a positive version, or an agent release".into(),
                    ));
                }
                if req.allow_downgrade {
                    return Err(RolloutError::BadRequest(
                        "allow_downgrade is for agent releases; model versions only go forward"
                            .into(),
                    ));
                }
                if self
                    .store
                    .get_model(&req.model, req.version)
                    .await?
                    .is_none()
                {
                    return Err(RolloutError::NotFound(format!(
                        "model {} version {} does not exist; push it first",
                        req.model, req.version
                    )));
                }
            }
        }
        if devices.is_empty() {
            return Err(RolloutError::BadRequest(
                "the selection holds no device".into(),
            ));
        }
        let waves = match (req.waves.is_empty(), req.ramp) {
            (false, None) => req.waves.clone(),
            (true, Some((base, factor))) => planner::exponential_waves(base, factor),
            (true, None) => vec![
                WaveSize::Count(1),
                WaveSize::Percent(5.0),
                WaveSize::Percent(25.0),
                WaveSize::Percent(100.0),
            ],
            (false, Some(_)) => {
                return Err(RolloutError::BadRequest(
                    "give waves or a ramp, not both".into(),
                ))
            }
        };
        let gates = req.gates.clone().unwrap_or_default();
        let percent = |p: Option<f64>| p.is_none_or(|p| (0.0..=100.0).contains(&p));
        if !percent(Some(gates.success_pct))
            || !percent(Some(gates.failure_pct))
            || !percent(gates.max_error_pct)
        {
            return Err(RolloutError::BadRequest("percentages are 0 to 100".into()));
        }
        if gates
            .max_p95_ms
            .is_some_and(|ms| !(ms > 0.0 && ms.is_finite()))
        {
            return Err(RolloutError::BadRequest(
                "max_p95_ms must be a positive number of milliseconds".into(),
            ));
        }
        if gates
            .max_drift_psi
            .is_some_and(|psi| !(psi > 0.0 && psi.is_finite()))
        {
            return Err(RolloutError::BadRequest(
                "max_drift_psi must be a positive number".into(),
            ));
        }
        if let Some(agreement) = gates.min_shadow_agreement {
            self.check_shadow_gate(&req, &gates, agreement, &devices)
                .await?;
        }
        let plan = Rollout::new(&req.id, devices.clone(), waves, gates);
        let (previous, agent) = match &req.agent {
            Some(release) => (
                BTreeMap::new(),
                Some(AgentRollout {
                    version: release.clone(),
                    allow_downgrade: req.allow_downgrade,
                    previous: self.store.assigned_agent_releases(&devices).await?,
                }),
            ),
            None => (
                self.store.assigned_versions(&req.model, &devices).await?,
                None,
            ),
        };
        let record = RolloutRecord {
            model: req.model.clone(),
            version: req.version,
            previous,
            agent,
            created_at: self.clock.now(),
            selection: Selection {
                all: req.all,
                tags: req.tags.clone(),
                hardware: req.hardware.clone(),
                devices: req.devices.clone(),
            },
            plan,
            dirty: false,
            pending: Vec::new(),
        };
        if req.dry_run {
            return Ok(record);
        }
        if !self.role.driving() {
            return self
                .forward(Input::Create {
                    record: Box::new(record),
                })
                .await;
        }
        self.insert(record).await
    }

    /// A shadow gate needs a model rollout, sane figures and a version
    /// already served on every device (the candidate runs beside it).
    async fn check_shadow_gate(
        &self,
        req: &CreateRollout,
        gates: &Gates,
        agreement: f64,
        devices: &[String],
    ) -> Result<(), RolloutError> {
        let bad = |why: String| Err(RolloutError::BadRequest(why));
        if req.agent.is_some() {
            return bad(
                "the shadow gate is for model rollouts: an agent release has no outputs to compare"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&agreement) {
            return bad(format!(
                "min_shadow_agreement is a share from 0 to 1 (0.98 = 98 %), not {agreement}"
            ));
        }
        if !(gates.shadow_sample_rate > 0.0 && gates.shadow_sample_rate <= 1.0) {
            return bad(format!(
                "shadow_sample_rate is a share above 0 and at most 1, not {}",
                gates.shadow_sample_rate
            ));
        }
        for c in &gates.shadow_compare {
            c.comparison.validate().map_err(|e| {
                RolloutError::BadRequest(format!("shadow_compare {}: {e}", c.output))
            })?;
        }
        let serving = self.store.assigned_versions(&req.model, devices).await?;
        let missing: Vec<&str> = devices
            .iter()
            .filter(|d| serving.get(*d).copied().flatten().is_none())
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return bad(format!(
                "the shadow gate runs the new version beside the one a device serves, and {} of the selected devices do not run model {} yet: {}",
                missing.len(),
                req.model,
                missing.iter().take(5).copied().collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(())
    }

    /// Adds a planned rollout, unless its id is taken or one of its
    /// devices is in another active rollout.
    pub(super) async fn insert(
        &self,
        record: RolloutRecord,
    ) -> Result<RolloutRecord, RolloutError> {
        let devices: Vec<String> = record.plan.devices.keys().cloned().collect();
        let id = record.plan.id.clone();
        let mut map = self.inner.lock().await;
        if map.contains_key(&id) {
            return Err(RolloutError::Conflict(format!("rollout {id} exists")));
        }
        let busy: Vec<String> = map
            .values()
            .filter(|r| r.active())
            .flat_map(|r| {
                devices
                    .iter()
                    .filter(|d| r.plan.devices.contains_key(*d))
                    .map(move |d| format!("{d} (in {})", r.plan.id))
            })
            .collect();
        if !busy.is_empty() {
            return Err(RolloutError::Conflict(format!(
                "devices already in an active rollout: {}",
                busy.join(", ")
            )));
        }
        self.save(&record).await?;
        map.insert(id, record.clone());
        self.role.hint(map.values());
        Ok(record)
    }

    /// An operator action: start, pause, resume, approve, abort.
    pub async fn act(&self, id: &str, action: &str) -> Result<RolloutRecord, RolloutError> {
        if !self.role.driving() {
            return self
                .forward(Input::Act {
                    id: id.to_string(),
                    action: action.to_string(),
                })
                .await;
        }
        self.change(id, |plan, now| {
            match action {
                "start" => plan.start(now),
                "pause" => plan.pause("paused by an operator").map(|()| Vec::new()),
                "resume" => plan.resume(now),
                "approve" => plan.approve(now),
                "abort" => plan.abort("aborted by an operator"),
                other => {
                    return Err(RolloutError::BadRequest(format!(
                        "unknown action {other:?} (start, pause, resume, approve, abort)"
                    )))
                }
            }
            .map_err(RolloutError::Conflict)
        })
        .await
    }

    /// An operator's decision about one device of a rollout.
    pub async fn override_device(
        &self,
        id: &str,
        device: &str,
        action: Override,
    ) -> Result<RolloutRecord, RolloutError> {
        if !self.role.driving() {
            return self
                .forward(Input::Override {
                    id: id.to_string(),
                    device: device.to_string(),
                    action,
                })
                .await;
        }
        self.change(id, |plan, now| {
            plan.override_device(device, action, now)
                .map_err(RolloutError::Conflict)
        })
        .await
    }

    /// Applies an operator's change to one rollout, stores it and hands
    /// its commands out.
    async fn change(
        &self,
        id: &str,
        f: impl FnOnce(&mut Rollout, u64) -> Result<Vec<Command>, RolloutError>,
    ) -> Result<RolloutRecord, RolloutError> {
        let now = self.clock.now();
        let mut map = self.inner.lock().await;
        let record = map
            .get_mut(id)
            .ok_or_else(|| RolloutError::NotFound(format!("unknown rollout {id:?}")))?;
        let commands = f(&mut record.plan, now)?;
        record.changed(commands);
        let changed = record.clone();
        self.flush_locked(&mut map).await?;
        Ok(changed)
    }

    /// The clock: timeouts, soak, gates.
    pub async fn tick(&self) {
        let now = self.clock.now();
        let mut map = self.inner.lock().await;
        for record in map.values_mut() {
            if !matches!(record.plan.phase, Phase::Running { .. }) {
                continue;
            }
            // What a tick can change: timeouts move devices between
            // states (the counts), retries come back as commands, gates
            // move the phase.
            let before = (record.plan.phase.clone(), record.plan.summary());
            let commands = record.plan.tick(now);
            if !commands.is_empty() || before != (record.plan.phase.clone(), record.plan.summary())
            {
                record.changed(commands);
            }
        }
        if let Err(e) = self.flush_locked(&mut map).await {
            tracing::error!(error = %e, "cannot store rollouts; retried on the next tick");
        }
    }

    /// Stores every changed rollout, then hands their commands to the
    /// dispatcher. The ingest loop calls it after each batch, before
    /// acknowledging it.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mut map = self.inner.lock().await;
        let heard = self.role.take_heard();
        if self.role.driving() {
            return self.flush_locked(&mut map).await;
        }
        // Not the driver (or no longer): what this server heard goes to
        // the one that is, before the batch is acknowledged.
        drop(map);
        self.pass_on(heard).await
    }

    #[cfg(test)]
    pub(super) async fn save_for_test(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        self.save(record).await
    }

    /// Stores a rollout with the commands it has yet to hand out, so a
    /// driver taking over carries out what this one could not.
    async fn save(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        let mut value = serde_json::to_value(record)
            .expect("a rollout record is plain data and always serialises");
        if let (Some(object), false) = (value.as_object_mut(), record.pending.is_empty()) {
            object.insert(
                "pending".into(),
                serde_json::to_value(&record.pending).expect("commands always serialise"),
            );
        }
        let state = value.to_string();
        self.store
            .save_rollout(&record.plan.id, record.active(), &state)
            .await
    }

    async fn flush_locked(
        &self,
        map: &mut BTreeMap<String, RolloutRecord>,
    ) -> Result<(), StoreError> {
        for record in map.values_mut().filter(|r| r.dirty) {
            self.save(record).await?;
            record.dirty = false;
            for command in std::mem::take(&mut record.pending) {
                let (device, assign) = record.assignment(command);
                let Some(assign) = assign else {
                    tracing::warn!(device = %device, rollout = %record.plan.id, "no previous version to go back to; left as it is");
                    continue;
                };
                // The receiver lives as long as the server.
                let _ = self.dispatch.send(Dispatch {
                    device,
                    assign,
                    again: false,
                });
            }
        }
        self.role.hint(map.values());
        Ok(())
    }
}

impl Rollouts {
    /// Starts the task that carries out the planner's commands (once; a
    /// second call does nothing).
    pub(super) fn spawn_dispatcher(&self, shutdown: tokio_util::sync::CancellationToken) {
        let receiver = self.receiver.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = receiver {
            tokio::spawn(dispatch(
                self.store.clone(),
                self.desired.clone(),
                self.clock.clone(),
                rx,
                shutdown,
            ));
        }
    }
}

mod reports;
#[cfg(test)]
mod tests;
