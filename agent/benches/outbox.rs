//! Offline-first benchmark: outbox append and drain throughput, the cost of
//! health sampling, and the agent's idle footprint with it on. Each figure
//! is printed with its baseline from the same run.
//!
//! Run: `scripts/bench-outbox`, or `cargo bench -p edgefleet-agent --bench
//! outbox` with `EDGEFLEET_TEST_MQTT_URL` (a Mosquitto; default
//! `mqtt://127.0.0.1:1883`) and, for the rows that need them,
//! `EDGEFLEET_BIN_DIR` holding `fleet-server` and `fleetctl` builds.

#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap ends the run

mod common;
use common::{anon_kib, rss_kib, Killed};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgefleet_agent::config::MqttConfig;
use edgefleet_agent::outbox::{
    DeleteOn, NewRecord, Outbox, OutboxHandle, Sequence, Stream, StreamPolicy,
};
use edgefleet_agent::registry::ModelRegistry;
use edgefleet_agent::telemetry::Sampler;
use edgefleet_agent::uplink::{LinkState, Uplink};
use edgefleet_shared::{DeviceId, TopicPrefix};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const PAYLOAD: usize = 300;

fn keep_all() -> [StreamPolicy; 4] {
    [StreamPolicy::keep_all(); 4]
}

fn records(first: u64, n: usize) -> Vec<NewRecord> {
    (0..n)
        .map(|i| NewRecord {
            stream: if i % 10 == 0 {
                Stream::Results
            } else {
                Stream::Telemetry
            },
            seq: first + i as u64,
            payload: vec![b'x'; PAYLOAD],
        })
        .collect()
}

/// Records per second appended in transactions of `batch`.
fn append_rate(dir: &Path, total: usize, batch: usize) -> f64 {
    let mut outbox = Outbox::open(&dir.join(format!("append-{batch}.db")), keep_all(), 1 << 34)
        .expect("open outbox");
    let started = Instant::now();
    let mut seq = 1;
    while (seq as usize) <= total {
        outbox.append(&records(seq, batch), 0).expect("append");
        seq += batch as u64;
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Records per second drained from a prefilled outbox to the broker, until
/// the outbox is empty.
/// Records per publish in the batched drain rows (the agent's default).
const BATCH: usize = 32;

async fn drain_rate(
    dir: &Path,
    name: &str,
    total: usize,
    mqtt: MqttConfig,
    prefix: TopicPrefix,
    device: &str,
) -> f64 {
    let outbox = OutboxHandle::open(
        &dir.join(format!("{name}.db")),
        keep_all(),
        1 << 34,
        10_000,
        Sequence::persistent(&dir.join(format!("{name}.seq"))).unwrap(),
    )
    .unwrap();
    let device_id = DeviceId::new(device).unwrap();
    for i in 0..total {
        // Real telemetry messages: the fleet server parses and stores them.
        outbox.push(Stream::Telemetry, |seq| {
            let msg = edgefleet_shared::TelemetryMessage {
                schema: edgefleet_shared::SCHEMA_VERSION,
                device_id: device_id.clone(),
                seq,
                at: edgefleet_shared::unix_now(),
                interval_secs: 60.0,
                health: Default::default(),
                models: Vec::new(),
                outbox: Default::default(),
                link: Default::default(),
            };
            serde_json::to_vec(&msg).unwrap()
        });
        if i % 1000 == 999 {
            outbox.flush().unwrap();
        }
    }
    outbox.flush().unwrap();
    assert_eq!(outbox.health().depth, total as u64);
    let shutdown = CancellationToken::new();
    let (desired_tx, _desired_rx) = mpsc::channel(4);
    let (_status_tx, status_rx) = watch::channel(None);
    let (link_tx, _link_rx) = watch::channel(LinkState::default());
    let uplink = Uplink {
        device: DeviceId::new(device).unwrap(),
        prefix,
        config: mqtt,
        // Every publish is signed, as in the field.
        key: edgefleet_shared::SecretKey::from_seed([7; 32]),
        server_keys: Default::default(),
        health: Default::default(),
        key_registered: Default::default(),
    };
    let started = Instant::now();
    let task = tokio::spawn(uplink.run(
        desired_tx,
        outbox.clone(),
        status_rx,
        link_tx,
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let h = outbox.clone();
        let depth = tokio::task::spawn_blocking(move || h.health().depth)
            .await
            .unwrap();
        if depth == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "drain stalled at {depth}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = task.await;
    rate
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // utime and stime: fields 14 and 15, after the parenthesised name.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// RSS and its anonymous part (MiB), and CPU use (% of one core) of an
/// agent process over `window` after it settled (the agent pages out its
/// start-up code 5 s after starting).
fn footprint(child: &Child, window: Duration) -> (f64, f64, f64) {
    std::thread::sleep(Duration::from_secs(6));
    let pid = child.id();
    let t0 = cpu_ticks(pid);
    std::thread::sleep(window);
    let ticks = cpu_ticks(pid) - t0;
    // Linux USER_HZ is 100 on every platform this runs on.
    let cpu = ticks as f64 / 100.0 / window.as_secs_f64() * 100.0;
    (
        rss_kib(pid) as f64 / 1024.0,
        anon_kib(pid) as f64 / 1024.0,
        cpu,
    )
}

fn digits() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/digits/digits_int8.onnx")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(filter) = std::env::var("EDGEFLEET_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    println!(
        "edgefleet outbox and telemetry benchmark (WAL, synchronous=FULL; appends: {PAYLOAD}-byte records; drains: real telemetry messages)"
    );
    println!("{:<58} {:>14} {:>12}", "what", "figure", "vs baseline");

    // Append: group commit against one transaction per record.
    let single = append_rate(dir, 300, 1);
    let batched = append_rate(dir, 200_000, 256);
    println!(
        "{:<58} {:>14} {:>12}",
        "append, 1 record per transaction (baseline)",
        format!("{single:.0} rec/s"),
        ""
    );
    println!(
        "{:<58} {:>14} {:>12}",
        "append, 256 records per transaction (the writer's batches)",
        format!("{batched:.0} rec/s"),
        format!("{:.0}x", batched / single)
    );

    // Drain to Mosquitto.
    let url =
        std::env::var("EDGEFLEET_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let (host, port) = edgefleet_shared::broker_url::parse(&url).unwrap();
    if std::net::TcpStream::connect((host.as_str(), port)).is_err() {
        println!("(no broker at {url}: drain rows skipped)");
        return;
    }
    let mqtt = |delete_on, batch_records| MqttConfig {
        url: url.clone(),
        topic_prefix: String::new(),
        username: None,
        password: None,
        keep_alive_secs: 30,
        delete_on,
        batch_records,
        clean_session: true,
        server_url: None,
        ca_file: None,
        ca_pem: None,
    };
    let run_id = std::process::id();
    let prefix = TopicPrefix::new(format!("edgefleet-bench-{run_id}/v1")).unwrap();
    let n = 50_000;
    // Baseline: one record per publish.
    let single = drain_rate(
        dir,
        "drain-puback-1",
        n,
        mqtt(DeleteOn::Puback, 1),
        prefix.clone(),
        &format!("bench-{run_id}-a"),
    )
    .await;
    println!(
        "{:<58} {:>14} {:>12}",
        format!("drain {n} to Mosquitto, delete on PUBACK, 1 per publish"),
        format!("{single:.0} rec/s"),
        ""
    );
    let puback = drain_rate(
        dir,
        "drain-puback",
        n,
        mqtt(DeleteOn::Puback, BATCH),
        prefix.clone(),
        &format!("bench-{run_id}-b"),
    )
    .await;
    println!(
        "{:<58} {:>14} {:>12}",
        format!("drain {n} to Mosquitto, delete on PUBACK, {BATCH} per publish"),
        format!("{puback:.0} rec/s"),
        format!("{:.1}x", puback / single)
    );

    // With receipts: a real fleet server on the same broker stores every
    // record and confirms it.
    let bin_dir = std::env::var_os("EDGEFLEET_BIN_DIR").map(PathBuf::from);
    let server = bin_dir
        .as_ref()
        .filter(|d| d.join("fleet-server").exists() && d.join("fleetctl").exists());
    let mut server_proc = None;
    match server {
        None => println!(
            "(EDGEFLEET_BIN_DIR with fleet-server and fleetctl not set: receipt row skipped)"
        ),
        Some(bins) => {
            let keys = dir.join("keys");
            let ok = Command::new(bins.join("fleetctl"))
                .args(["keys", "init", "--dir"])
                .arg(&keys)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "keys init");
            let http = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let proc = Killed(
                Command::new(bins.join("fleet-server"))
                    .arg("serve")
                    .arg("--data-dir")
                    .arg(dir.join("server"))
                    .arg("--keys-dir")
                    .arg(&keys)
                    .arg("--http")
                    .arg(http.to_string())
                    .arg("--broker")
                    .arg(&url)
                    .arg("--topic-prefix")
                    .arg(prefix.as_str())
                    .env("EDGEFLEET_LOG", "warn")
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            let ready = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(http).is_err() {
                assert!(Instant::now() < ready, "fleet server did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let receipt_single = drain_rate(
                dir,
                "drain-receipt-1",
                n,
                mqtt(DeleteOn::Receipt, 1),
                prefix.clone(),
                &format!("bench-{run_id}-c"),
            )
            .await;
            println!(
                "{:<58} {:>14} {:>12}",
                format!("drain {n} via fleet server, delete on receipt, 1/publish"),
                format!("{receipt_single:.0} rec/s"),
                ""
            );
            let receipt = drain_rate(
                dir,
                "drain-receipt",
                n,
                mqtt(DeleteOn::Receipt, BATCH),
                prefix.clone(),
                &format!("bench-{run_id}-d"),
            )
            .await;
            println!(
                "{:<58} {:>14} {:>12}",
                format!("drain {n} via fleet server, delete on receipt, {BATCH}/publish"),
                format!("{receipt:.0} rec/s"),
                format!("{:.1}x", receipt / receipt_single)
            );
            server_proc = Some(proc);
        }
    }
    drop(server_proc);

    // Health sampling: its own cost.
    let mut sampler = Sampler::new(dir);
    let registry = ModelRegistry::default();
    let device = DeviceId::new("bench").unwrap();
    let rounds = 200;
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    for _ in 0..rounds {
        let _ = sampler.sample(&device, &registry, Default::default());
    }
    let per_sample = started.elapsed() / rounds;
    println!(
        "{:<58} {:>14} {:>12}",
        "one health sample (sysinfo + stats)",
        format!("{:.0} us", per_sample.as_secs_f64() * 1e6),
        ""
    );
    println!(
        "{:<58} {:>14} {:>12}",
        "  = CPU share at the default 60 s interval / at 1 s",
        format!(
            "{:.4}% / {:.3}%",
            per_sample.as_secs_f64() / 60.0 * 100.0,
            per_sample.as_secs_f64() * 100.0
        ),
        ""
    );

    // The agent process: standalone (baseline) against fleet mode with
    // telemetry every second, idle, one small model loaded.
    // The shipped (release, LTO) build when scripts/bench-outbox made one;
    // else this profile's.
    let release = bin_dir
        .as_ref()
        .map(|d| d.join("edgefleet-agent"))
        .filter(|p| p.exists());
    let agent_bin = release
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgefleet-agent")));
    println!(
        "(agent process rows: {} build {})",
        if release.is_some() {
            "release"
        } else {
            "bench-profile"
        },
        agent_bin.display()
    );
    let standalone = Killed(
        Command::new(&agent_bin)
            .arg("serve")
            .arg("--model")
            .arg(format!("digits={}", digits().display()))
            .arg("--socket")
            .arg(dir.join("a.sock"))
            .arg("--data-dir")
            .arg(dir.join("standalone"))
            .env("EDGEFLEET_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (base_rss, base_anon, base_cpu) = footprint(&standalone.0, Duration::from_secs(10));
    drop(standalone);
    println!(
        "{:<58} {:>14} {:>12}",
        "idle agent, standalone, digits loaded (baseline)",
        format!("{base_rss:.1} MiB {base_cpu:.2}%"),
        format!("anon {base_anon:.1} MiB")
    );
    let Some(bins) = server else {
        return;
    };
    let root = dir.join("keys").join("root.json");
    let _ = bins;
    let config = format!(
        "device_id = \"bench-{run_id}-c\"\ndata_dir = \"{}\"\nroot_document = \"{}\"\n[api]\nsocket = \"{}\"\n[mqtt]\nurl = \"{url}\"\ntopic_prefix = \"{}\"\ndelete_on = \"puback\"\n[telemetry]\ninterval_ms = 1000\n[[models]]\nname = \"digits\"\npath = \"{}\"\n",
        dir.join("fleet").display(),
        root.display(),
        dir.join("f.sock").display(),
        prefix.as_str(),
        digits().display()
    );
    std::fs::write(dir.join("agent.toml"), config).unwrap();
    let fleet = Killed(
        Command::new(&agent_bin)
            .arg("run")
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .env("EDGEFLEET_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (rss, anon, cpu) = footprint(&fleet.0, Duration::from_secs(10));
    println!(
        "{:<58} {:>14} {:>12}",
        "idle agent, fleet mode, telemetry every 1 s, digits loaded",
        format!("{rss:.1} MiB {cpu:.2}%"),
        format!("+{:.1} MiB, anon {anon:.1}", rss - base_rss)
    );
}
