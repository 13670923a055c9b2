//! The self-test a new release must pass before the agent switches to it:
//! `edgefleet-agent self-test --config FILE`, run by the agent that is
//! switching, from the new executable, within a time limit. The new
//! executable starts, reads the config, opens the data dir, the model
//! store and the outbox, verifies the pinned root and the stored chain,
//! loads every active model (running its signed test vector) and every
//! local model of the config, and prints
//! a [`SelfTestReport`] naming the target triple it was built for. Any
//! error, a crash, a non-zero exit, a wrong target triple or running out
//! of time fails it; nothing of the running agent's state is changed.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{AgentConfig, ConfigError};
use crate::engine::load::{select_installed, Loading, LocalLoadError};
use crate::model_store::{ModelStore, StoreError};
use crate::trust::TrustError;

/// Why a self-test failed; each names what it could not do.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data dir {dir} is not writable: {source}")]
    DataDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("trust state: {0}")]
    Trust(#[from] TrustError),
    #[error("cannot read the outbox {path}: {source}")]
    Outbox {
        path: std::path::PathBuf,
        source: rusqlite::Error,
    },
    #[error("model store: {0}")]
    Store(#[from] StoreError),
    #[error("model {name}: {reason}")]
    Model { name: String, reason: String },
    #[error("local model {name}: {source}")]
    LocalModel {
        name: String,
        source: LocalLoadError,
    },
}

/// What a self-test prints as its last line on success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestReport {
    /// The target triple the tested executable was built for.
    pub target: String,
    /// Its package version.
    pub version: String,
    /// The active models it loaded, `name@version`.
    pub models: Vec<String>,
    pub millis: u64,
}

/// Runs the self-test in this process (the `self-test` subcommand).
pub fn run(config_path: &Path) -> Result<SelfTestReport, SelfTestError> {
    let started = Instant::now();
    let config = AgentConfig::load(config_path)?;
    let data_dir = &config.data_dir;
    let probe = data_dir
        .join("agent")
        .join(format!(".self-test-{}", std::process::id()));
    std::fs::create_dir_all(data_dir.join("agent"))
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| SelfTestError::DataDir {
            dir: data_dir.clone(),
            source,
        })?;
    if let Some(root) = &config.root_document {
        crate::trust::TrustStore::open(data_dir, root)?;
    }
    let outbox = data_dir.join("outbox.db");
    if outbox.exists() {
        rusqlite::Connection::open_with_flags(&outbox, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|db| {
                db.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .map_err(|source| SelfTestError::Outbox {
                path: outbox.clone(),
                source,
            })?;
    }
    let store = ModelStore::open(data_dir)?;
    let loading = Loading {
        runtimes: crate::engine::runtimes::detect(&config.runtime),
        pin: config.runtime.pin.clone(),
    };
    let mut models = Vec::new();
    for installed in store.active_models()? {
        let name = format!("{}@{}", installed.slot.name, installed.slot.version);
        select_installed(&installed, &loading).map_err(|e| SelfTestError::Model {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        models.push(name);
    }
    for local in &config.models {
        let load = || {
            let format = crate::engine::load::local_format(&local.path)?;
            let test_vector = match &local.test_vector {
                None => None,
                Some(tv) => Some(crate::engine::load::read_test_vector(tv)?),
            };
            let pin = local.runtime.clone().or_else(|| loading.pin.clone());
            crate::engine::load::select_local(
                &loading.runtimes,
                format,
                &local.path,
                test_vector.as_ref(),
                pin.as_deref(),
            )
        };
        load().map_err(|source| SelfTestError::LocalModel {
            name: local.name.clone(),
            source,
        })?;
        models.push(local.name.clone());
    }
    Ok(SelfTestReport {
        target: super::TARGET.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        models,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Runs `exe self-test --config config_path` within `limit` and checks
/// its report: built for this device's target triple.
pub async fn check(
    exe: &Path,
    config_path: &Path,
    limit: Duration,
) -> Result<SelfTestReport, String> {
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("self-test")
        .arg("--config")
        .arg(config_path)
        .env_remove(super::ENV_SUPERVISED)
        .env_remove(super::ENV_LISTEN_FD)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command
        .spawn()
        .map_err(|e| format!("self-test could not start the executable: {e}"))?;
    let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("self-test could not be waited for: {e}")),
        Err(_) => {
            return Err(format!(
                "self-test did not finish within {} s",
                limit.as_secs()
            ))
        }
    };
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim();
        let start = text.len().saturating_sub(400);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    };
    if !output.status.success() {
        return Err(format!(
            "self-test failed ({}): {}",
            output.status,
            tail(&output.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: SelfTestReport = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| {
            format!(
                "self-test printed no report (is it an edgefleet-agent?): {}",
                tail(&output.stdout)
            )
        })?;
    if report.target != super::TARGET {
        return Err(format!(
            "the executable is built for {}, this device runs {}",
            report.target,
            super::TARGET
        ));
    }
    Ok(report)
}
