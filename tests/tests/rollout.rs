//! Staged rollouts end to end, with real agents: a version that fails its
//! test vector pauses the rollout at the failure threshold inside the
//! canary wave, later waves are never asked, abort sends the canary back;
//! a healthy version rolls out wave by wave to every device.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use edgefleet_tests::{digits_model, expect_success, wait_for, wait_for_showing, Agent, Server};
use serde_json::{json, Value};

/// How long a rollout may take to reach a phase.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for rollout `id` to reach `phase`; returns its status then. On
/// timeout the error shows the last status seen.
async fn wait_phase(server: &Server, id: &str, phase: &str) -> anyhow::Result<Value> {
    let status = wait_for_showing(
        &format!("rollout {id} in phase {phase}"),
        PHASE_TIMEOUT,
        || async {
            let status = server.ctl_json(&["rollout", "status", id]);
            if status["phase"]["phase"] == phase {
                Ok(status)
            } else {
                Err(status)
            }
        },
    )
    .await?;
    Ok(status)
}

/// Real agents `ids`, all serving digits version 1 (deployed fleet-wide).
async fn agents_on_version_1(
    dir: &std::path::Path,
    server: &Server,
    ids: &[&str],
) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for id in ids {
        agents.push(Agent::start_fleet(dir, id, server)?);
    }
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, "--all");
    for id in ids {
        server.wait_for_model(id, "digits", 1).await?;
    }
    Ok(agents)
}

/// A fleet-sim process of simulated devices named `prefix-NNNNN`.
fn simulated(
    dir: &std::path::Path,
    server: &Server,
    prefix: &str,
    args: &[&str],
) -> anyhow::Result<edgefleet_tests::Proc> {
    let mut sim = std::process::Command::new(edgefleet_tests::binary("fleet-sim"));
    sim.arg("--root")
        .arg(server.root_document())
        .args(["--mqtt", &server.mqtt_url])
        .args([
            "--topic-prefix",
            &server.topic_prefix,
            "--id-prefix",
            prefix,
        ])
        .args(args);
    edgefleet_tests::Proc::spawn(sim, dir.join(format!("{prefix}.log")))
}

/// A test vector for the digits model whose expected outputs are wrong.
fn failing_test_vector(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let v: Value = serde_json::from_slice(&std::fs::read(
        edgefleet_tests::repo_root().join("models/digits/samples.json"),
    )?)?;
    let input: Vec<f64> = v["inputs"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let wrong: Vec<f64> = v["fp32_probabilities"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() + 0.5)
        .collect();
    let tv = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": input}],
        "expected": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": wrong}],
        "tolerance": 1e-4,
    });
    let path = dir.join("wrong-tv.json");
    std::fs::write(&path, serde_json::to_vec(&tv)?)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_rollout_pauses_in_the_canary_wave_and_abort_reverts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let ids = ["ro-1", "ro-2", "ro-3", "ro-4"];
    let agents = agents_on_version_1(dir.path(), &server, &ids).await?;

    // Version 2 fails its test vector everywhere.
    let tv = failing_test_vector(dir.path())?;
    let fp32 = digits_model("fp32");
    let out = server.ctl(&[
        "model",
        "push",
        fp32.to_str().unwrap(),
        "--name",
        "digits",
        "--version",
        "2",
        "--test-vector",
        tv.to_str().unwrap(),
    ]);
    expect_success(&out, "model push");
    let dry = server.ctl_json(&[
        "rollout",
        "create",
        "--id",
        "bad",
        "--model",
        "digits",
        "--version",
        "2",
        "--all",
        "--waves",
        "1,2,100%",
        "--failure-pct",
        "30",
        "--dry-run",
    ]);
    let waves: Vec<usize> = dry["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_array().unwrap().len())
        .collect();
    assert_eq!(waves, vec![1, 1, 2]);
    assert_eq!(
        server.ctl_json(&["rollout", "status"]),
        json!([]),
        "a dry run stores nothing"
    );
    server.ctl_json(&[
        "rollout",
        "create",
        "--id",
        "bad",
        "--model",
        "digits",
        "--version",
        "2",
        "--all",
        "--waves",
        "1,2,100%",
        "--failure-pct",
        "30",
    ]);
    // A second rollout over the same devices is refused.
    let conflict = server.ctl(&[
        "rollout",
        "create",
        "--id",
        "other",
        "--model",
        "digits",
        "--version",
        "2",
        "--all",
    ]);
    assert_eq!(conflict.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&conflict.stderr).contains("already in an active rollout"));

    server.ctl_json(&["rollout", "start", "bad"]);
    let paused = wait_phase(&server, "bad", "paused").await?;
    assert_eq!(
        paused["phase"]["wave"], 0,
        "stopped inside the canary wave: {paused}"
    );
    assert!(paused["phase"]["reason"]
        .as_str()
        .unwrap()
        .contains("failed"));
    let canary = paused["waves"][0][0].as_str().unwrap().to_string();
    assert_eq!(paused["devices"][&canary]["state"], "failed");
    for later in paused["waves"].as_array().unwrap()[1..]
        .iter()
        .flat_map(|w| w.as_array().unwrap())
    {
        assert_eq!(
            paused["devices"][later.as_str().unwrap()]["state"],
            "waiting",
            "{paused}"
        );
    }
    // Every device still serves version 1.
    for id in ids {
        server.wait_for_model(id, "digits", 1).await?;
    }

    let aborted = server.ctl_json(&["rollout", "abort", "bad"]);
    assert_eq!(aborted["phase"]["phase"], "aborted");
    assert_eq!(aborted["devices"][&canary]["state"], "reverted");
    let device = server
        .get_json(&format!("/api/v1/devices/{canary}"))
        .await?;
    let desired = server
        .get_json(&format!("/api/v1/devices/{canary}/desired"))
        .await?;
    assert_eq!(
        desired["signed"]["models"][0]["version"], 1,
        "the canary is signed back to version 1: {desired}, {device}"
    );

    // A healthy version goes everywhere, wave by wave.
    server.push(&digits_model("fp32"), "digits", 3);
    server.ctl_json(&[
        "rollout",
        "create",
        "--id",
        "good",
        "--model",
        "digits",
        "--version",
        "3",
        "--all",
        "--waves",
        "1,50%,100%",
    ]);
    server.ctl_json(&["rollout", "start", "good"]);
    let done = wait_phase(&server, "good", "completed").await?;
    assert_eq!(done["counts"]["confirmed"], 4, "{done}");
    for id in ids {
        server.wait_for_model(id, "digits", 3).await?;
    }
    let audit = server.ctl_json(&["audit"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for expected in ["rollout.create", "rollout.start", "rollout.abort"] {
        assert!(actions.contains(&expected), "{actions:?}");
    }
    drop(agents);
    Ok(())
}

/// A server restarted mid-rollout resumes it where it was: waiting for
/// the operator's approval of the next wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resumes_a_rollout_where_it_was() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let ids = ["rs-1", "rs-2"];
    let agents = agents_on_version_1(dir.path(), &server, &ids).await?;
    server.push(&digits_model("fp32"), "digits", 2);
    server.ctl_json(&[
        "rollout",
        "create",
        "--id",
        "slow",
        "--model",
        "digits",
        "--version",
        "2",
        "--all",
        "--waves",
        "1,100%",
        "--approve-each",
    ]);
    server.ctl_json(&["rollout", "start", "slow"]);
    let waiting = wait_phase(&server, "slow", "awaiting_approval").await?;
    server.restart().await?;
    let after = server.ctl_json(&["rollout", "status", "slow"]);
    assert_eq!(after["phase"], waiting["phase"]);
    assert_eq!(after["devices"], waiting["devices"]);
    server.ctl_json(&["rollout", "approve", "slow"]);
    wait_phase(&server, "slow", "completed").await?;
    for id in ids {
        server.wait_for_model(id, "digits", 2).await?;
    }
    drop(agents);
    Ok(())
}

/// 300 simulated devices (fleet-sim, the real protocol over MQTT), a
/// quarter of which fail the update: the rollout pauses at its 10 %
/// threshold before the last wave is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_pauses_at_the_failure_threshold() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let _sim = simulated(
        dir.path(),
        &server,
        "sim",
        &["--devices", "300", "--fail-rate", "0.25"],
    )?;
    server.wait_devices_online(300).await?;
    server.push(&digits_model("int8"), "digits", 1);
    // Version 1: a quarter of the devices fail it.
    server.ctl_json(&[
        "rollout",
        "create",
        "--id",
        "sim1",
        "--model",
        "digits",
        "--version",
        "1",
        "--all",
        "--waves",
        "1,5%,25%,100%",
        "--failure-pct",
        "10",
        "--success-pct",
        "0",
    ]);
    server.ctl_json(&["rollout", "start", "sim1"]);
    let paused = wait_phase(&server, "sim1", "paused").await?;
    let last_wave = paused["waves"].as_array().unwrap().last().unwrap();
    for d in last_wave.as_array().unwrap() {
        assert_eq!(
            paused["devices"][d.as_str().unwrap()]["state"],
            "waiting",
            "{paused}"
        );
    }
    server.ctl_json(&["rollout", "abort", "sim1"]);
    Ok(())
}

/// Simulated devices with telemetry: a device excluded by the operator is
/// skipped, devices that join mid-rollout are taken in under the same
/// gates; a version whose inference error rate breaks the rollout's limit
/// fails its canary after it confirmed, which pauses the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_joining_devices_and_telemetry_limits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let telemetry = [
        "--telemetry-secs",
        "0.5",
        "--degraded",
        "digits:2",
        "--error-pct",
        "40",
    ];
    let _sim = simulated(
        dir.path(),
        &server,
        "sim",
        &[&["--devices", "20"][..], &telemetry].concat(),
    )?;
    server.wait_devices_online(20).await?;
    server.push(&digits_model("int8"), "digits", 1);
    server.push(&digits_model("int8"), "digits", 2);
    let create = |id: &str, version: &str, waves: &str, more: &[&str]| {
        server.ctl_json(
            &[
                &[
                    "rollout",
                    "create",
                    "--id",
                    id,
                    "--model",
                    "digits",
                    "--version",
                    version,
                    "--all",
                    "--waves",
                    waves,
                    "--max-error-pct",
                    "5",
                    "--failure-pct",
                    "10",
                ][..],
                more,
            ]
            .concat(),
        )
    };
    create("v1", "1", "1,50%,100%", &["--approve-each"]);
    server.ctl_json(&["rollout", "start", "v1"]);
    let waiting = wait_phase(&server, "v1", "awaiting_approval").await?;
    // The operator keeps one device of the last wave out of it.
    let waves = waiting["waves"].as_array().unwrap();
    let kept_out = waves[2][0].as_str().unwrap().to_string();
    let excluded = server.ctl_json(&["rollout", "device", "v1", &kept_out, "exclude"]);
    assert_eq!(excluded["devices"][&kept_out]["state"], "excluded");
    // Three devices join the fleet while the rollout waits.
    let _late = simulated(dir.path(), &server, "late", &["--devices", "3"])?;
    let joined = wait_for_showing(
        "the late devices in the rollout",
        Duration::from_secs(10),
        || async {
            let status = server.ctl_json(&["rollout", "status", "v1"]);
            if status["devices"].as_object().unwrap().len() == 23 {
                Ok(status)
            } else {
                Err(status)
            }
        },
    )
    .await
    .unwrap_or_else(|timed_out| timed_out.last);
    assert_eq!(
        joined["devices"].as_object().unwrap().len(),
        23,
        "late devices joined: {joined}"
    );
    assert_eq!(
        joined["waves"].as_array().unwrap()[2]
            .as_array()
            .unwrap()
            .len(),
        13
    );
    server.ctl_json(&["rollout", "approve", "v1"]);
    wait_phase(&server, "v1", "awaiting_approval").await?;
    server.ctl_json(&["rollout", "approve", "v1"]);
    let done = wait_phase(&server, "v1", "completed").await?;
    assert_eq!(done["counts"]["confirmed"], 22, "{done}");
    assert_eq!(done["counts"]["excluded"], 1, "{done}");
    for late in ["late-00000", "late-00001", "late-00002"] {
        assert_eq!(done["devices"][late]["state"], "confirmed", "{done}");
    }
    let device = server
        .get_json(&format!("/api/v1/devices/{kept_out}"))
        .await?;
    assert!(
        !device["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "digits"),
        "the excluded device was never asked: {device}"
    );

    // Version 2 confirms, then, within the soak time, its telemetry shows
    // 40 % of inferences failing, over the 5 % limit.
    create(
        "v2",
        "2",
        "1,100%",
        &["--success-pct", "0", "--soak-secs", "5"],
    );
    server.ctl_json(&["rollout", "start", "v2"]);
    let paused = wait_phase(&server, "v2", "paused").await?;
    let canary = paused["waves"][0][0].as_str().unwrap();
    let state = &paused["devices"][canary];
    assert_eq!(state["state"], "failed", "{paused}");
    assert!(
        state["reason"]
            .as_str()
            .unwrap()
            .contains("inference error rate 40.0 % > 5 %"),
        "{state}"
    );
    assert_eq!(
        paused["counts"]["waiting"], 22,
        "nobody else asked: {paused}"
    );
    server.ctl_json(&["rollout", "abort", "v2"]);
    server.wait_for_model(canary, "digits", 1).await?;
    Ok(())
}

/// A broker that drops an old connection after a new one took over
/// publishes the old connection's last will late: the server ignores an
/// offline message from a connection older than the device's latest, and
/// takes the will of the latest connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_will_of_a_replaced_connection_is_ignored() -> anyhow::Result<()> {
    use edgefleet_shared::{DeviceId, StatusMessage, TopicKind, TopicPrefix, UpdateEvent};
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let id = DeviceId::new("phone-home")?;
    let prefix = TopicPrefix::new(server.topic_prefix.clone())?;
    let status_topic = prefix.device(&id, TopicKind::Status).to_string();
    // The device's key, pinned by the server at its first message (an
    // open fleet: the device was never enrolled).
    let key = edgefleet_shared::SecretKey::from_seed([42; 32]);
    fn sign<T: serde::Serialize>(
        topic: &str,
        msg: &T,
        key: &edgefleet_shared::SecretKey,
    ) -> anyhow::Result<Vec<u8>> {
        Ok(edgefleet_shared::signed_message::seal(
            topic,
            &serde_json::to_vec(msg)?,
            key,
        ))
    }
    let online = StatusMessage {
        seq: 1,
        online: true,
        at: edgefleet_shared::unix_now(),
        session: Some(200),
        ..StatusMessage::offline(id.clone())
    };
    let path = format!("/api/v1/devices/{id}");
    async fn online_now(server: &Server, path: &str) -> Option<bool> {
        server
            .get_json(path)
            .await
            .ok()
            .map(|d| d["online"] == true)
    }
    server
        .publish_retained(&status_topic, sign(&status_topic, &online, &key)?)
        .await?;
    let seen = wait_for_showing("phone-home online", Duration::from_secs(5), || async {
        match online_now(&server, &path).await {
            Some(true) => Ok(Some(true)),
            other => Err(other),
        }
    })
    .await
    .unwrap_or_else(|timed_out| timed_out.last);
    assert_eq!(seen, Some(true));
    // The will of connection 100, replaced by 200, then an event to know
    // when the server has handled it (messages are handled in order).
    let stale = StatusMessage::will(id.clone(), 100);
    server
        .publish_retained(&status_topic, sign(&status_topic, &stale, &key)?)
        .await?;
    let event = UpdateEvent {
        schema: edgefleet_shared::SCHEMA_VERSION,
        device_id: id.clone(),
        seq: 2,
        at: edgefleet_shared::unix_now(),
        kind: edgefleet_shared::EventKind::Accepted,
        desired_version: Some(1),
        model: None,
        model_version: None,
        reason: None,
        agent_version: None,
    };
    server
        .publish_retained(
            &prefix.device(&id, TopicKind::Events).to_string(),
            sign(
                &prefix.device(&id, TopicKind::Events).to_string(),
                &event,
                &key,
            )?,
        )
        .await?;
    server
        .wait_event_matching(
            id.as_str(),
            "the marker event",
            Duration::from_secs(10),
            |e| e["seq"] == 2,
        )
        .await?;
    assert_eq!(
        online_now(&server, &path).await,
        Some(true),
        "a stale will marked it offline"
    );
    // The latest connection's will counts.
    let real = StatusMessage::will(id.clone(), 200);
    server
        .publish_retained(&status_topic, sign(&status_topic, &real, &key)?)
        .await?;
    wait_for(
        "the latest connection's will to mark the device offline",
        Duration::from_secs(5),
        || async { (online_now(&server, &path).await == Some(false)).then_some(()) },
    )
    .await
}

/// 100 simulated devices of which a tenth drop their connection (no
/// goodbye, the broker publishes their will) every second and come back a
/// second later, losing what was in flight: a healthy version still
/// reaches every device, none counted as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_completes_through_offline_churn() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let churn = [
        "--devices",
        "100",
        "--churn-secs",
        "1",
        "--churn-share",
        "0.1",
        "--offline-secs",
        "1",
        // Outcomes come 1.5 s after the desired state, so drops catch
        // devices in the middle of updating.
        "--latency-ms",
        "1500",
    ];
    let _sim = simulated(dir.path(), &server, "sim", &churn)?;
    server.wait_devices_online(90).await?;
    server.push(&digits_model("int8"), "digits", 1);
    server.ctl_json(&[
        "rollout",
        "create",
        "--id",
        "churn",
        "--model",
        "digits",
        "--version",
        "1",
        "--all",
        "--waves",
        "1,10%,50%,100%",
        "--device-timeout-secs",
        "2",
        "--retries",
        "5",
        "--failure-pct",
        "5",
    ]);
    server.ctl_json(&["rollout", "start", "churn"]);
    // While it runs, the fewest devices seen online at once.
    let fewest_online = std::cell::Cell::new(usize::MAX);
    let status = wait_for_showing(
        "the churn rollout to stop running",
        Duration::from_secs(120),
        || async {
            let status = server.ctl_json(&["rollout", "status", "churn", "--brief"]);
            if status["phase"]["phase"] != "running" {
                return Ok(status);
            }
            let online = server.ctl_json(&["devices", "list", "--online", "--limit", "1000"]);
            fewest_online.set(
                fewest_online
                    .get()
                    .min(online.as_array().map_or(0, Vec::len)),
            );
            Err(status)
        },
    )
    .await
    .unwrap_or_else(|timed_out| timed_out.last);
    let fewest_online = fewest_online.get();
    assert_eq!(status["phase"]["phase"], "completed", "{status}");
    assert_eq!(status["counts"]["confirmed"], 100, "{status}");
    assert!(
        fewest_online < 100,
        "no device was seen offline: the churn did not happen"
    );
    Ok(())
}
