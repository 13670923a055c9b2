//! Quality settings of assignments on SQLite (see [`super::super::quality`]).

use rusqlite::{params, Connection, OptionalExtension};

use super::super::quality::{AssignedQuality, DeviceQuality, QualityChange, ResolvedQuality};
use super::super::rows::stored;
use super::super::{missing_model, StoreError, Target, ALL_DEVICES};
use super::models;

/// The row columns for `quality`.
fn columns(q: &AssignedQuality) -> (Option<String>, Option<i64>, Option<i64>) {
    (
        q.to_column(),
        q.shadow.as_ref().map(|s| stored(s.version)),
        q.split.as_ref().map(|s| stored(s.version)),
    )
}

fn write(
    conn: &Connection,
    scope: &str,
    model: &str,
    q: &AssignedQuality,
) -> Result<(), StoreError> {
    let (json, shadow, split) = columns(q);
    conn.execute(
        "UPDATE assignments SET quality = ?3, shadow_version = ?4, split_version = ?5
         WHERE scope = ?1 AND model = ?2",
        params![scope, model, json, shadow, split],
    )?;
    Ok(())
}

/// The assignment row `device` runs `model` by: its own, else the fleet's.
fn effective(
    conn: &Connection,
    device: &str,
    model: &str,
) -> Result<Option<(String, u64, Option<String>)>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT scope, version, quality FROM assignments
             WHERE model = ?2 AND (scope = ?1 OR scope = ?3)
             ORDER BY scope = ?3 LIMIT 1",
            params![device, model, ALL_DEVICES],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, Option<String>>(2)?,
                ))
            },
        )
        .optional()?)
}

/// Changes the quality settings of `model`'s assignments for `target`; a
/// device on the fleet-wide assignment gets a row of its own (same
/// version). Returns the devices whose desired state changes.
pub(super) fn set(
    conn: &mut Connection,
    model: &str,
    change: &QualityChange,
    target: &Target,
) -> Result<Vec<String>, StoreError> {
    let tx = conn.transaction()?;
    if let Some(version) = change.version() {
        if models::get(&tx, model, version)?.is_none() {
            return Err(missing_model(model, version));
        }
    }
    let ids = match target {
        Target::All => {
            let rows: Vec<(String, Option<String>)> = {
                let mut stmt =
                    tx.prepare("SELECT scope, quality FROM assignments WHERE model = ?1")?;
                let rows = stmt.query_map([model], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            if rows.is_empty() {
                return Err(StoreError::NotFound(format!(
                    "model {model} is not deployed anywhere"
                )));
            }
            for (scope, text) in rows {
                let mut q = AssignedQuality::from_column(text.as_deref())?;
                q.apply(change);
                write(&tx, &scope, model, &q)?;
            }
            super::devices::list(&tx)?
                .into_iter()
                .map(|d| d.id)
                .collect()
        }
        Target::Devices(ids) => {
            for id in ids {
                let Some((scope, version, text)) = effective(&tx, id, model)? else {
                    return Err(StoreError::NotFound(format!(
                        "device {id} does not run model {model}"
                    )));
                };
                let mut q = AssignedQuality::from_column(text.as_deref())?;
                q.apply(change);
                if scope == ALL_DEVICES {
                    let (json, shadow, split) = columns(&q);
                    tx.execute(
                        "INSERT INTO assignments (scope, model, version, quality, shadow_version, split_version)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![id, model, stored(version), json, shadow, split],
                    )?;
                } else {
                    write(&tx, id, model, &q)?;
                }
            }
            ids.clone()
        }
    };
    tx.commit()?;
    Ok(ids)
}

/// The quality settings of every model `device` runs, with the records of
/// the versions they name.
pub(super) fn for_device(conn: &Connection, device: &str) -> Result<DeviceQuality, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT a.model, a.quality FROM assignments a
         WHERE a.quality IS NOT NULL
           AND (a.scope = ?1 OR (a.scope = ?2 AND NOT EXISTS (
                SELECT 1 FROM assignments d WHERE d.scope = ?1 AND d.model = a.model)))",
    )?;
    let rows: Vec<(String, String)> = stmt
        .query_map(params![device, ALL_DEVICES], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = DeviceQuality::new();
    for (model, text) in rows {
        let q = AssignedQuality::from_column(Some(&text))?;
        let mut resolved = ResolvedQuality::default();
        if let Some(s) = q.shadow {
            if let Some(record) = models::get(conn, &model, s.version)? {
                resolved.shadow = Some((s, record));
            }
        }
        if let Some(s) = q.split {
            if let Some(record) = models::get(conn, &model, s.version)? {
                resolved.split = Some((s, record));
            }
        }
        out.insert(model, resolved);
    }
    Ok(out)
}
