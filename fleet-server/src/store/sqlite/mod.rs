//! The SQLite backend (the embedded default): one file in WAL mode. All
//! its SQL lives in this module, by record family (`devices.rs`,
//! `models.rs`, `agents.rs`, `streams.rs`, `tokens.rs`). rusqlite is blocking, so every
//! operation runs on the blocking pool through [`SqliteStore::call`], one
//! transaction each; the [`StoreBackend`] methods below copy their
//! arguments there and call the family's function.

mod agents;
mod coordination;
mod devices;
mod models;
mod quality;
mod references;
mod sessions;
mod streams;
mod tokens;

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Params, Row};

use edgefleet_shared::{StatusMessage, UpdateEvent};

use crate::auth::TokenRecord;

use super::backend::{StoreBackend, StoreFuture};
use super::filter::{Dialect, SqlValue};
use super::migrations::{self, Migration, Pending, MIGRATIONS};
use super::rows::Columns;
use super::{
    AgentBuildRecord, AssignedAgent, Attachment, AuditEntry, AuditRecord, DeviceFilter,
    DeviceRecord, Enrollment, EventRecord, KeyWrite, ModelRecord, Page, SignFn, StatusOutcome,
    StoreError, Streamed, Target,
};

/// The SQLite database: one connection, shared by the operations in turn.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

/// Applies the migrations of `known` (the server's list, [`MIGRATIONS`]
/// but in tests that play an earlier release) the database lacks, each in
/// its own transaction together with the new `user_version` and the
/// oldest schema version a server must know to run on the database (a
/// one-row `edgefleet_schema` table; see [`migrations`]). A newer database
/// is left as it is, or refused (see [`migrations::pending`]).
fn migrate(conn: &mut Connection, known: &[Migration]) -> Result<(), StoreError> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let recorded = min_server_schema(conn)?;
    let range = match migrations::pending(known, applied as usize, recorded)? {
        Pending::RunOnNewer => return Ok(()),
        Pending::Run(range) => range,
    };
    // A database migrated by a release that kept no record gets one.
    if range.is_empty() && recorded != Some(migrations::min_server_schema(known)) {
        let tx = conn.transaction()?;
        record_min_server_schema(&tx, known)?;
        tx.commit()?;
    }
    for i in range {
        let migration = &known[i];
        tracing::info!(
            number = i + 1,
            purpose = migration.purpose,
            "migrating the database"
        );
        let tx = conn.transaction()?;
        tx.execute_batch(migration.sqlite)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        record_min_server_schema(&tx, &known[..=i])?;
        tx.commit()?;
    }
    Ok(())
}

/// The oldest schema version the database says a server must know, if it
/// says.
fn min_server_schema(conn: &Connection) -> Result<Option<usize>, StoreError> {
    let has_record: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'edgefleet_schema')",
        [],
        |r| r.get(0),
    )?;
    if !has_record {
        return Ok(None);
    }
    let min: Option<i64> = conn
        .query_row("SELECT min_server_schema FROM edgefleet_schema", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(min.map(|m| m as usize))
}

/// Records what a database migrated through `applied` asks of servers.
fn record_min_server_schema(conn: &Connection, applied: &[Migration]) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS edgefleet_schema (min_server_schema INTEGER NOT NULL);
         DELETE FROM edgefleet_schema;",
    )?;
    conn.execute(
        "INSERT INTO edgefleet_schema (min_server_schema) VALUES (?1)",
        [migrations::min_server_schema(applied) as i64],
    )?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_knowing(path, MIGRATIONS)
    }

    /// Opens the database file as a server that knows the migrations
    /// `known`: [`MIGRATIONS`], or a prefix of it where a test plays an
    /// earlier release.
    pub(crate) fn open_knowing(path: &Path, known: &[Migration]) -> Result<Self, StoreError> {
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
        migrate(&mut conn, known)?;
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

impl Columns for Row<'_> {
    fn text(&self, index: usize) -> Result<String, StoreError> {
        Ok(self.get(index)?)
    }
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(index)?)
    }
    fn int(&self, index: usize) -> Result<i64, StoreError> {
        Ok(self.get(index)?)
    }
    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(index)?)
    }
    fn flag(&self, index: usize) -> Result<bool, StoreError> {
        Ok(self.get::<_, i64>(index)? != 0)
    }
    fn opt_bytes(&self, index: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(index)?)
    }
}

/// Every row `sql` returns, each through `map`.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    map: impl Fn(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}

/// The first row `sql` returns, through `map`, if there is one.
fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    map: impl Fn(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    rows.next()?.map(|row| map(row)).transpose()
}

/// SQLite's spelling of built queries: numbered `?n` placeholders, tags
/// matched with `json_extract`.
struct Sqlite;

impl Dialect for Sqlite {
    fn placeholder(n: usize) -> String {
        format!("?{n}")
    }
    fn tag_equals(key: &str, value: &str) -> String {
        format!("json_extract(tags, {key}) = {value}")
    }
    fn tag_key(key: &str) -> String {
        // Keys are validated ([A-Za-z0-9._-]); quoted in the path so dots
        // stay part of the key.
        format!("$.\"{key}\"")
    }
}

impl From<SqlValue> for Value {
    fn from(v: SqlValue) -> Self {
        match v {
            SqlValue::Text(s) => Value::Text(s),
            SqlValue::Int(i) => Value::Integer(i),
            SqlValue::Flag(b) => Value::Integer(i64::from(b)),
        }
    }
}

impl StoreBackend for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn record_messages<'a>(
        &'a self,
        statuses: &'a [StatusMessage],
        events: &'a [UpdateEvent],
        now: u64,
    ) -> StoreFuture<'a, (Vec<StatusOutcome>, Vec<bool>)> {
        let (statuses, events) = (statuses.to_vec(), events.to_vec());
        Box::pin(self.call(move |conn| devices::record_messages(conn, &statuses, &events, now)))
    }

    fn sign_desired<'a>(
        &'a self,
        device: &'a str,
        now: u64,
        sign: SignFn,
    ) -> StoreFuture<'a, Option<(u64, Vec<u8>)>> {
        let id = device.to_string();
        Box::pin(self.call(move |conn| devices::sign_desired(conn, &id, now, sign)))
    }

    fn all_desired(&self) -> StoreFuture<'_, Vec<(String, Vec<u8>)>> {
        Box::pin(self.call(|conn| devices::all_desired(conn)))
    }

    fn desired_json<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        let id = device.to_string();
        Box::pin(self.call(move |conn| devices::desired_json(conn, &id)))
    }

    fn events_for_device<'a>(
        &'a self,
        device: &'a str,
        limit: u32,
    ) -> StoreFuture<'a, Vec<EventRecord>> {
        let id = device.to_string();
        Box::pin(self.call(move |conn| streams::events_for_device(conn, &id, limit)))
    }

    fn list_devices(&self) -> StoreFuture<'_, Vec<DeviceRecord>> {
        Box::pin(self.call(|conn| devices::list(conn)))
    }

    fn get_device<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<DeviceRecord>> {
        let id = id.to_string();
        Box::pin(self.call(move |conn| devices::get(conn, &id)))
    }

    fn find_devices<'a>(&'a self, filter: &'a DeviceFilter) -> StoreFuture<'a, Vec<DeviceRecord>> {
        let filter = filter.clone();
        Box::pin(self.call(move |conn| devices::find(conn, &filter)))
    }

    fn enroll_device<'a>(
        &'a self,
        enrollment: &'a Enrollment,
        now: u64,
    ) -> StoreFuture<'a, DeviceRecord> {
        let enrollment = enrollment.clone();
        Box::pin(self.call(move |conn| devices::enroll(conn, &enrollment, now)))
    }

    fn revoke_device<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, Option<DeviceRecord>> {
        let id = id.to_string();
        Box::pin(self.call(move |conn| devices::revoke(conn, &id, now)))
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a std::collections::BTreeMap<String, String>,
    ) -> StoreFuture<'a, Option<DeviceRecord>> {
        let (id, tags) = (id.to_string(), tags.clone());
        Box::pin(self.call(move |conn| devices::set_tags(conn, &id, &tags)))
    }

    fn delete_model<'a>(
        &'a self,
        name: &'a str,
        version: u64,
    ) -> StoreFuture<'a, (ModelRecord, bool)> {
        let name = name.to_string();
        Box::pin(self.call(move |conn| models::delete(conn, &name, version)))
    }

    fn set_device_key<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        who: KeyWrite,
    ) -> StoreFuture<'a, Option<String>> {
        let (id, key) = (id.to_string(), key.to_string());
        Box::pin(self.call(move |conn| devices::set_key(conn, &id, &key, who)))
    }

    fn device_credential<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<String>> {
        let id = id.to_string();
        Box::pin(self.call(move |conn| devices::credential(conn, &id)))
    }

    fn add_model<'a>(&'a self, model: &'a ModelRecord) -> StoreFuture<'a, ModelRecord> {
        let model = model.clone();
        Box::pin(self.call(move |conn| models::add(conn, &model)))
    }

    fn get_model<'a>(
        &'a self,
        name: &'a str,
        version: u64,
    ) -> StoreFuture<'a, Option<ModelRecord>> {
        let name = name.to_string();
        Box::pin(self.call(move |conn| models::get(conn, &name, version)))
    }

    fn list_models(&self) -> StoreFuture<'_, Vec<ModelRecord>> {
        Box::pin(self.call(|conn| models::list(conn)))
    }

    fn attach<'a>(
        &'a self,
        name: &'a str,
        version: u64,
        attachment: Attachment,
    ) -> StoreFuture<'a, ModelRecord> {
        let name = name.to_string();
        Box::pin(self.call(move |conn| models::attach(conn, &name, version, &attachment)))
    }

    fn deploy<'a>(
        &'a self,
        model: &'a str,
        version: u64,
        target: &'a Target,
        now: u64,
    ) -> StoreFuture<'a, Vec<String>> {
        let (model, target) = (model.to_string(), target.clone());
        Box::pin(self.call(move |conn| models::deploy(conn, &model, version, &target, now)))
    }

    fn set_quality<'a>(
        &'a self,
        model: &'a str,
        change: &'a super::quality::QualityChange,
        target: &'a Target,
    ) -> StoreFuture<'a, Vec<String>> {
        let (model, change, target) = (model.to_string(), change.clone(), target.clone());
        Box::pin(self.call(move |conn| quality::set(conn, &model, &change, &target)))
    }

    fn models_for_device<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Vec<ModelRecord>> {
        let id = device.to_string();
        Box::pin(self.call(move |conn| models::for_device(conn, &id)))
    }

    fn record_streamed<'a>(&'a self, batch: &'a [Streamed], now: u64) -> StoreFuture<'a, usize> {
        let batch = batch.to_vec();
        Box::pin(self.call(move |conn| streams::record(conn, &batch, now)))
    }

    fn telemetry_for_device<'a>(
        &'a self,
        device: &'a str,
        page: &'a Page,
    ) -> StoreFuture<'a, Option<Vec<serde_json::Value>>> {
        let (id, page) = (device.to_string(), page.clone());
        Box::pin(self.call(move |conn| streams::telemetry_for_device(conn, &id, &page)))
    }

    fn recent_telemetry<'a>(
        &'a self,
        device: &'a str,
        since: u64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<serde_json::Value>> {
        let id = device.to_string();
        Box::pin(self.call(move |conn| streams::recent_telemetry(conn, &id, since, limit)))
    }

    fn results_for_device<'a>(
        &'a self,
        device: &'a str,
        model: Option<&'a str>,
        page: &'a Page,
    ) -> StoreFuture<'a, Option<Vec<serde_json::Value>>> {
        let (id, model, page) = (device.to_string(), model.map(str::to_string), page.clone());
        Box::pin(
            self.call(move |conn| streams::results_for_device(conn, &id, model.as_deref(), &page)),
        )
    }

    fn save_rollout<'a>(
        &'a self,
        id: &'a str,
        active: bool,
        state: &'a str,
    ) -> StoreFuture<'a, ()> {
        let (id, state) = (id.to_string(), state.to_string());
        Box::pin(self.call(move |conn| models::save_rollout(conn, &id, active, &state)))
    }

    fn list_rollouts(&self) -> StoreFuture<'_, Vec<(String, bool, String)>> {
        Box::pin(self.call(|conn| models::list_rollouts(conn)))
    }

    fn lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        let (name, holder) = (name.to_string(), holder.to_string());
        Box::pin(self.call(move |conn| coordination::lease(conn, &name, &holder, ttl_ms)))
    }

    fn release_lease<'a>(&'a self, name: &'a str, holder: &'a str) -> StoreFuture<'a, ()> {
        let (name, holder) = (name.to_string(), holder.to_string());
        Box::pin(self.call(move |conn| coordination::release_lease(conn, &name, &holder)))
    }

    fn push_rollout_inbox<'a>(
        &'a self,
        bodies: &'a [String],
        now: u64,
    ) -> StoreFuture<'a, Vec<i64>> {
        let bodies = bodies.to_vec();
        Box::pin(self.call(move |conn| coordination::push_inbox(conn, &bodies, now)))
    }

    fn rollout_inbox(&self, limit: u32) -> StoreFuture<'_, Vec<(i64, String)>> {
        Box::pin(self.call(move |conn| coordination::inbox(conn, limit)))
    }

    fn settle_rollout_inbox<'a>(
        &'a self,
        done: &'a [i64],
        answers: &'a [(i64, String)],
    ) -> StoreFuture<'a, ()> {
        let (done, answers) = (done.to_vec(), answers.to_vec());
        Box::pin(self.call(move |conn| coordination::settle_inbox(conn, &done, &answers)))
    }

    fn take_rollout_outcome(&self, id: i64) -> StoreFuture<'_, Option<String>> {
        Box::pin(self.call(move |conn| coordination::take_outcome(conn, id)))
    }

    fn prune_streamed(&self, cutoff: u64) -> StoreFuture<'_, usize> {
        Box::pin(self.call(move |conn| streams::prune(conn, cutoff)))
    }

    fn create_token<'a>(&'a self, token: &'a TokenRecord, hash: &'a str) -> StoreFuture<'a, ()> {
        let (token, hash) = (token.clone(), hash.to_string());
        Box::pin(self.call(move |conn| tokens::create(conn, &token, &hash)))
    }

    fn token_for_auth<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<(TokenRecord, String)>> {
        let id = id.to_string();
        Box::pin(self.call(move |conn| tokens::for_auth(conn, &id)))
    }

    fn list_tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(self.call(|conn| tokens::list(conn)))
    }

    fn revoke_token<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, Option<TokenRecord>> {
        let id = id.to_string();
        Box::pin(self.call(move |conn| tokens::revoke(conn, &id, now)))
    }

    fn record_audit<'a>(&'a self, entry: &'a AuditEntry) -> StoreFuture<'a, ()> {
        let entry = entry.clone();
        Box::pin(self.call(move |conn| tokens::record_audit(conn, &entry)))
    }

    fn list_audit(&self, after_id: u64, limit: u32) -> StoreFuture<'_, Vec<AuditRecord>> {
        Box::pin(self.call(move |conn| tokens::list_audit(conn, after_id, limit)))
    }

    fn add_agent_build<'a>(
        &'a self,
        build: &'a AgentBuildRecord,
    ) -> StoreFuture<'a, AgentBuildRecord> {
        let build = build.clone();
        Box::pin(self.call(move |conn| agents::add_build(conn, &build)))
    }

    fn agent_builds<'a>(
        &'a self,
        version: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<AgentBuildRecord>> {
        let version = version.map(str::to_string);
        Box::pin(self.call(move |conn| agents::builds(conn, version.as_deref())))
    }

    fn deploy_agent<'a>(
        &'a self,
        version: &'a str,
        allow_downgrade: bool,
        target: &'a Target,
        now: u64,
    ) -> StoreFuture<'a, Vec<String>> {
        let (version, target) = (version.to_string(), target.clone());
        Box::pin(
            self.call(move |conn| agents::deploy(conn, &version, allow_downgrade, &target, now)),
        )
    }

    fn agent_for_device<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Option<AssignedAgent>> {
        let id = device.to_string();
        Box::pin(self.call(move |conn| agents::for_device(conn, &id)))
    }

    fn delete_agent_release<'a>(
        &'a self,
        version: &'a str,
    ) -> StoreFuture<'a, Vec<(AgentBuildRecord, bool)>> {
        let version = version.to_string();
        Box::pin(self.call(move |conn| agents::delete_release(conn, &version)))
    }

    fn create_dashboard_session<'a>(
        &'a self,
        session: &'a super::DashboardSession,
        rules: &'a super::SessionRules,
    ) -> StoreFuture<'a, ()> {
        let (session, rules) = (session.clone(), *rules);
        Box::pin(self.call(move |conn| sessions::create(conn, &session, &rules)))
    }

    fn dashboard_session<'a>(
        &'a self,
        id_sha256: &'a str,
        now: u64,
        rules: &'a super::SessionRules,
    ) -> StoreFuture<'a, Option<super::DashboardSession>> {
        let (id, rules) = (id_sha256.to_string(), *rules);
        Box::pin(self.call(move |conn| sessions::get(conn, &id, now, &rules)))
    }

    fn touch_dashboard_session<'a>(&'a self, id_sha256: &'a str, now: u64) -> StoreFuture<'a, ()> {
        let id = id_sha256.to_string();
        Box::pin(self.call(move |conn| sessions::touch(conn, &id, now)))
    }

    fn delete_dashboard_session<'a>(&'a self, id_sha256: &'a str) -> StoreFuture<'a, ()> {
        let id = id_sha256.to_string();
        Box::pin(self.call(move |conn| sessions::delete(conn, &id)))
    }

    fn telemetry_arrived<'a>(
        &'a self,
        after: &'a super::ArrivalKey,
        limit: u32,
    ) -> StoreFuture<'a, Vec<(super::ArrivalKey, String)>> {
        let after = after.clone();
        Box::pin(self.call(move |conn| sessions::telemetry_arrived(conn, &after, limit)))
    }

    fn set_reference<'a>(
        &'a self,
        name: &'a str,
        version: u64,
        profile: &'a str,
        now: u64,
    ) -> StoreFuture<'a, ()> {
        let (name, profile) = (name.to_string(), profile.to_string());
        Box::pin(self.call(move |conn| references::set(conn, &name, version, &profile, now)))
    }

    fn get_reference<'a>(&'a self, name: &'a str, version: u64) -> StoreFuture<'a, Option<String>> {
        let name = name.to_string();
        Box::pin(self.call(move |conn| references::get(conn, &name, version)))
    }

    fn list_references(&self) -> StoreFuture<'_, Vec<(String, u64, String)>> {
        Box::pin(self.call(|conn| references::list(conn)))
    }

    fn events_arrived<'a>(
        &'a self,
        after: &'a super::ArrivalKey,
        limit: u32,
    ) -> StoreFuture<'a, Vec<(super::ArrivalKey, EventRecord)>> {
        let after = after.clone();
        Box::pin(self.call(move |conn| sessions::events_arrived(conn, &after, limit)))
    }
}
