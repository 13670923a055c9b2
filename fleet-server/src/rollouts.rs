//! Staged rollouts, driven: the [`crate::rollout`] planner plus what it
//! needs around it. Creation resolves the selection and each device's
//! current version; operator actions, device events and a one-second clock
//! go into the planner; its commands become signed desired states; after
//! every change the rollout is stored, so a restarted server resumes it.
//! Only one active rollout may target a device.

use std::collections::BTreeMap;
use std::sync::Arc;

use edgefleet_shared::{DeviceId, EventKind, UpdateEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::fleet::Fleet;
use crate::rollout::{Command, Gates, Phase, Report, Rollout, WaveSize};
use crate::store::{self, StoreError};

/// A rollout as stored: what it moves, each device's version before it,
/// and the planner's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub model: String,
    pub version: u64,
    pub previous: BTreeMap<String, Option<u64>>,
    pub created_at: u64,
    pub plan: Rollout,
}

impl RolloutRecord {
    pub fn active(&self) -> bool {
        !matches!(self.plan.phase, Phase::Aborted { .. } | Phase::Completed)
    }

    /// Status for the API: phase, waves, counts, gates.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.plan.id,
            "model": self.model,
            "version": self.version,
            "created_at": self.created_at,
            "phase": self.plan.phase,
            "waves": self.plan.plan(),
            "counts": self.plan.summary(),
            "gates": self.plan.gates,
            "devices": self.plan.devices,
        })
    }
}

/// What a rollout selects.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub id: String,
    pub model: String,
    pub version: u64,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Cumulative wave sizes: `{"count": 1}`, `{"percent": 25}`.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub waves: Vec<WaveSize>,
    /// Or an exponential ramp: `base` devices, times `factor` per wave.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub ramp: Option<(u32, f64)>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub gates: Option<Gates>,
    /// Only show which devices fall in which wave.
    #[serde(default)]
    pub dry_run: bool,
}

/// The server's rollouts, in memory and stored.
#[derive(Clone, Default)]
pub struct Rollouts {
    inner: Arc<Mutex<BTreeMap<String, RolloutRecord>>>,
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
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Rollouts {
    /// Loads the stored rollouts.
    pub async fn load(store: &store::Store) -> Result<Self, StoreError> {
        let mut map = BTreeMap::new();
        for (id, _, state) in store.list_rollouts().await? {
            match serde_json::from_str::<RolloutRecord>(&state) {
                Ok(record) => {
                    map.insert(id, record);
                }
                Err(e) => {
                    tracing::error!(rollout = %id, error = %e, "stored rollout unreadable; skipped")
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(map)),
        })
    }

    pub async fn list(&self) -> Vec<serde_json::Value> {
        self.inner
            .lock()
            .await
            .values()
            .map(RolloutRecord::status)
            .collect()
    }

    pub async fn get(&self, id: &str) -> Option<serde_json::Value> {
        self.inner.lock().await.get(id).map(RolloutRecord::status)
    }

    /// Creates a rollout (or, with `dry_run`, only plans it).
    pub async fn create(
        &self,
        fleet: &Fleet,
        req: CreateRollout,
        devices: Vec<String>,
    ) -> Result<serde_json::Value, RolloutError> {
        edgefleet_shared::ids::validate_name("rollout id", &req.id)
            .map_err(|e| RolloutError::BadRequest(e.to_string()))?;
        if fleet
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
        if devices.is_empty() {
            return Err(RolloutError::BadRequest(
                "the selection holds no device".into(),
            ));
        }
        let waves = match (req.waves.is_empty(), req.ramp) {
            (false, None) => req.waves.clone(),
            (true, Some((base, factor))) => crate::rollout::exponential_waves(base, factor),
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
        if !(0.0..=100.0).contains(&gates.success_pct)
            || !(0.0..=100.0).contains(&gates.failure_pct)
        {
            return Err(RolloutError::BadRequest("percentages are 0 to 100".into()));
        }
        let plan = Rollout::new(&req.id, devices.clone(), waves, gates);
        let previous = fleet.store.assigned_versions(&req.model, &devices).await?;
        let record = RolloutRecord {
            model: req.model.clone(),
            version: req.version,
            previous,
            created_at: edgefleet_shared::unix_now(),
            plan,
        };
        if req.dry_run {
            return Ok(record.status());
        }
        let mut map = self.inner.lock().await;
        if map.contains_key(&req.id) {
            return Err(RolloutError::Conflict(format!("rollout {} exists", req.id)));
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
        save(fleet, &record).await?;
        let status = record.status();
        map.insert(req.id.clone(), record);
        Ok(status)
    }

    /// An operator action: start, pause, resume, approve, abort.
    pub async fn act(
        &self,
        fleet: &Fleet,
        id: &str,
        action: &str,
    ) -> Result<serde_json::Value, RolloutError> {
        let now = edgefleet_shared::unix_now();
        let mut map = self.inner.lock().await;
        let record = map
            .get_mut(id)
            .ok_or_else(|| RolloutError::NotFound(format!("unknown rollout {id:?}")))?;
        let plan = &mut record.plan;
        let commands = match action {
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
        .map_err(RolloutError::Conflict)?;
        execute(fleet, record, commands).await;
        save(fleet, record).await?;
        Ok(record.status())
    }

    /// A device's update event, for the rollouts that include it.
    pub async fn on_event(&self, fleet: &Fleet, event: &UpdateEvent) {
        let report = match event.kind {
            EventKind::Confirmed => Report::Healthy,
            EventKind::ActivationFailed
            | EventKind::DownloadFailed
            | EventKind::RolledBack
            | EventKind::Refused => Report::Unhealthy(format!(
                "{}: {}",
                event.kind.as_str(),
                event.reason.clone().unwrap_or_default()
            )),
            _ => return,
        };
        self.feed(fleet, event.device_id.as_str(), report, |r| {
            // Reports about other models or versions are not this rollout's.
            event.model.as_deref().is_none_or(|m| m == r.model)
                && event.model_version.is_none_or(|v| v == r.version)
        })
        .await;
    }

    /// A device came online or went offline.
    pub async fn on_presence(&self, fleet: &Fleet, device: &str, online: bool) {
        let report = if online {
            Report::Online
        } else {
            Report::Offline
        };
        self.feed(fleet, device, report, |_| true).await;
    }

    async fn feed(
        &self,
        fleet: &Fleet,
        device: &str,
        report: Report,
        concerns: impl Fn(&RolloutRecord) -> bool,
    ) {
        let now = edgefleet_shared::unix_now();
        let mut map = self.inner.lock().await;
        for record in map.values_mut() {
            if !record.active() || !record.plan.devices.contains_key(device) || !concerns(record) {
                continue;
            }
            let commands = record.plan.report(device, report.clone(), now);
            execute(fleet, record, commands).await;
            if let Err(e) = save(fleet, record).await {
                tracing::error!(rollout = %record.plan.id, error = %e, "cannot store a rollout");
            }
        }
    }

    /// The clock: timeouts, soak, gates.
    pub async fn tick(&self, fleet: &Fleet) {
        let now = edgefleet_shared::unix_now();
        let mut map = self.inner.lock().await;
        for record in map.values_mut() {
            if !matches!(record.plan.phase, Phase::Running { .. }) {
                continue;
            }
            // What a tick can change: timeouts move devices between
            // states (the counts), retries come back as commands, gates
            // move the phase. Compared instead of serialising the plan
            // twice a second.
            let before = (record.plan.phase.clone(), record.plan.summary());
            let commands = record.plan.tick(now);
            let changed = !commands.is_empty()
                || before != (record.plan.phase.clone(), record.plan.summary());
            execute(fleet, record, commands).await;
            if changed {
                if let Err(e) = save(fleet, record).await {
                    tracing::error!(rollout = %record.plan.id, error = %e, "cannot store a rollout");
                }
            }
        }
    }
}

async fn save(fleet: &Fleet, record: &RolloutRecord) -> Result<(), StoreError> {
    let state = serde_json::to_string(record).expect("rollouts serialise");
    fleet
        .store
        .save_rollout(&record.plan.id, record.active(), &state)
        .await
}

/// Carries out the planner's commands: a new signed desired state for
/// each device to update or to send back.
async fn execute(fleet: &Fleet, record: &RolloutRecord, commands: Vec<Command>) {
    let now = edgefleet_shared::unix_now();
    for command in commands {
        let (device, version) = match &command {
            Command::Update(d) => (d, Some(record.version)),
            Command::Revert(d) => (d, record.previous.get(d).copied().flatten()),
        };
        let Some(version) = version else {
            tracing::warn!(device = %device, rollout = %record.plan.id, "no previous version to go back to; left as it is");
            continue;
        };
        let target = store::Target::Devices(vec![device.clone()]);
        if let Err(e) = fleet
            .store
            .deploy(&record.model, version, &target, now)
            .await
        {
            tracing::error!(device = %device, error = %e, "rollout cannot assign a version");
            continue;
        }
        match DeviceId::new(device.clone()) {
            Ok(id) => {
                if let Err(e) = fleet.publish_desired(&id).await {
                    tracing::error!(device = %device, error = %e, "rollout cannot publish desired state");
                }
            }
            Err(e) => tracing::error!(device = %device, error = %e, "bad device id in a rollout"),
        }
    }
}

/// Runs the rollouts' clock every second until `shutdown`.
pub async fn run_clock(fleet: Fleet, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => fleet.rollouts.tick(&fleet).await,
        }
    }
}
