//! Which agent executable runs, as one small JSON file in the data dir
//! (`agent/state.json`), and the pure rules that change it: a switch to
//! a new release, each start of a release still on trial, its report and
//! confirmation, and the rollback a crash loop or a missed deadline
//! causes. Nothing here does I/O but [`AgentState::load`] and
//! [`AgentState::save`].
//!
//! Two processes write the file, never at the same time: the supervisor
//! (counting starts, rolling back) only while no agent child runs, the
//! agent child (switching, reporting, confirming) only while it runs.

use std::path::{Path, PathBuf};

use edgefleet_shared::ReleaseVersion;
use serde::{Deserialize, Serialize};

/// One of the two slots a release is installed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "a" => Some(Self::A),
            "b" => Some(Self::B),
            _ => None,
        }
    }
}

/// A release installed in a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub slot: Slot,
    pub release: String,
    pub sha256: String,
}

/// A release on trial: switched to, not yet confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// Unix seconds of the switch.
    pub switched_at: u64,
    /// Starts of it so far (the supervisor counts them).
    pub starts: u32,
    /// Unix seconds when it first reached the fleet server (connected
    /// and receipted): its soak runs from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<u64>,
}

/// A rollback the agent has not reported yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackNote {
    /// The release given up.
    pub from: String,
    /// The release running again (`None`: the packaged executable).
    pub to: Option<String>,
    pub reason: String,
    pub at: u64,
}

/// A release that failed on this device: never installed again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub release: String,
    pub sha256: String,
    pub reason: String,
}

/// At most this many refused releases are remembered (oldest dropped).
const MAX_REFUSED: usize = 16;

/// The whole state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// The release that runs; `None`: the packaged (factory) executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<Installed>,
    /// What ran before the last switch (`None`: the packaged executable);
    /// what a rollback goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Installed>,
    /// Set from a switch until the new release is confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<Trial>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackNote>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
}

/// How long a release on trial has, and how often it may fail to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrialLimits {
    /// Starts without a confirmation after which it is given up.
    pub max_starts: u32,
    /// Seconds from the switch to its first report.
    pub report_deadline_secs: u64,
    /// Seconds it must then run before it is confirmed.
    pub soak_secs: u64,
}

/// What the supervisor starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The slot whose executable runs; `None`: the packaged one.
    pub slot: Option<Slot>,
    /// Why this start rolled back first, if it did.
    pub rolled_back: Option<String>,
}

impl AgentState {
    /// The file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("agent").join("state.json")
    }

    /// The directory of `slot` in `data_dir`.
    pub fn slot_dir(data_dir: &Path, slot: Slot) -> PathBuf {
        data_dir.join("agent").join("slots").join(slot.as_str())
    }

    /// The executable of `slot` in `data_dir`.
    pub fn executable(data_dir: &Path, slot: Slot) -> PathBuf {
        Self::slot_dir(data_dir, slot).join("edgefleet-agent")
    }

    /// Reads the state; a missing file is the factory state. A file that
    /// cannot be parsed is an error (the caller decides: the supervisor
    /// falls back to the packaged executable).
    pub fn load(data_dir: &Path) -> std::io::Result<Self> {
        match std::fs::read(Self::path(data_dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the state atomically and durably.
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = Self::path(data_dir);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec_pretty(self).expect("the agent state is plain data");
        crate::durable::write_atomic(&path, &bytes)
    }

    /// Drops a confirmed release older than the packaged executable
    /// (`factory`, its package version): a package installed over the
    /// agent (`fleetctl devices flash`) is newer than what the slots hold,
    /// and releases never go backwards. Returns whether it did.
    pub fn yield_to_newer_package(&mut self, factory: &str) -> bool {
        let (Some(active), None) = (&self.active, &self.trial) else {
            return false;
        };
        let newer = match (
            factory.parse::<ReleaseVersion>(),
            active.release.parse::<ReleaseVersion>(),
        ) {
            (Ok(factory), Ok(release)) => factory > release,
            _ => false,
        };
        if newer {
            self.active = None;
            self.previous = None;
        }
        newer
    }

    /// The release running (`None`: the packaged executable).
    pub fn release(&self) -> Option<&str> {
        self.active.as_ref().map(|i| i.release.as_str())
    }

    /// The slot a new release is installed into: never the running one.
    pub fn free_slot(&self) -> Slot {
        self.active.as_ref().map_or(Slot::A, |i| i.slot.other())
    }

    /// Whether `release` with `sha256` failed here before.
    pub fn refused(&self, release: &str, sha256: &str) -> Option<&Refused> {
        self.refused
            .iter()
            .find(|r| r.release == release && r.sha256 == sha256)
    }

    /// Remembers that a release failed here.
    pub fn refuse(&mut self, release: &str, sha256: &str, reason: &str) {
        if self.refused(release, sha256).is_some() {
            return;
        }
        self.refused.push(Refused {
            release: release.into(),
            sha256: sha256.into(),
            reason: reason.into(),
        });
        if self.refused.len() > MAX_REFUSED {
            self.refused.remove(0);
        }
    }

    /// Switches to `new` (installed in the free slot) at `now`: it goes on
    /// trial, and what ran becomes the rollback target.
    pub fn switch(&mut self, new: Installed, now: u64) {
        self.previous = self.active.take();
        self.active = Some(new);
        self.trial = Some(Trial {
            switched_at: now,
            starts: 0,
            reported_at: None,
        });
    }

    /// Gives up the release on trial: the previous one runs again, the
    /// one given up is never installed again, and the rollback waits to be
    /// reported. Returns the note.
    pub fn roll_back(&mut self, reason: String, now: u64) -> Option<RollbackNote> {
        self.trial.take()?;
        let from = self.active.take()?;
        self.refuse(&from.release, &from.sha256, &reason);
        self.active = self.previous.take();
        let note = RollbackNote {
            from: from.release,
            to: self.active.as_ref().map(|i| i.release.clone()),
            reason,
            at: now,
        };
        self.rollback = Some(note.clone());
        Some(note)
    }

    /// Why the release on trial must be given up at `now`, if it must.
    pub fn trial_verdict(&self, limits: &TrialLimits, now: u64) -> Option<String> {
        let trial = self.trial.as_ref()?;
        if trial.reported_at.is_none()
            && now
                >= trial
                    .switched_at
                    .saturating_add(limits.report_deadline_secs)
        {
            return Some(format!(
                "release did not reach the fleet server within {} s of the switch",
                limits.report_deadline_secs
            ));
        }
        if trial.starts >= limits.max_starts {
            return Some(format!(
                "crash loop: started {} times without being confirmed",
                trial.starts
            ));
        }
        None
    }

    /// What the supervisor starts at `now`: the release on trial unless it
    /// must be given up (then the previous one), counting the start.
    pub fn launch(&mut self, limits: &TrialLimits, now: u64) -> Launch {
        let rolled_back = self
            .trial_verdict(limits, now)
            .and_then(|reason| self.roll_back(reason.clone(), now).map(|_| reason));
        if let Some(trial) = &mut self.trial {
            trial.starts += 1;
        }
        Launch {
            slot: self.active.as_ref().map(|i| i.slot),
            rolled_back,
        }
    }

    /// The release on trial reached the fleet server at `now`.
    pub fn reported(&mut self, now: u64) -> bool {
        match &mut self.trial {
            Some(trial) if trial.reported_at.is_none() => {
                trial.reported_at = Some(now);
                true
            }
            _ => false,
        }
    }

    /// When the release on trial is confirmed, if it has reported.
    pub fn confirm_at(&self, limits: &TrialLimits) -> Option<u64> {
        let reported = self.trial.as_ref()?.reported_at?;
        Some(reported.saturating_add(limits.soak_secs))
    }

    /// Ends the trial: the release is confirmed.
    pub fn confirm(&mut self) -> bool {
        self.trial.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TrialLimits = TrialLimits {
        max_starts: 3,
        report_deadline_secs: 100,
        soak_secs: 30,
    };

    fn release(slot: Slot, v: &str) -> Installed {
        Installed {
            slot,
            release: v.into(),
            sha256: format!("{v}-hash"),
        }
    }

    #[test]
    fn the_factory_executable_runs_until_a_switch_and_slots_alternate() {
        let mut s = AgentState::default();
        assert_eq!(s.launch(&LIMITS, 0).slot, None);
        assert_eq!(s.free_slot(), Slot::A);
        s.switch(release(Slot::A, "1.0.0"), 10);
        assert_eq!(s.launch(&LIMITS, 11).slot, Some(Slot::A));
        assert!(s.reported(12));
        assert_eq!(s.confirm_at(&LIMITS), Some(42));
        assert!(s.confirm());
        assert_eq!(s.free_slot(), Slot::B);
        // Confirmed releases start as often as they like.
        for t in 0..10 {
            assert_eq!(s.launch(&LIMITS, 100 + t).slot, Some(Slot::A));
        }
        s.switch(release(Slot::B, "1.1.0"), 200);
        assert_eq!(s.previous.as_ref().unwrap().release, "1.0.0");
        assert_eq!(s.launch(&LIMITS, 201).slot, Some(Slot::B));
    }

    #[test]
    fn a_crash_loop_goes_back_to_the_previous_release_and_refuses_the_new_one() {
        let mut s = AgentState::default();
        s.switch(release(Slot::A, "1.0.0"), 0);
        s.confirm();
        s.switch(release(Slot::B, "1.1.0"), 10);
        for _ in 0..3 {
            let launch = s.launch(&LIMITS, 11);
            assert_eq!(
                launch,
                Launch {
                    slot: Some(Slot::B),
                    rolled_back: None
                }
            );
        }
        let launch = s.launch(&LIMITS, 12);
        assert_eq!(launch.slot, Some(Slot::A));
        assert!(launch
            .rolled_back
            .unwrap()
            .contains("crash loop: started 3 times"));
        let note = s.rollback.clone().unwrap();
        assert_eq!(
            (note.from.as_str(), note.to.as_deref()),
            ("1.1.0", Some("1.0.0"))
        );
        assert!(s.refused("1.1.0", "1.1.0-hash").is_some());
        assert!(s.trial.is_none());
        assert_eq!(s.free_slot(), Slot::B);
        // A start after the rollback counts nothing.
        assert_eq!(s.launch(&LIMITS, 13).slot, Some(Slot::A));
    }

    #[test]
    fn a_release_that_never_reports_is_given_up_at_the_deadline_even_while_soaking_ones_are_not() {
        let mut s = AgentState::default();
        s.switch(release(Slot::A, "2.0.0"), 1000);
        s.launch(&LIMITS, 1000);
        assert_eq!(s.trial_verdict(&LIMITS, 1099), None);
        let reason = s.trial_verdict(&LIMITS, 1100).unwrap();
        assert!(reason.contains("within 100 s"), "{reason}");
        // Back to the packaged executable.
        let launch = s.launch(&LIMITS, 1100);
        assert_eq!(launch.slot, None);
        assert_eq!(s.rollback.as_ref().unwrap().to, None);

        let mut s = AgentState::default();
        s.switch(release(Slot::A, "2.0.0"), 1000);
        s.reported(1050);
        assert_eq!(
            s.trial_verdict(&LIMITS, 5000),
            None,
            "reported: the deadline is met"
        );
    }

    #[test]
    fn a_newer_package_takes_over_from_an_older_confirmed_release() {
        let mut s = AgentState::default();
        s.switch(release(Slot::A, "1.2.0"), 0);
        assert!(
            !s.yield_to_newer_package("2.0.0"),
            "a release on trial is left to its trial"
        );
        s.confirm();
        assert!(!s.yield_to_newer_package("1.2.0"));
        assert!(!s.yield_to_newer_package("1.1.9"));
        assert!(s.yield_to_newer_package("1.3.0"));
        assert_eq!(s.launch(&LIMITS, 1).slot, None);
        assert_eq!(s.free_slot(), Slot::A);
    }

    #[test]
    fn state_round_trips_through_its_file_and_a_missing_file_is_the_factory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), AgentState::default());
        let mut s = AgentState::default();
        s.switch(release(Slot::B, "3.0.0"), 5);
        s.refuse("0.9.0", "x", "self-test failed");
        s.save(dir.path()).unwrap();
        assert_eq!(AgentState::load(dir.path()).unwrap(), s);
        std::fs::write(AgentState::path(dir.path()), b"{not json").unwrap();
        assert_eq!(
            AgentState::load(dir.path()).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
    }
}
