//! Which server drives the rollouts when several replicas serve one
//! fleet, and how the others reach it.
//!
//! Exactly one server at a time drives: the holder of the `rollouts`
//! lease in the database (taken for [`LEASE_TTL`], renewed every
//! [`RENEW_EVERY`], timed by the database's clock). It keeps the planner
//! state in memory, stores it after every change, and is the only one
//! that signs what the planner commands. Device messages are spread over
//! the replicas (shared subscriptions), so the others pass on what
//! concerns rollouts (update events, statuses, devices joining, and
//! telemetry while a gate watches it) through the driver's inbox table, in the
//! same round as they store the messages and before they acknowledge
//! them; operator actions go through the inbox too and wait for the
//! driver's answer. Reads come from the stored state.
//!
//! When the driver dies its lease runs out and another replica takes it
//! within [`LEASE_TTL`] plus one renewal: it loads the stored state, carries
//! out again the commands the old driver had stored but perhaps not
//! carried out (skipping devices whose signed desired state already holds
//! them, so no step is signed twice and none is skipped), then applies
//! the inbox. A driver that cannot renew in time stops driving before its
//! lease can have passed to another, and passes on what it heard since.
//! A single server is the only holder, under a fixed name, so a restart
//! takes the lease back at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgefleet_shared::{StatusMessage, TelemetryMessage, UpdateEvent};
use serde::{Deserialize, Serialize};

use super::driver::{RolloutError, RolloutRecord, Rollouts};
use super::planner::Override;
use crate::store::{StoreError, Streamed};

/// The lease's holder name of a server that is not one of several.
pub(super) const ONLY_SERVER: &str = "server";
/// The lease's name.
const LEASE: &str = "rollouts";
/// How long a taken or renewed lease lasts.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often the driver renews it (and others try to take it).
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often the driver reads its inbox.
const INBOX_EVERY: Duration = Duration::from_millis(200);
/// Inbox messages applied per round.
const INBOX_BATCH: u32 = 500;
/// How long an operator action waits for the driver's answer.
const FORWARD_WAIT: Duration = Duration::from_secs(15);

/// What a replica passes to the driver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Input {
    Event {
        event: UpdateEvent,
    },
    Status {
        status: StatusMessage,
    },
    Telemetry {
        telemetry: Vec<TelemetryMessage>,
    },
    Join {
        device: String,
    },
    Create {
        record: Box<RolloutRecord>,
    },
    Act {
        id: String,
        action: String,
    },
    Override {
        id: String,
        device: String,
        action: Override,
    },
}

/// The driver's answer to an operator action.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Done(Box<RolloutRecord>),
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    Failed(String),
}

impl From<Result<RolloutRecord, RolloutError>> for Outcome {
    fn from(result: Result<RolloutRecord, RolloutError>) -> Self {
        match result {
            Ok(record) => Self::Done(Box::new(record)),
            Err(RolloutError::BadRequest(m)) => Self::BadRequest(m),
            Err(RolloutError::NotFound(m)) => Self::NotFound(m),
            Err(RolloutError::Conflict(m)) => Self::Conflict(m),
            Err(e) => Self::Failed(e.to_string()),
        }
    }
}

impl From<Outcome> for Result<RolloutRecord, RolloutError> {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Done(record) => Ok(*record),
            Outcome::BadRequest(m) => Err(RolloutError::BadRequest(m)),
            Outcome::NotFound(m) => Err(RolloutError::NotFound(m)),
            Outcome::Conflict(m) => Err(RolloutError::Conflict(m)),
            Outcome::Failed(m) => Err(RolloutError::Store(StoreError::Task(m))),
        }
    }
}

/// This server's part: driving or passing on.
#[derive(Debug)]
pub(crate) struct Role {
    holder: String,
    driving: AtomicBool,
    /// Some rollout is active (as last known).
    active: AtomicBool,
    /// Some active rollout gates on telemetry.
    telemetry: AtomicBool,
    /// What this server heard since its last flush.
    heard: std::sync::Mutex<Vec<Input>>,
}

impl Role {
    pub(super) fn new(holder: &str) -> Self {
        Self {
            holder: holder.to_string(),
            driving: AtomicBool::new(false),
            active: AtomicBool::new(true),
            telemetry: AtomicBool::new(true),
            heard: Default::default(),
        }
    }

    /// Whether this server drives the rollouts now.
    pub(super) fn driving(&self) -> bool {
        self.driving.load(Ordering::Acquire)
    }

    /// Whether telemetry is worth passing on.
    pub(super) fn watches_telemetry(&self) -> bool {
        self.telemetry.load(Ordering::Relaxed)
    }

    /// Notes what the rollouts `records` need to hear.
    pub(super) fn hint<'a>(&self, records: impl Iterator<Item = &'a RolloutRecord>) {
        let (mut active, mut telemetry) = (false, false);
        for r in records.filter(|r| r.active()) {
            active = true;
            telemetry |= r.agent.is_none() && r.plan.gates.watches_telemetry();
        }
        self.active.store(active, Ordering::Relaxed);
        self.telemetry.store(telemetry, Ordering::Relaxed);
    }

    /// Remembers what was heard until the next flush; true when this
    /// server drives and should apply it now. The driver keeps it only
    /// while a rollout is active (to pass on should it lose the lease
    /// before the flush); the others always pass it on, since a rollout
    /// may have started since they last looked.
    pub(super) fn heard(&self, input: impl FnOnce() -> Input) -> bool {
        let driving = self.driving();
        if !driving || self.active.load(Ordering::Relaxed) {
            self.heard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(input());
        }
        driving
    }

    pub(super) fn take_heard(&self) -> Vec<Input> {
        std::mem::take(&mut *self.heard.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Rollouts {
    /// Takes or renews the driver's lease; on taking it, takes over from
    /// the stored state. Returns whether this server drives now.
    pub(super) async fn take_lease(&self) -> Result<bool, StoreError> {
        let held = self
            .store
            .lease(LEASE, &self.role.holder, LEASE_TTL.as_millis() as u64)
            .await?;
        let was = self.role.driving();
        match (was, held) {
            (false, Some(epoch)) => {
                self.take_over().await?;
                self.role.driving.store(true, Ordering::Release);
                tracing::info!(holder = %self.role.holder, epoch, "this server drives the rollouts");
            }
            (true, None) => self.stop_driving("another server holds the lease"),
            _ => {}
        }
        Ok(held.is_some())
    }

    fn stop_driving(&self, why: &str) {
        if self.role.driving.swap(false, Ordering::AcqRel) {
            tracing::warn!(holder = %self.role.holder, reason = why, "this server no longer drives the rollouts");
        }
    }

    /// Passes what this server heard to the driver, in one inbox message.
    pub(super) async fn pass_on(&self, heard: Vec<Input>) -> Result<(), StoreError> {
        if heard.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_string(&heard).expect("inputs are plain data and serialise");
        if let Err(e) = self
            .store
            .push_rollout_inbox(std::slice::from_ref(&body), self.clock.now())
            .await
        {
            // Kept for the next flush: the batch is not acknowledged.
            self.role
                .heard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .splice(0..0, heard);
            return Err(e);
        }
        Ok(())
    }

    /// Hands an operator action to the driver and waits for its answer.
    pub(super) async fn forward(&self, input: Input) -> Result<RolloutRecord, RolloutError> {
        let body = serde_json::to_string(&[input]).expect("inputs are plain data and serialise");
        let ids = self
            .store
            .push_rollout_inbox(std::slice::from_ref(&body), self.clock.now())
            .await?;
        let id = ids[0];
        let deadline = tokio::time::Instant::now() + FORWARD_WAIT;
        loop {
            if let Some(outcome) = self.store.take_rollout_outcome(id).await? {
                let outcome: Outcome = serde_json::from_str(&outcome)
                    .map_err(|e| StoreError::Task(format!("unreadable answer: {e}")))?;
                return outcome.into();
            }
            if tokio::time::Instant::now() >= deadline {
                // Withdrawn, unless the driver is applying it right now.
                let _ = self.store.settle_rollout_inbox(&[id], &[]).await;
                return Err(RolloutError::Unavailable(format!(
                    "no server replica answered for the rollouts within {} s (the driver's lease is changing hands, or the database is slow); check `fleetctl rollout status` and try again",
                    FORWARD_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Applies the inbox: what other replicas heard, and operator actions
    /// (answered once their change is stored).
    async fn drain_inbox(&self) -> Result<usize, StoreError> {
        let rows = self.store.rollout_inbox(INBOX_BATCH).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let (mut done, mut answers) = (Vec::new(), Vec::new());
        for (id, body) in &rows {
            let inputs: Vec<Input> = match serde_json::from_str(body) {
                Ok(inputs) => inputs,
                Err(e) => {
                    tracing::error!(id, error = %e, "unreadable rollout inbox message; dropped");
                    done.push(*id);
                    continue;
                }
            };
            let mut answer = None;
            for input in inputs {
                match input {
                    Input::Event { event } => self.apply_event(&event).await,
                    Input::Status { status } => self.apply_status(&status).await,
                    Input::Telemetry { telemetry } => {
                        let records: Vec<Streamed> =
                            telemetry.into_iter().map(Streamed::Telemetry).collect();
                        self.apply_telemetry(&records).await;
                    }
                    Input::Join { device } => {
                        if let Some(record) = self.store.get_device(&device).await? {
                            self.apply_join(&record).await;
                        }
                    }
                    Input::Create { record } => {
                        answer = Some(Outcome::from(self.insert(*record).await));
                    }
                    Input::Act { id, action } => {
                        answer = Some(Outcome::from(self.act(&id, &action).await));
                    }
                    Input::Override { id, device, action } => {
                        answer = Some(Outcome::from(
                            self.override_device(&id, &device, action).await,
                        ));
                    }
                }
            }
            match answer {
                Some(outcome) => answers.push((
                    *id,
                    serde_json::to_string(&outcome).expect("an outcome serialises"),
                )),
                None => done.push(*id),
            }
        }
        // What the inbox changed is stored before it is settled.
        self.flush().await?;
        self.store.settle_rollout_inbox(&done, &answers).await?;
        Ok(rows.len())
    }

    /// Runs the rollouts until `shutdown`: keeps or seeks the driver's
    /// lease; while driving, the dispatcher, the planner's clock (every
    /// second) and the inbox.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        self.spawn_dispatcher(shutdown.clone());
        let mut inbox = tokio::time::interval(INBOX_EVERY);
        inbox.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The last renewal that succeeded, and when it was asked for.
        let mut renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = renew.tick() => {
                    let asked = tokio::time::Instant::now();
                    match self.take_lease().await {
                        Ok(true) => renewed = asked,
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot renew the rollout driver's lease"),
                    }
                    // Stop before the lease can have passed to another.
                    if self.role.driving() && renewed.elapsed() + RENEW_EVERY >= LEASE_TTL {
                        self.stop_driving("the lease could not be renewed in time");
                    }
                    if self.role.driving() {
                        self.tick().await;
                    } else {
                        self.refresh_hint().await;
                    }
                }
                _ = inbox.tick(), if self.role.driving() => {
                    if let Err(e) = self.drain_inbox().await {
                        tracing::error!(error = %e, "cannot apply the rollout inbox; retried");
                    }
                }
            }
        }
        if self.role.driving() {
            let _ = self.flush().await;
            // Another replica may take over at once.
            if let Err(e) = self.store.release_lease(LEASE, &self.role.holder).await {
                tracing::warn!(error = %e, "cannot release the rollout driver's lease");
            }
            self.role.driving.store(false, Ordering::Release);
        }
    }

    /// A replica that does not drive learns from the store whether any
    /// rollout needs to hear from it.
    async fn refresh_hint(&self) {
        // Only active rollouts are read whole (finished ones can be many).
        match self.store.list_rollouts().await {
            Ok(rows) => {
                let active: Vec<RolloutRecord> = rows
                    .into_iter()
                    .filter(|(_, active, _)| *active)
                    .filter_map(|(_, _, state)| serde_json::from_str(&state).ok())
                    .collect();
                self.role.hint(active.iter());
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the rollouts"),
        }
    }
}

#[cfg(test)]
mod tests;
