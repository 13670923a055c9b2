//! The agent as a payload: the `agent` slot of a device's desired state
//! (which release to run, one build per target triple), how release
//! versions compare, and what a device says about the agent it runs.
//!
//! A release travels like a model: its builds are content-addressed
//! artifacts whose hash and size the signed slot fixes, so the broker and
//! the artifact host cannot swap a binary. Release versions are semantic
//! versions (`MAJOR.MINOR.PATCH[-PRE]`); a device never goes to an older
//! one unless the signed slot says `allow_downgrade` (an operator's
//! explicit step back, or a rollout's abort).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::artifact::Compressed;

/// The agent release one device should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSlot {
    /// The release's semantic version.
    pub version: String,
    /// Install even if the device runs a newer release.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
    /// One build per target triple (`aarch64-unknown-linux-musl`, ...);
    /// each device takes the build of its own triple.
    pub builds: BTreeMap<String, AgentBuild>,
}

/// One build of a release: an executable for one target triple.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBuild {
    /// Lowercase hex SHA-256 of the executable.
    pub sha256: String,
    /// Exact size of the executable in bytes; downloads stop here.
    pub size: u64,
    /// Where to download it, tried in order.
    pub urls: Vec<String>,
    /// A zstd-compressed copy to download instead; `sha256` and `size`
    /// still describe the executable, checked after decompression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd: Option<Compressed>,
}

/// What a device reports about the agent it runs, in its status.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The target triple the running executable was built for: which
    /// build of a release the device takes.
    pub target: String,
    /// The release it runs; absent for the packaged (factory) executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// Why a release version or an agent slot is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRelease(pub String);

/// A parsed release version: `MAJOR.MINOR.PATCH` with an optional
/// pre-release part, ordered as semantic versions are (a pre-release sorts
/// before its release; numeric identifiers compare as numbers, and before
/// alphanumeric ones). Build metadata (`+...`) is not allowed: two
/// releases that differ only in it would have no order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseVersion {
    core: [u64; 3],
    pre: Vec<String>,
}

impl std::str::FromStr for ReleaseVersion {
    type Err = InvalidRelease;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            InvalidRelease(format!(
                "agent release version {s:?} is not a semantic version MAJOR.MINOR.PATCH[-PRE]: {why}"
            ))
        };
        if s.len() > 64 {
            return Err(bad("longer than 64 characters"));
        }
        if s.contains('+') {
            return Err(bad("build metadata (+...) is not allowed"));
        }
        let (core, pre) = match s.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (s, None),
        };
        let numbers: Vec<&str> = core.split('.').collect();
        if numbers.len() != 3 {
            return Err(bad("expected three dot-separated numbers"));
        }
        let mut parsed = [0u64; 3];
        for (slot, n) in parsed.iter_mut().zip(&numbers) {
            if n.is_empty()
                || !n.bytes().all(|b| b.is_ascii_digit())
                || (n.len() > 1 && n.starts_with('0'))
            {
                return Err(bad("each number is digits without a leading zero"));
            }
            *slot = n.parse().map_err(|_| bad("number too large"))?;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(pre) => {
                let ids: Vec<String> = pre.split('.').map(str::to_string).collect();
                let valid = ids.iter().all(|id| {
                    !id.is_empty()
                        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !(id.len() > 1
                            && id.starts_with('0')
                            && id.bytes().all(|b| b.is_ascii_digit()))
                });
                if !valid {
                    return Err(bad(
                        "the pre-release part is dot-separated [0-9A-Za-z-] identifiers",
                    ));
                }
                ids
            }
        };
        Ok(Self { core: parsed, pre })
    }
}

impl Ord for ReleaseVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core
            .cmp(&other.core)
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    for (a, b) in self.pre.iter().zip(&other.pre) {
                        let order = match (a.parse::<u64>(), b.parse::<u64>()) {
                            (Ok(a), Ok(b)) => a.cmp(&b),
                            (Ok(_), Err(_)) => Ordering::Less,
                            (Err(_), Ok(_)) => Ordering::Greater,
                            (Err(_), Err(_)) => a.cmp(b),
                        };
                        if order != Ordering::Equal {
                            return order;
                        }
                    }
                    self.pre.len().cmp(&other.pre.len())
                }
            })
    }
}

impl PartialOrd for ReleaseVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Checks a target triple's spelling: 3 to 80 of `[a-z0-9_.-]`.
pub fn validate_target(triple: &str) -> Result<(), InvalidRelease> {
    let ok = (3..=80).contains(&triple.len())
        && triple.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
        && triple.contains('-');
    if ok {
        Ok(())
    } else {
        Err(InvalidRelease(format!(
            "{triple:?} is not a target triple (like aarch64-unknown-linux-musl)"
        )))
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl AgentSlot {
    /// Structural checks: a semantic version, at least one build, each for
    /// a well-formed triple with a hash, a size and a URL.
    pub fn validate(&self) -> Result<ReleaseVersion, InvalidRelease> {
        let version: ReleaseVersion = self.version.parse()?;
        if self.builds.is_empty() {
            return Err(InvalidRelease(format!(
                "agent release {} has no build",
                self.version
            )));
        }
        for (triple, build) in &self.builds {
            validate_target(triple)?;
            let what = format!("agent release {} for {triple}", self.version);
            if !is_sha256_hex(&build.sha256) {
                return Err(InvalidRelease(format!(
                    "{what}: sha256 must be 64 lowercase hex characters"
                )));
            }
            if build.size == 0 || build.urls.is_empty() {
                return Err(InvalidRelease(format!(
                    "{what}: needs a positive size and a download URL"
                )));
            }
            if let Some(z) = &build.zstd {
                if z.size == 0 || z.urls.is_empty() {
                    return Err(InvalidRelease(format!(
                        "{what}: a compressed copy needs a positive size and a URL"
                    )));
                }
            }
        }
        Ok(version)
    }

    /// The build for `triple`, if the release has one.
    pub fn build_for(&self, triple: &str) -> Option<&AgentBuild> {
        self.builds.get(triple)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ReleaseVersion {
        s.parse().unwrap()
    }

    #[test]
    fn versions_order_as_semantic_versions() {
        let ordered = [
            "0.9.0",
            "0.10.0-alpha",
            "0.10.0-alpha.1",
            "0.10.0-alpha.beta",
            "0.10.0-beta.2",
            "0.10.0-beta.11",
            "0.10.0-rc.1",
            "0.10.0",
            "0.10.1",
            "1.0.0",
            "10.0.0",
        ];
        for pair in ordered.windows(2) {
            assert!(v(pair[0]) < v(pair[1]), "{} < {}", pair[0], pair[1]);
        }
        assert_eq!(v("1.2.3"), v("1.2.3"));
    }

    #[test]
    fn malformed_versions_are_refused_with_the_reason() {
        for bad in [
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.2.x",
            "1.2.3+build",
            "1.2.3-",
            "1.2.3-a..b",
            "",
            "1.2.3-01",
        ] {
            let e = bad.parse::<ReleaseVersion>().unwrap_err();
            assert!(e.0.contains("semantic version"), "{bad}: {e}");
        }
    }

    #[test]
    fn slots_need_well_formed_builds() {
        let build = AgentBuild {
            sha256: "ab".repeat(32),
            size: 10,
            urls: vec!["http://x/a".into()],
            zstd: None,
        };
        let mut slot = AgentSlot {
            version: "1.0.0".into(),
            allow_downgrade: false,
            builds: BTreeMap::from([("aarch64-unknown-linux-musl".to_string(), build.clone())]),
        };
        assert_eq!(slot.validate().unwrap(), v("1.0.0"));
        assert!(slot.build_for("aarch64-unknown-linux-musl").is_some());
        assert!(slot.build_for("x86_64-unknown-linux-musl").is_none());
        slot.builds.insert("../etc".into(), build.clone());
        assert!(slot.validate().unwrap_err().0.contains("target triple"));
        slot.builds.remove("../etc");
        slot.builds
            .get_mut("aarch64-unknown-linux-musl")
            .unwrap()
            .sha256 = "AB".repeat(32);
        assert!(slot.validate().unwrap_err().0.contains("sha256"));
        slot.builds.clear();
        assert!(slot.validate().unwrap_err().0.contains("no build"));
    }
}
