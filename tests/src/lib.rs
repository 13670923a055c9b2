//! Harness for the end-to-end tests: real `fleet-server`, `fleetctl` and
//! `edgefleet-agent` processes on temp dirs and on ports the OS assigns.
//!
//! [`Server`] and [`Agent`] start and drive those processes, [`wait_for`]
//! is the one way a test waits for something, [`Proc`] holds a child
//! process and its log. The binaries are taken from the cargo target dir
//! (`target/debug` by default, or `$CARGO_TARGET_DIR`); if one is missing
//! it is built first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::Context;
use serde_json::Value;

pub use fleet_server::unix_http;

pub mod agent;
pub mod artifact_server;
pub mod balancer;
pub mod mosquitto;
pub mod process;
pub mod proxy;
pub mod server;
pub mod wait;

pub use agent::{Agent, AgentBuilder};
pub use process::Proc;
pub use server::{Server, ServerBuilder};
pub use wait::{wait_for, wait_for_showing, TimedOut};

/// A string no other call in this run, nor any other run, returns: the
/// process id, the time and a counter. For names that must not meet on a
/// shared broker or database (MQTT client ids, topic prefixes).
pub fn unique_suffix() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The shared MQTT broker tests may use: `EDGEFLEET_TEST_MQTT_URL`
/// (`.ci/run` sets `mqtt://127.0.0.1:1883`, where this machine kind runs
/// Mosquitto; elsewhere, start one with `mosquitto -p 1883` or point the
/// variable at yours). Fails, saying so, when nothing answers there.
pub fn shared_broker_url() -> anyhow::Result<String> {
    let url =
        std::env::var("EDGEFLEET_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let (host, port) = edgefleet_shared::broker_url::parse(&url).map_err(anyhow::Error::msg)?;
    if std::net::TcpStream::connect((host.as_str(), port)).is_err() {
        anyhow::bail!(
            "no MQTT broker at {url}: start Mosquitto there or set EDGEFLEET_TEST_MQTT_URL"
        );
    }
    Ok(url)
}

/// The PostgreSQL database tests use: `EDGEFLEET_TEST_POSTGRES_URL`
/// (`.ci/run` sets `postgres://postgres@127.0.0.1:5432/test`, where this
/// machine kind runs PostgreSQL), with a new, empty schema as the search
/// path, so runs never meet. Fails, saying so, when it is unreachable.
pub async fn fresh_postgres_database() -> anyhow::Result<String> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let url = std::env::var("EDGEFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!("no PostgreSQL at {url}: start one there or set EDGEFLEET_TEST_POSTGRES_URL")
        })?;
    tokio::spawn(conn);
    let schema = format!(
        "edgefleet_test_{}_{}_e2e{}",
        std::process::id(),
        edgefleet_shared::unix_now(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await?;
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{sep}options=-csearch_path%3D{schema}"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("debug")
}

/// Path of a workspace binary, building the binaries once if needed.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = target_dir().join(name);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(repo_root())
                .args(["build", "--workspace", "--bins"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the binaries failed");
        });
    }
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// The digits model in one variant (`int8`, `fp32`).
pub fn digits_model(variant: &str) -> PathBuf {
    repo_root()
        .join("models/digits")
        .join(format!("digits_{variant}.onnx"))
}

/// Held-out digit samples with their labels.
pub struct Samples {
    pub inputs: Vec<Vec<f64>>,
    pub labels: Vec<usize>,
}

/// The digit samples in `models/digits/samples.json` (16 images).
pub fn samples() -> Samples {
    load_samples("samples.json")
}

/// Every held-out digit image, `models/digits/test_set.json` (450): in-
/// distribution traffic for shadow and drift tests.
pub fn test_set() -> Samples {
    load_samples("test_set.json")
}

/// Digit samples from a file of `models/digits/` (`inputs`, `labels`).
fn load_samples(file: &str) -> Samples {
    let path = repo_root().join("models/digits").join(file);
    let text = std::fs::read(&path).expect("the digits samples are in the repository");
    let v: Value = serde_json::from_slice(&text).expect("a digits samples file is JSON");
    let number = |x: &Value| x.as_f64().expect("a digits samples file holds numbers");
    let inputs = v["inputs"]
        .as_array()
        .expect("a digits samples file has inputs")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("each input is an array")
                .iter()
                .map(number)
                .collect()
        })
        .collect();
    let labels = v["labels"]
        .as_array()
        .expect("a digits samples file has labels")
        .iter()
        .map(|x| number(x) as usize)
        .collect();
    Samples { inputs, labels }
}

/// The MQTT password in a device bundle's `agent.toml`.
pub fn bundle_password(bundle: &Path) -> String {
    std::fs::read_to_string(bundle.join("agent.toml"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("password = ")
                .map(|p| p.trim_matches('"').to_string())
        })
        .unwrap_or_default()
}

/// Runs `fleetctl` against `server`, with no token, and returns its
/// output ([`Server::ctl`] passes the admin token).
pub fn fleetctl(server: &str, args: &[&str]) -> Output {
    Command::new(binary("fleetctl"))
        .env("FLEETCTL_SERVER", server)
        .args(args)
        .output()
        .expect("run fleetctl")
}

/// Asserts that a `fleetctl` run succeeded, showing its stderr if not.
pub fn expect_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "fleetctl {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The JSON a successful `fleetctl --json` run printed.
pub fn json_output(out: &Output) -> Value {
    expect_success(out, "--json");
    serde_json::from_slice(&out.stdout).expect("fleetctl --json prints JSON")
}
