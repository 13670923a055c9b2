//! A real `edgefleet-agent` process for a test: in fleet mode against a
//! [`Server`] ([`Agent::builder`]), from an enrollment bundle, or
//! standalone serving local files; and the local API calls tests make.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{binary, unix_http, wait_for, Proc, Server};

/// A running agent.
pub struct Agent {
    pub proc: Proc,
    pub id: String,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

/// How to start a fleet-mode [`Agent`]: `Agent::builder(dir, id, server)`,
/// then any of the options, then [`AgentBuilder::start`].
#[must_use]
pub struct AgentBuilder<'a> {
    dir: PathBuf,
    id: String,
    server: &'a Server,
    mqtt_url: Option<String>,
    config: String,
}

impl AgentBuilder<'_> {
    /// Connects to `url` instead of the server's broker address (a proxy).
    pub fn mqtt_url(mut self, url: &str) -> Self {
        self.mqtt_url = Some(url.to_string());
        self
    }

    /// Appends `toml` (tables) to the agent's config file. With an
    /// `[update]` table of its own it replaces the harness's (a 5 s
    /// download stall limit).
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self
    }

    /// Writes `{dir}/{id}/agent.toml` and runs the agent on it.
    pub fn start(self) -> anyhow::Result<Agent> {
        let agent_dir = self.dir.join(&self.id);
        std::fs::create_dir_all(&agent_dir)?;
        let socket = agent_dir.join("agent.sock");
        let server = self.server;
        let config = format!(
            "device_id = \"{id}\"\ndata_dir = \"{data}\"\nroot_document = \"{root}\"\n[api]\nsocket = \"{sock}\"\n[mqtt]\nurl = \"{mqtt}\"\ntopic_prefix = \"{prefix}\"\nkeep_alive_secs = 5\n{update}",
            id = self.id,
            data = agent_dir.join("data").display(),
            root = server.root_document().display(),
            sock = socket.display(),
            mqtt = self.mqtt_url.as_deref().unwrap_or(&server.mqtt_url),
            prefix = server.topic_prefix,
            update = if self.config.contains("[update]") {
                ""
            } else {
                "[update]\ndownload_stall_secs = 5\n"
            },
        ) + &self.config;
        Agent::run_config(agent_dir, &self.id, socket, &config)
    }
}

impl Agent {
    /// An agent in fleet mode against `server`, to configure before
    /// [`AgentBuilder::start`].
    pub fn builder<'a>(dir: &Path, id: &str, server: &'a Server) -> AgentBuilder<'a> {
        AgentBuilder {
            dir: dir.to_path_buf(),
            id: id.to_string(),
            server,
            mqtt_url: None,
            config: String::new(),
        }
    }

    /// Starts an agent in fleet mode against `server`, with the harness's
    /// defaults.
    pub fn start_fleet(dir: &Path, id: &str, server: &Server) -> anyhow::Result<Self> {
        Self::builder(dir, id, server).start()
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
        extra: &[OsString],
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

    /// One request to the agent's local API (its Unix socket).
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(http::StatusCode, Value)> {
        Ok(unix_http::request(&self.socket, method, path, body).await?)
    }

    /// Waits until the agent's local API says it is ready; the error
    /// carries its log.
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
        let probs: Vec<f64> = reply["outputs"][0]["data"]
            .as_array()
            .context("no output data")?
            .iter()
            .map(|p| p.as_f64().context("a probability that is not a number"))
            .collect::<anyhow::Result<_>>()?;
        probs
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .context("no probabilities")
    }

    /// One digits inference with request id `id` (the id its uploaded
    /// result carries), asserting success.
    pub async fn infer_as(&self, id: &str, pixels: &[f64]) -> anyhow::Result<()> {
        let body = serde_json::json!({"id": id, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": pixels}]});
        let (status, reply) = self
            .request(http::Method::POST, "/v2/models/digits/infer", Some(&body))
            .await?;
        anyhow::ensure!(status.is_success(), "inference failed: {status} {reply}");
        Ok(())
    }

    /// The version of `digits` the agent serves now (its model metadata's
    /// first version; empty if it names none).
    pub async fn serving_version(&self) -> anyhow::Result<String> {
        let (status, meta) = self
            .request(http::Method::GET, "/v2/models/digits", None)
            .await?;
        anyhow::ensure!(status.is_success(), "metadata: {status} {meta}");
        Ok(meta["versions"][0].as_str().unwrap_or_default().to_string())
    }
}
