//! Signed MQTT messages: the broker is untrusted transport, so every
//! message that makes the other side change or delete state carries its
//! sender's signature.
//!
//! Devices sign everything they publish (status, events, telemetry,
//! results; a batch once per publish) with their own device key; the fleet
//! server signs receipts and its status with its online key. The envelope
//! is a small JSON object around the message exactly as its sender wrote
//! it:
//!
//! ```text
//! {"key":"<public key, 64 hex>","sig":"<base64 ed25519 signature>","msg":<the message>}
//! ```
//!
//! The signature covers [`signing_input`]: a domain tag, the full topic the
//! message was published on, and the message's bytes. Binding the topic
//! binds the device id and the kind (a device's telemetry cannot be
//! replayed as its events or as another device's), and the message's own
//! fields (device id, sequence numbers) are covered as written. Signing the
//! bytes as sent, instead of a re-encoding, keeps verification to one hash
//! and one signature check per publish: no canonical JSON on the hot path.
//!
//! [`SignedMessage::parse`] only reads the envelope; the receiver first
//! checks that the named key is one it trusts for that topic (the device's
//! registered key, the server's online key), then calls
//! [`SignedMessage::verify`].

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::crypto::{decode_signature, encode_signature, PublicKey, SecretKey};

/// Domain tag of message signatures (documents use `edgefleet/v1/<type>`).
pub const DOMAIN: &str = "edgefleet/v1/message";

/// The bytes a message signature covers.
pub fn signing_input(topic: &str, msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + topic.len() + msg.len() + 2);
    out.extend_from_slice(DOMAIN.as_bytes());
    out.push(0);
    out.extend_from_slice(topic.as_bytes());
    out.push(0);
    out.extend_from_slice(msg);
    out
}

/// Wraps `msg` (a JSON value as bytes) for `topic`, signed with `key`.
pub fn seal(topic: &str, msg: &[u8], key: &SecretKey) -> Vec<u8> {
    // The receiver sees the message without surrounding white space (as a
    // JSON value inside the envelope), so that is what is signed.
    let msg = msg.trim_ascii();
    let sig = encode_signature(&key.sign(&signing_input(topic, msg)));
    let public = key.public().to_hex();
    let mut out = Vec::with_capacity(msg.len() + public.len() + sig.len() + 32);
    out.extend_from_slice(b"{\"key\":\"");
    out.extend_from_slice(public.as_bytes());
    out.extend_from_slice(b"\",\"sig\":\"");
    out.extend_from_slice(sig.as_bytes());
    out.extend_from_slice(b"\",\"msg\":");
    out.extend_from_slice(msg);
    out.push(b'}');
    out
}

/// The bytes a device signs to ask that `public_hex` be registered as
/// `device`'s key (its proof of holding the secret half), under a domain
/// tag of its own so it can never be taken for a message or a document.
pub fn key_registration_input(device: &str, public_hex: &str) -> Vec<u8> {
    format!("edgefleet/v1/device-key\0{device}\0{public_hex}").into_bytes()
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message is not signed (expected {{\"key\", \"sig\", \"msg\"}}): {0}")]
    NotSigned(String),
    #[error("message signature is not base64 of 64 bytes: {0}")]
    BadEncoding(String),
    #[error("message is signed by key {key}, which is not trusted for {topic}")]
    UntrustedKey { key: String, topic: String },
    #[error("message signature by key {key} does not verify for {topic} (altered, or replayed on another topic)")]
    BadSignature { key: String, topic: String },
}

impl MessageError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotSigned(_) => "unsigned",
            Self::BadEncoding(_) => "bad_signature",
            Self::UntrustedKey { .. } => "untrusted_key",
            Self::BadSignature { .. } => "bad_signature",
        }
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    key: PublicKey,
    #[serde(borrow)]
    sig: &'a str,
    #[serde(borrow)]
    msg: &'a RawValue,
}

/// A parsed, not yet verified, envelope borrowing from the payload.
#[derive(Debug)]
pub struct SignedMessage<'a> {
    /// The key that claims to have signed.
    pub key: PublicKey,
    sig: [u8; 64],
    msg: &'a RawValue,
}

impl<'a> SignedMessage<'a> {
    /// Reads the envelope. Checks nothing but its shape.
    pub fn parse(payload: &'a [u8]) -> Result<Self, MessageError> {
        let wire: Wire<'a> =
            serde_json::from_slice(payload).map_err(|e| MessageError::NotSigned(e.to_string()))?;
        let sig =
            decode_signature(wire.sig).map_err(|e| MessageError::BadEncoding(e.to_string()))?;
        Ok(Self {
            key: wire.key,
            sig,
            msg: wire.msg,
        })
    }

    /// The message's bytes as its sender wrote them.
    pub fn msg(&self) -> &'a [u8] {
        self.msg.get().as_bytes()
    }

    /// Checks the signature over `topic` and the message.
    pub fn verify(&self, topic: &str) -> Result<&'a [u8], MessageError> {
        if self
            .key
            .verify(&signing_input(topic, self.msg()), &self.sig)
        {
            Ok(self.msg())
        } else {
            Err(MessageError::BadSignature {
                key: self.key.key_id().short().to_string(),
                topic: topic.to_string(),
            })
        }
    }

    /// Verifies a message that must be signed by one of `trusted`.
    pub fn open<'k>(
        payload: &'a [u8],
        topic: &str,
        mut trusted: impl Iterator<Item = &'k PublicKey>,
    ) -> Result<&'a [u8], MessageError> {
        let message = Self::parse(payload)?;
        if !trusted.any(|k| *k == message.key) {
            return Err(MessageError::UntrustedKey {
                key: message.key.key_id().short().to_string(),
                topic: topic.to_string(),
            });
        }
        message.verify(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "edgefleet/v1/devices/pi-1/events";

    #[test]
    fn a_sealed_message_opens_with_its_key_and_keeps_its_bytes() {
        let key = SecretKey::from_seed([3; 32]);
        let msg = br#"{"seq": 7,  "device_id":"pi-1"}"#;
        let sealed = seal(TOPIC, msg, &key);
        // Surrounding white space is not part of the message.
        let padded = seal(TOPIC, b" \n{\"seq\": 7,  \"device_id\":\"pi-1\"} ", &key);
        assert_eq!(
            SignedMessage::parse(&padded)
                .unwrap()
                .verify(TOPIC)
                .unwrap(),
            msg
        );
        let parsed = SignedMessage::parse(&sealed).unwrap();
        assert_eq!(parsed.key, key.public());
        assert_eq!(parsed.verify(TOPIC).unwrap(), msg, "bytes exactly as sent");
        let opened = SignedMessage::open(&sealed, TOPIC, [key.public()].iter()).unwrap();
        assert_eq!(opened, msg);
    }

    #[test]
    fn another_topic_another_key_or_altered_bytes_are_refused() {
        let key = SecretKey::from_seed([3; 32]);
        let other = SecretKey::from_seed([4; 32]);
        let sealed = seal(TOPIC, br#"{"seq":1}"#, &key);
        // Replayed on another device's topic.
        let err = SignedMessage::parse(&sealed)
            .unwrap()
            .verify("edgefleet/v1/devices/pi-2/events")
            .unwrap_err();
        assert!(matches!(err, MessageError::BadSignature { .. }), "{err}");
        // Signed by a key the receiver does not trust.
        let err = SignedMessage::open(&sealed, TOPIC, [other.public()].iter()).unwrap_err();
        assert!(matches!(err, MessageError::UntrustedKey { .. }), "{err}");
        // The message altered after signing.
        let text = String::from_utf8(sealed.clone()).unwrap();
        let altered = text.replace(r#"{"seq":1}"#, r#"{"seq":9}"#);
        let err =
            SignedMessage::open(altered.as_bytes(), TOPIC, [key.public()].iter()).unwrap_err();
        assert!(matches!(err, MessageError::BadSignature { .. }), "{err}");
        // A key swapped in with the old signature.
        let swapped = text.replace(&key.public().to_hex(), &other.public().to_hex());
        let err =
            SignedMessage::open(swapped.as_bytes(), TOPIC, [other.public()].iter()).unwrap_err();
        assert!(matches!(err, MessageError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn unsigned_and_malformed_envelopes_are_refused_with_a_reason() {
        let plain = br#"{"schema":1,"device_id":"pi-1","seq":1}"#;
        assert!(matches!(
            SignedMessage::parse(plain),
            Err(MessageError::NotSigned(_))
        ));
        let short_sig = format!(
            r#"{{"key":"{}","sig":"AAAA","msg":{{}}}}"#,
            SecretKey::from_seed([1; 32]).public().to_hex()
        );
        assert!(matches!(
            SignedMessage::parse(short_sig.as_bytes()),
            Err(MessageError::BadEncoding(_))
        ));
        assert!(matches!(
            SignedMessage::parse(b"not json"),
            Err(MessageError::NotSigned(_))
        ));
    }

    #[test]
    fn the_signature_binds_a_domain_tag() {
        let input = signing_input(TOPIC, b"{}");
        assert!(input.starts_with(b"edgefleet/v1/message\0edgefleet/v1/devices/pi-1/events\0"));
        // A document signature over the same bytes is never a message one.
        assert_ne!(
            input,
            crate::canonical::signing_input("message", &serde_json::json!({}))
        );
    }
}
