//! The server's MQTT connection: one task owns the rumqttc event loop,
//! subscribes to every device's `status` and `events`, checks each message
//! (topic shape, payload, device id matching the topic) and hands it to
//! [`Fleet`]. Logic never sees rumqttc types.

use std::time::Duration;

use edgefleet_shared::{DeviceTopic, StatusMessage, TopicKind, TopicPrefix, UpdateEvent};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;

/// A message from a device, checked.
#[derive(Debug)]
pub enum Inbound {
    Status(StatusMessage),
    Event(UpdateEvent),
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
        TopicKind::Desired | TopicKind::Telemetry => {
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

/// Creates the server's MQTT client for `host:port`.
pub fn client(host: &str, port: u16) -> (AsyncClient, EventLoop) {
    let id = format!("edgefleet-server-{}", std::process::id());
    let mut options = MqttOptions::new(id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    AsyncClient::new(options, 1024)
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
        for kind in [TopicKind::Status, TopicKind::Events] {
            if let Err(e) = fleet
                .mqtt
                .try_subscribe(fleet.prefix.all_devices(kind), QoS::AtLeastOnce)
            {
                tracing::error!(error = %e, "subscribe failed");
            }
        }
    };
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
                    Ok(inbound) => {
                        // Handle off the event loop so slow storage never stalls MQTT keep-alives.
                        let fleet = fleet.clone();
                        tokio::spawn(async move {
                            let result = match inbound {
                                Inbound::Status(s) => fleet.on_status(s).await,
                                Inbound::Event(e) => fleet.on_event(e).await,
                            };
                            if let Err(e) = result {
                                tracing::error!(error = %e, "could not record device message");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "inbound message dropped"),
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
