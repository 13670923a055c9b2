//! Agent releases, the agent as a payload: push one build of a release
//! (an executable for one target triple, streamed into the artifact store
//! like a model file, with its compressed copy), list releases and show
//! one, delete one nothing points at, and deploy one to devices (a list,
//! those with some tags, or the whole fleet) at once. Staged agent
//! rollouts go through the rollout endpoints.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use edgefleet_shared::agent_release::validate_target;
use edgefleet_shared::ReleaseVersion;
use serde::{Deserialize, Serialize};

use super::access::{audit, detail};
use super::deployments::{publish_all, resolve_target, selection_scope, target_detail};
use super::types::{
    AgentBuildRecord, AgentDeployRequest, AgentDeployment, AgentRelease, ErrorBody,
};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;

/// A release version from a request: a semantic version, else 400.
pub(super) fn check_release(version: &str) -> ApiResult<ReleaseVersion> {
    version
        .parse()
        .map_err(|e: edgefleet_shared::agent_release::InvalidRelease| {
            ApiError::BadRequest(e.to_string())
        })
}

/// Builds grouped by release, releases in semantic-version order (oldest
/// first), each release's builds by target.
pub(crate) fn releases(builds: Vec<AgentBuildRecord>) -> Vec<AgentRelease> {
    let mut grouped: BTreeMap<String, Vec<AgentBuildRecord>> = BTreeMap::new();
    for b in builds {
        grouped.entry(b.version.clone()).or_default().push(b);
    }
    let mut out: Vec<(Option<ReleaseVersion>, AgentRelease)> = grouped
        .into_iter()
        .map(|(version, builds)| (version.parse().ok(), AgentRelease { version, builds }))
        .collect();
    out.sort_by(|(a, _), (b, _)| a.cmp(b));
    out.into_iter().map(|(_, r)| r).collect()
}

/// The query of a push.
#[derive(Deserialize, utoipa::IntoParams)]
pub(super) struct PushQuery {
    /// Free text kept with the build (at most 1,000 characters).
    notes: Option<String>,
}

/// What the audit log keeps about a push.
#[derive(Serialize)]
struct PushDetail<'a> {
    sha256: &'a str,
    size: u64,
}

/// `PUT /api/v1/agent/releases/{version}/{target}`: streams the request
/// body (the executable) into the artifact store and registers it as the
/// release's build for the target. The identical file again changes
/// nothing; another file for a stored (version, target) is refused.
#[utoipa::path(put, path = "/api/v1/agent/releases/{version}/{target}", tag = "agent", params(("version" = String, Path, description = "the release's semantic version, MAJOR.MINOR.PATCH[-PRE]"), ("target" = String, Path, description = "the target triple the executable was built for"), PushQuery), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the executable, streamed"), responses((status = 201, description = "the build as stored", body = AgentBuildRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 409, description = "another file is stored for this version and target", body = ErrorBody), (status = 413, description = "larger than max_upload_bytes", body = ErrorBody)))]
pub(super) async fn push_build(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((version, target)): Path<(String, String)>,
    Query(query): Query<PushQuery>,
    body: Body,
) -> ApiResult<(StatusCode, Json<AgentBuildRecord>)> {
    check_release(&version)?;
    validate_target(&target).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    super::artifacts::check_notes(query.notes.as_deref())?;
    let (sha256, size) = super::artifacts::store_upload(&fleet, body).await?;
    let record = AgentBuildRecord {
        version,
        target,
        sha256,
        size,
        created_at: edgefleet_shared::unix_now(),
        pushed_by: Some(op.name.clone()),
        notes: query.notes,
    };
    let stored = fleet.store.add_agent_build(&record).await?;
    audit(
        &fleet,
        &op,
        "agent.push",
        format!("{}/{}", stored.version, stored.target),
        detail(PushDetail {
            sha256: &stored.sha256,
            size: stored.size,
        }),
    )
    .await;
    tracing::info!(release = %stored.version, target = %stored.target, size = stored.size, by = %op.name, "agent build pushed");
    Ok((StatusCode::CREATED, Json(stored)))
}

/// `GET /api/v1/agent/releases`: every release with its builds, oldest
/// first.
#[utoipa::path(get, path = "/api/v1/agent/releases", tag = "agent", responses((status = 200, body = [AgentRelease]), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
pub(super) async fn list_releases(
    State(fleet): State<Fleet>,
) -> ApiResult<Json<Vec<AgentRelease>>> {
    Ok(Json(releases(fleet.store.agent_builds(None).await?)))
}

/// `GET /api/v1/agent/releases/{version}`: one release.
#[utoipa::path(get, path = "/api/v1/agent/releases/{version}", tag = "agent", params(("version" = String, Path, description = "the release's semantic version")), responses((status = 200, body = AgentRelease), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn get_release(
    State(fleet): State<Fleet>,
    Path(version): Path<String>,
) -> ApiResult<Json<AgentRelease>> {
    check_release(&version)?;
    let builds = fleet.store.agent_builds(Some(&version)).await?;
    if builds.is_empty() {
        return Err(ApiError::NotFound(format!(
            "agent release {version} does not exist"
        )));
    }
    Ok(Json(AgentRelease { version, builds }))
}

/// `DELETE /api/v1/agent/releases/{version}`: removes every build of a
/// release no assignment points at (409 otherwise), and their files
/// unless another build or a model has the same content.
#[utoipa::path(delete, path = "/api/v1/agent/releases/{version}", tag = "agent", params(("version" = String, Path, description = "the release's semantic version")), responses((status = 200, description = "the release as it was", body = AgentRelease), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "deployed", body = ErrorBody)))]
pub(super) async fn delete_release(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(version): Path<String>,
) -> ApiResult<Json<AgentRelease>> {
    check_release(&version)?;
    let removed = fleet.store.delete_agent_release(&version).await?;
    let mut builds = Vec::with_capacity(removed.len());
    for (build, file_still_used) in removed {
        if !file_still_used {
            fleet.artifacts.remove(&build.sha256).await;
        }
        builds.push(build);
    }
    audit(&fleet, &op, "agent.delete", version.clone(), None).await;
    Ok(Json(AgentRelease { version, builds }))
}

/// What the audit log keeps about an agent deployment.
#[derive(Serialize)]
struct DeployDetail {
    allow_downgrade: bool,
    target: Option<serde_json::Value>,
}

/// `POST /api/v1/agent/deployments`: points devices (or the whole
/// fleet) at an agent release and publishes the new signed desired state
/// to each affected device.
#[utoipa::path(post, path = "/api/v1/agent/deployments", tag = "agent", request_body = AgentDeployRequest, responses((status = 200, description = "the devices whose signed desired state was published", body = AgentDeployment), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn deploy_release(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<Json<AgentDeployment>> {
    let req: AgentDeployRequest = parse_body(&body, "malformed agent deployment JSON")?;
    check_release(&req.version)?;
    let scope = selection_scope(req.all, &req.devices, &req.tags)?;
    let target = resolve_target(&fleet, scope, &req.devices, &req.tags).await?;
    let targets = fleet
        .store
        .deploy_agent(
            &req.version,
            req.allow_downgrade,
            &target,
            edgefleet_shared::unix_now(),
        )
        .await?;
    audit(
        &fleet,
        &op,
        "agent.deploy",
        req.version.clone(),
        detail(DeployDetail {
            allow_downgrade: req.allow_downgrade,
            target: target_detail(&target),
        }),
    )
    .await;
    tracing::info!(release = %req.version, devices = targets.len(), by = %op.name, "agent release deployed");
    let published = publish_all(&fleet, targets).await?;
    Ok(Json(AgentDeployment {
        version: req.version,
        allow_downgrade: req.allow_downgrade,
        scope,
        published,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(version: &str, target: &str) -> AgentBuildRecord {
        AgentBuildRecord {
            version: version.into(),
            target: target.into(),
            sha256: "ab".repeat(32),
            size: 1,
            created_at: 1,
            pushed_by: None,
            notes: None,
        }
    }

    #[test]
    fn releases_are_grouped_and_in_semantic_version_order() {
        let listed = releases(vec![
            build("1.10.0", "aarch64-unknown-linux-musl"),
            build("1.2.0", "aarch64-unknown-linux-musl"),
            build("1.2.0", "x86_64-unknown-linux-musl"),
            build("1.2.0-rc.1", "aarch64-unknown-linux-musl"),
        ]);
        let versions: Vec<&str> = listed.iter().map(|r| r.version.as_str()).collect();
        assert_eq!(versions, ["1.2.0-rc.1", "1.2.0", "1.10.0"]);
        assert_eq!(listed[1].builds.len(), 2);
    }

    #[test]
    fn release_versions_must_be_semantic() {
        assert!(check_release("1.2.3").is_ok());
        for bad in ["1", "v1.2.3", "1.2.3+meta", ""] {
            let err = check_release(bad).unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert!(err.to_string().contains("semantic version"), "{err}");
        }
    }
}
