//! Shadow candidates and A/B splits through the real local API (TCP on
//! port 0) with the real digits classifiers of `models/digits/`: the
//! fp32 model serves, the int8 model (which agrees with it on every
//! sample of the repository's test set) or the perturbed one (which
//! agrees on about 60 %) runs beside it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_shared::quality::{ModelArtifact, ShadowSpec, SplitSpec, Variant};
use edgefleet_shared::ModelFormat;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{serve_tcp, ApiState};
use crate::engine::tract::TractEngine;
use crate::engine::{Engine, Selection};
use crate::registry::quality::shadow::{Candidate, Shadow};
use crate::registry::quality::split::Split;
use crate::registry::{ModelRegistry, ServedModel};

fn digits_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/digits")
        .join(name)
}

fn engine(file: &str) -> Box<dyn Engine> {
    let bytes = std::fs::read(digits_file(file)).unwrap();
    Box::new(TractEngine::load_onnx(&bytes, &[]).unwrap())
}

fn served(version: u64, file: &str) -> ServedModel {
    ServedModel::new(
        "digits".into(),
        version,
        format!("{version:064}"),
        ModelFormat::Onnx,
        Selection {
            engine: engine(file),
            trials: Vec::new(),
        },
    )
}

fn artifact(version: u64) -> ModelArtifact {
    ModelArtifact {
        version,
        format: ModelFormat::Onnx,
        sha256: "ab".repeat(32),
        size: 1,
        urls: vec!["http://artifacts.test/c.onnx".into()],
        zstd: None,
    }
}

/// Pixel rows of `file` (samples.json: 16, test_set.json: 450).
fn samples(file: &str) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(digits_file(file)).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(doc["inputs"].clone()).unwrap()
}

async fn start(registry: ModelRegistry) -> (String, CancellationToken) {
    crate::download::install_crypto_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let state = ApiState::new(registry, &crate::config::ApiConfig::default());
    tokio::spawn(serve_tcp(listener, state, shutdown.clone()));
    (format!("http://{addr}"), shutdown)
}

/// One inference of `pixels`; the client key goes in the header or the
/// request's parameters. Returns the answer.
async fn infer(
    client: &reqwest::Client,
    url: &str,
    pixels: &[f64],
    header_key: Option<&str>,
    param_key: Option<&str>,
) -> Value {
    let mut body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": pixels}]});
    if let Some(key) = param_key {
        body["parameters"] = json!({"client_key": key});
    }
    let mut request = client.post(url).json(&body);
    if let Some(key) = header_key {
        request = request.header("X-Client-Key", key);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn drain(shadow: &Shadow) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shadow.pending() > 0 {
        assert!(
            Instant::now() < deadline,
            "the shadow worker never caught up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Serves fp32 with `candidate` in shadow at sample rate 1, sends `n`
/// requests cycling over `samples`, and returns the shadow's figures and
/// the statistics endpoint's answer.
async fn shadow_run(candidate: &str, samples: &[Vec<f64>], n: usize) -> (Value, Value) {
    let model = served(1, "digits_fp32.onnx");
    let spec = ShadowSpec {
        candidate: artifact(2),
        sample_rate: 1.0,
        compare: Vec::new(),
        max_queue: 1024,
        cpu_budget: 1.0,
    };
    let shadow = Shadow::new(
        spec,
        Candidate {
            version: 2,
            engine: engine(candidate),
        },
    )
    .unwrap();
    let shadow = Arc::new(shadow);
    model.quality.set_shadow(Some(shadow.clone()));
    let registry = ModelRegistry::default();
    registry.insert(model);
    let (base, shutdown) = start(registry).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v2/models/digits/infer");
    for pixels in samples.iter().cycle().take(n) {
        let answer = infer(&client, &url, pixels, None, None).await;
        assert_eq!(answer["model_version"], "1");
    }
    drain(&shadow);
    let stats: Value = client
        .get(format!("{base}/v2/models/digits/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let taken = serde_json::to_value(shadow.take()).unwrap();
    shutdown.cancel();
    (taken, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_int8_candidate_agrees_with_the_served_fp32_model() {
    let (t, stats) = shadow_run("digits_int8.onnx", &samples("samples.json"), 200).await;
    let (compared, agreed, dropped) = (
        t["compared"].as_u64().unwrap(),
        t["agreed"].as_u64().unwrap(),
        t["dropped"].as_u64().unwrap(),
    );
    assert_eq!(compared + dropped, 200, "{t}");
    assert!(compared >= 150, "{t}");
    assert_eq!(t["errors"], 0, "{t}");
    // accuracy.json: argmax agreement 1.0, probabilities within 0.033.
    assert!(agreed as f64 / compared as f64 >= 0.95, "{t}");
    assert!(t["max_abs_error"].as_f64().unwrap() < 0.05, "{t}");
    assert!(t["p50_us"].as_f64().unwrap() > 0.0, "{t}");
    let shown = &stats["model_stats"][0]["shadow"];
    assert_eq!(shown["compared"], t["compared"], "{stats}");
    assert_eq!(shown["candidate_version"], 2, "{stats}");
    assert_eq!(stats["model_stats"][0]["inference_count"], 200, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_perturbed_candidate_disagrees_often() {
    // The repository's test set: 450 samples, about 60 % agreement.
    let (t, _) = shadow_run("digits_perturbed.onnx", &samples("test_set.json"), 450).await;
    let (compared, agreed) = (
        t["compared"].as_u64().unwrap(),
        t["agreed"].as_u64().unwrap(),
    );
    assert!(compared >= 300, "{t}");
    let agreement = agreed as f64 / compared as f64;
    assert!(
        (0.4..0.8).contains(&agreement),
        "agreement {agreement}: {t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ab_split_serves_each_client_key_from_one_version_at_the_share() {
    let model = served(1, "digits_fp32.onnx");
    let variant = Arc::new(served(2, "digits_int8.onnx"));
    let spec = SplitSpec {
        variant: artifact(2),
        share: 0.3,
        experiment: "digits-int8".into(),
    };
    model
        .quality
        .set_split(Some(Arc::new(Split::new(spec, variant.clone()))));
    let registry = ModelRegistry::default();
    registry.insert(model);
    let (base, shutdown) = start(registry.clone()).await;
    let client = reqwest::Client::new();
    let url = format!("{base}/v2/models/digits/infer");
    let pixels = samples("samples.json");
    let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
    for i in 0..1000 {
        let key = format!("client-{}", i % 100);
        // Half the clients send the header, half the request parameter.
        let (header, param) = if i % 2 == 0 {
            (Some(key.as_str()), None)
        } else {
            (None, Some(key.as_str()))
        };
        let answer = infer(&client, &url, &pixels[i % pixels.len()], header, param).await;
        let version = answer["model_version"].as_str().unwrap().to_string();
        by_key.entry(key).or_default().push(version);
    }
    for (key, versions) in &by_key {
        assert!(
            versions.iter().all(|v| v == &versions[0]),
            "{key}: {versions:?}"
        );
    }
    let on_b: usize = by_key.values().flatten().filter(|v| *v == "2").count();
    // 100 keys: the share of keys is a binomial draw around 0.3 with a
    // standard deviation of 0.046; two of them either side.
    let share = on_b as f64 / 1000.0;
    assert!((share - 0.3).abs() <= 0.1, "share on the variant {share}");
    let served_model = registry.get("digits").unwrap();
    let (a, b) = (served_model.stats.counts(), variant.stats.counts());
    assert_eq!(
        (a.successes, b.successes),
        (1000 - on_b as u64, on_b as u64)
    );
    // Telemetry labels both entries, each with its own counts.
    let dir = tempfile::tempdir().unwrap();
    let entries = crate::telemetry::Sampler::new(dir.path()).models(&registry);
    let labelled: Vec<(u64, Option<Variant>, u64)> = entries
        .iter()
        .map(|e| (e.version, e.variant, e.inferences))
        .collect();
    assert_eq!(
        labelled,
        vec![
            (1, Some(Variant::A), 1000 - on_b as u64),
            (2, Some(Variant::B), on_b as u64)
        ]
    );
    // A request for an explicit version gets it, whatever its key; no key
    // at all splits at random.
    let mut seen = std::collections::HashSet::new();
    for v in ["1", "2"] {
        let pinned = format!("{base}/v2/models/digits/versions/{v}/infer");
        let answer = infer(&client, &pinned, &pixels[0], Some("client-1"), None).await;
        assert_eq!(answer["model_version"], v);
    }
    for i in 0..100 {
        let answer = infer(&client, &url, &pixels[i % pixels.len()], None, None).await;
        seen.insert(answer["model_version"].as_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "requests without a key reach both versions");
    let stats: Value = client
        .get(format!("{base}/v2/models/digits/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let variants: Vec<&Value> = stats["model_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["variant"])
        .collect();
    assert_eq!(variants, [&json!("a"), &json!("b")], "{stats}");
    shutdown.cancel();
}

// ---- drift statistics through the local API ----

use crate::engine::load::select_local;
use crate::engine::Runtimes;
use crate::registry::quality::drift::tests::{digit_samples, digits_spec, repo_file, stats};
use edgefleet_shared::quality::Feature;

#[tokio::test]
async fn a_request_over_the_socket_is_binned_and_reported_with_telemetry() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let registry = crate::registry::ModelRegistry::default();
    let path = repo_file("models/digits/digits_fp32.onnx");
    let selection =
        select_local(&Runtimes::builtin(), ModelFormat::Onnx, &path, None, None).unwrap();
    registry.insert(crate::registry::ServedModel::new(
        "digits".into(),
        1,
        "0".repeat(64),
        ModelFormat::Onnx,
        selection,
    ));
    registry
        .get("digits")
        .unwrap()
        .quality
        .apply_drift(Some(&digits_spec()));
    let state = crate::api::ApiState::new(registry.clone(), &Default::default());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = crate::api::bind_unix(&socket).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::api::serve_unix(listener, state, shutdown.clone()));

    // One request of two digits (labels 2 and 0).
    let samples = digit_samples();
    let data: Vec<f64> = samples[..2].concat();
    let body = serde_json::json!({
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": data}]
    })
    .to_string();
    let request = format!(
        "POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    shutdown.cancel();

    let mut sampler = crate::telemetry::Sampler::new(dir.path());
    let models = sampler.models(&registry);
    let drift = models[0].drift.as_ref().expect("drift reported");
    let input = stats(drift, "input", Feature::Mean);
    assert_eq!(input.moments.count, 1);
    let pixels = data.iter().sum::<f64>() / data.len() as f64;
    assert!((input.moments.mean - pixels).abs() < 1e-4, "{input:?}");
    // Each batch row is one answer: classes 2 and 0.
    let argmax = stats(drift, "probabilities", Feature::Argmax);
    assert_eq!(
        argmax.histogram.counts,
        vec![0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // The next interval had no traffic: reported, with nothing in it.
    let models = sampler.models(&registry);
    let drift = models[0].drift.as_ref().expect("drift reported");
    assert!(drift.features.iter().all(|f| f.histogram.total() == 0));
    assert_eq!(drift.features.len(), 2);
}
