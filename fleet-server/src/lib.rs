//! The edgefleet fleet server.
//!
//! [`serve`] wires the pieces: the SQLite [`store`], the content-addressed
//! [`artifacts`], the [`keys::Signer`], the MQTT [`bridge`] (to the
//! embedded [`broker`] or an external one), and the HTTP [`api`]. The
//! [`demo`] runs all of it with real agents; [`unix_http`] is the small
//! client that talks to an agent's Unix socket.

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod bridge;
pub mod broker;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod desired;
pub mod device_keys;
pub mod drift;
pub mod fleet;
pub mod insights;
pub mod keys;
pub mod logins;
pub mod metrics;
pub mod quality;
pub mod replica_sync;
pub mod rollout;
pub mod root_upkeep;
pub mod store;
pub mod tls;
pub mod unix_http;

use std::sync::Arc;

use anyhow::Context;
use edgefleet_shared::TopicPrefix;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::fleet::Fleet;

/// Makes rustls (inside reqwest) use ring. Call before building an HTTP
/// client; idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A server that is up: where it listens.
#[derive(Debug, Clone)]
pub struct Running {
    pub http: std::net::SocketAddr,
    pub mqtt: (String, u16),
    pub public_url: String,
}

/// Starts everything and returns once the server is ready; it keeps
/// running until `shutdown` is cancelled, then `done` resolves.
pub async fn start(
    config: ServerConfig,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<(Running, tokio::task::JoinHandle<()>)> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let signer = keys::Signer::load(&config.keys_dir()).with_context(|| {
        format!(
            "cannot load the fleet keys from {} (create them with `fleetctl keys init --dir {}`)",
            config.keys_dir().display(),
            config.keys_dir().display()
        )
    })?;
    let root_lifetime_secs = config.root_expiry_days.saturating_mul(86_400);
    // Replicas each hold a copy of the keys directory: one renewing the
    // root alone would fork the chain, so the root is renewed offline
    // and copied to every replica (docs/scaling.md).
    let renews_root = config.replica.is_none();
    if renews_root {
        root_upkeep::check_at_start(&signer, root_lifetime_secs, &config.keys_dir());
    }
    let database = config.database();
    let store = store::Store::open(&database).await?;
    tracing::info!(backend = store.backend(), "fleet database open");
    bootstrap_admin_token(&store, &config.data_dir).await?;
    let artifacts = match config.artifacts {
        config::ArtifactStorage::Dir => {
            artifacts::ArtifactStore::open(&config.data_dir.join("artifacts"))?
        }
        // The store's migrations (just run) created its tables.
        config::ArtifactStorage::Database => {
            artifacts::ArtifactStore::open_database(&database, shutdown.clone()).await?
        }
    };
    tracing::info!(storage = artifacts.backend(), "artifact storage open");
    if config.replica.is_some() && config.artifacts == config::ArtifactStorage::Dir {
        tracing::warn!(
            dir = %config.data_dir.join("artifacts").display(),
            "replica with artifacts in a directory: every replica must mount the same one, or use --artifacts database"
        );
    }
    let prefix = TopicPrefix::new(config.topic_prefix.clone())?;
    // With device authentication devices reach the embedded broker on its
    // public listener (`public_mqtt`), the server on a loopback one.
    let mut public_mqtt = None;
    let mut embedded = None;
    let mut broker_tls = None;
    let (host, port, credentials) = match (&config.broker.url, config.broker.embedded_listen) {
        (Some(url), _) => {
            let (host, port) = config::parse_mqtt_url(url)?;
            let credentials = config
                .broker
                .username
                .clone()
                .map(|user| (user, config.broker.password.clone().unwrap_or_default()));
            if edgefleet_shared::broker_url::is_tls(url) {
                let ca = match &config.broker.ca_file {
                    Some(path) => Some(std::fs::read(path).with_context(|| {
                        format!("cannot read the broker's CA {}", path.display())
                    })?),
                    None => None,
                };
                let ca =
                    edgefleet_shared::broker_url::trusted_cas(ca).map_err(anyhow::Error::msg)?;
                broker_tls = Some(rumqttc::Transport::tls(ca, None, None));
            }
            (host, port, credentials)
        }
        (None, Some(listen)) => {
            let auth = config.broker.device_auth.then(|| broker::DeviceAuth {
                store: store.clone(),
                server_user: bridge::client_id(&prefix),
                server_password: auth::device_password(),
            });
            let credentials = auth
                .as_ref()
                .map(|a| (a.server_user.clone(), a.server_password.clone()));
            let device_auth = auth.is_some();
            let mqtt_broker = broker::Broker::new(prefix.clone(), auth, broker::Limits::default());
            let listener = broker::Broker::bind(listen).await?;
            // With port 0 in --mqtt-listen, devices are told the port bound.
            let bound = listener.local_addr()?;
            let tls = match (&config.tls, config.embedded_mqtt_tls()) {
                (Some(tls), true) => Some(tls::acceptor(tls)?),
                _ => None,
            };
            let door = if device_auth {
                tracing::info!(
                    %bound,
                    tls = tls.is_some(),
                    "embedded broker: only enrolled devices may connect, each to its own topics"
                );
                broker::Door::Devices
            } else {
                broker::Door::Open
            };
            tokio::spawn(
                mqtt_broker
                    .clone()
                    .serve(listener, door, tls, shutdown.clone()),
            );
            // The server's own client: on a loopback listener of its own
            // when devices must authenticate, else like any client.
            let server_addr = if device_auth {
                let inner = broker::Broker::bind(([127, 0, 0, 1], 0).into()).await?;
                let inner_addr = inner.local_addr()?;
                tokio::spawn(mqtt_broker.clone().serve(
                    inner,
                    broker::Door::Server,
                    None,
                    shutdown.clone(),
                ));
                public_mqtt = Some((bound.ip().to_string(), bound.port()));
                inner_addr
            } else {
                bound
            };
            embedded = Some(mqtt_broker);
            (
                server_addr.ip().to_string(),
                server_addr.port(),
                credentials,
            )
        }
        (None, None) => anyhow::bail!("no MQTT broker configured"),
    };
    let session = edgefleet_shared::messages::next_session(None);
    let login = config::BrokerLogin {
        host: host.clone(),
        port,
        credentials,
        tls: broker_tls,
    };
    let (mqtt, mut eventloop) =
        bridge::client(&login, &prefix, &signer, session, config.replica.as_deref());
    bridge::connect(&mut eventloop, &format!("{host}:{port}")).await?;
    let bound = http.local_addr()?;
    let public_url = config.public_url(bound);
    let devices = store.find_all_devices(&Default::default()).await?;
    let revoked = revoked_devices(&devices);
    // Only a fleet that does not require enrollment pins a never-enrolled
    // device's first key.
    let device_keys = device_keys::DeviceKeys::new(&devices, !config.broker.device_auth);
    let clock = clock::system();
    let signer = Arc::new(signer);
    let metrics = metrics::Metrics::default();
    // The drift references are cached before the first desired state is
    // signed, so slots carry their bins from the start.
    let drift = drift::DriftView::new(config.drift_alert_psi);
    drift.load_references(&store).await?;
    tokio::spawn(drift.clone().follow(store.clone(), shutdown.clone()));
    let desired = desired::DesiredStates {
        store: store.clone(),
        artifacts: artifacts.clone(),
        signer: signer.clone(),
        publisher: Arc::new(mqtt.clone()),
        clock: clock.clone(),
        prefix: prefix.clone(),
        public_url: public_url.clone(),
        expiry_secs: config.desired_expiry_secs,
        revoked: desired::Revoked::new(revoked),
        metrics: metrics.clone(),
        drift: drift.clone(),
    };
    let loaded_rollouts = rollout::Rollouts::load_as(
        store.clone(),
        desired.clone(),
        clock.clone(),
        config.replica.as_deref().unwrap_or("server"),
    )
    .await?;
    let fleet = Fleet {
        store,
        artifacts,
        signer,
        mqtt,
        prefix,
        public_url: public_url.clone(),
        max_upload_bytes: config.max_upload_bytes,
        metrics,
        device_mqtt_url: config
            .device_mqtt_url(&public_url, public_mqtt.as_ref().map_or(port, |(_, p)| *p)),
        broker: embedded,
        device_ca_pem: match config.tls.as_ref().and_then(|t| t.ca.as_ref()) {
            Some(path) if config.embedded_mqtt_tls() => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --tls-ca {}", path.display()))?,
            ),
            _ => None,
        },
        external_broker: config.broker.url.is_some().then(|| login.clone()),
        desired,
        device_keys: Arc::new(device_keys),
        sessions: Default::default(),
        rollouts: loaded_rollouts,
        insights: Arc::new(insights::Insights::with_drift(drift)),
        logins: Default::default(),
        secure_cookies: config.tls.is_some() || public_url.starts_with("https://"),
    };
    {
        // The dashboard's view of the fleet, rebuilt in the background so
        // the server is ready at once. A replica ingests only its share of
        // device messages, so it then follows what the others store.
        let fleet = fleet.clone();
        let follow = config.replica.is_some().then(|| shutdown.clone());
        tokio::spawn(async move {
            let since = edgefleet_shared::unix_now();
            let started = std::time::Instant::now();
            match fleet.insights.rebuild(&fleet.store, 720).await {
                Ok(()) => tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "dashboard view rebuilt from the store"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild the dashboard view from the store")
                }
            }
            if let Some(shutdown) = follow {
                let store = fleet.store.clone();
                fleet.insights.clone().follow(store, since, shutdown).await;
            }
        });
    }
    if config.replica.is_some() {
        tokio::spawn(replica_sync::run(fleet.clone(), shutdown.clone()));
    }
    let bridge_task = tokio::spawn(bridge::run(
        fleet.clone(),
        eventloop,
        session,
        config.replica.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(fleet.rollouts.clone().run(shutdown.clone()));
    if renews_root {
        tokio::spawn(root_upkeep::run(
            fleet.clone(),
            root_lifetime_secs,
            config.keys_dir(),
            shutdown.clone(),
        ));
    } else {
        fleet.metrics.set_root_expires(fleet.signer.root().expires);
    }
    tokio::spawn(prune_streamed(
        fleet.store.clone(),
        config.telemetry_retention_secs,
        shutdown.clone(),
    ));
    let app = api::router(fleet.clone()).merge(dashboard::router(fleet));
    let token = shutdown.clone();
    let tls = match &config.tls {
        Some(tls) => Some(tls::acceptor(tls)?),
        None => None,
    };
    let done = tokio::spawn(async move {
        match tls {
            Some(acceptor) => tls::serve(http, acceptor, app, token).await,
            None => {
                let server = axum::serve(http, app)
                    .with_graceful_shutdown(async move { token.cancelled().await });
                if let Err(e) = server.await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), bridge_task).await;
    });
    let (mqtt_host, mqtt_port) = public_mqtt.unwrap_or((host, port));
    tracing::info!(http = %bound, mqtt = %format!("{mqtt_host}:{mqtt_port}"), dashboard = %format!("{public_url}/ui/"), "fleet server ready");
    Ok((
        Running {
            http: bound,
            mqtt: (mqtt_host, mqtt_port),
            public_url,
        },
        done,
    ))
}

/// Deletes telemetry and results older than the retention, at start and
/// then every ten minutes.
async fn prune_streamed(store: store::Store, retention_secs: u64, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let cutoff = edgefleet_shared::unix_now().saturating_sub(retention_secs);
        match store.prune_streamed(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned old telemetry and results"),
            Err(e) => tracing::warn!(error = %e, "cannot prune telemetry"),
        }
    }
}

/// On a fleet with no operator tokens yet, creates an admin token and
/// writes it to `{data_dir}/admin.token` (mode 0600), where fleetctl on
/// this machine finds it. The operator makes scoped tokens with it and may
/// then revoke it.
async fn bootstrap_admin_token(
    store: &store::Store,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    if !store.list_tokens().await?.is_empty() {
        return Ok(());
    }
    let made = auth::generate(
        "bootstrap-admin",
        auth::Scope::Admin,
        edgefleet_shared::unix_now(),
    );
    let path = data_dir.join("admin.token");
    edgefleet_shared::secret_file::write(&path, format!("{}\n", made.token).as_bytes())
        .with_context(|| format!("cannot write the first admin token to {}", path.display()))?;
    store.create_token(&made.record, &made.hash).await?;
    tracing::warn!(
        path = %path.display(),
        id = %made.record.id,
        "no operator tokens yet: created admin token \"bootstrap-admin\"; make scoped ones with `fleetctl tokens create` and revoke this one"
    );
    Ok(())
}

/// The ids of revoked devices.
fn revoked_devices(devices: &[store::DeviceRecord]) -> std::collections::HashSet<String> {
    devices
        .iter()
        .filter(|d| d.revoked_at.is_some())
        .map(|d| d.id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    async fn bootstrap_in(dir: &std::path::Path) {
        let database = dir.join("fleet.db").display().to_string();
        let store = super::store::Store::open(&database).await.unwrap();
        super::bootstrap_admin_token(&store, dir).await.unwrap();
    }

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn the_first_admin_token_is_private_whatever_was_at_its_path() {
        // A world-readable file left there: the token is not written into it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        bootstrap_in(dir.path()).await;
        assert_eq!(mode(&path), 0o600);
        assert!(std::fs::read_to_string(&path).unwrap().trim().len() > 20);

        // A symlink planted there: replaced, its target untouched.
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("readable-by-all");
        std::fs::write(&target, "untouched").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.path().join("admin.token");
        symlink(&target, &path).unwrap();
        bootstrap_in(dir.path()).await;
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(mode(&target), 0o644);
    }
}
