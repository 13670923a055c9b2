//! The SQLite backend (the embedded default): one file in WAL mode. All
//! its SQL lives here. rusqlite is blocking, so every operation runs on
//! the blocking pool through [`SqliteStore::call`], one transaction each.

use std::path::Path;
use std::sync::{Arc, Mutex};

use edgefleet_shared::{ModelFormat, StatusMessage, UpdateEvent};
use rusqlite::{params, Connection, OptionalExtension};

use crate::auth::{Scope, TokenRecord};

use super::{
    changed_model, deployed_conflict, missing_model, streamed_body, with_received_at, Attachment,
    AuditEntry, AuditRecord, DeviceRecord, EventRecord, ModelRecord, ModelSpec, Page, SignFn,
    StatusOutcome, StoreError, Streamed, Target, ALL_DEVICES,
};
use super::{DeviceFilter, Enrollment, KeyWrite};

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
    // 4: operator tokens (hashes only) and the audit log.
    r#"
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        hash TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        token_id TEXT,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT
    );
    "#,
    // 5: telemetry and results as rowid tables with a unique key: rows are
    // ~0.5-1 KB of JSON, too large for WITHOUT ROWID tables, whose B-tree
    // leaves then hold a handful of rows and split on every other insert
    // (benches/ingest.rs, 256-record batches on the 2-core development
    // machine: 17,900 records/s before, 102,600 after).
    r#"
    CREATE TABLE telemetry_rows (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (device_id, seq)
    );
    INSERT INTO telemetry_rows SELECT device_id, seq, at, received_at, body FROM telemetry;
    DROP TABLE telemetry;
    ALTER TABLE telemetry_rows RENAME TO telemetry;
    CREATE INDEX telemetry_by_arrival ON telemetry (received_at);
    CREATE TABLE results_rows (
        device_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        model TEXT NOT NULL,
        model_version INTEGER NOT NULL,
        request_id TEXT,
        body TEXT NOT NULL,
        UNIQUE (device_id, seq)
    );
    INSERT INTO results_rows
        SELECT device_id, seq, at, received_at, model, model_version, request_id, body FROM results;
    DROP TABLE results;
    ALTER TABLE results_rows RENAME TO results;
    CREATE INDEX results_by_arrival ON results (received_at);
    "#,
    // 6: enrollment: hardware class, tags (a JSON object), the
    // credential's hash, revocation.
    r#"
    ALTER TABLE devices ADD COLUMN hardware TEXT;
    ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE devices ADD COLUMN enrolled_at INTEGER;
    ALTER TABLE devices ADD COLUMN credential TEXT;
    ALTER TABLE devices ADD COLUMN revoked_at INTEGER;
    "#,
    // 7: who pushed a model version, and their notes.
    r#"
    ALTER TABLE models ADD COLUMN pushed_by TEXT;
    ALTER TABLE models ADD COLUMN notes TEXT;
    "#,
    // 8: staged rollouts (definition and planner state as JSON).
    r#"
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        active INTEGER NOT NULL,
        state TEXT NOT NULL,
        seq INTEGER NOT NULL
    );
    "#,
    // 9: each device's message-signing public key (hex).
    r#"
    ALTER TABLE devices ADD COLUMN device_key TEXT;
    "#,
];

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
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

impl SqliteStore {
    /// Opens (creating and migrating) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path).map_err(|e| StoreError::Open {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // 16 MiB of page cache (the default is 2 MiB): ingest touches the
        // key and arrival indexes of many devices at once.
        conn.pragma_update(None, "cache_size", -16_000)?;
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
}

impl SqliteStore {
    pub async fn record_messages(
        &self,
        statuses: &[StatusMessage],
        events: &[UpdateEvent],
        now: u64,
    ) -> Result<(Vec<StatusOutcome>, Vec<bool>), StoreError> {
        let (statuses, events) = (statuses.to_vec(), events.to_vec());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let mut outcomes = Vec::with_capacity(statuses.len());
            for m in &statuses {
                let is_new = record_status(&tx, m, now)?;
                let desired = if m.online {
                    let version =
                        get_device(&tx, m.device_id.as_str())?.map_or(0, |d| d.desired_version);
                    Some((version, desired_json(&tx, m.device_id.as_str())?))
                } else {
                    None
                };
                outcomes.push(StatusOutcome { is_new, desired });
            }
            let mut new = Vec::with_capacity(events.len());
            for e in &events {
                ensure_device(&tx, e.device_id.as_str(), e.at)?;
                new.push(record_event(&tx, e)?);
            }
            tx.commit()?;
            Ok((outcomes, new))
        })
        .await
    }

    pub async fn sign_desired(
        &self,
        device: &str,
        now: u64,
        sign: SignFn,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let id = device.to_string();
        self.call(move |conn| {
            let models = models_for_device(conn, &id)?;
            if models.is_empty() {
                return Ok(None);
            }
            ensure_device(conn, &id, now)?;
            store_desired(conn, &id, |version| sign(&models, version)).map(Some)
        })
        .await
    }

    pub async fn all_desired(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, desired_json FROM devices WHERE desired_json IS NOT NULL ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn desired_json(&self, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let id = device.to_string();
        self.call(move |conn| desired_json(conn, &id)).await
    }

    pub async fn events_for_device(
        &self,
        device: &str,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let id = device.to_string();
        self.call(move |conn| events_for_device(conn, &id, limit))
            .await
    }

    pub async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.call(|conn| list_devices(conn)).await
    }

    pub async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| get_device(conn, &id)).await
    }

    pub async fn find_devices(
        &self,
        filter: &DeviceFilter,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        let filter = filter.clone();
        self.call(move |conn| {
            let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id > ?1");
            let mut args: Vec<rusqlite::types::Value> =
                vec![filter.after.clone().unwrap_or_default().into()];
            if let Some(hw) = &filter.hardware {
                args.push(hw.clone().into());
                sql += &format!(" AND hardware = ?{}", args.len());
            }
            if let Some(online) = filter.online {
                args.push(i64::from(online).into());
                sql += &format!(" AND online = ?{}", args.len());
            }
            for (key, value) in &filter.tags {
                // Keys are validated ([A-Za-z0-9._-]); quoted in the path
                // so dots stay part of the key.
                args.push(format!("$.\"{key}\"").into());
                args.push(value.clone().into());
                sql += &format!(
                    " AND json_extract(tags, ?{}) = ?{}",
                    args.len() - 1,
                    args.len()
                );
            }
            args.push(i64::from(filter.limit).into());
            sql += &format!(" ORDER BY id LIMIT ?{}", args.len());
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), device_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn enroll_device(
        &self,
        e: &Enrollment,
        now: u64,
    ) -> Result<DeviceRecord, StoreError> {
        let e = e.clone();
        self.call(move |conn| {
            let tags = serde_json::to_string(&e.tags).expect("tags serialise");
            conn.execute(
                "INSERT INTO devices (id, first_seen, last_seen, hardware, tags, enrolled_at, credential, device_key)
                 VALUES (?1, ?2, ?2, ?3, ?4, ?2, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET hardware = excluded.hardware, tags = excluded.tags,
                    enrolled_at = excluded.enrolled_at, credential = excluded.credential, revoked_at = NULL,
                    device_key = excluded.device_key",
                params![e.id, now as i64, e.hardware, tags, e.credential, e.public_key],
            )?;
            get_device(conn, &e.id)?.ok_or_else(|| StoreError::NotFound(e.id.clone()))
        })
        .await
    }

    pub async fn revoke_device(
        &self,
        id: &str,
        now: u64,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.execute(
                "UPDATE devices SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now as i64],
            )?;
            get_device(conn, &id)
        })
        .await
    }

    pub async fn set_tags(
        &self,
        id: &str,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let (id, tags) = (
            id.to_string(),
            serde_json::to_string(tags).expect("tags serialise"),
        );
        self.call(move |conn| {
            conn.execute(
                "UPDATE devices SET tags = ?2 WHERE id = ?1",
                params![id, tags],
            )?;
            get_device(conn, &id)
        })
        .await
    }

    pub async fn delete_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<(ModelRecord, bool), StoreError> {
        let name = name.to_string();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            let record = get_model(&tx, &name, version)?
                .ok_or_else(|| super::missing_model(&name, version))?;
            if is_assigned(&tx, &name, version)? {
                return Err(StoreError::Conflict(format!(
                    "model {name} version {version} is deployed; deploy another version first"
                )));
            }
            tx.execute(
                "DELETE FROM models WHERE name = ?1 AND version = ?2",
                params![name, version as i64],
            )?;
            let still_used = tx
                .query_row(
                    "SELECT 1 FROM models WHERE sha256 = ?1 LIMIT 1",
                    [&record.sha256],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            tx.commit()?;
            Ok((record, still_used))
        })
        .await
    }

    pub async fn models_for_device(&self, device: &str) -> Result<Vec<ModelRecord>, StoreError> {
        let device = device.to_string();
        self.call(move |conn| models_for_device(conn, &device))
            .await
    }

    pub async fn save_rollout(
        &self,
        id: &str,
        active: bool,
        state: &str,
    ) -> Result<(), StoreError> {
        let (id, state) = (id.to_string(), state.to_string());
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO rollouts (id, active, state, seq)
                 VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM rollouts))
                 ON CONFLICT (id) DO UPDATE SET active = excluded.active, state = excluded.state",
                params![id, i64::from(active), state],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn list_rollouts(&self) -> Result<Vec<(String, bool, String)>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare("SELECT id, active, state FROM rollouts ORDER BY seq")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn set_device_key(
        &self,
        id: &str,
        key: &str,
        who: KeyWrite,
    ) -> Result<Option<String>, StoreError> {
        let (id, key) = (id.to_string(), key.to_string());
        self.call(move |conn| {
            match who {
                KeyWrite::Operator => conn.execute(
                    "UPDATE devices SET device_key = ?2 WHERE id = ?1",
                    params![id, key],
                )?,
                KeyWrite::FirstOnly => conn.execute(
                    "UPDATE devices SET device_key = ?2 WHERE id = ?1 AND device_key IS NULL",
                    params![id, key],
                )?,
            };
            Ok(conn
                .query_row("SELECT device_key FROM devices WHERE id = ?1", [id], |r| {
                    r.get::<_, Option<String>>(0)
                })
                .optional()?
                .flatten())
        })
        .await
    }

    pub async fn device_credential(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT credential FROM devices WHERE id = ?1 AND revoked_at IS NULL",
                    [id],
                    |r| r.get::<_, Option<String>>(0),
                )
                .optional()?
                .flatten())
        })
        .await
    }

    pub async fn add_model(&self, m: &ModelRecord) -> Result<ModelRecord, StoreError> {
        let m = m.clone();
        self.call(move |conn| add_model(conn, &m)).await
    }

    pub async fn get_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let name = name.to_string();
        self.call(move |conn| get_model(conn, &name, version)).await
    }

    pub async fn list_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        self.call(|conn| list_models(conn)).await
    }

    pub async fn attach(
        &self,
        name: &str,
        version: u64,
        attachment: Attachment,
    ) -> Result<ModelRecord, StoreError> {
        let name = name.to_string();
        self.call(move |conn| {
            let tx = conn.transaction()?;
            if is_assigned(&tx, &name, version)? {
                return Err(deployed_conflict(&name, version, attachment.what()));
            }
            let found = match &attachment {
                Attachment::Spec(spec) => set_spec(&tx, &name, version, spec)?,
                Attachment::TestVector(tv) => set_test_vector(&tx, &name, version, Some(tv))?,
            };
            if !found {
                return Err(missing_model(&name, version));
            }
            let record =
                get_model(&tx, &name, version)?.ok_or_else(|| missing_model(&name, version))?;
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    pub async fn deploy(
        &self,
        model: &str,
        version: u64,
        target: &Target,
        now: u64,
    ) -> Result<Vec<String>, StoreError> {
        let (model, target) = (model.to_string(), target.clone());
        self.call(move |conn| {
            let tx = conn.transaction()?;
            if get_model(&tx, &model, version)?.is_none() {
                return Err(missing_model(&model, version));
            }
            let ids = match &target {
                Target::All => {
                    assign(&tx, ALL_DEVICES, &model, version)?;
                    list_devices(&tx)?.into_iter().map(|d| d.id).collect()
                }
                Target::Devices(ids) => {
                    for id in ids {
                        ensure_device(&tx, id, now)?;
                        assign(&tx, id, &model, version)?;
                    }
                    ids.clone()
                }
            };
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    pub async fn record_streamed(&self, batch: &[Streamed], now: u64) -> Result<usize, StoreError> {
        let records = batch.to_vec();
        self.call(move |conn| record_streamed(conn, &records, now))
            .await
    }

    pub async fn telemetry_for_device(
        &self,
        device: &str,
        page: &Page,
    ) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
        let (id, page) = (device.to_string(), page.clone());
        self.call(move |conn| {
            if get_device(conn, &id)?.is_none() {
                return Ok(None);
            }
            telemetry_for_device(conn, &id, &page).map(Some)
        })
        .await
    }

    pub async fn recent_telemetry(
        &self,
        device: &str,
        since: u64,
        limit: u32,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let id = device.to_string();
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT received_at, body FROM (
                     SELECT seq, received_at, body FROM telemetry
                     WHERE device_id = ?1 AND at >= ?2 ORDER BY seq DESC LIMIT ?3
                 ) ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![id, since as i64, limit], stored_body)?;
            rows.map(|row| row?).collect()
        })
        .await
    }

    pub async fn results_for_device(
        &self,
        device: &str,
        model: Option<&str>,
        page: &Page,
    ) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
        let (id, model, page) = (device.to_string(), model.map(str::to_string), page.clone());
        self.call(move |conn| {
            if get_device(conn, &id)?.is_none() {
                return Ok(None);
            }
            results_for_device(conn, &id, model.as_deref(), &page).map(Some)
        })
        .await
    }

    pub async fn prune_streamed(&self, cutoff: u64) -> Result<usize, StoreError> {
        self.call(move |conn| prune_streamed(conn, cutoff)).await
    }

    pub async fn create_token(&self, t: &TokenRecord, hash: &str) -> Result<(), StoreError> {
        let (t, hash) = (t.clone(), hash.to_string());
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO tokens (id, name, scope, hash, created_at, revoked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![t.id, t.name, t.scope.as_str(), hash, t.created_at as i64, t.revoked_at.map(|v| v as i64)],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn token_for_auth(
        &self,
        id: &str,
    ) -> Result<Option<(TokenRecord, String)>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {TOKEN_COLUMNS}, hash FROM tokens WHERE id = ?1"),
                    [id],
                    |r| Ok((token_from_row(r)?, r.get(5)?)),
                )
                .optional()?)
        })
        .await
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.call(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([], token_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn revoke_token(
        &self,
        id: &str,
        now: u64,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |conn| {
            conn.execute(
                "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now as i64],
            )?;
            Ok(conn
                .query_row(
                    &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
                    [id],
                    token_from_row,
                )
                .optional()?)
        })
        .await
    }

    pub async fn record_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let e = e.clone();
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO audit (at, token_id, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    e.at as i64,
                    e.token_id,
                    e.actor,
                    e.action,
                    e.target,
                    e.detail.as_ref().map(|d| d.to_string())
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn list_audit(
        &self,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, at, token_id, actor, action, target, detail FROM audit
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after_id as i64, limit], |r| {
                Ok(AuditRecord {
                    id: r.get::<_, i64>(0)? as u64,
                    entry: AuditEntry {
                        at: r.get::<_, i64>(1)? as u64,
                        token_id: r.get(2)?,
                        actor: r.get(3)?,
                        action: r.get(4)?,
                        target: r.get(5)?,
                        detail: r
                            .get::<_, Option<String>>(6)?
                            .and_then(|d| serde_json::from_str(&d).ok()),
                    },
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await
    }
}

// ---- operator tokens ---------------------------------------------------------

const TOKEN_COLUMNS: &str = "id, name, scope, created_at, revoked_at";

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let scope: String = r.get(2)?;
    Ok(TokenRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        // Only this server writes scopes; an unknown one grants least.
        scope: scope.parse().unwrap_or(Scope::Read),
        created_at: r.get::<_, i64>(3)? as u64,
        revoked_at: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
    })
}

// ---- devices ---------------------------------------------------------------

/// Records a status message. Returns true if the device was new. Stale
/// (lower-sequence) online messages are ignored; offline last-will
/// messages always mark the device offline.
fn record_status(tx: &Connection, msg: &StatusMessage, now: u64) -> Result<bool, StoreError> {
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
        hardware: r.get(8)?,
        tags: serde_json::from_str(&r.get::<_, String>(9)?).unwrap_or_default(),
        enrolled_at: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
        revoked_at: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        public_key: r.get(12)?,
    })
}

const DEVICE_COLUMNS: &str = "id, first_seen, last_seen, online, agent_version, reported_desired_version, models_json, desired_version, hardware, tags, enrolled_at, revoked_at, device_key";

fn list_devices(conn: &Connection) -> Result<Vec<DeviceRecord>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"))?;
    let rows = stmt.query_map([], device_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn get_device(conn: &Connection, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
            [id],
            device_from_row,
        )
        .optional()?)
}

/// Ensures a device row exists (for deployments to devices not seen yet).
fn ensure_device(conn: &Connection, id: &str, now: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO devices (id, first_seen, last_seen) VALUES (?1, ?2, ?2)",
        params![id, now as i64],
    )?;
    Ok(())
}

/// Stores the signed desired state for `device` under the next version and
/// returns that version. The caller signs with the returned number first
/// via `sign`, so version allocation and storage are one transaction.
fn store_desired(
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

fn desired_json(conn: &Connection, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
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
fn add_model(conn: &Connection, m: &ModelRecord) -> Result<ModelRecord, StoreError> {
    if let Some(existing) = get_model(conn, &m.name, m.version)? {
        if existing.sha256 == m.sha256 {
            return Ok(existing);
        }
        return Err(changed_model(&existing, m));
    }
    conn.execute(
        "INSERT INTO models (name, version, format, sha256, size, created_at, pushed_by, notes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![m.name, m.version as i64, m.format.to_string(), m.sha256, m.size as i64, m.created_at as i64, m.pushed_by, m.notes],
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
        pushed_by: r.get(8)?,
        notes: r.get(9)?,
    })
}

/// Sets the declared interface of a model version. Returns whether the
/// version exists.
fn set_spec(
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
fn is_assigned(conn: &Connection, name: &str, version: u64) -> Result<bool, StoreError> {
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
fn set_test_vector(
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

fn get_model(
    conn: &Connection,
    name: &str,
    version: u64,
) -> Result<Option<ModelRecord>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT name, version, format, sha256, size, created_at, test_vector, spec, pushed_by, notes FROM models WHERE name = ?1 AND version = ?2",
            params![name, version as i64],
            model_from_row,
        )
        .optional()?)
}

fn list_models(conn: &Connection) -> Result<Vec<ModelRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT name, version, format, sha256, size, created_at, test_vector, spec, pushed_by, notes FROM models ORDER BY name, version",
    )?;
    let rows = stmt.query_map([], model_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

// ---- assignments -------------------------------------------------------------

/// Points `scope` (a device id or [`ALL_DEVICES`]) at a model version.
fn assign(conn: &Connection, scope: &str, model: &str, version: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO assignments (scope, model, version) VALUES (?1, ?2, ?3)
         ON CONFLICT (scope, model) DO UPDATE SET version = excluded.version",
        params![scope, model, version as i64],
    )?;
    Ok(())
}

/// The models `device` should run: fleet-wide assignments, overridden per
/// model by the device's own.
fn models_for_device(conn: &Connection, device: &str) -> Result<Vec<ModelRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT m.name, m.version, m.format, m.sha256, m.size, m.created_at, m.test_vector, m.spec, m.pushed_by, m.notes
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
fn record_event(conn: &Connection, e: &UpdateEvent) -> Result<bool, StoreError> {
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

fn events_for_device(
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

/// Stores a batch of streamed records in one transaction, each once:
/// redelivered copies (same device and sequence number) are ignored, so
/// at-least-once delivery becomes exactly-once storage. Returns how many
/// were new.
fn record_streamed(
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
        // One upsert per device in the batch, not per record.
        let mut devices: Vec<&str> = batch
            .iter()
            .map(|r| match r {
                Streamed::Telemetry(t) => t.device_id.as_str(),
                Streamed::Result(r) => r.device_id.as_str(),
            })
            .collect();
        devices.sort_unstable();
        devices.dedup();
        for id in devices {
            device.execute(params![id, now as i64])?;
        }
        for record in batch {
            let body = streamed_body(record)?;
            new += match record {
                Streamed::Telemetry(t) => telemetry.execute(params![
                    t.device_id.as_str(),
                    t.seq as i64,
                    t.at as i64,
                    now as i64,
                    body
                ])?,
                Streamed::Result(r) => result.execute(params![
                    r.device_id.as_str(),
                    r.seq as i64,
                    r.at as i64,
                    now as i64,
                    r.model,
                    r.model_version as i64,
                    r.request_id,
                    body
                ])?,
            };
        }
    }
    tx.commit()?;
    Ok(new)
}

/// Telemetry samples of a device in sequence order, each as the device
/// sent it plus `received_at`.
fn telemetry_for_device(
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
fn results_for_device(
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
    Ok(with_received_at(received_at, &body))
}

/// Deletes telemetry and results that arrived before `cutoff` (unix
/// seconds; arrival time, since device clocks may be wrong). Returns how
/// many rows went.
fn prune_streamed(conn: &Connection, cutoff: u64) -> Result<usize, StoreError> {
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

    /// A database written by a server before migration 5 (telemetry in a
    /// WITHOUT ROWID table) keeps its rows and its de-duplication.
    #[tokio::test]
    async fn rebuilding_the_stream_tables_keeps_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..4] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 4).unwrap();
            tx.execute(
                "INSERT INTO telemetry (device_id, seq, at, received_at, body) VALUES ('a', 1, 5, 6, '{\"seq\":1}')",
                [],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO results (device_id, seq, at, received_at, model, model_version, request_id, body)
                 VALUES ('a', 2, 5, 6, 'm', 1, 'r', '{\"seq\":2}')",
                [],
            )
            .unwrap();
            tx.execute(
                "INSERT INTO devices (id, first_seen, last_seen) VALUES ('a', 1, 1)",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let page = Page {
            after_seq: None,
            limit: 10,
        };
        let t = store
            .telemetry_for_device("a", &page)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0]["received_at"], 6);
        let r = store
            .results_for_device("a", Some("m"), &page)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.len(), 1);
        let duplicate = conn_insert_duplicate(&store).await;
        assert_eq!(duplicate, 0, "the unique key survives the rebuild");
    }

    async fn conn_insert_duplicate(store: &SqliteStore) -> usize {
        store
            .call(|conn| {
                Ok(conn.execute(
                    "INSERT OR IGNORE INTO telemetry (device_id, seq, at, received_at, body) VALUES ('a', 1, 7, 8, '{}')",
                    [],
                )?)
            })
            .await
            .unwrap()
    }
}
