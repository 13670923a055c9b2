//! A real `fleet-server serve` process for a test: started through
//! [`ServerBuilder`] on ports the OS assigns (`127.0.0.1:0`), which the
//! harness learns from the server's "fleet server ready" log line and
//! keeps for [`Server::restart`], so agents find it again where it was.
//!
//! Its helpers read the API through [`Server::api`], the typed client
//! `fleetctl` uses, so they see what an operator's tools see;
//! [`Server::get_json`] is the raw escape hatch for asserting exact JSON.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context};
use fleet_server::api::types::EventRecord;
use fleetctl::client::{Answer, Client, DeviceQuery, StreamQuery};
use serde_json::Value;

use crate::{binary, expect_success, json_output, unique_suffix, wait_for, Proc};

/// How long a server may take from spawn to its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a device may take to come online or to serve what was deployed.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(60);

/// How many of a device's latest events the helpers read: the server's
/// default page.
const EVENTS_LIMIT: u32 = 100;

/// Where a started server listens, from its "fleet server ready" line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    /// The HTTP API's address.
    pub http: std::net::SocketAddr,
    /// The broker devices are told to use: the embedded broker's public
    /// listener, or the external broker.
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// Whether the API is served over TLS (the dashboard URL is `https`).
    pub https: bool,
}

impl ReadyLine {
    /// The ready line's fields in the last whole line of `log` that has
    /// them (a line still being written has no newline yet).
    pub fn find(log: &str) -> Option<Self> {
        log.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .rev()
            .find(|l| l.contains("fleet server ready"))
            .and_then(Self::parse)
    }

    fn parse(line: &str) -> Option<Self> {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
        };
        let (mqtt_host, mqtt_port) = field("mqtt")?.rsplit_once(':')?;
        Some(Self {
            http: field("http")?.parse().ok()?,
            mqtt_host: mqtt_host.to_string(),
            mqtt_port: mqtt_port.parse().ok()?,
            https: field("dashboard")?.starts_with("https://"),
        })
    }
}

/// How to start a [`Server`]: `Server::builder(dir)`, then any of the
/// options, then [`ServerBuilder::start`].
#[must_use]
pub struct ServerBuilder {
    dir: PathBuf,
    broker: Option<String>,
    database: Option<String>,
    ca_cert: Option<PathBuf>,
    args: Vec<OsString>,
    /// Another server of the same fleet: its keys (copied), topic prefix
    /// and admin token.
    fleet: Option<(PathBuf, String, String)>,
    log_level: Option<String>,
}

impl ServerBuilder {
    /// Serves the same fleet as `first` (a replica): a copy of its keys,
    /// its topic prefix and its admin token. Give it the same broker and
    /// database.
    pub fn same_fleet_as(mut self, first: &Server) -> Self {
        self.fleet = Some((
            first.keys_dir.clone(),
            first.topic_prefix.clone(),
            first.token.clone(),
        ));
        self
    }

    /// The server's log filter (default: debug), for runs whose debug
    /// log would be huge.
    pub fn log_level(mut self, filter: &str) -> Self {
        self.log_level = Some(filter.to_string());
        self
    }

    /// Uses the external broker at `url` (`mqtt://host:port`) instead of
    /// the embedded one, under a topic prefix of its own so parallel tests
    /// and earlier runs' retained messages never meet.
    pub fn external_broker(mut self, url: &str) -> Self {
        self.broker = Some(url.to_string());
        self
    }

    /// Uses the database at `url` instead of SQLite in the data dir.
    pub fn database(mut self, url: &str) -> Self {
        self.database = Some(url.to_string());
        self
    }

    /// Trusts the PEM CA certificate at `path` when calling the API (for a
    /// server given a `--tls-cert` it signed): [`Server::api`],
    /// [`Server::get`] and [`Server::ctl`] all use it.
    pub fn ca_cert(mut self, path: &Path) -> Self {
        self.ca_cert = Some(path.to_path_buf());
        self
    }

    /// Appends `fleet-server serve` arguments.
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Makes the fleet keys (`fleetctl keys init`) in `{dir}/keys` and
    /// starts the server on OS-assigned ports; returns once it is ready.
    pub async fn start(self) -> anyhow::Result<Server> {
        let dir = self.dir;
        let keys_dir = dir.join("keys");
        match &self.fleet {
            Some((keys, _, _)) => {
                std::fs::create_dir_all(&keys_dir)?;
                for entry in std::fs::read_dir(keys)? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        std::fs::copy(entry.path(), keys_dir.join(entry.file_name()))?;
                    }
                }
            }
            None => {
                let out = Command::new(binary("fleetctl"))
                    .args(["keys", "init", "--dir"])
                    .arg(&keys_dir)
                    .output()?;
                if !out.status.success() {
                    bail!("keys init failed: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
        let mut args: Vec<OsString> = vec!["serve".into(), "--data-dir".into()];
        args.push(dir.join("server").into());
        args.push("--keys-dir".into());
        args.push(keys_dir.clone().into());
        let (embedded, topic_prefix) = match &self.broker {
            None => (true, "edgefleet/v1".to_string()),
            Some(url) => {
                let prefix = match &self.fleet {
                    Some((_, prefix, _)) => prefix.clone(),
                    None => format!("edgefleet-test-{}/v1", unique_suffix()),
                };
                args.extend(["--broker".into(), url.into()]);
                args.extend(["--topic-prefix".into(), prefix.clone().into()]);
                (false, prefix)
            }
        };
        if let Some(database) = &self.database {
            args.extend(["--database".into(), database.into()]);
        }
        args.extend(self.args);
        let listen = Listen {
            http: "127.0.0.1:0".into(),
            mqtt: embedded.then(|| "127.0.0.1:0".into()),
        };
        let (proc, ready) = spawn_ready(
            &args,
            &listen,
            dir.join("server.log"),
            self.log_level.as_deref(),
        )
        .await?;
        let token = match &self.fleet {
            Some((_, _, token)) => token.clone(),
            None => {
                let token_file = dir.join("server").join("admin.token");
                std::fs::read_to_string(&token_file)
                    .with_context(|| format!("the server wrote no {}", token_file.display()))?
                    .trim()
                    .to_string()
            }
        };
        let scheme = if ready.https { "https" } else { "http" };
        let url = format!("{scheme}://{}", ready.http);
        let api = Client::new(&url, Some(&token), self.ca_cert.as_deref())
            .context("cannot build the API client")?;
        let mut http = reqwest::Client::builder();
        if let Some(ca) = &self.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        Ok(Server {
            api,
            http: http.build()?,
            ca_cert: self.ca_cert,
            token,
            proc,
            url,
            mqtt_port: ready.mqtt_port,
            mqtt_url: match &self.broker {
                Some(url) => url.clone(),
                None => format!("mqtt://{}:{}", ready.mqtt_host, ready.mqtt_port),
            },
            topic_prefix,
            keys_dir,
            dir,
            listen: Listen {
                http: ready.http.to_string(),
                mqtt: embedded.then(|| format!("{}:{}", ready.mqtt_host, ready.mqtt_port)),
            },
            args,
            starts: 1,
            log_level: self.log_level,
        })
    }
}

/// The addresses a server is told to listen on.
struct Listen {
    http: String,
    /// The embedded broker's (`None` with an external broker).
    mqtt: Option<String>,
}

/// Spawns `fleet-server` with `args` on `listen` and waits for its ready
/// line; fails at once, with the log, if it exits first.
async fn spawn_ready(
    args: &[OsString],
    listen: &Listen,
    log: PathBuf,
    log_level: Option<&str>,
) -> anyhow::Result<(Proc, ReadyLine)> {
    let mut cmd = Command::new(binary("fleet-server"));
    cmd.args(args).arg("--http").arg(&listen.http);
    if let Some(filter) = log_level {
        cmd.env("EDGEFLEET_LOG", filter);
    }
    if let Some(mqtt) = &listen.mqtt {
        cmd.arg("--mqtt-listen").arg(mqtt);
    }
    let mut proc = Proc::spawn(cmd, log)?;
    fleet_server::install_crypto_provider();
    let ready = wait_for("the fleet server's ready line", START_TIMEOUT, || {
        let seen = match ReadyLine::find(&proc.log_text()) {
            Some(ready) => Some(Ok(ready)),
            None => proc.child.try_wait().ok().flatten().map(Err),
        };
        std::future::ready(seen)
    })
    .await;
    match ready {
        Ok(Ok(ready)) => Ok((proc, ready)),
        Ok(Err(status)) => bail!(
            "the fleet server exited ({status}) before it was ready; log:\n{}",
            proc.log_text()
        ),
        Err(e) => bail!("{e}; log:\n{}", proc.log_text()),
    }
}

/// A running fleet server with its embedded broker or on an external one.
pub struct Server {
    pub proc: Proc,
    /// The API's base URL (`http://` or, with TLS, `https://`).
    pub url: String,
    /// Port of the broker devices use: the embedded broker's public
    /// listener, or the external broker's.
    pub mqtt_port: u16,
    /// What agents connect to.
    pub mqtt_url: String,
    pub topic_prefix: String,
    pub keys_dir: PathBuf,
    pub dir: PathBuf,
    /// The admin token the server wrote on its first start.
    pub token: String,
    /// The CA certificate the API's callers trust, if one was given.
    pub ca_cert: Option<PathBuf>,
    /// The typed API client, with the admin token and the CA.
    api: Client,
    /// For raw GETs ([`Server::get`]): trusts the CA, sends no token
    /// unless asked.
    http: reqwest::Client,
    /// Where it listens: the ports it got at its first start.
    listen: Listen,
    /// The `fleet-server` arguments but the listen addresses, for
    /// [`Server::restart`].
    args: Vec<OsString>,
    starts: u32,
    log_level: Option<String>,
}

impl Server {
    /// A server with its embedded broker, SQLite and no other options.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::builder(dir).start().await
    }

    /// A server with keys and data under `dir`, to configure before
    /// [`ServerBuilder::start`].
    pub fn builder(dir: &Path) -> ServerBuilder {
        ServerBuilder {
            dir: dir.to_path_buf(),
            broker: None,
            database: None,
            ca_cert: None,
            args: Vec::new(),
            fleet: None,
            log_level: None,
        }
    }

    /// Kills the server (SIGKILL: with the embedded broker, the broker
    /// goes with it).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the server again on the same ports and data (after
    /// [`Server::kill`]; kills it first if it is running). Its log is
    /// `server-N.log` for the Nth start.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.starts += 1;
        let log = self.dir.join(format!("server-{}.log", self.starts));
        let (proc, _) =
            spawn_ready(&self.args, &self.listen, log, self.log_level.as_deref()).await?;
        self.proc = proc;
        Ok(())
    }

    /// The typed client of this server's API that `fleetctl` uses, with
    /// the admin token (and the CA given to [`ServerBuilder::ca_cert`]).
    /// Each answer holds the typed body and the JSON as sent.
    pub fn api(&self) -> &Client {
        &self.api
    }

    /// An authenticated GET of an API path (with the admin token), any
    /// status: for what the typed client does not read, or a refusal a
    /// test asserts on.
    pub async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?)
    }

    /// The JSON body of an authenticated GET of an API path, whatever the
    /// status: the raw escape hatch for tests that assert the exact JSON
    /// the server sends. Helpers read through [`Server::api`] instead.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self.get(path).await?.json().await?)
    }

    /// Runs `fleetctl` against this server with its admin token (and the
    /// CA given to [`ServerBuilder::ca_cert`]).
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("fleetctl"));
        cmd.env("FLEETCTL_SERVER", &self.url)
            .env("EDGEFLEET_TOKEN", &self.token);
        if let Some(ca) = &self.ca_cert {
            cmd.env("FLEETCTL_CA_CERT", ca);
        }
        cmd.args(args).output().expect("run fleetctl")
    }

    /// `fleetctl --json ARGS`: the JSON it printed, asserting success.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        json_output(&self.ctl(&[&["--json"][..], args].concat()))
    }

    /// `fleetctl devices enroll` of `id` (hardware `rpi4`) into a fresh
    /// `{dir}/bundle-{id}`, asserting success; returns the bundle.
    pub fn enroll(&self, dir: &Path, id: &str) -> PathBuf {
        let bundle = dir.join(format!("bundle-{id}"));
        let _ = std::fs::remove_dir_all(&bundle);
        let out = self.ctl(&[
            "devices",
            "enroll",
            "--id",
            id,
            "--hardware",
            "rpi4",
            "--out",
            bundle.to_str().expect("temp dirs have UTF-8 paths"),
        ]);
        expect_success(&out, "devices enroll");
        bundle
    }

    /// The device record (its JSON as the server sent it) once the device
    /// is online and reports `model` at `version` as served.
    pub async fn wait_for_model(
        &self,
        device: &str,
        model: &str,
        version: u64,
    ) -> anyhow::Result<Value> {
        wait_for(
            &format!("{device} serving {model} v{version}"),
            DEVICE_TIMEOUT,
            || async move {
                let Answer { body, raw } = self.api.get_device(device).await.ok()?;
                let serving = body
                    .device
                    .models
                    .iter()
                    .any(|m| m.name == model && m.version == version);
                (serving && body.device.online).then_some(raw)
            },
        )
        .await
    }

    /// Waits until the server shows `device` online.
    pub async fn wait_device_online(&self, device: &str) -> anyhow::Result<()> {
        wait_for(
            &format!("{device} online"),
            DEVICE_TIMEOUT / 2,
            || async move {
                let answer = self.api.get_device(device).await.ok()?;
                answer.body.device.online.then_some(())
            },
        )
        .await
    }

    /// Waits until at least `n` devices are online (the first 1,000 the
    /// server lists as online, as `fleetctl devices list --online` asks).
    pub async fn wait_devices_online(&self, n: usize) -> anyhow::Result<()> {
        let online = DeviceQuery {
            online: Some(true),
            limit: 1000,
            ..DeviceQuery::default()
        };
        wait_for(&format!("{n} devices online"), DEVICE_TIMEOUT, || async {
            let devices = self.api.list_devices(&online).await.ok()?.body;
            (devices.iter().filter(|d| d.online).count() >= n).then_some(())
        })
        .await
    }

    /// The request ids of the results stored for `device`, in sequence
    /// order (the first 5,000, the most one page holds); empty for a
    /// result without one.
    pub async fn result_ids(&self, device: &str) -> anyhow::Result<Vec<String>> {
        let query = StreamQuery {
            limit: 5000,
            ..StreamQuery::default()
        };
        let results = self
            .api
            .device_results(device, &query)
            .await
            .with_context(|| format!("reading the results of {device}"))?
            .body
            .results;
        Ok(results
            .iter()
            .map(|r| {
                r.fields
                    .get("request_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect())
    }

    /// `fleetctl model push`, asserting success.
    pub fn push(&self, model: &Path, name: &str, version: u64) {
        let out = self.ctl(&[
            "model",
            "push",
            model.to_str().expect("model paths are UTF-8"),
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
        fleet_server::keys::read_key(&self.keys_dir.join("online.key"))
            .expect("keys init wrote online.key")
    }

    /// The desired state the server last signed for `device`.
    pub async fn desired(
        &self,
        device: &str,
    ) -> anyhow::Result<(edgefleet_shared::Signed, edgefleet_shared::DesiredState)> {
        // The typed client has no call for this endpoint (fleetctl never
        // reads it); the signed envelope must be kept byte for byte anyway.
        let url = self
            .api
            .url(&["api", "v1", "devices", device, "desired"], &[]);
        let bytes = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let envelope = edgefleet_shared::Signed::from_json(&bytes)?;
        let doc = envelope.parse_unverified()?;
        Ok((envelope, doc))
    }

    /// Publishes `payload` retained on `device`'s desired-state topic of
    /// the server's broker, as anyone with broker access could.
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
            .expect("the server started with this prefix, so it is valid")
            .roots()
    }

    /// Publishes `payload` retained on `topic` of the server's broker (an
    /// anonymous client: the embedded broker without device
    /// authentication, or an open external one).
    pub async fn publish_retained(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        let mut options = rumqttc::MqttOptions::new(
            format!("test-publisher-{}", unique_suffix()),
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

    /// The update events the server stored for `device`, newest first:
    /// each typed and as the server sent it (empty if they cannot be read).
    async fn event_records(&self, device: &str) -> Vec<(EventRecord, Value)> {
        match self.api.device_events(device, EVENTS_LIMIT).await {
            // The client decoded `body` from `raw`, so they pair up in order.
            Ok(Answer {
                body,
                raw: Value::Array(raw),
            }) => body.into_iter().zip(raw).collect(),
            _ => Vec::new(),
        }
    }

    /// The update events the server stored for `device`, newest first, as
    /// the server sent them (empty if they cannot be read).
    pub async fn events(&self, device: &str) -> Vec<Value> {
        self.event_records(device)
            .await
            .into_iter()
            .map(|(_, raw)| raw)
            .collect()
    }

    /// Waits for an update event of `device` that `matches`; returns it as
    /// the server sent it. On timeout the error lists the device's events.
    async fn wait_event_where(
        &self,
        device: &str,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&EventRecord, &Value) -> bool,
    ) -> anyhow::Result<Value> {
        let found = wait_for(what, timeout, || async {
            self.event_records(device)
                .await
                .into_iter()
                .find(|(event, raw)| matches(event, raw))
                .map(|(_, raw)| raw)
        })
        .await;
        match found {
            Ok(event) => Ok(event),
            Err(e) => bail!("{e}\nevents of {device}: {:?}", self.events(device).await),
        }
    }

    /// Waits for an update event of `device` whose JSON `matches`; returns
    /// it. On timeout the error lists the device's events.
    pub async fn wait_event_matching(
        &self,
        device: &str,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        self.wait_event_where(device, what, timeout, |_, raw| matches(raw))
            .await
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
        self.wait_event_where(
            device,
            &format!("{kind} event for model version {model_version}"),
            timeout,
            |e, _| e.kind == kind && e.model_version == Some(model_version),
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
            shadow: None,
            split: None,
            drift: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "2026-12-04T19:40:01.123456Z  INFO fleet_server: fleet server ready http=127.0.0.1:41873 mqtt=127.0.0.1:39021 dashboard=http://127.0.0.1:41873/ui/";

    #[test]
    fn the_ready_line_gives_both_ports() {
        let log = format!("starting\n{LINE}\nlater line\n");
        let ready = ReadyLine::find(&log).expect("a ready line");
        assert_eq!(ready.http, "127.0.0.1:41873".parse().expect("an address"));
        assert_eq!(
            (ready.mqtt_host.as_str(), ready.mqtt_port),
            ("127.0.0.1", 39021)
        );
        assert!(!ready.https);
    }

    #[test]
    fn an_https_dashboard_means_tls_and_an_external_broker_keeps_its_host() {
        let line = LINE
            .replace("dashboard=http://", "dashboard=https://")
            .replace("mqtt=127.0.0.1:39021", "mqtt=broker.example:1883");
        let ready = ReadyLine::find(&format!("{line}\n")).expect("a ready line");
        assert!(ready.https);
        assert_eq!(
            (ready.mqtt_host.as_str(), ready.mqtt_port),
            ("broker.example", 1883)
        );
    }

    #[test]
    fn no_ready_line_yet_or_a_cut_one_is_none() {
        assert_eq!(
            ReadyLine::find("INFO fleet database open backend=\"sqlite\"\n"),
            None
        );
        let half_written = &LINE[..LINE.find("39021").expect("the mqtt port") + 2];
        assert_eq!(ReadyLine::find(half_written), None);
        assert_eq!(ReadyLine::find(LINE), None, "no newline yet");
        let without_dashboard = &LINE[..LINE.find(" dashboard").expect("the field")];
        assert_eq!(ReadyLine::find(&format!("{without_dashboard}\n")), None);
    }
}
