//! The fleet's records in SQLite (WAL): devices and what they report,
//! models, assignments (which model version a device or the whole fleet
//! should run), signed desired state per device, and update events.
//!
//! All SQL lives in this file. rusqlite is blocking, so async callers go
//! through [`Store::call`], which runs the closure on the blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use edgefleet_shared::{
    InferenceResult, ModelFormat, ModelStatus, StatusMessage, TelemetryMessage, UpdateEvent,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot open database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("store task failed: {0}")]
    Task(String),
}

/// Ordered schema migrations; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        online INTEGER NOT NULL DEFAULT 0,
        agent_version TEXT NOT NULL DEFAULT '',
        reported_desired_version INTEGER,
        models_json TEXT NOT NULL DEFAULT '[]',
        last_status_seq INTEGER NOT NULL DEFAULT 0,
        desired_version INTEGER NOT NULL DEFAULT 0,
        desired_json TEXT
    );
    CREATE TABLE models (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        format TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE assignments (
        scope TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        PRIMARY KEY (scope, model)
    );
    CREATE TABLE events (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        desired_version INTEGER,
        model TEXT,
        model_version INTEGER,
        reason TEXT,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX events_by_time ON events (device_id, at);
"#,
    r#"
    CREATE TABLE telemetry (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (device_id, seq)
    ) WITHOUT ROWID;
    CREATE INDEX telemetry_by_arrival ON telemetry (received_at);
    CREATE TABLE results (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        model TEXT NOT NULL,
        model_version INTEGER NOT NULL,
        request_id TEXT,
        body TEXT NOT NULL,
        PRIMARY KEY (device_id, seq)
    ) WITHOUT ROWID;
    CREATE INDEX results_by_arrival ON results (received_at);
"#,
    // 3: a model version may carry a signed-along test vector and its
    // input/output spec (JSON).
    r#"
    ALTER TABLE models ADD COLUMN test_vector TEXT;
    ALTER TABLE models ADD COLUMN spec TEXT;
    "#,
];

/// Assignment scope meaning "every device".
pub const ALL_DEVICES: &str = "*";

/// A model version in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

/// A model's declared interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    pub first_seen: u64,
    pub last_seen: u64,
    pub online: bool,
    pub agent_version: String,
    pub reported_desired_version: Option<u64>,
    pub models: Vec<ModelStatus>,
    pub desired_version: u64,
}

/// A stored update event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub device_id: String,
    pub seq: u64,
    pub at: u64,
    pub kind: String,
    pub desired_version: Option<u64>,
    pub model: Option<String>,
    pub model_version: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Conflict(format!(
            "database schema version {current} is newer than this server understands ({}); upgrade the server",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating and migrating) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Task("store lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` with the connection on the current thread (tests, start-up).
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| StoreError::Task("store lock poisoned".into()))?;
        f(&mut guard)
    }
}

// ---- devices ---------------------------------------------------------------

/// Records a status message. Returns true if the device was new. Stale
/// (lower-sequence) online messages are ignored; offline last-will
/// messages always mark the device offline.
pub fn record_status(
    conn: &mut Connection,
    msg: &StatusMessage,
    now: u64,
) -> Result<bool, StoreError> {
    let tx = conn.transaction()?;
    let existing: Option<u64> = tx
        .query_row(
            "SELECT last_status_seq FROM devices WHERE id = ?1",
            [msg.device_id.as_str()],
            |r| r.get::<_, i64>(0).map(|v| v as u64),
        )
        .optional()?;
    let is_new = existing.is_none();
    if is_new {
        tx.execute(
            "INSERT INTO devices (id, first_seen, last_seen) VALUES (?1, ?2, ?2)",
            params![msg.device_id.as_str(), now as i64],
        )?;
    }
    if !msg.online {
        tx.execute(
            "UPDATE devices SET online = 0, last_seen = ?2 WHERE id = ?1",
            params![msg.device_id.as_str(), now as i64],
        )?;
    } else if msg.seq > existing.unwrap_or(0) {
        tx.execute(
            "UPDATE devices SET online = 1, last_seen = ?2, agent_version = ?3,
                reported_desired_version = ?4, models_json = ?5, last_status_seq = ?6
             WHERE id = ?1",
            params![
                msg.device_id.as_str(),
                now as i64,
                msg.agent_version,
                msg.desired_version.map(|v| v as i64),
                serde_json::to_string(&msg.models).expect("models serialise"),
                msg.seq as i64,
            ],
        )?;
    }
    tx.commit()?;
    Ok(is_new)
}

fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    let models_json: String = r.get(6)?;
    Ok(DeviceRecord {
        id: r.get(0)?,
        first_seen: r.get::<_, i64>(1)? as u64,
        last_seen: r.get::<_, i64>(2)? as u64,
        online: r.get::<_, i64>(3)? != 0,
        agent_version: r.get(4)?,
        reported_desired_version: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        models: serde_json::from_str(&models_json).unwrap_or_default(),
        desired_version: r.get::<_, i64>(7)? as u64,
    })
}

const DEVICE_COLUMNS: &str = "id, first_seen, last_seen, online, agent_version, reported_desired_version, models_json, desired_version";

pub fn list_devices(conn: &Connection) -> Result<Vec<DeviceRecord>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))?;
    let rows = stmt.query_map([], device_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get_device(conn: &Connection, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
            [id],
            device_from_row,
        )
        .optional()?)
}

/// Ensures a device row exists (for deployments to devices not seen yet).
pub fn ensure_device(conn: &Connection, id: &str, now: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO devices (id, first_seen, last_seen) VALUES (?1, ?2, ?2)",
        params![id, now as i64],
    )?;
    Ok(())
}

/// Stores the signed desired state for `device` under the next version and
/// returns that version. The caller signs with the returned number first
/// via `sign`, so version allocation and storage are one transaction.
pub fn store_desired(
    conn: &mut Connection,
    device: &str,
    sign: impl FnOnce(u64) -> Vec<u8>,
) -> Result<(u64, Vec<u8>), StoreError> {
    let tx = conn.transaction()?;
    let current: i64 = tx
        .query_row(
            "SELECT desired_version FROM devices WHERE id = ?1",
            [device],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("unknown device {device:?}")))?;
    let version = current as u64 + 1;
    let bytes = sign(version);
    tx.execute(
        "UPDATE devices SET desired_version = ?2, desired_json = ?3 WHERE id = ?1",
        params![device, version as i64, bytes],
    )?;
    tx.commit()?;
    Ok((version, bytes))
}

pub fn desired_json(conn: &Connection, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT desired_json FROM devices WHERE id = ?1",
            [device],
            |r| r.get::<_, Option<Vec<u8>>>(0),
        )
        .optional()?
        .flatten())
}

// ---- models ----------------------------------------------------------------

/// Adds a model version. Re-adding the identical file is a no-op; a
/// different file under an existing version is a conflict.
pub fn add_model(conn: &Connection, m: &ModelRecord) -> Result<ModelRecord, StoreError> {
    if let Some(existing) = get_model(conn, &m.name, m.version)? {
        if existing.sha256 == m.sha256 {
            return Ok(existing);
        }
        return Err(StoreError::Conflict(format!(
            "model {} version {} already exists with a different file (sha256 {}); push a new version",
            m.name, m.version, existing.sha256
        )));
    }
    conn.execute(
        "INSERT INTO models (name, version, format, sha256, size, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![m.name, m.version as i64, m.format.to_string(), m.sha256, m.size as i64, m.created_at as i64],
    )?;
    Ok(m.clone())
}

fn model_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModelRecord> {
    let format: String = r.get(2)?;
    Ok(ModelRecord {
        name: r.get(0)?,
        version: r.get::<_, i64>(1)? as u64,
        format: format.parse().unwrap_or(ModelFormat::Onnx),
        sha256: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        created_at: r.get::<_, i64>(5)? as u64,
        test_vector: r
            .get::<_, Option<String>>(6)?
            .and_then(|json| serde_json::from_str(&json).ok()),
        spec: r
            .get::<_, Option<String>>(7)?
            .and_then(|json| serde_json::from_str(&json).ok())
            .unwrap_or_default(),
    })
}

/// Sets the declared interface of a model version. Returns whether the
/// version exists.
pub fn set_spec(
    conn: &Connection,
    name: &str,
    version: u64,
    spec: &ModelSpec,
) -> Result<bool, StoreError> {
    let json = serde_json::to_string(spec).expect("specs serialise");
    let n = conn.execute(
        "UPDATE models SET spec = ?3 WHERE name = ?1 AND version = ?2",
        params![name, version as i64, json],
    )?;
    Ok(n > 0)
}

/// Whether any assignment points at this model version.
pub fn is_assigned(conn: &Connection, name: &str, version: u64) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM assignments WHERE model = ?1 AND version = ?2 LIMIT 1",
            params![name, version as i64],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Sets the test vector of a model version (`None` removes it). Returns
/// whether the version exists.
pub fn set_test_vector(
    conn: &Connection,
    name: &str,
    version: u64,
    tv: Option<&edgefleet_shared::TestVector>,
) -> Result<bool, StoreError> {
    let json = tv.map(|tv| serde_json::to_string(tv).expect("test vectors serialise"));
    let n = conn.execute(
        "UPDATE models SET test_vector = ?3 WHERE name = ?1 AND version = ?2",
        params![name, version as i64, json],
    )?;
    Ok(n > 0)
}

pub fn get_model(
    conn: &Connection,
    name: &str,
    version: u64,
) -> Result<Option<ModelRecord>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT name, version, format, sha256, size, created_at, test_vector, spec FROM models WHERE name = ?1 AND version = ?2",
            params![name, version as i64],
            model_from_row,
        )
        .optional()?)
}

pub fn list_models(conn: &Connection) -> Result<Vec<ModelRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT name, version, format, sha256, size, created_at, test_vector, spec FROM models ORDER BY name, version",
    )?;
    let rows = stmt.query_map([], model_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- assignments -------------------------------------------------------------

/// Points `scope` (a device id or [`ALL_DEVICES`]) at a model version.
pub fn assign(conn: &Connection, scope: &str, model: &str, version: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO assignments (scope, model, version) VALUES (?1, ?2, ?3)
         ON CONFLICT (scope, model) DO UPDATE SET version = excluded.version",
        params![scope, model, version as i64],
    )?;
    Ok(())
}

/// The models `device` should run: fleet-wide assignments, overridden per
/// model by the device's own.
pub fn models_for_device(conn: &Connection, device: &str) -> Result<Vec<ModelRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT m.name, m.version, m.format, m.sha256, m.size, m.created_at, m.test_vector, m.spec
         FROM assignments a JOIN models m ON m.name = a.model AND m.version = a.version
         WHERE a.scope = ?1
            OR (a.scope = '*' AND NOT EXISTS (
                SELECT 1 FROM assignments d WHERE d.scope = ?1 AND d.model = a.model))
         ORDER BY m.name",
    )?;
    let rows = stmt.query_map([device], model_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- events ------------------------------------------------------------------

/// Stores an event once; a redelivered copy (same device and sequence
/// number) is ignored. Returns whether it was new.
pub fn record_event(conn: &Connection, e: &UpdateEvent) -> Result<bool, StoreError> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO events (device_id, seq, at, kind, desired_version, model, model_version, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            e.device_id.as_str(),
            e.seq as i64,
            e.at as i64,
            e.kind.as_str(),
            e.desired_version.map(|v| v as i64),
            e.model,
            e.model_version.map(|v| v as i64),
            e.reason,
        ],
    )?;
    Ok(n == 1)
}

pub fn events_for_device(
    conn: &Connection,
    device: &str,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT device_id, seq, at, kind, desired_version, model, model_version, reason
         FROM events WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![device, limit], |r| {
        Ok(EventRecord {
            device_id: r.get(0)?,
            seq: r.get::<_, i64>(1)? as u64,
            at: r.get::<_, i64>(2)? as u64,
            kind: r.get(3)?,
            desired_version: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
            model: r.get(5)?,
            model_version: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            reason: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- telemetry and results ---------------------------------------------------

/// A record a device streams: one telemetry sample or one inference result.
#[derive(Debug, Clone)]
pub enum Streamed {
    Telemetry(TelemetryMessage),
    Result(InferenceResult),
}

/// Stores a batch of streamed records in one transaction, each once:
/// redelivered copies (same device and sequence number) are ignored, so
/// at-least-once delivery becomes exactly-once storage. Returns how many
/// were new.
pub fn record_streamed(
    conn: &mut Connection,
    batch: &[Streamed],
    now: u64,
) -> Result<usize, StoreError> {
    let tx = conn.transaction()?;
    let mut new = 0;
    {
        let mut device = tx.prepare_cached(
            "INSERT INTO devices (id, first_seen, last_seen) VALUES (?1, ?2, ?2)
             ON CONFLICT (id) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen)",
        )?;
        let mut telemetry = tx.prepare_cached(
            "INSERT OR IGNORE INTO telemetry (device_id, seq, at, received_at, body)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut result = tx.prepare_cached(
            "INSERT OR IGNORE INTO results (device_id, seq, at, received_at, model, model_version, request_id, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for record in batch {
            let body = match record {
                Streamed::Telemetry(t) => serde_json::to_string(t),
                Streamed::Result(r) => serde_json::to_string(r),
            }
            .map_err(|e| StoreError::Task(e.to_string()))?;
            new += match record {
                Streamed::Telemetry(t) => {
                    device.execute(params![t.device_id.as_str(), now as i64])?;
                    telemetry.execute(params![
                        t.device_id.as_str(),
                        t.seq as i64,
                        t.at as i64,
                        now as i64,
                        body
                    ])?
                }
                Streamed::Result(r) => {
                    device.execute(params![r.device_id.as_str(), now as i64])?;
                    result.execute(params![
                        r.device_id.as_str(),
                        r.seq as i64,
                        r.at as i64,
                        now as i64,
                        r.model,
                        r.model_version as i64,
                        r.request_id,
                        body
                    ])?
                }
            };
        }
    }
    tx.commit()?;
    Ok(new)
}

/// Which stored records to read: sequence numbers after `after_seq`,
/// oldest first, at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub after_seq: Option<u64>,
    pub limit: u32,
}

/// Telemetry samples of a device in sequence order, each as the device
/// sent it plus `received_at`.
pub fn telemetry_for_device(
    conn: &Connection,
    device: &str,
    page: &Page,
) -> Result<Vec<serde_json::Value>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT received_at, body FROM telemetry
         WHERE device_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![device, page.after_seq.unwrap_or(0) as i64, page.limit],
        stored_body,
    )?;
    rows.map(|row| row?).collect()
}

/// Uploaded inference results of a device in sequence order, optionally
/// of one model.
pub fn results_for_device(
    conn: &Connection,
    device: &str,
    model: Option<&str>,
    page: &Page,
) -> Result<Vec<serde_json::Value>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT received_at, body FROM results
         WHERE device_id = ?1 AND seq > ?2 AND (?3 IS NULL OR model = ?3)
         ORDER BY seq LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        params![
            device,
            page.after_seq.unwrap_or(0) as i64,
            model,
            page.limit
        ],
        stored_body,
    )?;
    rows.map(|row| row?).collect()
}

/// A stored JSON body with its arrival time added.
fn stored_body(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<serde_json::Value, StoreError>> {
    let (received_at, body) = (r.get::<_, i64>(0)?, r.get::<_, String>(1)?);
    Ok(serde_json::from_str::<serde_json::Value>(&body)
        .map(|mut v| {
            v["received_at"] = received_at.into();
            v
        })
        .map_err(|e| StoreError::Task(e.to_string())))
}

/// Deletes telemetry and results that arrived before `cutoff` (unix
/// seconds; arrival time, since device clocks may be wrong). Returns how
/// many rows went.
pub fn prune_streamed(conn: &Connection, cutoff: u64) -> Result<usize, StoreError> {
    let a = conn.execute(
        "DELETE FROM telemetry WHERE received_at < ?1",
        [cutoff as i64],
    )?;
    let b = conn.execute(
        "DELETE FROM results WHERE received_at < ?1",
        [cutoff as i64],
    )?;
    Ok(a + b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::{DeviceId, EventKind, SCHEMA_VERSION};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("fleet.db")).unwrap();
        (dir, store)
    }

    fn model(name: &str, version: u64) -> ModelRecord {
        ModelRecord {
            test_vector: None,
            spec: Default::default(),
            name: name.into(),
            version,
            format: ModelFormat::Onnx,
            sha256: format!("{version:064x}"),
            size: 10,
            created_at: 1,
        }
    }

    fn status(id: &str, seq: u64, online: bool) -> StatusMessage {
        StatusMessage {
            schema: SCHEMA_VERSION,
            device_id: DeviceId::new(id).unwrap(),
            seq,
            online,
            at: 0,
            agent_version: "1".into(),
            desired_version: Some(seq),
            models: vec![],
        }
    }

    #[test]
    fn reopening_does_not_rerun_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let s = Store::open(&path).unwrap();
        s.with(|c| add_model(c, &model("m", 1))).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.with(|c| list_models(c)).unwrap().len(), 1);
    }

    #[test]
    fn status_is_applied_in_sequence_order_and_will_marks_offline() {
        let (_d, s) = store();
        s.with(|c| {
            assert!(record_status(c, &status("a", 5, true), 100)?);
            assert!(!record_status(c, &status("a", 3, true), 101)?);
            let dev = get_device(c, "a")?.unwrap();
            assert_eq!(
                dev.reported_desired_version,
                Some(5),
                "stale status ignored"
            );
            record_status(c, &status("a", 0, false), 102)?;
            assert!(!get_device(c, "a")?.unwrap().online);
            record_status(c, &status("a", 6, true), 103)?;
            assert!(get_device(c, "a")?.unwrap().online);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn device_assignments_override_fleet_wide_ones() {
        let (_d, s) = store();
        s.with(|c| {
            for (n, v) in [("digits", 1), ("digits", 2), ("kws", 1)] {
                add_model(c, &model(n, v))?;
            }
            assign(c, ALL_DEVICES, "digits", 1)?;
            assign(c, ALL_DEVICES, "kws", 1)?;
            assign(c, "pi-2", "digits", 2)?;
            let a: Vec<_> = models_for_device(c, "pi-1")?
                .iter()
                .map(|m| (m.name.clone(), m.version))
                .collect();
            assert_eq!(a, vec![("digits".into(), 1), ("kws".into(), 1)]);
            let b: Vec<_> = models_for_device(c, "pi-2")?
                .iter()
                .map(|m| (m.name.clone(), m.version))
                .collect();
            assert_eq!(b, vec![("digits".into(), 2), ("kws".into(), 1)]);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn model_versions_are_immutable() {
        let (_d, s) = store();
        s.with(|c| {
            add_model(c, &model("m", 1))?;
            add_model(c, &model("m", 1))?;
            let mut other = model("m", 1);
            other.sha256 = "ff".repeat(32);
            assert!(matches!(add_model(c, &other), Err(StoreError::Conflict(_))));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn desired_versions_increase_per_device() {
        let (_d, s) = store();
        s.with(|c| {
            ensure_device(c, "a", 1)?;
            let (v1, _) = store_desired(c, "a", |v| format!("doc {v}").into_bytes())?;
            let (v2, bytes) = store_desired(c, "a", |v| format!("doc {v}").into_bytes())?;
            assert_eq!((v1, v2), (1, 2));
            assert_eq!(desired_json(c, "a")?.unwrap(), bytes);
            assert!(matches!(
                store_desired(c, "nope", |_| vec![]),
                Err(StoreError::NotFound(_))
            ));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn events_are_stored_once() {
        let (_d, s) = store();
        let e = UpdateEvent {
            schema: SCHEMA_VERSION,
            device_id: DeviceId::new("a").unwrap(),
            seq: 9,
            at: 1,
            kind: EventKind::Refused,
            desired_version: Some(1),
            model: None,
            model_version: None,
            reason: Some("bad signature".into()),
        };
        s.with(|c| {
            assert!(record_event(c, &e)?);
            assert!(!record_event(c, &e)?);
            let stored = events_for_device(c, "a", 10)?;
            assert_eq!(stored.len(), 1);
            assert_eq!(stored[0].kind, "refused");
            Ok(())
        })
        .unwrap();
    }

    fn telemetry(device: &str, seq: u64) -> Streamed {
        Streamed::Telemetry(TelemetryMessage {
            schema: SCHEMA_VERSION,
            device_id: DeviceId::new(device).unwrap(),
            seq,
            at: 1000 + seq,
            interval_secs: 60.0,
            health: Default::default(),
            models: vec![],
            outbox: Default::default(),
        })
    }

    fn result(device: &str, seq: u64, model: &str) -> Streamed {
        Streamed::Result(InferenceResult {
            schema: SCHEMA_VERSION,
            device_id: DeviceId::new(device).unwrap(),
            seq,
            at: 0,
            model: model.into(),
            model_version: 1,
            runtime: "tract-onnx".into(),
            request_id: Some(format!("r{seq}")),
            latency_us: 5,
            outputs: serde_json::json!([]),
        })
    }

    #[test]
    fn streamed_records_are_stored_once_in_sequence_order_and_pruned() {
        let (_dir, s) = store();
        s.with(|c| {
            // Out of order and with a redelivered copy.
            let batch = [
                telemetry("a", 3),
                telemetry("a", 1),
                result("a", 2, "m"),
                telemetry("a", 3),
                result("a", 4, "other"),
                telemetry("b", 1),
            ];
            assert_eq!(record_streamed(c, &batch, 100)?, 5);
            assert_eq!(record_streamed(c, &batch, 101)?, 0);
            let page = Page {
                after_seq: None,
                limit: 10,
            };
            let t = telemetry_for_device(c, "a", &page)?;
            let seqs: Vec<u64> = t.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
            assert_eq!(seqs, vec![1, 3]);
            assert_eq!(t[0]["received_at"], 100);
            let after = Page {
                after_seq: Some(1),
                limit: 10,
            };
            assert_eq!(telemetry_for_device(c, "a", &after)?.len(), 1);
            let r = results_for_device(c, "a", Some("m"), &page)?;
            assert_eq!(r.len(), 1);
            assert_eq!(r[0]["request_id"], "r2");
            assert_eq!(results_for_device(c, "a", None, &page)?.len(), 2);
            // The device row exists for a device only seen in telemetry.
            assert!(get_device(c, "b")?.is_some());
            record_streamed(c, &[telemetry("a", 9)], 500)?;
            assert_eq!(prune_streamed(c, 200)?, 5);
            assert_eq!(telemetry_for_device(c, "a", &page)?.len(), 1);
            Ok(())
        })
        .unwrap();
    }
}
