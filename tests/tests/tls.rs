//! HTTPS served by the fleet server itself (`--tls-cert`, `--tls-key`),
//! with a certificate `openssl` makes for the test: the API answers over
//! TLS only, `fleetctl --ca-cert` trusts it, and unusable files stop the
//! server at start with a message naming them. With device
//! authentication the embedded broker serves `mqtts://` with the same
//! certificate, and enrolled agents use it.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgefleet_tests::{binary, wait_for, wait_for_showing, Proc, Server};

/// A private CA (`ca.pem`) and a server certificate for 127.0.0.1 it
/// signed (`cert.pem`, `key.pem`), as an operator's own PKI would give.
fn make_certificate(dir: &Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .map_err(|e| {
                anyhow::anyhow!("openssl not available ({e}); Debian: apt-get install openssl")
            })?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=edgefleet test CA",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &[
            &["req", "-new"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "req.pem",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "req.pem",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ])?;
    Ok(())
}

/// The `fleet-server serve` arguments for TLS with the test's
/// certificate and `key`.
fn tls_args(dir: &Path, key: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--tls-cert".into(),
        dir.join("cert.pem").into(),
        "--tls-key".into(),
        key.into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_served_over_tls_and_fleetctl_trusts_a_given_ca() -> anyhow::Result<()> {
    fleet_server::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    make_certificate(dir.path())?;
    let server = Server::builder(dir.path())
        .args(&tls_args(dir.path(), &dir.path().join("key.pem")))
        .start()
        .await?;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.path().join("ca.pem"))?)?;
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()?;
    let health = format!("https://127.0.0.1:{port}/api/v1/health");
    let answered = wait_for_showing("an HTTPS answer", Duration::from_secs(10), || async {
        match https.get(&health).send().await {
            Ok(resp) => Ok(resp.status()),
            Err(e) => Err(format!("{e:?}")),
        }
    })
    .await
    .map_err(|timed_out| timed_out.last);
    assert_eq!(answered, Ok(reqwest::StatusCode::OK), "no HTTPS answer");
    // Plain HTTP gets no API answer.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/health")).await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));

    let token = &server.token;
    let ctl = |extra: &[&str]| {
        Command::new(binary("fleetctl"))
            .env("FLEETCTL_SERVER", format!("https://127.0.0.1:{port}"))
            .env("EDGEFLEET_TOKEN", token.trim())
            .args(extra)
            .args(["--json", "devices"])
            .output()
            .unwrap()
    };
    let trusted = ctl(&["--ca-cert", dir.path().join("ca.pem").to_str().unwrap()]);
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&trusted.stdout).trim(), "[]");
    let untrusted = ctl(&[]);
    assert!(
        !untrusted.status.success(),
        "a certificate nobody vouches for is refused"
    );

    // A key that is not a key stops the server at start, naming the file.
    let bad_key = dir.path().join("bad-key.pem");
    std::fs::write(&bad_key, "not a key\n")?;
    let mut cmd = Command::new(binary("fleet-server"));
    cmd.args(["serve", "--data-dir"])
        .arg(dir.path().join("server"))
        .arg("--keys-dir")
        .arg(&server.keys_dir)
        .args(["--http", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
        .args(tls_args(dir.path(), &bad_key));
    let mut bad = Proc::spawn(cmd, dir.path().join("server-bad-key.log"))?;
    let (status, log) =
        tokio::task::spawn_blocking(move || (bad.child.wait(), bad.log_text())).await?;
    assert!(!status?.success());
    assert!(log.contains("bad-key.pem"), "{log}");
    Ok(())
}

/// With device authentication and a certificate, the embedded broker
/// speaks only MQTT over TLS: an enrolled device's bundle carries the
/// `mqtts://` address and the fleet's CA, its agent connects, registers
/// its key over HTTPS and serves what is deployed; a plain MQTT client on
/// the same port gets nowhere, so no password crosses the network in
/// clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_devices_speak_mqtt_over_tls_to_the_embedded_broker() -> anyhow::Result<()> {
    fleet_server::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    make_certificate(d)?;
    let server = Server::builder(d)
        .args(&["--device-auth", "--tls-ca"])
        .args(&[d.join("ca.pem")])
        .args(&tls_args(d, &d.join("key.pem")))
        .start()
        .await?;
    let (http, mqtt) = (
        server.url.trim_start_matches("https://").to_string(),
        server.mqtt_port,
    );
    let token = &server.token;
    let ca = d.join("ca.pem");
    let ctl = |args: &[&str]| {
        let out = Command::new(binary("fleetctl"))
            .env("FLEETCTL_SERVER", format!("https://{http}"))
            .env("EDGEFLEET_TOKEN", token.trim())
            .arg("--ca-cert")
            .arg(&ca)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fleetctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let bundle = d.join("bundle");
    ctl(&[
        "devices",
        "enroll",
        "--id",
        "pi-tls",
        "--hardware",
        "rpi4",
        "--out",
        bundle.to_str().unwrap(),
    ]);
    let config = std::fs::read_to_string(bundle.join("agent.toml"))?;
    assert!(
        config.contains(&format!("url = \"mqtts://127.0.0.1:{mqtt}\"")),
        "{config}"
    );
    assert!(config.contains("BEGIN CERTIFICATE"), "{config}");

    // A plain MQTT client, even with the device's own credentials, gets
    // no CONNACK from a TLS listener.
    let password = edgefleet_tests::bundle_password(&bundle);
    let mut options = rumqttc::MqttOptions::new("pi-tls", "127.0.0.1", mqtt);
    options.set_credentials("pi-tls", &password);
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let plain = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(!plain, "plain MQTT was answered on the TLS port");

    let agent = edgefleet_tests::Agent::start_from_bundle(d, "pi-tls", &bundle)?;
    ctl(&[
        "model",
        "push",
        edgefleet_tests::digits_model("int8").to_str().unwrap(),
        "--name",
        "digits",
        "--version",
        "1",
    ]);
    ctl(&[
        "deploy",
        "--model",
        "digits",
        "--version",
        "1",
        "--device",
        "pi-tls",
    ]);
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?)
        .build()?;
    let device = wait_for(
        "pi-tls serving digits v1",
        Duration::from_secs(60),
        || async {
            let d: serde_json::Value = https
                .get(format!("https://{http}/api/v1/devices/pi-tls"))
                .bearer_auth(token.trim())
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let serving = d["models"]
                .as_array()?
                .iter()
                .any(|m| m["name"] == "digits" && m["version"] == 1);
            serving.then_some(d)
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.proc.log_text()))?;
    assert!(device["public_key"].is_string(), "{device}");
    let s = edgefleet_tests::samples();
    assert_eq!(agent.classify(&s.inputs[1]).await?, s.labels[1]);
    Ok(())
}
