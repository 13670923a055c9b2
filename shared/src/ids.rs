//! Validated identifiers that end up inside MQTT topics and file paths.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct InvalidId {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Checks a name used in topics and paths: 1 to 64 characters of
/// `A-Z a-z 0-9 - _ .`, not starting with a dot. This keeps MQTT wildcards
/// (`+`, `#`), topic separators and path traversal out of every id.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), InvalidId> {
    let fail = |reason| {
        Err(InvalidId {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > 64 {
        return fail("must be at most 64 characters");
    }
    if value.starts_with('.') {
        return fail("must not start with '.'");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return fail("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// A device's identity in the fleet: its MQTT client id and topic segment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
        let value = value.into();
        validate_name("device id", &value)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> Self {
        id.0
    }
}

impl FromStr for DeviceId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for ok in ["pi-01", "jetson_nano.7", "A", &"x".repeat(64)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_ids_that_break_topics_or_paths() {
        for bad in [
            "",
            "a/b",
            "+",
            "#",
            "..",
            ".hidden",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            let err = DeviceId::new(bad).unwrap_err();
            assert_eq!(err.value, bad);
        }
    }

    #[test]
    fn serde_rejects_invalid_ids() {
        let err = serde_json::from_str::<DeviceId>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("invalid device id"), "{err}");
    }
}
