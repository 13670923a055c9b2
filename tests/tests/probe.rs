//! The probe process (agent/src/probe.rs): the real agent binary, run as a
//! child on real model files, judges them as an activation would, and its
//! report reaches the parent as the right outcome.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;

use edgefleet_agent::activation::Failure;
use edgefleet_agent::config::RuntimeConfig;
use edgefleet_agent::probe::{Outcome, Probe, Subject};
use edgefleet_tests::{binary, digits_model, repo_root};
use serde_json::json;
use sha2::{Digest, Sha256};

/// A test vector of the digits model: its first sample, with the expected
/// probabilities moved by `shift`.
fn vector(shift: f64) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("models/digits/samples.json")).unwrap(),
    )
    .unwrap();
    let probs: Vec<f64> = v["fp32_probabilities"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() + shift)
        .collect();
    json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": v["inputs"][0]}],
        "expected": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": probs}],
        "tolerance": 1e-4,
    })
}

/// An installed version as the model store lays it out.
fn install(dir: &Path, model: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let bytes = std::fs::read(model).unwrap();
    std::fs::write(dir.join("model.onnx"), &bytes).unwrap();
    let slot = json!({"name": "digits", "version": 3, "format": "onnx",
        "sha256": hex::encode(Sha256::digest(&bytes)), "size": bytes.len(),
        "urls": ["http://fleet.invalid/m"], "test_vector": vector(0.0)});
    std::fs::write(dir.join("slot.json"), slot.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_judges_models_in_a_child_process() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::new(binary("edgefleet-agent"), &RuntimeConfig::default());
    let fp32 = digits_model("fp32");
    let good = dir.path().join("good.json");
    std::fs::write(&good, vector(0.0).to_string()).unwrap();
    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, vector(0.25).to_string()).unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let file = |path, test_vector, pin| Subject::File {
        path,
        test_vector,
        pin,
    };

    assert_eq!(probe.check(file(&fp32, None, None)).await, Outcome::Passed);
    assert_eq!(
        probe
            .check(file(&fp32, Some(&good), Some("tract-onnx")))
            .await,
        Outcome::Passed
    );
    let out = probe.check(file(&fp32, Some(&wrong), None)).await;
    assert!(
        matches!(&out, Outcome::Failed(Failure::TestVector(r)) if r.contains("probabilities")),
        "{out:?}"
    );
    let out = probe.check(file(&junk, None, None)).await;
    assert!(matches!(&out, Outcome::Failed(Failure::Load(_))), "{out:?}");
    let out = probe
        .check(file(&fp32, None, Some("no-such-runtime")))
        .await;
    assert!(
        matches!(&out, Outcome::Failed(Failure::Load(r)) if r.contains("no-such-runtime")),
        "{out:?}"
    );

    let installed = dir.path().join("models/digits/3");
    install(&installed, &fp32);
    assert_eq!(
        probe.check(Subject::Installed(&installed)).await,
        Outcome::Passed
    );
    // The file no longer matches its signed hash.
    std::fs::write(installed.join("model.onnx"), b"tampered").unwrap();
    let out = probe.check(Subject::Installed(&installed)).await;
    assert!(
        matches!(&out, Outcome::Failed(Failure::Load(r)) if r.contains("sha256")),
        "{out:?}"
    );
}
