//! What devices publish, decoded and checked before anything acts on it:
//! the topic's shape and direction, the device's signature with its
//! registered key, the payload, and the device id inside matching the
//! topic. Pure: no broker, no store, so every refusal is unit-tested.

use edgefleet_shared::{
    DeviceId, DeviceTopic, InferenceResult, MessageError, PublicKey, SignedMessage, StatusMessage,
    TelemetryMessage, TopicKind, TopicPrefix, UpdateEvent,
};

use crate::device_keys::{DeviceKeys, KeyCheck};
use crate::store::Streamed;

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

impl Inbound {
    /// The device and sequence numbers a stored message is receipted by
    /// (none for the broker's last will, which has no number).
    pub(super) fn origin(&self) -> Vec<(DeviceId, u64)> {
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
