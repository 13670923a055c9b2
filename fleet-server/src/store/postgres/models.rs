//! Models on PostgreSQL: the registry of model versions, their
//! attachments, the assignments that deploy them and the rollouts that
//! drive those. A version's row is locked while it is checked and changed,
//! so a deployment and an attachment or deletion cannot interleave.

use deadpool_postgres::GenericClient;

use super::super::rows::{self, stored, MODEL_COLUMNS, ROLLOUT_COLUMNS};
use super::super::{
    deployed_conflict, deployed_model, missing_model, Attachment, ModelRecord, StoreError, Target,
    ALL_DEVICES,
};
use super::{devices, query_all, query_opt};

/// Adds a model version (see [`rows::readd_model`] for one stored
/// already).
pub(super) async fn add(
    c: &impl GenericClient,
    m: &ModelRecord,
) -> Result<ModelRecord, StoreError> {
    let n = c
        .execute(
            "INSERT INTO models (name, version, format, sha256, size, created_at, pushed_by, notes)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            &[
                &m.name,
                &stored(m.version),
                &m.format.to_string(),
                &m.sha256,
                &stored(m.size),
                &stored(m.created_at),
                &m.pushed_by,
                &m.notes,
            ],
        )
        .await?;
    if n == 1 {
        return Ok(m.clone());
    }
    let existing = get(c, &m.name, m.version)
        .await?
        .ok_or_else(|| missing_model(&m.name, m.version))?;
    rows::readd_model(existing, m)
}

/// One model version.
pub(super) async fn get(
    c: &impl GenericClient,
    name: &str,
    version: u64,
) -> Result<Option<ModelRecord>, StoreError> {
    query_opt(
        c,
        &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2"),
        &[&name, &stored(version)],
        rows::model,
    )
    .await
}

/// Every model version, by name then version.
pub(super) async fn list(c: &impl GenericClient) -> Result<Vec<ModelRecord>, StoreError> {
    query_all(
        c,
        &format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name, version"),
        &[],
        rows::model,
    )
    .await
}

/// Reads a model version, locking its row (`mode`: `UPDATE` or `SHARE`);
/// `None` when it does not exist.
async fn lock(
    c: &impl GenericClient,
    name: &str,
    version: u64,
    mode: &str,
) -> Result<Option<ModelRecord>, StoreError> {
    query_opt(
        c,
        &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = $1 AND version = $2 FOR {mode}"),
        &[&name, &stored(version)],
        rows::model,
    )
    .await
}

/// Whether any assignment points at this model version.
async fn is_assigned(c: &impl GenericClient, name: &str, version: u64) -> Result<bool, StoreError> {
    Ok(query_opt(
        c,
        "SELECT 1 FROM assignments WHERE model = $1
           AND (version = $2 OR shadow_version = $2 OR split_version = $2) LIMIT 1",
        &[&name, &stored(version)],
        |_| Ok(()),
    )
    .await?
    .is_some())
}

/// Attaches a spec or test vector to an undeployed model version.
pub(super) async fn attach(
    client: &mut deadpool_postgres::Client,
    name: &str,
    version: u64,
    attachment: &Attachment,
) -> Result<ModelRecord, StoreError> {
    let tx = client.transaction().await?;
    if lock(&tx, name, version, "UPDATE").await?.is_none() {
        return Err(missing_model(name, version));
    }
    if is_assigned(&tx, name, version).await? {
        return Err(deployed_conflict(name, version, attachment.what()));
    }
    let (column, json) = rows::attachment_column(attachment);
    tx.execute(
        &format!("UPDATE models SET {column} = $3 WHERE name = $1 AND version = $2"),
        &[&name, &stored(version), &json],
    )
    .await?;
    let record = get(&tx, name, version)
        .await?
        .ok_or_else(|| missing_model(name, version))?;
    tx.commit().await?;
    Ok(record)
}

/// Deletes an undeployed model version; returns it and whether another
/// version has the same file.
pub(super) async fn delete(
    client: &mut deadpool_postgres::Client,
    name: &str,
    version: u64,
) -> Result<(ModelRecord, bool), StoreError> {
    let tx = client.transaction().await?;
    let record = lock(&tx, name, version, "UPDATE")
        .await?
        .ok_or_else(|| missing_model(name, version))?;
    if is_assigned(&tx, name, version).await? {
        return Err(deployed_model(name, version));
    }
    tx.execute(
        "DELETE FROM models WHERE name = $1 AND version = $2",
        &[&name, &stored(version)],
    )
    .await?;
    super::references::delete(&tx, name, version).await?;
    let still_used = query_opt(
        &tx,
        "SELECT 1 FROM models WHERE sha256 = $1 LIMIT 1",
        &[&record.sha256],
        |_| Ok(()),
    )
    .await?
    .is_some();
    tx.commit().await?;
    Ok((record, still_used))
}

/// Points `target` at a model version; the ids of the devices affected.
pub(super) async fn deploy(
    client: &mut deadpool_postgres::Client,
    model: &str,
    version: u64,
    target: &Target,
    now: u64,
) -> Result<Vec<String>, StoreError> {
    let tx = client.transaction().await?;
    if lock(&tx, model, version, "SHARE").await?.is_none() {
        return Err(missing_model(model, version));
    }
    let assign = "INSERT INTO assignments (scope, model, version) VALUES ($1, $2, $3)
                  ON CONFLICT (scope, model) DO UPDATE SET version = excluded.version,
                      quality = NULL, shadow_version = NULL, split_version = NULL";
    let ids = match target {
        Target::All => {
            tx.execute(assign, &[&ALL_DEVICES, &model, &stored(version)])
                .await?;
            devices::list(&tx)
                .await?
                .into_iter()
                .map(|d| d.id)
                .collect()
        }
        Target::Devices(ids) => {
            for id in ids {
                devices::ensure(&tx, id, now).await?;
                tx.execute(assign, &[id, &model, &stored(version)]).await?;
            }
            ids.clone()
        }
    };
    tx.commit().await?;
    Ok(ids)
}

/// The models `device` should run: fleet-wide assignments, overridden per
/// model by the device's own.
pub(super) async fn for_device(
    c: &impl GenericClient,
    device: &str,
) -> Result<Vec<ModelRecord>, StoreError> {
    query_all(
        c,
        &format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE (name, version) IN (
                 SELECT a.model, a.version FROM assignments a
                 WHERE a.scope = $1
                    OR (a.scope = '{ALL_DEVICES}' AND NOT EXISTS (
                        SELECT 1 FROM assignments d WHERE d.scope = $1 AND d.model = a.model)))
             ORDER BY name"
        ),
        &[&device],
        rows::model,
    )
    .await
}

/// Stores a rollout, keeping its place in the listing order (`seq` is
/// drawn once, on insert).
pub(super) async fn save_rollout(
    c: &impl GenericClient,
    id: &str,
    active: bool,
    state: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO rollouts (id, active, state) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET active = excluded.active, state = excluded.state",
        &[&id, &active, &state],
    )
    .await?;
    Ok(())
}

/// Every stored rollout, oldest first.
pub(super) async fn list_rollouts(
    c: &impl GenericClient,
) -> Result<Vec<(String, bool, String)>, StoreError> {
    query_all(
        c,
        &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY seq"),
        &[],
        rows::rollout,
    )
    .await
}
