//! Crash safety of updates: the agent is killed with SIGKILL at random
//! moments while it downloads, installs, loads and activates new versions.
//! After every restart it must serve a complete, correct model (the old
//! version or the new one, never nothing) and go on to the desired one.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use edgefleet_tests::{digits_model, samples, wait_for, Agent, Server};

const TRIALS: u64 = 30;

fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The version the agent serves now, if it serves one.
async fn serving_version(agent: &Agent) -> Option<u64> {
    agent.serving_version().await.ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_updates_never_leaves_the_device_without_a_model() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    // Versions alternate between the two files, so each update really
    // downloads, installs and loads a different model.
    for v in 1..=TRIALS + 1 {
        let variant = if v % 2 == 1 { "int8" } else { "fp32" };
        server.push(&digits_model(variant), "digits", v);
    }
    let mut agent = Agent::start_fleet(dir.path(), "crashy", &server)?;
    server.deploy("digits", 1, "crashy");
    server.wait_for_model("crashy", "digits", 1).await?;

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    eprintln!("update crash test seed {seed}");
    let s = samples();
    let mut killed_mid_update = 0;
    for trial in 1..=TRIALS {
        let target = trial + 1;
        server.deploy("digits", target, "crashy");
        // With this small model an update (receive, download, install,
        // load, test, activate) takes 10-30 ms here: kill anywhere in it,
        // or just before it starts.
        let delay = Duration::from_micros(next_rand(&mut seed) % 40_000);
        tokio::time::sleep(delay).await;
        let _ = agent.proc.child.kill();
        let _ = agent.proc.child.wait();
        // Where the update was when the process died, from its files.
        let data = agent.dir.join("data");
        let active: Option<u64> = std::fs::read(data.join("models/digits/active"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["version"].as_u64());
        let staged = std::fs::read_dir(data.join("staging")).map_or(0, |d| d.count());
        let installing = std::fs::read_dir(data.join("models/digits"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".installing"))
            })
            .unwrap_or(false);
        let phase = match (active == Some(target), staged > 0, installing) {
            (true, _, _) => "after activation",
            (false, true, _) => "mid-download",
            (false, _, true) => "mid-install",
            (false, false, false) => "before download or while loading",
        };
        if active != Some(target) {
            killed_mid_update += 1;
        }

        agent = Agent::start_fleet(dir.path(), "crashy", &server)?;
        let started = Instant::now();
        // Serving again as soon as it is ready, with a whole model: the
        // previous version or the new one.
        agent.wait_ready().await?;
        let version = wait_for(
            "a model served after restart",
            Duration::from_secs(20),
            || serving_version(&agent),
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "trial {trial} (seed {seed}): {e}\n{}",
                agent.proc.log_text()
            )
        })?;
        assert!(
            version == target || version == target - 1,
            "trial {trial}: serving v{version}, expected v{} or v{target}",
            target - 1
        );

        let i = trial as usize % s.inputs.len();
        assert_eq!(
            agent.classify(&s.inputs[i]).await?,
            s.labels[i],
            "trial {trial}"
        );
        // And it converges on the desired version.
        wait_for(
            &format!("v{target} after trial {trial}"),
            Duration::from_secs(30),
            || async { (serving_version(&agent).await? == target).then_some(()) },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.proc.log_text()))?;
        eprintln!(
            "trial {trial}: killed after {delay:?} ({phase}), served v{version} on restart, v{target} after {:?}",
            started.elapsed()
        );
    }
    // The store holds the active and the previous version only, and no
    // staging leftovers.
    let versions = std::fs::read_dir(agent.dir.join("data/models/digits"))?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .count();
    assert!(versions <= 2, "{versions} version directories kept");
    let staging = std::fs::read_dir(agent.dir.join("data/staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staging, 0, "staging files left behind");
    eprintln!("{killed_mid_update} of {TRIALS} kills came before the new version was active");
    assert!(
        killed_mid_update >= TRIALS / 5,
        "too few kills landed inside an update ({killed_mid_update}); the delays need tuning"
    );
    Ok(())
}
