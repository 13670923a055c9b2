//! `POST /api/v1/deployments`: points devices (a list, those with some
//! tags, or the whole fleet) at a model version at once, without a staged
//! rollout, and publishes each affected device's new signed desired
//! state.

use axum::extract::State;
use axum::{Extension, Json};
use edgefleet_shared::DeviceId;
use serde::Serialize;

use super::access::{audit, detail};
use super::devices::tag_filter;
use super::types::{DeployRequest, Deployment, DeploymentScope, ErrorBody, PublishedDesired};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;
use crate::store;

/// What the audit log keeps about a deployment's target.
#[derive(Serialize)]
#[serde(untagged)]
enum TargetDetail<'a> {
    All { all: bool },
    Devices { devices: &'a [String] },
}

/// Which kind of selection a request makes: exactly one is allowed.
fn scope_of(req: &DeployRequest) -> ApiResult<DeploymentScope> {
    selection_scope(req.all, &req.devices, &req.tags)
}

/// Which kind of selection `all`, `devices` and `tags` make: exactly one
/// is allowed.
pub(super) fn selection_scope(
    all: bool,
    devices: &[String],
    tags: &std::collections::BTreeMap<String, String>,
) -> ApiResult<DeploymentScope> {
    match (all, !devices.is_empty(), !tags.is_empty()) {
        (true, false, false) => Ok(DeploymentScope::All),
        (false, true, false) => Ok(DeploymentScope::Devices),
        (false, false, true) => Ok(DeploymentScope::Tags),
        _ => Err(ApiError::BadRequest(
            "give exactly one of \"devices\": [ids], \"all\": true or \"tags\": {key: value}"
                .into(),
        )),
    }
}

/// Points devices (or the whole fleet) at a model version and publishes
/// the new signed desired state to each affected device.
#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments", request_body = DeployRequest, responses((status = 200, description = "the devices whose signed desired state was published", body = Deployment), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn deploy(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Deployment>> {
    let req: DeployRequest = parse_body(&body, "malformed deployment JSON")?;
    let scope = scope_of(&req)?;
    let target = resolve_target(&fleet, scope, &req.devices, &req.tags).await?;
    let targets = fleet
        .store
        .deploy(
            &req.model,
            req.version,
            &target,
            edgefleet_shared::unix_now(),
        )
        .await?;
    audit(
        &fleet,
        &op,
        "deploy",
        format!("{}@{}", req.model, req.version),
        target_detail(&target),
    )
    .await;
    let published = publish_all(&fleet, targets).await?;
    Ok(Json(Deployment {
        model: req.model,
        version: req.version,
        scope,
        published,
    }))
}

/// The devices a selection names: all (a fleet-wide assignment), those
/// with the tags now (404 when none has them), or the listed ids (checked).
pub(super) async fn resolve_target(
    fleet: &Fleet,
    scope: DeploymentScope,
    devices: &[String],
    tags: &std::collections::BTreeMap<String, String>,
) -> ApiResult<store::Target> {
    Ok(match scope {
        DeploymentScope::All => store::Target::All,
        DeploymentScope::Tags => {
            let ids: Vec<String> = fleet
                .store
                .find_all_devices(&tag_filter(tags)?)
                .await?
                .into_iter()
                .map(|d| d.id)
                .collect();
            if ids.is_empty() {
                return Err(ApiError::NotFound(format!(
                    "no device has the tags {tags:?}"
                )));
            }
            store::Target::Devices(ids)
        }
        DeploymentScope::Devices => {
            let devices = devices
                .iter()
                .map(|d| DeviceId::new(d.clone()).map_err(|e| ApiError::BadRequest(e.to_string())))
                .collect::<ApiResult<Vec<_>>>()?;
            store::Target::Devices(devices.iter().map(|d| d.to_string()).collect())
        }
    })
}

/// What the audit log keeps about a deployment's target.
pub(super) fn target_detail(target: &store::Target) -> Option<serde_json::Value> {
    detail(match target {
        store::Target::All => TargetDetail::All { all: true },
        store::Target::Devices(ids) => TargetDetail::Devices { devices: ids },
    })
}

/// Signs and publishes the desired state of each device, in order; the
/// ones that got a document.
pub(super) async fn publish_all(
    fleet: &Fleet,
    devices: Vec<String>,
) -> ApiResult<Vec<PublishedDesired>> {
    let mut published = Vec::new();
    for id in devices {
        let device = DeviceId::new(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if let Some(v) = fleet.publish_desired(&device).await? {
            published.push(PublishedDesired {
                device: device.to_string(),
                desired_version: v,
            });
        }
    }
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_selects_in_exactly_one_way() {
        let base = DeployRequest {
            model: "digits".into(),
            version: 1,
            ..Default::default()
        };
        let all = DeployRequest {
            all: true,
            ..base.clone()
        };
        assert_eq!(scope_of(&all).ok(), Some(DeploymentScope::All));
        let devices = DeployRequest {
            devices: vec!["cam-1".into()],
            ..base.clone()
        };
        assert_eq!(scope_of(&devices).ok(), Some(DeploymentScope::Devices));
        let tags = DeployRequest {
            tags: [("site".to_string(), "north".to_string())].into(),
            ..base.clone()
        };
        assert_eq!(scope_of(&tags).ok(), Some(DeploymentScope::Tags));
        assert!(scope_of(&base).is_err());
        let both = DeployRequest {
            all: true,
            ..devices
        };
        assert!(scope_of(&both).is_err());
    }

    #[test]
    fn the_audit_detail_keeps_its_json_shape() {
        let ids = vec!["a".to_string()];
        assert_eq!(
            serde_json::to_string(&TargetDetail::Devices { devices: &ids }).unwrap(),
            r#"{"devices":["a"]}"#
        );
        assert_eq!(
            serde_json::to_string(&TargetDetail::All { all: true }).unwrap(),
            r#"{"all":true}"#
        );
    }
}
