//! Offline-first: the broker goes away while the agent keeps serving and
//! producing telemetry and uploaded results; when it is back, every record
//! reaches the server's store exactly once, in order per stream.
//!
//! Two outages: the fleet server with its embedded broker killed and
//! restarted, and the network to an external broker (Mosquitto, address
//! from `EDGEFLEET_TEST_MQTT_URL`, default `mqtt://127.0.0.1:1883`) cut by
//! a proxy. Plus the overflow policy under a small cap.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use anyhow::Context;
use edgefleet_tests::proxy::Proxy;
use edgefleet_tests::{
    digits_model, samples, shared_broker_url, wait_for, wait_for_showing, Agent, Server,
};
use serde_json::Value;

fn agent_extra(results_policy: &str) -> String {
    format!(
        "[telemetry]\ninterval_ms = 200\n[display]\nkind = \"png\"\npath = \"status.png\"\nrefresh_ms = 100\n{results_policy}[[models]]\nname = \"digits\"\npath = \"{}\"\nupload_results = true\n",
        digits_model("fp32").display()
    )
}

async fn infer_range(agent: &Agent, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    let s = samples();
    for i in range {
        agent
            .infer_as(&format!("r{i}"), &s.inputs[i % s.inputs.len()])
            .await?;
    }
    Ok(())
}

async fn telemetry(server: &Server, device: &str) -> anyhow::Result<Vec<Value>> {
    let v = server
        .get_json(&format!("/api/v1/devices/{device}/telemetry?limit=5000"))
        .await?;
    Ok(v["telemetry"].as_array().context("no telemetry")?.clone())
}

/// Waits until the server holds at least as many results as `want`, then
/// checks they are exactly `want`, in order.
async fn expect_results(server: &Server, device: &str, want: &[String]) -> anyhow::Result<()> {
    let got = wait_for_showing(
        &format!("{} results of {device}", want.len()),
        Duration::from_secs(30),
        || async {
            match server.result_ids(device).await {
                Ok(got) if got.len() >= want.len() => Ok(got),
                Ok(got) => Err(format!("the server has {got:?}")),
                Err(e) => Err(format!("no results: {e:#}")),
            }
        },
    )
    .await?;
    assert_eq!(got, want, "every result once, in order");
    Ok(())
}

/// The agent's and the restarted server's notable log lines, for failures.
fn logs(agent: &Agent, server: &Server) -> String {
    let notable = |text: String| -> String {
        text.lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("INFO"))
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "agent log:\n{}\nrestarted server log:\n{}",
        notable(agent.proc.log_text()),
        notable(std::fs::read_to_string(server.dir.join("server-2.log")).unwrap_or_default())
    )
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("r{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_while_the_embedded_broker_is_down_arrive_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let agent = Agent::builder(dir.path(), "off-1", &server)
        .config(&agent_extra(""))
        .start()?;
    agent.wait_ready().await?;
    server.wait_device_online("off-1").await?;
    // Killed right after these: some are in flight (or acknowledged by
    // the broker but not yet stored) when the server dies. The agent
    // deletes a record only on the server's receipt, so none is lost.
    infer_range(&agent, 0..20).await?;

    // The status display (a PNG here) shows the device online...
    let png = agent.dir.join("status.png");
    let online_png = wait_for("status.png", Duration::from_secs(10), || async {
        std::fs::read(&png)
            .ok()
            .filter(|b| b.starts_with(b"\x89PNG"))
    })
    .await?;

    server.kill();
    let outage_start = edgefleet_shared::unix_now();
    infer_range(&agent, 20..60).await?;
    // ...and then offline with a backlog: a different picture.
    wait_for(
        "status.png redrawn offline",
        Duration::from_secs(20),
        || async {
            std::fs::read(&png)
                .ok()
                .filter(|b| b.starts_with(b"\x89PNG") && *b != online_png)
        },
    )
    .await?;
    // Telemetry keeps being sampled into the outbox meanwhile.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let outage_end = edgefleet_shared::unix_now();
    server.restart().await?;

    expect_results(&server, "off-1", &ids(0..60))
        .await
        .with_context(|| logs(&agent, &server))?;
    let samples = telemetry(&server, "off-1").await?;
    let during: Vec<&Value> = samples
        .iter()
        .filter(|t| {
            let at = t["at"].as_u64().unwrap_or(0);
            at > outage_start && at < outage_end
        })
        .collect();
    assert!(
        during.len() >= 3,
        "telemetry sampled during the outage arrived ({} of {})",
        during.len(),
        samples.len()
    );
    // The outbox reported its backlog while offline.
    assert!(
        during
            .iter()
            .any(|t| t["outbox"]["depth"].as_u64().unwrap_or(0) > 0),
        "a sample shows a backlog"
    );
    // And the inference statistics cover the requests.
    let inferred: u64 = samples
        .iter()
        .flat_map(|t| t["models"].as_array().cloned().unwrap_or_default())
        .filter(|m| m["name"] == "digits")
        .map(|m| m["inferences"].as_u64().unwrap_or(0))
        .sum();
    // Requests since the last sample may not be reported yet.
    assert!((40..=60).contains(&inferred), "{inferred}");
    let last = samples.last().unwrap();
    assert!(last["health"]["agent_rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(!last["models"][0]["runtime_trials"]
        .as_array()
        .unwrap()
        .is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_while_the_network_to_mosquitto_is_cut_arrive_once() -> anyhow::Result<()> {
    let url = shared_broker_url()?;
    let (host, port) = edgefleet_shared::broker_url::parse(&url).map_err(anyhow::Error::msg)?;
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .context("broker address")?;
    let dir = tempfile::tempdir()?;
    let server = Server::builder(dir.path())
        .external_broker(&url)
        .start()
        .await?;
    let proxy = Proxy::start(upstream).await?;
    // Client ids are global on a shared broker: unique per run.
    let id = format!("cut-{}", edgefleet_tests::unique_suffix());
    let agent = Agent::builder(dir.path(), &id, &server)
        .mqtt_url(&proxy.url())
        .config(&agent_extra(""))
        .start()?;
    agent.wait_ready().await?;
    server.wait_device_online(&id).await?;
    infer_range(&agent, 0..10).await?;

    proxy.cut();
    // The broker publishes the agent's last will when the link drops.
    wait_for("device offline", Duration::from_secs(20), || async {
        let d = server
            .get_json(&format!("/api/v1/devices/{id}"))
            .await
            .ok()?;
        (d["online"] == false).then_some(())
    })
    .await?;
    infer_range(&agent, 10..50).await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.restore();

    expect_results(&server, &id, &ids(0..50)).await?;
    server.wait_device_online(&id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_results_stream_rejects_new_records_as_configured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let policy =
        "[outbox.results]\nmax_rows = 10\nmax_bytes = 1000000\noverflow = \"reject-new\"\n";
    let agent = Agent::builder(dir.path(), "cap-1", &server)
        .config(&agent_extra(policy))
        .start()?;
    agent.wait_ready().await?;
    server.wait_device_online("cap-1").await?;
    server.kill();
    infer_range(&agent, 0..30).await?;
    server.restart().await?;
    // The first ten were kept, the twenty after them refused.
    expect_results(&server, "cap-1", &ids(0..10))
        .await
        .with_context(|| logs(&agent, &server))?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(server.result_ids("cap-1").await?, ids(0..10));
    // The loss is reported.
    let samples = telemetry(&server, "cap-1").await?;
    let dropped = samples
        .iter()
        .filter_map(|t| t["outbox"]["dropped"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(dropped >= 20, "{dropped}");
    Ok(())
}
