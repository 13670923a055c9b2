//! Operator tokens (their hashes, never the secrets) and the audit log on
//! PostgreSQL.

use deadpool_postgres::GenericClient;

use crate::auth::TokenRecord;

use super::super::rows::{
    self, stored, stored_opt, AUDIT_COLUMNS, TOKEN_COLUMNS, TOKEN_WITH_HASH_COLUMNS,
};
use super::super::{AuditEntry, AuditRecord, StoreError};
use super::{query_all, query_opt};

/// Stores a new token.
pub(super) async fn create(
    c: &impl GenericClient,
    t: &TokenRecord,
    hash: &str,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO tokens (id, name, scope, hash, created_at, revoked_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &t.id,
            &t.name,
            &t.scope.as_str(),
            &hash,
            &stored(t.created_at),
            &stored_opt(t.revoked_at),
        ],
    )
    .await?;
    Ok(())
}

/// A token and its hash, by id.
pub(super) async fn for_auth(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<(TokenRecord, String)>, StoreError> {
    query_opt(
        c,
        &format!("SELECT {TOKEN_WITH_HASH_COLUMNS} FROM tokens WHERE id = $1"),
        &[&id],
        rows::token_with_hash,
    )
    .await
}

/// Every token, oldest first.
pub(super) async fn list(c: &impl GenericClient) -> Result<Vec<TokenRecord>, StoreError> {
    query_all(
        c,
        &format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at, id"),
        &[],
        rows::token,
    )
    .await
}

/// Revokes a token, keeping the first revocation time.
pub(super) async fn revoke(
    c: &impl GenericClient,
    id: &str,
    now: u64,
) -> Result<Option<TokenRecord>, StoreError> {
    c.execute(
        "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        &[&id, &stored(now)],
    )
    .await?;
    query_opt(
        c,
        &format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = $1"),
        &[&id],
        rows::token,
    )
    .await
}

/// Appends to the audit log.
pub(super) async fn record_audit(c: &impl GenericClient, e: &AuditEntry) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO audit (at, token_id, actor, action, target, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &stored(e.at),
            &e.token_id,
            &e.actor,
            &e.action,
            &e.target,
            &rows::audit_detail(e),
        ],
    )
    .await?;
    Ok(())
}

/// Audit entries after `after_id`, oldest first.
pub(super) async fn list_audit(
    c: &impl GenericClient,
    after_id: u64,
    limit: u32,
) -> Result<Vec<AuditRecord>, StoreError> {
    query_all(
        c,
        &format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE id > $1 ORDER BY id LIMIT $2"),
        &[&stored(after_id), &i64::from(limit)],
        rows::audit,
    )
    .await
}
