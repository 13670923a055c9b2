//! Devices on PostgreSQL: status messages, enrollment, tags, keys and the
//! signed desired state of each device.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;

use edgefleet_shared::{StatusMessage, UpdateEvent};

use super::super::filter;
use super::super::rows::{self, stored, StatusChange, DESIRED_COLUMNS, DEVICE_COLUMNS};
use super::super::{
    DesiredContent, DeviceFilter, DeviceRecord, Enrollment, KeyWrite, SignFn, StatusOutcome,
    StoreError,
};
use super::{agents, bound, models, query_all, query_opt, streams, Params, Postgres};

/// Records status messages and update events in one transaction (see
/// [`super::super::StoreBackend::record_messages`]).
pub(super) async fn record_messages(
    client: &mut deadpool_postgres::Client,
    statuses: &[StatusMessage],
    events: &[UpdateEvent],
    now: u64,
) -> Result<(Vec<StatusOutcome>, Vec<bool>), StoreError> {
    let tx = client.transaction().await?;
    // Every device row the batch touches is locked (or made) first, all in
    // device order, before any is changed: a device's status and its
    // events may be stored by different replicas at once, and rows taken
    // in any other order deadlock between them.
    let mut ids: Vec<&str> = statuses
        .iter()
        .map(|s| s.device_id.as_str())
        .chain(events.iter().map(|e| e.device_id.as_str()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // Each locked row's last applied status sequence number.
    let mut last_seqs: std::collections::HashMap<String, u64> = tx
        .query(
            "SELECT id, last_status_seq FROM devices WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE",
            &[&ids],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
        .collect();
    let fresh: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !last_seqs.contains_key(*id))
        .collect();
    if !fresh.is_empty() {
        tx.execute(
            "INSERT INTO devices (id, first_seen, last_seen)
             SELECT id, $2, $2 FROM UNNEST($1::text[]) AS u(id) ORDER BY id
             ON CONFLICT (id) DO NOTHING",
            &[&fresh, &stored(now)],
        )
        .await?;
    }
    // In arrival order, so each device's statuses apply in sequence order.
    let mut outcomes = Vec::with_capacity(statuses.len());
    for msg in statuses {
        let id = msg.device_id.as_str();
        // `None`: new to the store (the batch's first status of a device
        // it made).
        let last_seq = last_seqs.get(id).copied();
        if msg.online && msg.seq > last_seq.unwrap_or(0) {
            last_seqs.insert(id.to_string(), msg.seq);
        } else {
            last_seqs.entry(id.to_string()).or_insert(0);
        }
        outcomes.push(record_status(&tx, msg, now, last_seq).await?);
    }
    let mut new = Vec::with_capacity(events.len());
    for e in events {
        new.push(streams::record_event(&tx, e, now).await?);
    }
    tx.commit().await?;
    Ok((outcomes, new))
}

/// Records one status message (see [`rows::status_change`]), given the
/// sequence number of the last status applied to its (locked) row, `None`
/// for a device new to the store.
async fn record_status(
    tx: &impl GenericClient,
    msg: &StatusMessage,
    now: u64,
    last_seq: Option<u64>,
) -> Result<StatusOutcome, StoreError> {
    let id = msg.device_id.as_str();
    let is_new = last_seq.is_none();
    match rows::status_change(msg, last_seq) {
        StatusChange::Offline => {
            // Not the will of a connection older than the latest online.
            tx.execute(
                "UPDATE devices SET online = FALSE, last_seen = $2
                 WHERE id = $1 AND ($3::BIGINT IS NULL OR session IS NULL OR session <= $3)",
                &[&id, &stored(now), &msg.session.map(stored)],
            )
            .await?;
        }
        StatusChange::Online(u) => {
            tx.execute(
                "UPDATE devices SET online = TRUE, last_seen = $2, agent_version = $3,
                    reported_desired_version = $4, models_json = $5, last_status_seq = $6,
                    agent_target = $7, agent_release = $8, session = COALESCE($9, session)
                 WHERE id = $1",
                &[
                    &id,
                    &stored(now),
                    &u.agent_version,
                    &u.reported_desired_version,
                    &u.models_json,
                    &u.seq,
                    &u.agent_target,
                    &u.agent_release,
                    &u.session,
                ],
            )
            .await?;
        }
        StatusChange::Stale => {}
    }
    let desired = if msg.online {
        query_opt(
            tx,
            &format!("SELECT {DESIRED_COLUMNS} FROM devices WHERE id = $1"),
            &[&id],
            rows::desired,
        )
        .await?
    } else {
        None
    };
    Ok(StatusOutcome { is_new, desired })
}

/// Ensures a device row exists (for deployments to devices not seen yet).
pub(super) async fn ensure(c: &impl GenericClient, id: &str, now: u64) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO devices (id, first_seen, last_seen) VALUES ($1, $2, $2) ON CONFLICT DO NOTHING",
        &[&id, &stored(now)],
    )
    .await?;
    Ok(())
}

/// Signs and stores the next desired state of `device`: the version is
/// allocated (the row locked), signed and stored in one transaction.
pub(super) async fn sign_desired(
    client: &mut deadpool_postgres::Client,
    device: &str,
    now: u64,
    sign: SignFn,
) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let tx = client.transaction().await?;
    let content = DesiredContent {
        models: models::for_device(&tx, device).await?,
        agent: agents::for_device(&tx, device).await?,
        quality: super::quality::for_device(&tx, device).await?,
    };
    if content.is_empty() {
        return Ok(None);
    }
    ensure(&tx, device, now).await?;
    let (current, _) = query_opt(
        &tx,
        &format!("SELECT {DESIRED_COLUMNS} FROM devices WHERE id = $1 FOR UPDATE"),
        &[&device],
        rows::desired,
    )
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("unknown device {device:?}")))?;
    let version = current + 1;
    let bytes = sign(&content, version);
    tx.execute(
        "UPDATE devices SET desired_version = $2, desired_json = $3 WHERE id = $1",
        &[&device, &stored(version), &bytes],
    )
    .await?;
    tx.commit().await?;
    Ok(Some((version, bytes)))
}

/// Every stored desired-state document, by device id.
pub(super) async fn all_desired(
    c: &impl GenericClient,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let documents = query_all(
        c,
        "SELECT id, desired_json FROM devices WHERE desired_json IS NOT NULL ORDER BY id",
        &[],
        |r| Ok((r.text(0)?, r.opt_bytes(1)?)),
    )
    .await?;
    Ok(documents
        .into_iter()
        .filter_map(|(id, doc)| Some((id, doc?)))
        .collect())
}

/// The stored desired-state document of `device`.
pub(super) async fn desired_json(
    c: &impl GenericClient,
    device: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(query_opt(
        c,
        &format!("SELECT {DESIRED_COLUMNS} FROM devices WHERE id = $1"),
        &[&device],
        rows::desired,
    )
    .await?
    .and_then(|(_, doc)| doc))
}

/// Every device, by id.
pub(super) async fn list(c: &impl GenericClient) -> Result<Vec<DeviceRecord>, StoreError> {
    query_all(
        c,
        &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY id"),
        &[],
        rows::device,
    )
    .await
}

/// One device.
pub(super) async fn get(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<DeviceRecord>, StoreError> {
    query_opt(
        c,
        &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"),
        &[&id],
        rows::device,
    )
    .await
}

/// The devices matching `filter` (see [`filter::device_query`]).
pub(super) async fn find(
    c: &impl GenericClient,
    filter: &DeviceFilter,
) -> Result<Vec<DeviceRecord>, StoreError> {
    let (sql, args) = filter::device_query::<Postgres>(filter);
    let params: Vec<_> = args.iter().map(bound).collect();
    let params: &Params<'_> = &params;
    query_all(c, &sql, params, rows::device).await
}

/// Enrolls a device, or enrolls it again.
pub(super) async fn enroll(
    c: &impl GenericClient,
    e: &Enrollment,
    now: u64,
) -> Result<DeviceRecord, StoreError> {
    c.execute(
        "INSERT INTO devices (id, first_seen, last_seen, hardware, tags, enrolled_at, credential, device_key)
         VALUES ($1, $2, $2, $3, $4, $2, $5, $6)
         ON CONFLICT (id) DO UPDATE SET hardware = excluded.hardware, tags = excluded.tags,
            enrolled_at = excluded.enrolled_at, credential = excluded.credential, revoked_at = NULL,
            device_key = excluded.device_key",
        &[&e.id, &stored(now), &e.hardware, &rows::tags_json(&e.tags), &e.credential, &e.public_key],
    )
    .await?;
    get(c, &e.id)
        .await?
        .ok_or_else(|| StoreError::NotFound(e.id.clone()))
}

/// Revokes a device's credential, keeping the first revocation time.
pub(super) async fn revoke(
    c: &impl GenericClient,
    id: &str,
    now: u64,
) -> Result<Option<DeviceRecord>, StoreError> {
    c.execute(
        "UPDATE devices SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        &[&id, &stored(now)],
    )
    .await?;
    get(c, id).await
}

/// Replaces a device's tags.
pub(super) async fn set_tags(
    c: &impl GenericClient,
    id: &str,
    tags: &BTreeMap<String, String>,
) -> Result<Option<DeviceRecord>, StoreError> {
    c.execute(
        "UPDATE devices SET tags = $2 WHERE id = $1",
        &[&id, &rows::tags_json(tags)],
    )
    .await?;
    get(c, id).await
}

/// Sets a device's public key as `who` may; the key it has afterwards.
pub(super) async fn set_key(
    c: &impl GenericClient,
    id: &str,
    key: &str,
    who: KeyWrite,
) -> Result<Option<String>, StoreError> {
    let sql = match who {
        KeyWrite::Operator => "UPDATE devices SET device_key = $2 WHERE id = $1",
        KeyWrite::FirstOnly => {
            "UPDATE devices SET device_key = $2 WHERE id = $1 AND device_key IS NULL"
        }
    };
    c.execute(sql, &[&id, &key]).await?;
    Ok(query_opt(
        c,
        "SELECT device_key FROM devices WHERE id = $1",
        &[&id],
        |r| r.opt_text(0),
    )
    .await?
    .flatten())
}

/// A device's credential hash, if it is enrolled and not revoked.
pub(super) async fn credential(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(query_opt(
        c,
        "SELECT credential FROM devices WHERE id = $1 AND revoked_at IS NULL",
        &[&id],
        |r| r.opt_text(0),
    )
    .await?
    .flatten())
}
