//! `fleet-sim`: thousands of simulated devices in one process, each
//! speaking the real protocol to a fleet server over MQTT: it announces
//! itself, verifies every desired state against the pinned root document
//! (signature, device, expiry, version), downloads the artifact or not (by
//! ratio), reports accepted / activated / confirmed or a failure (by rate,
//! reproducible per device and version), and publishes its status, every
//! message signed with the device's own key as an agent's is (so the
//! server's verification is part of every figure). For tests and
//! benchmarks of the server, not a device agent.
//!
//! Each simulated device's key is derived from its id
//! ([`fleet_server::device_keys::simulated_device_key`]): a server pins it
//! on first use, or is given it at enrollment; that makes the keys public
//! knowledge, which is fine for a simulator and nothing else.
//!
//! On a broker that authenticates devices (`fleet-server serve
//! --device-auth`) each simulated device must be enrolled, with that key,
//! since such a server never pins one on first use: `--public-keys`
//! prints what to enroll, and `--credentials` gives each device the MQTT
//! password its enrollment answered.
//!
//!   fleet-sim --root keys/root.json --mqtt mqtt://127.0.0.1:1883 --devices 10000
//!   fleet-sim --devices 10000 --public-keys > keys.txt
//!   fleet-sim --root keys/root.json --devices 10000 --credentials credentials.txt

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use edgefleet_shared::{
    DesiredState, DeviceId, EventKind, Health, ModelStatus, ModelTelemetry, OutboxHealth,
    RootDocument, Signed, StatusMessage, TelemetryMessage, TopicKind, TopicPrefix, UpdateEvent,
    SCHEMA_VERSION,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use sha2::{Digest, Sha256};

#[derive(Parser, Clone)]
#[command(
    name = "fleet-sim",
    about = "Simulated edgefleet devices for tests and benchmarks"
)]
struct Args {
    /// The fleet's root document (keys/root.json), pinned by every device.
    #[arg(long, required_unless_present = "public_keys")]
    root: Option<PathBuf>,
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    mqtt: String,
    #[arg(long, default_value = "edgefleet/v1")]
    topic_prefix: String,
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Device ids are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    id_prefix: String,
    /// Share of updates that fail (reproducible per device and version).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Share of updates whose artifact is really downloaded (and its
    /// size checked); the rest skip the download.
    #[arg(long, default_value_t = 0.0)]
    download_ratio: f64,
    /// Delay before reporting an update's outcome, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Connections opened per second at start.
    #[arg(long, default_value_t = 2000)]
    connect_rate: u32,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Send telemetry (health and per-model inference counts) this often;
    /// 0: never.
    #[arg(long, default_value_t = 0.0)]
    telemetry_secs: f64,
    /// Inferences per model per telemetry interval.
    #[arg(long, default_value_t = 100)]
    inferences: u64,
    /// MODEL:VERSION that runs badly: its inferences fail at
    /// `--error-pct` and take `--slow-ms`.
    #[arg(long)]
    degraded: Option<String>,
    #[arg(long, default_value_t = 50.0)]
    error_pct: f64,
    #[arg(long, default_value_t = 0.0)]
    slow_ms: f64,
    /// Offline churn: this often (seconds; 0: never), each device drops
    /// its connection without a goodbye (the broker publishes its will)
    /// with probability `--churn-share`, and comes back after
    /// `--offline-secs`.
    #[arg(long, default_value_t = 0.0)]
    churn_secs: f64,
    #[arg(long, default_value_t = 0.1)]
    churn_share: f64,
    #[arg(long, default_value_t = 2.0)]
    offline_secs: f64,
    /// Share of devices whose health shows a problem (chosen per device,
    /// reproducibly): a hot sensor, a nearly full disk, or an outbox
    /// backlog that grows with every sample.
    #[arg(long, default_value_t = 0.0)]
    trouble_share: f64,
    /// Each device's MQTT password, for a broker that authenticates
    /// devices: lines `DEVICE_ID PASSWORD` (what enrollment answered);
    /// every simulated device needs one. The user name and client id are
    /// the device id, as the broker requires.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Print each simulated device's id and public key (64 hex), one
    /// `DEVICE_ID KEY` line each, and exit: what to enroll the devices
    /// with where the server does not pin keys on first use.
    #[arg(long)]
    public_keys: bool,
    /// Keep every message (status, event, telemetry) until a fleet
    /// server's signed receipt names it, and send again what has waited
    /// this many seconds, as an agent does (0: send once and forget).
    #[arg(long, default_value_t = 0.0)]
    resend_secs: f64,
    /// At exit, write JSON here: per device, the sequence numbers of the
    /// telemetry it sent and how many of its messages no receipt named.
    /// With `--resend-secs`, an interrupted run first stops sending new
    /// messages and keeps re-sending the rest until receipted (30 s at
    /// most).
    #[arg(long)]
    report: Option<PathBuf>,
}

/// The simulated devices' ids: PREFIX-00000, PREFIX-00001, ...
fn device_ids(args: &Args) -> Result<Vec<DeviceId>, String> {
    (0..args.devices)
        .map(|i| DeviceId::new(format!("{}-{i:05}", args.id_prefix)).map_err(|e| e.to_string()))
        .collect()
}

/// Reads a credentials file (`DEVICE_ID PASSWORD` lines; blank lines and
/// `#` comments are skipped) into passwords by device id.
fn read_credentials(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut passwords = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [id, password] => {
                passwords.insert(id.to_string(), password.to_string());
            }
            _ => return Err(format!("line {}: expected DEVICE_ID PASSWORD", n + 1)),
        }
    }
    Ok(passwords)
}

/// Whether `device`'s update to `version` fails, with probability `rate`.
fn fails(device: &str, model: &str, version: u64, rate: f64) -> bool {
    let digest = Sha256::digest(format!("{device}\0{model}\0{version}").as_bytes());
    let x = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    x < rate
}

struct Device {
    id: DeviceId,
    key: edgefleet_shared::SecretKey,
    /// Its MQTT password (`--credentials`); none on an open broker.
    password: Option<String>,
    prefix: TopicPrefix,
    root: Arc<RootDocument>,
    args: Arc<Args>,
    http: reqwest::Client,
    seq: AtomicU64,
    /// Telemetry samples sent (drives the simulated health over time).
    samples: AtomicU64,
    /// With `--resend-secs`: what no receipt has named yet, by sequence
    /// number: when it was last sent, its topic and signed payload.
    unreceipted: std::sync::Mutex<std::collections::BTreeMap<u64, Kept>>,
    /// Sequence numbers of the telemetry sent, for `--report`.
    telemetry_sent: std::sync::Mutex<Vec<u64>>,
}

/// A sent message kept for re-sending: when it was last sent, its topic
/// and signed payload.
type Kept = (std::time::Instant, String, Vec<u8>);

impl Device {
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `msg` signed for `topic` with the device's key.
    fn seal(&self, topic: &str, msg: &[u8]) -> Vec<u8> {
        edgefleet_shared::signed_message::seal(topic, msg, &self.key)
    }

    async fn send(&self, client: &AsyncClient, kind: TopicKind, seq: u64, payload: Vec<u8>) {
        let topic = self.prefix.device(&self.id, kind).to_string();
        let payload = self.seal(&topic, &payload);
        self.keep(seq, &topic, &payload);
        let _ = client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await;
    }

    /// Keeps a sent message until it is receipted (with `--resend-secs`).
    fn keep(&self, seq: u64, topic: &str, payload: &[u8]) {
        if self.args.resend_secs > 0.0 {
            self.unreceipted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    seq,
                    (
                        std::time::Instant::now(),
                        topic.to_string(),
                        payload.to_vec(),
                    ),
                );
        }
    }

    /// A receipt, if the server signed it: forgets what it names.
    fn receipt(&self, topic: &str, payload: &[u8]) {
        let keys: Vec<_> = self.root.desired_keys().map(|(_, k)| *k).collect();
        let Ok(msg) =
            edgefleet_shared::signed_message::SignedMessage::open(payload, topic, keys.iter())
        else {
            return;
        };
        let Ok(receipt) = serde_json::from_slice::<edgefleet_shared::Receipt>(msg) else {
            return;
        };
        let mut kept = self.unreceipted.lock().unwrap_or_else(|p| p.into_inner());
        for [first, last] in receipt.seqs {
            let seqs: Vec<u64> = kept.range(first..=last).map(|(s, _)| *s).collect();
            for s in seqs {
                kept.remove(&s);
            }
        }
    }

    /// Sends again what has waited `--resend-secs` for a receipt.
    fn resend(&self, client: &AsyncClient) {
        let wait = Duration::from_secs_f64(self.args.resend_secs);
        let now = std::time::Instant::now();
        let mut kept = self.unreceipted.lock().unwrap_or_else(|p| p.into_inner());
        for (at, topic, payload) in kept.values_mut() {
            if now.duration_since(*at) >= wait {
                *at = now;
                let _ = client.try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone());
            }
        }
    }

    async fn status(
        &self,
        client: &AsyncClient,
        desired: Option<u64>,
        models: Vec<ModelStatus>,
        session: Option<u64>,
    ) {
        let seq = self.next_seq();
        let msg = StatusMessage {
            schema: SCHEMA_VERSION,
            device_id: self.id.clone(),
            seq,
            online: true,
            at: edgefleet_shared::unix_now(),
            agent_version: "fleet-sim".into(),
            desired_version: desired,
            models,
            session,
            agent: None,
        };
        self.send(
            client,
            TopicKind::Status,
            seq,
            serde_json::to_vec(&msg).expect("status"),
        )
        .await;
    }

    async fn event(
        &self,
        client: &AsyncClient,
        kind: EventKind,
        desired: u64,
        model: Option<(&str, u64)>,
        reason: Option<String>,
    ) {
        let seq = self.next_seq();
        let e = UpdateEvent {
            schema: SCHEMA_VERSION,
            device_id: self.id.clone(),
            seq,
            at: edgefleet_shared::unix_now(),
            kind,
            desired_version: Some(desired),
            model: model.map(|(m, _)| m.to_string()),
            model_version: model.map(|(_, v)| v),
            reason,
            agent_version: None,
        };
        self.send(
            client,
            TopicKind::Events,
            seq,
            serde_json::to_vec(&e).expect("event"),
        )
        .await;
    }

    /// One telemetry sample for the models it serves: `--inferences` each,
    /// failing and slow for the `--degraded` one.
    fn telemetry(&self, models: &[ModelStatus], interval_secs: f64) -> TelemetryMessage {
        let degraded = self
            .args
            .degraded
            .as_deref()
            .and_then(|d| d.rsplit_once(':'));
        let models = models
            .iter()
            .map(|m| {
                let bad = degraded.is_some_and(|(name, version)| {
                    name == m.name && version.parse() == Ok(m.version)
                });
                let total = self.args.inferences;
                let errors = if bad {
                    (total as f64 * self.args.error_pct / 100.0).round() as u64
                } else {
                    0
                };
                let p95_us = 1_000.0 + if bad { self.args.slow_ms * 1000.0 } else { 0.0 };
                ModelTelemetry {
                    name: m.name.clone(),
                    version: m.version,
                    runtime: m.runtime.clone(),
                    inferences: total - errors,
                    errors,
                    total_inferences: total - errors,
                    total_errors: errors,
                    p50_us: Some(p95_us * 0.6),
                    p95_us: Some(p95_us),
                    p99_us: Some(p95_us * 1.2),
                    runtime_trials: Vec::new(),
                }
            })
            .collect();
        let seq = self.next_seq();
        let (health, outbox) = self.health(self.samples.fetch_add(1, Ordering::Relaxed));
        TelemetryMessage {
            schema: SCHEMA_VERSION,
            device_id: self.id.clone(),
            seq,
            at: edgefleet_shared::unix_now(),
            interval_secs,
            health,
            models,
            outbox,
            link: Default::default(),
        }
    }

    /// Plausible, varying health: each device has its own load level and a
    /// slow wave over time; `--trouble-share` of them show a problem.
    fn health(&self, n: u64) -> (Health, OutboxHealth) {
        let id = self.id.as_str();
        let level = rand_unit(&format!("load\0{id}"), 0);
        let wave = (n as f64 / 8.0 + level * std::f64::consts::TAU).sin();
        let total: u64 = 512 << 20;
        let disk_total: u64 = 16 << 30;
        let mut health = Health {
            cpu_percent: Some((15.0 + 35.0 * level + 10.0 * wave) as f32),
            load: Some([0.4 + level, 0.5 + level, 0.5 + level]),
            memory_total_bytes: total,
            memory_available_bytes: (total as f64 * (0.55 - 0.25 * level - 0.05 * wave)) as u64,
            disk_total_bytes: Some(disk_total),
            disk_available_bytes: Some((disk_total as f64 * (0.3 + 0.4 * level)) as u64),
            temperatures: vec![edgefleet_shared::Temperature {
                label: "cpu-thermal".into(),
                celsius: (45.0 + 20.0 * level + 3.0 * wave) as f32,
            }],
            uptime_secs: 86_400 + n * 10,
            agent_rss_bytes: 14 << 20,
            agent_cpu_percent: Some((2.0 + 3.0 * level + wave) as f32),
            agent_uptime_secs: n * 10,
        };
        let mut outbox = OutboxHealth::default();
        if rand_unit(&format!("trouble\0{id}"), 0) < self.args.trouble_share {
            match (rand_unit(&format!("kind\0{id}"), 0) * 3.0) as u32 {
                0 => health.temperatures[0].celsius = 84.0 + 2.0 * wave as f32,
                1 => health.disk_available_bytes = Some(disk_total / 100),
                _ => {
                    outbox.depth = 100 + 40 * n;
                    outbox.depth_bytes = outbox.depth * 300;
                    outbox.oldest_age_secs = Some(n * 10);
                }
            }
        }
        (health, outbox)
    }

    async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let (host, port) = match edgefleet_shared::broker_url::parse(&self.args.mqtt) {
            Ok(hp) => hp,
            Err(e) => {
                eprintln!("fleet-sim: {e}");
                return;
            }
        };
        let mut options = MqttOptions::new(self.id.as_str(), host, port);
        if let Some(password) = &self.password {
            options.set_credentials(self.id.as_str(), password.as_str());
        }
        let mut session = edgefleet_shared::messages::next_session(None);
        let will = |session: u64| {
            let mut will = StatusMessage::will(self.id.clone(), session);
            will.agent_version = "fleet-sim".into();
            let topic = self.prefix.device(&self.id, TopicKind::Status).to_string();
            let payload = self.seal(&topic, &serde_json::to_vec(&will).expect("will"));
            LastWill::new(topic, payload, QoS::AtLeastOnce, true)
        };
        options
            .set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true)
            .set_last_will(will(session));
        let (mut client, mut eventloop) = AsyncClient::new(options.clone(), 64);
        let churn_every = Duration::from_secs_f64(self.args.churn_secs.max(0.001));
        let mut churn =
            tokio::time::interval_at(tokio::time::Instant::now() + churn_every, churn_every);
        let mut churns = 0u64;
        let mut trusted: Option<u64> = None;
        let mut serving: Vec<ModelStatus> = Vec::new();
        let interval = Duration::from_secs_f64(self.args.telemetry_secs.max(0.001));
        let mut telemetry = tokio::time::interval(interval);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resend = tokio::time::interval(Duration::from_secs_f64(
            (self.args.resend_secs / 2.0).max(0.1),
        ));
        let receipts_topic = self
            .prefix
            .device(&self.id, TopicKind::Receipts)
            .to_string();
        // Stopping with --resend-secs: nothing new goes out, what waits
        // for a receipt is sent again until receipted or this passes.
        let mut draining: Option<tokio::time::Instant> = None;
        let mut connected = false;
        loop {
            if let Some(deadline) = draining {
                let empty = self
                    .unreceipted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty();
                if empty || tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            let event = tokio::select! {
                _ = shutdown.cancelled(), if draining.is_none() => {
                    if self.args.resend_secs <= 0.0 {
                        break;
                    }
                    draining = Some(tokio::time::Instant::now() + Duration::from_secs(30));
                    continue;
                }
                event = eventloop.poll() => event,
                // Only the event loop runs while connecting (as in the
                // agent): a poll dropped mid-connect makes the broker
                // publish a last will under the next connection's number.
                _ = churn.tick(), if connected && self.args.churn_secs > 0.0 && draining.is_none() => {
                    churns += 1;
                    if rand_unit(&format!("churn\0{}", self.id), churns) < self.args.churn_share {
                        // Dropping the event loop closes the socket with no
                        // DISCONNECT: the broker publishes the will. What
                        // was in flight is lost, as on a real link cut.
                        session = edgefleet_shared::messages::next_session(Some(session));
                        options.set_last_will(will(session));
                        (client, eventloop) = AsyncClient::new(options.clone(), 64);
                        connected = false;
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs_f64(self.args.offline_secs)) => {}
                        }
                    }
                    continue;
                }
                _ = telemetry.tick(), if connected && self.args.telemetry_secs > 0.0 && draining.is_none() => {
                    // Health goes out with or without a model, as an
                    // agent's does.
                    let sample = self.telemetry(&serving, interval.as_secs_f64());
                    let payload = serde_json::to_vec(&sample).expect("telemetry");
                    // Never wait on the event loop from inside it.
                    let topic = self.prefix.device(&self.id, TopicKind::Telemetry).to_string();
                    let payload = self.seal(&topic, &payload);
                    self.keep(sample.seq, &topic, &payload);
                    if self.args.report.is_some() {
                        self.telemetry_sent.lock().unwrap_or_else(|p| p.into_inner()).push(sample.seq);
                    }
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, false, payload);
                    continue;
                }
                _ = resend.tick(), if connected && self.args.resend_secs > 0.0 => {
                    self.resend(&client);
                    continue;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    // What an agent subscribes to (receipts matter with
                    // --resend-secs).
                    for kind in [TopicKind::Desired, TopicKind::Receipts] {
                        let topic = self.prefix.device(&self.id, kind).to_string();
                        let _ = client.subscribe(topic, QoS::AtLeastOnce).await;
                    }
                    self.status(&client, trusted, serving.clone(), Some(session))
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == receipts_topic => {
                    self.receipt(&receipts_topic, &p.payload);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(envelope) = Signed::from_json(&p.payload) else {
                        continue;
                    };
                    let now = edgefleet_shared::unix_now();
                    let doc = match DesiredState::verify(&envelope, &self.root, &self.id, now)
                        .and_then(|d| d.check_newer_than(trusted).map(|()| d))
                    {
                        Ok(doc) => doc,
                        Err(e) => {
                            if !matches!(e, edgefleet_shared::VerifyError::Rollback { .. }) {
                                self.event(
                                    &client,
                                    EventKind::Refused,
                                    0,
                                    None,
                                    Some(e.to_string()),
                                )
                                .await;
                            }
                            continue;
                        }
                    };
                    trusted = Some(doc.version);
                    self.event(&client, EventKind::Accepted, doc.version, None, None)
                        .await;
                    let device = Arc::clone(&self);
                    let client = client.clone();
                    let previous = serving.clone();
                    // Outcomes, decided now so the status can follow.
                    let mut next = Vec::new();
                    let mut reports = Vec::new();
                    for slot in &doc.models {
                        let already = previous
                            .iter()
                            .any(|m| m.name == slot.name && m.version == slot.version);
                        if already {
                            next.push(
                                previous
                                    .iter()
                                    .find(|m| m.name == slot.name)
                                    .cloned()
                                    .expect("found"),
                            );
                            continue;
                        }
                        let failed = fails(
                            self.id.as_str(),
                            &slot.name,
                            slot.version,
                            self.args.fail_rate,
                        );
                        reports.push((slot.clone(), failed));
                        if failed {
                            if let Some(old) = previous.iter().find(|m| m.name == slot.name) {
                                next.push(old.clone());
                            }
                        } else {
                            next.push(ModelStatus {
                                name: slot.name.clone(),
                                version: slot.version,
                                sha256: slot.sha256.clone(),
                                runtime: "fleet-sim".into(),
                            });
                        }
                    }
                    serving = next.clone();
                    let version = doc.version;
                    tokio::spawn(async move {
                        if device.args.latency_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(device.args.latency_ms)).await;
                        }
                        for (slot, failed) in reports {
                            let download = (rand_unit(device.id.as_str(), slot.version))
                                < device.args.download_ratio;
                            let mut reason = failed.then(|| "simulated failure".to_string());
                            if download {
                                if let Err(e) = device.download(&slot).await {
                                    reason = Some(e);
                                }
                            }
                            let model = Some((slot.name.as_str(), slot.version));
                            match reason {
                                Some(r) => {
                                    device
                                        .event(
                                            &client,
                                            EventKind::ActivationFailed,
                                            version,
                                            model,
                                            Some(r),
                                        )
                                        .await
                                }
                                None => {
                                    device
                                        .event(&client, EventKind::Activated, version, model, None)
                                        .await;
                                    device
                                        .event(&client, EventKind::Confirmed, version, model, None)
                                        .await;
                                }
                            }
                        }
                        device.status(&client, Some(version), next, None).await;
                    });
                }
                Ok(_) => {}
                Err(_) => {
                    connected = false;
                    session = edgefleet_shared::messages::next_session(Some(session));
                    eventloop.mqtt_options.set_last_will(will(session));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    async fn download(&self, slot: &edgefleet_shared::ModelSlot) -> Result<(), String> {
        let url = slot.urls.first().ok_or("no artifact URL")?;
        let bytes = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        if bytes.len() as u64 != slot.size {
            return Err(format!(
                "downloaded {} bytes, expected {}",
                bytes.len(),
                slot.size
            ));
        }
        Ok(())
    }
}

/// A reproducible number in [0, 1) per device and version.
fn rand_unit(device: &str, version: u64) -> f64 {
    let digest = Sha256::digest(format!("dl\0{device}\0{version}").as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let ids = match device_ids(&args) {
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.public_keys {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for id in &ids {
            let key = fleet_server::device_keys::simulated_device_key(id.as_str()).public();
            if writeln!(out, "{id} {}", key.to_hex()).is_err() {
                return std::process::ExitCode::FAILURE;
            }
        }
        return match out.flush() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(_) => std::process::ExitCode::FAILURE,
        };
    }
    let mut passwords = match &args.credentials {
        Some(path) => match read_credentials(path) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!(
                    "fleet-sim: cannot use the credentials {}: {e}",
                    path.display()
                );
                return std::process::ExitCode::from(2);
            }
        },
        None => None,
    };
    // A device with no password would only be refused, again and again.
    if let Some(p) = &passwords {
        if let Some(id) = ids.iter().find(|id| !p.contains_key(id.as_str())) {
            eprintln!("fleet-sim: no credentials for device {id}");
            return std::process::ExitCode::from(2);
        }
    }
    let root_path = args.root.clone().expect("clap requires --root");
    let root = match std::fs::read(&root_path)
        .map_err(|e| e.to_string())
        .and_then(|b| Signed::from_json(&b).map_err(|e| e.to_string()))
        .and_then(|s| {
            RootDocument::verify_initial(&s, edgefleet_shared::unix_now())
                .map_err(|e| e.to_string())
        }) {
        Ok(root) => Arc::new(root),
        Err(e) => {
            eprintln!(
                "fleet-sim: cannot use the root document {}: {e}",
                root_path.display()
            );
            return std::process::ExitCode::from(2);
        }
    };
    let prefix = match TopicPrefix::new(args.topic_prefix.clone()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fleet-sim: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        fleet_server::install_crypto_provider();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let args = Arc::new(args);
        let http = reqwest::Client::new();
        let mut tasks = Vec::new();
        let mut devices = Vec::new();
        let pause = Duration::from_secs_f64(1.0 / f64::from(args.connect_rate.max(1)));
        for id in ids {
            let device = Arc::new(Device {
                key: fleet_server::device_keys::simulated_device_key(id.as_str()),
                password: passwords.as_mut().and_then(|p| p.remove(id.as_str())),
                id,
                prefix: prefix.clone(),
                root: Arc::clone(&root),
                args: Arc::clone(&args),
                http: http.clone(),
                seq: AtomicU64::new(edgefleet_shared::unix_now() * 1000),
                samples: AtomicU64::new(0),
                unreceipted: Default::default(),
                telemetry_sent: Default::default(),
            });
            devices.push(Arc::clone(&device));
            tasks.push(tokio::spawn(device.run(shutdown.clone())));
            tokio::time::sleep(pause).await;
        }
        eprintln!("fleet-sim: {} devices started", args.devices);
        match args.duration_secs {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("a SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
        }
        shutdown.cancel();
        for t in tasks {
            let _ = t.await;
        }
        if let Some(path) = &args.report {
            let report: serde_json::Map<String, serde_json::Value> = devices
                .iter()
                .map(|d| {
                    let sent = d
                        .telemetry_sent
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let unreceipted = d
                        .unreceipted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .len();
                    (
                        d.id.to_string(),
                        serde_json::json!({ "telemetry": sent, "unreceipted": unreceipted }),
                    )
                })
                .collect();
            let text = serde_json::to_string(&report).expect("a report serialises");
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("fleet-sim: cannot write {}: {e}", path.display());
                return std::process::ExitCode::FAILURE;
            }
        }
        std::process::ExitCode::SUCCESS
    })
}
