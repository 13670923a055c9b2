//! ed25519 keys, key ids and raw signatures.
//!
//! Keys are identified by a [`KeyId`]: the lowercase hex SHA-256 of the
//! 32-byte public key, so an id can be checked against the key it names.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a key or signature could not be parsed or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("public key must be 64 hex characters (32 bytes), got {0:?}")]
    BadPublicKey(String),
    #[error("secret key must be 64 hex characters (32 bytes)")]
    BadSecretKey,
    #[error("key id must be 64 lowercase hex characters, got {0:?}")]
    BadKeyId(String),
    #[error("signature must be base64 of 64 bytes, got {0} bytes")]
    BadSignatureLength(usize),
    #[error("signature is not valid base64: {0}")]
    BadSignatureEncoding(String),
    #[error("could not read random bytes from the operating system: {0}")]
    NoRandomness(String),
}

/// Lowercase hex SHA-256 of a public key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// First 12 hex characters, for logs and tables.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(s.to_string()))
        } else {
            Err(KeyError::BadKeyId(s.to_string()))
        }
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> Self {
        id.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An ed25519 public key, hex encoded on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    pub fn key_id(&self) -> KeyId {
        KeyId(hex::encode(Sha256::digest(self.0.as_bytes())))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// Checks `signature` over `message`. Uses the strict verification that
    /// rejects malleable and small-order forms; it checks the same equation
    /// as the plain one and more, so one call is enough (this runs once per
    /// device message on the server).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &sig).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || KeyError::BadPublicKey(s.to_string());
        let bytes: [u8; 32] = hex::decode(s)
            .map_err(|_| bad())?
            .try_into()
            .map_err(|_| bad())?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| bad())
    }
}

impl TryFrom<String> for PublicKey {
    type Error = KeyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<PublicKey> for String {
    fn from(key: PublicKey) -> Self {
        key.to_hex()
    }
}

/// An ed25519 signing key. Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::NoRandomness(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let bytes: [u8; 32] = hex::decode(s.trim())
            .map_err(|_| KeyError::BadSecretKey)?
            .try_into()
            .map_err(|_| KeyError::BadSecretKey)?;
        Ok(Self::from_seed(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn key_id(&self) -> KeyId {
        self.public().key_id()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(id {})", self.key_id().short())
    }
}

/// On-disk form of a secret key file (JSON, written with mode 0600).
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyFile {
    #[serde(rename = "type")]
    pub key_type: String,
    pub key_id: KeyId,
    pub public: PublicKey,
    pub secret: String,
}

impl KeyFile {
    pub fn new(key: &SecretKey) -> Self {
        Self {
            key_type: "ed25519".into(),
            key_id: key.key_id(),
            public: key.public(),
            secret: key.to_hex(),
        }
    }

    /// The secret key, checked against the public key stored beside it.
    pub fn secret_key(&self) -> Result<SecretKey, KeyError> {
        let key = SecretKey::from_hex(&self.secret)?;
        if key.public() != self.public || self.key_type != "ed25519" {
            return Err(KeyError::BadSecretKey);
        }
        Ok(key)
    }
}

/// Base64 (standard alphabet, padded) of a 64-byte signature.
pub fn encode_signature(sig: &[u8; 64]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sig)
}

/// Parses a base64 signature, insisting on exactly 64 bytes.
pub fn decode_signature(s: &str) -> Result<[u8; 64], KeyError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| KeyError::BadSignatureEncoding(e.to_string()))?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| KeyError::BadSignatureLength(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let key = SecretKey::from_seed([7; 32]);
        let sig = key.sign(b"hello");
        assert!(key.public().verify(b"hello", &sig));
        assert!(!key.public().verify(b"hellO", &sig));
        let other = SecretKey::from_seed([8; 32]);
        assert!(!other.public().verify(b"hello", &sig));
    }

    #[test]
    fn key_id_is_sha256_of_public_key() {
        let key = SecretKey::from_seed([1; 32]);
        let expected = hex::encode(Sha256::digest(hex::decode(key.public().to_hex()).unwrap()));
        assert_eq!(key.key_id().as_str(), expected);
    }

    #[test]
    fn public_key_hex_round_trips_and_rejects_garbage() {
        let key = SecretKey::from_seed([3; 32]).public();
        assert_eq!(key.to_hex().parse::<PublicKey>().unwrap(), key);
        assert!("abcd".parse::<PublicKey>().is_err());
        assert!("zz".repeat(32).parse::<PublicKey>().is_err());
    }

    #[test]
    fn key_file_round_trip_and_mismatch_detected() {
        let key = SecretKey::generate().unwrap();
        let file = KeyFile::new(&key);
        let json = serde_json::to_string(&file).unwrap();
        let back: KeyFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back.secret_key().unwrap().public(), key.public());
        let mut tampered = back;
        tampered.public = SecretKey::from_seed([9; 32]).public();
        assert_eq!(tampered.secret_key().unwrap_err(), KeyError::BadSecretKey);
    }

    #[test]
    fn secret_key_debug_hides_secret() {
        let key = SecretKey::from_seed([5; 32]);
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }

    #[test]
    fn signature_decoding_checks_length() {
        let sig = [4u8; 64];
        assert_eq!(decode_signature(&encode_signature(&sig)).unwrap(), sig);
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 63]);
        assert_eq!(
            decode_signature(&short).unwrap_err(),
            KeyError::BadSignatureLength(63)
        );
        assert!(matches!(
            decode_signature("not base64!").unwrap_err(),
            KeyError::BadSignatureEncoding(_)
        ));
    }
}
