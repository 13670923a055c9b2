//! The trust boundary, attacked from inside: a stock MQTT client logged in
//! with an enrolled device's own credentials and key (`dev-a`, a
//! compromised device) tries to read, forge and delete for another device
//! (`dev-b`, a real agent) on three brokers:
//!
//! - the embedded broker with `--device-auth` (the gate: per-device ACL);
//! - Mosquitto with the ACL `fleetctl broker mosquitto` writes;
//! - Mosquitto with no ACL at all (the one on `EDGEFLEET_TEST_MQTT_URL`,
//!   default `mqtt://127.0.0.1:1883`): here the broker lets everything
//!   through and the signatures alone must hold.
//!
//! Each attack is refused by the broker or dropped by the server or the
//! agent; the victim's state is unchanged; and every one of its uploaded
//! results arrives, counted by request id, even after forged receipts
//! covering every sequence number arrived while the server was down.
//! Revocation cuts a device off at once, and a re-enrolled device with a
//! new key is accepted while its old key is not.
//!
//! The two device ids carry a suffix unique to the run: they are MQTT
//! client ids too, and on the shared broker two clients with one id take
//! each other's sessions over.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use edgefleet_shared::signed_message::seal;
use edgefleet_shared::{SecretKey, SignedMessage};
use edgefleet_tests::mosquitto::Mosquitto;
use edgefleet_tests::{
    bundle_password, digits_model, expect_success, samples, shared_broker_url, wait_for, Agent,
    Server,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

/// Which broker, and what it is expected to stop by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broker {
    Gate,
    MosquittoAcl,
    MosquittoOpen,
}

impl Broker {
    /// Whether the broker keeps one device from another's topics.
    fn isolates(self) -> bool {
        self != Self::MosquittoOpen
    }
}

/// Topic and payload of each publish received.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A stock MQTT client: what it received, and whether the broker closed it.
struct Client {
    client: AsyncClient,
    received: Received,
    closed: Arc<AtomicBool>,
}

impl Client {
    async fn connect(port: u16, id: &str, login: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_clean_session(true);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let received: Received = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        {
            let received = received.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut connected = Some(connected_tx);
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if let Some(tx) = connected.take() {
                                let _ = tx.send(ack.code == rumqttc::ConnectReturnCode::Success);
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => received
                            .lock()
                            .unwrap()
                            .push((p.topic.clone(), p.payload.to_vec())),
                        Ok(_) => {}
                        Err(_) => {
                            closed.store(true, Ordering::SeqCst);
                            if let Some(tx) = connected.take() {
                                let _ = tx.send(false);
                            }
                            break;
                        }
                    }
                }
            });
        }
        let accepted = tokio::time::timeout(Duration::from_secs(5), connected_rx)
            .await
            .context("no CONNACK")??;
        anyhow::ensure!(accepted, "the broker refused {id}");
        Ok(Self {
            client,
            received,
            closed,
        })
    }

    fn received_on(&self, pred: impl Fn(&str) -> bool) -> Vec<(String, Vec<u8>)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| pred(t))
            .cloned()
            .collect()
    }
}

/// The victim: an agent from its bundle, uploading every result.
fn start_victim(
    dir: &std::path::Path,
    id: &str,
    bundle: &std::path::Path,
) -> anyhow::Result<Agent> {
    let config = bundle.join("agent.toml");
    let mut text = std::fs::read_to_string(&config)?;
    text += &format!(
        "\n[telemetry]\ninterval_ms = 300\n[[models]]\nname = \"digits\"\npath = \"{}\"\nupload_results = true\n",
        digits_model("fp32").display()
    );
    std::fs::write(&config, text)?;
    Agent::start_from_bundle(dir, id, bundle)
}

/// One inference by `agent` with request id `id`.
async fn infer(agent: &Agent, id: &str) -> anyhow::Result<()> {
    agent.infer_as(id, &samples().inputs[0]).await
}

/// The request ids of `device`'s stored results, sorted (empty if they
/// cannot be read).
async fn stored_results(server: &Server, device: &str) -> Vec<String> {
    let mut ids = server.result_ids(device).await.unwrap_or_default();
    ids.sort();
    ids
}

async fn wait_all_results(
    server: &Server,
    device: &str,
    expected: &[String],
) -> anyhow::Result<()> {
    let mut expected = expected.to_vec();
    expected.sort();
    wait_for(
        "every result of dev-b stored",
        Duration::from_secs(60),
        || async {
            let stored = stored_results(server, device).await;
            (stored == expected).then_some(())
        },
    )
    .await
}

/// The highest sequence number in what was read of the victim's messages.
fn highest_seq(read: &[(String, Vec<u8>)]) -> u64 {
    read.iter()
        .filter_map(|(_, payload)| SignedMessage::parse(payload).ok())
        .filter_map(|m| serde_json::from_slice::<Value>(m.msg()).ok())
        .flat_map(|v| match v {
            Value::Array(items) => items,
            one => vec![one],
        })
        .filter_map(|v| v["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// The forgeries a device holding `key` can publish for `victim`: events,
/// its status, receipts naming every sequence number from `from` on (the
/// agent takes at most 100,000 from one receipt), the server's status and
/// the root chain.
fn forgeries(
    prefix: &str,
    victim: &str,
    key: &SecretKey,
    from: u64,
) -> Vec<(String, Vec<u8>, bool)> {
    let topic = |kind: &str| format!("{prefix}/devices/{victim}/{kind}");
    let event = json!({
        "schema": 1, "device_id": victim, "seq": 9_000_000_000_000u64, "at": 1,
        "kind": "rolled_back", "reason": "forged by dev-a"
    })
    .to_string();
    let offline = json!({"schema": 1, "device_id": victim, "seq": 9_000_000_000_001u64, "online": false, "at": 1}).to_string();
    let receipt =
        json!({"schema": 1, "device_id": victim, "seqs": [[from, from + 90_000]]}).to_string();
    let server_offline = json!({"online": false, "at": 1, "session": u64::MAX}).to_string();
    let server_topic = format!("{prefix}/server/status");
    let mut out = Vec::new();
    for (t, body, retain) in [
        (topic("events"), event, false),
        (topic("status"), offline, true),
        (topic("receipts"), receipt, false),
        (server_topic, server_offline, true),
    ] {
        out.push((t.clone(), body.clone().into_bytes(), retain));
        out.push((t.clone(), seal(&t, body.as_bytes(), key), retain));
    }
    out.push((format!("{prefix}/roots"), b"[]".to_vec(), true));
    out
}

/// A fleet on `broker` with dev-a (the attacker: its credentials and a
/// registered key) and dev-b (the victim agent).
struct Fleet {
    server: Server,
    /// dev-a's and dev-b's device ids (and MQTT client ids): unique to
    /// this run, since the open broker is shared with other tests and runs.
    a: String,
    b: String,
    mosquitto: Option<Mosquitto>,
    broker: Broker,
    port: u16,
    a_password: String,
    a_key: SecretKey,
    victim: Agent,
    dir: std::path::PathBuf,
}

impl Fleet {
    async fn start(dir: &std::path::Path, broker: Broker) -> anyhow::Result<Self> {
        let (server, mosquitto, port) = match broker {
            Broker::Gate => {
                let s = Server::builder(dir)
                    .args(&["--device-auth"])
                    .start()
                    .await?;
                let port = s.mqtt_port;
                (s, None, port)
            }
            Broker::MosquittoAcl => {
                let m = Mosquitto::start_locked(dir).await?;
                let s = Server::builder(dir)
                    .external_broker(&m.url())
                    .args(&Mosquitto::server_args())
                    .start()
                    .await?;
                let port = m.port;
                (s, Some(m), port)
            }
            Broker::MosquittoOpen => {
                let url = shared_broker_url()?;
                let s = Server::builder(dir).external_broker(&url).start().await?;
                let port = s.mqtt_port;
                (s, None, port)
            }
        };
        let suffix = edgefleet_tests::unique_suffix();
        let (a_id, b_id) = (format!("dev-a-{suffix}"), format!("dev-b-{suffix}"));
        let a_bundle = server.enroll(dir, &a_id);
        let b_bundle = server.enroll(dir, &b_id);
        if let Some(m) = &mosquitto {
            m.allow_enrolled(&server).await?;
        }
        // dev-a's own key, registered by the operator: a whole compromised
        // device, credentials and key.
        let a_key = SecretKey::generate()?;
        let out = server.ctl(&[
            "devices",
            "set-key",
            &a_id,
            "--public-key",
            &a_key.public().to_hex(),
        ]);
        expect_success(&out, "devices set-key");
        let victim = start_victim(dir, &b_id, &b_bundle)?;
        victim.wait_ready().await?;
        // The victim made its key and registered it with its bundle's
        // credentials; its messages are stored.
        let b = wait_for(
            "dev-b online with its key",
            Duration::from_secs(30),
            || async {
                let d = server
                    .get_json(&format!("/api/v1/devices/{b_id}"))
                    .await
                    .ok()?;
                (d["online"] == true && d["public_key"].is_string()).then_some(d)
            },
        )
        .await
        .with_context(|| victim.proc.log_text())?;
        let key_file = victim.dir.join("data/device.key");
        let made: Value = serde_json::from_slice(&std::fs::read(&key_file)?)?;
        assert_eq!(
            b["public_key"], made["public"],
            "the key made on the device"
        );
        Ok(Self {
            server,
            a: a_id,
            b: b_id,
            mosquitto,
            broker,
            port,
            a_password: bundle_password(&a_bundle),
            a_key,
            victim,
            dir: dir.to_path_buf(),
        })
    }

    async fn attacker(&self) -> anyhow::Result<Client> {
        Client::connect(self.port, &self.a, Some((&self.a, &self.a_password))).await
    }

    /// dev-b's page in the API.
    fn device_path(&self) -> String {
        format!("/api/v1/devices/{}", self.b)
    }

    fn prefix(&self) -> String {
        self.server.topic_prefix.clone()
    }

    /// What dev-a can read of dev-b: returns what arrived.
    async fn try_to_read(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let (p, b) = (self.prefix(), &self.b);
        let mut seen = Vec::new();
        for filter in [
            format!("{p}/devices/{b}/desired"),
            format!("{p}/devices/+/receipts"),
            format!("{p}/devices/{b}/telemetry"),
        ] {
            let c = self.attacker().await?;
            let _ = c.client.subscribe(&filter, QoS::AtLeastOnce).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            seen.extend(c.received_on(|t| t.contains(&format!("/{b}/"))));
            if self.broker == Broker::Gate {
                assert!(
                    c.closed.load(Ordering::SeqCst),
                    "the gate keeps a device that subscribed to {filter}"
                );
            }
        }
        Ok(seen)
    }

    /// Publishes every forgery, each on a fresh connection (the gate
    /// disconnects a device at its first).
    async fn forge(&self, from: u64) -> anyhow::Result<()> {
        for (topic, payload, retain) in forgeries(&self.prefix(), &self.b, &self.a_key, from) {
            let c = self.attacker().await?;
            let _ = c
                .client
                .publish(&topic, QoS::AtLeastOnce, retain, payload)
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.broker == Broker::Gate {
                assert!(
                    c.closed.load(Ordering::SeqCst),
                    "the gate keeps a device that published on {topic}"
                );
            }
        }
        Ok(())
    }

    /// dev-b's state after the attacks: no forged event, online, the
    /// retained root chain and server status the server's own.
    async fn assert_unharmed(&self) -> anyhow::Result<()> {
        let events = self.server.events(&self.b).await;
        assert!(
            events
                .iter()
                .all(|e| !e["reason"].as_str().unwrap_or("").contains("forged")),
            "{events:?}"
        );
        let b = self.server.get_json(&self.device_path()).await?;
        assert_eq!(b["online"], true, "a forged status took: {b}");
        // What a device connecting now finds retained.
        let c = self.attacker().await?;
        let p = self.prefix();
        c.client
            .subscribe(format!("{p}/roots"), QoS::AtLeastOnce)
            .await?;
        c.client
            .subscribe(format!("{p}/server/status"), QoS::AtLeastOnce)
            .await?;
        let retained = wait_for(
            "retained roots and status",
            Duration::from_secs(10),
            || async {
                let roots = c.received_on(|t| t.ends_with("/roots"));
                let status = c.received_on(|t| t.ends_with("/server/status"));
                (!roots.is_empty() && !status.is_empty())
                    .then(|| (roots[0].1.clone(), status.last().unwrap().1.clone()))
            },
        )
        .await?;
        let chain: Vec<Value> = serde_json::from_slice(&retained.0)?;
        assert!(!chain.is_empty(), "the root chain was emptied");
        let online = self.server.online_key().public();
        let topic = format!("{p}/server/status");
        let status: Value =
            serde_json::from_slice(SignedMessage::open(&retained.1, &topic, [online].iter())?)?;
        assert_eq!(status["online"], true, "{status}");
        Ok(())
    }
}

/// Every attack on one broker: what the broker does not refuse, the
/// server and the agent drop; every result of the victim arrives.
async fn attacks_fail(broker: Broker) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut fleet = Fleet::start(dir.path(), broker).await?;
    let mut expected = Vec::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        infer(&fleet.victim, &id).await?;
        expected.push(id);
    }
    wait_all_results(&fleet.server, &fleet.b, &expected).await?;

    let read = fleet.try_to_read().await?;
    if broker.isolates() {
        assert!(read.is_empty(), "dev-a read dev-b's messages: {read:?}");
    } else {
        assert!(!read.is_empty(), "an open broker shows dev-b's telemetry");
    }
    // What the attacker saw tells it which sequence numbers are next.
    let next_seq = highest_seq(&read);
    fleet.forge(next_seq).await?;
    // Where the broker let them through, the server counted the refusals
    // on dev-b's page.
    if !broker.isolates() {
        let b = wait_for(
            "refusals on dev-b's page",
            Duration::from_secs(10),
            || async {
                let b = fleet.server.get_json(&fleet.device_path()).await.ok()?;
                (b["rejected_messages"]["count"].as_u64()? >= 2).then_some(b)
            },
        )
        .await?;
        assert!(
            b["rejected_messages"]["last_reason"]
                .as_str()
                .unwrap_or("")
                .contains("refused"),
            "{b}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.assert_unharmed().await?;

    // Records waiting while the server is down, and forged receipts naming
    // every sequence number: the agent deletes nothing it did not send.
    if broker != Broker::Gate {
        fleet.server.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..10 {
            let id = format!("offline-{i}");
            infer(&fleet.victim, &id).await?;
            expected.push(id);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        fleet.forge(next_seq).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        fleet.server.restart().await?;
    } else {
        for i in 0..10 {
            let id = format!("after-{i}");
            infer(&fleet.victim, &id).await?;
            expected.push(id);
        }
    }
    wait_all_results(&fleet.server, &fleet.b, &expected)
        .await
        .with_context(|| fleet.victim.proc.log_text())?;
    if broker == Broker::MosquittoOpen {
        // The forged receipts and server statuses reached the agent; it
        // said what it refused.
        let log = fleet.victim.proc.log_text();
        assert!(log.contains("message from the fleet refused"), "{log}");
    }
    fleet.revoke_and_reenroll().await
}

impl Fleet {
    /// Revocation cuts dev-b off at once; enrolled again with a new key it
    /// is back, and its old key is refused.
    async fn revoke_and_reenroll(&mut self) -> anyhow::Result<()> {
        if self.broker == Broker::MosquittoOpen {
            // An open broker has no credentials to take away.
            return Ok(());
        }
        let before = self.victim.proc.log_text().len();
        let out = self.server.ctl(&["devices", "revoke", &self.b]);
        expect_success(&out, "devices revoke");
        if let Some(m) = &self.mosquitto {
            m.allow_enrolled(&self.server).await?;
        }
        wait_for("dev-b cut off", Duration::from_secs(5), || async {
            let log = self.victim.proc.log_text();
            log[before..]
                .contains("broker connection lost")
                .then_some(())
        })
        .await?;
        // And it stays out: its reconnects are refused (on Mosquitto once
        // the password file without it is loaded; until then the server
        // ends each session it opens).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mark = self.victim.proc.log_text().len();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = self.victim.proc.log_text();
        assert!(
            !after[mark..].contains("connected to broker"),
            "a revoked device got back in:\n{}",
            &after[mark..]
        );
        // Enrolled again: new credentials; the device makes a new key.
        let old_key: Value =
            serde_json::from_slice(&std::fs::read(self.victim.dir.join("data/device.key"))?)?;
        self.victim.proc.terminate(Duration::from_secs(5));
        std::fs::remove_file(self.victim.dir.join("data/device.key"))?;
        let bundle = self.server.enroll(&self.dir, &self.b);
        if let Some(m) = &self.mosquitto {
            m.allow_enrolled(&self.server).await?;
        }
        self.victim = start_victim(&self.dir, &self.b, &bundle)?;
        let b = wait_for(
            "dev-b back with a new key",
            Duration::from_secs(30),
            || async {
                let d = self.server.get_json(&self.device_path()).await.ok()?;
                (d["online"] == true
                    && d["public_key"].is_string()
                    && d["public_key"] != old_key["public"])
                    .then_some(d)
            },
        )
        .await
        .with_context(|| self.victim.proc.log_text())?;
        assert_ne!(b["public_key"], old_key["public"]);
        infer(&self.victim, "reenrolled").await?;
        wait_for(
            "a result from the new key",
            Duration::from_secs(30),
            || async {
                stored_results(&self.server, &self.b)
                    .await
                    .contains(&"reenrolled".to_string())
                    .then_some(())
            },
        )
        .await?;
        // The old key, with the new credentials (a stolen old device that
        // also got the new bundle): refused by the server.
        let old = SecretKey::from_hex(old_key["secret"].as_str().unwrap_or(""))?;
        let p = self.prefix();
        let topic = format!("{p}/devices/{}/events", self.b);
        let event = json!({"schema": 1, "device_id": self.b, "seq": 8_000_000_000_000u64, "at": 1, "kind": "rolled_back", "reason": "old key"}).to_string();
        // Its own client id would take the real agent's session over; a
        // moment without it changes nothing here.
        let c = Client::connect(
            self.port,
            &self.b,
            Some((&self.b, &bundle_password(&bundle))),
        )
        .await?;
        c.client
            .publish(
                &topic,
                QoS::AtLeastOnce,
                false,
                seal(&topic, event.as_bytes(), &old),
            )
            .await?;
        wait_for("the old key refused", Duration::from_secs(10), || async {
            let b = self.server.get_json(&self.device_path()).await.ok()?;
            b["rejected_messages"]["last_reason"]
                .as_str()?
                .contains("not trusted")
                .then_some(())
        })
        .await?;
        let events = self.server.events(&self.b).await;
        assert!(
            events.iter().all(|e| e["reason"] != "old key"),
            "{events:?}"
        );
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_isolates_devices_and_revocation_cuts_them_off() -> anyhow::Result<()> {
    attacks_fail(Broker::Gate).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_generated_acl_isolates_devices() -> anyhow::Result<()> {
    attacks_fail(Broker::MosquittoAcl).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_broker_without_any_acl_the_signatures_alone_hold() -> anyhow::Result<()> {
    attacks_fail(Broker::MosquittoOpen).await
}
