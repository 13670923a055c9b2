//! The model registry's endpoints: list and show versions, push a model
//! file (streamed into the artifact store, with its name, version, notes,
//! test vector and spec checked), attach a test vector or spec to a
//! version not deployed yet, and delete a version nothing points at.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use edgefleet_shared::ModelFormat;
use serde::{Deserialize, Serialize};

use super::access::{audit, detail};
use super::types::{ErrorBody, ModelRecord, ModelSpec, TestVector};
use super::{parse_body, ApiError, ApiResult};
use crate::auth;
use crate::fleet::Fleet;
use crate::store;

/// `GET /api/v1/models`: every version of every model.
#[utoipa::path(get, path = "/api/v1/models", tag = "models", responses((status = 200, body = [ModelRecord]), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
pub(super) async fn list_models(State(fleet): State<Fleet>) -> ApiResult<Json<Vec<ModelRecord>>> {
    Ok(Json(fleet.store.list_models().await?))
}

/// `GET /api/v1/models/{name}/versions/{version}`: one version.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), responses((status = 200, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub(super) async fn get_model(
    State(fleet): State<Fleet>,
    Path((name, version)): Path<(String, u64)>,
) -> ApiResult<Json<ModelRecord>> {
    fleet
        .store
        .get_model(&name, version)
        .await?
        .map(Json)
        .ok_or(ApiError::UnknownModel { name, version })
}

/// The query of a push.
#[derive(Deserialize)]
pub(super) struct UploadQuery {
    format: Option<String>,
    /// Free text kept with the version (at most 1,000 characters).
    notes: Option<String>,
}

/// What the audit log keeps about a push.
#[derive(Serialize)]
struct PushDetail<'a> {
    sha256: &'a str,
    size: u64,
    format: ModelFormat,
}

/// `POST /api/v1/models/{name}/versions/{version}`: streams the request
/// body into the artifact store and registers it.
#[utoipa::path(post, path = "/api/v1/models/{name}/versions/{version}", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version"), ("format" = Option<String>, Query, description = "onnx or tflite"), ("notes" = Option<String>, Query, description = "free text kept with the version")), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the model file, streamed"), responses((status = 201, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 409, description = "conflicts with what is stored", body = ErrorBody), (status = 413, description = "larger than max_upload_bytes", body = ErrorBody)))]
pub(super) async fn upload_model(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ModelRecord>)> {
    edgefleet_shared::ids::validate_name("model name", &name)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let version = check_version(&version)?;
    super::artifacts::check_notes(query.notes.as_deref())?;
    let format: ModelFormat = query
        .format
        .as_deref()
        .unwrap_or("onnx")
        .parse()
        .map_err(ApiError::BadRequest)?;
    let (sha256, size) = super::artifacts::store_upload(&fleet, body).await?;
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
    let stored = fleet.store.add_model(&record).await?;
    audit(
        &fleet,
        &op,
        "model.push",
        format!("{}@{}", stored.name, stored.version),
        detail(PushDetail {
            sha256: &stored.sha256,
            size: stored.size,
            format: stored.format,
        }),
    )
    .await;
    tracing::info!(model = %stored.name, version = stored.version, size = stored.size, by = %op.name, "model pushed");
    Ok((StatusCode::CREATED, Json(stored)))
}

/// A pushed version's number: a positive integer.
fn check_version(text: &str) -> ApiResult<u64> {
    text.parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::BadRequest(format!("version {text:?} must be a positive integer")))
}

/// Checks a test vector: every tensor's data matches its shape, and the
/// tolerance is a number >= 0.
fn check_test_vector(tv: &TestVector) -> Result<(), String> {
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
fn check_spec(spec: &ModelSpec) -> Result<(), String> {
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
#[utoipa::path(put, path = "/api/v1/models/{name}/versions/{version}/spec", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), request_body = ModelSpec, responses((status = 200, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "conflicts with what is stored", body = ErrorBody)))]
pub(super) async fn put_spec(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<ModelRecord>> {
    let spec: ModelSpec = parse_body(&body, "malformed spec JSON")?;
    check_spec(&spec).map_err(ApiError::BadRequest)?;
    attach(&fleet, &op, name, version, store::Attachment::Spec(spec)).await
}

/// `PUT .../test-vector`: the input and outputs devices must reproduce.
#[utoipa::path(put, path = "/api/v1/models/{name}/versions/{version}/test-vector", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), request_body = TestVector, responses((status = 200, body = ModelRecord), (status = 400, description = "malformed request", body = ErrorBody), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "conflicts with what is stored", body = ErrorBody)))]
pub(super) async fn put_test_vector(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<ModelRecord>> {
    let tv: TestVector = parse_body(&body, "malformed test vector JSON")?;
    check_test_vector(&tv).map_err(ApiError::BadRequest)?;
    attach(
        &fleet,
        &op,
        name,
        version,
        store::Attachment::TestVector(tv),
    )
    .await
}

/// `DELETE /api/v1/models/{name}/versions/{version}`: removes a version
/// no assignment points at (409 otherwise), and its file unless another
/// version has the same content.
#[utoipa::path(delete, path = "/api/v1/models/{name}/versions/{version}", tag = "models", params(("name" = String, Path, description = "model name"), ("version" = u64, Path, description = "model version")), responses((status = 200, body = ModelRecord), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody), (status = 403, description = "the token's scope is too small", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody), (status = 409, description = "deployed", body = ErrorBody)))]
pub(super) async fn delete_model(
    State(fleet): State<Fleet>,
    Extension(op): Extension<auth::Operator>,
    Path((name, version)): Path<(String, u64)>,
) -> ApiResult<Json<ModelRecord>> {
    let (record, file_still_used) = fleet.store.delete_model(&name, version).await?;
    if !file_still_used {
        fleet.artifacts.remove(&record.sha256).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::documents::TestTensor;

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

    #[test]
    fn specs_need_unique_names_known_datatypes_and_sane_dimensions() {
        let t = |name: &str, datatype: &str, shape: Vec<i64>| edgefleet_shared::TensorSpec {
            name: name.into(),
            datatype: datatype.into(),
            shape,
        };
        let ok = ModelSpec {
            inputs: vec![t("x", "FP32", vec![-1, 28, 28])],
            outputs: vec![t("y", "FP32", vec![-1, 10])],
        };
        assert_eq!(check_spec(&ok), Ok(()));
        assert!(check_spec(&ModelSpec::default())
            .unwrap_err()
            .contains("at least one"));
        let twice = ModelSpec {
            inputs: vec![t("x", "FP32", vec![1]), t("x", "INT8", vec![1])],
            ..ok.clone()
        };
        assert!(check_spec(&twice).unwrap_err().contains("declared twice"));
        let float = ModelSpec {
            outputs: vec![t("y", "FLOAT", vec![1])],
            ..ok.clone()
        };
        assert!(check_spec(&float).unwrap_err().contains("\"FLOAT\""));
        let negative = ModelSpec {
            outputs: vec![t("y", "FP32", vec![-2])],
            ..ok
        };
        assert!(check_spec(&negative).unwrap_err().contains("dimension -2"));
    }

    #[test]
    fn versions_are_positive_integers() {
        assert_eq!(check_version("3").ok(), Some(3));
        for bad in ["0", "-1", "x", ""] {
            let err = check_version(bad).unwrap_err();
            assert!(err.to_string().contains("positive integer"), "{bad}: {err}");
        }
    }
}
