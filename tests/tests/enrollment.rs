//! Enrollment end to end: `fleetctl devices enroll` writes a bundle, an
//! agent started from it connects to the embedded broker (device
//! authentication on) and serves what is deployed; wrong, unknown and
//! missing credentials are refused; a revoked device cannot connect again;
//! tags and hardware filter the device list; `fleetctl broker mosquitto`
//! writes files Mosquitto accepts.

use std::time::Duration;

use edgefleet_tests::{digits_model, samples, Agent, Server};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use serde_json::Value;

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
                // rumqttd closes the connection of a refused login.
                Err(_) => return false,
            }
        }
    })
    .await;
    outcome.unwrap_or(false)
}

fn json_out(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "fleetctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_devices_connect_with_their_bundle_and_revoked_ones_cannot() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let server = Server::start_full(dir.path(), None, None, &["--device-auth"]).await?;
    let bundle = dir.path().join("bundle-pi-a");
    let bundle_str = bundle.to_str().unwrap();
    let enrolled = json_out(&server.ctl(&[
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
    ]));
    assert_eq!(enrolled["device"]["hardware"], "rpi4");
    assert_eq!(enrolled["mqtt"]["password"], "(in the bundle)");
    let config = std::fs::read_to_string(bundle.join("agent.toml"))?;
    assert!(config.contains("username = \"pi-a\""), "{config}");
    assert!(bundle.join("root.json").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bundle.join("agent.toml"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the bundle's password is private");
    }
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
    json_out(&server.ctl(&[
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
    let password = config
        .lines()
        .find_map(|l| l.strip_prefix("password = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let port = server.mqtt_port;
    let password_b = std::fs::read_to_string(bundle_b.join("agent.toml"))?
        .lines()
        .find_map(|l| {
            l.strip_prefix("password = ")
                .map(|p| p.trim_matches('"').to_string())
        })
        .unwrap();
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
    let berlin = json_out(&server.ctl(&["--json", "devices", "list", "--tag", "site=berlin"]));
    let ids: Vec<&str> = berlin
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["pi-a"]);
    let jetsons =
        json_out(&server.ctl(&["--json", "devices", "list", "--hardware", "jetson-orin"]));
    assert_eq!(jetsons[0]["id"], "pi-b");
    let bad = server.ctl(&["devices", "list", "--tag", "site"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be KEY=VALUE"));

    // Mosquitto files: the server user and every enrolled device.
    let broker_dir = dir.path().join("mosquitto");
    let out = server.ctl(&[
        "broker",
        "mosquitto",
        "--out",
        broker_dir.to_str().unwrap(),
        "--server-password",
        "server-secret",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let revoked = json_out(&server.ctl(&["--json", "devices", "revoke", "pi-a"]));
    assert!(revoked["revoked_at"].is_u64());
    assert!(!broker_accepts(port, "pi-a", Some(("pi-a", &password))).await);
    server.ctl(&[
        "broker",
        "mosquitto",
        "--out",
        broker_dir.to_str().unwrap(),
        "--server-password",
        "server-secret",
    ]);
    let passwords = std::fs::read_to_string(broker_dir.join("passwords"))?;
    assert!(!passwords.contains("pi-a:") && passwords.contains("pi-b:"));
    let audit = json_out(&server.ctl(&["--json", "audit"]));
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"device.enroll") && actions.contains(&"device.revoke"));
    Ok(())
}
