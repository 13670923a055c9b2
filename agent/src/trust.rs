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
    #[error("root chain from the fleet refused: {0}")]
    Chain(VerifyError),
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

    /// Walks the root chain forward from the trusted root: each envelope
    /// with a higher version must be the next one, signed by a threshold
    /// of the trusted root's keys and of its own; each accepted root is
    /// persisted before the next is looked at. Older and equal versions
    /// are skipped. Returns the versions accepted; on a broken link,
    /// everything before it stays accepted and the error names the link.
    pub fn walk_roots(&mut self, chain: &[Signed]) -> Result<Vec<u64>, (Vec<u64>, TrustError)> {
        let mut ordered: Vec<(u64, &Signed)> = chain
            .iter()
            .map(|env| {
                let version = env
                    .signed
                    .get("version")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                (version, env)
            })
            .filter(|(v, _)| *v > self.root.version)
            .collect();
        ordered.sort_by_key(|(v, _)| *v);
        let mut accepted = Vec::new();
        for (_, env) in ordered {
            let path = self.dir.join("root.json");
            let next = match self.root.verify_successor(env) {
                Ok(next) => next,
                Err(e) => return Err((accepted, TrustError::Chain(e))),
            };
            if let Err(source) = write_atomic(&path, &env.to_json()) {
                return Err((accepted, TrustError::Write { path, source }));
            }
            tracing::info!(
                from = self.root.version,
                to = next.version,
                "root document rotated"
            );
            self.root = next;
            accepted.push(self.root.version);
        }
        Ok(accepted)
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
