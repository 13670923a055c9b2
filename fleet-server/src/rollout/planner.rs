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

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    pub min_inferences: u64,
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
            min_inferences: 20,
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

    /// Whether any telemetry limit is set.
    pub fn watches_telemetry(&self) -> bool {
        self.max_error_pct.is_some() || self.max_p95_ms.is_some()
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Sign a desired state with the rollout's target version.
    Update(String),
    /// Sign a desired state with the device's previous version.
    Revert(String),
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
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
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
        index.per_wave.last_mut().expect("a wave")[kind] += 1;
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
        let mut commands = Vec::new();
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
mod tests {
    use super::*;

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dev-{i:05}")).collect()
    }

    fn updated(commands: &[Command]) -> Vec<String> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::Update(d) => Some(d.clone()),
                _ => None,
            })
            .collect()
    }

    fn four_waves() -> Vec<WaveSize> {
        vec![
            WaveSize::Count(1),
            WaveSize::Percent(5.0),
            WaveSize::Percent(25.0),
            WaveSize::Percent(100.0),
        ]
    }

    #[test]
    fn order_is_stable_per_rollout_and_differs_between_rollouts() {
        let a = Rollout::new("r1", devices(50), four_waves(), Gates::default());
        let again = Rollout::new(
            "r1",
            devices(50).into_iter().rev().collect(),
            four_waves(),
            Gates::default(),
        );
        let b = Rollout::new("r2", devices(50), four_waves(), Gates::default());
        assert_eq!(a.order, again.order);
        assert_ne!(a.order, b.order);
    }

    #[test]
    fn waves_are_cumulative_and_cover_every_device() {
        assert_eq!(wave_ends(&four_waves(), 100), vec![1, 5, 25, 100]);
        assert_eq!(wave_ends(&four_waves(), 3), vec![1, 3]);
        assert_eq!(wave_ends(&[WaveSize::Count(10)], 4), vec![4]);
        assert_eq!(wave_ends(&[WaveSize::Percent(50.0)], 5), vec![3, 5]);
        assert_eq!(wave_ends(&[], 7), vec![7]);
        let ramp = exponential_waves(2, 3.0);
        assert_eq!(wave_ends(&ramp, 100), vec![2, 6, 18, 54, 100]);
        let r = Rollout::new("r", devices(40), four_waves(), Gates::default());
        let plan = r.plan();
        assert_eq!(
            plan.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1, 1, 8, 30]
        );
        assert_eq!(plan.concat().len(), 40);
        let sizes: Vec<usize> = r.wave_summary().iter().map(|w| w["size"]).collect();
        assert_eq!(sizes, vec![1, 1, 8, 30]);
        assert_eq!(r.wave_summary()[3]["waiting"], 30);
        assert_eq!(r.device_wave(&plan[2][0]), Some(2));
    }

    #[test]
    fn healthy_waves_advance_to_completion() {
        let mut r = Rollout::new("r", devices(20), four_waves(), Gates::default());
        let mut asked = updated(&r.start(0).unwrap());
        assert_eq!(asked.len(), 1, "the canary first");
        let mut t = 1;
        while let Some(d) = asked.pop() {
            asked.extend(updated(&r.report(&d, Report::Healthy, t)));
            t += 1;
        }
        assert_eq!(r.phase, Phase::Completed);
        assert_eq!(r.summary()["confirmed"], 20);
        assert!(r.start(t).is_err());
    }

    #[test]
    fn the_failure_threshold_pauses_or_aborts_inside_its_wave() {
        for action in [FailureAction::Pause, FailureAction::Abort] {
            let gates = Gates {
                failure_pct: 20.0,
                failure_action: action,
                ..Gates::default()
            };
            let mut r = Rollout::new("r", devices(100), four_waves(), gates);
            let canary = updated(&r.start(0).unwrap());
            let wave1 = updated(&r.report(&canary[0], Report::Healthy, 1));
            assert_eq!(wave1.len(), 4);
            let commands = r.report(&wave1[0], Report::Unhealthy("test vector failed".into()), 2);
            match action {
                FailureAction::Pause => {
                    assert!(
                        matches!(&r.phase, Phase::Paused { wave: 1, reason } if reason.contains("1 of 2"))
                    );
                    assert!(commands.is_empty());
                    assert!(r.approve(3).is_err());
                    // Later reports do not move a paused rollout on.
                    for d in &wave1[1..] {
                        assert!(updated(&r.report(d, Report::Healthy, 3)).is_empty());
                    }
                }
                FailureAction::Abort => {
                    assert!(matches!(r.phase, Phase::Aborted { .. }));
                    let reverted: Vec<_> = commands
                        .iter()
                        .filter(|c| matches!(c, Command::Revert(_)))
                        .collect();
                    assert_eq!(reverted.len(), 5, "canary and all of wave 1 go back");
                }
            }
            // Nobody beyond wave 1 was ever asked.
            let plan = r.plan();
            for d in plan[2..].concat() {
                assert!(matches!(r.devices[&d], DeviceState::Waiting), "{d}");
            }
        }
    }

    #[test]
    fn manual_approval_pause_resume_and_abort() {
        let gates = Gates {
            manual_approval: true,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(10), four_waves(), gates);
        let canary = updated(&r.start(0).unwrap());
        assert!(updated(&r.report(&canary[0], Report::Healthy, 1)).is_empty());
        assert_eq!(r.phase, Phase::AwaitingApproval { next: 1 });
        let next = updated(&r.approve(2).unwrap());
        assert_eq!(wave_ends(&four_waves(), 10), vec![1, 3, 10]);
        assert_eq!(next, r.plan()[1], "wave 1: the next two in canary order");
        r.pause("operator").unwrap();
        assert!(r.pause("again").is_err());
        assert!(
            updated(&r.tick(3)).is_empty(),
            "paused: nothing is handed out"
        );
        r.resume(4).unwrap();
        let reverts = r.abort("operator changed their mind").unwrap();
        // Every device asked so far goes back, in canary order.
        let expected: Vec<Command> = [canary, next]
            .concat()
            .into_iter()
            .map(Command::Revert)
            .collect();
        assert_eq!(reverts, expected);
        assert!(r.abort("twice").is_err());
    }

    #[test]
    fn soak_time_holds_the_wave_boundary() {
        let gates = Gates {
            soak_secs: 300,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(10), four_waves(), gates);
        let canary = updated(&r.start(0).unwrap());
        assert!(updated(&r.report(&canary[0], Report::Healthy, 10)).is_empty());
        assert!(updated(&r.tick(299)).is_empty());
        assert_eq!(updated(&r.tick(300)), r.plan()[1], "wave 1 after the soak");
    }

    #[test]
    fn max_in_flight_timeouts_retries_and_backoff() {
        let gates = Gates {
            max_in_flight: 2,
            device_timeout_secs: 10,
            retries: 1,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(6), vec![WaveSize::Percent(100.0)], gates);
        let first = updated(&r.start(0).unwrap());
        assert_eq!(first.len(), 2, "at most 2 in flight");
        // Both time out: backoff, then asked again (attempt 2), then failed.
        assert!(updated(&r.tick(10)).len() <= 2);
        assert!(matches!(
            r.devices[&first[0]],
            DeviceState::Backoff { attempt: 1, .. } | DeviceState::Updating { .. }
        ));
        let mut t = 10;
        let mut failed = false;
        for _ in 0..50 {
            t += 10;
            r.tick(t);
            if matches!(r.devices[&first[0]], DeviceState::Failed { .. }) {
                failed = true;
                break;
            }
        }
        assert!(failed, "{:?}", r.devices[&first[0]]);
        let in_flight = r
            .devices
            .values()
            .filter(|s| matches!(s, DeviceState::Updating { .. }))
            .count();
        assert!(in_flight <= 2);
    }

    #[test]
    fn offline_devices_do_not_block_a_gate_forever_and_rejoin() {
        let gates = Gates {
            offline_grace_secs: 100,
            ..Gates::default()
        };
        let mut r = Rollout::new(
            "r",
            devices(4),
            vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
            gates,
        );
        let first = updated(&r.start(0).unwrap());
        assert_eq!(first.len(), 2);
        r.report(&first[1], Report::Offline, 1);
        assert!(
            updated(&r.report(&first[0], Report::Healthy, 2)).is_empty(),
            "offline grace not over"
        );
        let next = updated(&r.tick(101));
        assert_eq!(next.len(), 2, "the gate opened after the grace");
        // It comes back: asked again under the same gates.
        let again = updated(&r.report(&first[1], Report::Online, 102));
        assert_eq!(again, vec![first[1].clone()]);
    }

    /// Random device outcomes: whatever happens, a rollout whose failures
    /// reach the threshold never starts a wave after the one in which that
    /// happened.
    #[test]
    fn property_the_failure_threshold_stops_before_the_next_wave() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..300 {
            let n = 5 + (next() % 200) as usize;
            let fail_pct = (next() % 60) as f64;
            let threshold = 5.0 + (next() % 40) as f64;
            let gates = Gates {
                failure_pct: threshold,
                success_pct: 0.0,
                max_in_flight: 1 + (next() % 20) as u32,
                ..Gates::default()
            };
            let mut r = Rollout::new(&format!("p{case}"), devices(n), four_waves(), gates);
            let mut pending = updated(&r.start(0).unwrap());
            let mut t = 0;
            let mut crossed_in: Option<usize> = None;
            while let Some(d) = pending.pop() {
                t += 1;
                let wave = r.device_wave(&d).unwrap();
                let report = if ((next() % 100) as f64) < fail_pct {
                    Report::Unhealthy("bad".into())
                } else {
                    Report::Healthy
                };
                pending.extend(updated(&r.report(&d, report, t)));
                let c = r.counts(None);
                if crossed_in.is_none()
                    && c.settled > 0
                    && c.failed as f64 * 100.0 / c.settled as f64 >= threshold
                {
                    crossed_in = Some(wave);
                }
                if let Some(w) = crossed_in {
                    assert!(
                        matches!(r.phase, Phase::Paused { .. }),
                        "case {case}: {:?}",
                        r.phase
                    );
                    let plan = r.plan();
                    for later in plan.iter().skip(w + 1).flatten() {
                        assert!(
                            matches!(r.devices[later], DeviceState::Waiting),
                            "case {case}: {later} in a later wave was asked"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn state_survives_serialisation() {
        let mut r = Rollout::new("r", devices(8), four_waves(), Gates::default());
        let canary = updated(&r.start(0).unwrap());
        r.report(&canary[0], Report::Healthy, 1);
        let json = serde_json::to_string(&r).unwrap();
        let back: Rollout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn telemetry_limits_judge_error_rate_and_latency() {
        let gates = Gates {
            max_error_pct: Some(5.0),
            max_p95_ms: Some(20.0),
            min_inferences: 20,
            ..Gates::default()
        };
        assert!(gates.watches_telemetry());
        assert!(!Gates::default().watches_telemetry());
        assert_eq!(gates.judge(95, 5, Some(1_000.0)), None, "5 % is the limit");
        let why = gates.judge(90, 10, Some(1_000.0)).unwrap();
        assert!(
            why.contains("10.0 % > 5 %") && why.contains("10 of 100"),
            "{why}"
        );
        assert_eq!(
            gates.judge(5, 10, None),
            None,
            "too few inferences to judge"
        );
        let why = gates.judge(100, 0, Some(25_000.0)).unwrap();
        assert!(why.contains("25.00 ms > 20 ms"), "{why}");
        assert_eq!(gates.judge(100, 0, None), None);
        assert_eq!(Gates::default().judge(0, 1_000, Some(1e9)), None);
    }

    #[test]
    fn degraded_telemetry_fails_even_a_confirmed_device() {
        let gates = Gates {
            failure_pct: 50.0,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(10), four_waves(), gates);
        let canary = updated(&r.start(0).unwrap());
        let wave1 = updated(&r.report(&canary[0], Report::Healthy, 1));
        assert_eq!(wave1.len(), 2);
        // The canary's error rate turns bad after it confirmed: 1 of 1
        // settled devices failed, over the threshold.
        r.report(&canary[0], Report::Degraded("error rate".into()), 2);
        assert!(matches!(r.devices[&canary[0]], DeviceState::Failed { .. }));
        assert!(matches!(&r.phase, Phase::Paused { reason, .. } if reason.contains("1 of 1")));
        // Degraded means nothing for a device not on the new version.
        let later = &r.plan()[2][0];
        r.report(later, Report::Degraded("x".into()), 3);
        assert_eq!(r.devices[later], DeviceState::Waiting);
    }

    #[test]
    fn devices_joining_go_into_the_last_wave_under_the_same_gates() {
        let mut r = Rollout::new("r", devices(4), vec![WaveSize::Count(1)], Gates::default());
        assert_eq!(r.ends, vec![1, 4]);
        let canary = updated(&r.start(0).unwrap());
        // Joins while wave 0 runs: waits for the last wave.
        assert_eq!(r.join("late-1", true, 1), Some(Vec::new()));
        assert_eq!(r.join("late-1", true, 1), None, "already in");
        // Enrolled but never connected: offline until it reports.
        assert_eq!(r.join("late-2", false, 1), Some(Vec::new()));
        assert_eq!(r.plan()[1].len(), 5);
        let wave1 = updated(&r.report(&canary[0], Report::Healthy, 2));
        assert_eq!(wave1.len(), 4, "3 original devices and late-1: {wave1:?}");
        assert!(wave1.contains(&"late-1".to_string()));
        let back = updated(&r.report("late-2", Report::Online, 3));
        assert_eq!(back, vec!["late-2".to_string()]);
        // In the last wave, a joining device is asked at once.
        assert_eq!(
            r.join("late-3", true, 4).map(|c| updated(&c)),
            Some(vec!["late-3".to_string()])
        );
        let mut t = 5;
        for d in wave1
            .iter()
            .chain(&back)
            .chain(["late-3".to_string()].iter())
        {
            r.report(d, Report::Healthy, t);
            t += 1;
        }
        assert_eq!(r.phase, Phase::Completed);
        assert_eq!(
            r.join("late-4", true, t),
            None,
            "an ended rollout takes nobody"
        );
    }

    #[test]
    fn overrides_exclude_retry_and_force_one_device() {
        let gates = Gates {
            failure_pct: 60.0,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(10), four_waves(), gates);
        let canary = updated(&r.start(0).unwrap())[0].clone();
        // A device far ahead of its wave can be forced now.
        let last = r.plan()[2][3].clone();
        assert_eq!(
            r.override_device(&last, Override::Force, 1).unwrap(),
            vec![Command::Update(last.clone())]
        );
        assert!(
            r.override_device(&last, Override::Force, 1).is_err(),
            "already updating"
        );
        // Excluding a device that moved sends it back; it no longer holds
        // the gate and is not a failure.
        assert_eq!(
            r.override_device(&last, Override::Exclude, 2).unwrap(),
            vec![Command::Revert(last.clone())]
        );
        let c = r.counts(None);
        assert_eq!((c.failed, c.excluded), (0, 1));
        // The canary fails; retrying puts it back in line and it is asked again.
        r.report(&canary, Report::Unhealthy("test vector".into()), 3);
        assert!(matches!(r.phase, Phase::Paused { .. }), "{:?}", r.phase);
        assert!(r
            .override_device(&canary, Override::Retry, 4)
            .unwrap()
            .is_empty());
        assert_eq!(r.devices[&canary], DeviceState::Waiting);
        assert_eq!(updated(&r.resume(5).unwrap()), vec![canary.clone()]);
        assert!(
            r.override_device(&canary, Override::Retry, 6).is_err(),
            "updating: nothing to retry"
        );
        assert!(r.override_device("nobody", Override::Exclude, 6).is_err());
        // The excluded device is skipped when its wave comes.
        let mut asked = updated(&r.report(&canary, Report::Healthy, 7));
        let mut t = 8;
        let mut all = Vec::new();
        while let Some(d) = asked.pop() {
            all.push(d.clone());
            asked.extend(updated(&r.report(&d, Report::Healthy, t)));
            t += 1;
        }
        assert_eq!(r.phase, Phase::Completed);
        assert!(!all.contains(&last));
        assert_eq!(r.summary()["excluded"], 1);
        assert!(
            r.override_device(&canary, Override::Exclude, t).is_err(),
            "ended"
        );
    }

    #[test]
    fn outcomes_count_after_a_dropped_connection_and_lost_confirmations() {
        let gates = Gates {
            device_timeout_secs: 10,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(3), vec![WaveSize::Percent(100.0)], gates);
        let asked = updated(&r.start(0).unwrap());
        // Dropped while updating, its confirmation arrives after it is back.
        r.report(&asked[0], Report::Offline, 1);
        r.report(&asked[0], Report::Online, 2);
        assert_eq!(
            r.devices[&asked[0]],
            DeviceState::Updating {
                since: 2,
                attempt: 1
            }
        );
        r.report(&asked[1], Report::Offline, 2);
        r.report(&asked[1], Report::Healthy, 3);
        assert!(matches!(
            r.devices[&asked[1]],
            DeviceState::Confirmed { .. }
        ));
        // A status alone settles nothing on the first attempt ...
        r.report(&asked[0], Report::Running, 3);
        assert!(matches!(r.devices[&asked[0]], DeviceState::Updating { .. }));
        // ... but after a timeout it shows the confirmation was lost.
        r.tick(12);
        assert!(matches!(r.devices[&asked[0]], DeviceState::Backoff { .. }));
        r.report(&asked[0], Report::Running, 13);
        assert!(matches!(
            r.devices[&asked[0]],
            DeviceState::Confirmed { .. }
        ));
        r.report(&asked[2], Report::Healthy, 14);
        assert_eq!(r.phase, Phase::Completed);
    }

    #[test]
    fn a_wave_of_only_offline_devices_passes_after_the_grace() {
        let gates = Gates {
            offline_grace_secs: 10,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(3), vec![WaveSize::Count(1)], gates);
        let canary = updated(&r.start(0).unwrap())[0].clone();
        r.report(&canary, Report::Offline, 1);
        assert!(updated(&r.tick(5)).is_empty());
        assert_eq!(
            updated(&r.tick(11)).len(),
            2,
            "the next wave after the grace"
        );
    }

    #[test]
    fn the_index_is_rebuilt_after_loading() {
        let mut r = Rollout::new("r", devices(30), four_waves(), Gates::default());
        let canary = updated(&r.start(0).unwrap());
        let wave1 = updated(&r.report(&canary[0], Report::Healthy, 1));
        let json = serde_json::to_string(&r).unwrap();
        let mut back: Rollout = serde_json::from_str(&json).unwrap();
        assert_eq!(back.summary(), r.summary());
        for d in &wave1 {
            assert_eq!(
                back.report(d, Report::Healthy, 2),
                r.report(d, Report::Healthy, 2)
            );
        }
        assert_eq!(back, r);
        assert_eq!(back.counts(None), r.counts(None));
    }

    /// Random reports, overrides, joins, ticks and operator actions: the
    /// index (per-wave counts, per-state sets) always agrees with a count
    /// made from scratch, and a rollout rebuilt from its stored state
    /// answers the same.
    #[test]
    fn property_the_index_always_matches_the_states() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..100 {
            let n = 1 + (next() % 60) as usize;
            let gates = Gates {
                failure_pct: 30.0 + (next() % 70) as f64,
                success_pct: 0.0,
                max_in_flight: 1 + (next() % 10) as u32,
                device_timeout_secs: 5,
                retries: 1,
                offline_grace_secs: 20,
                ..Gates::default()
            };
            let mut r = Rollout::new(&format!("i{case}"), devices(n), four_waves(), gates);
            r.start(0).unwrap();
            let mut joined = 0;
            for t in 1..200u64 {
                let d = if next() % 10 == 0 && joined < 5 {
                    joined += 1;
                    let d = format!("late-{joined}");
                    r.join(&d, next() % 2 == 0, t);
                    d
                } else {
                    r.order[(next() % r.order.len() as u64) as usize].clone()
                };
                match next() % 12 {
                    0..=3 => {
                        r.report(&d, Report::Healthy, t);
                    }
                    4 => {
                        r.report(&d, Report::Unhealthy("x".into()), t);
                    }
                    5 => {
                        r.report(&d, Report::Degraded("y".into()), t);
                    }
                    6 => {
                        r.report(&d, Report::Offline, t);
                    }
                    7 => {
                        r.report(&d, Report::Online, t);
                    }
                    8 => {
                        let action = [Override::Exclude, Override::Retry, Override::Force]
                            [(next() % 3) as usize];
                        let _ = r.override_device(&d, action, t);
                    }
                    9 => {
                        let _ = r.resume(t).or_else(|_| r.approve(t));
                    }
                    10 => {
                        r.report(&d, Report::Running, t);
                    }
                    _ => {
                        r.tick(t);
                    }
                }
                let mut scratch: BTreeMap<&'static str, usize> = BTreeMap::new();
                for state in r.devices.values() {
                    *scratch.entry(KIND_NAMES[state.kind()]).or_default() += 1;
                }
                assert_eq!(r.summary(), scratch, "case {case} at {t}");
                let ends = r.ends.clone();
                assert_eq!(*ends.last().unwrap(), r.order.len());
                for (w, wave) in r.wave_summary().iter().enumerate() {
                    let start = if w == 0 { 0 } else { ends[w - 1] };
                    assert_eq!(wave["size"], ends[w] - start, "case {case}");
                }
                let in_flight = r.index.members[UPDATING].len();
                let counted = r
                    .devices
                    .values()
                    .filter(|s| matches!(s, DeviceState::Updating { .. }))
                    .count();
                assert_eq!(in_flight, counted);
            }
            let mut back: Rollout =
                serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(back.counts(None), r.counts(None), "case {case}");
            assert_eq!(back.wave_summary(), r.wave_summary(), "case {case}");
        }
    }
}
