//! The agent release endpoints over real HTTP, against a whole server
//! started in-process (embedded broker on a free port, a temp data dir),
//! once on an SQLite file and once on a fresh PostgreSQL schema: push
//! (validation, the identical file again, a different file refused, the
//! upload cap), listing, deployment with the signed agent slot it
//! publishes, the artifact download devices make, deletion, the audit
//! log, and agent rollouts created through the API.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use fleet_server::config::ServerConfig;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const ARM: &str = "aarch64-unknown-linux-musl";
const X86: &str = "x86_64-unknown-linux-musl";

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

async fn start(database: Option<String>) -> Server {
    fleet_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    fleet_server::keys::init_keys(&dir.path().join("keys"), 1, 1, 365).unwrap();
    let mut config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database,
        max_upload_bytes: 64 * 1024,
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
    /// A call with an optional body: its status and JSON answer.
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
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    async fn push(&self, version: &str, target: &str, body: &[u8]) -> (StatusCode, Value) {
        self.call(
            Method::PUT,
            &format!("/api/v1/agent/releases/{version}/{target}?notes=first"),
            Some(body.to_vec()),
        )
        .await
    }

    async fn json(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(method, path, Some(serde_json::to_vec(&body).unwrap()))
            .await
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn agent_releases_are_pushed_listed_deployed_and_deleted(s: Server) {
    // An executable that compresses: devices get a .zst copy too.
    let arm_binary = b"\x7fELF arm agent ".repeat(200);
    let x86_binary = b"\x7fELF x86 agent ".repeat(200);

    // Refused input, each with its status.
    for (version, target, body, status) in [
        ("1.0", ARM, &b"x"[..], StatusCode::BAD_REQUEST),
        ("1.0.0+build", ARM, b"x", StatusCode::BAD_REQUEST),
        ("1.0.0", "Not_A_Triple", b"x", StatusCode::BAD_REQUEST),
        ("1.0.0", ARM, b"", StatusCode::BAD_REQUEST),
    ] {
        let (got, answer) = s.push(version, target, body).await;
        assert_eq!(got, status, "{version} {target}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, answer) = s.push("1.0.0", ARM, &vec![0u8; 64 * 1024 + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");

    let (status, arm) = s.push("1.0.0", ARM, &arm_binary).await;
    assert_eq!(status, StatusCode::CREATED, "{arm}");
    assert_eq!(arm["sha256"], sha256(&arm_binary));
    assert_eq!(arm["size"], arm_binary.len());
    assert_eq!(arm["target"], ARM);
    assert_eq!(arm["notes"], "first");
    assert_eq!(arm["pushed_by"], "bootstrap-admin");
    // The identical file again: what is stored.
    let (status, again) = s.push("1.0.0", ARM, &arm_binary).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(again, arm);
    let (status, answer) = s.push("1.0.0", ARM, b"another file").await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains(ARM), "{answer}");
    let (status, _) = s.push("1.0.0", X86, &x86_binary).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = s.push("0.9.0", ARM, b"old agent").await;
    assert_eq!(status, StatusCode::CREATED);

    let (status, releases) = s.call(Method::GET, "/api/v1/agent/releases", None).await;
    assert_eq!(status, StatusCode::OK);
    let versions: Vec<&str> = releases
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["0.9.0", "1.0.0"]);
    assert_eq!(releases[1]["builds"].as_array().unwrap().len(), 2);
    let (status, one) = s
        .call(Method::GET, "/api/v1/agent/releases/1.0.0", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, releases[1]);
    for (path, want) in [
        ("/api/v1/agent/releases/2.0.0", StatusCode::NOT_FOUND),
        ("/api/v1/agent/releases/latest", StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(s.call(Method::GET, path, None).await.0, want, "{path}");
    }

    // Deployments: bad requests, an unknown release, then two devices.
    for (body, want) in [
        (json!({"version": "1.0.0"}), StatusCode::BAD_REQUEST),
        (
            json!({"version": "1.0.0", "all": true, "devices": ["pi-1"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"version": "1.0.0", "devices": ["pi-1"], "model": "m"}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"version": "one", "devices": ["pi-1"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"version": "1.0.0", "devices": ["bad id!"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"version": "2.0.0", "devices": ["pi-1"]}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"version": "1.0.0", "tags": {"site": "nowhere"}}),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (status, answer) = s
            .json(Method::POST, "/api/v1/agent/deployments", body.clone())
            .await;
        assert_eq!(status, want, "{body}: {answer}");
    }
    let (status, deployed) = s
        .json(
            Method::POST,
            "/api/v1/agent/deployments",
            json!({"version": "1.0.0", "devices": ["pi-1", "pi-2"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{deployed}");
    assert_eq!(deployed["scope"], "devices");
    assert_eq!(deployed["allow_downgrade"], false);
    let published: Vec<&str> = deployed["published"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["device"].as_str().unwrap())
        .collect();
    assert_eq!(published, ["pi-1", "pi-2"]);

    // The signed document carries the slot, with download URLs.
    let (status, desired) = s
        .call(Method::GET, "/api/v1/devices/pi-1/desired", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{desired}");
    let slot = &desired["signed"]["agent"];
    assert_eq!(slot["version"], "1.0.0");
    assert!(slot.get("allow_downgrade").is_none(), "{slot}");
    let build = &slot["builds"][ARM];
    assert_eq!(build["sha256"], sha256(&arm_binary));
    assert_eq!(build["size"], arm_binary.len());
    let url = build["urls"][0].as_str().unwrap();
    assert_eq!(url, format!("{}/artifacts/{}", s.url, sha256(&arm_binary)));
    assert!(slot["builds"][X86].is_object(), "{slot}");
    assert!(desired["signed"]["models"].as_array().unwrap().is_empty());
    // Devices download it (resuming with Range), or its compressed copy.
    let whole = s.http.get(url).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.bytes().await.unwrap().as_ref(), &arm_binary[..]);
    let tail = s
        .http
        .get(url)
        .header("Range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &arm_binary[100..]);
    let zst = build["zstd"]["urls"][0].as_str().unwrap();
    assert_eq!(
        s.http.get(zst).send().await.unwrap().status(),
        StatusCode::OK
    );

    // A step back needs allow_downgrade, recorded in the slot.
    let (status, _) = s
        .json(
            Method::POST,
            "/api/v1/agent/deployments",
            json!({"version": "0.9.0", "devices": ["pi-2"], "allow_downgrade": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, desired) = s
        .call(Method::GET, "/api/v1/devices/pi-2/desired", None)
        .await;
    assert_eq!(desired["signed"]["agent"]["version"], "0.9.0");
    assert_eq!(desired["signed"]["agent"]["allow_downgrade"], true);

    // Deleting: a deployed release is refused; an unused one goes, and so
    // does its file.
    let (status, answer) = s
        .call(Method::DELETE, "/api/v1/agent/releases/1.0.0", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let (status, _) = s
        .json(
            Method::POST,
            "/api/v1/agent/deployments",
            json!({"version": "1.0.0", "devices": ["pi-2"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let old_url = format!("{}/artifacts/{}", s.url, sha256(b"old agent"));
    assert_eq!(
        s.http.get(&old_url).send().await.unwrap().status(),
        StatusCode::OK
    );
    let (status, gone) = s
        .call(Method::DELETE, "/api/v1/agent/releases/0.9.0", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{gone}");
    assert_eq!(gone["builds"][0]["target"], ARM);
    assert_eq!(
        s.http.get(&old_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.call(Method::DELETE, "/api/v1/agent/releases/0.9.0", None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // Every change is in the audit log.
    let (_, audit) = s.call(Method::GET, "/api/v1/audit", None).await;
    let actions: Vec<(&str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    for want in [
        ("agent.push", "1.0.0/aarch64-unknown-linux-musl"),
        ("agent.push", "1.0.0/x86_64-unknown-linux-musl"),
        ("agent.deploy", "1.0.0"),
        ("agent.deploy", "0.9.0"),
        ("agent.delete", "0.9.0"),
    ] {
        assert!(actions.contains(&want), "{want:?} not in {actions:?}");
    }
    let deploy = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "agent.deploy")
        .unwrap();
    assert_eq!(
        deploy["detail"],
        json!({"allow_downgrade": false, "target": {"devices": ["pi-1", "pi-2"]}})
    );

    // Agent rollouts through the rollout endpoints.
    for (body, want) in [
        (
            json!({"id": "a0", "agent": "1.0.0", "model": "m", "version": 1, "devices": ["pi-1"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"id": "a0", "agent": "7.0.0", "devices": ["pi-1"]}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"id": "a0", "devices": ["pi-1"]}),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let (status, answer) = s.json(Method::POST, "/api/v1/rollouts", body.clone()).await;
        assert_eq!(status, want, "{body}: {answer}");
    }
    let (status, rollout) = s
        .json(
            Method::POST,
            "/api/v1/rollouts",
            json!({"id": "a1", "agent": "1.0.0", "devices": ["pi-1", "pi-2"], "waves": [{"count": 1}, {"percent": 100}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rollout}");
    assert_eq!(rollout["agent"], "1.0.0");
    let (_, listed) = s.call(Method::GET, "/api/v1/rollouts", None).await;
    assert_eq!(listed[0]["agent"], "1.0.0");
}

#[tokio::test]
async fn agent_releases_on_sqlite() {
    agent_releases_are_pushed_listed_deployed_and_deleted(start(None).await).await;
}

#[tokio::test]
async fn agent_releases_on_postgres() {
    let url = common::fresh_postgres_schema("agent").await;
    agent_releases_are_pushed_listed_deployed_and_deleted(start(Some(url)).await).await;
}
