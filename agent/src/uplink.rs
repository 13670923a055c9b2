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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use edgefleet_shared::messages::LinkHealth;
use edgefleet_shared::signed_message::{seal, MessageError, SignedMessage};
use edgefleet_shared::{
    DeviceId, PublicKey, Receipt, RootDocument, SecretKey, ServerStatus, StatusMessage, TopicKind,
    TopicPrefix,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::outbox::{OutboxHandle, Stream};

/// Publishes awaiting their PUBACK at most (rumqttc's window).
pub const WINDOW: usize = 256;
/// Records in flight at most (published, not yet receipted).
pub const RECORD_WINDOW: usize = 1024;
/// Most bytes of records batched into one publish.
pub const MAX_PUBLISH_BYTES: usize = 256 * 1024;
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

pub struct Uplink {
    pub device: DeviceId,
    pub prefix: TopicPrefix,
    pub config: MqttConfig,
    /// Signs every publish.
    pub key: SecretKey,
    /// What receipts and the server's status must be signed by.
    pub server_keys: ServerKeys,
    /// What was refused, for telemetry.
    pub health: LinkCounters,
}

/// The fleet server's online keys: the trusted root's desired-state role,
/// kept current by the updater as the root rotates.
#[derive(Debug, Clone, Default)]
pub struct ServerKeys(Arc<(RwLock<Vec<PublicKey>>, AtomicU64)>);

impl ServerKeys {
    pub fn set(&self, root: &RootDocument) {
        let keys = root.desired_keys().map(|(_, k)| *k).collect();
        *self.0 .0.write().unwrap_or_else(|e| e.into_inner()) = keys;
        self.0 .1.fetch_add(1, Ordering::Release);
    }

    /// Counts the changes of keys, so a message refused for its key can be
    /// checked again once the keys change.
    pub fn generation(&self) -> u64 {
        self.0 .1.load(Ordering::Acquire)
    }

    /// Opens a message on `topic` that must be signed by the server.
    pub fn open<'a>(&self, payload: &'a [u8], topic: &str) -> Result<&'a [u8], MessageError> {
        let keys = self.0 .0.read().unwrap_or_else(|e| e.into_inner());
        SignedMessage::open(payload, topic, keys.iter())
    }
}

/// Messages from the fleet that the agent refused (forged or unsigned
/// receipts and server statuses), shared with telemetry.
#[derive(Debug, Clone, Default)]
pub struct LinkCounters(Arc<(AtomicU64, Mutex<Option<String>>)>);

impl LinkCounters {
    pub fn rejected(&self, what: &str, reason: &str) {
        let count = self.0 .0.fetch_add(1, Ordering::Relaxed) + 1;
        // The first few are logged; after that every thousandth, so a flood
        // cannot fill the log.
        if count <= 10 || count % 1000 == 0 {
            tracing::warn!(what, reason, count, "message from the fleet refused");
        }
        *self.0 .1.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{what}: {reason}"));
    }

    pub fn snapshot(&self) -> LinkHealth {
        LinkHealth {
            rejected_messages: self.0 .0.load(Ordering::Relaxed),
            last_rejection: self.0 .1.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// Whether the fleet server is storing, from its signed status: a newer
/// server connection's status replaces an older one's, and within one
/// connection "offline" (its last will) is final, so a replayed older
/// status changes nothing. A signed receipt also proves a server is
/// storing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServerPresence {
    /// The newest server connection heard of.
    session: Option<u64>,
    /// That connection said "offline".
    ended: bool,
    /// Heard "online" (or a receipt) since the agent's own connection.
    online: bool,
}

impl ServerPresence {
    pub fn online(&self) -> bool {
        self.online && !self.ended
    }

    /// Takes a verified status.
    pub fn status(&mut self, status: &ServerStatus) {
        match self.session {
            Some(known) if status.session < known => {}
            Some(known) if status.session == known => {
                if status.online {
                    self.online = true;
                } else {
                    self.ended = true;
                }
            }
            _ => {
                self.session = Some(status.session);
                self.ended = !status.online;
                self.online = status.online;
            }
        }
    }

    /// A verified receipt arrived.
    pub fn receipt(&mut self) {
        self.online = true;
        self.ended = false;
    }

    /// The agent's connection to the broker is gone: wait to hear again.
    pub fn disconnected(&mut self) {
        self.online = false;
    }
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

/// When a record counts as delivered and leaves the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeleteOn {
    /// The fleet server's receipt says it is stored (default).
    #[default]
    Receipt,
    /// The broker acknowledged it (for a broker with some other consumer
    /// that holds a persistent session).
    Puback,
}

/// One publish on its way: the records it carries (one, or a batch of
/// telemetry or results).
#[derive(Debug, Clone)]
struct Entry {
    seqs: Vec<u64>,
    at: Instant,
}

/// The records in flight. rumqttc assigns packet ids when it writes a
/// publish, in the order publishes were queued, and reports each as
/// `Outgoing::Publish(pkid)`; PUBACKs name the pkid; receipts name
/// sequence numbers. [`Inflight::len`] counts records, not publishes.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Queued to rumqttc, packet id not known yet (in queue order).
    queued: VecDeque<Entry>,
    /// Written, awaiting the broker's PUBACK. Records receipted before
    /// their PUBACK stay listed here (the packet id stays taken) but no
    /// longer count.
    by_pkid: HashMap<u16, Entry>,
    /// Acknowledged by the broker, awaiting the server's receipt.
    awaiting: HashMap<u64, Instant>,
    /// Packet ids rumqttc still holds whose records no longer count here
    /// (expired): a re-send or a late PUBACK for one changes nothing.
    stale: HashSet<u16>,
    /// Every record that counts as in flight.
    seqs: HashSet<u64>,
}

impl Inflight {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn seqs(&self) -> &HashSet<u64> {
        &self.seqs
    }

    /// A publish carrying `seqs` was handed to rumqttc.
    pub fn queued(&mut self, seqs: Vec<u64>, now: Instant) {
        self.seqs.extend(seqs.iter().copied());
        self.queued.push_back(Entry { seqs, at: now });
    }

    /// rumqttc could not take the last publish after all.
    pub fn unqueue_last(&mut self) {
        if let Some(e) = self.queued.pop_back() {
            for seq in &e.seqs {
                self.seqs.remove(seq);
            }
        }
    }

    /// rumqttc wrote a publish with `pkid`. A pkid already known is a
    /// re-send after a reconnect, not a new publish.
    pub fn written(&mut self, pkid: u16, now: Instant) {
        if pkid == 0 || self.by_pkid.contains_key(&pkid) || self.stale.contains(&pkid) {
            return;
        }
        if let Some(mut e) = self.queued.pop_front() {
            e.at = now;
            self.by_pkid.insert(pkid, e);
        }
    }

    /// The broker acknowledged `pkid`. With [`DeleteOn::Puback`] returns
    /// the sequence numbers it delivered; otherwise its records now wait
    /// for their receipt.
    pub fn acked(&mut self, pkid: u16, mode: DeleteOn, now: Instant) -> Vec<u64> {
        if self.stale.remove(&pkid) {
            return Vec::new();
        }
        let Some(e) = self.by_pkid.remove(&pkid) else {
            return Vec::new();
        };
        // Those receipted meanwhile are done already.
        let live = e.seqs.into_iter().filter(|s| self.seqs.contains(s));
        match mode {
            DeleteOn::Puback => {
                let done: Vec<u64> = live.collect();
                for seq in &done {
                    self.seqs.remove(seq);
                }
                done
            }
            DeleteOn::Receipt => {
                for seq in live.collect::<Vec<_>>() {
                    self.awaiting.insert(seq, now);
                }
                Vec::new()
            }
        }
    }

    /// The server stored `seq`. Returns whether it was in flight here.
    pub fn receipted(&mut self, seq: u64) -> bool {
        if self.queued.iter().any(|e| e.seqs.contains(&seq)) {
            // Not written yet: it will be written and acknowledged all
            // the same, and counted then.
            return false;
        }
        self.awaiting.remove(&seq);
        self.seqs.remove(&seq)
    }

    /// Forgets everything: the broker started a new session, and rumqttc
    /// dropped whatever it had not delivered, so all of it is sent again
    /// from the outbox.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Stops counting records written (or acknowledged) more than
    /// `timeout` ago without the next step, so the drain sends them again
    /// (the server de-duplicates). Returns how many records expired.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let old = |at: Instant| now.duration_since(at) > timeout;
        let pkids: Vec<u16> = self
            .by_pkid
            .iter()
            .filter(|(_, e)| old(e.at))
            .map(|(p, _)| *p)
            .collect();
        let mut expired = 0;
        for pkid in &pkids {
            if let Some(e) = self.by_pkid.remove(pkid) {
                for seq in &e.seqs {
                    expired += usize::from(self.seqs.remove(seq));
                }
                self.stale.insert(*pkid);
            }
        }
        let seqs: Vec<u64> = self
            .awaiting
            .iter()
            .filter(|(_, at)| old(**at))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &seqs {
            self.awaiting.remove(seq);
            expired += usize::from(self.seqs.remove(seq));
        }
        expired
    }
}

/// Splits a drain batch into publishes: telemetry and results records next
/// to each other on the same stream share one publish (a JSON array), up
/// to `max_records` and [`MAX_PUBLISH_BYTES`]; events and status go one
/// per publish. Returns index ranges into `records`.
pub fn group(records: &[crate::outbox::Record], max_records: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < records.len() {
        let stream = records[start].stream;
        let mut end = start + 1;
        let mut bytes = records[start].payload.len();
        if stream.batched() {
            while end < records.len()
                && end - start < max_records
                && records[end].stream == stream
                && bytes + records[end].payload.len() < MAX_PUBLISH_BYTES
            {
                bytes += records[end].payload.len() + 1;
                end += 1;
            }
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The payload of one publish: the record itself, or a JSON array of them.
fn publish_payload(records: &mut [crate::outbox::Record]) -> Vec<u8> {
    if let [one] = records {
        return std::mem::take(&mut one.payload);
    }
    let size = records.iter().map(|r| r.payload.len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(size);
    out.push(b'[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&r.payload);
    }
    out.push(b']');
    out
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

    pub async fn run(
        self,
        desired_tx: mpsc::Sender<FromFleet>,
        outbox: OutboxHandle,
        status: watch::Receiver<Option<StatusMessage>>,
        link: watch::Sender<LinkState>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
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
        let will = |session: u64| -> anyhow::Result<LastWill> {
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
            .set_inflight(WINDOW as u16)
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
                        link.send_replace(LinkState { connected: true, since: Instant::now() });
                        tracing::info!(session_present = ack.session_present, "connected to broker");
                        if !ack.session_present {
                            // rumqttc discards unacknowledged publishes
                            // on a new session; they are still in the outbox.
                            inflight.clear();
                        }
                        // The chain first: a desired state signed after a
                        // key rotation verifies only against the new root.
                        client.try_subscribe(&roots_topic, QoS::AtLeastOnce)?;
                        client.try_subscribe(&desired_topic, QoS::AtLeastOnce)?;
                        if mode == DeleteOn::Receipt {
                            client.try_subscribe(&receipts_topic, QoS::AtLeastOnce)?;
                            client.try_subscribe(&server_topic, QoS::AtLeastOnce)?;
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
                            link.send_replace(LinkState { connected: false, since: Instant::now() });
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
                _ = tick.tick() => {
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

    fn none() -> Vec<u64> {
        Vec::new()
    }

    #[test]
    fn packet_ids_map_to_records_in_queue_order_and_resends_are_ignored() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![10], t);
        f.queued(vec![11], t);
        f.queued(vec![12], t);
        f.unqueue_last(); // rumqttc's queue was full for 12
        assert_eq!(f.len(), 2);
        f.written(1, t);
        f.written(2, t);
        // A reconnect re-sends pkid 1: still record 10, nothing shifts.
        f.written(1, t);
        assert_eq!(f.acked(2, DeleteOn::Puback, t), vec![11]);
        assert_eq!(
            f.acked(2, DeleteOn::Puback, t),
            none(),
            "a duplicate PUBACK"
        );
        f.queued(vec![13], t);
        f.written(2, t); // pkid 2 is free again and now carries 13
        assert_eq!(f.acked(1, DeleteOn::Puback, t), vec![10]);
        assert_eq!(f.acked(2, DeleteOn::Puback, t), vec![13]);
        assert!(f.is_empty());
        // QoS 0 publishes (pkid 0) never take a record.
        f.queued(vec![14], t);
        f.written(0, t);
        assert_eq!(f.acked(0, DeleteOn::Puback, t), none());
        assert!(f.seqs().contains(&14));
    }

    #[test]
    fn a_batch_is_acknowledged_and_receipted_record_by_record() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![1, 2, 3], t);
        f.queued(vec![4, 5], t);
        assert_eq!(f.len(), 5);
        f.unqueue_last();
        assert_eq!(f.len(), 3, "the whole refused publish leaves");
        f.written(7, t);
        assert_eq!(f.acked(7, DeleteOn::Puback, t), vec![1, 2, 3]);
        assert!(f.is_empty());

        f.queued(vec![4, 5, 6], t);
        f.written(8, t);
        // The server stored 5 before the broker's PUBACK came back.
        assert!(f.receipted(5));
        assert_eq!(f.len(), 2);
        assert_eq!(f.acked(8, DeleteOn::Receipt, t), none());
        assert_eq!(f.len(), 2, "4 and 6 wait for their receipts");
        assert!(f.receipted(4));
        assert!(f.receipted(6));
        assert!(!f.receipted(6), "a duplicate receipt");
        assert!(f.is_empty());
    }

    #[test]
    fn with_receipts_a_puback_is_not_delivery() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![10], t);
        f.queued(vec![11], t);
        f.written(1, t);
        f.written(2, t);
        assert_eq!(f.acked(1, DeleteOn::Receipt, t), none());
        assert_eq!(f.len(), 2, "still in flight until the receipt");
        f.receipted(10);
        assert_eq!(f.len(), 1);
        // A receipt may overtake the PUBACK: the late PUBACK is ignored,
        // and pkid 2 stays reserved until it comes.
        f.receipted(11);
        assert!(f.is_empty());
        f.queued(vec![12], t);
        f.written(2, t); // rumqttc re-sending the old pkid 2
        assert_eq!(f.acked(2, DeleteOn::Receipt, t), none());
        f.written(3, t);
        assert_eq!(f.acked(3, DeleteOn::Puback, t), vec![12]);
        // Receipts for unknown numbers (an earlier run's) change nothing.
        assert!(!f.receipted(999));
        assert!(f.is_empty());
    }

    #[test]
    fn stuck_records_expire_so_they_are_sent_again() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![1], t);
        f.written(7, t);
        f.queued(vec![2], t);
        f.written(8, t);
        f.acked(8, DeleteOn::Receipt, t);
        let later = t + Duration::from_secs(61);
        f.queued(vec![3], later);
        assert_eq!(f.expire(later, Duration::from_secs(60)), 2);
        assert_eq!(f.seqs().iter().copied().collect::<Vec<_>>(), vec![3]);
        // A re-send of the expired packet does not take record 3's place.
        f.written(7, later);
        f.written(9, later);
        assert_eq!(f.acked(9, DeleteOn::Puback, later), vec![3]);
        // A late PUBACK for the expired record changes nothing.
        assert_eq!(f.acked(7, DeleteOn::Puback, later), none());
        assert!(f.is_empty());
    }

    #[test]
    fn a_new_session_starts_from_scratch() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![1], t);
        f.queued(vec![2], t);
        f.written(5, t);
        // The broker lost the session: rumqttc drops 1 and 2 unsent.
        f.clear();
        f.queued(vec![3], t);
        f.written(1, t);
        // pkid 1 now carries 3, not the stale 2.
        assert_eq!(f.acked(1, DeleteOn::Puback, t), vec![3]);
        assert_eq!(f.acked(5, DeleteOn::Puback, t), none());
    }

    fn server(online: bool, session: u64) -> ServerStatus {
        ServerStatus {
            online,
            at: 0,
            session,
        }
    }

    #[test]
    fn a_replayed_older_server_status_changes_nothing() {
        let mut p = ServerPresence::default();
        assert!(!p.online(), "nothing heard yet");
        p.status(&server(true, 5));
        assert!(p.online());
        // An old connection's "offline", replayed: ignored.
        p.status(&server(false, 4));
        assert!(p.online());
        // This connection's last will is final for it...
        p.status(&server(false, 5));
        assert!(!p.online());
        p.status(&server(true, 5));
        assert!(!p.online(), "a replayed online of an ended connection");
        // ...until a newer connection says online.
        p.status(&server(true, 6));
        assert!(p.online());
    }

    #[test]
    fn after_a_reconnect_the_retained_status_counts_again() {
        let mut p = ServerPresence::default();
        p.status(&server(true, 7));
        p.disconnected();
        assert!(!p.online(), "unknown while the agent is not connected");
        // The broker hands the retained status of the same connection.
        p.status(&server(true, 7));
        assert!(p.online());
    }

    #[test]
    fn a_signed_receipt_proves_the_server_is_storing() {
        let mut p = ServerPresence::default();
        p.status(&server(false, 9));
        assert!(!p.online());
        p.receipt();
        assert!(p.online());
    }

    #[test]
    fn only_the_online_keys_of_the_trusted_root_open_server_messages() {
        let root_key = SecretKey::from_seed([1; 32]);
        let online = SecretKey::from_seed([2; 32]);
        let device = SecretKey::from_seed([3; 32]);
        let root = RootDocument::new(1, u64::MAX, &[root_key.public()], 1, &[online.public()]);
        let keys = ServerKeys::default();
        keys.set(&root);
        let topic = "edgefleet/v1/devices/d/receipts";
        let msg = br#"{"schema":1,"device_id":"d","seqs":[[1,2]]}"#;
        assert_eq!(keys.open(&seal(topic, msg, &online), topic).unwrap(), msg);
        for forged in [
            seal(topic, msg, &device),
            seal(topic, msg, &root_key),
            msg.to_vec(),
        ] {
            assert!(keys.open(&forged, topic).is_err());
        }
    }

    fn record(seq: u64, stream: Stream, bytes: usize) -> crate::outbox::Record {
        crate::outbox::Record {
            id: seq as i64,
            stream,
            seq,
            created_at: 0,
            payload: vec![b'x'; bytes],
        }
    }

    #[test]
    fn batches_group_neighbours_of_one_stream_within_the_limits() {
        use Stream::*;
        let records: Vec<_> = [Events, Events, Status, Telemetry, Telemetry, Telemetry]
            .into_iter()
            .chain([Results; 5])
            .enumerate()
            .map(|(i, s)| record(i as u64 + 1, s, 10))
            .collect();
        let groups = group(&records, 2);
        assert_eq!(
            groups,
            vec![0..1, 1..2, 2..3, 3..5, 5..6, 6..8, 8..10, 10..11]
        );
        assert_eq!(group(&records, 1).len(), records.len());
        // The byte limit splits a batch too.
        let big: Vec<_> = (1..=3)
            .map(|i| record(i, Results, MAX_PUBLISH_BYTES / 2))
            .collect();
        assert_eq!(group(&big, 32), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn a_batch_is_a_json_array_of_the_records() {
        let mut one = vec![record(1, Stream::Results, 0)];
        one[0].payload = br#"{"a":1}"#.to_vec();
        assert_eq!(publish_payload(&mut one), br#"{"a":1}"#);
        let mut two = vec![one[0].clone(), one[0].clone()];
        two[0].payload = br#"{"a":1}"#.to_vec();
        two[1].payload = br#"{"b":2}"#.to_vec();
        let v: serde_json::Value = serde_json::from_slice(&publish_payload(&mut two)).unwrap();
        assert_eq!(v, serde_json::json!([{"a": 1}, {"b": 2}]));
    }
}
