//! Artifacts in the PostgreSQL database, so that every replica of a fleet
//! serves every artifact: `artifact_blobs` names each stored copy (sha256
//! and kind, `raw` or `zst`) and the upload whose 1 MiB chunks in
//! `artifact_chunks` hold its bytes.
//!
//! An upload writes its chunks under a fresh random upload id while it is
//! hashed, then one short transaction inserts the blob row that makes it
//! visible. A crash or a broken connection before that leaves only chunks
//! no blob names, which nobody reads; they are collected once no chunk was
//! added to their upload for [`ABANDONED_AFTER_SECS`] (at start and every
//! few minutes). Collection and the visible step take an advisory lock
//! (shared by uploads, exclusive for collection), so collection never
//! removes the chunks of an upload becoming visible at that moment.
//!
//! Reads fetch the chunks covering the range a few at a time, in order,
//! so a download holds a few MiB in memory, not the file.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::Pool;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{worth_keeping, ArtifactError, ByteStream, Kind};

/// Bytes per chunk row: large enough that a 100 MB artifact is a hundred
/// rows, small enough that a reader holds a few of them at a time.
pub const CHUNK_SIZE: usize = 1 << 20;

/// Chunks one query fetches while reading.
const READ_AHEAD: i64 = 4;

/// An upload that added no chunk for this long is abandoned: its chunks
/// are collected (and it fails if it ever tries to become visible).
pub(super) const ABANDONED_AFTER_SECS: u64 = 30 * 60;

/// How often abandoned chunks are collected and the known compressed
/// copies reloaded in full.
const UPKEEP_EVERY: Duration = Duration::from_secs(5 * 60);

/// Compressed copies stored up to this long before the newest one known
/// are asked for again on refresh: replicas' clocks differ a little, and a
/// row may commit a moment after its `created_at`.
const REFRESH_OVERLAP_SECS: i64 = 5 * 60;

/// Any key: serialises collecting abandoned chunks against uploads
/// becoming visible.
const COLLECT_LOCK: i64 = 0x6564_6765_6172_7431; // "edgeart1"

/// Connections of the artifact storage's own pool.
const POOL_SIZE: usize = 8;

fn db(e: tokio_postgres::Error) -> ArtifactError {
    // The server's message is the useful part.
    ArtifactError::Database(match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => e.to_string(),
    })
}

fn pool_error(e: deadpool_postgres::PoolError) -> ArtifactError {
    ArtifactError::Database(e.to_string())
}

fn now() -> i64 {
    edgefleet_shared::unix_now() as i64
}

#[derive(Clone)]
pub(super) struct DbStore {
    pool: Pool,
    zst: Arc<RwLock<ZstSizes>>,
}

impl std::fmt::Debug for DbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DbStore")
    }
}

/// The compressed copies known, for answers that cannot wait for the
/// database (the desired-state documents are signed inside a store
/// transaction).
#[derive(Debug, Default)]
struct ZstSizes {
    sizes: HashMap<String, u64>,
    /// `created_at` of the newest one known.
    newest: i64,
}

/// What [`DbStore::write_chunks`] wrote.
struct Written {
    upload: String,
    sha256: String,
    size: u64,
    chunks: i64,
}

impl DbStore {
    /// Connects to the database (whose migrations created the tables) and
    /// loads the compressed copies it holds.
    pub(super) async fn open(url: &str) -> Result<Self, ArtifactError> {
        let pool = crate::store::postgres::pool(url, POOL_SIZE)
            .map_err(|e| ArtifactError::Database(e.to_string()))?;
        let store = Self {
            pool,
            zst: Arc::default(),
        };
        let client = tokio::time::timeout(Duration::from_secs(10), store.pool.get())
            .await
            .map_err(|_| ArtifactError::Database("no answer within 10 s".into()))?
            .map_err(pool_error)?;
        client
            .execute("SELECT 1 FROM artifact_blobs LIMIT 1", &[])
            .await
            .map_err(db)?;
        drop(client);
        store.load_zst_sizes(true).await?;
        Ok(store)
    }

    /// Collects abandoned chunks now and every few minutes, and reloads
    /// the known compressed copies, until `shutdown`.
    pub(super) fn spawn_upkeep(&self, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match this.collect_abandoned(ABANDONED_AFTER_SECS).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(chunks = n, "abandoned artifact uploads collected"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot collect abandoned artifact uploads")
                    }
                }
                this.refresh_zst_sizes(true).await;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(UPKEEP_EVERY) => {}
                }
            }
        });
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, ArtifactError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Deletes the chunks of uploads no blob names and that added none
    /// for `idle_secs`; returns how many.
    pub(super) async fn collect_abandoned(&self, idle_secs: u64) -> Result<u64, ArtifactError> {
        let cutoff = now() - idle_secs as i64;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&COLLECT_LOCK])
            .await
            .map_err(db)?;
        let n = tx
            .execute(
                "DELETE FROM artifact_chunks
                 WHERE upload IN (
                     SELECT c.upload FROM artifact_chunks c
                     WHERE NOT EXISTS (SELECT 1 FROM artifact_blobs b WHERE b.upload = c.upload)
                     GROUP BY c.upload
                     HAVING max(c.created_at) < $1)",
                &[&cutoff],
            )
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(n)
    }

    /// Stores a stream as a new artifact (or finds it already stored).
    pub(super) async fn put<S, E>(
        &self,
        body: S,
        limit: u64,
    ) -> Result<(String, u64), ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let written = self.write_chunks(body, limit).await?;
        let sha256 = written.sha256.clone();
        let size = self.make_visible(&written, &sha256, Kind::Plain).await?;
        Ok((sha256, size))
    }

    /// Writes a stream's chunks under a new upload id, hashing it; on
    /// failure, deletes what it wrote.
    async fn write_chunks<S, E>(&self, mut body: S, limit: u64) -> Result<Written, ArtifactError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)
            .map_err(|e| ArtifactError::Interrupted(format!("no random upload id: {e}")))?;
        let upload = hex::encode(id);
        let result = async {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = Vec::with_capacity(CHUNK_SIZE);
            let mut chunks = 0i64;
            while let Some(part) = body.next().await {
                let part = part.map_err(|e| ArtifactError::Interrupted(e.to_string()))?;
                size += part.len() as u64;
                if size > limit {
                    return Err(ArtifactError::TooLarge { limit });
                }
                hasher.update(&part);
                let mut rest = &part[..];
                while !rest.is_empty() {
                    let take = (CHUNK_SIZE - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if buf.len() == CHUNK_SIZE {
                        self.insert_chunk(&upload, chunks, &buf).await?;
                        chunks += 1;
                        buf.clear();
                    }
                }
            }
            if size == 0 {
                return Err(ArtifactError::Empty);
            }
            if !buf.is_empty() {
                self.insert_chunk(&upload, chunks, &buf).await?;
                chunks += 1;
            }
            Ok(Written {
                upload: upload.clone(),
                sha256: hex::encode(hasher.finalize()),
                size,
                chunks,
            })
        }
        .await;
        if result.is_err() {
            self.drop_upload(&upload).await;
        }
        result
    }

    async fn insert_chunk(&self, upload: &str, idx: i64, data: &[u8]) -> Result<(), ArtifactError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO artifact_chunks (upload, idx, data, created_at) VALUES ($1, $2, $3, $4)",
            )
            .await
            .map_err(db)?;
        client
            .execute(&statement, &[&upload, &idx, &data, &now()])
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Deletes an upload's chunks, logging a failure (collection gets
    /// them later).
    async fn drop_upload(&self, upload: &str) {
        let result = async {
            self.client()
                .await?
                .execute("DELETE FROM artifact_chunks WHERE upload = $1", &[&upload])
                .await
                .map_err(db)
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(upload, error = %e, "cannot delete an abandoned artifact upload");
        }
    }

    /// Makes written chunks the copy `kind` of artifact `sha256`, in one
    /// transaction; when that copy is already stored, keeps it and drops
    /// the new chunks. Returns the stored copy's size.
    async fn make_visible(
        &self,
        written: &Written,
        sha256: &str,
        kind: Kind,
    ) -> Result<u64, ArtifactError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&COLLECT_LOCK])
                .await
                .map_err(db)?;
            let present: i64 = tx
                .query_one(
                    "SELECT count(*) FROM artifact_chunks WHERE upload = $1",
                    &[&written.upload],
                )
                .await
                .map_err(db)?
                .get(0);
            if present != written.chunks {
                return Err(ArtifactError::Interrupted(format!(
                    "{} of the upload's {} chunks are left (collected as abandoned after {} minutes idle)",
                    present,
                    written.chunks,
                    ABANDONED_AFTER_SECS / 60
                )));
            }
            let inserted = tx
                .query_opt(
                    "INSERT INTO artifact_blobs (sha256, kind, size, chunk_size, created_at, upload)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (sha256, kind) DO NOTHING
                     RETURNING size",
                    &[
                        &sha256,
                        &kind.as_str(),
                        &(written.size as i64),
                        &(CHUNK_SIZE as i64),
                        &now(),
                        &written.upload,
                    ],
                )
                .await
                .map_err(db)?;
            let size = match inserted {
                Some(_) => None,
                None => Some(
                    tx.query_one(
                        "SELECT size FROM artifact_blobs WHERE sha256 = $1 AND kind = $2",
                        &[&sha256, &kind.as_str()],
                    )
                    .await
                    .map_err(db)?
                    .get::<_, i64>(0) as u64,
                ),
            };
            tx.commit().await.map_err(db)?;
            Ok(size)
        }
        .await;
        match result {
            Ok(None) => Ok(written.size),
            Ok(Some(existing)) => {
                // Same content already stored: the new chunks are spare.
                self.drop_upload(&written.upload).await;
                Ok(existing)
            }
            Err(e) => {
                self.drop_upload(&written.upload).await;
                Err(e)
            }
        }
    }

    /// The stored copy `kind` of `sha256`, if any.
    pub(super) async fn open_blob(
        &self,
        sha256: &str,
        kind: Kind,
    ) -> Result<Option<Blob>, ArtifactError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT size, chunk_size, upload FROM artifact_blobs WHERE sha256 = $1 AND kind = $2",
                &[&sha256, &kind.as_str()],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| Blob {
            pool: self.pool.clone(),
            sha256: sha256.to_string(),
            size: r.get::<_, i64>(0) as u64,
            chunk_size: r.get::<_, i64>(1).max(1) as u64,
            upload: r.get(2),
        }))
    }

    /// Stores the compressed copy of a stored artifact if it is at least
    /// 5 % smaller; returns its size. The file streams from its chunks
    /// through the compressor (on a blocking thread) into new chunks.
    pub(super) async fn compress(&self, sha256: &str) -> Result<Option<u64>, ArtifactError> {
        let Some(blob) = self.open_blob(sha256, Kind::Plain).await? else {
            return Ok(None);
        };
        let plain = blob.size();
        let mut source = blob.read(0, plain);
        let (in_tx, in_rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let feeding = tokio::spawn(async move {
            while let Some(part) = source.next().await {
                if in_tx.send(part?).await.is_err() {
                    break;
                }
            }
            Ok::<_, ArtifactError>(())
        });
        let abandoned = Arc::new(AtomicBool::new(false));
        let reader = ChannelReader {
            rx: in_rx,
            current: Bytes::new(),
            abandoned: abandoned.clone(),
        };
        let compressing = tokio::task::spawn_blocking(move || {
            let mut writer = ChannelWriter {
                tx: out_tx,
                buf: Vec::with_capacity(CHUNK_SIZE),
                abandoned,
            };
            ruzstd::encoding::compress(
                std::io::BufReader::with_capacity(256 * 1024, reader),
                &mut writer,
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            writer.finish();
        });
        let compressed = futures_util::stream::unfold(out_rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|part| (Ok::<_, std::convert::Infallible>(part), rx))
        });
        // Past this size the copy is not worth keeping: stop writing it.
        let limit = plain * 95 / 100;
        let written = self.write_chunks(Box::pin(compressed), limit).await;
        let fed = feeding.await;
        let done = compressing.await;
        let failed = match (fed, done) {
            (Ok(Ok(())), Ok(())) => None,
            (Ok(Err(e)), _) => Some(e),
            (Err(e), _) | (_, Err(e)) => Some(ArtifactError::Interrupted(e.to_string())),
        };
        match (written, failed) {
            (Err(ArtifactError::TooLarge { .. }), None) => Ok(None),
            (Err(e), _) => Err(e),
            (Ok(written), Some(e)) => {
                self.drop_upload(&written.upload).await;
                Err(e)
            }
            (Ok(written), None) if !worth_keeping(written.size, plain) => {
                self.drop_upload(&written.upload).await;
                Ok(None)
            }
            (Ok(written), None) => {
                let size = self.make_visible(&written, sha256, Kind::Zst).await?;
                if let Ok(mut known) = self.zst.write() {
                    known.sizes.insert(sha256.to_string(), size);
                }
                Ok(Some(size))
            }
        }
    }

    /// Deletes both copies of an artifact and their chunks.
    pub(super) async fn remove(&self, sha256: &str) -> Result<(), ArtifactError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let uploads: Vec<String> = tx
            .query(
                "DELETE FROM artifact_blobs WHERE sha256 = $1 RETURNING upload",
                &[&sha256],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute(
            "DELETE FROM artifact_chunks WHERE upload = ANY($1)",
            &[&uploads],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        if let Ok(mut known) = self.zst.write() {
            known.sizes.remove(sha256);
        }
        Ok(())
    }

    /// The compressed copy's size, from what this replica knows.
    pub(super) fn known_zst_size(&self, sha256: &str) -> Option<u64> {
        self.zst.read().ok()?.sizes.get(sha256).copied()
    }

    /// Reloads the known compressed copies: all of them (`full`, which also
    /// forgets removed ones), or those stored since the newest known.
    pub(super) async fn refresh_zst_sizes(&self, full: bool) {
        if let Err(e) = self.load_zst_sizes(full).await {
            tracing::warn!(error = %e, "cannot load the compressed artifact copies");
        }
    }

    async fn load_zst_sizes(&self, full: bool) -> Result<(), ArtifactError> {
        let since = if full {
            i64::MIN
        } else {
            let newest = self.zst.read().map(|k| k.newest).unwrap_or(0);
            newest.saturating_sub(REFRESH_OVERLAP_SECS)
        };
        let rows = self
            .client()
            .await?
            .query(
                "SELECT sha256, size, created_at FROM artifact_blobs
                 WHERE kind = 'zst' AND created_at >= $1",
                &[&since],
            )
            .await
            .map_err(db)?;
        if let Ok(mut known) = self.zst.write() {
            if full {
                known.sizes.clear();
            }
            for row in rows {
                let created: i64 = row.get(2);
                known.newest = known.newest.max(created);
                known.sizes.insert(row.get(0), row.get::<_, i64>(1) as u64);
            }
        }
        Ok(())
    }
}

/// A stored copy, open for reading.
pub(super) struct Blob {
    pool: Pool,
    sha256: String,
    upload: String,
    chunk_size: u64,
    size: u64,
}

/// Where a [`Blob::read`] is.
struct Reading {
    blob: Blob,
    /// The byte range, end exclusive.
    start: u64,
    end: u64,
    next: i64,
    last: i64,
    ready: VecDeque<Bytes>,
    failed: bool,
}

impl Blob {
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Streams `count` bytes from `start`: the chunks covering them, a few
    /// per query, the first and last cut to the range.
    pub(super) fn read(self, start: u64, count: u64) -> ByteStream {
        let end = start.saturating_add(count).min(self.size);
        if start >= end {
            return Box::pin(futures_util::stream::empty());
        }
        let state = Reading {
            next: (start / self.chunk_size) as i64,
            last: ((end - 1) / self.chunk_size) as i64,
            blob: self,
            start,
            end,
            ready: VecDeque::new(),
            failed: false,
        };
        Box::pin(futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(part) = st.ready.pop_front() {
                    return Some((Ok(part), st));
                }
                if st.failed || st.next > st.last {
                    return None;
                }
                let to = (st.next + READ_AHEAD - 1).min(st.last);
                if let Err(e) = st.fetch(to).await {
                    st.failed = true;
                    return Some((Err(e), st));
                }
            }
        }))
    }
}

impl Reading {
    /// Fetches chunks `next..=to` into `ready`.
    async fn fetch(&mut self, to: i64) -> Result<(), ArtifactError> {
        let client = self.blob.pool.get().await.map_err(pool_error)?;
        let statement = client
            .prepare_cached(
                "SELECT idx, data FROM artifact_chunks
                 WHERE upload = $1 AND idx >= $2 AND idx <= $3 ORDER BY idx",
            )
            .await
            .map_err(db)?;
        let rows = client
            .query(&statement, &[&self.blob.upload, &self.next, &to])
            .await
            .map_err(db)?;
        let cs = self.blob.chunk_size;
        for row in rows {
            let idx: i64 = row.get(0);
            let data: &[u8] = row.get(1);
            let offset = idx as u64 * cs;
            let expected = cs.min(self.blob.size - offset.min(self.blob.size));
            if idx != self.next || data.len() as u64 != expected {
                break;
            }
            let lo = self.start.saturating_sub(offset) as usize;
            let hi = (self.end - offset).min(data.len() as u64) as usize;
            self.ready.push_back(Bytes::copy_from_slice(&data[lo..hi]));
            self.next += 1;
        }
        if self.next <= to {
            return Err(ArtifactError::Database(format!(
                "artifact {} lacks its chunk {} (removed while being read?)",
                self.blob.sha256, self.next
            )));
        }
        Ok(())
    }
}

/// The compressor's input: chunks from an async task, read on a blocking
/// thread. The end of the channel is the end of the file; reading also
/// ends early once the output is abandoned (the compressor panics on
/// errors, so neither side reports one to it).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
    abandoned: Arc<AtomicBool>,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            if self.abandoned.load(Ordering::Relaxed) {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(part) => self.current = part,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// The compressor's output: chunk-sized pieces sent to an async task;
/// when that task stops listening, the rest is dropped.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    abandoned: Arc<AtomicBool>,
}

impl ChannelWriter {
    fn send(&mut self) {
        let part = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHUNK_SIZE),
        ));
        if !self.abandoned.load(Ordering::Relaxed) && self.tx.blocking_send(part).is_err() {
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }

    fn finish(mut self) {
        if !self.buf.is_empty() {
            self.send();
        }
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_SIZE {
            self.send();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
