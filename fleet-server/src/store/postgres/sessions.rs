//! Dashboard login sessions, and telemetry and update events in arrival
//! order, on PostgreSQL.

use deadpool_postgres::GenericClient;

use super::super::rows::stored;
use super::super::sessions::{
    self, ArrivalKey, DashboardSession, SessionRules, ARRIVED_TELEMETRY_COLUMNS, SESSION_COLUMNS,
};
use super::super::{EventRecord, StoreError};
use super::{query_all, query_opt};

/// Stores a new session; drops the ended ones and, past the token's
/// limit, its least recently used.
pub(super) async fn create(
    client: &mut deadpool_postgres::Client,
    s: &DashboardSession,
    rules: &SessionRules,
) -> Result<(), StoreError> {
    let (idle, lifetime) = rules.cutoffs(s.created_at);
    let tx = client.transaction().await?;
    tx.execute(
        "DELETE FROM dashboard_sessions WHERE last_used < $1 OR created_at < $2",
        &[&idle, &lifetime],
    )
    .await?;
    tx.execute(
        &format!("INSERT INTO dashboard_sessions ({SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"),
        &[
            &s.id_sha256,
            &s.token_id,
            &s.csrf,
            &stored(s.created_at),
            &stored(s.last_used),
        ],
    )
    .await?;
    tx.execute(
        "DELETE FROM dashboard_sessions WHERE token_id = $1 AND id_sha256 NOT IN (
             SELECT id_sha256 FROM dashboard_sessions WHERE token_id = $1
             ORDER BY last_used DESC, created_at DESC, id_sha256 LIMIT $2)",
        &[&s.token_id, &i64::from(rules.per_token)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The live session with this id hash; an ended one is deleted.
pub(super) async fn get(
    c: &impl GenericClient,
    id_sha256: &str,
    now: u64,
    rules: &SessionRules,
) -> Result<Option<DashboardSession>, StoreError> {
    let found = query_opt(
        c,
        &format!("SELECT {SESSION_COLUMNS} FROM dashboard_sessions WHERE id_sha256 = $1"),
        &[&id_sha256],
        sessions::session,
    )
    .await?;
    match found {
        Some(s) if rules.live(&s, now) => Ok(Some(s)),
        Some(_) => {
            delete(c, id_sha256).await?;
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Marks a session used at `now` (never back in time).
pub(super) async fn touch(
    c: &impl GenericClient,
    id_sha256: &str,
    now: u64,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE dashboard_sessions SET last_used = $2 WHERE id_sha256 = $1 AND last_used < $2",
        &[&id_sha256, &stored(now)],
    )
    .await?;
    Ok(())
}

pub(super) async fn delete(c: &impl GenericClient, id_sha256: &str) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM dashboard_sessions WHERE id_sha256 = $1",
        &[&id_sha256],
    )
    .await?;
    Ok(())
}

/// Telemetry stored after `after` in arrival order, at most `limit`.
pub(super) async fn telemetry_arrived(
    c: &impl GenericClient,
    after: &ArrivalKey,
    limit: u32,
) -> Result<Vec<(ArrivalKey, String)>, StoreError> {
    // The first condition lets the arrival index bound the scan.
    query_all(
        c,
        &format!(
            "SELECT {ARRIVED_TELEMETRY_COLUMNS} FROM telemetry
             WHERE received_at >= $1 AND (received_at, device_id, seq) > ($1, $2, $3)
             ORDER BY received_at, device_id, seq LIMIT $4"
        ),
        &[
            &stored(after.received_at),
            &after.device_id,
            &stored(after.seq),
            &i64::from(limit),
        ],
        sessions::arrived_telemetry,
    )
    .await
}

/// Update events stored after `after` in arrival order, at most `limit`.
pub(super) async fn events_arrived(
    c: &impl GenericClient,
    after: &ArrivalKey,
    limit: u32,
) -> Result<Vec<(ArrivalKey, EventRecord)>, StoreError> {
    query_all(
        c,
        &format!(
            "SELECT {} FROM events
             WHERE received_at >= $1 AND (received_at, device_id, seq) > ($1, $2, $3)
             ORDER BY received_at, device_id, seq LIMIT $4",
            sessions::arrived_event_columns()
        ),
        &[
            &stored(after.received_at),
            &after.device_id,
            &stored(after.seq),
            &i64::from(limit),
        ],
        sessions::arrived_event,
    )
    .await
}
