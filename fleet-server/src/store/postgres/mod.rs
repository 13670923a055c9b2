//! The PostgreSQL backend, for fleets that outgrow one machine or run
//! several server processes on one database. All its SQL lives in this
//! module, by record family (`devices.rs`, `models.rs`, `agents.rs`, `streams.rs`,
//! `tokens.rs`).
//!
//! A small pool of connections (deadpool-postgres over tokio-postgres);
//! every operation is one transaction. Migrations run at start under an
//! advisory lock, so servers starting together apply each one once. The
//! schema is the search path's (`?options=-csearch_path%3Dname` in the URL
//! picks another), which is how the tests get a fresh one per run.

mod agents;
mod coordination;
mod devices;
mod models;
mod quality;
mod references;
mod sessions;
mod streams;
mod tokens;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

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

/// Any key: serialises migrations of edgefleet servers on one database.
const MIGRATION_LOCK: i64 = 0x6564_6765_666c_7431; // "edgeflt1"

fn pg(e: impl std::fmt::Display) -> StoreError {
    StoreError::Postgres(e.to_string())
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's message (with its detail) is the useful part.
        match e.as_db_error() {
            Some(db) => StoreError::Postgres(match db.detail() {
                Some(detail) => format!("{}: {detail}", db.message()),
                None => db.message().to_string(),
            }),
            None => StoreError::Postgres(e.to_string()),
        }
    }
}

/// The PostgreSQL database: a pool of connections.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn open_error(url: &str, reason: String) -> StoreError {
    StoreError::Open {
        what: redacted(url),
        reason,
    }
}

/// A pool of up to `max_size` connections to `url` (connecting lazily),
/// on the schema the URL's search path names, as the store's own; the
/// database artifact storage keeps its own pool so that long downloads do
/// not starve the store.
pub(crate) fn pool(url: &str, max_size: usize) -> Result<Pool, StoreError> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| open_error(url, format!("not a PostgreSQL URL: {e}")))?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .build()
        .map_err(|e| open_error(url, e.to_string()))
}

impl PgStore {
    /// Connects (a pool of up to 8 connections), checks the database
    /// answers, and applies the migrations it lacks.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_knowing(url, MIGRATIONS).await
    }

    /// Connects as a server that knows the migrations `known`:
    /// [`MIGRATIONS`], or a prefix of it where a test plays an earlier
    /// release.
    pub(crate) async fn connect_knowing(
        url: &str,
        known: &[Migration],
    ) -> Result<Self, StoreError> {
        let pool = pool(url, 8)?;
        let store = Self { pool };
        let mut client = tokio::time::timeout(std::time::Duration::from_secs(10), store.pool.get())
            .await
            .map_err(|_| open_error(url, "no answer within 10 s".into()))?
            .map_err(|e| open_error(url, e.to_string()))?;
        migrate(&mut client, known).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pg)
    }
}

/// Applies the migrations of `known` (the server's list, [`MIGRATIONS`]
/// but in tests that play an earlier release) the database lacks, all in
/// one transaction under the migration lock. `edgefleet_schema` holds one
/// row: how many of [`MIGRATIONS`] ran, with `shared_numbering` set, and
/// the oldest schema version a server must know to run on the database
/// (`min_server_schema`, see [`migrations`]; NULL where a release that
/// kept no record wrote the row). A row without `shared_numbering` counts
/// the six-step PostgreSQL-only list instead and is translated (see
/// [`migrations::POSTGRES_SIX_STEP_COUNTS`]); servers that only know that
/// list read the version alone, find it past their six and refuse to
/// start rather than misread the schema. A newer database is left as it
/// is, or refused (see [`migrations::pending`]).
async fn migrate(
    client: &mut deadpool_postgres::Client,
    known: &[Migration],
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // The columns are added here rather than by a migration because they
    // say which migrations ran. Releases that predate `min_server_schema`
    // rewrite the row without it (NULL, no record), so servers older than
    // the database are then refused, as before the record existed.
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS edgefleet_schema (version BIGINT NOT NULL);
         ALTER TABLE edgefleet_schema
             ADD COLUMN IF NOT EXISTS shared_numbering BOOLEAN NOT NULL DEFAULT FALSE;
         ALTER TABLE edgefleet_schema ADD COLUMN IF NOT EXISTS min_server_schema BIGINT",
    )
    .await?;
    let recorded = query_opt(
        &tx,
        "SELECT version, shared_numbering, min_server_schema FROM edgefleet_schema",
        &[],
        |r| Ok((r.int(0)? as usize, r.flag(1)?, r.opt_int(2)?)),
    )
    .await?;
    let (applied, min_server_schema) = match recorded {
        None => (0, None),
        Some((version, true, min)) => (version, min.map(|m| m as usize)),
        Some((count, false, _)) => (migrations::from_postgres_six_step(count)?, None),
    };
    let range = match migrations::pending(known, applied, min_server_schema)? {
        Pending::RunOnNewer => {
            tx.commit().await?;
            return Ok(());
        }
        Pending::Run(range) => range,
    };
    for i in range {
        let migration = &known[i];
        tracing::info!(
            number = i + 1,
            purpose = migration.purpose,
            "migrating the database"
        );
        if !migration.postgres.trim().is_empty() {
            tx.batch_execute(migration.postgres).await?;
        }
    }
    tx.execute("DELETE FROM edgefleet_schema", &[]).await?;
    tx.execute(
        "INSERT INTO edgefleet_schema (version, shared_numbering, min_server_schema)
         VALUES ($1, TRUE, $2)",
        &[
            &(known.len() as i64),
            &(migrations::min_server_schema(known) as i64),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

impl Columns for Row {
    fn text(&self, index: usize) -> Result<String, StoreError> {
        Ok(self.try_get(index)?)
    }
    fn opt_text(&self, index: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(index)?)
    }
    fn int(&self, index: usize) -> Result<i64, StoreError> {
        Ok(self.try_get(index)?)
    }
    fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(index)?)
    }
    fn flag(&self, index: usize) -> Result<bool, StoreError> {
        Ok(self.try_get(index)?)
    }
    fn opt_bytes(&self, index: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.try_get(index)?)
    }
}

/// Bound values of a statement.
type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Every row `sql` returns, each through `map`.
async fn query_all<T>(
    c: &impl GenericClient,
    sql: &str,
    params: &Params<'_>,
    map: impl Fn(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    c.query(sql, params)
        .await?
        .iter()
        .map(|row| map(row))
        .collect()
}

/// The row `sql` returns, through `map`, if there is one.
async fn query_opt<T>(
    c: &impl GenericClient,
    sql: &str,
    params: &Params<'_>,
    map: impl Fn(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    c.query_opt(sql, params)
        .await?
        .as_ref()
        .map(|row| map(row))
        .transpose()
}

/// PostgreSQL's spelling of built queries: `$n` placeholders, tags
/// matched with `->>` on the tags text read as JSONB.
struct Postgres;

impl Dialect for Postgres {
    fn placeholder(n: usize) -> String {
        format!("${n}")
    }
    fn tag_equals(key: &str, value: &str) -> String {
        format!("(tags::jsonb ->> {key}) = {value}")
    }
    fn tag_key(key: &str) -> String {
        key.to_string()
    }
}

/// A built query's value as tokio-postgres binds it.
fn bound(value: &SqlValue) -> &(dyn ToSql + Sync) {
    match value {
        SqlValue::Text(s) => s,
        SqlValue::Int(i) => i,
        SqlValue::Flag(b) => b,
    }
}

impl StoreBackend for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn record_messages<'a>(
        &'a self,
        statuses: &'a [StatusMessage],
        events: &'a [UpdateEvent],
        now: u64,
    ) -> StoreFuture<'a, (Vec<StatusOutcome>, Vec<bool>)> {
        Box::pin(async move {
            let mut client = self.client().await?;
            devices::record_messages(&mut client, statuses, events, now).await
        })
    }

    fn sign_desired<'a>(
        &'a self,
        device: &'a str,
        now: u64,
        sign: SignFn,
    ) -> StoreFuture<'a, Option<(u64, Vec<u8>)>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            devices::sign_desired(&mut client, device, now, sign).await
        })
    }

    fn all_desired(&self) -> StoreFuture<'_, Vec<(String, Vec<u8>)>> {
        Box::pin(async move { devices::all_desired(&self.client().await?).await })
    }

    fn desired_json<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move { devices::desired_json(&self.client().await?, device).await })
    }

    fn events_for_device<'a>(
        &'a self,
        device: &'a str,
        limit: u32,
    ) -> StoreFuture<'a, Vec<EventRecord>> {
        Box::pin(
            async move { streams::events_for_device(&self.client().await?, device, limit).await },
        )
    }

    fn list_devices(&self) -> StoreFuture<'_, Vec<DeviceRecord>> {
        Box::pin(async move { devices::list(&self.client().await?).await })
    }

    fn get_device<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<DeviceRecord>> {
        Box::pin(async move { devices::get(&self.client().await?, id).await })
    }

    fn find_devices<'a>(&'a self, filter: &'a DeviceFilter) -> StoreFuture<'a, Vec<DeviceRecord>> {
        Box::pin(async move { devices::find(&self.client().await?, filter).await })
    }

    fn enroll_device<'a>(
        &'a self,
        enrollment: &'a Enrollment,
        now: u64,
    ) -> StoreFuture<'a, DeviceRecord> {
        Box::pin(async move { devices::enroll(&self.client().await?, enrollment, now).await })
    }

    fn revoke_device<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, Option<DeviceRecord>> {
        Box::pin(async move { devices::revoke(&self.client().await?, id, now).await })
    }

    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a std::collections::BTreeMap<String, String>,
    ) -> StoreFuture<'a, Option<DeviceRecord>> {
        Box::pin(async move { devices::set_tags(&self.client().await?, id, tags).await })
    }

    fn delete_model<'a>(
        &'a self,
        name: &'a str,
        version: u64,
    ) -> StoreFuture<'a, (ModelRecord, bool)> {
        Box::pin(async move {
            let mut client = self.client().await?;
            models::delete(&mut client, name, version).await
        })
    }

    fn set_device_key<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        who: KeyWrite,
    ) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move { devices::set_key(&self.client().await?, id, key, who).await })
    }

    fn device_credential<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move { devices::credential(&self.client().await?, id).await })
    }

    fn add_model<'a>(&'a self, model: &'a ModelRecord) -> StoreFuture<'a, ModelRecord> {
        Box::pin(async move { models::add(&self.client().await?, model).await })
    }

    fn get_model<'a>(
        &'a self,
        name: &'a str,
        version: u64,
    ) -> StoreFuture<'a, Option<ModelRecord>> {
        Box::pin(async move { models::get(&self.client().await?, name, version).await })
    }

    fn list_models(&self) -> StoreFuture<'_, Vec<ModelRecord>> {
        Box::pin(async move { models::list(&self.client().await?).await })
    }

    fn attach<'a>(
        &'a self,
        name: &'a str,
        version: u64,
        attachment: Attachment,
    ) -> StoreFuture<'a, ModelRecord> {
        Box::pin(async move {
            let mut client = self.client().await?;
            models::attach(&mut client, name, version, &attachment).await
        })
    }

    fn deploy<'a>(
        &'a self,
        model: &'a str,
        version: u64,
        target: &'a Target,
        now: u64,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            models::deploy(&mut client, model, version, target, now).await
        })
    }

    fn set_quality<'a>(
        &'a self,
        model: &'a str,
        change: &'a super::quality::QualityChange,
        target: &'a Target,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            quality::set(&mut client, model, change, target).await
        })
    }

    fn models_for_device<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Vec<ModelRecord>> {
        Box::pin(async move { models::for_device(&self.client().await?, device).await })
    }

    fn record_streamed<'a>(&'a self, batch: &'a [Streamed], now: u64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let mut client = self.client().await?;
            streams::record(&mut client, batch, now).await
        })
    }

    fn telemetry_for_device<'a>(
        &'a self,
        device: &'a str,
        page: &'a Page,
    ) -> StoreFuture<'a, Option<Vec<serde_json::Value>>> {
        Box::pin(
            async move { streams::telemetry_for_device(&self.client().await?, device, page).await },
        )
    }

    fn recent_telemetry<'a>(
        &'a self,
        device: &'a str,
        since: u64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<serde_json::Value>> {
        Box::pin(async move {
            streams::recent_telemetry(&self.client().await?, device, since, limit).await
        })
    }

    fn results_for_device<'a>(
        &'a self,
        device: &'a str,
        model: Option<&'a str>,
        page: &'a Page,
    ) -> StoreFuture<'a, Option<Vec<serde_json::Value>>> {
        Box::pin(async move {
            streams::results_for_device(&self.client().await?, device, model, page).await
        })
    }

    fn save_rollout<'a>(
        &'a self,
        id: &'a str,
        active: bool,
        state: &'a str,
    ) -> StoreFuture<'a, ()> {
        Box::pin(
            async move { models::save_rollout(&self.client().await?, id, active, state).await },
        )
    }

    fn list_rollouts(&self) -> StoreFuture<'_, Vec<(String, bool, String)>> {
        Box::pin(async move { models::list_rollouts(&self.client().await?).await })
    }

    fn lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Option<u64>> {
        Box::pin(
            async move { coordination::lease(&self.client().await?, name, holder, ttl_ms).await },
        )
    }

    fn release_lease<'a>(&'a self, name: &'a str, holder: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(
            async move { coordination::release_lease(&self.client().await?, name, holder).await },
        )
    }

    fn push_rollout_inbox<'a>(
        &'a self,
        bodies: &'a [String],
        now: u64,
    ) -> StoreFuture<'a, Vec<i64>> {
        Box::pin(async move { coordination::push_inbox(&self.client().await?, bodies, now).await })
    }

    fn rollout_inbox(&self, limit: u32) -> StoreFuture<'_, Vec<(i64, String)>> {
        Box::pin(async move { coordination::inbox(&self.client().await?, limit).await })
    }

    fn settle_rollout_inbox<'a>(
        &'a self,
        done: &'a [i64],
        answers: &'a [(i64, String)],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut client = self.client().await?;
            coordination::settle_inbox(&mut client, done, answers).await
        })
    }

    fn take_rollout_outcome(&self, id: i64) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move { coordination::take_outcome(&self.client().await?, id).await })
    }

    fn prune_streamed(&self, cutoff: u64) -> StoreFuture<'_, usize> {
        Box::pin(async move { streams::prune(&self.client().await?, cutoff).await })
    }

    fn create_token<'a>(&'a self, token: &'a TokenRecord, hash: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move { tokens::create(&self.client().await?, token, hash).await })
    }

    fn token_for_auth<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<(TokenRecord, String)>> {
        Box::pin(async move { tokens::for_auth(&self.client().await?, id).await })
    }

    fn list_tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>> {
        Box::pin(async move { tokens::list(&self.client().await?).await })
    }

    fn revoke_token<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, Option<TokenRecord>> {
        Box::pin(async move { tokens::revoke(&self.client().await?, id, now).await })
    }

    fn record_audit<'a>(&'a self, entry: &'a AuditEntry) -> StoreFuture<'a, ()> {
        Box::pin(async move { tokens::record_audit(&self.client().await?, entry).await })
    }

    fn list_audit(&self, after_id: u64, limit: u32) -> StoreFuture<'_, Vec<AuditRecord>> {
        Box::pin(async move { tokens::list_audit(&self.client().await?, after_id, limit).await })
    }

    fn add_agent_build<'a>(
        &'a self,
        build: &'a AgentBuildRecord,
    ) -> StoreFuture<'a, AgentBuildRecord> {
        Box::pin(async move { agents::add_build(&self.client().await?, build).await })
    }

    fn agent_builds<'a>(
        &'a self,
        version: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<AgentBuildRecord>> {
        Box::pin(async move { agents::builds(&self.client().await?, version).await })
    }

    fn deploy_agent<'a>(
        &'a self,
        version: &'a str,
        allow_downgrade: bool,
        target: &'a Target,
        now: u64,
    ) -> StoreFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            agents::deploy(&mut client, version, allow_downgrade, target, now).await
        })
    }

    fn agent_for_device<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Option<AssignedAgent>> {
        Box::pin(async move { agents::for_device(&self.client().await?, device).await })
    }

    fn delete_agent_release<'a>(
        &'a self,
        version: &'a str,
    ) -> StoreFuture<'a, Vec<(AgentBuildRecord, bool)>> {
        Box::pin(async move {
            let mut client = self.client().await?;
            agents::delete_release(&mut client, version).await
        })
    }

    fn create_dashboard_session<'a>(
        &'a self,
        session: &'a super::DashboardSession,
        rules: &'a super::SessionRules,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut client = self.client().await?;
            sessions::create(&mut client, session, rules).await
        })
    }

    fn dashboard_session<'a>(
        &'a self,
        id_sha256: &'a str,
        now: u64,
        rules: &'a super::SessionRules,
    ) -> StoreFuture<'a, Option<super::DashboardSession>> {
        Box::pin(async move { sessions::get(&self.client().await?, id_sha256, now, rules).await })
    }

    fn touch_dashboard_session<'a>(&'a self, id_sha256: &'a str, now: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move { sessions::touch(&self.client().await?, id_sha256, now).await })
    }

    fn delete_dashboard_session<'a>(&'a self, id_sha256: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move { sessions::delete(&self.client().await?, id_sha256).await })
    }

    fn telemetry_arrived<'a>(
        &'a self,
        after: &'a super::ArrivalKey,
        limit: u32,
    ) -> StoreFuture<'a, Vec<(super::ArrivalKey, String)>> {
        Box::pin(
            async move { sessions::telemetry_arrived(&self.client().await?, after, limit).await },
        )
    }

    fn set_reference<'a>(
        &'a self,
        name: &'a str,
        version: u64,
        profile: &'a str,
        now: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut client = self.client().await?;
            references::set(&mut client, name, version, profile, now).await
        })
    }

    fn get_reference<'a>(&'a self, name: &'a str, version: u64) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move { references::get(&self.client().await?, name, version).await })
    }

    fn list_references(&self) -> StoreFuture<'_, Vec<(String, u64, String)>> {
        Box::pin(async move { references::list(&self.client().await?).await })
    }

    fn events_arrived<'a>(
        &'a self,
        after: &'a super::ArrivalKey,
        limit: u32,
    ) -> StoreFuture<'a, Vec<(super::ArrivalKey, EventRecord)>> {
        Box::pin(async move { sessions::events_arrived(&self.client().await?, after, limit).await })
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redacted("postgres://fleet:s3cret@db.example:5432/fleet"),
            "postgres://fleet@db.example:5432/fleet"
        );
        assert_eq!(
            redacted("postgres://127.0.0.1/test"),
            "postgres://127.0.0.1/test"
        );
    }
}
