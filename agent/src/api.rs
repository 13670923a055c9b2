//! The local inference API: Open Inference Protocol v2 (KServe / Triton)
//! JSON over HTTP/1.1, on a Unix socket and optionally a loopback TCP port,
//! both served by the same router.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v2` | server metadata |
//! | GET | `/v2/health/live` | 200 while the process runs |
//! | GET | `/v2/health/ready` | 200 when at least one model is served |
//! | GET | `/v2/models/{m}[/versions/{v}]` | model metadata |
//! | GET | `/v2/models/{m}[/versions/{v}]/ready` | model readiness |
//! | POST | `/v2/models/{m}[/versions/{v}]/infer` | inference |
//! | GET | `/v2/models/{m}[/versions/{v}]/stats` | counts and latency percentiles |
//!
//! Every error is `{"error": "..."}` with a message naming the problem.
//!
//! A request's body is read in full (bounded in size and time) before it
//! may take one of the `api.max_concurrent_requests` inference permits, so
//! a client that uploads slowly or stops part-way holds only its own
//! connection. The TCP listener also checks `Host` and `Origin`: a web page
//! in a browser on the device must not reach it through DNS rebinding.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::engine::{self, IoSpec};
use crate::registry::{ModelRegistry, Placement, ServedModel};
use crate::tensor::{DataType, Tensor, TensorData};

/// How long a client may take to send a request's headers. Local clients
/// send them in one write; a connection still short of a complete header
/// after this long is stuck or hostile, and each one holds a socket and a
/// task. hyper counts an idle keep-alive connection's wait for its next
/// request against the same limit, so idle connections close after this
/// long too (clients reconnect).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's whole body. The body is
/// read before an inference permit is taken, so a slow sender no longer
/// blocks other requests, but it still holds a connection, a task and up
/// to `api.max_request_bytes` of memory; 30 s moves the default 16 MiB
/// limit even over a slow local link, and cuts off a client that stopped.
pub const BODY_READ_DEADLINE: Duration = Duration::from_secs(30);

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    pub registry: ModelRegistry,
    pub max_request_bytes: usize,
    pub permits: Arc<Semaphore>,
    pub max_concurrent: usize,
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers
    /// ([`HEADER_READ_TIMEOUT`]).
    pub header_read_timeout: Duration,
    /// Longest a client may take to send a request's whole body
    /// ([`BODY_READ_DEADLINE`]).
    pub body_read_deadline: Duration,
    /// Where results of models with `upload_results` go (fleet mode).
    pub uploads: Option<Uploads>,
}

/// The outbox and device id for uploaded inference results.
#[derive(Clone, Debug)]
pub struct Uploads {
    pub device: edgefleet_shared::DeviceId,
    pub outbox: crate::outbox::OutboxHandle,
}

impl ApiState {
    pub fn new(registry: ModelRegistry, limits: &crate::config::ApiConfig) -> Self {
        Self {
            registry,
            max_request_bytes: limits.max_request_bytes,
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            max_concurrent: limits.max_concurrent_requests,
            request_timeout: Duration::from_millis(limits.request_timeout_ms),
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_deadline: BODY_READ_DEADLINE,
            uploads: None,
        }
    }
}

/// An API error: status plus a message for the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("json serialises"),
        )))
        .expect("response builds")
}

fn error_response(e: ApiError) -> Response<Full<Bytes>> {
    json_response(e.status, &json!({ "error": e.message }))
}

/// Binds the Unix socket: removes a stale socket file left by a crash,
/// refuses to steal one another agent is serving on, sets mode 0660.
pub async fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create socket directory {}: {e}", dir.display())
        })?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another process is already serving on {}; stop it or choose another api.socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .map_err(|e| anyhow::anyhow!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok(listener)
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
    tokio::spawn(async move {
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
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
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
        (&Method::GET, []) => Ok(json_response(StatusCode::OK, &metadata(&model))),
        (&Method::GET, ["ready"]) => Ok(json_response(
            StatusCode::OK,
            &json!({"name": model.name, "version": model.version.to_string(), "ready": true}),
        )),
        (&Method::POST, ["infer"]) => infer(state, model, req).await,
        (&Method::GET, ["stats"]) => Ok(json_response(StatusCode::OK, &statistics(&model))),
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
            return Err(ApiError::not_found(format!(
                "model {name:?} version {v} is not served (serving version {})",
                model.version
            )));
        }
    }
    Ok(model)
}

fn spec_json(spec: &IoSpec) -> Value {
    json!({"name": spec.name, "datatype": spec.datatype.as_str(), "shape": spec.oip_shape()})
}

fn metadata(model: &ServedModel) -> Value {
    json!({
        "name": model.name,
        "versions": [model.version.to_string()],
        "platform": format!("{}_{}", model.format, model.engine.runtime()),
        "inputs": model.engine.inputs().iter().map(spec_json).collect::<Vec<_>>(),
        "outputs": model.engine.outputs().iter().map(spec_json).collect::<Vec<_>>(),
        "parameters": {
            "runtime": model.engine.runtime(),
            "sha256": model.sha256,
            "runtime_trials": model.trials.iter().map(crate::engine::Trial::to_json).collect::<Vec<_>>(),
        },
    })
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

/// Triton's statistics extension (`GET /v2/models/{m}/stats`), with the
/// agent's latency percentiles added.
fn statistics(model: &ServedModel) -> Value {
    let s = model.stats.snapshot();
    json!({"model_stats": [{
        "name": model.name,
        "version": model.version.to_string(),
        "inference_count": s.successes,
        "execution_count": s.successes,
        "inference_stats": {
            "success": {"count": s.successes, "ns": s.success_nanos},
            "fail": {"count": s.failures, "ns": 0},
        },
        "latency_us": {"p50": s.p50_us, "p90": s.p90_us, "p99": s.p99_us},
        "runtime": model.engine.runtime(),
    }]})
}

#[derive(Deserialize, Default)]
struct RequestParameters {
    binary_data_output: Option<bool>,
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Option<RequestParameters>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize, Default)]
struct InputParameters {
    binary_data_size: Option<usize>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    #[serde(default)]
    parameters: Option<InputParameters>,
    /// Kept as text and decoded once the datatype is known, straight into
    /// typed elements (no JSON tree for large tensors).
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Deserialize, Default)]
struct OutputParameters {
    binary_data: Option<bool>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Option<OutputParameters>,
}

/// A decoded request: its id, input tensors and the outputs asked for
/// (`None`: all), each with whether to return it as binary.
#[derive(Debug)]
struct Decoded {
    id: Option<String>,
    inputs: Vec<Tensor>,
    wanted: Option<Vec<(String, bool)>>,
    binary_by_default: bool,
}

/// Name of the header that splits a binary-extension body into its JSON
/// part and the raw tensor bytes that follow.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Splits the body per the binary tensor extension and decodes every input.
fn decode_request(header_len: Option<usize>, body: &[u8]) -> Result<Decoded, ApiError> {
    let (json_part, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(ApiError::bad_request(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let request: InferRequest = serde_json::from_slice(json_part)
        .map_err(|e| ApiError::bad_request(format!("malformed inference request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let datatype: DataType = input
            .datatype
            .parse()
            .map_err(|e: String| ApiError::bad_request(format!("input {:?}: {e}", input.name)))?;
        let binary_size = input.parameters.and_then(|p| p.binary_data_size);
        let data = match (binary_size, &input.data) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(format!(
                    "input {:?} has both \"data\" and binary_data_size; send one",
                    input.name
                )))
            }
            (Some(size), None) => {
                if size > binary.len() {
                    return Err(ApiError::bad_request(format!(
                        "input {:?} declares binary_data_size {size} but only {} binary bytes remain (truncated body?)",
                        input.name,
                        binary.len()
                    )));
                }
                let (chunk, rest) = binary.split_at(size);
                binary = rest;
                TensorData::from_le_bytes(datatype, chunk)
                    .map_err(|e| ApiError::bad_request(format!("input {:?}: {e}", input.name)))?
            }
            (None, Some(data)) => TensorData::from_json_text(&input.name, datatype, data.get())
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
            (None, None) => {
                return Err(ApiError::bad_request(format!(
                    "input {:?} has neither \"data\" nor parameters.binary_data_size",
                    input.name
                )))
            }
        };
        inputs.push(Tensor {
            name: input.name,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} bytes of binary data follow the inputs that no input's binary_data_size accounts for",
            binary.len()
        )));
    }
    let binary_by_default = request
        .parameters
        .and_then(|p| p.binary_data_output)
        .unwrap_or(false);
    let wanted = request.outputs.map(|outputs| {
        outputs
            .into_iter()
            .map(|o| {
                let binary = o
                    .parameters
                    .and_then(|p| p.binary_data)
                    .unwrap_or(binary_by_default);
                (o.name, binary)
            })
            .collect()
    });
    Ok(Decoded {
        id: request.id,
        inputs,
        wanted,
        binary_by_default,
    })
}

/// Builds the response: plain JSON, or JSON followed by raw tensors when
/// any output is returned as binary.
fn encode_response(
    model: &ServedModel,
    id: Option<String>,
    outputs: Vec<(Tensor, bool)>,
) -> Response<Full<Bytes>> {
    let mut binary = Vec::new();
    let outputs: Vec<Value> = outputs
        .into_iter()
        .map(|(t, as_binary)| {
            let mut out = json!({
                "name": t.name,
                "datatype": t.data.datatype().as_str(),
                "shape": t.shape,
            });
            if as_binary {
                let bytes = t.data.to_le_bytes();
                out["parameters"] = json!({"binary_data_size": bytes.len()});
                binary.extend_from_slice(&bytes);
            } else {
                out["data"] = t.data.to_json();
            }
            out
        })
        .collect();
    let mut body = json!({
        "model_name": model.name,
        "model_version": model.version.to_string(),
        "outputs": outputs,
    });
    if let Some(id) = id {
        body["id"] = Value::String(id);
    }
    let mut bytes = serde_json::to_vec(&body).expect("json serialises");
    let builder = Response::builder().status(StatusCode::OK);
    let builder = if binary.is_empty() {
        builder.header(http::header::CONTENT_TYPE, "application/json")
    } else {
        let json_len = bytes.len();
        bytes.extend_from_slice(&binary);
        builder
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .header(HEADER_LENGTH, json_len)
    };
    builder
        .body(Full::new(Bytes::from(bytes)))
        .expect("response builds")
}

/// Queues one inference result for upload through the outbox.
fn queue_result(
    uploads: &Uploads,
    model: &ServedModel,
    request_id: Option<String>,
    latency: Duration,
    outputs: &[Tensor],
) {
    let mut result = edgefleet_shared::InferenceResult {
        schema: edgefleet_shared::SCHEMA_VERSION,
        device_id: uploads.device.clone(),
        seq: 0,
        at: edgefleet_shared::unix_now(),
        model: model.name.clone(),
        model_version: model.version,
        runtime: model.engine.runtime().to_string(),
        request_id,
        latency_us: latency.as_micros() as u64,
        outputs: Value::Array(
            outputs
                .iter()
                .map(|t| {
                    json!({
                        "name": t.name,
                        "datatype": t.data.datatype().as_str(),
                        "shape": t.shape,
                        "data": t.data.to_json(),
                    })
                })
                .collect(),
        ),
    };
    uploads.outbox.push(crate::outbox::Stream::Results, |seq| {
        result.seq = seq;
        serde_json::to_vec(&result).expect("results serialize")
    });
}

/// Largest request (in tensor elements) a directly-run model serves on
/// the worker itself; larger ones go through `block_in_place`.
const DIRECT_MAX_ELEMENTS: usize = 16 * 1024;

async fn infer(
    state: &ApiState,
    model: Arc<ServedModel>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
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
    } = decode_request(header_len, &body)?;
    drop(body);
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
    // Taken only now, with the whole request in hand: a permit stands for
    // inference work, never for waiting on a client.
    let permit = state.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many concurrent requests (limit {}, api.max_concurrent_requests); retry shortly",
                state.max_concurrent
            ),
        )
    })?;
    let started = Instant::now();
    // A fast model given a far larger input than it was timed on could
    // hold the worker for long: only small requests run directly.
    let elements: usize = inputs.iter().map(|t| t.data.len()).sum();
    let placement = match model.placement() {
        Placement::Direct if elements > DIRECT_MAX_ELEMENTS => Placement::InPlace,
        other => other,
    };
    let result = if placement == Placement::Direct {
        let result = engine::infer(model.engine.as_ref(), inputs);
        drop(permit);
        result
    } else if placement == Placement::InPlace {
        // Sub-millisecond models: no thread hand-off (block_in_place lets
        // another thread take over this worker's queue meanwhile).
        let result = tokio::task::block_in_place(|| engine::infer(model.engine.as_ref(), inputs));
        drop(permit);
        result
    } else {
        let worker_model = Arc::clone(&model);
        // The permit travels with the work: a request that times out still
        // holds its slot until the runtime actually finishes.
        let work = tokio::task::spawn_blocking(move || {
            let result = engine::infer(worker_model.engine.as_ref(), inputs);
            drop(permit);
            result
        });
        match tokio::time::timeout(state.request_timeout, work).await {
            Err(_) => {
                model.stats.record_failure();
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "inference took longer than {} ms (api.request_timeout_ms)",
                        state.request_timeout.as_millis()
                    ),
                ));
            }
            Ok(joined) => joined.map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("inference task failed: {e}"),
                )
            })?,
        }
    };
    let elapsed = started.elapsed();
    let outputs = result.map_err(|e| {
        model.stats.record_failure();
        let status = if e.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, e.to_string())
    })?;
    model.stats.record_success(elapsed);
    if let (true, Some(uploads)) = (model.upload_results, &state.uploads) {
        queue_result(uploads, &model, id.clone(), elapsed, &outputs);
    }
    let selected: Vec<(Tensor, bool)> = match &wanted {
        None => outputs
            .into_iter()
            .map(|t| (t, binary_by_default))
            .collect(),
        Some(wanted) => wanted
            .iter()
            .filter_map(|(name, binary)| {
                outputs
                    .iter()
                    .find(|t| &t.name == name)
                    .map(|t| (t.clone(), *binary))
            })
            .collect(),
    };
    Ok(encode_response(&model, id, selected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_body(json: &Value, tensors: &[&[u8]]) -> (usize, Vec<u8>) {
        let mut body = serde_json::to_vec(json).unwrap();
        let len = body.len();
        for t in tensors {
            body.extend_from_slice(t);
        }
        (len, body)
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn binary_inputs_are_split_in_order_and_mixed_with_json() {
        let a = f32_bytes(&[1.0, 2.0]);
        let b = [7u8, 8, 9];
        let json = json!({"inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
            {"name": "j", "shape": [1], "datatype": "INT64", "data": [5]},
            {"name": "b", "shape": [3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}}
        ], "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}]});
        let (len, body) = binary_body(&json, &[&a, &b]);
        let d = decode_request(Some(len), &body).unwrap();
        assert_eq!(d.inputs[0].data, TensorData::Fp32(vec![1.0, 2.0]));
        assert_eq!(d.inputs[1].data, TensorData::Int64(vec![5]));
        assert_eq!(d.inputs[2].data, TensorData::Uint8(vec![7, 8, 9]));
        assert_eq!(
            d.wanted.unwrap(),
            vec![("y".to_string(), true), ("z".to_string(), false)]
        );
    }

    #[test]
    fn truncated_or_padded_binary_bodies_are_refused_with_a_reason() {
        let json = json!({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]});
        let (len, body) = binary_body(&json, &[&[0u8; 5]]);
        let err = decode_request(Some(len), &body).unwrap_err();
        assert!(
            err.message.contains("only 5 binary bytes remain"),
            "{}",
            err.message
        );
        let (len, body) = binary_body(&json, &[&[0u8; 12]]);
        let err = decode_request(Some(len), &body).unwrap_err();
        assert!(
            err.message.contains("4 bytes of binary data"),
            "{}",
            err.message
        );
        let err = decode_request(Some(body.len() + 1), &body).unwrap_err();
        assert!(
            err.message.contains("Inference-Header-Content-Length"),
            "{}",
            err.message
        );
        let json = json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}, "data": [1]}]});
        let (len, body) = binary_body(&json, &[&[0u8; 4]]);
        assert!(decode_request(Some(len), &body)
            .unwrap_err()
            .message
            .contains("both"));
        let json = json!({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]});
        let (len, body) = binary_body(&json, &[]);
        assert!(decode_request(Some(len), &body)
            .unwrap_err()
            .message
            .contains("neither"));
    }

    #[test]
    fn request_level_binary_output_applies_to_every_output() {
        let json = json!({"inputs": [], "parameters": {"binary_data_output": true}});
        let d = decode_request(None, &serde_json::to_vec(&json).unwrap()).unwrap();
        assert!(d.binary_by_default && d.wanted.is_none());
    }

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

    /// Component tests over real sockets.
    mod sockets {
        use super::*;
        use crate::engine::{EngineError, Selection};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpStream, UnixStream};

        /// y = x: the cheapest model, yet each request needs a permit.
        struct Echo {
            inputs: Vec<IoSpec>,
            outputs: Vec<IoSpec>,
        }

        impl engine::Engine for Echo {
            fn runtime(&self) -> &'static str {
                "echo"
            }
            fn inputs(&self) -> &[IoSpec] {
                &self.inputs
            }
            fn outputs(&self) -> &[IoSpec] {
                &self.outputs
            }
            fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
                let x = inputs.into_iter().next().expect("validated");
                Ok(vec![Tensor {
                    name: "y".into(),
                    ..x
                }])
            }
        }

        fn state(max_concurrent: usize) -> ApiState {
            let spec = |name: &str| IoSpec {
                name: name.into(),
                datatype: DataType::Fp32,
                shape: vec![None],
            };
            let registry = ModelRegistry::default();
            registry.insert(ServedModel::new(
                "echo".into(),
                1,
                "0".repeat(64),
                edgefleet_shared::ModelFormat::Onnx,
                Selection {
                    engine: Box::new(Echo {
                        inputs: vec![spec("x")],
                        outputs: vec![spec("y")],
                    }),
                    trials: Vec::new(),
                },
            ));
            ApiState::new(
                registry,
                &crate::config::ApiConfig {
                    max_concurrent_requests: max_concurrent,
                    ..Default::default()
                },
            )
        }

        async fn start_tcp(state: ApiState) -> (SocketAddr, CancellationToken) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            tokio::spawn(serve_tcp(listener, state, shutdown.clone()));
            (addr, shutdown)
        }

        async fn start_unix(
            state: ApiState,
        ) -> (tempfile::TempDir, std::path::PathBuf, CancellationToken) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("api.sock");
            let listener = bind_unix(&path).await.unwrap();
            let shutdown = CancellationToken::new();
            tokio::spawn(serve_unix(listener, state, shutdown.clone()));
            (dir, path, shutdown)
        }

        const INFER_BODY: &str =
            r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}"#;

        /// A whole HTTP/1.1 request that asks the server to close after
        /// answering, so the answer is everything up to EOF.
        fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
            let mut text = format!("{method} {path} HTTP/1.1\r\n");
            for (name, value) in headers {
                text.push_str(&format!("{name}: {value}\r\n"));
            }
            text.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ));
            text.into_bytes()
        }

        /// Sends `request` and returns the answer's status and body.
        async fn exchange<S>(mut stream: S, request: &[u8]) -> (u16, String)
        where
            S: AsyncRead + AsyncWrite + Unpin,
        {
            stream.write_all(request).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            parse_response(&raw)
        }

        fn parse_response(raw: &[u8]) -> (u16, String) {
            let text = String::from_utf8_lossy(raw);
            let status = text
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
            (status, body.unwrap_or_default())
        }

        /// Headers and the first bytes of a body that never arrives whole.
        const SLOW_UPLOAD: &[u8] = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: localhost\r\n\
            Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\": [";

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn slow_uploads_do_not_hold_the_inference_permits() {
            let (_dir, path, shutdown) = start_unix(state(2)).await;
            let mut slow = Vec::new();
            for _ in 0..6 {
                let mut stream = UnixStream::connect(&path).await.unwrap();
                stream.write_all(SLOW_UPLOAD).await.unwrap();
                slow.push(stream);
            }
            // Time for the server to accept them and start on their bodies.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let started = Instant::now();
            let stream = UnixStream::connect(&path).await.unwrap();
            let infer = request(
                "POST",
                "/v2/models/echo/infer",
                &[("Host", "localhost")],
                INFER_BODY,
            );
            let (status, body) =
                tokio::time::timeout(Duration::from_secs(5), exchange(stream, &infer))
                    .await
                    .expect("inference answered while slow uploads are pending");
            assert_eq!(status, 200, "{body}");
            assert!(started.elapsed() < Duration::from_secs(2));
            let answer: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(answer["outputs"][0]["data"], json!([1.0, 2.0]));
            // The slow clients are still connected, unanswered.
            for stream in &slow {
                let mut buf = [0u8; 64];
                let read = stream.try_read(&mut buf);
                assert!(
                    matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                    "{read:?}"
                );
            }
            shutdown.cancel();
        }

        #[tokio::test]
        async fn a_client_that_stops_mid_body_gets_408_and_is_disconnected() {
            let mut state = state(2);
            state.body_read_deadline = Duration::from_millis(300);
            let (_dir, path, shutdown) = start_unix(state).await;
            let mut stream = UnixStream::connect(&path).await.unwrap();
            stream.write_all(SLOW_UPLOAD).await.unwrap();
            let started = Instant::now();
            let mut raw = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
                .await
                .expect("the server cut the stalled client off")
                .unwrap();
            assert!(started.elapsed() >= Duration::from_millis(300));
            let (status, body) = parse_response(&raw);
            assert_eq!(status, 408, "{body}");
            let error: Value = serde_json::from_str(&body).unwrap();
            let message = error["error"].as_str().unwrap();
            assert!(
                message.contains("request body not received within 300 ms"),
                "{message}"
            );
            shutdown.cancel();
        }

        #[tokio::test]
        async fn a_client_that_never_finishes_its_headers_is_disconnected() {
            let mut state = state(2);
            state.header_read_timeout = Duration::from_millis(300);
            let (addr, shutdown) = start_tcp(state).await;
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .await
                .unwrap();
            let started = Instant::now();
            let mut raw = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
                .await
                .expect("the server closed the connection");
            assert!(started.elapsed() >= Duration::from_millis(300));
            // Closed without an answer (hyper cannot answer a half-read head).
            assert!(
                matches!(&closed, Ok(0))
                    || matches!(&closed, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "{closed:?} {raw:?}"
            );
            shutdown.cancel();
        }

        async fn tcp_get(addr: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
            let stream = TcpStream::connect(addr).await.unwrap();
            let get = request("GET", "/v2/health/live", headers, "");
            tokio::time::timeout(Duration::from_secs(5), exchange(stream, &get))
                .await
                .expect("answered")
        }

        #[tokio::test]
        async fn the_tcp_api_refuses_foreign_hosts_and_origins() {
            let (addr, shutdown) = start_tcp(state(2)).await;
            let port = addr.port();
            for host in [format!("evil.example:{port}"), "attacker.test".to_string()] {
                let (status, body) = tcp_get(addr, &[("Host", &host)]).await;
                assert_eq!(status, 403, "{body}");
                let error: Value = serde_json::from_str(&body).unwrap();
                let message = error["error"].as_str().unwrap();
                assert!(message.contains(&format!("Host {host:?}")), "{message}");
            }
            let own = addr.to_string();
            for origin in ["http://evil.example", "null"] {
                let (status, body) = tcp_get(addr, &[("Host", &own), ("Origin", origin)]).await;
                assert_eq!(status, 403, "{body}");
                let error: Value = serde_json::from_str(&body).unwrap();
                let message = error["error"].as_str().unwrap();
                assert!(message.contains(&format!("Origin {origin:?}")), "{message}");
            }
            shutdown.cancel();
        }

        #[tokio::test]
        async fn local_clients_are_served_on_tcp_and_the_unix_socket_is_unchecked() {
            let (addr, shutdown) = start_tcp(state(2)).await;
            let port = addr.port();
            // What curl sends: Host 127.0.0.1:PORT, no Origin.
            let curl_host = format!("127.0.0.1:{port}");
            let (status, body) = tcp_get(addr, &[("Host", &curl_host)]).await;
            assert_eq!(status, 200, "{body}");
            for host in ["localhost", &format!("localhost:{port}"), "[::1]"] {
                let (status, body) = tcp_get(addr, &[("Host", host)]).await;
                assert_eq!(status, 200, "{host}: {body}");
            }
            let (status, body) = tcp_get(
                addr,
                &[("Host", &curl_host), ("Origin", "http://localhost:3000")],
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let stream = TcpStream::connect(addr).await.unwrap();
            let infer = request(
                "POST",
                "/v2/models/echo/infer",
                &[("Host", &curl_host)],
                INFER_BODY,
            );
            let (status, body) = exchange(stream, &infer).await;
            assert_eq!(status, 200, "{body}");
            shutdown.cancel();

            // The Unix socket is guarded by its file mode, not by names.
            let (_dir, path, shutdown) = start_unix(state(2)).await;
            let stream = UnixStream::connect(&path).await.unwrap();
            let get = request(
                "GET",
                "/v2/health/live",
                &[("Host", "evil.example"), ("Origin", "http://evil.example")],
                "",
            );
            let (status, body) = exchange(stream, &get).await;
            assert_eq!(status, 200, "{body}");
            shutdown.cancel();
        }
    }
}
