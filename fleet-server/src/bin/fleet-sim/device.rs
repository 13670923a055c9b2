//! One simulated device: its MQTT connection, what it publishes (status,
//! update events, telemetry, each signed with its own key), how it
//! answers a desired state, and what it keeps until a receipt names it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_shared::{
    DesiredState, DeviceId, EventKind, Health, ModelStatus, ModelTelemetry, OutboxHealth,
    RootDocument, Signed, StatusMessage, TelemetryMessage, TopicKind, TopicPrefix, UpdateEvent,
    SCHEMA_VERSION,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use sha2::{Digest, Sha256};

use crate::Args;

/// Whether `device`'s update to `version` fails, with probability `rate`.
fn fails(device: &str, model: &str, version: u64, rate: f64) -> bool {
    let digest = Sha256::digest(format!("{device}\0{model}\0{version}").as_bytes());
    let x = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    x < rate
}

pub(crate) struct Device {
    pub(crate) id: DeviceId,
    pub(crate) key: edgefleet_shared::SecretKey,
    /// Its MQTT password (`--credentials`); none on an open broker.
    pub(crate) password: Option<String>,
    pub(crate) prefix: TopicPrefix,
    pub(crate) root: Arc<RootDocument>,
    pub(crate) args: Arc<Args>,
    pub(crate) http: reqwest::Client,
    pub(crate) seq: AtomicU64,
    /// Telemetry samples sent (drives the simulated health over time).
    pub(crate) samples: AtomicU64,
    /// With `--resend-secs`: what no receipt has named yet, by sequence
    /// number: when it was last sent, its topic and signed payload.
    pub(crate) unreceipted: std::sync::Mutex<std::collections::BTreeMap<u64, Kept>>,
    /// Sequence numbers of the telemetry sent, for `--report`.
    pub(crate) telemetry_sent: std::sync::Mutex<Vec<u64>>,
}

/// A sent message kept for re-sending: when it was last sent, its topic
/// and signed payload.
pub(crate) type Kept = (std::time::Instant, String, Vec<u8>);

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
                    variant: None,
                    shadow: None,
                    drift: None,
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

    pub(crate) async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
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
