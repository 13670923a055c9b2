//! What the agent tells the fleet: update events and its status. The
//! [`Reporter`] stamps each message with the device id, time and a
//! per-device sequence number, and hands it to the uplink.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use edgefleet_shared::{
    DeviceId, EventKind, ModelStatus, StatusMessage, UpdateEvent, SCHEMA_VERSION,
};
use tokio::sync::{mpsc, watch};

/// Per-device sequence numbers. They start from the boot time in
/// microseconds, so they keep increasing across restarts as long as the
/// clock does; the server de-duplicates on (device, seq).
#[derive(Debug, Clone)]
pub struct Sequence(Arc<AtomicU64>);

impl Default for Sequence {
    fn default() -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        Self(Arc::new(AtomicU64::new(start)))
    }
}

impl Sequence {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Sends events and status to the uplink (or only to the log when the
/// agent runs standalone).
#[derive(Debug, Clone)]
pub struct Reporter {
    device: Option<DeviceId>,
    seq: Sequence,
    events: Option<mpsc::UnboundedSender<UpdateEvent>>,
    status: Option<watch::Sender<Option<StatusMessage>>>,
}

impl Reporter {
    /// A reporter that only logs.
    pub fn standalone() -> Self {
        Self {
            device: None,
            seq: Sequence::default(),
            events: None,
            status: None,
        }
    }

    pub fn connected(
        device: DeviceId,
        events: mpsc::UnboundedSender<UpdateEvent>,
        status: watch::Sender<Option<StatusMessage>>,
    ) -> Self {
        Self {
            device: Some(device),
            seq: Sequence::default(),
            events: Some(events),
            status: Some(status),
        }
    }

    pub fn event(
        &self,
        kind: EventKind,
        desired_version: Option<u64>,
        model: Option<(&str, u64)>,
        reason: Option<String>,
    ) {
        let (Some(device), Some(tx)) = (&self.device, &self.events) else {
            return;
        };
        let event = UpdateEvent {
            schema: SCHEMA_VERSION,
            device_id: device.clone(),
            seq: self.seq.next(),
            at: edgefleet_shared::unix_now(),
            kind,
            desired_version,
            model: model.map(|(n, _)| n.to_string()),
            model_version: model.map(|(_, v)| v),
            reason,
        };
        let _ = tx.send(event);
    }

    pub fn status(&self, desired_version: Option<u64>, models: Vec<ModelStatus>) {
        let (Some(device), Some(tx)) = (&self.device, &self.status) else {
            return;
        };
        let msg = StatusMessage {
            schema: SCHEMA_VERSION,
            device_id: device.clone(),
            seq: self.seq.next(),
            online: true,
            at: edgefleet_shared::unix_now(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            desired_version,
            models,
        };
        tx.send_replace(Some(msg));
    }

    /// A fresh sequence number for re-publishing the current status.
    pub fn next_seq(&self) -> u64 {
        self.seq.next()
    }
}
