//! Dashboard login sessions, and telemetry and update events in arrival
//! order, on SQLite.

use rusqlite::{params, Connection};

use super::super::rows::stored;
use super::super::sessions::{
    self, ArrivalKey, DashboardSession, SessionRules, ARRIVED_TELEMETRY_COLUMNS, SESSION_COLUMNS,
};
use super::super::{EventRecord, StoreError};
use super::{query_all, query_opt};

/// Stores a new session; drops the ended ones and, past the token's
/// limit, its least recently used.
pub(super) fn create(
    conn: &mut Connection,
    s: &DashboardSession,
    rules: &SessionRules,
) -> Result<(), StoreError> {
    let (idle, lifetime) = rules.cutoffs(s.created_at);
    let tx = conn.transaction()?;
    tx.execute(
        "DELETE FROM dashboard_sessions WHERE last_used < ?1 OR created_at < ?2",
        params![idle, lifetime],
    )?;
    tx.execute(
        &format!("INSERT INTO dashboard_sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
        params![
            s.id_sha256,
            s.token_id,
            s.csrf,
            stored(s.created_at),
            stored(s.last_used)
        ],
    )?;
    tx.execute(
        "DELETE FROM dashboard_sessions WHERE token_id = ?1 AND id_sha256 NOT IN (
             SELECT id_sha256 FROM dashboard_sessions WHERE token_id = ?1
             ORDER BY last_used DESC, created_at DESC, id_sha256 LIMIT ?2)",
        params![s.token_id, rules.per_token],
    )?;
    tx.commit()?;
    Ok(())
}

/// The live session with this id hash; an ended one is deleted.
pub(super) fn get(
    conn: &Connection,
    id_sha256: &str,
    now: u64,
    rules: &SessionRules,
) -> Result<Option<DashboardSession>, StoreError> {
    let found = query_opt(
        conn,
        &format!("SELECT {SESSION_COLUMNS} FROM dashboard_sessions WHERE id_sha256 = ?1"),
        [id_sha256],
        sessions::session,
    )?;
    match found {
        Some(s) if rules.live(&s, now) => Ok(Some(s)),
        Some(_) => {
            delete(conn, id_sha256)?;
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Marks a session used at `now` (never back in time).
pub(super) fn touch(conn: &Connection, id_sha256: &str, now: u64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE dashboard_sessions SET last_used = ?2 WHERE id_sha256 = ?1 AND last_used < ?2",
        params![id_sha256, stored(now)],
    )?;
    Ok(())
}

pub(super) fn delete(conn: &Connection, id_sha256: &str) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM dashboard_sessions WHERE id_sha256 = ?1",
        [id_sha256],
    )?;
    Ok(())
}

/// Telemetry stored after `after` in arrival order, at most `limit`.
pub(super) fn telemetry_arrived(
    conn: &Connection,
    after: &ArrivalKey,
    limit: u32,
) -> Result<Vec<(ArrivalKey, String)>, StoreError> {
    // The first condition lets the arrival index bound the scan.
    query_all(
        conn,
        &format!(
            "SELECT {ARRIVED_TELEMETRY_COLUMNS} FROM telemetry
             WHERE received_at >= ?1 AND (received_at, device_id, seq) > (?1, ?2, ?3)
             ORDER BY received_at, device_id, seq LIMIT ?4"
        ),
        params![
            stored(after.received_at),
            after.device_id,
            stored(after.seq),
            limit
        ],
        sessions::arrived_telemetry,
    )
}

/// Update events stored after `after` in arrival order, at most `limit`.
pub(super) fn events_arrived(
    conn: &Connection,
    after: &ArrivalKey,
    limit: u32,
) -> Result<Vec<(ArrivalKey, EventRecord)>, StoreError> {
    query_all(
        conn,
        &format!(
            "SELECT {} FROM events
             WHERE received_at >= ?1 AND (received_at, device_id, seq) > (?1, ?2, ?3)
             ORDER BY received_at, device_id, seq LIMIT ?4",
            sessions::arrived_event_columns()
        ),
        params![
            stored(after.received_at),
            after.device_id,
            stored(after.seq),
            limit
        ],
        sessions::arrived_event,
    )
}
