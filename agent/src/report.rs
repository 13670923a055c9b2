//! What the agent tells the fleet about updates: events and its status.
//! The [`Reporter`] stamps each message with the device id, time and a
//! per-device sequence number and appends it to the durable outbox.
//! Refusals are first thinned out by [`refusals::RefusalCollapser`].

pub mod refusals;

use edgefleet_shared::{
    AgentStatus, DeviceId, EventKind, ModelStatus, StatusMessage, UpdateEvent, SCHEMA_VERSION,
};
use tokio::sync::watch;

use crate::outbox::{OutboxHandle, Retention, Stream};

/// Sends update events and status through the outbox.
#[derive(Debug, Clone)]
pub struct Reporter {
    device: DeviceId,
    outbox: OutboxHandle,
    /// The latest status, which the uplink re-sends on every connect.
    status: watch::Sender<Option<StatusMessage>>,
    /// The latest refusal or rollback, for the status display.
    alert: watch::Sender<Option<String>>,
    /// The running agent's target triple and release.
    agent: Option<AgentStatus>,
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
            agent: None,
        }
    }

    /// Says in every status which agent runs.
    pub fn with_agent(mut self, agent: AgentStatus) -> Self {
        self.agent = Some(agent);
        self
    }

    /// Reports an event about the agent itself: release `release`.
    pub fn agent_event(
        &self,
        kind: EventKind,
        desired_version: Option<u64>,
        release: &str,
        reason: Option<String>,
    ) {
        self.push_event(kind, desired_version, None, Some(release), reason);
    }

    /// Reports an update event. Refusals may be dropped while they wait in
    /// memory for a full disk ([`Retention::DropFirst`]): anyone who can
    /// publish on the device's topics can provoke them. Every other event
    /// is kept.
    pub fn event(
        &self,
        kind: EventKind,
        desired_version: Option<u64>,
        model: Option<(&str, u64)>,
        reason: Option<String>,
    ) {
        self.push_event(kind, desired_version, model, None, reason);
    }

    fn push_event(
        &self,
        kind: EventKind,
        desired_version: Option<u64>,
        model: Option<(&str, u64)>,
        agent_version: Option<&str>,
        reason: Option<String>,
    ) {
        match kind {
            EventKind::Refused | EventKind::RolledBack | EventKind::ActivationFailed => {
                let what = match (model, agent_version) {
                    (Some((name, version)), _) => format!("{} {name} v{version}", kind.as_str()),
                    (None, Some(release)) => format!("{} agent {release}", kind.as_str()),
                    (None, None) => kind.as_str().to_string(),
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
            agent_version: agent_version.map(str::to_string),
        };
        let retention = match kind {
            EventKind::Refused => Retention::DropFirst,
            _ => Retention::Keep,
        };
        self.outbox.push_with(Stream::Events, retention, |seq| {
            event.seq = seq;
            serde_json::to_vec(&event)
                .expect("an UpdateEvent is plain data with string keys and always serialises")
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
            agent: self.agent.clone(),
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
        serde_json::to_vec(&msg)
            .expect("a StatusMessage is plain data with string keys and always serialises")
    });
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use crate::outbox::{Sequence, StreamPolicy};

    use super::*;

    #[test]
    fn refused_events_count_against_the_memory_bound_and_genuine_ones_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = OutboxHandle::open(
            &dir.path().join("outbox.db"),
            Stream::ALL.map(StreamPolicy::default_for),
            48 * 1024,
            20,
            Sequence::persistent(&dir.path().join("seq")).unwrap(),
        )
        .unwrap();
        let reporter = Reporter::new(
            DeviceId::new("pi-1").unwrap(),
            outbox.clone(),
            watch::channel(None).0,
            watch::channel(None).0,
        );
        // Fill the database to its cap with events: the disk refuses more.
        let mut on_disk = 0;
        let full = loop {
            for _ in 0..10 {
                reporter.event(EventKind::Accepted, Some(1), None, Some("x".repeat(400)));
            }
            match outbox.flush() {
                Ok(n) => on_disk += n,
                Err(e) => break e,
            }
        };
        assert!(full.is_disk_full(), "{full}");
        for i in 0..10_000u64 {
            reporter.event(
                EventKind::Refused,
                Some(i),
                None,
                Some(format!("desired state version {i} is not newer")),
            );
            if i == 5_000 {
                reporter.event(EventKind::Activated, Some(7), Some(("m", 2)), None);
            }
        }
        let health = outbox.health();
        // The ten accepted events of the failed flush, the activation and
        // the newest refusals up to the bound.
        assert_eq!(health.memory_depth, 20);
        assert_eq!(health.dropped, 10_000 - 9);
        let sent = outbox.next_batch(on_disk, &HashSet::new()).unwrap();
        outbox
            .ack(&sent.iter().map(|r| r.seq).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(outbox.flush().unwrap(), 20);
        let kinds: Vec<EventKind> = outbox
            .next_batch(100, &HashSet::new())
            .unwrap()
            .iter()
            .map(|r| {
                serde_json::from_slice::<UpdateEvent>(&r.payload)
                    .unwrap()
                    .kind
            })
            .collect();
        let count = |k: EventKind| kinds.iter().filter(|x| **x == k).count();
        assert_eq!(count(EventKind::Accepted), 10);
        assert_eq!(count(EventKind::Activated), 1, "the genuine event was kept");
        assert_eq!(count(EventKind::Refused), 9);
    }
}
