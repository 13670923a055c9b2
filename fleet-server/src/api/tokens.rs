//! Operator tokens and the audit log: create (the token text is in that
//! answer only), list and revoke tokens, and read the operator actions
//! recorded, oldest first.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::access::{audit, detail};
use super::types::{AuditRecord, CreatedToken, ErrorBody, NewTokenRequest, Token};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;

/// A token's name: 1 to 64 printable characters, trimmed.
fn check_token_name(name: &str) -> ApiResult<&str> {
    let name = name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::BadRequest(format!(
            "token name {name:?} must be 1 to 64 printable characters"
        )));
    }
    Ok(name)
}

/// What the audit log keeps about a new token.
#[derive(Serialize)]
struct TokenDetail<'a> {
    name: &'a str,
    scope: auth::Scope,
}

/// `POST /api/v1/tokens`: a new token; its text is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = NewTokenRequest, responses((status = 201, description = "the token record and, only here, the token", body = CreatedToken), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
pub(super) async fn create_token(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    let req: NewTokenRequest = parse_body(
        &body,
        "malformed token request (expected {\"name\": \"ci\", \"scope\": \"read\"|\"write\"|\"admin\"})",
    )?;
    let name = check_token_name(&req.name)?;
    let made = auth::generate(name, req.scope, edgefleet_shared::unix_now());
    fleet.store.create_token(&made.record, &made.hash).await?;
    audit(
        &fleet,
        &op,
        "token.create",
        made.record.id.clone(),
        detail(TokenDetail {
            name: &made.record.name,
            scope: made.record.scope,
        }),
    )
    .await;
    tracing::info!(id = %made.record.id, name = %made.record.name, scope = made.record.scope.as_str(), by = %op.name, "operator token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            record: made.record,
            token: made.token,
        }),
    ))
}

/// `GET /api/v1/tokens`: every token, revoked ones too, never a secret.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", responses((status = 200, body = [Token]), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
pub(super) async fn list_tokens(State(fleet): State<Fleet>) -> ApiResult<Json<Vec<Token>>> {
    Ok(Json(fleet.store.list_tokens().await?))
}

/// `DELETE /api/v1/tokens/{id}`: the token is refused from now on.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "token id")), responses((status = 200, body = Token), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn revoke_token(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
) -> ApiResult<Json<Token>> {
    let record = fleet
        .store
        .revoke_token(&id, edgefleet_shared::unix_now())
        .await?
        .ok_or_else(|| ApiError::UnknownToken(id.clone()))?;
    audit(&fleet, &op, "token.revoke", id, None).await;
    Ok(Json(record))
}

/// The query of the audit log.
#[derive(Deserialize)]
pub(super) struct AuditQuery {
    after_id: Option<u64>,
    limit: Option<u32>,
}

/// `GET /api/v1/audit`: operator actions, oldest first (`after_id` pages).
#[utoipa::path(get, path = "/api/v1/audit", tag = "tokens", params(("after_id" = Option<u64>, Query), ("limit" = Option<u32>, Query)), responses((status = 200, body = [AuditRecord]), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
pub(super) async fn list_audit(
    State(fleet): State<Fleet>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditRecord>>> {
    let rows = fleet
        .store
        .list_audit(
            q.after_id.unwrap_or(0),
            q.limit.unwrap_or(100).clamp(1, 1000),
        )
        .await?;
    Ok(Json(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_names_are_short_and_printable() {
        assert_eq!(check_token_name("  ci  ").ok(), Some("ci"));
        for bad in ["", "   ", "a\nb", &"x".repeat(65)] {
            assert!(
                matches!(check_token_name(bad), Err(ApiError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_created_token_is_its_record_plus_the_token() {
        let made = auth::generate("ci", auth::Scope::Write, 100);
        let reply = CreatedToken {
            record: made.record.clone(),
            token: made.token.clone(),
        };
        let mut expected = serde_json::to_value(&made.record).unwrap();
        expected["token"] = made.token.into();
        assert_eq!(serde_json::to_value(&reply).unwrap(), expected);
        let back: CreatedToken =
            serde_json::from_value(serde_json::to_value(&reply).unwrap()).unwrap();
        assert_eq!(back, reply);
    }
}
