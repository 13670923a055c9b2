//! The fleet connection: one task owns the rumqttc event loop.
//!
//! It subscribes to the device's `desired` topic and hands each message to
//! the updater, and drains the durable outbox: records are published with
//! QoS 1 in a bounded window and deleted only when the fleet server's
//! receipt says they are stored (or, with `delete_on = "puback"`, when the
//! broker acknowledges them). It drains only while the fleet server's
//! retained status says online: the server announces itself after it has
//! subscribed, so nothing is published into a broker with nobody to
//! store it (an embedded broker just restarted, or a server that is down).
//! The broker publishes the retained "offline" last will if the agent
//! drops; on every connect the agent re-sends its current status. rumqttc
//! reconnects on the next poll; between failed polls the task waits with
//! jittered exponential backoff. The session is clean: whatever was in
//! flight at a disconnect is re-sent from the outbox (the server
//! de-duplicates by device and sequence number), and the desired state is
//! retained, so a broker-side session would add nothing but state.
//!
//! The pieces without I/O live in submodules, each tested on its own:
//! [`inflight`] tracks what is on its way, [`batch`] groups records into
//! publishes, [`fleet_server`] holds the server's keys and presence, and
//! [`link`] the link state other tasks read.

pub mod batch;
pub mod fleet_server;
pub mod inflight;
pub mod link;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use edgefleet_shared::signed_message::{seal, MessageError};
use edgefleet_shared::{
    DeviceId, Receipt, SecretKey, ServerStatus, StatusMessage, TopicKind, TopicPrefix,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use batch::{group, MAX_PUBLISH_BYTES};
pub use fleet_server::{ServerKeys, ServerPresence};
pub use inflight::Inflight;
pub use link::{LinkCounters, LinkState};

use crate::config::{ConfigError, MqttConfig, PUBLISH_WINDOW};
use crate::outbox::{DeleteOn, OutboxHandle, Stream};
use batch::publish_payload;

/// Why the uplink stopped. Connection failures are not among these: the
/// task reconnects by itself; these are what no reconnect can fix.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot encode the device's offline status: {0}")]
    EncodeStatus(#[from] serde_json::Error),
    #[error("cannot subscribe to {topic}: {source}")]
    Subscribe {
        topic: String,
        source: rumqttc::ClientError,
    },
    #[error("the outbox reader task failed: {0}")]
    OutboxReader(#[from] tokio::task::JoinError),
}

/// Records in flight at most (published, not yet receipted).
pub const RECORD_WINDOW: usize = 1024;
/// Delivered records deleted per transaction at most.
const ACK_BATCH: usize = RECORD_WINDOW / 4;
/// A publish without its PUBACK (or, after it, its receipt) this long
/// while connected is sent again.
const INFLIGHT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most sequence numbers taken from one receipt.
const MAX_RECEIPT: usize = 100_000;
/// While the server's status says offline, a few records are still sent
/// this often: a signed receipt for them proves the server is storing
/// (a replayed "offline" status must not stall the outbox for good).
const PROBE_EVERY: Duration = Duration::from_secs(30);
/// Records sent by one such probe.
const PROBE_RECORDS: usize = 16;

/// What the fleet sends the device, handed to the updater.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromFleet {
    /// A signed desired state (the payload as received).
    Desired(Vec<u8>),
    /// The root chain (a JSON array of signed root documents).
    Roots(Vec<u8>),
}

/// The fleet connection's settings and shared handles; [`Uplink::run`]
/// is the task.
pub struct Uplink {
    /// This device (its MQTT client id and topics).
    pub device: DeviceId,
    /// The fleet's topic prefix.
    pub prefix: TopicPrefix,
    /// The `[mqtt]` config.
    pub config: MqttConfig,
    /// Signs every publish.
    pub key: SecretKey,
    /// What receipts and the server's status must be signed by.
    pub server_keys: ServerKeys,
    /// What was refused, for telemetry.
    pub health: LinkCounters,
    /// Told when the device's key has been registered with the server:
    /// records sent before were refused unreceipted, so whatever is in
    /// flight is sent again then rather than after [`INFLIGHT_TIMEOUT`].
    pub key_registered: std::sync::Arc<tokio::sync::Notify>,
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
    /// Takes a server status: verified, it updates `presence`; refused, it
    /// is counted, and returned with the key generation when the reason
    /// was its key (to be checked again once the keys change).
    fn server_status(
        &self,
        payload: &[u8],
        topic: &str,
        presence: &mut ServerPresence,
        outbox: &OutboxHandle,
    ) -> Option<(Vec<u8>, u64)> {
        let generation = self.server_keys.generation();
        let message = match self.server_keys.open(payload, topic) {
            Ok(message) => message,
            Err(e) => {
                self.health.rejected("server status", &e.to_string());
                return matches!(e, MessageError::UntrustedKey { .. })
                    .then(|| (payload.to_vec(), generation));
            }
        };
        match serde_json::from_slice::<ServerStatus>(message) {
            Ok(status) => {
                let was = presence.online();
                presence.status(&status);
                if presence.online() != was {
                    tracing::info!(
                        online = presence.online(),
                        session = status.session,
                        "fleet server status"
                    );
                }
                if presence.online() {
                    outbox.stored().notify_one();
                }
            }
            Err(e) => self.health.rejected("server status", &e.to_string()),
        }
        None
    }

    /// Runs until `shutdown`: connects (and reconnects with backoff),
    /// hands what the fleet sends to `desired_tx`, publishes each new
    /// `status`, drains `outbox`, and keeps `link` current. Says goodbye
    /// (an "offline" status) on the way out.
    pub async fn run(
        self,
        desired_tx: mpsc::Sender<FromFleet>,
        outbox: OutboxHandle,
        status: watch::Receiver<Option<StatusMessage>>,
        link: watch::Sender<LinkState>,
        shutdown: CancellationToken,
    ) -> Result<(), UplinkError> {
        let (host, port) = self.config.host_port()?;
        let topic = |kind| self.prefix.device(&self.device, kind).to_string();
        let desired_topic = topic(TopicKind::Desired);
        let receipts_topic = topic(TopicKind::Receipts);
        let server_topic = self.prefix.server_status();
        let roots_topic = self.prefix.roots();
        let mode = self.config.delete_on;
        let batch_records = self.config.batch_records;
        let status_topic = topic(TopicKind::Status);
        let topics: HashMap<Stream, String> = Stream::ALL
            .into_iter()
            .map(|s| (s, topic(s.topic())))
            .collect();

        // Each connection has its number, in its "online" status and its
        // last will, so the server can tell a late will of a connection
        // already replaced from a real drop.
        let mut session = edgefleet_shared::messages::next_session(None);
        // Signed now: the broker publishes it for us when we drop.
        let will = |session: u64| -> Result<LastWill, UplinkError> {
            let msg = serde_json::to_vec(&StatusMessage::will(self.device.clone(), session))?;
            Ok(LastWill::new(
                &status_topic,
                seal(&status_topic, &msg, &self.key),
                QoS::AtLeastOnce,
                true,
            ))
        };
        let mut options = MqttOptions::new(self.device.as_str(), host, port);
        options
            .set_keep_alive(Duration::from_secs(self.config.keep_alive_secs.max(5)))
            // A clean session by default: everything a broker-side
            // session would hold is already covered (records are re-sent
            // from the outbox until receipted, desired state is retained),
            // and a broker keeps nothing for a device that never returns.
            .set_clean_session(self.config.clean_session)
            .set_inflight(PUBLISH_WINDOW as u16)
            .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024)
            .set_last_will(will(session)?);
        if let (Some(user), Some(pass)) = (&self.config.username, &self.config.password) {
            options.set_credentials(user, pass);
        }
        if let Some(transport) = self.config.tls_transport()? {
            options.set_transport(transport);
        }
        let (client, mut eventloop) = AsyncClient::new(options, RECORD_WINDOW);
        // Small packets in a window: Nagle's algorithm would hold each one
        // back waiting for the previous one's TCP acknowledgement.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let mut failures = 0u32;
        let mut connected = false;
        let mut inflight = Inflight::default();
        let mut delivered: Vec<u64> = Vec::new();
        // Whether the last refill filled the window, so more may be waiting
        // beyond what is in flight.
        let mut more = true;
        // Without receipts there is no server to wait for.
        let mut presence = ServerPresence::default();
        let server_online = |p: &ServerPresence| mode == DeleteOn::Puback || p.online();
        // A few records sent while the server seems offline (PROBE_EVERY).
        let mut probe = false;
        let mut last_probe = Instant::now();
        // A server status refused for its key, and the key generation then.
        let mut unverified_status: Option<(Vec<u8>, u64)> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whatever is on disk from before a restart is sent first.
        outbox.stored().notify_one();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        failures = 0;
                        connected = true;
                        link.send_replace(LinkState { connected: true, since: Instant::now(), stored: false });
                        tracing::info!(session_present = ack.session_present, "connected to broker");
                        if !ack.session_present {
                            // rumqttc discards unacknowledged publishes
                            // on a new session; they are still in the outbox.
                            inflight.clear();
                        }
                        // The chain first: a desired state signed after a
                        // key rotation verifies only against the new root.
                        subscribe(&client, &roots_topic)?;
                        subscribe(&client, &desired_topic)?;
                        if mode == DeleteOn::Receipt {
                            subscribe(&client, &receipts_topic)?;
                            subscribe(&client, &server_topic)?;
                        }
                        // The broker may hold our last will ("offline"):
                        // say we are back.
                        if let Some(mut current) = status.borrow().clone() {
                            current.session = Some(session);
                            crate::report::push_status(&outbox, &current);
                        }
                        outbox.stored().notify_one();
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == desired_topic => {
                        if desired_tx.send(FromFleet::Desired(publish.payload.to_vec())).await.is_err() {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == roots_topic => {
                        if desired_tx.send(FromFleet::Roots(publish.payload.to_vec())).await.is_err() {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == server_topic => {
                        // The retained status can arrive before the root
                        // chain that trusts its key has reached the
                        // updater (after a rotation): one refused for its
                        // key is checked again when the keys change.
                        unverified_status = self.server_status(&publish.payload, &server_topic, &mut presence, &outbox);
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == receipts_topic => {
                        let receipt = self.server_keys.open(&publish.payload, &receipts_topic)
                            .map_err(|e| e.to_string())
                            .and_then(|msg| serde_json::from_slice::<Receipt>(msg).map_err(|e| format!("malformed: {e}")));
                        match receipt {
                            Ok(receipt) if receipt.device_id == self.device => {
                                if !presence.online() {
                                    tracing::info!("fleet server is storing (signed receipt)");
                                }
                                presence.receipt();
                                link.send_if_modified(|state| !std::mem::replace(&mut state.stored, true));
                                // Only records actually in flight leave the
                                // outbox: a receipt names what the server
                                // stored of what was sent, nothing else.
                                for seq in receipt.each(MAX_RECEIPT) {
                                    if inflight.receipted(seq) {
                                        delivered.push(seq);
                                    }
                                }
                                if delivered.len() >= ACK_BATCH {
                                    delete_delivered(&outbox, &mut delivered).await;
                                }
                                if more && inflight.len() <= RECORD_WINDOW / 2 {
                                    outbox.stored().notify_one();
                                }
                            }
                            Ok(receipt) => self.health.rejected("receipt", &format!("names device {}", receipt.device_id)),
                            Err(reason) => self.health.rejected("receipt", &reason),
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => inflight.written(pkid, Instant::now()),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if mode == DeleteOn::Puback {
                            link.send_if_modified(|state| !std::mem::replace(&mut state.stored, true));
                        }
                        delivered.extend(inflight.acked(ack.pkid, mode, Instant::now()));
                        if delivered.len() >= ACK_BATCH {
                            delete_delivered(&outbox, &mut delivered).await;
                        }
                        if more && inflight.len() <= RECORD_WINDOW / 2 {
                            outbox.stored().notify_one();
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        presence.disconnected();
                        if connected {
                            link.send_replace(LinkState { connected: false, since: Instant::now(), stored: false });
                        }
                        connected = false;
                        failures += 1;
                        session = edgefleet_shared::messages::next_session(Some(session));
                        eventloop.mqtt_options.set_last_will(will(session)?);
                        delete_delivered(&outbox, &mut delivered).await;
                        let wait = backoff(failures);
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                },
                _ = outbox.stored().notified(), if connected && (server_online(&presence) || probe) && inflight.len() < RECORD_WINDOW => {
                    let mut room = RECORD_WINDOW - inflight.len();
                    if !server_online(&presence) {
                        room = room.min(PROBE_RECORDS);
                        probe = false;
                        last_probe = Instant::now();
                    }
                    // In flight, or delivered and about to be deleted.
                    let mut exclude = inflight.seqs().clone();
                    exclude.extend(delivered.iter().copied());
                    let h = outbox.clone();
                    let batch = tokio::task::spawn_blocking(move || h.next_batch(room, &exclude)).await?;
                    match batch {
                        Ok(mut records) => {
                            tracing::debug!(records = records.len(), in_flight = inflight.len(), "draining");
                            let full = records.len() == room;
                            more = full;
                            for range in group(&records, batch_records) {
                                let stream = records[range.start].stream;
                                let chunk = &mut records[range];
                                inflight.queued(chunk.iter().map(|r| r.seq).collect(), Instant::now());
                                let topic = &topics[&stream];
                                let payload = seal(topic, &publish_payload(chunk), &self.key);
                                if client
                                    .try_publish(topic, QoS::AtLeastOnce, stream.retained(), payload)
                                    .is_err()
                                {
                                    inflight.unqueue_last();
                                    more = true;
                                    tracing::debug!("rumqttc queue full");
                                    break;
                                }
                            }
                            if full && inflight.len() < RECORD_WINDOW && server_online(&presence) {
                                outbox.stored().notify_one();
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
                    }
                }
                // While a connection is being set up only the event loop
                // runs: dropping its poll mid-connect would drop a CONNECT
                // the broker took, and the broker would publish this
                // connection's last will, "offline", under the same
                // connection number the next one says "online" with.
                _ = self.key_registered.notified(), if connected => {
                    if connected && inflight.expire(Instant::now(), Duration::ZERO) > 0 {
                        tracing::debug!("device key registered: records in flight sent again");
                        outbox.stored().notify_one();
                    }
                }
                _ = tick.tick(), if connected => {
                    delete_delivered(&outbox, &mut delivered).await;
                    if let Some((payload, generation)) = unverified_status.take() {
                        unverified_status = if self.server_keys.generation() == generation {
                            Some((payload, generation))
                        } else {
                            self.server_status(&payload, &server_topic, &mut presence, &outbox)
                        };
                    }
                    if connected && inflight.expire(Instant::now(), INFLIGHT_TIMEOUT) > 0 {
                        outbox.stored().notify_one();
                    }
                    if connected && !server_online(&presence) && !probe && last_probe.elapsed() >= PROBE_EVERY {
                        probe = true;
                        outbox.stored().notify_one();
                    }
                }
            }
        }
        delete_delivered(&outbox, &mut delivered).await;
        // Graceful goodbye: say offline ourselves (the will only fires on
        // an unclean drop), then disconnect.
        if connected {
            let offline = serde_json::to_vec(&StatusMessage::will(self.device.clone(), session))?;
            let offline = seal(&status_topic, &offline, &self.key);
            let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, offline);
            let _ = client.try_disconnect();
            let drain = async {
                while let Ok(event) = eventloop.poll().await {
                    match event {
                        Event::Outgoing(Outgoing::Disconnect) => break,
                        Event::Outgoing(Outgoing::Publish(pkid)) => {
                            inflight.written(pkid, Instant::now())
                        }
                        Event::Incoming(Packet::PubAck(ack)) => {
                            delivered.extend(inflight.acked(ack.pkid, mode, Instant::now()));
                        }
                        _ => {}
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
            delete_delivered(&outbox, &mut delivered).await;
        }
        Ok(())
    }
}

/// Subscribes to `topic` with QoS 1.
fn subscribe(client: &AsyncClient, topic: &str) -> Result<(), UplinkError> {
    client
        .try_subscribe(topic, QoS::AtLeastOnce)
        .map_err(|source| UplinkError::Subscribe {
            topic: topic.to_string(),
            source,
        })
}

/// Deletes delivered records from the outbox in one transaction.
async fn delete_delivered(outbox: &OutboxHandle, delivered: &mut Vec<u64>) {
    if delivered.is_empty() {
        return;
    }
    let ids = std::mem::take(delivered);
    let h = outbox.clone();
    match tokio::task::spawn_blocking(move || h.ack(&ids)).await {
        Ok(Ok(())) => {}
        // Not deleted: they are sent again later and de-duplicated.
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete acknowledged records"),
        Err(e) => tracing::warn!(error = %e, "ack task failed"),
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
