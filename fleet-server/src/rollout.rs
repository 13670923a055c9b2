//! The staged-rollout planner: a pure state machine (issue 7). It owns no
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

use std::collections::BTreeMap;

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
        }
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
    /// Sent back to its previous version (by abort or an override).
    Reverted,
    /// Offline when its turn came, since `since`.
    Offline {
        since: u64,
    },
}

impl DeviceState {
    fn settled(&self) -> bool {
        matches!(
            self,
            Self::Confirmed { .. } | Self::Failed { .. } | Self::Reverted
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
    Online,
    Offline,
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
    /// Devices in canary order.
    pub order: Vec<String>,
    pub devices: BTreeMap<String, DeviceState>,
    pub phase: Phase,
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

impl Rollout {
    pub fn new(id: &str, mut devices: Vec<String>, waves: Vec<WaveSize>, gates: Gates) -> Self {
        devices.sort_by_key(|d| (rank(id, d), d.clone()));
        devices.dedup();
        Self {
            id: id.to_string(),
            waves,
            gates,
            devices: devices
                .iter()
                .map(|d| (d.clone(), DeviceState::Waiting))
                .collect(),
            order: devices,
            phase: Phase::Created,
        }
    }

    /// Which wave each device is in (a dry run shows this).
    pub fn plan(&self) -> Vec<Vec<String>> {
        let mut start = 0;
        wave_ends(&self.waves, self.order.len())
            .into_iter()
            .map(|end| {
                let wave = self.order[start..end].to_vec();
                start = end;
                wave
            })
            .collect()
    }

    fn wave_of(&self, device: &str) -> Option<usize> {
        let position = self.order.iter().position(|d| d == device)?;
        wave_ends(&self.waves, self.order.len())
            .iter()
            .position(|&end| position < end)
    }

    /// Counts over waves `0..=wave` (or all): (confirmed, failed, settled, offline).
    fn counts(&self, upto: Option<usize>) -> (usize, usize, usize, usize) {
        let ends = wave_ends(&self.waves, self.order.len());
        let limit = upto.map_or(self.order.len(), |w| ends[w]);
        let mut c = (0, 0, 0, 0);
        for d in &self.order[..limit] {
            match &self.devices[d] {
                DeviceState::Confirmed { .. } => c.0 += 1,
                DeviceState::Failed { .. } | DeviceState::Reverted => c.1 += 1,
                DeviceState::Offline { .. } => c.3 += 1,
                _ => {}
            }
            if self.devices[d].settled() {
                c.2 += 1;
            }
        }
        c
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

    /// Stops the rollout and sends every device that moved (or is moving)
    /// back to its previous version.
    pub fn abort(&mut self, reason: &str) -> Result<Vec<Command>, String> {
        if matches!(self.phase, Phase::Aborted { .. } | Phase::Completed) {
            return Err(format!("rollout {} has ended", self.id));
        }
        self.phase = Phase::Aborted {
            reason: reason.to_string(),
        };
        let mut commands = Vec::new();
        for d in &self.order {
            let state = self
                .devices
                .get_mut(d)
                .expect("every ordered device has a state");
            if matches!(
                state,
                DeviceState::Updating { .. }
                    | DeviceState::Backoff { .. }
                    | DeviceState::Confirmed { .. }
                    | DeviceState::Failed { .. }
            ) {
                *state = DeviceState::Reverted;
                commands.push(Command::Revert(d.clone()));
            }
        }
        Ok(commands)
    }

    /// A device's report.
    pub fn report(&mut self, device: &str, report: Report, now: u64) -> Vec<Command> {
        let Some(state) = self.devices.get_mut(device) else {
            return Vec::new();
        };
        match report {
            Report::Healthy => {
                if matches!(
                    state,
                    DeviceState::Updating { .. } | DeviceState::Backoff { .. }
                ) {
                    *state = DeviceState::Confirmed { at: now };
                }
            }
            Report::Unhealthy(reason) => {
                if matches!(
                    state,
                    DeviceState::Updating { .. } | DeviceState::Backoff { .. }
                ) {
                    *state = DeviceState::Failed { reason };
                }
            }
            Report::Offline => {
                if matches!(state, DeviceState::Waiting | DeviceState::Updating { .. }) {
                    *state = DeviceState::Offline { since: now };
                }
            }
            Report::Online => {
                if matches!(state, DeviceState::Offline { .. }) {
                    // Back under the same gates: it is asked again when a
                    // slot is free.
                    *state = DeviceState::Waiting;
                }
            }
        }
        self.advance(now)
    }

    /// The clock: timeouts, backoffs, soak and gates.
    pub fn tick(&mut self, now: u64) -> Vec<Command> {
        let timeout = self.gates.device_timeout_secs;
        let retries = self.gates.retries;
        for state in self.devices.values_mut() {
            if let DeviceState::Updating { since, attempt } = *state {
                if now.saturating_sub(since) >= timeout {
                    *state = if attempt > retries {
                        DeviceState::Failed {
                            reason: format!("no report within {timeout} s, {attempt} attempts"),
                        }
                    } else {
                        DeviceState::Backoff {
                            until: now + timeout.min(60) * (1 << attempt.min(6)),
                            attempt,
                        }
                    };
                }
            }
        }
        self.advance(now)
    }

    /// Applies the gates and hands out update slots.
    fn advance(&mut self, now: u64) -> Vec<Command> {
        let Phase::Running { wave, wave_started } = self.phase.clone() else {
            return Vec::new();
        };
        // Failure threshold over everything asked so far.
        let (_, failed, settled, _) = self.counts(None);
        if settled > 0 && failed as f64 * 100.0 / settled as f64 >= self.gates.failure_pct {
            let reason = format!(
                "{failed} of {settled} settled devices failed ({:.0} % >= {} %)",
                failed as f64 * 100.0 / settled as f64,
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
        let ends = wave_ends(&self.waves, self.order.len());
        let mut commands = Vec::new();
        // Hand out slots inside the current wave.
        let in_flight = self
            .devices
            .values()
            .filter(|s| matches!(s, DeviceState::Updating { .. }))
            .count();
        let mut free = (self.gates.max_in_flight as usize).saturating_sub(in_flight);
        for d in &self.order[..ends[wave]] {
            if free == 0 {
                break;
            }
            let state = self.devices.get_mut(d).expect("state");
            let attempt = match *state {
                DeviceState::Waiting => 1,
                DeviceState::Backoff { until, attempt } if now >= until => attempt + 1,
                _ => continue,
            };
            *state = DeviceState::Updating {
                since: now,
                attempt,
            };
            commands.push(Command::Update(d.clone()));
            free -= 1;
        }
        // The wave's gate.
        let (confirmed, _, settled, offline) = self.counts(Some(wave));
        let scope = ends[wave];
        let offline_waited = self.order[..scope].iter().all(|d| match self.devices[d] {
            DeviceState::Offline { since } => {
                now.saturating_sub(since) >= self.gates.offline_grace_secs
            }
            _ => true,
        });
        let all_settled = settled + offline == scope && offline_waited;
        let healthy_pct = if settled == 0 {
            0.0
        } else {
            confirmed as f64 * 100.0 / settled as f64
        };
        let soaked = now.saturating_sub(wave_started) >= self.gates.soak_secs;
        if all_settled
            && soaked
            && confirmed >= (self.gates.min_confirmed as usize).min(scope - offline)
            && healthy_pct >= self.gates.success_pct
        {
            if wave + 1 == ends.len() {
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

    /// Counts per device state, for status.
    pub fn summary(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for s in self.devices.values() {
            let key = match s {
                DeviceState::Waiting => "waiting",
                DeviceState::Updating { .. } => "updating",
                DeviceState::Backoff { .. } => "backoff",
                DeviceState::Confirmed { .. } => "confirmed",
                DeviceState::Failed { .. } => "failed",
                DeviceState::Reverted => "reverted",
                DeviceState::Offline { .. } => "offline",
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }

    /// The wave a device belongs to, for status.
    pub fn device_wave(&self, device: &str) -> Option<usize> {
        self.wave_of(device)
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
                let (_, failed, settled, _) = r.counts(None);
                if crossed_in.is_none()
                    && settled > 0
                    && failed as f64 * 100.0 / settled as f64 >= threshold
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
}
