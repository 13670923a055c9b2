//! The schema, as one numbered list of migrations both backends apply:
//! migration `n` means the same change on SQLite and PostgreSQL, only its
//! SQL is in each database's dialect. A database records how many ran
//! (SQLite in `PRAGMA user_version`, PostgreSQL in the `edgefleet_schema`
//! table); each backend's `migrate` applies the rest at start.
//!
//! Several servers may share one database, and during a rolling upgrade
//! they run different releases. A database also records the oldest schema
//! version a server must know to run on it (`min_server_schema`: the number
//! of the newest migration that older servers cannot live with, see
//! [`Migration::older_servers_may_run`]); a server that finds the database
//! newer than itself runs on it when it knows at least that many, and
//! refuses otherwise. A database without the record (written before the
//! record existed) is refused when newer, as then every newer database was.
//!
//! Integers are INTEGER on SQLite and BIGINT on PostgreSQL (unix seconds,
//! versions, sequence numbers); JSON is TEXT, stored and returned as
//! written; true/false is INTEGER 0/1 on SQLite and BOOLEAN on PostgreSQL.

use super::StoreError;

/// One schema change, in both dialects.
#[derive(Clone, Copy)]
pub(crate) struct Migration {
    /// What the change is for.
    pub purpose: &'static str,
    /// The change on SQLite (run as one batch in a transaction).
    pub sqlite: &'static str,
    /// The change on PostgreSQL (run as one batch in a transaction);
    /// empty where the change needs nothing there.
    pub postgres: &'static str,
    /// Whether servers that predate this migration may keep running on a
    /// database that has it: true only for additive changes that older
    /// code never notices (new tables, new nullable or defaulted columns,
    /// new indexes) and whose absence from the older servers' behaviour
    /// harms nothing. A migration marked false makes every older server
    /// stop at its next start until it is upgraded, so a rolling upgrade
    /// across it is not possible; false is the safe answer when unsure.
    pub older_servers_may_run: bool,
}

/// A model version's test vector and spec columns (the same SQL on both).
const MODEL_ATTACHMENTS: &str = r#"
    ALTER TABLE models ADD COLUMN test_vector TEXT;
    ALTER TABLE models ADD COLUMN spec TEXT;
    "#;

/// Who pushed a model version and their notes (the same SQL on both).
const MODEL_PROVENANCE: &str = r#"
    ALTER TABLE models ADD COLUMN pushed_by TEXT;
    ALTER TABLE models ADD COLUMN notes TEXT;
    "#;

/// A device's public key column (the same SQL on both).
const DEVICE_KEYS: &str = r#"
    ALTER TABLE devices ADD COLUMN device_key TEXT;
    "#;

/// Drift reference profiles, one JSON document per model version.
const MODEL_REFERENCES: &str = r#"
    CREATE TABLE model_references (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        profile TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    );
    "#;

/// [`MODEL_REFERENCES`] on PostgreSQL.
const MODEL_REFERENCES_POSTGRES: &str = r#"
    CREATE TABLE model_references (
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        profile TEXT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (name, version)
    );
    "#;

/// Every migration, in order: migration `n` is `MIGRATIONS[n - 1]`.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        purpose: "devices, models, assignments and update events",
        sqlite: r#"
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
        postgres: r#"
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
    "#,
        // Nothing runs on a database without the first tables.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "telemetry and inference results, stored once per device and sequence number",
        sqlite: r#"
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
        postgres: r#"
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
        // Additive in form, but a server that predates it cannot keep the
        // telemetry and results devices send.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "a model version's signed-along test vector and input/output spec (JSON)",
        sqlite: MODEL_ATTACHMENTS,
        postgres: MODEL_ATTACHMENTS,
        // Additive in form, but a server that predates it ignores the test
        // vector and spec pushed with a model version.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "operator tokens (hashes only) and the audit log",
        sqlite: r#"
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
        postgres: r#"
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
        // A server that predates operator tokens cannot authenticate
        // operators.
        older_servers_may_run: false,
    },
    // On SQLite, telemetry and results become rowid tables with a unique
    // key: rows are ~0.5-1 KB of JSON, too large for WITHOUT ROWID tables,
    // whose B-tree leaves then hold a handful of rows and split on every
    // other insert (benches/ingest.rs, 256-record batches on the 2-core
    // development machine: 17,900 records/s as WITHOUT ROWID tables,
    // 102,600 as rowid tables). PostgreSQL tables are heaps with a
    // separate key index already, so there this changes nothing.
    Migration {
        purpose: "telemetry and results laid out for batch ingest",
        sqlite: r#"
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
        postgres: "",
        // Rebuilds tables on SQLite: not additive.
        older_servers_may_run: false,
    },
    Migration {
        purpose:
            "enrollment: hardware class, tags (a JSON object), the credential's hash, revocation",
        sqlite: r#"
    ALTER TABLE devices ADD COLUMN hardware TEXT;
    ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE devices ADD COLUMN enrolled_at INTEGER;
    ALTER TABLE devices ADD COLUMN credential TEXT;
    ALTER TABLE devices ADD COLUMN revoked_at INTEGER;
    "#,
        postgres: r#"
    ALTER TABLE devices ADD COLUMN hardware TEXT;
    ALTER TABLE devices ADD COLUMN tags TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE devices ADD COLUMN enrolled_at BIGINT;
    ALTER TABLE devices ADD COLUMN credential TEXT;
    ALTER TABLE devices ADD COLUMN revoked_at BIGINT;
    "#,
        // A server that predates enrollment ignores credentials and
        // revocation.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "who pushed a model version, and their notes",
        sqlite: MODEL_PROVENANCE,
        postgres: MODEL_PROVENANCE,
        // Provenance only: older servers neither need nor miss it.
        older_servers_may_run: true,
    },
    Migration {
        purpose: "staged rollouts (definition and planner state as JSON), in creation order",
        sqlite: r#"
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        active INTEGER NOT NULL,
        state TEXT NOT NULL,
        seq INTEGER NOT NULL
    );
    "#,
        postgres: r#"
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        active BOOLEAN NOT NULL,
        state TEXT NOT NULL,
        seq BIGSERIAL
    );
    "#,
        // A server that predates rollouts neither drives nor respects the
        // staged rollouts stored.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "each device's message-signing public key (hex)",
        sqlite: DEVICE_KEYS,
        postgres: DEVICE_KEYS,
        // A server that predates device keys does not check device
        // signatures.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "agent releases (one build per target triple), their assignments, the agent each device reports and the release an event is about",
        sqlite: r#"
    CREATE TABLE agent_builds (
        version TEXT NOT NULL,
        target TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        pushed_by TEXT,
        notes TEXT,
        PRIMARY KEY (version, target)
    );
    CREATE TABLE agent_assignments (
        scope TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        allow_downgrade INTEGER NOT NULL DEFAULT 0
    );
    ALTER TABLE devices ADD COLUMN agent_target TEXT;
    ALTER TABLE devices ADD COLUMN agent_release TEXT;
    ALTER TABLE events ADD COLUMN agent_version TEXT;
    "#,
        postgres: r#"
    CREATE TABLE agent_builds (
        version TEXT NOT NULL,
        target TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        pushed_by TEXT,
        notes TEXT,
        PRIMARY KEY (version, target)
    );
    CREATE TABLE agent_assignments (
        scope TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        allow_downgrade BOOLEAN NOT NULL DEFAULT FALSE
    );
    ALTER TABLE devices ADD COLUMN agent_target TEXT;
    ALTER TABLE devices ADD COLUMN agent_release TEXT;
    ALTER TABLE events ADD COLUMN agent_version TEXT;
    "#,
        // A server that predates agent releases leaves them out of the
        // desired states it signs.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "what several replicas share: leases (one rollout driver), the rollout driver's inbox, dashboard sessions, artifact bytes in the database",
        sqlite: r#"
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE TABLE rollout_inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        body TEXT NOT NULL,
        at INTEGER NOT NULL,
        outcome TEXT
    );
    CREATE TABLE dashboard_sessions (
        id_sha256 TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        csrf TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        last_used INTEGER NOT NULL
    );
    -- Capping one token's sessions looks them up by token.
    CREATE INDEX dashboard_sessions_by_token ON dashboard_sessions (token_id);
    CREATE TABLE artifact_blobs (
        sha256 TEXT NOT NULL,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        chunk_size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        upload TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (sha256, kind)
    );
    CREATE TABLE artifact_chunks (
        upload TEXT NOT NULL,
        idx INTEGER NOT NULL,
        data BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (upload, idx)
    );
    -- Update events carry their arrival time, so each replica's dashboard
    -- view reads the events the others stored, in arrival order (telemetry
    -- has its arrival index already). Events stored before have none.
    ALTER TABLE events ADD COLUMN received_at INTEGER;
    CREATE INDEX events_by_arrival ON events (received_at);
    -- The connection number of the device's latest "online" status: a
    -- last will of an older connection, stored by any replica, is stale.
    ALTER TABLE devices ADD COLUMN session INTEGER;
    "#,
        postgres: r#"
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL
    );
    CREATE TABLE rollout_inbox (
        id BIGSERIAL PRIMARY KEY,
        body TEXT NOT NULL,
        at BIGINT NOT NULL,
        outcome TEXT
    );
    CREATE TABLE dashboard_sessions (
        id_sha256 TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        csrf TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        last_used BIGINT NOT NULL
    );
    -- Capping one token's sessions looks them up by token.
    CREATE INDEX dashboard_sessions_by_token ON dashboard_sessions (token_id);
    CREATE TABLE artifact_blobs (
        sha256 TEXT NOT NULL,
        kind TEXT NOT NULL,
        size BIGINT NOT NULL,
        chunk_size BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        upload TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (sha256, kind)
    );
    CREATE TABLE artifact_chunks (
        upload TEXT NOT NULL,
        idx BIGINT NOT NULL,
        data BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (upload, idx)
    );
    ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
    -- Update events carry their arrival time, so each replica's dashboard
    -- view reads the events the others stored, in arrival order (telemetry
    -- has its arrival index already). Events stored before have none.
    ALTER TABLE events ADD COLUMN received_at BIGINT;
    CREATE INDEX events_by_arrival ON events (received_at);
    ALTER TABLE devices ADD COLUMN session BIGINT;
    "#,
        // New tables, nullable columns and an index: a server that predates
        // them neither reads nor needs them. Its update events carry no
        // arrival time, so they stay out of the other replicas' arrival-
        // ordered views until it is upgraded.
        older_servers_may_run: true,
    },
    Migration {
        purpose: "quality settings on assignments: a shadow candidate and an A/B split, with the versions they name",
        sqlite: r#"
    ALTER TABLE assignments ADD COLUMN quality TEXT;
    ALTER TABLE assignments ADD COLUMN shadow_version INTEGER;
    ALTER TABLE assignments ADD COLUMN split_version INTEGER;
    "#,
        postgres: r#"
    ALTER TABLE assignments ADD COLUMN quality TEXT;
    ALTER TABLE assignments ADD COLUMN shadow_version BIGINT;
    ALTER TABLE assignments ADD COLUMN split_version BIGINT;
    "#,
        // Older servers would deploy a version without clearing the
        // assignment's settings (leaving a shadow or split meant for the
        // version before) and could delete a version a device downloads as
        // a candidate.
        older_servers_may_run: false,
    },
    Migration {
        purpose: "each model version's drift reference profile (the bins agents count with and the reference histograms)",
        sqlite: MODEL_REFERENCES,
        postgres: MODEL_REFERENCES_POSTGRES,
        // A new table: a server that predates it signs slots without drift
        // bins and scores nothing, which stops drift statistics on the
        // devices it publishes to but breaks nothing.
        older_servers_may_run: true,
    },
];

/// For a PostgreSQL database whose `edgefleet_schema` row is not marked
/// as counting [`MIGRATIONS`] (see the PostgreSQL backend's `migrate`):
/// its count of a six-step PostgreSQL-only list, as an index into this
/// table, gives the number of [`MIGRATIONS`] it has. Its step 1 is
/// migrations 1-3, step 2 is 4, and steps 3-6 are 6-9 (migration 5
/// changes nothing on PostgreSQL).
pub(crate) const POSTGRES_SIX_STEP_COUNTS: [usize; 7] = [0, 3, 4, 6, 7, 8, 9];

/// The number of [`MIGRATIONS`] a PostgreSQL database has run, given its
/// count of the six-step list (see [`POSTGRES_SIX_STEP_COUNTS`]).
pub(crate) fn from_postgres_six_step(count: usize) -> Result<usize, StoreError> {
    POSTGRES_SIX_STEP_COUNTS
        .get(count)
        .copied()
        .ok_or_else(|| newer_database(count, MIGRATIONS.len()))
}

/// What a server does with a database at start.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// The database is this server's version or older: these migrations
    /// (indexes into the server's list, maybe none) bring it up to date,
    /// after which the server records its version and
    /// [`min_server_schema`].
    Run(std::ops::Range<usize>),
    /// The database is newer, but every migration this server lacks leaves
    /// it working: it runs on the database as it is and records nothing,
    /// since what is recorded describes the newer schema.
    RunOnNewer,
}

/// The oldest schema version a server must know to run on a database
/// migrated through `known`: the number of the last migration not marked
/// [`Migration::older_servers_may_run`] (0 for none).
pub(crate) fn min_server_schema(known: &[Migration]) -> usize {
    known
        .iter()
        .rposition(|m| !m.older_servers_may_run)
        .map_or(0, |i| i + 1)
}

/// What a server that knows the migrations `known` does with a database
/// that has run `applied` of them and records `min_server_schema` (`None`
/// where it has no record); an error for a database newer than the server
/// can run on.
pub(crate) fn pending(
    known: &[Migration],
    applied: usize,
    min_server_schema: Option<usize>,
) -> Result<Pending, StoreError> {
    if applied <= known.len() {
        return Ok(Pending::Run(applied..known.len()));
    }
    match min_server_schema {
        Some(min) if min <= known.len() => {
            tracing::warn!(
                database = applied,
                server = known.len(),
                min_server_schema = min,
                "database schema version {applied} is newer than this server's ({}); \
                 running on it since every migration after {min} leaves older servers \
                 working, but upgrade this server to the release that wrote it",
                known.len()
            );
            Ok(Pending::RunOnNewer)
        }
        Some(min) => Err(StoreError::Conflict(format!(
            "database schema version {applied} needs a server that knows schema version \
             {min} or later, and this server knows {}; upgrade the server",
            known.len()
        ))),
        None => Err(newer_database(applied, known.len())),
    }
}

/// A database whose schema a newer server wrote, with no record of which
/// older servers may run on it.
fn newer_database(version: usize, known: usize) -> StoreError {
    StoreError::Conflict(format!(
        "database schema version {version} is newer than this server understands ({known}); upgrade the server"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_has_sqlite_sql_and_a_purpose() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert!(!m.sqlite.trim().is_empty(), "migration {}", i + 1);
            assert!(!m.purpose.is_empty(), "migration {}", i + 1);
        }
    }

    #[test]
    fn six_step_postgres_counts_map_onto_the_shared_list_in_order() {
        assert_eq!(POSTGRES_SIX_STEP_COUNTS[0], 0);
        // The six-step list ended where the shared list's ninth migration
        // did; later migrations run on such a database like on any other.
        assert_eq!(POSTGRES_SIX_STEP_COUNTS[6], 9);
        assert!(MIGRATIONS.len() >= 9);
        assert!(POSTGRES_SIX_STEP_COUNTS.windows(2).all(|w| w[0] < w[1]));
        // Migration 5 falls inside six-step count 3 (4 -> 6): fine only
        // because it changes nothing on PostgreSQL.
        assert!(MIGRATIONS[4].postgres.trim().is_empty());
        assert_eq!(from_postgres_six_step(2).unwrap(), 4);
        assert!(from_postgres_six_step(7).is_err());
    }

    /// One migration per entry of `compatible`, marked as it says.
    fn list(compatible: &[bool]) -> Vec<Migration> {
        compatible
            .iter()
            .map(|&older_servers_may_run| Migration {
                older_servers_may_run,
                ..MIGRATIONS[0]
            })
            .collect()
    }

    #[test]
    fn the_record_names_the_last_migration_older_servers_cannot_run_on() {
        assert_eq!(min_server_schema(&[]), 0);
        assert_eq!(min_server_schema(&list(&[true, true])), 0);
        assert_eq!(min_server_schema(&list(&[false, true, true])), 1);
        assert_eq!(min_server_schema(&list(&[false, true, false, true])), 3);
        assert_eq!(min_server_schema(&list(&[false, false])), 2);
        // The newest migrations (the tables replicas share, the drift
        // references) are additive, so the releases before them may run
        // on a database that has them.
        assert!(MIGRATIONS.last().unwrap().older_servers_may_run);
        assert!(MIGRATIONS
            .iter()
            .any(|m| m.purpose.contains("drift reference") && m.older_servers_may_run));
        // Nothing runs on a database without the first tables.
        assert!(!MIGRATIONS[0].older_servers_may_run);
    }

    #[test]
    fn an_older_or_current_database_is_migrated() {
        assert_eq!(
            pending(MIGRATIONS, 0, None).unwrap(),
            Pending::Run(0..MIGRATIONS.len())
        );
        assert_eq!(
            pending(MIGRATIONS, 3, Some(1)).unwrap(),
            Pending::Run(3..MIGRATIONS.len())
        );
        assert_eq!(
            pending(MIGRATIONS, MIGRATIONS.len(), Some(MIGRATIONS.len() - 1)).unwrap(),
            Pending::Run(MIGRATIONS.len()..MIGRATIONS.len())
        );
    }

    #[test]
    fn a_newer_database_without_a_record_is_refused() {
        let err = pending(MIGRATIONS, MIGRATIONS.len() + 1, None).unwrap_err();
        assert!(err.to_string().contains("upgrade the server"), "{err}");
    }

    #[test]
    fn a_newer_database_runs_only_on_servers_that_know_its_minimum() {
        let known = &MIGRATIONS[..5];
        assert_eq!(pending(known, 7, Some(5)).unwrap(), Pending::RunOnNewer);
        assert_eq!(pending(known, 7, Some(0)).unwrap(), Pending::RunOnNewer);
        let err = pending(known, 7, Some(6)).unwrap_err().to_string();
        assert!(err.contains("upgrade the server"), "{err}");
        assert!(
            err.contains("version 7") && err.contains("version 6") && err.contains("knows 5"),
            "{err}"
        );
    }
}
