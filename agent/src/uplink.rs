//! The fleet connection: one task owns the rumqttc event loop.
//!
//! It subscribes to the device's `desired` topic and hands each message to
//! the updater; it publishes update events (QoS 1) and the retained status;
//! the broker publishes the retained "offline" last will if the agent
//! drops. rumqttc reconnects on the next poll; between failed polls the
//! task waits with jittered exponential backoff.

use std::time::Duration;

use edgefleet_shared::{DeviceId, StatusMessage, TopicKind, TopicPrefix, UpdateEvent};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;

pub struct Uplink {
    pub device: DeviceId,
    pub prefix: TopicPrefix,
    pub config: MqttConfig,
}

fn backoff(failures: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << failures.min(7)).min(30_000);
    // Cheap jitter without a RNG dependency: the sub-second clock.
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) % (base / 2 + 1))
        .unwrap_or(0);
    Duration::from_millis(base / 2 + jitter)
}

impl Uplink {
    pub async fn run(
        self,
        desired_tx: mpsc::Sender<Vec<u8>>,
        mut events: mpsc::UnboundedReceiver<UpdateEvent>,
        mut status: watch::Receiver<Option<StatusMessage>>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let (host, port) = self.config.host_port()?;
        let desired_topic = self
            .prefix
            .device(&self.device, TopicKind::Desired)
            .to_string();
        let status_topic = self
            .prefix
            .device(&self.device, TopicKind::Status)
            .to_string();
        let events_topic = self
            .prefix
            .device(&self.device, TopicKind::Events)
            .to_string();

        let mut options = MqttOptions::new(self.device.as_str(), host, port);
        options
            .set_keep_alive(Duration::from_secs(self.config.keep_alive_secs.max(5)))
            .set_clean_session(false)
            .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024)
            .set_last_will(LastWill::new(
                &status_topic,
                serde_json::to_vec(&StatusMessage::offline(self.device.clone()))?,
                QoS::AtLeastOnce,
                true,
            ));
        if let (Some(user), Some(pass)) = (&self.config.username, &self.config.password) {
            options.set_credentials(user, pass);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let mut failures = 0u32;
        let mut connected = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        failures = 0;
                        connected = true;
                        tracing::info!(session_present = ack.session_present, "connected to broker");
                        client.try_subscribe(&desired_topic, QoS::AtLeastOnce)?;
                        status.mark_changed();
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == desired_topic => {
                        if desired_tx.send(publish.payload.to_vec()).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        connected = false;
                        failures += 1;
                        let wait = backoff(failures);
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                },
                Some(event) = events.recv(), if connected => {
                    let payload = serde_json::to_vec(&event)?;
                    if let Err(e) = client.try_publish(&events_topic, QoS::AtLeastOnce, false, payload) {
                        tracing::warn!(error = %e, "event not queued");
                    }
                }
                Ok(()) = status.changed(), if connected => {
                    let current = status.borrow_and_update().clone();
                    if let Some(mut msg) = current {
                        msg.at = edgefleet_shared::unix_now();
                        let payload = serde_json::to_vec(&msg)?;
                        if let Err(e) = client.try_publish(&status_topic, QoS::AtLeastOnce, true, payload) {
                            tracing::warn!(error = %e, "status not queued");
                        }
                    }
                }
            }
        }
        // Graceful goodbye: say offline ourselves (the will only fires on
        // an unclean drop), then disconnect.
        if connected {
            let offline = serde_json::to_vec(&StatusMessage::offline(self.device.clone()))?;
            let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, offline);
            let _ = client.try_disconnect();
            let drain = async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(400));
        assert!(backoff(3) >= Duration::from_millis(800));
        assert!(backoff(50) <= Duration::from_millis(30_000));
        assert!(backoff(50) >= Duration::from_millis(12_800));
    }
}
