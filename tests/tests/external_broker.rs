//! The same push → deploy → serve flow on an external broker (Mosquitto).
//!
//! The broker's address comes from `EDGEFLEET_TEST_MQTT_URL` (`.ci/run`
//! sets `mqtt://127.0.0.1:1883`, where this machine kind runs Mosquitto;
//! elsewhere, start one with `mosquitto -p 1883` or point the variable at
//! yours). The test fails, saying so, when the broker is unreachable.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use edgefleet_tests::{digits_model, samples, shared_broker_url, unique_suffix, Agent, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_serve_through_mosquitto() -> anyhow::Result<()> {
    let url = shared_broker_url()?;
    let dir = tempfile::tempdir()?;
    let server = Server::builder(dir.path())
        .external_broker(&url)
        .start()
        .await?;
    // Client ids are global on a shared broker: make them unique per run.
    let id = format!("mosq-{}", unique_suffix());
    let agent = Agent::start_fleet(dir.path(), &id, &server)?;
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, &id);
    server.wait_for_model(&id, "digits", 1).await?;
    let s = samples();
    for i in 0..4 {
        assert_eq!(agent.classify(&s.inputs[i]).await?, s.labels[i]);
    }
    Ok(())
}

/// The whole flow with both scale-out parts: Mosquitto and PostgreSQL.
/// A restarted server finds the device, its model and the desired state in
/// the database and keeps serving the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_flow_on_postgresql_and_mosquitto() -> anyhow::Result<()> {
    let url = shared_broker_url()?;
    let database = edgefleet_tests::fresh_postgres_database().await?;
    let dir = tempfile::tempdir()?;
    let mut server = Server::builder(dir.path())
        .external_broker(&url)
        .database(&database)
        .start()
        .await?;
    assert!(
        server.proc.log_text().contains("backend=\"postgres\""),
        "the server must say which database it uses"
    );
    let id = format!("pg-{}", unique_suffix());
    let agent = Agent::start_fleet(dir.path(), &id, &server)?;
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, &id);
    server.wait_for_model(&id, "digits", 1).await?;
    let s = samples();
    assert_eq!(agent.classify(&s.inputs[0]).await?, s.labels[0]);

    let before = server.get_json(&format!("/api/v1/devices/{id}")).await?;
    server.restart().await?;
    let device = server.get_json(&format!("/api/v1/devices/{id}")).await?;
    assert!(before["desired_version"].as_u64() >= Some(1), "{before}");
    assert_eq!(
        device["desired_version"], before["desired_version"],
        "{device}"
    );
    let models = server.get_json("/api/v1/models").await?;
    assert_eq!(models[0]["name"], "digits", "{models}");
    let desired = server
        .get_json(&format!("/api/v1/devices/{id}/desired"))
        .await?;
    assert_eq!(
        desired["signed"]["version"], before["desired_version"],
        "{desired}"
    );
    server.push(&digits_model("fp32"), "digits", 2);
    server.deploy("digits", 2, &id);
    server.wait_for_model(&id, "digits", 2).await?;
    assert_eq!(agent.classify(&s.inputs[1]).await?, s.labels[1]);
    Ok(())
}
