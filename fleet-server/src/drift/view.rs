//! Drift scores, kept in memory as devices report, like the rest of the
//! dashboard's view (the insights, which own a [`DriftView`]): the ingest
//! path and each replica's refresh from the store feed
//! [`DriftView::observe`] with the telemetry samples the insights take
//! in, so the scores
//! see what the insights see and are rebuilt from the store at start the
//! same way.
//!
//! The score of a set of drift statistics is the largest population
//! stability index ([`psi`]) of its features against the version's
//! reference. A device's score is its latest interval's; a hardware
//! class's and the fleet's are those of the histograms of every interval
//! of the last [`WINDOW_SECS`] merged (a single interval of a device that
//! served a few requests is noisy; five minutes of a class is not).
//!
//! The references are cached here too: the desired-state signer puts a
//! reference's bins in the slot ([`DriftView::spec`]) and the rollout
//! gate scores intervals as they arrive, both without a store round trip.
//! The cache is refreshed from the store every [`FOLLOW_EVERY`] (replicas
//! learn each other's
//! references) and updated at once by the server that sets one.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use edgefleet_shared::drift::{psi, Histogram};
use edgefleet_shared::quality::{DriftSpec, DriftTelemetry, FeatureStats};
use edgefleet_shared::TelemetryMessage;
use serde::{Deserialize, Serialize};

use super::{ReferenceProfile, DEFAULT_ALERT_PSI};
use crate::store::{Store, StoreError};

/// How often references are reloaded and fleet-wide scores checked: as
/// often as the insights follow what other replicas stored.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(2);
/// How far back (seconds of device time) the per-class and fleet-wide
/// scores merge intervals.
pub const WINDOW_SECS: u64 = 300;
/// Intervals kept in the window at most (oldest dropped first), so a
/// huge fleet cannot grow it without bound.
const WINDOW_MAX: usize = 100_000;

type Key = (String, u64);

/// One device's drift statistics of one model for one interval.
#[derive(Debug, Clone)]
struct Interval {
    device: String,
    model: String,
    version: u64,
    at: u64,
    stats: Arc<DriftTelemetry>,
}

#[derive(Default)]
struct State {
    /// Each (device, model)'s latest interval.
    latest: HashMap<(String, String), Interval>,
    /// Every interval of the window, oldest first.
    window: VecDeque<Interval>,
    /// (model, version, scope) over the threshold, to log each crossing
    /// once; scope is a device id or `fleet`.
    drifting: HashSet<(String, u64, String)>,
}

struct Inner {
    threshold: f64,
    references: RwLock<HashMap<Key, Arc<ReferenceProfile>>>,
    state: Mutex<State>,
}

/// Drift scores and the reference cache (see the module docs). Cheap to
/// clone: clones share one view.
#[derive(Clone)]
pub struct DriftView(Arc<Inner>);

impl Default for DriftView {
    fn default() -> Self {
        Self::new(DEFAULT_ALERT_PSI)
    }
}

impl std::fmt::Debug for DriftView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriftView")
            .field("threshold", &self.0.threshold)
            .finish_non_exhaustive()
    }
}

/// One feature's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureScore {
    pub tensor: String,
    /// `mean`, `std`, `min`, `max`, `argmax` or `max_value`.
    pub feature: String,
    /// PSI against the reference (absent without statistics in its bins).
    pub psi: Option<f64>,
    /// Values counted.
    pub count: u64,
    /// Their mean, and the reference's.
    pub mean: Option<f64>,
    pub reference_mean: f64,
}

/// A score: the largest feature PSI, and each feature's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Score {
    pub psi: Option<f64>,
    /// At or over the server's alert threshold.
    pub drifting: bool,
    /// Intervals merged.
    pub intervals: u64,
    pub features: Vec<FeatureScore>,
}

/// A hardware class's score over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ClassScore {
    pub class: String,
    pub score: Score,
}

/// A device's score over its latest interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceScore {
    pub device: String,
    pub class: Option<String>,
    /// Device time of the interval.
    pub at: u64,
    pub score: Score,
}

/// The drift of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionDrift {
    pub version: u64,
    /// Whether the version has a reference (without one nothing is
    /// scored and agents collect nothing).
    pub reference: Option<ReferenceSummary>,
    /// Over every device's intervals of the window.
    pub fleet: Option<Score>,
    pub classes: Vec<ClassScore>,
    pub devices: Vec<DeviceScore>,
}

/// What a reference was made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReferenceSummary {
    /// `file` or `traffic`.
    pub source: String,
    pub samples: u64,
    pub features: usize,
}

/// The drift of a model's versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelDrift {
    pub model: String,
    /// The PSI at or over which a score counts as drifting.
    pub threshold: f64,
    /// Seconds of intervals the class and fleet scores merge.
    pub window_secs: u64,
    /// Any version's fleet score or any device's is drifting.
    pub drifting: bool,
    pub versions: Vec<VersionDrift>,
}

/// One gauge of `/metrics`: model, version, scope (`fleet`, `class` or
/// `device_max`), class, PSI.
pub type Gauge = (String, u64, &'static str, Option<String>, f64);

/// Scores `stats` (merged already) against `reference`.
fn score(
    reference: &ReferenceProfile,
    stats: &[FeatureStats],
    intervals: u64,
    threshold: f64,
) -> Score {
    let features: Vec<FeatureScore> = reference
        .features
        .iter()
        .map(|r| {
            let current = stats
                .iter()
                .find(|s| s.tensor == r.bins.tensor && s.feature == r.bins.feature);
            let psi = current.and_then(|s| psi(&r.histogram, &s.histogram).ok());
            FeatureScore {
                tensor: r.bins.tensor.clone(),
                feature: r.bins.feature.as_str().to_string(),
                psi,
                count: current.map_or(0, |s| s.moments.count),
                mean: current
                    .filter(|s| s.moments.count > 0)
                    .map(|s| s.moments.mean),
                reference_mean: r.moments.mean,
            }
        })
        .collect();
    let psi = features
        .iter()
        .filter_map(|f| f.psi)
        .fold(None, |worst: Option<f64>, p| {
            Some(worst.map_or(p, |w| w.max(p)))
        });
    Score {
        psi,
        drifting: psi.is_some_and(|p| p >= threshold),
        intervals,
        features,
    }
}

/// The statistics of several intervals merged per feature, in the
/// reference's bins (statistics in other bins are left out).
fn merge<'a>(
    reference: &ReferenceProfile,
    intervals: impl Iterator<Item = &'a DriftTelemetry>,
) -> (Vec<FeatureStats>, u64) {
    let mut merged: Vec<FeatureStats> = reference
        .features
        .iter()
        .filter_map(|r| {
            Some(FeatureStats {
                tensor: r.bins.tensor.clone(),
                feature: r.bins.feature,
                moments: Default::default(),
                histogram: Histogram::new(r.histogram.lo, r.histogram.hi, r.bins.bins as usize)
                    .ok()?,
            })
        })
        .collect();
    let mut count = 0;
    for interval in intervals {
        count += 1;
        for s in &interval.features {
            if let Some(m) = merged
                .iter_mut()
                .find(|m| m.tensor == s.tensor && m.feature == s.feature)
            {
                if m.histogram.merge(&s.histogram).is_ok() {
                    m.moments.merge(&s.moments);
                }
            }
        }
    }
    merged.retain(|m| m.histogram.total() > 0);
    (merged, count)
}

impl DriftView {
    /// A view that marks scores at or over `threshold` as drifting.
    pub fn new(threshold: f64) -> Self {
        Self(Arc::new(Inner {
            threshold,
            references: Default::default(),
            state: Default::default(),
        }))
    }

    pub fn threshold(&self) -> f64 {
        self.0.threshold
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on.
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A version's reference, if it has one (as last cached).
    pub fn reference(&self, model: &str, version: u64) -> Option<Arc<ReferenceProfile>> {
        let references = self.0.references.read().unwrap_or_else(|p| p.into_inner());
        references.get(&(model.to_string(), version)).cloned()
    }

    /// The bins agents count with for a version, if it has a reference.
    pub fn spec(&self, model: &str, version: u64) -> Option<DriftSpec> {
        self.reference(model, version).map(|r| r.spec())
    }

    /// Caches a version's reference (set by this server).
    pub fn set_reference(&self, model: &str, version: u64, profile: ReferenceProfile) {
        let mut references = self.0.references.write().unwrap_or_else(|p| p.into_inner());
        references.insert((model.to_string(), version), Arc::new(profile));
    }

    /// Reloads every reference from the store; a stored profile this
    /// server cannot read is skipped with a warning.
    pub async fn load_references(&self, store: &Store) -> Result<usize, StoreError> {
        let mut loaded = HashMap::new();
        for (model, version, json) in store.list_references().await? {
            match serde_json::from_str::<ReferenceProfile>(&json) {
                Ok(profile) => {
                    loaded.insert((model, version), Arc::new(profile));
                }
                Err(e) => {
                    tracing::warn!(%model, version, error = %e, "cannot read a stored drift reference; it is ignored");
                }
            }
        }
        let count = loaded.len();
        *self.0.references.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(count)
    }

    /// The score of one interval's statistics against the version's
    /// reference (`None` without a reference or statistics in its bins).
    pub fn interval_score(&self, model: &str, version: u64, stats: &DriftTelemetry) -> Option<f64> {
        let reference = self.reference(model, version)?;
        let (merged, n) = merge(&reference, std::iter::once(stats));
        score(&reference, &merged, n, self.0.threshold).psi
    }

    /// Takes in one new telemetry sample (the caller skips duplicates);
    /// `now` bounds device clocks that run ahead. Logs a warning when a
    /// device's score crosses the threshold.
    pub fn observe(&self, t: &TelemetryMessage, now: u64) {
        let at = t.at.min(now);
        let device = t.device_id.as_str();
        let mut crossings = Vec::new();
        {
            let mut state = self.state();
            for m in &t.models {
                let Some(drift) = m.drift.as_ref().filter(|d| !d.features.is_empty()) else {
                    continue;
                };
                let interval = Interval {
                    device: device.to_string(),
                    model: m.name.clone(),
                    version: m.version,
                    at,
                    stats: Arc::new(drift.clone()),
                };
                state
                    .latest
                    .insert((device.to_string(), m.name.clone()), interval.clone());
                if at + WINDOW_SECS >= now {
                    state.window.push_back(interval);
                }
                if let Some(psi) = self.interval_score(&m.name, m.version, drift) {
                    let key = (m.name.clone(), m.version, device.to_string());
                    let over = psi >= self.0.threshold;
                    let changed = if over {
                        state.drifting.insert(key)
                    } else {
                        state.drifting.remove(&key)
                    };
                    if changed {
                        crossings.push((m.name.clone(), m.version, psi, over));
                    }
                }
            }
            prune(&mut state.window, now);
        }
        for (model, version, psi, over) in crossings {
            if over {
                tracing::warn!(%model, version, device, psi, threshold = self.0.threshold, "model inputs or outputs drifted from the reference on this device");
            } else {
                tracing::info!(%model, version, device, psi, "model drift back under the threshold on this device");
            }
        }
    }

    /// Forgets a device (revoked or deleted).
    pub fn forget(&self, device: &str) {
        let mut state = self.state();
        state.latest.retain(|(d, _), _| d != device);
        state.window.retain(|i| i.device != device);
        state.drifting.retain(|(_, _, d)| d != device);
    }

    /// The drift of `model`'s versions: those with a reference or with
    /// statistics. `classes` maps device ids to hardware classes.
    pub fn model(&self, model: &str, classes: &HashMap<String, String>, now: u64) -> ModelDrift {
        let threshold = self.0.threshold;
        let mut state = self.state();
        prune(&mut state.window, now);
        let mut versions: BTreeMap<u64, ()> = self
            .0
            .references
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|(m, _)| m == model)
            .map(|(_, v)| (*v, ()))
            .collect();
        for i in state.latest.values().filter(|i| i.model == model) {
            versions.insert(i.version, ());
        }
        let mut out = Vec::new();
        for &version in versions.keys() {
            let reference = self.reference(model, version);
            let mut drift = VersionDrift {
                version,
                reference: reference.as_ref().map(|r| ReferenceSummary {
                    source: r.source.clone(),
                    samples: r.samples,
                    features: r.features.len(),
                }),
                fleet: None,
                classes: Vec::new(),
                devices: Vec::new(),
            };
            if let Some(reference) = reference {
                let ours: Vec<&Interval> = state
                    .window
                    .iter()
                    .filter(|i| i.model == model && i.version == version)
                    .collect();
                if !ours.is_empty() {
                    let (merged, n) = merge(&reference, ours.iter().map(|i| &*i.stats));
                    drift.fleet = Some(score(&reference, &merged, n, threshold));
                }
                let mut by_class: BTreeMap<&str, Vec<&Interval>> = BTreeMap::new();
                for i in &ours {
                    if let Some(class) = classes.get(&i.device) {
                        by_class.entry(class).or_default().push(i);
                    }
                }
                for (class, intervals) in by_class {
                    let (merged, n) = merge(&reference, intervals.iter().map(|i| &*i.stats));
                    drift.classes.push(ClassScore {
                        class: class.to_string(),
                        score: score(&reference, &merged, n, threshold),
                    });
                }
                let mut devices: Vec<DeviceScore> = state
                    .latest
                    .values()
                    .filter(|i| i.model == model && i.version == version)
                    .map(|i| {
                        let (merged, n) = merge(&reference, std::iter::once(&*i.stats));
                        DeviceScore {
                            device: i.device.clone(),
                            class: classes.get(&i.device).cloned(),
                            at: i.at,
                            score: score(&reference, &merged, n, threshold),
                        }
                    })
                    .collect();
                devices.sort_by(|a, b| a.device.cmp(&b.device));
                drift.devices = devices;
            }
            out.push(drift);
        }
        let drifting = out.iter().any(|v| {
            v.fleet.as_ref().is_some_and(|s| s.drifting)
                || v.devices.iter().any(|d| d.score.drifting)
        });
        ModelDrift {
            model: model.to_string(),
            threshold,
            window_secs: WINDOW_SECS,
            drifting,
            versions: out,
        }
    }

    /// Every model with a reference or with statistics.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .references
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|(m, _)| m.clone())
            .collect();
        names.extend(self.state().latest.values().map(|i| i.model.clone()));
        names.sort();
        names.dedup();
        names
    }

    /// The `/metrics` gauges: per version, the fleet's score, each class's
    /// and the largest device score.
    pub fn gauges(&self, classes: &HashMap<String, String>, now: u64) -> Vec<Gauge> {
        let mut out = Vec::new();
        for model in self.models() {
            for v in self.model(&model, classes, now).versions {
                if let Some(psi) = v.fleet.as_ref().and_then(|s| s.psi) {
                    out.push((model.clone(), v.version, "fleet", None, psi));
                }
                for c in &v.classes {
                    if let Some(psi) = c.score.psi {
                        out.push((
                            model.clone(),
                            v.version,
                            "class",
                            Some(c.class.clone()),
                            psi,
                        ));
                    }
                }
                let worst = v
                    .devices
                    .iter()
                    .filter_map(|d| d.score.psi)
                    .fold(None, |w: Option<f64>, p| Some(w.map_or(p, |w| w.max(p))));
                if let Some(psi) = worst {
                    out.push((model.clone(), v.version, "device_max", None, psi));
                }
            }
        }
        out
    }

    /// Logs each fleet-wide crossing of the threshold once (checked every
    /// refresh).
    fn check_fleet(&self, now: u64) {
        let no_classes = HashMap::new();
        for model in self.models() {
            for v in self.model(&model, &no_classes, now).versions {
                let Some(psi) = v.fleet.as_ref().and_then(|s| s.psi) else {
                    continue;
                };
                let over = psi >= self.0.threshold;
                let key = (model.clone(), v.version, "fleet".to_string());
                let changed = {
                    let mut state = self.state();
                    if over {
                        state.drifting.insert(key)
                    } else {
                        state.drifting.remove(&key)
                    }
                };
                if changed && over {
                    tracing::warn!(%model, version = v.version, psi, threshold = self.0.threshold, "model drifted from the reference fleet-wide");
                } else if changed {
                    tracing::info!(%model, version = v.version, psi, "model drift back under the threshold fleet-wide");
                }
            }
        }
    }

    /// Reloads the references from the store and checks the fleet-wide
    /// scores every [`FOLLOW_EVERY`] until `shutdown`.
    pub async fn follow(self, store: Store, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.load_references(&store).await {
                tracing::warn!(error = %e, "cannot reload the drift references from the store");
            }
            self.check_fleet(edgefleet_shared::unix_now());
        }
    }
}

/// Each device's hardware class, as the dashboard groups devices
/// (`unknown` for a device never enrolled with one).
pub fn hardware_classes(devices: &[crate::store::DeviceRecord]) -> HashMap<String, String> {
    devices
        .iter()
        .map(|d| {
            let class = d.hardware.as_deref().unwrap_or("unknown");
            (d.id.clone(), class.to_string())
        })
        .collect()
}

/// Drops intervals older than the window.
fn prune(window: &mut VecDeque<Interval>, now: u64) {
    let horizon = now.saturating_sub(WINDOW_SECS);
    while window
        .front()
        .is_some_and(|i| i.at < horizon || window.len() > WINDOW_MAX)
    {
        window.pop_front();
    }
}
