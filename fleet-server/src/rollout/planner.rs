//! The staged-rollout planner: a pure state machine. It owns no
//! I/O: the server feeds it operator actions, device reports and the
//! clock, and carries out the commands it returns (sign a desired state
//! for a device, or sign the previous version again). Its whole state is
//! plain data (serde), so a server restart resumes exactly where it was.
//!
//! - Devices are ordered by a hash of the rollout id and the device id:
//!   canaries are stable for a rollout and differ between rollouts.
//! - Waves are cumulative sizes (1 device, 5 %, 25 %, 100 %); wave `i`
//!   holds the devices ranked below its size and above the previous one's.
//! - Gates, per wave boundary: at least `min_confirmed` devices confirmed
//!   and `success_pct` of the settled devices healthy, the soak time over,
//!   and, if asked for, an operator's approval. The failure threshold is
//!   checked after every report, so it stops the rollout inside the wave in
//!   which it is crossed, before the next wave starts.
//! - At most `max_in_flight` devices update at once; a device that does not
//!   report within `device_timeout_secs` is retried up to `retries` times
//!   with a doubling backoff, then counted as failed.
//! - Offline devices are counted apart and do not hold a gate back once
//!   `offline_grace_secs` has passed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use edgefleet_shared::quality::OutputComparison;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod shadow;
pub use shadow::WaveShadow;

/// What to do when the failure threshold is crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    Pause,
    Abort,
}

/// Wave sizes, cumulative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    Count(u32),
    Percent(f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gates {
    pub min_confirmed: u32,
    /// Percent of a wave's settled devices that must be healthy.
    pub success_pct: f64,
    /// Percent of the rollout's settled devices failed (or rolled back)
    /// at which `failure_action` is taken.
    pub failure_pct: f64,
    pub failure_action: FailureAction,
    pub soak_secs: u64,
    pub manual_approval: bool,
    pub max_in_flight: u32,
    pub device_timeout_secs: u64,
    pub retries: u32,
    pub offline_grace_secs: u64,
    /// Telemetry limits for devices on the new version: inference error
    /// rate (percent of inferences in one telemetry interval) and p95
    /// latency (milliseconds), judged once an interval holds at least
    /// `min_inferences`. A device over a limit counts as failed, even
    /// after it confirmed.
    pub max_error_pct: Option<f64>,
    pub max_p95_ms: Option<f64>,
    /// Drift limit: a device on the new version whose interval drift
    /// score (largest feature PSI against the version's reference)
    /// exceeds it counts as failed, like the error-rate limit. Needs a
    /// reference on the version ([`crate::drift`]).
    pub max_drift_psi: Option<f64>,
    pub min_inferences: u64,
    /// Shadow gate (see [`shadow`]): a wave's devices first run the new
    /// version in shadow, and the wave moves once the agreement (a share,
    /// 0..1) over at least `min_shadow_requests` compared requests reaches
    /// this.
    pub min_shadow_agreement: Option<f64>,
    pub min_shadow_requests: u64,
    /// Share of requests a device also runs on the candidate.
    pub shadow_sample_rate: f64,
    /// How outputs are compared (outputs not listed: top-1).
    pub shadow_compare: Vec<OutputComparison>,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            min_confirmed: 1,
            success_pct: 95.0,
            failure_pct: 10.0,
            failure_action: FailureAction::Pause,
            soak_secs: 0,
            manual_approval: false,
            max_in_flight: 100,
            device_timeout_secs: 600,
            retries: 2,
            offline_grace_secs: 900,
            max_error_pct: None,
            max_p95_ms: None,
            max_drift_psi: None,
            min_inferences: 20,
            min_shadow_agreement: None,
            min_shadow_requests: 200,
            shadow_sample_rate: 0.1,
            shadow_compare: Vec::new(),
        }
    }
}

impl Gates {
    /// Judges one telemetry interval of a device on the new version
    /// (successful and failed inferences, p95 latency in microseconds)
    /// against the limits: why it breaks them, if it does.
    pub fn judge(&self, inferences: u64, errors: u64, p95_us: Option<f64>) -> Option<String> {
        let total = inferences.saturating_add(errors);
        if total == 0 || total < self.min_inferences {
            return None;
        }
        let error_pct = errors as f64 * 100.0 / total as f64;
        if let Some(limit) = self.max_error_pct {
            if error_pct > limit {
                return Some(format!(
                    "inference error rate {error_pct:.1} % > {limit} % ({errors} of {total})"
                ));
            }
        }
        match (self.max_p95_ms, p95_us) {
            (Some(limit), Some(p95)) if p95 / 1000.0 > limit => {
                Some(format!("p95 latency {:.2} ms > {limit} ms", p95 / 1000.0))
            }
            _ => None,
        }
    }

    /// Judges one interval's drift score against the drift limit: why it
    /// breaks it, if it does.
    pub fn judge_drift(&self, psi: Option<f64>) -> Option<String> {
        match (self.max_drift_psi, psi) {
            (Some(limit), Some(psi)) if psi > limit => {
                Some(format!("drift score (PSI) {psi:.3} > {limit}"))
            }
            _ => None,
        }
    }

    /// Whether any telemetry limit is set.
    pub fn watches_telemetry(&self) -> bool {
        self.max_error_pct.is_some()
            || self.max_p95_ms.is_some()
            || self.max_drift_psi.is_some()
            || self.min_shadow_agreement.is_some()
    }
}

/// Where one device stands in the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeviceState {
    /// Not asked yet (its wave has not started, or no slot in flight).
    Waiting,
    /// Asked to update at `since`; `attempt` counts from 1.
    Updating {
        since: u64,
        attempt: u32,
    },
    /// Waiting `until` before asking again.
    Backoff {
        until: u64,
        attempt: u32,
    },
    Confirmed {
        at: u64,
    },
    Failed {
        reason: String,
    },
    /// Sent back to its previous version by an abort.
    Reverted,
    /// Offline when its turn came, since `since`.
    Offline {
        since: u64,
    },
    /// Taken out by an operator (and sent back if it had moved): counts
    /// neither as healthy nor as failed.
    Excluded,
}

/// How many [`DeviceState`] kinds there are (see [`DeviceState::kind`]).
const KINDS: usize = 8;
const WAITING: usize = 0;
const UPDATING: usize = 1;
const BACKOFF: usize = 2;
const CONFIRMED: usize = 3;
const FAILED: usize = 4;
const REVERTED: usize = 5;
const OFFLINE: usize = 6;
const EXCLUDED: usize = 7;
/// The names of the device states, as status counts use them.
pub const KIND_NAMES: [&str; KINDS] = [
    "waiting",
    "updating",
    "backoff",
    "confirmed",
    "failed",
    "reverted",
    "offline",
    "excluded",
];

impl DeviceState {
    fn kind(&self) -> usize {
        match self {
            Self::Waiting => WAITING,
            Self::Updating { .. } => UPDATING,
            Self::Backoff { .. } => BACKOFF,
            Self::Confirmed { .. } => CONFIRMED,
            Self::Failed { .. } => FAILED,
            Self::Reverted => REVERTED,
            Self::Offline { .. } => OFFLINE,
            Self::Excluded => EXCLUDED,
        }
    }

    /// Asked at some point and not sent back yet.
    fn moved(&self) -> bool {
        matches!(
            self,
            Self::Updating { .. }
                | Self::Backoff { .. }
                | Self::Confirmed { .. }
                | Self::Failed { .. }
        )
    }
}

/// The rollout's phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Created,
    Running {
        wave: usize,
        wave_started: u64,
    },
    /// Waiting for the operator to approve wave `next`.
    AwaitingApproval {
        next: usize,
    },
    Paused {
        wave: usize,
        reason: String,
    },
    Aborted {
        reason: String,
    },
    Completed,
}

/// What a device reported about the update.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Activated, test vector passed, soak passed.
    Healthy,
    /// Refused, failed its test vector, or rolled back by itself.
    Unhealthy(String),
    /// Running the new version, but its telemetry breaks the rollout's
    /// limits (error rate, latency): failed even once confirmed.
    Degraded(String),
    /// Its status says it runs the target version (no outcome in it: it
    /// settles only a device that was asked again after a timeout).
    Running,
    Online,
    Offline,
}

/// An operator's decision about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Override {
    /// Take it out of the rollout (sent back if it had moved).
    Exclude,
    /// Put a failed, reverted, excluded or offline device back in line.
    Retry,
    /// Ask it now, whatever its wave and the in-flight limit.
    Force,
}

/// What the server must do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Sign a desired state with the rollout's target version.
    Update(String),
    /// Sign a desired state with the device's previous version.
    Revert(String),
    /// Sign a desired state that runs the target version in shadow beside
    /// the device's own.
    Shadow(String),
    /// Sign a desired state without the shadow candidate.
    EndShadow(String),
}

/// A rollout's definition and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub waves: Vec<WaveSize>,
    pub gates: Gates,
    /// Devices in canary order (devices that joined later at the end).
    pub order: Vec<String>,
    pub devices: BTreeMap<String, DeviceState>,
    pub phase: Phase,
    /// Cumulative wave ends, fixed at creation; a device that joins later
    /// goes into the last wave.
    #[serde(default)]
    pub ends: Vec<usize>,
    /// Per wave, its shadow run (when the shadow gate is on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<WaveShadow>,
    /// Derived from the above, rebuilt after loading.
    #[serde(skip)]
    index: Index,
}

/// Positions and per-state counts, so a report costs O(log n) rather than
/// a pass over the whole fleet (10,000 devices report within seconds).
#[derive(Debug, Clone, Default)]
struct Index {
    built: bool,
    position: HashMap<String, usize>,
    /// Devices per state kind, per wave.
    per_wave: Vec<[usize; KINDS]>,
    /// Positions per state kind.
    members: [BTreeSet<usize>; KINDS],
}

impl PartialEq for Index {
    /// Derived data: two rollouts are equal when their state is.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A device's rank: the first 8 bytes of SHA-256(rollout id, device id).
pub fn rank(rollout: &str, device: &str) -> u64 {
    let digest = Sha256::digest(format!("{rollout}\0{device}").as_bytes());
    u64::from_be_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has at least 8 bytes"),
    )
}

/// Cumulative wave ends (device counts) for `total` devices; the last
/// wave always ends at `total`, and every wave holds at least one device.
pub fn wave_ends(waves: &[WaveSize], total: usize) -> Vec<usize> {
    let mut ends: Vec<usize> = Vec::new();
    for w in waves {
        let end = match *w {
            WaveSize::Count(n) => n as usize,
            WaveSize::Percent(p) => ((p.clamp(0.0, 100.0) / 100.0) * total as f64).ceil() as usize,
        }
        .min(total);
        if end > ends.last().copied().unwrap_or(0) {
            ends.push(end);
        }
    }
    if ends.last().copied().unwrap_or(0) < total {
        ends.push(total);
    }
    ends
}

/// An exponential ramp: `base` devices, then times `factor` until all.
pub fn exponential_waves(base: u32, factor: f64) -> Vec<WaveSize> {
    let mut waves = Vec::new();
    let mut n = base.max(1) as f64;
    while n < 1e9 && waves.len() < 64 {
        waves.push(WaveSize::Count(n.ceil() as u32));
        n *= factor.max(1.01);
    }
    waves.push(WaveSize::Percent(100.0));
    waves
}

/// Counts over some waves.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub confirmed: usize,
    /// Failed or reverted.
    pub failed: usize,
    /// Confirmed, failed or reverted.
    pub settled: usize,
    pub offline: usize,
    pub excluded: usize,
}

impl Rollout {
    pub fn new(id: &str, mut devices: Vec<String>, waves: Vec<WaveSize>, gates: Gates) -> Self {
        devices.sort_by_key(|d| (rank(id, d), d.clone()));
        devices.dedup();
        let mut rollout = Self {
            id: id.to_string(),
            ends: wave_ends(&waves, devices.len()),
            waves,
            gates,
            devices: devices
                .iter()
                .map(|d| (d.clone(), DeviceState::Waiting))
                .collect(),
            order: devices,
            phase: Phase::Created,
            shadow: Vec::new(),
            index: Index::default(),
        };
        rollout.build_index();
        rollout
    }

    /// Wave ends: as fixed at creation (older stored rollouts have none
    /// and get them from their size).
    fn bounds(&self) -> Vec<usize> {
        if self.ends.is_empty() {
            wave_ends(&self.waves, self.order.len())
        } else {
            self.ends.clone()
        }
    }

    fn build_index(&mut self) {
        if self.index.built {
            return;
        }
        self.ends = self.bounds();
        let mut index = Index {
            built: true,
            per_wave: vec![[0; KINDS]; self.ends.len()],
            ..Index::default()
        };
        let mut wave = 0;
        for (i, d) in self.order.iter().enumerate() {
            while i >= self.ends[wave] {
                wave += 1;
            }
            let kind = self.devices[d].kind();
            index.position.insert(d.clone(), i);
            index.per_wave[wave][kind] += 1;
            index.members[kind].insert(i);
        }
        self.index = index;
    }

    fn wave_at(&self, position: usize) -> usize {
        self.ends.partition_point(|&end| end <= position)
    }

    fn state_at(&self, position: usize) -> &DeviceState {
        &self.devices[&self.order[position]]
    }

    /// Every change of a device's state goes through here.
    fn set(&mut self, position: usize, new: DeviceState) {
        let wave = self.wave_at(position);
        let slot = self
            .devices
            .get_mut(&self.order[position])
            .expect("every ordered device has a state");
        let (old, kind) = (slot.kind(), new.kind());
        *slot = new;
        let index = &mut self.index;
        index.per_wave[wave][old] -= 1;
        index.members[old].remove(&position);
        index.per_wave[wave][kind] += 1;
        index.members[kind].insert(position);
    }

    /// Which wave each device is in (a dry run shows this).
    pub fn plan(&self) -> Vec<Vec<String>> {
        let mut start = 0;
        self.bounds()
            .into_iter()
            .map(|end| {
                let wave = self.order[start..end].to_vec();
                start = end;
                wave
            })
            .collect()
    }

    /// Counts over waves `0..=wave` (or all).
    pub fn counts(&mut self, upto: Option<usize>) -> Counts {
        self.build_index();
        let waves = upto.map_or(self.ends.len(), |w| w + 1);
        let mut by_kind = [0usize; KINDS];
        for wave in &self.index.per_wave[..waves] {
            for (total, n) in by_kind.iter_mut().zip(wave) {
                *total += n;
            }
        }
        Counts {
            confirmed: by_kind[CONFIRMED],
            failed: by_kind[FAILED] + by_kind[REVERTED],
            settled: by_kind[CONFIRMED] + by_kind[FAILED] + by_kind[REVERTED],
            offline: by_kind[OFFLINE],
            excluded: by_kind[EXCLUDED],
        }
    }

    pub fn start(&mut self, now: u64) -> Result<Vec<Command>, String> {
        match self.phase {
            Phase::Created => {
                self.phase = Phase::Running {
                    wave: 0,
                    wave_started: now,
                };
                Ok(self.advance(now))
            }
            _ => Err(format!("rollout {} has already started", self.id)),
        }
    }

    pub fn pause(&mut self, reason: &str) -> Result<(), String> {
        match self.phase {
            Phase::Running { wave, .. } => {
                self.phase = Phase::Paused {
                    wave,
                    reason: reason.to_string(),
                };
                Ok(())
            }
            _ => Err(format!("rollout {} is not running", self.id)),
        }
    }

    pub fn resume(&mut self, now: u64) -> Result<Vec<Command>, String> {
        match self.phase {
            Phase::Paused { wave, .. } => {
                self.phase = Phase::Running {
                    wave,
                    wave_started: now,
                };
                self.restart_shadow(wave, now);
                Ok(self.advance(now))
            }
            _ => Err(format!("rollout {} is not paused", self.id)),
        }
    }

    pub fn approve(&mut self, now: u64) -> Result<Vec<Command>, String> {
        match self.phase {
            Phase::AwaitingApproval { next } => {
                self.phase = Phase::Running {
                    wave: next,
                    wave_started: now,
                };
                Ok(self.advance(now))
            }
            _ => Err(format!("rollout {} is not waiting for approval", self.id)),
        }
    }

    pub fn ended(&self) -> bool {
        matches!(self.phase, Phase::Aborted { .. } | Phase::Completed)
    }

    /// Stops the rollout and sends every device that moved (or is moving)
    /// back to its previous version.
    pub fn abort(&mut self, reason: &str) -> Result<Vec<Command>, String> {
        if self.ended() {
            return Err(format!("rollout {} has ended", self.id));
        }
        self.build_index();
        self.phase = Phase::Aborted {
            reason: reason.to_string(),
        };
        let mut commands = Vec::new();
        for i in 0..self.order.len() {
            if self.state_at(i).moved() {
                self.set(i, DeviceState::Reverted);
                commands.push(Command::Revert(self.order[i].clone()));
            }
        }
        commands.extend(self.end_shadows());
        Ok(commands)
    }

    /// A device that joined the selection while the rollout runs (new to
    /// the fleet, enrolled, or newly tagged): it goes into the last wave,
    /// under the same gates. Returns `None` when it is already in.
    pub fn join(&mut self, device: &str, online: bool, now: u64) -> Option<Vec<Command>> {
        self.build_index();
        if self.ended() || self.devices.contains_key(device) {
            return None;
        }
        let state = if online {
            DeviceState::Waiting
        } else {
            DeviceState::Offline { since: now }
        };
        let position = self.order.len();
        let kind = state.kind();
        self.order.push(device.to_string());
        self.devices.insert(device.to_string(), state);
        *self.ends.last_mut().expect("a rollout has a wave") += 1;
        let index = &mut self.index;
        index.position.insert(device.to_string(), position);
        index
            .per_wave
            .last_mut()
            .expect("the index has one entry per wave, and a rollout has a wave")[kind] += 1;
        index.members[kind].insert(position);
        Some(self.advance(now))
    }

    /// An operator's decision about one device.
    pub fn override_device(
        &mut self,
        device: &str,
        action: Override,
        now: u64,
    ) -> Result<Vec<Command>, String> {
        self.build_index();
        if self.ended() {
            return Err(format!("rollout {} has ended", self.id));
        }
        let Some(&position) = self.index.position.get(device) else {
            return Err(format!("device {device} is not in rollout {}", self.id));
        };
        let state = self.state_at(position).clone();
        let name = KIND_NAMES[state.kind()];
        let mut commands = Vec::new();
        match action {
            Override::Exclude => {
                if state.moved() {
                    commands.push(Command::Revert(device.to_string()));
                }
                self.set(position, DeviceState::Excluded);
            }
            Override::Retry => match state {
                DeviceState::Failed { .. }
                | DeviceState::Reverted
                | DeviceState::Excluded
                | DeviceState::Offline { .. } => self.set(position, DeviceState::Waiting),
                _ => return Err(format!("device {device} is {name}: nothing to retry")),
            },
            Override::Force => match state {
                DeviceState::Updating { .. } | DeviceState::Confirmed { .. } => {
                    return Err(format!("device {device} is already {name}"))
                }
                _ => {
                    self.set(
                        position,
                        DeviceState::Updating {
                            since: now,
                            attempt: 1,
                        },
                    );
                    commands.push(Command::Update(device.to_string()));
                }
            },
        }
        commands.extend(self.advance(now));
        Ok(commands)
    }

    /// A device's report.
    pub fn report(&mut self, device: &str, report: Report, now: u64) -> Vec<Command> {
        self.build_index();
        let Some(&position) = self.index.position.get(device) else {
            return Vec::new();
        };
        let state = self.state_at(position);
        // An outcome is taken from a device that is not marked as asked
        // too: its connection may have dropped (offline, then waiting to
        // be asked again) while it was updating, and the outcome comes
        // after it reconnects.
        let open = matches!(
            state,
            DeviceState::Updating { .. }
                | DeviceState::Backoff { .. }
                | DeviceState::Waiting
                | DeviceState::Offline { .. }
        );
        let asked = matches!(
            state,
            DeviceState::Updating { .. } | DeviceState::Backoff { .. }
        );
        let new = match report {
            Report::Healthy if open => Some(DeviceState::Confirmed { at: now }),
            Report::Unhealthy(reason) if open => Some(DeviceState::Failed { reason }),
            // Asked again after a timeout, it says it already runs the
            // version: its confirmation was lost on the way.
            Report::Running
                if matches!(state, DeviceState::Backoff { .. })
                    || matches!(state, DeviceState::Updating { attempt, .. } if *attempt > 1) =>
            {
                Some(DeviceState::Confirmed { at: now })
            }
            Report::Degraded(reason) if asked || matches!(state, DeviceState::Confirmed { .. }) => {
                Some(DeviceState::Failed { reason })
            }
            Report::Offline
                if matches!(state, DeviceState::Waiting | DeviceState::Updating { .. }) =>
            {
                Some(DeviceState::Offline { since: now })
            }
            // Back under the same gates: asked again when a slot is free.
            Report::Online if matches!(state, DeviceState::Offline { .. }) => {
                Some(DeviceState::Waiting)
            }
            _ => None,
        };
        if let Some(new) = new {
            self.set(position, new);
        }
        self.advance(now)
    }

    /// The clock: timeouts, backoffs, soak and gates.
    pub fn tick(&mut self, now: u64) -> Vec<Command> {
        self.build_index();
        let timeout = self.gates.device_timeout_secs;
        let retries = self.gates.retries;
        let updating: Vec<usize> = self.index.members[UPDATING].iter().copied().collect();
        for position in updating {
            let DeviceState::Updating { since, attempt } = *self.state_at(position) else {
                continue;
            };
            if now.saturating_sub(since) < timeout {
                continue;
            }
            let next = if attempt > retries {
                DeviceState::Failed {
                    reason: format!("no report within {timeout} s, {attempt} attempts"),
                }
            } else {
                DeviceState::Backoff {
                    until: now + timeout.min(60) * (1 << attempt.min(6)),
                    attempt,
                }
            };
            self.set(position, next);
        }
        self.advance(now)
    }

    /// Applies the gates and hands out update slots.
    fn advance(&mut self, now: u64) -> Vec<Command> {
        let Phase::Running { wave, wave_started } = self.phase.clone() else {
            return Vec::new();
        };
        // Failure threshold over everything asked so far.
        let all = self.counts(None);
        if all.settled > 0
            && all.failed as f64 * 100.0 / all.settled as f64 >= self.gates.failure_pct
        {
            let reason = format!(
                "{} of {} settled devices failed ({:.0} % >= {} %)",
                all.failed,
                all.settled,
                all.failed as f64 * 100.0 / all.settled as f64,
                self.gates.failure_pct
            );
            return match self.gates.failure_action {
                FailureAction::Pause => {
                    self.phase = Phase::Paused { wave, reason };
                    Vec::new()
                }
                FailureAction::Abort => self.abort(&reason).unwrap_or_default(),
            };
        }
        let mut commands = match self.shadow_gate(wave, now) {
            shadow::Hold::Move(commands) => commands,
            shadow::Hold::Wait(commands) => return commands,
        };
        let scope = self.ends[wave];
        // Hand out free slots inside the current wave, in canary order:
        // devices waiting, and those whose backoff is over.
        let in_flight = self.index.members[UPDATING].len();
        let free = (self.gates.max_in_flight as usize).saturating_sub(in_flight);
        let mut picks: Vec<usize> = self.index.members[BACKOFF]
            .range(..scope)
            .copied()
            .filter(|&i| matches!(*self.state_at(i), DeviceState::Backoff { until, .. } if now >= until))
            .collect();
        picks.extend(self.index.members[WAITING].range(..scope).take(free));
        picks.sort_unstable();
        picks.truncate(free);
        for position in picks {
            let attempt = match *self.state_at(position) {
                DeviceState::Backoff { attempt, .. } => attempt + 1,
                _ => 1,
            };
            self.set(
                position,
                DeviceState::Updating {
                    since: now,
                    attempt,
                },
            );
            commands.push(Command::Update(self.order[position].clone()));
        }
        // The wave's gate.
        let c = self.counts(Some(wave));
        let offline_waited =
            self.index.members[OFFLINE]
                .range(..scope)
                .all(|&i| match *self.state_at(i) {
                    DeviceState::Offline { since } => {
                        now.saturating_sub(since) >= self.gates.offline_grace_secs
                    }
                    _ => true,
                });
        let all_settled = c.settled + c.offline + c.excluded == scope && offline_waited;
        // A wave with nobody settled (all offline or excluded) has nothing
        // unhealthy in it.
        let healthy_pct = if c.settled == 0 {
            100.0
        } else {
            c.confirmed as f64 * 100.0 / c.settled as f64
        };
        let soaked = now.saturating_sub(wave_started) >= self.gates.soak_secs;
        if all_settled
            && soaked
            && c.confirmed
                >= (self.gates.min_confirmed as usize).min(scope - c.offline - c.excluded)
            && healthy_pct >= self.gates.success_pct
        {
            if wave + 1 == self.ends.len() {
                self.phase = Phase::Completed;
            } else if self.gates.manual_approval {
                self.phase = Phase::AwaitingApproval { next: wave + 1 };
            } else {
                self.phase = Phase::Running {
                    wave: wave + 1,
                    wave_started: now,
                };
                commands.extend(self.advance(now));
            }
        }
        commands
    }

    /// Counts per device state, for status (states with no device left
    /// out).
    pub fn summary(&self) -> BTreeMap<&'static str, usize> {
        let mut by_kind = [0usize; KINDS];
        if self.index.built {
            for wave in &self.index.per_wave {
                for (total, n) in by_kind.iter_mut().zip(wave) {
                    *total += n;
                }
            }
        } else {
            for s in self.devices.values() {
                by_kind[s.kind()] += 1;
            }
        }
        KIND_NAMES
            .iter()
            .zip(by_kind)
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| (*name, n))
            .collect()
    }

    /// Per wave: its size and counts per device state, for status.
    pub fn wave_summary(&self) -> Vec<BTreeMap<&'static str, usize>> {
        let ends = self.bounds();
        let mut per_wave = vec![[0usize; KINDS]; ends.len()];
        if self.index.built {
            per_wave.clone_from(&self.index.per_wave);
        } else {
            let mut wave = 0;
            for (i, d) in self.order.iter().enumerate() {
                while i >= ends[wave] {
                    wave += 1;
                }
                per_wave[wave][self.devices[d].kind()] += 1;
            }
        }
        per_wave
            .iter()
            .map(|kinds| {
                let mut counts: BTreeMap<&'static str, usize> = KIND_NAMES
                    .iter()
                    .zip(kinds)
                    .filter(|(_, n)| **n > 0)
                    .map(|(name, n)| (*name, *n))
                    .collect();
                counts.insert("size", kinds.iter().sum());
                counts
            })
            .collect()
    }

    /// The wave a device belongs to, for status.
    pub fn device_wave(&self, device: &str) -> Option<usize> {
        let position = self.order.iter().position(|d| d == device)?;
        Some(self.bounds().partition_point(|&end| end <= position))
    }
}

#[cfg(test)]
mod tests;
