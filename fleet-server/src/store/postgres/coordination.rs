//! What several servers coordinate through: the rollout driver's lease
//! (timed by the database's clock, so replicas' clocks need not agree)
//! and the driver's inbox (device reports and operator actions that
//! other replicas received, for the driver to apply).

use deadpool_postgres::GenericClient;

use super::super::StoreError;

/// The database's clock, in milliseconds since the epoch.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

pub(super) async fn lease(
    c: &impl GenericClient,
    name: &str,
    holder: &str,
    ttl_ms: u64,
) -> Result<Option<u64>, StoreError> {
    let row = c
        .query_opt(
            &format!(
                "INSERT INTO leases (name, holder, epoch, expires_ms) VALUES ($1, $2, 1, {NOW_MS} + $3)
                 ON CONFLICT (name) DO UPDATE SET
                     epoch = CASE WHEN leases.holder = excluded.holder THEN leases.epoch ELSE leases.epoch + 1 END,
                     holder = excluded.holder,
                     expires_ms = excluded.expires_ms
                 WHERE leases.holder = excluded.holder OR leases.expires_ms < {NOW_MS}
                 RETURNING epoch"
            ),
            &[&name, &holder, &(ttl_ms as i64)],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, i64>(0) as u64))
}

pub(super) async fn release_lease(
    c: &impl GenericClient,
    name: &str,
    holder: &str,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE leases SET expires_ms = 0 WHERE name = $1 AND holder = $2",
        &[&name, &holder],
    )
    .await?;
    Ok(())
}

pub(super) async fn push_inbox(
    c: &impl GenericClient,
    bodies: &[String],
    now: u64,
) -> Result<Vec<i64>, StoreError> {
    let rows = c
        .query(
            "INSERT INTO rollout_inbox (body, at) SELECT unnest($1::TEXT[]), $2 RETURNING id",
            &[&bodies, &(now as i64)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub(super) async fn inbox(
    c: &impl GenericClient,
    limit: u32,
) -> Result<Vec<(i64, String)>, StoreError> {
    let rows = c
        .query(
            "SELECT id, body FROM rollout_inbox WHERE outcome IS NULL ORDER BY id LIMIT $1",
            &[&i64::from(limit)],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub(super) async fn settle_inbox(
    client: &mut deadpool_postgres::Client,
    done: &[i64],
    answers: &[(i64, String)],
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("DELETE FROM rollout_inbox WHERE id = ANY($1)", &[&done])
        .await?;
    for (id, outcome) in answers {
        tx.execute(
            "UPDATE rollout_inbox SET outcome = $2 WHERE id = $1",
            &[id, outcome],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn take_outcome(
    c: &impl GenericClient,
    id: i64,
) -> Result<Option<String>, StoreError> {
    let row = c
        .query_opt(
            "DELETE FROM rollout_inbox WHERE id = $1 AND outcome IS NOT NULL RETURNING outcome",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}
