//! `fleetctl`: the operator's command line for an edgefleet server.
//!
//! Exit codes: 0 success, 1 the server refused or failed the request,
//! 2 bad usage or local input, 3 the server could not be reached, 4 not
//! allowed (no token, a bad or revoked one, or too small a scope).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_server::store::{DeviceRecord, EventRecord, ModelRecord};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate an edgefleet fleet server"
)]
struct Cli {
    /// Fleet server base URL.
    #[arg(
        long,
        global = true,
        env = "FLEETCTL_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// Operator token (eft_...). Default: EDGEFLEET_TOKEN, then the
    /// token file.
    #[arg(long, global = true, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the operator token, used when no --token is given
    /// (the server writes its first admin token here).
    #[arg(long, global = true, default_value = "fleet-data/admin.token")]
    token_file: PathBuf,
    /// A PEM CA certificate to trust for the server's HTTPS (a private
    /// CA or a self-signed server certificate).
    #[arg(long, global = true, env = "FLEETCTL_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Model registry.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Point devices (or every device) at a model version.
    Deploy {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: u64,
        /// A device id; repeat for several.
        #[arg(
            long = "device",
            conflicts_with_all = ["all", "tags"],
            required_unless_present_any = ["all", "tags"]
        )]
        devices: Vec<String>,
        /// Every device, including ones that enroll later.
        #[arg(long, conflicts_with = "tags")]
        all: bool,
        /// KEY=VALUE, repeatable: the devices that have all these tags now.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Devices: list (the default), enroll, revoke.
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// Broker configuration for an external broker.
    Broker {
        #[command(subcommand)]
        command: BrokerCommand,
    },
    /// Recent update events of one device.
    Events {
        device: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Operator tokens (admin scope).
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Staged rollouts.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Operator actions, oldest first (admin scope).
    Audit {
        /// Only entries after this id (for paging).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// List devices with the model versions they report.
    List {
        /// KEY=VALUE; repeat to require several.
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        hardware: Option<String>,
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        #[arg(long)]
        offline: bool,
        /// Only ids after this one (paging).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Enroll a device and write its bundle (agent.toml with its MQTT
    /// credentials, root.json) to DIR, for the flashing step to copy to
    /// /etc/edgefleet/ on the device. Enrolling again gives a new password.
    Enroll {
        #[arg(long)]
        id: String,
        /// Hardware class (rpi4, jetson-orin, ...).
        #[arg(long)]
        hardware: String,
        /// KEY=VALUE; repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Bundle directory (created; must not hold a bundle already).
        #[arg(long)]
        out: PathBuf,
        /// A board's agent settings to merge into the bundle's agent.toml
        /// (devices/<board>/agent.toml): outbox, telemetry, display,
        /// runtime, API limits.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// The device's public key (64 hex), if it made one already
        /// (the agent logs it at start). Without it the agent makes a
        /// key at first start and registers it with the bundle's
        /// credentials; the server takes only the first.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Put the agent and a device's bundle on a board: over SSH
    /// (--host: copy, install, start, then wait until the device reports
    /// in), or onto the board's mounted root file system for its first
    /// boot to install (--to).
    Flash {
        #[arg(long)]
        id: String,
        /// user@address of the board (key-based SSH; the user is root or
        /// may sudo without a password).
        #[arg(long, required_unless_present = "to", conflicts_with = "to")]
        host: Option<String>,
        /// The board's mounted root file system (e.g. an SD card's).
        #[arg(long)]
        to: Option<PathBuf>,
        /// The bundle from enrollment [default: bundles/ID].
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// The package [default: the one in --dist for the board's
        /// architecture].
        #[arg(long)]
        package: Option<PathBuf>,
        /// The board's Debian architecture (arm64, armhf, amd64), for --to
        /// without --package.
        #[arg(long)]
        arch: Option<String>,
        #[arg(long, default_value = "dist")]
        dist: PathBuf,
        /// SSH port.
        #[arg(long)]
        port: Option<u16>,
        /// Extra `ssh -o` options (KEY=VALUE); repeatable.
        #[arg(long = "ssh-option")]
        ssh_options: Vec<String>,
        /// Seconds to wait for the device to report in (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Revoke a device: its credentials stop working and its broker
    /// connection is cut.
    Revoke { id: String },
    /// Set the key a device's messages must be signed with, replacing any
    /// other (a key made on the device, or a rotation).
    SetKey {
        id: String,
        /// 64 hex characters (the agent logs its key at start, "device key").
        #[arg(long)]
        public_key: String,
    },
    /// Replace a device's tags (KEY=VALUE ...; none clears them).
    Tag { id: String, tags: Vec<String> },
    /// One device: what it reports, its tags and enrollment.
    Show { id: String },
    /// A device's stored telemetry (JSON lines, oldest first).
    Telemetry {
        id: String,
        #[arg(long)]
        after_seq: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// A device's uploaded inference results (JSON lines, oldest first).
    Results {
        id: String,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        after_seq: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum RolloutCommand {
    /// Create a rollout (with --dry-run, show the waves only).
    Create {
        #[arg(long)]
        id: String,
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: u64,
        #[arg(long = "device", conflicts_with_all = ["all", "tags", "hardware"], required_unless_present_any = ["all", "tags", "hardware"])]
        devices: Vec<String>,
        #[arg(long, conflicts_with_all = ["tags", "hardware"])]
        all: bool,
        /// Devices with every KEY=VALUE tag given.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Devices of this hardware class (with --tag, or alone).
        #[arg(long)]
        hardware: Option<String>,
        /// Cumulative waves: counts and percents, e.g. 1,5%,25%,100%.
        #[arg(long, conflicts_with = "ramp")]
        waves: Option<String>,
        /// Exponential ramp BASE,FACTOR, e.g. 2,3.
        #[arg(long)]
        ramp: Option<String>,
        /// Percent of settled devices failed at which to stop.
        #[arg(long, default_value_t = 10.0)]
        failure_pct: f64,
        /// pause or abort at the failure threshold.
        #[arg(long, default_value = "pause")]
        on_failure: String,
        /// Percent of a wave's settled devices that must be healthy.
        #[arg(long, default_value_t = 95.0)]
        success_pct: f64,
        #[arg(long, default_value_t = 0)]
        soak_secs: u64,
        /// Wait for `fleetctl rollout approve` before each next wave.
        #[arg(long)]
        approve_each: bool,
        #[arg(long, default_value_t = 100)]
        max_in_flight: u32,
        /// A device that does not report within this is asked again.
        #[arg(long, default_value_t = 600)]
        device_timeout_secs: u64,
        /// How often a device is asked again before it counts as failed.
        #[arg(long, default_value_t = 2)]
        retries: u32,
        /// How long an offline device may hold a wave's gate.
        #[arg(long, default_value_t = 900)]
        offline_grace_secs: u64,
        /// A device on the new version whose inference error rate (percent,
        /// in one telemetry interval) is above this counts as failed.
        #[arg(long)]
        max_error_pct: Option<f64>,
        /// Likewise for its p95 inference latency, in milliseconds.
        #[arg(long)]
        max_p95_ms: Option<f64>,
        /// Fewest inferences in an interval to judge it by.
        #[arg(long, default_value_t = 20)]
        min_inferences: u64,
        #[arg(long)]
        dry_run: bool,
    },
    /// Status: phase (and why it paused), counts per state in all and per
    /// wave; with --json, also each device's state.
    Status {
        id: Option<String>,
        /// With --json: leave out each device's state.
        #[arg(long)]
        brief: bool,
    },
    /// An operator's decision about one device: exclude (take it out, and
    /// send it back if it moved), retry (a failed, reverted, excluded or
    /// offline device back in line), force (ask it now, ahead of its wave).
    Device {
        id: String,
        device: String,
        #[arg(value_parser = ["exclude", "retry", "force"])]
        action: String,
    },
    Start {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Approve the next wave.
    Approve {
        id: String,
    },
    /// Abort: every device that moved goes back to its previous version.
    Abort {
        id: String,
    },
}

fn parse_waves(text: &str) -> Result<Vec<Value>, Failure> {
    text.split(',')
        .map(|w| {
            let w = w.trim();
            match w.strip_suffix('%') {
                Some(p) => p.parse::<f64>().ok().map(|p| json!({"percent": p})),
                None => w.parse::<u32>().ok().map(|n| json!({"count": n})),
            }
            .ok_or_else(|| {
                usage(anyhow::anyhow!(
                    "wave {w:?} is not a count or a percent (N%)"
                ))
            })
        })
        .collect()
}

fn rollout_line(r: &Value) -> String {
    let phase = &r["phase"];
    let what = match phase["phase"].as_str().unwrap_or("?") {
        "running" => format!("running wave {}", phase["wave"]),
        "paused" => format!(
            "paused in wave {}: {}",
            phase["wave"],
            phase["reason"].as_str().unwrap_or("")
        ),
        "awaiting_approval" => format!("waiting for approval of wave {}", phase["next"]),
        "aborted" => format!("aborted: {}", phase["reason"].as_str().unwrap_or("")),
        other => other.to_string(),
    };
    let waves: Vec<String> = r["wave_counts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let done = w["confirmed"].as_u64().unwrap_or(0);
            let size = w["size"].as_u64().unwrap_or(0);
            format!("{done}/{size}")
        })
        .collect();
    format!(
        "{} {} v{}: {what}; confirmed per wave [{}]; {}",
        r["id"].as_str().unwrap_or("?"),
        r["model"].as_str().unwrap_or("?"),
        r["version"],
        waves.join(", "),
        r["counts"]
    )
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Write a Mosquitto password file and ACL file (devices publish and
    /// subscribe only under their own id) to DIR.
    Mosquitto {
        #[arg(long)]
        out: PathBuf,
        /// The fleet server's user on the broker.
        #[arg(long, default_value = "edgefleet-server")]
        server_user: String,
        /// Its password (the server's --broker-password), hashed into
        /// the password file.
        #[arg(long, env = "EDGEFLEET_BROKER_PASSWORD", hide_env_values = true)]
        server_password: String,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create a token; it is printed once and never shown again.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        scope: fleet_server::auth::Scope,
    },
    /// List tokens (ids, names, scopes; never secrets).
    List,
    /// Revoke a token by id; calls with it are refused at once.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create the offline root key(s), the online signing key and the
    /// signed root document.
    Init {
        #[arg(long, default_value = "fleet-data/keys")]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        root_keys: u32,
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
    },
    /// Write the next root document with a new online key (and, with
    /// --new-root-keys, new root keys). Needs a threshold of the current
    /// root key files in DIR. Restart the server afterwards: it publishes
    /// the chain and re-signs every device's desired state.
    Rotate {
        #[command(flatten)]
        root: NextRoot,
    },
    /// Write the next root document without KEYID (a compromised online or
    /// root key). Revoking the server's own online key gives it a new one.
    /// Restart the server afterwards.
    Revoke {
        keyid: String,
        #[command(flatten)]
        root: NextRoot,
    },
}

/// Where the keys are and what else the next root document changes.
#[derive(clap::Args)]
struct NextRoot {
    #[arg(long, default_value = "fleet-data/keys")]
    dir: PathBuf,
    /// Replace the root keys with this many new ones.
    #[arg(long)]
    new_root_keys: Option<u32>,
    /// How many of the new root keys must sign (with --new-root-keys).
    #[arg(long, default_value_t = 1)]
    threshold: u32,
    #[arg(long, default_value_t = 365)]
    expires_days: u64,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Upload a model file as NAME version VERSION.
    Push {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: u64,
        /// onnx or tflite; taken from the file extension by default.
        #[arg(long)]
        format: Option<String>,
        /// Free text kept with the version (what changed, for whom).
        #[arg(long)]
        notes: Option<String>,
        /// A test vector (JSON: {"inputs": [...], "expected": [...],
        /// "tolerance": T}, tensors as {name, datatype, shape, data}) that
        /// devices run before serving this version.
        #[arg(long)]
        test_vector: Option<PathBuf>,
        /// The model's interface (JSON: {"inputs": [{name, datatype,
        /// shape}], "outputs": [...]}, -1 for a dynamic dimension): devices
        /// check the model against it and use fixed dimensions as shape
        /// hints.
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// List model versions.
    List,
    /// Delete a model version no deployment points at.
    Delete {
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: u64,
    },
}

/// A failure with its exit code.
struct Failure(u8, anyhow::Error);

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure(2, e.into())
}

fn classify(e: reqwest::Error) -> Failure {
    if e.is_connect() || e.is_timeout() {
        Failure(3, anyhow::anyhow!("cannot reach the fleet server: {e}"))
    } else {
        Failure(1, e.into())
    }
}

async fn check(resp: reqwest::Response) -> Result<Value, Failure> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        Ok(body)
    } else {
        let msg = body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string());
        // 4: not allowed (no, a bad or a revoked token; too small a scope).
        let code = match status.as_u16() {
            401 | 403 => 4,
            _ => 1,
        };
        Err(Failure(
            code,
            anyhow::anyhow!("server answered {status}: {msg}"),
        ))
    }
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        println!("{}", line(row));
    }
}

fn ago(ts: u64) -> String {
    let now = edgefleet_shared::unix_now();
    let d = now.saturating_sub(ts);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

async fn push(
    cli: &Cli,
    client: &reqwest::Client,
    file: &PathBuf,
    name: &str,
    version: u64,
    format: Option<&str>,
    notes: Option<&str>,
) -> Result<Value, Failure> {
    let format = match format {
        Some(f) => f.to_string(),
        None => edgefleet_shared::ModelFormat::from_path(file)
            .map(|f| f.to_string())
            .ok_or_else(|| {
                usage(anyhow::anyhow!(
                    "cannot tell the format of {} from its extension; pass --format",
                    file.display()
                ))
            })?,
    };
    let handle = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))
        .map_err(usage)?;
    let size = handle
        .metadata()
        .await
        .map_err(|e| usage(anyhow::Error::from(e)))?
        .len();
    let bar = if cli.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("pushing {name} v{version}"));
    let progress = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(handle).map(move |chunk| {
        if let Ok(c) = &chunk {
            progress.inc(c.len() as u64);
        }
        chunk
    });
    let mut url = format!(
        "{}/api/v1/models/{name}/versions/{version}?format={format}",
        cli.server
    );
    if let Some(notes) = notes {
        url += "&notes=";
        url.extend(form_urlencoded::byte_serialize(notes.as_bytes()));
    }
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .map_err(classify)?;
    bar.finish_and_clear();
    check(resp).await
}

/// GETs a list from the API. With `--json` it prints the body and returns
/// `None`; otherwise it returns the parsed rows for a table.
async fn get_rows<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: String,
    json: bool,
) -> Result<Option<Vec<T>>, Failure> {
    let body = check(client.get(url).send().await.map_err(classify)?).await?;
    if json {
        println!("{body}");
        return Ok(None);
    }
    serde_json::from_value(body)
        .map(Some)
        .map_err(|e| Failure(1, anyhow::anyhow!("unexpected answer from the server: {e}")))
}

/// An HTTP client that sends the operator token with every call.
fn api_client(cli: &Cli) -> Result<reqwest::Client, Failure> {
    let token = match &cli.token {
        Some(t) => Some(t.trim().to_string()),
        None => std::fs::read_to_string(&cli.token_file)
            .ok()
            .map(|t| t.trim().to_string()),
    };
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| {
                usage(anyhow::anyhow!(
                    "the operator token has characters a header cannot carry"
                ))
            })?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(path) = &cli.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(usage)?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))
            .map_err(usage)?;
        builder = builder.add_root_certificate(ca);
    }
    builder.build().map_err(|e| Failure(1, e.into()))
}

/// Sends an API call; prints its answer with `--json`, else `say(answer)`;
/// returns the answer.
async fn call(
    request: reqwest::RequestBuilder,
    json: bool,
    say: impl FnOnce(&Value) -> String,
) -> Result<Value, Failure> {
    let answer = check(request.send().await.map_err(classify)?).await?;
    if json {
        println!("{answer}");
    } else {
        println!("{}", say(&answer));
    }
    Ok(answer)
}

/// A page of stored records: the whole answer with `--json`, else one
/// record per line.
fn print_records(page: &Value, field: &str, json: bool) {
    if json {
        println!("{page}");
        return;
    }
    for record in page[field].as_array().into_iter().flatten() {
        println!("{record}");
    }
}

/// KEY=VALUE arguments as a map.
fn parse_tags(tags: &[String]) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    tags.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| usage(anyhow::anyhow!("tag {t:?} must be KEY=VALUE")))
        })
        .collect()
}

/// Writes `text` readable by its owner only (mode 0600 whatever was
/// there, never through a symlink).
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    edgefleet_shared::secret_file::write(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A board profile: agent settings without the device's own (its id,
/// credentials and root document come from enrollment).
fn read_profile(path: &std::path::Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read profile {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("profile {} is not valid TOML", path.display()))?;
    for key in ["device_id", "root_document", "mqtt"] {
        if table.contains_key(key) {
            anyhow::bail!(
                "profile {} sets {key:?}, which enrollment writes; remove it",
                path.display()
            );
        }
    }
    Ok(table)
}

/// A board reached with the system's `ssh` and `scp` (its keys, agent and
/// config apply), never prompting.
struct Ssh {
    target: fleet_server::flash::SshTarget,
}

impl Ssh {
    fn output(&self, program: &str, args: Vec<String>, what: &str) -> Result<String, Failure> {
        let out = std::process::Command::new(program)
            .args(&args)
            .output()
            .map_err(|e| Failure(3, anyhow::anyhow!("cannot run {program}: {e}")))?;
        if !out.status.success() {
            let code = if out.status.code() == Some(255) { 3 } else { 1 };
            return Err(Failure(
                code,
                anyhow::anyhow!(
                    "{what} on {} failed ({}): {}",
                    self.target.host(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs a shell command on the board; its standard output, trimmed.
    fn run(&self, command: &str) -> Result<String, Failure> {
        let args = self.target.ssh_args(command);
        let what = command
            .split_whitespace()
            .next()
            .unwrap_or(command)
            .to_string();
        self.output("ssh", args, &what)
    }

    /// Copies local files to a path on the board.
    fn copy(&self, files: &[&std::path::Path], to: &str) -> Result<(), Failure> {
        let args = self.target.scp_args(files, to);
        self.output("scp", args, "copying").map(|_| ())
    }
}

/// A device bundle: the agent's config with its MQTT credentials (mode
/// 0600) and the fleet's root document.
fn write_bundle(
    dir: &std::path::Path,
    enrolled: &Value,
    profile: Option<toml::Table>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mqtt = &enrolled["mqtt"];
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_default();
    let id = text(&enrolled["device"]["id"]);
    let mut config = profile.unwrap_or_default();
    config.insert("device_id".into(), id.clone().into());
    config
        .entry("data_dir")
        .or_insert_with(|| "/var/lib/edgefleet".into());
    config.insert("root_document".into(), "/etc/edgefleet/root.json".into());
    let api = config
        .entry("api")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(api) = api.as_table_mut() {
        api.entry("socket")
            .or_insert_with(|| "/run/edgefleet/agent.sock".into());
    }
    let mut broker = toml::Table::new();
    broker.insert("url".into(), text(&mqtt["url"]).into());
    broker.insert("topic_prefix".into(), text(&mqtt["topic_prefix"]).into());
    broker.insert("username".into(), text(&mqtt["username"]).into());
    broker.insert("password".into(), text(&mqtt["password"]).into());
    // Where the agent registers the key it makes at first start.
    broker.insert("server_url".into(), text(&enrolled["server_url"]).into());
    // The fleet's private CA, for an mqtts:// broker.
    if let Some(ca) = mqtt["ca_pem"].as_str() {
        broker.insert("ca_pem".into(), ca.into());
    }
    config.insert("mqtt".into(), toml::Value::Table(broker));
    let config = format!(
        "# edgefleet agent, device {id} ({hardware}); written by `fleetctl devices enroll`.\n\
         # Holds this device's MQTT password: keep it readable by the agent only.\n{}",
        toml::to_string(&config)?,
        hardware = text(&enrolled["device"]["hardware"]),
    );
    write_private(&dir.join("agent.toml"), &config)?;
    let root = serde_json::to_vec_pretty(&enrolled["root"])?;
    std::fs::write(dir.join("root.json"), root)
        .with_context(|| format!("cannot write {}", dir.join("root.json").display()))?;
    Ok(())
}

async fn run(cli: Cli) -> Result<(), Failure> {
    fleet_server::install_crypto_provider();
    let client = api_client(&cli)?;
    let base = cli.server.trim_end_matches('/').to_string();
    match &cli.command {
        Command::Keys {
            command:
                KeysCommand::Init {
                    dir,
                    root_keys,
                    threshold,
                    expires_days,
                },
        } => {
            let keys = fleet_server::keys::init_keys(dir, *root_keys, *threshold, *expires_days)
                .map_err(usage)?;
            if cli.json {
                println!(
                    "{}",
                    json!({"root_keys": keys.root_key_paths, "online_key": keys.online_key_path, "root": keys.root_path})
                );
            } else {
                for p in &keys.root_key_paths {
                    println!(
                        "root key     {}   <- move offline; needed only to rotate keys",
                        p.display()
                    );
                }
                println!(
                    "online key   {}   <- stays with the server (mode 0600)",
                    keys.online_key_path.display()
                );
                println!(
                    "root doc     {}   <- flash onto every device",
                    keys.root_path.display()
                );
            }
        }
        Command::Keys {
            command: command @ (KeysCommand::Rotate { .. } | KeysCommand::Revoke { .. }),
        } => {
            let (root, revoke) =
                match command {
                    KeysCommand::Rotate { root } => (root, None),
                    KeysCommand::Revoke { keyid, root } => (
                        root,
                        Some(keyid.parse::<edgefleet_shared::KeyId>().map_err(|e| {
                            usage(anyhow::anyhow!("{keyid:?} is not a key id: {e}"))
                        })?),
                    ),
                    KeysCommand::Init { .. } => unreachable!("matched above"),
                };
            let rotation = fleet_server::keys::Rotation {
                revoke,
                new_root_keys: root.new_root_keys.map(|n| (n, root.threshold)),
                expires_days: root.expires_days,
            };
            let dir = &root.dir;
            let r = fleet_server::keys::rotate(dir, &rotation).map_err(usage)?;
            if cli.json {
                println!(
                    "{}",
                    json!({"root_version": r.root.version, "online_key": r.online_key.as_str(), "new_root_keys": r.new_root_key_paths, "retired_online_key": r.retired_online_key})
                );
            } else {
                println!(
                    "root doc     version {} written to {}",
                    r.root.version,
                    dir.join("root.json").display()
                );
                println!("online key   {}", r.online_key);
                if let Some(p) = &r.retired_online_key {
                    println!(
                        "retired      {}   <- no longer trusted by devices that follow the chain",
                        p.display()
                    );
                }
                for p in &r.new_root_key_paths {
                    println!("root key     {}   <- move offline", p.display());
                }
                println!(
                    "restart the fleet server: it publishes the chain and re-signs desired state"
                );
            }
        }
        Command::Model {
            command:
                ModelCommand::Push {
                    file,
                    name,
                    version,
                    format,
                    notes,
                    test_vector,
                    spec,
                },
        } => {
            // Read the attachments first: a missing file fails before
            // uploading.
            let read = |path: &Option<PathBuf>| -> Result<Option<Vec<u8>>, Failure> {
                match path {
                    Some(path) => Ok(Some(
                        std::fs::read(path)
                            .with_context(|| format!("cannot read {}", path.display()))
                            .map_err(usage)?,
                    )),
                    None => Ok(None),
                }
            };
            let attachments = [
                ("test-vector", "test vector", read(test_vector)?),
                ("spec", "spec", read(spec)?),
            ];
            let mut record = push(
                &cli,
                &client,
                file,
                name,
                *version,
                format.as_deref(),
                notes.as_deref(),
            )
            .await?;
            for (path, what, body) in attachments {
                let Some(body) = body else { continue };
                let url = format!(
                    "{}/api/v1/models/{name}/versions/{version}/{path}",
                    cli.server
                );
                let resp = client
                    .put(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(classify)?;
                record = check(resp).await.map_err(|Failure(code, e)| {
                    Failure(
                        code,
                        e.context(format!(
                            "{name} v{version} was pushed but its {what} was refused"
                        )),
                    )
                })?;
            }
            if cli.json {
                println!("{record}");
            } else {
                let m: ModelRecord =
                    serde_json::from_value(record).map_err(|e| Failure(1, e.into()))?;
                println!(
                    "pushed {} v{} ({} bytes, {}, sha256 {})",
                    m.name,
                    m.version,
                    m.size,
                    m.format,
                    &m.sha256[..16]
                );
            }
        }
        Command::Model {
            command: ModelCommand::Delete { name, version },
        } => {
            let request = client.delete(format!("{base}/api/v1/models/{name}/versions/{version}"));
            call(request, cli.json, |_| format!("deleted {name} v{version}")).await?;
        }
        Command::Model {
            command: ModelCommand::List,
        } => {
            let rows =
                get_rows::<ModelRecord>(&client, format!("{base}/api/v1/models"), cli.json).await?;
            if let Some(models) = rows {
                print_table(
                    &[
                        "NAME", "VERSION", "FORMAT", "SIZE", "SHA256", "PUSHED", "BY", "NOTES",
                    ],
                    models
                        .into_iter()
                        .map(|m| {
                            vec![
                                m.name,
                                m.version.to_string(),
                                m.format.to_string(),
                                m.size.to_string(),
                                m.sha256[..16].to_string(),
                                ago(m.created_at),
                                m.pushed_by.unwrap_or_else(|| "-".into()),
                                m.notes.unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Deploy {
            model,
            version,
            devices,
            all,
            tags,
        } => {
            let tags = parse_tags(tags)?;
            let body = json!({"model": model, "version": version, "devices": devices, "all": all, "tags": tags});
            let request = client
                .post(format!("{base}/api/v1/deployments"))
                .json(&body);
            call(request, cli.json, |result| {
                let n = result["published"].as_array().map_or(0, Vec::len);
                format!(
                    "{model} v{version} deployed; signed desired state published to {n} device(s)"
                )
            })
            .await?;
        }
        Command::Devices { command } => match command.as_ref().unwrap_or(&DevicesCommand::List {
            tags: Vec::new(),
            hardware: None,
            online: false,
            offline: false,
            after: None,
            limit: 1000,
        }) {
            DevicesCommand::List {
                tags,
                hardware,
                online,
                offline,
                after,
                limit,
            } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                for tag in tags {
                    query.append_pair("tag", tag);
                }
                if let Some(h) = hardware {
                    query.append_pair("hardware", h);
                }
                if *online || *offline {
                    query.append_pair("online", if *online { "true" } else { "false" });
                }
                if let Some(a) = after {
                    query.append_pair("after", a);
                }
                query.append_pair("limit", &limit.to_string());
                let url = format!("{base}/api/v1/devices?{}", query.finish());
                let rows = get_rows::<DeviceRecord>(&client, url, cli.json).await?;
                if let Some(devices) = rows {
                    print_table(
                        &[
                            "DEVICE",
                            "STATE",
                            "HARDWARE",
                            "TAGS",
                            "MODELS",
                            "DESIRED",
                            "LAST SEEN",
                        ],
                        devices
                            .into_iter()
                            .map(|d| {
                                let models = d
                                    .models
                                    .iter()
                                    .map(|m| format!("{} v{}", m.name, m.version))
                                    .collect::<Vec<_>>()
                                    .join(", ");
                                let desired = format!(
                                    "{}/{}",
                                    d.reported_desired_version
                                        .map_or("-".into(), |v| v.to_string()),
                                    d.desired_version
                                );
                                let tags = d
                                    .tags
                                    .iter()
                                    .map(|(k, v)| format!("{k}={v}"))
                                    .collect::<Vec<_>>()
                                    .join(",");
                                let state = match (d.revoked_at, d.online) {
                                    (Some(_), _) => "revoked",
                                    (None, true) => "online",
                                    (None, false) => "offline",
                                };
                                vec![
                                    d.id,
                                    state.into(),
                                    d.hardware.unwrap_or_else(|| "-".into()),
                                    if tags.is_empty() { "-".into() } else { tags },
                                    if models.is_empty() {
                                        "-".into()
                                    } else {
                                        models
                                    },
                                    desired,
                                    ago(d.last_seen),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            DevicesCommand::Enroll {
                id,
                hardware,
                tags,
                out,
                profile,
                public_key,
            } => {
                let tags = parse_tags(tags)?;
                // Read before enrolling: a bad profile enrolls nothing.
                let profile = match profile {
                    Some(path) => Some(read_profile(path).map_err(usage)?),
                    None => None,
                };
                if out.join("agent.toml").exists() {
                    return Err(usage(anyhow::anyhow!(
                        "{} already holds a bundle; choose another --out",
                        out.display()
                    )));
                }
                let resp = client
                    .post(format!("{base}/api/v1/devices"))
                    .json(&json!({"id": id, "hardware": hardware, "tags": tags, "public_key": public_key}))
                    .send()
                    .await
                    .map_err(classify)?;
                let enrolled = check(resp).await?;
                write_bundle(out, &enrolled, profile).map_err(usage)?;
                if cli.json {
                    let mut summary = enrolled.clone();
                    summary["mqtt"]["password"] = "(in the bundle)".into();
                    summary["bundle"] = out.display().to_string().into();
                    println!("{summary}");
                } else {
                    println!(
                        "enrolled {id} ({hardware}); bundle in {}: copy agent.toml and root.json to /etc/edgefleet/ on the device",
                        out.display()
                    );
                }
            }
            DevicesCommand::Tag { id, tags } => {
                let request = client
                    .put(format!("{base}/api/v1/devices/{id}/tags"))
                    .json(&parse_tags(tags)?);
                call(request, cli.json, |d| format!("{id}: tags {}", d["tags"])).await?;
            }
            DevicesCommand::Show { id } => {
                let resp = client
                    .get(format!("{base}/api/v1/devices/{id}"))
                    .send()
                    .await
                    .map_err(classify)?;
                let d = check(resp).await?;
                if cli.json {
                    println!("{d}");
                } else {
                    let text = |v: &Value| match v {
                        Value::Null => "-".to_string(),
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let models: Vec<String> = d["models"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|m| {
                            format!(
                                "{} v{} ({})",
                                text(&m["name"]),
                                m["version"],
                                text(&m["runtime"])
                            )
                        })
                        .collect();
                    for (label, value) in [
                        ("device", text(&d["id"])),
                        (
                            "state",
                            if d["revoked_at"].is_u64() {
                                "revoked".into()
                            } else if d["online"] == true {
                                "online".into()
                            } else {
                                "offline".into()
                            },
                        ),
                        ("hardware", text(&d["hardware"])),
                        ("tags", text(&d["tags"])),
                        ("key", text(&d["public_key"])),
                        (
                            "refused",
                            match d["rejected_messages"]["count"].as_u64() {
                                Some(n) => format!(
                                    "{n} message(s); last: {}",
                                    text(&d["rejected_messages"]["last_reason"])
                                ),
                                None => "-".into(),
                            },
                        ),
                        ("agent", text(&d["agent_version"])),
                        (
                            "models",
                            if models.is_empty() {
                                "-".into()
                            } else {
                                models.join(", ")
                            },
                        ),
                        (
                            "desired",
                            format!(
                                "{} (reported {})",
                                d["desired_version"],
                                text(&d["reported_desired_version"])
                            ),
                        ),
                        ("last seen", d["last_seen"].as_u64().map_or("-".into(), ago)),
                    ] {
                        println!("{label:<10} {value}");
                    }
                }
            }
            DevicesCommand::Telemetry {
                id,
                after_seq,
                limit,
            } => {
                let mut url = format!("{base}/api/v1/devices/{id}/telemetry?limit={limit}");
                if let Some(a) = after_seq {
                    url += &format!("&after_seq={a}");
                }
                let page = check(client.get(url).send().await.map_err(classify)?).await?;
                print_records(&page, "telemetry", cli.json);
            }
            DevicesCommand::Results {
                id,
                model,
                after_seq,
                limit,
            } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("limit", &limit.to_string());
                if let Some(a) = after_seq {
                    query.append_pair("after_seq", &a.to_string());
                }
                if let Some(m) = model {
                    query.append_pair("model", m);
                }
                let url = format!("{base}/api/v1/devices/{id}/results?{}", query.finish());
                let page = check(client.get(url).send().await.map_err(classify)?).await?;
                print_records(&page, "results", cli.json);
            }
            DevicesCommand::Flash {
                id,
                host,
                to,
                bundle,
                package,
                arch,
                dist,
                port,
                ssh_options,
                wait_secs,
            } => {
                let dir = bundle
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("bundles").join(id));
                let bundle = fleet_server::flash::bundle(&dir, id).map_err(usage)?;
                if let Some(root) = to {
                    let package = match (package, arch) {
                        (Some(p), _) => p.clone(),
                        (None, Some(arch)) => {
                            fleet_server::flash::find_package(dist, arch).map_err(usage)?
                        }
                        (None, None) => {
                            return Err(usage(anyhow::anyhow!(
                                "--to needs --package or --arch (arm64, armhf, amd64)"
                            )))
                        }
                    };
                    let written = fleet_server::flash::write_first_boot(root, &package, &bundle)
                        .map_err(|e| Failure(1, e))?;
                    if cli.json {
                        println!("{}", json!({"device": id, "staged": written}));
                    } else {
                        println!(
                            "{id}: {} and its bundle staged under {}; the board installs them on its next boot ({})",
                            package.display(),
                            root.display(),
                            fleet_server::flash::FIRST_BOOT_UNIT
                        );
                    }
                    return Ok(());
                }
                let host = host.as_deref().expect("clap requires --host without --to");
                let ssh = Ssh {
                    target: fleet_server::flash::SshTarget::new(host, *port, ssh_options)
                        .map_err(usage)?,
                };
                let began = edgefleet_shared::unix_now();
                let remote_arch = ssh.run("dpkg --print-architecture")?;
                let package = match package {
                    Some(p) => p.clone(),
                    None => fleet_server::flash::find_package(dist, &remote_arch).map_err(usage)?,
                };
                if let Some(a) = fleet_server::flash::package_arch(&package) {
                    if a != remote_arch {
                        return Err(usage(anyhow::anyhow!(
                            "{} is for {a}, but {host} is {remote_arch}",
                            package.display()
                        )));
                    }
                }
                let staged = ssh.run("mktemp -d /tmp/edgefleet-flash.XXXXXX")?;
                ssh.run(&format!(
                    "mkdir {}/bundle",
                    fleet_server::flash::sh_quote(&staged)
                ))?;
                eprintln!(
                    "{id}: copying {} and the bundle to {host}:{staged}",
                    package.display()
                );
                ssh.copy(
                    &[package.as_path()],
                    &format!("{staged}/edgefleet-agent.deb"),
                )?;
                ssh.copy(
                    &[bundle.agent_toml.as_path(), bundle.root_json.as_path()],
                    &format!("{staged}/bundle/"),
                )?;
                let script =
                    fleet_server::flash::sh_quote(&fleet_server::flash::install_script(&staged));
                eprintln!("{id}: installing and starting the agent");
                ssh.run(&format!(
                    "if [ \"$(id -u)\" = 0 ]; then sh -c {script}; else sudo -n sh -c {script}; fi"
                ))?;
                if *wait_secs == 0 {
                    println!("{id}: installed on {host}");
                    return Ok(());
                }
                // The install restarted the agent: what the server hears
                // from now on comes from the new one.
                let started = edgefleet_shared::unix_now();
                let deadline =
                    std::time::Instant::now() + std::time::Duration::from_secs(*wait_secs);
                loop {
                    let resp = client
                        .get(format!("{base}/api/v1/devices/{id}"))
                        .send()
                        .await
                        .map_err(classify)?;
                    let d = check(resp).await?;
                    if d["online"] == true && d["last_seen"].as_u64().unwrap_or(0) >= started {
                        if cli.json {
                            println!("{d}");
                        } else {
                            println!(
                                "{id}: installed on {host} and reporting in (agent {}, {}s)",
                                d["agent_version"].as_str().unwrap_or("?"),
                                edgefleet_shared::unix_now() - began
                            );
                        }
                        return Ok(());
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(Failure(
                            1,
                            anyhow::anyhow!(
                                "{id} was installed on {host} but did not report in within {wait_secs} s; on the board: journalctl -u edgefleet-agent"
                            ),
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
            DevicesCommand::Revoke { id } => {
                let request = client.post(format!("{base}/api/v1/devices/{id}/revoke"));
                call(request, cli.json, |_| format!("revoked {id}")).await?;
            }
            DevicesCommand::SetKey { id, public_key } => {
                let request = client
                    .put(format!("{base}/api/v1/devices/{id}/key"))
                    .json(&json!({"public_key": public_key}));
                call(request, cli.json, |_| {
                    format!("{id} now signs with key {public_key}")
                })
                .await?;
            }
        },
        Command::Broker {
            command:
                BrokerCommand::Mosquitto {
                    out,
                    server_user,
                    server_password,
                },
        } => {
            let url = format!(
                "{base}/api/v1/broker/mosquitto?server_user={}",
                form_urlencoded::byte_serialize(server_user.as_bytes()).collect::<String>()
            );
            let files = check(client.get(url).send().await.map_err(classify)?).await?;
            std::fs::create_dir_all(out)
                .with_context(|| format!("cannot create {}", out.display()))
                .map_err(usage)?;
            let passwords = format!(
                "{server_user}:{}\n{}",
                fleet_server::auth::mosquitto_hash(server_password),
                files["password_file"].as_str().unwrap_or_default()
            );
            write_private(&out.join("passwords"), &passwords).map_err(usage)?;
            std::fs::write(
                out.join("acl"),
                files["acl_file"].as_str().unwrap_or_default(),
            )
            .with_context(|| format!("cannot write {}", out.join("acl").display()))
            .map_err(usage)?;
            println!(
                "wrote {0}/passwords and {0}/acl; in mosquitto.conf: allow_anonymous false, password_file {0}/passwords, acl_file {0}/acl (then reload Mosquitto)",
                out.display()
            );
        }
        Command::Events { device, limit } => {
            let url = format!("{base}/api/v1/devices/{device}/events?limit={limit}");
            if let Some(events) = get_rows::<EventRecord>(&client, url, cli.json).await? {
                print_table(
                    &["WHEN", "EVENT", "DESIRED", "MODEL", "REASON"],
                    events
                        .into_iter()
                        .map(|e| {
                            vec![
                                ago(e.at),
                                e.kind,
                                e.desired_version.map_or("-".into(), |v| v.to_string()),
                                match (e.model, e.model_version) {
                                    (Some(m), Some(v)) => format!("{m} v{v}"),
                                    _ => "-".into(),
                                },
                                e.reason.unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Tokens { command } => match command {
            TokensCommand::Create { name, scope } => {
                let request = client
                    .post(format!("{base}/api/v1/tokens"))
                    .json(&serde_json::json!({"name": name, "scope": scope}));
                call(request, cli.json, |made| {
                    format!(
                        "created token {} ({}, scope {}); it is shown only now:\n{}",
                        made["id"].as_str().unwrap_or("?"),
                        made["name"].as_str().unwrap_or("?"),
                        made["scope"].as_str().unwrap_or("?"),
                        made["token"].as_str().unwrap_or("?")
                    )
                })
                .await?;
            }
            TokensCommand::List => {
                let url = format!("{base}/api/v1/tokens");
                if let Some(tokens) =
                    get_rows::<fleet_server::auth::TokenRecord>(&client, url, cli.json).await?
                {
                    print_table(
                        &["ID", "NAME", "SCOPE", "CREATED", "STATE"],
                        tokens
                            .into_iter()
                            .map(|t| {
                                vec![
                                    t.id,
                                    t.name,
                                    t.scope.as_str().into(),
                                    ago(t.created_at),
                                    t.revoked_at.map_or("active".into(), |at| {
                                        format!("revoked {}", ago(at))
                                    }),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            TokensCommand::Revoke { id } => {
                let request = client.delete(format!("{base}/api/v1/tokens/{id}"));
                call(request, cli.json, |_| format!("revoked token {id}")).await?;
            }
        },
        Command::Rollout { command } => match command {
            RolloutCommand::Create {
                id,
                model,
                version,
                devices,
                all,
                tags,
                waves,
                ramp,
                failure_pct,
                on_failure,
                success_pct,
                soak_secs,
                approve_each,
                max_in_flight,
                device_timeout_secs,
                retries,
                offline_grace_secs,
                max_error_pct,
                max_p95_ms,
                min_inferences,
                hardware,
                dry_run,
            } => {
                let waves = match waves {
                    Some(w) => parse_waves(w)?,
                    None => Vec::new(),
                };
                let ramp = match ramp {
                    None => Value::Null,
                    Some(r) => {
                        let (base, factor) = r
                            .split_once(',')
                            .and_then(|(b, f)| {
                                Some((b.trim().parse::<u32>().ok()?, f.trim().parse::<f64>().ok()?))
                            })
                            .ok_or_else(|| {
                                usage(anyhow::anyhow!("--ramp {r:?} must be BASE,FACTOR"))
                            })?;
                        json!([base, factor])
                    }
                };
                if on_failure != "pause" && on_failure != "abort" {
                    return Err(usage(anyhow::anyhow!(
                        "--on-failure must be pause or abort"
                    )));
                }
                let gates = json!({
                    "success_pct": success_pct, "failure_pct": failure_pct, "failure_action": on_failure,
                    "soak_secs": soak_secs, "manual_approval": approve_each, "max_in_flight": max_in_flight,
                    "device_timeout_secs": device_timeout_secs, "retries": retries,
                    "offline_grace_secs": offline_grace_secs, "max_error_pct": max_error_pct,
                    "max_p95_ms": max_p95_ms, "min_inferences": min_inferences,
                });
                let body = json!({
                    "id": id, "model": model, "version": version, "devices": devices, "all": all,
                    "tags": parse_tags(tags)?, "hardware": hardware, "waves": waves, "ramp": ramp,
                    "gates": gates, "dry_run": dry_run,
                });
                let request = client.post(format!("{base}/api/v1/rollouts")).json(&body);
                call(request, cli.json, rollout_line).await?;
            }
            RolloutCommand::Status { id, brief } => match id {
                Some(id) => {
                    // The table needs no per-device states.
                    let brief = *brief || !cli.json;
                    let request = client.get(format!("{base}/api/v1/rollouts/{id}?brief={brief}"));
                    call(request, cli.json, rollout_line).await?;
                }
                None => {
                    let request = client.get(format!("{base}/api/v1/rollouts"));
                    call(request, cli.json, |all| {
                        all.as_array()
                            .into_iter()
                            .flatten()
                            .map(rollout_line)
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .await?;
                }
            },
            RolloutCommand::Start { id }
            | RolloutCommand::Pause { id }
            | RolloutCommand::Resume { id }
            | RolloutCommand::Approve { id }
            | RolloutCommand::Abort { id } => {
                let action = match command {
                    RolloutCommand::Start { .. } => "start",
                    RolloutCommand::Pause { .. } => "pause",
                    RolloutCommand::Resume { .. } => "resume",
                    RolloutCommand::Approve { .. } => "approve",
                    _ => "abort",
                };
                let request = client.post(format!("{base}/api/v1/rollouts/{id}/{action}"));
                call(request, cli.json, rollout_line).await?;
            }
            RolloutCommand::Device { id, device, action } => {
                let request = client.post(format!(
                    "{base}/api/v1/rollouts/{id}/devices/{device}/{action}"
                ));
                call(request, cli.json, rollout_line).await?;
            }
        },
        Command::Audit { after, limit } => {
            let url = format!("{base}/api/v1/audit?after_id={after}&limit={limit}");
            if let Some(entries) =
                get_rows::<fleet_server::store::AuditRecord>(&client, url, cli.json).await?
            {
                print_table(
                    &["ID", "WHEN", "WHO", "ACTION", "TARGET"],
                    entries
                        .into_iter()
                        .map(|a| {
                            vec![
                                a.id.to_string(),
                                ago(a.entry.at),
                                a.entry.actor,
                                a.entry.action,
                                a.entry.target,
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("fleetctl: {e:#}");
            ExitCode::from(code)
        }
    }
}
