//! What a device may do on the embedded broker when devices authenticate:
//! publish only its own `status` (retained), `events`, `telemetry` and
//! `results`; subscribe only to its own `desired` and `receipts`, the
//! server's status and the root chain, without wildcards; leave a last
//! will only on its own status. A device that tries anything else is
//! disconnected: a well-behaved agent never does. Signatures remain the
//! guarantee (the broker is untrusted transport); this is defence in
//! depth, and it keeps a device from reading another device's desired
//! state and telemetry.

use edgefleet_shared::{DeviceId, TopicKind, TopicPrefix};

/// What a device may do, by topic.
#[derive(Debug, Clone)]
pub struct Acl {
    prefix: TopicPrefix,
}

impl Acl {
    pub fn new(prefix: TopicPrefix) -> Self {
        Self { prefix }
    }

    /// Whether `device` may publish on `topic` (with the retain flag).
    pub fn may_publish(&self, device: &DeviceId, topic: &str, retain: bool) -> Result<(), String> {
        let parsed = self
            .prefix
            .parse(topic)
            .map_err(|_| format!("devices publish only under their own topics, not {topic:?}"))?;
        if parsed.device != *device {
            return Err(format!("{topic:?} belongs to device {}", parsed.device));
        }
        match parsed.kind {
            TopicKind::Status => Ok(()),
            TopicKind::Events | TopicKind::Telemetry | TopicKind::Results if !retain => Ok(()),
            TopicKind::Events | TopicKind::Telemetry | TopicKind::Results => {
                Err(format!("{topic:?} is not retained"))
            }
            TopicKind::Desired | TopicKind::Receipts => {
                Err(format!("only the fleet server publishes on {topic:?}"))
            }
        }
    }

    /// Whether `device` may subscribe to `filter`.
    pub fn may_subscribe(&self, device: &DeviceId, filter: &str) -> Result<(), String> {
        let own = |kind| self.prefix.device(device, kind).to_string();
        if filter == own(TopicKind::Desired)
            || filter == own(TopicKind::Receipts)
            || filter == self.prefix.server_status()
            || filter == self.prefix.roots()
        {
            Ok(())
        } else {
            Err(format!(
                "devices subscribe only to their own desired state and receipts, the server status and the root chain, not {filter:?}"
            ))
        }
    }

    /// Whether a device's last will may be `topic`.
    pub fn may_will(&self, device: &DeviceId, topic: &str) -> Result<(), String> {
        let status = self.prefix.device(device, TopicKind::Status).to_string();
        if topic == status {
            Ok(())
        } else {
            Err(format!(
                "a device's last will goes on its own status topic, not {topic:?}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> (Acl, DeviceId) {
        (
            Acl::new(TopicPrefix::default()),
            DeviceId::new("dev-a").unwrap(),
        )
    }

    #[test]
    fn a_device_publishes_only_its_own_uplink_topics() {
        let (acl, a) = acl();
        for kind in ["status", "events", "telemetry", "results"] {
            let topic = format!("edgefleet/v1/devices/dev-a/{kind}");
            assert!(acl.may_publish(&a, &topic, false).is_ok(), "{topic}");
        }
        assert!(acl
            .may_publish(&a, "edgefleet/v1/devices/dev-a/status", true)
            .is_ok());
        for (topic, retain) in [
            ("edgefleet/v1/devices/dev-b/events", false),
            ("edgefleet/v1/devices/dev-b/status", true),
            ("edgefleet/v1/devices/dev-a/desired", true),
            ("edgefleet/v1/devices/dev-a/receipts", false),
            ("edgefleet/v1/devices/dev-b/receipts", false),
            ("edgefleet/v1/devices/dev-a/telemetry", true),
            ("edgefleet/v1/server/status", true),
            ("edgefleet/v1/roots", true),
            ("elsewhere", false),
        ] {
            assert!(acl.may_publish(&a, topic, retain).is_err(), "{topic}");
        }
    }

    #[test]
    fn a_device_subscribes_only_to_what_it_needs_and_no_wildcards() {
        let (acl, a) = acl();
        for filter in [
            "edgefleet/v1/devices/dev-a/desired",
            "edgefleet/v1/devices/dev-a/receipts",
            "edgefleet/v1/server/status",
            "edgefleet/v1/roots",
        ] {
            assert!(acl.may_subscribe(&a, filter).is_ok(), "{filter}");
        }
        for filter in [
            "edgefleet/v1/devices/dev-b/desired",
            "edgefleet/v1/devices/+/receipts",
            "edgefleet/v1/devices/dev-b/telemetry",
            "edgefleet/v1/devices/dev-a/#",
            "#",
            "$share/g/edgefleet/v1/devices/+/status",
        ] {
            assert!(acl.may_subscribe(&a, filter).is_err(), "{filter}");
        }
    }

    #[test]
    fn a_last_will_goes_on_the_devices_own_status() {
        let (acl, a) = acl();
        assert!(acl
            .may_will(&a, "edgefleet/v1/devices/dev-a/status")
            .is_ok());
        assert!(acl
            .may_will(&a, "edgefleet/v1/devices/dev-b/status")
            .is_err());
        assert!(acl.may_will(&a, "edgefleet/v1/server/status").is_err());
    }
}
