//! The durable outbox: everything the agent sends upstream (update events,
//! status, telemetry, inference results) is appended here first and
//! deleted only once it is delivered: by default when the fleet server's
//! receipt says it is stored (the broker's QoS 1 PUBACK alone is not
//! enough: an embedded broker restarting without the server subscribed yet
//! would acknowledge and drop it).
//!
//! - [`OutboxHandle::push`] stamps a record with the next per-device
//!   sequence number and queues it in memory; it never blocks on disk.
//! - The writer task ([`OutboxHandle::run_writer`]) appends whatever queued
//!   up meanwhile in one SQLite transaction (group commit), applying each
//!   stream's cap and overflow policy ([`policy`]).
//! - The uplink reads [`OutboxHandle::next_batch`], publishes, and calls
//!   [`OutboxHandle::ack`] with what the fleet server's receipt names (or,
//!   with `delete_on = "puback"`, what the broker acknowledged).
//!
//! When the disk is full (or the database reaches `max_db_bytes`) or the
//! file is damaged, records wait in memory up to a bound (update events are
//! never dropped, even then), the condition is reported in telemetry, and
//! appending resumes by itself once there is room again. A damaged file is
//! moved aside and what it still holds is carried over.

pub mod policy;
pub mod sequence;
pub mod store;

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use edgefleet_shared::OutboxHealth;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use policy::{Overflow, Stream, StreamPolicy};
pub use sequence::Sequence;
pub use store::{Appended, Depth, NewRecord, Outbox, OutboxError, Record};

/// Most records appended in one transaction.
const MAX_BATCH: usize = 4096;

/// Clone-able access to the outbox, shared by everything that reports.
#[derive(Clone)]
pub struct OutboxHandle(Arc<Inner>);

impl std::fmt::Debug for OutboxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxHandle").finish_non_exhaustive()
    }
}

struct Inner {
    seq: Sequence,
    pending: Mutex<VecDeque<NewRecord>>,
    memory_records: usize,
    writer_wake: Notify,
    stored: Notify,
    db: Mutex<Outbox>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A passing problem (disk full, ...), cleared by the next good append.
    condition: Option<String>,
    /// A lasting one: the file could not be opened at all.
    degraded: Option<String>,
    dropped: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops the oldest droppable (non-event) records beyond `bound`.
fn enforce_memory_bound(queue: &mut VecDeque<NewRecord>, bound: usize) -> u64 {
    let mut dropped = 0;
    while queue.len() > bound {
        match queue.iter().position(|r| r.stream != Stream::Events) {
            Some(i) => {
                queue.remove(i);
                dropped += 1;
            }
            None => break,
        }
    }
    dropped
}

impl OutboxHandle {
    /// Opens the outbox file. If it cannot be opened at all (a read-only
    /// or missing disk), the agent still runs: records are kept in an
    /// in-memory database and the condition is reported.
    pub fn open(
        path: &Path,
        policies: [StreamPolicy; 4],
        max_db_bytes: u64,
        memory_records: usize,
        seq: Sequence,
    ) -> Result<Self, OutboxError> {
        let mut state = State::default();
        let db = match Outbox::open(path, policies, max_db_bytes) {
            Ok(db) => {
                if let Some(n) = db.salvaged {
                    state.condition = Some(format!(
                        "database was corrupt: moved aside, {n} records carried over"
                    ));
                }
                db
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot open the outbox database; buffering in memory only");
                state.degraded = Some(format!(
                    "cannot open database, buffering in memory only: {e}"
                ));
                Outbox::open(Path::new(":memory:"), policies, max_db_bytes)?
            }
        };
        Ok(Self(Arc::new(Inner {
            seq,
            pending: Mutex::new(VecDeque::new()),
            memory_records: memory_records.max(1),
            writer_wake: Notify::new(),
            stored: Notify::new(),
            db: Mutex::new(db),
            state: Mutex::new(state),
        })))
    }

    /// Queues a record; `make` builds its payload from its sequence number.
    /// Returns the sequence number.
    pub fn push(&self, stream: Stream, make: impl FnOnce(u64) -> Vec<u8>) -> u64 {
        let mut queue = lock(&self.0.pending);
        // Numbered under the queue lock, so the queue is in sequence order.
        let seq = self.0.seq.next();
        queue.push_back(NewRecord {
            stream,
            seq,
            payload: make(seq),
        });
        let dropped = enforce_memory_bound(&mut queue, self.0.memory_records);
        drop(queue);
        if dropped > 0 {
            lock(&self.0.state).dropped += dropped;
        }
        self.0.writer_wake.notify_one();
        seq
    }

    /// Appends what is queued, in transactions of up to [`MAX_BATCH`].
    /// Returns how many records were written. On error the records stay
    /// queued in memory, in order.
    pub fn flush(&self) -> Result<usize, OutboxError> {
        let mut written = 0;
        loop {
            let batch: Vec<NewRecord> = {
                let mut queue = lock(&self.0.pending);
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                return Ok(written);
            }
            let mut db = lock(&self.0.db);
            match db.append(&batch, edgefleet_shared::unix_now()) {
                Ok(outcomes) => {
                    drop(db);
                    let lost: u64 = outcomes.iter().map(|o| o.lost()).sum();
                    let mut state = lock(&self.0.state);
                    state.dropped += lost;
                    if state.condition.take().is_some() {
                        tracing::info!("outbox is writing to disk again");
                    }
                    drop(state);
                    written += batch.len();
                    self.0.stored.notify_one();
                }
                Err(e) => {
                    let mut queue = lock(&self.0.pending);
                    for record in batch.into_iter().rev() {
                        queue.push_front(record);
                    }
                    let dropped = enforce_memory_bound(&mut queue, self.0.memory_records);
                    drop(queue);
                    let mut condition = e.condition();
                    if e.is_corrupt() {
                        match db.recover() {
                            Ok(n) => {
                                condition = format!(
                                    "database was corrupt: moved aside, {n} records carried over"
                                )
                            }
                            Err(e2) => {
                                tracing::error!(error = %e2, "cannot rebuild the outbox database")
                            }
                        }
                    }
                    let mut state = lock(&self.0.state);
                    state.dropped += dropped;
                    if state.condition.as_deref() != Some(condition.as_str()) {
                        tracing::error!(error = %e, "outbox cannot append; buffering in memory");
                    }
                    state.condition = Some(condition);
                    return Err(e);
                }
            }
        }
    }

    /// The writer: group-commits queued records until `shutdown`, then
    /// writes what is left. Failing appends are retried with backoff.
    pub async fn run_writer(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.0.writer_wake.notified() => {}
            }
            loop {
                let h = self.clone();
                match tokio::task::spawn_blocking(move || h.flush()).await {
                    Ok(Ok(_)) => {
                        failures = 0;
                        break;
                    }
                    Ok(Err(_)) => {
                        failures += 1;
                        let wait = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "outbox writer task failed");
                        break;
                    }
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
        }
        let h = self.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || h.flush()).await {
            tracing::error!(error = %e, "records still in memory at shutdown are lost");
        }
    }

    /// Wakes when new records are on disk.
    pub fn stored(&self) -> &Notify {
        &self.0.stored
    }

    /// The next records to send (see [`Outbox::next_batch`]). Blocking.
    pub fn next_batch(
        &self,
        limit: usize,
        exclude: &HashSet<u64>,
    ) -> Result<Vec<Record>, OutboxError> {
        lock(&self.0.db).next_batch(limit, exclude)
    }

    /// Deletes delivered records by sequence number. Blocking.
    pub fn ack(&self, seqs: &[u64]) -> Result<(), OutboxError> {
        lock(&self.0.db).ack_seqs(seqs)?;
        // Freed room may let records waiting in memory in.
        if !lock(&self.0.pending).is_empty() {
            self.0.writer_wake.notify_one();
        }
        Ok(())
    }

    /// Depth, age and condition, for telemetry and the display. Blocking
    /// (one aggregate query).
    pub fn health(&self) -> OutboxHealth {
        let depth = lock(&self.0.db).depth();
        let memory_depth = lock(&self.0.pending).len() as u64;
        let state = lock(&self.0.state);
        let now = edgefleet_shared::unix_now();
        let (depth, condition) = match depth {
            Ok(d) => (d, state.condition.clone().or(state.degraded.clone())),
            Err(e) => (Depth::default(), Some(e.condition())),
        };
        OutboxHealth {
            depth: depth.rows,
            depth_bytes: depth.bytes,
            memory_depth,
            oldest_age_secs: depth.oldest.map(|t| now.saturating_sub(t)),
            dropped: state.dropped,
            condition,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(dir: &Path, max_db_bytes: u64, memory_records: usize) -> OutboxHandle {
        let mut policies = Stream::ALL.map(StreamPolicy::default_for);
        policies[Stream::Telemetry as usize].max_rows = u64::MAX;
        policies[Stream::Telemetry as usize].max_bytes = u64::MAX;
        OutboxHandle::open(
            &dir.join("outbox.db"),
            policies,
            max_db_bytes,
            memory_records,
            Sequence::persistent(&dir.join("seq")).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn records_are_numbered_in_order_and_flushed_in_one_go() {
        let dir = tempfile::tempdir().unwrap();
        let h = handle(dir.path(), 1 << 30, 100);
        let seqs: Vec<u64> = (0..5)
            .map(|i| h.push(Stream::Telemetry, |seq| format!("{i}:{seq}").into_bytes()))
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(h.health().memory_depth, 5);
        assert_eq!(h.flush().unwrap(), 5);
        let batch = h.next_batch(10, &HashSet::new()).unwrap();
        assert_eq!(batch.len(), 5);
        for (i, r) in batch.iter().enumerate() {
            assert_eq!(r.seq, seqs[i]);
            assert_eq!(r.payload, format!("{i}:{}", seqs[i]).into_bytes());
        }
        let health = h.health();
        assert_eq!((health.depth, health.memory_depth), (5, 0));
        h.ack(&batch.iter().map(|r| r.seq).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(h.health().depth, 0);
    }

    #[test]
    fn a_full_disk_keeps_records_in_memory_within_bounds_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let h = handle(dir.path(), 48 * 1024, 50);
        // Fill the database to its cap.
        let mut on_disk = 0;
        loop {
            for _ in 0..10 {
                h.push(Stream::Telemetry, |_| vec![1; 400]);
            }
            match h.flush() {
                Ok(n) => on_disk += n,
                Err(e) => {
                    assert!(e.is_disk_full(), "{e}");
                    break;
                }
            }
        }
        let health = h.health();
        assert_eq!(health.condition.as_deref(), Some("disk full"));
        assert_eq!(health.depth, on_disk as u64, "what was on disk stays");
        // More records while full: telemetry is bounded in memory, events
        // are kept whatever the bound.
        for _ in 0..200 {
            h.push(Stream::Telemetry, |_| vec![2; 400]);
        }
        for _ in 0..60 {
            h.push(Stream::Events, |_| vec![3; 10]);
        }
        let health = h.health();
        assert_eq!(health.memory_depth, 60);
        assert!(health.dropped >= 200);
        // Draining makes room; the next flush writes everything queued.
        let sent = h.next_batch(on_disk, &HashSet::new()).unwrap();
        h.ack(&sent.iter().map(|r| r.seq).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(h.flush().unwrap(), 60);
        let health = h.health();
        assert_eq!((health.memory_depth, health.condition), (0, None));
        let events = h
            .next_batch(1000, &HashSet::new())
            .unwrap()
            .into_iter()
            .filter(|r| r.stream == Stream::Events)
            .count();
        assert_eq!(events, 60, "no event was dropped");
    }

    #[test]
    fn an_unopenable_path_falls_back_to_memory_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let h = OutboxHandle::open(
            &dir.path().join("missing-dir").join("outbox.db"),
            Stream::ALL.map(StreamPolicy::default_for),
            1 << 20,
            10,
            Sequence::persistent(&dir.path().join("seq")).unwrap(),
        )
        .unwrap();
        h.push(Stream::Events, |_| b"e".to_vec());
        assert_eq!(h.flush().unwrap(), 1);
        let condition = h.health().condition.unwrap();
        assert!(condition.contains("cannot open database"), "{condition}");
    }
}
