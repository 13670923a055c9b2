//! The PostgreSQL backend, for fleets that outgrow one machine or run
//! several server processes on one database. All its SQL lives here.
//!
//! A small pool of connections (deadpool-postgres over tokio-postgres);
//! every operation is one transaction. Migrations run at start under an
//! advisory lock, so servers starting together apply each one once. The
//! schema is the search path's (`?options=-csearch_path%3Dname` in the URL
//! picks another), which is how the tests get a fresh one per run.

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use edgefleet_shared::{ModelFormat, StatusMessage, UpdateEvent};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::auth::{Scope, TokenRecord};

use super::{
    changed_model, deployed_conflict, missing_model, streamed_body, with_received_at, Attachment,
    AuditEntry, AuditRecord, DeviceRecord, EventRecord, ModelRecord, Page, SignFn, StatusOutcome,
    StoreError, Streamed, Target, ALL_DEVICES,
};
use super::{DeviceFilter, Enrollment, KeyWrite};

/// Ordered schema migrations; `edgefleet_schema` records how many ran.
/// Integers are BIGINT (unix seconds, versions, sequence numbers); JSON
/// bodies are TEXT, stored and returned as the device sent them.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        online BOOLEAN NOT NULL DEFAULT FALSE,
        agent_version TEXT NOT NULL DEFAULT '',
        reported_desired_version BIGINT,
        models_json TEXT NOT NULL DEFAULT '[]',
        last_status_seq BIGINT NOT NULL DEFAULT 0,
        desired_version BIGINT NOT NULL DEFAULT 0,
        desired_json BYTEA
    );
    CREATE TABLE models (
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        format TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        test_vector TEXT,
        spec TEXT,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE assignments (
        scope TEXT NOT NULL,
        model TEXT NOT NULL,
        version BIGINT NOT NULL,
        PRIMARY KEY (scope, model)
    );
    CREATE TABLE events (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        at BIGINT NOT NULL,
        kind TEXT NOT NULL,
        desired_version BIGINT,
        model TEXT,
        model_version BIGINT,
        reason TEXT,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX events_by_time ON events (device_id, at);
    CREATE TABLE telemetry (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        at BIGINT NOT NULL,
        received_at BIGINT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX telemetry_by_arrival ON telemetry (received_at);
    CREATE TABLE results (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        at BIGINT NOT NULL,
        received_at BIGINT NOT NULL,
        model TEXT NOT NULL,
        model_version BIGINT NOT NULL,
        request_id TEXT,
        body TEXT NOT NULL,
        PRIMARY KEY (device_id, seq)
    );
    CREATE INDEX results_by_arrival ON results (received_at);
    "#,
    // 2: operator tokens (hashes only) and the audit log.
    r#"
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        scope TEXT NOT NULL,
        hash TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT
    );
    CREATE TABLE audit (
        id BIGSERIAL PRIMARY KEY,
        at BIGINT NOT NULL,
        token_id TEXT,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT
    );
    "#,
    // 3: enrollment: hardware class, tags (a JSON object), the
    // credential's hash, revocation.
    r#"
    ALTER TABLE devices ADD COLUMN hardware TEXT;
    ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE devices ADD COLUMN enrolled_at BIGINT;
    ALTER TABLE devices ADD COLUMN credential TEXT;
    ALTER TABLE devices ADD COLUMN revoked_at BIGINT;
    "#,
    // 4: who pushed a model version, and their notes.
    r#"
    ALTER TABLE models ADD COLUMN pushed_by TEXT;
    ALTER TABLE models ADD COLUMN notes TEXT;
    "#,
    // 5: staged rollouts (definition and planner state as JSON).
    r#"
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        active BOOLEAN NOT NULL,
        state TEXT NOT NULL,
        seq BIGSERIAL
    );
    "#,
    // 6: each device's message-signing public key (hex).
    r#"
    ALTER TABLE devices ADD COLUMN device_key TEXT;
    "#,
];

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

impl PgStore {
    /// Connects (a pool of up to 8 connections), checks the database
    /// answers, and applies the migrations it lacks.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let open_error = |reason: String| StoreError::Open {
            what: redacted(url),
            reason,
        };
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| open_error(format!("not a PostgreSQL URL: {e}")))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .build()
            .map_err(|e| open_error(e.to_string()))?;
        let store = Self { pool };
        let mut client = tokio::time::timeout(std::time::Duration::from_secs(10), store.pool.get())
            .await
            .map_err(|_| open_error("no answer within 10 s".into()))?
            .map_err(|e| open_error(e.to_string()))?;
        migrate(&mut client).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pg)
    }

    pub async fn record_messages(
        &self,
        statuses: &[StatusMessage],
        events: &[UpdateEvent],
        now: u64,
    ) -> Result<(Vec<StatusOutcome>, Vec<bool>), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Rows locked in device order (a stable sort keeps each device's
        // messages in arrival order), so batches cannot deadlock.
        let mut order: Vec<usize> = (0..statuses.len()).collect();
        order.sort_by(|&a, &b| {
            statuses[a]
                .device_id
                .as_str()
                .cmp(statuses[b].device_id.as_str())
        });
        let mut outcomes: Vec<Option<StatusOutcome>> = vec![None; statuses.len()];
        for i in order {
            outcomes[i] = Some(record_status(&tx, &statuses[i], now).await?);
        }
        let mut new = Vec::with_capacity(events.len());
        for e in events {
            new.push(record_event(&tx, e).await?);
        }
        tx.commit().await?;
        Ok((outcomes.into_iter().flatten().collect(), new))
    }

    pub async fn sign_desired(
        &self,
        device: &str,
        now: u64,
        sign: SignFn,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let models = models_for_device(&tx, device).await?;
        if models.is_empty() {
            return Ok(None);
        }
        ensure_device(&tx, device, now).await?;
        let current: i64 = tx
            .query_one(
                "SELECT desired_version FROM devices WHERE id = $1 FOR UPDATE",
                &[&device],
            )
            .await?
            .get(0);
        let version = current as u64 + 1;
        let bytes = sign(&models, version);
        tx.execute(
            "UPDATE devices SET desired_version = $2, desired_json = $3 WHERE id = $1",
            &[&device, &(version as i64), &bytes],
        )
        .await?;
        tx.commit().await?;
        Ok(Some((version, bytes)))
    }

    pub async fn all_desired(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, desired_json FROM devices WHERE desired_json IS NOT NULL ORDER BY id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn desired_json(&self, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt("SELECT desired_json FROM devices WHERE id = $1", &[&device])
            .await?
            .and_then(|r| r.get::<_, Option<Vec<u8>>>(0)))
    }

    pub async fn events_for_device(
        &self,
        device: &str,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT device_id, seq, at, kind, desired_version, model, model_version, reason
                 FROM events WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
                &[&device, &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| EventRecord {
                device_id: r.get(0),
                seq: r.get::<_, i64>(1) as u64,
                at: r.get::<_, i64>(2) as u64,
                kind: r.get(3),
                desired_version: r.get::<_, Option<i64>>(4).map(|v| v as u64),
                model: r.get(5),
                model_version: r.get::<_, Option<i64>>(6).map(|v| v as u64),
                reason: r.get(7),
            })
            .collect())
    }

    pub async fn list_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        list_devices(&client).await
    }

    pub async fn get_device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        get_device(&client, id).await
    }

    pub async fn find_devices(
        &self,
        filter: &DeviceFilter,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        let after = filter.after.clone().unwrap_or_default();
        let online = filter.online;
        let limit = i64::from(filter.limit);
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after];
        let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id > $1");
        if let Some(hw) = &filter.hardware {
            params.push(hw);
            sql += &format!(" AND hardware = ${}", params.len());
        }
        if let Some(online) = &online {
            params.push(online);
            sql += &format!(" AND online = ${}", params.len());
        }
        for (key, value) in &filter.tags {
            params.push(key);
            params.push(value);
            sql += &format!(
                " AND (tags::jsonb ->> ${}) = ${}",
                params.len() - 1,
                params.len()
            );
        }
        params.push(&limit);
        sql += &format!(" ORDER BY id LIMIT ${}", params.len());
        let rows = client.query(&sql, &params).await?;
        Ok(rows.iter().map(device_from_row).collect())
    }

    pub async fn enroll_device(
        &self,
        e: &Enrollment,
        now: u64,
    ) -> Result<DeviceRecord, StoreError> {
        let client = self.client().await?;
        let tags = serde_json::to_string(&e.tags).expect("tags serialise");
        client
            .execute(
                "INSERT INTO devices (id, first_seen, last_seen, hardware, tags, enrolled_at, credential, device_key)
                 VALUES ($1, $2, $2, $3, $4, $2, $5, $6)
                 ON CONFLICT (id) DO UPDATE SET hardware = excluded.hardware, tags = excluded.tags,
                    enrolled_at = excluded.enrolled_at, credential = excluded.credential, revoked_at = NULL,
                    device_key = excluded.device_key",
                &[&e.id, &(now as i64), &e.hardware, &tags, &e.credential, &e.public_key],
            )
            .await?;
        get_device(&client, &e.id)
            .await?
            .ok_or_else(|| StoreError::NotFound(e.id.clone()))
    }

    pub async fn revoke_device(
        &self,
        id: &str,
        now: u64,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE devices SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &(now as i64)],
            )
            .await?;
        get_device(&client, id).await
    }

    pub async fn set_tags(
        &self,
        id: &str,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let client = self.client().await?;
        let tags = serde_json::to_string(tags).expect("tags serialise");
        client
            .execute("UPDATE devices SET tags = $2 WHERE id = $1", &[&id, &tags])
            .await?;
        get_device(&client, id).await
    }

    pub async fn delete_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<(ModelRecord, bool), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Locked against a concurrent deployment of this version.
        let record = tx
            .query_opt(
                &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2 FOR UPDATE"),
                &[&name, &(version as i64)],
            )
            .await?
            .as_ref()
            .map(model_from_row)
            .ok_or_else(|| missing_model(name, version))?;
        let assigned = tx
            .query_opt(
                "SELECT 1 FROM assignments WHERE model = $1 AND version = $2 LIMIT 1",
                &[&name, &(version as i64)],
            )
            .await?
            .is_some();
        if assigned {
            return Err(StoreError::Conflict(format!(
                "model {name} version {version} is deployed; deploy another version first"
            )));
        }
        tx.execute(
            "DELETE FROM models WHERE name = $1 AND version = $2",
            &[&name, &(version as i64)],
        )
        .await?;
        let still_used = tx
            .query_opt(
                "SELECT 1 FROM models WHERE sha256 = $1 LIMIT 1",
                &[&record.sha256],
            )
            .await?
            .is_some();
        tx.commit().await?;
        Ok((record, still_used))
    }

    pub async fn models_for_device(&self, device: &str) -> Result<Vec<ModelRecord>, StoreError> {
        let client = self.client().await?;
        models_for_device(&client, device).await
    }

    pub async fn save_rollout(
        &self,
        id: &str,
        active: bool,
        state: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO rollouts (id, active, state) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET active = excluded.active, state = excluded.state",
                &[&id, &active, &state],
            )
            .await?;
        Ok(())
    }

    pub async fn list_rollouts(&self) -> Result<Vec<(String, bool, String)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT id, active, state FROM rollouts ORDER BY seq", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub async fn set_device_key(
        &self,
        id: &str,
        key: &str,
        who: KeyWrite,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        match who {
            KeyWrite::Operator => {
                client
                    .execute(
                        "UPDATE devices SET device_key = $2 WHERE id = $1",
                        &[&id, &key],
                    )
                    .await?
            }
            KeyWrite::FirstOnly => {
                client
                    .execute(
                        "UPDATE devices SET device_key = $2 WHERE id = $1 AND device_key IS NULL",
                        &[&id, &key],
                    )
                    .await?
            }
        };
        Ok(client
            .query_opt("SELECT device_key FROM devices WHERE id = $1", &[&id])
            .await?
            .and_then(|r| r.get::<_, Option<String>>(0)))
    }

    pub async fn device_credential(&self, id: &str) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                "SELECT credential FROM devices WHERE id = $1 AND revoked_at IS NULL",
                &[&id],
            )
            .await?
            .and_then(|r| r.get::<_, Option<String>>(0)))
    }

    pub async fn add_model(&self, m: &ModelRecord) -> Result<ModelRecord, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "INSERT INTO models (name, version, format, sha256, size, created_at, pushed_by, notes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                &[
                    &m.name,
                    &(m.version as i64),
                    &m.format.to_string(),
                    &m.sha256,
                    &(m.size as i64),
                    &(m.created_at as i64),
                    &m.pushed_by,
                    &m.notes,
                ],
            )
            .await?;
        if n == 1 {
            return Ok(m.clone());
        }
        let existing = get_model(&client, &m.name, m.version)
            .await?
            .ok_or_else(|| missing_model(&m.name, m.version))?;
        if existing.sha256 == m.sha256 {
            Ok(existing)
        } else {
            Err(changed_model(&existing, m))
        }
    }

    pub async fn get_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let client = self.client().await?;
        get_model(&client, name, version).await
    }

    pub async fn list_models(&self) -> Result<Vec<ModelRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name, version"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(model_from_row).collect())
    }

    pub async fn attach(
        &self,
        name: &str,
        version: u64,
        attachment: Attachment,
    ) -> Result<ModelRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Lock the version against a concurrent deployment.
        let exists = tx
            .query_opt(
                "SELECT 1 FROM models WHERE name = $1 AND version = $2 FOR UPDATE",
                &[&name, &(version as i64)],
            )
            .await?
            .is_some();
        if !exists {
            return Err(missing_model(name, version));
        }
        let assigned = tx
            .query_opt(
                "SELECT 1 FROM assignments WHERE model = $1 AND version = $2 LIMIT 1",
                &[&name, &(version as i64)],
            )
            .await?
            .is_some();
        if assigned {
            return Err(deployed_conflict(name, version, attachment.what()));
        }
        let (column, json) = match &attachment {
            Attachment::Spec(spec) => ("spec", serde_json::to_string(spec)),
            Attachment::TestVector(tv) => ("test_vector", serde_json::to_string(tv)),
        };
        let json = json.map_err(|e| StoreError::Task(e.to_string()))?;
        tx.execute(
            &format!("UPDATE models SET {column} = $3 WHERE name = $1 AND version = $2"),
            &[&name, &(version as i64), &json],
        )
        .await?;
        let record = get_model(&tx, name, version)
            .await?
            .ok_or_else(|| missing_model(name, version))?;
        tx.commit().await?;
        Ok(record)
    }

    pub async fn deploy(
        &self,
        model: &str,
        version: u64,
        target: &Target,
        now: u64,
    ) -> Result<Vec<String>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let exists = tx
            .query_opt(
                "SELECT 1 FROM models WHERE name = $1 AND version = $2 FOR SHARE",
                &[&model, &(version as i64)],
            )
            .await?
            .is_some();
        if !exists {
            return Err(missing_model(model, version));
        }
        let assign = "INSERT INTO assignments (scope, model, version) VALUES ($1, $2, $3)
                      ON CONFLICT (scope, model) DO UPDATE SET version = excluded.version";
        let ids = match target {
            Target::All => {
                tx.execute(assign, &[&ALL_DEVICES, &model, &(version as i64)])
                    .await?;
                list_devices(&tx).await?.into_iter().map(|d| d.id).collect()
            }
            Target::Devices(ids) => {
                for id in ids {
                    ensure_device(&tx, id, now).await?;
                    tx.execute(assign, &[id, &model, &(version as i64)]).await?;
                }
                ids.clone()
            }
        };
        tx.commit().await?;
        Ok(ids)
    }

    /// One multi-row statement per table (arrays unnested server-side), so
    /// a batch costs a few round trips whatever its size.
    pub async fn record_streamed(&self, batch: &[Streamed], now: u64) -> Result<usize, StoreError> {
        let mut devices: Vec<&str> = Vec::new();
        let (mut t_dev, mut t_seq, mut t_at, mut t_body) = (vec![], vec![], vec![], vec![]);
        let (mut r_dev, mut r_seq, mut r_at, mut r_model, mut r_ver, mut r_req, mut r_body) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for record in batch {
            let body = streamed_body(record)?;
            match record {
                Streamed::Telemetry(t) => {
                    devices.push(t.device_id.as_str());
                    t_dev.push(t.device_id.as_str());
                    t_seq.push(t.seq as i64);
                    t_at.push(t.at as i64);
                    t_body.push(body);
                }
                Streamed::Result(r) => {
                    devices.push(r.device_id.as_str());
                    r_dev.push(r.device_id.as_str());
                    r_seq.push(r.seq as i64);
                    r_at.push(r.at as i64);
                    r_model.push(r.model.as_str());
                    r_ver.push(r.model_version as i64);
                    r_req.push(r.request_id.as_deref());
                    r_body.push(body);
                }
            }
        }
        devices.sort_unstable();
        devices.dedup();
        let now = now as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "INSERT INTO devices (id, first_seen, last_seen)
             SELECT id, $2, $2 FROM UNNEST($1::text[]) AS u(id)
             ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, excluded.last_seen)",
            &[&devices, &now],
        )
        .await?;
        let mut new = 0;
        if !t_dev.is_empty() {
            new += tx
                .execute(
                    "INSERT INTO telemetry (device_id, seq, at, received_at, body)
                     SELECT d, s, a, $4, b
                     FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $5::text[]) AS u(d, s, a, b)
                     ON CONFLICT DO NOTHING",
                    &[&t_dev, &t_seq, &t_at, &now, &t_body],
                )
                .await? as usize;
        }
        if !r_dev.is_empty() {
            let params: [&(dyn ToSql + Sync); 8] = [
                &r_dev, &r_seq, &r_at, &now, &r_model, &r_ver, &r_req, &r_body,
            ];
            new += tx
                .execute(
                    "INSERT INTO results (device_id, seq, at, received_at, model, model_version, request_id, body)
                     SELECT d, s, a, $4, m, v, q, b
                     FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $5::text[], $6::bigint[], $7::text[], $8::text[])
                          AS u(d, s, a, m, v, q, b)
                     ON CONFLICT DO NOTHING",
                    &params,
                )
                .await? as usize;
        }
        tx.commit().await?;
        Ok(new)
    }

    pub async fn telemetry_for_device(
        &self,
        device: &str,
        page: &Page,
    ) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
        let client = self.client().await?;
        if get_device(&client, device).await?.is_none() {
            return Ok(None);
        }
        let rows = client
            .query(
                "SELECT received_at, body FROM telemetry
                 WHERE device_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[
                    &device,
                    &(page.after_seq.unwrap_or(0) as i64),
                    &(page.limit as i64),
                ],
            )
            .await?;
        stored_bodies(&rows).map(Some)
    }

    pub async fn recent_telemetry(
        &self,
        device: &str,
        since: u64,
        limit: u32,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT received_at, body FROM (
                     SELECT seq, received_at, body FROM telemetry
                     WHERE device_id = $1 AND at >= $2 ORDER BY seq DESC LIMIT $3
                 ) AS newest ORDER BY seq",
                &[&device, &(since as i64), &(limit as i64)],
            )
            .await?;
        stored_bodies(&rows)
    }

    pub async fn results_for_device(
        &self,
        device: &str,
        model: Option<&str>,
        page: &Page,
    ) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
        let client = self.client().await?;
        if get_device(&client, device).await?.is_none() {
            return Ok(None);
        }
        let rows = client
            .query(
                "SELECT received_at, body FROM results
                 WHERE device_id = $1 AND seq > $2 AND ($3::text IS NULL OR model = $3)
                 ORDER BY seq LIMIT $4",
                &[
                    &device,
                    &(page.after_seq.unwrap_or(0) as i64),
                    &model,
                    &(page.limit as i64),
                ],
            )
            .await?;
        stored_bodies(&rows).map(Some)
    }

    pub async fn prune_streamed(&self, cutoff: u64) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let a = client
            .execute(
                "DELETE FROM telemetry WHERE received_at < $1",
                &[&(cutoff as i64)],
            )
            .await?;
        let b = client
            .execute(
                "DELETE FROM results WHERE received_at < $1",
                &[&(cutoff as i64)],
            )
            .await?;
        Ok((a + b) as usize)
    }

    pub async fn create_token(&self, t: &TokenRecord, hash: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO tokens (id, name, scope, hash, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &t.id,
                    &t.name,
                    &t.scope.as_str(),
                    &hash,
                    &(t.created_at as i64),
                    &t.revoked_at.map(|v| v as i64),
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn token_for_auth(
        &self,
        id: &str,
    ) -> Result<Option<(TokenRecord, String)>, StoreError> {
        let client = self.client().await?;
        Ok(client
            .query_opt(
                &format!("SELECT {TOKEN_COLUMNS}, hash FROM tokens WHERE id = $1"),
                &[&id],
            )
            .await?
            .map(|r| (token_from_row(&r), r.get(5))))
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(token_from_row).collect())
    }

    pub async fn revoke_token(
        &self,
        id: &str,
        now: u64,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &(now as i64)],
            )
            .await?;
        Ok(client
            .query_opt(
                &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"),
                &[&id],
            )
            .await?
            .as_ref()
            .map(token_from_row))
    }

    pub async fn record_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO audit (at, token_id, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &(e.at as i64),
                    &e.token_id,
                    &e.actor,
                    &e.action,
                    &e.target,
                    &e.detail.as_ref().map(|d| d.to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    pub async fn list_audit(
        &self,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, at, token_id, actor, action, target, detail FROM audit
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&(after_id as i64), &(limit as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditRecord {
                id: r.get::<_, i64>(0) as u64,
                entry: AuditEntry {
                    at: r.get::<_, i64>(1) as u64,
                    token_id: r.get(2),
                    actor: r.get(3),
                    action: r.get(4),
                    target: r.get(5),
                    detail: r
                        .get::<_, Option<&str>>(6)
                        .and_then(|d| serde_json::from_str(d).ok()),
                },
            })
            .collect())
    }
}

const TOKEN_COLUMNS: &str = "id, name, scope, created_at, revoked_at";

fn token_from_row(r: &Row) -> TokenRecord {
    TokenRecord {
        id: r.get(0),
        name: r.get(1),
        // Only this server writes scopes; an unknown one grants least.
        scope: r.get::<_, &str>(2).parse().unwrap_or(Scope::Read),
        created_at: r.get::<_, i64>(3) as u64,
        revoked_at: r.get::<_, Option<i64>>(4).map(|v| v as u64),
    }
}

async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS edgefleet_schema (version BIGINT NOT NULL)")
        .await?;
    let current = tx
        .query_opt("SELECT version FROM edgefleet_schema", &[])
        .await?
        .map_or(0, |r| r.get::<_, i64>(0)) as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Conflict(format!(
            "database schema version {current} is newer than this server understands ({}); upgrade the server",
            MIGRATIONS.len()
        )));
    }
    for sql in &MIGRATIONS[current..] {
        tx.batch_execute(sql).await?;
    }
    tx.execute("DELETE FROM edgefleet_schema", &[]).await?;
    tx.execute(
        "INSERT INTO edgefleet_schema (version) VALUES ($1)",
        &[&(MIGRATIONS.len() as i64)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn ensure_device(c: &impl GenericClient, id: &str, now: u64) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO devices (id, first_seen, last_seen) VALUES ($1, $2, $2) ON CONFLICT DO NOTHING",
        &[&id, &(now as i64)],
    )
    .await?;
    Ok(())
}

const DEVICE_COLUMNS: &str = "id, first_seen, last_seen, online, agent_version, reported_desired_version, models_json, desired_version, hardware, tags, enrolled_at, revoked_at, device_key";

fn device_from_row(r: &Row) -> DeviceRecord {
    DeviceRecord {
        id: r.get(0),
        first_seen: r.get::<_, i64>(1) as u64,
        last_seen: r.get::<_, i64>(2) as u64,
        online: r.get(3),
        agent_version: r.get(4),
        reported_desired_version: r.get::<_, Option<i64>>(5).map(|v| v as u64),
        models: serde_json::from_str(r.get(6)).unwrap_or_default(),
        desired_version: r.get::<_, i64>(7) as u64,
        hardware: r.get(8),
        tags: serde_json::from_str(r.get(9)).unwrap_or_default(),
        enrolled_at: r.get::<_, Option<i64>>(10).map(|v| v as u64),
        revoked_at: r.get::<_, Option<i64>>(11).map(|v| v as u64),
        public_key: r.get(12),
    }
}

async fn list_devices(c: &impl GenericClient) -> Result<Vec<DeviceRecord>, StoreError> {
    let rows = c
        .query(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"),
            &[],
        )
        .await?;
    Ok(rows.iter().map(device_from_row).collect())
}

async fn get_device(c: &impl GenericClient, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    Ok(c.query_opt(
        &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(device_from_row))
}

const MODEL_COLUMNS: &str =
    "name, version, format, sha256, size, created_at, test_vector, spec, pushed_by, notes";

fn model_from_row(r: &Row) -> ModelRecord {
    ModelRecord {
        name: r.get(0),
        version: r.get::<_, i64>(1) as u64,
        format: r.get::<_, &str>(2).parse().unwrap_or(ModelFormat::Onnx),
        sha256: r.get(3),
        size: r.get::<_, i64>(4) as u64,
        created_at: r.get::<_, i64>(5) as u64,
        test_vector: r
            .get::<_, Option<&str>>(6)
            .and_then(|json| serde_json::from_str(json).ok()),
        spec: r
            .get::<_, Option<&str>>(7)
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default(),
        pushed_by: r.get(8),
        notes: r.get(9),
    }
}

async fn get_model(
    c: &impl GenericClient,
    name: &str,
    version: u64,
) -> Result<Option<ModelRecord>, StoreError> {
    Ok(c.query_opt(
        &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2"),
        &[&name, &(version as i64)],
    )
    .await?
    .as_ref()
    .map(model_from_row))
}

/// Fleet-wide assignments, overridden per model by the device's own.
async fn models_for_device(
    c: &impl GenericClient,
    device: &str,
) -> Result<Vec<ModelRecord>, StoreError> {
    let rows = c
        .query(
            "SELECT m.name, m.version, m.format, m.sha256, m.size, m.created_at, m.test_vector, m.spec, m.pushed_by, m.notes
             FROM assignments a JOIN models m ON m.name = a.model AND m.version = a.version
             WHERE a.scope = $1
                OR (a.scope = '*' AND NOT EXISTS (
                    SELECT 1 FROM assignments d WHERE d.scope = $1 AND d.model = a.model))
             ORDER BY m.name",
            &[&device],
        )
        .await?;
    Ok(rows.iter().map(model_from_row).collect())
}

fn stored_bodies(rows: &[Row]) -> Result<Vec<serde_json::Value>, StoreError> {
    rows.iter()
        .map(|r| with_received_at(r.get(0), r.get(1)))
        .collect()
}

async fn record_status(
    tx: &impl GenericClient,
    msg: &StatusMessage,
    now: u64,
) -> Result<StatusOutcome, StoreError> {
    let id = msg.device_id.as_str();
    // Lock the row (or learn it is new) so concurrent status messages
    // of one device apply in sequence order.
    let existing: Option<i64> = tx
        .query_opt(
            "SELECT last_status_seq FROM devices WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .map(|r| r.get(0));
    let is_new = existing.is_none();
    if is_new {
        tx.execute(
            "INSERT INTO devices (id, first_seen, last_seen) VALUES ($1, $2, $2)
                 ON CONFLICT (id) DO NOTHING",
            &[&id, &(now as i64)],
        )
        .await?;
    }
    if !msg.online {
        tx.execute(
            "UPDATE devices SET online = FALSE, last_seen = $2 WHERE id = $1",
            &[&id, &(now as i64)],
        )
        .await?;
    } else if msg.seq as i64 > existing.unwrap_or(0) {
        let models = serde_json::to_string(&msg.models).expect("models serialise");
        tx.execute(
            "UPDATE devices SET online = TRUE, last_seen = $2, agent_version = $3,
                    reported_desired_version = $4, models_json = $5, last_status_seq = $6
                 WHERE id = $1",
            &[
                &id,
                &(now as i64),
                &msg.agent_version,
                &msg.desired_version.map(|v| v as i64),
                &models,
                &(msg.seq as i64),
            ],
        )
        .await?;
    }
    let desired = if msg.online {
        let row = tx
            .query_one(
                "SELECT desired_version, desired_json FROM devices WHERE id = $1",
                &[&id],
            )
            .await?;
        Some((
            row.get::<_, i64>(0) as u64,
            row.get::<_, Option<Vec<u8>>>(1),
        ))
    } else {
        None
    };
    Ok(StatusOutcome { is_new, desired })
}

async fn record_event(tx: &impl GenericClient, e: &UpdateEvent) -> Result<bool, StoreError> {
    ensure_device(tx, e.device_id.as_str(), e.at).await?;
    let n = tx
        .execute(
            "INSERT INTO events (device_id, seq, at, kind, desired_version, model, model_version, reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            &[
                &e.device_id.as_str(),
                &(e.seq as i64),
                &(e.at as i64),
                &e.kind.as_str(),
                &e.desired_version.map(|v| v as i64),
                &e.model,
                &e.model_version.map(|v| v as i64),
                &e.reason,
            ],
        )
        .await?;
    Ok(n == 1)
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
