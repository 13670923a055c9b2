//! Who may call the API, and the record of what they did: the middleware
//! that checks every call's operator token (or the dashboard's session
//! cookie and CSRF token) against the scope its route needs, and the
//! audit log entry each state-changing handler appends. The token records
//! themselves and the scope table are [`crate::auth`]'s.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::auth;
use crate::fleet::Fleet;
use crate::logins as session;
use crate::store;

/// Checks the operator token of every call that needs one (see
/// [`auth::required_scope`]) and hands the operator to the handler.
pub(super) async fn authenticate(
    State(fleet): State<Fleet>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(needed) = auth::required_scope(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let who = operator(
        &fleet,
        req.method(),
        req.uri().path(),
        req.headers(),
        needed,
    )
    .await;
    match who {
        Ok(op) => {
            req.extensions_mut().insert(op);
            next.run(req).await
        }
        Err(e) => {
            let challenge = matches!(e, ApiError::Unauthorized(_));
            let mut resp = e.into_response();
            if challenge {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            resp
        }
    }
}

/// The operator making a call (`method` on `path` with `headers`), if
/// their credential is good and its scope covers `needed`.
async fn operator(
    fleet: &Fleet,
    method: &http::Method,
    path: &str,
    headers: &http::HeaderMap,
    needed: auth::Scope,
) -> Result<auth::Operator, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let record = match (presented, session::from_cookies(headers)) {
        (Some(presented), _) => {
            let (id, secret) = auth::parse(presented).ok_or_else(|| {
                ApiError::Unauthorized(
                    "malformed operator token (expected eft_<id>_<secret>)".into(),
                )
            })?;
            let refused = || ApiError::Unauthorized("unknown or revoked operator token".into());
            let (record, hash) = fleet.store.token_for_auth(id).await?.ok_or_else(refused)?;
            if record.revoked_at.is_some() || !auth::matches(secret, &hash) {
                return Err(refused());
            }
            record
        }
        // The dashboard's calls: its session cookie, and on a
        // state-changing call the session's CSRF token.
        (None, Some(session_id)) => {
            let (record, session) = fleet
                .logins
                .token(&fleet.store, &session_id)
                .await?
                .ok_or_else(|| {
                    ApiError::Unauthorized(
                        "dashboard session expired, unknown or its token revoked: log in again"
                            .into(),
                    )
                })?;
            let safe = matches!(
                *method,
                http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
            );
            let csrf = headers
                .get(session::CSRF_HEADER)
                .and_then(|v| v.to_str().ok());
            if !safe && !session::csrf_matches(&session, csrf) {
                return Err(ApiError::Forbidden(
                    "missing or wrong CSRF token: a state-changing call made with the dashboard's session cookie must send the page's token in X-CSRF-Token".into(),
                ));
            }
            record
        }
        (None, None) => {
            return Err(ApiError::Unauthorized(
                "missing operator token: send `Authorization: Bearer <token>` (fleetctl: --token or EDGEFLEET_TOKEN; on first start the server writes an admin token to {data_dir}/admin.token)".into(),
            ));
        }
    };
    if record.scope < needed {
        return Err(ApiError::Forbidden(format!(
            "token {:?} ({}) has scope {}; {} {} needs {}",
            record.name,
            record.id,
            record.scope.as_str(),
            method,
            path,
            needed.as_str()
        )));
    }
    Ok(auth::Operator {
        token_id: record.id,
        name: record.name,
        scope: record.scope,
    })
}

/// Appends an operator action to the audit log. The action has happened:
/// a failure to record it is logged loudly rather than reported as the
/// action failing.
pub(super) async fn audit(
    fleet: &Fleet,
    op: &auth::Operator,
    action: &str,
    target: String,
    detail: Option<serde_json::Value>,
) {
    let entry = store::AuditEntry {
        at: edgefleet_shared::unix_now(),
        token_id: Some(op.token_id.clone()),
        actor: op.name.clone(),
        action: action.to_string(),
        target,
        detail,
    };
    if let Err(e) = fleet.store.record_audit(&entry).await {
        tracing::error!(error = %e, ?entry, "cannot record an operator action in the audit log");
    }
}

/// An audit entry's detail: any serialisable value as JSON.
pub(super) fn detail(value: impl serde::Serialize) -> Option<serde_json::Value> {
    match serde_json::to_value(value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "audit detail does not serialise; recorded without it");
            None
        }
    }
}
