//! What the device trusts: its root document and the last desired state it
//! accepted, persisted under `{data_dir}/trust/` with atomic writes.
//!
//! The pinned root from the configuration seeds the store on first start;
//! after that the stored root is authoritative (it may have been rotated
//! forward) and a pinned file with a *lower* version is ignored, so a stale
//! flashed file can never take the device back in the chain.
//!
//! Expiry follows TUF: the stored (or pinned) root is loaded even when it
//! has expired, so that a device switched off for longer than a root's
//! lifetime can still walk forward to a fresh one; the root the device
//! ends up trusting must be unexpired before anything is verified against
//! it (see [`RootDocument::walk_chain`]; [`edgefleet_shared::DesiredState::verify`]
//! refuses desired state under an expired root).

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
                .and_then(|env| RootDocument::verify_pinned(&env).map(|doc| (env, doc)))
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
        if let Err(e) = root.check_unexpired(edgefleet_shared::unix_now()) {
            tracing::error!(error = %e, "the trusted root has expired: no desired state is accepted until the fleet publishes a newer root");
        }
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

    /// Walks the root chain forward from the trusted root, now; see
    /// [`TrustStore::walk_roots_at`].
    pub fn walk_roots(&mut self, chain: &[Signed]) -> Result<Vec<u64>, (Vec<u64>, TrustError)> {
        self.walk_roots_at(chain, edgefleet_shared::unix_now())
    }

    /// Walks the root chain forward from the trusted root at time `now`
    /// ([`RootDocument::walk_chain`]): each envelope with a higher version
    /// must be the next one, signed by a threshold of the trusted root's
    /// keys and of its own; older and equal versions are skipped. The
    /// newest root reached is persisted and trusted from then on. Returns
    /// the versions accepted; on a broken link, everything before it stays
    /// accepted and the error names the link; when the root the walk ends
    /// at has expired, the error says so (the walk still moves forward:
    /// the device never goes back in the chain).
    pub fn walk_roots_at(
        &mut self,
        chain: &[Signed],
        now: u64,
    ) -> Result<Vec<u64>, (Vec<u64>, TrustError)> {
        let walk = self.root.walk_chain(chain, now);
        let mut accepted = Vec::new();
        if let Some((env, newest)) = walk.accepted.last() {
            let path = self.dir.join("root.json");
            if let Err(source) = write_atomic(&path, &env.to_json()) {
                return Err((accepted, TrustError::Write { path, source }));
            }
            tracing::info!(
                from = self.root.version,
                to = newest.version,
                "root document rotated"
            );
            accepted = walk.accepted.iter().map(|(_, doc)| doc.version).collect();
            self.root = newest.clone();
        }
        match walk.error {
            Some(e) => Err((accepted, TrustError::Chain(e))),
            None => Ok(accepted),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_shared::{DesiredState, DeviceId, SecretKey};

    const EXPIRES: u64 = 2_000_000_000;

    struct Fleet {
        root_key: SecretKey,
        online: SecretKey,
    }

    impl Fleet {
        fn new() -> Self {
            Self {
                root_key: SecretKey::from_seed([1; 32]),
                online: SecretKey::from_seed([2; 32]),
            }
        }

        fn root(&self, version: u64, expires: u64) -> Signed {
            let doc = RootDocument::new(
                version,
                expires,
                &[self.root_key.public()],
                1,
                &[self.online.public()],
            );
            Signed::sign(&doc, &[&self.root_key])
        }
    }

    fn open(data: &Path, pinned: &Signed) -> TrustStore {
        let path = data.join("root.json");
        fs::write(&path, pinned.to_json()).unwrap();
        TrustStore::open(data, &path).unwrap()
    }

    #[test]
    fn an_expired_root_refuses_desired_state_until_a_fresh_one_arrives() {
        let fleet = Fleet::new();
        let data = tempfile::tempdir().unwrap();
        // The device was off past its root's expiry: it still starts.
        let mut trust = open(data.path(), &fleet.root(1, EXPIRES));
        let now = EXPIRES + 10;
        let device = DeviceId::new("pi-1").unwrap();
        let doc = DesiredState::new(device.clone(), 1, now, now + 3600, vec![]);
        let signed = Signed::sign(&doc, &[&fleet.online]);
        assert!(matches!(
            DesiredState::verify(&signed, trust.root(), &device, now),
            Err(VerifyError::RootExpired { version: 1, .. })
        ));

        // No newer root: the walk says the trusted one is stale.
        let (accepted, e) = trust.walk_roots_at(&[], now).unwrap_err();
        assert!(accepted.is_empty());
        assert!(
            matches!(e, TrustError::Chain(VerifyError::RootExpired { .. })),
            "{e}"
        );

        // An expired version 2, then a fresh version 3: walked over.
        let chain = [fleet.root(2, EXPIRES + 5), fleet.root(3, now + 86_400)];
        assert_eq!(trust.walk_roots_at(&chain, now).unwrap(), vec![2, 3]);
        assert_eq!(trust.root().version, 3);
        assert!(DesiredState::verify(&signed, trust.root(), &device, now).is_ok());

        // Persisted: a restart trusts version 3 (the pinned file is older).
        let reopened = open(data.path(), &fleet.root(1, EXPIRES));
        assert_eq!(reopened.root().version, 3);
    }

    #[test]
    fn a_chain_ending_at_an_expired_root_moves_forward_but_is_refused() {
        let fleet = Fleet::new();
        let data = tempfile::tempdir().unwrap();
        let mut trust = open(data.path(), &fleet.root(1, EXPIRES));
        let now = EXPIRES - 100;
        let chain = [fleet.root(2, EXPIRES - 200)];
        let (accepted, e) = trust.walk_roots_at(&chain, now).unwrap_err();
        assert_eq!(accepted, vec![2], "never back: version 2 is trusted");
        assert!(
            matches!(
                e,
                TrustError::Chain(VerifyError::RootExpired { version: 2, .. })
            ),
            "{e}"
        );
        assert_eq!(trust.root().version, 2);
    }
}
