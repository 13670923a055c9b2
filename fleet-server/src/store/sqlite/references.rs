//! Drift reference profiles on SQLite: one JSON document per model
//! version, written whole.

use rusqlite::{params, Connection};

use super::super::rows::stored;
use super::super::{missing_model, StoreError};
use super::{models, query_all, query_opt};

/// Stores `profile` as the reference of a model version that exists.
pub(super) fn set(
    conn: &mut Connection,
    name: &str,
    version: u64,
    profile: &str,
    now: u64,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    if models::get(&tx, name, version)?.is_none() {
        return Err(missing_model(name, version));
    }
    tx.execute(
        "INSERT INTO model_references (name, version, profile, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name, version) DO UPDATE
         SET profile = excluded.profile, updated_at = excluded.updated_at",
        params![name, stored(version), profile, stored(now)],
    )?;
    tx.commit()?;
    Ok(())
}

/// A model version's reference, if it has one.
pub(super) fn get(
    conn: &Connection,
    name: &str,
    version: u64,
) -> Result<Option<String>, StoreError> {
    query_opt(
        conn,
        "SELECT profile FROM model_references WHERE name = ?1 AND version = ?2",
        params![name, stored(version)],
        |r| r.text(0),
    )
}

/// Every reference: name, version, profile.
pub(super) fn list(conn: &Connection) -> Result<Vec<(String, u64, String)>, StoreError> {
    query_all(
        conn,
        "SELECT name, version, profile FROM model_references ORDER BY name, version",
        [],
        |r| Ok((r.text(0)?, r.unsigned(1)?, r.text(2)?)),
    )
}

/// Removes a model version's reference (with the version itself).
pub(super) fn delete(conn: &Connection, name: &str, version: u64) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM model_references WHERE name = ?1 AND version = ?2",
        params![name, stored(version)],
    )?;
    Ok(())
}
