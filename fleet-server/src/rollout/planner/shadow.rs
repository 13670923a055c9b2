//! The shadow gate: before a wave's devices move to the new version, each
//! runs it in shadow beside the version it serves, on a sample of its live
//! requests, and reports how often the two agree. The wave moves only
//! when the agreement over at least `min_shadow_requests` compared
//! requests (summed over the wave's devices) reaches
//! `min_shadow_agreement`; otherwise the rollout takes its failure action
//! and says what it measured. A wave whose devices see too little traffic
//! within `device_timeout_secs` stops the same way, rather than waiting
//! for ever.

use serde::{Deserialize, Serialize};

use super::{Command, DeviceState, FailureAction, Phase, Rollout};

/// One wave's shadow run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaveShadow {
    /// When the wave's devices were asked to run the candidate.
    pub started: Option<u64>,
    /// The devices asked (each is told to stop when the wave ends in
    /// anything but a move).
    pub devices: Vec<String>,
    pub compared: u64,
    pub agreed: u64,
    /// Requests the candidate failed on: they count as disagreeing.
    pub errors: u64,
    pub passed: bool,
}

impl WaveShadow {
    /// Compared and failed requests so far.
    pub fn total(&self) -> u64 {
        self.compared + self.errors
    }

    pub fn agreement(&self) -> Option<f64> {
        let total = self.total();
        (total > 0).then(|| self.agreed as f64 / total as f64)
    }
}

/// What the shadow gate decided about the current wave.
pub(super) enum Hold {
    /// The gate is off or passed: the wave moves as usual.
    Move(Vec<Command>),
    /// Devices still run the candidate in shadow.
    Wait(Vec<Command>),
}

impl Rollout {
    /// The wave's shadow state, made on first use.
    fn wave_shadow(&mut self, wave: usize) -> &mut WaveShadow {
        if self.shadow.len() <= wave {
            self.shadow.resize(wave + 1, WaveShadow::default());
        }
        &mut self.shadow[wave]
    }

    /// The gate, applied from `advance` for the running wave.
    pub(super) fn shadow_gate(&mut self, wave: usize, now: u64) -> Hold {
        let Some(min_agreement) = self.gates.min_shadow_agreement else {
            return Hold::Move(Vec::new());
        };
        let first = if wave == 0 { 0 } else { self.ends[wave - 1] };
        let scope = self.ends[wave];
        let mut commands = Vec::new();
        if self.wave_shadow(wave).passed {
            return Hold::Move(commands);
        }
        if self.wave_shadow(wave).started.is_none() {
            let asked: Vec<String> = (first..scope)
                .filter(|&i| matches!(self.state_at(i), DeviceState::Waiting))
                .map(|i| self.order[i].clone())
                .collect();
            commands.extend(asked.iter().cloned().map(Command::Shadow));
            let s = self.wave_shadow(wave);
            s.started = Some(now);
            s.devices = asked;
        }
        let timeout = self.gates.device_timeout_secs;
        let min_requests = self.gates.min_shadow_requests.max(1);
        let s = self.wave_shadow(wave).clone();
        let total = s.total();
        let reason = if total >= min_requests {
            let agreement = s.agreement().unwrap_or(0.0);
            if agreement >= min_agreement {
                self.wave_shadow(wave).passed = true;
                return Hold::Move(commands);
            }
            format!(
                "shadow agreement {agreement:.3} < {min_agreement} over {total} requests on wave {} ({} agreed, {} candidate errors)",
                wave + 1,
                s.agreed,
                s.errors
            )
        } else if s.devices.is_empty() || now.saturating_sub(s.started.unwrap_or(now)) >= timeout {
            format!(
                "shadow gate: {total} of {min_requests} requests compared on wave {} within {timeout} s (too little traffic to judge the candidate)",
                wave + 1
            )
        } else {
            return Hold::Wait(commands);
        };
        match self.gates.failure_action {
            FailureAction::Pause => {
                self.phase = Phase::Paused { wave, reason };
                Hold::Wait(commands)
            }
            FailureAction::Abort => {
                commands.extend(self.abort(&reason).unwrap_or_default());
                Hold::Wait(commands)
            }
        }
    }

    /// A device's shadow figures for one telemetry interval: counted when
    /// it is one the running wave asked.
    pub fn shadow_report(
        &mut self,
        device: &str,
        compared: u64,
        agreed: u64,
        errors: u64,
        now: u64,
    ) -> Vec<Command> {
        self.build_index();
        let Phase::Running { wave, .. } = self.phase else {
            return Vec::new();
        };
        let s = self.wave_shadow(wave);
        if s.passed || !s.devices.iter().any(|d| d == device) {
            return Vec::new();
        }
        s.compared += compared;
        s.agreed += agreed.min(compared);
        s.errors += errors;
        self.advance(now)
    }

    /// A resumed wave judges its candidate again, on fresh requests.
    pub(super) fn restart_shadow(&mut self, wave: usize, now: u64) {
        if let Some(s) = self.shadow.get_mut(wave) {
            if s.started.is_some() && !s.passed {
                s.started = Some(now);
                s.compared = 0;
                s.agreed = 0;
                s.errors = 0;
            }
        }
    }

    /// Devices told to run the candidate that never moved: an abort stops
    /// their shadow.
    pub(super) fn end_shadows(&self) -> Vec<Command> {
        let mut out = Vec::new();
        for s in &self.shadow {
            for d in &s.devices {
                let moved = self.devices.get(d).is_some_and(|st| {
                    !matches!(
                        st,
                        DeviceState::Waiting | DeviceState::Offline { .. } | DeviceState::Excluded
                    )
                });
                if !moved {
                    out.push(Command::EndShadow(d.clone()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Gates, Report, WaveSize};
    use super::*;

    fn rollout(action: FailureAction) -> Rollout {
        let gates = Gates {
            min_shadow_agreement: Some(0.95),
            min_shadow_requests: 100,
            failure_action: action,
            device_timeout_secs: 300,
            ..Gates::default()
        };
        let devices = (0..10).map(|i| format!("dev-{i}")).collect();
        Rollout::new(
            "r",
            devices,
            vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
            gates,
        )
    }

    fn named(commands: &[Command], f: fn(&Command) -> Option<&String>) -> Vec<String> {
        let mut out: Vec<String> = commands.iter().filter_map(f).cloned().collect();
        out.sort();
        out
    }

    fn shadowed(c: &Command) -> Option<&String> {
        match c {
            Command::Shadow(d) => Some(d),
            _ => None,
        }
    }

    fn updated(c: &Command) -> Option<&String> {
        match c {
            Command::Update(d) => Some(d),
            _ => None,
        }
    }

    #[test]
    fn a_wave_moves_only_after_its_shadow_agrees() {
        let mut r = rollout(FailureAction::Pause);
        let first = r.start(0).unwrap();
        let wave1: Vec<String> = {
            let mut w = r.order[..2].to_vec();
            w.sort();
            w
        };
        assert_eq!(named(&first, shadowed), wave1);
        assert!(
            named(&first, updated).is_empty(),
            "nobody moves before the gate"
        );
        // Not enough requests yet, and reports from outside the wave do not count.
        assert!(r
            .shadow_report(&r.order[5].clone(), 500, 0, 0, 1)
            .is_empty());
        assert!(r.shadow_report(&wave1[0], 60, 59, 0, 2).is_empty());
        let moved = r.shadow_report(&wave1[1], 60, 58, 1, 3);
        assert_eq!(named(&moved, updated), wave1);
        assert!(r.shadow[0].passed);
        assert_eq!(r.shadow[0].total(), 121);
        // Both confirm: the next wave shadows first too.
        r.report(&wave1[0], Report::Healthy, 4);
        let next = r.report(&wave1[1], Report::Healthy, 5);
        assert_eq!(named(&next, shadowed).len(), 8);
        assert!(named(&next, updated).is_empty());
    }

    #[test]
    fn low_agreement_pauses_and_names_what_was_measured() {
        let mut r = rollout(FailureAction::Pause);
        r.start(0).unwrap();
        let d = r.order[0].clone();
        let commands = r.shadow_report(&d, 150, 90, 10, 1);
        assert!(named(&commands, updated).is_empty());
        let Phase::Paused { reason, .. } = &r.phase else {
            panic!("not paused: {:?}", r.phase)
        };
        assert!(
            reason.contains("shadow agreement 0.562 < 0.95 over 160 requests"),
            "{reason}"
        );
        // Resumed, the candidate is judged afresh.
        r.resume(10).unwrap();
        assert_eq!(r.shadow[0].total(), 0);
        assert!(matches!(r.phase, Phase::Running { .. }));
    }

    #[test]
    fn an_abort_stops_every_shadow_and_nobody_moves() {
        let mut r = rollout(FailureAction::Abort);
        r.start(0).unwrap();
        let d = r.order[1].clone();
        let commands = r.shadow_report(&d, 200, 100, 0, 1);
        assert!(matches!(r.phase, Phase::Aborted { .. }));
        assert_eq!(named(&commands, updated), Vec::<String>::new());
        let mut ended: Vec<String> = commands
            .iter()
            .filter_map(|c| match c {
                Command::EndShadow(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        ended.sort();
        let mut wave1 = r.order[..2].to_vec();
        wave1.sort();
        assert_eq!(ended, wave1);
    }

    #[test]
    fn too_little_traffic_stops_the_wave_at_the_timeout() {
        let mut r = rollout(FailureAction::Pause);
        r.start(0).unwrap();
        let d = r.order[0].clone();
        r.shadow_report(&d, 10, 10, 0, 5);
        assert!(r.tick(299).is_empty());
        assert!(matches!(r.phase, Phase::Running { .. }));
        r.tick(300);
        let Phase::Paused { reason, .. } = &r.phase else {
            panic!("not paused")
        };
        assert!(reason.contains("10 of 100 requests"), "{reason}");
    }

    #[test]
    fn stored_rollouts_without_shadow_state_still_load() {
        let r = rollout(FailureAction::Pause);
        let mut json = serde_json::to_value(&r).unwrap();
        json.as_object_mut().unwrap().remove("shadow");
        let back: Rollout = serde_json::from_value(json).unwrap();
        assert!(back.shadow.is_empty());
    }
}
