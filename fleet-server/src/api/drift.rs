//! Drift monitoring's endpoints: set a model version's reference profile
//! from a reference file or from a period of stored traffic (either
//! re-publishes the desired state of every device assigned that version,
//! so agents collect in the reference's bins), and read a model's drift
//! scores per version: fleet-wide, per hardware class and per device,
//! each with its per-feature breakdown ([`crate::drift`]).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use edgefleet_shared::TelemetryMessage;
use serde::{Deserialize, Serialize};

use super::access::{audit, detail};
use super::types::{ErrorBody, PublishedDesired};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::drift::view::{ModelDrift, ReferenceSummary};
use crate::drift::{self, ReferenceError, ReferenceProfile};
use crate::fleet::Fleet;
use crate::store::ArrivalKey;

/// Telemetry rows read per query when building a reference from traffic.
const TRAFFIC_BATCH: u32 = 2_000;

/// A reference was set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReferenceSet {
    pub model: String,
    pub version: u64,
    pub reference: ReferenceSummary,
    /// The binned features, as `tensor/feature`.
    pub features: Vec<String>,
    /// Devices assigned the version whose desired state was re-published.
    pub published: Vec<PublishedDesired>,
}

/// The period of traffic a reference is made from (unix seconds of
/// arrival at the server, inclusive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrafficPeriod {
    pub since: u64,
    pub until: u64,
}

impl From<ReferenceError> for ApiError {
    fn from(e: ReferenceError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

/// `PUT /api/v1/models/{name}/versions/{version}/reference`: computes the
/// version's reference from a reference file and sets it.
#[utoipa::path(put, path = "/api/v1/models/{name}/versions/{version}/reference", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), request_body(content = crate::drift::ReferenceFile, content_type = "application/json", description = "a reference file: {\"samples\": [{\"inputs\": {NAME: [numbers]}, \"outputs\": {NAME: [numbers]}}]}, each tensor one sample's values, flat"), responses((status = 200, body = ReferenceSet), (status = 400, description = "the file is malformed or does not fit the model", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "no such model version", body = ErrorBody)))]
pub(super) async fn put_reference(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
    body: Bytes,
) -> ApiResult<Json<ReferenceSet>> {
    let model = fleet
        .store
        .get_model(&name, version)
        .await?
        .ok_or_else(|| ApiError::UnknownModel {
            name: name.clone(),
            version,
        })?;
    let profile = drift::from_file(&model.spec, &body)?;
    set(&fleet, &op, &name, version, profile).await.map(Json)
}

/// `POST /api/v1/models/{name}/versions/{version}/reference/from-traffic`:
/// makes the version's reference from the drift statistics devices
/// reported in a period, in the bins of the reference in force.
#[utoipa::path(post, path = "/api/v1/models/{name}/versions/{version}/reference/from-traffic", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), request_body = TrafficPeriod, responses((status = 200, body = ReferenceSet), (status = 400, description = "no statistics in the period, or no reference in force", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "no such model version", body = ErrorBody)))]
pub(super) async fn reference_from_traffic(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
    body: Bytes,
) -> ApiResult<Json<ReferenceSet>> {
    let period: TrafficPeriod = parse_body(
        &body,
        "a period {\"since\": UNIX_SECS, \"until\": UNIX_SECS}",
    )?;
    if period.since > period.until {
        return Err(ApiError::BadRequest(format!(
            "since ({}) is after until ({})",
            period.since, period.until
        )));
    }
    if fleet.store.get_model(&name, version).await?.is_none() {
        return Err(ApiError::UnknownModel { name, version });
    }
    let current = fleet.store.get_reference(&name, version).await?;
    let Some(current) =
        current.and_then(|json| serde_json::from_str::<ReferenceProfile>(&json).ok())
    else {
        return Err(ApiError::BadRequest(format!(
            "{name} v{version} has no reference in force: devices collect drift statistics only in a reference's bins, so set one from a reference file first (fleetctl model reference set), let devices report, then make one from that traffic"
        )));
    };
    let mut intervals = Vec::new();
    let mut after = ArrivalKey::before(period.since);
    'pages: loop {
        let rows = fleet.store.telemetry_arrived(&after, TRAFFIC_BATCH).await?;
        let full = rows.len() >= TRAFFIC_BATCH as usize;
        for (key, body) in rows {
            if key.received_at > period.until {
                break 'pages;
            }
            after = key;
            let Ok(t) = serde_json::from_str::<TelemetryMessage>(&body) else {
                continue;
            };
            intervals.extend(
                t.models
                    .into_iter()
                    .filter(|m| m.name == name && m.version == version)
                    .filter_map(|m| m.drift),
            );
        }
        if !full {
            break;
        }
    }
    let profile = ReferenceProfile::from_traffic(&current.spec(), &intervals)?;
    if profile.samples == 0 {
        return Err(ReferenceError::NoTraffic {
            model: name,
            version,
            since: period.since,
            until: period.until,
        }
        .into());
    }
    set(&fleet, &op, &name, version, profile).await.map(Json)
}

/// Stores a reference, caches it and re-publishes the desired state of
/// the devices assigned the version (their slot's bins change).
async fn set(
    fleet: &Fleet,
    op: &auth::Operator,
    name: &str,
    version: u64,
    profile: ReferenceProfile,
) -> ApiResult<ReferenceSet> {
    let json = serde_json::to_string(&profile)
        .map_err(|e| ApiError::Internal(format!("cannot write the reference: {e}")))?;
    fleet
        .store
        .set_reference(name, version, &json, edgefleet_shared::unix_now())
        .await?;
    let summary = ReferenceSummary {
        source: profile.source.clone(),
        samples: profile.samples,
        features: profile.features.len(),
    };
    let features = profile
        .features
        .iter()
        .map(|f| format!("{}/{}", f.bins.tensor, f.bins.feature.as_str()))
        .collect();
    fleet.desired.drift.set_reference(name, version, profile);
    let ids: Vec<String> = fleet
        .store
        .list_devices()
        .await?
        .into_iter()
        .map(|d| d.id)
        .collect();
    let running: Vec<String> = fleet
        .store
        .assigned_versions(name, &ids)
        .await?
        .into_iter()
        .filter(|(_, v)| *v == Some(version))
        .map(|(id, _)| id)
        .collect();
    let published = super::deployments::publish_all(fleet, running).await?;
    audit(
        fleet,
        op,
        "model.reference",
        format!("{name}@{version}"),
        detail(&summary),
    )
    .await;
    tracing::info!(model = %name, version, source = %summary.source, samples = summary.samples, devices = published.len(), "drift reference set");
    Ok(ReferenceSet {
        model: name.to_string(),
        version,
        reference: summary,
        features,
        published,
    })
}

/// `GET /api/v1/models/{name}/drift`: the model's drift scores.
#[utoipa::path(get, path = "/api/v1/models/{name}/drift", tag = "models", params(("name" = String, Path, description = "model name")), responses((status = 200, body = ModelDrift), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "no such model", body = ErrorBody)))]
pub(super) async fn model_drift(
    State(fleet): State<Fleet>,
    Path(name): Path<String>,
) -> ApiResult<Json<ModelDrift>> {
    let models = fleet.store.list_models().await?;
    if !models.iter().any(|m| m.name == name) {
        return Err(ApiError::NotFound(format!("unknown model {name:?}")));
    }
    let classes = crate::drift::view::hardware_classes(&fleet.store.list_devices().await?);
    Ok(Json(fleet.desired.drift.model(
        &name,
        &classes,
        edgefleet_shared::unix_now(),
    )))
}
