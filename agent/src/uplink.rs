//! The fleet connection: one task owns the rumqttc event loop.
//!
//! It subscribes to the device's `desired` topic and hands each message to
//! the updater, and drains the durable outbox: records are published with
//! QoS 1 in a bounded window and deleted only when their PUBACK arrives.
//! The broker publishes the retained "offline" last will if the agent
//! drops; on every connect the agent re-sends its current status. rumqttc
//! reconnects on the next poll; between failed polls the task waits with
//! jittered exponential backoff. The session is persistent, so publishes
//! in flight at a disconnect are re-sent by rumqttc with the same packet
//! ids; anything lost anyway is re-sent from the outbox (the server
//! de-duplicates by device and sequence number).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use edgefleet_shared::{DeviceId, StatusMessage, TopicKind, TopicPrefix};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::outbox::{OutboxHandle, Stream};

/// Publishes awaiting their PUBACK at most.
pub const WINDOW: usize = 100;
/// Acknowledged records deleted per transaction at most.
const ACK_BATCH: usize = 256;
/// A publish not acknowledged this long while connected is sent again.
const INFLIGHT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Uplink {
    pub device: DeviceId,
    pub prefix: TopicPrefix,
    pub config: MqttConfig,
}

/// Whether the fleet connection is up, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub connected: bool,
    pub since: Instant,
}

impl Default for LinkState {
    fn default() -> Self {
        Self {
            connected: false,
            since: Instant::now(),
        }
    }
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

/// Which outbox record each QoS 1 publish carries. rumqttc assigns packet
/// ids when it writes a publish, in the order publishes were queued, and
/// reports each as `Outgoing::Publish(pkid)`; PUBACKs name the pkid.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Queued to rumqttc, packet id not known yet (in queue order).
    queued: VecDeque<(i64, Instant)>,
    by_pkid: HashMap<u16, (i64, Instant)>,
    /// Written long ago and never acknowledged: no longer counted as in
    /// flight (the drain sends the record again), but rumqttc still holds
    /// the packet id and a late PUBACK may come.
    expired: HashMap<u16, i64>,
    ids: HashSet<i64>,
}

impl Inflight {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn ids(&self) -> &HashSet<i64> {
        &self.ids
    }

    /// A record was handed to rumqttc.
    pub fn queued(&mut self, id: i64, now: Instant) {
        self.queued.push_back((id, now));
        self.ids.insert(id);
    }

    /// rumqttc could not take the record after all.
    pub fn unqueue_last(&mut self) {
        if let Some((id, _)) = self.queued.pop_back() {
            self.ids.remove(&id);
        }
    }

    /// rumqttc wrote a publish with `pkid`. A pkid already known is a
    /// re-send after a reconnect, not a new record.
    pub fn written(&mut self, pkid: u16) {
        if pkid == 0 || self.by_pkid.contains_key(&pkid) || self.expired.contains_key(&pkid) {
            return;
        }
        if let Some(entry) = self.queued.pop_front() {
            self.by_pkid.insert(pkid, entry);
        }
    }

    /// The broker acknowledged `pkid`: the record it carried, if any.
    pub fn acked(&mut self, pkid: u16) -> Option<i64> {
        if let Some(id) = self.expired.remove(&pkid) {
            return Some(id);
        }
        let (id, _) = self.by_pkid.remove(&pkid)?;
        self.ids.remove(&id);
        Some(id)
    }

    /// Stops counting records written more than `timeout` ago and never
    /// acknowledged, so the drain sends them again. A late PUBACK for one
    /// still deletes it.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let old: Vec<u16> = self
            .by_pkid
            .iter()
            .filter(|(_, (_, t))| now.duration_since(*t) > timeout)
            .map(|(pkid, _)| *pkid)
            .collect();
        for pkid in &old {
            if let Some((id, _)) = self.by_pkid.remove(pkid) {
                self.ids.remove(&id);
                self.expired.insert(*pkid, id);
            }
        }
        old.len()
    }
}

impl Uplink {
    pub async fn run(
        self,
        desired_tx: mpsc::Sender<Vec<u8>>,
        outbox: OutboxHandle,
        status: watch::Receiver<Option<StatusMessage>>,
        link: watch::Sender<LinkState>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let (host, port) = self.config.host_port()?;
        let topic = |kind| self.prefix.device(&self.device, kind).to_string();
        let desired_topic = topic(TopicKind::Desired);
        let status_topic = topic(TopicKind::Status);
        let topics: HashMap<Stream, String> = Stream::ALL
            .into_iter()
            .map(|s| (s, topic(s.topic())))
            .collect();

        let mut options = MqttOptions::new(self.device.as_str(), host, port);
        options
            .set_keep_alive(Duration::from_secs(self.config.keep_alive_secs.max(5)))
            .set_clean_session(false)
            .set_inflight(WINDOW as u16)
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
        let (client, mut eventloop) = AsyncClient::new(options, 2 * WINDOW);
        let mut failures = 0u32;
        let mut connected = false;
        let mut inflight = Inflight::default();
        let mut acked: Vec<i64> = Vec::new();
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
                        link.send_replace(LinkState { connected: true, since: Instant::now() });
                        tracing::info!(session_present = ack.session_present, "connected to broker");
                        client.try_subscribe(&desired_topic, QoS::AtLeastOnce)?;
                        // The broker may hold our last will ("offline"):
                        // say we are back.
                        if let Some(current) = status.borrow().clone() {
                            crate::report::push_status(&outbox, &current);
                        }
                        outbox.stored().notify_one();
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == desired_topic => {
                        if desired_tx.send(publish.payload.to_vec()).await.is_err() {
                            break;
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => inflight.written(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(id) = inflight.acked(ack.pkid) {
                            acked.push(id);
                            if acked.len() >= ACK_BATCH {
                                delete_acked(&outbox, &mut acked).await;
                            }
                        }
                        if inflight.len() < WINDOW / 2 {
                            outbox.stored().notify_one();
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if connected {
                            link.send_replace(LinkState { connected: false, since: Instant::now() });
                        }
                        connected = false;
                        failures += 1;
                        delete_acked(&outbox, &mut acked).await;
                        let wait = backoff(failures);
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                },
                _ = outbox.stored().notified(), if connected && inflight.len() < WINDOW => {
                    let room = WINDOW - inflight.len();
                    let exclude = inflight.ids().clone();
                    let h = outbox.clone();
                    let batch = tokio::task::spawn_blocking(move || h.next_batch(room, &exclude)).await?;
                    match batch {
                        Ok(records) => {
                            let full = records.len() == room;
                            for record in records {
                                inflight.queued(record.id, Instant::now());
                                let topic = &topics[&record.stream];
                                if client
                                    .try_publish(topic, QoS::AtLeastOnce, record.stream.retained(), record.payload)
                                    .is_err()
                                {
                                    inflight.unqueue_last();
                                    break;
                                }
                            }
                            if full && inflight.len() < WINDOW {
                                outbox.stored().notify_one();
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
                    }
                }
                _ = tick.tick() => {
                    delete_acked(&outbox, &mut acked).await;
                    if connected && inflight.expire(Instant::now(), INFLIGHT_TIMEOUT) > 0 {
                        outbox.stored().notify_one();
                    }
                }
            }
        }
        delete_acked(&outbox, &mut acked).await;
        // Graceful goodbye: say offline ourselves (the will only fires on
        // an unclean drop), then disconnect.
        if connected {
            let offline = serde_json::to_vec(&StatusMessage::offline(self.device.clone()))?;
            let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, offline);
            let _ = client.try_disconnect();
            let drain = async {
                while let Ok(event) = eventloop.poll().await {
                    match event {
                        Event::Outgoing(Outgoing::Disconnect) => break,
                        Event::Outgoing(Outgoing::Publish(pkid)) => inflight.written(pkid),
                        Event::Incoming(Packet::PubAck(ack)) => {
                            if let Some(id) = inflight.acked(ack.pkid) {
                                acked.push(id);
                            }
                        }
                        _ => {}
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
            delete_acked(&outbox, &mut acked).await;
        }
        Ok(())
    }
}

/// Deletes acknowledged records from the outbox in one transaction.
async fn delete_acked(outbox: &OutboxHandle, acked: &mut Vec<i64>) {
    if acked.is_empty() {
        return;
    }
    let ids = std::mem::take(acked);
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

    #[test]
    fn packet_ids_map_to_records_in_queue_order_and_resends_are_ignored() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(10, t);
        f.queued(11, t);
        f.queued(12, t);
        f.unqueue_last(); // rumqttc's queue was full for 12
        assert_eq!(f.len(), 2);
        f.written(1);
        f.written(2);
        // A reconnect re-sends pkid 1: still record 10, nothing shifts.
        f.written(1);
        assert_eq!(f.acked(2), Some(11));
        assert_eq!(f.acked(2), None, "a duplicate PUBACK deletes nothing");
        f.queued(13, t);
        f.written(2); // pkid 2 is free again and now carries 13
        assert_eq!(f.acked(1), Some(10));
        assert_eq!(f.acked(2), Some(13));
        assert!(f.is_empty());
        // QoS 0 publishes (pkid 0) never take a record.
        f.queued(14, t);
        f.written(0);
        assert_eq!(f.acked(0), None);
        assert!(f.ids().contains(&14));
    }

    #[test]
    fn stuck_records_expire_so_they_are_sent_again() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(1, t);
        f.written(7);
        let later = t + Duration::from_secs(61);
        f.queued(2, later);
        assert_eq!(f.expire(later, Duration::from_secs(60)), 1);
        assert_eq!(f.ids().iter().copied().collect::<Vec<_>>(), vec![2]);
        // A re-send of the expired packet does not take record 2's place.
        f.written(7);
        f.written(8);
        assert_eq!(f.acked(8), Some(2));
        // A late PUBACK for the expired record still names it.
        assert_eq!(f.acked(7), Some(1));
        assert!(f.is_empty());
    }
}
