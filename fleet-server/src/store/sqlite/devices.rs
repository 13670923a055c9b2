//! Devices on SQLite: status messages, enrollment, tags, keys and the
//! signed desired state of each device.

use std::collections::BTreeMap;

use rusqlite::{params, params_from_iter, Connection};

use edgefleet_shared::{StatusMessage, UpdateEvent};

use super::super::filter;
use super::super::rows::{self, stored, StatusChange, DESIRED_COLUMNS, DEVICE_COLUMNS};
use super::super::{
    DesiredContent, DeviceFilter, DeviceRecord, Enrollment, KeyWrite, SignFn, StatusOutcome,
    StoreError,
};
use super::{agents, models, query_all, query_opt, streams, Sqlite};

/// Records status messages and update events in one transaction (see
/// [`super::super::StoreBackend::record_messages`]).
pub(super) fn record_messages(
    conn: &mut Connection,
    statuses: &[StatusMessage],
    events: &[UpdateEvent],
    now: u64,
) -> Result<(Vec<StatusOutcome>, Vec<bool>), StoreError> {
    let tx = conn.transaction()?;
    let outcomes = statuses
        .iter()
        .map(|m| record_status(&tx, m, now))
        .collect::<Result<_, _>>()?;
    let mut new = Vec::with_capacity(events.len());
    for e in events {
        ensure(&tx, e.device_id.as_str(), e.at)?;
        new.push(streams::record_event(&tx, e, now)?);
    }
    tx.commit()?;
    Ok((outcomes, new))
}

/// Records one status message (see [`rows::status_change`]).
fn record_status(
    tx: &Connection,
    msg: &StatusMessage,
    now: u64,
) -> Result<StatusOutcome, StoreError> {
    let id = msg.device_id.as_str();
    let last_seq = query_opt(
        tx,
        "SELECT last_status_seq FROM devices WHERE id = ?1",
        [id],
        |r| r.unsigned(0),
    )?;
    let is_new = last_seq.is_none();
    if is_new {
        tx.execute(
            "INSERT INTO devices (id, first_seen, last_seen) VALUES (?1, ?2, ?2)",
            params![id, stored(now)],
        )?;
    }
    match rows::status_change(msg, last_seq) {
        StatusChange::Offline => {
            // Not the will of a connection older than the latest online.
            tx.execute(
                "UPDATE devices SET online = 0, last_seen = ?2
                 WHERE id = ?1 AND (?3 IS NULL OR session IS NULL OR session <= ?3)",
                params![id, stored(now), msg.session.map(stored)],
            )?;
        }
        StatusChange::Online(u) => {
            tx.execute(
                "UPDATE devices SET online = 1, last_seen = ?2, agent_version = ?3,
                    reported_desired_version = ?4, models_json = ?5, last_status_seq = ?6,
                    agent_target = ?7, agent_release = ?8, session = COALESCE(?9, session)
                 WHERE id = ?1",
                params![
                    id,
                    stored(now),
                    u.agent_version,
                    u.reported_desired_version,
                    u.models_json,
                    u.seq,
                    u.agent_target,
                    u.agent_release,
                    u.session
                ],
            )?;
        }
        StatusChange::Stale => {}
    }
    let desired = if msg.online {
        query_opt(
            tx,
            &format!("SELECT {DESIRED_COLUMNS} FROM devices WHERE id = ?1"),
            [id],
            rows::desired,
        )?
    } else {
        None
    };
    Ok(StatusOutcome { is_new, desired })
}

/// Ensures a device row exists (for deployments to devices not seen yet).
pub(super) fn ensure(conn: &Connection, id: &str, now: u64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO devices (id, first_seen, last_seen) VALUES (?1, ?2, ?2)",
        params![id, stored(now)],
    )?;
    Ok(())
}

/// Signs and stores the next desired state of `device`: the version is
/// allocated, signed and stored in one transaction.
pub(super) fn sign_desired(
    conn: &mut Connection,
    device: &str,
    now: u64,
    sign: SignFn,
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let tx = conn.transaction()?;
    let content = DesiredContent {
        models: models::for_device(&tx, device)?,
        agent: agents::for_device(&tx, device)?,
        quality: super::quality::for_device(&tx, device)?,
    };
    if content.is_empty() {
        return Ok(None);
    }
    ensure(&tx, device, now)?;
    let (current, _) = query_opt(
        &tx,
        &format!("SELECT {DESIRED_COLUMNS} FROM devices WHERE id = ?1"),
        [device],
        rows::desired,
    )?
    .ok_or_else(|| StoreError::NotFound(format!("unknown device {device:?}")))?;
    let version = current + 1;
    let bytes = sign(&content, version);
    tx.execute(
        "UPDATE devices SET desired_version = ?2, desired_json = ?3 WHERE id = ?1",
        params![device, stored(version), bytes],
    )?;
    tx.commit()?;
    Ok(Some((version, bytes)))
}

/// Every stored desired-state document, by device id.
pub(super) fn all_desired(conn: &Connection) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let documents = query_all(
        conn,
        "SELECT id, desired_json FROM devices WHERE desired_json IS NOT NULL ORDER BY id",
        [],
        |r| Ok((r.text(0)?, r.opt_bytes(1)?)),
    )?;
    Ok(documents
        .into_iter()
        .filter_map(|(id, doc)| Some((id, doc?)))
        .collect())
}

/// The stored desired-state document of `device`.
pub(super) fn desired_json(conn: &Connection, device: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(query_opt(
        conn,
        &format!("SELECT {DESIRED_COLUMNS} FROM devices WHERE id = ?1"),
        [device],
        rows::desired,
    )?
    .and_then(|(_, doc)| doc))
}

/// Every device, by id.
pub(super) fn list(conn: &Connection) -> Result<Vec<DeviceRecord>, StoreError> {
    query_all(
        conn,
        &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"),
        [],
        rows::device,
    )
}

/// One device.
pub(super) fn get(conn: &Connection, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
    query_opt(
        conn,
        &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
        [id],
        rows::device,
    )
}

/// The devices matching `filter` (see [`filter::device_query`]).
pub(super) fn find(
    conn: &Connection,
    filter: &DeviceFilter,
) -> Result<Vec<DeviceRecord>, StoreError> {
    let (sql, args) = filter::device_query::<Sqlite>(filter);
    let args = args.into_iter().map(rusqlite::types::Value::from);
    query_all(conn, &sql, params_from_iter(args), rows::device)
}

/// Enrolls a device, or enrolls it again.
pub(super) fn enroll(
    conn: &Connection,
    e: &Enrollment,
    now: u64,
) -> Result<DeviceRecord, StoreError> {
    conn.execute(
        "INSERT INTO devices (id, first_seen, last_seen, hardware, tags, enrolled_at, credential, device_key)
         VALUES (?1, ?2, ?2, ?3, ?4, ?2, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET hardware = excluded.hardware, tags = excluded.tags,
            enrolled_at = excluded.enrolled_at, credential = excluded.credential, revoked_at = NULL,
            device_key = excluded.device_key",
        params![e.id, stored(now), e.hardware, rows::tags_json(&e.tags), e.credential, e.public_key],
    )?;
    get(conn, &e.id)?.ok_or_else(|| StoreError::NotFound(e.id.clone()))
}

/// Revokes a device's credential, keeping the first revocation time.
pub(super) fn revoke(
    conn: &Connection,
    id: &str,
    now: u64,
) -> Result<Option<DeviceRecord>, StoreError> {
    conn.execute(
        "UPDATE devices SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, stored(now)],
    )?;
    get(conn, id)
}

/// Replaces a device's tags.
pub(super) fn set_tags(
    conn: &Connection,
    id: &str,
    tags: &BTreeMap<String, String>,
) -> Result<Option<DeviceRecord>, StoreError> {
    conn.execute(
        "UPDATE devices SET tags = ?2 WHERE id = ?1",
        params![id, rows::tags_json(tags)],
    )?;
    get(conn, id)
}

/// Sets a device's public key as `who` may; the key it has afterwards.
pub(super) fn set_key(
    conn: &Connection,
    id: &str,
    key: &str,
    who: KeyWrite,
) -> Result<Option<String>, StoreError> {
    let sql = match who {
        KeyWrite::Operator => "UPDATE devices SET device_key = ?2 WHERE id = ?1",
        KeyWrite::FirstOnly => {
            "UPDATE devices SET device_key = ?2 WHERE id = ?1 AND device_key IS NULL"
        }
    };
    conn.execute(sql, params![id, key])?;
    Ok(query_opt(
        conn,
        "SELECT device_key FROM devices WHERE id = ?1",
        [id],
        |r| r.opt_text(0),
    )?
    .flatten())
}

/// A device's credential hash, if it is enrolled and not revoked.
pub(super) fn credential(conn: &Connection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(query_opt(
        conn,
        "SELECT credential FROM devices WHERE id = ?1 AND revoked_at IS NULL",
        [id],
        |r| r.opt_text(0),
    )?
    .flatten())
}
