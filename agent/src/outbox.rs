//! The durable outbox (groundwork for issue 4): everything the agent sends
//! upstream is appended here first, in batched SQLite transactions (WAL),
//! and deleted only once the broker has acknowledged it.
//!
//! Each stream has a priority and a size cap with an explicit overflow
//! policy; update events are never dropped. Draining is oldest-first within
//! priority. The policy decisions are plain functions ([`plan_overflow`]),
//! tested without a database; the SQL lives in [`Outbox`].
//!
//! Not wired into the uplink yet: the agent still sends events through an
//! in-memory queue.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

/// What a stream carries, in drain priority order (first = highest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Events,
    Status,
    Telemetry,
    Results,
}

impl Stream {
    pub const ALL: [Stream; 4] = [Self::Events, Self::Status, Self::Telemetry, Self::Results];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Status => "status",
            Self::Telemetry => "telemetry",
            Self::Results => "results",
        }
    }

    fn priority(self) -> i64 {
        self as i64
    }
}

/// What to do when a stream is over its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Delete the oldest records to make room.
    DropOldest,
    /// Refuse the new record.
    RejectNew,
    /// Thin out the older half (delete every second record of it), so the
    /// history keeps its span at a coarser resolution.
    Downsample,
    /// Never drop: the append fails only when the disk does.
    Never,
}

/// Caps of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPolicy {
    pub max_rows: u64,
    pub max_bytes: u64,
    pub overflow: Overflow,
}

impl StreamPolicy {
    /// Defaults sized for a 32 MB-class device with a few MB of disk to
    /// spare: events are never dropped.
    pub fn default_for(stream: Stream) -> Self {
        match stream {
            Stream::Events => Self {
                max_rows: u64::MAX,
                max_bytes: u64::MAX,
                overflow: Overflow::Never,
            },
            Stream::Status => Self {
                max_rows: 100,
                max_bytes: 256 * 1024,
                overflow: Overflow::DropOldest,
            },
            Stream::Telemetry => Self {
                max_rows: 50_000,
                max_bytes: 8 * 1024 * 1024,
                overflow: Overflow::Downsample,
            },
            Stream::Results => Self {
                max_rows: 20_000,
                max_bytes: 16 * 1024 * 1024,
                overflow: Overflow::DropOldest,
            },
        }
    }
}

/// Rows and bytes a stream holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub rows: u64,
    pub bytes: u64,
}

/// The overflow decision for adding one record of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPlan {
    /// It fits.
    Append,
    /// Append after deleting the `n` oldest records.
    DropOldest(u64),
    /// Append after thinning the older half.
    Downsample,
    /// Do not append.
    Reject,
}

/// Decides how to make room for a record of `size` bytes. `oldest` yields
/// the sizes of the stream's records, oldest first, for drop-oldest.
pub fn plan_overflow(
    policy: &StreamPolicy,
    usage: Usage,
    size: u64,
    oldest: impl IntoIterator<Item = u64>,
) -> OverflowPlan {
    let fits =
        |u: Usage| u.rows < policy.max_rows && u.bytes.saturating_add(size) <= policy.max_bytes;
    if fits(usage) || policy.overflow == Overflow::Never {
        return OverflowPlan::Append;
    }
    if size > policy.max_bytes {
        return OverflowPlan::Reject;
    }
    match policy.overflow {
        Overflow::RejectNew => OverflowPlan::Reject,
        Overflow::Downsample => OverflowPlan::Downsample,
        Overflow::Never => OverflowPlan::Append,
        Overflow::DropOldest => {
            let mut left = usage;
            let mut n = 0;
            for s in oldest {
                if fits(left) {
                    break;
                }
                left.rows -= 1;
                left.bytes -= s;
                n += 1;
            }
            if fits(left) {
                OverflowPlan::DropOldest(n)
            } else {
                OverflowPlan::Reject
            }
        }
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: i64,
    pub stream: Stream,
    pub created_at: u64,
    pub payload: Vec<u8>,
}

/// What happened to one appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored { dropped: u64 },
    Downsampled { dropped: u64 },
    Rejected,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// The SQLite-backed outbox.
pub struct Outbox {
    conn: Connection,
    policies: [StreamPolicy; 4],
}

impl Outbox {
    pub fn open(path: &Path, policies: [StreamPolicy; 4]) -> Result<Self, OutboxError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: an acknowledged append survives power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS records (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                priority INTEGER NOT NULL,
                created_at INTEGER NOT NULL,
                size INTEGER NOT NULL,
                payload BLOB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS records_by_priority ON records (priority, id);",
        )?;
        Ok(Self { conn, policies })
    }

    pub fn usage(&self, stream: Stream) -> Result<Usage, OutboxError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE priority = ?1",
            [stream.priority()],
            |r| {
                Ok(Usage {
                    rows: r.get::<_, i64>(0)? as u64,
                    bytes: r.get::<_, i64>(1)? as u64,
                })
            },
        )?)
    }

    /// Appends a batch in one transaction, applying each stream's policy.
    pub fn append(
        &mut self,
        batch: &[(Stream, Vec<u8>)],
        now: u64,
    ) -> Result<Vec<Appended>, OutboxError> {
        let policies = self.policies;
        let tx = self.conn.transaction()?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for (stream, payload) in batch {
            let p = stream.priority();
            let size = payload.len() as u64;
            let usage = tx.query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE priority = ?1",
                [p],
                |r| {
                    Ok(Usage {
                        rows: r.get::<_, i64>(0)? as u64,
                        bytes: r.get::<_, i64>(1)? as u64,
                    })
                },
            )?;
            let policy = policies[p as usize];
            let oldest: Vec<u64> = if policy.overflow == Overflow::DropOldest {
                let mut stmt =
                    tx.prepare_cached("SELECT size FROM records WHERE priority = ?1 ORDER BY id")?;
                let sizes = stmt.query_map([p], |r| r.get::<_, i64>(0).map(|s| s as u64))?;
                sizes.collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            let outcome = match plan_overflow(&policy, usage, size, oldest) {
                OverflowPlan::Reject => {
                    outcomes.push(Appended::Rejected);
                    continue;
                }
                OverflowPlan::Append => Appended::Stored { dropped: 0 },
                OverflowPlan::DropOldest(n) => {
                    tx.execute(
                        "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE priority = ?1 ORDER BY id LIMIT ?2)",
                        params![p, n as i64],
                    )?;
                    Appended::Stored { dropped: n }
                }
                OverflowPlan::Downsample => {
                    let half = (usage.rows / 2).max(1) as i64;
                    let dropped = tx.execute(
                        "DELETE FROM records WHERE id IN (
                            SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n
                                            FROM records WHERE priority = ?1 ORDER BY id LIMIT ?2)
                            WHERE n % 2 = 0)",
                        params![p, half],
                    )? as u64;
                    Appended::Downsampled { dropped }
                }
            };
            tx.execute(
                "INSERT INTO records (priority, created_at, size, payload) VALUES (?1, ?2, ?3, ?4)",
                params![p, now as i64, size as i64, payload],
            )?;
            outcomes.push(outcome);
        }
        tx.commit()?;
        Ok(outcomes)
    }

    /// Up to `limit` records to send next: highest priority first, oldest
    /// first within it.
    pub fn next_batch(&self, limit: usize) -> Result<Vec<Record>, OutboxError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, priority, created_at, payload FROM records ORDER BY priority, id LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(Record {
                id: r.get(0)?,
                stream: Stream::ALL[r.get::<_, i64>(1)? as usize],
                created_at: r.get::<_, i64>(2)? as u64,
                payload: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes records the broker acknowledged.
    pub fn ack(&mut self, ids: &[i64]) -> Result<(), OutboxError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached("DELETE FROM records WHERE id = ?1")?;
            for id in ids {
                stmt.execute([id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Creation time of the oldest record, if any.
    pub fn oldest(&self) -> Result<Option<u64>, OutboxError> {
        Ok(self
            .conn
            .query_row("SELECT MIN(created_at) FROM records", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .optional()?
            .flatten()
            .map(|v| v as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_rows: u64, max_bytes: u64, overflow: Overflow) -> StreamPolicy {
        StreamPolicy {
            max_rows,
            max_bytes,
            overflow,
        }
    }

    #[test]
    fn plans_follow_each_policy() {
        let full = Usage { rows: 3, bytes: 30 };
        let sizes = [10, 10, 10];
        assert_eq!(
            plan_overflow(&policy(10, 100, Overflow::RejectNew), full, 10, sizes),
            OverflowPlan::Append
        );
        assert_eq!(
            plan_overflow(&policy(3, 100, Overflow::RejectNew), full, 10, sizes),
            OverflowPlan::Reject
        );
        assert_eq!(
            plan_overflow(&policy(3, 100, Overflow::DropOldest), full, 10, sizes),
            OverflowPlan::DropOldest(1)
        );
        assert_eq!(
            plan_overflow(&policy(10, 35, Overflow::DropOldest), full, 20, sizes),
            OverflowPlan::DropOldest(2)
        );
        assert_eq!(
            plan_overflow(&policy(3, 100, Overflow::Downsample), full, 10, sizes),
            OverflowPlan::Downsample
        );
        assert_eq!(
            plan_overflow(&policy(3, 30, Overflow::Never), full, 10, sizes),
            OverflowPlan::Append
        );
        // A record bigger than the whole cap can never fit.
        assert_eq!(
            plan_overflow(&policy(10, 15, Overflow::DropOldest), full, 20, sizes),
            OverflowPlan::Reject
        );
    }

    fn open(dir: &Path, telemetry: StreamPolicy) -> Outbox {
        let mut policies = Stream::ALL.map(StreamPolicy::default_for);
        policies[Stream::Telemetry as usize] = telemetry;
        Outbox::open(&dir.join("outbox.db"), policies).unwrap()
    }

    #[test]
    fn drains_by_priority_then_age_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), StreamPolicy::default_for(Stream::Telemetry));
        outbox
            .append(
                &[
                    (Stream::Telemetry, b"t1".to_vec()),
                    (Stream::Events, b"e1".to_vec()),
                    (Stream::Telemetry, b"t2".to_vec()),
                    (Stream::Events, b"e2".to_vec()),
                ],
                7,
            )
            .unwrap();
        drop(outbox);
        let mut outbox = open(dir.path(), StreamPolicy::default_for(Stream::Telemetry));
        let batch = outbox.next_batch(10).unwrap();
        let payloads: Vec<&[u8]> = batch.iter().map(|r| r.payload.as_slice()).collect();
        assert_eq!(payloads, vec![&b"e1"[..], b"e2", b"t1", b"t2"]);
        assert_eq!(outbox.oldest().unwrap(), Some(7));
        outbox.ack(&[batch[0].id, batch[2].id]).unwrap();
        let left: Vec<Vec<u8>> = outbox
            .next_batch(10)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect();
        assert_eq!(left, vec![b"e2".to_vec(), b"t2".to_vec()]);
    }

    #[test]
    fn overflow_policies_apply_per_stream_and_events_are_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), policy(10, u64::MAX, Overflow::Downsample));
        for i in 0..25u32 {
            outbox
                .append(
                    &[
                        (Stream::Telemetry, i.to_le_bytes().to_vec()),
                        (Stream::Events, vec![0; 100]),
                    ],
                    0,
                )
                .unwrap();
        }
        let telemetry = outbox.usage(Stream::Telemetry).unwrap();
        assert!(telemetry.rows <= 10, "{telemetry:?}");
        assert_eq!(outbox.usage(Stream::Events).unwrap().rows, 25);
        // Downsampling keeps the newest record and the span of the history.
        let kept: Vec<u32> = outbox
            .next_batch(100)
            .unwrap()
            .into_iter()
            .filter(|r| r.stream == Stream::Telemetry)
            .map(|r| u32::from_le_bytes(r.payload.try_into().unwrap()))
            .collect();
        assert_eq!(*kept.last().unwrap(), 24);
        assert_eq!(kept[0], 0);

        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), policy(3, u64::MAX, Overflow::RejectNew));
        let out = outbox
            .append(
                &(0..5u8)
                    .map(|i| (Stream::Telemetry, vec![i]))
                    .collect::<Vec<_>>(),
                0,
            )
            .unwrap();
        assert_eq!(out.iter().filter(|o| **o == Appended::Rejected).count(), 2);
        let kept: Vec<Vec<u8>> = outbox
            .next_batch(10)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect();
        assert_eq!(kept, vec![vec![0], vec![1], vec![2]]);
    }
}
