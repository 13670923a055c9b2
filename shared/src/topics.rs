//! Typed, versioned MQTT topics.
//!
//! Layout: `{prefix}/devices/{device_id}/{kind}` where the prefix defaults
//! to `edgefleet/v1` (the `v1` is the protocol version) and `kind` is one of
//! [`TopicKind`]. Topics are values: build them with [`DeviceTopic::new`],
//! print them with `Display`, parse incoming ones with [`TopicPrefix::parse`].

use std::fmt;
use std::str::FromStr;

use crate::ids::{DeviceId, InvalidId};

/// What a device topic carries and who publishes on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// server → agent, retained: the signed desired state.
    Desired,
    /// agent → server, retained: online/offline and current models; the
    /// agent's last will publishes "offline" here.
    Status,
    /// agent → server: update progress and refusals.
    Events,
    /// agent → server: health and inference statistics.
    Telemetry,
    /// agent → server: inference results a model's config asks to upload.
    Results,
    /// server → agent: which of the agent's messages are stored, so the
    /// agent may delete them from its outbox.
    Receipts,
}

impl TopicKind {
    pub const ALL: [TopicKind; 6] = [
        Self::Desired,
        Self::Status,
        Self::Events,
        Self::Telemetry,
        Self::Results,
        Self::Receipts,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Status => "status",
            Self::Events => "events",
            Self::Telemetry => "telemetry",
            Self::Results => "results",
            Self::Receipts => "receipts",
        }
    }
}

impl FromStr for TopicKind {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| TopicError::UnknownKind(s.to_string()))
    }
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a topic string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0:?} is not under the prefix {1:?}")]
    WrongPrefix(String, String),
    #[error("topic {0:?} is not of the form <prefix>/devices/<device id>/<kind>")]
    Shape(String),
    #[error("unknown topic kind {0:?}")]
    UnknownKind(String),
    #[error(transparent)]
    Device(#[from] InvalidId),
    #[error(
        "invalid topic prefix {0:?}: use non-empty segments without '+', '#' or a trailing '/'"
    )]
    BadPrefix(String),
}

/// The configurable root of all topics, e.g. `edgefleet/v1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPrefix(String);

impl Default for TopicPrefix {
    fn default() -> Self {
        Self("edgefleet/v1".into())
    }
}

impl TopicPrefix {
    pub fn new(prefix: impl Into<String>) -> Result<Self, TopicError> {
        let prefix = prefix.into();
        let ok = !prefix.is_empty()
            && prefix
                .split('/')
                .all(|seg| !seg.is_empty() && !seg.contains(['+', '#']));
        if ok {
            Ok(Self(prefix))
        } else {
            Err(TopicError::BadPrefix(prefix))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic of `kind` for `device`.
    pub fn device(&self, device: &DeviceId, kind: TopicKind) -> DeviceTopic {
        DeviceTopic {
            prefix: self.clone(),
            device: device.clone(),
            kind,
        }
    }

    /// A subscription filter matching `kind` for every device.
    pub fn all_devices(&self, kind: TopicKind) -> String {
        format!("{}/devices/+/{}", self.0, kind)
    }

    /// server → agents, retained: whether the fleet server is subscribed
    /// and storing. Agents drain their outbox only while it says online.
    pub fn server_status(&self) -> String {
        format!("{}/server/status", self.0)
    }

    /// server → agents, retained: the root documents from version 1 to the
    /// current one (a JSON array of signed envelopes). Agents walk it
    /// forward from the root they trust.
    pub fn roots(&self) -> String {
        format!("{}/roots", self.0)
    }

    /// Parses a topic that must live under this prefix.
    pub fn parse(&self, topic: &str) -> Result<DeviceTopic, TopicError> {
        let rest = topic
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix("/devices/"))
            .ok_or_else(|| TopicError::WrongPrefix(topic.into(), self.0.clone()))?;
        let (device, kind) = rest
            .split_once('/')
            .ok_or_else(|| TopicError::Shape(topic.into()))?;
        if kind.contains('/') {
            return Err(TopicError::Shape(topic.into()));
        }
        Ok(DeviceTopic {
            prefix: self.clone(),
            device: device.parse()?,
            kind: kind.parse()?,
        })
    }
}

impl fmt::Display for TopicPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A concrete per-device topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceTopic {
    pub prefix: TopicPrefix,
    pub device: DeviceId,
    pub kind: TopicKind,
}

impl fmt::Display for DeviceTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/devices/{}/{}", self.prefix, self.device, self.kind)
    }
}

impl FromStr for DeviceTopic {
    type Err = TopicError;
    /// Parses a topic under any prefix: everything before the last
    /// `/devices/` segment is the prefix.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let idx = s
            .rfind("/devices/")
            .ok_or_else(|| TopicError::Shape(s.into()))?;
        TopicPrefix::new(&s[..idx])?.parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_display_and_parse() {
        let prefix = TopicPrefix::default();
        let device = DeviceId::new("pi-7").unwrap();
        for kind in TopicKind::ALL {
            let topic = prefix.device(&device, kind);
            let text = topic.to_string();
            assert_eq!(text, format!("edgefleet/v1/devices/pi-7/{kind}"));
            assert_eq!(prefix.parse(&text).unwrap(), topic);
            assert_eq!(text.parse::<DeviceTopic>().unwrap(), topic);
        }
    }

    #[test]
    fn custom_prefix_round_trips() {
        let prefix = TopicPrefix::new("acme/fleet/v1").unwrap();
        let device = DeviceId::new("cam_3").unwrap();
        let topic = prefix.device(&device, TopicKind::Telemetry);
        assert_eq!(topic.to_string().parse::<DeviceTopic>().unwrap(), topic);
        assert_eq!(
            prefix.all_devices(TopicKind::Status),
            "acme/fleet/v1/devices/+/status"
        );
    }

    #[test]
    fn malformed_topics_are_rejected_with_a_reason() {
        let prefix = TopicPrefix::default();
        assert!(matches!(
            prefix.parse("other/v1/devices/a/status"),
            Err(TopicError::WrongPrefix(..))
        ));
        assert!(matches!(
            prefix.parse("edgefleet/v1/devices/a"),
            Err(TopicError::Shape(_))
        ));
        assert!(matches!(
            prefix.parse("edgefleet/v1/devices/a/status/x"),
            Err(TopicError::Shape(_))
        ));
        assert!(matches!(
            prefix.parse("edgefleet/v1/devices/a/bogus"),
            Err(TopicError::UnknownKind(_))
        ));
        assert!(matches!(
            prefix.parse("edgefleet/v1/devices/+/status"),
            Err(TopicError::Device(_))
        ));
    }

    #[test]
    fn prefixes_with_wildcards_are_rejected() {
        for bad in ["", "a/+/b", "a/#", "a//b", "a/"] {
            assert!(TopicPrefix::new(bad).is_err(), "{bad}");
        }
    }
}
