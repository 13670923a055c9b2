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
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use edgefleet_shared::{DeviceId, RootDocument, Signed, TopicPrefix};

mod device;

use device::Device;

#[derive(Parser, Clone)]
#[command(
    name = "fleet-sim",
    about = "Simulated edgefleet devices for tests and benchmarks"
)]
pub(crate) struct Args {
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
