//! Agent configuration: defaults, then a TOML file, validated once at start.

pub mod batching;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgefleet_shared::{DeviceId, TopicPrefix};
use serde::Deserialize;

/// Publishes awaiting their PUBACK at most: the MQTT session's in-flight
/// window, which the uplink asks rumqttc for, and so the most records one
/// publish may batch (`mqtt.batch_records`).
pub const PUBLISH_WINDOW: usize = 256;

/// Why the configuration is unusable. Each variant says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
    #[error("config: {0}")]
    Display(#[from] crate::display::DisplayConfigError),
}

/// Everything the agent needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The file this config was read from (what a new agent release's
    /// self-test reads).
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// This device's id in the fleet. Required when `mqtt` is set.
    pub device_id: Option<DeviceId>,
    /// Where models, trust state and staging files live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The root document this device was flashed with. Required when
    /// `mqtt` is set: without it no update can be verified.
    pub root_document: Option<PathBuf>,
    /// This device's signing key (fleet mode); made here at first start
    /// if missing. Default: `{data_dir}/device.key`.
    #[serde(default)]
    pub device_key: Option<PathBuf>,
    #[serde(default)]
    pub api: ApiConfig,
    /// The fleet connection; absent for a standalone agent.
    pub mqtt: Option<MqttConfig>,
    /// Local model files served at start, by name (standalone use).
    #[serde(default)]
    pub models: Vec<LocalModel>,
    #[serde(default)]
    pub update: UpdateConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The on-device status display (off by default).
    #[serde(default)]
    pub display: crate::display::DisplayConfig,
    /// Dynamic batching of concurrent requests to one model (off by
    /// default; see [`batching::BatchingConfig`] for why).
    #[serde(default)]
    pub batching: batching::BatchingConfig,
}

/// The durable outbox (fleet mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Hard cap on the outbox database; beyond it appends are treated like
    /// a full disk (records wait in memory, the condition is reported).
    #[serde(default = "default_outbox_db_bytes")]
    pub max_db_bytes: u64,
    /// Records held in memory while the disk refuses them (update events
    /// are kept even beyond this).
    #[serde(default = "default_outbox_memory_records")]
    pub memory_records: usize,
    /// Per-stream caps and overflow policy (`drop-oldest`, `reject-new`,
    /// `downsample`). Update events are never dropped and have no cap.
    pub status: Option<crate::outbox::StreamPolicy>,
    pub telemetry: Option<crate::outbox::StreamPolicy>,
    pub results: Option<crate::outbox::StreamPolicy>,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_db_bytes: default_outbox_db_bytes(),
            memory_records: default_outbox_memory_records(),
            status: None,
            telemetry: None,
            results: None,
        }
    }
}

impl OutboxConfig {
    /// The policy of every stream, defaults filled in.
    pub fn policies(&self) -> [crate::outbox::StreamPolicy; 4] {
        use crate::outbox::{Stream, StreamPolicy};
        Stream::ALL.map(|stream| {
            let configured = match stream {
                Stream::Events => None,
                Stream::Status => self.status,
                Stream::Telemetry => self.telemetry,
                Stream::Results => self.results,
            };
            configured.unwrap_or_else(|| StreamPolicy::default_for(stream))
        })
    }
}

/// Health sampling (fleet mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Milliseconds between samples.
    #[serde(default = "default_telemetry_interval_ms")]
    pub interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            interval_ms: default_telemetry_interval_ms(),
        }
    }
}

/// Which inference runtimes to use.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RuntimeToml")]
pub struct RuntimeConfig {
    /// Serve every model with this runtime instead of choosing per model
    /// (`tract-onnx`, `tract-tflite`, `onnxruntime`, `onnxruntime-cuda`,
    /// `litert`).
    pub pin: Option<String>,
    /// Path of `libonnxruntime.so` (native build). Default: the
    /// `ORT_DYLIB_PATH` environment variable, then the package's library
    /// directory (`<executable>/../lib/edgefleet-agent/`), then the loader's
    /// search path.
    pub onnxruntime_library: Option<PathBuf>,
    /// Path of `libLiteRt.so` (native build). Default: the `LITERT_LIBRARY`
    /// environment variable, then the package's library directory
    /// (`<executable>/../lib/edgefleet-agent/`), then the loader's search path.
    pub litert_library: Option<PathBuf>,
    /// Hardware execution providers of ONNX Runtime to offer as runtimes of
    /// their own (`onnxruntime-cuda`), next to its CPU one; the per-model
    /// choice then times them like any other runtime. Needs a GPU build of
    /// `libonnxruntime.so` and the CUDA libraries on the loader's path.
    #[serde(default)]
    pub onnxruntime_providers: Vec<OrtProvider>,
}

/// `[runtime]` as written, with the settings that were removed, so that a
/// config still using one fails with what replaces it instead of a bare
/// "unknown field".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeToml {
    pin: Option<String>,
    onnxruntime_library: Option<PathBuf>,
    litert_library: Option<PathBuf>,
    #[serde(default)]
    onnxruntime_providers: Vec<OrtProvider>,
    /// The TensorFlow Lite 2.6 C runtime, replaced by LiteRT.
    tflite_library: Option<PathBuf>,
}

impl TryFrom<RuntimeToml> for RuntimeConfig {
    type Error = String;

    fn try_from(t: RuntimeToml) -> Result<Self, String> {
        if t.tflite_library.is_some() {
            return Err(
                "runtime.tflite_library is no longer supported: the TensorFlow Lite C \
                        runtime was replaced by LiteRT; set runtime.litert_library to the path \
                        of libLiteRt.so instead (or leave it unset to use the packaged one)"
                    .into(),
            );
        }
        Ok(Self {
            pin: t.pin,
            onnxruntime_library: t.onnxruntime_library,
            litert_library: t.litert_library,
            onnxruntime_providers: t.onnxruntime_providers,
        })
    }
}

/// An ONNX Runtime execution provider the agent can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OrtProvider {
    /// NVIDIA GPUs (Jetson, desktop cards), device 0.
    Cuda,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Unix socket of the local inference API (created with mode 0660).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Optional loopback TCP listener for clients that only speak TCP.
    pub tcp: Option<SocketAddr>,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Requests served at once; more get 503 with a clear message.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_requests: usize,
    /// Longest an inference may take before the client gets a 504.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            tcp: None,
            max_request_bytes: default_max_request_bytes(),
            max_concurrent_requests: default_max_concurrent(),
            request_timeout_ms: default_request_timeout_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port`.
    pub url: String,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// When an outbox record counts as delivered: `receipt` (the fleet
    /// server confirmed storing it; default) or `puback` (the broker
    /// acknowledged it).
    #[serde(default)]
    pub delete_on: crate::outbox::DeleteOn,
    /// Most telemetry or results records sent in one publish (as a JSON
    /// array); 1 sends each record on its own, for consumers that expect
    /// one object per message.
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    /// Start a clean MQTT session on every connect (default). `false`
    /// keeps a persistent session on the broker, which was faster with
    /// Mosquitto when records are sent one per publish (see
    /// docs/delivery.md).
    #[serde(default = "default_clean_session")]
    pub clean_session: bool,
    /// The fleet server's HTTP URL. With `username` and `password`, a
    /// device key made on the device is registered there (accepted only
    /// while the server holds no key for the device).
    #[serde(default)]
    pub server_url: Option<String>,
    /// The fleet's own PEM certificate authority (a file, or the PEM itself
    /// in `ca_pem`, as enrollment bundles carry it): an `mqtts://` broker's
    /// certificate must chain to it, and HTTPS downloads and the key
    /// registration trust it besides the system's CAs. Without it an
    /// `mqtts://` broker is checked against the system's CAs.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_pem: Option<String>,
}

fn default_clean_session() -> bool {
    true
}

fn default_batch_records() -> usize {
    32
}

impl MqttConfig {
    /// Host and port from `url`.
    pub fn host_port(&self) -> Result<(String, u16), ConfigError> {
        parse_mqtt_url(&self.url)
    }

    /// The fleet's CA (PEM), if configured.
    pub fn fleet_ca(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        Ok(match (&self.ca_pem, &self.ca_file) {
            (Some(pem), _) => Some(pem.clone().into_bytes()),
            (None, Some(path)) => {
                Some(std::fs::read(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?)
            }
            (None, None) => None,
        })
    }

    /// The TLS transport for an `mqtts://` url (`None` for plain MQTT).
    pub fn tls_transport(&self) -> Result<Option<rumqttc::Transport>, ConfigError> {
        if !edgefleet_shared::broker_url::is_tls(&self.url) {
            return Ok(None);
        }
        let ca = edgefleet_shared::broker_url::trusted_cas(self.fleet_ca()?)
            .map_err(ConfigError::Invalid)?;
        Ok(Some(rumqttc::Transport::tls(ca, None, None)))
    }

    pub fn prefix(&self) -> Result<TopicPrefix, ConfigError> {
        TopicPrefix::new(self.topic_prefix.clone()).map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

/// Parses `mqtt://host:port` (port defaults to 1883).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), ConfigError> {
    edgefleet_shared::broker_url::parse(url).map_err(ConfigError::Invalid)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModel {
    pub name: String,
    pub path: PathBuf,
    /// Pin this model to one runtime.
    #[serde(default)]
    pub runtime: Option<String>,
    /// Queue every inference result of this model for upload (fleet mode).
    #[serde(default)]
    pub upload_results: bool,
    /// A test vector (the JSON `fleetctl model push --test-vector` takes):
    /// every runtime must reproduce it before serving the model, and the
    /// runtimes are timed on its inputs, so the choice is made at the size
    /// the model really serves (without one, at the smallest probe size
    /// that runs, which under-rates GPUs for image models). Its input
    /// shapes also serve tract as shape hints.
    #[serde(default)]
    pub test_vector: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    /// Seconds without a single byte before a download is abandoned.
    #[serde(default = "default_stall_secs")]
    pub download_stall_secs: u64,
    /// Attempts per URL before giving up on a model.
    #[serde(default = "default_attempts")]
    pub download_attempts: u32,
    /// Seconds a new agent release's self-test may take (it loads every
    /// active model) before the release is refused.
    #[serde(default = "default_agent_self_test_secs")]
    pub agent_self_test_secs: u64,
    /// Seconds from switching to a new agent release until it must have
    /// reached the fleet server; otherwise the previous release runs again.
    #[serde(default = "default_agent_report_deadline_secs")]
    pub agent_report_deadline_secs: u64,
    /// Seconds a new agent release must then run before it is confirmed.
    #[serde(default = "default_agent_soak_secs")]
    pub agent_soak_secs: u64,
    /// Starts of a new agent release without its confirmation (a crash
    /// loop) after which the previous release runs again.
    #[serde(default = "default_agent_max_starts")]
    pub agent_max_starts: u32,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            download_stall_secs: default_stall_secs(),
            download_attempts: default_attempts(),
            agent_self_test_secs: default_agent_self_test_secs(),
            agent_report_deadline_secs: default_agent_report_deadline_secs(),
            agent_soak_secs: default_agent_soak_secs(),
            agent_max_starts: default_agent_max_starts(),
        }
    }
}

fn default_agent_self_test_secs() -> u64 {
    120
}
fn default_agent_report_deadline_secs() -> u64 {
    300
}
fn default_agent_soak_secs() -> u64 {
    120
}
fn default_agent_max_starts() -> u32 {
    3
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/edgefleet")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/edgefleet/agent.sock")
}
fn default_max_request_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_max_concurrent() -> usize {
    16
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_prefix() -> String {
    TopicPrefix::default().as_str().to_string()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_stall_secs() -> u64 {
    30
}
fn default_attempts() -> u32 {
    3
}
fn default_outbox_db_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_outbox_memory_records() -> usize {
    10_000
}
fn default_telemetry_interval_ms() -> u64 {
    60_000
}

impl AgentConfig {
    /// Where the device key lives.
    pub fn device_key_path(&self) -> PathBuf {
        self.device_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("device.key"))
    }

    /// A config with every default and nothing connected.
    pub fn standalone(socket: PathBuf, data_dir: PathBuf) -> Self {
        Self {
            file: None,
            device_id: None,
            data_dir,
            root_document: None,
            device_key: None,
            api: ApiConfig {
                socket,
                ..ApiConfig::default()
            },
            mqtt: None,
            models: Vec::new(),
            update: UpdateConfig::default(),
            runtime: RuntimeConfig::default(),
            outbox: OutboxConfig::default(),
            telemetry: TelemetryConfig::default(),
            display: Default::default(),
            batching: Default::default(),
        }
    }

    /// Reads and validates a TOML file. Relative paths inside it are taken
    /// relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        if let Some(base) = path.parent() {
            config.resolve_relative_to(base);
        }
        config.file = Some(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_relative_to(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        fix(&mut self.api.socket);
        if let Some(root) = &mut self.root_document {
            fix(root);
        }
        if let Some(key) = &mut self.device_key {
            fix(key);
        }
        if let Some(ca) = self.mqtt.as_mut().and_then(|m| m.ca_file.as_mut()) {
            fix(ca);
        }
        for model in &mut self.models {
            fix(&mut model.path);
        }
        self.display.resolve_relative_to(base);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let update = &self.update;
        if update.agent_max_starts == 0
            || update.agent_report_deadline_secs == 0
            || update.agent_self_test_secs == 0
        {
            return invalid(
                "update.agent_max_starts, agent_report_deadline_secs and agent_self_test_secs must be at least 1".into(),
            );
        }
        if let Some(mqtt) = &self.mqtt {
            mqtt.host_port()?;
            mqtt.prefix()?;
            if self.device_id.is_none() {
                return invalid("device_id is required when [mqtt] is set".into());
            }
            if self.root_document.is_none() {
                return invalid("root_document is required when [mqtt] is set: updates cannot be verified without it".into());
            }
            if !(1..=PUBLISH_WINDOW).contains(&mqtt.batch_records) {
                return invalid(format!(
                    "mqtt.batch_records must be between 1 and {}, not {}",
                    PUBLISH_WINDOW, mqtt.batch_records
                ));
            }
        }
        if self.api.max_request_bytes < 1024 {
            return invalid("api.max_request_bytes must be at least 1024".into());
        }
        if self.api.request_timeout_ms == 0 {
            return invalid("api.request_timeout_ms must be at least 1".into());
        }
        if self.api.max_concurrent_requests == 0 {
            return invalid("api.max_concurrent_requests must be at least 1".into());
        }
        if let Some(tcp) = self.api.tcp {
            if !tcp.ip().is_loopback() {
                return invalid(format!(
                    "api.tcp {tcp} is not a loopback address; the local API has no authentication and must not be exposed"
                ));
            }
        }
        self.display.validate()?;
        self.batching.validate().map_err(ConfigError::Invalid)?;
        if self.telemetry.interval_ms < 100 {
            return invalid("telemetry.interval_ms must be at least 100".into());
        }
        if self.outbox.max_db_bytes < 64 * 1024 {
            return invalid("outbox.max_db_bytes must be at least 65536".into());
        }
        for (name, policy) in [
            ("status", self.outbox.status),
            ("telemetry", self.outbox.telemetry),
            ("results", self.outbox.results),
        ] {
            if let Some(p) = policy {
                if p.max_rows == 0 || p.max_bytes == 0 {
                    return invalid(format!(
                        "outbox.{name}: max_rows and max_bytes must be at least 1"
                    ));
                }
                if p.overflow == crate::outbox::Overflow::Never {
                    return invalid(format!(
                        "outbox.{name}.overflow: \"never\" is reserved for update events; use drop-oldest, reject-new or downsample"
                    ));
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for model in &self.models {
            edgefleet_shared::ids::validate_name("model name", &model.name)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !names.insert(&model.name) {
                return invalid(format!("model {:?} is listed twice", model.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let c = AgentConfig::from_toml(
            r#"
            device_id = "pi-1"
            data_dir = "/tmp/x"
            root_document = "root.json"
            [api]
            socket = "/tmp/a.sock"
            tcp = "127.0.0.1:8500"
            [mqtt]
            url = "mqtt://broker.local:1884"
            [[models]]
            name = "digits"
            path = "digits.onnx"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.mqtt.unwrap().host_port().unwrap(),
            ("broker.local".into(), 1884)
        );
        assert_eq!(c.models[0].name, "digits");
    }

    #[test]
    fn problems_are_named() {
        let err = AgentConfig::from_toml("[mqtt]\nurl = \"mqtt://h:1\"").unwrap_err();
        assert!(err.to_string().contains("device_id is required"), "{err}");
        let err = AgentConfig::from_toml("devcie_id = \"x\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = AgentConfig::from_toml("[api]\ntcp = \"0.0.0.0:80\"").unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err}");
        let err = AgentConfig::from_toml("device_id = \"a/b\"").unwrap_err();
        assert!(err.to_string().contains("invalid device id"), "{err}");
    }

    #[test]
    fn batching_is_off_unless_asked_and_its_errors_name_the_key() {
        let c = AgentConfig::from_toml("").unwrap();
        assert!(!c.batching.enabled);
        let c = AgentConfig::from_toml(
            "[batching]\nmax_batch = 4\n[batching.models.cls]\nenabled = true",
        )
        .unwrap();
        assert_eq!(c.batching.policy_for("cls", 1).unwrap().max_batch, 4);
        let err = AgentConfig::from_toml("[batching.models.cls]\nmax_batch = 0").unwrap_err();
        assert!(
            err.to_string().contains("batching.models.cls.max_batch"),
            "{err}"
        );
    }

    #[test]
    fn the_removed_tflite_library_names_its_replacement() {
        let text =
            "device_id = \"d\"\n[runtime]\ntflite_library = \"/usr/lib/libtensorflowlite_c.so\"";
        let err = AgentConfig::from_toml(text).unwrap_err();
        assert!(err.to_string().contains("runtime.litert_library"), "{err}");
        let text = "device_id = \"d\"\n[runtime]\nlitert_library = \"/opt/libLiteRt.so\"\npin = \"litert\"";
        let runtime = AgentConfig::from_toml(text).unwrap().runtime;
        assert_eq!(
            runtime.litert_library,
            Some(PathBuf::from("/opt/libLiteRt.so"))
        );
        assert_eq!(runtime.pin.as_deref(), Some("litert"));
        let err = AgentConfig::from_toml("device_id = \"d\"\n[runtime]\nlibrary = 1").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
