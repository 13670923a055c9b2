//! Collapses repeated refusals into one event and a count. Desired states
//! and root chains reach the agent through the broker, which it does not
//! trust: anyone who can publish on the device's topics can send bad
//! documents as fast as the link carries them, and each refusal would be
//! an update event kept until the fleet server stores it. The first
//! refusal of a kind is worth reporting at once; the next thousand are
//! worth a number.
//!
//! [`RefusalCollapser`] is a plain type (the caller passes the time, and
//! reports what it returns): the updater feeds it every refusal and sends
//! its answers through the [`Reporter`](super::Reporter). Genuine update
//! events (accepted, activated, rolled back, ...) never pass through it.

use std::time::{Duration, Instant};

use edgefleet_shared::VerifyError;

use crate::trust::TrustError;

/// How long repeats of one kind of refusal are counted before one event
/// summarises them.
pub const REFUSAL_PERIOD: Duration = Duration::from_secs(60);

/// What makes two refusals "alike": which document was refused and a fixed
/// label for the kind of failure (the [`VerifyError`] variant, or the few
/// other ways a document is refused), never its text. Every value a
/// variant carries (versions, key ids, model and device names, parser
/// messages) comes from the refused document, so a sender could make each
/// refusal look new by changing one. Both parts are `&'static str`: the
/// set of kinds, and with it the collapser's memory, is fixed when the
/// agent is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefusalKind {
    document: &'static str,
    failure: &'static str,
}

impl RefusalKind {
    /// A verified desired state this device could not store.
    pub const DESIRED_NOT_STORED: Self = Self {
        document: "desired state",
        failure: "cannot store",
    };
    /// A root chain that is not a JSON array of signed documents.
    pub const ROOT_CHAIN_NOT_JSON: Self = Self {
        document: "root chain",
        failure: "malformed",
    };

    /// A desired state refused for `e`.
    pub fn desired(e: &VerifyError) -> Self {
        Self {
            document: "desired state",
            failure: verify_failure(e),
        }
    }

    /// A root chain refused for `e`.
    pub fn root_chain(e: &TrustError) -> Self {
        let failure = match e {
            TrustError::Read { .. } => "cannot read",
            TrustError::Write { .. } => "cannot store",
            TrustError::Root { source, .. } | TrustError::Chain(source) => verify_failure(source),
        };
        Self {
            document: "root chain",
            failure,
        }
    }

    /// The refused document: "desired state" or "root chain".
    pub fn document(&self) -> &'static str {
        self.document
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.document, self.failure)
    }
}

/// The label of a verification failure: its variant, nothing it carries.
fn verify_failure(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::Malformed(_) => "malformed",
        VerifyError::WrongType { .. } => "wrong type",
        VerifyError::UnsupportedSchema { .. } => "unsupported schema",
        VerifyError::BadSignatureEncoding { .. } => "bad signature encoding",
        VerifyError::UnknownKey { .. } => "unknown key",
        VerifyError::BadSignature { .. } => "bad signature",
        VerifyError::ThresholdNotMet { .. } => "threshold not met",
        VerifyError::Expired { .. } => "expired",
        VerifyError::RootExpired { .. } => "root expired",
        VerifyError::WrongDevice { .. } => "wrong device",
        VerifyError::InvalidRoot(_) => "invalid root",
        VerifyError::InvalidDesired(_) => "invalid desired state",
        VerifyError::RootVersion { .. } => "root version",
        VerifyError::Rollback { .. } => "rollback",
        VerifyError::ModelRollback { .. } => "model rollback",
        VerifyError::AgentRollback { .. } => "agent rollback",
    }
}

/// One refusal, or the summary of several alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// The desired-state version the refused document offered, if known.
    pub desired_version: Option<u64>,
    pub reason: String,
}

/// Decides which refusals are reported: per [`RefusalKind`], the first at
/// once, and the repeats within [`REFUSAL_PERIOD`] of it as one summary
/// when the period ends.
///
/// Kinds are counted apart, each in its own period, and a refusal of
/// another kind does not end a period: a sender alternating two kinds of
/// bad document would otherwise turn every refusal into a summary.
#[derive(Debug)]
pub struct RefusalCollapser {
    period: Duration,
    /// One entry per kind refused in its current period.
    periods: Vec<Period>,
}

#[derive(Debug)]
struct Period {
    kind: RefusalKind,
    started: Instant,
    /// Refusals of this kind since `started` not reported yet.
    suppressed: u64,
    /// The latest of them.
    latest: Option<Refusal>,
}

impl Period {
    /// One refusal standing for the suppressed ones (the latest, with their
    /// count), or `None` if there were none; resets the count.
    fn summary(&mut self, period: Duration) -> Option<Refusal> {
        let latest = self.latest.take()?;
        let n = std::mem::take(&mut self.suppressed);
        let reason = match n {
            1 => latest.reason,
            n => format!(
                "{} (and {} more like it within {} s)",
                latest.reason,
                with_thousands(n - 1),
                period.as_secs()
            ),
        };
        Some(Refusal { reason, ..latest })
    }
}

impl Default for RefusalCollapser {
    fn default() -> Self {
        Self::new(REFUSAL_PERIOD)
    }
}

impl RefusalCollapser {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            periods: Vec::new(),
        }
    }

    /// A refusal at `now`. Returns what to report now, in order: summaries
    /// of the periods over by `now` (see [`RefusalCollapser::due`]), then
    /// this refusal if it is the first of its kind in a period.
    pub fn refused(&mut self, refusal: Refusal, now: Instant) -> Vec<Refusal> {
        let mut report = self.due(now);
        match self.periods.iter_mut().find(|p| p.kind == refusal.kind) {
            Some(period) => {
                period.suppressed += 1;
                period.latest = Some(refusal);
            }
            None => {
                self.periods.push(Period {
                    kind: refusal.kind,
                    started: now,
                    suppressed: 0,
                    latest: None,
                });
                report.push(refusal);
            }
        }
        report
    }

    /// Ends the periods that are over at `now`. One with repeats gives
    /// their summary and a new period starts at once, so a flood that goes
    /// on is summarised once a period and never reported one by one; a
    /// quiet one just ends, so the next refusal of its kind is reported at
    /// once.
    pub fn due(&mut self, now: Instant) -> Vec<Refusal> {
        let length = self.period;
        let mut report = Vec::new();
        self.periods.retain_mut(|p| {
            if now.saturating_duration_since(p.started) < length {
                return true;
            }
            match p.summary(length) {
                Some(summary) => {
                    report.push(summary);
                    p.started = now;
                    true
                }
                None => false,
            }
        });
        report
    }

    /// When the next summary is due, if any repeats are waiting: the
    /// caller's timer calls [`RefusalCollapser::due`] then. (Quiet periods
    /// need no timer: the next refusal ends them.)
    pub fn next_due(&self) -> Option<Instant> {
        self.periods
            .iter()
            .filter(|p| p.suppressed > 0)
            .map(|p| p.started + self.period)
            .min()
    }

    /// Summaries of every period with repeats, over or not (at shutdown);
    /// forgets every period.
    pub fn drain(&mut self) -> Vec<Refusal> {
        let length = self.period;
        let report = self
            .periods
            .iter_mut()
            .filter_map(|p| p.summary(length))
            .collect();
        self.periods.clear();
        report
    }
}

/// `n` with a comma between thousands: 5231 as "5,231".
fn with_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// A replayed desired state `offered`, refused as a rollback.
    fn rollback(offered: u64) -> Refusal {
        let e = VerifyError::Rollback {
            trusted: 100,
            offered,
        };
        Refusal {
            kind: RefusalKind::desired(&e),
            desired_version: Some(offered),
            reason: e.to_string(),
        }
    }

    fn expired(version: u64) -> Refusal {
        let e = VerifyError::Expired {
            expires: version,
            now: 1000,
        };
        Refusal {
            kind: RefusalKind::desired(&e),
            desired_version: Some(version),
            reason: e.to_string(),
        }
    }

    #[test]
    fn the_kind_is_the_failure_not_the_values_it_carries() {
        assert_eq!(rollback(1).kind, rollback(2).kind);
        assert_ne!(rollback(1).kind, expired(1).kind);
        let keyid = |k: &str| VerifyError::UnknownKey {
            keyid: k.into(),
            role: "desired".into(),
        };
        assert_eq!(
            RefusalKind::desired(&keyid("a")),
            RefusalKind::desired(&keyid("b"))
        );
        let chain = TrustError::Chain(keyid("a"));
        assert_ne!(
            RefusalKind::root_chain(&chain),
            RefusalKind::desired(&keyid("a"))
        );
        assert_eq!(
            RefusalKind::desired(&keyid("a")).to_string(),
            "desired state: unknown key"
        );
    }

    #[test]
    fn the_first_is_reported_at_once_and_repeats_are_summarised_when_the_period_ends() {
        let t0 = Instant::now();
        let mut c = RefusalCollapser::new(60 * SECOND);
        assert_eq!(c.next_due(), None);
        assert_eq!(c.refused(rollback(1), t0), vec![rollback(1)]);
        assert_eq!(c.next_due(), None, "nothing to summarise yet");
        for v in 2..=5 {
            assert!(c.refused(rollback(v), t0 + v as u32 * SECOND).is_empty());
        }
        assert_eq!(c.next_due(), Some(t0 + 60 * SECOND));
        assert!(c.due(t0 + 59 * SECOND).is_empty());
        let summary = c.due(t0 + 60 * SECOND);
        assert_eq!(
            summary,
            vec![Refusal {
                reason: format!("{} (and 3 more like it within 60 s)", rollback(5).reason),
                ..rollback(5)
            }]
        );
        assert_eq!(c.next_due(), None);
    }

    #[test]
    fn a_single_repeat_is_summarised_as_itself() {
        let t0 = Instant::now();
        let mut c = RefusalCollapser::new(60 * SECOND);
        c.refused(rollback(1), t0);
        c.refused(rollback(2), t0 + SECOND);
        assert_eq!(c.due(t0 + 60 * SECOND), vec![rollback(2)]);
    }

    #[test]
    fn a_quiet_period_ends_and_the_next_refusal_is_reported_at_once() {
        let t0 = Instant::now();
        let mut c = RefusalCollapser::new(60 * SECOND);
        c.refused(rollback(1), t0);
        assert_eq!(c.refused(rollback(2), t0 + 61 * SECOND), vec![rollback(2)]);
        // Without a timer too: the period ended with the next refusal.
        assert!(c.due(t0 + 200 * SECOND).is_empty());
        assert_eq!(c.refused(rollback(3), t0 + 300 * SECOND), vec![rollback(3)]);
    }

    #[test]
    fn a_late_summary_comes_before_the_refusal_that_finds_it_due() {
        let t0 = Instant::now();
        let mut c = RefusalCollapser::new(60 * SECOND);
        c.refused(rollback(1), t0);
        c.refused(rollback(2), t0 + SECOND);
        c.refused(rollback(3), t0 + 2 * SECOND);
        // No timer ran; an expired refusal at 70 s finds the period over.
        let report = c.refused(expired(7), t0 + 70 * SECOND);
        assert_eq!(report.len(), 2);
        assert!(report[0]
            .reason
            .ends_with("(and 1 more like it within 60 s)"));
        assert_eq!(report[1], expired(7));
        // The flood goes on: the next rollback is counted, not reported.
        assert!(c.refused(rollback(4), t0 + 71 * SECOND).is_empty());
        assert_eq!(c.drain(), vec![rollback(4)]);
        assert_eq!(c.next_due(), None);
    }

    #[test]
    fn kinds_are_counted_apart_and_alternating_them_ends_no_period() {
        let t0 = Instant::now();
        let mut c = RefusalCollapser::new(60 * SECOND);
        let mut reported = Vec::new();
        for i in 0..1000u64 {
            let r = if i % 2 == 0 { rollback(i) } else { expired(i) };
            reported.extend(c.refused(r, t0 + Duration::from_millis(i)));
        }
        assert_eq!(reported, vec![rollback(0), expired(1)]);
        // Each period ends a minute after its own first refusal.
        let summaries = [c.due(t0 + 60 * SECOND), c.due(t0 + 61 * SECOND)];
        assert_eq!(summaries[0].len(), 1);
        let summaries = summaries.concat();
        assert_eq!(summaries.len(), 2);
        assert!(summaries[0].reason.contains("(and 498 more like it"));
        assert_eq!(summaries[0].desired_version, Some(998));
        assert!(summaries[1].reason.contains("(and 498 more like it"));
        assert_eq!(summaries[1].desired_version, Some(999));
    }

    #[test]
    fn a_flood_that_goes_on_is_summarised_once_a_period() {
        let t0 = Instant::now();
        let mut c = RefusalCollapser::new(60 * SECOND);
        let mut reported = Vec::new();
        // 10,000 refusals over 300 s, a timer calling `due` when asked.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(30 * i);
            if let Some(at) = c.next_due().filter(|at| *at <= now) {
                reported.extend(c.due(at));
            }
            reported.extend(c.refused(rollback(i), now));
        }
        reported.extend(c.drain());
        // The first, then one summary per minute (the last at shutdown).
        assert_eq!(reported.len(), 1 + 5, "{reported:#?}");
        let represented: u64 = reported
            .iter()
            .map(|r| match r.reason.split_once("(and ") {
                Some((_, rest)) => {
                    let n = rest.split(' ').next().unwrap().replace(',', "");
                    1 + n.parse::<u64>().unwrap()
                }
                None => 1,
            })
            .sum();
        assert_eq!(represented, 10_000, "every refusal is counted once");
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(with_thousands(0), "0");
        assert_eq!(with_thousands(999), "999");
        assert_eq!(with_thousands(5231), "5,231");
        assert_eq!(with_thousands(1_000_000), "1,000,000");
    }
}
