//! The agent updates itself, end to end with real processes: releases
//! pushed with `fleetctl agent push`, deployed and rolled out in waves,
//! downloaded, self-tested and switched to by real agents under their
//! supervisor, while a client keeps calling each agent's local socket.
//!
//! The "releases" are this build's own agent executable with a few bytes
//! appended (an ELF file runs the same with trailing data), so each has
//! its own hash; broken releases are small shell scripts, or the agent
//! with its ELF machine field changed (built for another architecture).
//! Everything runs natively on x86_64.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_shared::{AgentBuild, AgentSlot, DesiredState, DeviceId, SecretKey, Signed};
use edgefleet_tests::{
    binary, digits_model, expect_success, samples, wait_for, wait_for_showing, Agent, Server,
};
use serde_json::Value;

/// How long a switch (download, self-test, restart, report) may take.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(90);

/// The agent config the tests add: a local digits model whose results are
/// uploaded (each request's id must reach the store exactly once), fast
/// telemetry, and short trial limits.
fn agent_config(deadline_secs: u64) -> String {
    format!(
        "[update]\ndownload_stall_secs = 5\nagent_report_deadline_secs = {deadline_secs}\nagent_soak_secs = 2\nagent_self_test_secs = 60\nagent_max_starts = 3\n[telemetry]\ninterval_ms = 500\n[[models]]\nname = \"digits\"\npath = \"{}\"\nupload_results = true\n",
        digits_model("int8").display()
    )
}

/// Release version `n` steps above this build's own (a device on the
/// packaged agent refuses anything older).
fn release(n: u64) -> String {
    let own = env!("CARGO_PKG_VERSION");
    let core = own.split(['-', '+']).next().unwrap();
    let mut parts: Vec<u64> = core.split('.').map(|p| p.parse().unwrap()).collect();
    parts[2] += n;
    format!("{}.{}.{}", parts[0], parts[1], parts[2])
}

/// This build's agent with `tag` appended: a working release of its own.
fn tagged_agent(dir: &Path, tag: &str) -> PathBuf {
    let mut bytes = std::fs::read(binary("edgefleet-agent")).unwrap();
    bytes.extend_from_slice(format!("\nedgefleet test release {tag}\n").as_bytes());
    write_executable(dir, tag, &bytes)
}

fn write_executable(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("releases").join(name).join("edgefleet-agent");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A script that passes the self-test (by running the real one) and then
/// does `then` when started as the agent.
fn script_release(dir: &Path, name: &str, then: &str) -> PathBuf {
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = self-test ]; then exec '{agent}' \"$@\"; fi\n{then}\n",
        agent = binary("edgefleet-agent").display()
    );
    write_executable(dir, name, script.as_bytes())
}

fn push(server: &Server, version: &str, target: &str, path: &Path) {
    let file = format!("{target}={}", path.display());
    let out = server.ctl(&["agent", "push", "--version", version, "--file", &file]);
    expect_success(&out, "agent push");
}

/// The device's record as the API shows it.
async fn device(server: &Server, id: &str) -> Value {
    server
        .get_json(&format!("/api/v1/devices/{id}"))
        .await
        .unwrap_or(Value::Null)
}

/// The target triple the agent reported (which build it takes).
async fn reported_target(server: &Server, id: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{id} reports its target"),
        SWITCH_TIMEOUT,
        || async {
            device(server, id).await["agent"]["target"]
                .as_str()
                .map(str::to_string)
        },
    )
    .await
}

/// Waits until `id` reports running `release` (`None`: the packaged agent).
async fn wait_release(server: &Server, agent: &Agent, release: Option<&str>) -> anyhow::Result<()> {
    let found = wait_for_showing(
        &format!("{} reports release {release:?}", agent.id),
        SWITCH_TIMEOUT,
        || async {
            let d = device(server, &agent.id).await;
            let reported = &d["agent"]["release"];
            let matches = match release {
                Some(r) => reported == r,
                None => reported.is_null(),
            };
            if matches && d["online"] == true {
                Ok(())
            } else {
                Err(d["agent"].clone())
            }
        },
    )
    .await;
    found.map_err(|e| anyhow::anyhow!("{e}\n{}", agent.proc.log_text()))
}

/// The agent update events of `id` with kind `kind` for `release`.
async fn agent_events(server: &Server, id: &str, kind: &str, release: &str) -> Vec<Value> {
    server
        .events(id)
        .await
        .into_iter()
        .filter(|e| e["kind"] == kind && e["agent_version"] == release)
        .collect()
}

async fn wait_agent_event(
    server: &Server,
    id: &str,
    kind: &str,
    release: &str,
) -> anyhow::Result<Value> {
    server
        .wait_event_matching(
            id,
            &format!("{kind} of agent {release}"),
            SWITCH_TIMEOUT,
            |e| e["kind"] == kind && e["agent_version"] == release,
        )
        .await
}

/// What a continuous client of one agent saw.
#[derive(Debug, Default)]
struct Stream {
    /// Ids of the requests answered with success.
    ok: Vec<String>,
    failures: Vec<String>,
    /// The longest a single request took (connection wait included).
    longest: Duration,
}

/// Calls `socket` back to back (a new connection each, as `curl` does),
/// each request with its own id, until `stop`.
fn stream(socket: PathBuf, name: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Stream> {
    tokio::spawn(async move {
        let s = samples();
        let mut seen = Stream::default();
        let mut n = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let id = format!("{name}-{n}");
            let body = serde_json::json!({"id": id, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": s.inputs[n % s.inputs.len()]}]});
            let started = Instant::now();
            let answer = tokio::time::timeout(
                Duration::from_secs(30),
                edgefleet_tests::unix_http::request(
                    &socket,
                    http::Method::POST,
                    "/v2/models/digits/infer",
                    Some(&body),
                ),
            )
            .await;
            seen.longest = seen.longest.max(started.elapsed());
            match answer {
                Ok(Ok((status, _))) if status.is_success() => seen.ok.push(id),
                Ok(Ok((status, reply))) => seen.failures.push(format!("{id}: {status} {reply}")),
                Ok(Err(e)) => seen.failures.push(format!("{id}: {e}")),
                Err(_) => seen.failures.push(format!("{id}: no answer within 30 s")),
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    })
}

/// Waits until the server stored a result for every id in `ok`, and
/// checks each exactly once.
async fn results_exactly_once(server: &Server, device: &str, ok: &[String]) -> anyhow::Result<()> {
    let mut want = ok.to_vec();
    want.sort();
    let stored = wait_for_showing(
        &format!("{} results of {device} stored", want.len()),
        Duration::from_secs(60),
        || async {
            let mut ids = server.result_ids(device).await.unwrap_or_default();
            ids.sort();
            if ids.len() >= want.len() {
                Ok(ids)
            } else {
                Err(ids.len())
            }
        },
    )
    .await?;
    let mut unique = stored.clone();
    unique.dedup();
    assert_eq!(
        unique.len(),
        stored.len(),
        "{device}: a result was stored twice"
    );
    assert_eq!(
        stored, want,
        "{device}: stored results differ from the answered requests"
    );
    Ok(())
}

/// The sequence numbers of `device`'s stored telemetry, in stored order.
async fn telemetry_seqs(server: &Server, device: &str) -> anyhow::Result<Vec<u64>> {
    let body = server
        .get_json(&format!("/api/v1/devices/{device}/telemetry?limit=5000"))
        .await?;
    let seqs: Vec<u64> = body["telemetry"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["seq"].as_u64()).collect())
        .unwrap_or_default();
    Ok(seqs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_move_from_a_to_b_in_two_waves_without_a_failed_request() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let ids = ["up-1", "up-2", "up-3"];
    let mut agents = Vec::new();
    for id in ids {
        agents.push(
            Agent::builder(dir.path(), id, &server)
                .config(&agent_config(60))
                .start()?,
        );
    }
    for agent in &agents {
        agent.wait_ready().await?;
    }
    let target = reported_target(&server, ids[0]).await?;
    let (a, b) = (release(1), release(2));
    push(&server, &a, &target, &tagged_agent(dir.path(), "a"));
    let b_path = tagged_agent(dir.path(), "b");
    push(&server, &b, &target, &b_path);

    // Clients call every agent throughout both switches.
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = agents
        .iter()
        .map(|a| stream(a.socket.clone(), a.id.clone(), stop.clone()))
        .collect();

    // The packaged agent -> A, everywhere.
    expect_success(
        &server.ctl(&["deploy", "--agent", &a, "--all"]),
        "deploy --agent",
    );
    for agent in &agents {
        wait_release(&server, agent, Some(&a)).await?;
    }
    // A -> B in two waves.
    let created = server.ctl(&[
        "rollout",
        "create",
        "--id",
        "agent-b",
        "--agent",
        &b,
        "--all",
        "--waves",
        "1,100%",
        "--failure-pct",
        "30",
    ]);
    expect_success(&created, "rollout create --agent");
    server.ctl_json(&["rollout", "start", "agent-b"]);
    let done = wait_for_showing("rollout agent-b completed", SWITCH_TIMEOUT * 2, || async {
        let status = server.ctl_json(&["rollout", "status", "agent-b"]);
        if status["phase"]["phase"] == "completed" {
            Ok(status)
        } else {
            Err(status)
        }
    })
    .await?;
    for agent in &agents {
        wait_release(&server, agent, Some(&b)).await?;
        wait_agent_event(&server, &agent.id, "confirmed", &b).await?;
    }
    // Requests keep flowing a little after the last switch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);

    let (_, doc) = server.desired(ids[0]).await?;
    let slot = doc
        .agent
        .expect("the desired state names the agent release");
    let build = &slot.builds[&target];
    for (agent, handle) in agents.iter().zip(streams) {
        let seen = handle.await?;
        let self_tests: Vec<String> = agent_events(&server, &agent.id, "activated", &b)
            .await
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect();
        println!(
            "{}: {} requests answered across 2 switches, {} failed, longest wait {:?}; B's build {} bytes, {} bytes with zstd; {}",
            agent.id,
            seen.ok.len(),
            seen.failures.len(),
            seen.longest,
            build.size,
            build.zstd.as_ref().map_or(0, |z| z.size),
            self_tests.join(", "),
        );
        assert!(
            seen.failures.is_empty(),
            "{}: {} failed requests, the first: {:?}\n{}",
            agent.id,
            seen.failures.len(),
            &seen.failures[..seen.failures.len().min(5)],
            agent.proc.log_text()
        );
        assert!(
            seen.ok.len() > 20,
            "{}: too few requests to say anything",
            agent.id
        );
        results_exactly_once(&server, &agent.id, &seen.ok).await?;
        let seqs = telemetry_seqs(&server, &agent.id).await?;
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{}: telemetry out of order or twice: {seqs:?}",
            agent.id
        );
        assert!(seqs.len() > 5, "{}: telemetry missing: {seqs:?}", agent.id);
        // Each agent switched exactly twice, each time after a self-test.
        assert_eq!(
            agent_events(&server, &agent.id, "activated", &a)
                .await
                .len(),
            1
        );
        assert_eq!(self_tests.len(), 1);
        assert!(self_tests[0].contains("self-test passed"), "{self_tests:?}");
    }
    assert_eq!(done["phase"]["phase"], "completed");
    // The release really runs from a slot in the data dir: the same bytes.
    let running = std::fs::read(agents[0].dir.join("data/agent/slots/b/edgefleet-agent"))
        .or_else(|_| std::fs::read(agents[0].dir.join("data/agent/slots/a/edgefleet-agent")))?;
    assert_eq!(running, std::fs::read(&b_path)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_that_fails_its_self_test_is_refused_before_switching_and_pauses_the_rollout(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agents = [
        Agent::builder(dir.path(), "st-1", &server)
            .config(&agent_config(60))
            .start()?,
        Agent::builder(dir.path(), "st-2", &server)
            .config(&agent_config(60))
            .start()?,
    ];
    for agent in &agents {
        agent.wait_ready().await?;
    }
    let target = reported_target(&server, "st-1").await?;

    // One that exits non-zero.
    let failing = release(3);
    let script = write_executable(
        dir.path(),
        "exit3",
        b"#!/bin/sh\necho 'cannot start: broken build' >&2\nexit 3\n",
    );
    push(&server, &failing, &target, &script);
    let stop = Arc::new(AtomicBool::new(false));
    let client = stream(agents[0].socket.clone(), "st-1".into(), stop.clone());
    let created = server.ctl(&[
        "rollout",
        "create",
        "--id",
        "broken",
        "--agent",
        &failing,
        "--all",
        "--waves",
        "1,100%",
        "--failure-pct",
        "1",
    ]);
    expect_success(&created, "rollout create --agent");
    server.ctl_json(&["rollout", "start", "broken"]);
    wait_for_showing("rollout broken paused", SWITCH_TIMEOUT, || async {
        let status = server.ctl_json(&["rollout", "status", "broken"]);
        if status["phase"]["phase"] == "paused" {
            Ok(status)
        } else {
            Err(status)
        }
    })
    .await?;
    // Whichever device the first wave asked refused it with the reason.
    let mut refused = None;
    for agent in &agents {
        if let Some(e) = agent_events(&server, &agent.id, "activation_failed", &failing)
            .await
            .pop()
        {
            refused = Some((agent, e));
        }
    }
    let (canary, event) = refused.expect("the canary reported the failed self-test");
    let reason = event["reason"].as_str().unwrap();
    assert!(
        reason.contains("self-test failed")
            && reason.contains("exit status: 3")
            && reason.contains("broken build"),
        "{reason}"
    );
    // It never switched: still the packaged agent, still serving.
    assert!(device(&server, &canary.id).await["agent"]["release"].is_null());
    assert!(agent_events(&server, &canary.id, "activated", &failing)
        .await
        .is_empty());
    let s = samples();
    assert_eq!(canary.classify(&s.inputs[0]).await?, s.labels[0]);
    // The second wave was never asked.
    let other = agents.iter().find(|a| a.id != canary.id).unwrap();
    assert!(
        agent_events(&server, &other.id, "activation_failed", &failing)
            .await
            .is_empty()
    );

    // One built for another architecture: the agent with its ELF machine
    // field saying aarch64.
    let mut foreign = std::fs::read(binary("edgefleet-agent"))?;
    assert_eq!(&foreign[..4], b"\x7fELF");
    foreign[18] = 0xb7;
    foreign[19] = 0x00;
    let foreign_release = release(4);
    push(
        &server,
        &foreign_release,
        &target,
        &write_executable(dir.path(), "foreign", &foreign),
    );
    expect_success(
        &server.ctl(&["deploy", "--agent", &foreign_release, "--device", &other.id]),
        "deploy --agent",
    );
    let event = wait_agent_event(&server, &other.id, "activation_failed", &foreign_release).await?;
    let reason = event["reason"].as_str().unwrap();
    assert!(reason.contains("self-test"), "{reason}");
    assert!(device(&server, &other.id).await["agent"]["release"].is_null());

    stop.store(true, Ordering::SeqCst);
    let seen = client.await?;
    assert!(
        seen.failures.is_empty(),
        "{} failed, the first: {:?}",
        seen.failures.len(),
        &seen.failures[..seen.failures.len().min(5)]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releases_that_crash_loop_or_never_report_are_rolled_back_by_the_device_alone(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let deadline_secs = 8;
    // The crash loop is given up after its third start (about 7 s of
    // restart backoff), well before its report deadline.
    let looping = Agent::builder(dir.path(), "rb-loop", &server)
        .config(&agent_config(60))
        .start()?;
    let silent = Agent::builder(dir.path(), "rb-silent", &server)
        .config(&agent_config(deadline_secs))
        .start()?;
    for agent in [&looping, &silent] {
        agent.wait_ready().await?;
    }
    let target = reported_target(&server, "rb-loop").await?;
    let good = release(1);
    push(&server, &good, &target, &tagged_agent(dir.path(), "good"));
    expect_success(
        &server.ctl(&["deploy", "--agent", &good, "--all"]),
        "deploy --agent",
    );
    for agent in [&looping, &silent] {
        wait_release(&server, agent, Some(&good)).await?;
    }

    // Passes its self-test, then exits 1 at every start.
    let crashing = release(2);
    push(
        &server,
        &crashing,
        &target,
        &script_release(
            dir.path(),
            "crash",
            "echo 'crashing on purpose' >&2; exit 1",
        ),
    );
    // Passes its self-test, then runs (serving on the socket it was
    // given) against a broker that is not there.
    let quiet = release(3);
    let config = std::fs::read_to_string(silent.dir.join("agent.toml"))?
        .replace(&server.mqtt_url, "mqtt://127.0.0.1:9");
    let quiet_config = silent.dir.join("quiet.toml");
    std::fs::write(&quiet_config, config)?;
    push(
        &server,
        &quiet,
        &target,
        &script_release(
            dir.path(),
            "quiet",
            &format!(
                "exec '{}' run --config '{}'",
                binary("edgefleet-agent").display(),
                quiet_config.display()
            ),
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients = [
        stream(looping.socket.clone(), "rb-loop".into(), stop.clone()),
        stream(silent.socket.clone(), "rb-silent".into(), stop.clone()),
    ];
    expect_success(
        &server.ctl(&["deploy", "--agent", &crashing, "--device", "rb-loop"]),
        "deploy",
    );
    expect_success(
        &server.ctl(&["deploy", "--agent", &quiet, "--device", "rb-silent"]),
        "deploy",
    );

    let switched = Instant::now();
    let event = wait_agent_event(&server, "rb-loop", "rolled_back", &crashing).await?;
    let reason = event["reason"].as_str().unwrap();
    assert!(reason.contains("crash loop: started 3 times"), "{reason}");
    assert!(reason.contains(&good), "says what runs again: {reason}");
    let event = wait_agent_event(&server, "rb-silent", "rolled_back", &quiet).await?;
    let reason = event["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("within {deadline_secs} s")),
        "{reason}"
    );
    println!(
        "both rolled back and reported within {:?} of the deploys",
        switched.elapsed()
    );
    for agent in [&looping, &silent] {
        wait_release(&server, agent, Some(&good)).await?;
    }
    // Each switched once (after its self-test) and never again: the
    // release is refused from now on, though it is still deployed.
    assert_eq!(
        agent_events(&server, "rb-loop", "activated", &crashing)
            .await
            .len(),
        1
    );
    assert_eq!(
        agent_events(&server, "rb-silent", "activated", &quiet)
            .await
            .len(),
        1
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        device(&server, "rb-loop").await["agent"]["release"],
        good.as_str()
    );

    stop.store(true, Ordering::SeqCst);
    for (client, agent) in clients.into_iter().zip([&looping, &silent]) {
        let seen = client.await?;
        println!(
            "{}: {} requests, {} failed, longest wait {:?}",
            agent.id,
            seen.ok.len(),
            seen.failures.len(),
            seen.longest
        );
        // The crash-looping release never serves; its supervisor keeps
        // the socket, so requests wait rather than fail, except while no
        // agent runs for longer than a client waits.
        assert!(
            seen.failures.is_empty(),
            "{}: {} failed, the first: {:?}",
            agent.id,
            seen.failures.len(),
            &seen.failures[..seen.failures.len().min(5)]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_downgraded_agent_slots_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agent = Agent::builder(dir.path(), "att-1", &server)
        .config(&agent_config(60))
        .start()?;
    agent.wait_ready().await?;
    let target = reported_target(&server, "att-1").await?;
    let first = release(1);
    push(&server, &first, &target, &tagged_agent(dir.path(), "first"));
    expect_success(
        &server.ctl(&["deploy", "--agent", &first, "--all"]),
        "deploy --agent",
    );
    wait_release(&server, &agent, Some(&first)).await?;
    let (first_env, _) = server.desired("att-1").await?;
    let good = release(2);
    push(&server, &good, &target, &tagged_agent(dir.path(), "good"));
    expect_success(
        &server.ctl(&["deploy", "--agent", &good, "--all"]),
        "deploy --agent",
    );
    wait_release(&server, &agent, Some(&good)).await?;
    let (genuine_env, genuine) = server.desired("att-1").await?;
    let key = server.online_key();
    let newest = |events: &[Value]| events.first().and_then(|e| e["seq"].as_u64());

    let slot_for = |version: &str, allow_downgrade: bool| {
        let mut slot: AgentSlot = genuine.agent.clone().unwrap();
        slot.version = version.into();
        slot.allow_downgrade = allow_downgrade;
        slot
    };
    let doc = |version: u64, slot: AgentSlot| {
        let now = edgefleet_shared::unix_now();
        DesiredState::new(
            DeviceId::new("att-1").unwrap(),
            version,
            now,
            now + 600,
            genuine.models.clone(),
        )
        .with_agent(Some(slot))
    };
    let expect_refused = |payload: Vec<u8>, why: &'static str| {
        let server = &server;
        async move {
            let before = newest(&server.events("att-1").await);
            server.publish_desired("att-1", payload).await?;
            server
                .wait_event_matching("att-1", &format!("refused: {why}"), SWITCH_TIMEOUT, |e| {
                    e["seq"].as_u64() > before
                        && e["kind"] == "refused"
                        && e["reason"].as_str().is_some_and(|r| r.contains(why))
                })
                .await
        }
    };

    // Forged: a build of the attacker's, signed by a key the root does not
    // trust.
    let rogue = SecretKey::from_seed([66; 32]);
    let mut forged = slot_for(&release(5), false);
    forged.builds.insert(
        target.clone(),
        AgentBuild {
            sha256: "66".repeat(32),
            size: 1000,
            urls: vec!["http://127.0.0.1:9/evil".into()],
            zstd: None,
        },
    );
    expect_refused(
        Signed::sign(&doc(genuine.version + 1, forged.clone()), &[&rogue]).to_json(),
        "not trusted",
    )
    .await?;
    // Tampered: the genuine document with the build's hash swapped.
    let mut tampered = genuine_env.clone();
    tampered.signed["agent"]["builds"][&target]["sha256"] = Value::String("66".repeat(32));
    expect_refused(tampered.to_json(), "does not verify").await?;
    // Downgraded: correctly signed and newer, but an older release than
    // the one running, without the operator's downgrade flag.
    expect_refused(
        Signed::sign(&doc(genuine.version + 1, slot_for(&first, false)), &[&key]).to_json(),
        "older than release",
    )
    .await?;
    // Replayed: the genuine document that named the first release.
    expect_refused(first_env.to_json(), "not newer").await?;

    // Nothing changed: the same release runs, no switch happened.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        device(&server, "att-1").await["agent"]["release"],
        good.as_str()
    );
    let activated: Vec<Value> = server
        .events("att-1")
        .await
        .into_iter()
        .filter(|e| e["kind"] == "activated" && !e["agent_version"].is_null())
        .collect();
    assert_eq!(
        activated.len(),
        2,
        "one switch per genuine release: {activated:?}"
    );
    let s = samples();
    assert_eq!(agent.classify(&s.inputs[1]).await?, s.labels[1]);
    Ok(())
}
