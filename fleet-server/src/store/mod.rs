//! The fleet's records: devices and what they report, models, agent
//! releases, assignments (which model version and which agent release a
//! device or the whole fleet should run), signed desired state per device,
//! update events, telemetry and uploaded results.
//!
//! [`Store`] is a cloneable handle on one [`StoreBackend`] (`backend.rs`:
//! one method per operation, named for what the server does, each run as
//! a single transaction). Two backends implement it: SQLite (the embedded
//! default, one file, WAL; [`sqlite`]) and PostgreSQL (for fleets that
//! outgrow one machine, or several server processes; [`postgres`]). They
//! differ only in SQL dialect and driver calls: the column lists and row
//! mapping (`rows.rs`), filter and paging queries (`filter.rs`) and the
//! numbered schema migrations (`migrations.rs`) are shared, and both pass
//! the same test suite (`tests.rs`; upgrades of existing databases in
//! `upgrade_tests.rs`).

mod backend;
mod filter;
mod migrations;
pub mod postgres;
pub mod quality;
mod rows;
mod sessions;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod upgrade_tests;

pub use backend::{StoreBackend, StoreFuture};
pub use sessions::{ArrivalKey, DashboardSession, SessionRules};

use edgefleet_shared::{
    AgentStatus, InferenceResult, ModelFormat, ModelStatus, StatusMessage, TelemetryMessage,
    UpdateEvent,
};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database error: {0}")]
    Postgres(String),
    #[error("cannot open database {what}: {reason}")]
    Open { what: String, reason: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("store task failed: {0}")]
    Task(String),
}

/// Assignment scope meaning "every device".
pub const ALL_DEVICES: &str = "*";

/// A model version in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelRecord {
    pub name: String,
    pub version: u64,
    pub format: ModelFormat,
    pub sha256: String,
    pub size: u64,
    pub created_at: u64,
    /// Input and the outputs the model must produce for it, sent to
    /// devices in the signed slot; a device never serves a version that
    /// fails it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_vector: Option<edgefleet_shared::TestVector>,
    /// Declared inputs and outputs, sent in the signed slot: devices check
    /// the model against them and use fixed dimensions as shape hints.
    #[serde(default, skip_serializing_if = "ModelSpec::is_empty")]
    pub spec: ModelSpec,
    /// The operator (token name) who pushed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_by: Option<String>,
    /// Free text from the push (`fleetctl model push --notes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// A model's declared interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default)]
    pub inputs: Vec<edgefleet_shared::TensorSpec>,
    #[serde(default)]
    pub outputs: Vec<edgefleet_shared::TensorSpec>,
}

impl ModelSpec {
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty()
    }
}

/// A device as the server knows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceRecord {
    pub id: String,
    pub first_seen: u64,
    pub last_seen: u64,
    pub online: bool,
    pub agent_version: String,
    pub reported_desired_version: Option<u64>,
    pub models: Vec<ModelStatus>,
    pub desired_version: u64,
    /// Set at enrollment (`fleetctl devices enroll --hardware`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_at: Option<u64>,
    /// Set when revoked: the device's credentials no longer work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
    /// The device's ed25519 public key (hex): every message it sends must
    /// be signed by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The agent the device last reported running: its target triple and
    /// release (no release: the packaged executable). Absent until an
    /// agent that reports it connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
}

impl DeviceRecord {
    /// A device the server has heard nothing from yet: `id`, every other
    /// field empty.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            first_seen: 0,
            last_seen: 0,
            online: false,
            agent_version: String::new(),
            reported_desired_version: None,
            models: Vec::new(),
            desired_version: 0,
            hardware: None,
            tags: Default::default(),
            enrolled_at: None,
            revoked_at: None,
            public_key: None,
            agent: None,
        }
    }
}

/// Which devices a listing returns: all the given tags, the hardware
/// class and online state if given, ids after `after` (paging), at most
/// `limit`.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub tags: Vec<(String, String)>,
    pub hardware: Option<String>,
    pub online: Option<bool>,
    pub after: Option<String>,
    pub limit: u32,
}

/// A device's enrollment: what the operator declared and the hash of the
/// credential it was given.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub id: String,
    pub hardware: String,
    pub tags: std::collections::BTreeMap<String, String>,
    /// The password's Mosquitto-format hash (see [`crate::auth`]).
    pub credential: String,
    /// The device's public key when the operator knows it already;
    /// otherwise the device registers one (and any earlier key is dropped:
    /// enrolling again is a rotation).
    pub public_key: Option<String>,
}

/// Who is setting a device's public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyWrite {
    /// An operator: replaces any key; the device must exist.
    Operator,
    /// The device itself (registration with its enrollment credentials,
    /// or first use on an open fleet): only while it has no key, and only
    /// for a device the store has.
    FirstOnly,
}

/// A stored update event.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventRecord {
    pub device_id: String,
    pub seq: u64,
    pub at: u64,
    pub kind: String,
    pub desired_version: Option<u64>,
    pub model: Option<String>,
    pub model_version: Option<u64>,
    pub reason: Option<String>,
    /// The agent release the event is about (agent updates; `model` is
    /// then absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// One build of an agent release: the executable for one target triple,
/// stored in the artifact store under its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentBuildRecord {
    /// The release's semantic version (`MAJOR.MINOR.PATCH[-PRE]`).
    pub version: String,
    /// The target triple it was built for (`aarch64-unknown-linux-musl`).
    pub target: String,
    /// Lowercase hex SHA-256 of the executable.
    pub sha256: String,
    pub size: u64,
    pub created_at: u64,
    /// The operator (token name) who pushed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_by: Option<String>,
    /// Free text from the push (`fleetctl agent push --notes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// The agent release a device should run (its own assignment, else the
/// fleet-wide one) with every build of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedAgent {
    pub version: String,
    /// Whether the device may go to it from a newer release.
    pub allow_downgrade: bool,
    /// Every build of the release, by target.
    pub builds: Vec<AgentBuildRecord>,
}

/// What a device's desired state is signed from: its models and its
/// agent release.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DesiredContent {
    pub models: Vec<ModelRecord>,
    pub agent: Option<AssignedAgent>,
    /// Shadow candidates and A/B splits, per model name.
    pub quality: quality::DeviceQuality,
}

impl DesiredContent {
    /// Nothing is assigned: no document to sign.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty() && self.agent.is_none()
    }
}

/// A record a device streams: one telemetry sample or one inference result.
#[derive(Debug, Clone)]
pub enum Streamed {
    Telemetry(TelemetryMessage),
    Result(InferenceResult),
}

/// Which stored records to read: sequence numbers after `after_seq`,
/// oldest first, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub after_seq: Option<u64>,
    pub limit: u32,
}

/// One operator action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub at: u64,
    /// The token that made the call (`None`: the server itself).
    pub token_id: Option<String>,
    /// The token's name at the time.
    pub actor: String,
    /// What was done (`model.push`, `deploy`, `token.create`, ...).
    pub action: String,
    /// What it was done to (`digits@2`, a device id, a token id).
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// A stored audit entry with its position in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub id: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

impl Streamed {
    /// The device's timestamp of the record (unix seconds).
    pub fn at(&self) -> u64 {
        match self {
            Self::Telemetry(t) => t.at,
            Self::Result(r) => r.at,
        }
    }
}

/// What a status message changed, and what the device should run.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusOutcome {
    /// The device was not known before.
    pub is_new: bool,
    /// For an online device: its current desired-state version and
    /// document (`None` before the first one was signed).
    pub desired: Option<(u64, Option<Vec<u8>>)>,
}

/// What a model version can carry besides its file.
#[derive(Debug, Clone)]
pub enum Attachment {
    Spec(ModelSpec),
    TestVector(edgefleet_shared::TestVector),
}

impl Attachment {
    pub fn what(&self) -> &'static str {
        match self {
            Self::Spec(_) => "spec",
            Self::TestVector(_) => "test vector",
        }
    }
}

/// Which devices a deployment points at a model version.
#[derive(Debug, Clone)]
pub enum Target {
    All,
    Devices(Vec<String>),
}

/// Signs a desired state: given what the device should run (its models
/// and agent release) and the document version the store allocated,
/// returns the signed JSON to store.
pub type SignFn = Box<dyn FnOnce(&DesiredContent, u64) -> Vec<u8> + Send>;

/// The fleet's database: a cheap, cloneable handle on one
/// [`StoreBackend`]. Every backend operation is called on it directly
/// (`store.get_device(id).await`, through `Deref`); the methods here are
/// opening a database and the operations composed of backend ones.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Store").field(&self.backend.name()).finish()
    }
}

impl std::ops::Deref for Store {
    type Target = dyn StoreBackend;

    fn deref(&self) -> &Self::Target {
        self.backend.as_ref()
    }
}

impl Store {
    /// Opens (creating and migrating) the database: a `postgres://` (or
    /// `postgresql://`) URL, or the path of an SQLite file.
    pub async fn open(database: &str) -> Result<Self, StoreError> {
        if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            Ok(Self::new(postgres::PgStore::connect(database).await?))
        } else {
            let path = std::path::PathBuf::from(database);
            Ok(Self::new(sqlite::SqliteStore::open(&path)?))
        }
    }

    /// A store over any backend (an in-memory fake in unit tests).
    pub fn new(backend: impl StoreBackend) -> Self {
        Self {
            backend: Arc::new(backend),
        }
    }

    /// The backend's name, for logs (`sqlite`, `postgres`).
    pub fn backend(&self) -> &'static str {
        self.backend.name()
    }

    /// Records a status message (stale online messages are ignored;
    /// offline last-will messages always mark the device offline).
    pub async fn record_status(
        &self,
        msg: &StatusMessage,
        now: u64,
    ) -> Result<StatusOutcome, StoreError> {
        let (outcomes, _) = self
            .record_messages(std::slice::from_ref(msg), &[], now)
            .await?;
        outcomes
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Task("no outcome for a recorded status".into()))
    }

    /// Stores an update event once (a redelivered copy is ignored);
    /// returns whether it was new.
    pub async fn record_event(&self, event: &UpdateEvent) -> Result<bool, StoreError> {
        let (_, new) = self
            .record_messages(
                &[],
                std::slice::from_ref(event),
                edgefleet_shared::unix_now(),
            )
            .await?;
        new.into_iter()
            .next()
            .ok_or_else(|| StoreError::Task("no outcome for a recorded event".into()))
    }

    /// Every device matching `filter` (its `after` and `limit` ignored),
    /// read page by page, by id.
    pub async fn find_all_devices(
        &self,
        filter: &DeviceFilter,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut page_filter = DeviceFilter {
            after: None,
            limit: 10_000,
            ..filter.clone()
        };
        let mut all = Vec::new();
        loop {
            let page = self.find_devices(&page_filter).await?;
            let Some(last) = page.last() else { break };
            page_filter.after = Some(last.id.clone());
            all.extend(page);
        }
        Ok(all)
    }

    /// The version of `model` each device runs by assignment (its own,
    /// else the fleet-wide one), `None` where none is assigned.
    pub async fn assigned_versions(
        &self,
        model: &str,
        devices: &[String],
    ) -> Result<BTreeMap<String, Option<u64>>, StoreError> {
        let mut out = BTreeMap::new();
        for d in devices {
            let version = self
                .models_for_device(d)
                .await?
                .into_iter()
                .find(|m| m.name == model)
                .map(|m| m.version);
            out.insert(d.clone(), version);
        }
        Ok(out)
    }
}

impl Store {
    /// The agent release each device runs by assignment (its own, else
    /// the fleet-wide one), `None` where none is assigned.
    pub async fn assigned_agent_releases(
        &self,
        devices: &[String],
    ) -> Result<BTreeMap<String, Option<String>>, StoreError> {
        let mut out = BTreeMap::new();
        for d in devices {
            let version = self.agent_for_device(d).await?.map(|a| a.version);
            out.insert(d.clone(), version);
        }
        Ok(out)
    }
}

/// A conflict: the version is deployed, so its attachments are fixed.
pub(crate) fn deployed_conflict(name: &str, version: u64, what: &str) -> StoreError {
    StoreError::Conflict(format!(
        "model {name} version {version} is already deployed; set its {what} before deploying (or push a new version)"
    ))
}

/// A conflict: the version is deployed, so it cannot be deleted.
pub(crate) fn deployed_model(name: &str, version: u64) -> StoreError {
    StoreError::Conflict(format!(
        "model {name} version {version} is deployed; deploy another version first"
    ))
}

/// The version to attach to, deploy or delete is not in the registry.
pub(crate) fn missing_model(name: &str, version: u64) -> StoreError {
    StoreError::NotFound(format!(
        "model {name} version {version} does not exist; push it first"
    ))
}

/// A different file pushed under an existing version.
pub(crate) fn changed_model(existing: &ModelRecord, m: &ModelRecord) -> StoreError {
    StoreError::Conflict(format!(
        "model {} version {} already exists with a different file (sha256 {}); push a new version",
        m.name, m.version, existing.sha256
    ))
}

/// A stored JSON body with its arrival time added.
pub(crate) fn with_received_at(
    received_at: i64,
    body: &str,
) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str::<serde_json::Value>(body)
        .map(|mut v| {
            v["received_at"] = received_at.into();
            v
        })
        .map_err(|e| StoreError::Task(e.to_string()))
}

/// The JSON a streamed record is stored as.
pub(crate) fn streamed_body(record: &Streamed) -> Result<String, StoreError> {
    match record {
        Streamed::Telemetry(t) => serde_json::to_string(t),
        Streamed::Result(r) => serde_json::to_string(r),
    }
    .map_err(|e| StoreError::Task(e.to_string()))
}
