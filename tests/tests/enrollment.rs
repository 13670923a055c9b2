//! Enrollment end to end: `fleetctl devices enroll` writes a bundle, an
//! agent started from it connects to the embedded broker (device
//! authentication on) and serves what is deployed; wrong, unknown and
//! missing credentials are refused; a revoked device cannot connect again;
//! tags and hardware filter the device list; `fleetctl broker mosquitto`
//! writes files Mosquitto accepts.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use edgefleet_tests::mosquitto::Mosquitto;
use edgefleet_tests::{
    bundle_password, digits_model, expect_success, json_output, samples, Agent, Server,
};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};

/// Connects to the broker as `client_id`/`user` and reports whether the
/// broker accepted the connection.
async fn broker_accepts(port: u16, client_id: &str, credentials: Option<(&str, &str)>) -> bool {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    return ack.code == ConnectReturnCode::Success
                }
                Ok(_) => continue,
                Err(ConnectionError::ConnectionRefused(_)) => return false,
                // The broker answers a refused login and closes the connection.
                Err(_) => return false,
            }
        }
    })
    .await;
    outcome.unwrap_or(false)
}

/// `fleetctl broker mosquitto --out DIR`, asserting success.
fn write_mosquitto_files(server: &Server, dir: &std::path::Path) {
    let out = server.ctl(&[
        "broker",
        "mosquitto",
        "--out",
        dir.to_str().unwrap(),
        "--server-password",
        "server-secret",
    ]);
    expect_success(&out, "broker mosquitto");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_devices_connect_with_their_bundle_and_revoked_ones_cannot() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let server = Server::builder(dir.path())
        .args(&["--device-auth"])
        .start()
        .await?;
    let bundle = dir.path().join("bundle-pi-a");
    let bundle_str = bundle.to_str().unwrap();
    let profile = edgefleet_tests::repo_root().join("devices/raspberry-pi-64/agent.toml");
    let enrolled = json_output(&server.ctl(&[
        "--json",
        "devices",
        "enroll",
        "--id",
        "pi-a",
        "--hardware",
        "rpi4",
        "--tag",
        "site=berlin",
        "--out",
        bundle_str,
        // The board's settings merged in: the agent started below runs
        // with them.
        "--profile",
        profile.to_str().unwrap(),
    ]));
    assert_eq!(enrolled["device"]["hardware"], "rpi4");
    assert_eq!(enrolled["mqtt"]["password"], "(in the bundle)");
    let config = std::fs::read_to_string(bundle.join("agent.toml"))?;
    assert!(config.contains("username = \"pi-a\""), "{config}");
    assert!(config.contains("max_db_bytes = 268435456"), "{config}");
    assert!(bundle.join("root.json").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bundle.join("agent.toml"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the bundle's password is private");
    }
    // A profile that would set what enrollment writes is refused before
    // anything is enrolled.
    let bad = dir.path().join("bad-profile.toml");
    std::fs::write(&bad, "[mqtt]\nurl = \"mqtt://elsewhere:1883\"\n")?;
    let refused = server.ctl(&[
        "devices",
        "enroll",
        "--id",
        "pi-bad",
        "--hardware",
        "rpi4",
        "--out",
        dir.path().join("bundle-bad").to_str().unwrap(),
        "--profile",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("sets \"mqtt\""));
    let device = server.get_json("/api/v1/devices/pi-bad").await;
    assert!(
        device.as_ref().map_or(true, |d| d["id"] != "pi-bad"),
        "not enrolled: {device:?}"
    );
    // A second bundle into the same directory is refused (exit 2).
    let again = server.ctl(&[
        "devices",
        "enroll",
        "--id",
        "pi-a",
        "--hardware",
        "rpi4",
        "--out",
        bundle_str,
    ]);
    assert_eq!(again.status.code(), Some(2));
    let bundle_b = dir.path().join("bundle-pi-b");
    json_output(&server.ctl(&[
        "--json",
        "devices",
        "enroll",
        "--id",
        "pi-b",
        "--hardware",
        "jetson-orin",
        "--tag",
        "site=paris",
        "--out",
        bundle_b.to_str().unwrap(),
    ]));

    // The agent from the bundle connects and serves what is deployed.
    let agent = Agent::start_from_bundle(dir.path(), "pi-a", &bundle)?;
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, "pi-a");
    server.wait_for_model("pi-a", "digits", 1).await?;
    let s = samples();
    assert_eq!(agent.classify(&s.inputs[0]).await?, s.labels[0]);

    // Wrong, unknown and missing credentials are refused.
    let password = bundle_password(&bundle);
    let port = server.mqtt_port;
    let password_b = bundle_password(&bundle_b);
    assert!(
        broker_accepts(port, "pi-b", Some(("pi-b", &password_b))).await,
        "an enrolled device's own credentials are accepted"
    );
    assert!(
        !broker_accepts(port, "probe-a", Some(("pi-a", &password))).await,
        "client id and user name must match"
    );
    assert!(!broker_accepts(port, "pi-a", Some(("pi-a", "not-the-password"))).await);
    assert!(!broker_accepts(port, "pi-z", Some(("pi-z", &password))).await);
    assert!(!broker_accepts(port, "pi-a", None).await);

    // Tags and hardware filter the list.
    let berlin = json_output(&server.ctl(&["--json", "devices", "list", "--tag", "site=berlin"]));
    let ids: Vec<&str> = berlin
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["pi-a"]);
    let jetsons =
        json_output(&server.ctl(&["--json", "devices", "list", "--hardware", "jetson-orin"]));
    assert_eq!(jetsons[0]["id"], "pi-b");
    let bad = server.ctl(&["devices", "list", "--tag", "site"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be KEY=VALUE"));

    // Tags can change; a deployment can select by tag.
    let tagged =
        json_output(&server.ctl(&["--json", "devices", "tag", "pi-b", "site=berlin", "floor=2"]));
    assert_eq!(tagged["tags"]["floor"], "2");
    let deployed = json_output(&server.ctl(&[
        "--json",
        "deploy",
        "--model",
        "digits",
        "--version",
        "1",
        "--tag",
        "site=berlin",
    ]));
    let published: Vec<&str> = deployed["published"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["device"].as_str().unwrap())
        .collect();
    assert_eq!(published, vec!["pi-a", "pi-b"]);
    let none = server.ctl(&[
        "deploy",
        "--model",
        "digits",
        "--version",
        "1",
        "--tag",
        "site=rome",
    ]);
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("no device has the tags"));

    // A deployed version cannot be deleted; an unused one goes with its file.
    server.push(&digits_model("fp32"), "digits", 2);
    let v2 = server.get_json("/api/v1/models/digits/versions/2").await?;
    let deployed_delete = server.ctl(&["model", "delete", "--name", "digits", "--version", "1"]);
    assert_eq!(deployed_delete.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&deployed_delete.stderr).contains("is deployed"));
    json_output(&server.ctl(&[
        "--json",
        "model",
        "delete",
        "--name",
        "digits",
        "--version",
        "2",
    ]));
    let artifact = reqwest::get(format!(
        "{}/artifacts/{}",
        server.url,
        v2["sha256"].as_str().unwrap()
    ))
    .await?;
    assert_eq!(artifact.status(), 404, "the unused file is gone");
    let models = json_output(&server.ctl(&["--json", "model", "list"]));
    assert_eq!(models.as_array().unwrap().len(), 1);

    // Mosquitto files: the server user and every enrolled device.
    let broker_dir = dir.path().join("mosquitto");
    write_mosquitto_files(&server, &broker_dir);
    let passwords = std::fs::read_to_string(broker_dir.join("passwords"))?;
    for user in ["edgefleet-server", "pi-a", "pi-b"] {
        assert!(
            passwords.contains(&format!("{user}:$7$101$")),
            "{passwords}"
        );
    }
    let acl = std::fs::read_to_string(broker_dir.join("acl"))?;
    assert!(
        acl.contains("pattern write edgefleet/v1/devices/%u/telemetry"),
        "{acl}"
    );

    // Revoked: the same credentials no longer connect, and the device
    // leaves the Mosquitto password file.
    let revoked = json_output(&server.ctl(&["--json", "devices", "revoke", "pi-a"]));
    assert!(revoked["revoked_at"].is_u64());
    // Still connected, it is cut off: no new desired state reaches it.
    server.push(&digits_model("fp32"), "digits", 3);
    let deployed = json_output(&server.ctl(&[
        "--json",
        "deploy",
        "--model",
        "digits",
        "--version",
        "3",
        "--device",
        "pi-a",
    ]));
    assert_eq!(deployed["published"], serde_json::json!([]), "{deployed}");
    assert!(!broker_accepts(port, "pi-a", Some(("pi-a", &password))).await);
    write_mosquitto_files(&server, &broker_dir);
    let passwords = std::fs::read_to_string(broker_dir.join("passwords"))?;
    assert!(!passwords.contains("pi-a:") && passwords.contains("pi-b:"));
    let audit = json_output(&server.ctl(&["--json", "audit"]));
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"device.enroll") && actions.contains(&"device.revoke"));
    Ok(())
}

/// A Mosquitto of our own with the password file and ACL `fleetctl broker
/// mosquitto` writes: enrolled devices run the whole flow through it. (What
/// a device cannot do there to another is in `trust_boundary.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_generated_passwords_and_acl_carries_the_whole_flow() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start_locked(dir.path()).await?;
    let server = Server::builder(dir.path())
        .external_broker(&broker.url())
        .args(&Mosquitto::server_args())
        .start()
        .await?;
    let bundles: Vec<_> = ["pi-a", "pi-b"]
        .iter()
        .map(|id| server.enroll(dir.path(), id))
        .collect();
    broker.allow_enrolled(&server).await?;
    let acl = std::fs::read_to_string(broker.conf_dir.join("acl"))?;
    assert!(
        acl.contains(&format!("topic readwrite {}/#", server.topic_prefix)),
        "{acl}"
    );
    let agent = Agent::start_from_bundle(dir.path(), "pi-a", &bundles[0])?;
    server.push(&digits_model("int8"), "digits", 1);
    server.deploy("digits", 1, "pi-a");
    server.wait_for_model("pi-a", "digits", 1).await?;
    let s = samples();
    assert_eq!(agent.classify(&s.inputs[2]).await?, s.labels[2]);
    assert!(!broker_accepts(broker.port, "pi-a", Some(("pi-a", "wrong"))).await);
    assert!(
        broker_accepts(
            broker.port,
            "pi-b",
            Some(("pi-b", &bundle_password(&bundles[1])))
        )
        .await
    );
    Ok(())
}

/// A device whose first messages reach the server before its key does
/// (the key goes over HTTP, the messages over MQTT, and either may be
/// first): the server refuses them, unreceipted, and once the key is
/// registered the agent sends them again at once rather than after its
/// 30 s in-flight timeout, so the device shows online within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_before_the_key_is_registered_are_sent_again_once_it_is() -> anyhow::Result<()>
{
    use anyhow::Context;
    use edgefleet_tests::proxy::Proxy;
    use edgefleet_tests::wait_for;

    let dir = tempfile::tempdir()?;
    let server = Server::builder(dir.path())
        .args(&["--device-auth"])
        .start()
        .await?;
    let bundle = server.enroll(dir.path(), "pi-late-key");
    // The agent reaches the server's HTTP API through a link that is down
    // at first; MQTT is direct.
    let http: std::net::SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .context("the test server speaks plain HTTP on an address")?;
    let proxy = Proxy::start(http).await?;
    proxy.cut();
    let config = bundle.join("agent.toml");
    let text = std::fs::read_to_string(&config)?;
    let via_proxy = text.replace(&server.url, &format!("http://{}", proxy.addr));
    assert_ne!(text, via_proxy, "the bundle names the server's URL");
    std::fs::write(&config, via_proxy)?;
    let agent = Agent::start_from_bundle(dir.path(), "pi-late-key", &bundle)?;
    let device = || async { server.get_json("/api/v1/devices/pi-late-key").await.ok() };
    // Its online status arrives signed by a key the server does not know.
    wait_for(
        "the first messages refused",
        Duration::from_secs(15),
        || async {
            let d = device().await?;
            (d["rejected_messages"]["count"].as_u64()? >= 1).then_some(())
        },
    )
    .await
    .with_context(|| agent.proc.log_text())?;
    let d = device().await.context("the device is enrolled")?;
    assert_ne!(d["online"], true, "a refused status took: {d}");
    assert!(d["public_key"].is_null(), "{d}");
    // The link comes back: the key is registered at the agent's next try
    // (within a few seconds), and the refused status follows it.
    proxy.restore();
    wait_for(
        "online with its key, well inside the 30 s in-flight timeout",
        Duration::from_secs(15),
        || async {
            let d = device().await?;
            (d["online"] == true && d["public_key"].is_string()).then_some(())
        },
    )
    .await
    .with_context(|| agent.proc.log_text())?;
    Ok(())
}
