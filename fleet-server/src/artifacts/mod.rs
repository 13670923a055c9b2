//! Content-addressed artifact storage: the files operators push (models,
//! agent executables), named by their sha256, each with an optional
//! zstd-compressed copy kept when it saves at least 5 % (devices download
//! it instead; the hash names the plain file).
//!
//! Two backends behind one handle, [`ArtifactStore`]:
//!
//! - [`dir`]: files in a local directory, for one server (or a directory
//!   every replica mounts);
//! - [`database`]: 1 MiB chunks in the PostgreSQL database, so every
//!   replica of a fleet serves every artifact.
//!
//! Either way an upload is hashed while it is written and becomes visible
//! in one step at the end, so a half-written upload is never served.

mod database;
mod dir;

use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use database::CHUNK_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact storage I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact storage in the database: {0}")]
    Database(String),
    #[error("upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload is empty")]
    Empty,
    #[error("upload interrupted: {0}")]
    Interrupted(String),
}

/// The bytes of (a range of) an artifact, as they are read.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ArtifactError>> + Send>>;

/// Which copy of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The file as pushed (its sha256 names it).
    Plain,
    /// Its zstd-compressed copy.
    Zst,
}

impl Kind {
    /// The name of this kind in the database storage.
    fn as_str(self) -> &'static str {
        match self {
            Kind::Plain => "raw",
            Kind::Zst => "zst",
        }
    }
}

/// Whether `sha256` is a valid artifact name: 64 lowercase hex characters
/// (which also keeps it from naming anything outside the storage).
pub fn valid_name(sha256: &str) -> bool {
    sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where artifacts live; a cheap-to-clone handle.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Dir(dir::DirStore),
    Database(database::DbStore),
}

/// One stored artifact copy, open for reading.
pub struct Artifact {
    size: u64,
    source: Source,
}

enum Source {
    File(tokio::fs::File, PathBuf),
    Blob(database::Blob),
}

impl Artifact {
    /// Its length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Streams `count` bytes from `start` (which the caller keeps inside
    /// [`Artifact::size`]).
    pub async fn read(self, start: u64, count: u64) -> Result<ByteStream, ArtifactError> {
        match self.source {
            Source::File(file, path) => dir::read(file, path, start, count).await,
            Source::Blob(blob) => Ok(blob.read(start, count)),
        }
    }
}

impl ArtifactStore {
    /// The storage in a local directory (created if missing).
    pub fn open(dir: &Path) -> Result<Self, ArtifactError> {
        Ok(Self {
            backend: Backend::Dir(dir::DirStore::open(dir)?),
        })
    }

    /// The storage in the PostgreSQL database at `url`, whose tables the
    /// store's migrations create (open the store first). Collects the
    /// chunks of abandoned uploads now and then until `shutdown`.
    pub async fn open_database(
        url: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, ArtifactError> {
        let store = database::DbStore::open(url).await?;
        store.spawn_upkeep(shutdown);
        Ok(Self {
            backend: Backend::Database(store),
        })
    }

    /// `dir` or `database`, for messages.
    pub fn backend(&self) -> &'static str {
        match &self.backend {
            Backend::Dir(_) => "dir",
            Backend::Database(_) => "database",
        }
    }

    /// Path of the artifact with this hash in the directory storage (which
    /// may not exist); `None` for an invalid name or the database storage.
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        match &self.backend {
            Backend::Dir(d) => d.path(sha256),
            Backend::Database(_) => None,
        }
    }

    /// Stores a stream (at most `limit` bytes, not empty), returning its
    /// sha256 and size.
    pub async fn put<S, E>(&self, body: S, limit: u64) -> Result<(String, u64), ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        match &self.backend {
            Backend::Dir(d) => d.put(body, limit).await,
            Backend::Database(db) => db.put(body, limit).await,
        }
    }

    /// Opens a copy of an artifact for reading; `None` when there is none
    /// (or the name is not a sha256).
    pub async fn open_artifact(
        &self,
        sha256: &str,
        kind: Kind,
    ) -> Result<Option<Artifact>, ArtifactError> {
        if !valid_name(sha256) {
            return Ok(None);
        }
        match &self.backend {
            Backend::Dir(d) => {
                Ok(d.open_file(sha256, kind)
                    .await?
                    .map(|(file, path, size)| Artifact {
                        size,
                        source: Source::File(file, path),
                    }))
            }
            Backend::Database(db) => Ok(db.open_blob(sha256, kind).await?.map(|blob| Artifact {
                size: blob.size(),
                source: Source::Blob(blob),
            })),
        }
    }

    /// The size of a copy of an artifact, if it is stored.
    pub async fn size(&self, sha256: &str, kind: Kind) -> Result<Option<u64>, ArtifactError> {
        Ok(self.open_artifact(sha256, kind).await?.map(|a| a.size()))
    }

    /// Size of the compressed copy, if there is one, without waiting: the
    /// directory storage looks at the file; the database storage answers
    /// from what it knows (see [`ArtifactStore::refresh`]).
    pub fn zst_size(&self, sha256: &str) -> Option<u64> {
        match &self.backend {
            Backend::Dir(d) => d.zst_size(sha256),
            Backend::Database(db) => db.known_zst_size(sha256),
        }
    }

    /// Brings what [`ArtifactStore::zst_size`] knows up to date with
    /// compressed copies other replicas stored (nothing to do for the
    /// directory storage); failures are logged, the old answers stay.
    pub async fn refresh(&self) {
        if let Backend::Database(db) = &self.backend {
            db.refresh_zst_sizes(false).await;
        }
    }

    /// Stores the compressed copy of a stored artifact if it is at least
    /// 5 % smaller; returns its size.
    pub async fn compress(&self, sha256: &str) -> Result<Option<u64>, ArtifactError> {
        if !valid_name(sha256) {
            return Ok(None);
        }
        match &self.backend {
            Backend::Dir(d) => d.compress(sha256).await,
            Backend::Database(db) => db.compress(sha256).await,
        }
    }

    /// Deletes an artifact and its compressed copy (a missing one is fine:
    /// the result is the same); failures are logged.
    pub async fn remove(&self, sha256: &str) {
        if !valid_name(sha256) {
            return;
        }
        match &self.backend {
            Backend::Dir(d) => d.remove(sha256),
            Backend::Database(db) => {
                if let Err(e) = db.remove(sha256).await {
                    tracing::warn!(sha256, error = %e, "cannot delete an artifact");
                }
            }
        }
    }
}

/// Whether a compressed copy of `compressed` bytes is worth keeping for a
/// file of `plain` bytes: it saves at least 5 %.
fn worth_keeping(compressed: u64, plain: u64) -> bool {
    compressed * 100 <= plain * 95
}

/// The lowercase hex SHA-256 and the size of a file, read in chunks
/// (`fleetctl` checks what it is about to push with it).
pub fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// A parsed `Range` header for a single byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// Bytes `start..=end`, clamped to the file.
    Satisfiable { start: u64, end: u64 },
    /// The range starts past the end of the file.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `len`
/// bytes. Returns `None` for a header we do not understand (multiple
/// ranges, other units), in which case the whole file is sent.
pub fn parse_range(header: &str, len: u64) -> Option<ByteRange> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(ByteRange::Unsatisfiable);
        }
        return Some(ByteRange::Satisfiable {
            start: len.saturating_sub(n),
            end: len - 1,
        });
    }
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() {
        u64::MAX
    } else {
        b.parse().ok()?
    };
    if end < start {
        return None;
    }
    if start >= len {
        return Some(ByteRange::Unsatisfiable);
    }
    Some(ByteRange::Satisfiable {
        start,
        end: end.min(len - 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use ByteRange::*;
        assert_eq!(
            parse_range("bytes=0-9", 100),
            Some(Satisfiable { start: 0, end: 9 })
        );
        assert_eq!(
            parse_range("bytes=90-", 100),
            Some(Satisfiable { start: 90, end: 99 })
        );
        assert_eq!(
            parse_range("bytes=90-500", 100),
            Some(Satisfiable { start: 90, end: 99 })
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            Some(Satisfiable { start: 90, end: 99 })
        );
        assert_eq!(parse_range("bytes=100-", 100), Some(Unsatisfiable));
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }

    #[tokio::test]
    async fn put_is_content_addressed_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let chunks = vec![
            Ok::<_, std::io::Error>(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
        ];
        let (sha, size) = store
            .put(futures_util::stream::iter(chunks), 100)
            .await
            .unwrap();
        assert_eq!(size, 11);
        assert_eq!(sha, hex::encode(Sha256::digest(b"hello world")));
        assert_eq!(
            std::fs::read(store.path(&sha).unwrap()).unwrap(),
            b"hello world"
        );
        let big = vec![Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 200]))];
        assert!(matches!(
            store.put(futures_util::stream::iter(big), 100).await,
            Err(ArtifactError::TooLarge { .. })
        ));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "no temp file left"
        );
        assert!(store.path("../../etc/passwd").is_none());
        assert_eq!(
            file_sha256(&store.path(&sha).unwrap()).unwrap(),
            (sha.clone(), 11)
        );
    }
}
