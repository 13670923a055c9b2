//! The HTTP API under `/api/v1`, plus artifact downloads under
//! `/artifacts/{sha256}` (with `Range`, for resumable device downloads):
//! the router, the OpenAPI document assembled from the handlers, and the
//! error every handler answers with, `{"error": "..."}` naming the
//! problem. Each resource's handlers live in their own module; their
//! bodies are the types in [`types`].

mod access;
mod agent;
mod artifacts;
mod deployments;
mod devices;
mod drift;
mod enrollment;
mod metrics;
mod models;
mod quality;
mod rollouts;
mod tokens;
pub mod types;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};

use crate::artifacts::ArtifactError;
use crate::fleet::Fleet;
use crate::rollout::RolloutError;
use crate::store::StoreError;
use types::{ErrorBody, Health, SignedEnvelope};

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "edgefleet fleet server",
        description = "Devices, models, agent releases, deployments, operator tokens and the audit log of an edgefleet fleet. Every call but health, the root document and artifacts needs `Authorization: Bearer <operator token>`.",
        version = env!("CARGO_PKG_VERSION")
    ),
    paths(
        health, root_document, openapi_json,
        models::list_models, models::get_model, models::upload_model, models::put_spec,
        models::put_test_vector, models::delete_model,
        drift::put_reference, drift::reference_from_traffic, drift::model_drift,
        quality::model_quality, quality::put_split, quality::delete_split, quality::promote,
        quality::put_shadow, quality::delete_shadow,
        deployments::deploy,
        agent::push_build, agent::list_releases, agent::get_release, agent::delete_release,
        agent::deploy_release,
        devices::list_devices, devices::get_device, devices::put_tags, devices::device_events,
        devices::device_telemetry, devices::device_results, devices::device_desired,
        enrollment::enroll_device, enrollment::revoke_device, enrollment::set_device_key,
        enrollment::register_device_key, enrollment::mosquitto_files,
        artifacts::download_artifact,
        rollouts::list_rollouts, rollouts::create_rollout, rollouts::get_rollout,
        rollouts::rollout_action, rollouts::rollout_device_action,
        tokens::create_token, tokens::list_tokens, tokens::revoke_token, tokens::list_audit,
        metrics::metrics
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

/// Why a call failed; each variant answers with its HTTP status and
/// `{"error": message}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed: the message says what is wrong in it.
    #[error("{0}")]
    BadRequest(String),
    /// No, a malformed, unknown or revoked credential.
    #[error("{0}")]
    Unauthorized(String),
    /// The credential's scope is too small, or a CSRF token is missing.
    #[error("{0}")]
    Forbidden(String),
    /// The thing the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("unknown device {0:?}")]
    UnknownDevice(String),
    #[error("model {name} version {version} does not exist")]
    UnknownModel { name: String, version: u64 },
    #[error("unknown rollout {0:?}")]
    UnknownRollout(String),
    #[error("unknown token {0:?}")]
    UnknownToken(String),
    #[error("device {0:?} has no desired state")]
    NoDesiredState(String),
    /// The request conflicts with what is stored.
    #[error("{0}")]
    Conflict(String),
    /// A pushed model could not be taken.
    #[error(transparent)]
    Upload(#[from] ArtifactError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    /// Reading or answering failed on the server's side.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_)
            | Self::UnknownDevice(_)
            | Self::UnknownModel { .. }
            | Self::UnknownRollout(_)
            | Self::UnknownToken(_)
            | Self::NoDesiredState(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Upload(ArtifactError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Upload(ArtifactError::Empty | ArtifactError::Interrupted(_)) => {
                StatusCode::BAD_REQUEST
            }
            Self::Upload(ArtifactError::Io { .. } | ArtifactError::Database(_))
            | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Store(StoreError::Conflict(_)) => StatusCode::CONFLICT,
            Self::Store(StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Rollout(RolloutError::BadRequest(_)) => StatusCode::BAD_REQUEST,
            Self::Rollout(RolloutError::NotFound(_)) => StatusCode::NOT_FOUND,
            Self::Rollout(RolloutError::Conflict(_)) => StatusCode::CONFLICT,
            Self::Rollout(RolloutError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Rollout(RolloutError::Store(e)) => match e {
                StoreError::Conflict(_) => StatusCode::CONFLICT,
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed on the server's side");
        }
        let body = ErrorBody {
            error: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON request body; `what` names the body (and its expected
/// shape) in the error.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("{what}: {e}")))
}

/// The API's routes, behind operator authentication and request timing.
pub fn router(fleet: Fleet) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/root", get(root_document))
        .route("/api/v1/models", get(models::list_models))
        .route(
            "/api/v1/models/{name}/versions/{version}",
            post(models::upload_model)
                .get(models::get_model)
                .delete(models::delete_model),
        )
        .route(
            "/api/v1/models/{name}/versions/{version}/test-vector",
            put(models::put_test_vector),
        )
        .route(
            "/api/v1/models/{name}/versions/{version}/spec",
            put(models::put_spec),
        )
        .route(
            "/api/v1/models/{name}/versions/{version}/reference",
            put(drift::put_reference),
        )
        .route(
            "/api/v1/models/{name}/versions/{version}/reference/from-traffic",
            post(drift::reference_from_traffic),
        )
        .route("/api/v1/models/{name}/drift", get(drift::model_drift))
        .route("/api/v1/models/{name}/quality", get(quality::model_quality))
        .route(
            "/api/v1/models/{name}/split",
            put(quality::put_split).delete(quality::delete_split),
        )
        .route(
            "/api/v1/models/{name}/split/promote",
            post(quality::promote),
        )
        .route(
            "/api/v1/models/{name}/shadow",
            put(quality::put_shadow).delete(quality::delete_shadow),
        )
        .route("/api/v1/deployments", post(deployments::deploy))
        .route("/api/v1/agent/releases", get(agent::list_releases))
        .route(
            "/api/v1/agent/releases/{version}",
            get(agent::get_release).delete(agent::delete_release),
        )
        .route(
            "/api/v1/agent/releases/{version}/{target}",
            put(agent::push_build),
        )
        .route("/api/v1/agent/deployments", post(agent::deploy_release))
        .route(
            "/api/v1/devices",
            get(devices::list_devices).post(enrollment::enroll_device),
        )
        .route(
            "/api/v1/devices/{id}/revoke",
            post(enrollment::revoke_device),
        )
        .route("/api/v1/devices/{id}/key", put(enrollment::set_device_key))
        .route("/api/v1/device-key", post(enrollment::register_device_key))
        .route("/api/v1/devices/{id}/tags", put(devices::put_tags))
        .route("/api/v1/broker/mosquitto", get(enrollment::mosquitto_files))
        .route("/api/v1/devices/{id}", get(devices::get_device))
        .route("/api/v1/devices/{id}/events", get(devices::device_events))
        .route(
            "/api/v1/devices/{id}/telemetry",
            get(devices::device_telemetry),
        )
        .route("/api/v1/devices/{id}/results", get(devices::device_results))
        .route("/api/v1/devices/{id}/desired", get(devices::device_desired))
        .route(
            "/api/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route("/api/v1/tokens/{id}", delete(tokens::revoke_token))
        .route("/api/v1/audit", get(tokens::list_audit))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list_rollouts).post(rollouts::create_rollout),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::get_rollout))
        .route(
            "/api/v1/rollouts/{id}/{action}",
            post(rollouts::rollout_action),
        )
        .route(
            "/api/v1/rollouts/{id}/devices/{device}/{action}",
            post(rollouts::rollout_device_action),
        )
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/openapi.json", get(openapi_json))
        .route("/artifacts/{name}", get(artifacts::download_artifact))
        .fallback(|| async {
            ApiError::NotFound("no such endpoint; the API lives under /api/v1".into())
        })
        .layer(axum::middleware::from_fn_with_state(
            fleet.clone(),
            access::authenticate,
        ))
        // Outermost, so refused calls are timed too.
        .layer(axum::middleware::from_fn_with_state(
            fleet.clone(),
            metrics::time_request,
        ))
        .with_state(fleet)
}

/// `GET /api/v1/health`: answers while the server is up.
#[utoipa::path(get, path = "/api/v1/health", tag = "server", security(()), responses((status = 200, description = "the server is up", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// `GET /api/v1/root`: the signed root document devices pin.
#[utoipa::path(get, path = "/api/v1/root", tag = "server", security(()), responses((status = 200, description = "the signed root document devices pin", body = SignedEnvelope)))]
async fn root_document(State(fleet): State<Fleet>) -> Json<SignedEnvelope> {
    Json(fleet.signer.root_envelope().into())
}

/// `GET /api/v1/openapi.json`: this API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "server", security(()), responses((status = 200, description = "the OpenAPI document", body = Object)))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use utoipa::OpenApi;

    /// Whether `schema` describes nothing about its fields: an object with
    /// no properties and no value type, or an empty schema. `$ref`s are
    /// followed into `components`; arrays are judged by their items; a
    /// composition is bare when all of its parts are.
    fn is_bare(schema: &Value, components: &Value, depth: usize) -> bool {
        assert!(depth < 32, "$ref cycle at {schema}");
        if let Some(name) = schema["$ref"].as_str() {
            let name = name.trim_start_matches("#/components/schemas/");
            let target = &components["schemas"][name];
            assert!(!target.is_null(), "dangling $ref {name}");
            return is_bare(target, components, depth + 1);
        }
        for key in ["allOf", "oneOf", "anyOf"] {
            if let Some(parts) = schema[key].as_array() {
                let typed: Vec<&Value> = parts.iter().filter(|p| p["type"] != "null").collect();
                return typed.iter().all(|p| is_bare(p, components, depth + 1));
            }
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if types.contains(&"array") {
            return is_bare(&schema["items"], components, depth + 1);
        }
        let described = schema["properties"]
            .as_object()
            .is_some_and(|p| !p.is_empty())
            || schema["additionalProperties"].is_object();
        let object = types.contains(&"object") || types.is_empty();
        object && !described && schema["enum"].is_null()
    }

    /// Every request and response body under `/api/v1` whose schema is
    /// bare, as `METHOD PATH where`.
    fn untyped_bodies(doc: &Value) -> Vec<String> {
        let components = &doc["components"];
        let mut found = Vec::new();
        let paths = doc["paths"].as_object().expect("the document has paths");
        for (path, operations) in paths {
            // The document describing the API is not one of its resources.
            if !path.starts_with("/api/v1/") || path == "/api/v1/openapi.json" {
                continue;
            }
            for (method, op) in operations.as_object().into_iter().flatten() {
                let mut bodies = Vec::new();
                if let Some(content) = op["requestBody"]["content"].as_object() {
                    bodies.extend(content.iter().map(|(t, c)| (format!("request {t}"), c)));
                }
                for (status, response) in op["responses"].as_object().into_iter().flatten() {
                    for (t, c) in response["content"].as_object().into_iter().flatten() {
                        bodies.push((format!("response {status} {t}"), c));
                    }
                }
                for (where_, content) in bodies {
                    if is_bare(&content["schema"], components, 0) {
                        found.push(format!("{} {path} {where_}", method.to_uppercase()));
                    }
                }
            }
        }
        found
    }

    /// Every `$ref` anywhere under `value`.
    fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
        match value {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    found.push(r);
                }
                m.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[test]
    fn every_schema_the_document_refers_to_is_in_it() {
        let doc = document();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.contains(&"#/components/schemas/Phase"), "{found:?}");
        for r in found {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{r} is not in the document"
            );
        }
    }

    fn document() -> Value {
        serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serialises")
    }

    #[test]
    fn every_api_body_in_the_openapi_document_names_its_fields() {
        let doc = document();
        let untyped = untyped_bodies(&doc);
        assert!(untyped.is_empty(), "untyped bodies: {untyped:#?}");
        // The walk sees the bodies at all: a typed one is there.
        let rollout = &doc["paths"]["/api/v1/rollouts/{id}"]["get"]["responses"]["200"]["content"]
            ["application/json"]["schema"];
        assert_eq!(rollout["$ref"], "#/components/schemas/RolloutStatus");
    }

    #[test]
    fn the_body_check_finds_bare_objects() {
        let doc = json!({
            "paths": {
                "/api/v1/a": {"post": {
                    "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
                    "responses": {"200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Loose"}}}}}
                }},
                "/api/v1/b": {"get": {"responses": {
                    "200": {"content": {"application/json": {"schema": {"type": "array", "items": {}}}}},
                    "201": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Typed"}}}},
                    "202": {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": {"type": "string"}}}}}
                }}},
                "/metrics": {"get": {"responses": {"200": {"content": {"application/json": {"schema": {"type": "object"}}}}}}}
            },
            "components": {"schemas": {
                "Loose": {"oneOf": [{"type": "null"}, {"type": "object"}]},
                "Typed": {"type": "object", "properties": {"id": {"type": "string"}}}
            }}
        });
        assert_eq!(
            untyped_bodies(&doc),
            [
                "POST /api/v1/a request application/json",
                "POST /api/v1/a response 200 application/json",
                "GET /api/v1/b response 200 application/json"
            ]
        );
    }

    #[test]
    fn every_error_is_an_error_body_with_its_status() {
        let cases = [
            (ApiError::BadRequest("bad x".into()), 400),
            (ApiError::UnknownDevice("cam-9".into()), 404),
            (
                ApiError::UnknownModel {
                    name: "digits".into(),
                    version: 4,
                },
                404,
            ),
            (ApiError::UnknownRollout("r9".into()), 404),
            (ApiError::Upload(ArtifactError::TooLarge { limit: 10 }), 413),
            (ApiError::Store(StoreError::Conflict("taken".into())), 409),
            (
                ApiError::Rollout(RolloutError::Conflict("running".into())),
                409,
            ),
            (
                ApiError::Rollout(RolloutError::Store(StoreError::NotFound("gone".into()))),
                404,
            ),
            (ApiError::Store(StoreError::Task("panicked".into())), 500),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
        assert_eq!(
            ApiError::UnknownDevice("cam-9".into()).to_string(),
            "unknown device \"cam-9\""
        );
        assert_eq!(
            ApiError::UnknownModel {
                name: "digits".into(),
                version: 4
            }
            .to_string(),
            "model digits version 4 does not exist"
        );
    }

    #[test]
    fn every_route_of_the_document_is_served() {
        // The router's paths, as the document spells them.
        let served = [
            "/api/v1/health",
            "/api/v1/root",
            "/api/v1/models",
            "/api/v1/models/{name}/versions/{version}",
            "/api/v1/models/{name}/versions/{version}/test-vector",
            "/api/v1/models/{name}/versions/{version}/spec",
            "/api/v1/deployments",
            "/api/v1/agent/releases",
            "/api/v1/agent/releases/{version}",
            "/api/v1/agent/releases/{version}/{target}",
            "/api/v1/agent/deployments",
            "/api/v1/devices",
            "/api/v1/devices/{id}/revoke",
            "/api/v1/devices/{id}/key",
            "/api/v1/device-key",
            "/api/v1/devices/{id}/tags",
            "/api/v1/broker/mosquitto",
            "/api/v1/devices/{id}",
            "/api/v1/devices/{id}/events",
            "/api/v1/devices/{id}/telemetry",
            "/api/v1/devices/{id}/results",
            "/api/v1/devices/{id}/desired",
            "/api/v1/tokens",
            "/api/v1/tokens/{id}",
            "/api/v1/audit",
            "/api/v1/rollouts",
            "/api/v1/rollouts/{id}",
            "/api/v1/rollouts/{id}/{action}",
            "/api/v1/rollouts/{id}/devices/{device}/{action}",
            "/metrics",
            "/api/v1/openapi.json",
            "/artifacts/{name}",
            "/api/v1/models/{name}/versions/{version}/reference",
            "/api/v1/models/{name}/versions/{version}/reference/from-traffic",
            "/api/v1/models/{name}/drift",
            "/api/v1/models/{name}/quality",
            "/api/v1/models/{name}/split",
            "/api/v1/models/{name}/split/promote",
            "/api/v1/models/{name}/shadow",
        ];
        let doc = document();
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        documented.sort_unstable();
        let mut served = served.to_vec();
        served.sort_unstable();
        assert_eq!(documented, served);
    }
}
