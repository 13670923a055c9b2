//! The dashboard in a real headless Chromium: a fleet server (embedded
//! broker, SQLite) with 1,000 enrolled devices simulated by fleet-sim over
//! MQTT, then `tests/browser/dashboard.test.mjs` drives Debian's
//! `chromium` through playwright-core: log in, the overview of the whole
//! fleet (and its 1-second budget), the devices table and a device page's
//! charts, a rollout created, started and paused from the UI, a read-only
//! operator without buttons, and actions refused without a session or its
//! CSRF token. Screenshots go to `docs/screenshots/`.
//!
//! Needs `node` and `chromium` and `npm ci` in `tests/browser`
//! (`./scripts/test` installs all three); elsewhere, set `CHROMIUM` to a
//! Chromium or Chrome binary.

use std::path::PathBuf;
use std::time::Duration;

use edgefleet_tests::{digits_model, json_output, repo_root, wait_for, Server};
use serde_json::json;

const DEVICES: usize = 1000;
const HARDWARE: [&str; 3] = ["rpi4", "rpi-zero2", "jetson-orin"];

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_in_headless_chromium() -> anyhow::Result<()> {
    let browser_dir = repo_root().join("tests/browser");
    anyhow::ensure!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in tests/browser (./scripts/test does)"
    );
    anyhow::ensure!(
        chromium().exists(),
        "no Chromium at {}: install Debian's `chromium` (./scripts/test does) or set CHROMIUM",
        chromium().display()
    );
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let read = json_output(&server.ctl(&[
        "--json", "tokens", "create", "--name", "viewer", "--scope", "read",
    ]));
    let read_token = read["token"].as_str().unwrap().to_string();

    // Enroll the fleet: three hardware classes, a site tag.
    let client = reqwest::Client::new();
    let enroll = |i: usize| {
        let client = client.clone();
        let (url, token) = (server.url.clone(), server.token.clone());
        async move {
            let body = json!({
                "id": format!("sim-{i:05}"),
                "hardware": HARDWARE[match i % 10 { 0..=4 => 0, 5..=7 => 1, _ => 2 }],
                "tags": {"site": if i % 4 == 0 { "lab" } else { "field" }},
            });
            let r = client
                .post(format!("{url}/api/v1/devices"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await?;
            anyhow::ensure!(r.status().is_success(), "enroll {i}: {}", r.status());
            anyhow::Ok(())
        }
    };
    for chunk in (0..DEVICES).collect::<Vec<_>>().chunks(50) {
        futures_util::future::try_join_all(chunk.iter().map(|&i| enroll(i))).await?;
    }
    server.push(&digits_model("int8"), "digits", 1);
    server.push(&digits_model("fp32"), "digits", 2);

    let mut sim = std::process::Command::new(edgefleet_tests::binary("fleet-sim"));
    sim.arg("--root")
        .arg(server.root_document())
        .args(["--mqtt", &server.mqtt_url])
        .args(["--topic-prefix", &server.topic_prefix])
        .args(["--devices", &DEVICES.to_string()])
        .args(["--telemetry-secs", "2", "--inferences", "40"])
        .args(["--trouble-share", "0.03", "--latency-ms", "500"]);
    let _sim = edgefleet_tests::Proc::spawn(sim, dir.path().join("sim.log"))?;
    wait_for("the whole fleet online", Duration::from_secs(60), || {
        let client = client.clone();
        let (url, token) = (server.url.clone(), server.token.clone());
        async move {
            let devices: Vec<serde_json::Value> = client
                .get(format!("{url}/api/v1/devices?online=true&limit=1000"))
                .bearer_auth(token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (devices.len() >= DEVICES).then_some(())
        }
    })
    .await?;
    // A few telemetry rounds, so charts have lines.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let shots = std::env::var_os("SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("docs/screenshots"));
    let out = tokio::process::Command::new("node")
        .arg("--test")
        .arg("--test-reporter=spec")
        .arg("dashboard.test.mjs")
        .current_dir(&browser_dir)
        .env("EDGEFLEET_URL", &server.url)
        .env("EDGEFLEET_ADMIN_TOKEN", &server.token)
        .env("EDGEFLEET_READ_TOKEN", &read_token)
        .env("EDGEFLEET_DEVICES", DEVICES.to_string())
        .env("CHROMIUM", chromium())
        .env("SCREENSHOT_DIR", &shots)
        .output()
        .await?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    anyhow::ensure!(
        out.status.success(),
        "browser tests failed ({}):\n{report}\nserver log:\n{}",
        out.status,
        server
            .proc
            .log_text()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
