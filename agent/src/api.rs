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

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::engine::{self, IoSpec};
use crate::registry::{ModelRegistry, Placement, ServedModel};
use crate::tensor::{DataType, Tensor, TensorData};

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    pub registry: ModelRegistry,
    pub max_request_bytes: usize,
    pub permits: Arc<Semaphore>,
    pub max_concurrent: usize,
    pub request_timeout: Duration,
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
                Ok((stream, _)) => spawn_connection(stream, state.clone(), shutdown.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "unix accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves connections from a bound TCP listener until `shutdown`.
pub async fn serve_tcp(listener: TcpListener, state: ApiState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    spawn_connection(stream, state.clone(), shutdown.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn spawn_connection<S>(stream: S, state: ApiState, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(state, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
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
    match Limited::new(req.into_body(), limit).collect().await {
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
    let permit = state.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many concurrent requests (limit {}, api.max_concurrent_requests); retry shortly",
                state.max_concurrent
            ),
        )
    })?;
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
}
