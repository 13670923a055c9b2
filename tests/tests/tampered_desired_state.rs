//! A desired state re-signed by a key the root document does not name is
//! refused: the agent reports the refusal and keeps serving what it had.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use edgefleet_shared::{DesiredState, SecretKey, Signed};
use edgefleet_tests::{digits_model, samples, Agent, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_desired_state_signed_by_an_unknown_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agent = Agent::start_fleet(dir.path(), "cam-7", &server)?;
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, "cam-7");
    server.wait_for_model("cam-7", "digits", 1).await?;

    // An attacker with broker access takes the genuine document, points it
    // at their own model, raises the version and re-signs it with their key.
    let genuine: Signed = Signed::from_json(
        &server
            .get("/api/v1/devices/cam-7/desired")
            .await?
            .bytes()
            .await?,
    )?;
    let mut doc: DesiredState = genuine.parse_unverified()?;
    doc.version += 10;
    doc.models[0].version = 99;
    doc.models[0].sha256 = "ab".repeat(32);
    doc.models[0].urls = vec!["http://127.0.0.1:9/evil.onnx".into()];
    let rogue = SecretKey::generate()?;
    let forged = Signed::sign(&doc, &[&rogue]);

    server.publish_desired("cam-7", forged.to_json()).await?;

    let refusal = server
        .wait_event_matching("cam-7", "refusal event", Duration::from_secs(20), |e| {
            e["kind"] == "refused"
        })
        .await?;
    let reason = refusal["reason"].as_str().unwrap();
    assert!(
        reason.contains(rogue.key_id().as_str()) && reason.contains("not trusted"),
        "{reason}"
    );
    assert_eq!(refusal["desired_version"], doc.version);

    // Nothing changed on the device: still v1, still correct.
    let (status, meta) = agent
        .request(http::Method::GET, "/v2/models/digits", None)
        .await?;
    assert!(status.is_success());
    assert_eq!(meta["versions"][0], "1");
    let s = samples();
    assert_eq!(agent.classify(&s.inputs[0]).await?, s.labels[0]);
    let trusted: Signed =
        Signed::from_json(&std::fs::read(agent.dir.join("data/trust/desired.json"))?)?;
    assert_eq!(
        trusted, genuine,
        "the stored trusted document is the genuine one"
    );
    assert!(!agent.proc.log_text().contains("evil.onnx\" downloaded"));
    Ok(())
}
