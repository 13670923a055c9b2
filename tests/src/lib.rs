//! Harness for the end-to-end tests: real `fleet-server`, `fleetctl` and
//! `edgefleet-agent` processes on temp dirs and free ports.
//!
//! The binaries are taken from the cargo target dir (`target/debug` by
//! default, or `$CARGO_TARGET_DIR`); if one is missing it is built first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

pub use fleet_server::unix_http;

pub mod artifact_server;
pub mod mosquitto;
pub mod proxy;

/// The repository root.
/// The PostgreSQL database tests use: `EDGEFLEET_TEST_POSTGRES_URL`
/// (`.ci/run` sets `postgres://postgres@127.0.0.1:5432/test`, where this
/// machine kind runs PostgreSQL), with a new, empty schema as the search
/// path, so runs never meet. Fails, saying so, when it is unreachable.
pub async fn fresh_postgres_database() -> anyhow::Result<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
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
                .args([
                    "build",
                    "-p",
                    "edgefleet-agent",
                    "-p",
                    "fleet-server",
                    "--bins",
                ])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the binaries failed");
        });
    }
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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

pub fn samples() -> Samples {
    let v: Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("models/digits/samples.json")).unwrap(),
    )
    .unwrap();
    let inputs = v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let labels = v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
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

/// Polls `f` until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process killed when dropped, with its log kept for failures.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env("EDGEFLEET_LOG", "debug,hyper=info,reqwest=info")
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait up to `grace` for a clean exit.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// A running fleet server with its embedded broker.
pub struct Server {
    pub proc: Proc,
    pub url: String,
    /// Port of the embedded broker (unused with an external one).
    pub mqtt_port: u16,
    /// What agents connect to.
    pub mqtt_url: String,
    pub topic_prefix: String,
    pub keys_dir: PathBuf,
    pub dir: PathBuf,
    /// The admin token the server wrote on its first start.
    pub token: String,
    /// The `fleet-server` arguments, for [`Server::restart`].
    args: Vec<std::ffi::OsString>,
    starts: u32,
}

impl Server {
    /// A server with its embedded broker.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, None, None).await
    }

    /// A server on an external broker (`mqtt://host:port`), with a topic
    /// prefix of its own so parallel tests and earlier runs' retained
    /// messages never meet.
    pub async fn start_external(dir: &Path, broker: &str) -> anyhow::Result<Self> {
        Self::start_with(dir, Some(broker), None).await
    }

    /// A server on an external broker (`None`: the embedded one) and
    /// database (`None`: SQLite in its data dir).
    pub async fn start_with(
        dir: &Path,
        broker: Option<&str>,
        database: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_full(dir, broker, database, &[]).await
    }

    /// As [`Server::start_with`], with extra `fleet-server serve` arguments.
    pub async fn start_full(
        dir: &Path,
        broker: Option<&str>,
        database: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let keys_dir = dir.join("keys");
        let out = Command::new(binary("fleetctl"))
            .args(["keys", "init", "--dir"])
            .arg(&keys_dir)
            .output()?;
        if !out.status.success() {
            bail!("keys init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let http_port = free_port();
        let mqtt_port = free_port();
        let mut cmd = Command::new(binary("fleet-server"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir.join("server"))
            .arg("--keys-dir")
            .arg(&keys_dir)
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"));
        let (mqtt_url, topic_prefix) = match broker {
            None => {
                cmd.arg("--mqtt-listen")
                    .arg(format!("127.0.0.1:{mqtt_port}"));
                (
                    format!("mqtt://127.0.0.1:{mqtt_port}"),
                    "edgefleet/v1".to_string(),
                )
            }
            Some(url) => {
                let prefix = format!("edgefleet-test-{}-{http_port}/v1", std::process::id());
                cmd.arg("--broker")
                    .arg(url)
                    .arg("--topic-prefix")
                    .arg(&prefix);
                (url.to_string(), prefix)
            }
        };
        if let Some(database) = database {
            cmd.arg("--database").arg(database);
        }
        cmd.args(extra);
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let url = format!("http://127.0.0.1:{http_port}");
        let proc = Self::spawn_ready(&args, &url, dir.join("server.log")).await?;
        let token_file = dir.join("server").join("admin.token");
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("the server wrote no {}", token_file.display()))?
            .trim()
            .to_string();
        Ok(Self {
            token,
            proc,
            url,
            mqtt_port,
            mqtt_url,
            topic_prefix,
            keys_dir,
            dir: dir.to_path_buf(),
            args,
            starts: 1,
        })
    }

    async fn spawn_ready(
        args: &[std::ffi::OsString],
        url: &str,
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(binary("fleet-server"));
        cmd.args(args);
        let mut proc = Proc::spawn(cmd, log)?;
        fleet_server::install_crypto_provider();
        let health = format!("{url}/api/v1/health");
        let started = wait_for("fleet server health", Duration::from_secs(20), || {
            let health = health.clone();
            async move {
                reqwest::get(&health)
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ())
            }
        })
        .await;
        if let Err(e) = started {
            let status = proc.child.try_wait()?;
            bail!("{e}; exit status {status:?}; log:\n{}", proc.log_text());
        }
        Ok(proc)
    }

    /// Kills the server (SIGKILL: with the embedded broker, the broker
    /// goes with it).
    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// Starts the server again on the same ports and data (after
    /// [`Server::kill`]).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.starts += 1;
        let log = self.dir.join(format!("server-{}.log", self.starts));
        self.proc = Self::spawn_ready(&self.args, &self.url, log).await?;
        Ok(())
    }

    /// An authenticated GET of an API path (with the admin token).
    pub async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?)
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.get(path).await?.json().await?)
    }

    /// Runs `fleetctl` against this server with its admin token.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(binary("fleetctl"))
            .env("FLEETCTL_SERVER", &self.url)
            .env("EDGEFLEET_TOKEN", &self.token)
            .args(args)
            .output()
            .expect("run fleetctl")
    }

    /// The device record once it reports `model` at `version` as served.
    pub async fn wait_for_model(
        &self,
        device: &str,
        model: &str,
        version: u64,
    ) -> anyhow::Result<Value> {
        let path = format!("/api/v1/devices/{device}");
        wait_for(
            &format!("{device} serving {model} v{version}"),
            Duration::from_secs(60),
            || {
                let path = path.clone();
                async move {
                    let d = self.get_json(&path).await.ok()?;
                    let serving = d["models"]
                        .as_array()?
                        .iter()
                        .any(|m| m["name"] == model && m["version"] == version);
                    (serving && d["online"] == true).then_some(d)
                }
            },
        )
        .await
    }

    /// `fleetctl model push`, asserting success.
    pub fn push(&self, model: &Path, name: &str, version: u64) {
        let out = self.ctl(&[
            "model",
            "push",
            model.to_str().unwrap(),
            "--name",
            name,
            "--version",
            &version.to_string(),
        ]);
        expect_success(&out, "model push");
    }

    /// `fleetctl deploy` to `target` (`--all` or a device id), asserting success.
    pub fn deploy(&self, name: &str, version: u64, target: &str) {
        let version = version.to_string();
        let mut args = vec!["deploy", "--model", name, "--version", &version];
        if target == "--all" {
            args.push("--all");
        } else {
            args.extend(["--device", target]);
        }
        expect_success(&self.ctl(&args), "deploy");
    }

    pub fn root_document(&self) -> PathBuf {
        self.keys_dir.join("root.json")
    }

    /// The server's online signing key (the test plays the operator, or
    /// an attacker who stole it).
    pub fn online_key(&self) -> edgefleet_shared::SecretKey {
        fleet_server::keys::read_key(&self.keys_dir.join("online.key")).expect("online key")
    }

    /// The desired state the server last signed for `device`.
    pub async fn desired(
        &self,
        device: &str,
    ) -> anyhow::Result<(edgefleet_shared::Signed, edgefleet_shared::DesiredState)> {
        let bytes = self
            .get(&format!("/api/v1/devices/{device}/desired"))
            .await?
            .bytes()
            .await?;
        let envelope = edgefleet_shared::Signed::from_json(&bytes)?;
        let doc = envelope.parse_unverified()?;
        Ok((envelope, doc))
    }

    /// Publishes `payload` retained on `device`'s desired-state topic of
    /// the embedded broker, as anyone with broker access could.
    pub async fn publish_desired(&self, device: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        let topic = edgefleet_shared::TopicPrefix::new(self.topic_prefix.clone())?
            .device(
                &edgefleet_shared::DeviceId::new(device)?,
                edgefleet_shared::TopicKind::Desired,
            )
            .to_string();
        self.publish_retained(&topic, payload).await
    }

    /// The topic the server publishes its root chain on.
    pub fn roots_topic(&self) -> String {
        edgefleet_shared::TopicPrefix::new(self.topic_prefix.clone())
            .expect("valid prefix")
            .roots()
    }

    /// Publishes `payload` retained on `topic` of the embedded broker.
    pub async fn publish_retained(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        let mut options = rumqttc::MqttOptions::new(
            format!("test-publisher-{}", free_port()),
            "127.0.0.1",
            self.mqtt_port,
        );
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
            .await?;
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("test publisher: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .await?;
        Ok(())
    }

    /// The update events the server stored for `device`, newest first
    /// (empty if they cannot be read).
    pub async fn events(&self, device: &str) -> Vec<Value> {
        self.get_json(&format!("/api/v1/devices/{device}/events"))
            .await
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits for an update event of `device` that `matches`; returns it.
    /// On timeout the error lists the device's events.
    pub async fn wait_event_matching(
        &self,
        device: &str,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let found = wait_for(what, timeout, || async {
            self.events(device).await.into_iter().find(&matches)
        })
        .await;
        match found {
            Ok(event) => Ok(event),
            Err(e) => bail!("{e}\nevents of {device}: {:?}", self.events(device).await),
        }
    }

    /// Waits for an update event of `device` with this kind and model
    /// version; returns it.
    pub async fn wait_event(
        &self,
        device: &str,
        kind: &str,
        model_version: u64,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.wait_event_matching(
            device,
            &format!("{kind} event for model version {model_version}"),
            timeout,
            |e| e["kind"] == kind && e["model_version"] == model_version,
        )
        .await
    }

    /// A model slot for `bytes` as the test signs it itself: the name
    /// `digits`, ONNX, downloaded from `url`, nothing optional.
    pub fn digits_slot(bytes: &[u8], version: u64, url: String) -> edgefleet_shared::ModelSlot {
        use sha2::Digest;
        edgefleet_shared::ModelSlot {
            name: "digits".into(),
            version,
            format: edgefleet_shared::ModelFormat::Onnx,
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            size: bytes.len() as u64,
            urls: vec![url],
            inputs: vec![],
            outputs: vec![],
            test_vector: None,
            soak: None,
            upload_results: false,
            zstd: None,
        }
    }
}

/// A running agent.
pub struct Agent {
    pub proc: Proc,
    pub id: String,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Agent {
    /// Starts an agent in fleet mode against `server`.
    pub fn start_fleet(dir: &Path, id: &str, server: &Server) -> anyhow::Result<Self> {
        Self::start_fleet_with(dir, id, server, None, "")
    }

    /// Starts an agent in fleet mode against `server`, connecting to
    /// `mqtt_url` instead of the server's broker address when given (a
    /// proxy), with `extra` appended to its config file (TOML tables).
    pub fn start_fleet_with(
        dir: &Path,
        id: &str,
        server: &Server,
        mqtt_url: Option<&str>,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let agent_dir = dir.join(id);
        std::fs::create_dir_all(&agent_dir)?;
        let socket = agent_dir.join("agent.sock");
        let config = format!(
            "device_id = \"{id}\"\ndata_dir = \"{data}\"\nroot_document = \"{root}\"\n[api]\nsocket = \"{sock}\"\n[mqtt]\nurl = \"{mqtt}\"\ntopic_prefix = \"{prefix}\"\nkeep_alive_secs = 5\n{update}",
            data = agent_dir.join("data").display(),
            root = server.root_document().display(),
            sock = socket.display(),
            mqtt = mqtt_url.unwrap_or(&server.mqtt_url),
            prefix = server.topic_prefix,
            // `extra` may bring its own [update] table.
            update = if extra.contains("[update]") { "" } else { "[update]\ndownload_stall_secs = 5\n" },
        ) + extra;
        Self::run_config(agent_dir, id, socket, &config)
    }

    /// Writes `config` to `{agent_dir}/agent.toml` and runs the agent on it.
    fn run_config(
        agent_dir: PathBuf,
        id: &str,
        socket: PathBuf,
        config: &str,
    ) -> anyhow::Result<Self> {
        let config_path = agent_dir.join("agent.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(binary("edgefleet-agent"));
        cmd.arg("run").arg("--config").arg(&config_path);
        Ok(Self {
            proc: Proc::spawn(cmd, agent_dir.join("agent.log"))?,
            id: id.to_string(),
            socket,
            dir: agent_dir,
        })
    }

    /// Starts an agent from a device bundle (`fleetctl devices enroll`),
    /// with its device paths moved under `dir`.
    pub fn start_from_bundle(dir: &Path, id: &str, bundle: &Path) -> anyhow::Result<Self> {
        let agent_dir = dir.join(id);
        std::fs::create_dir_all(&agent_dir)?;
        let socket = agent_dir.join("agent.sock");
        let config = std::fs::read_to_string(bundle.join("agent.toml"))?
            .replace(
                "/var/lib/edgefleet",
                &agent_dir.join("data").display().to_string(),
            )
            .replace(
                "/etc/edgefleet/root.json",
                &bundle.join("root.json").display().to_string(),
            )
            .replace("/run/edgefleet/agent.sock", &socket.display().to_string());
        Self::run_config(agent_dir, id, socket, &config)
    }

    /// Starts a standalone agent serving local files.
    pub fn start_standalone(dir: &Path, models: &[(&str, &Path)]) -> anyhow::Result<Self> {
        Self::start_standalone_with(dir, models, &[])
    }

    /// Starts a standalone agent serving local files, with extra arguments
    /// for `edgefleet-agent serve`.
    pub fn start_standalone_with(
        dir: &Path,
        models: &[(&str, &Path)],
        extra: &[std::ffi::OsString],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("agent.sock");
        let mut cmd = Command::new(binary("edgefleet-agent"));
        cmd.arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(dir.join("data"));
        for (name, path) in models {
            cmd.arg("--model").arg(format!("{name}={}", path.display()));
        }
        cmd.args(extra);
        Ok(Self {
            proc: Proc::spawn(cmd, dir.join("agent.log"))?,
            id: "standalone".into(),
            socket,
            dir: dir.to_path_buf(),
        })
    }

    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(http::StatusCode, Value)> {
        unix_http::request(&self.socket, method, path, body).await
    }

    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for(
            &format!("agent {} ready", self.id),
            Duration::from_secs(30),
            || async {
                self.request(http::Method::GET, "/v2/health/ready", None)
                    .await
                    .ok()
                    .filter(|(s, _)| s.is_success())
                    .map(|_| ())
            },
        )
        .await
        .with_context(|| self.proc.log_text())
    }

    /// Classifies one digit; returns the predicted label.
    pub async fn classify(&self, pixels: &[f64]) -> anyhow::Result<usize> {
        let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": pixels}]});
        let (status, reply) = self
            .request(http::Method::POST, "/v2/models/digits/infer", Some(&body))
            .await?;
        if !status.is_success() {
            bail!("inference failed: {status} {reply}");
        }
        let probs = reply["outputs"][0]["data"]
            .as_array()
            .context("no output data")?;
        Ok(probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .map(|(i, _)| i)
            .unwrap())
    }
}
