//! Upgrades of databases written before both backends shared one
//! migration list: each test builds a database with the migrations as
//! they stood then (copied below as fixtures, not to be edited), fills it,
//! opens it with [`Store::open`] and checks that no migration ran twice or
//! was skipped (the schema equals a fresh database's) and that the data
//! survived.
//!
//! SQLite counted its own nine steps in `PRAGMA user_version`, which are
//! the shared list's nine. PostgreSQL counted six steps in
//! `edgefleet_schema`, which map onto the shared nine through
//! [`super::migrations::POSTGRES_SIX_STEP_COUNTS`].
//!
//! Then rolling upgrades: servers of the previous release and of this one
//! opening the same database in turn (see the section's comment below).

use rusqlite::Connection;

use super::tests::fresh_postgres_schema;
use super::*;

/// The SQLite migrations as the SQLite backend had them:
/// `user_version` counts how many ran.
const SQLITE_NINE_STEPS: &[&str] = &[
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

/// The PostgreSQL migrations as the PostgreSQL backend had them:
/// `edgefleet_schema.version` counts how many ran.
const POSTGRES_SIX_STEPS: &[&str] = &[
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

// ---- SQLite ----------------------------------------------------------------

/// Every table's columns and every index of an SQLite database.
fn sqlite_schema(conn: &Connection) -> Vec<String> {
    let mut out = Vec::new();
    let mut tables = conn
        .prepare("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_sequence' ORDER BY type, name")
        .unwrap();
    let entries: Vec<(String, String, String)> = tables
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (kind, name, table) in entries {
        out.push(format!("{kind} {name} on {table}"));
        if kind == "table" {
            let mut columns = conn.prepare(&format!("PRAGMA table_info({name})")).unwrap();
            let described = columns
                .query_map([], |r| {
                    Ok(format!(
                        "  {} {} notnull={} default={:?} pk={}",
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, i64>(5)?
                    ))
                })
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            out.extend(described);
        }
    }
    out
}

fn fresh_sqlite_schema() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    drop(sqlite::SqliteStore::open(&path).unwrap());
    sqlite_schema(&Connection::open(&path).unwrap())
}

/// Writes an SQLite database with the first `steps` of the nine, and rows
/// in the tables those steps made.
fn old_sqlite_database(path: &std::path::Path, steps: usize) {
    let mut conn = Connection::open(path).unwrap();
    let tx = conn.transaction().unwrap();
    for sql in &SQLITE_NINE_STEPS[..steps] {
        tx.execute_batch(sql).unwrap();
    }
    tx.pragma_update(None, "user_version", steps as i64)
        .unwrap();
    tx.execute_batch(
        "INSERT INTO devices (id, first_seen, last_seen, online, agent_version, models_json)
             VALUES ('a', 1, 2, 1, '0.9', '[]');
         INSERT INTO models (name, version, format, sha256, size, created_at)
             VALUES ('digits', 1, 'onnx', 'ab', 10, 3);
         INSERT INTO assignments (scope, model, version) VALUES ('*', 'digits', 1);",
    )
    .unwrap();
    if steps >= 2 {
        tx.execute_batch(
            r#"INSERT INTO telemetry (device_id, seq, at, received_at, body)
                   VALUES ('a', 1, 5, 6, '{"seq":1}');
               INSERT INTO results (device_id, seq, at, received_at, model, model_version, request_id, body)
                   VALUES ('a', 2, 5, 6, 'digits', 1, 'r', '{"seq":2}');"#,
        )
        .unwrap();
    }
    if steps >= 4 {
        tx.execute_batch(
            "INSERT INTO tokens (id, name, scope, hash, created_at) VALUES ('t1', 'ci', 'write', 'h', 7);",
        )
        .unwrap();
    }
    if steps >= 6 {
        tx.execute_batch(
            r#"UPDATE devices SET hardware = 'rpi4', tags = '{"site":"rome"}', credential = 'c' WHERE id = 'a';"#,
        )
        .unwrap();
    }
    if steps >= 9 {
        tx.execute_batch(
            "INSERT INTO rollouts (id, active, state, seq) VALUES ('r1', 1, '{}', 1);
             UPDATE devices SET device_key = 'k' WHERE id = 'a';",
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// Checks what [`old_sqlite_database`] or [`old_postgres_database`] wrote
/// after `steps` of the old list reads back through the store.
async fn check_upgraded(store: &Store, steps_with_tokens: bool, enrolled: bool) {
    let device = store.get_device("a").await.unwrap().unwrap();
    assert_eq!(
        (device.first_seen, device.last_seen, device.online),
        (1, 2, true)
    );
    assert_eq!(device.agent_version, "0.9");
    let models = store.models_for_device("a").await.unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(
        (models[0].name.as_str(), models[0].sha256.as_str()),
        ("digits", "ab")
    );
    if steps_with_tokens {
        let (token, hash) = store.token_for_auth("t1").await.unwrap().unwrap();
        assert_eq!((token.name.as_str(), hash.as_str()), ("ci", "h"));
    }
    if enrolled {
        assert_eq!(device.hardware.as_deref(), Some("rpi4"));
        assert_eq!(device.tags.get("site").map(String::as_str), Some("rome"));
        assert_eq!(
            store.device_credential("a").await.unwrap().as_deref(),
            Some("c")
        );
    }
    // Every column of the newest schema is usable.
    store
        .set_device_key("a", "kk", KeyWrite::Operator)
        .await
        .unwrap();
    store.save_rollout("r2", true, "{}").await.unwrap();
    let mut pushed = store.get_model("digits", 1).await.unwrap().unwrap();
    pushed.version = 2;
    pushed.sha256 = "cd".into();
    pushed.pushed_by = Some("ci".into());
    assert_eq!(store.add_model(&pushed).await.unwrap(), pushed);
    let build = AgentBuildRecord {
        version: "1.0.0".into(),
        target: "aarch64-unknown-linux-musl".into(),
        sha256: "ef".into(),
        size: 3,
        created_at: 4,
        pushed_by: None,
        notes: None,
    };
    assert_eq!(store.add_agent_build(&build).await.unwrap(), build);
    store
        .deploy_agent("1.0.0", false, &Target::All, 5)
        .await
        .unwrap();
    assert_eq!(
        store
            .agent_for_device("a")
            .await
            .unwrap()
            .map(|a| a.version),
        Some("1.0.0".to_string())
    );
    assert!(store
        .events_for_device("a", 10)
        .await
        .unwrap()
        .iter()
        .all(|e| e.agent_version.is_none()));
    assert_eq!(store.get_device("a").await.unwrap().unwrap().agent, None);
}

#[tokio::test]
async fn sqlite_databases_of_the_nine_step_list_upgrade_in_place() {
    let fresh = fresh_sqlite_schema();
    for steps in [1, 2, 4, 5, 8, 9] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        old_sqlite_database(&path, steps);
        let store = Store::open(path.to_str().unwrap()).await.unwrap();
        check_upgraded(&store, steps >= 4, steps >= 6).await;
        if steps >= 2 {
            let page = Page {
                after_seq: None,
                limit: 10,
            };
            let t = store
                .telemetry_for_device("a", &page)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(t.len(), 1, "after {steps} steps");
            assert_eq!(t[0]["received_at"], 6);
            let r = store
                .results_for_device("a", Some("digits"), &page)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.len(), 1, "after {steps} steps");
        }
        drop(store);
        let conn = Connection::open(&path).unwrap();
        assert_eq!(
            sqlite_schema(&conn),
            fresh,
            "schema after upgrading from {steps} steps"
        );
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, migrations::MIGRATIONS.len());
    }
}

#[tokio::test]
async fn sqlite_redelivered_stream_records_stay_ignored_after_the_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    old_sqlite_database(&path, 4);
    drop(Store::open(path.to_str().unwrap()).await.unwrap());
    let conn = Connection::open(&path).unwrap();
    let n = conn
        .execute(
            "INSERT OR IGNORE INTO telemetry (device_id, seq, at, received_at, body)
             VALUES ('a', 1, 7, 8, '{}')",
            [],
        )
        .unwrap();
    assert_eq!(n, 0, "(device, seq) is still unique");
}

// ---- PostgreSQL ------------------------------------------------------------

/// A client on the schema a `fresh_postgres_schema` URL points at.
async fn postgres_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Every column and index of the client's current schema (but the
/// migration bookkeeping table).
async fn postgres_schema(client: &tokio_postgres::Client) -> Vec<String> {
    let columns = client
        .query(
            "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text,
                    COALESCE(column_default::text, ''), ordinal_position::int
             FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name <> 'edgefleet_schema'
             ORDER BY table_name, ordinal_position",
            &[],
        )
        .await
        .unwrap();
    let indexes = client
        .query(
            "SELECT indexname::text, indexdef::text FROM pg_indexes
             WHERE schemaname = current_schema() ORDER BY indexname",
            &[],
        )
        .await
        .unwrap();
    let schema_name: String = client
        .query_one("SELECT current_schema()::text", &[])
        .await
        .unwrap()
        .get(0);
    columns
        .iter()
        .map(|r| {
            format!(
                "{}.{} #{} {} null={} default={}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i32>(5),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4)
            )
        })
        .chain(indexes.iter().map(|r| {
            // Index definitions name the schema; each test has its own.
            format!("{} {}", r.get::<_, String>(0), r.get::<_, String>(1))
                .replace(&schema_name, "SCHEMA")
        }))
        .collect()
}

/// Writes a PostgreSQL schema with the first `steps` of the six, and rows
/// in the tables those steps made.
async fn old_postgres_database(url: &str, steps: usize) {
    let client = postgres_client(url).await;
    for sql in &POSTGRES_SIX_STEPS[..steps] {
        client.batch_execute(sql).await.unwrap();
    }
    client
        .batch_execute(&format!(
            "CREATE TABLE edgefleet_schema (version BIGINT NOT NULL);
             INSERT INTO edgefleet_schema (version) VALUES ({steps});"
        ))
        .await
        .unwrap();
    if steps == 0 {
        return;
    }
    client
        .batch_execute(
            r#"INSERT INTO devices (id, first_seen, last_seen, online, agent_version, models_json)
                   VALUES ('a', 1, 2, TRUE, '0.9', '[]');
               INSERT INTO models (name, version, format, sha256, size, created_at)
                   VALUES ('digits', 1, 'onnx', 'ab', 10, 3);
               INSERT INTO assignments (scope, model, version) VALUES ('*', 'digits', 1);
               INSERT INTO telemetry (device_id, seq, at, received_at, body)
                   VALUES ('a', 1, 5, 6, '{"seq":1}');"#,
        )
        .await
        .unwrap();
    if steps >= 2 {
        client
            .batch_execute(
                "INSERT INTO tokens (id, name, scope, hash, created_at) VALUES ('t1', 'ci', 'write', 'h', 7);",
            )
            .await
            .unwrap();
    }
    if steps >= 3 {
        client
            .batch_execute(
                r#"UPDATE devices SET hardware = 'rpi4', tags = '{"site":"rome"}', credential = 'c' WHERE id = 'a';"#,
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn postgres_databases_of_the_six_step_list_upgrade_in_place() {
    let fresh_url = fresh_postgres_schema().await;
    drop(Store::open(&fresh_url).await.unwrap());
    let fresh = postgres_schema(&postgres_client(&fresh_url).await).await;
    assert!(
        fresh.iter().any(|c| c.starts_with("devices.device_key")),
        "{fresh:?}"
    );
    for steps in 0..=POSTGRES_SIX_STEPS.len() {
        let url = fresh_postgres_schema().await;
        old_postgres_database(&url, steps).await;
        let store = Store::open(&url).await.unwrap();
        if steps >= 1 {
            check_upgraded(&store, steps >= 2, steps >= 3).await;
            let page = Page {
                after_seq: None,
                limit: 10,
            };
            let t = store
                .telemetry_for_device("a", &page)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(t.len(), 1, "after {steps} steps");
        }
        drop(store);
        let client = postgres_client(&url).await;
        assert_eq!(
            postgres_schema(&client).await,
            fresh,
            "schema after upgrading from {steps} steps"
        );
        let row = client
            .query_one(
                "SELECT version, shared_numbering FROM edgefleet_schema",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0) as usize, row.get::<_, bool>(1)),
            (migrations::MIGRATIONS.len(), true)
        );
        // Opening again runs nothing: a rerun migration would fail.
        drop(Store::open(&url).await.unwrap());
    }
}

#[tokio::test]
async fn postgres_six_step_counts_past_six_are_refused() {
    let url = fresh_postgres_schema().await;
    let client = postgres_client(&url).await;
    client
        .batch_execute(
            "CREATE TABLE edgefleet_schema (version BIGINT NOT NULL);
             INSERT INTO edgefleet_schema (version) VALUES (7);",
        )
        .await
        .unwrap();
    let err = Store::open(&url).await.unwrap_err().to_string();
    assert!(err.contains("upgrade the server"), "{err}");
}

/// Servers of the previous release and of this one opening the same
/// database in turn.
mod rolling;
