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
//! file is damaged, records wait in memory up to a bound ([`Retention`]:
//! refusals go first, then the oldest status, telemetry and results;
//! update events are never dropped, even then), the condition is reported
//! in telemetry, and appending resumes by itself once there is room again.
//! A damaged file is moved aside and what it still holds is carried over.

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

pub use policy::{DeleteOn, Overflow, Stream, StreamPolicy};
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

/// What may happen to a record while it waits in memory for the disk,
/// once more than `memory_records` wait. The database file does not know
/// it: it only matters before the record is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept whatever the bound: update events the fleet must see.
    Keep,
    /// Dropped, oldest first, once the bound is reached.
    Droppable,
    /// Dropped before any other record, oldest first. For events anyone
    /// who can publish on the device's topics can provoke at will (refused
    /// desired states and root chains): they count against the bound, so
    /// a flood of them cannot grow memory, and they cannot push out the
    /// device's own status and telemetry either.
    DropFirst,
}

impl Retention {
    /// What [`OutboxHandle::push`] gives a stream's records: events are
    /// kept, everything else is droppable.
    pub fn default_for(stream: Stream) -> Self {
        match stream {
            Stream::Events => Self::Keep,
            Stream::Status | Stream::Telemetry | Stream::Results => Self::Droppable,
        }
    }
}

/// A record queued in memory, with what may happen to it there.
struct Waiting {
    record: NewRecord,
    retention: Retention,
}

struct Inner {
    seq: Sequence,
    pending: Mutex<VecDeque<Waiting>>,
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

/// Drops records beyond `bound`: the oldest [`Retention::DropFirst`] ones,
/// then the oldest [`Retention::Droppable`] ones; [`Retention::Keep`]
/// records stay even beyond it. Returns how many went.
fn enforce_memory_bound(queue: &mut VecDeque<Waiting>, bound: usize) -> u64 {
    let mut dropped = 0;
    while queue.len() > bound {
        let victim = [Retention::DropFirst, Retention::Droppable]
            .into_iter()
            .find_map(|retention| queue.iter().position(|w| w.retention == retention));
        match victim {
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
        self.push_with(stream, Retention::default_for(stream), make)
    }

    /// [`OutboxHandle::push`] with a chosen [`Retention`] while the record
    /// waits in memory.
    pub fn push_with(
        &self,
        stream: Stream,
        retention: Retention,
        make: impl FnOnce(u64) -> Vec<u8>,
    ) -> u64 {
        let mut queue = lock(&self.0.pending);
        // Numbered under the queue lock, so the queue is in sequence order.
        let seq = self.0.seq.next();
        queue.push_back(Waiting {
            record: NewRecord {
                stream,
                seq,
                payload: make(seq),
            },
            retention,
        });
        let dropped = enforce_memory_bound(&mut queue, self.0.memory_records);
        drop(queue);
        if dropped > 0 {
            lock(&self.0.state).dropped += dropped;
        }
        self.0.writer_wake.notify_one();
        seq
    }

    /// Appends what is queued, in transactions of up to `MAX_BATCH` records.
    /// Returns how many records were written. On error the records stay
    /// queued in memory, in order.
    pub fn flush(&self) -> Result<usize, OutboxError> {
        let mut written = 0;
        loop {
            // Moved apart (not copied) for the append, and back together
            // if it fails.
            let (batch, retentions): (Vec<NewRecord>, Vec<Retention>) = {
                let mut queue = lock(&self.0.pending);
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).map(|w| (w.record, w.retention)).unzip()
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
                    for (record, retention) in batch.into_iter().zip(retentions).rev() {
                        queue.push_front(Waiting { record, retention });
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
        let on_disk = fill_to_cap(&h);
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

    /// Pushes telemetry until the database reaches its size cap; returns
    /// how many records are on disk.
    fn fill_to_cap(h: &OutboxHandle) -> usize {
        let mut on_disk = 0;
        loop {
            for _ in 0..10 {
                h.push(Stream::Telemetry, |_| vec![1; 400]);
            }
            match h.flush() {
                Ok(n) => on_disk += n,
                Err(e) => {
                    assert!(e.is_disk_full(), "{e}");
                    return on_disk;
                }
            }
        }
    }

    #[test]
    fn refusals_count_against_the_memory_bound_and_go_first_while_the_disk_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let h = handle(dir.path(), 48 * 1024, 50);
        let on_disk = fill_to_cap(&h);
        // The ten telemetry records of the failed flush wait in memory.
        assert_eq!(h.health().memory_depth, 10);
        let dropped_before = h.health().dropped;
        // A flood of refusals with a genuine event every thousand.
        for i in 0..10_000u32 {
            h.push_with(Stream::Events, Retention::DropFirst, |_| {
                format!("refused {i}").into_bytes()
            });
            if i % 1000 == 0 {
                h.push(Stream::Events, |_| format!("genuine {i}").into_bytes());
            }
            assert!(h.health().memory_depth <= 50);
        }
        let health = h.health();
        assert_eq!(health.memory_depth, 50);
        // 10 telemetry + 10 genuine events stay; of the refusals only the
        // newest 30 do, and every one that went is counted.
        assert_eq!(health.dropped - dropped_before, 10_000 - 30);
        let sent = h.next_batch(on_disk, &HashSet::new()).unwrap();
        h.ack(&sent.iter().map(|r| r.seq).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(h.flush().unwrap(), 50);
        let stored = h.next_batch(1000, &HashSet::new()).unwrap();
        let texts: Vec<String> = stored
            .iter()
            .filter(|r| r.stream == Stream::Events)
            .map(|r| String::from_utf8(r.payload.clone()).unwrap())
            .collect();
        let genuine: Vec<&String> = texts.iter().filter(|t| t.starts_with("genuine")).collect();
        assert_eq!(genuine.len(), 10, "no genuine event was dropped");
        let refused: Vec<&String> = texts.iter().filter(|t| t.starts_with("refused")).collect();
        assert_eq!(refused.len(), 30);
        assert_eq!(refused[0], "refused 9970", "the oldest refusals went first");
        let telemetry = stored
            .iter()
            .filter(|r| r.stream == Stream::Telemetry)
            .count();
        assert_eq!(telemetry, 10, "refusals do not push out telemetry");
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
