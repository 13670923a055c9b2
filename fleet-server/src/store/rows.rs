//! What the backends share about rows: the column lists each record is
//! read with, the mapping from a row's values to the record types, and
//! the JSON text some columns hold. Both backends select these columns in
//! this order and hand their driver's row to the mappers through
//! [`Columns`], so a record reads the same from SQLite and PostgreSQL.
//!
//! Integers are stored as signed 64-bit (both databases' integer type) and
//! converted with `as`: every stored value was written from a `u64` the
//! same way, so the round trip is exact.

use std::collections::BTreeMap;

use edgefleet_shared::{AgentStatus, ModelFormat, ModelStatus, StatusMessage};

use crate::auth::{Scope, TokenRecord};

use super::{
    AgentBuildRecord, AuditEntry, AuditRecord, DeviceRecord, EventRecord, ModelRecord, StoreError,
    Streamed,
};

/// One result row's values by position, whichever driver produced it.
pub(crate) trait Columns {
    /// A non-null text column.
    fn text(&self, index: usize) -> Result<String, StoreError>;
    /// A nullable text column.
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError>;
    /// A non-null integer column.
    fn int(&self, index: usize) -> Result<i64, StoreError>;
    /// A nullable integer column.
    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError>;
    /// A true/false column (SQLite stores 0 and 1, PostgreSQL a BOOLEAN).
    fn flag(&self, index: usize) -> Result<bool, StoreError>;
    /// A nullable binary column.
    fn opt_bytes(&self, index: usize) -> Result<Option<Vec<u8>>, StoreError>;

    /// A non-null unsigned integer column.
    fn unsigned(&self, index: usize) -> Result<u64, StoreError> {
        Ok(self.int(index)? as u64)
    }

    /// A nullable unsigned integer column.
    fn opt_unsigned(&self, index: usize) -> Result<Option<u64>, StoreError> {
        Ok(self.opt_int(index)?.map(|v| v as u64))
    }
}

/// A `u64` as the database stores it.
pub(crate) fn stored(value: u64) -> i64 {
    value as i64
}

/// An optional `u64` as the database stores it.
pub(crate) fn stored_opt(value: Option<u64>) -> Option<i64> {
    value.map(stored)
}

// ---- devices ---------------------------------------------------------------

/// The columns [`device`] reads, in order.
pub(crate) const DEVICE_COLUMNS: &str = "id, first_seen, last_seen, online, agent_version, \
     reported_desired_version, models_json, desired_version, hardware, tags, enrolled_at, \
     revoked_at, device_key, agent_target, agent_release";

/// A device row (selected with [`DEVICE_COLUMNS`]). Unreadable JSON in
/// the models or tags column reads as empty: only this server writes them.
pub(crate) fn device(r: &dyn Columns) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        id: r.text(0)?,
        first_seen: r.unsigned(1)?,
        last_seen: r.unsigned(2)?,
        online: r.flag(3)?,
        agent_version: r.text(4)?,
        reported_desired_version: r.opt_unsigned(5)?,
        models: serde_json::from_str(&r.text(6)?).unwrap_or_default(),
        desired_version: r.unsigned(7)?,
        hardware: r.opt_text(8)?,
        tags: serde_json::from_str(&r.text(9)?).unwrap_or_default(),
        enrolled_at: r.opt_unsigned(10)?,
        revoked_at: r.opt_unsigned(11)?,
        public_key: r.opt_text(12)?,
        agent: match r.opt_text(13)? {
            Some(target) => Some(AgentStatus {
                target,
                release: r.opt_text(14)?,
            }),
            None => None,
        },
    })
}

/// The columns [`desired`] reads, in order.
pub(crate) const DESIRED_COLUMNS: &str = "desired_version, desired_json";

/// A device's desired-state version and document (selected with
/// [`DESIRED_COLUMNS`]; no document before the first one was signed).
pub(crate) fn desired(r: &dyn Columns) -> Result<(u64, Option<Vec<u8>>), StoreError> {
    Ok((r.unsigned(0)?, r.opt_bytes(1)?))
}

/// The JSON a device's tags are stored as.
pub(crate) fn tags_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).expect("a map of strings always serialises to JSON")
}

/// The JSON a device's reported models are stored as.
pub(crate) fn models_json(models: &[ModelStatus]) -> String {
    serde_json::to_string(models).expect("model statuses always serialise to JSON")
}

/// What an online status message writes into the device's row.
pub(crate) struct StatusUpdate {
    pub agent_version: String,
    pub reported_desired_version: Option<i64>,
    pub models_json: String,
    pub seq: i64,
    /// The reported agent's target triple and release (both absent when
    /// the agent does not say).
    pub agent_target: Option<String>,
    pub agent_release: Option<String>,
    /// The connection number the status names, if any.
    pub session: Option<i64>,
}

/// What recording `msg` changes, given the sequence number of the last
/// status applied to the device (`None`: the device is new).
pub(crate) enum StatusChange {
    /// A last will: the device goes offline, whatever its sequence number.
    Offline,
    /// A newer online status: the device's reported state is replaced.
    Online(StatusUpdate),
    /// An online status older than one already applied: nothing changes.
    Stale,
}

/// Decides what a status message changes (see [`StatusChange`]).
pub(crate) fn status_change(msg: &StatusMessage, last_seq: Option<u64>) -> StatusChange {
    if !msg.online {
        StatusChange::Offline
    } else if msg.seq > last_seq.unwrap_or(0) {
        StatusChange::Online(StatusUpdate {
            agent_version: msg.agent_version.clone(),
            reported_desired_version: stored_opt(msg.desired_version),
            models_json: models_json(&msg.models),
            seq: stored(msg.seq),
            agent_target: msg.agent.as_ref().map(|a| a.target.clone()),
            agent_release: msg.agent.as_ref().and_then(|a| a.release.clone()),
            session: msg.session.map(stored),
        })
    } else {
        StatusChange::Stale
    }
}

/// The ids of the devices a batch of streamed records comes from, sorted
/// and each once: one device upsert per device, in an order that keeps
/// concurrent batches from deadlocking on row locks.
pub(crate) fn streamed_devices(batch: &[Streamed]) -> Vec<&str> {
    let mut devices: Vec<&str> = batch
        .iter()
        .map(|r| match r {
            Streamed::Telemetry(t) => t.device_id.as_str(),
            Streamed::Result(r) => r.device_id.as_str(),
        })
        .collect();
    devices.sort_unstable();
    devices.dedup();
    devices
}

// ---- models ----------------------------------------------------------------

/// The columns [`model`] reads, in order.
pub(crate) const MODEL_COLUMNS: &str =
    "name, version, format, sha256, size, created_at, test_vector, spec, pushed_by, notes";

/// A model row (selected with [`MODEL_COLUMNS`]). An unknown format reads
/// as ONNX and unreadable attachment JSON as absent: only this server
/// writes them.
pub(crate) fn model(r: &dyn Columns) -> Result<ModelRecord, StoreError> {
    Ok(ModelRecord {
        name: r.text(0)?,
        version: r.unsigned(1)?,
        format: r.text(2)?.parse().unwrap_or(ModelFormat::Onnx),
        sha256: r.text(3)?,
        size: r.unsigned(4)?,
        created_at: r.unsigned(5)?,
        test_vector: r
            .opt_text(6)?
            .and_then(|json| serde_json::from_str(&json).ok()),
        spec: r
            .opt_text(7)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
        pushed_by: r.opt_text(8)?,
        notes: r.opt_text(9)?,
    })
}

/// The column an attachment is stored in and its JSON.
pub(crate) fn attachment_column(attachment: &super::Attachment) -> (&'static str, String) {
    match attachment {
        super::Attachment::Spec(spec) => (
            "spec",
            serde_json::to_string(spec).expect("model specs always serialise to JSON"),
        ),
        super::Attachment::TestVector(tv) => (
            "test_vector",
            serde_json::to_string(tv).expect("test vectors always serialise to JSON"),
        ),
    }
}

/// What adding `new` returns when its version is stored already as
/// `existing`: the stored record for the identical file, else a conflict.
pub(crate) fn readd_model(
    existing: ModelRecord,
    new: &ModelRecord,
) -> Result<ModelRecord, StoreError> {
    if existing.sha256 == new.sha256 {
        Ok(existing)
    } else {
        Err(super::changed_model(&existing, new))
    }
}

// ---- events ----------------------------------------------------------------

/// The columns [`event`] reads, in order.
pub(crate) const EVENT_COLUMNS: &str =
    "device_id, seq, at, kind, desired_version, model, model_version, reason, agent_version";

/// An update event row (selected with [`EVENT_COLUMNS`]).
pub(crate) fn event(r: &dyn Columns) -> Result<EventRecord, StoreError> {
    Ok(EventRecord {
        device_id: r.text(0)?,
        seq: r.unsigned(1)?,
        at: r.unsigned(2)?,
        kind: r.text(3)?,
        desired_version: r.opt_unsigned(4)?,
        model: r.opt_text(5)?,
        model_version: r.opt_unsigned(6)?,
        reason: r.opt_text(7)?,
        agent_version: r.opt_text(8)?,
    })
}

// ---- agent releases --------------------------------------------------------

/// The columns [`agent_build`] reads, in order.
pub(crate) const AGENT_BUILD_COLUMNS: &str =
    "version, target, sha256, size, created_at, pushed_by, notes";

/// An agent build row (selected with [`AGENT_BUILD_COLUMNS`]).
pub(crate) fn agent_build(r: &dyn Columns) -> Result<AgentBuildRecord, StoreError> {
    Ok(AgentBuildRecord {
        version: r.text(0)?,
        target: r.text(1)?,
        sha256: r.text(2)?,
        size: r.unsigned(3)?,
        created_at: r.unsigned(4)?,
        pushed_by: r.opt_text(5)?,
        notes: r.opt_text(6)?,
    })
}

/// What adding `new` returns when its (version, target) is stored
/// already as `existing`: the stored record for the identical file, else
/// a conflict.
pub(crate) fn readd_agent_build(
    existing: AgentBuildRecord,
    new: &AgentBuildRecord,
) -> Result<AgentBuildRecord, StoreError> {
    if existing.sha256 == new.sha256 {
        Ok(existing)
    } else {
        Err(StoreError::Conflict(format!(
            "agent release {} already has a different build for {} (sha256 {}); push the new executable as a new release version",
            new.version, new.target, existing.sha256
        )))
    }
}

/// The columns [`agent_assignment`] reads, in order.
pub(crate) const AGENT_ASSIGNMENT_COLUMNS: &str = "scope, version, allow_downgrade";

/// An agent assignment row (selected with [`AGENT_ASSIGNMENT_COLUMNS`]):
/// scope, release version, whether it may go back.
pub(crate) fn agent_assignment(r: &dyn Columns) -> Result<(String, String, bool), StoreError> {
    Ok((r.text(0)?, r.text(1)?, r.flag(2)?))
}

/// Of a device's own assignment and the fleet-wide one (either may be
/// missing), the one that applies: the device's own.
pub(crate) fn applying_assignment(found: Vec<(String, String, bool)>) -> Option<(String, bool)> {
    let (own, fleet): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|(scope, _, _)| scope != super::ALL_DEVICES);
    own.into_iter()
        .chain(fleet)
        .next()
        .map(|(_, version, allow_downgrade)| (version, allow_downgrade))
}

/// The release to deploy does not exist.
pub(crate) fn missing_agent_release(version: &str) -> StoreError {
    StoreError::NotFound(format!(
        "agent release {version} does not exist; push it first (fleetctl agent push)"
    ))
}

/// The release to delete is what some devices should run.
pub(crate) fn deployed_agent_release(version: &str) -> StoreError {
    StoreError::Conflict(format!(
        "agent release {version} is deployed; deploy another release first"
    ))
}

// ---- telemetry and results -------------------------------------------------

/// The columns [`stored_body`] reads, in order.
pub(crate) const BODY_COLUMNS: &str = "received_at, body";

/// A stored telemetry sample or result (selected with [`BODY_COLUMNS`]):
/// the JSON the device sent, with its arrival time added.
pub(crate) fn stored_body(r: &dyn Columns) -> Result<serde_json::Value, StoreError> {
    super::with_received_at(r.int(0)?, &r.text(1)?)
}

/// A streamed record's values as both backends store them.
pub(crate) struct StreamedRow<'a> {
    pub device_id: &'a str,
    pub seq: i64,
    pub at: i64,
    pub body: String,
}

/// The shared values of a streamed record (results add their model
/// columns, read from the record itself).
pub(crate) fn streamed_row(record: &Streamed) -> Result<StreamedRow<'_>, StoreError> {
    let (device_id, seq, at) = match record {
        Streamed::Telemetry(t) => (t.device_id.as_str(), t.seq, t.at),
        Streamed::Result(r) => (r.device_id.as_str(), r.seq, r.at),
    };
    Ok(StreamedRow {
        device_id,
        seq: stored(seq),
        at: stored(at),
        body: super::streamed_body(record)?,
    })
}

// ---- rollouts --------------------------------------------------------------

/// The columns [`rollout`] reads, in order.
pub(crate) const ROLLOUT_COLUMNS: &str = "id, active, state";

/// A stored rollout (selected with [`ROLLOUT_COLUMNS`]): id, whether it
/// is active, its state JSON.
pub(crate) fn rollout(r: &dyn Columns) -> Result<(String, bool, String), StoreError> {
    Ok((r.text(0)?, r.flag(1)?, r.text(2)?))
}

// ---- operator tokens and the audit log ------------------------------------

/// The columns [`token`] reads, in order.
pub(crate) const TOKEN_COLUMNS: &str = "id, name, scope, created_at, revoked_at";

/// The columns [`token_with_hash`] reads, in order.
pub(crate) const TOKEN_WITH_HASH_COLUMNS: &str = "id, name, scope, created_at, revoked_at, hash";

/// An operator token row (selected with [`TOKEN_COLUMNS`]). Only this
/// server writes scopes; an unknown one grants least.
pub(crate) fn token(r: &dyn Columns) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: r.text(0)?,
        name: r.text(1)?,
        scope: r.text(2)?.parse().unwrap_or(Scope::Read),
        created_at: r.unsigned(3)?,
        revoked_at: r.opt_unsigned(4)?,
    })
}

/// A token row and its stored hash (selected with
/// [`TOKEN_WITH_HASH_COLUMNS`]).
pub(crate) fn token_with_hash(r: &dyn Columns) -> Result<(TokenRecord, String), StoreError> {
    Ok((token(r)?, r.text(5)?))
}

/// The columns [`audit`] reads, in order.
pub(crate) const AUDIT_COLUMNS: &str = "id, at, token_id, actor, action, target, detail";

/// An audit log row (selected with [`AUDIT_COLUMNS`]). Unreadable detail
/// JSON reads as absent: only this server writes it.
pub(crate) fn audit(r: &dyn Columns) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        id: r.unsigned(0)?,
        entry: AuditEntry {
            at: r.unsigned(1)?,
            token_id: r.opt_text(2)?,
            actor: r.text(3)?,
            action: r.text(4)?,
            target: r.text(5)?,
            detail: r.opt_text(6)?.and_then(|d| serde_json::from_str(&d).ok()),
        },
    })
}

/// The JSON an audit entry's detail is stored as.
pub(crate) fn audit_detail(entry: &AuditEntry) -> Option<String> {
    entry.detail.as_ref().map(|d| d.to_string())
}
