//! What the dashboard shows at a glance, kept in memory as devices report:
//! each device's latest health and its last update event, and fleet-wide
//! inference volume and latency per minute over the last day.
//!
//! It is fed by the ingest path after a batch is stored, and rebuilt at
//! start from the store (each device's last day of telemetry and last
//! update event). A lone server ingests every device's messages, so that
//! covers the whole fleet. Replicas of one fleet each ingest only a share
//! (the broker splits device messages between them), so each also reads
//! what the others stored: every [`REFRESH_EVERY`] it takes in the
//! telemetry and update events that arrived in the store since the last
//! refresh ([`Insights::follow`]). Arrival order is the storing server's
//! clock and transactions commit out of order, so each refresh reads the
//! last [`REFRESH_OVERLAP_SECS`] again; a sample seen before (through this
//! replica's own ingest or an earlier refresh) is not newer than its
//! device's latest and is skipped, so nothing is counted twice.
//!
//! The rules that decide a device's compliance state and whether it needs
//! attention are plain functions of a [`DeviceRecord`] and its
//! [`DeviceInsight`], tested below.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgefleet_shared::{TelemetryMessage, UpdateEvent};
use serde::Serialize;

use crate::store::{ArrivalKey, DeviceRecord, EventRecord, Store, StoreError, Streamed};

/// A sensor at or above this is "hot".
pub const HOT_CELSIUS: f32 = 80.0;
/// Less free disk than this (percent) needs attention.
pub const DISK_FREE_MIN_PCT: f64 = 5.0;
/// A model failing at least this share of its inferences (percent) in one
/// telemetry interval needs attention...
pub const ERROR_RATE_MAX_PCT: f64 = 5.0;
/// ...once the interval holds at least this many.
pub const ERROR_RATE_MIN_SAMPLE: u64 = 20;
/// An outbox that grew over the last samples and holds at least this many
/// records is a growing backlog.
pub const BACKLOG_MIN: u64 = 100;
/// Offline for longer than this (seconds) needs attention.
pub const NOT_SEEN_SECS: u64 = 3600;
/// How long the per-minute fleet series reaches back (seconds).
pub const SERIES_SECS: u64 = 24 * 3600;
/// Outbox depths remembered per device (to tell a growing backlog).
const DEPTHS: usize = 4;
/// How often a replica takes in what the others stored.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How far back in arrival time (seconds) each refresh reads again: rows
/// whose transaction committed up to this late, or that a replica whose
/// clock is behind stored, are still taken in.
pub const REFRESH_OVERLAP_SECS: u64 = 5;
/// Rows read per query when refreshing.
const REFRESH_BATCH: u32 = 2_000;
/// Queries per kind of row in one refresh at most; the next refresh goes
/// on from where this one stopped.
const REFRESH_PAGES: usize = 20;

/// A device's latest health, from its newest telemetry sample.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceInsight {
    /// Sequence number and device time of the sample.
    pub seq: u64,
    pub at: u64,
    pub cpu_percent: Option<f32>,
    pub memory_used_pct: Option<f64>,
    /// The hottest sensor.
    pub temperature_c: Option<f32>,
    pub disk_free_pct: Option<f64>,
    pub outbox_depth: u64,
    pub outbox_condition: Option<String>,
    /// Recent outbox depths, oldest first (the newest is `outbox_depth`).
    #[serde(skip)]
    depths: VecDeque<u64>,
    pub models: Vec<ModelHealth>,
    /// The newest update event.
    pub last_event: Option<LastEvent>,
}

/// One served model in a device's latest telemetry interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelHealth {
    pub name: String,
    pub version: u64,
    pub runtime: String,
    pub inferences: u64,
    pub errors: u64,
    pub p95_us: Option<f64>,
    pub p50_us: Option<f64>,
    /// Since the version was activated on the device.
    pub total_inferences: u64,
    pub total_errors: u64,
    /// Its side of an A/B test.
    pub variant: Option<edgefleet_shared::quality::Variant>,
    /// Its shadow candidate's figures, summed over the intervals seen.
    pub shadow: Option<ShadowTotals>,
}

/// A shadow candidate's figures on one device, summed over the telemetry
/// intervals this server has seen (since the candidate was set or the
/// server started).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShadowTotals {
    pub candidate_version: u64,
    pub compared: u64,
    pub agreed: u64,
    pub errors: u64,
    pub dropped: u64,
    /// The latest interval's candidate p99 latency.
    pub p99_us: Option<f64>,
}

impl ModelHealth {
    /// Failed inferences as a percentage of all in the interval.
    pub fn error_pct(&self) -> Option<f64> {
        let total = self.inferences + self.errors;
        (total > 0).then(|| self.errors as f64 * 100.0 / total as f64)
    }
}

/// A device's newest update event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastEvent {
    pub seq: u64,
    pub at: u64,
    pub kind: String,
    pub desired_version: Option<u64>,
    pub reason: Option<String>,
}

/// Fleet-wide inference figures of one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Minute {
    /// Unix seconds at the minute's start.
    pub t: u64,
    pub inferences: u64,
    pub errors: u64,
    /// Latency percentiles averaged over devices, weighted by their
    /// inferences (milliseconds; `None` without inferences).
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// The worst device's p95.
    pub p95_max_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct MinuteSums {
    inferences: u64,
    errors: u64,
    /// Sums of percentile × inferences, and the inferences they cover.
    p50_sum: f64,
    p95_sum: f64,
    weight: u64,
    p95_max: f64,
}

/// Where a device stands against what it should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compliance {
    OnTarget,
    Updating,
    Failed,
    RolledBack,
    Offline,
}

impl Compliance {
    pub const ALL: [Compliance; 5] = [
        Self::OnTarget,
        Self::Updating,
        Self::Failed,
        Self::RolledBack,
        Self::Offline,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnTarget => "on_target",
            Self::Updating => "updating",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
            Self::Offline => "offline",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::OnTarget => "on target",
            Self::Updating => "updating",
            Self::Failed => "failed",
            Self::RolledBack => "rolled back",
            Self::Offline => "offline",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A device's compliance state: offline devices are `Offline`; a failure
/// or rollback reported for the desired state the server last signed for
/// it is `Failed` or `RolledBack`; otherwise it is `OnTarget` once it
/// reports that desired state, `Updating` before.
pub fn compliance(device: &DeviceRecord, last: Option<&LastEvent>) -> Compliance {
    if !device.online {
        return Compliance::Offline;
    }
    let current = last.filter(|e| e.desired_version.unwrap_or(0) >= device.desired_version);
    match current.map(|e| e.kind.as_str()) {
        Some("refused" | "download_failed" | "activation_failed") => return Compliance::Failed,
        Some("rolled_back") => return Compliance::RolledBack,
        _ => {}
    }
    if device.reported_desired_version.unwrap_or(0) >= device.desired_version {
        Compliance::OnTarget
    } else {
        Compliance::Updating
    }
}

/// Why a device needs an operator's attention (empty: it does not).
pub fn attention(device: &DeviceRecord, insight: Option<&DeviceInsight>, now: u64) -> Vec<String> {
    let mut reasons = Vec::new();
    if device.revoked_at.is_some() {
        return reasons;
    }
    let unseen = now.saturating_sub(device.last_seen);
    if !device.online && unseen > NOT_SEEN_SECS {
        reasons.push(format!("not seen for {}", human_duration(unseen)));
    }
    match compliance(device, insight.and_then(|i| i.last_event.as_ref())) {
        Compliance::Failed => reasons.push("update failed".into()),
        Compliance::RolledBack => reasons.push("rolled back".into()),
        _ => {}
    }
    let Some(i) = insight else {
        return reasons;
    };
    if let Some(t) = i.temperature_c.filter(|t| *t >= HOT_CELSIUS) {
        reasons.push(format!("hot: {t:.0} °C"));
    }
    if let Some(free) = i.disk_free_pct.filter(|f| *f < DISK_FREE_MIN_PCT) {
        reasons.push(format!("disk nearly full: {free:.1}% free"));
    }
    if let Some(condition) = &i.outbox_condition {
        reasons.push(format!("outbox: {condition}"));
    }
    if i.backlog_growing() {
        reasons.push(format!(
            "outbox backlog growing: {} waiting",
            i.outbox_depth
        ));
    }
    for m in &i.models {
        let total = m.inferences + m.errors;
        if let Some(pct) = m.error_pct() {
            if total >= ERROR_RATE_MIN_SAMPLE && pct >= ERROR_RATE_MAX_PCT {
                reasons.push(format!("{}@{}: {pct:.0}% errors", m.name, m.version));
            }
        }
    }
    reasons
}

/// "42 s", "17 min", "3 h", "5 d".
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 2 * 3600 => format!("{} min", s / 60),
        s if s < 2 * 86400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86400),
    }
}

impl DeviceInsight {
    /// The outbox grew at every one of the last samples and holds at
    /// least [`BACKLOG_MIN`] records.
    pub fn backlog_growing(&self) -> bool {
        self.depths.len() >= 3
            && self.outbox_depth >= BACKLOG_MIN
            && self
                .depths
                .iter()
                .zip(self.depths.iter().skip(1))
                .all(|(a, b)| b > a)
    }

    fn apply(&mut self, t: &TelemetryMessage) {
        let h = &t.health;
        self.seq = t.seq;
        self.at = t.at;
        self.cpu_percent = h.cpu_percent;
        self.memory_used_pct = (h.memory_total_bytes > 0).then(|| {
            let used = h
                .memory_total_bytes
                .saturating_sub(h.memory_available_bytes);
            used as f64 * 100.0 / h.memory_total_bytes as f64
        });
        self.temperature_c = h
            .temperatures
            .iter()
            .map(|s| s.celsius)
            .fold(None, |hot: Option<f32>, c| {
                Some(hot.map_or(c, |h| h.max(c)))
            });
        self.disk_free_pct = match (h.disk_total_bytes, h.disk_available_bytes) {
            (Some(total), Some(free)) if total > 0 => Some(free as f64 * 100.0 / total as f64),
            _ => None,
        };
        self.outbox_depth = t.outbox.depth + t.outbox.memory_depth;
        self.outbox_condition = t.outbox.condition.clone();
        if self.depths.len() == DEPTHS {
            self.depths.pop_front();
        }
        self.depths.push_back(self.outbox_depth);
        let before = std::mem::take(&mut self.models);
        self.models = t
            .models
            .iter()
            .map(|m| {
                let shadow = m.shadow.as_ref().map(|s| {
                    let mut totals = before
                        .iter()
                        .filter(|b| b.name == m.name && b.version == m.version)
                        .find_map(|b| b.shadow.clone())
                        .filter(|b| b.candidate_version == s.candidate_version)
                        .unwrap_or_default();
                    totals.candidate_version = s.candidate_version;
                    totals.compared += s.compared;
                    totals.agreed += s.agreed;
                    totals.errors += s.errors;
                    totals.dropped += s.dropped;
                    totals.p99_us = s.p99_us.or(totals.p99_us);
                    totals
                });
                ModelHealth {
                    name: m.name.clone(),
                    version: m.version,
                    runtime: m.runtime.clone(),
                    inferences: m.inferences,
                    errors: m.errors,
                    p95_us: m.p95_us,
                    p50_us: m.p50_us,
                    total_inferences: m.total_inferences,
                    total_errors: m.total_errors,
                    variant: m.variant,
                    shadow,
                }
            })
            .collect();
    }
}

#[derive(Default)]
struct State {
    devices: HashMap<String, DeviceInsight>,
    minutes: BTreeMap<u64, MinuteSums>,
}

/// The server's in-memory view (see the module docs).
#[derive(Default)]
pub struct Insights {
    state: Mutex<State>,
    /// Drift scores, fed with the same samples.
    drift: crate::drift::DriftView,
}

impl std::fmt::Debug for Insights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Insights").finish_non_exhaustive()
    }
}

impl Insights {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A view that also feeds `drift` with every sample it takes in.
    pub fn with_drift(drift: crate::drift::DriftView) -> Self {
        Self {
            state: Default::default(),
            drift,
        }
    }

    /// The drift scores fed alongside.
    pub fn drift(&self) -> &crate::drift::DriftView {
        &self.drift
    }

    /// Takes in a stored batch of telemetry (results are ignored). A
    /// sample is counted once: one not newer than the device's latest
    /// (a re-sent duplicate) is skipped. `now` bounds device clocks that
    /// run ahead.
    pub fn observe(&self, batch: &[Streamed], now: u64) {
        let mut state = self.state();
        let State { devices, minutes } = &mut *state;
        for record in batch {
            let Streamed::Telemetry(t) = record else {
                continue;
            };
            let device = devices.entry(t.device_id.to_string()).or_default();
            if t.seq <= device.seq {
                continue;
            }
            device.apply(t);
            self.drift.observe(t, now);
            let at = t.at.min(now);
            if at + SERIES_SECS < now {
                continue;
            }
            let m = minutes.entry(at - at % 60).or_default();
            for model in &t.models {
                m.inferences += model.inferences;
                m.errors += model.errors;
                if let (Some(p50), Some(p95)) = (model.p50_us, model.p95_us) {
                    if model.inferences > 0 {
                        m.p50_sum += p50 * model.inferences as f64;
                        m.p95_sum += p95 * model.inferences as f64;
                        m.weight += model.inferences;
                        m.p95_max = m.p95_max.max(p95);
                    }
                }
            }
        }
        let horizon = now.saturating_sub(SERIES_SECS);
        while minutes.first_key_value().is_some_and(|(t, _)| *t < horizon) {
            minutes.pop_first();
        }
    }

    /// Takes in an update event.
    pub fn on_event(&self, event: &UpdateEvent) {
        self.set_last_event(
            event.device_id.as_str(),
            LastEvent {
                seq: event.seq,
                at: event.at,
                kind: event.kind.as_str().to_string(),
                desired_version: event.desired_version,
                reason: event.reason.clone(),
            },
        );
    }

    /// Takes in a stored event (when rebuilding).
    pub fn on_stored_event(&self, event: &EventRecord) {
        self.set_last_event(
            &event.device_id,
            LastEvent {
                seq: event.seq,
                at: event.at,
                kind: event.kind.clone(),
                desired_version: event.desired_version,
                reason: event.reason.clone(),
            },
        );
    }

    fn set_last_event(&self, device: &str, event: LastEvent) {
        let mut state = self.state();
        let insight = state.devices.entry(device.to_string()).or_default();
        if insight
            .last_event
            .as_ref()
            .is_none_or(|e| e.seq < event.seq)
        {
            insight.last_event = Some(event);
        }
    }

    /// A device's latest health.
    pub fn device(&self, id: &str) -> Option<DeviceInsight> {
        self.state().devices.get(id).cloned()
    }

    /// Every device's latest health.
    pub fn devices(&self) -> HashMap<String, DeviceInsight> {
        self.state().devices.clone()
    }

    /// Forgets a device (revoked or deleted).
    pub fn forget(&self, id: &str) {
        self.state().devices.remove(id);
        self.drift.forget(id);
    }

    /// Per-minute fleet figures from `now - window` to `now`, oldest first;
    /// minutes without telemetry are absent.
    pub fn series(&self, now: u64, window: u64) -> Vec<Minute> {
        let from = now.saturating_sub(window);
        let ms = |sum: f64, weight: u64| (weight > 0).then(|| sum / weight as f64 / 1000.0);
        self.state()
            .minutes
            .range(from - from % 60..)
            .map(|(t, m)| Minute {
                t: *t,
                inferences: m.inferences,
                errors: m.errors,
                p50_ms: ms(m.p50_sum, m.weight),
                p95_ms: ms(m.p95_sum, m.weight),
                p95_max_ms: (m.weight > 0).then(|| m.p95_max / 1000.0),
            })
            .collect()
    }

    /// Rebuilds from the store: each device's telemetry of the last
    /// `SERIES_SECS` (at most `per_device` samples) and its last event.
    pub async fn rebuild(
        &self,
        store: &crate::store::Store,
        per_device: u32,
    ) -> Result<(), crate::store::StoreError> {
        let now = edgefleet_shared::unix_now();
        for device in store.list_devices().await? {
            let samples = store
                .recent_telemetry(&device.id, now.saturating_sub(SERIES_SECS), per_device)
                .await?;
            let batch: Vec<Streamed> = samples
                .into_iter()
                .filter_map(|body| serde_json::from_value(body).ok())
                .map(Streamed::Telemetry)
                .collect();
            self.observe(&batch, now);
            if let Some(event) = store.events_for_device(&device.id, 1).await?.first() {
                self.on_stored_event(event);
            }
        }
        Ok(())
    }
}

/// Where a replica's refreshes from the store stand, per kind of row.
#[derive(Debug, Clone)]
pub struct Refresh {
    telemetry: Feed,
    events: Feed,
}

#[derive(Debug, Clone)]
struct Feed {
    /// The next refresh reads what arrived from `from -`
    /// [`REFRESH_OVERLAP_SECS`] on: the newer of the newest arrival read
    /// and the time the last refresh began (so a quiet fleet is not read
    /// again and again).
    from: u64,
    /// Where a refresh that stopped at [`REFRESH_PAGES`] left off.
    resume: Option<ArrivalKey>,
}

impl Feed {
    fn new(since: u64) -> Self {
        Self {
            from: since,
            resume: None,
        }
    }

    /// Reads the rows that arrived since the last time through `read`,
    /// page by page, handing each page to `take`; returns how many rows
    /// were read.
    async fn read<T, F, Fut>(
        &mut self,
        began: u64,
        mut read: F,
        mut take: impl FnMut(Vec<(ArrivalKey, T)>),
    ) -> Result<usize, StoreError>
    where
        F: FnMut(ArrivalKey) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(ArrivalKey, T)>, StoreError>>,
    {
        let mut after = self
            .resume
            .take()
            .unwrap_or_else(|| ArrivalKey::before(self.from.saturating_sub(REFRESH_OVERLAP_SECS)));
        let mut newest = self.from.max(began);
        let mut total = 0;
        for _ in 0..REFRESH_PAGES {
            let rows = read(after.clone()).await?;
            let full = rows.len() >= REFRESH_BATCH as usize;
            total += rows.len();
            if let Some((last, _)) = rows.last() {
                after = last.clone();
                newest = newest.max(last.received_at);
            }
            take(rows);
            if !full {
                self.from = newest;
                return Ok(total);
            }
        }
        self.resume = Some(after);
        self.from = newest;
        Ok(total)
    }
}

impl Refresh {
    /// Refreshes that take in what arrived in the store from `since`
    /// (unix seconds, less the overlap) on.
    pub fn since(since: u64) -> Self {
        Self {
            telemetry: Feed::new(since),
            events: Feed::new(since),
        }
    }
}

impl Insights {
    /// Takes in the telemetry and update events that arrived in the store
    /// since the last refresh (whoever stored them). Returns how many rows
    /// were read (rows of the overlap included).
    pub async fn refresh(
        &self,
        store: &Store,
        refresh: &mut Refresh,
        now: u64,
    ) -> Result<usize, StoreError> {
        let telemetry = refresh
            .telemetry
            .read(
                now,
                |after| async move { store.telemetry_arrived(&after, REFRESH_BATCH).await },
                |rows| {
                    let batch: Vec<Streamed> = rows
                        .into_iter()
                        .filter_map(|(_, body)| serde_json::from_str(&body).ok())
                        .map(Streamed::Telemetry)
                        .collect();
                    self.observe(&batch, now);
                },
            )
            .await?;
        let events = refresh
            .events
            .read(
                now,
                |after| async move { store.events_arrived(&after, REFRESH_BATCH).await },
                |rows| {
                    for (_, event) in rows {
                        self.on_stored_event(&event);
                    }
                },
            )
            .await?;
        Ok(telemetry + events)
    }

    /// Refreshes from the store every [`REFRESH_EVERY`] until `shutdown`,
    /// taking in what arrived from `since` on (a replica's view; see the
    /// module docs).
    pub async fn follow(
        self: Arc<Self>,
        store: Store,
        since: u64,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut refresh = Refresh::since(since);
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = edgefleet_shared::unix_now();
            if let Err(e) = self.refresh(&store, &mut refresh, now).await {
                tracing::warn!(error = %e, "cannot refresh the dashboard view from the store");
            }
        }
    }
}

#[cfg(test)]
mod tests;
