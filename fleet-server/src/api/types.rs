//! The request and response bodies of the HTTP API under `/api/v1`: what
//! the handlers take and answer, what the OpenAPI document describes, and
//! what typed clients (`fleetctl`) deserialize. Store and planner records
//! appear inside them where they already are the shape the API sends.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::TokenRecord;

// The records and planner types the bodies hold, so that a client finds
// every type it reads or sends here.
pub use crate::auth::{Scope, TokenRecord as Token};
pub use crate::rollout::{DeviceState, FailureAction, Gates, Phase, Selection, WaveSize};
pub use crate::store::{
    AgentBuildRecord, AuditRecord, DeviceRecord, EventRecord, ModelRecord, ModelSpec,
};
pub use edgefleet_shared::AgentStatus;
pub use edgefleet_shared::TestVector;

/// Every error answer: `{"error": "what went wrong and what to do"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /api/v1/health`: the server is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// One signature of a [`SignedEnvelope`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvelopeSignature {
    /// The signing key's id.
    pub keyid: String,
    /// Base64 ed25519 signature over the document's canonical bytes.
    pub sig: String,
}

/// A signed document (the root document, a device's desired state) in
/// the envelope devices verify: the document and its signatures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SignedEnvelope {
    /// The document; its `type` field says which kind it is.
    #[schema(value_type = Object)]
    pub signed: serde_json::Value,
    pub signatures: Vec<EnvelopeSignature>,
}

impl From<edgefleet_shared::Signed> for SignedEnvelope {
    fn from(s: edgefleet_shared::Signed) -> Self {
        Self {
            signed: s.signed,
            signatures: s
                .signatures
                .into_iter()
                .map(|e| EnvelopeSignature {
                    keyid: e.keyid,
                    sig: e.sig,
                })
                .collect(),
        }
    }
}

impl From<SignedEnvelope> for edgefleet_shared::Signed {
    fn from(s: SignedEnvelope) -> Self {
        Self {
            signed: s.signed,
            signatures: s
                .signatures
                .into_iter()
                .map(|e| edgefleet_shared::documents::SignatureEntry {
                    keyid: e.keyid,
                    sig: e.sig,
                })
                .collect(),
        }
    }
}

// ---- devices -------------------------------------------------------------------

/// `POST /api/v1/devices`: a device to enroll (or enroll again, which
/// gives it a new password).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub id: String,
    pub hardware: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The device's ed25519 public key (64 hex), when it made one already;
    /// otherwise the device registers its key with its new credentials.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// How an enrolled device reaches the broker. The password is in the
/// enrollment answer only; the server keeps its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MqttCredentials {
    pub url: String,
    pub topic_prefix: String,
    pub username: String,
    pub password: String,
    /// The private CA (PEM) for an `mqtts://` broker, if it has one.
    pub ca_pem: Option<String>,
}

/// The answer to an enrollment: everything a device bundle needs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrolledDevice {
    pub device: DeviceRecord,
    pub mqtt: MqttCredentials,
    /// The server's base URL (artifact downloads, key registration).
    pub server_url: String,
    /// The root document the device pins.
    pub root: SignedEnvelope,
}

/// Refused messages of one device: how many, and the latest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RejectedMessages {
    pub count: u64,
    pub last_reason: String,
    pub last_at: u64,
}

impl From<crate::device_keys::Rejections> for RejectedMessages {
    fn from(r: crate::device_keys::Rejections) -> Self {
        Self {
            count: r.count,
            last_reason: r.last_reason,
            last_at: r.last_at,
        }
    }
}

/// `GET /api/v1/devices/{id}`: the device and, if the server refused any
/// of its messages, what it refused.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: DeviceRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_messages: Option<RejectedMessages>,
}

/// `PUT /api/v1/devices/{id}/tags`: the device's tags, replacing all
/// earlier ones. Keys and values are 1 to 64 of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
pub struct Tags(pub BTreeMap<String, String>);

/// `PUT /api/v1/devices/{id}/key`: the key the device's messages must be
/// signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetKeyRequest {
    /// The device's ed25519 public key, 64 hex characters.
    pub public_key: String,
}

/// `POST /api/v1/device-key`: a device registers the key it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterKeyRequest {
    pub device_id: String,
    /// 64 hex characters.
    pub public_key: String,
    /// Base64 ed25519 signature by the key over
    /// `edgefleet/v1/device-key\0{device_id}\0{public_key}`.
    pub proof: String,
}

/// The answer to a key registration: the key is the device's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegisteredKey {
    pub device_id: String,
    /// 64 hex characters.
    pub public_key: String,
}

/// `GET /api/v1/broker/mosquitto`: the files an external Mosquitto needs
/// to authenticate devices and keep each under its own topics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MosquittoFiles {
    /// `id:hash` lines of the enrolled, unrevoked devices.
    pub password_file: String,
    pub acl_file: String,
    /// The user the ACL lets read and write everywhere under the prefix.
    pub server_user: String,
}

/// One record a device streamed (a telemetry sample or an inference
/// result), as the device sent it, plus when the server received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamedRecord {
    /// The device's sequence number (`after_seq` pages by it).
    pub seq: u64,
    /// When the device made it (unix seconds).
    pub at: u64,
    /// When the server received it (unix seconds).
    pub received_at: i64,
    /// The rest of the record as the device sent it.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// `GET /api/v1/devices/{id}/telemetry`: a page of a device's telemetry,
/// oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceTelemetry {
    pub device_id: String,
    pub telemetry: Vec<StreamedRecord>,
}

/// `GET /api/v1/devices/{id}/results`: a page of a device's uploaded
/// inference results, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceResults {
    pub device_id: String,
    pub results: Vec<StreamedRecord>,
}

// ---- models and deployments ----------------------------------------------------

/// `POST /api/v1/deployments`: a model version for some devices. Give
/// exactly one of `devices`, `all` or `tags`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeployRequest {
    pub model: String,
    pub version: u64,
    /// These devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every device, including ones that enroll later.
    #[serde(default)]
    pub all: bool,
    /// The devices that have all these tags now (a selection made at
    /// deployment time; devices tagged later are not included).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Which kind of selection a deployment made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentScope {
    All,
    Devices,
    Tags,
}

/// One device whose new signed desired state was published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PublishedDesired {
    pub device: String,
    pub desired_version: u64,
}

/// The answer to a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    pub model: String,
    pub version: u64,
    pub scope: DeploymentScope,
    pub published: Vec<PublishedDesired>,
}

// ---- agent releases ------------------------------------------------------------

/// An agent release: its version and one build per target triple.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentRelease {
    /// The release's semantic version.
    pub version: String,
    /// Its builds, by target triple.
    pub builds: Vec<AgentBuildRecord>,
}

/// `POST /api/v1/agent/deployments`: an agent release for some devices.
/// Give exactly one of `devices`, `all` or `tags`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentDeployRequest {
    /// The release's semantic version.
    pub version: String,
    /// These devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every device, including ones that enroll later.
    #[serde(default)]
    pub all: bool,
    /// The devices that have all these tags now.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Let devices that run a newer release go back to this one (they
    /// refuse an older release otherwise).
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// The answer to an agent deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentDeployment {
    pub version: String,
    pub allow_downgrade: bool,
    pub scope: DeploymentScope,
    /// The devices whose new signed desired state was published.
    pub published: Vec<PublishedDesired>,
}

// ---- operator tokens -----------------------------------------------------------

/// `POST /api/v1/tokens`: a new operator token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTokenRequest {
    /// 1 to 64 printable characters.
    pub name: String,
    pub scope: Scope,
}

/// The answer to a token's creation: its record and, only here, the
/// token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub record: TokenRecord,
    /// `eft_<id>_<secret>`; the server keeps only its hash.
    pub token: String,
}

// ---- rollouts ------------------------------------------------------------------

/// `POST /api/v1/rollouts`: the rollout driver's own request type.
pub use crate::rollout::CreateRollout;

/// A rollout in brief: what it moves, its phase (and why it paused),
/// device counts per state in all and per wave, and its gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutSummary {
    pub id: String,
    /// The model a model rollout moves (empty in an agent rollout).
    pub model: String,
    /// The model version (0 in an agent rollout).
    pub version: u64,
    /// The agent release an agent rollout moves devices to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    pub created_at: u64,
    #[schema(value_type = crate::rollout::schemas::Selection)]
    pub selection: Selection,
    #[schema(value_type = crate::rollout::schemas::Phase)]
    pub phase: Phase,
    /// Per wave: its `size` and its devices per state (states with no
    /// device left out).
    pub wave_counts: Vec<BTreeMap<String, usize>>,
    /// Devices per state (states with no device left out).
    pub counts: BTreeMap<String, usize>,
    #[schema(value_type = crate::rollout::schemas::Gates)]
    pub gates: Gates,
    /// Per wave, its shadow run under the shadow gate: `started`,
    /// `devices` asked, `compared`, `agreed`, `errors`, `passed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub shadow: Vec<crate::rollout::WaveShadow>,
}

/// A rollout's status: its summary and, unless asked for in brief, the
/// devices of each wave and every device's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutStatus {
    #[serde(flatten)]
    pub summary: RolloutSummary,
    /// The devices of each wave, in canary order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<Vec<String>>>,
    /// Every device's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, crate::rollout::schemas::DeviceState>>)]
    pub devices: Option<BTreeMap<String, DeviceState>>,
}

impl RolloutSummary {
    /// The brief status of a stored rollout.
    pub fn of(record: &crate::rollout::RolloutRecord) -> Self {
        let named = |counts: BTreeMap<&'static str, usize>| {
            counts
                .into_iter()
                .map(|(state, n)| (state.to_string(), n))
                .collect::<BTreeMap<_, _>>()
        };
        Self {
            id: record.plan.id.clone(),
            model: record.model.clone(),
            version: record.version,
            agent: record.agent.as_ref().map(|a| a.version.clone()),
            created_at: record.created_at,
            selection: record.selection.clone(),
            phase: record.plan.phase.clone(),
            wave_counts: record.plan.wave_summary().into_iter().map(named).collect(),
            counts: named(record.plan.summary()),
            gates: record.plan.gates.clone(),
            shadow: record.plan.shadow.clone(),
        }
    }
}

impl RolloutStatus {
    /// The status of a stored rollout; `brief` leaves out the waves'
    /// devices and every device's state.
    pub fn of(record: &crate::rollout::RolloutRecord, brief: bool) -> Self {
        Self {
            summary: RolloutSummary::of(record),
            waves: (!brief).then(|| record.plan.plan()),
            devices: (!brief).then(|| record.plan.devices.clone()),
        }
    }
}

/// Drift monitoring's bodies ([`crate::drift`]).
pub use super::drift::{ReferenceSet, TrafficPeriod};
pub use crate::drift::view::{
    ClassScore, DeviceScore, FeatureScore, ModelDrift, ReferenceSummary, Score, VersionDrift,
};

pub use super::quality::{
    PromoteRequest, QualityChanged, QualityTarget, ShadowRequest, SplitRequest,
};
pub use crate::quality::{ModelQuality, ShadowFigures, VersionFigures};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Rollout;
    use crate::rollout::RolloutRecord;
    use serde_json::json;

    /// A stored rollout of three devices in two waves, the first device
    /// failed.
    fn record() -> RolloutRecord {
        let devices = vec!["cam-1".to_string(), "cam-2".into(), "cam-3".into()];
        let mut plan = Rollout::new(
            "r1",
            devices,
            vec![WaveSize::Count(1), WaveSize::Percent(100.0)],
            Gates::default(),
        );
        let first = plan.order[0].clone();
        plan.devices.insert(
            first,
            DeviceState::Failed {
                reason: "refused".into(),
            },
        );
        serde_json::from_value(json!({
            "model": "digits",
            "version": 2,
            "previous": {},
            "created_at": 1_700_000_000u64,
            "selection": {"tags": {"site": "north"}},
            "plan": plan,
        }))
        .expect("a rollout record reads")
    }

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn rollout_status_has_the_fields_the_api_always_sent() {
        let record = record();
        let brief = serde_json::to_value(RolloutStatus::of(&record, true)).unwrap();
        assert_eq!(
            keys(&brief),
            [
                "counts",
                "created_at",
                "gates",
                "id",
                "model",
                "phase",
                "selection",
                "version",
                "wave_counts"
            ]
        );
        assert_eq!(brief["id"], "r1");
        assert_eq!(brief["phase"], json!({"phase": "created"}));
        assert_eq!(brief["counts"], json!({"failed": 1, "waiting": 2}));
        assert_eq!(brief["wave_counts"][1]["size"], 2);
        assert_eq!(
            brief["selection"],
            json!({"all": false, "tags": {"site": "north"}, "hardware": null, "devices": []})
        );
        assert_eq!(brief["gates"]["success_pct"], 95.0);
        assert_eq!(
            brief,
            serde_json::to_value(RolloutSummary::of(&record)).unwrap()
        );

        let full = serde_json::to_value(RolloutStatus::of(&record, false)).unwrap();
        assert_eq!(keys(&full).len(), 11);
        assert_eq!(full["waves"].as_array().map(Vec::len), Some(2));
        assert_eq!(full["waves"][0], json!([record.plan.order[0]]));
        assert_eq!(
            full["devices"][record.plan.order[0].as_str()],
            json!({"state": "failed", "reason": "refused"})
        );
        assert_eq!(
            full["devices"][record.plan.order[1].as_str()],
            json!({"state": "waiting"})
        );
    }

    #[test]
    fn rollout_status_reads_back_as_clients_get_it() {
        let status = RolloutStatus::of(&record(), false);
        let text = serde_json::to_string(&status).unwrap();
        assert_eq!(
            serde_json::from_str::<RolloutStatus>(&text).unwrap(),
            status
        );
        let brief = RolloutStatus::of(&record(), true);
        let text = serde_json::to_string(&brief).unwrap();
        let back: RolloutStatus = serde_json::from_str(&text).unwrap();
        assert_eq!((back.waves, back.devices), (None, None));
        assert_eq!(
            serde_json::from_str::<RolloutSummary>(&text).unwrap(),
            brief.summary
        );
    }

    #[test]
    fn rollout_requests_read_every_field_and_refuse_unknown_ones() {
        let driver: CreateRollout = serde_json::from_value(json!({
            "id": "r2", "model": "digits", "version": 3, "hardware": "rpi4",
            "ramp": [2, 3.0], "gates": {"soak_secs": 30}, "dry_run": true
        }))
        .unwrap();
        assert_eq!(driver.id, "r2");
        assert_eq!(driver.hardware.as_deref(), Some("rpi4"));
        assert_eq!(driver.ramp, Some((2, 3.0)));
        assert_eq!(driver.gates.map(|g| g.soak_secs), Some(30));
        assert!(driver.dry_run);
        let unknown = serde_json::from_value::<CreateRollout>(
            json!({"id": "r", "model": "m", "version": 1, "wave": []}),
        );
        assert!(unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `wave`"));
    }

    #[test]
    fn device_detail_is_the_record_plus_refusals() {
        let mut detail = DeviceDetail {
            device: DeviceRecord::new("cam-1"),
            rejected_messages: None,
        };
        let plain = serde_json::to_value(&detail).unwrap();
        assert_eq!(plain, serde_json::to_value(&detail.device).unwrap());
        detail.rejected_messages = Some(RejectedMessages {
            count: 2,
            last_reason: "bad signature".into(),
            last_at: 9,
        });
        let v = serde_json::to_value(&detail).unwrap();
        assert_eq!(v["id"], "cam-1");
        assert_eq!(v["rejected_messages"]["count"], 2);
        let back: DeviceDetail = serde_json::from_value(v).unwrap();
        assert_eq!(back.rejected_messages, detail.rejected_messages);
    }

    #[test]
    fn signed_envelopes_convert_both_ways() {
        let signed = edgefleet_shared::Signed {
            signed: json!({"type": "root", "version": 1}),
            signatures: vec![edgefleet_shared::documents::SignatureEntry {
                keyid: "k".into(),
                sig: "s".into(),
            }],
        };
        let envelope = SignedEnvelope::from(signed.clone());
        assert_eq!(
            serde_json::to_value(&envelope).unwrap(),
            serde_json::to_value(&signed).unwrap()
        );
        assert_eq!(edgefleet_shared::Signed::from(envelope), signed);
    }
}
