//! The HTTP API under `/api/v1`, plus artifact downloads under
//! `/artifacts/{sha256}` (with `Range`, for resumable device downloads).
//! Every error is `{"error": "..."}` naming the problem.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use edgefleet_shared::{DeviceId, ModelFormat};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::artifacts::{parse_range, ArtifactError, ByteRange};
use crate::auth;
use crate::fleet::Fleet;
use crate::store::{self, DeviceRecord, EventRecord, ModelRecord, StoreError};

/// Every error answer: `{"error": "what went wrong and what to do"}`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: String,
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "edgefleet fleet server",
        description = "Devices, models, deployments, operator tokens and the audit log of an edgefleet fleet. Every call but health, the root document and artifacts needs `Authorization: Bearer <operator token>`.",
        version = env!("CARGO_PKG_VERSION")
    ),
    paths(
        health, root_document, list_models, get_model, upload_model, put_spec, put_test_vector,
        deploy, list_devices, enroll_device, revoke_device, mosquitto_files, get_device,
        set_device_key, register_device_key,
        device_events, device_telemetry, device_results, device_desired, download_artifact,
        put_tags, delete_model, list_rollouts, create_rollout, get_rollout, rollout_action, rollout_device_action,
        create_token, list_tokens, revoke_token, list_audit, metrics, openapi_json
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerSecurity),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerSecurity;

impl utoipa::Modify for BearerSecurity {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("an operator token, eft_<id>_<secret>"))
                        .build(),
                ),
            );
    }
}

/// `GET /api/v1/openapi.json`: this API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "server", security(()), responses((status = 200, description = "the OpenAPI document", body = Object)))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi())
}

/// An API error with its HTTP status.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(m: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, m.into())
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, m.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => Self(StatusCode::CONFLICT, m),
            StoreError::NotFound(m) => Self(StatusCode::NOT_FOUND, m),
            other => {
                tracing::error!(error = %other, "store failure");
                Self(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(fleet: Fleet) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/root", get(root_document))
        .route("/api/v1/models", get(list_models))
        .route(
            "/api/v1/models/{name}/versions/{version}",
            post(upload_model).get(get_model).delete(delete_model),
        )
        .route(
            "/api/v1/models/{name}/versions/{version}/test-vector",
            axum::routing::put(put_test_vector),
        )
        .route(
            "/api/v1/models/{name}/versions/{version}/spec",
            axum::routing::put(put_spec),
        )
        .route("/api/v1/deployments", post(deploy))
        .route("/api/v1/devices", get(list_devices).post(enroll_device))
        .route("/api/v1/devices/{id}/revoke", post(revoke_device))
        .route(
            "/api/v1/devices/{id}/key",
            axum::routing::put(set_device_key),
        )
        .route("/api/v1/device-key", post(register_device_key))
        .route("/api/v1/devices/{id}/tags", axum::routing::put(put_tags))
        .route("/api/v1/broker/mosquitto", get(mosquitto_files))
        .route("/api/v1/devices/{id}", get(get_device))
        .route("/api/v1/devices/{id}/events", get(device_events))
        .route("/api/v1/devices/{id}/telemetry", get(device_telemetry))
        .route("/api/v1/devices/{id}/results", get(device_results))
        .route("/api/v1/devices/{id}/desired", get(device_desired))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route("/api/v1/rollouts/{id}", get(get_rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(rollout_action))
        .route(
            "/api/v1/rollouts/{id}/devices/{device}/{action}",
            post(rollout_device_action),
        )
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/artifacts/{name}", get(download_artifact))
        .fallback(|| async { ApiError::not_found("no such endpoint; the API lives under /api/v1") })
        .layer(axum::middleware::from_fn_with_state(
            fleet.clone(),
            authenticate,
        ))
        // Outermost, so refused calls are timed too.
        .layer(axum::middleware::from_fn_with_state(
            fleet.clone(),
            time_request,
        ))
        .with_state(fleet)
}

#[utoipa::path(get, path = "/api/v1/health", tag = "server", security(()), responses((status = 200, description = "the server is up", body = Object)))]
async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/api/v1/root", tag = "server", security(()), responses((status = 200, description = "the signed root document devices pin", body = Object)))]
async fn root_document(State(fleet): State<Fleet>) -> Json<Value> {
    Json(serde_json::to_value(fleet.signer.root_envelope()).expect("root serialises"))
}

#[utoipa::path(get, path = "/api/v1/models", tag = "models", responses((status = 200, body = [ModelRecord]), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
async fn list_models(State(fleet): State<Fleet>) -> ApiResult<Json<Vec<ModelRecord>>> {
    Ok(Json(fleet.store.list_models().await?))
}

fn check_model_name(name: &str) -> ApiResult<()> {
    edgefleet_shared::ids::validate_name("model name", name)
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), responses((status = 200, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn get_model(
    State(fleet): State<Fleet>,
    Path((name, version)): Path<(String, u64)>,
) -> ApiResult<Json<ModelRecord>> {
    fleet
        .store
        .get_model(&name, version)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!("model {name} version {version} does not exist"))
        })
}

#[derive(Deserialize)]
struct UploadQuery {
    format: Option<String>,
    /// Free text kept with the version (at most 1,000 characters).
    notes: Option<String>,
}

/// Streams the request body into the artifact store and registers it.
#[utoipa::path(post, path = "/api/v1/models/{name}/versions/{version}", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version"), ("format" = Option<String>, Query, description = "onnx or tflite"), ("notes" = Option<String>, Query, description = "free text kept with the version")), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the model file, streamed"), responses((status = 201, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 409, description = "conflicts with what is stored", body = ErrorBody), (status = 413, description = "larger than max_upload_bytes", body = ErrorBody)))]
async fn upload_model(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ModelRecord>)> {
    check_model_name(&name)?;
    let version: u64 = version.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
        ApiError::bad_request(format!("version {version:?} must be a positive integer"))
    })?;
    if query
        .notes
        .as_ref()
        .is_some_and(|n| n.chars().count() > 1000)
    {
        return Err(ApiError::bad_request("notes are at most 1,000 characters"));
    }
    let format: ModelFormat = query
        .format
        .as_deref()
        .unwrap_or("onnx")
        .parse()
        .map_err(ApiError::bad_request)?;
    let (sha256, size) = fleet
        .artifacts
        .put(body.into_data_stream(), fleet.max_upload_bytes)
        .await
        .map_err(|e| match e {
            ArtifactError::TooLarge { .. } => {
                ApiError(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            ArtifactError::Empty | ArtifactError::Interrupted(_) => {
                ApiError::bad_request(e.to_string())
            }
            ArtifactError::Io { .. } => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        })?;
    let record = ModelRecord {
        name,
        version,
        format,
        sha256,
        size,
        created_at: edgefleet_shared::unix_now(),
        test_vector: None,
        spec: Default::default(),
        pushed_by: Some(op.name.clone()),
        notes: query.notes.clone(),
    };
    match fleet.artifacts.compress(&record.sha256).await {
        Ok(Some(packed)) => {
            tracing::info!(sha256 = %record.sha256, size = record.size, packed, "compressed copy stored")
        }
        Ok(None) => {}
        // Devices then download the plain file.
        Err(e) => tracing::warn!(error = %e, "cannot store a compressed copy"),
    }
    let stored = fleet.store.add_model(&record).await?;
    audit(
        &fleet,
        &op,
        "model.push",
        format!("{}@{}", stored.name, stored.version),
        Some(json!({"sha256": stored.sha256, "size": stored.size, "format": stored.format})),
    )
    .await;
    tracing::info!(model = %stored.name, version = stored.version, size = stored.size, by = %op.name, "model pushed");
    Ok((StatusCode::CREATED, Json(stored)))
}

/// Checks a test vector: every tensor's data matches its shape, and the
/// tolerance is a number >= 0.
fn check_test_vector(tv: &edgefleet_shared::TestVector) -> Result<(), String> {
    if tv.inputs.is_empty() || tv.expected.is_empty() {
        return Err("a test vector needs at least one input and one expected output".into());
    }
    if !(tv.tolerance.is_finite() && tv.tolerance >= 0.0) {
        return Err(format!("tolerance {} must be a number >= 0", tv.tolerance));
    }
    for t in tv.inputs.iter().chain(&tv.expected) {
        let elements = t
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                format!(
                    "tensor {:?} has shape {:?}, whose element count overflows",
                    t.name, t.shape
                )
            })?;
        if elements != t.data.len() as u64 {
            return Err(format!(
                "tensor {:?} has shape {:?} ({elements} elements) but {} values",
                t.name,
                t.shape,
                t.data.len()
            ));
        }
    }
    Ok(())
}

/// Checks a declared interface: names unique per side, Open Inference
/// Protocol datatypes, dimensions >= -1.
fn check_spec(spec: &store::ModelSpec) -> Result<(), String> {
    const DATATYPES: &[&str] = &[
        "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
        "FP32", "FP64", "BYTES",
    ];
    if spec.is_empty() {
        return Err("a spec needs at least one input or output".into());
    }
    for (kind, list) in [("input", &spec.inputs), ("output", &spec.outputs)] {
        let mut names = std::collections::BTreeSet::new();
        for t in list {
            if !names.insert(t.name.as_str()) {
                return Err(format!("{kind} {:?} is declared twice", t.name));
            }
            if !DATATYPES.contains(&t.datatype.as_str()) {
                return Err(format!(
                    "{kind} {:?}: datatype {:?} is not one of {DATATYPES:?}",
                    t.name, t.datatype
                ));
            }
            if let Some(d) = t.shape.iter().find(|d| **d < -1) {
                return Err(format!(
                    "{kind} {:?}: dimension {d} must be -1 (any) or >= 0",
                    t.name
                ));
            }
        }
    }
    Ok(())
}

/// Stores an attachment (test vector, spec) of a model version that is
/// not deployed yet: devices check what is signed into their slot only
/// when they install a version, so a deployed version's attachments are
/// frozen.
async fn attach(
    fleet: &Fleet,
    op: &auth::Operator,
    name: String,
    version: u64,
    attachment: store::Attachment,
) -> ApiResult<Json<ModelRecord>> {
    let what = attachment.what();
    let record = fleet.store.attach(&name, version, attachment).await?;
    audit(
        fleet,
        op,
        &format!("model.{}", what.replace(' ', "_")),
        format!("{name}@{version}"),
        None,
    )
    .await;
    tracing::info!(model = %record.name, version = record.version, what, "model attachment stored");
    Ok(Json(record))
}

/// `PUT .../spec`: the model's declared interface.
#[utoipa::path(put, path = "/api/v1/models/{name}/versions/{version}/spec", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), request_body = store::ModelSpec, responses((status = 200, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "conflicts with what is stored", body = ErrorBody)))]
async fn put_spec(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<ModelRecord>> {
    let spec: store::ModelSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed spec JSON: {e}")))?;
    check_spec(&spec).map_err(ApiError::bad_request)?;
    attach(&fleet, &op, name, version, store::Attachment::Spec(spec)).await
}

/// `PUT .../test-vector`: the input and outputs devices must reproduce.
#[utoipa::path(put, path = "/api/v1/models/{name}/versions/{version}/test-vector", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), request_body = edgefleet_shared::TestVector, responses((status = 200, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "conflicts with what is stored", body = ErrorBody)))]
async fn put_test_vector(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<ModelRecord>> {
    let tv: edgefleet_shared::TestVector = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed test vector JSON: {e}")))?;
    check_test_vector(&tv).map_err(ApiError::bad_request)?;
    attach(
        &fleet,
        &op,
        name,
        version,
        store::Attachment::TestVector(tv),
    )
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
struct DeployRequest {
    model: String,
    version: u64,
    /// These devices.
    #[serde(default)]
    devices: Vec<String>,
    /// Every device, including ones that enroll later.
    #[serde(default)]
    all: bool,
    /// The devices that have all these tags now (a selection made at
    /// deployment time; devices tagged later are not included).
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
}

/// Points devices (or the whole fleet) at a model version and publishes
/// the new signed desired state to each affected device.
#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments", request_body = DeployRequest, responses((status = 200, description = "the devices whose signed desired state was published", body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn deploy(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let req: DeployRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed deployment JSON: {e}")))?;
    let chosen = [req.all, !req.devices.is_empty(), !req.tags.is_empty()];
    if chosen.iter().filter(|c| **c).count() != 1 {
        return Err(ApiError::bad_request(
            "give exactly one of \"devices\": [ids], \"all\": true or \"tags\": {key: value}",
        ));
    }
    let target = if req.all {
        store::Target::All
    } else if !req.tags.is_empty() {
        let ids: Vec<String> = fleet
            .store
            .find_all_devices(&tag_filter(&req.tags)?)
            .await?
            .into_iter()
            .map(|d| d.id)
            .collect();
        if ids.is_empty() {
            return Err(ApiError::not_found(format!(
                "no device has the tags {:?}",
                req.tags
            )));
        }
        store::Target::Devices(ids)
    } else {
        let devices = req
            .devices
            .iter()
            .map(|d| DeviceId::new(d.clone()).map_err(|e| ApiError::bad_request(e.to_string())))
            .collect::<ApiResult<Vec<_>>>()?;
        store::Target::Devices(devices.iter().map(|d| d.to_string()).collect())
    };
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
        Some(match &target {
            store::Target::All => json!({"all": true}),
            store::Target::Devices(ids) => json!({"devices": ids}),
        }),
    )
    .await;
    let mut published = Vec::new();
    for id in targets {
        let device = DeviceId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let Some(v) = fleet.publish_desired(&device).await? {
            published.push(json!({"device": device, "desired_version": v}));
        }
    }
    Ok(Json(json!({
        "model": req.model,
        "version": req.version,
        "scope": if req.all { "all" } else if req.tags.is_empty() { "devices" } else { "tags" },
        "published": published,
    })))
}

/// `GET /api/v1/devices?tag=K=V&hardware=H&online=true&after=ID&limit=N`:
/// devices with all the given tags (repeat `tag`), by id; page with
/// `after` = the last id of the previous page.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", params(("tag" = Option<Vec<String>>, Query, description = "KEY=VALUE; repeat to require several"), ("hardware" = Option<String>, Query), ("online" = Option<bool>, Query), ("after" = Option<String>, Query, description = "ids after this one (paging)"), ("limit" = Option<u32>, Query, description = "1 to 10000, default 1000")), responses((status = 200, body = [DeviceRecord]), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
async fn list_devices(
    State(fleet): State<Fleet>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let filter = device_filter(query.as_deref().unwrap_or(""))?;
    let devices = fleet.store.find_devices(&filter).await?;
    Ok(Json(json!(devices)))
}

fn device_filter(query: &str) -> ApiResult<store::DeviceFilter> {
    let mut filter = store::DeviceFilter {
        limit: 1000,
        ..Default::default()
    };
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "tag" => {
                let (k, v) = value.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(format!("tag {value:?} must be KEY=VALUE"))
                })?;
                check_tag(k, v)?;
                filter.tags.push((k.to_string(), v.to_string()));
            }
            "hardware" => filter.hardware = Some(value.into_owned()),
            "online" => {
                filter.online = Some(value.parse().map_err(|_| {
                    ApiError::bad_request(format!("online must be true or false, not {value:?}"))
                })?)
            }
            "after" => filter.after = Some(value.into_owned()),
            "limit" => {
                filter.limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=10_000).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit must be 1 to 10000, not {value:?}"))
                    })?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (use tag, hardware, online, after, limit)"
                )))
            }
        }
    }
    Ok(filter)
}

/// Tag keys and values: 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn check_tag(key: &str, value: &str) -> ApiResult<()> {
    let ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if ok(key) && ok(value) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "tag {key:?}={value:?}: keys and values are 1 to 64 of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// A device filter requiring all of `tags` (each checked).
fn tag_filter(tags: &std::collections::BTreeMap<String, String>) -> ApiResult<store::DeviceFilter> {
    let mut filter = store::DeviceFilter::default();
    for (k, v) in tags {
        check_tag(k, v)?;
        filter.tags.push((k.clone(), v.clone()));
    }
    Ok(filter)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    id: String,
    hardware: String,
    #[serde(default)]
    tags: std::collections::BTreeMap<String, String>,
    /// The device's ed25519 public key (64 hex), when it made one already;
    /// otherwise the device registers its key with its new credentials.
    #[serde(default)]
    public_key: Option<String>,
}

/// Parses a public key given in a request.
fn parse_public_key(text: &str) -> ApiResult<edgefleet_shared::PublicKey> {
    text.parse()
        .map_err(|e: edgefleet_shared::crypto::KeyError| ApiError::bad_request(e.to_string()))
}

/// `POST /api/v1/devices` (admin): enrolls a device (again: a new
/// password) and answers with what its bundle needs. The password is in
/// this answer only; the server keeps its hash.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = EnrollRequest, responses((status = 201, description = "the device, its MQTT credentials (the password only here) and the root document: a device bundle", body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
async fn enroll_device(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let req: EnrollRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "malformed enrollment (expected {{\"id\", \"hardware\", \"tags\": {{}}}}): {e}"
        ))
    })?;
    let id = DeviceId::new(req.id.clone()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_tag("hardware", &req.hardware)
        .map_err(|_| ApiError::bad_request("hardware must be 1 to 64 of A-Z a-z 0-9 . _ -"))?;
    for (k, v) in &req.tags {
        check_tag(k, v)?;
    }
    let public_key = req
        .public_key
        .as_deref()
        .map(parse_public_key)
        .transpose()?;
    let password = auth::device_password();
    let enrollment = store::Enrollment {
        id: id.to_string(),
        hardware: req.hardware.clone(),
        tags: req.tags.clone(),
        credential: auth::mosquitto_hash(&password),
        public_key: public_key.map(|k| k.to_hex()),
    };
    let device = fleet
        .store
        .enroll_device(&enrollment, edgefleet_shared::unix_now())
        .await?;
    fleet.device_keys.learn(&device);
    fleet.set_revoked(id.as_str(), false);
    fleet.rollouts.on_join(&fleet, &device).await;
    fleet.rollouts.flush(&fleet).await?;
    audit(
        &fleet,
        &op,
        "device.enroll",
        id.to_string(),
        Some(json!({"hardware": req.hardware, "tags": req.tags, "public_key": device.public_key})),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "device": device,
            "mqtt": {
                "url": fleet.device_mqtt_url,
                "topic_prefix": fleet.prefix.as_str(),
                "username": id,
                "password": password,
                "ca_pem": fleet.device_ca_pem,
            },
            "server_url": fleet.public_url,
            "root": fleet.signer.root_envelope(),
        })),
    ))
}

/// `POST /api/v1/devices/{id}/revoke` (admin): its credentials stop
/// working (the embedded broker with device authentication refuses it;
/// regenerate an external broker's password file).
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DeviceRecord), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn revoke_device(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let device = fleet
        .store
        .revoke_device(&id, edgefleet_shared::unix_now())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown device {id:?}")))?;
    fleet.set_revoked(&id, true);
    // Cut it off now rather than at its next connect.
    let cut = fleet.broker.as_ref().map_or(0, |b| b.evict(&id));
    crate::bridge::kick(&fleet, &id);
    audit(
        &fleet,
        &op,
        "device.revoke",
        id,
        Some(json!({"connections_closed": cut})),
    )
    .await;
    Ok(Json(json!(device)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SetKeyRequest {
    /// The device's ed25519 public key, 64 hex characters.
    public_key: String,
}

/// `PUT /api/v1/devices/{id}/key` (admin): sets the key the device's
/// messages must be signed with, replacing any earlier one (a key the
/// device made and logged at start, or a rotation).
#[utoipa::path(put, path = "/api/v1/devices/{id}/key", tag = "devices", params(("id" = String, Path, description = "device id")), request_body = SetKeyRequest, responses((status = 200, body = DeviceRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn set_device_key(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let req: SetKeyRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "malformed key (expected {{\"public_key\": \"<64 hex>\"}}): {e}"
        ))
    })?;
    let key = parse_public_key(&req.public_key)?;
    fleet
        .store
        .set_device_key(&id, &key.to_hex(), store::KeyWrite::Operator)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown device {id:?}")))?;
    let device = fleet
        .store
        .get_device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown device {id:?}")))?;
    fleet.device_keys.learn(&device);
    audit(
        &fleet,
        &op,
        "device.set_key",
        id,
        Some(json!({"public_key": key.to_hex()})),
    )
    .await;
    Ok(Json(json!(device)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterKeyRequest {
    device_id: String,
    /// 64 hex characters.
    public_key: String,
    /// Base64 ed25519 signature by the key over
    /// `edgefleet/v1/device-key\0{device_id}\0{public_key}`.
    proof: String,
}

/// `POST /api/v1/device-key`: a device registers the key it made, with
/// its enrollment credentials (HTTP Basic: device id and MQTT password)
/// and proof that it holds the key. Taken only while the device has no
/// key; the same key again is fine; a different one is refused (409)
/// until an operator sets it.
#[utoipa::path(post, path = "/api/v1/device-key", tag = "devices", security(()), request_body = RegisterKeyRequest, responses((status = 200, description = "the key is the device's", body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "not an enrolled, unrevoked device with these credentials", body = ErrorBody), (status = 409, description = "the device has another key", body = ErrorBody)))]
async fn register_device_key(
    State(fleet): State<Fleet>,
    headers: http::HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let unauthorized = || {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "not an enrolled, unrevoked device with these credentials (HTTP Basic: device id and its MQTT password)".into(),
        )
    };
    let (user, password) = basic_credentials(&headers).ok_or_else(unauthorized)?;
    let req: RegisterKeyRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "malformed registration (expected device_id, public_key, proof): {e}"
        ))
    })?;
    if req.device_id != user {
        return Err(unauthorized());
    }
    let hash = fleet
        .store
        .device_credential(&user)
        .await?
        .ok_or_else(unauthorized)?;
    if !auth::verify_mosquitto(&password, &hash) {
        return Err(unauthorized());
    }
    let key = parse_public_key(&req.public_key)?;
    let proof = edgefleet_shared::crypto::decode_signature(&req.proof)
        .map_err(|e| ApiError::bad_request(format!("proof: {e}")))?;
    let input = edgefleet_shared::signed_message::key_registration_input(&user, &key.to_hex());
    if !key.verify(&input, &proof) {
        return Err(ApiError::bad_request(
            "proof does not verify: sign the registration with the key being registered",
        ));
    }
    let held = fleet
        .store
        .set_device_key(&user, &key.to_hex(), store::KeyWrite::FirstOnly)
        .await?;
    if held.as_deref() != Some(key.to_hex().as_str()) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("device {user:?} has another key registered; an operator changes it with `fleetctl devices set-key`"),
        ));
    }
    if let Some(device) = fleet.store.get_device(&user).await? {
        fleet.device_keys.learn(&device);
    }
    tracing::info!(device = %user, key = %key.key_id().short(), "device registered its key");
    Ok(Json(json!({"device_id": user, "public_key": key.to_hex()})))
}

/// The user name and password of an HTTP Basic `Authorization` header.
fn basic_credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `GET /api/v1/broker/mosquitto?server_user=U` (admin): a Mosquitto
/// `password_file` (enrolled, unrevoked devices; hashes as stored) and an
/// `acl_file` letting each device publish and subscribe only under its own
/// id, and the server user everywhere under the topic prefix.
#[utoipa::path(get, path = "/api/v1/broker/mosquitto", tag = "devices", params(("server_user" = Option<String>, Query)), responses((status = 200, description = "password_file, acl_file, server_user", body = Object), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
async fn mosquitto_files(
    State(fleet): State<Fleet>,
    Query(q): Query<MosquittoQuery>,
) -> ApiResult<Json<Value>> {
    let mut passwords = String::new();
    for device in fleet.store.find_all_devices(&Default::default()).await? {
        if let Some(hash) = fleet.store.device_credential(&device.id).await? {
            passwords += &format!("{}:{hash}\n", device.id);
        }
    }
    let server_user = q
        .server_user
        .unwrap_or_else(|| crate::bridge::client_id(&fleet.prefix));
    let acl = auth::mosquitto_acl(fleet.prefix.as_str(), &server_user);
    Ok(Json(
        json!({"password_file": passwords, "acl_file": acl, "server_user": server_user}),
    ))
}

#[derive(Deserialize)]
struct MosquittoQuery {
    server_user: Option<String>,
}

/// `PUT /api/v1/devices/{id}/tags`: replaces a device's tags.
#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", tag = "devices", params(("id" = String, Path, description = "device id")), request_body = Object, responses((status = 200, body = DeviceRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn put_tags(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<DeviceRecord>> {
    let tags: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "malformed tags (expected {{\"key\": \"value\", ...}}): {e}"
            ))
        })?;
    for (k, v) in &tags {
        check_tag(k, v)?;
    }
    let device = fleet
        .store
        .set_tags(&id, &tags)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown device {id:?}")))?;
    // Newly in an active rollout's selection: it joins.
    fleet.rollouts.on_join(&fleet, &device).await;
    fleet.rollouts.flush(&fleet).await?;
    audit(&fleet, &op, "device.tags", id, Some(json!(tags))).await;
    Ok(Json(device))
}

/// `DELETE /api/v1/models/{name}/versions/{version}`: removes a version
/// no assignment points at (409 otherwise), and its file unless another
/// version has the same content.
#[utoipa::path(delete, path = "/api/v1/models/{name}/versions/{version}", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), responses((status = 200, body = ModelRecord), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "deployed", body = ErrorBody)))]
async fn delete_model(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
) -> ApiResult<Json<ModelRecord>> {
    let (record, file_still_used) = fleet.store.delete_model(&name, version).await?;
    if !file_still_used {
        fleet.artifacts.remove(&record.sha256);
    }
    audit(
        &fleet,
        &op,
        "model.delete",
        format!("{name}@{version}"),
        None,
    )
    .await;
    Ok(Json(record))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, body = DeviceRecord), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn get_device(State(fleet): State<Fleet>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let device = fleet
        .store
        .get_device(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown device {id:?}")))?;
    let mut body = json!(device);
    if let Some(rejected) = fleet.device_keys.rejections(&id) {
        body["rejected_messages"] = json!(rejected);
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "devices", params(("id" = String, Path, description = "device id"), ("limit" = Option<u32>, Query)), responses((status = 200, body = [EventRecord]), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
async fn device_events(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(100).min(1000);
    let events = fleet.store.events_for_device(&id, limit).await?;
    Ok(Json(json!(events)))
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    /// Only records with a sequence number above this one (for paging).
    after_seq: Option<u64>,
    limit: Option<u32>,
    /// Results only: one model's.
    model: Option<String>,
}

fn page(q: &StreamQuery) -> store::Page {
    store::Page {
        after_seq: q.after_seq,
        limit: q.limit.unwrap_or(500).clamp(1, 5000),
    }
}

/// A page of one of a device's streams as `{"device_id", field: [...]}`;
/// `None` (an unknown device) is a 404.
fn stream_reply(id: String, field: &str, rows: Option<Vec<Value>>) -> ApiResult<Json<Value>> {
    let rows = rows.ok_or_else(|| ApiError::not_found(format!("unknown device {id:?}")))?;
    Ok(Json(json!({ "device_id": id, field: rows })))
}

/// Recent telemetry of a device, oldest first (`after_seq` pages forward).
#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", tag = "devices", params(("id" = String, Path, description = "device id"), ("after_seq" = Option<u64>, Query), ("limit" = Option<u32>, Query)), responses((status = 200, description = "device_id and telemetry: samples as devices sent them, plus received_at", body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn device_telemetry(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Json<Value>> {
    let rows = fleet.store.telemetry_for_device(&id, &page(&q)).await?;
    stream_reply(id, "telemetry", rows)
}

/// Uploaded inference results of a device, oldest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/results", tag = "devices", params(("id" = String, Path, description = "device id"), ("after_seq" = Option<u64>, Query), ("limit" = Option<u32>, Query), ("model" = Option<String>, Query)), responses((status = 200, description = "device_id and results: uploaded inference results, plus received_at", body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn device_results(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Json<Value>> {
    let rows = fleet
        .store
        .results_for_device(&id, q.model.as_deref(), &page(&q))
        .await?;
    stream_reply(id, "results", rows)
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/desired", tag = "devices", params(("id" = String, Path, description = "device id")), responses((status = 200, description = "the signed desired-state document", body = Object), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn device_desired(State(fleet): State<Fleet>, Path(id): Path<String>) -> ApiResult<Response> {
    let doc = fleet.store.desired_json(&id).await?;
    let doc =
        doc.ok_or_else(|| ApiError::not_found(format!("device {id:?} has no desired state")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response())
}

/// Serves an artifact, honouring a single-range `Range` header and
/// `If-Range` against the artifact's ETag (its sha256).
#[utoipa::path(get, path = "/artifacts/{name}", tag = "server", security(()), params(("name" = String, Path, description = "sha256, or sha256.zst")), responses((status = 200, description = "the artifact", content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "a range of it", content_type = "application/octet-stream", body = Vec<u8>), (status = 404, description = "not found", body = ErrorBody), (status = 416, description = "unsatisfiable range", body = ErrorBody)))]
async fn download_artifact(
    State(fleet): State<Fleet>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let path = match name.strip_suffix(".zst") {
        Some(sha256) => fleet.artifacts.zst_path(sha256),
        None => fleet.artifacts.path(&name),
    }
    .ok_or_else(|| {
        ApiError::bad_request(
            "artifact names are 64 lowercase hex characters, with .zst for the compressed copy",
        )
    })?;
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found(format!("no artifact {name}")))?;
    let sha256 = name;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .len();
    let etag = format!("\"{sha256}\"");
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().map(|s| s == etag).unwrap_or(false));
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_ok)
        .and_then(|v| parse_range(v, len));
    let builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    let io = |e: std::io::Error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let response = match range {
        None => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from_stream(tokio_util::io::ReaderStream::new(file))),
        Some(ByteRange::Unsatisfiable) => builder
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{len}"))
            .body(Body::empty()),
        Some(ByteRange::Satisfiable { start, end }) => {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(io)?;
            let count = end - start + 1;
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, count)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .body(Body::from_stream(tokio_util::io::ReaderStream::new(
                    file.take(count),
                )))
        }
    };
    response.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

// ---- operator tokens and the audit log ----------------------------------------

/// Checks the operator token of every call that needs one (see
/// [`auth::required_scope`]) and hands the operator to the handler.
async fn authenticate(
    State(fleet): State<Fleet>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(needed) = auth::required_scope(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let unauthorized = |message: String| {
        let mut resp = ApiError(StatusCode::UNAUTHORIZED, message).into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        resp
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let session = crate::dashboard::session::from_cookies(req.headers());
    let record = match (presented, session) {
        (Some(presented), _) => {
            let Some((id, secret)) = auth::parse(presented) else {
                return unauthorized(
                    "malformed operator token (expected eft_<id>_<secret>)".into(),
                );
            };
            let (record, hash) = match fleet.store.token_for_auth(id).await {
                Err(e) => return ApiError::from(e).into_response(),
                Ok(None) => return unauthorized("unknown or revoked operator token".into()),
                Ok(Some(found)) => found,
            };
            if record.revoked_at.is_some() || !auth::matches(secret, &hash) {
                return unauthorized("unknown or revoked operator token".into());
            }
            record
        }
        // The dashboard's calls: its session cookie, and on a
        // state-changing call the session's CSRF token.
        (None, Some(session_id)) => {
            let (record, session) = match crate::dashboard::session_token(&fleet, &session_id).await
            {
                Err(e) => return ApiError::from(e).into_response(),
                Ok(None) => {
                    return unauthorized(
                        "dashboard session expired, unknown or its token revoked: log in again"
                            .into(),
                    )
                }
                Ok(Some(found)) => found,
            };
            let safe = matches!(
                *req.method(),
                http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
            );
            let csrf = req
                .headers()
                .get(crate::dashboard::session::CSRF_HEADER)
                .and_then(|v| v.to_str().ok());
            if !safe && !crate::dashboard::session::csrf_matches(&session, csrf) {
                return ApiError(
                    StatusCode::FORBIDDEN,
                    "missing or wrong CSRF token: a state-changing call made with the dashboard's session cookie must send the page's token in X-CSRF-Token".into(),
                )
                .into_response();
            }
            record
        }
        (None, None) => {
            return unauthorized(
                "missing operator token: send `Authorization: Bearer <token>` (fleetctl: --token or EDGEFLEET_TOKEN; on first start the server writes an admin token to {data_dir}/admin.token)".into(),
            );
        }
    };
    if record.scope < needed {
        return ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} ({}) has scope {}; {} {} needs {}",
                record.name,
                record.id,
                record.scope.as_str(),
                req.method(),
                req.uri().path(),
                needed.as_str()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(auth::Operator {
        token_id: record.id,
        name: record.name,
        scope: record.scope,
    });
    next.run(req).await
}

/// Appends an operator action to the audit log. The action has happened:
/// a failure to record it is logged loudly rather than reported as the
/// action failing.
async fn audit(
    fleet: &Fleet,
    op: &auth::Operator,
    action: &str,
    target: String,
    detail: Option<Value>,
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewTokenRequest {
    name: String,
    scope: auth::Scope,
}

/// `POST /api/v1/tokens`: a new token; its text is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = NewTokenRequest, responses((status = 201, description = "the token record and, only here, the token", body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
async fn create_token(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let req: NewTokenRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "malformed token request (expected {{\"name\": \"ci\", \"scope\": \"read\"|\"write\"|\"admin\"}}): {e}"
        ))
    })?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "token name must be 1 to 64 printable characters",
        ));
    }
    let made = auth::generate(name, req.scope, edgefleet_shared::unix_now());
    fleet.store.create_token(&made.record, &made.hash).await?;
    audit(
        &fleet,
        &op,
        "token.create",
        made.record.id.clone(),
        Some(json!({"name": made.record.name, "scope": made.record.scope})),
    )
    .await;
    tracing::info!(id = %made.record.id, name = %made.record.name, scope = made.record.scope.as_str(), by = %op.name, "operator token created");
    let mut reply = json!(made.record);
    reply["token"] = made.token.into();
    Ok((StatusCode::CREATED, Json(reply)))
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", responses((status = 200, body = [auth::TokenRecord]), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
async fn list_tokens(State(fleet): State<Fleet>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(fleet.store.list_tokens().await?)))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = String, Path, description = "token id")), responses((status = 200, body = auth::TokenRecord), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn revoke_token(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let record = fleet
        .store
        .revoke_token(&id, edgefleet_shared::unix_now())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("unknown token {id:?}")))?;
    audit(&fleet, &op, "token.revoke", id, None).await;
    Ok(Json(json!(record)))
}

#[derive(Deserialize)]
struct AuditQuery {
    after_id: Option<u64>,
    limit: Option<u32>,
}

/// `GET /api/v1/audit`: operator actions, oldest first (`after_id` pages).
#[utoipa::path(get, path = "/api/v1/audit", tag = "tokens", params(("after_id" = Option<u64>, Query), ("limit" = Option<u32>, Query)), responses((status = 200, body = [store::AuditRecord]), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody)))]
async fn list_audit(
    State(fleet): State<Fleet>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Value>> {
    let rows = fleet
        .store
        .list_audit(
            q.after_id.unwrap_or(0),
            q.limit.unwrap_or(100).clamp(1, 1000),
        )
        .await?;
    Ok(Json(json!(rows)))
}

// ---- metrics -------------------------------------------------------------------

/// Times every call by method, route template and status.
async fn time_request(
    State(fleet): State<Fleet>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    fleet
        .metrics
        .http
        .get_or_create(&crate::metrics::HttpLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "server", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
async fn metrics(State(fleet): State<Fleet>) -> ApiResult<Response> {
    let devices = fleet.store.list_devices().await?;
    let online = devices.iter().filter(|d| d.online).count();
    fleet.metrics.set_devices(online, devices.len() - online);
    if let Some(broker) = &fleet.broker {
        let (stats, clients) = broker.stats();
        fleet.metrics.set_broker(stats, clients);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        fleet.metrics.encode(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::documents::TestTensor;
    use edgefleet_shared::TestVector;

    fn tensor(shape: Vec<u64>, values: usize) -> TestTensor {
        TestTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape,
            data: vec![0.0; values],
        }
    }

    /// Found by the API fuzz test (scripts/api-fuzz): a shape whose element
    /// count overflows took the handler down instead of being refused.
    #[test]
    fn test_vectors_with_overflowing_shapes_are_refused() {
        let tv = TestVector {
            inputs: vec![tensor(vec![20, 591, 436_730, 3_573_462_429, u64::MAX], 0)],
            expected: vec![tensor(vec![1], 1)],
            tolerance: 0.0,
        };
        let err = check_test_vector(&tv).unwrap_err();
        assert!(err.contains("overflows"), "{err}");
        let ok = TestVector {
            inputs: vec![tensor(vec![2, 3], 6)],
            expected: vec![tensor(vec![1], 1)],
            tolerance: 0.5,
        };
        assert_eq!(check_test_vector(&ok), Ok(()));
        let short = TestVector {
            inputs: vec![tensor(vec![2, 3], 5)],
            ..ok
        };
        assert!(check_test_vector(&short).unwrap_err().contains("5 values"));
    }
}

// ---- staged rollouts -----------------------------------------------------------

impl From<crate::rollouts::RolloutError> for ApiError {
    fn from(e: crate::rollouts::RolloutError) -> Self {
        use crate::rollouts::RolloutError as E;
        match e {
            E::BadRequest(m) => Self(StatusCode::BAD_REQUEST, m),
            E::NotFound(m) => Self(StatusCode::NOT_FOUND, m),
            E::Conflict(m) => Self(StatusCode::CONFLICT, m),
            E::Store(e) => e.into(),
        }
    }
}

/// `POST /api/v1/rollouts`: creates a staged rollout (or, with
/// `dry_run`, shows which devices fall in which wave).
#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", request_body = crate::rollouts::CreateRollout, responses((status = 201, description = "the rollout's status", body = Object), (status = 200, description = "dry run: the plan", body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "conflicts with an active rollout", body = ErrorBody)))]
async fn create_rollout(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let req: crate::rollouts::CreateRollout = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed rollout: {e}")))?;
    let chosen = [
        req.all,
        !req.devices.is_empty(),
        !req.tags.is_empty() || req.hardware.is_some(),
    ];
    if chosen.iter().filter(|c| **c).count() != 1 {
        return Err(ApiError::bad_request(
            "give exactly one of \"devices\", \"all\": true or \"tags\" and/or \"hardware\"",
        ));
    }
    let devices = if req.devices.is_empty() {
        // Every unrevoked device, or those with all the tags (and the
        // hardware class).
        let mut filter = tag_filter(&req.tags)?;
        if let Some(hardware) = &req.hardware {
            check_tag("hardware", hardware).map_err(|_| {
                ApiError::bad_request("hardware must be 1 to 64 of A-Z a-z 0-9 . _ -")
            })?;
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
            DeviceId::new(d.clone()).map_err(|e| ApiError::bad_request(e.to_string()))?;
        }
        req.devices.clone()
    };
    let dry_run = req.dry_run;
    let id = req.id.clone();
    let status = fleet.rollouts.create(&fleet, req, devices).await?;
    if dry_run {
        return Ok((StatusCode::OK, Json(status)));
    }
    audit(&fleet, &op, "rollout.create", id, None).await;
    Ok((StatusCode::CREATED, Json(status)))
}

#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts", responses((status = 200, body = [Object]), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
async fn list_rollouts(State(fleet): State<Fleet>) -> Json<Value> {
    Json(json!(fleet.rollouts.list().await))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct RolloutQuery {
    /// Leave out each device's state and the devices of each wave.
    #[serde(default)]
    brief: bool,
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts", params(("id" = String, Path), RolloutQuery), responses((status = 200, description = "phase (and why it paused), waves, counts per state, gates, devices", body = Object), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
async fn get_rollout(
    State(fleet): State<Fleet>,
    Path(id): Path<String>,
    Query(q): Query<RolloutQuery>,
) -> ApiResult<Json<Value>> {
    fleet
        .rollouts
        .get(&id, q.brief)
        .await
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("unknown rollout {id:?}")))
}

/// `POST /api/v1/rollouts/{id}/{action}`: start, pause, resume, approve,
/// abort (which sends every device that moved back to its version).
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts", params(("id" = String, Path), ("action" = String, Path, description = "start, pause, resume, approve or abort")), responses((status = 200, body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "not possible in this phase", body = ErrorBody)))]
async fn rollout_action(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let status = fleet.rollouts.act(&fleet, &id, &action).await?;
    audit(&fleet, &op, &format!("rollout.{action}"), id, None).await;
    Ok(Json(status))
}

/// `POST /api/v1/rollouts/{id}/devices/{device}/{action}`: an operator's
/// decision about one device: `exclude` (taken out, and sent back if it
/// had moved), `retry` (a failed, reverted, excluded or offline device
/// back in line) or `force` (asked now, ahead of its wave).
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/devices/{device}/{action}", tag = "rollouts", params(("id" = String, Path), ("device" = String, Path), ("action" = String, Path, description = "exclude, retry or force")), responses((status = 200, body = Object), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "not possible in this state", body = ErrorBody)))]
async fn rollout_device_action(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((id, device, action)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let what: crate::rollout::Override = serde_json::from_value(json!(action)).map_err(|_| {
        ApiError::bad_request(format!(
            "unknown device action {action:?} (exclude, retry, force)"
        ))
    })?;
    let status = fleet
        .rollouts
        .override_device(&fleet, &id, &device, what)
        .await?;
    audit(
        &fleet,
        &op,
        &format!("rollout.device.{action}"),
        id,
        Some(json!({ "device": device })),
    )
    .await;
    Ok(Json(status))
}
