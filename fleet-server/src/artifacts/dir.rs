//! Artifacts as files: `{dir}/{sha256[..2]}/{sha256}`, and next to it
//! `{sha256}.zst`, the compressed copy.
//!
//! Uploads stream to a temporary file under `{dir}/tmp` while being
//! hashed, then get their final name by rename, so a half-uploaded file is
//! never served; whatever a crash leaves in `tmp` goes at the next start.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{valid_name, worth_keeping, ArtifactError, ByteStream, Kind};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let path = path.to_path_buf();
    move |source| ArtifactError::Io { path, source }
}

/// Bytes per piece of a download.
const READ_BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub(super) struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    pub(super) fn open(dir: &Path) -> Result<Self, ArtifactError> {
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
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
    pub(super) fn path(&self, sha256: &str) -> Option<PathBuf> {
        valid_name(sha256).then(|| self.dir.join(&sha256[..2]).join(sha256))
    }

    /// Path of the compressed copy of this artifact (which may not exist).
    fn zst_path(&self, sha256: &str) -> Option<PathBuf> {
        self.path(sha256)
            .map(|p| p.with_file_name(format!("{sha256}.zst")))
    }

    fn kind_path(&self, sha256: &str, kind: Kind) -> Option<PathBuf> {
        match kind {
            Kind::Plain => self.path(sha256),
            Kind::Zst => self.zst_path(sha256),
        }
    }

    /// The open file and its length; `None` when it does not exist.
    pub(super) async fn open_file(
        &self,
        sha256: &str,
        kind: Kind,
    ) -> Result<Option<(tokio::fs::File, PathBuf, u64)>, ArtifactError> {
        let Some(path) = self.kind_path(sha256, kind) else {
            return Ok(None);
        };
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let len = file.metadata().await.map_err(io(&path))?.len();
        Ok(Some((file, path, len)))
    }

    /// Deletes an artifact and its compressed copy (missing files are
    /// fine: the result is the same).
    pub(super) fn remove(&self, sha256: &str) {
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
    pub(super) fn zst_size(&self, sha256: &str) -> Option<u64> {
        std::fs::metadata(self.zst_path(sha256)?)
            .ok()
            .map(|m| m.len())
    }

    /// Writes the compressed copy of a stored artifact if it is at least
    /// 5 % smaller; returns its size.
    pub(super) async fn compress(&self, sha256: &str) -> Result<Option<u64>, ArtifactError> {
        let (Some(src), Some(dst)) = (self.path(sha256), self.zst_path(sha256)) else {
            return Ok(None);
        };
        let tmp = self.dir.join("tmp").join(format!("{sha256}.zst"));
        tokio::task::spawn_blocking(move || {
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
            if !worth_keeping(size, len) {
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
    pub(super) async fn put<S, E>(
        &self,
        mut body: S,
        limit: u64,
    ) -> Result<(String, u64), ArtifactError>
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

/// Streams `count` bytes of `file` from `start`.
pub(super) async fn read(
    mut file: tokio::fs::File,
    path: PathBuf,
    start: u64,
    count: u64,
) -> Result<ByteStream, ArtifactError> {
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(io(&path))?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(count), READ_BUFFER)
        .map(move |r| r.map_err(io(&path)));
    Ok(Box::pin(stream))
}
