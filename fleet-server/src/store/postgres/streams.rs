//! What devices stream on PostgreSQL: update events, telemetry and
//! inference results, each stored once per device and sequence number, so
//! at-least-once delivery becomes exactly-once storage.

use deadpool_postgres::GenericClient;

use edgefleet_shared::UpdateEvent;

use super::super::filter::page_bounds;
use super::super::rows::{self, stored, stored_opt, BODY_COLUMNS, EVENT_COLUMNS};
use super::super::{EventRecord, Page, StoreError, Streamed};
use super::{devices, query_all, Params};

/// Stores an event once, arriving at `now`; returns whether it was new.
pub(super) async fn record_event(
    c: &impl GenericClient,
    e: &UpdateEvent,
    now: u64,
) -> Result<bool, StoreError> {
    let n = c
        .execute(
            "INSERT INTO events (device_id, seq, at, kind, desired_version, model, model_version, reason,
                 agent_version, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            &[
                &e.device_id.as_str(),
                &stored(e.seq),
                &stored(e.at),
                &e.kind.as_str(),
                &stored_opt(e.desired_version),
                &e.model,
                &stored_opt(e.model_version),
                &e.reason,
                &e.agent_version,
                &stored(now),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// A device's newest events, newest first.
pub(super) async fn events_for_device(
    c: &impl GenericClient,
    device: &str,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError> {
    query_all(
        c,
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE device_id = $1 ORDER BY seq DESC LIMIT $2"
        ),
        &[&device, &i64::from(limit)],
        rows::event,
    )
    .await
}

/// Stores a batch of streamed records in one transaction; returns how
/// many were new. One multi-row statement per table (arrays unnested
/// server-side), so a batch costs a few round trips whatever its size.
pub(super) async fn record(
    client: &mut deadpool_postgres::Client,
    batch: &[Streamed],
    now: u64,
) -> Result<usize, StoreError> {
    let (mut t_dev, mut t_seq, mut t_at, mut t_body) = (vec![], vec![], vec![], vec![]);
    let (mut r_dev, mut r_seq, mut r_at, mut r_model, mut r_ver, mut r_req, mut r_body) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for record in batch {
        let row = rows::streamed_row(record)?;
        match record {
            Streamed::Telemetry(_) => {
                t_dev.push(row.device_id);
                t_seq.push(row.seq);
                t_at.push(row.at);
                t_body.push(row.body);
            }
            Streamed::Result(r) => {
                r_dev.push(row.device_id);
                r_seq.push(row.seq);
                r_at.push(row.at);
                r_model.push(r.model.as_str());
                r_ver.push(stored(r.model_version));
                r_req.push(r.request_id.as_deref());
                r_body.push(row.body);
            }
        }
    }
    let device_ids = rows::streamed_devices(batch);
    let now = stored(now);
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO devices (id, first_seen, last_seen)
         SELECT id, $2, $2 FROM UNNEST($1::text[]) AS u(id)
         ON CONFLICT (id) DO UPDATE SET last_seen = GREATEST(devices.last_seen, excluded.last_seen)",
        &[&device_ids, &now],
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
        let params: &Params<'_> = &[
            &r_dev, &r_seq, &r_at, &now, &r_model, &r_ver, &r_req, &r_body,
        ];
        new += tx
            .execute(
                "INSERT INTO results (device_id, seq, at, received_at, model, model_version, request_id, body)
                 SELECT d, s, a, $4, m, v, q, b
                 FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $5::text[], $6::bigint[], $7::text[], $8::text[])
                      AS u(d, s, a, m, v, q, b)
                 ON CONFLICT DO NOTHING",
                params,
            )
            .await? as usize;
    }
    tx.commit().await?;
    Ok(new)
}

/// Telemetry of a device in sequence order; `None` for an unknown device.
pub(super) async fn telemetry_for_device(
    c: &impl GenericClient,
    device: &str,
    page: &Page,
) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
    if devices::get(c, device).await?.is_none() {
        return Ok(None);
    }
    let (after, limit) = page_bounds(page);
    query_all(
        c,
        &format!(
            "SELECT {BODY_COLUMNS} FROM telemetry
             WHERE device_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        ),
        &[&device, &after, &limit],
        rows::stored_body,
    )
    .await
    .map(Some)
}

/// A device's newest telemetry from device time `since` on, oldest first.
pub(super) async fn recent_telemetry(
    c: &impl GenericClient,
    device: &str,
    since: u64,
    limit: u32,
) -> Result<Vec<serde_json::Value>, StoreError> {
    query_all(
        c,
        &format!(
            "SELECT {BODY_COLUMNS} FROM (
                 SELECT seq, {BODY_COLUMNS} FROM telemetry
                 WHERE device_id = $1 AND at >= $2 ORDER BY seq DESC LIMIT $3
             ) AS newest ORDER BY seq"
        ),
        &[&device, &stored(since), &i64::from(limit)],
        rows::stored_body,
    )
    .await
}

/// Results of a device in sequence order, optionally of one model; `None`
/// for an unknown device.
pub(super) async fn results_for_device(
    c: &impl GenericClient,
    device: &str,
    model: Option<&str>,
    page: &Page,
) -> Result<Option<Vec<serde_json::Value>>, StoreError> {
    if devices::get(c, device).await?.is_none() {
        return Ok(None);
    }
    let (after, limit) = page_bounds(page);
    query_all(
        c,
        &format!(
            "SELECT {BODY_COLUMNS} FROM results
             WHERE device_id = $1 AND seq > $2 AND ($3::text IS NULL OR model = $3)
             ORDER BY seq LIMIT $4"
        ),
        &[&device, &after, &model, &limit],
        rows::stored_body,
    )
    .await
    .map(Some)
}

/// Deletes telemetry and results that arrived before `cutoff`.
pub(super) async fn prune(c: &impl GenericClient, cutoff: u64) -> Result<usize, StoreError> {
    let a = c
        .execute(
            "DELETE FROM telemetry WHERE received_at < $1",
            &[&stored(cutoff)],
        )
        .await?;
    let b = c
        .execute(
            "DELETE FROM results WHERE received_at < $1",
            &[&stored(cutoff)],
        )
        .await?;
    Ok((a + b) as usize)
}
