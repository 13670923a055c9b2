//! The server's MQTT connection: one task owns the rumqttc event loop,
//! subscribes to every device's `status`, `events`, `telemetry` and
//! `results`, checks each message (topic shape, the device's signature
//! with its registered key, payload, device id matching the topic) and
//! hands it to [`Fleet`]; telemetry and results go to the [`ingest`] task,
//! which stores them in batches. What the server publishes that makes an
//! agent act (receipts, its own status) is signed with its online key.
//!
//! Delivery: the session is persistent (a fixed client id per topic
//! prefix, clean session off), so an external broker keeps QoS 1 messages
//! for the server while it is down; and a message is acknowledged only
//! after it is stored, so a server crash never loses one. Redelivered
//! copies are de-duplicated by (device, sequence number) in the store.

use std::time::Duration;

use edgefleet_shared::{
    DeviceId, DeviceTopic, InferenceResult, MessageError, PublicKey, Receipt, ServerStatus,
    SignedMessage, StatusMessage, TelemetryMessage, TopicKind, TopicPrefix, UpdateEvent,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::device_keys::{DeviceKeys, KeyCheck};
use crate::fleet::Fleet;
use crate::keys::Signer;
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
    #[error("message on {topic} refused: {source}")]
    Signature {
        topic: String,
        device: DeviceId,
        source: MessageError,
    },
}

impl InboundError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Topic(_) => "topic",
            Self::Payload { .. } => "payload",
            Self::DeviceMismatch { .. } => "device_mismatch",
            Self::WrongDirection(_) => "wrong_direction",
            Self::Signature { source, .. } => source.label(),
        }
    }

    /// The device whose topic it came on, where the topic was valid.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Self::Signature { device, .. } => Some(device),
            _ => None,
        }
    }
}

/// A checked message, and the key to pin when it was the first one of a
/// device that was never enrolled.
#[derive(Debug)]
pub struct Checked {
    pub inbound: Inbound,
    pub pin: Option<PublicKey>,
}

/// Parses and checks one inbound publish: the signature first (with the
/// key `keys` holds for the topic's device), then the message it covers.
pub fn decode(
    prefix: &TopicPrefix,
    keys: &DeviceKeys,
    topic: &str,
    payload: &[u8],
) -> Result<Checked, InboundError> {
    let parsed: DeviceTopic = prefix
        .parse(topic)
        .map_err(|e| InboundError::Topic(e.to_string()))?;
    if matches!(parsed.kind, TopicKind::Desired | TopicKind::Receipts) {
        return Err(InboundError::WrongDirection(topic.into()));
    }
    let refused = |source: MessageError| InboundError::Signature {
        topic: topic.to_string(),
        device: parsed.device.clone(),
        source,
    };
    let signed = SignedMessage::parse(payload).map_err(refused)?;
    let check = keys
        .check(parsed.device.as_str(), &signed.key, topic)
        .map_err(refused)?;
    let payload = signed.verify(topic).map_err(refused)?;
    let pin = (check == KeyCheck::PinFirstUse).then_some(signed.key);
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
    Ok(Checked { inbound, pin })
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

/// The server's status for connection `session`, signed, as published on
/// the server status topic.
fn server_status(signer: &Signer, prefix: &TopicPrefix, online: bool, session: u64) -> Vec<u8> {
    let status = ServerStatus {
        online,
        at: edgefleet_shared::unix_now(),
        session,
    };
    let msg = serde_json::to_vec(&status).expect("status serializes");
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
) -> (AsyncClient, EventLoop) {
    let mut options = login.options(client_id(prefix));
    options
        .set_last_will(will(signer, prefix, session))
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
        save_pinned_keys(&fleet).await;
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
            let topic = fleet
                .prefix
                .device(&receipt.device_id, TopicKind::Receipts)
                .to_string();
            let payload = fleet.signer.seal(
                &topic,
                &serde_json::to_vec(&receipt).expect("receipts serialize"),
            );
            fleet.metrics.published("receipts");
            if let Err(e) = fleet
                .mqtt
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
            {
                tracing::warn!(error = %e, "cannot send a receipt");
            }
        }
    }
}

/// Decodes and checks each of `publishes` ([`decode`]), in order, the
/// halves of a batch on two threads: a signature check costs about 50 µs,
/// the whole of a message's handling otherwise a few.
pub fn decode_batch(
    prefix: &TopicPrefix,
    keys: &DeviceKeys,
    publishes: &[(&str, &[u8])],
) -> Vec<Result<Checked, InboundError>> {
    let one = |(topic, payload): &(&str, &[u8])| decode(prefix, keys, topic, payload);
    if publishes.len() < 8 {
        return publishes.iter().map(one).collect();
    }
    let (first, second) = publishes.split_at(publishes.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| first.iter().map(one).collect::<Vec<_>>());
        let mut rest: Vec<_> = second.iter().map(one).collect();
        let mut out = other
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        out.append(&mut rest);
        out
    })
}

/// Checks what devices publish, in batches, and hands it to the ingest in
/// arrival order; refused messages go too (as `None`), to be acknowledged.
async fn verify(
    fleet: Fleet,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    ingest_tx: mpsc::UnboundedSender<Received>,
) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        let publishes = std::mem::take(&mut batch);
        let checker = fleet.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let items: Vec<(&str, &[u8])> = publishes
                .iter()
                .map(|p| (p.topic.as_str(), &p.payload[..]))
                .collect();
            let results = decode_batch(&checker.prefix, &checker.device_keys, &items);
            (publishes, results)
        })
        .await;
        let Ok((publishes, results)) = checked else {
            tracing::error!("message checking failed; stopping the MQTT ingest");
            return;
        };
        for (publish, result) in publishes.into_iter().zip(results) {
            let inbound = match result {
                Ok(checked) => {
                    if let Some(key) = checked.pin {
                        pin_first_key(&fleet, &checked.inbound, key);
                    }
                    Some(checked.inbound)
                }
                Err(e) => {
                    refused(&fleet, &e);
                    None
                }
            };
            // A revoked device's messages are dropped (and acknowledged,
            // so the broker does not send them again). An external broker
            // may let it back in until its password file is reloaded: each
            // of its messages ends its session again.
            let inbound = inbound.filter(|i| match i.device() {
                Some(device) if fleet.is_revoked(device.as_str()) => {
                    tracing::warn!(device = %device, "message from a revoked device dropped");
                    kick(&fleet, device.as_str());
                    false
                }
                _ => true,
            });
            fleet.metrics.received(match &inbound {
                Some(inbound) => inbound.kind(),
                None => "dropped",
            });
            if ingest_tx.send((inbound, publish)).is_err() {
                return;
            }
        }
    }
}

/// Publishes the root chain, retained.
fn publish_chain(fleet: &Fleet) {
    let chain = serde_json::to_vec(&fleet.signer.chain()).expect("roots serialize");
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
#[derive(Debug, Default)]
struct ServerTopics {
    last: Option<tokio::time::Instant>,
    roots_pending: bool,
    status_pending: bool,
}

const RESTORE_EVERY: Duration = Duration::from_secs(1);

impl ServerTopics {
    fn check(&mut self, fleet: &Fleet, publish: &Publish, session: u64) {
        if publish.topic == fleet.prefix.roots() {
            let ours = serde_json::to_vec(&fleet.signer.chain()).expect("roots serialize");
            if publish.payload[..] != ours[..] {
                tracing::warn!("the retained root chain was overwritten; publishing it again");
                fleet.metrics.rejected("server_topic");
                self.roots_pending = true;
            }
        } else {
            let topic = fleet.prefix.server_status();
            let key = fleet.signer.public_key();
            let genuine = SignedMessage::open(&publish.payload, &topic, [key].iter())
                .ok()
                .and_then(|msg| serde_json::from_slice::<ServerStatus>(msg).ok())
                .is_some_and(|s| s.session == session && s.online);
            // An empty retained message is the broker clearing it.
            if !genuine && !publish.payload.is_empty() {
                tracing::warn!("the retained server status was overwritten; announcing again");
                fleet.metrics.rejected("server_topic");
                self.status_pending = true;
            }
        }
        if self.due() <= tokio::time::Instant::now() {
            self.restore(fleet, session);
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

/// Logs (rate-limited per device by the counters), counts and remembers a
/// refused message.
fn refused(fleet: &Fleet, e: &InboundError) {
    fleet.metrics.rejected(e.label());
    match e.device() {
        Some(device) => {
            let count = fleet.device_keys.rejected(
                device.as_str(),
                &e.to_string(),
                edgefleet_shared::unix_now(),
            );
            if count <= 1 || count % 1000 == 0 {
                tracing::warn!(device = %device, count, error = %e, "device message refused");
            }
        }
        None => tracing::warn!(error = %e, "inbound message dropped"),
    }
}

/// Pins a never-enrolled device's first key (open fleets only); the
/// ingest stores it once the device's first messages are stored.
fn pin_first_key(fleet: &Fleet, inbound: &Inbound, key: PublicKey) {
    let Some(device) = inbound.device() else {
        return;
    };
    if fleet.device_keys.pin(device.as_str(), key) {
        tracing::warn!(device = %device, key = %key.to_hex(), "device key pinned on first use (the device was never enrolled)");
    }
}

/// Stores the keys pinned on first use whose devices are stored now.
async fn save_pinned_keys(fleet: &Fleet) {
    for (device, key) in fleet.device_keys.unsaved() {
        match fleet
            .store
            .set_device_key(&device, &key.to_hex(), crate::store::KeyWrite::FirstOnly)
            .await
        {
            Ok(Some(stored)) if stored == key.to_hex() => fleet.device_keys.saved(&device, key),
            Ok(Some(_)) => {
                tracing::error!(device = %device, "another key is stored for this device; an operator decides (fleetctl devices set-key)")
            }
            // Not stored yet: tried again after the next batch.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(device = %device, error = %e, "cannot store a pinned device key yet")
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

/// How the server reaches a broker: where, with which user name and
/// password, and over TLS (`mqtts://`) or not.
#[derive(Clone)]
pub struct BrokerLogin {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    pub tls: Option<rumqttc::Transport>,
}

impl BrokerLogin {
    /// Options for client `id` with this login.
    fn options(&self, id: String) -> MqttOptions {
        let mut options = MqttOptions::new(id, self.host.clone(), self.port);
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user, password);
        }
        if let Some(tls) = &self.tls {
            options.set_transport(tls.clone());
        }
        options
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
    shutdown: CancellationToken,
) {
    let subscribe = |fleet: &Fleet, session: u64| {
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
    let ingest_task = tokio::spawn(ingest(fleet.clone(), ingest_rx, shutdown.clone()));
    // Signatures are checked off the event loop, a batch at a time on
    // two threads, in arrival order.
    let (verify_tx, verify_rx) = mpsc::unbounded_channel();
    let verify_task = tokio::spawn(verify(fleet.clone(), verify_rx, ingest_tx));
    // The first ConnAck was consumed by `connect`.
    subscribe(&fleet, session);
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
    let mut guard = ServerTopics::default();
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
                guard.check(&fleet, &publish, session);
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

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::signed_message::seal;
    use edgefleet_shared::SecretKey;

    fn key() -> SecretKey {
        SecretKey::from_seed([9; 32])
    }

    /// An open fleet: any never-enrolled device's first key is taken.
    fn open_fleet() -> DeviceKeys {
        DeviceKeys::new(&[], true)
    }

    fn signed(topic: &str, payload: &[u8]) -> Vec<u8> {
        seal(topic, payload, &key())
    }

    fn check(prefix: &TopicPrefix, topic: &str, payload: &[u8]) -> Result<Inbound, InboundError> {
        decode(prefix, &open_fleet(), topic, &signed(topic, payload)).map(|c| c.inbound)
    }

    #[test]
    fn payload_device_id_must_match_the_topic() {
        let prefix = TopicPrefix::default();
        let payload = br#"{"schema":1,"device_id":"pi-2","seq":1,"online":true,"at":0}"#;
        assert!(matches!(
            check(&prefix, "edgefleet/v1/devices/pi-2/status", payload),
            Ok(Inbound::Status(_))
        ));
        assert_eq!(
            check(&prefix, "edgefleet/v1/devices/pi-1/status", payload).unwrap_err(),
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
            decode(
                &prefix,
                &open_fleet(),
                "edgefleet/v1/devices/a/status",
                b"{"
            ),
            Err(InboundError::Signature { .. })
        ));
        assert!(matches!(
            decode(
                &prefix,
                &open_fleet(),
                "edgefleet/v1/devices/a/desired",
                b"{}"
            ),
            Err(InboundError::WrongDirection(_))
        ));
        assert!(matches!(
            decode(&prefix, &open_fleet(), "other/topic", b"{}"),
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
        let Ok(inbound) = check(&prefix, topic, batch.as_bytes()) else {
            panic!("batch rejected")
        };
        let origin: Vec<u64> = inbound.origin().into_iter().map(|(_, s)| s).collect();
        assert_eq!(origin, vec![4, 5]);
        // One record of another device spoils the whole publish.
        let mixed = format!("[{},{}]", result("pi-1", 6), result("pi-2", 7));
        assert!(matches!(
            check(&prefix, topic, mixed.as_bytes()),
            Err(InboundError::DeviceMismatch { claimed, .. }) if claimed == "pi-2"
        ));
        // A batch with one malformed record is refused, not half stored.
        let broken = format!("[{},{{}}]", result("pi-1", 8));
        assert!(matches!(
            check(&prefix, topic, broken.as_bytes()),
            Err(InboundError::Payload { .. })
        ));
    }

    #[test]
    fn only_the_devices_own_key_opens_its_topics() {
        let prefix = TopicPrefix::default();
        let topic = "edgefleet/v1/devices/pi-1/events";
        let event = br#"{"schema":1,"device_id":"pi-1","seq":3,"at":1,"kind":"rolled_back","reason":"forged"}"#;
        let pi1 = key();
        let other = SecretKey::from_seed([8; 32]);
        let record = |id: &str, key: &SecretKey| crate::store::DeviceRecord {
            enrolled_at: Some(1),
            public_key: Some(key.public().to_hex()),
            ..crate::store::DeviceRecord::new(id)
        };
        let keys = DeviceKeys::new(&[record("pi-1", &pi1), record("pi-2", &other)], false);
        // The device itself.
        let ok = decode(&prefix, &keys, topic, &seal(topic, event, &pi1)).unwrap();
        assert!(ok.pin.is_none());
        // Another enrolled device forging it with its own key.
        let forged = decode(&prefix, &keys, topic, &seal(topic, event, &other)).unwrap_err();
        assert_eq!(forged.label(), "untrusted_key", "{forged}");
        // Unsigned, as a stock MQTT client would send it.
        let unsigned = decode(&prefix, &keys, topic, event).unwrap_err();
        assert_eq!(unsigned.label(), "unsigned", "{unsigned}");
        // pi-1's genuine message replayed on pi-2's topic.
        let replayed = decode(
            &prefix,
            &keys,
            "edgefleet/v1/devices/pi-2/events",
            &seal(topic, event, &pi1),
        )
        .unwrap_err();
        assert_eq!(replayed.label(), "untrusted_key", "{replayed}");
        // First use pins only on an open fleet, and says so.
        let open = decode(&prefix, &open_fleet(), topic, &seal(topic, event, &pi1)).unwrap();
        assert_eq!(open.pin, Some(pi1.public()));
    }

    #[test]
    fn a_batch_is_checked_on_two_threads_and_keeps_its_order() {
        let prefix = TopicPrefix::default();
        let keys = open_fleet();
        let topics: Vec<String> = (0..20)
            .map(|i| format!("edgefleet/v1/devices/pi-{i}/events"))
            .collect();
        let payloads: Vec<Vec<u8>> = (0..20)
            .map(|i| {
                let event = format!(
                    r#"{{"schema":1,"device_id":"pi-{i}","seq":{},"at":1,"kind":"accepted"}}"#,
                    i + 1
                );
                if i % 5 == 3 {
                    event.into_bytes() // unsigned: refused
                } else {
                    signed(&topics[i], event.as_bytes())
                }
            })
            .collect();
        let items: Vec<(&str, &[u8])> = topics
            .iter()
            .map(String::as_str)
            .zip(payloads.iter().map(Vec::as_slice))
            .collect();
        let results = decode_batch(&prefix, &keys, &items);
        assert_eq!(results.len(), 20);
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(c) => {
                    assert_ne!(i % 5, 3);
                    assert_eq!(c.inbound.origin()[0].1, i as u64 + 1, "order kept");
                }
                Err(e) => assert_eq!((i % 5, e.label()), (3, "unsigned")),
            }
        }
    }
}
