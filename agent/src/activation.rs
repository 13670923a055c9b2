//! The life of one model version on this device, as a plain state machine
//! with no I/O: the update task (`update/task.rs`) feeds it what happened and acts on
//! the phase it returns, and everything here is unit-tested exhaustively.
//!
//! ```text
//! verified → downloading → downloaded → loaded → tested → active → soaking → confirmed
//!                 ↘             ↘          ↘        ↘        ↘         ↘
//!                                   failed (reason)                  rolled back (reason)
//! ```
//!
//! A failure before activation leaves the previous version serving (it was
//! never replaced). A breach while soaking puts the previous version back.
//! A restart part-way through starts the download again (the staging file
//! resumes), or goes on soaking if the version was already active.

use std::fmt;

use edgefleet_shared::SoakPolicy;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The desired state naming this version is verified and accepted.
    Verified,
    Downloading,
    /// The file is staged and its hash matches the signed one.
    Downloaded,
    /// Loaded in at least one runtime.
    Loaded,
    /// Passed its signed test vector (or cross-checked between runtimes).
    Tested,
    /// Serving; the previous version is kept.
    Active,
    /// Serving under watch.
    Soaking,
    /// Soaked without a breach (or no soak asked for): done.
    Confirmed,
    /// Never served; the previous version goes on serving.
    Failed(Failure),
    /// Served, breached its soak thresholds, and was replaced by the
    /// previous version.
    RolledBack(String),
}

/// Which step failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Download(String),
    Load(String),
    TestVector(String),
    Activate(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Download(r) => write!(f, "download failed: {r}"),
            Self::Load(r) => write!(f, "cannot load: {r}"),
            Self::TestVector(r) => write!(f, "test vector failed: {r}"),
            Self::Activate(r) => write!(f, "cannot activate: {r}"),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    DownloadStarted,
    DownloadDone,
    LoadDone,
    TestPassed,
    Activated,
    /// Soaking starts (with a soak policy) or is skipped (without one).
    SoakStarted {
        policy: bool,
    },
    SoakPassed,
    Failed(Failure),
    Breached(String),
    /// The agent restarted while in this phase.
    Restarted,
}

/// An input that makes no sense in a phase: a bug in the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not possible while {phase:?}")]
pub struct Illegal {
    pub phase: Phase,
    pub input: Input,
}

impl Phase {
    /// Whether nothing more happens to this version.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Confirmed | Self::Failed(_) | Self::RolledBack(_)
        )
    }

    /// Whether this version is the one serving.
    pub fn is_serving(&self) -> bool {
        matches!(self, Self::Active | Self::Soaking | Self::Confirmed)
    }

    /// The next phase.
    pub fn next(&self, input: Input) -> Result<Phase, Illegal> {
        use Input as I;
        use Phase as P;
        let next = match (self, &input) {
            (P::Verified, I::DownloadStarted) => P::Downloading,
            (P::Downloading, I::DownloadDone) => P::Downloaded,
            (P::Downloaded, I::LoadDone) => P::Loaded,
            (P::Loaded, I::TestPassed) => P::Tested,
            (P::Tested, I::Activated) => P::Active,
            (P::Active, I::SoakStarted { policy: true }) => P::Soaking,
            (P::Active, I::SoakStarted { policy: false }) => P::Confirmed,
            (P::Soaking, I::SoakPassed) => P::Confirmed,
            (P::Soaking, I::Breached(why)) => P::RolledBack(why.clone()),
            // Each failure belongs to its own step.
            (P::Verified | P::Downloading, I::Failed(f @ Failure::Download(_)))
            | (P::Downloaded, I::Failed(f @ Failure::Load(_)))
            | (P::Loaded, I::Failed(f @ Failure::TestVector(_)))
            | (P::Tested, I::Failed(f @ Failure::Activate(_))) => P::Failed(f.clone()),
            // Nothing before activation survives a restart but the
            // staging file: start over (the download resumes).
            (
                P::Verified | P::Downloading | P::Downloaded | P::Loaded | P::Tested,
                I::Restarted,
            ) => P::Verified,
            // The active pointer survived: go on watching.
            (P::Active | P::Soaking, I::Restarted) => P::Soaking,
            (P::Confirmed | P::Failed(_) | P::RolledBack(_), I::Restarted) => self.clone(),
            _ => {
                return Err(Illegal {
                    phase: self.clone(),
                    input,
                })
            }
        };
        Ok(next)
    }
}

/// Requests, errors and latency of one model over a period.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub p95_us: Option<f64>,
}

impl Window {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// The verdict on a soaking version so far.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    /// Keep watching.
    Continue,
    /// The soak period is over without a breach.
    Confirm,
    /// Roll back, for this reason.
    Breach(String),
}

/// Judges a soaking version: `new` is what it did since activation,
/// `previous` what the version before it did over its last period (if it
/// served), `elapsed_secs` how long it has soaked. Thresholds apply only
/// once `policy.min_requests` requests have been seen, so one early error
/// does not roll back a good model.
pub fn judge(
    policy: &SoakPolicy,
    new: Window,
    previous: Option<Window>,
    elapsed_secs: u64,
) -> Judgement {
    if new.requests >= policy.min_requests.max(1) {
        let rate = new.error_rate();
        if let Some(max) = policy.max_error_rate {
            if rate > max {
                return Judgement::Breach(format!(
                    "error rate {:.1}% over {} requests is above the soak limit of {:.1}%",
                    rate * 100.0,
                    new.requests,
                    max * 100.0
                ));
            }
        }
        if let (Some(factor), Some(old)) = (policy.max_error_rate_ratio, previous) {
            let old_rate = old.error_rate();
            // With a previous rate of 0, any error rate above the absolute
            // floor of one error in `min_requests` counts as worse.
            let floor = 1.0 / policy.min_requests.max(1) as f64;
            if old.requests > 0 && rate > (old_rate * factor).max(floor) {
                return Judgement::Breach(format!(
                    "error rate {:.1}% is more than {factor}x the previous version's {:.1}%",
                    rate * 100.0,
                    old_rate * 100.0
                ));
            }
        }
        if let (Some(max), Some(p95)) = (policy.max_p95_us, new.p95_us) {
            if p95 > max as f64 {
                return Judgement::Breach(format!(
                    "p95 latency {p95:.0} us is above the soak limit of {max} us"
                ));
            }
        }
        if let (Some(factor), Some(p95), Some(old)) = (
            policy.max_p95_ratio,
            new.p95_us,
            previous.and_then(|w| w.p95_us),
        ) {
            if p95 > old * factor {
                return Judgement::Breach(format!(
                    "p95 latency {p95:.0} us is more than {factor}x the previous version's {old:.0} us"
                ));
            }
        }
    }
    if elapsed_secs >= policy.secs {
        Judgement::Confirm
    } else {
        Judgement::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_inputs() -> Vec<Input> {
        let f = |s: &str| s.to_string();
        vec![
            Input::DownloadStarted,
            Input::DownloadDone,
            Input::LoadDone,
            Input::TestPassed,
            Input::Activated,
            Input::SoakStarted { policy: true },
            Input::SoakStarted { policy: false },
            Input::SoakPassed,
            Input::Failed(Failure::Download(f("d"))),
            Input::Failed(Failure::Load(f("l"))),
            Input::Failed(Failure::TestVector(f("t"))),
            Input::Failed(Failure::Activate(f("a"))),
            Input::Breached(f("b")),
            Input::Restarted,
        ]
    }

    fn all_phases() -> Vec<Phase> {
        vec![
            Phase::Verified,
            Phase::Downloading,
            Phase::Downloaded,
            Phase::Loaded,
            Phase::Tested,
            Phase::Active,
            Phase::Soaking,
            Phase::Confirmed,
            Phase::Failed(Failure::Load("x".into())),
            Phase::RolledBack("y".into()),
        ]
    }

    #[test]
    fn the_happy_path_goes_through_every_phase_in_order() {
        let mut p = Phase::Verified;
        let mut seen = vec![p.clone()];
        for input in [
            Input::DownloadStarted,
            Input::DownloadDone,
            Input::LoadDone,
            Input::TestPassed,
            Input::Activated,
            Input::SoakStarted { policy: true },
            Input::SoakPassed,
        ] {
            p = p.next(input).unwrap();
            seen.push(p.clone());
        }
        assert_eq!(&seen[..], &all_phases()[..8]);
        assert!(p.is_final() && p.is_serving());
        // Without a soak policy an active version is confirmed at once.
        assert_eq!(
            Phase::Active.next(Input::SoakStarted { policy: false }),
            Ok(Phase::Confirmed)
        );
    }

    /// Every (phase, input) pair: exactly the listed ones are legal, and
    /// every failure lands in a final phase that carries its reason.
    #[test]
    fn every_transition_is_either_listed_or_refused() {
        let mut legal = 0;
        for phase in all_phases() {
            for input in all_inputs() {
                match phase.next(input.clone()) {
                    Ok(next) => {
                        legal += 1;
                        if let Input::Failed(f) = &input {
                            assert_eq!(next, Phase::Failed(f.clone()));
                            assert!(!phase.is_serving(), "{phase:?} fails only before serving");
                        }
                        if let Input::Breached(why) = &input {
                            assert_eq!(next, Phase::RolledBack(why.clone()));
                        }
                        if phase.is_final() {
                            assert_eq!(input, Input::Restarted, "{phase:?} is final");
                            assert_eq!(next, phase);
                        }
                    }
                    Err(e) => {
                        assert_eq!(e.phase, phase);
                        assert_eq!(e.input, input);
                    }
                }
            }
        }
        // 7 forward steps + soak skipped + breach, 5 failures (download
        // from two phases), 10 restarts.
        assert_eq!(legal, 7 + 1 + 1 + 5 + 10);
    }

    #[test]
    fn a_restart_starts_over_before_activation_and_keeps_soaking_after() {
        for p in &all_phases()[..5] {
            assert_eq!(p.next(Input::Restarted), Ok(Phase::Verified), "{p:?}");
        }
        assert_eq!(Phase::Active.next(Input::Restarted), Ok(Phase::Soaking));
        assert_eq!(Phase::Soaking.next(Input::Restarted), Ok(Phase::Soaking));
    }

    #[test]
    fn a_failure_must_match_its_step() {
        let load = Input::Failed(Failure::Load("bad".into()));
        assert!(Phase::Downloading.next(load.clone()).is_err());
        assert!(Phase::Downloaded.next(load).is_ok());
        assert!(Phase::Active
            .next(Input::Failed(Failure::TestVector("x".into())))
            .is_err());
    }

    fn policy() -> SoakPolicy {
        SoakPolicy {
            secs: 60,
            min_requests: 20,
            max_error_rate: Some(0.05),
            max_error_rate_ratio: Some(2.0),
            max_p95_us: Some(50_000),
            max_p95_ratio: Some(3.0),
        }
    }

    fn w(requests: u64, errors: u64, p95: f64) -> Window {
        Window {
            requests,
            errors,
            p95_us: Some(p95),
        }
    }

    #[test]
    fn soak_confirms_a_healthy_version_when_the_period_ends() {
        let prev = Some(w(100, 1, 1000.0));
        assert_eq!(
            judge(&policy(), w(50, 1, 1500.0), prev, 10),
            Judgement::Continue
        );
        assert_eq!(
            judge(&policy(), w(50, 1, 1500.0), prev, 60),
            Judgement::Confirm
        );
        // Idle devices confirm too: no requests, no evidence of harm.
        assert_eq!(
            judge(&policy(), Window::default(), prev, 60),
            Judgement::Confirm
        );
    }

    #[test]
    fn soak_waits_for_enough_requests_before_judging() {
        // 3 errors in 5 requests: too few requests to say.
        assert_eq!(
            judge(&policy(), w(5, 3, 1000.0), None, 10),
            Judgement::Continue
        );
        assert!(matches!(
            judge(&policy(), w(20, 3, 1000.0), None, 10),
            Judgement::Breach(r) if r.contains("error rate 15.0%")
        ));
    }

    #[test]
    fn soak_breaches_on_each_threshold() {
        let prev = Some(w(100, 0, 1000.0));
        let cases = [
            (w(100, 10, 1000.0), "above the soak limit of 5.0%"),
            (w(100, 0, 60_000.0), "above the soak limit of 50000 us"),
            (w(100, 0, 3500.0), "more than 3x the previous"),
        ];
        for (new, why) in cases {
            match judge(&policy(), new, prev, 10) {
                Judgement::Breach(r) => assert!(r.contains(why), "{r}"),
                other => panic!("{new:?}: {other:?}"),
            }
        }
        // Error rate relative to the previous version.
        let mut relative = policy();
        relative.max_error_rate = None;
        let prev = Some(w(1000, 10, 1000.0)); // 1%
        assert_eq!(
            judge(&relative, w(100, 2, 1000.0), prev, 10),
            Judgement::Continue
        );
        assert!(matches!(
            judge(&relative, w(100, 9, 1000.0), prev, 10),
            Judgement::Breach(r) if r.contains("more than 2x the previous version's 1.0%")
        ));
    }

    #[test]
    fn without_a_previous_version_only_absolute_limits_apply() {
        let mut p = policy();
        p.max_error_rate = None;
        p.max_p95_us = None;
        assert_eq!(judge(&p, w(100, 50, 1e9), None, 60), Judgement::Confirm);
    }
}
