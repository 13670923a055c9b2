//! The update decisions, free of I/O: what to do with an incoming
//! desired-state message, and which steps bring the served models to it.
//! The update task ([`super::task`]) carries the steps out.

use edgefleet_shared::{
    DesiredState, DeviceId, ModelSlot, ReleaseVersion, RootDocument, Signed, VerifyError,
};
use sha2::{Digest, Sha256};

/// What the device trusts, as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct TrustView<'a> {
    pub root: &'a RootDocument,
    pub device: &'a DeviceId,
    pub desired_version: Option<u64>,
    /// SHA-256 of the canonical JSON of the accepted envelope, if any.
    pub desired_digest: Option<[u8; 32]>,
    /// What the device serves now: no model may go back in version.
    pub serving: &'a [Serving],
    /// The agent release running (the packaged executable's version when
    /// it runs): no agent slot may go back from it without
    /// `allow_downgrade`.
    pub agent_release: &'a str,
}

/// The verdict on an incoming desired-state message.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The very document already accepted (a retained message redelivered
    /// on reconnect): nothing to do, nothing to report.
    AlreadyApplied,
    /// Refused; nothing on the device changes.
    Refuse(VerifyError),
    /// Verified and newer: apply it.
    Apply(Box<(Signed, DesiredState)>),
}

/// Digest used to recognise a redelivered document.
pub fn envelope_digest(envelope: &Signed) -> [u8; 32] {
    Sha256::digest(envelope.to_json()).into()
}

/// Decides what to do with `payload` at time `now`.
pub fn assess(payload: &[u8], trust: TrustView<'_>, now: u64) -> Verdict {
    let envelope = match Signed::from_json(payload) {
        Ok(env) => env,
        Err(e) => return Verdict::Refuse(e),
    };
    if trust.desired_digest == Some(envelope_digest(&envelope)) {
        return Verdict::AlreadyApplied;
    }
    let doc = match DesiredState::verify(&envelope, trust.root, trust.device, now) {
        Ok(doc) => doc,
        Err(e) => return Verdict::Refuse(e),
    };
    if let Err(e) = doc.check_newer_than(trust.desired_version) {
        return Verdict::Refuse(e);
    }
    for slot in &doc.models {
        if let Some(current) = trust.serving.iter().find(|s| s.name == slot.name) {
            if slot.version < current.version {
                return Verdict::Refuse(VerifyError::ModelRollback {
                    model: slot.name.clone(),
                    serving: current.version,
                    offered: slot.version,
                });
            }
        }
    }
    if let Some(agent) = &doc.agent {
        let older = match (
            agent.version.parse::<ReleaseVersion>(),
            trust.agent_release.parse::<ReleaseVersion>(),
        ) {
            (Ok(offered), Ok(running)) => offered < running,
            // The slot's version was checked by verify; a running version
            // that is not a semantic version cannot be compared.
            _ => false,
        };
        if older && !agent.allow_downgrade {
            return Verdict::Refuse(VerifyError::AgentRollback {
                running: trust.agent_release.to_string(),
                offered: agent.version.clone(),
            });
        }
    }
    Verdict::Apply(Box::new((envelope, doc)))
}

/// A model as currently served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    pub name: String,
    pub version: u64,
    pub sha256: String,
}

/// One step towards a desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Download, verify, load, test and activate this slot.
    Install(Box<ModelSlot>),
    /// Stop serving a model the desired state no longer lists.
    Remove(String),
}

/// The steps that take `serving` to `desired`; models already at the
/// desired version and hash need none.
pub fn plan(desired: &DesiredState, serving: &[Serving]) -> Vec<Step> {
    let mut steps = Vec::new();
    for slot in &desired.models {
        let current = serving.iter().find(|s| s.name == slot.name);
        if current.is_none_or(|s| s.version != slot.version || s.sha256 != slot.sha256) {
            steps.push(Step::Install(Box::new(slot.clone())));
        }
    }
    for s in serving {
        if !desired.models.iter().any(|slot| slot.name == s.name) {
            steps.push(Step::Remove(s.name.clone()));
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::{ModelFormat, SecretKey};

    fn slot(name: &str, version: u64) -> ModelSlot {
        ModelSlot {
            name: name.into(),
            version,
            format: ModelFormat::Onnx,
            sha256: format!("{version:064x}"),
            size: 10,
            urls: vec!["http://x".into()],
            inputs: vec![],
            outputs: vec![],
            test_vector: None,
            soak: None,
            upload_results: false,
            zstd: None,
            shadow: None,
            split: None,
            drift: None,
        }
    }

    fn serving(name: &str, version: u64) -> Serving {
        Serving {
            name: name.into(),
            version,
            sha256: format!("{version:064x}"),
        }
    }

    #[test]
    fn plan_installs_changed_keeps_equal_and_removes_dropped() {
        let device = DeviceId::new("d").unwrap();
        let doc = DesiredState::new(device, 1, 0, 10, vec![slot("a", 2), slot("b", 1)]);
        let steps = plan(&doc, &[serving("a", 1), serving("b", 1), serving("c", 5)]);
        assert_eq!(
            steps,
            vec![
                Step::Install(Box::new(slot("a", 2))),
                Step::Remove("c".into())
            ]
        );
        assert!(plan(&doc, &[serving("a", 2), serving("b", 1)]).is_empty());
    }

    #[test]
    fn plan_reinstalls_when_hash_differs_at_same_version() {
        let device = DeviceId::new("d").unwrap();
        let doc = DesiredState::new(device, 1, 0, 10, vec![slot("a", 2)]);
        let mut s = serving("a", 2);
        s.sha256 = "00".repeat(32);
        assert_eq!(
            plan(&doc, &[s]),
            vec![Step::Install(Box::new(slot("a", 2)))]
        );
    }

    #[test]
    fn assess_applies_newer_ignores_redelivery_and_refuses_the_rest() {
        let root_key = SecretKey::from_seed([1; 32]);
        let online = SecretKey::from_seed([2; 32]);
        let root = RootDocument::new(1, u64::MAX, &[root_key.public()], 1, &[online.public()]);
        let device = DeviceId::new("d").unwrap();
        let doc = DesiredState::new(device.clone(), 5, 0, 1000, vec![slot("a", 1)]);
        let env = Signed::sign(&doc, &[&online]);
        let payload = env.to_json();
        let fresh = TrustView {
            root: &root,
            device: &device,
            desired_version: Some(4),
            desired_digest: None,
            serving: &[],
            agent_release: "1.0.0",
        };
        assert!(matches!(assess(&payload, fresh, 10), Verdict::Apply(_)));

        let same = TrustView {
            desired_version: Some(5),
            desired_digest: Some(envelope_digest(&env)),
            ..fresh
        };
        assert_eq!(assess(&payload, same, 10), Verdict::AlreadyApplied);

        let newer_trusted = TrustView {
            desired_version: Some(5),
            ..fresh
        };
        assert!(matches!(
            assess(&payload, newer_trusted, 10),
            Verdict::Refuse(VerifyError::Rollback { .. })
        ));
        assert!(matches!(
            assess(&payload, fresh, 2000),
            Verdict::Refuse(VerifyError::Expired { .. })
        ));
        assert!(matches!(
            assess(b"{not json", fresh, 10),
            Verdict::Refuse(VerifyError::Malformed(_))
        ));
        let rogue = Signed::sign(&doc, &[&SecretKey::from_seed([9; 32])]);
        assert!(matches!(
            assess(&rogue.to_json(), fresh, 10),
            Verdict::Refuse(VerifyError::UnknownKey { .. })
        ));
        // A newer document may not take a model back in version.
        let serving_newer = [serving("a", 2)];
        let downgrade = TrustView {
            serving: &serving_newer,
            ..fresh
        };
        assert_eq!(
            assess(&payload, downgrade, 10),
            Verdict::Refuse(VerifyError::ModelRollback {
                model: "a".into(),
                serving: 2,
                offered: 1
            })
        );
        let serving_same = [serving("a", 1), serving("b", 9)];
        let same = TrustView {
            serving: &serving_same,
            ..fresh
        };
        assert!(matches!(assess(&payload, same, 10), Verdict::Apply(_)));
    }

    #[test]
    fn an_older_agent_release_is_refused_unless_the_signed_slot_allows_it() {
        let root_key = SecretKey::from_seed([1; 32]);
        let online = SecretKey::from_seed([2; 32]);
        let root = RootDocument::new(1, u64::MAX, &[root_key.public()], 1, &[online.public()]);
        let device = DeviceId::new("d").unwrap();
        let with_agent = |version: &str, allow_downgrade: bool| {
            let agent = edgefleet_shared::AgentSlot {
                version: version.into(),
                allow_downgrade,
                builds: [(
                    "x86_64-unknown-linux-musl".to_string(),
                    edgefleet_shared::AgentBuild {
                        sha256: "cd".repeat(32),
                        size: 5,
                        urls: vec!["http://x/agent".into()],
                        zstd: None,
                    },
                )]
                .into(),
            };
            let doc = DesiredState::new(device.clone(), 5, 0, 1000, vec![]).with_agent(Some(agent));
            Signed::sign(&doc, &[&online]).to_json()
        };
        let trust = TrustView {
            root: &root,
            device: &device,
            desired_version: Some(4),
            desired_digest: None,
            serving: &[],
            agent_release: "1.10.0",
        };
        assert!(matches!(
            assess(&with_agent("1.10.1", false), trust, 10),
            Verdict::Apply(_)
        ));
        assert!(matches!(
            assess(&with_agent("1.10.0", false), trust, 10),
            Verdict::Apply(_)
        ));
        assert_eq!(
            assess(&with_agent("1.9.0", false), trust, 10),
            Verdict::Refuse(VerifyError::AgentRollback {
                running: "1.10.0".into(),
                offered: "1.9.0".into()
            })
        );
        assert!(matches!(
            assess(&with_agent("1.9.0", true), trust, 10),
            Verdict::Apply(_)
        ));
        // A slot whose version is not a semantic version never verifies.
        assert!(matches!(
            assess(&with_agent("latest", true), trust, 10),
            Verdict::Refuse(VerifyError::InvalidDesired(_))
        ));
    }
}
