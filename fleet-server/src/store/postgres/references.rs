//! Drift reference profiles on PostgreSQL: one JSON document per model
//! version, written whole. The version's row is locked while its
//! reference is written, so a deletion cannot interleave.

use deadpool_postgres::GenericClient;

use super::super::rows::stored;
use super::super::{missing_model, StoreError};
use super::{query_all, query_opt};

/// Stores `profile` as the reference of a model version that exists.
pub(super) async fn set(
    client: &mut deadpool_postgres::Client,
    name: &str,
    version: u64,
    profile: &str,
    now: u64,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let exists = query_opt(
        &tx,
        "SELECT 1 FROM models WHERE name = $1 AND version = $2 FOR SHARE",
        &[&name, &stored(version)],
        |_| Ok(()),
    )
    .await?;
    if exists.is_none() {
        return Err(missing_model(name, version));
    }
    tx.execute(
        "INSERT INTO model_references (name, version, profile, updated_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (name, version) DO UPDATE
         SET profile = excluded.profile, updated_at = excluded.updated_at",
        &[&name, &stored(version), &profile, &stored(now)],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A model version's reference, if it has one.
pub(super) async fn get(
    c: &impl GenericClient,
    name: &str,
    version: u64,
) -> Result<Option<String>, StoreError> {
    query_opt(
        c,
        "SELECT profile FROM model_references WHERE name = $1 AND version = $2",
        &[&name, &stored(version)],
        |r| r.text(0),
    )
    .await
}

/// Every reference: name, version, profile.
pub(super) async fn list(c: &impl GenericClient) -> Result<Vec<(String, u64, String)>, StoreError> {
    query_all(
        c,
        "SELECT name, version, profile FROM model_references ORDER BY name, version",
        &[],
        |r| Ok((r.text(0)?, r.unsigned(1)?, r.text(2)?)),
    )
    .await
}

/// Removes a model version's reference (with the version itself).
pub(super) async fn delete(
    c: &impl GenericClient,
    name: &str,
    version: u64,
) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM model_references WHERE name = $1 AND version = $2",
        &[&name, &stored(version)],
    )
    .await?;
    Ok(())
}
