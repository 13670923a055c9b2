//! Model downloads: HTTP with `Range` resume into a staging file, capped at
//! the signed size, hashed before anything else may look at the file.
//!
//! An interrupted download keeps its staging file; the next attempt asks
//! only for the missing bytes. A server that sends more than the declared
//! size is cut off at the cap (endless-data attack); a body that hashes
//! wrong is deleted.

use std::path::Path;
use std::time::Duration;

use edgefleet_shared::ModelSlot;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownloadError {
    #[error("server sent more than the signed size of {declared} bytes; download refused")]
    TooLarge { declared: u64 },
    #[error("downloaded file has sha256 {actual}, the signed desired state says {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("staging file I/O failed: {0}")]
    Io(String),
    #[error("every download URL failed; last error: {0}")]
    AllUrlsFailed(String),
    #[error("compressed artifact is not valid zstd: {0}")]
    Corrupt(String),
}

/// One attempt's outcome.
enum Attempt {
    /// The staging file holds exactly `size` bytes with the right hash.
    Complete,
    /// Try again (the same or the next URL), keeping the bytes we have.
    Retry(String),
    /// Stop trying this model.
    Fatal(DownloadError),
}

/// Downloads model artifacts. The HTTP client (TLS roots included) is
/// built when an update needs it and dropped with the last download, so an
/// idle agent does not carry it.
#[derive(Debug, Clone)]
pub struct Downloader {
    client: std::sync::Arc<std::sync::Mutex<std::sync::Weak<reqwest::Client>>>,
    stall: Duration,
    attempts: u32,
}

impl Downloader {
    pub fn new(stall: Duration, attempts: u32) -> Self {
        install_crypto_provider();
        Self {
            client: Default::default(),
            stall,
            attempts: attempts.max(1),
        }
    }

    /// The shared client while any download holds it, else a new one.
    /// Without CA certificates on the system (no `ca-certificates`
    /// package) the client still downloads over plain HTTP; HTTPS then
    /// fails with a certificate error naming the server.
    fn client(&self) -> Result<std::sync::Arc<reqwest::Client>, DownloadError> {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = slot.upgrade() {
            return Ok(client);
        }
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .user_agent(concat!("edgefleet-agent/", env!("CARGO_PKG_VERSION")))
        };
        let client = match builder().build() {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "no usable CA certificates (install ca-certificates); downloads over HTTPS will fail, plain HTTP works");
                builder().tls_certs_only([]).build().map_err(|e| {
                    DownloadError::AllUrlsFailed(format!("cannot make an HTTP client: {e}"))
                })?
            }
        };
        let client = std::sync::Arc::new(client);
        *slot = std::sync::Arc::downgrade(&client);
        Ok(client)
    }

    /// Fetches `slot` into `dest` (a staging path). On success `dest` holds
    /// the verified file. A compressed copy, when the slot names one, is
    /// tried first (staged as `{sha256}.zst.part`, capped at its signed
    /// size, then decompressed into `dest`, capped at the model's size);
    /// if that fails in any way the plain URLs are tried.
    pub async fn fetch(&self, slot: &ModelSlot, dest: &Path) -> Result<(), DownloadError> {
        let client = self.client()?;
        if let Some(z) = &slot.zstd {
            let packed = packed_path(dest);
            let result = self.fetch_packed(&client, slot, z, &packed, dest).await;
            let _ = tokio::fs::remove_file(&packed).await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let _ = tokio::fs::remove_file(dest).await;
                    tracing::warn!(model = %slot.name, error = %e, "compressed download failed; trying the plain file");
                }
            }
        }
        self.fetch_urls(&client, &slot.urls, &Target::model(slot), dest)
            .await
    }

    /// Downloads the compressed copy into `packed`, unpacks it into
    /// `dest` and checks the model's hash.
    async fn fetch_packed(
        &self,
        client: &reqwest::Client,
        slot: &ModelSlot,
        z: &edgefleet_shared::Compressed,
        packed: &Path,
        dest: &Path,
    ) -> Result<(), DownloadError> {
        let target = Target {
            size: z.size,
            sha256: None,
            etag: format!("\"{}.zst\"", slot.sha256),
        };
        self.fetch_urls(client, &z.urls, &target, packed).await?;
        unpack(packed, dest, slot.size).await?;
        self.verify(&Target::model(slot), dest).await
    }

    async fn fetch_urls(
        &self,
        client: &reqwest::Client,
        urls: &[String],
        target: &Target,
        dest: &Path,
    ) -> Result<(), DownloadError> {
        let mut last_error = String::from("no URL");
        for url in urls {
            for attempt in 0..self.attempts {
                if attempt > 0 {
                    let backoff = Duration::from_millis(250 * (1 << attempt.min(6)));
                    tokio::time::sleep(backoff).await;
                }
                match self.attempt(client, url, target, dest).await {
                    Attempt::Complete => return Ok(()),
                    Attempt::Fatal(e) => {
                        let _ = tokio::fs::remove_file(dest).await;
                        return Err(e);
                    }
                    Attempt::Retry(why) => {
                        tracing::warn!(%url, attempt, reason = %why, "download attempt failed");
                        last_error = format!("{url}: {why}");
                    }
                }
            }
        }
        Err(DownloadError::AllUrlsFailed(last_error))
    }

    async fn attempt(
        &self,
        client: &reqwest::Client,
        url: &str,
        slot: &Target,
        dest: &Path,
    ) -> Attempt {
        let io = |e: std::io::Error| Attempt::Fatal(DownloadError::Io(e.to_string()));
        let mut have = match tokio::fs::metadata(dest).await {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        if have > slot.size {
            // A leftover from something else: start over.
            if let Err(e) = tokio::fs::remove_file(dest).await {
                return io(e);
            }
            have = 0;
        }
        if have == slot.size {
            return self.verify(slot, dest).await.into();
        }
        let mut request = client.get(url);
        if have > 0 {
            request = request
                .header(reqwest::header::RANGE, format!("bytes={have}-"))
                .header(reqwest::header::IF_RANGE, &slot.etag);
        }
        let response = match tokio::time::timeout(self.stall, request.send()).await {
            Err(_) => return Attempt::Retry(format!("no response within {:?}", self.stall)),
            Ok(Err(e)) => return Attempt::Retry(e.to_string()),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        let resuming = have > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT;
        if !resuming && !status.is_success() {
            return Attempt::Retry(format!("HTTP {status}"));
        }
        if !resuming {
            have = 0;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(resuming)
            .truncate(!resuming)
            .open(dest)
            .await;
        let mut file: File = match file {
            Ok(f) => f,
            Err(e) => return io(e),
        };
        let mut stream = response.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(self.stall, stream.next()).await {
                Err(_) => {
                    let _ = file.sync_all().await;
                    return Attempt::Retry(format!("stalled: no data for {:?}", self.stall));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    let _ = file.sync_all().await;
                    return Attempt::Retry(format!("connection broke: {e}"));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            let room = slot.size - have;
            if chunk.len() as u64 > room {
                return Attempt::Fatal(DownloadError::TooLarge {
                    declared: slot.size,
                });
            }
            if let Err(e) = file.write_all(&chunk).await {
                return io(e);
            }
            have += chunk.len() as u64;
        }
        if let Err(e) = file.sync_all().await {
            return io(e);
        }
        if have < slot.size {
            return Attempt::Retry(format!("body ended after {have} of {} bytes", slot.size));
        }
        self.verify(slot, dest).await.into()
    }

    /// Checks a complete staging file against the target's hash.
    async fn verify(&self, target: &Target, dest: &Path) -> Result<(), DownloadError> {
        let Some(expected) = &target.sha256 else {
            // A compressed copy: its content is checked once unpacked.
            return Ok(());
        };
        let actual = sha256_async(dest)
            .await
            .map_err(|e| DownloadError::Io(e.to_string()))?;
        if actual != *expected {
            return Err(DownloadError::HashMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        Ok(())
    }
}

impl From<Result<(), DownloadError>> for Attempt {
    /// A verified file is complete; a failed check is final.
    fn from(checked: Result<(), DownloadError>) -> Self {
        match checked {
            Ok(()) => Self::Complete,
            Err(e) => Self::Fatal(e),
        }
    }
}

/// What one download fetches: exactly `size` bytes, with this hash when
/// known.
struct Target {
    size: u64,
    sha256: Option<String>,
    /// Sent as `If-Range`, so a resumed download never splices two files.
    etag: String,
}

impl Target {
    fn model(slot: &ModelSlot) -> Self {
        Self {
            size: slot.size,
            sha256: Some(slot.sha256.clone()),
            etag: format!("\"{}\"", slot.sha256),
        }
    }
}

/// Where the compressed copy of `dest` (`{sha256}.part`) is staged:
/// `{sha256}.zst.part`.
pub fn packed_path(dest: &Path) -> std::path::PathBuf {
    dest.with_extension("zst.part")
}

/// Decompresses `packed` into `dest`, refusing output beyond `size` bytes
/// (a compressed file may expand to anything).
async fn unpack(packed: &Path, dest: &Path, size: u64) -> Result<(), DownloadError> {
    let (packed, dest) = (packed.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let io = |e: std::io::Error| DownloadError::Io(e.to_string());
        let input = std::io::BufReader::new(std::fs::File::open(&packed).map_err(io)?);
        let decoder = ruzstd::decoding::StreamingDecoder::new(input)
            .map_err(|e| DownloadError::Corrupt(e.to_string()))?;
        let mut output = std::fs::File::create(&dest).map_err(io)?;
        let mut limited = decoder.take(size + 1);
        let mut buf = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            let n = limited
                .read(&mut buf)
                .map_err(|e| DownloadError::Corrupt(e.to_string()))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            if written > size {
                return Err(DownloadError::TooLarge { declared: size });
            }
            output.write_all(&buf[..n]).map_err(io)?;
        }
        output.sync_all().map_err(io)?;
        Ok(())
    })
    .await
    .map_err(|e| DownloadError::Io(e.to_string()))?
}

/// Makes rustls use ring (small, cross-compiles cleanly). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn sha256_async(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
