//! The fleet's keys on disk and the signer the server uses.
//!
//! `fleetctl keys init --dir DIR` writes:
//!
//! | file | what | where it belongs |
//! |---|---|---|
//! | `root-N.key` | offline root key(s) | off the server, e.g. an encrypted USB stick |
//! | `online.key` | the online key that signs desired state | on the server (mode 0600) |
//! | `root.json` | the signed root document | on the server and flashed onto every device |

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Writes a file readable only by its owner, failing if it exists.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let werr = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(path.to_path_buf())
        } else {
            werr(e)
        }
    })?;
    file.write_all(bytes).map_err(werr)?;
    file.sync_all().map_err(werr)
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
    let root = RootDocument::verify_initial(&envelope).map_err(|e| bad(e.to_string()))?;
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
    let json = serde_json::to_vec_pretty(&envelope).expect("root serialises");
    fs::write(&root_path, json).map_err(|source| KeyError::Write {
        path: root_path.clone(),
        source,
    })?;
    Ok(InitializedKeys {
        root_key_paths,
        online_key_path,
        root_path,
        root,
    })
}

/// Signs desired state with the online key named by the root document.
#[derive(Debug, Clone)]
pub struct Signer {
    key: SecretKey,
    root_envelope: Signed,
    root: RootDocument,
}

impl Signer {
    /// Loads `online.key` and `root.json` from `dir` and checks they match.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let key_path = dir.join("online.key");
        let key = read_key(&key_path)?;
        let (root_envelope, root) = read_root(&dir.join("root.json"))?;
        if !root.desired.keyids.contains(&key.key_id()) {
            return Err(KeyError::KeyNotInRoot {
                keyid: key.key_id().to_string(),
                path: key_path,
            });
        }
        Ok(Self {
            key,
            root_envelope,
            root,
        })
    }

    pub fn sign(&self, doc: &DesiredState) -> Signed {
        Signed::sign(doc, &[&self.key])
    }

    pub fn root(&self) -> &RootDocument {
        &self.root
    }

    pub fn root_envelope(&self) -> &Signed {
        &self.root_envelope
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_signer_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let keys = init_keys(dir.path(), 3, 2, 365).unwrap();
        assert_eq!(keys.root.root.threshold, 2);
        assert_eq!(keys.root_key_paths.len(), 3);
        let signer = Signer::load(dir.path()).unwrap();
        assert_eq!(signer.root(), &keys.root);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&keys.online_key_path)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            init_keys(dir.path(), 1, 1, 1),
            Err(KeyError::Exists(_))
        ));
    }

    #[test]
    fn signer_refuses_an_online_key_the_root_does_not_name() {
        let dir = tempfile::tempdir().unwrap();
        init_keys(dir.path(), 1, 1, 365).unwrap();
        fs::remove_file(dir.path().join("online.key")).unwrap();
        write_key(
            &dir.path().join("online.key"),
            &SecretKey::generate().unwrap(),
        )
        .unwrap();
        assert!(matches!(
            Signer::load(dir.path()),
            Err(KeyError::KeyNotInRoot { .. })
        ));
    }

    #[test]
    fn bad_threshold_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            init_keys(dir.path(), 2, 3, 1),
            Err(KeyError::Invalid(_))
        ));
    }
}
