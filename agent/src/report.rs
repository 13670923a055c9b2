//! What the agent tells the fleet about updates: events and its status.
//! The [`Reporter`] stamps each message with the device id, time and a
//! per-device sequence number and appends it to the durable outbox.

use edgefleet_shared::{
    DeviceId, EventKind, ModelStatus, StatusMessage, UpdateEvent, SCHEMA_VERSION,
};
use tokio::sync::watch;

use crate::outbox::{OutboxHandle, Stream};

/// Sends update events and status through the outbox.
#[derive(Debug, Clone)]
pub struct Reporter {
    device: DeviceId,
    outbox: OutboxHandle,
    /// The latest status, which the uplink re-sends on every connect.
    status: watch::Sender<Option<StatusMessage>>,
    /// The latest refusal or rollback, for the status display.
    alert: watch::Sender<Option<String>>,
}

impl Reporter {
    pub fn new(
        device: DeviceId,
        outbox: OutboxHandle,
        status: watch::Sender<Option<StatusMessage>>,
        alert: watch::Sender<Option<String>>,
    ) -> Self {
        Self {
            device,
            outbox,
            status,
            alert,
        }
    }

    pub fn event(
        &self,
        kind: EventKind,
        desired_version: Option<u64>,
        model: Option<(&str, u64)>,
        reason: Option<String>,
    ) {
        match kind {
            EventKind::Refused | EventKind::RolledBack | EventKind::ActivationFailed => {
                let what = match model {
                    Some((name, version)) => format!("{} {name} v{version}", kind.as_str()),
                    None => kind.as_str().to_string(),
                };
                let text = match &reason {
                    Some(r) => format!("{what}: {r}"),
                    None => what,
                };
                self.alert.send_replace(Some(text));
            }
            EventKind::Activated => {
                self.alert.send_replace(None);
            }
            _ => {}
        }
        let mut event = UpdateEvent {
            schema: SCHEMA_VERSION,
            device_id: self.device.clone(),
            seq: 0,
            at: edgefleet_shared::unix_now(),
            kind,
            desired_version,
            model: model.map(|(n, _)| n.to_string()),
            model_version: model.map(|(_, v)| v),
            reason,
        };
        self.outbox.push(Stream::Events, |seq| {
            event.seq = seq;
            serde_json::to_vec(&event).expect("events serialize")
        });
    }

    pub fn status(&self, desired_version: Option<u64>, models: Vec<ModelStatus>) {
        let msg = StatusMessage {
            schema: SCHEMA_VERSION,
            device_id: self.device.clone(),
            seq: 0,
            online: true,
            at: 0,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            desired_version,
            models,
            session: None,
        };
        push_status(&self.outbox, &msg);
        self.status.send_replace(Some(msg));
    }
}

/// Appends `msg` to the outbox as the current status, with a fresh
/// sequence number and time.
pub fn push_status(outbox: &OutboxHandle, msg: &StatusMessage) {
    let mut msg = msg.clone();
    msg.at = edgefleet_shared::unix_now();
    outbox.push(Stream::Status, |seq| {
        msg.seq = seq;
        serde_json::to_vec(&msg).expect("status serializes")
    });
}
