//! The fleet's keys on disk and the signer the server uses.
//!
//! `fleetctl keys init --dir DIR` writes:
//!
//! | file | what | where it belongs |
//! |---|---|---|
//! | `root-N.key` | offline root key(s) | off the server, e.g. an encrypted USB stick |
//! | `online.key` | the online key that signs desired state | on the server (mode 0600) |
//! | `root.json` | the signed root document | on the server and flashed onto every device |
//! | `roots/N.json` | every root document so far (the chain) | on the server, published to devices |
//!
//! `fleetctl keys rotate` replaces the online key (and, with
//! `--new-root-keys`, the root keys) by writing root version N+1, signed by
//! a threshold of the current root keys and of the new ones. `fleetctl keys
//! revoke KEYID` does the same without that key. The replaced online key is
//! kept as `online-<keyid>.retired.key`; new root keys are
//! `root-vN-<i>.key`. The server publishes the chain on start-up and
//! re-signs every device's desired state whose signer is no longer trusted.
//!
//! A root document expires (`--expires-days`, 365 by default), and devices
//! accept no desired state under an expired root. When a threshold of the
//! root keys is in the keys directory (the embedded default, `keys init`
//! leaves them there) the server renews the root itself
//! ([`Signer::keep_root_fresh`]): at start and then periodically, once less
//! than a third of the configured lifetime is left ([`renewal_due`]), it
//! writes root version N+1 with the same keys and a later expiry. With the
//! root keys offline it warns loudly instead and the operator runs `keys
//! rotate`; either way `/metrics` shows the expiry.
//!
//! Key files are written through [`edgefleet_shared::secret_file`]: mode
//! 0600, never through a symlink, never over an existing key.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use edgefleet_shared::crypto::KeyFile;
use edgefleet_shared::{DesiredState, RootDocument, SecretKey, Signed};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
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
    #[error("{path} is not a valid key file: {reason}")]
    BadKeyFile { path: PathBuf, reason: String },
    #[error("{path} is not a valid root document: {reason}")]
    BadRoot { path: PathBuf, reason: String },
    #[error("online key {keyid} in {path} is not a desired-state key of the root document; rotate the root or use the right key")]
    KeyNotInRoot { keyid: String, path: PathBuf },
    #[error("{0} already exists; refusing to overwrite keys (use another --dir)")]
    Exists(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

/// Writes a file readable only by its owner, failing if anything (a file
/// or a symlink) is there already.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    edgefleet_shared::secret_file::write_new(path, bytes).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(path.to_path_buf())
        } else {
            KeyError::Write {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

pub fn write_key(path: &Path, key: &SecretKey) -> Result<(), KeyError> {
    let json = serde_json::to_vec_pretty(&KeyFile::new(key)).expect("key files serialise");
    write_private(path, &json)
}

pub fn read_key(path: &Path) -> Result<SecretKey, KeyError> {
    let bytes = fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| KeyError::BadKeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    file.secret_key().map_err(|e| bad(e.to_string()))
}

pub fn read_root(path: &Path) -> Result<(Signed, RootDocument), KeyError> {
    let bytes = fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| KeyError::BadRoot {
        path: path.to_path_buf(),
        reason,
    };
    let envelope = Signed::from_json(&bytes).map_err(|e| bad(e.to_string()))?;
    // Expired or not: the server must still be able to renew or rotate it.
    let root = RootDocument::verify_pinned(&envelope).map_err(|e| bad(e.to_string()))?;
    Ok((envelope, root))
}

/// What `keys init` created.
#[derive(Debug)]
pub struct InitializedKeys {
    pub root_key_paths: Vec<PathBuf>,
    pub online_key_path: PathBuf,
    pub root_path: PathBuf,
    pub root: RootDocument,
}

/// Creates root key(s), the online key and the signed root document.
pub fn init_keys(
    dir: &Path,
    root_keys: u32,
    threshold: u32,
    expires_days: u64,
) -> Result<InitializedKeys, KeyError> {
    if root_keys == 0 || threshold == 0 || threshold > root_keys {
        return Err(KeyError::Invalid(format!(
            "threshold {threshold} must be between 1 and the number of root keys ({root_keys})"
        )));
    }
    fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let root_path = dir.join("root.json");
    if root_path.exists() {
        return Err(KeyError::Exists(root_path));
    }
    let gen = || SecretKey::generate().map_err(|e| KeyError::Invalid(e.to_string()));
    let roots = (0..root_keys)
        .map(|_| gen())
        .collect::<Result<Vec<_>, _>>()?;
    let online = gen()?;
    let expires = edgefleet_shared::unix_now() + expires_days * 86_400;
    let root = RootDocument::new(
        1,
        expires,
        &roots.iter().map(SecretKey::public).collect::<Vec<_>>(),
        threshold,
        &[online.public()],
    );
    let signers: Vec<&SecretKey> = roots.iter().collect();
    let envelope = Signed::sign(&root, &signers);
    let mut root_key_paths = Vec::new();
    for (i, key) in roots.iter().enumerate() {
        let path = dir.join(format!("root-{}.key", i + 1));
        write_key(&path, key)?;
        root_key_paths.push(path);
    }
    let online_key_path = dir.join("online.key");
    write_key(&online_key_path, &online)?;
    write_root(dir, &envelope, 1)?;
    Ok(InitializedKeys {
        root_key_paths,
        online_key_path,
        root_path,
        root,
    })
}

fn werr(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes root `version` into the chain (`roots/N.json`) and makes it the
/// current `root.json`, each with an atomic replace (public documents:
/// mode 0644).
fn write_root(dir: &Path, envelope: &Signed, version: u64) -> Result<(), KeyError> {
    let json = serde_json::to_vec_pretty(envelope)
        .expect("a root document is plain data and always serialises");
    let chain = dir.join("roots");
    fs::create_dir_all(&chain).map_err(werr(&chain))?;
    for path in [chain.join(format!("{version}.json")), dir.join("root.json")] {
        edgefleet_shared::secret_file::write_with_mode(&path, &json, 0o644).map_err(werr(&path))?;
    }
    Ok(())
}

/// The root chain in `dir`, version 1 first, each link verified; the last
/// one is `root.json`. A keys directory from before rotations existed has
/// no `roots/`: its chain is `root.json` alone.
pub fn read_chain(dir: &Path) -> Result<Vec<Signed>, KeyError> {
    let root_path = dir.join("root.json");
    let (current_env, current) = read_root(&root_path)?;
    let chain_dir = dir.join("roots");
    if !chain_dir.exists() {
        return Ok(vec![current_env]);
    }
    let bad = |reason: String| KeyError::BadRoot {
        path: chain_dir.clone(),
        reason,
    };
    let mut chain: Vec<Signed> = Vec::new();
    let mut trusted: Option<RootDocument> = None;
    for version in 1..=current.version {
        let path = chain_dir.join(format!("{version}.json"));
        let bytes = fs::read(&path).map_err(|source| KeyError::Read {
            path: path.clone(),
            source,
        })?;
        let env = Signed::from_json(&bytes).map_err(|e| bad(e.to_string()))?;
        let doc = match &trusted {
            None => RootDocument::verify_pinned(&env),
            Some(prev) => prev.verify_successor(&env),
        }
        .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        trusted = Some(doc);
        chain.push(env);
    }
    if chain.last() != Some(&current_env) {
        return Err(bad(format!(
            "roots/{}.json differs from root.json",
            current.version
        )));
    }
    Ok(chain)
}

/// What a rotation changes.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    /// Drop this key (an online key, or a root key) from the new root.
    pub revoke: Option<edgefleet_shared::KeyId>,
    /// Replace the root keys with this many new ones, `threshold` of them
    /// needed to sign.
    pub new_root_keys: Option<(u32, u32)>,
    pub expires_days: u64,
}

/// What a rotation did.
#[derive(Debug)]
pub struct Rotated {
    pub root: RootDocument,
    pub online_key: edgefleet_shared::KeyId,
    pub new_root_key_paths: Vec<PathBuf>,
    pub retired_online_key: Option<PathBuf>,
}

/// The root keys of `root` whose key files are in `dir`.
fn root_keys_in(dir: &Path, root: &RootDocument) -> Result<Vec<SecretKey>, KeyError> {
    let entries = fs::read_dir(dir).map_err(|source| KeyError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut keys = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("root-") && name.ends_with(".key") {
            let key = read_key(&entry.path())?;
            if root.root.keyids.contains(&key.key_id()) {
                keys.push(key);
            }
        }
    }
    Ok(keys)
}

/// Writes the next root document: a new online key (unless the revoked
/// key was another one), without the revoked key, optionally with new root
/// keys; signed by a threshold of the current root keys and of the new.
pub fn rotate(dir: &Path, rotation: &Rotation) -> Result<Rotated, KeyError> {
    let chain = read_chain(dir)?;
    let (_, current) = read_root(&dir.join("root.json"))?;
    if !dir.join("roots").exists() {
        // Start the chain from the directory's only root.
        write_root(dir, &chain[0], current.version)?;
    }
    let old_root_keys = root_keys_in(dir, &current)?;
    if (old_root_keys.len() as u32) < current.root.threshold {
        return Err(KeyError::Invalid(format!(
            "a rotation must be signed by {} of the current root keys; {} of them are in {} (bring the offline root-*.key files)",
            current.root.threshold,
            old_root_keys.len(),
            dir.display()
        )));
    }
    let online_path = dir.join("online.key");
    let online = read_key(&online_path)?;
    let gen = || SecretKey::generate().map_err(|e| KeyError::Invalid(e.to_string()));
    let pub_of = |id: &edgefleet_shared::KeyId| current.keys[id];

    let mut root_pubs: Vec<edgefleet_shared::PublicKey> =
        current.root.keyids.iter().map(pub_of).collect();
    let mut root_threshold = current.root.threshold;
    let mut desired_ids = current.desired.keyids.clone();
    let mut replace_online = true;
    if let Some(id) = &rotation.revoke {
        if let Some(i) = desired_ids.iter().position(|k| k == id) {
            desired_ids.remove(i);
            // Revoking another online key keeps the server's own.
            replace_online = *id == online.key_id();
        } else if let Some(i) = root_pubs.iter().position(|k| k.key_id() == *id) {
            root_pubs.remove(i);
            replace_online = false;
            if (root_pubs.len() as u32) < root_threshold && rotation.new_root_keys.is_none() {
                return Err(KeyError::Invalid(format!(
                    "revoking root key {id} leaves {} root keys, fewer than the threshold {root_threshold}; add --new-root-keys",
                    root_pubs.len()
                )));
            }
        } else {
            return Err(KeyError::Invalid(format!(
                "key {id} is not in root version {}",
                current.version
            )));
        }
    }
    let mut new_root_keys = Vec::new();
    if let Some((count, threshold)) = rotation.new_root_keys {
        if count == 0 || threshold == 0 || threshold > count {
            return Err(KeyError::Invalid(format!(
                "threshold {threshold} must be between 1 and the number of new root keys ({count})"
            )));
        }
        new_root_keys = (0..count).map(|_| gen()).collect::<Result<_, _>>()?;
        root_pubs = new_root_keys.iter().map(SecretKey::public).collect();
        root_threshold = threshold;
    }
    let new_online = if replace_online { Some(gen()?) } else { None };
    let server_key = new_online.as_ref().unwrap_or(&online);
    let mut desired_pubs: Vec<edgefleet_shared::PublicKey> = desired_ids
        .iter()
        .filter(|id| **id != online.key_id() || !replace_online)
        .map(pub_of)
        .collect();
    if replace_online {
        desired_pubs.push(server_key.public());
    }
    let version = current.version + 1;
    let expires = edgefleet_shared::unix_now() + rotation.expires_days.max(1) * 86_400;
    let root = RootDocument::new(version, expires, &root_pubs, root_threshold, &desired_pubs);
    root.validate()
        .map_err(|e| KeyError::Invalid(e.to_string()))?;
    let mut signers: Vec<&SecretKey> = old_root_keys.iter().collect();
    for key in &new_root_keys {
        signers.push(key);
    }
    // The old root keys that stay are already among the signers.
    let envelope = Signed::sign(&root, &signers);
    current
        .verify_successor(&envelope)
        .map_err(|e| KeyError::Invalid(format!("the new root would not verify: {e}")))?;

    // New key files first, then the chain and root.json, then the online
    // key swap: a crash part-way leaves either the old state or a new root
    // whose keys all exist.
    let mut new_root_key_paths = Vec::new();
    for (i, key) in new_root_keys.iter().enumerate() {
        let path = dir.join(format!("root-v{version}-{}.key", i + 1));
        write_key(&path, key)?;
        new_root_key_paths.push(path);
    }
    let staged_online = dir.join("online.key.new");
    if let Some(key) = &new_online {
        let _ = fs::remove_file(&staged_online);
        write_key(&staged_online, key)?;
    }
    write_root(dir, &envelope, version)?;
    let mut retired_online_key = None;
    if new_online.is_some() {
        let retired = dir.join(format!(
            "online-{}.retired.key",
            &online.key_id().as_str()[..16.min(online.key_id().as_str().len())]
        ));
        fs::rename(&online_path, &retired).map_err(werr(&retired))?;
        fs::rename(&staged_online, &online_path).map_err(werr(&online_path))?;
        retired_online_key = Some(retired);
    }
    Ok(Rotated {
        root,
        online_key: server_key.key_id(),
        new_root_key_paths,
        retired_online_key,
    })
}

/// Whether a root expiring at `expires` is due for renewal at `now`, for
/// roots that live `lifetime_secs`: when less than a third of that is left
/// (or it has expired). Renewing at two thirds leaves devices that are
/// offline for a while (and a server that is down) a third of the lifetime
/// to pick the new root up before the old one runs out.
pub fn renewal_due(expires: u64, lifetime_secs: u64, now: u64) -> bool {
    expires.saturating_sub(now) < lifetime_secs / 3
}

/// Writes root version N+1 with the same keys and thresholds as the
/// current root N in `dir`, expiring `lifetime_secs` after `now`, signed
/// by the root keys in `dir` (at least the threshold of them).
pub fn renew_root(dir: &Path, lifetime_secs: u64, now: u64) -> Result<RootDocument, KeyError> {
    let chain = read_chain(dir)?;
    let (_, current) = read_root(&dir.join("root.json"))?;
    let root_keys = root_keys_in(dir, &current)?;
    if (root_keys.len() as u32) < current.root.threshold {
        return Err(KeyError::Invalid(format!(
            "renewing root version {} needs {} of its root keys; {} of them are in {} (bring the offline root-*.key files and run `fleetctl keys rotate`)",
            current.version,
            current.root.threshold,
            root_keys.len(),
            dir.display()
        )));
    }
    if !dir.join("roots").exists() {
        // Start the chain from the directory's only root.
        write_root(dir, &chain[0], current.version)?;
    }
    let renewed = RootDocument {
        version: current.version + 1,
        expires: now.saturating_add(lifetime_secs),
        ..current.clone()
    };
    let signers: Vec<&SecretKey> = root_keys.iter().collect();
    let envelope = Signed::sign(&renewed, &signers);
    current
        .verify_successor(&envelope)
        .map_err(|e| KeyError::Invalid(format!("the renewed root would not verify: {e}")))?;
    write_root(dir, &envelope, renewed.version)?;
    Ok(renewed)
}

/// What [`Signer::keep_root_fresh`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootUpkeep {
    /// More than a third of the lifetime is left. `renewable`: a
    /// threshold of the root keys is in the keys directory, so the server
    /// will renew it when it is due.
    Fresh {
        version: u64,
        expires: u64,
        renewable: bool,
    },
    /// Root version `version` (with the same keys, expiring at `expires`)
    /// was written and is now the current root; the chain must be
    /// published again.
    Renewed { version: u64, expires: u64 },
    /// Due for renewal (or expired), and the root keys are offline: only
    /// the operator can issue the next root (`fleetctl keys rotate`).
    NeedsOperator { version: u64, expires: u64 },
}

/// The root document the server trusts, its envelope and the chain up to
/// it; replaced as a whole when the root is renewed.
#[derive(Debug, Clone)]
struct Roots {
    envelope: Signed,
    root: RootDocument,
    chain: Vec<Signed>,
}

/// Signs desired state with the online key named by the root document.
#[derive(Debug)]
pub struct Signer {
    dir: PathBuf,
    key: SecretKey,
    roots: RwLock<Roots>,
}

impl Signer {
    /// Loads `online.key` and `root.json` from `dir` and checks they match.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let key_path = dir.join("online.key");
        let key = read_key(&key_path)?;
        let roots = Self::read_roots(dir, &key)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
            roots: RwLock::new(roots),
        })
    }

    fn read_roots(dir: &Path, key: &SecretKey) -> Result<Roots, KeyError> {
        let (envelope, root) = read_root(&dir.join("root.json"))?;
        if !root.desired.keyids.contains(&key.key_id()) {
            return Err(KeyError::KeyNotInRoot {
                keyid: key.key_id().to_string(),
                path: dir.join("online.key"),
            });
        }
        let chain = read_chain(dir)?;
        Ok(Roots {
            envelope,
            root,
            chain,
        })
    }

    fn roots(&self) -> std::sync::RwLockReadGuard<'_, Roots> {
        // Roots are replaced whole under the lock: a poisoned lock still
        // holds a consistent value.
        self.roots.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The root documents from version 1 to the current one.
    pub fn chain(&self) -> Vec<Signed> {
        self.roots().chain.clone()
    }

    /// Whether `envelope` carries a signature by a key the current root
    /// trusts for desired state (else it must be signed again).
    pub fn trusts_signer_of(&self, envelope: &Signed) -> bool {
        let roots = self.roots();
        envelope.signatures.iter().any(|s| {
            roots
                .root
                .desired
                .keyids
                .iter()
                .any(|k| k.as_str() == s.keyid)
        })
    }

    /// Keeps the root from expiring, at time `now`, for roots that live
    /// `lifetime_secs`: when [`renewal_due`] and a threshold of the root
    /// keys is in the keys directory, writes the next root version with a
    /// later expiry ([`renew_root`]) and trusts it from now on (publishing
    /// the new chain is the caller's). Reads the keys directory each time,
    /// so root keys brought or taken away count at the next check.
    pub fn keep_root_fresh(&self, lifetime_secs: u64, now: u64) -> Result<RootUpkeep, KeyError> {
        let current = self.root();
        let renewable = (root_keys_in(&self.dir, &current)?.len() as u32) >= current.root.threshold;
        if !renewal_due(current.expires, lifetime_secs, now) {
            return Ok(RootUpkeep::Fresh {
                version: current.version,
                expires: current.expires,
                renewable,
            });
        }
        if !renewable {
            return Ok(RootUpkeep::NeedsOperator {
                version: current.version,
                expires: current.expires,
            });
        }
        renew_root(&self.dir, lifetime_secs, now)?;
        // Read back what is on disk now: the renewed root and its chain.
        let roots = Self::read_roots(&self.dir, &self.key)?;
        let (version, expires) = (roots.root.version, roots.root.expires);
        *self.roots.write().unwrap_or_else(|e| e.into_inner()) = roots;
        Ok(RootUpkeep::Renewed { version, expires })
    }

    pub fn sign(&self, doc: &DesiredState) -> Signed {
        Signed::sign(doc, &[&self.key])
    }

    /// The online key's public half.
    pub fn public_key(&self) -> edgefleet_shared::PublicKey {
        self.key.public()
    }

    /// Signs a message for `topic` (receipts, the server's status), which
    /// agents check against the root's desired-state keys.
    pub fn seal(&self, topic: &str, msg: &[u8]) -> Vec<u8> {
        edgefleet_shared::signed_message::seal(topic, msg, &self.key)
    }

    /// The current root document.
    pub fn root(&self) -> RootDocument {
        self.roots().root.clone()
    }

    /// The current root document, signed.
    pub fn root_envelope(&self) -> Signed {
        self.roots().envelope.clone()
    }
}

#[cfg(test)]
mod tests;
