//! What the device trusts: its root document and the last desired state it
//! accepted, persisted under `{data_dir}/trust/` with atomic writes.
//!
//! The pinned root from the configuration seeds the store on first start;
//! after that the stored root is authoritative (it may have been rotated
//! forward) and a pinned file with a *lower* version is ignored, so a stale
//! flashed file can never take the device back in the chain.

use std::fs;
use std::path::{Path, PathBuf};

use edgefleet_shared::{RootDocument, Signed, VerifyError};

use crate::durable::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("root document {path} is not trustworthy: {source}")]
    Root { path: PathBuf, source: VerifyError },
}

/// Trusted root plus the last accepted desired state.
#[derive(Debug)]
pub struct TrustStore {
    dir: PathBuf,
    root: RootDocument,
    desired: Option<Signed>,
    desired_version: Option<u64>,
}

impl TrustStore {
    /// Opens the store, seeding it from `pinned_root` if it is new.
    pub fn open(data_dir: &Path, pinned_root: &Path) -> Result<Self, TrustError> {
        let dir = data_dir.join("trust");
        fs::create_dir_all(&dir).map_err(|source| TrustError::Write {
            path: dir.clone(),
            source,
        })?;
        let read = |path: &Path| {
            fs::read(path).map_err(|source| TrustError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let parse_root = |path: &Path, bytes: &[u8]| {
            Signed::from_json(bytes)
                .and_then(|env| RootDocument::verify_initial(&env).map(|doc| (env, doc)))
                .map_err(|source| TrustError::Root {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let stored_path = dir.join("root.json");
        let (pinned_env, pinned) = parse_root(pinned_root, &read(pinned_root)?)?;
        let root = if stored_path.exists() {
            let (_, stored) = parse_root(&stored_path, &read(&stored_path)?)?;
            if pinned.version > stored.version {
                tracing::warn!(
                    stored = stored.version,
                    pinned = pinned.version,
                    "pinned root is newer than the stored chain; a newer root must arrive through rotation, keeping the stored one"
                );
            }
            stored
        } else {
            write_atomic(&stored_path, &pinned_env.to_json()).map_err(|source| {
                TrustError::Write {
                    path: stored_path.clone(),
                    source,
                }
            })?;
            pinned
        };
        let desired_path = dir.join("desired.json");
        let desired = match fs::read(&desired_path) {
            Ok(bytes) => match Signed::from_json(&bytes) {
                Ok(env) => Some(env),
                Err(e) => {
                    tracing::error!(error = %e, "stored desired state unreadable; waiting for a fresh one");
                    None
                }
            },
            Err(_) => None,
        };
        let desired_version = desired
            .as_ref()
            .and_then(|env| env.signed.get("version"))
            .and_then(|v| v.as_u64());
        Ok(Self {
            dir,
            root,
            desired,
            desired_version,
        })
    }

    pub fn root(&self) -> &RootDocument {
        &self.root
    }

    /// The last accepted desired state (still signed, re-verifiable).
    pub fn desired(&self) -> Option<&Signed> {
        self.desired.as_ref()
    }

    pub fn desired_version(&self) -> Option<u64> {
        self.desired_version
    }

    /// Records an accepted desired state durably, before acting on it, so
    /// that after a crash the device resumes the same update.
    pub fn accept_desired(&mut self, envelope: &Signed, version: u64) -> Result<(), TrustError> {
        let path = self.dir.join("desired.json");
        write_atomic(&path, &envelope.to_json())
            .map_err(|source| TrustError::Write { path, source })?;
        self.desired = Some(envelope.clone());
        self.desired_version = Some(version);
        Ok(())
    }
}
