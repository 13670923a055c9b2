//! `fleet-server demo`: the whole product on one machine. It starts the
//! server (embedded broker, SQLite), spawns N real `edgefleet-agent`
//! processes, pushes the example digits model, deploys it to every device,
//! waits until all of them serve it, runs one inference through each
//! agent's Unix socket and prints a summary.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerConfig, ServerConfig};
use crate::store;

/// The example model and held-out samples, compiled in.
pub const EXAMPLE_MODEL: &[u8] = include_bytes!("../../models/digits/digits_int8.onnx");
const SAMPLES: &str = include_str!("../../models/digits/samples.json");

#[derive(Deserialize)]
struct Samples {
    inputs: Vec<Vec<f32>>,
    labels: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub exit_when_done: bool,
    pub data_dir: Option<PathBuf>,
    pub http: std::net::SocketAddr,
    pub agent_bin: Option<PathBuf>,
    pub timeout: Duration,
}

/// Finds the `edgefleet-agent` binary: an explicit path, then
/// `$EDGEFLEET_AGENT_BIN`, then beside this executable. Under `cargo run`
/// a missing agent is built with the same profile first.
pub fn find_agent_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("EDGEFLEET_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    let beside = dir.join("edgefleet-agent");
    if beside.exists() {
        return Ok(beside);
    }
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = dir.ends_with("release");
        eprintln!(
            "edgefleet-agent is not built yet; building it (cargo build -p edgefleet-agent{})...",
            if release { " --release" } else { "" }
        );
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", "edgefleet-agent"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .context("cannot run cargo to build the agent")?;
        if status.success() && beside.exists() {
            return Ok(beside);
        }
    }
    bail!(
        "cannot find the edgefleet-agent binary next to {}; build it with `cargo build --release -p edgefleet-agent` or pass --agent-bin",
        exe.display()
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Agent {
    id: String,
    socket: PathBuf,
    child: Child,
}

async fn spawn_agent(
    bin: &Path,
    dir: &Path,
    id: &str,
    mqtt_port: u16,
    root: &Path,
) -> anyhow::Result<Agent> {
    let agent_dir = dir.join("agents").join(id);
    std::fs::create_dir_all(&agent_dir)?;
    let socket = agent_dir.join("agent.sock");
    let config = format!(
        "device_id = \"{id}\"\ndata_dir = \"data\"\nroot_document = \"{root}\"\n\n[api]\nsocket = \"agent.sock\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\n",
        root = root.display()
    );
    let config_path = agent_dir.join("agent.toml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(agent_dir.join("agent.log"))?;
    let child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(Agent {
        id: id.to_string(),
        socket,
        child,
    })
}

/// Runs the demo. Returns an error (non-zero exit) if any step fails.
pub async fn run(options: DemoOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let agent_bin = find_agent_binary(options.agent_bin.as_deref())?;
    let started = Instant::now();
    let (_tmp, dir) = match &options.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            // Absolute: each agent runs in its own folder and reads the
            // root document by this path.
            let d = std::fs::canonicalize(d)
                .map_err(|e| anyhow::anyhow!("cannot resolve --data-dir {}: {e}", d.display()))?;
            (None, d)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("edgefleet-demo-")
                .tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let keys_dir = dir.join("keys");
    if !keys_dir.join("root.json").exists() {
        crate::keys::init_keys(&keys_dir, 1, 1, 365)?;
    }
    let mqtt_port = free_port()?;
    let http = match tokio::net::TcpListener::bind(options.http).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let config = ServerConfig {
        data_dir: dir.join("server"),
        keys_dir: Some(keys_dir.clone()),
        broker: BrokerConfig {
            embedded_listen: Some(format!("127.0.0.1:{mqtt_port}").parse()?),
            ..BrokerConfig::default()
        },
        ..ServerConfig::default()
    };
    let server_token = shutdown.child_token();
    let (running, server_done) = crate::start(config, http, server_token.clone()).await?;
    let api = format!("http://{}", running.http);
    println!(
        "fleet server   {api}  (MQTT 127.0.0.1:{mqtt_port}, data {})",
        dir.display()
    );

    let root = keys_dir.join("root.json");
    let mut agents = Vec::new();
    for i in 1..=options.devices {
        agents.push(
            spawn_agent(
                &agent_bin,
                &dir,
                &format!("demo-device-{i}"),
                mqtt_port,
                &root,
            )
            .await?,
        );
    }
    println!(
        "agents         {} started ({})",
        agents.len(),
        agent_bin.display()
    );

    crate::install_crypto_provider();
    // The demo operates as the admin whose token the server wrote on start.
    let token_file = dir.join("server").join("admin.token");
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("cannot read {}", token_file.display()))?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", token.trim()).parse()?,
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let push = client
        .post(format!("{api}/api/v1/models/digits/versions/1?format=onnx"))
        .body(EXAMPLE_MODEL)
        .send()
        .await?;
    if !push.status().is_success() {
        bail!(
            "model push failed: {} {}",
            push.status(),
            push.text().await.unwrap_or_default()
        );
    }
    let deploy = client
        .post(format!("{api}/api/v1/deployments"))
        .json(&json!({"model": "digits", "version": 1, "all": true}))
        .send()
        .await?;
    if !deploy.status().is_success() {
        bail!(
            "deploy failed: {} {}",
            deploy.status(),
            deploy.text().await.unwrap_or_default()
        );
    }
    println!(
        "model          digits v1 (int8, {} bytes) pushed and deployed to all devices",
        EXAMPLE_MODEL.len()
    );

    // Wait until every agent reports the model active.
    let deadline = Instant::now() + options.timeout;
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    loop {
        let fleet_devices = {
            let resp = client.get(format!("{api}/api/v1/devices")).send().await?;
            resp.json::<Vec<store::DeviceRecord>>().await?
        };
        let ready = ids
            .iter()
            .filter(|id| {
                fleet_devices.iter().any(|d| {
                    &d.id == *id
                        && d.online
                        && d.models
                            .iter()
                            .any(|m| m.name == "digits" && m.version == 1)
                })
            })
            .count();
        if ready == ids.len() {
            break;
        }
        for agent in &mut agents {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent {} exited with {status}; see {}",
                    agent.id,
                    dir.join("agents")
                        .join(&agent.id)
                        .join("agent.log")
                        .display()
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "only {ready} of {} devices activated digits v1 within {:?}",
                ids.len(),
                options.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "rollout        {} of {} devices serving digits v1 after {:.1} s",
        ids.len(),
        ids.len(),
        started.elapsed().as_secs_f64()
    );

    let samples: Samples = serde_json::from_str(SAMPLES)?;
    let mut failures = 0;
    println!(
        "\n  {:<16} {:>6} {:>9} {:>11}",
        "device", "label", "predicted", "latency ms"
    );
    for (i, agent) in agents.iter().enumerate() {
        let k = i % samples.inputs.len();
        let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": samples.inputs[k]}]});
        let t = Instant::now();
        let (status, reply) = crate::unix_http::request(
            &agent.socket,
            http::Method::POST,
            "/v2/models/digits/infer",
            Some(&body),
        )
        .await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let predicted = reply["outputs"][0]["data"].as_array().and_then(|p| {
            p.iter()
                .enumerate()
                .max_by(|a, b| {
                    a.1.as_f64()
                        .unwrap_or(0.0)
                        .total_cmp(&b.1.as_f64().unwrap_or(0.0))
                })
                .map(|(i, _)| i)
        });
        let ok = status.is_success() && predicted == Some(samples.labels[k]);
        if !ok {
            failures += 1;
        }
        println!(
            "  {:<16} {:>6} {:>9} {:>11.2} {}",
            agent.id,
            samples.labels[k],
            predicted.map_or("-".into(), |p| p.to_string()),
            ms,
            if ok { "ok" } else { "WRONG" }
        );
    }
    println!(
        "\nAPI            {api}/api/v1/devices  (admin token in {})",
        token_file.display()
    );
    println!("dashboard      {api}/ui/  (log in with that token)");
    println!("done in        {:.1} s", started.elapsed().as_secs_f64());
    let result = if failures == 0 {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "{failures} device(s) gave a wrong or failed inference"
        ))
    };
    if !options.exit_when_done && result.is_ok() {
        println!("\nRunning; press Ctrl-C to stop.");
        shutdown.cancelled().await;
    }
    for agent in &mut agents {
        if let Some(pid) = agent.child.id() {
            // Ask nicely (SIGTERM) so agents say goodbye; kill if they hang.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
    for agent in &mut agents {
        if tokio::time::timeout(Duration::from_secs(5), agent.child.wait())
            .await
            .is_err()
        {
            let _ = agent.child.kill().await;
        }
    }
    server_token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server_done).await;
    result
}
