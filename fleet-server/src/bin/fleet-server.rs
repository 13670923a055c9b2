//! `fleet-server`: `serve` runs the fleet service; `demo` runs it with
//! real agents on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleet_server::config::ServerConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "fleet-server", version, about = "The edgefleet fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `fleet-server serve`: flags override the config file.
#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; EDGEFLEET_SERVER_* variables override it
    /// (EDGEFLEET_SERVER_HTTP_LISTEN, EDGEFLEET_SERVER_BROKER__URL, ...),
    /// and flags below override both.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The fleet database: postgres://user@host:port/db, or an SQLite
    /// file (default {data_dir}/fleet.db).
    #[arg(long, env = "EDGEFLEET_DATABASE_URL")]
    database: Option<String>,
    #[arg(long)]
    keys_dir: Option<PathBuf>,
    /// HTTP API listen address.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Embedded MQTT broker listen address.
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// Use an external broker (mqtt://host:port) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// The server's user name and password on the external broker.
    #[arg(long, requires = "broker")]
    broker_user: Option<String>,
    #[arg(long, env = "EDGEFLEET_BROKER_PASSWORD", hide_env_values = true)]
    broker_password: Option<String>,
    /// Embedded broker: only enrolled, unrevoked devices may connect, each
    /// only to its own topics (and over TLS when --tls-cert is set).
    #[arg(long)]
    device_auth: bool,
    /// Let the embedded broker listen beyond loopback without
    /// --device-auth (anyone reaching it may read and publish anything).
    #[arg(long)]
    insecure_open_broker: bool,
    /// Serve HTTPS with this PEM certificate chain (and --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The private CA that signed --tls-cert: device bundles carry it, so
    /// agents check the embedded broker's certificate (mqtts://).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// An mqtts:// external broker's CA (PEM; default: the system's).
    #[arg(long, requires = "broker")]
    broker_ca: Option<PathBuf>,
    /// Base URL devices download artifacts from.
    #[arg(long)]
    public_url: Option<String>,
    /// MQTT topic prefix (default edgefleet/v1); lets several fleets
    /// share one external broker.
    #[arg(long)]
    topic_prefix: Option<String>,
    /// Run as one of several replicas of one fleet, by this unique name
    /// (needs PostgreSQL and an external broker; see docs/scaling.md).
    #[arg(long)]
    replica: Option<String>,
    /// Where artifact bytes live: dir ({data_dir}/artifacts) or database
    /// (PostgreSQL, shared by every replica).
    #[arg(long)]
    artifacts: Option<fleet_server::config::ArtifactStorage>,
    /// The drift score (PSI) at or above which a model counts as
    /// drifting (default 0.25).
    #[arg(long)]
    drift_alert_psi: Option<f64>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the fleet server.
    Serve(Box<ServeArgs>),
    /// Start a server and N real agents, push and deploy the example model,
    /// run an inference on each device.
    Demo {
        #[arg(long, default_value_t = 3)]
        devices: usize,
        /// Exit after the summary (0 when every device answered correctly).
        #[arg(long)]
        exit_when_done: bool,
        /// Keep demo state here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Path of the edgefleet-agent binary (default: beside this one).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Seconds to wait for every device to activate the model.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: journald and log files get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn wait_for_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    token.cancel();
}

async fn serve(config: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (is another server running? choose another --http)",
                config.http_listen
            )
        })?;
    let (running, done) = fleet_server::start(config, listener, shutdown).await?;
    eprintln!(
        "fleet-server: API on {}, MQTT on {}:{}",
        running.public_url, running.mqtt.0, running.mqtt.1
    );
    done.await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let shutdown = CancellationToken::new();
    runtime.spawn(wait_for_signal(shutdown.clone()));
    let result = match cli.command {
        Command::Serve(args) => {
            let ServeArgs {
                config,
                data_dir,
                database,
                keys_dir,
                http,
                mqtt_listen,
                broker,
                broker_user,
                broker_password,
                device_auth,
                insecure_open_broker,
                tls_cert,
                tls_key,
                tls_ca,
                broker_ca,
                public_url,
                topic_prefix,
                replica,
                artifacts,
                drift_alert_psi,
            } = *args;
            init_logging("info");
            let loaded = ServerConfig::load_with_env(config.as_deref(), std::env::vars());
            match loaded {
                Err(e) => Err(e.into()),
                Ok(mut c) => {
                    if let Some(v) = data_dir {
                        c.data_dir = v;
                    }
                    if database.is_some() {
                        c.database = database;
                    }
                    if keys_dir.is_some() {
                        c.keys_dir = keys_dir;
                    }
                    if let Some(v) = http {
                        c.http_listen = v;
                    }
                    if let Some(v) = mqtt_listen {
                        c.broker.embedded_listen = Some(v);
                    }
                    if broker.is_some() {
                        c.broker.url = broker;
                    }
                    if broker_user.is_some() {
                        c.broker.username = broker_user;
                    }
                    if broker_password.is_some() {
                        c.broker.password = broker_password;
                    }
                    c.broker.device_auth |= device_auth;
                    if broker_ca.is_some() {
                        c.broker.ca_file = broker_ca;
                    }
                    c.broker.insecure_open |= insecure_open_broker;
                    if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                        c.tls = Some(fleet_server::config::TlsConfig {
                            cert,
                            key,
                            ca: tls_ca,
                        });
                    }
                    if public_url.is_some() {
                        c.public_url = public_url;
                    }
                    if let Some(prefix) = topic_prefix {
                        c.topic_prefix = prefix;
                    }
                    if replica.is_some() {
                        c.replica = replica;
                    }
                    if let Some(v) = artifacts {
                        c.artifacts = v;
                    }
                    if let Some(v) = drift_alert_psi {
                        c.drift_alert_psi = v;
                    }
                    runtime.block_on(serve(c, shutdown))
                }
            }
        }
        Command::Demo {
            devices,
            exit_when_done,
            data_dir,
            http,
            agent_bin,
            timeout,
        } => {
            init_logging("warn");
            let options = fleet_server::demo::DemoOptions {
                devices,
                exit_when_done,
                data_dir,
                http,
                agent_bin,
                timeout: Duration::from_secs(timeout),
            };
            runtime.block_on(fleet_server::demo::run(options, shutdown))
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
