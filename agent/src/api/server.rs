//! The local API's HTTP side: binding the Unix socket, accepting
//! connections on it and on the optional loopback TCP listener, checking
//! that TCP clients are local, routing requests and reading their bodies.
//!
//! A request's body is read in full (bounded in size and time) before it
//! may take an inference permit ([`super::schedule`]), so a client that
//! uploads slowly or stops part-way holds only its own connection. The TCP
//! listener also checks `Host` and `Origin`: a web page in a browser on the
//! device must not reach it through DNS rebinding.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::oip::{self, Decoded, HEADER_LENGTH};
use super::{schedule, ApiError, ApiState};
use crate::registry::ServedModel;
use crate::tensor::Tensor;

/// Why a listener cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot create socket directory {dir}: {source}")]
    CreateDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("another process is already serving on {0}; stop it or choose another api.socket")]
    InUse(std::path::PathBuf),
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set the mode of socket {path} to 0660: {source}")]
    Permissions {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let response = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(oip::to_json_bytes(body))));
    response.expect("a status code and a static content type always make a valid response")
}

fn error_response(e: ApiError) -> Response<Full<Bytes>> {
    json_response(e.status, &json!({ "error": e.message }))
}

/// Binds the Unix socket: removes a stale socket file left by a crash,
/// refuses to steal one another agent is serving on, sets mode 0660.
pub async fn bind_unix(path: &Path) -> Result<UnixListener, BindError> {
    let listener = bind_unix_std(path)?;
    adopt_unix(listener).map_err(|source| BindError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// How long a socket someone still answers on may take to go away before
/// binding gives up on it.
const IN_USE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// [`bind_unix`] without a runtime: the supervisor binds the socket once
/// and hands it to each agent process it starts.
pub fn bind_unix_std(path: &Path) -> Result<std::os::unix::net::UnixListener, BindError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BindError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        // A previous agent that is being killed (its supervisor was, and
        // it follows) still answers for a moment: give it that moment.
        let deadline = std::time::Instant::now() + IN_USE_GRACE;
        while std::os::unix::net::UnixStream::connect(path).is_ok() {
            if std::time::Instant::now() >= deadline {
                return Err(BindError::InUse(path.to_path_buf()));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::fs::remove_file(path).map_err(|source| BindError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|source| BindError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(
            |source| BindError::Permissions {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    Ok(listener)
}

/// Serves on a listening socket bound elsewhere (by the supervisor).
pub fn adopt_unix(listener: std::os::unix::net::UnixListener) -> std::io::Result<UnixListener> {
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Serves connections from a bound Unix listener until `shutdown`.
pub async fn serve_unix(listener: UnixListener, state: ApiState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                // The socket's file mode decides who may connect: no
                // Host/Origin check (a browser cannot reach a Unix socket).
                Ok((stream, _)) => spawn_connection(stream, state.clone(), None, shutdown.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "unix accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves connections from a bound TCP listener until `shutdown`. Only
/// requests naming a loopback host (and no foreign `Origin`) are served:
/// see [`check_local_client`].
pub async fn serve_tcp(listener: TcpListener, state: ApiState, shutdown: CancellationToken) {
    let local = match listener.local_addr() {
        Ok(local) => local,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the TCP listener's address; not serving on it");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_connection(stream, state.clone(), Some(local), shutdown.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves one connection. `tcp_listener` is the address of the TCP
/// listener it came from (`None` for the Unix socket): its requests must
/// pass [`check_local_client`].
fn spawn_connection<S>(
    stream: S,
    state: ApiState,
    tcp_listener: Option<SocketAddr>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connections = state.connections.clone();
    connections.spawn(async move {
        let header_read_timeout = state.header_read_timeout;
        let service = service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move {
                if let Some(listener) = tcp_listener {
                    if let Err(e) = check_local_client(&req, listener) {
                        tracing::warn!(reason = %e.message, "refused a TCP API request");
                        return Ok::<_, Infallible>(error_response(e));
                    }
                }
                Ok(handle(state, req).await)
            }
        });
        // A client that stalls inside its headers is closed without an
        // answer: hyper gives up on the connection before any handler runs.
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            _ = shutdown.cancelled() => {
                // A client whose connection was accepted just before the
                // listener closed may not have been read yet: hyper would
                // close such an idle-looking connection at once, failing
                // its request. Whatever arrives within the drain window is
                // served first.
                let served = tokio::time::timeout(super::DRAIN_WINDOW, conn.as_mut()).await;
                if served.is_err() {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        }
    });
}

/// Refuses a TCP request unless it names a loopback host and, when it
/// carries an `Origin`, comes from a loopback origin. The API has no
/// authentication; a web page on another site that gets its name to
/// resolve to 127.0.0.1 (DNS rebinding) still sends its own name as `Host`
/// and its site as `Origin`, so both are checked. A request naming the
/// listener's own address is also accepted.
pub fn check_local_client<B>(req: &Request<B>, listener: SocketAddr) -> Result<(), ApiError> {
    let forbidden = |message: String| ApiError::new(StatusCode::FORBIDDEN, message);
    let loopback = |host: &str| {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || bare
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || (ip == listener.ip() && !ip.is_unspecified()))
    };
    // An absolute request target (`GET http://name/...`) names the host
    // instead of the Host header; hold it to the same rule.
    if let Some(authority) = req.uri().authority() {
        if !loopback(authority.host()) {
            return Err(forbidden(format!(
                "request target names host {:?}, which is not a loopback address; this API serves only local clients at localhost, 127.0.0.1 or [::1]",
                authority.host()
            )));
        }
    }
    let Some(host) = req.headers().get(http::header::HOST) else {
        return Err(forbidden(format!(
            "the request has no Host header; this API serves only local clients: send Host: {listener}"
        )));
    };
    let host_name = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .map(|a| a.host().to_string());
    match host_name {
        Some(name) if loopback(&name) => {}
        _ => {
            return Err(forbidden(format!(
                "Host {:?} is not a loopback name; this API serves only local clients at localhost, 127.0.0.1 or [::1] (a web page reaching it under another name is refused)",
                String::from_utf8_lossy(host.as_bytes())
            )))
        }
    }
    if let Some(origin) = req.headers().get(http::header::ORIGIN) {
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.parse::<http::Uri>().ok())
            .and_then(|u| u.host().map(str::to_string));
        match origin_host {
            Some(name) if loopback(&name) => {}
            _ => {
                return Err(forbidden(format!(
                    "Origin {:?} is not a loopback origin; this API does not serve web pages from other sites (call it from a local program or through the Unix socket)",
                    String::from_utf8_lossy(origin.as_bytes())
                )))
            }
        }
    }
    Ok(())
}

/// Routes one request.
pub async fn handle(state: ApiState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, ["v2"]) => Ok(json_response(
            StatusCode::OK,
            &json!({"name": "edgefleet-agent", "version": env!("CARGO_PKG_VERSION"), "extensions": []}),
        )),
        (&Method::GET, ["v2", "health", "live"]) => {
            Ok(json_response(StatusCode::OK, &json!({"live": true})))
        }
        (&Method::GET, ["v2", "health", "ready"]) => {
            let ready = !state.registry.all().is_empty();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Ok(json_response(status, &json!({"ready": ready})))
        }
        (_, ["v2", "models", name, rest @ ..]) => {
            model_route(&state, &method, name, rest, req).await
        }
        _ => Err(ApiError::not_found(format!("no route for {method} {path}"))),
    };
    result.unwrap_or_else(error_response)
}

async fn model_route(
    state: &ApiState,
    method: &Method,
    name: &str,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (version, action) = match rest {
        ["versions", v, action @ ..] => (Some(*v), action),
        action => (None, action),
    };
    let model = find_model(state, name, version)?;
    match (method, action) {
        (&Method::GET, []) => Ok(json_response(StatusCode::OK, &oip::metadata(&model))),
        (&Method::GET, ["ready"]) => Ok(json_response(
            StatusCode::OK,
            &json!({"name": model.name, "version": model.version.to_string(), "ready": true}),
        )),
        (&Method::POST, ["infer"]) => infer(state, model, version.is_some(), req).await,
        (&Method::GET, ["stats"]) => Ok(json_response(
            StatusCode::OK,
            &oip::statistics(&model, &state.batching),
        )),
        _ => Err(ApiError::not_found(format!(
            "no route for {method} {}",
            req.uri().path()
        ))),
    }
}

fn find_model(
    state: &ApiState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<ServedModel>, ApiError> {
    let model = state.registry.get(name).ok_or_else(|| {
        let served: Vec<String> = state
            .registry
            .all()
            .iter()
            .map(|m| m.name.clone())
            .collect();
        ApiError::not_found(format!(
            "unknown model {name:?}; served models: [{}]",
            served.join(", ")
        ))
    })?;
    if let Some(v) = version {
        if v != model.version.to_string() {
            // The variant of an A/B split is served under its version too.
            if let Some(b) = model.quality.split().map(|s| s.variant().clone()) {
                if v == b.version.to_string() {
                    return Ok(b);
                }
            }
            return Err(ApiError::not_found(format!(
                "model {name:?} version {v} is not served (serving version {})",
                model.version
            )));
        }
    }
    Ok(model)
}

async fn read_body(state: &ApiState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = state.max_request_bytes;
    if let Some(len) = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body of {len} bytes exceeds the limit of {limit} bytes (api.max_request_bytes)"),
            ));
        }
    }
    let deadline = state.body_read_deadline;
    let collected = tokio::time::timeout(deadline, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} ms; send the whole body without pausing",
                    deadline.as_millis()
                ),
            )
        })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {limit} bytes (api.max_request_bytes)"),
            ))
        }
        Err(e) => Err(ApiError::bad_request(format!(
            "could not read request body: {e}"
        ))),
    }
}

/// Runs one inference request on `model`, or on the variant of its A/B
/// split that the request's client key picks (unless the request named
/// its version: `pinned`).
async fn infer(
    state: &ApiState,
    model: Arc<ServedModel>,
    pinned: bool,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let header_key = req
        .headers()
        .get(crate::registry::quality::split::CLIENT_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let header_len = match req.headers().get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("Inference-Header-Content-Length must be a byte count")
                })?,
        ),
    };
    let body = read_body(state, req).await?;
    let Decoded {
        id,
        inputs,
        wanted,
        binary_by_default,
        client_key,
    } = oip::decode_request(header_len, &body)?;
    drop(body);
    let model = match model.quality.split() {
        Some(split) if !pinned => match split.choose(header_key.or(client_key).as_deref()) {
            edgefleet_shared::quality::Variant::B => split.variant().clone(),
            edgefleet_shared::quality::Variant::A => model,
        },
        _ => model,
    };
    if let Some(wanted) = &wanted {
        for (name, _) in wanted {
            if !model.engine.outputs().iter().any(|o| &o.name == name) {
                let known: Vec<&str> = model
                    .engine
                    .outputs()
                    .iter()
                    .map(|o| o.name.as_str())
                    .collect();
                return Err(ApiError::bad_request(format!(
                    "unknown output {name:?}; the model's outputs are: {}",
                    known.join(", ")
                )));
            }
        }
    }
    let mut observed = model.quality.observe(&inputs);
    let (outputs, elapsed) = schedule::run(state, &model, inputs).await?;
    // More than half the inference permits in use: the device is busy
    // serving, and a shadow run would compete with it.
    let in_use = state
        .max_concurrent
        .saturating_sub(state.permits.available_permits());
    if 2 * in_use > state.max_concurrent {
        observed.drop_shadow();
    }
    crate::registry::quality::ModelQuality::answered(observed, &outputs);
    if let (true, Some(uploads)) = (model.upload_results, &state.uploads) {
        uploads.queue(&model, id.clone(), elapsed, &outputs);
    }
    // The answer is encoded from references: no output is copied before
    // its data is written into the body.
    let selected: Vec<(&Tensor, bool)> = match &wanted {
        None => outputs.iter().map(|t| (t, binary_by_default)).collect(),
        Some(wanted) => wanted
            .iter()
            .filter_map(|(name, binary)| {
                outputs
                    .iter()
                    .find(|t| &t.name == name)
                    .map(|t| (t, *binary))
            })
            .collect(),
    };
    let encoded = oip::encode_response((&model.name, model.version), id.as_deref(), &selected);
    let builder = Response::builder().status(StatusCode::OK);
    let builder = match encoded.json_len {
        None => builder.header(http::header::CONTENT_TYPE, "application/json"),
        Some(json_len) => builder
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .header(HEADER_LENGTH, json_len),
    };
    let response = builder.body(Full::new(Bytes::from(encoded.body)));
    Ok(response.expect("a status code and well-formed headers always make a valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_and_origins_pass_the_tcp_check() {
        let listener: SocketAddr = "127.0.0.1:8500".parse().unwrap();
        let check = |host: Option<&str>, origin: Option<&str>| {
            let mut req = Request::builder().uri("/v2");
            if let Some(host) = host {
                req = req.header(http::header::HOST, host);
            }
            if let Some(origin) = origin {
                req = req.header(http::header::ORIGIN, origin);
            }
            check_local_client(&req.body(()).unwrap(), listener)
        };
        for host in [
            "localhost",
            "LOCALHOST:8500",
            "127.0.0.1",
            "127.0.0.1:8500",
            "[::1]",
            "[::1]:8500",
        ] {
            assert!(check(Some(host), None).is_ok(), "{host}");
        }
        for origin in [
            "http://localhost:3000",
            "http://127.0.0.1:8500",
            "https://[::1]",
        ] {
            assert!(
                check(Some("127.0.0.1:8500"), Some(origin)).is_ok(),
                "{origin}"
            );
        }
        for host in [
            "evil.example",
            "evil.example:8500",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8500",
            "10.0.0.5:8500",
        ] {
            let err = check(Some(host), None).unwrap_err();
            assert_eq!(err.status, StatusCode::FORBIDDEN);
            assert!(err.message.contains(host), "{}", err.message);
        }
        let err = check(None, None).unwrap_err();
        assert!(err.message.contains("no Host header"), "{}", err.message);
        for origin in ["http://evil.example", "http://evil.example:8500", "null"] {
            let err = check(Some("127.0.0.1:8500"), Some(origin)).unwrap_err();
            assert_eq!(err.status, StatusCode::FORBIDDEN);
            assert!(
                err.message.contains("Origin") && err.message.contains(origin),
                "{}",
                err.message
            );
        }
        // An absolute request target is held to the same rule as Host.
        let req = Request::builder()
            .uri("http://evil.example/v2")
            .header(http::header::HOST, "127.0.0.1")
            .body(())
            .unwrap();
        assert!(check_local_client(&req, listener).is_err());
    }
}
