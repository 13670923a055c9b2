//! `GET /artifacts/{sha256}`: the content-addressed model files devices
//! download, with a single-range `Range` (so an interrupted download
//! resumes) and `If-Range` against the ETag (the sha256), plus the
//! compressed copy under `{sha256}.zst`.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::types::ErrorBody;
use super::{ApiError, ApiResult};
use crate::artifacts::{parse_range, ByteRange};
use crate::fleet::Fleet;

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

/// Serves an artifact, honouring a single-range `Range` header and
/// `If-Range` against the artifact's ETag (its sha256).
#[utoipa::path(get, path = "/artifacts/{name}", tag = "server", security(()), params(("name" = String, Path, description = "sha256, or sha256.zst")), responses((status = 200, description = "the artifact", content_type = "application/octet-stream", body = Vec<u8>), (status = 206, description = "a range of it", content_type = "application/octet-stream", body = Vec<u8>), (status = 404, description = "not found", body = ErrorBody), (status = 416, description = "unsatisfiable range", body = ErrorBody)))]
pub(super) async fn download_artifact(
    State(fleet): State<Fleet>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let path = match name.strip_suffix(".zst") {
        Some(sha256) => fleet.artifacts.zst_path(sha256),
        None => fleet.artifacts.path(&name),
    }
    .ok_or_else(|| {
        ApiError::BadRequest(format!(
            "artifact name {name:?}: artifact names are 64 lowercase hex characters, with .zst for the compressed copy"
        ))
    })?;
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::NotFound(format!("no artifact {name}")))?;
    let io =
        |e: std::io::Error| ApiError::Internal(format!("reading artifact {}: {e}", path.display()));
    let len = file.metadata().await.map_err(io)?.len();
    let etag = format!("\"{name}\"");
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
    response.map_err(|e| ApiError::Internal(format!("answering for artifact {name}: {e}")))
}
