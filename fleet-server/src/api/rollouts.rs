//! Staged rollouts: create one (or, with `dry_run`, see its waves), list
//! and show their status, and the operator's actions on a rollout (start,
//! pause, resume, approve, abort) and on one of its devices (exclude,
//! retry, force). The planning and driving are [`crate::rollout`]'s; this
//! module checks requests and shapes answers.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use edgefleet_shared::DeviceId;
use serde::{Deserialize, Serialize};

use super::access::{audit, detail};
use super::devices::{check_hardware, tag_filter};
use super::types::{CreateRollout, ErrorBody, RolloutStatus, RolloutSummary};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;

/// Checks that a request selects devices in exactly one way.
fn check_selection(req: &CreateRollout) -> ApiResult<()> {
    let chosen = [
        req.all,
        !req.devices.is_empty(),
        !req.tags.is_empty() || req.hardware.is_some(),
    ];
    if chosen.iter().filter(|c| **c).count() != 1 {
        return Err(ApiError::BadRequest(
            "give exactly one of \"devices\", \"all\": true or \"tags\" and/or \"hardware\"".into(),
        ));
    }
    Ok(())
}

/// `POST /api/v1/rollouts`: creates a staged rollout (or, with
/// `dry_run`, shows which devices fall in which wave).
#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", request_body = CreateRollout, responses((status = 201, description = "the rollout's status", body = RolloutStatus), (status = 200, description = "dry run: the plan", body = RolloutStatus), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "conflicts with an active rollout", body = ErrorBody)))]
pub(super) async fn create_rollout(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<RolloutStatus>)> {
    let req: CreateRollout = parse_body(&body, "malformed rollout")?;
    check_selection(&req)?;
    let devices = if req.devices.is_empty() {
        // Every unrevoked device, or those with all the tags (and the
        // hardware class).
        let mut filter = tag_filter(&req.tags)?;
        if let Some(hardware) = &req.hardware {
            check_hardware(hardware)?;
            filter.hardware = Some(hardware.clone());
        }
        fleet
            .store
            .find_all_devices(&filter)
            .await?
            .into_iter()
            .filter(|d| d.revoked_at.is_none())
            .map(|d| d.id)
            .collect()
    } else {
        for d in &req.devices {
            DeviceId::new(d.clone()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        }
        req.devices.clone()
    };
    let dry_run = req.dry_run;
    let id = req.id.clone();
    let status = RolloutStatus::of(&fleet.rollouts.create(req, devices).await?, false);
    if dry_run {
        return Ok((StatusCode::OK, Json(status)));
    }
    audit(&fleet, &op, "rollout.create", id, None).await;
    Ok((StatusCode::CREATED, Json(status)))
}

/// `GET /api/v1/rollouts`: every rollout, in brief.
#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts", responses((status = 200, body = [RolloutSummary]), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
pub(super) async fn list_rollouts(State(fleet): State<Fleet>) -> Json<Vec<RolloutSummary>> {
    let records = fleet.rollouts.records().await;
    Json(records.iter().map(RolloutSummary::of).collect())
}

/// The query of a rollout's status.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct RolloutQuery {
    /// Leave out each device's state and the devices of each wave.
    #[serde(default)]
    brief: bool,
}

/// `GET /api/v1/rollouts/{id}`: one rollout's status.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts", params(("id" = String, Path), RolloutQuery), responses((status = 200, description = "phase (and why it paused), waves, counts per state, gates, devices", body = RolloutStatus), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn get_rollout(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<RolloutQuery>,
) -> ApiResult<Json<RolloutStatus>> {
    let record = fleet
        .rollouts
        .record(&id)
        .await
        .ok_or_else(|| ApiError::UnknownRollout(id.clone()))?;
    Ok(Json(RolloutStatus::of(&record, q.brief)))
}

/// `POST /api/v1/rollouts/{id}/{action}`: start, pause, resume, approve,
/// abort (which sends every device that moved back to its version).
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts", params(("id" = String, Path), ("action" = String, Path, description = "start, pause, resume, approve or abort")), responses((status = 200, description = "the rollout's status after the action", body = RolloutStatus), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "not possible in this phase", body = ErrorBody)))]
pub(super) async fn rollout_action(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<RolloutStatus>> {
    let status = RolloutStatus::of(&fleet.rollouts.act(&id, &action).await?, false);
    audit(&fleet, &op, &format!("rollout.{action}"), id, None).await;
    Ok(Json(status))
}

/// What the audit log keeps about an action on one device.
#[derive(Serialize)]
struct DeviceActionDetail<'a> {
    device: &'a str,
}

/// An operator's device action named in a path.
fn device_action(action: &str) -> ApiResult<crate::rollout::Override> {
    serde_json::from_value(serde_json::Value::String(action.to_string())).map_err(|_| {
        ApiError::BadRequest(format!(
            "unknown device action {action:?} (exclude, retry, force)"
        ))
    })
}

/// `POST /api/v1/rollouts/{id}/devices/{device}/{action}`: an operator's
/// decision about one device: `exclude` (taken out, and sent back if it
/// had moved), `retry` (a failed, reverted, excluded or offline device
/// back in line) or `force` (asked now, ahead of its wave).
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/devices/{device}/{action}", tag = "rollouts", params(("id" = String, Path), ("device" = String, Path), ("action" = String, Path, description = "exclude, retry or force")), responses((status = 200, description = "the rollout's status after the action", body = RolloutStatus), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "not possible in this state", body = ErrorBody)))]
pub(super) async fn rollout_device_action(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((id, device, action)): Path<(String, String, String)>,
) -> ApiResult<Json<RolloutStatus>> {
    let what = device_action(&action)?;
    let status = RolloutStatus::of(
        &fleet.rollouts.override_device(&id, &device, what).await?,
        false,
    );
    audit(
        &fleet,
        &op,
        &format!("rollout.device.{action}"),
        id,
        detail(DeviceActionDetail { device: &device }),
    )
    .await;
    Ok(Json(status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Override;

    fn request() -> CreateRollout {
        CreateRollout {
            id: "r1".into(),
            model: "digits".into(),
            version: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_rollout_selects_in_exactly_one_way() {
        let all = CreateRollout {
            all: true,
            ..request()
        };
        assert!(check_selection(&all).is_ok());
        let tagged_hardware = CreateRollout {
            tags: [("site".to_string(), "north".to_string())].into(),
            hardware: Some("rpi4".into()),
            ..request()
        };
        assert!(check_selection(&tagged_hardware).is_ok());
        let listed = CreateRollout {
            devices: vec!["cam-1".into()],
            ..request()
        };
        assert!(check_selection(&listed).is_ok());
        assert!(matches!(
            check_selection(&request()),
            Err(ApiError::BadRequest(_))
        ));
        let both = CreateRollout {
            all: true,
            ..listed
        };
        assert!(matches!(
            check_selection(&both),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn device_actions_are_named_in_lowercase() {
        assert_eq!(device_action("exclude").ok(), Some(Override::Exclude));
        assert_eq!(device_action("retry").ok(), Some(Override::Retry));
        assert_eq!(device_action("force").ok(), Some(Override::Force));
        let err = device_action("Force").unwrap_err();
        assert!(err.to_string().contains("\"Force\""), "{err}");
    }
}
