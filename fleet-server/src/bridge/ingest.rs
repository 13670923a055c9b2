//! From checked device messages to stored records and receipts: the
//! verify task checks publishes in batches (off the event loop), the
//! ingest task stores each round in one transaction, lets the rollouts
//! and the dashboard's view hear of it, and only then acknowledges the
//! publishes and sends the devices their signed receipts.

use std::time::Duration;

use edgefleet_shared::{DeviceId, PublicKey, Receipt, StatusMessage, TopicKind, UpdateEvent};
use rumqttc::{Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::inbound::{decode_batch, Inbound, InboundError};
use super::kick;
use crate::fleet::Fleet;
use crate::store::{self, StoreError, Streamed};

/// Most inbound messages handled per round.
const INGEST_BATCH: usize = 2000;

/// One received publish: what it carried if it was valid (`None` for a
/// dropped one, which is acknowledged all the same).
pub(super) type Received = (Option<Inbound>, Publish);

/// Stores what devices sent and acknowledges it, in the order it arrived
/// (MQTT requires PUBACKs in receive order, and acknowledging only after
/// storing is what makes a server crash lose nothing). Telemetry and
/// results of a round are stored in one transaction. A store failure is
/// retried until it succeeds, holding back the acknowledgements meanwhile.
pub(super) async fn ingest(
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
                on_messages(&fleet, statuses, events).await?;
                if !streamed.is_empty() {
                    fleet.rollouts.on_telemetry(&streamed).await;
                }
                // What the batch changed in rollouts is stored before the
                // batch is acknowledged.
                fleet.rollouts.flush().await?;
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
                &serde_json::to_vec(&receipt)
                    .expect("a receipt is plain data and always serialises"),
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

/// Checks what devices publish, in batches, and hands it to the ingest in
/// arrival order; refused messages go too (as `None`), to be acknowledged.
pub(super) async fn verify(
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

/// Records a batch of status messages and update events in one
/// transaction (each status also reads back what its device should
/// run), then acts on them in order: rollouts hear of presence, versions
/// and outcomes; a device seen for the first time joins the rollouts
/// that select it and gets its desired state.
pub(super) async fn on_messages(
    fleet: &Fleet,
    statuses: Vec<StatusMessage>,
    events: Vec<UpdateEvent>,
) -> Result<(), StoreError> {
    let statuses: Vec<StatusMessage> = statuses
        .into_iter()
        .filter(|m| {
            let stale = stale_will(fleet, m);
            if stale {
                tracing::debug!(device = %m.device_id, session = ?m.session, "last will of a replaced connection ignored");
            }
            !stale
        })
        .collect();
    if statuses.is_empty() && events.is_empty() {
        return Ok(());
    }
    let now = fleet.desired.clock.now();
    let (outcomes, new) = fleet.store.record_messages(&statuses, &events, now).await?;
    for (msg, outcome) in statuses.iter().zip(outcomes) {
        after_status(fleet, msg, outcome).await?;
    }
    for (event, new) in events.iter().zip(new) {
        if event.reason.is_some() {
            tracing::warn!(device = %event.device_id, kind = event.kind.as_str(), reason = ?event.reason, "device event");
        } else {
            tracing::info!(device = %event.device_id, kind = event.kind.as_str(), model = ?event.model, version = ?event.model_version, "device event");
        }
        if new {
            fleet.insights.on_event(event);
            fleet.rollouts.on_event(event).await;
        }
    }
    Ok(())
}

/// What follows a stored status message.
async fn after_status(
    fleet: &Fleet,
    msg: &StatusMessage,
    outcome: store::StatusOutcome,
) -> Result<(), StoreError> {
    let store::StatusOutcome {
        is_new,
        desired: stored,
    } = outcome;
    fleet.rollouts.on_status(msg).await;
    if is_new {
        if let Some(device) = fleet.store.get_device(msg.device_id.as_str()).await? {
            fleet.rollouts.on_join(&device).await;
        }
    }
    match stored {
        None => {}
        Some((_, None)) => {
            fleet.publish_desired(&msg.device_id).await?;
        }
        Some(_) if is_new => {
            fleet.publish_desired(&msg.device_id).await?;
        }
        Some((version, Some(bytes))) if msg.desired_version.unwrap_or(0) < version => {
            // The retained message may have been lost (e.g. an external
            // broker restarted without persistence): publish it again.
            fleet.desired.republish(&msg.device_id, bytes).await;
        }
        Some(_) => {}
    }
    Ok(())
}

/// Records an online status's connection number; true for an offline
/// message from a connection that a newer one has replaced (the broker
/// publishes the old connection's will when it drops it, which may be
/// after the new connection said it is online).
fn stale_will(fleet: &Fleet, msg: &StatusMessage) -> bool {
    let Some(session) = msg.session else {
        return false;
    };
    let Ok(mut sessions) = fleet.sessions.lock() else {
        return false;
    };
    let device = msg.device_id.as_str();
    if msg.online {
        let latest = sessions.entry(device.to_string()).or_insert(session);
        *latest = (*latest).max(session);
        false
    } else {
        sessions.get(device).is_some_and(|&latest| session < latest)
    }
}
