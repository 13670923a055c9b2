//! What devices tell the rollouts: update events, statuses, telemetry
//! and devices joining, each turned into the planner's reports. A server
//! that does not drive the rollouts remembers them to pass on
//! (`replicas.rs`); the driver applies them at once.

use edgefleet_shared::{EventKind, StatusMessage, UpdateEvent};

use super::{Input, Phase, Report, RolloutRecord, Rollouts};
use crate::store::{DeviceRecord, Streamed};

impl Rollouts {
    /// A device's update event, for the rollouts that include it.
    ///
    /// Model rollouts take confirmations and failures about their model
    /// version (or about the whole document). Agent rollouts take only
    /// failures about their release (`agent_version`): a download or
    /// self-test failure, a refusal, or the device going back by itself;
    /// their successes come from status messages ([`Self::on_status`]).
    /// A device that goes back after its status counted it as a success
    /// fails too.
    pub async fn on_event(&self, event: &UpdateEvent) {
        if self.role.heard(|| Input::Event {
            event: event.clone(),
        }) {
            self.apply_event(event).await;
        }
    }

    pub(in crate::rollout) async fn apply_event(&self, event: &UpdateEvent) {
        let failed = || {
            format!(
                "{}: {}",
                event.kind.as_str(),
                event.reason.clone().unwrap_or_default()
            )
        };
        let failure = matches!(
            event.kind,
            EventKind::ActivationFailed
                | EventKind::DownloadFailed
                | EventKind::RolledBack
                | EventKind::Refused
        );
        let device = event.device_id.as_str();
        if let Some(release) = event.agent_version.as_deref() {
            if !failure {
                return;
            }
            let ours = |r: &RolloutRecord| r.agent.as_ref().is_some_and(|a| a.version == release);
            self.feed(device, Report::Unhealthy(failed()), ours).await;
            self.feed(device, Report::Degraded(failed()), ours).await;
            return;
        }
        let report = match event.kind {
            EventKind::Confirmed => Report::Healthy,
            _ if failure => Report::Unhealthy(failed()),
            _ => return,
        };
        self.feed(device, report, |r| {
            // Reports about other models or versions are not this rollout's.
            r.agent.is_none()
                && event.model.as_deref().is_none_or(|m| m == r.model)
                && event.model_version.is_none_or(|v| v == r.version)
        })
        .await;
    }

    /// A device's status: online or offline, and which versions it runs.
    pub async fn on_status(&self, status: &StatusMessage) {
        if self.role.heard(|| Input::Status {
            status: status.clone(),
        }) {
            self.apply_status(status).await;
        }
    }

    pub(in crate::rollout) async fn apply_status(&self, status: &StatusMessage) {
        let device = status.device_id.as_str();
        let report = if status.online {
            Report::Online
        } else {
            Report::Offline
        };
        self.feed(device, report, |_| true).await;
        if status.online {
            self.feed(device, Report::Running, |r| {
                r.agent.is_none()
                    && status
                        .models
                        .iter()
                        .any(|m| m.name == r.model && m.version == r.version)
            })
            .await;
            // An agent rollout's success: the device runs its release.
            if let Some(release) = status.agent.as_ref().and_then(|a| a.release.as_deref()) {
                self.feed(device, Report::Healthy, |r| {
                    r.agent.as_ref().is_some_and(|a| a.version == release)
                })
                .await;
            }
        }
    }

    /// Telemetry: a device on a rollout's new version whose error rate or
    /// latency breaks the rollout's limits counts as failed.
    pub async fn on_telemetry(&self, records: &[Streamed]) {
        let heard = !self.role.watches_telemetry()
            || self.role.heard(|| Input::Telemetry {
                telemetry: records
                    .iter()
                    .filter_map(|r| match r {
                        Streamed::Telemetry(t) => Some(t.clone()),
                        Streamed::Result(_) => None,
                    })
                    .collect(),
            });
        if heard {
            self.apply_telemetry(records).await;
        }
    }

    pub(in crate::rollout) async fn apply_telemetry(&self, records: &[Streamed]) {
        let now = self.clock.now();
        let mut map = self.inner.lock().await;
        for record in map.values_mut() {
            // Telemetry judges a model version; agent rollouts have none.
            if !record.active() || !record.plan.gates.watches_telemetry() || record.agent.is_some()
            {
                continue;
            }
            for r in records {
                let Streamed::Telemetry(t) = r else { continue };
                if !record.plan.devices.contains_key(t.device_id.as_str()) {
                    continue;
                }
                // The new version running in shadow beside the old one.
                let shadow = t.models.iter().find_map(|m| {
                    m.shadow
                        .as_ref()
                        .filter(|s| m.name == record.model && s.candidate_version == record.version)
                });
                if let Some(s) = shadow {
                    let was = record.plan.phase.clone();
                    let commands = record.plan.shadow_report(
                        t.device_id.as_str(),
                        s.compared,
                        s.agreed,
                        s.errors,
                        now,
                    );
                    let stopped = match &record.plan.phase {
                        Phase::Paused { reason, .. } | Phase::Aborted { reason } => Some(reason),
                        _ => None,
                    };
                    if let (Some(reason), true) = (stopped, record.plan.phase != was) {
                        tracing::warn!(rollout = %record.plan.id, reason = %reason, "shadow gate stopped the rollout");
                    }
                    record.changed(commands);
                }
                let Some(m) = t
                    .models
                    .iter()
                    .find(|m| m.name == record.model && m.version == record.version)
                else {
                    continue;
                };
                let drift = || {
                    let psi = m
                        .drift
                        .as_ref()
                        .and_then(|d| self.desired.drift.interval_score(&m.name, m.version, d));
                    record.plan.gates.judge_drift(psi)
                };
                let judged = record
                    .plan
                    .gates
                    .judge(m.inferences, m.errors, m.p95_us)
                    .or_else(drift);
                if let Some(why) = judged {
                    let before = record.plan.devices[t.device_id.as_str()].clone();
                    let commands = record.plan.report(
                        t.device_id.as_str(),
                        Report::Degraded(why.clone()),
                        now,
                    );
                    if record.plan.devices[t.device_id.as_str()] != before {
                        tracing::warn!(rollout = %record.plan.id, device = %t.device_id, reason = %why, "device over the rollout's telemetry limits");
                    }
                    record.changed(commands);
                }
            }
        }
    }

    /// A device that now falls in an active rollout's selection (seen for
    /// the first time, enrolled, or re-tagged) joins it.
    pub async fn on_join(&self, device: &DeviceRecord) {
        if self.role.heard(|| Input::Join {
            device: device.id.clone(),
        }) {
            self.apply_join(device).await;
        }
    }

    pub(in crate::rollout) async fn apply_join(&self, device: &DeviceRecord) {
        let now = self.clock.now();
        let mut map = self.inner.lock().await;
        // Only one active rollout may hold a device.
        if map
            .values()
            .any(|r| r.active() && r.plan.devices.contains_key(&device.id))
        {
            return;
        }
        for record in map.values_mut() {
            if !record.active() || !record.selection.matches(device) {
                continue;
            }
            if let Some(commands) = record.plan.join(&device.id, device.online, now) {
                tracing::info!(rollout = %record.plan.id, device = %device.id, "device joined the rollout");
                let one = std::slice::from_ref(&device.id);
                let remembered = match &mut record.agent {
                    Some(agent) => self.store.assigned_agent_releases(one).await.map(|mut v| {
                        let previous = v.remove(&device.id).flatten();
                        agent.previous.insert(device.id.clone(), previous);
                    }),
                    None => self
                        .store
                        .assigned_versions(&record.model, one)
                        .await
                        .map(|mut v| {
                            let previous = v.remove(&device.id).flatten();
                            record.previous.insert(device.id.clone(), previous);
                        }),
                };
                match remembered {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::error!(device = %device.id, error = %e, "cannot read a joining device's version; an abort leaves it as it is")
                    }
                }
                record.changed(commands);
                break;
            }
        }
    }

    async fn feed(&self, device: &str, report: Report, concerns: impl Fn(&RolloutRecord) -> bool) {
        let now = self.clock.now();
        let mut map = self.inner.lock().await;
        for record in map.values_mut() {
            if !record.active() || !record.plan.devices.contains_key(device) || !concerns(record) {
                continue;
            }
            let before = (
                record.plan.devices[device].clone(),
                record.plan.phase.clone(),
            );
            let commands = record.plan.report(device, report.clone(), now);
            if !commands.is_empty()
                || before
                    != (
                        record.plan.devices[device].clone(),
                        record.plan.phase.clone(),
                    )
            {
                record.changed(commands);
            }
        }
    }
}
