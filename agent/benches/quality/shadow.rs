//! What a shadow candidate costs the caller: p50 and p99 latency through
//! the real local API for a served model without a shadow and with one
//! (its int8 variant, sampled at 10 %), measured interleaved in one run
//! (one request to each, alternating, on one kept-alive connection), so
//! both see the same machine.
//!
//! Cases: PP-OCR's direction classifier with `ppocr_cls_int8qdq.onnx`
//! (from `EDGEFLEET_TEST_MODELS`) and the repository's digits classifier
//! with `digits_int8.onnx`. Each model is loaded with the runtime
//! selection the agent uses (the fastest correct runtime this build
//! offers).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgefleet_agent::api::{bind_unix, serve_unix, ApiState};
use edgefleet_agent::config::{ApiConfig, RuntimeConfig};
use edgefleet_agent::engine::{runtimes, Check, Selection};
use edgefleet_agent::registry::quality::shadow::{Candidate, Shadow};
use edgefleet_agent::registry::{ModelRegistry, ServedModel};
use edgefleet_shared::quality::{ModelArtifact, ShadowSpec};
use edgefleet_shared::{ModelFormat, TensorSpec};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// How long each case is measured (after a warm-up of a tenth of it).
const WINDOW: Duration = Duration::from_secs(4);
const SAMPLE_RATE: f64 = 0.1;

struct Case {
    label: String,
    served: PathBuf,
    candidate: PathBuf,
    input: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn digits() -> Case {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    let samples: Value =
        serde_json::from_slice(&std::fs::read(dir.join("samples.json")).unwrap()).unwrap();
    let data = samples["inputs"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    Case {
        label: "digits".into(),
        served: dir.join("digits_fp32.onnx"),
        candidate: dir.join("digits_int8.onnx"),
        input: "input".into(),
        shape: vec![1, 64],
        data,
    }
}

fn ppocr_cls() -> Option<Case> {
    let Some(dir) = std::env::var_os("EDGEFLEET_TEST_MODELS").map(PathBuf::from) else {
        eprintln!("EDGEFLEET_TEST_MODELS not set: PP-OCR classifier not measured");
        return None;
    };
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let m = manifest["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["file"] == "ppocr_cls.onnx")
        .unwrap();
    let input = &m["inputs"][0];
    let bytes = std::fs::read(dir.join(input["file"].as_str().unwrap())).unwrap();
    Some(Case {
        label: "ppocr_cls".into(),
        served: dir.join("ppocr_cls.onnx"),
        candidate: dir.join("ppocr_cls_int8qdq.onnx"),
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
    })
}

fn select(case: &Case, path: &Path) -> Selection {
    let hints = [TensorSpec {
        name: case.input.clone(),
        datatype: "FP32".into(),
        shape: case.shape.iter().map(|&d| d as i64).collect(),
    }];
    runtimes::detect(&RuntimeConfig::default())
        .select(
            ModelFormat::Onnx,
            &std::fs::read(path).unwrap(),
            &hints,
            Check::CrossCompare,
            None,
        )
        .unwrap()
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

/// Alternates requests to `plain` and `shadowed` until `until`; returns
/// each one's latencies in microseconds.
async fn alternate(
    socket: PathBuf,
    body: Bytes,
    header_len: usize,
    until: Instant,
) -> [Vec<f64>; 2] {
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut samples = [Vec::new(), Vec::new()];
    while Instant::now() < until {
        for (i, name) in ["plain", "shadowed"].into_iter().enumerate() {
            let req = http::Request::post(format!("/v2/models/{name}/infer"))
                .header("host", "bench")
                .header("inference-header-content-length", header_len)
                .body(Full::new(body.clone()))
                .unwrap();
            let t = Instant::now();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status();
            let reply = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
            samples[i].push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn measure(case: &Case, tmp: &Path) {
    let plain = select(case, &case.served);
    let runtime = plain.engine.runtime();
    let registry = ModelRegistry::default();
    let model = |name: &str, selection| {
        ServedModel::new(name.into(), 1, "0".repeat(64), ModelFormat::Onnx, selection)
    };
    registry.insert(model("plain", plain));
    let shadowed = model("shadowed", select(case, &case.served));
    let candidate = select(case, &case.candidate);
    let candidate_runtime = candidate.engine.runtime();
    let spec = ShadowSpec {
        candidate: ModelArtifact {
            version: 2,
            format: ModelFormat::Onnx,
            sha256: "0".repeat(64),
            size: 1,
            urls: vec!["http://bench/".into()],
            zstd: None,
        },
        sample_rate: SAMPLE_RATE,
        compare: Vec::new(),
        max_queue: 8,
        cpu_budget: 0.25,
    };
    let shadow = Arc::new(
        Shadow::new(
            spec,
            Candidate {
                version: 2,
                engine: candidate.engine,
            },
        )
        .unwrap(),
    );
    shadowed.quality.set_shadow(Some(shadow.clone()));
    registry.insert(shadowed);

    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let state = ApiState::new(registry, &ApiConfig::default());
    let socket = tmp.join(format!("shadow-{}.sock", case.label));
    let shutdown = CancellationToken::new();
    let listener = server.block_on(bind_unix(&socket)).unwrap();
    server.spawn(serve_unix(listener, state, shutdown.clone()));
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (body, header_len) = body(case);
    let warm_up = Instant::now() + WINDOW / 10;
    client.block_on(alternate(socket.clone(), body.clone(), header_len, warm_up));
    shadow.take();
    let until = Instant::now() + WINDOW;
    let [mut plain, mut shadowed] = client.block_on(alternate(socket, body, header_len, until));
    let figures = shadow.take();
    shutdown.cancel();
    server.shutdown_timeout(Duration::from_secs(1));
    plain.sort_by(f64::total_cmp);
    shadowed.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&plain, 0.5), percentile(&plain, 0.99));
    let (s50, s99) = (percentile(&shadowed, 0.5), percentile(&shadowed, 0.99));
    let added = |with: f64, without: f64| (with / without - 1.0) * 100.0;
    println!(
        "{:<10} {:<12} {:<12} {:>7} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>+8.1} {:>+8.1} {:>8} {:>7} {:>9.3}",
        case.label,
        runtime,
        candidate_runtime,
        plain.len(),
        p50,
        s50,
        p99,
        s99,
        added(s50, p50),
        added(s99, p99),
        figures.compared,
        figures.dropped,
        figures.agreement().unwrap_or(f64::NAN),
    );
}

/// Measures each case and prints the table.
pub fn run() {
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "shadow cost (sample rate {SAMPLE_RATE}, max_queue 8, cpu_budget 0.25); {} s per case, requests alternating without/with shadow; latencies in us",
        WINDOW.as_secs()
    );
    println!(
        "{:<10} {:<12} {:<12} {:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>7} {:>9}",
        "model",
        "runtime",
        "candidate",
        "n",
        "p50",
        "p50+sh",
        "p99",
        "p99+sh",
        "+p50 %",
        "+p99 %",
        "compared",
        "dropped",
        "agreement"
    );
    for case in ppocr_cls().into_iter().chain([digits()]) {
        measure(&case, tmp.path());
    }
}
