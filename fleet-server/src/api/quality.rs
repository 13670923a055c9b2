//! A model's quality in the field through the API: its versions' figures
//! side by side (`GET /api/v1/models/{name}/quality`), an A/B split
//! (`PUT`/`DELETE .../split`, `POST .../split/promote`) and a candidate in
//! shadow outside a rollout (`PUT`/`DELETE .../shadow`). Each change is
//! stored on the model's assignments and published to the devices it
//! affects in their signed desired state.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use edgefleet_shared::quality::OutputComparison;
use serde::{Deserialize, Serialize};

use super::access::{audit, detail};
use super::deployments::{publish_all, resolve_target, selection_scope};
use super::types::{ErrorBody, PublishedDesired};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;
use crate::quality::ModelQuality;
use crate::store::quality::{QualityChange, ShadowSettings, SplitSettings};

/// Which devices a change applies to: exactly one of `devices`, `all`
/// or `tags`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QualityTarget {
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub all: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// `PUT /api/v1/models/{name}/split`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitRequest {
    /// The variant ("b") version; the devices' assigned version is "a".
    pub version: u64,
    /// Share of client keys served by the variant, 0 to 1.
    pub share: f64,
    /// Names the experiment (default `{name}-v{version}`); keys are
    /// hashed with it, so one key is served by the same variant on every
    /// device, and a new name reshuffles them.
    #[serde(default)]
    pub experiment: Option<String>,
    /// These devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every device that runs the model.
    #[serde(default)]
    pub all: bool,
    /// The devices that have all these tags now.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// `PUT /api/v1/models/{name}/shadow`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowRequest {
    /// The candidate version.
    pub version: u64,
    /// Share of requests also run on the candidate, above 0 and at most 1.
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// Per output: `{"output": "emb", "kind": "cosine", "min": 0.99}`
    /// (`top1`, `max_abs`/`max_rel` with `limit`, `cosine` with `min`);
    /// outputs not listed compare top-1.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub compare: Vec<OutputComparison>,
    /// These devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every device that runs the model.
    #[serde(default)]
    pub all: bool,
    /// The devices that have all these tags now.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

fn default_sample_rate() -> f64 {
    0.1
}

/// `POST /api/v1/models/{name}/split/promote`: keep one side of an A/B
/// test on the selected devices.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// `a`: end the test, keep the assigned version. `b`: deploy the
    /// variant (`version`) and end the test.
    pub variant: String,
    /// With `b`: the variant's version.
    #[serde(default)]
    pub version: Option<u64>,
    /// These devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every device that runs the model.
    #[serde(default)]
    pub all: bool,
    /// The devices that have all these tags now.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// The selection of a request that carries one.
trait Selects {
    fn target(&self) -> QualityTarget;
}

macro_rules! selects {
    ($($t:ty),*) => {$(
        impl Selects for $t {
            fn target(&self) -> QualityTarget {
                QualityTarget {
                    devices: self.devices.clone(),
                    all: self.all,
                    tags: self.tags.clone(),
                }
            }
        }
    )*};
}

selects!(SplitRequest, ShadowRequest, PromoteRequest);

/// The answer to a change.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QualityChanged {
    pub model: String,
    pub published: Vec<PublishedDesired>,
}

async fn change(
    fleet: &Fleet,
    op: &auth::Operator,
    name: &str,
    change: QualityChange,
    target: &QualityTarget,
    action: &str,
    what: String,
) -> ApiResult<Json<QualityChanged>> {
    let scope = selection_scope(target.all, &target.devices, &target.tags)?;
    let resolved = resolve_target(fleet, scope, &target.devices, &target.tags).await?;
    let devices = fleet.store.set_quality(name, &change, &resolved).await?;
    audit(fleet, op, action, what, detail(target)).await;
    let published = publish_all(fleet, devices).await?;
    Ok(Json(QualityChanged {
        model: name.to_string(),
        published,
    }))
}

/// A share from 0 to 1, or a message naming `what`.
fn share(what: &str, value: f64, zero_ok: bool) -> ApiResult<()> {
    let ok = if zero_ok {
        (0.0..=1.0).contains(&value)
    } else {
        value > 0.0 && value <= 1.0
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what} is a share {} 0 to 1, not {value}",
            if zero_ok { "from" } else { "above" }
        )))
    }
}

/// Starts or changes an A/B split on the selected devices.
#[utoipa::path(put, path = "/api/v1/models/{name}/split", tag = "models", params(("name" = String, Path, description = "model name")), request_body = SplitRequest, responses((status = 200, body = QualityChanged), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "the version, a device or the model's deployment does not exist", body = ErrorBody)))]
pub(super) async fn put_split(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<QualityChanged>> {
    let req: SplitRequest = parse_body(&body, "malformed split JSON")?;
    share("share", req.share, true)?;
    let experiment = req
        .experiment
        .clone()
        .unwrap_or_else(|| format!("{name}-v{}", req.version));
    if experiment.is_empty() || experiment.len() > 128 {
        return Err(ApiError::BadRequest(
            "experiment name must be 1 to 128 bytes".into(),
        ));
    }
    let settings = SplitSettings {
        version: req.version,
        share: req.share,
        experiment,
    };
    let what = format!("{name}@{} share {}", req.version, req.share);
    change(
        &fleet,
        &op,
        &name,
        QualityChange::Split(Some(settings)),
        &req.target(),
        "split",
        what,
    )
    .await
}

/// Ends an A/B split on the selected devices (they keep their assigned
/// version).
#[utoipa::path(delete, path = "/api/v1/models/{name}/split", tag = "models", params(("name" = String, Path, description = "model name")), request_body = QualityTarget, responses((status = 200, body = QualityChanged), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn delete_split(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<QualityChanged>> {
    let target: QualityTarget = parse_body(&body, "malformed selection JSON")?;
    let what = name.clone();
    change(
        &fleet,
        &op,
        &name,
        QualityChange::Split(None),
        &target,
        "split-end",
        what,
    )
    .await
}

/// Keeps one side of an A/B test: `a` ends it, `b` deploys the variant.
#[utoipa::path(post, path = "/api/v1/models/{name}/split/promote", tag = "models", params(("name" = String, Path, description = "model name")), request_body = PromoteRequest, responses((status = 200, body = QualityChanged), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn promote(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<QualityChanged>> {
    let req: PromoteRequest = parse_body(&body, "malformed promote JSON")?;
    match (req.variant.as_str(), req.version) {
        ("a", None) => {
            let what = format!("{name} variant a");
            change(
                &fleet,
                &op,
                &name,
                QualityChange::Split(None),
                &req.target(),
                "promote",
                what,
            )
            .await
        }
        ("b", Some(version)) => {
            let target_of = req.target();
            let t = &target_of;
            let scope = selection_scope(t.all, &t.devices, &t.tags)?;
            let target = resolve_target(&fleet, scope, &t.devices, &t.tags).await?;
            // Deploying a version clears the assignment's split.
            let devices = fleet
                .store
                .deploy(&name, version, &target, edgefleet_shared::unix_now())
                .await?;
            audit(
                &fleet,
                &op,
                "promote",
                format!("{name}@{version} variant b"),
                detail(t),
            )
            .await;
            let published = publish_all(&fleet, devices).await?;
            Ok(Json(QualityChanged {
                model: name,
                published,
            }))
        }
        ("a", Some(_)) => Err(ApiError::BadRequest(
            "variant a keeps the assigned version: give no version".into(),
        )),
        ("b", None) => Err(ApiError::BadRequest(
            "variant b needs the variant's version".into(),
        )),
        (other, _) => Err(ApiError::BadRequest(format!(
            "variant must be \"a\" or \"b\", not {other:?}"
        ))),
    }
}

/// Runs a candidate in shadow on the selected devices.
#[utoipa::path(put, path = "/api/v1/models/{name}/shadow", tag = "models", params(("name" = String, Path, description = "model name")), request_body = ShadowRequest, responses((status = 200, body = QualityChanged), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "the version, a device or the model's deployment does not exist", body = ErrorBody)))]
pub(super) async fn put_shadow(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<QualityChanged>> {
    let req: ShadowRequest = parse_body(&body, "malformed shadow JSON")?;
    share("sample_rate", req.sample_rate, false)?;
    for c in &req.compare {
        c.comparison
            .validate()
            .map_err(|e| ApiError::BadRequest(format!("compare {}: {e}", c.output)))?;
    }
    let settings = ShadowSettings {
        version: req.version,
        sample_rate: req.sample_rate,
        compare: req.compare.clone(),
    };
    let what = format!("{name}@{} sample {}", req.version, req.sample_rate);
    change(
        &fleet,
        &op,
        &name,
        QualityChange::Shadow(Some(settings)),
        &req.target(),
        "shadow",
        what,
    )
    .await
}

/// Stops a shadow candidate on the selected devices.
#[utoipa::path(delete, path = "/api/v1/models/{name}/shadow", tag = "models", params(("name" = String, Path, description = "model name")), request_body = QualityTarget, responses((status = 200, body = QualityChanged), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn delete_shadow(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<QualityChanged>> {
    let target: QualityTarget = parse_body(&body, "malformed selection JSON")?;
    let what = name.clone();
    change(
        &fleet,
        &op,
        &name,
        QualityChange::Shadow(None),
        &target,
        "shadow-end",
        what,
    )
    .await
}

/// The model's versions, A/B variants and shadow candidates in the
/// field, from each device's latest telemetry.
#[utoipa::path(get, path = "/api/v1/models/{name}/quality", tag = "models", params(("name" = String, Path, description = "model name")), responses((status = 200, body = ModelQuality), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
pub(super) async fn model_quality(
    State(fleet): State<Fleet>,
    Path(name): Path<String>,
) -> ApiResult<Json<ModelQuality>> {
    Ok(Json(crate::quality::summarize(
        &name,
        &fleet.insights.devices(),
    )))
}
