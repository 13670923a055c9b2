//! Drift monitoring end to end: fleetctl pushes the digits model with a
//! reference made from the repository's samples, a real agent serves it
//! and reports drift statistics in the reference's bins every telemetry
//! interval. In-distribution digits keep the device's score under the
//! alert threshold; inverted digits (16 - x) push it over within a few
//! intervals, and the API, `/metrics` and the dashboard's models page
//! say so.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use edgefleet_tests::{digits_model, samples, Agent, Server};
use serde_json::{json, Value};

/// The server's default alert threshold.
const THRESHOLD: f64 = 0.25;
/// The agent's telemetry interval.
const INTERVAL_MS: u64 = 1000;

/// The device's latest score and the fleet's, from the drift API.
async fn scores(
    server: &Server,
    device: &str,
) -> anyhow::Result<(Option<f64>, Option<f64>, Value)> {
    let drift = server.get_json("/api/v1/models/digits/drift").await?;
    let v = &drift["versions"][0];
    let device_psi = v["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["device"] == device))
        .and_then(|d| d["score"]["psi"].as_f64());
    Ok((device_psi, v["fleet"]["psi"].as_f64(), drift))
}

/// Sends `inputs` through the agent, round after round, until `until`.
async fn send_until(agent: &Agent, inputs: &[Vec<f64>], until: Instant) -> anyhow::Result<u64> {
    let mut sent = 0;
    while Instant::now() < until {
        for pixels in inputs {
            agent.classify(pixels).await?;
            sent += 1;
        }
    }
    Ok(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_crosses_the_threshold_after_the_inputs_shift() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agent = Agent::builder(dir.path(), "pi-drift-1", &server)
        .config(&format!("[telemetry]\ninterval_ms = {INTERVAL_MS}\n"))
        .start()?;

    // The reference file, from the samples the repository ships.
    let s = samples();
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(
        edgefleet_tests::repo_root().join("models/digits/samples.json"),
    )?)?;
    let reference = json!({
        "samples": s.inputs.iter().zip(raw["fp32_probabilities"].as_array().unwrap()).map(|(i, p)| json!({
            "inputs": {"input": i},
            "outputs": {"probabilities": p},
        })).collect::<Vec<_>>()
    });
    let reference_path = dir.path().join("reference.json");
    std::fs::write(&reference_path, serde_json::to_vec(&reference)?)?;
    let model = digits_model("fp32");
    let out = server.ctl(&[
        "model",
        "push",
        model.to_str().unwrap(),
        "--name",
        "digits",
        "--version",
        "1",
        "--reference",
        reference_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("drift reference of digits v1 set from file (16 samples)"),
        "{stdout}"
    );
    server.deploy("digits", 1, "--all");
    server.wait_for_model(&agent.id, "digits", 1).await?;
    // The slot the agent got carries the reference's bins.
    let desired = server
        .get_json(&format!("/api/v1/devices/{}/desired", agent.id))
        .await?;
    let features = desired["signed"]["models"][0]["drift"]["features"].clone();
    assert_eq!(features.as_array().map(Vec::len), Some(4), "{desired}");

    // In distribution: the 16 samples over and over for a few intervals;
    // every score seen stays under the threshold.
    let mut before = Vec::new();
    let phase_end = Instant::now() + Duration::from_millis(INTERVAL_MS * 5);
    while Instant::now() < phase_end {
        send_until(
            &agent,
            &s.inputs,
            Instant::now() + Duration::from_millis(300),
        )
        .await?;
        let (device, fleet, _) = scores(&server, &agent.id).await?;
        before.extend(device);
        before.extend(fleet);
    }
    assert!(
        before.len() >= 4,
        "the device reported no drift statistics in five intervals: {before:?}\n{}",
        agent.proc.log_text()
    );
    assert!(
        before.iter().all(|psi| *psi < THRESHOLD),
        "in-distribution scores over the threshold: {before:?}"
    );

    // Inverted digits: over the threshold within a few intervals.
    let inverted: Vec<Vec<f64>> = s
        .inputs
        .iter()
        .map(|x| x.iter().map(|p| 16.0 - p).collect())
        .collect();
    let shifted_at = Instant::now();
    let (device_psi, fleet_psi, drift) = loop {
        send_until(
            &agent,
            &inverted,
            Instant::now() + Duration::from_millis(300),
        )
        .await?;
        let (device, fleet, drift) = scores(&server, &agent.id).await?;
        if device.is_some_and(|p| p >= THRESHOLD) && fleet.is_some_and(|p| p >= THRESHOLD) {
            break (device.unwrap(), fleet.unwrap(), drift);
        }
        assert!(
            shifted_at.elapsed() < Duration::from_millis(INTERVAL_MS * 8),
            "no drift flagged {:?} after the shift: {drift}",
            shifted_at.elapsed()
        );
    };
    assert_eq!(drift["drifting"], true, "{drift}");
    let device = &drift["versions"][0]["devices"][0];
    assert_eq!(device["score"]["drifting"], true);
    // The input mean is what moved (pixels 16 - x).
    let input_mean = device["score"]["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["tensor"] == "input" && f["feature"] == "mean")
        .unwrap();
    assert!(
        input_mean["psi"].as_f64().unwrap() >= THRESHOLD,
        "{input_mean}"
    );
    eprintln!(
        "in distribution: max score {:.4}; shifted: device {device_psi:.3}, fleet {fleet_psi:.3} after {:?}",
        before.iter().copied().fold(0.0, f64::max),
        shifted_at.elapsed()
    );

    // /metrics has the fleet gauge over the threshold.
    let metrics = server.get("/metrics").await?.text().await?;
    let fleet_line = metrics
        .lines()
        .find(|l| {
            l.starts_with("edgefleet_model_drift_psi{")
                && l.contains("model=\"digits\"")
                && l.contains("scope=\"fleet\"")
        })
        .unwrap_or_else(|| panic!("no fleet drift gauge in /metrics:\n{metrics}"));
    let value: f64 = fleet_line.rsplit(' ').next().unwrap().parse()?;
    assert!(value >= THRESHOLD, "{fleet_line}");

    // The dashboard's models page marks the model as drifting.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let login = client
        .post(format!("{}/ui/login", server.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "same-origin")
        .body(format!("token={}&next=%2Fui%2Fmodels", server.token))
        .send()
        .await?;
    let cookie = login.headers()["set-cookie"].to_str()?.to_string();
    let session = cookie.split(';').next().unwrap().to_string();
    let page = client
        .get(format!("{}/ui/models", server.url))
        .header("cookie", &session)
        .send()
        .await?
        .text()
        .await?;
    let card = page
        .split("id=\"model-drift\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no drift card on the models page:\n{page}"));
    assert!(card.contains("data-model=\"digits\""), "{card}");
    assert!(card.contains("drifting"), "{card}");
    Ok(())
}
