//! Offline-first: the broker goes away while the agent keeps serving and
//! producing telemetry and uploaded results; when it is back, every record
//! reaches the server's store exactly once, in order per stream.
//!
//! Two outages: the fleet server with its embedded broker killed and
//! restarted, and the network to an external broker (Mosquitto, address
//! from `EDGEFLEET_TEST_MQTT_URL`, default `mqtt://127.0.0.1:1883`) cut by
//! a proxy. Plus the overflow policy under a small cap.

use std::time::Duration;

use anyhow::Context;
use edgefleet_tests::proxy::Proxy;
use edgefleet_tests::{digits_model, samples, wait_for, Agent, Server};
use serde_json::{json, Value};

fn agent_extra(results_policy: &str) -> String {
    format!(
        "[telemetry]\ninterval_ms = 200\n[display]\nkind = \"png\"\npath = \"status.png\"\nrefresh_ms = 100\n{results_policy}[[models]]\nname = \"digits\"\npath = \"{}\"\nupload_results = true\n",
        digits_model("fp32").display()
    )
}

/// One inference with request id `id`.
async fn infer(agent: &Agent, id: &str, pixels: &[f64]) -> anyhow::Result<()> {
    let body = json!({"id": id, "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": pixels}]});
    let (status, reply) = agent
        .request(http::Method::POST, "/v2/models/digits/infer", Some(&body))
        .await?;
    anyhow::ensure!(status.is_success(), "inference failed: {status} {reply}");
    Ok(())
}

async fn infer_range(agent: &Agent, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    let s = samples();
    for i in range {
        infer(agent, &format!("r{i}"), &s.inputs[i % s.inputs.len()]).await?;
    }
    Ok(())
}

/// The request ids of the results the server stored, in sequence order.
async fn stored_results(server: &Server, device: &str) -> anyhow::Result<Vec<String>> {
    let v = server
        .get_json(&format!("/api/v1/devices/{device}/results?limit=5000"))
        .await?;
    let results = v["results"].as_array().context("no results array")?;
    Ok(results
        .iter()
        .map(|r| r["request_id"].as_str().unwrap_or("").to_string())
        .collect())
}

async fn telemetry(server: &Server, device: &str) -> anyhow::Result<Vec<Value>> {
    let v = server
        .get_json(&format!("/api/v1/devices/{device}/telemetry?limit=5000"))
        .await?;
    Ok(v["telemetry"].as_array().context("no telemetry")?.clone())
}

async fn wait_online(server: &Server, device: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("{device} online"),
        Duration::from_secs(30),
        || async {
            let d = server
                .get_json(&format!("/api/v1/devices/{device}"))
                .await
                .ok()?;
            (d["online"] == true).then_some(())
        },
    )
    .await
}

/// Waits until the server holds exactly `want` results, then checks them.
async fn expect_results(server: &Server, device: &str, want: &[String]) -> anyhow::Result<()> {
    let got = wait_for(
        &format!("{} results of {device}", want.len()),
        Duration::from_secs(30),
        || async {
            let got = stored_results(server, device).await.ok()?;
            (got.len() >= want.len()).then_some(got)
        },
    )
    .await
    .with_context(|| {
        format!(
            "the server has {:?}",
            futures_lite_block(stored_results(server, device))
        )
    });
    let got = got?;
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

/// Runs a future to completion from a sync closure (error reporting only).
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

fn ids(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("r{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_while_the_embedded_broker_is_down_arrive_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let agent = Agent::start_fleet_with(dir.path(), "off-1", &server, None, &agent_extra(""))?;
    agent.wait_ready().await?;
    wait_online(&server, "off-1").await?;
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
    let url =
        std::env::var("EDGEFLEET_TEST_MQTT_URL").unwrap_or_else(|_| "mqtt://127.0.0.1:1883".into());
    let (host, port) = edgefleet_shared::broker_url::parse(&url).map_err(anyhow::Error::msg)?;
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .context("broker address")?;
    if std::net::TcpStream::connect(upstream).is_err() {
        anyhow::bail!(
            "no MQTT broker at {url}: start Mosquitto there or set EDGEFLEET_TEST_MQTT_URL"
        );
    }
    let dir = tempfile::tempdir()?;
    let server = Server::start_external(dir.path(), &url).await?;
    let proxy = Proxy::start(upstream).await?;
    let id = format!("cut-{}", std::process::id());
    let agent = Agent::start_fleet_with(
        dir.path(),
        &id,
        &server,
        Some(&proxy.url()),
        &agent_extra(""),
    )?;
    agent.wait_ready().await?;
    wait_online(&server, &id).await?;
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
    wait_online(&server, &id).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_results_stream_rejects_new_records_as_configured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    let policy =
        "[outbox.results]\nmax_rows = 10\nmax_bytes = 1000000\noverflow = \"reject-new\"\n";
    let agent = Agent::start_fleet_with(dir.path(), "cap-1", &server, None, &agent_extra(policy))?;
    agent.wait_ready().await?;
    wait_online(&server, "cap-1").await?;
    server.kill();
    infer_range(&agent, 0..30).await?;
    server.restart().await?;
    // The first ten were kept, the twenty after them refused.
    expect_results(&server, "cap-1", &ids(0..10))
        .await
        .with_context(|| logs(&agent, &server))?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(stored_results(&server, "cap-1").await?, ids(0..10));
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
