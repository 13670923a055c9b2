//! The server's MQTT connection: one task owns the rumqttc event loop,
//! subscribes to every device's `status`, `events`, `telemetry` and
//! `results`, has each message checked ([`inbound`]: topic shape, the
//! device's signature with its registered key, payload, device id
//! matching the topic) and hands it to the [`ingest`] task, which stores
//! it in batches and acts on it. What the server publishes that makes an
//! agent act (receipts, its own status) is signed with its online key.
//!
//! Delivery: the session is persistent (a fixed client id per topic
//! prefix, clean session off), so an external broker keeps QoS 1 messages
//! for the server while it is down; and a message is acknowledged only
//! after it is stored, so a server crash never loses one. Redelivered
//! copies are de-duplicated by (device, sequence number) in the store.
//!
//! Replicas (`--replica NAME`) each connect with a client id of their own
//! and take device messages through shared subscriptions
//! (`$share/{group}/…`), so each message goes to one replica and is stored
//! once. Their sessions are clean: a persistent session would keep its
//! share of messages queued at the broker while its replica is down
//! (Mosquitto does) instead of giving them to the live ones. What a dying
//! replica had received but not stored is lost at the broker (it does not
//! hand it to the group again), and devices send it again: an agent keeps
//! every record until a server's signed receipt names it.

use std::time::Duration;

use edgefleet_shared::{ServerStatus, SignedMessage, TopicKind, TopicPrefix};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerLogin;
use crate::fleet::Fleet;
use crate::keys::Signer;

mod inbound;
mod ingest;

pub use inbound::{decode, decode_batch, Checked, Inbound, InboundError};

/// The server's MQTT client id: fixed per topic prefix, so its session
/// (and the messages the broker queues in it) outlives a restart.
pub fn client_id(prefix: &TopicPrefix) -> String {
    let clean: String = prefix
        .as_str()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("edgefleet-server-{clean}")
}

/// The MQTT client id of replica `replica` (or of the only server).
fn replica_client_id(prefix: &TopicPrefix, replica: Option<&str>) -> String {
    match replica {
        Some(name) => format!("{}-{name}", client_id(prefix)),
        None => client_id(prefix),
    }
}

/// The topic filter the server subscribes to for device messages of
/// `kind`: shared among replicas, plain for the only server.
fn device_filter(prefix: &TopicPrefix, kind: TopicKind, replica: Option<&str>) -> String {
    let topic = prefix.all_devices(kind);
    match replica {
        Some(_) => format!("$share/{}/{topic}", client_id(prefix)),
        None => topic,
    }
}

/// The server's status for connection `session`, signed, as published on
/// the server status topic.
fn server_status(signer: &Signer, prefix: &TopicPrefix, online: bool, session: u64) -> Vec<u8> {
    let status = ServerStatus {
        online,
        at: edgefleet_shared::unix_now(),
        session,
    };
    let msg =
        serde_json::to_vec(&status).expect("a server status is plain data and always serialises");
    signer.seal(&prefix.server_status(), &msg)
}

/// The last will of connection `session`: the broker publishes it, signed
/// now, when the server drops.
fn will(signer: &Signer, prefix: &TopicPrefix, session: u64) -> rumqttc::LastWill {
    rumqttc::LastWill::new(
        prefix.server_status(),
        server_status(signer, prefix, false, session),
        QoS::AtLeastOnce,
        true,
    )
}

/// Creates the server's MQTT client for `host:port`, with a user name and
/// password where the broker needs them; `session` numbers this connection
/// in the server's signed status and last will.
pub fn client(
    login: &BrokerLogin,
    prefix: &TopicPrefix,
    signer: &Signer,
    session: u64,
    replica: Option<&str>,
) -> (AsyncClient, EventLoop) {
    let mut options = login.options(replica_client_id(prefix, replica));
    options
        .set_last_will(will(signer, prefix, session))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(replica.is_some())
        .set_manual_acks(true)
        .set_inflight(1000)
        .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    // Acknowledgements and receipts are small: send them at once.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Publishes the root chain, retained.
fn publish_chain(fleet: &Fleet) {
    let chain = serde_json::to_vec(&fleet.signer.chain())
        .expect("a root chain is plain data and always serialises");
    if let Err(e) = fleet
        .mqtt
        .try_publish(fleet.prefix.roots(), QoS::AtLeastOnce, true, chain)
    {
        tracing::error!(error = %e, "cannot publish the root chain");
    }
}

/// Puts the server's own retained root chain and status back when
/// something else overwrote them (the server hears its own publishes too,
/// which match and change nothing). At most once a second each: an
/// overwrite inside that second is put back when it ends, so the last
/// word is always the server's.
///
/// Replicas share the status topic: another replica's signed "online"
/// stands; a replica's "offline" (its last will, when it dies) is
/// answered by the survivors with a new connection number, so agents
/// take the fleet as storing again.
#[derive(Debug, Default)]
struct ServerTopics {
    last: Option<tokio::time::Instant>,
    roots_pending: bool,
    status_pending: bool,
    replica: bool,
}

const RESTORE_EVERY: Duration = Duration::from_secs(1);

impl ServerTopics {
    fn check(&mut self, fleet: &Fleet, publish: &Publish, session: &mut u64) {
        if publish.topic == fleet.prefix.roots() {
            let ours = serde_json::to_vec(&fleet.signer.chain())
                .expect("a root chain is plain data and always serialises");
            if publish.payload[..] != ours[..] {
                tracing::warn!("the retained root chain was overwritten; publishing it again");
                fleet.metrics.rejected("server_topic");
                self.roots_pending = true;
            }
        } else {
            let topic = fleet.prefix.server_status();
            let key = fleet.signer.public_key();
            let status = SignedMessage::open(&publish.payload, &topic, [key].iter())
                .ok()
                .and_then(|msg| serde_json::from_slice::<ServerStatus>(msg).ok());
            let genuine = status
                .as_ref()
                .is_some_and(|s| s.online && (s.session == *session || self.replica));
            if self.replica {
                if let Some(s) = status.as_ref().filter(|s| !s.online) {
                    // A replica's last will: announce under a newer number.
                    *session =
                        edgefleet_shared::messages::next_session(Some((*session).max(s.session)));
                }
            }
            // An empty retained message is the broker clearing it.
            if !genuine && !publish.payload.is_empty() {
                tracing::warn!("the retained server status was overwritten; announcing again");
                fleet.metrics.rejected("server_topic");
                self.status_pending = true;
            }
        }
        if self.due() <= tokio::time::Instant::now() {
            self.restore(fleet, *session);
        }
    }

    /// Whether something waits to be put back.
    fn pending(&self) -> bool {
        self.roots_pending || self.status_pending
    }

    /// When the next restore may go out.
    fn due(&self) -> tokio::time::Instant {
        self.last
            .map_or_else(tokio::time::Instant::now, |t| t + RESTORE_EVERY)
    }

    fn restore(&mut self, fleet: &Fleet, session: u64) {
        if !self.pending() {
            return;
        }
        if std::mem::take(&mut self.roots_pending) {
            publish_chain(fleet);
        }
        if std::mem::take(&mut self.status_pending) {
            announce(fleet, true, session);
        }
        self.last = Some(tokio::time::Instant::now());
    }
}

/// Ends `device`'s connection to an external broker at once: a new
/// connection with the device's client id makes the broker close the old
/// one (MQTT session takeover), and the device's own credentials, revoked,
/// no longer let it back in (regenerate the broker's password file with
/// `fleetctl broker mosquitto`). The embedded broker closes the
/// connection itself ([`crate::broker::Broker::evict`]).
pub fn kick(fleet: &Fleet, device: &str) {
    let Some(login) = fleet.external_broker.clone() else {
        return;
    };
    // At most once a second per device, however fast it sends.
    static LAST: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    > = std::sync::OnceLock::new();
    {
        let mut last = LAST
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if last
            .get(device)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
        {
            return;
        }
        last.retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
        last.insert(device.to_string(), now);
    }
    let device = device.to_string();
    tokio::spawn(async move {
        let mut options = login.options(device.clone());
        options.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 4);
        let took_over = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
        tracing::info!(device = %device, took_over, "revoked device's broker session ended");
    });
}

/// Why the server could not reach its broker at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("MQTT broker {0} did not accept a connection within 10 s")]
    Timeout(String),
    #[error("cannot connect to MQTT broker {broker}: {reason}")]
    Refused { broker: String, reason: String },
}

/// Waits for the first successful connection, so start-up fails clearly
/// when the broker is unreachable.
pub async fn connect(eventloop: &mut EventLoop, what: &str) -> Result<(), ConnectError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return Err(ConnectError::Timeout(what.to_string())),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                if tokio::time::Instant::now() + Duration::from_millis(200) > deadline {
                    return Err(ConnectError::Refused {
                        broker: what.to_string(),
                        reason: e.to_string(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Publishes the retained server status of connection `session`.
fn announce(fleet: &Fleet, online: bool, session: u64) {
    let payload = server_status(&fleet.signer, &fleet.prefix, online, session);
    if let Err(e) = fleet.mqtt.try_publish(
        fleet.prefix.server_status(),
        QoS::AtLeastOnce,
        true,
        payload,
    ) {
        tracing::error!(error = %e, "cannot publish the server status");
    }
}

/// Runs the event loop until `shutdown`; `session` is the number the
/// client was made with.
pub async fn run(
    fleet: Fleet,
    mut eventloop: EventLoop,
    mut session: u64,
    replica: Option<String>,
    shutdown: CancellationToken,
) {
    let subscribe = |fleet: &Fleet, session: u64| {
        for kind in [
            TopicKind::Status,
            TopicKind::Events,
            TopicKind::Telemetry,
            TopicKind::Results,
        ] {
            if let Err(e) = fleet.mqtt.try_subscribe(
                device_filter(&fleet.prefix, kind, replica.as_deref()),
                QoS::AtLeastOnce,
            ) {
                tracing::error!(error = %e, "subscribe failed");
            }
        }
        // The root chain, for devices to walk forward after a rotation.
        publish_chain(fleet);
        // Only the server may publish these two: it watches them and puts
        // its own back when anyone else overwrites them (a broker without
        // an ACL lets any client do that).
        for topic in [fleet.prefix.roots(), fleet.prefix.server_status()] {
            if let Err(e) = fleet.mqtt.try_subscribe(topic, QoS::AtLeastOnce) {
                tracing::error!(error = %e, "subscribe failed");
            }
        }
        // After the subscriptions on the same connection, so an agent that
        // sees "online" knows its messages will be stored.
        announce(fleet, true, session);
    };
    // Unbounded, yet bounded in practice: messages stay unacknowledged
    // until ingested, and the broker sends only so many unacknowledged
    // messages at once. The event loop itself must never wait on it.
    let (ingest_tx, ingest_rx) = mpsc::unbounded_channel();
    let ingest_task = tokio::spawn(ingest::ingest(fleet.clone(), ingest_rx, shutdown.clone()));
    // Signatures are checked off the event loop, a batch at a time on
    // two threads, in arrival order.
    let (verify_tx, verify_rx) = mpsc::unbounded_channel();
    let verify_task = tokio::spawn(ingest::verify(fleet.clone(), verify_rx, ingest_tx));
    // The first ConnAck was consumed by `connect`.
    subscribe(&fleet, session);
    // After a key rotation, desired state signed by a key the new root
    // drops is signed again; queued after the chain, so devices see the
    // new root first.
    let resign = fleet.desired.clone();
    tokio::spawn(async move {
        if let Err(e) = resign.resign_untrusted().await {
            tracing::error!(error = %e, "cannot re-sign desired state after a key rotation");
        }
    });
    let mut failures = 0u32;
    let mut guard = ServerTopics {
        replica: replica.is_some(),
        ..Default::default()
    };
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
            _ = tokio::time::sleep_until(guard.due()), if guard.pending() => {
                guard.restore(&fleet, session);
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                tracing::info!("reconnected to broker");
                subscribe(&fleet, session);
            }
            Ok(Event::Incoming(Packet::Publish(publish)))
                if publish.topic == fleet.prefix.roots()
                    || publish.topic == fleet.prefix.server_status() =>
            {
                guard.check(&fleet, &publish, &mut session);
                let _ = fleet.mqtt.try_ack(&publish);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if verify_tx.send(publish).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                // The broker publishes this connection's will; the next
                // one gets a new number, so agents tell its "online" from
                // the old "offline".
                session = edgefleet_shared::messages::next_session(Some(session));
                eventloop
                    .mqtt_options
                    .set_last_will(will(&fleet.signer, &fleet.prefix, session));
                let wait = Duration::from_millis((200 * u64::from(failures)).min(5_000));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    drop(verify_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = verify_task.await;
        let _ = ingest_task.await;
    })
    .await;
    announce(&fleet, false, session);
    let _ = fleet.mqtt.try_disconnect();
    // Let the goodbye reach the broker.
    let flush = async {
        while let Ok(event) = eventloop.poll().await {
            if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
}
