//! Inference benchmark: the agent against the obvious alternatives, on the
//! same models and inputs, single thread, in one run.
//!
//! (a) each runtime in-process, and the per-model automatic choice;
//! (b) the agent over its Unix socket, JSON and binary tensors;
//! (c) onnxruntime in Python, in-process;
//! (d) a FastAPI + onnxruntime server on loopback (what many deploy).
//!
//! Run: `scripts/bench` (fetches models and the Python baselines first), or
//! `cargo bench -p edgefleet-agent --features onnxruntime --bench inference`
//! with `ORT_DYLIB_PATH`, `EDGEFLEET_TEST_MODELS` and `EDGEFLEET_PYTHON`
//! (a Python with onnxruntime, fastapi and uvicorn) set.

#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap ends the run

mod common;
use common::{rss_kib, Killed};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgefleet_agent::api::oip;
use edgefleet_agent::config::RuntimeConfig;
use edgefleet_agent::engine::{self, runtimes, Check};
use edgefleet_agent::tensor::{DataType, Tensor, TensorData};
use edgefleet_shared::{ModelFormat, TensorSpec};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

const RUNS: usize = 300;

struct Case {
    label: &'static str,
    path: PathBuf,
    input: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

struct Stats {
    p50_ms: f64,
    p99_ms: f64,
    per_s: f64,
}

fn stats(mut samples: Vec<f64>) -> Stats {
    let total: f64 = samples.iter().sum();
    samples.sort_by(f64::total_cmp);
    Stats {
        p50_ms: samples[samples.len() / 2],
        p99_ms: samples[(samples.len() * 99 / 100).min(samples.len() - 1)],
        per_s: samples.len() as f64 / (total / 1000.0),
    }
}

fn cases() -> Vec<Case> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let samples: Value =
        serde_json::from_slice(&std::fs::read(repo.join("models/digits/samples.json")).unwrap())
            .unwrap();
    let digit: Vec<f32> = samples["inputs"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let mut out = vec![Case {
        label: "digits int8 (8 KB)",
        path: repo.join("models/digits/digits_int8.onnx"),
        input: "input".into(),
        shape: vec![1, 64],
        data: digit,
    }];
    let models = std::env::var_os("EDGEFLEET_TEST_MODELS").map(PathBuf::from);
    if let Some(dir) = models {
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        for (file, label) in [
            ("oww_embedding.onnx", "openWakeWord embedding fp32"),
            ("oww_embedding_int8qdq.onnx", "openWakeWord embedding int8"),
            ("ppocr_cls.onnx", "PP-OCR direction cls fp32"),
            ("oww_embedding.tflite", "openWakeWord embedding TFLite"),
        ] {
            let m = manifest["models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["file"] == file)
                .unwrap();
            let input = &m["inputs"][0];
            let bytes = std::fs::read(dir.join(input["file"].as_str().unwrap())).unwrap();
            out.push(Case {
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
            });
        }
    } else {
        eprintln!("EDGEFLEET_TEST_MODELS not set: only the digits model is measured");
    }
    out
}

fn tensor(case: &Case) -> Tensor {
    Tensor {
        name: case.input.clone(),
        shape: case.shape.clone(),
        data: TensorData::Fp32(case.data.clone()),
    }
}

fn format(case: &Case) -> ModelFormat {
    if case.path.extension().is_some_and(|e| e == "tflite") {
        ModelFormat::Tflite
    } else {
        ModelFormat::Onnx
    }
}

fn in_process(case: &Case, runtime: Option<&str>) -> Option<(String, Stats)> {
    let bytes = std::fs::read(&case.path).unwrap();
    let hints = [TensorSpec {
        name: case.input.clone(),
        datatype: "FP32".into(),
        shape: case.shape.iter().map(|&d| d as i64).collect(),
    }];
    let sel = runtimes::detect(&RuntimeConfig::default())
        .select(format(case), &bytes, &hints, Check::CrossCompare, runtime)
        .map_err(|e| eprintln!("{}: {runtime:?} not measured: {e}", case.label))
        .ok()?;
    let input = tensor(case);
    for _ in 0..20 {
        engine::infer(sel.engine.as_ref(), vec![input.clone()])
            .map_err(|e| eprintln!("{}: {runtime:?} failed: {e}", case.label))
            .ok()?;
    }
    let samples = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            engine::infer(sel.engine.as_ref(), vec![input.clone()]).unwrap();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    Some((sel.engine.runtime().to_string(), stats(samples)))
}

/// A kept-alive HTTP/1.1 connection (Unix or TCP).
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    async fn unix(path: &Path) -> Self {
        let stream = tokio::net::UnixStream::connect(path).await.unwrap();
        Self::handshake(stream).await
    }

    async fn tcp(port: u16) -> Self {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self::handshake(stream).await
    }

    async fn handshake<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>(
        s: S,
    ) -> Self {
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self { sender }
    }

    async fn post(&mut self, path: &str, body: Bytes, header_len: Option<usize>) -> (u16, Bytes) {
        let mut req = http::Request::post(path)
            .header("host", "bench")
            .header("content-type", "application/json");
        if let Some(n) = header_len {
            req = req.header("inference-header-content-length", n);
        }
        let resp = self
            .sender
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }
}

async fn measure(client: &mut Client, path: &str, body: Bytes, header_len: Option<usize>) -> Stats {
    for _ in 0..20 {
        let (status, reply) = client.post(path, body.clone(), header_len).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    }
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let _ = client.post(path, body.clone(), header_len).await;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    stats(samples)
}

fn json_body(case: &Case) -> Bytes {
    Bytes::from(serde_json::to_vec(&json!({"inputs": [{"name": case.input, "shape": case.shape, "datatype": "FP32", "data": case.data}]})).unwrap())
}

fn binary_body(case: &Case) -> (Bytes, usize) {
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

async fn wait_until<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "service did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Row format of the printed table.
fn row(label: &str, how: &str, p50: f64, p99: f64, per_s: Option<f64>, rss: Option<f64>) -> String {
    format!(
        "{:<30} {:<34} {:>9.3} {:>9.3} {:>9} {:>10}",
        label,
        how,
        p50,
        p99,
        per_s.map_or(String::new(), |v| format!("{v:.0}")),
        rss.map_or(String::new(), |v| format!("{v:.1}"))
    )
}

/// (a): each runtime and the automatic choice, in this process.
struct InProcess {
    lines: Vec<String>,
    best_single: Option<(String, f64)>,
    auto: Option<(String, f64)>,
}

fn measure_in_process(case: &Case) -> InProcess {
    let mut out = InProcess {
        lines: Vec::new(),
        best_single: None,
        auto: None,
    };
    let singles = match format(case) {
        ModelFormat::Onnx => [Some("tract-onnx"), Some("onnxruntime")],
        ModelFormat::Tflite => [Some("tract-tflite"), Some("litert")],
    };
    for runtime in singles.into_iter().chain([None]) {
        let Some((name, s)) = in_process(case, runtime) else {
            continue;
        };
        let how = match runtime {
            Some(r) => format!("(a) in-process {r}"),
            None => format!("(a) in-process auto → {name}"),
        };
        out.lines.push(row(
            case.label,
            &how,
            s.p50_ms,
            s.p99_ms,
            Some(s.per_s),
            None,
        ));
        if runtime.is_none() {
            out.auto = Some((name, s.p50_ms));
        } else if out.best_single.as_ref().is_none_or(|(_, b)| s.p50_ms < *b) {
            out.best_single = Some((name, s.p50_ms));
        }
    }
    out
}

/// (b), (c), (d): the agent and the Python baselines, each its own process.
struct Served {
    lines: Vec<String>,
    json: Stats,
    bin: Stats,
    agent_rss: f64,
    agent_idle_rss: f64,
    /// FastAPI's latency and RSS.
    fastapi: Option<(Stats, f64)>,
    /// onnxruntime in Python, in-process, p50.
    python_ort_p50: Option<f64>,
}

async fn measure_served(case: &Case, tmp: &Path, python: Option<&str>, bench_dir: &Path) -> Served {
    let mut lines = Vec::new();
    let socket = tmp.join(format!("{}.sock", case.label.len()));
    let agent_started = tokio::time::Instant::now();
    let agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"))
            .arg("serve")
            .arg("--model")
            .arg(format!("m={}", case.path.display()))
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(tmp.join("data"))
            .env("EDGEFLEET_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Local models have no declared shapes; PP-OCR needs them in tract,
    // so the agent uses whichever runtime loads it.
    wait_until(|| async { tokio::net::UnixStream::connect(&socket).await.is_ok() }).await;
    let mut client = Client::unix(&socket).await;
    let json_stats = measure(&mut client, "/v2/models/m/infer", json_body(case), None).await;
    let (body, n) = binary_body(case);
    let bin_stats = measure(&mut client, "/v2/models/m/infer", body, Some(n)).await;
    let agent_rss = rss_kib(agent.0.id()) as f64 / 1024.0;
    for (how, s) in [
        ("(b) agent, Unix socket, JSON", &json_stats),
        ("(b) agent, Unix socket, binary", &bin_stats),
    ] {
        lines.push(row(
            case.label,
            how,
            s.p50_ms,
            s.p99_ms,
            Some(s.per_s),
            Some(agent_rss),
        ));
    }
    // The agent pages out its start-up code 5 s after starting.
    tokio::time::sleep_until(agent_started + Duration::from_millis(6500)).await;
    let agent_idle_rss = rss_kib(agent.0.id()) as f64 / 1024.0;
    lines.push(format!(
        "  → agent RSS once idle (start-up code paged out): {agent_idle_rss:.1} MiB (right after the load test: {agent_rss:.1} MiB)"
    ));
    drop(client);
    drop(agent);

    // (c) and (d) need Python with onnxruntime, fastapi, uvicorn; they are
    // onnxruntime's, so ONNX models only.
    let mut fastapi = None;
    let mut python_ort_p50 = None;
    if let (Some(py), ModelFormat::Onnx) = (python, format(case)) {
        let mut child = Command::new(py)
            .arg(bench_dir.join("ort_inprocess.py"))
            .arg(&case.path)
            .arg(&case.input)
            .arg(
                case.shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .arg(RUNS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let raw: Vec<u8> = case.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            child.stdin.take().unwrap().write_all(&raw).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        python_ort_p50 = v["p50_ms"].as_f64();
        lines.push(row(
            case.label,
            "(c) Python onnxruntime in-process",
            v["p50_ms"].as_f64().unwrap(),
            v["p99_ms"].as_f64().unwrap(),
            None,
            Some(v["rss_kib"].as_f64().unwrap() / 1024.0),
        ));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Killed(
            Command::new(py)
                .arg(bench_dir.join("fastapi_server.py"))
                .arg("m")
                .arg(&case.path)
                .arg(port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_until(|| async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let mut client = Client::tcp(port).await;
        let s = measure(&mut client, "/v2/models/m/infer", json_body(case), None).await;
        let rss = rss_kib(server.0.id()) as f64 / 1024.0;
        lines.push(row(
            case.label,
            "(d) FastAPI + onnxruntime, TCP JSON",
            s.p50_ms,
            s.p99_ms,
            Some(s.per_s),
            Some(rss),
        ));
        fastapi = Some((s, rss));
    }
    Served {
        lines,
        json: json_stats,
        bin: bin_stats,
        agent_rss,
        agent_idle_rss,
        fastapi,
        python_ort_p50,
    }
}

/// The median of `RUNS` timed calls of `f`, in ms, after a few warm-ups.
fn median_ms(mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let samples = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    stats(samples).p50_ms
}

/// Where a served request's time goes besides the model: the agent's own
/// codec on this case's bodies, in this process (the HTTP exchange is the
/// rest of the socket overhead).
fn codec_breakdown(case: &Case) -> String {
    let json = json_body(case);
    let (binary, header_len) = binary_body(case);
    let request: Value = serde_json::from_slice(&json).unwrap();
    let data_text = request["inputs"][0]["data"].to_string();
    let decode_json = median_ms(|| {
        std::hint::black_box(oip::decode_request(None, &json).unwrap());
    });
    let decode_data = median_ms(|| {
        std::hint::black_box(
            TensorData::from_json_text(&case.input, DataType::Fp32, &data_text, case.data.len())
                .unwrap(),
        );
    });
    let decode_binary = median_ms(|| {
        std::hint::black_box(oip::decode_request(Some(header_len), &binary).unwrap());
    });
    // An answer as large as the input (PP-OCR's classifier answers only
    // two numbers; detection models answer maps the input's size).
    let answer = tensor(case);
    let encode_json = median_ms(|| {
        std::hint::black_box(oip::encode_response(("m", 1), None, &[(&answer, false)]));
    });
    let encode_binary = median_ms(|| {
        std::hint::black_box(oip::encode_response(("m", 1), None, &[(&answer, true)]));
    });
    format!(
        "  → agent codec, {n} FP32 elements ({kb} KB of JSON): JSON request → tensors {decode_json:.3} ms \
         (of which the data array {decode_data:.3} ms), binary request → tensors {decode_binary:.3} ms; \
         an answer of that size as JSON {encode_json:.3} ms, as binary {encode_binary:.3} ms",
        n = case.data.len(),
        kb = json.len() / 1024,
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let python = std::env::var("EDGEFLEET_PYTHON")
        .ok()
        .filter(|p| !p.is_empty());
    let bench_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench");
    let tmp = tempfile::tempdir().unwrap();
    println!("edgefleet inference benchmark: {RUNS} runs per row after 20 warm-ups, single-threaded runtimes");
    println!(
        "{:<30} {:<34} {:>9} {:>9} {:>9} {:>10}",
        "model", "how", "p50 ms", "p99 ms", "req/s", "RSS MiB"
    );
    // The served measurements come first, while this process has loaded
    // no runtime library: the kernel cannot page out library pages that
    // another process maps too, so the agent's idle RSS would otherwise
    // include ONNX Runtime pages that are only resident for this process.
    let cases = cases();
    let mut served = Vec::new();
    for case in &cases {
        served.push(measure_served(case, tmp.path(), python.as_deref(), &bench_dir).await);
    }
    for (case, served) in cases.iter().zip(served) {
        let local = measure_in_process(case);
        for line in local.lines.iter().chain(&served.lines) {
            println!("{line}");
        }
        println!("{}", codec_breakdown(case));
        // Ratios for the targets.
        let (auto_runtime, chosen_in_process) = local.auto.unwrap_or(("none".into(), f64::NAN));
        println!(
            "  → socket overhead at p50: JSON {:+.3} ms, binary {:+.3} ms over in-process {auto_runtime}",
            served.json.p50_ms - chosen_in_process,
            served.bin.p50_ms - chosen_in_process
        );
        if let Some((name, best)) = &local.best_single {
            println!("  → automatic choice ({auto_runtime}) vs best single runtime ({name}): {:.2}x the latency", chosen_in_process / best);
        }
        if let Some((fastapi, rss)) = &served.fastapi {
            let p50 = fastapi.p50_ms;
            let below = |p99: f64| if p99 < p50 { "below" } else { "NOT below" };
            println!(
                "  → vs FastAPI (p50 {p50:.3} ms, p99 {:.3} ms): agent JSON {:.1}x faster at p50 (p99 {:.3} ms, {} FastAPI's p50), \
                 binary {:.1}x (p99 {:.3} ms, {} FastAPI's p50)",
                fastapi.p99_ms,
                p50 / served.json.p50_ms,
                served.json.p99_ms,
                below(served.json.p99_ms),
                p50 / served.bin.p50_ms,
                served.bin.p99_ms,
                below(served.bin.p99_ms),
            );
            println!(
                "  → vs FastAPI memory: {:.1}x less right after the load test, {:.1}x once idle",
                rss / served.agent_rss,
                rss / served.agent_idle_rss
            );
        }
        if let Some(py) = served.python_ort_p50 {
            println!(
                "  → agent binary over the socket vs onnxruntime in Python in-process: {:.2}x the latency at p50 ({:.3} vs {py:.3} ms)",
                served.bin.p50_ms / py,
                served.bin.p50_ms
            );
        }
    }
}
