//! The standalone agent's local API: Open Inference Protocol v2 over a
//! Unix socket, and a clear 4xx for every kind of bad request, after which
//! it keeps serving.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use http::Method;
use serde_json::json;

use edgefleet_tests::{digits_model, samples, Agent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_agent_serves_and_rejects_bad_requests_clearly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"definitely not a model")?;
    let fp32 = digits_model("fp32");
    let agent = Agent::start_standalone(
        &dir.path().join("agent"),
        &[("digits", &fp32), ("broken", &junk)],
    )?;
    agent.wait_ready().await?;

    let (status, live) = agent.request(Method::GET, "/v2/health/live", None).await?;
    assert!(status.is_success() && live["live"] == true);
    let (_, server) = agent.request(Method::GET, "/v2", None).await?;
    assert_eq!(server["name"], "edgefleet-agent");
    let (status, ready) = agent
        .request(Method::GET, "/v2/models/digits/versions/1/ready", None)
        .await?;
    assert!(status.is_success() && ready["ready"] == true);

    let s = samples();
    let nested: Vec<Vec<f64>> = s.inputs[..4].to_vec();
    let body = json!({"id": "req-1", "inputs": [{"name": "input", "shape": [4, 64], "datatype": "FP32", "data": nested}],
                      "outputs": [{"name": "probabilities"}]});
    let (status, reply) = agent
        .request(Method::POST, "/v2/models/digits/infer", Some(&body))
        .await?;
    assert!(status.is_success(), "{reply}");
    assert_eq!(reply["id"], "req-1");
    assert_eq!(reply["model_version"], "1");
    assert_eq!(reply["outputs"][0]["shape"], json!([4, 10]));
    let probs: Vec<f64> = reply["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (row, label) in probs.chunks(10).zip(&s.labels) {
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(best, *label);
    }

    let input = |shape: serde_json::Value, datatype: &str, data: serde_json::Value| json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]});
    let row = json!(s.inputs[0]);
    let cases = [
        (
            "/v2/models/digits/infer",
            json!("{not json"),
            400,
            "malformed",
        ),
        (
            "/v2/models/digits/infer",
            input(json!([1, 63]), "FP32", json!(vec![0.0; 63])),
            400,
            "shape",
        ),
        (
            "/v2/models/digits/infer",
            input(json!([1, 64]), "INT64", json!(vec![0; 64])),
            400,
            "datatype INT64",
        ),
        (
            "/v2/models/digits/infer",
            input(json!([2, 64]), "FP32", row.clone()),
            400,
            "elements",
        ),
        (
            "/v2/models/digits/infer",
            input(json!([1, 64]), "FP17", row.clone()),
            400,
            "unsupported datatype",
        ),
        (
            "/v2/models/digits/infer",
            input(json!([1, 64]), "FP32", json!(["x"])),
            400,
            "expected a number",
        ),
        (
            "/v2/models/nope/infer",
            input(json!([1, 64]), "FP32", row.clone()),
            404,
            "unknown model",
        ),
        (
            "/v2/models/broken/infer",
            input(json!([1, 64]), "FP32", row.clone()),
            404,
            "unknown model",
        ),
        (
            "/v2/models/digits/versions/7/infer",
            input(json!([1, 64]), "FP32", row.clone()),
            404,
            "version 7",
        ),
    ];
    for (path, body, code, needle) in cases {
        let (status, reply) = if body.is_string() {
            // Send the raw string as the body, not as a JSON string.
            raw_post(&agent, path, body.as_str().unwrap()).await?
        } else {
            agent.request(Method::POST, path, Some(&body)).await?
        };
        assert_eq!(status.as_u16(), code, "{path} {body}: {reply}");
        let message = reply["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{path}: {message:?} should mention {needle:?}"
        );
    }
    let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}], "outputs": [{"name": "logits"}]});
    let (status, reply) = agent
        .request(Method::POST, "/v2/models/digits/infer", Some(&body))
        .await?;
    assert_eq!(status.as_u16(), 400);
    assert!(reply["error"]
        .as_str()
        .unwrap()
        .contains("unknown output \"logits\""));

    // Still serving after all that.
    assert_eq!(agent.classify(&s.inputs[5]).await?, s.labels[5]);

    // Triton-style statistics count what was served and what failed in
    // the model (shape/datatype errors are caught before it and fail too).
    let (status, stats) = agent
        .request(Method::GET, "/v2/models/digits/stats", None)
        .await?;
    assert!(status.is_success());
    let m = &stats["model_stats"][0];
    assert_eq!(m["inference_count"], 2, "{stats}");
    assert!(
        m["inference_stats"]["fail"]["count"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    assert!(m["latency_us"]["p50"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(
        agent.proc.log_text().contains("local model not served"),
        "the broken model was reported"
    );
    Ok(())
}

async fn raw_post(
    agent: &Agent,
    path: &str,
    body: &str,
) -> anyhow::Result<(http::StatusCode, serde_json::Value)> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::UnixStream::connect(&agent.socket).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", "agent")
        .body(Full::new(bytes::Bytes::from(body.to_string())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&bytes)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_cannot_steal_a_live_socket_but_replaces_a_stale_one() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let model = digits_model("int8");
    let first = Agent::start_standalone(&dir.path().join("a"), &[("digits", &model)])?;
    first.wait_ready().await?;
    let mut second = Agent::start_standalone(&dir.path().join("a"), &[("digits", &model)])?;
    let status = tokio::task::spawn_blocking(move || {
        let s = second.child_wait();
        (s, second)
    })
    .await?;
    assert!(!status.0.success());
    assert!(
        status.1.proc.log_text().contains("already serving"),
        "{}",
        status.1.proc.log_text()
    );
    // Kill the first one hard: its socket file stays behind, and a new
    // agent replaces it.
    drop(first);
    let third = Agent::start_standalone(&dir.path().join("a"), &[("digits", &model)])?;
    third.wait_ready().await?;
    Ok(())
}

trait WaitChild {
    fn child_wait(&mut self) -> std::process::ExitStatus;
}

impl WaitChild for Agent {
    fn child_wait(&mut self) -> std::process::ExitStatus {
        self.proc.child.wait().unwrap()
    }
}

/// Sends `json` + `binary` with Triton's binary extension header and
/// returns (status, JSON part, binary part).
async fn binary_post(
    agent: &Agent,
    path: &str,
    json: &serde_json::Value,
    binary: &[u8],
) -> anyhow::Result<(http::StatusCode, serde_json::Value, Vec<u8>)> {
    use http_body_util::{BodyExt, Full};
    let header = serde_json::to_vec(json)?;
    let mut body = header.clone();
    body.extend_from_slice(binary);
    let stream = tokio::net::UnixStream::connect(&agent.socket).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header("host", "agent")
        .header("inference-header-content-length", header.len())
        .body(Full::new(bytes::Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let json_len: Option<usize> = resp
        .headers()
        .get("inference-header-content-length")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = resp.into_body().collect().await?.to_bytes();
    let split = json_len.unwrap_or(bytes.len());
    Ok((
        status,
        serde_json::from_slice(&bytes[..split])?,
        bytes[split..].to_vec(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensor_extension_matches_json_results() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = digits_model("int8");
    let agent = Agent::start_standalone(&dir.path().join("agent"), &[("digits", &model)])?;
    agent.wait_ready().await?;
    let s = samples();
    let pixels: Vec<u8> = s.inputs[..3]
        .iter()
        .flatten()
        .flat_map(|&x| (x as f32).to_le_bytes())
        .collect();
    let request = json!({
        "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "parameters": {"binary_data_size": pixels.len()}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]
    });
    let (status, header, raw) =
        binary_post(&agent, "/v2/models/digits/infer", &request, &pixels).await?;
    assert!(status.is_success(), "{header}");
    assert_eq!(
        header["outputs"][0]["parameters"]["binary_data_size"],
        3 * 10 * 4
    );
    assert!(header["outputs"][0].get("data").is_none());
    let probs: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(probs.len(), 30);

    // The same request as JSON gives the same numbers (to float32 precision).
    let json_request = json!({"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": s.inputs[..3]}]});
    let (_, reply) = agent
        .request(Method::POST, "/v2/models/digits/infer", Some(&json_request))
        .await?;
    let json_probs: Vec<f64> = reply["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // JSON carries each FP32 value as a decimal; it must round-trip to
    // the very same float32.
    for (b, j) in probs.iter().zip(&json_probs) {
        assert_eq!(*b, *j as f32);
    }
    for (row, label) in probs.chunks(10).zip(&s.labels) {
        let best = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(best, *label);
    }

    // A truncated binary body is refused with a reason, and serving goes on.
    let (status, header, _) =
        binary_post(&agent, "/v2/models/digits/infer", &request, &pixels[..100]).await?;
    assert_eq!(status.as_u16(), 400);
    assert!(
        header["error"].as_str().unwrap().contains("truncated"),
        "{header}"
    );
    assert_eq!(agent.classify(&s.inputs[1]).await?, s.labels[1]);
    Ok(())
}

/// `serve --test-vector NAME=FILE`: a model is served only when every
/// runtime that serves it reproduces the vector, the runtimes are timed on
/// its inputs, and a wrong or unreadable vector keeps that model (only)
/// out with a reason in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_test_vectors_gate_the_model_and_name_the_problem() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fp32 = digits_model("fp32");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(
        edgefleet_tests::repo_root().join("models/digits/samples.json"),
    )?)?;
    let vector = |shift: f64| {
        let rows = &v["inputs"].as_array().unwrap()[..3];
        let probs: Vec<f64> = v["fp32_probabilities"].as_array().unwrap()[..3]
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() + shift)
            })
            .collect();
        let data: Vec<f64> = rows
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        json!({
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 64], "data": data}],
            "expected": [{"name": "probabilities", "datatype": "FP32", "shape": [3, 10], "data": probs}],
            "tolerance": 1e-4,
        })
    };
    let good = dir.path().join("good.json");
    std::fs::write(&good, serde_json::to_vec(&vector(0.0))?)?;
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, serde_json::to_vec(&vector(0.25))?)?;
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, b"{\"inputs\": 3}")?;
    let arg = |name: &str, path: &std::path::Path| -> [std::ffi::OsString; 2] {
        [
            "--test-vector".into(),
            format!("{name}={}", path.display()).into(),
        ]
    };
    let extra: Vec<std::ffi::OsString> =
        [arg("good", &good), arg("wrong", &wrong), arg("junk", &junk)]
            .into_iter()
            .flatten()
            .collect();
    let agent = Agent::start_standalone_with(
        &dir.path().join("agent"),
        &[("good", &fp32), ("wrong", &fp32), ("junk", &fp32)],
        &extra,
    )?;
    agent.wait_ready().await?;

    let (status, meta) = agent.request(Method::GET, "/v2/models/good", None).await?;
    assert!(status.is_success(), "{meta}");
    let trials = meta["parameters"]["runtime_trials"].as_array().unwrap();
    let chosen = meta["parameters"]["runtime"].as_str().unwrap();
    let chosen_trial = trials.iter().find(|t| t["runtime"] == chosen).unwrap();
    // "ok" (not "unverified"): the chosen runtime reproduced the vector.
    assert_eq!(chosen_trial["status"], "ok", "{meta}");

    for name in ["wrong", "junk"] {
        let (status, body) = agent
            .request(Method::GET, &format!("/v2/models/{name}"), None)
            .await?;
        assert_eq!(status, http::StatusCode::NOT_FOUND, "{name}: {body}");
    }
    let log = agent.proc.log_text();
    assert!(
        log.lines().any(|l| l.contains("model=wrong") && l.contains("no runtime produced correct results")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("model=junk") && l.contains("is not a test vector")),
        "{log}"
    );

    // A vector for a model that is not given is a usage error.
    let out = std::process::Command::new(edgefleet_tests::binary("edgefleet-agent"))
        .args(["serve", "--model"])
        .arg(format!("good={}", fp32.display()))
        .arg("--test-vector")
        .arg(format!("nope={}", good.display()))
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("names no model"));
    Ok(())
}
