//! Model downloads: HTTP with `Range` resume into a staging file, capped at
//! the signed size, hashed before anything else may look at the file.
//!
//! An interrupted download keeps its staging file; the next attempt asks
//! only for the missing bytes. A server that sends more than the declared
//! size is cut off at the cap (endless-data attack); a body that hashes
//! wrong is deleted.
//!
//! Each artifact must also arrive within an overall deadline derived from
//! its signed size ([`MIN_TRANSFER_RATE`], [`DEADLINE_GRACE`]): the
//! per-chunk stall timeout alone lets a server that sends a byte just
//! inside it hold the update for ever.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use edgefleet_shared::ModelSlot;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The slowest average rate, in bytes per second, at which a download may
/// still finish: 16 KiB/s moves a 100 MB model in under two hours, so a
/// poor cellular link still gets there, while a server feeding a byte at a
/// time is given up on instead of holding the update.
pub const MIN_TRANSFER_RATE: u64 = 16 * 1024;

/// Added to every download's deadline, for what does not scale with size:
/// connecting, retries and their back-off, a slow start.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(60);

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
    #[error("download from {url} too slow: {received} of {size} bytes arrived within its deadline of {deadline:?} (the size at a minimum of {min_rate} bytes/s, plus a grace period); check the server and the device's link")]
    TooSlow {
        url: String,
        received: u64,
        size: u64,
        deadline: Duration,
        min_rate: u64,
    },
}

/// One attempt's outcome.
enum Attempt {
    /// The staging file holds exactly `size` bytes with the right hash.
    Complete,
    /// Try again (the same or the next URL), keeping the bytes we have.
    Retry(String),
    /// Stop trying this model.
    Fatal(DownloadError),
    /// The overall deadline passed with `received` bytes staged. Unlike a
    /// fatal error this leaves the staging file in place, so a later try
    /// of the same artifact resumes from it.
    OutOfTime { received: u64 },
}

/// How a wait bounded by both the stall timeout and the deadline ended.
enum Waited<T> {
    Done(T),
    Stalled,
    OutOfTime,
}

/// Downloads model artifacts. The HTTP client (TLS roots included) is
/// built when an update needs it and dropped with the last download, so an
/// idle agent does not carry it.
#[derive(Debug, Clone)]
pub struct Downloader {
    client: std::sync::Arc<std::sync::Mutex<std::sync::Weak<reqwest::Client>>>,
    stall: Duration,
    attempts: u32,
    /// Every artifact gets `grace + size / min_rate` (bytes per second).
    grace: Duration,
    min_rate: u64,
    /// The fleet's own CA (PEM), trusted besides the system's.
    ca: Option<std::sync::Arc<Vec<u8>>>,
}

impl Downloader {
    pub fn new(stall: Duration, attempts: u32) -> Self {
        install_crypto_provider();
        Self {
            client: Default::default(),
            stall,
            attempts: attempts.max(1),
            grace: DEADLINE_GRACE,
            min_rate: MIN_TRANSFER_RATE,
            ca: None,
        }
    }

    /// Also trusts the fleet's own CA (PEM) for HTTPS.
    pub fn with_ca(mut self, ca: Option<Vec<u8>>) -> Self {
        self.ca = ca.map(std::sync::Arc::new);
        self
    }

    /// Replaces the overall deadline rule: an artifact of `size` bytes must
    /// arrive within `grace + size / min_rate` (`min_rate` in bytes per
    /// second, at least 1).
    pub fn with_deadline(mut self, grace: Duration, min_rate: u64) -> Self {
        self.grace = grace;
        self.min_rate = min_rate.max(1);
        self
    }

    /// How long an artifact of `size` bytes may take, all URLs and retries
    /// together.
    pub fn deadline_for(&self, size: u64) -> Duration {
        let rate = self.min_rate.max(1);
        // Below a second, in u128: the product overflows u64 for large rates.
        let nanos = u128::from(size % rate) * 1_000_000_000 / u128::from(rate);
        let nanos = u64::try_from(nanos)
            .expect("size % rate < rate, so this is under a second of nanoseconds and fits in u64");
        let transfer = Duration::from_secs(size / rate) + Duration::from_nanos(nanos);
        self.grace.saturating_add(transfer)
    }

    /// Waits for `future` until the stall timeout or `deadline`, whichever
    /// comes first.
    async fn within<F: Future>(&self, deadline: Instant, future: F) -> Waited<F::Output> {
        let until = Instant::now()
            .checked_add(self.stall)
            .map_or(deadline, |stall_at| stall_at.min(deadline));
        match tokio::time::timeout_at(until, future).await {
            Ok(output) => Waited::Done(output),
            Err(_) if Instant::now() >= deadline => Waited::OutOfTime,
            Err(_) => Waited::Stalled,
        }
    }

    /// The shared client while any download holds it, else a new one.
    fn client(&self) -> Result<std::sync::Arc<reqwest::Client>, DownloadError> {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = slot.upgrade() {
            return Ok(client);
        }
        let client = http_client(self.ca.as_deref().map(Vec::as_slice), |b| {
            b.connect_timeout(Duration::from_secs(10))
        })
        .map_err(DownloadError::AllUrlsFailed)?;
        let client = std::sync::Arc::new(client);
        *slot = std::sync::Arc::downgrade(&client);
        Ok(client)
    }

    /// Fetches `slot` into `dest` (a staging path). On success `dest` holds
    /// the verified file. A compressed copy, when the slot names one, is
    /// tried first (staged as `{sha256}.zst.part`, capped at its signed
    /// size, then decompressed into `dest`, capped at the model's size);
    /// if that fails in any way the plain URLs are tried. Each of the two
    /// has its own deadline ([`Downloader::deadline_for`] its size).
    pub async fn fetch(&self, slot: &Artifact<'_>, dest: &Path) -> Result<(), DownloadError> {
        let client = self.client()?;
        if let Some(z) = slot.zstd {
            let packed = packed_path(dest);
            let result = self.fetch_packed(&client, slot, z, &packed, dest).await;
            let _ = tokio::fs::remove_file(&packed).await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let _ = tokio::fs::remove_file(dest).await;
                    tracing::warn!(artifact = %slot.name, error = %e, "compressed download failed; trying the plain file");
                }
            }
        }
        self.fetch_urls(&client, slot.urls, &Target::model(slot), dest)
            .await
    }

    /// Downloads the compressed copy into `packed`, unpacks it into
    /// `dest` and checks the model's hash.
    async fn fetch_packed(
        &self,
        client: &reqwest::Client,
        slot: &Artifact<'_>,
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

    /// Tries each URL in turn, `attempts` times each, all within one
    /// deadline for the target's size.
    async fn fetch_urls(
        &self,
        client: &reqwest::Client,
        urls: &[String],
        target: &Target,
        dest: &Path,
    ) -> Result<(), DownloadError> {
        let allowed = self.deadline_for(target.size);
        let now = Instant::now();
        // A size too large for the clock to count to: a century will do.
        let deadline = now
            .checked_add(allowed)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
        let mut last_error = String::from("no URL");
        for url in urls {
            for attempt in 0..self.attempts {
                if attempt > 0 {
                    let backoff = Duration::from_millis(250 * (1 << attempt.min(6)));
                    tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
                }
                match self.attempt(client, url, target, dest, deadline).await {
                    Attempt::Complete => return Ok(()),
                    Attempt::Fatal(e) => {
                        let _ = tokio::fs::remove_file(dest).await;
                        return Err(e);
                    }
                    Attempt::OutOfTime { received } => {
                        return Err(DownloadError::TooSlow {
                            url: url.clone(),
                            received,
                            size: target.size,
                            deadline: allowed,
                            min_rate: self.min_rate,
                        });
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
        deadline: Instant,
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
        if Instant::now() >= deadline {
            return Attempt::OutOfTime { received: have };
        }
        let mut request = client.get(url);
        if have > 0 {
            request = request
                .header(reqwest::header::RANGE, format!("bytes={have}-"))
                .header(reqwest::header::IF_RANGE, &slot.etag);
        }
        let response = match self.within(deadline, request.send()).await {
            Waited::OutOfTime => return Attempt::OutOfTime { received: have },
            Waited::Stalled => {
                return Attempt::Retry(format!("no response within {:?}", self.stall))
            }
            Waited::Done(Err(e)) => return Attempt::Retry(e.to_string()),
            Waited::Done(Ok(r)) => r,
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
            let chunk = match self.within(deadline, stream.next()).await {
                Waited::OutOfTime => {
                    let _ = file.sync_all().await;
                    return Attempt::OutOfTime { received: have };
                }
                Waited::Stalled => {
                    let _ = file.sync_all().await;
                    return Attempt::Retry(format!("stalled: no data for {:?}", self.stall));
                }
                Waited::Done(None) => break,
                Waited::Done(Some(Err(e))) => {
                    let _ = file.sync_all().await;
                    return Attempt::Retry(format!("connection broke: {e}"));
                }
                Waited::Done(Some(Ok(chunk))) => chunk,
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

/// Fetching a model artifact into a staging file, as the update task
/// needs it: [`Downloader`] over HTTP in the agent; unit tests of the task
/// put a fake in its place.
pub trait Fetcher: Send + Sync + std::fmt::Debug {
    /// Fetches `slot` into `dest` (a staging path). On success `dest`
    /// holds exactly the signed bytes; on failure it says why.
    fn fetch<'a>(
        &'a self,
        slot: &'a Artifact<'a>,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<(), DownloadError>>;
}

/// What a signed slot says about one file to download: a model version,
/// or one build of an agent release.
#[derive(Debug, Clone, Copy)]
pub struct Artifact<'a> {
    /// The model's name, or `edgefleet-agent` (for logs).
    pub name: &'a str,
    /// The model's or the release's version (for logs).
    pub version: &'a str,
    pub sha256: &'a str,
    pub size: u64,
    pub urls: &'a [String],
    pub zstd: Option<&'a edgefleet_shared::Compressed>,
}

impl<'a> Artifact<'a> {
    /// The model file of `slot`; `version` is the slot's version as text.
    pub fn model(slot: &'a ModelSlot, version: &'a str) -> Self {
        Self {
            name: &slot.name,
            version,
            sha256: &slot.sha256,
            size: slot.size,
            urls: &slot.urls,
            zstd: slot.zstd.as_ref(),
        }
    }

    /// The executable of one build of agent release `release`.
    pub fn agent(release: &'a str, build: &'a edgefleet_shared::AgentBuild) -> Self {
        Self {
            name: "edgefleet-agent",
            version: release,
            sha256: &build.sha256,
            size: build.size,
            urls: &build.urls,
            zstd: build.zstd.as_ref(),
        }
    }
}

impl Fetcher for Downloader {
    fn fetch<'a>(
        &'a self,
        slot: &'a Artifact<'a>,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<(), DownloadError>> {
        Box::pin(Downloader::fetch(self, slot, dest))
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
    fn model(slot: &Artifact<'_>) -> Self {
        Self {
            size: slot.size,
            sha256: Some(slot.sha256.to_string()),
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
/// An HTTP client trusting the system's CAs and the fleet's own (`fleet_ca`,
/// PEM), with `configure` applied. Without CA certificates on the system
/// (no `ca-certificates` package) it trusts the fleet's CA alone, so plain
/// HTTP and the fleet's own HTTPS still work; other HTTPS then fails with a
/// certificate error naming the server.
pub fn http_client(
    fleet_ca: Option<&[u8]>,
    configure: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<reqwest::Client, String> {
    install_crypto_provider();
    let fleet_ca = match fleet_ca {
        Some(pem) => reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("the fleet's CA is not PEM: {e}"))?,
        None => Vec::new(),
    };
    let builder = || {
        fleet_ca.iter().cloned().fold(
            configure(reqwest::Client::builder())
                .user_agent(concat!("edgefleet-agent/", env!("CARGO_PKG_VERSION"))),
            |b, ca| b.add_root_certificate(ca),
        )
    };
    match builder().build() {
        Ok(client) => Ok(client),
        Err(e) => {
            tracing::warn!(error = %e, "no usable system CA certificates (install ca-certificates); HTTPS works only with the fleet's own CA");
            builder()
                .tls_certs_only(fleet_ca.clone())
                .build()
                .map_err(|e| format!("cannot make an HTTP client: {e}"))
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An HTTP server that answers every GET with `body`, one byte every
    /// `pause` (all at once when `pause` is zero). Returns its URL.
    async fn trickle_server(body: Vec<u8>, pause: Duration) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/model.onnx", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let header =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    if stream.write_all(header.as_bytes()).await.is_err() {
                        return;
                    }
                    if pause.is_zero() {
                        let _ = stream.write_all(&body).await;
                        return;
                    }
                    for byte in body {
                        if stream.write_all(&[byte]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                    }
                });
            }
        });
        url
    }

    fn target(body: &[u8]) -> Target {
        let sha256 = hex::encode(Sha256::digest(body));
        Target {
            size: body.len() as u64,
            etag: format!("\"{sha256}\""),
            sha256: Some(sha256),
        }
    }

    #[test]
    fn the_deadline_grows_with_the_signed_size() {
        let downloader = Downloader::new(Duration::from_secs(30), 3);
        assert_eq!(downloader.deadline_for(0), DEADLINE_GRACE);
        assert_eq!(
            downloader.deadline_for(10 * MIN_TRANSFER_RATE),
            DEADLINE_GRACE + Duration::from_secs(10)
        );
        let fast = downloader
            .clone()
            .with_deadline(Duration::from_millis(200), 1000);
        assert_eq!(fast.deadline_for(500), Duration::from_millis(700));
        // No overflow at the extremes.
        assert_eq!(
            fast.deadline_for(u64::MAX),
            Duration::from_millis(200) + Duration::from_millis(u64::MAX)
        );
        let instant = downloader.with_deadline(Duration::ZERO, u64::MAX);
        assert_eq!(instant.deadline_for(u64::MAX), Duration::from_secs(1));
        assert_eq!(
            instant.deadline_for(u64::MAX - 1),
            Duration::from_nanos(999_999_999)
        );
    }

    #[tokio::test]
    async fn a_server_trickling_inside_the_stall_timeout_is_cut_off_at_the_deadline() {
        let body: Vec<u8> = (0..200u8).collect();
        // 200 bytes at one per 20 ms would take 4 s; the stall timeout
        // (1 s) never fires.
        let url = trickle_server(body.clone(), Duration::from_millis(20)).await;
        let downloader = Downloader::new(Duration::from_secs(1), 3)
            .with_deadline(Duration::from_millis(200), 1000);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("model.part");
        let client = downloader.client().unwrap();
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(3),
            downloader.fetch_urls(&client, std::slice::from_ref(&url), &target(&body), &dest),
        )
        .await
        .expect("the download ended at its deadline");
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        let err = result.unwrap_err();
        let DownloadError::TooSlow {
            url: failed_url,
            received,
            size,
            deadline,
            min_rate,
        } = &err
        else {
            panic!("expected TooSlow, got {err:?}");
        };
        assert_eq!(failed_url, &url);
        assert!(*received > 0 && *received < 200, "{received}");
        assert_eq!((*size, *min_rate), (200, 1000));
        assert_eq!(*deadline, Duration::from_millis(400));
        let message = err.to_string();
        assert!(
            message.contains(&url)
                && message.contains(&format!("{received} of 200 bytes"))
                && message.contains("400ms"),
            "{message}"
        );
        // What arrived stays staged for the next try to resume from.
        let staged = std::fs::metadata(&dest).unwrap().len();
        assert_eq!(staged, *received);
    }

    #[tokio::test]
    async fn a_prompt_download_finishes_well_inside_the_deadline() {
        let body: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
        let url = trickle_server(body.clone(), Duration::ZERO).await;
        let downloader = Downloader::new(Duration::from_secs(1), 1)
            .with_deadline(Duration::from_millis(500), 1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("model.part");
        let client = downloader.client().unwrap();
        downloader
            .fetch_urls(&client, &[url], &target(&body), &dest)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
    }
}
