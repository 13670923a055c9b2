//! The dashboard in a real headless Chromium: a fleet server (embedded
//! broker, SQLite) with 1,000 enrolled devices simulated by fleet-sim over
//! MQTT, then `tests/browser/dashboard.test.mjs` drives Debian's
//! `chromium` through playwright-core: log in, the overview of the whole
//! fleet (and its 1-second budget), the devices table and a device page's
//! charts, a rollout created, started and paused from the UI, a read-only
//! operator without buttons, and actions refused without a session or its
//! CSRF token.
//!
//! Screenshots go to the test's temporary directory, so a test run leaves
//! the tree as it was. `EDGEFLEET_UPDATE_SCREENSHOTS=1` writes them to
//! `docs/screenshots/` instead (the ones the manual shows), and
//! `SCREENSHOT_DIR=DIR` to a directory of your choice.
//!
//! Needs `node` and `chromium` and `npm ci` in `tests/browser`
//! (`./scripts/test` installs all three); elsewhere, set `CHROMIUM` to a
//! Chromium or Chrome binary.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgefleet_tests::{digits_model, json_output, repo_root, wait_for, Server};
use serde_json::json;

const DEVICES: usize = 1000;
const HARDWARE: [&str; 3] = ["rpi4", "rpi-zero2", "jetson-orin"];

/// Where the browser test writes its screenshots (see the module's doc).
fn screenshot_dir(scratch: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("SCREENSHOT_DIR") {
        return PathBuf::from(dir);
    }
    if std::env::var_os("EDGEFLEET_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        return repo_root().join("docs/screenshots");
    }
    scratch.join("screenshots")
}

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
                // Enrolled devices are never pinned on first use: the
                // operator gives each simulated device's key.
                "public_key": fleet_server::device_keys::simulated_device_key(&format!("sim-{i:05}"))
                    .public()
                    .to_hex(),
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
    // The precondition, not the measurement: alone it takes about 10 s on
    // 2 cores, beside another end-to-end test it has taken over 60 s.
    wait_for("the whole fleet online", Duration::from_secs(180), || {
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

    let shots = screenshot_dir(dir.path());
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

/// Sessions at the HTTP level: the login page's refusals, the cookie's
/// attributes, the security headers, CSRF on API calls made with the
/// cookie, and a revoked token ending its sessions.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_sessions_over_http() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let url = |path: &str| format!("{}{path}", server.url);

    let anonymous = client.get(url("/ui/devices?q=a")).send().await?;
    assert_eq!(anonymous.status(), 303);
    assert_eq!(
        anonymous.headers()["location"],
        "/ui/login?next=%2Fui%2Fdevices%3Fq%3Da"
    );
    let login = |token: &str, site: &'static str| {
        client
            .post(url("/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("sec-fetch-site", site)
            .body(format!("token={token}&next=%2Fui%2Fmodels"))
            .send()
    };
    let cross = login(&server.token, "cross-site").await?;
    assert_eq!(cross.status(), 401, "a login posted from another site");
    let bad = login("hunter2", "same-origin").await?;
    assert_eq!(bad.status(), 401);
    assert!(bad.text().await?.contains("not an operator token"));

    let read = json_output(&server.ctl(&[
        "--json", "tokens", "create", "--name", "viewer", "--scope", "read",
    ]));
    let ok = login(read["token"].as_str().unwrap(), "same-origin").await?;
    assert_eq!(ok.status(), 303);
    assert_eq!(ok.headers()["location"], "/ui/models");
    let cookie = ok.headers()["set-cookie"].to_str()?.to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_string();

    let page = client
        .get(url("/ui/"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str()?;
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let html = page.text().await?;
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_string();
    // Reading with the cookie works; writing needs the CSRF token, and
    // then the token's scope decides.
    let devices = client
        .get(url("/api/v1/devices"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(devices.status(), 200);
    let no_csrf = client
        .post(url("/api/v1/rollouts/r/pause"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(no_csrf.status(), 403);
    let read_only = client
        .post(url("/api/v1/rollouts/r/pause"))
        .header("cookie", &session)
        .header("x-csrf-token", &csrf)
        .send()
        .await?;
    assert_eq!(read_only.status(), 403);
    assert!(read_only.text().await?.contains("has scope read"));
    let missing = client
        .get(url("/ui/devices/no-such-device"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(missing.status(), 404);

    // Revoking the token ends its sessions.
    edgefleet_tests::expect_success(
        &server.ctl(&["tokens", "revoke", read["id"].as_str().unwrap()]),
        "tokens revoke",
    );
    let after = client
        .get(url("/ui/"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(after.status(), 303);
    let api = client
        .get(url("/api/v1/devices"))
        .header("cookie", &session)
        .send()
        .await?;
    assert_eq!(api.status(), 401);
    Ok(())
}
