//! Operator tokens (their hashes, never the secrets) and the audit log on
//! SQLite.

use rusqlite::{params, Connection};

use crate::auth::TokenRecord;

use super::super::rows::{
    self, stored, stored_opt, AUDIT_COLUMNS, TOKEN_COLUMNS, TOKEN_WITH_HASH_COLUMNS,
};
use super::super::{AuditEntry, AuditRecord, StoreError};
use super::{query_all, query_opt};

/// Stores a new token.
pub(super) fn create(conn: &Connection, t: &TokenRecord, hash: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO tokens (id, name, scope, hash, created_at, revoked_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            t.id,
            t.name,
            t.scope.as_str(),
            hash,
            stored(t.created_at),
            stored_opt(t.revoked_at)
        ],
    )?;
    Ok(())
}

/// A token and its hash, by id.
pub(super) fn for_auth(
    conn: &Connection,
    id: &str,
) -> Result<Option<(TokenRecord, String)>, StoreError> {
    query_opt(
        conn,
        &format!("SELECT {TOKEN_WITH_HASH_COLUMNS} FROM tokens WHERE id = ?1"),
        [id],
        rows::token_with_hash,
    )
}

/// Every token, oldest first.
pub(super) fn list(conn: &Connection) -> Result<Vec<TokenRecord>, StoreError> {
    query_all(
        conn,
        &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"),
        [],
        rows::token,
    )
}

/// Revokes a token, keeping the first revocation time.
pub(super) fn revoke(
    conn: &Connection,
    id: &str,
    now: u64,
) -> Result<Option<TokenRecord>, StoreError> {
    conn.execute(
        "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, stored(now)],
    )?;
    query_opt(
        conn,
        &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?1"),
        [id],
        rows::token,
    )
}

/// Appends to the audit log.
pub(super) fn record_audit(conn: &Connection, e: &AuditEntry) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (at, token_id, actor, action, target, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            stored(e.at),
            e.token_id,
            e.actor,
            e.action,
            e.target,
            rows::audit_detail(e)
        ],
    )?;
    Ok(())
}

/// Audit entries after `after_id`, oldest first.
pub(super) fn list_audit(
    conn: &Connection,
    after_id: u64,
    limit: u32,
) -> Result<Vec<AuditRecord>, StoreError> {
    query_all(
        conn,
        &format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2"),
        params![stored(after_id), limit],
        rows::audit,
    )
}
