//! The whole path: fleetctl pushes the example model, deploys it to the
//! fleet, two real agents download, verify and serve it over their Unix
//! sockets with correct predictions.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use edgefleet_tests::{digits_model, fleetctl, samples, Agent, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_serve_correct_predictions_after_a_push() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agents = [
        Agent::start_fleet(dir.path(), "pi-berlin-1", &server)?,
        Agent::start_fleet(dir.path(), "jetson-lyon-2", &server)?,
    ];

    let model = digits_model("int8");
    let out = server.ctl(&[
        "model",
        "push",
        model.to_str().unwrap(),
        "--name",
        "digits",
        "--version",
        "1",
    ]);
    assert!(
        out.status.success(),
        "push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pushed digits v1"));

    // Deploy fleet-wide; devices may register before or after this.
    server.deploy("digits", 1, "--all");

    for agent in &agents {
        let device = server.wait_for_model(&agent.id, "digits", 1).await?;
        // The status names the runtime the agent chose: tract in the static
        // build, ONNX Runtime when the native build finds the library.
        let runtime = device["models"][0]["runtime"].as_str().unwrap().to_string();
        assert!(
            ["tract-onnx", "onnxruntime"].contains(&runtime.as_str()),
            "{runtime}"
        );
        let (_, meta) = agent
            .request(http::Method::GET, "/v2/models/digits", None)
            .await?;
        assert_eq!(meta["parameters"]["runtime"], runtime.as_str());
        let trials = meta["parameters"]["runtime_trials"].as_array().unwrap();
        assert!(
            trials
                .iter()
                .any(|t| t["runtime"] == runtime.as_str() && t["status"] != "failed"),
            "{trials:?}"
        );
    }

    let s = samples();
    for agent in &agents {
        for i in 0..8 {
            let predicted = agent.classify(&s.inputs[i]).await?;
            assert_eq!(predicted, s.labels[i], "{} sample {i}", agent.id);
        }
        let (status, meta) = agent
            .request(http::Method::GET, "/v2/models/digits", None)
            .await?;
        assert!(status.is_success());
        assert_eq!(meta["versions"][0], "1");
        assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 64]));
    }

    // The CLI lists both devices with the version they report.
    let out = server.ctl(&["devices"]);
    let table = String::from_utf8_lossy(&out.stdout);
    for agent in &agents {
        let line = table
            .lines()
            .find(|l| l.starts_with(&agent.id))
            .expect("device listed");
        assert!(
            line.contains("online") && line.contains("digits v1"),
            "{line}"
        );
    }
    let out = server.ctl(&["--json", "events", "pi-berlin-1"]);
    let events: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"accepted") && kinds.contains(&"activated"),
        "{kinds:?}"
    );

    // A second version replaces the first on one device only.
    server.push(&digits_model("fp32"), "digits", 2);
    server.deploy("digits", 2, "pi-berlin-1");
    server.wait_for_model("pi-berlin-1", "digits", 2).await?;
    assert_eq!(agents[0].classify(&s.inputs[9]).await?, s.labels[9]);
    let other = server.get_json("/api/v1/devices/jetson-lyon-2").await?;
    assert_eq!(
        other["models"][0]["version"], 1,
        "the other device is untouched"
    );

    // Clean shutdown: SIGTERM → exit 0, and the server sees the device offline.
    let mut agents = agents;
    let status = agents[1]
        .proc
        .terminate(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "{status}");
    edgefleet_tests::wait_for("device offline", Duration::from_secs(20), || async {
        let d = server
            .get_json("/api/v1/devices/jetson-lyon-2")
            .await
            .ok()?;
        (d["online"] == false).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetctl_reports_errors_with_exit_codes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    // Deploying a model that was never pushed: the server refuses (exit 1).
    let out = server.ctl(&["deploy", "--model", "nope", "--version", "3", "--all"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    // A file with no known extension: local usage error (exit 2).
    let junk = dir.path().join("model.bin");
    std::fs::write(&junk, b"x")?;
    let out = server.ctl(&[
        "model",
        "push",
        junk.to_str().unwrap(),
        "--name",
        "m",
        "--version",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // Pushing different bytes under an existing version is a conflict.
    let a = digits_model("int8");
    let b = digits_model("fp32");
    assert!(server
        .ctl(&[
            "model",
            "push",
            a.to_str().unwrap(),
            "--name",
            "m",
            "--version",
            "1"
        ])
        .status
        .success());
    let out = server.ctl(&[
        "model",
        "push",
        b.to_str().unwrap(),
        "--name",
        "m",
        "--version",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // No server at all: exit 3.
    let out = fleetctl("http://127.0.0.1:9", &["devices"]);
    assert_eq!(out.status.code(), Some(3));
    Ok(())
}
