//! Rolling upgrades: replicas of two releases share a database while they
//! are upgraded one at a time. The previous release is played by this code
//! with the migration list cut before the newest migration; what it does
//! with the database follows the compatibility rule in
//! [`super::super::migrations`].

use edgefleet_shared::{DeviceId, StatusMessage, SCHEMA_VERSION};
use rusqlite::Connection;

use super::super::migrations::{Migration, MIGRATIONS};
use super::super::tests::fresh_postgres_schema;
use super::super::*;
use super::postgres_client;

/// A database that servers of several releases open: an SQLite file or
/// a PostgreSQL schema.
enum Shared {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Shared {
    async fn sqlite() -> Self {
        Shared::Sqlite(tempfile::tempdir().unwrap())
    }

    async fn postgres() -> Self {
        Shared::Postgres(fresh_postgres_schema().await)
    }

    /// Opens the database as a server that knows the migrations `known`.
    async fn open(&self, known: &[Migration]) -> Result<Store, StoreError> {
        match self {
            Shared::Sqlite(dir) => {
                sqlite::SqliteStore::open_knowing(&dir.path().join("fleet.db"), known)
                    .map(Store::new)
            }
            Shared::Postgres(url) => postgres::PgStore::connect_knowing(url, known)
                .await
                .map(Store::new),
        }
    }

    /// The schema version and `min_server_schema` the database records.
    async fn recorded(&self) -> (usize, Option<usize>) {
        match self {
            Shared::Sqlite(dir) => {
                let conn = Connection::open(dir.path().join("fleet.db")).unwrap();
                let version: i64 = conn
                    .query_row("PRAGMA user_version", [], |r| r.get(0))
                    .unwrap();
                let min: Option<i64> = conn
                    .query_row("SELECT min_server_schema FROM edgefleet_schema", [], |r| {
                        r.get(0)
                    })
                    .ok();
                (version as usize, min.map(|m| m as usize))
            }
            Shared::Postgres(url) => {
                let row = postgres_client(url)
                    .await
                    .query_one(
                        "SELECT version, min_server_schema FROM edgefleet_schema",
                        &[],
                    )
                    .await
                    .unwrap();
                (
                    row.get::<_, i64>(0) as usize,
                    row.get::<_, Option<i64>>(1).map(|m| m as usize),
                )
            }
        }
    }

    /// Runs `sql` on the database directly.
    async fn execute(&self, sql: &str) {
        match self {
            Shared::Sqlite(dir) => Connection::open(dir.path().join("fleet.db"))
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Shared::Postgres(url) => postgres_client(url).await.batch_execute(sql).await.unwrap(),
        }
    }

    /// Removes the record, as a database of a release that kept none has
    /// it (on PostgreSQL such a release rewrites the row with it NULL).
    async fn forget_min_server_schema(&self) {
        self.execute(match self {
            Shared::Sqlite(_) => "DROP TABLE edgefleet_schema",
            Shared::Postgres(_) => "UPDATE edgefleet_schema SET min_server_schema = NULL",
        })
        .await;
    }
}

/// The releases a rolling upgrade has running: the new one knows every
/// migration, the previous one all but the newest.
fn previous_release() -> &'static [Migration] {
    &MIGRATIONS[..MIGRATIONS.len() - 1]
}

/// A device's online status, as its agent sends it.
fn online(device: &str, seq: u64, agent_version: &str) -> StatusMessage {
    StatusMessage {
        session: None,
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new(device).unwrap(),
        seq,
        online: true,
        at: 0,
        agent_version: agent_version.into(),
        desired_version: None,
        models: vec![],
        agent: None,
    }
}

/// Stores a device's status through `store` and reads it back.
async fn round_trip(store: &Store, device: &str, agent_version: &str) {
    let outcome = store
        .record_status(&online(device, 1, agent_version), 100)
        .await
        .unwrap();
    assert!(outcome.is_new, "{device}");
    let read = store.get_device(device).await.unwrap().unwrap();
    assert_eq!(
        (read.online, read.agent_version.as_str()),
        (true, agent_version)
    );
}

/// The previous release migrates a fresh database, the new release
/// migrates it on, and the previous release (a replica not yet upgraded,
/// restarting) runs on it again and reads and writes what it knows.
async fn previous_release_runs_after_an_additive_migration(db: Shared) {
    let newest = MIGRATIONS.len();
    assert!(MIGRATIONS[newest - 1].older_servers_may_run);
    let min = migrations::min_server_schema(MIGRATIONS);
    assert!(min < newest);

    // The store's queries are this release's, which use the newest
    // migration's columns: the device the previous release stored before
    // the upgrade is written in its schema's terms instead.
    drop(db.open(previous_release()).await.unwrap());
    db.execute(
        "INSERT INTO devices (id, first_seen, last_seen, agent_version) VALUES ('before', 1, 2, '1.0')",
    )
    .await;
    assert_eq!(
        db.recorded().await,
        (
            newest - 1,
            Some(migrations::min_server_schema(previous_release()))
        )
    );

    let new = db.open(MIGRATIONS).await.unwrap();
    assert_eq!(db.recorded().await, (newest, Some(min)));
    let before = new.get_device("before").await.unwrap().unwrap();
    assert_eq!(
        (before.last_seen, before.agent_version.as_str()),
        (2, "1.0")
    );
    round_trip(&new, "upgraded", "2.0").await;

    // Both releases at once, as replicas are mid-upgrade.
    let old = db.open(previous_release()).await.unwrap();
    assert_eq!(
        db.recorded().await,
        (newest, Some(min)),
        "the previous release leaves the newer database's record alone"
    );
    round_trip(&old, "restarted", "1.0").await;
    let before = old.get_device("before").await.unwrap().unwrap();
    assert_eq!(before.agent_version, "1.0");
    let seen = old.get_device("upgraded").await.unwrap().unwrap();
    assert_eq!(seen.agent_version, "2.0");
    let seen = new.get_device("restarted").await.unwrap().unwrap();
    assert_eq!(seen.agent_version, "1.0");
    assert_eq!(old.list_devices().await.unwrap().len(), 3);
    drop((old, new));

    // Opening with the new release again runs nothing (a rerun migration
    // would fail) and records the same.
    drop(db.open(MIGRATIONS).await.unwrap());
    assert_eq!(db.recorded().await, (newest, Some(min)));
}

/// Once a migration older servers cannot run on ran, the previous release
/// is refused, saying to upgrade it.
async fn previous_release_is_refused_after_an_incompatible_migration(db: Shared) {
    let mut incompatible = MIGRATIONS.to_vec();
    incompatible.last_mut().unwrap().older_servers_may_run = false;
    drop(db.open(previous_release()).await.unwrap());
    drop(db.open(&incompatible).await.unwrap());
    assert_eq!(
        db.recorded().await,
        (MIGRATIONS.len(), Some(MIGRATIONS.len()))
    );
    let err = db.open(previous_release()).await.unwrap_err().to_string();
    assert!(err.contains("upgrade the server"), "{err}");
    assert!(
        err.contains(&format!(
            "knows schema version {} or later",
            MIGRATIONS.len()
        )) && err.contains(&format!("this server knows {}", MIGRATIONS.len() - 1)),
        "{err}"
    );
    // The refused server changed nothing.
    assert_eq!(
        db.recorded().await,
        (MIGRATIONS.len(), Some(MIGRATIONS.len()))
    );
}

/// A database without the record (its last writer predates it) refuses
/// every older server, as before the record existed; the next start of a
/// server of its own version records it.
async fn a_database_without_the_record_refuses_older_servers(db: Shared) {
    drop(db.open(MIGRATIONS).await.unwrap());
    db.forget_min_server_schema().await;
    let err = db.open(previous_release()).await.unwrap_err().to_string();
    assert!(
        err.contains("newer than this server understands") && err.contains("upgrade the server"),
        "{err}"
    );
    drop(db.open(MIGRATIONS).await.unwrap());
    let min = migrations::min_server_schema(MIGRATIONS);
    assert_eq!(db.recorded().await, (MIGRATIONS.len(), Some(min)));
    drop(db.open(previous_release()).await.unwrap());
}

#[tokio::test]
async fn sqlite_previous_release_runs_after_an_additive_migration() {
    previous_release_runs_after_an_additive_migration(Shared::sqlite().await).await;
}

#[tokio::test]
async fn postgres_previous_release_runs_after_an_additive_migration() {
    previous_release_runs_after_an_additive_migration(Shared::postgres().await).await;
}

#[tokio::test]
async fn sqlite_previous_release_is_refused_after_an_incompatible_migration() {
    previous_release_is_refused_after_an_incompatible_migration(Shared::sqlite().await).await;
}

#[tokio::test]
async fn postgres_previous_release_is_refused_after_an_incompatible_migration() {
    previous_release_is_refused_after_an_incompatible_migration(Shared::postgres().await).await;
}

#[tokio::test]
async fn sqlite_database_without_the_record_refuses_older_servers() {
    a_database_without_the_record_refuses_older_servers(Shared::sqlite().await).await;
}

#[tokio::test]
async fn postgres_database_without_the_record_refuses_older_servers() {
    a_database_without_the_record_refuses_older_servers(Shared::postgres().await).await;
}
