//! `GET /artifacts/{sha256}`: the content-addressed model files devices
//! download, with a single-range `Range` (so an interrupted download
//! resumes), `If-Range` and `If-None-Match` against the ETag (the name),
//! plus the compressed copy under `{sha256}.zst`; the same from either
//! artifact storage.

use super::types::ErrorBody;
use super::{ApiError, ApiResult};
use crate::artifacts::{self, parse_range, ArtifactError, ByteRange, Kind};
use crate::fleet::Fleet;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

/// Refuses a push's notes longer than 1,000 characters.
pub(super) fn check_notes(notes: Option<&str>) -> ApiResult<()> {
    if notes.is_some_and(|n| n.chars().count() > 1000) {
        return Err(ApiError::BadRequest(
            "notes are at most 1,000 characters".into(),
        ));
    }
    Ok(())
}

/// Streams a pushed file (a model, an agent executable) into the artifact
/// store, capped at `max_upload_bytes`, and stores its compressed copy;
/// returns its sha256 and size. Without a compressed copy devices
/// download the plain file.
pub(super) async fn store_upload(fleet: &Fleet, body: Body) -> ApiResult<(String, u64)> {
    let (sha256, size) = fleet
        .artifacts
        .put(body.into_data_stream(), fleet.max_upload_bytes)
        .await?;
    match fleet.artifacts.compress(&sha256).await {
        Ok(Some(packed)) => {
            tracing::info!(sha256 = %sha256, size, packed, "compressed copy stored")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot store a compressed copy"),
    }
    Ok((sha256, size))
}

/// Serves an artifact, honouring a single-range `Range` header, and
/// `If-Range` and `If-None-Match` against the artifact's ETag (its name).
#[utoipa::path(get, path = "/artifacts/{name}", tag = "server", security(()), params(("name" = String, Path, description = "sha256, or sha256.zst")), responses((status = 200, description = "the artifact", content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "a range of it", content_type = "application/octet-stream", body = Vec<u8>), (status = 304, description = "If-None-Match names it: unchanged"), (status = 404, description = "not found", body = ErrorBody), (status = 416, description = "unsatisfiable range", body = ErrorBody)))]
pub(super) async fn download_artifact(
    State(fleet): State<Fleet>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (sha256, kind) = match name.strip_suffix(".zst") {
        Some(sha256) => (sha256, Kind::Zst),
        None => (name.as_str(), Kind::Plain),
    };
    if !artifacts::valid_name(sha256) {
        return Err(ApiError::BadRequest(format!(
            "artifact name {name:?}: artifact names are 64 lowercase hex characters, with .zst for the compressed copy"
        )));
    }
    let read_error = |e: ArtifactError| ApiError::Internal(format!("reading artifact {name}: {e}"));
    let artifact = fleet
        .artifacts
        .open_artifact(sha256, kind)
        .await
        .map_err(read_error)?
        .ok_or_else(|| ApiError::NotFound(format!("no artifact {name}")))?;
    let len = artifact.size();
    let etag = format!("\"{name}\"");
    // The content never changes under its name: a cached copy is current.
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| matches!(t.trim(), "*") || t.trim() == etag)
        });
    if cached {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::ETAG, &etag)
            .body(Body::empty())
            .map_err(|e| ApiError::Internal(format!("answering for artifact {name}: {e}")));
    }
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
    let response = match range {
        None => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from_stream(
                artifact.read(0, len).await.map_err(read_error)?,
            )),
        Some(ByteRange::Unsatisfiable) => builder
            .status(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{len}"))
            .body(Body::empty()),
        Some(ByteRange::Satisfiable { start, end }) => {
            let count = end - start + 1;
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, count)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .body(Body::from_stream(
                    artifact.read(start, count).await.map_err(read_error)?,
                ))
        }
    };
    response.map_err(|e| ApiError::Internal(format!("answering for artifact {name}: {e}")))
}
