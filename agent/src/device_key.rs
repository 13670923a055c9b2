//! The device's own ed25519 key: it signs every message the agent
//! publishes, so the fleet server can tell this device's messages from
//! anyone else's whatever the broker lets through.
//!
//! The key is made on the device at first start and its secret half never
//! leaves it (`{data_dir}/device.key`, mode 0600). The public half reaches
//! the server one of two ways, strongest first: the operator registers it
//! (the agent logs it at start, "device key"; `fleetctl devices enroll
//! --public-key` or `fleetctl devices set-key`); or the agent registers it
//! itself over HTTP with its enrollment password ([`register`]), which the
//! server accepts only while the device has no key.

use std::path::Path;
use std::time::Duration;

use edgefleet_shared::crypto::KeyFile;
use edgefleet_shared::signed_message::key_registration_input;
use edgefleet_shared::{DeviceId, SecretKey};

/// Why the device key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceKeyError {
    #[error("cannot read device key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("device key {path} is not a valid ed25519 key file: {reason}")]
    Invalid { path: String, reason: String },
    #[error("cannot create device key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot make a device key: {0}")]
    Random(String),
}

/// Loads the key at `path`, or makes one there if there is none.
/// Returns the key and whether it was just made.
pub fn load_or_create(path: &Path) -> Result<(SecretKey, bool), DeviceKeyError> {
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let invalid = |reason: String| DeviceKeyError::Invalid {
                path: shown.clone(),
                reason,
            };
            let file: KeyFile =
                serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
            let key = file.secret_key().map_err(|e| invalid(e.to_string()))?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate().map_err(|e| DeviceKeyError::Random(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| DeviceKeyError::Write {
                    path: shown.clone(),
                    source,
                })?;
            }
            let bytes = serde_json::to_vec_pretty(&KeyFile::new(&key))
                .expect("a KeyFile is plain strings and always serialises");
            // Mode 0600, never through a link, never over a key already there.
            edgefleet_shared::secret_file::write_new(path, &bytes).map_err(|source| {
                DeviceKeyError::Write {
                    path: shown,
                    source,
                }
            })?;
            Ok((key, true))
        }
        Err(source) => Err(DeviceKeyError::Read {
            path: shown,
            source,
        }),
    }
}

/// The proof that the holder of `key` asks to be `device`'s key: its
/// signature over the device id and the public key.
pub fn registration_proof(device: &DeviceId, key: &SecretKey) -> String {
    edgefleet_shared::crypto::encode_signature(&key.sign(&key_registration_input(
        device.as_str(),
        &key.public().to_hex(),
    )))
}

/// Registers the device key with the fleet server at `server_url`,
/// authenticated by the device's enrollment credentials, retrying with
/// backoff until the server answers for good. The server takes a key only
/// while the device has none; a different registered key is an operator's
/// matter and is reported, not retried.
pub async fn register(
    server_url: String,
    device: DeviceId,
    password: String,
    key: SecretKey,
    fleet_ca: Option<Vec<u8>>,
    registered: std::sync::Arc<tokio::sync::Notify>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let url = format!("{}/api/v1/device-key", server_url.trim_end_matches('/'));
    let body = serde_json::json!({
        "device_id": device,
        "public_key": key.public().to_hex(),
        "proof": registration_proof(&device, &key),
    });
    let client = match crate::download::http_client(fleet_ca.as_deref(), |b| {
        b.timeout(Duration::from_secs(30))
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the device key: no HTTP client");
            return;
        }
    };
    let mut wait = Duration::from_secs(1);
    loop {
        let sent = client
            .post(&url)
            .basic_auth(device.as_str(), Some(&password))
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                tracing::info!(key = %key.key_id().short(), "device key registered with the fleet server");
                registered.notify_one();
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                tracing::error!(%status, answer = %text, key = %key.public().to_hex(),
                    "the fleet server refused this device's key; the operator registers it with `fleetctl devices set-key`");
                return;
            }
            Ok(r) => {
                tracing::warn!(status = %r.status(), "cannot register the device key yet; retrying")
            }
            Err(e) => tracing::warn!(error = %e, "cannot register the device key yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(300));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_with_mode_0600_and_then_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("keys/device.key");
        let (first, made) = load_or_create(&path).unwrap();
        assert!(made);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (again, made) = load_or_create(&path).unwrap();
        assert!(!made);
        assert_eq!(again.public(), first.public());
    }

    #[test]
    fn a_damaged_key_file_is_an_error_not_a_new_key() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("device.key");
        std::fs::write(&path, b"{\"type\":\"ed25519\"}").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid ed25519 key file"), "{err}");
        // The damaged file is still there for the operator to look at.
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"type\":\"ed25519\"}");
    }

    #[test]
    fn the_proof_verifies_only_for_its_device() {
        let key = SecretKey::from_seed([5; 32]);
        let device = DeviceId::new("pi-1").unwrap();
        let proof =
            edgefleet_shared::crypto::decode_signature(&registration_proof(&device, &key)).unwrap();
        let hex = key.public().to_hex();
        assert!(key
            .public()
            .verify(&key_registration_input(device.as_str(), &hex), &proof));
        let other = DeviceId::new("pi-2").unwrap();
        assert!(!key
            .public()
            .verify(&key_registration_input(other.as_str(), &hex), &proof));
    }
}
