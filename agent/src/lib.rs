//! The edgefleet edge agent.
//!
//! [`run`] wires the pieces together: the [`model_store`] on disk and the
//! [`registry`] of served models, the local inference [`api`], and, when a
//! fleet is configured, the [`uplink`] (MQTT) feeding the [`update`] task,
//! whose decisions come from the I/O-free [`update::decide`].

pub mod activation;
pub mod agent_update;
pub mod api;
pub mod clock;
pub mod config;
pub mod device_key;
pub mod display;
pub mod download;
pub mod durable;
pub mod engine;
pub mod model_store;
pub mod outbox;
pub mod probe;
pub mod registry;
pub mod report;
pub mod stats;
pub mod status_view;
pub mod systemd;
pub mod telemetry;
pub mod tensor;
pub mod trim;
pub mod trust;
pub mod update;
pub mod uplink;

use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::download::Downloader;
use crate::engine::load::{local_format, read_test_vector, select_local, Loading};
use crate::model_store::{sha256_file, ModelStore};
use crate::registry::{ModelRegistry, ServedModel};
use crate::report::Reporter;

/// How long tasks get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Loads the config's local model files (standalone use). A file that is
/// not a loadable model is reported and skipped; the others are served.
async fn serve_local_models(
    config: &AgentConfig,
    registry: &ModelRegistry,
    loading: &Loading,
    child_probe: Option<&probe::Probe>,
) {
    for local in &config.models {
        let result = async {
            let format = local_format(&local.path)?;
            let path = local.path.clone();
            let sha256 =
                sha256_file(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let test_vector = match &local.test_vector {
                None => None,
                Some(tv) => Some(read_test_vector(tv)?),
            };
            let pin = local.runtime.clone().or_else(|| loading.pin.clone());
            // Where a panic would abort the agent, a child process loads
            // it first (probe.rs).
            let subject = probe::Subject::File {
                path: &path,
                test_vector: local.test_vector.as_deref(),
                pin: pin.as_deref(),
            };
            probe::gate(child_probe, subject).await?;
            let runtimes = loading.runtimes.clone();
            let selection = tokio::task::spawn_blocking(move || {
                select_local(
                    &runtimes,
                    format,
                    &path,
                    test_vector.as_ref(),
                    pin.as_deref(),
                )
            })
            .await??;
            anyhow::Ok((format, sha256, selection))
        }
        .await;
        match result {
            Ok((format, sha256, selection)) => {
                tracing::info!(model = %local.name, path = %local.path.display(), runtime = selection.engine.runtime(), "serving local model");
                let mut served = ServedModel::new(local.name.clone(), 1, sha256, format, selection);
                served.upload_results = local.upload_results;
                registry.insert(served);
            }
            Err(e) => {
                tracing::error!(model = %local.name, error = %format!("{e:#}"), "local model not served")
            }
        }
    }
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let registry = ModelRegistry::default();
    let store = ModelStore::open(&config.data_dir)?;
    let loading = Loading {
        runtimes: engine::runtimes::detect(&config.runtime),
        pin: config.runtime.pin.clone(),
    };
    let child_probe = probe::Probe::for_this_build(&config.runtime);
    tracing::info!(runtimes = ?loading.runtimes, pin = ?loading.pin, probe = child_probe.is_some(), "inference runtimes");
    let startup_rollbacks = update::serve_installed(&store, &registry, &loading).await?;
    serve_local_models(&config, &registry, &loading, child_probe.as_ref()).await;

    let identity = agent_update::Identity::detect(&config.data_dir);
    if identity.supervised {
        tracing::info!(release = ?identity.release, slot = ?identity.slot, target = agent_update::TARGET, "agent under its supervisor");
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut api_state = api::ApiState::new(registry.clone(), &config.api);
    api_state.batching = api::batch::Batching::new(config.batching.clone());
    let (link_tx, link_rx) = watch::channel(uplink::LinkState::default());
    let (alert_tx, alert_rx) = watch::channel(None::<String>);
    let mut display_outbox = None;

    if let Some(mqtt) = &config.mqtt {
        let device = config
            .device_id
            .clone()
            .context("device_id is required with [mqtt]")?;
        let root_path = config
            .root_document
            .clone()
            .context("root_document is required with [mqtt]")?;
        let trust = trust::TrustStore::open(&config.data_dir, &root_path)?;
        tracing::info!(device = %device, root_version = trust.root().version, "fleet mode");
        let key_path = config.device_key_path();
        let (key, made) = device_key::load_or_create(&key_path)?;
        tracing::info!(
            key = %key.public().to_hex(),
            path = %key_path.display(),
            made,
            "device key (the fleet server must know this public key)"
        );
        // The server refuses records signed by a key it does not know yet;
        // once the key is registered, the uplink sends them again at once.
        let key_registered = std::sync::Arc::new(tokio::sync::Notify::new());
        if let (Some(url), Some(password)) = (&mqtt.server_url, &mqtt.password) {
            tasks.spawn(device_key::register(
                url.clone(),
                device.clone(),
                password.clone(),
                key.clone(),
                mqtt.fleet_ca()?,
                key_registered.clone(),
                shutdown.clone(),
            ));
        }
        let sequence =
            outbox::Sequence::persistent(&config.data_dir.join("trust").join("sequence"))
                .context("cannot open the message sequence counter")?;
        let outbox = outbox::OutboxHandle::open(
            &config.data_dir.join("outbox.db"),
            config.outbox.policies(),
            config.outbox.max_db_bytes,
            config.outbox.memory_records,
            sequence,
        )
        .context("cannot open the outbox")?;
        tasks.spawn(outbox.clone().run_writer(shutdown.clone()));
        display_outbox = Some(outbox.clone());
        api_state.uploads = Some(api::Uploads {
            device: device.clone(),
            outbox: outbox.clone(),
        });
        let (desired_tx, desired_rx) = mpsc::channel(4);
        let (status_tx, status_rx) = watch::channel(None);
        let reporter = Reporter::new(device.clone(), outbox.clone(), status_tx, alert_tx.clone())
            .with_agent(identity.status());
        let mut updater = update::Updater::new(
            device.clone(),
            trust,
            store,
            registry.clone(),
            Downloader::new(
                Duration::from_secs(config.update.download_stall_secs),
                config.update.download_attempts,
            )
            .with_ca(mqtt.fleet_ca()?),
            reporter.clone(),
            loading,
            startup_rollbacks,
        )
        .with_probe(child_probe)
        .with_local_models(config.models.iter().map(|m| m.name.clone()).collect());
        if let Some(file) = &config.file {
            updater = updater.with_agent_installer(agent_update::install::AgentInstaller {
                data_dir: config.data_dir.clone(),
                config_path: file.clone(),
                identity: identity.clone(),
                self_test_limit: Duration::from_secs(config.update.agent_self_test_secs),
            });
        }
        if identity.supervised {
            tasks.spawn(agent_update::watch_trial(
                config.data_dir.clone(),
                identity.clone(),
                agent_update::trial_limits(&config.update),
                reporter,
                link_rx.clone(),
                shutdown.clone(),
            ));
        }
        let server_keys = uplink::ServerKeys::default();
        updater.share_server_keys(server_keys.clone());
        let link_counters = uplink::LinkCounters::default();
        tasks.spawn(updater.run(desired_rx, shutdown.clone()));
        tasks.spawn(telemetry::run(
            device.clone(),
            config.data_dir.clone(),
            Duration::from_millis(config.telemetry.interval_ms),
            registry.clone(),
            outbox.clone(),
            link_counters.clone(),
            shutdown.clone(),
        ));
        let uplink = uplink::Uplink {
            device,
            prefix: mqtt.prefix()?,
            config: mqtt.clone(),
            key,
            server_keys,
            health: link_counters,
            key_registered,
        };
        let token = shutdown.clone();
        let link = link_tx.clone();
        tasks.spawn(async move {
            if let Err(e) = uplink
                .run(desired_tx, outbox, status_rx, link, token.clone())
                .await
            {
                tracing::error!(error = %format!("{e:#}"), "uplink stopped");
                token.cancel();
            }
        });
    }

    if config.display.kind != display::DisplayKind::Off {
        let (view_tx, view_rx) = watch::channel(display::StatusView::default());
        let sources = status_view::Sources {
            device: config.device_id.clone().filter(|_| config.mqtt.is_some()),
            registry: registry.clone(),
            link: link_rx,
            alert: alert_rx,
            outbox: display_outbox,
        };
        tasks.spawn(status_view::run(
            sources,
            view_tx,
            Duration::from_millis(config.display.refresh_ms),
            shutdown.clone(),
        ));
        tasks.spawn(display::run(
            config.display.clone(),
            view_rx,
            shutdown.clone(),
        ));
    }

    // Under the supervisor the socket is its: it stays open (and
    // connections queue) while this process stops and the next starts.
    let inherited = agent_update::inherited_listener();
    let owns_socket = inherited.is_none();
    let unix = match inherited {
        Some(listener) => {
            api::adopt_unix(listener).context("cannot serve on the socket the supervisor passed")?
        }
        None => api::bind_unix(&config.api.socket).await?,
    };
    tracing::info!(socket = %config.api.socket.display(), inherited = !owns_socket, "local API listening");
    tasks.spawn(api::serve_unix(unix, api_state.clone(), shutdown.clone()));
    let connections = api_state.clone();
    if let Some(addr) = config.api.tcp {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on api.tcp {addr}"))?;
        tracing::info!(%addr, "local API listening on loopback TCP");
        tasks.spawn(api::serve_tcp(tcp, api_state, shutdown.clone()));
    }
    // Under systemd (Type=notify): started, and alive while the runtime is.
    systemd::notify("READY=1");
    tasks.spawn(systemd::feed_watchdog(shutdown.clone()));
    // Start-up code (model loading, configuration, connecting) has run;
    // give its pages back.
    trim::page_out_after(Duration::from_secs(5));

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    // Under the supervisor, the service goes on while this process stops.
    if !identity.supervised {
        systemd::notify("STOPPING=1");
    }
    // Requests already accepted are answered before the process exits.
    if !connections.drain(SHUTDOWN_GRACE).await {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("tasks did not stop within {SHUTDOWN_GRACE:?}; exiting anyway");
    }
    if owns_socket {
        let _ = std::fs::remove_file(&config.api.socket);
    }
    Ok(())
}
