//! Batching end to end: requests through [`super::super::schedule::run`]
//! and through the Unix socket, on a row-wise test engine and on real
//! models (the repository's digits classifier, and PP-OCR's direction
//! classifier from the test models), each compared with what the same
//! request gets alone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Batching, BatchingConfig, ModelBatchingConfig};
use crate::api::{bind_unix, schedule, serve_unix, ApiState};
use crate::engine::{self, Engine, EngineError, IoSpec, Selection};
use crate::registry::{ModelRegistry, ServedModel};
use crate::tensor::{DataType, Tensor, TensorData};

/// y = 2x row by row, taking `delay` per run (so concurrent requests
/// overlap), failing a run with any negative input, and recording the
/// rows of every run.
struct Doubler {
    specs: Vec<IoSpec>,
    out: Vec<IoSpec>,
    delay: Duration,
    runs: Mutex<Vec<usize>>,
}

impl Doubler {
    fn new(delay: Duration) -> Self {
        let spec = |name: &str| IoSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![None, Some(2)],
        };
        Self {
            specs: vec![spec("x")],
            out: vec![spec("y")],
            delay,
            runs: Mutex::new(Vec::new()),
        }
    }
}

impl Engine for Doubler {
    fn runtime(&self) -> &'static str {
        "doubler"
    }
    fn inputs(&self) -> &[IoSpec] {
        &self.specs
    }
    fn outputs(&self) -> &[IoSpec] {
        &self.out
    }
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        std::thread::sleep(self.delay);
        let x = inputs.into_iter().next().expect("validated");
        self.runs.lock().unwrap().push(x.shape[0]);
        let TensorData::Fp32(values) = x.data else {
            unreachable!("validated")
        };
        if values.iter().any(|v| *v < 0.0) {
            return Err(EngineError::Runtime {
                runtime: "doubler",
                reason: "negative input".into(),
            });
        }
        Ok(vec![Tensor {
            name: "y".into(),
            shape: x.shape,
            data: TensorData::Fp32(values.iter().map(|v| v * 2.0).collect()),
        }])
    }
}

/// Forwards to a real engine after `delay`, so that concurrent requests
/// to a fast model overlap as they would under real load.
struct Slowed {
    inner: Box<dyn Engine>,
    delay: Duration,
}

impl Engine for Slowed {
    fn runtime(&self) -> &'static str {
        self.inner.runtime()
    }
    fn inputs(&self) -> &[IoSpec] {
        self.inner.inputs()
    }
    fn outputs(&self) -> &[IoSpec] {
        self.inner.outputs()
    }
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        std::thread::sleep(self.delay);
        self.inner.run(inputs)
    }
}

fn serve(name: &str, engine: Box<dyn Engine>, batching: BatchingConfig) -> ApiState {
    let registry = ModelRegistry::default();
    registry.insert(ServedModel::new(
        name.into(),
        1,
        "0".repeat(64),
        edgefleet_shared::ModelFormat::Onnx,
        Selection {
            engine,
            trials: Vec::new(),
        },
    ));
    let mut state = ApiState::new(
        registry,
        &crate::config::ApiConfig {
            max_concurrent_requests: 64,
            ..Default::default()
        },
    );
    state.batching = Batching::new(batching);
    state
}

fn enabled(max_batch: usize, max_delay_us: u64) -> BatchingConfig {
    BatchingConfig {
        enabled: true,
        max_batch,
        max_delay_us,
        ..Default::default()
    }
}

fn row(values: [f32; 2]) -> Vec<Tensor> {
    vec![Tensor {
        name: "x".into(),
        shape: vec![1, 2],
        data: TensorData::Fp32(values.to_vec()),
    }]
}

/// Sends every request at once through `schedule::run`.
async fn concurrently(
    state: &ApiState,
    name: &str,
    requests: Vec<Vec<Tensor>>,
) -> Vec<Result<Vec<Tensor>, crate::api::ApiError>> {
    let model = state.registry.get(name).unwrap();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|inputs| {
            let (state, model) = (state.clone(), Arc::clone(&model));
            tokio::spawn(async move {
                schedule::run(&state, &model, inputs)
                    .await
                    .map(|(outputs, _)| outputs)
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

fn stats(state: &ApiState, name: &str) -> Value {
    crate::api::oip::statistics(&state.registry.get(name).unwrap(), &state.batching)["model_stats"]
        [0]
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_runs_and_each_gets_its_own_rows() {
    let doubler = Doubler::new(Duration::from_millis(30));
    let state = serve("double", Box::new(doubler), enabled(4, 1_000_000));
    let requests: Vec<_> = (0..9).map(|i| row([i as f32, 100.0 + i as f32])).collect();
    let answers = concurrently(&state, "double", requests).await;
    for (i, answer) in answers.into_iter().enumerate() {
        let y = &answer.unwrap()[0];
        assert_eq!(y.shape, vec![1, 2]);
        assert_eq!(
            y.data,
            TensorData::Fp32(vec![2.0 * i as f32, 2.0 * (100.0 + i as f32)])
        );
    }
    let s = stats(&state, "double");
    assert_eq!(s["inference_stats"]["success"]["count"], 9);
    let merged = s["batches"]["merged_runs"].as_u64().unwrap();
    assert!(merged >= 1, "{s}");
    assert!(
        s["batches"]["merged_requests"].as_u64().unwrap() >= 2,
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_fails_alone_and_its_neighbours_are_answered() {
    let state = serve(
        "double",
        Box::new(Doubler::new(Duration::from_millis(30))),
        enabled(8, 1_000_000),
    );
    let mut requests: Vec<_> = (0..6).map(|i| row([i as f32, 1.0])).collect();
    requests[3] = row([-1.0, 1.0]);
    // A malformed request is refused before it is queued.
    requests.push(vec![Tensor {
        name: "x".into(),
        shape: vec![1, 3],
        data: TensorData::Fp32(vec![0.0; 3]),
    }]);
    let answers = concurrently(&state, "double", requests).await;
    for (i, answer) in answers.iter().enumerate() {
        match i {
            3 => {
                let err = answer.as_ref().unwrap_err();
                assert_eq!(err.status, http::StatusCode::INTERNAL_SERVER_ERROR);
                assert!(err.message.contains("negative input"), "{}", err.message);
            }
            6 => {
                let err = answer.as_ref().unwrap_err();
                assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
                assert!(err.message.contains("shape"), "{}", err.message);
            }
            _ => assert_eq!(
                answer.as_ref().unwrap()[0].data,
                TensorData::Fp32(vec![2.0 * i as f32, 2.0])
            ),
        }
    }
    let s = stats(&state, "double");
    assert_eq!(s["inference_stats"]["success"]["count"], 5, "{s}");
    assert_eq!(s["inference_stats"]["fail"]["count"], 2, "{s}");
    assert_eq!(s["batches"]["fallbacks"], 1, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_at_most_max_batch_rows_and_shapes_never_mix() {
    let doubler = Arc::new(Doubler::new(Duration::from_millis(20)));
    struct Shared(Arc<Doubler>);
    impl Engine for Shared {
        fn runtime(&self) -> &'static str {
            self.0.runtime()
        }
        fn inputs(&self) -> &[IoSpec] {
            self.0.inputs()
        }
        fn outputs(&self) -> &[IoSpec] {
            self.0.outputs()
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
            self.0.run(inputs)
        }
    }
    let state = serve(
        "double",
        Box::new(Shared(Arc::clone(&doubler))),
        enabled(3, 1_000_000),
    );
    let mut requests: Vec<_> = (0..10).map(|i| row([i as f32, 0.0])).collect();
    // Two rows in one request.
    requests.push(vec![Tensor {
        name: "x".into(),
        shape: vec![2, 2],
        data: TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0]),
    }]);
    let answers = concurrently(&state, "double", requests).await;
    assert_eq!(
        answers[10].as_ref().unwrap()[0].data,
        TensorData::Fp32(vec![2.0, 4.0, 6.0, 8.0])
    );
    let runs = doubler.runs.lock().unwrap().clone();
    assert!(runs.iter().all(|&rows| rows <= 3), "{runs:?}");
    assert_eq!(runs.iter().sum::<usize>(), 12, "{runs:?}");
    assert!(runs.iter().any(|&rows| rows > 1), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_is_not_held_and_disabled_models_never_batch() {
    // An idle model runs a request at once, even with a long delay.
    let state = serve(
        "double",
        Box::new(Doubler::new(Duration::ZERO)),
        enabled(8, 1_000_000),
    );
    let started = std::time::Instant::now();
    let answer = concurrently(&state, "double", vec![row([1.0, 2.0])]).await;
    assert!(answer[0].is_ok());
    assert!(started.elapsed() < Duration::from_millis(500));
    // Batching on, but not for this model.
    let mut config = enabled(8, 1_000_000);
    config.models.insert(
        "double".into(),
        ModelBatchingConfig {
            enabled: Some(false),
            ..Default::default()
        },
    );
    let state = serve(
        "double",
        Box::new(Doubler::new(Duration::from_millis(10))),
        config,
    );
    let answers = concurrently(
        &state,
        "double",
        (0..6).map(|i| row([i as f32, 0.0])).collect(),
    )
    .await;
    assert!(answers.iter().all(Result::is_ok));
    let s = stats(&state, "double");
    assert_eq!(s["batches"]["runs"], 0, "{s}");
    assert_eq!(s["batches"]["merged_runs"], 0, "{s}");
}

/// The repository's digits classifier, or a test model, loaded with the
/// built-in runtimes; `hint` fixes the input's dimensions that are not
/// negative (the batch stays dynamic).
fn real_engine(
    path: &std::path::Path,
    hint: Option<(&str, &[i64])>,
    runtime: Option<&str>,
) -> Box<dyn Engine> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let hints: Vec<edgefleet_shared::TensorSpec> = hint
        .into_iter()
        .map(|(name, shape)| edgefleet_shared::TensorSpec {
            name: name.into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
        })
        .collect();
    engine::runtimes::detect(&crate::config::RuntimeConfig::default())
        .select(
            edgefleet_shared::ModelFormat::Onnx,
            &bytes,
            &hints,
            engine::Check::CrossCompare,
            runtime,
        )
        .unwrap()
        .engine
}

/// POSTs `body` to `path` on the Unix socket and returns the JSON answer.
async fn post(socket: &std::path::Path, path: &str, body: &str) -> (u16, Value) {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap())
}

async fn get(socket: &std::path::Path, path: &str) -> Value {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap()
}

fn first_output(answer: &Value) -> Vec<f64> {
    answer["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Sends `bodies` one at a time to an unbatched agent and all at once to
/// a batched one; every answer must match its one-at-a-time twin. Returns
/// the batched model's statistics.
async fn same_answers_batched(
    name: &str,
    engines: [Box<dyn Engine>; 2],
    bodies: &[String],
    tolerance: f64,
) -> Value {
    let [alone, batched] = engines;
    let mut answers = Vec::new();
    for (engine, batching) in [
        (alone, BatchingConfig::default()),
        (batched, enabled(8, 2000)),
    ] {
        let state = serve(name, engine, batching);
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = bind_unix(&socket).await.unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve_unix(listener, state, shutdown.clone()));
        let path = format!("/v2/models/{name}/infer");
        let got: Vec<(u16, Value)> = if answers.is_empty() {
            let mut got = Vec::new();
            for body in bodies {
                got.push(post(&socket, &path, body).await);
            }
            got
        } else {
            let tasks: Vec<_> = bodies
                .iter()
                .map(|body| {
                    let (socket, path, body) = (socket.clone(), path.clone(), body.clone());
                    tokio::spawn(async move { post(&socket, &path, &body).await })
                })
                .collect();
            let mut got = Vec::new();
            for task in tasks {
                got.push(task.await.unwrap());
            }
            got
        };
        let stats = get(&socket, &format!("/v2/models/{name}/stats")).await;
        shutdown.cancel();
        answers.push((got, stats));
    }
    let (batched, stats) = answers.pop().unwrap();
    let (alone, _) = answers.pop().unwrap();
    for (i, ((s1, one), (s2, many))) in alone.iter().zip(&batched).enumerate() {
        assert_eq!((*s1, *s2), (200, 200), "request {i}: {one} / {many}");
        let (a, b) = (first_output(one), first_output(many));
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            worst / scale <= tolerance,
            "request {i}: batched differs by {worst} (scale {scale})"
        );
    }
    stats["model_stats"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digits_answer_the_same_batched_as_one_at_a_time() {
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = repo.join("models/digits/digits_fp32.onnx");
    let samples: Value =
        serde_json::from_slice(&std::fs::read(repo.join("models/digits/samples.json")).unwrap())
            .unwrap();
    let inputs = samples["inputs"].as_array().unwrap();
    let bodies: Vec<String> = (0..16)
        .map(|i| {
            json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": inputs[i % inputs.len()]}]})
                .to_string()
        })
        .collect();
    // The digits model runs in microseconds: slowed down, concurrent
    // requests overlap as they do on a busy device.
    let slowed = |delay| -> Box<dyn Engine> {
        Box::new(Slowed {
            inner: real_engine(&model, None, None),
            delay,
        })
    };
    let stats = same_answers_batched(
        "digits",
        [slowed(Duration::ZERO), slowed(Duration::from_millis(20))],
        &bodies,
        1e-5,
    )
    .await;
    assert_eq!(stats["inference_stats"]["success"]["count"], 16, "{stats}");
    assert!(
        stats["batches"]["merged_runs"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}

/// tract cannot plan PP-OCR's classifier with a dynamic batch (its
/// reshapes need the batch size), so this one runs in ONNX Runtime.
#[cfg(feature = "onnxruntime")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ppocr_classifier_answers_the_same_batched_as_one_at_a_time() {
    let dir = std::env::var_os("EDGEFLEET_TEST_MODELS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/edgefleet/test-models")
        });
    let model = dir.join("ppocr_cls.onnx");
    assert!(
        model.exists(),
        "real test models missing in {}: run scripts/fetch-test-models",
        dir.display()
    );
    // Sixteen different images: the reference input, shifted and scaled.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let entry = manifest["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["file"] == "ppocr_cls.onnx")
        .unwrap();
    let bytes = std::fs::read(dir.join(entry["inputs"][0]["file"].as_str().unwrap())).unwrap();
    let image: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let bodies: Vec<String> = (0..16)
        .map(|i| {
            let data: Vec<f32> = image
                .iter()
                .enumerate()
                .map(|(j, v)| v * (1.0 - i as f32 / 32.0) + ((j + i * 7) % 13) as f32 / 64.0)
                .collect();
            json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": data}]})
                .to_string()
        })
        .collect();
    let hint = Some(("x", &[-1i64, 3, 48, 192][..]));
    let stats = same_answers_batched(
        "ppocr_cls",
        // Each run takes 20 ms more, so the 16 concurrent requests
        // overlap however fast or loaded the machine is.
        [
            real_engine(&model, hint, Some("onnxruntime")),
            Box::new(Slowed {
                inner: real_engine(&model, hint, Some("onnxruntime")),
                delay: Duration::from_millis(20),
            }),
        ],
        &bodies,
        1e-4,
    )
    .await;
    assert_eq!(stats["inference_stats"]["success"]["count"], 16, "{stats}");
    assert!(
        stats["batches"]["merged_runs"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}
