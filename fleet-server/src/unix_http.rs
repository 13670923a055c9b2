//! A minimal HTTP/1.1 client for an agent's Unix socket (the demo and the
//! end-to-end tests use it; `curl --unix-socket` does the same by hand).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Why a request to an agent's socket got no answer.
#[derive(Debug, thiserror::Error)]
pub enum UnixHttpError {
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP over {}: {source}", socket.display())]
    Http {
        socket: PathBuf,
        source: hyper::Error,
    },
    #[error("bad request {path}: {reason}")]
    Request { path: String, reason: String },
    #[error("agent sent invalid JSON: {0}")]
    Json(serde_json::Error),
}

/// Sends one request and returns the status and the body parsed as JSON.
pub async fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(http::StatusCode, serde_json::Value), UnixHttpError> {
    let http = |source| UnixHttpError::Http {
        socket: socket.to_path_buf(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| UnixHttpError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let bytes = body
        .map(|b| serde_json::to_vec(b).expect("a JSON value always serialises"))
        .unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "agent")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| UnixHttpError::Request {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
    let response = sender.send_request(req).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    let json = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).map_err(UnixHttpError::Json)?
    };
    Ok((status, json))
}
