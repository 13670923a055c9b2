//! Operator tokens over real HTTP and the real `fleetctl`: every API call
//! but health, the root document and artifacts needs a token; scopes are
//! enforced; revocation is immediate; secrets are never stored; operator
//! actions land in the audit log.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use edgefleet_tests::{digits_model, json_output, Server};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_revocation_and_audit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", server.url);

    // Open: health and the public root document.
    for path in ["/api/v1/health", "/api/v1/root"] {
        let resp = http.get(url(path)).send().await?;
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }
    // No token, a malformed one, an unknown one.
    let resp = http.get(url("/api/v1/devices")).send().await?;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: Value = resp.json().await?;
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("missing operator token"),
        "{body}"
    );
    let resp = http
        .get(url("/api/v1/devices"))
        .bearer_auth("hunter2")
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    assert!(resp.text().await?.contains("malformed operator token"));
    let forged = format!("eft_{}_{}", "0".repeat(16), "a".repeat(64));
    let resp = http
        .get(url("/api/v1/devices"))
        .bearer_auth(&forged)
        .send()
        .await?;
    assert_eq!(resp.status(), 401);

    // The admin makes a read and a write token.
    let read = json_output(&server.ctl(&[
        "--json",
        "tokens",
        "create",
        "--name",
        "dashboard",
        "--scope",
        "read",
    ]));
    let write = json_output(&server.ctl(&[
        "--json", "tokens", "create", "--name", "ci", "--scope", "write",
    ]));
    let read_token = read["token"].as_str().unwrap().to_string();
    let write_token = write["token"].as_str().unwrap().to_string();
    assert_eq!(read["scope"], "read");

    let as_token = |token: &str, args: &[&str]| {
        std::process::Command::new(edgefleet_tests::binary("fleetctl"))
            .env("FLEETCTL_SERVER", &server.url)
            .env("EDGEFLEET_TOKEN", token)
            .args(args)
            .output()
            .unwrap()
    };
    // Read may read, not write.
    let devices = as_token(&read_token, &["--json", "devices"]);
    assert!(devices.status.success());
    let model = digits_model("int8");
    let push = [
        "model",
        "push",
        model.to_str().unwrap(),
        "--name",
        "digits",
        "--version",
        "1",
    ];
    let refused = as_token(&read_token, &push);
    assert_eq!(refused.status.code(), Some(4), "exit code 4: not allowed");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("has scope read") && stderr.contains("needs write"),
        "{stderr}"
    );
    // Write may push and deploy, not manage tokens.
    let pushed = as_token(
        &write_token,
        &[&push[..], &["--notes", "first cut, 97% on digits"]].concat(),
    );
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let record = server.get_json("/api/v1/models/digits/versions/1").await?;
    assert_eq!(record["pushed_by"], "ci", "{record}");
    assert_eq!(record["notes"], "first cut, 97% on digits", "{record}");
    let deployed = as_token(
        &write_token,
        &[
            "deploy",
            "--model",
            "digits",
            "--version",
            "1",
            "--device",
            "pi-1",
        ],
    );
    assert!(deployed.status.success());
    assert_eq!(
        as_token(&write_token, &["tokens", "list"]).status.code(),
        Some(4)
    );

    // Revocation is immediate.
    let id = read["id"].as_str().unwrap();
    assert!(server.ctl(&["tokens", "revoke", id]).status.success());
    let resp = http
        .get(url("/api/v1/devices"))
        .bearer_auth(&read_token)
        .send()
        .await?;
    assert_eq!(resp.status(), 401, "a revoked token is refused at once");
    let tokens = json_output(&server.ctl(&["--json", "tokens", "list"]));
    let listed = tokens.as_array().unwrap();
    assert!(listed
        .iter()
        .all(|t| t.get("token").is_none() && t.get("hash").is_none()));
    assert!(listed
        .iter()
        .any(|t| t["id"] == id && t["revoked_at"].is_u64()));

    // Only hashes are stored: no secret appears in the database files.
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(server.dir.join("server"))? {
        let path = entry?.path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("fleet.db")
        {
            stored.extend(std::fs::read(path)?);
        }
    }
    for token in [&read_token, &write_token, &server.token] {
        let secret = token.rsplit('_').next().unwrap();
        assert!(
            !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a token secret is stored in the database"
        );
    }

    // The audit log names who did what.
    let audit = json_output(&server.ctl(&["--json", "audit"]));
    let actions: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actor"].as_str().unwrap().to_string(),
                a["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("bootstrap-admin", "token.create"),
        ("bootstrap-admin", "token.create"),
        ("ci", "model.push"),
        ("ci", "deploy"),
        ("bootstrap-admin", "token.revoke"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(actions, expected);
    assert_eq!(audit[2]["target"], "digits@1");
    assert_eq!(audit[3]["detail"]["devices"][0], "pi-1");
    Ok(())
}

/// `GET /metrics` needs a read token and counts devices, MQTT messages,
/// ingested records and API calls of a live fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_devices_messages_and_calls() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let agent = edgefleet_tests::Agent::builder(dir.path(), "metered-1", &server)
        .config("[telemetry]\ninterval_ms = 200\n")
        .start()?;
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, "metered-1");
    server.wait_for_model("metered-1", "digits", 1).await?;
    let _ = &agent;

    let resp = reqwest::get(format!("{}/metrics", server.url)).await?;
    assert_eq!(resp.status(), 401, "metrics need a token");
    // Telemetry arrives every 200 ms; wait for some to be stored. The
    // checks below run on the last scrape either way.
    let scrape = || async {
        let text = server.get("/metrics").await?.text().await?;
        anyhow::Ok(text)
    };
    let ingested = |text: &str| {
        text.contains("edgefleet_ingest_records_total{result=\"new\"}")
            && !text.contains("edgefleet_ingest_records_total{result=\"new\"} 0")
    };
    let text = match edgefleet_tests::wait_for_showing(
        "ingested telemetry in the metrics",
        std::time::Duration::from_secs(5),
        || async {
            match scrape().await {
                Ok(text) if ingested(&text) => Ok(text),
                other => Err(other),
            }
        },
    )
    .await
    {
        Ok(text) => text,
        Err(timed_out) => timed_out.last?,
    };
    // fleetctl reads the same device: detail, telemetry lines, results.
    let show = server.ctl(&["devices", "show", "metered-1"]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains("online") && show.contains("digits v1"),
        "{show}"
    );
    let telemetry = server.ctl(&["devices", "telemetry", "metered-1", "--limit", "3"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&telemetry.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect();
    assert!(!lines.is_empty() && lines.len() <= 3, "{lines:?}");
    assert!(lines
        .iter()
        .all(|r| r["device_id"] == "metered-1" && r["received_at"].is_u64()));
    let results = server.ctl(&["--json", "devices", "results", "metered-1"]);
    let results: Value = serde_json::from_slice(&results.stdout)?;
    assert_eq!(results["results"], serde_json::json!([]));
    for expected in [
        "edgefleet_devices{state=\"online\"} 1",
        "edgefleet_mqtt_messages_received_total{kind=\"status\"}",
        "edgefleet_mqtt_messages_received_total{kind=\"telemetry\"}",
        "edgefleet_mqtt_messages_published_total{kind=\"desired\"}",
        "edgefleet_mqtt_messages_published_total{kind=\"receipts\"}",
        "edgefleet_ingest_lag_seconds_count",
        "route=\"/api/v1/devices/{id}\",status=\"200\"",
        "route=\"/metrics\",status=\"401\"",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    Ok(())
}
