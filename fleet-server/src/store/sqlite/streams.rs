//! What devices stream on SQLite: update events, telemetry and inference
//! results, each stored once per device and sequence number, so
//! at-least-once delivery becomes exactly-once storage.

use rusqlite::{params, Connection};

use edgefleet_shared::UpdateEvent;

use super::super::filter::page_bounds;
use super::super::rows::{self, stored, stored_opt, BODY_COLUMNS, EVENT_COLUMNS};
use super::super::{EventRecord, Page, StoreError, Streamed};
use super::{devices, query_all};

/// Stores an event once, arriving at `now`; returns whether it was new.
pub(super) fn record_event(
    conn: &Connection,
    e: &UpdateEvent,
    now: u64,
) -> Result<bool, StoreError> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO events (device_id, seq, at, kind, desired_version, model, model_version, reason,
             agent_version, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            e.device_id.as_str(),
            stored(e.seq),
            stored(e.at),
            e.kind.as_str(),
            stored_opt(e.desired_version),
            e.model,
            stored_opt(e.model_version),
            e.reason,
            e.agent_version,
            stored(now),
        ],
    )?;
    Ok(n == 1)
}

/// A device's newest events, newest first.
pub(super) fn events_for_device(
    conn: &Connection,
    device: &str,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError> {
    query_all(
        conn,
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2"
        ),
        params![device, limit],
        rows::event,
    )
}

/// Stores a batch of streamed records in one transaction; returns how
/// many were new.
pub(super) fn record(
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
        for id in rows::streamed_devices(batch) {
            device.execute(params![id, stored(now)])?;
        }
        for record in batch {
            let row = rows::streamed_row(record)?;
            let (id, seq, at, now, body) = (row.device_id, row.seq, row.at, stored(now), row.body);
            new += match record {
                Streamed::Telemetry(_) => telemetry.execute(params![id, seq, at, now, body])?,
                Streamed::Result(r) => result.execute(params![
                    id,
                    seq,
                    at,
                    now,
                    r.model,
                    stored(r.model_version),
                    r.request_id,
                    body
                ])?,
            };
        }
    }
    tx.commit()?;
    Ok(new)
}

/// Telemetry of a device in sequence order; `None` for an unknown device.
pub(super) fn telemetry_for_device(
    conn: &Connection,
    device: &str,
    page: &Page,
) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
    if devices::get(conn, device)?.is_none() {
        return Ok(None);
    }
    let (after, limit) = page_bounds(page);
    query_all(
        conn,
        &format!(
            "SELECT {BODY_COLUMNS} FROM telemetry
             WHERE device_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
        ),
        params![device, after, limit],
        rows::stored_body,
    )
    .map(Some)
}

/// A device's newest telemetry from device time `since` on, oldest first.
pub(super) fn recent_telemetry(
    conn: &Connection,
    device: &str,
    since: u64,
    limit: u32,
) -> Result<Vec<serde_json::Value>, StoreError> {
    query_all(
        conn,
        &format!(
            "SELECT {BODY_COLUMNS} FROM (
                 SELECT seq, {BODY_COLUMNS} FROM telemetry
                 WHERE device_id = ?1 AND at >= ?2 ORDER BY seq DESC LIMIT ?3
             ) ORDER BY seq"
        ),
        params![device, stored(since), limit],
        rows::stored_body,
    )
}

/// Results of a device in sequence order, optionally of one model; `None`
/// for an unknown device.
pub(super) fn results_for_device(
    conn: &Connection,
    device: &str,
    model: Option<&str>,
    page: &Page,
) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
    if devices::get(conn, device)?.is_none() {
        return Ok(None);
    }
    let (after, limit) = page_bounds(page);
    query_all(
        conn,
        &format!(
            "SELECT {BODY_COLUMNS} FROM results
             WHERE device_id = ?1 AND seq > ?2 AND (?3 IS NULL OR model = ?3)
             ORDER BY seq LIMIT ?4"
        ),
        params![device, after, model, limit],
        rows::stored_body,
    )
    .map(Some)
}

/// Deletes telemetry and results that arrived before `cutoff`.
pub(super) fn prune(conn: &Connection, cutoff: u64) -> Result<usize, StoreError> {
    let a = conn.execute(
        "DELETE FROM telemetry WHERE received_at < ?1",
        [stored(cutoff)],
    )?;
    let b = conn.execute(
        "DELETE FROM results WHERE received_at < ?1",
        [stored(cutoff)],
    )?;
    Ok(a + b)
}
