//! Signed documents: the root of trust and each device's desired state.
//!
//! Both travel in the same envelope, [`Signed`]: the document itself as a
//! JSON object under `signed`, and a list of `{keyid, sig}` pairs. A
//! signature covers [`crate::canonical::signing_input`] of the whole
//! `signed` object, so every field (model hash, URLs, version, expiry,
//! device id) is bound together and nothing can be mixed and matched.
//!
//! * [`RootDocument`] names the root keys (kept offline) and the online keys
//!   allowed to sign desired state, each role with a threshold. Devices are
//!   flashed with the first root document and only ever move forward
//!   ([`RootDocument::walk_chain`]).
//! * [`DesiredState`] tells one device which models to run, and which
//!   agent release ([`crate::agent_release`]). It is signed by
//!   the fleet server's online key and checked with [`DesiredState::verify`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::agent_release::AgentSlot;
pub use crate::artifact::Compressed;
use crate::canonical::signing_input;
use crate::crypto::{decode_signature, encode_signature, KeyId, PublicKey, SecretKey};
use crate::ids::{validate_name, DeviceId};
use crate::SCHEMA_VERSION;

/// Why a signed document was refused. Every variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed document: {0}")]
    Malformed(String),
    #[error("expected a {expected:?} document, got {found:?}")]
    WrongType { expected: String, found: String },
    #[error("unsupported schema version {found} (this build understands {supported})")]
    UnsupportedSchema { found: u32, supported: u32 },
    #[error("signature by key {keyid} is not valid base64 of 64 bytes: {reason}")]
    BadSignatureEncoding { keyid: String, reason: String },
    #[error("signature by key {keyid} is not trusted for the {role} role")]
    UnknownKey { keyid: String, role: String },
    #[error("signature by key {keyid} does not verify (document altered or wrong key)")]
    BadSignature { keyid: String },
    #[error("{role} role needs {required} valid signature(s), found {valid}")]
    ThresholdNotMet {
        role: String,
        valid: usize,
        required: u32,
    },
    #[error("document expired at {expires} (now {now}); the fleet server must re-sign it")]
    Expired { expires: u64, now: u64 },
    #[error("root document version {version} expired at {expires} (now {now}); nothing signed under it is trusted until a newer root arrives (the fleet server renews it when it holds the root keys, else the operator runs `fleetctl keys rotate`)")]
    RootExpired {
        version: u64,
        expires: u64,
        now: u64,
    },
    #[error("desired state is for device {found}, not this device ({expected})")]
    WrongDevice { expected: String, found: String },
    #[error("invalid root document: {0}")]
    InvalidRoot(String),
    #[error("invalid desired state: {0}")]
    InvalidDesired(String),
    #[error("root version {offered} does not follow trusted version {trusted}")]
    RootVersion { trusted: u64, offered: u64 },
    #[error("desired state version {offered} is not newer than trusted version {trusted} (rollback or replay)")]
    Rollback { trusted: u64, offered: u64 },
    #[error("agent release {offered} is older than release {running} this device runs (rollback); only a slot that allows a downgrade (a rollout's abort, `deploy --agent V --allow-downgrade`) may go back")]
    AgentRollback { running: String, offered: String },
    #[error("model {model} version {offered} is older than version {serving} this device serves (rollback); publish the old model under a new version to go back")]
    ModelRollback {
        model: String,
        serving: u64,
        offered: u64,
    },
}

/// A document kind that travels inside a [`Signed`] envelope.
pub trait Document: Serialize + DeserializeOwned {
    /// The value of the document's `type` field and its signing domain.
    const TYPE: &'static str;
}

/// One signature in an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub keyid: String,
    pub sig: String,
}

/// The envelope every signed document travels in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    pub signed: Value,
    pub signatures: Vec<SignatureEntry>,
}

impl Signed {
    /// Serialises `doc` and signs it with each of `keys`.
    pub fn sign<D: Document>(doc: &D, keys: &[&SecretKey]) -> Self {
        let signed = serde_json::to_value(doc).expect("documents always serialise");
        let message = signing_input(D::TYPE, &signed);
        let signatures = keys
            .iter()
            .map(|key| SignatureEntry {
                keyid: key.key_id().to_string(),
                sig: encode_signature(&key.sign(&message)),
            })
            .collect();
        Self { signed, signatures }
    }

    /// Parses an envelope from JSON bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, VerifyError> {
        serde_json::from_slice(bytes).map_err(|e| VerifyError::Malformed(e.to_string()))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes always serialise")
    }

    /// The document's `type` field, if it has one.
    pub fn doc_type(&self) -> Option<&str> {
        self.signed.get("type").and_then(Value::as_str)
    }

    /// Deserialises the signed document, checking its type and schema but
    /// *not* its signatures.
    pub fn parse_unverified<D: Document>(&self) -> Result<D, VerifyError> {
        let found = self.doc_type().unwrap_or("<none>");
        if found != D::TYPE {
            return Err(VerifyError::WrongType {
                expected: D::TYPE.into(),
                found: found.into(),
            });
        }
        let schema = self.signed.get("schema").and_then(Value::as_u64);
        if schema != Some(u64::from(SCHEMA_VERSION)) {
            return Err(VerifyError::UnsupportedSchema {
                found: schema.map_or(0, |s| s as u32),
                supported: SCHEMA_VERSION,
            });
        }
        D::deserialize(&self.signed).map_err(|e| VerifyError::Malformed(e.to_string()))
    }

    /// Checks that at least `role.threshold` distinct keys of `role` signed
    /// this envelope. Signatures by other keys are ignored if the threshold
    /// is met; otherwise the most telling problem is returned.
    pub fn check_role(
        &self,
        doc_type: &str,
        role_name: &str,
        role: &RoleKeys,
        keys: &BTreeMap<KeyId, PublicKey>,
    ) -> Result<(), VerifyError> {
        let message = signing_input(doc_type, &self.signed);
        let mut valid = BTreeSet::new();
        let mut bad_signature = None;
        let mut bad_encoding = None;
        let mut unknown = None;
        for entry in &self.signatures {
            let key = entry
                .keyid
                .parse::<KeyId>()
                .ok()
                .filter(|id| role.keyids.contains(id))
                .and_then(|id| keys.get(&id).map(|key| (id, key)));
            let Some((id, key)) = key else {
                unknown.get_or_insert_with(|| entry.keyid.clone());
                continue;
            };
            match decode_signature(&entry.sig) {
                Err(e) => {
                    bad_encoding.get_or_insert((entry.keyid.clone(), e.to_string()));
                }
                Ok(sig) if key.verify(&message, &sig) => {
                    valid.insert(id);
                }
                Ok(_) => {
                    bad_signature.get_or_insert_with(|| entry.keyid.clone());
                }
            }
        }
        if valid.len() >= role.threshold as usize && role.threshold > 0 {
            return Ok(());
        }
        if let Some(keyid) = bad_signature {
            return Err(VerifyError::BadSignature { keyid });
        }
        if let Some((keyid, reason)) = bad_encoding {
            return Err(VerifyError::BadSignatureEncoding { keyid, reason });
        }
        if let Some(keyid) = unknown {
            return Err(VerifyError::UnknownKey {
                keyid,
                role: role_name.into(),
            });
        }
        Err(VerifyError::ThresholdNotMet {
            role: role_name.into(),
            valid: valid.len(),
            required: role.threshold,
        })
    }
}

/// The keys allowed to sign for one role, and how many must.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    pub keyids: Vec<KeyId>,
    pub threshold: u32,
}

/// The root of trust: root keys (offline) and desired-state keys (online).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootDocument {
    #[serde(rename = "type")]
    pub doc_type: String,
    pub schema: u32,
    /// Starts at 1; each rotation adds exactly 1.
    pub version: u64,
    /// Unix seconds after which this root is no longer trusted.
    pub expires: u64,
    /// Every key any role refers to.
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// Keys that sign root documents.
    pub root: RoleKeys,
    /// Keys that sign desired-state documents (the fleet server's keys).
    pub desired: RoleKeys,
}

impl Document for RootDocument {
    const TYPE: &'static str = "root";
}

impl RootDocument {
    /// A root document trusting `root_keys` (with `root_threshold`) and
    /// `desired_keys` (threshold 1).
    pub fn new(
        version: u64,
        expires: u64,
        root_keys: &[PublicKey],
        root_threshold: u32,
        desired_keys: &[PublicKey],
    ) -> Self {
        let mut keys = BTreeMap::new();
        for key in root_keys.iter().chain(desired_keys) {
            keys.insert(key.key_id(), *key);
        }
        Self {
            doc_type: Self::TYPE.into(),
            schema: SCHEMA_VERSION,
            version,
            expires,
            keys,
            root: RoleKeys {
                keyids: root_keys.iter().map(PublicKey::key_id).collect(),
                threshold: root_threshold,
            },
            desired: RoleKeys {
                keyids: desired_keys.iter().map(PublicKey::key_id).collect(),
                threshold: 1,
            },
        }
    }

    /// Structural checks: every role key is listed, ids match their keys,
    /// thresholds are reachable.
    pub fn validate(&self) -> Result<(), VerifyError> {
        let invalid = |m: String| Err(VerifyError::InvalidRoot(m));
        if self.version == 0 {
            return invalid("version must start at 1".into());
        }
        for (id, key) in &self.keys {
            if key.key_id() != *id {
                return invalid(format!("key id {id} does not match its public key"));
            }
        }
        for (name, role) in [("root", &self.root), ("desired", &self.desired)] {
            let distinct: BTreeSet<_> = role.keyids.iter().collect();
            if role.threshold == 0 || role.threshold as usize > distinct.len() {
                return invalid(format!(
                    "{name} role threshold {} is not between 1 and its {} distinct key(s)",
                    role.threshold,
                    distinct.len()
                ));
            }
            if let Some(missing) = role.keyids.iter().find(|id| !self.keys.contains_key(id)) {
                return invalid(format!("{name} role names unknown key {missing}"));
            }
        }
        Ok(())
    }

    /// Verifies a root document that is trusted by being pinned (flashed
    /// onto the device) and acted on as it is, without a chain to walk:
    /// well formed, signed by a threshold of its own root keys and not
    /// expired at `now`.
    pub fn verify_initial(envelope: &Signed, now: u64) -> Result<Self, VerifyError> {
        let doc = Self::verify_pinned(envelope)?;
        doc.check_unexpired(now)?;
        Ok(doc)
    }

    /// Verifies a pinned root as the anchor of a chain walk: well formed
    /// and signed by a threshold of its own root keys, expired or not.
    /// A device that was switched off past its root's expiry must still
    /// be able to walk forward from it ([`RootDocument::walk_chain`]
    /// checks the expiry of the root it ends at), and the fleet server
    /// must still be able to renew it. Nothing may be verified against
    /// the returned root before [`RootDocument::check_unexpired`].
    pub fn verify_pinned(envelope: &Signed) -> Result<Self, VerifyError> {
        let doc: Self = envelope.parse_unverified()?;
        doc.validate()?;
        envelope.check_role(Self::TYPE, "root", &doc.root, &doc.keys)?;
        Ok(doc)
    }

    /// Refuses this root if it has expired at `now`.
    pub fn check_unexpired(&self, now: u64) -> Result<(), VerifyError> {
        if now >= self.expires {
            return Err(VerifyError::RootExpired {
                version: self.version,
                expires: self.expires,
                now,
            });
        }
        Ok(())
    }

    /// Walks `chain` (root envelopes in any order; versions up to this
    /// one's are ignored) forward from this trusted root and returns the
    /// roots accepted, oldest first, and why the walk stopped short.
    ///
    /// The expiry rule, as in TUF's client workflow (specification
    /// 5.3.4-5.3.10): each link is checked for its version (exactly one
    /// more) and its signatures (a threshold of the previous root's root
    /// keys *and* of its own), but not for expiry, so a device can walk
    /// from an expired root over expired intermediate ones. Only the
    /// newest root reached, the one the device ends up trusting, must be
    /// unexpired at `now`: if it is not, the walk still reports every
    /// root accepted (they are validly signed and the device must never
    /// move backward; a newer root may have revoked a key) with
    /// [`VerifyError::RootExpired`], and [`DesiredState::verify`] refuses
    /// everything signed under it until a fresh root arrives (a freeze:
    /// an attacker replaying an old chain cannot keep a device acting on
    /// stale trust).
    pub fn walk_chain<'a>(&self, chain: &'a [Signed], now: u64) -> ChainWalk<'a> {
        let mut ordered: Vec<(u64, &Signed)> = chain
            .iter()
            .map(|env| {
                let version = env.signed.get("version").and_then(Value::as_u64);
                (version.unwrap_or(0), env)
            })
            .filter(|(version, _)| *version > self.version)
            .collect();
        ordered.sort_by_key(|(version, _)| *version);
        let mut accepted: Vec<(&Signed, RootDocument)> = Vec::new();
        for (_, env) in ordered {
            let trusted = accepted.last().map_or(self, |(_, doc)| doc);
            match trusted.verify_successor(env) {
                Ok(next) => accepted.push((env, next)),
                Err(error) => {
                    return ChainWalk {
                        accepted,
                        error: Some(error),
                    }
                }
            }
        }
        let newest = accepted.last().map_or(self, |(_, doc)| doc);
        let error = newest.check_unexpired(now).err();
        ChainWalk { accepted, error }
    }

    /// Verifies the next root in the chain: exactly one version newer,
    /// signed by a threshold of this root's root keys *and* of its own.
    /// Its expiry is not checked (see [`RootDocument::walk_chain`]).
    pub fn verify_successor(&self, envelope: &Signed) -> Result<Self, VerifyError> {
        let next: Self = envelope.parse_unverified()?;
        if next.version != self.version + 1 {
            return Err(VerifyError::RootVersion {
                trusted: self.version,
                offered: next.version,
            });
        }
        next.validate()?;
        envelope.check_role(Self::TYPE, "root (previous)", &self.root, &self.keys)?;
        envelope.check_role(Self::TYPE, "root", &next.root, &next.keys)?;
        Ok(next)
    }

    /// Public keys of the desired-state role.
    pub fn desired_keys(&self) -> impl Iterator<Item = (&KeyId, &PublicKey)> {
        self.desired
            .keyids
            .iter()
            .filter_map(|id| self.keys.get_key_value(id))
    }
}

/// The outcome of [`RootDocument::walk_chain`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChainWalk<'a> {
    /// The roots accepted, oldest first, each with its envelope (to
    /// persist): every one follows the one before it (the first follows
    /// the root the walk started from).
    pub accepted: Vec<(&'a Signed, RootDocument)>,
    /// Why the walk stopped short: a broken link, or
    /// [`VerifyError::RootExpired`] when the newest root reached (or the
    /// starting one, if none was accepted) has expired.
    pub error: Option<VerifyError>,
}

/// Model file formats the agent can load.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Onnx,
    Tflite,
}

impl ModelFormat {
    /// The format implied by a file name's extension.
    pub fn from_path(path: &std::path::Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "onnx" => Some(Self::Onnx),
            "tflite" => Some(Self::Tflite),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Onnx => "onnx",
            Self::Tflite => "tflite",
        }
    }
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

impl std::str::FromStr for ModelFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "onnx" => Ok(Self::Onnx),
            "tflite" => Ok(Self::Tflite),
            other => Err(format!(
                "unknown model format {other:?} (expected onnx or tflite)"
            )),
        }
    }
}

/// Name, datatype (Open Inference Protocol names: `FP32`, `INT64`, ...) and
/// shape of one model input or output; `-1` marks a dynamic dimension.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// A tensor's values inside a signed test vector.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<u64>,
    pub data: Vec<f64>,
}

/// An input and the output the model must produce for it on the device,
/// within `tolerance` (absolute, per element).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestVector {
    pub inputs: Vec<TestTensor>,
    pub expected: Vec<TestTensor>,
    pub tolerance: f64,
}

impl TestVector {
    /// The inputs' names, datatypes and shapes, as an interface
    /// declaration (shape hints for runtimes that need fixed shapes).
    pub fn input_specs(&self) -> Vec<TensorSpec> {
        self.inputs
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                datatype: t.datatype.clone(),
                shape: t.shape.iter().map(|&d| d as i64).collect(),
            })
            .collect()
    }
}

/// One model a device should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSlot {
    pub name: String,
    /// Monotonic per model name.
    pub version: u64,
    pub format: ModelFormat,
    /// Lowercase hex SHA-256 of the model file.
    pub sha256: String,
    /// Exact size of the model file in bytes; downloads stop here.
    pub size: u64,
    /// Where to download it, tried in order.
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<TensorSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<TensorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_vector: Option<TestVector>,
    /// Watch the version this long after activation and roll it back on a
    /// breach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<SoakPolicy>,
    /// Queue every inference result of this model for upload to the fleet
    /// server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub upload_results: bool,
    /// A zstd-compressed copy to download instead; `sha256` and `size`
    /// still describe the model itself, checked after decompression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd: Option<Compressed>,
    /// A candidate version to run in shadow beside this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::quality::ShadowSpec>,
    /// An A/B test: a share of client keys served by a second version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<crate::quality::SplitSpec>,
    /// Input and output features to bin per telemetry interval for drift
    /// monitoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<crate::quality::DriftSpec>,
}

/// How long a newly activated version is watched, and what rolls it back.
/// Limits apply once `min_requests` requests were served; the ratios
/// compare with the previous version's last figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoakPolicy {
    pub secs: u64,
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Highest error rate allowed (0.05 = 5 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// Highest error rate allowed relative to the previous version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate_ratio: Option<f64>,
    /// Highest 95th-percentile latency allowed, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_us: Option<u64>,
    /// Highest 95th-percentile latency relative to the previous version's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p95_ratio: Option<f64>,
}

fn default_min_requests() -> u64 {
    20
}

impl SoakPolicy {
    fn validate(&self) -> Result<(), String> {
        let positive = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v >= 0.0);
        if !(positive(self.max_error_rate)
            && positive(self.max_error_rate_ratio)
            && positive(self.max_p95_ratio))
        {
            return Err("soak limits must be finite and >= 0".into());
        }
        if self.secs > 30 * 86_400 {
            return Err("soak period longer than 30 days".into());
        }
        Ok(())
    }
}

impl ModelSlot {
    fn validate(&self) -> Result<(), String> {
        validate_name("model name", &self.name).map_err(|e| e.to_string())?;
        if !crate::quality::is_sha256_hex(&self.sha256) {
            return Err(format!(
                "model {}: sha256 must be 64 lowercase hex characters",
                self.name
            ));
        }
        if self.size == 0 {
            return Err(format!("model {}: size must be positive", self.name));
        }
        if self.urls.is_empty() {
            return Err(format!("model {}: no download URL", self.name));
        }
        if let Some(z) = &self.zstd {
            if z.size == 0 || z.urls.is_empty() {
                return Err(format!(
                    "model {}: a compressed copy needs a positive size and a URL",
                    self.name
                ));
            }
        }
        if let Some(soak) = &self.soak {
            soak.validate()
                .map_err(|e| format!("model {}: {e}", self.name))?;
        }
        if let Some(shadow) = &self.shadow {
            shadow.validate(&self.name)?;
        }
        if let Some(split) = &self.split {
            split.validate(&self.name)?;
        }
        if let Some(drift) = &self.drift {
            drift.validate(&self.name)?;
        }
        if let Some(tv) = &self.test_vector {
            if !(tv.tolerance.is_finite() && tv.tolerance >= 0.0) {
                return Err(format!(
                    "model {}: test vector tolerance must be >= 0",
                    self.name
                ));
            }
        }
        Ok(())
    }
}

/// What one device should run, signed by the fleet server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    #[serde(rename = "type")]
    pub doc_type: String,
    pub schema: u32,
    pub device_id: DeviceId,
    /// Only ever increases for a device.
    pub version: u64,
    /// Unix seconds when the server signed it.
    pub issued_at: u64,
    /// Unix seconds after which the device must not act on it.
    pub expires: u64,
    pub models: Vec<ModelSlot>,
    /// The agent release to run; absent: keep the agent that runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSlot>,
}

impl Document for DesiredState {
    const TYPE: &'static str = "desired";
}

impl DesiredState {
    pub fn new(
        device_id: DeviceId,
        version: u64,
        issued_at: u64,
        expires: u64,
        models: Vec<ModelSlot>,
    ) -> Self {
        Self {
            doc_type: Self::TYPE.into(),
            schema: SCHEMA_VERSION,
            device_id,
            version,
            issued_at,
            expires,
            models,
            agent: None,
        }
    }

    /// The same document with `agent` as its agent slot.
    pub fn with_agent(mut self, agent: Option<AgentSlot>) -> Self {
        self.agent = agent;
        self
    }

    /// Verifies an envelope for `device` against the trusted `root` at time
    /// `now`: the root itself unexpired, signatures by the desired role,
    /// the device id, expiry and the model slots' structure. Freshness against what the device already
    /// trusts is [`DesiredState::check_newer_than`].
    pub fn verify(
        envelope: &Signed,
        root: &RootDocument,
        device: &DeviceId,
        now: u64,
    ) -> Result<Self, VerifyError> {
        let doc: Self = envelope.parse_unverified()?;
        root.check_unexpired(now)?;
        envelope.check_role(Self::TYPE, "desired", &root.desired, &root.keys)?;
        if doc.device_id != *device {
            return Err(VerifyError::WrongDevice {
                expected: device.to_string(),
                found: doc.device_id.to_string(),
            });
        }
        if now >= doc.expires {
            return Err(VerifyError::Expired {
                expires: doc.expires,
                now,
            });
        }
        let mut names = BTreeSet::new();
        for slot in &doc.models {
            slot.validate().map_err(VerifyError::InvalidDesired)?;
            if !names.insert(slot.name.as_str()) {
                return Err(VerifyError::InvalidDesired(format!(
                    "model {} appears twice",
                    slot.name
                )));
            }
        }
        if let Some(agent) = &doc.agent {
            agent
                .validate()
                .map_err(|e| VerifyError::InvalidDesired(e.0))?;
        }
        Ok(doc)
    }

    /// Refuses a document whose version is not above the trusted one.
    pub fn check_newer_than(&self, trusted: Option<u64>) -> Result<(), VerifyError> {
        match trusted {
            Some(trusted) if self.version <= trusted => Err(VerifyError::Rollback {
                trusted,
                offered: self.version,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
