//! Key rotation and revocation end to end: `fleetctl keys rotate` and
//! `fleetctl keys revoke` write the next root documents, the restarted
//! server publishes the chain and re-signs desired state, and devices walk
//! the chain forward, both while online and after coming back from
//! offline. A retired key's signature is refused and reported and changes
//! nothing; a chain an attacker overwrote on the broker is put back by the
//! server.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgefleet_shared::{DesiredState, Signed};
use edgefleet_tests::{binary, digits_model, samples, wait_for, Agent, Server};

const WAIT: Duration = Duration::from_secs(30);

fn fleetctl_keys(keys_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(binary("fleetctl"))
        .arg("keys")
        .args(args)
        .arg("--dir")
        .arg(keys_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keys {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn trusted_root_version(agent: &Agent) -> Option<u64> {
    let bytes = std::fs::read(agent.dir.join("data/trust/root.json")).ok()?;
    Signed::from_json(&bytes).ok()?.signed["version"].as_u64()
}

/// How often the agent has logged that it believes the server is online
/// from its signed status.
fn trusted_statuses(agent: &Agent) -> usize {
    agent
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("fleet server status") && l.contains("online=true"))
        .count()
}

async fn wait_root(agent: &Agent, version: u64) -> anyhow::Result<()> {
    wait_for(
        &format!("{} at root v{version}", agent.id),
        WAIT,
        || async { (trusted_root_version(agent)? == version).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.proc.log_text()))
}

fn retired_keys(keys_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut keys: Vec<_> = std::fs::read_dir(keys_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".retired.key"))
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_follow_rotations_online_and_after_being_offline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = Server::start(dir.path()).await?;
    for (v, variant) in [(1, "int8"), (2, "fp32"), (3, "int8")] {
        server.push(&digits_model(variant), "digits", v);
    }
    let online = Agent::start_fleet(dir.path(), "rot-online", &server)?;
    let mut offline = Agent::start_fleet(dir.path(), "rot-offline", &server)?;
    server.deploy("digits", 1, "--all");
    server.wait_for_model("rot-online", "digits", 1).await?;
    server.wait_for_model("rot-offline", "digits", 1).await?;
    // One device goes dark before the rotations.
    let _ = offline.proc.child.kill();
    let _ = offline.proc.child.wait();

    // Rotation 1: a new online key. The server is restarted to use it.
    let statuses_before = trusted_statuses(&online);
    server.kill();
    let out = fleetctl_keys(&server.keys_dir, &["rotate"]);
    assert!(out.contains("version 2"), "{out}");
    server.restart().await?;
    wait_root(&online, 2).await?;
    // The restarted server's status is signed by the new key and may
    // arrive before the new root is taken: it is believed once the root
    // is (not only after the agent's next probe proves the server there).
    wait_for(
        "the agent to trust the restarted server's status",
        WAIT,
        || async { (trusted_statuses(&online) > statuses_before).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", online.proc.log_text()))?;
    server.deploy("digits", 2, "rot-online");
    server.wait_for_model("rot-online", "digits", 2).await?;

    // The retired key can no longer move the device.
    let retired = retired_keys(&server.keys_dir);
    assert_eq!(retired.len(), 1);
    let old_key = fleet_server::keys::read_key(&retired[0])?;
    let (_, current) = server.desired("rot-online").await?;
    let mut forged: DesiredState = current.clone();
    forged.version += 10;
    forged.models[0].version = 1;
    server
        .publish_desired("rot-online", Signed::sign(&forged, &[&old_key]).to_json())
        .await?;
    let refusal = server
        .wait_event_matching("rot-online", "refusal of the retired key", WAIT, |e| {
            e["kind"] == "refused" && e["desired_version"] == forged.version
        })
        .await?;
    let reason = refusal["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(old_key.key_id().as_str()) && reason.contains("not trusted"),
        "{reason}"
    );
    assert_eq!(online.serving_version().await.ok().as_deref(), Some("2"));

    // Rotation 2: the current online key is revoked (as if stolen).
    server.kill();
    let online_key = fleet_server::keys::read_key(&server.keys_dir.join("online.key"))?;
    let out = fleetctl_keys(&server.keys_dir, &["revoke", online_key.key_id().as_str()]);
    assert!(out.contains("version 3"), "{out}");
    server.restart().await?;
    wait_root(&online, 3).await?;
    server.deploy("digits", 3, "rot-online");
    server.wait_for_model("rot-online", "digits", 3).await?;

    // An attacker with broker access replaces the retained chain with one
    // that skips version 2: the server sees it and puts the true chain
    // back, so the dark device coming back walks 1 → 2 → 3 and applies
    // what was deployed while it was away. (A device that met the skipping
    // chain would refuse it: the chain walk's unit tests.)
    server.deploy("digits", 2, "rot-offline");
    let keys = &server.keys_dir;
    let skipping: Vec<Signed> = [1, 3]
        .iter()
        .map(|v| Signed::from_json(&std::fs::read(keys.join(format!("roots/{v}.json"))).unwrap()))
        .collect::<Result<_, _>>()?;
    server
        .publish_retained(&server.roots_topic(), serde_json::to_vec(&skipping)?)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    offline = Agent::start_fleet(dir.path(), "rot-offline", &server)?;
    offline.wait_ready().await?;
    wait_root(&offline, 3)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", offline.proc.log_text()))?;
    server
        .wait_for_model("rot-offline", "digits", 2)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", offline.proc.log_text()))?;
    let log = server.proc.log_text();
    assert!(
        log.contains("the retained root chain was overwritten"),
        "{log}"
    );
    let s = samples();
    for agent in [&online, &offline] {
        for i in 0..3 {
            assert_eq!(agent.classify(&s.inputs[i]).await?, s.labels[i]);
        }
    }
    Ok(())
}
