//! The server's MQTT connection: one task owns the rumqttc event loop,
//! subscribes to every device's `status`, `events`, `telemetry` and
//! `results`, checks each message (topic shape, payload, device id matching
//! the topic) and hands it to [`Fleet`]; telemetry and results go to the
//! [`ingest`] task, which stores them in batches.
//!
//! Delivery: the session is persistent (a fixed client id per topic
//! prefix, clean session off), so an external broker keeps QoS 1 messages
//! for the server while it is down; and a message is acknowledged only
//! after it is stored, so a server crash never loses one. Redelivered
//! copies are de-duplicated by (device, sequence number) in the store.

use std::time::Duration;

use edgefleet_shared::{
    DeviceId, DeviceTopic, InferenceResult, Receipt, ServerStatus, StatusMessage, TelemetryMessage,
    TopicKind, TopicPrefix, UpdateEvent,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::store::{self, Streamed};

/// A message from a device, checked.
#[derive(Debug)]
pub enum Inbound {
    Status(StatusMessage),
    Event(UpdateEvent),
    /// Telemetry or results: one record, or a batch sent as a JSON array.
    Streamed(Vec<Streamed>),
}

impl Inbound {
    /// The device it came from (decode checked that every record of a
    /// batch names the topic's device).
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Self::Status(s) => Some(&s.device_id),
            Self::Event(e) => Some(&e.device_id),
            Self::Streamed(records) => records.first().map(|r| match r {
                Streamed::Telemetry(t) => &t.device_id,
                Streamed::Result(r) => &r.device_id,
            }),
        }
    }

    /// Its kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Status(_) => "status",
            Self::Event(_) => "events",
            Self::Streamed(records) => match records.first() {
                Some(Streamed::Result(_)) => "results",
                _ => "telemetry",
            },
        }
    }
}

/// Why an inbound message was dropped.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InboundError {
    #[error("bad topic: {0}")]
    Topic(String),
    #[error("payload on {topic} is not valid: {reason}")]
    Payload { topic: String, reason: String },
    #[error("message on {topic} claims device {claimed}; dropped")]
    DeviceMismatch { topic: String, claimed: String },
    #[error("devices do not publish on {0}")]
    WrongDirection(String),
}

/// Parses and checks one inbound publish.
pub fn decode(prefix: &TopicPrefix, topic: &str, payload: &[u8]) -> Result<Inbound, InboundError> {
    let parsed: DeviceTopic = prefix
        .parse(topic)
        .map_err(|e| InboundError::Topic(e.to_string()))?;
    let payload_err = |e: serde_json::Error| InboundError::Payload {
        topic: topic.to_string(),
        reason: e.to_string(),
    };
    let (inbound, claimed) = match parsed.kind {
        TopicKind::Status => {
            let msg: StatusMessage = serde_json::from_slice(payload).map_err(payload_err)?;
            let claimed = msg.device_id.clone();
            (Inbound::Status(msg), claimed)
        }
        TopicKind::Events => {
            let msg: UpdateEvent = serde_json::from_slice(payload).map_err(payload_err)?;
            let claimed = msg.device_id.clone();
            (Inbound::Event(msg), claimed)
        }
        TopicKind::Telemetry => {
            let msgs: Vec<TelemetryMessage> = one_or_many(payload).map_err(payload_err)?;
            let claimed = same_device(msgs.iter().map(|m| &m.device_id), &parsed.device);
            let records = msgs.into_iter().map(Streamed::Telemetry).collect();
            (Inbound::Streamed(records), claimed)
        }
        TopicKind::Results => {
            let msgs: Vec<InferenceResult> = one_or_many(payload).map_err(payload_err)?;
            let claimed = same_device(msgs.iter().map(|m| &m.device_id), &parsed.device);
            let records = msgs.into_iter().map(Streamed::Result).collect();
            (Inbound::Streamed(records), claimed)
        }
        TopicKind::Desired | TopicKind::Receipts => {
            return Err(InboundError::WrongDirection(topic.into()))
        }
    };
    if claimed != parsed.device {
        return Err(InboundError::DeviceMismatch {
            topic: topic.into(),
            claimed: claimed.to_string(),
        });
    }
    Ok(inbound)
}

/// A record, or a JSON array of records (a device's batched publish).
fn one_or_many<T: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> Result<Vec<T>, serde_json::Error> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        serde_json::from_slice(payload)
    } else {
        serde_json::from_slice(payload).map(|one| vec![one])
    }
}

/// The device every record of a batch claims: the topic's device when all
/// agree (or the batch is empty), else the first that differs.
fn same_device<'a>(claims: impl Iterator<Item = &'a DeviceId>, topic: &DeviceId) -> DeviceId {
    claims
        .into_iter()
        .find(|d| *d != topic)
        .unwrap_or(topic)
        .clone()
}

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

/// Creates the server's MQTT client for `host:port`, with a user name and
/// password where the broker needs them.
pub fn client(
    host: &str,
    port: u16,
    prefix: &TopicPrefix,
    credentials: Option<(String, String)>,
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id(prefix), host, port);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let offline = ServerStatus {
        online: false,
        at: 0,
    };
    options
        .set_last_will(rumqttc::LastWill::new(
            prefix.server_status(),
            serde_json::to_vec(&offline).expect("status serializes"),
            QoS::AtLeastOnce,
            true,
        ))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
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

/// Most inbound messages handled per round.
const INGEST_BATCH: usize = 2000;

/// One received publish: what it carried if it was valid (`None` for a
/// dropped one, which is acknowledged all the same).
type Received = (Option<Inbound>, Publish);

/// Stores what devices sent and acknowledges it, in the order it arrived
/// (MQTT requires PUBACKs in receive order, and acknowledging only after
/// storing is what makes a server crash lose nothing). Telemetry and
/// results of a round are stored in one transaction. A store failure is
/// retried until it succeeds, holding back the acknowledgements meanwhile.
pub async fn ingest(
    fleet: Fleet,
    mut rx: mpsc::UnboundedReceiver<Received>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Received> = Vec::with_capacity(INGEST_BATCH);
    while rx.recv_many(&mut batch, INGEST_BATCH).await > 0 {
        let streamed: Vec<Streamed> = batch
            .iter()
            .filter_map(|(i, _)| match i {
                Some(Inbound::Streamed(r)) => Some(r.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        let mut failures = 0u32;
        loop {
            let result = async {
                if !streamed.is_empty() {
                    let now = edgefleet_shared::unix_now();
                    let started = std::time::Instant::now();
                    let new = fleet.store.record_streamed(&streamed, now).await?;
                    fleet.insights.observe(&streamed, now);
                    fleet.metrics.ingested(
                        streamed.len(),
                        new,
                        started.elapsed().as_secs_f64(),
                        streamed.iter().map(|r| now as f64 - r.at() as f64),
                    );
                }
                let (mut statuses, mut events) = (Vec::new(), Vec::new());
                for (inbound, _) in &batch {
                    match inbound {
                        Some(Inbound::Status(s)) => statuses.push(s.clone()),
                        Some(Inbound::Event(e)) => events.push(e.clone()),
                        _ => {}
                    }
                }
                fleet.on_messages(statuses, events).await?;
                if !streamed.is_empty() {
                    fleet.rollouts.on_telemetry(&streamed).await;
                }
                // What the batch changed in rollouts is stored before the
                // batch is acknowledged.
                fleet.rollouts.flush(&fleet).await?;
                Ok::<_, store::StoreError>(())
            }
            .await;
            match result {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, messages = batch.len(), attempt = failures, "cannot store device messages; retrying");
                    let wait = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let mut stored: std::collections::BTreeMap<DeviceId, Vec<u64>> = Default::default();
        for (inbound, publish) in batch.drain(..) {
            if let Some(inbound) = &inbound {
                for (device, seq) in inbound.origin() {
                    stored.entry(device).or_default().push(seq);
                }
            }
            if fleet.mqtt.ack(&publish).await.is_err() {
                return;
            }
        }
        for (device, seqs) in stored {
            let receipt = Receipt {
                schema: edgefleet_shared::SCHEMA_VERSION,
                seqs: Receipt::ranges(seqs),
                device_id: device,
            };
            let topic = fleet.prefix.device(&receipt.device_id, TopicKind::Receipts);
            let payload = serde_json::to_vec(&receipt).expect("receipts serialize");
            fleet.metrics.published("receipts");
            if let Err(e) = fleet
                .mqtt
                .publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
                .await
            {
                tracing::warn!(error = %e, "cannot send a receipt");
            }
        }
    }
}

impl Inbound {
    /// The device and sequence numbers a stored message is receipted by
    /// (none for the broker's last will, which has no number).
    fn origin(&self) -> Vec<(DeviceId, u64)> {
        let one = |device: &DeviceId, seq: u64| (device.clone(), seq);
        let all = match self {
            Self::Status(s) => vec![one(&s.device_id, s.seq)],
            Self::Event(e) => vec![one(&e.device_id, e.seq)],
            Self::Streamed(records) => records
                .iter()
                .map(|r| match r {
                    Streamed::Telemetry(t) => one(&t.device_id, t.seq),
                    Streamed::Result(r) => one(&r.device_id, r.seq),
                })
                .collect(),
        };
        all.into_iter().filter(|(_, seq)| *seq != 0).collect()
    }
}

/// Waits for the first successful connection, so start-up fails clearly
/// when the broker is unreachable.
pub async fn connect(eventloop: &mut EventLoop, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => anyhow::bail!("MQTT broker {what} did not accept a connection within 10 s"),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                if tokio::time::Instant::now() + Duration::from_millis(200) > deadline {
                    anyhow::bail!("cannot connect to MQTT broker {what}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Publishes the retained server status.
fn announce(fleet: &Fleet, online: bool) {
    let status = ServerStatus {
        online,
        at: edgefleet_shared::unix_now(),
    };
    let payload = serde_json::to_vec(&status).expect("status serializes");
    if let Err(e) = fleet.mqtt.try_publish(
        fleet.prefix.server_status(),
        QoS::AtLeastOnce,
        true,
        payload,
    ) {
        tracing::error!(error = %e, "cannot publish the server status");
    }
}

/// Runs the event loop until `shutdown`.
pub async fn run(fleet: Fleet, mut eventloop: EventLoop, shutdown: CancellationToken) {
    let subscribe = |fleet: &Fleet| {
        for kind in [
            TopicKind::Status,
            TopicKind::Events,
            TopicKind::Telemetry,
            TopicKind::Results,
        ] {
            if let Err(e) = fleet
                .mqtt
                .try_subscribe(fleet.prefix.all_devices(kind), QoS::AtLeastOnce)
            {
                tracing::error!(error = %e, "subscribe failed");
            }
        }
        // The root chain, for devices to walk forward after a rotation.
        let chain = serde_json::to_vec(fleet.signer.chain()).expect("roots serialize");
        if let Err(e) = fleet
            .mqtt
            .try_publish(fleet.prefix.roots(), QoS::AtLeastOnce, true, chain)
        {
            tracing::error!(error = %e, "cannot publish the root chain");
        }
        // After the subscriptions on the same connection, so an agent that
        // sees "online" knows its messages will be stored.
        announce(fleet, true);
    };
    // Unbounded, yet bounded in practice: messages stay unacknowledged
    // until ingested, and the broker sends only so many unacknowledged
    // messages at once. The event loop itself must never wait on it.
    let (ingest_tx, ingest_rx) = mpsc::unbounded_channel();
    let ingest_task = tokio::spawn(ingest(fleet.clone(), ingest_rx, shutdown.clone()));
    // The first ConnAck was consumed by `connect`.
    subscribe(&fleet);
    // After a key rotation, desired state signed by a key the new root
    // drops is signed again; queued after the chain, so devices see the
    // new root first.
    let resign = fleet.clone();
    tokio::spawn(async move {
        if let Err(e) = resign.resign_untrusted().await {
            tracing::error!(error = %e, "cannot re-sign desired state after a key rotation");
        }
    });
    let mut failures = 0u32;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                tracing::info!("reconnected to broker");
                subscribe(&fleet);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let inbound = match decode(&fleet.prefix, &publish.topic, &publish.payload) {
                    Ok(inbound) => Some(inbound),
                    Err(e) => {
                        tracing::warn!(error = %e, "inbound message dropped");
                        None
                    }
                };
                // A revoked device's messages are dropped (and acknowledged,
                // so the broker does not send them again).
                let inbound = inbound.filter(|i| match i.device() {
                    Some(device) if fleet.is_revoked(device.as_str()) => {
                        tracing::warn!(device = %device, "message from a revoked device dropped");
                        false
                    }
                    _ => true,
                });
                fleet.metrics.received(match &inbound {
                    Some(inbound) => inbound.kind(),
                    None => "dropped",
                });
                if ingest_tx.send((inbound, publish)).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis((200 * u64::from(failures)).min(5_000));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    drop(ingest_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), ingest_task).await;
    announce(&fleet, false);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_device_id_must_match_the_topic() {
        let prefix = TopicPrefix::default();
        let payload = br#"{"schema":1,"device_id":"pi-2","seq":1,"online":true,"at":0}"#;
        assert!(matches!(
            decode(&prefix, "edgefleet/v1/devices/pi-2/status", payload),
            Ok(Inbound::Status(_))
        ));
        assert_eq!(
            decode(&prefix, "edgefleet/v1/devices/pi-1/status", payload).unwrap_err(),
            InboundError::DeviceMismatch {
                topic: "edgefleet/v1/devices/pi-1/status".into(),
                claimed: "pi-2".into()
            }
        );
    }

    #[test]
    fn garbage_and_wrong_direction_are_dropped_with_reasons() {
        let prefix = TopicPrefix::default();
        assert!(matches!(
            decode(&prefix, "edgefleet/v1/devices/a/status", b"{"),
            Err(InboundError::Payload { .. })
        ));
        assert!(matches!(
            decode(&prefix, "edgefleet/v1/devices/a/desired", b"{}"),
            Err(InboundError::WrongDirection(_))
        ));
        assert!(matches!(
            decode(&prefix, "other/topic", b"{}"),
            Err(InboundError::Topic(_))
        ));
    }

    #[test]
    fn a_batch_decodes_to_all_its_records_and_every_one_must_match_the_topic() {
        let prefix = TopicPrefix::default();
        let topic = "edgefleet/v1/devices/pi-1/results";
        let result = |device: &str, seq: u64| {
            format!(
                r#"{{"schema":1,"device_id":"{device}","seq":{seq},"at":1,"model":"m","model_version":1,"runtime":"tract","request_id":null,"latency_us":5,"outputs":[]}}"#
            )
        };
        let batch = format!(" [{},{}]", result("pi-1", 4), result("pi-1", 5));
        let Ok(inbound) = decode(&prefix, topic, batch.as_bytes()) else {
            panic!("batch rejected")
        };
        let origin: Vec<u64> = inbound.origin().into_iter().map(|(_, s)| s).collect();
        assert_eq!(origin, vec![4, 5]);
        // One record of another device spoils the whole publish.
        let mixed = format!("[{},{}]", result("pi-1", 6), result("pi-2", 7));
        assert!(matches!(
            decode(&prefix, topic, mixed.as_bytes()),
            Err(InboundError::DeviceMismatch { claimed, .. }) if claimed == "pi-2"
        ));
        // A batch with one malformed record is refused, not half stored.
        let broken = format!("[{},{{}}]", result("pi-1", 8));
        assert!(matches!(
            decode(&prefix, topic, broken.as_bytes()),
            Err(InboundError::Payload { .. })
        ));
    }
}
