//! Activation and rollback with real models: a version that fails its
//! signed test vector is never served; one that breaches its soak limits is
//! replaced by the previous version; one that soaks cleanly is confirmed;
//! one that keeps the agent from running is rolled back at start.
//!
//! The test plays the operator: it signs desired states with soak
//! policies and test vectors using the server's online key, and publishes
//! them on the server's broker.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use edgefleet_shared::documents::TestTensor;
use edgefleet_shared::{DesiredState, ModelSlot, Signed, SoakPolicy, TestVector};
use edgefleet_tests::{digits_model, samples, Agent, Server};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// A slot for `file` as the server hosts it (pushed before).
fn slot(server: &Server, file: &Path, version: u64) -> ModelSlot {
    let bytes = std::fs::read(file).unwrap();
    let slot = Server::digits_slot(&bytes, version, String::new());
    ModelSlot {
        urls: vec![format!("{}/artifacts/{}", server.url, slot.sha256)],
        ..slot
    }
}

/// Signs a desired state for `device` with `models`, one version above
/// `after`, and publishes it. Returns its version.
async fn publish(server: &Server, device: &str, after: u64, models: Vec<ModelSlot>) -> u64 {
    let now = edgefleet_shared::unix_now();
    let doc = DesiredState::new(
        edgefleet_shared::DeviceId::new(device).unwrap(),
        after + 1,
        now,
        now + 3600,
        models,
    );
    let signed = Signed::sign(&doc, &[&server.online_key()]);
    server
        .publish_desired(device, signed.to_json())
        .await
        .unwrap();
    after + 1
}

async fn assert_classifies(agent: &Agent) -> anyhow::Result<()> {
    let s = samples();
    for i in 0..5 {
        assert_eq!(agent.classify(&s.inputs[i]).await?, s.labels[i]);
    }
    Ok(())
}

async fn start(dir: &Path, device: &str) -> anyhow::Result<(Server, Agent, u64)> {
    let server = Server::start(dir).await?;
    let agent = Agent::start_fleet(dir, device, &server)?;
    server.push(&digits_model("int8"), "digits", 1);
    server.push(&digits_model("fp32"), "digits", 2);
    server.deploy("digits", 1, device);
    server.wait_for_model(device, "digits", 1).await?;
    let (_, genuine) = server.desired(device).await?;
    Ok((server, agent, genuine.version))
}

fn reason(event: &Value) -> &str {
    event["reason"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_test_vectors_and_soak_breaches_leave_the_previous_version_serving(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, agent, mut version) = start(dir.path(), "cam-1").await?;

    // v2 with a test vector whose expected output is wrong: the device
    // must never serve it.
    let (_, reply) = agent
        .request(
            http::Method::POST,
            "/v2/models/digits/infer",
            Some(&serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": samples().inputs[0]}]})),
        )
        .await?;
    let out = &reply["outputs"][0];
    let wrong: Vec<f64> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() + 0.5)
        .collect();
    let mut bad = slot(&server, &digits_model("fp32"), 2);
    bad.test_vector = Some(TestVector {
        inputs: vec![TestTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 64],
            data: samples().inputs[0].clone(),
        }],
        expected: vec![TestTensor {
            name: out["name"].as_str().unwrap().into(),
            datatype: out["datatype"].as_str().unwrap().into(),
            shape: serde_json::from_value(out["shape"].clone())?,
            data: wrong,
        }],
        tolerance: 1e-3,
    });
    version = publish(&server, "cam-1", version, vec![bad]).await;
    let failed = server
        .wait_event("cam-1", "activation_failed", 2, WAIT)
        .await?;
    assert!(reason(&failed).contains("test vector failed"), "{failed}");
    assert_eq!(failed["desired_version"], version);
    assert_eq!(agent.serving_version().await?, "1");
    assert_classifies(&agent).await?;
    let rejected = std::fs::read_to_string(agent.dir.join("data/models/digits/rejected"))?;
    assert!(rejected.contains("test vector failed"), "{rejected}");

    // v3 (the fp32 file again) with a soak limit no real inference can
    // meet: p95 under 1 us. It activates, serves, breaches, and v1 comes
    // back.
    let mut slow = slot(&server, &digits_model("fp32"), 3);
    slow.soak = Some(SoakPolicy {
        secs: 600,
        min_requests: 5,
        max_error_rate: Some(0.5),
        max_error_rate_ratio: None,
        max_p95_us: Some(1),
        max_p95_ratio: None,
    });
    version = publish(&server, "cam-1", version, vec![slow]).await;
    server.wait_event("cam-1", "activated", 3, WAIT).await?;
    assert_eq!(agent.serving_version().await?, "3");
    assert_classifies(&agent).await?; // 5 requests: enough to judge
    let rolled = server.wait_event("cam-1", "rolled_back", 3, WAIT).await?;
    assert!(
        reason(&rolled).contains("p95 latency") && reason(&rolled).contains("limit of 1 us"),
        "{rolled}"
    );
    edgefleet_tests::wait_for("v1 serving again", WAIT, || async {
        (agent.serving_version().await.ok()? == "1").then_some(())
    })
    .await?;
    assert_classifies(&agent).await?;
    let pointer: Value =
        serde_json::from_slice(&std::fs::read(agent.dir.join("data/models/digits/active"))?)?;
    assert_eq!(pointer["version"], 1);
    assert!(pointer.get("soaking").is_none(), "{pointer}");

    // v4 with a short soak and generous limits: confirmed, and no longer
    // watched.
    let mut good = slot(&server, &digits_model("fp32"), 4);
    good.soak = Some(SoakPolicy {
        secs: 1,
        min_requests: 1000,
        max_error_rate: Some(0.01),
        max_error_rate_ratio: Some(2.0),
        max_p95_us: None,
        max_p95_ratio: Some(3.0),
    });
    publish(&server, "cam-1", version, vec![good]).await;
    server.wait_event("cam-1", "confirmed", 4, WAIT).await?;
    assert_eq!(agent.serving_version().await?, "4");
    let pointer: Value =
        serde_json::from_slice(&std::fs::read(agent.dir.join("data/models/digits/active"))?)?;
    assert_eq!(
        (pointer["version"].as_u64(), pointer["previous"].as_u64()),
        (Some(4), Some(1))
    );
    assert!(pointer.get("soaking").is_none(), "{pointer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_keeps_the_agent_down_is_rolled_back_at_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, mut agent, version) = start(dir.path(), "cam-2").await?;
    let mut soaking = slot(&server, &digits_model("fp32"), 2);
    soaking.soak = Some(SoakPolicy {
        secs: 3600,
        min_requests: 20,
        max_error_rate: Some(0.5),
        max_error_rate_ratio: None,
        max_p95_us: None,
        max_p95_ratio: None,
    });
    publish(&server, "cam-2", version, vec![soaking]).await;
    server.wait_event("cam-2", "activated", 2, WAIT).await?;

    // The agent dies (as if the new model crashed it) three times while
    // v2 soaks. The first two restarts keep v2; the third gives up on it.
    for start in 1..=3 {
        let _ = agent.proc.child.kill();
        let _ = agent.proc.child.wait();
        agent = Agent::start_fleet(dir.path(), "cam-2", &server)?;
        agent.wait_ready().await?;
        let expected = if start < 3 { "2" } else { "1" };
        assert_eq!(
            agent.serving_version().await?,
            expected,
            "after start {start}"
        );
    }
    let rolled = server
        .wait_event("cam-2", "rolled_back", 2, WAIT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nagent: {}", agent.proc.log_text()))?;
    assert!(reason(&rolled).contains("restarted 3 times"), "{rolled}");
    assert_classifies(&agent).await?;

    // The rejected version is not installed again on the next start.
    let _ = agent.proc.child.kill();
    let _ = agent.proc.child.wait();
    agent = Agent::start_fleet(dir.path(), "cam-2", &server)?;
    agent.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.serving_version().await?, "1");
    let events = server.events("cam-2").await;
    let activations = events
        .iter()
        .filter(|e| e["kind"] == "activated" && e["model_version"] == 2)
        .count();
    assert_eq!(activations, 1, "{events:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_vectors_pushed_with_fleetctl_are_signed_and_enforced() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agent = Agent::start_fleet(dir.path(), "cam-3", &server)?;
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, "cam-3");
    server.wait_for_model("cam-3", "digits", 1).await?;

    // The fp32 model's true output for one sample, from a standalone agent.
    let reference = Agent::start_standalone(
        &dir.path().join("ref"),
        &[("digits", &digits_model("fp32"))],
    )?;
    reference.wait_ready().await?;
    let input = samples().inputs[2].clone();
    let (_, reply) = reference
        .request(
            http::Method::POST,
            "/v2/models/digits/infer",
            Some(&serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": input}]})),
        )
        .await?;
    let out = &reply["outputs"][0];
    let vector = |data: Vec<f64>| {
        serde_json::json!({
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": input}],
            "expected": [{"name": out["name"], "datatype": out["datatype"], "shape": out["shape"], "data": data}],
            "tolerance": 1e-4,
        })
    };
    let truth: Vec<f64> = serde_json::from_value(out["data"].clone())?;
    let wrong: Vec<f64> = truth.iter().map(|v| 1.0 - v).collect();
    let good_path = dir.path().join("good.json");
    let bad_path = dir.path().join("bad.json");
    let broken_path = dir.path().join("broken.json");
    std::fs::write(&good_path, vector(truth).to_string())?;
    std::fs::write(&bad_path, vector(wrong).to_string())?;
    std::fs::write(&broken_path, vector(vec![0.5; 3]).to_string())?;
    let fp32 = digits_model("fp32");
    // `fleetctl model push` of the fp32 file with a test vector and,
    // optionally, a spec.
    let push_with = |version: &str, tv: &Path, spec: Option<&Path>| {
        let mut args = vec![
            "model",
            "push",
            fp32.to_str().unwrap(),
            "--name",
            "digits",
            "--version",
            version,
            "--test-vector",
            tv.to_str().unwrap(),
        ];
        if let Some(spec) = spec {
            args.extend(["--spec", spec.to_str().unwrap()]);
        }
        server.ctl(&args)
    };
    let push = |version: &str, tv: &Path| push_with(version, tv, None);

    // A malformed vector is refused by the server, with the reason.
    let out3 = push("3", &broken_path);
    assert!(!out3.status.success());
    let stderr = String::from_utf8_lossy(&out3.stderr);
    assert!(
        stderr.contains("3 values") && stderr.contains("test vector was refused"),
        "{stderr}"
    );

    // v2 carries a vector the model cannot meet: the device never serves it.
    assert!(push("2", &bad_path).status.success());
    let listed = server.get_json("/api/v1/models").await?;
    assert!(listed.to_string().contains("\"tolerance\""), "{listed}");
    server.deploy("digits", 2, "cam-3");
    let failed = server
        .wait_event("cam-3", "activation_failed", 2, WAIT)
        .await?;
    assert!(reason(&failed).contains("test vector failed"), "{failed}");
    assert_eq!(agent.serving_version().await?, "1");
    // Once deployed, a version's vector can no longer change.
    let again = push("2", &good_path);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already deployed"));

    // A declared interface travels too: one the model does not have is
    // refused on the device (v5), the true one (v6, with the true test
    // vector) serves.
    let spec = |input: &str| {
        serde_json::json!({
            "inputs": [{"name": input, "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": out["name"], "datatype": out["datatype"], "shape": [-1, 10]}],
        })
        .to_string()
    };
    let wrong_spec = dir.path().join("wrong-spec.json");
    let true_spec = dir.path().join("spec.json");
    std::fs::write(&wrong_spec, spec("pixels"))?;
    std::fs::write(&true_spec, spec("input"))?;
    let push_spec = |version: &str, spec: &Path| push_with(version, &good_path, Some(spec));
    assert!(push_spec("5", &wrong_spec).status.success());
    server.deploy("digits", 5, "cam-3");
    let failed = server
        .wait_event("cam-3", "activation_failed", 5, WAIT)
        .await?;
    assert!(
        reason(&failed).contains("no input \"pixels\" declared in the desired state"),
        "{failed}"
    );
    let (_, desired) = server.desired("cam-3").await?;
    assert_eq!(desired.models[0].inputs[0].shape, vec![-1, 64]);

    // v6 with the true outputs and interface passes on the device and
    // serves.
    assert!(push_spec("6", &true_spec).status.success());
    server.deploy("digits", 6, "cam-3");
    server.wait_for_model("cam-3", "digits", 6).await?;
    let (_, stats) = agent
        .request(http::Method::GET, "/v2/models/digits", None)
        .await?;
    assert_eq!(stats["versions"][0], "6");
    assert_classifies(&agent).await?;
    Ok(())
}
