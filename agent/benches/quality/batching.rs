//! Dynamic batching: throughput and latency at 1, 4 and 16 concurrent
//! clients, batched and not, on PP-OCR's direction classifier and the
//! openWakeWord embedding, in every runtime that loads them with a
//! dynamic batch dimension.
//!
//! The agent's API (its real router, schedule and batch queue) serves a
//! Unix socket from its own two-worker runtime, as `edgefleet-agent`
//! does; the clients run on another runtime in the same process, each on
//! its own kept-alive connection, sending binary tensors back to back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgefleet_agent::api::batch::{Batching, BatchingConfig};
use edgefleet_agent::api::{bind_unix, serve_unix, ApiState};
use edgefleet_agent::config::{ApiConfig, RuntimeConfig};
use edgefleet_agent::engine::{runtimes, Check};
use edgefleet_agent::registry::{ModelRegistry, ServedModel};
use edgefleet_shared::{ModelFormat, TensorSpec};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// How long each configuration is measured.
const WINDOW: Duration = Duration::from_secs(3);
const CLIENTS: [usize; 3] = [1, 4, 16];

struct Case {
    label: &'static str,
    path: PathBuf,
    input: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn cases() -> Vec<Case> {
    let Some(dir) = std::env::var_os("EDGEFLEET_TEST_MODELS").map(PathBuf::from) else {
        eprintln!("EDGEFLEET_TEST_MODELS not set: nothing to measure");
        return Vec::new();
    };
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    [
        ("ppocr_cls.onnx", "ppocr_cls"),
        ("oww_embedding.onnx", "oww_embedding"),
    ]
    .into_iter()
    .map(|(file, label)| {
        let m = manifest["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["file"] == file)
            .unwrap();
        let input = &m["inputs"][0];
        let bytes = std::fs::read(dir.join(input["file"].as_str().unwrap())).unwrap();
        Case {
            label,
            path: dir.join(file),
            input: input["name"].as_str().unwrap().into(),
            shape: input["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect(),
            data: bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        }
    })
    .collect()
}

/// The model loaded by `runtime` with its batch dimension left dynamic;
/// `None` (said why) when that runtime cannot.
fn load(case: &Case, runtime: &str) -> Option<ServedModel> {
    let bytes = std::fs::read(&case.path).unwrap();
    let mut shape: Vec<i64> = case.shape.iter().map(|&d| d as i64).collect();
    shape[0] = -1;
    let hints = [TensorSpec {
        name: case.input.clone(),
        datatype: "FP32".into(),
        shape,
    }];
    let selection = runtimes::detect(&RuntimeConfig::default())
        .select(
            ModelFormat::Onnx,
            &bytes,
            &hints,
            Check::CrossCompare,
            Some(runtime),
        )
        .map_err(|e| eprintln!("{} in {runtime}: not measured: {e}", case.label))
        .ok()?;
    if selection.engine.inputs()[0].shape.first() != Some(&None) {
        eprintln!(
            "{} in {runtime}: no dynamic batch dimension, not measured",
            case.label
        );
        return None;
    }
    Some(ServedModel::new(
        "m".into(),
        1,
        "0".repeat(64),
        ModelFormat::Onnx,
        selection,
    ))
}

fn body(case: &Case) -> (Bytes, usize) {
    let raw: Vec<u8> = case.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let header = serde_json::to_vec(&json!({
        "inputs": [{"name": case.input, "shape": case.shape, "datatype": "FP32", "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true}
    }))
    .unwrap();
    let n = header.len();
    let mut body = header;
    body.extend_from_slice(&raw);
    (Bytes::from(body), n)
}

struct Figures {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    merged_runs: u64,
    merged_requests: u64,
}

/// One client: requests back to back on one connection until `until`.
async fn client(socket: PathBuf, body: Bytes, header_len: usize, until: Instant) -> Vec<f64> {
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut samples = Vec::new();
    while Instant::now() < until {
        let req = http::Request::post("/v2/models/m/infer")
            .header("host", "bench")
            .header("inference-header-content-length", header_len)
            .body(Full::new(body.clone()))
            .unwrap();
        let t = Instant::now();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let reply = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples
}

/// Serves `model` with `batching` and measures `clients` concurrent ones.
fn measure(
    model: ServedModel,
    batching: BatchingConfig,
    case: &Case,
    clients: usize,
    tmp: &Path,
) -> Figures {
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let registry = ModelRegistry::default();
    registry.insert(model);
    let mut state = ApiState::new(
        registry.clone(),
        &ApiConfig {
            max_concurrent_requests: 64,
            ..ApiConfig::default()
        },
    );
    state.batching = Batching::new(batching);
    let batching_handle = state.batching.clone();
    let socket = tmp.join(format!("batching-{clients}.sock"));
    let shutdown = CancellationToken::new();
    let listener = server.block_on(bind_unix(&socket)).unwrap();
    server.spawn(serve_unix(listener, state, shutdown.clone()));
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (body, header_len) = body(case);
    let samples: Vec<f64> = clients_rt.block_on(async {
        // Warm-up, then the measured window.
        for (window, keep) in [(Duration::from_millis(500), false), (WINDOW, true)] {
            let until = Instant::now() + window;
            let tasks: Vec<_> = (0..clients)
                .map(|_| tokio::spawn(client(socket.clone(), body.clone(), header_len, until)))
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            if keep {
                return all;
            }
        }
        unreachable!()
    });
    shutdown.cancel();
    let served = registry.get("m").unwrap();
    let batches = batching_handle.stats_json(&served);
    drop(served);
    server.shutdown_timeout(Duration::from_secs(1));
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    Figures {
        per_s: samples.len() as f64 / WINDOW.as_secs_f64(),
        p50_ms: sorted[sorted.len() / 2],
        p99_ms: sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)],
        merged_runs: batches["merged_runs"].as_u64().unwrap_or(0),
        merged_requests: batches["merged_requests"].as_u64().unwrap_or(0),
    }
}

/// Measures every case in every runtime and prints the table.
pub fn run() {
    let tmp = tempfile::tempdir().unwrap();
    let batched = BatchingConfig {
        enabled: true,
        ..BatchingConfig::default()
    };
    println!(
        "dynamic batching (max_batch {}, max_delay_us {}); {} s per row; ratios: throughput batched/unbatched, p99 batched / 1-client unbatched p99",
        batched.max_batch,
        batched.max_delay_us,
        WINDOW.as_secs()
    );
    println!(
        "{:<14} {:<12} {:>7} {:>11} {:>9} {:>9} {:>11} {:>9} {:>9} {:>8} {:>8} {:>9}",
        "model",
        "runtime",
        "clients",
        "unb req/s",
        "unb p50",
        "unb p99",
        "bat req/s",
        "bat p50",
        "bat p99",
        "x thru",
        "p99/p99₁",
        "avg batch"
    );
    for case in cases() {
        for runtime in ["tract-onnx", "onnxruntime"] {
            let mut single_p99 = None;
            for clients in CLIENTS {
                let (Some(a), Some(b)) = (load(&case, runtime), load(&case, runtime)) else {
                    break;
                };
                let unb = measure(a, BatchingConfig::default(), &case, clients, tmp.path());
                let bat = measure(b, batched.clone(), &case, clients, tmp.path());
                let base = *single_p99.get_or_insert(unb.p99_ms);
                let avg = if bat.merged_runs == 0 {
                    1.0
                } else {
                    bat.merged_requests as f64 / bat.merged_runs as f64
                };
                println!(
                    "{:<14} {:<12} {:>7} {:>11.0} {:>9.3} {:>9.3} {:>11.0} {:>9.3} {:>9.3} {:>8.2} {:>8.2} {:>9.1}",
                    case.label,
                    runtime,
                    clients,
                    unb.per_s,
                    unb.p50_ms,
                    unb.p99_ms,
                    bat.per_s,
                    bat.p50_ms,
                    bat.p99_ms,
                    bat.per_s / unb.per_s,
                    bat.p99_ms / base,
                    avg
                );
            }
        }
    }
}
