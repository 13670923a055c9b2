//! Messages agents publish: `status` (retained), `events`, `telemetry`
//! and `results`.
//!
//! Every agent → server message carries the device id (the server rejects a
//! message whose id differs from its topic's), the schema version, and a
//! per-device sequence number so the server can drop redelivered copies.

use serde::{Deserialize, Serialize};

use crate::agent_release::AgentStatus;
use crate::ids::DeviceId;
use crate::SCHEMA_VERSION;

/// A model as the agent is serving it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    /// Which runtime serves it (e.g. `tract-onnx`).
    pub runtime: String,
}

/// Retained on `status`: whether the agent is online and what it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusMessage {
    pub schema: u32,
    pub device_id: DeviceId,
    /// 0 on the last-will message, which is fixed when the agent connects.
    pub seq: u64,
    pub online: bool,
    /// Unix seconds.
    pub at: u64,
    #[serde(default)]
    pub agent_version: String,
    /// Version of the last desired state the agent accepted.
    #[serde(default)]
    pub desired_version: Option<u64>,
    #[serde(default)]
    pub models: Vec<ModelStatus>,
    /// Which MQTT connection this is about: the agent numbers each
    /// connection, and the "online" status it sends on connecting and its
    /// last will carry that number. A broker that drops an old connection
    /// after a new one took over publishes the old will late; the server
    /// ignores an offline message whose session is not the device's latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    /// The running agent's target triple and release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
}

impl StatusMessage {
    /// The last-will message: the broker publishes it when the agent drops.
    pub fn offline(device_id: DeviceId) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            device_id,
            seq: 0,
            online: false,
            at: 0,
            agent_version: String::new(),
            desired_version: None,
            models: Vec::new(),
            session: None,
            agent: None,
        }
    }

    /// The last will of connection `session`.
    pub fn will(device_id: DeviceId, session: u64) -> Self {
        Self {
            session: Some(session),
            ..Self::offline(device_id)
        }
    }
}

/// A number for a new MQTT connection, larger than any before it from the
/// same device: milliseconds since the epoch, or one more than `previous`.
pub fn next_session(previous: Option<u64>) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    previous.map_or(now, |p| now.max(p + 1))
}

/// What happened to an update: of a model (`model` set) or of the agent
/// itself (`agent_version` set; `activated` is the switch to a release
/// that passed its self-test, `confirmed` the end of its soak).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A desired state passed every check and is being applied.
    Accepted,
    /// A desired state was refused (bad signature, expired, rollback, ...);
    /// nothing on the device changed.
    Refused,
    /// A model artifact could not be downloaded or failed its size or hash check.
    DownloadFailed,
    /// A model could not be loaded or failed its test vector.
    ActivationFailed,
    /// A model is now serving.
    Activated,
    /// The device went back to a previous model.
    RolledBack,
    /// A model soaked for its whole period without a breach.
    Confirmed,
    /// A slot's shadow candidate or A/B variant could not be downloaded or
    /// loaded; the served version is untouched.
    QualityFailed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused => "refused",
            Self::DownloadFailed => "download_failed",
            Self::ActivationFailed => "activation_failed",
            Self::Activated => "activated",
            Self::RolledBack => "rolled_back",
            Self::Confirmed => "confirmed",
            Self::QualityFailed => "quality_failed",
        }
    }
}

/// Published on `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateEvent {
    pub schema: u32,
    pub device_id: DeviceId,
    pub seq: u64,
    pub at: u64,
    pub kind: EventKind,
    /// The desired-state version this event is about, if known.
    #[serde(default)]
    pub desired_version: Option<u64>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub model_version: Option<u64>,
    /// Human-readable reason, always set for failures and refusals.
    #[serde(default)]
    pub reason: Option<String>,
    /// The agent release this event is about (agent updates; `model` is
    /// then absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

/// Published on `telemetry` every sampling interval: the device's health,
/// per-model inference statistics over the interval, and the outbox state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryMessage {
    pub schema: u32,
    pub device_id: DeviceId,
    pub seq: u64,
    pub at: u64,
    /// Seconds this sample covers (the inference counts are for it).
    pub interval_secs: f64,
    pub health: Health,
    #[serde(default)]
    pub models: Vec<ModelTelemetry>,
    pub outbox: OutboxHealth,
    /// Messages from the fleet the agent refused.
    #[serde(default)]
    pub link: LinkHealth,
}

impl TelemetryMessage {
    /// A realistic sample as an agent sends it once a minute (health, two
    /// models with percentiles, an empty outbox), for benchmarks of what
    /// handling one costs.
    pub fn example(device: DeviceId, seq: u64) -> Self {
        let body = serde_json::json!({
            "schema": crate::SCHEMA_VERSION,
            "device_id": device,
            "seq": seq,
            "at": 1_790_000_000 + seq * 60,
            "interval_secs": 60.0,
            "health": {
                "cpu_percent": 12.5, "load": [0.4, 0.3, 0.2],
                "memory_total_bytes": 4_000_000_000u64, "memory_available_bytes": 2_900_000_000u64,
                "disk_total_bytes": 30_000_000_000u64, "disk_available_bytes": 21_000_000_000u64,
                "temperatures": [{"label": "cpu_thermal", "celsius": 51.2}],
                "uptime_secs": 86_400, "agent_rss_bytes": 9_000_000,
                "agent_cpu_percent": 0.7, "agent_uptime_secs": 3_600
            },
            "models": [
                {"name": "kws", "version": 3, "runtime": "tract-onnx", "inferences": 600, "errors": 0,
                 "total_inferences": 90_000, "total_errors": 2, "p50_us": 410.0, "p95_us": 620.0, "p99_us": 900.0},
                {"name": "det", "version": 7, "runtime": "onnxruntime", "inferences": 60, "errors": 1,
                 "total_inferences": 9_000, "total_errors": 4, "p50_us": 8_100.0, "p95_us": 9_900.0, "p99_us": 12_000.0}
            ],
            "outbox": {"depth": 0, "depth_bytes": 0, "memory_depth": 0}
        });
        serde_json::from_value(body).expect("the example matches TelemetryMessage's own schema")
    }
}

/// What the agent refused of what reached it over MQTT: receipts and
/// server statuses that were unsigned, forged or not for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHealth {
    /// Since the agent started.
    #[serde(default)]
    pub rejected_messages: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rejection: Option<String>,
}

/// Device health as `sysinfo` sees it. Fields a board does not expose are
/// absent rather than zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Whole-system CPU use over the interval, 0–100.
    #[serde(default)]
    pub cpu_percent: Option<f32>,
    /// 1, 5 and 15 minute load averages.
    #[serde(default)]
    pub load: Option<[f64; 3]>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// Disk holding the agent's data dir.
    #[serde(default)]
    pub disk_total_bytes: Option<u64>,
    #[serde(default)]
    pub disk_available_bytes: Option<u64>,
    #[serde(default)]
    pub temperatures: Vec<Temperature>,
    pub uptime_secs: u64,
    /// The agent process itself.
    pub agent_rss_bytes: u64,
    #[serde(default)]
    pub agent_cpu_percent: Option<f32>,
    pub agent_uptime_secs: u64,
}

/// One temperature sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Temperature {
    pub label: String,
    pub celsius: f32,
}

/// Inference statistics of one served model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelTelemetry {
    pub name: String,
    pub version: u64,
    /// The runtime serving it.
    pub runtime: String,
    /// Successful inferences in this interval.
    pub inferences: u64,
    /// Failed inferences in this interval.
    pub errors: u64,
    /// Since the model was activated.
    pub total_inferences: u64,
    pub total_errors: u64,
    /// Latency percentiles over this interval, in microseconds (absent when
    /// there was no inference).
    #[serde(default)]
    pub p50_us: Option<f64>,
    #[serde(default)]
    pub p95_us: Option<f64>,
    #[serde(default)]
    pub p99_us: Option<f64>,
    /// How each runtime fared when the model was activated (the choice).
    #[serde(default)]
    pub runtime_trials: Vec<serde_json::Value>,
    /// Which side of an A/B test this entry is (absent: no test).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<crate::quality::Variant>,
    /// The shadow candidate's agreement with this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::quality::ShadowTelemetry>,
    /// Input and output statistics for drift monitoring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<crate::quality::DriftTelemetry>,
}

/// The agent's outbox as it reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutboxHealth {
    /// Records waiting on disk.
    pub depth: u64,
    pub depth_bytes: u64,
    /// Records waiting in memory because the disk refused them.
    #[serde(default)]
    pub memory_depth: u64,
    /// Age of the oldest waiting record, in seconds.
    #[serde(default)]
    pub oldest_age_secs: Option<u64>,
    /// Records dropped by an overflow policy since the agent started.
    #[serde(default)]
    pub dropped: u64,
    /// Set while something is wrong: "disk full", "database corrupt", ...
    #[serde(default)]
    pub condition: Option<String>,
}

/// Retained on the server status topic, signed by the server's online
/// key: `online: true` once the fleet server is subscribed to every device
/// topic; its last will says false.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub online: bool,
    #[serde(default)]
    pub at: u64,
    /// Which connection of the server this is about (larger is newer);
    /// its "online" and its last will share the number.
    #[serde(default)]
    pub session: u64,
}

/// Published by the server on a device's `receipts` topic, signed by its
/// online key, once messages from it are stored: the agent deletes them from its outbox only then,
/// so nothing is lost between the broker's acknowledgement and the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub schema: u32,
    pub device_id: DeviceId,
    /// Stored sequence numbers as inclusive ranges `[first, last]`.
    pub seqs: Vec<[u64; 2]>,
}

impl Receipt {
    /// Collapses sequence numbers into sorted inclusive ranges.
    pub fn ranges(mut seqs: Vec<u64>) -> Vec<[u64; 2]> {
        seqs.sort_unstable();
        seqs.dedup();
        let mut out: Vec<[u64; 2]> = Vec::new();
        for s in seqs {
            match out.last_mut() {
                Some(r) if r[1] + 1 == s => r[1] = s,
                _ => out.push([s, s]),
            }
        }
        out
    }

    /// Every sequence number the receipt names (at most `limit`, against
    /// a hostile range).
    pub fn each(&self, limit: usize) -> impl Iterator<Item = u64> + '_ {
        self.seqs
            .iter()
            .filter(|r| r[0] <= r[1])
            .flat_map(|r| r[0]..=r[1])
            .take(limit)
    }
}

/// Published on `results`: one inference result of a model whose config
/// asks for uploads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResult {
    pub schema: u32,
    pub device_id: DeviceId,
    pub seq: u64,
    pub at: u64,
    pub model: String,
    pub model_version: u64,
    pub runtime: String,
    /// The request's `id`, if the client gave one.
    #[serde(default)]
    pub request_id: Option<String>,
    pub latency_us: u64,
    /// Output tensors in Open Inference Protocol JSON form.
    pub outputs: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        let msg = StatusMessage {
            schema: SCHEMA_VERSION,
            device_id: DeviceId::new("d1").unwrap(),
            seq: 4,
            online: true,
            at: 99,
            agent_version: "0.1.0".into(),
            desired_version: Some(3),
            models: vec![ModelStatus {
                name: "digits".into(),
                version: 2,
                sha256: "00".repeat(32),
                runtime: "tract-onnx".into(),
            }],
            session: Some(7),
            agent: Some(AgentStatus {
                target: "aarch64-unknown-linux-musl".into(),
                release: Some("1.2.0".into()),
            }),
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(serde_json::from_str::<StatusMessage>(&json).unwrap(), msg);
    }

    #[test]
    fn event_kind_uses_snake_case_on_the_wire() {
        let ev = UpdateEvent {
            schema: SCHEMA_VERSION,
            device_id: DeviceId::new("d1").unwrap(),
            seq: 1,
            at: 5,
            kind: EventKind::DownloadFailed,
            desired_version: Some(2),
            model: Some("m".into()),
            model_version: Some(1),
            reason: Some("hash mismatch".into()),
            agent_version: None,
        };
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["kind"], "download_failed");
        assert_eq!(ev.kind.as_str(), "download_failed");
        assert_eq!(serde_json::from_value::<UpdateEvent>(json).unwrap(), ev);
    }

    #[test]
    fn receipts_compress_sequence_numbers_into_ranges() {
        let ranges = Receipt::ranges(vec![7, 3, 4, 5, 9, 4, 10]);
        assert_eq!(ranges, vec![[3, 5], [7, 7], [9, 10]]);
        let r = Receipt {
            schema: SCHEMA_VERSION,
            device_id: DeviceId::new("d").unwrap(),
            seqs: ranges,
        };
        assert_eq!(r.each(100).collect::<Vec<_>>(), vec![3, 4, 5, 7, 9, 10]);
        assert_eq!(r.each(2).count(), 2);
        let backwards = Receipt {
            seqs: vec![[5, 1]],
            ..r
        };
        assert_eq!(backwards.each(100).count(), 0);
    }

    #[test]
    fn message_with_bad_device_id_is_rejected() {
        let json = r#"{"schema":1,"device_id":"a/b","seq":1,"online":true,"at":0}"#;
        assert!(serde_json::from_str::<StatusMessage>(json).is_err());
    }
}
