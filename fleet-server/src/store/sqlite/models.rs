//! Models on SQLite: the registry of model versions, their attachments,
//! the assignments that deploy them and the rollouts that drive those.

use rusqlite::{params, Connection};

use super::super::rows::{self, stored, MODEL_COLUMNS, ROLLOUT_COLUMNS};
use super::super::{
    deployed_conflict, deployed_model, missing_model, Attachment, ModelRecord, StoreError, Target,
    ALL_DEVICES,
};
use super::{devices, query_all, query_opt};

/// Adds a model version (see [`rows::readd_model`] for one stored
/// already).
pub(super) fn add(conn: &Connection, m: &ModelRecord) -> Result<ModelRecord, StoreError> {
    if let Some(existing) = get(conn, &m.name, m.version)? {
        return rows::readd_model(existing, m);
    }
    conn.execute(
        "INSERT INTO models (name, version, format, sha256, size, created_at, pushed_by, notes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            m.name,
            stored(m.version),
            m.format.to_string(),
            m.sha256,
            stored(m.size),
            stored(m.created_at),
            m.pushed_by,
            m.notes
        ],
    )?;
    Ok(m.clone())
}

/// One model version.
pub(super) fn get(
    conn: &Connection,
    name: &str,
    version: u64,
) -> Result<Option<ModelRecord>, StoreError> {
    query_opt(
        conn,
        &format!("SELECT {MODEL_COLUMNS} FROM models WHERE name = ?1 AND version = ?2"),
        params![name, stored(version)],
        rows::model,
    )
}

/// Every model version, by name then version.
pub(super) fn list(conn: &Connection) -> Result<Vec<ModelRecord>, StoreError> {
    query_all(
        conn,
        &format!("SELECT {MODEL_COLUMNS} FROM models ORDER BY name, version"),
        [],
        rows::model,
    )
}

/// Whether any assignment points at this model version.
fn is_assigned(conn: &Connection, name: &str, version: u64) -> Result<bool, StoreError> {
    Ok(query_opt(
        conn,
        "SELECT 1 FROM assignments WHERE model = ?1
           AND (version = ?2 OR shadow_version = ?2 OR split_version = ?2) LIMIT 1",
        params![name, stored(version)],
        |_| Ok(()),
    )?
    .is_some())
}

/// Attaches a spec or test vector to an undeployed model version.
pub(super) fn attach(
    conn: &mut Connection,
    name: &str,
    version: u64,
    attachment: &Attachment,
) -> Result<ModelRecord, StoreError> {
    let tx = conn.transaction()?;
    if get(&tx, name, version)?.is_none() {
        return Err(missing_model(name, version));
    }
    if is_assigned(&tx, name, version)? {
        return Err(deployed_conflict(name, version, attachment.what()));
    }
    let (column, json) = rows::attachment_column(attachment);
    tx.execute(
        &format!("UPDATE models SET {column} = ?3 WHERE name = ?1 AND version = ?2"),
        params![name, stored(version), json],
    )?;
    let record = get(&tx, name, version)?.ok_or_else(|| missing_model(name, version))?;
    tx.commit()?;
    Ok(record)
}

/// Deletes an undeployed model version; returns it and whether another
/// version has the same file.
pub(super) fn delete(
    conn: &mut Connection,
    name: &str,
    version: u64,
) -> Result<(ModelRecord, bool), StoreError> {
    let tx = conn.transaction()?;
    let record = get(&tx, name, version)?.ok_or_else(|| missing_model(name, version))?;
    if is_assigned(&tx, name, version)? {
        return Err(deployed_model(name, version));
    }
    tx.execute(
        "DELETE FROM models WHERE name = ?1 AND version = ?2",
        params![name, stored(version)],
    )?;
    super::references::delete(&tx, name, version)?;
    let still_used = query_opt(
        &tx,
        "SELECT 1 FROM models WHERE sha256 = ?1 LIMIT 1",
        [&record.sha256],
        |_| Ok(()),
    )?
    .is_some();
    tx.commit()?;
    Ok((record, still_used))
}

/// Points `target` at a model version; the ids of the devices affected.
pub(super) fn deploy(
    conn: &mut Connection,
    model: &str,
    version: u64,
    target: &Target,
    now: u64,
) -> Result<Vec<String>, StoreError> {
    let tx = conn.transaction()?;
    if get(&tx, model, version)?.is_none() {
        return Err(missing_model(model, version));
    }
    let assign = "INSERT INTO assignments (scope, model, version) VALUES (?1, ?2, ?3)
                  ON CONFLICT (scope, model) DO UPDATE SET version = excluded.version,
                      quality = NULL, shadow_version = NULL, split_version = NULL";
    let ids = match target {
        Target::All => {
            tx.execute(assign, params![ALL_DEVICES, model, stored(version)])?;
            devices::list(&tx)?.into_iter().map(|d| d.id).collect()
        }
        Target::Devices(ids) => {
            for id in ids {
                devices::ensure(&tx, id, now)?;
                tx.execute(assign, params![id, model, stored(version)])?;
            }
            ids.clone()
        }
    };
    tx.commit()?;
    Ok(ids)
}

/// The models `device` should run: fleet-wide assignments, overridden per
/// model by the device's own.
pub(super) fn for_device(conn: &Connection, device: &str) -> Result<Vec<ModelRecord>, StoreError> {
    query_all(
        conn,
        &format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE (name, version) IN (
                 SELECT a.model, a.version FROM assignments a
                 WHERE a.scope = ?1
                    OR (a.scope = '{ALL_DEVICES}' AND NOT EXISTS (
                        SELECT 1 FROM assignments d WHERE d.scope = ?1 AND d.model = a.model)))
             ORDER BY name"
        ),
        [device],
        rows::model,
    )
}

/// Stores a rollout, keeping its place in the listing order.
pub(super) fn save_rollout(
    conn: &Connection,
    id: &str,
    active: bool,
    state: &str,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO rollouts (id, active, state, seq)
         VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM rollouts))
         ON CONFLICT (id) DO UPDATE SET active = excluded.active, state = excluded.state",
        params![id, i64::from(active), state],
    )?;
    Ok(())
}

/// Every stored rollout, oldest first.
pub(super) fn list_rollouts(conn: &Connection) -> Result<Vec<(String, bool, String)>, StoreError> {
    query_all(
        conn,
        &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY seq"),
        [],
        rows::rollout,
    )
}
