//! Three fleet-server replicas of one fleet on one PostgreSQL database,
//! one Mosquitto (each replica takes its share of device messages through
//! a shared subscription) and artifacts in the database, behind a TCP
//! load balancer: 1,000 simulated devices (`fleet-sim`, which re-sends
//! what no receipt named, as an agent does) and two real agents take a
//! staged rollout started on replica 1; replica 1, the rollout driver, is
//! SIGKILLed in the middle of the second wave.
//!
//! What must hold: another replica takes over and completes the rollout,
//! signing every device once; every telemetry sample a device sent is
//! stored exactly once (by sequence number); the real agents, in the
//! last wave, download the model through the balancer after replica 1 is
//! gone (from a replica that never received the push) and serve it; and
//! the API and the dashboard (one login, good on every replica) answer
//! throughout from the survivors, through a client that connects anew
//! for each request and tries the next replica once when a connection
//! breaks, as a load balancer retrying an idempotent request does.
//!
//! Needs Mosquitto and PostgreSQL (`EDGEFLEET_TEST_MQTT_URL`,
//! `EDGEFLEET_TEST_POSTGRES_URL`; `.ci/run` sets both).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_tests::balancer::Balancer;
use edgefleet_tests::{
    binary, digits_model, fresh_postgres_database, samples, shared_broker_url, unique_suffix,
    wait_for, Agent, Proc, Server,
};
use serde_json::{json, Value};

const SIMULATED: usize = 1000;
const AGENTS: usize = 2;

/// Requests through the balancer: answered, answered after one retry on
/// another replica, and failed even so.
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

/// GETs `path` through the balancer on a new connection; on a broken
/// connection tries once more (the balancer then picks another replica).
async fn probe(client: &reqwest::Client, url: &str, cookie: Option<&str>, tally: &Tally) {
    for attempt in 0..2 {
        let mut request = client.get(url);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                tally.answered.fetch_add(1, Ordering::Relaxed);
                if attempt > 0 {
                    tally.retried.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Ok(response) => {
                eprintln!("{url}: {}", response.status());
                tally.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if attempt == 0 => eprintln!("{url}: {e}; trying again"),
            Err(e) => {
                eprintln!("{url}: {e}");
                tally.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn postgres(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_carry_a_rollout_past_the_loss_of_its_driver() -> anyhow::Result<()> {
    let broker = shared_broker_url()?;
    let database = fresh_postgres_database().await?;
    let dir = tempfile::tempdir()?;
    let balancer = Balancer::start().await?;
    let args = |name: &str| {
        vec![
            "--replica".to_string(),
            name.to_string(),
            "--artifacts".into(),
            "database".into(),
            "--public-url".into(),
            balancer.url(),
        ]
    };
    let mut r1 = Server::builder(&dir.path().join("r1"))
        .external_broker(&broker)
        .database(&database)
        .log_level("info")
        .args(&args("r1"))
        .start()
        .await?;
    let mut replicas = vec![];
    for name in ["r2", "r3"] {
        replicas.push(
            Server::builder(&dir.path().join(name))
                .same_fleet_as(&r1)
                .external_broker(&broker)
                .database(&database)
                .log_level("info")
                .args(&args(name))
                .start()
                .await?,
        );
    }
    for server in std::iter::once(&r1).chain(&replicas) {
        balancer.add(server.url.trim_start_matches("http://").parse()?);
    }
    assert!(
        r1.proc
            .log_text()
            .contains("this server drives the rollouts"),
        "the first replica takes the driver's lease"
    );
    let db = postgres(&database).await;

    // The devices: simulated ones sending telemetry every 2 s and
    // reporting each update 2 s after they get it; two real agents.
    let suffix = unique_suffix();
    let report = dir.path().join("sim-report.json");
    let mut sim_cmd = Command::new(binary("fleet-sim"));
    sim_cmd
        .args(["--root", r1.root_document().to_str().unwrap()])
        .args(["--mqtt", &broker, "--topic-prefix", &r1.topic_prefix])
        .args(["--devices", &SIMULATED.to_string()])
        .args(["--id-prefix", &format!("s{suffix}")])
        .args(["--telemetry-secs", "2", "--resend-secs", "5"])
        .args(["--latency-ms", "2000"])
        .args(["--report", report.to_str().unwrap()])
        .env("EDGEFLEET_LOG", "info");
    let mut sim = Proc::spawn(sim_cmd, dir.path().join("sim.log"))?;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(Agent::start_fleet(
            dir.path(),
            &format!("a{i}-{suffix}"),
            &r1,
        )?);
    }
    let total = (SIMULATED + AGENTS) as i64;
    wait_for("every device online", Duration::from_secs(90), || async {
        let row = db
            .query_one("SELECT count(*) FROM devices WHERE online", &[])
            .await
            .ok()?;
        (row.get::<_, i64>(0) == total).then_some(())
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}\n--- r1:\n{}\n--- sim:\n{}",
            r1.proc.log_text(),
            sim.log_text()
        )
    })?;

    // The model is pushed to replica 1 only.
    r1.push(&digits_model("int8"), "digits", 1);

    // A rollout whose last wave holds both agents (the canary order is a
    // hash of the rollout id: dry runs find one).
    let agent_ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut rollout = None;
    for n in 0..50 {
        let request = json!({
            "id": format!("wave-{n}"),
            "model": "digits",
            "version": 1,
            "all": true,
            "waves": [{"count": 20}, {"percent": 30.0}, {"percent": 100.0}],
            "gates": {"max_in_flight": 400, "success_pct": 95.0},
        });
        let mut dry = request.clone();
        dry["dry_run"] = json!(true);
        let plan: Value = http
            .post(format!("{}/api/v1/rollouts", r1.url))
            .bearer_auth(&r1.token)
            .json(&dry)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let last = plan["waves"].as_array().unwrap().last().unwrap().clone();
        let last: Vec<String> = serde_json::from_value(last)?;
        if agent_ids.iter().all(|a| last.contains(a)) {
            rollout = Some(request);
            break;
        }
    }
    let request = rollout.expect("a rollout id with both agents in the last wave");
    let id = request["id"].as_str().unwrap().to_string();
    http.post(format!("{}/api/v1/rollouts", r1.url))
        .bearer_auth(&r1.token)
        .json(&request)
        .send()
        .await?
        .error_for_status()?;

    // Operators watch through the balancer: the API with the token, the
    // dashboard with one login.
    let login = http
        .post(format!("{}/ui/login", balancer.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}&next=%2Fui%2F", r1.token))
        .send()
        .await?;
    let cookie = login
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()?
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let tally = Arc::new(Tally::default());
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (tally, watching, http) = (tally.clone(), watching.clone(), http.clone());
        let (lb, token, id, cookie) = (balancer.url(), r1.token.clone(), id.clone(), cookie);
        tokio::spawn(async move {
            let authed = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .default_headers(
                    [(
                        reqwest::header::AUTHORIZATION,
                        format!("Bearer {token}").parse().unwrap(),
                    )]
                    .into_iter()
                    .collect(),
                )
                .build()
                .unwrap();
            while watching.load(Ordering::Relaxed) {
                probe(
                    &authed,
                    &format!("{lb}/api/v1/rollouts/{id}?brief=true"),
                    None,
                    &tally,
                )
                .await;
                probe(
                    &authed,
                    &format!("{lb}/api/v1/devices?limit=5"),
                    None,
                    &tally,
                )
                .await;
                probe(&http, &format!("{lb}/ui/"), Some(&cookie), &tally).await;
                probe(
                    &http,
                    &format!("{lb}/ui/rollouts/{id}"),
                    Some(&cookie),
                    &tally,
                )
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let started = http
        .post(format!("{}/api/v1/rollouts/{id}/start", r1.url))
        .bearer_auth(&r1.token)
        .send()
        .await?;
    assert!(started.status().is_success(), "{}", started.text().await?);
    let status = |server: &Server| {
        let url = format!("{}/api/v1/rollouts/{id}?brief=true", server.url);
        let (http, token) = (http.clone(), server.token.clone());
        async move {
            let answer = http.get(url).bearer_auth(token).send().await.ok()?;
            answer.json::<Value>().await.ok()
        }
    };
    // The driver dies in the middle of the second wave: its devices are
    // asked, not all have answered.
    wait_for(
        "the second wave half done",
        Duration::from_secs(120),
        || async {
            let s = status(&r1).await?;
            let wave = s["phase"]["wave"].as_u64()?;
            let confirmed = s["wave_counts"][1]["confirmed"].as_u64().unwrap_or(0);
            (wave == 1 && confirmed < 250).then_some(())
        },
    )
    .await?;
    r1.kill();
    let killed = std::time::Instant::now();

    wait_for(
        "the rollout completed",
        Duration::from_secs(180),
        || async {
            let s = status(&replicas[0]).await?;
            (s["phase"]["phase"] == "completed").then_some(())
        },
    )
    .await
    .map_err(|e| {
        let logs: Vec<String> = replicas.iter().map(|r| r.proc.log_text()).collect();
        anyhow::anyhow!("{e}\n--- r2:\n{}\n--- r3:\n{}", logs[0], logs[1])
    })?;
    let took_over: Vec<bool> = replicas
        .iter()
        .map(|r| {
            r.proc
                .log_text()
                .contains("this server drives the rollouts")
        })
        .collect();
    assert_eq!(
        took_over.iter().filter(|t| **t).count(),
        1,
        "exactly one survivor took over: {took_over:?}"
    );
    eprintln!(
        "completed {:?} after the driver was killed",
        killed.elapsed()
    );

    // The agents serve the model they fetched through the balancer after
    // replica 1 was gone.
    let s = samples();
    for agent in &agents {
        replicas[0].wait_for_model(&agent.id, "digits", 1).await?;
        assert_eq!(agent.classify(&s.inputs[0]).await?, s.labels[0]);
    }
    for agent in &agents {
        let desired = replicas[1]
            .get_json(&format!("/api/v1/devices/{}/desired", agent.id))
            .await?;
        let url = desired["signed"]["models"][0]["urls"][0]
            .as_str()
            .unwrap_or("");
        assert!(
            url.starts_with(&balancer.url()),
            "the agent fetched through the balancer: {desired}"
        );
    }

    // Every device is signed exactly once for the rollout: its desired
    // state's version is 1.
    let versions = db
        .query(
            "SELECT desired_version, count(*) FROM devices GROUP BY desired_version",
            &[],
        )
        .await?;
    let versions: BTreeMap<i64, i64> = versions.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(versions, BTreeMap::from([(1, total)]), "desired versions");

    watching.store(false, Ordering::Relaxed);
    watcher.await?;
    let (answered, retried, failed) = (
        tally.answered.load(Ordering::Relaxed),
        tally.retried.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!("operator requests: {answered} answered ({retried} after a retry), {failed} failed");
    assert!(answered > 100, "the watcher ran: {answered}");
    assert_eq!(failed, 0, "requests failed even on another replica");

    // The simulator stops, re-sends whatever no receipt named yet, and
    // says what it sent: each sample is stored exactly once.
    let _ = Command::new("kill")
        .args(["-TERM", &sim.child.id().to_string()])
        .status();
    wait_for("the simulator's report", Duration::from_secs(60), || {
        let done = sim.child.try_wait().ok().flatten().is_some();
        std::future::ready(done.then_some(()))
    })
    .await?;
    let sent: BTreeMap<String, Value> = serde_json::from_slice(&std::fs::read(&report)?)?;
    assert_eq!(sent.len(), SIMULATED);
    let stored = db
        .query(
            "SELECT device_id, seq FROM telemetry WHERE device_id LIKE $1",
            &[&format!("s{suffix}-%")],
        )
        .await?;
    let mut stored_by_device: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for row in &stored {
        stored_by_device
            .entry(row.get(0))
            .or_default()
            .push(row.get(1));
    }
    let (mut samples_sent, mut missing, mut unreceipted) = (0usize, 0usize, 0u64);
    for (device, report) in &sent {
        let seqs: Vec<i64> = serde_json::from_value(report["telemetry"].clone())?;
        unreceipted += report["unreceipted"].as_u64().unwrap_or(0);
        samples_sent += seqs.len();
        let have = stored_by_device.get(device).cloned().unwrap_or_default();
        missing += seqs.iter().filter(|s| !have.contains(s)).count();
        assert!(
            have.iter().all(|s| seqs.contains(s)),
            "{device}: stored a sample it never sent"
        );
    }
    eprintln!(
        "telemetry: {samples_sent} samples sent, {} stored, {missing} missing, {unreceipted} unreceipted at exit",
        stored.len()
    );
    assert!(samples_sent > SIMULATED * 5, "{samples_sent}");
    assert_eq!(missing, 0, "telemetry lost");
    assert_eq!(stored.len(), samples_sent, "each sample stored once");
    Ok(())
}
