//! Content-addressed artifact storage: `{dir}/{sha256[..2]}/{sha256}`, and
//! next to it `{sha256}.zst`, a zstd-compressed copy when that saves at
//! least 5 % (devices download it instead; the hash names the model).
//!
//! Uploads stream to a temporary file while being hashed, then get their
//! final name by rename, so a half-uploaded file is never served.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact storage I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("upload is empty")]
    Empty,
    #[error("upload interrupted: {0}")]
    Interrupted(String),
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

impl ArtifactStore {
    pub fn open(dir: &Path) -> Result<Self, ArtifactError> {
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|source| ArtifactError::Io {
            path: tmp.clone(),
            source,
        })?;
        // Leftovers of uploads interrupted by a crash.
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Path of the artifact with this hash (which may not exist).
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        let valid = sha256.len() == 64
            && sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| self.dir.join(&sha256[..2]).join(sha256))
    }

    /// Path of the compressed copy of this artifact (which may not exist).
    pub fn zst_path(&self, sha256: &str) -> Option<PathBuf> {
        self.path(sha256)
            .map(|p| p.with_file_name(format!("{sha256}.zst")))
    }

    /// Deletes an artifact and its compressed copy (missing files are
    /// fine: the result is the same).
    pub fn remove(&self, sha256: &str) {
        if let (Some(path), Some(zst)) = (self.path(sha256), self.zst_path(sha256)) {
            for p in [path, zst] {
                if let Err(e) = std::fs::remove_file(&p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %p.display(), error = %e, "cannot delete an artifact file");
                    }
                }
            }
        }
    }

    /// Size of the compressed copy, if there is one.
    pub fn zst_size(&self, sha256: &str) -> Option<u64> {
        std::fs::metadata(self.zst_path(sha256)?)
            .ok()
            .map(|m| m.len())
    }

    /// Writes the compressed copy of a stored artifact if it is at least
    /// 5 % smaller; returns its size.
    pub async fn compress(&self, sha256: &str) -> Result<Option<u64>, ArtifactError> {
        let (Some(src), Some(dst)) = (self.path(sha256), self.zst_path(sha256)) else {
            return Ok(None);
        };
        let tmp = self.dir.join("tmp").join(format!("{sha256}.zst"));
        tokio::task::spawn_blocking(move || {
            let io = |path: &Path| {
                let path = path.to_path_buf();
                move |source| ArtifactError::Io { path, source }
            };
            let input = std::fs::File::open(&src).map_err(io(&src))?;
            let len = input.metadata().map_err(io(&src))?.len();
            let output = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            let mut writer = std::io::BufWriter::new(output);
            ruzstd::encoding::compress(
                std::io::BufReader::new(input),
                &mut writer,
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            let output = writer.into_inner().map_err(|e| ArtifactError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            output.sync_all().map_err(io(&tmp))?;
            let size = output.metadata().map_err(io(&tmp))?.len();
            if size * 100 > len * 95 {
                let _ = std::fs::remove_file(&tmp);
                return Ok(None);
            }
            std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
            Ok(Some(size))
        })
        .await
        .map_err(|e| ArtifactError::Interrupted(e.to_string()))?
    }

    /// Stores a stream, returning its sha256 and size.
    pub async fn put<S, E>(&self, mut body: S, limit: u64) -> Result<(String, u64), ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp_path = self.dir.join("tmp").join(format!(
            "upload-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArtifactError::Io { path, source }
        };
        let result = async {
            let mut file = tokio::fs::File::create(&tmp_path)
                .await
                .map_err(io(&tmp_path))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ArtifactError::Interrupted(e.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(ArtifactError::TooLarge { limit });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(io(&tmp_path))?;
            }
            if size == 0 {
                return Err(ArtifactError::Empty);
            }
            file.sync_all().await.map_err(io(&tmp_path))?;
            Ok((hex::encode(hasher.finalize()), size))
        }
        .await;
        let (sha256, size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp_path).await;
                return Err(e);
            }
        };
        let final_path = self
            .path(&sha256)
            .expect("a hex digest is a valid artifact name");
        let parent = final_path
            .parent()
            .expect("an artifact path lies inside the artifacts directory");
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io(parent))?;
        tokio::fs::rename(&tmp_path, &final_path)
            .await
            .map_err(io(&final_path))?;
        Ok((sha256, size))
    }
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
