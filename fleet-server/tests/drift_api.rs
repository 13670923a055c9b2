//! Drift monitoring's endpoints over real HTTP, against a whole server
//! started in-process (embedded broker on a free port, SQLite in a temp
//! data dir): a reference set from the repository's digits samples, bad
//! reference files refused naming their problem, the reference's bins in
//! the signed slot of a device assigned the version (re-published when
//! the reference changes), a reference from traffic refused without
//! traffic, the drift report, and the endpoints in the OpenAPI document.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use fleet_server::config::ServerConfig;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

struct Server {
    url: String,
    token: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Server {
    fleet_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    fleet_server::keys::init_keys(&dir.path().join("keys"), 1, 1, 365).unwrap();
    let mut config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        ..ServerConfig::default()
    };
    config.keys_dir = Some(dir.path().join("keys"));
    config.broker.embedded_listen = Some("127.0.0.1:0".parse().unwrap());
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let (running, _) = fleet_server::start(config, http, shutdown.clone())
        .await
        .unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    Server {
        url: format!("http://{}", running.http),
        token,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
        shutdown,
        _dir: dir,
    }
}

impl Server {
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    async fn json(&self, method: Method, path: &str, body: &Value) -> (StatusCode, Value) {
        self.call(method, path, Some(serde_json::to_vec(body).unwrap()))
            .await
    }
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The digits samples as a reference file.
fn reference_file() -> Value {
    let samples: Value =
        serde_json::from_slice(&std::fs::read(repo("models/digits/samples.json")).unwrap())
            .unwrap();
    let inputs = samples["inputs"].as_array().unwrap();
    let outputs = samples["fp32_probabilities"].as_array().unwrap();
    json!({
        "samples": inputs.iter().zip(outputs).map(|(i, o)| json!({
            "inputs": {"input": i},
            "outputs": {"probabilities": o},
        })).collect::<Vec<_>>()
    })
}

/// The drift spec in the signed desired state of `device`.
async fn slot_drift(s: &Server, device: &str) -> (u64, Value) {
    let (status, desired) = s
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}/desired"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{desired}");
    let document = &desired["signed"];
    (
        document["version"].as_u64().unwrap(),
        document["models"][0]["drift"].clone(),
    )
}

#[tokio::test]
async fn references_are_set_checked_signed_and_reported() {
    let s = start().await;
    let model = std::fs::read(repo("models/digits/digits_fp32.onnx")).unwrap();
    let (status, body) = s
        .call(
            Method::POST,
            "/api/v1/models/digits/versions/1",
            Some(model),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let spec = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    });
    let (status, body) = s
        .json(Method::PUT, "/api/v1/models/digits/versions/1/spec", &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s
        .json(
            Method::POST,
            "/api/v1/deployments",
            &json!({"model": "digits", "version": 1, "devices": ["pi-1"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (before, drift) = slot_drift(&s, "pi-1").await;
    assert!(drift.is_null(), "no reference, no drift spec: {drift}");

    // Bad files, each refused naming its problem.
    let put = |body: Vec<u8>| {
        let s = &s;
        async move {
            s.call(
                Method::PUT,
                "/api/v1/models/digits/versions/1/reference",
                Some(body),
            )
            .await
        }
    };
    let (status, body) = put(b"nope".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );
    let (status, body) = put(br#"{"samples": []}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("no samples"),
        "{body}"
    );
    let mut unknown = reference_file();
    for sample in unknown["samples"].as_array_mut().unwrap() {
        sample["inputs"]["image"] = json!([1.0, 2.0]);
    }
    let (status, body) = put(serde_json::to_vec(&unknown).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("\"image\""),
        "{body}"
    );
    let mut short = reference_file();
    short["samples"][1]["inputs"]["input"] = json!([1.0, 2.0, 3.0]);
    let (status, body) = put(serde_json::to_vec(&short).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("sample 1") && error.contains("3 values"),
        "{body}"
    );
    let (status, _) = s
        .call(
            Method::PUT,
            "/api/v1/models/digits/versions/9/reference",
            Some(serde_json::to_vec(&reference_file()).unwrap()),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // From traffic: nothing to make it from before a reference is in force.
    let (status, body) = s
        .json(
            Method::POST,
            "/api/v1/models/digits/versions/1/reference/from-traffic",
            &json!({"since": 0, "until": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no reference in force"),
        "{body}"
    );

    // A good file: four features, the device's slot re-signed with them.
    let (status, set) = put(serde_json::to_vec(&reference_file()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["reference"]["samples"], 16);
    assert_eq!(
        set["features"],
        json!([
            "input/mean",
            "input/std",
            "probabilities/argmax",
            "probabilities/max_value"
        ])
    );
    assert_eq!(set["published"][0]["device"], "pi-1");
    let (after, drift) = slot_drift(&s, "pi-1").await;
    assert!(after > before);
    let features = drift["features"].as_array().unwrap();
    assert_eq!(features.len(), 4);
    assert_eq!(features[2]["feature"], "argmax");
    assert_eq!(
        (features[2]["lo"].as_f64(), features[2]["bins"].as_u64()),
        (Some(0.0), Some(10))
    );

    // With a reference in force but no traffic in the period: refused.
    let (status, body) = s
        .json(
            Method::POST,
            "/api/v1/models/digits/versions/1/reference/from-traffic",
            &json!({"since": 0, "until": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no drift statistics"),
        "{body}"
    );

    let (status, drift) = s
        .call(Method::GET, "/api/v1/models/digits/drift", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{drift}");
    assert_eq!(drift["threshold"], 0.25);
    assert_eq!(drift["drifting"], false);
    assert_eq!(drift["versions"][0]["reference"]["source"], "file");
    assert!(drift["versions"][0]["fleet"].is_null());
    let (status, _) = s
        .call(Method::GET, "/api/v1/models/nothing/drift", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, doc) = s.call(Method::GET, "/api/v1/openapi.json", None).await;
    for path in [
        "/api/v1/models/{name}/drift",
        "/api/v1/models/{name}/versions/{version}/reference",
        "/api/v1/models/{name}/versions/{version}/reference/from-traffic",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["ModelDrift"].is_object());
}
