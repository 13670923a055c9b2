//! Model quality in the field, end to end with real agents and the real
//! fleet server: a rollout whose candidate disagrees with the served
//! version is stopped by its shadow gate before any device serves it, and
//! the reason names the agreement measured; a faithful candidate passes
//! the gate wave by wave and is served everywhere. An A/B split serves
//! its share of client keys, each key always by the same version, with
//! per-variant figures in the API, and promoting a variant ends it.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use edgefleet_tests::{digits_model, test_set, wait_for_showing, Agent, Server};
use serde_json::{json, Value};

/// Telemetry interval of the agents here: shadow figures reach the
/// server this often.
const TELEMETRY: &str = "[telemetry]\ninterval_ms = 500\n";

async fn agents(
    dir: &std::path::Path,
    server: &Server,
    ids: &[&str],
) -> anyhow::Result<Vec<Agent>> {
    let mut agents = Vec::new();
    for id in ids {
        agents.push(Agent::builder(dir, id, server).config(TELEMETRY).start()?);
    }
    server.push(&digits_model("fp32"), "digits", 1);
    server.deploy("digits", 1, "--all");
    for id in ids {
        server.wait_for_model(id, "digits", 1).await?;
    }
    Ok(agents)
}

/// Sends in-distribution digits to every agent until `done` says so (or
/// the time is up); returns what `done` returned last.
async fn traffic_until(
    agents: &[Agent],
    what: &str,
    limit: Duration,
    done: impl Fn() -> Result<Value, Value>,
) -> anyhow::Result<Value> {
    let set = test_set();
    let mut i = 0usize;
    let started = std::time::Instant::now();
    loop {
        for a in agents {
            let pixels = &set.inputs[i % set.inputs.len()];
            i += 1;
            a.classify(pixels).await?;
        }
        if i % 40 < agents.len() {
            match done() {
                Ok(v) => return Ok(v),
                Err(last) if started.elapsed() > limit => {
                    anyhow::bail!("{what}: not within {limit:?}; last seen: {last}")
                }
                Err(_) => {}
            }
        }
    }
}

fn phase(server: &Server, id: &str) -> Value {
    server.ctl_json(&["rollout", "status", id, "--brief"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_gate_stops_a_degraded_candidate_and_passes_a_faithful_one() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let ids = ["sh-1", "sh-2", "sh-3"];
    let agents = agents(dir.path(), &server, &ids).await?;
    // v2 has noise on its weights (it picks the fp32 model's class on
    // about 60 % of the test images); v3 is the int8 model (100 %).
    server.push(&digits_model("perturbed"), "digits", 2);
    server.push(&digits_model("int8"), "digits", 3);

    let gate = [
        "--all",
        "--waves",
        "1,100%",
        "--min-shadow-agreement",
        "0.95",
        "--min-shadow-requests",
        "150",
        "--shadow-sample-rate",
        "0.5",
        "--device-timeout-secs",
        "120",
    ];
    let mut create = vec![
        "rollout",
        "create",
        "--id",
        "bad",
        "--model",
        "digits",
        "--version",
        "2",
    ];
    create.extend(gate);
    server.ctl_json(&create);
    server.ctl(&["rollout", "start", "bad"]);
    let paused = traffic_until(
        &agents,
        "rollout bad paused by its shadow gate",
        Duration::from_secs(90),
        || {
            let s = phase(&server, "bad");
            if s["phase"]["phase"] == "paused" {
                Ok(s)
            } else {
                Err(s)
            }
        },
    )
    .await?;
    let reason = paused["phase"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    eprintln!("degraded candidate: {reason}");
    assert!(reason.contains("shadow agreement"), "{paused}");
    let measured: f64 = reason
        .split_whitespace()
        .nth(2)
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no agreement figure in {reason:?}"));
    assert!(
        (0.4..0.85).contains(&measured),
        "the perturbed model agrees on about 60 % of digits; the gate measured {measured}"
    );
    // Nobody ever served v2: every agent still answers with v1, and the
    // fleet's figures show v2 only as a shadow candidate.
    for a in &agents {
        assert_eq!(a.serving_version().await?, "1");
    }
    let quality = server.ctl_json(&["model", "quality", "digits"]);
    assert!(
        quality["versions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["version"] == 1),
        "{quality}"
    );
    let shadow = &quality["shadows"][0];
    assert_eq!(shadow["candidate_version"], 2, "{quality}");
    assert!(shadow["agreement"].as_f64().unwrap() < 0.95, "{quality}");
    server.ctl(&["rollout", "abort", "bad"]);

    // A faithful candidate: both waves shadow it, pass and move.
    let mut create = vec![
        "rollout",
        "create",
        "--id",
        "good",
        "--model",
        "digits",
        "--version",
        "3",
    ];
    create.extend(gate);
    server.ctl_json(&create);
    server.ctl(&["rollout", "start", "good"]);
    let done = traffic_until(
        &agents,
        "rollout good completed",
        Duration::from_secs(120),
        || {
            let s = phase(&server, "good");
            if s["phase"]["phase"] == "completed" {
                Ok(s)
            } else {
                Err(s)
            }
        },
    )
    .await?;
    for id in ids {
        server.wait_for_model(id, "digits", 3).await?;
    }
    eprintln!(
        "faithful candidate: {}",
        server.ctl_json(&["model", "quality", "digits"])
    );
    for a in &agents {
        assert_eq!(a.serving_version().await?, "3", "{done}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ab_split_serves_its_share_sticky_per_client_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agents = agents(dir.path(), &server, &["ab-1"]).await?;
    let agent = &agents[0];
    server.push(&digits_model("int8"), "digits", 2);
    let set = server.ctl_json(&[
        "model",
        "split",
        "digits",
        "--version",
        "2",
        "--share",
        "0.3",
        "--all",
    ]);
    assert_eq!(set["published"].as_array().unwrap().len(), 1, "{set}");
    // The agent loads the variant; until then every request is v1.
    let pixels = &test_set().inputs[0];
    let served_by = |key: String| {
        let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": pixels}], "parameters": {"client_key": key}});
        async move {
            let (status, reply) = agent
                .request(http::Method::POST, "/v2/models/digits/infer", Some(&body))
                .await?;
            anyhow::ensure!(status.is_success(), "{status} {reply}");
            Ok::<_, anyhow::Error>(
                reply["model_version"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    wait_for_showing("the variant served", Duration::from_secs(30), || async {
        for k in 0..20 {
            if served_by(format!("probe-{k}"))
                .await
                .map_err(|e| e.to_string())?
                == "2"
            {
                return Ok(());
            }
        }
        Err("only v1 answers".to_string())
    })
    .await?;

    // 1,000 requests from 100 clients.
    let mut by_key: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    let mut b = 0;
    for i in 0..1000 {
        let key = format!("client-{}", i % 100);
        let v = served_by(key.clone()).await?;
        b += usize::from(v == "2");
        by_key.entry(key).or_default().insert(v);
    }
    assert!(
        by_key.values().all(|v| v.len() == 1),
        "a key moved between versions: {by_key:?}"
    );
    let share = b as f64 / 1000.0;
    eprintln!("variant b served {b} of 1000 requests from 100 keys (share 0.3)");
    // 100 keys at 30 %: the binomial spread of 100 draws is 4.6 points.
    assert!((0.16..=0.44).contains(&share), "variant share {share}");

    // Per-variant figures reach the server.
    let quality = wait_for_showing("per-variant figures", Duration::from_secs(20), || async {
        let q = server.ctl_json(&["model", "quality", "digits"]);
        let total: u64 = q["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| !v["variant"].is_null())
            .map(|v| v["inferences"].as_u64().unwrap_or(0))
            .sum();
        if total >= 1000 {
            Ok(q)
        } else {
            Err(q)
        }
    })
    .await?;
    let count = |variant: &str| {
        quality["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["variant"] == variant)
            .map(|v| v["inferences"].as_u64().unwrap())
            .unwrap_or(0)
    };
    assert!(
        count("b") >= b as u64 && count("a") >= (1000 - b) as u64,
        "{quality}"
    );

    // Promoting b deploys it and ends the split.
    server.ctl_json(&["model", "promote", "digits", "--variant", "b", "--all"]);
    server.wait_for_model("ab-1", "digits", 2).await?;
    for k in 0..20 {
        assert_eq!(served_by(format!("client-{k}")).await?, "2");
    }
    Ok(())
}
