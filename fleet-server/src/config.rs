//! Server configuration: defaults, then an optional TOML file, then
//! command-line flags; validated once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
}

/// Which MQTT broker the server uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Start the embedded broker listening here (the default).
    #[serde(default = "default_embedded")]
    pub embedded_listen: Option<SocketAddr>,
    /// Use an external broker instead: `mqtt://host:port`.
    pub url: Option<String>,
    /// The server's own credentials on an external broker.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Embedded broker: accept only enrolled, unrevoked devices (user name
    /// and client id = device id, password from enrollment) and the
    /// server itself. Off by default so unenrolled demo agents connect.
    #[serde(default)]
    pub device_auth: bool,
    /// Let the embedded broker listen beyond loopback without device
    /// authentication: anyone who reaches it may read and publish
    /// anything. Refused unless set.
    #[serde(default)]
    pub insecure_open: bool,
    /// `mqtts://` external broker: the PEM CA its certificate chains to
    /// (default: the system's CAs).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            embedded_listen: default_embedded(),
            url: None,
            username: None,
            password: None,
            device_auth: false,
            insecure_open: false,
            ca_file: None,
        }
    }
}

fn default_embedded() -> Option<SocketAddr> {
    Some(
        "127.0.0.1:1883"
            .parse()
            .expect("a literal socket address parses"),
    )
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The fleet database: a `postgres://user@host:port/db` URL, or an
    /// SQLite file path. Default: `{data_dir}/fleet.db` (SQLite). The
    /// `EDGEFLEET_DATABASE_URL` environment variable overrides the file;
    /// `--database` overrides both.
    pub database: Option<String>,
    /// Defaults to `{data_dir}/keys`.
    pub keys_dir: Option<PathBuf>,
    #[serde(default = "default_http")]
    pub http_listen: SocketAddr,
    /// Base URL devices use to download artifacts; defaults to
    /// `http://{http_listen}`.
    pub public_url: Option<String>,
    /// The broker URL written into device bundles; defaults to the
    /// external broker's URL, or the embedded broker's port on the host of
    /// `public_url`.
    pub public_mqtt_url: Option<String>,
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Lifetime of each signed desired state.
    #[serde(default = "default_expiry")]
    pub desired_expiry_secs: u64,
    /// Lifetime of a root document the server renews itself (when the
    /// root keys are in the keys directory): it writes the next root
    /// version, valid this long, once less than a third of this is left.
    /// With the root keys offline it only warns.
    #[serde(default = "default_root_expiry_days")]
    pub root_expiry_days: u64,
    /// Largest model upload accepted.
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    /// How long telemetry samples and uploaded results are kept.
    #[serde(default = "default_retention")]
    pub telemetry_retention_secs: u64,
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Serve HTTPS with this certificate chain and key (PEM) instead of
    /// HTTP; or terminate TLS in a reverse proxy in front.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// This server is one of several replicas of one fleet, by this name
    /// (unique among them): they share the PostgreSQL database, the
    /// external broker (each takes its share of device messages through a
    /// shared subscription) and the artifact storage; one at a time drives
    /// the rollouts. Unset: the only server.
    #[serde(default)]
    pub replica: Option<String>,
    /// Where artifact bytes live: `dir` (`{data_dir}/artifacts`, the
    /// default; one server, or a directory every replica mounts) or
    /// `database` (in the PostgreSQL database, so every replica serves
    /// every artifact).
    #[serde(default)]
    pub artifacts: ArtifactStorage,
    /// The drift score (largest feature PSI against the version's
    /// reference) at or above which the API, the dashboard and the logs
    /// mark a model as drifting.
    #[serde(default = "default_drift_alert_psi")]
    pub drift_alert_psi: f64,
}

fn default_drift_alert_psi() -> f64 {
    crate::drift::DEFAULT_ALERT_PSI
}

/// Where artifact bytes live (see [`ServerConfig::artifacts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactStorage {
    #[default]
    Dir,
    Database,
}

impl std::str::FromStr for ArtifactStorage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dir" => Ok(Self::Dir),
            "database" => Ok(Self::Database),
            other => Err(format!(
                "unknown artifact storage {other:?}: say dir or database"
            )),
        }
    }
}

/// PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signed `cert`, when it is a private one: enrollment
    /// hands it to devices so they can check the server (`mqtts://`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("fleet-data")
}
fn default_http() -> SocketAddr {
    "127.0.0.1:8080"
        .parse()
        .expect("a literal socket address parses")
}
fn default_prefix() -> String {
    edgefleet_shared::TopicPrefix::default().as_str().into()
}
fn default_expiry() -> u64 {
    30 * 86_400
}
fn default_root_expiry_days() -> u64 {
    365
}
fn default_retention() -> u64 {
    7 * 86_400
}
fn default_max_upload() -> u64 {
    4 * 1024 * 1024 * 1024
}

impl Default for ServerConfig {
    fn default() -> Self {
        toml::from_str("").expect("an empty config parses to the defaults")
    }
}

/// Prefix of the environment variables that override config keys:
/// `EDGEFLEET_SERVER_HTTP_LISTEN=0.0.0.0:8080` sets `http_listen`,
/// `EDGEFLEET_SERVER_BROKER__URL=mqtt://…` sets `[broker] url` (two
/// underscores between table and key).
pub const ENV_PREFIX: &str = "EDGEFLEET_SERVER_";

impl ServerConfig {
    /// Defaults, then the TOML file (if any), then `EDGEFLEET_SERVER_*`
    /// environment variables; command-line flags are applied after this.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (mut table, source) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
                (table, path.to_path_buf())
            }
            None => (toml::Table::new(), PathBuf::from("(no config file)")),
        };
        let mut overridden = Vec::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
            // A TOML value where the text is one (numbers, booleans,
            // arrays, quoted strings), else the text as a string.
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.clone()));
            let mut slot = &mut table;
            for part in &path[..path.len() - 1] {
                let entry = slot
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
                slot = entry.as_table_mut().ok_or_else(|| {
                    ConfigError::Invalid(format!("{name}: {part} is not a table"))
                })?;
            }
            slot.insert(path[path.len() - 1].clone(), parsed);
            overridden.push(name);
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: source,
                message: if overridden.is_empty() {
                    e.to_string()
                } else {
                    format!("{e} (with {} from the environment)", overridden.join(", "))
                },
            })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(Some(path), std::iter::empty())
    }

    /// The database to open (see [`ServerConfig::database`]).
    pub fn database(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| self.data_dir.join("fleet.db").display().to_string())
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.keys_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys"))
    }

    /// The broker URL devices are given, for a server whose artifact base
    /// URL is `public_url` and whose broker listens on `mqtt_port`.
    pub fn device_mqtt_url(&self, public_url: &str, mqtt_port: u16) -> String {
        let scheme = if self.embedded_mqtt_tls() {
            "mqtts"
        } else {
            "mqtt"
        };
        if let Some(url) = self.public_mqtt_url.clone().or(self.broker.url.clone()) {
            return url;
        }
        let host = public_url
            .split("://")
            .nth(1)
            .unwrap_or(public_url)
            .split('/')
            .next()
            .unwrap_or("127.0.0.1");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        format!("{scheme}://{host}:{mqtt_port}")
    }

    /// The embedded broker serves `mqtts://` (with the HTTPS certificate)
    /// when devices authenticate and the server has a certificate: device
    /// passwords never cross the network in clear.
    pub fn embedded_mqtt_tls(&self) -> bool {
        self.broker.url.is_none() && self.broker.device_auth && self.tls.is_some()
    }

    /// The artifact base URL for a server actually bound to `bound`.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{bound}"))
            .trim_end_matches('/')
            .to_string()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let (None, Some(listen)) = (&self.broker.url, self.broker.embedded_listen) {
            if !listen.ip().is_loopback() && !self.broker.device_auth && !self.broker.insecure_open
            {
                return Err(ConfigError::Invalid(format!(
                    "the embedded broker would listen on {listen} with no device authentication: anyone reaching it could read and forge every device's messages. Add --device-auth (enrolled devices only, each to its own topics), listen on loopback, or say --insecure-open-broker"
                )));
            }
        }
        edgefleet_shared::TopicPrefix::new(self.topic_prefix.clone())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(self.drift_alert_psi.is_finite() && self.drift_alert_psi > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "drift_alert_psi must be a number above 0, not {}",
                self.drift_alert_psi
            )));
        }
        if self.desired_expiry_secs < 60 {
            return Err(ConfigError::Invalid(
                "desired_expiry_secs must be at least 60".into(),
            ));
        }
        if self.root_expiry_days < 3 {
            return Err(ConfigError::Invalid(format!(
                "root_expiry_days = {} is too short: at least 3 (a root is renewed when a third of it is left)",
                self.root_expiry_days
            )));
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "public_url {url:?} must start with http:// or https://"
                )));
            }
        }
        let postgres = self.database().starts_with("postgres://")
            || self.database().starts_with("postgresql://");
        if self.artifacts == ArtifactStorage::Database && !postgres {
            return Err(ConfigError::Invalid(
                "artifacts = \"database\" needs a PostgreSQL database (--database postgres://...)"
                    .into(),
            ));
        }
        if let Some(name) = &self.replica {
            edgefleet_shared::ids::validate_name("replica name", name)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !postgres {
                return Err(ConfigError::Invalid(format!(
                    "replica {name:?}: replicas share one PostgreSQL database (--database postgres://...); SQLite is one server's"
                )));
            }
            if self.broker.url.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "replica {name:?}: replicas share one external broker (--broker mqtt://...); the embedded broker is one server's"
                )));
            }
        }
        match (&self.broker.url, &self.broker.embedded_listen) {
            (Some(url), _) => {
                parse_mqtt_url(url)?;
            }
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "no broker: set broker.embedded_listen or broker.url".into(),
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Parses `mqtt://host:port` (port defaults to 1883).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), ConfigError> {
    edgefleet_shared::broker_url::parse(url).map_err(ConfigError::Invalid)
}

/// How the server reaches a broker: where, with which user name and
/// password, and over TLS (`mqtts://`) or not.
#[derive(Clone)]
pub struct BrokerLogin {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    pub tls: Option<rumqttc::Transport>,
}

impl BrokerLogin {
    /// Options for client `id` with this login.
    pub fn options(&self, id: String) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(id, self.host.clone(), self.port);
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user, password);
        }
        if let Some(tls) = &self.tls {
            options.set_transport(tls.clone());
        }
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_the_file_and_names_itself_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            "http_listen = \"127.0.0.1:9000\"\ndesired_expiry_secs = 600\n[broker]\nembedded_listen = \"127.0.0.1:1884\"\n",
        )
        .unwrap();
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let c = ServerConfig::load_with_env(
            Some(&path),
            env(&[
                ("EDGEFLEET_SERVER_HTTP_LISTEN", "0.0.0.0:8443"),
                ("EDGEFLEET_SERVER_DESIRED_EXPIRY_SECS", "7200"),
                ("EDGEFLEET_SERVER_BROKER__DEVICE_AUTH", "true"),
                ("EDGEFLEET_SERVER_DATABASE", "postgres://fleet@db/fleet"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http_listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.desired_expiry_secs, 7200);
        assert!(c.broker.device_auth);
        assert_eq!(
            c.broker.embedded_listen,
            Some("127.0.0.1:1884".parse().unwrap())
        );
        assert_eq!(c.database.as_deref(), Some("postgres://fleet@db/fleet"));
        // Without a file: defaults plus the environment.
        let c =
            ServerConfig::load_with_env(None, env(&[("EDGEFLEET_SERVER_TOPIC_PREFIX", "acme/v1")]))
                .unwrap();
        assert_eq!(c.topic_prefix, "acme/v1");
        let err = ServerConfig::load_with_env(
            Some(&path),
            env(&[("EDGEFLEET_SERVER_HTTP_LISTNE", "0.0.0.0:1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("http_listne") && err.contains("EDGEFLEET_SERVER_HTTP_LISTNE"),
            "{err}"
        );
    }

    #[test]
    fn defaults_are_valid() {
        let c = ServerConfig::default();
        c.validate().unwrap();
        assert_eq!(c.keys_dir(), PathBuf::from("fleet-data/keys"));
        assert_eq!(
            c.public_url("127.0.0.1:9".parse().unwrap()),
            "http://127.0.0.1:9"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let c: ServerConfig = toml::from_str("public_url = \"ftp://x\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("public_url"));
        let c: ServerConfig = toml::from_str("[broker]\nurl = \"http://x\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("broker url"));
        assert!(toml::from_str::<ServerConfig>("htp_listen = 1").is_err());
    }
}
