//! Which key each device signs with, and what the server refused.
//!
//! Every device message is checked against its device's registered public
//! key before anything is stored ([`crate::bridge`]). Keys are held in
//! memory (loaded at start, changed by enrollment, registration and the
//! operator) so the check costs one map look-up and one signature check.
//!
//! A device that was never enrolled, on a server that does not require
//! enrollment, gets its first key pinned on first use; an enrolled device
//! never does: its key comes from the operator or from its registration
//! with its enrollment credentials, and a different key afterwards is
//! refused until an operator sets it.

use std::collections::HashMap;
use std::sync::RwLock;

use edgefleet_shared::{MessageError, PublicKey};
use serde::Serialize;

use crate::store::DeviceRecord;

/// What the server knows of one device's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Key(PublicKey),
    /// Pinned on first use, not stored yet (the device's row is written by
    /// the ingest of its first messages; the key follows it).
    Pinned(PublicKey),
    /// Enrolled, no key registered yet.
    Enrolled,
}

/// The outcome of checking a message's signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// The device's registered key.
    Registered,
    /// A never-enrolled device's first key: pin it (and store it).
    PinFirstUse,
}

/// The key `fleet-sim` signs with for simulated device `id`: derived from
/// the id, so a server that pinned or was given it knows it in the next
/// run too. Public knowledge, so for the simulator and tests only.
pub fn simulated_device_key(id: &str) -> edgefleet_shared::SecretKey {
    use sha2::Digest;
    let seed: [u8; 32] = sha2::Sha256::digest(format!("fleet-sim\0{id}").as_bytes()).into();
    edgefleet_shared::SecretKey::from_seed(seed)
}

/// Refused messages of one device, for its page.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Rejections {
    pub count: u64,
    pub last_reason: String,
    pub last_at: u64,
}

#[derive(Debug, Default)]
pub struct DeviceKeys {
    known: RwLock<HashMap<String, Known>>,
    rejections: RwLock<HashMap<String, Rejections>>,
    /// Pin the first key of a device that was never enrolled.
    first_use: bool,
}

/// Most devices whose refusals are remembered (bounded against a flood of
/// made-up device ids).
const MAX_REJECTING_DEVICES: usize = 10_000;

impl DeviceKeys {
    /// From the stored devices; `first_use` allows pinning the key of a
    /// device that was never enrolled.
    pub fn new(devices: &[DeviceRecord], first_use: bool) -> Self {
        let keys = Self {
            first_use,
            ..Self::default()
        };
        for d in devices {
            keys.learn(d);
        }
        keys
    }

    /// Takes what a stored device record says about its key.
    pub fn learn(&self, device: &DeviceRecord) {
        let known = match device.public_key.as_deref().map(str::parse::<PublicKey>) {
            Some(Ok(key)) => Some(Known::Key(key)),
            Some(Err(e)) => {
                tracing::error!(device = %device.id, error = %e, "stored device key is invalid; its messages are refused");
                Some(Known::Enrolled)
            }
            None if device.enrolled_at.is_some() => Some(Known::Enrolled),
            None => None,
        };
        let mut map = self.known.write().unwrap_or_else(|e| e.into_inner());
        match known {
            Some(k) => map.insert(device.id.clone(), k),
            None => map.remove(&device.id),
        };
    }

    /// Takes what another server may have stored about a device's key
    /// (enrollment, registration, an operator's change): the stored key
    /// or enrollment wins over what this server holds; a device with
    /// neither keeps what this server pinned on first use.
    pub fn refresh(&self, device: &DeviceRecord) {
        let stored = device.public_key.as_deref().map(str::parse::<PublicKey>);
        let current = self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&device.id)
            .copied();
        let changed = match (stored, current) {
            (Some(Ok(key)), Some(Known::Key(k))) => key != k,
            (Some(_), _) => true,
            (None, current) if device.enrolled_at.is_some() => current != Some(Known::Enrolled),
            (None, _) => false,
        };
        if changed {
            self.learn(device);
        }
    }

    /// Whether a message on `topic` from `device`, signed by `key`, may be
    /// verified and used.
    pub fn check(
        &self,
        device: &str,
        key: &PublicKey,
        topic: &str,
    ) -> Result<KeyCheck, MessageError> {
        let untrusted = || MessageError::UntrustedKey {
            key: key.key_id().short().to_string(),
            topic: topic.to_string(),
        };
        let map = self.known.read().unwrap_or_else(|e| e.into_inner());
        match map.get(device) {
            Some(Known::Key(k) | Known::Pinned(k)) if k == key => Ok(KeyCheck::Registered),
            Some(_) => Err(untrusted()),
            None if self.first_use => Ok(KeyCheck::PinFirstUse),
            None => Err(untrusted()),
        }
    }

    /// Pins `key` for `device` in memory; [`DeviceKeys::unsaved`] lists it
    /// until it is stored. Returns false when another key got there first.
    pub fn pin(&self, device: &str, key: PublicKey) -> bool {
        let mut map = self.known.write().unwrap_or_else(|e| e.into_inner());
        match map.get(device) {
            Some(Known::Key(k) | Known::Pinned(k)) => *k == key,
            Some(Known::Enrolled) => false,
            None => {
                map.insert(device.to_string(), Known::Pinned(key));
                true
            }
        }
    }

    /// Keys pinned on first use and not stored yet.
    pub fn unsaved(&self) -> Vec<(String, PublicKey)> {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(id, k)| match k {
                Known::Pinned(key) => Some((id.clone(), *key)),
                _ => None,
            })
            .collect()
    }

    /// `key` is stored for `device`.
    pub fn saved(&self, device: &str, key: PublicKey) {
        let mut map = self.known.write().unwrap_or_else(|e| e.into_inner());
        if map.get(device) == Some(&Known::Pinned(key)) {
            map.insert(device.to_string(), Known::Key(key));
        }
    }

    /// Records a refused message of `device`; returns how many of its
    /// messages were refused so far (0 once too many devices are counted).
    pub fn rejected(&self, device: &str, reason: &str, now: u64) -> u64 {
        let mut map = self.rejections.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REJECTING_DEVICES && !map.contains_key(device) {
            return 0;
        }
        let r = map.entry(device.to_string()).or_default();
        r.count += 1;
        r.last_reason = reason.chars().take(300).collect();
        r.last_at = now;
        r.count
    }

    /// Refused messages of `device` since the server started.
    pub fn rejections(&self, device: &str) -> Option<Rejections> {
        self.rejections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::SecretKey;

    fn device(id: &str, enrolled: bool, key: Option<&PublicKey>) -> DeviceRecord {
        DeviceRecord {
            enrolled_at: enrolled.then_some(1),
            public_key: key.map(PublicKey::to_hex),
            ..DeviceRecord::new(id)
        }
    }

    #[test]
    fn registered_keys_are_required_and_enrolled_devices_are_never_pinned() {
        let a = SecretKey::from_seed([1; 32]).public();
        let b = SecretKey::from_seed([2; 32]).public();
        let keys = DeviceKeys::new(
            &[device("a", true, Some(&a)), device("b", true, None)],
            true,
        );
        assert_eq!(keys.check("a", &a, "t"), Ok(KeyCheck::Registered));
        assert!(keys.check("a", &b, "t").is_err(), "another device's key");
        assert!(keys.check("b", &b, "t").is_err(), "enrolled, no key yet");
        assert!(!keys.pin("b", b), "enrolled devices are never pinned");
        // A never-enrolled device on an open fleet: first use, then fixed.
        assert_eq!(keys.check("c", &b, "t"), Ok(KeyCheck::PinFirstUse));
        assert!(keys.pin("c", b));
        assert!(keys.check("c", &a, "t").is_err());
        assert!(!keys.pin("c", a));
        assert_eq!(keys.unsaved(), vec![("c".to_string(), b)]);
        keys.saved("c", b);
        assert!(keys.unsaved().is_empty());
        assert_eq!(keys.check("c", &b, "t"), Ok(KeyCheck::Registered));
        // Without first use, unknown devices are refused.
        let strict = DeviceKeys::new(&[], false);
        assert!(strict.check("c", &b, "t").is_err());
    }

    #[test]
    fn learning_a_record_rotates_or_clears_the_key() {
        let a = SecretKey::from_seed([1; 32]).public();
        let b = SecretKey::from_seed([2; 32]).public();
        let keys = DeviceKeys::new(&[device("a", true, Some(&a))], false);
        keys.learn(&device("a", true, Some(&b)));
        assert!(keys.check("a", &a, "t").is_err(), "the old key is gone");
        assert_eq!(keys.check("a", &b, "t"), Ok(KeyCheck::Registered));
        keys.learn(&device("a", true, None));
        assert!(
            keys.check("a", &b, "t").is_err(),
            "re-enrolled without a key"
        );
    }

    #[test]
    fn refusals_are_counted_per_device_with_the_last_reason() {
        let keys = DeviceKeys::new(&[], false);
        assert_eq!(keys.rejected("a", "unsigned", 5), 1);
        assert_eq!(keys.rejected("a", "bad signature", 6), 2);
        let r = keys.rejections("a").unwrap();
        assert_eq!(
            (r.count, r.last_reason.as_str(), r.last_at),
            (2, "bad signature", 6)
        );
        assert_eq!(keys.rejections("b"), None);
    }
}
