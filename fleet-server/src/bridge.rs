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
    DeviceTopic, InferenceResult, StatusMessage, TelemetryMessage, TopicKind, TopicPrefix,
    UpdateEvent,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::store::{self, Store, Streamed};

/// A message from a device, checked.
#[derive(Debug)]
pub enum Inbound {
    Status(StatusMessage),
    Event(UpdateEvent),
    Streamed(Streamed),
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
            let msg: TelemetryMessage = serde_json::from_slice(payload).map_err(payload_err)?;
            let claimed = msg.device_id.clone();
            (Inbound::Streamed(Streamed::Telemetry(msg)), claimed)
        }
        TopicKind::Results => {
            let msg: InferenceResult = serde_json::from_slice(payload).map_err(payload_err)?;
            let claimed = msg.device_id.clone();
            (Inbound::Streamed(Streamed::Result(msg)), claimed)
        }
        TopicKind::Desired => return Err(InboundError::WrongDirection(topic.into())),
    };
    if claimed != parsed.device {
        return Err(InboundError::DeviceMismatch {
            topic: topic.into(),
            claimed: claimed.to_string(),
        });
    }
    Ok(inbound)
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

/// Creates the server's MQTT client for `host:port`.
pub fn client(host: &str, port: u16, prefix: &TopicPrefix) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id(prefix), host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(1000)
        .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    AsyncClient::new(options, 4096)
}

/// Most streamed records stored per transaction.
const INGEST_BATCH: usize = 2000;

/// Stores telemetry and results in batches, then acknowledges them.
pub async fn ingest(store: Store, mqtt: AsyncClient, mut rx: mpsc::Receiver<(Streamed, Publish)>) {
    let mut batch = Vec::with_capacity(INGEST_BATCH);
    while rx.recv_many(&mut batch, INGEST_BATCH).await > 0 {
        let records: Vec<Streamed> = batch.iter().map(|(r, _)| r.clone()).collect();
        let stored = store
            .call(move |c| store::record_streamed(c, &records, edgefleet_shared::unix_now()))
            .await;
        match stored {
            Ok(_) => {
                for (_, publish) in batch.drain(..) {
                    let _ = mqtt.ack(&publish).await;
                }
            }
            Err(e) => {
                // Not acknowledged: the broker sends them again after the
                // next reconnect.
                tracing::error!(error = %e, records = batch.len(), "cannot store telemetry/results");
                batch.clear();
            }
        }
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
    };
    let (ingest_tx, ingest_rx) = mpsc::channel(4 * INGEST_BATCH);
    let ingest_task = tokio::spawn(ingest(fleet.store.clone(), fleet.mqtt.clone(), ingest_rx));
    // The first ConnAck was consumed by `connect`.
    subscribe(&fleet);
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
                match decode(&fleet.prefix, &publish.topic, &publish.payload) {
                    Ok(Inbound::Streamed(record)) => {
                        // Back-pressure: a slow store slows reading.
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            sent = ingest_tx.send((record, publish)) => if sent.is_err() { break },
                        }
                    }
                    Ok(inbound) => {
                        // Handle off the event loop so slow storage never stalls MQTT keep-alives.
                        let fleet = fleet.clone();
                        tokio::spawn(async move {
                            let result = match inbound {
                                Inbound::Status(s) => fleet.on_status(s).await,
                                Inbound::Event(e) => fleet.on_event(e).await,
                                Inbound::Streamed(_) => Ok(()),
                            };
                            match result {
                                Ok(()) => {
                                    let _ = fleet.mqtt.ack(&publish).await;
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "could not record device message")
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "inbound message dropped");
                        // Acknowledged, or the broker would send it forever.
                        let _ = fleet.mqtt.try_ack(&publish);
                    }
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
    let _ = fleet.mqtt.try_disconnect();
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
}
